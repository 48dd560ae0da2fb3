//! The JSON-lines sink of flow records: stdout or a size-rotated file, written on a
//! thread of its own behind a bounded queue. A slow or full sink drops records (and
//! counts them); it never stalls the daemon, let alone the datapath.

use std::{
    fs,
    io::{self, Write as _},
    path::{Path, PathBuf},
    sync::{
        Arc,
        atomic::Ordering,
        mpsc::{Receiver, SyncSender, TrySendError, sync_channel},
    },
    time::{Duration, Instant},
};

use super::{record::FlowRecord, stats::RecordStats};
use crate::config::SinkSpec;

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

#[cfg(test)]
pub mod tests {
    use visibility_common::flow::{FlowKey, FlowStats};

    use super::*;
    use crate::flows::view::{Clock, record};

    /// A UDP flow's key from `port` to 53 (the records' tests share it).
    pub fn key(port: u16) -> FlowKey {
        FlowKey {
            family: 4,
            protocol: 17,
            src_port: port,
            dst_port: 53,
            ..Default::default()
        }
    }

    /// A flow's stats: `packets` of 100 bytes since `first_seen_ns`.
    pub fn stats(packets: u64, first_seen_ns: u64) -> FlowStats {
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

    /// One packet's stats, named apart from the tests' `stats` counters.
    fn stats_for_record() -> FlowStats {
        stats(1, 1)
    }
}
