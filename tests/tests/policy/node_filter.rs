//! The node's own filter (NetworkPolicy in `filter FORWARD`, iptables-nft or native
//! nftables, ingress or egress) judges same-node Pod traffic with visibility off, on and
//! disabled, and a packet injected on the uplink with a Pod source meets it.

use visibility_common::counters::Counter;
use visibility_tests::require_root;
use visibility_tests::{
    lab::{IpFamily, Lab, NODE_UPLINK, Netns},
    node::Node,
};

use crate::common::*;

/// How the node enforces a policy, as NetworkPolicy engines do in `filter FORWARD`.
#[derive(Clone, Copy, Debug)]
enum Engine {
    /// `iptables`/`ip6tables` (the nf_tables backend), as Calico's iptables mode.
    IptablesNft,
    /// A native nftables table, as kube-router's nftables mode and others.
    Nftables,
}

/// Which Pod's policy the rule stands for.
#[derive(Clone, Copy, Debug)]
enum Policy {
    /// The receiver's ingress policy: `-o <veth of the receiver>` (Calico's
    /// `cali-to-wl-dispatch`).
    Ingress,
    /// The sender's egress policy: `-i <veth of the sender>` (Calico's
    /// `cali-from-wl-dispatch`).
    Egress,
}

/// A node rule that drops TCP from Pod 0 to Pod 1 port [`PORT`]; removed on drop.
struct NodeRule<'a> {
    node: &'a Netns,
    engine: Engine,
    family: IpFamily,
    delete: Vec<String>,
}

impl<'a> NodeRule<'a> {
    fn add(lab: &'a Lab, engine: Engine, policy: Policy, family: IpFamily) -> Self {
        let node = lab.node();
        let (src, dst) = (lab.pod_ip(0, family), lab.pod_ip(1, family));
        let (iface_flag, iface) = match policy {
            Policy::Ingress => ("-o", lab.pod_host_ifname(1)),
            Policy::Egress => ("-i", lab.pod_host_ifname(0)),
        };
        let port = PORT.to_string();
        match engine {
            Engine::IptablesNft => {
                let rule: Vec<String> = [
                    "FORWARD",
                    iface_flag,
                    iface,
                    "-s",
                    &src.to_string(),
                    "-d",
                    &dst.to_string(),
                    "-p",
                    "tcp",
                    "--dport",
                    &port,
                    "-j",
                    "DROP",
                ]
                .map(String::from)
                .to_vec();
                let tool = iptables(family);
                let mut insert = vec!["-w".to_string(), "-I".to_string()];
                insert.extend(rule.iter().cloned());
                node.run(tool, &insert).expect("adding the iptables rule");
                let mut delete = vec!["-w".to_string(), "-D".to_string()];
                delete.extend(rule);
                Self {
                    node,
                    engine,
                    family,
                    delete,
                }
            }
            Engine::Nftables => {
                let (ip, iface_key) = match (family, policy) {
                    (IpFamily::V4, Policy::Ingress) => ("ip", "oifname"),
                    (IpFamily::V4, Policy::Egress) => ("ip", "iifname"),
                    (IpFamily::V6, Policy::Ingress) => ("ip6", "oifname"),
                    (IpFamily::V6, Policy::Egress) => ("ip6", "iifname"),
                };
                let ruleset = format!(
                    "table inet vispolicy {{\n chain forward {{\n type filter hook forward priority filter; policy accept;\n \
                     {iface_key} \"{iface}\" {ip} saddr {src} {ip} daddr {dst} tcp dport {PORT} drop\n }}\n}}\n"
                );
                node.run_with_stdin("nft", ["-f", "-"], &ruleset)
                    .expect("adding the nftables rule");
                Self {
                    node,
                    engine,
                    family,
                    delete: ["delete", "table", "inet", "vispolicy"]
                        .map(String::from)
                        .to_vec(),
                }
            }
        }
    }
}

impl Drop for NodeRule<'_> {
    fn drop(&mut self) {
        let result = match self.engine {
            Engine::IptablesNft => self.node.run(iptables(self.family), &self.delete),
            Engine::Nftables => self.node.run("nft", &self.delete),
        };
        if let Err(e) = result {
            eprintln!("removing the node rule: {e:#}");
        }
    }
}

fn iptables(family: IpFamily) -> &'static str {
    match family {
        IpFamily::V4 => "iptables",
        IpFamily::V6 => "ip6tables",
    }
}

/// Each node rule (ingress and egress policy, iptables-nft and nftables) stops the
/// request, and removing it lets the request through again.
fn assert_node_rules_apply(lab: &Lab, family: IpFamily, mode: &str) {
    for engine in [Engine::IptablesNft, Engine::Nftables] {
        for policy in [Policy::Ingress, Policy::Egress] {
            let what = format!("{mode}, {engine:?} {policy:?} policy, {family:?}");
            {
                let _rule = NodeRule::add(lab, engine, policy, family);
                assert!(
                    !tcp_works(lab, 0, 1, family, BLOCKED),
                    "{what}: the request got past the node's rule"
                );
            }
            assert!(
                tcp_works(lab, 0, 1, family, WORKS),
                "{what}: rule removed, request fails"
            );
        }
    }
}

/// The node's filter judges same-node Pod-to-Pod traffic the same with visibility off,
/// on, and disabled at runtime.
fn node_filter_applies_in_every_mode(family: IpFamily) {
    require_root();
    let mut node = Node::new(&tag("pnode", family), 2).expect("lab node");
    let lab_ready = |node: &Node| assert!(tcp_works(&node.lab, 0, 1, family, WORKS));
    lab_ready(&node);
    assert_node_rules_apply(&node.lab, family, "visibility off (no datapath)");

    node.start().expect("starting the daemon");
    node.lab.flush_gateway_flows().unwrap();
    lab_ready(&node);
    assert!(
        gateway_saw_pair(&node.lab, family),
        "visibility on: the gateway is in the path"
    );
    assert_node_rules_apply(&node.lab, family, "visibility on");

    node.cli_ok(&["disable"]).unwrap();
    assert_node_rules_apply(&node.lab, family, "visibility disabled at runtime");
}

#[test]
fn node_filter_applies_in_every_mode_ipv4() {
    node_filter_applies_in_every_mode(IpFamily::V4);
}

#[test]
fn node_filter_applies_in_every_mode_ipv6() {
    node_filter_applies_in_every_mode(IpFamily::V6);
}

/// A packet that arrives on the uplink with a Pod source, which the datapath never
/// sent, goes to the node's stack: a node rule that drops such packets stops it, and it
/// is counted.
#[test]
fn a_packet_injected_on_the_uplink_meets_the_node_filter() {
    require_root();
    for family in FAMILIES {
        let node = started("pinject", family);
        let lab = &node.lab;
        let claimed = lab.pod_ip(0, family);
        // The node's filter: nothing from the uplink may claim a Pod source.
        let ruleset = format!(
            "table inet visinject {{\n chain forward {{\n type filter hook forward priority filter; policy accept;\n \
             iifname \"{NODE_UPLINK}\" {} saddr {claimed} counter drop\n }}\n}}\n",
            if family == IpFamily::V4 { "ip" } else { "ip6" }
        );
        lab.node()
            .run_with_stdin("nft", ["-f", "-"], &ruleset)
            .unwrap();
        // The gateway sends with Pod 0's address, which it takes as a local one.
        let (received, counted) = borrowed_send(
            &node,
            (lab.gateway(), "lo"),
            claimed,
            b"injected",
            BLOCKED,
            ("uplink_ingress", Counter::PassUnsentPodToPod),
        );
        assert_eq!(
            received, 0,
            "{family:?}: the injected packet reached the Pod"
        );
        assert!(
            counted > 0,
            "{family:?}: counted as an unsent Pod-to-Pod packet"
        );
        // IPv4: the node's strict rp_filter drops it before FORWARD (the source routes
        // to a Pod's veth, not the uplink). IPv6 has no rp_filter: the rule judged it.
        if family == IpFamily::V6 {
            let rule = lab
                .node()
                .run("nft", ["list", "table", "inet", "visinject"])
                .unwrap();
            assert!(
                !rule.contains("packets 0 "),
                "{family:?}: the node's rule judged it: {rule}"
            );
        }
    }
}
