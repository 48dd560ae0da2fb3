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
    counters::{Counter, CounterValue},
    flow::{FlowKey, Path},
    hook::Hook,
    packet::{
        ETH_HLEN, Family, FragmentPart, IPPROTO_TCP, IPPROTO_UDP, Packet, ParseError, Transport,
        parse,
    },
    verdict::{
        AddrKind, Leg, Lookups, NodeNat, Verdict, decide_pod_egress, decide_pod_ingress,
        decide_uplink,
    },
};

use super::{
    facts::{FRAGMENT_KEY_LEN, MapKey, NodeFacts, Step, fragment_key, longest},
    rewrites::{decrement_ttl, rewrite_source},
};
use crate::datapath_harness::{TC_ACT_REDIRECT, TC_ACT_SHOT, TC_ACT_UNSPEC};

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
/// `visibility-ebpf`'s `PreStack`: what `pod_ingress` noted of the last packet on this CPU.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub(super) struct PreStack {
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

impl Expected {
    /// `BPF_PROG_TEST_RUN` refuses the frame: nothing runs, nothing counts.
    pub(super) fn refused() -> Self {
        Self {
            outcome: None,
            counts: Vec::new(),
        }
    }
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
pub(super) struct HostLookups<'a> {
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
pub(super) struct Outcome {
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
pub(super) fn size_of(frame: &[u8], packet: Option<&Packet>) -> CounterValue {
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

    /// The lookups of one run at a program that entered on `ingress`.
    fn lookups<'a>(
        &'a self,
        node: &'a NodeFacts,
        ingress: u32,
        pre_stack: Option<PreStack>,
        touched: &'a std::cell::RefCell<Vec<MapKey>>,
    ) -> HostLookups<'a> {
        HostLookups {
            node,
            model: self,
            ingress,
            pre_stack,
            touched,
        }
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
            return Expected::refused();
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
                let lookups = self.lookups(node, ingress, None, touched);
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
                let lookups = self.lookups(node, ingress, pre, touched);
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
                let lookups = self.lookups(node, ingress, None, touched);
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

pub(super) fn leg_of(counter: Counter) -> Leg {
    match counter {
        Counter::RedirectedServiceLeg => Leg::ServiceLeg,
        Counter::RedirectedServiceReply => Leg::ServiceReply,
        _ => Leg::Direct,
    }
}
