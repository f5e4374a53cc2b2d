//! The operator's ZooKeeper side (its `ZooKeeperBackend`) against a real ensemble: tree
//! creation, schema-mismatch detection, replica drop gated on `is_active`, tree removal.

use std::time::Duration;

use rtable_e2e::zk_ensemble::Jit;
use rtable_e2e::{ZkEnsemble, serial};
use rtable_operator::backend::{Backend, ZkTarget, ZooKeeperBackend};
use rtable_protocol::host::HostInfo;
use rtable_protocol::tree::{self, DropOutcome, TreeError};
use rtable_protocol::zk_acl::TreeAcl;
use rtable_protocol::{ReplicatedTableManifest, TablePaths};

fn host(port: u16) -> HostInfo {
    HostInfo {
        host: "127.0.0.1".into(),
        port,
        tcp_port: port,
        database: "default".into(),
        table: "events".into(),
        scheme: "http".into(),
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn operator_backend_manages_the_tree() {
    let _guard = serial();
    let dir = tempfile::tempdir().expect("temp dir");
    let mut ensemble = ZkEnsemble::start(1, dir.path(), Jit::QuickStart).expect("start ZooKeeper");
    ensemble
        .wait_serving(Duration::from_secs(30))
        .expect("ZooKeeper serves");
    let table = ReplicatedTableManifest::from_file(&rtable_e2e::example_manifest())
        .expect("examples/events.yaml parses");
    let path = table.table_path.clone();
    let target = ZkTarget {
        connect: ensemble.connect_string(),
        session_timeout: Duration::from_secs(6),
        access: Default::default(),
    };
    let backend = ZooKeeperBackend::new(Duration::from_secs(5)).expect("backend");

    // Creation is idempotent.
    backend
        .ensure_table(&target, &path, &table.schema)
        .await
        .expect("creates the tree");
    backend
        .ensure_table(&target, &path, &table.schema)
        .await
        .expect("an identical tree is accepted");
    assert!(
        backend
            .replicas(&target, &path)
            .await
            .expect("lists replicas")
            .is_empty()
    );

    // A different definition is reported, never written.
    let mut other = table.schema.clone();
    other.order_by = vec!["user_id".to_string()];
    match backend.ensure_table(&target, &path, &other).await {
        Err(TreeError::SchemaMismatch { diff, .. }) => {
            assert!(diff.contains("primary key"), "diff names the field: {diff}")
        }
        other => panic!("expected a schema mismatch, got {other:?}"),
    }

    // Two replicas register; one is active through its own session.
    let paths = TablePaths::new(path.clone());
    let session = tree::connect(
        &ensemble.connect_string(),
        Duration::from_secs(6),
        Duration::from_secs(5),
    )
    .await
    .expect("replica session");
    for name in ["events-0", "events-1"] {
        tree::register_replica(&session, &paths, &TreeAcl::open(), name, &table.schema)
            .await
            .expect("register");
    }
    tree::activate(&session, &paths, &TreeAcl::open(), "events-1", &host(9009))
        .await
        .expect("activate");
    let states = backend.replicas(&target, &path).await.expect("states");
    assert_eq!(states.len(), 2);
    assert!(states.iter().any(|s| s.name == "events-1" && s.is_active));
    assert!(states.iter().any(|s| s.name == "events-0" && !s.is_active));

    // An active replica is never dropped; an inactive one is, and dropping twice is fine.
    match backend.drop_replica(&target, &path, "events-1").await {
        Err(TreeError::ReplicaActive { replica, .. }) => assert_eq!(replica, "events-1"),
        other => panic!("dropping an active replica must be refused, got {other:?}"),
    }
    assert_eq!(
        backend
            .drop_replica(&target, &path, "events-0")
            .await
            .expect("drop"),
        DropOutcome::Dropped
    );
    assert_eq!(
        backend
            .drop_replica(&target, &path, "events-0")
            .await
            .expect("drop again"),
        DropOutcome::AlreadyGone
    );
    let names: Vec<String> = backend
        .replicas(&target, &path)
        .await
        .expect("states")
        .into_iter()
        .map(|s| s.name)
        .collect();
    assert_eq!(names, ["events-1"]);

    // Once the replica's session is gone, the whole tree can go.
    drop(session);
    let deadline = tokio::time::Instant::now() + Duration::from_secs(20);
    loop {
        match backend.drop_replica(&target, &path, "events-1").await {
            Ok(_) => break,
            Err(TreeError::ReplicaActive { .. }) if tokio::time::Instant::now() < deadline => {
                tokio::time::sleep(Duration::from_millis(200)).await
            }
            Err(e) => panic!("drop after the session ended: {e}"),
        }
    }
    backend
        .remove_table(&target, &path)
        .await
        .expect("remove the tree");
    let check = tree::connect(
        &ensemble.connect_string(),
        Duration::from_secs(6),
        Duration::from_secs(5),
    )
    .await
    .expect("check session");
    assert!(
        check.check_stat(&path).await.expect("exists").is_none(),
        "the table's tree is gone"
    );
}
