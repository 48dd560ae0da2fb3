//! What the node looks like, from netlink: interfaces, routes, addresses and
//! neighbours. The daemon takes a full snapshot at start and on its slow reconcile, and
//! keeps it current in between from netlink's notifications (`daemon::events`).

use std::{
    collections::BTreeMap,
    net::{IpAddr, Ipv4Addr, Ipv6Addr},
};

use futures::TryStreamExt as _;
use ipnet::IpNet;
use netlink_packet_route::AddressFamily;
use netlink_packet_route::{
    address::{AddressAttribute, AddressMessage},
    link::{InfoKind, LinkAttribute, LinkFlags, LinkInfo, LinkMessage},
    neighbour::{
        NeighbourAddress, NeighbourAttribute, NeighbourExtFlags, NeighbourFlags, NeighbourMessage,
        NeighbourState,
    },
    route::{RouteAddress, RouteAttribute, RouteMessage},
};
use rtnetlink::{Handle, RouteMessageBuilder};
use visibility_common::packet::Family;

/// The kernel's main routing table.
const RT_TABLE_MAIN: u32 = 254;

/// Netlink failures.
#[derive(Debug, thiserror::Error)]
pub enum NodeError {
    /// The netlink socket could not be opened.
    #[error("opening a netlink socket: {0}")]
    Connect(#[source] std::io::Error),
    /// A netlink request failed.
    #[error("netlink {what}: {source}")]
    Request {
        what: &'static str,
        #[source]
        source: rtnetlink::Error,
    },
}

fn request(what: &'static str) -> impl FnOnce(rtnetlink::Error) -> NodeError {
    move |source| NodeError::Request { what, source }
}

/// One network interface.
#[derive(Clone, Debug, PartialEq, Eq, serde::Serialize)]
pub struct Interface {
    pub index: u32,
    pub name: String,
    /// The link kind (`veth`, `bridge`, ...), empty for plain devices.
    pub kind: String,
    /// The bridge or bond it is enslaved to.
    pub master: Option<u32>,
    /// Administratively up and with carrier.
    pub up: bool,
    #[serde(skip)]
    pub mac: Option<[u8; 6]>,
}

impl Interface {
    pub fn is_veth(&self) -> bool {
        self.kind == "veth"
    }
}

/// One route of the main table.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Route {
    pub destination: IpNet,
    pub gateway: Option<IpAddr>,
    pub oif: Option<u32>,
}

/// A neighbour entry.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Neighbour {
    pub ifindex: u32,
    pub addr: IpAddr,
    pub mac: Option<[u8; 6]>,
    pub state: NeighbourState,
    /// The kernel keeps it resolved by itself (`NTF_EXT_MANAGED`).
    pub managed: bool,
}

impl Neighbour {
    /// Whether the kernel has a usable MAC for it.
    pub fn is_resolved(&self) -> bool {
        self.mac.is_some()
            && matches!(
                self.state,
                NeighbourState::Reachable
                    | NeighbourState::Stale
                    | NeighbourState::Delay
                    | NeighbourState::Probe
                    | NeighbourState::Permanent
                    | NeighbourState::Noarp
            )
    }
}

/// A snapshot of the node's network configuration.
#[derive(Clone, Debug, Default)]
pub struct NodeView {
    pub interfaces: BTreeMap<u32, Interface>,
    pub routes: Vec<Route>,
    /// Every address on every interface, with the interface.
    pub addresses: Vec<(u32, IpAddr)>,
    pub neighbours: Vec<Neighbour>,
}

fn mac(bytes: &[u8]) -> Option<[u8; 6]> {
    <[u8; 6]>::try_from(bytes).ok()
}

pub(crate) fn interface(message: &LinkMessage) -> Interface {
    let mut iface = Interface {
        index: message.header.index,
        name: String::new(),
        kind: String::new(),
        master: None,
        up: message.header.flags.contains(LinkFlags::Up)
            && message.header.flags.contains(LinkFlags::LowerUp),
        mac: None,
    };
    for attribute in &message.attributes {
        match attribute {
            LinkAttribute::IfName(name) => iface.name = name.clone(),
            LinkAttribute::Controller(master) => iface.master = Some(*master),
            LinkAttribute::Address(bytes) => iface.mac = mac(bytes),
            LinkAttribute::LinkInfo(infos) => {
                for info in infos {
                    if let LinkInfo::Kind(kind) = info {
                        iface.kind = match kind {
                            InfoKind::Veth => "veth".to_owned(),
                            InfoKind::Bridge => "bridge".to_owned(),
                            other => format!("{other:?}").to_lowercase(),
                        };
                    }
                }
            }
            _ => {}
        }
    }
    iface
}

fn route_addr(addr: &RouteAddress) -> Option<IpAddr> {
    match addr {
        RouteAddress::Inet(v4) => Some(IpAddr::V4(*v4)),
        RouteAddress::Inet6(v6) => Some(IpAddr::V6(*v6)),
        _ => None,
    }
}

pub(crate) fn route(message: &RouteMessage, family: Family) -> Option<Route> {
    let mut table = u32::from(message.header.table);
    let mut destination = None;
    let mut gateway = None;
    let mut oif = None;
    for attribute in &message.attributes {
        match attribute {
            RouteAttribute::Table(t) => table = *t,
            RouteAttribute::Destination(addr) => destination = route_addr(addr),
            RouteAttribute::Gateway(addr) => gateway = route_addr(addr),
            RouteAttribute::Oif(index) => oif = Some(*index),
            _ => {}
        }
    }
    if table != RT_TABLE_MAIN {
        return None;
    }
    let unspecified = match family {
        Family::V4 => IpAddr::V4(Ipv4Addr::UNSPECIFIED),
        Family::V6 => IpAddr::V6(Ipv6Addr::UNSPECIFIED),
    };
    let destination = IpNet::new(
        destination.unwrap_or(unspecified),
        message.header.destination_prefix_length,
    )
    .ok()?;
    Some(Route {
        destination,
        gateway,
        oif,
    })
}

/// A neighbour entry from its netlink message; `None` without an address.
pub(crate) fn neighbour(message: &NeighbourMessage) -> Option<Neighbour> {
    let mut addr = None;
    let mut lladdr = None;
    let mut managed = false;
    for attribute in &message.attributes {
        match attribute {
            NeighbourAttribute::ExtFlags(flags) => {
                managed = flags.contains(NeighbourExtFlags::Managed)
            }
            NeighbourAttribute::Destination(NeighbourAddress::Inet(v4)) => {
                addr = Some(IpAddr::V4(*v4))
            }
            NeighbourAttribute::Destination(NeighbourAddress::Inet6(v6)) => {
                addr = Some(IpAddr::V6(*v6))
            }
            NeighbourAttribute::LinkLayerAddress(bytes) => lladdr = mac(bytes),
            _ => {}
        }
    }
    Some(Neighbour {
        ifindex: message.header.ifindex,
        addr: addr?,
        mac: lladdr,
        state: message.header.state,
        managed,
    })
}

/// The addresses an address message carries, each with its interface.
pub(crate) fn addresses_of(message: &AddressMessage) -> impl Iterator<Item = (u32, IpAddr)> + '_ {
    message
        .attributes
        .iter()
        .filter_map(|attribute| match attribute {
            AddressAttribute::Address(addr) => Some((message.header.index, *addr)),
            _ => None,
        })
}

impl NodeView {
    /// Reads the current state through `handle`.
    pub async fn read(handle: &Handle) -> Result<Self, NodeError> {
        let mut view = NodeView::default();
        let mut links = handle.link().get().execute();
        while let Some(message) = links.try_next().await.map_err(request("listing links"))? {
            let iface = interface(&message);
            view.interfaces.insert(iface.index, iface);
        }
        for (family, builder) in [
            (Family::V4, RouteMessageBuilder::<Ipv4Addr>::new().build()),
            (Family::V6, RouteMessageBuilder::<Ipv6Addr>::new().build()),
        ] {
            let mut routes = handle.route().get(builder).execute();
            while let Some(message) = routes.try_next().await.map_err(request("listing routes"))? {
                view.routes.extend(route(&message, family));
            }
        }
        let mut addresses = handle.address().get().execute();
        while let Some(message) = addresses
            .try_next()
            .await
            .map_err(request("listing addresses"))?
        {
            view.addresses.extend(addresses_of(&message));
        }
        for family in [AddressFamily::Inet, AddressFamily::Inet6] {
            let mut neighbours = handle
                .neighbours()
                .get()
                .set_address_family(family)
                .execute();
            while let Some(message) = neighbours
                .try_next()
                .await
                .map_err(request("listing neighbours"))?
            {
                view.neighbours.extend(neighbour(&message));
            }
        }
        Ok(view)
    }

    pub fn interface(&self, index: u32) -> Option<&Interface> {
        self.interfaces.get(&index)
    }

    pub fn interface_by_name(&self, name: &str) -> Option<&Interface> {
        self.interfaces.values().find(|i| i.name == name)
    }

    /// The default route of a family: (uplink ifindex, gateway).
    pub fn default_route(&self, family: Family) -> Option<(u32, IpAddr)> {
        self.routes
            .iter()
            .filter(|r| {
                r.destination.prefix_len() == 0 && crate::net::family_of(&r.destination) == family
            })
            .find_map(|r| Some((r.oif?, r.gateway?)))
    }

    /// The neighbour entry for an address on an interface.
    pub fn neighbour(&self, ifindex: u32, addr: &IpAddr) -> Option<&Neighbour> {
        self.neighbours
            .iter()
            .find(|n| n.ifindex == ifindex && n.addr == *addr)
    }

    /// Every address the node owns.
    pub fn node_addresses(&self) -> Vec<IpAddr> {
        let mut addrs: Vec<IpAddr> = self.addresses.iter().map(|(_, a)| *a).collect();
        addrs.sort();
        addrs.dedup();
        addrs
    }
}

/// Makes the kernel keep a neighbour entry resolved by itself (a "managed" entry,
/// Linux 5.16+), so that redirected packets never wait for ARP/NDP. On older kernels
/// it asks for one resolution now (`NTF_USE`); the daemon repeats that each reconcile.
pub async fn keep_resolved(handle: &Handle, ifindex: u32, addr: IpAddr) -> Result<(), NodeError> {
    let mut managed = handle
        .neighbours()
        .add(ifindex, addr)
        .state(NeighbourState::None)
        .replace();
    managed
        .message_mut()
        .attributes
        .push(NeighbourAttribute::ExtFlags(NeighbourExtFlags::Managed));
    if managed.execute().await.is_ok() {
        return Ok(());
    }
    handle
        .neighbours()
        .add(ifindex, addr)
        .state(NeighbourState::None)
        .flags(NeighbourFlags::Use)
        .replace()
        .execute()
        .await
        .map_err(request("resolving the gateway's neighbour"))
}

/// Removes a managed neighbour entry, leaving the kernel to learn it as usual.
pub async fn forget_managed(handle: &Handle, ifindex: u32, addr: IpAddr) -> Result<(), NodeError> {
    let view = NodeView::read(handle).await?;
    let Some(_) = view.neighbour(ifindex, &addr).filter(|n| n.managed) else {
        return Ok(());
    };
    let mut request_message = netlink_packet_route::neighbour::NeighbourMessage::default();
    request_message.header.family = if addr.is_ipv4() {
        AddressFamily::Inet
    } else {
        AddressFamily::Inet6
    };
    request_message.header.ifindex = ifindex;
    request_message
        .attributes
        .push(NeighbourAttribute::Destination(match addr {
            IpAddr::V4(v4) => NeighbourAddress::Inet(v4),
            IpAddr::V6(v6) => NeighbourAddress::Inet6(v6),
        }));
    handle
        .neighbours()
        .del(request_message)
        .execute()
        .await
        .map_err(request("removing the managed neighbour"))
}

/// Opens a netlink connection and runs it on the current tokio runtime.
pub fn connect() -> Result<Handle, NodeError> {
    let (connection, handle, _) = rtnetlink::new_connection().map_err(NodeError::Connect)?;
    tokio::spawn(connection);
    Ok(handle)
}

/// Builders of a [`NodeView`]'s parts, for the unit tests of what reads one.
#[cfg(test)]
pub(crate) mod testing {
    use super::{Interface, Route};

    /// An interface that is up, without a MAC.
    pub fn iface(index: u32, name: &str, kind: &str, master: Option<u32>) -> Interface {
        Interface {
            index,
            name: name.into(),
            kind: kind.into(),
            master,
            up: true,
            mac: None,
        }
    }

    /// A route of the main table out of `oif`.
    pub fn route(dst: &str, oif: u32, gateway: Option<&str>) -> Route {
        Route {
            destination: dst.parse().unwrap(),
            oif: Some(oif),
            gateway: gateway.map(|g| g.parse().unwrap()),
        }
    }
}
