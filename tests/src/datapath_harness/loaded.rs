//! The datapath loaded and pinned under a directory of its own, and configured as the
//! daemon configures it on a lab node.

use std::net::IpAddr;

use anyhow::{Context as _, Result, ensure};
use aya::programs::SchedClassifier;
use ipnet::IpNet;
use visibility::{
    datapath::{Datapath, LoadOptions, Origin, PinDir, ProgramKind},
    maps::Maps,
    net::addr_bytes,
};
use visibility_common::{config::Gateway, packet::Family};

use super::pins::{PinDirGuard, STALE_PINS, cleanup_stale_pins, unique_pin_path};
use crate::lab::{
    GATEWAY_IPV4, GATEWAY_IPV6, NODE_IPV4, NODE_IPV6, POD_CIDR_V4, POD_CIDR_V6, POD_GATEWAY_V4,
    POD_GATEWAY_V6,
};

/// Fails unless this process runs as root.
pub(super) fn require_root() -> Result<()> {
    ensure!(
        nix::unistd::geteuid().is_root(),
        "BPF_PROG_TEST_RUN tests need root (network namespaces, bpffs, loading BPF programs)"
    );
    Ok(())
}

/// The datapath, freshly loaded and pinned under a directory of its own.
pub struct PinnedDatapath {
    datapath: Datapath,
    // Declared last, so the programs are closed before their pins go.
    guard: PinDirGuard,
}

impl PinnedDatapath {
    /// Loads the eBPF object and pins it under [`unique_pin_path`]`(tag)`.
    pub fn load(tag: &str) -> Result<Self> {
        require_root()?;
        STALE_PINS.call_once(|| {
            if let Err(e) = cleanup_stale_pins() {
                eprintln!("cleaning up stale pin directories: {e:#}");
            }
        });
        let guard = PinDirGuard::new(unique_pin_path(tag));
        // Datapath::open retries a load the verifier gave up on with EAGAIN itself.
        let (datapath, origin) = Datapath::open(guard.path(), &LoadOptions::default())
            .with_context(|| format!("loading the datapath at {}", guard.path().display()))?;
        ensure!(
            origin == Origin::Loaded,
            "{} held a datapath already",
            guard.path().display()
        );
        let loaded = Self { datapath, guard };
        // As the daemon does, so that the programs read the clock as they do there.
        visibility::clock::sync_clock(&loaded.datapath, &mut loaded.maps()?)
            .context("measuring the datapath's clock")?;
        Ok(loaded)
    }

    pub fn program(&self, kind: ProgramKind) -> &SchedClassifier {
        self.datapath.program(kind)
    }

    pub fn pins(&self) -> &PinDir {
        self.guard.pins()
    }

    /// Opens the pinned maps (another set of file descriptors on the same maps).
    pub fn maps(&self) -> Result<Maps> {
        Maps::open(self.pins()).context("opening the pinned maps")
    }
}

/// How often [`retry_interrupted_load`] tries; libbpf tries `BPF_PROG_LOAD` as often.
const LOAD_ATTEMPTS: usize = 5;

/// Runs `load` again while it fails with `EAGAIN`, up to [`LOAD_ATTEMPTS`] times.
///
/// The verifier gives up with `EAGAIN` when the loading thread has a signal pending;
/// with many tests loading at once on a busy machine that happens (a verification that
/// takes milliseconds alone takes tens of them). libbpf retries `BPF_PROG_LOAD` on
/// `EAGAIN`; aya 0.14 does not.
pub fn retry_interrupted_load<T>(mut load: impl FnMut() -> Result<T>) -> Result<T> {
    let mut attempt = 1;
    loop {
        match load() {
            Err(e) if attempt < LOAD_ATTEMPTS && is_errno(&e, libc::EAGAIN) => attempt += 1,
            result => return result,
        }
    }
}

/// Whether the innermost cause of `error` is the OS error `errno`.
pub fn is_errno(error: &anyhow::Error, errno: i32) -> bool {
    error
        .chain()
        .filter_map(|cause| cause.downcast_ref::<std::io::Error>())
        .any(|io| io.raw_os_error() == Some(errno))
}

/// Configures the maps as the daemon does on a lab node: the Pod CIDRs, the node's
/// addresses (the Pod gateway addresses on every host veth and the uplink's), a gateway
/// per family on the uplink (ifindex `uplink`), kube-proxy's masquerade mark, and on.
///
/// Unlike the daemon, it registers no Pod interface (`add_pod_iface`), so that returning
/// packets take `bpf_redirect` unless a test registers the veth (`bpf_redirect_peer`).
pub fn configure_like_daemon(maps: &mut Maps, uplink: u32) -> Result<()> {
    for cidr in [POD_CIDR_V4, POD_CIDR_V6] {
        let net: IpNet = cidr.parse()?;
        maps.add_pod_cidr(&net, &[])?;
    }
    let node_addrs: [IpAddr; 4] = [
        POD_GATEWAY_V4.into(),
        POD_GATEWAY_V6.into(),
        NODE_IPV4.into(),
        NODE_IPV6.into(),
    ];
    maps.set_node_addrs(&node_addrs)?;
    for (family, addr, node_addr) in [
        (
            Family::V4,
            IpAddr::from(GATEWAY_IPV4),
            IpAddr::from(NODE_IPV4),
        ),
        (
            Family::V6,
            IpAddr::from(GATEWAY_IPV6),
            IpAddr::from(NODE_IPV6),
        ),
    ] {
        maps.set_gateway(
            family,
            Gateway {
                ifindex: uplink,
                addr: addr_bytes(&addr),
                node_addr: addr_bytes(&node_addr),
            },
        )?;
    }
    maps.set_enabled(true)?;
    Ok(())
}
