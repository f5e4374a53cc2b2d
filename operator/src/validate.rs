//! Turns a `ReplicatedTable` into the protocol's validated table, plus the checks that only
//! make sense on Kubernetes. Every message names the field and the fix.

use kube::ResourceExt;
use rtable_protocol::manifest::{
    API_VERSION, KIND, ManifestError, ObjectMeta, ReplicatedTableManifest, ValidatedTable,
};

use crate::build::SIDECAR_CONTAINER;
use crate::crd::{RESERVED_POD_ANNOTATIONS, RESERVED_POD_LABELS, ReplicatedTable};

#[derive(Debug, thiserror::Error)]
pub enum InvalidSpec {
    #[error("{0}")]
    Manifest(#[from] ManifestError),
    #[error("spec.userContainer.name `{0}` is taken by the rtable sidecar: choose another name")]
    UserContainerName(String),
    #[error("the ReplicatedTable has no namespace; it is a namespaced resource")]
    NoNamespace,
    #[error(
        "spec.pod.labels sets `{0}`, which the operator sets to select the table's pods: remove it or use another key"
    )]
    ReservedPodLabel(String),
    #[error(
        "spec.pod.annotations sets `{0}`, which the operator sets on every pod: remove it or use another key"
    )]
    ReservedPodAnnotation(String),
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
    if let Some(pod) = &rt.spec.pod {
        // The CRD refuses these labels too; a table stored before that rule still gets here.
        if let Some(key) = RESERVED_POD_LABELS
            .iter()
            .find(|k| pod.labels.contains_key(**k))
        {
            return Err(InvalidSpec::ReservedPodLabel(key.to_string()));
        }
        if let Some(key) = RESERVED_POD_ANNOTATIONS
            .iter()
            .find(|k| pod.annotations.contains_key(**k))
        {
            return Err(InvalidSpec::ReservedPodAnnotation(key.to_string()));
        }
    }
    Ok(manifest(rt)?.validate()?)
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::build::fixtures;

    #[test]
    fn the_example_table_is_a_valid_resource() {
        let path = concat!(env!("CARGO_MANIFEST_DIR"), "/../examples/events.yaml");
        let text = std::fs::read_to_string(path).expect("examples/events.yaml exists");
        let rt: ReplicatedTable = serde_yaml::from_str(&text).expect("parses as a ReplicatedTable");
        let table = validate(&rt).expect("valid");
        assert_eq!(table.table_path, "/clickhouse/tables/01/default.events");
    }

    #[test]
    fn invalid_specs_name_the_field() {
        let mut rt = fixtures::table("table.yaml");
        rt.spec.order_by = vec!["missing".into()];
        assert!(
            validate(&rt)
                .expect_err("unknown column")
                .to_string()
                .contains("`missing`")
        );
        let mut rt = fixtures::table("table-full.yaml");
        if let Some(uc) = rt.spec.user_container.as_mut() {
            uc.name = SIDECAR_CONTAINER.into();
        }
        assert!(
            validate(&rt)
                .expect_err("name clash")
                .to_string()
                .contains("spec.userContainer.name")
        );
    }

    #[test]
    fn pod_labels_and_annotations_may_not_take_the_operators_keys() {
        let rt = fixtures::table("table-full.yaml");
        assert!(
            validate(&rt).is_ok(),
            "the full fixture's spec.pod is valid"
        );
        for key in RESERVED_POD_LABELS {
            let mut rt = rt.clone();
            if let Some(pod) = rt.spec.pod.as_mut() {
                pod.labels.insert(key.to_string(), "x".into());
            }
            let message = validate(&rt).expect_err(key).to_string();
            assert!(
                message.contains("spec.pod.labels") && message.contains(key),
                "{message}"
            );
        }
        for key in RESERVED_POD_ANNOTATIONS {
            let mut rt = rt.clone();
            if let Some(pod) = rt.spec.pod.as_mut() {
                pod.annotations.insert(key.to_string(), "x".into());
            }
            let message = validate(&rt).expect_err(key).to_string();
            assert!(
                message.contains("spec.pod.annotations") && message.contains(key),
                "{message}"
            );
        }
    }
}
