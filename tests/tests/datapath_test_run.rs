//! The datapath's programs run with `BPF_PROG_TEST_RUN` on frames built here, in a
//! lab node's namespace (its routes and neighbours answer the FIB lookups): verdicts,
//! rewritten headers, counters and flows.
//!
//! Needs root (network namespaces, bpffs, loading BPF programs).

use std::net::IpAddr;

use visibility::datapath::ProgramKind;
use visibility_common::{
    counters::Counter,
    flow::FlowKey,
    packet::{ETH_HLEN, IPPROTO_UDP, parse},
    testing::{FrameBuilder, Transport, checksum},
    verdict::Hook,
};
use visibility_tests::{
    datapath_harness::{
        DatapathLab, RunOutput, SkbCtx, TC_ACT_REDIRECT, TC_ACT_SHOT, TC_ACT_UNSPEC,
    },
    lab::{IpFamily, NODE_IPV4, NODE_IPV6, NODE_UPLINK, pod_ipv4, pod_ipv6},
};

const FAMILIES: [IpFamily; 2] = [IpFamily::V4, IpFamily::V6];
const SRC: usize = 0;
const DST: usize = 1;
const OTHER: usize = 2;
const SRC_PORT: u16 = 40000;
const DST_PORT: u16 = 9000;
const FRAGMENT_HEADER: u8 = 44;

/// A lab whose three Pods are registered and resolved, as the daemon has them.
fn setup(tag: &str) -> DatapathLab {
    let mut h = DatapathLab::new(tag).expect("setting up a lab with the datapath (root needed)");
    for pod in [SRC, DST, OTHER] {
        h.set_pod_neighbours(pod, true).unwrap();
        let veth = h.host_veth(pod);
        h.maps.add_pod_iface(veth, true, veth).unwrap();
    }
    h
}

fn pod_ip(pod: usize, family: IpFamily) -> IpAddr {
    match family {
        IpFamily::V4 => pod_ipv4(pod).into(),
        IpFamily::V6 => pod_ipv6(pod).into(),
    }
}

fn builder(family: IpFamily, from: usize, to: usize, transport: Transport) -> FrameBuilder {
    match (pod_ip(from, family), pod_ip(to, family)) {
        (IpAddr::V4(s), IpAddr::V4(d)) => FrameBuilder::ipv4(s.octets(), d.octets(), transport),
        (IpAddr::V6(s), IpAddr::V6(d)) => FrameBuilder::ipv6(s.octets(), d.octets(), transport),
        _ => unreachable!("one family"),
    }
}

fn udp() -> Transport {
    Transport::Udp {
        src_port: SRC_PORT,
        dst_port: DST_PORT,
    }
}

/// Which fragment of a datagram.
#[derive(Clone, Copy, Debug)]
enum Part {
    First,
    Middle,
    Last,
}

/// One fragment of a UDP datagram from `from` to `to` with identification `id`: the
/// first carries the UDP header, the others only payload at offsets 1480 and 2960.
fn fragment(family: IpFamily, from: usize, to: usize, part: Part, id: u16) -> Vec<u8> {
    let (transport, offset, more) = match part {
        Part::First => (udp(), 0u16, true),
        Part::Middle => (
            Transport::Raw {
                protocol: IPPROTO_UDP,
            },
            1480 / 8,
            true,
        ),
        Part::Last => (
            Transport::Raw {
                protocol: IPPROTO_UDP,
            },
            2960 / 8,
            false,
        ),
    };
    let mut b = builder(family, from, to, transport).payload(&[0x5a; 64]);
    let offset_flags = offset << 3 | u16::from(more);
    match family {
        IpFamily::V4 => {
            let mut frame = b.build();
            let flags = offset | if more { 0x2000 } else { 0 };
            frame[ETH_HLEN + 4..ETH_HLEN + 6].copy_from_slice(&id.to_be_bytes());
            frame[ETH_HLEN + 6..ETH_HLEN + 8].copy_from_slice(&flags.to_be_bytes());
            frame[ETH_HLEN + 10..ETH_HLEN + 12].copy_from_slice(&[0, 0]);
            let sum = checksum(&[&frame[ETH_HLEN..ETH_HLEN + 20]]);
            frame[ETH_HLEN + 10..ETH_HLEN + 12].copy_from_slice(&sum.to_be_bytes());
            frame
        }
        IpFamily::V6 => {
            let mut body = offset_flags.to_be_bytes().to_vec();
            body.extend_from_slice(&u32::from(id).to_be_bytes());
            b.ipv6_extensions = vec![(FRAGMENT_HEADER, body)];
            b.build()
        }
    }
}

/// What `pod_egress` on `DST`'s veth sees of a packet that entered on `from`'s veth.
fn forwarded(h: &DatapathLab, from: usize) -> SkbCtx {
    h.pod_egress_ctx(DST, h.host_veth(from))
}

/// The frame as it comes back from the gateway: its MACs, one hop less.
fn returned(h: &DatapathLab, sent: &RunOutput) -> Vec<u8> {
    let mut frame = sent.data.clone();
    frame[..6].copy_from_slice(&h.uplink_mac());
    frame[6..12].copy_from_slice(&h.gateway_mac());
    let packet = parse(&frame[..], frame.len()).expect("a parsable frame");
    match packet.family {
        visibility_common::packet::Family::V4 => {
            frame[ETH_HLEN + 8] -= 1;
            frame[ETH_HLEN + 10..ETH_HLEN + 12].copy_from_slice(&[0, 0]);
            let len = usize::from(frame[ETH_HLEN] & 0x0f) * 4;
            let sum = checksum(&[&frame[ETH_HLEN..ETH_HLEN + len]]);
            frame[ETH_HLEN + 10..ETH_HLEN + 12].copy_from_slice(&sum.to_be_bytes());
        }
        visibility_common::packet::Family::V6 => frame[ETH_HLEN + 7] -= 1,
    }
    frame
}

fn flow_key(family: IpFamily) -> FlowKey {
    let frame = builder(family, SRC, DST, udp()).build();
    FlowKey::from_packet(&parse(&frame[..], frame.len()).unwrap())
}

/// Every fragment of a datagram takes the first fragment's path, to the gateway and
/// back, and is counted in the datagram's flow: first, middle and last, IPv4 and IPv6.
#[test]
fn fragments_take_their_first_fragments_path() {
    let h = setup("frags");
    for family in FAMILIES {
        let id = 0x4321;
        let mut sent = Vec::new();
        for part in [Part::First, Part::Middle, Part::Last] {
            let frame = fragment(family, SRC, DST, part, id);
            let before = h.counters().unwrap();
            let out = h
                .run(ProgramKind::PodEgress, &frame, forwarded(&h, SRC))
                .unwrap();
            assert_eq!(out.return_value, TC_ACT_REDIRECT, "{family:?} {part:?}");
            let moved = h.counters().unwrap().since(&before);
            assert_eq!(
                moved
                    .iter()
                    .map(|(hook, c, _)| (*hook, *c))
                    .collect::<Vec<_>>(),
                [(Hook::PodEgress, Counter::RedirectedToGateway)],
                "{family:?} {part:?}"
            );
            sent.push(out);
        }
        let flow = h
            .flow(&flow_key(family))
            .unwrap()
            .expect("the datagram's flow");
        assert_eq!(
            flow.packets, 3,
            "{family:?}: all three fragments in one flow"
        );
        // Back from the gateway, in another order: each finds the datagram.
        for out in [&sent[0], &sent[2], &sent[1]] {
            let back = h
                .run(
                    ProgramKind::UplinkIngress,
                    &returned(&h, out),
                    h.uplink_ctx(),
                )
                .unwrap();
            assert_eq!(back.return_value, TC_ACT_REDIRECT, "{family:?}");
        }
        let flow = h.flow(&flow_key(family)).unwrap().unwrap();
        assert_eq!(flow.returned_packets, 3, "{family:?}");
    }
}

/// A later fragment that comes before its first still goes to the gateway (without
/// ports, counted as such), and the datagram's other fragments follow it.
#[test]
fn a_later_fragment_without_its_first_goes_to_the_gateway() {
    let h = setup("fragalone");
    for family in FAMILIES {
        let frame = fragment(family, SRC, DST, Part::Middle, 0x777);
        let before = h.counters().unwrap();
        let out = h
            .run(ProgramKind::PodEgress, &frame, forwarded(&h, SRC))
            .unwrap();
        assert_eq!(out.return_value, TC_ACT_REDIRECT, "{family:?}");
        let after = h.counters().unwrap();
        assert_eq!(
            after
                .get(Hook::PodEgress, Counter::FragmentWithoutFirst)
                .packets
                - before
                    .get(Hook::PodEgress, Counter::FragmentWithoutFirst)
                    .packets,
            1,
            "{family:?}"
        );
        let last = fragment(family, SRC, DST, Part::Last, 0x777);
        let out = h
            .run(ProgramKind::PodEgress, &last, forwarded(&h, SRC))
            .unwrap();
        assert_eq!(out.return_value, TC_ACT_REDIRECT, "{family:?}");
    }
}

/// A packet from a Pod's veth whose source is another Pod's address is never sent to
/// the gateway in that Pod's name: it is passed (the node's stack has judged it) and
/// counted.
#[test]
fn a_spoofed_source_is_not_sent_to_the_gateway() {
    let h = setup("spoof");
    for family in FAMILIES {
        let frame = builder(family, OTHER, DST, udp()).build();
        let before = h.counters().unwrap();
        let out = h
            .run(ProgramKind::PodEgress, &frame, forwarded(&h, SRC))
            .unwrap();
        assert_eq!(out.return_value, TC_ACT_UNSPEC, "{family:?}");
        assert_eq!(out.data, frame, "{family:?}: passed unchanged");
        let moved = h.counters().unwrap().since(&before);
        assert_eq!(
            moved
                .iter()
                .map(|(hook, c, _)| (*hook, *c))
                .collect::<Vec<_>>(),
            [(Hook::PodEgress, Counter::PassSpoofedSource)],
            "{family:?}"
        );
        // The same packet from the Pod that owns the source goes to the gateway.
        let out = h
            .run(ProgramKind::PodEgress, &frame, forwarded(&h, OTHER))
            .unwrap();
        assert_eq!(out.return_value, TC_ACT_REDIRECT, "{family:?}");
    }
}

/// What the uplink receives with Pod addresses but that the datapath never sent goes
/// to the node's stack (rp_filter and the node's filter judge it), as does what it
/// sent once visibility is no longer on, after the return window.
#[test]
fn the_uplink_hands_on_only_what_was_sent() {
    let h = setup("unsent");
    for family in FAMILIES {
        let mut b = builder(family, SRC, DST, udp()).ttl(62);
        b.src_mac = h.gateway_mac();
        b.dst_mac = h.uplink_mac();
        let frame = b.build();
        let before = h.counters().unwrap();
        let out = h
            .run(ProgramKind::UplinkIngress, &frame, h.uplink_ctx())
            .unwrap();
        assert_eq!(out.return_value, TC_ACT_UNSPEC, "{family:?}");
        assert_eq!(out.data, frame, "{family:?}");
        let moved = h.counters().unwrap().since(&before);
        assert_eq!(
            moved
                .iter()
                .map(|(hook, c, _)| (*hook, *c))
                .collect::<Vec<_>>(),
            [(Hook::Uplink, Counter::PassUnsentPodToPod)],
            "{family:?}"
        );
    }
}

/// Every packet `pod_ingress` sees goes on unchanged, with `TC_ACT_UNSPEC`, so that a
/// program attached after it on the hook sees it too.
#[test]
fn pod_ingress_only_counts_and_hands_packets_on() {
    let h = setup("ingress");
    for family in FAMILIES {
        let frame = builder(family, SRC, DST, udp()).build();
        let out = h
            .run(ProgramKind::PodIngress, &frame, h.pod_ingress_ctx(SRC))
            .unwrap();
        assert_eq!(out.return_value, TC_ACT_UNSPEC, "{family:?}");
        assert_eq!(out.data, frame, "{family:?}");
        assert_eq!(
            h.counter(Hook::PodIngress, Counter::PassPodToPod)
                .unwrap()
                .packets
                % 2,
            if family == IpFamily::V4 { 1 } else { 0 }
        );
    }
}

/// A packet larger than the uplink's MTU is never sent oversize, nor delivered: the
/// sender gets ICMP "fragmentation needed" (IPv4) or "packet too big" (IPv6) from the
/// node, with the MTU, quoting the packet's head.
#[test]
fn an_oversize_packet_gets_icmp_too_big() {
    let h = setup("toobig");
    h.lab()
        .node()
        .run("ip", ["link", "set", "dev", NODE_UPLINK, "mtu", "1400"])
        .unwrap();
    for family in FAMILIES {
        let frame = builder(family, SRC, DST, udp())
            .payload(&[0x42; 1430])
            .build();
        let out = h
            .run(ProgramKind::PodEgress, &frame, forwarded(&h, SRC))
            .unwrap();
        assert_eq!(
            out.return_value, TC_ACT_REDIRECT,
            "{family:?}: the error goes back"
        );
        assert_eq!(
            h.counter(Hook::PodEgress, Counter::DroppedTooBig)
                .unwrap()
                .packets,
            if family == IpFamily::V4 { 1 } else { 2 }
        );
        let error = &out.data;
        assert_eq!(
            &error[..6],
            &h.pod_mac(SRC).unwrap(),
            "{family:?}: to the sender"
        );
        let l3 = &error[ETH_HLEN..];
        match family {
            IpFamily::V4 => {
                assert_eq!(l3[9], 1, "ICMP");
                assert_eq!(&l3[12..16], &NODE_IPV4.octets(), "from the node");
                assert_eq!(&l3[16..20], &pod_ipv4(SRC).octets(), "to the sender");
                assert_eq!(checksum(&[&l3[..20]]), 0, "IPv4 header checksum");
                let icmp = &l3[20..];
                assert_eq!((icmp[0], icmp[1]), (3, 4), "fragmentation needed");
                assert_eq!(u16::from_be_bytes([icmp[6], icmp[7]]), 1400, "the MTU");
                assert_eq!(checksum(&[icmp]), 0, "ICMP checksum");
                assert_eq!(&icmp[8..28], &frame[ETH_HLEN..ETH_HLEN + 20], "the quote");
            }
            IpFamily::V6 => {
                assert_eq!(l3[6], 58, "ICMPv6");
                assert_eq!(&l3[8..24], &NODE_IPV6.octets(), "from the node");
                assert_eq!(&l3[24..40], &pod_ipv6(SRC).octets(), "to the sender");
                let icmp = &l3[40..];
                assert_eq!((icmp[0], icmp[1]), (2, 0), "packet too big");
                assert_eq!(
                    u32::from_be_bytes([icmp[4], icmp[5], icmp[6], icmp[7]]),
                    1400
                );
                let mut pseudo = l3[8..40].to_vec();
                pseudo.extend_from_slice(&u32::try_from(icmp.len()).unwrap().to_be_bytes());
                pseudo.extend_from_slice(&[0, 0, 0, 58]);
                assert_eq!(checksum(&[&pseudo, icmp]), 0, "ICMPv6 checksum");
                assert_eq!(&icmp[8..48], &frame[ETH_HLEN..ETH_HLEN + 40], "the quote");
            }
        }
    }
}

/// Without a route to the gateway a Pod-to-Pod packet is dropped, never delivered
/// around the gateway.
#[test]
fn no_way_to_the_gateway_drops() {
    let h = setup("nogw");
    h.set_gateway_neighbours(false).unwrap();
    for (family, route) in [(IpFamily::V4, "-4"), (IpFamily::V6, "-6")] {
        h.lab()
            .node()
            .run("ip", [route, "route", "flush", "dev", NODE_UPLINK])
            .unwrap();
        let frame = builder(family, SRC, DST, udp()).build();
        let out = h
            .run(ProgramKind::PodEgress, &frame, forwarded(&h, SRC))
            .unwrap();
        assert_eq!(out.return_value, TC_ACT_SHOT, "{family:?}");
    }
    assert!(
        h.counter(Hook::PodEgress, Counter::DroppedNoGatewayRoute)
            .unwrap()
            .packets
            >= 2
    );
}

/// A packet from a real NIC carries `CHECKSUM_COMPLETE`: the driver's sum of all its
/// bytes. Handing it to a Pod spends a hop; the sum must follow (IPv6 has no header
/// checksum to balance the hop limit's change), or the kernel reports a checksum fault.
/// The kernel checks after the run (`BPF_F_TEST_SKB_CHECKSUM_COMPLETE`, Linux 6.11+).
#[test]
fn a_returning_packet_keeps_checksum_complete_valid() {
    let h = setup("csumcomplete");
    for family in FAMILIES {
        let frame = builder(family, SRC, DST, udp()).build();
        let sent = h
            .run(ProgramKind::PodEgress, &frame, forwarded(&h, SRC))
            .unwrap();
        assert_eq!(sent.return_value, TC_ACT_REDIRECT, "{family:?}");
        let Some(action) = h
            .run_checksum_complete(
                ProgramKind::UplinkIngress,
                &returned(&h, &sent),
                h.uplink_ctx(),
            )
            .unwrap_or_else(|e| panic!("{family:?}: {e:#}"))
        else {
            eprintln!("skipped: this kernel cannot test CHECKSUM_COMPLETE (before 6.11)");
            return;
        };
        assert_eq!(action, TC_ACT_REDIRECT, "{family:?}: delivered");
    }
}
