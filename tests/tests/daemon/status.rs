//! `visibility status`: what it shows, and when it fails (no daemon, a failing health
//! check, no uplink).

use std::time::Duration;

use serde_json::Value;
use visibility_tests::require_root;
use visibility_tests::{
    lab::{GATEWAY_IFNAME, GATEWAY_IPV4, GATEWAY_IPV6, Lab, NODE_UPLINK, POD_CIDR_V4, POD_CIDR_V6},
    node::{Node, counter_in},
};

use crate::common::*;

/// The MAC of the gateway's interface.
fn gateway_mac(lab: &Lab) -> String {
    let out = lab
        .gateway()
        .run("ip", ["-j", "link", "show", GATEWAY_IFNAME])
        .unwrap();
    let links: Value = serde_json::from_str(&out).unwrap();
    links[0]["address"].as_str().unwrap().to_owned()
}

/// `status --json` has everything, and `status` exits 0 while healthy and non-zero (saying
/// why) once the daemon is gone.
#[test]
fn status_shows_everything_and_fails_without_the_daemon() {
    require_root();
    let mut node = Node::new("d-status", 2).unwrap();
    let mut flags = Node::default_daemon_args();
    flags.extend(args(&[
        "--exempt",
        "10.52.0.3/32,tcp/9999",
        "--node-name",
        "node-under-test",
    ]));
    node.start_daemon(flags).unwrap();
    ping_both(&node.lab, 0, 1);
    let mac = gateway_mac(&node.lab);
    let status = node
        .wait_for(WAIT, |s| {
            let uplinks = s["daemon"]["uplinks"].as_array()?;
            (uplinks.len() == 2 && uplinks.iter().all(|u| u["gateway_mac"] == mac.as_str()))
                .then(|| s.clone())
        })
        .unwrap();
    let lab = &node.lab;

    assert_eq!(status["enabled"], true, "{status}");
    assert_eq!(status["daemon_running"], true);
    assert_eq!(status["healthy"], true);
    let daemon = &status["daemon"];
    assert_eq!(daemon["pid"], node.daemon_pid().unwrap());
    assert_eq!(daemon["node_name"], "node-under-test");
    assert_eq!(daemon["origin"], "loaded");
    assert!(daemon["attach_mode"] == "tcx" || daemon["attach_mode"] == "clsact");
    let uplink_ifindex = lab.node_uplink_ifindex().unwrap();
    for (family, gateway) in [
        ("v4", GATEWAY_IPV4.to_string()),
        ("v6", GATEWAY_IPV6.to_string()),
    ] {
        let uplink = daemon["uplinks"]
            .as_array()
            .unwrap()
            .iter()
            .find(|u| u["family"] == family)
            .unwrap_or_else(|| panic!("no {family} uplink: {status}"));
        assert_eq!(uplink["uplink"], NODE_UPLINK);
        assert_eq!(uplink["ifindex"], uplink_ifindex);
        assert_eq!(uplink["up"], true);
        assert_eq!(uplink["gateway"], gateway.as_str());
        assert_eq!(uplink["gateway_mac"], mac.as_str());
        assert_eq!(uplink["attached"], true);
    }
    assert_eq!(
        status["pod_cidrs"],
        serde_json::json!([POD_CIDR_V4, POD_CIDR_V6])
    );
    assert_eq!(
        status["exempt"],
        serde_json::json!(["10.52.0.3/32,tcp/9999"])
    );
    let pods = daemon["pod_interfaces"].as_array().unwrap();
    assert_eq!(pods.len(), 2);
    for index in 0..2 {
        let pod = pods
            .iter()
            .find(|p| p["name"] == lab.pod_host_ifname(index))
            .unwrap_or_else(|| panic!("no veth{index}: {status}"));
        assert_eq!(pod["ifindex"], lab.pod_host_ifindex(index));
        assert_eq!(pod["attached"], true);
        assert_eq!(pod["error"], Value::Null);
    }
    let counters = status["counters"].as_array().unwrap();
    assert!(
        counters.len() >= 3 * 19,
        "every counter of every hook: {}",
        counters.len()
    );
    assert!(
        counters
            .iter()
            .all(|c| c["bytes"].is_u64() && c["packets"].is_u64())
    );
    assert!(counter_in(&status, "pod_egress", "redirected_to_gateway").unwrap() >= 8);
    assert!(counter_in(&status, "uplink_ingress", "delivered_from_gateway").unwrap() >= 8);
    let checks = daemon["checks"].as_array().unwrap();
    for name in [
        "gateway_neighbour_v4",
        "gateway_neighbour_v6",
        "uplink_up_v4",
        "pod_interfaces_attached",
        "rp_filter",
    ] {
        assert!(
            checks.iter().any(|c| c["name"] == name),
            "no check {name}: {status}"
        );
    }
    assert!(
        checks
            .iter()
            .all(|c| c["ok"] == true && c["detail"].is_string())
    );
    assert!(status["flow_map_capacity"].as_u64().unwrap() > 0);

    let text = node.cli(&["status"]).unwrap();
    assert!(text.status.success(), "healthy: exit 0");
    let text = stdout(&text);
    for needle in [
        "Visibility:     on",
        "running (pid",
        "veth0",
        "veth1",
        mac.as_str(),
        "10.52.0.3/32,tcp/9999",
        "redirected_to_gateway",
        "Health:",
    ] {
        assert!(text.contains(needle), "no {needle:?} in:\n{text}");
    }

    node.stop_daemon().unwrap();
    let text = node.cli(&["status"]).unwrap();
    assert!(
        !text.status.success(),
        "the daemon is not running: non-zero"
    );
    assert!(stdout(&text).contains("NOT RUNNING"), "{}", stdout(&text));
    let json = node.cli(&["status", "--json"]).unwrap();
    assert!(!json.status.success());
    let status: Value = serde_json::from_slice(&json.stdout).unwrap();
    assert_eq!(status["daemon_running"], false);
    assert_eq!(status["healthy"], false);
    assert_eq!(status["daemon"], Value::Null);
    assert_eq!(status["enabled"], true, "the maps keep their state");
}

/// `status` exits non-zero while a health check fails: here the gateway stops answering
/// ARP, so its IPv4 neighbour entry cannot be resolved.
#[test]
fn status_fails_while_a_health_check_fails() {
    let node = started("d-unhealthy", 2);
    let lab = &node.lab;
    assert!(node.cli(&["status"]).unwrap().status.success());
    lab.gateway()
        .run("ip", ["link", "set", GATEWAY_IFNAME, "arp", "off"])
        .unwrap();
    lab.node()
        .run("ip", ["neigh", "flush", "dev", NODE_UPLINK])
        .unwrap();
    // The daemon keeps the gateway's entry managed: the kernel probes it again, and
    // fails. Meanwhile Pod-to-Pod packets are dropped at the gateway's door
    // (`dropped_gateway_unresolved`), never delivered around it.
    let _ = lab
        .pod_ns(0)
        .ping_once(lab.pod_ipv4(1), Duration::from_secs(1));
    let failing = node
        .wait_for(WAIT, |s| {
            let checks = s["daemon"]["checks"].as_array()?;
            let failing = checks.iter().find(|c| c["ok"] == false)?;
            (s["healthy"] == false).then(|| failing.clone())
        })
        .unwrap();
    assert_eq!(failing["name"], "gateway_neighbour_v4", "{failing}");
    let out = node.cli(&["status"]).unwrap();
    assert!(!out.status.success(), "unhealthy: non-zero");
    assert!(stdout(&out).contains("FAIL"), "{}", stdout(&out));

    lab.gateway()
        .run("ip", ["link", "set", GATEWAY_IFNAME, "arp", "on"])
        .unwrap();
    // The kernel's next probe of the managed entry resolves it; then traffic flows.
    node.wait_for(WAIT, |s| (s["healthy"] == true).then_some(()))
        .unwrap();
    assert!(node.cli(&["status"]).unwrap().status.success());
    lab.pod_ns(0).ping(lab.pod_ipv4(1), 2).unwrap();
}

/// Without an uplink for a family that has a Pod CIDR nothing of that family can take
/// the gateway, so `status` must not report healthy.
#[test]

fn status_fails_without_an_uplink() {
    let node = started("d-nouplink", 2);
    let lab = &node.lab;
    lab.node()
        .run("ip", ["link", "set", NODE_UPLINK, "down"])
        .unwrap();
    node.wait_for(WAIT, |s| {
        s["daemon"]["uplinks"].as_array()?.is_empty().then_some(())
    })
    .unwrap();
    let status = node.status().unwrap();
    assert_eq!(status["healthy"], false, "{status}");
    assert!(
        !node.cli(&["status"]).unwrap().status.success(),
        "no uplink: non-zero"
    );
}
