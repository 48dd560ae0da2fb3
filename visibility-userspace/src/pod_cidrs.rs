//! Where this node's Pod CIDRs come from: the operator's configuration, the CNI's
//! host-local ranges, and the routes the node has to its Pod interfaces. The daemon
//! learns them anew on every reconcile; the same manifest serves every node.
//!
//! What the datapath gets, and why it is safe. A route to a Pod interface is a host
//! route (`/32`, `/128`) per Pod on ptp CNIs, or the bridge's subnet on bridge CNIs. The
//! node's own range is known exactly only from the CNI's IPAM (`host-local` ranges) or,
//! later, from the Kubernetes Node. Routes alone give the exact set of this node's Pod
//! addresses, merged into the fewest prefixes that cover exactly them, never a guessed
//! wider range: other nodes' Pods stay outside, so their traffic is counted as
//! `pass_not_same_node`. Redirecting needs more than the CIDR anyway: `pod_egress`
//! runs on the destination Pod's own interface (the node routed the packet to a Pod on
//! this node) and sends only packets that entered from a Pod interface of this node
//! with that Pod's source; a packet from another node's Pod enters from the uplink.

use std::{
    collections::BTreeMap,
    net::IpAddr,
    path::{Path, PathBuf},
};

use globset::GlobMatcher;
use ipnet::IpNet;
use serde::{Deserialize, Serialize};
use visibility_common::packet::Family;

use crate::{net::family_of, node::NodeView};

/// Where a Pod CIDR came from, the most trusted first.
#[derive(Clone, Copy, Debug, PartialEq, Eq, PartialOrd, Ord, Hash, Serialize, Deserialize)]
#[serde(rename_all = "kebab-case")]
pub enum CidrSource {
    /// `pod-cidr` in the configuration, or `visibility pod-cidr add`: an override, with
    /// which the daemon adds no learned CIDR.
    Configured,
    /// The Node's `spec.podCIDRs`, read from the Kubernetes API.
    Kubernetes,
    /// A `host-local` IPAM range in the CNI configuration.
    Cni,
    /// The node's routes to its Pod interfaces.
    Routes,
}

impl CidrSource {
    pub const fn name(self) -> &'static str {
        match self {
            CidrSource::Configured => "configured",
            CidrSource::Kubernetes => "kubernetes",
            CidrSource::Cni => "cni",
            CidrSource::Routes => "routes",
        }
    }
}

/// Most learned prefixes per family, so that configured ones keep room in the datapath's
/// trie ([`visibility_common::MAX_POD_CIDRS`]): beyond it, the closest prefixes merge
/// into the one that covers both (still within this node's own addresses' span).
pub const MAX_LEARNED_PER_FAMILY: usize = visibility_common::MAX_POD_CIDRS as usize / 2;

/// Where the CNI configuration is read by default.
pub const DEFAULT_CNI_CONF_DIR: &str = "/etc/cni/net.d";

/// A destination the node routes to a Pod interface (or its bridge).
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct PodRoute {
    pub destination: IpNet,
    pub ifindex: u32,
}

/// The routes of the main table that lead straight (no gateway) to a Pod interface: a
/// veth, a bridge with a veth port, or an interface matching `--pod-interfaces`; never
/// an uplink. Link-local and default routes are not Pod addresses, and neither is the
/// subnet of an address the node has on that very interface, unless it is a bridge's
/// (a bridge CNI's Pod subnet): a veth that carries the node's own subnet is a link to
/// other hosts, such as an uplink whose default route is gone for a moment.
pub fn pod_routes(view: &NodeView, uplinks: &[u32], glob: Option<&GlobMatcher>) -> Vec<PodRoute> {
    let is_bridge_with_veths = |ifindex: u32| {
        view.interface(ifindex).is_some_and(|i| i.kind == "bridge")
            && view
                .interfaces
                .values()
                .any(|port| port.master == Some(ifindex) && port.is_veth())
    };
    let leads_to_pods = |ifindex: u32, destination: &IpNet| {
        let Some(iface) = view.interface(ifindex) else {
            return false;
        };
        if is_bridge_with_veths(ifindex) {
            return true;
        }
        let own_subnet = view
            .addresses
            .iter()
            .any(|(i, addr)| *i == ifindex && destination.contains(addr));
        (iface.is_veth() || glob.is_some_and(|g| g.is_match(&iface.name))) && !own_subnet
    };
    view.routes
        .iter()
        .filter(|route| route.gateway.is_none() && is_pod_address_range(&route.destination))
        .filter_map(|route| Some((route, route.oif?)))
        .filter(|(route, oif)| !uplinks.contains(oif) && leads_to_pods(*oif, &route.destination))
        .map(|(route, ifindex)| PodRoute {
            destination: route.destination.trunc(),
            ifindex,
        })
        .collect()
}

/// Link-local, multicast and default destinations name no Pod.
fn is_pod_address_range(net: &IpNet) -> bool {
    let link_local_or_multicast = match net.addr() {
        IpAddr::V4(v4) => v4.is_link_local() || v4.is_multicast(),
        IpAddr::V6(v6) => (v6.segments()[0] & 0xffc0) == 0xfe80 || v6.is_multicast(),
    };
    net.prefix_len() > 0 && !link_local_or_multicast
}

/// The fewest prefixes that cover exactly `nets` (at most `max` per family, merging the
/// closest beyond it).
pub fn aggregate(nets: &[IpNet], max: usize) -> Vec<IpNet> {
    let mut out = Vec::new();
    for family in [Family::V4, Family::V6] {
        let mut merged = IpNet::aggregate(
            &nets
                .iter()
                .copied()
                .filter(|n| family_of(n) == family)
                .collect(),
        );
        while merged.len() > max {
            // The neighbours (in address order) with the longest common prefix.
            let (at, supernet) = merged
                .windows(2)
                .enumerate()
                .map(|(at, pair)| (at, common_supernet(&pair[0], &pair[1])))
                .max_by_key(|(_, net)| net.prefix_len())
                .expect("more than one prefix");
            merged.splice(at..at + 2, [supernet]);
            merged = IpNet::aggregate(&merged);
        }
        out.extend(merged);
    }
    out
}

/// The longest prefix that covers both (of one family).
fn common_supernet(a: &IpNet, b: &IpNet) -> IpNet {
    let mut len = a.prefix_len().min(b.prefix_len());
    loop {
        let net = IpNet::new(a.addr(), len)
            .expect("shorter than the address")
            .trunc();
        if net.contains(b) || len == 0 {
            return net;
        }
        len -= 1;
    }
}

/// The `host-local` ranges of every CNI configuration in `dir` (`*.conf`, `*.conflist`,
/// `*.json`), with the files that could not be read or parsed. A missing directory
/// holds none.
pub fn cni_ranges(dir: &Path) -> (Vec<IpNet>, Vec<(PathBuf, String)>) {
    let mut ranges = Vec::new();
    let mut problems = Vec::new();
    let Ok(entries) = std::fs::read_dir(dir) else {
        return (ranges, problems);
    };
    let mut paths: Vec<PathBuf> = entries
        .filter_map(Result::ok)
        .map(|e| e.path())
        .filter(|p| {
            p.extension()
                .is_some_and(|e| e == "conf" || e == "conflist" || e == "json")
        })
        .collect();
    paths.sort();
    for path in paths {
        match std::fs::read_to_string(&path)
            .map_err(|e| e.to_string())
            .and_then(|text| serde_json::from_str(&text).map_err(|e| e.to_string()))
        {
            Ok(json) => collect_host_local(&json, &mut ranges),
            Err(error) => problems.push((path, error)),
        }
    }
    ranges.sort();
    ranges.dedup();
    (ranges, problems)
}

/// Every `ipam` of type `host-local` in a CNI configuration (a plugin, a conflist's
/// plugins, or a delegate): its `ranges` (sets of `{subnet}`) and legacy `subnet`.
/// Placeholders such as Calico's `usePodCidr` are not ranges.
fn collect_host_local(json: &serde_json::Value, out: &mut Vec<IpNet>) {
    match json {
        serde_json::Value::Object(object) => {
            if let Some(ipam) = object.get("ipam")
                && ipam["type"] == "host-local"
            {
                let range_sets = ipam["ranges"].as_array().into_iter().flatten();
                let subnets = range_sets
                    .flat_map(|set| set.as_array().into_iter().flatten())
                    .map(|range| &range["subnet"])
                    .chain([&ipam["subnet"]]);
                out.extend(
                    subnets
                        .filter_map(|s| s.as_str()?.parse::<IpNet>().ok())
                        .map(|n| n.trunc()),
                );
            }
            object.values().for_each(|v| collect_host_local(v, out));
        }
        serde_json::Value::Array(items) => items.iter().for_each(|v| collect_host_local(v, out)),
        _ => {}
    }
}

/// What the node says its Pod CIDRs are, each with its source: the Node's
/// `spec.podCIDRs`, the CNI's ranges, and the Pod routes that none of them covers
/// (merged).
pub fn learn(
    kubernetes: &[IpNet],
    cni: &[IpNet],
    routes: &[PodRoute],
) -> BTreeMap<IpNet, CidrSource> {
    let mut learned: BTreeMap<IpNet, CidrSource> =
        cni.iter().map(|net| (*net, CidrSource::Cni)).collect();
    learned.extend(kubernetes.iter().map(|net| (*net, CidrSource::Kubernetes)));
    let uncovered: Vec<IpNet> = routes
        .iter()
        .map(|r| r.destination)
        .filter(|dest| !learned.keys().any(|net| net.contains(dest)))
        .collect();
    for net in aggregate(&uncovered, MAX_LEARNED_PER_FAMILY) {
        learned.entry(net).or_insert(CidrSource::Routes);
    }
    learned
}

/// Pod addresses (route destinations) that no CIDR in `cidrs` covers, with the
/// interface name the node routes them to.
pub fn uncovered<'a>(
    routes: impl IntoIterator<Item = &'a PodRoute>,
    cidrs: &[IpNet],
) -> Vec<&'a PodRoute> {
    routes
        .into_iter()
        .filter(|r| !cidrs.iter().any(|c| c.contains(&r.destination)))
        .collect()
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::node::testing::{iface, route};

    fn nets(list: &[&str]) -> Vec<IpNet> {
        list.iter().map(|s| s.parse().unwrap()).collect()
    }

    fn view() -> NodeView {
        let mut view = NodeView::default();
        for i in [
            iface(2, "eth0", "veth", None),
            iface(3, "veth0", "veth", None),
            iface(4, "veth1", "veth", None),
            iface(5, "cni0", "bridge", None),
            iface(6, "vethb", "veth", Some(5)),
            iface(7, "br-empty", "bridge", None),
            iface(8, "dummy0", "dummy", None),
        ] {
            view.interfaces.insert(i.index, i);
        }
        view.routes = vec![
            route("0.0.0.0/0", 2, Some("10.128.0.1")),
            route("10.128.0.0/24", 2, None),
            route("10.52.0.2/32", 3, None),
            route("10.52.0.3/32", 4, None),
            route("fd00:52::2/128", 3, None),
            route("fe80::/64", 3, None),
            route("10.244.1.0/24", 5, None),
            route("10.99.0.0/24", 7, None),
            route("10.98.0.0/24", 8, None),
            route("10.53.0.0/16", 3, Some("10.52.0.2")),
        ];
        view
    }

    #[test]
    fn pod_routes_are_direct_routes_to_veths_and_bridges_with_veths_never_the_uplink() {
        let found: Vec<(String, u32)> = pod_routes(&view(), &[2], None)
            .iter()
            .map(|r| (r.destination.to_string(), r.ifindex))
            .collect();
        assert_eq!(
            found,
            [
                ("10.52.0.2/32".to_owned(), 3),
                ("10.52.0.3/32".to_owned(), 4),
                ("fd00:52::2/128".to_owned(), 3),
                ("10.244.1.0/24".to_owned(), 5),
            ]
        );
        // Without its default route, the uplink is not known as one; its own subnet
        // still names no Pod.
        let mut no_default = view();
        no_default
            .addresses
            .push((2, "10.128.0.2".parse().unwrap()));
        no_default.routes.remove(0);
        assert!(
            pod_routes(&no_default, &[], None)
                .iter()
                .all(|r| r.ifindex != 2)
        );
        let glob = globset::Glob::new("dummy*").unwrap().compile_matcher();
        assert!(
            pod_routes(&view(), &[2], Some(&glob))
                .iter()
                .any(|r| r.ifindex == 8)
        );
    }

    #[test]
    fn host_routes_merge_into_exactly_the_addresses_they_cover() {
        assert_eq!(
            aggregate(
                &nets(&[
                    "10.52.0.2/32",
                    "10.52.0.3/32",
                    "10.52.0.5/32",
                    "fd00::2/128"
                ]),
                8
            ),
            nets(&["10.52.0.2/31", "10.52.0.5/32", "fd00::2/128"])
        );
    }

    #[test]
    fn beyond_the_budget_the_closest_prefixes_merge_first() {
        let merged = aggregate(&nets(&["10.52.0.2/32", "10.52.0.8/32", "10.52.7.1/32"]), 2);
        assert_eq!(merged, nets(&["10.52.0.0/28", "10.52.7.1/32"]));
    }

    #[test]
    fn cni_ranges_cover_the_routes_they_contain() {
        let routes = pod_routes(&view(), &[2], None);
        let learned = learn(&[], &nets(&["10.52.0.0/24"]), &routes);
        let expected: BTreeMap<IpNet, CidrSource> = [
            ("10.52.0.0/24", CidrSource::Cni),
            ("10.244.1.0/24", CidrSource::Routes),
            ("fd00:52::2/128", CidrSource::Routes),
        ]
        .into_iter()
        .map(|(n, s)| (n.parse().unwrap(), s))
        .collect();
        assert_eq!(learned, expected);
        let outside = uncovered(&routes, &nets(&["10.52.0.0/24"]));
        assert_eq!(outside.len(), 2, "{outside:?}");
    }

    #[test]
    fn the_nodes_pod_cidrs_come_first_and_cover_their_routes() {
        let routes = pod_routes(&view(), &[2], None);
        let learned = learn(
            &nets(&["10.52.0.0/24", "fd00:52::/112"]),
            &nets(&["10.52.0.0/24"]),
            &routes,
        );
        let expected: BTreeMap<IpNet, CidrSource> = [
            ("10.52.0.0/24", CidrSource::Kubernetes),
            ("fd00:52::/112", CidrSource::Kubernetes),
            ("10.244.1.0/24", CidrSource::Routes),
        ]
        .into_iter()
        .map(|(n, s)| (n.parse().unwrap(), s))
        .collect();
        assert_eq!(learned, expected);
    }

    #[test]
    fn host_local_ranges_are_read_from_conflists_and_plain_configs() {
        let dir = std::env::temp_dir().join(format!("vis-cni-{}", std::process::id()));
        std::fs::create_dir_all(&dir).unwrap();
        std::fs::write(
            dir.join("10-gke-ptp.conflist"),
            r#"{"cniVersion":"0.3.1","name":"gke-pod-network","plugins":[
                {"type":"ptp","ipam":{"type":"host-local","ranges":[
                    [{"subnet":"10.52.0.0/24"}],[{"subnet":"fd00:52::/112"}]]}},
                {"type":"portmap"}]}"#,
        )
        .unwrap();
        std::fs::write(
            dir.join("20-bridge.conf"),
            r#"{"type":"bridge","ipam":{"type":"host-local","subnet":"10.244.1.0/24"}}"#,
        )
        .unwrap();
        std::fs::write(
            dir.join("30-calico.conflist"),
            r#"{"plugins":[{"type":"calico","ipam":{"type":"host-local","subnet":"usePodCidr"}},
                {"type":"x","ipam":{"type":"calico-ipam","subnet":"10.0.0.0/8"}}]}"#,
        )
        .unwrap();
        std::fs::write(dir.join("40-broken.conf"), "{").unwrap();
        std::fs::write(dir.join("README"), "not a config").unwrap();
        let (ranges, problems) = cni_ranges(&dir);
        std::fs::remove_dir_all(&dir).unwrap();
        assert_eq!(
            ranges,
            nets(&["10.52.0.0/24", "10.244.1.0/24", "fd00:52::/112"])
        );
        assert_eq!(problems.len(), 1);
        assert!(problems[0].0.ends_with("40-broken.conf"));
        assert_eq!(cni_ranges(Path::new("/nonexistent/cni")).0, vec![]);
    }
}
