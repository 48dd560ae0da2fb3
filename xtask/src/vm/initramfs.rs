//! A guest's initramfs: busybox, the tools and their libraries, the kernel's modules, the
//! test binaries, and the `/init` that runs them.

use std::{
    collections::{BTreeMap, BTreeSet},
    fmt::Write as _,
    fs,
    io::Write as _,
    path::{Path, PathBuf},
    process::{Command, Stdio},
    time::Instant,
};

use anyhow::{Context as _, bail, ensure};

use super::{
    binaries::Binaries,
    cpio::Cpio,
    host::{TOOLS, which},
    kernel::Kernel,
    spec::{GUEST_TIME_SCALE, MARK, TestSelection},
};
use crate::run::output;

/// Kernel modules the tests need: the datapath's (veth, clsact, cls_bpf) and the lab
/// gateway's (nftables with conntrack and named counters, the conntrack CLI's netlink),
/// plus the NAT and xtables glue that iptables-nft uses. Dependencies come from
/// `modules.dep`; built-in ones (`modules.builtin`) are skipped. Optional ones are parts
/// of another module on some kernels (nft_objref is in nf_tables on 6.12).
pub(super) const MODULES: &[(&str, Need)] = &[
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
pub(super) enum Need {
    Required,
    Optional,
}

/// iptables commands, all of them `xtables-nft-multi` by another name.
pub(super) const XTABLES_NAMES: &[&str] = &[
    "iptables",
    "iptables-save",
    "iptables-restore",
    "ip6tables",
    "ip6tables-save",
    "ip6tables-restore",
];

/// The shared libraries (and the dynamic loader) that `ldd` lists for a program.
pub(super) fn shared_libraries(program: &Path) -> anyhow::Result<Vec<PathBuf>> {
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
pub(super) fn module_load_order(kernel: &Kernel) -> anyhow::Result<Vec<(String, PathBuf)>> {
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
pub(super) fn module_bytes(path: &Path) -> anyhow::Result<Vec<u8>> {
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

/// Writes the gzipped initramfs for `kernel` and `tests` to `out`.
pub(super) fn build_initramfs(
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
pub(super) fn init_script(tests: &[TestSelection]) -> String {
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
