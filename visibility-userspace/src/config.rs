//! The daemon's configuration: built-in defaults, then the file (a ConfigMap), then
//! command-line flags, then `VISIBILITY_*` environment variables, each overriding
//! the one before.

use std::{
    net::{IpAddr, SocketAddr},
    path::PathBuf,
    str::FromStr,
    time::Duration,
};

use ipnet::IpNet;
use serde::Deserialize;

use crate::{
    error::InputError,
    kubernetes::{Access, KubeConfig},
    maps::Exemption,
};

/// Everything the daemon can be told. Every field is optional so that layers only
/// override what they set. The same keys serve the file, the flags and the
/// environment (`pod-cidr` ↔ `--pod-cidr` ↔ `VISIBILITY_POD_CIDR`).
#[derive(Clone, Debug, Default, Deserialize, PartialEq, Eq)]
#[serde(deny_unknown_fields, rename_all = "kebab-case")]
pub struct Layer {
    /// The node's Pod CIDRs, as an override: by default the daemon learns them from the
    /// node (its routes to Pod interfaces and its CNI's ranges).
    pub pod_cidr: Option<Vec<String>>,
    /// Where the CNI configuration is read (for `host-local` ranges).
    pub cni_conf_dir: Option<String>,
    /// Uplink interface; by default the default route's, per family.
    pub uplink: Option<String>,
    /// Gateway addresses (at most one per family); by default the default route's.
    pub gateway: Option<Vec<String>>,
    /// Ranges that stay on the node: `CIDR[,PROTO[/PORT]]`.
    pub exempt: Option<Vec<String>>,
    /// Extra Pod interfaces by name, a glob such as `cali*`.
    pub pod_interfaces: Option<String>,
    /// Whether visibility starts on, when the datapath is first loaded.
    pub enabled: Option<bool>,
    /// Entries of the flow map.
    pub flow_capacity: Option<u32>,
    /// Seconds between two full reconciles (netlink events trigger them sooner).
    pub reconcile_interval: Option<u64>,
    /// Node name, shown in records and status (a DaemonSet sets it from the downward API).
    pub node_name: Option<String>,
    /// Where flow records go: `stdout`, `off`, or a file path (rotated by size).
    pub records: Option<String>,
    /// Aggregation interval of flow records: 5s, 30s, 1m, 5m, 10m or 15m.
    pub records_interval: Option<String>,
    /// Size at which the record file rotates, in bytes.
    pub records_max_bytes: Option<u64>,
    /// Rotated record files kept.
    pub records_keep: Option<u32>,
    /// Address of the Prometheus endpoint, or `off`.
    pub metrics_addr: Option<String>,
    /// IPFIX collectors, `HOST:PORT` (UDP), each sent every flow record.
    pub ipfix: Option<Vec<String>>,
    /// The Kubernetes API, for Pod names and the Node's Pod CIDRs: `auto` (in-cluster
    /// when in a Pod), `off`, or a kubeconfig file.
    pub kubernetes: Option<String>,
    /// The cluster's name, in records' `*_gke_details.cluster.cluster_name`.
    pub cluster_name: Option<String>,
    /// Per-Pod metric series (namespace, Pod and workload labels); off by default.
    pub metrics_pod_labels: Option<bool>,
}

impl Layer {
    /// Reads a TOML file, such as one a ConfigMap mounts.
    pub fn from_file(path: &std::path::Path) -> Result<Self, ConfigError> {
        let text = std::fs::read_to_string(path).map_err(|source| ConfigError::Read {
            path: path.to_owned(),
            source,
        })?;
        toml::from_str(&text).map_err(|source| ConfigError::Parse {
            path: path.to_owned(),
            source: Box::new(source),
        })
    }

    /// Reads TOML text (a ConfigMap's value).
    pub fn from_toml(text: &str) -> Result<Self, ConfigError> {
        toml::from_str(text).map_err(|source| ConfigError::Parse {
            path: "(text)".into(),
            source: Box::new(source),
        })
    }

    /// Reads `VISIBILITY_*` variables. Lists are separated by spaces or semicolons
    /// (commas belong to exempt rules).
    pub fn from_env(vars: impl IntoIterator<Item = (String, String)>) -> Result<Self, ConfigError> {
        let mut layer = Layer::default();
        for (name, value) in vars {
            let Some(key) = name.strip_prefix("VISIBILITY_") else {
                continue;
            };
            let list = || {
                value
                    .split([' ', ';'])
                    .filter(|s| !s.is_empty())
                    .map(str::to_owned)
                    .collect()
            };
            let bad = |what: &str| ConfigError::Env {
                name: name.clone(),
                reason: what.to_owned(),
            };
            match key {
                "POD_CIDR" => layer.pod_cidr = Some(list()),
                "CNI_CONF_DIR" => layer.cni_conf_dir = Some(value.clone()),
                "UPLINK" => layer.uplink = Some(value.clone()),
                "GATEWAY" => layer.gateway = Some(list()),
                "EXEMPT" => layer.exempt = Some(list()),
                "POD_INTERFACES" => layer.pod_interfaces = Some(value.clone()),
                "ENABLED" => {
                    layer.enabled = Some(value.parse().map_err(|_| bad("expected true or false"))?)
                }
                "FLOW_CAPACITY" => {
                    layer.flow_capacity = Some(value.parse().map_err(|_| bad("expected a number"))?)
                }
                "RECONCILE_INTERVAL" => {
                    layer.reconcile_interval =
                        Some(value.parse().map_err(|_| bad("expected seconds"))?)
                }
                "NODE_NAME" => layer.node_name = Some(value.clone()),
                "RECORDS" => layer.records = Some(value.clone()),
                "RECORDS_INTERVAL" => layer.records_interval = Some(value.clone()),
                "RECORDS_MAX_BYTES" => {
                    layer.records_max_bytes =
                        Some(value.parse().map_err(|_| bad("expected bytes"))?)
                }
                "RECORDS_KEEP" => {
                    layer.records_keep = Some(value.parse().map_err(|_| bad("expected a number"))?)
                }
                "METRICS_ADDR" => layer.metrics_addr = Some(value.clone()),
                "IPFIX" => layer.ipfix = Some(list()),
                "KUBERNETES" => layer.kubernetes = Some(value.clone()),
                "CLUSTER_NAME" => layer.cluster_name = Some(value.clone()),
                "METRICS_POD_LABELS" => {
                    layer.metrics_pod_labels =
                        Some(value.parse().map_err(|_| bad("expected true or false"))?)
                }
                // Variables read elsewhere (VISIBILITY_LOG, VISIBILITY_PIN_DIR by clap) or by
                // other tools are not ours to reject.
                _ => {}
            }
        }
        Ok(layer)
    }

    /// `other`'s values where it has them, ours elsewhere.
    pub fn overridden_by(self, other: Layer) -> Layer {
        Layer {
            pod_cidr: other.pod_cidr.or(self.pod_cidr),
            cni_conf_dir: other.cni_conf_dir.or(self.cni_conf_dir),
            uplink: other.uplink.or(self.uplink),
            gateway: other.gateway.or(self.gateway),
            exempt: other.exempt.or(self.exempt),
            pod_interfaces: other.pod_interfaces.or(self.pod_interfaces),
            enabled: other.enabled.or(self.enabled),
            flow_capacity: other.flow_capacity.or(self.flow_capacity),
            reconcile_interval: other.reconcile_interval.or(self.reconcile_interval),
            node_name: other.node_name.or(self.node_name),
            records: other.records.or(self.records),
            records_interval: other.records_interval.or(self.records_interval),
            records_max_bytes: other.records_max_bytes.or(self.records_max_bytes),
            records_keep: other.records_keep.or(self.records_keep),
            metrics_addr: other.metrics_addr.or(self.metrics_addr),
            ipfix: other.ipfix.or(self.ipfix),
            kubernetes: other.kubernetes.or(self.kubernetes),
            cluster_name: other.cluster_name.or(self.cluster_name),
            metrics_pod_labels: other.metrics_pod_labels.or(self.metrics_pod_labels),
        }
    }
}

/// Configuration errors.
#[derive(Debug, thiserror::Error)]
pub enum ConfigError {
    /// The file could not be read.
    #[error("reading {path}: {source}")]
    Read {
        path: PathBuf,
        #[source]
        source: std::io::Error,
    },
    /// The file is not valid TOML with known keys.
    #[error("{path}: {source}")]
    Parse {
        path: PathBuf,
        #[source]
        source: Box<toml::de::Error>,
    },
    /// An environment variable has a bad value.
    #[error("{name}: {reason}")]
    Env { name: String, reason: String },
    /// A value does not parse.
    #[error(transparent)]
    Input(#[from] InputError),
    /// A gateway without a matching family, or two of one family.
    #[error("{0}")]
    Invalid(String),
}

/// The resolved, validated configuration.
#[derive(Clone, Debug, PartialEq, Eq, serde::Serialize)]
pub struct NodeConfig {
    /// Configured Pod CIDRs: when there are any, the daemon learns none.
    pub pod_cidrs: Vec<IpNet>,
    pub cni_conf_dir: PathBuf,
    pub uplink: Option<String>,
    pub gateway_v4: Option<IpAddr>,
    pub gateway_v6: Option<IpAddr>,
    pub exemptions: Vec<Exemption>,
    pub pod_interfaces: Option<String>,
    pub enabled: bool,
    pub flow_capacity: u32,
    pub reconcile_interval_secs: u64,
    pub node_name: String,
    #[serde(skip)]
    pub records: SinkSpec,
    pub records_interval_secs: u64,
    pub metrics_addr: Option<SocketAddr>,
    /// IPFIX collectors, `HOST:PORT`, resolved by the exporter (so a name that does not
    /// resolve yet is an export error, not a daemon that will not start).
    pub ipfix_collectors: Vec<String>,
    /// The Kubernetes API: Pod names in records, the Node's Pod CIDRs.
    pub kubernetes: KubeConfig,
}

/// The default Prometheus endpoint: localhost only.
pub const DEFAULT_METRICS_ADDR: &str = "127.0.0.1:9476";

/// Checks an IPFIX collector's `HOST:PORT` (`[IPV6]:PORT` for an IPv6 address).
pub fn parse_collector(text: &str) -> Result<String, ConfigError> {
    let text = text.trim();
    let bad = || {
        ConfigError::Invalid(format!(
            "ipfix {text:?} is not HOST:PORT, such as collector.example:4739 or [fd00::1]:4739"
        ))
    };
    let (host, port) = text.rsplit_once(':').ok_or_else(bad)?;
    let bare_ipv6 = host.contains(':') && !(host.starts_with('[') && host.ends_with(']'));
    if host.is_empty() || bare_ipv6 || port.parse::<u16>().map_or(true, |p| p == 0) {
        return Err(bad());
    }
    Ok(text.to_owned())
}

/// Parses `10.52.0.0/24` or a bare address (as a /32 or /128).
pub fn parse_cidr(text: &str) -> Result<IpNet, InputError> {
    let text = text.trim();
    IpNet::from_str(text)
        .or_else(|_| IpAddr::from_str(text).map(IpNet::from))
        .map_err(|_| InputError::Cidr(text.to_owned()))
}

/// Parses a protocol name or number.
pub fn parse_protocol(text: &str) -> Result<u8, InputError> {
    match text.to_ascii_lowercase().as_str() {
        "tcp" => Ok(6),
        "udp" => Ok(17),
        "icmp" => Ok(1),
        "icmpv6" => Ok(58),
        "sctp" => Ok(132),
        number => number
            .parse::<u8>()
            .ok()
            .filter(|n| *n != 0)
            .ok_or_else(|| InputError::Protocol(text.to_owned())),
    }
}

/// The name of a protocol number, for display.
pub fn protocol_name(protocol: u8) -> String {
    match protocol {
        0 => "any".to_owned(),
        1 => "icmp".to_owned(),
        6 => "tcp".to_owned(),
        17 => "udp".to_owned(),
        58 => "icmpv6".to_owned(),
        132 => "sctp".to_owned(),
        other => other.to_string(),
    }
}

/// Parses `CIDR[,PROTO[/PORT]]`.
pub fn parse_exemption(text: &str) -> Result<Exemption, InputError> {
    let bad = || InputError::Exempt(text.to_owned());
    let (cidr, rest) = match text.split_once(',') {
        Some((cidr, rest)) => (cidr, Some(rest)),
        None => (text, None),
    };
    let cidr = parse_cidr(cidr).map_err(|_| bad())?.trunc();
    let (protocol, port) = match rest {
        None => (0, 0),
        Some(rest) => {
            let (protocol, port) = match rest.split_once('/') {
                Some((protocol, port)) => (protocol, Some(port)),
                None => (rest, None),
            };
            let protocol = parse_protocol(protocol)?;
            let port = match port {
                Some(port) => port
                    .parse::<u16>()
                    .ok()
                    .filter(|p| *p != 0)
                    .ok_or_else(bad)?,
                None => 0,
            };
            if port != 0 && !matches!(protocol, 6 | 17 | 132) {
                return Err(bad());
            }
            (protocol, port)
        }
    };
    Ok(Exemption {
        cidr,
        protocol,
        port,
    })
}

/// Formats an exemption the way [`parse_exemption`] reads it.
pub fn format_exemption(exemption: &Exemption) -> String {
    match (exemption.protocol, exemption.port) {
        (0, _) => exemption.cidr.to_string(),
        (protocol, 0) => format!("{},{}", exemption.cidr, protocol_name(protocol)),
        (protocol, port) => format!("{},{}/{port}", exemption.cidr, protocol_name(protocol)),
    }
}

impl NodeConfig {
    /// Validates a merged layer.
    pub fn resolve(layer: Layer) -> Result<Self, ConfigError> {
        let pod_cidrs = layer
            .pod_cidr
            .unwrap_or_default()
            .iter()
            .map(|c| parse_cidr(c).map(|n| n.trunc()))
            .collect::<Result<Vec<_>, _>>()?;
        let exemptions = layer
            .exempt
            .unwrap_or_default()
            .iter()
            .map(|e| parse_exemption(e))
            .collect::<Result<Vec<_>, _>>()?;
        let (mut gateway_v4, mut gateway_v6) = (None, None);
        for text in layer.gateway.unwrap_or_default() {
            let addr = IpAddr::from_str(text.trim()).map_err(|_| {
                ConfigError::Invalid(format!("gateway {text:?} is not an IP address"))
            })?;
            let slot = if addr.is_ipv4() {
                &mut gateway_v4
            } else {
                &mut gateway_v6
            };
            if slot.replace(addr).is_some() {
                return Err(ConfigError::Invalid(format!(
                    "more than one gateway of the family of {addr}"
                )));
            }
        }
        if let Some(glob) = &layer.pod_interfaces {
            globset::Glob::new(glob)
                .map_err(|e| ConfigError::Invalid(format!("--pod-interfaces {glob:?}: {e}")))?;
        }
        let flow_capacity = layer
            .flow_capacity
            .unwrap_or(visibility_common::DEFAULT_FLOW_CAPACITY);
        if flow_capacity == 0 {
            return Err(ConfigError::Invalid(
                "flow-capacity must be at least 1".to_owned(),
            ));
        }
        let records = match layer.records.as_deref() {
            None | Some("stdout") => SinkSpec::Stdout,
            Some("off") => SinkSpec::Off,
            Some(path) => SinkSpec::File {
                path: PathBuf::from(path),
                max_bytes: layer.records_max_bytes.unwrap_or(100 << 20),
                keep: layer.records_keep.unwrap_or(5),
            },
        };
        let interval = layer.records_interval.as_deref().unwrap_or("5s");
        let records_interval_secs = parse_interval(interval)
            .ok_or_else(|| {
                ConfigError::Invalid(format!(
                    "records-interval {interval:?}: use 5s, 30s, 1m, 5m, 10m or 15m"
                ))
            })?
            .as_secs();
        let metrics_addr = match layer
            .metrics_addr
            .as_deref()
            .unwrap_or(DEFAULT_METRICS_ADDR)
        {
            "off" => None,
            text => Some(SocketAddr::from_str(text).map_err(|_| {
                ConfigError::Invalid(format!(
                    "metrics-addr {text:?} is not an address such as 127.0.0.1:9476 (or off)"
                ))
            })?),
        };
        let ipfix_collectors = layer
            .ipfix
            .unwrap_or_default()
            .iter()
            .map(|c| parse_collector(c))
            .collect::<Result<Vec<_>, _>>()?;
        let kubernetes = KubeConfig {
            access: Access::parse(layer.kubernetes.as_deref().unwrap_or("auto")),
            cluster_name: layer.cluster_name.filter(|name| !name.is_empty()),
            pod_metric_labels: layer.metrics_pod_labels.unwrap_or(false),
        };
        Ok(Self {
            kubernetes,
            records,
            records_interval_secs,
            metrics_addr,
            ipfix_collectors,
            pod_cidrs,
            cni_conf_dir: PathBuf::from(
                layer
                    .cni_conf_dir
                    .as_deref()
                    .unwrap_or(crate::pod_cidrs::DEFAULT_CNI_CONF_DIR),
            ),
            uplink: layer.uplink,
            gateway_v4,
            gateway_v6,
            exemptions,
            pod_interfaces: layer.pod_interfaces,
            enabled: layer.enabled.unwrap_or(true),
            flow_capacity,
            reconcile_interval_secs: layer.reconcile_interval.unwrap_or(10).max(1),
            node_name: layer
                .node_name
                .or_else(|| {
                    nix::unistd::gethostname()
                        .ok()
                        .and_then(|h| h.into_string().ok())
                })
                .unwrap_or_default(),
        })
    }
}

/// Aggregation intervals VPC flow logs offer.
pub const INTERVALS: [(&str, u64); 6] = [
    ("5s", 5),
    ("30s", 30),
    ("1m", 60),
    ("5m", 300),
    ("10m", 600),
    ("15m", 900),
];

/// Parses one of [`INTERVALS`].
pub fn parse_interval(text: &str) -> Option<Duration> {
    INTERVALS
        .iter()
        .find(|(name, _)| *name == text)
        .map(|(_, secs)| Duration::from_secs(*secs))
}

/// Where records go.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub enum SinkSpec {
    /// JSON lines on standard output.
    #[default]
    Stdout,
    /// JSON lines in a file, rotated at `max_bytes` into `path.1` … `path.<keep>`.
    File {
        path: PathBuf,
        max_bytes: u64,
        keep: u32,
    },
    /// No records.
    Off,
}

#[cfg(test)]
mod tests {
    use super::*;

    fn env(pairs: &[(&str, &str)]) -> Vec<(String, String)> {
        pairs
            .iter()
            .map(|(k, v)| (k.to_string(), v.to_string()))
            .collect()
    }

    #[test]
    fn env_overrides_flags_which_override_the_file() {
        let file: Layer =
            toml::from_str("pod-cidr = [\"10.0.0.0/24\"]\nuplink = \"eth1\"\nenabled = false\n")
                .unwrap();
        let flags = Layer {
            uplink: Some("eth2".into()),
            ..Default::default()
        };
        let env =
            Layer::from_env(env(&[("VISIBILITY_ENABLED", "true"), ("HOME", "/root")])).unwrap();
        let merged = NodeConfig::resolve(file.overridden_by(flags).overridden_by(env)).unwrap();
        assert_eq!(merged.pod_cidrs, vec![parse_cidr("10.0.0.0/24").unwrap()]);
        assert_eq!(merged.uplink.as_deref(), Some("eth2"));
        assert!(merged.enabled);
    }

    #[test]
    fn env_lists_split_on_spaces_and_semicolons() {
        let layer = Layer::from_env(env(&[
            ("VISIBILITY_EXEMPT", "10.0.0.1/32,udp/53; fd00::/64"),
            ("VISIBILITY_POD_CIDR", "a b"),
        ]))
        .unwrap();
        assert_eq!(
            layer.exempt.unwrap(),
            vec!["10.0.0.1/32,udp/53", "fd00::/64"]
        );
        assert_eq!(layer.pod_cidr.unwrap(), vec!["a", "b"]);
        assert!(Layer::from_env(env(&[("VISIBILITY_ENABLED", "maybe")])).is_err());
    }

    #[test]
    fn unknown_file_keys_are_rejected() {
        assert!(toml::from_str::<Layer>("pod_cidrs = []").is_err());
    }

    #[test]
    fn exemptions_parse_and_format_round_trip() {
        for text in [
            "10.0.0.0/8",
            "10.0.0.10/32,udp/53",
            "fd00::/64,tcp",
            "10.1.0.0/16,132/9",
        ] {
            let exemption = parse_exemption(text).unwrap();
            assert_eq!(
                parse_exemption(&format_exemption(&exemption)).unwrap(),
                exemption,
                "{text}"
            );
        }
        let dns = parse_exemption("10.0.0.10,udp/53").unwrap();
        assert_eq!(
            (dns.cidr.prefix_len(), dns.protocol, dns.port),
            (32, 17, 53)
        );
        for bad in [
            "",
            "10.0.0.0/33",
            "10.0.0.0/8,bogus",
            "10.0.0.0/8,udp/0",
            "10.0.0.0/8,udp/70000",
            "10.0.0.0/8,icmp/5",
        ] {
            assert!(parse_exemption(bad).is_err(), "{bad:?}");
        }
    }

    #[test]
    fn ipfix_collectors_are_host_and_port_from_every_layer() {
        let file =
            Layer::from_toml("ipfix = [\"collector.example:4739\", \"[fd00::1]:4739\"]").unwrap();
        let resolved = NodeConfig::resolve(file.clone()).unwrap();
        assert_eq!(
            resolved.ipfix_collectors,
            ["collector.example:4739", "[fd00::1]:4739"]
        );
        let env = Layer::from_env(env(&[("VISIBILITY_IPFIX", "10.0.0.9:2055")])).unwrap();
        let merged = NodeConfig::resolve(file.overridden_by(env)).unwrap();
        assert_eq!(merged.ipfix_collectors, ["10.0.0.9:2055"]);
        for bad in ["collector", ":4739", "host:0", "host:70000", "fd00::1:4739"] {
            let layer = Layer {
                ipfix: Some(vec![bad.into()]),
                ..Default::default()
            };
            assert!(NodeConfig::resolve(layer).is_err(), "{bad}");
        }
    }

    #[test]
    fn gateways_are_one_per_family() {
        let two_v4 = Layer {
            gateway: Some(vec!["10.0.0.1".into(), "10.0.0.2".into()]),
            ..Default::default()
        };
        assert!(NodeConfig::resolve(two_v4).is_err());
        let both = Layer {
            gateway: Some(vec!["10.0.0.1".into(), "fe80::1".into()]),
            ..Default::default()
        };
        let resolved = NodeConfig::resolve(both).unwrap();
        assert!(resolved.gateway_v4.is_some() && resolved.gateway_v6.is_some());
    }

    #[test]
    fn intervals_are_the_vpc_flow_log_ones() {
        assert_eq!(parse_interval("5s"), Some(Duration::from_secs(5)));
        assert_eq!(parse_interval("15m"), Some(Duration::from_secs(900)));
        assert_eq!(parse_interval("7s"), None);
    }
}
