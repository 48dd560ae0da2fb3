//! Pod-to-Pod traffic through the gateway: counted the same at the gateway and in the
//! flow map, blocked by the gateway's firewall, under loose rp_filter, and through an
//! offloaded gateway.

use std::time::Duration;

use anyhow::ensure;
use visibility_tests::datapath_harness::GatewayRouter;
use visibility_tests::lab::{IpFamily, NODE_UPLINK};
use visibility_tests::node::Node;
use visibility_tests::require_root;

use crate::common::*;

/// With visibility on, ICMP, UDP and TCP between two Pods work, cross the gateway (its
/// conntrack flow log counts exactly what was sent, both ways) and land in the flow map
/// with the same counts, all under strict rp_filter.
pub(crate) fn pod_to_pod_goes_through_the_gateway_and_is_counted(family: IpFamily) {
    let node = started_node("count", family);
    let lab = &node.lab;
    assert_eq!(
        lab.node()
            .sysctl_get(&format!("net.ipv4.conf.{NODE_UPLINK}.rp_filter"))
            .unwrap(),
        "1",
        "the lab default is strict rp_filter"
    );
    let (p0, p1) = (lab.pod_ip(0, family), lab.pod_ip(1, family));
    let delivered_before = counter(&node, "uplink_ingress", "delivered_from_gateway");

    // ICMP: 5 echo requests, 5 replies.
    let icmp = protocol_number("icmp", family);
    let pings = 5u64;
    lab.pod_ns(0).ping(p1, pings as u32).unwrap();
    let ping_bytes = pings * (ip_header(family) + 8 + PING_PAYLOAD);
    let flows = gateway_flows(lab, p0, p1, icmp);
    assert_eq!(flows.len(), 1, "one ICMP flow at the gateway: {flows:#?}");
    assert_eq!(
        (flows[0].packets, flows[0].reply_packets),
        (pings, pings),
        "the gateway saw every echo request and reply: {flows:#?}"
    );
    assert_eq!(
        (flows[0].bytes, flows[0].reply_bytes),
        (ping_bytes, ping_bytes)
    );

    // The flow map keys ICMP by (echo id, type << 8 | code): request and reply are two
    // flows with the same id.
    let (request_type, reply_type) = echo_types(family);
    let request = flow_record(&node, icmp, (p0, None), (p1, Some(request_type))).unwrap();
    let reply = flow_record(&node, icmp, (p1, None), (p0, Some(reply_type))).unwrap();
    assert_eq!(
        request["connection"]["src_port"], reply["connection"]["src_port"],
        "request and reply share the echo id"
    );
    for record in [&request, &reply] {
        assert_eq!(path(record), "via_gateway", "{record}");
        assert_eq!(count(record, "packets_sent"), pings, "{record}");
        assert_eq!(count(record, "returned_packets"), pings, "{record}");
        assert_eq!(count(record, "bytes_sent"), ping_bytes, "{record}");
        assert_eq!(count(record, "returned_bytes"), ping_bytes, "{record}");
        assert_eq!(record["connection"]["protocol"], u64::from(icmp));
    }

    // UDP: N datagrams of a known size, each echoed.
    let udp = protocol_number("udp", family);
    let datagrams = 4u64;
    let (client, server) = udp_echo(lab, 0, 1, 0, family, datagrams as usize, WORKS).unwrap();
    let udp_bytes = datagrams * (ip_header(family) + 8 + UDP_PAYLOAD as u64);
    let flow = gateway_flow(lab, udp, client, server).unwrap();
    assert_eq!(
        (
            flow.packets,
            flow.bytes,
            flow.reply_packets,
            flow.reply_bytes
        ),
        (datagrams, udp_bytes, datagrams, udp_bytes),
        "the gateway saw every datagram: {flow:?}"
    );
    let sent = flow_record(&node, udp, socket(client), socket(server)).unwrap();
    let echoed = flow_record(&node, udp, socket(server), socket(client)).unwrap();
    for record in [&sent, &echoed] {
        assert_eq!(path(record), "via_gateway", "{record}");
        assert_eq!(count(record, "packets_sent"), datagrams, "{record}");
        assert_eq!(count(record, "bytes_sent"), udp_bytes, "{record}");
        assert_eq!(count(record, "returned_packets"), datagrams, "{record}");
        assert_eq!(count(record, "returned_bytes"), udp_bytes, "{record}");
    }
    assert_eq!(sent["connection"]["src_ip"], p0.to_string());
    assert_eq!(sent["connection"]["dest_port"], server.port());

    // TCP: a request/response. Segment counts depend on the stacks; what matters is that
    // the flow map and the gateway agree, and that every segment came back. The last ACK
    // may still be on its way when the client returns, hence `eventually`.
    let tcp = protocol_number("tcp", family);
    let (client, server) = tcp_echo(lab, 0, 1, family, WORKS).unwrap();
    eventually(Duration::from_secs(2), || {
        let flow = gateway_flow(lab, tcp, client, server)?;
        let sent = flow_record(&node, tcp, socket(client), socket(server))?;
        let answered = flow_record(&node, tcp, socket(server), socket(client))?;
        ensure!(
            flow.packets >= 4,
            "a TCP exchange is at least 4 segments: {flow:?}"
        );
        for (record, packets, bytes) in [
            (&sent, flow.packets, flow.bytes),
            (&answered, flow.reply_packets, flow.reply_bytes),
        ] {
            ensure!(path(record) == "via_gateway", "path: {record}");
            ensure!(
                (count(record, "packets_sent"), count(record, "bytes_sent")) == (packets, bytes),
                "flow map and gateway disagree: {record} vs {flow:?}"
            );
            ensure!(
                count(record, "returned_packets") == packets,
                "not every segment came back: {record}"
            );
        }
        let flags = &sent["tcp_flags"];
        for flag in ["SYN", "ACK", "FIN"] {
            ensure!(
                flags
                    .as_array()
                    .is_some_and(|f| f.iter().any(|x| x == flag)),
                "{flag} missing in {sent}"
            );
        }
        Ok(())
    })
    .unwrap();

    // Strict rp_filter did not get in the way: the datapath, not the kernel's routing,
    // delivered what came back from the gateway.
    let delivered = counter(&node, "uplink_ingress", "delivered_from_gateway") - delivered_before;
    assert!(
        delivered >= 2 * pings + 2 * datagrams,
        "only {delivered} packets delivered from the gateway"
    );
}

/// A gateway firewall rule that drops one Pod pair's traffic (one direction) stops that
/// pair, both ways round, and nothing else; removing it restores the pair.
pub(crate) fn gateway_firewall_blocks_one_pod_pair(family: IpFamily) {
    let node = started_node("block", family);
    let lab = &node.lab;
    let (p0, p1) = (lab.pod_ip(0, family), lab.pod_ip(1, family));

    lab.block(p0, p1).unwrap();
    let dropped_before = lab.gateway_dropped_packets().unwrap();
    assert_pair_blocked(lab, 0, 1, family);
    // The rule drops pod 0 -> pod 1 only, which are pod 1's replies here.
    assert_pair_blocked(lab, 1, 0, family);
    assert!(
        lab.gateway_dropped_packets().unwrap() > dropped_before,
        "the gateway's rule dropped nothing"
    );
    // Other pairs, pod 0 included, go on.
    assert_pair_works(lab, 0, 2, family);
    assert_pair_works(lab, 2, 1, family);

    lab.unblock(p0, p1).unwrap();
    lab.flush_gateway_flows().unwrap();
    assert_pair_works(lab, 0, 1, family);
    assert_pair_works(lab, 1, 0, family);
    assert!(
        !gateway_flows(lab, p0, p1, protocol_number("tcp", family)).is_empty(),
        "after unblock the pair goes through the gateway again"
    );
}

/// Loose rp_filter (rp_filter=2, what `LabConfig { strict_rp_filter: false, .. }` sets)
/// works too. One smoke case over both families: the `Node` fixture always builds its
/// lab with `LabConfig::default()`, so this sets the same three sysctls that
/// `Lab::setup` writes for loose mode before the daemon starts.
#[test]
pub(crate) fn loose_rp_filter_smoke() {
    require_root();
    let mut node = Node::new("dnloose", 3).expect("lab node");
    let lab = &node.lab;
    let key = |dev: &str| format!("net.ipv4.conf.{dev}.rp_filter");
    let keys = [key("all"), key("default"), key(NODE_UPLINK)];
    let settings: Vec<(&str, &str)> = keys.iter().map(|k| (k.as_str(), "2")).collect();
    lab.node().sysctl(&settings).unwrap();
    node.start().expect("starting the daemon");
    let lab = &node.lab;
    assert_eq!(lab.node().sysctl_get(&key(NODE_UPLINK)).unwrap(), "2");
    for family in [IpFamily::V4, IpFamily::V6] {
        warm_up(lab, family);
        lab.flush_gateway_flows().unwrap();
        assert_pair_works(lab, 0, 1, family);
        let (p0, p1) = (lab.pod_ip(0, family), lab.pod_ip(1, family));
        for protocol in ["icmp", "tcp", "udp"] {
            let number = protocol_number(protocol, family);
            assert!(
                !gateway_flows(lab, p0, p1, number).is_empty(),
                "no {protocol} flow {p0} -> {p1} at the gateway"
            );
        }
    }
    assert!(counter(&node, "uplink_ingress", "delivered_from_gateway") > 0);
}

/// The benchmark's offloaded gateway ([`GatewayRouter`]): Pod-to-Pod traffic still takes
/// the gateway, which sends it back, but the gateway's IP stack (whose nftables forward
/// chain counts every packet it forwards) sees none of it.
pub(crate) fn an_offloaded_gateway_routes_ahead_of_its_stack(family: IpFamily) {
    let node = started_node("offload", family);
    let lab = &node.lab;
    let router = GatewayRouter::attach(lab).unwrap();
    let (stack_before, sent_before) = (
        lab.gateway_forwarded_packets().unwrap(),
        lab.gateway_transmitted_packets().unwrap(),
    );
    let exchanges = 3;
    for _ in 0..exchanges {
        tcp_echo(lab, 0, 1, family, WORKS).unwrap();
    }
    let through_stack = lab.gateway_forwarded_packets().unwrap() - stack_before;
    let sent_back = lab.gateway_transmitted_packets().unwrap() - sent_before;
    assert_eq!(through_stack, 0, "the gateway's stack forwarded packets");
    // Each exchange: handshake, request, reply and close, both ways through the gateway.
    assert!(
        sent_back >= 6 * exchanges,
        "the gateway sent back only {sent_back} packets"
    );

    // Without the router the gateway's stack forwards again.
    drop(router);
    tcp_echo(lab, 0, 1, family, WORKS).unwrap();
    assert!(lab.gateway_forwarded_packets().unwrap() > stack_before);
}
