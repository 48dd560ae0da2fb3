//! What a guest's console says: the tests' results read back line by line, why a kernel
//! failed, and the summary table.

use std::{collections::BTreeSet, path::PathBuf, process::Command};

use super::spec::{MARK, SKIP_MARK};
use crate::run::output;

/// What a boot showed.
#[derive(Default, Debug)]
pub(super) struct Outcome {
    pub(super) guest_up: bool,
    /// The exit code /init reported.
    pub(super) exit_code: Option<i32>,
    pub(super) timed_out: bool,
    /// Per test binary: (name, exit code, passed, failed, ignored, libtest result seen).
    pub(super) binaries: Vec<BinaryResult>,
    pub(super) skipped: u64,
    /// What the tests said they skipped on this kernel, and why.
    pub(super) skip_notes: BTreeSet<String>,
    pub(super) attach_modes: BTreeSet<String>,
    /// Lines that say what went wrong (failed tests, insmod failures, panics).
    pub(super) problems: Vec<String>,
    pub(super) qemu_status: Option<String>,
}

#[derive(Default, Debug)]
pub(super) struct BinaryResult {
    pub(super) name: String,
    pub(super) exit: Option<i32>,
    pub(super) passed: u64,
    pub(super) failed: u64,
    pub(super) ignored: u64,
    pub(super) result_seen: bool,
}

impl Outcome {
    pub(super) fn passed(&self) -> u64 {
        self.binaries.iter().map(|b| b.passed).sum::<u64>()
    }
    pub(super) fn failed(&self) -> u64 {
        self.binaries.iter().map(|b| b.failed).sum()
    }
    pub(super) fn ignored(&self) -> u64 {
        self.binaries.iter().map(|b| b.ignored).sum()
    }

    /// Reads one console line.
    pub(super) fn observe(&mut self, line: &str) {
        let line = line.trim();
        // The firmware leaves its last line open, so the first marker may follow it.
        if let Some(rest) = line.find(MARK).map(|at| &line[at + MARK.len()..]) {
            let rest = rest.trim();
            if rest.starts_with("guest up") {
                self.guest_up = true;
            } else if let Some(name) = rest.strip_prefix("begin ") {
                self.binaries.push(BinaryResult {
                    name: name.trim().to_owned(),
                    ..BinaryResult::default()
                });
            } else if let Some(rest) = rest.strip_prefix("end ") {
                let code = rest
                    .rsplit_once("exit=")
                    .and_then(|(_, c)| c.trim().parse().ok());
                if let Some(binary) = self.binaries.last_mut() {
                    binary.exit = code;
                }
            } else if let Some(code) = rest.strip_prefix("exit code=") {
                self.exit_code = code.trim().parse().ok();
            } else if rest.starts_with("insmod") {
                self.problems.push(rest.to_owned());
            }
            return;
        }
        if let Some(result) = line.strip_prefix("test result:") {
            if let Some(binary) = self.binaries.last_mut() {
                binary.result_seen = true;
                let count = |what: &str| -> u64 {
                    result
                        .split(';')
                        .find_map(|part| {
                            let part = part.trim().trim_start_matches("ok.").trim();
                            let part = part.trim_start_matches("FAILED.").trim();
                            part.strip_suffix(what).and_then(|n| n.trim().parse().ok())
                        })
                        .unwrap_or(0)
                };
                binary.passed += count("passed");
                binary.failed += count("failed");
                binary.ignored += count("ignored");
            }
            return;
        }
        if line.starts_with(SKIP_MARK) {
            self.skipped += 1;
        }
        if line.starts_with(SKIP_MARK) || line.starts_with("skipping ") {
            self.skip_notes.insert(line.to_owned());
        }
        if (line.starts_with("test ") && line.ends_with("FAILED"))
            || line.contains("panicked at")
            || line.contains("Kernel panic")
        {
            self.problems.push(line.to_owned());
        }
        // The daemon's log: `datapath ready ... attach_mode="tcx"` and
        // `attached interface=... mode=clsact`.
        for key in ["attach_mode=", " mode="] {
            if let Some((_, rest)) = line.split_once(key) {
                let mode: String = rest
                    .trim_start_matches('"')
                    .chars()
                    .take_while(|c| c.is_ascii_alphanumeric())
                    .collect();
                if mode == "tcx" || mode == "clsact" {
                    self.attach_modes.insert(mode);
                }
            }
        }
    }
}

/// Removes ANSI escape sequences and carriage returns.
pub(super) fn plain(line: &str) -> String {
    let mut out = String::with_capacity(line.len());
    let mut chars = line.chars().peekable();
    while let Some(c) = chars.next() {
        if c == '\u{1b}' {
            // CSI sequences (`ESC [ ... letter`) and two-character ones (`ESC c`).
            if chars.next() == Some('[') {
                for c in chars.by_ref() {
                    if c.is_ascii_alphabetic() {
                        break;
                    }
                }
            }
            continue;
        }
        if c != '\r' {
            out.push(c);
        }
    }
    out
}

pub(super) struct KernelResult {
    pub(super) spec_name: &'static str,
    pub(super) release: String,
    pub(super) expected_mode: &'static str,
    /// Whether the default test set ran (it attaches programs), not tests chosen with
    /// `--test`, which may attach nothing.
    pub(super) default_tests: bool,
    pub(super) outcome: Outcome,
    pub(super) seconds: f64,
    pub(super) log: PathBuf,
}

impl KernelResult {
    /// Why this kernel failed; empty if it passed.
    pub(super) fn failures(&self) -> Vec<String> {
        let o = &self.outcome;
        let mut why = Vec::new();
        if o.timed_out {
            why.push("timed out (QEMU killed)".to_owned());
        }
        if !o.guest_up {
            why.push("the guest never ran /init".to_owned());
        } else if o.exit_code.is_none() && !o.timed_out {
            why.push(format!(
                "no exit marker (QEMU {})",
                o.qemu_status.as_deref().unwrap_or("?")
            ));
        }
        if let Some(code) = o.exit_code
            && code != 0
        {
            why.push(format!("tests exited {code}"));
        }
        for binary in &o.binaries {
            if !binary.result_seen {
                why.push(format!(
                    "{} ended without a test result (exit {:?})",
                    binary.name, binary.exit
                ));
            } else if binary.passed + binary.failed == 0 {
                why.push(format!("{} ran no test", binary.name));
            }
        }
        if o.failed() > 0 {
            why.push(format!("{} tests failed", o.failed()));
        }
        let modes: Vec<&str> = o.attach_modes.iter().map(String::as_str).collect();
        // A chosen test may attach nothing; the default set always attaches.
        if (self.default_tests || !modes.is_empty()) && modes != [self.expected_mode] {
            why.push(format!(
                "attach mode seen: {:?}, expected {}",
                modes, self.expected_mode
            ));
        }
        why
    }
}

/// Prints the table and returns the kernels that failed.
pub(super) fn print_summary(
    results: &[KernelResult],
    build_secs: f64,
    total_secs: f64,
) -> Vec<String> {
    let host = output(Command::new("uname").arg("-r")).unwrap_or_default();
    println!();
    println!("vm-test summary");
    println!(
        "  host kernel {}: tested by the normal `cargo test` (cargo xtask test runs it first), not here",
        host.trim()
    );
    println!("  static build: {build_secs:.0}s");
    println!(
        "  {:<6} {:<28} {:<8} {:>6} {:>6} {:>7} {:>8}  result",
        "kernel", "release", "attach", "passed", "failed", "skipped", "seconds"
    );
    let mut failed = Vec::new();
    for r in results {
        let o = &r.outcome;
        let failures = r.failures();
        let modes = if o.attach_modes.is_empty() {
            "none".to_owned()
        } else {
            o.attach_modes.iter().cloned().collect::<Vec<_>>().join("+")
        };
        println!(
            "  {:<6} {:<28} {:<8} {:>6} {:>6} {:>7} {:>8.1}  {}",
            r.spec_name,
            r.release,
            modes,
            o.passed().saturating_sub(o.skipped),
            o.failed(),
            o.ignored() + o.skipped,
            r.seconds,
            if failures.is_empty() { "ok" } else { "FAILED" }
        );
        let per_binary: Vec<String> = o
            .binaries
            .iter()
            .map(|b| format!("{} {}/{}", b.name, b.passed, b.passed + b.failed))
            .collect();
        println!("         tests passed: {}", per_binary.join(", "));
        for note in &o.skip_notes {
            println!("         {note}");
        }
        if !failures.is_empty() {
            failed.push(r.spec_name.to_owned());
            for why in failures {
                println!("         - {why}");
            }
            for problem in o.problems.iter().take(20) {
                println!("         > {problem}");
            }
            println!("         console log: {}", r.log.display());
        }
    }
    println!("  total: {total_secs:.0}s");
    failed
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn console_lines_are_counted() {
        let mut o = Outcome::default();
        for line in [
            "Booting from ROM..\u{1b}c\u{1b}[?7lvm-test: guest up: Linux 6.1.0, 2 CPUs",
            "vm-test: begin daemon",
            "2026-11-25T15:39:38Z  INFO visibility::daemon: datapath ready pin_dir=/x origin=Loaded attach_mode=\"clsact\"",
            "INFO attached interface=veth0 ifindex=3 program=pod_ingress mode=clsact",
            "SKIP: some_test: needs Linux 6.6",
            "test result: FAILED. 2 passed; 1 failed; 3 ignored; 0 measured; 0 filtered out; finished in 1.00s",
            "vm-test: end daemon exit=101",
            "vm-test: exit code=1",
        ] {
            o.observe(&plain(line));
        }
        assert!(o.guest_up);
        assert_eq!(
            (o.passed(), o.failed(), o.ignored(), o.skipped),
            (2, 1, 3, 1)
        );
        assert_eq!(o.exit_code, Some(1));
        assert_eq!(o.binaries[0].exit, Some(101));
        assert_eq!(o.attach_modes.iter().collect::<Vec<_>>(), ["clsact"]);
    }

    #[test]
    fn ansi_is_stripped() {
        assert_eq!(plain("\u{1b}[2mmode\u{1b}[0m=tcx\r"), "mode=tcx");
        assert_eq!(plain("\u{1b}cvm-test: guest up"), "vm-test: guest up");
    }
}
