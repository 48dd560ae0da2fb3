//! The kernels under test: downloaded once, unpacked under `target/vm/kernels`, and the
//! attach mode each must show.

use std::{
    fs,
    path::{Path, PathBuf},
    process::Command,
};

use anyhow::{Context as _, ensure};

use super::{
    apt::PrivateApt,
    spec::{KERNELS, KernelSpec},
};
use crate::run::run;

/// An unpacked kernel package.
pub(super) struct Kernel {
    /// `uname -r`, e.g. `6.1.0-50-cloud-amd64`.
    pub(super) release: String,
    pub(super) vmlinuz: PathBuf,
    /// `lib/modules/<release>`, with a `modules.dep` made by `depmod`.
    pub(super) modules: PathBuf,
}

/// Makes sure the kernel of `spec` is unpacked under `cache` and returns it. A second run
/// reuses it without asking apt, unless `refresh`.
pub(super) fn ensure_kernel(
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
pub(super) fn module_release(tree: &Path) -> anyhow::Result<String> {
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

pub(super) fn modules_root(tree: &Path) -> anyhow::Result<PathBuf> {
    ["lib/modules", "usr/lib/modules"]
        .iter()
        .map(|p| tree.join(p))
        .find(|p| p.is_dir())
        .with_context(|| format!("no lib/modules in {}", tree.display()))
}

pub(super) fn unpacked_kernel(tree: &Path) -> anyhow::Result<Kernel> {
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
pub(super) fn expected_attach_mode(release: &str) -> &'static str {
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

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn attach_mode_by_release() {
        assert_eq!(expected_attach_mode("6.1.0-50-cloud-amd64"), "clsact");
        assert_eq!(expected_attach_mode("6.12.95+deb12-cloud-amd64"), "tcx");
        assert_eq!(expected_attach_mode("6.6.0"), "tcx");
        assert_eq!(expected_attach_mode("5.15.0"), "clsact");
    }
}
