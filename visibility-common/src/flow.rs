//! Per-flow counters kept by the datapath.

use crate::{
    counters::Counter,
    packet::{Family, Packet},
};

/// One direction of a conversation.
///
/// Aligned to 8 bytes (its size is a multiple of 8, so the layout is the same): the
/// datapath copies keys, and the BPF target copies an under-aligned value byte by byte.
#[repr(C, align(8))]
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub struct FlowKey {
    /// IPv4 in the first four bytes, the rest zero.
    pub src_addr: [u8; 16],
    pub dst_addr: [u8; 16],
    /// TCP/UDP port, or the ICMP echo identifier.
    pub src_port: u16,
    /// TCP/UDP port, or the ICMP `type << 8 | code`.
    pub dst_port: u16,
    /// 4 or 6.
    pub family: u8,
    /// IANA protocol number.
    pub protocol: u8,
    pub _pad: [u8; 2],
}

impl FlowKey {
    pub fn from_packet(packet: &Packet) -> Self {
        Self {
            src_addr: packet.src,
            dst_addr: packet.dst,
            src_port: packet.src_port,
            dst_port: packet.dst_port,
            family: packet.family as u8,
            protocol: packet.protocol,
            _pad: [0; 2],
        }
    }

    pub fn family(&self) -> Option<Family> {
        match self.family {
            4 => Some(Family::V4),
            6 => Some(Family::V6),
            _ => None,
        }
    }
}

/// The path a flow took.
#[repr(u8)]
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub enum Path {
    /// Sent from a Pod to the gateway, after the node's stack, and back to the Pod.
    ViaGateway = 1,
    /// Service traffic: sent to the gateway after the node's DNAT chose a Pod here.
    ViaGatewayServiceLeg = 2,
    /// A Service backend's replies: sent to the gateway with the backend Pod's source,
    /// the Service's source put back when they return.
    ViaGatewayServiceReply = 3,
    /// Stayed on the node because an exempt range covers it.
    Exempt = 4,
    /// Its destination is not a Pod on this node.
    NotSameNode = 5,
    /// Stayed on the node for another reason (visibility off, no gateway, a spoofed
    /// source, a reply whose source cannot be put back).
    Local = 6,
    /// Dropped on the way to the gateway (gateway unresolved or unreachable, larger
    /// than the uplink's MTU, a failed rewrite).
    Dropped = 7,
}

impl Path {
    pub const fn from_u8(value: u8) -> Option<Self> {
        Some(match value {
            1 => Path::ViaGateway,
            2 => Path::ViaGatewayServiceLeg,
            3 => Path::ViaGatewayServiceReply,
            4 => Path::Exempt,
            5 => Path::NotSameNode,
            6 => Path::Local,
            7 => Path::Dropped,
            _ => return None,
        })
    }

    /// A stable snake_case name for the CLI, records and metrics.
    pub const fn name(self) -> &'static str {
        match self {
            Path::ViaGateway => "via_gateway",
            Path::ViaGatewayServiceLeg => "via_gateway_service_leg",
            Path::ViaGatewayServiceReply => "via_gateway_service_reply",
            Path::Exempt => "exempt",
            Path::NotSameNode => "not_same_node",
            Path::Local => "local",
            Path::Dropped => "dropped",
        }
    }

    /// Whether packets of the flow go out to the gateway, so that the uplink hands
    /// what comes back to the Pod.
    pub const fn takes_gateway(self) -> bool {
        matches!(
            self,
            Path::ViaGateway | Path::ViaGatewayServiceLeg | Path::ViaGatewayServiceReply
        )
    }

    /// The path of a packet that a Pod sent, from the verdict counter of its outcome.
    /// `None` for traffic that is not a Pod flow (link-scope, node-address,
    /// unparsable), for what `pod_ingress` hands to the node's stack (judged again
    /// at egress) and for packets coming back from the gateway.
    pub const fn of_sent(counter: Counter) -> Option<Self> {
        match counter {
            Counter::RedirectedToGateway => Some(Path::ViaGateway),
            Counter::RedirectedServiceLeg => Some(Path::ViaGatewayServiceLeg),
            Counter::RedirectedServiceReply => Some(Path::ViaGatewayServiceReply),
            Counter::PassExempt => Some(Path::Exempt),
            Counter::PassNotSameNode => Some(Path::NotSameNode),
            Counter::PassDisabled
            | Counter::PassNoGateway
            | Counter::PassSpoofedSource
            | Counter::PassServiceReplyUnrestorable => Some(Path::Local),
            Counter::DroppedGatewayUnresolved
            | Counter::DroppedNoGatewayRoute
            | Counter::DroppedRewriteFailed
            | Counter::DroppedTooBig => Some(Path::Dropped),
            _ => None,
        }
    }
}

/// Counters of one flow. Times are `CLOCK_MONOTONIC` nanoseconds, read coarsely (to
/// the scheduler tick).
#[repr(C)]
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct FlowStats {
    /// Packets the source sent (GSO super-packets count as their segments), counted
    /// after the node's stack for Pod-to-Pod flows.
    pub packets: u64,
    /// IP bytes the source sent, headers included, as on the wire.
    pub bytes: u64,
    /// Of those, packets that came back from the gateway and reached the Pod.
    pub returned_packets: u64,
    pub returned_bytes: u64,
    pub first_seen_ns: u64,
    /// When the source last sent a packet of the flow: the uplink hands back only
    /// packets of flows sent to the gateway within [`crate::RETURN_WINDOW_NS`].
    pub last_seen_ns: u64,
    /// The Pod interface the flow entered the node on.
    pub ingress_ifindex: u32,
    /// The interface the flow was delivered to after the gateway.
    pub egress_ifindex: u32,
    /// Every TCP flag seen, OR-ed together.
    pub tcp_flags: u8,
    /// A [`Path`].
    pub path: u8,
    pub _pad: [u8; 2],
    /// When `pod_egress` last judged the flow own-Pod-to-Pod from `ingress_ifindex`
    /// with every lookup (see [`crate::verdict::Lookups::judged_own_pod_flow`]), as
    /// [`judged_at`]; 0 when it never did.
    pub judged_at: u32,
    /// The way the uplink hands the flow's returning packets to their Pod, as the FIB
    /// last answered: the destination Pod's MAC and the node's, in the order of the
    /// Ethernet header, out of `egress_ifindex`. Reused for
    /// [`crate::ROUTE_CACHE_TTL_NS`] (see [`FlowStats::pod_route_lately`]), so that a
    /// returning packet needs no lookup besides its flow's.
    pub pod_macs: [u8; 12],
    /// When the FIB gave `pod_macs`, as [`judged_at`]; 0 before it did.
    pub pod_route_at: u32,
    /// 1 when `egress_ifindex` is a Pod veth, whose peer can be handed the packet.
    pub pod_route_veth: u8,
    pub _pad_route: [u8; 7],
}

/// A resolved way to a Pod: its interface, the MACs, and whether the interface is a
/// Pod veth (see [`FlowStats::pod_macs`]).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct WayToPod {
    pub ifindex: u32,
    pub macs: [u8; 12],
    pub veth: bool,
}

/// A coarse clock reading in units of 2^20 ns (about a millisecond), as
/// [`FlowStats::judged_at`] keeps it: four bytes instead of eight keep the flow entry
/// (and the program's stack) as it was. It wraps every 52 days; compare with
/// `wrapping_sub`.
pub const fn judged_at(now_ns: u64) -> u32 {
    (now_ns >> 20) as u32
}

impl FlowStats {
    pub fn path(&self) -> Option<Path> {
        Path::from_u8(self.path)
    }

    /// Whether `pod_egress` judged the flow own-Pod-to-Pod, from the Pod interface
    /// `ingress_ifindex`, within [`crate::ROUTE_CACHE_TTL_NS`] before `now_ns`.
    #[inline(always)]
    pub fn judged_lately(&self, ingress_ifindex: u32, now_ns: u64) -> bool {
        self.judged_at != 0
            && self.ingress_ifindex == ingress_ifindex
            && judged_at(now_ns).wrapping_sub(self.judged_at) < judged_at(crate::ROUTE_CACHE_TTL_NS)
            && matches!(
                self.path(),
                Some(Path::ViaGateway | Path::ViaGatewayServiceLeg)
            )
    }

    /// The way to the flow's Pod that the uplink learned within
    /// [`crate::ROUTE_CACHE_TTL_NS`] before `now_ns`.
    #[inline(always)]
    pub fn pod_route_lately(&self, now_ns: u64) -> Option<WayToPod> {
        let fresh = self.pod_route_at != 0
            && judged_at(now_ns).wrapping_sub(self.pod_route_at)
                < judged_at(crate::ROUTE_CACHE_TTL_NS);
        fresh.then_some(WayToPod {
            ifindex: self.egress_ifindex,
            macs: self.pod_macs,
            veth: self.pod_route_veth != 0,
        })
    }

    /// Keeps the way to the flow's Pod that the FIB gave at `now_ns`.
    #[inline(always)]
    pub fn note_pod_route(&mut self, way: &WayToPod, now_ns: u64) {
        self.egress_ifindex = way.ifindex;
        self.pod_macs = way.macs;
        self.pod_route_veth = u8::from(way.veth);
        self.pod_route_at = judged_at(now_ns);
    }

    /// Keeps that `pod_egress` judged the flow own-Pod-to-Pod from `ingress_ifindex`
    /// at `now_ns`, unless an earlier judgement still holds.
    #[inline(always)]
    pub fn note_judged(&mut self, ingress_ifindex: u32, now_ns: u64) {
        if !self.judged_lately(ingress_ifindex, now_ns) {
            self.ingress_ifindex = ingress_ifindex;
            self.judged_at = judged_at(now_ns);
        }
    }
}

/// Value of the NAT-leg map, whose key is a Service reply's [`FlowKey`] as it crossed
/// the gateway (the backend Pod's address and port as source): the source the node's
/// NAT gave the reply (the Service's), which is put back when it returns.
#[repr(C)]
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct NatLeg {
    /// IPv4 in the first four bytes, the rest zero.
    pub src_addr: [u8; 16],
    /// Host byte order.
    pub src_port: u16,
    pub _pad: [u8; 6],
}

#[cfg(feature = "user")]
mod pod_impls {
    // SAFETY: `#[repr(C)]`, `Copy`, explicit padding.
    unsafe impl aya::Pod for super::FlowKey {}
    unsafe impl aya::Pod for super::FlowStats {}
    unsafe impl aya::Pod for super::NatLeg {}
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn layouts_have_no_implicit_padding() {
        assert_eq!(core::mem::size_of::<FlowKey>(), 16 + 16 + 2 + 2 + 1 + 1 + 2);
        assert_eq!(
            core::mem::size_of::<FlowStats>(),
            6 * 8 + 2 * 4 + 1 + 1 + 2 + 4 + 12 + 4 + 1 + 7
        );
        assert_eq!(core::mem::size_of::<NatLeg>(), 16 + 2 + 6);
    }

    #[test]
    fn a_judgement_holds_for_the_route_cache_time_from_its_interface_only() {
        let start = 5 * crate::ROUTE_CACHE_TTL_NS;
        let mut stats = FlowStats {
            path: Path::ViaGateway as u8,
            ingress_ifindex: 7,
            ..FlowStats::default()
        };
        assert!(!stats.judged_lately(7, start), "never judged");
        stats.note_judged(7, start);
        assert!(stats.judged_lately(7, start + crate::ROUTE_CACHE_TTL_NS / 2));
        assert!(!stats.judged_lately(8, start), "another interface");
        assert!(
            !stats.judged_lately(7, start + 2 * crate::ROUTE_CACHE_TTL_NS),
            "stale"
        );
        // A later packet on the cached judgement does not extend it.
        stats.note_judged(7, start + crate::ROUTE_CACHE_TTL_NS / 2);
        assert!(!stats.judged_lately(7, start + crate::ROUTE_CACHE_TTL_NS + (1 << 20)));
        stats.path = Path::Local as u8;
        assert!(
            !stats.judged_lately(7, start),
            "a flow kept local is judged anew"
        );
    }

    #[test]
    fn the_way_to_a_pod_is_kept_for_the_route_cache_time() {
        let start = 5 * crate::ROUTE_CACHE_TTL_NS;
        let way = WayToPod {
            ifindex: 9,
            macs: [1; 12],
            veth: true,
        };
        let mut stats = FlowStats::default();
        assert_eq!(stats.pod_route_lately(start), None, "never learned");
        stats.note_pod_route(&way, start);
        assert_eq!(
            stats.pod_route_lately(start + crate::ROUTE_CACHE_TTL_NS / 2),
            Some(way)
        );
        assert_eq!(
            stats.pod_route_lately(start + 2 * crate::ROUTE_CACHE_TTL_NS),
            None
        );
    }

    #[test]
    fn paths_round_trip() {
        for value in 0..=255u8 {
            if let Some(path) = Path::from_u8(value) {
                assert_eq!(path as u8, value);
                assert!(!path.name().is_empty());
            }
        }
    }
}
