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
//! * the FIB lookup of the gateway (its cache is kept fresh, see [`lab_maps::GatewayCache`]), the
//!   uplink's MTU and the ICMP error for packets too big (frames stay within 1514 bytes),
//!   an unresolved Pod neighbour (the lab's are permanent), GSO packets and a driver's
//!   `CHECKSUM_COMPLETE` (`skb->csum`): the kernel tests (`datapath_test_run`) cover them;
//! * what the flow map holds beyond each flow's path (packets, bytes, times, flags) and
//!   the log lines: the flow's path decides what the uplink does, and is modelled.
//!
//! Cases are a few steps that follow a packet through the node ([`steps`]); each starts
//! from map entries of its own (see [`facts::MapKey`]). A case that fails is printed
//! (program, interfaces and frame as hex for each step) and saved to the corpus
//! directory as `<hash>.case` ([`case`]); every run replays the corpus first, then every
//! truncation of a set of well-formed frames, then random cases until the time is up.
//!
//! The parts: [`frames`] and [`mutations`] make frames, [`steps`] makes cases of them;
//! [`model`] (with [`rewrites`]) is the host's side, [`harness`] (with [`lab_maps`]) the
//! kernel's; [`check`] compares the two; [`facts`] is what they share.

mod case;
mod check;
mod facts;
mod frames;
mod harness;
mod lab_maps;
mod model;
mod mutations;
mod rewrites;
mod steps;

use std::{
    collections::HashSet,
    fmt::Write as _,
    fs,
    path::PathBuf,
    time::{Duration, Instant},
};

use anyhow::{Context as _, Result};
use rand::{SeedableRng, rngs::SmallRng};
use visibility::datapath::ProgramKind;
use visibility_common::{
    counters::{Counter, slot},
    hook::Hook,
    packet::Family,
};

use self::{
    case::{Config, hex, parse_case, save_case},
    check::Failure,
    facts::{Iface, Step},
    harness::{Harness, InNamespace, pin_to_this_cpu, random_case, run_case},
    lab_maps::addr16,
};
use crate::lab::{pod_ipv4, pod_ipv6};

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
        for frame in mutations::truncations(&seed_frame) {
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
