//! Pod interfaces made and deleted in bursts while the daemon runs, with its slow
//! reconcile held off: every Pod is attached and everything is cleaned up after the
//! deleted ones from netlink events alone. (The `churn` benchmark does the same with 500
//! interfaces and reports the time and the daemon's CPU and memory.)

use visibility_tests::{
    churn::{Churn, daemon_args, wait_until_cleaned_up},
    node::Node,
    require_root,
};

use crate::common::*;

/// How many Pods a burst makes and deletes at once, and how many bursts.
const BURST: usize = 20;
const BURSTS: usize = 3;

/// 60 Pod interfaces in three bursts, each made, attached and deleted, the next made
/// while the daemon still cleans up after the last: all attached, nothing left behind.
#[test]
fn bursts_of_pods_are_all_attached_and_leave_nothing_behind() {
    require_root();
    let mut node = Node::new("d-churn", 2).expect("building the lab");
    node.capture_daemon_log();
    node.start_daemon(daemon_args()).unwrap();
    let lab_pods = node.lab.pod_count();
    let mut churn = Churn::new(&node.lab, BURST).unwrap();
    for _ in 0..BURSTS {
        let pods = churn.add_burst().unwrap();
        node.wait_until_attached(lab_pods + BURST).unwrap();
        let status = node.status().unwrap();
        let listed = status["daemon"]["pod_interfaces"].as_array().unwrap();
        for pod in &pods {
            assert!(
                listed
                    .iter()
                    .any(|p| p["ifindex"] == pod.ifindex && p["attached"] == true),
                "{} not attached: {status}",
                pod.name
            );
        }
        churn.remove(&pods).unwrap();
    }
    wait_until_cleaned_up(&node, WAIT).unwrap();
    node.wait_until_attached(lab_pods).unwrap();
}
