//! The netd baseline ([`visibility_tests::netd`]): with netd's policy routing on, the
//! gateway sees Pod-to-Pod traffic; with it off (before, and again after), it does not,
//! and disabling leaves the node as it was.
//!
//! **Needs root** (network namespaces, veths, nftables) and iputils `ping`.
//!
//! Run: `AYA_BUILD_SKIP=1 cargo test -p visibility-tests --test netd`

use std::net::SocketAddr;

use visibility_tests::require_root;
use visibility_tests::{
    lab::{DEFAULT_TIMEOUT, Lab, LabConfig, NODE_UPLINK, Reply, TcpServer, UdpServer},
    netd::{Netd, NetdConfig},
};

/// Pings, a UDP echo and a TCP request from Pod 0 to Pod 1 (IPv4); returns whether the
/// gateway's flow log has Pod 0 ↔ Pod 1 flows, and how many packets it forwarded.
fn exchange(lab: &Lab) -> (bool, u64) {
    lab.flush_gateway_flows().unwrap();
    let forwarded_before = lab.gateway_forwarded_packets().unwrap();
    let (a, b) = (lab.pod_ipv4(0), lab.pod_ipv4(1));
    lab.pod_ns(0).ping(b, 2).unwrap();

    let udp = UdpServer::start(
        lab.pod_ns(1),
        SocketAddr::new(b.into(), 0),
        1,
        Reply::Echo,
        DEFAULT_TIMEOUT,
    )
    .unwrap();
    let reply = lab
        .pod_ns(0)
        .udp_request(udp.local_addr(), b"netd", DEFAULT_TIMEOUT)
        .unwrap();
    assert_eq!(reply, b"netd");
    udp.join().unwrap();

    let tcp = TcpServer::start(
        lab.pod_ns(1),
        SocketAddr::new(b.into(), 0),
        1,
        Reply::Fixed(b"pong".to_vec()),
        DEFAULT_TIMEOUT,
    )
    .unwrap();
    let reply = lab
        .pod_ns(0)
        .tcp_request(tcp.local_addr(), b"ping", DEFAULT_TIMEOUT)
        .unwrap();
    assert_eq!(reply, b"pong");
    let received = tcp.join().unwrap();
    assert_eq!(received[0].peer.ip(), a, "the server sees the real client");

    let flows = lab.gateway_flows().unwrap();
    let seen = flows
        .iter()
        .any(|f| f.is_between(a, b) || f.is_between(b, a));
    let forwarded = lab.gateway_forwarded_packets().unwrap() - forwarded_before;
    (seen, forwarded)
}

#[test]
fn netd_sends_pod_to_pod_traffic_through_the_gateway_and_off_does_not() {
    require_root();
    let lab = Lab::new("netd", LabConfig::default()).expect("building the lab");
    let node = lab.node();
    let rules_before = Netd::rules_in(node).unwrap();
    let rp_filter_key = format!("net.ipv4.conf.{NODE_UPLINK}.rp_filter");
    let rp_filter_before = node.sysctl_get(&rp_filter_key).unwrap();
    let src_valid_mark_before = node.sysctl_get("net.ipv4.conf.all.src_valid_mark").unwrap();

    let (seen, forwarded) = exchange(&lab);
    assert!(!seen, "off: the gateway saw Pod-to-Pod flows");
    assert_eq!(forwarded, 0, "off: the gateway forwarded packets");

    let netd = Netd::enable(&lab).unwrap();
    assert_eq!(
        netd.config(),
        &NetdConfig::for_lab(),
        "discovered as netd does"
    );
    let rules = Netd::rules_in(node).unwrap();
    for wanted in [
        "70:\tfrom all to 127.0.0.0/8 lookup local",
        "70:\tfrom all to 169.254.0.0/16 lookup local",
        "70:\tfrom all to 10.128.0.2 lookup local",
        "70:\tfrom all to 10.52.0.1 lookup local",
        "74:\tfrom all fwmark 0x4000/0x4000 lookup main",
        "75:\tfrom all iif lo lookup main",
        "76:\tnot from all iif eth0 lookup 1",
    ] {
        assert!(
            rules.iter().any(|r| r == wanted),
            "no `{wanted}` in {rules:#?}"
        );
    }
    assert_eq!(node.sysctl_get(&rp_filter_key).unwrap(), "2");
    assert_eq!(
        node.sysctl_get("net.ipv4.conf.all.src_valid_mark").unwrap(),
        "1"
    );
    assert!(
        Netd::enable(&lab).is_err(),
        "a second netd on the same node is refused"
    );

    let (seen, forwarded) = exchange(&lab);
    assert!(seen, "netd: the gateway did not see Pod-to-Pod flows");
    assert!(
        forwarded >= 8,
        "netd: the gateway forwarded only {forwarded} packets"
    );
    // Host-originated traffic stays on the node (rule 75), and Pods reach the node.
    node.ping(lab.pod_ipv4(1), 1).unwrap();
    lab.pod_ns(0)
        .ping(visibility_tests::lab::NODE_IPV4, 1)
        .unwrap();

    netd.disable().unwrap();
    assert_eq!(Netd::rules_in(node).unwrap(), rules_before);
    assert!(
        !node
            .run("ip", ["-4", "route", "show", "table", "1"])
            .unwrap_or_default()
            .contains("default"),
        "table 1 is empty again"
    );
    assert_eq!(node.sysctl_get(&rp_filter_key).unwrap(), rp_filter_before);
    assert_eq!(
        node.sysctl_get("net.ipv4.conf.all.src_valid_mark").unwrap(),
        src_valid_mark_before
    );

    let (seen, forwarded) = exchange(&lab);
    assert!(!seen, "off again: the gateway saw Pod-to-Pod flows");
    assert_eq!(forwarded, 0, "off again: the gateway forwarded packets");
}
