//! The rest of the replication protocol on a real 3-node ZooKeeper ensemble and three
//! sidecar processes: quorum inserts (both modes, failure and retry), sequential
//! consistency, merges under a steady stream, merge versus fetch of the merged part, drop
//! partition, and a part no replica holds any more.
//!
//! Log cleanup with a replica marked lost and a wiped replica's recovery run in
//! `faults.rs` (`a_replica_down_long_enough_is_marked_lost_and_recovers`,
//! `one_replica_disk_wiped`), under load and with the checker.

mod common;

use std::time::Duration;

use serde_json::Value;
use zookeeper_client as zk;

use common::{CONVERGE, january_rows, rows, user_ids};
use rtable_e2e::client::json_lines;
use rtable_e2e::poll::{Check, poll_until};
use rtable_e2e::{Cluster, ClusterOptions, serial};
use rtable_protocol::PartName;
use rtable_protocol::quorum::LastPart;

async fn cluster(opts: ClusterOptions) -> Cluster {
    Cluster::start(opts).await.expect("cluster starts")
}

/// Short sessions: the failure scenarios wait for a dead replica's session to expire.
fn quick_sessions() -> ClusterOptions {
    ClusterOptions {
        session_timeout_ms: 3_000,
        ..ClusterOptions::default()
    }
}

/// `POST /insert` with query parameters beyond the format; returns (status, JSON body).
async fn insert_with(c: &Cluster, replica: usize, query: &str, body: String) -> (u16, Value) {
    let url = format!(
        "{}/insert?format=JSONEachRow&{query}",
        c.client(replica).base()
    );
    let answer = reqwest::Client::new()
        .post(url)
        .body(body)
        .timeout(Duration::from_secs(60))
        .send()
        .await
        .expect("insert answered");
    let status = answer.status().as_u16();
    let text = answer.text().await.expect("insert body");
    let json = serde_json::from_str(&text).unwrap_or_else(|e| panic!("JSON answer {text}: {e}"));
    (status, json)
}

fn parts_of(answer: &Value) -> Vec<String> {
    answer["parts"]
        .as_array()
        .unwrap_or_else(|| panic!("`parts` in {answer}"))
        .iter()
        .map(|p| p.as_str().expect("part name").to_string())
        .collect()
}

/// Replicas whose `parts` in ZooKeeper list `part` or a part covering it.
async fn zk_holders(c: &Cluster, zk: &zk::Client, part: &str) -> Vec<String> {
    let part = PartName::parse(part).expect("part name");
    let mut holders = Vec::new();
    for r in &c.replicas {
        let children = zk
            .list_children(&c.paths().replica(r.name()).parts())
            .await
            .expect("list parts");
        if children
            .iter()
            .filter_map(|n| PartName::parse(n).ok())
            .any(|n| n.contains(&part))
        {
            holders.push(r.name().to_string());
        }
    }
    holders
}

async fn exists(zk: &zk::Client, path: &str) -> bool {
    zk.check_stat(path).await.expect("exists").is_some()
}

async fn select_lines(c: &Cluster, replica: usize, query: &str) -> (u16, Vec<String>) {
    let r = c
        .client(replica)
        .get(&format!("/select?format=JSONEachRow{query}"))
        .await
        .expect("select answered");
    let mut lines: Vec<String> = r.text().lines().map(str::to_string).collect();
    lines.sort();
    (r.status, lines)
}

async fn status_json(c: &Cluster, replica: usize) -> Value {
    c.client(replica).status_json().await.expect("status")
}

#[tokio::test]
async fn quorum_2_and_3_in_parallel_and_sequential_mode() {
    let _serial = serial();
    let mut c = cluster(quick_sessions()).await;
    let zk = c.zk_client().await.expect("zk");
    let mut total = 0u64;
    for (i, (quorum, parallel)) in [(2, 1), (2, 0), (3, 1), (3, 0)].into_iter().enumerate() {
        let first = i as u64 * 10;
        let (status, answer) = insert_with(
            &c,
            i % 3,
            &format!("insert_quorum={quorum}&insert_quorum_parallel={parallel}"),
            json_lines(&january_rows(first, 10)),
        )
        .await;
        assert_eq!(status, 200, "quorum {quorum} parallel {parallel}: {answer}");
        total += 10;
        for part in parts_of(&answer) {
            // Acknowledged means: already on `quorum` replicas, quorum bookkeeping done.
            let holders = zk_holders(&c, &zk, &part).await;
            assert!(
                holders.len() >= quorum,
                "quorum {quorum} parallel {parallel}: {part} acknowledged but held by {holders:?}"
            );
            assert!(!exists(&zk, &format!("{}/{part}", c.paths().quorum_parallel())).await);
            if parallel == 0 {
                let (data, _) = zk
                    .get_data(&c.paths().quorum_last_part())
                    .await
                    .expect("quorum/last_part");
                let last = LastPart::parse(std::str::from_utf8(&data).expect("utf-8"))
                    .expect("last_part parses");
                let recorded = last.parts.get("202501").expect("202501 in last_part");
                assert!(
                    PartName::parse(recorded)
                        .expect("name")
                        .contains(&PartName::parse(&part).expect("name"))
                        || recorded == &part,
                    "last_part {recorded} vs {part}"
                );
            }
        }
    }
    let lines = c
        .wait_converged_rows(total as usize, CONVERGE)
        .await
        .expect("converged");
    assert_eq!(user_ids(&lines), (0..total).collect::<Vec<u64>>());
    let quorum_inserts: u64 = {
        let mut n = 0;
        for i in 0..3 {
            n += status_json(&c, i).await["counters"]["quorum_inserts"]
                .as_u64()
                .expect("counters.quorum_inserts");
        }
        n
    };
    assert_eq!(quorum_inserts, 4);
    // Both parallel-mode inserts were handed off to every peer their quorum needed
    // before the commit (sequential mode never is): 1 + 2 copies taken.
    let (mut sent, mut taken) = (0u64, 0u64);
    for i in 0..3 {
        let counters = &status_json(&c, i).await["counters"];
        sent += counters["handoffs_sent"]
            .as_u64()
            .expect("counters.handoffs_sent");
        taken += counters["handoffs_taken"]
            .as_u64()
            .expect("counters.handoffs_taken");
    }
    assert_eq!((sent, taken), (2, 3), "handoffs sent and taken");

    // Too few live replicas: fails fast with a message naming the setting; `auto` (the
    // majority, 2 of 3) still works.
    c.replicas[2].kill().expect("SIGKILL events-2");
    let survivor = c.client(0).clone();
    poll_until(
        "events-2 inactive",
        CONVERGE,
        Duration::from_millis(200),
        || {
            let survivor = survivor.clone();
            async move {
                let s = survivor.status().await?;
                Ok(if s.active_replicas == Some(2) {
                    Check::Done(())
                } else {
                    Check::Wait(format!("{:?}", s.active_replicas))
                })
            }
        },
    )
    .await
    .expect("inactive");
    let started = std::time::Instant::now();
    let (status, answer) =
        insert_with(&c, 0, "insert_quorum=3", json_lines(&january_rows(100, 1))).await;
    assert_eq!(status, 503, "{answer}");
    let error = answer["error"].as_str().expect("error");
    assert!(error.contains("insert_quorum"), "{error}");
    assert!(started.elapsed() < Duration::from_secs(5), "fails fast");
    let (status, answer) = insert_with(
        &c,
        1,
        "insert_quorum=auto",
        json_lines(&january_rows(100, 1)),
    )
    .await;
    assert_eq!(status, 200, "{answer}");
}

#[tokio::test]
async fn a_failed_quorum_frees_the_block_and_the_retry_lands_once() {
    let _serial = serial();
    let mut c = cluster(quick_sessions()).await;
    let zk = c.zk_client().await.expect("zk");
    c.client(0)
        .insert_json(&january_rows(0, 5))
        .await
        .expect("warm-up insert");
    c.wait_converged_rows(5, CONVERGE).await.expect("converged");

    // events-1 and events-2 freeze (still active for a moment), the insert lands on
    // events-0 alone and waits for a second copy that cannot come.
    c.replicas[1].stop().expect("SIGSTOP events-1");
    c.replicas[2].stop().expect("SIGSTOP events-2");
    let body = json_lines(&january_rows(1000, 7));
    let base = c.client(0).base().to_string();
    let pending = tokio::spawn({
        let body = body.clone();
        async move {
            reqwest::Client::new()
                .post(format!(
                    "{base}/insert?format=JSONEachRow&dedup_token=q-1&insert_quorum=2"
                ))
                .body(body)
                .send()
                .await
        }
    });
    let quorum_dir = c.paths().quorum_parallel();
    let part = poll_until(
        "the quorum insert to commit",
        CONVERGE,
        Duration::from_millis(20),
        || {
            let zk = zk.clone();
            let quorum_dir = quorum_dir.clone();
            async move {
                let children = zk.list_children(&quorum_dir).await?;
                Ok(match children.into_iter().next() {
                    Some(p) => Check::Done(p),
                    None => Check::Wait("no quorum node yet".into()),
                })
            }
        },
    )
    .await
    .expect("quorum node");
    // The only holder dies before anyone copied the part.
    c.replicas[0].kill().expect("SIGKILL events-0");
    let outcome = pending.await.expect("task");
    assert!(
        outcome.is_err() || outcome.as_ref().is_ok_and(|r| r.status() != 200),
        "the inserter died, the client must not see success"
    );
    c.replicas[1].cont().expect("SIGCONT events-1");
    c.replicas[2].cont().expect("SIGCONT events-2");

    let failed = format!("{}/{part}", c.paths().quorum_failed_parts());
    poll_until(
        "the quorum to fail",
        CONVERGE,
        Duration::from_millis(200),
        || {
            let zk = zk.clone();
            let failed = failed.clone();
            async move {
                Ok(if zk.check_stat(&failed).await?.is_some() {
                    Check::Done(())
                } else {
                    Check::Wait("no failed_parts node".into())
                })
            }
        },
    )
    .await
    .expect("failed_parts");
    assert!(!exists(&zk, &format!("{quorum_dir}/{part}")).await);

    // The client's retry with the same token is a new insert, not a duplicate. (Until
    // events-2 is active again after its freeze, too few replicas answer fast.)
    let deadline = std::time::Instant::now() + CONVERGE;
    let (status, answer) = loop {
        let (status, answer) =
            insert_with(&c, 1, "dedup_token=q-1&insert_quorum=2", body.clone()).await;
        let too_few = status == 503
            && answer["error"]
                .as_str()
                .is_some_and(|e| e.contains("active replicas"));
        if too_few && std::time::Instant::now() < deadline {
            tokio::time::sleep(Duration::from_millis(300)).await;
            continue;
        }
        break (status, answer);
    };
    assert_eq!(status, 200, "{answer}");
    assert_eq!(answer["deduplicated"], false, "{answer}");

    // The old holder comes back and sets the failed part aside instead of serving it.
    c.replicas[0].start_again().expect("restart events-0");
    c.replicas[0].wait_ready(CONVERGE).await.expect("ready");
    let lines = c
        .wait_converged_rows(12, CONVERGE)
        .await
        .expect("converged");
    let mut expected: Vec<u64> = (0..5).collect();
    expected.extend(1000..1007);
    assert_eq!(
        user_ids(&lines),
        expected,
        "the retried rows are there once"
    );
    let detached: Vec<String> = std::fs::read_dir(c.replicas[0].data_dir().join("detached"))
        .expect("detached dir")
        .filter_map(|e| e.ok())
        .map(|e| e.file_name().to_string_lossy().into_owned())
        .collect();
    assert!(
        detached
            .iter()
            .any(|d| d.starts_with("noquorum_") && d.contains(&part)),
        "events-0 detached {part}: {detached:?}"
    );
}

#[tokio::test]
async fn sequential_consistency_refuses_a_lagging_replica_and_hides_unconfirmed_parts() {
    let _serial = serial();
    let mut c = cluster(ClusterOptions {
        interserver_secret: Some("right-secret".into()),
        ..quick_sessions()
    })
    .await;
    // events-2 restarts with a secret its peers refuse: it cannot fetch anything.
    c.replicas[2].kill().expect("SIGKILL events-2");
    let secret_file = c.dir().join("interserver-secret");
    std::fs::write(&secret_file, "wrong-secret\n").expect("write secret");
    c.replicas[2].start_again().expect("restart events-2");
    c.replicas[2].wait_ready(CONVERGE).await.expect("ready");
    std::fs::write(&secret_file, "right-secret\n").expect("restore secret");

    let (status, answer) = insert_with(
        &c,
        0,
        "insert_quorum=2&insert_quorum_parallel=0",
        json_lines(&january_rows(0, 10)),
    )
    .await;
    assert_eq!(status, 200, "{answer}");

    // The lagging replica refuses a sequentially consistent read, plain reads still work.
    let (status, _) = select_lines(&c, 2, "&sequential_consistency=1").await;
    assert_eq!(status, 503, "events-2 lacks the last quorum part");
    let (status, lines) = select_lines(&c, 2, "").await;
    assert_eq!(status, 200);
    assert!(lines.is_empty());

    // A part without quorum lies above the high-water mark: hidden from consistent reads.
    let (status, answer) =
        insert_with(&c, 0, "insert_quorum=1", json_lines(&january_rows(100, 3))).await;
    assert_eq!(status, 200, "{answer}");
    let (status, consistent) = select_lines(&c, 0, "&sequential_consistency=1").await;
    assert_eq!(status, 200);
    assert_eq!(user_ids(&consistent), (0..10).collect::<Vec<u64>>());
    let (_, all) = select_lines(&c, 0, "").await;
    assert_eq!(all.len(), 13);
    let (status, _) = select_lines(&c, 0, "&sequential_consistency=2").await;
    assert_eq!(status, 400);
}

#[tokio::test]
async fn concurrent_inserts_on_every_replica_with_merges_lose_nothing() {
    let _serial = serial();
    let mut c = cluster(ClusterOptions::default()).await;
    // 8 clients per replica, 25 inserts each, all into one partition: parts commit out of
    // block-number order (groups in flight on one replica, inserts on the others) while
    // every replica keeps assigning merges. A merge that spanned a block still committing
    // would later hide that block's rows behind its name.
    const CLIENTS: u64 = 8;
    const INSERTS: u64 = 25;
    const ROWS: u64 = 2;
    let mut tasks = Vec::new();
    for replica in 0..3u64 {
        for client in 0..CLIENTS {
            let http = c.client(replica as usize).clone();
            tasks.push(tokio::spawn(async move {
                for k in 0..INSERTS {
                    let first = ((replica * CLIENTS + client) * INSERTS + k) * ROWS;
                    http.insert("JSONEachRow", json_lines(&january_rows(first, ROWS)), None)
                        .await
                        .expect("insert");
                }
            }));
        }
    }
    for t in tasks {
        t.await.expect("client task");
    }
    let total = 3 * CLIENTS * INSERTS * ROWS;
    let lines = c
        .wait_converged_rows(total as usize, CONVERGE)
        .await
        .expect("converged");
    assert_eq!(user_ids(&lines), (0..total).collect::<Vec<u64>>());
    let merges = c
        .client(0)
        .metric("rtable_merges_total")
        .await
        .expect("metrics");
    assert!(merges.is_some_and(|m| m > 0.0), "merges ran: {merges:?}");
}

#[tokio::test]
async fn a_steady_stream_of_small_inserts_keeps_the_part_count_bounded() {
    let _serial = serial();
    let mut c = cluster(ClusterOptions::default()).await;
    let mut max_parts = 0usize;
    for k in 0..240u64 {
        c.client((k % 3) as usize)
            .insert_json(&january_rows(k, 1))
            .await
            .expect("insert");
        if k % 20 == 19 {
            let s = c.client(0).status().await.expect("status");
            max_parts = max_parts.max(s.parts.len());
        }
    }
    let lines = c
        .wait_converged_rows(240, CONVERGE)
        .await
        .expect("converged");
    assert_eq!(user_ids(&lines), (0..240).collect::<Vec<u64>>());
    // Merges keep up: 240 one-row parts never pile up.
    assert!(max_parts <= 40, "up to {max_parts} parts during the stream");
    let merges = poll_until(
        "merges to settle",
        CONVERGE,
        Duration::from_millis(500),
        || {
            let clients: Vec<_> = c.replicas.iter().map(|r| r.client().clone()).collect();
            async move {
                let mut parts = Vec::new();
                for cl in &clients {
                    let s = cl.status().await?;
                    if s.queue_size > 0 {
                        return Ok(Check::Wait(format!(
                            "{} queue {}",
                            s.replica_name, s.queue_size
                        )));
                    }
                    parts.push(s.parts);
                }
                Ok(
                    if parts.iter().all(|p| *p == parts[0]) && parts[0].len() <= 12 {
                        Check::Done(parts[0].len())
                    } else {
                        Check::Wait(format!("parts {parts:?}"))
                    },
                )
            }
        },
    )
    .await
    .expect("identical, few parts");
    println!("steady stream: max {max_parts} parts during, {merges} after");
    let mut merged = 0;
    for i in 0..3 {
        merged += status_json(&c, i).await["counters"]["merges"]
            .as_u64()
            .expect("merges counter");
    }
    assert!(merged > 0);
}

#[tokio::test]
async fn a_replica_without_the_sources_fetches_the_merged_part() {
    let _serial = serial();
    let mut c = cluster(ClusterOptions::default()).await;
    // events-2 is away while the others insert and merge.
    c.replicas[2].kill().expect("SIGKILL events-2");
    for k in 0..12u64 {
        c.client((k % 2) as usize)
            .insert_json(&january_rows(k * 5, 5))
            .await
            .expect("insert");
    }
    let merged_name = poll_until(
        "events-0 and events-1 to merge",
        CONVERGE,
        Duration::from_millis(200),
        || {
            let a = c.client(0).clone();
            let b = c.client(1).clone();
            async move {
                let (sa, sb) = (a.status().await?, b.status().await?);
                let merged = sa
                    .parts
                    .iter()
                    .find(|p| PartName::parse(p).is_ok_and(|n| n.level > 0));
                Ok(match merged {
                    Some(m) if sa.parts == sb.parts && sa.queue_size == 0 => Check::Done(m.clone()),
                    _ => Check::Wait(format!("{:?} / {:?}", sa.parts, sb.parts)),
                })
            }
        },
    )
    .await
    .expect("a merged part");
    let mut merges_here = 0;
    for i in 0..2 {
        merges_here += status_json(&c, i).await["counters"]["merges"]
            .as_u64()
            .expect("merges");
    }
    assert!(merges_here >= 2, "both live replicas merged locally");

    c.replicas[2].start_again().expect("restart events-2");
    c.replicas[2].wait_ready(CONVERGE).await.expect("ready");
    let lines = c
        .wait_converged_rows(60, CONVERGE)
        .await
        .expect("converged");
    assert_eq!(user_ids(&lines), (0..60).collect::<Vec<u64>>());
    let s = status_json(&c, 2).await;
    assert!(
        s["counters"]["merged_part_fetches"]
            .as_u64()
            .expect("counter")
            >= 1,
        "events-2 fetched {merged_name} or a later merge instead of its sources: {s}"
    );
    // Same row set, byte for byte, whichever way a replica got the merged part.
    let (_, merged_locally) = select_lines(&c, 0, "").await;
    let (_, fetched) = select_lines(&c, 2, "").await;
    assert_eq!(merged_locally, fetched);
}

/// "Fetch the merged part when that is cheaper": a replica holding every source of a
/// merge that an active replica already finished fetches the result instead of merging,
/// once the sources reach `--prefer-fetch-merged-part-size-threshold` and the entry is
/// older than the time threshold (both 0 here, so any merge qualifies). events-1 and
/// events-2 hold the sources but are frozen while events-0 assigns and runs the merge.
#[tokio::test]
async fn a_replica_with_every_source_fetches_a_finished_merge_when_cheaper() {
    let _serial = serial();
    let mut c = cluster(ClusterOptions::default()).await;
    let args = |min_parts: &str| -> Vec<String> {
        [
            "--merge-min-parts",
            min_parts,
            "--prefer-fetch-merged-part-size-threshold",
            "0",
            "--prefer-fetch-merged-part-time-threshold-seconds",
            "0",
        ]
        .iter()
        .map(|s| s.to_string())
        .collect()
    };
    // No merges yet anywhere: three parts reach every replica.
    for r in &mut c.replicas {
        r.set_extra_args(args("100"));
        r.restart().expect("restart with flags");
    }
    for r in &mut c.replicas {
        r.wait_ready(CONVERGE).await.expect("ready");
    }
    for k in 0..3u64 {
        c.client(0)
            .insert_json(&january_rows(k * 5, 5))
            .await
            .expect("insert");
    }
    c.wait_converged_rows(15, CONVERGE)
        .await
        .expect("every replica holds the three parts");
    // events-0 alone may merge now; the others are frozen until it has.
    c.replicas[1].stop().expect("SIGSTOP events-1");
    c.replicas[2].stop().expect("SIGSTOP events-2");
    c.replicas[0].set_extra_args(args("3"));
    c.replicas[0]
        .terminate(Duration::from_secs(5))
        .expect("SIGTERM events-0");
    c.replicas[0].start_again().expect("restart events-0");
    c.replicas[0].wait_ready(CONVERGE).await.expect("ready");
    poll_until(
        "events-0 to merge",
        CONVERGE,
        Duration::from_millis(100),
        || {
            let a = c.client(0).clone();
            async move {
                let s = a.status().await?;
                Ok(
                    if s.parts
                        .iter()
                        .any(|p| PartName::parse(p).is_ok_and(|n| n.level > 0))
                    {
                        Check::Done(())
                    } else {
                        Check::Wait(format!("{:?}", s.parts))
                    },
                )
            }
        },
    )
    .await
    .expect("a merged part on events-0");
    c.replicas[1].cont().expect("SIGCONT events-1");
    c.replicas[2].cont().expect("SIGCONT events-2");
    let lines = c
        .wait_converged_rows(15, CONVERGE)
        .await
        .expect("converged");
    assert_eq!(user_ids(&lines), (0..15).collect::<Vec<u64>>());
    for i in [1usize, 2] {
        let s = status_json(&c, i).await;
        assert_eq!(
            s["counters"]["merges"].as_u64(),
            Some(0),
            "{} merged although a finished merge was cheaper to fetch: {s}",
            c.replicas[i].name()
        );
        assert!(
            s["counters"]["merged_part_fetches"].as_u64().unwrap_or(0) >= 1,
            "{} did not fetch the merged part: {s}",
            c.replicas[i].name()
        );
        let log = std::fs::read_to_string(c.replicas[i].log_path()).expect("log");
        assert!(
            log.contains("fetched the merged part instead of merging"),
            "{} took another path to the merged part",
            c.replicas[i].name()
        );
    }
}

#[tokio::test]
async fn drop_partition_removes_it_on_every_replica() {
    let _serial = serial();
    let mut c = cluster(ClusterOptions::default()).await;
    for k in 0..6u64 {
        c.client((k % 3) as usize)
            .insert_json(&rows(k * 10, 10))
            .await
            .expect("insert");
    }
    c.wait_converged_rows(60, CONVERGE)
        .await
        .expect("converged");
    let r = c
        .client(1)
        .get("/select?format=JSONEachRow")
        .await
        .expect("select");
    assert_eq!(r.status, 200);
    let drop = reqwest::Client::new()
        .post(format!(
            "{}/drop_partition?partition=202501",
            c.client(1).base()
        ))
        .send()
        .await
        .expect("drop answered");
    assert_eq!(drop.status().as_u16(), 200);
    let answer: Value = drop.json().await.expect("JSON");
    let range = PartName::parse(answer["drop_range"].as_str().expect("drop_range")).expect("name");
    assert_eq!(range.partition_id, "202501");
    // rows(): even ids are January, odd ids February.
    let lines = c
        .wait_converged_rows(30, CONVERGE)
        .await
        .expect("converged after the drop");
    assert_eq!(
        user_ids(&lines),
        (0..60).filter(|id| id % 2 == 1).collect::<Vec<u64>>()
    );
    for r in &c.replicas {
        let s = r.client().status().await.expect("status");
        assert!(
            s.parts.iter().all(|p| !p.starts_with("202501_")),
            "{}: {:?}",
            s.replica_name,
            s.parts
        );
    }
    // A bad partition id is refused with a message, nothing published.
    let bad = reqwest::Client::new()
        .post(format!(
            "{}/drop_partition?partition=../x",
            c.client(0).base()
        ))
        .send()
        .await
        .expect("answered");
    assert_eq!(bad.status().as_u16(), 400);
}

#[tokio::test]
async fn a_part_no_replica_holds_is_declared_lost_and_counted() {
    let _serial = serial();
    let mut c = cluster(quick_sessions()).await;
    c.client(0)
        .insert_json(&january_rows(0, 5))
        .await
        .expect("insert");
    c.wait_converged_rows(5, CONVERGE).await.expect("converged");
    // Only events-0 ever holds the next part, then its disk is wiped.
    c.replicas[1].stop().expect("SIGSTOP events-1");
    c.replicas[2].stop().expect("SIGSTOP events-2");
    let answer = c
        .client(0)
        .insert_json(&january_rows(500, 4))
        .await
        .expect("insert on events-0 alone");
    c.replicas[0].kill().expect("SIGKILL events-0");
    c.replicas[0].wipe_data_dir().expect("wipe");
    c.replicas[1].cont().expect("SIGCONT events-1");
    c.replicas[2].cont().expect("SIGCONT events-2");
    c.replicas[0].start_again().expect("restart events-0");
    c.replicas[0].wait_ready(CONVERGE).await.expect("ready");

    let clients: Vec<_> = c.replicas.iter().map(|r| r.client().clone()).collect();
    let counted = poll_until(
        "the part to be declared lost and no queue to wait for it",
        CONVERGE,
        Duration::from_millis(200),
        || {
            let clients = clients.clone();
            async move {
                let mut lost = 0;
                for cl in &clients {
                    let s = cl.status_json().await?;
                    if s["queue_size"] != 0 {
                        return Ok(Check::Wait(format!(
                            "{} queue {}",
                            s["replica_name"], s["queue_size"]
                        )));
                    }
                    lost += s["lost_part_count"].as_u64().unwrap_or(0);
                }
                Ok(if lost >= 1 {
                    Check::Done(lost)
                } else {
                    Check::Wait("no lost part counted yet".into())
                })
            }
        },
    )
    .await
    .unwrap_or_else(|e| panic!("{:?} never declared lost: {e:#}", answer.parts));
    assert!(counted >= 1);
    let lines = c
        .wait_converged_rows(5, CONVERGE)
        .await
        .expect("converged without the lost part");
    assert_eq!(user_ids(&lines), (0..5).collect::<Vec<u64>>());
    let mut metric = 0.0;
    for cl in &clients {
        let text = cl.metrics().await.expect("metrics");
        metric += rtable_e2e::client::metric_value(&text, "rtable_lost_parts_total")
            .expect("rtable_lost_parts_total");
    }
    assert!(metric >= 1.0, "rtable_lost_parts_total {metric}");
}

/// One acknowledged insert of a drop race: its user ids, when the request was sent and
/// when its answer came back.
#[derive(Debug, Clone, Copy)]
struct TimedInsert {
    first: u64,
    rows: u64,
    sent: std::time::Instant,
    acked: std::time::Instant,
}

/// `POST /drop_partition` that must succeed; returns the published drop range.
async fn drop_january(c: &Cluster, replica: usize) -> PartName {
    let answer = reqwest::Client::new()
        .post(format!(
            "{}/drop_partition?partition=202501",
            c.client(replica).base()
        ))
        .timeout(Duration::from_secs(60))
        .send()
        .await
        .expect("drop answered");
    let status = answer.status().as_u16();
    let body: Value = answer.json().await.expect("JSON");
    assert_eq!(status, 200, "drop on events-{replica}: {body}");
    PartName::parse(body["drop_range"].as_str().expect("drop_range")).expect("range name")
}

/// Every log entry still in the log, in log order.
async fn log_entries(c: &Cluster, zk: &zk::Client) -> Vec<(String, rtable_protocol::LogEntry)> {
    let mut names = zk.list_children(&c.paths().log()).await.expect("list log");
    names.sort();
    let mut entries = Vec::new();
    for name in names {
        let Ok((data, _)) = zk.get_data(&c.paths().log_entry(&name)).await else {
            continue; // removed by log cleanup meanwhile
        };
        let text = String::from_utf8(data).expect("UTF-8 entry");
        entries.push((
            name,
            rtable_protocol::LogEntry::parse(&text).expect("log entry"),
        ));
    }
    entries
}

#[tokio::test]
async fn drop_partition_during_concurrent_inserts_converges_and_keeps_later_inserts() {
    use std::sync::Arc;
    use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
    use std::time::Instant;

    let _serial = serial();
    let mut c = cluster(ClusterOptions::default()).await;
    let zk = c.zk_client().await.expect("zk");
    // Clients on every replica insert into January without pause while DROP PARTITION
    // runs several times on rotating replicas: some insert nearly always holds a block
    // number below the drop's, and commits while the drop is being published.
    const CLIENTS: usize = 3;
    const ROWS: u64 = 2;
    const DROPS: usize = 5;
    let stop = Arc::new(AtomicBool::new(false));
    let next_id = Arc::new(AtomicU64::new(0));
    let mut tasks = Vec::new();
    for replica in 0..3 {
        for _ in 0..CLIENTS {
            let http = c.client(replica).clone();
            let stop = stop.clone();
            let next_id = next_id.clone();
            tasks.push(tokio::spawn(async move {
                let mut done = Vec::new();
                while !stop.load(Ordering::Relaxed) {
                    let first = next_id.fetch_add(ROWS, Ordering::Relaxed);
                    let sent = Instant::now();
                    http.insert("JSONEachRow", json_lines(&january_rows(first, ROWS)), None)
                        .await
                        .expect("insert");
                    done.push(TimedInsert {
                        first,
                        rows: ROWS,
                        sent,
                        acked: Instant::now(),
                    });
                }
                done
            }));
        }
    }
    tokio::time::sleep(Duration::from_millis(600)).await;
    let mut drops = Vec::new();
    for round in 0..DROPS {
        let sent = Instant::now();
        let range = drop_january(&c, round % 3).await;
        drops.push((sent, Instant::now(), range));
        tokio::time::sleep(Duration::from_millis(400)).await;
    }
    tokio::time::sleep(Duration::from_millis(600)).await;
    stop.store(true, Ordering::Relaxed);
    let mut inserts = Vec::new();
    for t in tasks {
        inserts.extend(t.await.expect("client task"));
    }

    let lines = c.wait_converged(CONVERGE).await.expect("converged");
    let present: std::collections::BTreeSet<u64> = user_ids(&lines).into_iter().collect();
    for i in 0..3 {
        let s = status_json(&c, i).await;
        assert_eq!(
            s["lost_part_count"], 0,
            "events-{i} declared parts lost: {s}"
        );
    }
    // Per insert: all of its rows or none (one insert is one block of one partition).
    let (mut kept, mut dropped, mut concurrent_kept, mut concurrent_dropped) = (0, 0, 0, 0);
    let last_drop_acked = drops.last().expect("drops").1;
    for t in &inserts {
        let here = (t.first..t.first + t.rows)
            .filter(|id| present.contains(id))
            .count() as u64;
        assert!(
            here == 0 || here == t.rows,
            "insert of ids {}..{} is half there: {here} rows",
            t.first,
            t.first + t.rows
        );
        let is_here = here == t.rows;
        let dropped_later = drops.iter().any(|(sent, _, _)| *sent > t.acked);
        if t.sent > last_drop_acked {
            // Sent after the last drop was acknowledged: it must survive.
            assert!(
                is_here,
                "ids {}..{} were inserted after the last drop was acknowledged but are gone",
                t.first,
                t.first + t.rows
            );
            kept += 1;
        } else if dropped_later {
            // Acknowledged before some drop was sent: that drop removed it.
            assert!(
                !is_here,
                "ids {}..{} were acknowledged before a drop was sent but survived it",
                t.first,
                t.first + t.rows
            );
            dropped += 1;
        } else if is_here {
            // Concurrent with the last drop: either outcome, the same on every replica.
            concurrent_kept += 1;
        } else {
            concurrent_dropped += 1;
        }
    }
    assert!(kept > 0 && dropped > 0, "{kept} kept, {dropped} dropped");
    // A drop is published only once every block number below its own is committed or
    // given up, so no insert inside a drop range is logged after that drop. (A merge of
    // parts inside may be: a leader choosing from a snapshot taken just before it ran the
    // drop. Every replica skips it as inside an executed or queued drop range.)
    let log = log_entries(&c, &zk).await;
    let (mut late, mut late_merges) = (Vec::new(), 0);
    for (i, (drop_node, entry)) in log.iter().enumerate() {
        let rtable_protocol::LogEntryKind::Drop { range } = &entry.kind else {
            continue;
        };
        let range = PartName::parse(range).expect("range");
        for (node, later) in &log[i + 1..] {
            let Some(part) = later.new_part_name().and_then(|p| PartName::parse(&p).ok()) else {
                continue;
            };
            if part.is_drop_range() || part.is_disjoint(&range) {
                continue;
            }
            match later.kind {
                rtable_protocol::LogEntryKind::Get { .. } => {
                    late.push(format!("{node} ({part}) after {drop_node} ({range})"))
                }
                _ => late_merges += 1,
            }
        }
    }
    assert!(
        late.is_empty(),
        "inserts logged after a drop covering them: {late:?}"
    );
    let slowest_drop = drops
        .iter()
        .map(|(sent, acked, _)| *acked - *sent)
        .max()
        .unwrap_or_default();
    let slowest_insert = inserts
        .iter()
        .map(|t| t.acked - t.sent)
        .max()
        .unwrap_or_default();
    println!(
        "drop race: {} inserts, {kept} after the last drop, {dropped} dropped, {concurrent_kept}/{concurrent_dropped} concurrent kept/dropped, {} rows left, {} log entries checked ({late_merges} merges inside an earlier drop range), slowest drop {slowest_drop:?}, slowest insert {slowest_insert:?}",
        inserts.len(),
        lines.len(),
        log.len()
    );
}

#[tokio::test]
async fn a_lagging_replica_skips_gets_of_a_dropped_partition_instead_of_losing_them() {
    let _serial = serial();
    let mut c = cluster(ClusterOptions::default()).await;
    c.client(0)
        .insert_json(&rows(1000, 4))
        .await
        .expect("insert");
    c.wait_converged_rows(4, CONVERGE).await.expect("converged");
    // events-2 misses the inserts and the drop: when it comes back its queue holds the
    // GETs and, after them, the DROP_RANGE covering them; no replica holds those parts.
    c.replicas[2].stop().expect("SIGSTOP events-2");
    for k in 0..6u64 {
        c.client((k % 2) as usize)
            .insert_json(&january_rows(k * 3, 3))
            .await
            .expect("insert");
    }
    let range = drop_january(&c, 1).await;
    assert_eq!(range.partition_id, "202501");
    poll_until(
        "events-0 and events-1 to drop January",
        CONVERGE,
        Duration::from_millis(100),
        || {
            let a = c.client(0).clone();
            let b = c.client(1).clone();
            async move {
                let (sa, sb) = (a.status().await?, b.status().await?);
                let january = |s: &rtable_protocol::status::ReplicaStatus| {
                    s.parts.iter().any(|p| p.starts_with("202501_"))
                };
                Ok(
                    if sa.queue_size == 0 && sb.queue_size == 0 && !january(&sa) && !january(&sb) {
                        Check::Done(())
                    } else {
                        Check::Wait(format!("{:?} / {:?}", sa.parts, sb.parts))
                    },
                )
            }
        },
    )
    .await
    .expect("January dropped");
    c.replicas[2].cont().expect("SIGCONT events-2");
    let lines = c.wait_converged(CONVERGE).await.expect("converged");
    assert_eq!(
        user_ids(&lines),
        (1000..1004).filter(|id| id % 2 == 1).collect::<Vec<u64>>()
    );
    for i in 0..3 {
        let s = status_json(&c, i).await;
        assert_eq!(
            s["lost_part_count"], 0,
            "events-{i} declared a dropped part lost: {s}"
        );
    }
}

/// Dedup ids beyond the window go, a hundred per request: the newest stay (their retry is
/// still answered as a duplicate), the oldest are forgotten (their retry inserts again,
/// as in ClickHouse once a block left `replicated_deduplication_window`).
#[tokio::test]
async fn dedup_blocks_beyond_the_window_are_cleaned() {
    let _serial = serial();
    let dir = tempfile::tempdir().expect("temp dir");
    let manifest = dir.path().join("events.yaml");
    let text = std::fs::read_to_string(rtable_e2e::example_manifest()).expect("example");
    std::fs::write(
        &manifest,
        text.replace(
            "  replicas: 3\n",
            "  replicas: 1\n  deduplicationWindow: 5\n",
        ),
    )
    .expect("manifest");
    let mut c = cluster(ClusterOptions {
        replicas: 1,
        manifest,
        ..ClusterOptions::default()
    })
    .await;
    c.replicas[0].set_extra_args(vec!["--cleanup-period-seconds".into(), "1".into()]);
    c.replicas[0].kill().expect("SIGKILL");
    c.replicas[0].start_again().expect("start");
    c.replicas[0]
        .wait_ready(Duration::from_secs(60))
        .await
        .expect("ready");
    // 130 inserts: more than one batch of deletions.
    let bodies: Vec<String> = (0..130).map(|i| json_lines(&rows(i, 1))).collect();
    for body in &bodies {
        let answer = c.client(0).insert("JSONEachRow", body.clone(), None).await;
        assert!(!answer.expect("insert").deduplicated);
    }
    let zk = c.zk_client().await.expect("zk");
    let blocks = c.paths().blocks();
    let left = poll_until(
        "blocks down to the window",
        Duration::from_secs(30),
        Duration::from_millis(200),
        || {
            let zk = zk.clone();
            let blocks = blocks.clone();
            async move {
                Ok(match zk.list_children(&blocks).await {
                    Ok(children) if children.len() <= 5 => Check::Done(children.len()),
                    Ok(children) => Check::Wait(format!("{} blocks", children.len())),
                    Err(e) => Check::Wait(e.to_string()),
                })
            }
        },
    )
    .await
    .expect("blocks cleaned down to the window");
    assert_eq!(left, 5);
    let newest = c
        .client(0)
        .insert("JSONEachRow", bodies[129].clone(), None)
        .await
        .expect("retry of the newest");
    assert!(newest.deduplicated, "{newest:?}");
    let oldest = c
        .client(0)
        .insert("JSONEachRow", bodies[0].clone(), None)
        .await
        .expect("retry of the oldest");
    assert!(!oldest.deduplicated, "{oldest:?}");
}

/// ClickHouse bumps `block_numbers`' data version with each partition node it creates, so a
/// transaction can check that the set of partitions did not change.
#[tokio::test]
async fn a_new_partition_bumps_the_version_of_block_numbers() {
    let _serial = serial();
    let c = cluster(ClusterOptions::default()).await;
    let zk = c.zk_client().await.expect("zk");
    // Two months from one replica, January again from another: two partitions in all.
    for (replica, body) in [(0, rows(0, 20)), (1, january_rows(100, 5))] {
        let (status, answer) = insert_with(&c, replica, "", json_lines(&body)).await;
        assert_eq!(status, 200, "{answer}");
    }
    let path = c.paths().block_numbers();
    let mut partitions = zk.list_children(&path).await.expect("list block_numbers");
    partitions.sort();
    assert_eq!(partitions, ["202501", "202502"]);
    let (_, stat) = zk.get_data(&path).await.expect("block_numbers");
    assert_eq!(stat.version, 2, "one bump per partition created");
}
