//! Pin directories of this process's own under bpffs, removed when they drop, and the
//! removal of those that killed processes left behind.

use std::{
    fs,
    path::{Path, PathBuf},
    sync::Once,
};

use anyhow::{Context as _, Result};
use visibility::datapath::{PinDir, remove_pins};

use crate::unique;

/// Where bpffs is mounted.
pub const BPFFS_ROOT: &str = "/sys/fs/bpf";
/// Name prefix of every pin directory made here.
const PIN_PREFIX: &str = "vis-test-";

pub(super) static STALE_PINS: Once = Once::new();

/// A pin directory of this process that no other has: `/sys/fs/bpf/vis-test-<tag>-<pid>-<n>`.
/// Only the ASCII letters and digits of `tag` are used, at most 12.
pub fn unique_pin_path(tag: &str) -> PathBuf {
    Path::new(BPFFS_ROOT).join(format!("{PIN_PREFIX}{}", unique::name(tag)))
}

/// Removes the pin directories of processes that are gone (`vis-test-<tag>-<pid>-<n>`
/// where no process `<pid>` exists). Returns the directories removed.
pub fn cleanup_stale_pins() -> Result<Vec<PathBuf>> {
    let mut removed = Vec::new();
    for entry in fs::read_dir(BPFFS_ROOT).with_context(|| format!("listing {BPFFS_ROOT}"))? {
        let path = entry?.path();
        let Some(rest) = path
            .file_name()
            .and_then(|n| n.to_str())
            .and_then(|n| n.strip_prefix(PIN_PREFIX))
        else {
            continue;
        };
        let Some(pid) = rest.rsplit('-').nth(1).and_then(|p| p.parse::<u32>().ok()) else {
            continue;
        };
        if !unique::is_left_over(pid) {
            continue;
        }
        remove_pins(&PinDir::new(&path), |_| None)
            .with_context(|| format!("removing stale pins {}", path.display()))?;
        removed.push(path);
    }
    Ok(removed)
}

/// Owns a pin directory: dropping it (also while unwinding) removes the directory and
/// everything pinned under it.
#[derive(Debug)]
pub struct PinDirGuard {
    pins: PinDir,
}

impl PinDirGuard {
    /// Takes charge of `path`, which need not exist yet.
    pub fn new(path: impl Into<PathBuf>) -> Self {
        Self {
            pins: PinDir::new(path.into()),
        }
    }

    pub fn pins(&self) -> &PinDir {
        &self.pins
    }

    pub fn path(&self) -> &Path {
        self.pins.path()
    }
}

impl Drop for PinDirGuard {
    fn drop(&mut self) {
        if let Err(e) = remove_pins(&self.pins, |_| None) {
            eprintln!("removing {}: {e}", self.pins.path().display());
        }
    }
}
