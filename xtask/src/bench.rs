//! `cargo xtask bench`: the datapath against plain routing and against GKE's own
//! mechanism (netd's policy routing), side by side in one lab, plus the microbenchmarks.
//!
//! The measuring code lives in the tests crate (xtask must build before bpf-linker is
//! installed, so it depends on none of the workspace's crates):
//!
//! * `tests/benches/compare.rs` runs off, netd and visibility alternating in rounds, with
//!   the client on CPU 0 and the server on CPU 1, and prints JSON;
//! * `tests/benches/attach_latency.rs` times new Pods' attachment with 250 present;
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

use std::{
    fmt::Write as _,
    fs,
    path::{Path, PathBuf},
    process::{Command, Stdio},
    time::Instant,
};

use anyhow::{Context as _, bail};
use serde_json::{Map, Value, json};

use crate::{
    paths::{target_dir, workspace_root},
    run::{display, run},
    setup::is_root,
};

const README_START: &str = "<!-- bench:start -->";
const README_END: &str = "<!-- bench:end -->";
/// The modes, in the order they run within a round.
const MODES: [&str; 3] = ["off", "netd", "visibility"];
/// The microbenchmarks, run after the comparisons, and their arguments: each prints a
/// JSON document with `--json`.
fn microbenches(quick: bool) -> [(&'static str, Vec<String>); 3] {
    let json = || vec!["--json".to_owned()];
    let mut attach = json();
    if quick {
        // A smaller lab of Pod interfaces.
        attach.push("--quick".to_owned());
    }
    [
        ("attach_latency", attach),
        ("program_cost", json()),
        ("flow_records", json()),
    ]
}

#[derive(clap::Args, Default)]
pub struct BenchArgs {
    /// A smoke run: one round, short durations, a small attach-latency lab.
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
    /// Only the side-by-side comparison: skip attach_latency, program_cost and
    /// flow_records.
    #[arg(long)]
    no_micro: bool,
    /// Skip the diagnostics that say where the time goes: the profiled UDP run per mode
    /// (`perf`, under target/bench/profile/) and the comparisons with a gateway that
    /// only routes and with one that routes in TC, ahead of its IP stack.
    #[arg(long)]
    no_diagnostics: bool,
}

/// A comparison after the main one, whose gateway has a firewall and conntrack as in
/// the demo: the stand-in VPC doing less of its work on the node's CPUs.
struct GatewayVariant {
    /// The compare bench's `--gateway` kind.
    name: &'static str,
    /// What the gateway does, for the terminal.
    does: &'static str,
    /// The README's title and explanation.
    title: &'static str,
    explanation: &'static str,
}

const GATEWAY_VARIANTS: [GatewayVariant; 2] = [
    GatewayVariant {
        name: "plain",
        does: "only routes (no firewall, no conntrack)",
        title: "Without the stand-in VPC's firewall.",
        explanation: "only routes (no nftables firewall, no connection tracking). On GKE the VPC's firewall and flow logs do not run on the node",
    },
    GatewayVariant {
        name: "offloaded",
        does: "routes in TC, ahead of its IP stack (the VPC's work off the node)",
        title: "With the stand-in VPC's work off the gateway's stack.",
        explanation: "routes in TC, ahead of its IP stack (`lab_router`: a FIB lookup, new MACs, one hop spent, sent back out), so that of the gateway only two veth crossings and that program remain on CPU 0: the nearest this machine comes to GKE, where the VPC's routing, firewall and flow logs run off the node",
    },
];

/// One figure of the comparison.
struct Figure {
    key: &'static str,
    label: &'static str,
    short: &'static str,
    higher_is_better: bool,
    /// The least (throughput) or most (latency) visibility/off may be.
    target: Option<f64>,
}

/// How many figures the comparison has.
const FIGURE_COUNT: usize = 5;

const FIGURES: [Figure; FIGURE_COUNT] = [
    Figure {
        key: "tcp_gbps",
        label: "TCP Gbit/s",
        short: "TCP",
        higher_is_better: true,
        target: Some(0.96),
    },
    Figure {
        key: "udp_pps",
        label: "UDP 64 B pps",
        short: "UDP pps",
        higher_is_better: true,
        target: Some(0.86),
    },
    Figure {
        key: "rr_mean_us",
        label: "RR mean µs",
        short: "RR mean",
        higher_is_better: false,
        target: Some(1.06),
    },
    Figure {
        key: "rr_p99_us",
        label: "RR p99 µs",
        short: "RR p99",
        higher_is_better: false,
        target: None,
    },
    // The ping-pong with both ends busy-polling: the path's latency without the
    // wake-ups that dominate the figures above.
    Figure {
        key: "rr_busy_mean_us",
        label: "busy-poll RR mean µs",
        short: "busy-poll RR mean",
        higher_is_better: false,
        target: None,
    },
];

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
    fs::write(&svg_path, report.svg())
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

/// "per-packet program cost (BPF_PROG_TEST_RUN medians): ..." from program_cost's JSON.
fn program_cost_line(program_cost: &Value) -> Option<String> {
    items_line(
        "per-packet program cost (BPF_PROG_TEST_RUN medians)",
        &program_cost["rows"],
        |row| {
            Some(format!(
                "{} {} {:.0} ns",
                row["program"].as_str()?,
                row["case"].as_str()?,
                row["ns_per_packet"].as_f64()?
            ))
        },
    )
}

/// "`label`: ITEM; ITEM; ..." with one item per element of the array `items` that
/// `item` can describe; `None` when there is none.
fn items_line(
    label: &str,
    items: &Value,
    item: impl Fn(&Value) -> Option<String>,
) -> Option<String> {
    let described: Vec<String> = items.as_array()?.iter().filter_map(item).collect();
    (!described.is_empty()).then(|| format!("{label}: {}", described.join("; ")))
}

fn attach_line(attach: &Value) -> Option<String> {
    let p50 = attach["p50_ms"].as_f64()?;
    let p99 = attach["p99_ms"].as_f64()?;
    let parts = match (
        attach["route_to_first_program_p50_ms"].as_f64(),
        attach["first_to_second_program_p50_ms"].as_f64(),
    ) {
        (Some(first), Some(second)) => format!(
            "; p50 split: route -> first program {first:.1} ms, first -> second {second:.1} ms"
        ),
        _ => String::new(),
    };
    Some(format!(
        "attach latency: {} new Pods with {} Pod interfaces present: p50 {p50:.1} ms, p99 {p99:.1} ms (route appears -> both programs attached{parts})",
        attach["new"].as_f64().unwrap_or(0.0),
        attach["present"].as_f64().unwrap_or(0.0),
    ))
}

/// "flow records, one interval ...: 10000 flows 37 ms (read 9 ms, emit 14 ms), RSS
/// 15 MiB; ..." from flow_records' JSON.
fn flow_records_line(flow_records: &Value) -> Option<String> {
    items_line(
        "flow records, one interval in which every flow moved (read the flow map, build a record per flow, emit it as a JSON line)",
        &flow_records["sizes"],
        |size| {
            Some(format!(
                "{} flows {:.0} ms (read {:.0} ms, emit {:.0} ms), RSS {:.0} MiB",
                size["flows"].as_u64()?,
                size["total_ms"].as_f64()?,
                size["read_ms"].as_f64()?,
                size["emit_ms"].as_f64()?,
                size["rss_mib"].as_f64()?,
            ))
        },
    )
}

// ---------------------------------------------------------------------------------------
// The report
// ---------------------------------------------------------------------------------------

/// `mode`/off for each figure in each round of the compare bench's `rounds`, in round
/// order; rounds that lack either mode are left out.
fn round_ratios(rounds: &Value, mode: &str) -> Vec<[f64; FIGURE_COUNT]> {
    let Value::Array(rows) = rounds else {
        return Vec::new();
    };
    let of = |round: f64, mode: &str| {
        rows.iter()
            .find(|row| row["round"].as_f64() == Some(round) && row["mode"].as_str() == Some(mode))
    };
    let mut numbers: Vec<f64> = rows
        .iter()
        .filter_map(|row| row["round"].as_f64())
        .collect();
    numbers.dedup();
    numbers
        .into_iter()
        .filter_map(|round| {
            let (measured, off) = (of(round, mode)?, of(round, MODES[0])?);
            // A figure a round lacks is NaN: the spread skips it, and it leaves no budget.
            let mut ratios = [f64::NAN; FIGURE_COUNT];
            for (ratio, figure) in ratios.iter_mut().zip(&FIGURES) {
                if let (Some(measured), Some(off)) =
                    (measured[figure.key].as_f64(), off[figure.key].as_f64())
                {
                    *ratio = measured / off;
                }
            }
            Some(ratios)
        })
        .collect()
}

/// A mode's cost on `figure` from its ratio to off: the share of throughput lost, or of
/// latency added.
fn cost_of(ratio: f64, figure: usize) -> f64 {
    if FIGURES[figure].higher_is_better {
        1.0 - ratio
    } else {
        ratio - 1.0
    }
}

/// A target's verdict.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
enum Verdict {
    Pass,
    Short,
    /// Cannot be judged: netd's cost on this figure is nothing, or within the noise.
    NotApplicable,
}

impl Verdict {
    fn word(self) -> &'static str {
        match self {
            Verdict::Pass => "PASS",
            Verdict::Short => "SHORT",
            Verdict::NotApplicable => "n/a",
        }
    }
}

struct Report {
    date: String,
    kernel: String,
    cpus: String,
    rounds: usize,
    quick: bool,
    client_cpu: f64,
    server_cpu: f64,
    /// What other processes used while the comparison ran, if it was a noticeable share.
    background: Option<String>,
    /// medians[mode][figure]
    medians: Vec<[f64; FIGURE_COUNT]>,
    /// visibility/off in each round (the modes alternate, so a round's ratio compares
    /// measurements minutes apart at most): the spread says how noisy the machine was.
    round_ratios: Vec<[f64; FIGURE_COUNT]>,
    /// netd/off in each round.
    netd_round_ratios: Vec<[f64; FIGURE_COUNT]>,
}

impl Report {
    fn new(results: &Value) -> anyhow::Result<Self> {
        let medians = MODES
            .iter()
            .map(|mode| {
                let m = &results["medians"][*mode];
                let mut values = [f64::NAN; FIGURE_COUNT];
                for (value, figure) in values.iter_mut().zip(&FIGURES) {
                    *value = m[figure.key]
                        .as_f64()
                        .with_context(|| format!("no median {mode}.{}", figure.key))?;
                }
                Ok(values)
            })
            .collect::<anyhow::Result<Vec<_>>>()?;
        let config = &results["config"];
        Ok(Self {
            date: results["date"].as_str().unwrap_or_default().to_owned(),
            kernel: results["kernel"].as_str().unwrap_or_default().to_owned(),
            cpus: format!(
                "{} CPUs ({})",
                results["cpus"].as_f64().unwrap_or(0.0),
                results["cpu_model"].as_str().unwrap_or("?")
            ),
            rounds: config["rounds"].as_f64().unwrap_or(0.0) as usize,
            quick: config["quick"].as_bool() == Some(true),
            client_cpu: results["pinning"]["client_cpu"].as_f64().unwrap_or(0.0),
            server_cpu: results["pinning"]["server_cpu"].as_f64().unwrap_or(1.0),
            background: background_note(&results["background"]),
            medians,
            round_ratios: round_ratios(&results["rounds"], MODES[2]),
            netd_round_ratios: round_ratios(&results["rounds"], MODES[1]),
        })
    }

    /// The lowest and highest visibility/off of one figure over the rounds, as
    /// ` (rounds LOW{sep}HIGH)`; empty with fewer than two rounds.
    fn round_range(&self, figure: usize, sep: &str) -> String {
        let values = self.round_ratios.iter().map(|r| r[figure]);
        let low = values.clone().fold(f64::INFINITY, f64::min);
        let high = values.fold(f64::NEG_INFINITY, f64::max);
        if self.round_ratios.len() < 2 || !low.is_finite() || !high.is_finite() {
            return String::new();
        }
        format!(" (rounds {low:.2}{sep}{high:.2})")
    }

    fn median(&self, mode: usize, figure: usize) -> f64 {
        self.medians[mode][figure]
    }

    /// `a / b` for each figure, modes by index.
    fn ratio(&self, a: usize, b: usize, figure: usize) -> f64 {
        self.median(a, figure) / self.median(b, figure)
    }

    /// What a mode costs relative to off on a figure: the fraction of throughput lost,
    /// or of latency added.
    fn cost(&self, mode: usize, figure: usize) -> f64 {
        cost_of(self.ratio(mode, 0, figure), figure)
    }

    /// Whether netd cost something on `figure` in every round (with fewer than two
    /// rounds: in the medians). Only then is a third of its cost a budget: a cost that
    /// some rounds do not show is within the machine's noise.
    fn netd_costs_measurably(&self, figure: usize) -> bool {
        if self.netd_round_ratios.len() < 2 {
            return self.cost(1, figure) > 0.0;
        }
        self.netd_round_ratios
            .iter()
            .all(|ratios| cost_of(ratios[figure], figure) > 0.0)
    }

    /// A third of netd's cost, as `{at_most} N%`, or why there is no such budget.
    fn budget(&self, figure: usize, at_most: &str) -> String {
        let netd = self.cost(1, figure);
        if netd <= 0.0 {
            "netd costs nothing measurable".to_owned()
        } else if !self.netd_costs_measurably(figure) {
            "netd cost nothing in some rounds: within the noise".to_owned()
        } else {
            format!("{at_most} {:.1}%", netd / 3.0 * 100.0)
        }
    }

    /// Visibility's cost must be at most a third of netd's.
    fn third_of_netd(&self, figure: usize) -> Verdict {
        let (vis, netd) = (self.cost(2, figure), self.cost(1, figure));
        if !self.netd_costs_measurably(figure) {
            Verdict::NotApplicable
        } else if vis <= netd / 3.0 {
            Verdict::Pass
        } else {
            Verdict::Short
        }
    }

    fn absolute(&self, figure: usize) -> Option<Verdict> {
        let target = FIGURES[figure].target?;
        let r = self.ratio(2, 0, figure);
        let ok = if FIGURES[figure].higher_is_better {
            r >= target
        } else {
            r <= target
        };
        Some(if ok { Verdict::Pass } else { Verdict::Short })
    }

    fn ratio_rows(&self) -> [(&'static str, usize, usize); 3] {
        [
            ("visibility/off", 2, 0),
            ("visibility/netd", 2, 1),
            ("netd/off", 1, 0),
        ]
    }

    fn header(&self) -> String {
        format!(
            "Pod-to-Pod on one node, IPv4; medians of {} round{} (off, netd, visibility alternating){}\n\
             client on CPU {} (Pod 0), server on CPU {} (Pod 1); Linux {}, {}; {}\n",
            self.rounds,
            if self.rounds == 1 { "" } else { "s" },
            if self.quick { "; QUICK smoke run" } else { "" },
            self.client_cpu,
            self.server_cpu,
            self.kernel,
            self.cpus,
            self.date,
        )
    }

    /// The rows of the medians table: each mode's medians, then the ratios between
    /// modes (with `ratio_decimals`), as text cells after a label.
    fn mode_rows(&self, ratio_decimals: usize) -> Vec<(String, Vec<String>)> {
        let medians = MODES.iter().enumerate().map(|(m, mode)| {
            let cells = FIGURES
                .iter()
                .enumerate()
                .map(|(f, figure)| format_value(figure.key, self.median(m, f)))
                .collect();
            ((*mode).to_owned(), cells)
        });
        let ratios = self.ratio_rows().into_iter().map(|(label, a, b)| {
            let cells = (0..FIGURES.len())
                .map(|f| format!("{:.*}", ratio_decimals, self.ratio(a, b, f)))
                .collect();
            (label.to_owned(), cells)
        });
        medians.chain(ratios).collect()
    }

    /// The medians per mode and their ratios, as a terminal table.
    fn terminal_modes(&self) -> String {
        // Each column as wide as its label, and two spaces.
        let widths = FIGURES.map(|figure| figure.label.chars().count() + 2);
        let mut s = format!("{:<17}", "mode");
        for (figure, width) in FIGURES.iter().zip(widths) {
            let _ = write!(s, "{:>width$}", figure.label);
        }
        s.push('\n');
        for (label, cells) in self.mode_rows(3) {
            let _ = write!(s, "{label:<17}");
            for (cell, width) in cells.iter().zip(widths) {
                let _ = write!(s, "{cell:>width$}");
            }
            s.push('\n');
        }
        s
    }

    fn terminal_variant(&self, variant: &GatewayVariant) -> String {
        let mut s = format!(
            "with a gateway that {} (medians of {} round{}):\n",
            variant.does,
            self.rounds,
            if self.rounds == 1 { "" } else { "s" },
        );
        s.push_str(&self.terminal_modes());
        s.push_str(&self.terminal_targets());
        s
    }

    /// The medians per mode and their ratios, as a Markdown table.
    fn markdown_modes(&self) -> String {
        let mut s = String::from("| mode |");
        for figure in &FIGURES {
            let _ = write!(s, " {} |", figure.label);
        }
        let _ = writeln!(s, "\n|---|{}", "---:|".repeat(FIGURES.len()));
        for (label, cells) in self.mode_rows(2) {
            let _ = writeln!(s, "| {label} | {} |", cells.join(" | "));
        }
        s
    }

    /// A comparison with another gateway, for the README: what the gateway does, the
    /// medians, ratios and targets.
    fn markdown_variant(&self, variant: &GatewayVariant) -> String {
        format!(
            "**{}** The same comparison with a gateway that {} (medians of {} round{}):\n\n{}\n{}",
            variant.title,
            variant.explanation,
            self.rounds,
            if self.rounds == 1 { "" } else { "s" },
            self.markdown_modes(),
            self.markdown_targets()
        )
    }

    fn terminal_table(&self) -> String {
        let mut s = self.header();
        if let Some(note) = &self.background {
            let _ = writeln!(s, "WARNING: a busy machine: {note}; the figures are noisy");
        }
        s.push('\n');
        s.push_str(&self.terminal_modes());
        s.push_str(&self.terminal_targets());
        s
    }

    /// Each figure against its targets, for the terminal.
    fn terminal_targets(&self) -> String {
        let mut s = String::from(
            "\ntargets (visibility/off, and visibility's cost at most a third of netd's):\n",
        );
        for (f, figure) in FIGURES.iter().enumerate() {
            let r = self.ratio(2, 0, f);
            let absolute = match (figure.target, self.absolute(f)) {
                (Some(target), Some(verdict)) => format!(
                    "visibility/off {r:.3} {} {target:.2}  {:<5}{}",
                    if figure.higher_is_better { ">=" } else { "<=" },
                    verdict.word(),
                    self.round_range(f, ".."),
                ),
                _ => format!("visibility/off {r:.3} {:<15}", "(no target)"),
            };
            let (vis, netd) = (self.cost(2, f), self.cost(1, f));
            let third = self.third_of_netd(f);
            let budget = self.budget(f, "<=");
            let _ = writeln!(
                s,
                "  {:<17} {absolute}   cost {:+.1}% vs netd {:+.1}% ({budget})  {}",
                figure.short,
                vis * 100.0,
                netd * 100.0,
                third.word()
            );
        }
        s
    }

    fn ratios_json(&self) -> Value {
        let rows = self.ratio_rows().map(|(label, a, b)| {
            let ratios = FIGURES
                .iter()
                .enumerate()
                .map(|(f, figure)| (figure.key.to_owned(), json!(self.ratio(a, b, f))))
                .collect();
            (label.replace('/', "_over_"), Value::Object(ratios))
        });
        Value::Object(rows.into_iter().collect())
    }

    fn targets_json(&self) -> Value {
        FIGURES
            .iter()
            .enumerate()
            .map(|(f, figure)| {
                let mut target = json!({
                    "figure": figure.key,
                    "visibility_over_off": self.ratio(2, 0, f),
                    "visibility_cost": self.cost(2, f),
                    "netd_cost": self.cost(1, f),
                    "third_of_netd": self.third_of_netd(f).word(),
                });
                if let (Some(limit), Some(verdict)) = (figure.target, self.absolute(f)) {
                    target["absolute_target"] = json!(format!(
                        "visibility/off {} {limit}",
                        if figure.higher_is_better { ">=" } else { "<=" }
                    ));
                    target["absolute"] = json!(verdict.word());
                }
                target
            })
            .collect()
    }

    /// The README's performance section; `micro_lines` are the microbenchmarks' lines.
    fn markdown(&self, micro_lines: &[String]) -> String {
        let day = self.date.get(..10).unwrap_or(&self.date);
        let mut s = String::new();
        let _ = writeln!(
            s,
            "_Measured {day} with `cargo xtask bench`: Linux {}, {}; same-node Pod-to-Pod over IPv4 in the netns lab, whose gateway namespace (the stand-in VPC) routes with an nftables firewall and conntrack accounting; client pinned to CPU {}, server to CPU {}; medians of {} round{} alternating off, netd and visibility{}._",
            self.kernel,
            self.cpus,
            self.client_cpu,
            self.server_cpu,
            self.rounds,
            if self.rounds == 1 { "" } else { "s" },
            if self.quick { " (quick smoke run)" } else { "" },
        );
        if let Some(note) = &self.background {
            let _ = writeln!(s, "\n_A busy machine: {note}._");
        }
        s.push('\n');
        s.push_str(&self.markdown_modes());
        s.push('\n');
        s.push_str(&self.markdown_targets());
        for line in micro_lines {
            let mut chars = line.chars();
            let capitalised: String = chars
                .next()
                .map(|first| first.to_uppercase().chain(chars).collect())
                .unwrap_or_default();
            let _ = writeln!(s, "\n{capitalised}.");
        }
        s
    }

    /// Each figure against its targets, as a Markdown table.
    fn markdown_targets(&self) -> String {
        let mut s = String::from("| target | measured | verdict |\n|---|---:|---|\n");
        for (f, figure) in FIGURES.iter().enumerate() {
            if let (Some(target), Some(verdict)) = (figure.target, self.absolute(f)) {
                let _ = writeln!(
                    s,
                    "| {} visibility/off {} {target} | {:.2}{} | {} |",
                    figure.short,
                    if figure.higher_is_better {
                        "≥"
                    } else {
                        "≤"
                    },
                    self.ratio(2, 0, f),
                    self.round_range(f, "–"),
                    verdict.word()
                );
            }
            let netd = self.cost(1, f);
            let budget = self.budget(f, "≤");
            let _ = writeln!(
                s,
                "| {} cost at most a third of netd's {:+.1}% ({budget}) | {:+.1}% | {} |",
                figure.short,
                netd * 100.0,
                self.cost(2, f) * 100.0,
                self.third_of_netd(f).word()
            );
        }
        s
    }

    /// Grouped bars per figure, each normalised to off.
    fn svg(&self) -> String {
        const WIDTH: f64 = 760.0;
        const HEIGHT: f64 = 440.0;
        const LEFT: f64 = 60.0;
        const RIGHT: f64 = 20.0;
        const TOP: f64 = 78.0;
        const BOTTOM: f64 = 70.0;
        const COLOURS: [&str; 3] = ["#9e9e9e", "#e8a33d", "#3d7be8"];
        let plot_w = WIDTH - LEFT - RIGHT;
        let plot_h = HEIGHT - TOP - BOTTOM;
        let normalised: Vec<[f64; 3]> = (0..FIGURES.len())
            .map(|f| [0, 1, 2].map(|m| self.ratio(m, 0, f)))
            .collect();
        let top_value = normalised
            .iter()
            .flatten()
            .copied()
            .filter(|v| v.is_finite())
            .fold(1.2f64, f64::max);
        let y_max = (top_value * 1.1 / 0.2).ceil() * 0.2;
        let y = |v: f64| TOP + plot_h - (v / y_max) * plot_h;
        let mut s = String::new();
        let _ = writeln!(
            s,
            r#"<svg xmlns="http://www.w3.org/2000/svg" width="{WIDTH}" height="{HEIGHT}" viewBox="0 0 {WIDTH} {HEIGHT}" font-family="sans-serif" font-size="12">"#
        );
        let _ = writeln!(
            s,
            r#"<rect x="0" y="0" width="{WIDTH}" height="{HEIGHT}" fill="white"/>"#
        );
        let _ = writeln!(
            s,
            r#"<text x="{LEFT}" y="22" font-size="15" font-weight="bold">Same-node Pod-to-Pod: netd and visibility relative to off (plain routing)</text>"#
        );
        let _ = writeln!(
            s,
            r##"<text x="{LEFT}" y="40" fill="#444">{}</text>"##,
            escape(&format!(
                "Linux {}, {}; client CPU {}, server CPU {}; medians of {} round(s); {}",
                self.kernel,
                self.cpus,
                self.client_cpu,
                self.server_cpu,
                self.rounds,
                self.date.get(..10).unwrap_or(&self.date)
            ))
        );
        let _ = writeln!(
            s,
            r##"<text x="{LEFT}" y="56" fill="#444">Throughput: higher is better. Latency: lower is better. Dashed: visibility's target.</text>"##
        );
        // Grid and axis.
        let mut tick = 0.0;
        while tick <= y_max + 1e-9 {
            let ty = y(tick);
            let _ = writeln!(
                s,
                r##"<line x1="{LEFT}" y1="{ty:.1}" x2="{:.1}" y2="{ty:.1}" stroke="{}" stroke-width="1"/>"##,
                WIDTH - RIGHT,
                if (tick - 1.0).abs() < 1e-9 {
                    "#555"
                } else {
                    "#e4e4e4"
                }
            );
            let _ = writeln!(
                s,
                r#"<text x="{:.1}" y="{:.1}" text-anchor="end">{tick:.1}×</text>"#,
                LEFT - 6.0,
                ty + 4.0
            );
            tick += 0.2;
        }
        let group_w = plot_w / FIGURES.len() as f64;
        let bar_w = group_w * 0.22;
        for (f, figure) in FIGURES.iter().enumerate() {
            let gx = LEFT + group_w * f as f64 + (group_w - 3.0 * bar_w) / 2.0;
            for (m, colour) in COLOURS.iter().enumerate() {
                let v = normalised[f][m];
                if !v.is_finite() {
                    continue;
                }
                let x = gx + bar_w * m as f64;
                let (y0, y1) = (y(v), y(0.0));
                let _ = writeln!(
                    s,
                    r#"<rect x="{x:.1}" y="{y0:.1}" width="{:.1}" height="{:.1}" fill="{colour}"><title>{} {}: {:.3}× off ({})</title></rect>"#,
                    bar_w - 3.0,
                    (y1 - y0).max(0.0),
                    MODES[m],
                    figure.label,
                    v,
                    format_value(figure.key, self.median(m, f))
                );
                let _ = writeln!(
                    s,
                    r#"<text x="{:.1}" y="{:.1}" text-anchor="middle" font-size="11">{v:.2}</text>"#,
                    x + (bar_w - 3.0) / 2.0,
                    y0 - 4.0
                );
                if m == 2
                    && let Some(target) = figure.target
                {
                    let ty = y(target);
                    let _ = writeln!(
                        s,
                        r##"<line x1="{:.1}" y1="{ty:.1}" x2="{:.1}" y2="{ty:.1}" stroke="#c62828" stroke-width="2" stroke-dasharray="4 3"/>"##,
                        x - 4.0,
                        x + bar_w + 1.0
                    );
                }
            }
            let cx = LEFT + group_w * (f as f64 + 0.5);
            let _ = writeln!(
                s,
                r#"<text x="{cx:.1}" y="{:.1}" text-anchor="middle" font-weight="bold">{}</text>"#,
                TOP + plot_h + 18.0,
                escape(figure.label)
            );
            let _ = writeln!(
                s,
                r##"<text x="{cx:.1}" y="{:.1}" text-anchor="middle" fill="#444">off = {}</text>"##,
                TOP + plot_h + 34.0,
                format_value(figure.key, self.median(0, f))
            );
        }
        // Legend.
        let mut lx = LEFT;
        let ly = HEIGHT - 16.0;
        for (m, colour) in COLOURS.iter().enumerate() {
            let _ = writeln!(
                s,
                r#"<rect x="{lx:.1}" y="{:.1}" width="12" height="12" fill="{colour}"/><text x="{:.1}" y="{ly:.1}">{}</text>"#,
                ly - 10.0,
                lx + 16.0,
                MODES[m]
            );
            lx += 110.0;
        }
        s.push_str("</svg>\n");
        s
    }
}

/// Where the client CPU's time per packet goes, from the compare bench's profiled UDP
/// run per mode.
struct Breakdown {
    cpu: f64,
    modes: Vec<ModeBreakdown>,
}

struct ModeBreakdown {
    mode: &'static str,
    /// Nanoseconds per packet the CPU was not idle.
    busy: f64,
    /// Share of the time the CPU had nothing to run.
    idle: f64,
    /// Nanoseconds per packet in each part.
    categories: Vec<(String, f64)>,
}

impl Breakdown {
    fn new(profile: &Value) -> Option<Self> {
        let modes = MODES
            .iter()
            .map(|mode| {
                let m = &profile["modes"][*mode];
                let categories = m["categories_ns_per_packet"]
                    .as_object()
                    .map(|fields| {
                        fields
                            .iter()
                            .filter_map(|(name, value)| Some((name.clone(), value.as_f64()?)))
                            .collect()
                    })
                    .unwrap_or_default();
                Some(ModeBreakdown {
                    mode,
                    busy: m["busy_ns_per_packet"].as_f64()?,
                    idle: m["idle_share"].as_f64()?,
                    categories,
                })
            })
            .collect::<Option<Vec<_>>>()?;
        Some(Self {
            cpu: profile["cpu"].as_f64()?,
            modes,
        })
    }

    fn category_names(&self) -> Vec<&str> {
        self.modes
            .first()
            .map(|m| m.categories.iter().map(|(n, _)| n.as_str()).collect())
            .unwrap_or_default()
    }

    fn terminal(&self) -> String {
        let mut s = format!(
            "where CPU {} (sender, and with veths all forwarding) spends each UDP packet, ns (perf):\n",
            self.cpu
        );
        let _ = write!(s, "{:<17}{:>12}", "mode", "busy");
        for name in self.category_names() {
            let _ = write!(s, "{name:>20}");
        }
        let _ = writeln!(s, "{:>8}", "idle");
        for m in &self.modes {
            let _ = write!(s, "{:<17}{:>12.0}", m.mode, m.busy);
            for (_, ns) in &m.categories {
                let _ = write!(s, "{ns:>20.0}");
            }
            let _ = writeln!(s, "{:>7.0}%", m.idle * 100.0);
        }
        s
    }

    fn markdown(&self) -> String {
        let mut s = format!(
            "**Where the time goes.** One more UDP run per mode under `perf`, recording CPU {}: it runs the sender and, since veths hand packets on in the sending CPU's softirq, all forwarding work, the gateway's included. Nanoseconds of that CPU per packet received; a part includes the functions it calls:\n\n| mode | busy |",
            self.cpu
        );
        let names = self.category_names();
        for name in &names {
            let _ = write!(s, " {name} |");
        }
        s.push_str(" idle |\n|---|---:|");
        s.push_str(&"---:|".repeat(names.len() + 1));
        s.push('\n');
        for m in &self.modes {
            let _ = write!(s, "| {} | {:.0} |", m.mode, m.busy);
            for (_, ns) in &m.categories {
                let _ = write!(s, " {ns:.0} |");
            }
            let _ = writeln!(s, " {:.0}% |", m.idle * 100.0);
        }
        s
    }
}

/// "other processes used 23% of the CPUs (qemu-system-x86 61 s, ...)" when they used more
/// than 5%.
fn background_note(background: &Value) -> Option<String> {
    let share = background["share_of_all_cpus"].as_f64()?;
    if share <= 0.05 {
        return None;
    }
    let top: Vec<String> = match &background["top"] {
        Value::Array(items) => items
            .iter()
            .filter_map(|item| {
                let seconds = item["cpu_seconds"].as_f64().filter(|s| *s >= 0.5)?;
                Some(format!("{} {seconds:.0} s", item["process"].as_str()?))
            })
            .take(3)
            .collect(),
        _ => Vec::new(),
    };
    Some(format!(
        "other processes used {:.0}% of the CPUs during the comparison ({})",
        share * 100.0,
        top.join(", ")
    ))
}

fn format_value(key: &str, value: f64) -> String {
    if !value.is_finite() {
        return "-".to_owned();
    }
    match key {
        "udp_pps" if value >= 1e6 => format!("{:.2}M", value / 1e6),
        "udp_pps" => format!("{:.1}k", value / 1e3),
        "tcp_gbps" => format!("{value:.2}"),
        _ => format!("{value:.1}"),
    }
}

fn escape(text: &str) -> String {
    text.replace('&', "&amp;")
        .replace('<', "&lt;")
        .replace('>', "&gt;")
}

/// Replaces what lies between the README's markers with `section`; creates the README
/// with just the markers when there is none. Nothing outside the markers changes.
fn update_readme(path: &Path, section: &str) -> anyhow::Result<()> {
    let text = match fs::read_to_string(path) {
        Ok(text) => text,
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => {
            format!("{README_START}\n{README_END}\n")
        }
        Err(e) => return Err(e).with_context(|| format!("reading {}", path.display())),
    };
    let updated = replace_marked(&text, section).with_context(|| {
        format!(
            "{}: add the lines {README_START} and {README_END} where the performance table goes",
            path.display()
        )
    })?;
    fs::write(path, updated).with_context(|| format!("writing {}", path.display()))
}

fn replace_marked(text: &str, section: &str) -> anyhow::Result<String> {
    let start = text
        .find(README_START)
        .with_context(|| format!("no {README_START}"))?;
    let after_start = start + README_START.len();
    let end = after_start
        + text[after_start..]
            .find(README_END)
            .with_context(|| format!("no {README_END} after {README_START}"))?;
    Ok(format!(
        "{}\n{}\n{}",
        &text[..after_start],
        section.trim_end_matches('\n'),
        &text[end..]
    ))
}

#[cfg(test)]
mod tests {
    use super::*;

    fn sample() -> Value {
        parse_json(
            r#"{"date": "2025-01-02T03:04:05Z", "kernel": "6.18.0", "cpus": 2,
                "cpu_model": "AMD EPYC", "config": {"rounds": 3, "quick": false},
                "pinning": {"client_cpu": 0, "server_cpu": 1},
                "medians": {
                  "off": {"tcp_gbps": 17.6, "udp_pps": 183000, "rr_mean_us": 60.9, "rr_p99_us": 84.7, "rr_busy_mean_us": 14.0},
                  "netd": {"tcp_gbps": 15.4, "udp_pps": 105000, "rr_mean_us": 70.9, "rr_p99_us": 94.2, "rr_busy_mean_us": 18.0},
                  "visibility": {"tcp_gbps": 17.2, "udp_pps": 160000, "rr_mean_us": 62.0, "rr_p99_us": 99.0, "rr_busy_mean_us": 15.0}
                },
                "background": {"share_of_all_cpus": 0.3, "top": [{"process": "qemu-system-x86", "cpu_seconds": 61.2}]},
                "profile": {"cpu": 0, "modes": {
                  "off": {"busy_ns_per_packet": 4550.2, "idle_share": 0.16, "categories_ns_per_packet": {"datapath programs": 0, "netfilter": 0, "policy rules": 339.2}},
                  "netd": {"busy_ns_per_packet": 7433.6, "idle_share": 0.157, "categories_ns_per_packet": {"datapath programs": 0, "netfilter": 631.0, "policy rules": 809.9}},
                  "visibility": {"busy_ns_per_packet": 6226.8, "idle_share": 0.183, "categories_ns_per_packet": {"datapath programs": 709.3, "netfilter": 572.9, "policy rules": 0}}
                }}}"#,
        )
        .unwrap()
    }

    #[test]
    fn targets_follow_the_lab_notes_numbers() {
        let report = Report::new(&sample()).unwrap();
        // TCP: netd costs 12.5%, visibility 2.3% (budget 4.2%); 17.2/17.6 = 0.977.
        assert!(report.third_of_netd(0) == Verdict::Pass);
        assert!(report.absolute(0) == Some(Verdict::Pass));
        // UDP: netd costs 42.6%, visibility 12.6% (budget 14.2%); 0.874 >= 0.86.
        assert!(report.third_of_netd(1) == Verdict::Pass);
        assert!(report.absolute(1) == Some(Verdict::Pass));
        // RR mean: netd +16.4%, visibility +1.8%.
        assert!(report.third_of_netd(2) == Verdict::Pass);
        // RR p99: netd +11.2%, visibility +16.9%: short.
        assert!(report.third_of_netd(3) == Verdict::Short);
        assert_eq!(report.absolute(3), None);
        let table = report.terminal_table();
        assert!(
            table.contains("client on CPU 0 (Pod 0), server on CPU 1 (Pod 1)"),
            "{table}"
        );
        assert!(table.contains("183.0k"), "{table}");
        assert!(
            table.contains(
                "other processes used 30% of the CPUs during the comparison (qemu-system-x86 61 s)"
            ),
            "{table}"
        );
        let svg = report.svg();
        assert!(svg.starts_with("<svg") && svg.trim_end().ends_with("</svg>"));
        assert_eq!(svg.matches("<rect").count(), 1 + 15 + 3);
    }

    #[test]
    fn the_breakdown_shows_each_modes_parts_and_each_gateway_variant_its_ratios_and_targets() {
        let json = sample();
        let breakdown = Breakdown::new(&json["profile"]).unwrap();
        let md = breakdown.markdown();
        assert!(
            md.contains("| mode | busy | datapath programs | netfilter | policy rules | idle |"),
            "{md}"
        );
        assert!(
            md.contains("| visibility | 6227 | 709 | 573 | 0 | 18% |"),
            "{md}"
        );
        let terminal = breakdown.terminal();
        assert!(
            terminal
                .lines()
                .any(|l| l.starts_with("netd") && l.contains("810")),
            "{terminal}"
        );
        // Without a profile there is no breakdown.
        assert!(Breakdown::new(&Value::Null).is_none());

        let report = Report::new(&json).unwrap();
        for (name, title) in [
            ("plain", "**Without the stand-in VPC's firewall.**"),
            (
                "offloaded",
                "**With the stand-in VPC's work off the gateway's stack.**",
            ),
        ] {
            let variant = GATEWAY_VARIANTS.iter().find(|v| v.name == name).unwrap();
            let md = report.markdown_variant(variant);
            assert!(md.starts_with(title), "{md}");
            assert!(
                md.contains("| visibility/off | 0.98 | 0.87 | 1.02 | 1.17 | 1.07 |"),
                "{md}"
            );
            assert!(
                md.contains("| UDP pps visibility/off ≥ 0.86 | 0.87 | PASS |"),
                "{md}"
            );
            let terminal = report.terminal_variant(variant);
            assert!(terminal.contains("targets (visibility/off"), "{terminal}");
        }
    }

    #[test]
    fn the_targets_show_how_far_the_rounds_spread() {
        let mut json = sample();
        let rounds = parse_json(
            r#"[{"round": 1, "mode": "off", "tcp_gbps": 10, "udp_pps": 100000, "rr_mean_us": 50, "rr_p99_us": 80},
                {"round": 1, "mode": "visibility", "tcp_gbps": 9, "udp_pps": 85000, "rr_mean_us": 52, "rr_p99_us": 90},
                {"round": 2, "mode": "off", "tcp_gbps": 10, "udp_pps": 100000, "rr_mean_us": 50, "rr_p99_us": 80},
                {"round": 2, "mode": "netd", "tcp_gbps": 9, "udp_pps": 60000, "rr_mean_us": 60, "rr_p99_us": 90},
                {"round": 2, "mode": "visibility", "tcp_gbps": 11, "udp_pps": 92000, "rr_mean_us": 55, "rr_p99_us": 70}]"#,
        )
        .unwrap();
        json["rounds"] = rounds;
        let report = Report::new(&json).unwrap();
        let terminal = report.terminal_targets();
        assert!(
            terminal.contains("0.874 >= 0.86  PASS  (rounds 0.85..0.92)"),
            "{terminal}"
        );
        assert!(terminal.contains("(rounds 0.90..1.10)"), "{terminal}");
        let md = report.markdown_targets();
        assert!(
            md.contains("| UDP pps visibility/off ≥ 0.86 | 0.87 (rounds 0.85–0.92) | PASS |"),
            "{md}"
        );
        // One round says nothing about the spread.
        let one = parse_json(r#"[{"round": 1, "mode": "off", "tcp_gbps": 10, "udp_pps": 1, "rr_mean_us": 1, "rr_p99_us": 1},
                                  {"round": 1, "mode": "visibility", "tcp_gbps": 9, "udp_pps": 1, "rr_mean_us": 1, "rr_p99_us": 1}]"#).unwrap();
        assert_eq!(round_ratios(&one, "visibility").len(), 1);
        let mut json = sample();
        json["rounds"] = one;
        assert!(
            !Report::new(&json)
                .unwrap()
                .terminal_targets()
                .contains("rounds")
        );
    }

    /// netd's RR mean cost is +2% in the medians, but one round shows none: a third of
    /// it is no budget to judge by. Its UDP cost shows in every round.
    #[test]
    fn a_netd_cost_that_some_rounds_do_not_show_sets_no_budget() {
        let mut json = sample();
        let row = |round: u32, mode: &str, udp: u32, rr: f64| json!({"round": round, "mode": mode, "tcp_gbps": 10, "udp_pps": udp, "rr_mean_us": rr, "rr_p99_us": 80});
        json["rounds"] = json!([
            row(1, "off", 100_000, 50.0),
            row(1, "netd", 60_000, 53.0),
            row(1, "visibility", 90_000, 51.0),
            row(2, "off", 100_000, 50.0),
            row(2, "netd", 62_000, 49.0),
            row(2, "visibility", 91_000, 52.0),
        ]);
        let report = Report::new(&json).unwrap();
        let rr_mean = 2;
        assert!(!report.netd_costs_measurably(rr_mean));
        assert_eq!(report.third_of_netd(rr_mean), Verdict::NotApplicable);
        let udp = 1;
        assert!(report.netd_costs_measurably(udp));
        assert_eq!(report.third_of_netd(udp), Verdict::Pass);
        let md = report.markdown_targets();
        assert!(
            md.contains("| RR mean cost at most a third of netd's +16.4% (netd cost nothing in some rounds: within the noise) | +1.8% | n/a |"),
            "{md}"
        );
        assert!(
            report
                .terminal_targets()
                .contains("(netd cost nothing in some rounds: within the noise)  n/a"),
        );
    }

    #[test]
    fn program_cost_rows_become_one_line() {
        let json = parse_json(
            r#"{"rows": [{"program": "pod_ingress", "case": "redirected, IPv4 UDP pod to pod", "ns_per_packet": 261.8},
                         {"program": "uplink_ingress", "case": "returned, IPv4 UDP to its pod", "ns_per_packet": 248.3}]}"#,
        )
        .unwrap();
        assert_eq!(
            program_cost_line(&json).unwrap(),
            "per-packet program cost (BPF_PROG_TEST_RUN medians): pod_ingress redirected, IPv4 UDP pod to pod 262 ns; uplink_ingress returned, IPv4 UDP to its pod 248 ns"
        );
        assert_eq!(program_cost_line(&Value::Null), None);
        let md = Report::new(&sample())
            .unwrap()
            .markdown(&[program_cost_line(&json).unwrap()]);
        assert!(
            md.contains("\nPer-packet program cost (BPF_PROG_TEST_RUN medians): pod_ingress"),
            "{md}"
        );
    }

    #[test]
    fn flow_record_sizes_become_one_line() {
        let json: Value = serde_json::from_str(
            r#"{"sizes": [{"flows": 10000, "total_ms": 21.4, "read_ms": 3.2, "emit_ms": 9.6, "rss_mib": 18.2},
                          {"flows": 1000000, "total_ms": 2712.0, "read_ms": 401.0, "emit_ms": 1200.4, "rss_mib": 912.0}]}"#,
        )
        .unwrap();
        assert_eq!(
            flow_records_line(&json).unwrap(),
            "flow records, one interval in which every flow moved (read the flow map, build a record per flow, emit it as a JSON line): 10000 flows 21 ms (read 3 ms, emit 10 ms), RSS 18 MiB; 1000000 flows 2712 ms (read 401 ms, emit 1200 ms), RSS 912 MiB"
        );
        assert_eq!(flow_records_line(&json!({ "skipped": "needs root" })), None);
    }

    #[test]
    fn readme_section_is_replaced_between_the_markers_only() {
        let text = "# T\n\nintro\n<!-- bench:start -->\nold\ntable\n<!-- bench:end -->\nrest\n";
        let out = replace_marked(text, "| new |\n").unwrap();
        assert_eq!(
            out,
            "# T\n\nintro\n<!-- bench:start -->\n| new |\n<!-- bench:end -->\nrest\n"
        );
        assert_eq!(replace_marked(&out, "| new |").unwrap(), out, "idempotent");
        assert!(replace_marked("no markers", "x").is_err());
        assert!(replace_marked("<!-- bench:end --> <!-- bench:start -->", "x").is_err());
        let fresh = format!("{README_START}\n{README_END}\n");
        assert_eq!(
            replace_marked(&fresh, "x").unwrap(),
            "<!-- bench:start -->\nx\n<!-- bench:end -->\n"
        );
        let md = Report::new(&sample()).unwrap().markdown(&[]);
        assert!(md.contains("| visibility/netd |"), "{md}");
        assert!(
            md.contains("| UDP pps visibility/off ≥ 0.86 | 0.87 | PASS |"),
            "{md}"
        );
        assert!(
            md.contains(
                "| RR p99 cost at most a third of netd's +11.2% (≤ 3.7%) | +16.9% | SHORT |"
            ),
            "{md}"
        );
        assert!(md.contains("_Measured 2025-01-02"), "{md}");
    }
}
