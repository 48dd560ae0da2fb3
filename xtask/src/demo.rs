//! `cargo xtask demo`: the README's main job.

use std::process::Command;

use anyhow::bail;

use crate::{run::run, setup};

pub fn demo() -> anyhow::Result<()> {
    if !setup::is_root() {
        bail!("the demo creates network namespaces and loads eBPF programs: run it as root");
    }
    setup::setup(&setup::SetupArgs::default())?;
    println!(
        "building the datapath, the daemon and the demo (the first build takes a few minutes)"
    );
    run(Command::new("cargo").args(["build", "--quiet", "-p", "visibility-userspace", "--bins"]))?;
    run(Command::new("cargo").args([
        "build",
        "--quiet",
        "-p",
        "visibility-tests",
        "--bin",
        "demo",
    ]))?;
    run(&mut Command::new(
        crate::paths::target_dir().join("debug/demo"),
    ))
}
