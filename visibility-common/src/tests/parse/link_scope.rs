//! Link-scope addresses, which stay on the node.

use crate::{
    packet::FragmentPart,
    packet::{Family, IPPROTO_UDP, Packet, is_link_scope},
    testing::{DST6, FrameBuilder, SRC6},
};

use super::frames::*;

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
