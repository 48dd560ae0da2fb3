//! The benchmarks' programs, in an object of their own that the daemon never loads
//! (`visibility-bench`; the production object is `visibility-datapath`, src/main.rs):
//!
//! - `bench_baseline` parses and looks up the destination's Pod CIDR, the least any
//!   program of the datapath's kind must do, so the benchmark can show what the rest
//!   of the datapath costs on top.
//! - `lab_router` is the benchmark lab's stand-in for a VPC that does its work off the
//!   node: on the gateway namespace's interface it routes what the gateway's FIB
//!   forwards straight back out, so the gateway's IP stack never runs.
//!
//! Its maps have the datapath's names and layouts (those `bench_baseline` reads), so a
//! benchmark fills them as it would the datapath's.
#![no_std]
#![no_main]

#[path = "fib.rs"]
mod fib;
#[path = "object.rs"]
mod object;
#[path = "reader.rs"]
mod reader;
#[path = "rewrite.rs"]
mod rewrite;

use aya_ebpf::{
    bindings::{BPF_FIB_LKUP_RET_SUCCESS, TC_ACT_UNSPEC},
    helpers::bpf_redirect,
    macros::{classifier, map},
    maps::{Array, LpmTrie, lpm_trie::Key},
    programs::TcContext,
};
use visibility_common::{
    POD_TRIE_CAPACITY,
    config::Settings,
    packet::{Family, Packet, parse},
    verdict::AddrKind,
};

use crate::{
    fib::{fib_macs, fib_params, lookup},
    reader::SkbReader,
    rewrite::{decrement_ttl, rewrite_macs},
};

/// What the programs return for a packet they leave alone: the next program on the
/// hook, then the kernel, has it (as the datapath's `PASS`).
const PASS: i32 = TC_ACT_UNSPEC;

#[map(name = "VIS_SETTINGS")]
static SETTINGS: Array<Settings> = Array::pinned(1, 0);

#[map(name = "VIS_PODS_V4")]
static POD_CIDRS_V4: LpmTrie<[u8; 4], u8> = LpmTrie::pinned(POD_TRIE_CAPACITY, 0);

#[map(name = "VIS_PODS_V6")]
static POD_CIDRS_V6: LpmTrie<[u8; 16], u8> = LpmTrie::pinned(POD_TRIE_CAPACITY, 0);

/// Never attached: parses, reads the settings and looks up the destination's Pod
/// CIDR, as every datapath program does first.
#[classifier]
pub fn bench_baseline(ctx: TcContext) -> i32 {
    if let (Ok(packet), Some(_settings)) =
        (parse(&SkbReader(&ctx), ctx.len() as usize), SETTINGS.get(0))
    {
        let dst = &packet.dst;
        let entry = match packet.family {
            Family::V4 => POD_CIDRS_V4.get(Key::new(32, [dst[0], dst[1], dst[2], dst[3]])),
            Family::V6 => POD_CIDRS_V6.get(Key::new(128, *dst)),
        };
        if AddrKind::of_entry(entry.copied()) != AddrKind::Outside {
            return PASS;
        }
    }
    PASS
}

/// Never attached by the daemon: on the lab gateway's interface, routes what the
/// gateway's FIB forwards; everything else (ARP, the gateway's own traffic, packets
/// without a hop to spare) goes to the gateway's stack.
#[classifier]
pub fn lab_router(ctx: TcContext) -> i32 {
    match parse(&SkbReader(&ctx), ctx.len() as usize) {
        Ok(packet) => route(&ctx, &packet),
        Err(_) => PASS,
    }
}

/// Forwards a packet as a router would, when the FIB has a route for it out of an
/// interface with a resolved neighbour: one hop spent, MACs from the FIB, sent out
/// with `bpf_redirect`. Returns the program's action; anything else is passed.
#[inline(always)]
fn route(ctx: &TcContext, packet: &Packet) -> i32 {
    // SAFETY: the context pointer is valid for the whole program run.
    let ingress = unsafe { (*ctx.skb.skb).ingress_ifindex };
    let mut params = fib_params(packet.family, ingress, &packet.src, &packet.dst);
    // The stack answers a packet that cannot take another hop.
    if packet.ttl <= 1
        || lookup(ctx, &mut params, 0) != i64::from(BPF_FIB_LKUP_RET_SUCCESS)
        || decrement_ttl(ctx, packet).is_err()
        || rewrite_macs(ctx, &fib_macs(&params)).is_err()
    {
        return PASS;
    }
    // SAFETY: plain helper call.
    unsafe { bpf_redirect(params.ifindex, 0) as i32 }
}
