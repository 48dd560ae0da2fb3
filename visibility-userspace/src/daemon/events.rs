//! Keeps the daemon's [`NodeView`] current from netlink's notifications, so that a
//! reconcile after one Pod's interface came or went costs that change, not a dump of the
//! whole node (links, routes, addresses and neighbours of hundreds of Pods). The full
//! dump stays for the start, the slow reconcile, and notifications lost to an overrun.

use futures::StreamExt as _;
use netlink_packet_route::{AddressFamily, RouteNetlinkMessage, link::LinkFlags};
use netlink_sys::AsyncSocket as _;
use rtnetlink::{
    Handle,
    packet_core::{NLM_F_REPLACE, NetlinkMessage, NetlinkPayload},
};
use tokio::sync::mpsc::UnboundedReceiver;
use tracing::warn;
use visibility_common::packet::Family;

use crate::node::{self, NodeError, NodeView};

/// How much the kernel may queue for the daemon before it drops notifications: a burst
/// of 50 Pods brings a few hundred messages of up to a kilobyte or so each.
const RECEIVE_BUFFER: usize = 4 << 20;

/// What netlink said.
#[derive(Debug)]
pub enum NodeEvent {
    /// A link, address, route or neighbour changed, with its `nlmsg_flags`.
    Changed(u16, RouteNetlinkMessage),
    /// The socket overran and notifications were lost: only a full dump is current.
    Lost,
}

/// Notifications of links, addresses, routes and neighbours of both families.
pub fn subscribe() -> Result<UnboundedReceiver<NodeEvent>, NodeError> {
    use rtnetlink::constants::{
        RTMGRP_IPV4_IFADDR, RTMGRP_IPV4_ROUTE, RTMGRP_IPV6_IFADDR, RTMGRP_IPV6_ROUTE, RTMGRP_LINK,
        RTMGRP_NEIGH,
    };
    let (mut connection, _, mut messages) =
        rtnetlink::new_connection().map_err(NodeError::Connect)?;
    let groups = RTMGRP_LINK
        | RTMGRP_IPV4_IFADDR
        | RTMGRP_IPV4_ROUTE
        | RTMGRP_IPV6_IFADDR
        | RTMGRP_IPV6_ROUTE
        | RTMGRP_NEIGH;
    let socket = connection.socket_mut().socket_mut();
    // Forcing the size needs CAP_NET_ADMIN, which the daemon has; without it the
    // kernel's default applies and an overrun costs a full dump.
    if nix::sys::socket::setsockopt(
        &*socket,
        nix::sys::socket::sockopt::RcvBufForce,
        &RECEIVE_BUFFER,
    )
    .is_err()
    {
        let _ = socket.set_rx_buf_sz(RECEIVE_BUFFER);
    }
    socket
        .bind(&netlink_sys::SocketAddr::new(0, groups))
        .map_err(NodeError::Connect)?;
    tokio::spawn(connection);
    let (sender, receiver) = tokio::sync::mpsc::unbounded_channel();
    tokio::spawn(async move {
        while let Some((message, _)) = messages.next().await {
            let NetlinkMessage {
                header, payload, ..
            } = message;
            let event = match payload {
                NetlinkPayload::InnerMessage(inner) => NodeEvent::Changed(header.flags, inner),
                NetlinkPayload::Overrun(_) => NodeEvent::Lost,
                _ => continue,
            };
            if sender.send(event).is_err() {
                break;
            }
        }
    });
    Ok(receiver)
}

/// The node as the daemon knows it: a full dump, and the events since.
#[derive(Default)]
pub struct LiveView {
    view: NodeView,
    /// False before the first dump, after a failed one, and after lost events: then
    /// only a new dump tells how the node is.
    current: bool,
}

impl LiveView {
    /// Reads the whole node; `None` (and a warning) when that failed.
    pub async fn read(&mut self, handle: &Handle) -> Option<&NodeView> {
        match NodeView::read(handle).await {
            Ok(view) => {
                self.view = view;
                self.current = true;
                Some(&self.view)
            }
            Err(error) => {
                warn!(%error, "reading the node");
                self.current = false;
                None
            }
        }
    }

    /// Applies one event, or notes that some were lost.
    pub fn apply(&mut self, event: NodeEvent) {
        match event {
            NodeEvent::Changed(flags, message) if self.current => self.view.apply(flags, &message),
            NodeEvent::Changed(..) => {}
            NodeEvent::Lost => {
                warn!("netlink notifications were lost; reading the whole node");
                self.current = false;
            }
        }
    }

    /// The node as the events have it, or as a new dump has it when they cannot tell.
    pub async fn current(&mut self, handle: &Handle) -> Option<&NodeView> {
        if self.current {
            Some(&self.view)
        } else {
            self.read(handle).await
        }
    }
}

fn family(address_family: AddressFamily) -> Option<Family> {
    match address_family {
        AddressFamily::Inet => Some(Family::V4),
        AddressFamily::Inet6 => Some(Family::V6),
        _ => None,
    }
}

impl NodeView {
    /// Applies one notification. Applied in order after a dump taken once the
    /// subscription was open, notifications leave the view as the node is.
    pub fn apply(&mut self, flags: u16, message: &RouteNetlinkMessage) {
        match message {
            // A bridge's view of its ports (AF_BRIDGE) says nothing of the link itself:
            // a port leaving its bridge is an RTM_DELLINK of that family.
            RouteNetlinkMessage::NewLink(link)
                if link.header.interface_family != AddressFamily::Bridge =>
            {
                let iface = node::interface(link);
                if !link.header.flags.contains(LinkFlags::Up) {
                    // The kernel removes a downed interface's IPv4 routes without a word.
                    self.forget_routes(iface.index, Some(Family::V4));
                }
                self.interfaces.insert(iface.index, iface);
            }
            RouteNetlinkMessage::DelLink(link)
                if link.header.interface_family != AddressFamily::Bridge =>
            {
                let index = link.header.index;
                self.interfaces.remove(&index);
                self.forget_routes(index, None);
                self.addresses.retain(|(ifindex, _)| *ifindex != index);
                self.neighbours.retain(|n| n.ifindex != index);
            }
            RouteNetlinkMessage::NewRoute(message) => {
                let Some(route) = family(message.header.address_family)
                    .and_then(|family| node::route(message, family))
                else {
                    return;
                };
                if flags & NLM_F_REPLACE != 0 {
                    self.routes.retain(|r| r.destination != route.destination);
                }
                if !self.routes.contains(&route) {
                    self.routes.push(route);
                }
            }
            RouteNetlinkMessage::DelRoute(message) => {
                if let Some(route) = family(message.header.address_family)
                    .and_then(|family| node::route(message, family))
                {
                    self.routes.retain(|r| *r != route);
                }
            }
            RouteNetlinkMessage::NewAddress(message) => {
                for entry in node::addresses_of(message) {
                    if !self.addresses.contains(&entry) {
                        self.addresses.push(entry);
                    }
                }
            }
            RouteNetlinkMessage::DelAddress(message) => {
                for entry in node::addresses_of(message) {
                    self.addresses.retain(|a| *a != entry);
                }
            }
            RouteNetlinkMessage::NewNeighbour(message) => {
                if let Some(neighbour) = node::neighbour(message) {
                    self.neighbours
                        .retain(|n| (n.ifindex, n.addr) != (neighbour.ifindex, neighbour.addr));
                    self.neighbours.push(neighbour);
                }
            }
            RouteNetlinkMessage::DelNeighbour(message) => {
                if let Some(gone) = node::neighbour(message) {
                    self.neighbours
                        .retain(|n| (n.ifindex, n.addr) != (gone.ifindex, gone.addr));
                }
            }
            _ => {}
        }
    }

    /// Drops the routes out of `ifindex`, of one family or both.
    fn forget_routes(&mut self, ifindex: u32, family: Option<Family>) {
        self.routes.retain(|r| {
            r.oif != Some(ifindex)
                || family.is_some_and(|f| crate::net::family_of(&r.destination) != f)
        });
    }
}

#[cfg(test)]
mod tests {
    use netlink_packet_route::{
        link::{LinkAttribute, LinkMessage},
        route::{RouteAddress, RouteAttribute, RouteMessage},
    };

    use super::*;
    use crate::node::testing::{iface, route};

    fn link(index: u32, name: &str, up: bool, bridge: bool) -> LinkMessage {
        let mut message = LinkMessage::default();
        message.header.index = index;
        if up {
            message.header.flags = LinkFlags::Up | LinkFlags::LowerUp;
        }
        if bridge {
            message.header.interface_family = AddressFamily::Bridge;
        }
        message
            .attributes
            .push(LinkAttribute::IfName(name.to_owned()));
        message
    }

    fn host_route(destination: std::net::Ipv4Addr, oif: u32) -> RouteMessage {
        let mut message = RouteMessage::default();
        message.header.address_family = AddressFamily::Inet;
        message.header.destination_prefix_length = 32;
        message.header.table = 254;
        message.attributes = vec![
            RouteAttribute::Destination(RouteAddress::Inet(destination)),
            RouteAttribute::Oif(oif),
        ];
        message
    }

    fn view() -> NodeView {
        let mut view = NodeView::default();
        view.interfaces.insert(3, iface(3, "veth3", "veth", None));
        view.routes = vec![
            route("10.52.0.3/32", 3, None),
            route("fd00::3/128", 3, None),
        ];
        view.addresses = vec![(3, "10.52.0.1".parse().unwrap())];
        view
    }

    #[test]
    fn a_gone_link_takes_its_routes_and_addresses_along() {
        let mut view = view();
        view.apply(
            0,
            &RouteNetlinkMessage::DelLink(link(3, "veth3", true, false)),
        );
        assert!(view.interfaces.is_empty());
        assert!(view.routes.is_empty());
        assert!(view.addresses.is_empty());
    }

    #[test]
    fn a_bridge_ports_notices_leave_the_link_alone() {
        let mut view = view();
        view.apply(
            0,
            &RouteNetlinkMessage::DelLink(link(3, "veth3", true, true)),
        );
        view.apply(0, &RouteNetlinkMessage::NewLink(link(3, "", false, true)));
        assert_eq!(view.interfaces[&3].name, "veth3");
        assert_eq!(view.routes.len(), 2);
    }

    #[test]
    fn a_downed_link_loses_its_ipv4_routes_only() {
        let mut view = view();
        view.apply(
            0,
            &RouteNetlinkMessage::NewLink(link(3, "veth3", false, false)),
        );
        assert_eq!(view.routes, vec![route("fd00::3/128", 3, None)]);
    }

    #[test]
    fn routes_come_go_and_are_replaced() {
        let mut view = NodeView::default();
        let to_4 = host_route("10.52.0.4".parse().unwrap(), 4);
        view.apply(0, &RouteNetlinkMessage::NewRoute(to_4.clone()));
        view.apply(0, &RouteNetlinkMessage::NewRoute(to_4.clone()));
        assert_eq!(view.routes, vec![route("10.52.0.4/32", 4, None)]);
        let moved = host_route("10.52.0.4".parse().unwrap(), 5);
        view.apply(NLM_F_REPLACE, &RouteNetlinkMessage::NewRoute(moved.clone()));
        assert_eq!(view.routes, vec![route("10.52.0.4/32", 5, None)]);
        view.apply(0, &RouteNetlinkMessage::DelRoute(moved));
        assert!(view.routes.is_empty());
    }
}
