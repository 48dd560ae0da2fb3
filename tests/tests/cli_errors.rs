//! Bad input to the real `visibility` binary: every command fails with a non-zero exit
//! code and ONE line on standard error that says what to do, and changes nothing (the
//! maps, the daemon's status and the pin directory are as before).
//!
//! **These tests need root** (network namespaces, bpffs, BPF) and the binary built
//! (`cargo build -p visibility-userspace`, or `VISIBILITY_BIN`). They run in parallel:
//! every test has its own lab and pin directory, removed on drop.
//!
//! Run: `cargo build -p visibility-userspace && cargo test -p visibility-tests --test cli_errors`

use std::{
    path::{Path, PathBuf},
    process::Output,
    time::Duration,
};

use serde_json::{Value, json};
use visibility_tests::require_root;
use visibility_tests::{
    lab::POD_CIDR_V4,
    node::{Node, binary, output_within, run_cli},
    unique::TempFile,
};

/// A lab with two Pods whose daemon runs with an exemption, so that lists are not empty.
fn started(tag: &str) -> Node {
    require_root();
    let mut node = Node::new(tag, 2).expect("building the lab");
    let mut flags = Node::default_daemon_args();
    flags.extend(["--exempt".to_owned(), "10.52.0.9/32,udp/53".to_owned()]);
    node.start_daemon(flags).expect("starting the daemon");
    node
}

/// Everything a CLI command could change, without what changes by itself (counters,
/// timestamps, the gateway's neighbour entry and with it health).
fn snapshot(node: &Node) -> Value {
    let status = node.status().unwrap();
    let daemon = &status["daemon"];
    // The gateway's MAC comes and goes with the neighbour entry's state.
    let mut uplinks = daemon["uplinks"].clone();
    for uplink in uplinks.as_array_mut().into_iter().flatten() {
        uplink.as_object_mut().unwrap().remove("gateway_mac");
    }
    let mut pins: Vec<String> = walk(&node.pin_dir);
    pins.sort();
    json!({
        "enabled": status["enabled"],
        "daemon_running": status["daemon_running"],
        "pid": daemon["pid"],
        "origin": daemon["origin"],
        "uplinks": uplinks,
        "pod_interfaces": daemon["pod_interfaces"],
        "pod_cidrs": status["pod_cidrs"],
        "exempt": status["exempt"],
        "flow_map_capacity": status["flow_map_capacity"],
        "exempt_list": node.exempt_list().unwrap(),
        "pod_cidr_list": node.pod_cidrs().unwrap(),
        "pins": pins,
    })
}

/// Every path under `dir`, relative to it.
fn walk(dir: &Path) -> Vec<String> {
    let mut found = Vec::new();
    let mut stack = vec![dir.to_owned()];
    while let Some(path) = stack.pop() {
        let Ok(entries) = std::fs::read_dir(&path) else {
            continue;
        };
        for entry in entries.filter_map(Result::ok) {
            let path = entry.path();
            found.push(path.strip_prefix(dir).unwrap().display().to_string());
            if entry.file_type().is_ok_and(|t| t.is_dir()) {
                stack.push(path);
            }
        }
    }
    found
}

/// Checks a failed command: non-zero exit, nothing on standard output, and exactly one
/// line on standard error, `error: ...`, that contains every one of `hints`. Returns it.
fn expect_error(output: &Output, hints: &[&str]) -> String {
    let stderr = String::from_utf8_lossy(&output.stderr).into_owned();
    let stdout = String::from_utf8_lossy(&output.stdout);
    assert!(
        !output.status.success(),
        "must fail; stdout: {stdout} stderr: {stderr}"
    );
    assert!(stdout.trim().is_empty(), "nothing on stdout: {stdout}");
    let lines: Vec<&str> = stderr.lines().collect();
    assert_eq!(lines.len(), 1, "ONE line on stderr, got:\n{stderr}");
    let line = lines[0];
    assert!(line.starts_with("error: "), "{line}");
    for hint in hints {
        assert!(line.contains(hint), "{line:?} does not say {hint:?}");
    }
    line.to_owned()
}

/// Runs `args` on `node` and expects the error; nothing may change.
fn fails_and_changes_nothing(node: &Node, args: &[&str], hints: &[&str]) -> String {
    let before = snapshot(node);
    let line = expect_error(&node.cli(args).unwrap(), hints);
    assert_eq!(
        snapshot(node),
        before,
        "`visibility {}` changed something",
        args.join(" ")
    );
    line
}

/// A pin directory under bpffs that nothing uses.
fn unused_bpffs_dir(tag: &str) -> PathBuf {
    let dir = PathBuf::from(format!(
        "/sys/fs/bpf/vis-nonexistent-XYZ-{tag}-{}",
        std::process::id()
    ));
    // On a node the daemon has mounted bpffs before any CLI command runs; on a fresh
    // machine nothing has, until some other test's daemon does. Mount it here, as the
    // daemon would, so that these tests see "no datapath state" whatever runs first.
    visibility::datapath::ensure_bpffs(&dir).expect("mounting bpffs at /sys/fs/bpf");
    dir
}

#[test]
fn pod_cidr_add_with_an_invalid_cidr() {
    let node = started("e-cidr");
    fails_and_changes_nothing(
        &node,
        &["pod-cidr", "add", "10.0.0.0/33"],
        &["\"10.0.0.0/33\"", "is not a CIDR", "such as 10.52.0.0/24"],
    );
}

#[test]
fn pod_cidr_remove_with_an_invalid_cidr() {
    let node = started("e-cidrrm");
    fails_and_changes_nothing(
        &node,
        &["pod-cidr", "remove", "10.52.0.0/24x"],
        &["\"10.52.0.0/24x\"", "is not a CIDR"],
    );
}

#[test]
fn exempt_add_nonsense() {
    let node = started("e-nonsense");
    fails_and_changes_nothing(
        &node,
        &["exempt", "add", "nonsense"],
        &["\"nonsense\"", "CIDR[,PROTO[/PORT]]", "e.g."],
    );
}

#[test]
fn exempt_add_with_an_invalid_cidr() {
    let node = started("e-excidr");
    fails_and_changes_nothing(
        &node,
        &["exempt", "add", "10.52.0.0/33,udp/53"],
        &["10.52.0.0/33", "CIDR[,PROTO[/PORT]]"],
    );
}

#[test]
fn exempt_add_with_an_unknown_protocol() {
    let node = started("e-proto");
    fails_and_changes_nothing(
        &node,
        &["exempt", "add", "10.52.0.3/32,bogus/53"],
        &["\"bogus\"", "is not a protocol", "use tcp, udp"],
    );
}

#[test]
fn exempt_add_with_a_port_out_of_range() {
    let node = started("e-port");
    fails_and_changes_nothing(
        &node,
        &["exempt", "add", "10.52.0.3/32,udp/70000"],
        &["udp/70000", "CIDR[,PROTO[/PORT]]"],
    );
}

#[test]
fn exempt_add_with_port_zero() {
    let node = started("e-port0");
    fails_and_changes_nothing(
        &node,
        &["exempt", "add", "10.52.0.3/32,tcp/0"],
        &["tcp/0", "CIDR[,PROTO[/PORT]]"],
    );
}

#[test]
fn exempt_add_with_a_port_for_a_protocol_without_ports() {
    let node = started("e-icmpport");
    fails_and_changes_nothing(
        &node,
        &["exempt", "add", "10.52.0.3/32,icmp/8"],
        &["icmp/8", "CIDR[,PROTO[/PORT]]"],
    );
}

#[test]
fn exempt_remove_of_a_rule_that_is_not_there() {
    let node = started("e-exrm");
    // The daemon's rule is 10.52.0.9/32,udp/53; the same range with another protocol is
    // another rule.
    fails_and_changes_nothing(
        &node,
        &["exempt", "remove", "10.52.0.9/32,tcp/53"],
        &[
            "10.52.0.9/32,tcp/53",
            "is not exempt",
            "visibility exempt list",
        ],
    );
    assert_eq!(
        node.exempt_list().unwrap()[0]["rule"],
        "10.52.0.9/32,udp/53"
    );
}

#[test]
fn pod_cidr_remove_of_a_cidr_that_is_not_there() {
    let node = started("e-cidrabs");
    fails_and_changes_nothing(
        &node,
        &["pod-cidr", "remove", "10.99.0.0/16"],
        &[
            "10.99.0.0/16",
            "is not a Pod CIDR",
            "visibility pod-cidr list",
        ],
    );
}

#[test]
fn flows_with_an_unknown_filter() {
    let node = started("e-filter");
    fails_and_changes_nothing(
        &node,
        &["flows", "--filter", "colour=red"],
        &["\"colour=red\"", "KEY=VALUE", "src, dst"],
    );
    fails_and_changes_nothing(
        &node,
        &[
            "flows",
            "--json",
            "--filter",
            "src=10.52.0.2",
            "--filter",
            "colour=red",
        ],
        &["\"colour=red\"", "KEY=VALUE"],
    );
}

#[test]
fn flows_with_a_filter_value_that_does_not_parse() {
    let node = started("e-filterval");
    fails_and_changes_nothing(
        &node,
        &["flows", "--filter", "src=nope"],
        &["\"src=nope\"", "KEY=VALUE"],
    );
    fails_and_changes_nothing(
        &node,
        &["flows", "--filter", "path=sideways"],
        &["\"path=sideways\"", "KEY=VALUE"],
    );
}

/// A daemon told to use an uplink that does not exist fails before it loads anything:
/// no pin directory, no status; a running daemon on its pin directory is untouched.
#[test]
fn daemon_with_an_unknown_uplink() {
    let node = started("e-uplink");
    let fresh = unused_bpffs_dir("uplink");
    let cmd = node.lab.node().cmd(
        binary(),
        [
            "--pin-dir",
            fresh.to_str().unwrap(),
            "daemon",
            "--uplink",
            "nosuch0",
            "--pod-cidr",
            POD_CIDR_V4,
        ],
    );
    let output = output_within(cmd, Duration::from_secs(30)).unwrap();
    expect_error(&output, &["nosuch0", "`ip link`"]);
    assert!(!fresh.exists(), "no pin directory may be created");
    assert!(
        !visibility::state::state_dir(&fresh).exists(),
        "no status may be written"
    );

    // Same with the pin directory of a running daemon.
    let before = snapshot(&node);
    let mut args = vec!["--pin-dir".to_owned(), node.pin_dir.display().to_string()];
    args.extend(["daemon", "--uplink", "nosuch0", "--pod-cidr", POD_CIDR_V4].map(String::from));
    let output = output_within(
        node.lab.node().cmd(binary(), &args),
        Duration::from_secs(30),
    )
    .unwrap();
    expect_error(&output, &["nosuch0", "`ip link`"]);
    assert_eq!(snapshot(&node), before);
}

/// A daemon given an IPFIX collector that is not `HOST:PORT` fails before it loads
/// anything, and says what a collector looks like.
#[test]
fn daemon_with_a_collector_that_is_not_host_and_port() {
    require_root();
    let node = Node::new("e-ipfix", 1).expect("building the lab");
    let fresh = unused_bpffs_dir("ipfix");
    let cmd = node.lab.node().cmd(
        binary(),
        [
            "--pin-dir",
            fresh.to_str().unwrap(),
            "daemon",
            "--pod-cidr",
            POD_CIDR_V4,
            "--ipfix",
            "collector-without-port",
        ],
    );
    let output = output_within(cmd, Duration::from_secs(30)).unwrap();
    expect_error(&output, &["collector-without-port", "HOST:PORT"]);
    assert!(!fresh.exists(), "no pin directory may be created");
}

/// A daemon given an eBPF object file (`--ebpf-object`) that is missing, not ELF, or
/// an eBPF object without the datapath's programs (the benchmarks') fails before it
/// loads anything, and says what it needs: no pin directory on a fresh one, and a
/// running daemon's datapath untouched.
#[test]
fn daemon_with_an_ebpf_object_it_cannot_load() {
    let node = started("e-object");
    let fresh = unused_bpffs_dir("object");
    let not_elf = TempFile::with_bytes("not-elf", b"not an ELF file").unwrap();
    let other_programs =
        TempFile::with_bytes("bench", visibility::datapath::BENCH_EBPF_OBJECT).unwrap();
    let missing = not_elf.path.with_extension("missing");
    let cases = [
        (&missing, "reading the eBPF object"),
        (&not_elf.path, "is not a datapath object"),
        (&other_programs.path, "it has no program pod_ingress"),
    ];
    for (object, hint) in cases {
        for pin_dir in [&fresh, &node.pin_dir] {
            let before = snapshot(&node);
            let args = [
                "--pin-dir",
                pin_dir.to_str().unwrap(),
                "daemon",
                "--pod-cidr",
                POD_CIDR_V4,
                "--ebpf-object",
                object.to_str().unwrap(),
            ];
            let output =
                output_within(node.lab.node().cmd(binary(), args), Duration::from_secs(30))
                    .unwrap();
            expect_error(&output, &[object.to_str().unwrap(), hint, "--ebpf-object"]);
            assert!(!fresh.exists(), "no pin directory may be created");
            assert_eq!(snapshot(&node), before);
        }
    }
}

/// A pin directory that is not on bpffs: every command refuses it, and creates nothing.
#[test]
fn pin_dir_not_on_bpffs() {
    require_root();
    let dir = PathBuf::from(format!("/tmp/vis-not-bpffs-{}/x", std::process::id()));
    let commands: [&[&str]; 5] = [
        &["status"],
        &["status", "--json"],
        &["enable"],
        &["exempt", "add", "10.52.0.3/32"],
        &["flows"],
    ];
    for args in commands {
        let line = expect_error(
            &run_cli(&dir, args).unwrap(),
            &[dir.to_str().unwrap(), "not on a bpffs mount", "--pin-dir"],
        );
        assert!(
            !dir.exists() && !dir.parent().unwrap().exists(),
            "{args:?} created {}",
            dir.display()
        );
        let _ = line;
    }
}

/// No daemon ever ran with this pin directory: `status` says so and what to do.
#[test]
fn status_without_state() {
    require_root();
    let dir = unused_bpffs_dir("status");
    expect_error(
        &run_cli(&dir, &["status"]).unwrap(),
        &[
            dir.to_str().unwrap(),
            "no datapath state",
            "start the daemon",
        ],
    );
    expect_error(
        &run_cli(&dir, &["status", "--json"]).unwrap(),
        &["no datapath state"],
    );
    assert!(!dir.exists());
    assert!(!visibility::state::state_dir(&dir).exists());
}

/// No daemon ever ran with this pin directory: `enable` (and the other changes) say so
/// and create nothing.
#[test]
fn enable_without_state() {
    require_root();
    let dir = unused_bpffs_dir("enable");
    let commands: [&[&str]; 4] = [
        &["enable"],
        &["disable"],
        &["exempt", "add", "10.52.0.3/32"],
        &["pod-cidr", "add", "10.52.0.0/24"],
    ];
    for args in commands {
        expect_error(
            &run_cli(&dir, args).unwrap(),
            &[
                dir.to_str().unwrap(),
                "no datapath state",
                "start the daemon",
            ],
        );
        assert!(!dir.exists(), "{args:?} created {}", dir.display());
    }
}
