//! Flow records as the tests read them: the daemon's JSON record file, the 5-tuples and
//! counts of its records, and an HTTP exchange between two Pods to record.

use std::{
    io::{Read as _, Write as _},
    net::{Shutdown, SocketAddr},
    path::{Path, PathBuf},
    time::Duration,
};

use anyhow::{Context as _, Result, ensure};
use serde_json::Value;

use crate::{
    lab::{DEFAULT_TIMEOUT, Flow, IpFamily, Lab, Reply, TcpServer, UdpServer},
    node::{Node, poll},
};

/// The daemon flags of a lab node ([`Node::default_daemon_args`]) that writes records to
/// `file` every 5 s, followed by `extra`.
pub fn daemon_args_with_records(file: &RecordFile, extra: &[&str]) -> Vec<String> {
    let mut args = Node::default_daemon_args();
    args.extend([
        "--records".to_owned(),
        file.path.display().to_string(),
        "--records-interval".to_owned(),
        "5s".to_owned(),
    ]);
    args.extend(extra.iter().map(|a| (*a).to_owned()));
    args
}

// ---------------------------------------------------------------------------------------
// Record files
// ---------------------------------------------------------------------------------------

/// A record file of its own per test, removed (with any rotated files) on drop.
pub struct RecordFile {
    pub path: PathBuf,
}

impl RecordFile {
    pub fn new(tag: &str) -> Self {
        let path = PathBuf::from(format!(
            "/tmp/vis-records-{}.jsonl",
            crate::unique::name(tag)
        ));
        let file = Self { path };
        file.remove();
        file
    }

    pub fn remove(&self) {
        let _ = std::fs::remove_file(&self.path);
        for n in 1..=5 {
            let _ = std::fs::remove_file(format!("{}.{n}", self.path.display()));
        }
    }

    /// Every complete line, parsed. A line still being written (no newline yet) is left
    /// for the next read.
    pub fn records(&self) -> Result<Vec<Value>> {
        records_at(&self.path)
    }
}

/// Every complete line of the record file at `path` (none when there is no file),
/// parsed, as [`RecordFile::records`] reads them.
pub fn records_at(path: &Path) -> Result<Vec<Value>> {
    let text = match std::fs::read_to_string(path) {
        Ok(text) => text,
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => return Ok(Vec::new()),
        Err(e) => return Err(e).with_context(|| format!("reading {}", path.display())),
    };
    let complete = &text[..text.rfind('\n').map_or(0, |end| end + 1)];
    complete
        .lines()
        .filter(|l| !l.trim().is_empty())
        .map(|l| serde_json::from_str(l).with_context(|| format!("record line {l:?}")))
        .collect()
}

impl Drop for RecordFile {
    fn drop(&mut self) {
        if std::thread::panicking()
            && let Ok(text) = std::fs::read_to_string(&self.path)
        {
            eprintln!(
                "--- records ({}) ---\n{text}--- end of records ---",
                self.path.display()
            );
        }
        self.remove();
    }
}

// ---------------------------------------------------------------------------------------
// Reading records
// ---------------------------------------------------------------------------------------

/// One direction of a conversation, as records name it.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct FiveTuple {
    pub src: SocketAddr,
    pub dst: SocketAddr,
    pub protocol: u8,
}

impl FiveTuple {
    pub fn reversed(self) -> Self {
        Self {
            src: self.dst,
            dst: self.src,
            protocol: self.protocol,
        }
    }

    pub fn matches(&self, record: &Value) -> bool {
        let c = &record["connection"];
        c["src_ip"] == self.src.ip().to_string()
            && c["src_port"] == self.src.port()
            && c["dest_ip"] == self.dst.ip().to_string()
            && c["dest_port"] == self.dst.port()
            && c["protocol"] == self.protocol
    }

    /// The gateway's conntrack entry whose original direction is this tuple.
    pub fn conntrack<'a>(&self, flows: &'a [Flow]) -> Option<&'a Flow> {
        flows.iter().find(|f| {
            f.protocol_number == self.protocol
                && f.src == self.src.ip()
                && f.dst == self.dst.ip()
                && f.sport == Some(self.src.port())
                && f.dport == Some(self.dst.port())
        })
    }
}

/// A count field: VPC flow logs write int64 values as JSON strings.
pub fn count(record: &Value, field: &str) -> u64 {
    let text = record[field]
        .as_str()
        .unwrap_or_else(|| panic!("{field} is not a JSON string in {record}"));
    text.parse()
        .unwrap_or_else(|_| panic!("{field} {text:?} is not a number in {record}"))
}

/// Packets, bytes, returned packets and returned bytes, summed over `records`.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct Totals {
    pub packets: u64,
    pub bytes: u64,
    pub returned_packets: u64,
    pub returned_bytes: u64,
}

pub fn totals<'a>(records: impl IntoIterator<Item = &'a Value>) -> Totals {
    records.into_iter().fold(Totals::default(), |t, r| Totals {
        packets: t.packets + count(r, "packets_sent"),
        bytes: t.bytes + count(r, "bytes_sent"),
        returned_packets: t.returned_packets + count(r, "returned_packets"),
        returned_bytes: t.returned_bytes + count(r, "returned_bytes"),
    })
}

/// Waits until the records of each tuple add up to at least its expected packets, and
/// returns the records of each.
pub fn wait_for_records(
    file: &RecordFile,
    expected: &[(FiveTuple, u64)],
    timeout: Duration,
) -> Vec<Vec<Value>> {
    poll(timeout, "records of every flow", || {
        let all = file.records()?;
        let per_flow: Vec<Vec<Value>> = expected
            .iter()
            .map(|(tuple, _)| all.iter().filter(|r| tuple.matches(r)).cloned().collect())
            .collect();
        let complete = per_flow
            .iter()
            .zip(expected)
            .all(|(records, (_, packets))| totals(records).packets >= *packets);
        Ok(complete.then_some(per_flow))
    })
    .unwrap_or_else(|e| {
        panic!(
            "{e:#}\nexpected {expected:?}\nrecords: {:#?}",
            file.records()
        )
    })
}

// ---------------------------------------------------------------------------------------
// Traffic
// ---------------------------------------------------------------------------------------

pub const HTTP_PORT: u16 = 8080;
pub const HTTP_REQUEST: &[u8] = b"GET / HTTP/1.0\r\nHost: pod-1\r\n\r\n";
pub const HTTP_RESPONSE: &[u8] =
    b"HTTP/1.0 200 OK\r\nContent-Type: text/plain\r\nContent-Length: 13\r\n\r\nHello, world!";

/// A UDP stream to record, from Pod `from` to a server in Pod `to` that takes
/// `datagrams` (or waits `timeout` for them) and answers none: the client's socket,
/// connected, its tuple, and the server.
pub fn udp_stream(
    lab: &Lab,
    from: usize,
    to: usize,
    family: IpFamily,
    datagrams: usize,
    timeout: Duration,
) -> Result<(std::net::UdpSocket, FiveTuple, UdpServer)> {
    let server = UdpServer::start(
        lab.pod_ns(to),
        SocketAddr::new(lab.pod_ip(to, family), 0),
        datagrams,
        Reply::Nothing,
        timeout,
    )?;
    let socket = lab
        .pod_ns(from)
        .udp_bind(SocketAddr::new(lab.pod_ip(from, family), 0))?;
    socket.connect(server.local_addr())?;
    let tuple = FiveTuple {
        src: socket.local_addr()?,
        dst: server.local_addr(),
        protocol: 17,
    };
    Ok((socket, tuple, server))
}

/// Sends `datagrams` datagrams of `payload` bytes on `socket`, one every `gap`.
pub fn send_steadily(
    socket: &std::net::UdpSocket,
    payload: usize,
    datagrams: usize,
    gap: Duration,
) {
    let payload = vec![0x5au8; payload];
    let mut next = std::time::Instant::now();
    for _ in 0..datagrams {
        assert_eq!(socket.send(&payload).unwrap(), payload.len());
        next += gap;
        std::thread::sleep(next.saturating_duration_since(std::time::Instant::now()));
    }
}

/// An HTTP/1.0 GET from Pod `from` to a server on port 8080 of Pod `to`; returns the
/// client-to-server tuple.
pub fn http_get(lab: &Lab, from: usize, to: usize, family: IpFamily) -> Result<FiveTuple> {
    let server_addr = SocketAddr::new(lab.pod_ip(to, family), HTTP_PORT);
    // The lab's TcpServer answers once the request has ended (EOF): an HTTP/1.0 server
    // with a fixed page and no parser. So the client half-closes after its request.
    let server = TcpServer::start(
        lab.pod_ns(to),
        server_addr,
        1,
        Reply::Fixed(HTTP_RESPONSE.to_vec()),
        Duration::from_secs(10),
    )?;
    let mut stream = lab.pod_ns(from).tcp_connect(server_addr, DEFAULT_TIMEOUT)?;
    let client_addr = stream.local_addr()?;
    stream.set_read_timeout(Some(DEFAULT_TIMEOUT))?;
    stream.set_write_timeout(Some(DEFAULT_TIMEOUT))?;
    stream.write_all(HTTP_REQUEST)?;
    stream.shutdown(Shutdown::Write)?;
    let mut response = Vec::new();
    stream.read_to_end(&mut response)?;
    ensure!(
        response == HTTP_RESPONSE,
        "response {:?}",
        String::from_utf8_lossy(&response)
    );
    let received = server.join()?;
    ensure!(
        received.len() == 1 && received[0].peer == client_addr && received[0].data == HTTP_REQUEST,
        "the server saw {received:?}"
    );
    Ok(FiveTuple {
        src: client_addr,
        dst: server_addr,
        protocol: 6,
    })
}
