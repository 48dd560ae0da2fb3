//! The pure decision: given what a hook saw and what the maps say, where does the
//! packet go? The datapath gathers facts lazily through [`Lookups`]; host tests
//! answer them from plain sets and cover every branch.

use crate::{
    counters::Counter,
    packet::{Family, Packet},
};

/// Where a program runs.
#[repr(u32)]
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub enum Hook {
    /// Host side of a Pod veth, ingress: what the Pod sends, before the node's stack.
    PodIngress,
    /// Host side of a Pod veth, egress: what the node forwards to the Pod, after the
    /// node's NAT. This is where Service traffic (Pod → ClusterIP → Pod) shows its
    /// Pod-to-Pod leg.
    PodEgress,
    /// The uplink, ingress: what the network sends the node.
    Uplink,
}

impl Hook {
    pub const ALL: &'static [Hook] = &[Hook::PodIngress, Hook::PodEgress, Hook::Uplink];

    /// A stable snake_case name, used in the CLI and in metric labels.
    pub const fn name(self) -> &'static str {
        match self {
            Hook::PodIngress => "pod_ingress",
            Hook::PodEgress => "pod_egress",
            Hook::Uplink => "uplink_ingress",
        }
    }
}

/// What happens to a packet.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Verdict {
    /// Rewrite for the wire and send out of the uplink toward the gateway.
    ToGateway,
    /// Hand to the destination Pod's interface.
    ToPod,
    /// Leave to the kernel, unchanged. The counter says why.
    Pass(Counter),
}

impl Verdict {
    /// The counter slot this verdict is accounted in.
    pub const fn counter(self, hook: Hook) -> Counter {
        match self {
            Verdict::ToGateway if matches!(hook, Hook::PodEgress) => Counter::RedirectedAfterNat,
            Verdict::ToGateway => Counter::RedirectedToGateway,
            Verdict::ToPod => Counter::DeliveredFromGateway,
            Verdict::Pass(counter) => counter,
        }
    }
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
    /// The packet is a reply of a connection whose Pod-to-Pod leg the node NATs (a
    /// Service's backend answering its client): it must go back through the node's
    /// stack so that the NAT is undone. Asked at ingress only, and late, since only
    /// Pod-to-Pod packets can be such replies.
    fn is_nat_reply(&self, packet: &Packet) -> bool;
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

/// Per-packet facts that do not come from maps.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct Context {
    /// The packet carries kube-proxy's masquerade mark.
    pub masquerade_marked: bool,
    /// The packet entered the node on the uplink (at egress: `skb->ingress_ifindex`).
    pub from_uplink: bool,
}

/// Decides what `hook` does with `packet`.
#[inline(always)]
pub fn decide<L: Lookups>(hook: Hook, packet: &Packet, ctx: &Context, maps: &L) -> Verdict {
    if packet.is_link_scope() {
        return Verdict::Pass(Counter::PassLinkScope);
    }
    let family = packet.family;
    let dst = maps.addr_kind(family, &packet.dst);
    if dst == AddrKind::Outside {
        return Verdict::Pass(Counter::PassNotSameNode);
    }
    let src = maps.addr_kind(family, &packet.src);
    if src == AddrKind::Outside {
        return Verdict::Pass(Counter::PassNotSameNode);
    }
    if dst == AddrKind::Node || src == AddrKind::Node {
        return Verdict::Pass(Counter::PassNodeAddress);
    }
    match hook {
        Hook::Uplink => {
            if packet.ttl <= 1 {
                return Verdict::Pass(Counter::PassTtlExpired);
            }
            Verdict::ToPod
        }
        Hook::PodIngress | Hook::PodEgress => {
            if ctx.masquerade_marked {
                return Verdict::Pass(Counter::PassMasqueradeMark);
            }
            if hook == Hook::PodEgress && ctx.from_uplink {
                return Verdict::Pass(Counter::PassReturned);
            }
            if !maps.enabled() {
                return Verdict::Pass(Counter::PassDisabled);
            }
            if is_exempt(packet, maps) {
                return Verdict::Pass(Counter::PassExempt);
            }
            if hook == Hook::PodIngress {
                if maps.is_nat_reply(packet) {
                    return Verdict::Pass(Counter::PassNatReply);
                }
                // At egress the kernel has forwarded the packet and spent the hop already.
                if packet.ttl <= 1 {
                    return Verdict::Pass(Counter::PassTtlExpired);
                }
            }
            if !maps.has_gateway(family) {
                return Verdict::Pass(Counter::PassNoGateway);
            }
            Verdict::ToGateway
        }
    }
}

/// Both directions of an exempt conversation stay local: the request matches on its
/// destination, the reply on its source.
#[inline(always)]
fn is_exempt<L: Lookups>(packet: &Packet, maps: &L) -> bool {
    maps.is_exempt(packet.family, &packet.dst, packet.protocol, packet.dst_port)
        || maps.is_exempt(packet.family, &packet.src, packet.protocol, packet.src_port)
}
