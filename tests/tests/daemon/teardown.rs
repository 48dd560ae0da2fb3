//! `visibility teardown`: no program, link, filter or pin left behind.

use std::collections::BTreeSet;

use serde_json::Value;
use visibility_tests::{
    lab::{IpFamily, NODE_UPLINK},
    node::{Node, poll},
};

use crate::common::*;

/// Program ids of the three pinned programs.
fn pinned_program_ids(node: &Node) -> BTreeSet<u64> {
    ["pod_ingress", "pod_egress", "uplink_ingress"]
        .iter()
        .map(|name| {
            let pin = node.pin_dir.join("programs").join(name);
            let info = node
                .bpftool(&["prog", "show", "pinned", pin.to_str().unwrap()])
                .unwrap();
            assert_eq!(info["name"], *name, "{info}");
            info["id"].as_u64().unwrap()
        })
        .collect()
}

/// What `bpftool net show` lists on the node namespace's interfaces: clsact filters
/// (bpftool before 7.3 shows no TCX links here), as [`Attachment`]s.
fn tc_filters(node: &Node) -> Vec<Attachment> {
    let net = node.bpftool(&["net", "show"]).unwrap();
    net.as_array()
        .into_iter()
        .flatten()
        .flat_map(|section| section["tc"].as_array().cloned().unwrap_or_default())
        .map(|tc| Attachment {
            interface: tc["devname"].as_str().unwrap_or_default().to_owned(),
            direction: if tc["kind"].as_str().unwrap_or_default().contains("egress") {
                "egress"
            } else {
                "ingress"
            },
            // bpftool names a tc filter's program id `id` (`prog_id` is for links).
            program_id: tc["id"].as_u64().unwrap_or_default(),
            program_name: tc["name"].as_str().unwrap_or_default().to_owned(),
        })
        .collect()
}

/// A program attached to an interface of the node.
#[derive(Debug, Clone, PartialEq, Eq, PartialOrd, Ord)]
struct Attachment {
    interface: String,
    direction: &'static str,
    program_id: u64,
    program_name: String,
}

/// Every program attached in the node namespace: TCX links and clsact filters. Kernels
/// before 6.6 have no TCX (`BPF_PROG_QUERY` refuses its attach types): there only clsact
/// filters are looked for.
fn attachments(node: &Node) -> Vec<Attachment> {
    use aya::util::KernelVersion;
    let mut all = tc_filters(node);
    match KernelVersion::current() {
        Ok(version) if version < KernelVersion::new(6, 6, 0) => println!(
            "skipping the TCX query: Linux {version} has no TCX (6.6 and later); clsact filters only"
        ),
        _ => all.extend(
            node.tcx_attachments()
                .unwrap()
                .into_iter()
                .map(|a| Attachment {
                    interface: a.interface,
                    direction: a.direction,
                    program_id: a.program_id.into(),
                    program_name: a.program_name,
                }),
        ),
    }
    all.sort();
    all
}

/// The BPF links (`bpftool link show`, all namespaces) of these programs.
fn links_of(node: &Node, ids: &BTreeSet<u64>) -> Vec<Value> {
    let links = node.bpftool(&["link", "show"]).unwrap();
    links
        .as_array()
        .into_iter()
        .flatten()
        .filter(|l| l["prog_id"].as_u64().is_some_and(|id| ids.contains(&id)))
        .cloned()
        .collect()
}

/// `visibility teardown` (with the daemon killed) removes every program, link and pin:
/// nothing of this test stays loaded or attached, and Pod-to-Pod traffic stays on the
/// node again.
#[test]
fn teardown_leaves_no_programs_links_or_pins() {
    let mut node = started("d-teardown", 2);
    node.lab.flush_gateway_flows().unwrap();
    ping_both(&node.lab, 0, 1);
    assert!(gateway_saw_pods(&node.lab, 0, 1, IpFamily::V4));

    // What this test loaded and attached, to be found gone afterwards.
    let ids = pinned_program_ids(&node);
    assert_eq!(ids.len(), 3);
    let attached = attachments(&node);
    assert!(
        attached.iter().all(|a| ids.contains(&a.program_id)),
        "only ours: {attached:?}"
    );
    let found: Vec<(&str, &str, &str)> = attached
        .iter()
        .map(|a| (a.interface.as_str(), a.direction, a.program_name.as_str()))
        .collect();
    assert_eq!(
        found,
        [
            (NODE_UPLINK, "ingress", "uplink_ingress"),
            ("veth0", "egress", "pod_egress"),
            ("veth0", "ingress", "pod_ingress"),
            ("veth1", "egress", "pod_egress"),
            ("veth1", "ingress", "pod_ingress"),
        ]
    );
    if node.status().unwrap()["daemon"]["attach_mode"] == "tcx" {
        assert_eq!(
            links_of(&node, &ids).len(),
            5,
            "one pinned link per attachment"
        );
    }

    node.kill_daemon().unwrap();
    let out = node.cli_ok(&["teardown"]).unwrap();
    assert!(out.contains("removed 5 attachments"), "{out}");
    assert!(!node.pin_dir.exists(), "the pin directory is gone");
    assert!(!visibility::state::state_dir(&node.pin_dir).exists());
    assert_eq!(
        attachments(&node),
        vec![],
        "nothing attached in the node namespace"
    );
    assert_eq!(
        links_of(&node, &ids),
        Vec::<Value>::new(),
        "no links of our programs"
    );
    poll(WAIT, "the programs to be unloaded", || {
        let progs = node.bpftool(&["prog", "show"])?;
        let left: Vec<_> = progs
            .as_array()
            .into_iter()
            .flatten()
            .filter(|p| p["id"].as_u64().is_some_and(|id| ids.contains(&id)))
            .cloned()
            .collect();
        Ok(left.is_empty().then_some(()))
    })
    .unwrap();

    let forwarded = node.lab.gateway_forwarded_packets().unwrap();
    node.lab.flush_gateway_flows().unwrap();
    ping_both(&node.lab, 0, 1);
    assert!(!gateway_saw_pods(&node.lab, 0, 1, IpFamily::V4));
    assert!(!gateway_saw_pods(&node.lab, 0, 1, IpFamily::V6));
    assert_eq!(node.lab.gateway_forwarded_packets().unwrap(), forwarded);

    let status = node.cli(&["status"]).unwrap();
    assert!(!status.status.success());
    let out = node.cli_ok(&["teardown"]).unwrap();
    assert!(
        out.contains("nothing to remove"),
        "a second teardown: {out}"
    );
}
