//! The uplink removed and added again (a new ifindex), then renamed: the daemon notices
//! each from netlink, logs and counts it, attaches `uplink_ingress` to the new
//! interface, points the datapath's gateway at it, and traffic between Pods crosses
//! the gateway again.

use serde_json::Value;
use visibility_tests::{
    lab::{Lab, NODE_UPLINK},
    node::Node,
};

use crate::common::{UdpFlow, WAIT, metric, node_with, wait_for_log, wait_for_metric};

/// Waits until the IPv4 uplink in `status` is `name` with `ifindex`, `uplink_ingress`
/// attached and the gateway resolved.
fn wait_for_uplink(node: &Node, name: &str, ifindex: u32) {
    node.wait_for(WAIT, |status| {
        let uplinks = status["daemon"]["uplinks"].as_array()?;
        let v4 = uplinks.iter().find(|u| u["family"] == "v4")?;
        (v4["uplink"] == name
            && v4["ifindex"] == ifindex
            && v4["attached"] == true
            && v4["gateway_mac"] != Value::Null)
            .then_some(())
    })
    .unwrap_or_else(|e| panic!("{e:#}\n{}", node.daemon_log().unwrap_or_default()));
}

/// Datagrams of `flow` cross the gateway: it forwards each one.
fn crosses_the_gateway(lab: &Lab, flow: &UdpFlow) {
    let before = lab.gateway_forwarded_packets().unwrap();
    flow.send(3);
    let forwarded = lab.gateway_forwarded_packets().unwrap() - before;
    assert!(
        forwarded >= 3,
        "the gateway forwarded {forwarded} of 3 datagrams"
    );
}

#[test]
fn a_removed_re_added_and_renamed_uplink_is_followed() {
    let node = node_with("f-uplink", 2, &[]);
    let lab = &node.lab;
    let flow = UdpFlow::open(lab, 0, 1, 7401);
    crosses_the_gateway(lab, &flow);
    let first = lab.node_uplink_ifindex().unwrap();

    lab.remove_uplink().unwrap();
    wait_for_log(&node, "uplink gone");
    // One change per family: IPv4 and IPv6 leave through the same uplink.
    wait_for_metric(&node, "visibility_uplink_changes_total", 2);
    lab.add_uplink().unwrap();
    let second = lab.node_uplink_ifindex().unwrap();
    assert_ne!(first, second, "a new interface");
    wait_for_uplink(&node, NODE_UPLINK, second);
    wait_for_log(&node, "uplink back");
    // Each family comes back once (their routes may come a moment apart).
    wait_for_metric(&node, "visibility_uplink_changes_total", 4);
    assert_eq!(metric(&node, "visibility_uplink_changes_total"), 4);
    crosses_the_gateway(lab, &flow);

    lab.rename_uplink("uplink9").unwrap();
    wait_for_uplink(&node, "uplink9", second);
    // Renamed while down: the daemon saw the new name at once ("uplink changed"), or
    // the uplink go and come back under it.
    wait_for_log(&node, "=uplink9");
    wait_for_metric(&node, "visibility_uplink_changes_total", 6);
    crosses_the_gateway(lab, &flow);
}
