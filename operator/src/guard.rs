//! The controller's entry points, guarded against tables the operator cannot read.
//!
//! The watch deserializes every `ReplicatedTable` of the cluster. An object stored before
//! the CRD was tightened (or written by a newer operator) may not fit this operator's
//! types; read as a plain `ReplicatedTable`, one such object fails the list and stops the
//! reconcile of every table. Read through `DeserializeGuard`, it is reported on itself (a
//! Warning Event naming the error and the fix, a failure metric, a log line) and every
//! other table goes on being reconciled.

use std::sync::Arc;

use k8s_openapi::api::core::v1::ObjectReference;
use kube::Resource as _;
use kube::core::DeserializeGuard;
use kube::core::error_boundary::InvalidObject;
use kube::runtime::controller::Action;
use kube::runtime::events::EventType;

use crate::crd::ReplicatedTable;
use crate::events;
use crate::reconcile::{Context, Error, error_policy, reconcile};

pub type GuardedTable = DeserializeGuard<ReplicatedTable>;

/// `reconcile` for a table that could be read; a report for one that could not.
pub async fn reconcile_guarded(obj: Arc<GuardedTable>, ctx: Arc<Context>) -> Result<Action, Error> {
    match &obj.0 {
        Ok(rt) => reconcile(Arc::new(rt.clone()), ctx).await,
        Err(invalid) => {
            report(invalid, &ctx).await;
            // Nothing can be done until the object changes; an edit triggers a reconcile.
            Ok(Action::await_change())
        }
    }
}

pub fn error_policy_guarded(obj: Arc<GuardedTable>, error: &Error, ctx: Arc<Context>) -> Action {
    match &obj.0 {
        Ok(rt) => error_policy(Arc::new(rt.clone()), error, ctx),
        // `reconcile_guarded` never fails for an unreadable object.
        Err(_) => Action::await_change(),
    }
}

/// The Event's note: what failed, and how to fix it.
pub fn note(invalid: &InvalidObject) -> String {
    let name = invalid.metadata.name.as_deref().unwrap_or_default();
    let ns = invalid.metadata.namespace.as_deref().unwrap_or("default");
    format!(
        "the operator cannot read this ReplicatedTable ({}); it was probably stored before the CRD was tightened. \
         Fix the field named there with `kubectl edit rt/{name} -n {ns}` (the API server checks the edit against today's CRD); \
         other tables are not affected",
        invalid.error
    )
}

async fn report(invalid: &InvalidObject, ctx: &Context) {
    let name = invalid.metadata.name.clone().unwrap_or_default();
    let namespace = invalid.metadata.namespace.clone();
    tracing::warn!(table = %name, namespace = ?namespace, error = %invalid.error, "cannot read a ReplicatedTable");
    ctx.metrics.failed("invalid_object");
    let reference = ObjectReference {
        api_version: Some(ReplicatedTable::api_version(&()).into_owned()),
        kind: Some(ReplicatedTable::kind(&()).into_owned()),
        name: Some(name.clone()),
        namespace,
        uid: invalid.metadata.uid.clone(),
        resource_version: invalid.metadata.resource_version.clone(),
        ..ObjectReference::default()
    };
    events::publish(
        &ctx.client,
        &ctx.reporter,
        &reference,
        EventType::Warning,
        "InvalidSpec",
        note(invalid),
    )
    .await;
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn an_unreadable_table_is_caught_not_fatal_and_its_note_names_the_fix() {
        let json = serde_json::json!({
            "apiVersion": "rtable.io/v1alpha1", "kind": "ReplicatedTable",
            "metadata": {"name": "legacy", "namespace": "old", "uid": "u-1"},
            "spec": {"zookeeper": {"nodes": ["zk:2181"]}, "columns": [{"name": "ts", "type": "DateTime"}],
                     "partitionBy": "toDate(ts)"}
        });
        let guard: GuardedTable = serde_json::from_value(json).expect("the guard always parses");
        let invalid = guard
            .0
            .expect_err("toDate is not a partition key the operator reads");
        assert_eq!(invalid.metadata.name.as_deref(), Some("legacy"));
        let note = note(&invalid);
        assert!(note.contains("toDate(ts)"), "{note}");
        assert!(note.contains("kubectl edit rt/legacy -n old"), "{note}");
    }
}
