//! Fragments: each takes its datagram's first fragment's path, and a later fragment
//! without its first goes to the gateway.

use visibility::datapath::ProgramKind;
use visibility_common::{
    counters::Counter,
    packet::{ETH_HLEN, IPPROTO_FRAGMENT, IPPROTO_UDP},
    testing::{Transport, fix_ipv4_checksum},
    verdict::Hook,
};
use visibility_tests::{
    datapath_harness::{DatapathLab, TC_ACT_REDIRECT},
    lab::IpFamily,
};

use crate::common::*;

/// Which fragment of a datagram.
#[derive(Clone, Copy, Debug)]
pub(crate) enum Part {
    First,
    Middle,
    Last,
}

/// One fragment of a UDP datagram from `from` to `to` with identification `id`: the
/// first carries the UDP header, the others only payload at offsets 1480 and 2960.
pub(crate) fn fragment(family: IpFamily, from: usize, to: usize, part: Part, id: u16) -> Vec<u8> {
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
            fix_ipv4_checksum(&mut frame);
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

/// Every fragment of a datagram takes the first fragment's path, to the gateway and
/// back, and is counted in the datagram's flow: first, middle and last, IPv4 and IPv6.
pub(crate) fn fragments_take_their_first_fragments_path(h: &DatapathLab) {
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
pub(crate) fn a_later_fragment_without_its_first_goes_to_the_gateway(h: &DatapathLab) {
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
