//! The three TC programs run on crafted frames with `BPF_PROG_TEST_RUN`, in the node
//! namespace of a lab: verdicts, rewrites, counters, flows and NAT legs, for IPv4 and
//! IPv6, and a table of malformed and odd frames that must never be redirected or
//! changed when passed.
//!
//! **These tests need root**: they create network namespaces, load BPF programs and pin
//! them under `/sys/fs/bpf`. Each test builds its own lab and its own pin directory
//! (`/sys/fs/bpf/vis-test-<tag>-<pid>-<n>`); both are removed when the test ends, also
//! when it fails, so the tests run in parallel.
//!
//! Frames that say IPv4 or IPv6 in their ethertype but are shorter than the fixed IP
//! header never reach the program on Linux 6.18: `BPF_PROG_TEST_RUN` refuses them with
//! `EINVAL`. The odd-frames table accepts that (with nothing counted) or, on kernels that
//! run them, a pass; the shared parser's host tests cover those frames too.
//!
//! Pods: "pod 0" sends ([`SRC`]), "pod 1" receives ([`DST`]), "pod 2" is a bystander
//! ([`OTHER`]).
//!
//! Run: `cargo test -p visibility-tests --test datapath_test_run` (the first build compiles
//! the eBPF object with nightly).

use std::{
    net::{IpAddr, Ipv4Addr, Ipv6Addr},
    time::{Duration, Instant},
};

use visibility::{datapath::ProgramKind, maps::Exemption};
use visibility_common::{
    ROUTE_CACHE_TTL_NS,
    counters::{Counter, CounterValue},
    flow::{FlowKey, FlowStats, Path},
    packet::{ETH_HLEN, IPPROTO_TCP, IPPROTO_UDP, IPV4_TTL_OFFSET, IPV6_HOP_LIMIT_OFFSET, parse},
    testing::{FrameBuilder, Transport, checksum, ipv4_header_checksum_ok},
    verdict::Hook,
};
use visibility_tests::{
    datapath_harness::{
        CounterSnapshot, DatapathLab, MASQUERADE_MARK, Mac, RunOutput, SkbCtx, TC_ACT_OK,
        TC_ACT_REDIRECT, hook_of, set_neighbour,
    },
    lab::{
        GATEWAY_IPV4, GATEWAY_IPV6, IpFamily, NODE_IPV4, NODE_IPV6, NODE_UPLINK, POD_CIDR_V4,
        POD_CIDR_V6, POD_GATEWAY_V4, POD_GATEWAY_V6, pin_to_cpu, pod_ipv4, pod_ipv6,
    },
};

const FAMILIES: [IpFamily; 2] = [IpFamily::V4, IpFamily::V6];
const PROGRAMS: [ProgramKind; 3] = ProgramKind::ALL;
/// The Pod that sends.
const SRC: usize = 0;
/// The Pod it sends to.
const DST: usize = 1;
/// A third Pod.
const OTHER: usize = 2;

const TCP_SYN: u8 = 0x02;
const ETH_P_ARP: u16 = 0x0806;

fn setup(tag: &str) -> DatapathLab {
    DatapathLab::new(tag).expect("setting up a lab with the datapath (root needed)")
}

// ---------------------------------------------------------------------------------------
// Frames
// ---------------------------------------------------------------------------------------

fn pod_ip(pod: usize, family: IpFamily) -> IpAddr {
    match family {
        IpFamily::V4 => pod_ipv4(pod).into(),
        IpFamily::V6 => pod_ipv6(pod).into(),
    }
}

fn tcp(src_port: u16, dst_port: u16) -> Transport {
    Transport::Tcp {
        src_port,
        dst_port,
        flags: TCP_SYN,
    }
}

fn udp(src_port: u16, dst_port: u16) -> Transport {
    Transport::Udp { src_port, dst_port }
}

fn echo_request(family: IpFamily) -> Transport {
    Transport::Icmp {
        kind: if family == IpFamily::V4 { 8 } else { 128 },
        code: 0,
        id: 0x1234,
        seq: 1,
    }
}

/// A frame from `src` to `dst` (one family) with a short payload.
fn frame(src: IpAddr, dst: IpAddr, transport: Transport) -> FrameBuilder {
    let builder = match (src, dst) {
        (IpAddr::V4(s), IpAddr::V4(d)) => FrameBuilder::ipv4(s.octets(), d.octets(), transport),
        (IpAddr::V6(s), IpAddr::V6(d)) => FrameBuilder::ipv6(s.octets(), d.octets(), transport),
        _ => panic!("{src} and {dst} are of different families"),
    };
    builder.payload(b"intranode visibility")
}

fn pod_frame(family: IpFamily, from: usize, to: usize, transport: Transport) -> FrameBuilder {
    frame(pod_ip(from, family), pod_ip(to, family), transport)
}

/// The same frame as it comes back from the gateway: the gateway's MAC to the uplink's,
/// one more hop spent.
fn from_gateway(h: &DatapathLab, builder: FrameBuilder) -> Vec<u8> {
    let ttl = builder.ttl - 2;
    let mut builder = builder.ttl(ttl);
    builder.src_mac = h.gateway_mac();
    builder.dst_mac = h.uplink_mac();
    builder.build()
}

/// An ARP request for `target` from `sender`.
fn arp_request(sender: Ipv4Addr, target: Ipv4Addr) -> Vec<u8> {
    let mac = [0x02, 0, 0, 0, 0, 0x02];
    let mut frame = vec![0xff; 6];
    frame.extend_from_slice(&mac);
    frame.extend_from_slice(&ETH_P_ARP.to_be_bytes());
    frame.extend_from_slice(&[0, 1, 0x08, 0x00, 6, 4, 0, 1]);
    frame.extend_from_slice(&mac);
    frame.extend_from_slice(&sender.octets());
    frame.extend_from_slice(&[0; 6]);
    frame.extend_from_slice(&target.octets());
    frame
}

fn is_ipv4(frame: &[u8]) -> bool {
    frame[12..14] == [0x08, 0x00]
}

fn ttl_offset(frame: &[u8]) -> usize {
    if is_ipv4(frame) {
        IPV4_TTL_OFFSET
    } else {
        IPV6_HOP_LIMIT_OFFSET
    }
}

/// The flow key the datapath files `frame` under, from the shared parser.
fn key_of(frame: &[u8]) -> FlowKey {
    FlowKey::from_packet(&parse(frame, frame.len()).expect("a frame that parses"))
}

/// The bytes the datapath counts for `frame`: the IP length, or all after Ethernet.
fn counted_bytes(frame: &[u8]) -> u64 {
    match parse(frame, frame.len()) {
        Ok(packet) => u64::from(packet.ip_len),
        Err(_) => (frame.len() - ETH_HLEN) as u64,
    }
}

// ---------------------------------------------------------------------------------------
// Expectations
// ---------------------------------------------------------------------------------------

/// What a program must do with a frame.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
enum Expect {
    /// `TC_ACT_OK`, the frame unchanged, counted in this slot only.
    Pass(Counter),
    /// `TC_ACT_REDIRECT`, counted in these slots only.
    Redirect(&'static [Counter]),
}

const TO_GATEWAY: Expect = Expect::Redirect(&[Counter::RedirectedToGateway]);
const AFTER_NAT: Expect = Expect::Redirect(&[Counter::RedirectedAfterNat]);
const TO_POD: Expect = Expect::Redirect(&[Counter::DeliveredFromGateway]);

/// What a valid Pod-to-Pod frame gets at each program, with the contexts of [`ctx_for`].
fn redirect_at(kind: ProgramKind) -> Expect {
    match kind {
        ProgramKind::PodIngress => TO_GATEWAY,
        ProgramKind::PodEgress => AFTER_NAT,
        ProgramKind::UplinkIngress => TO_POD,
    }
}

/// The context each program sees a [`SRC`] → [`DST`] packet in: sent by SRC, forwarded by
/// the node to DST, or coming back on the uplink.
fn ctx_for(h: &DatapathLab, kind: ProgramKind) -> SkbCtx {
    match kind {
        ProgramKind::PodIngress => h.pod_ingress_ctx(SRC),
        ProgramKind::PodEgress => h.pod_egress_ctx(DST, h.host_veth(SRC)),
        ProgramKind::UplinkIngress => h.uplink_ctx(),
    }
}

/// Counter deltas by name, for readable failures.
fn named(moved: &[(Hook, Counter, CounterValue)]) -> Vec<String> {
    moved
        .iter()
        .map(|(hook, counter, v)| {
            format!(
                "{}/{}: {} packets {} bytes",
                hook.name(),
                counter.name(),
                v.packets,
                v.bytes
            )
        })
        .collect()
}

/// Runs `kind` on `frame` and checks the return value, that exactly the expected
/// counter slots moved by one packet (and the frame's bytes), and that a passed frame
/// comes out unchanged.
fn check(
    h: &DatapathLab,
    what: &str,
    kind: ProgramKind,
    frame: &[u8],
    ctx: SkbCtx,
    expect: Expect,
) -> RunOutput {
    let what = format!("{what} at {}", kind.name());
    let before = h.counters().unwrap();
    let out = h
        .run(kind, frame, ctx)
        .unwrap_or_else(|e| panic!("{what}: {e:#}"));
    verify(h, &what, kind, frame, &before, &out, expect);
    out
}

/// The checks of [`check`], on a run already made.
fn verify(
    h: &DatapathLab,
    what: &str,
    kind: ProgramKind,
    frame: &[u8],
    before: &CounterSnapshot,
    out: &RunOutput,
    expect: Expect,
) {
    let moved = h.counters().unwrap().since(before);
    let hook = hook_of(kind);
    let (return_value, counters) = match expect {
        Expect::Pass(counter) => (TC_ACT_OK, vec![counter]),
        Expect::Redirect(counters) => (TC_ACT_REDIRECT, counters.to_vec()),
    };
    let mut wanted: Vec<_> = counters
        .iter()
        .map(|c| {
            let value = CounterValue {
                packets: 1,
                bytes: counted_bytes(frame),
            };
            (hook, *c, value)
        })
        .collect();
    wanted.sort_by_key(|(_, c, _)| *c as u32);
    assert_eq!(
        out.return_value,
        return_value,
        "{what}: return value (counters moved: {:?})",
        named(&moved)
    );
    assert_eq!(named(&moved), named(&wanted), "{what}: counters");
    if return_value == TC_ACT_OK {
        assert_eq!(out.data, frame, "{what}: a passed frame must not change");
    }
}

/// Checks a routed frame: the new MACs, the TTL or hop limit `hops` lower, a valid IPv4
/// header checksum, and nothing else changed.
fn assert_routed(what: &str, input: &[u8], output: &[u8], dst_mac: Mac, src_mac: Mac, hops: u8) {
    assert_eq!(output.len(), input.len(), "{what}: length");
    assert_eq!(output[..6], dst_mac, "{what}: destination MAC");
    assert_eq!(output[6..12], src_mac, "{what}: source MAC");
    let ttl_at = ttl_offset(input);
    assert_eq!(
        output[ttl_at],
        input[ttl_at] - hops,
        "{what}: TTL/hop limit"
    );
    let mut may_change = vec![ttl_at];
    if is_ipv4(input) {
        assert!(
            ipv4_header_checksum_ok(output),
            "{what}: IPv4 header checksum"
        );
        may_change.extend([ETH_HLEN + 10, ETH_HLEN + 11]);
    }
    let changed: Vec<usize> = (12..input.len())
        .filter(|i| input[*i] != output[*i] && !may_change.contains(i))
        .collect();
    assert!(changed.is_empty(), "{what}: bytes {changed:?} changed");
}

fn source_macs(frame: &[u8]) -> (Mac, Mac) {
    let mac = |at: usize| -> Mac { frame[at..at + 6].try_into().unwrap() };
    (mac(0), mac(6))
}

fn flow(h: &DatapathLab, what: &str, frame: &[u8]) -> FlowStats {
    h.flow(&key_of(frame))
        .unwrap()
        .unwrap_or_else(|| panic!("{what}: no flow for {:?}", key_of(frame)))
}

/// Checks what a flow says about the packets its source sent.
fn assert_sent(what: &str, stats: &FlowStats, packets: u64, bytes: u64, path: Path, ifindex: u32) {
    assert_eq!(
        (
            stats.packets,
            stats.bytes,
            stats.path(),
            stats.ingress_ifindex
        ),
        (packets, bytes, Some(path), ifindex),
        "{what}: flow (packets, bytes, path, ingress_ifindex)"
    );
}

// ---------------------------------------------------------------------------------------
// pod_ingress
// ---------------------------------------------------------------------------------------

#[test]
fn pod_ingress_sends_pod_to_pod_packets_to_the_gateway() {
    let h = setup("toGateway");
    for family in FAMILIES {
        // (transport, Ethernet padding after the IP packet, which is not counted)
        let cases = [
            (tcp(40001, 80), 0),
            (udp(40002, 5000), 0),
            (echo_request(family), 0),
            (tcp(40003, 80), 16),
        ];
        for (transport, padding) in cases {
            let what = format!("{family:?} {transport:?} + {padding} bytes of padding");
            let is_tcp = matches!(transport, Transport::Tcp { .. });
            let mut input = pod_frame(family, SRC, DST, transport).build();
            input.resize(input.len() + padding, 0);
            let out = check(
                &h,
                &what,
                ProgramKind::PodIngress,
                &input,
                h.pod_ingress_ctx(SRC),
                TO_GATEWAY,
            );
            assert_routed(&what, &input, &out.data, h.gateway_mac(), h.uplink_mac(), 1);
            let stats = flow(&h, &what, &input);
            let bytes = counted_bytes(&input);
            assert_eq!(bytes, (input.len() - ETH_HLEN - padding) as u64, "{what}");
            assert_sent(&what, &stats, 1, bytes, Path::ViaGateway, h.host_veth(SRC));
            assert_eq!(
                (stats.returned_packets, stats.egress_ifindex),
                (0, 0),
                "{what}"
            );
            let expected_flags = if is_tcp { TCP_SYN } else { 0 };
            assert_eq!(stats.tcp_flags, expected_flags, "{what}: TCP flags");
        }
    }
}

#[test]
fn pod_ingress_leaves_packets_without_a_hop_to_spare_to_the_kernel() {
    let h = setup("ttl");
    for family in FAMILIES {
        for ttl in [0, 1] {
            let what = format!("{family:?} TTL {ttl}");
            let input = pod_frame(family, SRC, DST, udp(40000 + u16::from(ttl), 5000))
                .ttl(ttl)
                .build();
            let ctx = h.pod_ingress_ctx(SRC);
            check(
                &h,
                &what,
                ProgramKind::PodIngress,
                &input,
                ctx,
                Expect::Pass(Counter::PassTtlExpired),
            );
            let stats = flow(&h, &what, &input);
            assert_sent(
                &what,
                &stats,
                1,
                counted_bytes(&input),
                Path::Local,
                ctx.ifindex,
            );
        }
        // The last hop there is to spend is spent.
        let what = format!("{family:?} TTL 2");
        let input = pod_frame(family, SRC, DST, udp(40002, 5000)).ttl(2).build();
        let out = check(
            &h,
            &what,
            ProgramKind::PodIngress,
            &input,
            h.pod_ingress_ctx(SRC),
            TO_GATEWAY,
        );
        assert_eq!(out.data[ttl_offset(&input)], 1, "{what}");
    }
}

#[test]
fn an_unknown_gateway_neighbour_is_resolved_at_ingress_and_passed_at_egress() {
    let h = setup("neigh");
    h.set_gateway_neighbours(false).unwrap();
    for family in FAMILIES {
        let what = format!("{family:?} with the gateway's neighbour unknown");
        let input = pod_frame(family, SRC, DST, tcp(40000, 80)).build();
        let out = check(
            &h,
            &what,
            ProgramKind::PodIngress,
            &input,
            h.pod_ingress_ctx(SRC),
            Expect::Redirect(&[Counter::RedirectedToGateway, Counter::NeighbourResolution]),
        );
        // bpf_redirect_neigh fills in the MACs after resolving: they stay as they were.
        let (dst_mac, src_mac) = source_macs(&input);
        assert_routed(&what, &input, &out.data, dst_mac, src_mac, 1);
        let stats = flow(&h, &what, &input);
        assert_sent(
            &what,
            &stats,
            1,
            counted_bytes(&input),
            Path::ViaGateway,
            h.host_veth(SRC),
        );

        // A forwarded packet keeps its route to the Pod: queued for the gateway's
        // neighbour it would leave with the Pod's MAC, so it stays on the node.
        let what = format!("{what}, a NAT leg");
        let input = pod_frame(family, SRC, DST, tcp(40001, 8080)).build();
        let ctx = h.pod_egress_ctx(DST, h.host_veth(SRC));
        let unresolved = Expect::Pass(Counter::PassGatewayUnresolved);
        check(&h, &what, ProgramKind::PodEgress, &input, ctx, unresolved);
        assert!(!h.nat_leg(&key_of(&input)).unwrap(), "{what}: no NAT leg");
    }
}

#[test]
fn disabling_passes_pod_traffic_and_enabling_redirects_the_next_packet() {
    let mut h = setup("toggle");
    h.set_pod_neighbours(DST, true).unwrap();
    for family in FAMILIES {
        let what = format!("{family:?}");
        let input = pod_frame(family, SRC, DST, udp(40000, 5000)).build();
        let bytes = counted_bytes(&input);
        let ingress = h.pod_ingress_ctx(SRC);
        let egress = h.pod_egress_ctx(DST, h.host_veth(SRC));
        let disabled = Expect::Pass(Counter::PassDisabled);

        h.maps.set_enabled(false).unwrap();
        check(
            &h,
            &what,
            ProgramKind::PodIngress,
            &input,
            ingress,
            disabled,
        );
        let stats = flow(&h, &what, &input);
        assert_sent(&what, &stats, 1, bytes, Path::Local, ingress.ifindex);
        check(&h, &what, ProgramKind::PodEgress, &input, egress, disabled);
        // Packets coming back from the gateway still reach their Pod.
        check(
            &h,
            &what,
            ProgramKind::UplinkIngress,
            &input,
            h.uplink_ctx(),
            TO_POD,
        );

        h.maps.set_enabled(true).unwrap();
        check(
            &h,
            &what,
            ProgramKind::PodIngress,
            &input,
            ingress,
            TO_GATEWAY,
        );
        let stats = flow(&h, &what, &input);
        assert_sent(
            &what,
            &stats,
            2,
            2 * bytes,
            Path::ViaGateway,
            ingress.ifindex,
        );
    }
}

#[test]
fn exempt_ranges_stay_on_the_node_in_both_directions() {
    let mut h = setup("exempt");
    let exemptions: Vec<Exemption> = FAMILIES
        .iter()
        .map(|family| {
            let cidr = ipnet::IpNet::from(pod_ip(DST, *family));
            Exemption {
                cidr,
                protocol: IPPROTO_UDP,
                port: 53,
            }
        })
        .collect();
    h.maps.set_exemptions(&exemptions).unwrap();

    let exempt = Expect::Pass(Counter::PassExempt);
    for family in FAMILIES {
        // (what, from, to, transport, expected)
        let cases = [
            ("udp/53 request", SRC, DST, udp(40000, 53), exempt),
            ("udp/53 reply", DST, SRC, udp(53, 40000), exempt),
            (
                "tcp/80 to the same Pod",
                SRC,
                DST,
                tcp(40000, 80),
                TO_GATEWAY,
            ),
            (
                "tcp/53 to the same Pod",
                SRC,
                DST,
                tcp(40001, 53),
                TO_GATEWAY,
            ),
            (
                "udp/53 to another Pod",
                SRC,
                OTHER,
                udp(40000, 53),
                TO_GATEWAY,
            ),
            (
                "udp/54 to the same Pod",
                SRC,
                DST,
                udp(40000, 54),
                TO_GATEWAY,
            ),
        ];
        for (case, from, to, transport, expect) in cases {
            let what = format!("{family:?} {case}");
            let input = pod_frame(family, from, to, transport).build();
            let ctx = h.pod_ingress_ctx(from);
            check(&h, &what, ProgramKind::PodIngress, &input, ctx, expect);
            let path = if expect == exempt {
                Path::Exempt
            } else {
                Path::ViaGateway
            };
            let stats = flow(&h, &what, &input);
            assert_sent(&what, &stats, 1, counted_bytes(&input), path, ctx.ifindex);
        }
    }
}

#[test]
fn packets_not_between_pods_of_this_node_pass() {
    let h = setup("notpods");
    let v4 = |src: Ipv4Addr, dst: Ipv4Addr| frame(src.into(), dst.into(), udp(40000, 5000));
    let v6 = |src: Ipv6Addr, dst: Ipv6Addr| frame(src.into(), dst.into(), udp(40000, 5000));
    let (pod4, dst4) = (pod_ipv4(SRC), pod_ipv4(DST));
    let (pod6, dst6) = (pod_ipv6(SRC), pod_ipv6(DST));
    let ip = |s: &str| -> Ipv6Addr { s.parse().unwrap() };
    let not_same_node = Counter::PassNotSameNode;
    let link_scope = Counter::PassLinkScope;
    // (what, frame, counter, the flow's path when a Pod sends it)
    let cases: Vec<(&str, Vec<u8>, Counter, Option<Path>)> = vec![
        (
            "v4 to the internet",
            v4(pod4, Ipv4Addr::new(8, 8, 8, 8)).build(),
            not_same_node,
            Some(Path::NotSameNode),
        ),
        (
            "v4 from the internet",
            v4(Ipv4Addr::new(8, 8, 8, 8), dst4).build(),
            not_same_node,
            Some(Path::NotSameNode),
        ),
        (
            "v4 to the node's uplink address",
            v4(pod4, NODE_IPV4).build(),
            not_same_node,
            Some(Path::NotSameNode),
        ),
        (
            "v4 to the node's Pod gateway address",
            v4(pod4, POD_GATEWAY_V4).build(),
            Counter::PassNodeAddress,
            None,
        ),
        (
            "v4 to the metadata server",
            v4(pod4, Ipv4Addr::new(169, 254, 169, 254)).build(),
            link_scope,
            None,
        ),
        (
            "v4 multicast",
            v4(pod4, Ipv4Addr::new(224, 0, 0, 251)).build(),
            link_scope,
            None,
        ),
        (
            "v4 broadcast",
            v4(pod4, Ipv4Addr::BROADCAST).build(),
            link_scope,
            None,
        ),
        (
            "v4 DHCP discover",
            v4(Ipv4Addr::UNSPECIFIED, Ipv4Addr::BROADCAST).build(),
            link_scope,
            None,
        ),
        (
            "v6 to the internet",
            v6(pod6, ip("2001:db8::1")).build(),
            not_same_node,
            Some(Path::NotSameNode),
        ),
        (
            "v6 to the node's uplink address",
            v6(pod6, NODE_IPV6).build(),
            not_same_node,
            Some(Path::NotSameNode),
        ),
        (
            "v6 to the node's Pod gateway address",
            v6(pod6, POD_GATEWAY_V6).build(),
            link_scope,
            None,
        ),
        (
            "v6 link-local to a Pod",
            v6(ip("fe80::2"), dst6).build(),
            link_scope,
            None,
        ),
        (
            "v6 multicast",
            v6(pod6, ip("ff02::1")).build(),
            link_scope,
            None,
        ),
        (
            "ARP",
            arp_request(pod4, POD_GATEWAY_V4),
            Counter::PassNotIp,
            None,
        ),
    ];
    for (what, input, counter, path) in &cases {
        for kind in PROGRAMS {
            let ctx = ctx_for(&h, kind);
            check(&h, what, kind, input, ctx, Expect::Pass(*counter));
        }
        // Only what a Pod sends at pod_ingress is a Pod flow.
        let key = parse(input.as_slice(), input.len())
            .ok()
            .map(|p| FlowKey::from_packet(&p));
        let stats = key.and_then(|key| h.flow(&key).unwrap());
        match path {
            Some(path) => {
                let stats = stats.unwrap_or_else(|| panic!("{what}: no flow"));
                let bytes = counted_bytes(input);
                assert_sent(what, &stats, 1, bytes, *path, h.host_veth(SRC));
            }
            None => assert_eq!(stats, None, "{what}: not a Pod flow"),
        }
    }
}

/// The Pod-CIDR trie also answers "is this the node's own address?" for node addresses
/// inside a Pod CIDR; the control plane keeps those entries in step with both lists.
#[test]
fn node_addresses_count_only_inside_a_pod_cidr_whichever_list_changes_first() {
    let mut h = setup("nodeaddr");
    let pod_cidr: ipnet::IpNet = POD_CIDR_V4.parse().unwrap();
    let node_addr = IpAddr::from(POD_GATEWAY_V4);
    let input = frame(pod_ipv4(SRC).into(), node_addr, udp(40000, 5000)).build();
    let ingress = h.pod_ingress_ctx(SRC);
    let expect = |h: &DatapathLab, counter: Counter, what: &str| {
        let expected = match counter {
            Counter::RedirectedToGateway => TO_GATEWAY,
            _ => Expect::Pass(counter),
        };
        check(h, what, ProgramKind::PodIngress, &input, ingress, expected);
    };
    expect(&h, Counter::PassNodeAddress, "as configured");

    // Without its Pod CIDR the address is just outside, and the entry is gone.
    assert!(h.maps.remove_pod_cidr(&pod_cidr).unwrap());
    expect(&h, Counter::PassNotSameNode, "Pod CIDR removed");
    // Only the other family's Pod CIDR is left; node addresses never show up as one.
    assert_eq!(h.maps.pod_cidrs(), vec![POD_CIDR_V6.parse().unwrap()]);

    // The Pod CIDR back: the node address counts again.
    h.maps.add_pod_cidr(&pod_cidr).unwrap();
    expect(&h, Counter::PassNodeAddress, "Pod CIDR added back");

    // Removing the node address makes it a Pod address like any other; adding it
    // back restores it. A second add changes nothing.
    assert!(h.maps.remove_node_addr(&node_addr).unwrap());
    expect(&h, Counter::RedirectedToGateway, "node address removed");
    h.maps.add_node_addr(&node_addr).unwrap();
    h.maps.add_pod_cidr(&pod_cidr).unwrap();
    expect(&h, Counter::PassNodeAddress, "node address added back");

    // A host-length Pod CIDR that is also a node address keeps both roles.
    let host: ipnet::IpNet = ipnet::IpNet::from(node_addr);
    h.maps.add_pod_cidr(&host).unwrap();
    assert!(h.maps.pod_cidrs().contains(&host));
    expect(&h, Counter::PassNodeAddress, "host-length Pod CIDR");
    assert!(h.maps.remove_pod_cidr(&host).unwrap());
    assert!(!h.maps.pod_cidrs().contains(&host));
    expect(&h, Counter::PassNodeAddress, "host-length Pod CIDR removed");
}

// ---------------------------------------------------------------------------------------
// pod_egress
// ---------------------------------------------------------------------------------------

#[test]
fn masquerade_marked_packets_stay_on_the_node() {
    let h = setup("masq");
    let marked = Expect::Pass(Counter::PassMasqueradeMark);
    for family in FAMILIES {
        let input = pod_frame(family, SRC, DST, tcp(40000, 8080)).build();
        let egress = h.pod_egress_ctx(DST, h.host_veth(SRC));
        let cases = [
            (
                "egress, the mark",
                ProgramKind::PodEgress,
                egress.with_mark(MASQUERADE_MARK),
                marked,
            ),
            (
                "egress, the mark among others",
                ProgramKind::PodEgress,
                egress.with_mark(MASQUERADE_MARK | 0x101),
                marked,
            ),
            (
                "ingress, the mark",
                ProgramKind::PodIngress,
                h.pod_ingress_ctx(SRC).with_mark(MASQUERADE_MARK),
                marked,
            ),
            (
                "egress, another mark",
                ProgramKind::PodEgress,
                egress.with_mark(0x101),
                AFTER_NAT,
            ),
        ];
        for (case, kind, ctx, expect) in cases {
            let what = format!("{family:?} {case}");
            check(&h, &what, kind, &input, ctx, expect);
        }
    }
}

#[test]
fn pod_egress_sends_nat_legs_to_the_gateway_and_lets_their_replies_through_the_node() {
    let h = setup("natlegs");
    for family in FAMILIES {
        for (request, reply, unrelated_reply) in [
            (tcp(40000, 8080), tcp(8080, 40000), tcp(8080, 40999)),
            (udp(40000, 5353), udp(5353, 40000), udp(5353, 40999)),
        ] {
            let what = format!("{family:?} {request:?}");
            let input = pod_frame(family, SRC, DST, request).build();
            let ctx = h.pod_egress_ctx(DST, h.host_veth(SRC));
            let out = check(&h, &what, ProgramKind::PodEgress, &input, ctx, AFTER_NAT);
            // The node's forwarding has spent the hop already.
            assert_routed(&what, &input, &out.data, h.gateway_mac(), h.uplink_mac(), 0);
            let stats = flow(&h, &what, &input);
            let bytes = counted_bytes(&input);
            assert_sent(
                &what,
                &stats,
                1,
                bytes,
                Path::ViaGatewayAfterNat,
                h.host_veth(SRC),
            );
            assert!(
                h.nat_leg(&key_of(&input)).unwrap(),
                "{what}: NAT leg remembered"
            );

            let reply = pod_frame(family, DST, SRC, reply).build();
            let ctx = h.pod_ingress_ctx(DST);
            let nat_reply = Expect::Pass(Counter::PassNatReply);
            check(
                &h,
                &format!("{what}: reply"),
                ProgramKind::PodIngress,
                &reply,
                ctx,
                nat_reply,
            );
            let stats = flow(&h, &what, &reply);
            assert_sent(
                &what,
                &stats,
                1,
                counted_bytes(&reply),
                Path::Local,
                ctx.ifindex,
            );

            let unrelated = pod_frame(family, DST, SRC, unrelated_reply).build();
            let what = format!("{what}: a reply of another connection");
            check(
                &h,
                &what,
                ProgramKind::PodIngress,
                &unrelated,
                ctx,
                TO_GATEWAY,
            );
        }
        // ICMP legs are sent too, but not remembered: their keys are not symmetric.
        let what = format!("{family:?} ICMP");
        let input = pod_frame(family, SRC, DST, echo_request(family)).build();
        let ctx = h.pod_egress_ctx(DST, h.host_veth(SRC));
        check(&h, &what, ProgramKind::PodEgress, &input, ctx, AFTER_NAT);
        assert!(!h.nat_leg(&key_of(&input)).unwrap(), "{what}: no NAT leg");
    }
}

#[test]
fn pod_egress_passes_packets_that_came_back_from_the_gateway() {
    let h = setup("returned");
    for family in FAMILIES {
        for transport in [tcp(40000, 80), udp(40000, 5000)] {
            let what = format!("{family:?} {transport:?} from the uplink");
            let input = pod_frame(family, SRC, DST, transport).build();
            let ctx = h.pod_egress_ctx(DST, h.uplink());
            let returned = Expect::Pass(Counter::PassReturned);
            check(&h, &what, ProgramKind::PodEgress, &input, ctx, returned);
            assert!(!h.nat_leg(&key_of(&input)).unwrap(), "{what}: no NAT leg");
            assert_eq!(h.flow(&key_of(&input)).unwrap(), None, "{what}: no flow");
        }
    }
}

// ---------------------------------------------------------------------------------------
// uplink_ingress
// ---------------------------------------------------------------------------------------

#[test]
fn uplink_ingress_hands_packets_back_from_the_gateway_to_the_pod() {
    let mut h = setup("uplink");
    h.set_pod_neighbours(DST, true).unwrap();
    let pod_mac = h.pod_mac(DST).unwrap();
    let veth_mac = h.host_veth_mac(DST).unwrap();
    let veth = h.host_veth(DST);
    for family in FAMILIES {
        let what = format!("{family:?}");
        let sent = pod_frame(family, SRC, DST, udp(40000, 5000));
        let input = sent.build();
        check(
            &h,
            &what,
            ProgramKind::PodIngress,
            &input,
            h.pod_ingress_ctx(SRC),
            TO_GATEWAY,
        );

        let back = from_gateway(&h, sent.clone());
        for round in 1..=2 {
            if round == 2 {
                // A veth Pod interface: straight into the Pod with bpf_redirect_peer.
                h.maps.add_pod_iface(veth, true).unwrap();
            }
            let what = format!("{what} back from the gateway, round {round}");
            let out = check(
                &h,
                &what,
                ProgramKind::UplinkIngress,
                &back,
                h.uplink_ctx(),
                TO_POD,
            );
            assert_routed(&what, &back, &out.data, pod_mac, veth_mac, 1);
            let stats = flow(&h, &what, &back);
            assert_sent(
                &what,
                &stats,
                1,
                counted_bytes(&input),
                Path::ViaGateway,
                h.host_veth(SRC),
            );
            assert_eq!(
                (
                    stats.returned_packets,
                    stats.returned_bytes,
                    stats.egress_ifindex
                ),
                (round, round * counted_bytes(&back), veth),
                "{what}: flow (returned packets, returned bytes, egress ifindex)"
            );
        }
        h.maps.remove_pod_iface(veth).unwrap();

        // A flow seen only on its way back.
        let what = format!("{family:?} seen only coming back");
        let back = from_gateway(&h, pod_frame(family, SRC, DST, udp(40001, 5000)));
        check(
            &h,
            &what,
            ProgramKind::UplinkIngress,
            &back,
            h.uplink_ctx(),
            TO_POD,
        );
        let stats = flow(&h, &what, &back);
        assert_eq!(
            (
                stats.packets,
                stats.returned_packets,
                stats.egress_ifindex,
                stats.path()
            ),
            (0, 1, veth, Some(Path::ReturnedFromGateway)),
            "{what}: flow (packets, returned packets, egress ifindex, path)"
        );
    }
}

#[test]
fn uplink_ingress_lets_the_kernel_resolve_an_unknown_pod_neighbour() {
    let h = setup("podneigh");
    h.set_pod_neighbours(OTHER, false).unwrap();
    for family in FAMILIES {
        let what = format!("{family:?} to a Pod whose neighbour is unknown");
        let back = from_gateway(&h, pod_frame(family, SRC, OTHER, tcp(40000, 80)));
        let out = check(
            &h,
            &what,
            ProgramKind::UplinkIngress,
            &back,
            h.uplink_ctx(),
            Expect::Redirect(&[Counter::DeliveredFromGateway, Counter::NeighbourResolution]),
        );
        let (dst_mac, src_mac) = source_macs(&back);
        assert_routed(&what, &back, &out.data, dst_mac, src_mac, 1);
        let stats = flow(&h, &what, &back);
        assert_eq!(stats.egress_ifindex, h.host_veth(OTHER), "{what}");
    }
}

#[test]
fn uplink_ingress_passes_what_is_not_returning_pod_traffic() {
    let h = setup("uplinkpass");
    h.set_pod_neighbours(DST, true).unwrap();
    let udp_frame = |src: IpAddr, dst: IpAddr| frame(src, dst, udp(40000, 5000));
    for family in FAMILIES {
        let (src, dst) = (pod_ip(SRC, family), pod_ip(DST, family));
        let (internet, no_pod): (IpAddr, IpAddr) = match family {
            IpFamily::V4 => ([8, 8, 8, 8].into(), [10, 52, 0, 200].into()),
            IpFamily::V6 => (
                "2001:db8::1".parse().unwrap(),
                "fd00:52::c8".parse().unwrap(),
            ),
        };
        let cases = [
            (
                "from outside the Pod CIDR",
                udp_frame(internet, dst).build(),
                Counter::PassNotSameNode,
            ),
            (
                "to outside the Pod CIDR",
                udp_frame(src, internet).build(),
                Counter::PassNotSameNode,
            ),
            (
                "with TTL 1",
                udp_frame(src, dst).ttl(1).build(),
                Counter::PassTtlExpired,
            ),
            // Routed back out of the uplink: that would loop.
            (
                "to a Pod address no Pod has",
                udp_frame(src, no_pod).build(),
                Counter::PassRouteLookupFailed,
            ),
        ];
        for (case, input, counter) in cases {
            let what = format!("{family:?} {case}");
            check(
                &h,
                &what,
                ProgramKind::UplinkIngress,
                &input,
                h.uplink_ctx(),
                Expect::Pass(counter),
            );
        }
    }
}

// ---------------------------------------------------------------------------------------
// Malformed and odd frames
// ---------------------------------------------------------------------------------------

/// Recomputes the IPv4 header checksum after a test changed the header.
fn reseal_ipv4(frame: &mut [u8]) {
    let header_len = (usize::from(frame[ETH_HLEN] & 0x0f) * 4).max(20);
    let end = (ETH_HLEN + header_len).min(frame.len());
    frame[ETH_HLEN + 10..ETH_HLEN + 12].fill(0);
    let sum = checksum(&[&frame[ETH_HLEN..end]]);
    frame[ETH_HLEN + 10..ETH_HLEN + 12].copy_from_slice(&sum.to_be_bytes());
}

/// `frame` with its IPv4 header changed by `change`, checksum fixed.
fn ipv4_with(frame: &[u8], change: impl FnOnce(&mut [u8])) -> Vec<u8> {
    let mut frame = frame.to_vec();
    change(&mut frame[ETH_HLEN..]);
    reseal_ipv4(&mut frame);
    frame
}

fn with_bytes(frame: &[u8], at: usize, bytes: &[u8]) -> Vec<u8> {
    let mut frame = frame.to_vec();
    frame[at..at + bytes.len()].copy_from_slice(bytes);
    frame
}

/// `frame` cut to `len` bytes, and, with `consistent`, its IP length fields made to
/// match so that only the transport header is short.
fn truncated(frame: &[u8], len: usize, consistent: bool) -> Vec<u8> {
    let mut frame = frame[..len].to_vec();
    if consistent {
        if is_ipv4(&frame) {
            let total = u16::try_from(len - ETH_HLEN).unwrap();
            frame[ETH_HLEN + 2..ETH_HLEN + 4].copy_from_slice(&total.to_be_bytes());
            reseal_ipv4(&mut frame);
        } else {
            let payload = u16::try_from(len - ETH_HLEN - 40).unwrap();
            frame[ETH_HLEN + 4..ETH_HLEN + 6].copy_from_slice(&payload.to_be_bytes());
        }
    }
    frame
}

/// An 802.1Q (or 802.1ad) tag inserted after the MACs.
fn vlan_tagged(frame: &[u8], tpid: u16) -> Vec<u8> {
    let mut out = frame[..12].to_vec();
    out.extend_from_slice(&tpid.to_be_bytes());
    out.extend_from_slice(&100u16.to_be_bytes());
    out.extend_from_slice(&frame[12..]);
    out
}

fn ethernet_only(ethertype: u16) -> Vec<u8> {
    let mut frame = vec![0x02, 0, 0, 0, 0, 0x01, 0x02, 0, 0, 0, 0, 0x02];
    frame.extend_from_slice(&ethertype.to_be_bytes());
    frame
}

fn with_ipv6_extensions(builder: &FrameBuilder, extensions: &[(u8, usize)]) -> Vec<u8> {
    let mut builder = builder.clone();
    builder.ipv6_extensions = extensions
        .iter()
        .map(|(protocol, len)| (*protocol, vec![0; len - 2]))
        .collect();
    builder.build()
}

const DSTOPTS: u8 = 60;
const FRAGMENT: u8 = 44;

/// Odd frames from [`SRC`] to [`DST`]: what each parses to, or `None` for the valid ones
/// that a Pod may send and that are redirected.
fn odd_frames() -> Vec<(String, Vec<u8>, Option<Counter>)> {
    let malformed = Some(Counter::PassMalformed);
    let fragment = Some(Counter::PassFragment);
    let not_ip = Some(Counter::PassNotIp);
    let tcp4 = pod_frame(IpFamily::V4, SRC, DST, tcp(40000, 80)).payload(&[]);
    let tcp6 = pod_frame(IpFamily::V6, SRC, DST, tcp(40000, 80)).payload(&[]);
    let (v4, v6) = (tcp4.build(), tcp6.build());
    assert_eq!((v4.len(), v6.len()), (54, 74));

    let mut cases: Vec<(String, Vec<u8>, Option<Counter>)> = Vec::new();
    // Cut at each header boundary and inside each header.
    for (name, frame, cuts) in [
        ("v4 tcp", &v4, [14, 20, 33, 34, 40, 53]),
        ("v6 tcp", &v6, [14, 30, 53, 54, 60, 73]),
    ] {
        for cut in cuts {
            cases.push((
                format!("{name} cut to {cut} bytes"),
                truncated(frame, cut, false),
                malformed,
            ));
        }
        for cut in [34 + 20 * usize::from(name == "v6 tcp"), frame.len() - 1] {
            let case = format!("{name} with lengths saying {cut} bytes");
            cases.push((case, truncated(frame, cut, true), malformed));
        }
    }
    for (name, transport, family) in [
        ("v4 udp", udp(40000, 53), IpFamily::V4),
        ("v4 icmp", echo_request(IpFamily::V4), IpFamily::V4),
        ("v6 udp", udp(40000, 53), IpFamily::V6),
        ("v6 icmp", echo_request(IpFamily::V6), IpFamily::V6),
    ] {
        let frame = pod_frame(family, SRC, DST, transport).payload(&[]).build();
        let header_end = frame.len() - 8;
        let case = format!("{name} with a 4-byte transport header");
        cases.push((case, truncated(&frame, header_end + 4, true), malformed));
    }
    let ipv4 = |case: &str, change: &dyn Fn(&mut [u8]), expect| {
        (format!("v4 {case}"), ipv4_with(&v4, change), expect)
    };
    cases.extend([
        ipv4("IHL 0", &|ip| ip[0] = 0x40, malformed),
        ipv4("IHL 4", &|ip| ip[0] = 0x44, malformed),
        ipv4(
            "IHL 15, longer than the packet",
            &|ip| ip[0] = 0x4f,
            malformed,
        ),
        ipv4(
            "total length 19",
            &|ip| ip[2..4].copy_from_slice(&19u16.to_be_bytes()),
            malformed,
        ),
        ipv4(
            "total length past the frame",
            &|ip| ip[2..4].copy_from_slice(&41u16.to_be_bytes()),
            malformed,
        ),
        ipv4("total length 0xffff", &|ip| ip[2..4].fill(0xff), malformed),
        ipv4("version 6", &|ip| ip[0] = 0x65, malformed),
        ipv4(
            "more fragments",
            &|ip| ip[6..8].copy_from_slice(&0x2000u16.to_be_bytes()),
            fragment,
        ),
        ipv4(
            "fragment offset",
            &|ip| ip[6..8].copy_from_slice(&0x0001u16.to_be_bytes()),
            fragment,
        ),
        ipv4(
            "last fragment",
            &|ip| ip[6..8].copy_from_slice(&0x00b9u16.to_be_bytes()),
            fragment,
        ),
        ipv4(
            "first fragment, DF",
            &|ip| ip[6..8].copy_from_slice(&0x6000u16.to_be_bytes()),
            fragment,
        ),
    ]);
    let payload_len = |len: u16| with_bytes(&v6, ETH_HLEN + 4, &len.to_be_bytes());
    cases.extend([
        (
            "v6 version 4".to_string(),
            with_bytes(&v6, ETH_HLEN, &[0x45]),
            malformed,
        ),
        (
            "v6 payload length past the frame".to_string(),
            payload_len(21),
            malformed,
        ),
        (
            "v6 payload length 0xffff".to_string(),
            payload_len(0xffff),
            malformed,
        ),
        (
            "v6 fragment header".to_string(),
            with_ipv6_extensions(&tcp6, &[(FRAGMENT, 8)]),
            fragment,
        ),
        (
            "v6 destination options, then a fragment header".to_string(),
            with_ipv6_extensions(&tcp6, &[(DSTOPTS, 8), (FRAGMENT, 8)]),
            fragment,
        ),
        (
            "v6 five extension headers".to_string(),
            with_ipv6_extensions(&tcp6, &[(DSTOPTS, 8); 5]),
            malformed,
        ),
    ]);
    // An extension header that claims more than the payload holds.
    let mut long_ext = with_ipv6_extensions(&tcp6, &[(DSTOPTS, 8)]);
    long_ext[ETH_HLEN + 40 + 1] = 10;
    cases.push((
        "v6 extension header longer than the payload".into(),
        long_ext,
        malformed,
    ));
    // Cut inside the extension header, and between it and TCP.
    let ext = with_ipv6_extensions(&tcp6, &[(DSTOPTS, 8)]);
    for cut in [55, 62, 70] {
        cases.push((
            format!("v6 destination options cut to {cut} bytes"),
            truncated(&ext, cut, false),
            malformed,
        ));
    }
    cases.extend([
        (
            "802.1Q tagged v4".to_string(),
            vlan_tagged(&v4, 0x8100),
            not_ip,
        ),
        (
            "802.1ad tagged v6".to_string(),
            vlan_tagged(&v6, 0x88a8),
            not_ip,
        ),
        (
            "14 bytes, IPv4 ethertype".to_string(),
            ethernet_only(0x0800),
            malformed,
        ),
        (
            "14 bytes, IPv6 ethertype".to_string(),
            ethernet_only(0x86dd),
            malformed,
        ),
        (
            "14 bytes, ARP ethertype".to_string(),
            ethernet_only(ETH_P_ARP),
            not_ip,
        ),
        (
            "14 bytes, ethertype 0".to_string(),
            ethernet_only(0),
            not_ip,
        ),
    ]);
    // Valid, though unusual: they are Pod-to-Pod packets like any other.
    let mut options = tcp4.clone();
    options.ipv4_options = vec![1, 1, 1, 0]; // NOP, NOP, NOP, end of options
    cases.push(("v4 with options".into(), options.build(), None));
    cases.push((
        "v6 destination options before TCP".into(),
        ext.clone(),
        None,
    ));
    cases
}

/// Whether `frame` is IPv4 or IPv6 by its ethertype but too short for the fixed IP
/// header. Linux 6.18's `BPF_PROG_TEST_RUN` refuses such frames with `EINVAL` before the
/// program runs; other kernels run it.
fn short_ip_header(frame: &[u8]) -> bool {
    match u16::from_be_bytes([frame[12], frame[13]]) {
        0x0800 => frame.len() < ETH_HLEN + 20,
        0x86dd => frame.len() < ETH_HLEN + 40,
        _ => false,
    }
}

/// Like [`check`] for a frame the kernel may refuse to run the program on: then the
/// run fails with `EINVAL` and counts nothing; else the frame is passed as `expect` says.
fn check_or_refused(
    h: &DatapathLab,
    what: &str,
    kind: ProgramKind,
    frame: &[u8],
    ctx: SkbCtx,
    expect: Expect,
) {
    let what = format!("{what} at {}", kind.name());
    let before = h.counters().unwrap();
    match h.run(kind, frame, ctx) {
        Ok(out) => verify(h, &what, kind, frame, &before, &out, expect),
        Err(e) => {
            let errno = e
                .root_cause()
                .downcast_ref::<std::io::Error>()
                .and_then(std::io::Error::raw_os_error);
            assert_eq!(errno, Some(libc::EINVAL), "{what}: {e:#}");
            let moved = h.counters().unwrap().since(&before);
            assert!(
                moved.is_empty(),
                "{what}: refused, yet counted {:?}",
                named(&moved)
            );
        }
    }
}

#[test]
fn odd_frames_are_never_redirected_nor_changed_unless_valid() {
    let h = setup("odd");
    h.set_pod_neighbours(DST, true).unwrap();
    for (what, input, parsed) in odd_frames() {
        assert!(
            input.len() >= ETH_HLEN,
            "{what}: test_run needs a whole Ethernet header"
        );
        match parsed {
            Some(counter) => {
                assert!(
                    parse(input.as_slice(), input.len()).is_err(),
                    "{what}: the parser takes it"
                );
                for kind in PROGRAMS {
                    let ctx = ctx_for(&h, kind);
                    if short_ip_header(&input) {
                        check_or_refused(&h, &what, kind, &input, ctx, Expect::Pass(counter));
                    } else {
                        check(&h, &what, kind, &input, ctx, Expect::Pass(counter));
                    }
                }
            }
            None => {
                let key = key_of(&input);
                assert_eq!(
                    (key.protocol, key.dst_port),
                    (IPPROTO_TCP, 80),
                    "{what}: key"
                );
                let ctx = h.pod_ingress_ctx(SRC);
                let out = check(&h, &what, ProgramKind::PodIngress, &input, ctx, TO_GATEWAY);
                assert_routed(&what, &input, &out.data, h.gateway_mac(), h.uplink_mac(), 1);
                let stats = flow(&h, &what, &input);
                let bytes = counted_bytes(&input);
                assert_sent(&what, &stats, 1, bytes, Path::ViaGateway, ctx.ifindex);
                for kind in [ProgramKind::PodEgress, ProgramKind::UplinkIngress] {
                    check(
                        &h,
                        &what,
                        kind,
                        &input,
                        ctx_for(&h, kind),
                        redirect_at(kind),
                    );
                }
            }
        }
    }
}

// ---------------------------------------------------------------------------------------
// Route caches: FIB answers reused for ROUTE_CACHE_TTL_NS, per CPU
// ---------------------------------------------------------------------------------------

/// Keeps this test's thread on one CPU, so that every run meets the same per-CPU cache.
fn stay_on_one_cpu() {
    pin_to_cpu(0).expect("pinning the test thread to CPU 0");
}

/// Longer than the datapath keeps a FIB answer.
fn past_route_cache() {
    std::thread::sleep(Duration::from_nanos(ROUTE_CACHE_TTL_NS) + Duration::from_millis(50));
}

const NEW_MAC: Mac = [0x02, 0x00, 0x5e, 0x10, 0x00, 0x01];

/// Runs `kind` on `frame` (a redirect is expected) and returns the destination MAC.
fn destination_mac(h: &DatapathLab, what: &str, kind: ProgramKind, frame: &[u8]) -> Mac {
    let out = check(h, what, kind, frame, ctx_for(h, kind), redirect_at(kind));
    source_macs(&out.data).0
}

/// Runs `kind` on `frame` with `old_mac` as the neighbour's MAC, lets `change` make it
/// [`NEW_MAC`], and checks that the datapath keeps the cached MAC while the cache is
/// young (when the runs were quick enough to tell: slow machines, emulated ones, take
/// longer than the cache's life to run `ip`) and uses the new one once it is old.
fn assert_cached_then_renewed(
    h: &DatapathLab,
    what: &str,
    kind: ProgramKind,
    frame: &[u8],
    old_mac: Mac,
    change: impl FnOnce(),
) {
    let started = Instant::now();
    assert_eq!(
        destination_mac(h, what, kind, frame),
        old_mac,
        "{what}: before"
    );
    change();
    let mac = destination_mac(h, what, kind, frame);
    // The coarse clock lags by up to a tick.
    let young = Duration::from_nanos(ROUTE_CACHE_TTL_NS) - Duration::from_millis(30);
    if started.elapsed() < young {
        assert_eq!(mac, old_mac, "{what}: the cached MAC, right after");
    }
    past_route_cache();
    let mac = destination_mac(h, what, kind, frame);
    assert_eq!(mac, NEW_MAC, "{what}: the new MAC, once the cache is old");
}

#[test]
fn a_new_gateway_mac_reaches_the_datapath_within_the_route_cache_time() {
    stay_on_one_cpu();
    let h = setup("gwcache");
    for (family, gateway) in [
        (IpFamily::V4, IpAddr::from(GATEWAY_IPV4)),
        (IpFamily::V6, IpAddr::from(GATEWAY_IPV6)),
    ] {
        let what = format!("{family:?}");
        let input = pod_frame(family, SRC, DST, udp(40000, 5000)).build();
        let change = || set_neighbour(h.lab().node(), gateway, &NEW_MAC, NODE_UPLINK).unwrap();
        let kind = ProgramKind::PodIngress;
        assert_cached_then_renewed(&h, &what, kind, &input, h.gateway_mac(), change);
    }
}

#[test]
fn a_new_pod_mac_reaches_the_datapath_within_the_route_cache_time() {
    stay_on_one_cpu();
    let h = setup("podcache");
    h.set_pod_neighbours(DST, true).unwrap();
    let pod_mac = h.pod_mac(DST).unwrap();
    for family in FAMILIES {
        let what = format!("{family:?} back from the gateway");
        let back = from_gateway(&h, pod_frame(family, SRC, DST, udp(40000, 5000)));
        let (pod, dev) = (pod_ip(DST, family), h.lab().pod_host_ifname(DST));
        let change = || set_neighbour(h.lab().node(), pod, &NEW_MAC, dev).unwrap();
        let kind = ProgramKind::UplinkIngress;
        assert_cached_then_renewed(&h, &what, kind, &back, pod_mac, change);
    }
}
