//! Questions to the kernel's FIB: the parameters of a lookup, the lookup in the main
//! table, and the MACs of its answer.

use core::mem::{size_of, zeroed};

use aya_ebpf::{
    bindings::bpf_fib_lookup as FibParams, helpers::bpf_fib_lookup, programs::TcContext,
};
use visibility_common::packet::Family;

use crate::rewrite::{Macs, words};

const AF_INET: u8 = 2;
const AF_INET6: u8 = 10;

/// The parameters of a lookup from `src` to `dst` of `family`, as if the packet came
/// in on (or, with `BPF_FIB_LOOKUP_OUTPUT`, went out of) `ifindex`.
#[inline(always)]
pub fn fib_params(family: Family, ifindex: u32, src: &[u8; 16], dst: &[u8; 16]) -> FibParams {
    // SAFETY: a plain C struct for which all-zero is a valid value.
    let mut params: FibParams = unsafe { zeroed() };
    params.ifindex = ifindex;
    match family {
        Family::V4 => {
            params.family = AF_INET;
            params.__bindgen_anon_3.ipv4_src = u32::from_ne_bytes([src[0], src[1], src[2], src[3]]);
            params.__bindgen_anon_4.ipv4_dst = u32::from_ne_bytes([dst[0], dst[1], dst[2], dst[3]]);
        }
        Family::V6 => {
            params.family = AF_INET6;
            params.__bindgen_anon_3.ipv6_src = words(src);
            params.__bindgen_anon_4.ipv6_dst = words(dst);
        }
    }
    params
}

/// Looks up the main table directly: the gateway's connected route and the Pods' host
/// routes live there, and skipping the policy rules saves their walk on every packet
/// (the kernel keeps walking them once any rule was ever added to the namespace).
#[inline(always)]
pub fn lookup(ctx: &TcContext, params: &mut FibParams, flags: u32) -> i64 {
    // SAFETY: `params` is a valid, initialised bpf_fib_lookup of the size passed.
    unsafe {
        bpf_fib_lookup(
            ctx.skb.skb.cast(),
            params,
            size_of::<FibParams>() as i32,
            flags,
        )
    }
}

/// The MACs of a successful lookup's answer: the next hop's and the output
/// interface's, in the order of the Ethernet header.
#[inline(always)]
pub fn fib_macs(params: &FibParams) -> Macs {
    let mut macs = [0u8; 12];
    macs[..6].copy_from_slice(&params.dmac);
    macs[6..].copy_from_slice(&params.smac);
    macs
}
