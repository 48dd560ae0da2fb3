//! The daemon under churn: Pod interfaces made and deleted in bursts, as on a busy node
//! (500 in bursts of 50 by default), with the real daemon on a lab node. Each burst's Pods
//! are made at once ([`visibility_tests::churn`]), each one's attach latency is taken as
//! `attach_latency` takes it (its host route appearing -> both programs' link pins;
//! [`visibility_tests::attach_watch`]), and once all are attached the burst is deleted
//! and the next one made, while the daemon still cleans up after the last. A Pod's
//! latency includes its wait behind the Pods of its burst that are attached before it
//! (the kernel attaches one TCX program at a time), so the bench also reports how long a
//! burst takes, from its first route to its last Pod attached, per Pod (the median over
//! bursts).
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

use anyhow::{Context as _, Result, ensure};
use serde_json::json;
use visibility_tests::{
    attach_watch::Watch,
    bench_node::{BenchArgs, ensure_tcx, run_on_node},
    churn::{Churn, daemon_args, leftovers, wait_until_cleaned_up},
    measure::{cpu_seconds, memory_mib, ms, percentile},
    node::Node,
};

/// How long the daemon may take, after the last burst is deleted, to clean up after it.
const CLEAN_UP_TIMEOUT: Duration = Duration::from_secs(60);

fn main() -> ExitCode {
    run_on_node(
        "churn",
        &[("interfaces", 500, 20), ("burst", 50, 10)],
        measure,
    )
}

fn measure(node: &mut Node, args: &BenchArgs) -> Result<()> {
    let (interfaces, burst) = (args.size("interfaces"), args.size("burst"));
    ensure!(
        burst >= 1 && interfaces.is_multiple_of(burst),
        "--interfaces must be a multiple of --burst"
    );
    node.start_daemon(daemon_args())?;
    let mode = ensure_tcx(node)?;
    let pid = node.daemon_pid().context("the daemon's pid")?;
    let mut churn = Churn::new(&node.lab, burst)?;
    let watch = Watch::start(&node.lab, node.pin_dir.join("links"))?;

    let bursts = interfaces / burst;
    eprintln!(
        "churn: {} Pod interfaces in {bursts} bursts of {}",
        interfaces, burst
    );
    let cpu_before = cpu_seconds(pid).context("reading the daemon's CPU time")?;
    let started = Instant::now();
    let mut samples = Vec::with_capacity(interfaces);
    // Per burst, from its first route to its last Pod attached, per Pod.
    let mut per_pod = Vec::with_capacity(bursts);
    for _ in 0..bursts {
        let pods = churn.add_burst()?;
        let mut span: Option<(Instant, Instant)> = None;
        for pod in &pods {
            let entry = watch
                .wait_attached(pod.addr, pod.ifindex)
                .with_context(|| format!("Pod interface {}", pod.name))?;
            let attached = entry.attached_at.unwrap_or(entry.route_at);
            samples.push(ms(attached.saturating_duration_since(entry.route_at)));
            let (first, last) = span.unwrap_or((entry.route_at, attached));
            span = Some((first.min(entry.route_at), last.max(attached)));
        }
        if let Some((first, last)) = span {
            per_pod.push(ms(last.saturating_duration_since(first)) / pods.len() as f64);
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
    let per_pod = percentile(&per_pod, 50.0);
    eprintln!(
        "churn: {} Pod interfaces in {bursts} bursts of {}: attach p50 {p50:.1} ms, p99 {p99:.1} ms, max {max:.1} ms, a burst {per_pod:.1} ms a Pod; daemon CPU {cpu:.2} s in {:.1} s, RSS {rss:.1} MiB (peak {peak_rss:.1} MiB); {left} left behind",
        samples.len(),
        burst,
        elapsed.as_secs_f64(),
    );
    if args.json {
        let document = json!({
            "interfaces": samples.len(),
            "bursts": bursts,
            "burst": burst,
            "p50_ms": p50,
            "p99_ms": p99,
            "max_ms": max,
            "burst_ms_per_pod": per_pod,
            "daemon_cpu_seconds": cpu,
            "seconds": elapsed.as_secs_f64(),
            "daemon_rss_mib": rss,
            "daemon_peak_rss_mib": peak_rss,
            "leftovers": left,
            "attach_mode": mode,
            "measured": "per Pod: RTM_NEWROUTE for the Pod's /32 seen in the node namespace -> both link pins exist (1 ms polling); CPU from /proc/PID/stat over the churn and the clean-up; memory from /proc/PID/status at the end",
        });
        println!("{document}");
    }
    Ok(())
}
