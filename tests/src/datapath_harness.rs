//! The datapath on a [`Lab`] node, driven with `BPF_PROG_TEST_RUN`.
//!
//! * [`PinnedDatapath`]: the programs and maps loaded and pinned under a bpffs directory
//!   of their own (`/sys/fs/bpf/vis-test-<tag>-<pid>-<n>`), which is removed when it drops,
//!   also while unwinding from a panic. Directories left behind by a killed process are
//!   removed by the next [`PinnedDatapath::load`] (see [`cleanup_stale_pins`]).
//! * [`configure_like_daemon`]: fills the maps as the daemon does on a lab node.
//! * [`DatapathLab`]: a lab, a pinned and configured datapath, and the node facts tests
//!   check against (MACs, ifindexes), with [`DatapathLab::run`] to run a program on one
//!   frame and readers for counters, flows and NAT legs.
//! * [`test_run`]: runs any `SchedClassifier` on a frame inside a namespace.
//! * [`SoloProgram`]: one program of the object loaded on its own (the benchmarks'
//!   `bench_baseline` and `lab_router`), and [`GatewayRouter`]: `lab_router` on the lab
//!   gateway, the benchmarks' stand-in for a VPC that works off the node.
//!
//! `BPF_PROG_TEST_RUN` runs the program in the calling thread's network namespace: the
//! `ifindex` of the context names a device of that namespace, and `bpf_fib_lookup`
//! consults its routes and neighbours. So every run enters the lab's node namespace.
//!
//! Everything here needs root.

use std::{
    fs,
    net::IpAddr,
    path::{Path, PathBuf},
    sync::Once,
    time::Duration,
};

use anyhow::{Context as _, Result, anyhow, ensure};
use aya::{
    Ebpf, EbpfLoader,
    maps::{HashMap, Map, MapData, MapError},
    programs::{SchedClassifier, TestRun as _, TestRunOptions},
};
use ipnet::IpNet;
use visibility::{
    datapath::{Datapath, EBPF_OBJECT, LoadOptions, Origin, PinDir, ProgramKind, remove_pins},
    maps::Maps,
    net::addr_bytes,
};
use visibility_common::{
    config::Gateway,
    counters::{Counter, CounterValue},
    flow::{FlowKey, FlowStats, NatLeg},
    map_names,
    packet::Family,
    program_names,
    verdict::Hook,
};

use crate::{
    lab::{
        GATEWAY_IFNAME, GATEWAY_IPV4, GATEWAY_IPV6, IpFamily, Lab, LabConfig, NODE_IPV4, NODE_IPV6,
        NODE_UPLINK, Netns, POD_CIDR_V4, POD_CIDR_V6, POD_GATEWAY_V4, POD_GATEWAY_V6, POD_IFNAME,
    },
    unique,
};

/// `TC_ACT_OK`: the packet goes on through the kernel, and no other TC program on the
/// hook sees it.
pub const TC_ACT_OK: u32 = 0;
/// `TC_ACT_UNSPEC` (-1) as the kernel reports it: the packet goes on to the next
/// program on the hook (`TCX_NEXT`), then through the kernel. What the datapath
/// returns for every packet it passes.
pub const TC_ACT_UNSPEC: u32 = u32::MAX;
/// `TC_ACT_SHOT`: the packet is dropped.
pub const TC_ACT_SHOT: u32 = 2;
/// `TC_ACT_REDIRECT`: a redirect helper chose the packet's next device.
pub const TC_ACT_REDIRECT: u32 = 7;

/// Where bpffs is mounted.
pub const BPFFS_ROOT: &str = "/sys/fs/bpf";
/// Name prefix of every pin directory made here.
const PIN_PREFIX: &str = "vis-test-";

/// An Ethernet address.
pub type Mac = [u8; 6];

/// The hook a program runs at.
pub fn hook_of(kind: ProgramKind) -> Hook {
    match kind {
        ProgramKind::PodIngress => Hook::PodIngress,
        ProgramKind::PodEgress => Hook::PodEgress,
        ProgramKind::UplinkIngress => Hook::Uplink,
    }
}

/// The datapath's family of a lab family.
pub fn family(family: IpFamily) -> Family {
    match family {
        IpFamily::V4 => Family::V4,
        IpFamily::V6 => Family::V6,
    }
}

fn require_root() -> Result<()> {
    ensure!(
        nix::unistd::geteuid().is_root(),
        "BPF_PROG_TEST_RUN tests need root (network namespaces, bpffs, loading BPF programs)"
    );
    Ok(())
}

// ---------------------------------------------------------------------------------------
// Pin directories
// ---------------------------------------------------------------------------------------

static STALE_PINS: Once = Once::new();

/// A pin directory of this process that no other has: `/sys/fs/bpf/vis-test-<tag>-<pid>-<n>`.
/// Only the ASCII letters and digits of `tag` are used, at most 12.
pub fn unique_pin_path(tag: &str) -> PathBuf {
    Path::new(BPFFS_ROOT).join(format!("{PIN_PREFIX}{}", unique::name(tag)))
}

/// Removes the pin directories of processes that are gone (`vis-test-<tag>-<pid>-<n>`
/// where no process `<pid>` exists). Returns the directories removed.
pub fn cleanup_stale_pins() -> Result<Vec<PathBuf>> {
    let mut removed = Vec::new();
    for entry in fs::read_dir(BPFFS_ROOT).with_context(|| format!("listing {BPFFS_ROOT}"))? {
        let path = entry?.path();
        let Some(rest) = path
            .file_name()
            .and_then(|n| n.to_str())
            .and_then(|n| n.strip_prefix(PIN_PREFIX))
        else {
            continue;
        };
        let Some(pid) = rest.rsplit('-').nth(1).and_then(|p| p.parse::<u32>().ok()) else {
            continue;
        };
        if !unique::is_left_over(pid) {
            continue;
        }
        remove_pins(&PinDir::new(&path), |_| None)
            .with_context(|| format!("removing stale pins {}", path.display()))?;
        removed.push(path);
    }
    Ok(removed)
}

/// Owns a pin directory: dropping it (also while unwinding) removes the directory and
/// everything pinned under it.
#[derive(Debug)]
pub struct PinDirGuard {
    pins: PinDir,
}

impl PinDirGuard {
    /// Takes charge of `path`, which need not exist yet.
    pub fn new(path: impl Into<PathBuf>) -> Self {
        Self {
            pins: PinDir::new(path.into()),
        }
    }

    pub fn pins(&self) -> &PinDir {
        &self.pins
    }

    pub fn path(&self) -> &Path {
        self.pins.path()
    }
}

impl Drop for PinDirGuard {
    fn drop(&mut self) {
        if let Err(e) = remove_pins(&self.pins, |_| None) {
            eprintln!("removing {}: {e}", self.pins.path().display());
        }
    }
}

/// One program of the eBPF object, loaded on its own: the object's maps (declared
/// pinned by name) go to a scratch pin directory of its own. Dropping it unloads the
/// program and removes the directory.
pub struct SoloProgram {
    ebpf: Ebpf,
    name: &'static str,
    // Dropped after the object.
    guard: PinDirGuard,
}

impl SoloProgram {
    /// Loads program `name` (one of [`visibility_common::program_names`]).
    pub fn load(name: &'static str) -> Result<Self> {
        require_root()?;
        retry_interrupted_load(|| Self::load_once(name))
    }

    fn load_once(name: &'static str) -> Result<Self> {
        let guard = PinDirGuard::new(unique_pin_path(name));
        fs::create_dir_all(guard.path())
            .with_context(|| format!("creating {}", guard.path().display()))?;
        let ebpf = EbpfLoader::new()
            .default_map_pin_directory(guard.path())
            .load(EBPF_OBJECT)
            .context("loading the eBPF object")?;
        let mut solo = Self { ebpf, name, guard };
        solo.program_mut()?
            .load()
            .with_context(|| format!("loading {name}"))?;
        Ok(solo)
    }

    pub fn program(&self) -> Result<&SchedClassifier> {
        Ok(self
            .ebpf
            .program(self.name)
            .with_context(|| format!("no {} program", self.name))?
            .try_into()?)
    }

    pub fn program_mut(&mut self) -> Result<&mut SchedClassifier> {
        Ok(self
            .ebpf
            .program_mut(self.name)
            .with_context(|| format!("no {} program", self.name))?
            .try_into()?)
    }

    /// The object, to fill its maps.
    pub fn ebpf_mut(&mut self) -> &mut Ebpf {
        &mut self.ebpf
    }

    pub fn pins(&self) -> &PinDir {
        self.guard.pins()
    }

    /// Every slot of the object's counters map, summed over CPUs: what this program
    /// counted, apart from any other copy of the datapath.
    pub fn counters(&self) -> Result<Vec<(Hook, Counter, CounterValue)>> {
        let map = self
            .ebpf
            .map(map_names::COUNTERS)
            .context("no counters map")?;
        let counters: aya::maps::PerCpuArray<_, CounterValue> =
            aya::maps::PerCpuArray::try_from(map)?;
        let mut out = Vec::new();
        for hook in Hook::ALL {
            for counter in Counter::ALL {
                let slot = visibility_common::counters::slot(*hook, *counter);
                let per_cpu = counters.get(&slot, 0)?;
                let total = per_cpu
                    .iter()
                    .fold(CounterValue::default(), |sum, v| CounterValue {
                        packets: sum.packets + v.packets,
                        bytes: sum.bytes + v.bytes,
                    });
                out.push((*hook, *counter, total));
            }
        }
        Ok(out)
    }
}

/// `lab_router` on the lab gateway's interface: the gateway namespace, the stand-in
/// VPC, forwards in TC (a FIB lookup, new MACs, one hop spent) and its IP stack never
/// sees the traffic it routes back to the node. The nearest a machine that runs the
/// node and the gateway on the same CPUs comes to a VPC whose work happens off the
/// node: only the veth crossings into the gateway and back, and this program, remain.
/// Dropping it removes the filter (and its clsact qdisc) and the program.
pub struct GatewayRouter {
    gateway: Netns,
    // Dropped after the filter is gone.
    _program: SoloProgram,
}

impl GatewayRouter {
    /// Attaches the router to the gateway's interface, ahead of its IP stack.
    pub fn attach(lab: &Lab) -> Result<Self> {
        let mut program = SoloProgram::load(program_names::LAB_ROUTER)?;
        let pinned = program.pins().path().join(program_names::LAB_ROUTER);
        program
            .program_mut()?
            .pin(&pinned)
            .context("pinning lab_router")?;
        let gateway = lab.gateway().clone();
        gateway.run("tc", ["qdisc", "add", "dev", GATEWAY_IFNAME, "clsact"])?;
        let router = Self {
            gateway,
            _program: program,
        };
        router.gateway.run(
            "tc",
            [
                "filter",
                "add",
                "dev",
                GATEWAY_IFNAME,
                "ingress",
                "bpf",
                "direct-action",
                "object-pinned",
                &pinned.to_string_lossy(),
            ],
        )?;
        Ok(router)
    }
}

impl Drop for GatewayRouter {
    fn drop(&mut self) {
        if self.gateway.exists()
            && let Err(e) = self
                .gateway
                .run("tc", ["qdisc", "del", "dev", GATEWAY_IFNAME, "clsact"])
        {
            eprintln!("removing the gateway's lab_router: {e:#}");
        }
    }
}

// ---------------------------------------------------------------------------------------
// The pinned datapath
// ---------------------------------------------------------------------------------------

/// The datapath, freshly loaded and pinned under a directory of its own.
pub struct PinnedDatapath {
    datapath: Datapath,
    // Declared last, so the programs are closed before their pins go.
    guard: PinDirGuard,
}

impl PinnedDatapath {
    /// Loads the eBPF object and pins it under [`unique_pin_path`]`(tag)`.
    pub fn load(tag: &str) -> Result<Self> {
        require_root()?;
        STALE_PINS.call_once(|| {
            if let Err(e) = cleanup_stale_pins() {
                eprintln!("cleaning up stale pin directories: {e:#}");
            }
        });
        let guard = PinDirGuard::new(unique_pin_path(tag));
        // Datapath::open retries a load the verifier gave up on with EAGAIN itself.
        let (datapath, origin) = Datapath::open(guard.path(), &LoadOptions::default())
            .with_context(|| format!("loading the datapath at {}", guard.path().display()))?;
        ensure!(
            origin == Origin::Loaded,
            "{} held a datapath already",
            guard.path().display()
        );
        Ok(Self { datapath, guard })
    }

    pub fn program(&self, kind: ProgramKind) -> &SchedClassifier {
        self.datapath.program(kind)
    }

    pub fn pins(&self) -> &PinDir {
        self.guard.pins()
    }

    /// Opens the pinned maps (another set of file descriptors on the same maps).
    pub fn maps(&self) -> Result<Maps> {
        Maps::open(self.pins()).context("opening the pinned maps")
    }
}

/// How often [`retry_interrupted_load`] tries; libbpf tries `BPF_PROG_LOAD` as often.
const LOAD_ATTEMPTS: usize = 5;

/// Runs `load` again while it fails with `EAGAIN`, up to [`LOAD_ATTEMPTS`] times.
///
/// The verifier gives up with `EAGAIN` when the loading thread has a signal pending;
/// with many tests loading at once on a busy machine that happens (a verification that
/// takes milliseconds alone takes tens of them). libbpf retries `BPF_PROG_LOAD` on
/// `EAGAIN`; aya 0.14 does not.
pub fn retry_interrupted_load<T>(mut load: impl FnMut() -> Result<T>) -> Result<T> {
    let mut attempt = 1;
    loop {
        match load() {
            Err(e) if attempt < LOAD_ATTEMPTS && is_errno(&e, libc::EAGAIN) => attempt += 1,
            result => return result,
        }
    }
}

/// Whether the innermost cause of `error` is the OS error `errno`.
pub fn is_errno(error: &anyhow::Error, errno: i32) -> bool {
    error
        .chain()
        .filter_map(|cause| cause.downcast_ref::<std::io::Error>())
        .any(|io| io.raw_os_error() == Some(errno))
}

/// Configures the maps as the daemon does on a lab node: the Pod CIDRs, the node's
/// addresses (the Pod gateway addresses on every host veth and the uplink's), a gateway
/// per family on the uplink (ifindex `uplink`), kube-proxy's masquerade mark, and on.
///
/// Unlike the daemon, it registers no Pod interface (`add_pod_iface`), so that returning
/// packets take `bpf_redirect` unless a test registers the veth (`bpf_redirect_peer`).
pub fn configure_like_daemon(maps: &mut Maps, uplink: u32) -> Result<()> {
    for cidr in [POD_CIDR_V4, POD_CIDR_V6] {
        let net: IpNet = cidr.parse()?;
        maps.add_pod_cidr(&net)?;
    }
    let node_addrs: [IpAddr; 4] = [
        POD_GATEWAY_V4.into(),
        POD_GATEWAY_V6.into(),
        NODE_IPV4.into(),
        NODE_IPV6.into(),
    ];
    for addr in &node_addrs {
        maps.add_node_addr(addr)?;
    }
    for (family, addr, node_addr) in [
        (
            Family::V4,
            IpAddr::from(GATEWAY_IPV4),
            IpAddr::from(NODE_IPV4),
        ),
        (
            Family::V6,
            IpAddr::from(GATEWAY_IPV6),
            IpAddr::from(NODE_IPV6),
        ),
    ] {
        maps.set_gateway(
            family,
            Gateway {
                ifindex: uplink,
                addr: addr_bytes(&addr),
                node_addr: addr_bytes(&node_addr),
            },
        )?;
    }
    maps.set_enabled(true)?;
    Ok(())
}

// ---------------------------------------------------------------------------------------
// BPF_PROG_TEST_RUN
// ---------------------------------------------------------------------------------------

/// `sizeof(struct __sk_buff)` (linux/bpf.h, since Linux 5.16). Older kernels accept it
/// as long as the bytes past their own size are zero, which they are.
const SK_BUFF_SIZE: usize = 192;
const SK_BUFF_MARK: usize = 8;
const SK_BUFF_INGRESS_IFINDEX: usize = 36;
const SK_BUFF_IFINDEX: usize = 40;

/// The `__sk_buff` fields a run sets; the kernel rejects a context with any other
/// field it does not take from userspace set.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct SkbCtx {
    /// The device the skb is on (`skb->dev`); must exist in the namespace of the run.
    pub ifindex: u32,
    /// The device the skb entered the node on (`skb->skb_iif`).
    pub ingress_ifindex: u32,
    /// `skb->mark`.
    pub mark: u32,
}

impl SkbCtx {
    /// An skb on `ifindex` that entered there.
    pub fn on(ifindex: u32) -> Self {
        Self {
            ifindex,
            ingress_ifindex: ifindex,
            mark: 0,
        }
    }

    pub fn with_mark(self, mark: u32) -> Self {
        Self { mark, ..self }
    }

    /// The context as a zeroed `struct __sk_buff` with the three fields filled in.
    pub fn to_sk_buff(&self) -> [u8; SK_BUFF_SIZE] {
        let mut raw = [0u8; SK_BUFF_SIZE];
        for (offset, value) in [
            (SK_BUFF_MARK, self.mark),
            (SK_BUFF_INGRESS_IFINDEX, self.ingress_ifindex),
            (SK_BUFF_IFINDEX, self.ifindex),
        ] {
            raw[offset..offset + 4].copy_from_slice(&value.to_ne_bytes());
        }
        raw
    }
}

/// What one `BPF_PROG_TEST_RUN` returned.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct RunOutput {
    /// The program's return value (`TC_ACT_*`).
    pub return_value: u32,
    /// The frame after the program (after the last run, with `repeat`).
    pub data: Vec<u8>,
    /// The kernel's mean time per run.
    pub duration: Duration,
}

/// Room for a program that grows the frame.
const OUTPUT_SLACK: usize = 256;

/// Runs `program` on `frame` with `ctx`, `repeat` times, in `netns`.
///
/// The kernel runs the program `repeat` times on one skb: changes a run makes (a TTL
/// it spends, say) are what the next run sees.
pub fn test_run(
    netns: &Netns,
    program: &SchedClassifier,
    frame: &[u8],
    ctx: SkbCtx,
    repeat: u32,
) -> Result<RunOutput> {
    netns
        .in_ns(|| run_here(program, frame, ctx, repeat))?
        .with_context(|| format!("in netns {}", netns.name()))
}

/// Runs `program` `batches` times [`test_run`]`(.., repeat)` on a fresh copy of `frame`,
/// all from one thread in `netns`. Returns the mean time per run over all of them, in
/// nanoseconds, and the last run's output.
///
/// The kernel reports each batch's mean in whole nanoseconds, rounded down.
pub fn time_runs(
    netns: &Netns,
    program: &SchedClassifier,
    frame: &[u8],
    ctx: SkbCtx,
    repeat: u32,
    batches: u32,
) -> Result<(f64, RunOutput)> {
    ensure!(repeat > 0 && batches > 0, "nothing to run");
    netns
        .in_ns(|| {
            let mut total_ns = 0f64;
            let mut last = None;
            for _ in 0..batches {
                let out = run_here(program, frame, ctx, repeat)?;
                total_ns += out.duration.as_nanos() as f64 * f64::from(repeat);
                last = Some(out);
            }
            let runs = f64::from(repeat) * f64::from(batches);
            anyhow::Ok((total_ns / runs, last.expect("at least one batch")))
        })?
        .with_context(|| format!("in netns {}", netns.name()))
}

/// [`test_run`] in the calling thread's namespace.
fn run_here(
    program: &SchedClassifier,
    frame: &[u8],
    ctx: SkbCtx,
    repeat: u32,
) -> Result<RunOutput> {
    let sk_buff = ctx.to_sk_buff();
    let mut out = vec![0u8; frame.len() + OUTPUT_SLACK];
    let result = program
        .test_run(TestRunOptions {
            data_in: Some(frame),
            data_out: Some(&mut out),
            ctx_in: Some(&sk_buff),
            repeat,
            ..TestRunOptions::default()
        })
        .with_context(|| {
            format!(
                "BPF_PROG_TEST_RUN of a {}-byte frame with {ctx:?}",
                frame.len()
            )
        })?;
    let size = usize::try_from(result.data_size_out)?;
    ensure!(size <= out.len(), "the kernel wrote {size} bytes");
    out.truncate(size);
    Ok(RunOutput {
        return_value: result.return_value,
        data: out,
        duration: result.duration,
    })
}

/// `BPF_F_TEST_SKB_CHECKSUM_COMPLETE` (linux/bpf.h): aya 0.14 does not offer the flag.
const BPF_F_TEST_SKB_CHECKSUM_COMPLETE: u32 = 1 << 2;
const BPF_PROG_TEST_RUN: libc::c_long = 10;

/// `BPF_PROG_TEST_RUN` with `BPF_F_TEST_SKB_CHECKSUM_COMPLETE`, by hand: the program's
/// return value, `None` when the kernel does not know the flag, an error with
/// `EBADMSG` when the program left `skb->csum` wrong.
fn test_run_checksum_complete(
    program: &SchedClassifier,
    frame: &[u8],
    ctx: SkbCtx,
) -> Result<Option<u32>> {
    use std::os::fd::{AsFd as _, AsRawFd as _};
    let fd = program
        .fd()
        .context("the program's fd")?
        .as_fd()
        .as_raw_fd();
    let sk_buff = ctx.to_sk_buff();
    let mut out = vec![0u8; frame.len() + OUTPUT_SLACK];
    // `union bpf_attr`'s `test` member: fields at their offsets, the rest zero.
    let mut attr = [0u8; 80];
    let mut put32 =
        |offset: usize, value: u32| attr[offset..offset + 4].copy_from_slice(&value.to_ne_bytes());
    put32(0, u32::try_from(fd)?);
    put32(8, u32::try_from(frame.len())?);
    put32(12, u32::try_from(out.len())?);
    put32(32, 1);
    put32(40, u32::try_from(sk_buff.len())?);
    put32(64, BPF_F_TEST_SKB_CHECKSUM_COMPLETE);
    attr[16..24].copy_from_slice(&(frame.as_ptr() as u64).to_ne_bytes());
    attr[24..32].copy_from_slice(&(out.as_mut_ptr() as u64).to_ne_bytes());
    attr[48..56].copy_from_slice(&(sk_buff.as_ptr() as u64).to_ne_bytes());
    // SAFETY: `attr` is a valid `bpf_attr` prefix whose pointers outlive the call.
    let rc = unsafe {
        libc::syscall(
            libc::SYS_bpf,
            BPF_PROG_TEST_RUN,
            attr.as_mut_ptr(),
            attr.len(),
        )
    };
    if rc < 0 {
        let error = std::io::Error::last_os_error();
        if error.raw_os_error() == Some(libc::EINVAL) {
            return Ok(None);
        }
        return Err(anyhow!(error).context("BPF_PROG_TEST_RUN with CHECKSUM_COMPLETE"));
    }
    Ok(Some(u32::from_ne_bytes(attr[4..8].try_into()?)))
}

// ---------------------------------------------------------------------------------------
// Counters
// ---------------------------------------------------------------------------------------

/// Every counter slot, summed over CPUs, at one moment.
#[derive(Clone, Debug)]
pub struct CounterSnapshot(Vec<(Hook, Counter, CounterValue)>);

impl CounterSnapshot {
    pub fn get(&self, hook: Hook, counter: Counter) -> CounterValue {
        self.0
            .iter()
            .find(|(h, c, _)| *h == hook && *c == counter)
            .map(|(_, _, v)| *v)
            .unwrap_or_default()
    }

    /// The slots that moved since `before`, with how much, in slot order.
    pub fn since(&self, before: &CounterSnapshot) -> Vec<(Hook, Counter, CounterValue)> {
        self.0
            .iter()
            .filter_map(|(hook, counter, now)| {
                let then = before.get(*hook, *counter);
                let delta = CounterValue {
                    packets: now.packets.wrapping_sub(then.packets),
                    bytes: now.bytes.wrapping_sub(then.bytes),
                };
                (delta != CounterValue::default()).then_some((*hook, *counter, delta))
            })
            .collect()
    }
}

// ---------------------------------------------------------------------------------------
// Interfaces and neighbours
// ---------------------------------------------------------------------------------------

/// The MAC address of `ifname` in `netns`.
pub fn mac_of(netns: &Netns, ifname: &str) -> Result<Mac> {
    let out = netns.run("ip", ["-br", "link", "show", "dev", ifname])?;
    // "eth0@if3  UP  02:11:22:33:44:55 <BROADCAST,...>"
    let text = out
        .split_whitespace()
        .nth(2)
        .with_context(|| format!("no MAC address in {out:?}"))?;
    parse_mac(text)
}

/// Parses `aa:bb:cc:dd:ee:ff`.
pub fn parse_mac(text: &str) -> Result<Mac> {
    let mut mac = [0u8; 6];
    let mut parts = text.split(':');
    for byte in &mut mac {
        let part = parts.next().with_context(|| format!("{text:?} is short"))?;
        *byte = u8::from_str_radix(part, 16).with_context(|| format!("{text:?}"))?;
    }
    ensure!(parts.next().is_none(), "{text:?} is long");
    Ok(mac)
}

fn format_mac(mac: &Mac) -> String {
    mac.iter()
        .map(|b| format!("{b:02x}"))
        .collect::<Vec<_>>()
        .join(":")
}

/// Makes `addr` a permanent neighbour with `mac` on `dev` in `netns`.
pub fn set_neighbour(netns: &Netns, addr: IpAddr, mac: &Mac, dev: &str) -> Result<()> {
    netns.run(
        "ip",
        [
            "neigh",
            "replace",
            &addr.to_string(),
            "lladdr",
            &format_mac(mac),
            "dev",
            dev,
            "nud",
            "permanent",
        ],
    )?;
    Ok(())
}

/// Removes any neighbour entry for `addr` on `dev` in `netns`.
pub fn forget_neighbour(netns: &Netns, addr: IpAddr, dev: &str) -> Result<()> {
    let addr = addr.to_string();
    let shown = || netns.run("ip", ["neigh", "show", "to", addr.as_str(), "dev", dev]);
    if !shown()?.trim().is_empty() {
        netns.run("ip", ["neigh", "del", addr.as_str(), "dev", dev])?;
    }
    let left = shown()?;
    ensure!(
        left.trim().is_empty(),
        "neighbour {addr} on {dev} stayed: {left}"
    );
    Ok(())
}

// ---------------------------------------------------------------------------------------
// The lab with a datapath
// ---------------------------------------------------------------------------------------

/// A [`Lab`] whose node runs the datapath, configured as the daemon would, with the
/// gateway's neighbour entries known on the node. Nothing is attached: programs run
/// through `BPF_PROG_TEST_RUN` in the node's namespace. Dropping it removes the pins
/// and the namespaces.
pub struct DatapathLab {
    /// The pinned maps, for reading and reconfiguring.
    pub maps: Maps,
    datapath: PinnedDatapath,
    lab: Lab,
    uplink: u32,
    uplink_mac: Mac,
    gateway_mac: Mac,
}

impl DatapathLab {
    /// Builds the lab (three Pods), loads, pins and configures the datapath.
    pub fn new(tag: &str) -> Result<Self> {
        require_root()?;
        let lab = Lab::new(tag, LabConfig::default()).context("building the lab")?;
        let datapath = PinnedDatapath::load(tag)?;
        let mut maps = datapath.maps()?;
        let uplink = lab.node_uplink_ifindex()?;
        configure_like_daemon(&mut maps, uplink)?;
        let uplink_mac = mac_of(lab.node(), NODE_UPLINK)?;
        let gateway_mac = mac_of(lab.gateway(), GATEWAY_IFNAME)?;
        let this = Self {
            maps,
            datapath,
            lab,
            uplink,
            uplink_mac,
            gateway_mac,
        };
        this.set_gateway_neighbours(true)?;
        Ok(this)
    }

    pub fn lab(&self) -> &Lab {
        &self.lab
    }

    pub fn datapath(&self) -> &PinnedDatapath {
        &self.datapath
    }

    /// The node's uplink ifindex, in the node namespace.
    pub fn uplink(&self) -> u32 {
        self.uplink
    }

    pub fn uplink_mac(&self) -> Mac {
        self.uplink_mac
    }

    /// The MAC of the gateway's interface on the uplink's link.
    pub fn gateway_mac(&self) -> Mac {
        self.gateway_mac
    }

    /// Pod `pod`'s host-side veth ifindex, in the node namespace.
    pub fn host_veth(&self, pod: usize) -> u32 {
        self.lab.pod_host_ifindex(pod)
    }

    /// The MAC of Pod `pod`'s host-side veth.
    pub fn host_veth_mac(&self, pod: usize) -> Result<Mac> {
        mac_of(self.lab.node(), self.lab.pod_host_ifname(pod))
    }

    /// The MAC of Pod `pod`'s own interface.
    pub fn pod_mac(&self, pod: usize) -> Result<Mac> {
        mac_of(self.lab.pod_ns(pod), POD_IFNAME)
    }

    /// What `pod_ingress` sees of a packet Pod `pod` sends.
    pub fn pod_ingress_ctx(&self, pod: usize) -> SkbCtx {
        SkbCtx::on(self.host_veth(pod))
    }

    /// What `pod_egress` sees of a packet the node forwards to Pod `pod` after it entered
    /// the node on `ingress_ifindex`.
    pub fn pod_egress_ctx(&self, pod: usize, ingress_ifindex: u32) -> SkbCtx {
        SkbCtx {
            ifindex: self.host_veth(pod),
            ingress_ifindex,
            mark: 0,
        }
    }

    /// What `uplink_ingress` sees of a packet arriving on the uplink.
    pub fn uplink_ctx(&self) -> SkbCtx {
        SkbCtx::on(self.uplink)
    }

    /// The gateway's neighbour entries (both families) on the node: permanent, or none.
    pub fn set_gateway_neighbours(&self, known: bool) -> Result<()> {
        for addr in [IpAddr::from(GATEWAY_IPV4), IpAddr::from(GATEWAY_IPV6)] {
            if known {
                set_neighbour(self.lab.node(), addr, &self.gateway_mac, NODE_UPLINK)?;
            } else {
                forget_neighbour(self.lab.node(), addr, NODE_UPLINK)?;
            }
        }
        Ok(())
    }

    /// Pod `pod`'s neighbour entries (both families) on its host veth: permanent with
    /// its real MAC, or none.
    pub fn set_pod_neighbours(&self, pod: usize, known: bool) -> Result<()> {
        let dev = self.lab.pod_host_ifname(pod);
        let mac = self.pod_mac(pod)?;
        for family in [IpFamily::V4, IpFamily::V6] {
            let addr = self.lab.pod_ip(pod, family);
            if known {
                set_neighbour(self.lab.node(), addr, &mac, dev)?;
            } else {
                forget_neighbour(self.lab.node(), addr, dev)?;
            }
        }
        Ok(())
    }

    /// Runs program `kind` once on `frame`, in the node namespace.
    pub fn run(&self, kind: ProgramKind, frame: &[u8], ctx: SkbCtx) -> Result<RunOutput> {
        self.run_repeated(kind, frame, ctx, 1)
    }

    /// Runs program `kind` `repeat` times on one skb made of `frame` (see [`test_run`]).
    pub fn run_repeated(
        &self,
        kind: ProgramKind,
        frame: &[u8],
        ctx: SkbCtx,
        repeat: u32,
    ) -> Result<RunOutput> {
        test_run(
            self.lab.node(),
            self.datapath.program(kind),
            frame,
            ctx,
            repeat,
        )
        .with_context(|| format!("running {}", kind.name()))
    }

    /// Runs program `kind` once on `frame` as if its driver had supplied a checksum of
    /// all its bytes (`CHECKSUM_COMPLETE`, as real NICs do), through
    /// `BPF_F_TEST_SKB_CHECKSUM_COMPLETE`: the kernel checks after the run that
    /// `skb->csum` still matches the packet, and fails with `EBADMSG` if it does not.
    /// `Ok(None)` on kernels without the flag (before 6.11).
    pub fn run_checksum_complete(
        &self,
        kind: ProgramKind,
        frame: &[u8],
        ctx: SkbCtx,
    ) -> Result<Option<u32>> {
        let program = self.datapath.program(kind);
        self.lab
            .node()
            .in_ns(|| test_run_checksum_complete(program, frame, ctx))?
    }

    /// [`time_runs`] of program `kind` in the node namespace.
    pub fn time_runs(
        &self,
        kind: ProgramKind,
        frame: &[u8],
        ctx: SkbCtx,
        repeat: u32,
        batches: u32,
    ) -> Result<(f64, RunOutput)> {
        let program = self.datapath.program(kind);
        time_runs(self.lab.node(), program, frame, ctx, repeat, batches)
            .with_context(|| format!("timing {}", kind.name()))
    }

    /// Every counter, now.
    pub fn counters(&self) -> Result<CounterSnapshot> {
        Ok(CounterSnapshot(self.maps.counters()?))
    }

    /// One counter slot, summed over CPUs.
    pub fn counter(&self, hook: Hook, counter: Counter) -> Result<CounterValue> {
        Ok(self.counters()?.get(hook, counter))
    }

    /// The flow map's entry for `key`.
    pub fn flow(&self, key: &FlowKey) -> Result<Option<FlowStats>> {
        absent_is_none(self.maps.flows().get(key, 0))
            .with_context(|| format!("reading flow {key:?}"))
    }

    /// The NAT-leg map's entry for `key` (a Service reply as it crossed the gateway):
    /// the Service source to put back.
    pub fn nat_leg(&self, key: &FlowKey) -> Result<Option<NatLeg>> {
        let path = self.datapath.pins().map(map_names::NAT_LEGS);
        let data = MapData::from_pin(&path).with_context(|| format!("opening {path:?}"))?;
        let legs: HashMap<MapData, FlowKey, NatLeg> = HashMap::try_from(Map::from_map_data(data)?)?;
        absent_is_none(legs.get(key, 0))
    }
}

fn absent_is_none<V>(result: Result<V, MapError>) -> Result<Option<V>> {
    match result {
        Ok(value) => Ok(Some(value)),
        Err(MapError::KeyNotFound) => Ok(None),
        Err(MapError::SyscallError(e)) if e.io_error.raw_os_error() == Some(libc::ENOENT) => {
            Ok(None)
        }
        Err(e) => Err(anyhow!(e)),
    }
}
