//! `visibility teardown`: removes every program, link and pinned map.

use std::path::Path;

use crate::{
    cli::CliError,
    datapath::{PinDir, remove_pins},
    flows::view::interface_names,
    state::DaemonStatus,
};

pub fn teardown(pin_dir: &Path) -> Result<(), CliError> {
    let pins = PinDir::new(pin_dir);
    if let Some(daemon) = DaemonStatus::read_live(pin_dir) {
        eprintln!("warning: the daemon (pid {}) is still running and will load the datapath again; stop it first (delete the DaemonSet)", daemon.pid);
    }
    if !pin_dir.exists() {
        println!("nothing to remove under {}", pin_dir.display());
        return Ok(());
    }
    let names = interface_names();
    let links = crate::datapath::attachments(&pins).len();
    remove_pins(&pins, |ifindex| names.get(&ifindex).cloned())?;
    DaemonStatus::remove(pin_dir);
    println!("removed {links} attachments, the programs and the maps under {}; the node routes Pod-to-Pod traffic locally again", pin_dir.display());
    Ok(())
}
