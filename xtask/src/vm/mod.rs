//! `cargo xtask vm-test`: the kernel tests on other kernels than the host's, each in a
//! small QEMU VM.
//!
//! For every kernel (Debian's 6.1 LTS cloud kernel, where programs attach as clsact
//! filters, and bookworm-backports' 6.12 cloud kernel, where they attach with TCX):
//!
//! 1. the kernel package is resolved from the `linux-image-cloud-amd64` metapackage,
//!    fetched with `apt-get download` through a private apt configuration under
//!    `target/vm/apt` (the host's apt sources and state stay as they are) and unpacked with
//!    `dpkg-deb -x` under `target/vm/kernels`; nothing is installed, and a second run
//!    reuses the unpacked kernel without asking apt (`--refresh` looks again);
//! 2. an initramfs is built: busybox (static), the kernel's own modules for veth, clsact,
//!    cls_bpf, nftables and conntrack (with their dependencies from `modules.dep`),
//!    iproute2, nftables, conntrack, iptables, nsenter, ping, sysctl and bpftool with
//!    their shared libraries, the statically linked test binaries and the `visibility`
//!    binary, and an `/init` that mounts proc, sys, devtmpfs, bpffs and tracefs, loads
//!    the modules, runs the tests and powers off;
//! 3. QEMU boots it under TCG (never KVM: this machine's KVM does not run stock kernels)
//!    with a hard timeout; the console goes to `target/vm/logs/<kernel>.log`. The VMs run
//!    at the same time, the tests one at a time inside each.
//!
//! A kernel passes when every test binary reports its result with no failure and the
//! daemon's log shows the attach mode that kernel must use: clsact before Linux 6.6, TCX
//! from 6.6 on. A test that skips a check on a kernel without some feature prints why
//! (`SKIP: ...` for a whole test, `skipping ...` for a part); the summary lists those.
//!
//! The host's own kernel is tested by the normal `cargo test` (`cargo xtask test` runs it
//! before this tier).
//!
//! This file runs the steps; each has a file of its own: [`spec`] (what is booted and
//! run), [`host`] (host programs), [`binaries`] (the static test binaries), [`apt`] and
//! [`kernel`] (step 1), [`cpio`] and [`initramfs`] (step 2), [`qemu`] (step 3) and
//! [`results`] (reading the console back, and the summary).

mod apt;
mod binaries;
mod cpio;
mod host;
mod initramfs;
mod kernel;
mod qemu;
mod results;
mod spec;

use std::{
    fs,
    path::PathBuf,
    time::{Duration, Instant},
};

use anyhow::{Context as _, bail, ensure};

use self::{
    apt::PrivateApt,
    binaries::build_static_binaries,
    host::check_host_tools,
    initramfs::build_initramfs,
    kernel::{Kernel, ensure_kernel, expected_attach_mode},
    qemu::boot,
    results::{KernelResult, Outcome, print_summary},
    spec::{DEFAULT_TESTS, KERNELS, KernelSpec, TestSelection},
};
use crate::paths::{target_dir, workspace_root};

#[derive(clap::Args, Clone)]
pub struct VmTestArgs {
    /// Only these kernels (repeatable): 6.1, 6.12. Default: all.
    #[arg(long = "kernel", value_name = "NAME")]
    kernels: Vec<String>,
    /// Test binaries to run instead of the default set (repeatable), as `BINARY` or
    /// `BINARY:FILTER,FILTER` (libtest name filters), e.g. `daemon:teardown`.
    #[arg(long = "test", value_name = "SPEC")]
    tests: Vec<String>,
    /// Hard limit for one VM, from boot to power-off; QEMU is killed after it.
    #[arg(long, default_value_t = DEFAULT_TIMEOUT_SECS, value_name = "SECONDS")]
    timeout: u64,
    /// Boot the kernels one after the other instead of at the same time.
    #[arg(long)]
    sequential: bool,
    /// Resolve the kernel packages again (private `apt-get update`) instead of reusing
    /// the ones unpacked by an earlier run.
    #[arg(long)]
    refresh: bool,
}

/// A guard against a hung guest, not a test budget: the tests keep their own. The
/// datapath's programs take the verifier far longer to walk since every Pod-to-Pod
/// packet is judged after the node's stack (pod_egress about 210,000 instructions), and
/// under TCG a daemon start on 6.1 spends tens of seconds there.
const DEFAULT_TIMEOUT_SECS: u64 = 1200;

impl Default for VmTestArgs {
    fn default() -> Self {
        Self {
            kernels: Vec::new(),
            tests: Vec::new(),
            timeout: DEFAULT_TIMEOUT_SECS,
            sequential: false,
            refresh: false,
        }
    }
}

/// Paths under `target/vm`.
struct VmDirs {
    root: PathBuf,
}

impl VmDirs {
    fn apt(&self) -> PathBuf {
        self.root.join("apt")
    }
    fn kernels(&self) -> PathBuf {
        self.root.join("kernels")
    }
    fn logs(&self) -> PathBuf {
        self.root.join("logs")
    }
    fn initramfs(&self) -> PathBuf {
        self.root.join("initramfs")
    }
    fn bin(&self) -> PathBuf {
        self.root.join("bin")
    }
}

pub fn vm_test(args: &VmTestArgs) -> anyhow::Result<()> {
    let started = Instant::now();
    let specs = selected_kernels(&args.kernels)?;
    let tests = selected_tests(&args.tests)?;
    check_host_tools()?;

    let workspace = workspace_root();
    let dirs = VmDirs {
        root: target_dir().join("vm"),
    };
    for dir in [dirs.kernels(), dirs.logs(), dirs.initramfs(), dirs.bin()] {
        fs::create_dir_all(&dir).with_context(|| format!("creating {}", dir.display()))?;
    }

    let build_started = Instant::now();
    let binaries = build_static_binaries(&workspace, &tests, &dirs.bin())?;
    let build_secs = build_started.elapsed().as_secs_f64();
    println!("vm-test: static binaries ready in {build_secs:.0}s");

    let mut apt = PrivateApt::new(dirs.apt());
    let mut prepared = Vec::new();
    for spec in &specs {
        let kernel = ensure_kernel(spec, &mut apt, &dirs.kernels(), args.refresh)?;
        let initramfs = dirs.initramfs().join(format!("{}.cpio.gz", spec.name));
        build_initramfs(&kernel, &binaries, &tests, &initramfs)?;
        let log = dirs.logs().join(format!("{}.log", spec.name));
        prepared.push((*spec, kernel, initramfs, log));
    }

    // The VMs run at the same time: the tests run one at a time inside each (see
    // init_script), so one VM keeps about one host CPU busy.
    let timeout = Duration::from_secs(args.timeout);
    let boot_one = |(spec, kernel, initramfs, log): &(&KernelSpec, Kernel, PathBuf, PathBuf)| {
        let boot_started = Instant::now();
        let outcome = boot(spec, kernel, initramfs, log, timeout);
        (outcome, boot_started.elapsed().as_secs_f64())
    };
    let boots: Vec<(anyhow::Result<Outcome>, f64)> = if args.sequential {
        prepared.iter().map(boot_one).collect()
    } else {
        std::thread::scope(|scope| {
            let handles: Vec<_> = prepared
                .iter()
                .map(|p| scope.spawn(move || boot_one(p)))
                .collect();
            handles
                .into_iter()
                .map(|h| h.join().expect("a boot thread panicked"))
                .collect()
        })
    };
    let mut results = Vec::new();
    for ((spec, kernel, _, log), (outcome, seconds)) in prepared.into_iter().zip(boots) {
        results.push(KernelResult {
            spec_name: spec.name,
            expected_mode: expected_attach_mode(&kernel.release),
            default_tests: args.tests.is_empty(),
            release: kernel.release,
            outcome: outcome?,
            seconds,
            log,
        });
    }

    let failed = print_summary(&results, build_secs, started.elapsed().as_secs_f64());
    if !failed.is_empty() {
        bail!(
            "vm-test: failed on {} (console logs under {})",
            failed.join(", "),
            dirs.logs().display()
        );
    }
    Ok(())
}

fn selected_kernels(names: &[String]) -> anyhow::Result<Vec<&'static KernelSpec>> {
    if names.is_empty() {
        return Ok(KERNELS.iter().collect());
    }
    names
        .iter()
        .map(|name| {
            KERNELS.iter().find(|k| k.name == name).with_context(|| {
                format!(
                    "unknown kernel {name:?}; known: {}",
                    KERNELS
                        .iter()
                        .map(|k| k.name)
                        .collect::<Vec<_>>()
                        .join(", ")
                )
            })
        })
        .collect()
}

fn selected_tests(specs: &[String]) -> anyhow::Result<Vec<TestSelection>> {
    if specs.is_empty() {
        return Ok(DEFAULT_TESTS
            .iter()
            .map(|(binary, filters)| TestSelection {
                binary: binary.to_string(),
                filters: filters.iter().map(|f| f.to_string()).collect(),
            })
            .collect());
    }
    specs
        .iter()
        .map(|spec| {
            let (binary, filters) = spec.split_once(':').unwrap_or((spec, ""));
            ensure!(
                !binary.is_empty()
                    && binary
                        .chars()
                        .all(|c| c.is_ascii_alphanumeric() || c == '_'),
                "--test {spec:?}: expected BINARY or BINARY:FILTER,FILTER"
            );
            let filters: Vec<String> = filters
                .split(',')
                .filter(|f| !f.is_empty())
                .map(str::to_owned)
                .collect();
            ensure!(
                filters.iter().all(|f| f
                    .chars()
                    .all(|c| c.is_ascii_alphanumeric() || "_:".contains(c))),
                "--test {spec:?}: filters are test names (letters, digits, _ and ::)"
            );
            Ok(TestSelection {
                binary: binary.to_owned(),
                filters,
            })
        })
        .collect()
}
