//! ZooKeeper digest credentials and ACLs on a real ensemble with real sidecars: every node
//! of a table's tree is private to the table's credentials after the whole life of a table
//! (inserts, quorum inserts, merges, a partition drop, a replica added and dropped); a
//! session without them can neither read nor change any node; two tables with different
//! credentials share one ensemble; wrong credentials stop the sidecar at start with a
//! message naming their Secret; a tree created open is moved to the private ACL.

mod common;

use std::path::{Path, PathBuf};
use std::time::Duration;

use zookeeper_client as zk;

use common::{CONVERGE, january_rows, rows, user_ids};
use rtable_e2e::client::json_lines;
use rtable_e2e::poll::{Check, poll_until};
use rtable_e2e::{Cluster, ClusterOptions, SidecarConfig, SidecarProc, serial};
use rtable_protocol::tree;
use rtable_protocol::zk_access::ZkAccess;
use rtable_protocol::zk_acl::{self, DigestCredentials, TreeAcl};

const EVENTS_CREDENTIALS: &str = "events:pw-of-events";
const CLICKS_CREDENTIALS: &str = "clicks:pw-of-clicks";

fn credentials(text: &str) -> DigestCredentials {
    DigestCredentials::parse(text).expect("valid credentials")
}

fn auth_file(dir: &Path, name: &str, text: &str) -> PathBuf {
    let f = dir.join(name);
    std::fs::write(&f, format!("{text}\n")).expect("write the auth file");
    f
}

async fn session(connect: &str, creds: Option<&str>) -> zk::Client {
    let access = ZkAccess {
        credentials: creds.map(credentials),
        ..ZkAccess::default()
    };
    access
        .connect(connect, Duration::from_secs(10), Duration::from_secs(5))
        .await
        .expect("ZooKeeper session")
}

/// Every node under `root` (included) with its ACL, read with `client`.
async fn walk(client: &zk::Client, root: &str) -> Vec<(String, Vec<zk::Acl>)> {
    let mut out = Vec::new();
    let mut stack = vec![root.to_string()];
    while let Some(path) = stack.pop() {
        let acl = match client.get_acl(&path).await {
            Ok((acl, _)) => acl,
            Err(zk::Error::NoNode) => continue,
            Err(e) => panic!("get ACL {path}: {e}"),
        };
        match client.list_children(&path).await {
            Ok(children) => stack.extend(children.into_iter().map(|c| format!("{path}/{c}"))),
            Err(zk::Error::NoNode) => continue,
            Err(e) => panic!("list {path}: {e}"),
        }
        out.push((path, acl));
    }
    out
}

fn assert_all_private(nodes: &[(String, Vec<zk::Acl>)], expected: &TreeAcl) {
    assert!(nodes.len() > 20, "a table's tree has more nodes: {nodes:?}");
    let wrong: Vec<_> = nodes
        .iter()
        .filter(|(_, acl)| !expected.matches(acl))
        .collect();
    assert!(
        wrong.is_empty(),
        "{} of {} nodes lack the ACL {:?}: {wrong:?}",
        wrong.len(),
        nodes.len(),
        expected.acls()
    );
}

/// The ancestors of `root` (not `/` itself) carry the shared ancestors' ACL.
async fn assert_ancestors_shared(client: &zk::Client, root: &str) {
    let mut path = String::new();
    let segments: Vec<&str> = root.split('/').filter(|s| !s.is_empty()).collect();
    for segment in &segments[..segments.len() - 1] {
        path.push('/');
        path.push_str(segment);
        let (acl, _) = client.get_acl(&path).await.expect("ancestor ACL");
        assert_eq!(acl, zk_acl::ancestor_acls(), "{path}");
    }
}

fn refused<T: std::fmt::Debug>(what: &str, path: &str, r: Result<T, zk::Error>) {
    match r {
        Err(zk::Error::NoAuth) => {}
        other => panic!("{what} {path} without credentials: expected NoAuth, got {other:?}"),
    }
}

/// A session without credentials (or with `creds`) is refused every read and every change.
async fn assert_refused_everywhere(outsider: &zk::Client, nodes: &[(String, Vec<zk::Acl>)]) {
    for (path, _) in nodes {
        refused("get", path, outsider.get_data(path).await);
        refused("list", path, outsider.list_children(path).await);
        refused("set", path, outsider.set_data(path, b"x", None).await);
        refused(
            "create under",
            path,
            outsider
                .create(
                    &format!("{path}/intruder"),
                    b"",
                    &TreeAcl::open().persistent(),
                )
                .await,
        );
        refused(
            "set ACL",
            path,
            outsider.set_acl(path, TreeAcl::open().acls(), None).await,
        );
    }
    // Deleting needs the parent's rights: try every leaf.
    for (path, _) in nodes {
        if nodes
            .iter()
            .any(|(other, _)| other.starts_with(&format!("{path}/")))
        {
            continue;
        }
        refused("delete", path, outsider.delete(path, None).await);
    }
}

fn config(c: &Cluster, name: &str, env: Vec<(String, String)>) -> SidecarConfig {
    let port = rtable_e2e::ports::free_ports(1).expect("a free port")[0];
    SidecarConfig {
        table: c.manifest.clone(),
        data_dir: c.dir().join("replicas").join(name),
        log: c.dir().join(format!("{name}.log")),
        replica: name.to_string(),
        port,
        zookeeper: c.zk.connect_string(),
        session_timeout_ms: 10_000,
        interserver_secret_file: None,
        max_body_bytes: None,
        env,
    }
}

fn auth_env(file: &Path) -> Vec<(String, String)> {
    vec![(
        "RTABLE_ZOOKEEPER_AUTH_FILE".to_string(),
        file.display().to_string(),
    )]
}

async fn insert_quorum(c: &Cluster, replica: usize, query: &str, first: u64) {
    let url = format!(
        "{}/insert?format=JSONEachRow&{query}",
        c.client(replica).base()
    );
    let answer = reqwest::Client::new()
        .post(url)
        .body(json_lines(&january_rows(first, 3)))
        .timeout(Duration::from_secs(60))
        .send()
        .await
        .expect("insert answered");
    let status = answer.status().as_u16();
    let text = answer.text().await.expect("insert body");
    assert_eq!(status, 200, "{query}: {text}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn credentials_make_every_node_private_through_a_tables_life() {
    let _serial = serial();
    let dir = tempfile::tempdir().expect("temp dir");
    let file = auth_file(dir.path(), "events-auth", EVENTS_CREDENTIALS);
    let mut c = Cluster::start(ClusterOptions {
        env: auth_env(&file),
        ..ClusterOptions::default()
    })
    .await
    .expect("cluster with credentials");
    // Inserts on every replica, quorum inserts in both modes, enough January parts for a merge.
    for k in 0..6u64 {
        c.client((k % 3) as usize)
            .insert_json(&rows(k * 10, 10))
            .await
            .expect("insert");
    }
    insert_quorum(&c, 0, "insert_quorum=2&insert_quorum_parallel=0", 1000).await;
    insert_quorum(&c, 1, "insert_quorum=3&insert_quorum_parallel=1", 2000).await;
    poll_until(
        "a merged part on events-0",
        Duration::from_secs(60),
        Duration::from_millis(200),
        || async {
            let parts = c.client(0).status().await?.parts;
            Ok(match parts.iter().any(|p| !p.ends_with("_0")) {
                true => Check::Done(()),
                false => Check::Wait(format!("{parts:?}")),
            })
        },
    )
    .await
    .expect("a merge");
    let drop = reqwest::Client::new()
        .post(format!(
            "{}/drop_partition?partition=202502",
            c.client(2).base()
        ))
        .send()
        .await
        .expect("drop answered");
    assert_eq!(drop.status().as_u16(), 200);
    // A replica added (it clones the others' parts) and dropped.
    let mut added = SidecarProc::spawn(config(&c, "events-3", auth_env(&file))).expect("spawn");
    added
        .wait_ready(Duration::from_secs(60))
        .await
        .expect("the added replica is ready");
    let lines = c
        .wait_converged_rows(36, CONVERGE)
        .await
        .expect("converged");
    assert!(user_ids(&lines).iter().all(|id| id % 2 == 0 || *id >= 1000));
    added
        .terminate(Duration::from_secs(10))
        .expect("stop events-3");
    let owner = session(&c.zk.connect_string(), Some(EVENTS_CREDENTIALS)).await;
    let paths = c.paths();
    poll_until(
        "events-3 dropped",
        Duration::from_secs(30),
        Duration::from_millis(200),
        || async {
            Ok(match tree::drop_replica(&owner, &paths, "events-3").await {
                Ok(_) => Check::Done(()),
                Err(e) => Check::Wait(e.to_string()),
            })
        },
    )
    .await
    .expect("drop events-3");

    let nodes = walk(&owner, &c.table_path).await;
    assert_all_private(
        &nodes,
        &TreeAcl::private(&credentials(EVENTS_CREDENTIALS), false),
    );
    assert!(
        nodes.iter().any(|(p, _)| p.contains("/blocks/")),
        "the walk saw the dedup blocks"
    );
    assert!(!nodes.iter().any(|(p, _)| p.contains("events-3")));
    assert_ancestors_shared(&owner, &c.table_path).await;
    let outsider = session(&c.zk.connect_string(), None).await;
    assert_refused_everywhere(&outsider, &nodes).await;
    let impostor = session(&c.zk.connect_string(), Some("events:wrong")).await;
    assert_refused_everywhere(&impostor, &nodes[..5]).await;
    // The refusals changed nothing: the replicas still agree on the same rows.
    assert_eq!(
        c.wait_converged_rows(36, CONVERGE)
            .await
            .expect("converged"),
        lines
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn two_tables_with_their_own_credentials_share_an_ensemble_and_wrong_ones_stop_the_sidecar() {
    let _serial = serial();
    let dir = tempfile::tempdir().expect("temp dir");
    let events_auth = auth_file(dir.path(), "events-auth", EVENTS_CREDENTIALS);
    let clicks_auth = auth_file(dir.path(), "clicks-auth", CLICKS_CREDENTIALS);
    let mut c = Cluster::start(ClusterOptions {
        replicas: 2,
        env: auth_env(&events_auth),
        ..ClusterOptions::default()
    })
    .await
    .expect("events with its credentials");
    let text = std::fs::read_to_string(&c.manifest).expect("manifest");
    let clicks_manifest = c.dir().join("clicks.yaml");
    std::fs::write(
        &clicks_manifest,
        text.replace("name: events", "name: clicks"),
    )
    .expect("write clicks.yaml");
    let mut clicks_cfg = config(&c, "clicks-0", auth_env(&clicks_auth));
    clicks_cfg.table = clicks_manifest;
    let mut clicks = SidecarProc::spawn(clicks_cfg).expect("spawn clicks-0");
    clicks
        .wait_ready(Duration::from_secs(60))
        .await
        .expect("clicks-0 ready");
    clicks
        .client()
        .insert_json(&rows(0, 10))
        .await
        .expect("insert into clicks");
    c.client(0)
        .insert_json(&rows(100, 10))
        .await
        .expect("insert into events");
    c.wait_converged_rows(10, CONVERGE)
        .await
        .expect("events converged");

    let connect = c.zk.connect_string();
    let events = session(&connect, Some(EVENTS_CREDENTIALS)).await;
    let clicks_owner = session(&connect, Some(CLICKS_CREDENTIALS)).await;
    let clicks_root = c.table_path.replace("events", "clicks");
    assert_ne!(clicks_root, c.table_path);
    let events_nodes = walk(&events, &c.table_path).await;
    let clicks_nodes = walk(&clicks_owner, &clicks_root).await;
    assert_all_private(
        &events_nodes,
        &TreeAcl::private(&credentials(EVENTS_CREDENTIALS), false),
    );
    assert_all_private(
        &clicks_nodes,
        &TreeAcl::private(&credentials(CLICKS_CREDENTIALS), false),
    );
    // Each table's credentials open nothing of the other's.
    assert_refused_everywhere(&events, &clicks_nodes[..8]).await;
    assert_refused_everywhere(&clicks_owner, &events_nodes[..8]).await;

    // A replica of events given clicks' credentials stops at start and names their Secret.
    let mut env = auth_env(&clicks_auth);
    env.push((
        "RTABLE_ZOOKEEPER_AUTH_SOURCE".to_string(),
        "Secret events-zk key digest".to_string(),
    ));
    let mut wrong = SidecarProc::spawn(config(&c, "events-5", env)).expect("spawn events-5");
    let status = poll_until(
        "events-5 exits",
        Duration::from_secs(30),
        Duration::from_millis(200),
        || {
            let s = wrong.exit_status();
            async move {
                Ok(match s {
                    Some(s) => Check::Done(s),
                    None => Check::Wait("running".to_string()),
                })
            }
        },
    )
    .await
    .expect("a replica with wrong credentials exits");
    assert!(!status.success());
    let log = std::fs::read_to_string(wrong.log_path()).expect("log");
    assert!(
        log.contains("refuses the table's tree")
            && log.contains("user clicks")
            && log.contains("Secret events-zk key digest"),
        "{log}"
    );
    // It left nothing behind.
    let events_after = walk(&events, &c.table_path).await;
    assert!(!events_after.iter().any(|(p, _)| p.contains("events-5")));
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_open_tree_is_moved_to_the_credentials_acl_when_they_are_added() {
    let _serial = serial();
    let dir = tempfile::tempdir().expect("temp dir");
    let file = auth_file(dir.path(), "events-auth", EVENTS_CREDENTIALS);
    let mut c = Cluster::start(ClusterOptions {
        replicas: 2,
        ..ClusterOptions::default()
    })
    .await
    .expect("cluster without credentials");
    for k in 0..4u64 {
        c.client((k % 2) as usize)
            .insert_json(&rows(k * 10, 10))
            .await
            .expect("insert");
    }
    let before = c
        .wait_converged_rows(40, CONVERGE)
        .await
        .expect("converged");
    let anyone = session(&c.zk.connect_string(), None).await;
    let open_nodes = walk(&anyone, &c.table_path).await;
    assert!(
        open_nodes
            .iter()
            .all(|(_, acl)| TreeAcl::open().matches(acl))
    );

    for r in &mut c.replicas {
        r.set_extra_args(vec![
            "--zookeeper-auth-file".to_string(),
            file.display().to_string(),
        ]);
        r.restart().expect("restart with credentials");
    }
    for r in &mut c.replicas {
        r.wait_ready(Duration::from_secs(60))
            .await
            .expect("ready with credentials");
    }
    let owner = session(&c.zk.connect_string(), Some(EVENTS_CREDENTIALS)).await;
    let nodes = walk(&owner, &c.table_path).await;
    assert_all_private(
        &nodes,
        &TreeAcl::private(&credentials(EVENTS_CREDENTIALS), false),
    );
    assert_refused_everywhere(&anyone, &nodes).await;
    c.client(1)
        .insert_json(&rows(40, 10))
        .await
        .expect("insert after");
    let after = c
        .wait_converged_rows(50, CONVERGE)
        .await
        .expect("converged");
    assert!(before.iter().all(|l| after.contains(l)));
}
