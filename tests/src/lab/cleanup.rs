//! Removing what labs leave: a Pod's parts, and the namespaces of labs whose test
//! process is gone.

use std::process::Stdio;

use anyhow::Result;

use super::netns::{Netns, list_netns};
use crate::unique;

pub(super) fn remove_pod_parts(node: &Netns, pod: &Netns, host_ifname: &str) {
    if let Err(e) = pod.delete() {
        eprintln!("lab: removing {}: {e:#}", pod.name());
    }
    if node.exists() {
        let _ = node
            .cmd("ip", ["link", "del", host_ifname])
            .stdout(Stdio::null())
            .stderr(Stdio::null())
            .status();
    }
}

/// Removes namespaces of labs whose process is gone (`lab-<tag>-<pid>-<n>-...` where no
/// process `<pid>` exists), e.g. after a test binary was killed. Returns the names removed.
///
/// [`Lab::new`] calls this once per process.
pub fn cleanup_stale_labs() -> Result<Vec<String>> {
    let mut removed = Vec::new();
    for name in list_netns()? {
        let Some(rest) = name.strip_prefix("lab-") else {
            continue;
        };
        let parts: Vec<&str> = rest.split('-').collect();
        let [tag, pid, n, role] = parts[..] else {
            continue;
        };
        let well_formed = !tag.is_empty()
            && tag.chars().all(|c| c.is_ascii_alphanumeric())
            && n.parse::<usize>().is_ok()
            && (role == "gw"
                || role == "node"
                || role
                    .strip_prefix('p')
                    .is_some_and(|i| i.parse::<usize>().is_ok()));
        let Ok(pid) = pid.parse::<u32>() else {
            continue;
        };
        if !well_formed || !unique::is_left_over(pid) {
            continue;
        }
        let ns = Netns::from_name(name);
        ns.delete()?;
        removed.push(ns.name().to_owned());
    }
    Ok(removed)
}
