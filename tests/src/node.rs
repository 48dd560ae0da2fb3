//! A lab node running the real `visibility` binary: the daemon in the node's
//! namespace, and CLI commands against the same pin directory.
//!
//! Needs root, and the binary built (`cargo build -p visibility-userspace`, which
//! `cargo xtask test` does first). `VISIBILITY_BIN` overrides where it is found.

use std::{
    io::{ErrorKind, Read as _, Write as _},
    net::{IpAddr, Shutdown, SocketAddr, TcpStream},
    path::{Path, PathBuf},
    process::{Command, Output, Stdio},
    sync::{
        Arc, Mutex,
        atomic::{AtomicBool, AtomicU64, Ordering},
    },
    thread::JoinHandle,
    time::{Duration, Instant},
};

use anyhow::{Context as _, Result, bail, ensure};

use crate::lab::{Background, Lab, LabConfig, Netns, POD_CIDR_V4, POD_CIDR_V6};

/// The `visibility` binary under test.
pub fn binary() -> PathBuf {
    if let Some(path) = std::env::var_os("VISIBILITY_BIN") {
        return PathBuf::from(path);
    }
    // Test binaries live in target/<profile>/deps, others (the demo) in target/<profile>.
    let exe = std::env::current_exe().expect("test binary path");
    exe.ancestors()
        .skip(1)
        .take(2)
        .map(|dir| dir.join("visibility"))
        .find(|candidate| candidate.is_file())
        .unwrap_or_else(|| {
            panic!(
                "no visibility binary next to {}: run `cargo build -p visibility-userspace` (cargo xtask test does) or set VISIBILITY_BIN",
                exe.display()
            )
        })
}

/// A unique bpffs pin directory per node, removed on drop.
fn unique_pin_dir(tag: &str) -> PathBuf {
    PathBuf::from(format!("/sys/fs/bpf/vis-{}", crate::unique::name(tag)))
}

/// How much slower than a host this machine runs CPU-bound work: 1, or what
/// `VISIBILITY_TEST_TIME_SCALE` says (the VM tier's emulated CPU sets it). Budgets for
/// CPU-bound work, such as the verifier's walk of the programs when a daemon starts,
/// are multiplied by it; budgets for exchanges on the network are not.
pub fn time_scale() -> u32 {
    std::env::var("VISIBILITY_TEST_TIME_SCALE")
        .ok()
        .and_then(|scale| scale.parse().ok())
        .filter(|scale| *scale >= 1)
        .unwrap_or(1)
}

/// Runs `visibility --pin-dir <pin_dir> args...` in the current (root) network namespace,
/// for commands that need no lab, such as ones given a pin directory that holds nothing.
pub fn run_cli<S: AsRef<str>>(pin_dir: &Path, args: &[S]) -> Result<Output> {
    Command::new(binary())
        .arg("--pin-dir")
        .arg(pin_dir)
        .args(args.iter().map(|a| a.as_ref()))
        .env("VISIBILITY_LOG", "info")
        .stdin(Stdio::null())
        .output()
        .context("running visibility")
}

/// Runs `cmd` to completion with its output captured, killing it if it takes longer than
/// `timeout` (then it fails): for commands that must exit, such as a daemon given bad input.
pub fn output_within(mut cmd: Command, timeout: Duration) -> Result<Output> {
    let mut child = cmd
        .stdin(Stdio::null())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .context("starting")?;
    let deadline = Instant::now() + timeout;
    while child.try_wait()?.is_none() {
        if Instant::now() >= deadline {
            let _ = child.kill();
            let output = child.wait_with_output()?;
            bail!(
                "still running after {timeout:?}; killed. stdout: {} stderr: {}",
                String::from_utf8_lossy(&output.stdout),
                String::from_utf8_lossy(&output.stderr)
            );
        }
        std::thread::sleep(Duration::from_millis(20));
    }
    Ok(child.wait_with_output()?)
}

/// Polls `check` every 50 ms until it returns something, or fails after `timeout` with
/// the last error or a note that it never held.
pub fn poll<T>(
    timeout: Duration,
    what: &str,
    mut check: impl FnMut() -> Result<Option<T>>,
) -> Result<T> {
    let deadline = Instant::now() + timeout;
    loop {
        let last = match check() {
            Ok(Some(found)) => return Ok(found),
            Ok(None) => "condition not met".to_owned(),
            Err(error) => format!("{error:#}"),
        };
        if Instant::now() >= deadline {
            bail!("timed out after {timeout:?} waiting for {what}: {last}");
        }
        std::thread::sleep(Duration::from_millis(50));
    }
}

/// A lab whose node runs the daemon.
pub struct Node {
    pub lab: Lab,
    pub pin_dir: PathBuf,
    daemon: Option<Background>,
    daemon_args: Vec<String>,
    /// Where the daemon's standard error goes, once [`Node::capture_daemon_log`] was called.
    log_path: Option<PathBuf>,
}

impl Node {
    /// A lab with `pods` Pods and no daemon yet.
    pub fn new(tag: &str, pods: usize) -> Result<Self> {
        let lab = Lab::new(
            tag,
            LabConfig {
                pods,
                ..LabConfig::default()
            },
        )?;
        Ok(Self::from_lab(lab))
    }

    /// A node on a lab built with a configuration of its own, and no daemon yet.
    pub fn from_lab(lab: Lab) -> Self {
        let pin_dir = unique_pin_dir(lab.prefix());
        Self {
            lab,
            pin_dir,
            daemon: None,
            daemon_args: Vec::new(),
            log_path: None,
        }
    }

    /// From the next daemon start on, the daemon's standard error goes to a file (appended
    /// to across restarts, removed on drop) instead of the test's; [`Node::daemon_log`]
    /// reads it. A test that panics prints it.
    pub fn capture_daemon_log(&mut self) -> PathBuf {
        let path = self.log_path.get_or_insert_with(|| {
            PathBuf::from(format!(
                "/tmp/{}.daemon.log",
                self.pin_dir
                    .file_name()
                    .map(|n| n.to_string_lossy().into_owned())
                    .unwrap_or_default()
            ))
        });
        let _ = std::fs::remove_file(&*path);
        path.clone()
    }

    /// What the daemon wrote to standard error, when captured ([`Node::capture_daemon_log`]).
    pub fn daemon_log(&self) -> Result<String> {
        let path = self
            .log_path
            .as_ref()
            .context("the daemon log is not captured")?;
        std::fs::read_to_string(path).with_context(|| format!("reading {}", path.display()))
    }

    /// Prints the last `count` lines of the captured daemon log to standard error, if it
    /// is captured: why a benchmark's daemon did not do what it should.
    pub fn print_daemon_log_tail(&self, count: usize) {
        if let Ok(log) = self.daemon_log() {
            let lines: Vec<&str> = log.lines().collect();
            eprintln!("--- the daemon's last log lines ---");
            for line in &lines[lines.len().saturating_sub(count)..] {
                eprintln!("{line}");
            }
            eprintln!("--- end of the daemon's log ---");
        }
    }

    /// The `visibility daemon args...` command, with standard error captured if asked.
    fn daemon_command(&self, args: &[String]) -> Result<Command> {
        let mut all = vec!["daemon".to_owned()];
        all.extend(args.iter().cloned());
        let mut cmd = self.command(&all);
        cmd.stdin(Stdio::null()).stdout(Stdio::null());
        if let Some(path) = &self.log_path {
            let file = std::fs::OpenOptions::new()
                .create(true)
                .append(true)
                .open(path)
                .with_context(|| format!("opening {}", path.display()))?;
            cmd.stderr(file);
        }
        Ok(cmd)
    }

    /// The default daemon flags: both Pod CIDRs and a fast reconcile.
    pub fn default_daemon_args() -> Vec<String> {
        [
            "--pod-cidr",
            POD_CIDR_V4,
            "--pod-cidr",
            POD_CIDR_V6,
            "--reconcile-interval",
            "1",
        ]
        .iter()
        .map(|s| s.to_string())
        .collect()
    }

    /// A `visibility` command in the node's namespace, with this node's pin directory.
    pub fn command<S: AsRef<str>>(&self, args: &[S]) -> Command {
        let mut all: Vec<String> = vec!["--pin-dir".into(), self.pin_dir.display().to_string()];
        all.extend(args.iter().map(|a| a.as_ref().to_owned()));
        let mut cmd = self.lab.node().cmd(binary(), &all);
        cmd.env("VISIBILITY_LOG", "info");
        cmd
    }

    /// Runs a CLI command to completion.
    pub fn cli<S: AsRef<str>>(&self, args: &[S]) -> Result<Output> {
        let mut cmd = self.command(args);
        cmd.stdin(Stdio::null());
        cmd.output().context("running visibility")
    }

    /// Runs a CLI command that must succeed, and returns its standard output.
    pub fn cli_ok<S: AsRef<str>>(&self, args: &[S]) -> Result<String> {
        let output = self.cli(args)?;
        if !output.status.success() {
            bail!(
                "visibility {} failed ({}): {}{}",
                args.iter()
                    .map(|a| a.as_ref())
                    .collect::<Vec<_>>()
                    .join(" "),
                output.status,
                String::from_utf8_lossy(&output.stdout),
                String::from_utf8_lossy(&output.stderr)
            );
        }
        Ok(String::from_utf8_lossy(&output.stdout).into_owned())
    }

    /// Starts the daemon with `args` and waits until every Pod interface is attached.
    pub fn start_daemon(&mut self, args: Vec<String>) -> Result<()> {
        ensure!(self.daemon.is_none(), "the daemon already runs");
        let cmd = self.daemon_command(&args)?;
        self.daemon = Some(Background::spawn(cmd)?);
        self.daemon_args = args;
        self.wait_until_attached(self.lab.pod_count())
    }

    /// Whether the daemon this fixture started is still running.
    pub fn daemon_running(&mut self) -> bool {
        self.daemon.as_mut().is_some_and(Background::is_running)
    }

    /// Starts the daemon with the default flags.
    pub fn start(&mut self) -> Result<()> {
        self.start_daemon(Self::default_daemon_args())
    }

    /// The daemon's pid, while it runs.
    pub fn daemon_pid(&self) -> Option<u32> {
        self.daemon.as_ref().map(Background::id)
    }

    /// Kills the daemon with SIGKILL, as a crash or `kill -9` would.
    pub fn kill_daemon(&mut self) -> Result<()> {
        if let Some(daemon) = self.daemon.take() {
            let mut child = daemon.into_child();
            let killed = child.kill().context("killing the daemon");
            child.wait().context("reaping the daemon")?;
            killed?;
        }
        Ok(())
    }

    /// Stops the daemon with SIGTERM.
    pub fn stop_daemon(&mut self) -> Result<()> {
        if let Some(daemon) = self.daemon.take() {
            daemon.terminate(Duration::from_secs(5))?;
        }
        Ok(())
    }

    /// Starts the daemon again with the flags it had.
    pub fn restart_daemon(&mut self) -> Result<()> {
        let args = self.daemon_args.clone();
        self.start_daemon(args)
    }

    /// `visibility status --json`, parsed (whatever its exit code).
    pub fn status(&self) -> Result<serde_json::Value> {
        let output = self.cli(&["status", "--json"])?;
        serde_json::from_slice(&output.stdout).with_context(|| {
            format!(
                "status --json: {}{}",
                String::from_utf8_lossy(&output.stdout),
                String::from_utf8_lossy(&output.stderr)
            )
        })
    }

    /// Waits until the daemon (the one this fixture runs now) reports `count` attached Pod
    /// interfaces. Generous: verifying the programs on a busy machine, with many tests
    /// loading theirs at once, can take seconds; on an emulated CPU, [`time_scale`] times
    /// as long.
    pub fn wait_until_attached(&self, count: usize) -> Result<()> {
        let pid = self.daemon_pid();
        self.wait_for(Duration::from_secs(30) * time_scale(), |status| {
            if pid.is_some() && status["daemon"]["pid"].as_u64() != pid.map(u64::from) {
                return None;
            }
            let pods = status["daemon"]["pod_interfaces"].as_array()?;
            (pods.len() == count && pods.iter().all(|p| p["attached"] == true)).then_some(())
        })
        .with_context(|| format!("waiting for {count} attached Pod interfaces"))
    }

    /// Polls `status --json` until `check` returns something, or fails after `timeout`.
    pub fn wait_for<T>(
        &self,
        timeout: Duration,
        mut check: impl FnMut(&serde_json::Value) -> Option<T>,
    ) -> Result<T> {
        let deadline = Instant::now() + timeout;
        let mut last = serde_json::Value::Null;
        while Instant::now() < deadline {
            if let Ok(status) = self.status() {
                if let Some(found) = check(&status) {
                    return Ok(found);
                }
                last = status;
            }
            std::thread::sleep(Duration::from_millis(50));
        }
        bail!("timed out; last status: {last}")
    }

    /// A counter's packets, from `status --json`.
    pub fn counter(&self, hook: &str, counter: &str) -> Result<u64> {
        counter_in(&self.status()?, hook, counter)
    }

    /// `visibility exempt list --json`, parsed.
    pub fn exempt_list(&self) -> Result<serde_json::Value> {
        Ok(serde_json::from_str(
            &self.cli_ok(&["exempt", "list", "--json"])?,
        )?)
    }

    /// `visibility pod-cidr list --json`, parsed.
    pub fn pod_cidrs(&self) -> Result<Vec<String>> {
        Ok(serde_json::from_str(
            &self.cli_ok(&["pod-cidr", "list", "--json"])?,
        )?)
    }

    /// Every TCX attachment in the node's namespace, on every interface, queried from the
    /// kernel (bpftool before 7.3 does not show TCX in `net show`).
    pub fn tcx_attachments(&self) -> Result<Vec<TcxAttachment>> {
        use aya::programs::{SchedClassifier, TcAttachType};
        self.lab.node().try_in_ns(|| {
            let mut found = Vec::new();
            let interfaces = nix::net::if_::if_nameindex().context("listing interfaces")?;
            for iface in interfaces.iter() {
                let name = iface.name().to_string_lossy().into_owned();
                for (direction, attach_type) in [
                    ("ingress", TcAttachType::Ingress),
                    ("egress", TcAttachType::Egress),
                ] {
                    let (_, programs) = SchedClassifier::query_tcx(&name, attach_type)
                        .with_context(|| format!("querying TCX {direction} of {name}"))?;
                    found.extend(programs.iter().map(|p| TcxAttachment {
                        interface: name.clone(),
                        direction,
                        program_id: p.id(),
                        program_name: p.name_as_str().unwrap_or_default().to_owned(),
                    }));
                }
            }
            Ok(found)
        })
    }

    /// `bpftool -j ARGS...` in the node's namespace, parsed.
    pub fn bpftool(&self, args: &[&str]) -> Result<serde_json::Value> {
        let mut all = vec!["-j"];
        all.extend_from_slice(args);
        let out = self.lab.node().run("bpftool", &all)?;
        serde_json::from_str(&out).with_context(|| format!("bpftool {args:?}: {out}"))
    }

    /// `visibility flows --json`, parsed.
    pub fn flows(&self, filters: &[&str]) -> Result<Vec<serde_json::Value>> {
        let mut args = vec!["flows", "--json"];
        for filter in filters {
            args.push("--filter");
            args.push(filter);
        }
        let out = self.cli_ok(&args)?;
        Ok(serde_json::from_str(&out)?)
    }
}

impl Drop for Node {
    fn drop(&mut self) {
        let _ = self.kill_daemon();
        let _ = self.cli(&["teardown"]);
        let _ = std::fs::remove_dir_all(&self.pin_dir);
        if let Some(path) = self.log_path.take() {
            if std::thread::panicking()
                && let Ok(log) = std::fs::read_to_string(&path)
            {
                eprintln!(
                    "--- daemon log ({}) ---\n{log}--- end of daemon log ---",
                    self.pin_dir.display()
                );
            }
            let _ = std::fs::remove_file(path);
        }
    }
}

/// A program attached with TCX to an interface.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct TcxAttachment {
    pub interface: String,
    /// `ingress` or `egress`.
    pub direction: &'static str,
    pub program_id: u32,
    pub program_name: String,
}

/// A counter's packets in a parsed `status --json`.
pub fn counter_in(status: &serde_json::Value, hook: &str, counter: &str) -> Result<u64> {
    status["counters"]
        .as_array()
        .and_then(|rows| {
            rows.iter()
                .find(|r| r["hook"] == hook && r["counter"] == counter)
        })
        .and_then(|r| r["packets"].as_u64())
        .with_context(|| format!("no counter {hook}/{counter} in {status}"))
}

// ---------------------------------------------------------------------------------------
// A long-running TCP conversation
// ---------------------------------------------------------------------------------------

/// Size of one [`TcpLoad`] message.
const MESSAGE_LEN: usize = 64;

/// What a [`TcpLoad`] did, once stopped.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct LoadReport {
    /// Messages sent and echoed back intact.
    pub messages: u64,
    /// Bytes sent (all of them echoed back).
    pub bytes: u64,
    /// Bytes the server echoed.
    pub server_bytes: u64,
    /// The longest a message waited for its echo.
    pub max_round_trip: Duration,
}

/// One TCP connection between two namespaces that carries a message every `interval` for
/// as long as it lives: the client (in one Pod) sends a numbered message, waits for the
/// server (in another) to echo it and checks it, then sleeps. Any error (on connect, send
/// or receive, a wrong echo, or an echo that takes longer than `echo_timeout`) ends the
/// client, and [`TcpLoad::stop`] or [`TcpLoad::wait_for_echoes`] report it.
pub struct TcpLoad {
    stop: Arc<AtomicBool>,
    echoed: Arc<AtomicU64>,
    client_addr: SocketAddr,
    server_addr: SocketAddr,
    client: Option<JoinHandle<Result<LoadReport>>>,
    server: Option<JoinHandle<Result<u64>>>,
    /// The first error of the client, as soon as it happens (the thread ends with it).
    failure: Arc<Mutex<Option<String>>>,
}

impl TcpLoad {
    /// Connects from `client_ns` to a fresh echo server on `server_ip` in `server_ns`.
    pub fn start(
        client_ns: &Netns,
        server_ns: &Netns,
        server_ip: IpAddr,
        interval: Duration,
        echo_timeout: Duration,
    ) -> Result<Self> {
        let listener = server_ns.tcp_listen(SocketAddr::new(server_ip, 0))?;
        let server_addr = listener.local_addr()?;
        let server = std::thread::Builder::new()
            .name(format!("echo-{server_addr}"))
            .spawn(move || -> Result<u64> {
                listener.set_nonblocking(true)?;
                let deadline = Instant::now() + Duration::from_secs(10);
                let mut stream = loop {
                    match listener.accept() {
                        Ok((stream, _)) => break stream,
                        Err(e)
                            if e.kind() == ErrorKind::WouldBlock && Instant::now() < deadline =>
                        {
                            std::thread::sleep(Duration::from_millis(5));
                        }
                        Err(e) => return Err(e).context("echo server: accept"),
                    }
                };
                stream.set_nonblocking(false)?;
                // Generous: only a client that went away without closing would hit it.
                stream.set_read_timeout(Some(Duration::from_secs(120)))?;
                let mut total = 0u64;
                let mut buf = [0u8; 4096];
                loop {
                    match stream.read(&mut buf) {
                        Ok(0) => break,
                        Ok(n) => {
                            stream.write_all(&buf[..n]).context("echo server: write")?;
                            total += n as u64;
                        }
                        Err(e) if e.kind() == ErrorKind::Interrupted => {}
                        Err(e) => {
                            return Err(e)
                                .with_context(|| format!("echo server: read after {total} bytes"));
                        }
                    }
                }
                let _ = stream.shutdown(Shutdown::Write);
                Ok(total)
            })?;
        let stream = client_ns.tcp_connect(server_addr, Duration::from_secs(5))?;
        stream.set_nodelay(true)?;
        stream.set_read_timeout(Some(echo_timeout))?;
        stream.set_write_timeout(Some(echo_timeout))?;
        let client_addr = stream.local_addr()?;
        let stop = Arc::new(AtomicBool::new(false));
        let echoed = Arc::new(AtomicU64::new(0));
        let failure = Arc::new(Mutex::new(None));
        let (stop2, echoed2, failure2) = (stop.clone(), echoed.clone(), failure.clone());
        let client = std::thread::Builder::new()
            .name(format!("load-{client_addr}"))
            .spawn(move || {
                let result = run_client(stream, &stop2, &echoed2, interval);
                if let Err(error) = &result {
                    *failure2.lock().unwrap_or_else(|e| e.into_inner()) =
                        Some(format!("{error:#}"));
                }
                result
            })?;
        Ok(Self {
            stop,
            echoed,
            client_addr,
            server_addr,
            client: Some(client),
            server: Some(server),
            failure,
        })
    }

    /// The client's address (the connection's source).
    pub fn client_addr(&self) -> SocketAddr {
        self.client_addr
    }

    /// The server's address (the connection's destination).
    pub fn server_addr(&self) -> SocketAddr {
        self.server_addr
    }

    /// Messages echoed so far.
    pub fn echoed(&self) -> u64 {
        self.echoed.load(Ordering::SeqCst)
    }

    /// The client's error, if it has failed.
    pub fn failure(&self) -> Option<String> {
        self.failure
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .clone()
    }

    /// Waits until `more` further messages were echoed; fails at once if the client failed.
    pub fn wait_for_echoes(&self, more: u64, timeout: Duration) -> Result<u64> {
        let target = self.echoed() + more;
        poll(timeout, &format!("{more} more echoed messages"), || {
            if let Some(failure) = self.failure() {
                bail!(
                    "the TCP connection broke after {} messages: {failure}",
                    self.echoed()
                );
            }
            Ok((self.echoed() >= target).then(|| self.echoed()))
        })
    }

    /// Stops sending, closes the connection and reports; any error on the way (in the
    /// client or the server) fails.
    pub fn stop(mut self) -> Result<LoadReport> {
        self.stop.store(true, Ordering::SeqCst);
        let client = self.client.take().expect("joined once").join();
        let mut report = match client {
            Ok(result) => result.context("TCP load client")?,
            Err(panic) => std::panic::resume_unwind(panic),
        };
        report.server_bytes = match self.server.take().expect("joined once").join() {
            Ok(result) => result.context("TCP load server")?,
            Err(panic) => std::panic::resume_unwind(panic),
        };
        ensure!(
            report.server_bytes == report.bytes,
            "sent {} bytes, the server echoed {}",
            report.bytes,
            report.server_bytes
        );
        Ok(report)
    }
}

impl Drop for TcpLoad {
    fn drop(&mut self) {
        self.stop.store(true, Ordering::SeqCst);
    }
}

fn run_client(
    mut stream: TcpStream,
    stop: &AtomicBool,
    echoed: &AtomicU64,
    interval: Duration,
) -> Result<LoadReport> {
    let mut report = LoadReport {
        messages: 0,
        bytes: 0,
        server_bytes: 0,
        max_round_trip: Duration::ZERO,
    };
    let started = Instant::now();
    while !stop.load(Ordering::SeqCst) {
        let mut message = [0u8; MESSAGE_LEN];
        message[..8].copy_from_slice(&report.messages.to_be_bytes());
        for (i, byte) in message[8..].iter_mut().enumerate() {
            *byte = (report.messages as u8).wrapping_add(i as u8);
        }
        let number = report.messages;
        let what = || format!("message {number} at {:?}", started.elapsed());
        let sent_at = Instant::now();
        stream
            .write_all(&message)
            .with_context(|| format!("sending {}", what()))?;
        report.bytes += MESSAGE_LEN as u64;
        let mut echo = [0u8; MESSAGE_LEN];
        stream
            .read_exact(&mut echo)
            .with_context(|| format!("receiving the echo of {}", what()))?;
        ensure!(echo == message, "the echo of {} differs: {echo:?}", what());
        report.max_round_trip = report.max_round_trip.max(sent_at.elapsed());
        report.messages += 1;
        echoed.store(report.messages, Ordering::SeqCst);
        std::thread::sleep(interval);
    }
    stream
        .shutdown(Shutdown::Write)
        .context("closing the sending side")?;
    let mut rest = Vec::new();
    stream
        .read_to_end(&mut rest)
        .context("reading until the server closes")?;
    ensure!(
        rest.is_empty(),
        "{} unexpected bytes after the last echo",
        rest.len()
    );
    Ok(report)
}
