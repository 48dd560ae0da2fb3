//! The datapath end to end on a veth/netns lab node: the real `visibility` daemon attached
//! to three ptp Pods ([`visibility_tests::node::Node`]), real TCP, UDP and ICMP between
//! them, and the gateway namespace (the VPC) as the witness: its conntrack flow log, its
//! forwarded-packet counter and its firewall (`Lab::block`).
//!
//! **These tests need root** (network namespaces, veths, nftables, bpffs and BPF), the
//! `visibility` binary built (`cargo build -p visibility-userspace`), iproute2, nftables,
//! conntrack-tools, util-linux `nsenter` and iputils `ping`.
//!
//! Every scenario is a function of the address family; [`per_family!`] turns each into
//! one test per family (`ipv4::NAME`, `ipv6::NAME`). Every test builds its own lab (unique
//! namespaces) and daemon (unique bpffs pin directory), which the fixtures remove on
//! drop, so the tests run in parallel.
//!
//! The lab's node has strict rp_filter (as on Container-Optimized OS) unless a test says
//! otherwise: IPv4 packets that come back from the gateway on the uplink carry Pod source
//! addresses, which the node routes to Pod veths, so the kernel would drop them; the
//! datapath must deliver them itself (`uplink_ingress` / `delivered_from_gateway`).
//!
//! Run: `cargo build -p visibility-userspace && cargo test -p visibility-tests --test datapath_netns`
//!
//! One file a topic: [`through_gateway`] and [`stays_local`]; [`common`] holds the
//! fixture and the helpers they share.

use visibility_tests::lab::IpFamily;

mod common;
mod stays_local;
mod through_gateway;

use stays_local::{
    disable_keeps_traffic_local_and_enable_restores_it, exempt_range_stays_on_the_node,
    node_and_pod_traffic_stays_local,
};
use through_gateway::{
    an_offloaded_gateway_routes_ahead_of_its_stack, gateway_firewall_blocks_one_pod_pair,
    pod_to_pod_goes_through_the_gateway_and_is_counted,
};

/// One `#[test]` per address family for each scenario `fn NAME(family: IpFamily)`.
/// Attributes before a name (e.g. `#[ignore = "..."]`) apply to both families.
macro_rules! per_family {
    ($($(#[$meta:meta])* $name:ident;)+) => {
        mod ipv4 {
            $( $(#[$meta])* #[test] fn $name() { super::$name(super::IpFamily::V4) } )+
        }
        mod ipv6 {
            $( $(#[$meta])* #[test] fn $name() { super::$name(super::IpFamily::V6) } )+
        }
    };
}

per_family! {
    pod_to_pod_goes_through_the_gateway_and_is_counted;
    gateway_firewall_blocks_one_pod_pair;
    disable_keeps_traffic_local_and_enable_restores_it;
    exempt_range_stays_on_the_node;
    node_and_pod_traffic_stays_local;
    an_offloaded_gateway_routes_ahead_of_its_stack;
}
