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
    collections::HashMap,
    net::Ipv4Addr,
    os::fd::{AsRawFd as _, OwnedFd},
    process::ExitCode,
    sync::{
        Arc, Mutex,
        atomic::{AtomicBool, Ordering},
    },
    time::{Duration, Instant},
};

use anyhow::{Context as _, Result, bail, ensure};
use nix::sys::socket::{
    AddressFamily, MsgFlags, NetlinkAddr, SockFlag, SockProtocol, SockType, bind, recv, setsockopt,
    socket, sockopt,
};
use serde_json::json;
use visibility_tests::{
    lab::{Lab, POD_CIDR_V4, POD_CIDR_V6, POD_GATEWAY_V4},
    node::Node,
};

/// The second Pod CIDR, which the interfaces present at the start route into.
const FILLER_CIDR: &str = "10.53.0.0/16";
/// How many addresses of each /24 of [`FILLER_CIDR`] are used (.2 to .201).
const FILLERS_PER_24: usize = 200;
/// How long a single Pod may take to be attached before the bench fails.
const ATTACH_TIMEOUT: Duration = Duration::from_secs(15);

struct Options {
    present: usize,
    new: usize,
    json: bool,
}

impl Options {
    fn parse(args: impl Iterator<Item = String>) -> Result<Self> {
        let args: Vec<String> = args.collect();
        let quick = args.iter().any(|a| a == "--quick");
        let mut options = Self {
            present: if quick { 20 } else { 250 },
            new: if quick { 5 } else { 40 },
            json: false,
        };
        let mut iter = args.iter();
        while let Some(arg) = iter.next() {
            match arg.as_str() {
                "--quick" | "--bench" => {}
                "--json" => options.json = true,
                "--present" => {
                    options.present = iter.next().context("--present N")?.parse()?;
                }
                "--new" => options.new = iter.next().context("--new N")?.parse()?,
                other => bail!(
                    "unknown argument {other:?} (known: --quick, --json, --present N, --new N)"
                ),
            }
        }
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
        Ok(options)
    }
}

fn main() -> ExitCode {
    match run() {
        Ok(()) => ExitCode::SUCCESS,
        Err(error) => {
            eprintln!("attach_latency: {error:#}");
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
    let started = Instant::now();
    let mut node = Node::new("attach", 2).context("building the lab")?;
    node.capture_daemon_log();
    let result = measure(&mut node, &options, started);
    if result.is_err() {
        node.print_daemon_log_tail(40);
    }
    result
}

fn measure(node: &mut Node, options: &Options, started: Instant) -> Result<()> {
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
    let status = node.status()?;
    let mode = status["daemon"]["attach_mode"].as_str().unwrap_or_default();
    ensure!(
        mode == "tcx",
        "the daemon attaches with {mode:?}; this bench watches TCX link pins (Linux 6.6+)"
    );

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
        let deadline = Instant::now() + ATTACH_TIMEOUT;
        let latency = loop {
            if let Some(entry) = watch.entry(addr) {
                ensure!(
                    entry.ifindex == ifindex,
                    "the route to {addr} points to ifindex {}, the Pod's veth is {ifindex}",
                    entry.ifindex
                );
                if let (Some(first_at), Some(attached)) = (entry.first_at, entry.attached_at) {
                    first.push(ms(first_at.saturating_duration_since(entry.route_at)));
                    second.push(ms(attached.saturating_duration_since(first_at)));
                    break attached.saturating_duration_since(entry.route_at);
                }
            }
            ensure!(
                Instant::now() < deadline,
                "Pod {index} ({addr}, ifindex {ifindex}) not attached within {ATTACH_TIMEOUT:?} (route seen: {})",
                watch.entry(addr).is_some()
            );
            std::thread::sleep(Duration::from_millis(1));
        };
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
    if options.json {
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

fn ms(duration: Duration) -> f64 {
    duration.as_secs_f64() * 1000.0
}

/// Nearest-rank percentile.
fn percentile(values: &[f64], p: f64) -> f64 {
    let mut sorted = values.to_vec();
    sorted.sort_by(f64::total_cmp);
    let rank = ((p / 100.0) * sorted.len() as f64).ceil() as usize;
    sorted[rank.clamp(1, sorted.len()) - 1]
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

// ---------------------------------------------------------------------------------------
// Watching routes and pins
// ---------------------------------------------------------------------------------------

#[derive(Debug, Clone, Copy)]
struct Entry {
    ifindex: u32,
    route_at: Instant,
    /// When the first of the two link pins existed.
    first_at: Option<Instant>,
    /// When both existed.
    attached_at: Option<Instant>,
}

/// A thread that notes new host routes (netlink) and when their interface's link pins
/// appear, every millisecond.
struct Watch {
    entries: Arc<Mutex<HashMap<Ipv4Addr, Entry>>>,
    stop: Arc<AtomicBool>,
    thread: Option<std::thread::JoinHandle<Result<()>>>,
}

impl Watch {
    fn start(lab: &Lab, links: std::path::PathBuf) -> Result<Self> {
        let socket = lab.node().try_in_ns(|| {
            let fd = socket(
                AddressFamily::Netlink,
                SockType::Raw,
                SockFlag::SOCK_CLOEXEC | SockFlag::SOCK_NONBLOCK,
                SockProtocol::NetlinkRoute,
            )
            .context("netlink socket")?;
            setsockopt(&fd, sockopt::RcvBufForce, &(4 << 20)).context("SO_RCVBUFFORCE")?;
            bind(
                fd.as_raw_fd(),
                &NetlinkAddr::new(0, libc::RTMGRP_IPV4_ROUTE as u32),
            )
            .context("binding to RTMGRP_IPV4_ROUTE")?;
            Ok(fd)
        })?;
        let entries = Arc::new(Mutex::new(HashMap::new()));
        let stop = Arc::new(AtomicBool::new(false));
        let thread = {
            let (entries, stop) = (entries.clone(), stop.clone());
            std::thread::Builder::new()
                .name("route-watch".into())
                .spawn(move || watch(socket, &links, &entries, &stop))?
        };
        Ok(Self {
            entries,
            stop,
            thread: Some(thread),
        })
    }

    fn entry(&self, addr: Ipv4Addr) -> Option<Entry> {
        self.entries
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .get(&addr)
            .copied()
    }

    fn stop(mut self) {
        self.stop.store(true, Ordering::Relaxed);
        if let Some(thread) = self.thread.take() {
            match thread.join() {
                Ok(Err(error)) => eprintln!("attach_latency: watcher: {error:#}"),
                Ok(Ok(())) => {}
                Err(panic) => std::panic::resume_unwind(panic),
            }
        }
    }
}

impl Drop for Watch {
    fn drop(&mut self) {
        self.stop.store(true, Ordering::Relaxed);
    }
}

fn watch(
    socket: OwnedFd,
    links: &std::path::Path,
    entries: &Mutex<HashMap<Ipv4Addr, Entry>>,
    stop: &AtomicBool,
) -> Result<()> {
    let mut buf = vec![0u8; 1 << 16];
    while !stop.load(Ordering::Relaxed) {
        loop {
            match recv(socket.as_raw_fd(), &mut buf, MsgFlags::empty()) {
                Ok(n) => {
                    let now = Instant::now();
                    let mut entries = entries.lock().unwrap_or_else(|e| e.into_inner());
                    for (dst, ifindex) in new_host_routes(&buf[..n]) {
                        entries.entry(dst).or_insert(Entry {
                            ifindex,
                            route_at: now,
                            first_at: None,
                            attached_at: None,
                        });
                    }
                }
                Err(nix::errno::Errno::EAGAIN) => break,
                Err(nix::errno::Errno::EINTR) => {}
                Err(nix::errno::Errno::ENOBUFS) => {
                    eprintln!("attach_latency: the netlink socket overran; events were lost");
                }
                Err(e) => return Err(e).context("reading route events"),
            }
        }
        {
            let now = Instant::now();
            let mut entries = entries.lock().unwrap_or_else(|e| e.into_inner());
            for entry in entries.values_mut().filter(|e| e.attached_at.is_none()) {
                let pinned = ["pod_ingress", "pod_egress"].map(|program| {
                    links
                        .join(format!("if{}_{program}", entry.ifindex))
                        .exists()
                });
                if entry.first_at.is_none() && pinned.iter().any(|p| *p) {
                    entry.first_at = Some(now);
                }
                if pinned.iter().all(|p| *p) {
                    entry.attached_at = Some(now);
                }
            }
        }
        std::thread::sleep(Duration::from_millis(1));
    }
    Ok(())
}

const NLMSG_HDRLEN: usize = 16;
const RTMSG_LEN: usize = 12;
const RTM_NEWROUTE: u16 = 24;
const RTA_DST: u16 = 1;
const RTA_OIF: u16 = 4;
const RTA_TABLE: u16 = 15;
const RT_TABLE_MAIN: u32 = 254;

fn align4(n: usize) -> usize {
    (n + 3) & !3
}

fn u16_at(b: &[u8], at: usize) -> u16 {
    u16::from_ne_bytes([b[at], b[at + 1]])
}

fn u32_at(b: &[u8], at: usize) -> u32 {
    u32::from_ne_bytes([b[at], b[at + 1], b[at + 2], b[at + 3]])
}

/// The IPv4 /32 routes of the main table that a netlink datagram announces: (destination,
/// output interface).
fn new_host_routes(buf: &[u8]) -> Vec<(Ipv4Addr, u32)> {
    let mut found = Vec::new();
    let mut at = 0;
    while at + NLMSG_HDRLEN <= buf.len() {
        let len = u32_at(buf, at) as usize;
        if len < NLMSG_HDRLEN || at + len > buf.len() {
            break;
        }
        let kind = u16_at(buf, at + 4);
        let body = &buf[at + NLMSG_HDRLEN..at + len];
        at += align4(len);
        if kind != RTM_NEWROUTE || body.len() < RTMSG_LEN {
            continue;
        }
        let (family, dst_len) = (body[0], body[1]);
        if i32::from(family) != libc::AF_INET || dst_len != 32 {
            continue;
        }
        let mut table = u32::from(body[4]);
        let (mut dst, mut oif) = (None, None);
        let mut a = RTMSG_LEN;
        while a + 4 <= body.len() {
            let alen = usize::from(u16_at(body, a));
            let atype = u16_at(body, a + 2);
            if alen < 4 || a + alen > body.len() {
                break;
            }
            let data = &body[a + 4..a + alen];
            match (atype, data.len()) {
                (RTA_DST, 4) => dst = Some(Ipv4Addr::new(data[0], data[1], data[2], data[3])),
                (RTA_OIF, 4) => oif = Some(u32_at(data, 0)),
                (RTA_TABLE, 4) => table = u32_at(data, 0),
                _ => {}
            }
            a += align4(alen);
        }
        if let (Some(dst), Some(oif), RT_TABLE_MAIN) = (dst, oif, table) {
            found.push((dst, oif));
        }
    }
    found
}
