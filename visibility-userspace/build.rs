//! Builds the eBPF object with aya-build and leaves it in OUT_DIR for
//! `include_bytes_aligned!`. With AYA_BUILD_SKIP=1 (cargo check, clippy without
//! nightly) an empty placeholder stands in, and loading reports that clearly.
use std::{env, fs, path::PathBuf};

use anyhow::{Context as _, anyhow};

const EBPF_PACKAGE: &str = "visibility-ebpf";
const EBPF_BINARY: &str = "visibility-datapath";

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
    let object = PathBuf::from(env::var("OUT_DIR")?).join(EBPF_BINARY);
    if !object.exists() {
        fs::write(&object, []).context("writing the placeholder eBPF object")?;
    }
    Ok(())
}
