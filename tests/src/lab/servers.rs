//! TCP and UDP servers in a namespace that answer a fixed number of requests on a
//! background thread and report what they received.

use std::{
    io::{ErrorKind, Write},
    marker::PhantomData,
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

/// What both servers share: the thread that serves a fixed number of requests, with a
/// flag that stops it when the server is dropped unjoined.
#[derive(Debug)]
struct Serving {
    addr: SocketAddr,
    kind: &'static str,
    stop: Arc<AtomicBool>,
    handle: Option<JoinHandle<Result<Vec<Received>>>>,
}

impl Serving {
    /// Runs `serve_one` on a thread named `<kind>-server-<addr>` until it has returned
    /// `count` requests, the server is dropped, or `serve_one` fails.
    /// `serve_one` returns `None` when nothing came in yet.
    fn spawn(
        kind: &'static str,
        addr: SocketAddr,
        count: usize,
        mut serve_one: impl FnMut(usize) -> Result<Option<Received>> + Send + 'static,
    ) -> Result<Self> {
        let stop = Arc::new(AtomicBool::new(false));
        let stopped = stop.clone();
        let handle = std::thread::Builder::new()
            .name(format!("{}-server-{addr}", kind.to_ascii_lowercase()))
            .spawn(move || -> Result<Vec<Received>> {
                let mut received = Vec::with_capacity(count);
                while received.len() < count {
                    ensure!(!stopped.load(Ordering::Relaxed), "stopped");
                    if let Some(one) = serve_one(received.len())? {
                        received.push(one);
                    }
                }
                Ok(received)
            })?;
        Ok(Self {
            addr,
            kind,
            stop,
            handle: Some(handle),
        })
    }

    fn join(mut self) -> Result<Vec<Received>> {
        match self.handle.take().expect("joined once").join() {
            Ok(result) => result.with_context(|| format!("{} server", self.kind)),
            Err(panic) => std::panic::resume_unwind(panic),
        }
    }
}

impl Drop for Serving {
    fn drop(&mut self) {
        self.stop.store(true, Ordering::Relaxed);
    }
}

/// A server in a namespace on a background thread, [`TcpServer`] or [`UdpServer`].
///
/// Dropping it without [`Server::join`] stops the thread soon after.
#[derive(Debug)]
pub struct Server<Protocol>(Serving, PhantomData<Protocol>);

impl<Protocol> Server<Protocol> {
    /// The address the server listens on or is bound to (with the real port).
    pub fn local_addr(&self) -> SocketAddr {
        self.0.addr
    }

    /// Waits for the server to finish and returns what it received, in order.
    pub fn join(self) -> Result<Vec<Received>> {
        self.0.join()
    }
}

/// The protocol of a [`TcpServer`].
#[derive(Debug)]
pub enum Tcp {}

/// The protocol of a [`UdpServer`].
#[derive(Debug)]
pub enum Udp {}

/// A TCP server in a namespace that serves a fixed number of connections on a background
/// thread. For each connection it reads until the client shuts down its sending side
/// (EOF), sends the [`Reply`] and closes.
pub type TcpServer = Server<Tcp>;

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
        let deadline = Instant::now() + timeout;
        let serving = Serving::spawn("TCP", addr, connections, move |served| {
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
                    Ok(Some(Received { peer, data }))
                }
                Err(e) if is_timeout(&e) || e.kind() == ErrorKind::Interrupted => {
                    ensure!(
                        Instant::now() < deadline,
                        "timed out on {addr} after {served} of {connections} connections"
                    );
                    std::thread::sleep(Duration::from_millis(2));
                    Ok(None)
                }
                Err(e) => Err(e).context("accept"),
            }
        })?;
        Ok(Self(serving, PhantomData))
    }
}

/// A UDP server in a namespace that handles a fixed number of datagrams on a background
/// thread, answering each with the [`Reply`] (sent from the server's address).
pub type UdpServer = Server<Udp>;

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
        let deadline = Instant::now() + timeout;
        let serving = Serving::spawn("UDP", addr, datagrams, move |served| {
            ensure!(
                Instant::now() < deadline,
                "timed out on {addr} after {served} of {datagrams} datagrams"
            );
            // Short slices so a drop is noticed quickly.
            let slice = remaining(deadline)
                .unwrap_or(Duration::from_millis(1))
                .min(Duration::from_millis(50));
            let Ok((data, peer)) = udp_recv(&socket, slice) else {
                return Ok(None);
            };
            if let Some(answer) = reply.for_request(&data) {
                socket
                    .send_to(&answer, peer)
                    .with_context(|| format!("replying to {peer}"))?;
            }
            Ok(Some(Received { peer, data }))
        })?;
        Ok(Self(serving, PhantomData))
    }
}
