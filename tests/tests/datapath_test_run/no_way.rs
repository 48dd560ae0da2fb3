//! What cannot reach the gateway: a packet over the uplink's MTU is answered with ICMP
//! "too big", and a packet with no way to the gateway is dropped.

use std::time::Duration;

use visibility::datapath::ProgramKind;
use visibility_common::{
    ROUTE_CACHE_TTL_NS,
    counters::Counter,
    packet::{ETH_HLEN, parse},
    testing::{checksum, transport_sum},
    verdict::Hook,
};
use visibility_tests::{
    datapath_harness::{DatapathLab, TC_ACT_REDIRECT, TC_ACT_SHOT},
    lab::{IpFamily, NODE_IPV4, NODE_IPV6, NODE_UPLINK, pod_ipv4, pod_ipv6},
};

use crate::common::*;

/// A packet larger than the uplink's MTU is never sent oversize, nor delivered: the
/// sender gets ICMP "fragmentation needed" (IPv4) or "packet too big" (IPv6) from the
/// node, with the MTU, quoting the packet's head.
pub(crate) fn an_oversize_packet_gets_icmp_too_big(h: &DatapathLab) {
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
                let parsed = parse(&error[..], error.len()).unwrap();
                assert_eq!(transport_sum(&parsed, icmp), 0, "ICMPv6 checksum");
                assert_eq!(&icmp[8..48], &frame[ETH_HLEN..ETH_HLEN + 40], "the quote");
            }
        }
    }
}

/// Without a route to the gateway a Pod-to-Pod packet is dropped, never delivered
/// around the gateway.
pub(crate) fn no_way_to_the_gateway_drops(h: &DatapathLab) {
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
