//! A lab node running the real `visibility` binary: the daemon in the node's
//! namespace, and CLI commands against the same pin directory.
//!
//! Needs root, and the binary built (`cargo build -p visibility-userspace`, which
//! `cargo xtask test` does first). `VISIBILITY_BIN` overrides where it is found.

use std::{
    path::{Path, PathBuf},
    process::{Command, Output, Stdio},
    time::{Duration, Instant},
};

use anyhow::{Context as _, Result, bail, ensure};

use crate::lab::{Background, Lab, LabConfig, POD_CIDR_V4, POD_CIDR_V6};

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
    /// A command the daemon runs under (see [`Node::wrap_daemon`]); empty for none.
    daemon_wrapper: Vec<String>,
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
            daemon_wrapper: Vec::new(),
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

    /// From the next daemon start on, the daemon runs as the last arguments of
    /// `wrapper` (a program and its first arguments), which must exec it: e.g.
    /// `unshare --mount` and a shell that mounts something first. The daemon's pid
    /// stays the fixture's.
    pub fn wrap_daemon(&mut self, wrapper: Vec<String>) {
        self.daemon_wrapper = wrapper;
    }

    /// The `visibility daemon args...` command, with standard error captured if asked.
    fn daemon_command(&self, args: &[String]) -> Result<Command> {
        let mut all = vec!["daemon".to_owned()];
        all.extend(args.iter().cloned());
        let mut cmd = self.command_under(&self.daemon_wrapper, &all);
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
        self.command_under(&[], args)
    }

    /// [`Node::command`], run as the last arguments of `wrapper` when it is not empty.
    fn command_under<S: AsRef<str>>(&self, wrapper: &[String], args: &[S]) -> Command {
        let mut all: Vec<String> = wrapper.iter().skip(1).cloned().collect();
        if !wrapper.is_empty() {
            all.push(binary().display().to_string());
        }
        all.extend(["--pin-dir".into(), self.pin_dir.display().to_string()]);
        all.extend(args.iter().map(|a| a.as_ref().to_owned()));
        let program = wrapper.first().map_or_else(binary, PathBuf::from);
        let mut cmd = self.lab.node().cmd(program, &all);
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

    /// The programs attached to the node's interfaces: TCX attachments where the kernel
    /// has TCX, else the clsact filters (`tc -j filter show`), as the daemon attaches
    /// on older kernels.
    pub fn attached_programs(&self) -> Result<Vec<TcxAttachment>> {
        if matches!(
            visibility::datapath::AttachMode::current(),
            visibility::datapath::AttachMode::Tcx
        ) {
            return self.tcx_attachments();
        }
        let node = self.lab.node();
        let mut found = Vec::new();
        let interfaces = node.try_in_ns(|| {
            Ok(nix::net::if_::if_nameindex()
                .context("listing interfaces")?
                .iter()
                .map(|iface| iface.name().to_string_lossy().into_owned())
                .collect::<Vec<_>>())
        })?;
        for name in interfaces {
            for direction in ["ingress", "egress"] {
                let out = node.run(
                    "tc",
                    ["-j", "filter", "show", "dev", name.as_str(), direction],
                )?;
                let filters: serde_json::Value = serde_json::from_str(out.trim())
                    .with_context(|| format!("tc filter show dev {name} {direction}: {out}"))?;
                for filter in filters.as_array().into_iter().flatten() {
                    let prog = &filter["options"]["prog"];
                    // Each preference also has an entry of its own, without options.
                    if let Some(id) = prog["id"].as_u64() {
                        found.push(TcxAttachment {
                            interface: name.clone(),
                            direction,
                            program_id: u32::try_from(id)?,
                            program_name: prog["name"].as_str().unwrap_or_default().to_owned(),
                        });
                    }
                }
            }
        }
        Ok(found)
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
