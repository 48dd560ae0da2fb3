//! Errors of the library, one enum per domain. Each says what to do about it.

use std::{io, path::PathBuf};

/// What to do when the pin directory is not on bpffs, on a node and in a DaemonSet:
/// the daemon and every CLI command say it in their one-line error.
pub const MOUNT_BPFFS: &str = "mount bpffs with `mount -t bpf bpf /sys/fs/bpf` (in a DaemonSet: a hostPath volume /sys/fs/bpf mounted at /sys/fs/bpf) and pass a --pin-dir under it (default /sys/fs/bpf/visibility)";

/// Loading, pinning, adopting, attaching and detaching the datapath.
#[derive(Debug, thiserror::Error)]
pub enum DatapathError {
    /// The binary was built with AYA_BUILD_SKIP=1 and carries no eBPF object.
    #[error(
        "this binary was built without its eBPF object (AYA_BUILD_SKIP); rebuild it with the nightly toolchain and bpf-linker installed (cargo xtask setup)"
    )]
    NoObject,
    /// The object file given with `--ebpf-object` could not be read.
    #[error(
        "reading the eBPF object {path}: {source}; pass a readable file to --ebpf-object, or leave it out to load this binary's own"
    )]
    ObjectFileUnreadable {
        path: PathBuf,
        #[source]
        source: io::Error,
    },
    /// The object file given with `--ebpf-object` is not a datapath object this binary
    /// can load in place of its own: not an eBPF ELF file, without one of the programs,
    /// or with pinned maps laid out otherwise.
    #[error(
        "{path} is not a datapath object this daemon can load: {source}; pass a visibility-datapath built from visibility-ebpf with this binary's map layouts, or leave --ebpf-object out"
    )]
    ObjectFileInvalid {
        path: PathBuf,
        #[source]
        source: Box<dyn std::error::Error + Send + Sync>,
    },
    /// The pin directory is not on a bpffs mount.
    #[error("{0} is not on a bpffs mount; {hint}", hint = MOUNT_BPFFS)]
    NotBpffs(PathBuf),
    /// Mounting bpffs at /sys/fs/bpf failed (no CAP_SYS_ADMIN in a container).
    #[error("bpffs is not mounted at /sys/fs/bpf and mounting it failed ({0}); {hint}", hint = MOUNT_BPFFS)]
    MountBpffs(#[source] nix::Error),
    /// A filesystem operation under the pin directory failed.
    #[error("{action} {path}: {source}")]
    Io {
        action: &'static str,
        path: PathBuf,
        #[source]
        source: io::Error,
    },
    /// The kernel refused to load the eBPF object.
    #[error("loading the eBPF object failed (are you root, with a kernel that has BTF?): {0}")]
    Load(#[from] Box<aya::EbpfError>),
    /// A program could not be loaded, pinned, adopted or attached.
    #[error("program {program}: {source}")]
    Program {
        program: &'static str,
        #[source]
        source: Box<aya::programs::ProgramError>,
    },
    /// A map could not be read or written.
    #[error(transparent)]
    Maps(#[from] MapsError),
    /// The kernel's tick could not be measured: the sampling program is missing (a
    /// datapath pinned by an older daemon) or the clocks did not move as expected.
    #[error(
        "the datapath's clock could not be measured; the programs read the kernel's clock instead"
    )]
    ClockUnmeasurable,
    /// A link could not be pinned or adopted.
    #[error("link {path}: {source}")]
    Link {
        path: PathBuf,
        #[source]
        source: Box<dyn std::error::Error + Send + Sync>,
    },
}

/// Reading and writing the pinned maps.
#[derive(Debug, thiserror::Error)]
pub enum MapsError {
    /// The maps are not pinned: the daemon has not run, or ran with another --pin-dir.
    #[error(
        "no datapath state under {0}: start the daemon (`visibility daemon`) or pass the --pin-dir it uses"
    )]
    NotPinned(PathBuf),
    /// A pinned map could not be opened, read or written.
    #[error("map {map}: {source}")]
    Map {
        map: &'static str,
        #[source]
        source: Box<aya::maps::MapError>,
    },
    /// An exempt prefix carries more rules than the datapath holds.
    #[error("{prefix} is covered by more than {max} exempt rules; merge some of them")]
    TooManyExemptRules { prefix: String, max: usize },
    /// The map is full.
    #[error("the {map} map is full ({max} entries)")]
    Full { map: &'static str, max: u32 },
    /// The map is not pinned: the datapath was pinned by an older daemon, before the
    /// map existed. `visibility teardown` and a restart pin a current datapath.
    #[error("the {0} map is not pinned (a datapath from an older daemon)")]
    Missing(&'static str),
    /// The lock that serializes changes to the maps could not be taken.
    #[error("locking {path} for a change of the maps: {source}")]
    Lock {
        path: PathBuf,
        #[source]
        source: io::Error,
    },
}

impl MapsError {
    pub(crate) fn map(map: &'static str) -> impl FnOnce(aya::maps::MapError) -> Self {
        move |source| MapsError::Map {
            map,
            source: Box::new(source),
        }
    }
}

/// Bad input on the command line or in the configuration file.
#[derive(Debug, thiserror::Error)]
pub enum InputError {
    /// A CIDR that does not parse.
    #[error("{0:?} is not a CIDR such as 10.52.0.0/24 or fd00:52::/64")]
    Cidr(String),
    /// An exempt rule that does not parse.
    #[error("{0:?} is not an exempt range: use CIDR[,PROTO[/PORT]], e.g. 10.52.0.10/32,udp/53")]
    Exempt(String),
    /// A protocol name or number that is not known.
    #[error("{0:?} is not a protocol: use tcp, udp, icmp, icmpv6, sctp or a number 1-255")]
    Protocol(String),
    /// A flow filter that does not parse.
    #[error(
        "{0:?} is not a filter: use KEY=VALUE with src, dst, ip, sport, dport, port, proto or path"
    )]
    Filter(String),
    /// Removing something that is not there.
    #[error("{0}")]
    NotPresent(String),
    /// An interface that does not exist.
    #[error("no interface named {0}; `ip link` lists this node's interfaces")]
    NoInterface(String),
}
