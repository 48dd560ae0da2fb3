//! Pinning the calling thread to one CPU.

use anyhow::{Context, Result};

/// Keeps the calling thread on CPU `cpu` (benchmarks pin client and server; tests pin
/// themselves to meet one CPU's per-CPU maps on every run).
pub fn pin_to_cpu(cpu: usize) -> Result<()> {
    let mut set = nix::sched::CpuSet::new();
    set.set(cpu)?;
    nix::sched::sched_setaffinity(nix::unistd::Pid::from_raw(0), &set)
        .with_context(|| format!("pinning to CPU {cpu}"))
}
