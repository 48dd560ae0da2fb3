//! Sending IPFIX messages to the collectors: each has a thread of its own, fed by a
//! bounded queue, and a non-blocking UDP socket, so a collector that is down,
//! unreachable or slow costs an error count (`visibility_ipfix_export_errors_total`)
//! and never a wait of the flow reader, the JSON sink or the daemon.

use std::{
    io,
    net::{SocketAddr, ToSocketAddrs as _, UdpSocket},
    os::fd::AsRawFd as _,
    sync::{
        Arc,
        atomic::Ordering,
        mpsc::{Receiver, RecvTimeoutError, SyncSender, TrySendError, sync_channel},
    },
    time::Instant,
};

use super::encode::{Encoder, ExportRecord, TEMPLATE_REFRESH};
use crate::flows::stats::RecordStats;

/// Message size when the path MTU cannot be read: a 1500-byte MTU less IPv6 and UDP.
const FALLBACK_MESSAGE_SIZE: usize = 1500 - 40 - 8;
/// Interval batches a collector's queue holds; more are dropped and counted.
const QUEUE: usize = 4;

/// Why a message did not reach a collector (each one counts as an export error).
#[derive(Debug, thiserror::Error)]
pub enum ExportError {
    /// The collector's name did not resolve.
    #[error("resolving {collector}: {source}")]
    Resolve {
        collector: String,
        #[source]
        source: io::Error,
    },
    /// No UDP socket toward the collector could be set up.
    #[error("opening a UDP socket to {collector}: {source}")]
    Socket {
        collector: String,
        #[source]
        source: io::Error,
    },
    /// The send failed: the collector refused (ICMP port unreachable), the network is
    /// unreachable, or the socket's buffer is full (a send never waits).
    #[error("sending to {collector}: {source}")]
    Send {
        collector: String,
        #[source]
        source: io::Error,
    },
    /// The collector's queue was full: the exporter is behind by a whole queue of
    /// intervals, and this interval's records are not exported.
    #[error("the export queue of {collector} is full")]
    QueueFull { collector: String },
}

/// The exporting ends: one queue per collector.
pub struct Exporters {
    collectors: Vec<(String, SyncSender<Arc<Vec<ExportRecord>>>)>,
    stats: Arc<RecordStats>,
}

impl Exporters {
    /// Starts a thread per collector (`HOST:PORT`).
    pub fn start(collectors: &[String], stats: Arc<RecordStats>) -> io::Result<Self> {
        let collectors = collectors
            .iter()
            .map(|collector| {
                let (sender, receiver) = sync_channel(QUEUE);
                let thread_stats = stats.clone();
                let name = collector.clone();
                std::thread::Builder::new()
                    .name("ipfix-export".into())
                    .spawn(move || export(&name, &receiver, &thread_stats))?;
                Ok((collector.clone(), sender))
            })
            .collect::<io::Result<_>>()?;
        Ok(Self { collectors, stats })
    }

    /// Whether any collector is configured (without one, records need not be made).
    pub fn has_collectors(&self) -> bool {
        !self.collectors.is_empty()
    }

    /// Hands one interval's records to every collector without waiting; a collector
    /// whose queue is full loses them, counted as an export error.
    pub fn send(&self, records: Vec<ExportRecord>) {
        let records = Arc::new(records);
        for (collector, sender) in &self.collectors {
            if let Err(TrySendError::Full(_) | TrySendError::Disconnected(_)) =
                sender.try_send(records.clone())
            {
                count_error(
                    &self.stats,
                    &ExportError::QueueFull {
                        collector: collector.clone(),
                    },
                );
            }
        }
    }
}

/// Counts an export error. The daemon's first is logged as a warning, later ones at debug
/// level, so a collector that stays down does not flood the log (the counter tells).
fn count_error(stats: &RecordStats, error: &ExportError) {
    if stats.ipfix_export_errors.fetch_add(1, Ordering::Relaxed) == 0 {
        tracing::warn!(%error, "IPFIX export failed (counted in visibility_ipfix_export_errors_total)");
    } else {
        tracing::debug!(%error, "IPFIX export failed");
    }
}

/// A connected, non-blocking UDP socket to a collector, and its encoder.
struct Connection {
    socket: UdpSocket,
    encoder: Encoder,
}

impl Connection {
    fn open(collector: &str) -> Result<Self, ExportError> {
        let addr = collector
            .to_socket_addrs()
            .and_then(|mut addrs| {
                addrs
                    .next()
                    .ok_or_else(|| io::Error::from(io::ErrorKind::NotFound))
            })
            .map_err(|source| ExportError::Resolve {
                collector: collector.to_owned(),
                source,
            })?;
        let socket = connected_socket(addr).map_err(|source| ExportError::Socket {
            collector: collector.to_owned(),
            source,
        })?;
        let encoder = Encoder::new(max_message_size(&socket, addr));
        Ok(Self { socket, encoder })
    }
}

fn connected_socket(addr: SocketAddr) -> io::Result<UdpSocket> {
    let local: SocketAddr = if addr.is_ipv6() {
        (std::net::Ipv6Addr::UNSPECIFIED, 0).into()
    } else {
        (std::net::Ipv4Addr::UNSPECIFIED, 0).into()
    };
    let socket = UdpSocket::bind(local)?;
    socket.connect(addr)?;
    socket.set_nonblocking(true)?;
    Ok(socket)
}

/// The path MTU toward the collector (`IP_MTU`/`IPV6_MTU` of the connected socket),
/// less the IP and UDP headers.
fn max_message_size(socket: &UdpSocket, addr: SocketAddr) -> usize {
    let (level, option, headers) = if addr.is_ipv6() {
        (libc::IPPROTO_IPV6, libc::IPV6_MTU, 40 + 8)
    } else {
        (libc::IPPROTO_IP, libc::IP_MTU, 20 + 8)
    };
    let mut mtu: libc::c_int = 0;
    let mut len = size_of::<libc::c_int>() as libc::socklen_t;
    // SAFETY: the option is an int; `mtu` and `len` live across the call.
    let rc = unsafe {
        libc::getsockopt(
            socket.as_raw_fd(),
            level,
            option,
            std::ptr::from_mut(&mut mtu).cast(),
            &mut len,
        )
    };
    match usize::try_from(mtu) {
        Ok(mtu) if rc == 0 && mtu > headers => mtu - headers,
        _ => FALLBACK_MESSAGE_SIZE,
    }
}

/// A collector's thread: sends each interval's records as they come, and the templates
/// every [`TEMPLATE_REFRESH`] even when no records come.
fn export(collector: &str, receiver: &Receiver<Arc<Vec<ExportRecord>>>, stats: &RecordStats) {
    let mut connection: Option<Connection> = None;
    loop {
        let records = match receiver.recv_timeout(TEMPLATE_REFRESH) {
            Ok(records) => records,
            Err(RecvTimeoutError::Timeout) => Arc::new(Vec::new()),
            Err(RecvTimeoutError::Disconnected) => return,
        };
        let now = Instant::now();
        if connection.is_none() {
            match Connection::open(collector) {
                Ok(opened) => connection = Some(opened),
                Err(error) => {
                    count_error(stats, &error);
                    continue;
                }
            }
        }
        let Some(Connection { socket, encoder }) = &mut connection else {
            continue;
        };
        // A send to a collector that is not listening succeeds, and the ICMP error it
        // brings back waits on the socket: count it now, an interval later.
        if let Ok(Some(source)) = socket.take_error() {
            count_error(
                stats,
                &ExportError::Send {
                    collector: collector.to_owned(),
                    source,
                },
            );
        }
        if records.is_empty() && !encoder.templates_due(now) {
            continue;
        }
        let export_secs =
            u32::try_from(time::OffsetDateTime::now_utc().unix_timestamp()).unwrap_or(u32::MAX);
        for message in encoder.messages(&records, now, export_secs) {
            if let Err(source) = socket.send(&message) {
                count_error(
                    stats,
                    &ExportError::Send {
                        collector: collector.to_owned(),
                        source,
                    },
                );
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use std::time::Duration;

    use super::{super::encode::tests::record, *};

    /// A collector that is not there costs an error count, and sends never wait.
    #[test]
    fn a_missing_collector_is_counted_and_never_waited_for() {
        // A port nothing listens on: bind one, then close it.
        let port = UdpSocket::bind("127.0.0.1:0")
            .unwrap()
            .local_addr()
            .unwrap()
            .port();
        let stats = Arc::new(RecordStats::default());
        let exporters = Exporters::start(&[format!("127.0.0.1:{port}")], stats.clone()).unwrap();
        let started = Instant::now();
        for _ in 0..20 {
            exporters.send(vec![record(false, 1)]);
            std::thread::sleep(Duration::from_millis(5));
        }
        let deadline = Instant::now() + Duration::from_secs(5);
        while stats.ipfix_export_errors.load(Ordering::Relaxed) == 0 && Instant::now() < deadline {
            std::thread::sleep(Duration::from_millis(10));
        }
        assert!(stats.ipfix_export_errors.load(Ordering::Relaxed) > 0);
        assert!(started.elapsed() < Duration::from_secs(5));
    }

    #[test]
    fn a_full_queue_is_counted() {
        let stats = Arc::new(RecordStats::default());
        let (sender, _receiver) = sync_channel(1);
        let exporters = Exporters {
            collectors: vec![("c:1".into(), sender)],
            stats: stats.clone(),
        };
        exporters.send(Vec::new());
        exporters.send(Vec::new());
        assert_eq!(stats.ipfix_export_errors.load(Ordering::Relaxed), 1);
    }
}
