//! Talking to the API server: the client (in-cluster or a kubeconfig), the watch of
//! this node's Pods (kube-runtime's watcher: a list with its `resourceVersion`, then a
//! watch from it with bookmarks, a new list after `410 Gone`, backoff while the API is
//! away) feeding the [`PodDirectory`](super::PodDirectory), and the poll of this
//! Node's `spec.podCIDRs`. Errors never stop the daemon; they show in `status`.

use std::{
    path::{Path, PathBuf},
    sync::Arc,
    time::Duration,
};

use futures::StreamExt as _;
use ipnet::IpNet;
use k8s_openapi::api::core::v1::{Node, Pod};
use kube::{
    Api, Client,
    runtime::{WatchStreamExt as _, watcher},
};
use tracing::{info, warn};

use super::{
    Access, KubeConfig, Kubernetes, PODS_FILE, Unnamed, directory::PodSighting, owners::Owners,
};
use crate::flows::view::Clock;

/// Why the API gave no names.
#[derive(Debug, thiserror::Error)]
pub enum KubeError {
    /// `kubernetes = "off"`.
    #[error("turned off in the configuration")]
    TurnedOff,
    /// Not in a Pod with a ServiceAccount (no KUBERNETES_SERVICE_HOST, or no token).
    #[error("no in-cluster configuration: {0}")]
    InCluster(#[source] kube::config::InClusterError),
    /// The kubeconfig given does not read or does not describe a usable cluster.
    #[error("kubeconfig {path}: {source}")]
    Kubeconfig {
        path: PathBuf,
        #[source]
        source: kube::config::KubeconfigError,
    },
    /// The client could not be built from the configuration (its TLS settings).
    #[error("creating the Kubernetes client: {0}")]
    Client(#[source] kube::Error),
    /// Listing or watching this node's Pods failed.
    #[error("watching this node's Pods: {0}")]
    Watch(#[source] watcher::Error),
    /// Reading this Node failed.
    #[error("reading the Node: {0}")]
    Node(#[source] kube::Error),
}

/// What an error from the API says: refused, or not reached.
fn api_unnamed(error: &kube::Error) -> Unnamed {
    match error {
        kube::Error::Api(status) if matches!(status.code, 401 | 403) => Unnamed::Forbidden,
        _ => Unnamed::Unreachable,
    }
}

impl KubeError {
    fn unnamed(&self) -> Unnamed {
        match self {
            KubeError::TurnedOff => Unnamed::TurnedOff,
            KubeError::InCluster(_) => Unnamed::NoInClusterConfig,
            KubeError::Kubeconfig { .. } | KubeError::Client(_) => Unnamed::BadKubeconfig,
            KubeError::Watch(watcher::Error::WatchError(status)) => match status.code {
                401 | 403 => Unnamed::Forbidden,
                // Too old a resourceVersion: the watcher lists anew.
                410 => Unnamed::Syncing,
                _ => Unnamed::Unreachable,
            },
            KubeError::Watch(
                watcher::Error::InitialListFailed(error)
                | watcher::Error::WatchStartFailed(error)
                | watcher::Error::WatchFailed(error),
            )
            | KubeError::Node(error) => api_unnamed(error),
            KubeError::Watch(watcher::Error::NoResourceVersion) => Unnamed::Unreachable,
        }
    }
}

/// How often this Node's `spec.podCIDRs` is read (they rarely change: only `get` on
/// nodes is granted, no watch).
const NODE_POLL: Duration = Duration::from_secs(30);
/// How often ended tenures are forgotten and the directory saved for the CLI.
const HOUSEKEEPING: Duration = Duration::from_secs(1);

/// Starts naming Pods: connects, then watches this node's Pods and polls its Node, on
/// tasks of the daemon's runtime. `grace` is how long a deleted Pod's addresses keep
/// naming it (longer than a record interval, so its last records are named).
pub fn spawn(
    config: &KubeConfig,
    node_name: &str,
    kubernetes: Arc<Kubernetes>,
    pin_dir: &Path,
    grace: Duration,
) {
    kubernetes.update_state(|s| s.access = config.access.describe());
    let access = config.access.clone();
    let node = node_name.to_owned();
    let snapshot = crate::state::state_dir(pin_dir).join(PODS_FILE);
    tokio::spawn(async move {
        let client = match connect(&access).await {
            Ok(client) => client,
            Err(error) => {
                note_error(&kubernetes, &error);
                return;
            }
        };
        kubernetes.update_state(|s| s.names_missing = Some(Unnamed::Syncing));
        tokio::spawn(poll_node(client.clone(), node.clone(), kubernetes.clone()));
        let watch = PodWatch {
            owners: Owners::new(client.clone()),
            kubernetes,
            listed: Vec::new(),
            grace_ns: u64::try_from(grace.as_nanos()).unwrap_or(u64::MAX),
            snapshot,
            saved_version: None,
        };
        watch.run(client, &node).await;
    });
}

async fn connect(access: &Access) -> Result<Client, KubeError> {
    let config = match access {
        Access::Off => return Err(KubeError::TurnedOff),
        Access::Auto => kube::Config::incluster().map_err(KubeError::InCluster)?,
        Access::Kubeconfig(path) => {
            let kubeconfig_error = |source| KubeError::Kubeconfig {
                path: path.clone(),
                source,
            };
            let kubeconfig = kube::config::Kubeconfig::read_from(path).map_err(kubeconfig_error)?;
            kube::Config::from_custom_kubeconfig(kubeconfig, &Default::default())
                .await
                .map_err(kubeconfig_error)?
        }
    };
    Client::try_from(config).map_err(KubeError::Client)
}

/// Records an error in the state, and logs it when it is new (the watcher retries
/// with backoff, and the same error would fill the log).
fn note_error(kubernetes: &Kubernetes, error: &KubeError) {
    let text = error.to_string();
    kubernetes.update_state(|s| {
        if s.last_error.as_deref() != Some(text.as_str()) && !matches!(error, KubeError::TurnedOff) {
            warn!(%error, "Kubernetes API: flow records carry addresses and interfaces until it answers");
        }
        s.synced = false;
        s.names_missing = Some(error.unnamed());
        // Turned off is a choice, not an error.
        s.last_error = (!matches!(error, KubeError::TurnedOff)).then_some(text);
    });
}

async fn poll_node(client: Client, node: String, kubernetes: Arc<Kubernetes>) {
    let api: Api<Node> = Api::all(client);
    let mut tick = tokio::time::interval(NODE_POLL);
    loop {
        tick.tick().await;
        match api.get(&node).await {
            Ok(found) => {
                let spec = found.spec.unwrap_or_default();
                let cidrs: Vec<IpNet> = spec
                    .pod_cidrs
                    .or_else(|| spec.pod_cidr.map(|c| vec![c]))
                    .unwrap_or_default()
                    .iter()
                    .filter_map(|c| c.parse::<IpNet>().ok().map(|n| n.trunc()))
                    .collect();
                if let Ok(mut known) = kubernetes.node_pod_cidrs.lock()
                    && *known != cidrs
                {
                    info!(node = %node, cidrs = ?cidrs, "the Node's spec.podCIDRs");
                    known.clone_from(&cidrs);
                }
                kubernetes.update_state(|s| {
                    s.node_pod_cidrs = cidrs.iter().map(ToString::to_string).collect();
                });
            }
            Err(error) => {
                let error = KubeError::Node(error);
                warn!(%error, "reading this Node's Pod CIDRs");
                kubernetes.update_state(|s| s.last_error = Some(error.to_string()));
            }
        }
    }
}

/// The watch of this node's Pods and what it keeps.
struct PodWatch {
    owners: Owners,
    kubernetes: Arc<Kubernetes>,
    /// The Pods of the list under way (after `Init`).
    listed: Vec<String>,
    grace_ns: u64,
    snapshot: PathBuf,
    saved_version: Option<u64>,
}

impl PodWatch {
    async fn run(mut self, client: Client, node: &str) {
        let api: Api<Pod> = Api::all(client);
        let config = watcher::Config::default().fields(&format!("spec.nodeName={node}"));
        let mut events = watcher(api, config).default_backoff().boxed();
        let mut housekeeping = tokio::time::interval(HOUSEKEEPING);
        loop {
            tokio::select! {
                event = events.next() => match event {
                    Some(Ok(event)) => self.handle(event).await,
                    Some(Err(error)) => note_error(&self.kubernetes, &KubeError::Watch(error)),
                    None => return,
                },
                _ = housekeeping.tick() => self.housekeeping(),
            }
        }
    }

    async fn handle(&mut self, event: watcher::Event<Pod>) {
        let now_ns = Clock::now().datapath_now();
        match event {
            watcher::Event::Init => {
                self.listed.clear();
                self.owners.forget();
            }
            watcher::Event::InitApply(pod) => {
                self.listed.extend(pod.metadata.uid.clone());
                self.apply(&pod, now_ns).await;
            }
            watcher::Event::InitDone => {
                if let Ok(mut directory) = self.kubernetes.directory.write() {
                    directory.keep_only(&self.listed, now_ns);
                }
                self.synced();
            }
            watcher::Event::Apply(pod) => {
                self.apply(&pod, now_ns).await;
                self.synced();
            }
            watcher::Event::Delete(pod) => {
                if let (Some(uid), Ok(mut directory)) =
                    (&pod.metadata.uid, self.kubernetes.directory.write())
                {
                    directory.delete(uid, now_ns);
                }
                self.synced();
            }
        }
    }

    fn synced(&self) {
        self.kubernetes.update_state(|s| {
            if !s.synced {
                info!("watching this node's Pods: flow records name them");
            }
            s.synced = true;
            s.names_missing = None;
        });
    }

    async fn apply(&mut self, pod: &Pod, now_ns: u64) {
        let workload = self.owners.workload_of(pod).await;
        let Some(sighting) = sighting(pod, workload) else {
            return;
        };
        if let Ok(mut directory) = self.kubernetes.directory.write() {
            directory.apply(&sighting, now_ns);
        }
    }

    /// Forgets what ended more than the grace period ago (and the per-Pod series of
    /// those Pods), and saves the directory for `visibility flows` when it changed.
    fn housekeeping(&mut self) {
        let now_ns = Clock::now().datapath_now();
        let Ok(mut directory) = self.kubernetes.directory.write() else {
            return;
        };
        directory.forget_older_than(self.grace_ns, now_ns);
        let pods = directory.current_pods();
        self.kubernetes.update_state(|s| s.pods = pods);
        if self.saved_version == Some(directory.version()) {
            return;
        }
        if let Ok(mut traffic) = self.kubernetes.traffic.lock() {
            traffic.retain(|pod, _| directory.known().any(|known| known == pod));
        }
        let saved = serde_json::to_vec(&*directory)
            .map_err(std::io::Error::other)
            .and_then(|bytes| crate::state::write_private(&self.snapshot, &bytes));
        match saved {
            Ok(()) => self.saved_version = Some(directory.version()),
            Err(error) => warn!(%error, "saving the Pod names for visibility flows"),
        }
    }
}

/// What the directory takes from a Pod: its addresses, unless it uses the node's
/// (`hostNetwork`) or has finished (its addresses go back to the pool while the Pod
/// object stays).
fn sighting(pod: &Pod, workload: Option<super::Workload>) -> Option<PodSighting> {
    let meta = &pod.metadata;
    let status = pod.status.clone().unwrap_or_default();
    let host_network = pod
        .spec
        .as_ref()
        .and_then(|s| s.host_network)
        .unwrap_or(false);
    let finished = matches!(status.phase.as_deref(), Some("Succeeded" | "Failed"));
    let ips = if host_network || finished {
        Vec::new()
    } else {
        let listed: Vec<String> = status.pod_ips.into_iter().flatten().map(|p| p.ip).collect();
        let ips = if listed.is_empty() {
            status.pod_ip.into_iter().collect()
        } else {
            listed
        };
        ips.iter().filter_map(|ip| ip.parse().ok()).collect()
    };
    let clock = Clock::now();
    Some(PodSighting {
        uid: meta.uid.clone()?,
        pod: super::PodIdentity {
            namespace: meta.namespace.clone().unwrap_or_default(),
            name: meta.name.clone().unwrap_or_default(),
            workload,
        },
        ips,
        created_ns: meta
            .creation_timestamp
            .as_ref()
            .map_or(clock.datapath_now(), |t| {
                clock.datapath_ns(t.0.as_nanosecond())
            }),
    })
}
