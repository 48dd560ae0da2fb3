//! Configuration maps that userspace writes while the programs run.

/// Where redirected packets of one address family leave the node.
#[repr(C)]
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct Gateway {
    /// The uplink's ifindex; 0 when the family has no gateway.
    pub ifindex: u32,
    /// The gateway's address, IPv4 in the first four bytes.
    pub addr: [u8; 16],
    /// The node's own address on the uplink, IPv4 in the first four bytes: the source
    /// of the ICMP errors the datapath sends as a router (packet too big).
    pub node_addr: [u8; 16],
}

impl Gateway {
    /// Whether this family has somewhere to send packets.
    pub const fn is_configured(&self) -> bool {
        self.ifindex != 0
    }
}

/// The single entry of the settings map.
#[repr(C)]
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct Settings {
    /// 1 when visibility is on. Checked on every packet, so a change takes effect
    /// on the next one.
    pub enabled: u8,
    /// 1 when any exempt range is configured, so the common case skips the two exempt
    /// lookups per packet.
    pub has_exemptions: u8,
    pub _pad: [u8; 2],
    pub gateway_v4: Gateway,
    pub gateway_v6: Gateway,
}

impl Settings {
    /// The gateway for one family.
    pub const fn gateway(&self, family: crate::packet::Family) -> &Gateway {
        match family {
            crate::packet::Family::V4 => &self.gateway_v4,
            crate::packet::Family::V6 => &self.gateway_v6,
        }
    }
}

/// Matches any protocol or any port.
pub const ANY: u16 = 0;

/// One exemption of a prefix: a protocol and a port, each possibly [`ANY`].
#[repr(C)]
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub struct ExemptRule {
    /// IANA protocol number, or 0 for any.
    pub protocol: u8,
    /// 1 when copied from a shorter prefix that covers this one (see [`ExemptRules`]);
    /// the datapath ignores it, userspace lists only rules that are not inherited.
    pub inherited: u8,
    /// Port in host byte order, or 0 for any.
    pub port: u16,
}

impl ExemptRule {
    /// Whether a packet with this protocol and port is covered.
    pub const fn matches(&self, protocol: u8, port: u16) -> bool {
        (self.protocol as u16 == ANY || self.protocol == protocol)
            && (self.port == ANY || self.port == port)
    }
}

/// How many rules one exempt prefix may carry.
pub const MAX_EXEMPT_RULES: usize = 8;

/// Value of the exempt LPM tries.
///
/// An LPM trie returns only the longest matching prefix, so userspace stores in each
/// prefix the rules of every shorter prefix that covers it too.
#[repr(C)]
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct ExemptRules {
    /// How many entries of `rules` are in use.
    pub len: u32,
    pub rules: [ExemptRule; MAX_EXEMPT_RULES],
}

impl ExemptRules {
    /// Whether any rule covers this protocol and port.
    pub fn matches(&self, protocol: u8, port: u16) -> bool {
        let len = if (self.len as usize) < MAX_EXEMPT_RULES {
            self.len as usize
        } else {
            MAX_EXEMPT_RULES
        };
        let mut i = 0;
        while i < len {
            if self.rules[i].matches(protocol, port) {
                return true;
            }
            i += 1;
        }
        false
    }
}

/// Value flag of a Pod-CIDR trie entry that is one of the Pod CIDRs.
pub const POD_CIDR_ENTRY: u8 = 1;
/// Value flag of a Pod-CIDR trie entry that is a node address (a host-length prefix)
/// inside one of the Pod CIDRs. The datapath then needs one trie lookup per address,
/// not a trie lookup and a node-address lookup. The control plane keeps the list of
/// the node's addresses (in userspace) and marks those a Pod CIDR covers.
pub const NODE_ADDR_ENTRY: u8 = 2;
/// Value flag of a Pod-CIDR trie entry, beside [`POD_CIDR_ENTRY`], that the daemon
/// learned from the node (its routes, its CNI) rather than was told: it removes the
/// entry when the node no longer says so. The datapath reads every non-node entry as a
/// Pod CIDR, whatever else is set.
pub const LEARNED_POD_CIDR_ENTRY: u8 = 4;

/// Value of the Pod-interface map.
#[repr(C)]
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct PodIface {
    /// 1 when the interface is one end of a veth pair, so that returning packets
    /// can be handed straight to the Pod's side with `bpf_redirect_peer`.
    pub is_veth: u8,
    pub _pad: [u8; 3],
    /// The interface the node routes this Pod's addresses to: the interface itself
    /// (ptp CNIs), or the bridge it is a port of. A packet from the interface whose
    /// source the node routes elsewhere is spoofed.
    pub route_ifindex: u32,
}

#[cfg(feature = "user")]
mod pod_impls {
    // SAFETY: all of these are `#[repr(C)]`, `Copy`, and have explicit padding.
    unsafe impl aya::Pod for super::Settings {}
    unsafe impl aya::Pod for super::ExemptRules {}
    unsafe impl aya::Pod for super::PodIface {}
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn exempt_rules_match_protocol_and_port() {
        let mut rules = ExemptRules::default();
        rules.rules[0] = ExemptRule {
            protocol: 17,
            inherited: 0,
            port: 53,
        };
        rules.len = 1;
        assert!(rules.matches(17, 53));
        assert!(!rules.matches(6, 53));
        assert!(!rules.matches(17, 54));
        rules.rules[1] = ExemptRule {
            protocol: 6,
            inherited: 0,
            port: ANY,
        };
        rules.len = 2;
        assert!(rules.matches(6, 80));
        assert!(!rules.matches(1, 0));
    }

    #[test]
    fn an_out_of_range_length_is_clamped() {
        let rules = ExemptRules {
            len: 1000,
            ..Default::default()
        };
        // Eight zeroed rules match anything; the point is that nothing reads past them.
        assert!(rules.matches(6, 80));
    }

    #[test]
    fn layouts_have_no_implicit_padding() {
        assert_eq!(core::mem::size_of::<Gateway>(), 36);
        assert_eq!(core::mem::size_of::<Settings>(), 4 + 2 * 36);
        assert_eq!(core::mem::size_of::<PodIface>(), 8);
        assert_eq!(core::mem::size_of::<ExemptRule>(), 4);
        assert_eq!(core::mem::size_of::<ExemptRules>(), 4 + 8 * 4);
    }
}
