//! The real `visibility` binary on a lab node: the daemon in the node's namespace and
//! every CLI command against its pin directory, with traffic between Pods and the
//! gateway's flow log and counters as the judge.
//!
//! **These tests need root** (network namespaces, veths, nftables, bpffs and BPF), the
//! binary built (`cargo build -p visibility-userspace`, or `VISIBILITY_BIN`), and
//! iproute2, nftables, conntrack, iputils `ping` and `bpftool`. They run in parallel:
//! every test has its own lab and its own pin directory, removed on drop.
//!
//! Run: `cargo build -p visibility-userspace && cargo test -p visibility-tests --test daemon`
//!
//! One file a topic: [`control`], [`pods`], [`churn`] (bursts of Pods made and deleted),
//! [`teardown`], [`status`], [`flows`],
//! [`logs`], [`learned`] (Pod CIDRs learned from the node, and the probes) and
//! [`two_nodes`] (two nodes behind one gateway, one configuration); [`common`] holds
//! what they share.

mod churn;
mod common;
mod control;
mod flows;
mod learned;
mod logs;
mod pods;
mod status;
mod teardown;
mod two_nodes;
