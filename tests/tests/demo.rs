//! The built-in demo runs non-interactively and every step passes. Needs root.

use std::process::Command;

#[test]
fn the_demo_replays_the_walkthrough_and_cleans_up() {
    let before = visibility_tests::lab::list_netns().unwrap();
    let output = Command::new(env!("CARGO_BIN_EXE_demo")).output().unwrap();
    let stdout = String::from_utf8_lossy(&output.stdout);
    assert!(
        output.status.success(),
        "demo failed:\n{stdout}\n{}",
        String::from_utf8_lossy(&output.stderr)
    );
    for expected in [
        "[1] Creating a node",
        "pod-2 answered: \"Hello, world! I am pod-2.\"",
        "gateway flow: tcp 10.52.0.2:",
        "via_gateway",
        "\"dest_port\": 8080",
        "request timed out: the VPC firewall applies",
        "[9] Cleaning up",
        "every step passed",
    ] {
        assert!(
            stdout.contains(expected),
            "missing {expected:?} in:\n{stdout}"
        );
    }
    let after = visibility_tests::lab::list_netns().unwrap();
    let left: Vec<_> = after
        .iter()
        .filter(|ns| !before.contains(ns) && ns.contains("demo"))
        .collect();
    assert!(left.is_empty(), "the demo left namespaces behind: {left:?}");
}
