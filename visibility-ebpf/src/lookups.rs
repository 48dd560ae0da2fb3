//! Answers the verdict's questions from the maps.

use aya_ebpf::maps::lpm_trie::Key;
use visibility_common::{
    config::{NodeAddr, Settings},
    packet::Family,
    verdict::Lookups,
};

use crate::maps::{EXEMPT_V4, EXEMPT_V6, NODE_ADDRS, POD_CIDRS_V4, POD_CIDRS_V6};

pub struct MapLookups<'a> {
    pub settings: &'a Settings,
}

fn v4(addr: &[u8; 16]) -> [u8; 4] {
    [addr[0], addr[1], addr[2], addr[3]]
}

impl Lookups for MapLookups<'_> {
    #[inline(always)]
    fn enabled(&self) -> bool {
        self.settings.enabled != 0
    }

    #[inline(always)]
    fn in_pod_cidrs(&self, family: Family, addr: &[u8; 16]) -> bool {
        match family {
            Family::V4 => POD_CIDRS_V4.get(Key::new(32, v4(addr))).is_some(),
            Family::V6 => POD_CIDRS_V6.get(Key::new(128, *addr)).is_some(),
        }
    }

    #[inline(always)]
    fn is_node_addr(&self, family: Family, addr: &[u8; 16]) -> bool {
        let key = NodeAddr {
            addr: *addr,
            family: family as u8,
            _pad: [0; 3],
        };
        NODE_ADDRS.get_ptr(key).is_some()
    }

    #[inline(always)]
    fn is_exempt(&self, family: Family, addr: &[u8; 16], protocol: u8, port: u16) -> bool {
        if self.settings.has_exemptions == 0 {
            return false;
        }
        let rules = match family {
            Family::V4 => EXEMPT_V4.get(Key::new(32, v4(addr))),
            Family::V6 => EXEMPT_V6.get(Key::new(128, *addr)),
        };
        rules.is_some_and(|rules| rules.matches(protocol, port))
    }

    #[inline(always)]
    fn has_gateway(&self, family: Family) -> bool {
        self.settings.gateway(family).is_configured()
    }
}
