//! What the sidecar says when it cannot do what it was asked: bad command lines and table
//! files stop the process with the reason, a replica whose table definition differs from
//! the tree stays read-only and shows both, a fetch with no source waits in the queue
//! with its reason, and a background task that panics is restarted and counted.

mod common;

use std::path::{Path, PathBuf};
use std::process::{Command, ExitStatus, Stdio};
use std::time::{Duration, Instant};

use common::{CONVERGE, january_rows};
use rtable_e2e::poll::{Check, poll_until};
use rtable_e2e::sidecar_proc::sidecar_binary;
use rtable_e2e::{Cluster, ClusterOptions, SidecarConfig, SidecarProc, serial};
use zookeeper_client as zk;

/// How long a sidecar that must refuse its input may take to exit.
const EXIT_TIMEOUT: Duration = Duration::from_secs(20);

/// Nothing listens here: a sidecar that got as far as connecting would never be ready.
const BOGUS_ZOOKEEPER: &str = "127.0.0.1:1";

/// Environment the sidecar reads its flags from; cleared so only the given flags count.
const FLAG_ENV: [&str; 10] = [
    "RTABLE_TABLE",
    "RTABLE_REPLICA",
    "RTABLE_DATA_DIR",
    "RTABLE_LISTEN",
    "RTABLE_ADVERTISE",
    "RTABLE_ZOOKEEPER",
    "RTABLE_INTERSERVER_SECRET_FILE",
    "RTABLE_ZOOKEEPER_AUTH_FILE",
    "RTABLE_MAX_BODY_BYTES",
    "RTABLE_SESSION_TIMEOUT_MS",
];

/// A finished sidecar run that was expected to fail.
struct Refused {
    status: ExitStatus,
    /// stdout and stderr together.
    output: String,
    took: Duration,
}

/// Runs the sidecar binary with `args` and waits (at most `EXIT_TIMEOUT`, then SIGKILL
/// and panic) for it to exit.
fn run_sidecar(dir: &Path, case: &str, args: &[String]) -> Refused {
    let binary = sidecar_binary().expect("the sidecar binary is built");
    let out_path = dir.join(format!("{case}.stdout"));
    let err_path = dir.join(format!("{case}.stderr"));
    let out = std::fs::File::create(&out_path).expect("create the stdout file");
    let err = std::fs::File::create(&err_path).expect("create the stderr file");
    let mut command = Command::new(&binary);
    rtable_e2e::process::die_with_parent(&mut command);
    for key in FLAG_ENV {
        command.env_remove(key);
    }
    command
        .args(args)
        .env("RUST_LOG", "info")
        .stdin(Stdio::null())
        .stdout(out)
        .stderr(err);
    let started = Instant::now();
    let mut child = command.spawn().expect("spawn the sidecar");
    let status =
        rtable_e2e::process::wait_timeout(&mut child, EXIT_TIMEOUT).expect("wait for the sidecar");
    let took = started.elapsed();
    let read = |p: &Path| std::fs::read_to_string(p).expect("read the captured output");
    let Some(status) = status else {
        let _ = child.kill();
        let _ = child.wait();
        panic!(
            "{case}: `{} {}` still runs after {EXIT_TIMEOUT:?}; it should have refused its input.\nstdout:\n{}\nstderr:\n{}",
            binary.display(),
            args.join(" "),
            read(&out_path),
            read(&err_path)
        );
    };
    Refused {
        status,
        output: format!("{}{}", read(&out_path), read(&err_path)),
        took,
    }
}

/// Every flag a sidecar needs, with `table` as its table file.
fn full_args(table: &Path, data_dir: &Path) -> Vec<String> {
    [
        "--table",
        &table.display().to_string(),
        "--replica",
        "events-0",
        "--data-dir",
        &data_dir.display().to_string(),
        "--listen",
        "127.0.0.1:0",
        "--advertise",
        "127.0.0.1:9009",
        "--zookeeper",
        BOGUS_ZOOKEEPER,
    ]
    .iter()
    .map(|s| s.to_string())
    .collect()
}

/// The example manifest with `from` replaced by `to` (which must change it).
fn example_with(from: &str, to: &str) -> String {
    let path = rtable_e2e::example_manifest();
    let text =
        std::fs::read_to_string(&path).unwrap_or_else(|e| panic!("read {}: {e}", path.display()));
    assert!(
        text.contains(from),
        "{} no longer contains `{from}`",
        path.display()
    );
    text.replace(from, to)
}

fn write(path: &Path, text: &str) -> PathBuf {
    std::fs::write(path, text).unwrap_or_else(|e| panic!("write {}: {e}", path.display()));
    path.to_path_buf()
}

#[test]
fn bad_flags_and_bad_table_files_exit_non_zero_with_the_reason() {
    let _serial = serial();
    let dir = tempfile::tempdir().expect("temp dir");
    let data_dir = dir.path().join("data");
    let good_table = rtable_e2e::example_manifest();

    let missing = dir.path().join("no-such-dir").join("table.yaml");
    let malformed = write(
        &dir.path().join("malformed.yaml"),
        "apiVersion: rtable.io/v1alpha1\nkind: ReplicatedTable\nspec: [columns, {unclosed\n",
    );
    let unknown_type = write(
        &dir.path().join("unknown-type.yaml"),
        &example_with(
            "{name: user_id, type: UInt64}",
            "{name: user_id, type: UInt65}",
        ),
    );
    let missing_sort_column = write(
        &dir.path().join("missing-sort-column.yaml"),
        &example_with("orderBy: [user_id, ts]", "orderBy: [user_id, created_at]"),
    );

    let mut unknown_flag = full_args(&good_table, &data_dir);
    unknown_flag.extend(["--no-such-flag".to_string(), "1".to_string()]);
    // Everything but --table.
    let no_table: Vec<String> = full_args(&good_table, &data_dir)
        .into_iter()
        .skip(2)
        .collect();
    let mut bad_replica = full_args(&good_table, &data_dir);
    bad_replica[3] = "events/0".to_string();

    // (case, args, texts the output must contain)
    let cases: Vec<(&str, Vec<String>, Vec<String>)> = vec![
        (
            "unknown-flag",
            unknown_flag,
            vec!["--no-such-flag".to_string()],
        ),
        (
            "missing-required-flag",
            no_table,
            vec!["required".to_string(), "--table".to_string()],
        ),
        (
            "invalid-replica-name",
            bad_replica,
            vec!["--replica".to_string(), "events/0".to_string()],
        ),
        (
            "table-file-missing",
            full_args(&missing, &data_dir),
            vec![
                "--table".to_string(),
                missing.display().to_string(),
                "No such file".to_string(),
            ],
        ),
        (
            "table-file-malformed",
            full_args(&malformed, &data_dir),
            vec![
                "--table".to_string(),
                malformed.display().to_string(),
                "not valid YAML".to_string(),
                "line 3".to_string(),
            ],
        ),
        (
            "unknown-column-type",
            full_args(&unknown_type, &data_dir),
            vec![
                unknown_type.display().to_string(),
                "spec.columns[1]".to_string(),
                "UInt65".to_string(),
            ],
        ),
        (
            "order-by-names-a-missing-column",
            full_args(&missing_sort_column, &data_dir),
            vec![
                missing_sort_column.display().to_string(),
                "spec.orderBy".to_string(),
                "`created_at`".to_string(),
                "user_id".to_string(),
            ],
        ),
    ];

    let mut failures = Vec::new();
    for (case, args, needles) in &cases {
        let run = run_sidecar(dir.path(), case, args);
        eprintln!(
            "{case}: {} after {:?}: {}",
            run.status,
            run.took,
            run.output.trim()
        );
        if run.status.success() || run.status.code().is_none() {
            failures.push(format!(
                "{case}: exited with {}, expected a non-zero exit code",
                run.status
            ));
        }
        for needle in needles {
            if !run.output.contains(needle.as_str()) {
                failures.push(format!(
                    "{case}: output does not name `{needle}`:\n{}",
                    run.output
                ));
            }
        }
    }
    assert!(failures.is_empty(), "{}", failures.join("\n\n"));
    assert!(
        !data_dir.exists(),
        "a sidecar that refused its flags or table created {}",
        data_dir.display()
    );
}

/// `metadata` and `columns` of the table, with the version each node is at.
async fn definition_nodes(client: &zk::Client, c: &Cluster) -> Vec<(String, Vec<u8>, i32)> {
    let paths = c.paths();
    let mut out = Vec::new();
    for path in [paths.metadata(), paths.columns()] {
        let (data, stat) = client
            .get_data(&path)
            .await
            .unwrap_or_else(|e| panic!("get {path}: {e}"));
        out.push((path, data, stat.version));
    }
    out
}

#[tokio::test]
async fn a_replica_whose_definition_differs_from_the_tree_is_read_only_and_shows_both() {
    let _serial = serial();
    let c = Cluster::start(ClusterOptions::default())
        .await
        .expect("cluster starts");
    let zk = c.zk_client().await.expect("zk client");
    let before = definition_nodes(&zk, &c).await;
    let tree_metadata = String::from_utf8_lossy(&before[0].1).into_owned();
    assert!(
        tree_metadata.contains("primary key: user_id, ts"),
        "{tree_metadata}"
    );
    let replicas_before = zk
        .list_children(&c.paths().replicas())
        .await
        .expect("list replicas");

    // The same table with its sort key reversed.
    let manifest = std::fs::read_to_string(&c.manifest).expect("read the cluster's manifest");
    assert!(manifest.contains("orderBy: [user_id, ts]"), "{manifest}");
    let differing = c.dir().join("table-differs.yaml");
    std::fs::write(
        &differing,
        manifest.replace("orderBy: [user_id, ts]", "orderBy: [ts, user_id]"),
    )
    .expect("write the differing manifest");
    let port = rtable_e2e::ports::free_port().expect("a free port");
    let name = "events-9";
    let mut odd = SidecarProc::spawn(SidecarConfig {
        table: differing,
        replica: name.to_string(),
        data_dir: c.dir().join("replicas").join(name),
        port,
        zookeeper: c.zk.connect_string(),
        session_timeout_ms: 10_000,
        interserver_secret_file: None,
        max_body_bytes: None,
        env: Vec::new(),
        log: c.dir().join(format!("{name}.log")),
    })
    .expect("spawn events-9");

    let client = odd.client().clone();
    let status = poll_until(
        "events-9 to report the definition mismatch",
        Duration::from_secs(30),
        Duration::from_millis(100),
        || {
            let client = client.clone();
            async move {
                let s = match client.status().await {
                    Ok(s) => s,
                    Err(e) => return Ok(Check::Wait(format!("{e:#}"))),
                };
                Ok(match &s.readonly_reason {
                    Some(r) if r.contains("differs") => Check::Done(s),
                    other => Check::Wait(format!("readonly_reason {other:?}")),
                })
            }
        },
    )
    .await
    .unwrap_or_else(|e| {
        panic!(
            "{e:#}\nevents-9 log:\n{}",
            rtable_e2e::tail(odd.log_path(), 40)
        )
    });
    assert!(odd.is_running(), "a mismatch keeps the process running");
    assert!(status.is_readonly, "{status:?}");
    let reason = status.readonly_reason.clone().unwrap_or_default();
    assert!(reason.contains(&c.table_path), "names the table: {reason}");
    assert!(
        reason.contains("primary key: local `ts, user_id` vs tree `user_id, ts`"),
        "names the differing field: {reason}"
    );
    let (local, tree) = reason
        .split_once("--- tree definition ---")
        .unwrap_or_else(|| panic!("the tree's definition is shown: {reason}"));
    let (_, local) = local
        .split_once("--- local definition ---")
        .unwrap_or_else(|| panic!("the local definition is shown: {reason}"));
    assert!(local.contains("primary key: ts, user_id"), "{reason}");
    assert!(tree.contains("primary key: user_id, ts"), "{reason}");
    for column in ["`ts` DateTime", "`user_id` UInt64"] {
        assert!(
            local.contains(column) && tree.contains(column),
            "both show the columns ({column}): {reason}"
        );
    }

    let (code, body) = client.readyz().await.expect("readyz");
    assert_eq!(code, 503, "{body}");
    let insert = client
        .insert_raw(
            "JSONEachRow",
            common::rows(0, 3)
                .iter()
                .map(|r| format!("{r}\n"))
                .collect::<String>(),
            None,
        )
        .await
        .expect("insert answers");
    assert_eq!(insert.status, 503, "{}", insert.text());
    let text = insert.text();
    assert!(text.contains("read-only"), "{text}");
    assert!(text.contains("differs from the one in ZooKeeper"), "{text}");
    assert!(text.contains("primary key"), "{text}");

    // It keeps retrying without touching the tree: a few more attempts, then compare.
    tokio::time::sleep(Duration::from_secs(6)).await;
    let again = client.status().await.expect("status");
    assert!(again.is_readonly, "still read-only: {again:?}");
    assert_eq!(definition_nodes(&zk, &c).await, before, "metadata/columns");
    let replicas_after = zk
        .list_children(&c.paths().replicas())
        .await
        .expect("list replicas");
    assert_eq!(
        replicas_after, replicas_before,
        "the mismatching replica is not registered"
    );
    let rows = c.client(0).select_sorted_lines().await.expect("select");
    assert!(rows.is_empty(), "nothing was inserted: {rows:?}");
    // The real replicas are unaffected.
    for i in 0..3 {
        let s = c.client(i).status().await.expect("status");
        assert!(!s.is_readonly, "{s:?}");
        assert_eq!(s.total_replicas, Some(3), "{s:?}");
    }
    odd.kill().expect("kill events-9");
}

/// Waits until `replica`'s `is_active` node is gone (its session ended).
async fn wait_inactive(zk: &zk::Client, c: &Cluster, replica: &str) {
    let path = c.paths().replica(replica).is_active();
    poll_until(
        &format!("{replica} to be inactive"),
        CONVERGE,
        Duration::from_millis(100),
        || {
            let zk = zk.clone();
            let path = path.clone();
            async move {
                Ok(match zk.check_stat(&path).await? {
                    None => Check::Done(()),
                    Some(_) => Check::Wait(format!("{path} exists")),
                })
            }
        },
    )
    .await
    .unwrap_or_else(|e| panic!("{e:#}"));
}

#[tokio::test]
async fn the_queue_shows_a_postponed_fetch_with_its_reason() {
    let _serial = serial();
    let mut c = Cluster::start(ClusterOptions {
        session_timeout_ms: 3000,
        ..ClusterOptions::default()
    })
    .await
    .expect("cluster starts");
    let zk = c.zk_client().await.expect("zk client");

    // Only events-0 runs when the part is written, then it goes too: events-1 comes back
    // to a GET_PART whose only holder is down.
    c.replicas[1].kill().expect("kill events-1");
    c.replicas[2].kill().expect("kill events-2");
    wait_inactive(&zk, &c, "events-1").await;
    wait_inactive(&zk, &c, "events-2").await;
    let answer = c
        .client(0)
        .insert_json(&january_rows(0, 20))
        .await
        .expect("insert on events-0 alone");
    assert_eq!(answer.parts.len(), 1, "{answer:?}");
    let part = answer.parts[0].clone();
    c.replicas[0].kill().expect("kill events-0");
    wait_inactive(&zk, &c, "events-0").await;

    c.replicas[1].start_again().expect("start events-1");
    c.replicas[1]
        .wait_ready(CONVERGE)
        .await
        .expect("events-1 ready");
    let client = c.client(1).clone();
    let entry = poll_until(
        "events-1 to have tried the GET_PART",
        CONVERGE,
        Duration::from_millis(100),
        || {
            let client = client.clone();
            let part = part.clone();
            async move {
                let queue = client.queue().await?;
                let Some(e) = queue.into_iter().find(|e| e.new_part_name == part) else {
                    return Ok(Check::Wait(format!("no entry for {part} yet")));
                };
                Ok(if e.num_tries >= 1 {
                    Check::Done(e)
                } else {
                    Check::Wait(format!("{e:?}"))
                })
            }
        },
    )
    .await
    .unwrap_or_else(|e| {
        panic!(
            "{e:#}\nevents-1 log:\n{}",
            rtable_e2e::tail(c.replicas[1].log_path(), 40)
        )
    });
    eprintln!("events-1 queue entry: {entry:?}");
    assert_eq!(entry.kind, "GET_PART", "{entry:?}");
    assert_eq!(entry.source_replica, "events-0", "{entry:?}");
    let exception = entry.last_exception.clone().unwrap_or_default();
    let postponed = entry.postpone_reason.clone().unwrap_or_default();
    assert!(exception.contains(&part), "last_exception: {entry:?}");
    assert!(
        postponed.contains(&part) && postponed.contains("No active replica"),
        "postpone_reason: {entry:?}"
    );
    let status = client.status_json().await.expect("status");
    assert!(
        status["postponed_in_queue"].as_u64() >= Some(1),
        "postponed_in_queue: {status}"
    );
    assert_eq!(status["lost_part_count"], 0, "not declared lost: {status}");
    assert!(
        !status["parts"]
            .as_array()
            .expect("parts")
            .iter()
            .any(|p| p == part.as_str()),
        "{status}"
    );

    // The holder comes back: the fetch goes through and everyone converges.
    c.replicas[0].start_again().expect("start events-0");
    c.replicas[0]
        .wait_ready(CONVERGE)
        .await
        .expect("events-0 ready");
    c.replicas[2].start_again().expect("start events-2");
    c.replicas[2]
        .wait_ready(CONVERGE)
        .await
        .expect("events-2 ready");
    let lines = c
        .wait_converged_rows(20, CONVERGE)
        .await
        .expect("converged after events-0 returned");
    assert_eq!(common::user_ids(&lines), (0..20).collect::<Vec<u64>>());
    let s = c.client(1).status().await.expect("status");
    assert_eq!(s.queue_size, 0, "{s:?}");
    assert!(s.parts.contains(&part), "events-1 holds {part}: {s:?}");
    assert!(c.client(1).queue().await.expect("queue").is_empty());
}

/// The queue executor panics once at its start (the `executor_panics` failpoint): the
/// supervisor logs it, counts the restart in `/metrics` and starts it again, after which
/// `/readyz` is 200 and the replica still replicates what another replica inserts.
#[tokio::test]
async fn a_queue_executor_that_panicked_is_restarted_and_replicates() {
    let _serial = serial();
    let mut c = Cluster::start(ClusterOptions {
        replicas: 2,
        env: vec![(
            "RTABLE_FAILPOINTS".to_string(),
            "executor_panics".to_string(),
        )],
        ..ClusterOptions::default()
    })
    .await
    .expect("cluster starts");
    let client = c.client(0).clone();
    let restarted = "rtable_task_restarts_total{replica=\"events-0\",task=\"queue_executor\"} 1";
    let up = "rtable_task_up{replica=\"events-0\",task=\"queue_executor\"} 1";
    poll_until(
        "events-0 to count the executor's restart",
        CONVERGE,
        Duration::from_millis(100),
        || {
            let client = client.clone();
            async move {
                let text = client.metrics().await?;
                let lines: Vec<&str> = text.lines().collect();
                Ok(if lines.contains(&restarted) && lines.contains(&up) {
                    Check::Done(())
                } else {
                    Check::Wait(
                        lines
                            .iter()
                            .filter(|l| l.starts_with("rtable_task_"))
                            .copied()
                            .collect::<Vec<_>>()
                            .join(", "),
                    )
                })
            }
        },
    )
    .await
    .unwrap_or_else(|e| panic!("{e:#}\n{}", rtable_e2e::tail(c.replicas[0].log_path(), 40)));
    let log = std::fs::read_to_string(c.replicas[0].log_path()).expect("events-0 log");
    assert!(
        log.lines().any(|l| l.contains("background task failed")
            && l.contains("queue_executor")
            && l.contains("panicked: failpoint executor_panics")),
        "the supervisor logs the panic naming the task:\n{}",
        rtable_e2e::tail(c.replicas[0].log_path(), 40)
    );

    let answer = c
        .client(1)
        .insert_json(&january_rows(0, 20))
        .await
        .expect("insert on events-1");
    assert_eq!(answer.parts.len(), 1, "{answer:?}");
    let lines = c
        .wait_converged_rows(20, CONVERGE)
        .await
        .expect("events-0 fetches the part with its restarted executor");
    assert_eq!(common::user_ids(&lines), (0..20).collect::<Vec<u64>>());
    let s = c.client(0).status().await.expect("status");
    assert!(s.parts.contains(&answer.parts[0]), "{s:?}");
    assert_eq!(
        c.client(0).readyz().await.expect("readyz"),
        (200, "ready\n".to_string())
    );
    let text = c.client(0).metrics().await.expect("metrics");
    assert!(
        text.lines().any(|l| l == restarted),
        "restarted once, not again: {text}"
    );
}
