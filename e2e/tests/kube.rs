//! The operator's user journey on a real control plane: kube-apiserver, etcd,
//! kube-controller-manager and kube-scheduler built from their Go module sources
//! (`scripts/kube-binaries.sh`). One control plane serves every scenario of this file, each
//! in a namespace of its own.

use rtable_e2e::kube::{Cli, ControlPlaneOptions, Shared};
use tokio::sync::OnceCell;

struct Plane {
    shared: &'static Shared,
    kubectl: Cli,
}

static CRD: OnceCell<()> = OnceCell::const_new();

/// The shared control plane with the chart's CRD installed and established.
async fn plane() -> Plane {
    let shared = tokio::task::spawn_blocking(|| Shared::get(ControlPlaneOptions::default()))
        .await
        .expect("the control plane starts");
    let kubectl = shared.kubectl();
    CRD.get_or_init(|| async {
        let crd = rtable_e2e::repo_root().join("charts/rtable-operator/crds/replicatedtable.yaml");
        let crd = crd.display().to_string();
        kubectl
            .run(&["apply", "--server-side", "-f", &crd], None)
            .await
            .and_then(|o| o.ok("kubectl apply of the CRD"))
            .unwrap_or_else(|e| panic!("{e:#}"));
        kubectl
            .run(
                &[
                    "wait",
                    "--for=condition=Established",
                    "--timeout=60s",
                    "crd/replicatedtables.rtable.io",
                ],
                None,
            )
            .await
            .and_then(|o| o.ok("kubectl wait for the CRD"))
            .unwrap_or_else(|e| panic!("{e:#}"));
    })
    .await;
    Plane { shared, kubectl }
}

/// A fresh namespace for one scenario.
async fn namespace(p: &Plane, name: &str) -> String {
    p.kubectl
        .run(&["create", "namespace", name], None)
        .await
        .and_then(|o| o.ok("kubectl create namespace"))
        .unwrap_or_else(|e| panic!("{e:#}"));
    name.to_string()
}

/// examples/events.yaml in namespace `ns`, with `edit` applied to its YAML.
fn events_manifest(ns: &str, edit: impl FnOnce(&mut serde_yaml::Value)) -> String {
    let text =
        std::fs::read_to_string(rtable_e2e::example_manifest()).expect("examples/events.yaml");
    let mut doc: serde_yaml::Value = serde_yaml::from_str(&text).expect("the example parses");
    doc["metadata"]["namespace"] = ns.into();
    edit(&mut doc);
    serde_yaml::to_string(&doc).expect("yaml")
}

async fn apply(p: &Plane, manifest: &str) -> rtable_e2e::kube::kubectl::Output {
    p.kubectl
        .run(&["apply", "-f", "-"], Some(manifest))
        .await
        .unwrap_or_else(|e| panic!("{e:#}"))
}

fn columns(doc: &mut serde_yaml::Value) -> &mut Vec<serde_yaml::Value> {
    doc["spec"]["columns"]
        .as_sequence_mut()
        .expect("spec.columns is a list")
}

#[tokio::test]
async fn the_api_server_refuses_invalid_tables_with_the_crds_messages() {
    let p = plane().await;
    let _scenario = p.shared.scenario();
    let ns = namespace(&p, "validation").await;

    // At creation.
    type Edit = fn(&mut serde_yaml::Value);
    let refused_at_create: [(&str, Edit, &str); 5] = [
        (
            "quorum above replicas",
            |d| d["spec"]["insertQuorum"] = 4.into(),
            "spec.insertQuorum must be at most spec.replicas",
        ),
        (
            "a bad partitionBy",
            |d| d["spec"]["partitionBy"] = "toDate(ts)".into(),
            "spec.partitionBy must be empty, a column name, toYYYYMM(column) or toYYYYMMDD(column)",
        ),
        (
            "a bad column type",
            |d| columns(d)[2]["type"] = "Nullable(String".into(),
            "spec.columns[2].type",
        ),
        (
            "a bad storage size",
            |d| d["spec"]["storage"] = serde_yaml::from_str("{size: 10 gigs}").expect("yaml"),
            "spec.storage.size must be a Kubernetes quantity such as 10Gi",
        ),
        (
            "a quorum that is neither a number nor auto",
            |d| d["spec"]["insertQuorum"] = "most".into(),
            "spec.insertQuorum must be a positive number of replicas or `auto`",
        ),
    ];
    for (case, edit, message) in refused_at_create {
        let out = apply(&p, &events_manifest(&ns, edit)).await;
        assert!(
            !out.success,
            "{case}: the API server accepted it:\n{}",
            out.stdout
        );
        assert!(
            out.stderr.contains(message),
            "{case}: expected `{message}` in:\n{}",
            out.stderr
        );
    }

    // The valid table is accepted, then edits of it that the CRD forbids are refused.
    apply(&p, &events_manifest(&ns, |_| {}))
        .await
        .ok("applying examples/events.yaml")
        .unwrap_or_else(|e| panic!("{e:#}"));
    let refused_on_update: [(&str, Edit, &str); 4] = [
        (
            "a reordered column",
            |d| columns(d).swap(0, 1),
            "spec.columns may only be appended to",
        ),
        (
            "a removed column",
            |d| {
                columns(d).pop();
            },
            "spec.columns may only be appended to",
        ),
        (
            "a tablePath set later",
            |d| d["spec"]["tablePath"] = "/clickhouse/tables/other".into(),
            "spec.tablePath is immutable",
        ),
        (
            "a changed shard",
            |d| d["spec"]["shard"] = "02".into(),
            "spec.shard is immutable",
        ),
    ];
    for (case, edit, message) in refused_on_update {
        let out = apply(&p, &events_manifest(&ns, edit)).await;
        assert!(
            !out.success,
            "{case}: the API server accepted it:\n{}",
            out.stdout
        );
        assert!(
            out.stderr.contains(message),
            "{case}: expected `{message}` in:\n{}",
            out.stderr
        );
    }
    // What the API server stores for shapes the CRD allows, the operator's type reads: a
    // quorum written as a string, a null size (defaulted, not kept as null).
    let loose = events_manifest(&ns, |d| {
        d["metadata"]["name"] = "loose".into();
        d["spec"]["insertQuorum"] = "2".into();
        d["spec"]["storage"] = serde_yaml::from_str("{size: null}").expect("yaml");
    });
    apply(&p, &loose)
        .await
        .ok("applying a quorum written as a string and a null size")
        .unwrap_or_else(|e| panic!("{e:#}"));
    let stored = p
        .kubectl
        .run(&["get", "rt/loose", "-n", &ns, "-o", "json"], None)
        .await
        .and_then(|o| o.ok("kubectl get rt/loose"))
        .unwrap_or_else(|e| panic!("{e:#}"));
    let table: rtable_operator::crd::ReplicatedTable = serde_json::from_str(&stored.stdout)
        .unwrap_or_else(|e| {
            panic!(
                "the operator cannot read what the API server stored: {e}\n{}",
                stored.stdout
            )
        });
    assert_eq!(
        table.spec.insert_quorum,
        rtable_protocol::manifest::InsertQuorum::Replicas(2)
    );
    assert_eq!(table.spec.storage.size.0, "10Gi");

    // An appended column is an allowed edit.
    let appended = events_manifest(&ns, |d| {
        columns(d).push(serde_yaml::from_str("{name: country, type: String}").expect("yaml"))
    });
    apply(&p, &appended)
        .await
        .ok("appending a column")
        .unwrap_or_else(|e| panic!("{e:#}"));
}
