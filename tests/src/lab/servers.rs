//! TCP and UDP servers in a namespace that answer a fixed number of requests on a
//! background thread and report what they received.

use std::{
    io::{ErrorKind, Write},
    net::{Shutdown, SocketAddr},
    sync::{
        Arc,
        atomic::{AtomicBool, Ordering},
    },
    thread::JoinHandle,
    time::{Duration, Instant},
};

use anyhow::{Context, Result, ensure};

use super::{
    deadline::{is_timeout, read_to_end_until, remaining, udp_recv},
    netns::Netns,
};

/// What a [`TcpServer`] or [`UdpServer`] sends back.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Reply {
    /// The bytes received.
    Echo,
    /// These bytes.
    Fixed(Vec<u8>),
    /// Nothing (TCP: the connection is just closed).
    Nothing,
}

impl Reply {
    fn for_request(&self, request: &[u8]) -> Option<Vec<u8>> {
        match self {
            Reply::Echo => Some(request.to_vec()),
            Reply::Fixed(bytes) => Some(bytes.clone()),
            Reply::Nothing => None,
        }
    }
}

/// One TCP connection or UDP datagram that a server received.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Received {
    /// The peer's address as the server saw it (shows any NAT on the way).
    pub peer: SocketAddr,
    /// The bytes received (TCP: everything up to the client's shutdown).
    pub data: Vec<u8>,
}

type ServerThread = JoinHandle<Result<Vec<Received>>>;

fn join_server(handle: Option<ServerThread>, kind: &str) -> Result<Vec<Received>> {
    match handle.expect("joined once").join() {
        Ok(result) => result.with_context(|| format!("{kind} server")),
        Err(panic) => std::panic::resume_unwind(panic),
    }
}

/// A TCP server in a namespace that serves a fixed number of connections on a background
/// thread. For each connection it reads until the client shuts down its sending side
/// (EOF), sends the [`Reply`] and closes.
///
/// Dropping it without [`TcpServer::join`] stops the thread soon after.
#[derive(Debug)]
pub struct TcpServer {
    addr: SocketAddr,
    stop: Arc<AtomicBool>,
    handle: Option<ServerThread>,
}

impl TcpServer {
    /// Listens on `bind` in `ns` (port 0 picks a free port) and serves `connections`
    /// connections; gives up `timeout` after starting.
    pub fn start(
        ns: &Netns,
        bind: SocketAddr,
        connections: usize,
        reply: Reply,
        timeout: Duration,
    ) -> Result<Self> {
        let listener = ns.tcp_listen(bind)?;
        let addr = listener.local_addr()?;
        listener.set_nonblocking(true)?;
        let stop = Arc::new(AtomicBool::new(false));
        let stop2 = stop.clone();
        let deadline = Instant::now() + timeout;
        let handle = std::thread::Builder::new()
            .name(format!("tcp-server-{addr}"))
            .spawn(move || -> Result<Vec<Received>> {
                let mut received = Vec::with_capacity(connections);
                while received.len() < connections {
                    ensure!(!stop2.load(Ordering::Relaxed), "stopped");
                    match listener.accept() {
                        Ok((mut stream, peer)) => {
                            stream.set_nonblocking(false)?;
                            let mut data = Vec::new();
                            read_to_end_until(&mut stream, &mut data, deadline)
                                .with_context(|| format!("reading from {peer}"))?;
                            if let Some(answer) = reply.for_request(&data) {
                                stream.set_write_timeout(Some(remaining(deadline)?))?;
                                stream
                                    .write_all(&answer)
                                    .with_context(|| format!("replying to {peer}"))?;
                            }
                            let _ = stream.shutdown(Shutdown::Both);
                            received.push(Received { peer, data });
                        }
                        Err(e) if is_timeout(&e) || e.kind() == ErrorKind::Interrupted => {
                            ensure!(
                                Instant::now() < deadline,
                                "timed out on {addr} after {} of {connections} connections",
                                received.len()
                            );
                            std::thread::sleep(Duration::from_millis(2));
                        }
                        Err(e) => return Err(e).context("accept"),
                    }
                }
                Ok(received)
            })?;
        Ok(Self {
            addr,
            stop,
            handle: Some(handle),
        })
    }

    /// The address the server listens on (with the real port).
    pub fn local_addr(&self) -> SocketAddr {
        self.addr
    }

    /// Waits for the server to finish and returns what it received, in order.
    pub fn join(mut self) -> Result<Vec<Received>> {
        join_server(self.handle.take(), "TCP")
    }
}

impl Drop for TcpServer {
    fn drop(&mut self) {
        self.stop.store(true, Ordering::Relaxed);
    }
}

/// A UDP server in a namespace that handles a fixed number of datagrams on a background
/// thread, answering each with the [`Reply`] (sent from the server's address).
///
/// Dropping it without [`UdpServer::join`] stops the thread soon after.
#[derive(Debug)]
pub struct UdpServer {
    addr: SocketAddr,
    stop: Arc<AtomicBool>,
    handle: Option<ServerThread>,
}

impl UdpServer {
    /// Binds `bind` in `ns` (port 0 picks a free port) and handles `datagrams` datagrams;
    /// gives up `timeout` after starting.
    pub fn start(
        ns: &Netns,
        bind: SocketAddr,
        datagrams: usize,
        reply: Reply,
        timeout: Duration,
    ) -> Result<Self> {
        let socket = ns.udp_bind(bind)?;
        let addr = socket.local_addr()?;
        let stop = Arc::new(AtomicBool::new(false));
        let stop2 = stop.clone();
        let deadline = Instant::now() + timeout;
        let handle = std::thread::Builder::new()
            .name(format!("udp-server-{addr}"))
            .spawn(move || -> Result<Vec<Received>> {
                let mut received = Vec::with_capacity(datagrams);
                while received.len() < datagrams {
                    ensure!(!stop2.load(Ordering::Relaxed), "stopped");
                    ensure!(
                        Instant::now() < deadline,
                        "timed out on {addr} after {} of {datagrams} datagrams",
                        received.len()
                    );
                    // Short slices so a drop is noticed quickly.
                    let slice = remaining(deadline)
                        .unwrap_or(Duration::from_millis(1))
                        .min(Duration::from_millis(50));
                    match udp_recv(&socket, slice) {
                        Ok((data, peer)) => {
                            if let Some(answer) = reply.for_request(&data) {
                                socket
                                    .send_to(&answer, peer)
                                    .with_context(|| format!("replying to {peer}"))?;
                            }
                            received.push(Received { peer, data });
                        }
                        Err(_) => continue,
                    }
                }
                Ok(received)
            })?;
        Ok(Self {
            addr,
            stop,
            handle: Some(handle),
        })
    }

    /// The address the server is bound to (with the real port).
    pub fn local_addr(&self) -> SocketAddr {
        self.addr
    }

    /// Waits for the server to finish and returns what it received, in order.
    pub fn join(mut self) -> Result<Vec<Received>> {
        join_server(self.handle.take(), "UDP")
    }
}

impl Drop for UdpServer {
    fn drop(&mut self) {
        self.stop.store(true, Ordering::Relaxed);
    }
}
