//! Addresses and prefixes as the datapath's maps store them: the one place that turns
//! an `IpAddr` or `IpNet` into map bytes and keys, and map bytes back into addresses.

use std::net::IpAddr;

use aya::maps::lpm_trie::Key;
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

/// A prefix as a key of the datapath's LPM tries (the Pod CIDRs, the exemptions):
/// one trie per family, so one key type per family.
#[derive(Clone, Copy)]
pub enum PrefixKey {
    V4(Key<[u8; 4]>),
    V6(Key<[u8; 16]>),
}

impl From<&IpNet> for PrefixKey {
    /// The key of the network `net` names (host bits cleared).
    fn from(net: &IpNet) -> Self {
        let prefix_len = u32::from(net.prefix_len());
        match net.network() {
            IpAddr::V4(addr) => PrefixKey::V4(Key::new(prefix_len, addr.octets())),
            IpAddr::V6(addr) => PrefixKey::V6(Key::new(prefix_len, addr.octets())),
        }
    }
}

/// A trie key read back (its prefix length and bytes), as the prefix it stands for;
/// `None` when the key is not of the family's size or length.
pub fn net_from_key(family: Family, prefix_len: u32, data: &[u8]) -> Option<IpNet> {
    let mut bytes = [0u8; 16];
    match family {
        Family::V4 if data.len() == 4 => bytes[..4].copy_from_slice(data),
        Family::V6 if data.len() == 16 => bytes.copy_from_slice(data),
        _ => return None,
    }
    IpNet::new(
        addr_from_bytes(family, &bytes),
        u8::try_from(prefix_len).ok()?,
    )
    .ok()
}

/// Every address the node owns, as the kernel lists them now; none when it cannot be
/// asked (the daemon's next reconcile marks them).
pub fn node_addresses() -> Vec<IpAddr> {
    let Ok(interfaces) = nix::ifaddrs::getifaddrs() else {
        return Vec::new();
    };
    let mut addrs: Vec<IpAddr> = interfaces
        .filter_map(|interface| interface.address)
        .filter_map(|address| {
            if let Some(v4) = address.as_sockaddr_in() {
                Some(IpAddr::from(v4.ip()))
            } else {
                address.as_sockaddr_in6().map(|v6| IpAddr::from(v6.ip()))
            }
        })
        .collect();
    addrs.sort();
    addrs.dedup();
    addrs
}

/// The family as logs and metric labels name it.
pub fn family_name(family: Family) -> &'static str {
    match family {
        Family::V4 => "v4",
        Family::V6 => "v6",
    }
}

/// A MAC address as `ip link` shows it.
pub fn format_mac(mac: &[u8; 6]) -> String {
    mac.iter()
        .map(|b| format!("{b:02x}"))
        .collect::<Vec<_>>()
        .join(":")
}

#[cfg(test)]
mod tests {
    use super::*;

    fn key_parts(key: PrefixKey) -> (Family, u32, Vec<u8>) {
        match key {
            PrefixKey::V4(key) => (Family::V4, key.prefix_len(), key.data().to_vec()),
            PrefixKey::V6(key) => (Family::V6, key.prefix_len(), key.data().to_vec()),
        }
    }

    #[test]
    fn prefixes_become_keys_of_their_network_and_back() {
        for (given, network) in [
            ("10.52.0.7/24", "10.52.0.0/24"),
            ("10.52.0.2/32", "10.52.0.2/32"),
            ("fd00:52::9/64", "fd00:52::/64"),
        ] {
            let net: IpNet = given.parse().unwrap();
            let (family, prefix_len, data) = key_parts(PrefixKey::from(&net));
            assert_eq!(family, family_of(&net));
            assert_eq!(
                net_from_key(family, prefix_len, &data),
                Some(network.parse().unwrap()),
                "{given}"
            );
        }
    }

    #[test]
    fn keys_of_the_wrong_size_or_length_are_refused() {
        assert_eq!(net_from_key(Family::V4, 24, &[10, 52, 0]), None);
        assert_eq!(net_from_key(Family::V6, 64, &[0; 4]), None);
        assert_eq!(net_from_key(Family::V4, 33, &[10, 52, 0, 0]), None);
    }

    #[test]
    fn addresses_round_trip_through_map_bytes() {
        for addr in ["10.52.0.2", "fd00:52::3"] {
            let addr: IpAddr = addr.parse().unwrap();
            assert_eq!(
                addr_from_bytes(family_of_addr(&addr), &addr_bytes(&addr)),
                addr
            );
        }
    }
}
