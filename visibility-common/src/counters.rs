//! Global per-CPU counters: one slot for every verdict and every reason a packet
//! was passed to the kernel unchanged, kept separately for each hook.

use crate::hook::Hook;

/// Packets and bytes counted in one slot.
#[repr(C)]
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct CounterValue {
    pub packets: u64,
    pub bytes: u64,
}

#[cfg(feature = "user")]
// SAFETY: `#[repr(C)]`, `Copy`, two u64s.
unsafe impl aya::Pod for CounterValue {}

/// A slot's total over CPUs (the map is per CPU), for userspace.
impl<'a> core::iter::Sum<&'a CounterValue> for CounterValue {
    fn sum<I: Iterator<Item = &'a CounterValue>>(values: I) -> Self {
        values.fold(CounterValue::default(), |sum, v| CounterValue {
            packets: sum.packets + v.packets,
            bytes: sum.bytes + v.bytes,
        })
    }
}

macro_rules! counters {
    ($( $(#[doc = $doc:literal])* $variant:ident = $index:literal, $name:literal; )+) => {
        /// Index of a slot in the counters map.
        #[repr(u32)]
        #[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
        pub enum Counter {
            $( $(#[doc = $doc])* $variant = $index, )+
        }

        impl Counter {
            /// Every counter, in index order.
            pub const ALL: &'static [Counter] = &[$(Counter::$variant),+];

            /// The counter at `index`, if there is one.
            pub const fn from_index(index: u32) -> Option<Counter> {
                match index {
                    $( $index => Some(Counter::$variant), )+
                    _ => None,
                }
            }

            /// A stable snake_case name, used in the CLI and in metric labels.
            pub const fn name(self) -> &'static str {
                match self { $( Counter::$variant => $name, )+ }
            }

            /// One line that says what the counter counts.
            pub const fn help(self) -> &'static str {
                match self { $( Counter::$variant => concat!($($doc),+), )+ }
            }
        }
    };
}

counters! {
    /// Sent from a Pod to the gateway after the node's stack forwarded it, addresses and
    /// ports as the Pod sent them.
    RedirectedToGateway = 0, "redirected_to_gateway";
    /// Sent to the gateway after the node's DNAT chose a Pod on this node: the
    /// Pod-to-Pod leg of Service traffic.
    RedirectedServiceLeg = 1, "redirected_service_leg";
    /// A Service backend's reply, sent to the gateway with the source the backend Pod
    /// gave it (the node's NAT had put the Service's there); the Service's source is
    /// put back when it returns.
    RedirectedServiceReply = 2, "redirected_service_reply";
    /// Came back from the gateway, belonged to a flow the datapath sent there, and was
    /// handed to the destination Pod.
    DeliveredFromGateway = 3, "delivered_from_gateway";
    /// The neighbour entry of the Pod a returning packet goes to was unresolved; the
    /// kernel resolves it, then sends (counted besides the verdict).
    NeighbourResolution = 4, "neighbour_resolution";
    /// Passed: not an IP packet (ARP, VLAN-tagged, other ethertypes).
    PassNotIp = 5, "pass_not_ip";
    /// Passed: the IP header is truncated, inconsistent or fails its checksum; the
    /// kernel drops such packets.
    PassMalformed = 6, "pass_malformed";
    /// Passed: link-local, multicast or broadcast.
    PassLinkScope = 7, "pass_link_scope";
    /// Passed: source or destination is not a Pod on this node.
    PassNotSameNode = 8, "pass_not_same_node";
    /// Passed: source or destination is an address the node owns.
    PassNodeAddress = 9, "pass_node_address";
    /// Passed to the node's stack: Pod-to-Pod. Whether it takes the gateway is decided
    /// after the node's filter, on the destination Pod's interface.
    PassPodToPod = 10, "pass_pod_to_pod";
    /// Passed: entered the node on an interface that is not a Pod's (the uplink, the
    /// node itself).
    PassNotFromPod = 11, "pass_not_from_pod";
    /// Passed: the source is a Pod address that the node does not route to the
    /// interface the packet came from. Never sent in another Pod's name; the node's
    /// stack (rp_filter, policy) has judged it.
    PassSpoofedSource = 12, "pass_spoofed_source";
    /// Passed: visibility is turned off.
    PassDisabled = 13, "pass_disabled";
    /// Passed: an exempt range covers it.
    PassExempt = 14, "pass_exempt";
    /// Passed: no gateway is configured for this address family.
    PassNoGateway = 15, "pass_no_gateway";
    /// Passed: a reply that the node's NAT rewrote and whose Pod source cannot be put
    /// back (ICMP errors, fragments, protocols without ports or an unreadable transport
    /// header, or, on its return, its NAT-leg entry is gone).
    PassServiceReplyUnrestorable = 16, "pass_service_reply_unrestorable";
    /// Passed to the node's stack: claims a Pod source and a Pod destination of this
    /// node, but no flow of it was sent to the gateway; rp_filter and the node's filter
    /// judge it.
    PassUnsentPodToPod = 17, "pass_unsent_pod_to_pod";
    /// Passed: the TTL or hop limit allows no further hop; the kernel answers.
    PassTtlExpired = 18, "pass_ttl_expired";
    /// Passed: the node has no route to the destination Pod, or only one back out of
    /// the uplink.
    PassNoPodRoute = 19, "pass_no_pod_route";
    /// Dropped: the gateway's neighbour entry is unresolved. A packet the kernel has
    /// forwarded cannot wait for another device's neighbour; the daemon keeps the
    /// gateway's entry resolved.
    DroppedGatewayUnresolved = 20, "dropped_gateway_unresolved";
    /// Dropped: no route to the gateway on the uplink (uplink down or gone).
    DroppedNoGatewayRoute = 21, "dropped_no_gateway_route";
    /// Dropped: rewriting the headers or the redirect failed.
    DroppedRewriteFailed = 22, "dropped_rewrite_failed";
    /// Dropped: larger than the uplink's MTU. The sender is sent ICMP
    /// fragmentation-needed (IPv4) or packet-too-big (IPv6), as a router does, when the
    /// node has an address on the uplink and the sender's route is in the cache.
    DroppedTooBig = 23, "dropped_too_big";
    /// A later fragment whose first fragment was not seen: sent on without ports
    /// (counted besides the verdict).
    FragmentWithoutFirst = 24, "fragment_without_first";
    /// The transport header could not be read: the packet was judged without ports
    /// (counted besides the verdict).
    TransportUnreadable = 25, "transport_unreadable";
    /// A flow could not be added to the flow map.
    FlowUpdateFailed = 26, "flow_update_failed";
}

impl Counter {
    /// Whether the counter is a verdict: each packet lands in exactly one verdict slot
    /// per hook. The others count a fact about a packet besides its verdict.
    pub const fn is_verdict(self) -> bool {
        !matches!(
            self,
            Counter::NeighbourResolution
                | Counter::FragmentWithoutFirst
                | Counter::TransportUnreadable
                | Counter::FlowUpdateFailed
        )
    }

    /// Whether the packet was sent to the gateway.
    pub const fn is_redirect_to_gateway(self) -> bool {
        matches!(
            self,
            Counter::RedirectedToGateway
                | Counter::RedirectedServiceLeg
                | Counter::RedirectedServiceReply
        )
    }
}

/// Counters per hook.
pub const COUNTERS_PER_HOOK: u32 = Counter::ALL.len() as u32;
/// Number of slots in the counters map: every counter, once per hook.
pub const COUNTER_SLOTS: u32 = COUNTERS_PER_HOOK * Hook::ALL.len() as u32;

/// The slot that counts `counter` at `hook`.
pub const fn slot(hook: Hook, counter: Counter) -> u32 {
    hook as u32 * COUNTERS_PER_HOOK + counter as u32
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn slots_are_distinct_and_in_range() {
        let mut seen = [false; COUNTER_SLOTS as usize];
        for hook in Hook::ALL {
            for counter in Counter::ALL {
                let slot = slot(*hook, *counter) as usize;
                assert!(!seen[slot], "slot {slot} used twice");
                seen[slot] = true;
            }
        }
        assert!(seen.iter().all(|s| *s));
    }

    #[test]
    fn indexes_are_dense_and_names_unique() {
        for (i, c) in Counter::ALL.iter().enumerate() {
            assert_eq!(*c as usize, i, "{} is out of order", c.name());
            assert!(!c.help().is_empty());
            for other in &Counter::ALL[..i] {
                assert_ne!(other.name(), c.name());
            }
        }
    }
}
