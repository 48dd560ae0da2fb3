//! `cargo xtask demo`: the README's main job.

use std::process::Command;

use anyhow::bail;

use crate::{
    run::{output, run},
    setup,
};

pub fn demo() -> anyhow::Result<()> {
    if output(Command::new("id").arg("-u"))
        .map(|uid| uid.trim() != "0")
        .unwrap_or(true)
    {
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
        crate::run::workspace_root().join("target/debug/demo"),
    ))
}
