//! What the eBPF datapath and userspace must agree on: map layouts, pin names,
//! counters, and the pure decision logic that both sides can test.
//!
//! Everything here is `#![no_std]` so the eBPF crate can use it. With the `user`
//! feature the map types implement `aya::Pod`, so userspace can read and write them.
#![no_std]

#[cfg(any(test, feature = "builder"))]
extern crate alloc;

pub mod clock;
pub mod config;
pub mod counters;
pub mod flow;
pub mod hook;
pub mod packet;
#[cfg(any(test, feature = "builder"))]
pub mod testing;
pub mod verdict;

/// Names of the maps, as declared in the eBPF object and pinned under the pin directory.
/// The kernel keeps 15 bytes of a map name, so every name fits in that.
pub mod map_names {
    /// `Array<Settings>` with one entry: the enable flag, gateways and marks.
    pub const SETTINGS: &str = "VIS_SETTINGS";
    /// `LpmTrie<[u8; 4], u8>`: the node's IPv4 Pod CIDRs.
    pub const POD_CIDRS_V4: &str = "VIS_PODS_V4";
    /// `LpmTrie<[u8; 16], u8>`: the node's IPv6 Pod CIDRs.
    pub const POD_CIDRS_V6: &str = "VIS_PODS_V6";
    /// `LpmTrie<[u8; 4], ExemptRules>`: IPv4 ranges that stay on the node.
    pub const EXEMPT_V4: &str = "VIS_EXEMPT_V4";
    /// `LpmTrie<[u8; 16], ExemptRules>`: IPv6 ranges that stay on the node.
    pub const EXEMPT_V6: &str = "VIS_EXEMPT_V6";
    /// `HashMap<u32, PodIface>`: the Pod interfaces, by ifindex.
    pub const POD_IFACES: &str = "VIS_POD_IFACES";
    /// `LruHashMap<FlowKey, FlowStats>`: per-flow counters.
    pub const FLOWS: &str = "VIS_FLOWS";
    /// `LruHashMap<FlowKey, NatLeg>`: Service replies sent to the gateway with the
    /// backend Pod's source, and the Service source to put back when they return.
    pub const NAT_LEGS: &str = "VIS_NAT_LEGS";
    /// `PerCpuArray<CounterValue>`: one slot per [`crate::counters::Counter`].
    pub const COUNTERS: &str = "VIS_COUNTERS";
    /// `Array<JiffiesClock>` with one entry: how the datapath tells the time.
    pub const CLOCK: &str = "VIS_CLOCK";
    /// `Array` with one entry, made by userspace (not in the eBPF object): the pinned
    /// object's [`crate::LAYOUT_VERSION`] and hash, which a new daemon compares with its own.
    pub const OBJECT: &str = "VIS_OBJECT";
    /// `HashMap<FlowKey, _>`, made by userspace (not in the eBPF object): each flow's
    /// counters as last reported in a flow record, so that a restarted daemon reports
    /// only what came since.
    pub const REPORTED: &str = "VIS_REPORTED";
}

/// The version of the maps' layouts: bumped whenever the key or value layout of any map
/// (of the object's, or [`map_names::REPORTED`]) changes, or what its entries mean. (A
/// new map needs no bump: the loader makes it beside the pinned ones.) A daemon whose layout version differs from the pinned
/// datapath's makes new maps rather than reuse the pinned ones, dropping the old flows.
pub const LAYOUT_VERSION: u32 = 1;

/// Constants of the eBPF object that the loader sets (`.rodata`), to pick how many paths
/// the kernel's verifier is asked to walk; the daemon's `variant` module says which
/// kernel gets what.
pub mod global_names {
    /// `u8`: 1 when `pod_egress` judges every packet with every lookup; 0 when a flow
    /// judged own-Pod-to-Pod lately skips the judgement's three lookups and the packet
    /// is counted in the flow entry the verdict found (the flow shortcuts). Same
    /// verdicts and counts either way; more paths for the verifier with the shortcuts.
    pub const JUDGE_EVERY_PACKET: &str = "JUDGE_EVERY_PACKET";
    /// `u8`: 1 when `pod_egress` copies the parsed packet through a per-CPU slot, so
    /// that the verifier walks the rest once for all kinds of packet rather than once
    /// per kind; 0 when it uses the packet as parsed, about 15 ns a packet faster.
    pub const WALK_PACKET_KINDS_AS_ONE: &str = "WALK_PACKET_KINDS_AS_ONE";
}

/// Names of the TC programs in the eBPF object.
pub mod program_names {
    /// Host side of a Pod veth, ingress: packets a Pod sends.
    pub const POD_INGRESS: &str = "pod_ingress";
    /// Host side of a Pod veth, egress: packets the node forwards to a Pod.
    pub const POD_EGRESS: &str = "pod_egress";
    /// The uplink, ingress: packets that come back from the gateway.
    pub const UPLINK_INGRESS: &str = "uplink_ingress";
    /// Never attached: run with `BPF_PROG_TEST_RUN`, it writes a [`clock::ClockSample`]
    /// (jiffies, then the coarse monotonic clock, native-endian u64s) over the first 16
    /// bytes of the frame it is given.
    pub const CLOCK_SAMPLE: &str = "clock_sample";
}

/// Names of the TC programs in the benchmarks' eBPF object (`visibility-bench`), which
/// only the benchmarks load; the daemon never does.
pub mod bench_program_names {
    /// Benchmark baseline, never attached: parse and Pod CIDR lookup only.
    pub const BENCH_BASELINE: &str = "bench_baseline";
    /// The benchmark lab's gateway fast path: a router in TC (FIB lookup, MACs, one
    /// hop) that stands in for a VPC off the node.
    pub const LAB_ROUTER: &str = "lab_router";
}

/// How long a CPU of the datapath reuses a FIB answer (a gateway's MACs, or a Pod's
/// interface and MACs) before it asks the FIB again. A new MAC or route reaches the
/// datapath within this time; a change of the configured gateway, at once.
pub const ROUTE_CACHE_TTL_NS: u64 = 100_000_000;

/// Entries of the datapath's per-CPU cache of Pod routes: more than a node has Pods (at
/// most 256 on GKE) while staying small, since each entry is kept once per CPU. An
/// evicted Pod's next packet asks the FIB again.
pub const POD_ROUTE_CACHE_CAPACITY: u32 = 1024;

/// How long after a flow's last packet went to the gateway the uplink still hands
/// packets of that flow to the Pod. A packet is back from the VPC within
/// milliseconds; anything later, or of a flow never sent, goes to the node's stack.
/// It also bounds how long the uplink keeps delivering after visibility is turned off.
pub const RETURN_WINDOW_NS: u64 = 1_000_000_000;

/// Entries of the fragment map: datagrams in flight whose first fragment was seen.
pub const FRAGMENT_CAPACITY: u32 = 8192;

/// Default number of entries of the flow map; userspace may change it at load time.
pub const DEFAULT_FLOW_CAPACITY: u32 = 65_536;
/// Number of entries of the NAT-leg map (Service replies in flight).
pub const NAT_LEG_CAPACITY: u32 = 16_384;
/// Largest number of Pod CIDRs per family.
pub const MAX_POD_CIDRS: u32 = 64;
/// Entries of each Pod-CIDR trie: the Pod CIDRs plus the node addresses they cover
/// (see [`config::POD_CIDR_ENTRY`]).
pub const POD_TRIE_CAPACITY: u32 = MAX_POD_CIDRS + MAX_NODE_ADDRS;
/// Largest number of exempt prefixes per family.
pub const MAX_EXEMPT_PREFIXES: u32 = 256;
/// Largest number of node addresses.
pub const MAX_NODE_ADDRS: u32 = 1024;
/// Largest number of Pod interfaces on one node.
pub const MAX_POD_IFACES: u32 = 4096;

#[cfg(test)]
mod tests;
