//! Judging one step: the kernel's return code, frame and counters against the model's
//! (a [`Failure`] per disagreement), and the invariants on what the kernel did, whatever
//! the model says.

use std::collections::BTreeMap;

use visibility::datapath::ProgramKind;
use visibility_common::{
    counters::{Counter, CounterValue, slot},
    hook::Hook,
    packet::{
        ETH_HLEN, Family, FragmentPart, IPPROTO_TCP, IPPROTO_UDP, IPV4_CHECKSUM_OFFSET,
        IPV4_TTL_OFFSET, IPV6_HOP_LIMIT_OFFSET, Transport, parse,
    },
    testing::ipv4_header_checksum_ok,
    verdict::AddrKind,
};

use super::{
    case::hex,
    facts::{NodeFacts, PodFacts, Step},
    model::Expected,
    rewrites::l4_checksum_ok,
};
use crate::datapath_harness::{TC_ACT_REDIRECT, TC_ACT_SHOT, TC_ACT_UNSPEC};

/// What the kernel returned and left of the frame; `None` when it refused the frame.
pub(super) type KernelRun = Option<(u32, Vec<u8>)>;

/// The index of the failing step of a case (`usize::MAX`: the reset before it), and
/// how it failed.
pub(super) type StepFailures = (usize, Vec<Failure>);

/// One step's disagreement or broken invariant.
#[derive(Clone, Debug)]
pub(super) struct Failure {
    /// What kind of failure, for telling one finding from another.
    pub(super) signature: String,
    pub(super) message: String,
}

pub(super) fn slot_name(slot: u32) -> String {
    let per_hook = Counter::ALL.len() as u32;
    let hook = Hook::ALL[(slot / per_hook) as usize];
    let counter = Counter::ALL[(slot % per_hook) as usize];
    format!("{hook:?}/{}", counter.name())
}

pub(super) fn compare(
    expected: &Expected,
    actual: &KernelRun,
    moved: &BTreeMap<u32, CounterValue>,
    step: &Step,
) -> Vec<Failure> {
    let mut failures = Vec::new();
    let program = step.program.name();
    match (&expected.outcome, actual) {
        (None, None) => {}
        (Some((want, _)), Some((got, _))) if want != got => failures.push(Failure {
            signature: format!(
                "{program}: return code {} != {}",
                action_name(*got),
                action_name(*want)
            ),
            message: format!(
                "return code: kernel {}, host {}",
                action_name(*got),
                action_name(*want)
            ),
        }),
        (Some((_, want)), Some((_, got))) if want != got => failures.push(Failure {
            signature: format!("{program}: rewritten bytes"),
            message: format!(
                "frame after the run differs at bytes {:?}:\n  kernel {}\n  host   {}",
                differing(want, got),
                hex(got),
                hex(want)
            ),
        }),
        (Some(_), Some(_)) => {}
        (want, got) => failures.push(Failure {
            signature: format!("{program}: accepted or refused"),
            message: format!(
                "BPF_PROG_TEST_RUN {}, host expected it to {}",
                if got.is_some() {
                    "ran"
                } else {
                    "refused the frame"
                },
                if want.is_some() { "run" } else { "be refused" }
            ),
        }),
    }
    let mut want: BTreeMap<u32, CounterValue> = BTreeMap::new();
    for (hook, counter, size) in &expected.counts {
        let entry = want.entry(slot(*hook, *counter)).or_default();
        entry.packets += size.packets;
        entry.bytes += size.bytes;
    }
    if want != *moved {
        let show = |m: &BTreeMap<u32, CounterValue>| {
            m.iter()
                .map(|(s, v)| format!("{} +{}p/+{}B", slot_name(*s), v.packets, v.bytes))
                .collect::<Vec<_>>()
                .join(", ")
        };
        failures.push(Failure {
            signature: format!(
                "{program}: counters {} != {}",
                moved
                    .keys()
                    .map(|s| slot_name(*s))
                    .collect::<Vec<_>>()
                    .join("+"),
                want.keys()
                    .map(|s| slot_name(*s))
                    .collect::<Vec<_>>()
                    .join("+")
            ),
            message: format!("counters: kernel [{}], host [{}]", show(moved), show(&want)),
        });
    }
    failures
}

pub(super) fn action_name(action: u32) -> String {
    match action {
        TC_ACT_UNSPEC => "TC_ACT_UNSPEC (pass)".into(),
        TC_ACT_SHOT => "TC_ACT_SHOT (drop)".into(),
        TC_ACT_REDIRECT => "TC_ACT_REDIRECT".into(),
        other => format!("{other}"),
    }
}

pub(super) fn differing(a: &[u8], b: &[u8]) -> Vec<usize> {
    let mut out: Vec<usize> = (0..a.len().max(b.len()))
        .filter(|&i| a.get(i) != b.get(i))
        .collect();
    out.truncate(16);
    out
}

/// Invariants on what the kernel did with a step, whatever the model says.
pub(super) fn invariants(node: &NodeFacts, step: &Step, action: u32, out: &[u8]) -> Vec<Failure> {
    let mut broken = Vec::new();
    let program = step.program.name();
    let mut fail = |name: &str, detail: String| {
        broken.push(Failure {
            signature: format!("{program}: invariant: {name}"),
            message: format!("invariant broken: {name}: {detail}"),
        })
    };
    if ![TC_ACT_UNSPEC, TC_ACT_SHOT, TC_ACT_REDIRECT].contains(&action) {
        fail("known return code", action_name(action));
    }
    if action != TC_ACT_REDIRECT {
        return broken;
    }
    if step.program == ProgramKind::PodIngress {
        fail("pod_ingress never redirects", String::new());
        return broken;
    }
    let Ok(input) = parse(&step.frame[..], step.frame.len()) else {
        fail("only parsed packets are redirected", String::new());
        return broken;
    };
    let Ok(sent) = parse(out, out.len()) else {
        fail("a redirected packet parses", hex(out));
        return broken;
    };
    let family = sent.family;
    if family == Family::V4 && !ipv4_header_checksum_ok(out) {
        fail(
            "a redirected packet keeps a valid IPv4 header checksum",
            String::new(),
        );
    }
    if l4_checksum_ok(&step.frame) == Some(true) && l4_checksum_ok(out) != Some(true) {
        fail(
            "a redirected packet keeps a valid transport checksum",
            format!("protocol {}", sent.protocol),
        );
    }
    // What went to the gateway (`pod_egress`'s output) or came back from it
    // (`uplink_ingress`'s input: a Service reply gets the Service's source back on its
    // way to the Pod) is Pod-to-Pod.
    let crossed = match step.program {
        ProgramKind::UplinkIngress => &input,
        _ => &sent,
    };
    let kind = |addr: &[u8; 16]| node.addr_kind(family, addr);
    if crossed.family != family
        || kind(&crossed.src) != AddrKind::Pod
        || kind(&crossed.dst) != AddrKind::Pod
        || kind(&sent.dst) != AddrKind::Pod
    {
        fail(
            "only same-node Pod-to-Pod packets are redirected",
            format!(
                "{} -> {}",
                show_addr(family, &crossed.src),
                show_addr(family, &crossed.dst)
            ),
        );
    }
    let changed = rewritten_elsewhere(&step.frame, &input, out);
    if !changed.is_empty() {
        fail(
            "a redirect rewrites only the MACs, the hop, the source and their checksums",
            format!("bytes {changed:?} changed"),
        );
    }
    let ingress = node.ifindex(step.ingress);
    match step.program {
        ProgramKind::PodEgress => {
            if sent.ttl != input.ttl {
                fail(
                    "pod_egress leaves the TTL alone",
                    format!("{} -> {}", input.ttl, sent.ttl),
                );
            }
            if input.fragment != FragmentPart::Later {
                let own = node
                    .pod_ifaces
                    .contains_key(&ingress)
                    .then(|| node.pod_on(ingress))
                    .flatten()
                    .map(|pod: &PodFacts| pod.addr(family));
                if own != Some(sent.src) {
                    fail(
                        "pod_egress sends a Pod's packet with that Pod's own source",
                        format!(
                            "entered on {}, sent from {}",
                            step.ingress.name(),
                            show_addr(family, &sent.src)
                        ),
                    );
                }
            }
        }
        ProgramKind::UplinkIngress => {
            if u16::from(sent.ttl) + 1 != u16::from(input.ttl) {
                fail(
                    "uplink_ingress spends exactly one hop",
                    format!("{} -> {}", input.ttl, sent.ttl),
                );
            }
        }
        ProgramKind::PodIngress => {}
    }
    broken
}

/// The bytes a redirect changed that it has no business changing: anything but the
/// MACs, the TTL or hop limit, the IPv4 header checksum, the source address and, when
/// this packet carries the transport header, the source port and transport checksum.
pub(super) fn rewritten_elsewhere(
    before: &[u8],
    packet: &visibility_common::packet::Packet,
    after: &[u8],
) -> Vec<usize> {
    let mut allowed: Vec<std::ops::Range<usize>> = Vec::new();
    allowed.push(0..12);
    match packet.family {
        Family::V4 => {
            allowed.push(IPV4_TTL_OFFSET..IPV4_TTL_OFFSET + 1);
            allowed.push(IPV4_CHECKSUM_OFFSET..IPV4_CHECKSUM_OFFSET + 2);
            allowed.push(ETH_HLEN + 12..ETH_HLEN + 16);
        }
        Family::V6 => {
            allowed.push(IPV6_HOP_LIMIT_OFFSET..IPV6_HOP_LIMIT_OFFSET + 1);
            allowed.push(ETH_HLEN + 8..ETH_HLEN + 24);
        }
    }
    if packet.fragment != FragmentPart::Later && packet.transport == Transport::Read {
        let l4 = usize::from(packet.l4_offset);
        allowed.push(l4..l4 + 2);
        match packet.protocol {
            IPPROTO_TCP => allowed.push(l4 + 16..l4 + 18),
            IPPROTO_UDP => allowed.push(l4 + 6..l4 + 8),
            _ => {}
        }
    }
    let mut out: Vec<usize> = (0..before.len().max(after.len()))
        .filter(|&i| before.get(i) != after.get(i))
        .filter(|i| !allowed.iter().any(|range| range.contains(i)))
        .collect();
    out.truncate(8);
    out
}

pub(super) fn show_addr(family: Family, addr: &[u8; 16]) -> String {
    match family {
        Family::V4 => std::net::Ipv4Addr::from([addr[0], addr[1], addr[2], addr[3]]).to_string(),
        Family::V6 => std::net::Ipv6Addr::from(*addr).to_string(),
    }
}
