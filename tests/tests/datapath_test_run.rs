//! The datapath's programs run with `BPF_PROG_TEST_RUN` on frames built here, in a
//! lab node's namespace (its routes and neighbours answer the FIB lookups): verdicts,
//! rewritten headers, counters and flows.
//!
//! Needs root (network namespaces, bpffs, loading BPF programs).

use std::{net::IpAddr, time::Duration};

use visibility::datapath::ProgramKind;
use visibility_common::{
    ROUTE_CACHE_TTL_NS,
    counters::Counter,
    flow::FlowKey,
    packet::{ETH_HLEN, IPPROTO_FRAGMENT, IPPROTO_UDP, parse},
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

/// A frame from `src` to `dst` (one family).
fn builder_between(src: IpAddr, dst: IpAddr, transport: Transport) -> FrameBuilder {
    match (src, dst) {
        (IpAddr::V4(s), IpAddr::V4(d)) => FrameBuilder::ipv4(s.octets(), d.octets(), transport),
        (IpAddr::V6(s), IpAddr::V6(d)) => FrameBuilder::ipv6(s.octets(), d.octets(), transport),
        _ => unreachable!("one family"),
    }
}

fn builder(family: IpFamily, from: usize, to: usize, transport: Transport) -> FrameBuilder {
    builder_between(pod_ip(from, family), pod_ip(to, family), transport)
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
            b.ipv6_extensions = vec![(IPPROTO_FRAGMENT, body)];
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
fn fragments_take_their_first_fragments_path(h: &DatapathLab) {
    for family in FAMILIES {
        let id = 0x4321;
        let mut sent = Vec::new();
        for part in [Part::First, Part::Middle, Part::Last] {
            let frame = fragment(family, SRC, DST, part, id);
            let (out, moved) = h
                .run_counted(ProgramKind::PodEgress, &frame, forwarded(h, SRC))
                .unwrap();
            assert_eq!(out.return_value, TC_ACT_REDIRECT, "{family:?} {part:?}");
            assert_eq!(
                moved,
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
                    &returned(h, out),
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
fn a_later_fragment_without_its_first_goes_to_the_gateway(h: &DatapathLab) {
    for family in FAMILIES {
        let frame = fragment(family, SRC, DST, Part::Middle, 0x777);
        let before = h.counters().unwrap();
        let out = h
            .run(ProgramKind::PodEgress, &frame, forwarded(h, SRC))
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
            .run(ProgramKind::PodEgress, &last, forwarded(h, SRC))
            .unwrap();
        assert_eq!(out.return_value, TC_ACT_REDIRECT, "{family:?}");
    }
}

/// A packet from a Pod's veth whose source is another Pod's address is never sent to
/// the gateway in that Pod's name: it is passed (the node's stack has judged it) and
/// counted.
fn a_spoofed_source_is_not_sent_to_the_gateway(h: &DatapathLab) {
    for family in FAMILIES {
        let frame = builder(family, OTHER, DST, udp()).build();
        let (out, moved) = h
            .run_counted(ProgramKind::PodEgress, &frame, forwarded(h, SRC))
            .unwrap();
        assert_eq!(out.return_value, TC_ACT_UNSPEC, "{family:?}");
        assert_eq!(out.data, frame, "{family:?}: passed unchanged");
        assert_eq!(
            moved,
            [(Hook::PodEgress, Counter::PassSpoofedSource)],
            "{family:?}"
        );
        // The same packet from the Pod that owns the source goes to the gateway.
        let out = h
            .run(ProgramKind::PodEgress, &frame, forwarded(h, OTHER))
            .unwrap();
        assert_eq!(out.return_value, TC_ACT_REDIRECT, "{family:?}");
        // Its flow is now judged, which spares the owner's next packets the lookups;
        // a copy from another Pod's veth, under the same flow key, is judged anew and
        // stays, and the owner's packets still go out after it.
        for (from, action) in [(SRC, TC_ACT_UNSPEC), (OTHER, TC_ACT_REDIRECT)] {
            let out = h
                .run(ProgramKind::PodEgress, &frame, forwarded(h, from))
                .unwrap();
            assert_eq!(out.return_value, action, "{family:?}: after a judged flow");
        }
    }
}

/// What the uplink receives with Pod addresses but that the datapath never sent goes
/// to the node's stack (rp_filter and the node's filter judge it), as does what it
/// sent once visibility is no longer on, after the return window.
fn the_uplink_hands_on_only_what_was_sent(h: &DatapathLab) {
    for family in FAMILIES {
        let mut b = builder(family, SRC, DST, udp()).ttl(62);
        b.src_mac = h.gateway_mac();
        b.dst_mac = h.uplink_mac();
        let frame = b.build();
        let (out, moved) = h
            .run_counted(ProgramKind::UplinkIngress, &frame, h.uplink_ctx())
            .unwrap();
        assert_eq!(out.return_value, TC_ACT_UNSPEC, "{family:?}");
        assert_eq!(out.data, frame, "{family:?}");
        assert_eq!(
            moved,
            [(Hook::Uplink, Counter::PassUnsentPodToPod)],
            "{family:?}"
        );
    }
}

/// Every packet `pod_ingress` sees goes on unchanged, with `TC_ACT_UNSPEC`, so that a
/// program attached after it on the hook sees it too.
fn pod_ingress_only_counts_and_hands_packets_on(h: &DatapathLab) {
    for family in FAMILIES {
        let frame = builder(family, SRC, DST, udp()).build();
        let before = h.counter(Hook::PodIngress, Counter::PassPodToPod).unwrap();
        let out = h
            .run(ProgramKind::PodIngress, &frame, h.pod_ingress_ctx(SRC))
            .unwrap();
        assert_eq!(out.return_value, TC_ACT_UNSPEC, "{family:?}");
        let after = h.counter(Hook::PodIngress, Counter::PassPodToPod).unwrap();
        assert_eq!(after.packets - before.packets, 1, "{family:?}");
        assert_eq!(out.data, frame, "{family:?}");
    }
}

/// A packet larger than the uplink's MTU is never sent oversize, nor delivered: the
/// sender gets ICMP "fragmentation needed" (IPv4) or "packet too big" (IPv6) from the
/// node, with the MTU, quoting the packet's head.
fn an_oversize_packet_gets_icmp_too_big(h: &DatapathLab) {
    h.lab()
        .node()
        .run("ip", ["link", "set", "dev", NODE_UPLINK, "mtu", "1400"])
        .unwrap();
    for family in FAMILIES {
        let frame = builder(family, SRC, DST, udp())
            .payload(&[0x42; 1430])
            .build();
        let out = h
            .run(ProgramKind::PodEgress, &frame, forwarded(h, SRC))
            .unwrap();
        assert_eq!(
            out.return_value, TC_ACT_REDIRECT,
            "{family:?}: the error goes back"
        );
        assert_eq!(
            h.counter(Hook::PodEgress, Counter::DroppedTooBig)
                .unwrap()
                .packets,
            if family == IpFamily::V4 { 1 } else { 2 },
            "{family:?}: counted"
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
fn no_way_to_the_gateway_drops(h: &DatapathLab) {
    h.set_gateway_neighbours(false).unwrap();
    for (family, route) in [(IpFamily::V4, "-4"), (IpFamily::V6, "-6")] {
        h.lab()
            .node()
            .run("ip", [route, "route", "flush", "dev", NODE_UPLINK])
            .unwrap();
        // The datapath reuses a CPU's answer for the gateway for the route cache's time
        // (earlier scenarios on this lab left one): past it, it asks the FIB again.
        std::thread::sleep(Duration::from_nanos(ROUTE_CACHE_TTL_NS) * 2);
        let frame = builder(family, SRC, DST, udp()).build();
        let out = h
            .run(ProgramKind::PodEgress, &frame, forwarded(h, SRC))
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
fn a_returning_packet_keeps_checksum_complete_valid(h: &DatapathLab) {
    for family in FAMILIES {
        let frame = builder(family, SRC, DST, udp()).build();
        let sent = h
            .run(ProgramKind::PodEgress, &frame, forwarded(h, SRC))
            .unwrap();
        assert_eq!(sent.return_value, TC_ACT_REDIRECT, "{family:?}");
        let Some(action) = h
            .run_checksum_complete(
                ProgramKind::UplinkIngress,
                &returned(h, &sent),
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

/// A Service's address, outside the Pod CIDRs.
fn cluster_ip(family: IpFamily) -> IpAddr {
    match family {
        IpFamily::V4 => IpAddr::from([10, 96, 0, 10]),
        IpFamily::V6 => "fd00:96::a".parse().unwrap(),
    }
}

fn frame_between(src: IpAddr, dst: IpAddr, transport: Transport) -> Vec<u8> {
    builder_between(src, dst, transport)
        .payload(b"service")
        .build()
}

fn tcp(src_port: u16, dst_port: u16) -> Transport {
    Transport::Tcp {
        src_port,
        dst_port,
        flags: 0x18,
    }
}

/// Whether a frame's transport checksum (TCP or UDP, no IPv6 extension headers) verifies.
fn transport_checksum_ok(frame: &[u8]) -> bool {
    let packet = parse(frame, frame.len()).unwrap();
    let l4 = &frame[usize::from(packet.l4_offset)..ETH_HLEN + usize::from(packet.ip_len)];
    let len = u32::try_from(l4.len()).unwrap();
    let mut pseudo = Vec::new();
    match packet.family {
        visibility_common::packet::Family::V4 => {
            pseudo.extend_from_slice(&packet.src[..4]);
            pseudo.extend_from_slice(&packet.dst[..4]);
            pseudo.extend_from_slice(&[0, packet.protocol]);
            pseudo.extend_from_slice(&u16::try_from(len).unwrap().to_be_bytes());
        }
        visibility_common::packet::Family::V6 => {
            pseudo.extend_from_slice(&packet.src);
            pseudo.extend_from_slice(&packet.dst);
            pseudo.extend_from_slice(&len.to_be_bytes());
            pseudo.extend_from_slice(&[0, 0, 0, packet.protocol]);
        }
    }
    checksum(&[&pseudo, l4]) == 0
}

/// Runs `pod_ingress` on `before` (as Pod `from` sent it), then `pod_egress` on `after`
/// (as the node's stack forwarded it to Pod `to`), on one CPU, as the kernel runs them.
fn through_the_node(
    h: &DatapathLab,
    from: usize,
    to: usize,
    before: &[u8],
    after: &[u8],
) -> RunOutput {
    visibility_tests::lab::pin_to_cpu(0).unwrap();
    let sent = h
        .run(ProgramKind::PodIngress, before, h.pod_ingress_ctx(from))
        .unwrap();
    assert_eq!(sent.return_value, TC_ACT_UNSPEC);
    h.run(
        ProgramKind::PodEgress,
        after,
        h.pod_egress_ctx(to, h.host_veth(from)),
    )
    .unwrap()
}

/// Pod SRC reaches Pod DST through a Service. The leg after the node's DNAT goes to the
/// gateway; so does DST's reply, which leaves the node's stack with the Service's
/// source: it takes DST's own source back (checksums still valid), and when it returns
/// from the gateway it gets the Service's again. An ICMP error, and SCTP, whose
/// checksum covers the ports, stay local as the node's NAT made them.
fn service_legs_and_replies_cross_the_gateway(h: &DatapathLab) {
    const SCTP: u8 = 132;
    for family in FAMILIES {
        let (client, backend, service) =
            (pod_ip(SRC, family), pod_ip(DST, family), cluster_ip(family));
        // The leg: SRC:41000 -> service:80 becomes SRC:41000 -> DST:8080.
        let leg = through_the_node(
            h,
            SRC,
            DST,
            &frame_between(client, service, tcp(41000, 80)),
            &frame_between(client, backend, tcp(41000, 8080)),
        );
        assert_eq!(leg.return_value, TC_ACT_REDIRECT, "{family:?}: the leg");
        // The reply: DST:8080 -> SRC:41000 leaves the node as service:80 -> SRC:41000.
        let before = h
            .counter(Hook::PodEgress, Counter::RedirectedServiceReply)
            .unwrap();
        let reply = through_the_node(
            h,
            DST,
            SRC,
            &frame_between(backend, client, tcp(8080, 41000)),
            &frame_between(service, client, tcp(80, 41000)),
        );
        assert_eq!(reply.return_value, TC_ACT_REDIRECT, "{family:?}: the reply");
        let after = h
            .counter(Hook::PodEgress, Counter::RedirectedServiceReply)
            .unwrap();
        assert_eq!(after.packets - before.packets, 1, "{family:?}");
        let out = parse(&reply.data[..], reply.data.len()).unwrap();
        let on_wire = frame_between(backend, client, tcp(8080, 41000));
        let expected = parse(&on_wire[..], on_wire.len()).unwrap();
        assert_eq!(
            (out.src, out.src_port),
            (expected.src, 8080),
            "{family:?}: DST's source"
        );
        assert!(
            transport_checksum_ok(&reply.data),
            "{family:?}: TCP checksum"
        );
        if family == IpFamily::V4 {
            assert_eq!(
                checksum(&[&reply.data[ETH_HLEN..ETH_HLEN + 20]]),
                0,
                "IPv4 checksum"
            );
        }
        let leg_entry = h
            .nat_leg(&FlowKey::from_packet(&out))
            .unwrap()
            .expect("the NAT leg");
        assert_eq!(leg_entry.src_port, 80, "{family:?}");
        // Back from the gateway: the client gets it from the Service.
        let back = h
            .run(
                ProgramKind::UplinkIngress,
                &returned(h, &reply),
                h.uplink_ctx(),
            )
            .unwrap();
        assert_eq!(back.return_value, TC_ACT_REDIRECT, "{family:?}: delivered");
        let delivered = parse(&back.data[..], back.data.len()).unwrap();
        let from_service = frame_between(service, client, tcp(80, 41000));
        let expected = parse(&from_service[..], from_service.len()).unwrap();
        assert_eq!(
            (delivered.src, delivered.src_port),
            (expected.src, 80),
            "{family:?}"
        );
        assert!(
            transport_checksum_ok(&back.data),
            "{family:?}: TCP checksum after"
        );

        // An ICMP error about the Service traffic, rewritten inside by the node's NAT.
        let unreachable = |src| {
            let kind = if family == IpFamily::V4 { 3 } else { 1 };
            frame_between(
                src,
                client,
                Transport::Icmp {
                    kind,
                    code: 3,
                    id: 0,
                    seq: 0,
                },
            )
        };
        let before = h
            .counter(Hook::PodEgress, Counter::PassServiceReplyUnrestorable)
            .unwrap();
        let error = through_the_node(h, DST, SRC, &unreachable(backend), &unreachable(service));
        assert_eq!(
            error.return_value, TC_ACT_UNSPEC,
            "{family:?}: the ICMP error stays"
        );
        let after = h
            .counter(Hook::PodEgress, Counter::PassServiceReplyUnrestorable)
            .unwrap();
        assert_eq!(after.packets - before.packets, 1, "{family:?}");

        // SCTP: the leg goes to the gateway; the reply stays local.
        let sctp = |src_port: u16, dst_port: u16| {
            let mut header = src_port.to_be_bytes().to_vec();
            header.extend_from_slice(&dst_port.to_be_bytes());
            header.extend_from_slice(&[0; 8]);
            (Transport::Raw { protocol: SCTP }, header)
        };
        let sctp_frame = |src, dst, ports: (u16, u16)| {
            let (transport, header) = sctp(ports.0, ports.1);
            builder_between(src, dst, transport)
                .payload(&header)
                .build()
        };
        let leg = through_the_node(
            h,
            SRC,
            DST,
            &sctp_frame(client, service, (42000, 80)),
            &sctp_frame(client, backend, (42000, 8080)),
        );
        assert_eq!(
            leg.return_value, TC_ACT_REDIRECT,
            "{family:?}: the SCTP leg"
        );
        let reply = through_the_node(
            h,
            DST,
            SRC,
            &sctp_frame(backend, client, (8080, 42000)),
            &sctp_frame(service, client, (80, 42000)),
        );
        assert_eq!(
            reply.return_value, TC_ACT_UNSPEC,
            "{family:?}: the SCTP reply stays"
        );
    }
}

// Each test below builds one lab (slow under the VM tier's emulated CPU) and runs
// several scenarios on it, one after the other.

#[test]
fn fragments_go_the_way_of_their_first() {
    let h = setup("frags");
    fragments_take_their_first_fragments_path(&h);
    a_later_fragment_without_its_first_goes_to_the_gateway(&h);
}

#[test]
fn only_a_pods_own_packets_go_out_and_only_they_come_back() {
    let h = setup("own");
    pod_ingress_only_counts_and_hands_packets_on(&h);
    a_spoofed_source_is_not_sent_to_the_gateway(&h);
    the_uplink_hands_on_only_what_was_sent(&h);
    a_returning_packet_keeps_checksum_complete_valid(&h);
    service_legs_and_replies_cross_the_gateway(&h);
}

#[test]
fn what_cannot_reach_the_gateway_is_answered_or_dropped() {
    let h = setup("noway");
    an_oversize_packet_gets_icmp_too_big(&h);
    no_way_to_the_gateway_drops(&h);
}
