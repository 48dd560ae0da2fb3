//! Two nodes behind one gateway, each with Pod ranges of its own, both running the
//! daemon with the same flags and no `--pod-cidr`: each learns its own Pods, sends its
//! same-node Pod-to-Pod traffic (IPv4 and IPv6) through the gateway, and routes the
//! traffic between the nodes' Pods as before, never redirected.

use std::net::IpAddr;

use serde_json::Value;
use visibility_tests::{
    lab::{Lab, LabConfig},
    node::{Node, counter_in},
    require_root,
};

use crate::common::*;

/// The counters that tell the paths apart, on one node: (redirected at `pod_egress`,
/// `pod_egress` passes of packets not from a Pod of this node, `pod_ingress` and
/// `uplink` passes of traffic not between this node's Pods).
fn path_counters(node: &Node) -> [u64; 4] {
    let status = node.status().unwrap();
    let get = |hook, counter| counter_in(&status, hook, counter).unwrap();
    [
        get("pod_egress", "redirected_to_gateway"),
        get("pod_egress", "pass_not_from_pod"),
        get("pod_ingress", "pass_not_same_node"),
        get("uplink_ingress", "pass_not_same_node"),
    ]
}

/// Flows of `node` between `a` and `b`, either way.
fn flows_between(node: &Node, a: IpAddr, b: IpAddr) -> Vec<Value> {
    node.flows(&[&format!("ip={a}")])
        .unwrap()
        .into_iter()
        .filter(|f| {
            let ends = [&f["connection"]["src_ip"], &f["connection"]["dest_ip"]];
            ends.contains(&&Value::from(b.to_string()))
        })
        .collect()
}

#[test]
fn two_nodes_with_one_configuration_each_send_only_their_own_pod_pairs_to_the_gateway() {
    require_root();
    let config = LabConfig {
        pods: 2,
        ..LabConfig::default()
    };
    let first_lab = Lab::new("d-two-a", config.clone()).unwrap();
    let second_lab = first_lab.neighbour("d-two-b", config).unwrap();
    // Declared in this order, the second node (and its link) goes before the gateway.
    let mut first = Node::from_lab(first_lab);
    let mut second = Node::from_lab(second_lab);
    first.start_daemon(learning_args()).unwrap();
    second.start_daemon(learning_args()).unwrap();

    // Each learns its own Pods, and nothing of the other's.
    wait_for_pod_cidrs(
        &first,
        &["10.52.0.2/31 (routes)", "fd00:52::2/127 (routes)"],
    );
    wait_for_pod_cidrs(
        &second,
        &["10.52.1.2/31 (routes)", "fd00:52:1::2/127 (routes)"],
    );
    for node in [&first, &second] {
        let status = node.status().unwrap();
        assert_eq!(status["healthy"], true, "{status}");
    }

    // Same-node Pod-to-Pod, on each node, both families: through the gateway.
    for node in [&first, &second] {
        let lab = &node.lab;
        let before = path_counters(node);
        lab.flush_gateway_flows().unwrap();
        ping_both(lab, 0, 1);
        assert!(
            gateway_saw(lab, lab.pod_ipv4(0), lab.pod_ipv4(1)),
            "{}",
            lab.prefix()
        );
        assert!(
            gateway_saw(lab, lab.pod_ipv6(0), lab.pod_ipv6(1)),
            "{}",
            lab.prefix()
        );
        let after = path_counters(node);
        // Two pings a family, each way: at least 8 packets redirected.
        assert!(after[0] >= before[0] + 8, "{before:?} -> {after:?}");
        assert_eq!(
            flows_between(node, lab.pod_ipv6(0).into(), lab.pod_ipv6(1).into())
                .iter()
                .filter(|f| f["path"] == "via_gateway")
                .count(),
            2,
            "both directions of the IPv6 pair"
        );
    }

    // Between the nodes: routed as before (through the gateway, the nodes' way out),
    // never redirected, counted as not same-node on both ends.
    let (a, b) = (&first.lab, &second.lab);
    let before = [path_counters(&first), path_counters(&second)];
    a.flush_gateway_flows().unwrap();
    for (from, to) in [(a, b), (b, a)] {
        from.pod_ns(0).ping(to.pod_ipv4(1), 2).unwrap();
        from.pod_ns(0).ping(to.pod_ipv6(1), 2).unwrap();
    }
    udp_exchange_between(a, 0, b, 1, 7100);
    let after = [path_counters(&first), path_counters(&second)];
    for node in 0..2 {
        let (was, now) = (before[node], after[node]);
        assert_eq!(now[0], was[0], "node {node} redirected: {was:?} -> {now:?}");
        // Pings into this node's Pod 1 (4 requests) and its replies to the other's:
        // entered from the uplink, not from a Pod.
        assert!(now[1] >= was[1] + 8, "node {node}: {was:?} -> {now:?}");
        // Sent by this node's Pods to the other's: not same-node, at pod_ingress ...
        assert!(now[2] >= was[2] + 8, "node {node}: {was:?} -> {now:?}");
        // ... and what the other node's Pods send comes in on the uplink as such.
        assert!(now[3] >= was[3] + 8, "node {node}: {was:?} -> {now:?}");
    }
    assert!(gateway_saw(a, a.pod_ipv4(0), b.pod_ipv4(1)));
    assert!(gateway_saw(a, a.pod_ipv6(0), b.pod_ipv6(1)));
    for (node, here, there) in [(&first, a, b), (&second, b, a)] {
        for (mine, theirs) in [
            (
                IpAddr::from(here.pod_ipv4(0)),
                IpAddr::from(there.pod_ipv4(1)),
            ),
            (here.pod_ipv6(0).into(), there.pod_ipv6(1).into()),
        ] {
            let flows = flows_between(node, mine, theirs);
            assert!(
                !flows.is_empty(),
                "{}: no flow {mine} - {theirs}",
                here.prefix()
            );
            assert!(
                flows.iter().all(|f| f["path"] == "not_same_node"),
                "{}: {flows:#?}",
                here.prefix()
            );
        }
    }
}
