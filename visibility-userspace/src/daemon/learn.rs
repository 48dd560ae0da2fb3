//! Keeps the datapath's learned Pod CIDRs in line with what the node says (its routes
//! to Pod interfaces, its CNI's ranges, its Node object's `spec.podCIDRs`), one change at a time, and says where each
//! Pod CIDR came from and which Pod addresses none covers.

use std::{collections::BTreeMap, path::PathBuf, sync::Arc};

use globset::GlobMatcher;
use ipnet::IpNet;
use tracing::{info, warn};
use visibility_common::packet::Family;

use crate::{
    discovery::PodInterface,
    health,
    kubernetes::Kubernetes,
    maps::Maps,
    net::family_of,
    node::NodeView,
    pod_cidrs::{self, CidrSource, PodRoute},
    state::{Check, PodCidrState},
};

/// What the last pass learned, and what it logged.
pub struct CidrLearner {
    cni_conf_dir: PathBuf,
    /// A configured `pod-cidr` overrides learning: nothing learned goes to the maps.
    overridden: bool,
    learned: BTreeMap<IpNet, CidrSource>,
    /// The CNI files that did not parse at the last pass (logged once each).
    cni_problems: Vec<PathBuf>,
    /// The Node's `spec.podCIDRs`, when the API answers.
    kubernetes: Arc<Kubernetes>,
}

impl CidrLearner {
    pub fn new(cni_conf_dir: PathBuf, overridden: bool, kubernetes: Arc<Kubernetes>) -> Self {
        Self {
            cni_conf_dir,
            overridden,
            kubernetes,
            learned: BTreeMap::new(),
            cni_problems: Vec::new(),
        }
    }

    /// Learns the node's Pod CIDRs and adds to, or removes from, the maps what changed
    /// (new ones first, so no Pod address is ever left out in between). Returns the
    /// node's Pod routes, for [`CidrLearner::checks`].
    pub fn sync(
        &mut self,
        view: &NodeView,
        uplinks: &[u32],
        glob: Option<&GlobMatcher>,
        maps: &mut Maps,
    ) -> Vec<PodRoute> {
        let routes = pod_cidrs::pod_routes(view, uplinks, glob);
        let (cni, problems) = pod_cidrs::cni_ranges(&self.cni_conf_dir);
        for (path, error) in &problems {
            if !self.cni_problems.contains(path) {
                warn!(file = %path.display(), %error, "reading a CNI configuration; its ranges are not learned");
            }
        }
        self.cni_problems = problems.into_iter().map(|(path, _)| path).collect();
        self.learned = pod_cidrs::learn(&self.kubernetes.node_pod_cidrs(), &cni, &routes);

        let in_maps: Vec<IpNet> = maps
            .pod_cidrs_learned()
            .into_iter()
            .filter_map(|(net, learned)| learned.then_some(net))
            .collect();
        let wanted: Vec<(&IpNet, &CidrSource)> = if self.overridden {
            Vec::new()
        } else {
            self.learned.iter().collect()
        };
        let node_addrs = view.node_addresses();
        for (net, source) in &wanted {
            if in_maps.contains(net) {
                continue;
            }
            match maps.add_learned_pod_cidr(net, &node_addrs) {
                Ok(()) => info!(cidr = %net, source = source.name(), "learned a Pod CIDR"),
                Err(error) => warn!(cidr = %net, %error, "adding a learned Pod CIDR"),
            }
        }
        for net in in_maps
            .iter()
            .filter(|net| !wanted.iter().any(|(w, _)| w == net))
        {
            match maps.remove_pod_cidr(net) {
                Ok(_) => info!(cidr = %net, "a learned Pod CIDR is gone from the node"),
                Err(error) => warn!(cidr = %net, %error, "removing a learned Pod CIDR"),
            }
        }
        routes
    }

    /// The Pod CIDRs in the maps, each with its source: what the daemon learned it from,
    /// or `configured` (the configuration or `visibility pod-cidr add`).
    pub fn states(&self, maps: &Maps) -> Vec<PodCidrState> {
        maps.pod_cidrs_learned()
            .into_iter()
            .map(|(net, learned)| PodCidrState {
                cidr: net.to_string(),
                source: match self.learned.get(&net) {
                    Some(source) if learned => *source,
                    _ => CidrSource::Configured,
                },
            })
            .collect()
    }

    /// Per family, whether its Pod addresses have a Pod CIDR; and the Pod addresses
    /// (routes to the Pod interfaces found) that no Pod CIDR covers.
    pub fn checks(
        &self,
        routes: &[PodRoute],
        pods: &[PodInterface],
        cidrs: &[PodCidrState],
        view: &NodeView,
    ) -> Vec<Check> {
        let pod_routes: Vec<&PodRoute> = routes
            .iter()
            .filter(|r| pods.iter().any(|p| p.route_ifindex == r.ifindex))
            .collect();
        let describe = |route: &&PodRoute| {
            let name = view
                .interface(route.ifindex)
                .map_or("(gone)", |i| i.name.as_str());
            format!("{name}: {}", route.destination)
        };
        let installed: Vec<(IpNet, &PodCidrState)> = cidrs
            .iter()
            .filter_map(|c| Some((c.cidr.parse().ok()?, c)))
            .collect();
        let mut checks = Vec::new();
        for (family, family_name) in [(Family::V4, "v4"), (Family::V6, "v6")] {
            let family_cidrs: Vec<String> = installed
                .iter()
                .filter(|(net, _)| family_of(net) == family)
                .map(|(_, c)| format!("{} ({})", c.cidr, c.source.name()))
                .collect();
            let addresses: Vec<String> = pod_routes
                .iter()
                .filter(|r| family_of(&r.destination) == family)
                .map(describe)
                .collect();
            checks.push(health::pod_cidr_family(
                family_name,
                &family_cidrs,
                &addresses,
            ));
        }
        let nets: Vec<IpNet> = installed.iter().map(|(net, _)| *net).collect();
        let outside: Vec<String> = pod_cidrs::uncovered(pod_routes, &nets)
            .iter()
            .map(describe)
            .collect();
        checks.push(health::pod_addresses_covered(&outside));
        checks
    }
}
