//! Where the datapath's programs run.

/// Where a program runs.
#[repr(u32)]
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub enum Hook {
    /// Host side of a Pod veth, ingress: what the Pod sends, before the node's stack.
    /// Only counts: every packet goes on to the node's stack.
    PodIngress,
    /// Host side of a Pod veth, egress: what the node forwards to the Pod, after the
    /// node's netfilter (filter, conntrack, NAT). Same-node Pod-to-Pod packets are sent
    /// to the gateway from here.
    PodEgress,
    /// The uplink, ingress: what the network sends the node. Packets of flows sent to
    /// the gateway are handed to their Pod.
    Uplink,
}

impl Hook {
    pub const ALL: &'static [Hook] = &[Hook::PodIngress, Hook::PodEgress, Hook::Uplink];

    /// A stable snake_case name, used in the CLI and in metric labels.
    pub const fn name(self) -> &'static str {
        match self {
            Hook::PodIngress => "pod_ingress",
            Hook::PodEgress => "pod_egress",
            Hook::Uplink => "uplink_ingress",
        }
    }
}
