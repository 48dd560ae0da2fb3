//! UDP packets per second, and where the time goes under `perf`.

use std::{
    net::{SocketAddr, UdpSocket},
    path::{Path, PathBuf},
    process::Stdio,
    sync::{
        Arc,
        atomic::{AtomicBool, AtomicU64, Ordering},
    },
    time::{Duration, Instant},
};

use anyhow::{Context as _, Result, ensure};
use visibility_tests::lab::{Lab, pin_to_cpu};

use crate::{figures::*, options::*};

/// Receiver packets per second and sender packets per second over `secs`, after
/// `warmup_secs` of the same traffic. With `profile`, the client CPU is recorded with
/// `perf` over the same window, and the report is written next to the recording.
pub(crate) fn udp_pps(
    lab: &Lab,
    secs: f64,
    warmup_secs: f64,
    profile: Option<&Path>,
) -> Result<(f64, f64)> {
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
                        Err(e) if nothing_came(&e) => {}
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
pub(crate) struct Profile {
    pub(crate) child: std::process::Child,
    pub(crate) path: PathBuf,
}

/// What a recording says: shares of all samples, inclusive of what each part calls.
pub(crate) struct Breakdown {
    pub(crate) samples: u64,
    /// The CPU had nothing to run.
    pub(crate) idle: f64,
    pub(crate) categories: Vec<(&'static str, f64)>,
}

/// Whether a symbol of a profile belongs to a category.
pub(crate) type Belongs = fn(&str) -> bool;

/// Categories of the breakdown: a name and whether a symbol belongs to it.
pub(crate) const CATEGORIES: [(&str, Belongs); 3] = [
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
    pub(crate) fn start(path: &Path, cpu: usize, secs: f64) -> Result<Self> {
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
    pub(crate) fn finish(mut self) -> Result<()> {
        let status = self.child.wait().context("perf record")?;
        ensure!(status.success(), "perf record failed: {status}");
        let report = perf_report(&self.path, "--no-children")?;
        let text_path = self.path.with_extension("txt");
        std::fs::write(&text_path, report)
            .with_context(|| format!("writing {}", text_path.display()))?;
        Ok(())
    }

    /// Inclusive shares of the recording's samples, by category.
    pub(crate) fn breakdown(path: &Path) -> Result<Breakdown> {
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
pub(crate) fn perf_report(path: &Path, children: &str) -> Result<String> {
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

/// Whether a receive on a socket with a timeout (or a non-blocking one) failed only
/// because nothing came in time: the caller tries again.
pub(crate) fn nothing_came(e: &std::io::Error) -> bool {
    matches!(
        e.kind(),
        std::io::ErrorKind::WouldBlock
            | std::io::ErrorKind::TimedOut
            | std::io::ErrorKind::Interrupted
    )
}
