//! Interfaces' MAC addresses and neighbour entries in a lab namespace.

use std::net::IpAddr;

use anyhow::{Context as _, Result, ensure};

use crate::lab::Netns;

/// An Ethernet address.
pub type Mac = [u8; 6];

/// The MAC address of `ifname` in `netns`.
pub fn mac_of(netns: &Netns, ifname: &str) -> Result<Mac> {
    let out = netns.run("ip", ["-br", "link", "show", "dev", ifname])?;
    // "eth0@if3  UP  02:11:22:33:44:55 <BROADCAST,...>"
    let text = out
        .split_whitespace()
        .nth(2)
        .with_context(|| format!("no MAC address in {out:?}"))?;
    parse_mac(text)
}

/// Parses `aa:bb:cc:dd:ee:ff`.
pub fn parse_mac(text: &str) -> Result<Mac> {
    let mut mac = [0u8; 6];
    let mut parts = text.split(':');
    for byte in &mut mac {
        let part = parts.next().with_context(|| format!("{text:?} is short"))?;
        *byte = u8::from_str_radix(part, 16).with_context(|| format!("{text:?}"))?;
    }
    ensure!(parts.next().is_none(), "{text:?} is long");
    Ok(mac)
}

fn format_mac(mac: &Mac) -> String {
    mac.iter()
        .map(|b| format!("{b:02x}"))
        .collect::<Vec<_>>()
        .join(":")
}

/// Makes `addr` a permanent neighbour with `mac` on `dev` in `netns`.
pub fn set_neighbour(netns: &Netns, addr: IpAddr, mac: &Mac, dev: &str) -> Result<()> {
    netns.run(
        "ip",
        [
            "neigh",
            "replace",
            &addr.to_string(),
            "lladdr",
            &format_mac(mac),
            "dev",
            dev,
            "nud",
            "permanent",
        ],
    )?;
    Ok(())
}

/// Removes any neighbour entry for `addr` on `dev` in `netns`.
pub fn forget_neighbour(netns: &Netns, addr: IpAddr, dev: &str) -> Result<()> {
    let addr = addr.to_string();
    let shown = || netns.run("ip", ["neigh", "show", "to", addr.as_str(), "dev", dev]);
    if !shown()?.trim().is_empty() {
        netns.run("ip", ["neigh", "del", addr.as_str(), "dev", dev])?;
    }
    let left = shown()?;
    ensure!(
        left.trim().is_empty(),
        "neighbour {addr} on {dev} stayed: {left}"
    );
    Ok(())
}
