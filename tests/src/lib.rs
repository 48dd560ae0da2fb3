//! Kernel integration tests for intranode visibility, and the helpers they share.
//!
//! * [`lab`]: a GKE node, its Pods and its VPC gateway emulated in network namespaces
//!   (ptp CNI style, dual-stack), with traffic helpers that run inside Pods and a flow log,
//!   counters and block rules at the gateway.
//!
//! Most tests in `tests/` need root (network namespaces, nftables, BPF).

pub mod lab;
