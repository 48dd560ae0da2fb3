//! The smallest real thing: the embedded eBPF object loads, one TC program attaches to
//! a veth in a network namespace this test creates, and a packet is counted. Needs root.

use visibility::{
    datapath::{AttachMode, Datapath, LoadOptions, ProgramKind},
    maps::Maps,
};
use visibility_common::verdict::Hook;
use visibility_tests::{
    datapath_harness::{PinDirGuard, unique_pin_path},
    lab::{Lab, LabConfig, POD_GATEWAY_V4},
};

#[test]
fn a_program_attaches_to_a_veth_and_counts_a_packet() {
    let lab = Lab::new(
        "smoke",
        LabConfig {
            pods: 1,
            ..LabConfig::default()
        },
    )
    .unwrap();
    let guard = PinDirGuard::new(unique_pin_path("smoke"));
    let (mut datapath, _) = Datapath::open(guard.path(), &LoadOptions::default()).unwrap();
    let veth = lab.pod_host_ifname(0).to_owned();
    let ifindex = lab.pod_host_ifindex(0);
    // Interface names resolve in the calling thread's namespace: attach from the node's.
    lab.node()
        .in_ns(|| datapath.attach(&veth, ifindex, ProgramKind::PodIngress))
        .unwrap()
        .unwrap();
    assert!(datapath.is_attached(ifindex, ProgramKind::PodIngress));
    println!(
        "attached {} to {veth} with {}",
        ProgramKind::PodIngress.name(),
        AttachMode::current().name()
    );

    let seen = || -> u64 {
        let maps = Maps::open(datapath.pins()).unwrap();
        maps.counters()
            .unwrap()
            .iter()
            .filter(|(hook, _, _)| *hook == Hook::PodIngress)
            .map(|(_, _, v)| v.packets)
            .sum()
    };
    let before = seen();
    // The Pod pings its gateway, an address of the node: the program sees and passes it.
    lab.pod_ns(0).ping(POD_GATEWAY_V4, 1).unwrap();
    assert!(seen() > before, "the program counted nothing");

    lab.node()
        .in_ns(|| datapath.detach(Some(&veth), ifindex, ProgramKind::PodIngress))
        .unwrap()
        .unwrap();
    assert!(!datapath.is_attached(ifindex, ProgramKind::PodIngress));
}

/// Prints how many instructions the verifier walked for each program (the load's cost,
/// which the VM tier's emulated CPU feels most). Run with `--nocapture`.
#[test]
fn verifier_cost_is_reported() {
    use visibility::datapath::ProgramKind;
    let datapath = visibility_tests::datapath_harness::PinnedDatapath::load("verifcost").unwrap();
    for kind in ProgramKind::ALL {
        let info = datapath.program(kind).info().unwrap();
        let count = info.verified_instruction_count().unwrap_or(0);
        eprintln!("{}: {count} instructions verified", kind.name());
        assert!(count > 0);
    }
}
