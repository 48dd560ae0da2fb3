//! Builds the eBPF objects with aya-build and leaves them in OUT_DIR for
//! `include_bytes_aligned!`: the datapath (`visibility-datapath`) and the benchmarks'
//! programs (`visibility-bench`, which only the benches load). With AYA_BUILD_SKIP=1
//! (cargo check, clippy without nightly) empty placeholders stand in, and loading
//! reports that clearly.
use std::{env, fs, path::PathBuf};

use anyhow::{Context as _, anyhow};

const EBPF_PACKAGE: &str = "visibility-ebpf";
/// The binaries of the eBPF package: the datapath, and the benchmarks' programs.
const EBPF_BINARIES: [&str; 2] = ["visibility-datapath", "visibility-bench"];

fn main() -> anyhow::Result<()> {
    let manifest_dir = PathBuf::from(env::var("CARGO_MANIFEST_DIR")?);
    let root_dir = manifest_dir
        .parent()
        .ok_or_else(|| anyhow!("no workspace root"))?
        .join(EBPF_PACKAGE);
    let root_dir = root_dir.to_str().ok_or_else(|| anyhow!("non-UTF-8 path"))?;
    aya_build::build_ebpf(
        [aya_build::Package {
            name: EBPF_PACKAGE,
            root_dir,
            ..Default::default()
        }],
        aya_build::Toolchain::default(),
    )?;
    let out_dir = PathBuf::from(env::var("OUT_DIR")?);
    for binary in EBPF_BINARIES {
        let object = out_dir.join(binary);
        if !object.exists() {
            fs::write(&object, []).context("writing a placeholder eBPF object")?;
        }
    }
    Ok(())
}
