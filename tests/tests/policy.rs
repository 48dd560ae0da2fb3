//! Every policy that applied before visibility still applies with it, and no packet of
//! a same-node Pod pair gets around the gateway: on a veth/netns lab node with the real
//! `visibility` daemon.
//!
//! - The node's own filter (NetworkPolicy as Calico's iptables mode or kube-router
//!   enforce it in `filter FORWARD`): ingress policy (`-o <veth of the receiver>`) and
//!   egress policy (`-i <veth of the sender>`), in iptables-nft and in native nftables,
//!   with visibility off, on, and disabled at runtime.
//! - The gateway's firewall stops small datagrams, fragmented datagrams and fragmented
//!   pings alike.
//! - A spoofed source is not delivered through the gateway; a packet injected on the
//!   uplink with a Pod source meets the node's filter.
//! - A packet larger than the uplink's MTU gets ICMP "fragmentation needed" / "packet
//!   too big", as from a router.
//! - A program attached after ours on a hook sees the packets ours passes.
//!
//! **These tests need root** (network namespaces, veths, nftables, iptables-nft, bpffs and
//! BPF), the `visibility` binary built (`cargo build -p visibility-userspace`), iproute2,
//! nftables, iptables, conntrack-tools, util-linux `nsenter` and iputils `ping`.

use std::{
    net::{IpAddr, SocketAddr, UdpSocket},
    time::Duration,
};

use visibility_common::{counters::Counter, hook::Hook, program_names};
use visibility_tests::require_root;
use visibility_tests::{
    datapath_harness::SoloProgram,
    lab::{IpFamily, Lab, LabConfig, NODE_UPLINK, Netns, Reply, TcpServer, UdpServer, udp_recv},
    node::Node,
};

/// Timeout of exchanges that must work.
const WORKS: Duration = Duration::from_secs(3);
/// Timeout of exchanges that must fail.
const BLOCKED: Duration = Duration::from_millis(800);
/// The port the policies protect.
const PORT: u16 = 8080;
/// A datagram and a ping payload that the Pod fragments (its MTU is 1500).
const FRAGMENTED: usize = 3000;

const FAMILIES: [IpFamily; 2] = [IpFamily::V4, IpFamily::V6];

fn tag(name: &str, family: IpFamily) -> String {
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
fn tcp_works(lab: &Lab, from: usize, to: usize, family: IpFamily, timeout: Duration) -> bool {
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
fn udp_works(
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

/// One ping of `size` bytes of payload from Pod `from` to Pod `to`: whether it was
/// answered.
fn ping_works(lab: &Lab, from: usize, to: usize, family: IpFamily, size: usize) -> bool {
    lab.pod_ns(from)
        .cmd(
            "ping",
            [
                "-c",
                "1",
                "-W",
                "1",
                "-s",
                &size.to_string(),
                &lab.pod_ip(to, family).to_string(),
            ],
        )
        .output()
        .is_ok_and(|out| out.status.success())
}

/// Gives `ns` the address `addr` as one of its own, on `dev`, and sends a UDP datagram
/// from it to `dst` port 9000: how a spoofing Pod, or a sender on the network claiming
/// a Pod's address, would.
fn send_from_borrowed_address(ns: &Netns, dev: &str, addr: IpAddr, dst: IpAddr, payload: &[u8]) {
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

/// How the node enforces a policy, as NetworkPolicy engines do in `filter FORWARD`.
#[derive(Clone, Copy, Debug)]
enum Engine {
    /// `iptables`/`ip6tables` (the nf_tables backend), as Calico's iptables mode.
    IptablesNft,
    /// A native nftables table, as kube-router's nftables mode and others.
    Nftables,
}

/// Which Pod's policy the rule stands for.
#[derive(Clone, Copy, Debug)]
enum Policy {
    /// The receiver's ingress policy: `-o <veth of the receiver>` (Calico's
    /// `cali-to-wl-dispatch`).
    Ingress,
    /// The sender's egress policy: `-i <veth of the sender>` (Calico's
    /// `cali-from-wl-dispatch`).
    Egress,
}

/// A node rule that drops TCP from Pod 0 to Pod 1 port [`PORT`]; removed on drop.
struct NodeRule<'a> {
    node: &'a Netns,
    engine: Engine,
    family: IpFamily,
    delete: Vec<String>,
}

impl<'a> NodeRule<'a> {
    fn add(lab: &'a Lab, engine: Engine, policy: Policy, family: IpFamily) -> Self {
        let node = lab.node();
        let (src, dst) = (lab.pod_ip(0, family), lab.pod_ip(1, family));
        let (iface_flag, iface) = match policy {
            Policy::Ingress => ("-o", lab.pod_host_ifname(1)),
            Policy::Egress => ("-i", lab.pod_host_ifname(0)),
        };
        let port = PORT.to_string();
        match engine {
            Engine::IptablesNft => {
                let rule: Vec<String> = [
                    "FORWARD",
                    iface_flag,
                    iface,
                    "-s",
                    &src.to_string(),
                    "-d",
                    &dst.to_string(),
                    "-p",
                    "tcp",
                    "--dport",
                    &port,
                    "-j",
                    "DROP",
                ]
                .map(String::from)
                .to_vec();
                let tool = iptables(family);
                let mut insert = vec!["-w".to_string(), "-I".to_string()];
                insert.extend(rule.iter().cloned());
                node.run(tool, &insert).expect("adding the iptables rule");
                let mut delete = vec!["-w".to_string(), "-D".to_string()];
                delete.extend(rule);
                Self {
                    node,
                    engine,
                    family,
                    delete,
                }
            }
            Engine::Nftables => {
                let (ip, iface_key) = match (family, policy) {
                    (IpFamily::V4, Policy::Ingress) => ("ip", "oifname"),
                    (IpFamily::V4, Policy::Egress) => ("ip", "iifname"),
                    (IpFamily::V6, Policy::Ingress) => ("ip6", "oifname"),
                    (IpFamily::V6, Policy::Egress) => ("ip6", "iifname"),
                };
                let ruleset = format!(
                    "table inet vispolicy {{\n chain forward {{\n type filter hook forward priority filter; policy accept;\n \
                     {iface_key} \"{iface}\" {ip} saddr {src} {ip} daddr {dst} tcp dport {PORT} drop\n }}\n}}\n"
                );
                node.run_with_stdin("nft", ["-f", "-"], &ruleset)
                    .expect("adding the nftables rule");
                Self {
                    node,
                    engine,
                    family,
                    delete: ["delete", "table", "inet", "vispolicy"]
                        .map(String::from)
                        .to_vec(),
                }
            }
        }
    }
}

impl Drop for NodeRule<'_> {
    fn drop(&mut self) {
        let result = match self.engine {
            Engine::IptablesNft => self.node.run(iptables(self.family), &self.delete),
            Engine::Nftables => self.node.run("nft", &self.delete),
        };
        if let Err(e) = result {
            eprintln!("removing the node rule: {e:#}");
        }
    }
}

fn iptables(family: IpFamily) -> &'static str {
    match family {
        IpFamily::V4 => "iptables",
        IpFamily::V6 => "ip6tables",
    }
}

/// The gateway's flow log has a flow from Pod 0 to Pod 1.
fn gateway_saw_pair(lab: &Lab, family: IpFamily) -> bool {
    let (src, dst) = (lab.pod_ip(0, family), lab.pod_ip(1, family));
    lab.gateway_flows()
        .unwrap()
        .iter()
        .any(|flow| flow.is_between(src, dst))
}

/// Each node rule (ingress and egress policy, iptables-nft and nftables) stops the
/// request, and removing it lets the request through again.
fn assert_node_rules_apply(lab: &Lab, family: IpFamily, mode: &str) {
    for engine in [Engine::IptablesNft, Engine::Nftables] {
        for policy in [Policy::Ingress, Policy::Egress] {
            let what = format!("{mode}, {engine:?} {policy:?} policy, {family:?}");
            {
                let _rule = NodeRule::add(lab, engine, policy, family);
                assert!(
                    !tcp_works(lab, 0, 1, family, BLOCKED),
                    "{what}: the request got past the node's rule"
                );
            }
            assert!(
                tcp_works(lab, 0, 1, family, WORKS),
                "{what}: rule removed, request fails"
            );
        }
    }
}

/// The node's filter judges same-node Pod-to-Pod traffic the same with visibility off,
/// on, and disabled at runtime.
fn node_filter_applies_in_every_mode(family: IpFamily) {
    require_root();
    let mut node = Node::new(&tag("pnode", family), 2).expect("lab node");
    let lab_ready = |node: &Node| assert!(tcp_works(&node.lab, 0, 1, family, WORKS));
    lab_ready(&node);
    assert_node_rules_apply(&node.lab, family, "visibility off (no datapath)");

    node.start().expect("starting the daemon");
    node.lab.flush_gateway_flows().unwrap();
    lab_ready(&node);
    assert!(
        gateway_saw_pair(&node.lab, family),
        "visibility on: the gateway is in the path"
    );
    assert_node_rules_apply(&node.lab, family, "visibility on");

    node.cli_ok(&["disable"]).unwrap();
    assert_node_rules_apply(&node.lab, family, "visibility disabled at runtime");
}

#[test]
fn node_filter_applies_in_every_mode_ipv4() {
    node_filter_applies_in_every_mode(IpFamily::V4);
}

#[test]
fn node_filter_applies_in_every_mode_ipv6() {
    node_filter_applies_in_every_mode(IpFamily::V6);
}

/// A gateway firewall rule for a Pod pair stops small UDP, fragmented UDP and
/// fragmented pings alike: fragments take the gateway too. With visibility disabled the
/// gateway is out of the path, and all of it gets through.
#[test]
fn the_gateway_firewall_stops_fragments_too() {
    require_root();
    for family in FAMILIES {
        let mut node = Node::new(&tag("pfrag", family), 2).expect("lab node");
        node.start().expect("starting the daemon");
        let lab = &node.lab;
        assert!(
            udp_works(lab, 0, 1, family, FRAGMENTED, WORKS),
            "{family:?}: fragmented UDP"
        );
        assert!(
            ping_works(lab, 0, 1, family, FRAGMENTED),
            "{family:?}: fragmented ping"
        );
        lab.block(lab.pod_ip(0, family), lab.pod_ip(1, family))
            .unwrap();
        assert!(
            !udp_works(lab, 0, 1, family, 64, BLOCKED),
            "{family:?}: small UDP passed"
        );
        assert!(
            !udp_works(lab, 0, 1, family, FRAGMENTED, BLOCKED),
            "{family:?}: fragmented UDP passed the gateway's firewall"
        );
        assert!(
            !ping_works(lab, 0, 1, family, FRAGMENTED),
            "{family:?}: a fragmented ping passed the gateway's firewall"
        );
        node.cli_ok(&["disable"]).unwrap();
        assert!(
            udp_works(lab, 0, 1, family, FRAGMENTED, WORKS),
            "{family:?}: disabled"
        );
        assert!(
            ping_works(lab, 0, 1, family, FRAGMENTED),
            "{family:?}: disabled"
        );
    }
}

/// A Pod that sends with another Pod's address is never sent to the gateway in that
/// Pod's name. With loose rp_filter the node forwards it, and it is delivered on the
/// node (as without visibility), counted as spoofed; the gateway sees none of it.
#[test]
fn a_spoofed_source_is_not_delivered_through_the_gateway() {
    require_root();
    for family in FAMILIES {
        let lab = Lab::new(
            &tag("pspoof", family),
            LabConfig {
                pods: 3,
                strict_rp_filter: false,
            },
        )
        .expect("lab");
        let mut node = Node::from_lab(lab);
        node.start().expect("starting the daemon");
        let lab = &node.lab;
        let (spoofed, dst) = (lab.pod_ip(2, family), lab.pod_ip(1, family));
        lab.flush_gateway_flows().unwrap();
        let before = node
            .counter("pod_egress", Counter::PassSpoofedSource.name())
            .unwrap();
        let server = UdpServer::start(
            lab.pod_ns(1),
            SocketAddr::new(dst, 9000),
            1,
            Reply::Nothing,
            WORKS,
        )
        .unwrap();
        // Pod 0 takes Pod 2's address as a second one, and sends from it.
        send_from_borrowed_address(lab.pod_ns(0), "eth0", spoofed, dst, b"spoofed");
        let received = server.join().unwrap();
        assert_eq!(
            received.len(),
            1,
            "{family:?}: delivered on the node, as without visibility"
        );
        assert!(
            node.counter("pod_egress", Counter::PassSpoofedSource.name())
                .unwrap()
                > before,
            "{family:?}: counted as spoofed"
        );
        assert!(
            !lab.gateway_flows()
                .unwrap()
                .iter()
                .any(|flow| flow.is_between(spoofed, dst)),
            "{family:?}: the gateway saw the spoofed packet"
        );
    }
}

/// A packet that arrives on the uplink with a Pod source, which the datapath never
/// sent, goes to the node's stack: a node rule that drops such packets stops it, and it
/// is counted.
#[test]
fn a_packet_injected_on_the_uplink_meets_the_node_filter() {
    require_root();
    for family in FAMILIES {
        let mut node = Node::new(&tag("pinject", family), 2).expect("lab node");
        node.start().expect("starting the daemon");
        let lab = &node.lab;
        let (claimed, dst) = (lab.pod_ip(0, family), lab.pod_ip(1, family));
        // The node's filter: nothing from the uplink may claim a Pod source.
        let ruleset = format!(
            "table inet visinject {{\n chain forward {{\n type filter hook forward priority filter; policy accept;\n \
             iifname \"{NODE_UPLINK}\" {} saddr {claimed} counter drop\n }}\n}}\n",
            if family == IpFamily::V4 { "ip" } else { "ip6" }
        );
        lab.node()
            .run_with_stdin("nft", ["-f", "-"], &ruleset)
            .unwrap();
        let before = node
            .counter("uplink_ingress", Counter::PassUnsentPodToPod.name())
            .unwrap();
        let server = UdpServer::start(
            lab.pod_ns(1),
            SocketAddr::new(dst, 9000),
            1,
            Reply::Nothing,
            BLOCKED,
        )
        .unwrap();
        // The gateway sends with Pod 0's address, which it takes as a local one.
        send_from_borrowed_address(lab.gateway(), "lo", claimed, dst, b"injected");
        let received = server.join().unwrap_or_default();
        assert!(
            received.is_empty(),
            "{family:?}: the injected packet reached the Pod"
        );
        assert!(
            node.counter("uplink_ingress", Counter::PassUnsentPodToPod.name())
                .unwrap()
                > before,
            "{family:?}: counted as an unsent Pod-to-Pod packet"
        );
        // IPv4: the node's strict rp_filter drops it before FORWARD (the source routes
        // to a Pod's veth, not the uplink). IPv6 has no rp_filter: the rule judged it.
        if family == IpFamily::V6 {
            let rule = lab
                .node()
                .run("nft", ["list", "table", "inet", "visinject"])
                .unwrap();
            assert!(
                !rule.contains("packets 0 "),
                "{family:?}: the node's rule judged it: {rule}"
            );
        }
    }
}

/// A packet larger than the uplink's MTU is answered with ICMP "fragmentation needed"
/// (IPv4) or "packet too big" (IPv6) carrying the uplink's MTU; the sender then sends
/// smaller packets, which cross the gateway.
#[test]
fn a_packet_larger_than_the_uplink_mtu_is_answered_as_a_router_would() {
    require_root();
    for family in FAMILIES {
        let mut node = Node::new(&tag("pmtu", family), 2).expect("lab node");
        for (ns, ifname) in [(node.lab.node(), NODE_UPLINK), (node.lab.gateway(), "eth0")] {
            ns.run("ip", ["link", "set", "dev", ifname, "mtu", "1400"])
                .unwrap();
        }
        node.start().expect("starting the daemon");
        let lab = &node.lab;
        // Learn nothing from earlier exchanges: a fresh route cache on the Pod.
        let out = lab
            .pod_ns(0)
            .cmd(
                "ping",
                [
                    "-c",
                    "1",
                    "-W",
                    "1",
                    "-M",
                    "do",
                    "-s",
                    "1440",
                    &lab.pod_ip(1, family).to_string(),
                ],
            )
            .output()
            .unwrap();
        let text = format!(
            "{}{}",
            String::from_utf8_lossy(&out.stdout),
            String::from_utf8_lossy(&out.stderr)
        );
        assert!(
            !out.status.success(),
            "{family:?}: an oversize packet went through: {text}"
        );
        assert!(
            text.contains("mtu = 1400") || text.contains("mtu=1400"),
            "{family:?}: the sender was told the MTU: {text}"
        );
        assert!(
            node.counter("pod_egress", Counter::DroppedTooBig.name())
                .unwrap()
                >= 1,
            "{family:?}"
        );
        // Fragmented by the sender now, the same size goes through the gateway (the
        // first echo reply teaches the other Pod the MTU in turn).
        lab.flush_gateway_flows().unwrap();
        let learned = (0..3).any(|_| ping_works(lab, 0, 1, family, 1440));
        assert!(learned, "{family:?}: after the MTU was learned");
        assert!(gateway_saw_pair(lab, family), "{family:?}");
    }
}

/// A program attached after ours on a hook sees the packets ours passes
/// (`TC_ACT_UNSPEC`, which is `TCX_NEXT`): here a second copy of `pod_ingress`, with maps
/// of its own, as a lower-priority tc filter on a Pod's veth.
#[test]
fn passed_packets_go_on_to_the_next_program() {
    require_root();
    let mut node = Node::new("pnext", 2).expect("lab node");
    node.start().expect("starting the daemon");
    let lab = &node.lab;
    let mut second = SoloProgram::load(program_names::POD_INGRESS).unwrap();
    let pinned = second.pins().path().join("second");
    second.program_mut().unwrap().pin(&pinned).unwrap();
    let veth = lab.pod_host_ifname(0);
    let _ = lab
        .node()
        .run("tc", ["qdisc", "add", "dev", veth, "clsact"]);
    lab.node()
        .run(
            "tc",
            [
                "filter",
                "add",
                "dev",
                veth,
                "ingress",
                "prio",
                "65000",
                "bpf",
                "direct-action",
                "object-pinned",
                &pinned.to_string_lossy(),
            ],
        )
        .unwrap();
    for family in FAMILIES {
        assert!(tcp_works(lab, 0, 1, family, WORKS), "{family:?}");
    }
    // The second copy has maps of its own, unconfigured: whatever it made of the
    // packets, it counted them.
    let seen: u64 = second
        .counters()
        .unwrap()
        .iter()
        .filter(|(hook, counter, _)| *hook == Hook::PodIngress && counter.is_verdict())
        .map(|(_, _, value)| value.packets)
        .sum();
    assert!(seen >= 4, "the second program saw {seen} packets");
    let _ = lab.node().run(
        "tc",
        ["filter", "del", "dev", veth, "ingress", "prio", "65000"],
    );
}

/// Packets the datapath passes come back unchanged to a plain UDP socket too: a
/// datagram from Pod 0 to Pod 1 arrives once, with Pod 0's address.
#[test]
fn udp_arrives_once_with_its_source() {
    require_root();
    let mut node = Node::new("pudp", 2).expect("lab node");
    node.start().expect("starting the daemon");
    let lab = &node.lab;
    for family in FAMILIES {
        let dst = SocketAddr::new(lab.pod_ip(1, family), 9100);
        let socket = lab.pod_ns(1).udp_bind(dst).unwrap();
        let from = lab.pod_ns(0).udp_send(dst, b"once").unwrap();
        let (data, peer) = udp_recv(&socket, WORKS).unwrap();
        assert_eq!(data, b"once");
        assert_eq!(peer.ip(), lab.pod_ip(0, family));
        assert_eq!(peer.port(), from.local_addr().unwrap().port());
        socket.set_read_timeout(Some(BLOCKED)).unwrap();
        assert!(
            socket.recv_from(&mut [0; 16]).is_err(),
            "{family:?}: delivered twice"
        );
    }
}
