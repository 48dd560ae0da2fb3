//! The harness's hold on the lab: the datapath node, the model beside it and the kernel
//! maps a case clears; running one step on both sides, and a whole case, from this
//! thread, pinned to its CPU and inside the node's namespace.

use std::{
    collections::{BTreeMap, HashSet},
    fs,
    path::Path,
    time::{Duration, Instant},
};

use anyhow::{Context as _, Result, ensure};
use aya::{
    maps::{HashMap, MapData},
    programs::{TestRun as _, TestRunOptions},
};
use rand::{Rng, rngs::SmallRng};
use visibility::datapath::ProgramKind;
use visibility_common::{
    counters::{Counter, CounterValue, slot},
    flow::{FlowKey, FlowStats, NatLeg},
    hook::Hook,
    map_names,
    packet::{Family, parse},
};

use super::{
    case::Config,
    check::{Failure, KernelRun, StepFailures, compare, invariants},
    facts::{FRAGMENT_KEY_LEN, Iface, MapKey, NodeFacts, Step},
    frames,
    lab_maps::{
        GatewayCache, coarse_now_ns, exempt_prefixes, exemptions, node_facts, open_pinned,
        program_map,
    },
    model,
    model::{Expected, Model},
    steps,
};
use crate::datapath_harness::{DatapathLab, SkbCtx, TC_ACT_REDIRECT};

/// The lab, its datapath, the model, and the kernel maps a case clears.
pub(super) struct Harness {
    pub(super) lab: DatapathLab,
    pub(super) node: NodeFacts,
    pub(super) model: Model,
    pub(super) flows: HashMap<MapData, FlowKey, FlowStats>,
    pub(super) nat_legs: HashMap<MapData, FlowKey, NatLeg>,
    pub(super) fragments: HashMap<MapData, [u8; FRAGMENT_KEY_LEN], [u8; 8]>,
    pub(super) gateway_cache: GatewayCache,
    /// Keys whose kernel entry this case removed or wrote.
    pub(super) consistent: HashSet<MapKey>,
    /// The counters after the last step.
    pub(super) counters: Vec<CounterValue>,
    /// The settings in the maps now, and the gateways to put back.
    pub(super) config: Config,
    pub(super) gateways: [visibility_common::config::Gateway; 2],
    pub(super) packets: u64,
    /// When the case began: a flow it sent is fresh for the uplink for a second.
    pub(super) case_started: Instant,
    /// Cases cut short because the machine stalled them past [`LATE`].
    pub(super) late: u64,
}

/// How long a case may have run before `uplink_ingress` is asked about the flows it
/// sent: well within the datapath's return window (1 s). On a machine so loaded that a
/// case takes longer, the rest of the case is not run (and counted as late): whether
/// the kernel still finds the flow fresh is then a matter of timing, not of the code.
pub(super) const LATE: Duration = Duration::from_millis(500);

impl Harness {
    pub(super) fn new() -> Result<Self> {
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

    pub(super) fn read_counters(&self) -> Result<Vec<CounterValue>> {
        let mut out = vec![CounterValue::default(); Hook::ALL.len() * Counter::ALL.len()];
        for (hook, counter, value) in self.lab.maps.counters()? {
            out[slot(hook, counter) as usize] = value;
        }
        Ok(out)
    }

    pub(super) fn forget(&mut self, key: MapKey) {
        // Absent keys are the common case; any other error shows as a disagreement.
        let _ = match key {
            MapKey::Flow(key) => self.flows.remove(&key),
            MapKey::NatLeg(key) => self.nat_legs.remove(&key),
            MapKey::Fragment(key) => self.fragments.remove(&key),
        };
    }

    /// Puts `config` in the maps, and the model's copy of them in line.
    pub(super) fn configure(&mut self, config: Config) -> Result<()> {
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
    pub(super) fn new_case(&mut self) {
        self.case_started = Instant::now();
        self.model.new_case();
        self.consistent.clear();
    }

    /// Runs `step` in the kernel, in the calling thread's namespace (the node's).
    pub(super) fn run_kernel(&self, step: &Step) -> Result<KernelRun> {
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
    pub(super) fn too_late(&mut self, step: &Step) -> bool {
        let late = step.program == ProgramKind::UplinkIngress && self.case_started.elapsed() > LATE;
        self.late += u64::from(late);
        late
    }

    /// What the kernel's flow map holds for the flow of an uplink step's frame, to tell
    /// an evicted flow from a stale one when the two sides disagree.
    pub(super) fn flow_note(&self, step: &Step) -> String {
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
    pub(super) fn step(&mut self, step: &Step) -> Result<(KernelRun, Vec<Failure>)> {
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
            Expected::refused()
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
    pub(super) fn reset(&mut self) -> Result<Vec<Failure>> {
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

/// Runs a case's steps, after a reset when `replay` (a saved case starts from an empty
/// note of `pod_ingress`). Returns the steps run and the first failing step's failures.
pub(super) fn run_case(
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
pub(super) fn random_case(
    h: &mut Harness,
    rng: &mut SmallRng,
) -> Result<(Vec<Step>, Option<StepFailures>)> {
    let config = if rng.random_bool(0.1) {
        Config::random(rng)
    } else {
        Config::default()
    };
    h.configure(config)?;
    h.new_case();
    let mut done: Vec<Step> = Vec::new();
    let mut queue: Vec<Step> = match rng.random_range(0..10) {
        0..=3 => vec![steps::single_step(rng)],
        _ => steps::forward_pair(rng),
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
            next.extend(steps::returns(&h.node, sent, rng));
        }
        if rng.random_bool(0.5) {
            for _ in 0..rng.random_range(1..=2) {
                next.extend(steps::later_fragment_of(&step, rng));
            }
        }
        next.reverse();
        queue.extend(next);
    }
    Ok((done, None))
}

/// Enters the node's network namespace for this thread, and leaves it when dropped.
pub(super) struct InNamespace(fs::File);

impl InNamespace {
    pub(super) fn enter(path: &Path) -> Result<Self> {
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
pub(super) fn pin_to_this_cpu() -> Result<()> {
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
