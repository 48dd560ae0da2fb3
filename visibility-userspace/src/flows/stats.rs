//! The flow reader's and the record sinks' counts, shared with the metrics endpoint and
//! the status file.

use std::sync::atomic::{AtomicU64, Ordering};

/// Counters shared with metrics and the status file.
#[derive(Debug, Default)]
pub struct RecordStats {
    pub emitted: AtomicU64,
    pub dropped: AtomicU64,
    /// Flows that vanished from the map between two reads: evicted by the LRU.
    pub evictions: AtomicU64,
    /// Entries of the flow map at the last read: its fill level.
    pub flow_map_entries: AtomicU64,
    /// How long the last read and emit took, in microseconds.
    pub last_read_micros: AtomicU64,
    /// IPFIX messages (or whole intervals, when an exporter's queue was full) that did
    /// not reach a collector.
    pub ipfix_export_errors: AtomicU64,
    /// Writes of records that failed (a full disk, a closed stdout): their records
    /// count as dropped.
    pub write_errors: AtomicU64,
    /// Times the record file was found moved away (logrotate) and opened anew.
    pub file_reopens: AtomicU64,
    /// Records in the sink's queue, not yet written or dropped.
    pub queued: AtomicU64,
}

impl RecordStats {
    pub fn counts(&self) -> crate::state::RecordCounts {
        crate::state::RecordCounts {
            emitted: self.emitted.load(Ordering::Relaxed),
            dropped: self.dropped.load(Ordering::Relaxed),
            evictions: self.evictions.load(Ordering::Relaxed),
            flow_map_entries: self.flow_map_entries.load(Ordering::Relaxed),
            ipfix_export_errors: self.ipfix_export_errors.load(Ordering::Relaxed),
        }
    }
}
