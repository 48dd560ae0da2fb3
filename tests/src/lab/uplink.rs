//! The node's uplink: the veth pair between the node's `eth0` and the gateway's, with
//! its addresses, routes and per-interface settings. The lab builds it; a test may
//! remove it and add it again, as a node whose NIC goes away and comes back.

use anyhow::Result;

use super::{
    Lab,
    addresses::{IpFamily, NODE_UPLINK},
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

    /// Creates the uplink pair straight into the two namespaces (the gateway's end
    /// named for this lab's [`Site`](super::Site)) and configures both ends: addresses,
    /// the node's default routes, the gateway's routes to the Pods.
    pub fn add_uplink(&self) -> Result<()> {
        let (gw, node, site) = (self.gateway(), self.node(), self.site);
        let gw_if = site.gateway_ifname();
        gw.run(
            "ip",
            [
                "link",
                "add",
                gw_if.as_str(),
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
            (&format!("net.ipv6.conf.{gw_if}.accept_dad"), "0"),
            (&format!("net.ipv4.conf.{gw_if}.send_redirects"), "0"),
            (&format!("net.ipv4.conf.{gw_if}.rp_filter"), "0"),
        ])?;
        let (v4, v6) = (IpFamily::V4, IpFamily::V6);
        gw.ip_batch(&[
            format!("link set {gw_if} up"),
            format!("addr add {}/24 dev {gw_if}", site.gateway_ip(v4)),
            format!("addr add {}/64 dev {gw_if} nodad", site.gateway_ip(v6)),
            format!(
                "route add {} via {} dev {gw_if}",
                site.pod_cidr(v4),
                site.node_ip(v4)
            ),
            format!(
                "route add {} via {} dev {gw_if}",
                site.pod_cidr(v6),
                site.node_ip(v6)
            ),
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
        let site = self.site;
        let (v4, v6) = (IpFamily::V4, IpFamily::V6);
        self.node().ip_batch(&[
            format!("link set {name} up"),
            format!("addr replace {}/24 dev {name}", site.node_ip(v4)),
            format!("addr replace {}/64 dev {name} nodad", site.node_ip(v6)),
            format!(
                "route replace default via {} dev {name}",
                site.gateway_ip(v4)
            ),
            format!("route replace ::/0 via {} dev {name}", site.gateway_ip(v6)),
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
