//! Runtime control: traffic through the gateway, `enable`/`disable` on a live
//! connection, `exempt` and `pod-cidr` changes, and changes that survive restarts.

use serde_json::Value;
use visibility_tests::require_root;
use visibility_tests::{
    lab::{IpFamily, Lab, POD_CIDR_V4, POD_CIDR_V6},
    node::{Node, poll},
    tcp_load::TcpLoad,
};

use crate::common::*;

#[test]
fn pod_to_pod_goes_through_the_gateway() {
    let node = started("d-basic", 2);
    let lab = &node.lab;
    lab.flush_gateway_flows().unwrap();
    lab.pod(0).netns().ping(lab.pod_ipv4(1), 3).unwrap();
    lab.pod(0).netns().ping(lab.pod_ipv6(1), 3).unwrap();
    let flows = lab.gateway_flows().unwrap();
    assert!(
        flows
            .iter()
            .any(|f| f.is_between(lab.pod_ipv4(0), lab.pod_ipv4(1))),
        "{flows:?}"
    );
    assert!(
        flows
            .iter()
            .any(|f| f.is_between(lab.pod_ipv6(0), lab.pod_ipv6(1))),
        "{flows:?}"
    );
    println!("{}", node.cli_ok(&["status"]).unwrap());
    println!("{}", node.cli_ok(&["flows"]).unwrap());
}

/// `disable` and `enable` act on the next packet of a live TCP connection, which keeps
/// working throughout; the gateway sees its packets only while visibility is on.
#[test]
fn disable_and_enable_keep_a_live_connection() {
    let node = started("d-toggle", 2);
    let lab = &node.lab;
    let load = TcpLoad::start(
        lab.pod_ns(0),
        lab.pod_ns(1),
        lab.pod_ipv4(1).into(),
        MESSAGE_INTERVAL,
        ECHO_TIMEOUT,
    )
    .unwrap();
    let (client, server) = (load.client_addr(), load.server_addr());
    let this_connection = |lab: &Lab| {
        lab.gateway_flows().unwrap().iter().any(|f| {
            f.protocol == "tcp"
                && f.is_between(client.ip(), server.ip())
                && f.sport == Some(client.port())
                && f.dport == Some(server.port())
        })
    };
    load.wait_for_echoes(5, WAIT).unwrap();

    // On: every message and every echo crosses the gateway.
    let forwarded = lab.gateway_forwarded_packets().unwrap();
    load.wait_for_echoes(10, WAIT).unwrap();
    assert!(
        lab.gateway_forwarded_packets().unwrap() >= forwarded + 16,
        "10 messages and their echoes went through the gateway"
    );
    assert!(this_connection(lab), "the gateway logged the connection");

    let out = node.cli_ok(&["disable"]).unwrap();
    assert!(out.contains("off"), "{out}");
    assert_eq!(node.status().unwrap()["enabled"], false);
    let out = node.cli_ok(&["disable"]).unwrap();
    assert!(out.contains("already off"), "{out}");
    // Let packets sent before the switch arrive, then start from an empty flow log.
    load.wait_for_echoes(3, WAIT).unwrap();
    lab.flush_gateway_flows().unwrap();
    let forwarded = lab.gateway_forwarded_packets().unwrap();
    let passed = node.counter("pod_egress", "pass_disabled").unwrap();
    load.wait_for_echoes(25, WAIT).unwrap();
    assert_eq!(
        lab.gateway_forwarded_packets().unwrap(),
        forwarded,
        "off: the gateway forwarded none of the connection's packets"
    );
    assert!(
        !this_connection(lab),
        "off: the gateway logged the connection"
    );
    assert!(node.counter("pod_egress", "pass_disabled").unwrap() >= passed + 40);

    let out = node.cli_ok(&["enable"]).unwrap();
    assert!(out.contains("now on"), "{out}");
    assert_eq!(node.status().unwrap()["enabled"], true);
    load.wait_for_echoes(3, WAIT).unwrap();
    let forwarded = lab.gateway_forwarded_packets().unwrap();
    load.wait_for_echoes(10, WAIT).unwrap();
    assert!(
        lab.gateway_forwarded_packets().unwrap() >= forwarded + 16,
        "on again: the gateway forwards the connection"
    );
    // conntrack picks the connection up mid-stream.
    poll(WAIT, "the gateway to log the connection again", || {
        Ok(this_connection(lab).then_some(()))
    })
    .unwrap();

    let report = load.stop().expect("the connection never broke");
    assert!(report.messages >= 50, "{report:?}");
    println!("disable/enable under load: {report:?}");
}

/// `exempt add` keeps a destination port on the node (the gateway never sees it);
/// `exempt remove` sends it through the gateway again. `exempt list` shows the rule.
#[test]
fn exempt_add_and_remove_are_seen_by_the_gateway() {
    let node = started("d-exempt", 2);
    let lab = &node.lab;
    let pod1 = lab.pod_ipv4(1);
    let rule = format!("{pod1}/32,udp/5353");

    let out = node.cli_ok(&["exempt", "add", &rule]).unwrap();
    assert!(out.contains(&rule), "{out}");
    let out = node.cli_ok(&["exempt", "add", &rule]).unwrap();
    assert!(out.contains("already exempt"), "{out}");
    let list = node.cli_ok(&["exempt", "list"]).unwrap();
    assert!(
        list.contains("CIDR") && list.contains(&format!("{pod1}/32")),
        "{list}"
    );
    assert!(list.contains("udp") && list.contains("5353"), "{list}");
    assert_eq!(
        node.exempt_list().unwrap(),
        serde_json::json!([{"cidr": format!("{pod1}/32"), "protocol": "udp", "port": 5353, "rule": rule}])
    );
    assert_eq!(node.status().unwrap()["exempt"], serde_json::json!([rule]));

    lab.flush_gateway_flows().unwrap();
    let passed = node.counter("pod_egress", "pass_exempt").unwrap();
    udp_exchange(lab, 0, 1, 5353);
    udp_exchange(lab, 0, 1, 5354);
    assert!(
        !gateway_saw_udp(lab, pod1, 5353),
        "exempt: {:?}",
        lab.gateway_flows()
    );
    assert!(
        gateway_saw_udp(lab, pod1, 5354),
        "not exempt: {:?}",
        lab.gateway_flows()
    );
    assert!(node.counter("pod_egress", "pass_exempt").unwrap() >= passed + 2);
    let flows = node.flows(&["dport=5353"]).unwrap();
    assert!(
        !flows.is_empty() && flows.iter().all(|f| f["path"] == "exempt"),
        "{flows:?}"
    );

    let out = node.cli_ok(&["exempt", "remove", &rule]).unwrap();
    assert!(out.contains("no longer exempt"), "{out}");
    assert_eq!(node.exempt_list().unwrap(), serde_json::json!([]));
    assert!(
        node.cli_ok(&["exempt", "list"])
            .unwrap()
            .contains("no exempt ranges")
    );
    lab.flush_gateway_flows().unwrap();
    udp_exchange(lab, 0, 1, 5353);
    assert!(
        gateway_saw_udp(lab, pod1, 5353),
        "no longer exempt: {:?}",
        lab.gateway_flows()
    );
}

/// `pod-cidr remove` and `add` change the live map: without the IPv4 Pod CIDR, IPv4
/// Pod-to-Pod traffic stays on the node (IPv6 still takes the gateway); with it back, it
/// takes the gateway again.
#[test]
fn pod_cidr_remove_and_add_change_the_live_map() {
    let node = started("d-podcidr", 2);
    let lab = &node.lab;
    assert_eq!(
        node.pod_cidrs().unwrap(),
        vec![POD_CIDR_V4.to_owned(), POD_CIDR_V6.to_owned()]
    );

    let out = node.cli_ok(&["pod-cidr", "remove", POD_CIDR_V4]).unwrap();
    assert!(
        out.contains("removed") && out.contains(POD_CIDR_V4),
        "{out}"
    );
    assert_eq!(node.pod_cidrs().unwrap(), vec![POD_CIDR_V6.to_owned()]);
    assert_eq!(
        node.cli_ok(&["pod-cidr", "list"]).unwrap().trim(),
        POD_CIDR_V6
    );
    lab.flush_gateway_flows().unwrap();
    ping_both(lab, 0, 1);
    assert!(
        !gateway_saw_pods(lab, 0, 1, IpFamily::V4),
        "IPv4 is no Pod CIDR: {:?}",
        lab.gateway_flows()
    );
    assert!(gateway_saw_pods(lab, 0, 1, IpFamily::V6));

    let out = node.cli_ok(&["pod-cidr", "add", POD_CIDR_V4]).unwrap();
    assert!(out.contains("added") && out.contains(POD_CIDR_V4), "{out}");
    let out = node.cli_ok(&["pod-cidr", "add", POD_CIDR_V4]).unwrap();
    assert!(out.contains("already"), "{out}");
    assert_eq!(
        node.pod_cidrs().unwrap(),
        vec![POD_CIDR_V4.to_owned(), POD_CIDR_V6.to_owned()]
    );
    lab.flush_gateway_flows().unwrap();
    ping_both(lab, 0, 1);
    assert!(gateway_saw_pods(lab, 0, 1, IpFamily::V4));
    assert!(gateway_saw_pods(lab, 0, 1, IpFamily::V6));
}

/// A Pod CIDR and an exemption added with the CLI live in the pinned maps, so a
/// restarted daemon (after SIGTERM, and after SIGKILL) keeps them, listed and in force.
#[test]
fn cli_changes_survive_daemon_restarts() {
    require_root();
    let mut node = Node::new("d-persist", 2).unwrap();
    // The daemon knows only the IPv6 Pod CIDR; IPv4 comes from the CLI.
    node.start_daemon(args(&[
        "--pod-cidr",
        POD_CIDR_V6,
        "--reconcile-interval",
        "1",
    ]))
    .unwrap();
    assert_eq!(node.pod_cidrs().unwrap(), vec![POD_CIDR_V6.to_owned()]);
    node.lab.flush_gateway_flows().unwrap();
    ping_both(&node.lab, 0, 1);
    assert!(!gateway_saw_pods(&node.lab, 0, 1, IpFamily::V4));

    let pod1 = node.lab.pod_ipv4(1);
    let rule = format!("{pod1}/32,udp/5353");
    node.cli_ok(&["pod-cidr", "add", POD_CIDR_V4]).unwrap();
    node.cli_ok(&["exempt", "add", &rule]).unwrap();

    let check = |node: &Node, when: &str| {
        let status = node.status().unwrap();
        assert_eq!(status["daemon"]["origin"], "adopted", "{when}: {status}");
        assert_eq!(
            node.pod_cidrs().unwrap(),
            vec![POD_CIDR_V4.to_owned(), POD_CIDR_V6.to_owned()],
            "{when}"
        );
        assert_eq!(
            node.exempt_list().unwrap()[0]["rule"],
            Value::from(rule.clone()),
            "{when}"
        );
        let lab = &node.lab;
        lab.flush_gateway_flows().unwrap();
        ping_both(lab, 0, 1);
        udp_exchange(lab, 0, 1, 5353);
        udp_exchange(lab, 0, 1, 5354);
        assert!(
            gateway_saw_pods(lab, 0, 1, IpFamily::V4),
            "{when}: the CLI's Pod CIDR is in force"
        );
        assert!(
            !gateway_saw_udp(lab, pod1, 5353),
            "{when}: the CLI's exemption is in force"
        );
        assert!(gateway_saw_udp(lab, pod1, 5354), "{when}");
    };

    node.stop_daemon().unwrap();
    node.restart_daemon().unwrap();
    check(&node, "after SIGTERM and a restart");

    node.kill_daemon().unwrap();
    node.restart_daemon().unwrap();
    check(&node, "after SIGKILL and a restart");
}
