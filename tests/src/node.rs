//! A lab node running the real `visibility` binary: the daemon in the node's
//! namespace, and CLI commands against the same pin directory.
//!
//! Needs root, and the binary built (`cargo build -p visibility-userspace`, which
//! `cargo xtask test` does first). `VISIBILITY_BIN` overrides where it is found.

use std::{
    path::{Path, PathBuf},
    process::{Command, Output, Stdio},
    sync::atomic::{AtomicUsize, Ordering},
    time::{Duration, Instant},
};

use anyhow::{Context as _, Result, bail};

use crate::lab::{Background, Lab, LabConfig, POD_CIDR_V4, POD_CIDR_V6};

/// The `visibility` binary under test.
pub fn binary() -> PathBuf {
    if let Some(path) = std::env::var_os("VISIBILITY_BIN") {
        return PathBuf::from(path);
    }
    // target/<profile>/deps/<test binary> -> target/<profile>/visibility
    let exe = std::env::current_exe().expect("test binary path");
    let profile_dir = exe.parent().and_then(Path::parent).expect("target/<profile>");
    let binary = profile_dir.join("visibility");
    assert!(
        binary.exists(),
        "{} is missing: run `cargo build -p visibility-userspace` (cargo xtask test does) or set VISIBILITY_BIN",
        binary.display()
    );
    binary
}

/// A unique bpffs pin directory per node, removed on drop.
fn unique_pin_dir(tag: &str) -> PathBuf {
    static COUNTER: AtomicUsize = AtomicUsize::new(0);
    PathBuf::from(format!(
        "/sys/fs/bpf/vis-{tag}-{}-{}",
        std::process::id(),
        COUNTER.fetch_add(1, Ordering::Relaxed)
    ))
}

/// A lab whose node runs the daemon.
pub struct Node {
    pub lab: Lab,
    pub pin_dir: PathBuf,
    daemon: Option<Background>,
    daemon_args: Vec<String>,
}

impl Node {
    /// A lab with `pods` Pods and no daemon yet.
    pub fn new(tag: &str, pods: usize) -> Result<Self> {
        let lab = Lab::new(tag, LabConfig { pods, ..LabConfig::default() })?;
        Ok(Self { lab, pin_dir: unique_pin_dir(tag), daemon: None, daemon_args: Vec::new() })
    }

    /// The default daemon flags: both Pod CIDRs and a fast reconcile.
    pub fn default_daemon_args() -> Vec<String> {
        ["--pod-cidr", POD_CIDR_V4, "--pod-cidr", POD_CIDR_V6, "--reconcile-interval", "1"]
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
                args.iter().map(|a| a.as_ref()).collect::<Vec<_>>().join(" "),
                output.status,
                String::from_utf8_lossy(&output.stdout),
                String::from_utf8_lossy(&output.stderr)
            );
        }
        Ok(String::from_utf8_lossy(&output.stdout).into_owned())
    }

    /// Starts the daemon with `args` and waits until every Pod interface is attached.
    pub fn start_daemon(&mut self, args: Vec<String>) -> Result<()> {
        let mut all = vec!["daemon".to_owned()];
        all.extend(args.iter().cloned());
        let mut cmd = self.command(&all);
        cmd.stdout(Stdio::null());
        self.daemon = Some(Background::spawn(cmd)?);
        self.daemon_args = args;
        self.wait_until_attached(self.lab.pod_count())
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
            child.kill().context("killing the daemon")?;
            child.wait().context("reaping the daemon")?;
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
            format!("status --json: {}{}", String::from_utf8_lossy(&output.stdout), String::from_utf8_lossy(&output.stderr))
        })
    }

    /// Waits until the daemon reports `count` attached Pod interfaces.
    pub fn wait_until_attached(&self, count: usize) -> Result<()> {
        self.wait_for(Duration::from_secs(10), |status| {
            let pods = status["daemon"]["pod_interfaces"].as_array()?;
            (pods.len() == count && pods.iter().all(|p| p["attached"] == true)).then_some(())
        })
        .with_context(|| format!("waiting for {count} attached Pod interfaces"))
    }

    /// Polls `status --json` until `check` returns something, or fails after `timeout`.
    pub fn wait_for<T>(&self, timeout: Duration, mut check: impl FnMut(&serde_json::Value) -> Option<T>) -> Result<T> {
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
        let status = self.status()?;
        status["counters"]
            .as_array()
            .and_then(|rows| rows.iter().find(|r| r["hook"] == hook && r["counter"] == counter))
            .and_then(|r| r["packets"].as_u64())
            .with_context(|| format!("no counter {hook}/{counter}"))
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
    }
}
