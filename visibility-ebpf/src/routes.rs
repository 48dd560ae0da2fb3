//! The FIB's answers for a family's gateway and for a Pod's address, reused per CPU
//! for [`ROUTE_CACHE_TTL_NS`]. The kernel's neighbour and routing tables stay the source of
//! truth. Only resolved gateway answers are kept, so an unresolved gateway is seen on
//! every packet. A FIB lookup per packet would cost about a quarter of what the
//! datapath spends on a packet.

use aya_ebpf::{
    bindings::{
        BPF_FIB_LKUP_RET_FRAG_NEEDED, BPF_FIB_LKUP_RET_NO_NEIGH, BPF_FIB_LKUP_RET_SUCCESS,
        BPF_FIB_LOOKUP_DIRECT, BPF_FIB_LOOKUP_OUTPUT,
    },
    programs::TcContext,
};
use visibility_common::{
    ROUTE_CACHE_TTL_NS,
    config::Gateway,
    counters::Counter,
    packet::{Family, Packet},
};

use crate::{
    fib::{fib_macs, fib_params, lookup},
    maps::{GATEWAY_ROUTES, POD_IFACES, POD_ROUTES},
    rewrite::Macs,
    types::{GatewayRoute, PodRoute, PodRouteKey},
};

impl GatewayRoute {
    /// Whether the answer is recent and for this gateway: its uplink and address, the
    /// first five words (the node's own address on the uplink does not change the way
    /// to it).
    #[inline(always)]
    fn is_fresh(&self, gateway: &Gateway, now: u64) -> bool {
        now.wrapping_sub(self.checked_ns) < ROUTE_CACHE_TTL_NS && {
            let (cached, asked) = (gateway_words(&self.gateway), gateway_words(gateway));
            (0..5).all(|word| cached[word] == asked[word])
        }
    }
}

const _: () = assert!(size_of::<Gateway>() == size_of::<[u32; 9]>());
const _: () = assert!(align_of::<Gateway>() >= align_of::<[u32; 9]>());

/// A gateway seen as words, in place, so that comparing two takes a load per word and
/// no copy of either.
#[inline(always)]
fn gateway_words(gateway: &Gateway) -> &[u32; 9] {
    // SAFETY: `Gateway` is `repr(C)`, 36 bytes without padding (a u32 and twice 16
    // bytes) aligned to 4 as `[u32; 9]` is, and every bit pattern is a valid `[u32; 9]`.
    unsafe { &*core::ptr::from_ref(gateway).cast::<[u32; 9]>() }
}

/// The way to the gateway: MACs and the uplink's MTU.
#[derive(Clone, Copy)]
pub struct ToGateway {
    pub macs: Macs,
    pub mtu: u32,
}

/// The MACs toward the gateway and the uplink's MTU: from this CPU's cache while it is
/// fresh, else from a FIB lookup on the uplink. `Ok(None)` when the gateway's
/// neighbour is unresolved.
#[inline(always)]
pub fn gateway_route(
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

impl PodRouteKey {
    /// The key of a Pod's address.
    #[inline(always)]
    pub fn new(family: Family, addr: &[u8; 16]) -> Self {
        Self {
            addr: *addr,
            family: family as u8,
            _pad: [0; 3],
        }
    }
}

/// This CPU's cached route to a Pod's address, however old: only resolved answers are
/// kept, and the MACs are those the FIB gave when it was kept. The map's value itself,
/// not a copy: the program's stack has no room to spare on the path that asks.
#[inline(always)]
pub fn cached_pod_route(family: Family, addr: &[u8; 16]) -> Option<&'static PodRoute> {
    let key = PodRouteKey::new(family, addr);
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
    let key = PodRouteKey::new(family, addr);
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
