//! Development tasks. `cargo xtask --help` lists them.
//!
//! xtask runs things; it never builds the eBPF object itself (visibility-userspace's
//! build.rs does, through aya-build).

mod bench;
mod demo;
mod fuzz;
mod paths;
mod run;
mod setup;
mod test;
mod vm;

use clap::{Parser, Subcommand};

#[derive(Parser)]
#[command(about = "Development tasks for intranode visibility", long_about = None)]
struct Cli {
    #[command(subcommand)]
    task: Task,
}

#[derive(Subcommand)]
enum Task {
    /// Make this machine ready: nightly rust-src, bpf-linker, cargo-machete, and the
    /// Debian tools the tests use. Idempotent: a second run only checks.
    Setup(setup::SetupArgs),
    /// The built-in demo (needs root): builds what it needs, creates a node with Pods
    /// and a gateway in network namespaces, and replays GKE's "verify intranode
    /// visibility" walkthrough, step by step. Removes everything at the end.
    Demo,
    /// Run every check and test: setup, rustfmt, unused dependencies (cargo machete),
    /// clippy (host crates and the eBPF crate), unit tests, and the kernel tests (needs
    /// root).
    Test(test::TestArgs),
    /// Benchmarks (needs root): off, netd and visibility side by side in one lab, attach
    /// latency and the microbenchmarks; writes target/bench/results.{json,svg}.
    Bench(bench::BenchArgs),
    /// The differential fuzz harness (needs root): the same frames through the host's
    /// parser and verdict and the kernel's programs; `cargo xtask test` runs it 60 s.
    Fuzz(fuzz::FuzzArgs),
    /// Boot Debian's 6.1 and 6.12 cloud kernels in QEMU (TCG) and run the kernel tests
    /// inside each: the clsact and the TCX attach paths. `cargo xtask test` runs it last.
    VmTest(vm::VmTestArgs),
}

fn main() -> anyhow::Result<()> {
    match Cli::parse().task {
        Task::Setup(args) => setup::setup(&args),
        Task::Test(args) => test::test(&args),
        Task::Bench(args) => bench::bench(&args),
        Task::VmTest(args) => vm::vm_test(&args),
        Task::Demo => demo::demo(),
        Task::Fuzz(args) => fuzz::fuzz(&args),
    }
}
