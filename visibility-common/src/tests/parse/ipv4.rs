//! IPv4 options and fragments.

use alloc::vec;

use crate::{
    packet::FragmentPart,
    packet::{ETH_HLEN, Family, IPPROTO_TCP},
    testing::{
        DST4, FrameBuilder, IPV4_FLAGS_FRAGMENT, IPV4_VERSION_IHL, SRC4, Transport,
        fix_ipv4_checksum, ipv4_header_checksum_ok, set_be16,
    },
};

use super::frames::*;

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
            assert_eq!(
                read_transport(&packet),
                expected_transport(Family::V4, &transport),
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
