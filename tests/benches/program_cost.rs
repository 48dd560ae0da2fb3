//! What each TC program costs per packet, measured by the kernel with
//! `BPF_PROG_TEST_RUN` and `repeat`, next to `bench_baseline` (parse and one Pod CIDR
//! lookup, the least any program of this kind does).
//!
//! **Needs root** (a lab's network namespaces, loading BPF). Without root it says so and
//! exits successfully.
//!
//! Run: `cargo bench -p visibility-tests --bench program_cost [-- --json] [FILTER...]`;
//! a filter keeps the baseline and the cases whose program or case names contain it.
//!
//! Each sample is about a million runs; the table shows the median of five samples (and
//! their spread). Every case is sampled once a round, five rounds, so that the machine's
//! busy spells weigh on the baseline as on the rest.
//!
//! Programs that spend a hop change the packet on every run, and the kernel hands each
//! run the skb the previous one left, so after 254 runs a TTL of 255 would be spent and
//! the rest would measure the pass path. Those cases therefore run in batches of 254 on
//! a fresh copy of the frame. The bench checks the counters after each
//! sample: every run must have taken the path the row names.

use std::time::Instant;

use anyhow::{Context as _, Result, ensure};
use aya::{
    maps::{LpmTrie, lpm_trie::Key},
    programs::SchedClassifier,
};
use visibility::datapath::ProgramKind;
use visibility_common::{
    bench_program_names, counters::Counter, map_names, testing::FrameBuilder, testing::Transport,
    verdict::Hook,
};
use visibility_tests::{
    datapath_harness::{
        DatapathLab, SkbCtx, SoloProgram, TC_ACT_REDIRECT, TC_ACT_UNSPEC, hook_of, time_runs,
    },
    lab::{POD_CIDR_V4, pod_ipv4},
};

/// Samples per case; the table shows their median.
const SAMPLES: usize = 5;
/// Runs per sample.
const RUNS: u32 = 1_000_000;
/// Runs per batch for cases that spend a hop: a TTL of 255 allows 254.
const HOP_BATCH: u32 = 254;

const SRC: usize = 0;
const DST: usize = 1;

/// What is measured.
enum Target {
    Datapath(ProgramKind),
    Baseline,
}

struct Case {
    target: Target,
    what: &'static str,
    frame: Vec<u8>,
    ctx: SkbCtx,
    /// The return value of every run.
    action: u32,
    /// The counter every run moves (datapath programs only).
    counter: Option<Counter>,
    /// Whether each run spends a hop, so runs must be batched.
    spends_hop: bool,
    /// A run that must come first: the uplink hands on only packets of flows that
    /// `pod_egress` sent to the gateway within the return window.
    after: Option<(ProgramKind, Vec<u8>, SkbCtx)>,
}

impl Case {
    fn program(&self) -> &'static str {
        match self.target {
            Target::Datapath(kind) => kind.name(),
            Target::Baseline => bench_program_names::BENCH_BASELINE,
        }
    }

    /// (runs per batch, batches) for about [`RUNS`] runs.
    fn batching(&self) -> (u32, u32) {
        if self.spends_hop {
            (HOP_BATCH, RUNS.div_ceil(HOP_BATCH))
        } else {
            (RUNS, 1)
        }
    }
}

fn udp_frame(src: [u8; 4], dst: [u8; 4]) -> FrameBuilder {
    let transport = Transport::Udp {
        src_port: 40000,
        dst_port: 5000,
    };
    FrameBuilder::ipv4(src, dst, transport)
        .payload(&[0x5a; 64])
        .ttl(255)
}

/// `bench_baseline`, loaded on its own, with the lab's Pod CIDR in its map.
struct Baseline(SoloProgram);

impl Baseline {
    fn load() -> Result<Self> {
        let mut solo = SoloProgram::load_bench(bench_program_names::BENCH_BASELINE)?;
        let cidr: ipnet::Ipv4Net = POD_CIDR_V4.parse()?;
        let map = solo
            .ebpf_mut()
            .map_mut(map_names::POD_CIDRS_V4)
            .context("no Pod CIDR map")?;
        let mut pods: LpmTrie<_, [u8; 4], u8> = LpmTrie::try_from(map)?;
        pods.insert(
            &Key::new(u32::from(cidr.prefix_len()), cidr.network().octets()),
            1,
            0,
        )?;
        Ok(Self(solo))
    }

    fn program(&self) -> Result<&SchedClassifier> {
        self.0.program()
    }
}

/// One sample of `case`: the mean nanoseconds per run.
fn sample(h: &DatapathLab, baseline: &Baseline, case: &Case) -> Result<f64> {
    if let Some((kind, frame, ctx)) = &case.after {
        h.run(*kind, frame, *ctx)?;
    }
    let (repeat, batches) = case.batching();
    let before = h.counters()?;
    let (ns, last) = match case.target {
        Target::Datapath(kind) => h.time_runs(kind, &case.frame, case.ctx, repeat, batches)?,
        Target::Baseline => time_runs(
            h.lab().node(),
            baseline.program()?,
            &case.frame,
            case.ctx,
            repeat,
            batches,
        )?,
    };
    ensure!(
        last.return_value == case.action,
        "{} {}: returned {}, not {}",
        case.program(),
        case.what,
        last.return_value,
        case.action
    );
    if let (Target::Datapath(kind), Some(counter)) = (&case.target, case.counter) {
        let runs = u64::from(repeat) * u64::from(batches);
        let moved: Vec<(Hook, Counter, u64)> = h
            .counters()?
            .since(&before)
            .into_iter()
            .map(|(hook, counter, value)| (hook, counter, value.packets))
            .collect();
        ensure!(
            moved == [(hook_of(*kind), counter, runs)],
            "{} {}: {runs} runs moved {moved:?}",
            case.program(),
            case.what
        );
    }
    Ok(ns)
}

fn main() -> Result<()> {
    if !nix::unistd::geteuid().is_root() {
        eprintln!("program_cost: skipped, it needs root (network namespaces, BPF)");
        return Ok(());
    }
    let started = Instant::now();
    // One CPU for every run: pod_ingress notes a packet for pod_egress per CPU, as the
    // kernel runs both for one packet on one CPU.
    visibility_tests::lab::pin_to_cpu(1)?;
    let mut h = DatapathLab::new("bench")?;
    // As the daemon has it: both Pods' neighbours resolved, their veths registered.
    for pod in [SRC, DST] {
        h.set_pod_neighbours(pod, true)?;
        h.maps
            .add_pod_iface(h.host_veth(pod), true, h.host_veth(pod))?;
    }
    let baseline = Baseline::load()?;

    let (src, dst) = (pod_ipv4(SRC).octets(), pod_ipv4(DST).octets());
    let pod_to_pod = udp_frame(src, dst);
    let mut returned = pod_to_pod.clone();
    returned.src_mac = h.gateway_mac();
    returned.dst_mac = h.uplink_mac();
    let from_pod = h.pod_ingress_ctx(SRC);
    let forwarded = h.pod_egress_ctx(DST, h.host_veth(SRC));

    let cases = [
        Case {
            target: Target::Baseline,
            what: "parse + Pod CIDR lookup, IPv4 UDP pod to pod",
            frame: pod_to_pod.build(),
            ctx: from_pod,
            action: TC_ACT_UNSPEC,
            counter: None,
            spends_hop: false,
            after: None,
        },
        Case {
            target: Target::Datapath(ProgramKind::PodIngress),
            what: "counted, IPv4 UDP pod to pod",
            frame: pod_to_pod.build(),
            ctx: from_pod,
            action: TC_ACT_UNSPEC,
            counter: Some(Counter::PassPodToPod),
            spends_hop: false,
            after: None,
        },
        Case {
            target: Target::Datapath(ProgramKind::PodIngress),
            what: "counted, IPv4 UDP to 8.8.8.8",
            frame: udp_frame(src, [8, 8, 8, 8]).build(),
            ctx: from_pod,
            action: TC_ACT_UNSPEC,
            counter: Some(Counter::PassNotSameNode),
            spends_hop: false,
            after: None,
        },
        Case {
            target: Target::Datapath(ProgramKind::PodEgress),
            what: "redirected, IPv4 UDP pod to pod",
            frame: pod_to_pod.build(),
            ctx: forwarded,
            action: TC_ACT_REDIRECT,
            counter: Some(Counter::RedirectedToGateway),
            spends_hop: false,
            // As the kernel runs them: pod_ingress notes the packet first.
            after: Some((ProgramKind::PodIngress, pod_to_pod.build(), from_pod)),
        },
        Case {
            target: Target::Datapath(ProgramKind::UplinkIngress),
            what: "returned, IPv4 UDP to its pod",
            frame: returned.build(),
            ctx: h.uplink_ctx(),
            action: TC_ACT_REDIRECT,
            counter: Some(Counter::DeliveredFromGateway),
            spends_hop: true,
            after: Some((ProgramKind::PodEgress, pod_to_pod.build(), forwarded)),
        },
    ];

    // Only the baseline and the cases a filter names, if any: `-- pod_egress`.
    let filters: Vec<String> = std::env::args()
        .skip(1)
        .filter(|arg| !arg.starts_with("--"))
        .collect();
    let cases: Vec<Case> = cases
        .into_iter()
        .filter(|case| {
            matches!(case.target, Target::Baseline)
                || filters.is_empty()
                || filters.iter().any(|filter| {
                    case.program().contains(filter.as_str()) || case.what.contains(filter.as_str())
                })
        })
        .collect();
    // Sampled in rounds, every case once a round, so that a busy spell of the machine
    // weighs on the baseline as much as on the programs it is compared with.
    let mut samples = vec![Vec::with_capacity(SAMPLES); cases.len()];
    for _ in 0..SAMPLES {
        for (case, case_samples) in cases.iter().zip(&mut samples) {
            case_samples.push(sample(&h, &baseline, case)?);
        }
    }
    let mut rows = Vec::new();
    for (case, mut case_samples) in cases.iter().zip(samples) {
        case_samples.sort_by(f64::total_cmp);
        rows.push((case, case_samples));
    }
    let baseline_ns = rows[0].1[SAMPLES / 2];

    // With --json (as `cargo xtask bench` runs it) the table goes to standard error and
    // standard output carries a JSON document of the same rows.
    let json = std::env::args().any(|arg| arg == "--json");
    let mut table = format!(
        "\nBPF_PROG_TEST_RUN, median of {SAMPLES} samples of ~{RUNS} runs each ({} CPUs, kernel {})\n\n",
        std::thread::available_parallelism().map_or(0, usize::from),
        kernel_release()
    );
    table.push_str(&format!(
        "{:<15} {:<45} {:>10} {:>17} {:>10}\n",
        "program", "case", "ns/packet", "min..max", "x baseline"
    ));
    let mut json_rows = Vec::new();
    for (case, samples) in &rows {
        let median = samples[SAMPLES / 2];
        table.push_str(&format!(
            "{:<15} {:<45} {:>10.1} {:>17} {:>10.2}\n",
            case.program(),
            case.what,
            median,
            format!("{:.1}..{:.1}", samples[0], samples[SAMPLES - 1]),
            median / baseline_ns
        ));
        json_rows.push(serde_json::json!({
            "program": case.program(),
            "case": case.what,
            "ns_per_packet": median,
            "min_ns": samples[0],
            "max_ns": samples[SAMPLES - 1],
        }));
    }
    table.push_str(&format!(
        "\n(runs that spend a hop: batches of {HOP_BATCH}; the kernel reports whole ns per batch; {:.1} s in all)\n",
        started.elapsed().as_secs_f64()
    ));
    if json {
        eprint!("{table}");
        let document = serde_json::json!({
            "kernel": kernel_release(),
            "samples": SAMPLES,
            "runs_per_sample": RUNS,
            "rows": json_rows,
        });
        println!("{}", serde_json::to_string_pretty(&document)?);
    } else {
        print!("{table}");
    }
    Ok(())
}

fn kernel_release() -> String {
    std::fs::read_to_string("/proc/sys/kernel/osrelease")
        .map_or_else(|_| "?".into(), |r| r.trim().to_string())
}
