//! The comparison's report: medians, ratios between modes and each figure's verdict
//! against its targets, as terminal tables, Markdown and JSON.

use std::fmt::Write as _;

use anyhow::Context as _;
use serde_json::{Value, json};

use super::figures::{
    FIGURE_COUNT, FIGURES, GatewayVariant, MODES, cost_of, format_value, round_ratios,
};

/// A target's verdict.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub(super) enum Verdict {
    Pass,
    Short,
    /// Cannot be judged: netd's cost on this figure is nothing, or within the noise.
    NotApplicable,
}

impl Verdict {
    pub(super) fn word(self) -> &'static str {
        match self {
            Verdict::Pass => "PASS",
            Verdict::Short => "SHORT",
            Verdict::NotApplicable => "n/a",
        }
    }
}

pub(super) struct Report {
    pub(super) date: String,
    pub(super) kernel: String,
    pub(super) cpus: String,
    pub(super) rounds: usize,
    pub(super) quick: bool,
    pub(super) client_cpu: f64,
    pub(super) server_cpu: f64,
    /// What other processes used while the comparison ran, if it was a noticeable share.
    pub(super) background: Option<String>,
    /// medians[mode][figure]
    pub(super) medians: Vec<[f64; FIGURE_COUNT]>,
    /// visibility/off in each round (the modes alternate, so a round's ratio compares
    /// measurements minutes apart at most): the spread says how noisy the machine was.
    pub(super) round_ratios: Vec<[f64; FIGURE_COUNT]>,
    /// netd/off in each round.
    pub(super) netd_round_ratios: Vec<[f64; FIGURE_COUNT]>,
}

impl Report {
    pub(super) fn new(results: &Value) -> anyhow::Result<Self> {
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
    pub(super) fn round_range(&self, figure: usize, sep: &str) -> String {
        let values = self.round_ratios.iter().map(|r| r[figure]);
        let low = values.clone().fold(f64::INFINITY, f64::min);
        let high = values.fold(f64::NEG_INFINITY, f64::max);
        if self.round_ratios.len() < 2 || !low.is_finite() || !high.is_finite() {
            return String::new();
        }
        format!(" (rounds {low:.2}{sep}{high:.2})")
    }

    pub(super) fn median(&self, mode: usize, figure: usize) -> f64 {
        self.medians[mode][figure]
    }

    /// `a / b` for each figure, modes by index.
    pub(super) fn ratio(&self, a: usize, b: usize, figure: usize) -> f64 {
        self.median(a, figure) / self.median(b, figure)
    }

    /// What a mode costs relative to off on a figure: the fraction of throughput lost,
    /// or of latency added.
    pub(super) fn cost(&self, mode: usize, figure: usize) -> f64 {
        cost_of(self.ratio(mode, 0, figure), figure)
    }

    /// Whether netd cost something on `figure` in every round (with fewer than two
    /// rounds: in the medians). Only then is a third of its cost a budget: a cost that
    /// some rounds do not show is within the machine's noise.
    pub(super) fn netd_costs_measurably(&self, figure: usize) -> bool {
        if self.netd_round_ratios.len() < 2 {
            return self.cost(1, figure) > 0.0;
        }
        self.netd_round_ratios
            .iter()
            .all(|ratios| cost_of(ratios[figure], figure) > 0.0)
    }

    /// A third of netd's cost, as `{at_most} N%`, or why there is no such budget.
    pub(super) fn budget(&self, figure: usize, at_most: &str) -> String {
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
    pub(super) fn third_of_netd(&self, figure: usize) -> Verdict {
        let (vis, netd) = (self.cost(2, figure), self.cost(1, figure));
        if !self.netd_costs_measurably(figure) {
            Verdict::NotApplicable
        } else if vis <= netd / 3.0 {
            Verdict::Pass
        } else {
            Verdict::Short
        }
    }

    pub(super) fn absolute(&self, figure: usize) -> Option<Verdict> {
        let target = FIGURES[figure].target?;
        let r = self.ratio(2, 0, figure);
        let ok = if FIGURES[figure].higher_is_better {
            r >= target
        } else {
            r <= target
        };
        Some(if ok { Verdict::Pass } else { Verdict::Short })
    }

    pub(super) fn ratio_rows(&self) -> [(&'static str, usize, usize); 3] {
        [
            ("visibility/off", 2, 0),
            ("visibility/netd", 2, 1),
            ("netd/off", 1, 0),
        ]
    }

    pub(super) fn header(&self) -> String {
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
    pub(super) fn mode_rows(&self, ratio_decimals: usize) -> Vec<(String, Vec<String>)> {
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
    pub(super) fn terminal_modes(&self) -> String {
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

    pub(super) fn terminal_variant(&self, variant: &GatewayVariant) -> String {
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
    pub(super) fn markdown_modes(&self) -> String {
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
    pub(super) fn markdown_variant(&self, variant: &GatewayVariant) -> String {
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

    pub(super) fn terminal_table(&self) -> String {
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
    pub(super) fn terminal_targets(&self) -> String {
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

    pub(super) fn ratios_json(&self) -> Value {
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

    pub(super) fn targets_json(&self) -> Value {
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
    pub(super) fn markdown(&self, micro_lines: &[String]) -> String {
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
    pub(super) fn markdown_targets(&self) -> String {
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
}

/// "other processes used 23% of the CPUs (qemu-system-x86 61 s, ...)" when they used more
/// than 5%.
pub(super) fn background_note(background: &Value) -> Option<String> {
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
