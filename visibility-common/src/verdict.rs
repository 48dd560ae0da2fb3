//! The pure decision: given what a hook saw and what the maps say, where does the
//! packet go? The datapath gathers facts lazily through [`Lookups`]; host tests
//! answer them from plain sets and cover every branch.
//!
//! The design keeps the node's own packet filter in the path of every Pod-to-Pod
//! packet: `pod_ingress` only counts and hands everything to the node's stack, and the
//! decision to send a packet to the gateway is taken at `pod_egress`, on the
//! destination Pod's interface, after the node's netfilter (filter FORWARD, conntrack,
//! NAT) has judged and forwarded it. What comes back from the gateway goes straight
//! to the Pod, and only when the datapath sent it.

pub use crate::hook::Hook;
use crate::{
    counters::Counter,
    packet::{Family, Packet},
};

/// Which leg of a connection a packet sent to the gateway is.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Leg {
    /// Addresses and ports as the source Pod sent them.
    Direct,
    /// The node's DNAT chose the destination Pod (Pod → Service → Pod).
    ServiceLeg,
    /// A Service backend's reply, which the node's NAT gave the Service's source:
    /// it goes out with the backend Pod's source, and gets the Service's back on return.
    ServiceReply,
}

impl Leg {
    /// The counter slot a packet sent as this leg is accounted in.
    pub const fn counter(self) -> Counter {
        match self {
            Leg::Direct => Counter::RedirectedToGateway,
            Leg::ServiceLeg => Counter::RedirectedServiceLeg,
            Leg::ServiceReply => Counter::RedirectedServiceReply,
        }
    }

    /// The leg whose packets are counted in `counter`, when it is one of
    /// [`Leg::counter`]'s.
    pub const fn of_counter(counter: Counter) -> Option<Self> {
        match counter {
            Counter::RedirectedToGateway => Some(Leg::Direct),
            Counter::RedirectedServiceLeg => Some(Leg::ServiceLeg),
            Counter::RedirectedServiceReply => Some(Leg::ServiceReply),
            _ => None,
        }
    }
}

/// What happens to a packet.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Verdict {
    /// Rewrite for the wire and send out of the uplink toward the gateway.
    ToGateway(Leg),
    /// Hand to the destination Pod's interface.
    ToPod,
    /// Leave to the kernel, unchanged. The counter says why.
    Pass(Counter),
}

impl Verdict {
    /// The counter slot this verdict is accounted in.
    pub const fn counter(self) -> Counter {
        match self {
            Verdict::ToGateway(leg) => leg.counter(),
            Verdict::ToPod => Counter::DeliveredFromGateway,
            Verdict::Pass(counter) => counter,
        }
    }
}

/// What the node's stack did to a packet's addresses and ports between `pod_ingress`
/// (which saw it as the Pod sent it) and `pod_egress`.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum NodeNat {
    /// Nothing changed.
    Unchanged,
    /// The destination changed: DNAT (a Service's address became a Pod's).
    DestinationChanged,
    /// The source changed (a Service reply that the node gave the Service's address)
    /// and the Pod's own source can be put back: TCP or UDP with ports read.
    SourceRestorable,
    /// The source changed, and cannot be put back in the packet (ICMP errors, whose
    /// embedded header NAT rewrote too; protocols without readable ports).
    SourceUnrestorable,
    /// What the Pod sent was not seen (the node's stack queued the packet, or it
    /// did not come from a Pod interface).
    Unknown,
}

/// The map lookups a decision may need. Each is asked at most once, and only when
/// the answer matters, so common traffic costs few lookups.
pub trait Lookups {
    /// Visibility is on.
    fn enabled(&self) -> bool;
    /// Whether the address is in one of the node's Pod CIDRs, and if so whether the
    /// node itself owns it (for example the Pod gateway on host veths). One lookup
    /// answers both: the Pod-CIDR trie also holds the node addresses it covers.
    fn addr_kind(&self, family: Family, addr: &[u8; 16]) -> AddrKind;
    /// An exempt range covers this destination and port (or source and port, for the
    /// other direction of an exempt conversation).
    fn is_exempt(&self, family: Family, addr: &[u8; 16], protocol: u8, port: u16) -> bool;
    /// A gateway is configured for the family.
    fn has_gateway(&self, family: Family) -> bool;
    /// `pod_egress`: the packet's flow was judged own-Pod-to-Pod within
    /// [`crate::ROUTE_CACHE_TTL_NS`]: to a Pod, from the Pod interface this packet
    /// entered on, with that Pod's own source. The three lookups behind that judgement
    /// (the destination's Pod CIDR, the sender's interface, the route back to it) are
    /// then not asked again, as the route cache answers for that long anyway; what may
    /// change from one packet to the next (on or off, exemptions, the gateway, the
    /// node's NAT) still is.
    fn judged_own_pod_flow(&self, packet: &Packet) -> bool;
    /// `pod_egress`: the packet entered the node on a Pod interface.
    fn entered_from_pod(&self) -> bool;
    /// `pod_egress`: the node routes the packet's source to the interface the packet
    /// entered on (or to that interface's bridge), as strict rp_filter requires.
    fn source_routes_to_sender(&self, packet: &Packet) -> bool;
    /// `pod_egress`: what the node's stack changed since `pod_ingress` saw the packet.
    fn node_nat(&self, packet: &Packet) -> NodeNat;
    /// `pod_egress`: the node routes the source `pod_ingress` noted for the packet (what
    /// a Service reply's source is put back to) to the interface the packet entered on,
    /// as [`Lookups::source_routes_to_sender`] asks of the packet's own source.
    fn noted_source_routes_to_sender(&self, packet: &Packet) -> bool;
    /// `uplink_ingress`: the packet belongs to a flow that the datapath sent to the
    /// gateway within [`crate::RETURN_WINDOW_NS`].
    fn was_sent(&self, packet: &Packet) -> bool;
}

/// An address as the Pod-CIDR trie classifies it.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum AddrKind {
    /// In none of the node's Pod CIDRs.
    Outside,
    /// In a Pod CIDR, and not the node's own.
    Pod,
    /// In a Pod CIDR, and owned by the node.
    Node,
}

impl AddrKind {
    /// The kind of an address whose longest matching trie entry has `entry` as its
    /// value (see [`crate::config::POD_CIDR_ENTRY`]), or `None` when nothing matched.
    #[inline(always)]
    pub fn of_entry(entry: Option<u8>) -> Self {
        match entry {
            None => AddrKind::Outside,
            Some(flags) if flags & crate::config::NODE_ADDR_ENTRY != 0 => AddrKind::Node,
            Some(_) => AddrKind::Pod,
        }
    }
}

/// Decides what `hook` does with `packet`.
#[inline(always)]
pub fn decide<L: Lookups>(hook: Hook, packet: &Packet, maps: &L) -> Verdict {
    match hook {
        Hook::PodIngress => Verdict::Pass(decide_pod_ingress(packet, maps)),
        Hook::PodEgress => decide_pod_egress(packet, maps),
        Hook::Uplink => decide_uplink(packet, maps),
    }
}

/// `pod_ingress` passes everything to the node's stack; the counter says what it
/// was. Pod-to-Pod packets are judged again after the stack, at `pod_egress`.
#[inline(always)]
pub fn decide_pod_ingress<L: Lookups>(packet: &Packet, maps: &L) -> Counter {
    if packet.is_link_scope() {
        return Counter::PassLinkScope;
    }
    match maps.addr_kind(packet.family, &packet.dst) {
        AddrKind::Outside => Counter::PassNotSameNode,
        AddrKind::Node => Counter::PassNodeAddress,
        AddrKind::Pod => Counter::PassPodToPod,
    }
}

/// `pod_egress`: a packet the node's stack forwarded to a Pod. It goes to the gateway
/// when it came from another Pod's interface of this node with that Pod's own source.
#[inline(always)]
pub fn decide_pod_egress<L: Lookups>(packet: &Packet, maps: &L) -> Verdict {
    if packet.is_link_scope() {
        return Verdict::Pass(Counter::PassLinkScope);
    }
    let family = packet.family;
    let reply = if maps.judged_own_pod_flow(packet) {
        false
    } else {
        match judge_pod_to_pod(packet, maps) {
            Ok(reply) => reply,
            Err(verdict) => return verdict,
        }
    };
    if !maps.enabled() {
        return Verdict::Pass(Counter::PassDisabled);
    }
    if is_exempt(packet, maps) {
        return Verdict::Pass(Counter::PassExempt);
    }
    if !maps.has_gateway(family) {
        return Verdict::Pass(Counter::PassNoGateway);
    }
    let leg = if reply {
        Leg::ServiceReply
    } else if maps.node_nat(packet) == NodeNat::DestinationChanged {
        Leg::ServiceLeg
    } else {
        Leg::Direct
    };
    Verdict::ToGateway(leg)
}

/// `pod_egress`, for a flow not judged lately: whether the packet goes to a Pod, from
/// a Pod interface, with that Pod's own source (`Ok(false)`) or with a Service's
/// source that the node's NAT gave a backend's reply (`Ok(true)`); else the pass.
#[inline(always)]
fn judge_pod_to_pod<L: Lookups>(packet: &Packet, maps: &L) -> Result<bool, Verdict> {
    let family = packet.family;
    match maps.addr_kind(family, &packet.dst) {
        AddrKind::Outside => return Err(Verdict::Pass(Counter::PassNotSameNode)),
        AddrKind::Node => return Err(Verdict::Pass(Counter::PassNodeAddress)),
        AddrKind::Pod => {}
    }
    if !maps.entered_from_pod() {
        return Err(Verdict::Pass(Counter::PassNotFromPod));
    }
    // A source the node routes back to the sender's interface is that Pod's own (the
    // common case, which needs no Pod-CIDR lookup of the source). Any other source is
    // classified to say why the packet stays.
    if maps.source_routes_to_sender(packet) {
        return Ok(false);
    }
    match maps.addr_kind(family, &packet.src) {
        AddrKind::Node => Err(Verdict::Pass(Counter::PassNodeAddress)),
        AddrKind::Pod => Err(Verdict::Pass(Counter::PassSpoofedSource)),
        // From a Pod interface, yet not a Pod's source: a reply the node's NAT gave a
        // Service's source, or an address outside the Pod CIDRs.
        AddrKind::Outside => match maps.node_nat(packet) {
            // The source put back goes to the gateway in the sender's name: it must be
            // the sender's own, as a direct packet's source must.
            NodeNat::SourceRestorable if maps.noted_source_routes_to_sender(packet) => Ok(true),
            NodeNat::SourceRestorable => Err(Verdict::Pass(Counter::PassSpoofedSource)),
            NodeNat::SourceUnrestorable => {
                Err(Verdict::Pass(Counter::PassServiceReplyUnrestorable))
            }
            _ => Err(Verdict::Pass(Counter::PassNotSameNode)),
        },
    }
}

/// `uplink_ingress`: what the network sends the node. Only packets of flows the
/// datapath sent to the gateway go straight to their Pod; everything else goes to the
/// node's stack, where rp_filter and the node's filter judge it.
#[inline(always)]
pub fn decide_uplink<L: Lookups>(packet: &Packet, maps: &L) -> Verdict {
    if packet.is_link_scope() {
        return Verdict::Pass(Counter::PassLinkScope);
    }
    if maps.was_sent(packet) {
        if packet.ttl <= 1 {
            return Verdict::Pass(Counter::PassTtlExpired);
        }
        return Verdict::ToPod;
    }
    let family = packet.family;
    let counter = match maps.addr_kind(family, &packet.dst) {
        AddrKind::Outside => Counter::PassNotSameNode,
        AddrKind::Node => Counter::PassNodeAddress,
        AddrKind::Pod => match maps.addr_kind(family, &packet.src) {
            AddrKind::Pod => Counter::PassUnsentPodToPod,
            AddrKind::Node => Counter::PassNodeAddress,
            AddrKind::Outside => Counter::PassNotSameNode,
        },
    };
    Verdict::Pass(counter)
}

/// Both directions of an exempt conversation stay local: the request matches on its
/// destination, the reply on its source.
#[inline(always)]
fn is_exempt<L: Lookups>(packet: &Packet, maps: &L) -> bool {
    maps.is_exempt(packet.family, &packet.dst, packet.protocol, packet.dst_port)
        || maps.is_exempt(packet.family, &packet.src, packet.protocol, packet.src_port)
}
