//! Tests of the lab itself ([`visibility_tests::lab`]) with no BPF attached: plain routing
//! on the node must connect all Pods, over IPv4 and IPv6, without the gateway seeing any of
//! it.
//!
//! **These tests need root** (they create network namespaces, veths and nftables rules)
//! and iputils `ping`. They run in parallel; every lab has its own namespaces.
//!
//! Run: `AYA_BUILD_SKIP=1 cargo test -p visibility-tests --test lab`

use std::net::{IpAddr, Ipv4Addr, SocketAddr};
use std::time::Duration;

use visibility_tests::lab::{
    DEFAULT_TIMEOUT, GATEWAY_IPV4, GATEWAY_IPV6, IpFamily, Lab, LabConfig, NODE_IPV4, NODE_IPV6,
    NODE_UPLINK, Netns, Reply, TcpServer, UdpServer, list_netns,
};
use visibility_tests::require_root;

const FAMILIES: [IpFamily; 2] = [IpFamily::V4, IpFamily::V6];

fn lab(tag: &str, config: LabConfig) -> Lab {
    require_root();
    Lab::new(tag, config).expect("building the lab")
}

/// Names of existing namespaces that belong to the lab with `prefix`.
fn namespaces_of(prefix: &str) -> Vec<String> {
    let own = format!("{prefix}-");
    list_netns()
        .unwrap()
        .into_iter()
        .filter(|n| n.starts_with(&own))
        .collect()
}

/// TCP from Pod `from` to Pod `to` in `family`; checks the reply and that the server saw
/// the client's real Pod address.
fn check_tcp(lab: &Lab, from: usize, to: usize, family: IpFamily) {
    let server = TcpServer::start(
        lab.pod_ns(to),
        SocketAddr::new(lab.pod_ip(to, family), 0),
        1,
        Reply::Fixed(b"pong".to_vec()),
        DEFAULT_TIMEOUT,
    )
    .unwrap();
    let reply = lab
        .pod_ns(from)
        .tcp_request(server.local_addr(), b"ping", DEFAULT_TIMEOUT)
        .unwrap();
    assert_eq!(reply, b"pong", "TCP {family:?} pod {from} -> pod {to}");
    let received = server.join().unwrap();
    assert_eq!(received.len(), 1);
    assert_eq!(received[0].data, b"ping");
    assert_eq!(
        received[0].peer.ip(),
        lab.pod_ip(from, family),
        "source address kept"
    );
}

/// UDP from Pod `from` to Pod `to` in `family`, echoed back.
fn check_udp(lab: &Lab, from: usize, to: usize, family: IpFamily) {
    let server = UdpServer::start(
        lab.pod_ns(to),
        SocketAddr::new(lab.pod_ip(to, family), 0),
        1,
        Reply::Echo,
        DEFAULT_TIMEOUT,
    )
    .unwrap();
    let reply = lab
        .pod_ns(from)
        .udp_request(server.local_addr(), b"hello", DEFAULT_TIMEOUT)
        .unwrap();
    assert_eq!(reply, b"hello", "UDP {family:?} pod {from} -> pod {to}");
    let received = server.join().unwrap();
    assert_eq!(
        received[0].peer.ip(),
        lab.pod_ip(from, family),
        "source address kept"
    );
}

#[test]
fn pods_reach_each_other_over_v4_and_v6() {
    let lab = lab("p2p", LabConfig::default());
    for family in FAMILIES {
        for (from, to) in [(0, 1), (1, 2), (2, 0)] {
            lab.pod_ns(from).ping(lab.pod_ip(to, family), 1).unwrap();
            check_tcp(&lab, from, to, family);
            check_udp(&lab, from, to, family);
        }
    }
}

#[test]
fn gateway_sees_nothing_of_pod_to_pod_traffic() {
    let lab = lab("quiet", LabConfig::default());
    lab.flush_gateway_flows().unwrap();
    let forwarded = lab.gateway_forwarded_packets().unwrap();
    let dropped = lab.gateway_dropped_packets().unwrap();

    for family in FAMILIES {
        lab.pod_ns(0).ping(lab.pod_ip(1, family), 3).unwrap();
        check_tcp(&lab, 0, 1, family);
        check_tcp(&lab, 1, 2, family);
        check_udp(&lab, 2, 0, family);
    }

    assert_eq!(
        lab.gateway_forwarded_packets().unwrap(),
        forwarded,
        "gateway forwarded Pod traffic"
    );
    assert_eq!(lab.gateway_dropped_packets().unwrap(), dropped);
    let flows = lab.gateway_flows().unwrap();
    assert!(flows.is_empty(), "gateway tracked flows: {flows:#?}");
}

/// The counterpart of the test above: traffic that does cross the gateway shows up there.
/// A Pod address that no Pod has is routed by the node to its default gateway, which sends
/// it back (hairpin); strict rp_filter on the node then drops it, so it crosses once.
#[test]
fn gateway_counts_and_tracks_traffic_that_crosses_it() {
    let lab = lab("cross", LabConfig::default());
    let unassigned = Ipv4Addr::new(10, 52, 0, 200);
    let before = lab.gateway_forwarded_packets().unwrap();

    lab.pod_ns(0)
        .udp_send(SocketAddr::new(unassigned.into(), 9), b"x")
        .unwrap();

    let mut flows = Vec::new();
    for _ in 0..50 {
        flows = lab.gateway_flows_involving(unassigned).unwrap();
        if !flows.is_empty() {
            break;
        }
        std::thread::sleep(Duration::from_millis(20));
    }
    assert_eq!(flows.len(), 1, "{flows:#?}");
    let flow = &flows[0];
    assert_eq!((flow.family, flow.protocol.as_str()), (IpFamily::V4, "udp"));
    assert!(flow.is_between(lab.pod_ipv4(0), unassigned));
    assert_eq!(flow.dport, Some(9));
    assert_eq!(flow.packets, 1);
    assert_eq!(lab.gateway_forwarded_packets().unwrap(), before + 1);

    lab.flush_gateway_flows().unwrap();
    assert!(lab.gateway_flows_involving(unassigned).unwrap().is_empty());
}

#[test]
fn gateway_block_drops_and_unblock_restores() {
    let lab = lab("block", LabConfig::default());
    for family in FAMILIES {
        let src = lab.pod_ip(0, family);
        let unassigned: IpAddr = match family {
            IpFamily::V4 => Ipv4Addr::new(10, 52, 0, 201).into(),
            IpFamily::V6 => "fd00:52::c9".parse().unwrap(),
        };
        let dropped = lab.gateway_dropped_packets().unwrap();
        lab.block(src, unassigned).unwrap();
        lab.block(src, unassigned).unwrap(); // idempotent
        lab.pod_ns(0)
            .udp_send(SocketAddr::new(unassigned, 9), b"x")
            .unwrap();
        wait_for(
            || lab.gateway_dropped_packets().unwrap() == dropped + 1,
            "a drop",
        );

        lab.unblock(src, unassigned).unwrap();
        lab.unblock(src, unassigned).unwrap(); // idempotent
        let forwarded = lab.gateway_forwarded_packets().unwrap();
        lab.pod_ns(0)
            .udp_send(SocketAddr::new(unassigned, 9), b"x")
            .unwrap();
        wait_for(
            || lab.gateway_forwarded_packets().unwrap() > forwarded,
            "a forward",
        );
        assert_eq!(
            lab.gateway_dropped_packets().unwrap(),
            dropped + 1,
            "{family:?}"
        );
    }
    assert!(
        lab.block(NODE_IPV4, GATEWAY_IPV6).is_err(),
        "mixed families"
    );
    lab.unblock_all().unwrap();
}

fn wait_for(mut cond: impl FnMut() -> bool, what: &str) {
    for _ in 0..100 {
        if cond() {
            return;
        }
        std::thread::sleep(Duration::from_millis(20));
    }
    panic!("timed out waiting for {what}");
}

#[test]
fn node_and_pods_reach_the_gateway() {
    let lab = lab("gw", LabConfig::default());
    lab.node().ping(GATEWAY_IPV4, 1).unwrap();
    lab.node().ping(GATEWAY_IPV6, 1).unwrap();
    lab.gateway().ping(NODE_IPV4, 1).unwrap();
    lab.gateway().ping(NODE_IPV6, 1).unwrap();
    // Pods go out through the node (it forwards; strict rp_filter is happy).
    lab.pod_ns(1).ping(GATEWAY_IPV4, 1).unwrap();
    lab.pod_ns(1).ping(GATEWAY_IPV6, 1).unwrap();
    // The node's ping shows up in the gateway's flow log (not as forwarded traffic).
    let flows = lab.gateway_flows_involving(NODE_IPV4).unwrap();
    assert!(
        flows
            .iter()
            .any(|f| f.protocol == "icmp" && f.is_between(NODE_IPV4, GATEWAY_IPV4)),
        "{flows:#?}"
    );
    // Nothing reaches past the gateway: it has no default route.
    assert!(
        !lab.node()
            .ping_once(Ipv4Addr::new(192, 0, 2, 1), Duration::from_secs(1))
    );
}

#[test]
fn node_reaches_pods_and_pods_reach_the_node() {
    let lab = lab(
        "nodepod",
        LabConfig {
            pods: 2,
            ..LabConfig::default()
        },
    );
    for i in 0..2 {
        lab.node().ping(lab.pod_ipv4(i), 1).unwrap();
        lab.node().ping(lab.pod_ipv6(i), 1).unwrap();
        lab.pod_ns(i).ping(NODE_IPV4, 1).unwrap();
        lab.pod_ns(i).ping(NODE_IPV6, 1).unwrap();
    }
}

#[test]
fn node_configuration() {
    let lab = lab(
        "conf",
        LabConfig {
            pods: 1,
            ..LabConfig::default()
        },
    );
    let node = lab.node();
    for key in ["all", "default", NODE_UPLINK] {
        assert_eq!(
            node.sysctl_get(&format!("net.ipv4.conf.{key}.rp_filter"))
                .unwrap(),
            "1"
        );
    }
    assert_eq!(node.sysctl_get("net.ipv4.ip_forward").unwrap(), "1");
    assert_eq!(
        node.sysctl_get("net.ipv6.conf.all.forwarding").unwrap(),
        "1"
    );
    assert_eq!(
        lab.gateway()
            .sysctl_get("net.netfilter.nf_conntrack_acct")
            .unwrap(),
        "1"
    );
    assert_eq!(lab.pod_host_ifname(0), "veth0");
    assert_eq!(lab.pod_host_ifindex(0), node.ifindex("veth0").unwrap());
    assert_ne!(lab.node_uplink_ifindex().unwrap(), lab.pod_host_ifindex(0));
    let routes = node
        .run("ip", ["-4", "route", "show", "dev", "veth0"])
        .unwrap();
    assert!(routes.contains("10.52.0.2 scope host"), "{routes}");
    let routes = lab.pod_ns(0).run("ip", ["-6", "route"]).unwrap();
    assert!(routes.contains("default via fe80::1 dev eth0"), "{routes}");
    // No tentative addresses anywhere.
    for ns in lab.namespaces() {
        let addrs = ns.run("ip", ["-6", "addr"]).unwrap();
        assert!(!addrs.contains("tentative"), "{}: {addrs}", ns.name());
    }

    let loose = self::lab(
        "loose",
        LabConfig {
            pods: 1,
            strict_rp_filter: false,
        },
    );
    for key in ["all", "default", NODE_UPLINK] {
        assert_eq!(
            loose
                .node()
                .sysctl_get(&format!("net.ipv4.conf.{key}.rp_filter"))
                .unwrap(),
            "2"
        );
    }
}

#[test]
fn pod_added_later_can_talk_and_removed_pod_is_gone() {
    let mut lab = lab(
        "addpod",
        LabConfig {
            pods: 1,
            ..LabConfig::default()
        },
    );
    let new = lab.add_pod().unwrap();
    assert_eq!(new, 1);
    assert_eq!(lab.pod_ipv4(new), Ipv4Addr::new(10, 52, 0, 3));
    for family in FAMILIES {
        lab.pod_ns(0).ping(lab.pod_ip(new, family), 1).unwrap();
        lab.pod_ns(new).ping(lab.pod_ip(0, family), 1).unwrap();
        check_tcp(&lab, 0, new, family);
        check_tcp(&lab, new, 0, family);
        check_udp(&lab, new, 0, family);
    }

    let removed_ns: Netns = lab.pod_ns(new).clone();
    let host_if = lab.pod_host_ifname(new).to_string();
    lab.remove_pod(new).unwrap();
    assert!(!removed_ns.exists());
    assert!(lab.try_pod(new).is_none());
    assert!(
        lab.node().ifindex(&host_if).is_err(),
        "host veth left behind"
    );
    let routes = lab.node().run("ip", ["route"]).unwrap();
    assert!(!routes.contains("10.52.0.3"), "{routes}");
    assert!(
        !lab.pod_ns(0)
            .ping_once(Ipv4Addr::new(10, 52, 0, 3), Duration::from_secs(1))
    );
    assert!(lab.remove_pod(new).is_err(), "removed twice");

    // Indices are not reused.
    assert_eq!(lab.add_pod().unwrap(), 2);
    lab.pod_ns(2).ping(lab.pod_ipv6(0), 1).unwrap();
}

#[test]
fn sockets_can_be_made_inside_a_pod() {
    let lab = lab(
        "sock",
        LabConfig {
            pods: 2,
            ..LabConfig::default()
        },
    );
    // A listener made inside Pod 1 with std only.
    let listener = lab
        .pod_ns(1)
        .in_ns(|| std::net::TcpListener::bind((lab.pod_ipv4(1), 0)))
        .unwrap()
        .unwrap();
    let addr = listener.local_addr().unwrap();
    let accept = std::thread::spawn(move || listener.accept().map(|(_, peer)| peer));
    let stream = lab.pod_ns(0).tcp_connect(addr, DEFAULT_TIMEOUT).unwrap();
    assert_eq!(
        stream.local_addr().unwrap().ip(),
        IpAddr::from(lab.pod_ipv4(0))
    );
    assert_eq!(
        accept.join().unwrap().unwrap().ip(),
        IpAddr::from(lab.pod_ipv4(0))
    );
    // The Pod's own namespace sees its interface.
    let pod_if = lab.pod_ns(0).ifindex("eth0").unwrap();
    assert!(pod_if > 1);
    // A panic inside propagates.
    let panicked = std::panic::catch_unwind(|| lab.pod_ns(0).in_ns(|| panic!("boom")));
    assert!(panicked.is_err());
}

#[test]
fn drop_removes_every_namespace() {
    let lab = lab("drop", LabConfig::default());
    let prefix = lab.prefix().to_string();
    assert_eq!(namespaces_of(&prefix).len(), 5, "gw, node and 3 pods");
    drop(lab);
    assert_eq!(namespaces_of(&prefix), Vec::<String>::new());
}

#[test]
fn drop_on_panic_removes_every_namespace() {
    require_root();
    let (tx, rx) = std::sync::mpsc::channel();
    let result = std::panic::catch_unwind(move || {
        let mut lab = Lab::new(
            "panic",
            LabConfig {
                pods: 1,
                ..LabConfig::default()
            },
        )
        .unwrap();
        lab.add_pod().unwrap();
        lab.remove_pod(0).unwrap();
        tx.send(lab.prefix().to_string()).unwrap();
        panic!("test panic with a live lab");
    });
    assert!(result.is_err());
    let prefix = rx.recv().unwrap();
    assert_eq!(namespaces_of(&prefix), Vec::<String>::new());
}

#[test]
fn parallel_labs_are_isolated() {
    require_root();
    let handles: Vec<_> = (0..3)
        .map(|i| {
            std::thread::spawn(move || {
                let lab = Lab::new(
                    &format!("par{i}"),
                    LabConfig {
                        pods: 2,
                        ..LabConfig::default()
                    },
                )
                .unwrap();
                lab.pod_ns(0).ping(lab.pod_ipv4(1), 1).unwrap();
                check_udp(&lab, 1, 0, IpFamily::V6);
                lab.prefix().to_string()
            })
        })
        .collect();
    let prefixes: Vec<String> = handles.into_iter().map(|h| h.join().unwrap()).collect();
    for p in &prefixes {
        assert!(namespaces_of(p).is_empty());
    }
    assert_eq!(
        prefixes
            .iter()
            .collect::<std::collections::HashSet<_>>()
            .len(),
        prefixes.len(),
        "unique prefixes"
    );
}

#[test]
fn stale_namespaces_of_dead_processes_are_cleaned_up() {
    require_root();
    // A pid that no process has any more.
    let mut child = std::process::Command::new("true").spawn().unwrap();
    let dead = child.id();
    child.wait().unwrap();
    let stale = Netns::create(format!("lab-stale-{dead}-0-node")).unwrap();
    let ours = Netns::create(format!("lab-stale-{}-99999-gw", std::process::id())).unwrap();

    // (A parallel test's first `Lab::new` may have removed it already.)
    let removed = visibility_tests::lab::cleanup_stale_labs().unwrap();
    assert!(!stale.exists(), "stale namespace left; removed {removed:?}");
    assert!(!removed.contains(&ours.name().to_string()));
    assert!(ours.exists(), "a live process's namespace was removed");
    ours.delete().unwrap();
    assert!(!ours.exists());
    ours.delete().unwrap(); // already gone is fine
}

#[test]
fn too_many_pods_is_an_error() {
    require_root();
    let err = Lab::new(
        "big",
        LabConfig {
            pods: 300,
            ..LabConfig::default()
        },
    )
    .unwrap_err();
    assert!(err.to_string().contains("at most"), "{err:#}");
}

/// A neighbour node behind the same gateway: its Pods have ranges of their own and
/// reach the first node's Pods, both families, through the gateway (plain routing). Its
/// drop removes its namespaces and its link at the gateway, and leaves the first lab
/// working.
#[test]
fn a_neighbour_node_reaches_the_first_through_the_gateway_and_goes_alone() {
    let first = lab(
        "neighbour",
        LabConfig {
            pods: 1,
            ..LabConfig::default()
        },
    );
    let second = first
        .neighbour(
            "neighbour2",
            LabConfig {
                pods: 1,
                ..LabConfig::default()
            },
        )
        .unwrap();
    assert_eq!(second.pod_ipv4(0), Ipv4Addr::new(10, 52, 1, 2));
    assert_eq!(second.pod_ipv6(0).to_string(), "fd00:52:1::2");
    let before = first.gateway_forwarded_packets().unwrap();
    for family in FAMILIES {
        second.pod_ns(0).ping(first.pod_ip(0, family), 1).unwrap();
        first.pod_ns(0).ping(second.pod_ip(0, family), 1).unwrap();
    }
    // Each ping crosses the gateway twice (request and reply).
    assert!(first.gateway_forwarded_packets().unwrap() >= before + 8);

    let prefix = second.prefix().to_owned();
    drop(second);
    assert!(namespaces_of(&prefix).is_empty());
    assert!(first.gateway().run("ip", ["link", "show", "eth1"]).is_err());
    assert!(first.gateway().exists());
    first
        .pod_ns(0)
        .ping(Lab::gateway_ip(IpFamily::V4), 1)
        .unwrap();
}
