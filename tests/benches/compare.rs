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
//! `cargo build --release -p visibility-userspace && cargo bench -p visibility-tests --bench compare -- [--quick] [--rounds N] [--gateway firewall|plain|offloaded] [--profile DIR]`

use std::{
    net::{SocketAddr, UdpSocket},
    path::{Path, PathBuf},
    process::{ExitCode, Stdio},
    sync::{
        Arc,
        atomic::{AtomicBool, AtomicU64, Ordering},
    },
    time::{Duration, Instant},
};

use anyhow::{Context as _, Result, bail, ensure};
use serde_json::{Value, json};
use visibility_tests::{
    datapath_harness::GatewayRouter,
    lab::{Background, Lab, POD_CIDR_V4, POD_CIDR_V6, pin_to_cpu},
    netd::Netd,
    node::{Node, poll},
};

const CLIENT_CPU: usize = 0;
const SERVER_CPU: usize = 1;
const CLIENT_POD: usize = 0;
const SERVER_POD: usize = 1;
const IPERF_PORT: u16 = 5201;
const UDP_PAYLOAD: usize = 64;
const RR_PAYLOAD: usize = 64;
const MODES: [Mode; 3] = [Mode::Off, Mode::Netd, Mode::Visibility];

#[derive(Clone, Copy, Debug, PartialEq, Eq)]
enum Mode {
    Off,
    Netd,
    Visibility,
}

impl Mode {
    fn name(self) -> &'static str {
        match self {
            Mode::Off => "off",
            Mode::Netd => "netd",
            Mode::Visibility => "visibility",
        }
    }
}

#[derive(Debug, Clone)]
struct Options {
    rounds: usize,
    tcp_secs: u32,
    udp_secs: f64,
    udp_warmup_secs: f64,
    rr_requests: usize,
    rr_warmup: usize,
    quick: bool,
    /// `--gateway plain|offloaded`: what the stand-in VPC does with a packet (see
    /// [`GatewayKind`]), to show how much of the cost is the stand-in VPC's own work.
    gateway: GatewayKind,
    /// `--profile DIR`: after the rounds, one more UDP run per mode with `perf`
    /// recording the client CPU; the recordings and reports go to DIR, and the document
    /// says where each packet's time goes.
    profile_dir: Option<PathBuf>,
}

/// What the gateway namespace, the stand-in for the VPC, does with a packet.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
enum GatewayKind {
    /// As in the demo and the tests: routes, with an nftables firewall and conntrack
    /// accounting (a flow log).
    Firewall,
    /// Only routes.
    Plain,
    /// Routes in TC ([`GatewayRouter`]), so its IP stack never runs: the nearest this
    /// machine comes to a VPC whose work happens off the node.
    Offloaded,
}

impl GatewayKind {
    fn name(self) -> &'static str {
        match self {
            GatewayKind::Firewall => "firewall",
            GatewayKind::Plain => "plain",
            GatewayKind::Offloaded => "offloaded",
        }
    }

    fn description(self) -> &'static str {
        match self {
            GatewayKind::Firewall => {
                "gateway namespace routes with an nftables firewall and conntrack accounting"
            }
            GatewayKind::Plain => {
                "gateway namespace only routes: no nftables table, no connection tracking"
            }
            GatewayKind::Offloaded => {
                "gateway namespace routes in TC (FIB lookup, MACs, one hop): its IP stack never runs, as if the VPC worked off the node"
            }
        }
    }
}

impl Options {
    fn full() -> Self {
        Self {
            rounds: 3,
            tcp_secs: 5,
            udp_secs: 4.0,
            udp_warmup_secs: 0.5,
            rr_requests: 20_000,
            rr_warmup: 2_000,
            quick: false,
            gateway: GatewayKind::Firewall,
            profile_dir: None,
        }
    }

    fn quick() -> Self {
        Self {
            rounds: 1,
            tcp_secs: 1,
            udp_secs: 1.0,
            udp_warmup_secs: 0.2,
            rr_requests: 2_000,
            rr_warmup: 200,
            quick: true,
            gateway: GatewayKind::Firewall,
            profile_dir: None,
        }
    }

    /// `--quick`, `--rounds N`; `--bench` (which cargo bench passes) is ignored.
    fn parse(args: impl Iterator<Item = String>) -> Result<Self> {
        let args: Vec<String> = args.collect();
        let mut options = if args.iter().any(|a| a == "--quick") {
            Self::quick()
        } else {
            Self::full()
        };
        let mut iter = args.iter();
        while let Some(arg) = iter.next() {
            match arg.as_str() {
                "--quick" | "--bench" => {}
                "--rounds" => {
                    options.rounds = iter
                        .next()
                        .context("--rounds needs a number")?
                        .parse()
                        .context("--rounds")?;
                    ensure!(options.rounds >= 1, "--rounds must be at least 1");
                }
                "--gateway" => {
                    options.gateway = match iter.next().map(String::as_str) {
                        Some("firewall") => GatewayKind::Firewall,
                        Some("plain") => GatewayKind::Plain,
                        Some("offloaded") => GatewayKind::Offloaded,
                        other => {
                            bail!("--gateway takes firewall, plain or offloaded, not {other:?}")
                        }
                    };
                }
                "--profile" => {
                    let dir = iter.next().context("--profile needs a directory")?;
                    std::fs::create_dir_all(dir).with_context(|| format!("creating {dir}"))?;
                    options.profile_dir = Some(dir.into());
                }
                other => bail!(
                    "unknown argument {other:?} (known: --quick, --rounds N, --gateway firewall|plain|offloaded, --profile DIR)"
                ),
            }
        }
        Ok(options)
    }
}

/// One mode's figures in one round.
#[derive(Debug, Clone)]
struct Sample {
    tcp_gbps: f64,
    tcp_retransmits: Option<u64>,
    udp_pps: f64,
    udp_sent_pps: f64,
    rr: RoundTrips,
    /// The ping-pong with both ends busy-polling.
    rr_busy: RoundTrips,
    gateway_forwarded: u64,
}

#[derive(Debug, Clone)]
struct RoundTrips {
    mean_us: f64,
    p50_us: f64,
    p99_us: f64,
    max_us: f64,
    lost: u64,
    requests: usize,
}

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

// ---------------------------------------------------------------------------------------
// TCP: iperf3
// ---------------------------------------------------------------------------------------

fn tcp_throughput(lab: &Lab, secs: u32) -> Result<(f64, Option<u64>)> {
    let server_ip = lab.pod_ipv4(SERVER_POD).to_string();
    let port = IPERF_PORT.to_string();
    let server_ns = lab.pod_ns(SERVER_POD);
    let mut cmd = server_ns.cmd(
        "taskset",
        [
            "-c",
            &SERVER_CPU.to_string(),
            "iperf3",
            "-s",
            "-1",
            "-B",
            &server_ip,
            "-p",
            &port,
        ],
    );
    cmd.stdin(Stdio::null())
        .stdout(Stdio::null())
        .stderr(Stdio::null());
    let server = Background::spawn(cmd)?;
    poll(Duration::from_secs(5), "iperf3 -s listening", || {
        let out = server_ns.run("ss", ["-Hltn", "sport", "=", &format!(":{port}")])?;
        Ok((!out.trim().is_empty()).then_some(()))
    })?;
    let out = lab.pod_ns(CLIENT_POD).run(
        "taskset",
        [
            "-c",
            &CLIENT_CPU.to_string(),
            "iperf3",
            "-c",
            &server_ip,
            "-p",
            &port,
            "-t",
            &secs.to_string(),
            "-J",
        ],
    );
    let _ = server.terminate(Duration::from_secs(2));
    let out = out.context("iperf3 client")?;
    let report: Value = serde_json::from_str(&out).context("iperf3 -J output")?;
    if let Some(error) = report["error"].as_str() {
        bail!("iperf3: {error}");
    }
    let bps = report["end"]["sum_received"]["bits_per_second"]
        .as_f64()
        .context("no end.sum_received.bits_per_second in iperf3's report")?;
    let retransmits = report["end"]["sum_sent"]["retransmits"].as_u64();
    Ok((bps / 1e9, retransmits))
}

// ---------------------------------------------------------------------------------------
// UDP packets per second
// ---------------------------------------------------------------------------------------

/// Receiver packets per second and sender packets per second over `secs`, after
/// `warmup_secs` of the same traffic. With `profile`, the client CPU is recorded with
/// `perf` over the same window, and the report is written next to the recording.
fn udp_pps(lab: &Lab, secs: f64, warmup_secs: f64, profile: Option<&Path>) -> Result<(f64, f64)> {
    let receiver = lab
        .pod_ns(SERVER_POD)
        .udp_bind(SocketAddr::new(lab.pod_ipv4(SERVER_POD).into(), 0))?;
    nix::sys::socket::setsockopt(
        &receiver,
        nix::sys::socket::sockopt::RcvBufForce,
        &(8 << 20),
    )
    .context("SO_RCVBUFFORCE")?;
    receiver.set_read_timeout(Some(Duration::from_millis(50)))?;
    let to = receiver.local_addr()?;
    let stop = Arc::new(AtomicBool::new(false));
    let received = Arc::new(AtomicU64::new(0));
    let sent = Arc::new(AtomicU64::new(0));

    let receiving = {
        let (stop, received) = (stop.clone(), received.clone());
        std::thread::Builder::new()
            .name("udp-receiver".into())
            .spawn(move || -> Result<()> {
                pin_to_cpu(SERVER_CPU)?;
                let mut buf = [0u8; 2048];
                let mut count = 0u64;
                while !stop.load(Ordering::Relaxed) {
                    match receiver.recv(&mut buf) {
                        Ok(_) => {
                            count += 1;
                            received.store(count, Ordering::Relaxed);
                        }
                        Err(e)
                            if matches!(
                                e.kind(),
                                std::io::ErrorKind::WouldBlock
                                    | std::io::ErrorKind::TimedOut
                                    | std::io::ErrorKind::Interrupted
                            ) => {}
                        Err(e) => return Err(e).context("UDP receiver"),
                    }
                }
                Ok(())
            })?
    };
    let sending = {
        let (stop, sent) = (stop.clone(), sent.clone());
        lab.pod_ns(CLIENT_POD).spawn(move || -> Result<()> {
            pin_to_cpu(CLIENT_CPU)?;
            let socket = UdpSocket::bind("0.0.0.0:0")?;
            socket.connect(to)?;
            let payload = [0x5au8; UDP_PAYLOAD];
            let mut count = 0u64;
            while !stop.load(Ordering::Relaxed) {
                // ENOBUFS and the like only mean the packet was not sent.
                if socket.send(&payload).is_ok() {
                    count += 1;
                    sent.store(count, Ordering::Relaxed);
                }
            }
            Ok(())
        })?
    };
    std::thread::sleep(Duration::from_secs_f64(warmup_secs));
    let recording = profile
        .map(|path| Profile::start(path, CLIENT_CPU, secs))
        .transpose()?;
    let (r0, s0, t0) = (
        received.load(Ordering::Relaxed),
        sent.load(Ordering::Relaxed),
        Instant::now(),
    );
    std::thread::sleep(Duration::from_secs_f64(secs));
    let (r1, s1, t1) = (
        received.load(Ordering::Relaxed),
        sent.load(Ordering::Relaxed),
        Instant::now(),
    );
    stop.store(true, Ordering::Relaxed);
    if let Some(recording) = recording {
        recording.finish()?;
    }
    join(sending, "UDP sender")?;
    join(receiving, "UDP receiver")?;
    let elapsed = (t1 - t0).as_secs_f64();
    ensure!(r1 > r0, "the receiver got no packets");
    Ok(((r1 - r0) as f64 / elapsed, (s1 - s0) as f64 / elapsed))
}

/// A `perf record` of one CPU, with call graphs, for a fixed time.
struct Profile {
    child: std::process::Child,
    path: PathBuf,
}

/// What a recording says: shares of all samples, inclusive of what each part calls.
struct Breakdown {
    samples: u64,
    /// The CPU had nothing to run.
    idle: f64,
    categories: Vec<(&'static str, f64)>,
}

/// Whether a symbol of a profile belongs to a category.
type Belongs = fn(&str) -> bool;

/// Categories of the breakdown: a name and whether a symbol belongs to it.
const CATEGORIES: [(&str, Belongs); 3] = [
    ("datapath programs", |symbol| {
        symbol.starts_with("bpf_prog_")
            && ["_pod_ingress", "_pod_egress", "_uplink_ingress"]
                .iter()
                .any(|hook| symbol.ends_with(hook))
    }),
    ("netfilter", |symbol| symbol == "nf_hook_slow"),
    ("policy rules", |symbol| symbol == "fib_rules_lookup"),
];

impl Profile {
    fn start(path: &Path, cpu: usize, secs: f64) -> Result<Self> {
        let child = std::process::Command::new("perf")
            .args(["record", "-q", "-g", "-C", &cpu.to_string(), "-o"])
            .arg(path)
            .args(["--", "sleep", &format!("{secs}")])
            .stdout(Stdio::null())
            .stderr(Stdio::null())
            .spawn()
            .context("starting perf record (is perf installed?)")?;
        Ok(Self {
            child,
            path: path.to_owned(),
        })
    }

    /// Waits for the recording and writes `<recording>.txt`: symbols by self time.
    fn finish(mut self) -> Result<()> {
        let status = self.child.wait().context("perf record")?;
        ensure!(status.success(), "perf record failed: {status}");
        let report = perf_report(&self.path, "--no-children")?;
        let text_path = self.path.with_extension("txt");
        std::fs::write(&text_path, report)
            .with_context(|| format!("writing {}", text_path.display()))?;
        Ok(())
    }

    /// Inclusive shares of the recording's samples, by category.
    fn breakdown(path: &Path) -> Result<Breakdown> {
        let report = perf_report(path, "--children")?;
        let samples = report
            .lines()
            .find_map(|line| {
                let rest = line.strip_prefix("# Samples: ")?;
                let count = rest.split_whitespace().next()?;
                // perf writes large counts as "12K".
                match count.strip_suffix('K') {
                    Some(k) => k.parse::<f64>().ok().map(|k| (k * 1000.0) as u64),
                    None => count.parse().ok(),
                }
            })
            .unwrap_or(0);
        // Lines: "  children%  self%  [k] symbol ...".
        let rows: Vec<(f64, &str)> = report
            .lines()
            .filter(|line| !line.starts_with('#'))
            .filter_map(|line| {
                let mut words = line.split_whitespace();
                let children = words.next()?.strip_suffix('%')?.parse::<f64>().ok()?;
                let _self = words.next()?;
                let _kind = words.next()?;
                Some((children / 100.0, words.next()?))
            })
            .collect();
        ensure!(
            !rows.is_empty(),
            "perf report of {} is empty",
            path.display()
        );
        // Symbols do not nest across categories, so their inclusive shares add up.
        let share = |belongs: Belongs| -> f64 {
            rows.iter()
                .filter(|(_, symbol)| belongs(symbol))
                .map(|(share, _)| share)
                .fold(0.0, |sum, share| sum + share)
        };
        Ok(Breakdown {
            samples,
            idle: share(|symbol| symbol == "do_idle"),
            categories: CATEGORIES
                .iter()
                .map(|(name, belongs)| (*name, share(*belongs)))
                .collect(),
        })
    }
}

/// `perf report` of a recording by symbol, without call chains.
fn perf_report(path: &Path, children: &str) -> Result<String> {
    let out = std::process::Command::new("perf")
        .args([
            "report", "--stdio", children, "--sort", "symbol", "-g", "none", "-i",
        ])
        .arg(path)
        .stderr(Stdio::null())
        .output()
        .context("perf report")?;
    ensure!(
        out.status.success(),
        "perf report of {} failed",
        path.display()
    );
    Ok(String::from_utf8_lossy(&out.stdout).into_owned())
}

fn join<T>(handle: std::thread::JoinHandle<Result<T>>, what: &str) -> Result<T> {
    match handle.join() {
        Ok(result) => result.with_context(|| what.to_owned()),
        Err(panic) => std::panic::resume_unwind(panic),
    }
}

// ---------------------------------------------------------------------------------------
// Request/response latency
// ---------------------------------------------------------------------------------------

/// How the ping-pong's two ends wait for a message.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
enum Waiting {
    /// Asleep in `recv` until the message arrives.
    Blocking,
    /// Spinning on a non-blocking `recv`: no CPU ever sleeps, so no wake-up is timed.
    BusyPolling,
}

/// How long the client waits for an answer before it counts the request as lost.
const RR_ANSWER_TIMEOUT: Duration = Duration::from_millis(500);

fn round_trips(lab: &Lab, requests: usize, warmup: usize, waiting: Waiting) -> Result<RoundTrips> {
    let busy = waiting == Waiting::BusyPolling;
    let server = lab
        .pod_ns(SERVER_POD)
        .udp_bind(SocketAddr::new(lab.pod_ipv4(SERVER_POD).into(), 0))?;
    if busy {
        server.set_nonblocking(true)?;
    } else {
        // Wakes up now and then to see whether it should stop.
        server.set_read_timeout(Some(Duration::from_millis(50)))?;
    }
    let to = server.local_addr()?;
    let stop = Arc::new(AtomicBool::new(false));
    let serving = {
        let stop = stop.clone();
        std::thread::Builder::new()
            .name("rr-server".into())
            .spawn(move || -> Result<()> {
                pin_to_cpu(SERVER_CPU)?;
                let mut buf = [0u8; 2048];
                while !stop.load(Ordering::Relaxed) {
                    match server.recv_from(&mut buf) {
                        Ok((n, peer)) => {
                            server.send_to(&buf[..n], peer).context("RR server: send")?;
                        }
                        Err(e)
                            if matches!(
                                e.kind(),
                                std::io::ErrorKind::WouldBlock
                                    | std::io::ErrorKind::TimedOut
                                    | std::io::ErrorKind::Interrupted
                            ) => {}
                        Err(e) => return Err(e).context("RR server: receive"),
                    }
                }
                Ok(())
            })?
    };
    let client = lab
        .pod_ns(CLIENT_POD)
        .spawn(move || -> Result<(Vec<u64>, u64)> {
            pin_to_cpu(CLIENT_CPU)?;
            let socket = UdpSocket::bind("0.0.0.0:0")?;
            socket.connect(to)?;
            if busy {
                socket.set_nonblocking(true)?;
            } else {
                socket.set_read_timeout(Some(RR_ANSWER_TIMEOUT))?;
            }
            let mut message = [0u8; RR_PAYLOAD];
            let mut reply = [0u8; 2048];
            let mut nanos = Vec::with_capacity(requests);
            let mut lost = 0u64;
            for seq in 0..(warmup + requests) as u64 {
                message[..8].copy_from_slice(&seq.to_be_bytes());
                let sent_at = Instant::now();
                socket.send(&message).context("RR client: send")?;
                let answered = loop {
                    match socket.recv(&mut reply) {
                        Ok(n) if n >= 8 && reply[..8] == seq.to_be_bytes() => break true,
                        Ok(_) => continue, // a late answer to a lost request
                        Err(e)
                            if busy
                                && e.kind() == std::io::ErrorKind::WouldBlock
                                && sent_at.elapsed() < RR_ANSWER_TIMEOUT =>
                        {
                            std::hint::spin_loop();
                        }
                        Err(e)
                            if matches!(
                                e.kind(),
                                std::io::ErrorKind::WouldBlock | std::io::ErrorKind::TimedOut
                            ) =>
                        {
                            break false;
                        }
                        Err(e) if e.kind() == std::io::ErrorKind::Interrupted => continue,
                        Err(e) => return Err(e).context("RR client: receive"),
                    }
                };
                let elapsed = sent_at.elapsed();
                if !answered {
                    lost += 1;
                    ensure!(lost <= 20, "more than 20 requests went unanswered");
                } else if seq >= warmup as u64 {
                    nanos.push(elapsed.as_nanos() as u64);
                }
            }
            Ok((nanos, lost))
        })?;
    let client = join(client, "RR client");
    stop.store(true, Ordering::Relaxed);
    join(serving, "RR server")?;
    let (mut nanos, lost) = client?;
    ensure!(!nanos.is_empty(), "no round trips measured");
    nanos.sort_unstable();
    let us = |n: u64| n as f64 / 1000.0;
    let mean = nanos.iter().sum::<u64>() as f64 / nanos.len() as f64 / 1000.0;
    Ok(RoundTrips {
        mean_us: mean,
        p50_us: us(percentile(&nanos, 50.0)),
        p99_us: us(percentile(&nanos, 99.0)),
        max_us: us(*nanos.last().expect("not empty")),
        lost,
        requests: nanos.len(),
    })
}

/// Nearest-rank percentile of sorted values.
fn percentile(sorted: &[u64], p: f64) -> u64 {
    let rank = ((p / 100.0) * sorted.len() as f64).ceil() as usize;
    sorted[rank.clamp(1, sorted.len()) - 1]
}

fn median(mut values: Vec<f64>) -> f64 {
    values.sort_by(f64::total_cmp);
    let n = values.len();
    match n {
        0 => f64::NAN,
        _ if n % 2 == 1 => values[n / 2],
        _ => (values[n / 2 - 1] + values[n / 2]) / 2.0,
    }
}

fn read_trimmed(path: &str) -> String {
    std::fs::read_to_string(path)
        .map(|s| s.trim().to_owned())
        .unwrap_or_default()
}

fn cpu_model() -> String {
    read_trimmed("/proc/cpuinfo")
        .lines()
        .find_map(|l| l.strip_prefix("model name"))
        .and_then(|l| l.split_once(':'))
        .map(|(_, v)| v.trim().to_owned())
        .unwrap_or_default()
}

// ---------------------------------------------------------------------------------------
// Other load on the machine
// ---------------------------------------------------------------------------------------

/// Per process: (name, parent, user + system CPU ticks).
type ProcessTimes = std::collections::HashMap<u32, (String, u32, u64)>;

fn process_times() -> ProcessTimes {
    let mut times = ProcessTimes::new();
    let Ok(entries) = std::fs::read_dir("/proc") else {
        return times;
    };
    for entry in entries.filter_map(Result::ok) {
        let Ok(pid) = entry.file_name().to_string_lossy().parse::<u32>() else {
            continue;
        };
        let Ok(stat) = std::fs::read_to_string(entry.path().join("stat")) else {
            continue;
        };
        // pid (comm) state ppid ... utime(14) stime(15): comm may hold spaces.
        let (Some(open), Some(close)) = (stat.find('('), stat.rfind(')')) else {
            continue;
        };
        let comm = stat[open + 1..close].to_owned();
        let fields: Vec<&str> = stat[close + 1..].split_whitespace().collect();
        let field = |n: usize| fields.get(n - 3).and_then(|f| f.parse::<u64>().ok());
        if let (Some(ppid), Some(utime), Some(stime)) = (field(4), field(14), field(15)) {
            times.insert(pid, (comm, ppid as u32, utime + stime));
        }
    }
    times
}

/// CPU time that processes outside this bench used while it ran (a busy machine makes
/// the figures noisy): the total, its share of all CPUs, and the top consumers.
fn background(before: &ProcessTimes, elapsed: Duration) -> Value {
    let after = process_times();
    let ticks_per_second = nix::unistd::sysconf(nix::unistd::SysconfVar::CLK_TCK)
        .ok()
        .flatten()
        .unwrap_or(100) as f64;
    let me = std::process::id();
    let ours = |mut pid: u32| {
        for _ in 0..64 {
            if pid == me {
                return true;
            }
            match after.get(&pid) {
                Some((_, ppid, _)) if *ppid != 0 => pid = *ppid,
                _ => return false,
            }
        }
        false
    };
    let mut by_name: std::collections::BTreeMap<String, f64> = Default::default();
    for (pid, (comm, _, ticks)) in &after {
        // ksoftirqd mostly runs this bench's own packets when the CPU is busy.
        if ours(*pid) || comm.starts_with("ksoftirqd") {
            continue;
        }
        // By pid only: kernel workers rename themselves as they take up other work.
        let start = before.get(pid).map_or(0, |b| b.2);
        let used = ticks.saturating_sub(start) as f64 / ticks_per_second;
        if used > 0.0 {
            *by_name.entry(comm.clone()).or_default() += used;
        }
    }
    let total: f64 = by_name.values().sum();
    let cpus = std::thread::available_parallelism().map_or(1, |n| n.get()) as f64;
    let mut top: Vec<(String, f64)> = by_name.into_iter().collect();
    top.sort_by(|a, b| b.1.total_cmp(&a.1));
    top.truncate(5);
    json!({
        "cpu_seconds": total,
        "share_of_all_cpus": total / (elapsed.as_secs_f64() * cpus),
        "top": top.iter().map(|(name, secs)| json!({"process": name, "cpu_seconds": secs})).collect::<Vec<_>>(),
    })
}
