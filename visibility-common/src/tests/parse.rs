//! Tests of the header parser, on frames built by [`FrameBuilder`] and on frames
//! that are made odd on purpose after building.

use alloc::{vec, vec::Vec};

use crate::{
    packet::FragmentPart,
    packet::{
        ETH_HLEN, Family, IPPROTO_ICMP, IPPROTO_ICMPV6, IPPROTO_TCP, IPPROTO_UDP,
        IPV4_CHECKSUM_OFFSET, IPV4_TTL_OFFSET, IPV6_HOP_LIMIT_OFFSET, MAX_IPV6_EXTENSION_HEADERS,
        Packet, PacketReader, ParseError, checksum_replace16, is_link_scope, parse,
    },
    testing::{
        DST4, DST6, FrameBuilder, IPV4_FLAGS_FRAGMENT, IPV4_TOTAL_LEN, IPV4_VERSION_IHL,
        IPV6_FIRST_EXTENSION, IPV6_NEXT_HEADER, IPV6_PAYLOAD_LEN, SRC4, SRC6, Transport, checksum,
        fix_ipv4_checksum, ipv4_header_checksum_ok,
        odd_frames::{OddFrame, odd_frames},
        set_be16,
    },
};

const HOPOPTS: u8 = 0;
const ROUTING: u8 = 43;
const FRAGMENT: u8 = 44;
const AH: u8 = 51;
const NO_NEXT_HEADER: u8 = 59;
const DSTOPTS: u8 = 60;
const GRE: u8 = 47;
const SCTP: u8 = 132;

const FIN: u8 = 0x01;
const SYN: u8 = 0x02;
const RST: u8 = 0x04;
const PSH: u8 = 0x08;
const ACK: u8 = 0x10;
const URG: u8 = 0x20;
const ECE: u8 = 0x40;
const CWR: u8 = 0x80;

fn v4(addr: [u8; 4]) -> [u8; 16] {
    let mut out = [0u8; 16];
    out[..4].copy_from_slice(&addr);
    out
}

fn v6(words: [u16; 8]) -> [u8; 16] {
    let mut out = [0u8; 16];
    for (i, w) in words.iter().enumerate() {
        out[2 * i..2 * i + 2].copy_from_slice(&w.to_be_bytes());
    }
    out
}

fn tcp(src_port: u16, dst_port: u16, flags: u8) -> Transport {
    Transport::Tcp {
        src_port,
        dst_port,
        flags,
    }
}

fn udp(src_port: u16, dst_port: u16) -> Transport {
    Transport::Udp { src_port, dst_port }
}

fn icmp(kind: u8, code: u8, id: u16) -> Transport {
    Transport::Icmp {
        kind,
        code,
        id,
        seq: 7,
    }
}

fn src_of(family: Family) -> [u8; 16] {
    match family {
        Family::V4 => v4(SRC4),
        Family::V6 => SRC6,
    }
}

fn dst_of(family: Family) -> [u8; 16] {
    match family {
        Family::V4 => v4(DST4),
        Family::V6 => DST6,
    }
}

/// Parses a frame whose length is the slice's length, as the datapath sees it.
fn parse_frame(frame: &[u8]) -> Result<Packet, ParseError> {
    parse(frame, frame.len())
}

// ---------------------------------------------------------------------------
// Well-formed frames
// ---------------------------------------------------------------------------

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

// ---------------------------------------------------------------------------
// IPv4 options and fragments
// ---------------------------------------------------------------------------

#[test]
fn ipv4_options_are_skipped() {
    // Option bytes that would look like ports if the parser ignored the IHL.
    for options_len in [4usize, 8, 12, 20, 40] {
        let mut options = vec![0x01; options_len]; // NOPs
        options[options_len - 1] = 0x00; // end of options list
        for transport in [tcp(40_000, 22, SYN), udp(5353, 5353), icmp(8, 0, 0x0102)] {
            let mut b = FrameBuilder::of(Family::V4, transport.clone());
            b.ipv4_options = options.clone();
            let frame = b.build();
            assert!(ipv4_header_checksum_ok(&frame));
            assert_eq!(
                usize::from(frame[IPV4_VERSION_IHL] & 0x0f),
                5 + options_len / 4
            );
            let packet = parse_frame(&frame).unwrap();
            let expected = match transport {
                Transport::Tcp {
                    src_port,
                    dst_port,
                    flags,
                } => (IPPROTO_TCP, src_port, dst_port, flags),
                Transport::Udp { src_port, dst_port } => (IPPROTO_UDP, src_port, dst_port, 0),
                Transport::Icmp { id, .. } => (IPPROTO_ICMP, id, 0x0800, 0),
                Transport::Raw { .. } => unreachable!(),
            };
            assert_eq!(
                (
                    packet.protocol,
                    packet.src_port,
                    packet.dst_port,
                    packet.tcp_flags
                ),
                expected,
                "{options_len} bytes of options"
            );
            assert_eq!(packet.src, v4(SRC4));
            assert_eq!(packet.dst, v4(DST4));
            assert_eq!(usize::from(packet.ip_len), frame.len() - ETH_HLEN);
        }
    }
}

#[test]
fn ipv4_fragments_are_reported() {
    // (flags and fragment offset, result is a fragment)
    let cases: [(u16, bool); 10] = [
        (0x0000, false), // no flags
        (0x4000, false), // don't fragment
        (0x8000, false), // the reserved bit alone says nothing about fragmentation
        (0x2000, true),  // more fragments, first fragment
        (0x6000, true),  // DF and MF: inconsistent, but a fragment all the same
        (0x0001, true),  // last fragment, offset 8
        (0x00b9, true),  // last fragment, offset 1480
        (0x1fff, true),  // largest offset
        (0x2001, true),  // a middle fragment
        (0x4001, true),  // DF with an offset
    ];
    for transport in [
        tcp(1, 2, SYN),
        udp(3, 4),
        icmp(8, 0, 5),
        Transport::Raw { protocol: GRE },
    ] {
        for (flags_fragment, is_fragment) in cases {
            let mut frame = FrameBuilder::of(Family::V4, transport.clone()).build();
            set_be16(&mut frame, IPV4_FLAGS_FRAGMENT, flags_fragment);
            fix_ipv4_checksum(&mut frame);
            let packet = parse_frame(&frame).expect("fragments parse");
            let offset = flags_fragment & 0x1fff;
            let expected = match (is_fragment, offset) {
                (false, _) => FragmentPart::Whole,
                (true, 0) => FragmentPart::First,
                (true, _) => FragmentPart::Later,
            };
            assert_eq!(
                packet.fragment, expected,
                "flags/offset {flags_fragment:#06x}"
            );
            assert_eq!(
                packet.fragment_id,
                if is_fragment { 0x1234 } else { 0 },
                "the identification names the datagram"
            );
            if expected == FragmentPart::Later {
                assert_eq!(packet.transport, crate::packet::Transport::InFirstFragment);
                assert_eq!((packet.src_port, packet.dst_port), (0, 0));
            }
        }
    }
}

#[test]
fn a_non_first_ipv4_fragment_too_short_for_a_header_is_a_fragment() {
    // A trailing fragment may carry fewer bytes than a TCP header; it is still a fragment.
    let mut frame = FrameBuilder::of(
        Family::V4,
        Transport::Raw {
            protocol: IPPROTO_TCP,
        },
    )
    .payload(&[0; 4])
    .build();
    set_be16(&mut frame, IPV4_FLAGS_FRAGMENT, 0x0010);
    fix_ipv4_checksum(&mut frame);
    let packet = parse_frame(&frame).expect("a later fragment parses");
    assert_eq!(packet.fragment, FragmentPart::Later);
    assert_eq!(packet.transport, crate::packet::Transport::InFirstFragment);
}

// ---------------------------------------------------------------------------
// IPv6 extension headers
// ---------------------------------------------------------------------------

/// An extension header body that, read as ports, would give the wrong answer.
fn extension_body(len: usize) -> Vec<u8> {
    (0..len).map(|i| 0xc0 | (i as u8 & 0x3f)).collect()
}

#[test]
fn ipv6_extension_headers_are_walked_to_the_transport() {
    let chains: [&[(u8, usize)]; 9] = [
        &[(HOPOPTS, 6)],
        &[(DSTOPTS, 6)],
        &[(ROUTING, 22)],
        &[(HOPOPTS, 14), (DSTOPTS, 6)],
        &[(HOPOPTS, 6), (ROUTING, 22)],
        &[(HOPOPTS, 6), (DSTOPTS, 6), (ROUTING, 22)],
        &[(HOPOPTS, 6), (ROUTING, 22), (DSTOPTS, 30)],
        &[(DSTOPTS, 254)],
        // Exactly as many as the parser walks.
        &[(HOPOPTS, 6), (DSTOPTS, 6), (ROUTING, 6), (DSTOPTS, 6)],
    ];
    for chain in chains {
        assert!(chain.len() <= MAX_IPV6_EXTENSION_HEADERS);
        for transport in [
            tcp(40_000, 443, SYN | ECE | CWR),
            udp(546, 547),
            icmp(128, 0, 0x0a0b),
        ] {
            let mut b = FrameBuilder::of(Family::V6, transport.clone()).payload(b"xyz");
            b.ipv6_extensions = chain
                .iter()
                .map(|&(p, len)| (p, extension_body(len)))
                .collect();
            let frame = b.build();
            assert_eq!(frame[IPV6_NEXT_HEADER], chain[0].0);
            let extensions_len: usize = chain.iter().map(|&(_, len)| len + 2).sum();
            let packet = parse_frame(&frame)
                .unwrap_or_else(|e| panic!("{chain:?} then {transport:?}: {e:?}"));
            let expected = match transport {
                Transport::Tcp {
                    src_port,
                    dst_port,
                    flags,
                } => (IPPROTO_TCP, src_port, dst_port, flags),
                Transport::Udp { src_port, dst_port } => (IPPROTO_UDP, src_port, dst_port, 0),
                Transport::Icmp { id, kind, .. } => (IPPROTO_ICMPV6, id, u16::from(kind) << 8, 0),
                Transport::Raw { .. } => unreachable!(),
            };
            assert_eq!(
                (
                    packet.protocol,
                    packet.src_port,
                    packet.dst_port,
                    packet.tcp_flags
                ),
                expected,
                "{chain:?}"
            );
            assert_eq!(packet.src, SRC6);
            assert_eq!(packet.dst, DST6);
            assert_eq!(usize::from(packet.ip_len), frame.len() - ETH_HLEN);
            assert!(usize::from(packet.ip_len) >= 40 + extensions_len);
        }
    }
}

#[test]
fn ipv6_authentication_header_length_is_in_four_byte_units() {
    // AH: length field is (total / 4) - 2. A 24-byte AH, then TCP.
    let mut b = FrameBuilder::of(Family::V6, tcp(1234, 5678, ACK));
    b.ipv6_extensions = vec![(AH, extension_body(22))];
    let mut frame = b.build();
    frame[IPV6_FIRST_EXTENSION + 1] = 24 / 4 - 2;
    let packet = parse_frame(&frame).unwrap();
    assert_eq!(
        (packet.protocol, packet.src_port, packet.dst_port),
        (IPPROTO_TCP, 1234, 5678)
    );
}

#[test]
fn ipv6_other_next_headers_end_the_walk() {
    for (chain, protocol) in [
        (vec![(HOPOPTS, extension_body(6))], NO_NEXT_HEADER),
        (vec![(DSTOPTS, extension_body(6))], GRE),
    ] {
        let mut b = FrameBuilder::of(Family::V6, Transport::Raw { protocol })
            .payload(&[1, 2, 3, 4, 5, 6, 7, 8]);
        b.ipv6_extensions = chain;
        let packet = parse_frame(&b.build()).unwrap();
        assert_eq!(
            (packet.protocol, packet.src_port, packet.dst_port),
            (protocol, 0, 0)
        );
    }
}

#[test]
fn ipv6_fragment_header_is_a_fragment() {
    let chains: [&[u8]; 4] = [
        &[FRAGMENT],
        &[HOPOPTS, FRAGMENT],
        &[HOPOPTS, DSTOPTS, FRAGMENT],
        &[HOPOPTS, DSTOPTS, ROUTING, FRAGMENT],
    ];
    for chain in chains {
        for transport in [tcp(1, 2, SYN), udp(3, 4)] {
            let mut b = FrameBuilder::of(Family::V6, transport);
            // A fragment header is 8 bytes: the two-byte head and six more (offset 0,
            // identification 7); the others get bodies that would mislead as ports.
            b.ipv6_extensions = chain
                .iter()
                .map(|&p| match p {
                    FRAGMENT => (p, vec![0, 0, 0, 0, 0, 7]),
                    _ => (p, extension_body(6)),
                })
                .collect();
            // A fragment header at offset 0: the first fragment, whose ports follow.
            let packet = parse_frame(&b.build()).expect("fragments parse");
            assert_eq!(packet.fragment, FragmentPart::First, "{chain:?}");
            assert_eq!(
                packet.transport,
                crate::packet::Transport::Read,
                "{chain:?}"
            );
            assert_eq!(packet.fragment_id, 7, "{chain:?}");
        }
    }
}

#[test]
fn too_many_ipv6_extension_headers_leave_the_transport_unreadable() {
    // The kernel forwards such packets; they are judged without ports.
    for count in MAX_IPV6_EXTENSION_HEADERS + 1..MAX_IPV6_EXTENSION_HEADERS + 4 {
        let mut b = FrameBuilder::of(Family::V6, tcp(1, 2, SYN));
        b.ipv6_extensions = (0..count).map(|_| (DSTOPTS, extension_body(6))).collect();
        let packet = parse_frame(&b.build()).expect("the IPv6 header is fine");
        assert_eq!(
            packet.transport,
            crate::packet::Transport::Unreadable,
            "{count} headers"
        );
        assert_eq!((packet.src_port, packet.dst_port), (0, 0));
    }
}

#[test]
fn what_follows_the_last_walked_extension_header_decides() {
    let walked = [HOPOPTS, DSTOPTS, ROUTING, DSTOPTS];
    assert_eq!(walked.len(), MAX_IPV6_EXTENSION_HEADERS);
    // (next header after the walked ones, result)
    // One more extension header than the walk takes: the transport is not reached.
    for last in [FRAGMENT, HOPOPTS, ROUTING, DSTOPTS, AH] {
        let mut b = FrameBuilder::of(Family::V6, tcp(1, 2, SYN));
        b.ipv6_extensions = walked
            .iter()
            .chain([&last])
            .map(|&p| (p, extension_body(6)))
            .collect();
        let packet = parse_frame(&b.build()).expect("the IPv6 header is fine");
        assert_eq!(
            packet.transport,
            crate::packet::Transport::Unreadable,
            "then {last}"
        );
    }
    let mut b = FrameBuilder::of(Family::V6, tcp(1, 2, SYN));
    b.ipv6_extensions = walked.iter().map(|&p| (p, extension_body(6))).collect();
    let packet = parse_frame(&b.build()).unwrap();
    assert_eq!(
        (
            packet.protocol,
            packet.src_port,
            packet.dst_port,
            packet.tcp_flags
        ),
        (IPPROTO_TCP, 1, 2, SYN)
    );
}

#[test]
fn ipv6_extension_header_longer_than_the_payload_leaves_the_transport_unreadable() {
    for (kind, len_byte) in [(HOPOPTS, 3u8), (DSTOPTS, 200), (ROUTING, 255), (AH, 255)] {
        let mut b = FrameBuilder::of(Family::V6, tcp(1, 2, SYN));
        b.ipv6_extensions = vec![(kind, extension_body(6))];
        let mut frame = b.build();
        // The header claims more bytes than the 8 + 20 that follow the IPv6 header.
        frame[IPV6_FIRST_EXTENSION + 1] = len_byte;
        assert_eq!(
            parse_frame(&frame).map(|p| p.transport),
            Ok(crate::packet::Transport::Unreadable),
            "next header {kind}"
        );
    }
}

#[test]
fn ipv6_extension_header_leaving_too_little_for_tcp_leaves_it_unreadable() {
    let mut b = FrameBuilder::of(Family::V6, tcp(1, 2, SYN));
    b.ipv6_extensions = vec![(HOPOPTS, extension_body(6))];
    let mut frame = b.build();
    // 16 bytes of hop-by-hop options leave 12 of the 28 for TCP.
    frame[IPV6_FIRST_EXTENSION + 1] = 1;
    assert_eq!(
        parse_frame(&frame).map(|p| p.transport),
        Ok(crate::packet::Transport::Unreadable)
    );
}

// ---------------------------------------------------------------------------
// Truncated frames
// ---------------------------------------------------------------------------

/// Frames of every kind the parser understands, each exactly as long as its headers
/// and payload.
fn sample_frames() -> Vec<(&'static str, Vec<u8>)> {
    let mut frames = vec![
        (
            "tcp4",
            FrameBuilder::of(Family::V4, tcp(40_000, 80, SYN)).build(),
        ),
        (
            "tcp6",
            FrameBuilder::of(Family::V6, tcp(40_000, 80, SYN)).build(),
        ),
        (
            "tcp4+payload",
            FrameBuilder::of(Family::V4, tcp(40_000, 80, PSH | ACK))
                .payload(&[7; 16])
                .build(),
        ),
        (
            "tcp6+payload",
            FrameBuilder::of(Family::V6, tcp(40_000, 80, PSH | ACK))
                .payload(&[7; 16])
                .build(),
        ),
        ("udp4", FrameBuilder::of(Family::V4, udp(53, 53)).build()),
        (
            "udp6",
            FrameBuilder::of(Family::V6, udp(53, 53))
                .payload(&[1; 3])
                .build(),
        ),
        ("icmp4", FrameBuilder::of(Family::V4, icmp(8, 0, 9)).build()),
        (
            "icmp6",
            FrameBuilder::of(Family::V6, icmp(128, 0, 9)).build(),
        ),
        (
            "gre4",
            FrameBuilder::of(Family::V4, Transport::Raw { protocol: GRE })
                .payload(&[1; 4])
                .build(),
        ),
        (
            "gre6",
            FrameBuilder::of(Family::V6, Transport::Raw { protocol: GRE })
                .payload(&[1; 4])
                .build(),
        ),
    ];
    let mut b = FrameBuilder::of(Family::V4, tcp(40_000, 80, SYN));
    b.ipv4_options = vec![1; 12];
    frames.push(("tcp4+options", b.build()));
    let mut b = FrameBuilder::of(Family::V6, tcp(40_000, 80, SYN));
    b.ipv6_extensions = vec![(HOPOPTS, extension_body(6)), (ROUTING, extension_body(14))];
    frames.push(("tcp6+extensions", b.build()));
    frames
}

#[test]
fn every_truncation_is_malformed() {
    for (name, frame) in sample_frames() {
        let full = parse_frame(&frame).unwrap_or_else(|e| panic!("{name} must parse: {e:?}"));
        assert_eq!(usize::from(full.ip_len), frame.len() - ETH_HLEN, "{name}");
        for len in 0..frame.len() {
            let cut = &frame[..len];
            // The frame really is that short.
            assert_eq!(
                parse(cut, len),
                Err(ParseError::Malformed),
                "{name} cut to {len} bytes"
            );
            // The reader could read on, but the frame is said to be that short: only
            // the length checks stand between the parser and bytes past the end.
            assert_eq!(
                parse(&frame[..], len),
                Err(ParseError::Malformed),
                "{name} said to be {len} bytes"
            );
        }
    }
}

#[test]
fn a_reader_shorter_than_the_frame_length_never_panics() {
    // frame_len overstates what can be read: the parser must fail when a read it
    // needs fails, and otherwise agree with the full frame.
    for (name, frame) in sample_frames() {
        let full = parse_frame(&frame).unwrap();
        for len in 0..frame.len() {
            // A failed read of the transport header leaves it unreadable, no ports.
            match parse(&frame[..len], frame.len()) {
                Ok(packet) if packet.transport == crate::packet::Transport::Unreadable => {
                    assert_eq!((packet.src_port, packet.dst_port), (0, 0), "{name} {len}")
                }
                Ok(packet) => assert_eq!(packet, full, "{name} read up to {len} bytes"),
                Err(e) => assert_eq!(e, ParseError::Malformed, "{name} read up to {len} bytes"),
            }
        }
        // Reads of the Ethernet and IP headers cannot succeed on fewer bytes.
        let ip_header = if full.family == Family::V4 { 20 } else { 40 };
        for len in 0..ETH_HLEN + ip_header {
            assert_eq!(
                parse(&frame[..len], frame.len()),
                Err(ParseError::Malformed),
                "{name}"
            );
        }
    }
}

#[test]
fn ip_length_beyond_the_frame_is_malformed() {
    for family in [Family::V4, Family::V6] {
        let frame = FrameBuilder::of(family, tcp(1, 2, SYN))
            .payload(&[0; 10])
            .build();
        let (at, ip_len) = match family {
            Family::V4 => (IPV4_TOTAL_LEN, frame.len() - ETH_HLEN),
            Family::V6 => (IPV6_PAYLOAD_LEN, frame.len() - ETH_HLEN - 40),
        };
        let ip_len = u16::try_from(ip_len).unwrap();
        for extra in [1u16, 2, 100, u16::MAX - ip_len] {
            let mut long = frame.clone();
            set_be16(&mut long, at, ip_len + extra);
            if family == Family::V4 {
                fix_ipv4_checksum(&mut long);
            }
            assert_eq!(
                parse_frame(&long),
                Err(ParseError::Malformed),
                "{family:?} +{extra}"
            );
        }
        // Shorter than the frame (trailing padding) is fine.
        let mut short = frame.clone();
        set_be16(&mut short, at, ip_len - 10);
        if family == Family::V4 {
            fix_ipv4_checksum(&mut short);
        }
        let packet = parse_frame(&short).unwrap();
        assert_eq!(usize::from(packet.ip_len), frame.len() - ETH_HLEN - 10);
    }
}

// ---------------------------------------------------------------------------
// Odd and bad frames
// ---------------------------------------------------------------------------

#[test]
fn odd_frames_are_classified() {
    for OddFrame {
        name,
        frame,
        expected,
    } in odd_frames()
    {
        // A transport header that cannot be read gives no ports, as a malformed IP
        // header gives no packet: the rows expect Malformed for both.
        let result = parse_frame(&frame).and_then(|packet| match packet.transport {
            crate::packet::Transport::Unreadable => Err(ParseError::Malformed),
            _ => Ok(()),
        });
        assert_eq!(result, expected, "{name}");
    }
}

#[test]
fn odd_frames_never_panic_when_truncated() {
    for OddFrame { name, frame, .. } in odd_frames() {
        for len in 0..=frame.len() {
            let result = parse(&frame[..len], len);
            if len < frame.len() {
                // Cutting a frame never turns garbage into a packet unless the cut
                // part was padding past the IP length.
                if let Ok(packet) = result {
                    assert!(
                        ETH_HLEN + usize::from(packet.ip_len) <= len,
                        "{name} cut to {len}"
                    );
                }
            }
            let _ = parse(&frame[..len], frame.len());
            let _ = parse(&frame[..], len);
        }
    }
}

// ---------------------------------------------------------------------------
// Link scope
// ---------------------------------------------------------------------------

#[test]
fn ipv4_link_scope() {
    let cases: [([u8; 4], bool); 22] = [
        ([169, 254, 0, 0], true),
        ([169, 254, 169, 254], true),
        ([169, 254, 255, 255], true),
        ([169, 253, 255, 255], false),
        ([169, 255, 0, 0], false),
        ([168, 254, 1, 1], false),
        ([224, 0, 0, 0], true),
        ([224, 0, 0, 251], true),
        ([239, 255, 255, 250], true),
        ([223, 255, 255, 255], false),
        ([255, 255, 255, 255], true),
        ([0, 0, 0, 0], true),
        ([0, 0, 0, 1], false),
        ([0, 1, 0, 0], false),
        ([10, 0, 0, 1], false),
        ([10, 255, 255, 255], false),
        ([127, 0, 0, 1], false),
        ([192, 168, 1, 255], false),
        ([100, 64, 0, 1], false),
        // Class E is reserved, not link scope: GKE can use it for Pod ranges.
        ([240, 0, 0, 1], false),
        ([250, 10, 0, 1], false),
        ([255, 255, 255, 254], false),
    ];
    for (addr, expected) in cases {
        assert_eq!(is_link_scope(Family::V4, &v4(addr)), expected, "{addr:?}");
    }
}

#[test]
fn ipv4_link_scope_looks_at_the_first_four_bytes_only() {
    let mut addr = v4([10, 0, 0, 1]);
    addr[4..].fill(0xff);
    assert!(!is_link_scope(Family::V4, &addr));
    let mut addr = [0u8; 16];
    addr[15] = 1;
    assert!(
        is_link_scope(Family::V4, &addr),
        "0.0.0.0 with junk after it"
    );
}

#[test]
fn ipv6_link_scope() {
    let cases: [([u16; 8], bool); 17] = [
        ([0xff02, 0, 0, 0, 0, 0, 0, 1], true),
        ([0xff05, 0, 0, 0, 0, 0, 1, 3], true),
        ([0xff00, 0, 0, 0, 0, 0, 0, 0], true),
        (
            [
                0xffff, 0xffff, 0xffff, 0xffff, 0xffff, 0xffff, 0xffff, 0xffff,
            ],
            true,
        ),
        ([0xfe80, 0, 0, 0, 0, 0, 0, 1], true),
        ([0xfe80, 0, 0, 0, 0x0200, 0x5eff, 0xfe00, 0x5301], true),
        ([0xfebf, 0xffff, 0, 0, 0, 0, 0, 1], true),
        ([0xfec0, 0, 0, 0, 0, 0, 0, 1], false),
        ([0xfe7f, 0xffff, 0, 0, 0, 0, 0, 1], false),
        ([0xfeff, 0, 0, 0, 0, 0, 0, 1], false),
        ([0xfd00, 0, 0, 1, 0, 0, 0, 0x0a], false),
        ([0xfc00, 0, 0, 0, 0, 0, 0, 0], false),
        ([0x2001, 0xdb8, 0, 0, 0, 0, 0, 1], false),
        ([0, 0, 0, 0, 0, 0, 0, 0], true),
        ([0, 0, 0, 0, 0, 0, 0, 1], false),
        ([0, 0, 0, 0, 0, 0xffff, 0xa9fe, 0x0101], false), // ::ffff:169.254.1.1
        ([0x00ff, 0, 0, 0, 0, 0, 0, 0], false),
    ];
    for (words, expected) in cases {
        assert_eq!(
            is_link_scope(Family::V6, &v6(words)),
            expected,
            "{words:x?}"
        );
    }
}

#[test]
fn packet_is_link_scope_when_either_end_is() {
    let unicast4 = v4([10, 0, 1, 10]);
    let unicast6 = SRC6;
    let cases = [
        (Family::V4, unicast4, v4([224, 0, 0, 251]), true),
        (Family::V4, v4([169, 254, 3, 4]), unicast4, true),
        (Family::V4, unicast4, v4([255, 255, 255, 255]), true),
        (Family::V4, v4([0, 0, 0, 0]), v4([255, 255, 255, 255]), true),
        (Family::V4, unicast4, v4([10, 0, 1, 20]), false),
        (
            Family::V6,
            unicast6,
            v6([0xff02, 0, 0, 0, 0, 0, 0, 0xfb]),
            true,
        ),
        (
            Family::V6,
            v6([0xfe80, 0, 0, 0, 0, 0, 0, 1]),
            unicast6,
            true,
        ),
        (
            Family::V6,
            [0; 16],
            v6([0xff02, 0, 0, 0, 0, 1, 0xff00, 0x0a]),
            true,
        ),
        (Family::V6, unicast6, DST6, false),
        // The same bytes mean different things in each family.
        (Family::V6, v4([169, 254, 1, 1]), unicast6, false),
        (
            Family::V4,
            v6([0xa9fe, 0x0101, 0, 0, 0, 0, 0, 1]),
            unicast4,
            true,
        ), // 169.254.1.1
    ];
    for (family, src, dst, expected) in cases {
        let packet = Packet {
            family,
            src,
            dst,
            protocol: IPPROTO_UDP,
            src_port: 1,
            dst_port: 2,
            tcp_flags: 0,
            ttl: 64,
            ip_len: 100,
            fragment: FragmentPart::Whole,
            transport: crate::packet::Transport::Read,
            fragment_id: 0,
            l4_offset: 0,
        };
        assert_eq!(
            packet.is_link_scope(),
            expected,
            "{family:?} {src:?} -> {dst:?}"
        );
    }
}

#[test]
fn link_scope_frames_parse_and_are_link_scope() {
    let frame = FrameBuilder::ipv4([10, 0, 1, 10], [224, 0, 0, 251], udp(5353, 5353)).build();
    assert!(parse_frame(&frame).unwrap().is_link_scope());
    let frame = FrameBuilder::ipv6(
        v6([0xfe80, 0, 0, 0, 0, 0, 0, 1]),
        v6([0xff02, 0, 0, 0, 0, 0, 0, 2]),
        icmp(133, 0, 0),
    )
    .build();
    let packet = parse_frame(&frame).unwrap();
    assert!(packet.is_link_scope());
    assert_eq!((packet.src_port, packet.dst_port), (0, 133 << 8));
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
