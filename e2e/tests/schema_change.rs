//! Appending columns to a live table: the tree's `columns` node is updated once, whoever
//! applies it (the operator or a sidecar), and replicas restarted one by one with the new
//! definition keep replicating, old rows showing NULL or the type's default in the new
//! columns.

mod common;

use std::path::PathBuf;
use std::time::Duration;

use common::{CONVERGE, rows};
use rtable_e2e::zk_ensemble::Jit;
use rtable_e2e::{Cluster, ClusterOptions, ZkEnsemble, serial};
use rtable_protocol::metadata::TableMetadata;
use rtable_protocol::tree::{self, CreateOutcome, TreeError};
use rtable_protocol::zk_acl::TreeAcl;
use rtable_protocol::{ReplicatedTableManifest, TablePaths, TableSchema, columns};
use serde_json::{Value, json};

/// The manifest at `from` with `note Nullable(String)` and `score UInt32` appended to its
/// columns, written next to it as `table-appended.yaml`.
fn appended_manifest(from: &std::path::Path) -> PathBuf {
    let text = std::fs::read_to_string(from).expect("read the manifest");
    let last = "    - {name: value, type: \"Nullable(Float64)\"}\n";
    assert!(
        text.contains(last),
        "the example's last column moved:\n{text}"
    );
    let text = text.replacen(
        last,
        &format!(
            "{last}    - {{name: note, type: \"Nullable(String)\"}}\n    - {{name: score, type: UInt32}}\n"
        ),
        1,
    );
    let to = from.with_file_name("table-appended.yaml");
    std::fs::write(&to, text).expect("write the new manifest");
    to
}

fn schema_of(path: &std::path::Path) -> (TablePaths, TableSchema) {
    let table = ReplicatedTableManifest::from_file(path).expect("manifest parses");
    (TablePaths::new(table.table_path), table.schema)
}

/// Rows with the appended columns set.
fn new_rows(first: u64, n: u64) -> Vec<Value> {
    rows(first, n)
        .into_iter()
        .map(|mut r| {
            let id = r["user_id"].as_u64().expect("user_id");
            r["note"] = json!(format!("note-{id}"));
            r["score"] = json!(id * 10);
            r
        })
        .collect()
}

#[tokio::test]
async fn create_table_appends_columns_once_and_refuses_anything_else() {
    let _serial = serial();
    let dir = tempfile::tempdir().expect("temp dir");
    let ensemble = ZkEnsemble::start(1, dir.path(), Jit::QuickStart).expect("ZooKeeper starts");
    let connect = || async {
        tree::connect(
            &ensemble.connect_string(),
            Duration::from_secs(6),
            Duration::from_secs(5),
        )
        .await
        .expect("connect")
    };
    let client = connect().await;
    let example = rtable_e2e::example_manifest();
    let copy = dir.path().join("table.yaml");
    std::fs::copy(&example, &copy).expect("copy the example");
    let (paths, old) = schema_of(&copy);
    let (_, new) = schema_of(&appended_manifest(&copy));
    assert_eq!(new.columns.len(), old.columns.len() + 2);

    assert_eq!(
        tree::create_table(&client, &paths, &TreeAcl::open(), &old)
            .await
            .expect("create"),
        CreateOutcome::Created
    );
    let (metadata_before, metadata_stat) =
        client.get_data(&paths.metadata()).await.expect("metadata");

    // Several sessions apply the same append at once: exactly one does it.
    let mut sessions = Vec::new();
    for _ in 0..4 {
        sessions.push(connect().await);
    }
    let open = TreeAcl::open();
    let outcomes = futures::future::join_all(
        sessions
            .iter()
            .map(|c| tree::create_table(c, &paths, &open, &new)),
    )
    .await;
    let outcomes: Vec<CreateOutcome> = outcomes.into_iter().map(|o| o.expect("append")).collect();
    let appended = outcomes
        .iter()
        .filter(|o| {
            **o == CreateOutcome::ColumnsAppended {
                before: old.columns.len(),
                after: new.columns.len(),
            }
        })
        .count();
    assert_eq!(appended, 1, "{outcomes:?}");
    assert!(
        outcomes.iter().all(|o| matches!(
            o,
            CreateOutcome::ColumnsAppended { .. } | CreateOutcome::AlreadyExists
        )),
        "{outcomes:?}"
    );
    let (columns_text, columns_stat) = client.get_data(&paths.columns()).await.expect("columns");
    assert_eq!(
        String::from_utf8(columns_text).expect("utf-8"),
        columns::render(&new.columns)
    );
    assert_eq!(columns_stat.version, 1, "set once");
    let (metadata_after, stat_after) = client.get_data(&paths.metadata()).await.expect("metadata");
    assert_eq!(metadata_after, metadata_before);
    assert_eq!(stat_after.version, metadata_stat.version);

    // Again: nothing to do.
    assert_eq!(
        tree::create_table(&client, &paths, &TreeAcl::open(), &new)
            .await
            .expect("again"),
        CreateOutcome::AlreadyExists
    );

    // The old definition: a mismatch for the operator, accepted for a sidecar not restarted.
    let err = tree::create_table(&client, &paths, &TreeAcl::open(), &old)
        .await
        .expect_err("older definition");
    assert!(matches!(err, TreeError::SchemaMismatch { .. }), "{err:?}");
    assert!(
        err.to_string()
            .contains("columns differ: the tree has columns appended"),
        "{err}"
    );
    assert_eq!(
        tree::create_table_allowing_older(&client, &paths, &TreeAcl::open(), &old)
            .await
            .expect("accepted"),
        CreateOutcome::TreeAhead {
            local: old.columns.len(),
            tree: new.columns.len(),
        }
    );

    // Anything but an append is reported and the tree is left as it is.
    let mut retyped = new.clone();
    let last = retyped.columns.len() - 1;
    retyped.columns[last].ty = "UInt64".parse().expect("type");
    let mut reordered = new.clone();
    reordered.columns.push(rtable_protocol::Column {
        name: "extra".into(),
        ty: "String".parse().expect("type"),
    });
    reordered.order_by = vec!["user_id".to_string()];
    for other in [retyped, reordered] {
        let err = tree::create_table_allowing_older(&client, &paths, &TreeAcl::open(), &other)
            .await
            .expect_err("mismatch");
        assert!(matches!(err, TreeError::SchemaMismatch { .. }), "{err:?}");
    }
    let (after, stat) = client.get_data(&paths.columns()).await.expect("columns");
    assert_eq!(
        String::from_utf8(after).expect("utf-8"),
        columns::render(&new.columns)
    );
    assert_eq!(stat.version, 1);
    assert_eq!(
        String::from_utf8(metadata_after).expect("utf-8"),
        TableMetadata::from_schema(&new).render()
    );
}

#[tokio::test]
async fn replicas_restarted_one_by_one_with_an_appended_column_converge() {
    let _serial = serial();
    let mut c = Cluster::start(ClusterOptions::default())
        .await
        .expect("cluster starts");
    let zk = c.zk_client().await.expect("zk");
    let paths = c.paths();

    // 30 rows under the original definition, over all replicas.
    for i in 0..3u64 {
        c.client(i as usize)
            .insert_json(&rows(i * 10, 10))
            .await
            .expect("insert");
    }
    c.wait_converged_rows(30, CONVERGE)
        .await
        .expect("converged before the change");

    let manifest = appended_manifest(&c.manifest.clone());
    let (_, new) = schema_of(&manifest);

    // Roll the replicas one by one, inserting on the rolled one (new columns) and on one
    // still running the old definition (which keeps working with its columns).
    let mut next = 30u64;
    let mut new_ids = Vec::new();
    for i in 0..3usize {
        c.replicas[i]
            .restart_with_table(manifest.clone(), Duration::from_secs(20))
            .expect("restart with the new manifest");
        c.replicas[i]
            .wait_ready(Duration::from_secs(60))
            .await
            .expect("restarted replica is ready");
        let columns_node = tree::get_string(&zk, &paths.columns())
            .await
            .expect("read columns")
            .expect("columns node");
        assert_eq!(columns_node, columns::render(&new.columns));
        c.client(i)
            .insert_json(&new_rows(next, 5))
            .await
            .expect("insert with the new columns");
        new_ids.extend(next..next + 5);
        next += 5;
        if i < 2 {
            // A replica not rolled yet: inserts and selects with the old columns.
            let old = c.client(2);
            old.insert_json(&rows(next, 5))
                .await
                .expect("insert on a replica with the old definition");
            next += 5;
            let status = old.status().await.expect("status");
            assert!(!status.is_readonly, "{status:?}");
            let lines = old.select_sorted_lines().await.expect("select");
            for line in &lines {
                let v: Value = serde_json::from_str(line).expect("json");
                assert!(v.get("note").is_none(), "old definition shows {line}");
            }
        }
    }

    let lines = c
        .wait_converged_rows(next as usize, CONVERGE)
        .await
        .expect("converged after the roll");
    let mut seen = 0;
    for line in &lines {
        let v: Value = serde_json::from_str(line).expect("json");
        let id = v["user_id"].as_u64().expect("user_id");
        if new_ids.contains(&id) {
            assert_eq!(v["note"], json!(format!("note-{id}")), "{line}");
            assert_eq!(v["score"], json!(id * 10), "{line}");
        } else {
            assert_eq!(v["note"], Value::Null, "old row {line}");
            assert_eq!(v["score"], json!(0), "old row {line}");
        }
        seen += 1;
    }
    assert_eq!(seen, next as usize);

    let columns_node = tree::get_string(&zk, &paths.columns())
        .await
        .expect("read columns")
        .expect("columns node");
    assert!(
        columns_node.contains("`note` Nullable(String)\n`score` UInt32\n"),
        "{columns_node}"
    );
    for r in &c.replicas {
        let status = r.client().status().await.expect("status");
        assert!(!status.is_readonly, "{} is read-only: {status:?}", r.name());
        let replica_columns = tree::get_string(&zk, &paths.replica(r.name()).columns())
            .await
            .expect("read")
            .expect("replica columns");
        assert_eq!(replica_columns, columns_node, "{}", r.name());
    }
}
