//! The Grafana dashboard (`deploy/grafana-dashboard.json`) against a real Prometheus server
//! that scraped the daemon: every panel's query returns data.
//!
//! With `VISIBILITY_DASHBOARD_SVG=PATH` (relative to the workspace), the test also runs a
//! minute of traffic and draws every panel from the server's data into an SVG:
//! `VISIBILITY_DASHBOARD_SVG=docs/dashboard.svg cargo test -p visibility-tests --test
//! dashboard` makes the README's picture.
//!
//! **These tests need root** (network namespaces, bpffs, BPF), the `visibility` binary
//! built (`cargo build -p visibility-userspace`), `curl`, and the Prometheus server
//! (Debian's `prometheus` package).
//!
//! Run: `cargo test -p visibility-tests --test dashboard`

use std::{
    net::SocketAddr,
    path::Path,
    time::{Duration, Instant},
};

use visibility_tests::{
    dashboard::{Prometheus, concrete, dashboard_panels, panel_lines, render_svg},
    lab::{IpFamily, Lab},
    node::Node,
    records::{RecordFile, daemon_args_with_records},
};

/// The daemon's endpoint and the server, each in the node's own namespace.
const METRICS_ADDR: &str = "127.0.0.1:19478";
const PROMETHEUS_ADDR: &str = "127.0.0.1:19090";
/// Grafana's `$__rate_interval` as the test fills it: many one-second scrapes.
const RATE_INTERVAL: &str = "30s";
/// How long the picture's traffic runs.
const PICTURE_SECONDS: u64 = 60;

/// UDP from pod-0 to pod-1 for `seconds`: a rate that rises and falls, and new flows
/// (a port each) every few seconds, so that every panel has something to show.
fn traffic(lab: &Lab, seconds: u64) {
    let socket = lab
        .pod_ns(0)
        .udp_bind(SocketAddr::new(lab.pod_ip(0, IpFamily::V4), 0))
        .unwrap();
    let started = Instant::now();
    for second in 0..seconds {
        let load = 1 + (second % 30).min(30 - second % 30);
        for i in 0..load * 40 {
            let port = 20_000 + (second / 5) as u16 * 8 + (i % 8) as u16;
            let to = SocketAddr::new(lab.pod_ip(1, IpFamily::V4), port);
            let _ = socket.send_to(&[0x5a; 512], to);
        }
        let next = Duration::from_secs(second + 1);
        std::thread::sleep(next.saturating_sub(started.elapsed()));
    }
}

/// Runs the Prometheus server (bounded: it lives as long as the test, on loopback in the
/// node's namespace) with a scrape config for the daemon, waits for two scrapes, and runs
/// every panel's expression through the server's HTTP API: each returns a series.
#[test]
fn every_panel_returns_data_from_a_real_prometheus() {
    assert!(
        nix::unistd::geteuid().is_root(),
        "the dashboard test needs root (network namespaces, bpffs, BPF)"
    );
    let file = RecordFile::new("dashboard");
    let mut node = Node::new("dash", 2).expect("building the lab");
    node.capture_daemon_log();
    let args = daemon_args_with_records(&file, &["--metrics-addr", METRICS_ADDR]);
    node.start_daemon(args).expect("starting the daemon");
    let lab = &node.lab;
    lab.pod_ns(0).ping(lab.pod_ipv4(1), 2).unwrap();

    let prometheus = Prometheus::start(lab.node(), PROMETHEUS_ADDR, METRICS_ADDR).unwrap();
    let started = time::OffsetDateTime::now_utc().unix_timestamp() as f64;
    prometheus
        .wait_for_scrapes(2, Duration::from_secs(30))
        .unwrap();

    let panels = dashboard_panels().unwrap();
    assert!(panels.len() >= 7, "{panels:#?}");
    let mut empty = Vec::new();
    for panel in &panels {
        for target in &panel.targets {
            let expr = concrete(&target.expr, RATE_INTERVAL);
            let series = prometheus.query(&expr).unwrap();
            if series.is_empty() {
                empty.push(format!("{}: {expr}", panel.title));
            }
        }
    }
    assert!(
        empty.is_empty(),
        "queries without data:\n{}",
        empty.join("\n")
    );

    if let Some(path) = std::env::var_os("VISIBILITY_DASHBOARD_SVG") {
        // A relative path is the workspace's (cargo runs tests in the crate's directory).
        let path = Path::new(env!("CARGO_MANIFEST_DIR")).join("..").join(path);
        traffic(lab, PICTURE_SECONDS);
        let end = time::OffsetDateTime::now_utc().unix_timestamp() as f64;
        let drawn: Vec<_> = panels
            .iter()
            .map(|panel| {
                let lines =
                    panel_lines(&prometheus, panel, RATE_INTERVAL, (started, end, 2.0)).unwrap();
                (panel.clone(), lines)
            })
            .collect();
        render_svg(&path, &drawn, end - started).unwrap();
        eprintln!("wrote {}", path.display());
    }
}
