//! Apply: server-side apply of the objects `build` made, with the operator's field manager.
//!
//! One object the API server refuses (an edited immutable StatefulSet field, an invalid
//! value) must not keep the others from being applied, nor the status from saying why:
//! `apply_all` applies each and returns the refusals as text for the status.

use k8s_openapi::api::apps::v1::StatefulSet;
use k8s_openapi::api::core::v1::{ConfigMap, Secret, Service};
use k8s_openapi::api::policy::v1::PodDisruptionBudget;
use kube::api::{Patch, PatchParams, PostParams};
use kube::{Api, Client, Resource};
use serde::de::DeserializeOwned;

use crate::error::{Error, kube_err};

pub const FIELD_MANAGER: &str = "rtable-operator";

/// The objects of one table, built.
pub struct Objects {
    /// Created only when missing: its value must survive every later reconcile.
    pub secret: Secret,
    pub config_map: ConfigMap,
    pub services: Vec<Service>,
    pub stateful_set: StatefulSet,
    pub pdb: PodDisruptionBudget,
}

/// What applying them gave: the StatefulSet as the API server has it (the applied one, or
/// the current one when the apply was refused), and every refusal.
pub struct Applied {
    pub stateful_set: Option<StatefulSet>,
    pub refused: Vec<String>,
}

pub async fn apply_all(client: &Client, ns: &str, objects: &Objects) -> Applied {
    let mut refused = Vec::new();
    let mut note = |kind: &str, obj_name: Option<&String>, e: Error| {
        tracing::warn!(kind, name = ?obj_name, error = %e, "the API server refused an object");
        refused.push(format!(
            "{kind} {}: {e}",
            obj_name.map_or("", |n| n.as_str())
        ));
    };
    if let Err(e) = ensure_secret(client, ns, &objects.secret).await {
        note("Secret", objects.secret.metadata.name.as_ref(), e);
    }
    if let Err(e) = ssa(client, ns, &objects.config_map).await {
        note("ConfigMap", objects.config_map.metadata.name.as_ref(), e);
    }
    for service in &objects.services {
        if let Err(e) = ssa(client, ns, service).await {
            note("Service", service.metadata.name.as_ref(), e);
        }
    }
    let sts_name = objects
        .stateful_set
        .metadata
        .name
        .clone()
        .unwrap_or_default();
    let stateful_set = match ssa(client, ns, &objects.stateful_set).await {
        Ok(s) => Some(s),
        Err(e) => {
            note("StatefulSet", Some(&sts_name), e);
            // The pods still run the last applied spec: report them.
            let api: Api<StatefulSet> = Api::namespaced(client.clone(), ns);
            match api.get_opt(&sts_name).await {
                Ok(current) => current,
                Err(e) => {
                    note(
                        "StatefulSet",
                        Some(&sts_name),
                        kube_err(format!("get statefulset {sts_name} after a refused apply"))(e),
                    );
                    None
                }
            }
        }
    };
    if let Err(e) = ssa(client, ns, &objects.pdb).await {
        note("PodDisruptionBudget", objects.pdb.metadata.name.as_ref(), e);
    }
    Applied {
        stateful_set,
        refused,
    }
}

async fn ensure_secret(client: &Client, ns: &str, secret: &Secret) -> Result<(), Error> {
    let secrets: Api<Secret> = Api::namespaced(client.clone(), ns);
    let name = secret.metadata.name.clone().unwrap_or_default();
    if secrets
        .get_opt(&name)
        .await
        .map_err(kube_err(format!("get secret {name}")))?
        .is_none()
    {
        secrets
            .create(&PostParams::default(), secret)
            .await
            .map_err(kube_err(format!("create secret {name}")))?;
    }
    Ok(())
}

/// Server-side apply as the operator's field manager, taking over conflicting fields.
pub fn apply_params() -> PatchParams {
    PatchParams::apply(FIELD_MANAGER).force()
}

/// Server-side applies one namespaced object and returns it as the API server has it.
pub async fn ssa<K>(client: &Client, ns: &str, obj: &K) -> Result<K, Error>
where
    K: Resource<Scope = k8s_openapi::NamespaceResourceScope>
        + Clone
        + DeserializeOwned
        + serde::Serialize
        + std::fmt::Debug,
    K::DynamicType: Default,
{
    let api: Api<K> = Api::namespaced(client.clone(), ns);
    let name = obj.meta().name.clone().unwrap_or_default();
    api.patch(&name, &apply_params(), &Patch::Apply(obj))
        .await
        .map_err(kube_err(format!(
            "apply {} {name}",
            K::kind(&K::DynamicType::default())
        )))
}
