//! What the datapath passes goes on unchanged: to a program attached after ours, and to a
//! plain UDP socket, once and with its source.

use std::net::SocketAddr;

use visibility_common::{hook::Hook, program_names};
use visibility_tests::require_root;
use visibility_tests::{datapath_harness::SoloProgram, lab::udp_recv, node::Node};

use crate::common::*;

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
