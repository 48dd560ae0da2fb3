//! Notices, from one reconcile to the next, an uplink that went away, came back or was
//! renamed, and a gateway whose MAC changed (a failover): each is logged once and
//! counted (`visibility_uplink_changes_total`, `visibility_gateway_mac_changes_total`).
//! The reconcile itself re-attaches and re-points the datapath; this only reports.

use std::{net::IpAddr, sync::atomic::Ordering};

use tracing::{info, warn};
use visibility_common::packet::Family;

use crate::{
    discovery::Uplink,
    metrics::Shared,
    net::{family_name, format_mac},
    node::NodeView,
};

/// A family's uplink as the last pass found it.
#[derive(Clone, Debug, PartialEq, Eq)]
struct Seen {
    family: Family,
    name: String,
    ifindex: u32,
}

/// What the last pass saw.
#[derive(Default)]
pub struct Changes {
    /// `None` before the first pass, whose uplinks are no change.
    uplinks: Option<Vec<Seen>>,
    /// The last resolved MAC of each family's gateway.
    gateway_macs: Vec<(Family, IpAddr, [u8; 6])>,
}

impl Changes {
    /// Compares this pass's uplinks and gateway MACs with the last pass's.
    pub fn notice(&mut self, view: &NodeView, uplinks: &[Uplink], shared: &Shared) {
        let now: Vec<Seen> = uplinks
            .iter()
            .map(|u| Seen {
                family: u.family,
                name: u.name.clone(),
                ifindex: u.ifindex,
            })
            .collect();
        if let Some(before) = self.uplinks.replace(now.clone()) {
            for family in [Family::V4, Family::V6] {
                let was = before.iter().find(|s| s.family == family);
                let is = now.iter().find(|s| s.family == family);
                if uplink_changed(family, was, is) {
                    shared.uplink_changes.fetch_add(1, Ordering::Relaxed);
                }
            }
        }
        for uplink in uplinks {
            let Some(mac) = view
                .neighbour(uplink.ifindex, &uplink.gateway)
                .filter(|n| n.is_resolved())
                .and_then(|n| n.mac)
            else {
                continue;
            };
            let last = self.gateway_macs.iter_mut().find(|(family, gateway, _)| {
                *family == uplink.family && *gateway == uplink.gateway
            });
            match last {
                Some((_, _, last)) if *last != mac => {
                    warn!(
                        family = family_name(uplink.family),
                        gateway = %uplink.gateway,
                        from = %format_mac(last),
                        to = %format_mac(&mac),
                        "the gateway's MAC changed (a failover?); the datapath follows within 100 ms"
                    );
                    shared.gateway_mac_changes.fetch_add(1, Ordering::Relaxed);
                    *last = mac;
                }
                Some(_) => {}
                None => {
                    self.gateway_macs
                        .retain(|(family, _, _)| *family != uplink.family);
                    self.gateway_macs.push((uplink.family, uplink.gateway, mac));
                }
            }
        }
    }
}

/// Logs a change of a family's uplink; returns whether there was one.
fn uplink_changed(family: Family, was: Option<&Seen>, is: Option<&Seen>) -> bool {
    let family = family_name(family);
    match (was, is) {
        (Some(was), Some(is)) if was != is => {
            info!(
                family,
                from = %was.name,
                from_ifindex = was.ifindex,
                to = %is.name,
                to_ifindex = is.ifindex,
                "uplink changed; uplink_ingress follows it"
            );
            true
        }
        (Some(was), None) => {
            warn!(family, uplink = %was.name, ifindex = was.ifindex, "uplink gone; Pod-to-Pod traffic of this family stays on the node until it is back");
            true
        }
        (None, Some(is)) => {
            info!(family, uplink = %is.name, ifindex = is.ifindex, "uplink back; the datapath uses it again");
            true
        }
        _ => false,
    }
}
