//! Health checks: conditions under which same-node Pod-to-Pod traffic would not take
//! the gateway, or not come back, each with what to do about it.

use std::{net::IpAddr, process::Command};

use ipnet::IpNet;

use crate::state::Check;

fn check(name: impl Into<String>, ok: bool, detail: impl Into<String>) -> Check {
    Check {
        name: name.into(),
        ok,
        detail: detail.into(),
    }
}

/// The gateway's neighbour entry. Unknown is fine (the datapath resolves it on the
/// first packet); a failed resolution is not.
pub fn gateway_neighbour(
    family: &str,
    gateway: IpAddr,
    neighbour: Option<&crate::node::Neighbour>,
) -> Check {
    let name = format!("gateway_neighbour_{family}");
    match neighbour {
        Some(n) if n.is_resolved() => check(name, true, format!("{gateway} resolved")),
        Some(n) => check(
            name,
            false,
            format!(
                "{gateway} is unresolved ({:?}): the gateway does not answer ARP/NDP on the uplink; check the uplink and the gateway address",
                n.state
            ),
        ),
        None => check(
            name,
            true,
            format!("{gateway} not resolved yet; the kernel is resolving it"),
        ),
    }
}

/// A family has Pod CIDRs but nowhere to send their traffic.
pub fn uplink_missing(family: &str, reason: &str) -> Check {
    check(
        format!("uplink_{family}"),
        false,
        format!("no uplink for {family}: {reason}; {family} Pod-to-Pod traffic stays on the node"),
    )
}

pub fn uplink_up(family: &str, uplink: &str, up: bool) -> Check {
    check(
        format!("uplink_up_{family}"),
        up,
        if up {
            format!("{uplink} is up")
        } else {
            format!("{uplink} is down or has no carrier: redirected packets cannot leave the node")
        },
    )
}

pub fn pod_interfaces_attached(unattached: &[String]) -> Check {
    if unattached.is_empty() {
        check(
            "pod_interfaces_attached",
            true,
            "every Pod interface is attached",
        )
    } else {
        check(
            "pod_interfaces_attached",
            false,
            format!(
                "not attached: {} (see the daemon's log for the error)",
                unattached.join(", ")
            ),
        )
    }
}

/// A family whose Pod interfaces have addresses needs a Pod CIDR of that family, or
/// its Pod-to-Pod traffic silently stays on the node. `addresses` are the Pod routes of
/// the family (`interface: prefix`), `cidrs` its Pod CIDRs (`prefix (source)`).
pub fn pod_cidr_family(family: &str, cidrs: &[String], addresses: &[String]) -> Check {
    let name = format!("pod_cidr_{family}");
    match (cidrs.is_empty(), addresses.is_empty()) {
        (false, _) => check(name, true, cidrs.join(", ")),
        (true, true) => check(name, true, format!("no {family} Pod addresses")),
        (true, false) => check(
            name,
            false,
            format!(
                "Pod interfaces have {family} addresses ({}) but there is no {family} Pod CIDR: their {family} Pod-to-Pod traffic stays on the node; add the family to the pod-cidr override, or remove the override to learn it",
                abbreviated(addresses)
            ),
        ),
    }
}

/// Pod addresses outside every Pod CIDR: their traffic stays on the node.
pub fn pod_addresses_covered(outside: &[String]) -> Check {
    let name = "pod_addresses_covered";
    if outside.is_empty() {
        return check(name, true, "every Pod interface's address is in a Pod CIDR");
    }
    check(
        name,
        false,
        format!(
            "outside every Pod CIDR: {}; Pod-to-Pod traffic to them stays on the node: widen the pod-cidr override, or remove it to learn the node's",
            abbreviated(outside)
        ),
    )
}

/// The first few items of a long list, and how many more.
fn abbreviated(items: &[String]) -> String {
    const SHOWN: usize = 5;
    let mut text = items[..items.len().min(SHOWN)].join(", ");
    if items.len() > SHOWN {
        text.push_str(&format!(" and {} more", items.len() - SHOWN));
    }
    text
}

/// Strict reverse-path filtering drops packets that come back from the gateway with a
/// Pod's source address, unless the datapath delivers them itself (the uplink program).
pub fn rp_filter(uplink: &str, uplink_program_attached: bool) -> Check {
    let read = |name: &str| {
        std::fs::read_to_string(format!("/proc/sys/net/ipv4/conf/{name}/rp_filter"))
            .ok()
            .and_then(|v| v.trim().parse::<u8>().ok())
            .unwrap_or(0)
    };
    // The kernel uses the larger of "all" and the interface's value.
    rp_filter_from(
        uplink,
        read("all").max(read(uplink)),
        uplink_program_attached,
    )
}

fn rp_filter_from(uplink: &str, effective: u8, uplink_program_attached: bool) -> Check {
    let (ok, detail) = match (effective, uplink_program_attached) {
        (1, true) => (
            true,
            format!(
                "rp_filter=1 (strict) on {uplink}; returning packets are delivered by the datapath, not routed"
            ),
        ),
        (1, false) => (
            false,
            format!(
                "rp_filter=1 (strict) on {uplink} and the uplink program is not attached: returning packets would be dropped"
            ),
        ),
        (value, _) => (true, format!("rp_filter={value} on {uplink}")),
    };
    check("rp_filter", ok, detail)
}

/// A nat rule that rewrites the source of packets leaving the node.
#[derive(Clone, Debug, PartialEq, Eq)]
struct MasqueradeRule {
    chain: String,
    source: Option<IpNet>,
    destination: Option<IpNet>,
    negated_destination: Option<IpNet>,
    /// `RETURN` rules earlier in the same chain: destinations that escape it.
    returns_for: Vec<IpNet>,
    text: String,
}

/// Reads `iptables-save -t nat` output (IPv4; ip-masq-agent writes iptables rules).
fn masquerade_rules(iptables_save: &str) -> Vec<MasqueradeRule> {
    let mut rules = Vec::new();
    let mut returns: std::collections::HashMap<String, Vec<IpNet>> =
        std::collections::HashMap::new();
    // Chains where a mark decides what is masqueraded (kube-proxy's KUBE-POSTROUTING
    // returns unmarked packets first): ordinary Pod traffic carries no such mark.
    let mut mark_guarded: std::collections::HashSet<String> = std::collections::HashSet::new();
    for line in iptables_save.lines() {
        let Some(rest) = line.strip_prefix("-A ") else {
            continue;
        };
        let words: Vec<&str> = rest.split_whitespace().collect();
        let Some(chain) = words.first() else { continue };
        let mut source = None;
        let mut destination = None;
        let mut negated_destination = None;
        let mut target = None;
        let mut i = 1;
        while i < words.len() {
            let negated = words[i] == "!";
            if negated {
                i += 1;
            }
            let value = words.get(i + 1).and_then(|v| {
                v.parse::<IpNet>()
                    .ok()
                    .or_else(|| v.parse::<IpAddr>().ok().map(IpNet::from))
            });
            match words.get(i).copied() {
                Some("-s") => source = value,
                Some("-d") if negated => negated_destination = value,
                Some("-d") => destination = value,
                Some("-j") => target = words.get(i + 1).copied(),
                _ => {}
            }
            i += 1;
        }
        let uses_mark = words.contains(&"mark") || words.contains(&"--mark");
        match target {
            Some("RETURN") if uses_mark => {
                mark_guarded.insert((*chain).to_owned());
            }
            Some("MASQUERADE" | "SNAT") if uses_mark || mark_guarded.contains(*chain) => {}
            Some("RETURN") => {
                if let Some(d) = destination {
                    returns.entry((*chain).to_owned()).or_default().push(d);
                }
            }
            Some("MASQUERADE" | "SNAT") => rules.push(MasqueradeRule {
                chain: (*chain).to_owned(),
                source,
                destination,
                negated_destination,
                returns_for: returns.get(*chain).cloned().unwrap_or_default(),
                text: line.to_owned(),
            }),
            _ => {}
        }
    }
    rules
}

/// Whether a packet from one Pod CIDR address to another would be masqueraded.
fn masquerades_pod_traffic(rule: &MasqueradeRule, pod_cidr: &IpNet) -> bool {
    let covers = |net: &IpNet| net.contains(pod_cidr);
    rule.source.is_none_or(|s| covers(&s))
        && rule.destination.is_none_or(|d| covers(&d))
        && !rule.negated_destination.is_some_and(|d| covers(&d))
        && !rule.returns_for.iter().any(covers)
}

/// ip-masq-agent (or any SNAT rule) that would rewrite Pod-to-Pod packets: kube-proxy
/// DNATed Service traffic is routed to the destination Pod's veth through nat
/// POSTROUTING, and masqueraded there it would carry a node address and stay local.
/// GKE documents that the Pod CIDR must be in `nonMasqueradeCIDRs`; we check it.
pub fn masquerade(pod_cidrs: &[IpNet]) -> Check {
    let name = "masquerade";
    let Ok(output) = Command::new("iptables-save").args(["-t", "nat"]).output() else {
        return check(
            name,
            true,
            "iptables-save not found: no iptables nat rules to check",
        );
    };
    let text = String::from_utf8_lossy(&output.stdout);
    let v4: Vec<IpNet> = pod_cidrs
        .iter()
        .filter(|c| matches!(c, IpNet::V4(_)))
        .copied()
        .collect();
    masquerade_from(&text, &v4)
}

fn masquerade_from(iptables_save: &str, pod_cidrs: &[IpNet]) -> Check {
    let name = "masquerade";
    for rule in masquerade_rules(iptables_save) {
        if let Some(cidr) = pod_cidrs.iter().find(|c| masquerades_pod_traffic(&rule, c)) {
            let fix = if rule.chain == "IP-MASQ" {
                format!("add {cidr} to ip-masq-agent's nonMasqueradeCIDRs")
            } else {
                format!("exclude {cidr} as a destination from this rule")
            };
            return check(
                name,
                false,
                format!(
                    "`{}` would masquerade Pod-to-Pod traffic of {cidr}, hiding it from the gateway: {fix}",
                    rule.text
                ),
            );
        }
    }
    check(name, true, "no nat rule masquerades Pod-to-Pod traffic")
}

#[cfg(test)]
mod tests {
    use super::*;

    const IP_MASQ_AGENT: &str = "*nat
:POSTROUTING ACCEPT [0:0]
:IP-MASQ - [0:0]
-A POSTROUTING -m comment --comment \"ip-masq-agent\" -m addrtype ! --dst-type LOCAL -j IP-MASQ
-A IP-MASQ -d 169.254.0.0/16 -m comment --comment \"ip-masq-agent: local traffic is not subject to MASQUERADE\" -j RETURN
-A IP-MASQ -d 10.0.0.0/8 -j RETURN
-A IP-MASQ -m comment --comment \"ip-masq-agent: outbound traffic is subject to MASQUERADE (must be last in chain)\" -j MASQUERADE
COMMIT
";

    #[test]
    fn ip_masq_agent_with_the_pod_cidr_listed_is_fine() {
        let pods = ["10.52.0.0/24".parse().unwrap()];
        assert!(masquerade_from(IP_MASQ_AGENT, &pods).ok);
    }

    #[test]
    fn ip_masq_agent_without_the_pod_cidr_is_caught() {
        let pods = ["192.168.52.0/24".parse().unwrap()];
        let result = masquerade_from(IP_MASQ_AGENT, &pods);
        assert!(!result.ok);
        assert!(
            result.detail.contains("nonMasqueradeCIDRs"),
            "{}",
            result.detail
        );
    }

    #[test]
    fn kube_proxys_mark_guarded_masquerade_is_ignored() {
        let rules = "-A KUBE-POSTROUTING -m mark ! --mark 0x4000/0x4000 -j RETURN\n-A KUBE-POSTROUTING -j MARK --xor-mark 0x4000\n-A KUBE-POSTROUTING -j MASQUERADE --random-fully\n";
        assert!(masquerade_from(rules, &["10.52.0.0/24".parse().unwrap()]).ok);
    }

    #[test]
    fn rules_that_cannot_match_pod_traffic_are_ignored() {
        let rules = "-A POSTROUTING -s 172.17.0.0/16 ! -o docker0 -j MASQUERADE\n-A POSTROUTING ! -d 10.0.0.0/8 -j MASQUERADE\n";
        assert!(masquerade_from(rules, &["10.52.0.0/24".parse().unwrap()]).ok);
        assert!(
            !masquerade_from(
                "-A POSTROUTING -j MASQUERADE\n",
                &["10.52.0.0/24".parse().unwrap()]
            )
            .ok
        );
    }

    #[test]
    fn strict_rp_filter_needs_the_uplink_program() {
        assert!(!rp_filter_from("eth0", 1, false).ok);
        assert!(rp_filter_from("eth0", 1, true).ok);
        assert!(rp_filter_from("eth0", 2, false).ok);
    }
}
