//! `visibility flows`: sorting, limits, filters, and `--watch`.

use std::time::Duration;

use serde_json::Value;

use crate::common::*;

/// `flows` sorts, limits and filters, as JSON records and as a table.
#[test]
fn flows_sort_limit_and_filter() {
    let node = started("d-flows", 3);
    let lab = &node.lab;
    lab.pod_ns(0).ping(lab.pod_ipv4(1), 5).unwrap();
    lab.pod_ns(0).ping(lab.pod_ipv4(2), 2).unwrap();
    lab.pod_ns(0).ping(lab.pod_ipv6(1), 1).unwrap();
    udp_exchange(lab, 0, 1, 7001);
    udp_exchange(lab, 2, 1, 7002);

    let all = node.flows(&[]).unwrap();
    assert!(all.len() >= 8, "{all:#?}");
    let packets = |f: &Value| num(&f["packets_sent"]);
    let bytes = |f: &Value| num(&f["bytes_sent"]);
    assert!(
        all.windows(2).all(|w| bytes(&w[0]) >= bytes(&w[1])),
        "bytes first by default"
    );

    let icmp = node.flows(&["proto=icmp"]).unwrap();
    assert!(icmp.len() >= 4, "two pairs, both directions: {icmp:#?}");
    assert!(icmp.iter().all(|f| f["connection"]["protocol"] == 1));
    let out = node
        .cli_ok(&[
            "flows",
            "--json",
            "--sort",
            "packets",
            "--limit",
            "1",
            "--filter",
            "proto=icmp",
        ])
        .unwrap();
    let top: Vec<Value> = serde_json::from_str(&out).unwrap();
    assert_eq!(top.len(), 1);
    assert_eq!(packets(&top[0]), icmp.iter().map(packets).max().unwrap());
    assert_eq!(packets(&top[0]), 5, "{top:?}");
    let ends = [
        top[0]["connection"]["src_ip"].clone(),
        top[0]["connection"]["dest_ip"].clone(),
    ];
    assert!(ends.contains(&Value::from(lab.pod_ipv4(0).to_string())));
    assert!(ends.contains(&Value::from(lab.pod_ipv4(1).to_string())));

    let out = node
        .cli_ok(&["flows", "--json", "--sort", "packets"])
        .unwrap();
    let by_packets: Vec<Value> = serde_json::from_str(&out).unwrap();
    assert_eq!(by_packets.len(), all.len());
    assert!(
        by_packets
            .windows(2)
            .all(|w| packets(&w[0]) >= packets(&w[1]))
    );
    let out = node
        .cli_ok(&["flows", "--json", "--sort", "last", "--limit", "3"])
        .unwrap();
    assert_eq!(serde_json::from_str::<Vec<Value>>(&out).unwrap().len(), 3);

    let pod0 = lab.pod_ipv4(0).to_string();
    let udp = node.flows(&["src=10.52.0.2", "proto=udp"]).unwrap();
    assert_eq!(udp.len(), 1, "{udp:#?}");
    assert_eq!(udp[0]["connection"]["src_ip"], pod0.as_str());
    assert_eq!(udp[0]["connection"]["dest_port"], 7001);
    assert_eq!(udp[0]["path"], "via_gateway");
    let to_7002 = node.flows(&["port=7002"]).unwrap();
    assert_eq!(to_7002.len(), 2, "request and reply: {to_7002:#?}");
    let pod2 = node.flows(&["ip=10.52.0.4"]).unwrap();
    assert!(!pod2.is_empty());
    assert!(
        pod2.iter().all(|f| f["connection"]["src_ip"] == "10.52.0.4"
            || f["connection"]["dest_ip"] == "10.52.0.4")
    );
    let v6 = node.flows(&["dst=fd00:52::3", "proto=icmpv6"]).unwrap();
    assert_eq!(v6.len(), 1, "{v6:#?}");
    assert_eq!(node.flows(&["path=via_gateway"]).unwrap().len(), all.len());
    assert!(node.flows(&["path=exempt"]).unwrap().is_empty());
    assert!(
        node.flows(&["dport=7001", "sport=7001"])
            .unwrap()
            .is_empty(),
        "filters all apply"
    );

    let table = node
        .cli_ok(&["flows", "--sort", "packets", "--filter", "proto=icmp"])
        .unwrap();
    let lines: Vec<&str> = table.lines().collect();
    assert!(
        lines[0].starts_with("SOURCE") && lines[0].contains("PATH"),
        "{table}"
    );
    assert_eq!(
        lines.len(),
        icmp.len() + 2,
        "header, rows, summary:\n{table}"
    );
    assert!(
        lines[1].contains(&pod0) && lines[1].contains("icmp"),
        "{table}"
    );
    assert!(
        lines
            .last()
            .unwrap()
            .starts_with(&format!("{} flows", icmp.len())),
        "{table}"
    );
}

/// `flows --watch` redraws the table in place (clear screen, home) at its interval, for
/// people at a terminal, until interrupted.
#[test]
fn flows_watch_redraws_in_place() {
    use std::io::Read as _;
    let node = started("d-watch", 2);
    node.lab.pod_ns(0).ping(node.lab.pod_ipv4(1), 1).unwrap();
    let mut watch = node.command(&["flows", "--watch", "0.2"]);
    watch
        .stdout(std::process::Stdio::piped())
        .stdin(std::process::Stdio::null());
    let mut child = watch.spawn().unwrap();
    // Generous for a busy machine: five or more redraws are expected, two suffice.
    std::thread::sleep(Duration::from_secs(2));
    child.kill().unwrap();
    child.wait().unwrap();
    let mut screen = String::new();
    child
        .stdout
        .take()
        .unwrap()
        .read_to_string(&mut screen)
        .unwrap();
    let redraws = screen.matches("\x1b[H\x1b[2J").count();
    assert!(
        redraws >= 2,
        "{redraws} redraws in 0.9 s at 0.2 s: {screen:?}"
    );
    assert!(
        screen.contains("SOURCE") && screen.contains(&node.lab.pod_ipv4(1).to_string()),
        "{screen}"
    );
}
