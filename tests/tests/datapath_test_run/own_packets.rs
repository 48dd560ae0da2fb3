//! Only a Pod's own packets go out to the gateway, and only what was sent comes back:
//! `pod_ingress` only counts, a spoofed source stays, the uplink hands on what the node
//! sent, and a returning packet keeps `CHECKSUM_COMPLETE` valid.

use visibility::datapath::ProgramKind;
use visibility_common::{counters::Counter, verdict::Hook};
use visibility_tests::datapath_harness::{DatapathLab, TC_ACT_REDIRECT, TC_ACT_UNSPEC};

use crate::common::*;

/// A packet from a Pod's veth whose source is another Pod's address is never sent to
/// the gateway in that Pod's name: it is passed (the node's stack has judged it) and
/// counted.
pub(crate) fn a_spoofed_source_is_not_sent_to_the_gateway(h: &DatapathLab) {
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
pub(crate) fn the_uplink_hands_on_only_what_was_sent(h: &DatapathLab) {
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
pub(crate) fn pod_ingress_only_counts_and_hands_packets_on(h: &DatapathLab) {
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

/// A packet from a real NIC carries `CHECKSUM_COMPLETE`: the driver's sum of all its
/// bytes. Handing it to a Pod spends a hop; the sum must follow (IPv6 has no header
/// checksum to balance the hop limit's change), or the kernel reports a checksum fault.
/// The kernel checks after the run (`BPF_F_TEST_SKB_CHECKSUM_COMPLETE`, Linux 6.11+).
pub(crate) fn a_returning_packet_keeps_checksum_complete_valid(h: &DatapathLab) {
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
