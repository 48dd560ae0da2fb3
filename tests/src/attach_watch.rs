//! When a new Pod's host route appears, and when the daemon has attached both Pod
//! programs to its interface: a thread in the node's namespace, subscribed to IPv4 route
//! events as the daemon is, notes `RTM_NEWROUTE` for each /32, and polls the link pins
//! `<pin-dir>/links/if<ifindex>_pod_ingress` and `..._pod_egress` every millisecond
//! (so this needs TCX, Linux 6.6 and later; the pins are made right after each attach).
//! The benchmarks `attach_latency` and `churn` time attachment with it.

use std::{
    collections::HashMap,
    net::Ipv4Addr,
    os::fd::{AsRawFd as _, OwnedFd},
    sync::{
        Arc, Mutex,
        atomic::{AtomicBool, Ordering},
    },
    time::{Duration, Instant},
};

use anyhow::{Context as _, Result, ensure};
use nix::sys::socket::{
    AddressFamily, MsgFlags, NetlinkAddr, SockFlag, SockProtocol, SockType, bind, recv, setsockopt,
    socket, sockopt,
};

use crate::lab::Lab;

/// How long a single Pod may take to be attached before a benchmark fails: far beyond
/// the tens of milliseconds it takes (see the README's Performance section), so that
/// only a Pod the daemon missed fails it.
pub const ATTACH_TIMEOUT: Duration = Duration::from_secs(15);

/// One host route seen, and when its interface's programs were pinned.
#[derive(Debug, Clone, Copy)]
pub struct Entry {
    /// The route's output interface.
    pub ifindex: u32,
    /// When `RTM_NEWROUTE` arrived.
    pub route_at: Instant,
    /// When the first of the two link pins existed.
    pub first_at: Option<Instant>,
    /// When both existed.
    pub attached_at: Option<Instant>,
}

/// A thread that notes new host routes (netlink) and when their interface's link pins
/// appear, every millisecond.
pub struct Watch {
    entries: Arc<Mutex<HashMap<Ipv4Addr, Entry>>>,
    stop: Arc<AtomicBool>,
    thread: Option<std::thread::JoinHandle<Result<()>>>,
}

impl Watch {
    /// Starts watching the node of `lab`, whose daemon pins links under `links`.
    pub fn start(lab: &Lab, links: std::path::PathBuf) -> Result<Self> {
        let socket = lab.node().try_in_ns(|| {
            let fd = socket(
                AddressFamily::Netlink,
                SockType::Raw,
                SockFlag::SOCK_CLOEXEC | SockFlag::SOCK_NONBLOCK,
                SockProtocol::NetlinkRoute,
            )
            .context("netlink socket")?;
            setsockopt(&fd, sockopt::RcvBufForce, &(4 << 20)).context("SO_RCVBUFFORCE")?;
            bind(
                fd.as_raw_fd(),
                &NetlinkAddr::new(0, libc::RTMGRP_IPV4_ROUTE as u32),
            )
            .context("binding to RTMGRP_IPV4_ROUTE")?;
            Ok(fd)
        })?;
        let entries = Arc::new(Mutex::new(HashMap::new()));
        let stop = Arc::new(AtomicBool::new(false));
        let thread = {
            let (entries, stop) = (entries.clone(), stop.clone());
            std::thread::Builder::new()
                .name("route-watch".into())
                .spawn(move || watch(socket, &links, &entries, &stop))?
        };
        Ok(Self {
            entries,
            stop,
            thread: Some(thread),
        })
    }

    /// What was seen of the host route to `addr`.
    pub fn entry(&self, addr: Ipv4Addr) -> Option<Entry> {
        self.entries
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .get(&addr)
            .copied()
    }

    /// Waits until both programs are attached to `ifindex`, whose host route to `addr`
    /// must have appeared, and returns what was seen; fails after [`ATTACH_TIMEOUT`].
    pub fn wait_attached(&self, addr: Ipv4Addr, ifindex: u32) -> Result<Entry> {
        let deadline = Instant::now() + ATTACH_TIMEOUT;
        loop {
            if let Some(entry) = self.entry(addr) {
                ensure!(
                    entry.ifindex == ifindex,
                    "the route to {addr} points to ifindex {}, the Pod's veth is {ifindex}",
                    entry.ifindex
                );
                if entry.attached_at.is_some() {
                    return Ok(entry);
                }
            }
            ensure!(
                Instant::now() < deadline,
                "{addr} (ifindex {ifindex}) not attached within {ATTACH_TIMEOUT:?} (route seen: {})",
                self.entry(addr).is_some()
            );
            std::thread::sleep(Duration::from_millis(1));
        }
    }

    /// Stops the thread, reporting what made it fail, if anything.
    pub fn stop(mut self) {
        self.stop.store(true, Ordering::Relaxed);
        if let Some(thread) = self.thread.take() {
            match thread.join() {
                Ok(Err(error)) => eprintln!("attach watch: {error:#}"),
                Ok(Ok(())) => {}
                Err(panic) => std::panic::resume_unwind(panic),
            }
        }
    }
}

impl Drop for Watch {
    fn drop(&mut self) {
        self.stop.store(true, Ordering::Relaxed);
    }
}

fn watch(
    socket: OwnedFd,
    links: &std::path::Path,
    entries: &Mutex<HashMap<Ipv4Addr, Entry>>,
    stop: &AtomicBool,
) -> Result<()> {
    let mut buf = vec![0u8; 1 << 16];
    while !stop.load(Ordering::Relaxed) {
        loop {
            match recv(socket.as_raw_fd(), &mut buf, MsgFlags::empty()) {
                Ok(n) => {
                    let now = Instant::now();
                    let mut entries = entries.lock().unwrap_or_else(|e| e.into_inner());
                    for (dst, ifindex) in new_host_routes(&buf[..n]) {
                        entries.entry(dst).or_insert(Entry {
                            ifindex,
                            route_at: now,
                            first_at: None,
                            attached_at: None,
                        });
                    }
                }
                Err(nix::errno::Errno::EAGAIN) => break,
                Err(nix::errno::Errno::EINTR) => {}
                Err(nix::errno::Errno::ENOBUFS) => {
                    eprintln!("attach watch: the netlink socket overran; events were lost");
                }
                Err(e) => return Err(e).context("reading route events"),
            }
        }
        {
            let now = Instant::now();
            let mut entries = entries.lock().unwrap_or_else(|e| e.into_inner());
            for entry in entries.values_mut().filter(|e| e.attached_at.is_none()) {
                let pinned = ["pod_ingress", "pod_egress"].map(|program| {
                    links
                        .join(format!("if{}_{program}", entry.ifindex))
                        .exists()
                });
                if entry.first_at.is_none() && pinned.iter().any(|p| *p) {
                    entry.first_at = Some(now);
                }
                if pinned.iter().all(|p| *p) {
                    entry.attached_at = Some(now);
                }
            }
        }
        std::thread::sleep(Duration::from_millis(1));
    }
    Ok(())
}

const NLMSG_HDRLEN: usize = 16;
const RTMSG_LEN: usize = 12;
const RTM_NEWROUTE: u16 = 24;
const RTA_DST: u16 = 1;
const RTA_OIF: u16 = 4;
const RTA_TABLE: u16 = 15;
const RT_TABLE_MAIN: u32 = 254;

fn align4(n: usize) -> usize {
    (n + 3) & !3
}

fn u16_at(b: &[u8], at: usize) -> u16 {
    u16::from_ne_bytes([b[at], b[at + 1]])
}

fn u32_at(b: &[u8], at: usize) -> u32 {
    u32::from_ne_bytes([b[at], b[at + 1], b[at + 2], b[at + 3]])
}

/// The IPv4 /32 routes of the main table that a netlink datagram announces: (destination,
/// output interface).
fn new_host_routes(buf: &[u8]) -> Vec<(Ipv4Addr, u32)> {
    let mut found = Vec::new();
    let mut at = 0;
    while at + NLMSG_HDRLEN <= buf.len() {
        let len = u32_at(buf, at) as usize;
        if len < NLMSG_HDRLEN || at + len > buf.len() {
            break;
        }
        let kind = u16_at(buf, at + 4);
        let body = &buf[at + NLMSG_HDRLEN..at + len];
        at += align4(len);
        if kind != RTM_NEWROUTE || body.len() < RTMSG_LEN {
            continue;
        }
        let (family, dst_len) = (body[0], body[1]);
        if i32::from(family) != libc::AF_INET || dst_len != 32 {
            continue;
        }
        let mut table = u32::from(body[4]);
        let (mut dst, mut oif) = (None, None);
        let mut a = RTMSG_LEN;
        while a + 4 <= body.len() {
            let alen = usize::from(u16_at(body, a));
            let atype = u16_at(body, a + 2);
            if alen < 4 || a + alen > body.len() {
                break;
            }
            let data = &body[a + 4..a + alen];
            match (atype, data.len()) {
                (RTA_DST, 4) => dst = Some(Ipv4Addr::new(data[0], data[1], data[2], data[3])),
                (RTA_OIF, 4) => oif = Some(u32_at(data, 0)),
                (RTA_TABLE, 4) => table = u32_at(data, 0),
                _ => {}
            }
            a += align4(alen);
        }
        if let (Some(dst), Some(oif), RT_TABLE_MAIN) = (dst, oif, table) {
            found.push((dst, oif));
        }
    }
    found
}
