//! What the node's NAT did to a packet, and putting a Service reply's source back.
//!
//! `pod_ingress` records each packet as the Pod sent it in a per-CPU slot. The node's
//! stack forwards the packet to the destination Pod's interface in the same call chain,
//! on the same CPU, so `pod_egress` finds the record of that very packet and compares.
//! A Service backend's reply leaves the node's stack with the Service's source (the
//! node undid its DNAT); the record holds the backend Pod's own source, which the
//! packet takes to the gateway and swaps back for the Service's when it returns.

use aya_ebpf::{
    bindings::{BPF_F_MARK_MANGLED_0, BPF_F_PSEUDO_HDR},
    helpers::{bpf_csum_diff, bpf_csum_update},
    programs::TcContext,
};
use visibility_common::{
    packet::{ETH_HLEN, Family, FragmentPart, IPPROTO_TCP, IPPROTO_UDP, Packet, Transport},
    verdict::NodeNat,
};

use crate::{maps::PRE_STACK, rewrite::words, types::PreStack};

/// Records `packet` as the Pod on `ifindex` sent it.
#[inline(always)]
pub fn record_pre_stack(packet: &Packet, ifindex: u32) {
    if let Some(slot) = PRE_STACK.get_ptr_mut(0) {
        // SAFETY: per-CPU slot, and programs are not preempted on one CPU.
        unsafe {
            *slot = PreStack {
                src: packet.src,
                dst: packet.dst,
                src_port: packet.src_port,
                dst_port: packet.dst_port,
                ifindex,
                family: packet.family as u8,
                protocol: packet.protocol,
                _pad: [0; 6],
            };
        }
    }
}

/// Takes this CPU's record: it is of `packet` when it was made on the interface the
/// packet entered on, for the same family and protocol. A record serves one packet
/// only: a packet the node's stack held back (and so sent on later, without a fresh
/// record) must not be judged by another packet's. The record itself, not a copy: it
/// stays as it is until the program ends (nothing else runs on this CPU meanwhile), and
/// the program's stack has no room for it.
#[inline(always)]
pub fn take_pre_stack(packet: &Packet, ingress_ifindex: u32) -> Option<&'static PreStack> {
    let slot = PRE_STACK.get_ptr_mut(0)?;
    // SAFETY: per-CPU slot, and programs are not preempted on one CPU.
    let slot = unsafe { &mut *slot };
    let of_packet = slot.ifindex != 0
        && slot.ifindex == ingress_ifindex
        && slot.family == packet.family as u8
        && slot.protocol == packet.protocol;
    slot.ifindex = 0;
    of_packet.then_some(slot)
}

impl PreStack {
    /// The source the Pod gave the packet.
    pub fn source(&self) -> ([u8; 16], u16) {
        (self.src, self.src_port)
    }

    /// What changed between this record and `packet`.
    #[inline(always)]
    pub fn compare(&self, packet: &Packet) -> NodeNat {
        let same_src = self.src == packet.src && self.src_port == packet.src_port;
        let same_dst = self.dst == packet.dst && self.dst_port == packet.dst_port;
        match (same_src, same_dst) {
            (true, true) => NodeNat::Unchanged,
            (true, false) => NodeNat::DestinationChanged,
            (false, true) if is_restorable(packet) => NodeNat::SourceRestorable,
            (false, true) => NodeNat::SourceUnrestorable,
            (false, false) => NodeNat::Unknown,
        }
    }
}

/// Whether a reply's source can be swapped in the packet: a whole TCP or UDP datagram
/// whose ports were read (ICMP errors carry NAT-rewritten headers inside them too).
#[inline(always)]
fn is_restorable(packet: &Packet) -> bool {
    matches!(packet.protocol, IPPROTO_TCP | IPPROTO_UDP)
        && packet.fragment == FragmentPart::Whole
        && packet.transport == Transport::Read
}

const IPV4_SRC_OFFSET: usize = ETH_HLEN + 12;
const IPV4_CHECKSUM_OFFSET: usize = ETH_HLEN + 10;
const IPV6_SRC_OFFSET: usize = ETH_HLEN + 8;
const CSUM_SIZE_4: u64 = 4;
const CSUM_SIZE_2: u64 = 2;

/// Where the transport checksum of a whole TCP or UDP packet is.
#[inline(always)]
fn l4_checksum_offset(packet: &Packet) -> usize {
    let l4 = usize::from(packet.l4_offset);
    match packet.protocol {
        IPPROTO_TCP => l4 + 16,
        _ => l4 + 6,
    }
}

/// Sets a whole TCP or UDP packet's source to `addr` and `port` (host byte order),
/// updating the IPv4 header checksum, the transport checksum (pseudo-header and port)
/// and, for packets whose driver supplied a full checksum, `skb->csum`.
#[inline(always)]
pub fn rewrite_source(
    ctx: &TcContext,
    packet: &Packet,
    addr: &[u8; 16],
    port: u16,
) -> Result<(), ()> {
    let check = l4_checksum_offset(packet);
    // A later fragment has no transport header: its datagram's checksum and ports are
    // in the first fragment, which took the change of address into its checksum.
    let has_transport_header = packet.fragment != FragmentPart::Later;
    let is_udp = packet.protocol == IPPROTO_UDP;
    // A UDP checksum of zero over IPv4 means there is none: leave it so.
    let udp_without_checksum = has_transport_header
        && packet.family == Family::V4
        && is_udp
        && ctx.load::<u16>(check).map_err(|_| ())? == 0;
    // A UDP checksum that comes out as zero is sent as 0xffff: zero means "none" over
    // IPv4 and is invalid over IPv6.
    let mangled_0 = if is_udp {
        u64::from(BPF_F_MARK_MANGLED_0)
    } else {
        0
    };
    let l4_flags = if udp_without_checksum || !has_transport_header {
        None
    } else {
        Some(u64::from(BPF_F_PSEUDO_HDR) | mangled_0)
    };
    match packet.family {
        Family::V4 => {
            let old =
                u32::from_ne_bytes([packet.src[0], packet.src[1], packet.src[2], packet.src[3]]);
            let new = u32::from_ne_bytes([addr[0], addr[1], addr[2], addr[3]]);
            if let Some(flags) = l4_flags {
                ctx.l4_csum_replace(check, u64::from(old), u64::from(new), flags | CSUM_SIZE_4)
                    .map_err(|_| ())?;
            }
            ctx.l3_csum_replace(
                IPV4_CHECKSUM_OFFSET,
                u64::from(old),
                u64::from(new),
                CSUM_SIZE_4,
            )
            .map_err(|_| ())?;
            ctx.store(IPV4_SRC_OFFSET, &new, 0).map_err(|_| ())?;
        }
        Family::V6 => {
            let mut old = words(&packet.src);
            let mut new = words(addr);
            // SAFETY: both buffers are 16 bytes on the stack, as the sizes say.
            let diff = unsafe { bpf_csum_diff(old.as_mut_ptr(), 16, new.as_mut_ptr(), 16, 0) };
            if diff < 0 {
                return Err(());
            }
            match l4_flags {
                Some(flags) => {
                    ctx.l4_csum_replace(check, 0, diff as u64, flags)
                        .map_err(|_| ())?;
                    // With BPF_F_PSEUDO_HDR the helper also moves `skb->csum` by the
                    // address change, as IPv4 needs (its header checksum field changes
                    // too). An IPv6 header has no checksum, so the packet's bytes sum as
                    // before: move `skb->csum` back. A no-op unless the driver supplied it.
                    // SAFETY: plain helper call on the program's own skb.
                    unsafe { bpf_csum_update(ctx.skb.skb, diff as u32) };
                }
                // A later fragment: no checksum moves against the address, so the bytes'
                // sum moves with it. A no-op unless the driver supplied `skb->csum`.
                // SAFETY: plain helper call on the program's own skb.
                None => unsafe {
                    bpf_csum_update(ctx.skb.skb, diff as u32);
                },
            }
            ctx.store(IPV6_SRC_OFFSET, addr, 0).map_err(|_| ())?;
        }
    }
    let port_offset = usize::from(packet.l4_offset);
    let old_port = packet.src_port.to_be();
    let new_port = port.to_be();
    if has_transport_header && old_port != new_port {
        if l4_flags.is_some() {
            ctx.l4_csum_replace(
                check,
                u64::from(old_port),
                u64::from(new_port),
                mangled_0 | CSUM_SIZE_2,
            )
            .map_err(|_| ())?;
        }
        ctx.store(port_offset, &new_port, 0).map_err(|_| ())?;
    }
    Ok(())
}
