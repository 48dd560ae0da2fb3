//! Builds the upgrade test's other datapath object: visibility-ebpf with its feature
//! `upgrade-test` (one program's code differs, its behaviour and the maps' layout do
//! not), left in OUT_DIR as `visibility-datapath` for `tests/tests/restarts.rs`.
//! aya-build builds it in a target directory of its own under OUT_DIR, apart from the
//! daemon's built-in object. With AYA_BUILD_SKIP=1 an empty placeholder stands in, and
//! the test says so.
use std::{env, fs, path::PathBuf};

use anyhow::{Context as _, anyhow};

const EBPF_PACKAGE: &str = "visibility-ebpf";
const UPGRADE_FEATURE: &str = "upgrade-test";
const DATAPATH_BINARY: &str = "visibility-datapath";

fn main() -> anyhow::Result<()> {
    let ebpf_dir = PathBuf::from(env::var("CARGO_MANIFEST_DIR")?)
        .parent()
        .ok_or_else(|| anyhow!("no workspace root"))?
        .join(EBPF_PACKAGE);
    aya_build::build_ebpf(
        [aya_build::Package {
            name: EBPF_PACKAGE,
            root_dir: ebpf_dir.to_str().ok_or_else(|| anyhow!("non-UTF-8 path"))?,
            features: &[UPGRADE_FEATURE],
            ..Default::default()
        }],
        aya_build::Toolchain::default(),
    )?;
    let object = PathBuf::from(env::var("OUT_DIR")?).join(DATAPATH_BINARY);
    if !object.exists() {
        fs::write(&object, []).context("writing a placeholder eBPF object")?;
    }
    Ok(())
}
