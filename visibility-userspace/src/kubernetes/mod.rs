//! Kubernetes identity: when the API server is reachable, the daemon watches the Pods
//! of this node ([`watch`]) into a directory keyed by Pod IP and time ([`directory`]),
//! reads `Node.spec.podCIDRs` as a Pod CIDR source, and names the ends of every flow
//! record with namespace, Pod and workload ([`PodNames`]). Without the API the daemon
//! runs the same, and [`KubeState`] says why records carry no names.

mod directory;
mod owners;
mod watch;

use std::{
    collections::BTreeMap,
    net::IpAddr,
    path::{Path, PathBuf},
    sync::{Arc, Mutex, RwLock},
};

use ipnet::IpNet;
use serde::{Deserialize, Serialize};

pub use self::{
    directory::{PodDirectory, PodIdentity, PodSighting, Workload},
    watch::spawn,
};
use crate::flows::record::{ClusterDetails, FlowRecord, GkeDetails, PodDetails, PodWorkload};

/// How the daemon reaches the API server (`kubernetes` in the configuration).
#[derive(Clone, Debug, Default, PartialEq, Eq, Serialize)]
pub enum Access {
    /// In-cluster configuration (the ServiceAccount's token) when the daemon runs in a
    /// Pod; none otherwise.
    #[default]
    Auto,
    /// No API: records carry addresses and interfaces only.
    Off,
    /// This kubeconfig file (tests, or a daemon outside the cluster).
    Kubeconfig(PathBuf),
}

impl Access {
    /// `auto`, `off`, or the path of a kubeconfig file.
    pub fn parse(text: &str) -> Self {
        match text.trim() {
            "auto" | "" => Access::Auto,
            "off" => Access::Off,
            path => Access::Kubeconfig(PathBuf::from(path)),
        }
    }

    pub fn describe(&self) -> String {
        match self {
            Access::Auto => "in-cluster".to_owned(),
            Access::Off => "off".to_owned(),
            Access::Kubeconfig(path) => format!("kubeconfig {}", path.display()),
        }
    }
}

/// What the daemon needs to name Pods.
#[derive(Clone, Debug, Default, PartialEq, Eq, Serialize)]
pub struct KubeConfig {
    pub access: Access,
    /// `cluster_name` in records' `*_gke_details.cluster`.
    pub cluster_name: Option<String>,
    /// Per-Pod metric series (namespace, Pod, workload labels): off by default, since
    /// their number grows with the Pods, as Hubble's `labelsContext` is opt-in.
    pub pod_metric_labels: bool,
}

/// Why records carry no Pod names.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "kebab-case")]
pub enum Unnamed {
    /// `kubernetes = "off"` in the configuration.
    TurnedOff,
    /// The daemon does not run in a Pod with a ServiceAccount token.
    NoInClusterConfig,
    /// The kubeconfig given could not be read or used.
    BadKubeconfig,
    /// The API refused (401, 403): the RBAC of deploy/ is missing or not bound.
    Forbidden,
    /// The API server could not be reached, or failed.
    Unreachable,
    /// Connected; the list of this node's Pods has not completed yet.
    Syncing,
}

impl Unnamed {
    pub const fn describe(self) -> &'static str {
        match self {
            Unnamed::TurnedOff => "turned off (kubernetes = \"off\")",
            Unnamed::NoInClusterConfig => {
                "no in-cluster configuration (not in a Pod with a ServiceAccount)"
            }
            Unnamed::BadKubeconfig => "the kubeconfig could not be used",
            Unnamed::Forbidden => {
                "forbidden: apply the ServiceAccount and RBAC of deploy/daemonset.yaml"
            }
            Unnamed::Unreachable => "the API server is unreachable",
            Unnamed::Syncing => "listing this node's Pods",
        }
    }
}

/// What `status` shows about the API.
#[derive(Clone, Debug, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct KubeState {
    /// `in-cluster`, `kubeconfig PATH` or `off`.
    pub access: String,
    /// The Pods of this node are listed and being watched.
    pub synced: bool,
    /// Pods of this node that hold an address.
    pub pods: usize,
    /// `Node.spec.podCIDRs` as last read.
    pub node_pod_cidrs: Vec<String>,
    /// Why records carry no Pod names now; none while synced.
    pub names_missing: Option<Unnamed>,
    /// The last error from the API (kept after it recovers, for the record).
    pub last_error: Option<String>,
}

/// Packets and bytes a Pod sent and received, for the opt-in per-Pod metrics.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct PodTraffic {
    pub sent_packets: u64,
    pub sent_bytes: u64,
    pub received_packets: u64,
    pub received_bytes: u64,
}

/// What the daemon knows from the API, shared by the watch, the reconciler (Pod
/// CIDRs), the flow reader (names) and the metrics endpoint.
#[derive(Default)]
pub struct Kubernetes {
    directory: Arc<RwLock<PodDirectory>>,
    state: Mutex<KubeState>,
    node_pod_cidrs: Mutex<Vec<IpNet>>,
    /// Per-Pod counts, kept only with `pod_metric_labels`.
    traffic: Arc<Mutex<BTreeMap<PodIdentity, PodTraffic>>>,
}

impl Kubernetes {
    pub fn state(&self) -> KubeState {
        self.state.lock().map(|s| s.clone()).unwrap_or_default()
    }

    fn update_state(&self, change: impl FnOnce(&mut KubeState)) {
        if let Ok(mut state) = self.state.lock() {
            change(&mut state);
        }
    }

    /// `Node.spec.podCIDRs` as last read (none without the API).
    pub fn node_pod_cidrs(&self) -> Vec<IpNet> {
        self.node_pod_cidrs
            .lock()
            .map(|c| c.clone())
            .unwrap_or_default()
    }

    /// What names records, for the flow reader.
    pub fn names(&self, config: &KubeConfig) -> PodNames {
        PodNames {
            directory: self.directory.clone(),
            cluster: config.cluster_name.clone(),
            traffic: config.pod_metric_labels.then(|| self.traffic.clone()),
        }
    }

    /// The per-Pod counts (empty unless `pod_metric_labels`).
    pub fn traffic(&self) -> BTreeMap<PodIdentity, PodTraffic> {
        self.traffic.lock().map(|t| t.clone()).unwrap_or_default()
    }
}

/// Names the ends of flow records from the directory; counts per-Pod traffic when
/// per-Pod metrics are on.
#[derive(Clone, Default)]
pub struct PodNames {
    directory: Arc<RwLock<PodDirectory>>,
    cluster: Option<String>,
    traffic: Option<Arc<Mutex<BTreeMap<PodIdentity, PodTraffic>>>>,
}

impl PodNames {
    /// The names the running daemon last saved for the CLI (none without a daemon).
    pub fn saved(pin_dir: &Path) -> Self {
        let directory = std::fs::read(crate::state::state_dir(pin_dir).join(PODS_FILE))
            .ok()
            .and_then(|bytes| serde_json::from_slice(&bytes).ok())
            .unwrap_or_default();
        Self {
            directory: Arc::new(RwLock::new(directory)),
            ..Self::default()
        }
    }

    /// Fills `src_gke_details`/`dest_gke_details` with the Pods that had the record's
    /// addresses at `at_ns` (the datapath's clock).
    pub fn name(&self, record: &mut FlowRecord, at_ns: u64) {
        let Ok(directory) = self.directory.read() else {
            return;
        };
        let pod_of = |ip: &str| {
            let ip: IpAddr = ip.parse().ok()?;
            directory.lookup(ip, at_ns).cloned()
        };
        let (src, dest) = (
            pod_of(&record.connection.src_ip),
            pod_of(&record.connection.dest_ip),
        );
        if let Some(traffic) = &self.traffic
            && let Ok(mut traffic) = traffic.lock()
        {
            if let Some(pod) = &src {
                let counts = traffic.entry(pod.clone()).or_default();
                counts.sent_packets += record.packets_sent;
                counts.sent_bytes += record.bytes_sent;
            }
            if let Some(pod) = &dest {
                let counts = traffic.entry(pod.clone()).or_default();
                counts.received_packets += record.packets_sent;
                counts.received_bytes += record.bytes_sent;
            }
        }
        record.src_gke_details = src.map(|pod| self.details(pod));
        record.dest_gke_details = dest.map(|pod| self.details(pod));
    }

    fn details(&self, pod: PodIdentity) -> GkeDetails {
        GkeDetails {
            cluster: self.cluster.as_ref().map(|name| ClusterDetails {
                cluster_name: name.clone(),
            }),
            pod: PodDetails {
                pod_name: pod.name,
                pod_namespace: pod.namespace,
                pod_workload: pod.workload.map(|w| PodWorkload {
                    workload_name: w.name,
                    workload_type: w.kind,
                }),
            },
        }
    }
}

/// The directory the daemon saves for `visibility flows`, in its state directory.
pub const PODS_FILE: &str = "pods.json";
