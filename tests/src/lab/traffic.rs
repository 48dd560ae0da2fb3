//! Traffic from inside a namespace: pings, TCP connections and requests, UDP datagrams
//! and requests.

use std::{
    io::Write,
    net::{IpAddr, Ipv4Addr, Ipv6Addr, Shutdown, SocketAddr, TcpListener, TcpStream, UdpSocket},
    process::Stdio,
    time::{Duration, Instant},
};

use anyhow::{Context, Result};

use super::{
    deadline::{read_to_end_until, remaining, udp_recv},
    netns::Netns,
};

/// The timeout the traffic helpers' callers are expected to use by default.
pub const DEFAULT_TIMEOUT: Duration = Duration::from_secs(5);

impl Netns {
    /// Pings `addr` (IPv4 or IPv6) `count` times, 0.2 s apart, waiting up to 2 s for each
    /// reply. Succeeds if at least one reply came back. Needs iputils `ping`.
    pub fn ping(&self, addr: impl Into<IpAddr>, count: u32) -> Result<()> {
        let addr = addr.into();
        self.run(
            "ping",
            [
                "-n",
                "-q",
                "-c",
                &count.to_string(),
                "-i",
                "0.2",
                "-W",
                "2",
                &addr.to_string(),
            ],
        )
        .with_context(|| format!("ping {addr} from netns {}", self.name()))?;
        Ok(())
    }

    /// Whether one ping to `addr` gets a reply within `wait` (rounded up to whole seconds).
    pub fn ping_once(&self, addr: impl Into<IpAddr>, wait: Duration) -> bool {
        let addr = addr.into();
        let secs = wait.as_secs_f64().ceil().max(1.0) as u64;
        self.cmd(
            "ping",
            [
                "-n",
                "-q",
                "-c",
                "1",
                "-W",
                &secs.to_string(),
                &addr.to_string(),
            ],
        )
        .stdout(Stdio::null())
        .stderr(Stdio::null())
        .status()
        .is_ok_and(|s| s.success())
    }

    /// Connects to `addr` over TCP from this namespace within `timeout`.
    pub fn tcp_connect(&self, addr: SocketAddr, timeout: Duration) -> Result<TcpStream> {
        self.in_ns(move || TcpStream::connect_timeout(&addr, timeout))?
            .with_context(|| format!("TCP connect to {addr} from netns {}", self.name()))
    }

    /// A TCP request from this namespace: connects to `addr`, sends `payload`, shuts down
    /// its sending side and reads the reply until the server closes. Every step shares
    /// `timeout`.
    pub fn tcp_request(
        &self,
        addr: SocketAddr,
        payload: &[u8],
        timeout: Duration,
    ) -> Result<Vec<u8>> {
        let deadline = Instant::now() + timeout;
        let mut stream = self.tcp_connect(addr, timeout)?;
        let what = || format!("TCP request to {addr} from netns {}", self.name());
        stream
            .set_write_timeout(Some(remaining(deadline)?))
            .with_context(what)?;
        stream.write_all(payload).with_context(what)?;
        stream.shutdown(Shutdown::Write).with_context(what)?;
        let mut reply = Vec::new();
        read_to_end_until(&mut stream, &mut reply, deadline).with_context(what)?;
        Ok(reply)
    }

    /// Binds a TCP listener in this namespace (port 0 picks a free port).
    pub fn tcp_listen(&self, addr: SocketAddr) -> Result<TcpListener> {
        self.in_ns(move || TcpListener::bind(addr))?
            .with_context(|| format!("TCP listen on {addr} in netns {}", self.name()))
    }

    /// Binds a UDP socket in this namespace (port 0 picks a free port).
    pub fn udp_bind(&self, addr: SocketAddr) -> Result<UdpSocket> {
        self.in_ns(move || UdpSocket::bind(addr))?
            .with_context(|| format!("UDP bind {addr} in netns {}", self.name()))
    }

    /// Sends one UDP datagram from this namespace (from a fresh socket on a free port) and
    /// returns that socket, e.g. to wait for a reply with [`udp_recv`].
    pub fn udp_send(&self, to: SocketAddr, payload: &[u8]) -> Result<UdpSocket> {
        let socket = self.udp_bind(unspecified(to))?;
        socket
            .send_to(payload, to)
            .with_context(|| format!("UDP send to {to} from netns {}", self.name()))?;
        Ok(socket)
    }

    /// A UDP request from this namespace: sends `payload` to `to` and waits up to
    /// `timeout` for a datagram back from `to`.
    pub fn udp_request(
        &self,
        to: SocketAddr,
        payload: &[u8],
        timeout: Duration,
    ) -> Result<Vec<u8>> {
        let socket = self.udp_bind(unspecified(to))?;
        let what = || format!("UDP request to {to} from netns {}", self.name());
        socket.connect(to).with_context(what)?;
        socket.send(payload).with_context(what)?;
        let (data, _) = udp_recv(&socket, timeout).with_context(what)?;
        Ok(data)
    }
}

/// The unspecified address with port 0 in `to`'s family.
fn unspecified(to: SocketAddr) -> SocketAddr {
    match to {
        SocketAddr::V4(_) => (Ipv4Addr::UNSPECIFIED, 0).into(),
        SocketAddr::V6(_) => (Ipv6Addr::UNSPECIFIED, 0).into(),
    }
}
