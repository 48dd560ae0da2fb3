//! Bounded header parsing for IPv4 and IPv6, over anything that can read bytes at
//! an offset: the skb in the datapath, a byte slice in host tests.

/// Ethernet header length; TC programs see packets from the MAC header on.
pub const ETH_HLEN: usize = 14;
const ETH_P_IP: u16 = 0x0800;
const ETH_P_IPV6: u16 = 0x86DD;

pub const IPPROTO_ICMP: u8 = 1;
pub const IPPROTO_TCP: u8 = 6;
pub const IPPROTO_UDP: u8 = 17;
pub const IPPROTO_ICMPV6: u8 = 58;
const IPPROTO_HOPOPTS: u8 = 0;
const IPPROTO_ROUTING: u8 = 43;
const IPPROTO_FRAGMENT: u8 = 44;
const IPPROTO_AH: u8 = 51;
const IPPROTO_DSTOPTS: u8 = 60;

/// How many IPv6 extension headers the parser walks before it gives up.
pub const MAX_IPV6_EXTENSION_HEADERS: usize = 4;

/// Offsets the datapath rewrites.
pub const IPV4_TTL_OFFSET: usize = ETH_HLEN + 8;
pub const IPV4_CHECKSUM_OFFSET: usize = ETH_HLEN + 10;
pub const IPV6_HOP_LIMIT_OFFSET: usize = ETH_HLEN + 7;

/// The IPv4 header checksum after one of its 16-bit words changed from `old` to `new`
/// (all three in network byte order, as read from the packet): the incremental update
/// of RFC 1624, equation 3, `HC' = ~(~HC + ~m + m')`.
#[inline(always)]
pub fn checksum_replace16(check: u16, old: u16, new: u16) -> u16 {
    let mut sum = u32::from(!check) + u32::from(!old) + u32::from(new);
    sum = (sum & 0xffff) + (sum >> 16);
    sum = (sum & 0xffff) + (sum >> 16);
    !(sum as u16)
}

/// Reads `N` bytes at an offset, or nothing when the packet is shorter.
pub trait PacketReader {
    fn read<const N: usize>(&self, offset: usize) -> Option<[u8; N]>;
}

impl PacketReader for [u8] {
    fn read<const N: usize>(&self, offset: usize) -> Option<[u8; N]> {
        let end = offset.checked_add(N)?;
        let bytes = self.get(offset..end)?;
        let mut out = [0u8; N];
        out.copy_from_slice(bytes);
        Some(out)
    }
}

/// IP version of a packet.
#[repr(u8)]
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub enum Family {
    V4 = 4,
    V6 = 6,
}

/// Why a frame could not be classified; it is passed on unchanged.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum ParseError {
    /// ARP, VLAN-tagged or any other non-IP ethertype.
    NotIp,
    /// A header is truncated or inconsistent.
    Malformed,
    /// A fragment: its ports, if any, are not in this packet.
    Fragment,
}

/// What the datapath needs to know about one packet.
///
/// Aligned to 8 bytes so that the BPF target copies the addresses a word at a time,
/// not byte by byte.
#[repr(align(8))]
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Packet {
    pub family: Family,
    /// Source address; IPv4 in the first four bytes, the rest zero.
    pub src: [u8; 16],
    pub dst: [u8; 16],
    pub protocol: u8,
    /// TCP/UDP source port, or the ICMP echo identifier; host byte order.
    pub src_port: u16,
    /// TCP/UDP destination port, or the ICMP `type << 8 | code`; host byte order.
    pub dst_port: u16,
    /// TCP flags byte (FIN, SYN, RST, PSH, ACK, URG, ECE, CWR); 0 for other protocols.
    pub tcp_flags: u8,
    /// IPv4 TTL or IPv6 hop limit.
    pub ttl: u8,
    /// Length of the IP packet: IPv4 total length, IPv6 payload length plus 40
    /// (at most `u16::MAX`).
    pub ip_len: u16,
}

impl Packet {
    /// Whether the source and destination are the same family's "special" ranges
    /// (link-local, multicast, broadcast, unspecified) that never leave the link.
    #[inline(always)]
    pub fn is_link_scope(&self) -> bool {
        is_link_scope(self.family, &self.src) || is_link_scope(self.family, &self.dst)
    }
}

/// Link-local, multicast, broadcast and unspecified addresses.
#[inline(always)]
pub fn is_link_scope(family: Family, addr: &[u8; 16]) -> bool {
    match family {
        Family::V4 => {
            addr[0] == 169 && addr[1] == 254
                || addr[0] & 0xf0 == 224
                || (addr[0] == 255 && addr[1] == 255 && addr[2] == 255 && addr[3] == 255)
                || (addr[0] == 0 && addr[1] == 0 && addr[2] == 0 && addr[3] == 0)
        }
        Family::V6 => {
            addr[0] == 0xff
                || (addr[0] == 0xfe && addr[1] & 0xc0 == 0x80)
                || addr.iter().all(|b| *b == 0)
        }
    }
}

fn be16(b: [u8; 2]) -> u16 {
    u16::from_be_bytes(b)
}

/// Parses the Ethernet, IP and transport headers of a frame of `frame_len` bytes.
#[inline(always)]
pub fn parse<R: PacketReader + ?Sized>(pkt: &R, frame_len: usize) -> Result<Packet, ParseError> {
    let eth: [u8; ETH_HLEN] = pkt.read(0).ok_or(ParseError::Malformed)?;
    match be16([eth[12], eth[13]]) {
        ETH_P_IP => parse_ipv4(pkt, frame_len),
        ETH_P_IPV6 => parse_ipv6(pkt, frame_len),
        _ => Err(ParseError::NotIp),
    }
}

#[inline(always)]
fn parse_ipv4<R: PacketReader + ?Sized>(pkt: &R, frame_len: usize) -> Result<Packet, ParseError> {
    let ip: [u8; 20] = pkt.read(ETH_HLEN).ok_or(ParseError::Malformed)?;
    if ip[0] >> 4 != 4 {
        return Err(ParseError::Malformed);
    }
    let header_len = usize::from(ip[0] & 0x0f) * 4;
    let total_len = be16([ip[2], ip[3]]);
    if header_len < 20
        || usize::from(total_len) < header_len
        || usize::from(total_len) > frame_len.saturating_sub(ETH_HLEN)
    {
        return Err(ParseError::Malformed);
    }
    let flags_fragment = be16([ip[6], ip[7]]);
    // More-fragments set, or a non-zero offset.
    if flags_fragment & 0x3fff != 0 {
        return Err(ParseError::Fragment);
    }
    let mut packet = Packet {
        family: Family::V4,
        src: [0; 16],
        dst: [0; 16],
        protocol: ip[9],
        src_port: 0,
        dst_port: 0,
        tcp_flags: 0,
        ttl: ip[8],
        ip_len: total_len,
    };
    packet.src[..4].copy_from_slice(&ip[12..16]);
    packet.dst[..4].copy_from_slice(&ip[16..20]);
    let l4_len = usize::from(total_len) - header_len;
    parse_transport(pkt, &mut packet, ETH_HLEN + header_len, l4_len)?;
    Ok(packet)
}

#[inline(always)]
fn parse_ipv6<R: PacketReader + ?Sized>(pkt: &R, frame_len: usize) -> Result<Packet, ParseError> {
    let ip: [u8; 40] = pkt.read(ETH_HLEN).ok_or(ParseError::Malformed)?;
    if ip[0] >> 4 != 6 {
        return Err(ParseError::Malformed);
    }
    let payload_len = usize::from(be16([ip[4], ip[5]]));
    if 40 + payload_len > frame_len.saturating_sub(ETH_HLEN) {
        return Err(ParseError::Malformed);
    }
    let mut packet = Packet {
        family: Family::V6,
        src: [0; 16],
        dst: [0; 16],
        protocol: ip[6],
        src_port: 0,
        dst_port: 0,
        tcp_flags: 0,
        ttl: ip[7],
        // 40 + a 16-bit payload length may not fit: saturate rather than wrap.
        ip_len: u16::try_from(40 + payload_len).unwrap_or(u16::MAX),
    };
    packet.src.copy_from_slice(&ip[8..24]);
    packet.dst.copy_from_slice(&ip[24..40]);

    let mut offset = ETH_HLEN + 40;
    let mut remaining = payload_len;
    for _ in 0..MAX_IPV6_EXTENSION_HEADERS {
        // Each extension header starts with the next header and its own length.
        let units_of_8 = match packet.protocol {
            IPPROTO_HOPOPTS | IPPROTO_ROUTING | IPPROTO_DSTOPTS => true,
            IPPROTO_AH => false,
            IPPROTO_FRAGMENT => return Err(ParseError::Fragment),
            _ => break,
        };
        let [next, len]: [u8; 2] = pkt.read(offset).ok_or(ParseError::Malformed)?;
        let ext_len = if units_of_8 {
            (usize::from(len) + 1) * 8
        } else {
            (usize::from(len) + 2) * 4
        };
        if ext_len > remaining {
            return Err(ParseError::Malformed);
        }
        packet.protocol = next;
        offset += ext_len;
        remaining -= ext_len;
    }
    match packet.protocol {
        // More extension headers than we walk: classify nothing rather than guess.
        IPPROTO_HOPOPTS | IPPROTO_ROUTING | IPPROTO_DSTOPTS | IPPROTO_AH => {
            Err(ParseError::Malformed)
        }
        IPPROTO_FRAGMENT => Err(ParseError::Fragment),
        _ => {
            parse_transport(pkt, &mut packet, offset, remaining)?;
            Ok(packet)
        }
    }
}

/// Reads ports, ICMP identifiers and TCP flags. Other protocols carry none.
#[inline(always)]
fn parse_transport<R: PacketReader + ?Sized>(
    pkt: &R,
    packet: &mut Packet,
    offset: usize,
    l4_len: usize,
) -> Result<(), ParseError> {
    match packet.protocol {
        IPPROTO_TCP => {
            if l4_len < 20 {
                return Err(ParseError::Malformed);
            }
            let tcp: [u8; 14] = pkt.read(offset).ok_or(ParseError::Malformed)?;
            packet.src_port = be16([tcp[0], tcp[1]]);
            packet.dst_port = be16([tcp[2], tcp[3]]);
            packet.tcp_flags = tcp[13];
        }
        IPPROTO_UDP => {
            if l4_len < 8 {
                return Err(ParseError::Malformed);
            }
            let udp: [u8; 4] = pkt.read(offset).ok_or(ParseError::Malformed)?;
            packet.src_port = be16([udp[0], udp[1]]);
            packet.dst_port = be16([udp[2], udp[3]]);
        }
        IPPROTO_ICMP | IPPROTO_ICMPV6 => {
            if l4_len < 8 {
                return Err(ParseError::Malformed);
            }
            let icmp: [u8; 6] = pkt.read(offset).ok_or(ParseError::Malformed)?;
            let (kind, code) = (icmp[0], icmp[1]);
            packet.dst_port = u16::from(kind) << 8 | u16::from(code);
            if is_echo(packet.protocol, kind) {
                packet.src_port = be16([icmp[4], icmp[5]]);
            }
        }
        _ => {}
    }
    Ok(())
}

/// Echo request or reply, whose identifier tells one ping session from another.
fn is_echo(protocol: u8, kind: u8) -> bool {
    match protocol {
        IPPROTO_ICMP => kind == 0 || kind == 8,
        _ => kind == 128 || kind == 129,
    }
}
