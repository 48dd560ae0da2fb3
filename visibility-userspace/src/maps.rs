//! Typed access to the pinned maps, for the daemon and the CLI alike. Changes take
//! effect on the next packet.

use std::{collections::BTreeMap, net::IpAddr};

use aya::maps::{Array, HashMap, LpmTrie, Map, MapData, PerCpuArray};
use ipnet::IpNet;
use visibility_common::{
    clock::JiffiesClock,
    config::{
        ExemptRule, ExemptRules, Gateway, LEARNED_POD_CIDR_ENTRY, MAX_EXEMPT_RULES,
        NODE_ADDR_ENTRY, POD_CIDR_ENTRY, PodIface, Settings,
    },
    counters::{Counter, CounterValue, slot},
    flow::{FlowKey, FlowStats},
    map_names,
    packet::Family,
    verdict::Hook,
};

use crate::{
    datapath::PinDir,
    error::MapsError,
    net::{PrefixKey, family_of, family_of_addr, net_from_key},
};

/// A prefix exempted for a protocol and port (each possibly any).
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, PartialOrd, Ord, serde::Serialize)]
pub struct Exemption {
    pub cidr: IpNet,
    /// IANA protocol number; 0 for any.
    pub protocol: u8,
    /// Port; 0 for any.
    pub port: u16,
}

/// The pinned maps.
pub struct Maps {
    settings: Array<MapData, Settings>,
    pods_v4: LpmTrie<MapData, [u8; 4], u8>,
    pods_v6: LpmTrie<MapData, [u8; 16], u8>,
    exempt_v4: LpmTrie<MapData, [u8; 4], ExemptRules>,
    exempt_v6: LpmTrie<MapData, [u8; 16], ExemptRules>,
    pod_ifaces: HashMap<MapData, u32, PodIface>,
    // Opened as a HashMap: aya reads LRU hash maps through the same type.
    flows: HashMap<MapData, FlowKey, FlowStats>,
    counters: PerCpuArray<MapData, CounterValue>,
    /// `None` in a datapath pinned before the clock map existed.
    clock: Option<Array<MapData, JiffiesClock>>,
    /// The directory the maps are pinned in, which [`Maps::lock`] locks.
    dir: std::path::PathBuf,
}

/// Held while one process reads, changes and writes back a set of entries (the
/// settings, the exemptions, the Pod CIDRs with the node addresses they mark), so that
/// two CLI commands and the daemon never lose each other's updates. An exclusive
/// `flock` of the maps' pin directory, released on drop (or when the process dies).
pub struct MapsLock {
    _held: nix::fcntl::Flock<std::fs::File>,
}

fn open<T>(pins: &PinDir, name: &'static str) -> Result<T, MapsError>
where
    T: TryFrom<Map, Error = aya::maps::MapError>,
{
    let data = MapData::from_pin(pins.map(name)).map_err(MapsError::map(name))?;
    let map = Map::from_map_data(data).map_err(MapsError::map(name))?;
    T::try_from(map).map_err(MapsError::map(name))
}

fn pod_trie_name(family: Family) -> &'static str {
    match family {
        Family::V4 => map_names::POD_CIDRS_V4,
        Family::V6 => map_names::POD_CIDRS_V6,
    }
}

/// The flags of the entry for exactly `net` (0 when there is none). Lookups in an LPM
/// trie match the longest prefix, so exact entries are found in the listing.
fn exact_flags(entries: &[(IpNet, u8)], net: &IpNet) -> u8 {
    entries
        .iter()
        .find(|(entry, _)| entry == net)
        .map_or(0, |(_, flags)| *flags)
}

impl Maps {
    /// Opens the maps pinned under `pins`.
    pub fn open(pins: &PinDir) -> Result<Self, MapsError> {
        if !pins.map(map_names::SETTINGS).exists() {
            return Err(MapsError::NotPinned(pins.path().to_owned()));
        }
        Ok(Self {
            settings: open(pins, map_names::SETTINGS)?,
            pods_v4: open(pins, map_names::POD_CIDRS_V4)?,
            pods_v6: open(pins, map_names::POD_CIDRS_V6)?,
            exempt_v4: open(pins, map_names::EXEMPT_V4)?,
            exempt_v6: open(pins, map_names::EXEMPT_V6)?,
            pod_ifaces: open(pins, map_names::POD_IFACES)?,
            flows: open(pins, map_names::FLOWS)?,
            counters: open(pins, map_names::COUNTERS)?,
            clock: open(pins, map_names::CLOCK).ok(),
            dir: pins.maps(),
        })
    }

    /// Waits for, and takes, the lock every read-modify-write of the maps holds
    /// (see [`MapsLock`]). Not reentrant: take it once, around the whole change.
    pub fn lock(&self) -> Result<MapsLock, MapsError> {
        let lock_error = |source| MapsError::Lock {
            path: self.dir.clone(),
            source,
        };
        let dir = std::fs::File::open(&self.dir).map_err(lock_error)?;
        let held = nix::fcntl::Flock::lock(dir, nix::fcntl::FlockArg::LockExclusive)
            .map_err(|(_, errno)| lock_error(errno.into()))?;
        Ok(MapsLock { _held: held })
    }

    /// How the datapath tells time; all zero until measured.
    pub fn clock(&self) -> Result<JiffiesClock, MapsError> {
        match &self.clock {
            Some(map) => map.get(&0, 0).map_err(MapsError::map(map_names::CLOCK)),
            None => Ok(JiffiesClock::default()),
        }
    }

    /// Sets how the datapath tells time.
    pub fn set_clock(&mut self, clock: JiffiesClock) -> Result<(), MapsError> {
        let map = self
            .clock
            .as_mut()
            .ok_or(MapsError::Missing(map_names::CLOCK))?;
        map.set(0, clock, 0)
            .map_err(MapsError::map(map_names::CLOCK))
    }

    pub fn settings(&self) -> Result<Settings, MapsError> {
        self.settings
            .get(&0, 0)
            .map_err(MapsError::map(map_names::SETTINGS))
    }

    /// Reads, changes and writes back the settings; callers hold [`Maps::lock`].
    pub fn update_settings(
        &mut self,
        change: impl FnOnce(&mut Settings),
    ) -> Result<Settings, MapsError> {
        let mut settings = self.settings()?;
        change(&mut settings);
        self.settings
            .set(0, settings, 0)
            .map_err(MapsError::map(map_names::SETTINGS))?;
        Ok(settings)
    }

    pub fn set_enabled(&mut self, enabled: bool) -> Result<Settings, MapsError> {
        self.update_settings(|s| s.enabled = u8::from(enabled))
    }

    pub fn set_gateway(&mut self, family: Family, gateway: Gateway) -> Result<Settings, MapsError> {
        self.update_settings(|s| match family {
            Family::V4 => s.gateway_v4 = gateway,
            Family::V6 => s.gateway_v6 = gateway,
        })
    }

    /// Adds a Pod CIDR the operator gave (idempotent; one the daemon had learned becomes
    /// the operator's and stays), and marks the node addresses among `node_addrs` that
    /// it covers (the daemon's reconcile marks the node's addresses anew; see
    /// [`Maps::set_node_addrs`]).
    pub fn add_pod_cidr(&mut self, net: &IpNet, node_addrs: &[IpAddr]) -> Result<(), MapsError> {
        let net = net.trunc();
        let flags = exact_flags(&self.pod_trie_entries(family_of(&net)), &net);
        if flags & POD_CIDR_ENTRY != 0 {
            return if flags & LEARNED_POD_CIDR_ENTRY != 0 {
                self.set_pod_trie_entry(&net, flags & !LEARNED_POD_CIDR_ENTRY)
            } else {
                Ok(())
            };
        }
        self.insert_pod_cidr(&net, flags | POD_CIDR_ENTRY, node_addrs)
    }

    /// Adds a Pod CIDR the daemon learned from the node; one already there (learned or
    /// given) stays as it is.
    pub fn add_learned_pod_cidr(
        &mut self,
        net: &IpNet,
        node_addrs: &[IpAddr],
    ) -> Result<(), MapsError> {
        let net = net.trunc();
        let flags = exact_flags(&self.pod_trie_entries(family_of(&net)), &net);
        if flags & POD_CIDR_ENTRY != 0 {
            return Ok(());
        }
        self.insert_pod_cidr(
            &net,
            flags | POD_CIDR_ENTRY | LEARNED_POD_CIDR_ENTRY,
            node_addrs,
        )
    }

    /// Writes a new Pod CIDR entry with `flags`, within the per-family limit, and marks
    /// the node addresses it covers.
    fn insert_pod_cidr(
        &mut self,
        net: &IpNet,
        flags: u8,
        node_addrs: &[IpAddr],
    ) -> Result<(), MapsError> {
        let family = family_of(net);
        // The trie also holds node addresses, so its capacity does not bound this.
        if self.pod_cidr_entries(family).count() >= visibility_common::MAX_POD_CIDRS as usize {
            return Err(MapsError::Full {
                map: pod_trie_name(family),
                max: visibility_common::MAX_POD_CIDRS,
            });
        }
        self.set_pod_trie_entry(net, flags)?;
        let mut marked = self.node_entries(family);
        marked.extend(node_addrs.iter().filter(|addr| net.contains(*addr)));
        self.sync_node_entries(family, &marked)
    }

    /// Removes a Pod CIDR; false when it was not there.
    pub fn remove_pod_cidr(&mut self, net: &IpNet) -> Result<bool, MapsError> {
        let net = net.trunc();
        let family = family_of(&net);
        let flags = exact_flags(&self.pod_trie_entries(family), &net);
        if flags & POD_CIDR_ENTRY == 0 {
            return Ok(false);
        }
        let marked = self.node_entries(family);
        self.set_pod_trie_entry(&net, flags & !(POD_CIDR_ENTRY | LEARNED_POD_CIDR_ENTRY))?;
        self.sync_node_entries(family, &marked)?;
        Ok(true)
    }

    pub fn pod_cidrs(&self) -> Vec<IpNet> {
        let mut nets: Vec<IpNet> = self
            .pod_cidrs_learned()
            .into_iter()
            .map(|(net, _)| net)
            .collect();
        nets.sort();
        nets
    }

    /// The Pod CIDRs, each with whether the daemon learned it (rather than was told).
    pub fn pod_cidrs_learned(&self) -> Vec<(IpNet, bool)> {
        let mut nets: Vec<(IpNet, bool)> = [Family::V4, Family::V6]
            .into_iter()
            .flat_map(|family| self.pod_cidr_entries(family))
            .map(|(net, flags)| (net, flags & LEARNED_POD_CIDR_ENTRY != 0))
            .collect();
        nets.sort();
        nets
    }

    /// The family's trie entries that are Pod CIDRs, with their flags.
    fn pod_cidr_entries(&self, family: Family) -> impl Iterator<Item = (IpNet, u8)> {
        self.pod_trie_entries(family)
            .into_iter()
            .filter(|(_, flags)| flags & POD_CIDR_ENTRY != 0)
    }

    /// Every entry of the family's Pod-CIDR trie with its flags: the Pod CIDRs and
    /// the node addresses they cover.
    fn pod_trie_entries(&self, family: Family) -> Vec<(IpNet, u8)> {
        match family {
            Family::V4 => trie_entries(&self.pods_v4, family),
            Family::V6 => trie_entries(&self.pods_v6, family),
        }
    }

    /// Sets the flags of one trie entry; no flags removes it.
    fn set_pod_trie_entry(&mut self, net: &IpNet, flags: u8) -> Result<(), MapsError> {
        let map = pod_trie_name(family_of(net));
        let key = PrefixKey::from(net);
        if flags == 0 {
            let result = match key {
                PrefixKey::V4(key) => self.pods_v4.remove(&key),
                PrefixKey::V6(key) => self.pods_v6.remove(&key),
            };
            return absent_is_false(result, map).map(|_| ());
        }
        let result = match key {
            PrefixKey::V4(key) => self.pods_v4.insert(&key, flags, 0),
            PrefixKey::V6(key) => self.pods_v6.insert(&key, flags, 0),
        };
        result.map_err(|e| full_or(e, map, visibility_common::POD_TRIE_CAPACITY))
    }

    /// The node addresses the family's trie marks now.
    fn node_entries(&self, family: Family) -> Vec<IpAddr> {
        self.pod_trie_entries(family)
            .into_iter()
            .filter(|(_, flags)| flags & NODE_ADDR_ENTRY != 0)
            .map(|(net, _)| net.addr())
            .collect()
    }

    /// Makes the node's addresses `node_addrs`: the Pod-CIDR tries mark those inside a
    /// Pod CIDR, and no other. The daemon keeps the list; the datapath needs only
    /// the marks.
    pub fn set_node_addrs(&mut self, node_addrs: &[IpAddr]) -> Result<(), MapsError> {
        // Both families, even when one fails (its trie is full).
        let v4 = self.sync_node_entries(Family::V4, node_addrs);
        let v6 = self.sync_node_entries(Family::V6, node_addrs);
        v4.and(v6)
    }

    /// Makes the trie's node-address entries the addresses of `node_addrs` of the
    /// family that are inside a Pod CIDR, after either list changed.
    fn sync_node_entries(
        &mut self,
        family: Family,
        node_addrs: &[IpAddr],
    ) -> Result<(), MapsError> {
        let entries = self.pod_trie_entries(family);
        let cidrs: Vec<IpNet> = entries
            .iter()
            .filter(|(_, flags)| flags & POD_CIDR_ENTRY != 0)
            .map(|(net, _)| *net)
            .collect();
        let wanted: Vec<IpNet> = node_addrs
            .iter()
            .copied()
            .filter(|addr| family_of_addr(addr) == family)
            .filter(|addr| cidrs.iter().any(|cidr| cidr.contains(addr)))
            .map(IpNet::from)
            .collect();
        for (net, flags) in &entries {
            if flags & NODE_ADDR_ENTRY != 0 && !wanted.contains(net) {
                self.set_pod_trie_entry(net, flags & !NODE_ADDR_ENTRY)?;
            }
        }
        for net in &wanted {
            let flags = exact_flags(&entries, net);
            if flags & NODE_ADDR_ENTRY == 0 {
                self.set_pod_trie_entry(net, flags | NODE_ADDR_ENTRY)?;
            }
        }
        Ok(())
    }

    /// The exemptions as the operator gave them (inherited copies left out).
    pub fn exemptions(&self) -> Vec<Exemption> {
        let mut found = Vec::new();
        let v4 = trie_entries(&self.exempt_v4, Family::V4);
        let v6 = trie_entries(&self.exempt_v6, Family::V6);
        for (cidr, rules) in v4.into_iter().chain(v6) {
            let len = (rules.len as usize).min(MAX_EXEMPT_RULES);
            for rule in rules.rules[..len].iter().filter(|r| r.inherited == 0) {
                found.push(Exemption {
                    cidr,
                    protocol: rule.protocol,
                    port: rule.port,
                });
            }
        }
        found.sort();
        found.dedup();
        found
    }

    /// Replaces every exemption with `wanted`. The LPM trie returns only the longest
    /// matching prefix, so each prefix also carries the rules of the prefixes that
    /// cover it, marked as inherited.
    pub fn set_exemptions(&mut self, wanted: &[Exemption]) -> Result<(), MapsError> {
        let mut by_prefix: BTreeMap<IpNet, Vec<ExemptRule>> = BTreeMap::new();
        for exemption in wanted {
            by_prefix.entry(exemption.cidr.trunc()).or_default();
        }
        let prefixes: Vec<IpNet> = by_prefix.keys().copied().collect();
        for exemption in wanted {
            let cidr = exemption.cidr.trunc();
            for prefix in &prefixes {
                if cidr.contains(prefix) {
                    let rules = by_prefix.get_mut(prefix).expect("prefix listed");
                    let rule = ExemptRule {
                        protocol: exemption.protocol,
                        inherited: u8::from(cidr != *prefix),
                        port: exemption.port,
                    };
                    if !rules.contains(&rule) {
                        rules.push(rule);
                    }
                }
            }
        }
        let mut values = Vec::new();
        for (prefix, mut rules) in by_prefix {
            if rules.len() > MAX_EXEMPT_RULES {
                return Err(MapsError::TooManyExemptRules {
                    prefix: prefix.to_string(),
                    max: MAX_EXEMPT_RULES,
                });
            }
            rules.sort();
            let mut value = ExemptRules {
                len: u32::try_from(rules.len()).expect("at most 8"),
                ..Default::default()
            };
            value.rules[..rules.len()].copy_from_slice(&rules);
            values.push((prefix, value));
        }
        // Write the new entries first, then remove stale ones, so no packet sees an
        // exemption missing that stays.
        for (prefix, value) in &values {
            let (result, map) = match PrefixKey::from(prefix) {
                PrefixKey::V4(key) => (self.exempt_v4.insert(&key, value, 0), map_names::EXEMPT_V4),
                PrefixKey::V6(key) => (self.exempt_v6.insert(&key, value, 0), map_names::EXEMPT_V6),
            };
            result.map_err(|e| full_or(e, map, visibility_common::MAX_EXEMPT_PREFIXES))?;
        }
        // Announce exemptions before removing stale ones, and stop announcing them only
        // once none is left, so the datapath never skips a lookup it needs.
        if !values.is_empty() {
            self.update_settings(|s| s.has_exemptions = 1)?;
        }
        let keep: Vec<IpNet> = values.iter().map(|(p, _)| *p).collect();
        remove_stale(&mut self.exempt_v4, Family::V4, &keep);
        remove_stale(&mut self.exempt_v6, Family::V6, &keep);
        if values.is_empty() {
            self.update_settings(|s| s.has_exemptions = 0)?;
        }
        Ok(())
    }

    /// Registers a Pod interface; `route_ifindex` is where the node routes the Pod's
    /// addresses (the interface, or its bridge).
    pub fn add_pod_iface(
        &mut self,
        ifindex: u32,
        is_veth: bool,
        route_ifindex: u32,
    ) -> Result<(), MapsError> {
        let value = PodIface {
            is_veth: u8::from(is_veth),
            _pad: [0; 3],
            route_ifindex,
        };
        self.pod_ifaces
            .insert(ifindex, value, 0)
            .map_err(|e| full_or(e, map_names::POD_IFACES, visibility_common::MAX_POD_IFACES))
    }

    pub fn remove_pod_iface(&mut self, ifindex: u32) -> Result<bool, MapsError> {
        absent_is_false(self.pod_ifaces.remove(&ifindex), map_names::POD_IFACES)
    }

    pub fn pod_ifaces(&self) -> Vec<u32> {
        let mut found: Vec<u32> = self.pod_ifaces.keys().filter_map(Result::ok).collect();
        found.sort_unstable();
        found
    }

    /// Every counter of every hook, summed over CPUs.
    pub fn counters(&self) -> Result<Vec<(Hook, Counter, CounterValue)>, MapsError> {
        let mut out = Vec::new();
        for hook in Hook::ALL {
            for counter in Counter::ALL {
                let per_cpu = self
                    .counters
                    .get(&slot(*hook, *counter), 0)
                    .map_err(MapsError::map(map_names::COUNTERS))?;
                out.push((*hook, *counter, per_cpu.iter().sum()));
            }
        }
        Ok(out)
    }

    /// The flow map, for reading.
    pub fn flows(&self) -> &HashMap<MapData, FlowKey, FlowStats> {
        &self.flows
    }

    /// Capacity of the flow map.
    pub fn flow_capacity(&self) -> u32 {
        use aya::maps::IterableMap as _;
        self.flows.map().info().map_or(0, |info| info.max_entries())
    }
}

/// Every entry of one of the LPM tries, as prefixes with their values.
fn trie_entries<K, V>(trie: &LpmTrie<MapData, K, V>, family: Family) -> Vec<(IpNet, V)>
where
    K: aya::Pod + AsRef<[u8]>,
    V: aya::Pod,
{
    trie.iter()
        .filter_map(Result::ok)
        .filter_map(|(key, value)| {
            Some((
                net_from_key(family, key.prefix_len(), key.data().as_ref())?,
                value,
            ))
        })
        .collect()
}

/// Removes the entries of one of the LPM tries whose prefix is not in `keep`.
fn remove_stale<K, V>(trie: &mut LpmTrie<MapData, K, V>, family: Family, keep: &[IpNet])
where
    K: aya::Pod + AsRef<[u8]>,
    V: aya::Pod,
{
    let stale: Vec<_> = trie
        .keys()
        .filter_map(Result::ok)
        .filter(|key| {
            net_from_key(family, key.prefix_len(), key.data().as_ref())
                .is_none_or(|net| !keep.contains(&net))
        })
        .collect();
    for key in stale {
        let _ = trie.remove(&key);
    }
}

fn full_or(error: aya::maps::MapError, map: &'static str, max: u32) -> MapsError {
    match &error {
        aya::maps::MapError::SyscallError(e)
            if e.io_error.raw_os_error() == Some(libc::E2BIG)
                || e.io_error.raw_os_error() == Some(libc::ENOSPC) =>
        {
            MapsError::Full { map, max }
        }
        _ => MapsError::map(map)(error),
    }
}

fn absent_is_false(
    result: Result<(), aya::maps::MapError>,
    map: &'static str,
) -> Result<bool, MapsError> {
    match result {
        Ok(()) => Ok(true),
        Err(aya::maps::MapError::KeyNotFound) => Ok(false),
        Err(aya::maps::MapError::SyscallError(e))
            if e.io_error.raw_os_error() == Some(libc::ENOENT) =>
        {
            Ok(false)
        }
        Err(e) => Err(MapsError::map(map)(e)),
    }
}
