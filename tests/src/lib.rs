//! Kernel integration tests for intranode visibility, and the helpers they share.
//!
//! * [`lab`]: a GKE node, its Pods and its VPC gateway emulated in network namespaces
//!   (ptp CNI style, dual-stack), with traffic helpers that run inside Pods and a flow log,
//!   counters and block rules at the gateway.
//! * [`datapath_harness`]: the datapath loaded and pinned on a lab node, configured as the
//!   daemon does, and driven with `BPF_PROG_TEST_RUN`.
//! * [`fuzz`]: the differential fuzz harness: the host's parser and verdict against the
//!   kernel's programs, frame by frame (`cargo xtask fuzz`).
//! * [`attach_watch`]: when new Pods' routes appear and when the daemon has attached
//!   them, for the attach-latency and churn benchmarks.
//! * [`bench_node`]: the arguments and the lab node the daemon's benchmarks share.
//! * [`churn`]: Pod interfaces made and deleted in bursts, and what the daemon must have
//!   cleaned up after them.
//! * [`measure`]: percentiles, and a process's CPU time and memory, for the benchmarks.
//! * [`node`]: a lab node running the real `visibility` daemon, and its CLI.
//! * [`dashboard`]: the Grafana dashboard's queries against a real Prometheus server, and
//!   its picture.
//! * [`records`]: the daemon's JSON flow records as tests read them, and an HTTP exchange
//!   to record.
//! * [`tcp_load`]: a long-running TCP conversation between two Pods.
//! * [`netd`]: GKE's netd policy routing on a lab node, for comparison.
//! * [`unique`]: names no other test process uses, for namespaces, pins and files.
//!
//! Most tests in `tests/` need root (network namespaces, nftables, BPF).

pub mod attach_watch;
pub mod bench_node;
pub mod churn;
pub mod dashboard;
pub mod datapath_harness;
pub mod fuzz;
pub mod lab;
pub mod measure;
pub mod netd;
pub mod node;
pub mod records;
pub mod tcp_load;
pub mod unique;

/// Fails the test unless it runs as root, which the kernel tests need (network
/// namespaces, veths, nftables, bpffs, BPF).
pub fn require_root() {
    assert!(
        nix::unistd::geteuid().is_root(),
        "the kernel tests need root (network namespaces, veths, nftables, bpffs, BPF): run them as root"
    );
}
