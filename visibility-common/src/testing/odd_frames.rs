//! Frames made odd on purpose, each with what parsing it must give: frames that are not
//! IP, IP headers with one field wrong, lengths that lie, and transport headers cut
//! short. One row a frame; the parser's tests run them all, whole and cut at every
//! length, and anything else that must take any frame (the datapath, a fuzzer's seeds)
//! can too.

use alloc::{vec, vec::Vec};

use super::{
    FrameBuilder, IPV4_TOTAL_LEN, IPV4_VERSION_IHL, IPV6_PAYLOAD_LEN, Transport, fix_ipv4_checksum,
    set_be16, with_ethertype,
};
use crate::packet::{
    ETH_HLEN, Family, IPPROTO_ICMP, IPPROTO_ICMPV6, IPPROTO_TCP, IPPROTO_UDP, ParseError,
};

const GRE: u8 = 47;
const NO_NEXT_HEADER: u8 = 59;
const SYN: u8 = 0x02;
const MALFORMED: Result<(), ParseError> = Err(ParseError::Malformed);
const NOT_IP: Result<(), ParseError> = Err(ParseError::NotIp);
const PARSES: Result<(), ParseError> = Ok(());

/// A frame and what parsing it must give. A transport header that cannot be read counts
/// as [`ParseError::Malformed`], as a malformed IP header does.
pub struct OddFrame {
    pub name: &'static str,
    pub frame: Vec<u8>,
    pub expected: Result<(), ParseError>,
}

/// Every odd frame, by topic.
pub fn odd_frames() -> Vec<OddFrame> {
    [not_ip(), bad_ip_headers(), short_transport_headers()]
        .into_iter()
        .flatten()
        .collect()
}

/// A SYN from port 1 to port 2: the good frame most rows change.
fn tcp_syn() -> Transport {
    Transport::Tcp {
        src_port: 1,
        dst_port: 2,
        flags: SYN,
    }
}

fn gre() -> Transport {
    Transport::Raw { protocol: GRE }
}

fn frame(family: Family, transport: Transport) -> Vec<u8> {
    FrameBuilder::of(family, transport).build()
}

/// Frames too short to tell, or whose ethertype (or tags before it) is not plain IPv4
/// or IPv6.
fn not_ip() -> Vec<OddFrame> {
    let tcp4 = frame(Family::V4, tcp_syn());
    let tcp6 = frame(Family::V6, tcp_syn());
    let mut arp = tcp4[..12].to_vec();
    arp.extend_from_slice(&0x0806u16.to_be_bytes());
    arp.extend_from_slice(&[0, 1, 8, 0, 6, 4, 0, 1]); // Ethernet/IPv4, request
    arp.extend_from_slice(&[0x02, 0, 0, 0, 0, 0x02, 10, 0, 1, 10]);
    arp.extend_from_slice(&[0, 0, 0, 0, 0, 0, 10, 0, 1, 20]);
    let mut v4_version_in_v6 = tcp4.clone();
    v4_version_in_v6[12..14].copy_from_slice(&0x86DDu16.to_be_bytes());
    v4_version_in_v6.resize(tcp6.len(), 0);
    let mut rows = vec![
        odd("zero length", vec![], MALFORMED),
        odd("one byte", vec![0x45], MALFORMED),
        odd(
            "Ethernet header only, IPv4",
            tcp4[..ETH_HLEN].to_vec(),
            MALFORMED,
        ),
        odd(
            "Ethernet header only, IPv6",
            tcp6[..ETH_HLEN].to_vec(),
            MALFORMED,
        ),
        odd("ARP", arp, NOT_IP),
        odd(
            "version 4 in an IPv6 ethertype",
            v4_version_in_v6,
            MALFORMED,
        ),
    ];
    // (name, the frame's IPv4 (4) or IPv6 (6) version or its Ethernet header alone (0),
    // tags before the ethertype, the ethertype, expected)
    let retyped: [(&str, u8, &[u8], u16, _); 8] = [
        ("Ethernet header only, unknown type", 0, &[], 0x88b5, NOT_IP),
        (
            "VLAN-tagged IPv4",
            4,
            &[0x81, 0x00, 0x00, 0x64],
            0x0800,
            NOT_IP,
        ),
        (
            "VLAN-tagged IPv6",
            6,
            &[0x81, 0x00, 0x00, 0x64],
            0x86DD,
            NOT_IP,
        ),
        ("VLAN ethertype alone", 4, &[], 0x8100, NOT_IP),
        (
            "QinQ-tagged IPv4",
            4,
            &[0x88, 0xa8, 0x00, 0x64, 0x81, 0x00, 0x00, 0x65],
            0x0800,
            NOT_IP,
        ),
        ("IPv6 ethertype byte-swapped", 6, &[], 0xDD86, NOT_IP),
        ("LLDP", 4, &[], 0x88cc, NOT_IP),
        (
            "whole IPv6 packet under an IPv4 ethertype",
            6,
            &[],
            0x0800,
            MALFORMED,
        ),
    ];
    rows.extend(
        retyped
            .into_iter()
            .map(|(name, base, tag, ethertype, expected)| {
                let base = match base {
                    0 => &tcp4[..ETH_HLEN],
                    4 => &tcp4[..],
                    _ => &tcp6[..],
                };
                odd(name, with_ethertype(base, tag, ethertype), expected)
            }),
    );
    rows
}

/// One change to a good frame's bytes.
#[derive(Clone, Copy)]
enum Change {
    None,
    Byte(usize, u8),
    Be16(usize, u16),
    Bytes(usize, &'static [u8]),
}

/// IP headers with a field wrong: header lengths, versions, and lengths that lie. An
/// IPv4 header's checksum is fixed after the change, so that only the field is wrong.
fn bad_ip_headers() -> Vec<OddFrame> {
    use Change::{Be16, Byte, Bytes};
    use Family::{V4, V6};
    let rows: [(&str, Family, Transport, Change, _); 21] = [
        (
            "IHL 0",
            V4,
            tcp_syn(),
            Byte(IPV4_VERSION_IHL, 0x40),
            MALFORMED,
        ),
        (
            "IHL 1",
            V4,
            tcp_syn(),
            Byte(IPV4_VERSION_IHL, 0x41),
            MALFORMED,
        ),
        (
            "IHL 4",
            V4,
            tcp_syn(),
            Byte(IPV4_VERSION_IHL, 0x44),
            MALFORMED,
        ),
        (
            "IHL 4, other protocol",
            V4,
            gre(),
            Byte(IPV4_VERSION_IHL, 0x44),
            MALFORMED,
        ),
        (
            "IHL 6 without options: TCP header too short",
            V4,
            tcp_syn(),
            Byte(IPV4_VERSION_IHL, 0x46),
            MALFORMED,
        ),
        (
            "IHL 15 past the total length",
            V4,
            tcp_syn(),
            Byte(IPV4_VERSION_IHL, 0x4f),
            MALFORMED,
        ),
        (
            "version 6 in an IPv4 ethertype",
            V4,
            tcp_syn(),
            Byte(IPV4_VERSION_IHL, 0x65),
            MALFORMED,
        ),
        (
            "version 0, IPv4",
            V4,
            tcp_syn(),
            Byte(IPV4_VERSION_IHL, 0x05),
            MALFORMED,
        ),
        (
            "version 15, IPv4",
            V4,
            tcp_syn(),
            Byte(IPV4_VERSION_IHL, 0xf5),
            MALFORMED,
        ),
        (
            "version 0, IPv6",
            V6,
            tcp_syn(),
            Byte(ETH_HLEN, 0x00),
            MALFORMED,
        ),
        (
            "version 7, IPv6",
            V6,
            tcp_syn(),
            Byte(ETH_HLEN, 0x70),
            MALFORMED,
        ),
        (
            "IPv6 traffic class and flow label are ignored",
            V6,
            tcp_syn(),
            Bytes(ETH_HLEN, &[0x6f, 0xff, 0xff, 0xff]),
            PARSES,
        ),
        (
            "total length 0",
            V4,
            tcp_syn(),
            Be16(IPV4_TOTAL_LEN, 0),
            MALFORMED,
        ),
        (
            "total length 19",
            V4,
            tcp_syn(),
            Be16(IPV4_TOTAL_LEN, 19),
            MALFORMED,
        ),
        (
            "total length 19, other protocol",
            V4,
            gre(),
            Be16(IPV4_TOTAL_LEN, 19),
            MALFORMED,
        ),
        (
            "total length equal to the header, other protocol",
            V4,
            gre(),
            Be16(IPV4_TOTAL_LEN, 20),
            PARSES,
        ),
        (
            "total length equal to the header, TCP",
            V4,
            tcp_syn(),
            Be16(IPV4_TOTAL_LEN, 20),
            MALFORMED,
        ),
        (
            "IPv4 total length one past the frame",
            V4,
            tcp_syn(),
            Be16(IPV4_TOTAL_LEN, 41),
            MALFORMED,
        ),
        (
            "IPv6 payload length one past the frame",
            V6,
            tcp_syn(),
            Be16(IPV6_PAYLOAD_LEN, 21),
            MALFORMED,
        ),
        (
            "IPv6 payload length 0 (jumbogram), TCP",
            V6,
            tcp_syn(),
            Be16(IPV6_PAYLOAD_LEN, 0),
            MALFORMED,
        ),
        (
            "IPv6 payload length 0, no next header",
            V6,
            Transport::Raw {
                protocol: NO_NEXT_HEADER,
            },
            Change::None,
            PARSES,
        ),
    ];
    let mut out: Vec<OddFrame> = rows
        .into_iter()
        .map(|(name, family, transport, change, expected)| {
            odd(name, modified(family, transport, change), expected)
        })
        .collect();
    out.push(total_length_below_ihl());
    out
}

/// A good frame with `change` made, and an IPv4 header's checksum fixed after it.
fn modified(family: Family, transport: Transport, change: Change) -> Vec<u8> {
    let mut frame = frame(family, transport);
    match change {
        Change::None => {}
        Change::Byte(at, value) => frame[at] = value,
        Change::Be16(at, value) => set_be16(&mut frame, at, value),
        Change::Bytes(at, bytes) => frame[at..at + bytes.len()].copy_from_slice(bytes),
    }
    if family == Family::V4 && frame.len() >= ETH_HLEN + 20 && frame[12..14] == [0x08, 0x00] {
        fix_ipv4_checksum(&mut frame);
    }
    frame
}

/// An IPv4 header of 24 bytes (IHL 6, with options) whose total length says 20.
fn total_length_below_ihl() -> OddFrame {
    let mut b = FrameBuilder::of(Family::V4, gre()).payload(&[0; 8]);
    b.ipv4_options = vec![1; 4];
    let mut f = b.build();
    set_be16(&mut f, IPV4_TOTAL_LEN, 20);
    fix_ipv4_checksum(&mut f);
    odd("total length below IHL 6", f, MALFORMED)
}

/// Transport headers of a given length: one byte short of what the parser reads is
/// malformed, exactly enough parses.
fn short_transport_headers() -> Vec<OddFrame> {
    use Family::{V4, V6};
    let rows: [(&str, Family, u8, &[u8], _); 12] = [
        (
            "TCP/IPv4 header of 19 bytes",
            V4,
            IPPROTO_TCP,
            &[0x11; 19],
            MALFORMED,
        ),
        (
            "TCP/IPv4 header of 14 bytes (ports and flags)",
            V4,
            IPPROTO_TCP,
            &[0x11; 14],
            MALFORMED,
        ),
        (
            "TCP/IPv4 header of 0 bytes",
            V4,
            IPPROTO_TCP,
            &[],
            MALFORMED,
        ),
        (
            "TCP/IPv4 header of 20 bytes",
            V4,
            IPPROTO_TCP,
            &[0x11; 20],
            PARSES,
        ),
        (
            "TCP/IPv6 header of 19 bytes",
            V6,
            IPPROTO_TCP,
            &[0x11; 19],
            MALFORMED,
        ),
        (
            "TCP/IPv6 header of 14 bytes (ports and flags)",
            V6,
            IPPROTO_TCP,
            &[0x11; 14],
            MALFORMED,
        ),
        (
            "TCP/IPv6 header of 20 bytes",
            V6,
            IPPROTO_TCP,
            &[0x11; 20],
            PARSES,
        ),
        (
            "UDP/IPv4 header of 7 bytes",
            V4,
            IPPROTO_UDP,
            &[0x11; 7],
            MALFORMED,
        ),
        (
            "UDP/IPv6 header of 4 bytes (ports)",
            V6,
            IPPROTO_UDP,
            &[0x11; 4],
            MALFORMED,
        ),
        (
            "UDP/IPv4 header of 8 bytes",
            V4,
            IPPROTO_UDP,
            &[0x11; 8],
            PARSES,
        ),
        (
            "ICMP header of 6 bytes (identifier)",
            V4,
            IPPROTO_ICMP,
            &[8, 0, 0, 0, 0, 1],
            MALFORMED,
        ),
        (
            "ICMPv6 header of 7 bytes",
            V6,
            IPPROTO_ICMPV6,
            &[128, 0, 0, 0, 0, 1, 0],
            MALFORMED,
        ),
    ];
    let mut out: Vec<OddFrame> = rows
        .into_iter()
        .map(|(name, family, protocol, header, expected)| {
            odd(name, transport_header(family, protocol, header), expected)
        })
        .collect();
    // Padding after the IP packet does not make a short header longer.
    let mut padded = transport_header(Family::V6, IPPROTO_TCP, &[0x11; 19]);
    padded.resize(padded.len() + 20, 0);
    out.push(odd(
        "TCP/IPv6 header of 19 bytes with the frame padded",
        padded,
        MALFORMED,
    ));
    out
}

/// A frame whose transport header (of protocol `protocol`) is `header`.
fn transport_header(family: Family, protocol: u8, header: &[u8]) -> Vec<u8> {
    FrameBuilder::of(family, Transport::Raw { protocol })
        .payload(header)
        .build()
}

fn odd(name: &'static str, frame: Vec<u8>, expected: Result<(), ParseError>) -> OddFrame {
    OddFrame {
        name,
        frame,
        expected,
    }
}
