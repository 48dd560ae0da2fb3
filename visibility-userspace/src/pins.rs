//! The datapath on bpffs, as loading, upgrading, attaching and the CLI all see it: the
//! programs' kinds, the options of a load, the pin directory and its checks, and the attachments
//! recorded under it.
//!
//! Layout under the pin directory (root-only):
//! - `maps/VIS_*`: every map, pinned by name by the loader, and the two the daemon makes:
//!   `VIS_OBJECT` (the object's identity, [`crate::object`]) and `VIS_REPORTED` (what
//!   the flow records reported, [`crate::flows::reported`]);
//! - `programs/{pod_ingress,pod_egress,uplink_ingress}`, and `programs/clock_sample`,
//!   never attached, which [`crate::clock::sync_clock`] runs to measure the datapath's clock;
//! - `links/if<ifindex>_<program>`: TCX links, so attachments outlive the daemon.
//!
//! Kernels before 6.6 have no TCX; there programs attach as clsact filters, which
//! outlive the daemon by themselves; `links/if<ifindex>_<program>` is then a directory
//! holding an empty one named `prio<priority>_handle<handle>`, the filter's place, where
//! an upgrade puts the new program.
//!
//! A daemon whose eBPF object differs from the pinned one replaces the programs in place
//! ([`crate::upgrade`]).

use std::{
    fs, io,
    os::unix::fs::{DirBuilderExt as _, PermissionsExt as _},
    path::{Path, PathBuf},
};

use aya::{
    programs::{TcAttachType, links::PinnedLink, tc},
    util::KernelVersion,
};
use visibility_common::{map_names, program_names};

use crate::{ebpf_object::EbpfObject, error::DatapathError};

/// The default pin directory.
pub const DEFAULT_PIN_DIR: &str = "/sys/fs/bpf/visibility";
const BPFFS_ROOT: &str = "/sys/fs/bpf";
const BPF_FS_MAGIC: i64 = 0xcafe_4a11;

/// One of the three programs.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, PartialOrd, Ord, serde::Serialize)]
#[serde(rename_all = "snake_case")]
pub enum ProgramKind {
    PodIngress,
    PodEgress,
    UplinkIngress,
}

impl ProgramKind {
    pub const ALL: [ProgramKind; 3] = [
        ProgramKind::PodIngress,
        ProgramKind::PodEgress,
        ProgramKind::UplinkIngress,
    ];
    /// Programs attached to each Pod interface.
    pub const POD: [ProgramKind; 2] = [ProgramKind::PodIngress, ProgramKind::PodEgress];

    pub const fn name(self) -> &'static str {
        match self {
            ProgramKind::PodIngress => program_names::POD_INGRESS,
            ProgramKind::PodEgress => program_names::POD_EGRESS,
            ProgramKind::UplinkIngress => program_names::UPLINK_INGRESS,
        }
    }

    pub(crate) fn attach_type(self) -> TcAttachType {
        match self {
            ProgramKind::PodEgress => TcAttachType::Egress,
            ProgramKind::PodIngress | ProgramKind::UplinkIngress => TcAttachType::Ingress,
        }
    }
}

/// How programs attach on this kernel.
#[derive(Clone, Copy, Debug, PartialEq, Eq, serde::Serialize)]
#[serde(rename_all = "snake_case")]
pub enum AttachMode {
    /// TCX links (Linux 6.6 and later), pinned.
    Tcx,
    /// clsact qdisc filters through netlink.
    Clsact,
}

impl AttachMode {
    pub fn current() -> Self {
        match KernelVersion::current() {
            Ok(version) if version >= KernelVersion::new(6, 6, 0) => AttachMode::Tcx,
            _ => AttachMode::Clsact,
        }
    }

    pub const fn name(self) -> &'static str {
        match self {
            AttachMode::Tcx => "tcx",
            AttachMode::Clsact => "clsact",
        }
    }
}

/// Whether [`Datapath::open`] loaded new programs, adopted pinned ones, or replaced
/// pinned ones with its own.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Origin {
    /// Nothing was pinned: new programs and maps.
    Loaded,
    /// The pinned datapath is this daemon's own object: kept as it is.
    Adopted,
    /// The pinned programs were another object's, with maps of the same layout: the
    /// programs were replaced, the maps kept.
    Upgraded,
    /// The pinned programs were another object's, with maps of another layout: the
    /// programs were replaced and the maps made anew, without the old flows.
    UpgradedWithNewMaps,
}

impl Origin {
    /// As `status` shows it.
    pub const fn name(self) -> &'static str {
        match self {
            Origin::Loaded => "loaded",
            Origin::Adopted => "adopted",
            Origin::Upgraded => "upgraded",
            Origin::UpgradedWithNewMaps => "upgraded_new_maps",
        }
    }

    /// Whether the maps are new, so that the configuration goes into them whole; when
    /// kept, they are the truth (CLI changes survive restarts and upgrades).
    pub const fn maps_are_new(self) -> bool {
        matches!(self, Origin::Loaded | Origin::UpgradedWithNewMaps)
    }
}

/// Paths under a pin directory.
#[derive(Clone, Debug)]
pub struct PinDir(PathBuf);

impl PinDir {
    pub fn new(path: impl Into<PathBuf>) -> Self {
        Self(path.into())
    }
    pub fn path(&self) -> &Path {
        &self.0
    }
    pub fn maps(&self) -> PathBuf {
        self.0.join("maps")
    }
    pub fn map(&self, name: &str) -> PathBuf {
        self.maps().join(name)
    }
    pub fn programs(&self) -> PathBuf {
        self.0.join("programs")
    }
    pub fn program(&self, kind: ProgramKind) -> PathBuf {
        self.programs().join(kind.name())
    }
    pub fn clock_sample_program(&self) -> PathBuf {
        self.programs().join(program_names::CLOCK_SAMPLE)
    }
    pub fn links(&self) -> PathBuf {
        self.0.join("links")
    }
    pub fn link(&self, ifindex: u32, kind: ProgramKind) -> PathBuf {
        self.links().join(format!("if{ifindex}_{}", kind.name()))
    }
    /// Where new maps are pinned while an upgrade to another layout replaces the
    /// programs; renamed to [`PinDir::maps`] once no program uses the old ones.
    pub fn next_maps(&self) -> PathBuf {
        self.0.join("maps_next")
    }
    /// Whether the datapath's state is pinned here.
    pub fn is_pinned(&self) -> bool {
        ProgramKind::ALL
            .iter()
            .all(|kind| self.program(*kind).exists())
            && self.map(map_names::SETTINGS).exists()
    }
}

/// Options for a load.
#[derive(Clone, Debug)]
pub struct LoadOptions {
    /// Entries of the flow map, when it is made.
    pub flow_capacity: u32,
    /// The object whose programs run: this binary's own unless told otherwise.
    pub object: EbpfObject,
}

impl Default for LoadOptions {
    fn default() -> Self {
        Self {
            flow_capacity: visibility_common::DEFAULT_FLOW_CAPACITY,
            object: EbpfObject::BuiltIn,
        }
    }
}

pub(crate) fn io_error(
    action: &'static str,
    path: &Path,
) -> impl FnOnce(io::Error) -> DatapathError {
    let path = path.to_owned();
    move |source| DatapathError::Io {
        action,
        path,
        source,
    }
}

/// Creates a directory readable by root only.
pub(crate) fn create_private_dir(path: &Path) -> Result<(), DatapathError> {
    fs::DirBuilder::new()
        .recursive(true)
        .mode(0o700)
        .create(path)
        .map_err(io_error("creating", path))?;
    fs::set_permissions(path, fs::Permissions::from_mode(0o700))
        .map_err(io_error("restricting", path))
}

/// Whether `path` is on a bpffs mount.
pub fn is_bpffs(path: &Path) -> bool {
    nix::sys::statfs::statfs(path).is_ok_and(|fs| fs.filesystem_type().0 == BPF_FS_MAGIC)
}

/// Makes sure the pin directory is on bpffs, mounting bpffs at /sys/fs/bpf if nothing
/// is mounted there, as Cilium's agent does.
pub fn ensure_bpffs(pin_dir: &Path) -> Result<(), DatapathError> {
    let root = Path::new(BPFFS_ROOT);
    if pin_dir.starts_with(root) && !is_bpffs(root) {
        nix::mount::mount(
            Some("bpf"),
            root,
            Some("bpf"),
            nix::mount::MsFlags::empty(),
            None::<&str>,
        )
        .map_err(DatapathError::MountBpffs)?;
    }
    let existing = pin_dir.ancestors().find(|p| p.exists()).unwrap_or(root);
    if !is_bpffs(existing) {
        return Err(DatapathError::NotBpffs(pin_dir.to_owned()));
    }
    Ok(())
}

pub(crate) fn program_error(
    kind: ProgramKind,
) -> impl FnOnce(aya::programs::ProgramError) -> DatapathError {
    move |source| DatapathError::Program {
        program: kind.name(),
        source: Box::new(source),
    }
}

/// The attachments recorded under a pin directory.
pub fn attachments(pins: &PinDir) -> Vec<(u32, ProgramKind)> {
    let Ok(entries) = fs::read_dir(pins.links()) else {
        return Vec::new();
    };
    let mut found: Vec<_> = entries
        .filter_map(Result::ok)
        .filter_map(|entry| {
            let name = entry.file_name().into_string().ok()?;
            let (ifindex, program) = name.strip_prefix("if")?.split_once('_')?;
            let kind = ProgramKind::ALL.into_iter().find(|k| k.name() == program)?;
            Some((ifindex.parse().ok()?, kind))
        })
        .collect();
    found.sort();
    found
}

/// Detaches `kind` from the interface and removes its attachment pin. Idempotent; a
/// vanished interface is fine.
pub(crate) fn detach_pinned(
    pins: &PinDir,
    mode: AttachMode,
    ifname: Option<&str>,
    ifindex: u32,
    kind: ProgramKind,
) -> Result<(), DatapathError> {
    let link_pin = pins.link(ifindex, kind);
    match mode {
        AttachMode::Tcx => {
            if link_pin.exists() {
                // Unpinning drops the last reference, which detaches the program.
                match PinnedLink::from_pin(&link_pin) {
                    Ok(link) => drop(link.unpin().map_err(io_error("unpinning", &link_pin))?),
                    Err(_) => {
                        fs::remove_file(&link_pin).map_err(io_error("removing", &link_pin))?
                    }
                }
            }
        }
        AttachMode::Clsact => {
            if let Some(ifname) = ifname {
                // Gone already when the interface went away with its qdisc.
                let _ = tc::qdisc_detach_program(ifname, kind.attach_type(), kind.name());
            }
            if link_pin.exists() {
                fs::remove_dir_all(&link_pin).map_err(io_error("removing", &link_pin))?;
            }
        }
    }
    Ok(())
}

/// Removes everything under the pin directory: links first (detaching the programs),
/// then programs and maps. The programs stop as soon as their last link is gone.
pub fn remove_pins(
    pins: &PinDir,
    ifname_of: impl Fn(u32) -> Option<String>,
) -> Result<(), DatapathError> {
    let mode = AttachMode::current();
    for (ifindex, kind) in attachments(pins) {
        detach_pinned(pins, mode, ifname_of(ifindex).as_deref(), ifindex, kind)?;
    }
    if pins.path().exists() {
        fs::remove_dir_all(pins.path()).map_err(io_error("removing", pins.path()))?;
    }
    Ok(())
}
