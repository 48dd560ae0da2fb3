//! TC programs that send same-node Pod-to-Pod traffic out through the gateway, after
//! the node's own packet filter has judged it.
//!
//! - `pod_ingress` (host side of each Pod veth, ingress) sees what a Pod sends, before
//!   the node's stack. It only counts, and notes the packet as sent so that
//!   `pod_egress` can tell what the node's NAT changed. Every packet goes on to the
//!   node's stack: PREROUTING, FORWARD and POSTROUTING judge it as without visibility.
//! - `pod_egress` (host side of each Pod veth, egress) sees what the node forwards to
//!   a Pod, after the node's netfilter. Pod-to-Pod packets go to the gateway from here.
//! - `uplink_ingress` hands packets of flows the datapath sent to the gateway, when
//!   they come back, to their Pod; everything else goes to the node's stack.
//!
//! The decisions live in `visibility_common::verdict`; these programs gather facts,
//! apply the verdict and count.
#![no_std]
#![no_main]
#![feature(core_intrinsics)]
#![expect(
    internal_features,
    reason = "atomic add on map values; see account::add"
)]

mod account;
mod fib;
mod fragments;
mod icmp;
mod lookups;
mod maps;
mod nat;
mod object;
mod outcome;
mod reader;
mod redirect;
mod rewrite;
mod routes;
mod types;

use aya_ebpf::{
    helpers::{bpf_jiffies64, bpf_ktime_get_coarse_ns},
    macros::classifier,
    programs::TcContext,
};
use visibility_common::{
    counters::Counter,
    flow::{FlowKey, NatLeg, Path},
    hook::Hook,
    packet::{Packet, ParseError, Transport, parse},
    verdict::{Leg, Verdict, decide_pod_egress, decide_pod_ingress, decide_uplink},
};

use crate::{
    account::{SentFlow, Size, count, flow_returned, flow_sent},
    lookups::MapLookups,
    maps::{CLOCK, LOG_LIMIT, NAT_LEGS, PACKET, SETTINGS},
    nat::{record_pre_stack, rewrite_source, take_pre_stack},
    outcome::{DROP, Outcome, PASS},
    reader::SkbReader,
};

#[classifier]
pub fn pod_ingress(ctx: TcContext) -> i32 {
    match try_pod_ingress(&ctx) {
        Ok(action) | Err(action) => action,
    }
}

#[classifier]
pub fn pod_egress(ctx: TcContext) -> i32 {
    match try_pod_egress(&ctx) {
        Ok(action) | Err(action) => action,
    }
}

#[classifier]
pub fn uplink_ingress(ctx: TcContext) -> i32 {
    match try_uplink_ingress(&ctx) {
        Ok(action) | Err(action) => action,
    }
}

/// Parses the packet, or counts why it cannot be and passes it.
#[inline(always)]
fn parsed(ctx: &TcContext, hook: Hook) -> Result<Packet, i32> {
    parse(&SkbReader(ctx), ctx.len() as usize).map_err(|error| {
        let counter = match error {
            ParseError::NotIp => Counter::PassNotIp,
            ParseError::Malformed => Counter::PassMalformed,
        };
        count(hook, counter, Size::of(ctx, None));
        PASS
    })
}

/// The coarse monotonic clock: a tick's resolution is enough for flow times, the
/// cached routes' age and the return window. From jiffies, which the verifier inlines,
/// once the daemon has measured the tick (see `visibility_common::clock`); until then
/// from the helper.
#[inline(always)]
fn now() -> u64 {
    // SAFETY: time helpers, no arguments.
    unsafe {
        CLOCK
            .get(0)
            .and_then(|clock| clock.now_ns(bpf_jiffies64()))
            .unwrap_or_else(|| bpf_ktime_get_coarse_ns())
    }
}

/// Never attached: samples both clocks at one instant for the daemon, which runs it
/// with `BPF_PROG_TEST_RUN` to measure the tick. Writes jiffies and the coarse
/// monotonic clock over the first 16 bytes of the frame.
#[classifier]
pub fn clock_sample(ctx: TcContext) -> i32 {
    // SAFETY: time helpers, no arguments.
    let sample = unsafe { [bpf_jiffies64(), bpf_ktime_get_coarse_ns()] };
    match reader::packet_ptr::<[u64; 2]>(&ctx, 0) {
        // SAFETY: `packet_ptr` checked the 16 bytes are in the linear data.
        Some(out) => unsafe { out.write_unaligned(sample) },
        None => return DROP,
    }
    PASS
}

/// Counts, notes the packet for `pod_egress`, and hands it to the node's stack.
#[inline(always)]
fn try_pod_ingress(ctx: &TcContext) -> Result<i32, i32> {
    let hook = Hook::PodIngress;
    let packet = parsed(ctx, hook)?;
    // SAFETY: the context pointer is valid for the whole program run.
    let ifindex = unsafe { (*ctx.skb.skb).ifindex };
    #[cfg(not(feature = "upgrade-test"))]
    record_pre_stack(&packet, ifindex);
    let settings = SETTINGS.get(0).ok_or(PASS)?;
    let lookups = MapLookups::new(settings, ctx, 0);
    let counter = decide_pod_ingress(&packet, &lookups);
    let size = Size::of(ctx, Some(&packet));
    count(hook, counter, size);
    // Flows leaving the node's Pods are accounted here; Pod-to-Pod flows at egress.
    if let Some(path) = Path::of_sent(counter)
        && packet.transport == Transport::Read
    {
        flow_sent(hook, &packet, path, size, ifindex, now(), SentFlow::UNKNOWN);
    }
    // The upgrade test's stand-in for another release (feature `upgrade-test`) notes
    // the packet last instead of first: other instructions (map calls, which LLVM
    // keeps in their order), so another program tag, and the same behaviour, because
    // nothing in this program reads the note, and `pod_egress` reads it only after
    // this program has returned. (The one path that skips it, `VIS_SETTINGS` without
    // its entry, cannot happen: an array always has its entries.)
    #[cfg(feature = "upgrade-test")]
    record_pre_stack(&packet, ifindex);
    Ok(PASS)
}

/// Sends Pod-to-Pod packets that the node's stack forwarded to the gateway.
#[inline(always)]
fn try_pod_egress(ctx: &TcContext) -> Result<i32, i32> {
    let hook = Hook::PodEgress;
    let mut packet = parsed(ctx, hook)?;
    unknown_to_verifier(&mut packet);
    let settings = SETTINGS.get(0).ok_or(PASS)?;
    let now = now();
    let mut lookups = MapLookups::new(settings, ctx, now);
    lookups.pre_stack = take_pre_stack(&packet, lookups.ingress_ifindex);
    let size = Size::of(ctx, Some(&packet));
    // Later fragments take their first fragment's ports and verdict.
    let first = fragments::of_later_fragment(&mut packet);
    let verdict = match first.and_then(|entry| entry.verdict()) {
        Some(counter) => {
            Leg::of_counter(counter).map_or(Verdict::Pass(counter), Verdict::ToGateway)
        }
        None => decide_pod_egress(&packet, &lookups),
    };
    // What the verdict learnt of the sender is not needed past it; forgotten, the
    // paths that asked and those that did not go on as one for the verifier.
    lookups.forget_sender();
    if first.is_none() {
        fragments::remember(&packet, verdict.counter());
        note_unreadable(hook, &packet, size);
    }
    let outcome = match verdict {
        Verdict::ToGateway(leg) => send_to_gateway(ctx, &mut packet, leg, &lookups),
        Verdict::Pass(counter) => Outcome::pass(counter),
        Verdict::ToPod => Outcome::pass(Counter::PassNotFromPod),
    };
    count(hook, outcome.counter, size);
    if let Some(path) = Path::of_sent(outcome.counter) {
        let flow = SentFlow {
            // The gate first: where it is shut, the verifier then sees the slot unread.
            found: if takes_flow_shortcuts() {
                lookups.flow()
            } else {
                None
            },
            judged: first.is_none()
                && matches!(path, Path::ViaGateway | Path::ViaGatewayServiceLeg),
        };
        flow_sent(
            hook,
            &packet,
            path,
            size,
            lookups.ingress_ifindex,
            now,
            flow,
        );
    }
    if matches!(
        outcome.counter,
        Counter::DroppedNoGatewayRoute | Counter::DroppedGatewayUnresolved
    ) && log_allowed(now)
    {
        aya_log_ebpf::warn!(
            ctx,
            "pod_egress: dropped a Pod-to-Pod packet (IPv{}): the gateway is unreachable or unresolved. Check the uplink and the gateway",
            packet.family as u8
        );
    }
    Ok(outcome.action)
}

/// 1 when `pod_egress` judges every packet with every lookup and looks its flow up again
/// to count it; 0 when a flow judged lately skips the judgement's lookups (see
/// `Lookups::judged_own_pod_flow`) and the packet is counted in the entry the verdict
/// found. Both give the same verdicts and counts; the second saves three lookups per
/// packet but gives the verifier more paths than Linux 6.1's walks within its million
/// instructions. The loader sets it (`visibility_common::global_names`). Not 0 here: a
/// zero would go to `.bss`, which the verifier cannot take as constant.
#[unsafe(no_mangle)]
static JUDGE_EVERY_PACKET: u8 = 1;

/// Whether the shortcuts that [`JUDGE_EVERY_PACKET`] rules out are taken.
#[inline(always)]
pub(crate) fn takes_flow_shortcuts() -> bool {
    // SAFETY: a plain read of a static; volatile so that the compiler does not fold the
    // value it was compiled with, which the loader replaces.
    unsafe { core::ptr::read_volatile(&JUDGE_EVERY_PACKET) == 0 }
}

/// 1 when [`unknown_to_verifier`] copies the parsed packet through a per-CPU slot, 0 when
/// `pod_egress` uses it as parsed. Set by the loader, as [`JUDGE_EVERY_PACKET`] is.
#[unsafe(no_mangle)]
static WALK_PACKET_KINDS_AS_ONE: u8 = 1;

/// Makes the packet's fields, to the verifier, what a value read from a map is:
/// unknown. The parser leaves each kind of packet (family, protocol, fragment, how much
/// of the transport header was read) with its own constants, and the verifier, which
/// walks paths separately while their constants differ, would walk the rest of
/// `pod_egress` once per kind: more than Linux 6.1 walks within its million
/// instructions. Copied through this CPU's slot, every kind goes on as one. It costs
/// two copies of the packet's 56 bytes, about 15 ns, which kernels whose verifier
/// needs no help are spared ([`WALK_PACKET_KINDS_AS_ONE`]).
#[inline(always)]
fn unknown_to_verifier(packet: &mut Packet) {
    // SAFETY: a plain read of a static, volatile as in `takes_flow_shortcuts`.
    if unsafe { core::ptr::read_volatile(&WALK_PACKET_KINDS_AS_ONE) } == 0 {
        return;
    }
    let Some(slot) = PACKET.get_ptr_mut(0) else {
        return;
    };
    // SAFETY: per-CPU slot, and programs are not preempted on one CPU: nothing else
    // touches it between the write and the read, which gives back the valid value just
    // written. The copy back is volatile so that the compiler reads the map rather than
    // reuse what it wrote.
    unsafe {
        slot.write(*packet);
        core::intrinsics::volatile_copy_nonoverlapping_memory(packet, slot, 1);
    }
}

/// At most one log record per CPU per second.
#[inline(always)]
fn log_allowed(now: u64) -> bool {
    const SECOND_NS: u64 = 1_000_000_000;
    let Some(last) = LOG_LIMIT.get_ptr_mut(0) else {
        return false;
    };
    // SAFETY: per-CPU slot, and programs are not preempted on one CPU.
    unsafe {
        if now.wrapping_sub(*last) < SECOND_NS {
            return false;
        }
        *last = now;
    }
    true
}

/// Counts, besides the verdict, a packet judged without ports.
#[inline(always)]
fn note_unreadable(hook: Hook, packet: &Packet, size: Size) {
    match packet.transport {
        Transport::Read => {}
        Transport::InFirstFragment => count(hook, Counter::FragmentWithoutFirst, size),
        Transport::Unreadable => count(hook, Counter::TransportUnreadable, size),
    }
}

/// Sends a packet to the gateway. A Service reply first takes back the source the
/// backend Pod gave it, and the Service's source is kept for its return; `packet` is
/// updated to what crosses the gateway, which is what its flow is counted as.
#[inline(always)]
fn send_to_gateway(
    ctx: &TcContext,
    packet: &mut Packet,
    leg: Leg,
    lookups: &MapLookups,
) -> Outcome {
    if leg == Leg::ServiceReply {
        let Some(pre) = lookups.pre_stack else {
            return Outcome::pass(Counter::PassServiceReplyUnrestorable);
        };
        let (pod_addr, pod_port) = pre.source();
        let service = NatLeg {
            src_addr: packet.src,
            src_port: packet.src_port,
            _pad: [0; 6],
        };
        if rewrite_source(ctx, packet, &pod_addr, pod_port).is_err() {
            return Outcome::drop(Counter::DroppedRewriteFailed);
        }
        // The flow found under the Service's source is not this packet's any more.
        lookups.forget_flow();
        packet.src = pod_addr;
        packet.src_port = pod_port;
        // Without the entry the returning reply goes to the node's stack, whose
        // conntrack puts the Service's source back; strict rp_filter drops it.
        let _ = NAT_LEGS.insert(FlowKey::from_packet(packet), service, 0);
    }
    let gateway = lookups.settings.gateway(packet.family);
    redirect::to_gateway(ctx, packet, gateway, leg.counter(), lookups.now)
}

/// Hands what comes back from the gateway to its Pod, when the datapath sent it.
#[inline(always)]
fn try_uplink_ingress(ctx: &TcContext) -> Result<i32, i32> {
    let hook = Hook::Uplink;
    let mut packet = parsed(ctx, hook)?;
    let settings = SETTINGS.get(0).ok_or(PASS)?;
    let now = now();
    let lookups = MapLookups::new(settings, ctx, now);
    let size = Size::of(ctx, Some(&packet));
    // Later fragments take their first fragment's ports.
    let first = fragments::of_later_fragment(&mut packet);
    let verdict = decide_uplink(&packet, &lookups);
    let outcome = match (verdict, lookups.flow()) {
        (Verdict::ToPod, Some(flow)) => {
            if first.is_none() {
                // The gateway may have fragmented anew; its later fragments follow.
                fragments::remember(&packet, Counter::DeliveredFromGateway);
            }
            deliver(ctx, &packet, flow, &lookups, size)
        }
        (verdict, _) => Outcome::pass(verdict.counter()),
    };
    count(hook, outcome.counter, size);
    if outcome.via_neighbour {
        count(hook, Counter::NeighbourResolution, size);
    }
    Ok(outcome.action)
}

/// Hands a returning packet to its Pod: a Service reply gets the Service's source back
/// first. Counted in its flow once handed on.
#[inline(always)]
fn deliver(
    ctx: &TcContext,
    packet: &Packet,
    flow: *mut visibility_common::flow::FlowStats,
    lookups: &MapLookups,
    size: Size,
) -> Outcome {
    // SAFETY: a map value pointer from a successful lookup in this run.
    let path = unsafe { (*flow).path() };
    if path == Some(Path::ViaGatewayServiceReply) {
        // SAFETY: the value is copied out at once.
        let Some(service) = (unsafe { NAT_LEGS.get(FlowKey::from_packet(packet)) }).copied() else {
            return Outcome::pass(Counter::PassServiceReplyUnrestorable);
        };
        if rewrite_source(ctx, packet, &service.src_addr, service.src_port).is_err() {
            return Outcome::drop(Counter::DroppedRewriteFailed);
        }
    }
    let uplink = lookups.settings.gateway(packet.family).ifindex;
    let uplink = if uplink != 0 {
        uplink
    } else {
        lookups.ingress_ifindex
    };
    let outcome = redirect::to_pod(ctx, packet, uplink, lookups.now, flow);
    if outcome.counter == Counter::DeliveredFromGateway {
        flow_returned(flow, size, outcome.ifindex);
    }
    outcome
}
