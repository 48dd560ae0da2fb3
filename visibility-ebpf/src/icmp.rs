//! ICMP "fragmentation needed" (IPv4) and "packet too big" (IPv6), as a router sends
//! them when a packet does not fit the next link's MTU.
//!
//! The packet that did not fit is turned into the error in place: cut to its first
//! [`ICMP_QUOTE_LEN`] bytes, an IP and an ICMP header put in front, and sent back to the
//! Pod that sent it, from the node's address on the uplink.

use aya_ebpf::{
    bindings::bpf_adj_room_mode::BPF_ADJ_ROOM_MAC,
    helpers::{bpf_redirect, bpf_skb_change_tail, bpf_skb_load_bytes},
    programs::TcContext,
};
use visibility_common::{
    config::Gateway,
    packet::{ETH_HLEN, Family, IPPROTO_ICMP, IPPROTO_ICMPV6, Packet, fold_checksum},
};

use crate::{
    maps::ICMP_SCRATCH,
    outcome::DROP,
    rewrite::rewrite_macs,
    routes::cached_pod_route,
    types::{ICMP_HEADER_LEN, ICMP_QUOTE_LEN, IPV6_HEADER_LEN, IcmpScratch},
};

const IPV4_HEADER_LEN: usize = 20;
const ICMP_DEST_UNREACH: u8 = 3;
const ICMP_FRAG_NEEDED: u8 = 4;
const ICMPV6_PKT_TOOBIG: u8 = 2;
const TTL: u8 = 64;

/// The sum of `bytes` as big-endian 16-bit words.
#[inline(always)]
fn sum_words(bytes: &[u8]) -> u32 {
    let mut sum = 0u32;
    let mut i = 0;
    while i + 1 < bytes.len() {
        sum += u32::from(u16::from_be_bytes([bytes[i], bytes[i + 1]]));
        i += 2;
    }
    sum
}

/// Turns the packet into an ICMP error telling its sender that `mtu` is the most the
/// path takes, and sends it to the sender. Returns the program's action: the error
/// redirected to the sender's interface, or the packet dropped when the error cannot
/// be made (no node address, the sender's route not known, a helper refused).
#[inline(always)]
pub fn send_too_big(ctx: &TcContext, packet: &Packet, gateway: &Gateway, mtu: u32) -> i32 {
    if usize::from(packet.ip_len) < ICMP_QUOTE_LEN || gateway.node_addr == [0; 16] {
        return DROP;
    }
    // The way back to the sender: `pod_egress` checked the source's route a moment
    // ago, and the answer is in this CPU's cache when the sender's neighbour is known.
    let Some(route) = cached_pod_route(packet.family, &packet.src) else {
        return DROP;
    };
    let Some(scratch) = ICMP_SCRATCH.get_ptr_mut(0) else {
        return DROP;
    };
    // SAFETY: per-CPU slot, and programs are not preempted on one CPU.
    let scratch = unsafe { &mut *scratch };
    // The helper itself, with a constant length: the verifier cannot prove the
    // length `TcContext::load_bytes` computes is not zero.
    // SAFETY: `quote` is ICMP_QUOTE_LEN writable bytes; the helper checks the packet.
    let loaded = unsafe {
        bpf_skb_load_bytes(
            ctx.skb.skb.cast(),
            ETH_HLEN as u32,
            scratch.quote.as_mut_ptr().cast(),
            ICMP_QUOTE_LEN as u32,
        )
    };
    if loaded != 0 {
        return DROP;
    }
    let written = match packet.family {
        Family::V4 => {
            icmpv4(scratch, packet, gateway, mtu);
            let ip: &[u8; IPV4_HEADER_LEN] = scratch.ip.first_chunk().expect("20 of 40 bytes");
            make_room(ctx, IPV4_HEADER_LEN)
                && ctx.store(ETH_HLEN, ip, 0).is_ok()
                && ctx
                    .store(ETH_HLEN + IPV4_HEADER_LEN, &scratch.icmp, 0)
                    .is_ok()
        }
        Family::V6 => {
            icmpv6(scratch, packet, gateway, mtu);
            make_room(ctx, IPV6_HEADER_LEN)
                && ctx.store(ETH_HLEN, &scratch.ip, 0).is_ok()
                && ctx
                    .store(ETH_HLEN + IPV6_HEADER_LEN, &scratch.icmp, 0)
                    .is_ok()
        }
    };
    if !written || rewrite_macs(ctx, &route.macs).is_err() {
        return DROP;
    }
    // SAFETY: plain helper call.
    unsafe { bpf_redirect(route.ifindex, 0) as i32 }
}

/// Cuts the packet to its MAC header and its first [`ICMP_QUOTE_LEN`] bytes, then opens
/// room for an IP header of `header_len` bytes and the ICMP header behind the MAC
/// header. The kernel drops any GSO state as the packet shrinks.
#[inline(always)]
fn make_room(ctx: &TcContext, header_len: usize) -> bool {
    // SAFETY: plain helper call on the program's own skb.
    let cut = unsafe { bpf_skb_change_tail(ctx.skb.skb, (ETH_HLEN + ICMP_QUOTE_LEN) as u32, 0) };
    cut == 0
        && ctx
            .adjust_room((header_len + ICMP_HEADER_LEN) as i32, BPF_ADJ_ROOM_MAC, 0)
            .is_ok()
}

/// Fills `scratch` with the IPv4 and ICMP headers of a "fragmentation needed", from
/// the node's address to the erring packet's source.
#[inline(always)]
fn icmpv4(scratch: &mut IcmpScratch, packet: &Packet, gateway: &Gateway, mtu: u32) {
    let total = ((IPV4_HEADER_LEN + ICMP_HEADER_LEN + ICMP_QUOTE_LEN) as u16).to_be_bytes();
    let ip = &mut scratch.ip;
    *ip = [0; IPV6_HEADER_LEN];
    ip[0] = 0x45;
    ip[2] = total[0];
    ip[3] = total[1];
    ip[8] = TTL;
    ip[9] = IPPROTO_ICMP;
    ip[12..16].copy_from_slice(&gateway.node_addr[..4]);
    ip[16..20].copy_from_slice(&packet.src[..4]);
    let check = fold_checksum(sum_words(&ip[..IPV4_HEADER_LEN])).to_be_bytes();
    ip[10] = check[0];
    ip[11] = check[1];
    let mtu = (mtu.min(u32::from(u16::MAX)) as u16).to_be_bytes();
    scratch.icmp = [
        ICMP_DEST_UNREACH,
        ICMP_FRAG_NEEDED,
        0,
        0,
        0,
        0,
        mtu[0],
        mtu[1],
    ];
    let check = fold_checksum(sum_words(&scratch.icmp) + sum_words(&scratch.quote)).to_be_bytes();
    scratch.icmp[2] = check[0];
    scratch.icmp[3] = check[1];
}

/// Fills `scratch` with the IPv6 and ICMPv6 headers of a "packet too big".
#[inline(always)]
fn icmpv6(scratch: &mut IcmpScratch, packet: &Packet, gateway: &Gateway, mtu: u32) {
    let payload = ((ICMP_HEADER_LEN + ICMP_QUOTE_LEN) as u16).to_be_bytes();
    let ip = &mut scratch.ip;
    *ip = [0; IPV6_HEADER_LEN];
    ip[0] = 0x60;
    ip[4] = payload[0];
    ip[5] = payload[1];
    ip[6] = IPPROTO_ICMPV6;
    ip[7] = TTL;
    ip[8..24].copy_from_slice(&gateway.node_addr);
    ip[24..40].copy_from_slice(&packet.src);
    let mtu = mtu.to_be_bytes();
    scratch.icmp = [ICMPV6_PKT_TOOBIG, 0, 0, 0, mtu[0], mtu[1], mtu[2], mtu[3]];
    // The pseudo-header: both addresses, the upper-layer length and the next header.
    let pseudo = sum_words(&ip[8..40])
        + (ICMP_HEADER_LEN + ICMP_QUOTE_LEN) as u32
        + u32::from(IPPROTO_ICMPV6);
    let check =
        fold_checksum(pseudo + sum_words(&scratch.icmp) + sum_words(&scratch.quote)).to_be_bytes();
    scratch.icmp[2] = check[0];
    scratch.icmp[3] = check[1];
}
