//! Cases for the differential fuzz harness that follow a packet through the node: sent
//! by a Pod (`pod_ingress`), forwarded by the node to another Pod with or without NAT
//! (`pod_egress`), back from the gateway whole or fragmented anew (`uplink_ingress`),
//! the datagram's later fragments, and single steps of any program on any frame.

use rand::{Rng, rngs::SmallRng, seq::IndexedRandom as _};
use visibility::datapath::ProgramKind;
use visibility_common::packet::{
    ETH_HLEN, Family, FragmentPart, IPPROTO_FRAGMENT, IPPROTO_TCP, IPPROTO_UDP, Transport, parse,
};

use super::{
    facts::{Iface, NodeFacts, Step},
    frames::{
        PODS, SERVICE_V4, SERVICE_V6, fix_checksums, fix_ipv4_header, frame_between,
        interesting_addrs, v4, v6,
    },
    mutations::{any_frame, mutate},
};

pub(super) fn any_iface(rng: &mut SmallRng) -> Iface {
    match rng.random_range(0..8) {
        0..=5 => Iface::Veth(rng.random_range(0..PODS)),
        6 => Iface::Uplink,
        _ => Iface::Lo,
    }
}

/// One step of any program on any frame.
pub fn single_step(rng: &mut SmallRng) -> Step {
    let frame = any_frame(rng);
    match rng.random_range(0..3) {
        0 => {
            let on = Iface::Veth(rng.random_range(0..PODS));
            Step {
                program: ProgramKind::PodIngress,
                ifindex: on,
                ingress: on,
                frame,
            }
        }
        1 => Step {
            program: ProgramKind::PodEgress,
            ifindex: Iface::Veth(rng.random_range(0..PODS)),
            ingress: any_iface(rng),
            frame,
        },
        _ => Step {
            program: ProgramKind::UplinkIngress,
            ifindex: Iface::Uplink,
            ingress: Iface::Uplink,
            frame,
        },
    }
}

/// What the node's stack does to a packet between `pod_ingress` and `pod_egress`.
#[derive(Clone, Copy, Debug)]
pub(super) enum Stack {
    /// Routes it: nothing changes.
    Routes,
    /// DNAT: a Service's address becomes a Pod's.
    Dnat,
    /// A Service backend's reply gets the Service's source back.
    UnDnat,
    /// Anything: a mutation.
    Garbles,
}

/// A packet through the node: `pod_ingress` on the sender's veth, then `pod_egress` on
/// the receiver's, as the node's stack forwarded it. The case goes on with what comes
/// back from the gateway (see [`returns`]).
pub fn forward_pair(rng: &mut SmallRng) -> Vec<Step> {
    let family = if rng.random_bool(0.5) {
        Family::V4
    } else {
        Family::V6
    };
    let sender = rng.random_range(0..PODS);
    let receiver = rng.random_range(0..PODS);
    let pod_addr = |pod: usize| match family {
        Family::V4 => v4([10, 52, 0, 2 + pod as u8]),
        Family::V6 => v6([0xfd00, 0x52, 0, 0, 0, 0, 0, 2 + pod as u16]),
    };
    let service = match family {
        Family::V4 => v4(SERVICE_V4),
        Family::V6 => SERVICE_V6,
    };
    let src = if rng.random_bool(0.85) {
        pod_addr(sender)
    } else {
        interesting_addrs(family, rng)
    };
    let stack = *[
        Stack::Routes,
        Stack::Dnat,
        Stack::UnDnat,
        Stack::UnDnat,
        Stack::Garbles,
    ]
    .choose(rng)
    .expect("not empty");
    let dst = match stack {
        Stack::Dnat if rng.random_bool(0.8) => service,
        _ if rng.random_bool(0.85) => pod_addr(receiver),
        _ => interesting_addrs(family, rng),
    };
    let mut sent = frame_between(family, src, dst, rng);
    if rng.random_bool(0.1) {
        mutate(&mut sent, rng);
    }
    let mut forwarded = sent.clone();
    if let Ok(packet) = parse(&sent[..], sent.len()) {
        let (addr_at, len) = match family {
            Family::V4 => (ETH_HLEN + 12, 4),
            Family::V6 => (ETH_HLEN + 8, 16),
        };
        let l4 = usize::from(packet.l4_offset);
        let has_ports = packet.transport == Transport::Read
            && matches!(packet.protocol, IPPROTO_TCP | IPPROTO_UDP)
            && forwarded.len() >= l4 + 4;
        match stack {
            Stack::Routes => {}
            Stack::Dnat => {
                let to = pod_addr(receiver);
                forwarded[addr_at + len..addr_at + 2 * len].copy_from_slice(&to[..len]);
                if has_ports && rng.random_bool(0.7) {
                    forwarded[l4 + 2..l4 + 4].copy_from_slice(&8080u16.to_be_bytes());
                }
            }
            Stack::UnDnat => {
                let from = if rng.random_bool(0.9) {
                    service
                } else {
                    interesting_addrs(family, rng)
                };
                forwarded[addr_at..addr_at + len].copy_from_slice(&from[..len]);
                if has_ports && rng.random_bool(0.7) {
                    forwarded[l4..l4 + 2].copy_from_slice(&80u16.to_be_bytes());
                }
            }
            Stack::Garbles => mutate(&mut forwarded, rng),
        }
        if !matches!(stack, Stack::Garbles) || rng.random_bool(0.5) {
            fix_checksums(&mut forwarded);
        }
    }
    let ingress = if rng.random_bool(0.9) {
        Iface::Veth(sender)
    } else {
        any_iface(rng)
    };
    let mut steps = Vec::new();
    if rng.random_bool(0.9) {
        steps.push(Step {
            program: ProgramKind::PodIngress,
            ifindex: Iface::Veth(sender),
            ingress: Iface::Veth(sender),
            frame: sent,
        });
    }
    steps.push(Step {
        program: ProgramKind::PodEgress,
        ifindex: Iface::Veth(receiver),
        ingress,
        frame: forwarded,
    });
    steps
}

/// What comes back from the gateway after `pod_egress` sent `sent` there: the MACs of
/// the gateway's hop, one hop spent, whole or fragmented anew (in any order), at times
/// mutated. Each is a step of `uplink_ingress`.
pub fn returns(node: &NodeFacts, sent: &[u8], rng: &mut SmallRng) -> Vec<Step> {
    let mut back = sent.to_vec();
    if back.len() < ETH_HLEN {
        return Vec::new();
    }
    back[..6].copy_from_slice(&node.uplink_mac);
    back[6..12].copy_from_slice(&node.gateway_mac);
    let Ok(packet) = parse(&back[..], back.len()) else {
        return Vec::new();
    };
    match packet.family {
        Family::V4 => {
            back[ETH_HLEN + 8] = back[ETH_HLEN + 8].saturating_sub(1);
            fix_ipv4_header(&mut back);
        }
        Family::V6 => back[ETH_HLEN + 7] = back[ETH_HLEN + 7].saturating_sub(1),
    }
    let mut frames = if rng.random_bool(0.3) {
        fragmented(&back, &packet, rng)
    } else {
        vec![back]
    };
    if rng.random_bool(0.3) {
        frames.reverse();
    }
    for frame in &mut frames {
        if rng.random_bool(0.1) {
            mutate(frame, rng);
        }
    }
    frames
        .into_iter()
        .map(|frame| Step {
            program: ProgramKind::UplinkIngress,
            ifindex: Iface::Uplink,
            ingress: Iface::Uplink,
            frame,
        })
        .collect()
}

/// A whole packet as the gateway would fragment it: two or three fragments of its
/// payload (after the IPv4 header, or after the IPv6 header with a fragment header).
pub(super) fn fragmented(
    frame: &[u8],
    packet: &visibility_common::packet::Packet,
    rng: &mut SmallRng,
) -> Vec<Vec<u8>> {
    if packet.fragment != FragmentPart::Whole {
        return vec![frame.to_vec()];
    }
    let id: u32 = rng.random();
    let (header_len, payload) = match packet.family {
        Family::V4 => {
            let header_len = ETH_HLEN + usize::from(frame[ETH_HLEN] & 0x0f) * 4;
            (
                header_len,
                &frame[header_len..ETH_HLEN + usize::from(packet.ip_len)],
            )
        }
        Family::V6 => (
            ETH_HLEN + 40,
            &frame[ETH_HLEN + 40..ETH_HLEN + usize::from(packet.ip_len)],
        ),
    };
    if payload.len() < 24 {
        return vec![frame.to_vec()];
    }
    // Cut points on 8-byte boundaries; the first keeps at least the transport header.
    let mut cuts = vec![0usize];
    let first = (rng.random_range(16..payload.len()) / 8 * 8).max(16);
    cuts.push(first.min(payload.len()));
    if payload.len() - first > 16 && rng.random_bool(0.5) {
        let second = first + (rng.random_range(8..payload.len() - first) / 8 * 8).max(8);
        cuts.push(second.min(payload.len()));
    }
    cuts.push(payload.len());
    cuts.dedup();
    let mut out = Vec::new();
    for pair in cuts.windows(2) {
        let (start, end) = (pair[0], pair[1]);
        let more = end < payload.len();
        let mut piece = frame[..header_len].to_vec();
        match packet.family {
            Family::V4 => {
                let flags = (start / 8) as u16 | if more { 0x2000 } else { 0 };
                piece[ETH_HLEN + 4..ETH_HLEN + 6].copy_from_slice(&(id as u16).to_be_bytes());
                piece[ETH_HLEN + 6..ETH_HLEN + 8].copy_from_slice(&flags.to_be_bytes());
                piece.extend_from_slice(&payload[start..end]);
                let total = (piece.len() - ETH_HLEN) as u16;
                piece[ETH_HLEN + 2..ETH_HLEN + 4].copy_from_slice(&total.to_be_bytes());
                fix_ipv4_header(&mut piece);
            }
            Family::V6 => {
                let next = piece[ETH_HLEN + 6];
                piece[ETH_HLEN + 6] = IPPROTO_FRAGMENT;
                let offset_flags = (start as u16) | u16::from(more);
                piece.extend_from_slice(&[next, 0]);
                piece.extend_from_slice(&offset_flags.to_be_bytes());
                piece.extend_from_slice(&id.to_be_bytes());
                piece.extend_from_slice(&payload[start..end]);
                let payload_len = (piece.len() - ETH_HLEN - 40) as u16;
                piece[ETH_HLEN + 4..ETH_HLEN + 6].copy_from_slice(&payload_len.to_be_bytes());
            }
        }
        out.push(piece);
    }
    out
}

/// A later fragment of the datagram of `first` (same addresses, protocol and
/// identification) for `pod_egress`, from any interface: fragments follow their first.
pub fn later_fragment_of(first: &Step, rng: &mut SmallRng) -> Option<Step> {
    let packet = parse(&first.frame[..], first.frame.len()).ok()?;
    if packet.fragment != FragmentPart::First {
        return None;
    }
    let mut frame = first.frame.clone();
    match packet.family {
        Family::V4 => {
            let flags = rng.random_range(1..200u16) | if rng.random_bool(0.5) { 0x2000 } else { 0 };
            frame[ETH_HLEN + 6..ETH_HLEN + 8].copy_from_slice(&flags.to_be_bytes());
            fix_ipv4_header(&mut frame);
        }
        Family::V6 => {
            // The fragment header the generator or the gateway put in: find it again by
            // walking like the parser does is overkill; flip the offset of any fragment
            // header right after the fixed header.
            if frame.get(ETH_HLEN + 6) != Some(&IPPROTO_FRAGMENT) || frame.len() < ETH_HLEN + 48 {
                return None;
            }
            let offset: u16 = rng.random_range(1..200u16) << 3;
            frame[ETH_HLEN + 42..ETH_HLEN + 44].copy_from_slice(&offset.to_be_bytes());
        }
    }
    let ingress = if rng.random_bool(0.7) {
        first.ingress
    } else {
        any_iface(rng)
    };
    Some(Step {
        program: ProgramKind::PodEgress,
        ifindex: first.ifindex,
        ingress,
        frame,
    })
}
