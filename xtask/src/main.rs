//! Development tasks. `cargo xtask --help` lists them.
//!
//! xtask runs things; it never builds the eBPF object itself (visibility-userspace's
//! build.rs does, through aya-build).

mod demo;
mod run;
mod setup;
mod test;

use clap::{Parser, Subcommand};

#[derive(Parser)]
#[command(about = "Development tasks for intranode visibility", long_about = None)]
struct Cli {
    #[command(subcommand)]
    task: Task,
}

#[derive(Subcommand)]
enum Task {
    /// Make this machine ready: nightly rust-src, bpf-linker, and the Debian tools the
    /// tests use. Idempotent: a second run only checks.
    Setup(setup::SetupArgs),
    /// The built-in demo (needs root): builds what it needs, creates a node with Pods
    /// and a gateway in network namespaces, and replays GKE's "verify intranode
    /// visibility" walkthrough, step by step. Removes everything at the end.
    Demo,
    /// Run every check and test: setup, rustfmt, clippy (host crates and the eBPF
    /// crate), unit tests, and the kernel tests (needs root).
    Test(test::TestArgs),
}

fn main() -> anyhow::Result<()> {
    match Cli::parse().task {
        Task::Setup(args) => setup::setup(&args),
        Task::Test(args) => test::test(&args),
        Task::Demo => demo::demo(),
    }
}
