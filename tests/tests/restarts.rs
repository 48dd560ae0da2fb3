//! Restarts and upgrades of the daemon under traffic: a `kill -9` never makes the flow
//! records count the same bytes twice, and a daemon with another eBPF object replaces
//! the pinned programs in place, keeping the maps of the same layout (no connection
//! breaks) and making new ones for another layout (and saying so).
//!
//! The upgrade tests make the pinned datapath another object's by writing another
//! identity into its `VIS_OBJECT` map, as an older release would have pinned it: the
//! daemon then goes through its real replacement path with the programs of its own
//! object, which are new programs (new ids) in place of the running ones.
//!
//! **These tests need root** (network namespaces, bpffs, BPF) and the `visibility`
//! binary built (`cargo build -p visibility-userspace`). They run in parallel; each has
//! its own lab, pin directory and record file.
//!
//! Run: `cargo test -p visibility-tests --test restarts`

use std::{collections::BTreeSet, time::Duration};

use serde_json::Value;
use time::{OffsetDateTime, format_description::well_known::Rfc3339};
use visibility::{
    datapath::PinDir,
    object::{self, ObjectInfo},
};
use visibility_common::{LAYOUT_VERSION, map_names};
use visibility_tests::{
    lab::IpFamily,
    node::{Node, poll},
    records::{
        RecordFile, count, daemon_args_with_records, http_get, send_steadily, udp_stream,
        wait_for_records,
    },
    require_root,
    tcp_load::TcpLoad,
};

/// How long to wait for something that normally takes a second or two.
const WAIT: Duration = Duration::from_secs(20);
/// How long a record may take to appear: one 5 s interval, a read, and slack.
const RECORD_WAIT: Duration = Duration::from_secs(12);
/// How often the TCP conversations send a message, and how long an echo may take
/// before the connection counts as broken (a lost packet costs a 200 ms retransmission
/// at first; a broken path never recovers).
const MESSAGE_INTERVAL: Duration = Duration::from_millis(10);
const ECHO_TIMEOUT: Duration = Duration::from_secs(5);

fn node(tag: &str, pods: usize, args: Vec<String>) -> Node {
    require_root();
    let mut node = Node::new(tag, pods).expect("building the lab");
    node.capture_daemon_log();
    node.start_daemon(args).expect("starting the daemon");
    node
}

fn seconds_of(record: &Value, field: &str) -> f64 {
    let text = record[field].as_str().expect("a time");
    let time = OffsetDateTime::parse(text, &Rfc3339).unwrap_or_else(|e| panic!("{text}: {e}"));
    time.unix_timestamp_nanos() as f64 / 1e9
}

/// A steady UDP stream from pod-0 to pod-1 over several 5 s intervals, with the daemon
/// killed with SIGKILL right after it wrote an interval's records and started again,
/// then an interval later stopped with SIGTERM and started again: the records add up to
/// exactly what was sent, and no interval's rate stands out.
///
/// The kill follows a write of the record file on purpose: the counters reported are
/// pinned before the records are written (`flows/reported.rs`), so at that moment
/// nothing is pending, and the exact total is what the design promises. (A kill between
/// the pinning and the write would lose that one interval's records, never count them
/// twice; that window is not what this test aims at.)
#[test]
fn kill_9_and_sigterm_restarts_report_every_byte_once() {
    const PAYLOAD: usize = 200;
    const DATAGRAMS: usize = 500;
    const GAP: Duration = Duration::from_millis(50);
    const HEADER: usize = 20 + 8;

    let file = RecordFile::new("restart");
    let mut node = node(
        "rs-kill9",
        2,
        daemon_args_with_records(&file, &["--metrics-addr", "off"]),
    );
    let (socket, tuple, server) = udp_stream(
        &node.lab,
        0,
        1,
        IpFamily::V4,
        DATAGRAMS,
        Duration::from_secs(90),
    )
    .unwrap();
    let sender = std::thread::spawn(move || send_steadily(&socket, PAYLOAD, DATAGRAMS, GAP));

    let records_of = |file: &RecordFile| -> Vec<Value> {
        file.records()
            .unwrap()
            .into_iter()
            .filter(|r| tuple.matches(r))
            .collect()
    };
    let wait_for_record = |count: usize| {
        poll(RECORD_WAIT * 2, &format!("{count} records"), || {
            std::thread::sleep(Duration::from_millis(10));
            Ok((records_of(&file).len() >= count).then_some(()))
        })
        .unwrap();
    };
    // Two intervals' records, then the kill as soon as the second is written.
    wait_for_record(2);
    node.kill_daemon().unwrap();
    node.restart_daemon().unwrap();
    // The restarted daemon's first interval, then SIGTERM (which writes one more).
    wait_for_record(3);
    node.stop_daemon().unwrap();
    let before_last_restart = records_of(&file).len();
    node.restart_daemon().unwrap();
    sender.join().unwrap();
    assert_eq!(
        server.join().unwrap().len(),
        DATAGRAMS,
        "every datagram arrived"
    );

    let records = wait_for_records(&file, &[(tuple, DATAGRAMS as u64)], RECORD_WAIT)
        .pop()
        .unwrap();
    let what = format!("{records:#?}");
    assert!(
        records.len() > before_last_restart,
        "records after the last restart: {what}"
    );
    let sum = |field| records.iter().map(|r| count(r, field)).sum::<u64>();
    assert_eq!(sum("packets_sent"), DATAGRAMS as u64, "{what}");
    assert_eq!(
        sum("bytes_sent"),
        (DATAGRAMS * (HEADER + PAYLOAD)) as u64,
        "{what}"
    );
    // No spike: each record's rate against the median, over the records that span at
    // least a second (the first and last cover a few packets only).
    let rates: Vec<f64> = records
        .iter()
        .filter_map(|r| {
            let span = seconds_of(r, "end_time") - seconds_of(r, "start_time");
            (span >= 1.0).then(|| count(r, "bytes_sent") as f64 / span)
        })
        .collect();
    let mut sorted = rates.clone();
    sorted.sort_by(f64::total_cmp);
    let median = sorted[sorted.len() / 2];
    assert!(
        rates.iter().all(|rate| *rate <= 1.5 * median),
        "a spike: rates {rates:?} (bytes/s), median {median}: {what}"
    );
}

/// The programs attached in the node's namespace, as (interface, direction) → program id.
fn attached_programs(node: &Node) -> Vec<(String, &'static str, u32)> {
    let mut found: Vec<_> = node
        .attached_programs()
        .unwrap()
        .into_iter()
        .map(|a| (a.interface, a.direction, a.program_id))
        .collect();
    found.sort();
    found
}

fn places(programs: &[(String, &'static str, u32)]) -> BTreeSet<(String, &'static str)> {
    programs
        .iter()
        .map(|(interface, direction, _)| (interface.clone(), *direction))
        .collect()
}

/// Makes the datapath pinned under the node's pin directory look pinned by another
/// object: `change` gets the daemon's identity and returns the one to pin.
fn pin_another_identity(node: &Node, change: impl FnOnce(ObjectInfo) -> ObjectInfo) {
    let pins = PinDir::new(&node.pin_dir);
    let ours = object::pinned(&pins).expect("the daemon records its object");
    object::set_pinned(&pins, change(ours)).unwrap();
}

fn map_id(node: &Node, name: &str) -> u32 {
    let data = aya::maps::MapData::from_pin(PinDir::new(&node.pin_dir).map(name)).unwrap();
    data.info().unwrap().id()
}

/// A daemon with another object than the pinned one, started under TCP load (IPv4 and
/// IPv6): every link now runs a new program, the maps are the same ones (the flow
/// map's counts go on), and neither connection breaks.
#[test]
fn an_upgrade_under_tcp_load_breaks_no_connection() {
    let mut node = node("rs-upgrade", 2, Node::default_daemon_args());
    let loads: Vec<TcpLoad> = [IpFamily::V4, IpFamily::V6]
        .into_iter()
        .map(|family| {
            TcpLoad::start(
                node.lab.pod_ns(0),
                node.lab.pod_ns(1),
                node.lab.pod_ip(1, family),
                MESSAGE_INTERVAL,
                ECHO_TIMEOUT,
            )
            .unwrap()
        })
        .collect();
    for load in &loads {
        load.wait_for_echoes(20, WAIT).unwrap();
    }
    let before = attached_programs(&node);
    assert!(before.len() >= 4, "{before:?}");
    let flows_map = map_id(&node, map_names::FLOWS);

    node.stop_daemon().unwrap();
    pin_another_identity(&node, |ours| ObjectInfo {
        sha256: [0xa5; 32],
        ..ours
    });
    let status = node.status().unwrap();
    assert_eq!(
        status["datapath_object"]["same_as_this_binary"], false,
        "{status}"
    );
    node.restart_daemon().unwrap();
    for load in &loads {
        load.wait_for_echoes(50, WAIT).unwrap();
    }

    let after = attached_programs(&node);
    assert_eq!(places(&after), places(&before), "{before:?} → {after:?}");
    let old_ids: BTreeSet<u32> = before.iter().map(|(_, _, id)| *id).collect();
    assert!(
        after.iter().all(|(_, _, id)| !old_ids.contains(id)),
        "every attachment runs a new program: {before:?} → {after:?}"
    );
    assert_eq!(
        map_id(&node, map_names::FLOWS),
        flows_map,
        "the flow map is kept"
    );
    let status = node.status().unwrap();
    assert_eq!(status["daemon"]["origin"], "upgraded", "{status}");
    assert_eq!(
        status["datapath_object"]["same_as_this_binary"], true,
        "{status}"
    );
    assert_eq!(status["datapath_object"]["layout_version"], LAYOUT_VERSION);
    let log = node.daemon_log().unwrap();
    assert!(
        log.contains("replaced the pinned datapath's programs"),
        "{log}"
    );
    for load in loads {
        let report = load.stop().unwrap();
        assert!(report.messages >= 70, "{report:?}");
    }
}

/// A daemon whose maps' layout differs from the pinned datapath's replaces the
/// programs with new maps: the old flows are gone, the log says so, and traffic goes on
/// being judged and counted in the new maps.
#[test]
fn another_layout_makes_new_maps_and_says_so() {
    let mut node = node("rs-layout", 2, Node::default_daemon_args());
    let old_flow = http_get(&node.lab, 0, 1, IpFamily::V4).unwrap();
    let flows = node.flows(&[]).unwrap();
    assert!(!flows.is_empty(), "the exchange is counted");
    let before = attached_programs(&node);
    let flows_map = map_id(&node, map_names::FLOWS);

    node.stop_daemon().unwrap();
    pin_another_identity(&node, |ours| ObjectInfo {
        layout_version: LAYOUT_VERSION + 1,
        ..ours
    });
    node.restart_daemon().unwrap();

    let log = node.daemon_log().unwrap();
    assert!(
        log.contains("the pinned datapath's maps have another layout"),
        "{log}"
    );
    assert_ne!(map_id(&node, map_names::FLOWS), flows_map, "a new flow map");
    assert!(
        !PinDir::new(&node.pin_dir).next_maps().exists(),
        "the new maps took the old ones' place"
    );
    let status = node.status().unwrap();
    assert_eq!(status["daemon"]["origin"], "upgraded_new_maps", "{status}");
    assert_eq!(status["datapath_object"]["layout_version"], LAYOUT_VERSION);
    let after = attached_programs(&node);
    assert_eq!(places(&after), places(&before), "{before:?} → {after:?}");
    let old_ids: BTreeSet<u32> = before.iter().map(|(_, _, id)| *id).collect();
    assert!(after.iter().all(|(_, _, id)| !old_ids.contains(id)));

    let old_port = old_flow.src.port().to_string();
    let flows = node.flows(&[&format!("sport={old_port}")]).unwrap();
    assert!(flows.is_empty(), "the old flows are dropped: {flows:#?}");
    let new_flow = poll(WAIT, "a new exchange counted in the new maps", || {
        let tuple = http_get(&node.lab, 0, 1, IpFamily::V4)?;
        let port = tuple.src.port().to_string();
        let flows = node.flows(&[&format!("sport={port}")])?;
        Ok((!flows.is_empty()).then_some(flows))
    })
    .unwrap();
    assert_eq!(new_flow[0]["path"], "via_gateway", "{new_flow:#?}");
}
