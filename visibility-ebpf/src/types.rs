//! The keys and values of the maps only the datapath reads: the per-CPU route caches,
//! the fragment table, the pre-stack note and the ICMP scratch room. `maps.rs`
//! declares the maps with these types; the steps that fill them import both.

use visibility_common::{config::Gateway, packet::Family};

use crate::rewrite::Macs;

/// One CPU's last FIB answer for one family's gateway: the value of
/// [`crate::maps::GATEWAY_ROUTES`].
#[repr(C)]
#[derive(Clone, Copy)]
pub struct GatewayRoute {
    /// When the FIB answered (coarse monotonic nanoseconds); 0 before the first time.
    pub checked_ns: u64,
    /// The gateway the answer is for.
    pub gateway: Gateway,
    pub macs: Macs,
    /// The uplink's MTU: larger packets cannot go out whole.
    pub mtu: u32,
}

impl GatewayRoute {
    /// The map index of a family's entry.
    pub const fn slot(family: Family) -> u32 {
        match family {
            Family::V4 => 0,
            Family::V6 => 1,
        }
    }
}

/// Key of [`crate::maps::POD_ROUTES`]: a Pod's address.
#[repr(C)]
#[derive(Clone, Copy)]
pub struct PodRouteKey {
    pub addr: [u8; 16],
    pub family: u8,
    pub _pad: [u8; 3],
}

/// One CPU's last FIB answer for a Pod's address, with what a redirect needs: the
/// value of [`crate::maps::POD_ROUTES`].
#[repr(C)]
#[derive(Clone, Copy)]
pub struct PodRoute {
    /// When the FIB answered (coarse monotonic nanoseconds).
    pub checked_ns: u64,
    /// The node's interface toward the Pod.
    pub ifindex: u32,
    /// The Pod's MAC and the interface's, in the order of the Ethernet header.
    pub macs: Macs,
    /// 1 when that interface was a Pod veth (in the Pod-interface map) when the FIB
    /// answered: its peer can be handed the packet.
    pub is_veth: u8,
    /// 1 when the Pod's neighbour entry was resolved (the MACs are valid).
    pub resolved: u8,
    pub _pad: [u8; 6],
}

/// Key of [`crate::maps::FRAGMENTS`]: one datagram in one direction.
#[repr(C, align(8))]
#[derive(Clone, Copy)]
pub struct FragmentKey {
    pub src: [u8; 16],
    pub dst: [u8; 16],
    pub id: u32,
    pub family: u8,
    pub protocol: u8,
    pub _pad: [u8; 2],
}

/// Value of [`crate::maps::FRAGMENTS`].
#[repr(C, align(8))]
#[derive(Clone, Copy)]
pub struct FragmentEntry {
    pub src_port: u16,
    pub dst_port: u16,
    /// The [`visibility_common::counters::Counter`] of the first fragment's verdict.
    pub verdict: u8,
    pub _pad: [u8; 3],
}

/// A packet's addresses and ports as `pod_ingress` saw them: the value of
/// [`crate::maps::PRE_STACK`].
#[repr(C, align(8))]
#[derive(Clone, Copy)]
pub struct PreStack {
    pub src: [u8; 16],
    pub dst: [u8; 16],
    pub src_port: u16,
    pub dst_port: u16,
    /// The interface `pod_ingress` ran on; 0 before the first packet.
    pub ifindex: u32,
    pub family: u8,
    pub protocol: u8,
    pub _pad: [u8; 6],
}

/// How much of the packet an ICMP error carries: more than the IP header and the eight
/// bytes of transport header that RFC 792 asks for (IPv4 options included), and
/// enough of an IPv6 packet to reach its transport header past a few extension
/// headers. Packets that are too big for a link are far longer.
pub const ICMP_QUOTE_LEN: usize = 128;
/// An ICMP header's length.
pub const ICMP_HEADER_LEN: usize = 8;
/// An IPv6 header's length, the longer of the two IP headers.
pub const IPV6_HEADER_LEN: usize = 40;

/// Room to build an ICMP error in: the value of [`crate::maps::ICMP_SCRATCH`].
#[repr(C)]
pub struct IcmpScratch {
    /// The head of the erring packet, from its IP header on.
    pub quote: [u8; ICMP_QUOTE_LEN],
    /// The new IP header (IPv4 uses the first 20 bytes).
    pub ip: [u8; IPV6_HEADER_LEN],
    pub icmp: [u8; ICMP_HEADER_LEN],
}
