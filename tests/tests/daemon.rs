//! The real `visibility` binary on a lab node: daemon and CLI. Needs root (network
//! namespaces, bpffs, BPF) and the binary built.

use std::time::Duration;

use visibility_tests::{lab::DEFAULT_TIMEOUT, node::Node};

#[test]
fn pod_to_pod_goes_through_the_gateway() {
    let mut node = Node::new("d-basic", 2).unwrap();
    node.start().unwrap();
    let lab = &node.lab;
    lab.flush_gateway_flows().unwrap();
    lab.pod(0).netns().ping(lab.pod_ipv4(1), 3).unwrap();
    lab.pod(0).netns().ping(lab.pod_ipv6(1), 3).unwrap();
    let flows = lab.gateway_flows().unwrap();
    assert!(flows.iter().any(|f| f.is_between(lab.pod_ipv4(0), lab.pod_ipv4(1))), "{flows:?}");
    assert!(flows.iter().any(|f| f.is_between(lab.pod_ipv6(0), lab.pod_ipv6(1))), "{flows:?}");
    let _ = DEFAULT_TIMEOUT;
    let _ = Duration::from_secs(1);
    println!("{}", node.cli_ok(&["status"]).unwrap());
    println!("{}", node.cli_ok(&["flows"]).unwrap());
}
