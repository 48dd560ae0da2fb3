//! Services: the leg after the node's DNAT and the backend's reply cross the gateway, the
//! reply with the backend's own source and the Service's put back when it returns.

use std::net::IpAddr;

use visibility::datapath::ProgramKind;
use visibility_common::{
    counters::Counter,
    flow::FlowKey,
    packet::{ETH_HLEN, parse},
    testing::{Transport, checksum},
    verdict::Hook,
};
use visibility_tests::{
    datapath_harness::{DatapathLab, RunOutput, TC_ACT_REDIRECT, TC_ACT_UNSPEC},
    lab::IpFamily,
};

use crate::common::*;

/// A Service's address, outside the Pod CIDRs.
pub(crate) fn cluster_ip(family: IpFamily) -> IpAddr {
    match family {
        IpFamily::V4 => IpAddr::from([10, 96, 0, 10]),
        IpFamily::V6 => "fd00:96::a".parse().unwrap(),
    }
}

pub(crate) fn frame_between(src: IpAddr, dst: IpAddr, transport: Transport) -> Vec<u8> {
    builder_between(src, dst, transport)
        .payload(b"service")
        .build()
}

/// Runs `pod_ingress` on `before` (as Pod `from` sent it), then `pod_egress` on `after`
/// (as the node's stack forwarded it to Pod `to`), on one CPU, as the kernel runs them.
pub(crate) fn through_the_node(
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
pub(crate) fn service_legs_and_replies_cross_the_gateway(h: &DatapathLab) {
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
