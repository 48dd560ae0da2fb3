//! What the parser's tests share: protocol numbers, TCP flags, transports, the test
//! addresses in every family, and parsing a frame as the datapath does.

use alloc::vec::Vec;

use crate::{
    packet::{
        Family, IPPROTO_ICMP, IPPROTO_ICMPV6, IPPROTO_TCP, IPPROTO_UDP, Packet, ParseError, parse,
    },
    testing::{DST4, DST6, SRC4, SRC6, Transport},
};

pub(super) use crate::packet::{
    IPPROTO_AH as AH, IPPROTO_DSTOPTS as DSTOPTS, IPPROTO_FRAGMENT as FRAGMENT,
    IPPROTO_HOPOPTS as HOPOPTS, IPPROTO_ROUTING as ROUTING,
};
pub(super) const NO_NEXT_HEADER: u8 = 59;
pub(super) const GRE: u8 = 47;
pub(super) use crate::packet::IPPROTO_SCTP as SCTP;

pub(super) const FIN: u8 = 0x01;
pub(super) const SYN: u8 = 0x02;
pub(super) const RST: u8 = 0x04;
pub(super) const PSH: u8 = 0x08;
pub(super) const ACK: u8 = 0x10;
pub(super) const URG: u8 = 0x20;
pub(super) const ECE: u8 = 0x40;
pub(super) const CWR: u8 = 0x80;

pub(super) fn v4(addr: [u8; 4]) -> [u8; 16] {
    let mut out = [0u8; 16];
    out[..4].copy_from_slice(&addr);
    out
}

pub(super) fn v6(words: [u16; 8]) -> [u8; 16] {
    let mut out = [0u8; 16];
    for (i, w) in words.iter().enumerate() {
        out[2 * i..2 * i + 2].copy_from_slice(&w.to_be_bytes());
    }
    out
}

pub(super) fn tcp(src_port: u16, dst_port: u16, flags: u8) -> Transport {
    Transport::Tcp {
        src_port,
        dst_port,
        flags,
    }
}

pub(super) fn udp(src_port: u16, dst_port: u16) -> Transport {
    Transport::Udp { src_port, dst_port }
}

pub(super) fn icmp(kind: u8, code: u8, id: u16) -> Transport {
    Transport::Icmp {
        kind,
        code,
        id,
        seq: 7,
    }
}

/// What the parser must read of a frame built with `transport`, as
/// `(protocol, source port, destination port, TCP flags)`: an ICMP message's id stands
/// for its source port, its type and code for its destination port.
pub(super) fn expected_transport(family: Family, transport: &Transport) -> (u8, u16, u16, u8) {
    match *transport {
        Transport::Tcp {
            src_port,
            dst_port,
            flags,
        } => (IPPROTO_TCP, src_port, dst_port, flags),
        Transport::Udp { src_port, dst_port } => (IPPROTO_UDP, src_port, dst_port, 0),
        Transport::Icmp { kind, code, id, .. } => {
            let protocol = match family {
                Family::V4 => IPPROTO_ICMP,
                Family::V6 => IPPROTO_ICMPV6,
            };
            (protocol, id, u16::from_be_bytes([kind, code]), 0)
        }
        Transport::Raw { .. } => unreachable!("no transport header to read"),
    }
}

/// What the parser read of a packet's transport, as [`expected_transport`] says it.
pub(super) fn read_transport(packet: &Packet) -> (u8, u16, u16, u8) {
    (
        packet.protocol,
        packet.src_port,
        packet.dst_port,
        packet.tcp_flags,
    )
}

pub(super) fn src_of(family: Family) -> [u8; 16] {
    match family {
        Family::V4 => v4(SRC4),
        Family::V6 => SRC6,
    }
}

pub(super) fn dst_of(family: Family) -> [u8; 16] {
    match family {
        Family::V4 => v4(DST4),
        Family::V6 => DST6,
    }
}

/// Parses a frame whose length is the slice's length, as the datapath sees it.
pub(super) fn parse_frame(frame: &[u8]) -> Result<Packet, ParseError> {
    parse(frame, frame.len())
}

/// An extension header body that, read as ports, would give the wrong answer.
pub(super) fn extension_body(len: usize) -> Vec<u8> {
    (0..len).map(|i| 0xc0 | (i as u8 & 0x3f)).collect()
}
