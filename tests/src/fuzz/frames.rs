//! Frames and cases for the differential fuzz harness: well-formed frames of every kind
//! the datapath meets (TCP, UDP, ICMP, other protocols, IPv4 and IPv6, IPv4 options,
//! IPv6 extension headers, fragments, VLAN tags), mutations of them (bit flips, bytes,
//! lengths, truncation, addresses, hops, fragment fields), random bytes, and cases that
//! follow a packet through the node: sent by a Pod (`pod_ingress`), forwarded by the
//! node to another Pod with or without NAT (`pod_egress`), and back from the gateway,
//! whole or fragmented anew (`uplink_ingress`).

use rand::{Rng, RngCore, rngs::SmallRng, seq::IndexedRandom as _};
use visibility::datapath::ProgramKind;
use visibility_common::{
    packet::{ETH_HLEN, Family, FragmentPart, IPPROTO_TCP, IPPROTO_UDP, Transport, parse},
    testing::{FrameBuilder, Transport as L4, checksum},
};

use super::model::{Iface, NodeFacts, Step, l4_sum};

/// Pods of the lab the harness builds.
pub const PODS: usize = 3;
/// The longest frame: a full-size packet on the uplink's 1500-byte MTU.
pub const MAX_FRAME: usize = 1514;

const HOP_BY_HOP: u8 = 0;
const ROUTING: u8 = 43;
const FRAGMENT: u8 = 44;
const AH: u8 = 51;
const DEST_OPTS: u8 = 60;

/// A Service's address: outside the Pod CIDRs, what the node's NAT puts back on a
/// backend's reply.
pub const SERVICE_V4: [u8; 4] = [10, 96, 0, 10];
pub const SERVICE_V6: [u8; 16] = [0xfd, 0, 0, 0x96, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0x0a];

fn v4(a: [u8; 4]) -> [u8; 16] {
    let mut out = [0u8; 16];
    out[..4].copy_from_slice(&a);
    out
}

fn v6(segments: [u16; 8]) -> [u8; 16] {
    std::net::Ipv6Addr::new(
        segments[0],
        segments[1],
        segments[2],
        segments[3],
        segments[4],
        segments[5],
        segments[6],
        segments[7],
    )
    .octets()
}

/// Addresses that mean something to the datapath, per family: the Pods', a free address
/// in the Pod CIDR, the node's (in the Pod CIDR and on the uplink), the gateway's, a
/// Service's, the Internet's, link-local, multicast, broadcast and unspecified.
pub fn interesting_addrs(family: Family, rng: &mut SmallRng) -> [u8; 16] {
    let pod = rng.random_range(0..PODS) as u8;
    match family {
        Family::V4 => v4(*[
            [10, 52, 0, 2 + pod],
            [10, 52, 0, 2 + pod],
            [10, 52, 0, 2 + pod],
            [10, 52, 0, 77],
            [10, 52, 0, 1],
            [10, 52, 0, 255],
            [10, 128, 0, 2],
            [10, 128, 0, 1],
            SERVICE_V4,
            [8, 8, 8, 8],
            [169, 254, 1, 1],
            [224, 0, 0, 5],
            [255, 255, 255, 255],
            [0, 0, 0, 0],
            rng.random(),
        ]
        .choose(rng)
        .expect("not empty")),
        Family::V6 => *[
            v6([0xfd00, 0x52, 0, 0, 0, 0, 0, 2 + u16::from(pod)]),
            v6([0xfd00, 0x52, 0, 0, 0, 0, 0, 2 + u16::from(pod)]),
            v6([0xfd00, 0x52, 0, 0, 0, 0, 0, 2 + u16::from(pod)]),
            v6([0xfd00, 0x52, 0, 0, 0, 0, 0, 0x77]),
            v6([0xfe80, 0, 0, 0, 0, 0, 0, 1]),
            v6([0xfd00, 0x128, 0, 0, 0, 0, 0, 2]),
            v6([0xfd00, 0x128, 0, 0, 0, 0, 0, 1]),
            SERVICE_V6,
            v6([0x2001, 0xdb8, 0, 0, 0, 0, 0, 1]),
            v6([0xff02, 0, 0, 0, 0, 0, 0, 1]),
            [0; 16],
            rng.random(),
        ]
        .choose(rng)
        .expect("not empty"),
    }
}

fn port(rng: &mut SmallRng) -> u16 {
    *[0, 53, 80, 443, 8080, 9000, 40000, rng.random()]
        .choose(rng)
        .expect("not empty")
}

fn transport(rng: &mut SmallRng) -> L4 {
    match rng.random_range(0..10) {
        0..=2 => L4::Tcp {
            src_port: port(rng),
            dst_port: port(rng),
            flags: *[0x02, 0x12, 0x10, 0x18, 0x11, 0x04, rng.random()]
                .choose(rng)
                .expect("not empty"),
        },
        3..=5 => L4::Udp {
            src_port: port(rng),
            dst_port: port(rng),
        },
        6..=7 => {
            // Echo request and reply (IPv4 8/0, IPv6 128/129), and errors.
            let (kind, code) = *[(8, 0), (0, 0), (128, 0), (129, 0), (3, 4), (1, 0), (2, 0)]
                .choose(rng)
                .expect("not empty");
            L4::Icmp {
                kind,
                code,
                id: rng.random(),
                seq: rng.random(),
            }
        }
        8 => L4::Raw { protocol: 132 },
        _ => L4::Raw {
            protocol: *[47, 50, 89, 255, 0, 44, rng.random()]
                .choose(rng)
                .expect("not empty"),
        },
    }
}

/// One well-formed frame between two addresses of `family`.
pub fn frame_between(family: Family, src: [u8; 16], dst: [u8; 16], rng: &mut SmallRng) -> Vec<u8> {
    let l4 = transport(rng);
    let mut b = match family {
        Family::V4 => FrameBuilder::ipv4(
            src[..4].try_into().expect("4 bytes"),
            dst[..4].try_into().expect("4 bytes"),
            l4,
        ),
        Family::V6 => FrameBuilder::ipv6(src, dst, l4),
    };
    let len = if rng.random_bool(0.2) {
        rng.random_range(0..1200)
    } else {
        rng.random_range(0..64)
    };
    let mut payload = vec![0u8; len];
    rng.fill_bytes(&mut payload);
    b.payload = payload;
    b.ttl = *[64, 64, 1, 2, 0, 255].choose(rng).expect("not empty");
    match family {
        Family::V4 if rng.random_bool(0.15) => {
            // NOPs, end of options, or a record route, up to 40 bytes.
            let words = rng.random_range(1..=10);
            let mut options = vec![1u8; words * 4];
            if rng.random_bool(0.5) {
                options[0] = 7;
                options[1] = (words * 4 - 1).min(39) as u8;
                options[2] = 4;
            } else if rng.random_bool(0.3) {
                rng.fill_bytes(&mut options);
            }
            b.ipv4_options = options;
        }
        Family::V6 if rng.random_bool(0.25) => {
            for _ in 0..rng.random_range(1..=6) {
                let kind = *[HOP_BY_HOP, ROUTING, DEST_OPTS, AH, FRAGMENT]
                    .choose(rng)
                    .expect("not empty");
                let body = match kind {
                    FRAGMENT => {
                        let mut body = vec![0u8; 6];
                        if rng.random_bool(0.5) {
                            let offset: u16 = rng.random_range(0..200) << 3;
                            body[..2].copy_from_slice(
                                &(offset | u16::from(rng.random_bool(0.5))).to_be_bytes(),
                            );
                        }
                        rng.fill_bytes(&mut body[2..]);
                        body
                    }
                    // AH counts its length in 4-byte words less 2, the builder in 8-byte
                    // words less 1: they agree on 8 bytes only.
                    AH => vec![0u8; 6],
                    _ => vec![0u8; 6 + 8 * rng.random_range(0..3)],
                };
                b.ipv6_extensions.push((kind, body));
            }
        }
        _ => {}
    }
    let mut frame = b.build();
    if family == Family::V4 && rng.random_bool(0.15) {
        // A fragment: first (more fragments, offset 0) or later.
        let first = rng.random_bool(0.5);
        let flags: u16 = if first {
            0x2000
        } else {
            rng.random_range(1..400u16) | if rng.random_bool(0.5) { 0x2000 } else { 0 }
        };
        frame[ETH_HLEN + 4..ETH_HLEN + 6].copy_from_slice(&rng.random::<u16>().to_be_bytes());
        frame[ETH_HLEN + 6..ETH_HLEN + 8].copy_from_slice(&flags.to_be_bytes());
        fix_ipv4_header(&mut frame);
    }
    if rng.random_bool(0.03) {
        frame = vlan_tagged(&frame, rng);
    }
    frame.truncate(MAX_FRAME);
    frame
}

/// The frame with an 802.1Q tag after the MACs.
fn vlan_tagged(frame: &[u8], rng: &mut SmallRng) -> Vec<u8> {
    let mut out = frame[..12].to_vec();
    out.extend_from_slice(&[0x81, 0x00]);
    out.extend_from_slice(&(rng.random::<u16>() & 0x0fff).to_be_bytes());
    out.extend_from_slice(&frame[12..]);
    out
}

/// A well-formed frame between interesting addresses.
pub fn seed_frame(rng: &mut SmallRng) -> Vec<u8> {
    let family = if rng.random_bool(0.5) {
        Family::V4
    } else {
        Family::V6
    };
    let src = interesting_addrs(family, rng);
    let dst = interesting_addrs(family, rng);
    frame_between(family, src, dst, rng)
}

/// Recomputes the IPv4 header checksum, when the frame has a whole IPv4 header.
pub fn fix_ipv4_header(frame: &mut [u8]) {
    if frame.len() < ETH_HLEN + 20 || frame[12..14] != [0x08, 0x00] {
        return;
    }
    let len = usize::from(frame[ETH_HLEN] & 0x0f) * 4;
    if len < 20 || frame.len() < ETH_HLEN + len {
        return;
    }
    frame[ETH_HLEN + 10..ETH_HLEN + 12].copy_from_slice(&[0, 0]);
    let sum = checksum(&[&frame[ETH_HLEN..ETH_HLEN + len]]);
    frame[ETH_HLEN + 10..ETH_HLEN + 12].copy_from_slice(&sum.to_be_bytes());
}

/// Sets the IP length to what the frame holds (as a truncating link would leave it
/// consistent), then fixes the header checksum.
pub fn fix_ip_length(frame: &mut [u8]) {
    let ip_len = frame.len().saturating_sub(ETH_HLEN);
    match frame.get(12..14) {
        Some([0x08, 0x00]) if ip_len >= 20 => {
            frame[ETH_HLEN + 2..ETH_HLEN + 4].copy_from_slice(&(ip_len as u16).to_be_bytes());
            fix_ipv4_header(frame);
        }
        Some([0x86, 0xdd]) if ip_len >= 40 => {
            frame[ETH_HLEN + 4..ETH_HLEN + 6]
                .copy_from_slice(&((ip_len - 40) as u16).to_be_bytes());
        }
        _ => {}
    }
}

/// Recomputes the IPv4 header checksum and the transport checksum of a whole TCP, UDP
/// or ICMP packet, as a host that sent the packet (or the node's NAT) would.
pub fn fix_checksums(frame: &mut [u8]) {
    fix_ipv4_header(frame);
    let Ok(packet) = parse(&frame[..], frame.len()) else {
        return;
    };
    if packet.fragment != FragmentPart::Whole || packet.transport != Transport::Read {
        return;
    }
    let l4 = usize::from(packet.l4_offset);
    let end = ETH_HLEN + usize::from(packet.ip_len);
    let at = match packet.protocol {
        IPPROTO_TCP => 16,
        IPPROTO_UDP => 6,
        1 | 58 => 2,
        _ => return,
    };
    if end < l4 + at + 2 {
        return;
    }
    frame[l4 + at..l4 + at + 2].copy_from_slice(&[0, 0]);
    let mut sum = l4_sum(&packet, &frame[l4..end]);
    if sum == 0 && packet.protocol == IPPROTO_UDP {
        sum = 0xffff;
    }
    frame[l4 + at..l4 + at + 2].copy_from_slice(&sum.to_be_bytes());
}

/// One mutation of a frame, or a few.
pub fn mutate(frame: &mut Vec<u8>, rng: &mut SmallRng) {
    for _ in 0..rng.random_range(1..=3) {
        mutate_once(frame, rng);
    }
    frame.truncate(MAX_FRAME);
}

fn mutate_once(frame: &mut Vec<u8>, rng: &mut SmallRng) {
    if frame.is_empty() {
        frame.push(rng.random());
        return;
    }
    // Offsets near the headers are where the parser decides.
    let at = |rng: &mut SmallRng, len: usize| {
        if rng.random_bool(0.7) {
            rng.random_range(0..len.min(ETH_HLEN + 80))
        } else {
            rng.random_range(0..len)
        }
    };
    let fix = rng.random_bool(0.6);
    match rng.random_range(0..12) {
        0 => {
            let i = at(rng, frame.len());
            frame[i] ^= 1 << rng.random_range(0..8);
        }
        1 => {
            let i = at(rng, frame.len());
            frame[i] = *[
                0,
                1,
                0xff,
                0x7f,
                0x80,
                0x40,
                0x45,
                0x60,
                6,
                17,
                58,
                44,
                rng.random(),
            ]
            .choose(rng)
            .expect("not empty");
        }
        2 => {
            let len = rng.random_range(0..=frame.len());
            frame.truncate(len);
            if rng.random_bool(0.5) {
                fix_ip_length(frame);
            }
        }
        3 => {
            let i = at(rng, frame.len());
            let n = rng.random_range(1..=8);
            for _ in 0..n {
                frame.insert(i, rng.random());
            }
        }
        4 => {
            let i = at(rng, frame.len());
            let end = (i + rng.random_range(1..=8)).min(frame.len());
            frame.drain(i..end);
        }
        5 => {
            // The IP length fields, to odd values.
            if frame.len() > ETH_HLEN + 6 {
                let value: u16 = *[0, 1, 20, 40, 0xffff, rng.random()]
                    .choose(rng)
                    .expect("not empty");
                let at = if frame[12..14] == [0x86, 0xdd] { 4 } else { 2 };
                frame[ETH_HLEN + at..ETH_HLEN + at + 2].copy_from_slice(&value.to_be_bytes());
            }
        }
        6 => {
            // The IPv4 header length nibble.
            if frame.len() > ETH_HLEN {
                frame[ETH_HLEN] = (frame[ETH_HLEN] & 0xf0) | rng.random_range(0..16);
            }
        }
        7 => {
            // An address, to one the datapath cares about.
            let v6 = frame.get(12..14) == Some(&[0x86, 0xdd]);
            let (family, offsets, len) = if v6 {
                (Family::V6, [ETH_HLEN + 8, ETH_HLEN + 24], 16)
            } else {
                (Family::V4, [ETH_HLEN + 12, ETH_HLEN + 16], 4)
            };
            let offset = *offsets.choose(rng).expect("not empty");
            let addr = interesting_addrs(family, rng);
            if frame.len() >= offset + len {
                frame[offset..offset + len].copy_from_slice(&addr[..len]);
            }
        }
        8 => {
            // TTL or hop limit.
            let v6 = frame.get(12..14) == Some(&[0x86, 0xdd]);
            let i = if v6 { ETH_HLEN + 7 } else { ETH_HLEN + 8 };
            if frame.len() > i {
                frame[i] = *[0, 1, 2, 255].choose(rng).expect("not empty");
            }
        }
        9 => {
            // Fragment flags and offset (IPv4).
            if frame.len() >= ETH_HLEN + 8 && frame[12..14] == [0x08, 0x00] {
                let value: u16 = *[0x2000, 0x0001, 0x2001, 0x4000, 0x1fff, rng.random()]
                    .choose(rng)
                    .expect("not empty");
                frame[ETH_HLEN + 6..ETH_HLEN + 8].copy_from_slice(&value.to_be_bytes());
            }
        }
        10 => {
            // The ethertype.
            if frame.len() >= 14 {
                let value: [u8; 2] = *[[0x08, 0x00], [0x86, 0xdd], [0x81, 0x00], [0x08, 0x06]]
                    .choose(rng)
                    .expect("not empty");
                frame[12..14].copy_from_slice(&value);
            }
        }
        _ => {
            // A protocol or next-header byte.
            let v6 = frame.get(12..14) == Some(&[0x86, 0xdd]);
            let i = if v6 { ETH_HLEN + 6 } else { ETH_HLEN + 9 };
            if frame.len() > i {
                frame[i] = *[0, 1, 6, 17, 43, 44, 51, 58, 60, 132, rng.random()]
                    .choose(rng)
                    .expect("not empty");
            }
        }
    }
    if fix {
        fix_checksums(frame);
    }
}

/// Random bytes, often with an IP ethertype and version.
pub fn random_frame(rng: &mut SmallRng) -> Vec<u8> {
    let len = rng.random_range(0..200);
    let mut frame = vec![0u8; len];
    rng.fill_bytes(&mut frame);
    if len >= 15 && rng.random_bool(0.7) {
        if rng.random_bool(0.5) {
            frame[12..14].copy_from_slice(&[0x08, 0x00]);
            frame[14] = 0x45;
        } else {
            frame[12..14].copy_from_slice(&[0x86, 0xdd]);
            frame[14] = 0x60;
        }
        if rng.random_bool(0.5) {
            fix_ip_length(&mut frame);
        }
    }
    frame
}

/// A frame for a single step: seed, mutated seed, or random bytes.
pub fn any_frame(rng: &mut SmallRng) -> Vec<u8> {
    match rng.random_range(0..10) {
        0..=2 => seed_frame(rng),
        3..=8 => {
            let mut frame = seed_frame(rng);
            mutate(&mut frame, rng);
            frame
        }
        _ => random_frame(rng),
    }
}

fn any_iface(rng: &mut SmallRng) -> Iface {
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
enum Stack {
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
fn fragmented(
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
                piece[ETH_HLEN + 6] = FRAGMENT;
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
            if frame.get(ETH_HLEN + 6) != Some(&FRAGMENT) || frame.len() < ETH_HLEN + 48 {
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

/// Every truncation of `frame`, raw and with the IP length made to fit.
pub fn truncations(frame: &[u8]) -> Vec<Vec<u8>> {
    let mut out = Vec::new();
    for len in 0..frame.len() {
        let cut = frame[..len].to_vec();
        let mut fitted = cut.clone();
        fix_ip_length(&mut fitted);
        out.push(cut.clone());
        if fitted != cut {
            out.push(fitted);
        }
    }
    out
}
