//! Flow records: what the daemon writes at each aggregation interval (`--records`,
//! `--records-interval`), checked against traffic counted independently of the datapath,
//! against `visibility flows --json`, and with a sink that cannot keep up.
//!
//! **These tests need root** (network namespaces, bpffs, BPF) and the `visibility` binary
//! built (`cargo build -p visibility-userspace`), plus conntrack-tools (the gateway's flow
//! log). They run in parallel; each has its own lab, pin directory and record file.
//!
//! Run: `cargo test -p visibility-tests --test records`

use std::{
    net::{IpAddr, SocketAddr},
    process::Stdio,
    time::{Duration, Instant},
};

use anyhow::bail;
use serde_json::Value;
use time::{OffsetDateTime, format_description::well_known::Rfc3339};
use visibility_tests::require_root;
use visibility_tests::{
    lab::{Background, DEFAULT_TIMEOUT, Flow, IpFamily, Lab, Reply, UdpServer},
    node::{Node, poll},
    records::{
        FiveTuple, HTTP_PORT, RecordFile, Totals, daemon_args_with_records, http_get,
        send_steadily, totals, udp_stream, wait_for_records,
    },
};

const FAMILIES: [IpFamily; 2] = [IpFamily::V4, IpFamily::V6];
/// How long a record may take to appear: one 5 s interval, a read, and slack.
const RECORD_WAIT: Duration = Duration::from_secs(12);

/// A lab node whose daemon writes records to `file` every 5 s, named `node_name`.
fn node_with_records(tag: &str, pods: usize, file: &RecordFile, node_name: &str) -> Node {
    require_root();
    let mut node = Node::new(tag, pods).expect("building the lab");
    node.capture_daemon_log();
    let args = daemon_args_with_records(file, &["--node-name", node_name, "--metrics-addr", "off"]);
    node.start_daemon(args).expect("starting the daemon");
    node
}

/// Parses an RFC 3339 time that carries its nanoseconds: a fraction of 1 to 9 digits that
/// says exactly the nanosecond (the formatter drops trailing zeros), in UTC.
fn parse_time(text: &str) -> OffsetDateTime {
    let time = OffsetDateTime::parse(text, &Rfc3339)
        .unwrap_or_else(|e| panic!("{text:?} is not RFC 3339: {e}"));
    let fraction = text
        .split_once('.')
        .and_then(|(_, rest)| rest.strip_suffix('Z'))
        .unwrap_or_else(|| panic!("{text:?} has no fractional seconds, or is not in UTC"));
    assert!(
        (1..=9).contains(&fraction.len()) && fraction.bytes().all(|b| b.is_ascii_digit()),
        "{text:?}: fraction {fraction:?}"
    );
    let nanos: u32 = format!("{fraction:0<9}").parse().unwrap();
    assert_eq!(time.nanosecond(), nanos, "{text:?}");
    time
}

/// The record's start and end, checked: in order, and within `[not_before, now]`.
fn check_times(record: &Value, not_before: OffsetDateTime) -> (OffsetDateTime, OffsetDateTime) {
    let start = parse_time(record["start_time"].as_str().expect("start_time"));
    let end = parse_time(record["end_time"].as_str().expect("end_time"));
    // Monotonic (coarse) nanoseconds become wall-clock time; allow a little for the
    // conversion and the coarse clock's tick.
    let slack = time::Duration::seconds(1);
    let now = OffsetDateTime::now_utc();
    assert!(start <= end, "{record}");
    assert!(
        start >= not_before - slack && end <= now + slack,
        "times outside [{not_before}, {now}]: {record}"
    );
    (start, end)
}

/// Everything a record of a Pod-to-Pod flow sent through the gateway must say.
fn check_record(record: &Value, lab: &Lab, from: usize, to: usize, node_name: &str) {
    assert_eq!(record["reporter"], "SRC", "{record}");
    assert_eq!(record["path"], "via_gateway", "{record}");
    assert_eq!(record["node_name"], node_name, "{record}");
    assert_eq!(
        record["src_interface"],
        lab.pod_host_ifname(from),
        "{record}"
    );
    assert_eq!(
        record["dest_interface"],
        lab.pod_host_ifname(to),
        "{record}"
    );
}

// ---------------------------------------------------------------------------------------
// Traffic
// ---------------------------------------------------------------------------------------

/// The gateway's conntrack entries of `tuples`, once their counters have stopped moving
/// (the last ACK of a close may still be on its way when the client returns).
fn settled_conntrack(lab: &Lab, tuples: &[FiveTuple]) -> Vec<Flow> {
    let mut last: Option<Vec<Flow>> = None;
    poll(DEFAULT_TIMEOUT, "settled conntrack entries", || {
        std::thread::sleep(Duration::from_millis(250));
        let flows = lab.gateway_flows()?;
        let found = tuples
            .iter()
            .map(|t| t.conntrack(&flows).cloned())
            .collect::<Option<Vec<Flow>>>();
        let Some(found) = found else {
            bail!("no conntrack entry for some of {tuples:?} in {flows:?}")
        };
        let settled = last.as_ref() == Some(&found);
        last = Some(found.clone());
        Ok(settled.then_some(found))
    })
    .unwrap()
}

// ---------------------------------------------------------------------------------------
// Tests
// ---------------------------------------------------------------------------------------

/// An HTTP request from pod-0 to pod-1, IPv4 and IPv6: within one interval the record file
/// holds the flow with exactly the packets and IP bytes the gateway saw.
///
/// The independent count is the gateway's conntrack entry (accounting on): its original
/// direction counts every client-to-server packet that crossed the gateway, with its IP
/// length (`skb->len` at the IP layer), which is what `bytes_sent` claims to be. Every
/// redirected packet crosses the gateway exactly once, and this exchange is too small
/// for GSO, so the two must agree to the byte; its reply direction checks the
/// server-to-client flow the same way. (A tcpdump in pod-0 would count the same packets,
/// but adds a capture process and its start-up race.)
#[test]
fn an_http_request_is_recorded_with_the_packets_the_gateway_saw() {
    let file = RecordFile::new("http");
    let node_name = "records-http-node";
    let node = node_with_records("r-http", 2, &file, node_name);
    let lab = &node.lab;
    let started = OffsetDateTime::now_utc();

    let requests: Vec<FiveTuple> = FAMILIES
        .iter()
        .map(|family| http_get(lab, 0, 1, *family).unwrap())
        .collect();
    let replies: Vec<FiveTuple> = requests.iter().map(|t| t.reversed()).collect();
    let conntrack = settled_conntrack(lab, &requests);

    let mut expected = Vec::new();
    for (tuple, flow) in requests.iter().zip(&conntrack) {
        expected.push((*tuple, flow.packets));
    }
    for (tuple, flow) in replies.iter().zip(&conntrack) {
        expected.push((*tuple, flow.reply_packets));
    }
    let per_flow = wait_for_records(&file, &expected, RECORD_WAIT);

    for (i, (request, flow)) in requests.iter().zip(&conntrack).enumerate() {
        let records = &per_flow[i];
        let reply_records = &per_flow[requests.len() + i];
        let what = format!("{request:?}; gateway: {flow:?}; records: {records:#?}");
        assert!(!records.is_empty(), "{what}");
        for record in records {
            assert_eq!(record["connection"]["dest_port"], HTTP_PORT, "{what}");
            assert_eq!(record["connection"]["protocol"], 6, "{what}");
            check_record(record, lab, 0, 1, node_name);
            check_times(record, started);
            let flags = record["tcp_flags"].as_array().expect("tcp_flags");
            assert!(flags.contains(&"SYN".into()), "{what}");
        }
        // An exchange of a few milliseconds lands in one interval, unless it happened to
        // straddle a read: then its records add up.
        let sent = totals(records);
        eprintln!("{request:?}: records {sent:?}, gateway {flow:?}");
        assert_eq!(sent.packets, flow.packets, "packets: {what}");
        assert_eq!(sent.bytes, flow.bytes, "IP bytes: {what}");
        // Everything sent came back from the gateway and reached pod-1.
        assert_eq!(sent.returned_packets, sent.packets, "{what}");
        assert_eq!(sent.returned_bytes, sent.bytes, "{what}");

        let back = totals(reply_records);
        assert_eq!(
            (back.packets, back.bytes),
            (flow.reply_packets, flow.reply_bytes),
            "server to client: {reply_records:#?}; gateway: {flow:?}"
        );
        for record in reply_records {
            assert_eq!(record["connection"]["src_port"], HTTP_PORT);
            check_record(record, lab, 1, 0, node_name);
        }
    }
}

/// A UDP stream at a steady rate for ~12 s spans at least two 5 s intervals: the flow gets
/// one record per interval, in order and without overlap, whose packets and bytes add up
/// to what was sent (fixed-size datagrams, so no GSO can blur the count) and to the totals
/// of `visibility flows --json`.
#[test]
fn records_of_a_long_transfer_add_up_to_its_total() {
    const PAYLOAD: usize = 200;
    const DATAGRAMS: usize = 240;
    const GAP: Duration = Duration::from_millis(50);

    let file = RecordFile::new("long");
    let node_name = "records-long-node";
    let node = node_with_records("r-long", 2, &file, node_name);
    let lab = &node.lab;
    let started = OffsetDateTime::now_utc();

    // Both families at once, each from its own socket.
    let mut streams = Vec::new();
    for family in FAMILIES {
        let (socket, tuple, server) =
            udp_stream(lab, 0, 1, family, DATAGRAMS, Duration::from_secs(60)).unwrap();
        streams.push((family, tuple, socket, server));
    }
    let sending = Instant::now();
    std::thread::scope(|scope| {
        for (_, _, socket, _) in &streams {
            scope.spawn(move || send_steadily(socket, PAYLOAD, DATAGRAMS, GAP));
        }
    });
    assert!(sending.elapsed() >= Duration::from_secs(11));

    let mut expected = Vec::new();
    for (family, tuple, _, _) in &streams {
        let header = match family {
            IpFamily::V4 => 20 + 8,
            IpFamily::V6 => 40 + 8,
        };
        let totals = Totals {
            packets: DATAGRAMS as u64,
            bytes: (DATAGRAMS * (header + PAYLOAD)) as u64,
            returned_packets: DATAGRAMS as u64,
            returned_bytes: (DATAGRAMS * (header + PAYLOAD)) as u64,
        };
        expected.push((*tuple, totals));
    }
    // Every datagram arrived (the server stops after DATAGRAMS).
    for (_, _, _, server) in streams {
        assert_eq!(server.join().unwrap().len(), DATAGRAMS);
    }
    let per_flow = wait_for_records(
        &file,
        &expected
            .iter()
            .map(|(t, totals)| (*t, totals.packets))
            .collect::<Vec<_>>(),
        RECORD_WAIT,
    );

    for ((tuple, want), records) in expected.iter().zip(&per_flow) {
        let what = format!("{tuple:?}: {records:#?}");
        assert!(records.len() >= 2, "one record per interval: {what}");
        assert_eq!(totals(records), *want, "{what}");
        // In order, without overlap: each interval starts after the previous one ended.
        let mut previous_end: Option<OffsetDateTime> = None;
        for record in records {
            check_record(record, lab, 0, 1, node_name);
            let (start, end) = check_times(record, started);
            if let Some(previous_end) = previous_end {
                assert!(previous_end <= start, "overlapping intervals: {what}");
            }
            previous_end = Some(end);
        }
        // The flow map holds the running total.
        let flows = flows_of(&node, tuple);
        assert_eq!(flows.len(), 1, "{flows:#?}");
        assert_eq!(totals(&flows), *want, "visibility flows --json: {flows:#?}");
    }
}

/// What `visibility flows --json` lists of one flow: filtered on its source, source
/// port and destination port.
fn flows_of(node: &Node, tuple: &FiveTuple) -> Vec<Value> {
    let filters = [
        format!("src={}", tuple.src.ip()),
        format!("sport={}", tuple.src.port()),
        format!("dport={}", tuple.dst.port()),
    ];
    let filters: Vec<&str> = filters.iter().map(String::as_str).collect();
    node.flows(&filters).unwrap()
}

/// The JSON structure of a value: objects by key, everything else by type.
fn shape(value: &Value) -> Value {
    match value {
        Value::Object(map) => Value::Object(
            map.iter()
                .map(|(key, value)| (key.clone(), shape(value)))
                .collect(),
        ),
        Value::Array(_) => "array".into(),
        Value::String(_) => "string".into(),
        Value::Number(_) => "number".into(),
        Value::Bool(_) => "bool".into(),
        Value::Null => "null".into(),
    }
}

/// `visibility flows --json` prints records of the daemon's schema: the same keys, nested
/// keys and types, for the same flow.
#[test]
fn flows_json_prints_the_record_schema() {
    let file = RecordFile::new("schema");
    let node = node_with_records("r-schema", 2, &file, "records-schema-node");
    let lab = &node.lab;
    let server = UdpServer::start(
        lab.pod_ns(1),
        SocketAddr::new(lab.pod_ip(1, IpFamily::V4), 0),
        1,
        Reply::Nothing,
        Duration::from_secs(10),
    )
    .unwrap();
    let dst = server.local_addr();
    let socket = lab.pod_ns(0).udp_send(dst, b"schema").unwrap();
    server.join().unwrap();
    let tuple = FiveTuple {
        src: SocketAddr::new(
            IpAddr::from(lab.pod_ipv4(0)),
            socket.local_addr().unwrap().port(),
        ),
        dst,
        protocol: 17,
    };
    let records = wait_for_records(&file, &[(tuple, 1)], RECORD_WAIT).remove(0);
    let record = &records[0];

    let flows = flows_of(&node, &tuple);
    assert_eq!(flows.len(), 1, "{flows:#?}");
    let listed = &flows[0];

    let keys = |v: &Value| -> Vec<String> {
        v.as_object()
            .expect("a JSON object")
            .keys()
            .cloned()
            .collect()
    };
    assert_eq!(
        keys(listed),
        keys(record),
        "top-level keys\nflows --json: {listed:#}\nrecord: {record:#}"
    );
    assert_eq!(
        shape(listed),
        shape(record),
        "structure\nflows --json: {listed:#}\nrecord: {record:#}"
    );
    assert_eq!(listed["connection"], record["connection"]);
    for field in [
        "packets_sent",
        "bytes_sent",
        "path",
        "reporter",
        "src_interface",
    ] {
        assert_eq!(listed[field], record[field], "{field}");
    }
}

/// A record sink that cannot keep up never stalls the daemon.
///
/// The daemon writes records to its stdout, a pipe this test holds open and never reads:
/// once the pipe (64 KiB) is full the sink's writer blocks for good, its bounded queue
/// (65,536 lines) fills, and from then on records must be dropped and counted, not
/// waited for. Pod-0 sends one datagram to each of 30,000 ports of pod-1 per interval, so
/// every interval brings 30,000 records; after at most six intervals far more than the
/// queue holds were produced. Then:
/// * `status --json` reports `daemon.records.dropped > 0` (a sink that blocked the
///   reader would leave it at 0 and stop the reads),
/// * `emitted` is bounded by the queue plus what fits in the pipe,
/// * the daemon still reconciles: a new Pod gets attached and its traffic redirected.
#[test]
fn a_sink_that_cannot_keep_up_drops_records_and_never_stalls_the_daemon() {
    /// The sink's queue (visibility-userspace/src/flows/records.rs `QUEUE`).
    const QUEUE: u64 = 65_536;
    /// Lines in the pipe and in the writer's hands: a 64 KiB pipe holds fewer than 300 of
    /// these records (each is over 300 bytes); the margin is generous.
    const IN_FLIGHT: u64 = 1_024;
    const PORTS: u16 = 30_000;
    const ROUNDS: usize = 6;

    require_root();
    let mut node = Node::new("r-stall", 2).expect("building the lab");
    let log = node.capture_daemon_log();
    let mut args = vec!["daemon".to_owned()];
    args.extend(Node::default_daemon_args());
    args.extend(
        [
            "--records",
            "stdout",
            "--records-interval",
            "5s",
            "--metrics-addr",
            "off",
            "--flow-capacity",
            "131072",
        ]
        .map(str::to_owned),
    );
    let mut cmd = node.command(&args);
    cmd.stdin(Stdio::null())
        .stdout(Stdio::piped())
        .stderr(std::fs::File::create(&log).unwrap());
    // Holds the pipe's reading end, unread, until the end of the test.
    let daemon = Background::spawn(cmd).unwrap();
    node.wait_until_attached(2).unwrap();
    let pid = u64::from(daemon.id());

    let lab = &node.lab;
    let socket = lab
        .pod_ns(0)
        .udp_bind(SocketAddr::new(lab.pod_ipv4(0).into(), 0))
        .unwrap();
    let records = |node: &Node| -> Value {
        let status = node.status().unwrap();
        assert_eq!(status["daemon"]["pid"], pid, "{status}");
        status["daemon"]["records"].clone()
    };
    let mut last = Value::Null;
    for round in 0..ROUNDS {
        let round_started = Instant::now();
        for port in 1..=PORTS {
            // Nothing listens: each datagram is a flow of its own (pod-1 answers a few
            // with ICMP port unreachable, rate-limited).
            let _ = socket.send_to(b"x", SocketAddr::new(lab.pod_ipv4(1).into(), port));
        }
        // The next read (at most one interval away) turns this round into records.
        std::thread::sleep(Duration::from_millis(5_500).saturating_sub(round_started.elapsed()));
        last = records(&node);
        eprintln!("after round {round}: {last}");
        if last["dropped"].as_u64().unwrap_or(0) > 0 {
            break;
        }
    }
    let dropped = last["dropped"].as_u64().unwrap_or(0);
    let emitted = last["emitted"].as_u64().unwrap_or(0);
    assert!(dropped > 0, "nothing dropped: {last}");
    assert!(
        emitted <= QUEUE + IN_FLIGHT,
        "{emitted} records emitted into a sink that takes at most {}: {last}",
        QUEUE + IN_FLIGHT
    );

    // The daemon is alive and well: it attaches a new Pod, whose traffic is redirected.
    let new_pod = node.lab.add_pod().unwrap();
    node.wait_until_attached(3).unwrap();
    let lab = &node.lab;
    lab.flush_gateway_flows().unwrap();
    lab.pod_ns(new_pod).ping(lab.pod_ipv4(0), 2).unwrap();
    let flows = lab.gateway_flows().unwrap();
    assert!(
        flows
            .iter()
            .any(|f| f.is_between(lab.pod_ipv4(new_pod), lab.pod_ipv4(0))),
        "the new Pod's traffic did not reach the gateway: {flows:?}"
    );
    // And its reader goes on: more records are counted (dropped, by now) every interval.
    let before = dropped + emitted;
    lab.pod_ns(0).ping(lab.pod_ipv4(1), 1).unwrap();
    node.wait_for(Duration::from_secs(12), |status| {
        let r = &status["daemon"]["records"];
        let seen = r["dropped"].as_u64()? + r["emitted"].as_u64()?;
        (seen > before).then_some(())
    })
    .unwrap();
    drop(daemon);
}
