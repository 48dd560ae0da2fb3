//! One pass of "make the node as it should be": attachments, maps, status.

use std::{collections::BTreeMap, path::PathBuf, sync::Arc, time::Duration};

use rtnetlink::Handle;
use tracing::{info, warn};
use visibility_common::{config::Gateway, packet::Family};

use super::{changes::Changes, learn::CidrLearner, masquerade::MasqueradeCheck};
use crate::{
    config::NodeConfig,
    datapath::{Datapath, Origin, ProgramKind},
    discovery::{self, PodInterface, Uplink},
    health,
    maps::{Maps, MapsLock},
    metrics::Shared,
    net::{addr_bytes, family_name, format_mac},
    node::NodeView,
    pod_cidrs::PodRoute,
    state::{Check, DaemonStatus, PodInterfaceState, UplinkState},
};

/// Keeps what one reconcile needs from the last: when the daemon started, the last
/// attach errors, and the checks (to log only changes).
pub struct Reconciler {
    pin_dir: PathBuf,
    config: NodeConfig,
    origin: Origin,
    glob: Option<globset::GlobMatcher>,
    started_at: String,
    attach_errors: BTreeMap<u32, String>,
    /// Families without an uplink at the last pass, and why.
    missing_uplinks: Vec<(Family, String)>,
    last_checks: Vec<Check>,
    changes: Changes,
    learner: CidrLearner,
    masquerade: MasqueradeCheck,
    shared: Arc<Shared>,
}

pub fn now_rfc3339() -> String {
    time::OffsetDateTime::now_utc()
        .format(&time::format_description::well_known::Rfc3339)
        .unwrap_or_default()
}

impl Reconciler {
    pub fn new(pin_dir: PathBuf, config: NodeConfig, origin: Origin, shared: Arc<Shared>) -> Self {
        let glob = config
            .pod_interfaces
            .as_deref()
            .and_then(|g| globset::Glob::new(g).ok())
            .map(|g| g.compile_matcher());
        let learner = CidrLearner::new(
            config.cni_conf_dir.clone(),
            !config.pod_cidrs.is_empty(),
            shared.kubernetes.clone(),
        );
        let masquerade = MasqueradeCheck::new(Duration::from_secs(config.reconcile_interval_secs));
        Self {
            pin_dir,
            learner,
            config,
            origin,
            glob,
            started_at: now_rfc3339(),
            attach_errors: BTreeMap::new(),
            missing_uplinks: Vec::new(),
            last_checks: Vec::new(),
            changes: Changes::default(),
            masquerade,
            shared,
        }
    }

    /// Brings attachments, maps and the status file in line with the node as `view`
    /// has it. Failures are logged and retried on the next pass; they never stop the
    /// daemon.
    pub async fn reconcile(
        &mut self,
        handle: &Handle,
        view: &NodeView,
        datapath: &mut Datapath,
        maps: &mut Maps,
    ) {
        let uplinks = self.sync_uplinks(view, maps);
        keep_gateways_resolved(handle, view, &uplinks).await;
        self.sync_node_addrs(view, maps);
        let uplink_indexes: Vec<u32> = uplinks.iter().map(|u| u.ifindex).collect();
        let pod_routes = {
            // A `pod-cidr add` taking over a learned entry must not be undone by the
            // learner's removal of what it no longer sees.
            let _lock = lock_or_warn(maps);
            self.learner
                .sync(view, &uplink_indexes, self.glob.as_ref(), maps)
        };
        let pods =
            discovery::pod_interfaces(view, &maps.pod_cidrs(), self.glob.as_ref(), &uplink_indexes);
        self.sync_attachments(view, datapath, &pods, &uplink_indexes);
        self.changes.notice(view, &uplinks, &self.shared);
        sync_pod_ifaces(maps, &pods);
        self.masquerade.refresh(maps.pod_cidrs()).await;
        let status = self.status(view, datapath, maps, &uplinks, &pods, &pod_routes);
        self.log_check_changes(&status.checks);
        if let Err(error) = status.write(&self.pin_dir) {
            warn!(%error, "writing the status file");
        }
        if let Ok(mut shared) = self.shared.status.lock() {
            *shared = Some(status);
        }
    }

    fn sync_uplinks(&mut self, view: &NodeView, maps: &mut Maps) -> Vec<Uplink> {
        let mut found = Vec::new();
        self.missing_uplinks.clear();
        let _lock = lock_or_warn(maps);
        let Ok(settings) = maps.settings() else {
            return found;
        };
        for (family, configured) in [
            (Family::V4, self.config.gateway_v4),
            (Family::V6, self.config.gateway_v6),
        ] {
            let wanted =
                match discovery::uplink(view, family, self.config.uplink.as_deref(), configured) {
                    Ok(uplink) => {
                        let gateway = Gateway {
                            ifindex: uplink.ifindex,
                            addr: addr_bytes(&uplink.gateway),
                            node_addr: uplink
                                .node_addr
                                .as_ref()
                                .map(addr_bytes)
                                .unwrap_or_default(),
                        };
                        found.push(uplink);
                        gateway
                    }
                    Err(error) => {
                        self.missing_uplinks.push((family, error.to_string()));
                        Gateway::default()
                    }
                };
            if *settings.gateway(family) != wanted {
                info!(
                    family = family_name(family),
                    ifindex = wanted.ifindex,
                    "gateway changed"
                );
                if let Err(error) = maps.set_gateway(family, wanted) {
                    warn!(%error, "setting the gateway");
                }
            }
        }
        found
    }

    fn sync_node_addrs(&self, view: &NodeView, maps: &mut Maps) {
        let _lock = lock_or_warn(maps);
        if let Err(error) = maps.set_node_addrs(&view.node_addresses()) {
            warn!(%error, "marking the node's addresses in the Pod-CIDR tries");
        }
    }

    fn sync_attachments(
        &mut self,
        view: &NodeView,
        datapath: &mut Datapath,
        pods: &[PodInterface],
        uplinks: &[u32],
    ) {
        let mut wanted: Vec<(u32, ProgramKind)> = Vec::new();
        for pod in pods {
            wanted.extend(ProgramKind::POD.iter().map(|kind| (pod.ifindex, *kind)));
        }
        wanted.extend(
            uplinks
                .iter()
                .map(|ifindex| (*ifindex, ProgramKind::UplinkIngress)),
        );
        for (ifindex, kind) in datapath.attachments() {
            if !wanted.contains(&(ifindex, kind)) {
                let name = view.interface(ifindex).map(|i| i.name.clone());
                match datapath.detach(name.as_deref(), ifindex, kind) {
                    Ok(()) => info!(
                        ifindex,
                        interface = name.as_deref().unwrap_or("(gone)"),
                        program = kind.name(),
                        "detached"
                    ),
                    Err(error) => warn!(ifindex, %error, "detaching"),
                }
            }
        }
        self.attach_errors
            .retain(|ifindex, _| wanted.iter().any(|(i, _)| i == ifindex));
        for (ifindex, kind) in wanted {
            if datapath.is_attached(ifindex, kind) {
                continue;
            }
            let Some(name) = view.interface(ifindex).map(|i| i.name.clone()) else {
                continue;
            };
            match datapath.attach(&name, ifindex, kind) {
                Ok(()) => {
                    self.attach_errors.remove(&ifindex);
                    info!(interface = %name, ifindex, program = kind.name(), mode = datapath.mode().name(), "attached");
                }
                Err(error) => {
                    warn!(interface = %name, ifindex, program = kind.name(), %error, "attach failed");
                    self.shared
                        .attach_failures
                        .fetch_add(1, std::sync::atomic::Ordering::Relaxed);
                    self.attach_errors.insert(ifindex, error.to_string());
                }
            }
        }
    }

    fn status(
        &self,
        view: &NodeView,
        datapath: &Datapath,
        maps: &Maps,
        uplinks: &[Uplink],
        pods: &[PodInterface],
        pod_routes: &[PodRoute],
    ) -> DaemonStatus {
        let mut checks = Vec::new();
        let pod_cidrs = maps.pod_cidrs();
        let pod_cidr_states = self.learner.states(maps);
        checks.extend(
            self.learner
                .checks(pod_routes, pods, &pod_cidr_states, view),
        );
        for (family, reason) in &self.missing_uplinks {
            // A family without Pod CIDRs needs no uplink.
            if pod_cidrs
                .iter()
                .any(|cidr| crate::net::family_of(cidr) == *family)
            {
                checks.push(health::uplink_missing(family_name(*family), reason));
            }
        }
        let mut uplink_states = Vec::new();
        for uplink in uplinks {
            let family = family_name(uplink.family);
            let neighbour = view.neighbour(uplink.ifindex, &uplink.gateway);
            let up = view.interface(uplink.ifindex).is_some_and(|i| i.up);
            checks.push(health::gateway_neighbour(family, uplink.gateway, neighbour));
            checks.push(health::uplink_up(family, &uplink.name, up));
            uplink_states.push(UplinkState {
                family: family.to_owned(),
                uplink: uplink.name.clone(),
                ifindex: uplink.ifindex,
                up,
                gateway: uplink.gateway.to_string(),
                gateway_mac: neighbour
                    .filter(|n| n.is_resolved())
                    .and_then(|n| n.mac.as_ref())
                    .map(format_mac),
                attached: datapath.is_attached(uplink.ifindex, ProgramKind::UplinkIngress),
            });
        }
        let pod_states: Vec<PodInterfaceState> = pods
            .iter()
            .map(|pod| PodInterfaceState {
                name: pod.name.clone(),
                ifindex: pod.ifindex,
                reason: pod.reason.name().to_owned(),
                attached: ProgramKind::POD
                    .iter()
                    .all(|kind| datapath.is_attached(pod.ifindex, *kind)),
                error: self.attach_errors.get(&pod.ifindex).cloned(),
            })
            .collect();
        let unattached: Vec<String> = pod_states
            .iter()
            .filter(|p| !p.attached)
            .map(|p| p.name.clone())
            .collect();
        checks.push(health::pod_interfaces_attached(&unattached));
        if let Some(v4) = uplink_states.iter().find(|u| u.family == "v4") {
            checks.push(health::rp_filter(&v4.uplink, v4.attached));
        }
        checks.extend(self.masquerade.check());
        DaemonStatus {
            pid: std::process::id(),
            node_name: self.config.node_name.clone(),
            started_at: self.started_at.clone(),
            updated_at: now_rfc3339(),
            origin: self.origin.name().to_owned(),
            attach_mode: datapath.mode().name().to_owned(),
            uplinks: uplink_states,
            pod_cidrs: pod_cidr_states,
            pod_interfaces: pod_states,
            checks,
            records: self.shared.records.counts(),
            ipfix_collectors: self.config.ipfix_collectors.clone(),
            kubernetes: self.shared.kubernetes.state(),
        }
    }

    /// Logs each check once when it changes, not on every pass.
    fn log_check_changes(&mut self, checks: &[Check]) {
        for check in checks {
            if self.last_checks.iter().any(|c| c == check) {
                continue;
            }
            if check.ok {
                info!(check = %check.name, detail = %check.detail, "health check ok");
            } else {
                warn!(check = %check.name, detail = %check.detail, "health check failing");
            }
        }
        self.last_checks = checks.to_vec();
    }
}

/// The maps' lock for one of the reconcile's read-modify-writes. Without it (the pin
/// directory vanished under the daemon) the pass goes on: a lost update is retried on
/// the next one, a skipped pass would detach the uplink.
fn lock_or_warn(maps: &Maps) -> Option<MapsLock> {
    maps.lock()
        .inspect_err(|error| warn!(%error, "changing the maps without their lock"))
        .ok()
}

/// Redirects at Pod egress cannot wait for the gateway's neighbour (see
/// `PassGatewayUnresolved`), so the kernel is asked to keep it resolved.
async fn keep_gateways_resolved(handle: &Handle, view: &NodeView, uplinks: &[Uplink]) {
    for uplink in uplinks {
        let neighbour = view.neighbour(uplink.ifindex, &uplink.gateway);
        if neighbour.is_some_and(|n| n.managed) {
            continue;
        }
        match crate::node::keep_resolved(handle, uplink.ifindex, uplink.gateway).await {
            Ok(()) => {
                info!(gateway = %uplink.gateway, uplink = %uplink.name, "keeping the gateway's neighbour entry resolved")
            }
            Err(error) => {
                warn!(gateway = %uplink.gateway, %error, "resolving the gateway's neighbour")
            }
        }
    }
}

fn sync_pod_ifaces(maps: &mut Maps, pods: &[PodInterface]) {
    let current = maps.pod_ifaces();
    for pod in pods.iter().filter(|p| !current.contains(&p.ifindex)) {
        if let Err(error) = maps.add_pod_iface(pod.ifindex, pod.is_veth, pod.route_ifindex) {
            warn!(ifindex = pod.ifindex, %error, "registering a Pod interface");
        }
    }
    for ifindex in current
        .iter()
        .filter(|i| !pods.iter().any(|p| p.ifindex == **i))
    {
        let _ = maps.remove_pod_iface(*ifindex);
    }
}
