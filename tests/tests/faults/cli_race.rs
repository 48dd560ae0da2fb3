//! CLI commands racing each other and the daemon: two `exempt add` at once, with an
//! `enable` or `disable` alongside, round after round, while the daemon reconciles
//! every second. Each command reads, changes and writes back a set (the exemptions,
//! the settings word they share); none may lose another's update.

use std::process::{Child, Stdio};

use visibility_tests::node::Node;

use crate::common::node_with;

/// Rounds of three commands started together.
const ROUNDS: u8 = 60;

fn spawn(node: &Node, args: &[&str]) -> Child {
    node.command(args)
        .stdin(Stdio::null())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .unwrap()
}

fn succeeded(child: Child, what: &str) {
    let output = child.wait_with_output().unwrap();
    assert!(
        output.status.success(),
        "{what}: {}",
        String::from_utf8_lossy(&output.stderr)
    );
}

#[test]
fn concurrent_commands_lose_no_update() {
    let node = node_with("f-race", 2, &[]);
    let mut wanted = Vec::new();
    for round in 0..ROUNDS {
        let (a, b) = (
            format!("10.99.{round}.1/32"),
            format!("10.99.{round}.2/32,udp/53"),
        );
        let enabled = round % 2 == 0;
        let toggle = if enabled { "enable" } else { "disable" };
        let children = [
            (spawn(&node, &["exempt", "add", &a]), a.clone()),
            (spawn(&node, &["exempt", "add", &b]), b.clone()),
            (spawn(&node, &[toggle]), toggle.to_owned()),
        ];
        for (child, what) in children {
            succeeded(child, &what);
        }
        wanted.extend([a, b]);
        let status = node.status().unwrap();
        assert_eq!(
            status["enabled"], enabled,
            "round {round}: `{toggle}` was undone by a racing `exempt add`: {status}"
        );
        let listed: Vec<String> = node
            .exempt_list()
            .unwrap()
            .as_array()
            .unwrap()
            .iter()
            .map(|row| row["rule"].as_str().unwrap().to_owned())
            .collect();
        let lost: Vec<&String> = wanted.iter().filter(|w| !listed.contains(w)).collect();
        assert!(
            lost.is_empty(),
            "round {round}: lost {lost:?}; listed {listed:?}"
        );
    }
}
