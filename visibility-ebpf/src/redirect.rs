//! Carrying out a redirect: a packet the node forwarded to a Pod goes out of the
//! uplink toward the gateway instead, and one that came back from the gateway goes
//! to its Pod.

use aya_ebpf::{
    bindings::{bpf_check_mtu_ret::BPF_MTU_CHK_RET_SUCCESS, bpf_redir_neigh},
    helpers::{bpf_check_mtu, bpf_redirect, bpf_redirect_neigh, bpf_redirect_peer},
    programs::TcContext,
};
use visibility_common::{
    config::Gateway,
    counters::Counter,
    flow::{FlowStats, WayToPod},
    packet::Packet,
};

use crate::{
    icmp::send_too_big,
    outcome::Outcome,
    rewrite::{decrement_ttl, rewrite_macs},
    routes::{gateway_route, pod_route},
};

/// Whether the packet fits the uplink's MTU. A GSO packet fits when its segments do.
#[inline(always)]
fn fits(ctx: &TcContext, packet: &Packet, uplink: u32, mtu: u32) -> bool {
    // SAFETY: the context pointer is valid for the whole program run.
    let gso_segments = unsafe { (*ctx.skb.skb).gso_segs };
    if gso_segments <= 1 {
        return u32::from(packet.ip_len) <= mtu;
    }
    let mut mtu_len = 0u32;
    // SAFETY: plain helper call on the program's own skb.
    let rc = unsafe { bpf_check_mtu(ctx.skb.skb.cast(), uplink, &mut mtu_len, 0, 0) };
    rc == i64::from(BPF_MTU_CHK_RET_SUCCESS)
}

#[inline(always)]
fn redirect_via_neighbour(ifindex: u32) -> i64 {
    // No explicit next hop: the kernel uses the packet's destination.
    // SAFETY: a null next hop with length 0 is allowed.
    unsafe { bpf_redirect_neigh(ifindex, core::ptr::null_mut::<bpf_redir_neigh>(), 0, 0) }
}

/// Sends a packet the node forwarded to a Pod out of the family's uplink toward its
/// gateway, as a router would: the gateway's MAC as destination, the uplink's as
/// source. The kernel has spent the hop already. Anything that keeps the packet from
/// the gateway drops it (it never goes to the Pod unseen): an unresolved or unreachable
/// gateway, a failed rewrite, or a size beyond the uplink's MTU, for which the sender
/// is told with ICMP, as a router would. `counter` is the slot a successful redirect is
/// counted in; `now` is the coarse clock, for the age of the cached gateway route.
#[inline(always)]
pub fn to_gateway(
    ctx: &TcContext,
    packet: &Packet,
    gateway: &Gateway,
    counter: Counter,
    now: u64,
) -> Outcome {
    let way = match gateway_route(ctx, packet, gateway, now) {
        Ok(Some(way)) => way,
        // A packet the kernel forwarded keeps its route to the Pod: queued for the
        // gateway's neighbour, it would go out with the Pod's MAC once resolved. The
        // daemon keeps the gateway's entry resolved instead.
        Ok(None) => return Outcome::drop(Counter::DroppedGatewayUnresolved),
        Err(reason) => return Outcome::drop(reason),
    };
    let ifindex = gateway.ifindex;
    if !fits(ctx, packet, ifindex, way.mtu) {
        return Outcome {
            counter: Counter::DroppedTooBig,
            action: send_too_big(ctx, packet, gateway, way.mtu),
            via_neighbour: false,
            ifindex: 0,
        };
    }
    if rewrite_macs(ctx, &way.macs).is_err() {
        return Outcome::drop(Counter::DroppedRewriteFailed);
    }
    // SAFETY: plain helper call.
    let action = unsafe { bpf_redirect(ifindex, 0) };
    Outcome::redirected(counter, action, false, ifindex)
}

/// Hands a packet that came back from the gateway to the destination Pod, as the
/// node's routing table says, without going through the node's stack again: the node
/// judged it on its way out. The way is the one the flow's last packets took while it
/// is fresh (see [`FlowStats::pod_route_lately`]), else the FIB's, kept in the flow
/// when resolved. `now` is the coarse clock, for the age of the cached routes.
#[inline(always)]
pub fn to_pod(
    ctx: &TcContext,
    packet: &Packet,
    uplink: u32,
    now: u64,
    flow: *mut FlowStats,
) -> Outcome {
    // SAFETY: a map value pointer from a successful lookup in this run.
    let flow = unsafe { &mut *flow };
    let way = match flow.pod_route_lately(now) {
        Some(way) => way,
        // A route back out of the uplink would loop; leave such packets to the kernel.
        None => match pod_route(ctx, packet.family, &packet.dst, uplink, now)
            .filter(|route| route.ifindex != uplink)
        {
            None => return Outcome::pass(Counter::PassNoPodRoute),
            Some(route) if route.resolved == 0 => {
                if let Err(reason) = decrement_ttl(ctx, packet) {
                    return Outcome::drop(reason);
                }
                let action = redirect_via_neighbour(route.ifindex);
                return Outcome::redirected(
                    Counter::DeliveredFromGateway,
                    action,
                    true,
                    route.ifindex,
                );
            }
            Some(route) => {
                let way = WayToPod {
                    ifindex: route.ifindex,
                    macs: route.macs,
                    veth: route.is_veth != 0,
                };
                flow.note_pod_route(&way, now);
                way
            }
        },
    };
    if let Err(reason) = decrement_ttl(ctx, packet) {
        return Outcome::drop(reason);
    }
    if rewrite_macs(ctx, &way.macs).is_err() {
        return Outcome::drop(Counter::DroppedRewriteFailed);
    }
    // SAFETY: plain helper calls.
    let action = unsafe {
        if way.veth {
            // Straight into the Pod's namespace, skipping the host veth's queue.
            bpf_redirect_peer(way.ifindex, 0)
        } else {
            bpf_redirect(way.ifindex, 0)
        }
    };
    Outcome::redirected(Counter::DeliveredFromGateway, action, false, way.ifindex)
}
