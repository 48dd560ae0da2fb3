//! The gateway's flow log: `conntrack -L -o extended` parsed into flows.

use std::net::IpAddr;

use anyhow::{Context, Result, bail};

use super::addresses::IpFamily;

/// One conntrack entry, as seen in its original direction (the first packet's), with the
/// reply direction's counters.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Flow {
    /// The address family.
    pub family: IpFamily,
    /// The protocol's name as conntrack prints it: `tcp`, `udp`, `icmp`, `icmpv6`, ...
    pub protocol: String,
    /// The IP protocol number (6, 17, 1, 58, ...).
    pub protocol_number: u8,
    /// Original source address.
    pub src: IpAddr,
    /// Original destination address.
    pub dst: IpAddr,
    /// Original source port (`None` for protocols without ports, such as ICMP).
    pub sport: Option<u16>,
    /// Original destination port (`None` for protocols without ports).
    pub dport: Option<u16>,
    /// Packets in the original direction.
    pub packets: u64,
    /// Bytes in the original direction.
    pub bytes: u64,
    /// Packets in the reply direction.
    pub reply_packets: u64,
    /// Bytes in the reply direction.
    pub reply_bytes: u64,
}

impl Flow {
    /// Whether `addr` is the flow's source or destination.
    pub fn involves(&self, addr: impl Into<IpAddr>) -> bool {
        let addr = addr.into();
        self.src == addr || self.dst == addr
    }

    /// Whether the flow goes from `src` to `dst` (original direction).
    pub fn is_between(&self, src: impl Into<IpAddr>, dst: impl Into<IpAddr>) -> bool {
        self.src == src.into() && self.dst == dst.into()
    }
}

/// Parses the output of `conntrack -L -o extended` (any family) into [`Flow`]s. Lines that
/// are not entries are skipped.
pub fn parse_conntrack(text: &str) -> Result<Vec<Flow>> {
    text.lines()
        .filter(|l| l.starts_with("ipv4 ") || l.starts_with("ipv6 "))
        .map(|l| parse_conntrack_line(l).with_context(|| format!("parsing conntrack line {l:?}")))
        .collect()
}

fn parse_conntrack_line(line: &str) -> Result<Flow> {
    let mut tokens = line.split_whitespace();
    let family = match tokens.next() {
        Some("ipv4") => IpFamily::V4,
        Some("ipv6") => IpFamily::V6,
        other => bail!("unknown family {other:?}"),
    };
    let _l3num = tokens.next().context("missing l3 number")?;
    let protocol = tokens.next().context("missing protocol")?.to_string();
    let protocol_number: u8 = tokens.next().context("missing protocol number")?.parse()?;

    #[derive(Default)]
    struct Direction {
        src: Option<IpAddr>,
        dst: Option<IpAddr>,
        sport: Option<u16>,
        dport: Option<u16>,
        packets: u64,
        bytes: u64,
    }
    let mut dirs: Vec<Direction> = Vec::new();
    for token in tokens {
        let Some((key, value)) = token.split_once('=') else {
            continue;
        };
        if key == "src" {
            if dirs.len() == 2 {
                break; // e.g. an expectation's master tuple: not ours
            }
            dirs.push(Direction::default());
        }
        let Some(dir) = dirs.last_mut() else { continue };
        match key {
            "src" => dir.src = Some(value.parse()?),
            "dst" => dir.dst = Some(value.parse()?),
            "sport" => dir.sport = Some(value.parse()?),
            "dport" => dir.dport = Some(value.parse()?),
            "packets" => dir.packets = value.parse()?,
            "bytes" => dir.bytes = value.parse()?,
            _ => {}
        }
    }
    let mut dirs = dirs.into_iter();
    let orig = dirs.next().context("no original tuple")?;
    let reply = dirs.next().unwrap_or_default();
    Ok(Flow {
        family,
        protocol,
        protocol_number,
        src: orig.src.context("no src")?,
        dst: orig.dst.context("no dst")?,
        sport: orig.sport,
        dport: orig.dport,
        packets: orig.packets,
        bytes: orig.bytes,
        reply_packets: reply.packets,
        reply_bytes: reply.bytes,
    })
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::lab::addresses::{GATEWAY_IPV4, NODE_IPV4, pod_ipv4, pod_ipv6};

    #[test]
    fn parses_conntrack_extended_output() {
        let text = "\
ipv4     2 udp      17 29 src=10.52.0.2 dst=10.52.0.3 sport=35131 dport=5000 packets=1 bytes=31 [UNREPLIED] src=10.52.0.3 dst=10.52.0.2 sport=5000 dport=35131 packets=0 bytes=0 mark=0 use=1
ipv4     2 icmp     1 29 src=10.128.0.2 dst=10.128.0.1 type=8 code=0 id=10482 packets=1 bytes=84 src=10.128.0.1 dst=10.128.0.2 type=0 code=0 id=10482 packets=1 bytes=84 mark=0 use=1
ipv6     10 tcp      6 119 TIME_WAIT src=fd00:52::2 dst=fd00:52::3 sport=46194 dport=5001 packets=5 bytes=371 src=fd00:52::3 dst=fd00:52::2 sport=5001 dport=46194 packets=3 bytes=224 [ASSURED] mark=0 use=1
conntrack v1.4.7 (conntrack-tools): 3 flow entries have been shown.
";
        let flows = parse_conntrack(text).unwrap();
        assert_eq!(flows.len(), 3);
        assert_eq!(flows[0].family, IpFamily::V4);
        assert_eq!(flows[0].protocol, "udp");
        assert_eq!(flows[0].protocol_number, 17);
        assert_eq!(flows[0].src, IpAddr::from(pod_ipv4(0)));
        assert_eq!(flows[0].dst, IpAddr::from(pod_ipv4(1)));
        assert_eq!((flows[0].sport, flows[0].dport), (Some(35131), Some(5000)));
        assert_eq!((flows[0].packets, flows[0].bytes), (1, 31));
        assert_eq!((flows[0].reply_packets, flows[0].reply_bytes), (0, 0));
        assert_eq!(flows[1].protocol, "icmp");
        assert_eq!((flows[1].sport, flows[1].dport), (None, None));
        assert!(flows[1].is_between(NODE_IPV4, GATEWAY_IPV4));
        assert_eq!(flows[2].family, IpFamily::V6);
        assert_eq!(flows[2].src, IpAddr::from(pod_ipv6(0)));
        assert_eq!(
            (flows[2].packets, flows[2].bytes, flows[2].reply_packets),
            (5, 371, 3)
        );
        assert!(flows[2].involves(pod_ipv6(1)));
    }
}
