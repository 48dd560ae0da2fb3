//! What the fuzz harness's parts say to each other: a lab node's interfaces by role, a
//! step (one program on one frame), what the model knows of the node (its Pods, its
//! tries and Pod interfaces as the kernel has them) and the kernel map keys a case
//! touches.

use std::collections::HashMap;

use visibility::datapath::ProgramKind;
use visibility_common::{
    config::{ExemptRules, PodIface, Settings},
    flow::FlowKey,
    packet::{Family, Packet},
    verdict::AddrKind,
};

use crate::datapath_harness::Mac;

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

pub(super) fn prefix_matches(prefix: &[u8; 16], len: u32, addr: &[u8; 16]) -> bool {
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

pub(super) fn longest<'a, V>(
    entries: &'a [Prefix<V>],
    family: Family,
    addr: &[u8; 16],
) -> Option<&'a V> {
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

pub(super) fn fragment_key(packet: &Packet) -> [u8; FRAGMENT_KEY_LEN] {
    let mut key = [0u8; FRAGMENT_KEY_LEN];
    key[..16].copy_from_slice(&packet.src);
    key[16..32].copy_from_slice(&packet.dst);
    key[32..36].copy_from_slice(&packet.fragment_id.to_ne_bytes());
    key[36] = packet.family as u8;
    key[37] = packet.protocol;
    key
}
