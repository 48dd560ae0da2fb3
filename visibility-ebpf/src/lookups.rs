//! Answers the verdict's questions from the maps, the routing table and the skb.

use core::cell::Cell;

use aya_ebpf::{maps::lpm_trie::Key, programs::TcContext};
use visibility_common::{
    RETURN_WINDOW_NS,
    config::{PodIface, Settings},
    flow::{FlowKey, FlowStats},
    packet::{Family, Packet},
    verdict::{AddrKind, Lookups, NodeNat},
};

use crate::{
    maps::{EXEMPT_V4, EXEMPT_V6, FLOWS, POD_CIDRS_V4, POD_CIDRS_V6, POD_IFACES},
    routes::pod_route,
    types::PreStack,
};

/// The lookups of one program run.
pub struct MapLookups<'a> {
    pub settings: &'a Settings,
    pub ctx: &'a TcContext,
    /// The interface the packet entered the node on (`skb->skb_iif`).
    pub ingress_ifindex: u32,
    /// The coarse clock, read once per run.
    pub now: u64,
    /// The Pod interface the packet entered on, once asked.
    sender: Cell<Option<PodIface>>,
    /// The packet's flow, once found: by [`Lookups::judged_own_pod_flow`] at
    /// `pod_egress`, by [`Lookups::was_sent`] at the uplink.
    flow: Cell<Option<*mut FlowStats>>,
    /// `pod_egress`: what `pod_ingress` noted of this packet, if it did.
    pub pre_stack: Option<&'static PreStack>,
}

impl<'a> MapLookups<'a> {
    #[inline(always)]
    pub fn new(settings: &'a Settings, ctx: &'a TcContext, now: u64) -> Self {
        // SAFETY: the context pointer is valid for the whole program run.
        let ingress_ifindex = unsafe { (*ctx.skb.skb).ingress_ifindex };
        Self {
            settings,
            ctx,
            ingress_ifindex,
            now,
            sender: Cell::new(None),
            flow: Cell::new(None),
            pre_stack: None,
        }
    }

    /// Whether the node routes `addr` to the interface the packet entered on (or to that
    /// interface's bridge), as strict rp_filter requires.
    #[inline(always)]
    fn routes_to_sender(&self, family: Family, addr: &[u8; 16]) -> bool {
        let Some(sender) = self.sender.get() else {
            return false;
        };
        // SAFETY: the context pointer is valid for the whole program run.
        let here = unsafe { (*self.ctx.skb.skb).ifindex };
        // 0: an entry written before the field existed; the interface itself.
        let expected = match sender.route_ifindex {
            0 => self.ingress_ifindex,
            ifindex => ifindex,
        };
        pod_route(self.ctx, family, addr, here, self.now)
            .is_some_and(|route| route.ifindex == expected)
    }

    /// Forgets the Pod interface the packet entered on, once the verdict is made.
    #[inline(always)]
    pub fn forget_sender(&self) {
        self.sender.set(None);
    }

    /// The flow [`Lookups::judged_own_pod_flow`] or [`Lookups::was_sent`] found.
    #[inline(always)]
    pub fn flow(&self) -> Option<*mut FlowStats> {
        self.flow.get()
    }

    /// Forgets the flow found: the packet was rewritten into another flow's.
    #[inline(always)]
    pub fn forget_flow(&self) {
        self.flow.set(None);
    }
}

fn v4(addr: &[u8; 16]) -> [u8; 4] {
    [addr[0], addr[1], addr[2], addr[3]]
}

impl Lookups for MapLookups<'_> {
    #[inline(always)]
    fn enabled(&self) -> bool {
        self.settings.enabled != 0
    }

    #[inline(always)]
    fn addr_kind(&self, family: Family, addr: &[u8; 16]) -> AddrKind {
        let entry = match family {
            Family::V4 => POD_CIDRS_V4.get(Key::new(32, v4(addr))),
            Family::V6 => POD_CIDRS_V6.get(Key::new(128, *addr)),
        };
        AddrKind::of_entry(entry.copied())
    }

    #[inline(always)]
    fn is_exempt(&self, family: Family, addr: &[u8; 16], protocol: u8, port: u16) -> bool {
        if self.settings.has_exemptions == 0 {
            return false;
        }
        let rules = match family {
            Family::V4 => EXEMPT_V4.get(Key::new(32, v4(addr))),
            Family::V6 => EXEMPT_V6.get(Key::new(128, *addr)),
        };
        rules.is_some_and(|rules| rules.matches(protocol, port))
    }

    #[inline(always)]
    fn has_gateway(&self, family: Family) -> bool {
        self.settings.gateway(family).is_configured()
    }

    #[inline(always)]
    fn judged_own_pod_flow(&self, packet: &Packet) -> bool {
        if !crate::takes_flow_shortcuts() {
            return false;
        }
        let Some(stats) = FLOWS.get_ptr_mut(FlowKey::from_packet(packet)) else {
            return false;
        };
        self.flow.set(Some(stats));
        // SAFETY: map value pointer from a successful lookup; reads of plain fields.
        unsafe { (*stats).judged_lately(self.ingress_ifindex, self.now) }
    }

    #[inline(always)]
    fn entered_from_pod(&self) -> bool {
        // SAFETY: map lookup by value, copied out at once.
        let sender = unsafe { POD_IFACES.get(self.ingress_ifindex) }.copied();
        self.sender.set(sender);
        sender.is_some()
    }

    #[inline(always)]
    fn source_routes_to_sender(&self, packet: &Packet) -> bool {
        self.routes_to_sender(packet.family, &packet.src)
    }

    #[inline(always)]
    fn node_nat(&self, packet: &Packet) -> NodeNat {
        self.pre_stack
            .map_or(NodeNat::Unknown, |pre| pre.compare(packet))
    }

    #[inline(always)]
    fn noted_source_routes_to_sender(&self, packet: &Packet) -> bool {
        match self.pre_stack {
            Some(pre) => self.routes_to_sender(packet.family, &pre.source().0),
            None => false,
        }
    }

    #[inline(always)]
    fn was_sent(&self, packet: &Packet) -> bool {
        let Some(stats) = FLOWS.get_ptr_mut(FlowKey::from_packet(packet)) else {
            return false;
        };
        // SAFETY: map value pointer from a successful lookup; read of two plain fields.
        let (path, last_sent) = unsafe { ((*stats).path(), (*stats).last_seen_ns) };
        let sent = path.is_some_and(|path| path.takes_gateway())
            && self.now.wrapping_sub(last_sent) < RETURN_WINDOW_NS;
        if sent {
            self.flow.set(Some(stats));
        }
        sent
    }
}
