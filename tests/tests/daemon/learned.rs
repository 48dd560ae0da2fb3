//! Pod CIDRs the daemon learns from its node (routes to Pod interfaces, the CNI's
//! host-local ranges), a `pod-cidr` override that leaves a family out, and the probes
//! that report it without a restart.

use serde_json::Value;
use visibility_tests::{
    lab::POD_CIDR_V4,
    node::{Node, poll},
    require_root,
};

use crate::common::*;

/// The daemon's default metrics listener, in the node's namespace: the probes' too.
const PROBES: &str = "127.0.0.1:9476";

/// `GET path` on the daemon's listener from inside the node: (HTTP status, body).
fn probe(node: &Node, path: &str) -> (u16, String) {
    let url = format!("http://{PROBES}{path}");
    let out = node
        .lab
        .node()
        .run(
            "curl",
            [
                "--silent",
                "--max-time",
                "5",
                "--write-out",
                "\n%{http_code}",
                &url,
            ],
        )
        .unwrap();
    let (body, code) = out.trim_end().rsplit_once('\n').unwrap();
    (code.parse().unwrap(), body.to_owned())
}

/// Without `--pod-cidr`, the daemon learns both families from its routes to the Pods'
/// veths, exactly their addresses (merged), and follows Pods as they come and go; IPv6
/// Pod-to-Pod traffic crosses the gateway as IPv4 does.
#[test]
fn the_daemon_learns_both_families_from_the_pod_routes_and_follows_pods() {
    require_root();
    let mut node = Node::new("d-learn", 2).unwrap();
    node.start_daemon(learning_args()).unwrap();
    wait_for_pod_cidrs(&node, &["10.52.0.2/31 (routes)", "fd00:52::2/127 (routes)"]);
    let status = node.status().unwrap();
    assert_eq!(status["healthy"], true, "{status}");
    for name in ["pod_cidr_v4", "pod_cidr_v6", "pod_addresses_covered"] {
        assert_eq!(check(&status, name)["ok"], true, "{status}");
    }
    let text = node.cli(&["status"]).unwrap();
    assert!(
        stdout(&text).contains("Pod CIDRs:      10.52.0.2/31 (routes), fd00:52::2/127 (routes)"),
        "{}",
        stdout(&text)
    );

    let lab = &node.lab;
    lab.flush_gateway_flows().unwrap();
    ping_both(lab, 0, 1);
    assert!(gateway_saw(lab, lab.pod_ipv4(0), lab.pod_ipv4(1)));
    assert!(gateway_saw(lab, lab.pod_ipv6(0), lab.pod_ipv6(1)));

    let index = node.lab.add_pod().unwrap();
    assert_eq!(index, 2);
    wait_for_pod_cidrs(
        &node,
        &[
            "10.52.0.2/31 (routes)",
            "10.52.0.4/32 (routes)",
            "fd00:52::2/127 (routes)",
            "fd00:52::4/128 (routes)",
        ],
    );
    node.wait_until_attached(3).unwrap();
    node.lab.flush_gateway_flows().unwrap();
    ping_both(&node.lab, 2, 0);
    assert!(gateway_saw(
        &node.lab,
        node.lab.pod_ipv6(2),
        node.lab.pod_ipv6(0)
    ));

    node.lab.remove_pod(1).unwrap();
    wait_for_pod_cidrs(
        &node,
        &[
            "10.52.0.2/32 (routes)",
            "10.52.0.4/32 (routes)",
            "fd00:52::2/128 (routes)",
            "fd00:52::4/128 (routes)",
        ],
    );
}

/// A host-local range in the CNI configuration is learned as it is, and covers the Pod
/// routes, which then add nothing of their own.
#[test]
fn a_cni_host_local_range_is_learned_and_covers_the_pod_routes() {
    require_root();
    let mut node = Node::new("d-learncni", 2).unwrap();
    let dir = std::env::temp_dir().join(format!("{}-net.d", node.lab.prefix()));
    std::fs::create_dir_all(&dir).unwrap();
    std::fs::write(
        dir.join("10-ptp.conflist"),
        r#"{"cniVersion":"0.3.1","name":"pods","plugins":[{"type":"ptp","ipam":{
            "type":"host-local","ranges":[[{"subnet":"10.52.0.0/24"}],[{"subnet":"fd00:52::/64"}]]}}]}"#,
    )
    .unwrap();
    let started = node.start_daemon(args(&[
        "--reconcile-interval",
        "1",
        "--cni-conf-dir",
        dir.to_str().unwrap(),
    ]));
    let learned = started.map(|()| {
        wait_for_pod_cidrs(&node, &["10.52.0.0/24 (cni)", "fd00:52::/64 (cni)"]);
        node.status().unwrap()
    });
    std::fs::remove_dir_all(&dir).unwrap();
    let status = learned.unwrap();
    assert_eq!(status["healthy"], true, "{status}");
}

/// An override that names only the IPv4 Pod CIDR leaves the Pods' IPv6 traffic on the
/// node: the issue's silent case. Now `status` says so (the family has Pod addresses
/// but no Pod CIDR, and which addresses no CIDR covers), readiness fails with it, and
/// liveness does not: a configuration problem is no reason to restart.
#[test]
fn an_override_without_ipv6_is_reported_and_fails_readiness_not_liveness() {
    require_root();
    let mut node = Node::new("d-learnv6", 2).unwrap();
    node.start_daemon(args(&[
        "--pod-cidr",
        POD_CIDR_V4,
        "--reconcile-interval",
        "1",
    ]))
    .unwrap();
    let status = node
        .wait_for(WAIT, |s| {
            (check_passes(s, "pod_cidr_v6") == Some(false)).then(|| s.clone())
        })
        .unwrap();
    assert_eq!(pod_cidr_sources(&status), ["10.52.0.0/24 (configured)"]);
    let v6 = check(&status, "pod_cidr_v6")["detail"].as_str().unwrap();
    assert!(v6.contains("veth0: fd00:52::2/128"), "{v6}");
    let covered = check(&status, "pod_addresses_covered");
    assert_eq!(covered["ok"], false);
    assert!(
        covered["detail"]
            .as_str()
            .unwrap()
            .contains("veth1: fd00:52::3/128"),
        "{covered}"
    );
    assert_eq!(check(&status, "pod_cidr_v4")["ok"], true);
    assert!(!node.cli(&["status"]).unwrap().status.success());

    let lab = &node.lab;
    lab.flush_gateway_flows().unwrap();
    ping_both(lab, 0, 1);
    assert!(!gateway_saw(lab, lab.pod_ipv6(0), lab.pod_ipv6(1)));

    let (code, body) = probe(&node, "/readyz");
    assert_eq!(code, 503, "{body}");
    assert!(body.contains("pod_cidr_v6"), "{body}");
    let (code, body) = probe(&node, "/healthz");
    assert_eq!(code, 200, "{body}");
    assert!(node.daemon_running());

    // Fixed at runtime, the node is ready again, with the same daemon.
    node.cli_ok(&["pod-cidr", "add", "fd00:52::/64"]).unwrap();
    node.wait_for(WAIT, |s| (s["healthy"] == Value::Bool(true)).then_some(()))
        .unwrap();
    poll(WAIT, "readiness", || {
        Ok((probe(&node, "/readyz").0 == 200).then_some(()))
    })
    .unwrap();
}
