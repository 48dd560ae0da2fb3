//! IPv6 extension headers: walked to the transport, fragments, and walks that end early.

use alloc::vec;

use crate::{
    packet::FragmentPart,
    packet::{ETH_HLEN, Family, IPPROTO_TCP, MAX_IPV6_EXTENSION_HEADERS},
    testing::{DST6, FrameBuilder, IPV6_FIRST_EXTENSION, IPV6_NEXT_HEADER, SRC6, Transport},
};

use super::frames::*;

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
            assert_eq!(
                read_transport(&packet),
                expected_transport(Family::V6, &transport),
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
    assert_eq!(read_transport(&packet), (IPPROTO_TCP, 1, 2, SYN));
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
