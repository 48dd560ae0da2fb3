//! The eBPF programs live in the `visibility-datapath` binary (src/main.rs) and the
//! benchmarks' `visibility-bench` (src/bench.rs). This empty library lets
//! visibility-userspace name the crate as a build dependency, so cargo rebuilds the
//! objects when they change.
#![no_std]
