//! The gateway's MAC changing mid-flow, as in a failover: the gateway takes a new MAC
//! and announces it (gratuitous ARP and unsolicited NA, `arp_notify` and
//! `ndisc_notify`, as a router that takes over an address does). The node's neighbour entry follows, and so does the datapath within
//! its route cache's 100 ms: the running flow reaches the gateway at its new MAC. The
//! daemon logs and counts the change.

use std::time::Duration;

use visibility_common::ROUTE_CACHE_TTL_NS;
use visibility_tests::{
    lab::{GATEWAY_IFNAME, GATEWAY_IPV4, Lab, NODE_UPLINK},
    node::poll,
};

use crate::common::{UdpFlow, WAIT, metric, node_with, wait_for_log, wait_for_metric};

/// The MAC the gateway takes over with.
const NEW_MAC: &str = "02:00:5e:00:01:42";

/// The node's neighbour entry of the IPv4 gateway: its MAC, if it has one.
fn neighbour_mac(lab: &Lab) -> Option<String> {
    let out = lab
        .node()
        .run(
            "ip",
            [
                "-j",
                "neigh",
                "show",
                &GATEWAY_IPV4.to_string(),
                "dev",
                NODE_UPLINK,
            ],
        )
        .unwrap();
    let entries: serde_json::Value = serde_json::from_str(&out).unwrap();
    entries[0]["lladdr"].as_str().map(str::to_owned)
}

#[test]
fn a_gateway_mac_change_mid_flow_is_followed() {
    let node = node_with("f-gwmac", 2, &[]);
    let lab = &node.lab;
    lab.gateway()
        .sysctl(&[
            ("net.ipv4.conf.eth0.arp_notify", "1"),
            ("net.ipv6.conf.eth0.ndisc_notify", "1"),
        ])
        .unwrap();
    let flow = UdpFlow::open(lab, 0, 1, 7501);
    flow.send(5);
    let old = neighbour_mac(lab).expect("the gateway resolved");
    assert_ne!(old, NEW_MAC);

    let forwarded = lab.gateway_forwarded_packets().unwrap();
    lab.gateway()
        .run("ip", ["link", "set", GATEWAY_IFNAME, "address", NEW_MAC])
        .unwrap();
    poll(
        WAIT,
        "the node's neighbour entry to take the new MAC",
        || Ok((neighbour_mac(lab).as_deref() == Some(NEW_MAC)).then_some(())),
    )
    .unwrap();
    // Every CPU's cached answer is stale by now.
    std::thread::sleep(Duration::from_nanos(2 * ROUTE_CACHE_TTL_NS));
    flow.send(5);
    assert!(
        lab.gateway_forwarded_packets().unwrap() >= forwarded + 5,
        "the flow's datagrams reached the gateway at its new MAC"
    );

    // One change per family: the gateway announced its MAC for both addresses.
    wait_for_metric(&node, "visibility_gateway_mac_changes_total", 2);
    wait_for_log(&node, "the gateway's MAC changed");
    wait_for_log(&node, NEW_MAC);
    assert_eq!(metric(&node, "visibility_gateway_mac_changes_total"), 2);
    node.wait_for(WAIT, |status| {
        let uplinks = status["daemon"]["uplinks"].as_array()?;
        uplinks
            .iter()
            .any(|u| u["family"] == "v4" && u["gateway_mac"] == NEW_MAC)
            .then_some(())
    })
    .unwrap();
}
