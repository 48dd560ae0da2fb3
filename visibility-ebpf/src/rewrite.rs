//! Rewrites in place as a router makes them: one hop spent (TTL or hop limit, with
//! the checksums kept right) and new MACs; and addresses as the words the checksum and
//! FIB helpers take.

use aya_ebpf::{
    helpers::{bpf_csum_diff, bpf_csum_update},
    programs::TcContext,
};
use visibility_common::{
    counters::Counter,
    packet::{
        Family, IPV4_CHECKSUM_OFFSET, IPV4_TTL_OFFSET, IPV6_HOP_LIMIT_OFFSET, Packet,
        checksum_replace16,
    },
};

use crate::reader::packet_ptr;

/// Destination and source MAC, in the order of the Ethernet header.
pub type Macs = [u8; 12];

/// `BPF_F_PSEUDO_HDR` is not needed: the TTL is not part of any pseudo-header.
const CSUM_SIZE_16: u64 = 2;

/// An address as the kernel's `__be32[4]`: the bytes in order, whatever the host's
/// order (as `bpf_fib_lookup` and `bpf_csum_diff` take it).
#[inline(always)]
pub fn words(addr: &[u8; 16]) -> [u32; 4] {
    let mut out = [0u32; 4];
    let mut i = 0;
    while i < 4 {
        out[i] = u32::from_ne_bytes([
            addr[4 * i],
            addr[4 * i + 1],
            addr[4 * i + 2],
            addr[4 * i + 3],
        ]);
        i += 1;
    }
    out
}

/// Spends one hop: IPv4 TTL (with an incremental checksum update) or IPv6 hop limit.
/// Writes straight into the packet when the header is in the linear data, else
/// through the store and checksum helpers. A packet whose driver supplied a checksum
/// of all its bytes (`CHECKSUM_COMPLETE`) keeps it valid: for IPv4 the header checksum
/// moves opposite to the TTL, so the bytes sum as before; an IPv6 header has no
/// checksum, so `skb->csum` is moved by the hop limit's change (as Cilium's
/// `ipv6_dec_hoplimit` does through `BPF_F_RECOMPUTE_CSUM`).
#[inline(always)]
pub fn decrement_ttl(ctx: &TcContext, packet: &Packet) -> Result<(), Counter> {
    // The verdict passes a packet without a hop to spare (`PassTtlExpired`) before any
    // rewrite, and the lab router checks first; a TTL of 0 here cannot be spent.
    let Some(ttl) = packet.ttl.checked_sub(1) else {
        return Err(Counter::DroppedRewriteFailed);
    };
    match packet.family {
        Family::V4 => {
            // The TTL shares a 16-bit checksum word with the protocol byte.
            let old = u16::from_be_bytes([packet.ttl, packet.protocol]);
            let new = u16::from_be_bytes([ttl, packet.protocol]);
            // TTL, protocol and checksum are adjacent: one bounds check covers them.
            if let Some(header) = packet_ptr::<[u8; 4]>(ctx, IPV4_TTL_OFFSET) {
                // SAFETY: `packet_ptr` checked the four bytes are in the linear data.
                unsafe {
                    let [_, protocol, c0, c1] = header.read_unaligned();
                    let check = checksum_replace16(u16::from_be_bytes([c0, c1]), old, new);
                    let [c0, c1] = check.to_be_bytes();
                    header.write_unaligned([ttl, protocol, c0, c1]);
                }
                return Ok(());
            }
            ctx.store(IPV4_TTL_OFFSET, &ttl, 0)
                .map_err(|_| Counter::DroppedRewriteFailed)?;
            ctx.l3_csum_replace(
                IPV4_CHECKSUM_OFFSET,
                u64::from(old.to_be()),
                u64::from(new.to_be()),
                CSUM_SIZE_16,
            )
            .map_err(|_| Counter::DroppedRewriteFailed)?;
        }
        Family::V6 => {
            // Next header and hop limit, as one pair: the verifier follows a two-byte
            // bounds check better than the one-byte form LLVM makes of a single byte.
            match packet_ptr::<[u8; 2]>(ctx, IPV6_HOP_LIMIT_OFFSET - 1) {
                // SAFETY: `packet_ptr` checked both bytes are in the linear data.
                Some(pair) => unsafe {
                    let [next_header, _] = pair.read_unaligned();
                    pair.write_unaligned([next_header, ttl]);
                },
                None => ctx
                    .store(IPV6_HOP_LIMIT_OFFSET, &ttl, 0)
                    .map_err(|_| Counter::DroppedRewriteFailed)?,
            }
            // The hop limit alone, at the odd byte of a word as in the header (offset 7):
            // the other bytes are the same before and after, so they may be zero here.
            let mut old = [u32::from_ne_bytes([0, 0, 0, packet.ttl])];
            let mut new = [u32::from_ne_bytes([0, 0, 0, ttl])];
            // SAFETY: both buffers are four bytes on the stack, as the sizes say.
            let diff = unsafe { bpf_csum_diff(old.as_mut_ptr(), 4, new.as_mut_ptr(), 4, 0) };
            // SAFETY: a no-op unless the skb carries CHECKSUM_COMPLETE.
            unsafe { bpf_csum_update(ctx.skb.skb, diff as u32) };
        }
    }
    Ok(())
}

#[inline(always)]
pub fn rewrite_macs(ctx: &TcContext, macs: &Macs) -> Result<(), ()> {
    match packet_ptr::<Macs>(ctx, 0) {
        // SAFETY: `packet_ptr` checked the Ethernet addresses are in the linear data.
        Some(header) => unsafe { header.write_unaligned(*macs) },
        None => ctx.store(0, macs, 0).map_err(|_| ())?,
    }
    Ok(())
}
