//! Tests of the decision logic, over fake lookups: one table per hook, one row per
//! branch, for both families.

use alloc::{format, string::String, vec::Vec};

use crate::{
    counters::Counter,
    packet::{Family, FragmentPart, IPPROTO_TCP, IPPROTO_UDP, Packet, Transport},
    verdict::{AddrKind, Hook, Leg, Lookups, NodeNat, Verdict, decide},
};

const FAMILIES: [Family; 2] = [Family::V4, Family::V6];

/// What every lookup answers. Address kinds come from the address's last byte (see
/// [`addr`]); everything else is set per row.
#[derive(Clone, Copy)]
struct Fake {
    enabled: bool,
    exempt: bool,
    gateway: bool,
    from_pod: bool,
    routes_to_sender: bool,
    node_nat: NodeNat,
    sent: bool,
    /// The source `pod_ingress` noted routes back to the sender.
    noted_routes_to_sender: bool,
    /// The flow was judged own-Pod-to-Pod lately: the lookups behind that judgement
    /// answer as if nothing matched, to show they are not asked.
    judged: bool,
}

/// The fake on a node where everything is in order: visibility on, a gateway, the
/// packet from a Pod interface with its Pod's own source, the node's NAT untouched.
const NORMAL: Fake = Fake {
    enabled: true,
    exempt: false,
    gateway: true,
    from_pod: true,
    routes_to_sender: true,
    node_nat: NodeNat::Unchanged,
    sent: true,
    noted_routes_to_sender: true,
    judged: false,
};

/// A flow judged lately, on a node whose Pod-CIDR, interface and route lookups would
/// all say no.
const JUDGED: Fake = Fake {
    judged: true,
    from_pod: false,
    routes_to_sender: false,
    ..NORMAL
};

const POD_A: u8 = 10;
const POD_B: u8 = 20;
const NODE: u8 = 1;
const OUTSIDE: u8 = 200;

/// An address of `family` whose kind its last byte tells: [`NODE`], [`OUTSIDE`], or a
/// Pod.
fn addr(family: Family, last: u8) -> [u8; 16] {
    let mut out = [0u8; 16];
    match family {
        Family::V4 => out[..4].copy_from_slice(&[10, 0, 1, last]),
        Family::V6 => {
            out[0] = 0xfd;
            out[15] = last;
        }
    }
    out
}

fn last_byte(family: Family, addr: &[u8; 16]) -> u8 {
    match family {
        Family::V4 => addr[3],
        Family::V6 => addr[15],
    }
}

impl Lookups for Fake {
    fn enabled(&self) -> bool {
        self.enabled
    }
    fn addr_kind(&self, family: Family, addr: &[u8; 16]) -> AddrKind {
        match last_byte(family, addr) {
            NODE => AddrKind::Node,
            OUTSIDE => AddrKind::Outside,
            _ => AddrKind::Pod,
        }
    }
    fn is_exempt(&self, _: Family, _: &[u8; 16], _: u8, _: u16) -> bool {
        self.exempt
    }
    fn has_gateway(&self, _: Family) -> bool {
        self.gateway
    }
    fn judged_own_pod_flow(&self, _: &Packet) -> bool {
        self.judged
    }
    fn entered_from_pod(&self) -> bool {
        self.from_pod
    }
    fn source_routes_to_sender(&self, packet: &Packet) -> bool {
        // Only a Pod's own address routes to its interface.
        self.routes_to_sender && self.addr_kind(packet.family, &packet.src) == AddrKind::Pod
    }
    fn node_nat(&self, _: &Packet) -> NodeNat {
        self.node_nat
    }
    fn noted_source_routes_to_sender(&self, _: &Packet) -> bool {
        self.noted_routes_to_sender
    }
    fn was_sent(&self, _: &Packet) -> bool {
        self.sent
    }
}

fn packet(family: Family, src: u8, dst: u8) -> Packet {
    Packet {
        family,
        src: addr(family, src),
        dst: addr(family, dst),
        protocol: IPPROTO_TCP,
        src_port: 40000,
        dst_port: 8080,
        tcp_flags: 0x02,
        ttl: 64,
        ip_len: 60,
        fragment: FragmentPart::Whole,
        transport: Transport::Read,
        fragment_id: 0,
        l4_offset: 34,
    }
}

/// One row: a name, the packet's source and destination kinds, how the fake answers,
/// and the verdict.
struct Row {
    name: &'static str,
    src: u8,
    dst: u8,
    fake: Fake,
    verdict: Verdict,
}

/// Rows both Pod-side hooks judge alike: a Pod's packet that leaves the Pod CIDRs
/// (a Service, the internet) and one to the node itself.
const FROM_A_POD_TO_OUTSIDE: Row = Row {
    name: "to an address outside the Pod CIDRs (a Service, the internet)",
    src: POD_A,
    dst: OUTSIDE,
    fake: NORMAL,
    verdict: Verdict::Pass(Counter::PassNotSameNode),
};
const FROM_A_POD_TO_THE_NODE: Row = Row {
    name: "to the node",
    src: POD_A,
    dst: NODE,
    fake: NORMAL,
    verdict: Verdict::Pass(Counter::PassNodeAddress),
};

fn check(hook: Hook, rows: &[Row]) {
    let mut failures: Vec<String> = Vec::new();
    for family in FAMILIES {
        for row in rows {
            let got = decide(hook, &packet(family, row.src, row.dst), &row.fake);
            if got != row.verdict {
                failures.push(format!(
                    "{} {:?} {}: {got:?}, expected {:?}",
                    hook.name(),
                    family,
                    row.name,
                    row.verdict
                ));
            }
        }
    }
    assert!(failures.is_empty(), "{failures:#?}");
}

#[test]
fn pod_ingress_only_counts() {
    use Counter::*;
    let rows = [
        Row {
            name: "pod to pod goes to the node's stack, judged at egress",
            src: POD_A,
            dst: POD_B,
            fake: NORMAL,
            verdict: Verdict::Pass(PassPodToPod),
        },
        Row {
            name: "with visibility off, the same",
            src: POD_A,
            dst: POD_B,
            fake: Fake {
                enabled: false,
                ..NORMAL
            },
            verdict: Verdict::Pass(PassPodToPod),
        },
        FROM_A_POD_TO_OUTSIDE,
        FROM_A_POD_TO_THE_NODE,
    ];
    check(Hook::PodIngress, &rows);
}

#[test]
fn pod_egress_sends_pod_to_pod_after_the_node_stack() {
    use Counter::*;
    let rows = [
        Row {
            name: "a flow judged lately skips the lookups behind that judgement",
            src: OUTSIDE,
            dst: OUTSIDE,
            fake: JUDGED,
            verdict: Verdict::ToGateway(Leg::Direct),
        },
        Row {
            name: "a flow judged lately: the node's DNAT still makes it a Service leg",
            src: POD_A,
            dst: POD_B,
            fake: Fake {
                node_nat: NodeNat::DestinationChanged,
                ..JUDGED
            },
            verdict: Verdict::ToGateway(Leg::ServiceLeg),
        },
        Row {
            name: "a flow judged lately: visibility off still keeps it local",
            src: POD_A,
            dst: POD_B,
            fake: Fake {
                enabled: false,
                ..JUDGED
            },
            verdict: Verdict::Pass(PassDisabled),
        },
        Row {
            name: "a flow judged lately: an exemption still keeps it local",
            src: POD_A,
            dst: POD_B,
            fake: Fake {
                exempt: true,
                ..JUDGED
            },
            verdict: Verdict::Pass(PassExempt),
        },
        Row {
            name: "a flow judged lately: without a gateway it stays local",
            src: POD_A,
            dst: POD_B,
            fake: Fake {
                gateway: false,
                ..JUDGED
            },
            verdict: Verdict::Pass(PassNoGateway),
        },
        Row {
            name: "pod to pod, unchanged by the node",
            src: POD_A,
            dst: POD_B,
            fake: NORMAL,
            verdict: Verdict::ToGateway(Leg::Direct),
        },
        Row {
            name: "the node's DNAT chose the Pod (Service traffic)",
            src: POD_A,
            dst: POD_B,
            fake: Fake {
                node_nat: NodeNat::DestinationChanged,
                ..NORMAL
            },
            verdict: Verdict::ToGateway(Leg::ServiceLeg),
        },
        Row {
            name: "what the Pod sent was not seen: still pod to pod",
            src: POD_A,
            dst: POD_B,
            fake: Fake {
                node_nat: NodeNat::Unknown,
                ..NORMAL
            },
            verdict: Verdict::ToGateway(Leg::Direct),
        },
        Row {
            name: "a Service reply whose Pod source can be put back",
            src: OUTSIDE,
            dst: POD_B,
            fake: Fake {
                node_nat: NodeNat::SourceRestorable,
                ..NORMAL
            },
            verdict: Verdict::ToGateway(Leg::ServiceReply),
        },
        Row {
            name: "a Service reply whose noted source is not the sender's: never sent in its name",
            src: OUTSIDE,
            dst: POD_B,
            fake: Fake {
                node_nat: NodeNat::SourceRestorable,
                noted_routes_to_sender: false,
                ..NORMAL
            },
            verdict: Verdict::Pass(PassSpoofedSource),
        },
        Row {
            name: "a Service reply whose source cannot be put back (ICMP error)",
            src: OUTSIDE,
            dst: POD_B,
            fake: Fake {
                node_nat: NodeNat::SourceUnrestorable,
                ..NORMAL
            },
            verdict: Verdict::Pass(PassServiceReplyUnrestorable),
        },
        Row {
            name: "from a Pod interface with a source outside every Pod CIDR",
            src: OUTSIDE,
            dst: POD_B,
            fake: Fake {
                node_nat: NodeNat::Unknown,
                ..NORMAL
            },
            verdict: Verdict::Pass(PassNotSameNode),
        },
        Row {
            name: "a spoofed Pod source: never sent in another Pod's name",
            src: POD_A,
            dst: POD_B,
            fake: Fake {
                routes_to_sender: false,
                ..NORMAL
            },
            verdict: Verdict::Pass(PassSpoofedSource),
        },
        Row {
            name: "a spoofed source is told as such even with visibility off",
            src: POD_A,
            dst: POD_B,
            fake: Fake {
                routes_to_sender: false,
                enabled: false,
                ..NORMAL
            },
            verdict: Verdict::Pass(PassSpoofedSource),
        },
        Row {
            name: "entered the node elsewhere (the uplink, the node itself)",
            src: POD_A,
            dst: POD_B,
            fake: Fake {
                from_pod: false,
                ..NORMAL
            },
            verdict: Verdict::Pass(PassNotFromPod),
        },
        Row {
            name: "masqueraded by the node (a Pod reaching itself through a Service)",
            src: NODE,
            dst: POD_B,
            fake: NORMAL,
            verdict: Verdict::Pass(PassNodeAddress),
        },
        FROM_A_POD_TO_OUTSIDE,
        FROM_A_POD_TO_THE_NODE,
        Row {
            name: "visibility off",
            src: POD_A,
            dst: POD_B,
            fake: Fake {
                enabled: false,
                ..NORMAL
            },
            verdict: Verdict::Pass(PassDisabled),
        },
        Row {
            name: "exempt",
            src: POD_A,
            dst: POD_B,
            fake: Fake {
                exempt: true,
                ..NORMAL
            },
            verdict: Verdict::Pass(PassExempt),
        },
        Row {
            name: "no gateway for the family",
            src: POD_A,
            dst: POD_B,
            fake: Fake {
                gateway: false,
                ..NORMAL
            },
            verdict: Verdict::Pass(PassNoGateway),
        },
    ];
    check(Hook::PodEgress, &rows);
}

#[test]
fn uplink_delivers_only_what_the_datapath_sent() {
    use Counter::*;
    let unsent = Fake {
        sent: false,
        ..NORMAL
    };
    let rows = [
        Row {
            name: "a packet of a flow sent to the gateway",
            src: POD_A,
            dst: POD_B,
            fake: NORMAL,
            verdict: Verdict::ToPod,
        },
        Row {
            name: "sent while visibility was on, back after it went off",
            src: POD_A,
            dst: POD_B,
            fake: Fake {
                enabled: false,
                ..NORMAL
            },
            verdict: Verdict::ToPod,
        },
        Row {
            name: "claims a Pod source, never sent: to the node's stack",
            src: POD_A,
            dst: POD_B,
            fake: unsent,
            verdict: Verdict::Pass(PassUnsentPodToPod),
        },
        Row {
            name: "from another node's Pod",
            src: OUTSIDE,
            dst: POD_B,
            fake: unsent,
            verdict: Verdict::Pass(PassNotSameNode),
        },
        Row {
            name: "to the node",
            src: OUTSIDE,
            dst: NODE,
            fake: unsent,
            verdict: Verdict::Pass(PassNodeAddress),
        },
        Row {
            name: "from the node's Pod-side address",
            src: NODE,
            dst: POD_B,
            fake: unsent,
            verdict: Verdict::Pass(PassNodeAddress),
        },
        Row {
            name: "to somewhere else",
            src: POD_A,
            dst: OUTSIDE,
            fake: unsent,
            verdict: Verdict::Pass(PassNotSameNode),
        },
    ];
    check(Hook::Uplink, &rows);
}

#[test]
fn a_returning_packet_without_a_hop_left_goes_to_the_node_stack() {
    for family in FAMILIES {
        let mut p = packet(family, POD_A, POD_B);
        p.ttl = 1;
        assert_eq!(
            decide(Hook::Uplink, &p, &NORMAL),
            Verdict::Pass(Counter::PassTtlExpired)
        );
    }
}

#[test]
fn link_scope_is_passed_everywhere() {
    for family in FAMILIES {
        let mut p = packet(family, POD_A, POD_B);
        match family {
            Family::V4 => p.dst[..4].copy_from_slice(&[224, 0, 0, 251]),
            Family::V6 => p.dst = [0xff, 2, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0xfb],
        }
        for hook in Hook::ALL {
            assert_eq!(
                decide(*hook, &p, &NORMAL).counter(),
                Counter::PassLinkScope,
                "{hook:?} {family:?}"
            );
        }
    }
}

#[test]
fn verdicts_count_in_their_slots() {
    assert_eq!(
        Verdict::ToGateway(Leg::Direct).counter(),
        Counter::RedirectedToGateway
    );
    assert_eq!(
        Verdict::ToGateway(Leg::ServiceLeg).counter(),
        Counter::RedirectedServiceLeg
    );
    assert_eq!(
        Verdict::ToGateway(Leg::ServiceReply).counter(),
        Counter::RedirectedServiceReply
    );
    assert_eq!(Verdict::ToPod.counter(), Counter::DeliveredFromGateway);
    for counter in Counter::ALL {
        assert_eq!(Counter::from_index(*counter as u32), Some(*counter));
        assert_eq!(
            counter.is_redirect_to_gateway(),
            crate::flow::Path::of_sent(*counter).is_some_and(|p| p.takes_gateway()),
            "{counter:?}"
        );
        assert_eq!(
            Leg::of_counter(*counter).map(Leg::counter),
            counter.is_redirect_to_gateway().then_some(*counter),
            "{counter:?}"
        );
    }
    assert_eq!(Counter::from_index(Counter::ALL.len() as u32), None);
}

#[test]
fn udp_is_judged_like_tcp() {
    for family in FAMILIES {
        let mut p = packet(family, POD_A, POD_B);
        p.protocol = IPPROTO_UDP;
        assert_eq!(
            decide(Hook::PodEgress, &p, &NORMAL),
            Verdict::ToGateway(Leg::Direct)
        );
    }
}
