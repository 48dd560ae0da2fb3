//! A Pod's workload from its owner references: its controller, except that a
//! controller another controller makes names that one instead: a ReplicaSet a
//! Deployment owns names the Deployment, a Job a CronJob owns names the CronJob. Each
//! such ReplicaSet or Job is read once (its metadata only), which needs `get` on
//! replicasets and jobs.

use std::{collections::HashMap, fmt::Debug};

use k8s_openapi::{
    NamespaceResourceScope,
    api::{apps::v1::ReplicaSet, batch::v1::Job, core::v1::Pod},
    apimachinery::pkg::apis::meta::v1::{ObjectMeta, OwnerReference},
};
use kube::{Api, Client, Resource};
use serde::de::DeserializeOwned;
use tracing::debug;

use super::directory::Workload;

/// The owners of ReplicaSets and Jobs already read, by kind, namespace and name.
pub struct Owners {
    client: Client,
    resolved: HashMap<(Made, String, String), Workload>,
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

/// A kind of controller that another controller makes, so that the maker, when there
/// is one, names the workload.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
enum Made {
    /// A Deployment's (`apps/v1`).
    ReplicaSet,
    /// A CronJob's (`batch/v1`).
    Job,
}

impl Made {
    fn of(kind: &str) -> Option<Self> {
        match kind {
            "ReplicaSet" => Some(Self::ReplicaSet),
            "Job" => Some(Self::Job),
            _ => None,
        }
    }

    /// The kind of controller that makes this one.
    fn maker(self) -> &'static str {
        match self {
            Self::ReplicaSet => "Deployment",
            Self::Job => "CronJob",
        }
    }

    /// The controller of the object of this kind named `name` in `namespace`, from its
    /// metadata.
    async fn controller(
        self,
        client: &Client,
        namespace: &str,
        name: &str,
    ) -> kube::Result<Option<OwnerReference>> {
        match self {
            Self::ReplicaSet => controller_of::<ReplicaSet>(client, namespace, name).await,
            Self::Job => controller_of::<Job>(client, namespace, name).await,
        }
    }
}

/// The controller of the `K` named `name` in `namespace`, from its metadata.
async fn controller_of<K>(
    client: &Client,
    namespace: &str,
    name: &str,
) -> kube::Result<Option<OwnerReference>>
where
    K: Resource<DynamicType = (), Scope = NamespaceResourceScope>
        + Clone
        + Debug
        + DeserializeOwned,
{
    let api: Api<K> = Api::namespaced(client.clone(), namespace);
    let object = api.get_metadata(name).await?;
    Ok(controller(&object.metadata).cloned())
}

impl Owners {
    pub fn new(client: Client) -> Self {
        Self {
            client,
            resolved: HashMap::new(),
        }
    }

    /// The Pod's workload; a bare Pod has none. A ReplicaSet or Job that cannot be read
    /// (yet) names itself, and is read again at the Pod's next event.
    pub async fn workload_of(&mut self, pod: &Pod) -> Option<Workload> {
        let owner = controller(&pod.metadata)?;
        let Some(made) = Made::of(&owner.kind) else {
            return Some(workload(owner));
        };
        let namespace = pod.metadata.namespace.clone().unwrap_or_default();
        let key = (made, namespace, owner.name.clone());
        if let Some(known) = self.resolved.get(&key) {
            return Some(known.clone());
        }
        match made.controller(&self.client, &key.1, &owner.name).await {
            Ok(its_controller) => {
                let resolved = its_controller
                    .filter(|o| o.kind == made.maker())
                    .map_or_else(|| workload(owner), |o| workload(&o));
                self.resolved.insert(key, resolved.clone());
                Some(resolved)
            }
            Err(error) => {
                debug!(%error, kind = ?made, name = %owner.name, "reading a Pod's controller");
                Some(workload(owner))
            }
        }
    }

    /// Forgets the ReplicaSets and Jobs read, at each new list of the Pods: the cache
    /// then follows the Pods (a Deployment's rollouts leave old ReplicaSets behind, and a
    /// CronJob makes a Job a run).
    pub fn forget(&mut self) {
        self.resolved.clear();
    }
}
