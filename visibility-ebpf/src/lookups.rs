//! Answers the verdict's questions from the maps.

use aya_ebpf::maps::lpm_trie::Key;
use visibility_common::{
    config::Settings,
    flow::FlowKey,
    packet::{Family, IPPROTO_TCP, IPPROTO_UDP, Packet},
    verdict::{AddrKind, Lookups},
};

use crate::maps::{EXEMPT_V4, EXEMPT_V6, NAT_LEGS, POD_CIDRS_V4, POD_CIDRS_V6};

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
    fn addr_kind(&self, family: Family, addr: &[u8; 16]) -> AddrKind {
        let entry = match family {
            Family::V4 => POD_CIDRS_V4.get(Key::new(32, v4(addr))),
            Family::V6 => POD_CIDRS_V6.get(Key::new(128, *addr)),
        };
        AddrKind::of_entry(entry.copied())
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

    #[inline(always)]
    fn is_nat_reply(&self, packet: &Packet) -> bool {
        matches!(packet.protocol, IPPROTO_TCP | IPPROTO_UDP)
            && NAT_LEGS
                .get_ptr(FlowKey::from_packet(packet).reversed())
                .is_some()
    }
}
