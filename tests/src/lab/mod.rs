//! A GKE node, its Pods and its VPC gateway emulated in network namespaces.
//!
//! # Topology
//!
//! ```text
//!  pod ns 0            pod ns 1                node ns                          gateway ns
//! +-----------+       +-----------+           +------------------------------+  +------------------+
//! | eth0      |       | eth0      |           | veth0  10.52.0.1/32 fe80::1  |  |                  |
//! | 10.52.0.2 |<----->|           |---------->| veth1  10.52.0.1/32 fe80::1  |  | eth0 10.128.0.1  |
//! | fd00:52::2|       | 10.52.0.3 |           | eth0 10.128.0.2 fd00:128::2  |<>| fd00:128::1      |
//! +-----------+       +-----------+           +------------------------------+  +------------------+
//! ```
//!
//! This is the ptp CNI layout that GKE uses:
//!
//! * **Pod `i`** (0-based) has its own namespace. Its `eth0` carries
//!   `10.52.0.(i+2)/24 noprefixroute` and `fd00:52::(i+2)/64 nodad noprefixroute`.
//!   It has a link route to `10.52.0.1`, `10.52.0.0/24 via 10.52.0.1` and
//!   `default via 10.52.0.1`, plus `fd00:52::/64 via fe80::1` and `default via fe80::1`.
//! * **The node** has one host-side veth `vethI` for each Pod. Every one of them carries
//!   `10.52.0.1/32` and `fe80::1/64`, plus the host routes
//!   `10.52.0.(i+2) dev vethI scope host` and `fd00:52::(i+2) dev vethI`. The uplink `eth0`
//!   carries `10.128.0.2/24` and `fd00:128::2/64`, with default routes via the gateway.
//!   IPv4 and IPv6 forwarding are on. rp_filter is strict (1) on `all`, `default` and
//!   `eth0` unless [`LabConfig::strict_rp_filter`] is false, which makes it loose (2).
//! * **The gateway** (the VPC) has `eth0` with `10.128.0.1/24` and `fd00:128::1/64`,
//!   forwarding on, ICMP redirects off, and routes for the Pod ranges via the node. It has
//!   no default route, so nothing leaves the machine. The nftables table `inet lab` has a
//!   forward chain that counts every forwarded packet (see
//!   [`Lab::gateway_forwarded_packets`]), runs conntrack with accounting on (so
//!   [`Lab::gateway_flows`] is a flow log) and drops blocked address pairs (see
//!   [`Lab::block`]).
//!
//! With plain routing, Pod-to-Pod traffic stays on the node: the gateway sees none of it.
//!
//! [`Lab::neighbour`] adds a second node behind the same gateway, with ranges of its
//! own ([`Site`]); traffic between the nodes' Pods goes node → gateway → node.
//!
//! # Parallel use and cleanup
//!
//! Every [`Lab`] gets a unique name prefix `lab-<tag>-<pid>-<counter>`; its namespaces are
//! `<prefix>-gw`, `<prefix>-node` and `<prefix>-p<i>`. All interfaces are created directly
//! inside the lab's namespaces, and nothing in the root namespace is changed. Dropping the
//! [`Lab`] (also while unwinding from a panic) deletes all its namespaces. Namespaces left
//! behind by a process that was killed are removed by the next [`Lab::new`] (see
//! [`cleanup_stale_labs`]).
//!
//! Commands run in a namespace through `nsenter --net=/run/netns/NAME`, which keeps the
//! mount namespace (unlike `ip netns exec`, which remounts `/sys` and hides bpffs).
//!
//! # Requirements
//!
//! Root, iproute2, nftables, conntrack (conntrack-tools), util-linux `nsenter`, procps
//! `sysctl` and iputils `ping`.

//!
//! # Files
//!
//! This file builds and removes labs ([`Lab`], [`LabConfig`], [`Pod`]). The rest:
//! [`addresses`] (the address plan), [`netns`] (a namespace handle and commands in it),
//! [`traffic`] (pings, TCP and UDP from inside a namespace), [`servers`] (TCP and UDP
//! servers in a namespace), [`gateway`] (the gateway's nftables firewall and counters),
//! [`conntrack`] (its flow log), [`cleanup`] (what labs leave behind), [`site`] (each
//! node's addresses behind the gateway), [`uplink`] (the node's uplink, which tests may
//! remove and add again), [`process`] (commands and background processes), [`deadline`]
//! (reads that give up), and [`cpu`] (pinning a thread to a CPU).

pub mod addresses;
pub mod cleanup;
pub mod conntrack;
pub mod cpu;
pub mod deadline;
pub mod gateway;
pub mod netns;
pub mod process;
pub mod servers;
pub mod site;
pub mod traffic;
pub mod uplink;

use std::{
    net::{IpAddr, Ipv4Addr, Ipv6Addr},
    sync::Once,
};

use anyhow::{Context, Result, ensure};

use self::cleanup::remove_pod_parts;
pub use self::{
    addresses::*,
    cleanup::cleanup_stale_labs,
    conntrack::{Flow, parse_conntrack},
    cpu::pin_to_cpu,
    deadline::udp_recv,
    gateway::GATEWAY_NFT_TABLE,
    netns::{Netns, list_netns},
    process::Background,
    servers::{Received, Reply, TcpServer, UdpServer},
    site::Site,
    traffic::DEFAULT_TIMEOUT,
};
use crate::unique;

/// How to build a [`Lab`].
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct LabConfig {
    /// How many Pods to create up front (more can be added with [`Lab::add_pod`]).
    pub pods: usize,
    /// Strict reverse-path filtering on the node (rp_filter=1, as on Container-Optimized
    /// OS); `false` makes it loose (rp_filter=2).
    pub strict_rp_filter: bool,
}

impl Default for LabConfig {
    /// Three Pods, strict rp_filter.
    fn default() -> Self {
        Self {
            pods: 3,
            strict_rp_filter: true,
        }
    }
}

/// One Pod of a [`Lab`].
#[derive(Debug, Clone)]
pub struct Pod {
    index: usize,
    site: Site,
    netns: Netns,
    host_ifname: String,
    host_ifindex: u32,
}

impl Pod {
    /// The Pod's index in its lab.
    pub fn index(&self) -> usize {
        self.index
    }
    /// The Pod's namespace.
    pub fn netns(&self) -> &Netns {
        &self.netns
    }
    /// The Pod's IPv4 address.
    pub fn ipv4(&self) -> Ipv4Addr {
        self.site.pod_ipv4(self.index)
    }
    /// The Pod's IPv6 address.
    pub fn ipv6(&self) -> Ipv6Addr {
        self.site.pod_ipv6(self.index)
    }
    /// The name of the Pod's host-side veth in the node namespace.
    pub fn host_ifname(&self) -> &str {
        &self.host_ifname
    }
    /// The ifindex of the Pod's host-side veth in the node namespace.
    pub fn host_ifindex(&self) -> u32 {
        self.host_ifindex
    }
}

static STALE_CLEANUP: Once = Once::new();

/// A node with its Pods and its gateway, each in its own network namespace. See the
/// [module documentation](self) for the topology. Dropping it removes everything (a
/// [neighbour](Lab::neighbour) leaves the gateway it shares).
#[derive(Debug)]
pub struct Lab {
    prefix: String,
    config: LabConfig,
    site: Site,
    /// Whether this lab made the gateway and removes it; a neighbour shares it.
    owns_gateway: bool,
    gateway: Netns,
    node: Netns,
    pods: Vec<Option<Pod>>,
}

impl Lab {
    /// Builds a lab. `tag` names it (only its ASCII letters and digits are used, at most
    /// 12): the namespaces are called `lab-<tag>-<pid>-<counter>-{gw,node,p<i>}`.
    ///
    /// On error, everything created so far is removed.
    pub fn new(tag: &str, config: LabConfig) -> Result<Lab> {
        let prefix = format!("lab-{}", unique::name(tag));
        let gateway = Netns::from_name(format!("{prefix}-gw"));
        Self::build(prefix, config, Site::FIRST, gateway, true)
    }

    /// A second node behind this lab's gateway (its `eth1`), with Pod ranges of its own
    /// ([`Site`]), named like a lab of its own (`tag`). Dropping it (before this lab)
    /// removes its namespaces and its link, not the gateway.
    pub fn neighbour(&self, tag: &str, config: LabConfig) -> Result<Lab> {
        ensure!(self.owns_gateway, "no neighbour of a neighbour");
        let prefix = format!("lab-{}", unique::name(tag));
        Self::build(prefix, config, Site(1), self.gateway.clone(), false)
    }

    fn build(
        prefix: String,
        config: LabConfig,
        site: Site,
        gateway: Netns,
        owns_gateway: bool,
    ) -> Result<Lab> {
        ensure!(config.pods <= MAX_PODS, "at most {MAX_PODS} pods");
        STALE_CLEANUP.call_once(|| {
            if let Err(e) = cleanup_stale_labs() {
                eprintln!("lab: cleaning up stale labs: {e:#}");
            }
        });
        let mut lab = Lab {
            site,
            owns_gateway,
            gateway,
            node: Netns::from_name(format!("{prefix}-node")),
            prefix,
            config,
            pods: Vec::new(),
        };
        // If anything fails, `lab` drops here and removes what exists.
        lab.setup()
            .with_context(|| format!("setting up lab {}", lab.prefix))?;
        Ok(lab)
    }

    fn setup(&mut self) -> Result<()> {
        if self.owns_gateway {
            gateway::setup(&Netns::create(self.gateway.name())?)?;
        }
        let node = Netns::create(self.node.name())?;
        node.sysctl(&[
            ("net.ipv6.conf.all.accept_dad", "0"),
            ("net.ipv6.conf.default.accept_dad", "0"),
        ])?;
        let rp = self.rp_filter();
        node.sysctl(&[
            ("net.ipv4.ip_forward", "1"),
            ("net.ipv6.conf.all.forwarding", "1"),
            ("net.ipv6.conf.default.forwarding", "1"),
            ("net.ipv4.conf.all.rp_filter", rp),
            ("net.ipv4.conf.default.rp_filter", rp),
        ])?;
        self.add_uplink()?;

        for _ in 0..self.config.pods {
            self.add_pod()?;
        }
        Ok(())
    }

    /// The lab's unique name prefix; every namespace it creates is called `<prefix>-...`.
    pub fn prefix(&self) -> &str {
        &self.prefix
    }

    /// The configuration the lab was built with.
    pub fn config(&self) -> &LabConfig {
        &self.config
    }

    /// The node's namespace.
    pub fn node(&self) -> &Netns {
        &self.node
    }

    /// The gateway's (VPC's) namespace.
    pub fn gateway(&self) -> &Netns {
        &self.gateway
    }

    /// All namespaces of the lab that currently exist by name: gateway, node, Pods.
    pub fn namespaces(&self) -> Vec<&Netns> {
        let mut all = vec![&self.gateway, &self.node];
        all.extend(self.pods().map(Pod::netns));
        all
    }

    /// Adds a Pod and returns its index. Indices are never reused within a lab.
    pub fn add_pod(&mut self) -> Result<usize> {
        let index = self.pods.len();
        ensure!(index < MAX_PODS, "at most {MAX_PODS} pods");
        let netns = Netns::from_name(format!("{}-p{index}", self.prefix));
        // Reserve the slot first, so a half-built Pod is removed on drop.
        self.pods.push(None);
        let host_ifname = pod_host_ifname(index);
        let result = self.build_pod(index, &netns, &host_ifname);
        match result {
            Ok(host_ifindex) => {
                self.pods[index] = Some(Pod {
                    index,
                    site: self.site,
                    netns,
                    host_ifname,
                    host_ifindex,
                });
                Ok(index)
            }
            Err(e) => {
                remove_pod_parts(&self.node, &netns, &host_ifname);
                Err(e.context(format!("adding pod {index}")))
            }
        }
    }

    fn build_pod(&self, index: usize, pod: &Netns, host_if: &str) -> Result<u32> {
        let node = &self.node;
        Netns::create(pod.name())?;
        pod.sysctl(&[
            ("net.ipv6.conf.all.accept_dad", "0"),
            ("net.ipv6.conf.default.accept_dad", "0"),
        ])?;
        let site = self.site;
        let (v4, v6) = (
            site.pod_ip(index, IpFamily::V4),
            site.pod_ip(index, IpFamily::V6),
        );
        let (cidr_v4, cidr_v6) = (site.pod_cidr(IpFamily::V4), site.pod_cidr(IpFamily::V6));
        let pod_gateway_v4 = site.pod_gateway_ipv4();
        node.ip_batch(&[
            format!(
                "link add {host_if} type veth peer name {POD_IFNAME} netns {}",
                pod.name()
            ),
            format!("link set {host_if} up"),
            format!("addr add {pod_gateway_v4}/32 dev {host_if}"),
            format!("addr add {POD_GATEWAY_V6}/64 dev {host_if} nodad"),
            format!("route add {v4}/32 dev {host_if} scope host"),
            format!("route add {v6}/128 dev {host_if}"),
        ])?;
        node.sysctl(&[(&format!("net.ipv6.conf.{host_if}.accept_dad"), "0")])?;
        pod.sysctl(&[(&format!("net.ipv6.conf.{POD_IFNAME}.accept_dad"), "0")])?;
        pod.ip_batch(&[
            format!("link set {POD_IFNAME} up"),
            format!("addr add {v4}/24 dev {POD_IFNAME} noprefixroute"),
            format!("addr add {v6}/64 dev {POD_IFNAME} nodad noprefixroute"),
            format!("route add {pod_gateway_v4}/32 dev {POD_IFNAME} scope link"),
            format!("route add {cidr_v4} via {pod_gateway_v4} dev {POD_IFNAME}"),
            format!("route add default via {pod_gateway_v4} dev {POD_IFNAME}"),
            format!("route add {cidr_v6} via {POD_GATEWAY_V6} dev {POD_IFNAME}"),
            format!("route add ::/0 via {POD_GATEWAY_V6} dev {POD_IFNAME}"),
        ])?;
        node.ifindex(host_if)
    }

    /// Removes Pod `index`: its namespace, its host-side veth and (with it) its host routes.
    pub fn remove_pod(&mut self, index: usize) -> Result<()> {
        let pod = self
            .pods
            .get_mut(index)
            .and_then(Option::take)
            .with_context(|| format!("no pod {index}"))?;
        pod.netns.delete()?;
        // The veth normally goes with the Pod's namespace; it stays if something (a socket,
        // a process) still holds that namespace.
        let _ = self
            .node
            .run("ip", ["link", "del", pod.host_ifname.as_str()]);
        Ok(())
    }

    /// Pod `index`.
    ///
    /// # Panics
    /// If there is no such Pod (never added, or removed).
    pub fn pod(&self, index: usize) -> &Pod {
        self.try_pod(index)
            .unwrap_or_else(|| panic!("lab {} has no pod {index}", self.prefix))
    }

    /// Pod `index`, if it exists.
    pub fn try_pod(&self, index: usize) -> Option<&Pod> {
        self.pods.get(index).and_then(Option::as_ref)
    }

    /// The Pods that exist, in index order.
    pub fn pods(&self) -> impl Iterator<Item = &Pod> {
        self.pods.iter().flatten()
    }

    /// How many Pods exist.
    pub fn pod_count(&self) -> usize {
        self.pods().count()
    }

    /// Pod `index`'s namespace. Panics like [`Lab::pod`].
    pub fn pod_ns(&self, index: usize) -> &Netns {
        self.pod(index).netns()
    }

    /// Pod `index`'s IPv4 address. Panics like [`Lab::pod`].
    pub fn pod_ipv4(&self, index: usize) -> Ipv4Addr {
        self.pod(index).ipv4()
    }

    /// Pod `index`'s IPv6 address. Panics like [`Lab::pod`].
    pub fn pod_ipv6(&self, index: usize) -> Ipv6Addr {
        self.pod(index).ipv6()
    }

    /// Pod `index`'s address in `family`. Panics like [`Lab::pod`].
    pub fn pod_ip(&self, index: usize, family: IpFamily) -> IpAddr {
        match family {
            IpFamily::V4 => self.pod_ipv4(index).into(),
            IpFamily::V6 => self.pod_ipv6(index).into(),
        }
    }

    /// The name of Pod `index`'s host-side veth in the node namespace. Panics like
    /// [`Lab::pod`].
    pub fn pod_host_ifname(&self, index: usize) -> &str {
        self.pod(index).host_ifname()
    }

    /// The ifindex of Pod `index`'s host-side veth in the node namespace. Panics like
    /// [`Lab::pod`].
    pub fn pod_host_ifindex(&self, index: usize) -> u32 {
        self.pod(index).host_ifindex()
    }

    /// The ifindex of the node's uplink ([`NODE_UPLINK`]) in the node namespace.
    pub fn node_uplink_ifindex(&self) -> Result<u32> {
        self.node.ifindex(NODE_UPLINK)
    }

    /// The node's uplink address in `family`.
    pub fn node_ip(family: IpFamily) -> IpAddr {
        match family {
            IpFamily::V4 => NODE_IPV4.into(),
            IpFamily::V6 => NODE_IPV6.into(),
        }
    }

    /// The gateway's address in `family`.
    pub fn gateway_ip(family: IpFamily) -> IpAddr {
        match family {
            IpFamily::V4 => GATEWAY_IPV4.into(),
            IpFamily::V6 => GATEWAY_IPV6.into(),
        }
    }

    /// The gateway's conntrack table, IPv4 and IPv6 (`conntrack -L -o extended`).
    ///
    /// This holds every connection that crossed or reached the gateway since the last
    /// [`Lab::flush_gateway_flows`] and has not yet expired.
    pub fn gateway_flows(&self) -> Result<Vec<Flow>> {
        gateway::flows(&self.gateway)
    }

    /// The gateway's flows that involve `addr` as source or destination.
    pub fn gateway_flows_involving(&self, addr: impl Into<IpAddr>) -> Result<Vec<Flow>> {
        let addr = addr.into();
        Ok(self
            .gateway_flows()?
            .into_iter()
            .filter(|f| f.involves(addr))
            .collect())
    }

    /// Empties the gateway's conntrack table (both families).
    pub fn flush_gateway_flows(&self) -> Result<()> {
        gateway::flush_flows(&self.gateway)
    }

    /// Drops, at the gateway, packets forwarded from `src` to `dst` (one direction; both
    /// must be of one family). Blocking a pair twice is the same as once.
    pub fn block(&self, src: impl Into<IpAddr>, dst: impl Into<IpAddr>) -> Result<()> {
        gateway::block(&self.gateway, src.into(), dst.into())
    }

    /// Undoes [`Lab::block`] for `src` → `dst`. Succeeds if the pair was not blocked.
    pub fn unblock(&self, src: impl Into<IpAddr>, dst: impl Into<IpAddr>) -> Result<()> {
        gateway::unblock(&self.gateway, src.into(), dst.into())
    }

    /// Undoes every [`Lab::block`].
    pub fn unblock_all(&self) -> Result<()> {
        gateway::unblock_all(&self.gateway)
    }

    /// How many packets entered the gateway's forward path (both families), including any
    /// that a [`Lab::block`] then dropped. Traffic to or from the gateway's own addresses is
    /// not forwarded and not counted.
    pub fn gateway_forwarded_packets(&self) -> Result<u64> {
        Ok(self.gateway_counter("forwarded")?.0)
    }

    /// Packets the gateway sent out of its interface, from its link statistics: what it
    /// forwarded (plus its own few neighbour messages). Unlike
    /// [`Lab::gateway_forwarded_packets`] this also counts on a plain gateway.
    pub fn gateway_transmitted_packets(&self) -> Result<u64> {
        gateway::transmitted_packets(&self.gateway)
    }

    /// Makes the gateway a plain router: removes its nftables table, so neither a
    /// firewall nor connection tracking runs there any more. For measurements that leave
    /// out what the stand-in VPC does with a packet; [`Lab::block`], the flow log and the
    /// nftables counters no longer work afterwards.
    pub fn make_gateway_plain_router(&self) -> Result<()> {
        gateway::remove_firewall(&self.gateway)
    }

    /// How many packets the gateway dropped because of [`Lab::block`].
    pub fn gateway_dropped_packets(&self) -> Result<u64> {
        Ok(self.gateway_counter("dropped")?.0)
    }

    /// Packets and bytes of the named counter (`forwarded` or `dropped`) in the gateway's
    /// nftables table.
    pub fn gateway_counter(&self, name: &str) -> Result<(u64, u64)> {
        gateway::counter(&self.gateway, name)
    }
}

impl Drop for Lab {
    fn drop(&mut self) {
        let mut errors = Vec::new();
        for index in 0..self.pods.len() {
            // Also covers a Pod whose setup failed half-way (its slot is None).
            let pod_ns = Netns::from_name(format!("{}-p{index}", self.prefix));
            if self.pods[index].take().is_some() || pod_ns.exists() {
                remove_pod_parts(&self.node, &pod_ns, &pod_host_ifname(index));
            }
            if pod_ns.exists() {
                errors.push(pod_ns.name().to_string());
            }
        }
        // A neighbour's link goes now, not whenever the kernel gets to its namespace.
        if !self.owns_gateway && self.gateway.exists() {
            let link = self.site.gateway_ifname();
            let _ = self.gateway.run("ip", ["link", "del", link.as_str()]);
        }
        let own = [Some(&self.node), self.owns_gateway.then_some(&self.gateway)];
        for ns in own.into_iter().flatten() {
            if let Err(e) = ns.delete() {
                errors.push(format!("{}: {e:#}", ns.name()));
            }
        }
        if !errors.is_empty() {
            eprintln!("lab {}: cleanup left: {errors:?}", self.prefix);
        }
    }
}
