//! GKE's own intranode visibility, as netd sets it up, reproduced on a lab node: the
//! baseline that the benchmarks compare the datapath against.
//!
//! [`Netd::enable`] does in the node's namespace what netd's policy-routing config set
//! does on a GKE node (IPv4 only, as netd):
//!
//! * **Uplink and gateway** come from a route lookup toward a public address
//!   (`ip route get 8.8.8.8`), as netd finds them.
//! * **Route table 1:** `default via <gateway> dev <uplink>`.
//! * **ip rules:**
//!   * `70` `to X lookup local` for 127.0.0.0/8, 169.254.0.0/16, the node's IPv4 addresses
//!     on the uplink (netd takes the node's InternalIPs) and the Pod gateway (the first
//!     address of the Pod CIDR);
//!   * `74` `fwmark 0x4000/0x4000 lookup main` (kube-proxy's masquerade bit);
//!   * `75` `iif lo lookup main` (host-originated traffic stays on the node);
//!   * `76` `not iif <uplink> lookup 1` (everything from a Pod veth goes to the gateway).
//! * **Sysctls:** `net.ipv4.conf.<uplink>.rp_filter=2` and
//!   `net.ipv4.conf.all.src_valid_mark=1`.
//!
//! [`Netd::disable`] (or dropping the guard) deletes the rules and the route and puts the
//! sysctls back to what they were before.
//!
//! Not reproduced: netd's mangle-table `CONNMARK` save/restore of the 0x4000 mark
//! (`GCP-PREROUTING`/`GCP-POSTROUTING`). It only matters with kube-proxy's masquerade
//! mark, and it would switch conntrack on in the node namespace, which a GKE node pays
//! for anyway (kube-proxy) but this lab's plain-routing baseline does not, so it would
//! charge netd for a cost that is not its own. The optional rules 71 (`ipproto udp`) and
//! 72/73 (`--exclude-dns`) are left out too, as on a default GKE node. netd's 10 s
//! reconcile loop is not needed: nothing else changes these rules in a lab.

use std::net::Ipv4Addr;

use anyhow::{Context as _, Result, bail};

use crate::lab::{Lab, NODE_IPV4, Netns, POD_GATEWAY_V4};

/// netd's route table for redirected traffic.
pub const NETD_TABLE: u32 = 1;
/// kube-proxy's masquerade ("hairpin") mark and mask, which rule 74 keeps local.
pub const HAIRPIN_MARK: u32 = 0x4000;
/// The priority of the `to X lookup local` rules.
pub const LOCAL_TABLE_RULE_PRIORITY: u32 = 70;
/// The priority of the `fwmark 0x4000/0x4000 lookup main` rule.
pub const HAIRPIN_RULE_PRIORITY: u32 = 74;
/// The priority of the `iif lo lookup main` rule.
pub const LOCAL_RULE_PRIORITY: u32 = 75;
/// The priority of the `not iif <uplink> lookup 1` rule.
pub const POLICY_ROUTING_RULE_PRIORITY: u32 = 76;
/// The address netd looks the default route up for.
const PUBLIC_ADDRESS: &str = "8.8.8.8";

/// What netd derives from the node: where redirected traffic leaves, and which
/// destinations must stay local.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct NetdConfig {
    /// The uplink (the default route's interface).
    pub uplink: String,
    /// The VPC gateway (the default route's next hop).
    pub gateway: Ipv4Addr,
    /// The node's IPv4 addresses (netd: the Node's InternalIPs).
    pub node_ips: Vec<Ipv4Addr>,
    /// The Pods' gateway: the first address of the node's IPv4 Pod CIDR.
    pub pod_gateway: Ipv4Addr,
}

impl NetdConfig {
    /// Finds uplink and gateway as netd does (a route lookup toward a public address),
    /// and the node's IPv4 addresses on that uplink.
    pub fn discover(node: &Netns, pod_gateway: Ipv4Addr) -> Result<Self> {
        let out = node.run("ip", ["-j", "-4", "route", "get", PUBLIC_ADDRESS])?;
        let routes: serde_json::Value =
            serde_json::from_str(&out).with_context(|| format!("ip route get: {out}"))?;
        let route = &routes[0];
        let uplink = route["dev"]
            .as_str()
            .with_context(|| format!("no device in {route}"))?
            .to_owned();
        let gateway: Ipv4Addr = route["gateway"]
            .as_str()
            .with_context(|| format!("no gateway in {route}: netd needs a default route"))?
            .parse()?;
        let out = node.run("ip", ["-j", "-4", "addr", "show", "dev", uplink.as_str()])?;
        let links: serde_json::Value = serde_json::from_str(&out)?;
        let node_ips = links[0]["addr_info"]
            .as_array()
            .map(|addrs| {
                addrs
                    .iter()
                    .filter_map(|a| a["local"].as_str()?.parse().ok())
                    .collect::<Vec<Ipv4Addr>>()
            })
            .unwrap_or_default();
        if node_ips.is_empty() {
            bail!("uplink {uplink} has no IPv4 address");
        }
        Ok(Self {
            uplink,
            gateway,
            node_ips,
            pod_gateway,
        })
    }

    /// The lab's values, without asking the node: uplink `eth0`, gateway 10.128.0.1,
    /// node 10.128.0.2, Pod gateway 10.52.0.1.
    pub fn for_lab() -> Self {
        Self {
            uplink: crate::lab::NODE_UPLINK.to_owned(),
            gateway: crate::lab::GATEWAY_IPV4,
            node_ips: vec![NODE_IPV4],
            pod_gateway: POD_GATEWAY_V4,
        }
    }

    /// The `ip rule` arguments (after `add`/`del`) that netd installs, in priority order.
    pub fn rules(&self) -> Vec<String> {
        let mut local_destinations = vec!["127.0.0.0/8".to_owned(), "169.254.0.0/16".to_owned()];
        local_destinations.extend(self.node_ips.iter().map(|ip| format!("{ip}/32")));
        local_destinations.push(format!("{}/32", self.pod_gateway));
        let mut rules: Vec<String> = local_destinations
            .iter()
            .map(|dst| format!("to {dst} lookup local pref {LOCAL_TABLE_RULE_PRIORITY}"))
            .collect();
        rules.push(format!(
            "fwmark {HAIRPIN_MARK:#x}/{HAIRPIN_MARK:#x} lookup main pref {HAIRPIN_RULE_PRIORITY}"
        ));
        rules.push(format!("iif lo lookup main pref {LOCAL_RULE_PRIORITY}"));
        rules.push(format!(
            "not iif {} lookup {NETD_TABLE} pref {POLICY_ROUTING_RULE_PRIORITY}",
            self.uplink
        ));
        rules
    }

    /// The route of table 1 (arguments after `ip route add`/`del`).
    pub fn route(&self) -> String {
        format!(
            "default via {} dev {} table {NETD_TABLE}",
            self.gateway, self.uplink
        )
    }

    /// The sysctls netd sets, with their values.
    pub fn sysctls(&self) -> Vec<(String, &'static str)> {
        vec![
            (format!("net.ipv4.conf.{}.rp_filter", self.uplink), "2"),
            ("net.ipv4.conf.all.src_valid_mark".to_owned(), "1"),
        ]
    }
}

/// netd's policy routing, active on a node namespace until [`Netd::disable`] or drop.
#[derive(Debug)]
pub struct Netd {
    node: Netns,
    config: NetdConfig,
    /// The sysctls' values before, to restore.
    saved: Vec<(String, String)>,
    active: bool,
}

impl Netd {
    /// Turns netd's policy routing on for the lab's node, with the configuration
    /// discovered from the node as netd does it (see [`NetdConfig::discover`]).
    pub fn enable(lab: &Lab) -> Result<Self> {
        let config = NetdConfig::discover(lab.node(), POD_GATEWAY_V4)?;
        Self::enable_with(lab.node(), config)
    }

    /// Turns netd's policy routing on in `node` with `config`. Fails if netd's rules
    /// are already there (two guards would undo each other).
    pub fn enable_with(node: &Netns, config: NetdConfig) -> Result<Self> {
        if Self::is_active_in(node)? {
            bail!(
                "netd's rules are already in netns {}: {}",
                node.name(),
                Self::rules_in(node)?.join("; ")
            );
        }
        let mut saved = Vec::new();
        for (key, _) in config.sysctls() {
            saved.push((key.clone(), node.sysctl_get(&key)?));
        }
        let netd = Self {
            node: node.clone(),
            config,
            saved,
            // From here on, a failure undoes what was done (on drop).
            active: true,
        };
        let mut lines = vec![format!("route add {}", netd.config.route())];
        lines.extend(netd.config.rules().iter().map(|r| format!("rule add {r}")));
        netd.node
            .ip_batch(&lines)
            .context("installing netd's rules")?;
        let settings = netd.config.sysctls();
        let pairs: Vec<(&str, &str)> = settings.iter().map(|(k, v)| (k.as_str(), *v)).collect();
        netd.node.sysctl(&pairs)?;
        netd.node.run("ip", ["route", "flush", "cache"])?;
        Ok(netd)
    }

    /// The configuration in force.
    pub fn config(&self) -> &NetdConfig {
        &self.config
    }

    /// Deletes the rules and the route and restores the sysctls. Every step is tried;
    /// the first error is returned.
    pub fn disable(mut self) -> Result<()> {
        self.undo()
    }

    fn undo(&mut self) -> Result<()> {
        if !self.active {
            return Ok(());
        }
        self.active = false;
        let mut first_error: Option<anyhow::Error> = None;
        let mut note = |result: Result<String>| {
            if let Err(e) = result
                && first_error.is_none()
            {
                first_error = Some(e);
            }
        };
        for rule in self.config.rules().iter().rev() {
            note(
                self.node
                    .run("ip", ["rule", "del"].into_iter().chain(rule.split(' '))),
            );
        }
        let route = self.config.route();
        note(
            self.node
                .run("ip", ["route", "del"].into_iter().chain(route.split(' '))),
        );
        for (key, value) in &self.saved {
            note(
                self.node
                    .sysctl(&[(key.as_str(), value.as_str())])
                    .map(|()| String::new()),
            );
        }
        note(self.node.run("ip", ["route", "flush", "cache"]));
        match first_error {
            Some(e) => Err(e.context(format!("disabling netd in netns {}", self.node.name()))),
            None => Ok(()),
        }
    }

    /// The node's ip rules (`ip -4 rule show`), one per line.
    pub fn rules_in(node: &Netns) -> Result<Vec<String>> {
        Ok(node
            .run("ip", ["-4", "rule", "show"])?
            .lines()
            .map(|l| l.trim().to_owned())
            .filter(|l| !l.is_empty())
            .collect())
    }

    /// Whether any of netd's rules (priorities 70 to 76) is in `node`.
    pub fn is_active_in(node: &Netns) -> Result<bool> {
        Ok(Self::rules_in(node)?.iter().any(|line| {
            line.split(':')
                .next()
                .and_then(|p| p.trim().parse::<u32>().ok())
                .is_some_and(|pref| {
                    (LOCAL_TABLE_RULE_PRIORITY..=POLICY_ROUTING_RULE_PRIORITY).contains(&pref)
                })
        }))
    }
}

impl Drop for Netd {
    fn drop(&mut self) {
        if let Err(e) = self.undo() {
            eprintln!("netd: {e:#}");
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn rules_are_netds() {
        let config = NetdConfig::for_lab();
        assert_eq!(
            config.rules(),
            [
                "to 127.0.0.0/8 lookup local pref 70",
                "to 169.254.0.0/16 lookup local pref 70",
                "to 10.128.0.2/32 lookup local pref 70",
                "to 10.52.0.1/32 lookup local pref 70",
                "fwmark 0x4000/0x4000 lookup main pref 74",
                "iif lo lookup main pref 75",
                "not iif eth0 lookup 1 pref 76",
            ]
        );
        assert_eq!(config.route(), "default via 10.128.0.1 dev eth0 table 1");
        assert_eq!(
            config.sysctls(),
            [
                ("net.ipv4.conf.eth0.rp_filter".to_owned(), "2"),
                ("net.ipv4.conf.all.src_valid_mark".to_owned(), "1"),
            ]
        );
    }
}
