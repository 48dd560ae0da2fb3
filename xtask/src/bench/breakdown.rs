//! Where the time goes: the compare bench's profiled UDP run per mode, as a terminal
//! table and as Markdown.

use std::fmt::Write as _;

use serde_json::Value;

use super::figures::MODES;

/// Where the client CPU's time per packet goes, from the compare bench's profiled UDP
/// run per mode.
pub(super) struct Breakdown {
    pub(super) cpu: f64,
    pub(super) modes: Vec<ModeBreakdown>,
}

pub(super) struct ModeBreakdown {
    pub(super) mode: &'static str,
    /// Nanoseconds per packet the CPU was not idle.
    pub(super) busy: f64,
    /// Share of the time the CPU had nothing to run.
    pub(super) idle: f64,
    /// Nanoseconds per packet in each part.
    pub(super) categories: Vec<(String, f64)>,
}

impl Breakdown {
    pub(super) fn new(profile: &Value) -> Option<Self> {
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

    pub(super) fn category_names(&self) -> Vec<&str> {
        self.modes
            .first()
            .map(|m| m.categories.iter().map(|(n, _)| n.as_str()).collect())
            .unwrap_or_default()
    }

    pub(super) fn terminal(&self) -> String {
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

    pub(super) fn markdown(&self) -> String {
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
