//! Pod interfaces made and deleted in bursts, as on a busy node, and what the daemon must
//! have cleaned up after them: for the churn benchmark and its netns test.
//!
//! Each Pod of a burst is made as the ptp CNI makes one (and as the lab does): a veth
//! whose Pod side, `eth0`, goes into a Pod namespace of its own, and whose node side has
//! the Pod gateway address and a host route to the Pod's address in [`CHURN_CIDR`]. The
//! Pod namespaces are made once, one per Pod of a burst, and hold the next burst's Pods
//! after the last ones' are deleted. A burst is made, and deleted, with one `ip -batch`.

use std::{collections::BTreeSet, net::Ipv4Addr, time::Duration};

use anyhow::{Context as _, Result, ensure};
use visibility::{
    datapath::{PinDir, attachments},
    maps::Maps,
};

use crate::{
    lab::{Lab, Netns, POD_CIDR_V4, POD_CIDR_V6, POD_GATEWAY_V4, POD_IFNAME},
    node::{Node, poll},
};

/// The Pod CIDR the churned Pods' addresses come from (the daemon must be given it).
pub const CHURN_CIDR: &str = "10.54.0.0/16";
/// How many addresses of each /24 of [`CHURN_CIDR`] are used (.2 to .201).
const PODS_PER_24: usize = 200;

/// The daemon's flags under churn: the lab's Pod CIDRs and [`CHURN_CIDR`], and the slow
/// reconcile held off, so that every attachment and every clean-up comes from netlink
/// events.
pub fn daemon_args() -> Vec<String> {
    [
        "--pod-cidr",
        POD_CIDR_V4,
        "--pod-cidr",
        POD_CIDR_V6,
        "--pod-cidr",
        CHURN_CIDR,
        "--reconcile-interval",
        "3600",
    ]
    .iter()
    .map(|s| s.to_string())
    .collect()
}

/// One churned Pod, as the node sees it.
#[derive(Debug, Clone)]
pub struct ChurnPod {
    /// The node side of its veth.
    pub name: String,
    pub addr: Ipv4Addr,
    pub ifindex: u32,
}

/// Makes and deletes bursts of Pods on a lab's node; dropping it removes its Pod
/// namespaces (and with them any Pod still there).
pub struct Churn {
    node: Netns,
    holders: Vec<Netns>,
    /// Pods made so far: names and addresses are never reused.
    made: usize,
}

impl Churn {
    /// Makes the Pod namespaces for bursts of `burst` Pods.
    pub fn new(lab: &Lab, burst: usize) -> Result<Self> {
        let mut churn = Self {
            node: lab.node().clone(),
            holders: Vec::with_capacity(burst),
            made: 0,
        };
        for slot in 0..burst {
            // Pushed as soon as made, so that a failure removes what exists.
            churn
                .holders
                .push(Netns::create(format!("{}-c{slot}", lab.prefix()))?);
        }
        Ok(churn)
    }

    /// Makes one burst of Pods and returns them.
    pub fn add_burst(&mut self) -> Result<Vec<ChurnPod>> {
        let first = self.made;
        ensure!(
            first + self.holders.len() <= 250 * PODS_PER_24,
            "too many Pods for {CHURN_CIDR}"
        );
        let mut node_lines = Vec::with_capacity(self.holders.len() * 4);
        let mut pods = Vec::with_capacity(self.holders.len());
        for (slot, holder) in self.holders.iter().enumerate() {
            let index = first + slot;
            let name = format!("ch{index}");
            let addr = Ipv4Addr::new(
                10,
                54,
                (index / PODS_PER_24) as u8,
                (index % PODS_PER_24 + 2) as u8,
            );
            node_lines.push(format!(
                "link add {name} type veth peer name {POD_IFNAME} netns {}",
                holder.name()
            ));
            node_lines.push(format!("link set {name} up"));
            node_lines.push(format!("addr add {POD_GATEWAY_V4}/32 dev {name}"));
            node_lines.push(format!("route add {addr}/32 dev {name} scope host"));
            pods.push(ChurnPod {
                name,
                addr,
                ifindex: 0,
            });
        }
        self.made += self.holders.len();
        self.node.ip_batch(&node_lines)?;
        for holder in &self.holders {
            holder.ip_batch(&[format!("link set {POD_IFNAME} up")])?;
        }
        let names: Vec<String> = pods.iter().map(|p| p.name.clone()).collect();
        let indexes = self.node.try_in_ns(move || {
            names
                .iter()
                .map(|name| {
                    nix::net::if_::if_nametoindex(name.as_str())
                        .with_context(|| format!("no interface {name}"))
                })
                .collect::<Result<Vec<u32>>>()
        })?;
        for (pod, ifindex) in pods.iter_mut().zip(indexes) {
            pod.ifindex = ifindex;
        }
        Ok(pods)
    }

    /// Deletes `pods`' veths (both sides, and with them their addresses and routes).
    pub fn remove(&self, pods: &[ChurnPod]) -> Result<()> {
        let lines: Vec<String> = pods
            .iter()
            .map(|p| format!("link del {}", p.name))
            .collect();
        self.node.ip_batch(&lines)
    }
}

impl Drop for Churn {
    fn drop(&mut self) {
        for holder in &self.holders {
            let _ = holder.delete();
        }
    }
}

/// What the daemon left behind on `node`, whose only Pods are the lab's: link pins of
/// gone interfaces or of interfaces that are no Pod's nor the uplink's, TCX attachments on
/// such interfaces, Pod-interface map entries of anything but the lab's Pods, and Pods the
/// status still lists. Empty when it cleaned up after the churn.
pub fn leftovers(node: &Node) -> Result<Vec<String>> {
    let lab = &node.lab;
    let pods: BTreeSet<u32> = lab.pods().map(|p| p.host_ifindex()).collect();
    let mut owned = pods.clone();
    owned.insert(lab.node_uplink_ifindex()?);
    let live: BTreeSet<u32> = lab.node().try_in_ns(|| {
        Ok(nix::net::if_::if_nameindex()
            .context("listing interfaces")?
            .iter()
            .map(|i| i.index())
            .collect())
    })?;
    let pins = PinDir::new(&node.pin_dir);
    let mut found = Vec::new();
    for (ifindex, kind) in attachments(&pins) {
        if !owned.contains(&ifindex) {
            let what = if live.contains(&ifindex) {
                "an interface that is no Pod's"
            } else {
                "a gone interface"
            };
            found.push(format!("link pin if{ifindex}_{} of {what}", kind.name()));
        }
    }
    let owned_names: BTreeSet<String> = lab
        .pods()
        .map(|p| p.host_ifname().to_owned())
        .chain([crate::lab::NODE_UPLINK.to_owned()])
        .collect();
    for attachment in node.tcx_attachments()? {
        if !owned_names.contains(&attachment.interface) {
            found.push(format!(
                "TCX {} program {} on {}",
                attachment.direction, attachment.program_name, attachment.interface
            ));
        }
    }
    let maps = Maps::open(&pins).context("opening the pinned maps")?;
    for ifindex in maps.pod_ifaces() {
        if !pods.contains(&ifindex) {
            found.push(format!("Pod-interface map entry for ifindex {ifindex}"));
        }
    }
    let status = node.status()?;
    for pod in status["daemon"]["pod_interfaces"]
        .as_array()
        .context("no pod_interfaces in the status")?
    {
        if !pod["ifindex"]
            .as_u64()
            .is_some_and(|i| pods.contains(&(i as u32)))
        {
            found.push(format!("status lists Pod interface {pod}"));
        }
    }
    Ok(found)
}

/// Waits until the daemon has cleaned up after every churned Pod ([`leftovers`] is
/// empty), or fails with what it left.
pub fn wait_until_cleaned_up(node: &Node, timeout: Duration) -> Result<()> {
    poll(
        timeout,
        "the daemon to clean up after the churned Pods",
        || {
            let left = leftovers(node)?;
            ensure!(left.is_empty(), "left behind: {}", left.join("; "));
            Ok(Some(()))
        },
    )
}
