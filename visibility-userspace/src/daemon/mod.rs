//! The node daemon: loads or adopts the datapath, keeps every Pod interface attached
//! as Pods come and go (netlink events, with a slow reconcile as a safety net), keeps
//! the maps in line with the node, and reports health.

mod changes;
mod events;
mod learn;
mod masquerade;
mod reconcile;

use std::{path::PathBuf, sync::Arc, time::Duration};

use tokio::signal::unix::{SignalKind, signal};
use tracing::{info, warn};

use self::events::LiveView;
pub use self::reconcile::Reconciler;
use crate::{
    config::NodeConfig,
    datapath::{Datapath, EbpfObject, LoadOptions, Origin},
    error::{DatapathError, InputError, MapsError},
    flows::{ipfix::export::Exporters, records::spawn_reader, sink::Sink},
    maps::Maps,
    metrics::Shared,
    node::NodeError,
    state::DaemonStatus,
};

/// Why the daemon stopped.
#[derive(Debug, thiserror::Error)]
pub enum DaemonError {
    #[error(transparent)]
    Datapath(#[from] DatapathError),
    #[error(transparent)]
    Maps(#[from] MapsError),
    #[error(transparent)]
    Node(#[from] NodeError),
    #[error(transparent)]
    Input(#[from] InputError),
    /// The metrics endpoint could not start (address in use?).
    #[error("serving metrics: {0}; pass another --metrics-addr, or off")]
    Metrics(#[source] std::io::Error),
    /// The flow record sink could not start.
    #[error("starting flow records: {0}")]
    Records(#[source] std::io::Error),
    /// Signal handlers could not be installed.
    #[error("installing signal handlers: {0}")]
    Signals(#[source] std::io::Error),
}

/// How soon after a netlink event the daemon reconciles: events come in bursts (a new
/// Pod brings a link, addresses and routes), and one reconcile serves them all.
const DEBOUNCE: Duration = Duration::from_millis(10);
/// How often the programs' log records are forwarded.
const LOG_FLUSH: Duration = Duration::from_millis(250);
/// How often the datapath's clock takes its offset anew: NTP slews the monotonic clock
/// by at most half a millisecond a second, so flow times stay within 5 ms of it.
const CLOCK_SYNC: Duration = Duration::from_secs(10);

/// How long past a record interval a deleted Pod keeps naming its addresses: the
/// interval's read may come late, and the watch may tell of a deletion before the
/// Pod's last packets are read.
const KUBERNETES_GRACE: Duration = Duration::from_secs(60);

/// Runs until SIGTERM or SIGINT, with the programs of `object`. The datapath stays
/// loaded and attached after the daemon exits; a restarted daemon adopts it.
pub async fn run(
    pin_dir: PathBuf,
    config: NodeConfig,
    object: EbpfObject,
) -> Result<(), DaemonError> {
    // Bad input fails before anything on the node changes.
    if let Some(uplink) = &config.uplink
        && nix::net::if_::if_nametoindex(uplink.as_str()).is_err()
    {
        return Err(DaemonError::Input(InputError::NoInterface(uplink.clone())));
    }
    let (mut datapath, origin) = Datapath::open(
        &pin_dir,
        &LoadOptions {
            flow_capacity: config.flow_capacity,
            object,
        },
    )?;
    let mut maps = Maps::open(datapath.pins())?;
    seed_maps(&mut maps, &config, origin)?;
    sync_clock(&datapath, &mut maps).await;
    info!(
        pin_dir = %pin_dir.display(),
        origin = ?origin,
        attach_mode = datapath.mode().name(),
        "datapath ready"
    );

    let shared = Arc::new(Shared::default());
    // Alive from the start: the first reconcile can take a while with many Pods.
    shared.note_loop_pass();
    if let Some(addr) = config.metrics_addr {
        let bound = crate::http::serve(addr, datapath.pins().clone(), shared.clone())
            .map_err(DaemonError::Metrics)?;
        info!(%bound, "serving Prometheus metrics on /metrics");
    }
    let sink = Sink::start(config.records.clone(), shared.records.clone())
        .map_err(DaemonError::Records)?;
    let exporters = Exporters::start(&config.ipfix_collectors, shared.records.clone())
        .map_err(DaemonError::Records)?;
    if !config.ipfix_collectors.is_empty() {
        info!(collectors = ?config.ipfix_collectors, "exporting flow records as IPFIX");
    }
    let records_interval = Duration::from_secs(config.records_interval_secs);
    crate::kubernetes::spawn(
        &config.kubernetes,
        &config.node_name,
        shared.kubernetes.clone(),
        &pin_dir,
        // A deleted Pod names its addresses until its last records are out.
        records_interval + KUBERNETES_GRACE,
    );
    let reader = spawn_reader(
        datapath.pins().clone(),
        records_interval,
        sink,
        exporters,
        shared.records.clone(),
        config.node_name.clone(),
        shared.kubernetes.names(&config.kubernetes),
    )
    .map_err(DaemonError::Records)?;

    let handle = crate::node::connect()?;
    // Subscribed before the first dump (the first tick), so that no change falls between.
    let mut events = events::subscribe()?;
    let mut node = LiveView::default();
    let mut reconciler = Reconciler::new(pin_dir.clone(), config.clone(), origin, shared.clone());
    let mut terminate = signal(SignalKind::terminate()).map_err(DaemonError::Signals)?;
    let mut interrupt = signal(SignalKind::interrupt()).map_err(DaemonError::Signals)?;
    let mut tick = tokio::time::interval(Duration::from_secs(config.reconcile_interval_secs));
    let mut log_flush = tokio::time::interval(LOG_FLUSH);
    let mut clock_sync = tokio::time::interval(CLOCK_SYNC);

    loop {
        tokio::select! {
            _ = tick.tick() => {
                if let Some(view) = node.read(&handle).await {
                    reconciler.reconcile(&handle, view, &mut datapath, &mut maps).await;
                }
            }
            Some(event) = events.recv() => {
                // Let the rest of the burst arrive, then apply it all.
                tokio::time::sleep(DEBOUNCE).await;
                node.apply(event);
                while let Ok(event) = events.try_recv() {
                    node.apply(event);
                }
                if let Some(view) = node.current(&handle).await {
                    reconciler.reconcile(&handle, view, &mut datapath, &mut maps).await;
                }
            }
            _ = log_flush.tick() => datapath.flush_logs(),
            _ = clock_sync.tick() => sync_clock(&datapath, &mut maps).await,
            _ = terminate.recv() => break,
            _ = interrupt.recv() => break,
        }
        shared.note_loop_pass();
    }
    datapath.flush_logs();
    info!("stopping: emitting the last flow records");
    reader.stop();
    DaemonStatus::remove(&pin_dir);
    info!("stopping; the datapath stays attached and the next daemon adopts it");
    Ok(())
}

/// Measures the datapath's clock, or keeps it in step. Without it the programs read
/// the kernel's clock through a helper: slower, not wrong.
async fn sync_clock(datapath: &Datapath, maps: &mut Maps) {
    if let Err(error) = crate::clock::sync_clock_async(datapath, maps).await {
        warn!(%error, "measuring the datapath's clock; its programs read the kernel's instead");
    }
}

/// Puts the configuration into the maps. On a fresh load it sets everything; when
/// adopting, the maps are the truth (CLI changes survive restarts) and the
/// configuration only adds what they lack.
fn seed_maps(maps: &mut Maps, config: &NodeConfig, origin: Origin) -> Result<(), MapsError> {
    let _lock = maps.lock()?;
    if origin.maps_are_new() {
        maps.update_settings(|settings| settings.enabled = u8::from(config.enabled))?;
    }
    let node_addrs = crate::net::node_addresses();
    for cidr in &config.pod_cidrs {
        maps.add_pod_cidr(cidr, &node_addrs)?;
    }
    let mut exemptions = maps.exemptions();
    let before = exemptions.len();
    exemptions.extend(config.exemptions.iter().copied());
    exemptions.sort();
    exemptions.dedup();
    if exemptions.len() != before || origin.maps_are_new() {
        maps.set_exemptions(&exemptions)?;
    }
    Ok(())
}
