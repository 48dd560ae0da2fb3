//! Reads the pinned flow map into records, with filters and ordering.

use std::{collections::BTreeMap, net::IpAddr, str::FromStr};

use visibility_common::flow::{FlowKey, FlowStats, Path};

use super::record::{Connection, FlowRecord, tcp_flag_names};
use crate::{config::parse_protocol, error::InputError, net::addr_from_bytes};

/// Converts the datapath's `CLOCK_MONOTONIC` nanoseconds to wall-clock time. (The
/// datapath reads the coarse variant, which costs no clock-source read per packet and
/// lags by at most one scheduler tick.)
#[derive(Clone, Copy, Debug)]
pub struct Clock {
    wall_now_ns: i128,
    datapath_now_ns: i128,
}

impl Clock {
    pub fn now() -> Self {
        let monotonic = nix::time::clock_gettime(nix::time::ClockId::CLOCK_MONOTONIC)
            .map(|t| i128::from(t.tv_sec()) * 1_000_000_000 + i128::from(t.tv_nsec()))
            .unwrap_or_default();
        let wall = time::OffsetDateTime::now_utc().unix_timestamp_nanos();
        Self {
            wall_now_ns: wall,
            datapath_now_ns: monotonic,
        }
    }

    /// The datapath's clock now.
    pub fn datapath_now(&self) -> u64 {
        u64::try_from(self.datapath_now_ns).unwrap_or_default()
    }

    /// Wall-clock nanoseconds since the Unix epoch of a datapath time.
    fn wall_ns(&self, datapath_ns: u64) -> i128 {
        self.wall_now_ns - (self.datapath_now_ns - i128::from(datapath_ns))
    }

    /// The datapath's clock at a wall-clock time (nanoseconds since the Unix epoch),
    /// such as a Kubernetes timestamp; 0 for a time before the clock started.
    pub fn datapath_ns(&self, unix_ns: i128) -> u64 {
        u64::try_from(self.datapath_now_ns - (self.wall_now_ns - unix_ns)).unwrap_or_default()
    }

    /// Milliseconds since the Unix epoch (IPFIX's `flowStartMilliseconds`).
    pub fn unix_millis(&self, datapath_ns: u64) -> u64 {
        u64::try_from(self.wall_ns(datapath_ns) / 1_000_000).unwrap_or_default()
    }

    /// RFC 3339 with nanoseconds.
    pub fn format(&self, datapath_ns: u64) -> String {
        time::OffsetDateTime::from_unix_timestamp_nanos(self.wall_ns(datapath_ns))
            .ok()
            .and_then(|t| {
                t.format(&time::format_description::well_known::Rfc3339)
                    .ok()
            })
            .unwrap_or_default()
    }
}

/// One condition of `--filter`.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum Filter {
    Src(IpAddr),
    Dst(IpAddr),
    /// Either end.
    Ip(IpAddr),
    SrcPort(u16),
    DstPort(u16),
    /// Either end.
    Port(u16),
    Protocol(u8),
    Path(Path),
}

impl FromStr for Filter {
    type Err = InputError;

    fn from_str(text: &str) -> Result<Self, Self::Err> {
        let bad = || InputError::Filter(text.to_owned());
        let (key, value) = text.split_once('=').ok_or_else(bad)?;
        let ip = || IpAddr::from_str(value).map_err(|_| bad());
        let port = || value.parse::<u16>().map_err(|_| bad());
        Ok(match key {
            "src" => Filter::Src(ip()?),
            "dst" => Filter::Dst(ip()?),
            "ip" => Filter::Ip(ip()?),
            "sport" => Filter::SrcPort(port()?),
            "dport" => Filter::DstPort(port()?),
            "port" => Filter::Port(port()?),
            "proto" | "protocol" => Filter::Protocol(parse_protocol(value)?),
            "path" => Filter::Path(
                (1..=u8::MAX)
                    .filter_map(Path::from_u8)
                    .find(|p| p.name() == value)
                    .ok_or_else(bad)?,
            ),
            _ => return Err(bad()),
        })
    }
}

impl Filter {
    fn matches(&self, record: &FlowRecord) -> bool {
        let c = &record.connection;
        let is = |text: &str, ip: &IpAddr| text == ip.to_string();
        match self {
            Filter::Src(ip) => is(&c.src_ip, ip),
            Filter::Dst(ip) => is(&c.dest_ip, ip),
            Filter::Ip(ip) => is(&c.src_ip, ip) || is(&c.dest_ip, ip),
            Filter::SrcPort(p) => c.src_port == *p,
            Filter::DstPort(p) => c.dest_port == *p,
            Filter::Port(p) => c.src_port == *p || c.dest_port == *p,
            Filter::Protocol(p) => c.protocol == *p,
            Filter::Path(p) => record.path == p.name(),
        }
    }
}

/// Order of `visibility flows`.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, clap::ValueEnum)]
pub enum SortKey {
    /// Most bytes first.
    #[default]
    Bytes,
    /// Most packets first.
    Packets,
    /// Most recently seen first.
    Last,
}

/// Turns one map entry into a record of its running totals.
pub fn record(
    key: &FlowKey,
    stats: &FlowStats,
    clock: &Clock,
    node_name: &str,
    interface_name: &impl Fn(u32) -> Option<String>,
) -> Option<FlowRecord> {
    let family = key.family()?;
    Some(FlowRecord {
        connection: Connection {
            src_ip: addr_from_bytes(family, &key.src_addr).to_string(),
            src_port: key.src_port,
            dest_ip: addr_from_bytes(family, &key.dst_addr).to_string(),
            dest_port: key.dst_port,
            protocol: key.protocol,
        },
        bytes_sent: stats.bytes,
        packets_sent: stats.packets,
        start_time: clock.format(stats.first_seen_ns),
        end_time: clock.format(stats.last_seen_ns),
        reporter: "SRC",
        src_gke_details: None,
        dest_gke_details: None,
        path: stats.path().map_or("unknown", Path::name),
        returned_packets: stats.returned_packets,
        returned_bytes: stats.returned_bytes,
        tcp_flags: tcp_flag_names(stats.tcp_flags),
        node_name: node_name.to_owned(),
        src_interface: (stats.ingress_ifindex != 0)
            .then(|| interface_name(stats.ingress_ifindex))
            .flatten(),
        dest_interface: (stats.egress_ifindex != 0)
            .then(|| interface_name(stats.egress_ifindex))
            .flatten(),
    })
}

/// Filters, sorts and limits records. `last_seen` orders by the raw end time.
pub fn select(
    entries: Vec<(FlowKey, FlowStats)>,
    filters: &[Filter],
    sort: SortKey,
    limit: Option<usize>,
    to_record: impl Fn(&FlowKey, &FlowStats) -> Option<FlowRecord>,
) -> Vec<FlowRecord> {
    let mut kept: Vec<(FlowStats, FlowRecord)> = entries
        .iter()
        .filter_map(|(key, stats)| Some((*stats, to_record(key, stats)?)))
        .filter(|(_, record)| filters.iter().all(|f| f.matches(record)))
        .collect();
    kept.sort_by(|(a, ra), (b, rb)| {
        let order = match sort {
            SortKey::Bytes => b.bytes.cmp(&a.bytes),
            SortKey::Packets => b.packets.cmp(&a.packets),
            SortKey::Last => b.last_seen_ns.cmp(&a.last_seen_ns),
        };
        order.then_with(|| ra.connection.src_ip.cmp(&rb.connection.src_ip))
    });
    kept.into_iter()
        .map(|(_, r)| r)
        .take(limit.unwrap_or(usize::MAX))
        .collect()
}

pub use super::batch::read_flows as read_all;

/// Interface names by ifindex, read once.
pub fn interface_names() -> BTreeMap<u32, String> {
    nix::net::if_::if_nameindex()
        .map(|list| {
            list.iter()
                .map(|i| (i.index(), i.name().to_string_lossy().into_owned()))
                .collect()
        })
        .unwrap_or_default()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn filters_parse() {
        assert_eq!(
            "src=10.0.0.1".parse::<Filter>().unwrap(),
            Filter::Src("10.0.0.1".parse().unwrap())
        );
        assert_eq!("proto=udp".parse::<Filter>().unwrap(), Filter::Protocol(17));
        assert_eq!(
            "path=via_gateway".parse::<Filter>().unwrap(),
            Filter::Path(Path::ViaGateway)
        );
        for bad in [
            "src",
            "src=nope",
            "port=70000",
            "colour=red",
            "path=sideways",
        ] {
            assert!(bad.parse::<Filter>().is_err(), "{bad}");
        }
    }

    fn key(src: [u8; 4], port: u16) -> FlowKey {
        let mut k = FlowKey {
            family: 4,
            protocol: 6,
            src_port: port,
            dst_port: 80,
            ..Default::default()
        };
        k.src_addr[..4].copy_from_slice(&src);
        k.dst_addr[..4].copy_from_slice(&[10, 0, 0, 9]);
        k
    }

    #[test]
    fn select_filters_sorts_and_limits() {
        let stats = |bytes, last| FlowStats {
            bytes,
            packets: 1,
            last_seen_ns: last,
            path: Path::ViaGateway as u8,
            ..Default::default()
        };
        let entries = vec![
            (key([10, 0, 0, 1], 1), stats(10, 3)),
            (key([10, 0, 0, 2], 2), stats(30, 1)),
            (key([10, 0, 0, 3], 3), stats(20, 2)),
        ];
        let clock = Clock::now();
        let to_record = |k: &FlowKey, s: &FlowStats| record(k, s, &clock, "n", &|_| None);
        let by_bytes = select(entries.clone(), &[], SortKey::Bytes, Some(2), to_record);
        assert_eq!(
            by_bytes.iter().map(|r| r.bytes_sent).collect::<Vec<_>>(),
            vec![30, 20]
        );
        let by_last = select(entries.clone(), &[], SortKey::Last, None, to_record);
        assert_eq!(by_last[0].connection.src_port, 1);
        let filtered = select(
            entries,
            &["sport=3".parse().unwrap()],
            SortKey::Bytes,
            None,
            to_record,
        );
        assert_eq!(filtered.len(), 1);
    }
}
