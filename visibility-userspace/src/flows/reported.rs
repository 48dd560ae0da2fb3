//! The counters each flow had when it was last reported, pinned beside the flow map
//! (`VIS_REPORTED`), so that a daemon started again, after SIGTERM, a crash or
//! `kill -9`, reports only what came since: never the same bytes twice.
//!
//! Crash consistency: an interval's counters are written here *before* its records go
//! to the sink and the exporters. A crash between the two loses that one interval's
//! records (they are not reported again); it never reports them twice. The window is
//! the time the sink takes to write a batch, well under a millisecond, once an interval.
//!
//! The map lives as long as the flow map: both are pinned in the same directory, go
//! away together (`visibility teardown`, a reboot) and are made anew together when the
//! maps' layout changes.

use aya::maps::{HashMap, IterableMap as _, MapData, MapError};
use visibility_common::{
    flow::{FlowKey, FlowStats},
    map_names,
};

use super::batch::{delete_batch, update_batch};
use crate::{datapath::PinDir, error::MapsError};

/// A flow's counters when it was last reported.
#[repr(C)]
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct Reported {
    pub packets: u64,
    pub bytes: u64,
    pub returned_packets: u64,
    pub returned_bytes: u64,
    /// The flow's first packet: a flow evicted and counted again from zero under the
    /// same key has another, and owes nothing to what was reported of the old one.
    pub first_seen_ns: u64,
    /// When the read that reported it ran (the datapath's clock): where the next
    /// record of the flow starts.
    pub read_ns: u64,
}

// SAFETY: plain old data: u64s only, `repr(C)`, no padding.
unsafe impl aya::Pod for Reported {}

impl Reported {
    /// What a read at `read_ns` that found `stats` leaves to report next time.
    pub fn of(stats: &FlowStats, read_ns: u64) -> Self {
        Self {
            packets: stats.packets,
            bytes: stats.bytes,
            returned_packets: stats.returned_packets,
            returned_bytes: stats.returned_bytes,
            first_seen_ns: stats.first_seen_ns,
            read_ns,
        }
    }
}

/// The pinned map of what was reported.
pub struct ReportedMap {
    map: HashMap<MapData, FlowKey, Reported>,
}

fn open(pins: &PinDir) -> Result<HashMap<MapData, FlowKey, Reported>, MapError> {
    HashMap::try_from(aya::maps::Map::HashMap(MapData::from_pin(
        pins.map(map_names::REPORTED),
    )?))
}

impl ReportedMap {
    /// Opens the map pinned under `pins`, or makes and pins one with room for
    /// `capacity` flows (the flow map's).
    pub fn open(pins: &PinDir, capacity: u32) -> Result<Self, MapsError> {
        let error = MapsError::map(map_names::REPORTED);
        if let Ok(map) = open(pins) {
            return Ok(Self { map });
        }
        HashMap::<MapData, FlowKey, Reported>::create(capacity, 0)
            .map_err(MapsError::map(map_names::REPORTED))?
            .pin(pins.map(map_names::REPORTED))
            .map_err(|error| MapError::PinError {
                name: Some(map_names::REPORTED.into()),
                error,
            })
            .map_err(MapsError::map(map_names::REPORTED))?;
        Ok(Self {
            map: open(pins).map_err(error)?,
        })
    }

    /// Every flow reported before, with what was.
    pub fn entries(&self) -> Vec<(FlowKey, Reported)> {
        self.map.iter().filter_map(Result::ok).collect()
    }

    /// Forgets the flows gone from the flow map. A key that is not here (a flow never
    /// reported) is passed over.
    pub fn forget(&mut self, keys: &[FlowKey]) -> Result<(), MapsError> {
        let mut rest = keys;
        while !rest.is_empty() {
            match delete_batch(self.map.map(), rest) {
                Ok(()) => break,
                Err((done, e)) if e.raw_os_error() == Some(libc::ENOENT) => {
                    rest = &rest[done + 1..];
                }
                Err((0, _)) => return self.forget_one_by_one(rest),
                Err((_, e)) => return Err(io_error(e)),
            }
        }
        Ok(())
    }

    fn forget_one_by_one(&mut self, keys: &[FlowKey]) -> Result<(), MapsError> {
        for key in keys {
            match self.map.remove(key) {
                Ok(()) | Err(MapError::KeyNotFound) => {}
                Err(e) => return Err(MapsError::map(map_names::REPORTED)(e)),
            }
        }
        Ok(())
    }

    /// Records what was reported of `flows`.
    pub fn record(&mut self, flows: &[(FlowKey, Reported)]) -> Result<(), MapsError> {
        if flows.is_empty() {
            return Ok(());
        }
        let (keys, values): (Vec<FlowKey>, Vec<Reported>) = flows.iter().copied().unzip();
        match update_batch(self.map.map(), &keys, &values) {
            Ok(()) => Ok(()),
            // No batch updates on this kernel: one by one.
            Err((0, e)) if e.raw_os_error() == Some(libc::EINVAL) => {
                for (key, value) in flows {
                    self.map
                        .insert(key, value, 0)
                        .map_err(MapsError::map(map_names::REPORTED))?;
                }
                Ok(())
            }
            Err((_, e)) => Err(io_error(e)),
        }
    }
}

fn io_error(error: std::io::Error) -> MapsError {
    MapsError::map(map_names::REPORTED)(MapError::IoError(error))
}
