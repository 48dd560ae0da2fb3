//! Flow records, field-compatible with Google Cloud VPC flow logs' `jsonPayload`
//! (`connection`, `bytes_sent`, `packets_sent`, `start_time`, `end_time`, `reporter`,
//! `src_gke_details`/`dest_gke_details`), with our own fields alongside.

use serde::{Serialize, Serializer};

/// int64 values are JSON strings in VPC flow logs (`"bytes_sent":"1776"`).
fn as_string<S: Serializer>(value: &u64, serializer: S) -> Result<S::Ok, S::Error> {
    serializer.collect_str(value)
}

/// The 5-tuple, as VPC flow logs name it. Protocol is the IANA number.
#[derive(Clone, Debug, PartialEq, Eq, Serialize)]
pub struct Connection {
    pub src_ip: String,
    pub src_port: u16,
    pub dest_ip: String,
    pub dest_port: u16,
    pub protocol: u8,
}

/// A Pod's workload, as VPC flow logs' `*_gke_details.pod.pod_workload`: its
/// controller's kind (`Deployment` for a ReplicaSet a Deployment owns) and name.
#[derive(Clone, Debug, PartialEq, Eq, Serialize)]
pub struct PodWorkload {
    pub workload_name: String,
    pub workload_type: String,
}

/// A Pod, as VPC flow logs' `*_gke_details.pod`.
#[derive(Clone, Debug, PartialEq, Eq, Serialize)]
pub struct PodDetails {
    pub pod_name: String,
    pub pod_namespace: String,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub pod_workload: Option<PodWorkload>,
}

/// The cluster, as VPC flow logs' `*_gke_details.cluster` (its name from the
/// configuration's `cluster-name`).
#[derive(Clone, Debug, PartialEq, Eq, Serialize)]
pub struct ClusterDetails {
    pub cluster_name: String,
}

/// VPC flow logs' `src_gke_details` / `dest_gke_details`.
#[derive(Clone, Debug, PartialEq, Eq, Serialize)]
pub struct GkeDetails {
    #[serde(skip_serializing_if = "Option::is_none")]
    pub cluster: Option<ClusterDetails>,
    pub pod: PodDetails,
}

/// One flow over one interval (records) or since it was first seen (`visibility flows`).
#[derive(Clone, Debug, PartialEq, Eq, Serialize)]
pub struct FlowRecord {
    pub connection: Connection,
    #[serde(serialize_with = "as_string")]
    pub bytes_sent: u64,
    #[serde(serialize_with = "as_string")]
    pub packets_sent: u64,
    /// RFC 3339 with nanoseconds: first and last packet.
    pub start_time: String,
    pub end_time: String,
    /// `SRC`: this node is the source's node.
    pub reporter: &'static str,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub src_gke_details: Option<GkeDetails>,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub dest_gke_details: Option<GkeDetails>,
    /// Our own fields.
    /// The path the flow took: `via_gateway`, `via_gateway_after_nat`, `exempt`,
    /// `returned_from_gateway`, `not_same_node` or `local`.
    pub path: &'static str,
    /// Of the packets sent, those that came back from the gateway and reached the Pod.
    #[serde(serialize_with = "as_string")]
    pub returned_packets: u64,
    #[serde(serialize_with = "as_string")]
    pub returned_bytes: u64,
    /// TCP flags seen, e.g. `["SYN", "ACK"]`.
    pub tcp_flags: Vec<&'static str>,
    pub node_name: String,
    /// The interfaces the flow entered and left the node on, when known.
    pub src_interface: Option<String>,
    pub dest_interface: Option<String>,
}

/// TCP flag names, in bit order.
pub fn tcp_flag_names(flags: u8) -> Vec<&'static str> {
    const NAMES: [&str; 8] = ["FIN", "SYN", "RST", "PSH", "ACK", "URG", "ECE", "CWR"];
    NAMES
        .iter()
        .enumerate()
        .filter(|(bit, _)| flags & (1 << bit) != 0)
        .map(|(_, name)| *name)
        .collect()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn counts_are_strings_as_in_vpc_flow_logs() {
        let record = FlowRecord {
            connection: Connection {
                src_ip: "10.52.0.2".into(),
                src_port: 4000,
                dest_ip: "10.52.0.3".into(),
                dest_port: 8080,
                protocol: 6,
            },
            bytes_sent: 1776,
            packets_sent: 12,
            start_time: "t0".into(),
            end_time: "t1".into(),
            reporter: "SRC",
            src_gke_details: None,
            dest_gke_details: None,
            path: "via_gateway",
            returned_packets: 12,
            returned_bytes: 1776,
            tcp_flags: tcp_flag_names(0x12),
            node_name: "node".into(),
            src_interface: None,
            dest_interface: None,
        };
        let json = serde_json::to_value(&record).unwrap();
        assert_eq!(json["bytes_sent"], "1776");
        assert_eq!(json["packets_sent"], "12");
        assert_eq!(json["connection"]["protocol"], 6);
        assert_eq!(json["tcp_flags"], serde_json::json!(["SYN", "ACK"]));
        assert!(json.get("src_gke_details").is_none());
    }
}
