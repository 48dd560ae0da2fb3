//! Pods coming and going while the daemon runs, and the daemon killed under load.

use std::time::Duration;

use visibility_tests::{
    lab::IpFamily,
    node::{counter_in, poll},
    tcp_load::TcpLoad,
};

use crate::common::*;

/// A Pod created while the daemon runs is found, attached and redirected.
#[test]
fn a_new_pod_is_attached_and_redirected() {
    let mut node = started("d-newpod", 2);
    let index = node.lab.add_pod().unwrap();
    node.wait_until_attached(3).unwrap();
    let lab = &node.lab;
    let ifindex = lab.pod_host_ifindex(index);
    let status = node.status().unwrap();
    let pods = status["daemon"]["pod_interfaces"].as_array().unwrap();
    let new = pods
        .iter()
        .find(|p| p["ifindex"] == ifindex)
        .unwrap_or_else(|| panic!("veth{index} not in {status}"));
    assert_eq!(new["name"], lab.pod_host_ifname(index));
    assert_eq!(new["attached"], true);
    assert_eq!(new["reason"], "route");
    let pins = link_pins(&node.pin_dir);
    for program in ["pod_ingress", "pod_egress"] {
        assert!(pins.contains(&format!("if{ifindex}_{program}")), "{pins:?}");
    }

    lab.flush_gateway_flows().unwrap();
    ping_both(lab, index, 0);
    assert!(gateway_saw_pods(lab, index, 0, IpFamily::V4));
    assert!(gateway_saw_pods(lab, index, 0, IpFamily::V6));
}

/// A deleted Pod leaves nothing behind: no link pin, no entry in the status.
#[test]
fn a_deleted_pod_leaves_no_state() {
    let mut node = started("d-delpod", 3);
    let ifindex = node.lab.pod_host_ifindex(2);
    let prefix = format!("if{ifindex}_");
    assert_eq!(
        link_pins(&node.pin_dir)
            .iter()
            .filter(|p| p.starts_with(&prefix))
            .count(),
        2
    );

    node.lab.remove_pod(2).unwrap();
    node.wait_until_attached(2).unwrap();
    poll(WAIT, "the link pins of the deleted Pod to go", || {
        Ok(link_pins(&node.pin_dir)
            .iter()
            .all(|p| !p.starts_with(&prefix))
            .then_some(()))
    })
    .unwrap();
    let status = node.status().unwrap();
    let pods = status["daemon"]["pod_interfaces"].as_array().unwrap();
    assert!(
        pods.iter()
            .all(|p| p["ifindex"] != ifindex && p["name"] != "veth2"),
        "{status}"
    );
    assert_eq!(pods.len(), 2);
    // Pods 0, 1 and the uplink keep theirs.
    assert_eq!(
        link_pins(&node.pin_dir).len(),
        5,
        "{:?}",
        link_pins(&node.pin_dir)
    );

    let lab = &node.lab;
    lab.flush_gateway_flows().unwrap();
    ping_both(lab, 0, 1);
    assert!(gateway_saw_pods(lab, 0, 1, IpFamily::V4));
}

/// SIGKILL the daemon under TCP load: the datapath stays attached, so the connection
/// keeps going through the gateway without the daemon, and a restarted daemon adopts the
/// datapath with its counters. The connection never breaks.
#[test]
fn kill_9_and_restart_under_tcp_load() {
    let mut node = started("d-kill9", 2);
    let load = TcpLoad::start(
        node.lab.pod_ns(0),
        node.lab.pod_ns(1),
        node.lab.pod_ipv4(1).into(),
        MESSAGE_INTERVAL,
        ECHO_TIMEOUT,
    )
    .unwrap();
    load.wait_for_echoes(10, WAIT).unwrap();
    let old_pid = node.daemon_pid().unwrap();
    let before_kill = node.status().unwrap();
    assert_eq!(before_kill["daemon"]["origin"], "loaded");
    let redirected = counter_in(&before_kill, "pod_egress", "redirected_to_gateway").unwrap();
    let forwarded = node.lab.gateway_forwarded_packets().unwrap();

    node.kill_daemon().unwrap();
    std::thread::sleep(Duration::from_millis(500));
    let status = node.cli(&["status"]).unwrap();
    assert!(!status.status.success(), "status with the daemon dead");
    assert!(
        stdout(&status).contains("NOT RUNNING"),
        "{}",
        stdout(&status)
    );
    let echoed = load.wait_for_echoes(20, WAIT).unwrap();
    assert!(
        node.lab.gateway_forwarded_packets().unwrap() >= forwarded + 36,
        "without the daemon, the connection still goes through the gateway"
    );
    let without_daemon = node.status().unwrap();
    assert_eq!(without_daemon["daemon_running"], false);
    assert!(
        counter_in(&without_daemon, "pod_egress", "redirected_to_gateway").unwrap()
            >= redirected + 20
    );

    node.restart_daemon().unwrap();
    let after = node.status().unwrap();
    assert_eq!(after["daemon"]["origin"], "adopted", "{after}");
    assert_ne!(after["daemon"]["pid"], old_pid);
    // No counter went backwards: the restarted daemon kept the pinned maps.
    for row in before_kill["counters"].as_array().unwrap() {
        let (hook, counter) = (
            row["hook"].as_str().unwrap(),
            row["counter"].as_str().unwrap(),
        );
        let now = counter_in(&after, hook, counter).unwrap();
        assert!(
            now >= num(&row["packets"]),
            "{hook}/{counter}: {now} < {}",
            row["packets"]
        );
    }
    let forwarded = node.lab.gateway_forwarded_packets().unwrap();
    load.wait_for_echoes(20, WAIT).unwrap();
    assert!(node.lab.gateway_forwarded_packets().unwrap() >= forwarded + 36);

    let report = load.stop().expect("the connection never broke");
    assert!(report.messages >= echoed + 20, "{report:?}");
    println!("kill -9 under load: {report:?}");
}
