//! The operator applies its own CRD at start: Helm installs `crds/` on the first install
//! only and never upgrades it, so without this a `helm upgrade` would leave the old schema.

use k8s_openapi::apiextensions_apiserver::pkg::apis::apiextensions::v1::CustomResourceDefinition;
use kube::api::{Patch, PatchParams};
use kube::{Api, Client, CustomResourceExt};

use crate::crd::ReplicatedTable;
use crate::reconcile::FIELD_MANAGER;

#[derive(Debug, thiserror::Error)]
#[error("apply CRD {name}: {source}")]
pub struct CrdApplyError {
    pub name: String,
    #[source]
    pub source: kube::Error,
}

/// Server-side applies the CRD this binary was built with (forced: the operator owns its
/// schema, whoever wrote it before). Returns the CRD's name.
pub async fn apply_crd(client: &Client) -> Result<String, CrdApplyError> {
    let crds: Api<CustomResourceDefinition> = Api::all(client.clone());
    let crd = ReplicatedTable::crd();
    let name = crd.metadata.name.clone().unwrap_or_default();
    crds.patch(
        &name,
        &PatchParams::apply(FIELD_MANAGER).force(),
        &Patch::Apply(&crd),
    )
    .await
    .map_err(|source| CrdApplyError {
        name: name.clone(),
        source,
    })?;
    Ok(name)
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::mock::{self, exactly, ssa_step, to_json};

    const PATH: &str =
        "/apis/apiextensions.k8s.io/v1/customresourcedefinitions/replicatedtables.rtable.io";

    #[tokio::test]
    async fn applies_the_generated_crd_with_server_side_apply() {
        let (client, verifier) = mock::server(vec![
            ssa_step(PATH).check(exactly(to_json(&ReplicatedTable::crd()))),
        ]);
        let name = apply_crd(&client).await.expect("applied");
        assert_eq!(name, "replicatedtables.rtable.io");
        drop(client);
        mock::finish(verifier).await;
    }

    #[tokio::test]
    async fn a_refused_apply_is_an_error_naming_the_crd() {
        let (client, verifier) = mock::server(vec![ssa_step(PATH).respond(|_| {
            (
                403,
                serde_json::json!({"kind": "Status", "apiVersion": "v1", "status": "Failure", "reason": "Forbidden", "code": 403, "message": "forbidden"}),
            )
        })]);
        let err = apply_crd(&client).await.expect_err("forbidden");
        assert!(
            err.to_string()
                .starts_with("apply CRD replicatedtables.rtable.io:"),
            "{err}"
        );
        drop(client);
        mock::finish(verifier).await;
    }
}
