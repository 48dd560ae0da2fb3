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

    /// The key of the other direction. ICMP keys are not symmetric, so callers only
    /// use this for TCP and UDP.
    pub fn reversed(&self) -> Self {
        Self {
            src_addr: self.dst_addr,
            dst_addr: self.src_addr,
            src_port: self.dst_port,
            dst_port: self.src_port,
            ..*self
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
    /// Sent from a Pod to the gateway and back.
    ViaGateway = 1,
    /// Service traffic: sent to the gateway after the node's NAT chose a Pod here.
    ViaGatewayAfterNat = 2,
    /// Stayed on the node because an exempt range covers it.
    Exempt = 3,
    /// Seen only coming back from the gateway.
    ReturnedFromGateway = 4,
    /// Its destination is not a Pod on this node.
    NotSameNode = 5,
    /// Stayed on the node for another reason (visibility off, TTL, NAT reply, mark).
    Local = 6,
}

impl Path {
    pub const fn from_u8(value: u8) -> Option<Self> {
        Some(match value {
            1 => Path::ViaGateway,
            2 => Path::ViaGatewayAfterNat,
            3 => Path::Exempt,
            4 => Path::ReturnedFromGateway,
            5 => Path::NotSameNode,
            6 => Path::Local,
            _ => return None,
        })
    }

    /// A stable snake_case name for the CLI, records and metrics.
    pub const fn name(self) -> &'static str {
        match self {
            Path::ViaGateway => "via_gateway",
            Path::ViaGatewayAfterNat => "via_gateway_after_nat",
            Path::Exempt => "exempt",
            Path::ReturnedFromGateway => "returned_from_gateway",
            Path::NotSameNode => "not_same_node",
            Path::Local => "local",
        }
    }

    /// The path a packet that a Pod sent took, from the counter its outcome was
    /// accounted in. `None` for traffic that is not a Pod flow (link-scope,
    /// node-address, unparsable) and for packets coming back from the gateway.
    pub const fn of_sent(counter: Counter) -> Option<Self> {
        match counter {
            Counter::RedirectedToGateway => Some(Path::ViaGateway),
            Counter::RedirectedAfterNat => Some(Path::ViaGatewayAfterNat),
            Counter::PassExempt => Some(Path::Exempt),
            Counter::PassNotSameNode => Some(Path::NotSameNode),
            Counter::PassDisabled
            | Counter::PassTtlExpired
            | Counter::PassNatReply
            | Counter::PassMasqueradeMark
            | Counter::PassNoGateway
            | Counter::PassGatewayUnresolved
            | Counter::PassRouteLookupFailed => Some(Path::Local),
            _ => None,
        }
    }
}

/// Counters of one flow. Times are `CLOCK_MONOTONIC` nanoseconds, read coarsely (to
/// the scheduler tick).
#[repr(C)]
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct FlowStats {
    /// Packets the source sent (GSO super-packets count as their segments).
    pub packets: u64,
    /// IP bytes the source sent, headers included, as on the wire.
    pub bytes: u64,
    /// Of those, packets that came back from the gateway and reached the Pod.
    pub returned_packets: u64,
    pub returned_bytes: u64,
    pub first_seen_ns: u64,
    pub last_seen_ns: u64,
    /// The Pod interface the flow entered the node on.
    pub ingress_ifindex: u32,
    /// The interface the flow was delivered to after the gateway.
    pub egress_ifindex: u32,
    /// Every TCP flag seen, OR-ed together.
    pub tcp_flags: u8,
    /// A [`Path`].
    pub path: u8,
    pub _pad: [u8; 6],
}

impl FlowStats {
    pub fn path(&self) -> Option<Path> {
        Path::from_u8(self.path)
    }
}

#[cfg(feature = "user")]
mod pod_impls {
    // SAFETY: `#[repr(C)]`, `Copy`, explicit padding.
    unsafe impl aya::Pod for super::FlowKey {}
    unsafe impl aya::Pod for super::FlowStats {}
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn layouts_have_no_implicit_padding() {
        assert_eq!(core::mem::size_of::<FlowKey>(), 16 + 16 + 2 + 2 + 1 + 1 + 2);
        assert_eq!(core::mem::size_of::<FlowStats>(), 6 * 8 + 2 * 4 + 8);
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

    #[test]
    fn reversing_twice_is_identity() {
        let key = FlowKey {
            src_addr: [1; 16],
            dst_addr: [2; 16],
            src_port: 3,
            dst_port: 4,
            family: 6,
            protocol: 6,
            _pad: [0; 2],
        };
        assert_eq!(key.reversed().reversed(), key);
        assert_eq!(key.reversed().src_port, 4);
    }
}
