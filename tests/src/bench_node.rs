//! What the benchmarks on a lab node share: their arguments (`--quick`, `--json` and
//! sizes), a node whose daemon's last log lines are printed when they fail, and the
//! check that the daemon attaches with TCX, whose link pins they watch.

use std::process::ExitCode;

use anyhow::{Context as _, Result, bail, ensure};

use crate::node::Node;

/// A benchmark's arguments.
pub struct BenchArgs {
    /// Print one JSON document on standard output (`cargo xtask bench` reads it).
    pub json: bool,
    sizes: Vec<(&'static str, usize)>,
}

impl BenchArgs {
    /// Parses `args`: `--json`; `--quick`, which picks the small default of each size;
    /// and `--NAME N` for each of `sizes`, given as (NAME, default, quick default).
    pub fn parse(
        args: impl Iterator<Item = String>,
        sizes: &[(&'static str, usize, usize)],
    ) -> Result<Self> {
        let args: Vec<String> = args.collect();
        let quick = args.iter().any(|a| a == "--quick");
        let mut parsed = Self {
            json: false,
            sizes: sizes
                .iter()
                .map(|(name, full, small)| (*name, if quick { *small } else { *full }))
                .collect(),
        };
        let mut iter = args.iter();
        while let Some(arg) = iter.next() {
            match arg.as_str() {
                "--quick" | "--bench" => {}
                "--json" => parsed.json = true,
                flag => {
                    let Some(size) = flag
                        .strip_prefix("--")
                        .and_then(|name| parsed.sizes.iter_mut().find(|(n, _)| *n == name))
                    else {
                        let known: Vec<String> =
                            sizes.iter().map(|(n, ..)| format!("--{n} N")).collect();
                        bail!(
                            "unknown argument {flag:?} (known: --quick, --json, {})",
                            known.join(", ")
                        );
                    };
                    size.1 = iter.next().with_context(|| format!("{flag} N"))?.parse()?;
                }
            }
        }
        Ok(parsed)
    }

    /// The size `--NAME` gave, or its default.
    pub fn size(&self, name: &str) -> usize {
        self.sizes
            .iter()
            .find(|(n, _)| *n == name)
            .map_or(0, |(_, value)| *value)
    }
}

/// Parses the process's arguments ([`BenchArgs::parse`] with `sizes`) and runs `bench`
/// on a new lab node with two Pods, as root, printing the daemon's last log lines if it
/// fails: the bench `name`'s whole `main`.
pub fn run_on_node(
    name: &str,
    sizes: &[(&'static str, usize, usize)],
    bench: impl FnOnce(&mut Node, &BenchArgs) -> Result<()>,
) -> ExitCode {
    let result = (|| {
        let args = BenchArgs::parse(std::env::args().skip(1), sizes)?;
        ensure!(
            nix::unistd::geteuid().is_root(),
            "needs root (network namespaces, BPF)"
        );
        let mut node = Node::new(name, 2).context("building the lab")?;
        node.capture_daemon_log();
        let result = bench(&mut node, &args);
        if result.is_err() {
            node.print_daemon_log_tail(40);
        }
        result
    })();
    match result {
        Ok(()) => ExitCode::SUCCESS,
        Err(error) => {
            eprintln!("{name}: {error:#}");
            ExitCode::FAILURE
        }
    }
}

/// The daemon's attach mode, which must be TCX (Linux 6.6 and later): the benches watch
/// its link pins.
pub fn ensure_tcx(node: &Node) -> Result<String> {
    let status = node.status()?;
    let mode = status["daemon"]["attach_mode"]
        .as_str()
        .unwrap_or_default()
        .to_owned();
    ensure!(
        mode == "tcx",
        "the daemon attaches with {mode:?}; this bench watches TCX link pins (Linux 6.6+)"
    );
    Ok(mode)
}
