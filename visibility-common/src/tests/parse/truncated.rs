//! Frames cut short, lengths that lie, and the odd frames of
//! [`crate::testing::odd_frames`]: malformed, never a panic.

use alloc::{vec, vec::Vec};

use crate::{
    packet::{ETH_HLEN, Family, ParseError, parse},
    testing::{
        FrameBuilder, IPV4_TOTAL_LEN, IPV6_PAYLOAD_LEN, Transport, fix_ipv4_checksum,
        odd_frames::{OddFrame, odd_frames},
        set_be16,
    },
};

use super::frames::*;

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
