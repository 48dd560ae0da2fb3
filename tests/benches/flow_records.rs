//! What one flow-record interval costs the daemon at 10k, 100k and 1M flows: reading the
//! whole flow map (`BPF_MAP_LOOKUP_BATCH`), turning it into per-interval records
//! (`Aggregator::interval`) and serializing every record as the sink does (one JSON line
//! per record, through a `BufWriter`, to `/dev/null`), with the process's memory after
//! each size.
//!
//! **Needs root** (loading BPF, pinning on bpffs). Without root it says so and exits
//! successfully. It loads the datapath with a 1.1M-entry flow map under a pin directory
//! of its own (`/sys/fs/bpf/vis-bench-records-<pid>`, removed at the end, or by the next
//! run if this one was killed), attaches nothing, and fills the map from user space with
//! synthetic flows (three in four IPv4, one in four IPv6).
//!
//! Run: `cargo bench -p visibility-tests --bench flow_records [-- --json]`; with `--json`
//! (as `cargo xtask bench` runs it) the tables go to standard error and a JSON document
//! with the same figures to standard output.
//!
//! Columns: `read` is one full read of the map; `aggregate` one `Aggregator::interval`
//! over it with a fresh aggregator, so every flow yields a record (the worst interval:
//! every flow saw traffic); `emit` serializing and writing those records; `total` the
//! three; `idle` the next interval when no flow moved (read and aggregate, no records).
//! Times are the median of three samples. RSS and its peak (HWM) are read from
//! `/proc/self/status` after each size, with the aggregator's state (one entry per flow,
//! as the daemon keeps it) alive and the records freed.

use std::{
    fs::File,
    io::{BufWriter, Write as _},
    path::{Path as FsPath, PathBuf},
    sync::{Arc, atomic::Ordering},
    time::{Duration, Instant},
};

use anyhow::{Context as _, Result, ensure};
use aya::maps::{HashMap, Map, MapData};
use visibility::{
    config::SinkSpec,
    datapath::{Datapath, LoadOptions, PinDir, remove_pins},
    flows::{
        batch::read_flows,
        record::FlowRecord,
        records::Aggregator,
        sink::Sink,
        stats::RecordStats,
        view::{Clock, interface_names},
    },
    maps::Maps,
};
use visibility_common::{
    flow::{FlowKey, FlowStats, Path},
    map_names,
};
use visibility_tests::measure::{memory_mib, ms};

/// Entries of the flow map: room for the largest size, so the LRU evicts nothing.
const CAPACITY: u32 = 1_100_000;
const SIZES: [usize; 3] = [10_000, 100_000, 1_000_000];
const SAMPLES: usize = 3;
const PIN_PREFIX: &str = "vis-bench-records-";
const NODE_NAME: &str = "bench-node";

/// The bench's pin directory, removed on drop.
struct Pins(PathBuf);

impl Drop for Pins {
    fn drop(&mut self) {
        if let Err(error) = remove_pins(&PinDir::new(&self.0), |_| None) {
            eprintln!("removing {}: {error}", self.0.display());
        }
    }
}

/// Removes pin directories of earlier runs whose process is gone.
fn remove_stale_pins() {
    let Ok(entries) = std::fs::read_dir("/sys/fs/bpf") else {
        return;
    };
    for entry in entries.filter_map(Result::ok) {
        let name = entry.file_name().to_string_lossy().into_owned();
        let Some(pid) = name.strip_prefix(PIN_PREFIX) else {
            continue;
        };
        if pid.parse::<u32>().is_ok() && !FsPath::new(&format!("/proc/{pid}")).exists() {
            let _ = remove_pins(&PinDir::new(entry.path()), |_| None);
        }
    }
}

/// Synthetic flow `i`: distinct keys, Pod-to-Pod through the gateway, on `lo` (ifindex 1,
/// so interface names resolve as they do on a node).
fn flow(i: usize, now_ns: u64) -> (FlowKey, FlowStats) {
    let n = i as u32;
    let mut key = FlowKey {
        src_port: 1024 + (i % 50_000) as u16,
        dst_port: 8080,
        protocol: if i.is_multiple_of(2) { 6 } else { 17 },
        ..FlowKey::default()
    };
    if i % 4 == 3 {
        key.family = 6;
        key.src_addr = [0xfd, 0, 0, 0x52, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0];
        key.src_addr[12..].copy_from_slice(&n.to_be_bytes());
        key.dst_addr = [0xfd, 0, 0, 0x52, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 3];
    } else {
        key.family = 4;
        let b = n.to_be_bytes();
        key.src_addr[..4].copy_from_slice(&[10, b[1], b[2], b[3]]);
        key.dst_addr[..4].copy_from_slice(&[10, 52, 0, 3]);
    }
    let packets = 1 + (i % 100) as u64;
    let stats = FlowStats {
        packets,
        bytes: packets * 700,
        returned_packets: packets,
        returned_bytes: packets * 700,
        first_seen_ns: now_ns.saturating_sub(4_000_000_000),
        last_seen_ns: now_ns,
        ingress_ifindex: 1,
        egress_ifindex: 1,
        tcp_flags: if key.protocol == 6 { 0x1b } else { 0 },
        path: Path::ViaGateway as u8,
        ..FlowStats::default()
    };
    (key, stats)
}

fn median(mut samples: Vec<Duration>) -> Duration {
    samples.sort();
    samples[samples.len() / 2]
}

/// One sample of a full interval: read, aggregate with a fresh aggregator, emit. Returns
/// the three times, the records emitted and the aggregator (its state, as the daemon
/// keeps it till the next interval).
fn interval(
    maps: &Maps,
    out: &mut File,
) -> Result<(Duration, Duration, Duration, usize, Aggregator)> {
    let started = Instant::now();
    let entries = read_flows(maps.flows());
    let read = started.elapsed();

    let started = Instant::now();
    let mut aggregator = Aggregator::default();
    let (records, evicted) = records_now(&mut aggregator, &entries);
    let aggregate = started.elapsed();
    ensure!(evicted == 0, "a fresh aggregator saw {evicted} evictions");
    ensure!(
        records.len() == entries.len(),
        "{} records for {} flows",
        records.len(),
        entries.len()
    );

    // As the sink does: `serde_json::to_string` in the reader, a `BufWriter` in the
    // writer, flushed once per interval.
    let started = Instant::now();
    let mut writer = BufWriter::new(out);
    for record in &records {
        let line = serde_json::to_string(record)?;
        writeln!(writer, "{line}")?;
    }
    writer.flush()?;
    let emit = started.elapsed();
    let count = records.len();
    drop(records);
    Ok((read, aggregate, emit, count, aggregator))
}

/// The next interval when nothing moved: read and aggregate, no records.
fn idle_interval(maps: &Maps, aggregator: &mut Aggregator) -> Result<Duration> {
    let started = Instant::now();
    let entries = read_flows(maps.flows());
    let (records, _) = records_now(aggregator, &entries);
    let elapsed = started.elapsed();
    ensure!(
        records.is_empty(),
        "{} records in an interval without traffic",
        records.len()
    );
    Ok(elapsed)
}

/// Every flow's record, from a fresh aggregator.
fn all_records(maps: &Maps) -> Vec<FlowRecord> {
    records_now(&mut Aggregator::default(), &read_flows(maps.flows())).0
}

/// The records of the interval that ends now, as the daemon's reader makes them
/// (interface names read once; no Kubernetes API, so no Pod names).
fn records_now(
    aggregator: &mut Aggregator,
    entries: &[(FlowKey, FlowStats)],
) -> (Vec<FlowRecord>, u64) {
    let clock = Clock::now();
    let names = interface_names();
    let name_of = |ifindex: u32| names.get(&ifindex).cloned();
    aggregator.interval(
        entries,
        &clock,
        clock.datapath_now(),
        NODE_NAME,
        &name_of,
        &visibility::kubernetes::PodNames::default(),
    )
}

/// Hands one interval's records to the daemon's own sink, writing to a file on tmpfs
/// (`/dev/shm`, rotated at 64 MiB, one rotated file kept): how long `Sink::send` takes
/// and how many records its bounded queue takes or drops when a whole interval arrives
/// at once. Waits for the writer to drain before it returns.
fn through_the_sink(records: &[FlowRecord]) -> Result<(Duration, u64, u64, Duration)> {
    let dir = PathBuf::from(format!("/dev/shm/{PIN_PREFIX}{}", std::process::id()));
    let _ = std::fs::remove_dir_all(&dir);
    let stats = Arc::new(RecordStats::default());
    let sink = Sink::start(
        SinkSpec::File {
            path: dir.join("flows.jsonl"),
            max_bytes: 64 << 20,
            keep: 1,
        },
        stats.clone(),
    )?;
    let started = Instant::now();
    sink.send(records, Instant::now() + Duration::from_secs(600));
    let send = started.elapsed();
    // Dropping the sender lets the writer finish the queue and end; wait until the files
    // stop growing.
    drop(sink);
    let size = || -> u64 {
        std::fs::read_dir(&dir)
            .map(|entries| {
                entries
                    .filter_map(Result::ok)
                    .filter_map(|e| e.metadata().ok())
                    .map(|m| m.len())
                    .sum()
            })
            .unwrap_or(0)
    };
    let mut last = size();
    loop {
        std::thread::sleep(Duration::from_millis(200));
        let now = size();
        if now == last {
            break;
        }
        last = now;
    }
    let drained = started.elapsed().saturating_sub(Duration::from_millis(200));
    std::fs::remove_dir_all(&dir)?;
    Ok((
        send,
        stats.emitted.load(Ordering::Relaxed),
        stats.dropped.load(Ordering::Relaxed),
        drained,
    ))
}

fn main() -> Result<()> {
    let json = std::env::args().any(|arg| arg == "--json");
    let mut table: Box<dyn std::io::Write> = if json {
        Box::new(std::io::stderr())
    } else {
        Box::new(std::io::stdout())
    };
    if !nix::unistd::geteuid().is_root() {
        const WHY: &str = "needs root (BPF, bpffs)";
        writeln!(table, "flow_records: {WHY}; skipped")?;
        if json {
            println!("{}", serde_json::json!({ "skipped": WHY }));
        }
        return Ok(());
    }
    remove_stale_pins();
    let dir = PathBuf::from(format!("/sys/fs/bpf/{PIN_PREFIX}{}", std::process::id()));
    let pins_guard = Pins(dir.clone());
    let (datapath, _) = Datapath::open(
        &dir,
        &LoadOptions {
            flow_capacity: CAPACITY,
            ..LoadOptions::default()
        },
    )
    .context("loading the datapath")?;
    let maps = Maps::open(datapath.pins()).context("opening the maps")?;
    ensure!(
        maps.flow_capacity() == CAPACITY,
        "flow map capacity {}",
        maps.flow_capacity()
    );
    // `Maps` hands out the flow map for reading only; open the pin again to write.
    let pinned = MapData::from_pin(datapath.pins().map(map_names::FLOWS))
        .context("opening the pinned flow map")?;
    let mut flows: HashMap<MapData, FlowKey, FlowStats> =
        HashMap::try_from(Map::from_map_data(pinned).context("the flow map")?)
            .context("the flow map as a hash map")?;
    let mut out = File::options().write(true).open("/dev/null")?;

    writeln!(
        table,
        "flow records: one interval over N flows (median of {SAMPLES}); flow map capacity {CAPACITY}\n"
    )?;
    writeln!(
        table,
        "{:>9}  {:>8}  {:>9}  {:>12}  {:>8}  {:>17}  {:>10}  {:>8}  {:>9}  {:>9}",
        "flows",
        "fill s",
        "read ms",
        "aggregate ms",
        "emit ms",
        "aggregate+emit ms",
        "total ms",
        "idle ms",
        "RSS MiB",
        "HWM MiB"
    )?;
    let mut filled = 0;
    let mut sink_rows = Vec::new();
    let mut json_rows = Vec::new();
    for size in SIZES {
        let now_ns = Clock::now().datapath_now();
        let started = Instant::now();
        for i in filled..size {
            let (key, stats) = flow(i, now_ns);
            flows
                .insert(key, stats, 0)
                .with_context(|| format!("inserting flow {i}"))?;
        }
        let fill = started.elapsed();
        filled = size;

        let (mut reads, mut aggregates, mut emits, mut totals) =
            (Vec::new(), Vec::new(), Vec::new(), Vec::new());
        let mut kept = None;
        for _ in 0..SAMPLES {
            // Free the previous sample's state before the next one builds its own.
            drop(kept.take());
            let (read, aggregate, emit, count, aggregator) = interval(&maps, &mut out)?;
            ensure!(
                count == size,
                "{count} records from a map of {size} flows (evicted by the LRU?)"
            );
            reads.push(read);
            aggregates.push(aggregate);
            emits.push(emit);
            totals.push(read + aggregate + emit);
            kept = Some(aggregator);
        }
        let mut aggregator = kept.expect("at least one sample");
        let idle = idle_interval(&maps, &mut aggregator)?;
        let (rss, hwm) = memory_mib("self");
        let aggregate_emit: Vec<Duration> = aggregates
            .iter()
            .zip(&emits)
            .map(|(a, e)| *a + *e)
            .collect();
        let (read, aggregate, emit) =
            (ms(median(reads)), ms(median(aggregates)), ms(median(emits)));
        let total = ms(median(totals));
        writeln!(
            table,
            "{:>9}  {:>8.2}  {:>9.1}  {:>12.1}  {:>8.1}  {:>17.1}  {:>10.1}  {:>8.1}  {:>9.0}  {:>9.0}",
            size,
            fill.as_secs_f64(),
            read,
            aggregate,
            emit,
            ms(median(aggregate_emit)),
            total,
            ms(idle),
            rss,
            hwm
        )?;
        drop(aggregator);

        let records = all_records(&maps);
        let (send, queued, dropped, drained) = through_the_sink(&records)?;
        sink_rows.push((size, send, queued, dropped, drained));
        json_rows.push(serde_json::json!({
            "flows": size,
            "read_ms": read,
            "aggregate_ms": aggregate,
            "emit_ms": emit,
            "total_ms": total,
            "idle_ms": ms(idle),
            "rss_mib": rss,
            "hwm_mib": hwm,
            "sink": {
                "send_ms": ms(send),
                "queued": queued,
                "dropped": dropped,
                "drained_ms": ms(drained),
            },
        }));
    }
    writeln!(
        table,
        "\nfill: inserting the new flows from user space, one BPF_MAP_UPDATE_ELEM each (not part of an interval)."
    )?;
    writeln!(
        table,
        "\nThe daemon's own sink (Sink::send of one interval's records at once; writer to a file on /dev/shm):\n"
    )?;
    writeln!(
        table,
        "{:>9}  {:>8}  {:>9}  {:>9}  {:>10}",
        "records", "send ms", "queued", "dropped", "drained ms"
    )?;
    for (size, send, queued, dropped, drained) in sink_rows {
        writeln!(
            table,
            "{:>9}  {:>8.1}  {:>9}  {:>9}  {:>10.1}",
            size,
            ms(send),
            queued,
            dropped,
            ms(drained)
        )?;
    }
    if json {
        let document = serde_json::json!({
            "method": "one flow-record interval over a full flow map, every flow moved: read (BPF_MAP_LOOKUP_BATCH), aggregate into records, emit (one JSON line per record, buffered, to /dev/null); times are medians of `samples`; RSS and HWM of the process afterwards, with the aggregator's state alive; `sink` hands one interval's records to the daemon's own sink at once",
            "flow_map_capacity": CAPACITY,
            "samples": SAMPLES,
            "sizes": json_rows,
        });
        println!("{}", serde_json::to_string_pretty(&document)?);
    }
    drop(flows);
    drop(maps);
    drop(datapath);
    drop(pins_guard);
    Ok(())
}
