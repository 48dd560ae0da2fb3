//! How long a new Pod waits for the datapath: with 250 Pod interfaces present and the
//! daemon running, Pods are added one at a time (40 of them), and for each the time is
//! taken from its host route appearing to the daemon having attached both programs.
//!
//! * **Route appearing:** a netlink socket in the node's namespace, subscribed to IPv4
//!   route events as the daemon is, notes when `RTM_NEWROUTE` for the Pod's address
//!   arrives.
//! * **Attached:** the link pins `<pin-dir>/links/if<ifindex>_pod_ingress` and
//!   `..._pod_egress` both exist, polled every millisecond (so this needs TCX, Linux 6.6
//!   and later; the pins are made right after each attach).
//!
//! The 250 interfaces present are the lab's two Pods plus veths whose host routes lie in
//! a second Pod CIDR ([`FILLER_CIDR`]; their peers sit in Pod 0's namespace), made in
//! one `ip -batch` so that setting them up takes seconds. The new Pods are real lab Pods
//! (namespace, veth, addresses and routes, as the ptp CNI makes them).
//!
//! Prints p50/p99 (and mean, min, max) in milliseconds on standard error; with `--json`
//! also one JSON object on standard output (`cargo xtask bench` uses it).
//!
//! **Needs root** and the daemon binary: `cargo build --release -p visibility-userspace`,
//! then `cargo bench -p visibility-tests --bench attach_latency -- [--quick] [--json]
//! [--present N] [--new N]`. `--quick`: 20 present, 5 new.

use std::{
    net::Ipv4Addr,
    process::ExitCode,
    time::{Duration, Instant},
};

use anyhow::{Context as _, Result, bail, ensure};
use serde_json::json;
use visibility_tests::{
    attach_watch::Watch,
    bench_node::{BenchArgs, ensure_tcx, run_on_node},
    lab::{Lab, POD_CIDR_V4, POD_CIDR_V6, POD_GATEWAY_V4},
    measure::{ms, percentile},
    node::Node,
};

/// The second Pod CIDR, which the interfaces present at the start route into.
const FILLER_CIDR: &str = "10.53.0.0/16";
/// How many addresses of each /24 of [`FILLER_CIDR`] are used (.2 to .201).
const FILLERS_PER_24: usize = 200;

/// How many Pod interfaces are present, and how many Pods are added one at a time.
struct Options {
    present: usize,
    new: usize,
}

fn main() -> ExitCode {
    let started = Instant::now();
    run_on_node(
        "attach_latency",
        &[("present", 250, 20), ("new", 40, 5)],
        |node, args| measure(node, args, started),
    )
}

fn measure(node: &mut Node, args: &BenchArgs, started: Instant) -> Result<()> {
    let options = Options {
        present: args.size("present"),
        new: args.size("new"),
    };
    ensure!(
        options.present >= 2,
        "--present must be at least 2 (the lab's Pods)"
    );
    ensure!(options.new >= 1, "--new must be at least 1");
    ensure!(
        options.new + 2 <= visibility_tests::lab::MAX_PODS,
        "at most {} new Pods",
        visibility_tests::lab::MAX_PODS - 2
    );
    node.start_daemon(
        [
            "--pod-cidr",
            POD_CIDR_V4,
            "--pod-cidr",
            POD_CIDR_V6,
            "--pod-cidr",
            FILLER_CIDR,
        ]
        .iter()
        .map(|s| s.to_string())
        .collect(),
    )?;
    let mode = ensure_tcx(node)?;

    let fillers = options.present - node.lab.pod_count();
    add_fillers(&node.lab, fillers)?;
    let present = options.present;
    node.wait_for(Duration::from_secs(120), |status| {
        let pods = status["daemon"]["pod_interfaces"].as_array()?;
        (pods.len() == present && pods.iter().all(|p| p["attached"] == true)).then_some(())
    })
    .with_context(|| format!("waiting for {present} attached Pod interfaces"))?;
    let setup = started.elapsed();
    eprintln!(
        "attach_latency: {present} Pod interfaces attached ({:.1}s); adding {} Pods one at a time",
        setup.as_secs_f64(),
        options.new
    );

    let watch = Watch::start(&node.lab, node.pin_dir.join("links"))?;
    let mut samples = Vec::with_capacity(options.new);
    // Route -> first program's pin, and first -> second program's pin.
    let mut first = Vec::with_capacity(options.new);
    let mut second = Vec::with_capacity(options.new);
    for _ in 0..options.new {
        let index = node.lab.add_pod()?;
        let addr = node.lab.pod_ipv4(index);
        let ifindex = node.lab.pod_host_ifindex(index);
        let entry = watch.wait_attached(addr, ifindex)?;
        let (Some(first_at), Some(attached)) = (entry.first_at, entry.attached_at) else {
            bail!("{addr}: attached without both pins seen");
        };
        first.push(ms(first_at.saturating_duration_since(entry.route_at)));
        second.push(ms(attached.saturating_duration_since(first_at)));
        let latency = attached.saturating_duration_since(entry.route_at);
        samples.push(ms(latency));
        // One Pod at a time: let the daemon finish the pass (status file, etc.).
        std::thread::sleep(Duration::from_millis(100));
    }
    watch.stop();

    let mut sorted = samples.clone();
    sorted.sort_by(f64::total_cmp);
    let mean = samples.iter().sum::<f64>() / samples.len() as f64;
    let (p50, p99) = (percentile(&samples, 50.0), percentile(&samples, 99.0));
    let (first_p50, second_p50) = (percentile(&first, 50.0), percentile(&second, 50.0));
    eprintln!(
        "attach_latency: {} new Pods with {present} present: p50 {p50:.1} ms, p99 {p99:.1} ms (mean {mean:.1}, min {:.1}, max {:.1}); {:.0}s in all",
        samples.len(),
        sorted[0],
        sorted[sorted.len() - 1],
        started.elapsed().as_secs_f64()
    );
    eprintln!(
        "attach_latency: p50 route -> first program attached {first_p50:.1} ms, first -> second {second_p50:.1} ms"
    );
    if args.json {
        let document = json!({
            "present": present,
            "new": samples.len(),
            "p50_ms": p50,
            "p99_ms": p99,
            "mean_ms": mean,
            "min_ms": sorted[0],
            "max_ms": sorted[sorted.len() - 1],
            "samples_ms": samples,
            "route_to_first_program_p50_ms": first_p50,
            "first_to_second_program_p50_ms": second_p50,
            "attach_mode": mode,
            "measured": "RTM_NEWROUTE for the Pod's /32 seen in the node namespace -> both link pins exist (1 ms polling)",
            "setup_seconds": setup.as_secs_f64(),
        });
        println!("{document}");
    }
    Ok(())
}

/// The address of filler `i` in [`FILLER_CIDR`].
fn filler_ip(i: usize) -> Ipv4Addr {
    Ipv4Addr::new(
        10,
        53,
        (i / FILLERS_PER_24) as u8,
        (i % FILLERS_PER_24 + 2) as u8,
    )
}

/// `count` Pod interfaces as the ptp CNI makes them on the node's side (a veth with the
/// Pod gateway address and a host route), their peers in Pod 0's namespace.
fn add_fillers(lab: &Lab, count: usize) -> Result<()> {
    ensure!(count <= 250 * FILLERS_PER_24, "too many interfaces");
    let holder = lab.pod_ns(0);
    let mut node_lines = Vec::with_capacity(count * 4);
    let mut holder_lines = Vec::with_capacity(count);
    for i in 0..count {
        let (host, peer) = (format!("fill{i}"), format!("f{i}"));
        node_lines.push(format!(
            "link add {host} type veth peer name {peer} netns {}",
            holder.name()
        ));
        node_lines.push(format!("link set {host} up"));
        node_lines.push(format!("addr add {POD_GATEWAY_V4}/32 dev {host}"));
        node_lines.push(format!(
            "route add {}/32 dev {host} scope host",
            filler_ip(i)
        ));
        holder_lines.push(format!("link set {peer} up"));
    }
    lab.node().ip_batch(&node_lines)?;
    holder.ip_batch(&holder_lines)?;
    Ok(())
}
