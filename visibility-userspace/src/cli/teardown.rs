//! `visibility teardown`: removes every program, link and pinned map.

use std::path::Path;

use visibility_common::{config::Settings, packet::Family};

use crate::{
    cli::CliError,
    datapath::{PinDir, remove_pins},
    flows::view::interface_names,
    state::DaemonStatus,
};

pub fn teardown(pin_dir: &Path) -> Result<(), CliError> {
    let pins = PinDir::new(pin_dir);
    if let Some(daemon) = DaemonStatus::read_live(pin_dir) {
        eprintln!(
            "warning: the daemon (pid {}) is still running and will load the datapath again; stop it first (delete the DaemonSet)",
            daemon.pid
        );
    }
    if !pin_dir.exists() {
        println!("nothing to remove under {}", pin_dir.display());
        return Ok(());
    }
    let names = interface_names();
    let links = crate::datapath::attachments(&pins).len();
    // The gateways' neighbour entries were made managed by the daemon: undo that.
    let gateways = crate::maps::Maps::open(&pins)
        .ok()
        .and_then(|maps| maps.settings().ok());
    remove_pins(&pins, |ifindex| names.get(&ifindex).cloned())?;
    DaemonStatus::remove(pin_dir);
    if let Some(settings) = gateways {
        forget_managed_gateways(&settings)?;
    }
    println!(
        "removed {links} attachments, the programs and the maps under {}; the node routes Pod-to-Pod traffic locally again",
        pin_dir.display()
    );
    Ok(())
}

fn forget_managed_gateways(settings: &Settings) -> Result<(), CliError> {
    let runtime = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()?;
    runtime.block_on(async {
        let handle = crate::node::connect()?;
        for family in [Family::V4, Family::V6] {
            let gateway = settings.gateway(family);
            if gateway.is_configured() {
                let addr = crate::net::addr_from_bytes(family, &gateway.addr);
                crate::node::forget_managed(&handle, gateway.ifindex, addr).await?;
            }
        }
        Ok(())
    })
}
