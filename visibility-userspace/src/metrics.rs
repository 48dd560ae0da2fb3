//! What the Prometheus endpoint serves (see [`crate::http`]). Each scrape reads the maps and the daemon's shared state
//! into a fresh registry, so what it serves is never older than the scrape. The
//! exposition is Prometheus text format 0.0.4, which `promtool check metrics` reads.

use std::sync::{
    Arc, Mutex,
    atomic::{AtomicU64, Ordering},
};

use prometheus::{
    Encoder as _, Gauge, IntCounter, IntCounterVec, IntGauge, IntGaugeVec, Opts, Registry,
    TextEncoder,
};

use crate::{flows::stats::RecordStats, maps::Maps, state::DaemonStatus};

/// What the daemon shares with the endpoint.
#[derive(Default)]
pub struct Shared {
    pub records: Arc<RecordStats>,
    pub attach_failures: AtomicU64,
    /// Times a family's uplink went away, came back, or changed its name or ifindex
    /// (one per family: an uplink of both families that goes away counts two).
    pub uplink_changes: AtomicU64,
    /// Times the gateway's MAC in the neighbour table changed (a failover).
    pub gateway_mac_changes: AtomicU64,
    /// The last status the reconciler computed.
    pub status: Mutex<Option<DaemonStatus>>,
    /// When the daemon's loop last passed, in ms since the Unix epoch (0: not yet); the
    /// liveness probe reads it (see [`crate::probes`], served by [`crate::http`]).
    pub loop_passed_at_ms: AtomicU64,
    /// What the daemon knows from the Kubernetes API.
    pub kubernetes: Arc<crate::kubernetes::Kubernetes>,
}

/// Builds one scrape's metrics; registration only fails on duplicate names, which
/// this module's fixed names rule out.
struct Scrape {
    registry: Registry,
}

impl Scrape {
    fn register<M: prometheus::core::Collector + Clone + 'static>(&self, metric: M) -> M {
        self.registry
            .register(Box::new(metric.clone()))
            .expect("metric names are unique");
        metric
    }

    fn counter(&self, name: &str, help: &str, value: u64) {
        self.register(IntCounter::new(name, help).expect("valid metric"))
            .inc_by(value);
    }

    fn gauge(&self, name: &str, help: &str, value: i64) {
        self.register(IntGauge::new(name, help).expect("valid metric"))
            .set(value);
    }

    fn float_gauge(&self, name: &str, help: &str, value: f64) {
        self.register(Gauge::new(name, help).expect("valid metric"))
            .set(value);
    }

    fn counter_vec(&self, name: &str, help: &str, labels: &[&str]) -> IntCounterVec {
        self.register(IntCounterVec::new(Opts::new(name, help), labels).expect("valid metric"))
    }

    fn gauge_vec(&self, name: &str, help: &str, labels: &[&str]) -> IntGaugeVec {
        self.register(IntGaugeVec::new(Opts::new(name, help), labels).expect("valid metric"))
    }
}

/// The API's state, always; per-Pod series only when `metrics-pod-labels` is on (the
/// daemon keeps no per-Pod counts otherwise), and only for Pods the directory still
/// names, so a deleted Pod's series go with it.
fn kubernetes_metrics(scrape: &Scrape, kubernetes: &crate::kubernetes::Kubernetes) {
    let state = kubernetes.state();
    scrape.gauge(
        "visibility_kubernetes_synced",
        "1 while this node's Pods are listed and watched (flow records name Pods)",
        i64::from(state.synced),
    );
    scrape.gauge(
        "visibility_kubernetes_pods",
        "Pods of this node that hold an address, as the API says",
        i64::try_from(state.pods).unwrap_or(i64::MAX),
    );
    let traffic = kubernetes.traffic();
    if traffic.is_empty() {
        return;
    }
    let labels = ["namespace", "pod", "workload_type", "workload", "direction"];
    let packets = scrape.counter_vec(
        "visibility_pod_flow_packets_total",
        "Packets of recorded flows by Pod and direction (opt-in: metrics-pod-labels)",
        &labels,
    );
    let bytes = scrape.counter_vec(
        "visibility_pod_flow_bytes_total",
        "Bytes of recorded flows by Pod and direction (opt-in: metrics-pod-labels)",
        &labels,
    );
    for (pod, counts) in &traffic {
        let (kind, workload) = pod
            .workload
            .as_ref()
            .map_or(("", ""), |w| (w.kind.as_str(), w.name.as_str()));
        for (direction, p, b) in [
            ("sent", counts.sent_packets, counts.sent_bytes),
            ("received", counts.received_packets, counts.received_bytes),
        ] {
            let values = [
                pod.namespace.as_str(),
                pod.name.as_str(),
                kind,
                workload,
                direction,
            ];
            packets.with_label_values(&values).inc_by(p);
            bytes.with_label_values(&values).inc_by(b);
        }
    }
}

/// Renders every metric in the Prometheus text format.
pub fn render(maps: &Maps, shared: &Shared) -> String {
    let scrape = Scrape {
        registry: Registry::new(),
    };
    let packets = scrape.counter_vec(
        "visibility_datapath_packets_total",
        "Packets seen by the datapath, by hook and verdict or pass reason",
        &["hook", "verdict"],
    );
    let bytes = scrape.counter_vec(
        "visibility_datapath_bytes_total",
        "IP bytes seen by the datapath, by hook and verdict or pass reason",
        &["hook", "verdict"],
    );
    let (mut redirected_packets, mut redirected_bytes) = (0, 0);
    for (hook, counter, value) in maps.counters().unwrap_or_default() {
        let labels = [hook.name(), counter.name()];
        packets.with_label_values(&labels).inc_by(value.packets);
        bytes.with_label_values(&labels).inc_by(value.bytes);
        if counter.is_redirect_to_gateway() {
            redirected_packets += value.packets;
            redirected_bytes += value.bytes;
        }
    }
    scrape.counter(
        "visibility_redirected_packets_total",
        "Packets sent to the gateway instead of to the Pod on this node",
        redirected_packets,
    );
    scrape.counter(
        "visibility_redirected_bytes_total",
        "IP bytes sent to the gateway instead of to the Pod on this node",
        redirected_bytes,
    );

    let enabled = maps.settings().map(|s| i64::from(s.enabled)).unwrap_or(0);
    scrape.gauge("visibility_enabled", "1 when visibility is on", enabled);
    let records = &shared.records;
    let entries = records.flow_map_entries.load(Ordering::Relaxed);
    let capacity = maps.flow_capacity();
    scrape.gauge(
        "visibility_flow_map_entries",
        "Flows in the flow map at the last read",
        i64::try_from(entries).unwrap_or(i64::MAX),
    );
    scrape.gauge(
        "visibility_flow_map_max_entries",
        "Flows the flow map holds at most (its LRU evicts beyond)",
        i64::from(capacity),
    );
    scrape.float_gauge(
        "visibility_flow_map_fill_ratio",
        "Flows in the flow map over the most it holds, at the last read",
        if capacity == 0 {
            0.0
        } else {
            entries as f64 / f64::from(capacity)
        },
    );
    scrape.float_gauge(
        "visibility_flow_map_last_read_duration_seconds",
        "Time the last read of the flow map and emit of its records took",
        records.last_read_micros.load(Ordering::Relaxed) as f64 / 1e6,
    );
    // The daemon's own counters, one row each.
    let counters: [(&str, &str, &AtomicU64); 9] = [
        (
            "visibility_flow_evictions_total",
            "Flows the LRU evicted between two reads",
            &records.evictions,
        ),
        (
            "visibility_flow_records_emitted_total",
            "Flow records written to the sink",
            &records.emitted,
        ),
        (
            "visibility_flow_records_dropped_total",
            "Flow records dropped because the sink was slow or full",
            &records.dropped,
        ),
        (
            "visibility_flow_record_write_errors_total",
            "Failed writes of flow records (a full disk, a closed stdout); their records count as dropped",
            &records.write_errors,
        ),
        (
            "visibility_flow_record_file_reopens_total",
            "Times the flow record file was found moved away (rotated by another program) and opened anew",
            &records.file_reopens,
        ),
        (
            "visibility_ipfix_export_errors_total",
            "IPFIX messages, or intervals of records, that did not reach a collector",
            &records.ipfix_export_errors,
        ),
        (
            "visibility_attach_failures_total",
            "Failed attaches of a program to an interface",
            &shared.attach_failures,
        ),
        (
            "visibility_uplink_changes_total",
            "Times a family's uplink went away, came back, or changed its name or ifindex",
            &shared.uplink_changes,
        ),
        (
            "visibility_gateway_mac_changes_total",
            "Times a family's gateway MAC in the node's neighbour table changed (a failover)",
            &shared.gateway_mac_changes,
        ),
    ];
    for (name, help, value) in counters {
        scrape.counter(name, help, value.load(Ordering::Relaxed));
    }

    let interfaces = scrape.gauge_vec(
        "visibility_pod_interfaces",
        "Pod interfaces found, by whether the programs are attached",
        &["state"],
    );
    let checks = scrape.gauge_vec(
        "visibility_health_check_passing",
        "1 when a health check passes, 0 when it fails",
        &["check"],
    );
    if let Some(status) = shared.status.lock().ok().and_then(|s| s.clone()) {
        let attached = status.pod_interfaces.iter().filter(|p| p.attached).count() as i64;
        let total = status.pod_interfaces.len() as i64;
        interfaces.with_label_values(&["attached"]).set(attached);
        interfaces
            .with_label_values(&["unattached"])
            .set(total - attached);
        for check in &status.checks {
            checks
                .with_label_values(&[check.name.as_str()])
                .set(i64::from(check.ok));
        }
    }

    kubernetes_metrics(&scrape, &shared.kubernetes);

    let mut out = Vec::new();
    let _ = TextEncoder::new().encode(&scrape.registry.gather(), &mut out);
    String::from_utf8(out).unwrap_or_default()
}
