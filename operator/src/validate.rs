//! Turns a `ReplicatedTable` into the protocol's validated table, plus the checks that only
//! make sense on Kubernetes. Every message names the field and the fix.

use kube::ResourceExt;
use rtable_protocol::manifest::{
    API_VERSION, KIND, ManifestError, ObjectMeta, ReplicatedTableManifest, ValidatedTable,
};

use crate::build::SIDECAR_CONTAINER;
use crate::crd::ReplicatedTable;

#[derive(Debug, thiserror::Error)]
pub enum InvalidSpec {
    #[error("{0}")]
    Manifest(#[from] ManifestError),
    #[error("spec.userContainer.name `{0}` is taken by the rtable sidecar: choose another name")]
    UserContainerName(String),
    #[error("the ReplicatedTable has no namespace; it is a namespaced resource")]
    NoNamespace,
}

/// The manifest the sidecar reads: the protocol's subset of the spec.
pub fn manifest(rt: &ReplicatedTable) -> Result<ReplicatedTableManifest, InvalidSpec> {
    let namespace = rt.namespace().ok_or(InvalidSpec::NoNamespace)?;
    Ok(ReplicatedTableManifest {
        api_version: API_VERSION.to_string(),
        kind: KIND.to_string(),
        metadata: ObjectMeta {
            name: rt.name_any(),
            namespace: Some(namespace),
        },
        spec: rt.spec.table_spec(),
    })
}

/// Validates the whole resource; the result carries the schema and the resolved table path.
pub fn validate(rt: &ReplicatedTable) -> Result<ValidatedTable, InvalidSpec> {
    if let Some(uc) = &rt.spec.user_container
        && uc.name == SIDECAR_CONTAINER
    {
        return Err(InvalidSpec::UserContainerName(uc.name.clone()));
    }
    Ok(manifest(rt)?.validate()?)
}
