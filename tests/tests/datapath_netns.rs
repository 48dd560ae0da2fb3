//! The datapath end to end on a veth/netns lab node: the real `visibility` daemon attached
//! to three ptp Pods ([`visibility_tests::node::Node`]), real TCP, UDP and ICMP between
//! them, and the gateway namespace (the VPC) as the witness: its conntrack flow log, its
//! forwarded-packet counter and its firewall (`Lab::block`).
//!
//! **These tests need root** (network namespaces, veths, nftables, bpffs and BPF), the
//! `visibility` binary built (`cargo build -p visibility-userspace`), iproute2, nftables,
//! conntrack-tools, util-linux `nsenter` and iputils `ping`.
//!
//! Every scenario is a function of the address family; [`per_family!`] turns each into
//! one test per family (`ipv4::NAME`, `ipv6::NAME`). Every test builds its own lab (unique
//! namespaces) and daemon (unique bpffs pin directory), which the fixtures remove on
//! drop, so the tests run in parallel.
//!
//! The lab's node has strict rp_filter (as on Container-Optimized OS) unless a test says
//! otherwise: IPv4 packets that come back from the gateway on the uplink carry Pod source
//! addresses, which the node routes to Pod veths, so the kernel would drop them; the
//! datapath must deliver them itself (`uplink_ingress` / `delivered_from_gateway`).
//!
//! Run: `cargo build -p visibility-userspace && cargo test -p visibility-tests --test datapath_netns`

use std::collections::BTreeSet;
use std::net::{IpAddr, SocketAddr};
use std::time::{Duration, Instant};

use anyhow::{Context as _, Result, bail, ensure};
use serde_json::Value;
use visibility_tests::datapath_harness::GatewayRouter;
use visibility_tests::lab::{
    Flow, IpFamily, Lab, NODE_UPLINK, POD_GATEWAY_V4, POD_GATEWAY_V6, POD_IFNAME, Reply, TcpServer,
    UdpServer, udp_recv,
};
use visibility_tests::node::Node;
use visibility_tests::require_root;

/// Timeout of exchanges that must work. Generous enough for a loaded CI machine; a
/// working exchange takes milliseconds.
const WORKS: Duration = Duration::from_secs(3);
/// Timeout of exchanges that must fail: a short wait keeps failing cases fast.
const BLOCKED: Duration = Duration::from_millis(800);
/// Ping's default payload: 56 bytes after the 8-byte ICMP header.
const PING_PAYLOAD: u64 = 56;
/// UDP payload of the counted exchanges.
const UDP_PAYLOAD: usize = 100;

/// One `#[test]` per address family for each scenario `fn NAME(family: IpFamily)`.
/// Attributes before a name (e.g. `#[ignore = "..."]`) apply to both families.
macro_rules! per_family {
    ($($(#[$meta:meta])* $name:ident;)+) => {
        mod ipv4 {
            $( $(#[$meta])* #[test] fn $name() { super::$name(super::IpFamily::V4) } )+
        }
        mod ipv6 {
            $( $(#[$meta])* #[test] fn $name() { super::$name(super::IpFamily::V6) } )+
        }
    };
}

per_family! {
    pod_to_pod_goes_through_the_gateway_and_is_counted;
    gateway_firewall_blocks_one_pod_pair;
    disable_keeps_traffic_local_and_enable_restores_it;
    exempt_range_stays_on_the_node;
    node_and_pod_traffic_stays_local;
    an_offloaded_gateway_routes_ahead_of_its_stack;
}

// ---------------------------------------------------------------------------------------
// Fixture
// ---------------------------------------------------------------------------------------

fn family_tag(family: IpFamily) -> &'static str {
    match family {
        IpFamily::V4 => "4",
        IpFamily::V6 => "6",
    }
}

/// A 3-Pod node whose daemon runs and is attached, warmed up and with an empty gateway
/// flow log. `tag` is unique per test (the family is appended).
fn started_node(tag: &str, family: IpFamily) -> Node {
    require_root();
    let mut node = Node::new(&format!("dn{tag}{}", family_tag(family)), 3).expect("lab node");
    node.start().expect("starting the daemon");
    warm_up(&node.lab, family);
    node.lab.flush_gateway_flows().unwrap();
    node
}

/// Resolves every neighbour entry the Pod-to-Pod paths need (each Pod's entry for its
/// gateway, the node's for the gateway, the gateway's for the node, the node's for each
/// Pod), so that the measured exchanges afterwards neither wait for resolution nor depend
/// on the kernel's queue of unresolved packets. It uses TCP, whose SYN retransmission
/// already covers a first packet lost during resolution, so no ping needs a retry; and it
/// adds no ICMP or UDP flows, so those flows' counts stay exact.
fn warm_up(lab: &Lab, family: IpFamily) {
    for (from, to) in [(0, 1), (0, 2)] {
        tcp_echo(lab, from, to, family, WORKS)
            .with_context(|| format!("warm-up TCP pod {from} -> pod {to} ({family:?})"))
            .unwrap();
    }
}

// ---------------------------------------------------------------------------------------
// Traffic helpers
// ---------------------------------------------------------------------------------------

/// A TCP request/response from Pod `from` to a fresh echo server on Pod `to`. Checks the
/// echo and that the server saw the client's own address; returns (client, server).
fn tcp_echo(
    lab: &Lab,
    from: usize,
    to: usize,
    family: IpFamily,
    timeout: Duration,
) -> Result<(SocketAddr, SocketAddr)> {
    let server = TcpServer::start(
        lab.pod_ns(to),
        SocketAddr::new(lab.pod_ip(to, family), 0),
        1,
        Reply::Echo,
        timeout,
    )?;
    let server_addr = server.local_addr();
    let request = format!("request from pod {from} to pod {to}").into_bytes();
    let reply = lab
        .pod_ns(from)
        .tcp_request(server_addr, &request, timeout)?;
    ensure!(reply == request, "TCP echo differs: {reply:?}");
    let received = server.join()?;
    ensure!(
        received.len() == 1,
        "server saw {} connections",
        received.len()
    );
    ensure!(
        received[0].data == request,
        "server got {:?}",
        received[0].data
    );
    let client = received[0].peer;
    ensure!(
        client.ip() == lab.pod_ip(from, family),
        "server saw client {client} (source address rewritten?)"
    );
    Ok((client, server_addr))
}

/// `count` UDP request/responses of `UDP_PAYLOAD` bytes, one after the other, from one
/// socket on Pod `from` to an echo server on Pod `to` port `port` (0: any). Returns
/// (client, server).
fn udp_echo(
    lab: &Lab,
    from: usize,
    to: usize,
    port: u16,
    family: IpFamily,
    count: usize,
    timeout: Duration,
) -> Result<(SocketAddr, SocketAddr)> {
    let server = UdpServer::start(
        lab.pod_ns(to),
        SocketAddr::new(lab.pod_ip(to, family), port),
        count,
        Reply::Echo,
        timeout,
    )?;
    let server_addr = server.local_addr();
    let any = SocketAddr::new(unspecified(family), 0);
    let socket = lab.pod_ns(from).udp_bind(any)?;
    socket.connect(server_addr)?;
    for i in 0..count {
        let payload = vec![i as u8; UDP_PAYLOAD];
        socket.send(&payload)?;
        let (reply, peer) = udp_recv(&socket, timeout)
            .with_context(|| format!("UDP datagram {i} to {server_addr}"))?;
        ensure!(
            peer == server_addr && reply == payload,
            "bad echo from {peer}"
        );
    }
    let received = server.join()?;
    let client = socket.local_addr()?;
    ensure!(
        received.iter().all(|r| r.peer == client),
        "server saw other peers than {client}: {received:?}"
    );
    Ok((client, server_addr))
}

fn unspecified(family: IpFamily) -> IpAddr {
    match family {
        IpFamily::V4 => std::net::Ipv4Addr::UNSPECIFIED.into(),
        IpFamily::V6 => std::net::Ipv6Addr::UNSPECIFIED.into(),
    }
}

/// Ping, TCP and UDP from Pod `from` to Pod `to` all work.
fn assert_pair_works(lab: &Lab, from: usize, to: usize, family: IpFamily) {
    let what = format!("pod {from} -> pod {to} ({family:?})");
    lab.pod_ns(from)
        .ping(lab.pod_ip(to, family), 2)
        .unwrap_or_else(|e| panic!("ping {what}: {e:#}"));
    tcp_echo(lab, from, to, family, WORKS).unwrap_or_else(|e| panic!("TCP {what}: {e:#}"));
    udp_echo(lab, from, to, 0, family, 1, WORKS).unwrap_or_else(|e| panic!("UDP {what}: {e:#}"));
}

/// Ping, TCP connect and a UDP request from Pod `from` to Pod `to` all fail within a
/// short timeout (servers are listening, so only the network can be in the way).
fn assert_pair_blocked(lab: &Lab, from: usize, to: usize, family: IpFamily) {
    let what = format!("pod {from} -> pod {to} ({family:?})");
    let dst = lab.pod_ip(to, family);
    assert!(
        !lab.pod_ns(from).ping_once(dst, BLOCKED),
        "ping {what} got through"
    );
    // A listener that never accepts: the kernel completes handshakes into its backlog.
    let listener = lab.pod_ns(to).tcp_listen(SocketAddr::new(dst, 0)).unwrap();
    let addr = listener.local_addr().unwrap();
    assert!(
        lab.pod_ns(from).tcp_connect(addr, BLOCKED).is_err(),
        "TCP connect {what} got through"
    );
    let server = UdpServer::start(
        lab.pod_ns(to),
        SocketAddr::new(dst, 0),
        1,
        Reply::Echo,
        WORKS,
    )
    .unwrap();
    assert!(
        lab.pod_ns(from)
            .udp_request(server.local_addr(), b"blocked?", BLOCKED)
            .is_err(),
        "UDP {what} got through"
    );
}

/// Polls `check` until it succeeds or `timeout` passes; returns its last error.
fn eventually<T>(timeout: Duration, mut check: impl FnMut() -> Result<T>) -> Result<T> {
    let deadline = Instant::now() + timeout;
    loop {
        match check() {
            Ok(value) => return Ok(value),
            Err(e) if Instant::now() >= deadline => return Err(e),
            Err(_) => std::thread::sleep(Duration::from_millis(50)),
        }
    }
}

// ---------------------------------------------------------------------------------------
// Gateway and flow map helpers
// ---------------------------------------------------------------------------------------

fn protocol_number(protocol: &str, family: IpFamily) -> u8 {
    match (protocol, family) {
        ("tcp", _) => 6,
        ("udp", _) => 17,
        ("icmp", IpFamily::V4) => 1,
        ("icmp", IpFamily::V6) => 58,
        _ => panic!("unknown protocol {protocol}"),
    }
}

/// IP header length of `family` (no options or extension headers in these tests).
fn ip_header(family: IpFamily) -> u64 {
    match family {
        IpFamily::V4 => 20,
        IpFamily::V6 => 40,
    }
}

/// The gateway's flows from `src` to `dst` (original direction) of `protocol`.
fn gateway_flows(lab: &Lab, src: IpAddr, dst: IpAddr, protocol: u8) -> Vec<Flow> {
    lab.gateway_flows()
        .unwrap()
        .into_iter()
        .filter(|f| f.is_between(src, dst) && f.protocol_number == protocol)
        .collect()
}

/// The one gateway flow with this 5-tuple.
fn gateway_flow(lab: &Lab, protocol: u8, client: SocketAddr, server: SocketAddr) -> Result<Flow> {
    let all = lab.gateway_flows()?;
    let found: Vec<&Flow> = all
        .iter()
        .filter(|f| {
            f.protocol_number == protocol
                && f.is_between(client.ip(), server.ip())
                && f.sport == Some(client.port())
                && f.dport == Some(server.port())
        })
        .collect();
    match found[..] {
        [flow] => Ok(flow.clone()),
        _ => bail!("want one gateway flow {client} -> {server} ({protocol}), have: {all:#?}"),
    }
}

/// Flow-map records (`visibility flows --json`) matching `filters` (KEY=VALUE).
fn flow_records(node: &Node, filters: &[String]) -> Vec<Value> {
    let filters: Vec<&str> = filters.iter().map(String::as_str).collect();
    node.flows(&filters).unwrap()
}

/// The one flow-map record from `src` to `dst` of `protocol` with these ports (`None`:
/// any).
fn flow_record(
    node: &Node,
    protocol: u8,
    src: (IpAddr, Option<u16>),
    dst: (IpAddr, Option<u16>),
) -> Result<Value> {
    let mut filters = vec![
        format!("src={}", src.0),
        format!("dst={}", dst.0),
        format!("proto={protocol}"),
    ];
    filters.extend(src.1.map(|p| format!("sport={p}")));
    filters.extend(dst.1.map(|p| format!("dport={p}")));
    match &flow_records(node, &filters)[..] {
        [record] => Ok(record.clone()),
        other => bail!(
            "want one flow record for {filters:?}, have {other:#?}; all flows:\n{}",
            node.cli_ok(&["flows"]).unwrap_or_default()
        ),
    }
}

/// A count field of a flow record: VPC flow logs write int64 values as strings.
fn count(record: &Value, field: &str) -> u64 {
    record[field]
        .as_str()
        .unwrap_or_else(|| panic!("{field} is not a string in {record}"))
        .parse()
        .unwrap_or_else(|e| panic!("{field} in {record}: {e}"))
}

/// The flow map's "destination port" of ICMP echo requests and replies: `type << 8 | code`.
fn echo_types(family: IpFamily) -> (u16, u16) {
    match family {
        IpFamily::V4 => (8 << 8, 0),
        IpFamily::V6 => (128 << 8, 129 << 8),
    }
}

fn path(record: &Value) -> &str {
    record["path"].as_str().unwrap_or("(none)")
}

/// The pod_ingress / pod_egress / uplink_ingress counter's packets.
fn counter(node: &Node, hook: &str, name: &str) -> u64 {
    node.counter(hook, name).unwrap()
}

fn socket(addr: SocketAddr) -> (IpAddr, Option<u16>) {
    (addr.ip(), Some(addr.port()))
}

// ---------------------------------------------------------------------------------------
// Scenarios
// ---------------------------------------------------------------------------------------

/// With visibility on, ICMP, UDP and TCP between two Pods work, cross the gateway (its
/// conntrack flow log counts exactly what was sent, both ways) and land in the flow map
/// with the same counts, all under strict rp_filter.
fn pod_to_pod_goes_through_the_gateway_and_is_counted(family: IpFamily) {
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
fn gateway_firewall_blocks_one_pod_pair(family: IpFamily) {
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

/// `visibility disable` keeps Pod-to-Pod traffic on the node: it works, and the gateway
/// forwards none of it. `enable` sends it through the gateway again, without a restart.
fn disable_keeps_traffic_local_and_enable_restores_it(family: IpFamily) {
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
fn exempt_range_stays_on_the_node(family: IpFamily) {
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
fn node_and_pod_traffic_stays_local(family: IpFamily) {
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
fn gateway_bound_flows(node: &Node, ip: IpAddr) -> BTreeSet<(String, u64)> {
    flow_records(node, &[format!("ip={ip}"), "path=via_gateway".into()])
        .iter()
        .map(|r| (r["connection"].to_string(), count(r, "packets_sent")))
        .collect()
}

/// Loose rp_filter (rp_filter=2, what `LabConfig { strict_rp_filter: false, .. }` sets)
/// works too. One smoke case over both families: the `Node` fixture always builds its
/// lab with `LabConfig::default()`, so this sets the same three sysctls that
/// `Lab::setup` writes for loose mode before the daemon starts.
#[test]
fn loose_rp_filter_smoke() {
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
fn an_offloaded_gateway_routes_ahead_of_its_stack(family: IpFamily) {
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
