//! The Prometheus endpoint. Each scrape reads the maps and the daemon's shared state,
//! so what it serves is never older than the scrape.

use std::{
    net::SocketAddr,
    sync::{
        Arc, Mutex,
        atomic::{AtomicU64, Ordering},
    },
};

use prometheus_client::{
    encoding::text::encode,
    metrics::{counter::Counter, family::Family, gauge::Gauge},
    registry::{Registry, Unit},
};
use visibility_common::counters::Counter as DatapathCounter;

use crate::{datapath::PinDir, flows::records::RecordStats, maps::Maps, state::DaemonStatus};

/// What the daemon shares with the endpoint.
#[derive(Default)]
pub struct Shared {
    pub records: Arc<RecordStats>,
    pub attach_failures: AtomicU64,
    /// The last status the reconciler computed.
    pub status: Mutex<Option<DaemonStatus>>,
}

type Labels = Vec<(&'static str, String)>;

fn counter(registry: &mut Registry, name: &str, help: &str, unit: Option<Unit>, value: u64) {
    let metric = Counter::<u64>::default();
    metric.inc_by(value);
    match unit {
        Some(unit) => registry.register_with_unit(name, help, unit, metric),
        None => registry.register(name, help, metric),
    }
}

fn gauge(registry: &mut Registry, name: &str, help: &str, value: i64) {
    let metric = Gauge::<i64>::default();
    metric.set(value);
    registry.register(name, help, metric);
}

/// Renders every metric in the Prometheus text format.
pub fn render(maps: &Maps, shared: &Shared) -> String {
    let mut registry = Registry::default();
    let packets = Family::<Labels, Counter>::default();
    let bytes = Family::<Labels, Counter>::default();
    let (mut redirected_packets, mut redirected_bytes) = (0, 0);
    for (hook, datapath_counter, value) in maps.counters().unwrap_or_default() {
        let labels = vec![
            ("hook", hook.name().to_owned()),
            ("verdict", datapath_counter.name().to_owned()),
        ];
        packets.get_or_create(&labels).inc_by(value.packets);
        bytes.get_or_create(&labels).inc_by(value.bytes);
        if matches!(
            datapath_counter,
            DatapathCounter::RedirectedToGateway | DatapathCounter::RedirectedAfterNat
        ) {
            redirected_packets += value.packets;
            redirected_bytes += value.bytes;
        }
    }
    registry.register(
        "visibility_datapath_packets",
        "Packets seen by the datapath, by hook and verdict or pass reason",
        packets,
    );
    registry.register_with_unit(
        "visibility_datapath",
        "IP bytes seen by the datapath, by hook and verdict or pass reason",
        Unit::Bytes,
        bytes,
    );
    counter(
        &mut registry,
        "visibility_redirected_packets",
        "Packets sent to the gateway instead of to the Pod on this node",
        None,
        redirected_packets,
    );
    counter(
        &mut registry,
        "visibility_redirected",
        "IP bytes sent to the gateway instead of to the Pod on this node",
        Some(Unit::Bytes),
        redirected_bytes,
    );

    let enabled = maps.settings().map(|s| i64::from(s.enabled)).unwrap_or(0);
    gauge(
        &mut registry,
        "visibility_enabled",
        "1 when visibility is on",
        enabled,
    );
    let active = shared.records.active_flows.load(Ordering::Relaxed);
    let capacity = maps.flow_capacity();
    gauge(
        &mut registry,
        "visibility_active_flows",
        "Flows in the flow map at the last read",
        active as i64,
    );
    gauge(
        &mut registry,
        "visibility_flow_map_capacity",
        "Entries the flow map holds",
        i64::from(capacity),
    );
    let fill = Gauge::<f64, std::sync::atomic::AtomicU64>::default();
    fill.set(if capacity == 0 {
        0.0
    } else {
        active as f64 / f64::from(capacity)
    });
    registry.register(
        "visibility_flow_map_fill_ratio",
        "Active flows over the flow map's capacity",
        fill,
    );
    counter(
        &mut registry,
        "visibility_flow_evictions",
        "Flows the LRU evicted between two reads",
        None,
        shared.records.evictions.load(Ordering::Relaxed),
    );
    counter(
        &mut registry,
        "visibility_flow_records_emitted",
        "Flow records written to the sink",
        None,
        shared.records.emitted.load(Ordering::Relaxed),
    );
    counter(
        &mut registry,
        "visibility_flow_records_dropped",
        "Flow records dropped because the sink was slow or full",
        None,
        shared.records.dropped.load(Ordering::Relaxed),
    );
    let read_seconds = Gauge::<f64, std::sync::atomic::AtomicU64>::default();
    read_seconds.set(shared.records.last_read_micros.load(Ordering::Relaxed) as f64 / 1e6);
    registry.register_with_unit(
        "visibility_flow_read_duration",
        "Time the last read and emit of the flow map took",
        Unit::Seconds,
        read_seconds,
    );
    counter(
        &mut registry,
        "visibility_attach_failures",
        "Failed attaches of a program to an interface",
        None,
        shared.attach_failures.load(Ordering::Relaxed),
    );

    let interfaces = Family::<Labels, Gauge>::default();
    let checks = Family::<Labels, Gauge>::default();
    if let Some(status) = shared.status.lock().ok().and_then(|s| s.clone()) {
        let attached = status.pod_interfaces.iter().filter(|p| p.attached).count() as i64;
        let total = status.pod_interfaces.len() as i64;
        interfaces
            .get_or_create(&vec![("state", "attached".to_owned())])
            .set(attached);
        interfaces
            .get_or_create(&vec![("state", "unattached".to_owned())])
            .set(total - attached);
        for check in &status.checks {
            checks
                .get_or_create(&vec![("check", check.name.clone())])
                .set(i64::from(check.ok));
        }
    }
    registry.register(
        "visibility_pod_interfaces",
        "Pod interfaces found, by whether the programs are attached",
        interfaces,
    );
    registry.register(
        "visibility_health_check",
        "1 when a health check passes, 0 when it fails",
        checks,
    );

    let mut text = String::new();
    let _ = encode(&mut text, &registry);
    text
}

/// Serves `/metrics` on `addr` from a thread of its own.
pub fn serve(addr: SocketAddr, pins: PinDir, shared: Arc<Shared>) -> std::io::Result<SocketAddr> {
    let server = tiny_http::Server::http(addr).map_err(std::io::Error::other)?;
    let bound = server.server_addr().to_ip().unwrap_or(addr);
    let maps = Maps::open(&pins).map_err(std::io::Error::other)?;
    std::thread::Builder::new()
        .name("metrics".into())
        .spawn(move || {
            for request in server.incoming_requests() {
                let response = if request.url() == "/metrics" {
                    let header = tiny_http::Header::from_bytes(
                        "Content-Type",
                        "text/plain; version=0.0.4; charset=utf-8",
                    )
                    .expect("static header");
                    tiny_http::Response::from_string(render(&maps, &shared)).with_header(header)
                } else {
                    tiny_http::Response::from_string("see /metrics\n").with_status_code(404)
                };
                let _ = request.respond(response);
            }
        })?;
    Ok(bound)
}
