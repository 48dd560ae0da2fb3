//! Well-formed frames of every protocol: every field the parser yields, and the
//! offsets and checksum arithmetic the datapath's rewrites use.

use alloc::{vec, vec::Vec};

use crate::{
    packet::FragmentPart,
    packet::{
        ETH_HLEN, Family, IPPROTO_ICMP, IPPROTO_ICMPV6, IPPROTO_TCP, IPPROTO_UDP,
        IPV4_CHECKSUM_OFFSET, IPV4_TTL_OFFSET, IPV6_HOP_LIMIT_OFFSET, Packet, PacketReader,
        checksum_replace16,
    },
    testing::{DST4, DST6, FrameBuilder, SRC4, SRC6, Transport, checksum, ipv4_header_checksum_ok},
};

use super::frames::*;

#[test]
fn tcp_ipv4_yields_every_field() {
    let frame = FrameBuilder::of(Family::V4, tcp(40_000, 80, SYN | ACK))
        .ttl(17)
        .payload(b"hello")
        .build();
    assert!(ipv4_header_checksum_ok(&frame));
    let packet = parse_frame(&frame).expect("a TCP/IPv4 frame parses");
    assert_eq!(
        packet,
        Packet {
            family: Family::V4,
            src: v4(SRC4),
            dst: v4(DST4),
            protocol: IPPROTO_TCP,
            src_port: 40_000,
            dst_port: 80,
            tcp_flags: SYN | ACK,
            ttl: 17,
            ip_len: 20 + 20 + 5,
            fragment: FragmentPart::Whole,
            transport: crate::packet::Transport::Read,
            fragment_id: 0,
            l4_offset: 14 + 20,
        }
    );
}

#[test]
fn tcp_ipv6_yields_every_field() {
    let frame = FrameBuilder::of(Family::V6, tcp(443, 51_234, FIN | PSH | ACK))
        .ttl(3)
        .payload(&[0xab; 11])
        .build();
    let packet = parse_frame(&frame).expect("a TCP/IPv6 frame parses");
    assert_eq!(
        packet,
        Packet {
            family: Family::V6,
            src: SRC6,
            dst: DST6,
            protocol: IPPROTO_TCP,
            src_port: 443,
            dst_port: 51_234,
            tcp_flags: FIN | PSH | ACK,
            ttl: 3,
            ip_len: 40 + 20 + 11,
            fragment: FragmentPart::Whole,
            transport: crate::packet::Transport::Read,
            fragment_id: 0,
            l4_offset: 14 + 40,
        }
    );
}

#[test]
fn tcp_ports_and_flags_are_read_in_host_order() {
    let ports = [
        (0u16, 0u16),
        (1, 65_535),
        (65_535, 1),
        (0x1234, 0xabcd),
        (0xff00, 0x00ff),
    ];
    let flags = [
        0,
        FIN,
        SYN,
        RST,
        PSH,
        ACK,
        URG,
        ECE,
        CWR,
        SYN | ECE | CWR,
        0xff,
    ];
    for family in [Family::V4, Family::V6] {
        for &(src_port, dst_port) in &ports {
            for &flag in &flags {
                let frame = FrameBuilder::of(family, tcp(src_port, dst_port, flag)).build();
                let packet = parse_frame(&frame).unwrap();
                assert_eq!(packet.family, family);
                assert_eq!(packet.protocol, IPPROTO_TCP);
                assert_eq!(
                    (packet.src_port, packet.dst_port, packet.tcp_flags),
                    (src_port, dst_port, flag),
                    "{family:?} {src_port}->{dst_port} flags {flag:#04x}"
                );
            }
        }
    }
}

#[test]
fn udp_yields_ports_and_no_flags() {
    for family in [Family::V4, Family::V6] {
        for (src_port, dst_port) in [(53u16, 40_001u16), (40_001, 53), (0xbeef, 0x0102)] {
            let frame = FrameBuilder::of(family, udp(src_port, dst_port))
                .payload(&[0xff; 9])
                .build();
            let packet = parse_frame(&frame).unwrap();
            assert_eq!(packet.family, family);
            assert_eq!(packet.src, src_of(family));
            assert_eq!(packet.dst, dst_of(family));
            assert_eq!(packet.protocol, IPPROTO_UDP);
            assert_eq!((packet.src_port, packet.dst_port), (src_port, dst_port));
            assert_eq!(packet.tcp_flags, 0, "UDP has no TCP flags");
            let ip_header = if family == Family::V4 { 20 } else { 40 };
            assert_eq!(usize::from(packet.ip_len), ip_header + 8 + 9);
        }
    }
}

#[test]
fn icmp_echo_carries_identifier_and_type_code() {
    // (kind, code, id) -> (src_port, dst_port)
    let cases: [(u8, u8, u16, u16, u16); 5] = [
        (8, 0, 0x1234, 0x1234, 0x0800), // echo request
        (0, 0, 0xbeef, 0xbeef, 0x0000), // echo reply
        (8, 0, 0, 0, 0x0800),           // identifier zero
        (3, 1, 0x5555, 0, 0x0301),      // host unreachable: no identifier
        (11, 0, 0x5555, 0, 0x0b00),     // time exceeded: no identifier
    ];
    for (kind, code, id, src_port, dst_port) in cases {
        let frame = FrameBuilder::of(Family::V4, icmp(kind, code, id))
            .payload(b"ping")
            .build();
        let packet = parse_frame(&frame).unwrap();
        assert_eq!(packet.protocol, IPPROTO_ICMP);
        assert_eq!(
            (packet.src_port, packet.dst_port),
            (src_port, dst_port),
            "ICMP type {kind} code {code}"
        );
        assert_eq!(packet.tcp_flags, 0);
        assert_eq!(packet.ip_len, 20 + 8 + 4);
    }
}

#[test]
fn icmpv6_echo_carries_identifier_and_type_code() {
    let cases: [(u8, u8, u16, u16, u16); 6] = [
        (128, 0, 0x1234, 0x1234, 0x8000), // echo request
        (129, 0, 0xbeef, 0xbeef, 0x8100), // echo reply
        (1, 4, 0x5555, 0, 0x0104),        // port unreachable: no identifier
        (135, 0, 0x5555, 0, 0x8700),      // neighbour solicitation: no identifier
        // ICMPv4 echo type numbers mean nothing in ICMPv6.
        (8, 0, 0x5555, 0, 0x0800),
        (0, 0, 0x5555, 0, 0x0000),
    ];
    for (kind, code, id, src_port, dst_port) in cases {
        let frame = FrameBuilder::of(Family::V6, icmp(kind, code, id)).build();
        let packet = parse_frame(&frame).unwrap();
        assert_eq!(packet.protocol, IPPROTO_ICMPV6);
        assert_eq!(
            (packet.src_port, packet.dst_port),
            (src_port, dst_port),
            "ICMPv6 type {kind} code {code}"
        );
        assert_eq!(packet.ip_len, 40 + 8);
    }
}

#[test]
fn icmpv6_echo_type_numbers_mean_nothing_in_icmpv4() {
    for kind in [128u8, 129] {
        let frame = FrameBuilder::of(Family::V4, icmp(kind, 0, 0x4242)).build();
        let packet = parse_frame(&frame).unwrap();
        assert_eq!(packet.protocol, IPPROTO_ICMP);
        assert_eq!(
            (packet.src_port, packet.dst_port),
            (0, u16::from(kind) << 8)
        );
    }
}

#[test]
fn sctp_carries_ports() {
    for family in [Family::V4, Family::V6] {
        let mut header = Vec::new();
        header.extend_from_slice(&5000u16.to_be_bytes());
        header.extend_from_slice(&6000u16.to_be_bytes());
        header.extend_from_slice(&[0; 8]);
        let frame = FrameBuilder::of(family, Transport::Raw { protocol: SCTP })
            .payload(&header)
            .build();
        let packet = parse_frame(&frame).unwrap();
        assert_eq!((packet.src_port, packet.dst_port), (5000, 6000));
        // Shorter than SCTP's 12-byte common header: no ports.
        let frame = FrameBuilder::of(family, Transport::Raw { protocol: SCTP })
            .payload(&header[..8])
            .build();
        assert_eq!(
            parse_frame(&frame).unwrap().transport,
            crate::packet::Transport::Unreadable
        );
    }
}

#[test]
fn other_protocols_carry_no_ports() {
    for family in [Family::V4, Family::V6] {
        // SCTP is read like UDP (its ports open its header); see below.
        for protocol in [GRE, 50, 253, NO_NEXT_HEADER] {
            for payload in [&[][..], &[0xa5; 3][..], &[0x5a; 64][..]] {
                let frame = FrameBuilder::of(family, Transport::Raw { protocol })
                    .payload(payload)
                    .build();
                let packet = parse_frame(&frame).unwrap();
                assert_eq!(packet.protocol, protocol);
                assert_eq!(
                    (packet.src_port, packet.dst_port, packet.tcp_flags),
                    (0, 0, 0),
                    "{family:?} protocol {protocol} with {} bytes",
                    payload.len()
                );
                assert_eq!(packet.src, src_of(family));
                assert_eq!(packet.dst, dst_of(family));
                assert_eq!(usize::from(packet.ip_len), frame.len() - ETH_HLEN);
            }
        }
    }
}

#[test]
fn ethernet_padding_is_not_part_of_the_ip_packet() {
    // Frames shorter than 60 bytes are padded on the wire; ip_len comes from the IP header.
    for family in [Family::V4, Family::V6] {
        let mut frame = FrameBuilder::of(family, udp(1000, 2000)).build();
        let unpadded = frame.len();
        frame.resize(unpadded + 18, 0);
        let packet = parse_frame(&frame).unwrap();
        assert_eq!(usize::from(packet.ip_len), unpadded - ETH_HLEN);
        assert_eq!((packet.src_port, packet.dst_port), (1000, 2000));
    }
}

#[test]
fn largest_ipv6_packet_length_does_not_wrap() {
    // payload length 65535: the IP packet is 65575 bytes, more than a u16 holds. It
    // must not wrap around to a tiny length (which would corrupt byte counters).
    let frame = FrameBuilder::of(Family::V6, Transport::Raw { protocol: GRE })
        .payload(&vec![0; 65_535])
        .build();
    assert_eq!(frame.len(), ETH_HLEN + 40 + 65_535);
    let packet = parse_frame(&frame).unwrap();
    assert_eq!(packet.ip_len, u16::MAX);
    // The largest length that fits is exact.
    let frame = FrameBuilder::of(Family::V6, Transport::Raw { protocol: GRE })
        .payload(&vec![0; 65_495])
        .build();
    assert_eq!(parse_frame(&frame).unwrap().ip_len, u16::MAX);
}

#[test]
fn rewrite_offsets_point_at_the_fields() {
    let frame = FrameBuilder::of(Family::V4, tcp(1, 2, 0)).ttl(0x77).build();
    assert_eq!(frame[IPV4_TTL_OFFSET], 0x77);
    let header = &frame[ETH_HLEN..ETH_HLEN + 20];
    let mut zeroed = header.to_vec();
    zeroed[10..12].fill(0);
    assert_eq!(
        u16::from_be_bytes([frame[IPV4_CHECKSUM_OFFSET], frame[IPV4_CHECKSUM_OFFSET + 1]]),
        checksum(&[&zeroed])
    );
    let frame = FrameBuilder::of(Family::V6, tcp(1, 2, 0)).ttl(0x66).build();
    assert_eq!(frame[IPV6_HOP_LIMIT_OFFSET], 0x66);
    assert_eq!(parse_frame(&frame).unwrap().ttl, 0x66);
}

#[test]
fn slice_reader_reads_exactly_or_not_at_all() {
    let bytes: &[u8] = &[1, 2, 3, 4, 5];
    assert_eq!(bytes.read::<2>(0), Some([1, 2]));
    assert_eq!(bytes.read::<2>(3), Some([4, 5]));
    assert_eq!(bytes.read::<5>(0), Some([1, 2, 3, 4, 5]));
    assert_eq!(bytes.read::<0>(5), Some([]));
    assert_eq!(bytes.read::<2>(4), None);
    assert_eq!(bytes.read::<6>(0), None);
    assert_eq!(bytes.read::<1>(5), None);
    assert_eq!(bytes.read::<1>(usize::MAX), None);
    assert_eq!(bytes.read::<2>(usize::MAX - 1), None);
}

/// The datapath spends a hop with an incremental checksum update; for every TTL and
/// protocol the result must equal a checksum computed from scratch.
#[test]
fn incremental_checksum_update_matches_a_full_recomputation() {
    for protocol in [IPPROTO_TCP, IPPROTO_UDP, IPPROTO_ICMP, 0, 255] {
        for ttl in 1..=255u8 {
            let mut frame = FrameBuilder::ipv4([10, 52, 0, 2], [10, 52, 0, 3], udp(1, 2)).build();
            frame[IPV4_TTL_OFFSET] = ttl;
            frame[IPV4_TTL_OFFSET + 1] = protocol;
            // A valid header to start from.
            frame[IPV4_CHECKSUM_OFFSET..IPV4_CHECKSUM_OFFSET + 2].fill(0);
            let full = checksum(&[&frame[ETH_HLEN..ETH_HLEN + 20]]);
            frame[IPV4_CHECKSUM_OFFSET..IPV4_CHECKSUM_OFFSET + 2]
                .copy_from_slice(&full.to_be_bytes());
            assert!(ipv4_header_checksum_ok(&frame));

            let old = u16::from_be_bytes([ttl, protocol]);
            let new = u16::from_be_bytes([ttl - 1, protocol]);
            let updated = checksum_replace16(full, old, new);
            frame[IPV4_TTL_OFFSET] = ttl - 1;
            frame[IPV4_CHECKSUM_OFFSET..IPV4_CHECKSUM_OFFSET + 2]
                .copy_from_slice(&updated.to_be_bytes());
            assert!(
                ipv4_header_checksum_ok(&frame),
                "ttl {ttl} protocol {protocol}: {updated:#06x}"
            );
        }
    }
}
