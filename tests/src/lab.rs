//! A GKE node, its Pods and its VPC gateway emulated in network namespaces.
//!
//! # Topology
//!
//! ```text
//!  pod ns 0            pod ns 1                node ns                          gateway ns
//! +-----------+       +-----------+           +------------------------------+  +------------------+
//! | eth0      |       | eth0      |           | veth0  10.52.0.1/32 fe80::1  |  |                  |
//! | 10.52.0.2 |<----->|           |---------->| veth1  10.52.0.1/32 fe80::1  |  | eth0 10.128.0.1  |
//! | fd00:52::2|       | 10.52.0.3 |           | eth0 10.128.0.2 fd00:128::2  |<>| fd00:128::1      |
//! +-----------+       +-----------+           +------------------------------+  +------------------+
//! ```
//!
//! This is the ptp CNI layout that GKE uses:
//!
//! * **Pod `i`** (0-based) has its own namespace. Its `eth0` carries
//!   `10.52.0.(i+2)/24 noprefixroute` and `fd00:52::(i+2)/64 nodad noprefixroute`.
//!   It has a link route to `10.52.0.1`, `10.52.0.0/24 via 10.52.0.1` and
//!   `default via 10.52.0.1`, plus `fd00:52::/64 via fe80::1` and `default via fe80::1`.
//! * **The node** has one host-side veth `vethI` for each Pod. Every one of them carries
//!   `10.52.0.1/32` and `fe80::1/64`, plus the host routes
//!   `10.52.0.(i+2) dev vethI scope host` and `fd00:52::(i+2) dev vethI`. The uplink `eth0`
//!   carries `10.128.0.2/24` and `fd00:128::2/64`, with default routes via the gateway.
//!   IPv4 and IPv6 forwarding are on. rp_filter is strict (1) on `all`, `default` and
//!   `eth0` unless [`LabConfig::strict_rp_filter`] is false, which makes it loose (2).
//! * **The gateway** (the VPC) has `eth0` with `10.128.0.1/24` and `fd00:128::1/64`,
//!   forwarding on, ICMP redirects off, and routes for the Pod ranges via the node. It has
//!   no default route, so nothing leaves the machine. The nftables table `inet lab` has a
//!   forward chain that counts every forwarded packet (see
//!   [`Lab::gateway_forwarded_packets`]), runs conntrack with accounting on (so
//!   [`Lab::gateway_flows`] is a flow log) and drops blocked address pairs (see
//!   [`Lab::block`]).
//!
//! With plain routing, Pod-to-Pod traffic stays on the node: the gateway sees none of it.
//!
//! # Parallel use and cleanup
//!
//! Every [`Lab`] gets a unique name prefix `lab-<tag>-<pid>-<counter>`; its namespaces are
//! `<prefix>-gw`, `<prefix>-node` and `<prefix>-p<i>`. All interfaces are created directly
//! inside the lab's namespaces, and nothing in the root namespace is changed. Dropping the
//! [`Lab`] (also while unwinding from a panic) deletes all its namespaces. Namespaces left
//! behind by a process that was killed are removed by the next [`Lab::new`] (see
//! [`cleanup_stale_labs`]).
//!
//! Commands run in a namespace through `nsenter --net=/run/netns/NAME`, which keeps the
//! mount namespace (unlike `ip netns exec`, which remounts `/sys` and hides bpffs).
//!
//! # Requirements
//!
//! Root, iproute2, nftables, conntrack (conntrack-tools), util-linux `nsenter`, procps
//! `sysctl` and iputils `ping`.

use std::ffi::{OsStr, OsString};
use std::fs::File;
use std::io::{ErrorKind, Read, Write};
use std::net::{
    IpAddr, Ipv4Addr, Ipv6Addr, Shutdown, SocketAddr, TcpListener, TcpStream, UdpSocket,
};
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Output, Stdio};
use std::sync::atomic::{AtomicBool, AtomicUsize, Ordering};
use std::sync::{Arc, Mutex, Once};
use std::thread::JoinHandle;
use std::time::{Duration, Instant};

use anyhow::{Context, Result, anyhow, bail, ensure};

/// The Pods' IPv4 range (the node's Pod CIDR).
pub const POD_CIDR_V4: &str = "10.52.0.0/24";
/// The Pods' IPv6 range.
pub const POD_CIDR_V6: &str = "fd00:52::/64";
/// The Pods' IPv4 gateway: the address every host-side veth carries.
pub const POD_GATEWAY_V4: Ipv4Addr = Ipv4Addr::new(10, 52, 0, 1);
/// The Pods' IPv6 gateway: the link-local address every host-side veth carries.
pub const POD_GATEWAY_V6: Ipv6Addr = Ipv6Addr::new(0xfe80, 0, 0, 0, 0, 0, 0, 1);
/// The name of the node's uplink (towards the gateway), in the node namespace.
pub const NODE_UPLINK: &str = "eth0";
/// The name of a Pod's interface, in the Pod's namespace.
pub const POD_IFNAME: &str = "eth0";
/// The name of the gateway's interface, in the gateway namespace.
pub const GATEWAY_IFNAME: &str = "eth0";
/// The node's IPv4 address on the uplink.
pub const NODE_IPV4: Ipv4Addr = Ipv4Addr::new(10, 128, 0, 2);
/// The node's IPv6 address on the uplink.
pub const NODE_IPV6: Ipv6Addr = Ipv6Addr::new(0xfd00, 0x128, 0, 0, 0, 0, 0, 2);
/// The gateway's IPv4 address.
pub const GATEWAY_IPV4: Ipv4Addr = Ipv4Addr::new(10, 128, 0, 1);
/// The gateway's IPv6 address.
pub const GATEWAY_IPV6: Ipv6Addr = Ipv6Addr::new(0xfd00, 0x128, 0, 0, 0, 0, 0, 1);
/// The IPv4 subnet of the link between node and gateway.
pub const UPLINK_CIDR_V4: &str = "10.128.0.0/24";
/// The IPv6 subnet of the link between node and gateway.
pub const UPLINK_CIDR_V6: &str = "fd00:128::/64";
/// How many Pods a lab can hold at most (indices 0..=252, addresses .2 to .254).
pub const MAX_PODS: usize = 253;
/// The timeout the traffic helpers' callers are expected to use by default.
pub const DEFAULT_TIMEOUT: Duration = Duration::from_secs(5);
/// The nftables table (family `inet`) in the gateway namespace.
pub const GATEWAY_NFT_TABLE: &str = "lab";

/// The IPv4 address of Pod `index` (0-based): `10.52.0.(index+2)`.
///
/// # Panics
/// If `index >= MAX_PODS`.
pub fn pod_ipv4(index: usize) -> Ipv4Addr {
    assert!(index < MAX_PODS, "pod index {index} out of range");
    Ipv4Addr::new(10, 52, 0, (index + 2) as u8)
}

/// The IPv6 address of Pod `index` (0-based): `fd00:52::(index+2)`.
///
/// # Panics
/// If `index >= MAX_PODS`.
pub fn pod_ipv6(index: usize) -> Ipv6Addr {
    assert!(index < MAX_PODS, "pod index {index} out of range");
    Ipv6Addr::new(0xfd00, 0x52, 0, 0, 0, 0, 0, (index + 2) as u16)
}

/// The name of Pod `index`'s host-side veth, in the node namespace: `veth<index>`.
pub fn pod_host_ifname(index: usize) -> String {
    format!("veth{index}")
}

/// How to build a [`Lab`].
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct LabConfig {
    /// How many Pods to create up front (more can be added with [`Lab::add_pod`]).
    pub pods: usize,
    /// Strict reverse-path filtering on the node (rp_filter=1, as on Container-Optimized
    /// OS); `false` makes it loose (rp_filter=2).
    pub strict_rp_filter: bool,
}

impl Default for LabConfig {
    /// Three Pods, strict rp_filter.
    fn default() -> Self {
        Self {
            pods: 3,
            strict_rp_filter: true,
        }
    }
}

// ---------------------------------------------------------------------------------------
// Netns
// ---------------------------------------------------------------------------------------

/// A named network namespace (`/run/netns/NAME`).
///
/// This is only a handle: creating and deleting namespaces is up to [`Lab`] (or
/// [`Netns::create`] / [`Netns::delete`]). Cloning it is cheap.
#[derive(Debug, Clone, PartialEq, Eq, Hash)]
pub struct Netns {
    name: String,
}

/// Serializes `ip netns add/del` in this process: the very first `ip netns add` on a
/// machine makes `/run/netns` a shared mount, and concurrent first calls could stack two.
static NETNS_LOCK: Mutex<()> = Mutex::new(());

impl Netns {
    /// A handle for the namespace named `name` (which need not exist yet).
    pub fn from_name(name: impl Into<String>) -> Self {
        Self { name: name.into() }
    }

    /// Creates the namespace (`ip netns add`) and brings its `lo` up.
    pub fn create(name: impl Into<String>) -> Result<Self> {
        let ns = Self::from_name(name);
        {
            let _guard = NETNS_LOCK.lock().unwrap_or_else(|e| e.into_inner());
            run_output(Command::new("ip").args(["netns", "add", &ns.name]))
                .with_context(|| format!("creating netns {}", ns.name))?;
        }
        ns.run("ip", ["link", "set", "lo", "up"])?;
        Ok(ns)
    }

    /// Deletes the namespace. Succeeds if it is already gone.
    ///
    /// Sockets or processes still in the namespace keep it alive (without a name) until
    /// they end; nothing that the name points to remains.
    pub fn delete(&self) -> Result<()> {
        let path = self.path();
        let result = {
            let _guard = NETNS_LOCK.lock().unwrap_or_else(|e| e.into_inner());
            run_output(Command::new("ip").args(["netns", "del", &self.name]))
        };
        if !path.exists() {
            return Ok(());
        }
        // `ip netns del` failed: detach the bind mount and remove the file ourselves.
        let _ = nix::mount::umount2(&path, nix::mount::MntFlags::MNT_DETACH);
        match std::fs::remove_file(&path) {
            Ok(()) => Ok(()),
            Err(e) if e.kind() == ErrorKind::NotFound => Ok(()),
            Err(e) => Err(anyhow!(
                "deleting netns {}: {e}; ip netns del said: {:?}",
                self.name,
                result.err()
            )),
        }
    }

    /// Whether `/run/netns/NAME` exists.
    pub fn exists(&self) -> bool {
        self.path().exists()
    }

    /// The namespace's name.
    pub fn name(&self) -> &str {
        &self.name
    }

    /// The namespace's bind mount, `/run/netns/NAME`.
    pub fn path(&self) -> PathBuf {
        Path::new("/run/netns").join(&self.name)
    }

    /// A command that runs `program args...` in this namespace, through
    /// `nsenter --net=/run/netns/NAME` (the mount namespace, and with it bpffs, stays).
    pub fn cmd<I, S>(&self, program: impl AsRef<OsStr>, args: I) -> Command
    where
        I: IntoIterator<Item = S>,
        S: AsRef<OsStr>,
    {
        let mut net = OsString::from("--net=");
        net.push(self.path());
        let mut cmd = Command::new("nsenter");
        cmd.arg(net).arg("--").arg(program).args(args);
        cmd
    }

    /// Runs `program args...` in this namespace and returns its standard output.
    ///
    /// Fails with the command line, exit status and standard error if it does not exit 0.
    pub fn run<I, S>(&self, program: impl AsRef<OsStr>, args: I) -> Result<String>
    where
        I: IntoIterator<Item = S>,
        S: AsRef<OsStr>,
    {
        let mut cmd = self.cmd(program, args);
        run_output(&mut cmd).with_context(|| format!("in netns {}", self.name))
    }

    /// Like [`Netns::run`], with `input` as the command's standard input.
    pub fn run_with_stdin<I, S>(
        &self,
        program: impl AsRef<OsStr>,
        args: I,
        input: &str,
    ) -> Result<String>
    where
        I: IntoIterator<Item = S>,
        S: AsRef<OsStr>,
    {
        let mut cmd = self.cmd(program, args);
        run_output_with_stdin(&mut cmd, input).with_context(|| format!("in netns {}", self.name))
    }

    /// Runs several `ip` commands (one per line, without the leading `ip`) in one
    /// `ip -batch -` in this namespace. Stops at the first failing line.
    pub fn ip_batch<S: AsRef<str>>(&self, lines: &[S]) -> Result<()> {
        let mut input = String::new();
        for line in lines {
            input.push_str(line.as_ref());
            input.push('\n');
        }
        self.run_with_stdin("ip", ["-batch", "-"], &input)
            .with_context(|| format!("ip batch:\n{input}"))?;
        Ok(())
    }

    /// Sets sysctls (`key`, `value`) in this namespace with one `sysctl -w` call.
    pub fn sysctl(&self, settings: &[(&str, &str)]) -> Result<()> {
        let mut args: Vec<String> = vec!["-q".into(), "-w".into()];
        args.extend(settings.iter().map(|(k, v)| format!("{k}={v}")));
        self.run("sysctl", &args)?;
        Ok(())
    }

    /// Reads one sysctl in this namespace (for example `net.ipv4.conf.eth0.rp_filter`).
    pub fn sysctl_get(&self, key: &str) -> Result<String> {
        Ok(self.run("sysctl", ["-n", key])?.trim().to_string())
    }

    /// Runs `f` on a new thread that has entered this namespace with `setns()`, waits for
    /// it and returns its result. A panic in `f` is passed on to the caller.
    ///
    /// Sockets created in `f` belong to this namespace for their whole life, so they can be
    /// returned and used from any thread:
    ///
    /// ```no_run
    /// # fn demo(ns: &visibility_tests::lab::Netns) -> anyhow::Result<()> {
    /// let listener = ns.in_ns(|| std::net::TcpListener::bind("0.0.0.0:8080"))??;
    /// # Ok(()) }
    /// ```
    pub fn in_ns<F, R>(&self, f: F) -> Result<R>
    where
        F: FnOnce() -> R + Send,
        R: Send,
    {
        let path = self.path();
        std::thread::scope(|scope| {
            let handle = std::thread::Builder::new()
                .name(format!("netns-{}", self.name))
                .spawn_scoped(scope, move || -> Result<R> {
                    enter_netns(&path)?;
                    Ok(f())
                })
                .context("spawning a thread")?;
            match handle.join() {
                Ok(result) => result,
                Err(panic) => std::panic::resume_unwind(panic),
            }
        })
    }

    /// Like [`Netns::in_ns`] for a fallible closure: its error is returned as is.
    pub fn try_in_ns<F, R>(&self, f: F) -> Result<R>
    where
        F: FnOnce() -> Result<R> + Send,
        R: Send,
    {
        self.in_ns(f)?
    }

    /// Runs `f` in the background on a new thread that has entered this namespace.
    pub fn spawn<F, R>(&self, f: F) -> Result<JoinHandle<Result<R>>>
    where
        F: FnOnce() -> Result<R> + Send + 'static,
        R: Send + 'static,
    {
        let path = self.path();
        std::thread::Builder::new()
            .name(format!("netns-{}", self.name))
            .spawn(move || {
                enter_netns(&path)?;
                f()
            })
            .context("spawning a thread")
    }

    /// Starts `program args...` in this namespace in the background; it is killed when the
    /// returned guard drops. Its standard input is null; output is inherited.
    pub fn spawn_process<I, S>(&self, program: impl AsRef<OsStr>, args: I) -> Result<Background>
    where
        I: IntoIterator<Item = S>,
        S: AsRef<OsStr>,
    {
        let mut cmd = self.cmd(program, args);
        cmd.stdin(Stdio::null());
        Background::spawn(cmd)
    }

    /// The index of interface `ifname` in this namespace.
    pub fn ifindex(&self, ifname: &str) -> Result<u32> {
        let name = ifname.to_string();
        self.in_ns(move || nix::net::if_::if_nametoindex(name.as_str()))?
            .with_context(|| format!("no interface {ifname} in netns {}", self.name))
    }

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
        .with_context(|| format!("ping {addr} from netns {}", self.name))?;
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
            .with_context(|| format!("TCP connect to {addr} from netns {}", self.name))
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
        let what = || format!("TCP request to {addr} from netns {}", self.name);
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
            .with_context(|| format!("TCP listen on {addr} in netns {}", self.name))
    }

    /// Binds a UDP socket in this namespace (port 0 picks a free port).
    pub fn udp_bind(&self, addr: SocketAddr) -> Result<UdpSocket> {
        self.in_ns(move || UdpSocket::bind(addr))?
            .with_context(|| format!("UDP bind {addr} in netns {}", self.name))
    }

    /// Sends one UDP datagram from this namespace (from a fresh socket on a free port) and
    /// returns that socket, e.g. to wait for a reply with [`udp_recv`].
    pub fn udp_send(&self, to: SocketAddr, payload: &[u8]) -> Result<UdpSocket> {
        let socket = self.udp_bind(unspecified(to))?;
        socket
            .send_to(payload, to)
            .with_context(|| format!("UDP send to {to} from netns {}", self.name))?;
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
        let what = || format!("UDP request to {to} from netns {}", self.name);
        socket.connect(to).with_context(what)?;
        socket.send(payload).with_context(what)?;
        let (data, _) = udp_recv(&socket, timeout).with_context(what)?;
        Ok(data)
    }
}

fn enter_netns(path: &Path) -> Result<()> {
    let file = File::open(path).with_context(|| format!("opening {}", path.display()))?;
    nix::sched::setns(&file, nix::sched::CloneFlags::CLONE_NEWNET)
        .with_context(|| format!("setns({})", path.display()))
}

/// The unspecified address with port 0 in `to`'s family.
fn unspecified(to: SocketAddr) -> SocketAddr {
    match to {
        SocketAddr::V4(_) => (Ipv4Addr::UNSPECIFIED, 0).into(),
        SocketAddr::V6(_) => (Ipv6Addr::UNSPECIFIED, 0).into(),
    }
}

fn remaining(deadline: Instant) -> Result<Duration> {
    let left = deadline.saturating_duration_since(Instant::now());
    ensure!(!left.is_zero(), "timed out");
    Ok(left)
}

fn is_timeout(e: &std::io::Error) -> bool {
    matches!(e.kind(), ErrorKind::WouldBlock | ErrorKind::TimedOut)
}

fn read_to_end_until(stream: &mut TcpStream, buf: &mut Vec<u8>, deadline: Instant) -> Result<()> {
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

/// Keeps the calling thread on CPU `cpu` (benchmarks pin client and server; tests pin
/// themselves to meet one CPU's per-CPU maps on every run).
pub fn pin_to_cpu(cpu: usize) -> Result<()> {
    let mut set = nix::sched::CpuSet::new();
    set.set(cpu)?;
    nix::sched::sched_setaffinity(nix::unistd::Pid::from_raw(0), &set)
        .with_context(|| format!("pinning to CPU {cpu}"))
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

fn command_line(cmd: &Command) -> String {
    std::iter::once(cmd.get_program())
        .chain(cmd.get_args())
        .map(|s| s.to_string_lossy())
        .collect::<Vec<_>>()
        .join(" ")
}

fn check_output(cmd: &Command, output: Output) -> Result<String> {
    if !output.status.success() {
        bail!(
            "`{}` failed ({}): {}{}",
            command_line(cmd),
            output.status,
            String::from_utf8_lossy(&output.stderr).trim(),
            if output.stdout.is_empty() {
                String::new()
            } else {
                format!(
                    " [stdout: {}]",
                    String::from_utf8_lossy(&output.stdout).trim()
                )
            }
        );
    }
    String::from_utf8(output.stdout)
        .with_context(|| format!("`{}`: output is not UTF-8", command_line(cmd)))
}

fn run_output(cmd: &mut Command) -> Result<String> {
    let output = cmd
        .stdin(Stdio::null())
        .output()
        .with_context(|| format!("starting `{}`", command_line(cmd)))?;
    check_output(cmd, output)
}

fn run_output_with_stdin(cmd: &mut Command, input: &str) -> Result<String> {
    let mut child = cmd
        .stdin(Stdio::piped())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .with_context(|| format!("starting `{}`", command_line(cmd)))?;
    let mut stdin = child.stdin.take().expect("stdin is piped");
    let input = input.to_owned();
    // Write from another thread so a chatty child cannot deadlock us.
    let writer = std::thread::spawn(move || stdin.write_all(input.as_bytes()));
    let output = child
        .wait_with_output()
        .with_context(|| format!("waiting for `{}`", command_line(cmd)))?;
    let _ = writer.join();
    check_output(cmd, output)
}

/// A process started in the background ([`Netns::spawn_process`], [`Background::spawn`]).
/// Dropping it kills the process (SIGKILL) and reaps it.
#[derive(Debug)]
pub struct Background {
    child: Option<Child>,
}

impl Background {
    /// Starts `cmd`.
    pub fn spawn(mut cmd: Command) -> Result<Self> {
        let child = cmd
            .spawn()
            .with_context(|| format!("starting `{}`", command_line(&cmd)))?;
        Ok(Self { child: Some(child) })
    }

    /// The process id.
    pub fn id(&self) -> u32 {
        self.child.as_ref().map_or(0, Child::id)
    }

    /// Whether the process is still running.
    pub fn is_running(&mut self) -> bool {
        self.child
            .as_mut()
            .is_some_and(|c| matches!(c.try_wait(), Ok(None)))
    }

    /// Sends SIGTERM and waits up to `timeout` for the process to exit, then SIGKILLs it.
    pub fn terminate(mut self, timeout: Duration) -> Result<std::process::ExitStatus> {
        let mut child = self.child.take().expect("child present until dropped");
        let pid = nix::unistd::Pid::from_raw(child.id() as i32);
        let _ = nix::sys::signal::kill(pid, nix::sys::signal::Signal::SIGTERM);
        let deadline = Instant::now() + timeout;
        loop {
            if let Some(status) = child.try_wait()? {
                return Ok(status);
            }
            if Instant::now() >= deadline {
                let _ = child.kill();
                return Ok(child.wait()?);
            }
            std::thread::sleep(Duration::from_millis(10));
        }
    }

    /// Gives up ownership of the process without killing it.
    pub fn into_child(mut self) -> Child {
        self.child.take().expect("child present until dropped")
    }
}

impl Drop for Background {
    fn drop(&mut self) {
        if let Some(mut child) = self.child.take() {
            let _ = child.kill();
            let _ = child.wait();
        }
    }
}

// ---------------------------------------------------------------------------------------
// Servers
// ---------------------------------------------------------------------------------------

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

// ---------------------------------------------------------------------------------------
// Conntrack flows
// ---------------------------------------------------------------------------------------

/// An address family.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum IpFamily {
    /// IPv4.
    V4,
    /// IPv6.
    V6,
}

impl IpFamily {
    /// The family of `addr`.
    pub fn of(addr: IpAddr) -> Self {
        if addr.is_ipv4() {
            IpFamily::V4
        } else {
            IpFamily::V6
        }
    }
}

/// One conntrack entry, as seen in its original direction (the first packet's), with the
/// reply direction's counters.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Flow {
    /// The address family.
    pub family: IpFamily,
    /// The protocol's name as conntrack prints it: `tcp`, `udp`, `icmp`, `icmpv6`, ...
    pub protocol: String,
    /// The IP protocol number (6, 17, 1, 58, ...).
    pub protocol_number: u8,
    /// Original source address.
    pub src: IpAddr,
    /// Original destination address.
    pub dst: IpAddr,
    /// Original source port (`None` for protocols without ports, such as ICMP).
    pub sport: Option<u16>,
    /// Original destination port (`None` for protocols without ports).
    pub dport: Option<u16>,
    /// Packets in the original direction.
    pub packets: u64,
    /// Bytes in the original direction.
    pub bytes: u64,
    /// Packets in the reply direction.
    pub reply_packets: u64,
    /// Bytes in the reply direction.
    pub reply_bytes: u64,
}

impl Flow {
    /// Whether `addr` is the flow's source or destination.
    pub fn involves(&self, addr: impl Into<IpAddr>) -> bool {
        let addr = addr.into();
        self.src == addr || self.dst == addr
    }

    /// Whether the flow goes from `src` to `dst` (original direction).
    pub fn is_between(&self, src: impl Into<IpAddr>, dst: impl Into<IpAddr>) -> bool {
        self.src == src.into() && self.dst == dst.into()
    }
}

/// Parses the output of `conntrack -L -o extended` (any family) into [`Flow`]s. Lines that
/// are not entries are skipped.
pub fn parse_conntrack(text: &str) -> Result<Vec<Flow>> {
    text.lines()
        .filter(|l| l.starts_with("ipv4 ") || l.starts_with("ipv6 "))
        .map(|l| parse_conntrack_line(l).with_context(|| format!("parsing conntrack line {l:?}")))
        .collect()
}

fn parse_conntrack_line(line: &str) -> Result<Flow> {
    let mut tokens = line.split_whitespace();
    let family = match tokens.next() {
        Some("ipv4") => IpFamily::V4,
        Some("ipv6") => IpFamily::V6,
        other => bail!("unknown family {other:?}"),
    };
    let _l3num = tokens.next().context("missing l3 number")?;
    let protocol = tokens.next().context("missing protocol")?.to_string();
    let protocol_number: u8 = tokens.next().context("missing protocol number")?.parse()?;

    #[derive(Default)]
    struct Direction {
        src: Option<IpAddr>,
        dst: Option<IpAddr>,
        sport: Option<u16>,
        dport: Option<u16>,
        packets: u64,
        bytes: u64,
    }
    let mut dirs: Vec<Direction> = Vec::new();
    for token in tokens {
        let Some((key, value)) = token.split_once('=') else {
            continue;
        };
        if key == "src" {
            if dirs.len() == 2 {
                break; // e.g. an expectation's master tuple: not ours
            }
            dirs.push(Direction::default());
        }
        let Some(dir) = dirs.last_mut() else { continue };
        match key {
            "src" => dir.src = Some(value.parse()?),
            "dst" => dir.dst = Some(value.parse()?),
            "sport" => dir.sport = Some(value.parse()?),
            "dport" => dir.dport = Some(value.parse()?),
            "packets" => dir.packets = value.parse()?,
            "bytes" => dir.bytes = value.parse()?,
            _ => {}
        }
    }
    let mut dirs = dirs.into_iter();
    let orig = dirs.next().context("no original tuple")?;
    let reply = dirs.next().unwrap_or_default();
    Ok(Flow {
        family,
        protocol,
        protocol_number,
        src: orig.src.context("no src")?,
        dst: orig.dst.context("no dst")?,
        sport: orig.sport,
        dport: orig.dport,
        packets: orig.packets,
        bytes: orig.bytes,
        reply_packets: reply.packets,
        reply_bytes: reply.bytes,
    })
}

// ---------------------------------------------------------------------------------------
// Lab
// ---------------------------------------------------------------------------------------

/// One Pod of a [`Lab`].
#[derive(Debug, Clone)]
pub struct Pod {
    index: usize,
    netns: Netns,
    host_ifname: String,
    host_ifindex: u32,
}

impl Pod {
    /// The Pod's index in its lab.
    pub fn index(&self) -> usize {
        self.index
    }
    /// The Pod's namespace.
    pub fn netns(&self) -> &Netns {
        &self.netns
    }
    /// The Pod's IPv4 address.
    pub fn ipv4(&self) -> Ipv4Addr {
        pod_ipv4(self.index)
    }
    /// The Pod's IPv6 address.
    pub fn ipv6(&self) -> Ipv6Addr {
        pod_ipv6(self.index)
    }
    /// The name of the Pod's host-side veth in the node namespace.
    pub fn host_ifname(&self) -> &str {
        &self.host_ifname
    }
    /// The ifindex of the Pod's host-side veth in the node namespace.
    pub fn host_ifindex(&self) -> u32 {
        self.host_ifindex
    }
}

static LAB_COUNTER: AtomicUsize = AtomicUsize::new(0);
static STALE_CLEANUP: Once = Once::new();

/// A node with its Pods and its gateway, each in its own network namespace. See the
/// [module documentation](self) for the topology. Dropping it removes everything.
#[derive(Debug)]
pub struct Lab {
    prefix: String,
    config: LabConfig,
    gateway: Netns,
    node: Netns,
    pods: Vec<Option<Pod>>,
}

impl Lab {
    /// Builds a lab. `tag` names it (only its ASCII letters and digits are used, at most
    /// 12): the namespaces are called `lab-<tag>-<pid>-<counter>-{gw,node,p<i>}`.
    ///
    /// On error, everything created so far is removed.
    pub fn new(tag: &str, config: LabConfig) -> Result<Lab> {
        ensure!(config.pods <= MAX_PODS, "at most {MAX_PODS} pods");
        STALE_CLEANUP.call_once(|| {
            if let Err(e) = cleanup_stale_labs() {
                eprintln!("lab: cleaning up stale labs: {e:#}");
            }
        });
        let tag: String = tag
            .chars()
            .filter(char::is_ascii_alphanumeric)
            .map(|c| c.to_ascii_lowercase())
            .take(12)
            .collect();
        let tag = if tag.is_empty() { "x".to_string() } else { tag };
        let n = LAB_COUNTER.fetch_add(1, Ordering::Relaxed);
        let prefix = format!("lab-{tag}-{}-{n}", std::process::id());
        let mut lab = Lab {
            gateway: Netns::from_name(format!("{prefix}-gw")),
            node: Netns::from_name(format!("{prefix}-node")),
            prefix,
            config,
            pods: Vec::new(),
        };
        // If anything fails, `lab` drops here and removes what exists.
        lab.setup()
            .with_context(|| format!("setting up lab {}", lab.prefix))?;
        Ok(lab)
    }

    fn setup(&mut self) -> Result<()> {
        let gw = Netns::create(self.gateway.name())?;
        let node = Netns::create(self.node.name())?;
        let no_dad = [
            ("net.ipv6.conf.all.accept_dad", "0"),
            ("net.ipv6.conf.default.accept_dad", "0"),
        ];
        gw.sysctl(&no_dad)?;
        node.sysctl(&no_dad)?;

        // The uplink, created straight into the two namespaces.
        gw.run(
            "ip",
            [
                "link",
                "add",
                GATEWAY_IFNAME,
                "type",
                "veth",
                "peer",
                "name",
                NODE_UPLINK,
                "netns",
                node.name(),
            ],
        )?;

        // Gateway.
        gw.sysctl(&[
            ("net.ipv6.conf.eth0.accept_dad", "0"),
            ("net.ipv4.ip_forward", "1"),
            ("net.ipv6.conf.all.forwarding", "1"),
            ("net.ipv6.conf.default.forwarding", "1"),
            ("net.ipv4.conf.all.send_redirects", "0"),
            ("net.ipv4.conf.default.send_redirects", "0"),
            ("net.ipv4.conf.eth0.send_redirects", "0"),
            ("net.ipv4.conf.all.rp_filter", "0"),
            ("net.ipv4.conf.default.rp_filter", "0"),
            ("net.ipv4.conf.eth0.rp_filter", "0"),
        ])?;
        gw.ip_batch(&[
            format!("link set {GATEWAY_IFNAME} up"),
            format!("addr add {GATEWAY_IPV4}/24 dev {GATEWAY_IFNAME}"),
            format!("addr add {GATEWAY_IPV6}/64 dev {GATEWAY_IFNAME} nodad"),
            format!("route add {POD_CIDR_V4} via {NODE_IPV4} dev {GATEWAY_IFNAME}"),
            format!("route add {POD_CIDR_V6} via {NODE_IPV6} dev {GATEWAY_IFNAME}"),
        ])?;
        gw.run_with_stdin("nft", ["-f", "-"], &gateway_ruleset())
            .context("installing the gateway's nftables ruleset")?;
        // The sysctl exists once conntrack is loaded, which the ruleset makes sure of.
        gw.sysctl(&[("net.netfilter.nf_conntrack_acct", "1")])?;

        // Node.
        let rp = if self.config.strict_rp_filter {
            "1"
        } else {
            "2"
        };
        node.sysctl(&[
            ("net.ipv6.conf.eth0.accept_dad", "0"),
            ("net.ipv4.ip_forward", "1"),
            ("net.ipv6.conf.all.forwarding", "1"),
            ("net.ipv6.conf.default.forwarding", "1"),
            ("net.ipv4.conf.all.rp_filter", rp),
            ("net.ipv4.conf.default.rp_filter", rp),
            ("net.ipv4.conf.eth0.rp_filter", rp),
        ])?;
        node.ip_batch(&[
            format!("link set {NODE_UPLINK} up"),
            format!("addr add {NODE_IPV4}/24 dev {NODE_UPLINK}"),
            format!("addr add {NODE_IPV6}/64 dev {NODE_UPLINK} nodad"),
            format!("route add default via {GATEWAY_IPV4} dev {NODE_UPLINK}"),
            format!("route add ::/0 via {GATEWAY_IPV6} dev {NODE_UPLINK}"),
        ])?;

        for _ in 0..self.config.pods {
            self.add_pod()?;
        }
        Ok(())
    }

    /// The lab's unique name prefix; every namespace it creates is called `<prefix>-...`.
    pub fn prefix(&self) -> &str {
        &self.prefix
    }

    /// The configuration the lab was built with.
    pub fn config(&self) -> &LabConfig {
        &self.config
    }

    /// The node's namespace.
    pub fn node(&self) -> &Netns {
        &self.node
    }

    /// The gateway's (VPC's) namespace.
    pub fn gateway(&self) -> &Netns {
        &self.gateway
    }

    /// All namespaces of the lab that currently exist by name: gateway, node, Pods.
    pub fn namespaces(&self) -> Vec<&Netns> {
        let mut all = vec![&self.gateway, &self.node];
        all.extend(self.pods().map(Pod::netns));
        all
    }

    /// Adds a Pod and returns its index. Indices are never reused within a lab.
    pub fn add_pod(&mut self) -> Result<usize> {
        let index = self.pods.len();
        ensure!(index < MAX_PODS, "at most {MAX_PODS} pods");
        let netns = Netns::from_name(format!("{}-p{index}", self.prefix));
        // Reserve the slot first, so a half-built Pod is removed on drop.
        self.pods.push(None);
        let host_ifname = pod_host_ifname(index);
        let result = self.build_pod(index, &netns, &host_ifname);
        match result {
            Ok(host_ifindex) => {
                self.pods[index] = Some(Pod {
                    index,
                    netns,
                    host_ifname,
                    host_ifindex,
                });
                Ok(index)
            }
            Err(e) => {
                remove_pod_parts(&self.node, &netns, &host_ifname);
                Err(e.context(format!("adding pod {index}")))
            }
        }
    }

    fn build_pod(&self, index: usize, pod: &Netns, host_if: &str) -> Result<u32> {
        let node = &self.node;
        Netns::create(pod.name())?;
        pod.sysctl(&[
            ("net.ipv6.conf.all.accept_dad", "0"),
            ("net.ipv6.conf.default.accept_dad", "0"),
        ])?;
        let (v4, v6) = (pod_ipv4(index), pod_ipv6(index));
        node.ip_batch(&[
            format!(
                "link add {host_if} type veth peer name {POD_IFNAME} netns {}",
                pod.name()
            ),
            format!("link set {host_if} up"),
            format!("addr add {POD_GATEWAY_V4}/32 dev {host_if}"),
            format!("addr add {POD_GATEWAY_V6}/64 dev {host_if} nodad"),
            format!("route add {v4}/32 dev {host_if} scope host"),
            format!("route add {v6}/128 dev {host_if}"),
        ])?;
        node.sysctl(&[(&format!("net.ipv6.conf.{host_if}.accept_dad"), "0")])?;
        pod.sysctl(&[(&format!("net.ipv6.conf.{POD_IFNAME}.accept_dad"), "0")])?;
        pod.ip_batch(&[
            format!("link set {POD_IFNAME} up"),
            format!("addr add {v4}/24 dev {POD_IFNAME} noprefixroute"),
            format!("addr add {v6}/64 dev {POD_IFNAME} nodad noprefixroute"),
            format!("route add {POD_GATEWAY_V4}/32 dev {POD_IFNAME} scope link"),
            format!("route add {POD_CIDR_V4} via {POD_GATEWAY_V4} dev {POD_IFNAME}"),
            format!("route add default via {POD_GATEWAY_V4} dev {POD_IFNAME}"),
            format!("route add {POD_CIDR_V6} via {POD_GATEWAY_V6} dev {POD_IFNAME}"),
            format!("route add ::/0 via {POD_GATEWAY_V6} dev {POD_IFNAME}"),
        ])?;
        node.ifindex(host_if)
    }

    /// Removes Pod `index`: its namespace, its host-side veth and (with it) its host routes.
    pub fn remove_pod(&mut self, index: usize) -> Result<()> {
        let pod = self
            .pods
            .get_mut(index)
            .and_then(Option::take)
            .with_context(|| format!("no pod {index}"))?;
        pod.netns.delete()?;
        // The veth normally goes with the Pod's namespace; it stays if something (a socket,
        // a process) still holds that namespace.
        let _ = self
            .node
            .run("ip", ["link", "del", pod.host_ifname.as_str()]);
        Ok(())
    }

    /// Pod `index`.
    ///
    /// # Panics
    /// If there is no such Pod (never added, or removed).
    pub fn pod(&self, index: usize) -> &Pod {
        self.try_pod(index)
            .unwrap_or_else(|| panic!("lab {} has no pod {index}", self.prefix))
    }

    /// Pod `index`, if it exists.
    pub fn try_pod(&self, index: usize) -> Option<&Pod> {
        self.pods.get(index).and_then(Option::as_ref)
    }

    /// The Pods that exist, in index order.
    pub fn pods(&self) -> impl Iterator<Item = &Pod> {
        self.pods.iter().flatten()
    }

    /// How many Pods exist.
    pub fn pod_count(&self) -> usize {
        self.pods().count()
    }

    /// Pod `index`'s namespace. Panics like [`Lab::pod`].
    pub fn pod_ns(&self, index: usize) -> &Netns {
        self.pod(index).netns()
    }

    /// Pod `index`'s IPv4 address. Panics like [`Lab::pod`].
    pub fn pod_ipv4(&self, index: usize) -> Ipv4Addr {
        self.pod(index).ipv4()
    }

    /// Pod `index`'s IPv6 address. Panics like [`Lab::pod`].
    pub fn pod_ipv6(&self, index: usize) -> Ipv6Addr {
        self.pod(index).ipv6()
    }

    /// Pod `index`'s address in `family`. Panics like [`Lab::pod`].
    pub fn pod_ip(&self, index: usize, family: IpFamily) -> IpAddr {
        match family {
            IpFamily::V4 => self.pod_ipv4(index).into(),
            IpFamily::V6 => self.pod_ipv6(index).into(),
        }
    }

    /// The name of Pod `index`'s host-side veth in the node namespace. Panics like
    /// [`Lab::pod`].
    pub fn pod_host_ifname(&self, index: usize) -> &str {
        self.pod(index).host_ifname()
    }

    /// The ifindex of Pod `index`'s host-side veth in the node namespace. Panics like
    /// [`Lab::pod`].
    pub fn pod_host_ifindex(&self, index: usize) -> u32 {
        self.pod(index).host_ifindex()
    }

    /// The ifindex of the node's uplink ([`NODE_UPLINK`]) in the node namespace.
    pub fn node_uplink_ifindex(&self) -> Result<u32> {
        self.node.ifindex(NODE_UPLINK)
    }

    /// The node's uplink address in `family`.
    pub fn node_ip(family: IpFamily) -> IpAddr {
        match family {
            IpFamily::V4 => NODE_IPV4.into(),
            IpFamily::V6 => NODE_IPV6.into(),
        }
    }

    /// The gateway's address in `family`.
    pub fn gateway_ip(family: IpFamily) -> IpAddr {
        match family {
            IpFamily::V4 => GATEWAY_IPV4.into(),
            IpFamily::V6 => GATEWAY_IPV6.into(),
        }
    }

    /// The gateway's conntrack table, IPv4 and IPv6 (`conntrack -L -o extended`).
    ///
    /// This holds every connection that crossed or reached the gateway since the last
    /// [`Lab::flush_gateway_flows`] and has not yet expired.
    pub fn gateway_flows(&self) -> Result<Vec<Flow>> {
        let mut flows = Vec::new();
        for family in ["ipv4", "ipv6"] {
            let out = self
                .gateway
                .run("conntrack", ["-L", "-o", "extended", "-f", family])?;
            flows.extend(parse_conntrack(&out)?);
        }
        Ok(flows)
    }

    /// The gateway's flows that involve `addr` as source or destination.
    pub fn gateway_flows_involving(&self, addr: impl Into<IpAddr>) -> Result<Vec<Flow>> {
        let addr = addr.into();
        Ok(self
            .gateway_flows()?
            .into_iter()
            .filter(|f| f.involves(addr))
            .collect())
    }

    /// Empties the gateway's conntrack table (both families).
    pub fn flush_gateway_flows(&self) -> Result<()> {
        for family in ["ipv4", "ipv6"] {
            self.gateway.run("conntrack", ["-F", "-f", family])?;
        }
        Ok(())
    }

    /// Drops, at the gateway, packets forwarded from `src` to `dst` (one direction; both
    /// must be of one family). Blocking a pair twice is the same as once.
    pub fn block(&self, src: impl Into<IpAddr>, dst: impl Into<IpAddr>) -> Result<()> {
        let (set, element) = block_element(src.into(), dst.into())?;
        self.gateway
            .run(
                "nft",
                ["add", "element", "inet", GATEWAY_NFT_TABLE, set, &element],
            )
            .with_context(|| format!("blocking {element}"))?;
        Ok(())
    }

    /// Undoes [`Lab::block`] for `src` → `dst`. Succeeds if the pair was not blocked.
    pub fn unblock(&self, src: impl Into<IpAddr>, dst: impl Into<IpAddr>) -> Result<()> {
        let (set, element) = block_element(src.into(), dst.into())?;
        match self.gateway.run(
            "nft",
            [
                "delete",
                "element",
                "inet",
                GATEWAY_NFT_TABLE,
                set,
                &element,
            ],
        ) {
            Ok(_) => Ok(()),
            Err(e) if format!("{e:#}").contains("No such file or directory") => Ok(()),
            Err(e) => Err(e.context(format!("unblocking {element}"))),
        }
    }

    /// Undoes every [`Lab::block`].
    pub fn unblock_all(&self) -> Result<()> {
        for set in ["blocked4", "blocked6"] {
            self.gateway
                .run("nft", ["flush", "set", "inet", GATEWAY_NFT_TABLE, set])?;
        }
        Ok(())
    }

    /// How many packets entered the gateway's forward path (both families), including any
    /// that a [`Lab::block`] then dropped. Traffic to or from the gateway's own addresses is
    /// not forwarded and not counted.
    pub fn gateway_forwarded_packets(&self) -> Result<u64> {
        Ok(self.gateway_counter("forwarded")?.0)
    }

    /// Packets the gateway sent out of its interface, from its link statistics: what it
    /// forwarded (plus its own few neighbour messages). Unlike
    /// [`Lab::gateway_forwarded_packets`] this also counts on a plain gateway.
    pub fn gateway_transmitted_packets(&self) -> Result<u64> {
        let out = self
            .gateway
            .run("ip", ["-s", "-j", "link", "show", "dev", GATEWAY_IFNAME])?;
        let links: serde_json::Value = serde_json::from_str(&out)
            .with_context(|| format!("parsing `ip -s -j link`: {out}"))?;
        links[0]["stats64"]["tx"]["packets"]
            .as_u64()
            .with_context(|| format!("no tx packet count in {out}"))
    }

    /// Makes the gateway a plain router: removes its nftables table, so neither a
    /// firewall nor connection tracking runs there any more. For measurements that leave
    /// out what the stand-in VPC does with a packet; [`Lab::block`], the flow log and the
    /// nftables counters no longer work afterwards.
    pub fn make_gateway_plain_router(&self) -> Result<()> {
        self.gateway
            .run("nft", ["delete", "table", "inet", GATEWAY_NFT_TABLE])
            .context("removing the gateway's nftables table")?;
        Ok(())
    }

    /// How many packets the gateway dropped because of [`Lab::block`].
    pub fn gateway_dropped_packets(&self) -> Result<u64> {
        Ok(self.gateway_counter("dropped")?.0)
    }

    /// Packets and bytes of the named counter (`forwarded` or `dropped`) in the gateway's
    /// nftables table.
    pub fn gateway_counter(&self, name: &str) -> Result<(u64, u64)> {
        let out = self
            .gateway
            .run("nft", ["list", "counter", "inet", GATEWAY_NFT_TABLE, name])?;
        parse_nft_counter(&out).with_context(|| format!("parsing nft counter {name}: {out}"))
    }
}

impl Drop for Lab {
    fn drop(&mut self) {
        let mut errors = Vec::new();
        for index in 0..self.pods.len() {
            // Also covers a Pod whose setup failed half-way (its slot is None).
            let pod_ns = Netns::from_name(format!("{}-p{index}", self.prefix));
            if self.pods[index].take().is_some() || pod_ns.exists() {
                remove_pod_parts(&self.node, &pod_ns, &pod_host_ifname(index));
            }
            if pod_ns.exists() {
                errors.push(pod_ns.name().to_string());
            }
        }
        for ns in [&self.node, &self.gateway] {
            if let Err(e) = ns.delete() {
                errors.push(format!("{}: {e:#}", ns.name()));
            }
        }
        if !errors.is_empty() {
            eprintln!("lab {}: cleanup left: {errors:?}", self.prefix);
        }
    }
}

fn remove_pod_parts(node: &Netns, pod: &Netns, host_ifname: &str) {
    if let Err(e) = pod.delete() {
        eprintln!("lab: removing {}: {e:#}", pod.name());
    }
    if node.exists() {
        let _ = node
            .cmd("ip", ["link", "del", host_ifname])
            .stdout(Stdio::null())
            .stderr(Stdio::null())
            .status();
    }
}

fn gateway_ruleset() -> String {
    format!(
        r#"table inet {GATEWAY_NFT_TABLE} {{
    counter forwarded {{ }}
    counter dropped {{ }}
    set blocked4 {{ type ipv4_addr . ipv4_addr; }}
    set blocked6 {{ type ipv6_addr . ipv6_addr; }}
    chain forward {{
        type filter hook forward priority filter; policy accept;
        counter name "forwarded"
        ct state new counter
        ip saddr . ip daddr @blocked4 counter name "dropped" drop
        ip6 saddr . ip6 daddr @blocked6 counter name "dropped" drop
    }}
}}
"#
    )
}

fn block_element(src: IpAddr, dst: IpAddr) -> Result<(&'static str, String)> {
    match (src, dst) {
        (IpAddr::V4(s), IpAddr::V4(d)) => Ok(("blocked4", format!("{{ {s} . {d} }}"))),
        (IpAddr::V6(s), IpAddr::V6(d)) => Ok(("blocked6", format!("{{ {s} . {d} }}"))),
        _ => bail!("cannot block {src} -> {dst}: mixed address families"),
    }
}

fn parse_nft_counter(text: &str) -> Result<(u64, u64)> {
    let tokens: Vec<&str> = text.split_whitespace().collect();
    let value = |key: &str| -> Result<u64> {
        let pos = tokens
            .iter()
            .position(|t| *t == key)
            .with_context(|| format!("no `{key}`"))?;
        Ok(tokens.get(pos + 1).context("no value")?.parse()?)
    };
    Ok((value("packets")?, value("bytes")?))
}

/// The names of all named network namespaces (`ip netns list`).
pub fn list_netns() -> Result<Vec<String>> {
    let out = run_output(Command::new("ip").args(["netns", "list"]))?;
    Ok(out
        .lines()
        .filter_map(|l| l.split_whitespace().next())
        .map(str::to_string)
        .collect())
}

/// Removes namespaces of labs whose process is gone (`lab-<tag>-<pid>-<n>-...` where no
/// process `<pid>` exists), e.g. after a test binary was killed. Returns the names removed.
///
/// [`Lab::new`] calls this once per process.
pub fn cleanup_stale_labs() -> Result<Vec<String>> {
    let mut removed = Vec::new();
    for name in list_netns()? {
        let Some(rest) = name.strip_prefix("lab-") else {
            continue;
        };
        let parts: Vec<&str> = rest.split('-').collect();
        let [tag, pid, n, role] = parts[..] else {
            continue;
        };
        let well_formed = !tag.is_empty()
            && tag.chars().all(|c| c.is_ascii_alphanumeric())
            && n.parse::<usize>().is_ok()
            && (role == "gw"
                || role == "node"
                || role
                    .strip_prefix('p')
                    .is_some_and(|i| i.parse::<usize>().is_ok()));
        let Ok(pid) = pid.parse::<u32>() else {
            continue;
        };
        if !well_formed || pid == std::process::id() || Path::new(&format!("/proc/{pid}")).exists()
        {
            continue;
        }
        let ns = Netns::from_name(name);
        ns.delete()?;
        removed.push(ns.name);
    }
    Ok(removed)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn parses_conntrack_extended_output() {
        let text = "\
ipv4     2 udp      17 29 src=10.52.0.2 dst=10.52.0.3 sport=35131 dport=5000 packets=1 bytes=31 [UNREPLIED] src=10.52.0.3 dst=10.52.0.2 sport=5000 dport=35131 packets=0 bytes=0 mark=0 use=1
ipv4     2 icmp     1 29 src=10.128.0.2 dst=10.128.0.1 type=8 code=0 id=10482 packets=1 bytes=84 src=10.128.0.1 dst=10.128.0.2 type=0 code=0 id=10482 packets=1 bytes=84 mark=0 use=1
ipv6     10 tcp      6 119 TIME_WAIT src=fd00:52::2 dst=fd00:52::3 sport=46194 dport=5001 packets=5 bytes=371 src=fd00:52::3 dst=fd00:52::2 sport=5001 dport=46194 packets=3 bytes=224 [ASSURED] mark=0 use=1
conntrack v1.4.7 (conntrack-tools): 3 flow entries have been shown.
";
        let flows = parse_conntrack(text).unwrap();
        assert_eq!(flows.len(), 3);
        assert_eq!(flows[0].family, IpFamily::V4);
        assert_eq!(flows[0].protocol, "udp");
        assert_eq!(flows[0].protocol_number, 17);
        assert_eq!(flows[0].src, IpAddr::from(pod_ipv4(0)));
        assert_eq!(flows[0].dst, IpAddr::from(pod_ipv4(1)));
        assert_eq!((flows[0].sport, flows[0].dport), (Some(35131), Some(5000)));
        assert_eq!((flows[0].packets, flows[0].bytes), (1, 31));
        assert_eq!((flows[0].reply_packets, flows[0].reply_bytes), (0, 0));
        assert_eq!(flows[1].protocol, "icmp");
        assert_eq!((flows[1].sport, flows[1].dport), (None, None));
        assert!(flows[1].is_between(NODE_IPV4, GATEWAY_IPV4));
        assert_eq!(flows[2].family, IpFamily::V6);
        assert_eq!(flows[2].src, IpAddr::from(pod_ipv6(0)));
        assert_eq!(
            (flows[2].packets, flows[2].bytes, flows[2].reply_packets),
            (5, 371, 3)
        );
        assert!(flows[2].involves(pod_ipv6(1)));
    }

    #[test]
    fn parses_nft_counter() {
        let text = "table inet lab {\n\tcounter forwarded {\n\t\tpackets 12 bytes 3400\n\t}\n}\n";
        assert_eq!(parse_nft_counter(text).unwrap(), (12, 3400));
    }

    #[test]
    fn addresses() {
        assert_eq!(pod_ipv4(0), Ipv4Addr::new(10, 52, 0, 2));
        assert_eq!(pod_ipv6(1).to_string(), "fd00:52::3");
        assert_eq!(pod_ipv4(MAX_PODS - 1), Ipv4Addr::new(10, 52, 0, 254));
        assert_eq!(POD_GATEWAY_V6.to_string(), "fe80::1");
        assert_eq!(NODE_IPV6.to_string(), "fd00:128::2");
        assert!(block_element(NODE_IPV4.into(), GATEWAY_IPV6.into()).is_err());
    }
}
