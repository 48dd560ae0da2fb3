//! Request/response latency: a UDP ping-pong, waiting asleep or busy-polling.

use std::{
    net::{SocketAddr, UdpSocket},
    sync::{
        Arc,
        atomic::{AtomicBool, Ordering},
    },
    time::{Duration, Instant},
};

use anyhow::{Context as _, Result, ensure};
use visibility_tests::lab::{Lab, pin_to_cpu};

use crate::{figures::*, options::*, udp::nothing_came};

/// How the ping-pong's two ends wait for a message.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub(crate) enum Waiting {
    /// Asleep in `recv` until the message arrives.
    Blocking,
    /// Spinning on a non-blocking `recv`: no CPU ever sleeps, so no wake-up is timed.
    BusyPolling,
}

/// How long the client waits for an answer before it counts the request as lost.
pub(crate) const RR_ANSWER_TIMEOUT: Duration = Duration::from_millis(500);

pub(crate) fn round_trips(
    lab: &Lab,
    requests: usize,
    warmup: usize,
    waiting: Waiting,
) -> Result<RoundTrips> {
    let busy = waiting == Waiting::BusyPolling;
    let server = lab
        .pod_ns(SERVER_POD)
        .udp_bind(SocketAddr::new(lab.pod_ipv4(SERVER_POD).into(), 0))?;
    if busy {
        server.set_nonblocking(true)?;
    } else {
        // Wakes up now and then to see whether it should stop.
        server.set_read_timeout(Some(Duration::from_millis(50)))?;
    }
    let to = server.local_addr()?;
    let stop = Arc::new(AtomicBool::new(false));
    let serving = {
        let stop = stop.clone();
        std::thread::Builder::new()
            .name("rr-server".into())
            .spawn(move || -> Result<()> {
                pin_to_cpu(SERVER_CPU)?;
                let mut buf = [0u8; 2048];
                while !stop.load(Ordering::Relaxed) {
                    match server.recv_from(&mut buf) {
                        Ok((n, peer)) => {
                            server.send_to(&buf[..n], peer).context("RR server: send")?;
                        }
                        Err(e) if nothing_came(&e) => {}
                        Err(e) => return Err(e).context("RR server: receive"),
                    }
                }
                Ok(())
            })?
    };
    let client = lab
        .pod_ns(CLIENT_POD)
        .spawn(move || -> Result<(Vec<u64>, u64)> {
            pin_to_cpu(CLIENT_CPU)?;
            let socket = UdpSocket::bind("0.0.0.0:0")?;
            socket.connect(to)?;
            if busy {
                socket.set_nonblocking(true)?;
            } else {
                socket.set_read_timeout(Some(RR_ANSWER_TIMEOUT))?;
            }
            let mut message = [0u8; RR_PAYLOAD];
            let mut reply = [0u8; 2048];
            let mut nanos = Vec::with_capacity(requests);
            let mut lost = 0u64;
            for seq in 0..(warmup + requests) as u64 {
                message[..8].copy_from_slice(&seq.to_be_bytes());
                let sent_at = Instant::now();
                socket.send(&message).context("RR client: send")?;
                let answered = loop {
                    match socket.recv(&mut reply) {
                        Ok(n) if n >= 8 && reply[..8] == seq.to_be_bytes() => break true,
                        Ok(_) => continue, // a late answer to a lost request
                        Err(e)
                            if busy
                                && e.kind() == std::io::ErrorKind::WouldBlock
                                && sent_at.elapsed() < RR_ANSWER_TIMEOUT =>
                        {
                            std::hint::spin_loop();
                        }
                        Err(e)
                            if matches!(
                                e.kind(),
                                std::io::ErrorKind::WouldBlock | std::io::ErrorKind::TimedOut
                            ) =>
                        {
                            break false;
                        }
                        Err(e) if e.kind() == std::io::ErrorKind::Interrupted => continue,
                        Err(e) => return Err(e).context("RR client: receive"),
                    }
                };
                let elapsed = sent_at.elapsed();
                if !answered {
                    lost += 1;
                    ensure!(lost <= 20, "more than 20 requests went unanswered");
                } else if seq >= warmup as u64 {
                    nanos.push(elapsed.as_nanos() as u64);
                }
            }
            Ok((nanos, lost))
        })?;
    let client = join(client, "RR client");
    stop.store(true, Ordering::Relaxed);
    join(serving, "RR server")?;
    let (mut nanos, lost) = client?;
    ensure!(!nanos.is_empty(), "no round trips measured");
    nanos.sort_unstable();
    let us = |n: u64| n as f64 / 1000.0;
    let mean = nanos.iter().sum::<u64>() as f64 / nanos.len() as f64 / 1000.0;
    Ok(RoundTrips {
        mean_us: mean,
        p50_us: us(percentile(&nanos, 50.0)),
        p99_us: us(percentile(&nanos, 99.0)),
        max_us: us(*nanos.last().expect("not empty")),
        lost,
        requests: nanos.len(),
    })
}
