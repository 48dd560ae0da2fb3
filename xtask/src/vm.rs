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

use std::{
    collections::{BTreeMap, BTreeSet},
    fmt::Write as _,
    fs,
    io::{BufRead as _, BufReader, Read, Write as _},
    os::unix::{fs::PermissionsExt as _, process::CommandExt as _},
    path::{Path, PathBuf},
    process::{Child, Command, Stdio},
    sync::mpsc,
    time::{Duration, Instant},
};

use anyhow::{Context as _, bail, ensure};

use crate::run::{display, output, run};

/// The kernels this tier boots.
const KERNELS: &[KernelSpec] = &[
    KernelSpec {
        name: "6.1",
        suite: "bookworm",
        what: "Debian 12's 6.1 LTS cloud kernel: no TCX, programs attach as clsact filters",
    },
    KernelSpec {
        name: "6.12",
        suite: "bookworm-backports",
        what: "bookworm-backports' 6.12 cloud kernel: programs attach with TCX",
    },
];

/// The test binaries (integration tests of visibility-tests) and the tests of each that
/// run in the VMs (libtest name filters; none: all). Chosen to stay within a few minutes
/// per kernel under TCG: every BPF_PROG_TEST_RUN test, every end-to-end datapath test, and
/// the daemon tests that attach, report (`status --json`) and detach.
const DEFAULT_TESTS: &[(&str, &[&str])] = &[
    ("datapath_test_run", &[]),
    ("datapath_netns", &[]),
    (
        "daemon",
        &[
            "teardown_leaves_no_programs_links_or_pins",
            "status_shows_everything_and_fails_without_the_daemon",
        ],
    ),
];

/// Kernel modules the tests need: the datapath's (veth, clsact, cls_bpf) and the lab
/// gateway's (nftables with conntrack and named counters, the conntrack CLI's netlink),
/// plus the NAT and xtables glue that iptables-nft uses. Dependencies come from
/// `modules.dep`; built-in ones (`modules.builtin`) are skipped. Optional ones are parts
/// of another module on some kernels (nft_objref is in nf_tables on 6.12).
const MODULES: &[(&str, Need)] = &[
    ("veth", Need::Required),
    ("sch_ingress", Need::Required),
    ("cls_bpf", Need::Required),
    ("nf_tables", Need::Required),
    ("nft_ct", Need::Required),
    ("nft_objref", Need::Optional),
    ("nf_conntrack", Need::Required),
    ("nf_conntrack_netlink", Need::Required),
    ("nft_chain_nat", Need::Optional),
    ("nft_nat", Need::Optional),
    ("nft_masq", Need::Optional),
    ("nft_compat", Need::Optional),
];

#[derive(PartialEq)]
enum Need {
    Required,
    Optional,
}

/// Userspace tools in the guest: (guest path, host program), with their shared
/// libraries. The test fixtures find them through `PATH`.
const TOOLS: &[(&str, &str)] = &[
    ("/usr/sbin/ip", "ip"),
    ("/usr/sbin/tc", "tc"),
    ("/usr/sbin/nft", "nft"),
    ("/usr/sbin/conntrack", "conntrack"),
    ("/usr/sbin/xtables-nft-multi", "xtables-nft-multi"),
    ("/usr/bin/nsenter", "nsenter"),
    ("/usr/bin/ping", "ping"),
    ("/usr/sbin/sysctl", "sysctl"),
    ("/usr/sbin/bpftool", "bpftool"),
];

/// iptables commands, all of them `xtables-nft-multi` by another name.
const XTABLES_NAMES: &[&str] = &[
    "iptables",
    "iptables-save",
    "iptables-restore",
    "ip6tables",
    "ip6tables-save",
    "ip6tables-restore",
];

/// The guest's memory and CPUs. One vCPU: with two, QEMU 7.2's multi-threaded TCG
/// sometimes runs a stale `int3` that the kernel left while patching a static branch on
/// the other CPU (6.12 oopsed with `Oops: int3` in `__netif_receive_skb_core` during
/// datapath_netns); the tests run one at a time anyway, and the two VMs keep both host
/// CPUs busy.
const GUEST_MEMORY: &str = "1536M";
const GUEST_CPUS: &str = "1";

/// Lines the guest's /init writes around the tests; parsed back from the console.
const MARK: &str = "vm-test:";

/// A whole-test skip reported by a test: `SKIP: <test>: <reason>` (it passes in libtest's
/// count, and is counted as skipped here).
const SKIP_MARK: &str = "SKIP:";

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

/// How much slower than the host the guest runs CPU-bound work (TCG, measured: about
/// 4.4×, lab-notes). The fixtures scale their budgets for CPU-bound work (loading and
/// verifying the programs) by it; exchanges on the network keep theirs.
const GUEST_TIME_SCALE: &str = "5";

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

struct KernelSpec {
    /// Short name, as given to `--kernel` and used for the log file.
    name: &'static str,
    /// The suite whose `linux-image-cloud-amd64` it is.
    suite: &'static str,
    what: &'static str,
}

/// One test binary to run in the guest.
#[derive(Clone, Debug)]
struct TestSelection {
    binary: String,
    filters: Vec<String>,
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
        root: target_dir(&workspace).join("vm"),
    };
    for dir in [dirs.kernels(), dirs.logs(), dirs.initramfs(), dirs.bin()] {
        fs::create_dir_all(&dir).with_context(|| format!("creating {}", dir.display()))?;
    }

    let build_started = Instant::now();
    let binaries = build_static_binaries(&workspace, &tests, &dirs)?;
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

/// Finds a program in `PATH`, or in the sbin directories a non-root `PATH` lacks.
fn which(program: &str) -> Option<PathBuf> {
    let path = std::env::var_os("PATH").unwrap_or_default();
    std::env::split_paths(&path)
        .chain(["/usr/sbin", "/sbin", "/usr/bin", "/bin"].map(PathBuf::from))
        .map(|dir| dir.join(program))
        .find(|p| p.is_file())
}

/// Host programs vm-test uses, and the Debian packages they come from.
const HOST_TOOLS: &[(&str, &str)] = &[
    ("qemu-system-x86_64", "qemu-system-x86"),
    ("busybox", "busybox-static"),
    ("apt-get", "apt"),
    ("apt-cache", "apt"),
    ("dpkg-deb", "dpkg"),
    ("depmod", "kmod"),
    ("xz", "xz-utils"),
    ("gzip", "gzip"),
    ("strip", "binutils"),
    ("ldd", "libc-bin"),
    // Copied into the guest (TOOLS).
    ("ip", "iproute2"),
    ("tc", "iproute2"),
    ("nft", "nftables"),
    ("conntrack", "conntrack"),
    ("xtables-nft-multi", "iptables"),
    ("nsenter", "util-linux"),
    ("ping", "iputils-ping"),
    ("sysctl", "procps"),
    ("bpftool", "bpftool"),
];

/// Makes sure the host has every program vm-test uses, installing the missing Debian
/// packages when run as root (`cargo xtask setup` installs them too).
fn check_host_tools() -> anyhow::Result<()> {
    debug_assert!(
        TOOLS
            .iter()
            .all(|(_, program)| HOST_TOOLS.iter().any(|(p, _)| p == program))
    );
    let static_busybox = || which("busybox").is_some_and(|b| is_static(&b));
    let mut missing: Vec<&str> = HOST_TOOLS
        .iter()
        .filter(|(program, _)| which(program).is_none())
        .map(|(_, package)| *package)
        .collect();
    if !missing.contains(&"busybox-static") && !static_busybox() {
        // A dynamically linked busybox cannot run in the guest.
        missing.push("busybox-static");
    }
    missing.sort_unstable();
    missing.dedup();
    if missing.is_empty() {
        return Ok(());
    }
    // SAFETY: geteuid has no preconditions.
    let root = unsafe { libc::geteuid() } == 0;
    ensure!(
        root,
        "vm-test needs the Debian packages {}: run `cargo xtask setup` as root, or \
         `sudo apt-get install -y {}`",
        missing.join(", "),
        missing.join(" ")
    );
    println!("vm-test: installing {}", missing.join(" "));
    run(Command::new("apt-get").args(["update", "-qq"]))?;
    run(Command::new("apt-get")
        .args(["install", "-y", "-qq", "--no-install-recommends"])
        .args(&missing)
        .env("DEBIAN_FRONTEND", "noninteractive"))?;
    ensure!(
        HOST_TOOLS
            .iter()
            .all(|(program, _)| which(program).is_some())
            && static_busybox(),
        "still missing programs after installing {}",
        missing.join(" ")
    );
    Ok(())
}

/// Whether `ldd` calls the file static.
fn is_static(path: &Path) -> bool {
    Command::new("ldd")
        .arg(path)
        .output()
        .map(|o| {
            let text = String::from_utf8_lossy(&o.stdout).into_owned()
                + &String::from_utf8_lossy(&o.stderr);
            text.contains("not a dynamic executable") || text.contains("statically linked")
        })
        .unwrap_or(false)
}

fn workspace_root() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR"))
        .parent()
        .expect("xtask lives in the workspace")
        .to_owned()
}

fn target_dir(workspace: &Path) -> PathBuf {
    std::env::var_os("CARGO_TARGET_DIR")
        .map(PathBuf::from)
        .map(|dir| {
            if dir.is_absolute() {
                dir
            } else {
                workspace.join(dir)
            }
        })
        .unwrap_or_else(|| workspace.join("target"))
}

// ---------------------------------------------------------------------------------------
// Static binaries
// ---------------------------------------------------------------------------------------

const HOST_TRIPLE: &str = "x86_64-unknown-linux-gnu";

struct Binaries {
    /// Test binary name -> stripped static executable.
    tests: BTreeMap<String, PathBuf>,
    visibility: PathBuf,
}

/// Builds the selected test binaries and the `visibility` binary statically linked
/// (glibc, crt-static) for the host triple, and copies them without debug info.
fn build_static_binaries(
    workspace: &Path,
    tests: &[TestSelection],
    dirs: &VmDirs,
) -> anyhow::Result<Binaries> {
    let static_build = |args: &[&str]| -> anyhow::Result<Vec<serde_json::Value>> {
        let mut cmd = Command::new(std::env::var("CARGO").unwrap_or_else(|_| "cargo".into()));
        cmd.current_dir(workspace)
            .args(args)
            .args(["--target", HOST_TRIPLE, "--message-format=json"])
            .env(
                "CARGO_TARGET_X86_64_UNKNOWN_LINUX_GNU_RUSTFLAGS",
                "-C target-feature=+crt-static",
            )
            .stderr(Stdio::inherit());
        println!("$ {}", display(&cmd));
        let out = cmd
            .output()
            .with_context(|| format!("starting {}", display(&cmd)))?;
        ensure!(
            out.status.success(),
            "{} failed: {}",
            display(&cmd),
            out.status
        );
        Ok(String::from_utf8_lossy(&out.stdout)
            .lines()
            .filter_map(|line| serde_json::from_str(line).ok())
            .collect())
    };
    let executable = |message: &serde_json::Value, kind: &str, name: &str| -> Option<PathBuf> {
        (message["reason"] == "compiler-artifact"
            && message["target"]["name"] == name
            && message["target"]["kind"]
                .as_array()
                .is_some_and(|kinds| kinds.iter().any(|k| k == kind)))
        .then(|| message["executable"].as_str().map(PathBuf::from))
        .flatten()
    };

    let mut args = vec!["test", "-p", "visibility-tests", "--no-run"];
    for test in tests {
        args.extend(["--test", test.binary.as_str()]);
    }
    let messages = static_build(&args)?;
    let mut found = BTreeMap::new();
    for test in tests {
        let exe = messages
            .iter()
            .find_map(|m| executable(m, "test", &test.binary))
            .with_context(|| format!("cargo built no test executable {}", test.binary))?;
        found.insert(
            test.binary.clone(),
            strip_copy(&exe, &dirs.bin().join(&test.binary))?,
        );
    }
    let messages = static_build(&["build", "-p", "visibility-userspace", "--bin", "visibility"])?;
    let exe = messages
        .iter()
        .find_map(|m| executable(m, "bin", "visibility"))
        .context("cargo built no visibility executable")?;
    let visibility = strip_copy(&exe, &dirs.bin().join("visibility"))?;
    for path in found.values().chain([&visibility]) {
        ensure!(
            is_static(path),
            "{} is not statically linked",
            path.display()
        );
    }
    Ok(Binaries {
        tests: found,
        visibility,
    })
}

/// Copies `from` to `to` without debug info (symbols stay, for backtraces).
fn strip_copy(from: &Path, to: &Path) -> anyhow::Result<PathBuf> {
    output(
        Command::new("strip")
            .arg("--strip-debug")
            .arg("-o")
            .arg(to)
            .arg(from),
    )?;
    Ok(to.to_owned())
}

// ---------------------------------------------------------------------------------------
// Kernels from Debian's archive, through a private apt configuration
// ---------------------------------------------------------------------------------------

/// An unpacked kernel package.
struct Kernel {
    /// `uname -r`, e.g. `6.1.0-50-cloud-amd64`.
    release: String,
    vmlinuz: PathBuf,
    /// `lib/modules/<release>`, with a `modules.dep` made by `depmod`.
    modules: PathBuf,
}

/// apt with its own sources, lists and caches under one directory: the host's sources,
/// lists and package state stay untouched. Updated at most once per run.
struct PrivateApt {
    dir: PathBuf,
    updated: bool,
}

impl PrivateApt {
    fn new(dir: PathBuf) -> Self {
        Self {
            dir,
            updated: false,
        }
    }

    fn options(&self) -> Vec<String> {
        let d = |p: &str| self.dir.join(p).display().to_string();
        vec![
            "-o".into(),
            format!("Dir::Etc::SourceList={}", d("sources.list")),
            "-o".into(),
            format!("Dir::Etc::SourceParts={}", d("sources.list.d")),
            "-o".into(),
            format!("Dir::State::Lists={}", d("lists")),
            "-o".into(),
            format!("Dir::Cache={}", d("cache")),
            "-o".into(),
            format!("Dir::Cache::Archives={}", d("cache/archives")),
            "-o".into(),
            "Dir::Cache::pkgcache=".into(),
            "-o".into(),
            "Dir::Cache::srcpkgcache=".into(),
            // Downloads land in our own directories: no need to drop to the _apt user.
            "-o".into(),
            "APT::Sandbox::User=root".into(),
            "-o".into(),
            "Debug::NoLocking=true".into(),
            "-q".into(),
        ]
    }

    fn command(&self, program: &str) -> Command {
        let mut cmd = Command::new(program);
        cmd.args(self.options());
        cmd
    }

    /// Writes the private sources (Debian's archive as the host's sources name it, plus
    /// bookworm-backports) and runs `apt-get update` with them.
    fn update(&mut self) -> anyhow::Result<()> {
        if self.updated {
            return Ok(());
        }
        for sub in ["sources.list.d", "lists/partial", "cache/archives/partial"] {
            fs::create_dir_all(self.dir.join(sub))?;
        }
        let mirrors = host_debian_mirrors()?;
        let keyring = Path::new("/usr/share/keyrings/debian-archive-keyring.gpg");
        let options = if keyring.exists() {
            format!("[signed-by={}] ", keyring.display())
        } else {
            String::new()
        };
        let mut sources = String::from(
            "# Written by cargo xtask vm-test: kernel packages only, never installed.\n",
        );
        for suite in ["bookworm", "bookworm-updates", "bookworm-backports"] {
            writeln!(sources, "deb {options}{} {suite} main", mirrors.archive)?;
        }
        if let Some(security) = &mirrors.security {
            writeln!(sources, "deb {options}{security} bookworm-security main")?;
        }
        fs::write(self.dir.join("sources.list"), &sources)?;
        println!(
            "vm-test: private apt sources ({}), from the host's mirror {}{}:",
            self.dir.join("sources.list").display(),
            mirrors.archive,
            if mirrors.host_has_backports {
                " (the host lists bookworm-backports too)"
            } else {
                " (the host's sources have no bookworm-backports)"
            }
        );
        print!("{sources}");
        run(self.command("apt-get").arg("update"))?;
        self.updated = true;
        Ok(())
    }

    /// The real package behind `linux-image-cloud-amd64` of `suite`.
    fn resolve_kernel_package(&self, suite: &str) -> anyhow::Result<String> {
        let mut cmd = self.command("apt-cache");
        cmd.arg("depends");
        // bookworm-backports has a lower priority: the plain name is bookworm's.
        if suite.ends_with("-backports") {
            cmd.arg(format!("linux-image-cloud-amd64/{suite}"));
        } else {
            cmd.arg("linux-image-cloud-amd64");
        }
        let out = output(&mut cmd)?;
        out.lines()
            .filter_map(|line| line.trim().strip_prefix("Depends:"))
            .map(str::trim)
            .find(|name| name.starts_with("linux-image-"))
            .map(str::to_owned)
            .with_context(|| format!("{}: no linux-image dependency in:\n{out}", display(&cmd)))
    }
}

struct Mirrors {
    /// Debian's archive (the URI of the host's `bookworm` entry).
    archive: String,
    security: Option<String>,
    host_has_backports: bool,
}

/// One `deb` entry of the host's apt sources.
struct SourceEntry {
    uri: String,
    suites: Vec<String>,
}

/// Reads the host's apt sources (one-line `.list` and deb822 `.sources`) to find the
/// Debian mirror this machine uses.
fn host_debian_mirrors() -> anyhow::Result<Mirrors> {
    let mut files = vec![PathBuf::from("/etc/apt/sources.list")];
    if let Ok(entries) = fs::read_dir("/etc/apt/sources.list.d") {
        let mut parts: Vec<PathBuf> = entries.filter_map(Result::ok).map(|e| e.path()).collect();
        parts.sort();
        files.extend(parts);
    }
    let mut entries = Vec::new();
    for file in &files {
        let Ok(text) = fs::read_to_string(file) else {
            continue;
        };
        match file.extension().and_then(|e| e.to_str()) {
            Some("sources") => entries.extend(parse_deb822(&text)),
            Some("list") => entries.extend(parse_one_line(&text)),
            _ => {}
        }
    }
    let with_suite = |suite: &str| {
        entries
            .iter()
            .find(|e| e.suites.iter().any(|s| s == suite))
            .map(|e| e.uri.trim_end_matches('/').to_owned())
    };
    let archive = with_suite("bookworm")
        .or_else(|| {
            entries
                .iter()
                .map(|e| e.uri.trim_end_matches('/'))
                .find(|uri| uri.ends_with("/debian"))
                .map(str::to_owned)
        })
        .with_context(|| {
            format!(
                "no Debian archive in the host's apt sources ({}): vm-test takes its mirror from there",
                files
                    .iter()
                    .map(|f| f.display().to_string())
                    .collect::<Vec<_>>()
                    .join(", ")
            )
        })?;
    let security = with_suite("bookworm-security").or_else(|| {
        entries
            .iter()
            .map(|e| e.uri.trim_end_matches('/'))
            .find(|uri| uri.ends_with("/debian-security"))
            .map(str::to_owned)
    });
    Ok(Mirrors {
        archive,
        security,
        host_has_backports: with_suite("bookworm-backports").is_some(),
    })
}

fn parse_one_line(text: &str) -> Vec<SourceEntry> {
    text.lines()
        .filter_map(|line| {
            let line = line.split('#').next()?.trim();
            let rest = line.strip_prefix("deb ")?.trim_start();
            // Options in brackets come first.
            let rest = match rest.strip_prefix('[') {
                Some(options) => options.split_once(']')?.1.trim_start(),
                None => rest,
            };
            let mut words = rest.split_whitespace();
            let uri = words.next()?.to_owned();
            let suite = words.next()?.to_owned();
            Some(SourceEntry {
                uri,
                suites: vec![suite],
            })
        })
        .collect()
}

fn parse_deb822(text: &str) -> Vec<SourceEntry> {
    let mut entries = Vec::new();
    for stanza in text.split("\n\n") {
        let mut fields: BTreeMap<String, String> = BTreeMap::new();
        let mut last: Option<String> = None;
        for line in stanza.lines() {
            if line.trim_start().starts_with('#') || line.trim().is_empty() {
                continue;
            }
            if line.starts_with([' ', '\t']) {
                // A continuation line (for example an inline Signed-By key).
                if let Some(key) = &last {
                    fields.entry(key.clone()).or_default().push_str(line);
                }
                continue;
            }
            if let Some((key, value)) = line.split_once(':') {
                let key = key.trim().to_ascii_lowercase();
                fields.insert(key.clone(), value.trim().to_owned());
                last = Some(key);
            }
        }
        let field = |k: &str| fields.get(k).map(String::as_str).unwrap_or_default();
        if !field("types").split_whitespace().any(|t| t == "deb")
            || field("enabled").eq_ignore_ascii_case("no")
        {
            continue;
        }
        let suites: Vec<String> = field("suites")
            .split_whitespace()
            .map(str::to_owned)
            .collect();
        for uri in field("uris").split_whitespace() {
            entries.push(SourceEntry {
                uri: uri.to_owned(),
                suites: suites.clone(),
            });
        }
    }
    entries
}

/// Makes sure the kernel of `spec` is unpacked under `cache` and returns it. A second run
/// reuses it without asking apt, unless `refresh`.
fn ensure_kernel(
    spec: &KernelSpec,
    apt: &mut PrivateApt,
    cache: &Path,
    refresh: bool,
) -> anyhow::Result<Kernel> {
    let chosen = cache.join(format!("{}.package", spec.name));
    if !refresh
        && let Ok(package) = fs::read_to_string(&chosen)
        && let Ok(kernel) = unpacked_kernel(&cache.join(package.trim()))
    {
        println!(
            "vm-test: kernel {}: {} (cached; --refresh looks for a newer one)",
            spec.name,
            package.trim()
        );
        return Ok(kernel);
    }
    apt.update()?;
    let package = apt.resolve_kernel_package(spec.suite)?;
    println!(
        "vm-test: kernel {}: {package} ({}, linux-image-cloud-amd64 of {})",
        spec.name, spec.what, spec.suite
    );
    let tree = cache.join(&package);
    if unpacked_kernel(&tree).is_err() {
        let debs = cache.join("debs");
        fs::create_dir_all(&debs)?;
        run(apt
            .command("apt-get")
            .arg("download")
            .arg(&package)
            .current_dir(&debs))?;
        let deb = fs::read_dir(&debs)?
            .filter_map(Result::ok)
            .map(|e| e.path())
            .find(|p| {
                p.file_name()
                    .and_then(|n| n.to_str())
                    .is_some_and(|n| n.starts_with(&format!("{package}_")) && n.ends_with(".deb"))
            })
            .with_context(|| format!("apt-get download left no {package}_*.deb"))?;
        let partial = cache.join(format!("{package}.partial"));
        let _ = fs::remove_dir_all(&partial);
        run(Command::new("dpkg-deb").arg("-x").arg(&deb).arg(&partial))?;
        // The package ships no modules.dep (its postinst runs depmod): make one.
        let release = module_release(&partial)?;
        run(Command::new("depmod").arg("-b").arg(&partial).arg(&release))?;
        let _ = fs::remove_dir_all(&tree);
        fs::rename(&partial, &tree)?;
        fs::write(tree.join(".vm-test-complete"), &package)?;
        fs::remove_file(&deb)?;
    }
    let previous = fs::read_to_string(&chosen).unwrap_or_default();
    fs::write(&chosen, &package)?;
    // A refresh that found a newer kernel replaces the older one.
    let previous = previous.trim();
    if !previous.is_empty()
        && previous != package
        && !previous.contains('/')
        && KERNELS.iter().all(|k| {
            k.name == spec.name
                || fs::read_to_string(cache.join(format!("{}.package", k.name)))
                    .map_or(true, |p| p.trim() != previous)
        })
    {
        let _ = fs::remove_dir_all(cache.join(previous));
    }
    unpacked_kernel(&tree)
}

/// The one `lib/modules/<release>` directory of an unpacked kernel package.
fn module_release(tree: &Path) -> anyhow::Result<String> {
    let dir = modules_root(tree)?;
    let mut releases: Vec<String> = fs::read_dir(&dir)?
        .filter_map(Result::ok)
        .filter_map(|e| e.file_name().into_string().ok())
        .collect();
    ensure!(
        releases.len() == 1,
        "expected one kernel in {}, found {releases:?}",
        dir.display()
    );
    Ok(releases.remove(0))
}

fn modules_root(tree: &Path) -> anyhow::Result<PathBuf> {
    ["lib/modules", "usr/lib/modules"]
        .iter()
        .map(|p| tree.join(p))
        .find(|p| p.is_dir())
        .with_context(|| format!("no lib/modules in {}", tree.display()))
}

fn unpacked_kernel(tree: &Path) -> anyhow::Result<Kernel> {
    ensure!(
        tree.join(".vm-test-complete").exists(),
        "{} is not a complete unpacked kernel",
        tree.display()
    );
    let release = module_release(tree)?;
    let kernel = Kernel {
        vmlinuz: tree.join("boot").join(format!("vmlinuz-{release}")),
        modules: modules_root(tree)?.join(&release),
        release,
    };
    ensure!(
        kernel.vmlinuz.is_file(),
        "{} is missing",
        kernel.vmlinuz.display()
    );
    ensure!(
        kernel.modules.join("modules.dep").is_file(),
        "no modules.dep in {}",
        kernel.modules.display()
    );
    Ok(kernel)
}

/// The attach mode the daemon picks on a kernel (as `AttachMode::current` does): TCX
/// from Linux 6.6 on, clsact before.
fn expected_attach_mode(release: &str) -> &'static str {
    let mut numbers = release
        .split(|c: char| !c.is_ascii_digit())
        .map(|n| n.parse::<u32>().unwrap_or(0));
    let major = numbers.next().unwrap_or(0);
    let minor = numbers.next().unwrap_or(0);
    if (major, minor) >= (6, 6) {
        "tcx"
    } else {
        "clsact"
    }
}

// ---------------------------------------------------------------------------------------
// Initramfs
// ---------------------------------------------------------------------------------------

/// A cpio "newc" archive, built in memory.
#[derive(Default)]
struct Cpio {
    entries: BTreeMap<String, CpioEntry>,
}

enum CpioEntry {
    Dir,
    File { data: Vec<u8>, mode: u32 },
    Symlink(String),
}

impl Cpio {
    fn add_parents(&mut self, path: &str) {
        let mut parent = Path::new(path).parent();
        while let Some(dir) = parent {
            let dir_str = dir.to_string_lossy();
            if dir_str.is_empty() {
                break;
            }
            self.entries
                .entry(dir_str.into_owned())
                .or_insert(CpioEntry::Dir);
            parent = dir.parent();
        }
    }

    fn key(path: &str) -> String {
        path.trim_start_matches('/').to_owned()
    }

    fn dir(&mut self, path: &str) {
        let key = Self::key(path);
        self.add_parents(&key);
        self.entries.insert(key, CpioEntry::Dir);
    }

    fn file(&mut self, path: &str, data: Vec<u8>, mode: u32) {
        let key = Self::key(path);
        self.add_parents(&key);
        self.entries.insert(key, CpioEntry::File { data, mode });
    }

    fn host_file(&mut self, path: &str, from: &Path) -> anyhow::Result<()> {
        let data = fs::read(from).with_context(|| format!("reading {}", from.display()))?;
        let mode = fs::metadata(from)?.permissions().mode() & 0o7777;
        self.file(path, data, mode);
        Ok(())
    }

    fn symlink(&mut self, path: &str, target: &str) {
        let key = Self::key(path);
        self.add_parents(&key);
        self.entries
            .insert(key, CpioEntry::Symlink(target.to_owned()));
    }

    fn contains(&self, path: &str) -> bool {
        self.entries.contains_key(&Self::key(path))
    }

    /// The archive; parents sort before their children, as the kernel needs.
    fn write(&self, out: &mut impl std::io::Write) -> std::io::Result<()> {
        fn header(
            out: &mut impl std::io::Write,
            ino: u32,
            mode: u32,
            nlink: u32,
            name: &str,
            size: usize,
        ) -> std::io::Result<()> {
            let name_len = name.len() + 1;
            write!(
                out,
                "070701{ino:08x}{mode:08x}{:08x}{:08x}{nlink:08x}{:08x}{size:08x}{:08x}{:08x}{:08x}{:08x}{name_len:08x}{:08x}",
                0, 0, 0, 0, 0, 0, 0, 0
            )?;
            out.write_all(name.as_bytes())?;
            out.write_all(&[0])?;
            pad(out, 110 + name_len)
        }
        fn pad(out: &mut impl std::io::Write, len: usize) -> std::io::Result<()> {
            out.write_all(&[0u8; 3][..(4 - len % 4) % 4])
        }
        for (ino, (name, entry)) in (1u32..).zip(&self.entries) {
            match entry {
                CpioEntry::Dir => header(out, ino, 0o040755, 2, name, 0)?,
                CpioEntry::File { data, mode } => {
                    header(out, ino, 0o100000 | mode, 1, name, data.len())?;
                    out.write_all(data)?;
                    pad(out, data.len())?;
                }
                CpioEntry::Symlink(target) => {
                    header(out, ino, 0o120777, 1, name, target.len())?;
                    out.write_all(target.as_bytes())?;
                    pad(out, target.len())?;
                }
            }
        }
        header(out, 0, 0, 1, "TRAILER!!!", 0)
    }
}

/// The shared libraries (and the dynamic loader) that `ldd` lists for a program.
fn shared_libraries(program: &Path) -> anyhow::Result<Vec<PathBuf>> {
    let out = output(Command::new("ldd").arg(program))?;
    let mut libs = Vec::new();
    for line in out.lines() {
        let line = line.trim();
        let path = match line.split_once("=>") {
            Some((_, rest)) => rest.trim(),
            None => line,
        };
        let path = path.split(" (").next().unwrap_or_default().trim();
        if path.starts_with('/') {
            libs.push(PathBuf::from(path));
        } else if line.contains("not found") {
            bail!("{}: {line}", program.display());
        }
    }
    Ok(libs)
}

/// The module files to load, dependencies first: (name, path under the modules dir).
fn module_load_order(kernel: &Kernel) -> anyhow::Result<Vec<(String, PathBuf)>> {
    let stem = |path: &str| -> String {
        let file = path.rsplit('/').next().unwrap_or(path);
        file.split(".ko").next().unwrap_or(file).to_owned()
    };
    let builtin: BTreeSet<String> = fs::read_to_string(kernel.modules.join("modules.builtin"))
        .unwrap_or_default()
        .lines()
        .map(stem)
        .collect();
    let dep_text = fs::read_to_string(kernel.modules.join("modules.dep"))?;
    let mut deps: BTreeMap<String, (String, Vec<String>)> = BTreeMap::new();
    for line in dep_text.lines() {
        let Some((path, rest)) = line.split_once(':') else {
            continue;
        };
        deps.insert(
            stem(path),
            (path.to_owned(), rest.split_whitespace().map(stem).collect()),
        );
    }
    fn visit(
        name: &str,
        deps: &BTreeMap<String, (String, Vec<String>)>,
        done: &mut BTreeSet<String>,
        order: &mut Vec<(String, PathBuf)>,
    ) -> anyhow::Result<()> {
        if !done.insert(name.to_owned()) {
            return Ok(());
        }
        let (path, needs) = deps
            .get(name)
            .with_context(|| format!("module {name} is not in modules.dep"))?;
        for need in needs {
            visit(need, deps, done, order)?;
        }
        order.push((name.to_owned(), PathBuf::from(path)));
        Ok(())
    }
    let mut done = BTreeSet::new();
    let mut order = Vec::new();
    for (module, need) in MODULES {
        if builtin.contains(*module) {
            continue;
        }
        if !deps.contains_key(*module) {
            ensure!(
                *need == Need::Optional,
                "kernel {}: module {module} is neither built in nor in modules.dep",
                kernel.release
            );
            continue;
        }
        visit(module, &deps, &mut done, &mut order)?;
    }
    Ok(order)
}

/// A module file's contents, decompressed (busybox insmod loads plain `.ko` files).
fn module_bytes(path: &Path) -> anyhow::Result<Vec<u8>> {
    let name = path.to_string_lossy();
    let decompressor = if name.ends_with(".ko.xz") {
        Some("xz")
    } else if name.ends_with(".ko.gz") {
        Some("gzip")
    } else if name.ends_with(".ko.zst") {
        Some("zstd")
    } else {
        None
    };
    match decompressor {
        None => fs::read(path).with_context(|| format!("reading {}", path.display())),
        Some(tool) => {
            let out = Command::new(tool)
                .arg("-dc")
                .arg(path)
                .output()
                .with_context(|| format!("starting {tool} -dc {}", path.display()))?;
            ensure!(
                out.status.success(),
                "{tool} -dc {} failed: {}",
                path.display(),
                String::from_utf8_lossy(&out.stderr)
            );
            Ok(out.stdout)
        }
    }
}

fn build_initramfs(
    kernel: &Kernel,
    binaries: &Binaries,
    tests: &[TestSelection],
    out: &Path,
) -> anyhow::Result<()> {
    let started = Instant::now();
    let mut cpio = Cpio::default();
    for dir in [
        "/proc",
        "/sys",
        "/dev",
        "/tmp",
        "/run",
        "/root",
        "/etc",
        "/bin",
        "/sbin",
        "/usr/bin",
        "/usr/sbin",
        "/tests",
    ] {
        cpio.dir(dir);
    }
    // iproute2 keeps named network namespaces under /var/run/netns.
    cpio.symlink("/var/run", "../run");
    cpio.file(
        "/etc/passwd",
        b"root:x:0:0:root:/root:/bin/sh\n".to_vec(),
        0o644,
    );
    cpio.file("/etc/group", b"root:x:0:\n".to_vec(), 0o644);
    cpio.file(
        "/etc/hosts",
        b"127.0.0.1 localhost\n::1 localhost\n".to_vec(),
        0o644,
    );

    // busybox for /init; only the applets /init uses get links, so the test fixtures'
    // `ip`, `ping`, `nsenter` and `sysctl` are the real ones.
    cpio.host_file("/bin/busybox", &which("busybox").context("busybox")?)?;
    for applet in [
        "sh", "mount", "mkdir", "insmod", "poweroff", "cat", "echo", "sleep", "uname", "ls",
        "dmesg", "grep",
    ] {
        cpio.symlink(&format!("/bin/{applet}"), "busybox");
    }

    let mut libraries = BTreeSet::new();
    for (guest, program) in TOOLS {
        let host = which(program).with_context(|| format!("{program} is not installed"))?;
        cpio.host_file(guest, &host)?;
        libraries.extend(shared_libraries(&host)?);
    }
    cpio.symlink("/sbin/ip", "../usr/sbin/ip");
    for name in XTABLES_NAMES {
        cpio.symlink(&format!("/usr/sbin/{name}"), "xtables-nft-multi");
    }
    for library in &libraries {
        let guest = library.to_string_lossy();
        if !cpio.contains(&guest) {
            cpio.host_file(&guest, library)?;
        }
    }

    let modules = module_load_order(kernel)?;
    let mut load_list = String::new();
    for (name, path) in &modules {
        let data = module_bytes(&kernel.modules.join(path))?;
        cpio.file(&format!("/lib/modules/{name}.ko"), data, 0o644);
        writeln!(load_list, "{name}")?;
    }
    cpio.file("/etc/vm-test/modules", load_list.into_bytes(), 0o644);

    cpio.host_file("/usr/bin/visibility", &binaries.visibility)?;
    for test in tests {
        let exe = binaries
            .tests
            .get(&test.binary)
            .with_context(|| format!("no binary for {}", test.binary))?;
        cpio.host_file(&format!("/tests/{}", test.binary), exe)?;
    }
    cpio.file("/init", init_script(tests).into_bytes(), 0o755);

    // cpio | gzip > out
    let file = fs::File::create(out).with_context(|| format!("creating {}", out.display()))?;
    let mut gzip = Command::new("gzip")
        .args(["-c", "-n", "-6"])
        .stdin(Stdio::piped())
        .stdout(file)
        .spawn()
        .context("starting gzip")?;
    let mut stdin = gzip.stdin.take().context("gzip's stdin")?;
    let mut archive = Vec::new();
    cpio.write(&mut archive)?;
    let size = archive.len();
    let writer = std::thread::spawn(move || stdin.write_all(&archive));
    let status = gzip.wait()?;
    writer
        .join()
        .map_err(|_| anyhow::anyhow!("writing to gzip panicked"))?
        .context("writing to gzip")?;
    ensure!(status.success(), "gzip failed: {status}");
    println!(
        "vm-test: initramfs for {}: {} modules, {} MiB ({} MiB gzipped) in {:.1}s",
        kernel.release,
        modules.len(),
        size >> 20,
        fs::metadata(out)?.len() >> 20,
        started.elapsed().as_secs_f64()
    );
    Ok(())
}

/// The guest's /init: mounts, modules, loopback, the tests, an exit marker, power off.
fn init_script(tests: &[TestSelection]) -> String {
    let mut runs = String::new();
    for test in tests {
        writeln!(runs, "run_tests {} {}", test.binary, test.filters.join(" "))
            .expect("writing to a String");
    }
    format!(
        r#"#!/bin/sh
# Generated by cargo xtask vm-test.
export PATH=/usr/sbin:/usr/bin:/sbin:/bin HOME=/root
mount -t proc proc /proc
mount -t sysfs sysfs /sys
mount -t devtmpfs devtmpfs /dev
mount -t tmpfs tmpfs /tmp
mount -t tmpfs tmpfs /run
mount -t bpf bpf /sys/fs/bpf
mount -t tracefs tracefs /sys/kernel/tracing 2>/dev/null
echo
echo "{MARK} guest up: Linux $(uname -r), $(grep -c ^processor /proc/cpuinfo) CPUs"
for m in $(cat /etc/vm-test/modules); do
    insmod /lib/modules/$m.ko || echo "{MARK} insmod $m failed"
done
/usr/sbin/ip link set lo up
ulimit -l unlimited
export VISIBILITY_BIN=/usr/bin/visibility RUST_BACKTRACE=1 VISIBILITY_TEST_TIME_SCALE={GUEST_TIME_SCALE}
status=0
run_tests() {{
    name=$1
    shift
    echo "{MARK} begin $name"
    # One test at a time: under TCG, parallel labs contend for the one vCPU and the
    # RTNL lock and run into their timeouts (a daemon must attach within 10 s).
    /tests/$name --test-threads=1 --show-output "$@"
    code=$?
    echo "{MARK} end $name exit=$code"
    [ $code -eq 0 ] || status=1
}}
{runs}echo "{MARK} exit code=$status"
# Let the console drain before the power goes.
sleep 1
poweroff -f
"#
    )
}

// ---------------------------------------------------------------------------------------
// QEMU
// ---------------------------------------------------------------------------------------

/// A QEMU process that is killed when dropped, so that no error path leaves one behind.
struct Qemu {
    child: Child,
}

impl Drop for Qemu {
    fn drop(&mut self) {
        if matches!(self.child.try_wait(), Ok(None)) {
            let _ = self.child.kill();
        }
        let _ = self.child.wait();
    }
}

/// What a boot showed.
#[derive(Default, Debug)]
struct Outcome {
    guest_up: bool,
    /// The exit code /init reported.
    exit_code: Option<i32>,
    timed_out: bool,
    /// Per test binary: (name, exit code, passed, failed, ignored, libtest result seen).
    binaries: Vec<BinaryResult>,
    skipped: u64,
    /// What the tests said they skipped on this kernel, and why.
    skip_notes: BTreeSet<String>,
    attach_modes: BTreeSet<String>,
    /// Lines that say what went wrong (failed tests, insmod failures, panics).
    problems: Vec<String>,
    qemu_status: Option<String>,
}

#[derive(Default, Debug)]
struct BinaryResult {
    name: String,
    exit: Option<i32>,
    passed: u64,
    failed: u64,
    ignored: u64,
    result_seen: bool,
}

impl Outcome {
    fn passed(&self) -> u64 {
        self.binaries.iter().map(|b| b.passed).sum::<u64>()
    }
    fn failed(&self) -> u64 {
        self.binaries.iter().map(|b| b.failed).sum()
    }
    fn ignored(&self) -> u64 {
        self.binaries.iter().map(|b| b.ignored).sum()
    }

    /// Reads one console line.
    fn observe(&mut self, line: &str) {
        let line = line.trim();
        // The firmware leaves its last line open, so the first marker may follow it.
        if let Some(rest) = line.find(MARK).map(|at| &line[at + MARK.len()..]) {
            let rest = rest.trim();
            if rest.starts_with("guest up") {
                self.guest_up = true;
            } else if let Some(name) = rest.strip_prefix("begin ") {
                self.binaries.push(BinaryResult {
                    name: name.trim().to_owned(),
                    ..BinaryResult::default()
                });
            } else if let Some(rest) = rest.strip_prefix("end ") {
                let code = rest
                    .rsplit_once("exit=")
                    .and_then(|(_, c)| c.trim().parse().ok());
                if let Some(binary) = self.binaries.last_mut() {
                    binary.exit = code;
                }
            } else if let Some(code) = rest.strip_prefix("exit code=") {
                self.exit_code = code.trim().parse().ok();
            } else if rest.starts_with("insmod") {
                self.problems.push(rest.to_owned());
            }
            return;
        }
        if let Some(result) = line.strip_prefix("test result:") {
            if let Some(binary) = self.binaries.last_mut() {
                binary.result_seen = true;
                let count = |what: &str| -> u64 {
                    result
                        .split(';')
                        .find_map(|part| {
                            let part = part.trim().trim_start_matches("ok.").trim();
                            let part = part.trim_start_matches("FAILED.").trim();
                            part.strip_suffix(what).and_then(|n| n.trim().parse().ok())
                        })
                        .unwrap_or(0)
                };
                binary.passed += count("passed");
                binary.failed += count("failed");
                binary.ignored += count("ignored");
            }
            return;
        }
        if line.starts_with(SKIP_MARK) {
            self.skipped += 1;
        }
        if line.starts_with(SKIP_MARK) || line.starts_with("skipping ") {
            self.skip_notes.insert(line.to_owned());
        }
        if (line.starts_with("test ") && line.ends_with("FAILED"))
            || line.contains("panicked at")
            || line.contains("Kernel panic")
        {
            self.problems.push(line.to_owned());
        }
        // The daemon's log: `datapath ready ... attach_mode="tcx"` and
        // `attached interface=... mode=clsact`.
        for key in ["attach_mode=", " mode="] {
            if let Some((_, rest)) = line.split_once(key) {
                let mode: String = rest
                    .trim_start_matches('"')
                    .chars()
                    .take_while(|c| c.is_ascii_alphanumeric())
                    .collect();
                if mode == "tcx" || mode == "clsact" {
                    self.attach_modes.insert(mode);
                }
            }
        }
    }
}

/// Removes ANSI escape sequences and carriage returns.
fn plain(line: &str) -> String {
    let mut out = String::with_capacity(line.len());
    let mut chars = line.chars().peekable();
    while let Some(c) = chars.next() {
        if c == '\u{1b}' {
            // CSI sequences (`ESC [ ... letter`) and two-character ones (`ESC c`).
            if chars.next() == Some('[') {
                for c in chars.by_ref() {
                    if c.is_ascii_alphabetic() {
                        break;
                    }
                }
            }
            continue;
        }
        if c != '\r' {
            out.push(c);
        }
    }
    out
}

fn boot(
    spec: &KernelSpec,
    kernel: &Kernel,
    initramfs: &Path,
    log_path: &Path,
    timeout: Duration,
) -> anyhow::Result<Outcome> {
    let mut cmd = Command::new("qemu-system-x86_64");
    // TCG, never KVM (this machine's KVM does not run stock kernels). `max` without:
    // - CX16: QEMU 7.2's TCG mishandles the `cmpxchg16b %gs:` of SLUB's per-CPU fast
    //   path, and 6.12 takes a double fault in kmem_cache_alloc within seconds; without
    //   CMPXCHG16B the kernel uses its other path;
    // - ERMS/FSRM: with them the kernel copies with `rep movsb`, which TCG runs a byte at
    //   a time (the tests run about 20% slower).
    cmd.args(["-accel", "tcg", "-cpu", "max,cx16=off,erms=off,fsrm=off"])
        .args(["-m", GUEST_MEMORY])
        .args(["-smp", GUEST_CPUS])
        .args(["-nographic", "-nodefaults", "-no-user-config"])
        .args(["-serial", "stdio", "-no-reboot"])
        .arg("-kernel")
        .arg(&kernel.vmlinuz)
        .arg("-initrd")
        .arg(initramfs)
        .args([
            "-append",
            "console=ttyS0 quiet panic=-1 oops=panic rdinit=/init",
        ])
        .stdin(Stdio::null())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped());
    // QEMU dies with xtask, even if xtask is killed outright (SIGINT from Ctrl-C reaches
    // it anyway: it is in the terminal's foreground process group).
    // SAFETY: prctl is async-signal-safe; nothing else runs between fork and exec.
    unsafe {
        cmd.pre_exec(|| {
            if libc::prctl(libc::PR_SET_PDEATHSIG, libc::SIGKILL) != 0 {
                return Err(std::io::Error::last_os_error());
            }
            Ok(())
        });
    }
    println!("$ {}", display(&cmd));
    let mut log =
        fs::File::create(log_path).with_context(|| format!("creating {}", log_path.display()))?;
    writeln!(log, "$ {}", display(&cmd))?;

    let started = Instant::now();
    let mut qemu = Qemu {
        child: cmd.spawn().context("starting qemu-system-x86_64")?,
    };
    let (tx, rx) = mpsc::channel::<String>();
    let forward = |stream: Box<dyn Read + Send>, prefix: &'static str| {
        let tx = tx.clone();
        std::thread::spawn(move || {
            let mut reader = BufReader::new(stream);
            let mut buf = Vec::new();
            while reader.read_until(b'\n', &mut buf).is_ok_and(|n| n > 0) {
                let line = plain(&String::from_utf8_lossy(&buf));
                let line = line.trim_end_matches('\n');
                if tx.send(format!("{prefix}{line}")).is_err() {
                    break;
                }
                buf.clear();
            }
        })
    };
    let stdout = qemu.child.stdout.take().context("qemu's stdout")?;
    let stderr = qemu.child.stderr.take().context("qemu's stderr")?;
    let readers = [
        forward(Box::new(stdout), ""),
        forward(Box::new(stderr), "qemu: "),
    ];
    drop(tx);

    let deadline = started + timeout;
    let mut outcome = Outcome::default();
    loop {
        let left = deadline.saturating_duration_since(Instant::now());
        match rx.recv_timeout(left) {
            Ok(line) => {
                writeln!(log, "{line}")?;
                println!("[{}] {line}", spec.name);
                outcome.observe(&line);
            }
            Err(mpsc::RecvTimeoutError::Timeout) => {
                outcome.timed_out = true;
                let note = format!(
                    "vm-test: no power-off after {}s: killing QEMU",
                    timeout.as_secs()
                );
                println!("[{}] {note}", spec.name);
                writeln!(log, "{note}")?;
                let _ = qemu.child.kill();
                break;
            }
            Err(mpsc::RecvTimeoutError::Disconnected) => break,
        }
    }
    let status = qemu.child.wait()?;
    // The readers end with the pipes (QEMU is gone either way).
    for reader in readers {
        let _ = reader.join();
    }
    for line in rx.try_iter() {
        writeln!(log, "{line}")?;
        outcome.observe(&line);
    }
    outcome.qemu_status = Some(status.to_string());
    writeln!(
        log,
        "vm-test: QEMU {status} after {:.1}s",
        started.elapsed().as_secs_f64()
    )?;
    Ok(outcome)
}

// ---------------------------------------------------------------------------------------
// Summary
// ---------------------------------------------------------------------------------------

struct KernelResult {
    spec_name: &'static str,
    release: String,
    expected_mode: &'static str,
    outcome: Outcome,
    seconds: f64,
    log: PathBuf,
}

impl KernelResult {
    /// Why this kernel failed; empty if it passed.
    fn failures(&self) -> Vec<String> {
        let o = &self.outcome;
        let mut why = Vec::new();
        if o.timed_out {
            why.push("timed out (QEMU killed)".to_owned());
        }
        if !o.guest_up {
            why.push("the guest never ran /init".to_owned());
        } else if o.exit_code.is_none() && !o.timed_out {
            why.push(format!(
                "no exit marker (QEMU {})",
                o.qemu_status.as_deref().unwrap_or("?")
            ));
        }
        if let Some(code) = o.exit_code
            && code != 0
        {
            why.push(format!("tests exited {code}"));
        }
        for binary in &o.binaries {
            if !binary.result_seen {
                why.push(format!(
                    "{} ended without a test result (exit {:?})",
                    binary.name, binary.exit
                ));
            } else if binary.passed + binary.failed == 0 {
                why.push(format!("{} ran no test", binary.name));
            }
        }
        if o.failed() > 0 {
            why.push(format!("{} tests failed", o.failed()));
        }
        let modes: Vec<&str> = o.attach_modes.iter().map(String::as_str).collect();
        if modes != [self.expected_mode] {
            why.push(format!(
                "attach mode seen: {:?}, expected {}",
                modes, self.expected_mode
            ));
        }
        why
    }
}

/// Prints the table and returns the kernels that failed.
fn print_summary(results: &[KernelResult], build_secs: f64, total_secs: f64) -> Vec<String> {
    let host = output(Command::new("uname").arg("-r")).unwrap_or_default();
    println!();
    println!("vm-test summary");
    println!(
        "  host kernel {}: tested by the normal `cargo test` (cargo xtask test runs it first), not here",
        host.trim()
    );
    println!("  static build: {build_secs:.0}s");
    println!(
        "  {:<6} {:<28} {:<8} {:>6} {:>6} {:>7} {:>8}  result",
        "kernel", "release", "attach", "passed", "failed", "skipped", "seconds"
    );
    let mut failed = Vec::new();
    for r in results {
        let o = &r.outcome;
        let failures = r.failures();
        let modes = if o.attach_modes.is_empty() {
            "none".to_owned()
        } else {
            o.attach_modes.iter().cloned().collect::<Vec<_>>().join("+")
        };
        println!(
            "  {:<6} {:<28} {:<8} {:>6} {:>6} {:>7} {:>8.1}  {}",
            r.spec_name,
            r.release,
            modes,
            o.passed().saturating_sub(o.skipped),
            o.failed(),
            o.ignored() + o.skipped,
            r.seconds,
            if failures.is_empty() { "ok" } else { "FAILED" }
        );
        let per_binary: Vec<String> = o
            .binaries
            .iter()
            .map(|b| format!("{} {}/{}", b.name, b.passed, b.passed + b.failed))
            .collect();
        println!("         tests passed: {}", per_binary.join(", "));
        for note in &o.skip_notes {
            println!("         {note}");
        }
        if !failures.is_empty() {
            failed.push(r.spec_name.to_owned());
            for why in failures {
                println!("         - {why}");
            }
            for problem in o.problems.iter().take(20) {
                println!("         > {problem}");
            }
            println!("         console log: {}", r.log.display());
        }
    }
    println!("  total: {total_secs:.0}s");
    failed
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn one_line_sources() {
        let entries = parse_one_line(
            "# comment\ndeb [signed-by=/k.gpg arch=amd64] http://m.example/debian bookworm main\n\
             deb-src http://m.example/debian bookworm main\n\
             deb http://s.example/debian-security bookworm-security main # trailing\n",
        );
        let got: Vec<(&str, &str)> = entries
            .iter()
            .map(|e| (e.uri.as_str(), e.suites[0].as_str()))
            .collect();
        assert_eq!(
            got,
            [
                ("http://m.example/debian", "bookworm"),
                ("http://s.example/debian-security", "bookworm-security")
            ]
        );
    }

    #[test]
    fn deb822_sources() {
        let entries = parse_deb822(
            "Types: deb\n# http://old.example/archive\nURIs: http://m.example/debian\n\
             Suites: bookworm bookworm-updates\nComponents: main\n\n\
             Types: deb\nURIs: http://x.example/\nSuites: y\nEnabled: no\n\n\
             Types: deb-src\nURIs: http://src.example/\nSuites: bookworm\n",
        );
        assert_eq!(entries.len(), 1);
        assert_eq!(entries[0].uri, "http://m.example/debian");
        assert_eq!(entries[0].suites, ["bookworm", "bookworm-updates"]);
    }

    #[test]
    fn attach_mode_by_release() {
        assert_eq!(expected_attach_mode("6.1.0-50-cloud-amd64"), "clsact");
        assert_eq!(expected_attach_mode("6.12.95+deb12-cloud-amd64"), "tcx");
        assert_eq!(expected_attach_mode("6.6.0"), "tcx");
        assert_eq!(expected_attach_mode("5.15.0"), "clsact");
    }

    #[test]
    fn cpio_is_newc_with_parents_first() {
        let mut cpio = Cpio::default();
        cpio.file("/a/b/c", b"xyz".to_vec(), 0o644);
        cpio.symlink("/a/l", "b");
        let mut out = Vec::new();
        cpio.write(&mut out).unwrap();
        assert_eq!(out.len() % 4, 0);
        let text = String::from_utf8_lossy(&out);
        let a = text.find("a\0").unwrap();
        let ab = text.find("a/b\0").unwrap();
        let abc = text.find("a/b/c\0").unwrap();
        assert!(a < ab && ab < abc);
        assert!(text.starts_with("070701"));
        assert!(text.contains("TRAILER!!!\0"));
    }

    #[test]
    fn console_lines_are_counted() {
        let mut o = Outcome::default();
        for line in [
            "Booting from ROM..\u{1b}c\u{1b}[?7lvm-test: guest up: Linux 6.1.0, 2 CPUs",
            "vm-test: begin daemon",
            "2026-11-25T15:39:38Z  INFO visibility::daemon: datapath ready pin_dir=/x origin=Loaded attach_mode=\"clsact\"",
            "INFO attached interface=veth0 ifindex=3 program=pod_ingress mode=clsact",
            "SKIP: some_test: needs Linux 6.6",
            "test result: FAILED. 2 passed; 1 failed; 3 ignored; 0 measured; 0 filtered out; finished in 1.00s",
            "vm-test: end daemon exit=101",
            "vm-test: exit code=1",
        ] {
            o.observe(&plain(line));
        }
        assert!(o.guest_up);
        assert_eq!(
            (o.passed(), o.failed(), o.ignored(), o.skipped),
            (2, 1, 3, 1)
        );
        assert_eq!(o.exit_code, Some(1));
        assert_eq!(o.binaries[0].exit, Some(101));
        assert_eq!(o.attach_modes.iter().collect::<Vec<_>>(), ["clsact"]);
    }

    #[test]
    fn ansi_is_stripped() {
        assert_eq!(plain("\u{1b}[2mmode\u{1b}[0m=tcx\r"), "mode=tcx");
        assert_eq!(plain("\u{1b}cvm-test: guest up"), "vm-test: guest up");
    }
}
