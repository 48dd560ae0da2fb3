//! What the fuzz harness reads and writes in the lab's kernel: the exempt ranges it
//! configures, the node's facts and configuration maps read back from the pinned maps,
//! the programs' maps that are not pinned, and the gateway's route cache it keeps fresh.

use std::collections::HashMap as StdHashMap;

use anyhow::{Context as _, Result, bail};
use aya::{
    Pod,
    maps::{HashMap, LpmTrie, Map, MapData, PerCpuArray, PerCpuValues},
};
use visibility::{datapath::ProgramKind, maps::Exemption};
use visibility_common::{
    config::{ExemptRules, PodIface},
    map_names,
    packet::Family,
};

use super::{
    facts::{NodeFacts, PodFacts, Prefix},
    frames,
};
use crate::{
    datapath_harness::DatapathLab,
    lab::{pod_ipv4, pod_ipv6},
};

/// Exempt ranges of the lab: a Pod's DNS port and a free address of the Pod CIDR.
pub(super) fn exemptions() -> Result<Vec<Exemption>> {
    Ok(vec![
        Exemption {
            cidr: "10.52.0.4/32".parse()?,
            protocol: 17,
            port: 53,
        },
        Exemption {
            cidr: "fd00:52::4/128".parse()?,
            protocol: 17,
            port: 53,
        },
        Exemption {
            cidr: "10.52.0.77/32".parse()?,
            protocol: 0,
            port: 0,
        },
    ])
}

pub(super) fn open_pinned(lab: &DatapathLab, name: &str) -> Result<Map> {
    let path = lab.datapath().pins().map(name);
    let data = MapData::from_pin(&path).with_context(|| format!("opening {}", path.display()))?;
    Ok(Map::from_map_data(data)?)
}

pub(super) fn trie_prefixes<K: Pod + AsRef<[u8]>, V: Pod>(
    trie: &LpmTrie<MapData, K, V>,
    family: Family,
) -> Result<Vec<Prefix<V>>> {
    let mut out = Vec::new();
    for entry in trie.iter() {
        let (key, value) = entry?;
        let mut addr = [0u8; 16];
        let data = key.data();
        let bytes = data.as_ref();
        addr[..bytes.len()].copy_from_slice(bytes);
        out.push(Prefix {
            family,
            addr,
            len: key.prefix_len(),
            value,
        });
    }
    Ok(out)
}

/// The exempt tries' prefixes, as the kernel has them.
pub(super) fn exempt_prefixes(lab: &DatapathLab) -> Result<Vec<Prefix<ExemptRules>>> {
    let exempt_v4: LpmTrie<MapData, [u8; 4], ExemptRules> =
        LpmTrie::try_from(open_pinned(lab, map_names::EXEMPT_V4)?)?;
    let exempt_v6: LpmTrie<MapData, [u8; 16], ExemptRules> =
        LpmTrie::try_from(open_pinned(lab, map_names::EXEMPT_V6)?)?;
    let mut exempt = trie_prefixes(&exempt_v4, Family::V4)?;
    exempt.extend(trie_prefixes(&exempt_v6, Family::V6)?);
    Ok(exempt)
}

/// The lab node's facts and a copy of its configuration maps, read back from the kernel.
pub(super) fn node_facts(lab: &DatapathLab) -> Result<NodeFacts> {
    let mut pods = Vec::new();
    for pod in 0..frames::PODS {
        pods.push(PodFacts {
            veth: lab.host_veth(pod),
            veth_mac: lab.host_veth_mac(pod)?,
            mac: lab.pod_mac(pod)?,
            v4: addr16(pod_ipv4(pod).into()),
            v6: addr16(pod_ipv6(pod).into()),
        });
    }
    let mtu_text = lab
        .lab()
        .node()
        .run("cat", ["/sys/class/net/eth0/mtu"])
        .or_else(|_| {
            lab.lab()
                .node()
                .run("ip", ["-o", "link", "show", "dev", "eth0"])
        })?;
    let uplink_mtu = mtu_text
        .split_whitespace()
        .skip_while(|w| mtu_text.contains("mtu") && *w != "mtu")
        .find_map(|w| w.parse().ok())
        .context("the uplink's MTU")?;
    let pods_v4: LpmTrie<MapData, [u8; 4], u8> =
        LpmTrie::try_from(open_pinned(lab, map_names::POD_CIDRS_V4)?)?;
    let pods_v6: LpmTrie<MapData, [u8; 16], u8> =
        LpmTrie::try_from(open_pinned(lab, map_names::POD_CIDRS_V6)?)?;
    let ifaces: HashMap<MapData, u32, PodIface> =
        HashMap::try_from(open_pinned(lab, map_names::POD_IFACES)?)?;
    let mut pod_trie = trie_prefixes(&pods_v4, Family::V4)?;
    pod_trie.extend(trie_prefixes(&pods_v6, Family::V6)?);
    let exempt = exempt_prefixes(lab)?;
    let pod_ifaces = ifaces.iter().collect::<Result<StdHashMap<_, _>, _>>()?;
    Ok(NodeFacts {
        pods,
        uplink: lab.uplink(),
        uplink_mac: lab.uplink_mac(),
        gateway_mac: lab.gateway_mac(),
        uplink_mtu,
        settings: lab.maps.settings()?,
        pod_trie,
        exempt,
        pod_ifaces,
    })
}

pub(super) fn addr16(addr: std::net::IpAddr) -> [u8; 16] {
    visibility::net::addr_bytes(&addr)
}

/// One of the maps `pod_egress` uses that are not pinned (the fragments, the gateway's
/// route cache), found among the program's maps by name.
pub(super) fn program_map(lab: &DatapathLab, name: &str) -> Result<Map> {
    let program = lab.datapath().program(ProgramKind::PodEgress);
    let ids = program
        .info()?
        .map_ids()?
        .context("the kernel does not list a program's maps")?;
    for id in ids {
        let data = MapData::from_id(id)?;
        if data.info()?.name_as_str() == Some(name) {
            return Ok(Map::from_map_data(data)?);
        }
    }
    bail!("pod_egress uses no map {name}")
}

/// `visibility-ebpf`'s `GatewayRoute` (`repr(C)`): when the FIB answered, the gateway
/// it answered for, the MACs toward it and the uplink's MTU.
pub(super) const GATEWAY_ROUTE_LEN: usize = 64;

/// The datapath's per-CPU cache of the gateway's route (`VIS_GW_ROUTES`), kept fresh
/// with the lab's true answer before every `pod_egress` step. Otherwise whether a
/// packet asks the FIB depends on how long ago (100 ms) another did, and the answer on
/// the packet's source: a lab made deterministic, where the model knows the answer.
/// The FIB lookup for the gateway is left to the kernel tests.
pub(super) struct GatewayCache {
    map: PerCpuArray<MapData, [u8; GATEWAY_ROUTE_LEN]>,
    values: [[u8; GATEWAY_ROUTE_LEN]; 2],
    cpus: usize,
}

impl GatewayCache {
    pub(super) fn new(lab: &DatapathLab, node: &NodeFacts) -> Result<Self> {
        let map = PerCpuArray::try_from(program_map(lab, "VIS_GW_ROUTES")?)
            .context("VIS_GW_ROUTES is no longer a per-CPU array of 64-byte values")?;
        let mut values = [[0u8; GATEWAY_ROUTE_LEN]; 2];
        for (value, family) in values.iter_mut().zip([Family::V4, Family::V6]) {
            let gateway = node.settings.gateway(family);
            value[8..12].copy_from_slice(&gateway.ifindex.to_ne_bytes());
            value[12..28].copy_from_slice(&gateway.addr);
            value[28..44].copy_from_slice(&gateway.node_addr);
            value[44..50].copy_from_slice(&node.gateway_mac);
            value[50..56].copy_from_slice(&node.uplink_mac);
            value[56..60].copy_from_slice(&node.uplink_mtu.to_ne_bytes());
        }
        let cpus = aya::util::nr_cpus().map_err(|(what, e)| anyhow::anyhow!("{what}: {e}"))?;
        Ok(Self { map, values, cpus })
    }

    pub(super) fn refresh(&mut self) -> Result<()> {
        // Answered a little while ago rather than now: the datapath's clock (the coarse
        // clock, or jiffies mapped onto it) may lag this one by a tick or more, and an
        // answer from its future is stale.
        let now = coarse_now_ns().saturating_sub(GATEWAY_CACHE_AGE_NS);
        for (slot, value) in self.values.iter().enumerate() {
            let mut value = *value;
            value[..8].copy_from_slice(&now.to_ne_bytes());
            self.map.set(
                slot as u32,
                PerCpuValues::try_from(vec![value; self.cpus])?,
                0,
            )?;
        }
        Ok(())
    }
}

/// How old the gateway's route is made to look: well within the datapath's 100 ms.
pub(super) const GATEWAY_CACHE_AGE_NS: u64 = 30_000_000;

/// `bpf_ktime_get_coarse_ns`'s clock.
pub(super) fn coarse_now_ns() -> u64 {
    let mut ts = libc::timespec {
        tv_sec: 0,
        tv_nsec: 0,
    };
    // SAFETY: a valid timespec to write.
    unsafe { libc::clock_gettime(libc::CLOCK_MONOTONIC_COARSE, &mut ts) };
    ts.tv_sec as u64 * 1_000_000_000 + ts.tv_nsec as u64
}
