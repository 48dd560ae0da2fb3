//! Every map of the datapath, in one place. All but a per-CPU cache are pinned by name,
//! so a restarted daemon adopts the running state instead of starting from empty maps.

use aya_ebpf::{
    macros::map,
    maps::{Array, HashMap, LpmTrie, LruHashMap, LruPerCpuHashMap, PerCpuArray},
};
use visibility_common::{
    DEFAULT_FLOW_CAPACITY, FRAGMENT_CAPACITY, MAX_EXEMPT_PREFIXES, MAX_POD_IFACES,
    NAT_LEG_CAPACITY, POD_ROUTE_CACHE_CAPACITY, POD_TRIE_CAPACITY,
    clock::JiffiesClock,
    config::{ExemptRules, PodIface, Settings},
    counters::{COUNTER_SLOTS, CounterValue},
    flow::{FlowKey, FlowStats, NatLeg},
    packet::Packet,
};

use crate::types::{
    FragmentEntry, FragmentKey, GatewayRoute, IcmpScratch, PodRoute, PodRouteKey, PreStack,
};

#[map(name = "VIS_SETTINGS")]
pub static SETTINGS: Array<Settings> = Array::pinned(1, 0);

#[map(name = "VIS_PODS_V4")]
pub static POD_CIDRS_V4: LpmTrie<[u8; 4], u8> = LpmTrie::pinned(POD_TRIE_CAPACITY, 0);

#[map(name = "VIS_PODS_V6")]
pub static POD_CIDRS_V6: LpmTrie<[u8; 16], u8> = LpmTrie::pinned(POD_TRIE_CAPACITY, 0);

#[map(name = "VIS_EXEMPT_V4")]
pub static EXEMPT_V4: LpmTrie<[u8; 4], ExemptRules> = LpmTrie::pinned(MAX_EXEMPT_PREFIXES, 0);

#[map(name = "VIS_EXEMPT_V6")]
pub static EXEMPT_V6: LpmTrie<[u8; 16], ExemptRules> = LpmTrie::pinned(MAX_EXEMPT_PREFIXES, 0);

#[map(name = "VIS_POD_IFACES")]
pub static POD_IFACES: HashMap<u32, PodIface> = HashMap::pinned(MAX_POD_IFACES, 0);

/// LRU, so a full table evicts the oldest flow instead of failing or slowing traffic.
/// Userspace sets the size at load time.
#[map(name = "VIS_FLOWS")]
pub static FLOWS: LruHashMap<FlowKey, FlowStats> = LruHashMap::pinned(DEFAULT_FLOW_CAPACITY, 0);

/// Service replies sent to the gateway with the backend Pod's source, by their key as
/// they crossed the gateway, with the Service source to put back on return. Pinned, so
/// that replies in flight across a daemon restart keep it.
#[map(name = "VIS_NAT_LEGS")]
pub static NAT_LEGS: LruHashMap<FlowKey, NatLeg> = LruHashMap::pinned(NAT_LEG_CAPACITY, 0);

/// Datagrams in flight whose first fragment was seen, by addresses, protocol and
/// identification: the ports and verdict their later fragments take. Short-lived, so
/// not pinned.
#[map(name = "VIS_FRAGMENTS")]
pub static FRAGMENTS: LruHashMap<FragmentKey, FragmentEntry> =
    LruHashMap::with_max_entries(FRAGMENT_CAPACITY, 0);

/// What `pod_ingress` last saw on each CPU, so that `pod_egress`, which the node's
/// stack runs for the same packet on the same CPU, can tell what the node's NAT
/// changed. A scratch slot, not pinned.
#[map(name = "VIS_PRE_STACK")]
pub static PRE_STACK: PerCpuArray<PreStack> = PerCpuArray::with_max_entries(1, 0);

/// Each CPU's copy of the packet `pod_egress` judges, read back so that the verifier
/// knows nothing of its fields (see `unknown_to_verifier` in main.rs). A scratch slot,
/// not pinned.
#[map(name = "VIS_PACKET")]
pub static PACKET: PerCpuArray<Packet> = PerCpuArray::with_max_entries(1, 0);

/// Each CPU's room for building a new flow's entry before it is added to [`FLOWS`]:
/// the programs' stacks are full. A scratch slot, not pinned.
#[map(name = "VIS_NEW_FLOW")]
pub static NEW_FLOW: PerCpuArray<FlowStats> = PerCpuArray::with_max_entries(1, 0);

/// Each CPU's room for building an ICMP error: too large for the program's stack. A
/// scratch slot, not pinned.
#[map(name = "VIS_ICMP_SCRATCH")]
pub static ICMP_SCRATCH: PerCpuArray<IcmpScratch> = PerCpuArray::with_max_entries(1, 0);

/// How to turn jiffies into the coarse monotonic clock, as the daemon measured it.
/// Pinned, so a restarted daemon finds it measured.
#[map(name = "VIS_CLOCK")]
pub static CLOCK: Array<JiffiesClock> = Array::pinned(1, 0);

#[map(name = "VIS_COUNTERS")]
pub static COUNTERS: PerCpuArray<CounterValue> = PerCpuArray::pinned(COUNTER_SLOTS, 0);

/// When each CPU last logged a datapath problem, so a problem that hits every packet
/// logs once a second, not once a packet.
#[map(name = "VIS_LOG_LIMIT")]
pub static LOG_LIMIT: PerCpuArray<u64> = PerCpuArray::pinned(1, 0);

/// Each CPU's last FIB answer for each family's gateway (index: [`GatewayRoute::slot`]),
/// so that a redirected packet needs no FIB lookup of its own. A cache, rebuilt from
/// the FIB within [`visibility_common::ROUTE_CACHE_TTL_NS`]: it is not pinned.
#[map(name = "VIS_GW_ROUTES")]
pub static GATEWAY_ROUTES: PerCpuArray<GatewayRoute> = PerCpuArray::with_max_entries(2, 0);

/// Each CPU's last FIB answers for the Pods that packets from the gateway were handed
/// to: their interface and MACs. A cache like [`GATEWAY_ROUTES`], one entry per Pod
/// address; LRU, so Pods that come and go never fill it. Per CPU, so that a refresh
/// on one CPU never changes a value another CPU is reading.
#[map(name = "VIS_POD_ROUTES")]
pub static POD_ROUTES: LruPerCpuHashMap<PodRouteKey, PodRoute> =
    LruPerCpuHashMap::with_max_entries(POD_ROUTE_CACHE_CAPACITY, 0);
