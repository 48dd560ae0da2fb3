//! The node's uplink: the veth pair between the node's `eth0` and the gateway's, with
//! its addresses, routes and per-interface settings. The lab builds it; a test may
//! remove it and add it again, as a node whose NIC goes away and comes back.

use anyhow::Result;

use super::{
    Lab,
    addresses::{
        GATEWAY_IFNAME, GATEWAY_IPV4, GATEWAY_IPV6, NODE_IPV4, NODE_IPV6, NODE_UPLINK, POD_CIDR_V4,
        POD_CIDR_V6,
    },
};

impl Lab {
    /// The node's rp_filter setting: strict (1) or loose (2), as configured.
    pub(super) fn rp_filter(&self) -> &'static str {
        if self.config.strict_rp_filter {
            "1"
        } else {
            "2"
        }
    }

    /// Creates the uplink pair straight into the two namespaces and configures both
    /// ends: addresses, the node's default routes, the gateway's routes to the Pods.
    pub fn add_uplink(&self) -> Result<()> {
        let (gw, node) = (self.gateway(), self.node());
        gw.run(
            "ip",
            [
                "link",
                "add",
                GATEWAY_IFNAME,
                "type",
                "veth",
                "peer",
                "name",
                NODE_UPLINK,
                "netns",
                node.name(),
            ],
        )?;
        gw.sysctl(&[
            ("net.ipv6.conf.eth0.accept_dad", "0"),
            ("net.ipv4.conf.eth0.send_redirects", "0"),
            ("net.ipv4.conf.eth0.rp_filter", "0"),
        ])?;
        gw.ip_batch(&[
            format!("link set {GATEWAY_IFNAME} up"),
            format!("addr add {GATEWAY_IPV4}/24 dev {GATEWAY_IFNAME}"),
            format!("addr add {GATEWAY_IPV6}/64 dev {GATEWAY_IFNAME} nodad"),
            format!("route add {POD_CIDR_V4} via {NODE_IPV4} dev {GATEWAY_IFNAME}"),
            format!("route add {POD_CIDR_V6} via {NODE_IPV6} dev {GATEWAY_IFNAME}"),
        ])?;
        node.sysctl(&[
            ("net.ipv6.conf.eth0.accept_dad", "0"),
            ("net.ipv4.conf.eth0.rp_filter", self.rp_filter()),
        ])?;
        self.configure_node_end(NODE_UPLINK)
    }

    /// Brings the node's end of the uplink, now called `name`, up with its addresses
    /// and the default routes. Idempotent.
    fn configure_node_end(&self, name: &str) -> Result<()> {
        self.node().ip_batch(&[
            format!("link set {name} up"),
            format!("addr replace {NODE_IPV4}/24 dev {name}"),
            format!("addr replace {NODE_IPV6}/64 dev {name} nodad"),
            format!("route replace default via {GATEWAY_IPV4} dev {name}"),
            format!("route replace ::/0 via {GATEWAY_IPV6} dev {name}"),
        ])
    }

    /// Renames the node's uplink to `to`, as a node whose NIC gets a new name does: the
    /// kernel renames only a down interface, so it goes down (losing its routes and
    /// IPv6 address) and comes back up configured as before.
    pub fn rename_uplink(&self, to: &str) -> Result<()> {
        self.node().ip_batch(&[
            format!("link set {NODE_UPLINK} down"),
            format!("link set {NODE_UPLINK} name {to}"),
        ])?;
        self.configure_node_end(to)
    }

    /// Deletes the uplink pair (both ends go, with their addresses and routes).
    pub fn remove_uplink(&self) -> Result<()> {
        self.node().run("ip", ["link", "del", NODE_UPLINK])?;
        Ok(())
    }
}
