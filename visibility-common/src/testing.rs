//! Builds Ethernet frames for tests, with checksums that verify, changes them by hand
//! (and fixes the IPv4 checksum after), and checks them. [`odd_frames`] is a table of
//! frames made odd on purpose.

pub mod odd_frames;

use alloc::vec::Vec;

use crate::packet::{
    ETH_HLEN, Family, IPPROTO_ICMP, IPPROTO_ICMPV6, IPPROTO_TCP, IPPROTO_UDP, IPV4_CHECKSUM_OFFSET,
    Packet,
};

/// The addresses a frame goes between when the test does not care which.
pub const SRC4: [u8; 4] = [10, 0, 1, 10];
pub const DST4: [u8; 4] = [10, 0, 1, 20];
pub const SRC6: [u8; 16] = [0xfd, 0, 0, 1, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0x0a];
pub const DST6: [u8; 16] = [0xfd, 0, 0, 1, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0x14];

/// Byte offsets of IPv4 header fields in a frame.
pub const IPV4_VERSION_IHL: usize = ETH_HLEN;
pub const IPV4_TOTAL_LEN: usize = ETH_HLEN + 2;
pub const IPV4_FLAGS_FRAGMENT: usize = ETH_HLEN + 6;
/// Byte offsets of IPv6 header fields in a frame.
pub const IPV6_PAYLOAD_LEN: usize = ETH_HLEN + 4;
pub const IPV6_NEXT_HEADER: usize = ETH_HLEN + 6;
pub const IPV6_FIRST_EXTENSION: usize = ETH_HLEN + 40;

/// What follows the IP header.
#[derive(Clone, Debug)]
pub enum Transport {
    Tcp {
        src_port: u16,
        dst_port: u16,
        flags: u8,
    },
    Udp {
        src_port: u16,
        dst_port: u16,
    },
    /// ICMP or ICMPv6 (chosen by the IP version) with an identifier and sequence.
    Icmp {
        kind: u8,
        code: u8,
        id: u16,
        seq: u16,
    },
    /// Any other protocol number, with the payload as its body.
    Raw {
        protocol: u8,
    },
}

impl Transport {
    fn protocol(&self, v6: bool) -> u8 {
        match self {
            Transport::Tcp { .. } => IPPROTO_TCP,
            Transport::Udp { .. } => IPPROTO_UDP,
            Transport::Icmp { .. } if v6 => IPPROTO_ICMPV6,
            Transport::Icmp { .. } => IPPROTO_ICMP,
            Transport::Raw { protocol } => *protocol,
        }
    }
}

/// A frame under construction. Fields are public so tests can make odd ones.
#[derive(Clone, Debug)]
pub struct FrameBuilder {
    pub dst_mac: [u8; 6],
    pub src_mac: [u8; 6],
    pub src: [u8; 16],
    pub dst: [u8; 16],
    pub v6: bool,
    pub ttl: u8,
    pub transport: Transport,
    pub payload: Vec<u8>,
    /// IPv4 options (a multiple of four bytes).
    pub ipv4_options: Vec<u8>,
    /// IPv6 extension headers as (protocol number, body after the two-byte head).
    pub ipv6_extensions: Vec<(u8, Vec<u8>)>,
}

impl FrameBuilder {
    pub fn ipv4(src: [u8; 4], dst: [u8; 4], transport: Transport) -> Self {
        let mut s = [0u8; 16];
        let mut d = [0u8; 16];
        s[..4].copy_from_slice(&src);
        d[..4].copy_from_slice(&dst);
        Self::new(s, d, false, transport)
    }

    pub fn ipv6(src: [u8; 16], dst: [u8; 16], transport: Transport) -> Self {
        Self::new(src, dst, true, transport)
    }

    /// A frame in `family` from [`SRC4`] to [`DST4`], or from [`SRC6`] to [`DST6`].
    pub fn of(family: Family, transport: Transport) -> Self {
        match family {
            Family::V4 => Self::ipv4(SRC4, DST4, transport),
            Family::V6 => Self::ipv6(SRC6, DST6, transport),
        }
    }

    fn new(src: [u8; 16], dst: [u8; 16], v6: bool, transport: Transport) -> Self {
        Self {
            dst_mac: [0x02, 0, 0, 0, 0, 0x01],
            src_mac: [0x02, 0, 0, 0, 0, 0x02],
            src,
            dst,
            v6,
            ttl: 64,
            transport,
            payload: Vec::new(),
            ipv4_options: Vec::new(),
            ipv6_extensions: Vec::new(),
        }
    }

    pub fn payload(mut self, payload: &[u8]) -> Self {
        self.payload = payload.to_vec();
        self
    }

    pub fn ttl(mut self, ttl: u8) -> Self {
        self.ttl = ttl;
        self
    }

    fn transport_bytes(&self) -> Vec<u8> {
        let mut l4 = Vec::new();
        match self.transport {
            Transport::Tcp {
                src_port,
                dst_port,
                flags,
            } => {
                l4.extend_from_slice(&src_port.to_be_bytes());
                l4.extend_from_slice(&dst_port.to_be_bytes());
                l4.extend_from_slice(&1u32.to_be_bytes()); // sequence
                l4.extend_from_slice(&0u32.to_be_bytes()); // acknowledgement
                l4.push(5 << 4);
                l4.push(flags);
                l4.extend_from_slice(&65535u16.to_be_bytes());
                l4.extend_from_slice(&[0, 0, 0, 0]); // checksum, urgent pointer
            }
            Transport::Udp { src_port, dst_port } => {
                l4.extend_from_slice(&src_port.to_be_bytes());
                l4.extend_from_slice(&dst_port.to_be_bytes());
                let len = u16::try_from(8 + self.payload.len()).expect("UDP payload fits");
                l4.extend_from_slice(&len.to_be_bytes());
                l4.extend_from_slice(&[0, 0]);
            }
            Transport::Icmp {
                kind,
                code,
                id,
                seq,
            } => {
                l4.extend_from_slice(&[kind, code, 0, 0]);
                l4.extend_from_slice(&id.to_be_bytes());
                l4.extend_from_slice(&seq.to_be_bytes());
            }
            Transport::Raw { .. } => {}
        }
        l4.extend_from_slice(&self.payload);
        let protocol = self.transport.protocol(self.v6);
        let checksum_at = match self.transport {
            Transport::Tcp { .. } => Some(16),
            Transport::Udp { .. } => Some(6),
            Transport::Icmp { .. } => Some(2),
            Transport::Raw { .. } => None,
        };
        if let Some(at) = checksum_at {
            let pseudo = protocol != IPPROTO_ICMP;
            let sum = l4_checksum(self.v6, &self.src, &self.dst, protocol, &l4, pseudo);
            l4[at..at + 2].copy_from_slice(&sum.to_be_bytes());
        }
        l4
    }

    /// The frame, with every length and checksum filled in.
    pub fn build(&self) -> Vec<u8> {
        let l4 = self.transport_bytes();
        let mut frame = Vec::new();
        frame.extend_from_slice(&self.dst_mac);
        frame.extend_from_slice(&self.src_mac);
        let protocol = self.transport.protocol(self.v6);
        if self.v6 {
            frame.extend_from_slice(&0x86DDu16.to_be_bytes());
            let mut extensions = Vec::new();
            let next_of = |i: usize| self.ipv6_extensions.get(i).map_or(protocol, |(p, _)| *p);
            for (i, (_, body)) in self.ipv6_extensions.iter().enumerate() {
                let total = 2 + body.len();
                assert!(total % 8 == 0, "extension headers are multiples of 8 bytes");
                extensions.push(next_of(i + 1));
                extensions.push(u8::try_from(total / 8 - 1).expect("small extension"));
                extensions.extend_from_slice(body);
            }
            let payload_len = u16::try_from(extensions.len() + l4.len()).expect("fits");
            frame.extend_from_slice(&[0x60, 0, 0, 0]);
            frame.extend_from_slice(&payload_len.to_be_bytes());
            frame.push(next_of(0));
            frame.push(self.ttl);
            frame.extend_from_slice(&self.src);
            frame.extend_from_slice(&self.dst);
            frame.extend_from_slice(&extensions);
        } else {
            frame.extend_from_slice(&0x0800u16.to_be_bytes());
            let header_len = 20 + self.ipv4_options.len();
            assert!(
                header_len.is_multiple_of(4),
                "IPv4 options are multiples of 4 bytes"
            );
            let total = u16::try_from(header_len + l4.len()).expect("fits");
            let mut ip = Vec::new();
            ip.push(0x40 | u8::try_from(header_len / 4).expect("fits"));
            ip.push(0);
            ip.extend_from_slice(&total.to_be_bytes());
            ip.extend_from_slice(&[0x12, 0x34, 0x40, 0]); // id, don't fragment
            ip.push(self.ttl);
            ip.push(protocol);
            ip.extend_from_slice(&[0, 0]);
            ip.extend_from_slice(&self.src[..4]);
            ip.extend_from_slice(&self.dst[..4]);
            ip.extend_from_slice(&self.ipv4_options);
            let sum = checksum(&[&ip]);
            ip[10..12].copy_from_slice(&sum.to_be_bytes());
            frame.extend_from_slice(&ip);
        }
        frame.extend_from_slice(&l4);
        frame
    }
}

/// The Internet checksum of the concatenated parts.
pub fn checksum(parts: &[&[u8]]) -> u16 {
    let mut sum: u32 = 0;
    let mut odd: Option<u8> = None;
    for part in parts {
        for &b in *part {
            match odd.take() {
                Some(hi) => sum += u32::from(u16::from_be_bytes([hi, b])),
                None => odd = Some(b),
            }
        }
    }
    if let Some(hi) = odd {
        sum += u32::from(u16::from_be_bytes([hi, 0]));
    }
    while sum > 0xffff {
        sum = (sum & 0xffff) + (sum >> 16);
    }
    !(u16::try_from(sum).expect("folded"))
}

fn l4_checksum(
    v6: bool,
    src: &[u8; 16],
    dst: &[u8; 16],
    protocol: u8,
    l4: &[u8],
    pseudo: bool,
) -> u16 {
    let sum = if pseudo {
        let family = if v6 { Family::V6 } else { Family::V4 };
        checksum(&[&pseudo_header(family, src, dst, protocol, l4.len()), l4])
    } else {
        checksum(&[l4])
    };
    if sum == 0 && protocol == IPPROTO_UDP {
        0xffff
    } else {
        sum
    }
}

/// The pseudo-header a TCP, UDP or ICMPv6 checksum covers before the transport header
/// (RFC 768 and 9293 for IPv4, RFC 8200 §8.1 for IPv6) for `len` bytes of transport
/// header and payload. Addresses are 16 bytes, an IPv4 address in the first four.
pub fn pseudo_header(
    family: Family,
    src: &[u8; 16],
    dst: &[u8; 16],
    protocol: u8,
    len: usize,
) -> Vec<u8> {
    let len = u32::try_from(len).expect("fits");
    let mut head = Vec::new();
    match family {
        Family::V4 => {
            head.extend_from_slice(&src[..4]);
            head.extend_from_slice(&dst[..4]);
            head.extend_from_slice(&[0, protocol]);
            head.extend_from_slice(&u16::try_from(len).expect("fits").to_be_bytes());
        }
        Family::V6 => {
            head.extend_from_slice(src);
            head.extend_from_slice(dst);
            head.extend_from_slice(&len.to_be_bytes());
            head.extend_from_slice(&[0, 0, 0, protocol]);
        }
    }
    head
}

/// The Internet checksum over a parsed packet's transport header and payload (`body`)
/// with its pseudo-header (none for ICMP over IPv4): 0 when the checksum in it is right.
pub fn transport_sum(packet: &Packet, body: &[u8]) -> u16 {
    if packet.protocol == IPPROTO_ICMP && packet.family == Family::V4 {
        return checksum(&[body]);
    }
    let head = pseudo_header(
        packet.family,
        &packet.src,
        &packet.dst,
        packet.protocol,
        body.len(),
    );
    checksum(&[&head, body])
}

/// Whether the IPv4 header checksum of a frame verifies.
pub fn ipv4_header_checksum_ok(frame: &[u8]) -> bool {
    let header_len = usize::from(frame[ETH_HLEN] & 0x0f) * 4;
    checksum(&[&frame[ETH_HLEN..ETH_HLEN + header_len]]) == 0
}

/// Recomputes the IPv4 header checksum after a test changed the header.
pub fn fix_ipv4_checksum(frame: &mut [u8]) {
    let header_len = usize::from(frame[IPV4_VERSION_IHL] & 0x0f) * 4;
    frame[IPV4_CHECKSUM_OFFSET..IPV4_CHECKSUM_OFFSET + 2].fill(0);
    let end = (ETH_HLEN + header_len).min(frame.len());
    let sum = checksum(&[&frame[ETH_HLEN..end]]);
    frame[IPV4_CHECKSUM_OFFSET..IPV4_CHECKSUM_OFFSET + 2].copy_from_slice(&sum.to_be_bytes());
}

/// Writes `value` big-endian at byte `at`.
pub fn set_be16(frame: &mut [u8], at: usize, value: u16) {
    frame[at..at + 2].copy_from_slice(&value.to_be_bytes());
}

/// Replaces the ethertype, and inserts `tag` (a VLAN tag, say) before it.
pub fn with_ethertype(frame: &[u8], tag: &[u8], ethertype: u16) -> Vec<u8> {
    let mut out = frame[..12].to_vec();
    out.extend_from_slice(tag);
    out.extend_from_slice(&ethertype.to_be_bytes());
    out.extend_from_slice(&frame[ETH_HLEN..]);
    out
}
