//! Booting a guest in QEMU (TCG) with a hard timeout, its console logged and read.

use std::{
    fs,
    io::{BufRead as _, BufReader, Read, Write as _},
    os::unix::process::CommandExt as _,
    path::Path,
    process::{Child, Command, Stdio},
    sync::mpsc,
    time::{Duration, Instant},
};

use anyhow::Context as _;

use super::{
    kernel::Kernel,
    results::{Outcome, plain},
    spec::KernelSpec,
};
use crate::run::display;

/// The guest's memory and CPUs. One vCPU: with two, QEMU 7.2's multi-threaded TCG
/// sometimes runs a stale `int3` that the kernel left while patching a static branch on
/// the other CPU (6.12 oopsed with `Oops: int3` in `__netif_receive_skb_core` during
/// datapath_netns); the tests run one at a time anyway, and the two VMs keep both host
/// CPUs busy.
pub(super) const GUEST_MEMORY: &str = "1536M";
pub(super) const GUEST_CPUS: &str = "1";

/// A QEMU process that is killed when dropped, so that no error path leaves one behind.
pub(super) struct Qemu {
    pub(super) child: Child,
}

impl Drop for Qemu {
    fn drop(&mut self) {
        if matches!(self.child.try_wait(), Ok(None)) {
            let _ = self.child.kill();
        }
        let _ = self.child.wait();
    }
}

/// Boots `kernel` with `initramfs`, logs the console to `log_path` and reads it until the
/// guest powers off or `timeout` passes (then QEMU is killed).
pub(super) fn boot(
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
