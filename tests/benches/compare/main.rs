//! Side by side in one lab: plain node routing (`off`), GKE's own mechanism (`netd`:
//! policy routing, see [`visibility_tests::netd`]) and the datapath with the real daemon
//! (`visibility`), alternating in rounds (off, netd, visibility, off, ...).
//!
//! Per mode and round, from Pod 0 (client) to Pod 1 (server), IPv4:
//!
//! * **TCP throughput**, one stream: `iperf3`, both ends pinned with `taskset`.
//! * **UDP packets per second** received, 64-byte payloads: a sender thread that sends as
//!   fast as it can and a receiver thread that counts, over a fixed window after a
//!   warm-up.
//! * **Request/response latency**: a UDP ping-pong with 64-byte messages, every round
//!   trip timed with `Instant` on the client; mean, p50 and p99 (after a warm-up). Both
//!   ends wait in a blocking `recv`, as most applications do, so each round trip also
//!   holds two wake-ups of a sleeping CPU, which in a VM take most of it. The same
//!   ping-pong once more with both ends busy-polling a non-blocking socket
//!   (`rr_busy_*`) times the packets' way alone: what the path itself costs.
//!
//! The client side always runs on CPU 0 and the server side on CPU 1 (`taskset` for
//! iperf3, `sched_setaffinity` for the Rust threads). With veths, the forwarding work
//! of a packet runs in softirq on the CPU that sent it.
//!
//! Before round 1, netd and the daemon are each switched on and off once: an ip rule
//! leaves the node's namespace on the policy-rule lookup path for good, so without
//! this the first `off` would run on a cheaper path than every later one.
//!
//! Each mode is checked while it is measured: the gateway must forward the ping-pong's
//! packets with netd and visibility on, and none with plain routing.
//!
//! `--gateway plain` runs the same comparison with a gateway that only routes (no
//! firewall, no connection tracking), and `--gateway offloaded` with one that routes in
//! TC, ahead of its IP stack ([`GatewayRouter`]), to show how much of the cost is the
//! stand-in VPC's own work, which on GKE does not run on the node. `--profile DIR` adds
//! one UDP run per mode under `perf`, and says where the client CPU's time per packet
//! goes.
//!
//! Prints one JSON document on standard output (progress goes to standard error):
//! date, kernel, pinning, every round's numbers, the medians per mode and the daemon's
//! counters per visibility round. `cargo xtask bench` runs it and renders the table, the
//! JSON file and the chart.
//!
//! **Needs root**, 2 CPUs, iperf3 and taskset, and the release daemon:
//!
//! One file a part: [`options`], [`tcp`], [`udp`], [`rr`], [`figures`], [`machine`];
//! this one runs the rounds.

mod figures;
mod machine;
mod options;
mod rr;
mod tcp;
mod udp;

use std::{
    path::Path,
    process::{ExitCode, Stdio},
    time::Instant,
};

use anyhow::{Context as _, Result, ensure};
use serde_json::{Value, json};
use visibility_tests::{
    datapath_harness::GatewayRouter,
    lab::{Lab, POD_CIDR_V4, POD_CIDR_V6},
    netd::Netd,
    node::Node,
};

use crate::{figures::*, machine::*, options::*, rr::*, tcp::*, udp::*};

fn main() -> ExitCode {
    match run() {
        Ok(()) => ExitCode::SUCCESS,
        Err(error) => {
            eprintln!("compare: {error:#}");
            ExitCode::FAILURE
        }
    }
}

fn run() -> Result<()> {
    let options = Options::parse(std::env::args().skip(1))?;
    preflight()?;
    let started = Instant::now();
    let loadavg_before = read_trimmed("/proc/loadavg");
    let processes_before = process_times();
    eprintln!(
        "compare: {} round(s) of off, netd, visibility; client on CPU {CLIENT_CPU}, server on CPU {SERVER_CPU}",
        options.rounds
    );
    let mut node = Node::new("bench", 2).context("building the lab")?;
    node.capture_daemon_log();
    if options.gateway != GatewayKind::Firewall {
        node.lab.make_gateway_plain_router()?;
    }
    let _router = match options.gateway {
        GatewayKind::Offloaded => Some(GatewayRouter::attach(&node.lab)?),
        GatewayKind::Firewall | GatewayKind::Plain => None,
    };
    // Some state outlives a mode: once an ip rule was added to a namespace, the kernel
    // routes through the policy-rule lookup there for good (`fib_has_custom_rules` is
    // never cleared), and the daemon leaves the gateway's neighbour entry managed. Both
    // are switched on and off once first, so every round, the first one included,
    // starts from the same state.
    eprintln!("compare: priming the node (netd and the daemon on and off once)");
    Netd::enable(&node.lab)?.disable()?;
    node.start_daemon(daemon_args())?;
    node.stop_daemon()?;
    node.cli_ok(&["teardown"])?;
    if !options.quick {
        eprintln!("compare: warming up (off)");
        let _ = tcp_throughput(&node.lab, 1)?;
        let _ = udp_pps(&node.lab, 0.5, 0.2, None)?;
    }

    let mut rounds = Vec::new();
    for round in 1..=options.rounds {
        for mode in MODES {
            let (sample, counters) = match measure_mode(&mut node, mode, &options) {
                Ok(measured) => measured,
                Err(error) => {
                    if mode == Mode::Visibility {
                        node.print_daemon_log_tail(40);
                    }
                    return Err(error.context(format!("round {round}, mode {}", mode.name())));
                }
            };
            eprintln!(
                "compare: round {round}/{} {:<10} TCP {:6.2} Gbit/s  UDP {:>8.0} pps  RR mean {:6.1} µs  p99 {:6.1} µs  busy-poll RR mean {:5.1} µs  (gateway forwarded {})",
                options.rounds,
                mode.name(),
                sample.tcp_gbps,
                sample.udp_pps,
                sample.rr.mean_us,
                sample.rr.p99_us,
                sample.rr_busy.mean_us,
                sample.gateway_forwarded,
            );
            rounds.push((round, mode, sample, counters));
        }
    }

    let profile = match &options.profile_dir {
        Some(dir) => profile_modes(&mut node, dir, &options)?,
        None => Value::Null,
    };

    let mut medians = serde_json::Map::new();
    for mode in MODES {
        let of = |f: fn(&Sample) -> f64| {
            median(
                rounds
                    .iter()
                    .filter(|(_, m, _, _)| *m == mode)
                    .map(|(_, _, s, _)| f(s))
                    .collect(),
            )
        };
        medians.insert(
            mode.name().to_owned(),
            json!({
                "tcp_gbps": of(|s| s.tcp_gbps),
                "udp_pps": of(|s| s.udp_pps),
                "rr_mean_us": of(|s| s.rr.mean_us),
                "rr_p99_us": of(|s| s.rr.p99_us),
                "rr_p50_us": of(|s| s.rr.p50_us),
                "rr_busy_mean_us": of(|s| s.rr_busy.mean_us),
                "rr_busy_p99_us": of(|s| s.rr_busy.p99_us),
                "udp_sent_pps": of(|s| s.udp_sent_pps),
            }),
        );
    }
    let rounds_json: Vec<Value> = rounds
        .iter()
        .map(|(round, mode, s, counters)| {
            json!({
                "round": round,
                "mode": mode.name(),
                "tcp_gbps": s.tcp_gbps,
                "tcp_retransmits": s.tcp_retransmits,
                "udp_pps": s.udp_pps,
                "udp_sent_pps": s.udp_sent_pps,
                "rr_mean_us": s.rr.mean_us,
                "rr_p50_us": s.rr.p50_us,
                "rr_p99_us": s.rr.p99_us,
                "rr_max_us": s.rr.max_us,
                "rr_lost": s.rr.lost,
                "rr_requests": s.rr.requests,
                "rr_busy_mean_us": s.rr_busy.mean_us,
                "rr_busy_p50_us": s.rr_busy.p50_us,
                "rr_busy_p99_us": s.rr_busy.p99_us,
                "rr_busy_lost": s.rr_busy.lost,
                "gateway_forwarded_packets": s.gateway_forwarded,
                "daemon_counters": counters,
            })
        })
        .collect();
    let document = json!({
        "schema": 1,
        "date": time::OffsetDateTime::now_utc()
            .format(&time::format_description::well_known::Rfc3339)
            .unwrap_or_default(),
        "kernel": read_trimmed("/proc/sys/kernel/osrelease"),
        "cpus": std::thread::available_parallelism().map(|n| n.get()).unwrap_or(0),
        "cpu_model": cpu_model(),
        "loadavg_before": loadavg_before,
        "loadavg_after": read_trimmed("/proc/loadavg"),
        "pinning": {
            "client_cpu": CLIENT_CPU,
            "server_cpu": SERVER_CPU,
            "client": "Pod 0: iperf3 -c (taskset), UDP sender and ping-pong client (sched_setaffinity)",
            "server": "Pod 1: iperf3 -s (taskset), UDP receiver and ping-pong server (sched_setaffinity)",
        },
        "config": {
            "rounds": options.rounds,
            "quick": options.quick,
            "tcp_seconds": options.tcp_secs,
            "udp_seconds": options.udp_secs,
            "udp_warmup_seconds": options.udp_warmup_secs,
            "udp_payload_bytes": UDP_PAYLOAD,
            "rr_requests": options.rr_requests,
            "rr_warmup_requests": options.rr_warmup,
            "rr_payload_bytes": RR_PAYLOAD,
            "rr_protocol": "udp",
            "family": "ipv4",
            "daemon_args": daemon_args(),
            "primed": "netd and the daemon were switched on and off once before round 1 (policy-rule lookups and the managed gateway neighbour stay for the lab's life)",
            "lab": "ptp Pods, node with strict rp_filter",
            "gateway": options.gateway.name(),
            "gateway_description": options.gateway.description(),
        },
        "modes": MODES.iter().map(|m| m.name()).collect::<Vec<_>>(),
        "rounds": rounds_json,
        "medians": medians,
        "profile": profile,
        "elapsed_seconds": started.elapsed().as_secs_f64(),
        "background": background(&processes_before, started.elapsed()),
    });
    println!("{}", serde_json::to_string_pretty(&document)?);
    Ok(())
}

fn preflight() -> Result<()> {
    ensure!(
        nix::unistd::geteuid().is_root(),
        "needs root (network namespaces, BPF)"
    );
    let cpus = nix::sched::sched_getaffinity(nix::unistd::Pid::from_raw(0))
        .context("sched_getaffinity")?;
    for cpu in [CLIENT_CPU, SERVER_CPU] {
        ensure!(
            cpus.is_set(cpu).unwrap_or(false),
            "CPU {cpu} is not available to this process; the bench pins client and server to CPUs {CLIENT_CPU} and {SERVER_CPU}"
        );
    }
    for tool in ["iperf3", "taskset", "ss"] {
        ensure!(
            std::process::Command::new(tool)
                .arg("--version")
                .stdout(Stdio::null())
                .stderr(Stdio::null())
                .status()
                .is_ok(),
            "{tool} is missing (cargo xtask setup installs it)"
        );
    }
    // Fails early, with a clear message, when the daemon binary is missing.
    let _ = visibility_tests::node::binary();
    Ok(())
}

fn daemon_args() -> Vec<String> {
    // The production defaults otherwise (reconcile every 10 s, flow records every 5 s).
    ["--pod-cidr", POD_CIDR_V4, "--pod-cidr", POD_CIDR_V6]
        .iter()
        .map(|s| s.to_string())
        .collect()
}

/// Turns `mode` on, measures, turns it off. Returns the figures and, for visibility,
/// the daemon's counters at the end (those that moved).
fn measure_mode(node: &mut Node, mode: Mode, options: &Options) -> Result<(Sample, Value)> {
    with_mode(node, mode, |lab| measure(lab, mode, options))
}

/// Runs `f` with `mode` on, then turns it off. Also returns, for visibility, the
/// daemon's counters at the end (those that moved).
fn with_mode<T>(
    node: &mut Node,
    mode: Mode,
    f: impl FnOnce(&Lab) -> Result<T>,
) -> Result<(T, Value)> {
    let netd = match mode {
        Mode::Off => None,
        Mode::Netd => Some(Netd::enable(&node.lab)?),
        Mode::Visibility => {
            node.start_daemon(daemon_args())?;
            None
        }
    };
    let result = f(&node.lab);
    let counters = if mode == Mode::Visibility {
        let counters = node
            .status()
            .map(|status| moved_counters(&status))
            .unwrap_or(Value::Null);
        node.stop_daemon()?;
        node.cli_ok(&["teardown"])?;
        let links = node.pin_dir.join("links");
        ensure!(
            std::fs::read_dir(&links).map_or(true, |mut d| d.next().is_none()),
            "links left in {} after teardown",
            links.display()
        );
        counters
    } else {
        Value::Null
    };
    if let Some(netd) = netd {
        netd.disable()?;
    }
    Ok((result?, counters))
}

/// One more UDP run per mode, with `perf` recording the client CPU, which runs the
/// sender and, with veths, all the forwarding work. For each mode: that CPU's time per
/// packet received, and how much of it went to the datapath's programs, to netfilter
/// (only the gateway has rules) and to the policy-rule walk (netd's ip rules).
fn profile_modes(node: &mut Node, dir: &Path, options: &Options) -> Result<Value> {
    let mut modes = serde_json::Map::new();
    for mode in MODES {
        eprintln!("compare: profiling {} (UDP, CPU {CLIENT_CPU})", mode.name());
        let recording = dir.join(format!("perf-{}.data", mode.name()));
        let ((pps, _), _) = with_mode(node, mode, |lab| {
            udp_pps(
                lab,
                options.udp_secs,
                options.udp_warmup_secs,
                Some(&recording),
            )
        })?;
        let breakdown = Profile::breakdown(&recording)?;
        let ns_per_packet = 1e9 / pps;
        let mut categories = serde_json::Map::new();
        for (name, share) in &breakdown.categories {
            categories.insert((*name).to_owned(), json!(share * ns_per_packet));
        }
        modes.insert(
            mode.name().to_owned(),
            json!({
                "udp_pps": pps,
                "cpu_ns_per_packet": ns_per_packet,
                "idle_share": breakdown.idle,
                "busy_ns_per_packet": (1.0 - breakdown.idle) * ns_per_packet,
                "categories_ns_per_packet": categories,
                "samples": breakdown.samples,
                "report": recording.with_extension("txt"),
            }),
        );
    }
    Ok(json!({
        "cpu": CLIENT_CPU,
        "method": "perf record -g of the client CPU during one UDP run per mode; a category's time is its inclusive share of the samples times the CPU's time per packet received",
        "modes": modes,
    }))
}

fn moved_counters(status: &Value) -> Value {
    let rows = status["counters"].as_array().cloned().unwrap_or_default();
    Value::Array(
        rows.into_iter()
            .filter(|r| r["packets"].as_u64().unwrap_or(0) > 0)
            .collect(),
    )
}

fn measure(lab: &Lab, mode: Mode, options: &Options) -> Result<Sample> {
    let (tcp_gbps, tcp_retransmits) = tcp_throughput(lab, options.tcp_secs)?;
    let (udp_pps, udp_sent_pps) = udp_pps(lab, options.udp_secs, options.udp_warmup_secs, None)?;
    let forwarded_before = lab.gateway_transmitted_packets()?;
    let rr = round_trips(
        lab,
        options.rr_requests,
        options.rr_warmup,
        Waiting::Blocking,
    )?;
    let gateway_forwarded = lab.gateway_transmitted_packets()? - forwarded_before;
    let rr_busy = round_trips(
        lab,
        options.rr_requests,
        options.rr_warmup,
        Waiting::BusyPolling,
    )?;
    // Each round trip is two packets that cross the gateway when the mode redirects.
    let expected = 2 * (options.rr_requests + options.rr_warmup) as u64;
    match mode {
        Mode::Off => ensure!(
            gateway_forwarded < expected / 100,
            "plain routing, yet the gateway forwarded {gateway_forwarded} packets"
        ),
        Mode::Netd | Mode::Visibility => ensure!(
            gateway_forwarded >= expected * 99 / 100,
            "{} is on, yet the gateway forwarded only {gateway_forwarded} of {expected} packets",
            mode.name()
        ),
    }
    Ok(Sample {
        tcp_gbps,
        tcp_retransmits,
        udp_pps,
        udp_sent_pps,
        rr,
        rr_busy,
        gateway_forwarded,
    })
}
