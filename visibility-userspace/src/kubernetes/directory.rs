//! Which Pod had an address when: the cache that names a flow's ends, keyed by Pod IP
//! AND time, so that a reused address names the Pod that had it when the flow ran
//! (as Antrea's Pod store does). Times are the datapath's clock (`CLOCK_MONOTONIC`
//! nanoseconds), the clock flow statistics carry.

use std::{collections::BTreeMap, net::IpAddr};

use serde::{Deserialize, Serialize};

/// A Pod's workload: the owner a person scales (a Deployment, not its ReplicaSet).
#[derive(Clone, Debug, PartialEq, Eq, PartialOrd, Ord, Hash, Serialize, Deserialize)]
pub struct Workload {
    /// `Deployment`, `StatefulSet`, `DaemonSet`, `Job`, `CronJob`, `ReplicaSet`, ...
    pub kind: String,
    pub name: String,
}

/// What names one end of a flow.
#[derive(Clone, Debug, PartialEq, Eq, PartialOrd, Ord, Hash, Serialize, Deserialize)]
pub struct PodIdentity {
    pub namespace: String,
    pub name: String,
    pub workload: Option<Workload>,
}

/// One Pod's hold on one address: from when it got it until it gave it up (was
/// deleted, or the address went to another Pod), `None` while it still has it.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
struct Tenure {
    uid: String,
    pod: PodIdentity,
    from_ns: u64,
    until_ns: Option<u64>,
}

/// The Pods of this node by address, with their history (see [`PodDirectory::lookup`]).
#[derive(Clone, Debug, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct PodDirectory {
    /// Each address's tenures, oldest first.
    by_ip: BTreeMap<IpAddr, Vec<Tenure>>,
    /// Bumped by every change, so that a snapshot is written only when one happened.
    #[serde(skip)]
    version: u64,
}

/// What the API says about one Pod, as [`PodDirectory::apply`] takes it.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct PodSighting {
    pub uid: String,
    pub pod: PodIdentity,
    /// Its addresses now (`status.podIPs`); none before it has any.
    pub ips: Vec<IpAddr>,
    /// When it was created, on the datapath's clock: it cannot have had an address
    /// before, and its watch event may come later than its first packet.
    pub created_ns: u64,
}

impl PodDirectory {
    pub fn version(&self) -> u64 {
        self.version
    }

    /// Pods that hold an address now.
    pub fn current_pods(&self) -> usize {
        let mut uids: Vec<&str> = self
            .by_ip
            .values()
            .flatten()
            .filter(|t| t.until_ns.is_none())
            .map(|t| t.uid.as_str())
            .collect();
        uids.sort_unstable();
        uids.dedup();
        uids.len()
    }

    /// Every Pod the directory still names (current, or gone within the grace period).
    pub fn known(&self) -> impl Iterator<Item = &PodIdentity> {
        self.by_ip.values().flatten().map(|t| &t.pod)
    }

    /// A Pod was added or changed at `now_ns`: it holds its addresses from now (or
    /// from its creation, but never before the address's previous holder let go), and
    /// gives up those it no longer has.
    pub fn apply(&mut self, sighting: &PodSighting, now_ns: u64) {
        for (ip, tenures) in &mut self.by_ip {
            if sighting.ips.contains(ip) {
                continue;
            }
            for tenure in tenures.iter_mut().filter(|t| t.uid == sighting.uid) {
                tenure.until_ns.get_or_insert(now_ns);
            }
        }
        for ip in &sighting.ips {
            let tenures = self.by_ip.entry(*ip).or_default();
            if let Some(own) = tenures
                .iter_mut()
                .find(|t| t.uid == sighting.uid && t.until_ns.is_none())
            {
                // The same Pod: its workload may have resolved since.
                own.pod.clone_from(&sighting.pod);
                continue;
            }
            let mut from_ns = sighting.created_ns.min(now_ns);
            for earlier in tenures.iter_mut() {
                // A previous holder still open missed its deletion (the watch was
                // down): it lost the address when this Pod took it.
                let until = *earlier.until_ns.get_or_insert(now_ns);
                from_ns = from_ns.max(until.min(now_ns)).max(earlier.from_ns);
            }
            tenures.push(Tenure {
                uid: sighting.uid.clone(),
                pod: sighting.pod.clone(),
                from_ns,
                until_ns: None,
            });
        }
        self.version += 1;
    }

    /// A Pod was deleted at `now_ns`.
    pub fn delete(&mut self, uid: &str, now_ns: u64) {
        self.end_where(|t| t.uid == uid, now_ns);
    }

    /// A new list (after the watch restarted) holds only `listed`: the other Pods were
    /// deleted while the watch was down, by `now_ns` at the latest.
    pub fn keep_only(&mut self, listed: &[String], now_ns: u64) {
        self.end_where(|t| !listed.contains(&t.uid), now_ns);
    }

    fn end_where(&mut self, ends: impl Fn(&Tenure) -> bool, now_ns: u64) {
        for tenure in self.by_ip.values_mut().flatten() {
            if tenure.until_ns.is_none() && ends(tenure) {
                tenure.until_ns = Some(now_ns);
            }
        }
        self.version += 1;
    }

    /// Forgets the tenures that ended more than `grace_ns` before `now_ns`: the records
    /// of the flows they had have been written by then.
    pub fn forget_older_than(&mut self, grace_ns: u64, now_ns: u64) {
        let before = self.by_ip.values().map(Vec::len).sum::<usize>();
        for tenures in self.by_ip.values_mut() {
            tenures.retain(|t| {
                t.until_ns
                    .is_none_or(|u| u.saturating_add(grace_ns) >= now_ns)
            });
        }
        self.by_ip.retain(|_, tenures| !tenures.is_empty());
        if self.by_ip.values().map(Vec::len).sum::<usize>() != before {
            self.version += 1;
        }
    }

    /// The Pod that had `ip` at `at_ns`: the one whose tenure covers that time (the
    /// latest to start, should two), else the next to take the address (a Pod's
    /// first packets can come before the API tells of it). An address after its last
    /// holder let go, and one never seen, name no Pod.
    pub fn lookup(&self, ip: IpAddr, at_ns: u64) -> Option<&PodIdentity> {
        let tenures = self.by_ip.get(&ip)?;
        tenures
            .iter()
            .filter(|t| t.from_ns <= at_ns && t.until_ns.is_none_or(|u| at_ns <= u))
            .max_by_key(|t| t.from_ns)
            .or_else(|| {
                tenures
                    .iter()
                    .filter(|t| t.from_ns > at_ns)
                    .min_by_key(|t| t.from_ns)
            })
            .map(|t| &t.pod)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn pod(name: &str) -> PodIdentity {
        PodIdentity {
            namespace: "default".into(),
            name: name.into(),
            workload: None,
        }
    }

    fn sighting(uid: &str, ips: &[&str], created_ns: u64) -> PodSighting {
        PodSighting {
            uid: uid.into(),
            pod: pod(uid),
            ips: ips.iter().map(|ip| ip.parse().unwrap()).collect(),
            created_ns,
        }
    }

    fn name_at(directory: &PodDirectory, ip: &str, at_ns: u64) -> Option<String> {
        directory
            .lookup(ip.parse().unwrap(), at_ns)
            .map(|p| p.name.clone())
    }

    #[test]
    fn a_reused_address_names_the_pod_that_had_it_then() {
        let mut directory = PodDirectory::default();
        directory.apply(&sighting("a", &["10.52.0.2", "fd00::2"], 90), 100);
        directory.delete("a", 200);
        // b was created before a went, but got the address only after.
        directory.apply(&sighting("b", &["10.52.0.2"], 150), 300);
        for (at, expected) in [(95, "a"), (150, "a"), (199, "a"), (250, "b"), (400, "b")] {
            assert_eq!(
                name_at(&directory, "10.52.0.2", at).as_deref(),
                Some(expected),
                "at {at}"
            );
        }
        assert_eq!(name_at(&directory, "fd00::2", 150).as_deref(), Some("a"));
        assert_eq!(name_at(&directory, "fd00::2", 250), None, "a had gone");
        assert_eq!(name_at(&directory, "10.52.0.9", 150), None);
        assert_eq!(directory.current_pods(), 1);
    }

    #[test]
    fn a_pod_missed_while_the_watch_was_down_ends_at_the_relist() {
        let mut directory = PodDirectory::default();
        directory.apply(&sighting("a", &["10.52.0.2"], 0), 10);
        directory.apply(&sighting("c", &["10.52.0.3"], 0), 10);
        // The list after the outage: a is gone, and b has its address.
        directory.apply(&sighting("b", &["10.52.0.2"], 50), 100);
        directory.keep_only(&["b".into(), "c".into()], 100);
        assert_eq!(name_at(&directory, "10.52.0.2", 40).as_deref(), Some("a"));
        assert_eq!(name_at(&directory, "10.52.0.2", 100).as_deref(), Some("b"));
        assert_eq!(name_at(&directory, "10.52.0.3", 100).as_deref(), Some("c"));
        directory.keep_only(&["b".into()], 120);
        assert_eq!(name_at(&directory, "10.52.0.3", 130), None);
    }

    #[test]
    fn ended_tenures_are_forgotten_after_the_grace_period() {
        let mut directory = PodDirectory::default();
        directory.apply(&sighting("a", &["10.52.0.2"], 0), 10);
        directory.delete("a", 20);
        directory.forget_older_than(100, 110);
        assert_eq!(name_at(&directory, "10.52.0.2", 15).as_deref(), Some("a"));
        directory.forget_older_than(100, 121);
        assert_eq!(name_at(&directory, "10.52.0.2", 15), None);
        assert_eq!(directory.known().count(), 0);
    }

    #[test]
    fn a_pod_that_changes_address_gives_up_the_old_one() {
        let mut directory = PodDirectory::default();
        directory.apply(&sighting("a", &["10.52.0.2"], 0), 10);
        directory.apply(&sighting("a", &["10.52.0.4"], 0), 50);
        assert_eq!(name_at(&directory, "10.52.0.2", 60), None);
        assert_eq!(name_at(&directory, "10.52.0.4", 60).as_deref(), Some("a"));
    }
}
