//! The pinned eBPF object's identity: its layout version and a SHA-256 of its bytes,
//! kept in a one-entry map of their own (`VIS_OBJECT`) beside the datapath's, and what a
//! daemon with another object makes of the difference.

use aya::maps::{Array, MapData, MapError};
use sha2::{Digest as _, Sha256};
use visibility_common::{LAYOUT_VERSION, map_names};

use crate::{datapath::PinDir, error::MapsError};

/// What `VIS_OBJECT` holds.
#[repr(C)]
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct ObjectInfo {
    /// The object's [`LAYOUT_VERSION`].
    pub layout_version: u32,
    pub _pad: u32,
    /// SHA-256 of the object file's bytes, as built (before the loader sets its
    /// constants).
    pub sha256: [u8; 32],
}

// SAFETY: plain old data: integers and bytes, `repr(C)`, with its padding made explicit.
unsafe impl aya::Pod for ObjectInfo {}

impl ObjectInfo {
    /// The identity of `object`, with this build's layout version (which an object read
    /// from a file has too: [`crate::ebpf_object::EbpfObject::read`] checks its maps).
    pub fn of(object: &[u8]) -> Self {
        Self {
            layout_version: LAYOUT_VERSION,
            _pad: 0,
            sha256: Sha256::digest(object).into(),
        }
    }

    /// The hash in hexadecimal, as `status` shows it.
    pub fn sha256_hex(&self) -> String {
        self.sha256.iter().map(|b| format!("{b:02x}")).collect()
    }
}

/// How the pinned datapath differs from the object a daemon carries.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Change {
    /// The same object: adopt it as it is.
    None,
    /// Other programs, maps of the same layout: replace the programs, keep the maps.
    Programs,
    /// Another layout version (or an unknown one: a datapath pinned before `VIS_OBJECT`
    /// existed): new programs with new maps; the old flows are dropped.
    Layout,
}

impl Change {
    /// What it takes to go from the `pinned` object (`None`: unknown) to `ours`.
    pub fn between(pinned: Option<ObjectInfo>, ours: ObjectInfo) -> Self {
        match pinned {
            Some(pinned) if pinned == ours => Change::None,
            Some(pinned) if pinned.layout_version == ours.layout_version => Change::Programs,
            _ => Change::Layout,
        }
    }
}

fn open(pins: &PinDir) -> Result<Array<MapData, ObjectInfo>, MapError> {
    Array::try_from(aya::maps::Map::Array(MapData::from_pin(
        pins.map(map_names::OBJECT),
    )?))
}

/// The identity of the datapath pinned under `pins`; `None` when it has none (pinned by
/// a daemon from before `VIS_OBJECT`) or there is none.
pub fn pinned(pins: &PinDir) -> Option<ObjectInfo> {
    open(pins).ok()?.get(&0, 0).ok()
}

/// Records `info` as the identity of the datapath pinned under `pins`, making the map
/// when there is none.
pub fn set_pinned(pins: &PinDir, info: ObjectInfo) -> Result<(), MapsError> {
    let error = MapsError::map(map_names::OBJECT);
    let mut map = match open(pins) {
        Ok(map) => map,
        Err(_) => {
            let path = pins.map(map_names::OBJECT);
            Array::<MapData, ObjectInfo>::create(1, 0)
                .map_err(MapsError::map(map_names::OBJECT))?
                .pin(&path)
                .map_err(|error| MapError::PinError {
                    name: Some(map_names::OBJECT.into()),
                    error,
                })
                .map_err(MapsError::map(map_names::OBJECT))?;
            open(pins).map_err(MapsError::map(map_names::OBJECT))?
        }
    };
    map.set(0, info, 0).map_err(error)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_same_object_is_adopted_another_replaced_another_layout_remade() {
        let ours = ObjectInfo::of(b"object");
        assert_eq!(Change::between(Some(ours), ours), Change::None);
        let other = ObjectInfo::of(b"other object");
        assert_ne!(other.sha256, ours.sha256);
        assert_eq!(Change::between(Some(other), ours), Change::Programs);
        let older_layout = ObjectInfo {
            layout_version: LAYOUT_VERSION - 1,
            ..ours
        };
        assert_eq!(Change::between(Some(older_layout), ours), Change::Layout);
        assert_eq!(Change::between(None, ours), Change::Layout);
        assert_eq!(ours.sha256_hex().len(), 64);
    }
}
