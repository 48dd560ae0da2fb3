//! Well-formed frames for the differential fuzz harness, of every kind the datapath
//! meets (TCP, UDP, ICMP, other protocols, IPv4 and IPv6, IPv4 options, IPv6 extension
//! headers, fragments, VLAN tags) between addresses that mean something to it, and the
//! fix-ups (lengths, checksums) a sender would make.

use rand::{Rng, RngCore, rngs::SmallRng, seq::IndexedRandom as _};
use visibility_common::{
    packet::{
        ETH_HLEN, Family, FragmentPart, IPPROTO_AH, IPPROTO_DSTOPTS, IPPROTO_FRAGMENT,
        IPPROTO_HOPOPTS, IPPROTO_ROUTING, IPPROTO_TCP, IPPROTO_UDP, Transport, parse,
    },
    testing::{FrameBuilder, Transport as L4, fix_ipv4_checksum, transport_sum},
};

/// Pods of the lab the harness builds.
pub const PODS: usize = 3;
/// The longest frame: a full-size packet on the uplink's 1500-byte MTU.
pub const MAX_FRAME: usize = 1514;

/// A Service's address: outside the Pod CIDRs, what the node's NAT puts back on a
/// backend's reply.
pub const SERVICE_V4: [u8; 4] = [10, 96, 0, 10];
pub const SERVICE_V6: [u8; 16] = [0xfd, 0, 0, 0x96, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0x0a];

pub(super) fn v4(a: [u8; 4]) -> [u8; 16] {
    let mut out = [0u8; 16];
    out[..4].copy_from_slice(&a);
    out
}

pub(super) fn v6(segments: [u16; 8]) -> [u8; 16] {
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

pub(super) fn port(rng: &mut SmallRng) -> u16 {
    *[0, 53, 80, 443, 8080, 9000, 40000, rng.random()]
        .choose(rng)
        .expect("not empty")
}

pub(super) fn transport(rng: &mut SmallRng) -> L4 {
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
                let kind = *[
                    IPPROTO_HOPOPTS,
                    IPPROTO_ROUTING,
                    IPPROTO_DSTOPTS,
                    IPPROTO_AH,
                    IPPROTO_FRAGMENT,
                ]
                .choose(rng)
                .expect("not empty");
                let body = match kind {
                    IPPROTO_FRAGMENT => {
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
                    IPPROTO_AH => vec![0u8; 6],
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
pub(super) fn vlan_tagged(frame: &[u8], rng: &mut SmallRng) -> Vec<u8> {
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
pub(super) fn fix_ipv4_header(frame: &mut [u8]) {
    if frame.len() < ETH_HLEN + 20 || frame[12..14] != [0x08, 0x00] {
        return;
    }
    let len = usize::from(frame[ETH_HLEN] & 0x0f) * 4;
    if len >= 20 && frame.len() >= ETH_HLEN + len {
        fix_ipv4_checksum(frame);
    }
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
    let mut sum = transport_sum(&packet, &frame[l4..end]);
    if sum == 0 && packet.protocol == IPPROTO_UDP {
        sum = 0xffff;
    }
    frame[l4 + at..l4 + at + 2].copy_from_slice(&sum.to_be_bytes());
}

#[cfg(test)]
mod tests {
    use rand::SeedableRng as _;

    use super::*;
    use crate::fuzz::{case::hex, rewrites::l4_checksum_ok};

    #[test]
    fn generated_frames_are_well_formed() {
        let mut rng = SmallRng::seed_from_u64(1);
        let mut parsed = 0;
        for _ in 0..2000 {
            let frame = seed_frame(&mut rng);
            assert!(frame.len() <= MAX_FRAME);
            if let Ok(p) = parse(&frame[..], frame.len()) {
                parsed += 1;
                if p.fragment == FragmentPart::Whole && frame[12..14] != [0x81, 0] {
                    assert_ne!(l4_checksum_ok(&frame), Some(false), "{}", hex(&frame));
                }
            }
        }
        assert!(parsed > 1800, "{parsed} of 2000 parsed");
    }
}
