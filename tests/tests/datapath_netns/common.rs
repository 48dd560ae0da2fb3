//! What the end-to-end datapath tests share: a started node and its warm-up, TCP and UDP
//! exchanges between Pods that must work or fail, and reading the gateway's flow log, the
//! flow map and the counters.

use std::net::{IpAddr, SocketAddr};
use std::time::{Duration, Instant};

use anyhow::{Context as _, Result, bail, ensure};
use serde_json::Value;
use visibility_tests::lab::{Flow, IpFamily, Lab, Reply, TcpServer, UdpServer, udp_recv};
use visibility_tests::node::Node;
use visibility_tests::require_root;

/// Timeout of exchanges that must work. Generous enough for a loaded CI machine; a
/// working exchange takes milliseconds.
pub(crate) const WORKS: Duration = Duration::from_secs(3);

/// Timeout of exchanges that must fail: a short wait keeps failing cases fast.
pub(crate) const BLOCKED: Duration = Duration::from_millis(800);

/// Ping's default payload: 56 bytes after the 8-byte ICMP header.
pub(crate) const PING_PAYLOAD: u64 = 56;

/// UDP payload of the counted exchanges.
pub(crate) const UDP_PAYLOAD: usize = 100;

pub(crate) fn family_tag(family: IpFamily) -> &'static str {
    match family {
        IpFamily::V4 => "4",
        IpFamily::V6 => "6",
    }
}

/// A 3-Pod node whose daemon runs and is attached, warmed up and with an empty gateway
/// flow log. `tag` is unique per test (the family is appended).
pub(crate) fn started_node(tag: &str, family: IpFamily) -> Node {
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
pub(crate) fn warm_up(lab: &Lab, family: IpFamily) {
    for (from, to) in [(0, 1), (0, 2)] {
        tcp_echo(lab, from, to, family, WORKS)
            .with_context(|| format!("warm-up TCP pod {from} -> pod {to} ({family:?})"))
            .unwrap();
    }
}

/// A TCP request/response from Pod `from` to a fresh echo server on Pod `to`. Checks the
/// echo and that the server saw the client's own address; returns (client, server).
pub(crate) fn tcp_echo(
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
pub(crate) fn udp_echo(
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

pub(crate) fn unspecified(family: IpFamily) -> IpAddr {
    match family {
        IpFamily::V4 => std::net::Ipv4Addr::UNSPECIFIED.into(),
        IpFamily::V6 => std::net::Ipv6Addr::UNSPECIFIED.into(),
    }
}

/// Ping, TCP and UDP from Pod `from` to Pod `to` all work.
pub(crate) fn assert_pair_works(lab: &Lab, from: usize, to: usize, family: IpFamily) {
    let what = format!("pod {from} -> pod {to} ({family:?})");
    lab.pod_ns(from)
        .ping(lab.pod_ip(to, family), 2)
        .unwrap_or_else(|e| panic!("ping {what}: {e:#}"));
    tcp_echo(lab, from, to, family, WORKS).unwrap_or_else(|e| panic!("TCP {what}: {e:#}"));
    udp_echo(lab, from, to, 0, family, 1, WORKS).unwrap_or_else(|e| panic!("UDP {what}: {e:#}"));
}

/// Ping, TCP connect and a UDP request from Pod `from` to Pod `to` all fail within a
/// short timeout (servers are listening, so only the network can be in the way).
pub(crate) fn assert_pair_blocked(lab: &Lab, from: usize, to: usize, family: IpFamily) {
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
pub(crate) fn eventually<T>(timeout: Duration, mut check: impl FnMut() -> Result<T>) -> Result<T> {
    let deadline = Instant::now() + timeout;
    loop {
        match check() {
            Ok(value) => return Ok(value),
            Err(e) if Instant::now() >= deadline => return Err(e),
            Err(_) => std::thread::sleep(Duration::from_millis(50)),
        }
    }
}

pub(crate) fn protocol_number(protocol: &str, family: IpFamily) -> u8 {
    match (protocol, family) {
        ("tcp", _) => 6,
        ("udp", _) => 17,
        ("icmp", IpFamily::V4) => 1,
        ("icmp", IpFamily::V6) => 58,
        _ => panic!("unknown protocol {protocol}"),
    }
}

/// IP header length of `family` (no options or extension headers in these tests).
pub(crate) fn ip_header(family: IpFamily) -> u64 {
    match family {
        IpFamily::V4 => 20,
        IpFamily::V6 => 40,
    }
}

/// The gateway's flows from `src` to `dst` (original direction) of `protocol`.
pub(crate) fn gateway_flows(lab: &Lab, src: IpAddr, dst: IpAddr, protocol: u8) -> Vec<Flow> {
    lab.gateway_flows()
        .unwrap()
        .into_iter()
        .filter(|f| f.is_between(src, dst) && f.protocol_number == protocol)
        .collect()
}

/// The one gateway flow with this 5-tuple.
pub(crate) fn gateway_flow(
    lab: &Lab,
    protocol: u8,
    client: SocketAddr,
    server: SocketAddr,
) -> Result<Flow> {
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
pub(crate) fn flow_records(node: &Node, filters: &[String]) -> Vec<Value> {
    let filters: Vec<&str> = filters.iter().map(String::as_str).collect();
    node.flows(&filters).unwrap()
}

/// The one flow-map record from `src` to `dst` of `protocol` with these ports (`None`:
/// any).
pub(crate) fn flow_record(
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
pub(crate) fn count(record: &Value, field: &str) -> u64 {
    record[field]
        .as_str()
        .unwrap_or_else(|| panic!("{field} is not a string in {record}"))
        .parse()
        .unwrap_or_else(|e| panic!("{field} in {record}: {e}"))
}

/// The flow map's "destination port" of ICMP echo requests and replies: `type << 8 | code`.
pub(crate) fn echo_types(family: IpFamily) -> (u16, u16) {
    match family {
        IpFamily::V4 => (8 << 8, 0),
        IpFamily::V6 => (128 << 8, 129 << 8),
    }
}

pub(crate) fn path(record: &Value) -> &str {
    record["path"].as_str().unwrap_or("(none)")
}

/// The pod_ingress / pod_egress / uplink_ingress counter's packets.
pub(crate) fn counter(node: &Node, hook: &str, name: &str) -> u64 {
    node.counter(hook, name).unwrap()
}

pub(crate) fn socket(addr: SocketAddr) -> (IpAddr, Option<u16>) {
    (addr.ip(), Some(addr.port()))
}
