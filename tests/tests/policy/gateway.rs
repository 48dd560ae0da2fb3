//! The gateway stays in the path of every packet of a same-node Pod pair: its firewall
//! stops fragments too, a spoofed source is not delivered through it, and a packet over
//! the uplink's MTU is answered as a router would.

use visibility_common::counters::Counter;
use visibility_tests::require_root;
use visibility_tests::{
    lab::{Lab, LabConfig, NODE_UPLINK},
    node::Node,
};

use crate::common::*;

/// A gateway firewall rule for a Pod pair stops small UDP, fragmented UDP and
/// fragmented pings alike: fragments take the gateway too. With visibility disabled the
/// gateway is out of the path, and all of it gets through.
#[test]
fn the_gateway_firewall_stops_fragments_too() {
    require_root();
    for family in FAMILIES {
        let node = started("pfrag", family);
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
        // Pod 0 takes Pod 2's address as a second one, and sends from it.
        let (received, counted) = borrowed_send(
            &node,
            (lab.pod_ns(0), "eth0"),
            spoofed,
            b"spoofed",
            WORKS,
            ("pod_egress", Counter::PassSpoofedSource),
        );
        assert_eq!(
            received, 1,
            "{family:?}: delivered on the node, as without visibility"
        );
        assert!(counted > 0, "{family:?}: counted as spoofed");
        assert!(
            !lab.gateway_flows()
                .unwrap()
                .iter()
                .any(|flow| flow.is_between(spoofed, dst)),
            "{family:?}: the gateway saw the spoofed packet"
        );
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
        let out = ping(lab, (0, 1), family, 1440, &["-M", "do"]).unwrap();
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
