//! L2/L3 rewrite and redirect: toward the gateway, and from the uplink to a Pod.

use core::mem::{size_of, zeroed};

use aya_ebpf::{
    bindings::{
        BPF_FIB_LKUP_RET_FRAG_NEEDED, BPF_FIB_LKUP_RET_NO_NEIGH, BPF_FIB_LKUP_RET_SUCCESS,
        BPF_FIB_LOOKUP_DIRECT, BPF_FIB_LOOKUP_OUTPUT, TC_ACT_SHOT, TC_ACT_UNSPEC,
        bpf_check_mtu_ret::BPF_MTU_CHK_RET_SUCCESS, bpf_fib_lookup as FibParams, bpf_redir_neigh,
    },
    helpers::{
        bpf_check_mtu, bpf_csum_diff, bpf_csum_update, bpf_fib_lookup, bpf_redirect,
        bpf_redirect_neigh, bpf_redirect_peer,
    },
    programs::TcContext,
};
use visibility_common::{
    ROUTE_CACHE_TTL_NS,
    config::Gateway,
    counters::Counter,
    flow::{FlowStats, WayToPod},
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

/// What passed packets return: `TC_ACT_UNSPEC`, which hands the packet on to the next
/// TC or TCX program on the hook (`TCX_NEXT`), if any, and then to the kernel.
/// `TC_ACT_OK` would end the chain, and a program attached after ours would never see
/// the packet.
pub const PASS: i32 = TC_ACT_UNSPEC;
/// What dropped packets return.
pub const DROP: i32 = TC_ACT_SHOT;

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

    pub const fn drop(counter: Counter) -> Self {
        Self {
            counter,
            action: DROP,
            via_neighbour: false,
            ifindex: 0,
        }
    }

    /// A redirect helper's result: `TC_ACT_SHOT` means it refused.
    fn redirected(counter: Counter, action: i64, via_neighbour: bool, ifindex: u32) -> Self {
        if action == i64::from(TC_ACT_SHOT) {
            return Self::drop(Counter::DroppedRewriteFailed);
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
/// through the store and checksum helpers. A packet whose driver supplied a checksum
/// of all its bytes (`CHECKSUM_COMPLETE`) keeps it valid: for IPv4 the header checksum
/// moves opposite to the TTL, so the bytes sum as before; an IPv6 header has no
/// checksum, so `skb->csum` is moved by the hop limit's change (as Cilium's
/// `ipv6_dec_hoplimit` does through `BPF_F_RECOMPUTE_CSUM`).
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

/// Destination and source MAC, in the order of the Ethernet header.
pub type Macs = [u8; 12];

#[inline(always)]
fn fib_macs(params: &FibParams) -> Macs {
    let mut macs = [0u8; 12];
    macs[..6].copy_from_slice(&params.dmac);
    macs[6..].copy_from_slice(&params.smac);
    macs
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

// FIB answers are reused for `ROUTE_CACHE_TTL_NS`, per CPU: for a family's gateway,
// and for a Pod's address. The kernel's neighbour and routing tables stay the source of
// truth. Only resolved gateway answers are kept, so an unresolved gateway is seen on
// every packet. A FIB lookup per packet would cost about a quarter of what the
// datapath spends on a packet.

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
    /// The uplink's MTU: larger packets cannot go out whole.
    mtu: u32,
}

impl GatewayRoute {
    /// The map index of a family's entry.
    pub const fn slot(family: Family) -> u32 {
        match family {
            Family::V4 => 0,
            Family::V6 => 1,
        }
    }

    /// Whether the answer is recent and for this gateway: its uplink and address, the
    /// first five words (the node's own address on the uplink does not change the way
    /// to it).
    #[inline(always)]
    fn is_fresh(&self, gateway: &Gateway, now: u64) -> bool {
        now.wrapping_sub(self.checked_ns) < ROUTE_CACHE_TTL_NS
            && gateway_words(&self.gateway)[..5] == gateway_words(gateway)[..5]
    }
}

/// A gateway as words, so that comparing two takes a load per word, not per byte.
#[inline(always)]
fn gateway_words(gateway: &Gateway) -> [u32; 9] {
    // SAFETY: `Gateway` is `repr(C)`, 36 bytes without padding (a u32 and twice 16
    // bytes), and every bit pattern is a valid `[u32; 9]`.
    unsafe { core::mem::transmute::<Gateway, [u32; 9]>(*gateway) }
}

/// The way to the gateway: MACs and the uplink's MTU.
#[derive(Clone, Copy)]
struct ToGateway {
    macs: Macs,
    mtu: u32,
}

/// The MACs toward the gateway and the uplink's MTU: from this CPU's cache while it is
/// fresh, else from a FIB lookup on the uplink. `Ok(None)` when the gateway's
/// neighbour is unresolved.
#[inline(always)]
fn gateway_route(
    ctx: &TcContext,
    packet: &Packet,
    gateway: &Gateway,
    now: u64,
) -> Result<Option<ToGateway>, Counter> {
    let cached = GATEWAY_ROUTES.get_ptr_mut(GatewayRoute::slot(packet.family));
    // SAFETY: per-CPU slot, and programs are not preempted on one CPU.
    if let Some(route) = cached.map(|route| unsafe { &*route })
        && route.is_fresh(gateway, now)
    {
        return Ok(Some(ToGateway {
            macs: route.macs,
            mtu: route.mtu,
        }));
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
    // Without `tot_len` the helper checks this skb against the output device's MTU:
    // FRAG_NEEDED is a complete answer for a packet that is too big.
    if rc != i64::from(BPF_FIB_LKUP_RET_SUCCESS) && rc != i64::from(BPF_FIB_LKUP_RET_FRAG_NEEDED) {
        return Err(Counter::DroppedNoGatewayRoute);
    }
    let way = ToGateway {
        macs: fib_macs(&params),
        // Without `tot_len` the helper reports the output device's MTU.
        // SAFETY: a union of two u16s; the helper wrote `mtu_result`.
        mtu: u32::from(unsafe { params.__bindgen_anon_1.mtu_result }),
    };
    if let Some(route) = cached {
        // SAFETY: as above.
        unsafe {
            *route = GatewayRoute {
                checked_ns: now,
                gateway: *gateway,
                macs: way.macs,
                mtu: way.mtu,
            }
        };
    }
    Ok(Some(way))
}

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
            action: crate::icmp::send_too_big(ctx, packet, gateway, way.mtu),
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

/// Key of [`crate::maps::POD_ROUTES`]: a Pod's address.
#[repr(C)]
#[derive(Clone, Copy)]
pub struct PodRouteKey {
    addr: [u8; 16],
    family: u8,
    _pad: [u8; 3],
}

/// One CPU's last FIB answer for a Pod's address, with what a redirect needs: the
/// value of [`crate::maps::POD_ROUTES`].
#[repr(C)]
#[derive(Clone, Copy)]
pub struct PodRoute {
    /// When the FIB answered (coarse monotonic nanoseconds).
    checked_ns: u64,
    /// The node's interface toward the Pod.
    pub ifindex: u32,
    /// The Pod's MAC and the interface's, in the order of the Ethernet header.
    pub macs: Macs,
    /// 1 when that interface was a Pod veth (in the Pod-interface map) when the FIB
    /// answered: its peer can be handed the packet.
    is_veth: u8,
    /// 1 when the Pod's neighbour entry was resolved (the MACs are valid).
    resolved: u8,
    _pad: [u8; 6],
}

/// This CPU's cached route to a Pod's address, however old: only resolved answers are
/// kept, and the MACs are those the FIB gave when it was kept. The map's value itself,
/// not a copy: the program's stack has no room to spare on the path that asks.
#[inline(always)]
pub fn cached_pod_route(family: Family, addr: &[u8; 16]) -> Option<&'static PodRoute> {
    let key = PodRouteKey {
        addr: *addr,
        family: family as u8,
        _pad: [0; 3],
    };
    // SAFETY: a CPU only writes its own copy, and this program run is that CPU's only
    // user of it until it ends.
    unsafe { POD_ROUTES.get(key) }
}

/// Where the node routes a Pod's address: from this CPU's cache while it is fresh,
/// else from a FIB lookup of the main table as if the packet came in on
/// `from_ifindex`. `None` when the node has no route.
#[inline(always)]
pub fn pod_route(
    ctx: &TcContext,
    family: Family,
    addr: &[u8; 16],
    from_ifindex: u32,
    now: u64,
) -> Option<PodRoute> {
    let key = PodRouteKey {
        addr: *addr,
        family: family as u8,
        _pad: [0; 3],
    };
    // SAFETY: the value is copied out at once; a CPU only writes its own copy.
    if let Some(route) = unsafe { POD_ROUTES.get(key) }
        && now.wrapping_sub(route.checked_ns) < ROUTE_CACHE_TTL_NS
    {
        return Some(*route);
    }
    let unspecified = [0u8; 16];
    let mut params = fib_params(family, from_ifindex, &unspecified, addr);
    // A nominal length, so that the helper checks that and not this skb against the
    // route's MTU: a large packet must not make a Pod look unrouted.
    params.__bindgen_anon_1.tot_len = 1;
    let rc = lookup(ctx, &mut params, BPF_FIB_LOOKUP_DIRECT);
    let resolved = rc == i64::from(BPF_FIB_LKUP_RET_SUCCESS);
    if !resolved && rc != i64::from(BPF_FIB_LKUP_RET_NO_NEIGH) {
        return None;
    }
    let target = params.ifindex;
    // SAFETY: map lookup by value.
    let is_veth = unsafe { POD_IFACES.get(target) }.is_some_and(|iface| iface.is_veth != 0);
    let route = PodRoute {
        checked_ns: now,
        ifindex: target,
        macs: fib_macs(&params),
        is_veth: u8::from(is_veth),
        resolved: u8::from(resolved),
        _pad: [0; 6],
    };
    // An unresolved answer is not kept: the next packet asks again, and finds the
    // neighbour once the kernel has resolved it. Best effort: without the entry the
    // next packet asks the FIB again.
    if resolved {
        let _ = POD_ROUTES.insert(key, route, 0);
    }
    Some(route)
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
