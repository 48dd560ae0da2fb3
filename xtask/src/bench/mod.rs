//! `cargo xtask bench`: the datapath against plain routing and against GKE's own
//! mechanism (netd's policy routing), side by side in one lab, plus the microbenchmarks.
//!
//! The measuring code lives in the tests crate (xtask must build before bpf-linker is
//! installed, so it depends on none of the workspace's crates):
//!
//! * `tests/benches/compare.rs` runs off, netd and visibility alternating in rounds, with
//!   the client on CPU 0 and the server on CPU 1, and prints JSON;
//! * `tests/benches/attach_latency.rs` times new Pods' attachment with 250 present;
//! * `tests/benches/churn.rs` makes and deletes 500 Pod interfaces in bursts, times
//!   their attachment, checks that nothing is left behind, and reports the daemon's CPU
//!   time and memory;
//! * `tests/benches/program_cost.rs` runs each program with `BPF_PROG_TEST_RUN`;
//! * `tests/benches/flow_records.rs` times one flow-record interval and measures the
//!   memory at 10k, 100k and 1M flows.
//!
//! This module builds the release daemon, runs them through cargo, and renders the
//! outputs: a table on the terminal with the ratios and the targets,
//! `target/bench/results.json`, `target/bench/results.svg` and, with `--update-readme`,
//! the README's performance section (between `<!-- bench:start -->` and
//! `<!-- bench:end -->`). A figure that misses its target is reported, not an error:
//! the command fails only when a benchmark itself fails.
//!
//! Its parts: [`figures`] (what the comparison measures, and the targets), [`report`]
//! (the tables and verdicts), [`svg`] (the chart), [`breakdown`] (where the time goes),
//! [`micro`] (the microbenchmarks' lines) and [`readme`] (the README's section).

mod breakdown;
mod figures;
mod micro;
mod readme;
mod report;
mod svg;
#[cfg(test)]
mod tests;

use std::{
    fs,
    path::{Path, PathBuf},
    process::{Command, Stdio},
    time::Instant,
};

use anyhow::{Context as _, bail};
use serde_json::{Map, Value, json};

use self::{
    breakdown::Breakdown,
    figures::GATEWAY_VARIANTS,
    micro::{attach_line, churn_line, flow_records_line, microbenches, program_cost_line},
    readme::update_readme,
    report::Report,
};
use crate::{
    paths::{target_dir, workspace_root},
    run::{display, is_root, run},
};

#[derive(clap::Args, Default)]
pub struct BenchArgs {
    /// A smoke run: one round, short durations, small attach-latency and churn labs.
    #[arg(long)]
    quick: bool,
    /// Where results.json, results.svg and the profiles go [default: target/bench].
    #[arg(long, value_name = "DIR")]
    out: Option<PathBuf>,
    /// Rounds of off, netd and visibility (default 3; 1 with --quick).
    #[arg(long, value_name = "N")]
    rounds: Option<usize>,
    /// Replace the README's performance section (between `<!-- bench:start -->` and
    /// `<!-- bench:end -->`) with a table from this run.
    #[arg(long)]
    update_readme: bool,
    /// Only the side-by-side comparison: skip attach_latency, churn, program_cost and
    /// flow_records.
    #[arg(long)]
    no_micro: bool,
    /// Skip the diagnostics that say where the time goes: the profiled UDP run per mode
    /// (`perf`, under target/bench/profile/) and the comparisons with a gateway that
    /// only routes and with one that routes in TC, ahead of its IP stack.
    #[arg(long)]
    no_diagnostics: bool,
}

impl BenchArgs {
    /// Every benchmark once, briefly (`--quick`), writing under `target/bench-smoke`.
    pub fn smoke() -> Self {
        Self {
            quick: true,
            out: Some(target_dir().join("bench-smoke")),
            ..Self::default()
        }
    }
}

pub fn bench(args: &BenchArgs) -> anyhow::Result<()> {
    let started = Instant::now();
    if !is_root() {
        bail!(
            "the benchmarks need root (network namespaces, BPF): run `sudo -E cargo xtask bench`"
        );
    }
    let root = workspace_root();
    // Absolute: the benches run with their package's directory as the current one.
    let out_dir = std::path::absolute(
        args.out
            .clone()
            .unwrap_or_else(|| target_dir().join("bench")),
    )
    .context("--out")?;
    fs::create_dir_all(&out_dir).with_context(|| format!("creating {}", out_dir.display()))?;

    // The benches run target/release/visibility (next to their own deps/ directory).
    run(Command::new("cargo").current_dir(&root).args([
        "build",
        "--release",
        "-p",
        "visibility-userspace",
        "--bins",
    ]))?;

    let mut compare_args: Vec<String> = Vec::new();
    if args.quick {
        compare_args.push("--quick".into());
    }
    if let Some(rounds) = args.rounds {
        compare_args.push("--rounds".into());
        compare_args.push(rounds.to_string());
    }
    let profile_dir = out_dir.join("profile");
    let main_args: Vec<String> = if args.no_diagnostics {
        compare_args.clone()
    } else {
        let dir = profile_dir.to_string_lossy().into_owned();
        compare_args
            .iter()
            .cloned()
            .chain(["--profile".to_owned(), dir])
            .collect()
    };
    let mut results = compare(&root, &out_dir, "compare", &main_args)?;
    let mut variants = Vec::new();
    if !args.no_diagnostics {
        for variant in &GATEWAY_VARIANTS {
            println!(
                "bench: the same comparison with a gateway that {}",
                variant.does
            );
            let variant_args: Vec<String> = compare_args
                .iter()
                .cloned()
                .chain(["--gateway".to_owned(), variant.name.to_owned()])
                .collect();
            let name = format!("compare-{}-gateway", variant.name);
            variants.push((variant, compare(&root, &out_dir, &name, &variant_args)?));
        }
    }

    let mut failures = Vec::new();
    let mut micro = Map::new();
    for (name, bench_args) in microbenches(args.quick) {
        let result = if args.no_micro {
            skipped("--no-micro")
        } else {
            cargo_bench_json(&root, name, &bench_args)
                .and_then(|text| parse_json(&text))
                .unwrap_or_else(|error| {
                    failures.push(format!("{name}: {error:#}"));
                    json!({ "failed": format!("{error:#}") })
                })
        };
        micro.insert(name.to_owned(), result);
    }

    let report = Report::new(&results)?;
    let variant_reports = variants
        .iter()
        .map(|(variant, json)| Ok((*variant, Report::new(json)?)))
        .collect::<anyhow::Result<Vec<_>>>()?;
    // The diagnostics, for the terminal and for the README.
    let diagnostics: Vec<(String, String)> = Breakdown::new(&results["profile"])
        .map(|b| (b.terminal(), b.markdown()))
        .into_iter()
        .chain(
            variant_reports
                .iter()
                .map(|(variant, r)| (r.terminal_variant(variant), r.markdown_variant(variant))),
        )
        .collect();
    let mut table = report.terminal_table();
    for (terminal, _) in &diagnostics {
        table.push('\n');
        table.push_str(terminal);
    }
    let micro_of = |wanted: &str| micro.get(wanted).cloned().unwrap_or(Value::Null);
    let micro_lines: Vec<String> = [
        program_cost_line(&micro_of("program_cost")),
        attach_line(&micro_of("attach_latency")),
        churn_line(&micro_of("churn")),
        flow_records_line(&micro_of("flow_records")),
    ]
    .into_iter()
    .flatten()
    .collect();
    if let Value::Object(fields) = &mut results {
        fields.insert("ratios".into(), report.ratios_json());
        fields.insert("targets".into(), report.targets_json());
        fields.insert("microbenchmarks".into(), Value::Object(micro));
        for ((variant, mut json), (_, variant_report)) in variants.into_iter().zip(&variant_reports)
        {
            if let Value::Object(variant_fields) = &mut json {
                variant_fields.insert("ratios".into(), variant_report.ratios_json());
                variant_fields.insert("targets".into(), variant_report.targets_json());
            }
            fields.insert(format!("{}_gateway", variant.name), json);
        }
    }
    let json_path = out_dir.join("results.json");
    fs::write(&json_path, serde_json::to_string_pretty(&results)? + "\n")
        .with_context(|| format!("writing {}", json_path.display()))?;
    let svg_path = out_dir.join("results.svg");
    fs::write(&svg_path, svg::chart(&report))
        .with_context(|| format!("writing {}", svg_path.display()))?;

    println!();
    print!("{table}");
    for line in &micro_lines {
        println!("{line}");
    }
    println!();
    println!("wrote {} and {}", json_path.display(), svg_path.display());
    if args.update_readme {
        let readme = root.join("README.md");
        let mut section = report.markdown(&micro_lines);
        for (_, markdown) in &diagnostics {
            section.push('\n');
            section.push_str(markdown);
        }
        update_readme(&readme, &section)?;
        println!("updated the performance section of {}", readme.display());
    }
    println!("bench: done in {:.0}s", started.elapsed().as_secs_f64());
    if !failures.is_empty() {
        bail!("benchmarks failed:\n  {}", failures.join("\n  "));
    }
    Ok(())
}

/// Runs the compare bench with `args` and parses its JSON document; the raw output is
/// kept as `<name>.raw.txt` when it is not JSON.
fn compare(root: &Path, out_dir: &Path, name: &str, args: &[String]) -> anyhow::Result<Value> {
    let text = cargo_bench_json(root, "compare", args)?;
    parse_json(&text).with_context(|| {
        let raw = out_dir.join(format!("{name}.raw.txt"));
        let _ = fs::write(&raw, &text);
        format!(
            "the compare bench's output is not JSON (saved in {})",
            raw.display()
        )
    })
}

/// A benchmark's JSON document.
fn parse_json(text: &str) -> anyhow::Result<Value> {
    Ok(serde_json::from_str(text)?)
}

fn skipped(why: &str) -> Value {
    json!({ "skipped": why })
}

/// Runs `cargo bench -p visibility-tests --bench NAME -- ARGS`, with its standard error
/// shown as it comes and its standard output (a JSON document) returned.
fn cargo_bench_json(root: &Path, name: &str, args: &[String]) -> anyhow::Result<String> {
    let mut cmd = Command::new("cargo");
    cmd.current_dir(root)
        .args(["bench", "-p", "visibility-tests", "--bench", name, "--"])
        .args(args)
        .stdin(Stdio::null())
        .stdout(Stdio::piped())
        .stderr(Stdio::inherit());
    println!("$ {}", display(&cmd));
    let out = cmd
        .output()
        .with_context(|| format!("starting {}", display(&cmd)))?;
    if !out.status.success() {
        bail!("{} failed: {}", display(&cmd), out.status);
    }
    String::from_utf8(out.stdout).with_context(|| format!("{name}: output is not UTF-8"))
}
