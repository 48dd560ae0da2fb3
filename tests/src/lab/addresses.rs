//! The lab's address plan: the Pods', the node's and the gateway's addresses and
//! interface names, and the address family type the lab's helpers take.

use std::net::{IpAddr, Ipv4Addr, Ipv6Addr};

/// The Pods' IPv4 range (the node's Pod CIDR).
pub const POD_CIDR_V4: &str = "10.52.0.0/24";
/// The Pods' IPv6 range.
pub const POD_CIDR_V6: &str = "fd00:52::/64";
/// The Pods' IPv4 gateway: the address every host-side veth carries.
pub const POD_GATEWAY_V4: Ipv4Addr = Ipv4Addr::new(10, 52, 0, 1);
/// The Pods' IPv6 gateway: the link-local address every host-side veth carries.
pub const POD_GATEWAY_V6: Ipv6Addr = Ipv6Addr::new(0xfe80, 0, 0, 0, 0, 0, 0, 1);
/// The name of the node's uplink (towards the gateway), in the node namespace.
pub const NODE_UPLINK: &str = "eth0";
/// The name of a Pod's interface, in the Pod's namespace.
pub const POD_IFNAME: &str = "eth0";
/// The name of the gateway's interface, in the gateway namespace.
pub const GATEWAY_IFNAME: &str = "eth0";
/// The node's IPv4 address on the uplink.
pub const NODE_IPV4: Ipv4Addr = Ipv4Addr::new(10, 128, 0, 2);
/// The node's IPv6 address on the uplink.
pub const NODE_IPV6: Ipv6Addr = Ipv6Addr::new(0xfd00, 0x128, 0, 0, 0, 0, 0, 2);
/// The gateway's IPv4 address.
pub const GATEWAY_IPV4: Ipv4Addr = Ipv4Addr::new(10, 128, 0, 1);
/// The gateway's IPv6 address.
pub const GATEWAY_IPV6: Ipv6Addr = Ipv6Addr::new(0xfd00, 0x128, 0, 0, 0, 0, 0, 1);
/// The IPv4 subnet of the link between node and gateway.
pub const UPLINK_CIDR_V4: &str = "10.128.0.0/24";
/// The IPv6 subnet of the link between node and gateway.
pub const UPLINK_CIDR_V6: &str = "fd00:128::/64";
/// How many Pods a lab can hold at most (indices 0..=252, addresses .2 to .254).
pub const MAX_PODS: usize = 253;

/// The IPv4 address of Pod `index` (0-based): `10.52.0.(index+2)`.
///
/// # Panics
/// If `index >= MAX_PODS`.
pub fn pod_ipv4(index: usize) -> Ipv4Addr {
    assert!(index < MAX_PODS, "pod index {index} out of range");
    Ipv4Addr::new(10, 52, 0, (index + 2) as u8)
}

/// The IPv6 address of Pod `index` (0-based): `fd00:52::(index+2)`.
///
/// # Panics
/// If `index >= MAX_PODS`.
pub fn pod_ipv6(index: usize) -> Ipv6Addr {
    assert!(index < MAX_PODS, "pod index {index} out of range");
    Ipv6Addr::new(0xfd00, 0x52, 0, 0, 0, 0, 0, (index + 2) as u16)
}

/// The name of Pod `index`'s host-side veth, in the node namespace: `veth<index>`.
pub fn pod_host_ifname(index: usize) -> String {
    format!("veth{index}")
}

/// An address family.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum IpFamily {
    /// IPv4.
    V4,
    /// IPv6.
    V6,
}

impl IpFamily {
    /// The family of `addr`.
    pub fn of(addr: IpAddr) -> Self {
        if addr.is_ipv4() {
            IpFamily::V4
        } else {
            IpFamily::V6
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn addresses() {
        assert_eq!(pod_ipv4(0), Ipv4Addr::new(10, 52, 0, 2));
        assert_eq!(pod_ipv6(1).to_string(), "fd00:52::3");
        assert_eq!(pod_ipv4(MAX_PODS - 1), Ipv4Addr::new(10, 52, 0, 254));
        assert_eq!(POD_GATEWAY_V6.to_string(), "fe80::1");
        assert_eq!(NODE_IPV6.to_string(), "fd00:128::2");
    }
}
