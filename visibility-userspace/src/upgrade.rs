//! Replaces a pinned datapath's programs with this daemon's own, in place, so that no
//! packet ever meets an interface without a program: each TCX link is updated to the
//! new program (`BPF_LINK_UPDATE`), each clsact filter replaced at its place (same
//! priority and handle). Maps of the same layout are kept (the new object takes them up
//! through their pins); another layout gets new maps, and the old flows are dropped.

use std::fs;

use aya::{
    Ebpf,
    programs::{
        ProgramError,
        links::{FdLink, PinnedLink},
        tc::{SchedClassifierLink, TcHandle},
    },
};
use tracing::{info, warn};

use crate::{
    error::DatapathError,
    load::{classifier, load_verified, pin_programs},
    object::{Change, ObjectInfo},
    pins::{
        AttachMode, LoadOptions, Origin, PinDir, ProgramKind, attachments, create_private_dir,
        detach_pinned, io_error, program_error,
    },
};

/// Where a clsact filter sits on its hook: what a replacement must name.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct FilterPlace {
    priority: u16,
    handle: u32,
}

impl FilterPlace {
    /// The place of a filter just attached.
    pub fn of(link: &SchedClassifierLink) -> Result<Self, ProgramError> {
        Ok(Self {
            priority: link.priority()?,
            handle: link.handle()?.into(),
        })
    }

    /// The name of the directory, in the attachment's, that records it.
    pub fn dir_name(self) -> String {
        format!("prio{}_handle{}", self.priority, self.handle)
    }

    fn parse(name: &str) -> Option<Self> {
        let (priority, handle) = name.strip_prefix("prio")?.split_once("_handle")?;
        Some(Self {
            priority: priority.parse().ok()?,
            handle: handle.parse().ok()?,
        })
    }

    /// The place recorded in the attachment `kind` on `ifindex`; `None` for one made by
    /// a daemon from before places were recorded.
    fn recorded(pins: &PinDir, ifindex: u32, kind: ProgramKind) -> Option<Self> {
        fs::read_dir(pins.link(ifindex, kind))
            .ok()?
            .filter_map(Result::ok)
            .find_map(|entry| Self::parse(entry.file_name().to_str()?))
    }
}

/// Replaces the programs pinned under `pins`, which are another object's (`pinned`:
/// its identity, if known), with this daemon's (`ours`), as `change` requires.
pub fn replace_pinned(
    pins: &PinDir,
    options: &LoadOptions,
    change: Change,
    pinned: Option<ObjectInfo>,
    ours: ObjectInfo,
) -> Result<Origin, DatapathError> {
    let pinned_hash = pinned.map_or_else(|| "unknown".to_owned(), |p| p.sha256_hex());
    let new_maps = change == Change::Layout;
    let maps_dir = if new_maps {
        warn!(
            pinned_layout = pinned.map(|p| p.layout_version),
            layout = ours.layout_version,
            "the pinned datapath's maps have another layout: replacing its programs with new maps; the flows it counted are dropped"
        );
        let next = pins.next_maps();
        // Left by a daemon that stopped half way through an upgrade: never in use.
        if next.exists() {
            fs::remove_dir_all(&next).map_err(io_error("removing", &next))?;
        }
        create_private_dir(&next)?;
        next
    } else {
        pins.maps()
    };
    let mut ebpf = load_verified(&maps_dir, options)?;
    let mode = AttachMode::current();
    for (ifindex, kind) in attachments(pins) {
        if let Err(error) = replace_attached(&mut ebpf, pins, mode, ifindex, kind) {
            // An interface gone since (its link defunct), or a filter removed by hand:
            // the attachment is dropped, and the reconcile attaches anew where the
            // interface is still a Pod's.
            warn!(ifindex, program = kind.name(), %error, "replacing an attached program; detaching it");
            let ifname = nix::net::if_::if_indextoname(ifindex)
                .ok()
                .and_then(|name| name.into_string().ok());
            detach_pinned(pins, mode, ifname.as_deref(), ifindex, kind)?;
        }
    }
    pin_programs(&mut ebpf, pins)?;
    if new_maps {
        // No program uses the old maps any more: unpinned, they are freed.
        let (old, next) = (pins.maps(), pins.next_maps());
        fs::remove_dir_all(&old).map_err(io_error("removing", &old))?;
        fs::rename(&next, &old).map_err(io_error("renaming", &next))?;
    }
    info!(
        pinned = %pinned_hash,
        ours = %ours.sha256_hex(),
        maps = if new_maps { "new" } else { "kept" },
        "replaced the pinned datapath's programs with this daemon's"
    );
    Ok(if new_maps {
        Origin::UpgradedWithNewMaps
    } else {
        Origin::Upgraded
    })
}

/// Puts the new object's `kind` where the pinned one is attached on `ifindex`.
fn replace_attached(
    ebpf: &mut Ebpf,
    pins: &PinDir,
    mode: AttachMode,
    ifindex: u32,
    kind: ProgramKind,
) -> Result<(), DatapathError> {
    let link_pin = pins.link(ifindex, kind);
    let link_error = |source: Box<dyn std::error::Error + Send + Sync>| DatapathError::Link {
        path: link_pin.clone(),
        source,
    };
    let link = match mode {
        AttachMode::Tcx => {
            let pinned = PinnedLink::from_pin(&link_pin).map_err(|e| link_error(Box::new(e)))?;
            SchedClassifierLink::try_from(FdLink::from(pinned))
                .map_err(|e| link_error(Box::new(e)))?
        }
        AttachMode::Clsact => {
            let place = FilterPlace::recorded(pins, ifindex, kind)
                .ok_or_else(|| link_error("the filter's place was not recorded".into()))?;
            let ifname = nix::net::if_::if_indextoname(ifindex)
                .map_err(|e| link_error(Box::new(e)))?
                .into_string()
                .map_err(|e| link_error(Box::new(e)))?;
            SchedClassifierLink::attached(
                &ifname,
                kind.attach_type(),
                place.priority,
                TcHandle::from(place.handle),
                None,
            )
            .map_err(|e| link_error(Box::new(e)))?
        }
    };
    let program = classifier(ebpf, kind.name()).map_err(program_error(kind))?;
    let id = program.attach_to_link(link).map_err(program_error(kind))?;
    let link = program.take_link(id).map_err(program_error(kind))?;
    match mode {
        // The pin holds the link, updated in place; closing this descriptor keeps it.
        AttachMode::Tcx => drop(link),
        // Dropping a filter's link would remove the filter.
        AttachMode::Clsact => std::mem::forget(link),
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_filter_place_reads_back_as_written() {
        let place = FilterPlace {
            priority: 49152,
            handle: 0x0001,
        };
        assert_eq!(FilterPlace::parse(&place.dir_name()), Some(place));
        assert_eq!(FilterPlace::parse("prio1"), None);
    }
}
