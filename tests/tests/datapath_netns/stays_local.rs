//! Traffic that must stay on the node: everything while visibility is disabled, an exempt
//! range, and traffic between the node and its Pods.

use std::collections::BTreeSet;
use std::net::{IpAddr, SocketAddr};

use serde_json::Value;
use visibility_tests::lab::{
    IpFamily, Lab, POD_GATEWAY_V4, POD_GATEWAY_V6, POD_IFNAME, Reply, TcpServer,
};
use visibility_tests::node::Node;

use crate::common::*;

/// `visibility disable` keeps Pod-to-Pod traffic on the node: it works, and the gateway
/// forwards none of it. `enable` sends it through the gateway again, without a restart.
pub(crate) fn disable_keeps_traffic_local_and_enable_restores_it(family: IpFamily) {
    let node = started_node("onoff", family);
    let lab = &node.lab;
    let (p0, p1) = (lab.pod_ip(0, family), lab.pod_ip(1, family));
    let pid = node.daemon_pid();

    node.cli_ok(&["disable"]).unwrap();
    assert_eq!(node.status().unwrap()["enabled"], false);
    lab.flush_gateway_flows().unwrap();
    let forwarded = lab.gateway_forwarded_packets().unwrap();
    let disabled = counter(&node, "pod_egress", "pass_disabled");
    assert_pair_works(lab, 0, 1, family);
    let (client, server) = udp_echo(lab, 0, 1, 0, family, 2, WORKS).unwrap();
    assert_eq!(
        lab.gateway_forwarded_packets().unwrap(),
        forwarded,
        "the gateway forwarded packets while visibility was off"
    );
    let seen = lab.gateway_flows_involving(p0).unwrap();
    assert!(seen.is_empty(), "the gateway saw: {seen:#?}");
    assert!(counter(&node, "pod_egress", "pass_disabled") > disabled);
    let udp = protocol_number("udp", family);
    let local = flow_record(&node, udp, socket(client), socket(server)).unwrap();
    assert_eq!(path(&local), "local", "{local}");
    assert_eq!(count(&local, "packets_sent"), 2, "{local}");
    assert_eq!(count(&local, "returned_packets"), 0, "{local}");

    node.cli_ok(&["enable"]).unwrap();
    assert_eq!(node.status().unwrap()["enabled"], true);
    assert_pair_works(lab, 0, 1, family);
    assert!(
        lab.gateway_forwarded_packets().unwrap() > forwarded,
        "the gateway forwarded nothing after enable"
    );
    for protocol in ["icmp", "tcp", "udp"] {
        let number = protocol_number(protocol, family);
        assert!(
            !gateway_flows(lab, p0, p1, number).is_empty(),
            "no {protocol} flow pod 0 -> pod 1 at the gateway after enable"
        );
    }
    assert_eq!(node.daemon_pid(), pid, "the daemon was not restarted");
}

/// `exempt add POD-2/32,udp/5353` (or /128): UDP to that port works and stays on the
/// node (path "exempt"), while TCP, and UDP to another port, of the same Pod still take
/// the gateway. Removing the exemption sends that UDP through the gateway again.
pub(crate) fn exempt_range_stays_on_the_node(family: IpFamily) {
    let node = started_node("exempt", family);
    let lab = &node.lab;
    let (p0, p2) = (lab.pod_ip(0, family), lab.pod_ip(2, family));
    let prefix = match family {
        IpFamily::V4 => 32,
        IpFamily::V6 => 128,
    };
    let rule = format!("{p2}/{prefix},udp/5353");
    node.cli_ok(&["exempt", "add", &rule]).unwrap();
    let listed: Value =
        serde_json::from_str(&node.cli_ok(&["exempt", "list", "--json"]).unwrap()).unwrap();
    assert!(
        listed.as_array().unwrap().iter().any(|r| r["rule"] == rule),
        "{rule} not listed: {listed}"
    );

    let udp = protocol_number("udp", family);
    let forwarded = lab.gateway_forwarded_packets().unwrap();
    let datagrams = 3u64;
    let (client, server) = udp_echo(lab, 0, 2, 5353, family, datagrams as usize, WORKS).unwrap();
    assert_eq!(
        lab.gateway_forwarded_packets().unwrap(),
        forwarded,
        "the gateway forwarded exempt traffic"
    );
    assert!(gateway_flows(lab, p0, p2, udp).is_empty());
    assert!(gateway_flows(lab, p2, p0, udp).is_empty());
    let udp_bytes = datagrams * (ip_header(family) + 8 + UDP_PAYLOAD as u64);
    // The request matches the exemption on its destination, the reply on its source.
    for (src, dst) in [(client, server), (server, client)] {
        let record = flow_record(&node, udp, socket(src), socket(dst)).unwrap();
        assert_eq!(path(&record), "exempt", "{record}");
        assert_eq!(count(&record, "packets_sent"), datagrams, "{record}");
        assert_eq!(count(&record, "bytes_sent"), udp_bytes, "{record}");
        assert_eq!(count(&record, "returned_packets"), 0, "{record}");
    }

    // Other traffic to pod 2 is not exempt.
    let tcp = protocol_number("tcp", family);
    let (client, server) = tcp_echo(lab, 0, 2, family, WORKS).unwrap();
    gateway_flow(lab, tcp, client, server).unwrap();
    let record = flow_record(&node, tcp, socket(client), socket(server)).unwrap();
    assert_eq!(path(&record), "via_gateway", "{record}");
    let (client, server) = udp_echo(lab, 0, 2, 5354, family, 1, WORKS).unwrap();
    gateway_flow(lab, udp, client, server).unwrap();

    node.cli_ok(&["exempt", "remove", &rule]).unwrap();
    let (client, server) = udp_echo(lab, 0, 2, 5353, family, 1, WORKS).unwrap();
    gateway_flow(lab, udp, client, server).unwrap();
    let record = flow_record(&node, udp, socket(client), socket(server)).unwrap();
    assert_eq!(path(&record), "via_gateway", "{record}");
}

/// Node -> Pod and Pod -> node (the node's uplink address, the Pods' gateway address)
/// work and never reach the gateway.
pub(crate) fn node_and_pod_traffic_stays_local(family: IpFamily) {
    let node = started_node("local", family);
    let lab = &node.lab;
    let p1 = lab.pod_ip(1, family);
    let node_ip = Lab::node_ip(family);
    let forwarded = lab.gateway_forwarded_packets().unwrap();
    let delivered = counter(&node, "uplink_ingress", "delivered_from_gateway");
    let redirected = counter(&node, "pod_egress", "redirected_to_gateway");
    let gateway_bound = gateway_bound_flows(&node, p1);

    lab.node().ping(p1, 3).unwrap();
    lab.pod_ns(1).ping(node_ip, 3).unwrap();
    // The Pods' gateway: 10.52.0.1, or fe80::1 on the Pod's eth0 (link-local needs the
    // interface, which the ping helper cannot pass).
    match family {
        IpFamily::V4 => lab.pod_ns(1).ping(POD_GATEWAY_V4, 3).unwrap(),
        IpFamily::V6 => {
            let dst = format!("{POD_GATEWAY_V6}%{POD_IFNAME}");
            lab.pod_ns(1)
                .run(
                    "ping",
                    ["-n", "-q", "-c", "3", "-i", "0.2", "-W", "2", &dst],
                )
                .unwrap();
        }
    }
    // TCP both ways: a server on the node's uplink address, and one on the Pod.
    let server = TcpServer::start(
        lab.node(),
        SocketAddr::new(node_ip, 0),
        1,
        Reply::Echo,
        WORKS,
    )
    .unwrap();
    let reply = lab
        .pod_ns(1)
        .tcp_request(server.local_addr(), b"to the node", WORKS)
        .unwrap();
    assert_eq!(reply, b"to the node");
    server.join().unwrap();
    let server =
        TcpServer::start(lab.pod_ns(1), SocketAddr::new(p1, 0), 1, Reply::Echo, WORKS).unwrap();
    let reply = lab
        .node()
        .tcp_request(server.local_addr(), b"from the node", WORKS)
        .unwrap();
    assert_eq!(reply, b"from the node");
    server.join().unwrap();

    assert_eq!(
        lab.gateway_forwarded_packets().unwrap(),
        forwarded,
        "node <-> Pod traffic was forwarded by the gateway"
    );
    let seen = lab.gateway_flows().unwrap();
    assert!(seen.is_empty(), "the gateway saw: {seen:#?}");
    assert_eq!(
        counter(&node, "pod_egress", "redirected_to_gateway"),
        redirected
    );
    assert_eq!(
        counter(&node, "uplink_ingress", "delivered_from_gateway"),
        delivered
    );
    // Pod -> node uplink address: recorded as a flow that left the node's Pods (the
    // echo requests; with IPv6 the node's own pings come from its uplink address too, so
    // their replies are flows of pod 1 as well).
    let icmp = protocol_number("icmp", family);
    let (request_type, _) = echo_types(family);
    let to_node = flow_record(&node, icmp, (p1, None), (node_ip, Some(request_type))).unwrap();
    assert_eq!(path(&to_node), "not_same_node", "{to_node}");
    assert_eq!(count(&to_node, "packets_sent"), 3, "{to_node}");
    assert_eq!(count(&to_node, "returned_packets"), 0, "{to_node}");
    // Nothing involving pod 1 took the gateway but the warm-up's TCP.
    assert_eq!(
        gateway_bound_flows(&node, p1),
        gateway_bound,
        "new flows via the gateway"
    );
}

/// The flows involving `ip` that took the gateway: (connection, packets sent).
pub(crate) fn gateway_bound_flows(node: &Node, ip: IpAddr) -> BTreeSet<(String, u64)> {
    flow_records(node, &[format!("ip={ip}"), "path=via_gateway".into()])
        .iter()
        .map(|r| (r["connection"].to_string(), count(r, "packets_sent")))
        .collect()
}
