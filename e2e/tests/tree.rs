//! The protocol crate's tree operations against a real ZooKeeper.

use std::time::Duration;

use rtable_e2e::poll::{Check, poll_until};
use rtable_e2e::zk_ensemble::Jit;
use rtable_e2e::{ZkEnsemble, serial};
use rtable_protocol::host::HostInfo;
use rtable_protocol::metadata::TableMetadata;
use rtable_protocol::tree::{self, CreateOutcome, DropOutcome, RegisterOutcome, TreeError};
use rtable_protocol::zk_acl::TreeAcl;
use rtable_protocol::{ReplicatedTableManifest, TablePaths, TableSchema, columns};
use zookeeper_client as zk;

async fn session(ensemble: &ZkEnsemble) -> zk::Client {
    tree::connect(
        &ensemble.connect_string(),
        Duration::from_secs(6),
        Duration::from_secs(5),
    )
    .await
    .expect("connect to the ensemble")
}

fn example() -> (TablePaths, TableSchema) {
    let table = ReplicatedTableManifest::from_file(&rtable_e2e::example_manifest())
        .expect("examples/events.yaml parses");
    (TablePaths::new(table.table_path), table.schema)
}

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

async fn data(client: &zk::Client, path: &str) -> Option<String> {
    tree::get_string(client, path).await.expect("read a node")
}

#[tokio::test]
async fn create_table_is_idempotent_and_refuses_a_different_schema() {
    let _serial = serial();
    let dir = tempfile::tempdir().expect("temp dir");
    let ensemble = ZkEnsemble::start(1, dir.path(), Jit::QuickStart).expect("ZooKeeper starts");
    let client = session(&ensemble).await;
    let (paths, schema) = example();

    assert_eq!(
        tree::create_table(&client, &paths, &TreeAcl::open(), &schema)
            .await
            .expect("create"),
        CreateOutcome::Created
    );
    let metadata = TableMetadata::from_schema(&schema).render();
    let columns_text = columns::render(&schema.columns);
    assert_eq!(
        data(&client, &paths.metadata()).await,
        Some(metadata.clone())
    );
    assert_eq!(
        data(&client, &paths.columns()).await,
        Some(columns_text.clone())
    );
    for node in paths.table_nodes() {
        assert!(
            client.check_stat(&node).await.expect("exists").is_some(),
            "{node} was created"
        );
    }
    let (_, stat_before) = client.get_data(&paths.metadata()).await.expect("get");

    // The same definition again: nothing changes.
    assert_eq!(
        tree::create_table(&client, &paths, &TreeAcl::open(), &schema)
            .await
            .expect("second create"),
        CreateOutcome::AlreadyExists
    );

    // A different ORDER BY: reported with both definitions, tree untouched.
    let other = TableSchema::new(
        schema.columns.clone(),
        vec!["user_id".to_string()],
        schema.partition_by.clone(),
    )
    .expect("valid schema");
    let other_metadata = TableMetadata::from_schema(&other).render();
    assert_ne!(other_metadata, metadata);
    let err = tree::create_table(&client, &paths, &TreeAcl::open(), &other)
        .await
        .expect_err("schema mismatch");
    assert!(matches!(err, TreeError::SchemaMismatch { .. }), "{err:?}");
    let text = err.to_string();
    assert!(
        text.contains(&other_metadata),
        "local definition in:\n{text}"
    );
    assert!(text.contains(&metadata), "tree definition in:\n{text}");
    assert!(
        text.contains("primary key"),
        "the diff names the field:\n{text}"
    );

    let (after, stat_after) = client.get_data(&paths.metadata()).await.expect("get");
    assert_eq!(String::from_utf8(after).expect("utf-8"), metadata);
    assert_eq!(stat_after.version, stat_before.version);
    assert_eq!(stat_after.mzxid, stat_before.mzxid);
}

#[tokio::test]
async fn replicas_register_activate_drop_and_the_table_is_removed() {
    let _serial = serial();
    let dir = tempfile::tempdir().expect("temp dir");
    let ensemble = ZkEnsemble::start(1, dir.path(), Jit::QuickStart).expect("ZooKeeper starts");
    let a = session(&ensemble).await;
    let b = session(&ensemble).await;
    assert_ne!(a.session_id(), b.session_id());
    let (paths, schema) = example();
    tree::create_table(&a, &paths, &TreeAcl::open(), &schema)
        .await
        .expect("create");

    // The first replica starts clean, later ones start lost and clone.
    assert_eq!(
        tree::register_replica(&a, &paths, &TreeAcl::open(), "events-0", &schema)
            .await
            .expect("register events-0"),
        RegisterOutcome::Registered { is_lost: false }
    );
    assert_eq!(
        tree::register_replica(&b, &paths, &TreeAcl::open(), "events-1", &schema)
            .await
            .expect("register events-1"),
        RegisterOutcome::Registered { is_lost: true }
    );
    assert_eq!(
        tree::register_replica(&a, &paths, &TreeAcl::open(), "events-0", &schema)
            .await
            .expect("register again"),
        RegisterOutcome::AlreadyRegistered
    );
    assert_eq!(
        data(&a, &paths.replica("events-0").is_lost())
            .await
            .as_deref(),
        Some("0")
    );
    assert_eq!(
        data(&a, &paths.replica("events-1").is_lost())
            .await
            .as_deref(),
        Some("1")
    );
    assert_eq!(
        data(&a, &paths.replicas()).await.as_deref(),
        Some("last added replica: events-1")
    );
    assert_eq!(
        tree::list_replicas(&a, &paths).await.expect("list"),
        ["events-0", "events-1"]
    );

    // Activation: one session owns is_active; another session is refused.
    tree::activate(&a, &paths, &TreeAcl::open(), "events-0", &host(9000))
        .await
        .expect("activate from session a");
    tree::activate(&a, &paths, &TreeAcl::open(), "events-0", &host(9000))
        .await
        .expect("a retried activation from the same session succeeds");
    let err = tree::activate(&b, &paths, &TreeAcl::open(), "events-0", &host(9001))
        .await
        .expect_err("another session is refused");
    match &err {
        TreeError::ReplicaActive { replica, owner } => {
            assert_eq!(replica, "events-0");
            assert_eq!(*owner, a.session_id().0);
        }
        other => panic!("expected ReplicaActive, got {other:?}"),
    }
    let state = tree::read_replica_state(&b, &paths, "events-0")
        .await
        .expect("state");
    assert!(state.is_active);
    assert!(!state.is_lost);
    assert_eq!(state.host, Some(host(9000)), "b's host was not written");
    assert_eq!(state.queue_size, 0);
    assert_eq!(state.parts_count, 0);

    // Drop is refused while the replica is active...
    let err = tree::drop_replica(&b, &paths, "events-0")
        .await
        .expect_err("active replica");
    assert!(matches!(err, TreeError::ReplicaActive { .. }), "{err:?}");
    assert!(
        tree::list_replicas(&b, &paths)
            .await
            .expect("list")
            .contains(&"events-0".to_string())
    );

    // ...and succeeds once its session is gone.
    drop(a);
    let is_active = paths.replica("events-0").is_active();
    poll_until(
        "is_active to vanish with its session",
        Duration::from_secs(20),
        Duration::from_millis(100),
        || {
            let b = b.clone();
            let is_active = is_active.clone();
            async move {
                Ok(match b.check_stat(&is_active).await? {
                    None => Check::Done(()),
                    Some(s) => Check::Wait(format!("owned by {:#x}", s.ephemeral_owner)),
                })
            }
        },
    )
    .await
    .expect("session closed");
    assert_eq!(
        tree::drop_replica(&b, &paths, "events-0")
            .await
            .expect("drop"),
        DropOutcome::Dropped
    );
    assert_eq!(
        tree::drop_replica(&b, &paths, "events-0")
            .await
            .expect("drop again"),
        DropOutcome::AlreadyGone
    );
    assert_eq!(
        tree::list_replicas(&b, &paths).await.expect("list"),
        ["events-1"]
    );
    assert!(matches!(
        tree::read_replica_state(&b, &paths, "events-0").await,
        Err(TreeError::NoReplica { .. })
    ));

    // Remove the whole table; creating it again starts from scratch.
    tree::remove_table(&b, &paths).await.expect("remove");
    assert!(b.check_stat(paths.root()).await.expect("exists").is_none());
    tree::remove_table(&b, &paths)
        .await
        .expect("removing a missing table is fine");
    assert_eq!(
        tree::create_table(&b, &paths, &TreeAcl::open(), &schema)
            .await
            .expect("create again"),
        CreateOutcome::Created
    );
    assert!(
        tree::list_replicas(&b, &paths)
            .await
            .expect("list")
            .is_empty()
    );
}
