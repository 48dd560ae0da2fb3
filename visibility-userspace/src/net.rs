//! Address helpers shared by the maps, the daemon and the CLI.

use std::net::IpAddr;

use ipnet::IpNet;
use visibility_common::packet::Family;

/// An address as the datapath stores it: IPv4 in the first four bytes, the rest zero.
pub fn addr_bytes(addr: &IpAddr) -> [u8; 16] {
    match addr {
        IpAddr::V4(v4) => {
            let mut out = [0u8; 16];
            out[..4].copy_from_slice(&v4.octets());
            out
        }
        IpAddr::V6(v6) => v6.octets(),
    }
}

/// The address stored as [`addr_bytes`] does, back as an `IpAddr`.
pub fn addr_from_bytes(family: Family, bytes: &[u8; 16]) -> IpAddr {
    match family {
        Family::V4 => IpAddr::from([bytes[0], bytes[1], bytes[2], bytes[3]]),
        Family::V6 => IpAddr::from(*bytes),
    }
}

pub fn family_of(net: &IpNet) -> Family {
    family_of_addr(&net.addr())
}

pub fn family_of_addr(addr: &IpAddr) -> Family {
    match addr {
        IpAddr::V4(_) => Family::V4,
        IpAddr::V6(_) => Family::V6,
    }
}
