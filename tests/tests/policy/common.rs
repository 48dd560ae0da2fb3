//! What the policy tests share: a started lab node, exchanges between Pods that work or
//! not (TCP, UDP, pings of any size), sending from a borrowed address, and whether the
//! gateway saw a Pod pair.

use std::{
    net::{IpAddr, SocketAddr, UdpSocket},
    process::Output,
    time::Duration,
};

use visibility_common::counters::Counter;
use visibility_tests::require_root;
use visibility_tests::{
    lab::{IpFamily, Lab, Netns, Reply, TcpServer, UdpServer},
    node::Node,
};

/// Timeout of exchanges that must work.
pub(crate) const WORKS: Duration = Duration::from_secs(3);

/// Timeout of exchanges that must fail.
pub(crate) const BLOCKED: Duration = Duration::from_millis(800);

/// The port the policies protect.
pub(crate) const PORT: u16 = 8080;

/// A datagram and a ping payload that the Pod fragments (its MTU is 1500).
pub(crate) const FRAGMENTED: usize = 3000;

pub(crate) const FAMILIES: [IpFamily; 2] = [IpFamily::V4, IpFamily::V6];

pub(crate) fn tag(name: &str, family: IpFamily) -> String {
    format!(
        "{name}{}",
        match family {
            IpFamily::V4 => "4",
            IpFamily::V6 => "6",
        }
    )
}

/// A TCP request from Pod `from` to a server on Pod `to` port [`PORT`]: whether it
/// was answered within `timeout`.
pub(crate) fn tcp_works(
    lab: &Lab,
    from: usize,
    to: usize,
    family: IpFamily,
    timeout: Duration,
) -> bool {
    let addr = SocketAddr::new(lab.pod_ip(to, family), PORT);
    let Ok(server) = TcpServer::start(lab.pod_ns(to), addr, 1, Reply::Echo, timeout) else {
        return false;
    };
    let answered = lab
        .pod_ns(from)
        .tcp_request(addr, b"policy?", timeout)
        .is_ok_and(|reply| reply == b"policy?");
    drop(server);
    answered
}

/// A UDP datagram of `size` bytes from Pod `from` to an echo server on Pod `to`: whether
/// its echo came back within `timeout`.
pub(crate) fn udp_works(
    lab: &Lab,
    from: usize,
    to: usize,
    family: IpFamily,
    size: usize,
    timeout: Duration,
) -> bool {
    let addr = SocketAddr::new(lab.pod_ip(to, family), 9000);
    let Ok(server) = UdpServer::start(lab.pod_ns(to), addr, 1, Reply::Echo, timeout) else {
        return false;
    };
    let payload = vec![0x5a; size];
    let answered = lab
        .pod_ns(from)
        .udp_request(addr, &payload, timeout)
        .is_ok_and(|reply| reply == payload);
    drop(server);
    answered
}

/// One ping of `size` bytes of payload from Pod `from` to Pod `to`, with `options`
/// before the rest: what `ping` said.
pub(crate) fn ping(
    lab: &Lab,
    (from, to): (usize, usize),
    family: IpFamily,
    size: usize,
    options: &[&str],
) -> std::io::Result<Output> {
    let size = size.to_string();
    let to = lab.pod_ip(to, family).to_string();
    let mut args = options.to_vec();
    args.extend(["-c", "1", "-W", "1", "-s", &size, &to]);
    lab.pod_ns(from).cmd("ping", args).output()
}

/// One ping of `size` bytes of payload from Pod `from` to Pod `to`: whether it was
/// answered.
pub(crate) fn ping_works(lab: &Lab, from: usize, to: usize, family: IpFamily, size: usize) -> bool {
    ping(lab, (from, to), family, size, &[]).is_ok_and(|out| out.status.success())
}

/// Gives `ns` the address `addr` as one of its own, on `dev`, and sends a UDP datagram
/// from it to `dst` port 9000: how a spoofing Pod, or a sender on the network claiming
/// a Pod's address, would.
pub(crate) fn send_from_borrowed_address(
    ns: &Netns,
    dev: &str,
    addr: IpAddr,
    dst: IpAddr,
    payload: &[u8],
) {
    let with_prefix = format!("{addr}/{}", if addr.is_ipv4() { 32 } else { 128 });
    let mut add = vec!["addr", "add", with_prefix.as_str(), "dev", dev];
    if addr.is_ipv6() {
        add.push("nodad");
    }
    ns.run("ip", add).unwrap();
    ns.in_ns(|| {
        let socket = UdpSocket::bind(SocketAddr::new(addr, 0)).unwrap();
        socket.send_to(payload, SocketAddr::new(dst, 9000)).unwrap();
    })
    .unwrap();
}

/// A lab node of two Pods for `family`, its daemon started.
pub(crate) fn started(name: &str, family: IpFamily) -> Node {
    require_root();
    let mut node = Node::new(&tag(name, family), 2).expect("lab node");
    node.start().expect("starting the daemon");
    node
}

/// A datagram to Pod 1 port 9000 from `claimed`, an address `sender` borrows on `dev`
/// (see [`send_from_borrowed_address`]): how many datagrams Pod 1 got within `timeout`,
/// and by how much the daemon's `counter` at `hook` moved meanwhile.
pub(crate) fn borrowed_send(
    node: &Node,
    (sender, dev): (&Netns, &str),
    claimed: IpAddr,
    payload: &[u8],
    timeout: Duration,
    (hook, counter): (&str, Counter),
) -> (usize, u64) {
    let lab = &node.lab;
    let dst = lab.pod_ip(1, IpFamily::of(claimed));
    let before = node.counter(hook, counter.name()).unwrap();
    let server = UdpServer::start(
        lab.pod_ns(1),
        SocketAddr::new(dst, 9000),
        1,
        Reply::Nothing,
        timeout,
    )
    .unwrap();
    send_from_borrowed_address(sender, dev, claimed, dst, payload);
    let received = server.join().unwrap_or_default().len();
    let moved = node
        .counter(hook, counter.name())
        .unwrap()
        .saturating_sub(before);
    (received, moved)
}

/// The gateway's flow log has a flow from Pod 0 to Pod 1.
pub(crate) fn gateway_saw_pair(lab: &Lab, family: IpFamily) -> bool {
    let (src, dst) = (lab.pod_ip(0, family), lab.pod_ip(1, family));
    lab.gateway_flows()
        .unwrap()
        .iter()
        .any(|flow| flow.is_between(src, dst))
}
