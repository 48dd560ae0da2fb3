//! The operator CLI: every command reads or changes the pinned maps directly, so it
//! works while the daemon runs (and when it does not).

pub mod control;
pub mod flows;
pub mod output;
pub mod status;
pub mod teardown;

use std::path::{Path, PathBuf};

use crate::{
    config::ConfigError,
    datapath::{PinDir, is_bpffs},
    error::{DatapathError, InputError, MOUNT_BPFFS, MapsError},
    maps::Maps,
    node::NodeError,
};

/// What can go wrong in a CLI command. Each message is one line that says what to do.
#[derive(Debug, thiserror::Error)]
pub enum CliError {
    #[error(transparent)]
    Input(#[from] InputError),
    #[error(transparent)]
    Config(#[from] ConfigError),
    #[error(transparent)]
    Maps(#[from] MapsError),
    #[error(transparent)]
    Datapath(#[from] DatapathError),
    #[error(transparent)]
    Node(#[from] NodeError),
    /// The pin directory is not on bpffs.
    #[error("{0} is not on a bpffs mount; {hint}, the one the daemon uses", hint = MOUNT_BPFFS)]
    NotBpffs(PathBuf),
    /// Writing to the terminal failed.
    #[error("writing output: {0}")]
    Output(#[from] std::io::Error),
}

/// Opens the maps under `pin_dir`, after checking that it is on bpffs.
pub fn open_maps(pin_dir: &Path) -> Result<Maps, CliError> {
    let existing = pin_dir
        .ancestors()
        .find(|p| p.exists())
        .unwrap_or(Path::new("/"));
    if !is_bpffs(existing) {
        return Err(CliError::NotBpffs(pin_dir.to_owned()));
    }
    Ok(Maps::open(&PinDir::new(pin_dir))?)
}
