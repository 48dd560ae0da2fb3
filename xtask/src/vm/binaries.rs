//! The statically linked test binaries and `visibility` binary that go into the guests.

use std::{
    collections::BTreeMap,
    path::{Path, PathBuf},
    process::{Command, Stdio},
};

use anyhow::{Context as _, ensure};

use super::{host::is_static, spec::TestSelection};
use crate::run::{display, output};

pub(super) const HOST_TRIPLE: &str = "x86_64-unknown-linux-gnu";

pub(super) struct Binaries {
    /// Test binary name -> stripped static executable.
    pub(super) tests: BTreeMap<String, PathBuf>,
    pub(super) visibility: PathBuf,
}

/// Builds the selected test binaries and the `visibility` binary statically linked
/// (glibc, crt-static) for the host triple, and copies them without debug info.
pub(super) fn build_static_binaries(
    workspace: &Path,
    tests: &[TestSelection],
    bin_dir: &Path,
) -> anyhow::Result<Binaries> {
    let static_build = |args: &[&str]| -> anyhow::Result<Vec<serde_json::Value>> {
        let mut cmd = Command::new(std::env::var("CARGO").unwrap_or_else(|_| "cargo".into()));
        cmd.current_dir(workspace)
            .args(args)
            .args(["--target", HOST_TRIPLE, "--message-format=json"])
            .env(
                "CARGO_TARGET_X86_64_UNKNOWN_LINUX_GNU_RUSTFLAGS",
                "-C target-feature=+crt-static",
            )
            .stderr(Stdio::inherit());
        println!("$ {}", display(&cmd));
        let out = cmd
            .output()
            .with_context(|| format!("starting {}", display(&cmd)))?;
        ensure!(
            out.status.success(),
            "{} failed: {}",
            display(&cmd),
            out.status
        );
        Ok(String::from_utf8_lossy(&out.stdout)
            .lines()
            .filter_map(|line| serde_json::from_str(line).ok())
            .collect())
    };
    let executable = |message: &serde_json::Value, kind: &str, name: &str| -> Option<PathBuf> {
        (message["reason"] == "compiler-artifact"
            && message["target"]["name"] == name
            && message["target"]["kind"]
                .as_array()
                .is_some_and(|kinds| kinds.iter().any(|k| k == kind)))
        .then(|| message["executable"].as_str().map(PathBuf::from))
        .flatten()
    };

    let mut args = vec!["test", "-p", "visibility-tests", "--no-run"];
    for test in tests {
        args.extend(["--test", test.binary.as_str()]);
    }
    let messages = static_build(&args)?;
    let mut found = BTreeMap::new();
    for test in tests {
        let exe = messages
            .iter()
            .find_map(|m| executable(m, "test", &test.binary))
            .with_context(|| format!("cargo built no test executable {}", test.binary))?;
        found.insert(
            test.binary.clone(),
            strip_copy(&exe, &bin_dir.join(&test.binary))?,
        );
    }
    let messages = static_build(&["build", "-p", "visibility-userspace", "--bin", "visibility"])?;
    let exe = messages
        .iter()
        .find_map(|m| executable(m, "bin", "visibility"))
        .context("cargo built no visibility executable")?;
    let visibility = strip_copy(&exe, &bin_dir.join("visibility"))?;
    for path in found.values().chain([&visibility]) {
        ensure!(
            is_static(path),
            "{} is not statically linked",
            path.display()
        );
    }
    Ok(Binaries {
        tests: found,
        visibility,
    })
}

/// Copies `from` to `to` without debug info (symbols stay, for backtraces).
pub(super) fn strip_copy(from: &Path, to: &Path) -> anyhow::Result<PathBuf> {
    output(
        Command::new("strip")
            .arg("--strip-debug")
            .arg("-o")
            .arg(to)
            .arg(from),
    )?;
    Ok(to.to_owned())
}
