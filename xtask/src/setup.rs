//! `cargo xtask setup`: makes a fresh machine ready, and on a ready one only checks.

use std::{env, fs, path::PathBuf, process::Command, time::Instant};

use anyhow::{Context as _, bail};

use crate::run::{is_root, output, run, succeeds};

/// Debian packages the tests, the demo and the benchmarks use.
const DEBIAN_PACKAGES: &[(&str, &str)] = &[
    ("iproute2", "ip and tc for the network-namespace labs"),
    ("nftables", "the gateway's firewall and flow accounting"),
    ("conntrack", "reads the gateway's flow log"),
    ("iputils-ping", "ICMP in the labs"),
    ("iperf3", "throughput benchmarks"),
    (
        "linux-perf",
        "where the time goes, in the benchmarks' profiled runs",
    ),
    ("bpftool", "inspecting programs and links in tests"),
    (
        "prometheus",
        "promtool and the server, to check the metrics endpoint and the dashboard's queries",
    ),
    (
        "nfdump",
        "nfcapd and nfdump, the IPFIX collector of the export tests",
    ),
    ("qemu-system-x86", "VM kernel tests"),
    ("busybox-static", "the VM tests' initramfs"),
    (
        "iptables",
        "kube-proxy-style Service rules and the masquerade health check",
    ),
];

const NIGHTLY: &str = "nightly";

#[derive(clap::Args, Default)]
pub struct SetupArgs {
    /// Only the Rust side (rust-src, bpf-linker, cargo-machete): for image builds, which need no test tools.
    #[arg(long)]
    no_debian_packages: bool,
}

pub fn setup(args: &SetupArgs) -> anyhow::Result<()> {
    let started = Instant::now();
    rust_src()?;
    bpf_linker()?;
    cargo_machete()?;
    if !args.no_debian_packages {
        debian_packages()?;
    }
    println!("setup: ready in {:.1}s", started.elapsed().as_secs_f64());
    Ok(())
}

fn step(what: &str, state: &str) {
    println!("setup: {what}: {state}");
}

fn rust_src() -> anyhow::Result<()> {
    let installed = output(Command::new("rustup").args([
        "component",
        "list",
        "--installed",
        "--toolchain",
        NIGHTLY,
    ]))
    .unwrap_or_default();
    if installed.lines().any(|l| l.starts_with("rust-src")) {
        step("rust-src for the nightly toolchain", "present");
        return Ok(());
    }
    step("rust-src for the nightly toolchain", "installing");
    run(Command::new("rustup").args(["component", "add", "rust-src", "--toolchain", NIGHTLY]))
}

/// The nightly sysroot's libLLVM, which bpf-linker must link against so that it reads
/// the bitcode this nightly writes.
fn nightly_libllvm() -> anyhow::Result<PathBuf> {
    let sysroot =
        output(Command::new("rustc").args([&format!("+{NIGHTLY}"), "--print", "sysroot"]))?;
    let lib = PathBuf::from(sysroot.trim()).join("lib");
    let found = fs::read_dir(&lib)
        .with_context(|| format!("reading {}", lib.display()))?
        .filter_map(Result::ok)
        .map(|e| e.path())
        .find(|p| {
            p.file_name()
                .and_then(|n| n.to_str())
                .is_some_and(|n| n.starts_with("libLLVM.so."))
        });
    found.with_context(|| {
        format!(
            "no libLLVM.so.* in {}; is the nightly toolchain complete?",
            lib.display()
        )
    })
}

fn bpf_linker() -> anyhow::Result<()> {
    let libllvm = nightly_libllvm()?;
    let soname = libllvm
        .file_name()
        .context("libLLVM has a name")?
        .to_owned();
    // bpf-linker records the libLLVM it was built against; rebuild when the nightly moved.
    let stamp = cache_dir().join("bpf-linker.libllvm");
    let current = fs::read_to_string(&stamp).unwrap_or_default();
    if succeeds(Command::new("bpf-linker").arg("--version")) && current == libllvm.to_string_lossy()
    {
        step("bpf-linker", "present, built against the nightly's libLLVM");
        return Ok(());
    }
    step(
        "bpf-linker",
        "building against the nightly's libLLVM (about a minute)",
    );
    // LLVM_PREFIX must hold lib/libLLVM.so and a link named as the soname.
    let prefix = cache_dir().join("llvm");
    let lib = prefix.join("lib");
    fs::create_dir_all(&lib)?;
    for name in [std::ffi::OsStr::new("libLLVM.so"), soname.as_os_str()] {
        let link = lib.join(name);
        let _ = fs::remove_file(&link);
        std::os::unix::fs::symlink(&libllvm, &link)
            .with_context(|| format!("linking {}", link.display()))?;
    }
    run(Command::new("cargo")
        .args([
            "install",
            "bpf-linker",
            "--locked",
            "--force",
            "--no-default-features",
            "--features",
            "llvm-22",
        ])
        .env("LLVM_PREFIX", &prefix))?;
    fs::write(&stamp, libllvm.to_string_lossy().as_bytes())?;
    Ok(())
}

/// cargo-machete, which `cargo xtask test` runs to fail on unused dependencies.
fn cargo_machete() -> anyhow::Result<()> {
    if succeeds(Command::new("cargo-machete").arg("--version")) {
        step("cargo-machete", "present");
        return Ok(());
    }
    step("cargo-machete", "installing (about a minute)");
    run(Command::new("cargo").args(["install", "cargo-machete", "--locked"]))
}

fn cache_dir() -> PathBuf {
    let base = env::var_os("XDG_CACHE_HOME")
        .map(PathBuf::from)
        .or_else(|| env::var_os("HOME").map(|h| PathBuf::from(h).join(".cache")))
        .unwrap_or_else(|| PathBuf::from("/tmp"));
    let dir = base.join("visibility");
    let _ = fs::create_dir_all(&dir);
    dir
}

fn is_installed(package: &str) -> bool {
    output(Command::new("dpkg-query").args(["-W", "-f=${Status}", package]))
        .is_ok_and(|s| s.contains("install ok installed"))
}

fn debian_packages() -> anyhow::Result<()> {
    let missing: Vec<&str> = DEBIAN_PACKAGES
        .iter()
        .filter(|(package, _)| !is_installed(package))
        .map(|(package, _)| *package)
        .collect();
    if missing.is_empty() {
        step(
            "Debian packages",
            &format!("present ({})", DEBIAN_PACKAGES.len()),
        );
        return Ok(());
    }
    for (package, why) in DEBIAN_PACKAGES.iter().filter(|(p, _)| missing.contains(p)) {
        step("installing", &format!("{package}: {why}"));
    }
    if !is_root() {
        bail!(
            "installing Debian packages needs root: run `sudo apt-get install -y {}`",
            missing.join(" ")
        );
    }
    install_debian_packages(&missing)
}

/// `apt-get install`s the packages (as root), without their recommendations.
pub fn install_debian_packages(packages: &[&str]) -> anyhow::Result<()> {
    run(Command::new("apt-get").args(["update", "-qq"]))?;
    run(Command::new("apt-get")
        .args(["install", "-y", "-qq", "--no-install-recommends"])
        .args(packages)
        .env("DEBIAN_FRONTEND", "noninteractive"))
}
