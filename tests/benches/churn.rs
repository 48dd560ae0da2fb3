//! The daemon under churn: Pod interfaces made and deleted in bursts, as on a busy node
//! (500 in bursts of 50 by default), with the real daemon on a lab node. Each burst's Pods
//! are made at once ([`visibility_tests::churn`]), each one's attach latency is taken as
//! `attach_latency` takes it (its host route appearing -> both programs' link pins;
//! [`visibility_tests::attach_watch`]), and once all are attached the burst is deleted
//! and the next one made, while the daemon still cleans up after the last.
//!
//! It fails unless every Pod is attached within
//! [`visibility_tests::attach_watch::ATTACH_TIMEOUT`] and, after the last
//! burst, the daemon has left nothing behind ([`visibility_tests::churn::leftovers`]:
//! link pins, TCX attachments, Pod-interface map entries, status entries). It reports
//! attach latency (p50, p99, max), and the daemon's CPU time over the churn (`utime` +
//! `stime` of `/proc/PID/stat`) and its memory at the end (`VmRSS`, and `VmHWM`, the
//! peak since it started).
//!
//! The daemon's slow reconcile is held off (`--reconcile-interval 3600`): every
//! attachment and every clean-up comes from its handling of netlink events, which is
//! what the figures measure.
//!
//! Prints the figures on standard error; with `--json` also one JSON object on standard
//! output (`cargo xtask bench` uses it).
//!
//! **Needs root** and the daemon binary: `cargo build --release -p visibility-userspace`,
//! then `cargo bench -p visibility-tests --bench churn -- [--quick] [--json]
//! [--interfaces N] [--burst N]`. `--quick`: 20 interfaces in bursts of 10.

use std::{
    process::ExitCode,
    time::{Duration, Instant},
};

use anyhow::{Context as _, Result, bail, ensure};
use serde_json::json;
use visibility_tests::{
    attach_watch::Watch,
    churn::{CHURN_CIDR, Churn, leftovers, wait_until_cleaned_up},
    lab::{POD_CIDR_V4, POD_CIDR_V6},
    measure::{cpu_seconds, memory_mib, ms, percentile},
    node::Node,
};

/// How long the daemon may take, after the last burst is deleted, to clean up after it.
const CLEAN_UP_TIMEOUT: Duration = Duration::from_secs(60);

struct Options {
    interfaces: usize,
    burst: usize,
    json: bool,
}

impl Options {
    fn parse(args: impl Iterator<Item = String>) -> Result<Self> {
        let args: Vec<String> = args.collect();
        let quick = args.iter().any(|a| a == "--quick");
        let mut options = Self {
            interfaces: if quick { 20 } else { 500 },
            burst: if quick { 10 } else { 50 },
            json: false,
        };
        let mut iter = args.iter();
        while let Some(arg) = iter.next() {
            match arg.as_str() {
                "--quick" | "--bench" => {}
                "--json" => options.json = true,
                "--interfaces" => {
                    options.interfaces = iter.next().context("--interfaces N")?.parse()?;
                }
                "--burst" => options.burst = iter.next().context("--burst N")?.parse()?,
                other => bail!(
                    "unknown argument {other:?} (known: --quick, --json, --interfaces N, --burst N)"
                ),
            }
        }
        ensure!(
            options.burst >= 1 && options.interfaces.is_multiple_of(options.burst),
            "--interfaces must be a multiple of --burst"
        );
        Ok(options)
    }
}

fn main() -> ExitCode {
    match run() {
        Ok(()) => ExitCode::SUCCESS,
        Err(error) => {
            eprintln!("churn: {error:#}");
            ExitCode::FAILURE
        }
    }
}

fn run() -> Result<()> {
    let options = Options::parse(std::env::args().skip(1))?;
    ensure!(
        nix::unistd::geteuid().is_root(),
        "needs root (network namespaces, BPF)"
    );
    let mut node = Node::new("churn", 2).context("building the lab")?;
    node.capture_daemon_log();
    let result = measure(&mut node, &options);
    if result.is_err() {
        node.print_daemon_log_tail(40);
    }
    result
}

fn measure(node: &mut Node, options: &Options) -> Result<()> {
    node.start_daemon(
        [
            "--pod-cidr",
            POD_CIDR_V4,
            "--pod-cidr",
            POD_CIDR_V6,
            "--pod-cidr",
            CHURN_CIDR,
            "--reconcile-interval",
            "3600",
        ]
        .iter()
        .map(|s| s.to_string())
        .collect(),
    )?;
    let status = node.status()?;
    let mode = status["daemon"]["attach_mode"].as_str().unwrap_or_default();
    ensure!(
        mode == "tcx",
        "the daemon attaches with {mode:?}; this bench watches TCX link pins (Linux 6.6+)"
    );
    let pid = node.daemon_pid().context("the daemon's pid")?;
    let mut churn = Churn::new(&node.lab, options.burst)?;
    let watch = Watch::start(&node.lab, node.pin_dir.join("links"))?;

    let bursts = options.interfaces / options.burst;
    eprintln!(
        "churn: {} Pod interfaces in {bursts} bursts of {}",
        options.interfaces, options.burst
    );
    let cpu_before = cpu_seconds(pid).context("reading the daemon's CPU time")?;
    let started = Instant::now();
    let mut samples = Vec::with_capacity(options.interfaces);
    for _ in 0..bursts {
        let pods = churn.add_burst()?;
        for pod in &pods {
            let entry = watch
                .wait_attached(pod.addr, pod.ifindex)
                .with_context(|| format!("Pod interface {}", pod.name))?;
            let attached = entry.attached_at.unwrap_or(entry.route_at);
            samples.push(ms(attached.saturating_duration_since(entry.route_at)));
        }
        churn.remove(&pods)?;
    }
    wait_until_cleaned_up(node, CLEAN_UP_TIMEOUT)?;
    let elapsed = started.elapsed();
    let cpu = cpu_seconds(pid).context("reading the daemon's CPU time")? - cpu_before;
    let (rss, peak_rss) = memory_mib(&pid.to_string());
    watch.stop();
    let left = leftovers(node)?.len();

    let (p50, p99) = (percentile(&samples, 50.0), percentile(&samples, 99.0));
    let max = percentile(&samples, 100.0);
    eprintln!(
        "churn: {} Pod interfaces in {bursts} bursts of {}: attach p50 {p50:.1} ms, p99 {p99:.1} ms, max {max:.1} ms; daemon CPU {cpu:.2} s in {:.1} s, RSS {rss:.1} MiB (peak {peak_rss:.1} MiB); {left} left behind",
        samples.len(),
        options.burst,
        elapsed.as_secs_f64(),
    );
    if options.json {
        let document = json!({
            "interfaces": samples.len(),
            "bursts": bursts,
            "burst": options.burst,
            "p50_ms": p50,
            "p99_ms": p99,
            "max_ms": max,
            "daemon_cpu_seconds": cpu,
            "seconds": elapsed.as_secs_f64(),
            "daemon_rss_mib": rss,
            "daemon_peak_rss_mib": peak_rss,
            "leftovers": left,
            "attach_mode": mode,
            "measured": "RTM_NEWROUTE for the Pod's /32 seen in the node namespace -> both link pins exist (1 ms polling); CPU from /proc/PID/stat over the churn and the clean-up; memory from /proc/PID/status at the end",
        });
        println!("{document}");
    }
    Ok(())
}
