//! TC programs that send same-node Pod-to-Pod traffic out through the gateway.
//!
//! - `pod_ingress` (host side of each Pod veth, ingress) sees what a Pod sends, before
//!   the node's stack, and sends Pod-to-Pod packets straight to the uplink.
//! - `pod_egress` (host side of each Pod veth, egress) sees what the node forwards to a
//!   Pod, after the node's NAT. Service traffic (Pod → ClusterIP → Pod) only becomes
//!   Pod-to-Pod here, so this is where its Pod-to-Pod leg is sent to the gateway.
//! - `uplink_ingress` hands packets that come back from the gateway to the Pod.
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
mod lookups;
mod maps;
mod reader;
mod redirect;

use aya_ebpf::{helpers::bpf_ktime_get_coarse_ns, macros::classifier, programs::TcContext};
use visibility_common::{
    config::Settings,
    counters::Counter,
    flow::{FlowKey, Path},
    packet::{IPPROTO_TCP, IPPROTO_UDP, Packet, ParseError, parse},
    verdict::{Context, Hook, Verdict, decide},
};

use crate::{
    account::{Size, count, flow_returned, flow_sent},
    lookups::MapLookups,
    maps::{LOG_LIMIT, NAT_LEGS, SETTINGS},
    reader::SkbReader,
    redirect::Outcome,
};

#[classifier]
pub fn pod_ingress(ctx: TcContext) -> i32 {
    run(&ctx, Hook::PodIngress)
}

#[classifier]
pub fn pod_egress(ctx: TcContext) -> i32 {
    run(&ctx, Hook::PodEgress)
}

#[classifier]
pub fn uplink_ingress(ctx: TcContext) -> i32 {
    run(&ctx, Hook::Uplink)
}

/// Benchmark baseline, never attached: parses and looks up the destination's Pod
/// CIDR, the least any program of this kind must do, so the benchmark can show what
/// the rest of the datapath costs on top.
#[classifier]
pub fn bench_baseline(ctx: TcContext) -> i32 {
    if let (Ok(packet), Some(settings)) =
        (parse(&SkbReader(&ctx), ctx.len() as usize), SETTINGS.get(0))
    {
        let lookups = MapLookups { settings };
        if visibility_common::verdict::Lookups::addr_kind(&lookups, packet.family, &packet.dst)
            != visibility_common::verdict::AddrKind::Outside
        {
            return Outcome::pass(Counter::PassNotSameNode).action;
        }
    }
    Outcome::pass(Counter::PassNotIp).action
}

/// The benchmark lab's stand-in for a VPC that does its work off the node, never
/// attached by the daemon. On the gateway namespace's interface it routes what the
/// gateway's FIB forwards straight back out, so the gateway's IP stack never runs;
/// everything else (ARP, the gateway's own traffic, packets without a hop to spare)
/// goes to that stack.
#[classifier]
pub fn lab_router(ctx: TcContext) -> i32 {
    match parse(&SkbReader(&ctx), ctx.len() as usize) {
        Ok(packet) => redirect::route(&ctx, &packet),
        Err(_) => redirect::PASS,
    }
}

#[inline(always)]
fn run(ctx: &TcContext, hook: Hook) -> i32 {
    let packet = match parse(&SkbReader(ctx), ctx.len() as usize) {
        Ok(packet) => packet,
        Err(error) => {
            let counter = match error {
                ParseError::NotIp => Counter::PassNotIp,
                ParseError::Malformed => Counter::PassMalformed,
                ParseError::Fragment => Counter::PassFragment,
            };
            count(hook, counter, Size::of(ctx, None));
            return Outcome::pass(counter).action;
        }
    };
    let size = Size::of(ctx, Some(&packet));
    let Some(settings) = SETTINGS.get(0) else {
        // Unreachable for an array map; passing is the safe answer anyway.
        return Outcome::pass(Counter::PassDisabled).action;
    };
    let facts = facts(ctx, &packet, settings);
    let verdict = decide(hook, &packet, &facts, &MapLookups { settings });
    // Redirects (route caches, flows) and pod ingress (flows of passed packets too, see
    // `account_flow`) need the time; what the other hooks pass needs none.
    let now = if hook == Hook::PodIngress || !matches!(verdict, Verdict::Pass(_)) {
        // SAFETY: time helper, no arguments. The coarse clock (a tick's resolution) is
        // enough for flow times and the cached routes' age, and reads no clock source.
        unsafe { bpf_ktime_get_coarse_ns() }
    } else {
        0
    };
    let outcome = apply(ctx, hook, &packet, verdict, settings, now);
    count(hook, outcome.counter, size);
    if outcome.via_neighbour {
        count(hook, Counter::NeighbourResolution, size);
    }
    account_flow(ctx, hook, &packet, &outcome, size, now);
    if outcome.counter == Counter::PassRouteLookupFailed && log_allowed() {
        aya_log_ebpf::warn!(
            ctx,
            "{}: no route for a Pod-to-Pod packet (IPv{}); it stays on the node. Check the uplink, the gateway and the Pod routes",
            hook.name(),
            packet.family as u8
        );
    }
    outcome.action
}

/// At most one log record per CPU per second.
#[inline(always)]
fn log_allowed() -> bool {
    const SECOND_NS: u64 = 1_000_000_000;
    let Some(last) = LOG_LIMIT.get_ptr_mut(0) else {
        return false;
    };
    // SAFETY: time helper, no arguments.
    let now = unsafe { aya_ebpf::helpers::bpf_ktime_get_boot_ns() };
    // SAFETY: per-CPU slot, and programs are not preempted on one CPU.
    unsafe {
        if now.saturating_sub(*last) < SECOND_NS {
            return false;
        }
        *last = now;
    }
    true
}

/// What the verdict needs that is not in a map.
#[inline(always)]
fn facts(ctx: &TcContext, packet: &Packet, settings: &Settings) -> Context {
    // SAFETY: the context pointer is valid for the whole program run.
    let (mark, ingress_ifindex) = unsafe { ((*ctx.skb.skb).mark, (*ctx.skb.skb).ingress_ifindex) };
    Context {
        masquerade_marked: mark & settings.masquerade_mark != 0,
        from_uplink: ingress_ifindex != 0
            && ingress_ifindex == settings.gateway(packet.family).ifindex,
    }
}

/// Carries out the verdict. A redirect that cannot be done becomes a pass, counted
/// with the reason it could not.
#[inline(always)]
fn apply(
    ctx: &TcContext,
    hook: Hook,
    packet: &Packet,
    verdict: Verdict,
    settings: &Settings,
    now: u64,
) -> Outcome {
    let counter = verdict.counter(hook);
    match verdict {
        Verdict::Pass(_) => Outcome::pass(counter),
        Verdict::ToGateway => {
            let gateway = settings.gateway(packet.family);
            let spend_hop = hook == Hook::PodIngress;
            let outcome = redirect::to_gateway(ctx, packet, gateway, spend_hop, counter, now);
            if hook == Hook::PodEgress && outcome.counter == counter {
                remember_nat_leg(packet);
            }
            outcome
        }
        Verdict::ToPod => {
            // SAFETY: the context pointer is valid for the whole program run.
            let uplink = unsafe { (*ctx.skb.skb).ifindex };
            redirect::to_pod(ctx, packet, uplink, now)
        }
    }
}

/// Pod-to-Pod legs that the node's NAT produced: their replies must go back through
/// the node's stack, so the NAT can be undone, before they may take the gateway.
#[inline(always)]
fn remember_nat_leg(packet: &Packet) {
    if matches!(packet.protocol, IPPROTO_TCP | IPPROTO_UDP) {
        // Best effort: without the entry the reply takes the gateway twice, still correct.
        let _ = NAT_LEGS.insert(FlowKey::from_packet(packet), 1, 0);
    }
}

#[inline(always)]
fn account_flow(
    ctx: &TcContext,
    hook: Hook,
    packet: &Packet,
    outcome: &Outcome,
    size: Size,
    now: u64,
) {
    // SAFETY: the context pointer is valid for the whole program run.
    let (ifindex, ingress_ifindex) =
        unsafe { ((*ctx.skb.skb).ifindex, (*ctx.skb.skb).ingress_ifindex) };
    match hook {
        Hook::PodIngress => {
            if let Some(path) = Path::of_sent(outcome.counter) {
                flow_sent(hook, packet, path, size, ifindex, now);
            }
        }
        // Only the NAT-ed legs: everything else at egress was counted where it was sent.
        Hook::PodEgress => {
            if outcome.counter == Counter::RedirectedAfterNat {
                flow_sent(
                    hook,
                    packet,
                    Path::ViaGatewayAfterNat,
                    size,
                    ingress_ifindex,
                    now,
                );
            }
        }
        Hook::Uplink => {
            if outcome.counter == Counter::DeliveredFromGateway {
                flow_returned(hook, packet, size, outcome.ifindex, now);
            }
        }
    }
}

#[cfg(not(test))]
#[panic_handler]
fn panic(_info: &core::panic::PanicInfo) -> ! {
    loop {}
}

#[unsafe(link_section = "license")]
#[unsafe(no_mangle)]
static LICENSE: [u8; 13] = *b"Dual MIT/GPL\0";
