//! The host's side of the differential fuzz harness: what each program of the datapath
//! does with a frame, computed with visibility-common's parser and verdict, through
//! [`Lookups`] that answer from a copy of the maps the kernel runs with, and with the
//! datapath's rewrites (MACs, the hop, a Service reply's source and its checksums)
//! redone byte for byte, with the kernel's checksum arithmetic.
//!
//! Where the datapath has an open finding (`tests/fuzz/corpus/README.md`), the model
//! does what the datapath should: a Service reply's later fragment gets only its address
//! rewritten, and a rewritten UDP checksum is never left 0 (see [`rewrite_source`]).
//! Everything else follows `visibility-ebpf` as it is.
//!
//! What the model does not compute but takes as a fact of the lab, made deterministic:
//!
//! * FIB lookups. The lab node's main table routes each Pod's address to its host veth,
//!   whose neighbour entry is permanent, and everything else either nowhere or out of
//!   the uplink. So "the route of an address" is "the Pod that owns it, if any"; the
//!   gateway's lookup always succeeds with the gateway's and the uplink's MACs.
//! * The gateway's route cache: the harness keeps it fresh with the lab's answer.
//! * The clock. A case runs in well under [`visibility_common::RETURN_WINDOW_NS`], so a
//!   flow sent earlier in a case is fresh, and one from an earlier case is removed from
//!   the kernel's map before the case reads it (see [`MapKey`]).
//! * The uplink's MTU: frames are kept within it, so `dropped_too_big` (the ICMP error
//!   built in place) is never the answer. The existing kernel tests cover that path.

use std::collections::HashMap;

use visibility::datapath::ProgramKind;
use visibility_common::{
    config::{ExemptRules, PodIface, Settings},
    counters::{Counter, CounterValue},
    flow::{FlowKey, Path},
    hook::Hook,
    packet::{
        ETH_HLEN, Family, FragmentPart, IPPROTO_ICMP, IPPROTO_ICMPV6, IPPROTO_TCP, IPPROTO_UDP,
        IPV4_CHECKSUM_OFFSET, IPV4_TTL_OFFSET, IPV6_HOP_LIMIT_OFFSET, Packet, ParseError,
        Transport, checksum_replace16, parse,
    },
    verdict::{
        AddrKind, Leg, Lookups, NodeNat, Verdict, decide_pod_egress, decide_pod_ingress,
        decide_uplink,
    },
};

use crate::datapath_harness::{Mac, TC_ACT_REDIRECT, TC_ACT_SHOT, TC_ACT_UNSPEC};

/// Whether `BPF_PROG_TEST_RUN` refuses a frame for a TC program: shorter than an
/// Ethernet header. Such frames never reach the program.
pub fn test_run_refuses(frame: &[u8]) -> bool {
    frame.len() < ETH_HLEN
}

/// Whether `BPF_PROG_TEST_RUN` may refuse a frame it does not always refuse: an IPv4 or
/// IPv6 ethertype with less than that header behind it (Linux 6.18 refuses these,
/// measured). The program's answer on them, where a kernel runs it, is compared; the
/// parser's, where none does, is covered by visibility-common's unit tests.
pub fn test_run_may_refuse(frame: &[u8]) -> bool {
    let min = match frame.get(12..14) {
        Some([0x08, 0x00]) => ETH_HLEN + 20,
        Some([0x86, 0xdd]) => ETH_HLEN + 40,
        _ => ETH_HLEN,
    };
    frame.len() < min
}

/// An interface of the lab node, by role.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub enum Iface {
    /// Pod `i`'s host-side veth.
    Veth(usize),
    Uplink,
    /// The loopback device: not a Pod's, not the uplink.
    Lo,
}

impl Iface {
    pub fn name(self) -> String {
        match self {
            Iface::Veth(i) => format!("veth{i}"),
            Iface::Uplink => "uplink".into(),
            Iface::Lo => "lo".into(),
        }
    }

    pub fn parse(text: &str) -> Option<Self> {
        match text {
            "uplink" => Some(Iface::Uplink),
            "lo" => Some(Iface::Lo),
            _ => text.strip_prefix("veth")?.parse().ok().map(Iface::Veth),
        }
    }
}

/// One run of one program on one frame.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Step {
    pub program: ProgramKind,
    /// The device the skb is on.
    pub ifindex: Iface,
    /// The device it entered the node on.
    pub ingress: Iface,
    pub frame: Vec<u8>,
}

/// What the model knows of one Pod.
#[derive(Clone, Debug)]
pub struct PodFacts {
    pub veth: u32,
    pub veth_mac: Mac,
    pub mac: Mac,
    pub v4: [u8; 16],
    pub v6: [u8; 16],
}

impl PodFacts {
    pub fn addr(&self, family: Family) -> [u8; 16] {
        match family {
            Family::V4 => self.v4,
            Family::V6 => self.v6,
        }
    }
}

/// A prefix of an LPM trie.
#[derive(Clone, Debug)]
pub struct Prefix<V> {
    pub family: Family,
    pub addr: [u8; 16],
    pub len: u32,
    pub value: V,
}

/// The lab node and a copy of the configuration maps, as the kernel has them.
#[derive(Clone, Debug)]
pub struct NodeFacts {
    pub pods: Vec<PodFacts>,
    pub uplink: u32,
    pub uplink_mac: Mac,
    pub gateway_mac: Mac,
    pub uplink_mtu: u32,
    pub settings: Settings,
    pub pod_trie: Vec<Prefix<u8>>,
    pub exempt: Vec<Prefix<ExemptRules>>,
    pub pod_ifaces: HashMap<u32, PodIface>,
}

fn prefix_matches(prefix: &[u8; 16], len: u32, addr: &[u8; 16]) -> bool {
    let full = (len / 8) as usize;
    if prefix[..full] != addr[..full] {
        return false;
    }
    let rest = len % 8;
    rest == 0 || {
        let mask = 0xffu8 << (8 - rest);
        prefix[full] & mask == addr[full] & mask
    }
}

fn longest<'a, V>(entries: &'a [Prefix<V>], family: Family, addr: &[u8; 16]) -> Option<&'a V> {
    entries
        .iter()
        .filter(|p| p.family == family && prefix_matches(&p.addr, p.len, addr))
        .max_by_key(|p| p.len)
        .map(|p| &p.value)
}

impl NodeFacts {
    pub fn ifindex(&self, iface: Iface) -> u32 {
        match iface {
            Iface::Veth(i) => self.pods[i].veth,
            Iface::Uplink => self.uplink,
            Iface::Lo => 1,
        }
    }

    pub fn addr_kind(&self, family: Family, addr: &[u8; 16]) -> AddrKind {
        AddrKind::of_entry(longest(&self.pod_trie, family, addr).copied())
    }

    /// The Pod that owns `addr`: the one address the lab routes to a Pod's veth.
    pub fn pod_of(&self, family: Family, addr: &[u8; 16]) -> Option<&PodFacts> {
        self.pods.iter().find(|p| p.addr(family) == *addr)
    }

    /// The Pod whose host veth has `ifindex`.
    pub fn pod_on(&self, ifindex: u32) -> Option<&PodFacts> {
        self.pods.iter().find(|p| p.veth == ifindex)
    }
}

/// A key of a kernel map that a run reads or writes. The harness removes the kernel's
/// entry for a key the first time a case touches it, so that what earlier cases left
/// there never decides a case: a case is judged on what it did itself, and replays the
/// same on its own.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub enum MapKey {
    Flow(FlowKey),
    NatLeg(FlowKey),
    Fragment([u8; FRAGMENT_KEY_LEN]),
}

/// `visibility-ebpf`'s `FragmentKey`: addresses, identification, family, protocol.
pub const FRAGMENT_KEY_LEN: usize = 40;

fn fragment_key(packet: &Packet) -> [u8; FRAGMENT_KEY_LEN] {
    let mut key = [0u8; FRAGMENT_KEY_LEN];
    key[..16].copy_from_slice(&packet.src);
    key[16..32].copy_from_slice(&packet.dst);
    key[32..36].copy_from_slice(&packet.fragment_id.to_ne_bytes());
    key[36] = packet.family as u8;
    key[37] = packet.protocol;
    key
}

/// `visibility-ebpf`'s `PreStack`: what `pod_ingress` noted of the last packet on this CPU.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
struct PreStack {
    src: [u8; 16],
    dst: [u8; 16],
    src_port: u16,
    dst_port: u16,
    ifindex: u32,
    family: Family,
    protocol: u8,
}

impl PreStack {
    fn compare(&self, packet: &Packet) -> NodeNat {
        let same_src = self.src == packet.src && self.src_port == packet.src_port;
        let same_dst = self.dst == packet.dst && self.dst_port == packet.dst_port;
        let restorable = matches!(packet.protocol, IPPROTO_TCP | IPPROTO_UDP)
            && packet.fragment == FragmentPart::Whole
            && packet.transport == Transport::Read;
        match (same_src, same_dst) {
            (true, true) => NodeNat::Unchanged,
            (true, false) => NodeNat::DestinationChanged,
            (false, true) if restorable => NodeNat::SourceRestorable,
            (false, true) => NodeNat::SourceUnrestorable,
            (false, false) => NodeNat::Unknown,
        }
    }
}

/// What the kernel must answer for one step.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Expected {
    /// The return value and the frame after the run; `None` when `BPF_PROG_TEST_RUN`
    /// must refuse the frame (see [`test_run_refuses`]).
    pub outcome: Option<(u32, Vec<u8>)>,
    /// The counter slots of the step's hook that move, and by how much.
    pub counts: Vec<(Hook, Counter, CounterValue)>,
}

/// The state a case builds up, as the kernel keeps it: the per-CPU note of
/// `pod_ingress`, the fragments, flows and NAT legs of this case.
#[derive(Default)]
pub struct Model {
    pre_stack: Option<PreStack>,
    /// The `pod_ingress` step that made `pre_stack`, so that a saved case can start
    /// from the same state.
    pre_stack_origin: Option<Step>,
    fragments: HashMap<[u8; FRAGMENT_KEY_LEN], (u16, u16, u8)>,
    flows: HashMap<FlowKey, Path>,
    nat_legs: HashMap<FlowKey, ([u8; 16], u16)>,
}

/// The lookups of one run, answered from the facts and the model.
struct HostLookups<'a> {
    node: &'a NodeFacts,
    model: &'a Model,
    ingress: u32,
    pre_stack: Option<PreStack>,
    touched: &'a std::cell::RefCell<Vec<MapKey>>,
}

impl HostLookups<'_> {
    /// Whether the node routes `addr` to the interface the packet entered on (or its
    /// bridge), as the datapath's route check asks.
    fn routes_to_sender(&self, family: Family, addr: &[u8; 16]) -> bool {
        let Some(sender) = self.node.pod_ifaces.get(&self.ingress) else {
            return false;
        };
        let expected = match sender.route_ifindex {
            0 => self.ingress,
            ifindex => ifindex,
        };
        self.node
            .pod_of(family, addr)
            .is_some_and(|pod| pod.veth == expected)
    }
}

impl Lookups for HostLookups<'_> {
    fn enabled(&self) -> bool {
        self.node.settings.enabled != 0
    }

    fn addr_kind(&self, family: Family, addr: &[u8; 16]) -> AddrKind {
        self.node.addr_kind(family, addr)
    }

    fn is_exempt(&self, family: Family, addr: &[u8; 16], protocol: u8, port: u16) -> bool {
        self.node.settings.has_exemptions != 0
            && longest(&self.node.exempt, family, addr)
                .is_some_and(|rules| rules.matches(protocol, port))
    }

    fn has_gateway(&self, family: Family) -> bool {
        self.node.settings.gateway(family).is_configured()
    }

    fn entered_from_pod(&self) -> bool {
        self.node.pod_ifaces.contains_key(&self.ingress)
    }

    fn source_routes_to_sender(&self, packet: &Packet) -> bool {
        self.routes_to_sender(packet.family, &packet.src)
    }

    fn judged_own_pod_flow(&self, _: &Packet) -> bool {
        // Always judged in full: the datapath's shortcut must give the same answer.
        false
    }

    fn noted_source_routes_to_sender(&self, packet: &Packet) -> bool {
        self.pre_stack
            .is_some_and(|pre| self.routes_to_sender(packet.family, &pre.src))
    }

    fn node_nat(&self, packet: &Packet) -> NodeNat {
        self.pre_stack
            .map_or(NodeNat::Unknown, |pre| pre.compare(packet))
    }

    fn was_sent(&self, packet: &Packet) -> bool {
        let key = FlowKey::from_packet(packet);
        self.touched.borrow_mut().push(MapKey::Flow(key));
        self.model
            .flows
            .get(&key)
            .is_some_and(|path| path.takes_gateway())
    }
}

/// What the datapath's `Outcome` says.
struct Outcome {
    counter: Counter,
    action: u32,
    via_neighbour: bool,
}

impl Outcome {
    fn pass(counter: Counter) -> Self {
        Self {
            counter,
            action: TC_ACT_UNSPEC,
            via_neighbour: false,
        }
    }

    fn drop(counter: Counter) -> Self {
        Self {
            counter,
            action: TC_ACT_SHOT,
            via_neighbour: false,
        }
    }
}

pub fn hook_of(program: ProgramKind) -> Hook {
    crate::datapath_harness::hook_of(program)
}

/// The bytes one skb of `frame` counts as (one packet; no GSO in a test run).
fn size_of(frame: &[u8], packet: Option<&Packet>) -> CounterValue {
    CounterValue {
        packets: 1,
        bytes: match packet {
            Some(p) => u64::from(p.ip_len),
            None => (frame.len() as u64).saturating_sub(ETH_HLEN as u64),
        },
    }
}

impl Model {
    /// Forgets the case: a new case starts from empty maps (the harness removes the
    /// kernel's entries as the case touches them). The per-CPU note stays: it is the
    /// kernel's, whatever the case.
    pub fn new_case(&mut self) {
        self.fragments.clear();
        self.flows.clear();
        self.nat_legs.clear();
    }

    /// The `pod_ingress` step whose note is still waiting for `pod_egress`, if any: a
    /// saved case starts with it, so that its first steps see the same note.
    pub fn pending_pre_stack(&self) -> Option<Step> {
        self.pre_stack.and(self.pre_stack_origin.clone())
    }

    /// What the kernel must do with `step`, and the map keys the run touches, in order.
    pub fn step(&mut self, node: &NodeFacts, step: &Step) -> (Expected, Vec<MapKey>) {
        let touched = std::cell::RefCell::new(Vec::new());
        let expected = self.step_inner(node, step, &touched);
        (expected, touched.into_inner())
    }

    fn step_inner(
        &mut self,
        node: &NodeFacts,
        step: &Step,
        touched: &std::cell::RefCell<Vec<MapKey>>,
    ) -> Expected {
        let frame = &step.frame;
        let hook = hook_of(step.program);
        if test_run_refuses(frame) {
            return Expected {
                outcome: None,
                counts: Vec::new(),
            };
        }
        let mut counts = Vec::new();
        let mut count = |counter: Counter, size: CounterValue| counts.push((hook, counter, size));
        let mut data = frame.clone();
        let packet = match parse(&frame[..], frame.len()) {
            Ok(packet) => packet,
            Err(error) => {
                let counter = match error {
                    ParseError::NotIp => Counter::PassNotIp,
                    ParseError::Malformed => Counter::PassMalformed,
                };
                count(counter, size_of(frame, None));
                return Expected {
                    outcome: Some((TC_ACT_UNSPEC, data)),
                    counts,
                };
            }
        };
        let size = size_of(frame, Some(&packet));
        let ifindex = node.ifindex(step.ifindex);
        let ingress = node.ifindex(step.ingress);
        let action = match step.program {
            ProgramKind::PodIngress => {
                self.pre_stack = Some(PreStack {
                    src: packet.src,
                    dst: packet.dst,
                    src_port: packet.src_port,
                    dst_port: packet.dst_port,
                    ifindex,
                    family: packet.family,
                    protocol: packet.protocol,
                })
                .filter(|_| ifindex != 0);
                self.pre_stack_origin = Some(step.clone());
                let lookups = HostLookups {
                    node,
                    model: self,
                    ingress,
                    pre_stack: None,
                    touched,
                };
                let counter = decide_pod_ingress(&packet, &lookups);
                count(counter, size);
                if let Some(path) = Path::of_sent(counter)
                    && packet.transport == Transport::Read
                {
                    let key = FlowKey::from_packet(&packet);
                    touched.borrow_mut().push(MapKey::Flow(key));
                    self.flows.insert(key, path);
                }
                TC_ACT_UNSPEC
            }
            ProgramKind::PodEgress => {
                let pre = self.pre_stack.take().filter(|pre| {
                    pre.ifindex == ingress
                        && pre.family == packet.family
                        && pre.protocol == packet.protocol
                });
                let mut packet = packet;
                let first = self.of_later_fragment(&mut packet, touched);
                let lookups = HostLookups {
                    node,
                    model: self,
                    ingress,
                    pre_stack: pre,
                    touched,
                };
                let verdict = match first
                    .and_then(|(_, _, verdict)| Counter::from_index(u32::from(verdict)))
                {
                    Some(counter) if counter.is_redirect_to_gateway() => {
                        Verdict::ToGateway(leg_of(counter))
                    }
                    Some(counter) => Verdict::Pass(counter),
                    None => decide_pod_egress(&packet, &lookups),
                };
                if first.is_none() {
                    self.remember(&packet, verdict.counter(), touched);
                    match packet.transport {
                        Transport::Read => {}
                        Transport::InFirstFragment => count(Counter::FragmentWithoutFirst, size),
                        Transport::Unreadable => count(Counter::TransportUnreadable, size),
                    }
                }
                let outcome = match verdict {
                    Verdict::ToGateway(leg) => {
                        self.send_to_gateway(node, &mut data, &mut packet, leg, pre, touched)
                    }
                    Verdict::Pass(counter) => Outcome::pass(counter),
                    Verdict::ToPod => Outcome::pass(Counter::PassNotFromPod),
                };
                count(outcome.counter, size);
                if let Some(path) = Path::of_sent(outcome.counter) {
                    let key = FlowKey::from_packet(&packet);
                    touched.borrow_mut().push(MapKey::Flow(key));
                    self.flows.insert(key, path);
                }
                outcome.action
            }
            ProgramKind::UplinkIngress => {
                let mut packet = packet;
                let first = self.of_later_fragment(&mut packet, touched);
                let lookups = HostLookups {
                    node,
                    model: self,
                    ingress,
                    pre_stack: None,
                    touched,
                };
                let verdict = decide_uplink(&packet, &lookups);
                let sent = !packet.is_link_scope()
                    && self
                        .flows
                        .get(&FlowKey::from_packet(&packet))
                        .is_some_and(|path| path.takes_gateway());
                let outcome = match verdict {
                    Verdict::ToPod if sent => {
                        if first.is_none() {
                            self.remember(&packet, Counter::DeliveredFromGateway, touched);
                        }
                        self.deliver(node, &mut data, &packet, touched)
                    }
                    verdict => Outcome::pass(verdict.counter()),
                };
                count(outcome.counter, size);
                if outcome.via_neighbour {
                    count(Counter::NeighbourResolution, size);
                }
                outcome.action
            }
        };
        Expected {
            outcome: Some((action, data)),
            counts,
        }
    }

    fn of_later_fragment(
        &self,
        packet: &mut Packet,
        touched: &std::cell::RefCell<Vec<MapKey>>,
    ) -> Option<(u16, u16, u8)> {
        if packet.fragment != FragmentPart::Later {
            return None;
        }
        let key = fragment_key(packet);
        touched.borrow_mut().push(MapKey::Fragment(key));
        let entry = *self.fragments.get(&key)?;
        packet.src_port = entry.0;
        packet.dst_port = entry.1;
        Some(entry)
    }

    fn remember(
        &mut self,
        packet: &Packet,
        verdict: Counter,
        touched: &std::cell::RefCell<Vec<MapKey>>,
    ) {
        if packet.fragment == FragmentPart::Whole {
            return;
        }
        let key = fragment_key(packet);
        touched.borrow_mut().push(MapKey::Fragment(key));
        self.fragments
            .insert(key, (packet.src_port, packet.dst_port, verdict as u8));
    }

    fn send_to_gateway(
        &mut self,
        node: &NodeFacts,
        data: &mut [u8],
        packet: &mut Packet,
        leg: Leg,
        pre: Option<PreStack>,
        touched: &std::cell::RefCell<Vec<MapKey>>,
    ) -> Outcome {
        if leg == Leg::ServiceReply {
            let Some(pre) = pre else {
                return Outcome::pass(Counter::PassServiceReplyUnrestorable);
            };
            let service = (packet.src, packet.src_port);
            if rewrite_source(data, packet, &pre.src, pre.src_port).is_err() {
                return Outcome::drop(Counter::DroppedRewriteFailed);
            }
            packet.src = pre.src;
            packet.src_port = pre.src_port;
            let key = FlowKey::from_packet(packet);
            touched.borrow_mut().push(MapKey::NatLeg(key));
            self.nat_legs.insert(key, service);
        }
        assert!(
            u32::from(packet.ip_len) <= node.uplink_mtu,
            "the generator keeps frames within the uplink's MTU"
        );
        data[..6].copy_from_slice(&node.gateway_mac);
        data[6..12].copy_from_slice(&node.uplink_mac);
        Outcome {
            counter: leg.counter(),
            action: TC_ACT_REDIRECT,
            via_neighbour: false,
        }
    }

    fn deliver(
        &mut self,
        node: &NodeFacts,
        data: &mut [u8],
        packet: &Packet,
        touched: &std::cell::RefCell<Vec<MapKey>>,
    ) -> Outcome {
        let key = FlowKey::from_packet(packet);
        if self.flows.get(&key) == Some(&Path::ViaGatewayServiceReply) {
            touched.borrow_mut().push(MapKey::NatLeg(key));
            let Some((addr, port)) = self.nat_legs.get(&key).copied() else {
                return Outcome::pass(Counter::PassServiceReplyUnrestorable);
            };
            if rewrite_source(data, packet, &addr, port).is_err() {
                return Outcome::drop(Counter::DroppedRewriteFailed);
            }
        }
        // `to_pod`: the Pod's route, or the kernel's.
        let Some(pod) = node.pod_of(packet.family, &packet.dst) else {
            return Outcome::pass(Counter::PassNoPodRoute);
        };
        decrement_ttl(data, packet);
        data[..6].copy_from_slice(&pod.mac);
        data[6..12].copy_from_slice(&pod.veth_mac);
        Outcome {
            counter: Counter::DeliveredFromGateway,
            action: TC_ACT_REDIRECT,
            via_neighbour: false,
        }
    }
}

fn leg_of(counter: Counter) -> Leg {
    match counter {
        Counter::RedirectedServiceLeg => Leg::ServiceLeg,
        Counter::RedirectedServiceReply => Leg::ServiceReply,
        _ => Leg::Direct,
    }
}

/// `decrement_ttl` of `visibility-ebpf`: the headers are in the linear data here.
fn decrement_ttl(data: &mut [u8], packet: &Packet) {
    let ttl = packet.ttl - 1;
    match packet.family {
        Family::V4 => {
            let old = u16::from_be_bytes([packet.ttl, packet.protocol]);
            let new = u16::from_be_bytes([ttl, packet.protocol]);
            let at = IPV4_CHECKSUM_OFFSET;
            let check = checksum_replace16(u16::from_be_bytes([data[at], data[at + 1]]), old, new);
            data[IPV4_TTL_OFFSET] = ttl;
            data[at..at + 2].copy_from_slice(&check.to_be_bytes());
        }
        Family::V6 => data[IPV6_HOP_LIMIT_OFFSET] = ttl,
    }
}

// ---------------------------------------------------------------------------------------
// The kernel's checksum helpers (include/net/checksum.h, net/core/utils.c), on an skb
// without a checksum offload (`CHECKSUM_NONE`, as BPF_PROG_TEST_RUN builds it). Values
// are the little-endian loads of the bytes, as on x86 and arm64.
// ---------------------------------------------------------------------------------------

fn csum_add(a: u32, b: u32) -> u32 {
    let (sum, carry) = a.overflowing_add(b);
    sum.wrapping_add(u32::from(carry))
}

fn csum_sub(a: u32, b: u32) -> u32 {
    csum_add(a, !b)
}

fn csum_fold(sum: u32) -> u16 {
    let mut sum = (sum & 0xffff) + (sum >> 16);
    sum = (sum & 0xffff) + (sum >> 16);
    !(sum as u16)
}

fn load16(data: &[u8], at: usize) -> u16 {
    u16::from_le_bytes([data[at], data[at + 1]])
}

fn store16(data: &mut [u8], at: usize, value: u16) {
    data[at..at + 2].copy_from_slice(&value.to_le_bytes());
}

/// `csum_replace4`: what `bpf_l3_csum_replace` (size 4) and, without offload,
/// `bpf_l4_csum_replace` (sizes 2 and 4) do.
fn csum_replace4(data: &mut [u8], at: usize, from: u32, to: u32) {
    let tmp = csum_sub(!u32::from(load16(data, at)), from);
    store16(data, at, csum_fold(csum_add(tmp, to)));
}

/// `inet_proto_csum_replace_by_diff` without offload.
fn csum_replace_by_diff(data: &mut [u8], at: usize, diff: u32) {
    let sum = csum_add(diff, !u32::from(load16(data, at)));
    store16(data, at, csum_fold(sum));
}

/// `bpf_csum_diff(from, 16, to, 16, 0)`, up to the representation of the 32-bit sum,
/// which folding makes the same.
fn csum_diff(from: &[u8; 16], to: &[u8; 16]) -> u32 {
    let mut sum = 0u32;
    for i in 0..4 {
        let word =
            |a: &[u8; 16]| u32::from_le_bytes([a[4 * i], a[4 * i + 1], a[4 * i + 2], a[4 * i + 3]]);
        sum = csum_add(sum, !word(from));
        sum = csum_add(sum, word(to));
    }
    sum
}

/// A helper that reads or writes `len` bytes at `at` fails past the end of the packet.
fn within(data: &[u8], at: usize, len: usize) -> Result<(), ()> {
    if at + len <= data.len() {
        Ok(())
    } else {
        Err(())
    }
}

/// `bpf_l4_csum_replace` with `BPF_F_MARK_MANGLED_0` (`mangled`, for UDP): a checksum
/// field of 0 (none) is left alone, and a result of 0 is written as 0xffff.
fn l4_replace(data: &mut [u8], at: usize, mangled: bool, update: impl FnOnce(&mut [u8])) {
    if mangled && load16(data, at) == 0 {
        return;
    }
    update(data);
    if mangled && load16(data, at) == 0 {
        store16(data, at, 0xffff);
    }
}

/// What `rewrite_source` of `visibility-ebpf` must do, step by step and with the same
/// helpers' checks (a failing helper leaves what the steps before it wrote). This is
/// the intended behaviour where the datapath has open findings (see
/// `tests/fuzz/corpus/README.md`): a later fragment carries neither the ports nor the
/// transport checksum, so only its address changes (finding B); a UDP checksum that
/// sums to zero is written as 0xffff, as `BPF_F_MARK_MANGLED_0` does (finding C).
fn rewrite_source(data: &mut [u8], packet: &Packet, addr: &[u8; 16], port: u16) -> Result<(), ()> {
    let l4 = usize::from(packet.l4_offset);
    let check = match packet.protocol {
        IPPROTO_TCP => l4 + 16,
        _ => l4 + 6,
    };
    let later = packet.fragment == FragmentPart::Later;
    let udp_without_checksum =
        !later && packet.family == Family::V4 && packet.protocol == IPPROTO_UDP && {
            within(data, check, 2)?;
            load16(data, check) == 0
        };
    let l4_update = !later && !udp_without_checksum;
    let mangled = packet.protocol == IPPROTO_UDP;
    match packet.family {
        Family::V4 => {
            let old =
                u32::from_le_bytes([packet.src[0], packet.src[1], packet.src[2], packet.src[3]]);
            let new = u32::from_le_bytes([addr[0], addr[1], addr[2], addr[3]]);
            if l4_update {
                within(data, check, 2)?;
                l4_replace(data, check, mangled, |d| csum_replace4(d, check, old, new));
            }
            csum_replace4(data, IPV4_CHECKSUM_OFFSET, old, new);
            data[ETH_HLEN + 12..ETH_HLEN + 16].copy_from_slice(&addr[..4]);
        }
        Family::V6 => {
            let diff = csum_diff(&packet.src, addr);
            if l4_update {
                within(data, check, 2)?;
                l4_replace(data, check, mangled, |d| {
                    csum_replace_by_diff(d, check, diff)
                });
            }
            data[ETH_HLEN + 8..ETH_HLEN + 24].copy_from_slice(addr);
        }
    }
    let old_port = packet.src_port.to_be();
    let new_port = port.to_be();
    if old_port != new_port && !later {
        if l4_update {
            within(data, check, 2)?;
            l4_replace(data, check, mangled, |d| {
                csum_replace4(d, check, u32::from(old_port), u32::from(new_port))
            });
        }
        within(data, l4, 2)?;
        data[l4..l4 + 2].copy_from_slice(&port.to_be_bytes());
    }
    Ok(())
}

// ---------------------------------------------------------------------------------------
// Checksums, for the invariants
// ---------------------------------------------------------------------------------------

/// Whether the transport checksum of a whole, complete TCP, UDP, ICMP or ICMPv6 packet
/// verifies; `None` for anything else (fragments, other protocols, unreadable headers).
/// A UDP checksum of zero over IPv4 (none) verifies; over IPv6 it does not.
pub fn l4_checksum_ok(frame: &[u8]) -> Option<bool> {
    let packet = parse(frame, frame.len()).ok()?;
    if packet.fragment != FragmentPart::Whole || packet.transport != Transport::Read {
        return None;
    }
    let l4 = usize::from(packet.l4_offset);
    let end = ETH_HLEN + usize::from(packet.ip_len);
    let body = frame.get(l4..end)?;
    let checked = match packet.protocol {
        IPPROTO_TCP => 16,
        IPPROTO_UDP => 6,
        IPPROTO_ICMP if packet.family == Family::V4 => 2,
        IPPROTO_ICMPV6 if packet.family == Family::V6 => 2,
        _ => return None,
    };
    if body.len() < checked + 2 {
        return None;
    }
    if packet.protocol == IPPROTO_UDP && body[6..8] == [0, 0] {
        return Some(packet.family == Family::V4);
    }
    let sum = l4_sum(&packet, body);
    Some(sum == 0)
}

/// The Internet checksum over a transport header and payload with its pseudo-header
/// (none for ICMP over IPv4): 0 when the checksum in it is right.
pub fn l4_sum(packet: &Packet, body: &[u8]) -> u16 {
    use visibility_common::testing::checksum;
    if packet.protocol == IPPROTO_ICMP && packet.family == Family::V4 {
        return checksum(&[body]);
    }
    let len = body.len() as u32;
    let mut head = Vec::new();
    match packet.family {
        Family::V4 => {
            head.extend_from_slice(&packet.src[..4]);
            head.extend_from_slice(&packet.dst[..4]);
            head.extend_from_slice(&[0, packet.protocol]);
            head.extend_from_slice(&(len as u16).to_be_bytes());
        }
        Family::V6 => {
            head.extend_from_slice(&packet.src);
            head.extend_from_slice(&packet.dst);
            head.extend_from_slice(&len.to_be_bytes());
            head.extend_from_slice(&[0, 0, 0, packet.protocol]);
        }
    }
    checksum(&[&head, body])
}
