//! Flow records: at each aggregation interval, one record per flow that saw traffic,
//! with that interval's packets and bytes, written to stdout or to a rotated file.
//! The sink runs on its own thread behind a bounded queue: a slow or full sink drops
//! records (and counts them); it never stalls the daemon, let alone the datapath.

use std::{
    collections::{HashMap, hash_map::Entry},
    fs,
    io::{self, Write as _},
    path::{Path, PathBuf},
    sync::{
        Arc,
        atomic::{AtomicU64, Ordering},
        mpsc::{Receiver, SyncSender, TrySendError, sync_channel},
    },
    time::{Duration, Instant},
};

use visibility_common::flow::{FlowKey, FlowStats};

use super::{
    ipfix::{ExportRecord, Exporters},
    record::FlowRecord,
    view::{Clock, record},
};

/// Aggregation intervals VPC flow logs offer.
pub const INTERVALS: [(&str, u64); 6] = [
    ("5s", 5),
    ("30s", 30),
    ("1m", 60),
    ("5m", 300),
    ("10m", 600),
    ("15m", 900),
];

/// Parses one of [`INTERVALS`].
pub fn parse_interval(text: &str) -> Option<Duration> {
    INTERVALS
        .iter()
        .find(|(name, _)| *name == text)
        .map(|(_, secs)| Duration::from_secs(*secs))
}

/// Where records go.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub enum SinkSpec {
    /// JSON lines on standard output.
    #[default]
    Stdout,
    /// JSON lines in a file, rotated at `max_bytes` into `path.1` … `path.<keep>`.
    File {
        path: PathBuf,
        max_bytes: u64,
        keep: u32,
    },
    /// No records.
    Off,
}

/// Counters shared with metrics and the status file.
#[derive(Debug, Default)]
pub struct RecordStats {
    pub emitted: AtomicU64,
    pub dropped: AtomicU64,
    /// Flows that vanished from the map between two reads: evicted by the LRU.
    pub evictions: AtomicU64,
    pub active_flows: AtomicU64,
    /// How long the last read and emit took, in microseconds.
    pub last_read_micros: AtomicU64,
    /// IPFIX messages (or whole intervals, when an exporter's queue was full) that did
    /// not reach a collector.
    pub ipfix_export_errors: AtomicU64,
}

impl RecordStats {
    pub fn counts(&self) -> crate::state::RecordCounts {
        crate::state::RecordCounts {
            emitted: self.emitted.load(Ordering::Relaxed),
            dropped: self.dropped.load(Ordering::Relaxed),
            evictions: self.evictions.load(Ordering::Relaxed),
            active_flows: self.active_flows.load(Ordering::Relaxed),
            ipfix_export_errors: self.ipfix_export_errors.load(Ordering::Relaxed),
        }
    }
}

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
    ) -> (Vec<FlowRecord>, u64) {
        let (deltas, evicted) = self.deltas(entries, now_ns);
        let records = json_records(&deltas, clock, node_name, interface_name);
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

/// The JSON records of an interval's flows.
fn json_records(
    deltas: &[(FlowKey, FlowStats)],
    clock: &Clock,
    node_name: &str,
    interface_name: &impl Fn(u32) -> Option<String>,
) -> Vec<FlowRecord> {
    deltas
        .iter()
        .filter_map(|(key, stats)| record(key, stats, clock, node_name, interface_name))
        .collect()
}

/// The writing end of the sink: a bounded queue to the writer thread.
pub struct Sink {
    sender: Option<SyncSender<String>>,
    stats: Arc<RecordStats>,
}

/// Lines the queue holds before records are dropped.
const QUEUE: usize = 65_536;

impl Sink {
    pub fn start(spec: SinkSpec, stats: Arc<RecordStats>) -> io::Result<Self> {
        let sender = match spec {
            SinkSpec::Off => None,
            SinkSpec::Stdout => Some(spawn_writer(Box::new(io::stdout()), None, stats.clone())),
            SinkSpec::File {
                path,
                max_bytes,
                keep,
            } => {
                let writer = RotatingFile::open(path, max_bytes, keep)?;
                Some(spawn_writer(
                    Box::new(writer.file_clone()?),
                    Some(writer),
                    stats.clone(),
                ))
            }
        };
        Ok(Self { sender, stats })
    }

    /// Queues records, waiting for room until `deadline` (the next interval's read):
    /// a sink that keeps up gets every record however many flows there are, and one
    /// that does not loses what is left at the deadline, counted as dropped. Only this
    /// reader thread waits; the daemon and the datapath never do.
    pub fn send(&self, records: &[FlowRecord], deadline: Instant) {
        let Some(sender) = &self.sender else { return };
        for (sent, record) in records.iter().enumerate() {
            let Ok(mut line) = serde_json::to_string(record) else {
                continue;
            };
            loop {
                match sender.try_send(line) {
                    Ok(()) => break,
                    Err(TrySendError::Full(back)) if Instant::now() < deadline => {
                        line = back;
                        std::thread::sleep(Duration::from_millis(1));
                    }
                    Err(TrySendError::Full(_) | TrySendError::Disconnected(_)) => {
                        let lost = (records.len() - sent) as u64;
                        self.stats.dropped.fetch_add(lost, Ordering::Relaxed);
                        return;
                    }
                }
            }
        }
    }
}

fn spawn_writer(
    out: Box<dyn io::Write + Send>,
    rotating: Option<RotatingFile>,
    stats: Arc<RecordStats>,
) -> SyncSender<String> {
    let (sender, receiver) = sync_channel::<String>(QUEUE);
    std::thread::Builder::new()
        .name("flow-records".into())
        .spawn(move || write_lines(receiver, out, rotating, &stats))
        .expect("spawning the record writer");
    sender
}

fn write_lines(
    receiver: Receiver<String>,
    out: Box<dyn io::Write + Send>,
    mut rotating: Option<RotatingFile>,
    stats: &RecordStats,
) {
    let mut out = io::BufWriter::new(out);
    // Write what is queued, then flush once: one flush per burst, not per line.
    while let Ok(first) = receiver.recv() {
        let mut next = Some(first);
        while let Some(mut line) = next {
            line.push('\n');
            if let Some(file) = &mut rotating {
                match file.before_write(line.len() as u64) {
                    Ok(Some(reopened)) => {
                        let _ = out.flush();
                        out = io::BufWriter::new(Box::new(reopened));
                    }
                    Ok(None) => {}
                    Err(error) => tracing::warn!(%error, "rotating the flow record file"),
                }
            }
            // A failed write (closed pipe, full disk) loses the line, counted; draining
            // goes on so the queue keeps moving.
            let counter = if out.write_all(line.as_bytes()).is_ok() {
                &stats.emitted
            } else {
                &stats.dropped
            };
            counter.fetch_add(1, Ordering::Relaxed);
            next = receiver.try_recv().ok();
        }
        let _ = out.flush();
    }
}

/// Size-based rotation: `flows.jsonl` → `flows.jsonl.1` → … → `flows.jsonl.<keep>`.
struct RotatingFile {
    path: PathBuf,
    max_bytes: u64,
    keep: u32,
    written: u64,
}

impl RotatingFile {
    fn open(path: PathBuf, max_bytes: u64, keep: u32) -> io::Result<Self> {
        if let Some(dir) = path.parent() {
            fs::create_dir_all(dir)?;
        }
        let written = fs::metadata(&path).map(|m| m.len()).unwrap_or(0);
        Ok(Self {
            path,
            max_bytes: max_bytes.max(1),
            keep,
            written,
        })
    }

    fn file_clone(&self) -> io::Result<fs::File> {
        fs::OpenOptions::new()
            .create(true)
            .append(true)
            .open(&self.path)
    }

    fn rotated(path: &Path, n: u32) -> PathBuf {
        let mut name = path.as_os_str().to_owned();
        name.push(format!(".{n}"));
        PathBuf::from(name)
    }

    /// Rotates first when `len` more bytes would exceed the limit; returns the new file.
    fn before_write(&mut self, len: u64) -> io::Result<Option<fs::File>> {
        let rotate = self.written > 0 && self.written + len > self.max_bytes;
        self.written += len;
        if !rotate {
            return Ok(None);
        }
        if self.keep == 0 {
            fs::remove_file(&self.path)?;
        } else {
            for n in (1..self.keep).rev() {
                let from = Self::rotated(&self.path, n);
                if from.exists() {
                    fs::rename(&from, Self::rotated(&self.path, n + 1))?;
                }
            }
            fs::rename(&self.path, Self::rotated(&self.path, 1))?;
        }
        self.written = len;
        self.file_clone().map(Some)
    }
}

/// Reads the map and emits records every `interval`, on its own thread: JSON lines to
/// `sink`, and the same flows and counts as IPFIX to `exporters`.
pub fn spawn_reader(
    pins: crate::datapath::PinDir,
    interval: Duration,
    sink: Sink,
    exporters: Exporters,
    stats: Arc<RecordStats>,
    node_name: String,
) -> io::Result<()> {
    std::thread::Builder::new()
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
            loop {
                std::thread::sleep(next.saturating_duration_since(Instant::now()));
                next += interval;
                let started = Instant::now();
                let entries = super::batch::read_flows(maps.flows());
                let clock = Clock::now();
                let names = super::view::interface_names();
                let name_of = |ifindex: u32| names.get(&ifindex).cloned();
                let (deltas, evicted) = aggregator.deltas(&entries, clock.datapath_now());
                // IPFIX first: queuing it never waits, while the JSON sink may wait for
                // room until the next read.
                if exporters.has_collectors() {
                    exporters.send(
                        deltas
                            .iter()
                            .filter_map(|(key, stats)| ExportRecord::new(key, stats, &clock))
                            .collect(),
                    );
                }
                sink.send(&json_records(&deltas, &clock, &node_name, &name_of), next);
                stats.evictions.fetch_add(evicted, Ordering::Relaxed);
                stats
                    .active_flows
                    .store(entries.len() as u64, Ordering::Relaxed);
                stats
                    .last_read_micros
                    .store(started.elapsed().as_micros() as u64, Ordering::Relaxed);
            }
        })?;
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    fn key(port: u16) -> FlowKey {
        FlowKey {
            family: 4,
            protocol: 17,
            src_port: port,
            dst_port: 53,
            ..Default::default()
        }
    }

    fn stats(packets: u64, first_seen_ns: u64) -> FlowStats {
        FlowStats {
            packets,
            bytes: packets * 100,
            first_seen_ns,
            last_seen_ns: first_seen_ns + 10,
            path: 1,
            ..Default::default()
        }
    }

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
        aggregator.interval(&[(key(1), stats(1, 100))], &clock, 1_000, "n", &names);
        // One more packet, stamped at 990: before the read at 1000.
        let later = FlowStats {
            last_seen_ns: 990,
            ..stats(2, 100)
        };
        let (records, _) = aggregator.interval(&[(key(1), later)], &clock, 2_000, "n", &names);
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
        );
        let (records, evicted) =
            aggregator.interval(&[(key(1), stats(2, 99))], &clock, 1, "n", &names);
        assert_eq!(evicted, 1);
        assert_eq!(records[0].packets_sent, 2);
        // The evicted flow is forgotten: back in the map, all its packets are new.
        let (records, evicted) =
            aggregator.interval(&[(key(2), stats(7, 1))], &clock, 2, "n", &names);
        assert_eq!(evicted, 1, "key 1 went this time");
        assert_eq!(records[0].packets_sent, 7);
    }

    #[test]
    fn the_table_gives_back_its_room_after_a_burst_of_flows() {
        let clock = Clock::now();
        let mut aggregator = Aggregator::default();
        let names = |_: u32| None;
        let burst: Vec<_> = (0..50_000).map(|i| (key(i), stats(1, 1))).collect();
        aggregator.interval(&burst, &clock, 0, "n", &names);
        assert!(aggregator.previous.capacity() >= 50_000);
        let (_, evicted) = aggregator.interval(&burst[..10], &clock, 1, "n", &names);
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
        );
        assert_eq!(evicted, 0);
        assert_eq!(records.len(), 1);
        assert_eq!(records[0].packets_sent, 4);
    }

    #[test]
    fn intervals_are_the_vpc_flow_log_ones() {
        assert_eq!(parse_interval("5s"), Some(Duration::from_secs(5)));
        assert_eq!(parse_interval("15m"), Some(Duration::from_secs(900)));
        assert_eq!(parse_interval("7s"), None);
    }

    #[test]
    fn files_rotate_by_size() {
        let dir = std::env::temp_dir().join(format!("vis-rotate-{}", std::process::id()));
        let _ = fs::remove_dir_all(&dir);
        let path = dir.join("flows.jsonl");
        let mut file = RotatingFile::open(path.clone(), 10, 2).unwrap();
        for _ in 0..5 {
            if let Some(mut f) = file.before_write(6).unwrap() {
                f.write_all(b"12345\n").unwrap();
            } else {
                file.file_clone().unwrap().write_all(b"12345\n").unwrap();
            }
        }
        assert!(RotatingFile::rotated(&path, 1).exists());
        assert!(RotatingFile::rotated(&path, 2).exists());
        assert!(!RotatingFile::rotated(&path, 3).exists());
        assert!(fs::metadata(&path).unwrap().len() <= 10);
        fs::remove_dir_all(&dir).unwrap();
    }

    #[test]
    fn a_full_queue_drops_and_counts_at_the_deadline() {
        let stats = Arc::new(RecordStats::default());
        let (sender, _receiver) = sync_channel::<String>(1);
        let sink = Sink {
            sender: Some(sender),
            stats: stats.clone(),
        };
        let clock = Clock::now();
        let r = record(&key(1), &stats_for_record(), &clock, "n", &|_| None).unwrap();
        let started = Instant::now();
        sink.send(
            &[r.clone(), r.clone(), r],
            started + Duration::from_millis(20),
        );
        assert!(
            started.elapsed() >= Duration::from_millis(20),
            "gave up before the deadline"
        );
        assert_eq!(stats.dropped.load(Ordering::Relaxed), 2);
    }

    #[test]
    fn a_sink_that_keeps_up_gets_more_records_than_the_queue_holds() {
        let dir = std::env::temp_dir().join(format!("vis-sink-{}", std::process::id()));
        let _ = fs::remove_dir_all(&dir);
        let path = dir.join("flows.jsonl");
        let stats = Arc::new(RecordStats::default());
        let spec = SinkSpec::File {
            path: path.clone(),
            max_bytes: u64::MAX,
            keep: 1,
        };
        let sink = Sink::start(spec, stats.clone()).unwrap();
        let clock = Clock::now();
        let r = record(&key(1), &stats_for_record(), &clock, "n", &|_| None).unwrap();
        let records = vec![r; QUEUE + 5_000];
        sink.send(&records, Instant::now() + Duration::from_secs(60));
        let deadline = Instant::now() + Duration::from_secs(30);
        while stats.emitted.load(Ordering::Relaxed) < records.len() as u64
            && Instant::now() < deadline
        {
            std::thread::sleep(Duration::from_millis(10));
        }
        assert_eq!(stats.dropped.load(Ordering::Relaxed), 0);
        assert_eq!(stats.emitted.load(Ordering::Relaxed), records.len() as u64);
        let text = fs::read_to_string(&path).unwrap();
        assert_eq!(text.lines().count(), records.len());
        assert!(text.ends_with('\n'));
        fs::remove_dir_all(&dir).unwrap();
    }

    fn stats_for_record() -> FlowStats {
        stats(1, 1)
    }
}
