//! Flow and counter updates.

use core::intrinsics::{AtomicOrdering, atomic_xadd};

use aya_ebpf::{bindings::BPF_NOEXIST, programs::TcContext};
use visibility_common::{
    counters::{Counter, slot},
    flow::{FlowKey, FlowStats, Path, judged_at},
    packet::{ETH_HLEN, Packet},
    verdict::Hook,
};

use crate::maps::{COUNTERS, FLOWS, NEW_FLOW};

/// Wire packets and IP bytes of one skb. A GSO super-packet counts as its segments;
/// its headers are counted once.
#[derive(Clone, Copy)]
pub struct Size {
    pub packets: u64,
    pub bytes: u64,
}

impl Size {
    #[inline(always)]
    pub fn of(ctx: &TcContext, packet: Option<&Packet>) -> Self {
        // SAFETY: the context pointer is valid for the whole program run.
        let segments = unsafe { (*ctx.skb.skb).gso_segs };
        let bytes = match packet {
            Some(packet) if segments <= 1 => u64::from(packet.ip_len),
            _ => u64::from(ctx.len()).saturating_sub(ETH_HLEN as u64),
        };
        Self {
            packets: u64::from(segments.max(1)),
            bytes,
        }
    }
}

#[inline(always)]
pub fn count(hook: Hook, counter: Counter, size: Size) {
    if let Some(value) = COUNTERS.get_ptr_mut(slot(hook, counter)) {
        // SAFETY: per-CPU slot, and programs are not preempted on one CPU.
        unsafe {
            (*value).packets += size.packets;
            (*value).bytes += size.bytes;
        }
    }
}

#[inline(always)]
fn add(field: &mut u64, value: u64) {
    // The BPF target has atomic add but no compare-and-swap, so `AtomicU64::fetch_add`
    // is not offered; the intrinsic lowers to the BPF atomic add instruction.
    // SAFETY: the field lives in a map value, aligned to 8 bytes, shared between CPUs.
    unsafe { atomic_xadd::<u64, u64, { AtomicOrdering::Relaxed }>(field, value) };
}

/// How a sent packet's flow is found and whether its judgement is new.
#[derive(Clone, Copy)]
pub struct SentFlow {
    /// The flow's entry, when the verdict already looked it up under this packet's key.
    pub found: Option<*mut FlowStats>,
    /// The packet was judged own-Pod-to-Pod: the flow keeps when and from which
    /// interface, so that its next packets need not be judged with every lookup (see
    /// [`visibility_common::verdict::Lookups::judged_own_pod_flow`]).
    pub judged: bool,
}

impl SentFlow {
    /// A flow to look up, with no judgement to keep.
    pub const UNKNOWN: Self = Self {
        found: None,
        judged: false,
    };
}

/// Counts a packet a Pod sent, on the path its verdict chose, at `now` (coarse
/// monotonic nanoseconds).
#[inline(always)]
pub fn flow_sent(
    hook: Hook,
    packet: &Packet,
    path: Path,
    size: Size,
    ifindex: u32,
    now: u64,
    flow: SentFlow,
) {
    let update = |stats: &mut FlowStats| {
        add(&mut stats.packets, size.packets);
        add(&mut stats.bytes, size.bytes);
        // Plain stores: a lost flag or a slightly older time between two CPUs is harmless.
        stats.last_seen_ns = now;
        stats.tcp_flags |= packet.tcp_flags;
        stats.path = path as u8;
        if flow.judged {
            stats.note_judged(ifindex, now);
        }
    };
    if let Some(stats) = flow.found {
        // SAFETY: a map value pointer from a successful lookup in this run.
        update(unsafe { &mut *stats });
        return;
    }
    // A new flow's entry is built in this CPU's scratch slot, not on the stack, which
    // the rest of the program needs.
    let Some(fresh) = NEW_FLOW.get_ptr_mut(0) else {
        count(hook, Counter::FlowUpdateFailed, size);
        return;
    };
    // SAFETY: per-CPU slot, and programs are not preempted on one CPU.
    let fresh = unsafe { &mut *fresh };
    *fresh = FlowStats {
        packets: size.packets,
        bytes: size.bytes,
        first_seen_ns: now,
        last_seen_ns: now,
        ingress_ifindex: ifindex,
        tcp_flags: packet.tcp_flags,
        path: path as u8,
        judged_at: if flow.judged { judged_at(now) } else { 0 },
        ..FlowStats::default()
    };
    upsert(hook, packet, size, fresh, update);
}

/// Counts a packet that came back from the gateway and was handed to a Pod, in the
/// flow it was sent in (found by [`crate::lookups::MapLookups`]).
#[inline(always)]
pub fn flow_returned(stats: *mut FlowStats, size: Size, ifindex: u32) {
    // SAFETY: a map value pointer from a successful lookup in this run.
    let stats = unsafe { &mut *stats };
    add(&mut stats.returned_packets, size.packets);
    add(&mut stats.returned_bytes, size.bytes);
    stats.egress_ifindex = ifindex;
}

/// Updates the packet's flow, or adds it. When two CPUs race to add the same flow the
/// loser finds the winner's entry and updates it.
#[inline(always)]
fn upsert(
    hook: Hook,
    packet: &Packet,
    size: Size,
    fresh: &FlowStats,
    update: impl Fn(&mut FlowStats),
) {
    let key = FlowKey::from_packet(packet);
    for _ in 0..2 {
        if let Some(stats) = FLOWS.get_ptr_mut(key) {
            // SAFETY: map value pointer from a successful lookup.
            update(unsafe { &mut *stats });
            return;
        }
        if FLOWS.insert(key, fresh, u64::from(BPF_NOEXIST)).is_ok() {
            return;
        }
    }
    count(hook, Counter::FlowUpdateFailed, size);
}
