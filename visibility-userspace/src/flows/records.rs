//! Flow records: at each aggregation interval, one record per flow that saw traffic,
//! with that interval's packets and bytes. A thread of their own reads the flow map,
//! turns successive reads into per-interval records ([`Aggregator`]) and hands them to
//! the JSON sink ([`super::sink`]) and the IPFIX exporters ([`super::ipfix`]). When
//! the daemon stops, a last read emits the flows' last packets ([`Reader::stop`]).

use std::{
    collections::{HashMap, hash_map::Entry},
    io,
    sync::{Arc, atomic::Ordering, mpsc},
    thread::JoinHandle,
    time::{Duration, Instant},
};

use visibility_common::flow::{FlowKey, FlowStats};

use super::{
    ipfix::{encode::ExportRecord, export::Exporters},
    record::FlowRecord,
    sink::Sink,
    stats::RecordStats,
    view::{Clock, record},
};
use crate::kubernetes::PodNames;

/// What a flow had at the previous read.
#[derive(Clone, Copy, Debug)]
struct Seen {
    packets: u64,
    bytes: u64,
    returned_packets: u64,
    returned_bytes: u64,
    first_seen_ns: u64,
    /// The number of the read that saw it last.
    read: u64,
}

/// Room for flows the aggregator keeps even when it has fewer.
const MIN_KEPT_CAPACITY: usize = 4096;

/// Turns successive reads of the flow map into per-interval records.
#[derive(Default)]
pub struct Aggregator {
    /// Every flow of the last read, updated in place, so that an interval costs one
    /// hash lookup per flow and holds one table, not two.
    previous: HashMap<FlowKey, Seen>,
    reads: u64,
    last_read_ns: u64,
}

impl Aggregator {
    /// The records of the interval that ends now, given the map's current entries.
    /// Returns the records and the number of flows evicted since the last read.
    pub fn interval(
        &mut self,
        entries: &[(FlowKey, FlowStats)],
        clock: &Clock,
        now_ns: u64,
        node_name: &str,
        interface_name: &impl Fn(u32) -> Option<String>,
        pods: &PodNames,
    ) -> (Vec<FlowRecord>, u64) {
        let (deltas, evicted) = self.deltas(entries, now_ns);
        let records = json_records(&deltas, clock, node_name, interface_name, pods);
        (records, evicted)
    }

    /// The interval that ends now, given the map's current entries: each flow that saw
    /// traffic with the interval's counts (and first and last packet in it), from which
    /// both the JSON records and the IPFIX records are made. Returns them and the
    /// number of flows evicted since the last read.
    pub fn deltas(
        &mut self,
        entries: &[(FlowKey, FlowStats)],
        now_ns: u64,
    ) -> (Vec<(FlowKey, FlowStats)>, u64) {
        self.reads += 1;
        let read = self.reads;
        let mut deltas = Vec::new();
        for (key, stats) in entries {
            let seen = Seen {
                packets: stats.packets,
                bytes: stats.bytes,
                returned_packets: stats.returned_packets,
                returned_bytes: stats.returned_bytes,
                first_seen_ns: stats.first_seen_ns,
                read,
            };
            let before = match self.previous.entry(*key) {
                Entry::Occupied(mut slot) => Some(slot.insert(seen)),
                Entry::Vacant(slot) => {
                    slot.insert(seen);
                    None
                }
            }
            // A flow evicted and seen again since the last read starts from zero. (A
            // key the batch read returned twice finds this read's own values: no delta.)
            .filter(|p| p.first_seen_ns == stats.first_seen_ns);
            let delta = |now: u64, then: Option<u64>| now.saturating_sub(then.unwrap_or(0));
            let packets = delta(stats.packets, before.map(|b| b.packets));
            let returned_packets =
                delta(stats.returned_packets, before.map(|b| b.returned_packets));
            if packets > 0 || returned_packets > 0 {
                let interval = FlowStats {
                    packets,
                    bytes: delta(stats.bytes, before.map(|b| b.bytes)),
                    returned_packets,
                    returned_bytes: delta(stats.returned_bytes, before.map(|b| b.returned_bytes)),
                    // The first packet of this interval: the flow's first, or else no
                    // earlier than the previous read, and never after the last packet
                    // (the datapath's coarse clock can lag the read's by a tick).
                    first_seen_ns: if before.is_some() {
                        self.last_read_ns
                            .max(stats.first_seen_ns)
                            .min(stats.last_seen_ns)
                    } else {
                        stats.first_seen_ns
                    },
                    ..*stats
                };
                deltas.push((*key, interval));
            }
        }
        // What this read did not see, the map's LRU evicted.
        let known = self.previous.len();
        self.previous.retain(|_, seen| seen.read == read);
        let evicted = (known - self.previous.len()) as u64;
        // A table keeps its room when it empties; after a burst of flows, give most of
        // it back, so the daemon's memory follows the flows it has.
        let flows = self.previous.len();
        if self.previous.capacity() > 4 * flows.max(MIN_KEPT_CAPACITY) {
            self.previous.shrink_to(2 * flows.max(MIN_KEPT_CAPACITY));
        }
        self.last_read_ns = now_ns;
        (deltas, evicted)
    }
}

/// The JSON records of an interval's flows, each end named by the Pod that had its
/// address at the interval's last packet.
fn json_records(
    deltas: &[(FlowKey, FlowStats)],
    clock: &Clock,
    node_name: &str,
    interface_name: &impl Fn(u32) -> Option<String>,
    pods: &PodNames,
) -> Vec<FlowRecord> {
    deltas
        .iter()
        .filter_map(|(key, stats)| {
            let mut record = record(key, stats, clock, node_name, interface_name)?;
            pods.name(&mut record, stats.last_seen_ns);
            Some(record)
        })
        .collect()
}

/// The flow reader's thread; [`Reader::stop`] ends it.
pub struct Reader {
    stop: mpsc::Sender<()>,
    thread: JoinHandle<()>,
}

/// How long the last records may take to reach the sink when the daemon stops: well
/// within Kubernetes' default grace period of 30 s.
const FINAL_FLUSH: Duration = Duration::from_secs(10);

impl Reader {
    /// Reads the map one last time, emits the records of that last interval, and waits
    /// until the sink has written every queued record (or [`FINAL_FLUSH`] has passed).
    pub fn stop(self) {
        let _ = self.stop.send(());
        let _ = self.thread.join();
    }
}

/// What each read needs besides the map and the aggregator.
struct Outputs {
    sink: Sink,
    exporters: Exporters,
    stats: Arc<RecordStats>,
    node_name: String,
    pods: PodNames,
}

impl Outputs {
    /// Reads the map, and emits the records of the interval that ends now: JSON lines to
    /// the sink (waiting for room until `deadline`) and IPFIX to the exporters.
    fn read_and_emit(
        &self,
        maps: &crate::maps::Maps,
        aggregator: &mut Aggregator,
        deadline: Instant,
    ) {
        let started = Instant::now();
        let entries = super::batch::read_flows(maps.flows());
        let clock = Clock::now();
        let names = super::view::interface_names();
        let name_of = |ifindex: u32| names.get(&ifindex).cloned();
        let (deltas, evicted) = aggregator.deltas(&entries, clock.datapath_now());
        // IPFIX first: queuing it never waits, while the JSON sink may wait for room
        // until the deadline.
        if self.exporters.has_collectors() {
            self.exporters.send(
                deltas
                    .iter()
                    .filter_map(|(key, stats)| ExportRecord::new(key, stats, &clock))
                    .collect(),
            );
        }
        self.sink.send(
            &json_records(&deltas, &clock, &self.node_name, &name_of, &self.pods),
            deadline,
        );
        let stats = &self.stats;
        stats.evictions.fetch_add(evicted, Ordering::Relaxed);
        stats
            .flow_map_entries
            .store(entries.len() as u64, Ordering::Relaxed);
        stats
            .last_read_micros
            .store(started.elapsed().as_micros() as u64, Ordering::Relaxed);
    }
}

/// Reads the map and emits records every `interval`, on its own thread: JSON lines to
/// `sink`, and the same flows and counts as IPFIX to `exporters`; `pods` names their
/// ends.
pub fn spawn_reader(
    pins: crate::datapath::PinDir,
    interval: Duration,
    sink: Sink,
    exporters: Exporters,
    stats: Arc<RecordStats>,
    node_name: String,
    pods: PodNames,
) -> io::Result<Reader> {
    let (stop, stopped) = mpsc::channel();
    let outputs = Outputs {
        sink,
        exporters,
        stats,
        node_name,
        pods,
    };
    let thread = std::thread::Builder::new()
        .name("flow-reader".into())
        .spawn(move || {
            let maps = match crate::maps::Maps::open(&pins) {
                Ok(maps) => maps,
                Err(error) => {
                    tracing::error!(%error, "flow records disabled: opening the maps");
                    return;
                }
            };
            let mut aggregator = Aggregator::default();
            let mut next = Instant::now() + interval;
            // Until stopped (or dropped): then one last read, below.
            while let Err(mpsc::RecvTimeoutError::Timeout) =
                stopped.recv_timeout(next.saturating_duration_since(Instant::now()))
            {
                next += interval;
                outputs.read_and_emit(&maps, &mut aggregator, next);
            }
            let deadline = Instant::now() + FINAL_FLUSH;
            outputs.read_and_emit(&maps, &mut aggregator, deadline);
            outputs.sink.finish(deadline);
        })?;
    Ok(Reader { stop, thread })
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::flows::sink::tests::{key, stats};

    #[test]
    fn records_carry_interval_deltas_that_add_up_to_the_total() {
        let clock = Clock::now();
        let mut aggregator = Aggregator::default();
        let names = |_: u32| None;
        let mut total = 0;
        for (i, packets) in [3u64, 3, 10, 25].iter().enumerate() {
            let (records, evicted) = aggregator.interval(
                &[(key(1), stats(*packets, 5))],
                &clock,
                i as u64 * 1000,
                "n",
                &names,
                &PodNames::default(),
            );
            assert_eq!(evicted, 0);
            total += records.iter().map(|r| r.packets_sent).sum::<u64>();
            // An interval without traffic emits nothing.
            assert_eq!(records.is_empty(), i == 1);
        }
        assert_eq!(total, 25);
    }

    /// The datapath's coarse clock may stamp a packet up to a tick before the previous
    /// read; the record must still start no later than it ends.
    #[test]
    fn a_record_never_starts_after_it_ends() {
        let clock = Clock::now();
        let mut aggregator = Aggregator::default();
        let names = |_: u32| None;
        aggregator.interval(
            &[(key(1), stats(1, 100))],
            &clock,
            1_000,
            "n",
            &names,
            &PodNames::default(),
        );
        // One more packet, stamped at 990: before the read at 1000.
        let later = FlowStats {
            last_seen_ns: 990,
            ..stats(2, 100)
        };
        let (records, _) = aggregator.interval(
            &[(key(1), later)],
            &clock,
            2_000,
            "n",
            &names,
            &PodNames::default(),
        );
        assert_eq!(records.len(), 1);
        assert!(
            records[0].start_time <= records[0].end_time,
            "{} > {}",
            records[0].start_time,
            records[0].end_time
        );
    }

    #[test]
    fn evictions_are_counted_and_a_recreated_flow_starts_from_zero() {
        let clock = Clock::now();
        let mut aggregator = Aggregator::default();
        let names = |_: u32| None;
        aggregator.interval(
            &[(key(1), stats(5, 1)), (key(2), stats(5, 1))],
            &clock,
            0,
            "n",
            &names,
            &PodNames::default(),
        );
        let (records, evicted) = aggregator.interval(
            &[(key(1), stats(2, 99))],
            &clock,
            1,
            "n",
            &names,
            &PodNames::default(),
        );
        assert_eq!(evicted, 1);
        assert_eq!(records[0].packets_sent, 2);
        // The evicted flow is forgotten: back in the map, all its packets are new.
        let (records, evicted) = aggregator.interval(
            &[(key(2), stats(7, 1))],
            &clock,
            2,
            "n",
            &names,
            &PodNames::default(),
        );
        assert_eq!(evicted, 1, "key 1 went this time");
        assert_eq!(records[0].packets_sent, 7);
    }

    #[test]
    fn the_table_gives_back_its_room_after_a_burst_of_flows() {
        let clock = Clock::now();
        let mut aggregator = Aggregator::default();
        let names = |_: u32| None;
        let burst: Vec<_> = (0..50_000).map(|i| (key(i), stats(1, 1))).collect();
        aggregator.interval(&burst, &clock, 0, "n", &names, &PodNames::default());
        assert!(aggregator.previous.capacity() >= 50_000);
        let (_, evicted) =
            aggregator.interval(&burst[..10], &clock, 1, "n", &names, &PodNames::default());
        assert_eq!(evicted, 49_990);
        assert!(
            aggregator.previous.capacity() <= 4 * MIN_KEPT_CAPACITY,
            "{} slots kept for 10 flows",
            aggregator.previous.capacity()
        );
    }

    /// A batch read of a map that changes under it may return a key twice; the flow's
    /// traffic is reported once.
    #[test]
    fn a_flow_read_twice_in_one_interval_is_reported_once() {
        let clock = Clock::now();
        let mut aggregator = Aggregator::default();
        let names = |_: u32| None;
        let (records, evicted) = aggregator.interval(
            &[(key(1), stats(4, 1)), (key(1), stats(4, 1))],
            &clock,
            0,
            "n",
            &names,
            &PodNames::default(),
        );
        assert_eq!(evicted, 0);
        assert_eq!(records.len(), 1);
        assert_eq!(records[0].packets_sent, 4);
    }
}
