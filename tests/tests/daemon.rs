//! The real `visibility` binary on a lab node: the daemon in the node's namespace and
//! every CLI command against its pin directory, with traffic between Pods and the
//! gateway's flow log and counters as the judge.
//!
//! **These tests need root** (network namespaces, veths, nftables, bpffs and BPF), the
//! binary built (`cargo build -p visibility-userspace`, or `VISIBILITY_BIN`), and
//! iproute2, nftables, conntrack, iputils `ping` and `bpftool`. They run in parallel:
//! every test has its own lab and its own pin directory, removed on drop.
//!
//! Run: `cargo build -p visibility-userspace && cargo test -p visibility-tests --test daemon`

use std::{
    collections::BTreeSet,
    net::{IpAddr, SocketAddr},
    path::Path,
    time::Duration,
};

use serde_json::Value;
use visibility_tests::require_root;
use visibility_tests::{
    lab::{
        DEFAULT_TIMEOUT, GATEWAY_IFNAME, GATEWAY_IPV4, GATEWAY_IPV6, Lab, NODE_UPLINK, POD_CIDR_V4,
        POD_CIDR_V6, Reply, UdpServer,
    },
    node::{Node, TcpLoad, counter_in, poll},
};

/// How long to wait for something that normally takes well under a second (generous, for
/// busy machines).
const WAIT: Duration = Duration::from_secs(20);
/// How often the long-running TCP conversations send a message.
const MESSAGE_INTERVAL: Duration = Duration::from_millis(20);
/// How long a message may wait for its echo before the connection counts as broken (a
/// lost packet costs a retransmission, 200 ms at first; a broken path never recovers).
const ECHO_TIMEOUT: Duration = Duration::from_secs(5);

/// A lab with `pods` Pods whose node runs the daemon with the default flags.
fn started(tag: &str, pods: usize) -> Node {
    require_root();
    let mut node = Node::new(tag, pods).expect("building the lab");
    node.start().expect("starting the daemon");
    node
}

fn args(list: &[&str]) -> Vec<String> {
    list.iter().map(|s| s.to_string()).collect()
}

/// Whether the gateway's flow log has a flow between `a` and `b` (either direction).
fn gateway_saw(lab: &Lab, a: impl Into<IpAddr>, b: impl Into<IpAddr>) -> bool {
    let (a, b) = (a.into(), b.into());
    lab.gateway_flows()
        .unwrap()
        .iter()
        .any(|f| f.is_between(a, b) || f.is_between(b, a))
}

/// Whether the gateway's flow log has a UDP flow to (or from) `port` of `addr`.
fn gateway_saw_udp(lab: &Lab, addr: impl Into<IpAddr>, port: u16) -> bool {
    let addr = addr.into();
    lab.gateway_flows().unwrap().iter().any(|f| {
        f.protocol == "udp"
            && ((f.dst == addr && f.dport == Some(port))
                || (f.src == addr && f.sport == Some(port)))
    })
}

/// Sends one UDP datagram from Pod `from` to `port` of Pod `to` (IPv4) and checks the
/// echo.
fn udp_exchange(lab: &Lab, from: usize, to: usize, port: u16) {
    let server = UdpServer::start(
        lab.pod_ns(to),
        SocketAddr::new(lab.pod_ipv4(to).into(), port),
        1,
        Reply::Echo,
        DEFAULT_TIMEOUT,
    )
    .unwrap();
    let reply = lab
        .pod_ns(from)
        .udp_request(server.local_addr(), b"visibility", DEFAULT_TIMEOUT)
        .unwrap();
    assert_eq!(reply, b"visibility");
    server.join().unwrap();
}

/// Pings Pod `to` from Pod `from`, IPv4 and IPv6.
fn ping_both(lab: &Lab, from: usize, to: usize) {
    lab.pod_ns(from).ping(lab.pod_ipv4(to), 2).unwrap();
    lab.pod_ns(from).ping(lab.pod_ipv6(to), 2).unwrap();
}

/// A number in JSON, whether written as a number or (as flow records do) a string.
fn num(value: &Value) -> u64 {
    match value {
        Value::Number(n) => n.as_u64().unwrap(),
        Value::String(s) => s.parse().unwrap(),
        other => panic!("not a number: {other}"),
    }
}

/// The files under `<pin-dir>/links`.
fn link_pins(pin_dir: &Path) -> Vec<String> {
    std::fs::read_dir(pin_dir.join("links"))
        .map(|entries| {
            entries
                .filter_map(Result::ok)
                .map(|e| e.file_name().to_string_lossy().into_owned())
                .collect()
        })
        .unwrap_or_default()
}

fn stdout(output: &std::process::Output) -> String {
    String::from_utf8_lossy(&output.stdout).into_owned()
}

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
        !gateway_saw(lab, lab.pod_ipv4(0), lab.pod_ipv4(1)),
        "IPv4 is no Pod CIDR: {:?}",
        lab.gateway_flows()
    );
    assert!(gateway_saw(lab, lab.pod_ipv6(0), lab.pod_ipv6(1)));

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
    assert!(gateway_saw(lab, lab.pod_ipv4(0), lab.pod_ipv4(1)));
    assert!(gateway_saw(lab, lab.pod_ipv6(0), lab.pod_ipv6(1)));
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
    assert!(!gateway_saw(
        &node.lab,
        node.lab.pod_ipv4(0),
        node.lab.pod_ipv4(1)
    ));

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
            gateway_saw(lab, lab.pod_ipv4(0), lab.pod_ipv4(1)),
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

/// A Pod created while the daemon runs is found, attached and redirected.
#[test]
fn a_new_pod_is_attached_and_redirected() {
    let mut node = started("d-newpod", 2);
    let index = node.lab.add_pod().unwrap();
    node.wait_until_attached(3).unwrap();
    let lab = &node.lab;
    let ifindex = lab.pod_host_ifindex(index);
    let status = node.status().unwrap();
    let pods = status["daemon"]["pod_interfaces"].as_array().unwrap();
    let new = pods
        .iter()
        .find(|p| p["ifindex"] == ifindex)
        .unwrap_or_else(|| panic!("veth{index} not in {status}"));
    assert_eq!(new["name"], lab.pod_host_ifname(index));
    assert_eq!(new["attached"], true);
    assert_eq!(new["reason"], "route");
    let pins = link_pins(&node.pin_dir);
    for program in ["pod_ingress", "pod_egress"] {
        assert!(pins.contains(&format!("if{ifindex}_{program}")), "{pins:?}");
    }

    lab.flush_gateway_flows().unwrap();
    ping_both(lab, index, 0);
    assert!(gateway_saw(lab, lab.pod_ipv4(index), lab.pod_ipv4(0)));
    assert!(gateway_saw(lab, lab.pod_ipv6(index), lab.pod_ipv6(0)));
}

/// A deleted Pod leaves nothing behind: no link pin, no entry in the status.
#[test]
fn a_deleted_pod_leaves_no_state() {
    let mut node = started("d-delpod", 3);
    let ifindex = node.lab.pod_host_ifindex(2);
    let prefix = format!("if{ifindex}_");
    assert_eq!(
        link_pins(&node.pin_dir)
            .iter()
            .filter(|p| p.starts_with(&prefix))
            .count(),
        2
    );

    node.lab.remove_pod(2).unwrap();
    node.wait_until_attached(2).unwrap();
    poll(WAIT, "the link pins of the deleted Pod to go", || {
        Ok(link_pins(&node.pin_dir)
            .iter()
            .all(|p| !p.starts_with(&prefix))
            .then_some(()))
    })
    .unwrap();
    let status = node.status().unwrap();
    let pods = status["daemon"]["pod_interfaces"].as_array().unwrap();
    assert!(
        pods.iter()
            .all(|p| p["ifindex"] != ifindex && p["name"] != "veth2"),
        "{status}"
    );
    assert_eq!(pods.len(), 2);
    // Pods 0, 1 and the uplink keep theirs.
    assert_eq!(
        link_pins(&node.pin_dir).len(),
        5,
        "{:?}",
        link_pins(&node.pin_dir)
    );

    let lab = &node.lab;
    lab.flush_gateway_flows().unwrap();
    ping_both(lab, 0, 1);
    assert!(gateway_saw(lab, lab.pod_ipv4(0), lab.pod_ipv4(1)));
}

/// SIGKILL the daemon under TCP load: the datapath stays attached, so the connection
/// keeps going through the gateway without the daemon, and a restarted daemon adopts the
/// datapath with its counters. The connection never breaks.
#[test]
fn kill_9_and_restart_under_tcp_load() {
    let mut node = started("d-kill9", 2);
    let load = TcpLoad::start(
        node.lab.pod_ns(0),
        node.lab.pod_ns(1),
        node.lab.pod_ipv4(1).into(),
        MESSAGE_INTERVAL,
        ECHO_TIMEOUT,
    )
    .unwrap();
    load.wait_for_echoes(10, WAIT).unwrap();
    let old_pid = node.daemon_pid().unwrap();
    let before_kill = node.status().unwrap();
    assert_eq!(before_kill["daemon"]["origin"], "loaded");
    let redirected = counter_in(&before_kill, "pod_egress", "redirected_to_gateway").unwrap();
    let forwarded = node.lab.gateway_forwarded_packets().unwrap();

    node.kill_daemon().unwrap();
    std::thread::sleep(Duration::from_millis(500));
    let status = node.cli(&["status"]).unwrap();
    assert!(!status.status.success(), "status with the daemon dead");
    assert!(
        stdout(&status).contains("NOT RUNNING"),
        "{}",
        stdout(&status)
    );
    let echoed = load.wait_for_echoes(20, WAIT).unwrap();
    assert!(
        node.lab.gateway_forwarded_packets().unwrap() >= forwarded + 36,
        "without the daemon, the connection still goes through the gateway"
    );
    let without_daemon = node.status().unwrap();
    assert_eq!(without_daemon["daemon_running"], false);
    assert!(
        counter_in(&without_daemon, "pod_egress", "redirected_to_gateway").unwrap()
            >= redirected + 20
    );

    node.restart_daemon().unwrap();
    let after = node.status().unwrap();
    assert_eq!(after["daemon"]["origin"], "adopted", "{after}");
    assert_ne!(after["daemon"]["pid"], old_pid);
    // No counter went backwards: the restarted daemon kept the pinned maps.
    for row in before_kill["counters"].as_array().unwrap() {
        let (hook, counter) = (
            row["hook"].as_str().unwrap(),
            row["counter"].as_str().unwrap(),
        );
        let now = counter_in(&after, hook, counter).unwrap();
        assert!(
            now >= num(&row["packets"]),
            "{hook}/{counter}: {now} < {}",
            row["packets"]
        );
    }
    let forwarded = node.lab.gateway_forwarded_packets().unwrap();
    load.wait_for_echoes(20, WAIT).unwrap();
    assert!(node.lab.gateway_forwarded_packets().unwrap() >= forwarded + 36);

    let report = load.stop().expect("the connection never broke");
    assert!(report.messages >= echoed + 20, "{report:?}");
    println!("kill -9 under load: {report:?}");
}

/// Program ids of the three pinned programs.
fn pinned_program_ids(node: &Node) -> BTreeSet<u64> {
    ["pod_ingress", "pod_egress", "uplink_ingress"]
        .iter()
        .map(|name| {
            let pin = node.pin_dir.join("programs").join(name);
            let info = node
                .bpftool(&["prog", "show", "pinned", pin.to_str().unwrap()])
                .unwrap();
            assert_eq!(info["name"], *name, "{info}");
            info["id"].as_u64().unwrap()
        })
        .collect()
}

/// What `bpftool net show` lists on the node namespace's interfaces: clsact filters
/// (bpftool before 7.3 shows no TCX links here), as [`Attachment`]s.
fn tc_filters(node: &Node) -> Vec<Attachment> {
    let net = node.bpftool(&["net", "show"]).unwrap();
    net.as_array()
        .into_iter()
        .flatten()
        .flat_map(|section| section["tc"].as_array().cloned().unwrap_or_default())
        .map(|tc| Attachment {
            interface: tc["devname"].as_str().unwrap_or_default().to_owned(),
            direction: if tc["kind"].as_str().unwrap_or_default().contains("egress") {
                "egress"
            } else {
                "ingress"
            },
            // bpftool names a tc filter's program id `id` (`prog_id` is for links).
            program_id: tc["id"].as_u64().unwrap_or_default(),
            program_name: tc["name"].as_str().unwrap_or_default().to_owned(),
        })
        .collect()
}

/// A program attached to an interface of the node.
#[derive(Debug, Clone, PartialEq, Eq, PartialOrd, Ord)]
struct Attachment {
    interface: String,
    direction: &'static str,
    program_id: u64,
    program_name: String,
}

/// Every program attached in the node namespace: TCX links and clsact filters. Kernels
/// before 6.6 have no TCX (`BPF_PROG_QUERY` refuses its attach types): there only clsact
/// filters are looked for.
fn attachments(node: &Node) -> Vec<Attachment> {
    use aya::util::KernelVersion;
    let mut all = tc_filters(node);
    match KernelVersion::current() {
        Ok(version) if version < KernelVersion::new(6, 6, 0) => println!(
            "skipping the TCX query: Linux {version} has no TCX (6.6 and later); clsact filters only"
        ),
        _ => all.extend(
            node.tcx_attachments()
                .unwrap()
                .into_iter()
                .map(|a| Attachment {
                    interface: a.interface,
                    direction: a.direction,
                    program_id: a.program_id.into(),
                    program_name: a.program_name,
                }),
        ),
    }
    all.sort();
    all
}

/// The BPF links (`bpftool link show`, all namespaces) of these programs.
fn links_of(node: &Node, ids: &BTreeSet<u64>) -> Vec<Value> {
    let links = node.bpftool(&["link", "show"]).unwrap();
    links
        .as_array()
        .into_iter()
        .flatten()
        .filter(|l| l["prog_id"].as_u64().is_some_and(|id| ids.contains(&id)))
        .cloned()
        .collect()
}

/// `visibility teardown` (with the daemon killed) removes every program, link and pin:
/// nothing of this test stays loaded or attached, and Pod-to-Pod traffic stays on the
/// node again.
#[test]
fn teardown_leaves_no_programs_links_or_pins() {
    let mut node = started("d-teardown", 2);
    node.lab.flush_gateway_flows().unwrap();
    ping_both(&node.lab, 0, 1);
    assert!(gateway_saw(
        &node.lab,
        node.lab.pod_ipv4(0),
        node.lab.pod_ipv4(1)
    ));

    // What this test loaded and attached, to be found gone afterwards.
    let ids = pinned_program_ids(&node);
    assert_eq!(ids.len(), 3);
    let attached = attachments(&node);
    assert!(
        attached.iter().all(|a| ids.contains(&a.program_id)),
        "only ours: {attached:?}"
    );
    let found: Vec<(&str, &str, &str)> = attached
        .iter()
        .map(|a| (a.interface.as_str(), a.direction, a.program_name.as_str()))
        .collect();
    assert_eq!(
        found,
        [
            (NODE_UPLINK, "ingress", "uplink_ingress"),
            ("veth0", "egress", "pod_egress"),
            ("veth0", "ingress", "pod_ingress"),
            ("veth1", "egress", "pod_egress"),
            ("veth1", "ingress", "pod_ingress"),
        ]
    );
    if node.status().unwrap()["daemon"]["attach_mode"] == "tcx" {
        assert_eq!(
            links_of(&node, &ids).len(),
            5,
            "one pinned link per attachment"
        );
    }

    node.kill_daemon().unwrap();
    let out = node.cli_ok(&["teardown"]).unwrap();
    assert!(out.contains("removed 5 attachments"), "{out}");
    assert!(!node.pin_dir.exists(), "the pin directory is gone");
    assert!(!visibility::state::state_dir(&node.pin_dir).exists());
    assert_eq!(
        attachments(&node),
        vec![],
        "nothing attached in the node namespace"
    );
    assert_eq!(
        links_of(&node, &ids),
        Vec::<Value>::new(),
        "no links of our programs"
    );
    poll(WAIT, "the programs to be unloaded", || {
        let progs = node.bpftool(&["prog", "show"])?;
        let left: Vec<_> = progs
            .as_array()
            .into_iter()
            .flatten()
            .filter(|p| p["id"].as_u64().is_some_and(|id| ids.contains(&id)))
            .cloned()
            .collect();
        Ok(left.is_empty().then_some(()))
    })
    .unwrap();

    let forwarded = node.lab.gateway_forwarded_packets().unwrap();
    node.lab.flush_gateway_flows().unwrap();
    ping_both(&node.lab, 0, 1);
    assert!(!gateway_saw(
        &node.lab,
        node.lab.pod_ipv4(0),
        node.lab.pod_ipv4(1)
    ));
    assert!(!gateway_saw(
        &node.lab,
        node.lab.pod_ipv6(0),
        node.lab.pod_ipv6(1)
    ));
    assert_eq!(node.lab.gateway_forwarded_packets().unwrap(), forwarded);

    let status = node.cli(&["status"]).unwrap();
    assert!(!status.status.success());
    let out = node.cli_ok(&["teardown"]).unwrap();
    assert!(
        out.contains("nothing to remove"),
        "a second teardown: {out}"
    );
}

/// The MAC of the gateway's interface.
fn gateway_mac(lab: &Lab) -> String {
    let out = lab
        .gateway()
        .run("ip", ["-j", "link", "show", GATEWAY_IFNAME])
        .unwrap();
    let links: Value = serde_json::from_str(&out).unwrap();
    links[0]["address"].as_str().unwrap().to_owned()
}

/// `status --json` has everything, and `status` exits 0 while healthy and non-zero (saying
/// why) once the daemon is gone.
#[test]
fn status_shows_everything_and_fails_without_the_daemon() {
    require_root();
    let mut node = Node::new("d-status", 2).unwrap();
    let mut flags = Node::default_daemon_args();
    flags.extend(args(&[
        "--exempt",
        "10.52.0.3/32,tcp/9999",
        "--node-name",
        "node-under-test",
    ]));
    node.start_daemon(flags).unwrap();
    ping_both(&node.lab, 0, 1);
    let mac = gateway_mac(&node.lab);
    let status = node
        .wait_for(WAIT, |s| {
            let uplinks = s["daemon"]["uplinks"].as_array()?;
            (uplinks.len() == 2 && uplinks.iter().all(|u| u["gateway_mac"] == mac.as_str()))
                .then(|| s.clone())
        })
        .unwrap();
    let lab = &node.lab;

    assert_eq!(status["enabled"], true, "{status}");
    assert_eq!(status["daemon_running"], true);
    assert_eq!(status["healthy"], true);
    let daemon = &status["daemon"];
    assert_eq!(daemon["pid"], node.daemon_pid().unwrap());
    assert_eq!(daemon["node_name"], "node-under-test");
    assert_eq!(daemon["origin"], "loaded");
    assert!(daemon["attach_mode"] == "tcx" || daemon["attach_mode"] == "clsact");
    let uplink_ifindex = lab.node_uplink_ifindex().unwrap();
    for (family, gateway) in [
        ("v4", GATEWAY_IPV4.to_string()),
        ("v6", GATEWAY_IPV6.to_string()),
    ] {
        let uplink = daemon["uplinks"]
            .as_array()
            .unwrap()
            .iter()
            .find(|u| u["family"] == family)
            .unwrap_or_else(|| panic!("no {family} uplink: {status}"));
        assert_eq!(uplink["uplink"], NODE_UPLINK);
        assert_eq!(uplink["ifindex"], uplink_ifindex);
        assert_eq!(uplink["up"], true);
        assert_eq!(uplink["gateway"], gateway.as_str());
        assert_eq!(uplink["gateway_mac"], mac.as_str());
        assert_eq!(uplink["attached"], true);
    }
    assert_eq!(
        status["pod_cidrs"],
        serde_json::json!([POD_CIDR_V4, POD_CIDR_V6])
    );
    assert_eq!(
        status["exempt"],
        serde_json::json!(["10.52.0.3/32,tcp/9999"])
    );
    let pods = daemon["pod_interfaces"].as_array().unwrap();
    assert_eq!(pods.len(), 2);
    for index in 0..2 {
        let pod = pods
            .iter()
            .find(|p| p["name"] == lab.pod_host_ifname(index))
            .unwrap_or_else(|| panic!("no veth{index}: {status}"));
        assert_eq!(pod["ifindex"], lab.pod_host_ifindex(index));
        assert_eq!(pod["attached"], true);
        assert_eq!(pod["error"], Value::Null);
    }
    let counters = status["counters"].as_array().unwrap();
    assert!(
        counters.len() >= 3 * 19,
        "every counter of every hook: {}",
        counters.len()
    );
    assert!(
        counters
            .iter()
            .all(|c| c["bytes"].is_u64() && c["packets"].is_u64())
    );
    assert!(counter_in(&status, "pod_egress", "redirected_to_gateway").unwrap() >= 8);
    assert!(counter_in(&status, "uplink_ingress", "delivered_from_gateway").unwrap() >= 8);
    let checks = daemon["checks"].as_array().unwrap();
    for name in [
        "gateway_neighbour_v4",
        "gateway_neighbour_v6",
        "uplink_up_v4",
        "pod_interfaces_attached",
        "rp_filter",
    ] {
        assert!(
            checks.iter().any(|c| c["name"] == name),
            "no check {name}: {status}"
        );
    }
    assert!(
        checks
            .iter()
            .all(|c| c["ok"] == true && c["detail"].is_string())
    );
    assert!(status["flow_map_capacity"].as_u64().unwrap() > 0);

    let text = node.cli(&["status"]).unwrap();
    assert!(text.status.success(), "healthy: exit 0");
    let text = stdout(&text);
    for needle in [
        "Visibility:     on",
        "running (pid",
        "veth0",
        "veth1",
        mac.as_str(),
        "10.52.0.3/32,tcp/9999",
        "redirected_to_gateway",
        "Health:",
    ] {
        assert!(text.contains(needle), "no {needle:?} in:\n{text}");
    }

    node.stop_daemon().unwrap();
    let text = node.cli(&["status"]).unwrap();
    assert!(
        !text.status.success(),
        "the daemon is not running: non-zero"
    );
    assert!(stdout(&text).contains("NOT RUNNING"), "{}", stdout(&text));
    let json = node.cli(&["status", "--json"]).unwrap();
    assert!(!json.status.success());
    let status: Value = serde_json::from_slice(&json.stdout).unwrap();
    assert_eq!(status["daemon_running"], false);
    assert_eq!(status["healthy"], false);
    assert_eq!(status["daemon"], Value::Null);
    assert_eq!(status["enabled"], true, "the maps keep their state");
}

/// `flows` sorts, limits and filters, as JSON records and as a table.
#[test]
fn flows_sort_limit_and_filter() {
    let node = started("d-flows", 3);
    let lab = &node.lab;
    lab.pod_ns(0).ping(lab.pod_ipv4(1), 5).unwrap();
    lab.pod_ns(0).ping(lab.pod_ipv4(2), 2).unwrap();
    lab.pod_ns(0).ping(lab.pod_ipv6(1), 1).unwrap();
    udp_exchange(lab, 0, 1, 7001);
    udp_exchange(lab, 2, 1, 7002);

    let all = node.flows(&[]).unwrap();
    assert!(all.len() >= 8, "{all:#?}");
    let packets = |f: &Value| num(&f["packets_sent"]);
    let bytes = |f: &Value| num(&f["bytes_sent"]);
    assert!(
        all.windows(2).all(|w| bytes(&w[0]) >= bytes(&w[1])),
        "bytes first by default"
    );

    let icmp = node.flows(&["proto=icmp"]).unwrap();
    assert!(icmp.len() >= 4, "two pairs, both directions: {icmp:#?}");
    assert!(icmp.iter().all(|f| f["connection"]["protocol"] == 1));
    let out = node
        .cli_ok(&[
            "flows",
            "--json",
            "--sort",
            "packets",
            "--limit",
            "1",
            "--filter",
            "proto=icmp",
        ])
        .unwrap();
    let top: Vec<Value> = serde_json::from_str(&out).unwrap();
    assert_eq!(top.len(), 1);
    assert_eq!(packets(&top[0]), icmp.iter().map(packets).max().unwrap());
    assert_eq!(packets(&top[0]), 5, "{top:?}");
    let ends = [
        top[0]["connection"]["src_ip"].clone(),
        top[0]["connection"]["dest_ip"].clone(),
    ];
    assert!(ends.contains(&Value::from(lab.pod_ipv4(0).to_string())));
    assert!(ends.contains(&Value::from(lab.pod_ipv4(1).to_string())));

    let out = node
        .cli_ok(&["flows", "--json", "--sort", "packets"])
        .unwrap();
    let by_packets: Vec<Value> = serde_json::from_str(&out).unwrap();
    assert_eq!(by_packets.len(), all.len());
    assert!(
        by_packets
            .windows(2)
            .all(|w| packets(&w[0]) >= packets(&w[1]))
    );
    let out = node
        .cli_ok(&["flows", "--json", "--sort", "last", "--limit", "3"])
        .unwrap();
    assert_eq!(serde_json::from_str::<Vec<Value>>(&out).unwrap().len(), 3);

    let pod0 = lab.pod_ipv4(0).to_string();
    let udp = node.flows(&["src=10.52.0.2", "proto=udp"]).unwrap();
    assert_eq!(udp.len(), 1, "{udp:#?}");
    assert_eq!(udp[0]["connection"]["src_ip"], pod0.as_str());
    assert_eq!(udp[0]["connection"]["dest_port"], 7001);
    assert_eq!(udp[0]["path"], "via_gateway");
    let to_7002 = node.flows(&["port=7002"]).unwrap();
    assert_eq!(to_7002.len(), 2, "request and reply: {to_7002:#?}");
    let pod2 = node.flows(&["ip=10.52.0.4"]).unwrap();
    assert!(!pod2.is_empty());
    assert!(
        pod2.iter().all(|f| f["connection"]["src_ip"] == "10.52.0.4"
            || f["connection"]["dest_ip"] == "10.52.0.4")
    );
    let v6 = node.flows(&["dst=fd00:52::3", "proto=icmpv6"]).unwrap();
    assert_eq!(v6.len(), 1, "{v6:#?}");
    assert_eq!(node.flows(&["path=via_gateway"]).unwrap().len(), all.len());
    assert!(node.flows(&["path=exempt"]).unwrap().is_empty());
    assert!(
        node.flows(&["dport=7001", "sport=7001"])
            .unwrap()
            .is_empty(),
        "filters all apply"
    );

    let table = node
        .cli_ok(&["flows", "--sort", "packets", "--filter", "proto=icmp"])
        .unwrap();
    let lines: Vec<&str> = table.lines().collect();
    assert!(
        lines[0].starts_with("SOURCE") && lines[0].contains("PATH"),
        "{table}"
    );
    assert_eq!(
        lines.len(),
        icmp.len() + 2,
        "header, rows, summary:\n{table}"
    );
    assert!(
        lines[1].contains(&pod0) && lines[1].contains("icmp"),
        "{table}"
    );
    assert!(
        lines
            .last()
            .unwrap()
            .starts_with(&format!("{} flows", icmp.len())),
        "{table}"
    );
}

/// With `--log-format json`, every line the daemon writes to standard error is a JSON
/// object, from start to stop, and so is the error of a daemon that cannot start.
#[test]
fn log_format_json_makes_every_daemon_line_json() {
    require_root();
    let mut node = Node::new("d-jsonlog", 2).unwrap();
    node.capture_daemon_log();
    let mut flags = args(&["--log-format", "json"]);
    flags.extend(Node::default_daemon_args());
    node.start_daemon(flags).unwrap();
    ping_both(&node.lab, 0, 1);
    node.wait_for(WAIT, |s| {
        s["daemon"]["uplinks"]
            .as_array()?
            .iter()
            .all(|u| u["gateway_mac"].is_string())
            .then_some(())
    })
    .unwrap();
    node.stop_daemon().unwrap();

    let log = node.daemon_log().unwrap();
    let lines: Vec<Value> = log
        .lines()
        .filter(|l| !l.trim().is_empty())
        .map(|l| serde_json::from_str(l).unwrap_or_else(|e| panic!("not JSON ({e}): {l}")))
        .collect();
    assert!(lines.len() >= 5, "{log}");
    for line in &lines {
        assert!(
            line["timestamp"].is_string() && line["level"].is_string(),
            "{line}"
        );
        assert!(line["fields"]["message"].is_string(), "{line}");
    }
    let messages: Vec<&str> = lines
        .iter()
        .filter_map(|l| l["fields"]["message"].as_str())
        .collect();
    for expected in ["datapath ready", "attached", "health check ok"] {
        assert!(
            messages.contains(&expected),
            "no {expected:?} in {messages:?}"
        );
    }
    assert!(
        messages.iter().any(|m| m.starts_with("stopping")),
        "{messages:?}"
    );
    let attached = lines
        .iter()
        .find(|l| l["fields"]["message"] == "attached")
        .unwrap();
    assert!(
        attached["fields"]["interface"].is_string(),
        "structured fields: {attached}"
    );

    // A daemon that fails at start says so in JSON too.
    let output = node
        .cli(&[
            "--log-format",
            "json",
            "daemon",
            "--uplink",
            "nosuch0",
            "--pod-cidr",
            POD_CIDR_V4,
        ])
        .unwrap();
    assert!(!output.status.success());
    let stderr = String::from_utf8_lossy(&output.stderr);
    let lines: Vec<&str> = stderr.lines().collect();
    assert_eq!(lines.len(), 1, "{stderr}");
    let line: Value =
        serde_json::from_str(lines[0]).unwrap_or_else(|e| panic!("not JSON ({e}): {stderr}"));
    assert_eq!(line["level"], "ERROR", "{line}");
    assert!(line.to_string().contains("nosuch0"), "{line}");
}

/// `status` exits non-zero while a health check fails: here the gateway stops answering
/// ARP, so its IPv4 neighbour entry cannot be resolved.
#[test]
fn status_fails_while_a_health_check_fails() {
    let node = started("d-unhealthy", 2);
    let lab = &node.lab;
    assert!(node.cli(&["status"]).unwrap().status.success());
    lab.gateway()
        .run("ip", ["link", "set", GATEWAY_IFNAME, "arp", "off"])
        .unwrap();
    lab.node()
        .run("ip", ["neigh", "flush", "dev", NODE_UPLINK])
        .unwrap();
    // The daemon keeps the gateway's entry managed: the kernel probes it again, and
    // fails. Meanwhile Pod-to-Pod packets are dropped at the gateway's door
    // (`dropped_gateway_unresolved`), never delivered around it.
    let _ = lab
        .pod_ns(0)
        .ping_once(lab.pod_ipv4(1), Duration::from_secs(1));
    let failing = node
        .wait_for(WAIT, |s| {
            let checks = s["daemon"]["checks"].as_array()?;
            let failing = checks.iter().find(|c| c["ok"] == false)?;
            (s["healthy"] == false).then(|| failing.clone())
        })
        .unwrap();
    assert_eq!(failing["name"], "gateway_neighbour_v4", "{failing}");
    let out = node.cli(&["status"]).unwrap();
    assert!(!out.status.success(), "unhealthy: non-zero");
    assert!(stdout(&out).contains("FAIL"), "{}", stdout(&out));

    lab.gateway()
        .run("ip", ["link", "set", GATEWAY_IFNAME, "arp", "on"])
        .unwrap();
    // The kernel's next probe of the managed entry resolves it; then traffic flows.
    node.wait_for(WAIT, |s| (s["healthy"] == true).then_some(()))
        .unwrap();
    assert!(node.cli(&["status"]).unwrap().status.success());
    lab.pod_ns(0).ping(lab.pod_ipv4(1), 2).unwrap();
}

/// Without an uplink for a family that has a Pod CIDR nothing of that family can take
/// the gateway, so `status` must not report healthy.
#[test]

fn status_fails_without_an_uplink() {
    let node = started("d-nouplink", 2);
    let lab = &node.lab;
    lab.node()
        .run("ip", ["link", "set", NODE_UPLINK, "down"])
        .unwrap();
    node.wait_for(WAIT, |s| {
        s["daemon"]["uplinks"].as_array()?.is_empty().then_some(())
    })
    .unwrap();
    let status = node.status().unwrap();
    assert_eq!(status["healthy"], false, "{status}");
    assert!(
        !node.cli(&["status"]).unwrap().status.success(),
        "no uplink: non-zero"
    );
}

/// The programs' own log records (aya-log) reach the daemon's log: with a gateway that
/// has no route, the datapath says so, once a second at most, and the packet stays on
/// the node.
#[test]
fn datapath_log_records_reach_the_daemon_log() {
    let mut node = Node::new("d-ebpflog", 2).unwrap();
    node.capture_daemon_log();
    // Without a default route, nothing leads to the configured gateway.
    node.lab
        .node()
        .run("ip", ["-4", "route", "del", "default"])
        .unwrap();
    let args = [
        "--pod-cidr",
        POD_CIDR_V4,
        "--uplink",
        "eth0",
        "--gateway",
        "10.99.0.1",
        "--reconcile-interval",
        "1",
    ];
    node.start_daemon(args.iter().map(|a| a.to_string()).collect())
        .unwrap();
    // No route to 10.99.0.1: the redirect cannot be done. The packets are dropped, never
    // delivered around the gateway, and the datapath says why in the daemon's log.
    assert!(
        !node
            .lab
            .pod_ns(0)
            .ping_once(node.lab.pod_ipv4(1), Duration::from_secs(1)),
        "a Pod-to-Pod ping went around the unreachable gateway"
    );
    let _ = node.lab.pod_ns(0).ping(node.lab.pod_ipv4(1), 2);
    let line =
        visibility_tests::node::poll(Duration::from_secs(5), "the datapath's log record", || {
            let log = node.daemon_log()?;
            Ok(log
                .lines()
                .find(|l| l.contains("dropped a Pod-to-Pod packet"))
                .map(str::to_owned))
        })
        .unwrap();
    assert!(line.contains("pod_egress"), "{line}");
    assert!(
        node.counter("pod_egress", "dropped_no_gateway_route")
            .unwrap()
            >= 3
    );
    let log = node.daemon_log().unwrap();
    let records = log
        .lines()
        .filter(|l| l.contains("dropped a Pod-to-Pod packet"))
        .count();
    assert!(
        records <= 4,
        "rate limit: {records} records for 3 packets within a second or two:\n{log}"
    );
}

/// `flows --watch` redraws the table in place (clear screen, home) at its interval, for
/// people at a terminal, until interrupted.
#[test]
fn flows_watch_redraws_in_place() {
    use std::io::Read as _;
    let node = started("d-watch", 2);
    node.lab.pod_ns(0).ping(node.lab.pod_ipv4(1), 1).unwrap();
    let mut watch = node.command(&["flows", "--watch", "0.2"]);
    watch
        .stdout(std::process::Stdio::piped())
        .stdin(std::process::Stdio::null());
    let mut child = watch.spawn().unwrap();
    // Generous for a busy machine: five or more redraws are expected, two suffice.
    std::thread::sleep(Duration::from_secs(2));
    child.kill().unwrap();
    child.wait().unwrap();
    let mut screen = String::new();
    child
        .stdout
        .take()
        .unwrap()
        .read_to_string(&mut screen)
        .unwrap();
    let redraws = screen.matches("\x1b[H\x1b[2J").count();
    assert!(
        redraws >= 2,
        "{redraws} redraws in 0.9 s at 0.2 s: {screen:?}"
    );
    assert!(
        screen.contains("SOURCE") && screen.contains(&node.lab.pod_ipv4(1).to_string()),
        "{screen}"
    );
}
