//! Which interfaces are Pod interfaces, and where each family's traffic leaves.

use std::net::IpAddr;

use globset::GlobMatcher;
use ipnet::IpNet;
use visibility_common::packet::Family;

use crate::node::NodeView;

/// Why an interface counts as a Pod interface.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Reason {
    /// A veth the node routes a Pod-CIDR address to (ptp CNIs, as on GKE).
    Route,
    /// A veth enslaved to a bridge that the node routes a Pod CIDR to (bridge CNIs).
    Bridge,
    /// Matches `--pod-interfaces`.
    Glob,
}

impl Reason {
    pub const fn name(self) -> &'static str {
        match self {
            Reason::Route => "route",
            Reason::Bridge => "bridge",
            Reason::Glob => "glob",
        }
    }
}

/// A Pod interface found on the node.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct PodInterface {
    pub ifindex: u32,
    pub name: String,
    pub is_veth: bool,
    pub reason: Reason,
    /// Where the node routes the Pod's addresses: the interface itself, or the bridge
    /// it is a port of.
    pub route_ifindex: u32,
}

/// Finds the Pod interfaces. Uplinks never count, whatever their name.
pub fn pod_interfaces(
    view: &NodeView,
    pod_cidrs: &[IpNet],
    glob: Option<&GlobMatcher>,
    uplinks: &[u32],
) -> Vec<PodInterface> {
    let routes_into_pods = |ifindex: u32| {
        view.routes.iter().any(|route| {
            route.oif == Some(ifindex)
                && route.gateway.is_none()
                && pod_cidrs.iter().any(|cidr| {
                    cidr.contains(&route.destination) || route.destination.contains(cidr)
                })
        })
    };
    let mut found: Vec<PodInterface> = view
        .interfaces
        .values()
        .filter(|iface| !uplinks.contains(&iface.index))
        .filter_map(|iface| {
            let reason = if iface.is_veth() && routes_into_pods(iface.index) {
                Reason::Route
            } else if iface.is_veth()
                && iface.master.is_some_and(|m| {
                    view.interface(m).is_some_and(|b| b.kind == "bridge") && routes_into_pods(m)
                })
            {
                Reason::Bridge
            } else if glob.is_some_and(|g| g.is_match(&iface.name)) {
                Reason::Glob
            } else {
                return None;
            };
            Some(PodInterface {
                ifindex: iface.index,
                name: iface.name.clone(),
                is_veth: iface.is_veth(),
                reason,
                route_ifindex: match reason {
                    Reason::Bridge => iface.master.unwrap_or(iface.index),
                    Reason::Route | Reason::Glob => iface.index,
                },
            })
        })
        .collect();
    found.sort_by_key(|p| p.ifindex);
    found
}

/// Where one family's redirected packets leave the node.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Uplink {
    pub family: Family,
    pub ifindex: u32,
    pub name: String,
    pub gateway: IpAddr,
    /// The node's own address of the family on the uplink (the first one), if any: the
    /// source of the ICMP errors the datapath sends as a router.
    pub node_addr: Option<IpAddr>,
}

/// Why a family has no uplink.
#[derive(Clone, Debug, PartialEq, Eq, thiserror::Error)]
pub enum UplinkError {
    /// The configured uplink does not exist.
    #[error("uplink {0} does not exist")]
    NoSuchInterface(String),
    /// No gateway was configured and the default route has none on the uplink.
    #[error("no gateway: pass --gateway or add a default route via the uplink")]
    NoGateway,
}

/// The uplink of a family: the configured interface and gateway, or else the
/// default route's.
pub fn uplink(
    view: &NodeView,
    family: Family,
    configured_uplink: Option<&str>,
    configured_gateway: Option<IpAddr>,
) -> Result<Uplink, UplinkError> {
    let default = view.default_route(family);
    let ifindex = match configured_uplink {
        Some(name) => {
            view.interface_by_name(name)
                .ok_or_else(|| UplinkError::NoSuchInterface(name.to_owned()))?
                .index
        }
        None => default.map(|(oif, _)| oif).ok_or(UplinkError::NoGateway)?,
    };
    let gateway = configured_gateway
        .or_else(|| default.filter(|(oif, _)| *oif == ifindex).map(|(_, gw)| gw))
        .ok_or(UplinkError::NoGateway)?;
    let name = view
        .interface(ifindex)
        .map(|i| i.name.clone())
        .unwrap_or_default();
    let node_addr = view
        .addresses
        .iter()
        .filter(|(oif, addr)| *oif == ifindex && crate::net::family_of_addr(addr) == family)
        .map(|(_, addr)| *addr)
        .find(|addr| !is_link_local(addr));
    Ok(Uplink {
        family,
        ifindex,
        name,
        gateway,
        node_addr,
    })
}

/// IPv6 link-local addresses are no source for ICMP errors to a Pod.
fn is_link_local(addr: &IpAddr) -> bool {
    matches!(addr, IpAddr::V6(v6) if v6.segments()[0] & 0xffc0 == 0xfe80)
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::node::testing::{iface, route};

    fn view() -> NodeView {
        let mut view = NodeView::default();
        for i in [
            iface(1, "lo", "", None),
            iface(2, "eth0", "veth", None),
            iface(3, "veth0", "veth", None),
            iface(4, "cbr0", "bridge", None),
            iface(5, "vethb1", "veth", Some(4)),
            iface(6, "docker0", "bridge", None),
            iface(7, "vethd1", "veth", Some(6)),
            iface(8, "cali123", "", None),
            iface(9, "vethstray", "veth", None),
        ] {
            view.interfaces.insert(i.index, i);
        }
        view.routes = vec![
            route("0.0.0.0/0", 2, Some("10.128.0.1")),
            route("10.52.0.2/32", 3, None),
            route("10.52.1.0/24", 4, None),
            route("172.17.0.0/16", 6, None),
            route("10.52.0.0/16", 2, Some("10.128.0.1")),
        ];
        view
    }

    #[test]
    fn finds_ptp_bridge_and_glob_interfaces_only() {
        let cidrs = [
            "10.52.0.0/24".parse().unwrap(),
            "10.52.1.0/24".parse().unwrap(),
        ];
        let glob = globset::Glob::new("cali*").unwrap().compile_matcher();
        let found = pod_interfaces(&view(), &cidrs, Some(&glob), &[2]);
        let names: Vec<(&str, Reason)> =
            found.iter().map(|p| (p.name.as_str(), p.reason)).collect();
        assert_eq!(
            names,
            vec![
                ("veth0", Reason::Route),
                ("vethb1", Reason::Bridge),
                ("cali123", Reason::Glob)
            ]
        );
    }

    #[test]
    fn uplink_defaults_to_the_default_route() {
        let uplink = uplink(&view(), Family::V4, None, None).unwrap();
        assert_eq!(
            (uplink.ifindex, uplink.gateway),
            (2, "10.128.0.1".parse().unwrap())
        );
        assert_eq!(
            super::uplink(&view(), Family::V6, None, None),
            Err(UplinkError::NoGateway)
        );
        assert_eq!(
            super::uplink(&view(), Family::V4, Some("nope"), None),
            Err(UplinkError::NoSuchInterface("nope".into()))
        );
        let configured = super::uplink(
            &view(),
            Family::V6,
            Some("eth0"),
            Some("fe80::1".parse().unwrap()),
        )
        .unwrap();
        assert_eq!(configured.ifindex, 2);
    }
}
