//! The gateway's nftables table: the ruleset that counts, tracks and blocks forwarded
//! packets, block rules, counters, and its conntrack flow log.

use std::net::IpAddr;

use anyhow::{Context, Result, bail};

use super::{
    addresses::GATEWAY_IFNAME,
    conntrack::{Flow, parse_conntrack},
    netns::Netns,
};

/// The nftables table (family `inet`) in the gateway namespace.
pub const GATEWAY_NFT_TABLE: &str = "lab";

/// Makes `gw` a router with the lab's firewall, before any link to a node exists:
/// forwarding on, no ICMP redirects, no reverse-path filter, no DAD (a new interface
/// takes the `default` values), and the nftables table with conntrack accounting.
pub(super) fn setup(gw: &Netns) -> Result<()> {
    gw.sysctl(&[
        ("net.ipv6.conf.all.accept_dad", "0"),
        ("net.ipv6.conf.default.accept_dad", "0"),
        ("net.ipv4.ip_forward", "1"),
        ("net.ipv6.conf.all.forwarding", "1"),
        ("net.ipv6.conf.default.forwarding", "1"),
        ("net.ipv4.conf.all.send_redirects", "0"),
        ("net.ipv4.conf.default.send_redirects", "0"),
        ("net.ipv4.conf.all.rp_filter", "0"),
        ("net.ipv4.conf.default.rp_filter", "0"),
    ])?;
    gw.run_with_stdin("nft", ["-f", "-"], &ruleset())
        .context("installing the gateway's nftables ruleset")?;
    // The sysctl exists once conntrack is loaded, which the ruleset makes sure of.
    gw.sysctl(&[("net.netfilter.nf_conntrack_acct", "1")])?;
    Ok(())
}

/// The gateway's conntrack table, IPv4 and IPv6 (`conntrack -L -o extended`).
pub(super) fn flows(gateway: &Netns) -> Result<Vec<Flow>> {
    let mut flows = Vec::new();
    for family in ["ipv4", "ipv6"] {
        let out = gateway.run("conntrack", ["-L", "-o", "extended", "-f", family])?;
        flows.extend(parse_conntrack(&out)?);
    }
    Ok(flows)
}

/// Empties the gateway's conntrack table (both families).
pub(super) fn flush_flows(gateway: &Netns) -> Result<()> {
    for family in ["ipv4", "ipv6"] {
        gateway.run("conntrack", ["-F", "-f", family])?;
    }
    Ok(())
}

/// Drops packets forwarded from `src` to `dst`.
pub(super) fn block(gateway: &Netns, src: IpAddr, dst: IpAddr) -> Result<()> {
    let (set, element) = block_element(src, dst)?;
    gateway
        .run(
            "nft",
            ["add", "element", "inet", GATEWAY_NFT_TABLE, set, &element],
        )
        .with_context(|| format!("blocking {element}"))?;
    Ok(())
}

/// Undoes [`block`]; succeeds if the pair was not blocked.
pub(super) fn unblock(gateway: &Netns, src: IpAddr, dst: IpAddr) -> Result<()> {
    let (set, element) = block_element(src, dst)?;
    match gateway.run(
        "nft",
        [
            "delete",
            "element",
            "inet",
            GATEWAY_NFT_TABLE,
            set,
            &element,
        ],
    ) {
        Ok(_) => Ok(()),
        Err(e) if format!("{e:#}").contains("No such file or directory") => Ok(()),
        Err(e) => Err(e.context(format!("unblocking {element}"))),
    }
}

/// Undoes every [`block`].
pub(super) fn unblock_all(gateway: &Netns) -> Result<()> {
    for set in ["blocked4", "blocked6"] {
        gateway.run("nft", ["flush", "set", "inet", GATEWAY_NFT_TABLE, set])?;
    }
    Ok(())
}

/// Packets sent out of the gateway's interface, from its link statistics.
pub(super) fn transmitted_packets(gateway: &Netns) -> Result<u64> {
    let out = gateway.run("ip", ["-s", "-j", "link", "show", "dev", GATEWAY_IFNAME])?;
    let links: serde_json::Value =
        serde_json::from_str(&out).with_context(|| format!("parsing `ip -s -j link`: {out}"))?;
    links[0]["stats64"]["tx"]["packets"]
        .as_u64()
        .with_context(|| format!("no tx packet count in {out}"))
}

/// Removes the gateway's nftables table: no firewall, no connection tracking.
pub(super) fn remove_firewall(gateway: &Netns) -> Result<()> {
    gateway
        .run("nft", ["delete", "table", "inet", GATEWAY_NFT_TABLE])
        .context("removing the gateway's nftables table")?;
    Ok(())
}

/// Packets and bytes of a named counter in the gateway's nftables table.
pub(super) fn counter(gateway: &Netns, name: &str) -> Result<(u64, u64)> {
    let out = gateway.run("nft", ["list", "counter", "inet", GATEWAY_NFT_TABLE, name])?;
    parse_nft_counter(&out).with_context(|| format!("parsing nft counter {name}: {out}"))
}

/// The gateway's nftables ruleset.
fn ruleset() -> String {
    format!(
        r#"table inet {GATEWAY_NFT_TABLE} {{
    counter forwarded {{ }}
    counter dropped {{ }}
    set blocked4 {{ type ipv4_addr . ipv4_addr; }}
    set blocked6 {{ type ipv6_addr . ipv6_addr; }}
    chain forward {{
        type filter hook forward priority filter; policy accept;
        counter name "forwarded"
        ct state new counter
        ip saddr . ip daddr @blocked4 counter name "dropped" drop
        ip6 saddr . ip6 daddr @blocked6 counter name "dropped" drop
    }}
}}
"#
    )
}

fn block_element(src: IpAddr, dst: IpAddr) -> Result<(&'static str, String)> {
    match (src, dst) {
        (IpAddr::V4(s), IpAddr::V4(d)) => Ok(("blocked4", format!("{{ {s} . {d} }}"))),
        (IpAddr::V6(s), IpAddr::V6(d)) => Ok(("blocked6", format!("{{ {s} . {d} }}"))),
        _ => bail!("cannot block {src} -> {dst}: mixed address families"),
    }
}

fn parse_nft_counter(text: &str) -> Result<(u64, u64)> {
    let tokens: Vec<&str> = text.split_whitespace().collect();
    let value = |key: &str| -> Result<u64> {
        let pos = tokens
            .iter()
            .position(|t| *t == key)
            .with_context(|| format!("no `{key}`"))?;
        Ok(tokens.get(pos + 1).context("no value")?.parse()?)
    };
    Ok((value("packets")?, value("bytes")?))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn parses_nft_counter() {
        let text = "table inet lab {\n\tcounter forwarded {\n\t\tpackets 12 bytes 3400\n\t}\n}\n";
        assert_eq!(parse_nft_counter(text).unwrap(), (12, 3400));
    }

    #[test]
    fn a_block_takes_one_family() {
        use crate::lab::addresses::{GATEWAY_IPV6, NODE_IPV4};
        assert!(block_element(NODE_IPV4.into(), GATEWAY_IPV6.into()).is_err());
    }
}
