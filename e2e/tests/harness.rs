//! The harness itself against a real ZooKeeper: ensembles form, elect a new leader after
//! a SIGKILL, answer `mntr`, and the prerequisites and ports fail with clear messages.

use std::time::Duration;

use rtable_e2e::poll::{Check, poll_until};
use rtable_e2e::zk_ensemble::{self, Jit, NodePorts, ZkEnsemble};
use rtable_e2e::{ports, serial};
use zookeeper_client as zk;

async fn connect(connect_string: &str) -> zk::Client {
    rtable_protocol::tree::connect(
        connect_string,
        Duration::from_secs(10),
        Duration::from_secs(5),
    )
    .await
    .expect("connect to the ensemble")
}

#[tokio::test]
async fn three_node_ensemble_forms_and_survives_a_leader_kill() {
    let _serial = serial();
    let dir = tempfile::tempdir().expect("temp dir");
    let mut ensemble = ZkEnsemble::start(3, dir.path(), Jit::QuickStart).expect("ensemble starts");
    assert_eq!(ensemble.size(), 3);

    let modes: Vec<String> = (0..3)
        .map(|i| ensemble.mode(i).expect("every node serves"))
        .collect();
    assert_eq!(
        modes.iter().filter(|m| *m == "leader").count(),
        1,
        "{modes:?}"
    );
    assert_eq!(
        modes.iter().filter(|m| *m == "follower").count(),
        2,
        "{modes:?}"
    );
    let leader = ensemble.leader_index().expect("a leader");
    assert_eq!(modes[leader], "leader");
    assert_eq!(ensemble.connect_string().split(',').count(), 3);

    let client = connect(&ensemble.connect_string()).await;
    client
        .create(
            "/harness",
            b"before",
            &zk::CreateMode::Persistent.with_acls(zk::Acls::anyone_all()),
        )
        .await
        .expect("create a node");

    ensemble.kill(leader).expect("kill the leader");
    assert!(!ensemble.is_running(leader));
    let new_leader = poll_until(
        "a new leader",
        Duration::from_secs(30),
        Duration::from_millis(100),
        || {
            let found = ensemble.leader_index();
            async move {
                Ok(match found {
                    Some(i) => Check::Done(i),
                    None => Check::Wait("no leader".to_string()),
                })
            }
        },
    )
    .await
    .expect("a new leader is elected");
    assert_ne!(new_leader, leader);

    // The data survives and the session carries on against the remaining quorum.
    let (data, _) = poll_until(
        "the node to be readable after the election",
        Duration::from_secs(30),
        Duration::from_millis(100),
        || {
            let client = client.clone();
            async move {
                Ok(match client.get_data("/harness").await {
                    Ok(d) => Check::Done(d),
                    Err(e) => Check::Wait(e.to_string()),
                })
            }
        },
    )
    .await
    .expect("node readable");
    assert_eq!(data, b"before");

    ensemble.restart(leader).expect("restart the old leader");
    assert_eq!(
        ensemble.mode(leader).as_deref(),
        Some("follower"),
        "the old leader rejoins as a follower"
    );
    assert_eq!(ensemble.leader_index(), Some(new_leader));
}

#[tokio::test]
async fn mntr_reports_numeric_counters_that_grow() {
    let _serial = serial();
    let dir = tempfile::tempdir().expect("temp dir");
    let ensemble =
        ZkEnsemble::start(1, dir.path(), Jit::QuickStart).expect("standalone node starts");
    assert_eq!(ensemble.mode(0).as_deref(), Some("standalone"));
    assert_eq!(ensemble.leader_index(), Some(0));

    let before = ensemble.mntr(0).expect("mntr");
    assert_eq!(
        before.get("zk_server_state").map(String::as_str),
        Some("standalone")
    );
    for key in ["zk_packets_received", "zk_packets_sent", "zk_znode_count"] {
        let v = before.get(key).unwrap_or_else(|| panic!("mntr has {key}"));
        v.parse::<u64>()
            .unwrap_or_else(|_| panic!("{key}={v} is a number"));
    }
    let received_before: u64 = before["zk_packets_received"].parse().expect("number");
    let znodes_before: u64 = before["zk_znode_count"].parse().expect("number");

    let client = connect(&ensemble.connect_string()).await;
    for i in 0..10 {
        client
            .create(
                &format!("/n{i}"),
                b"",
                &zk::CreateMode::Persistent.with_acls(zk::Acls::anyone_all()),
            )
            .await
            .expect("create");
    }
    let after = ensemble.mntr(0).expect("mntr");
    let received_after: u64 = after["zk_packets_received"].parse().expect("number");
    let znodes_after: u64 = after["zk_znode_count"].parse().expect("number");
    assert!(
        received_after >= received_before + 10,
        "{received_before} -> {received_after}"
    );
    assert_eq!(znodes_after, znodes_before + 10);
    assert_eq!(
        ensemble.mntr_sum("zk_znode_count"),
        znodes_after,
        "one node: the sum is that node"
    );
}

#[test]
fn a_requested_port_in_use_is_named() {
    let _serial = serial();
    let listener = std::net::TcpListener::bind("127.0.0.1:0").expect("bind");
    let busy = listener.local_addr().expect("addr").port();
    let free = ports::free_ports(2).expect("free ports");
    let dir = tempfile::tempdir().expect("temp dir");
    let err = ZkEnsemble::start_with_ports(
        &[NodePorts {
            client: busy,
            peer: free[0],
            election: free[1],
        }],
        dir.path(),
        Jit::QuickStart,
    )
    .expect_err("the client port is taken");
    let text = format!("{err:#}");
    assert!(text.contains(&format!("port {busy}")), "{text}");
    assert!(text.contains("in use"), "{text}");
}

#[test]
fn missing_zookeeper_or_java_points_at_setup() {
    let err = zk_ensemble::check_prerequisites("/nonexistent/zookeeper.jar", "java")
        .expect_err("no jar")
        .to_string();
    assert!(err.contains("scripts/setup.sh"), "{err}");
    assert!(err.contains("/nonexistent/zookeeper.jar"), "{err}");
    let err = zk_ensemble::check_prerequisites(zk_ensemble::DEFAULT_JAR, "/nonexistent/bin/java")
        .expect_err("no java")
        .to_string();
    assert!(err.contains("Java"), "{err}");
    assert!(err.contains("scripts/setup.sh"), "{err}");
}

#[test]
fn the_example_manifest_parses() {
    let path = rtable_e2e::example_manifest();
    let table = rtable_protocol::ReplicatedTableManifest::from_file(&path)
        .unwrap_or_else(|e| panic!("{}: {e}", path.display()));
    let spec = &table.manifest.spec;
    assert_eq!(table.manifest.metadata.name, "events");
    assert_eq!(table.table_path, "/clickhouse/tables/01/default.events");
    assert_eq!(spec.replicas, 3);
    assert_eq!(spec.insert_quorum.required(spec.replicas), 1);
    assert_eq!(spec.zookeeper.nodes.len(), 3);
    let names: Vec<&str> = table
        .schema
        .columns
        .iter()
        .map(|c| c.name.as_str())
        .collect();
    assert_eq!(names, ["ts", "user_id", "event", "value"]);
    assert_eq!(table.schema.order_by, ["user_id", "ts"]);
    assert_eq!(
        table.schema.partition_by,
        rtable_protocol::PartitionKey::ToYyyyMm("ts".into())
    );
    assert!(table.schema.columns[3].ty.is_nullable());
}
