//! Replication with a real 3-node ZooKeeper ensemble and three sidecar processes.

mod common;

use std::collections::BTreeSet;
use std::sync::Arc;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::time::Duration;

use common::{CONVERGE, january_rows, python, rows, tree_snapshot, user_ids};
use rtable_e2e::client::{json_lines, metric_value};
use rtable_e2e::poll::{Check, poll_until};
use rtable_e2e::{Cluster, ClusterOptions, serial};

async fn cluster(opts: ClusterOptions) -> Cluster {
    Cluster::start(opts).await.expect("cluster starts")
}

async fn metric_sum(c: &Cluster, name: &str) -> f64 {
    let mut sum = 0.0;
    for r in &c.replicas {
        let text = r.client().metrics().await.expect("metrics");
        sum += metric_value(&text, name).unwrap_or_else(|| panic!("{name} in /metrics:\n{text}"));
    }
    sum
}

#[tokio::test]
async fn inserts_spread_over_all_replicas_converge_to_identical_rows() {
    let _serial = serial();
    let mut c = cluster(ClusterOptions::default()).await;

    // 30 inserts of 5 rows, round-robin over the replicas, 3 at a time.
    let mut expected = Vec::new();
    for round in 0..10u64 {
        let mut pending = Vec::new();
        for i in 0..3usize {
            let first = (round * 3 + i as u64) * 5;
            let batch = rows(first, 5);
            expected.extend(first..first + 5);
            let client = c.client(i).clone();
            pending.push(async move { client.insert_json(&batch).await });
        }
        for answer in futures::future::join_all(pending).await {
            let answer = answer.expect("insert");
            assert_eq!(answer.rows, 5);
            assert!(!answer.deduplicated);
            assert!(!answer.parts.is_empty());
        }
    }
    let lines = c
        .wait_converged_rows(150, CONVERGE)
        .await
        .expect("converged");
    expected.sort_unstable();
    assert_eq!(user_ids(&lines), expected);

    // Byte-identical JSONEachRow output (as sorted line sets) and identical status.
    let mut statuses = Vec::new();
    for r in &c.replicas {
        statuses.push(r.client().status().await.expect("status"));
    }
    let log_max = statuses[0].log_max_index.expect("log has entries");
    for s in &statuses {
        assert_eq!(s.rows, 150, "{}", s.replica_name);
        assert_eq!(s.queue_size, 0);
        assert!(!s.is_readonly);
        assert_eq!(s.total_replicas, Some(3));
        assert_eq!(s.active_replicas, Some(3));
        assert_eq!(s.log_max_index, Some(log_max));
        // ClickHouse's log_pointer is the next entry to copy.
        assert_eq!(s.log_pointer, Some(log_max + 1), "{}", s.replica_name);
    }
    // The operator reads the same replies into its own type (its status input).
    for r in &c.replicas {
        let raw = r.client().status_json().await.expect("status json");
        let seen: rtable_operator::status::SidecarStatus =
            serde_json::from_value(raw.clone()).expect("the operator parses a real /status");
        assert_eq!(seen.rows, 150);
        assert_eq!(seen.queue_size, 0);
        assert_eq!(
            seen.parts_count,
            raw["parts_count"].as_u64().expect("count")
        );
        assert!(seen.parts_count > 0);
        assert_eq!(seen.log_pointer, Some(log_max + 1));
        assert_eq!(seen.active_replicas, Some(3));
    }
    assert_eq!(metric_sum(&c, "rtable_inserts_total").await, 30.0);
    assert!(metric_sum(&c, "rtable_fetches_total").await > 0.0);
    assert_eq!(metric_sum(&c, "rtable_failed_fetches_total").await, 0.0);
    // Small parts reach peers by push (and are still recorded by their log entries, which
    // the log_pointer and queue checks above cover).
    assert!(metric_sum(&c, "rtable_pushed_parts_taken_total").await > 0.0);
}

#[tokio::test]
async fn a_replica_killed_with_sigkill_catches_up_after_restart() {
    let _serial = serial();
    let mut c = cluster(ClusterOptions {
        session_timeout_ms: 3000,
        ..ClusterOptions::default()
    })
    .await;
    c.client(0).insert_json(&rows(0, 10)).await.expect("insert");
    c.wait_converged_rows(10, CONVERGE)
        .await
        .expect("converged");

    c.replicas[2].kill().expect("SIGKILL events-2");
    // The others see it go (its is_active vanishes with the session).
    let survivor = c.client(0).clone();
    poll_until(
        "events-2 to be inactive",
        CONVERGE,
        Duration::from_millis(200),
        || {
            let survivor = survivor.clone();
            async move {
                let s = survivor.status().await?;
                Ok(if s.active_replicas == Some(2) {
                    Check::Done(())
                } else {
                    Check::Wait(format!("active_replicas {:?}", s.active_replicas))
                })
            }
        },
    )
    .await
    .expect("events-2 inactive");

    for k in 0..10u64 {
        let i = (k % 2) as usize;
        c.client(i)
            .insert_json(&rows(10 + k * 10, 10))
            .await
            .expect("insert while events-2 is down");
    }
    c.wait_converged_rows(110, CONVERGE)
        .await
        .expect("the two live replicas converge");

    c.replicas[2].start_again().expect("restart events-2");
    c.replicas[2]
        .wait_ready(CONVERGE)
        .await
        .expect("events-2 ready again");
    let lines = c
        .wait_converged_rows(110, CONVERGE)
        .await
        .expect("events-2 caught up");
    assert_eq!(user_ids(&lines), (0..110).collect::<Vec<u64>>());
    let s = c.client(2).status().await.expect("status");
    assert_eq!(s.rows, 110);
    assert_eq!(s.active_replicas, Some(3));
    // Its parts are on its own disk.
    for part in &s.parts {
        let file = c.replicas[2]
            .data_dir()
            .join("parts")
            .join(part)
            .join("data.parquet");
        assert!(file.exists(), "{} missing", file.display());
    }
}

#[tokio::test]
async fn retried_inserts_are_deduplicated_by_data_and_by_token() {
    let _serial = serial();
    let mut c = cluster(ClusterOptions::default()).await;
    let body = json_lines(&january_rows(0, 4));

    let first = c
        .client(0)
        .insert("JSONEachRow", body.clone(), None)
        .await
        .expect("insert");
    assert!(!first.deduplicated);
    assert_eq!(first.rows, 4);
    let log_max = c.client(0).status().await.expect("status").log_max_index;

    // The same data again, on another replica: acknowledged, nothing new in the log.
    let again = c
        .client(1)
        .insert("JSONEachRow", body.clone(), None)
        .await
        .expect("retry");
    assert!(again.deduplicated, "{again:?}");
    assert_eq!(
        c.client(1).status().await.expect("status").log_max_index,
        log_max
    );

    // A token identifies the insert whatever its bytes.
    let tokened = c
        .client(2)
        .insert(
            "JSONEachRow",
            json_lines(&january_rows(100, 3)),
            Some("batch-7"),
        )
        .await
        .expect("token insert");
    assert!(!tokened.deduplicated);
    let log_max = c.client(2).status().await.expect("status").log_max_index;
    let retried = c
        .client(0)
        .insert(
            "JSONEachRow",
            json_lines(&january_rows(200, 3)),
            Some("batch-7"),
        )
        .await
        .expect("token retry with other rows");
    assert!(retried.deduplicated, "{retried:?}");
    assert_eq!(
        c.client(0).status().await.expect("status").log_max_index,
        log_max
    );

    let lines = c.wait_converged_rows(7, CONVERGE).await.expect("converged");
    assert_eq!(user_ids(&lines), [0, 1, 2, 3, 100, 101, 102]);
    assert_eq!(
        metric_sum(&c, "rtable_deduplicated_inserts_total").await,
        2.0
    );
}

/// GET_PART entries in the shared log.
async fn get_entries(zk: &zookeeper_client::Client, log: &str) -> usize {
    let mut n = 0;
    for child in zk.list_children(log).await.expect("list log") {
        let (data, _) = zk
            .get_data(&format!("{log}/{child}"))
            .await
            .expect("log entry");
        if String::from_utf8_lossy(&data).contains("\nget\n") {
            n += 1;
        }
    }
    n
}

#[tokio::test]
async fn concurrent_small_inserts_share_parts_and_keep_their_own_dedup() {
    let _serial = serial();
    // Pushing off: every part goes through the log pull's prefetch or the queue's fetch.
    let mut c = cluster(ClusterOptions {
        env: vec![("RTABLE_PUSH_MAX_BYTES".to_string(), "0".to_string())],
        ..ClusterOptions::default()
    })
    .await;
    const N: u64 = 48;
    let bodies: Vec<String> = (0..N)
        .map(|i| json_lines(&january_rows(i * 3, 3)))
        .collect();
    let send_all = |replica: usize| {
        let client = c.client(replica).clone();
        let bodies = bodies.clone();
        async move {
            futures::future::join_all(bodies.into_iter().map(|body| {
                let client = client.clone();
                async move { client.insert("JSONEachRow", body, None).await }
            }))
            .await
        }
    };

    let first: Vec<_> = send_all(0)
        .await
        .into_iter()
        .map(|a| a.expect("insert"))
        .collect();
    let mut parts = BTreeSet::new();
    for a in &first {
        assert_eq!(a.rows, 3, "{a:?}");
        assert!(!a.deduplicated, "{a:?}");
        assert_eq!(a.parts.len(), 1, "{a:?}");
        parts.insert(a.parts[0].clone());
    }
    assert!(
        parts.len() < N as usize,
        "{N} concurrent inserts made {} parts: no part was shared",
        parts.len()
    );
    let zk = c.zk_client().await.expect("zk");
    let gets_before = get_entries(&zk, &c.paths().log()).await;
    assert_eq!(gets_before, parts.len(), "one GET_PART per shared part");

    // Every insert retried at once on another replica: each one alone is a duplicate of
    // its own first attempt, even though its rows sit in a part shared with others.
    let retried = send_all(1).await;
    for (a, b) in first.iter().zip(retried) {
        let b = b.expect("retry");
        assert!(b.deduplicated, "{b:?}");
        assert_eq!(b.parts, a.parts);
    }
    // No new part entered the log (merges of the shared parts may have).
    assert_eq!(get_entries(&zk, &c.paths().log()).await, gets_before);
    let lines = c
        .wait_converged_rows(3 * N as usize, CONVERGE)
        .await
        .expect("converged");
    assert_eq!(user_ids(&lines), (0..3 * N).collect::<Vec<_>>());
    assert_eq!(
        metric_sum(&c, "rtable_pushed_parts_taken_total").await,
        0.0,
        "pushing is off"
    );
    assert!(metric_sum(&c, "rtable_fetches_total").await > 0.0);
}

#[tokio::test]
async fn with_zookeeper_down_inserts_get_503_and_the_retry_lands_once() {
    let _serial = serial();
    let mut c = cluster(ClusterOptions {
        session_timeout_ms: 4000,
        ..ClusterOptions::default()
    })
    .await;
    c.client(0).insert_json(&rows(0, 3)).await.expect("insert");
    c.wait_converged_rows(3, CONVERGE).await.expect("converged");

    c.zk.kill_all().expect("kill the ensemble");
    let body = json_lines(&rows(500, 2));
    let started = std::time::Instant::now();
    let answer = c
        .client(0)
        .insert_raw("JSONEachRow", body.clone(), Some("zk-down"))
        .await
        .expect("answered");
    assert_eq!(answer.status, 503, "{}", answer.text());
    let text = answer.text();
    assert!(
        text.contains("retry") && (text.contains("ZooKeeper") || text.contains("read-only")),
        "the 503 says why and what to do: {text}"
    );
    assert!(
        started.elapsed() < Duration::from_secs(30),
        "answered in {:?}",
        started.elapsed()
    );
    let (status, reason) = c.client(0).readyz().await.expect("readyz");
    assert_eq!(status, 503, "not ready without ZooKeeper: {reason}");

    // The ensemble comes back: the replica re-activates by itself and the retry (same
    // token) lands exactly once whether or not the first attempt was committed.
    c.zk.start_stopped(Duration::from_secs(60))
        .expect("ensemble back");
    c.replicas[0]
        .wait_ready(CONVERGE)
        .await
        .expect("ready again");
    let retry = c
        .client(0)
        .insert("JSONEachRow", body, Some("zk-down"))
        .await
        .expect("retry");
    assert_eq!(retry.rows, 2);
    let lines = c.wait_converged_rows(5, CONVERGE).await.expect("converged");
    assert_eq!(user_ids(&lines), [0, 1, 2, 500, 501]);
}

#[tokio::test]
async fn session_expiry_by_sigstop_makes_a_replica_readonly_and_it_recovers_without_restart() {
    let _serial = serial();
    let mut c = cluster(ClusterOptions {
        session_timeout_ms: 3000,
        ..ClusterOptions::default()
    })
    .await;
    c.client(0).insert_json(&rows(0, 6)).await.expect("insert");
    c.wait_converged_rows(6, CONVERGE).await.expect("converged");

    let zk = c.zk_client().await.expect("zk");
    let is_active = c.paths().replica("events-2").is_active();
    let owner_before = zk
        .check_stat(&is_active)
        .await
        .expect("stat")
        .expect("events-2 active")
        .ephemeral_owner;
    let pid = c.replicas[2].pid().expect("pid");

    c.replicas[2].stop().expect("SIGSTOP");
    // ZooKeeper expires the frozen replica's session: its is_active disappears.
    let zk2 = zk.clone();
    let path = is_active.clone();
    let expired = poll_until(
        "the session to expire",
        Duration::from_secs(30),
        Duration::from_millis(100),
        || {
            let zk2 = zk2.clone();
            let path = path.clone();
            async move {
                Ok(match zk2.check_stat(&path).await? {
                    None => Check::Done(()),
                    Some(_) => Check::Wait("is_active still there".into()),
                })
            }
        },
    )
    .await;
    // Keep it frozen past the timeout in any case, then let it run on.
    tokio::time::sleep(Duration::from_secs(1)).await;
    // An insert sent while frozen is answered once it runs again, on its expired session.
    let frozen_client = c.client(2).clone();
    let pending = tokio::spawn(async move {
        frozen_client
            .insert_raw(
                "JSONEachRow",
                json_lines(&rows(1000, 1)),
                Some("during-expiry"),
            )
            .await
    });
    tokio::time::sleep(Duration::from_millis(300)).await;
    c.replicas[2].cont().expect("SIGCONT");
    expired.expect("session expired while stopped");

    let mut saw_readonly = Vec::new();
    let answer = pending.await.expect("join").expect("insert answered");
    if answer.status == 503 {
        saw_readonly.push(format!("insert 503: {}", answer.text()));
    } else {
        assert_eq!(answer.status, 200, "{}", answer.text());
    }
    // It rebuilds its session by itself.
    let client = c.client(2).clone();
    let recovered = poll_until(
        "events-2 to recover",
        CONVERGE,
        Duration::from_millis(20),
        || {
            let client = client.clone();
            async move {
                let s = client.status_json().await?;
                if s["is_readonly"] == true || s["is_session_expired"] == true {
                    return Ok(Check::Wait(format!("readonly: {}", s["readonly_reason"])));
                }
                Ok(Check::Done(s))
            }
        },
    )
    .await
    .expect("recovered");
    assert_eq!(recovered["is_readonly"], false);
    let log = rtable_e2e::tail(c.replicas[2].log_path(), 400);
    if log.to_lowercase().contains("expired") {
        saw_readonly.push("log mentions the expired session".into());
    }
    assert!(
        !saw_readonly.is_empty(),
        "the replica never showed it lost its session (no 503, no log line)"
    );
    assert_eq!(c.replicas[2].pid(), Some(pid), "same process, no restart");
    assert!(c.replicas[2].is_running());
    let owner_after = zk
        .check_stat(&is_active)
        .await
        .expect("stat")
        .expect("events-2 active again")
        .ephemeral_owner;
    assert_ne!(owner_after, owner_before, "a new session owns is_active");

    // Writable again, and the cluster converges including the retried insert.
    c.replicas[2].wait_ready(CONVERGE).await.expect("ready");
    let retry = c
        .client(2)
        .insert(
            "JSONEachRow",
            json_lines(&rows(1000, 1)),
            Some("during-expiry"),
        )
        .await
        .expect("insert after recovery");
    assert_eq!(retry.rows, 1);
    c.client(2)
        .insert_json(&rows(2000, 2))
        .await
        .expect("insert");
    let lines = c.wait_converged_rows(9, CONVERGE).await.expect("converged");
    assert_eq!(user_ids(&lines), [0, 1, 2, 3, 4, 5, 1000, 2000, 2001]);
}

#[tokio::test]
async fn bad_inputs_get_4xx_naming_line_and_column_and_change_nothing() {
    let _serial = serial();
    let mut c = cluster(ClusterOptions {
        max_body_bytes: Some(4096),
        ..ClusterOptions::default()
    })
    .await;
    c.client(0)
        .insert_json(&january_rows(0, 2))
        .await
        .expect("insert");
    c.wait_converged_rows(2, CONVERGE).await.expect("converged");

    let zk = c.zk_client().await.expect("zk");
    let tree_before = tree_snapshot(&zk, &c.table_path).await;
    let status_before = c.client(1).status().await.expect("status");
    let inserts_before = metric_sum(&c, "rtable_inserts_total").await;

    let good = r#"{"ts":"2025-01-01 00:00:00","user_id":1,"event":"a","value":1.5}"#;
    let big = format!("{good}\n").repeat(100);
    // (format, body, expected status, expected line, expected column)
    type Case<'a> = (&'a str, String, u16, Option<u64>, Option<&'a str>);
    let cases: Vec<Case> = vec![
        (
            "JSONEachRow",
            format!("{good}\n{{\"ts\": \n"),
            400,
            Some(2),
            None,
        ),
        (
            "JSONEachRow",
            format!("{good}\n{good}\n{}", good.replace("\"event\"", "\"nope\"")),
            400,
            Some(3),
            Some("nope"),
        ),
        (
            "JSONEachRow",
            r#"{"ts":"2025-01-01 00:00:00","event":"a"}"#.to_string(),
            400,
            Some(1),
            Some("user_id"),
        ),
        (
            "JSONEachRow",
            format!(
                "{good}\n{}",
                good.replace("\"user_id\":1", "\"user_id\":\"abc\"")
            ),
            400,
            Some(2),
            Some("user_id"),
        ),
        (
            "JSONEachRow",
            good.replace("\"user_id\":1", "\"user_id\":-1"),
            400,
            Some(1),
            Some("user_id"),
        ),
        (
            "JSONEachRow",
            good.replace("2025-01-01 00:00:00", "yesterday"),
            400,
            Some(1),
            Some("ts"),
        ),
        (
            "CSV",
            "2025-01-01 00:00:00,1,a,1.5\n2025-01-01 00:00:00,x,a,1.5\n".to_string(),
            400,
            Some(2),
            Some("user_id"),
        ),
        ("JSONEachRow", big, 413, None, None),
        ("TabSeparated", good.to_string(), 400, None, None),
    ];
    for (format, body, status, line, column) in cases {
        let r = c
            .client(0)
            .insert_raw(format, body.clone(), None)
            .await
            .expect("answered");
        let what = format!("{format} {:?}", body.chars().take(80).collect::<String>());
        assert_eq!(r.status, status, "{what}: {}", r.text());
        let json = r
            .json()
            .unwrap_or_else(|e| panic!("{what}: error body is JSON: {e:#}"));
        let error = json["error"]
            .as_str()
            .unwrap_or_else(|| panic!("{what}: `error` string in {json}"));
        assert!(!error.is_empty());
        if let Some(line) = line {
            assert_eq!(json["line"].as_u64(), Some(line), "{what}: {json}");
        }
        if let Some(column) = column {
            assert_eq!(json["column"].as_str(), Some(column), "{what}: {json}");
            assert!(
                error.contains(column),
                "{what}: the message names `{column}`: {error}"
            );
        }
    }

    // Nothing was committed anywhere.
    let tree_after = tree_snapshot(&zk, &c.table_path).await;
    let changed: Vec<&String> = tree_before
        .iter()
        .filter(|(k, v)| tree_after.get(*k) != Some(v))
        .map(|(k, _)| k)
        .chain(tree_after.keys().filter(|k| !tree_before.contains_key(*k)))
        .collect();
    assert!(
        changed.is_empty(),
        "the ZooKeeper tree changed: {changed:?}"
    );
    let status_after = c.client(1).status().await.expect("status");
    assert_eq!(status_after.log_max_index, status_before.log_max_index);
    assert_eq!(status_after.parts, status_before.parts);
    assert_eq!(metric_sum(&c, "rtable_inserts_total").await, inserts_before);
    let lines = c
        .wait_converged_rows(2, CONVERGE)
        .await
        .expect("still 2 rows");
    assert_eq!(user_ids(&lines), [0, 1]);
}

#[tokio::test]
async fn interserver_requests_need_the_secret_and_a_safe_part_name() {
    let _serial = serial();
    let mut c = cluster(ClusterOptions {
        interserver_secret: Some("s3cret-for-tests".into()),
        ..ClusterOptions::default()
    })
    .await;
    let answer = c
        .client(0)
        .insert_json(&january_rows(0, 20))
        .await
        .expect("insert");
    assert_eq!(answer.parts.len(), 1);
    let part = answer.parts[0].clone();
    // Replication itself works with the secret.
    c.wait_converged_rows(20, CONVERGE)
        .await
        .expect("converged");

    let client = c.client(0);
    let r = client.get_part(&part, None).await.expect("answered");
    assert_eq!(r.status, 401, "{}", r.text());
    let r = client
        .get_part(&part, Some("wrong"))
        .await
        .expect("answered");
    assert_eq!(r.status, 401, "{}", r.text());

    let secret = c.secret.clone();
    let r = client
        .get_part(&part, secret.as_deref())
        .await
        .expect("answered");
    assert_eq!(r.status, 200, "{}", r.text());
    // The exchange format: magic line, `name\tsize\thash` lines, empty line, the bytes.
    let body = r.body;
    let end = body
        .windows(2)
        .position(|w| w == b"\n\n")
        .expect("header terminated by an empty line");
    let header = std::str::from_utf8(&body[..end]).expect("UTF-8 header");
    let mut lines = header.lines();
    assert_eq!(lines.next(), Some("rtable-part-exchange 1"));
    let mut offset = end + 2;
    let mut names = BTreeSet::new();
    for line in lines {
        let fields: Vec<&str> = line.split('\t').collect();
        assert_eq!(fields.len(), 3, "{line}");
        let size: usize = fields[1].parse().expect("size");
        let bytes = &body[offset..offset + size];
        assert_eq!(
            rtable_protocol::hash::file_hash(bytes).to_hex(),
            fields[2],
            "hash of {}",
            fields[0]
        );
        let on_disk = std::fs::read(
            c.replicas[0]
                .data_dir()
                .join("parts")
                .join(&part)
                .join(fields[0]),
        )
        .expect("file on disk");
        assert_eq!(on_disk, bytes, "{} sent as stored", fields[0]);
        offset += size;
        names.insert(fields[0].to_string());
    }
    assert_eq!(offset, body.len(), "no bytes after the last file");
    assert!(names.contains("data.parquet"), "{names:?}");
    assert!(names.contains("checksums.txt"), "{names:?}");

    // (`..` alone, even as `%2E%2E`, cannot be sent: URL parsers resolve dot segments.)
    for unsafe_name in [
        "..%2Fetc",
        "a%2Fb",
        "%2Fetc%2Fpasswd",
        "202501_1_1_0%2F..%2F..%2Fx",
    ] {
        let r = client
            .get_part(unsafe_name, secret.as_deref())
            .await
            .expect("answered");
        assert_eq!(r.status, 400, "{unsafe_name}: {}", r.text());
        assert!(r.json().expect("JSON error")["error"].is_string());
    }
    let r = client
        .get_part("202501_999_999_0", secret.as_deref())
        .await
        .expect("answered");
    assert_eq!(r.status, 404, "{}", r.text());

    // Pushes need the secret and a safe name too, and one whose log entry the replica
    // pulled already is declined (the entry fetched or holds it) without reading it.
    let peer = c.client(1);
    let r = peer
        .push_part(&part, "events-0", 0, body.clone(), None)
        .await
        .expect("answered");
    assert_eq!(r.status, 401, "{}", r.text());
    let r = peer
        .push_part("..%2Fetc", "events-0", 0, body.clone(), secret.as_deref())
        .await
        .expect("answered");
    assert_eq!(r.status, 400, "{}", r.text());
    let r = peer
        .push_part(
            "202501_998_998_0",
            "events-0",
            0,
            b"garbage".to_vec(),
            secret.as_deref(),
        )
        .await
        .expect("answered");
    assert_eq!(r.status, 200, "{}", r.text());
    let answer = r.json().expect("JSON answer");
    assert_eq!(answer["taken"], false, "{answer}");
    assert_eq!(
        answer["reason"], "its log entry was pulled already",
        "{answer}"
    );
    let r = peer
        .push_part(&part, "events-0", 0, body, secret.as_deref())
        .await
        .expect("answered");
    assert_eq!(r.json().expect("JSON answer")["reason"], "held already");
    // A push of garbage for an entry not pulled yet is read, refused, and leaves nothing.
    let r = peer
        .push_part(
            "202501_998_998_0",
            "events-0",
            1_000_000,
            b"garbage".to_vec(),
            secret.as_deref(),
        )
        .await
        .expect("answered");
    assert_eq!(r.json().expect("JSON answer")["taken"], false);
    let leftovers: Vec<String> = std::fs::read_dir(c.replicas[1].data_dir().join("parts"))
        .expect("parts dir")
        .flatten()
        .map(|e| e.file_name().to_string_lossy().into_owned())
        .filter(|n| n.contains("202501_998_998_0"))
        .collect();
    assert!(leftovers.is_empty(), "{leftovers:?}");
}

/// A fake peer that serves the real part from `upstream` with one byte flipped.
async fn start_tampering_peer(upstream: String, hits: Arc<AtomicUsize>) -> u16 {
    use axum::extract::Path;
    use axum::http::StatusCode;
    use axum::response::IntoResponse;

    let listener = tokio::net::TcpListener::bind("127.0.0.1:0")
        .await
        .expect("bind the fake peer");
    let port = listener.local_addr().expect("addr").port();
    let app = axum::Router::new().route(
        "/parts/{name}",
        axum::routing::get(move |Path(name): Path<String>| {
            let upstream = upstream.clone();
            let hits = hits.clone();
            async move {
                hits.fetch_add(1, Ordering::SeqCst);
                let real = reqwest::get(format!("{upstream}/parts/{name}"))
                    .await
                    .expect("upstream answers");
                let status = real.status().as_u16();
                let mut body = real.bytes().await.expect("upstream body").to_vec();
                if status == 200 {
                    let start = body
                        .windows(2)
                        .position(|w| w == b"\n\n")
                        .expect("exchange header")
                        + 2;
                    // Flip a byte in the middle of the first file's bytes.
                    let at = start + (body.len() - start) / 3;
                    body[at] ^= 0x55;
                }
                (
                    StatusCode::from_u16(status).expect("status"),
                    bytes::Bytes::from(body),
                )
                    .into_response()
            }
        }),
    );
    tokio::spawn(async move {
        let _ = axum::serve(listener, app).await;
    });
    port
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_part_tampered_with_in_transit_is_rejected_then_fetched_intact() {
    let _serial = serial();
    let mut c = cluster(ClusterOptions::default()).await;
    c.client(0)
        .insert_json(&january_rows(0, 5))
        .await
        .expect("insert");
    c.wait_converged_rows(5, CONVERGE).await.expect("converged");

    // events-2 goes down; a new part is written while it is away.
    c.replicas[2].kill().expect("SIGKILL events-2");
    let answer = c
        .client(0)
        .insert_json(&january_rows(100, 50))
        .await
        .expect("insert");
    let part = answer.parts[0].clone();
    c.wait_converged_rows(55, CONVERGE)
        .await
        .expect("events-0/1 converged");

    // Every holder of the part now advertises the tampering peer.
    let hits = Arc::new(AtomicUsize::new(0));
    let fake_port = start_tampering_peer(c.replicas[0].url(), hits.clone()).await;
    let zk = c.zk_client().await.expect("zk");
    let mut saved = Vec::new();
    for name in ["events-0", "events-1"] {
        let host_path = c.paths().replica(name).host();
        let (text, _) = zk.get_data(&host_path).await.expect("host");
        let text = String::from_utf8(text).expect("utf-8");
        let real_port = c.replicas[if name == "events-0" { 0 } else { 1 }].cfg.port;
        let fake = text.replace(
            &format!("port: {real_port}\n"),
            &format!("port: {fake_port}\n"),
        );
        assert_ne!(fake, text, "host node names the port: {text}");
        zk.set_data(&host_path, fake.as_bytes(), None)
            .await
            .expect("rewrite host");
        saved.push((host_path, text));
    }

    c.replicas[2].start_again().expect("restart events-2");
    let client = c.client(2).clone();
    let part2 = part.clone();
    let entry = poll_until(
        "a failed fetch of the tampered part",
        CONVERGE,
        Duration::from_millis(100),
        || {
            let client = client.clone();
            let part = part2.clone();
            async move {
                let queue = client.queue().await?;
                let entry = queue.into_iter().find(|e| e.new_part_name == part);
                Ok(match entry {
                    Some(e)
                        if e.num_tries > 0
                            && e.last_exception.as_deref().is_some_and(|x| !x.is_empty()) =>
                    {
                        Check::Done(e)
                    }
                    Some(e) => Check::Wait(format!(
                        "entry tries {} exception {:?}",
                        e.num_tries, e.last_exception
                    )),
                    None => Check::Wait("no queue entry for the part yet".into()),
                })
            }
        },
    )
    .await
    .expect("the fetch failed");
    let exception = entry
        .last_exception
        .clone()
        .unwrap_or_default()
        .to_lowercase();
    assert!(
        exception.contains("hash") || exception.contains("checksum"),
        "the failure names the hash: {exception}"
    );
    assert!(
        hits.load(Ordering::SeqCst) >= 1,
        "the fake peer served the fetch"
    );
    let s = c.client(2).status().await.expect("status");
    assert!(
        !s.parts.contains(&part),
        "{part} must not be active: {:?}",
        s.parts
    );
    assert!(!c.replicas[2].data_dir().join("parts").join(&part).exists());
    assert!(
        c.client(2)
            .metric("rtable_failed_fetches_total")
            .await
            .expect("metrics")
            .unwrap_or(0.0)
            >= 1.0
    );

    // With the real addresses back, the retry fetches the intact part.
    for (path, text) in saved {
        zk.set_data(&path, text.as_bytes(), None)
            .await
            .expect("restore host");
    }
    let lines = c
        .wait_converged_rows(55, Duration::from_secs(120))
        .await
        .expect("converged");
    assert_eq!(user_ids(&lines).len(), 55);
    let s = c.client(2).status().await.expect("status");
    assert!(s.parts.iter().any(|p| p == &part) || s.rows == 55);
}

#[tokio::test]
async fn duckdb_reads_part_files_and_the_parquet_export() {
    let _serial = serial();
    let mut c = cluster(ClusterOptions::default()).await;
    for k in 0..4u64 {
        c.client(k as usize % 3)
            .insert_json(&rows(k * 25, 25))
            .await
            .expect("insert");
    }
    // A Parquet body written by pyarrow and a CSVWithNames body are accepted too.
    let upload = c.dir().join("upload.parquet");
    python(&format!(
        "import pyarrow as pa, pyarrow.parquet as pq, datetime as dt\n\
         utc = dt.timezone.utc\n\
         t = pa.table({{'ts': pa.array([dt.datetime(2025, 1, 5, 9, 0, i, tzinfo=utc) for i in range(10)], pa.timestamp('s', tz='UTC')),\n\
         'user_id': pa.array(range(100, 110), pa.uint64()),\n\
         'event': ['parquet'] * 10,\n\
         'value': pa.array([None if i % 3 == 0 else i / 4 for i in range(100, 110)], pa.float64())}})\n\
         pq.write_table(t, '{}')",
        upload.display()
    ));
    let body = std::fs::read(&upload).expect("read the pyarrow file");
    let answer = c
        .client(1)
        .insert("Parquet", body, None)
        .await
        .expect("Parquet insert");
    assert_eq!(answer.rows, 10);
    let csv = "ts,user_id,event,value\n2025-02-03 04:05:06,110,csv,\\N\n2025-02-03 04:05:07,111,csv,0.5\n";
    let answer = c
        .client(2)
        .insert("CSVWithNames", csv, None)
        .await
        .expect("CSVWithNames insert");
    assert_eq!(answer.rows, 2);
    c.wait_converged_rows(112, CONVERGE)
        .await
        .expect("converged");
    let expected_sum: u64 = (0..112).sum();

    // The active part files on a replica that fetched them.
    let parts = c.client(1).status().await.expect("status").parts;
    assert!(!parts.is_empty());
    let files: Vec<String> = parts
        .iter()
        .map(|p| {
            let f = c.replicas[1]
                .data_dir()
                .join("parts")
                .join(p)
                .join("data.parquet");
            format!("'{}'", f.display())
        })
        .collect();
    let out = python(&format!(
        "import duckdb; print(duckdb.sql(\"SELECT count(*), sum(user_id), count(DISTINCT strftime(ts, '%Y%m')) FROM read_parquet([{}])\").fetchall()[0])",
        files.join(", ")
    ));
    assert_eq!(out, format!("(112, {expected_sum}, 2)"));

    // The export.
    let export = c.client(2).select("Parquet").await.expect("select Parquet");
    let file = c.dir().join("export.parquet");
    std::fs::write(&file, &export).expect("write export");
    let out = python(&format!(
        "import duckdb, pyarrow as pa, pyarrow.parquet as pq\n\
         t = pq.read_table('{f}')\n\
         ts = t.schema.field('ts').type\n\
         print(t.num_rows, t.schema.names, pa.types.is_timestamp(ts), ts.tz, t.schema.field('value').nullable)\n\
         print(duckdb.sql(\"SELECT count(*), sum(user_id), count(*) FILTER (WHERE value IS NULL), \
         CAST(epoch(min(ts)) AS BIGINT), CAST(epoch(max(ts)) AS BIGINT) \
         FROM read_parquet('{f}')\").fetchall()[0])",
        f = file.display()
    ));
    // rows(): ids divisible by 3; the pyarrow rows 102, 105, 108; the CSV row 110.
    let nulls = (0..100u64).filter(|id| id % 3 == 0).count() + 3 + 1;
    // DateTime is UTC seconds: the first and last `ts` of `rows()` come back unchanged
    // (2025-01-01 10:00:00 and 2025-02-28 10:55:00 UTC).
    assert_eq!(
        out,
        format!(
            "112 ['ts', 'user_id', 'event', 'value'] True UTC True\n\
             (112, {expected_sum}, {nulls}, 1735725600, 1740740100)"
        )
    );
}
