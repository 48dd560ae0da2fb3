//! IPFIX export (`--ipfix HOST:PORT`, given twice) to real collectors: two `nfcapd`s from
//! Debian's `nfdump` package, listening in the lab node's namespace (one on IPv4, one on
//! IPv6 loopback), read back with `nfdump -o json` and compared with the daemon's JSON
//! records of the same intervals.
//!
//! **These tests need root** (network namespaces, bpffs, BPF), the `visibility` binary
//! built (`cargo build -p visibility-userspace`), `nfcapd` and `nfdump` (Debian package
//! `nfdump`), `iperf3`, `ss` and `curl`.
//!
//! Run: `cargo test -p visibility-tests --test ipfix`

use std::{
    collections::BTreeMap,
    net::{IpAddr, SocketAddr},
    path::PathBuf,
    process::Command,
    time::Duration,
};

use anyhow::{Context as _, Result, ensure};
use serde_json::Value;
use time::{OffsetDateTime, PrimitiveDateTime, format_description::well_known::Rfc3339};
use visibility_tests::{
    lab::{Background, IpFamily, Lab},
    node::{Node, poll},
    records::{FiveTuple, RecordFile, count, daemon_args_with_records, http_get, wait_for_records},
};

/// Where the two collectors listen, one per family, inside the node's namespace (its own,
/// so no clash).
const COLLECTORS: [&str; 2] = ["127.0.0.1:4739", "[::1]:4740"];
/// The daemon's metrics endpoint, in the node's namespace.
const METRICS_ADDR: &str = "127.0.0.1:19477";
const IPERF_PORT: u16 = 5201;
/// One 5 s interval, the read, and slack.
const RECORD_WAIT: Duration = Duration::from_secs(12);

/// nfcapd in the node's namespace, writing to a directory of its own (removed on drop).
struct Collector {
    process: Option<Background>,
    dir: PathBuf,
}

impl Collector {
    /// Starts nfcapd on `addr` (`HOST:PORT`, `[IPV6]:PORT`).
    fn start(lab: &Lab, addr: &str) -> Result<Self> {
        let addr: SocketAddr = addr.parse()?;
        let (host, port) = (addr.ip().to_string(), addr.port().to_string());
        let family = if addr.is_ipv6() { "-6" } else { "-4" };
        let dir = PathBuf::from(format!("/tmp/vis-ipfix-{}-{port}", lab.prefix()));
        let _ = std::fs::remove_dir_all(&dir);
        std::fs::create_dir_all(&dir)?;
        let dir_arg = dir.display().to_string();
        // -t: one file for the whole test; it is completed when nfcapd stops.
        let process = lab.node().spawn_process(
            "nfcapd",
            [
                "-w",
                dir_arg.as_str(),
                family,
                "-b",
                host.as_str(),
                "-p",
                port.as_str(),
                "-t",
                "3600",
            ],
        )?;
        let collector = Self {
            process: Some(process),
            dir,
        };
        poll(Duration::from_secs(5), "nfcapd listening", || {
            let sockets = lab
                .node()
                .run("ss", ["-Hlun", "sport", "=", port.as_str()])?;
            Ok((!sockets.trim().is_empty()).then_some(()))
        })?;
        Ok(collector)
    }

    /// Stops nfcapd (SIGTERM: it writes out its file) and returns every flow it kept, as
    /// `nfdump -r FILE -o json` prints them.
    fn stop_and_read(&mut self) -> Result<Vec<Value>> {
        if let Some(process) = self.process.take() {
            process.terminate(Duration::from_secs(5))?;
        }
        let file = std::fs::read_dir(&self.dir)?
            .filter_map(Result::ok)
            .map(|entry| entry.path())
            .find(|path| {
                path.file_name()
                    .and_then(|n| n.to_str())
                    .is_some_and(|n| n.starts_with("nfcapd.2"))
            })
            .with_context(|| format!("no nfcapd file in {}", self.dir.display()))?;
        let output = Command::new("nfdump")
            .env("TZ", "UTC")
            .arg("-r")
            .arg(&file)
            .args(["-o", "json"])
            .output()
            .context("running nfdump (Debian package nfdump)")?;
        ensure!(
            output.status.success(),
            "nfdump: {}",
            String::from_utf8_lossy(&output.stderr)
        );
        let text = String::from_utf8(output.stdout)?;
        let flows: Value =
            serde_json::from_str(&text).with_context(|| format!("nfdump's JSON: {text}"))?;
        flows
            .as_array()
            .cloned()
            .with_context(|| format!("nfdump's JSON is not a list: {text}"))
    }
}

impl Drop for Collector {
    fn drop(&mut self) {
        drop(self.process.take());
        let _ = std::fs::remove_dir_all(&self.dir);
    }
}

/// A flow's 5-tuple as nfdump prints it.
fn nfdump_tuple(flow: &Value) -> Option<FiveTuple> {
    let addr = |name: &str| -> Option<IpAddr> {
        ["4", "6"]
            .iter()
            .find_map(|family| flow[format!("{name}{family}_addr")].as_str())?
            .parse()
            .ok()
    };
    let port = |name: &str| u16::try_from(flow[name].as_u64()?).ok();
    Some(FiveTuple {
        src: SocketAddr::new(addr("src")?, port("src_port")?),
        dst: SocketAddr::new(addr("dst")?, port("dst_port")?),
        protocol: u8::try_from(flow["proto"].as_u64()?).ok()?,
    })
}

fn json_tuple(record: &Value) -> Option<FiveTuple> {
    let c = &record["connection"];
    let end = |ip: &str, port: &str| -> Option<SocketAddr> {
        Some(SocketAddr::new(
            c[ip].as_str()?.parse().ok()?,
            u16::try_from(c[port].as_u64()?).ok()?,
        ))
    };
    Some(FiveTuple {
        src: end("src_ip", "src_port")?,
        dst: end("dest_ip", "dest_port")?,
        protocol: u8::try_from(c["protocol"].as_u64()?).ok()?,
    })
}

/// What one record says of one flow's interval.
#[derive(Clone, Debug, PartialEq, Eq, PartialOrd, Ord)]
struct Interval {
    packets: u64,
    bytes: u64,
    /// First and last packet, Unix milliseconds.
    first_ms: i128,
    last_ms: i128,
    /// The interfaces the flow entered and left the node on.
    input_ifindex: u64,
    output_ifindex: u64,
}

/// Each flow's intervals, sorted, keyed by a printable 5-tuple.
type PerInterval = BTreeMap<String, Vec<Interval>>;

/// Unix milliseconds of a JSON record's RFC 3339 time.
fn json_ms(text: &str) -> i128 {
    OffsetDateTime::parse(text, &Rfc3339)
        .unwrap_or_else(|e| panic!("{text:?}: {e}"))
        .unix_timestamp_nanos()
        / 1_000_000
}

/// Unix milliseconds of nfdump's time (`2026-12-03T21:50:45.954`, in UTC as it runs here).
fn nfdump_ms(text: &str) -> i128 {
    let format = time::macros::format_description!(
        "[year]-[month]-[day]T[hour]:[minute]:[second].[subsecond digits:3]"
    );
    PrimitiveDateTime::parse(text, format)
        .unwrap_or_else(|e| panic!("{text:?}: {e}"))
        .assume_utc()
        .unix_timestamp_nanos()
        / 1_000_000
}

fn key(tuple: &FiveTuple) -> String {
    format!("{} {} -> {}", tuple.protocol, tuple.src, tuple.dst)
}

/// The intervals of each flow a collector kept, sorted.
fn collected(flows: &[Value]) -> PerInterval {
    let mut collected = PerInterval::new();
    for flow in flows {
        let Some(tuple) = nfdump_tuple(flow) else {
            continue;
        };
        let number = |field: &str| flow[field].as_u64().unwrap_or_default();
        collected.entry(key(&tuple)).or_default().push(Interval {
            packets: number("in_packets"),
            bytes: number("in_bytes"),
            first_ms: nfdump_ms(flow["first"].as_str().unwrap_or_default()),
            last_ms: nfdump_ms(flow["last"].as_str().unwrap_or_default()),
            input_ifindex: number("input_snmp"),
            output_ifindex: number("output_snmp"),
        });
    }
    for per_interval in collected.values_mut() {
        per_interval.sort_unstable();
    }
    collected
}

/// A TCP transfer of a second with iperf3 from Pod `from` to Pod `to`: its client-to-server
/// data connection is one flow (and iperf3's control connection another).
fn iperf(lab: &Lab, from: usize, to: usize, family: IpFamily) -> Result<()> {
    let server_ip = lab.pod_ip(to, family).to_string();
    let port = IPERF_PORT.to_string();
    let _server = lab.pod_ns(to).spawn_process(
        "iperf3",
        ["-s", "-1", "-B", server_ip.as_str(), "-p", port.as_str()],
    )?;
    poll(Duration::from_secs(5), "iperf3 listening", || {
        let sockets = lab.pod_ns(to).run("ss", ["-Hltn", "sport", "=", &port])?;
        Ok((!sockets.trim().is_empty()).then_some(()))
    })?;
    lab.pod_ns(from).run(
        "iperf3",
        [
            "-c",
            server_ip.as_str(),
            "-p",
            port.as_str(),
            "-t",
            "1",
            "--connect-timeout",
            "3000",
        ],
    )?;
    Ok(())
}

/// After an HTTP request and an iperf3 transfer from pod-0 to pod-1 in each family, each
/// of the two collectors holds every flow the JSON records hold, with the same 5-tuple and, in each
/// interval, the same packets, bytes, first and last packet (to the millisecond) and
/// interfaces. Then, with the collector stopped, the daemon goes
/// on and counts export errors, in `/metrics` and in `status --json`.
#[test]
fn two_real_collectors_get_the_json_records_flows_and_counts() {
    assert!(
        nix::unistd::geteuid().is_root(),
        "the IPFIX test needs root (network namespaces, bpffs, BPF)"
    );
    let file = RecordFile::new("ipfix");
    let mut node = Node::new("ipfix", 2).expect("building the lab");
    node.capture_daemon_log();
    let mut collectors: Vec<Collector> = COLLECTORS
        .iter()
        .map(|addr| Collector::start(&node.lab, addr).expect("starting nfcapd"))
        .collect();
    let args = daemon_args_with_records(
        &file,
        &[
            "--ipfix",
            COLLECTORS[0],
            "--ipfix",
            COLLECTORS[1],
            "--metrics-addr",
            METRICS_ADDR,
        ],
    );
    node.start_daemon(args).expect("starting the daemon");
    let lab = &node.lab;

    let mut http = Vec::new();
    for family in [IpFamily::V4, IpFamily::V6] {
        http.push(http_get(lab, 0, 1, family).unwrap());
        iperf(lab, 0, 1, family).unwrap();
    }
    // Every HTTP tuple has records; then one more interval, so that the last packets of
    // every flow (iperf3's too) have been read, written and exported.
    wait_for_records(
        &file,
        &http.iter().map(|t| (*t, 1)).collect::<Vec<_>>(),
        RECORD_WAIT,
    );
    std::thread::sleep(Duration::from_millis(5_500));
    let records = file.records().unwrap();

    let ifindex = |name: &Value| -> u64 {
        (0..lab.pod_count())
            .find(|i| name == lab.pod_host_ifname(*i))
            .map_or(0, |i| u64::from(lab.pod_host_ifindex(i)))
    };
    let mut json = PerInterval::new();
    for record in &records {
        let tuple = json_tuple(record).unwrap_or_else(|| panic!("record {record}"));
        json.entry(key(&tuple)).or_default().push(Interval {
            packets: count(record, "packets_sent"),
            bytes: count(record, "bytes_sent"),
            first_ms: json_ms(record["start_time"].as_str().unwrap_or_default()),
            last_ms: json_ms(record["end_time"].as_str().unwrap_or_default()),
            input_ifindex: ifindex(&record["src_interface"]),
            output_ifindex: ifindex(&record["dest_interface"]),
        });
    }
    for per_interval in json.values_mut() {
        per_interval.sort_unstable();
    }
    let what = format!("JSON records: {json:#?}");
    // Both families, HTTP and iperf3 (its control and data connections).
    for family in [IpFamily::V4, IpFamily::V6] {
        for port in [8080, IPERF_PORT] {
            let server = SocketAddr::new(lab.pod_ip(1, family), port);
            assert!(
                json.keys()
                    .any(|k| k.starts_with("6 ") && k.ends_with(&format!(" -> {server}"))),
                "no TCP record to {server}: {what}"
            );
        }
    }
    for tuple in &http {
        assert!(json.contains_key(&key(tuple)), "{tuple:?}: {what}");
        assert!(
            json.contains_key(&key(&tuple.reversed())),
            "{tuple:?}: {what}"
        );
    }
    // Each collector got them all, with the same counts, times and interfaces.
    for (addr, collector) in COLLECTORS.iter().zip(&mut collectors) {
        let flows = collector.stop_and_read().unwrap();
        assert_eq!(json, collected(&flows), "{addr}: nfdump: {flows:#?}");
    }

    // The collectors are gone: the daemon goes on, and counts what it could not send (the
    // port unreachable that a send brings back, at the next interval).
    lab.pod_ns(0).ping(lab.pod_ipv4(1), 2).unwrap();
    let status = node
        .wait_for(2 * RECORD_WAIT, |status| {
            let errors = status["daemon"]["records"]["ipfix_export_errors"].as_u64()?;
            (errors > 0).then(|| status.clone())
        })
        .unwrap();
    assert_eq!(
        status["daemon"]["ipfix_collectors"],
        serde_json::json!(COLLECTORS),
        "{status}"
    );
    let metrics = lab
        .node()
        .run(
            "curl",
            [
                "--silent",
                "--fail",
                &format!("http://{METRICS_ADDR}/metrics"),
            ],
        )
        .unwrap();
    let errors = metrics
        .lines()
        .find_map(|l| l.strip_prefix("visibility_ipfix_export_errors_total "))
        .and_then(|v| v.parse::<f64>().ok());
    assert!(errors.is_some_and(|e| e > 0.0), "{metrics}");
    assert!(node.daemon_running(), "the daemon stopped");
}
