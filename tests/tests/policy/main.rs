//! Every policy that applied before visibility still applies with it, and no packet of
//! a same-node Pod pair gets around the gateway: on a veth/netns lab node with the real
//! `visibility` daemon.
//!
//! - The node's own filter (NetworkPolicy as Calico's iptables mode or kube-router
//!   enforce it in `filter FORWARD`): ingress policy (`-o <veth of the receiver>`) and
//!   egress policy (`-i <veth of the sender>`), in iptables-nft and in native nftables,
//!   with visibility off, on, and disabled at runtime.
//! - The gateway's firewall stops small datagrams, fragmented datagrams and fragmented
//!   pings alike.
//! - A spoofed source is not delivered through the gateway; a packet injected on the
//!   uplink with a Pod source meets the node's filter.
//! - A packet larger than the uplink's MTU gets ICMP "fragmentation needed" / "packet
//!   too big", as from a router.
//! - A program attached after ours on a hook sees the packets ours passes.
//!
//! **These tests need root** (network namespaces, veths, nftables, iptables-nft, bpffs and
//! BPF), the `visibility` binary built (`cargo build -p visibility-userspace`), iproute2,
//! nftables, iptables, conntrack-tools, util-linux `nsenter` and iputils `ping`.
//!
//! One file a topic: [`node_filter`], [`gateway`] and [`passed`]; [`common`] holds the
//! exchanges and fixtures they share.

mod common;
mod gateway;
mod node_filter;
mod passed;
