//! The operator's user journey on a real control plane: kube-apiserver, etcd,
//! kube-controller-manager and kube-scheduler built from their Go module sources
//! (`scripts/kube-binaries.sh`). One control plane serves every scenario of this file, each
//! in a namespace of its own.

mod kube_common;

use kube_common::*;

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

/// Restarting the operator while a table it cannot read exists (stored under a looser
/// CRD, which was then tightened): every other table is reconciled into its ZooKeeper tree
/// and objects, with conditions for the current generation, and the bad one is reported
/// with a Warning Event naming the fix.
#[tokio::test]
async fn the_operator_reconciles_every_readable_table_and_reports_an_unreadable_one() {
    let p = plane().await;
    let _scenario = p.shared.scenario();
    let legacy = namespace(&p, "legacy").await;
    let ns = namespace(&p, "reconcile").await;
    let zk = local_zookeeper(&p, "reconcile");
    let nodes = vec![serde_yaml::Value::from(zk.connect_string())];

    // A CRD without the partitionBy rule stores a key the operator cannot parse.
    let crd_path = rtable_e2e::repo_root().join("charts/rtable-operator/crds/replicatedtable.yaml");
    let crd_text = std::fs::read_to_string(&crd_path).expect("the chart's CRD");
    let mut loose: serde_yaml::Value = serde_yaml::from_str(&crd_text).expect("CRD YAML");
    loose["spec"]["versions"][0]["schema"]["openAPIV3Schema"]["properties"]["spec"]["properties"]
        ["partitionBy"]
        .as_mapping_mut()
        .expect("partitionBy's schema")
        .remove("x-kubernetes-validations");
    let loose = serde_yaml::to_string(&loose).expect("yaml");
    for (what, crd) in [
        ("the looser CRD", loose.as_str()),
        ("the real CRD", crd_text.as_str()),
    ] {
        p.kubectl
            .run(
                &["apply", "--server-side", "--force-conflicts", "-f", "-"],
                Some(crd),
            )
            .await
            .and_then(|o| o.ok(what))
            .unwrap_or_else(|e| panic!("{e:#}"));
        if what == "the looser CRD" {
            let bad = events_manifest(&legacy, |d| {
                d["spec"]["partitionBy"] = "toDate(ts)".into();
                d["spec"]["zookeeper"]["nodes"] = nodes.clone().into();
            });
            // Rules are cached by the API server for a moment after a CRD update: retry.
            eventually("the looser CRD to accept toDate(ts)", 30, || async {
                apply(&p, &bad).await.success.then_some(())
            })
            .await;
        }
    }

    let (_operator, _port) = start_operator(p.shared, "operator-reconcile");
    let good = events_manifest(&ns, |d| {
        d["spec"]["zookeeper"]["nodes"] = nodes.clone().into();
    });
    apply(&p, &good)
        .await
        .ok("applying the readable table")
        .unwrap_or_else(|e| panic!("{e:#}"));

    // The readable table: objects owned by it, a tree, conditions of this generation.
    let sts = eventually("the StatefulSet of rt/events", 60, || {
        get_json(&p, &ns, "statefulset/events")
    })
    .await;
    assert_eq!(
        sts["metadata"]["ownerReferences"][0]["kind"],
        "ReplicatedTable"
    );
    assert_eq!(sts["spec"]["replicas"], 3);
    for what in [
        "service/events",
        "service/events-replicas",
        "configmap/events-table",
        "secret/events-interserver",
        "poddisruptionbudget/events",
    ] {
        eventually(what, 30, || get_json(&p, &ns, what)).await;
    }
    let rt = eventually("conditions of the current generation", 60, || async {
        let rt = get_json(&p, &ns, "rt/events").await?;
        let generation = rt["metadata"]["generation"].clone();
        let conditions = rt["status"]["conditions"].as_array()?.clone();
        (conditions.len() == 4
            && conditions
                .iter()
                .all(|c| c["observedGeneration"] == generation))
        .then_some(rt)
    })
    .await;
    let table_path = rt["status"]["tablePath"]
        .as_str()
        .expect("status.tablePath")
        .to_string();
    let client = zk_session(&zk).await;
    let metadata = rtable_protocol::TablePaths::new(table_path.clone()).metadata();
    assert!(
        client
            .check_stat(&metadata)
            .await
            .expect("exists")
            .is_some(),
        "the operator created {metadata}"
    );
    let wide = p
        .kubectl
        .run(&["get", "rt", "-n", &ns, "-o", "wide"], None)
        .await
        .and_then(|o| o.ok("kubectl get rt -o wide"))
        .unwrap_or_else(|e| panic!("{e:#}"));
    let header: Vec<&str> = wide
        .stdout
        .lines()
        .next()
        .unwrap_or_default()
        .split_whitespace()
        .collect();
    assert_eq!(
        header,
        [
            "NAME", "REPLICAS", "ACTIVE", "READY", "MAX", "DELAY", "AGE", "QUORUM", "STATUS",
            "PATH"
        ],
        "{}",
        wide.stdout
    );
    let row: Vec<&str> = wide
        .stdout
        .lines()
        .nth(1)
        .unwrap_or_default()
        .split_whitespace()
        .collect();
    assert_eq!((row[0], row[1]), ("events", "3"), "{}", wide.stdout);
    assert_eq!(
        row.last().copied(),
        Some(table_path.as_str()),
        "{}",
        wide.stdout
    );

    // The unreadable table: reported on itself.
    let events = eventually("an InvalidSpec Event on legacy/events", 60, || async {
        let list = get_json(&p, &legacy, "events").await?;
        let found: Vec<serde_json::Value> = list["items"]
            .as_array()?
            .iter()
            .filter(|e| e["reason"] == "InvalidSpec")
            .cloned()
            .collect();
        (!found.is_empty()).then_some(found)
    })
    .await;
    let note = events[0]["note"]
        .as_str()
        .or(events[0]["message"].as_str())
        .unwrap_or_default();
    assert_eq!(events[0]["type"], "Warning");
    assert!(
        note.contains("toDate(ts)") && note.contains("kubectl edit rt/events -n legacy"),
        "{note}"
    );
    drop(zk);
}

/// The sum of the operator's `rtable_operator_reconciles` counter.
async fn reconciles(port: u16) -> f64 {
    let text = reqwest::get(format!("http://127.0.0.1:{port}/metrics"))
        .await
        .expect("the operator's /metrics answers")
        .text()
        .await
        .expect("metrics text");
    text.lines()
        .filter(|l| l.starts_with("rtable_operator_reconciles_total"))
        .filter_map(|l| l.split_whitespace().last()?.parse::<f64>().ok())
        .sum()
}

/// A table whose replicas keep moving (here: a log pointer advancing as fast as ZooKeeper
/// takes writes, as under an insert load) is refreshed once per resync period, not once per
/// status write: the operator's own status writes must not trigger its next reconcile.
#[tokio::test]
async fn status_writes_do_not_retrigger_reconciles() {
    let p = plane().await;
    let _scenario = p.shared.scenario();
    let ns = namespace(&p, "hotloop").await;
    let zk = local_zookeeper(&p, "hotloop");
    let nodes = vec![serde_yaml::Value::from(zk.connect_string())];
    let (_operator, port) = start_operator(p.shared, "operator-hotloop");
    let table = events_manifest(&ns, |d| {
        d["spec"]["zookeeper"]["nodes"] = nodes.clone().into();
    });
    apply(&p, &table)
        .await
        .ok("applying the table")
        .unwrap_or_else(|e| panic!("{e:#}"));
    let table_path = eventually("status.tablePath", 60, || async {
        let rt = get_json(&p, &ns, "rt/events").await?;
        rt["status"]["tablePath"].as_str().map(str::to_string)
    })
    .await;
    let client = zk_session(&zk).await;
    let pointer = rtable_protocol::TablePaths::new(table_path)
        .replica("events-0")
        .log_pointer();
    rtable_protocol::tree::ensure_path(
        &client,
        &pointer,
        &rtable_protocol::zk_acl::TreeAcl::open(),
    )
    .await
    .expect("a replica node");
    let settle = std::time::Duration::from_secs(3);
    tokio::time::sleep(settle).await;
    let window = std::time::Duration::from_secs(10);
    let before = reconciles(port).await;
    let started = std::time::Instant::now();
    let mut n = 0u64;
    while started.elapsed() < window {
        n += 1;
        client
            .set_data(&pointer, n.to_string().as_bytes(), None)
            .await
            .expect("advance the log pointer");
    }
    let during = reconciles(port).await - before;
    eprintln!("reconciles: {before} before, {during} during the window; pointer moved {n} times");
    // The status follows the pointer (a refresh per resync period reads it)...
    let seen = get_json(&p, &ns, "rt/events").await.expect("rt/events")["status"]
        ["replicaStatuses"][0]["logPointer"]
        .as_u64()
        .unwrap_or(0);
    assert!(seen > 0, "the status shows the replica's pointer");
    // ...without a reconcile per write: 10 s at a 5 s resync is 2 refreshes, 3 with one
    // already due, plus one of slack.
    assert!(
        during <= 4.0,
        "{during} reconciles in {}s while the pointer moved {n} times",
        window.as_secs()
    );
    drop(zk);
}

/// `kubectl delete rt/NAME` of a table with `deletionPolicy: Delete`: the finalizer removes
/// its ZooKeeper tree. With its ensemble stopped, the grace period ends with a Warning
/// Event naming the tree left behind, and the object goes all the same.
#[tokio::test]
async fn deleting_a_table_removes_its_tree_or_lets_go_after_the_grace_period() {
    let p = plane().await;
    let _scenario = p.shared.scenario();
    let ns = namespace(&p, "deletion").await;
    let zk = local_zookeeper(&p, "deletion");
    let doomed = local_zookeeper(&p, "doomed");
    let grace = 10;
    let (_operator, _) = start_operator_with(
        p.shared,
        "operator-deletion",
        &[&format!("--zookeeper-grace-seconds={grace}")],
    );
    let mut paths = Vec::new();
    for (name, ensemble) in [("events", &zk), ("orphan", &doomed)] {
        let nodes = vec![serde_yaml::Value::from(ensemble.connect_string())];
        let table = events_manifest(&ns, |d| {
            d["metadata"]["name"] = name.into();
            d["spec"]["deletionPolicy"] = "Delete".into();
            d["spec"]["zookeeper"]["nodes"] = nodes.into();
        });
        apply(&p, &table)
            .await
            .ok("applying a table")
            .unwrap_or_else(|e| panic!("{e:#}"));
        let path = eventually("status.tablePath", 60, || async {
            let rt = get_json(&p, &ns, &format!("rt/{name}")).await?;
            rt["status"]["tablePath"].as_str().map(str::to_string)
        })
        .await;
        paths.push(path);
    }
    let client = zk_session(&zk).await;
    assert!(
        client
            .check_stat(&paths[0])
            .await
            .expect("exists")
            .is_some()
    );

    p.kubectl
        .run(&["delete", "rt/events", "-n", &ns, "--timeout=60s"], None)
        .await
        .and_then(|o| o.ok("kubectl delete rt/events"))
        .unwrap_or_else(|e| panic!("{e:#}"));
    assert!(
        client
            .check_stat(&paths[0])
            .await
            .expect("exists")
            .is_none(),
        "the finalizer removed {}",
        paths[0]
    );
    assert!(
        !events_with_reason(&p, &ns, "ZooKeeperTreeRemoved")
            .await
            .is_empty()
    );

    drop(doomed);
    let started = std::time::Instant::now();
    p.kubectl
        .run(&["delete", "rt/orphan", "-n", &ns, "--timeout=90s"], None)
        .await
        .and_then(|o| o.ok("kubectl delete rt/orphan with its ensemble stopped"))
        .unwrap_or_else(|e| panic!("{e:#}"));
    let took = started.elapsed().as_secs();
    assert!(
        took >= grace - 1,
        "the finalizer waited for the grace period, {took}s"
    );
    let abandoned = events_with_reason(&p, &ns, "ZooKeeperTreeAbandoned").await;
    let note = abandoned
        .first()
        .and_then(|e| e["message"].as_str().or(e["note"].as_str()))
        .unwrap_or_else(|| panic!("a ZooKeeperTreeAbandoned Event in {ns}"));
    assert!(note.contains(&paths[1]), "{note}");
    assert_eq!(abandoned[0]["type"], "Warning");
}

/// An edit the API server refuses to apply (a volume size: a StatefulSet's claim templates
/// are immutable) is reported on the table for its generation, with a Warning Event,
/// instead of leaving the last status standing.
#[tokio::test]
async fn an_edit_the_api_server_refuses_is_reported_in_status_and_events() {
    let p = plane().await;
    let _scenario = p.shared.scenario();
    let ns = namespace(&p, "refused").await;
    let zk = local_zookeeper(&p, "refused");
    let nodes = vec![serde_yaml::Value::from(zk.connect_string())];
    let (_operator, _) = start_operator(p.shared, "operator-refused");
    let table = |size: &str| {
        events_manifest(&ns, |d| {
            d["spec"]["zookeeper"]["nodes"] = nodes.clone().into();
            d["spec"]["storage"] =
                serde_yaml::from_str(&format!("{{size: {size}}}")).expect("yaml");
        })
    };
    apply(&p, &table("1Gi"))
        .await
        .ok("applying the table")
        .unwrap_or_else(|e| panic!("{e:#}"));
    eventually("the StatefulSet", 60, || {
        get_json(&p, &ns, "statefulset/events")
    })
    .await;
    apply(&p, &table("2Gi"))
        .await
        .ok("editing spec.storage.size")
        .unwrap_or_else(|e| panic!("{e:#}"));
    let degraded = eventually(
        "Degraded/ApplyFailed for the new generation",
        60,
        || async {
            let rt = get_json(&p, &ns, "rt/events").await?;
            let generation = rt["metadata"]["generation"].clone();
            rt["status"]["conditions"]
                .as_array()?
                .iter()
                .find(|c| {
                    c["type"] == "Degraded"
                        && c["reason"] == "ApplyFailed"
                        && c["observedGeneration"] == generation
                })
                .cloned()
        },
    )
    .await;
    let message = degraded["message"].as_str().unwrap_or_default();
    assert!(
        message.contains("StatefulSet events") && message.contains("Forbidden"),
        "{message}"
    );
    let warnings = eventually("a Warning Event for ApplyFailed", 30, || async {
        let found = events_with_reason(&p, &ns, "ApplyFailed").await;
        (!found.is_empty()).then_some(found)
    })
    .await;
    assert_eq!(warnings[0]["type"], "Warning");
    drop(zk);
}
