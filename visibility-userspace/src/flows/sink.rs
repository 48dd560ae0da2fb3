//! The JSON-lines sink of flow records: stdout or a record file ([`RecordFile`]:
//! rotated by size, opened anew when moved away), written on a thread of its own behind
//! a bounded queue. A slow or full sink drops records, and a failed write (a full disk)
//! drops the records it did not write whole: each counted as dropped, never as
//! emitted. It never stalls the daemon, let alone the datapath. [`Sink::finish`]
//! writes what is queued before the daemon exits.

use std::{
    io::{self, Write as _},
    sync::{
        Arc,
        atomic::Ordering,
        mpsc::{Receiver, SyncSender, TrySendError, sync_channel},
    },
    thread::JoinHandle,
    time::{Duration, Instant},
};

use super::{
    record::FlowRecord,
    record_file::{RecordFile, Written, write_counted},
    stats::RecordStats,
};
use crate::config::SinkSpec;

/// The writing end of the sink: a bounded queue to the writer thread.
pub struct Sink {
    sender: Option<SyncSender<String>>,
    writer: Option<JoinHandle<()>>,
    stats: Arc<RecordStats>,
}

/// Lines the queue holds before records are dropped.
const QUEUE: usize = 65_536;
/// Lines written with one write: a burst's worth.
const BATCH: usize = 4096;

/// Where the lines go.
enum Output {
    Stdout,
    File(RecordFile),
}

impl Sink {
    pub fn start(spec: SinkSpec, stats: Arc<RecordStats>) -> io::Result<Self> {
        let output = match spec {
            SinkSpec::Off => None,
            SinkSpec::Stdout => Some(Output::Stdout),
            SinkSpec::File {
                path,
                max_bytes,
                keep,
            } => Some(Output::File(RecordFile::open(path, max_bytes, keep)?)),
        };
        let Some(output) = output else {
            return Ok(Self {
                sender: None,
                writer: None,
                stats,
            });
        };
        let (sender, receiver) = sync_channel::<String>(QUEUE);
        let thread_stats = stats.clone();
        let writer = std::thread::Builder::new()
            .name("flow-records".into())
            .spawn(move || write_lines(&receiver, output, &thread_stats))?;
        Ok(Self {
            sender: Some(sender),
            writer: Some(writer),
            stats,
        })
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
            // Counted before the writer can take it, so the count never goes below zero.
            self.stats.queued.fetch_add(1, Ordering::Relaxed);
            loop {
                match sender.try_send(line) {
                    Ok(()) => break,
                    Err(TrySendError::Full(back)) if Instant::now() < deadline => {
                        line = back;
                        std::thread::sleep(Duration::from_millis(1));
                    }
                    Err(TrySendError::Full(_) | TrySendError::Disconnected(_)) => {
                        self.stats.queued.fetch_sub(1, Ordering::Relaxed);
                        let lost = (records.len() - sent) as u64;
                        self.stats.dropped.fetch_add(lost, Ordering::Relaxed);
                        return;
                    }
                }
            }
        }
    }

    /// Closes the queue and waits until `deadline` for the writer to write what is in
    /// it; what a stuck sink (a pipe nobody reads) still holds then is counted as
    /// dropped.
    pub fn finish(mut self, deadline: Instant) {
        drop(self.sender.take());
        let Some(writer) = self.writer.take() else {
            return;
        };
        while !writer.is_finished() && Instant::now() < deadline {
            std::thread::sleep(Duration::from_millis(5));
        }
        if writer.is_finished() {
            let _ = writer.join();
        } else {
            let lost = self.stats.queued.swap(0, Ordering::Relaxed);
            self.stats.dropped.fetch_add(lost, Ordering::Relaxed);
            tracing::warn!(
                lost,
                "the flow record sink did not take the last records in time; they are dropped"
            );
        }
    }
}

/// The writer thread: writes what is queued in batches, counts each line as emitted or
/// dropped, and logs when writing starts and stops failing.
fn write_lines(receiver: &Receiver<String>, mut output: Output, stats: &RecordStats) {
    let mut failing = false;
    let mut lines = Vec::with_capacity(BATCH);
    // Ends when the queue is closed and drained.
    while let Ok(first) = receiver.recv() {
        lines.push(first);
        lines.extend(receiver.try_iter().take(BATCH - 1));
        let written = match &mut output {
            Output::Stdout => {
                let (chunk, ends) = joined(&lines);
                let mut stdout = io::stdout().lock();
                let (written, _) = write_counted(&mut stdout, &chunk, &ends);
                let _ = stdout.flush();
                written
            }
            Output::File(file) => {
                reopen_if_moved(file, stats);
                file.write_lines(&lines)
            }
        };
        count(&written, lines.len(), stats, &mut failing);
        stats
            .queued
            .fetch_sub(lines.len() as u64, Ordering::Relaxed);
        lines.clear();
    }
}

/// The lines with a newline each, and where each ends.
fn joined(lines: &[String]) -> (Vec<u8>, Vec<usize>) {
    let mut chunk = Vec::with_capacity(lines.iter().map(|l| l.len() + 1).sum());
    let mut ends = Vec::with_capacity(lines.len());
    for line in lines {
        chunk.extend_from_slice(line.as_bytes());
        chunk.push(b'\n');
        ends.push(chunk.len());
    }
    (chunk, ends)
}

/// Checks, once a batch, whether logrotate (or anyone) moved the file away.
fn reopen_if_moved(file: &mut RecordFile, stats: &RecordStats) {
    match file.reopen_if_moved() {
        Ok(false) => {}
        Ok(true) => {
            stats.file_reopens.fetch_add(1, Ordering::Relaxed);
            tracing::info!(
                path = %file.path().display(),
                "the flow record file was moved away (rotated by another program); writing to a new file at its path"
            );
        }
        Err(error) => tracing::warn!(
            %error,
            path = %file.path().display(),
            "checking whether the flow record file was moved away"
        ),
    }
}

/// Counts a batch's lines as emitted or dropped, and a failed write as a write error,
/// logged when writing starts to fail and when it works again.
fn count(written: &Written, batch: usize, stats: &RecordStats, failing: &mut bool) {
    stats
        .emitted
        .fetch_add(written.lines as u64, Ordering::Relaxed);
    let dropped = (batch - written.lines) as u64;
    stats.dropped.fetch_add(dropped, Ordering::Relaxed);
    match &written.error {
        Some(error) => {
            stats.write_errors.fetch_add(1, Ordering::Relaxed);
            if !*failing {
                tracing::warn!(
                    %error,
                    dropped,
                    "writing flow records failed; records are dropped (and counted) until a write succeeds"
                );
            }
            *failing = true;
        }
        None if *failing => {
            tracing::info!("writing flow records works again");
            *failing = false;
        }
        None => {}
    }
}

#[cfg(test)]
pub mod tests {
    use visibility_common::flow::{FlowKey, FlowStats};

    use std::fs;

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
    fn a_full_queue_drops_and_counts_at_the_deadline() {
        let stats = Arc::new(RecordStats::default());
        let (sender, _receiver) = sync_channel::<String>(1);
        let sink = Sink {
            sender: Some(sender),
            writer: None,
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
