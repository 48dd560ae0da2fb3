//! `cargo xtask demo`: the README's main job.

use std::process::Command;

use crate::{
    run::{require_root, run, test_binary},
    setup,
};

pub fn demo() -> anyhow::Result<()> {
    require_root("the demo")?;
    setup::setup(&setup::SetupArgs::default())?;
    println!(
        "building the datapath, the daemon and the demo (the first build takes a few minutes)"
    );
    run(Command::new("cargo").args(["build", "--quiet", "-p", "visibility-userspace", "--bins"]))?;
    run(&mut test_binary("demo")?)
}
