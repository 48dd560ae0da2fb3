//! The differential fuzz harness: the same frames through the host's parser and verdict
//! ([`model`]) and through the production eBPF programs (`BPF_PROG_TEST_RUN` on a
//! [`DatapathLab`] node), which must agree on the return code, the frame after the run
//! and the counters that moved, step by step. On every step it also checks invariants
//! on what the kernel did, whatever the model says:
//!
//! * only `pod_egress` and `uplink_ingress` redirect, and only same-node Pod-to-Pod
//!   packets: both addresses are Pods of this node; at `pod_egress` a packet that the
//!   verdict judged (not a later fragment, which follows its first) entered from a Pod's
//!   interface and carries that Pod's own source; at `uplink_ingress` it belongs to a
//!   flow the datapath sent;
//! * a redirected packet parses, keeps a valid IPv4 header checksum, and keeps a valid
//!   TCP, UDP, ICMP or ICMPv6 checksum when it had one (whole, complete packets);
//! * a redirect rewrites nothing but the MACs, the hop, the source address and, in a
//!   packet that carries the transport header, the source port and the checksums;
//! * `pod_egress` leaves the TTL or hop limit alone (the node's stack spent the hop), and
//!   `uplink_ingress` spends exactly one;
//! * the return code is one the datapath uses (pass, drop, redirect).
//!
//! Not compared, and why:
//!
//! * frames `BPF_PROG_TEST_RUN` refuses (shorter than an Ethernet header, or, on Linux
//!   6.18, than the IP header their ethertype names): only that the kernel refuses them.
//!   The parser's answer on such truncated headers is covered by visibility-common's
//!   unit tests;
//! * where `bpf_redirect`, `bpf_redirect_peer` or `bpf_redirect_neigh` send a packet: a
//!   test run reports the return code only. Which Pod the packet is for shows in the
//!   MACs, which are compared;
//! * the FIB lookup of the gateway (its cache is kept fresh, see [`GatewayCache`]), the
//!   uplink's MTU and the ICMP error for packets too big (frames stay within 1514 bytes),
//!   an unresolved Pod neighbour (the lab's are permanent), GSO packets and a driver's
//!   `CHECKSUM_COMPLETE` (`skb->csum`): the kernel tests (`datapath_test_run`) cover them;
//! * what the flow map holds beyond each flow's path (packets, bytes, times, flags) and
//!   the log lines: the flow's path decides what the uplink does, and is modelled.
//!
//! Cases are a few steps that follow a packet through the node ([`frames`]); each starts
//! from map entries of its own (see [`model::MapKey`]). A case that fails is printed
//! (program, interfaces and frame as hex for each step) and saved to the corpus
//! directory as `<hash>.case`; every run replays the corpus first, then every
//! truncation of a set of well-formed frames, then random cases until the time is up.

pub mod frames;
pub mod model;

use std::{
    collections::{BTreeMap, HashMap as StdHashMap, HashSet},
    fmt::Write as _,
    fs,
    hash::{Hash as _, Hasher as _},
    path::{Path, PathBuf},
    time::{Duration, Instant},
};

use anyhow::{Context as _, Result, bail, ensure};
use aya::{
    Pod,
    maps::{HashMap, LpmTrie, Map, MapData, PerCpuArray, PerCpuValues},
    programs::{TestRun as _, TestRunOptions},
};
use rand::{Rng, SeedableRng, rngs::SmallRng};
use visibility::{datapath::ProgramKind, maps::Exemption};
use visibility_common::{
    config::{ExemptRules, PodIface},
    counters::{Counter, CounterValue, slot},
    flow::{FlowKey, FlowStats, NatLeg},
    hook::Hook,
    map_names,
    packet::{Family, FragmentPart, parse},
    testing::ipv4_header_checksum_ok,
    verdict::AddrKind,
};

use self::model::{
    Expected, FRAGMENT_KEY_LEN, Iface, MapKey, Model, NodeFacts, PodFacts, Prefix, Step,
    l4_checksum_ok,
};
use crate::{
    datapath_harness::{DatapathLab, SkbCtx, TC_ACT_REDIRECT, TC_ACT_SHOT, TC_ACT_UNSPEC},
    lab::{pod_ipv4, pod_ipv6},
};

/// How to run the harness.
#[derive(Clone, Debug)]
pub struct FuzzOptions {
    /// How long to generate random cases, after the corpus and the truncations.
    pub duration: Duration,
    /// The generator's seed; a random one when `None`. Printed either way.
    pub seed: Option<u64>,
    /// Where failing cases are saved, and replayed from.
    pub corpus: PathBuf,
}

/// What a run did.
#[derive(Clone, Debug)]
pub struct Summary {
    pub packets: u64,
    pub cases: u64,
    pub seed: u64,
    /// Distinct failures, each saved (or replayed) as a case.
    pub findings: Vec<String>,
}

/// Exempt ranges of the lab: a Pod's DNS port and a free address of the Pod CIDR.
fn exemptions() -> Result<Vec<Exemption>> {
    Ok(vec![
        Exemption {
            cidr: "10.52.0.4/32".parse()?,
            protocol: 17,
            port: 53,
        },
        Exemption {
            cidr: "fd00:52::4/128".parse()?,
            protocol: 17,
            port: 53,
        },
        Exemption {
            cidr: "10.52.0.77/32".parse()?,
            protocol: 0,
            port: 0,
        },
    ])
}

fn open_pinned(lab: &DatapathLab, name: &str) -> Result<Map> {
    let path = lab.datapath().pins().map(name);
    let data = MapData::from_pin(&path).with_context(|| format!("opening {}", path.display()))?;
    Ok(Map::from_map_data(data)?)
}

fn trie_prefixes<K: Pod + AsRef<[u8]>, V: Pod>(
    trie: &LpmTrie<MapData, K, V>,
    family: Family,
) -> Result<Vec<Prefix<V>>> {
    let mut out = Vec::new();
    for entry in trie.iter() {
        let (key, value) = entry?;
        let mut addr = [0u8; 16];
        let data = key.data();
        let bytes = data.as_ref();
        addr[..bytes.len()].copy_from_slice(bytes);
        out.push(Prefix {
            family,
            addr,
            len: key.prefix_len(),
            value,
        });
    }
    Ok(out)
}

/// The exempt tries' prefixes, as the kernel has them.
fn exempt_prefixes(lab: &DatapathLab) -> Result<Vec<Prefix<ExemptRules>>> {
    let exempt_v4: LpmTrie<MapData, [u8; 4], ExemptRules> =
        LpmTrie::try_from(open_pinned(lab, map_names::EXEMPT_V4)?)?;
    let exempt_v6: LpmTrie<MapData, [u8; 16], ExemptRules> =
        LpmTrie::try_from(open_pinned(lab, map_names::EXEMPT_V6)?)?;
    let mut exempt = trie_prefixes(&exempt_v4, Family::V4)?;
    exempt.extend(trie_prefixes(&exempt_v6, Family::V6)?);
    Ok(exempt)
}

/// The lab node's facts and a copy of its configuration maps, read back from the kernel.
fn node_facts(lab: &DatapathLab) -> Result<NodeFacts> {
    let mut pods = Vec::new();
    for pod in 0..frames::PODS {
        pods.push(PodFacts {
            veth: lab.host_veth(pod),
            veth_mac: lab.host_veth_mac(pod)?,
            mac: lab.pod_mac(pod)?,
            v4: addr16(pod_ipv4(pod).into()),
            v6: addr16(pod_ipv6(pod).into()),
        });
    }
    let mtu_text = lab
        .lab()
        .node()
        .run("cat", ["/sys/class/net/eth0/mtu"])
        .or_else(|_| {
            lab.lab()
                .node()
                .run("ip", ["-o", "link", "show", "dev", "eth0"])
        })?;
    let uplink_mtu = mtu_text
        .split_whitespace()
        .skip_while(|w| mtu_text.contains("mtu") && *w != "mtu")
        .find_map(|w| w.parse().ok())
        .context("the uplink's MTU")?;
    let pods_v4: LpmTrie<MapData, [u8; 4], u8> =
        LpmTrie::try_from(open_pinned(lab, map_names::POD_CIDRS_V4)?)?;
    let pods_v6: LpmTrie<MapData, [u8; 16], u8> =
        LpmTrie::try_from(open_pinned(lab, map_names::POD_CIDRS_V6)?)?;
    let ifaces: HashMap<MapData, u32, PodIface> =
        HashMap::try_from(open_pinned(lab, map_names::POD_IFACES)?)?;
    let mut pod_trie = trie_prefixes(&pods_v4, Family::V4)?;
    pod_trie.extend(trie_prefixes(&pods_v6, Family::V6)?);
    let exempt = exempt_prefixes(lab)?;
    let pod_ifaces = ifaces.iter().collect::<Result<StdHashMap<_, _>, _>>()?;
    Ok(NodeFacts {
        pods,
        uplink: lab.uplink(),
        uplink_mac: lab.uplink_mac(),
        gateway_mac: lab.gateway_mac(),
        uplink_mtu,
        settings: lab.maps.settings()?,
        pod_trie,
        exempt,
        pod_ifaces,
    })
}

fn addr16(addr: std::net::IpAddr) -> [u8; 16] {
    visibility::net::addr_bytes(&addr)
}

/// The lab, its datapath, the model, and the kernel maps a case clears.
struct Harness {
    lab: DatapathLab,
    node: NodeFacts,
    model: Model,
    flows: HashMap<MapData, FlowKey, FlowStats>,
    nat_legs: HashMap<MapData, FlowKey, NatLeg>,
    fragments: HashMap<MapData, [u8; FRAGMENT_KEY_LEN], [u8; 8]>,
    gateway_cache: GatewayCache,
    /// Keys whose kernel entry this case removed or wrote.
    consistent: HashSet<MapKey>,
    /// The counters after the last step.
    counters: Vec<CounterValue>,
    /// The settings in the maps now, and the gateways to put back.
    config: Config,
    gateways: [visibility_common::config::Gateway; 2],
    packets: u64,
    /// When the case began: a flow it sent is fresh for the uplink for a second.
    case_started: Instant,
    /// Cases cut short because the machine stalled them past [`LATE`].
    late: u64,
}

/// How long a case may have run before `uplink_ingress` is asked about the flows it
/// sent: well within the datapath's return window (1 s). On a machine so loaded that a
/// case takes longer, the rest of the case is not run (and counted as late): whether
/// the kernel still finds the flow fresh is then a matter of timing, not of the code.
const LATE: Duration = Duration::from_millis(500);

/// The settings a case runs with: visibility on, a gateway per family, the exempt
/// ranges. Most cases run with all of them; a case file says otherwise in a line
/// `config enabled=0 gateway_v4=1 gateway_v6=1 exemptions=1`.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Config {
    pub enabled: bool,
    pub gateway_v4: bool,
    pub gateway_v6: bool,
    pub exemptions: bool,
}

impl Default for Config {
    fn default() -> Self {
        Self {
            enabled: true,
            gateway_v4: true,
            gateway_v6: true,
            exemptions: true,
        }
    }
}

impl Config {
    fn fields(&self) -> [(&'static str, bool); 4] {
        [
            ("enabled", self.enabled),
            ("gateway_v4", self.gateway_v4),
            ("gateway_v6", self.gateway_v6),
            ("exemptions", self.exemptions),
        ]
    }

    fn text(&self) -> String {
        let fields: Vec<String> = self
            .fields()
            .iter()
            .map(|(name, on)| format!("{name}={}", u8::from(*on)))
            .collect();
        format!("config {}", fields.join(" "))
    }

    fn parse(fields: &[&str]) -> Result<Self> {
        let mut config = Self::default();
        for field in fields {
            let (name, value) = field
                .split_once('=')
                .with_context(|| format!("{field:?} is not name=0|1"))?;
            let on = match value {
                "0" => false,
                "1" => true,
                _ => bail!("{field:?} is not name=0|1"),
            };
            match name {
                "enabled" => config.enabled = on,
                "gateway_v4" => config.gateway_v4 = on,
                "gateway_v6" => config.gateway_v6 = on,
                "exemptions" => config.exemptions = on,
                _ => bail!("no setting {name:?}"),
            }
        }
        Ok(config)
    }

    fn random(rng: &mut SmallRng) -> Self {
        Self {
            enabled: rng.random_bool(0.7),
            gateway_v4: rng.random_bool(0.7),
            gateway_v6: rng.random_bool(0.7),
            exemptions: rng.random_bool(0.5),
        }
    }
}

/// What the kernel returned and left of the frame; `None` when it refused the frame.
type KernelRun = Option<(u32, Vec<u8>)>;

/// The index of the failing step of a case (`usize::MAX`: the reset before it), and
/// how it failed.
type StepFailures = (usize, Vec<Failure>);

/// One step's disagreement or broken invariant.
#[derive(Clone, Debug)]
struct Failure {
    /// What kind of failure, for telling one finding from another.
    signature: String,
    message: String,
}

impl Harness {
    fn new() -> Result<Self> {
        let mut lab = DatapathLab::new("fuzz")?;
        for pod in 0..frames::PODS {
            lab.set_pod_neighbours(pod, true)?;
            let veth = lab.host_veth(pod);
            // The last Pod's interface as if it were not a veth: `bpf_redirect`, not
            // `bpf_redirect_peer`.
            lab.maps.add_pod_iface(veth, pod + 1 < frames::PODS, veth)?;
        }
        lab.maps.set_exemptions(&exemptions()?)?;
        let node = node_facts(&lab)?;
        let flows = HashMap::try_from(open_pinned(&lab, map_names::FLOWS)?)?;
        let nat_legs = HashMap::try_from(open_pinned(&lab, map_names::NAT_LEGS)?)?;
        let fragments = HashMap::try_from(program_map(&lab, "VIS_FRAGMENTS")?)?;
        let gateway_cache = GatewayCache::new(&lab, &node)?;
        let gateways = [
            *node.settings.gateway(Family::V4),
            *node.settings.gateway(Family::V6),
        ];
        let counters = Vec::new();
        let mut harness = Self {
            lab,
            node,
            model: Model::default(),
            flows,
            nat_legs,
            fragments,
            gateway_cache,
            consistent: HashSet::new(),
            counters,
            config: Config::default(),
            gateways,
            packets: 0,
            case_started: Instant::now(),
            late: 0,
        };
        harness.counters = harness.read_counters()?;
        Ok(harness)
    }

    fn read_counters(&self) -> Result<Vec<CounterValue>> {
        let mut out = vec![CounterValue::default(); Hook::ALL.len() * Counter::ALL.len()];
        for (hook, counter, value) in self.lab.maps.counters()? {
            out[slot(hook, counter) as usize] = value;
        }
        Ok(out)
    }

    fn forget(&mut self, key: MapKey) {
        // Absent keys are the common case; any other error shows as a disagreement.
        let _ = match key {
            MapKey::Flow(key) => self.flows.remove(&key),
            MapKey::NatLeg(key) => self.nat_legs.remove(&key),
            MapKey::Fragment(key) => self.fragments.remove(&key),
        };
    }

    /// Puts `config` in the maps, and the model's copy of them in line.
    fn configure(&mut self, config: Config) -> Result<()> {
        if config == self.config {
            return Ok(());
        }
        let maps = &mut self.lab.maps;
        maps.set_enabled(config.enabled)?;
        for (family, on, gateway) in [
            (Family::V4, config.gateway_v4, self.gateways[0]),
            (Family::V6, config.gateway_v6, self.gateways[1]),
        ] {
            let gateway = if on { gateway } else { Default::default() };
            maps.set_gateway(family, gateway)?;
        }
        let exempt = if config.exemptions {
            exemptions()?
        } else {
            Vec::new()
        };
        maps.set_exemptions(&exempt)?;
        self.node.settings = self.lab.maps.settings()?;
        self.node.exempt = exempt_prefixes(&self.lab)?;
        self.config = config;
        Ok(())
    }

    /// Starts a case: the model's maps are empty, and so are the kernel's for every key
    /// the case touches (removed as it goes).
    fn new_case(&mut self) {
        self.case_started = Instant::now();
        self.model.new_case();
        self.consistent.clear();
    }

    /// Runs `step` in the kernel, in the calling thread's namespace (the node's).
    fn run_kernel(&self, step: &Step) -> Result<KernelRun> {
        let ctx = SkbCtx {
            ifindex: self.node.ifindex(step.ifindex),
            ingress_ifindex: self.node.ifindex(step.ingress),
            mark: 0,
        };
        let sk_buff = ctx.to_sk_buff();
        let mut out = vec![0u8; step.frame.len() + 256];
        let program = self.lab.datapath().program(step.program);
        match program.test_run(TestRunOptions {
            data_in: Some(&step.frame),
            data_out: Some(&mut out),
            ctx_in: Some(&sk_buff),
            repeat: 1,
            ..TestRunOptions::default()
        }) {
            Ok(result) => {
                out.truncate(usize::try_from(result.data_size_out)?);
                Ok(Some((result.return_value, out)))
            }
            Err(_)
                if model::test_run_refuses(&step.frame)
                    || model::test_run_may_refuse(&step.frame) =>
            {
                Ok(None)
            }
            Err(e) => Err(anyhow::Error::new(e).context(format!(
                "BPF_PROG_TEST_RUN of {} on {} bytes",
                step.program.name(),
                step.frame.len()
            ))),
        }
    }

    /// Whether `step` comes too late in its case to be judged (see [`LATE`]).
    fn too_late(&mut self, step: &Step) -> bool {
        let late = step.program == ProgramKind::UplinkIngress && self.case_started.elapsed() > LATE;
        self.late += u64::from(late);
        late
    }

    /// What the kernel's flow map holds for the flow of an uplink step's frame, to tell
    /// an evicted flow from a stale one when the two sides disagree.
    fn flow_note(&self, step: &Step) -> String {
        let Ok(packet) = parse(&step.frame[..], step.frame.len()) else {
            return String::new();
        };
        match self.flows.get(&FlowKey::from_packet(&packet), 0) {
            Ok(stats) => format!(
                "\n  the kernel's flow map has the flow: path {:?}, last sent {} ms ago",
                stats.path(),
                coarse_now_ns().saturating_sub(stats.last_seen_ns) / 1_000_000
            ),
            Err(_) => "\n  the kernel's flow map has no entry for the flow (ports of a later fragment aside)".into(),
        }
    }

    /// Runs one step on both sides and compares.
    fn step(&mut self, step: &Step) -> Result<(KernelRun, Vec<Failure>)> {
        let (expected, touched) = self.model.step(&self.node, step);
        for key in touched {
            if self.consistent.insert(key) {
                self.forget(key);
            }
        }
        if step.program == ProgramKind::PodEgress {
            self.gateway_cache.refresh()?;
        }
        let actual = self.run_kernel(step)?;
        // A frame this kernel refuses that another may run: nothing ran, nothing counted.
        // The model's state is as before, since the parser refuses such a frame too.
        let expected = if actual.is_none() && model::test_run_may_refuse(&step.frame) {
            Expected {
                outcome: None,
                counts: Vec::new(),
            }
        } else {
            expected
        };
        self.packets += 1;
        let after = self.read_counters()?;
        let moved: BTreeMap<u32, CounterValue> = after
            .iter()
            .zip(&self.counters)
            .enumerate()
            .filter_map(|(i, (now, then))| {
                let delta = CounterValue {
                    packets: now.packets.wrapping_sub(then.packets),
                    bytes: now.bytes.wrapping_sub(then.bytes),
                };
                (delta != CounterValue::default()).then_some((i as u32, delta))
            })
            .collect();
        self.counters = after;
        let mut failures = compare(&expected, &actual, &moved, step);
        if step.program == ProgramKind::UplinkIngress
            && let Some(first) = failures.first_mut()
        {
            first.message.push_str(&self.flow_note(step));
        }
        if let Some((action, data)) = &actual {
            failures.extend(invariants(&self.node, step, *action, data));
        }
        Ok((actual, failures))
    }

    /// Empties this CPU's note of `pod_ingress` (a parsed packet at `pod_egress` takes
    /// it), so that a replayed case starts as it was saved.
    fn reset(&mut self) -> Result<Vec<Failure>> {
        let frame = visibility_common::testing::FrameBuilder::ipv4(
            [10, 52, 0, 2],
            [8, 8, 8, 8],
            visibility_common::testing::Transport::Udp {
                src_port: 1,
                dst_port: 1,
            },
        )
        .build();
        let step = Step {
            program: ProgramKind::PodEgress,
            ifindex: Iface::Veth(0),
            ingress: Iface::Veth(0),
            frame,
        };
        Ok(self.step(&step)?.1)
    }
}

/// One of the maps `pod_egress` uses that are not pinned (the fragments, the gateway's
/// route cache), found among the program's maps by name.
fn program_map(lab: &DatapathLab, name: &str) -> Result<Map> {
    let program = lab.datapath().program(ProgramKind::PodEgress);
    let ids = program
        .info()?
        .map_ids()?
        .context("the kernel does not list a program's maps")?;
    for id in ids {
        let data = MapData::from_id(id)?;
        if data.info()?.name_as_str() == Some(name) {
            return Ok(Map::from_map_data(data)?);
        }
    }
    bail!("pod_egress uses no map {name}")
}

/// `visibility-ebpf`'s `GatewayRoute` (`repr(C)`): when the FIB answered, the gateway
/// it answered for, the MACs toward it and the uplink's MTU.
const GATEWAY_ROUTE_LEN: usize = 64;

/// The datapath's per-CPU cache of the gateway's route (`VIS_GW_ROUTES`), kept fresh
/// with the lab's true answer before every `pod_egress` step. Otherwise whether a
/// packet asks the FIB depends on how long ago (100 ms) another did, and the answer on
/// the packet's source: a lab made deterministic, where the model knows the answer.
/// The FIB lookup for the gateway is left to the kernel tests.
struct GatewayCache {
    map: PerCpuArray<MapData, [u8; GATEWAY_ROUTE_LEN]>,
    values: [[u8; GATEWAY_ROUTE_LEN]; 2],
    cpus: usize,
}

impl GatewayCache {
    fn new(lab: &DatapathLab, node: &NodeFacts) -> Result<Self> {
        let map = PerCpuArray::try_from(program_map(lab, "VIS_GW_ROUTES")?)
            .context("VIS_GW_ROUTES is no longer a per-CPU array of 64-byte values")?;
        let mut values = [[0u8; GATEWAY_ROUTE_LEN]; 2];
        for (value, family) in values.iter_mut().zip([Family::V4, Family::V6]) {
            let gateway = node.settings.gateway(family);
            value[8..12].copy_from_slice(&gateway.ifindex.to_ne_bytes());
            value[12..28].copy_from_slice(&gateway.addr);
            value[28..44].copy_from_slice(&gateway.node_addr);
            value[44..50].copy_from_slice(&node.gateway_mac);
            value[50..56].copy_from_slice(&node.uplink_mac);
            value[56..60].copy_from_slice(&node.uplink_mtu.to_ne_bytes());
        }
        let cpus = aya::util::nr_cpus().map_err(|(what, e)| anyhow::anyhow!("{what}: {e}"))?;
        Ok(Self { map, values, cpus })
    }

    fn refresh(&mut self) -> Result<()> {
        // Answered a little while ago rather than now: the datapath's clock (the coarse
        // clock, or jiffies mapped onto it) may lag this one by a tick or more, and an
        // answer from its future is stale.
        let now = coarse_now_ns().saturating_sub(GATEWAY_CACHE_AGE_NS);
        for (slot, value) in self.values.iter().enumerate() {
            let mut value = *value;
            value[..8].copy_from_slice(&now.to_ne_bytes());
            self.map.set(
                slot as u32,
                PerCpuValues::try_from(vec![value; self.cpus])?,
                0,
            )?;
        }
        Ok(())
    }
}

/// How old the gateway's route is made to look: well within the datapath's 100 ms.
const GATEWAY_CACHE_AGE_NS: u64 = 30_000_000;

/// `bpf_ktime_get_coarse_ns`'s clock.
fn coarse_now_ns() -> u64 {
    let mut ts = libc::timespec {
        tv_sec: 0,
        tv_nsec: 0,
    };
    // SAFETY: a valid timespec to write.
    unsafe { libc::clock_gettime(libc::CLOCK_MONOTONIC_COARSE, &mut ts) };
    ts.tv_sec as u64 * 1_000_000_000 + ts.tv_nsec as u64
}

fn slot_name(slot: u32) -> String {
    let per_hook = Counter::ALL.len() as u32;
    let hook = Hook::ALL[(slot / per_hook) as usize];
    let counter = Counter::ALL[(slot % per_hook) as usize];
    format!("{hook:?}/{}", counter.name())
}

fn compare(
    expected: &Expected,
    actual: &KernelRun,
    moved: &BTreeMap<u32, CounterValue>,
    step: &Step,
) -> Vec<Failure> {
    let mut failures = Vec::new();
    let program = step.program.name();
    match (&expected.outcome, actual) {
        (None, None) => {}
        (Some((want, _)), Some((got, _))) if want != got => failures.push(Failure {
            signature: format!(
                "{program}: return code {} != {}",
                action_name(*got),
                action_name(*want)
            ),
            message: format!(
                "return code: kernel {}, host {}",
                action_name(*got),
                action_name(*want)
            ),
        }),
        (Some((_, want)), Some((_, got))) if want != got => failures.push(Failure {
            signature: format!("{program}: rewritten bytes"),
            message: format!(
                "frame after the run differs at bytes {:?}:\n  kernel {}\n  host   {}",
                differing(want, got),
                hex(got),
                hex(want)
            ),
        }),
        (Some(_), Some(_)) => {}
        (want, got) => failures.push(Failure {
            signature: format!("{program}: accepted or refused"),
            message: format!(
                "BPF_PROG_TEST_RUN {}, host expected it to {}",
                if got.is_some() {
                    "ran"
                } else {
                    "refused the frame"
                },
                if want.is_some() { "run" } else { "be refused" }
            ),
        }),
    }
    let mut want: BTreeMap<u32, CounterValue> = BTreeMap::new();
    for (hook, counter, size) in &expected.counts {
        let entry = want.entry(slot(*hook, *counter)).or_default();
        entry.packets += size.packets;
        entry.bytes += size.bytes;
    }
    if want != *moved {
        let show = |m: &BTreeMap<u32, CounterValue>| {
            m.iter()
                .map(|(s, v)| format!("{} +{}p/+{}B", slot_name(*s), v.packets, v.bytes))
                .collect::<Vec<_>>()
                .join(", ")
        };
        failures.push(Failure {
            signature: format!(
                "{program}: counters {} != {}",
                moved
                    .keys()
                    .map(|s| slot_name(*s))
                    .collect::<Vec<_>>()
                    .join("+"),
                want.keys()
                    .map(|s| slot_name(*s))
                    .collect::<Vec<_>>()
                    .join("+")
            ),
            message: format!("counters: kernel [{}], host [{}]", show(moved), show(&want)),
        });
    }
    failures
}

fn action_name(action: u32) -> String {
    match action {
        TC_ACT_UNSPEC => "TC_ACT_UNSPEC (pass)".into(),
        TC_ACT_SHOT => "TC_ACT_SHOT (drop)".into(),
        TC_ACT_REDIRECT => "TC_ACT_REDIRECT".into(),
        other => format!("{other}"),
    }
}

fn differing(a: &[u8], b: &[u8]) -> Vec<usize> {
    let mut out: Vec<usize> = (0..a.len().max(b.len()))
        .filter(|&i| a.get(i) != b.get(i))
        .collect();
    out.truncate(16);
    out
}

pub fn hex(bytes: &[u8]) -> String {
    bytes.iter().fold(String::new(), |mut s, b| {
        let _ = write!(s, "{b:02x}");
        s
    })
}

fn unhex(text: &str) -> Result<Vec<u8>> {
    ensure!(text.len().is_multiple_of(2), "odd number of hex digits");
    (0..text.len())
        .step_by(2)
        .map(|i| u8::from_str_radix(&text[i..i + 2], 16).context("not hex"))
        .collect()
}

/// Invariants on what the kernel did with a step, whatever the model says.
fn invariants(node: &NodeFacts, step: &Step, action: u32, out: &[u8]) -> Vec<Failure> {
    let mut broken = Vec::new();
    let program = step.program.name();
    let mut fail = |name: &str, detail: String| {
        broken.push(Failure {
            signature: format!("{program}: invariant: {name}"),
            message: format!("invariant broken: {name}: {detail}"),
        })
    };
    if ![TC_ACT_UNSPEC, TC_ACT_SHOT, TC_ACT_REDIRECT].contains(&action) {
        fail("known return code", action_name(action));
    }
    if action != TC_ACT_REDIRECT {
        return broken;
    }
    if step.program == ProgramKind::PodIngress {
        fail("pod_ingress never redirects", String::new());
        return broken;
    }
    let Ok(input) = parse(&step.frame[..], step.frame.len()) else {
        fail("only parsed packets are redirected", String::new());
        return broken;
    };
    let Ok(sent) = parse(out, out.len()) else {
        fail("a redirected packet parses", hex(out));
        return broken;
    };
    let family = sent.family;
    if family == Family::V4 && !ipv4_header_checksum_ok(out) {
        fail(
            "a redirected packet keeps a valid IPv4 header checksum",
            String::new(),
        );
    }
    if l4_checksum_ok(&step.frame) == Some(true) && l4_checksum_ok(out) != Some(true) {
        fail(
            "a redirected packet keeps a valid transport checksum",
            format!("protocol {}", sent.protocol),
        );
    }
    // What went to the gateway (`pod_egress`'s output) or came back from it
    // (`uplink_ingress`'s input: a Service reply gets the Service's source back on its
    // way to the Pod) is Pod-to-Pod.
    let crossed = match step.program {
        ProgramKind::UplinkIngress => &input,
        _ => &sent,
    };
    let kind = |addr: &[u8; 16]| node.addr_kind(family, addr);
    if crossed.family != family
        || kind(&crossed.src) != AddrKind::Pod
        || kind(&crossed.dst) != AddrKind::Pod
        || kind(&sent.dst) != AddrKind::Pod
    {
        fail(
            "only same-node Pod-to-Pod packets are redirected",
            format!(
                "{} -> {}",
                show_addr(family, &crossed.src),
                show_addr(family, &crossed.dst)
            ),
        );
    }
    let changed = rewritten_elsewhere(&step.frame, &input, out);
    if !changed.is_empty() {
        fail(
            "a redirect rewrites only the MACs, the hop, the source and their checksums",
            format!("bytes {changed:?} changed"),
        );
    }
    let ingress = node.ifindex(step.ingress);
    match step.program {
        ProgramKind::PodEgress => {
            if sent.ttl != input.ttl {
                fail(
                    "pod_egress leaves the TTL alone",
                    format!("{} -> {}", input.ttl, sent.ttl),
                );
            }
            if input.fragment != FragmentPart::Later {
                let own = node
                    .pod_ifaces
                    .contains_key(&ingress)
                    .then(|| node.pod_on(ingress))
                    .flatten()
                    .map(|pod: &PodFacts| pod.addr(family));
                if own != Some(sent.src) {
                    fail(
                        "pod_egress sends a Pod's packet with that Pod's own source",
                        format!(
                            "entered on {}, sent from {}",
                            step.ingress.name(),
                            show_addr(family, &sent.src)
                        ),
                    );
                }
            }
        }
        ProgramKind::UplinkIngress => {
            if u16::from(sent.ttl) + 1 != u16::from(input.ttl) {
                fail(
                    "uplink_ingress spends exactly one hop",
                    format!("{} -> {}", input.ttl, sent.ttl),
                );
            }
        }
        ProgramKind::PodIngress => {}
    }
    broken
}

/// The bytes a redirect changed that it has no business changing: anything but the
/// MACs, the TTL or hop limit, the IPv4 header checksum, the source address and, when
/// this packet carries the transport header, the source port and transport checksum.
fn rewritten_elsewhere(
    before: &[u8],
    packet: &visibility_common::packet::Packet,
    after: &[u8],
) -> Vec<usize> {
    use visibility_common::packet::{
        ETH_HLEN, IPPROTO_TCP, IPPROTO_UDP, IPV4_CHECKSUM_OFFSET, IPV4_TTL_OFFSET,
        IPV6_HOP_LIMIT_OFFSET, Transport,
    };
    let mut allowed: Vec<std::ops::Range<usize>> = Vec::new();
    allowed.push(0..12);
    match packet.family {
        Family::V4 => {
            allowed.push(IPV4_TTL_OFFSET..IPV4_TTL_OFFSET + 1);
            allowed.push(IPV4_CHECKSUM_OFFSET..IPV4_CHECKSUM_OFFSET + 2);
            allowed.push(ETH_HLEN + 12..ETH_HLEN + 16);
        }
        Family::V6 => {
            allowed.push(IPV6_HOP_LIMIT_OFFSET..IPV6_HOP_LIMIT_OFFSET + 1);
            allowed.push(ETH_HLEN + 8..ETH_HLEN + 24);
        }
    }
    if packet.fragment != FragmentPart::Later && packet.transport == Transport::Read {
        let l4 = usize::from(packet.l4_offset);
        allowed.push(l4..l4 + 2);
        match packet.protocol {
            IPPROTO_TCP => allowed.push(l4 + 16..l4 + 18),
            IPPROTO_UDP => allowed.push(l4 + 6..l4 + 8),
            _ => {}
        }
    }
    let mut out: Vec<usize> = (0..before.len().max(after.len()))
        .filter(|&i| before.get(i) != after.get(i))
        .filter(|i| !allowed.iter().any(|range| range.contains(i)))
        .collect();
    out.truncate(8);
    out
}

fn show_addr(family: Family, addr: &[u8; 16]) -> String {
    match family {
        Family::V4 => std::net::Ipv4Addr::from([addr[0], addr[1], addr[2], addr[3]]).to_string(),
        Family::V6 => std::net::Ipv6Addr::from(*addr).to_string(),
    }
}

// ---------------------------------------------------------------------------------------
// Cases and the corpus
// ---------------------------------------------------------------------------------------

fn program_of(name: &str) -> Option<ProgramKind> {
    ProgramKind::ALL.into_iter().find(|p| p.name() == name)
}

/// A case as text: a comment, the settings when they are not the default, then one
/// line per step, `program ifindex ingress hex`.
fn case_text(config: Config, steps: &[Step], comment: &str) -> String {
    let mut text = String::new();
    for line in comment.lines() {
        let _ = writeln!(text, "# {line}");
    }
    if config != Config::default() {
        let _ = writeln!(text, "{}", config.text());
    }
    for step in steps {
        let _ = writeln!(
            text,
            "{} {} {} {}",
            step.program.name(),
            step.ifindex.name(),
            step.ingress.name(),
            hex(&step.frame)
        );
    }
    text
}

fn parse_case(text: &str) -> Result<(Config, Vec<Step>)> {
    let mut steps = Vec::new();
    let mut config = Config::default();
    for line in text.lines().map(str::trim) {
        if line.is_empty() || line.starts_with('#') {
            continue;
        }
        if let Some(rest) = line.strip_prefix("config ") {
            config = Config::parse(&rest.split_whitespace().collect::<Vec<_>>())?;
            continue;
        }
        let mut fields = line.split_whitespace();
        let mut next = || {
            fields
                .next()
                .with_context(|| format!("short line {line:?}"))
        };
        let program = next()?;
        let program = program_of(program).with_context(|| format!("no program {program}"))?;
        let ifindex = next()?;
        let ifindex = Iface::parse(ifindex).with_context(|| format!("no interface {ifindex}"))?;
        let ingress = next()?;
        let ingress = Iface::parse(ingress).with_context(|| format!("no interface {ingress}"))?;
        let frame = unhex(fields.next().unwrap_or(""))?;
        steps.push(Step {
            program,
            ifindex,
            ingress,
            frame,
        });
    }
    Ok((config, steps))
}

fn save_case(dir: &Path, config: Config, steps: &[Step], comment: &str) -> Result<PathBuf> {
    let body = case_text(config, steps, "");
    let mut hasher = std::hash::DefaultHasher::new();
    body.hash(&mut hasher);
    fs::create_dir_all(dir).with_context(|| format!("creating {}", dir.display()))?;
    let path = dir.join(format!("{:016x}.case", hasher.finish()));
    fs::write(&path, case_text(config, steps, comment))
        .with_context(|| format!("writing {}", path.display()))?;
    Ok(path)
}

/// Runs a case's steps, after a reset when `replay` (a saved case starts from an empty
/// note of `pod_ingress`). Returns the steps run and the first failing step's failures.
fn run_case(
    h: &mut Harness,
    config: Config,
    steps: &[Step],
    replay: bool,
) -> Result<Option<StepFailures>> {
    h.configure(config)?;
    h.new_case();
    if replay {
        let failures = h.reset()?;
        if !failures.is_empty() {
            return Ok(Some((usize::MAX, failures)));
        }
    }
    for (i, step) in steps.iter().enumerate() {
        if h.too_late(step) {
            break;
        }
        let (_, failures) = h.step(step)?;
        if !failures.is_empty() {
            return Ok(Some((i, failures)));
        }
    }
    Ok(None)
}

/// A random case, run as it is made (what comes back from the gateway depends on what
/// the kernel sent). Returns the steps run and, if one failed, its failures.
fn random_case(h: &mut Harness, rng: &mut SmallRng) -> Result<(Vec<Step>, Option<StepFailures>)> {
    let config = if rng.random_bool(0.1) {
        Config::random(rng)
    } else {
        Config::default()
    };
    h.configure(config)?;
    h.new_case();
    let mut done: Vec<Step> = Vec::new();
    let mut queue: Vec<Step> = match rng.random_range(0..10) {
        0..=3 => vec![frames::single_step(rng)],
        _ => frames::forward_pair(rng),
    };
    queue.reverse();
    while let Some(step) = queue.pop() {
        if h.too_late(&step) {
            break;
        }
        let (actual, failures) = h.step(&step)?;
        done.push(step.clone());
        if !failures.is_empty() {
            let at = done.len() - 1;
            return Ok((done, Some((at, failures))));
        }
        if step.program != ProgramKind::PodEgress || done.len() > 8 {
            continue;
        }
        // What the gateway sends back, and the datagram's later fragments.
        let mut next = Vec::new();
        if let Some((TC_ACT_REDIRECT, sent)) = &actual
            && rng.random_bool(0.8)
        {
            next.extend(frames::returns(&h.node, sent, rng));
        }
        if rng.random_bool(0.5) {
            for _ in 0..rng.random_range(1..=2) {
                next.extend(frames::later_fragment_of(&step, rng));
            }
        }
        next.reverse();
        queue.extend(next);
    }
    Ok((done, None))
}

/// Well-formed frames whose every truncation the harness runs, on every run.
fn truncation_seeds() -> Vec<Vec<u8>> {
    let mut rng = SmallRng::seed_from_u64(0x7275_6e63);
    let mut seeds = Vec::new();
    for i in 0..32 {
        let family = if i % 2 == 0 { Family::V4 } else { Family::V6 };
        let (src, dst) = match family {
            Family::V4 => (addr16(pod_ipv4(0).into()), addr16(pod_ipv4(1).into())),
            Family::V6 => (addr16(pod_ipv6(0).into()), addr16(pod_ipv6(1).into())),
        };
        let mut frame = frames::frame_between(family, src, dst, &mut rng);
        frame.truncate(200);
        frames::fix_ip_length(&mut frame);
        frames::fix_checksums(&mut frame);
        seeds.push(frame);
    }
    seeds
}

/// Enters the node's network namespace for this thread, and leaves it when dropped.
struct InNamespace(fs::File);

impl InNamespace {
    fn enter(path: &Path) -> Result<Self> {
        let home = fs::File::open("/proc/thread-self/ns/net").context("this thread's netns")?;
        let target = fs::File::open(path).with_context(|| format!("opening {}", path.display()))?;
        nix::sched::setns(&target, nix::sched::CloneFlags::CLONE_NEWNET)
            .with_context(|| format!("setns({})", path.display()))?;
        Ok(Self(home))
    }
}

impl Drop for InNamespace {
    fn drop(&mut self) {
        if let Err(e) = nix::sched::setns(&self.0, nix::sched::CloneFlags::CLONE_NEWNET) {
            eprintln!("leaving the node's namespace: {e}");
        }
    }
}

/// Keeps this thread on the CPU it runs on: the datapath's note from `pod_ingress` to
/// `pod_egress` is per CPU, as are its route caches.
fn pin_to_this_cpu() -> Result<()> {
    // SAFETY: plain libc calls on a zeroed cpu_set_t.
    unsafe {
        let cpu = libc::sched_getcpu();
        ensure!(cpu >= 0, "sched_getcpu failed");
        let mut set: libc::cpu_set_t = std::mem::zeroed();
        libc::CPU_SET(cpu as usize, &mut set);
        ensure!(
            libc::sched_setaffinity(0, std::mem::size_of::<libc::cpu_set_t>(), &set) == 0,
            "sched_setaffinity: {}",
            std::io::Error::last_os_error()
        );
    }
    Ok(())
}

/// Runs the harness: the corpus, every truncation of the seed frames, then random cases
/// for `options.duration`. Needs root.
pub fn fuzz(options: &FuzzOptions) -> Result<Summary> {
    let seed = options.seed.unwrap_or_else(|| {
        let now = std::time::SystemTime::now()
            .duration_since(std::time::UNIX_EPOCH)
            .unwrap_or_default();
        now.as_nanos() as u64 ^ u64::from(std::process::id()) << 32
    });
    println!("fuzz: seed {seed} (repeat with --seed {seed})");
    let mut h = Harness::new()?;
    pin_to_this_cpu()?;
    let node_ns = h.lab.lab().node().path();
    let _inside = InNamespace::enter(&node_ns)?;
    let mut findings: Vec<String> = Vec::new();
    // Kinds of failure already reported: a kind found again is not saved again.
    let mut seen: HashSet<String> = HashSet::new();
    let mut cases = 0u64;
    let started = Instant::now();

    let report = |steps: &[Step], at: usize, failures: &[Failure], origin: &str| {
        let mut text = String::new();
        let _ = writeln!(text, "fuzz: FAILED ({origin})");
        for f in failures {
            let _ = writeln!(text, "  {}", f.message.replace('\n', "\n  "));
        }
        for (i, step) in steps.iter().enumerate() {
            let mark = if i == at { ">>" } else { "  " };
            let _ = writeln!(
                text,
                "  {mark} step {i}: {} on {} (entered on {}), {} bytes: {}",
                step.program.name(),
                step.ifindex.name(),
                step.ingress.name(),
                step.frame.len(),
                hex(&step.frame)
            );
        }
        print!("{text}");
    };

    // 1. The corpus: every saved case, from an empty state.
    let mut entries: Vec<PathBuf> = match fs::read_dir(&options.corpus) {
        Ok(dir) => dir
            .filter_map(|e| e.ok().map(|e| e.path()))
            .filter(|p| p.extension().is_some_and(|e| e == "case"))
            .collect(),
        Err(_) => Vec::new(),
    };
    entries.sort();
    for path in &entries {
        let text =
            fs::read_to_string(path).with_context(|| format!("reading {}", path.display()))?;
        let (config, steps) =
            parse_case(&text).with_context(|| format!("parsing {}", path.display()))?;
        cases += 1;
        if let Some((at, failures)) = run_case(&mut h, config, &steps, true)? {
            report(&steps, at, &failures, &path.display().to_string());
            findings.push(format!("{}: {}", path.display(), failures[0].signature));
            seen.insert(failures[0].signature.clone());
        }
    }
    println!(
        "fuzz: replayed {} corpus case(s) from {}",
        entries.len(),
        options.corpus.display()
    );
    let mut handle = |h: &mut Harness,
                      steps: Vec<Step>,
                      at: usize,
                      failures: Vec<Failure>,
                      prefix: Option<Step>,
                      findings: &mut Vec<String>|
     -> Result<()> {
        let signature = failures[0].signature.clone();
        if !seen.insert(signature.clone()) {
            return Ok(());
        }
        let mut saved: Vec<Step> = prefix.into_iter().collect();
        saved.extend(steps.iter().cloned());
        report(&steps, at, &failures, &format!("seed {seed}"));
        let comment = format!(
            "found by `cargo xtask fuzz` (seed {seed})\n{}",
            failures
                .iter()
                .map(|f| f.message.clone())
                .collect::<Vec<_>>()
                .join("\n")
        );
        let config = h.config;
        let path = save_case(&options.corpus, config, &saved, &comment)?;
        println!("fuzz: saved the case to {}", path.display());
        // The saved case must fail the same way from an empty state.
        match run_case(h, config, &saved, true)? {
            Some(_) => {}
            None => println!("fuzz: note: {} passed when replayed alone", path.display()),
        }
        findings.push(format!("{}: {signature}", path.display()));
        Ok(())
    };

    // 2. Every truncation of well-formed frames, at each program.
    for seed_frame in truncation_seeds() {
        for frame in frames::truncations(&seed_frame) {
            for (program, ifindex, ingress) in [
                (ProgramKind::PodIngress, Iface::Veth(0), Iface::Veth(0)),
                (ProgramKind::PodEgress, Iface::Veth(1), Iface::Veth(0)),
                (ProgramKind::UplinkIngress, Iface::Uplink, Iface::Uplink),
            ] {
                let steps = vec![Step {
                    program,
                    ifindex,
                    ingress,
                    frame: frame.clone(),
                }];
                cases += 1;
                let prefix = h.model.pending_pre_stack();
                if let Some((at, failures)) = run_case(&mut h, Config::default(), &steps, false)? {
                    handle(&mut h, steps, at, failures, prefix, &mut findings)?;
                }
            }
        }
    }
    println!(
        "fuzz: {} packets: the corpus and every truncation of {} frames",
        h.packets,
        truncation_seeds().len()
    );

    // 3. Random cases until the time is up.
    let mut rng = SmallRng::seed_from_u64(seed);
    let deadline = Instant::now() + options.duration;
    let mut last_report = Instant::now();
    let mut packets_at_report = h.packets;
    while Instant::now() < deadline {
        let prefix = h.model.pending_pre_stack();
        let (steps, failed) = random_case(&mut h, &mut rng)?;
        cases += 1;
        if let Some((at, failures)) = failed {
            handle(&mut h, steps, at, failures, prefix, &mut findings)?;
        }
        if last_report.elapsed() >= Duration::from_secs(10) {
            let rate = (h.packets - packets_at_report) as f64 / last_report.elapsed().as_secs_f64();
            println!(
                "fuzz: {} packets in {} cases, {rate:.0} packets/s, {} finding(s)",
                h.packets,
                cases,
                findings.len()
            );
            last_report = Instant::now();
            packets_at_report = h.packets;
        }
    }
    let elapsed = started.elapsed().as_secs_f64();
    // What the programs did over the run, to show which paths the cases reached.
    for hook in Hook::ALL {
        let hits: Vec<String> = Counter::ALL
            .iter()
            .filter_map(|counter| {
                let packets = h.counters[slot(*hook, *counter) as usize].packets;
                (packets > 0).then(|| format!("{} {packets}", counter.name()))
            })
            .collect();
        println!("fuzz: {hook:?}: {}", hits.join(", "));
    }
    if findings.is_empty() {
        println!(
            "fuzz: {} packets tried in {cases} cases in {elapsed:.0}s (seed {seed}, {} cut short by a stalled machine): host and kernel agree, no invariant broken",
            h.packets, h.late
        );
    } else {
        println!("fuzz: findings (failing cases, in the corpus):");
        for finding in &findings {
            println!("  {finding}");
        }
        println!(
            "fuzz: {} packets tried in {cases} cases in {elapsed:.0}s (seed {seed}, {} cut short by a stalled machine): {} finding(s)",
            h.packets,
            h.late,
            findings.len()
        );
    }
    Ok(Summary {
        packets: h.packets,
        cases,
        seed,
        findings,
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn cases_read_back_as_written() {
        let steps = vec![
            Step {
                program: ProgramKind::PodIngress,
                ifindex: Iface::Veth(0),
                ingress: Iface::Veth(0),
                frame: vec![1, 2, 0xff],
            },
            Step {
                program: ProgramKind::UplinkIngress,
                ifindex: Iface::Uplink,
                ingress: Iface::Lo,
                frame: Vec::new(),
            },
        ];
        let config = Config {
            gateway_v6: false,
            ..Config::default()
        };
        let text = case_text(config, &steps, "a\nb");
        assert_eq!(parse_case(&text).unwrap(), (config, steps));
    }

    #[test]
    fn generated_frames_are_well_formed() {
        let mut rng = SmallRng::seed_from_u64(1);
        let mut parsed = 0;
        for _ in 0..2000 {
            let frame = frames::seed_frame(&mut rng);
            assert!(frame.len() <= frames::MAX_FRAME);
            if let Ok(p) = parse(&frame[..], frame.len()) {
                parsed += 1;
                if p.fragment == FragmentPart::Whole && frame[12..14] != [0x81, 0] {
                    assert_ne!(l4_checksum_ok(&frame), Some(false), "{}", hex(&frame));
                }
            }
        }
        assert!(parsed > 1800, "{parsed} of 2000 parsed");
    }
}
