//! One program of an eBPF object loaded on its own (the benchmarks' `bench_baseline`
//! and `lab_router`, from their own object, or one of the datapath's), and
//! `lab_router` attached to the lab gateway.

use std::fs;

use anyhow::{Context as _, Result};
use aya::{Ebpf, EbpfLoader, programs::SchedClassifier};
use visibility::datapath::{BENCH_EBPF_OBJECT, EBPF_OBJECT, PinDir};
use visibility_common::{
    bench_program_names,
    counters::{Counter, CounterValue},
    map_names,
    verdict::Hook,
};

use super::{
    loaded::{require_root, retry_interrupted_load},
    pins::{PinDirGuard, unique_pin_path},
};
use crate::lab::{GATEWAY_IFNAME, Lab, Netns};

/// One program of an eBPF object, loaded on its own: the object's maps (declared
/// pinned by name) go to a scratch pin directory of its own. Dropping it unloads the
/// program and removes the directory.
pub struct SoloProgram {
    ebpf: Ebpf,
    name: &'static str,
    // Dropped after the object.
    guard: PinDirGuard,
}

impl SoloProgram {
    /// Loads program `name` of the datapath's object (one of
    /// [`visibility_common::program_names`]).
    pub fn load(name: &'static str) -> Result<Self> {
        Self::load_from(EBPF_OBJECT, name)
    }

    /// Loads program `name` of the benchmarks' object (`bench_baseline`, `lab_router`).
    pub fn load_bench(name: &'static str) -> Result<Self> {
        Self::load_from(BENCH_EBPF_OBJECT, name)
    }

    fn load_from(object: &'static [u8], name: &'static str) -> Result<Self> {
        require_root()?;
        retry_interrupted_load(|| Self::load_once(object, name))
    }

    fn load_once(object: &'static [u8], name: &'static str) -> Result<Self> {
        let guard = PinDirGuard::new(unique_pin_path(name));
        fs::create_dir_all(guard.path())
            .with_context(|| format!("creating {}", guard.path().display()))?;
        let ebpf = EbpfLoader::new()
            .default_map_pin_directory(guard.path())
            .load(object)
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
                out.push((*hook, *counter, per_cpu.iter().sum()));
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
        let mut program = SoloProgram::load_bench(bench_program_names::LAB_ROUTER)?;
        let pinned = program.pins().path().join(bench_program_names::LAB_ROUTER);
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
