//! The daemon's log: `--log-format json`, and the datapath's own log records.

use std::time::Duration;

use serde_json::Value;
use visibility_tests::require_root;
use visibility_tests::{lab::POD_CIDR_V4, node::Node};

use crate::common::*;

/// With `--log-format json`, every line the daemon writes to standard error is a JSON
/// object, from start to stop, and so is the error of a daemon that cannot start.
#[test]
fn log_format_json_makes_every_daemon_line_json() {
    require_root();
    let mut node = Node::new("d-jsonlog", 2).unwrap();
    node.capture_daemon_log();
    let mut flags = args(&["--log-format", "json"]);
    flags.extend(Node::default_daemon_args());
    node.start_daemon(flags).unwrap();
    ping_both(&node.lab, 0, 1);
    node.wait_for(WAIT, |s| {
        s["daemon"]["uplinks"]
            .as_array()?
            .iter()
            .all(|u| u["gateway_mac"].is_string())
            .then_some(())
    })
    .unwrap();
    node.stop_daemon().unwrap();

    let log = node.daemon_log().unwrap();
    let lines: Vec<Value> = log
        .lines()
        .filter(|l| !l.trim().is_empty())
        .map(|l| serde_json::from_str(l).unwrap_or_else(|e| panic!("not JSON ({e}): {l}")))
        .collect();
    assert!(lines.len() >= 5, "{log}");
    for line in &lines {
        assert!(
            line["timestamp"].is_string() && line["level"].is_string(),
            "{line}"
        );
        assert!(line["fields"]["message"].is_string(), "{line}");
    }
    let messages: Vec<&str> = lines
        .iter()
        .filter_map(|l| l["fields"]["message"].as_str())
        .collect();
    for expected in ["datapath ready", "attached", "health check ok"] {
        assert!(
            messages.contains(&expected),
            "no {expected:?} in {messages:?}"
        );
    }
    assert!(
        messages.iter().any(|m| m.starts_with("stopping")),
        "{messages:?}"
    );
    let attached = lines
        .iter()
        .find(|l| l["fields"]["message"] == "attached")
        .unwrap();
    assert!(
        attached["fields"]["interface"].is_string(),
        "structured fields: {attached}"
    );

    // A daemon that fails at start says so in JSON too.
    let output = node
        .cli(&[
            "--log-format",
            "json",
            "daemon",
            "--uplink",
            "nosuch0",
            "--pod-cidr",
            POD_CIDR_V4,
        ])
        .unwrap();
    assert!(!output.status.success());
    let stderr = String::from_utf8_lossy(&output.stderr);
    let lines: Vec<&str> = stderr.lines().collect();
    assert_eq!(lines.len(), 1, "{stderr}");
    let line: Value =
        serde_json::from_str(lines[0]).unwrap_or_else(|e| panic!("not JSON ({e}): {stderr}"));
    assert_eq!(line["level"], "ERROR", "{line}");
    assert!(line.to_string().contains("nosuch0"), "{line}");
}

/// The programs' own log records (aya-log) reach the daemon's log: with a gateway that
/// has no route, the datapath says so, once a second at most, and the packet stays on
/// the node.
#[test]
fn datapath_log_records_reach_the_daemon_log() {
    let mut node = Node::new("d-ebpflog", 2).unwrap();
    node.capture_daemon_log();
    // Without a default route, nothing leads to the configured gateway.
    node.lab
        .node()
        .run("ip", ["-4", "route", "del", "default"])
        .unwrap();
    let args = [
        "--pod-cidr",
        POD_CIDR_V4,
        "--uplink",
        "eth0",
        "--gateway",
        "10.99.0.1",
        "--reconcile-interval",
        "1",
    ];
    node.start_daemon(args.iter().map(|a| a.to_string()).collect())
        .unwrap();
    // No route to 10.99.0.1: the redirect cannot be done. The packets are dropped, never
    // delivered around the gateway, and the datapath says why in the daemon's log.
    assert!(
        !node
            .lab
            .pod_ns(0)
            .ping_once(node.lab.pod_ipv4(1), Duration::from_secs(1)),
        "a Pod-to-Pod ping went around the unreachable gateway"
    );
    let _ = node.lab.pod_ns(0).ping(node.lab.pod_ipv4(1), 2);
    let line =
        visibility_tests::node::poll(Duration::from_secs(5), "the datapath's log record", || {
            let log = node.daemon_log()?;
            Ok(log
                .lines()
                .find(|l| l.contains("dropped a Pod-to-Pod packet"))
                .map(str::to_owned))
        })
        .unwrap();
    assert!(line.contains("pod_egress"), "{line}");
    assert!(
        node.counter("pod_egress", "dropped_no_gateway_route")
            .unwrap()
            >= 3
    );
    let log = node.daemon_log().unwrap();
    let records = log
        .lines()
        .filter(|l| l.contains("dropped a Pod-to-Pod packet"))
        .count();
    assert!(
        records <= 4,
        "rate limit: {records} records for 3 packets within a second or two:\n{log}"
    );
}
