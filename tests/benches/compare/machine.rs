//! The machine the comparison runs on: its CPU model, and the other load on it.

use std::time::Duration;

use anyhow::Result;
use serde_json::{Value, json};

pub(crate) fn read_trimmed(path: &str) -> String {
    std::fs::read_to_string(path)
        .map(|s| s.trim().to_owned())
        .unwrap_or_default()
}

pub(crate) fn cpu_model() -> String {
    read_trimmed("/proc/cpuinfo")
        .lines()
        .find_map(|l| l.strip_prefix("model name"))
        .and_then(|l| l.split_once(':'))
        .map(|(_, v)| v.trim().to_owned())
        .unwrap_or_default()
}

/// Per process: (name, parent, user + system CPU ticks).
pub(crate) type ProcessTimes = std::collections::HashMap<u32, (String, u32, u64)>;

pub(crate) fn process_times() -> ProcessTimes {
    let mut times = ProcessTimes::new();
    let Ok(entries) = std::fs::read_dir("/proc") else {
        return times;
    };
    for entry in entries.filter_map(Result::ok) {
        let Ok(pid) = entry.file_name().to_string_lossy().parse::<u32>() else {
            continue;
        };
        let Ok(stat) = std::fs::read_to_string(entry.path().join("stat")) else {
            continue;
        };
        // pid (comm) state ppid ... utime(14) stime(15): comm may hold spaces.
        let (Some(open), Some(close)) = (stat.find('('), stat.rfind(')')) else {
            continue;
        };
        let comm = stat[open + 1..close].to_owned();
        let fields: Vec<&str> = stat[close + 1..].split_whitespace().collect();
        let field = |n: usize| fields.get(n - 3).and_then(|f| f.parse::<u64>().ok());
        if let (Some(ppid), Some(utime), Some(stime)) = (field(4), field(14), field(15)) {
            times.insert(pid, (comm, ppid as u32, utime + stime));
        }
    }
    times
}

/// CPU time that processes outside this bench used while it ran (a busy machine makes
/// the figures noisy): the total, its share of all CPUs, and the top consumers.
pub(crate) fn background(before: &ProcessTimes, elapsed: Duration) -> Value {
    let after = process_times();
    let ticks_per_second = nix::unistd::sysconf(nix::unistd::SysconfVar::CLK_TCK)
        .ok()
        .flatten()
        .unwrap_or(100) as f64;
    let me = std::process::id();
    let ours = |mut pid: u32| {
        for _ in 0..64 {
            if pid == me {
                return true;
            }
            match after.get(&pid) {
                Some((_, ppid, _)) if *ppid != 0 => pid = *ppid,
                _ => return false,
            }
        }
        false
    };
    let mut by_name: std::collections::BTreeMap<String, f64> = Default::default();
    for (pid, (comm, _, ticks)) in &after {
        // ksoftirqd mostly runs this bench's own packets when the CPU is busy.
        if ours(*pid) || comm.starts_with("ksoftirqd") {
            continue;
        }
        // By pid only: kernel workers rename themselves as they take up other work.
        let start = before.get(pid).map_or(0, |b| b.2);
        let used = ticks.saturating_sub(start) as f64 / ticks_per_second;
        if used > 0.0 {
            *by_name.entry(comm.clone()).or_default() += used;
        }
    }
    let total: f64 = by_name.values().sum();
    let cpus = std::thread::available_parallelism().map_or(1, |n| n.get()) as f64;
    let mut top: Vec<(String, f64)> = by_name.into_iter().collect();
    top.sort_by(|a, b| b.1.total_cmp(&a.1));
    top.truncate(5);
    json!({
        "cpu_seconds": total,
        "share_of_all_cpus": total / (elapsed.as_secs_f64() * cpus),
        "top": top.iter().map(|(name, secs)| json!({"process": name, "cpu_seconds": secs})).collect::<Vec<_>>(),
    })
}
