//! What the fault tests share: a node whose daemon serves metrics and logs to a file,
//! a metric read from its endpoint, and UDP datagrams counted from one Pod to another.

use std::{
    net::{SocketAddr, UdpSocket},
    path::Path,
    time::Duration,
};

use visibility_tests::{
    lab::{DEFAULT_TIMEOUT, Lab, udp_recv},
    node::{Node, poll},
    records::FiveTuple,
    require_root,
};

/// How long to wait for something that normally takes well under a second (generous,
/// for busy machines).
pub(crate) const WAIT: Duration = Duration::from_secs(20);
/// How long to wait for flow records: a 5 s interval, and the write after it.
pub(crate) const RECORD_WAIT: Duration = Duration::from_secs(30);
/// Each lab node has its own network namespace, so a fixed port clashes with nothing.
pub(crate) const METRICS_ADDR: &str = "127.0.0.1:19476";

/// A lab with `pods` Pods whose daemon logs to a file, serves metrics on
/// [`METRICS_ADDR`], and runs with the default flags followed by `extra`.
pub(crate) fn node_with(tag: &str, pods: usize, extra: &[String]) -> Node {
    node_under(tag, pods, Vec::new(), extra)
}

/// [`node_with`], with the daemon run under `wrapper` (see [`Node::wrap_daemon`]).
pub(crate) fn node_under(tag: &str, pods: usize, wrapper: Vec<String>, extra: &[String]) -> Node {
    require_root();
    let mut node = Node::new(tag, pods).expect("building the lab");
    node.capture_daemon_log();
    node.wrap_daemon(wrapper);
    let mut args = Node::default_daemon_args();
    args.extend(["--metrics-addr".to_owned(), METRICS_ADDR.to_owned()]);
    args.extend(extra.iter().cloned());
    node.start_daemon(args).expect("starting the daemon");
    node
}

/// The daemon flags that write records to `path` every `interval`.
pub(crate) fn records_to(path: &Path, interval: &str) -> Vec<String> {
    vec![
        "--records".to_owned(),
        path.display().to_string(),
        "--records-interval".to_owned(),
        interval.to_owned(),
    ]
}

/// The value of the unlabelled counter or gauge `name`, scraped from the daemon.
pub(crate) fn metric(node: &Node, name: &str) -> u64 {
    let url = format!("http://{METRICS_ADDR}/metrics");
    let text = poll(WAIT, "the metrics endpoint", || {
        Ok(node
            .lab
            .node()
            .run("curl", ["--silent", "--fail", "--max-time", "5", &url])
            .ok())
    })
    .unwrap();
    text.lines()
        .find_map(|line| line.strip_prefix(name)?.strip_prefix(' '))
        .unwrap_or_else(|| panic!("no series {name} in:\n{text}"))
        .parse::<f64>()
        .unwrap_or_else(|e| panic!("{name}: {e}")) as u64
}

/// Waits until the counter `name` reaches `at_least`, and returns it.
pub(crate) fn wait_for_metric(node: &Node, name: &str, at_least: u64) -> u64 {
    poll(WAIT, name, || {
        let value = metric(node, name);
        Ok((value >= at_least).then_some(value))
    })
    .unwrap_or_else(|e| panic!("{e:#}\n{}", node.daemon_log().unwrap_or_default()))
}

/// Waits until the daemon's log has a line containing `text`.
pub(crate) fn wait_for_log(node: &Node, text: &str) {
    poll(WAIT, text, || {
        Ok(node.daemon_log()?.contains(text).then_some(()))
    })
    .unwrap_or_else(|e| panic!("{e:#}\n{}", node.daemon_log().unwrap_or_default()));
}

/// A UDP flow from Pod `from` to `port` of Pod `to` (IPv4): one socket at each end, so
/// that every datagram belongs to the same 5-tuple.
pub(crate) struct UdpFlow {
    sender: UdpSocket,
    receiver: UdpSocket,
    to: SocketAddr,
}

impl UdpFlow {
    pub(crate) fn open(lab: &Lab, from: usize, to: usize, port: u16) -> Self {
        let receiver = lab
            .pod_ns(to)
            .udp_bind(SocketAddr::new(lab.pod_ipv4(to).into(), port))
            .unwrap();
        let to = receiver.local_addr().unwrap();
        let sender = lab
            .pod_ns(from)
            .udp_bind(SocketAddr::new(lab.pod_ipv4(from).into(), 0))
            .unwrap();
        Self {
            sender,
            receiver,
            to,
        }
    }

    /// The flow's 5-tuple, as records name it.
    pub(crate) fn tuple(&self) -> FiveTuple {
        FiveTuple {
            src: self.sender.local_addr().unwrap(),
            dst: self.to,
            protocol: 17,
        }
    }

    /// Sends `count` datagrams, each received before the next is sent: each one
    /// crossed the gateway and came back.
    pub(crate) fn send(&self, count: u64) {
        for i in 0..count {
            self.sender.send_to(&i.to_be_bytes(), self.to).unwrap();
            let (got, _) = udp_recv(&self.receiver, DEFAULT_TIMEOUT)
                .unwrap_or_else(|e| panic!("datagram {i} of {count} to {}: {e:#}", self.to));
            assert_eq!(got, i.to_be_bytes());
        }
    }
}
