//! Tests of the decision logic, over fake map lookups that also record which
//! questions a decision asked.

use alloc::{vec, vec::Vec};
use core::cell::{Cell, RefCell};

use crate::{
    config::{ANY, ExemptRule, ExemptRules, MAX_EXEMPT_RULES},
    counters::Counter,
    flow::Path,
    packet::{Family, IPPROTO_ICMP, IPPROTO_ICMPV6, IPPROTO_TCP, IPPROTO_UDP, Packet, parse},
    testing::{FrameBuilder, Transport},
    verdict::{AddrKind, Context, Hook, Lookups, Verdict, decide},
};

const HOOKS: [Hook; 3] = [Hook::PodIngress, Hook::PodEgress, Hook::Uplink];
const POD_HOOKS: [Hook; 2] = [Hook::PodIngress, Hook::PodEgress];
const FAMILIES: [Family; 2] = [Family::V4, Family::V6];

// ---------------------------------------------------------------------------
// The fake maps
// ---------------------------------------------------------------------------

/// A prefix of one family; IPv4 in the first four bytes.
#[derive(Clone, Copy, Debug)]
struct Prefix {
    family: Family,
    addr: [u8; 16],
    len: u8,
}

impl Prefix {
    fn contains(&self, family: Family, addr: &[u8; 16]) -> bool {
        if family != self.family {
            return false;
        }
        let bits = usize::from(self.len);
        let whole = bits / 8;
        if addr[..whole] != self.addr[..whole] {
            return false;
        }
        let rest = bits % 8;
        if rest == 0 {
            return true;
        }
        let mask = 0xffu8 << (8 - rest);
        addr[whole] & mask == self.addr[whole] & mask
    }
}

/// One question a decision asked.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
enum Call {
    Enabled,
    AddrKind([u8; 16]),
    IsExempt([u8; 16], u8, u16),
    HasGateway(Family),
    IsNatReply,
}

/// Maps as plain lists, the way userspace would fill them.
struct FakeMaps {
    pod_cidrs: Vec<Prefix>,
    node_addrs: Vec<(Family, [u8; 16])>,
    exempt: Vec<(Prefix, ExemptRules)>,
    enabled: bool,
    gateway_v4: bool,
    gateway_v6: bool,
    /// What the NAT-leg map says of every packet.
    nat_reply: Cell<bool>,
    calls: RefCell<Vec<Call>>,
}

impl Lookups for FakeMaps {
    fn enabled(&self) -> bool {
        self.calls.borrow_mut().push(Call::Enabled);
        self.enabled
    }

    fn addr_kind(&self, family: Family, addr: &[u8; 16]) -> AddrKind {
        self.calls.borrow_mut().push(Call::AddrKind(*addr));
        // Like the trie userspace fills: node addresses only count inside a Pod CIDR.
        if !self.pod_cidrs.iter().any(|p| p.contains(family, addr)) {
            AddrKind::Outside
        } else if self
            .node_addrs
            .iter()
            .any(|(f, a)| *f == family && a == addr)
        {
            AddrKind::Node
        } else {
            AddrKind::Pod
        }
    }

    fn is_exempt(&self, family: Family, addr: &[u8; 16], protocol: u8, port: u16) -> bool {
        self.calls
            .borrow_mut()
            .push(Call::IsExempt(*addr, protocol, port));
        // Like the LPM trie: only the longest matching prefix counts.
        self.exempt
            .iter()
            .filter(|(p, _)| p.contains(family, addr))
            .max_by_key(|(p, _)| p.len)
            .is_some_and(|(_, rules)| rules.matches(protocol, port))
    }

    fn is_nat_reply(&self, _packet: &Packet) -> bool {
        self.calls.borrow_mut().push(Call::IsNatReply);
        self.nat_reply.get()
    }

    fn has_gateway(&self, family: Family) -> bool {
        self.calls.borrow_mut().push(Call::HasGateway(family));
        match family {
            Family::V4 => self.gateway_v4,
            Family::V6 => self.gateway_v6,
        }
    }
}

impl FakeMaps {
    fn calls(&self) -> Vec<Call> {
        self.calls.borrow().clone()
    }

    fn asked(&self, f: impl Fn(&Call) -> bool) -> bool {
        self.calls.borrow().iter().any(f)
    }

    fn forget_calls(&self) {
        self.calls.borrow_mut().clear();
    }
}

fn v4(a: u8, b: u8, c: u8, d: u8) -> [u8; 16] {
    let mut out = [0u8; 16];
    out[..4].copy_from_slice(&[a, b, c, d]);
    out
}

fn v6(words: [u16; 8]) -> [u8; 16] {
    let mut out = [0u8; 16];
    for (i, w) in words.iter().enumerate() {
        out[2 * i..2 * i + 2].copy_from_slice(&w.to_be_bytes());
    }
    out
}

fn rules(list: &[(u8, u16)]) -> ExemptRules {
    let mut out = ExemptRules::default();
    for (i, &(protocol, port)) in list.iter().enumerate() {
        out.rules[i] = ExemptRule {
            protocol,
            port,
            ..Default::default()
        };
    }
    out.len = u32::try_from(list.len()).unwrap();
    out
}

/// Addresses of one family on a node whose Pods live in one /24 (or /64).
#[derive(Clone, Copy)]
struct Addrs {
    family: Family,
    /// Two ordinary Pods.
    pod_a: [u8; 16],
    pod_b: [u8; 16],
    /// The node's own address on the Pod side (inside the Pod CIDR).
    node_in_cidr: [u8; 16],
    /// The node's address on the uplink (outside the Pod CIDR).
    node_uplink: [u8; 16],
    /// A Pod on another node.
    remote_pod: [u8; 16],
    /// Somewhere on the internet.
    internet: [u8; 16],
    /// A Pod exempt for UDP and TCP port 53 only (a DNS cache).
    dns_pod: [u8; 16],
    /// A Pod in an exempt range that covers every protocol and port.
    exempt_any_pod: [u8; 16],
    /// A Pod in an exempt range for TCP, any port.
    exempt_tcp_pod: [u8; 16],
    /// Link-local and multicast addresses.
    link_local: [u8; 16],
    multicast: [u8; 16],
}

fn addrs(family: Family) -> Addrs {
    match family {
        Family::V4 => Addrs {
            family,
            pod_a: v4(10, 0, 1, 10),
            pod_b: v4(10, 0, 1, 20),
            node_in_cidr: v4(10, 0, 1, 1),
            node_uplink: v4(192, 168, 0, 5),
            remote_pod: v4(10, 0, 2, 10),
            internet: v4(8, 8, 8, 8),
            dns_pod: v4(10, 0, 1, 53),
            exempt_any_pod: v4(10, 0, 1, 200),
            exempt_tcp_pod: v4(10, 0, 1, 130),
            link_local: v4(169, 254, 169, 254),
            multicast: v4(224, 0, 0, 251),
        },
        Family::V6 => Addrs {
            family,
            pod_a: v6([0xfd00, 0, 0, 1, 0, 0, 0, 0x0a]),
            pod_b: v6([0xfd00, 0, 0, 1, 0, 0, 0, 0x14]),
            node_in_cidr: v6([0xfd00, 0, 0, 1, 0, 0, 0, 1]),
            node_uplink: v6([0x2001, 0xdb8, 0, 0, 0, 0, 0, 5]),
            remote_pod: v6([0xfd00, 0, 0, 2, 0, 0, 0, 0x0a]),
            internet: v6([0x2001, 0x4860, 0x4860, 0, 0, 0, 0, 0x8888]),
            dns_pod: v6([0xfd00, 0, 0, 1, 0, 0, 0, 0x35]),
            exempt_any_pod: v6([0xfd00, 0, 0, 1, 0, 0, 0, 0xc8]),
            exempt_tcp_pod: v6([0xfd00, 0, 0, 1, 0, 0, 0, 0x82]),
            link_local: v6([0xfe80, 0, 0, 0, 0, 0, 0, 1]),
            multicast: v6([0xff02, 0, 0, 0, 0, 0, 0, 0xfb]),
        },
    }
}

/// Both families configured: visibility on, both gateways, the usual exemptions.
fn maps() -> FakeMaps {
    let a4 = addrs(Family::V4);
    let a6 = addrs(Family::V6);
    let dns = rules(&[(IPPROTO_UDP, 53), (IPPROTO_TCP, 53)]);
    FakeMaps {
        pod_cidrs: vec![
            Prefix {
                family: Family::V4,
                addr: v4(10, 0, 1, 0),
                len: 24,
            },
            Prefix {
                family: Family::V6,
                addr: v6([0xfd00, 0, 0, 1, 0, 0, 0, 0]),
                len: 64,
            },
        ],
        node_addrs: vec![
            (Family::V4, a4.node_in_cidr),
            (Family::V4, a4.node_uplink),
            (Family::V6, a6.node_in_cidr),
            (Family::V6, a6.node_uplink),
        ],
        exempt: vec![
            (
                Prefix {
                    family: Family::V4,
                    addr: a4.dns_pod,
                    len: 32,
                },
                dns,
            ),
            (
                Prefix {
                    family: Family::V6,
                    addr: a6.dns_pod,
                    len: 128,
                },
                dns,
            ),
            (
                Prefix {
                    family: Family::V4,
                    addr: v4(10, 0, 1, 192),
                    len: 26,
                },
                rules(&[(ANY as u8, ANY)]),
            ),
            (
                Prefix {
                    family: Family::V6,
                    addr: a6.exempt_any_pod,
                    len: 126,
                },
                rules(&[(ANY as u8, ANY)]),
            ),
            (
                Prefix {
                    family: Family::V4,
                    addr: v4(10, 0, 1, 128),
                    len: 28,
                },
                rules(&[(IPPROTO_TCP, ANY)]),
            ),
            (
                Prefix {
                    family: Family::V6,
                    addr: a6.exempt_tcp_pod,
                    len: 124,
                },
                rules(&[(IPPROTO_TCP, ANY)]),
            ),
        ],
        enabled: true,
        gateway_v4: true,
        gateway_v6: true,
        nat_reply: Cell::new(false),
        calls: RefCell::new(Vec::new()),
    }
}

fn packet(
    family: Family,
    src: [u8; 16],
    dst: [u8; 16],
    protocol: u8,
    src_port: u16,
    dst_port: u16,
) -> Packet {
    Packet {
        family,
        src,
        dst,
        protocol,
        src_port,
        dst_port,
        tcp_flags: 0,
        ttl: 64,
        ip_len: 60,
    }
}

/// A TCP packet from Pod A to Pod B.
fn pod_to_pod(a: &Addrs) -> Packet {
    packet(a.family, a.pod_a, a.pod_b, IPPROTO_TCP, 40_000, 8080)
}

fn with_ttl(mut packet: Packet, ttl: u8) -> Packet {
    packet.ttl = ttl;
    packet
}

/// The facts of a packet that are not addresses: its context, and what the NAT-leg
/// map says of it.
#[derive(Clone, Copy, Debug)]
struct Situation {
    ctx: Context,
    nat_reply: bool,
}

const PLAIN: Situation = Situation {
    ctx: Context {
        masquerade_marked: false,
        from_uplink: false,
    },
    nat_reply: false,
};
const MARKED: Situation = Situation {
    ctx: Context {
        masquerade_marked: true,
        from_uplink: false,
    },
    nat_reply: false,
};
const FROM_UPLINK: Situation = Situation {
    ctx: Context {
        masquerade_marked: false,
        from_uplink: true,
    },
    nat_reply: false,
};
const NAT_REPLY: Situation = Situation {
    ctx: Context {
        masquerade_marked: false,
        from_uplink: false,
    },
    nat_reply: true,
};
/// Every fact at once.
const EVERYTHING: Situation = Situation {
    ctx: Context {
        masquerade_marked: true,
        from_uplink: true,
    },
    nat_reply: true,
};

/// [`decide`] in a situation.
fn decide_in(hook: Hook, packet: &Packet, situation: &Situation, maps: &FakeMaps) -> Verdict {
    maps.nat_reply.set(situation.nat_reply);
    decide(hook, packet, &situation.ctx, maps)
}

/// What Pod-to-Pod traffic that nothing exempts becomes at each hook.
fn normal(hook: Hook) -> Verdict {
    match hook {
        Hook::PodIngress | Hook::PodEgress => Verdict::ToGateway,
        Hook::Uplink => Verdict::ToPod,
    }
}

// ---------------------------------------------------------------------------
// One branch at a time, for every hook and family
// ---------------------------------------------------------------------------

#[test]
fn pod_to_pod_goes_to_the_gateway_and_comes_back_to_the_pod() {
    let m = maps();
    for family in FAMILIES {
        let a = addrs(family);
        for p in [
            pod_to_pod(&a),
            packet(family, a.pod_b, a.pod_a, IPPROTO_UDP, 5000, 6000),
            packet(
                family,
                a.pod_a,
                a.pod_b,
                if family == Family::V4 {
                    IPPROTO_ICMP
                } else {
                    IPPROTO_ICMPV6
                },
                7,
                0x0800,
            ),
            packet(family, a.pod_a, a.pod_b, 47, 0, 0),
            with_ttl(pod_to_pod(&a), 2),
            with_ttl(pod_to_pod(&a), 255),
        ] {
            assert_eq!(
                decide_in(Hook::PodIngress, &p, &PLAIN, &m),
                Verdict::ToGateway,
                "{p:?}"
            );
            assert_eq!(
                decide_in(Hook::PodEgress, &p, &PLAIN, &m),
                Verdict::ToGateway,
                "{p:?}"
            );
            assert_eq!(
                decide_in(Hook::Uplink, &p, &PLAIN, &m),
                Verdict::ToPod,
                "{p:?}"
            );
        }
    }
}

#[test]
fn link_scope_is_passed_at_every_hook_without_any_lookup() {
    let m = maps();
    for family in FAMILIES {
        let a = addrs(family);
        let broadcast_or_unspecified = match family {
            Family::V4 => v4(255, 255, 255, 255),
            Family::V6 => [0; 16],
        };
        for (src, dst) in [
            (a.pod_a, a.link_local),
            (a.link_local, a.pod_a),
            (a.pod_a, a.multicast),
            (a.link_local, a.multicast),
            (a.pod_a, broadcast_or_unspecified),
            (broadcast_or_unspecified, a.pod_b),
        ] {
            for hook in HOOKS {
                for ctx in [PLAIN, MARKED, FROM_UPLINK, NAT_REPLY] {
                    m.forget_calls();
                    let p = packet(family, src, dst, IPPROTO_UDP, 68, 67);
                    assert_eq!(
                        decide_in(hook, &p, &ctx, &m),
                        Verdict::Pass(Counter::PassLinkScope),
                        "{hook:?} {p:?}"
                    );
                    assert_eq!(m.calls(), vec![], "link scope needs no lookups");
                }
            }
        }
    }
}

#[test]
fn traffic_not_between_pods_of_this_node_is_passed() {
    let m = maps();
    for family in FAMILIES {
        let a = addrs(family);
        for (src, dst) in [
            (a.pod_a, a.remote_pod),
            (a.remote_pod, a.pod_a),
            (a.pod_a, a.internet),
            (a.internet, a.pod_a),
            (a.remote_pod, a.internet),
            (a.pod_a, a.node_uplink),
            (a.node_uplink, a.pod_a),
        ] {
            for hook in HOOKS {
                for ctx in [PLAIN, MARKED, FROM_UPLINK, NAT_REPLY] {
                    m.forget_calls();
                    let p = packet(family, src, dst, IPPROTO_TCP, 1234, 80);
                    assert_eq!(
                        decide_in(hook, &p, &ctx, &m),
                        Verdict::Pass(Counter::PassNotSameNode),
                        "{hook:?} {p:?}"
                    );
                    // Nor the NAT-leg map, which only Pod-to-Pod packets need.
                    assert!(!m.asked(|c| matches!(
                        c,
                        Call::Enabled | Call::HasGateway(_) | Call::IsNatReply
                    )));
                }
            }
        }
    }
}

#[test]
fn pod_cidrs_of_the_other_family_do_not_count() {
    // An IPv6 packet whose addresses begin with the IPv4 Pod CIDR's bytes.
    let m = maps();
    let a4 = addrs(Family::V4);
    let p = packet(Family::V6, a4.pod_a, a4.pod_b, IPPROTO_TCP, 1, 2);
    for hook in HOOKS {
        assert_eq!(
            decide_in(hook, &p, &PLAIN, &m),
            Verdict::Pass(Counter::PassNotSameNode)
        );
    }
}

#[test]
fn traffic_to_or_from_the_node_is_passed() {
    let m = maps();
    for family in FAMILIES {
        let a = addrs(family);
        for (src, dst) in [(a.pod_a, a.node_in_cidr), (a.node_in_cidr, a.pod_a)] {
            for hook in HOOKS {
                for ctx in [PLAIN, MARKED, FROM_UPLINK, NAT_REPLY] {
                    m.forget_calls();
                    let p = packet(family, src, dst, IPPROTO_TCP, 1234, 10250);
                    assert_eq!(
                        decide_in(hook, &p, &ctx, &m),
                        Verdict::Pass(Counter::PassNodeAddress),
                        "{hook:?} {p:?}"
                    );
                    assert!(!m.asked(|c| matches!(
                        c,
                        Call::Enabled | Call::IsExempt(..) | Call::HasGateway(_)
                    )));
                }
            }
        }
    }
}

#[test]
fn masquerade_mark_keeps_pod_traffic_local() {
    let m = maps();
    for family in FAMILIES {
        let p = pod_to_pod(&addrs(family));
        for hook in POD_HOOKS {
            m.forget_calls();
            assert_eq!(
                decide_in(hook, &p, &MARKED, &m),
                Verdict::Pass(Counter::PassMasqueradeMark),
                "{hook:?}"
            );
            assert!(
                !m.asked(|c| matches!(c, Call::Enabled | Call::IsExempt(..) | Call::HasGateway(_)))
            );
        }
        // The mark means nothing on what comes back from the gateway.
        assert_eq!(decide_in(Hook::Uplink, &p, &MARKED, &m), Verdict::ToPod);
    }
}

#[test]
fn packets_that_came_back_from_the_uplink_are_not_sent_again() {
    let m = maps();
    for family in FAMILIES {
        let p = pod_to_pod(&addrs(family));
        m.forget_calls();
        assert_eq!(
            decide_in(Hook::PodEgress, &p, &FROM_UPLINK, &m),
            Verdict::Pass(Counter::PassReturned)
        );
        assert!(
            !m.asked(|c| matches!(c, Call::Enabled | Call::IsExempt(..) | Call::HasGateway(_)))
        );
        // Only egress knows where a packet came in.
        assert_eq!(
            decide_in(Hook::PodIngress, &p, &FROM_UPLINK, &m),
            Verdict::ToGateway
        );
        assert_eq!(
            decide_in(Hook::Uplink, &p, &FROM_UPLINK, &m),
            Verdict::ToPod
        );
    }
}

#[test]
fn disabled_passes_pod_traffic_but_still_delivers_returning_packets() {
    let mut m = maps();
    m.enabled = false;
    for family in FAMILIES {
        let a = addrs(family);
        let p = pod_to_pod(&a);
        for hook in POD_HOOKS {
            m.forget_calls();
            assert_eq!(
                decide_in(hook, &p, &PLAIN, &m),
                Verdict::Pass(Counter::PassDisabled),
                "{hook:?}"
            );
            assert!(!m.asked(|c| matches!(c, Call::IsExempt(..) | Call::HasGateway(_))));
        }
        // Packets already on their way back must still reach the Pod.
        m.forget_calls();
        assert_eq!(decide_in(Hook::Uplink, &p, &PLAIN, &m), Verdict::ToPod);
        assert!(
            !m.asked(|c| *c == Call::Enabled),
            "the uplink does not ask whether visibility is on"
        );
    }
}

#[test]
fn exempt_destinations_stay_local_for_their_protocols_and_ports() {
    let m = maps();
    for family in FAMILIES {
        let a = addrs(family);
        let icmp = if family == Family::V4 {
            IPPROTO_ICMP
        } else {
            IPPROTO_ICMPV6
        };
        // (destination, protocol, destination port, exempt)
        let cases = [
            (a.dns_pod, IPPROTO_UDP, 53, true),
            (a.dns_pod, IPPROTO_TCP, 53, true),
            (a.dns_pod, IPPROTO_UDP, 54, false),
            (a.dns_pod, IPPROTO_TCP, 80, false),
            (a.dns_pod, 132, 53, false), // SCTP to port 53 is not covered
            (a.dns_pod, icmp, 0x0800, false),
            (a.exempt_any_pod, IPPROTO_UDP, 9999, true),
            (a.exempt_any_pod, IPPROTO_TCP, 1, true),
            (a.exempt_any_pod, icmp, 0x0800, true),
            (a.exempt_any_pod, 47, 0, true),
            (a.exempt_tcp_pod, IPPROTO_TCP, 443, true),
            (a.exempt_tcp_pod, IPPROTO_TCP, 65_535, true),
            (a.exempt_tcp_pod, IPPROTO_UDP, 443, false),
            (a.pod_b, IPPROTO_UDP, 53, false),
        ];
        for (dst, protocol, dst_port, exempt) in cases {
            let p = packet(family, a.pod_a, dst, protocol, 40_000, dst_port);
            for hook in POD_HOOKS {
                m.forget_calls();
                let expected = if exempt {
                    Verdict::Pass(Counter::PassExempt)
                } else {
                    Verdict::ToGateway
                };
                assert_eq!(decide_in(hook, &p, &PLAIN, &m), expected, "{hook:?} {p:?}");
                assert!(m.asked(|c| *c == Call::IsExempt(dst, protocol, dst_port)));
                if exempt {
                    assert!(!m.asked(|c| matches!(c, Call::HasGateway(_))));
                }
            }
            // Whatever comes back from the gateway goes to the Pod.
            assert_eq!(decide_in(Hook::Uplink, &p, &PLAIN, &m), Verdict::ToPod);
        }
    }
}

#[test]
fn replies_from_exempt_sources_stay_local() {
    let m = maps();
    for family in FAMILIES {
        let a = addrs(family);
        // (source, protocol, source port, destination port, exempt)
        let cases = [
            (a.dns_pod, IPPROTO_UDP, 53, 40_000, true),
            (a.dns_pod, IPPROTO_TCP, 53, 40_000, true),
            (a.dns_pod, IPPROTO_UDP, 40_000, 53, false), // the DNS Pod's own query to port 53 of a non-exempt Pod
            (a.dns_pod, IPPROTO_UDP, 5353, 40_000, false),
            (a.dns_pod, 132, 53, 40_000, false),
            (a.exempt_any_pod, IPPROTO_UDP, 1, 2, true),
            (a.exempt_tcp_pod, IPPROTO_TCP, 443, 40_000, true),
            (a.exempt_tcp_pod, IPPROTO_UDP, 443, 40_000, false),
        ];
        for (src, protocol, src_port, dst_port, exempt) in cases {
            let p = packet(family, src, a.pod_a, protocol, src_port, dst_port);
            for hook in POD_HOOKS {
                let expected = if exempt {
                    Verdict::Pass(Counter::PassExempt)
                } else {
                    Verdict::ToGateway
                };
                assert_eq!(decide_in(hook, &p, &PLAIN, &m), expected, "{hook:?} {p:?}");
            }
            assert_eq!(decide_in(Hook::Uplink, &p, &PLAIN, &m), Verdict::ToPod);
        }
    }
}

#[test]
fn exemptions_pair_each_address_with_its_own_port() {
    let m = maps();
    for family in FAMILIES {
        let a = addrs(family);
        // To the DNS Pod from port 53 but to another port: neither direction matches.
        let p = packet(family, a.pod_a, a.dns_pod, IPPROTO_UDP, 53, 40_000);
        m.forget_calls();
        assert_eq!(
            decide_in(Hook::PodIngress, &p, &PLAIN, &m),
            Verdict::ToGateway
        );
        assert!(m.asked(|c| *c == Call::IsExempt(a.dns_pod, IPPROTO_UDP, 40_000)));
        assert!(m.asked(|c| *c == Call::IsExempt(a.pod_a, IPPROTO_UDP, 53)));
        assert!(!m.asked(|c| *c == Call::IsExempt(a.dns_pod, IPPROTO_UDP, 53)));
    }
}

#[test]
fn exemptions_use_the_longest_matching_prefix() {
    // A /25 exempts everything, a /32 inside it only TCP 80: the /32 wins, as in the
    // LPM trie (userspace copies the /25's rules into the /32 when it wants both).
    let mut m = maps();
    m.exempt = vec![
        (
            Prefix {
                family: Family::V4,
                addr: v4(10, 0, 1, 0),
                len: 25,
            },
            rules(&[(ANY as u8, ANY)]),
        ),
        (
            Prefix {
                family: Family::V4,
                addr: v4(10, 0, 1, 20),
                len: 32,
            },
            rules(&[(IPPROTO_TCP, 80)]),
        ),
    ];
    // The source, 10.0.1.200, is outside both.
    let mut p = packet(
        Family::V4,
        v4(10, 0, 1, 200),
        v4(10, 0, 1, 20),
        IPPROTO_TCP,
        40_000,
        80,
    );
    assert_eq!(
        decide_in(Hook::PodIngress, &p, &PLAIN, &m),
        Verdict::Pass(Counter::PassExempt)
    );
    p.dst_port = 81;
    assert_eq!(
        decide_in(Hook::PodIngress, &p, &PLAIN, &m),
        Verdict::ToGateway
    );
    p.protocol = IPPROTO_UDP;
    p.dst_port = 80;
    assert_eq!(
        decide_in(Hook::PodIngress, &p, &PLAIN, &m),
        Verdict::ToGateway
    );
    p.dst = v4(10, 0, 1, 21);
    assert_eq!(
        decide_in(Hook::PodIngress, &p, &PLAIN, &m),
        Verdict::Pass(Counter::PassExempt)
    );
}

#[test]
fn exemptions_of_one_family_do_not_cover_the_other() {
    let mut m = maps();
    let a6 = addrs(Family::V6);
    m.exempt = vec![(
        Prefix {
            family: Family::V4,
            addr: [0; 16],
            len: 0,
        },
        rules(&[(ANY as u8, ANY)]),
    )];
    let p = pod_to_pod(&a6);
    assert_eq!(
        decide_in(Hook::PodIngress, &p, &PLAIN, &m),
        Verdict::ToGateway
    );
    let p = pod_to_pod(&addrs(Family::V4));
    assert_eq!(
        decide_in(Hook::PodIngress, &p, &PLAIN, &m),
        Verdict::Pass(Counter::PassExempt)
    );
}

#[test]
fn nat_replies_are_passed_at_ingress_only() {
    let m = maps();
    for family in FAMILIES {
        let p = pod_to_pod(&addrs(family));
        assert_eq!(
            decide_in(Hook::PodIngress, &p, &NAT_REPLY, &m),
            Verdict::Pass(Counter::PassNatReply)
        );
        assert_eq!(
            decide_in(Hook::PodEgress, &p, &NAT_REPLY, &m),
            Verdict::ToGateway
        );
        assert_eq!(decide_in(Hook::Uplink, &p, &NAT_REPLY, &m), Verdict::ToPod);
    }
}

#[test]
fn expiring_ttl_is_passed_at_ingress_and_uplink_but_not_at_egress() {
    let m = maps();
    for family in FAMILIES {
        let a = addrs(family);
        for ttl in [0u8, 1] {
            let p = with_ttl(pod_to_pod(&a), ttl);
            m.forget_calls();
            assert_eq!(
                decide_in(Hook::PodIngress, &p, &PLAIN, &m),
                Verdict::Pass(Counter::PassTtlExpired),
                "ttl {ttl}"
            );
            assert!(!m.asked(|c| matches!(c, Call::HasGateway(_))));
            m.forget_calls();
            assert_eq!(
                decide_in(Hook::Uplink, &p, &PLAIN, &m),
                Verdict::Pass(Counter::PassTtlExpired),
                "ttl {ttl}"
            );
            assert_eq!(
                decide_in(Hook::PodEgress, &p, &PLAIN, &m),
                Verdict::ToGateway,
                "ttl {ttl}"
            );
        }
        for ttl in [2u8, 3, 64, 255] {
            let p = with_ttl(pod_to_pod(&a), ttl);
            for hook in HOOKS {
                assert_eq!(
                    decide_in(hook, &p, &PLAIN, &m),
                    normal(hook),
                    "{hook:?} ttl {ttl}"
                );
            }
        }
    }
}

#[test]
fn no_gateway_for_the_family_keeps_pod_traffic_local() {
    for (gateway_v4, gateway_v6) in [(false, false), (false, true), (true, false)] {
        let mut m = maps();
        m.gateway_v4 = gateway_v4;
        m.gateway_v6 = gateway_v6;
        for family in FAMILIES {
            let has = if family == Family::V4 {
                gateway_v4
            } else {
                gateway_v6
            };
            let p = pod_to_pod(&addrs(family));
            for hook in POD_HOOKS {
                m.forget_calls();
                let expected = if has {
                    Verdict::ToGateway
                } else {
                    Verdict::Pass(Counter::PassNoGateway)
                };
                assert_eq!(
                    decide_in(hook, &p, &PLAIN, &m),
                    expected,
                    "{hook:?} {family:?}"
                );
                assert_eq!(
                    m.calls()
                        .iter()
                        .filter(|c| matches!(c, Call::HasGateway(_)))
                        .copied()
                        .collect::<Vec<_>>(),
                    vec![Call::HasGateway(family)],
                    "asks about its own family's gateway, once"
                );
            }
            // Delivering to the Pod needs no gateway.
            assert_eq!(decide_in(Hook::Uplink, &p, &PLAIN, &m), Verdict::ToPod);
        }
    }
}

#[test]
fn uplink_asks_only_what_it_needs() {
    let m = maps();
    for family in FAMILIES {
        let a = addrs(family);
        m.forget_calls();
        assert_eq!(
            decide_in(Hook::Uplink, &pod_to_pod(&a), &PLAIN, &m),
            Verdict::ToPod
        );
        let calls = m.calls();
        assert_eq!(calls.len(), 2, "{calls:?}");
        for expected in [Call::AddrKind(a.pod_a), Call::AddrKind(a.pod_b)] {
            assert!(calls.contains(&expected), "did not ask {expected:?}");
        }
    }
}

#[test]
fn a_redirected_packet_asks_each_question_once() {
    let m = maps();
    for hook in POD_HOOKS {
        for family in FAMILIES {
            let a = addrs(family);
            let p = pod_to_pod(&a);
            m.forget_calls();
            assert_eq!(decide_in(hook, &p, &PLAIN, &m), Verdict::ToGateway);
            let calls = m.calls();
            for (i, c) in calls.iter().enumerate() {
                assert!(!calls[..i].contains(c), "{c:?} asked twice");
            }
            for expected in [
                Call::AddrKind(a.pod_a),
                Call::AddrKind(a.pod_b),
                Call::Enabled,
                Call::IsExempt(a.pod_b, IPPROTO_TCP, 8080),
                Call::IsExempt(a.pod_a, IPPROTO_TCP, 40_000),
                Call::HasGateway(family),
            ] {
                assert!(
                    calls.contains(&expected),
                    "{hook:?} did not ask {expected:?}"
                );
            }
        }
    }
}

// ---------------------------------------------------------------------------
// Precedence: when several reasons apply, the first one in the order wins
// ---------------------------------------------------------------------------

/// A packet and maps for which every reason to pass applies; each step removes the
/// reason the previous step reported, until the packet is redirected.
#[test]
fn reasons_are_checked_in_order_at_ingress() {
    for family in FAMILIES {
        let a = addrs(family);
        let mut m = maps();
        m.enabled = false;
        m.gateway_v4 = false;
        m.gateway_v6 = false;
        let mut ctx = EVERYTHING;
        let mut p = packet(family, a.link_local, a.remote_pod, IPPROTO_UDP, 40_000, 53);
        p.ttl = 1;
        let hook = Hook::PodIngress;

        assert_eq!(
            decide_in(hook, &p, &ctx, &m),
            Verdict::Pass(Counter::PassLinkScope)
        );
        p.src = a.node_in_cidr;
        assert_eq!(
            decide_in(hook, &p, &ctx, &m),
            Verdict::Pass(Counter::PassNotSameNode)
        );
        p.dst = a.dns_pod;
        assert_eq!(
            decide_in(hook, &p, &ctx, &m),
            Verdict::Pass(Counter::PassNodeAddress)
        );
        p.src = a.pod_a;
        assert_eq!(
            decide_in(hook, &p, &ctx, &m),
            Verdict::Pass(Counter::PassMasqueradeMark)
        );
        ctx.ctx.masquerade_marked = false;
        // from_uplink means nothing at ingress.
        assert_eq!(
            decide_in(hook, &p, &ctx, &m),
            Verdict::Pass(Counter::PassDisabled)
        );
        m.enabled = true;
        assert_eq!(
            decide_in(hook, &p, &ctx, &m),
            Verdict::Pass(Counter::PassExempt)
        );
        p.dst = a.pod_b;
        assert_eq!(
            decide_in(hook, &p, &ctx, &m),
            Verdict::Pass(Counter::PassNatReply)
        );
        ctx.nat_reply = false;
        assert_eq!(
            decide_in(hook, &p, &ctx, &m),
            Verdict::Pass(Counter::PassTtlExpired)
        );
        p.ttl = 2;
        assert_eq!(
            decide_in(hook, &p, &ctx, &m),
            Verdict::Pass(Counter::PassNoGateway)
        );
        m.gateway_v4 = true;
        m.gateway_v6 = true;
        assert_eq!(decide_in(hook, &p, &ctx, &m), Verdict::ToGateway);
    }
}

#[test]
fn reasons_are_checked_in_order_at_egress() {
    for family in FAMILIES {
        let a = addrs(family);
        let mut m = maps();
        m.enabled = false;
        m.gateway_v4 = false;
        m.gateway_v6 = false;
        let mut ctx = EVERYTHING;
        let mut p = packet(family, a.pod_a, a.multicast, IPPROTO_UDP, 40_000, 53);
        p.ttl = 0;
        let hook = Hook::PodEgress;

        assert_eq!(
            decide_in(hook, &p, &ctx, &m),
            Verdict::Pass(Counter::PassLinkScope)
        );
        p.dst = a.internet;
        assert_eq!(
            decide_in(hook, &p, &ctx, &m),
            Verdict::Pass(Counter::PassNotSameNode)
        );
        p.dst = a.node_in_cidr;
        assert_eq!(
            decide_in(hook, &p, &ctx, &m),
            Verdict::Pass(Counter::PassNodeAddress)
        );
        p.dst = a.dns_pod;
        assert_eq!(
            decide_in(hook, &p, &ctx, &m),
            Verdict::Pass(Counter::PassMasqueradeMark)
        );
        ctx.ctx.masquerade_marked = false;
        assert_eq!(
            decide_in(hook, &p, &ctx, &m),
            Verdict::Pass(Counter::PassReturned)
        );
        ctx.ctx.from_uplink = false;
        assert_eq!(
            decide_in(hook, &p, &ctx, &m),
            Verdict::Pass(Counter::PassDisabled)
        );
        m.enabled = true;
        assert_eq!(
            decide_in(hook, &p, &ctx, &m),
            Verdict::Pass(Counter::PassExempt)
        );
        p.dst = a.pod_b;
        // Neither the NAT reply nor the TTL matters at egress.
        assert_eq!(
            decide_in(hook, &p, &ctx, &m),
            Verdict::Pass(Counter::PassNoGateway)
        );
        m.gateway_v4 = true;
        m.gateway_v6 = true;
        assert_eq!(decide_in(hook, &p, &ctx, &m), Verdict::ToGateway);
    }
}

#[test]
fn reasons_are_checked_in_order_at_the_uplink() {
    for family in FAMILIES {
        let a = addrs(family);
        let mut m = maps();
        m.enabled = false;
        m.gateway_v4 = false;
        m.gateway_v6 = false;
        let ctx = EVERYTHING;
        let mut p = packet(family, a.multicast, a.internet, IPPROTO_UDP, 40_000, 53);
        p.ttl = 1;
        let hook = Hook::Uplink;

        assert_eq!(
            decide_in(hook, &p, &ctx, &m),
            Verdict::Pass(Counter::PassLinkScope)
        );
        p.src = a.node_in_cidr;
        assert_eq!(
            decide_in(hook, &p, &ctx, &m),
            Verdict::Pass(Counter::PassNotSameNode)
        );
        p.dst = a.dns_pod;
        assert_eq!(
            decide_in(hook, &p, &ctx, &m),
            Verdict::Pass(Counter::PassNodeAddress)
        );
        p.src = a.pod_a;
        assert_eq!(
            decide_in(hook, &p, &ctx, &m),
            Verdict::Pass(Counter::PassTtlExpired)
        );
        p.ttl = 2;
        // Disabled, exempt, no gateway and every context flag are all ignored here.
        assert_eq!(decide_in(hook, &p, &ctx, &m), Verdict::ToPod);
    }
}

// ---------------------------------------------------------------------------
// From frames to verdicts
// ---------------------------------------------------------------------------

#[test]
fn parsed_frames_decide_like_hand_made_packets() {
    let m = maps();
    let a4 = addrs(Family::V4);
    let a6 = addrs(Family::V6);
    let mut src4 = [0u8; 4];
    let mut dst4 = [0u8; 4];
    src4.copy_from_slice(&a4.pod_a[..4]);
    dst4.copy_from_slice(&a4.dns_pod[..4]);
    let cases = [
        (
            FrameBuilder::ipv4(
                src4,
                dst4,
                Transport::Udp {
                    src_port: 40_000,
                    dst_port: 53,
                },
            )
            .build(),
            Verdict::Pass(Counter::PassExempt),
        ),
        (
            FrameBuilder::ipv4(
                src4,
                dst4,
                Transport::Tcp {
                    src_port: 40_000,
                    dst_port: 80,
                    flags: 2,
                },
            )
            .build(),
            Verdict::ToGateway,
        ),
        (
            FrameBuilder::ipv4(
                src4,
                dst4,
                Transport::Tcp {
                    src_port: 40_000,
                    dst_port: 80,
                    flags: 2,
                },
            )
            .ttl(1)
            .build(),
            Verdict::Pass(Counter::PassTtlExpired),
        ),
        (
            FrameBuilder::ipv6(
                a6.pod_a,
                a6.dns_pod,
                Transport::Udp {
                    src_port: 40_000,
                    dst_port: 53,
                },
            )
            .build(),
            Verdict::Pass(Counter::PassExempt),
        ),
        (
            FrameBuilder::ipv6(
                a6.pod_a,
                a6.pod_b,
                Transport::Icmp {
                    kind: 128,
                    code: 0,
                    id: 1,
                    seq: 1,
                },
            )
            .build(),
            Verdict::ToGateway,
        ),
        (
            FrameBuilder::ipv6(
                a6.pod_a,
                a6.multicast,
                Transport::Icmp {
                    kind: 135,
                    code: 0,
                    id: 0,
                    seq: 0,
                },
            )
            .build(),
            Verdict::Pass(Counter::PassLinkScope),
        ),
    ];
    for (frame, expected) in cases {
        let p = parse(&frame[..], frame.len()).unwrap();
        assert_eq!(
            decide_in(Hook::PodIngress, &p, &PLAIN, &m),
            expected,
            "{p:?}"
        );
    }
}

// ---------------------------------------------------------------------------
// Counters and paths
// ---------------------------------------------------------------------------

#[test]
fn verdicts_are_counted_in_their_slots() {
    assert_eq!(
        Verdict::ToGateway.counter(Hook::PodIngress),
        Counter::RedirectedToGateway
    );
    assert_eq!(
        Verdict::ToGateway.counter(Hook::PodEgress),
        Counter::RedirectedAfterNat
    );
    assert_eq!(
        Verdict::ToGateway.counter(Hook::Uplink),
        Counter::RedirectedToGateway
    );
    for hook in HOOKS {
        assert_eq!(Verdict::ToPod.counter(hook), Counter::DeliveredFromGateway);
        for &c in Counter::ALL {
            assert_eq!(Verdict::Pass(c).counter(hook), c, "{hook:?}");
        }
    }
}

#[test]
fn decisions_count_redirects_by_hook() {
    let m = maps();
    for family in FAMILIES {
        let p = pod_to_pod(&addrs(family));
        let counted = |hook| decide_in(hook, &p, &PLAIN, &m).counter(hook);
        assert_eq!(counted(Hook::PodIngress), Counter::RedirectedToGateway);
        assert_eq!(counted(Hook::PodEgress), Counter::RedirectedAfterNat);
        assert_eq!(counted(Hook::Uplink), Counter::DeliveredFromGateway);
    }
}

/// The path of a sent packet, by counter. No wildcard: a new counter must be placed.
fn expected_path(c: Counter) -> Option<Path> {
    match c {
        Counter::RedirectedToGateway => Some(Path::ViaGateway),
        Counter::RedirectedAfterNat => Some(Path::ViaGatewayAfterNat),
        Counter::PassExempt => Some(Path::Exempt),
        Counter::PassNotSameNode => Some(Path::NotSameNode),
        Counter::PassDisabled
        | Counter::PassTtlExpired
        | Counter::PassNatReply
        | Counter::PassMasqueradeMark
        | Counter::PassNoGateway
        | Counter::PassGatewayUnresolved
        | Counter::PassRouteLookupFailed => Some(Path::Local),
        // Not a Pod flow, or not a packet a Pod sent.
        Counter::PassLinkScope
        | Counter::PassNodeAddress
        | Counter::PassNotIp
        | Counter::PassMalformed
        | Counter::PassFragment
        | Counter::PassReturned
        | Counter::DeliveredFromGateway
        | Counter::NeighbourResolution
        | Counter::FlowUpdateFailed => None,
    }
}

#[test]
fn paths_of_sent_packets() {
    for &c in Counter::ALL {
        assert_eq!(Path::of_sent(c), expected_path(c), "{}", c.name());
    }
    // Spot checks that do not go through the table above.
    assert_eq!(
        Path::of_sent(Counter::RedirectedToGateway),
        Some(Path::ViaGateway)
    );
    assert_eq!(
        Path::of_sent(Counter::RedirectedAfterNat),
        Some(Path::ViaGatewayAfterNat)
    );
    assert_eq!(Path::of_sent(Counter::PassExempt), Some(Path::Exempt));
    assert_eq!(Path::of_sent(Counter::PassNoGateway), Some(Path::Local));
    assert_eq!(Path::of_sent(Counter::PassLinkScope), None);
    assert_eq!(Path::of_sent(Counter::DeliveredFromGateway), None);
}

#[test]
fn decisions_at_pod_hooks_give_the_path_of_the_flow() {
    let m = maps();
    for family in FAMILIES {
        let a = addrs(family);
        for (hook, p, ctx, path) in [
            (
                Hook::PodIngress,
                pod_to_pod(&a),
                PLAIN,
                Some(Path::ViaGateway),
            ),
            (
                Hook::PodEgress,
                pod_to_pod(&a),
                PLAIN,
                Some(Path::ViaGatewayAfterNat),
            ),
            (Hook::PodIngress, pod_to_pod(&a), MARKED, Some(Path::Local)),
            (Hook::PodEgress, pod_to_pod(&a), MARKED, Some(Path::Local)),
            (
                Hook::PodIngress,
                pod_to_pod(&a),
                NAT_REPLY,
                Some(Path::Local),
            ),
            (
                Hook::PodIngress,
                with_ttl(pod_to_pod(&a), 1),
                PLAIN,
                Some(Path::Local),
            ),
            (Hook::PodEgress, pod_to_pod(&a), FROM_UPLINK, None),
            (
                Hook::PodIngress,
                packet(family, a.pod_a, a.dns_pod, IPPROTO_UDP, 1, 53),
                PLAIN,
                Some(Path::Exempt),
            ),
            (
                Hook::PodEgress,
                packet(family, a.pod_a, a.dns_pod, IPPROTO_UDP, 1, 53),
                PLAIN,
                Some(Path::Exempt),
            ),
            (
                Hook::PodIngress,
                packet(family, a.pod_a, a.internet, IPPROTO_UDP, 1, 53),
                PLAIN,
                Some(Path::NotSameNode),
            ),
            (
                Hook::PodIngress,
                packet(family, a.pod_a, a.node_in_cidr, IPPROTO_UDP, 1, 53),
                PLAIN,
                None,
            ),
            (
                Hook::PodIngress,
                packet(family, a.pod_a, a.multicast, IPPROTO_UDP, 1, 53),
                PLAIN,
                None,
            ),
            (Hook::Uplink, pod_to_pod(&a), PLAIN, None),
        ] {
            let counter = decide_in(hook, &p, &ctx, &m).counter(hook);
            assert_eq!(Path::of_sent(counter), path, "{hook:?} {p:?} {ctx:?}");
        }
    }
}

#[test]
fn fake_prefixes_match_like_an_lpm_trie() {
    // The fake must be right for the tests above to mean anything.
    let p = Prefix {
        family: Family::V4,
        addr: v4(10, 0, 1, 192),
        len: 26,
    };
    assert!(p.contains(Family::V4, &v4(10, 0, 1, 192)));
    assert!(p.contains(Family::V4, &v4(10, 0, 1, 255)));
    assert!(!p.contains(Family::V4, &v4(10, 0, 1, 191)));
    assert!(!p.contains(Family::V6, &v4(10, 0, 1, 200)));
    let all = Prefix {
        family: Family::V6,
        addr: [0; 16],
        len: 0,
    };
    assert!(all.contains(Family::V6, &[0xff; 16]));
    let host = Prefix {
        family: Family::V6,
        addr: [7; 16],
        len: 128,
    };
    assert!(host.contains(Family::V6, &[7; 16]));
    let mut other = [7; 16];
    other[15] = 6;
    assert!(!host.contains(Family::V6, &other));
    assert!(rules(&[(0, 0); MAX_EXEMPT_RULES]).matches(IPPROTO_TCP, 1));
    assert!(!rules(&[]).matches(IPPROTO_TCP, 1));
}
