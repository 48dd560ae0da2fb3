//! What the scenarios share: the lab's Pods by role, a lab with them registered, frames
//! between them, the contexts of a packet forwarded by the node and returned by the
//! gateway, and checking a transport checksum.

use std::net::IpAddr;

use visibility_common::{
    flow::FlowKey,
    packet::{ETH_HLEN, parse},
    testing::{FrameBuilder, Transport, fix_ipv4_checksum, transport_sum},
};
use visibility_tests::{
    datapath_harness::{DatapathLab, RunOutput, SkbCtx},
    lab::{IpFamily, pod_ipv4, pod_ipv6},
};

pub(crate) const FAMILIES: [IpFamily; 2] = [IpFamily::V4, IpFamily::V6];

pub(crate) const SRC: usize = 0;

pub(crate) const DST: usize = 1;

pub(crate) const OTHER: usize = 2;

pub(crate) const SRC_PORT: u16 = 40000;

pub(crate) const DST_PORT: u16 = 9000;

/// A lab whose three Pods are registered and resolved, as the daemon has them.
pub(crate) fn setup(tag: &str) -> DatapathLab {
    let mut h = DatapathLab::new(tag).expect("setting up a lab with the datapath (root needed)");
    for pod in [SRC, DST, OTHER] {
        h.set_pod_neighbours(pod, true).unwrap();
        let veth = h.host_veth(pod);
        h.maps.add_pod_iface(veth, true, veth).unwrap();
    }
    h
}

pub(crate) fn pod_ip(pod: usize, family: IpFamily) -> IpAddr {
    match family {
        IpFamily::V4 => pod_ipv4(pod).into(),
        IpFamily::V6 => pod_ipv6(pod).into(),
    }
}

/// A frame from `src` to `dst` (one family).
pub(crate) fn builder_between(src: IpAddr, dst: IpAddr, transport: Transport) -> FrameBuilder {
    match (src, dst) {
        (IpAddr::V4(s), IpAddr::V4(d)) => FrameBuilder::ipv4(s.octets(), d.octets(), transport),
        (IpAddr::V6(s), IpAddr::V6(d)) => FrameBuilder::ipv6(s.octets(), d.octets(), transport),
        _ => unreachable!("one family"),
    }
}

pub(crate) fn builder(
    family: IpFamily,
    from: usize,
    to: usize,
    transport: Transport,
) -> FrameBuilder {
    builder_between(pod_ip(from, family), pod_ip(to, family), transport)
}

pub(crate) fn udp() -> Transport {
    Transport::Udp {
        src_port: SRC_PORT,
        dst_port: DST_PORT,
    }
}

pub(crate) fn tcp(src_port: u16, dst_port: u16) -> Transport {
    Transport::Tcp {
        src_port,
        dst_port,
        flags: 0x18,
    }
}

/// What `pod_egress` on `DST`'s veth sees of a packet that entered on `from`'s veth.
pub(crate) fn forwarded(h: &DatapathLab, from: usize) -> SkbCtx {
    h.pod_egress_ctx(DST, h.host_veth(from))
}

/// The frame as it comes back from the gateway: its MACs, one hop less.
pub(crate) fn returned(h: &DatapathLab, sent: &RunOutput) -> Vec<u8> {
    let mut frame = sent.data.clone();
    frame[..6].copy_from_slice(&h.uplink_mac());
    frame[6..12].copy_from_slice(&h.gateway_mac());
    let packet = parse(&frame[..], frame.len()).expect("a parsable frame");
    match packet.family {
        visibility_common::packet::Family::V4 => {
            frame[ETH_HLEN + 8] -= 1;
            fix_ipv4_checksum(&mut frame);
        }
        visibility_common::packet::Family::V6 => frame[ETH_HLEN + 7] -= 1,
    }
    frame
}

pub(crate) fn flow_key(family: IpFamily) -> FlowKey {
    let frame = builder(family, SRC, DST, udp()).build();
    FlowKey::from_packet(&parse(&frame[..], frame.len()).unwrap())
}

/// Whether a frame's transport checksum (TCP or UDP, no IPv6 extension headers) verifies.
pub(crate) fn transport_checksum_ok(frame: &[u8]) -> bool {
    let packet = parse(frame, frame.len()).unwrap();
    let l4 = &frame[usize::from(packet.l4_offset)..ETH_HLEN + usize::from(packet.ip_len)];
    transport_sum(&packet, l4) == 0
}
