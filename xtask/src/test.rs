//! `cargo xtask test`: every check and test, in the order a failure is cheapest.

use std::{process::Command, time::Instant};

use crate::{bench, fuzz, run::run, setup, vm};

#[derive(clap::Args)]
pub struct TestArgs {
    /// Skip `cargo xtask setup` (for a machine known to be ready).
    #[arg(long)]
    no_setup: bool,
    /// Skip the VM tier (`cargo xtask vm-test`: the kernel tests on Debian's 6.1 and
    /// 6.12 kernels in QEMU).
    #[arg(long)]
    no_vm: bool,
    /// Skip the benchmarks' smoke run (`cargo xtask bench --quick`).
    #[arg(long)]
    no_bench: bool,
}

pub fn test(args: &TestArgs) -> anyhow::Result<()> {
    let started = Instant::now();
    if !args.no_setup {
        setup::setup(&setup::SetupArgs::default())?;
    }
    run(Command::new("cargo").args(["fmt", "--all", "--check"]))?;
    // Every dependency of every crate is used (a false positive is listed, with its
    // reason, under `[package.metadata.cargo-machete]` in the crate's Cargo.toml).
    // `cargo run` sets CARGO_PKG_NAME for xtask, and cargo-machete, seeing it, takes
    // "machete" for a path to analyse: run it without.
    run(Command::new("cargo")
        .arg("machete")
        .env_remove("CARGO_PKG_NAME"))?;
    // Host crates (the default members: all but the eBPF crate). AYA_BUILD_SKIP keeps
    // clippy from building the eBPF object.
    run(Command::new("cargo")
        .args(["clippy", "--all-targets", "--", "-D", "warnings"])
        .env("AYA_BUILD_SKIP", "1"))?;
    // The eBPF crate, for its own target.
    run(Command::new("cargo").args([
        "+nightly",
        "clippy",
        "-p",
        "visibility-ebpf",
        "--target",
        "bpfel-unknown-none",
        "-Z",
        "build-std=core",
        "--release",
        "--",
        "-D",
        "warnings",
    ]))?;
    // The daemon and CLI tests run the real binary.
    run(Command::new("cargo").args(["build", "-p", "visibility-userspace", "--bins"]))?;
    // Unit tests and kernel tests. Kernel tests create their own namespaces and pins.
    run(Command::new("cargo").args(["test", "--no-fail-fast"]))?;
    // The differential fuzz harness, for a bounded time: the corpus, every truncation of
    // its seed frames, then random cases (host verdict against the kernel's programs).
    fuzz::harness(fuzz::TEST_SECONDS, None)?;
    // Every benchmark once, briefly: they must run and their output must render. The
    // figures of a smoke run mean nothing; they go to target/bench-smoke.
    if !args.no_bench {
        bench::bench(&bench::BenchArgs::smoke())?;
    }
    // The host kernel is tested above; the VM tier runs the kernel tests on older and
    // other kernels: 6.1 (clsact attach path) and 6.12 (TCX).
    if !args.no_vm {
        vm::vm_test(&vm::VmTestArgs::default())?;
    }
    println!(
        "xtask test: all checks passed in {:.0}s",
        started.elapsed().as_secs_f64()
    );
    Ok(())
}
