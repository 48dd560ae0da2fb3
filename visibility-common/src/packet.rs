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
pub const IPPROTO_SCTP: u8 = 132;
pub const IPPROTO_HOPOPTS: u8 = 0;
pub const IPPROTO_ROUTING: u8 = 43;
pub const IPPROTO_FRAGMENT: u8 = 44;
pub const IPPROTO_AH: u8 = 51;
pub const IPPROTO_DSTOPTS: u8 = 60;

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
    fold_checksum(u32::from(!check) + u32::from(!old) + u32::from(new))
}

/// The Internet checksum (RFC 1071) of a sum of 16-bit words: the sum folded to 16
/// bits with end-around carry, complemented. Two folds are enough for a sum of up to
/// 65,537 words.
#[inline(always)]
pub fn fold_checksum(mut sum: u32) -> u16 {
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
    /// ARP, VLAN-tagged frames whose tag is in the frame (the ethertype read is the
    /// tag's, 0x8100 or 0x88a8, so they are passed as not IP) and any other ethertype
    /// that is not IPv4 or IPv6.
    NotIp,
    /// The IP header is truncated, inconsistent or fails its checksum: a packet the
    /// kernel drops on receive, so it never reaches another Pod.
    Malformed,
}

/// Where a packet stands in its datagram.
#[repr(u8)]
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum FragmentPart {
    /// A whole datagram.
    Whole = 0,
    /// The fragment at offset 0: it carries the transport header.
    First = 1,
    /// A fragment at a later offset: no transport header, so no ports.
    Later = 2,
}

/// How much of the transport header could be read.
#[repr(u8)]
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Transport {
    /// Read: ports, identifiers and TCP flags are set (0 for protocols without them).
    Read = 0,
    /// A later fragment: the transport header is in the first fragment.
    InFirstFragment = 1,
    /// Truncated, or behind more IPv6 extension headers than the parser walks, or
    /// behind an extension header that does not fit: ports are 0. The kernel still
    /// forwards such packets (routers do not read transport headers).
    Unreadable = 2,
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
    /// The transport protocol (for IPv6, the header after the extension headers).
    pub protocol: u8,
    /// TCP/UDP/SCTP source port, or the ICMP echo identifier; host byte order.
    pub src_port: u16,
    /// TCP/UDP/SCTP destination port, or the ICMP `type << 8 | code`; host byte order.
    pub dst_port: u16,
    /// TCP flags byte (FIN, SYN, RST, PSH, ACK, URG, ECE, CWR); 0 for other protocols.
    pub tcp_flags: u8,
    /// IPv4 TTL or IPv6 hop limit.
    pub ttl: u8,
    /// Length of the IP packet: IPv4 total length, IPv6 payload length plus 40
    /// (at most `u16::MAX`).
    pub ip_len: u16,
    /// Whole datagram, first fragment or later fragment.
    pub fragment: FragmentPart,
    /// Whether the ports were read.
    pub transport: Transport,
    /// The fragment identification (IPv4: the 16-bit ID; IPv6: the fragment header's
    /// 32-bit identification); 0 for whole datagrams.
    pub fragment_id: u32,
    /// Where the transport header starts in the frame (after IPv4 options and IPv6
    /// extension headers); meaningful when `transport` is [`Transport::Read`].
    pub l4_offset: u16,
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

/// The longest IPv4 header (15 words of four bytes).
const IPV4_MAX_HEADER_LEN: usize = 60;

/// Whether the IPv4 header of `header_len` bytes at `ETH_HLEN` sums to zero, as the
/// kernel requires before it forwards a packet (`ip_rcv`). `fixed` is its first 20 bytes.
#[inline(always)]
fn ipv4_header_checksum_ok<R: PacketReader + ?Sized>(
    pkt: &R,
    fixed: &[u8; 20],
    header_len: usize,
) -> Option<bool> {
    let mut sum: u32 = 0;
    let mut i = 0;
    while i < 20 {
        sum += u32::from(be16([fixed[i], fixed[i + 1]]));
        i += 2;
    }
    // Options, four bytes at a time; a bounded loop the verifier can follow.
    let mut offset = 20;
    while offset < IPV4_MAX_HEADER_LEN {
        if offset >= header_len {
            break;
        }
        let word: [u8; 4] = pkt.read(ETH_HLEN + offset)?;
        sum += u32::from(be16([word[0], word[1]])) + u32::from(be16([word[2], word[3]]));
        offset += 4;
    }
    Some(fold_checksum(sum) == 0)
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
    if ipv4_header_checksum_ok(pkt, &ip, header_len) != Some(true) {
        return Err(ParseError::Malformed);
    }
    let flags_fragment = be16([ip[6], ip[7]]);
    let offset = flags_fragment & 0x1fff;
    let more_fragments = flags_fragment & 0x2000 != 0;
    let fragment = if offset != 0 {
        FragmentPart::Later
    } else if more_fragments {
        FragmentPart::First
    } else {
        FragmentPart::Whole
    };
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
        fragment,
        transport: Transport::Read,
        fragment_id: if fragment == FragmentPart::Whole {
            0
        } else {
            u32::from(be16([ip[4], ip[5]]))
        },
        l4_offset: 0,
    };
    packet.src[..4].copy_from_slice(&ip[12..16]);
    packet.dst[..4].copy_from_slice(&ip[16..20]);
    let l4_len = usize::from(total_len) - header_len;
    parse_transport(pkt, &mut packet, ETH_HLEN + header_len, l4_len);
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
        fragment: FragmentPart::Whole,
        transport: Transport::Read,
        fragment_id: 0,
        l4_offset: 0,
    };
    packet.src.copy_from_slice(&ip[8..24]);
    packet.dst.copy_from_slice(&ip[24..40]);

    let mut offset = ETH_HLEN + 40;
    let mut remaining = payload_len;
    for _ in 0..MAX_IPV6_EXTENSION_HEADERS {
        // Each extension header starts with the next header and its own length.
        let ext_len = match packet.protocol {
            IPPROTO_HOPOPTS | IPPROTO_ROUTING | IPPROTO_DSTOPTS => {
                let Some([_, len]) = pkt.read::<2>(offset) else {
                    break;
                };
                (usize::from(len) + 1) * 8
            }
            IPPROTO_AH => {
                let Some([_, len]) = pkt.read::<2>(offset) else {
                    break;
                };
                (usize::from(len) + 2) * 4
            }
            IPPROTO_FRAGMENT => 8,
            _ => break,
        };
        if ext_len > remaining {
            break;
        }
        // Next header, then (fragment header only) the offset, flags and identification.
        let Some(head) = pkt.read::<8>(offset) else {
            break;
        };
        if packet.protocol == IPPROTO_FRAGMENT {
            let offset_flags = be16([head[2], head[3]]);
            packet.fragment = if offset_flags & 0xfff8 != 0 {
                FragmentPart::Later
            } else {
                FragmentPart::First
            };
            packet.fragment_id = u32::from_be_bytes([head[4], head[5], head[6], head[7]]);
        }
        packet.protocol = head[0];
        offset += ext_len;
        remaining -= ext_len;
    }
    match packet.protocol {
        // An extension header the walk did not get past (too many, truncated, or
        // longer than the payload): the transport header cannot be found.
        IPPROTO_HOPOPTS | IPPROTO_ROUTING | IPPROTO_DSTOPTS | IPPROTO_AH | IPPROTO_FRAGMENT => {
            packet.transport = Transport::Unreadable;
        }
        _ => parse_transport(pkt, &mut packet, offset, remaining),
    }
    Ok(packet)
}

/// Reads ports, ICMP identifiers and TCP flags from a header at `offset` with `l4_len`
/// bytes of transport data in this packet. Other protocols carry none. A later
/// fragment has no transport header; a header that does not fit leaves the packet
/// [`Transport::Unreadable`].
#[inline(always)]
fn parse_transport<R: PacketReader + ?Sized>(
    pkt: &R,
    packet: &mut Packet,
    offset: usize,
    l4_len: usize,
) {
    if packet.fragment == FragmentPart::Later {
        packet.transport = Transport::InFirstFragment;
        return;
    }
    // Frames are far shorter than 64 KiB of headers; saturate rather than wrap.
    packet.l4_offset = u16::try_from(offset).unwrap_or(u16::MAX);
    let read = match packet.protocol {
        IPPROTO_TCP => read_tcp(pkt, packet, offset, l4_len),
        IPPROTO_UDP => read_ports(pkt, packet, offset, l4_len, 8),
        IPPROTO_SCTP => read_ports(pkt, packet, offset, l4_len, 12),
        IPPROTO_ICMP | IPPROTO_ICMPV6 => read_icmp(pkt, packet, offset, l4_len),
        _ => Some(()),
    };
    if read.is_none() {
        packet.transport = Transport::Unreadable;
    }
}

#[inline(always)]
fn read_tcp<R: PacketReader + ?Sized>(
    pkt: &R,
    packet: &mut Packet,
    offset: usize,
    l4_len: usize,
) -> Option<()> {
    if l4_len < 20 {
        return None;
    }
    let tcp: [u8; 14] = pkt.read(offset)?;
    packet.src_port = be16([tcp[0], tcp[1]]);
    packet.dst_port = be16([tcp[2], tcp[3]]);
    packet.tcp_flags = tcp[13];
    Some(())
}

/// The two ports that open UDP and SCTP headers (`header_len` long).
#[inline(always)]
fn read_ports<R: PacketReader + ?Sized>(
    pkt: &R,
    packet: &mut Packet,
    offset: usize,
    l4_len: usize,
    header_len: usize,
) -> Option<()> {
    if l4_len < header_len {
        return None;
    }
    let ports: [u8; 4] = pkt.read(offset)?;
    packet.src_port = be16([ports[0], ports[1]]);
    packet.dst_port = be16([ports[2], ports[3]]);
    Some(())
}

#[inline(always)]
fn read_icmp<R: PacketReader + ?Sized>(
    pkt: &R,
    packet: &mut Packet,
    offset: usize,
    l4_len: usize,
) -> Option<()> {
    if l4_len < 8 {
        return None;
    }
    let icmp: [u8; 6] = pkt.read(offset)?;
    let (kind, code) = (icmp[0], icmp[1]);
    packet.dst_port = u16::from(kind) << 8 | u16::from(code);
    if is_echo(packet.protocol, kind) {
        packet.src_port = be16([icmp[4], icmp[5]]);
    }
    Some(())
}

/// Echo request or reply, whose identifier tells one ping session from another.
fn is_echo(protocol: u8, kind: u8) -> bool {
    match protocol {
        IPPROTO_ICMP => kind == 0 || kind == 8,
        _ => kind == 128 || kind == 129,
    }
}
