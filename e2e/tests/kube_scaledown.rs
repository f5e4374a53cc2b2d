//! Scale-down on a real control plane never removes a replica (and, with
//! `persistentVolumeClaimRetentionPolicy.whenScaled: Delete`, its volume) that holds a part
//! no surviving replica has: the operator keeps the StatefulSet's count until a survivor
//! lists the part, or a part covering it, under `replicas/<name>/parts`.
//!
//! The replicas are registered in a local ZooKeeper by the test (no node runs the pods),
//! the way `status_writes_do_not_retrigger_reconciles` in kube.rs does; the helpers are
//! copies of kube.rs's.

mod kube_common;

use kube_common::*;

async fn sts_replicas(p: &Plane, ns: &str) -> Option<i64> {
    get_json(p, ns, "statefulset/events").await?["spec"]["replicas"].as_i64()
}

/// The table's Progressing condition once it is for the current generation.
async fn progressing(p: &Plane, ns: &str) -> Option<serde_json::Value> {
    let rt = get_json(p, ns, "rt/events").await?;
    let generation = rt["metadata"]["generation"].clone();
    rt["status"]["conditions"]
        .as_array()?
        .iter()
        .find(|c| c["type"] == "Progressing" && c["observedGeneration"] == generation)
        .cloned()
}

/// `kubectl scale rt/events --replicas=2` while events-2 holds 202405_2_2_0, which neither
/// events-0 nor events-1 has: the StatefulSet stays at 3 and Progressing names events-2.
/// Once events-0 lists 202405_1_2_1 (a merge covering it), the StatefulSet goes to 2, and
/// events-2, its pod gone and no session of its own, is dropped from ZooKeeper.
#[tokio::test]
async fn scale_down_keeps_a_replica_until_its_parts_are_on_a_survivor() {
    let p = plane().await;
    let _scenario = p.shared.scenario();
    let ns = "scaledown";
    namespace(&p, ns).await;
    let zk = local_zookeeper(&p, "scaledown");
    let nodes = vec![serde_yaml::Value::from(zk.connect_string())];
    let (_operator, _) = start_operator(p.shared, "operator-scaledown");
    let table = events_manifest(ns, |d| {
        d["spec"]["zookeeper"]["nodes"] = nodes.into();
        d["spec"]["replicas"] = 3.into();
    });
    p.kubectl
        .run(&["apply", "-f", "-"], Some(&table))
        .await
        .and_then(|o| o.ok("applying the table"))
        .unwrap_or_else(|e| panic!("{e:#}"));
    let table_path = eventually("status.tablePath", 60, || async {
        let rt = get_json(&p, ns, "rt/events").await?;
        rt["status"]["tablePath"].as_str().map(str::to_string)
    })
    .await;
    eventually("a StatefulSet of 3", 60, || async {
        (sts_replicas(&p, ns).await? == 3).then_some(())
    })
    .await;

    let client = zk_session(&zk).await;
    let paths = rtable_protocol::TablePaths::new(table_path);
    let register = |replica: &str, part: &str| paths.replica(replica).part(part);
    for (replica, part) in [
        ("events-0", "202405_1_1_0"),
        ("events-1", "202405_1_1_0"),
        ("events-2", "202405_1_1_0"),
        ("events-2", "202405_2_2_0"),
    ] {
        rtable_protocol::tree::ensure_path(
            &client,
            &register(replica, part),
            &rtable_protocol::zk_acl::TreeAcl::open(),
        )
        .await
        .expect("a part node");
    }

    kubectl(
        &p,
        &["scale", "rt/events", "--replicas=2", "-n", ns],
        None,
        "kubectl scale",
    )
    .await;
    let held = eventually("Progressing/ScalingDown naming events-2", 60, || async {
        let c = progressing(&p, ns).await?;
        let message = c["message"].as_str()?;
        (c["status"] == "True" && c["reason"] == "ScalingDown" && message.contains("events-2"))
            .then(|| message.to_string())
    })
    .await;
    assert!(held.contains("202405_2_2_0"), "{held}");
    assert_eq!(sts_replicas(&p, ns).await, Some(3), "{held}");
    // Still held a resync later (the operator requeues a held scale-down every 10 s).
    tokio::time::sleep(std::time::Duration::from_secs(12)).await;
    assert_eq!(sts_replicas(&p, ns).await, Some(3));
    let events_2 = paths.replica("events-2");
    assert!(
        client
            .check_stat(events_2.root())
            .await
            .expect("exists")
            .is_some(),
        "a held replica is never dropped"
    );

    // events-0 merged 1..2: its part covers events-2's.
    rtable_protocol::tree::ensure_path(
        &client,
        &register("events-0", "202405_1_2_1"),
        &rtable_protocol::zk_acl::TreeAcl::open(),
    )
    .await
    .expect("a part node");
    eventually("a StatefulSet of 2", 60, || async {
        (sts_replicas(&p, ns).await? == 2).then_some(())
    })
    .await;
    eventually("events-2 dropped from ZooKeeper", 60, || async {
        let stat = client.check_stat(events_2.root()).await.expect("exists");
        stat.is_none().then_some(())
    })
    .await;
    drop(zk);
}
