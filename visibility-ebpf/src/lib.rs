#![no_std]
//! The eBPF programs live in the `visibility-datapath` binary (src/main.rs). This
//! empty library lets visibility-userspace name the crate as a build dependency, so
//! cargo rebuilds the object when it changes.
