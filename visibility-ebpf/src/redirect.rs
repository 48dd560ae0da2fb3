//! L2/L3 rewrite and redirect: toward the gateway, and from the uplink to a Pod.

use core::mem::{size_of, zeroed};

use aya_ebpf::{
    bindings::{
        BPF_FIB_LKUP_RET_NO_NEIGH, BPF_FIB_LKUP_RET_SUCCESS, BPF_FIB_LOOKUP_DIRECT,
        BPF_FIB_LOOKUP_OUTPUT, TC_ACT_OK, TC_ACT_SHOT, bpf_fib_lookup as FibParams,
        bpf_redir_neigh,
    },
    helpers::{bpf_fib_lookup, bpf_redirect, bpf_redirect_neigh, bpf_redirect_peer},
    programs::TcContext,
};
use visibility_common::{
    ROUTE_CACHE_TTL_NS,
    config::Gateway,
    counters::Counter,
    packet::{
        Family, IPV4_CHECKSUM_OFFSET, IPV4_TTL_OFFSET, IPV6_HOP_LIMIT_OFFSET, Packet,
        checksum_replace16,
    },
};

use crate::{
    maps::{GATEWAY_ROUTES, POD_IFACES, POD_ROUTES},
    reader::packet_ptr,
};

const AF_INET: u8 = 2;
const AF_INET6: u8 = 10;
/// `BPF_F_PSEUDO_HDR` is not needed: the TTL is not part of any pseudo-header.
const CSUM_SIZE_16: u64 = 2;

pub const PASS: i32 = TC_ACT_OK;

/// What happened to a packet. Every field is set on every path: the verifier rejects
/// programs that spill registers LLVM left undefined, which enum payloads invite.
#[derive(Clone, Copy)]
pub struct Outcome {
    /// The slot the packet is counted in: the verdict, or why it was passed.
    pub counter: Counter,
    /// The program's return value.
    pub action: i32,
    /// The neighbour was unresolved; the kernel resolves it, then sends.
    pub via_neighbour: bool,
    /// The interface the packet leaves on, 0 when passed.
    pub ifindex: u32,
}

impl Outcome {
    pub const fn pass(counter: Counter) -> Self {
        Self {
            counter,
            action: PASS,
            via_neighbour: false,
            ifindex: 0,
        }
    }

    /// A redirect helper's result: `TC_ACT_SHOT` means it refused.
    fn redirected(counter: Counter, action: i64, via_neighbour: bool, ifindex: u32) -> Self {
        if action == i64::from(TC_ACT_SHOT) {
            return Self::pass(Counter::PassRouteLookupFailed);
        }
        Self {
            counter,
            action: action as i32,
            via_neighbour,
            ifindex,
        }
    }
}

#[inline(always)]
fn fib_params(family: Family, ifindex: u32, src: &[u8; 16], dst: &[u8; 16]) -> FibParams {
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

/// An address as the kernel's `__be32[4]`: the bytes in order, whatever the host's order.
#[inline(always)]
fn words(addr: &[u8; 16]) -> [u32; 4] {
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

/// Looks up the main table directly: the gateway's connected route and the Pods' host
/// routes live there, and skipping the policy rules saves their walk on every packet
/// (the kernel keeps walking them once any rule was ever added to the namespace).
#[inline(always)]
fn lookup(ctx: &TcContext, params: &mut FibParams, flags: u32) -> i64 {
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

/// Spends one hop: IPv4 TTL (with an incremental checksum update) or IPv6 hop limit.
/// Writes straight into the packet when the header is in the linear data, else
/// through the store and checksum helpers.
#[inline(always)]
fn decrement_ttl(ctx: &TcContext, packet: &Packet) -> Result<(), Counter> {
    let Some(ttl) = packet.ttl.checked_sub(1) else {
        return Err(Counter::PassTtlExpired);
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
                .map_err(|_| Counter::PassMalformed)?;
            ctx.l3_csum_replace(
                IPV4_CHECKSUM_OFFSET,
                u64::from(old.to_be()),
                u64::from(new.to_be()),
                CSUM_SIZE_16,
            )
            .map_err(|_| Counter::PassMalformed)?;
        }
        // Next header and hop limit, as one pair: the verifier follows a two-byte
        // bounds check better than the one-byte form LLVM makes of a single byte.
        Family::V6 => match packet_ptr::<[u8; 2]>(ctx, IPV6_HOP_LIMIT_OFFSET - 1) {
            // SAFETY: `packet_ptr` checked both bytes are in the linear data.
            Some(pair) => unsafe {
                let [next_header, _] = pair.read_unaligned();
                pair.write_unaligned([next_header, ttl]);
            },
            None => ctx
                .store(IPV6_HOP_LIMIT_OFFSET, &ttl, 0)
                .map_err(|_| Counter::PassMalformed)?,
        },
    }
    Ok(())
}

/// Destination and source MAC, in the order of the Ethernet header.
type Macs = [u8; 12];

#[inline(always)]
fn fib_macs(params: &FibParams) -> Macs {
    let mut macs = [0u8; 12];
    macs[..6].copy_from_slice(&params.dmac);
    macs[6..].copy_from_slice(&params.smac);
    macs
}

#[inline(always)]
fn rewrite_macs(ctx: &TcContext, macs: &Macs) -> Result<(), Counter> {
    match packet_ptr::<Macs>(ctx, 0) {
        // SAFETY: `packet_ptr` checked the Ethernet addresses are in the linear data.
        Some(header) => unsafe { header.write_unaligned(*macs) },
        None => ctx.store(0, macs, 0).map_err(|_| Counter::PassMalformed)?,
    }
    Ok(())
}

// FIB answers are reused for `ROUTE_CACHE_TTL_NS`, per CPU: for a family's gateway,
// and for a Pod's address. The kernel's neighbour and routing tables stay the source of
// truth. Only resolved answers are kept, so an unresolved neighbour is seen, and
// resolved by the kernel, on every packet. A FIB lookup per packet would cost about a
// quarter of what the datapath spends on a packet.

/// One CPU's last FIB answer for one family's gateway: the value of
/// [`crate::maps::GATEWAY_ROUTES`].
#[repr(C)]
#[derive(Clone, Copy)]
pub struct GatewayRoute {
    /// When the FIB answered (coarse monotonic nanoseconds); 0 before the first time.
    checked_ns: u64,
    /// The gateway the answer is for.
    gateway: Gateway,
    macs: Macs,
}

impl GatewayRoute {
    /// The map index of a family's entry.
    pub const fn slot(family: Family) -> u32 {
        match family {
            Family::V4 => 0,
            Family::V6 => 1,
        }
    }

    #[inline(always)]
    fn is_fresh(&self, gateway: &Gateway, now: u64) -> bool {
        now.wrapping_sub(self.checked_ns) < ROUTE_CACHE_TTL_NS
            && gateway_words(&self.gateway) == gateway_words(gateway)
    }
}

/// A gateway as five words, so that comparing two is five loads, not twenty.
#[inline(always)]
fn gateway_words(gateway: &Gateway) -> [u32; 5] {
    // SAFETY: `Gateway` is `repr(C)`, 20 bytes without padding (a u32 and 16 bytes),
    // and every bit pattern is a valid `[u32; 5]`.
    unsafe { core::mem::transmute::<Gateway, [u32; 5]>(*gateway) }
}

/// The MACs toward the gateway: from this CPU's cache while it is fresh, else from a
/// FIB lookup on the uplink. `Ok(None)` when the gateway's neighbour is unresolved.
#[inline(always)]
fn gateway_macs(
    ctx: &TcContext,
    packet: &Packet,
    gateway: &Gateway,
    now: u64,
) -> Result<Option<Macs>, Counter> {
    let cached = GATEWAY_ROUTES.get_ptr_mut(GatewayRoute::slot(packet.family));
    // SAFETY: per-CPU slot, and programs are not preempted on one CPU.
    if let Some(route) = cached.map(|route| unsafe { &*route })
        && route.is_fresh(gateway, now)
    {
        return Ok(Some(route.macs));
    }
    // The gateway is on the uplink's link, so an output lookup on the uplink finds
    // its neighbour entry, link-local IPv6 gateways included.
    let mut params = fib_params(packet.family, gateway.ifindex, &packet.src, &gateway.addr);
    let rc = lookup(
        ctx,
        &mut params,
        BPF_FIB_LOOKUP_OUTPUT | BPF_FIB_LOOKUP_DIRECT,
    );
    if rc == i64::from(BPF_FIB_LKUP_RET_NO_NEIGH) {
        return Ok(None);
    }
    if rc != i64::from(BPF_FIB_LKUP_RET_SUCCESS) {
        return Err(Counter::PassRouteLookupFailed);
    }
    let macs = fib_macs(&params);
    if let Some(route) = cached {
        // SAFETY: as above.
        unsafe {
            *route = GatewayRoute {
                checked_ns: now,
                gateway: *gateway,
                macs,
            }
        };
    }
    Ok(Some(macs))
}

#[inline(always)]
fn redirect_via_neighbour(ifindex: u32, neighbour: Option<(Family, &[u8; 16])>) -> i64 {
    // SAFETY: a plain C struct for which all-zero is a valid value.
    let mut nh: bpf_redir_neigh = unsafe { zeroed() };
    let (ptr, len) = match neighbour {
        Some((Family::V4, addr)) => {
            nh.nh_family = u32::from(AF_INET);
            nh.__bindgen_anon_1.ipv4_nh = u32::from_ne_bytes([addr[0], addr[1], addr[2], addr[3]]);
            (
                &mut nh as *mut bpf_redir_neigh,
                size_of::<bpf_redir_neigh>() as i32,
            )
        }
        Some((Family::V6, addr)) => {
            nh.nh_family = u32::from(AF_INET6);
            nh.__bindgen_anon_1.ipv6_nh = words(addr);
            (
                &mut nh as *mut bpf_redir_neigh,
                size_of::<bpf_redir_neigh>() as i32,
            )
        }
        // No explicit next hop: the kernel uses the packet's destination.
        None => (core::ptr::null_mut(), 0),
    };
    // SAFETY: `ptr` is null with length 0, or points at an initialised bpf_redir_neigh.
    unsafe { bpf_redirect_neigh(ifindex, ptr, len, 0) }
}

/// Sends the packet out of the family's uplink toward its gateway, as a router would:
/// the gateway's MAC as destination, the uplink's as source, and with `spend_hop` one
/// hop less. The kernel has already spent the hop of packets it forwarded itself.
/// `counter` is the slot a successful redirect is counted in; `now` is the coarse
/// clock, for the age of the cached gateway route.
#[inline(always)]
pub fn to_gateway(
    ctx: &TcContext,
    packet: &Packet,
    gateway: &Gateway,
    spend_hop: bool,
    counter: Counter,
    now: u64,
) -> Outcome {
    let macs = match gateway_macs(ctx, packet, gateway, now) {
        Ok(macs) => macs,
        Err(reason) => return Outcome::pass(reason),
    };
    if spend_hop && let Err(reason) = decrement_ttl(ctx, packet) {
        return Outcome::pass(reason);
    }
    let ifindex = gateway.ifindex;
    let Some(macs) = macs else {
        // A packet the kernel forwarded (egress) keeps its route to the Pod: queued for
        // the gateway's neighbour, it would go out with the Pod's MAC once resolved.
        if !spend_hop {
            return Outcome::pass(Counter::PassGatewayUnresolved);
        }
        let action = redirect_via_neighbour(ifindex, Some((packet.family, &gateway.addr)));
        return Outcome::redirected(counter, action, true, ifindex);
    };
    if let Err(reason) = rewrite_macs(ctx, &macs) {
        return Outcome::pass(reason);
    }
    // SAFETY: plain helper call.
    let action = unsafe { bpf_redirect(ifindex, 0) };
    Outcome::redirected(counter, action, false, ifindex)
}

/// Key of [`crate::maps::POD_ROUTES`]: a Pod's address.
#[repr(C)]
#[derive(Clone, Copy)]
pub struct PodRouteKey {
    addr: [u8; 16],
    family: u8,
    _pad: [u8; 3],
}

/// One CPU's last resolved FIB answer for a Pod's address, with what the redirect
/// needs: the value of [`crate::maps::POD_ROUTES`].
#[repr(C)]
#[derive(Clone, Copy)]
pub struct PodRoute {
    /// When the FIB answered (coarse monotonic nanoseconds).
    checked_ns: u64,
    /// The node's interface toward the Pod.
    ifindex: u32,
    macs: Macs,
    /// 1 when that interface was a Pod veth (in the Pod-interface map) when the FIB
    /// answered: its peer can be handed the packet.
    is_veth: u8,
    _pad: [u8; 7],
}

/// Where a packet for a Pod leaves: from this CPU's cache while it is fresh, else from
/// a FIB lookup as if the packet were routed from the uplink. `Ok(Err(ifindex))` when
/// the Pod's neighbour on that interface is unresolved.
#[inline(always)]
fn pod_route(
    ctx: &TcContext,
    packet: &Packet,
    uplink: u32,
    now: u64,
) -> Result<Result<PodRoute, u32>, Counter> {
    let key = PodRouteKey {
        addr: packet.dst,
        family: packet.family as u8,
        _pad: [0; 3],
    };
    // SAFETY: the value is copied out at once; a CPU only writes its own copy.
    if let Some(route) = unsafe { POD_ROUTES.get(key) }
        && now.wrapping_sub(route.checked_ns) < ROUTE_CACHE_TTL_NS
    {
        return Ok(Ok(*route));
    }
    let mut params = fib_params(packet.family, uplink, &packet.src, &packet.dst);
    let rc = lookup(ctx, &mut params, BPF_FIB_LOOKUP_DIRECT);
    let target = params.ifindex;
    let found =
        rc == i64::from(BPF_FIB_LKUP_RET_SUCCESS) || rc == i64::from(BPF_FIB_LKUP_RET_NO_NEIGH);
    // A route back out of the uplink would loop; leave such packets to the kernel.
    if !found || target == uplink {
        return Err(Counter::PassRouteLookupFailed);
    }
    if rc == i64::from(BPF_FIB_LKUP_RET_NO_NEIGH) {
        return Ok(Err(target));
    }
    // SAFETY: map lookup by value.
    let is_veth = unsafe { POD_IFACES.get(target) }.is_some_and(|iface| iface.is_veth != 0);
    let route = PodRoute {
        checked_ns: now,
        ifindex: target,
        macs: fib_macs(&params),
        is_veth: u8::from(is_veth),
        _pad: [0; 7],
    };
    // Best effort: without the entry the next packet asks the FIB again.
    let _ = POD_ROUTES.insert(key, route, 0);
    Ok(Ok(route))
}

/// Hands a packet that came back from the gateway to the destination Pod, as the
/// node's routing table says, without going through the node's stack again: strict
/// reverse-path filtering and a second conntrack entry would otherwise get in the way.
/// `now` is the coarse clock, for the age of the cached route.
#[inline(always)]
pub fn to_pod(ctx: &TcContext, packet: &Packet, uplink: u32, now: u64) -> Outcome {
    let route = match pod_route(ctx, packet, uplink, now) {
        Ok(route) => route,
        Err(reason) => return Outcome::pass(reason),
    };
    if let Err(reason) = decrement_ttl(ctx, packet) {
        return Outcome::pass(reason);
    }
    let counter = Counter::DeliveredFromGateway;
    let route = match route {
        Ok(route) => route,
        Err(target) => {
            let action = redirect_via_neighbour(target, None);
            return Outcome::redirected(counter, action, true, target);
        }
    };
    if let Err(reason) = rewrite_macs(ctx, &route.macs) {
        return Outcome::pass(reason);
    }
    // SAFETY: plain helper calls.
    let action = unsafe {
        if route.is_veth != 0 {
            // Straight into the Pod's namespace, skipping the host veth's queue.
            bpf_redirect_peer(route.ifindex, 0)
        } else {
            bpf_redirect(route.ifindex, 0)
        }
    };
    Outcome::redirected(counter, action, false, route.ifindex)
}

/// Forwards a packet as a router would, when the FIB has a route for it out of an
/// interface with a resolved neighbour: one hop spent, MACs from the FIB, sent out
/// with `bpf_redirect`. Returns the program's action; anything else is passed.
#[inline(always)]
pub fn route(ctx: &TcContext, packet: &Packet) -> i32 {
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
