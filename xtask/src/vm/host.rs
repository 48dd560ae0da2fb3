//! The host programs vm-test uses: finding them, and installing the missing ones.

use std::{
    path::{Path, PathBuf},
    process::Command,
};

use anyhow::ensure;

use crate::{run::is_root, setup::install_debian_packages};

/// Userspace tools in the guest: (guest path, host program), with their shared
/// libraries. The test fixtures find them through `PATH`.
pub(super) const TOOLS: &[(&str, &str)] = &[
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

/// Finds a program in `PATH`, or in the sbin directories a non-root `PATH` lacks.
pub(super) fn which(program: &str) -> Option<PathBuf> {
    let path = std::env::var_os("PATH").unwrap_or_default();
    std::env::split_paths(&path)
        .chain(["/usr/sbin", "/sbin", "/usr/bin", "/bin"].map(PathBuf::from))
        .map(|dir| dir.join(program))
        .find(|p| p.is_file())
}

/// Host programs vm-test uses, and the Debian packages they come from.
pub(super) const HOST_TOOLS: &[(&str, &str)] = &[
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
pub(super) fn check_host_tools() -> anyhow::Result<()> {
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
    ensure!(
        is_root(),
        "vm-test needs the Debian packages {}: run `cargo xtask setup` as root, or \
         `sudo apt-get install -y {}`",
        missing.join(", "),
        missing.join(" ")
    );
    println!("vm-test: installing {}", missing.join(" "));
    install_debian_packages(&missing)?;
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
pub(super) fn is_static(path: &Path) -> bool {
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
