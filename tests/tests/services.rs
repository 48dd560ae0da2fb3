//! Service traffic: Pod → ClusterIP → Pod on the same node, with kube-proxy-style
//! iptables rules in the node's namespace. The Pod-to-Pod leg after the node's DNAT
//! goes through the gateway, and so do the backend's replies, with the backend's own
//! source; the client gets them with the ClusterIP as source; a Pod reaching itself
//! through its Service stays local.
//!
//! Needs root (network namespaces, BPF) and iptables.

use std::{
    io::{Read as _, Write as _},
    net::{IpAddr, SocketAddr},
    time::Duration,
};

use aya::maps::{HashMap, Map, MapData};
use visibility_common::{
    flow::{FlowKey, NatLeg},
    map_names,
};
use visibility_tests::{
    lab::{IpFamily, Lab, Reply, TcpServer, UdpServer},
    node::Node,
};

const TIMEOUT: Duration = Duration::from_secs(3);
const SERVICE_PORT: u16 = 80;
const TARGET_PORT: u16 = 8080;

fn cluster_ip(family: IpFamily) -> IpAddr {
    match family {
        IpFamily::V4 => "10.96.0.10".parse().unwrap(),
        IpFamily::V6 => "fd00:96::10".parse().unwrap(),
    }
}

/// The nat rules kube-proxy (iptables mode) writes for a ClusterIP Service with one
/// endpoint, TCP and UDP: DNAT in PREROUTING/OUTPUT, the masquerade mark for hairpin
/// traffic (an endpoint reaching itself), and masquerading of marked packets.
fn kube_proxy_rules(family: IpFamily, service: IpAddr, endpoint: IpAddr) -> String {
    let (host, endpoint_dest) = match family {
        IpFamily::V4 => ("32", format!("{endpoint}:{TARGET_PORT}")),
        IpFamily::V6 => ("128", format!("[{endpoint}]:{TARGET_PORT}")),
    };
    let mut rules = String::from(
        "*nat\n:KUBE-SERVICES - [0:0]\n:KUBE-MARK-MASQ - [0:0]\n:KUBE-POSTROUTING - [0:0]\n:KUBE-SVC-TEST - [0:0]\n:KUBE-SEP-TEST - [0:0]\n\
         -A PREROUTING -m comment --comment \"kubernetes service portals\" -j KUBE-SERVICES\n\
         -A OUTPUT -m comment --comment \"kubernetes service portals\" -j KUBE-SERVICES\n\
         -A POSTROUTING -m comment --comment \"kubernetes postrouting rules\" -j KUBE-POSTROUTING\n\
         -A KUBE-MARK-MASQ -j MARK --or-mark 0x4000\n\
         -A KUBE-POSTROUTING -m mark ! --mark 0x4000/0x4000 -j RETURN\n\
         -A KUBE-POSTROUTING -j MARK --xor-mark 0x4000\n\
         -A KUBE-POSTROUTING -j MASQUERADE --random-fully\n",
    );
    for protocol in ["tcp", "udp"] {
        rules.push_str(&format!(
            "-A KUBE-SERVICES -d {service}/{host} -p {protocol} -m {protocol} --dport {SERVICE_PORT} -j KUBE-SVC-TEST\n"
        ));
    }
    rules.push_str("-A KUBE-SVC-TEST -j KUBE-SEP-TEST\n");
    rules.push_str(&format!(
        "-A KUBE-SEP-TEST -s {endpoint}/{host} -j KUBE-MARK-MASQ\n"
    ));
    for protocol in ["tcp", "udp"] {
        rules.push_str(&format!("-A KUBE-SEP-TEST -p {protocol} -m {protocol} -j DNAT --to-destination {endpoint_dest}\n"));
    }
    rules.push_str("COMMIT\n");
    rules
}

fn install_service(lab: &Lab, family: IpFamily, endpoint: IpAddr) {
    let restore = match family {
        IpFamily::V4 => "iptables-restore",
        IpFamily::V6 => "ip6tables-restore",
    };
    let rules = kube_proxy_rules(family, cluster_ip(family), endpoint);
    lab.node()
        .run_with_stdin(restore, ["--noflush"], &rules)
        .unwrap();
}

/// One TCP and one UDP request from `client` to the Service; both must be answered,
/// which also proves the replies carry the ClusterIP as source (the client's sockets
/// are connected to it).
fn request_service(lab: &Lab, client: usize, server: usize, family: IpFamily) {
    let service = cluster_ip(family);
    let bind = SocketAddr::new(lab.pod_ip(server, family), TARGET_PORT);
    let tcp = TcpServer::start(
        lab.pod_ns(server),
        bind,
        1,
        Reply::Fixed(b"hello from the endpoint".to_vec()),
        TIMEOUT,
    )
    .unwrap();
    let udp = UdpServer::start(lab.pod_ns(server), bind, 1, Reply::Echo, TIMEOUT).unwrap();
    let reply = lab
        .pod_ns(client)
        .tcp_request(SocketAddr::new(service, SERVICE_PORT), b"GET", TIMEOUT)
        .unwrap();
    assert_eq!(reply, b"hello from the endpoint");
    let echo = lab
        .pod_ns(client)
        .udp_request(SocketAddr::new(service, SERVICE_PORT), b"ping", TIMEOUT)
        .unwrap();
    assert_eq!(echo, b"ping");
    // Between two Pods the endpoint sees the client's own address: no SNAT on the
    // Pod-to-Pod leg. A Pod reaching itself is masqueraded by kube-proxy.
    for received in tcp.join().unwrap().iter().chain(udp.join().unwrap().iter()) {
        if client != server {
            assert_eq!(received.peer.ip(), lab.pod_ip(client, family));
        }
    }
}

fn gateway_saw(lab: &Lab, client: usize, server: usize, family: IpFamily) -> bool {
    lab.gateway_flows().unwrap().iter().any(|f| {
        f.is_between(lab.pod_ip(client, family), lab.pod_ip(server, family))
            && f.dport == Some(TARGET_PORT)
    })
}

fn service_node(tag: &str, family: IpFamily) -> Node {
    let node = Node::new(tag, 2).unwrap();
    install_service(&node.lab, family, node.lab.pod_ip(1, family));
    node
}

fn for_both_families(test: impl Fn(IpFamily, &str)) {
    test(IpFamily::V4, "v4");
    test(IpFamily::V6, "v6");
}

#[test]
fn service_traffic_works_and_stays_local_without_visibility() {
    for_both_families(|family, name| {
        let node = service_node(&format!("svc-off-{name}"), family);
        // No daemon: plain kube-proxy behaviour.
        request_service(&node.lab, 0, 1, family);
        assert!(
            !gateway_saw(&node.lab, 0, 1, family),
            "{family:?}: the gateway saw Service traffic without visibility"
        );
    });
}

#[test]
fn the_pod_to_pod_leg_of_service_traffic_goes_through_the_gateway() {
    for_both_families(|family, name| {
        let mut node = service_node(&format!("svc-on-{name}"), family);
        node.start().unwrap();
        request_service(&node.lab, 0, 1, family);
        assert!(
            gateway_saw(&node.lab, 0, 1, family),
            "{family:?}: {:?}",
            node.lab.gateway_flows()
        );
        // The flow map has both views: the Pod to the Service, and the Pod-to-Pod leg.
        let service = cluster_ip(family).to_string();
        let to_service = node
            .flows(&[&format!("dst={service}"), "proto=tcp"])
            .unwrap();
        assert!(
            to_service.iter().any(|f| f["path"] == "not_same_node"),
            "{to_service:?}"
        );
        let leg = node
            .flows(&[&format!("dst={}", node.lab.pod_ip(1, family)), "proto=tcp"])
            .unwrap();
        assert!(
            leg.iter().any(|f| f["path"] == "via_gateway_service_leg"
                && f["connection"]["dest_port"] == TARGET_PORT),
            "{leg:?}"
        );
        assert!(
            node.counter("pod_egress", "redirected_service_leg")
                .unwrap()
                >= 2
        );
        // The backend's replies cross the gateway too, with its own source.
        assert!(
            node.counter("pod_egress", "redirected_service_reply")
                .unwrap()
                >= 1
        );
        // Visibility off: Service traffic works and stays on the node.
        node.cli_ok(&["disable"]).unwrap();
        node.lab.flush_gateway_flows().unwrap();
        request_service(&node.lab, 0, 1, family);
        assert!(!gateway_saw(&node.lab, 0, 1, family));
    });
}

#[test]
fn a_gateway_firewall_rule_stops_the_pod_to_pod_leg() {
    for_both_families(|family, name| {
        let mut node = service_node(&format!("svc-fw-{name}"), family);
        node.start().unwrap();
        let lab = &node.lab;
        lab.block(lab.pod_ip(0, family), lab.pod_ip(1, family))
            .unwrap();
        let service = SocketAddr::new(cluster_ip(family), SERVICE_PORT);
        let bind = SocketAddr::new(lab.pod_ip(1, family), TARGET_PORT);
        let server = TcpServer::start(lab.pod_ns(1), bind, 1, Reply::Echo, TIMEOUT).unwrap();
        let attempt = lab
            .pod_ns(0)
            .tcp_request(service, b"x", Duration::from_millis(700));
        assert!(attempt.is_err(), "{family:?}: the block did not stop it");
        drop(server);
        assert!(lab.gateway_dropped_packets().unwrap() > 0);
        lab.unblock(lab.pod_ip(0, family), lab.pod_ip(1, family))
            .unwrap();
        request_service(lab, 0, 1, family);
    });
}

#[test]
fn a_pod_reaching_itself_through_its_service_stays_local() {
    for_both_families(|family, name| {
        let mut node = service_node(&format!("svc-self-{name}"), family);
        node.start().unwrap();
        node.lab.flush_gateway_flows().unwrap();
        // Pod 1 is the Service's endpoint and its client.
        request_service(&node.lab, 1, 1, family);
        let flows = node.lab.gateway_flows().unwrap();
        assert!(
            !flows.iter().any(|f| f.involves(node.lab.pod_ip(1, family))),
            "{family:?}: hairpin left the node: {flows:?}"
        );
    });
}

#[test]
fn a_backend_elsewhere_changes_nothing() {
    for_both_families(|family, name| {
        let mut node = Node::new(&format!("svc-away-{name}"), 1).unwrap();
        // The endpoint is the gateway's address: another node, as far as this one knows.
        let endpoint = Lab::gateway_ip(family);
        install_service(&node.lab, family, endpoint);
        node.start().unwrap();
        let bind = SocketAddr::new(endpoint, TARGET_PORT);
        let server = TcpServer::start(
            node.lab.gateway(),
            bind,
            1,
            Reply::Fixed(b"elsewhere".to_vec()),
            TIMEOUT,
        )
        .unwrap();
        let reply = node
            .lab
            .pod_ns(0)
            .tcp_request(
                SocketAddr::new(cluster_ip(family), SERVICE_PORT),
                b"x",
                TIMEOUT,
            )
            .unwrap();
        assert_eq!(reply, b"elsewhere");
        server.join().unwrap();
        assert_eq!(
            node.counter("pod_egress", "redirected_service_leg")
                .unwrap(),
            0
        );
    });
}

/// Empties the node's NAT-leg map, as an eviction of every entry would.
fn flush_nat_legs(node: &Node) -> usize {
    let path = node.pin_dir.join("maps").join(map_names::NAT_LEGS);
    let data = MapData::from_pin(&path).unwrap();
    let mut legs: HashMap<MapData, FlowKey, NatLeg> =
        HashMap::try_from(Map::from_map_data(data).unwrap()).unwrap();
    let keys: Vec<FlowKey> = legs.keys().filter_map(Result::ok).collect();
    for key in &keys {
        let _ = legs.remove(key);
    }
    keys.len()
}

/// Both directions of a Service connection cross the gateway: its flow log has the
/// Pod-to-Pod leg with replies, not `[UNREPLIED]`. Emptying the NAT-leg map in the middle
/// of a connection breaks nothing: every reply still reaches the client from the
/// ClusterIP.
#[test]
fn both_directions_cross_the_gateway_and_the_nat_leg_map_can_be_flushed() {
    for_both_families(|family, tag| {
        let mut node = service_node(&format!("s-both-{tag}"), family);
        node.start().unwrap();
        let lab = &node.lab;
        lab.flush_gateway_flows().unwrap();
        let listener = lab
            .pod_ns(1)
            .tcp_listen(SocketAddr::new(lab.pod_ip(1, family), TARGET_PORT))
            .unwrap();
        let server = std::thread::spawn(move || {
            let (mut stream, _) = listener.accept().unwrap();
            stream.set_read_timeout(Some(TIMEOUT)).unwrap();
            let mut buf = [0u8; 64];
            loop {
                match stream.read(&mut buf) {
                    Ok(0) | Err(_) => break,
                    Ok(n) => stream.write_all(&buf[..n]).unwrap(),
                }
            }
        });
        let mut client = lab
            .pod_ns(0)
            .tcp_connect(SocketAddr::new(cluster_ip(family), SERVICE_PORT), TIMEOUT)
            .unwrap();
        client.set_read_timeout(Some(TIMEOUT)).unwrap();
        let mut flushed = 0;
        for round in 0..10u8 {
            if round == 5 {
                flushed = flush_nat_legs(&node);
            }
            let line = [b'a' + round; 16];
            client.write_all(&line).unwrap();
            let mut echo = [0u8; 16];
            client
                .read_exact(&mut echo)
                .unwrap_or_else(|e| panic!("{family:?}: round {round}: {e}"));
            assert_eq!(echo, line, "{family:?}: round {round}");
        }
        assert!(flushed > 0, "{family:?}: the map held the reply's entry");
        assert_eq!(client.peer_addr().unwrap().ip(), cluster_ip(family));
        drop(client);
        server.join().unwrap();
        let (client_ip, backend_ip) = (lab.pod_ip(0, family), lab.pod_ip(1, family));
        let legs: Vec<_> = lab
            .gateway_flows()
            .unwrap()
            .into_iter()
            .filter(|f| f.is_between(client_ip, backend_ip) && f.dport == Some(TARGET_PORT))
            .collect();
        assert!(
            legs.iter().any(|f| f.reply_packets >= 10),
            "{family:?}: the gateway saw the backend's replies: {legs:?}"
        );
        assert!(
            node.counter("pod_egress", "redirected_service_reply")
                .unwrap()
                >= 10
        );
    });
}

/// A backend's ICMP error about Service traffic (a UDP request to a port nobody
/// listens on) reaches the client: the node's NAT rewrote it inside and out, so it
/// stays local, and the client's socket sees the refusal.
#[test]
fn an_icmp_error_from_a_backend_reaches_the_client() {
    for_both_families(|family, tag| {
        let mut node = service_node(&format!("s-icmp-{tag}"), family);
        node.start().unwrap();
        let socket = node
            .lab
            .pod_ns(0)
            .udp_bind(SocketAddr::new(
                match family {
                    IpFamily::V4 => IpAddr::from([0, 0, 0, 0]),
                    IpFamily::V6 => IpAddr::from([0u16; 8]),
                },
                0,
            ))
            .unwrap();
        socket
            .connect(SocketAddr::new(cluster_ip(family), SERVICE_PORT))
            .unwrap();
        socket.set_read_timeout(Some(TIMEOUT)).unwrap();
        // The first datagram draws the error; the socket reports it on the next call.
        socket.send(b"anyone?").unwrap();
        let refused = (0..3).any(|_| {
            let result = socket.recv(&mut [0u8; 16]).err();
            let _ = socket.send(b"anyone?");
            result.is_some_and(|e| e.kind() == std::io::ErrorKind::ConnectionRefused)
        });
        assert!(refused, "{family:?}: the client never saw the refusal");
        assert!(
            node.counter("pod_egress", "pass_service_reply_unrestorable")
                .unwrap()
                >= 1
        );
    });
}
