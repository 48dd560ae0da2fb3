//! Restarts and upgrades of the daemon under traffic: a `kill -9` never makes the flow
//! records count the same bytes twice (a UDP stream, exactly; a steady iperf3 TCP flow,
//! within 2% and without a spike), and a daemon with another eBPF object replaces the
//! pinned programs in place, keeping the maps of the same layout (no connection
//! breaks) and making new ones for another layout (and saying so).
//!
//! The upgrade under load runs the daemon first with another build of the datapath
//! (`--ebpf-object`: visibility-ebpf with its feature `upgrade-test`, which tests/build.rs
//! builds; its `pod_ingress` is other code with the same behaviour), then with its own:
//! the kernel's tag of `pod_ingress`, a hash of its instructions, shows the code changed.
//! The test of another layout writes another layout version into the pinned
//! `VIS_OBJECT` map, as an older release would have pinned it.
//!
//! **These tests need root** (network namespaces, bpffs, BPF), `iperf3` and `ss`, and
//! the `visibility` binary built (`cargo build -p visibility-userspace`). They run in
//! parallel; each has its own lab, pin directory and record file.
//!
//! Run: `cargo test -p visibility-tests --test restarts`

use std::{collections::BTreeSet, process::Stdio, time::Duration};

use serde_json::Value;
use time::{OffsetDateTime, format_description::well_known::Rfc3339};
use visibility::{
    datapath::PinDir,
    object::{self, ObjectInfo},
};
use visibility_common::{LAYOUT_VERSION, map_names, program_names};
use visibility_tests::{
    lab::{Background, IpFamily, POD_IFNAME},
    node::{Node, poll},
    records::{
        FiveTuple, RecordFile, count, daemon_args_with_records, http_get, send_steadily, totals,
        udp_stream, wait_for_records,
    },
    require_root,
    tcp_load::TcpLoad,
    unique::TempFile,
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

/// The upgrade test's other build of the datapath: visibility-ebpf with its feature
/// `upgrade-test`, built by tests/build.rs (empty with AYA_BUILD_SKIP=1).
static OTHER_OBJECT: &[u8] = include_bytes!(concat!(env!("OUT_DIR"), "/visibility-datapath"));

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

/// The records of `tuple` in `file` so far.
fn records_of(file: &RecordFile, tuple: FiveTuple) -> Vec<Value> {
    file.records()
        .unwrap()
        .into_iter()
        .filter(|r| tuple.matches(r))
        .collect()
}

/// While `tuple`'s flow runs: the daemon killed with SIGKILL right after it wrote the
/// flow's second record and started again, then, once the restarted daemon wrote one,
/// stopped with SIGTERM (which writes one more) and started again. Returns how many
/// records of the flow there were before the last start.
///
/// The kill follows a write of the record file on purpose: the counters reported are
/// pinned before the records are written (`flows/reported.rs`), so at that moment
/// nothing is pending, and every byte is to be reported once. (A kill between the
/// pinning and the write would lose that one interval's records, never count them
/// twice; that window is not what these tests aim at.)
fn kill_and_stop_mid_flow(node: &mut Node, file: &RecordFile, tuple: FiveTuple) -> usize {
    let wait_for_record = |count: usize| {
        poll(RECORD_WAIT * 2, &format!("{count} records"), || {
            std::thread::sleep(Duration::from_millis(10));
            Ok((records_of(file, tuple).len() >= count).then_some(()))
        })
        .unwrap();
    };
    wait_for_record(2);
    node.kill_daemon().unwrap();
    node.restart_daemon().unwrap();
    wait_for_record(3);
    node.stop_daemon().unwrap();
    let before_last_start = records_of(file, tuple).len();
    node.restart_daemon().unwrap();
    before_last_start
}

/// No spike: each record's rate against the median, over the records that span at
/// least a second (the first and last may cover a few packets only). A restarted daemon
/// that reported a flow's running totals again would stand out several times over.
fn assert_no_spike(records: &[Value]) {
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
        "a spike: rates {rates:?} (bytes/s), median {median}: {records:#?}"
    );
}

/// A steady UDP stream from pod-0 to pod-1 over several 5 s intervals, with the daemon
/// killed with SIGKILL and started again, then stopped with SIGTERM and started again
/// ([`kill_and_stop_mid_flow`]): the records add up to exactly what was sent, and no
/// interval's rate stands out.
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
    let before_last_start = kill_and_stop_mid_flow(&mut node, &file, tuple);
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
        records.len() > before_last_start,
        "records after the last restart: {what}"
    );
    let sum = |field| records.iter().map(|r| count(r, field)).sum::<u64>();
    assert_eq!(sum("packets_sent"), DATAGRAMS as u64, "{what}");
    assert_eq!(
        sum("bytes_sent"),
        (DATAGRAMS * (HEADER + PAYLOAD)) as u64,
        "{what}"
    );
    assert_no_spike(&records);
}

/// A steady iperf3 TCP flow from pod-0 to pod-1 (20 Mbit/s for 30 s) with the daemon
/// killed with SIGKILL and started again, then stopped with SIGTERM and started again
/// ([`kill_and_stop_mid_flow`]): the records of its data connection add up to what
/// iperf3 sent, within 2%, and no interval's rate stands out.
///
/// Records count IP bytes, headers included; iperf3 counts the payload it sent. Pod-0's
/// `eth0` is made to send one TCP segment per packet (`gso_max_segs 1`), so that every
/// packet counted carries one IPv4 header and one TCP header with the timestamps option
/// (20 + 32 bytes: Linux's default), which are taken off. (With segmentation offload a
/// packet counted would be up to 45 segments under one header, and the headers it
/// stands for unknown.) What is left over: the SYN's other options, and any
/// retransmission, counted by the datapath and not by iperf3 (shown on failure).
#[test]
fn kill_9_under_a_steady_iperf3_flow_reports_what_was_sent() {
    const SERVER_PORT: u16 = 5201;
    /// The client port of iperf3's data connection (`--cport`): its tuple is known.
    const DATA_PORT: u16 = 45201;
    const HEADERS: u64 = 20 + 32;

    let file = RecordFile::new("iperf");
    let mut node = node(
        "rs-iperf",
        2,
        daemon_args_with_records(&file, &["--metrics-addr", "off"]),
    );
    let lab = &node.lab;
    lab.pod_ns(0)
        .run(
            "ip",
            ["link", "set", "dev", POD_IFNAME, "gso_max_segs", "1"],
        )
        .unwrap();
    let (client_ip, server_ip) = (lab.pod_ip(0, IpFamily::V4), lab.pod_ip(1, IpFamily::V4));
    let port = SERVER_PORT.to_string();
    let mut server = lab.pod_ns(1).cmd(
        "iperf3",
        ["-s", "-1", "-B", &server_ip.to_string(), "-p", &port],
    );
    server.stdin(Stdio::null()).stdout(Stdio::null());
    let _server = Background::spawn(server).unwrap();
    poll(WAIT, "iperf3 -s listening", || {
        let sockets = lab.pod_ns(1).run("ss", ["-Hltn", "sport", "=", &port])?;
        Ok((!sockets.trim().is_empty()).then_some(()))
    })
    .unwrap();
    let mut client = lab.pod_ns(0).cmd(
        "iperf3",
        [
            "-c",
            &server_ip.to_string(),
            "-p",
            &port,
            "--cport",
            &DATA_PORT.to_string(),
            "-b",
            "20M",
            "-t",
            "30",
            "-J",
        ],
    );
    client.stdin(Stdio::null()).stdout(Stdio::piped());
    let client = Background::spawn(client).unwrap();
    let tuple = FiveTuple {
        src: (client_ip, DATA_PORT).into(),
        dst: (server_ip, SERVER_PORT).into(),
        protocol: 6,
    };

    let before_last_start = kill_and_stop_mid_flow(&mut node, &file, tuple);
    let output = client.into_child().wait_with_output().unwrap();
    let report: Value = serde_json::from_slice(&output.stdout)
        .unwrap_or_else(|e| panic!("iperf3 -J: {e}: {output:?}"));
    assert!(
        output.status.success() && report["error"].is_null(),
        "iperf3: {report}"
    );
    let sent = report["end"]["sum_sent"]["bytes"].as_u64().unwrap();
    let retransmits = &report["end"]["sum_sent"]["retransmits"];
    // SIGTERM writes the records of the flow's last packets.
    node.stop_daemon().unwrap();

    let records = records_of(&file, tuple);
    let what = format!("{records:#?}");
    assert!(
        records.len() > before_last_start,
        "records after the last restart: {what}"
    );
    let recorded = totals(&records);
    let payload = recorded.bytes.saturating_sub(recorded.packets * HEADERS);
    assert!(
        payload.abs_diff(sent) * 50 <= sent,
        "the records carry {payload} bytes of payload ({} bytes in {} packets), iperf3 sent \
         {sent} ({retransmits} retransmissions): {what}",
        recorded.bytes,
        recorded.packets
    );
    assert_no_spike(&records);
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

/// The kernel's tag of each program in `programs` named `name`: a hash of its
/// instructions, which differs when the code does.
fn tags_of(programs: &[(String, &'static str, u32)], name: &str) -> BTreeSet<u64> {
    let ids: BTreeSet<u32> = programs.iter().map(|(_, _, id)| *id).collect();
    aya::programs::loaded_programs()
        .filter_map(Result::ok)
        .filter(|info| ids.contains(&info.id()) && info.name_as_str() == Some(name))
        .map(|info| info.tag())
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

/// A daemon running another build of the datapath ([`OTHER_OBJECT`]) under TCP load
/// (IPv4 and IPv6), then this binary's: every link now runs a new program, and
/// `pod_ingress` other code (its tag differs), the maps are the same ones (the flow
/// map's counts go on), and neither connection breaks.
#[test]
fn an_upgrade_under_tcp_load_breaks_no_connection() {
    assert!(
        !OTHER_OBJECT.is_empty(),
        "the upgrade test's object was not built (AYA_BUILD_SKIP=1?): build the tests without it"
    );
    let other = TempFile::with_bytes("object", OTHER_OBJECT).unwrap();
    let mut args = Node::default_daemon_args();
    args.extend(["--ebpf-object".to_owned(), other.path.display().to_string()]);
    let mut node = node("rs-upgrade", 2, args);
    let status = node.status().unwrap();
    assert_eq!(
        status["datapath_object"]["sha256"],
        ObjectInfo::of(OTHER_OBJECT).sha256_hex(),
        "{status}"
    );
    assert_eq!(
        status["datapath_object"]["same_as_this_binary"], false,
        "{status}"
    );
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
    // Read while they run: replaced, the old programs are unloaded.
    let old_tags = tags_of(&before, program_names::POD_INGRESS);
    let flows_map = map_id(&node, map_names::FLOWS);

    node.stop_daemon().unwrap();
    node.start_daemon(Node::default_daemon_args()).unwrap();
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
    let new_tags = tags_of(&after, program_names::POD_INGRESS);
    assert!(
        old_tags.len() == 1 && new_tags.len() == 1 && old_tags != new_tags,
        "pod_ingress runs other code: tags {old_tags:x?} → {new_tags:x?}"
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
