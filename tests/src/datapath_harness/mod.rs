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
//! * [`SoloProgram`]: one program of an object loaded on its own (the benchmarks'
//!   `bench_baseline` and `lab_router`, from their own object, or one of the datapath's),
//!   and [`GatewayRouter`]: `lab_router` on the lab gateway, the benchmarks' stand-in for
//!   a VPC that works off the node.
//!
//! `BPF_PROG_TEST_RUN` runs the program in the calling thread's network namespace: the
//! `ifindex` of the context names a device of that namespace, and `bpf_fib_lookup`
//! consults its routes and neighbours. So every run enters the lab's node namespace.
//!
//! Everything here needs root.

//!
//! Its files: [`tc`] (return codes, hooks), [`pins`] (pin directories), [`loaded`] (the
//! pinned and configured datapath), [`solo`] (one program on its own), [`test_run`]
//! (`BPF_PROG_TEST_RUN`), [`neighbours`] (MACs and neighbour entries); this one holds
//! [`DatapathLab`].

pub mod loaded;
pub mod neighbours;
pub mod pins;
pub mod solo;
pub mod tc;
pub mod test_run;

use std::net::IpAddr;

use anyhow::{Context as _, Result, anyhow};
use aya::maps::{HashMap, Map, MapData, MapError};
use visibility::{datapath::ProgramKind, maps::Maps};
use visibility_common::{
    counters::{Counter, CounterValue},
    flow::{FlowKey, FlowStats, NatLeg},
    map_names,
    verdict::Hook,
};

use self::{loaded::require_root, test_run::test_run_checksum_complete};
pub use self::{
    loaded::{PinnedDatapath, configure_like_daemon, is_errno, retry_interrupted_load},
    neighbours::{Mac, forget_neighbour, mac_of, parse_mac, set_neighbour},
    pins::{BPFFS_ROOT, PinDirGuard, cleanup_stale_pins, unique_pin_path},
    solo::{GatewayRouter, SoloProgram},
    tc::{TC_ACT_OK, TC_ACT_REDIRECT, TC_ACT_SHOT, TC_ACT_UNSPEC, family, hook_of},
    test_run::{RunOutput, SkbCtx, test_run, time_runs},
};
use crate::lab::{
    GATEWAY_IFNAME, GATEWAY_IPV4, GATEWAY_IPV6, IpFamily, Lab, LabConfig, NODE_UPLINK, POD_IFNAME,
};

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

    /// Runs program `kind` once on `frame`, and returns its output and the counter slots
    /// the run moved, in slot order.
    pub fn run_counted(
        &self,
        kind: ProgramKind,
        frame: &[u8],
        ctx: SkbCtx,
    ) -> Result<(RunOutput, Vec<(Hook, Counter)>)> {
        let before = self.counters()?;
        let out = self.run(kind, frame, ctx)?;
        let moved = self
            .counters()?
            .since(&before)
            .into_iter()
            .map(|(hook, counter, _)| (hook, counter))
            .collect();
        Ok((out, moved))
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
