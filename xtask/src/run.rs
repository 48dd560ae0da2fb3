//! Running commands with their command line shown, and failing loudly.

use std::process::{Command, Stdio};

use anyhow::{Context as _, bail};

/// Prints the command, runs it with inherited output, and fails if it fails.
pub fn run(cmd: &mut Command) -> anyhow::Result<()> {
    println!("$ {}", display(cmd));
    let status = cmd
        .status()
        .with_context(|| format!("starting {}", display(cmd)))?;
    if !status.success() {
        bail!("{} failed: {status}", display(cmd));
    }
    Ok(())
}

/// Runs a command quietly and returns whether it succeeded.
pub fn succeeds(cmd: &mut Command) -> bool {
    cmd.stdout(Stdio::null())
        .stderr(Stdio::null())
        .status()
        .is_ok_and(|s| s.success())
}

/// Runs a command quietly and returns its standard output.
pub fn output(cmd: &mut Command) -> anyhow::Result<String> {
    let out = cmd
        .stderr(Stdio::null())
        .output()
        .with_context(|| format!("starting {}", display(cmd)))?;
    if !out.status.success() {
        bail!("{} failed: {}", display(cmd), out.status);
    }
    Ok(String::from_utf8_lossy(&out.stdout).into_owned())
}

/// Fails unless run as root, saying that `what` needs it.
pub fn require_root(what: &str) -> anyhow::Result<()> {
    if !is_root() {
        bail!("{what} loads eBPF programs and creates network namespaces: run it as root");
    }
    Ok(())
}

/// Builds the `visibility-tests` binary `name` and returns a command that runs it.
pub fn test_binary(name: &str) -> anyhow::Result<Command> {
    run(Command::new("cargo").args(["build", "--quiet", "-p", "visibility-tests", "--bin", name]))?;
    Ok(Command::new(
        crate::paths::target_dir().join("debug").join(name),
    ))
}

pub fn display(cmd: &Command) -> String {
    let mut parts = vec![cmd.get_program().to_string_lossy().into_owned()];
    parts.extend(cmd.get_args().map(|a| a.to_string_lossy().into_owned()));
    parts.join(" ")
}

/// Whether xtask runs as root.
pub fn is_root() -> bool {
    // SAFETY: geteuid has no preconditions and cannot fail.
    unsafe { libc::geteuid() == 0 }
}
