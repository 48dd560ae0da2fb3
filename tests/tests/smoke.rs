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

/// The daemon measures the kernel's tick, and the programs' times, read from jiffies
/// without a helper call, are `CLOCK_MONOTONIC` as userspace reads it (to within the
/// coarse clock's tick). Needs root.
#[test]
fn the_datapath_clock_is_measured_and_keeps_monotonic_time() {
    use aya::programs::{TestRun as _, TestRunOptions};
    use visibility_common::{
        flow::FlowKey,
        packet::IPPROTO_UDP,
        testing::{FrameBuilder, Transport},
    };

    let datapath = visibility_tests::datapath_harness::PinnedDatapath::load("clock").unwrap();
    let maps = datapath.maps().unwrap();
    let clock = maps.clock().unwrap();
    let hz = 1_000_000_000 / clock.ns_per_tick;
    assert!(
        (100..=1000).contains(&hz),
        "a tick of {} ns is no kernel's HZ",
        clock.ns_per_tick
    );

    let monotonic = || {
        let now = nix::time::clock_gettime(nix::time::ClockId::CLOCK_MONOTONIC).unwrap();
        u64::try_from(now.tv_sec()).unwrap() * 1_000_000_000 + u64::try_from(now.tv_nsec()).unwrap()
    };
    // A packet from a Pod to the internet: pod_ingress starts its flow at `now`.
    let (src, dst, port) = ([10, 0, 1, 10], [8, 8, 8, 8], 53);
    let frame = FrameBuilder::ipv4(
        src,
        dst,
        Transport::Udp {
            src_port: 40000,
            dst_port: port,
        },
    )
    .build();
    let before = monotonic();
    datapath
        .program(ProgramKind::PodIngress)
        .test_run(TestRunOptions {
            data_in: Some(&frame),
            repeat: 1,
            ..Default::default()
        })
        .unwrap();
    let after = monotonic();
    let mut key = FlowKey {
        src_port: 40000,
        dst_port: port,
        family: 4,
        protocol: IPPROTO_UDP,
        ..FlowKey::default()
    };
    key.src_addr[..4].copy_from_slice(&src);
    key.dst_addr[..4].copy_from_slice(&dst);
    let flow = maps.flows().get(&key, 0).unwrap();
    // The coarse clock lags by up to a tick; allow one more for the measurement.
    let slack = 2 * clock.ns_per_tick;
    assert!(
        flow.first_seen_ns + slack >= before && flow.first_seen_ns <= after + slack,
        "the flow started at {} ns, between {before} and {after} ns by CLOCK_MONOTONIC",
        flow.first_seen_ns
    );
}
