//! Reads that give up at a deadline: a TCP stream to its end, one UDP datagram.

use std::{
    io::{ErrorKind, Read},
    net::{SocketAddr, TcpStream, UdpSocket},
    time::{Duration, Instant},
};

use anyhow::{Context, Result, bail, ensure};

pub(super) fn remaining(deadline: Instant) -> Result<Duration> {
    let left = deadline.saturating_duration_since(Instant::now());
    ensure!(!left.is_zero(), "timed out");
    Ok(left)
}

pub(super) fn is_timeout(e: &std::io::Error) -> bool {
    matches!(e.kind(), ErrorKind::WouldBlock | ErrorKind::TimedOut)
}

pub(super) fn read_to_end_until(
    stream: &mut TcpStream,
    buf: &mut Vec<u8>,
    deadline: Instant,
) -> Result<()> {
    let mut chunk = [0u8; 16 * 1024];
    loop {
        stream.set_read_timeout(Some(remaining(deadline)?))?;
        match stream.read(&mut chunk) {
            Ok(0) => return Ok(()),
            Ok(n) => buf.extend_from_slice(&chunk[..n]),
            Err(e) if e.kind() == ErrorKind::Interrupted => {}
            Err(e) if is_timeout(&e) => bail!("timed out after reading {} bytes", buf.len()),
            Err(e) => return Err(e.into()),
        }
    }
}

/// Receives one datagram on `socket`, waiting up to `timeout`. Returns it and its sender.
pub fn udp_recv(socket: &UdpSocket, timeout: Duration) -> Result<(Vec<u8>, SocketAddr)> {
    let deadline = Instant::now() + timeout;
    let mut buf = vec![0u8; 65536];
    loop {
        socket.set_read_timeout(Some(
            remaining(deadline).context("waiting for a UDP datagram")?,
        ))?;
        match socket.recv_from(&mut buf) {
            Ok((n, from)) => {
                buf.truncate(n);
                return Ok((buf, from));
            }
            Err(e) if e.kind() == ErrorKind::Interrupted => {}
            Err(e) if is_timeout(&e) => bail!("timed out waiting for a UDP datagram"),
            Err(e) => return Err(e.into()),
        }
    }
}
