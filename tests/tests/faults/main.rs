//! The daemon under faults: each is handled with a clear log line and a metric, without
//! a crash loop, and without a lost or double-counted flow record. One test a fault:
//! [`bpffs`] (the pin directory not on bpffs), [`uplink`] (the uplink removed, added
//! again and renamed), [`gateway_mac`] (the gateway's MAC changing mid-flow),
//! [`disk_full`] (the record file's disk full), [`rotation`] (the record file rotated
//! away by logrotate), [`sigterm`] (records still queued at SIGTERM) and [`cli_race`]
//! (CLI commands racing each other and the daemon); [`common`] holds what they share.
//!
//! **These tests need root** (network namespaces, veths, bpffs, BPF, a private mount
//! namespace for the full disk), the binary built (`cargo build -p visibility-userspace`,
//! or `VISIBILITY_BIN`), and iproute2, nftables, conntrack, curl and util-linux
//! `unshare`. Each has its own lab, pin directory and record file, removed on drop.
//!
//! Run: `cargo build -p visibility-userspace && cargo test -p visibility-tests --test faults`

mod bpffs;
mod cli_race;
mod common;
mod disk_full;
mod gateway_mac;
mod rotation;
mod sigterm;
mod uplink;
