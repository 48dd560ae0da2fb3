//! What the daemon tests share: waits, a started node, and checks of the gateway's
//! flow log and of traffic between Pods.

use std::{
    net::{IpAddr, SocketAddr},
    path::Path,
    time::Duration,
};

use serde_json::Value;
use visibility_tests::require_root;
use visibility_tests::{
    lab::{DEFAULT_TIMEOUT, IpFamily, Lab, Reply, UdpServer},
    node::Node,
};

/// How long to wait for something that normally takes well under a second (generous, for
/// busy machines).
pub(crate) const WAIT: Duration = Duration::from_secs(20);
/// How often the long-running TCP conversations send a message.
pub(crate) const MESSAGE_INTERVAL: Duration = Duration::from_millis(20);
/// How long a message may wait for its echo before the connection counts as broken (a
/// lost packet costs a retransmission, 200 ms at first; a broken path never recovers).
pub(crate) const ECHO_TIMEOUT: Duration = Duration::from_secs(5);

/// A lab with `pods` Pods whose node runs the daemon with the default flags.
pub(crate) fn started(tag: &str, pods: usize) -> Node {
    require_root();
    let mut node = Node::new(tag, pods).expect("building the lab");
    node.start().expect("starting the daemon");
    node
}

pub(crate) fn args(list: &[&str]) -> Vec<String> {
    list.iter().map(|s| s.to_string()).collect()
}

/// Whether the gateway's flow log has a flow between `a` and `b` (either direction).
pub(crate) fn gateway_saw(lab: &Lab, a: impl Into<IpAddr>, b: impl Into<IpAddr>) -> bool {
    let (a, b) = (a.into(), b.into());
    lab.gateway_flows()
        .unwrap()
        .iter()
        .any(|f| f.is_between(a, b) || f.is_between(b, a))
}

/// Whether the gateway's flow log has a flow between Pods `a` and `b` in `family`.
pub(crate) fn gateway_saw_pods(lab: &Lab, a: usize, b: usize, family: IpFamily) -> bool {
    gateway_saw(lab, lab.pod_ip(a, family), lab.pod_ip(b, family))
}

/// Whether the gateway's flow log has a UDP flow to (or from) `port` of `addr`.
pub(crate) fn gateway_saw_udp(lab: &Lab, addr: impl Into<IpAddr>, port: u16) -> bool {
    let addr = addr.into();
    lab.gateway_flows().unwrap().iter().any(|f| {
        f.protocol == "udp"
            && ((f.dst == addr && f.dport == Some(port))
                || (f.src == addr && f.sport == Some(port)))
    })
}

/// Sends one UDP datagram from Pod `from` to `port` of Pod `to` (IPv4) and checks the
/// echo.
pub(crate) fn udp_exchange(lab: &Lab, from: usize, to: usize, port: u16) {
    udp_exchange_between(lab, from, lab, to, port);
}

/// [`udp_exchange`] from a Pod of one lab node to a Pod of another (or the same).
pub(crate) fn udp_exchange_between(
    from_lab: &Lab,
    from: usize,
    to_lab: &Lab,
    to: usize,
    port: u16,
) {
    let server = UdpServer::start(
        to_lab.pod_ns(to),
        SocketAddr::new(to_lab.pod_ipv4(to).into(), port),
        1,
        Reply::Echo,
        DEFAULT_TIMEOUT,
    )
    .unwrap();
    let reply = from_lab
        .pod_ns(from)
        .udp_request(server.local_addr(), b"visibility", DEFAULT_TIMEOUT)
        .unwrap();
    assert_eq!(reply, b"visibility");
    server.join().unwrap();
}

/// Pings Pod `to` from Pod `from`, IPv4 and IPv6.
pub(crate) fn ping_both(lab: &Lab, from: usize, to: usize) {
    lab.pod_ns(from).ping(lab.pod_ipv4(to), 2).unwrap();
    lab.pod_ns(from).ping(lab.pod_ipv6(to), 2).unwrap();
}

/// A number in JSON, whether written as a number or (as flow records do) a string.
pub(crate) fn num(value: &Value) -> u64 {
    match value {
        Value::Number(n) => n.as_u64().unwrap(),
        Value::String(s) => s.parse().unwrap(),
        other => panic!("not a number: {other}"),
    }
}

/// The files under `<pin-dir>/links`.
pub(crate) fn link_pins(pin_dir: &Path) -> Vec<String> {
    std::fs::read_dir(pin_dir.join("links"))
        .map(|entries| {
            entries
                .filter_map(Result::ok)
                .map(|e| e.file_name().to_string_lossy().into_owned())
                .collect()
        })
        .unwrap_or_default()
}

pub(crate) fn stdout(output: &std::process::Output) -> String {
    String::from_utf8_lossy(&output.stdout).into_owned()
}

/// The flags of a daemon that learns its Pod CIDRs: no `--pod-cidr`, a fast reconcile,
/// and a CNI configuration directory that holds nothing (the same on every node).
pub(crate) fn learning_args() -> Vec<String> {
    args(&[
        "--reconcile-interval",
        "1",
        "--cni-conf-dir",
        "/nonexistent/visibility-test/net.d",
    ])
}

/// The daemon's Pod CIDRs with their sources, from `status --json`: `CIDR (source)`.
pub(crate) fn pod_cidr_sources(status: &Value) -> Vec<String> {
    status["pod_cidr_sources"]
        .as_array()
        .into_iter()
        .flatten()
        .map(|c| {
            format!(
                "{} ({})",
                c["cidr"].as_str().unwrap(),
                c["source"].as_str().unwrap()
            )
        })
        .collect()
}

/// Waits until the daemon's Pod CIDRs (with sources) are `wanted`.
pub(crate) fn wait_for_pod_cidrs(node: &Node, wanted: &[&str]) {
    node.wait_for(WAIT, |status| {
        (pod_cidr_sources(status) == wanted).then_some(())
    })
    .unwrap_or_else(|e| panic!("waiting for Pod CIDRs {wanted:?}: {e:#}"));
}

/// A health check of a parsed `status --json`, by name.
pub(crate) fn check<'a>(status: &'a Value, name: &str) -> &'a Value {
    find_check(status, name).unwrap_or_else(|| panic!("no check {name}: {status}"))
}

/// Whether a health check passes, if the status has it.
pub(crate) fn check_passes(status: &Value, name: &str) -> Option<bool> {
    find_check(status, name)?["ok"].as_bool()
}

fn find_check<'a>(status: &'a Value, name: &str) -> Option<&'a Value> {
    status["daemon"]["checks"]
        .as_array()?
        .iter()
        .find(|c| c["name"] == name)
}
