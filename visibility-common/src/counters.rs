//! Global per-CPU counters: one slot for every verdict and every reason a packet
//! was passed to the kernel unchanged, kept separately for each hook.

use crate::verdict::Hook;

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
    /// Sent from a Pod to the gateway instead of to the Pod on this node.
    RedirectedToGateway = 0, "redirected_to_gateway";
    /// Came back from the gateway and was handed to the destination Pod.
    DeliveredFromGateway = 1, "delivered_from_gateway";
    /// The gateway's neighbour entry was not resolved; the kernel resolves it and sends.
    NeighbourResolution = 2, "neighbour_resolution";
    /// Passed: not an IP packet (ARP, VLAN-tagged, other ethertypes).
    PassNotIp = 3, "pass_not_ip";
    /// Passed: a header was truncated or inconsistent.
    PassMalformed = 4, "pass_malformed";
    /// Passed: an IP fragment, whose ports cannot be read.
    PassFragment = 5, "pass_fragment";
    /// Passed: link-local, multicast or broadcast.
    PassLinkScope = 6, "pass_link_scope";
    /// Passed: source or destination is not a Pod on this node.
    PassNotSameNode = 7, "pass_not_same_node";
    /// Passed: source or destination is an address the node owns.
    PassNodeAddress = 8, "pass_node_address";
    /// Passed: visibility is turned off.
    PassDisabled = 9, "pass_disabled";
    /// Passed: the destination is in an exempt range.
    PassExempt = 10, "pass_exempt";
    /// Passed: the TTL or hop limit allows no further hop; the kernel answers.
    PassTtlExpired = 11, "pass_ttl_expired";
    /// Passed: a reply of a connection the node NATs, which the node must undo first.
    PassNatReply = 12, "pass_nat_reply";
    /// Passed: carries kube-proxy's masquerade mark (a Pod reaching itself via a Service).
    PassMasqueradeMark = 13, "pass_masquerade_mark";
    /// Passed: no gateway is configured for this address family.
    PassNoGateway = 14, "pass_no_gateway";
    /// Passed: the route lookup toward the gateway or the Pod failed.
    PassRouteLookupFailed = 15, "pass_route_lookup_failed";
    /// Passed: already came back from the gateway.
    PassReturned = 16, "pass_returned";
    /// A flow could not be added to the flow map.
    FlowUpdateFailed = 17, "flow_update_failed";
    /// Sent to the gateway after the node's NAT rewrote it (Service traffic).
    RedirectedAfterNat = 18, "redirected_after_nat";
    /// Passed at egress: the gateway's neighbour was unresolved. The kernel cannot
    /// queue a forwarded packet for another device's neighbour (the packet keeps its
    /// route to the Pod), so the daemon keeps the gateway's entry resolved instead.
    PassGatewayUnresolved = 19, "pass_gateway_unresolved";
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
