//! A Pod's workload from its owner references: its controller, except that a
//! ReplicaSet a Deployment owns resolves to that Deployment (read once per ReplicaSet,
//! which needs `get` on replicasets).

use std::collections::HashMap;

use k8s_openapi::{
    api::{apps::v1::ReplicaSet, core::v1::Pod},
    apimachinery::pkg::apis::meta::v1::{ObjectMeta, OwnerReference},
};
use kube::{Api, Client};
use tracing::debug;

use super::directory::Workload;

/// The owners of ReplicaSets already read, by namespace and name.
pub struct Owners {
    client: Client,
    replica_sets: HashMap<(String, String), Workload>,
}

fn controller(meta: &ObjectMeta) -> Option<&OwnerReference> {
    meta.owner_references
        .iter()
        .flatten()
        .find(|owner| owner.controller == Some(true))
}

fn workload(owner: &OwnerReference) -> Workload {
    Workload {
        kind: owner.kind.clone(),
        name: owner.name.clone(),
    }
}

impl Owners {
    pub fn new(client: Client) -> Self {
        Self {
            client,
            replica_sets: HashMap::new(),
        }
    }

    /// The Pod's workload; a bare Pod has none. A ReplicaSet that cannot be read (yet)
    /// names itself, and is read again at the Pod's next event.
    pub async fn workload_of(&mut self, pod: &Pod) -> Option<Workload> {
        let owner = controller(&pod.metadata)?;
        if owner.kind != "ReplicaSet" {
            return Some(workload(owner));
        }
        let namespace = pod.metadata.namespace.clone().unwrap_or_default();
        let key = (namespace, owner.name.clone());
        if let Some(known) = self.replica_sets.get(&key) {
            return Some(known.clone());
        }
        let api: Api<ReplicaSet> = Api::namespaced(self.client.clone(), &key.0);
        match api.get(&owner.name).await {
            Ok(replica_set) => {
                let resolved = controller(&replica_set.metadata)
                    .filter(|o| o.kind == "Deployment")
                    .map_or_else(|| workload(owner), workload);
                self.replica_sets.insert(key, resolved.clone());
                Some(resolved)
            }
            Err(error) => {
                debug!(%error, replica_set = %owner.name, "reading a Pod's ReplicaSet");
                Some(workload(owner))
            }
        }
    }

    /// Forgets the ReplicaSets read, at each new list of the Pods: the cache then
    /// follows the Pods (a Deployment's rollouts leave old ReplicaSets behind).
    pub fn forget(&mut self) {
        self.replica_sets.clear();
    }
}
