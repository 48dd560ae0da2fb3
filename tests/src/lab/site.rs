//! Which node of the lab's cluster a [`super::Lab`] is: every node sits behind the
//! one gateway on a link of its own, with a Pod range of its own. Node 0 is the
//! classic lab (the constants of [`super::addresses`]); node `n` has the Pod ranges
//! `10.52.n.0/24` and `fd00:52:n::/64`, and the link `10.128.n.0/24`, `fd00:128:n::/64`
//! to the gateway's `eth<n>`.

use std::net::{IpAddr, Ipv4Addr, Ipv6Addr};

use super::addresses::{IpFamily, MAX_PODS};

/// A node's number in the lab's cluster.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Site(pub u8);

impl Site {
    /// The classic single lab node.
    pub const FIRST: Site = Site(0);

    /// The gateway's interface toward this node, in the gateway namespace.
    pub fn gateway_ifname(self) -> String {
        format!("eth{}", self.0)
    }

    /// The node's Pod range in `family`, as `ip route` takes it.
    pub fn pod_cidr(self, family: IpFamily) -> String {
        match family {
            IpFamily::V4 => format!("{}/24", Ipv4Addr::new(10, 52, self.0, 0)),
            IpFamily::V6 => format!("{}/64", self.v6(0x52, 0)),
        }
    }

    /// The address of Pod `index` (0-based): `.index+2` of the Pod range.
    ///
    /// # Panics
    /// If `index >= MAX_PODS`.
    pub fn pod_ip(self, index: usize, family: IpFamily) -> IpAddr {
        match family {
            IpFamily::V4 => self.pod_ipv4(index).into(),
            IpFamily::V6 => self.pod_ipv6(index).into(),
        }
    }

    /// Pod `index`'s IPv4 address; panics like [`Site::pod_ip`].
    pub fn pod_ipv4(self, index: usize) -> Ipv4Addr {
        Ipv4Addr::new(10, 52, self.0, pod_host(index))
    }

    /// Pod `index`'s IPv6 address; panics like [`Site::pod_ip`].
    pub fn pod_ipv6(self, index: usize) -> Ipv6Addr {
        self.v6(0x52, u16::from(pod_host(index)))
    }

    /// The address every host-side veth carries: the Pods' gateway. IPv6 uses the
    /// link-local `fe80::1` on every node.
    pub fn pod_gateway_ipv4(self) -> Ipv4Addr {
        Ipv4Addr::new(10, 52, self.0, 1)
    }

    /// The node's address on its link to the gateway.
    pub fn node_ip(self, family: IpFamily) -> IpAddr {
        self.link_ip(family, 2)
    }

    /// The gateway's address on its link to this node.
    pub fn gateway_ip(self, family: IpFamily) -> IpAddr {
        self.link_ip(family, 1)
    }

    fn link_ip(self, family: IpFamily, host: u8) -> IpAddr {
        match family {
            IpFamily::V4 => Ipv4Addr::new(10, 128, self.0, host).into(),
            IpFamily::V6 => self.v6(0x128, u16::from(host)).into(),
        }
    }

    fn v6(self, range: u16, host: u16) -> Ipv6Addr {
        Ipv6Addr::new(0xfd00, range, u16::from(self.0), 0, 0, 0, 0, host)
    }
}

/// The last byte of Pod `index`'s addresses.
fn pod_host(index: usize) -> u8 {
    assert!(index < MAX_PODS, "pod index {index} out of range");
    (index + 2) as u8
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::lab::addresses::*;

    #[test]
    fn the_first_site_is_the_classic_lab() {
        let first = Site::FIRST;
        assert_eq!(first.gateway_ifname(), GATEWAY_IFNAME);
        assert_eq!(first.pod_cidr(IpFamily::V4), POD_CIDR_V4);
        assert_eq!(first.pod_cidr(IpFamily::V6), POD_CIDR_V6);
        assert_eq!(first.pod_ip(1, IpFamily::V4), IpAddr::from(pod_ipv4(1)));
        assert_eq!(first.pod_ip(1, IpFamily::V6), IpAddr::from(pod_ipv6(1)));
        assert_eq!(first.pod_gateway_ipv4(), POD_GATEWAY_V4);
        assert_eq!(first.node_ip(IpFamily::V6), IpAddr::from(NODE_IPV6));
        assert_eq!(first.gateway_ip(IpFamily::V4), IpAddr::from(GATEWAY_IPV4));
    }

    #[test]
    fn a_second_site_has_ranges_of_its_own() {
        let second = Site(1);
        assert_eq!(second.pod_cidr(IpFamily::V4), "10.52.1.0/24");
        assert_eq!(second.pod_cidr(IpFamily::V6), "fd00:52:1::/64");
        assert_eq!(second.pod_ip(0, IpFamily::V6).to_string(), "fd00:52:1::2");
        assert_eq!(second.node_ip(IpFamily::V4).to_string(), "10.128.1.2");
        assert_eq!(second.gateway_ifname(), "eth1");
    }
}
