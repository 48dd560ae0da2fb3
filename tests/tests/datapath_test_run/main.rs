//! The datapath's programs run with `BPF_PROG_TEST_RUN` on frames built here, in a
//! lab node's namespace (its routes and neighbours answer the FIB lookups): verdicts,
//! rewritten headers, counters and flows.
//!
//! Needs root (network namespaces, bpffs, loading BPF programs).
//!
//! One file a topic: [`fragments`], [`own_packets`], [`services`] and [`no_way`], each a
//! set of scenario functions on a lab; [`common`] holds the builders they share. The
//! tests below run the scenarios, several on one lab: a new scenario joins the test
//! whose lab it shares.

mod common;
mod fragments;
mod no_way;
mod own_packets;
mod services;

use common::setup;
use fragments::{
    a_later_fragment_without_its_first_goes_to_the_gateway,
    fragments_take_their_first_fragments_path,
};
use no_way::{an_oversize_packet_gets_icmp_too_big, no_way_to_the_gateway_drops};
use own_packets::{
    a_returning_packet_keeps_checksum_complete_valid, a_spoofed_source_is_not_sent_to_the_gateway,
    pod_ingress_only_counts_and_hands_packets_on, the_uplink_hands_on_only_what_was_sent,
};
use services::service_legs_and_replies_cross_the_gateway;

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
