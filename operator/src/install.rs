//! The operator applies its own CRD at start: Helm installs `crds/` on the first install
//! only and never upgrades it, so without this a `helm upgrade` would leave the old schema.
//!
//! Never downgraded: an older operator (an old pod restarting during a rolling upgrade, a
//! `helm rollback`) leaves a newer CRD alone, since applying its schema would prune the
//! newer fields from every table as the API server reads them. The CRD carries the version
//! of the operator that applied it.

use k8s_openapi::apiextensions_apiserver::pkg::apis::apiextensions::v1::CustomResourceDefinition;
use kube::api::{Patch, PatchParams};
use kube::{Api, Client, CustomResourceExt};

use crate::crd::ReplicatedTable;
use crate::reconcile::FIELD_MANAGER;

/// The annotation naming the operator version whose schema the CRD holds.
pub const VERSION_ANNOTATION: &str = "rtable.io/operator-version";

#[derive(Debug, thiserror::Error)]
#[error("apply CRD {name}: {source}")]
pub struct CrdApplyError {
    pub name: String,
    #[source]
    pub source: kube::Error,
}

/// What [`apply_crd`] did.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum CrdApplied {
    /// The CRD now holds this binary's schema.
    Applied { name: String },
    /// A newer operator's schema is installed and was kept.
    NewerKept { name: String, installed: String },
}

/// Server-side applies the CRD this binary (version `ours`) was built with, forced: the
/// operator owns its schema, whoever wrote it before; unless the installed CRD was applied
/// by a newer operator.
pub async fn apply_crd(client: &Client, ours: &str) -> Result<CrdApplied, CrdApplyError> {
    let crds: Api<CustomResourceDefinition> = Api::all(client.clone());
    let mut crd = ReplicatedTable::crd();
    let name = crd.metadata.name.clone().unwrap_or_default();
    let failed = |source| CrdApplyError {
        name: name.clone(),
        source,
    };
    let installed = crds
        .get_opt(&name)
        .await
        .map_err(failed)?
        .and_then(|c| c.metadata.annotations?.remove(VERSION_ANNOTATION));
    if let Some(installed) = installed
        && newer(&installed, ours)
    {
        return Ok(CrdApplied::NewerKept { name, installed });
    }
    crd.metadata
        .annotations
        .get_or_insert_default()
        .insert(VERSION_ANNOTATION.to_string(), ours.to_string());
    crds.patch(
        &name,
        &PatchParams::apply(FIELD_MANAGER).force(),
        &Patch::Apply(&crd),
    )
    .await
    .map_err(failed)?;
    Ok(CrdApplied::Applied { name })
}

/// Whether version `a` is above `b`, comparing `major.minor.patch` numerically; a version
/// that does not parse is never newer (the CRD gets this binary's schema).
fn newer(a: &str, b: &str) -> bool {
    fn parse(v: &str) -> Option<(u64, u64, u64)> {
        let core = v.trim_start_matches('v').split(['-', '+']).next()?;
        let mut parts = core.split('.').map(|p| p.parse::<u64>().ok());
        let version = (parts.next()??, parts.next()??, parts.next()??);
        parts.next().is_none().then_some(version)
    }
    matches!((parse(a), parse(b)), (Some(a), Some(b)) if a > b)
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::mock::{self, exactly, ssa_step, step, to_json};

    const PATH: &str =
        "/apis/apiextensions.k8s.io/v1/customresourcedefinitions/replicatedtables.rtable.io";

    fn installed(version: Option<&str>) -> serde_json::Value {
        let mut crd = to_json(&ReplicatedTable::crd());
        if let Some(v) = version {
            crd["metadata"]["annotations"] = serde_json::json!({ VERSION_ANNOTATION: v });
        }
        crd
    }

    fn ours(version: &str) -> serde_json::Value {
        let mut crd = to_json(&ReplicatedTable::crd());
        crd["metadata"]["annotations"] = serde_json::json!({ VERSION_ANNOTATION: version });
        crd
    }

    #[tokio::test]
    async fn applies_the_generated_crd_with_server_side_apply() {
        for before in [
            step("GET", PATH).not_found(),
            step("GET", PATH).respond(|_| (200, installed(None))),
            step("GET", PATH).respond(|_| (200, installed(Some("0.1.0")))),
            step("GET", PATH).respond(|_| (200, installed(Some("0.0.9")))),
            step("GET", PATH).respond(|_| (200, installed(Some("not-a-version")))),
        ] {
            let (client, verifier) =
                mock::server(vec![before, ssa_step(PATH).check(exactly(ours("0.1.0")))]);
            let applied = apply_crd(&client, "0.1.0").await.expect("applied");
            assert_eq!(
                applied,
                CrdApplied::Applied {
                    name: "replicatedtables.rtable.io".into()
                }
            );
            drop(client);
            mock::finish(verifier).await;
        }
    }

    #[tokio::test]
    async fn a_crd_of_a_newer_operator_is_kept() {
        // No PATCH: the mock fails on any request beyond the GET.
        let (client, verifier) = mock::server(vec![
            step("GET", PATH).respond(|_| (200, installed(Some("0.10.0")))),
        ]);
        let applied = apply_crd(&client, "0.9.3").await.expect("kept");
        assert_eq!(
            applied,
            CrdApplied::NewerKept {
                name: "replicatedtables.rtable.io".into(),
                installed: "0.10.0".into()
            }
        );
        drop(client);
        mock::finish(verifier).await;
    }

    #[test]
    fn versions_compare_numerically() {
        assert!(newer("0.10.0", "0.9.3"));
        assert!(newer("1.0.0", "0.99.99"));
        assert!(newer("v0.2.0-rc.1", "0.1.9"));
        assert!(!newer("0.1.0", "0.1.0"));
        assert!(!newer("0.0.9", "0.1.0"));
        assert!(!newer("garbage", "0.1.0"));
        assert!(!newer("0.1", "0.0.1"));
    }

    #[tokio::test]
    async fn a_refused_apply_is_an_error_naming_the_crd() {
        let (client, verifier) = mock::server(vec![
            step("GET", PATH).not_found(),
            ssa_step(PATH).respond(|_| {
            (
                403,
                serde_json::json!({"kind": "Status", "apiVersion": "v1", "status": "Failure", "reason": "Forbidden", "code": 403, "message": "forbidden"}),
            )
        })]);
        let err = apply_crd(&client, "0.1.0").await.expect_err("forbidden");
        assert!(
            err.to_string()
                .starts_with("apply CRD replicatedtables.rtable.io:"),
            "{err}"
        );
        drop(client);
        mock::finish(verifier).await;
    }
}
