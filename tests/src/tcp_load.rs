//! A long-running TCP conversation between two Pods: a message every interval, each
//! echoed and checked, to show that a connection survives what a test does meanwhile.

use std::{
    io::{ErrorKind, Read as _, Write as _},
    net::{IpAddr, Shutdown, SocketAddr, TcpStream},
    sync::{
        Arc, Mutex,
        atomic::{AtomicBool, AtomicU64, Ordering},
    },
    thread::JoinHandle,
    time::{Duration, Instant},
};

use anyhow::{Context as _, Result, bail, ensure};

use crate::lab::Netns;

use crate::node::poll;

/// Size of one [`TcpLoad`] message.
const MESSAGE_LEN: usize = 64;

/// What a [`TcpLoad`] did, once stopped.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct LoadReport {
    /// Messages sent and echoed back intact.
    pub messages: u64,
    /// Bytes sent (all of them echoed back).
    pub bytes: u64,
    /// Bytes the server echoed.
    pub server_bytes: u64,
    /// The longest a message waited for its echo.
    pub max_round_trip: Duration,
}

/// One TCP connection between two namespaces that carries a message every `interval` for
/// as long as it lives: the client (in one Pod) sends a numbered message, waits for the
/// server (in another) to echo it and checks it, then sleeps. Any error (on connect, send
/// or receive, a wrong echo, or an echo that takes longer than `echo_timeout`) ends the
/// client, and [`TcpLoad::stop`] or [`TcpLoad::wait_for_echoes`] report it.
pub struct TcpLoad {
    stop: Arc<AtomicBool>,
    echoed: Arc<AtomicU64>,
    client_addr: SocketAddr,
    server_addr: SocketAddr,
    client: Option<JoinHandle<Result<LoadReport>>>,
    server: Option<JoinHandle<Result<u64>>>,
    /// The first error of the client, as soon as it happens (the thread ends with it).
    failure: Arc<Mutex<Option<String>>>,
}

impl TcpLoad {
    /// Connects from `client_ns` to a fresh echo server on `server_ip` in `server_ns`.
    pub fn start(
        client_ns: &Netns,
        server_ns: &Netns,
        server_ip: IpAddr,
        interval: Duration,
        echo_timeout: Duration,
    ) -> Result<Self> {
        let listener = server_ns.tcp_listen(SocketAddr::new(server_ip, 0))?;
        let server_addr = listener.local_addr()?;
        let server = std::thread::Builder::new()
            .name(format!("echo-{server_addr}"))
            .spawn(move || -> Result<u64> {
                listener.set_nonblocking(true)?;
                let deadline = Instant::now() + Duration::from_secs(10);
                let mut stream = loop {
                    match listener.accept() {
                        Ok((stream, _)) => break stream,
                        Err(e)
                            if e.kind() == ErrorKind::WouldBlock && Instant::now() < deadline =>
                        {
                            std::thread::sleep(Duration::from_millis(5));
                        }
                        Err(e) => return Err(e).context("echo server: accept"),
                    }
                };
                stream.set_nonblocking(false)?;
                // Generous: only a client that went away without closing would hit it.
                stream.set_read_timeout(Some(Duration::from_secs(120)))?;
                let mut total = 0u64;
                let mut buf = [0u8; 4096];
                loop {
                    match stream.read(&mut buf) {
                        Ok(0) => break,
                        Ok(n) => {
                            stream.write_all(&buf[..n]).context("echo server: write")?;
                            total += n as u64;
                        }
                        Err(e) if e.kind() == ErrorKind::Interrupted => {}
                        Err(e) => {
                            return Err(e)
                                .with_context(|| format!("echo server: read after {total} bytes"));
                        }
                    }
                }
                let _ = stream.shutdown(Shutdown::Write);
                Ok(total)
            })?;
        let stream = client_ns.tcp_connect(server_addr, Duration::from_secs(5))?;
        stream.set_nodelay(true)?;
        stream.set_read_timeout(Some(echo_timeout))?;
        stream.set_write_timeout(Some(echo_timeout))?;
        let client_addr = stream.local_addr()?;
        let stop = Arc::new(AtomicBool::new(false));
        let echoed = Arc::new(AtomicU64::new(0));
        let failure = Arc::new(Mutex::new(None));
        let (stop2, echoed2, failure2) = (stop.clone(), echoed.clone(), failure.clone());
        let client = std::thread::Builder::new()
            .name(format!("load-{client_addr}"))
            .spawn(move || {
                let result = run_client(stream, &stop2, &echoed2, interval);
                if let Err(error) = &result {
                    *failure2.lock().unwrap_or_else(|e| e.into_inner()) =
                        Some(format!("{error:#}"));
                }
                result
            })?;
        Ok(Self {
            stop,
            echoed,
            client_addr,
            server_addr,
            client: Some(client),
            server: Some(server),
            failure,
        })
    }

    /// The client's address (the connection's source).
    pub fn client_addr(&self) -> SocketAddr {
        self.client_addr
    }

    /// The server's address (the connection's destination).
    pub fn server_addr(&self) -> SocketAddr {
        self.server_addr
    }

    /// Messages echoed so far.
    pub fn echoed(&self) -> u64 {
        self.echoed.load(Ordering::SeqCst)
    }

    /// The client's error, if it has failed.
    pub fn failure(&self) -> Option<String> {
        self.failure
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .clone()
    }

    /// Waits until `more` further messages were echoed; fails at once if the client failed.
    pub fn wait_for_echoes(&self, more: u64, timeout: Duration) -> Result<u64> {
        let target = self.echoed() + more;
        poll(timeout, &format!("{more} more echoed messages"), || {
            if let Some(failure) = self.failure() {
                bail!(
                    "the TCP connection broke after {} messages: {failure}",
                    self.echoed()
                );
            }
            Ok((self.echoed() >= target).then(|| self.echoed()))
        })
    }

    /// Stops sending, closes the connection and reports; any error on the way (in the
    /// client or the server) fails.
    pub fn stop(mut self) -> Result<LoadReport> {
        self.stop.store(true, Ordering::SeqCst);
        let client = self.client.take().expect("joined once").join();
        let mut report = match client {
            Ok(result) => result.context("TCP load client")?,
            Err(panic) => std::panic::resume_unwind(panic),
        };
        report.server_bytes = match self.server.take().expect("joined once").join() {
            Ok(result) => result.context("TCP load server")?,
            Err(panic) => std::panic::resume_unwind(panic),
        };
        ensure!(
            report.server_bytes == report.bytes,
            "sent {} bytes, the server echoed {}",
            report.bytes,
            report.server_bytes
        );
        Ok(report)
    }
}

impl Drop for TcpLoad {
    fn drop(&mut self) {
        self.stop.store(true, Ordering::SeqCst);
    }
}

fn run_client(
    mut stream: TcpStream,
    stop: &AtomicBool,
    echoed: &AtomicU64,
    interval: Duration,
) -> Result<LoadReport> {
    let mut report = LoadReport {
        messages: 0,
        bytes: 0,
        server_bytes: 0,
        max_round_trip: Duration::ZERO,
    };
    let started = Instant::now();
    while !stop.load(Ordering::SeqCst) {
        let mut message = [0u8; MESSAGE_LEN];
        message[..8].copy_from_slice(&report.messages.to_be_bytes());
        for (i, byte) in message[8..].iter_mut().enumerate() {
            *byte = (report.messages as u8).wrapping_add(i as u8);
        }
        let number = report.messages;
        let what = || format!("message {number} at {:?}", started.elapsed());
        let sent_at = Instant::now();
        stream
            .write_all(&message)
            .with_context(|| format!("sending {}", what()))?;
        report.bytes += MESSAGE_LEN as u64;
        let mut echo = [0u8; MESSAGE_LEN];
        stream
            .read_exact(&mut echo)
            .with_context(|| format!("receiving the echo of {}", what()))?;
        ensure!(echo == message, "the echo of {} differs: {echo:?}", what());
        report.max_round_trip = report.max_round_trip.max(sent_at.elapsed());
        report.messages += 1;
        echoed.store(report.messages, Ordering::SeqCst);
        std::thread::sleep(interval);
    }
    stream
        .shutdown(Shutdown::Write)
        .context("closing the sending side")?;
    let mut rest = Vec::new();
    stream
        .read_to_end(&mut rest)
        .context("reading until the server closes")?;
    ensure!(
        rest.is_empty(),
        "{} unexpected bytes after the last echo",
        rest.len()
    );
    Ok(report)
}
