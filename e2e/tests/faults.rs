//! Fault scenarios (issue 5): each starts its own cluster (a real 3-node ZooKeeper
//! ensemble and three sidecars), runs client load through `rtable_e2e::driver`, injects
//! its faults, and ends with the one checker (`rtable_e2e::checker`).
//!
//! Run one at a time: `cargo test -p rtable-e2e --test faults -- --test-threads=1 <name>`.
//! The nemesis soak lasts `RTABLE_NEMESIS_SECS` (150 by default) and replays from
//! `RTABLE_NEMESIS_SEED` (printed at its start).

use std::path::Path;
use std::sync::Arc;
use std::time::{Duration, Instant};

use rtable_e2e::checker::{Attempt, Checker, InsertPlan, Report};
use rtable_e2e::client::metric_value;
use rtable_e2e::driver::{Driver, DriverConfig, Rng, Target, targets, wait_acks, wait_more_acks};
use rtable_e2e::poll::{Check, poll_until};
use rtable_e2e::{Cluster, ClusterOptions, serial};

const READY: Duration = Duration::from_secs(60);
const PROGRESS: Duration = Duration::from_secs(60);

/// Session timeout of every scenario's sidecars (`--session-timeout-ms`).
const SESSION_MS: u64 = 3000;

/// Flags that make log cleanup mark a stopped replica lost quickly.
fn lost_quickly_args() -> Vec<String> {
    [
        "--max-logs-to-keep",
        "30",
        "--min-logs-to-keep",
        "5",
        "--cleanup-period-seconds",
        "1",
    ]
    .iter()
    .map(|s| s.to_string())
    .collect()
}

async fn start_cluster() -> Cluster {
    Cluster::start(ClusterOptions {
        session_timeout_ms: SESSION_MS,
        ..ClusterOptions::ensemble()
    })
    .await
    .expect("cluster starts")
}

/// Restarts every replica with `args` appended to its flags (data kept).
async fn restart_all_with_args(c: &mut Cluster, args: Vec<String>) {
    for r in &mut c.replicas {
        r.set_extra_args(args.clone());
        r.kill().expect("SIGKILL");
        r.start_again().expect("start");
    }
    for r in &mut c.replicas {
        r.wait_ready(READY).await.expect("ready with the new flags");
    }
}

/// Waits (bounded) until replica `i` has no GET_PART queued before `since` (Unix seconds).
async fn wait_resynced(c: &Cluster, i: usize, since: i64) {
    let client = c.client(i).clone();
    let name = c.replicas[i].name().to_string();
    let outcome = poll_until(
        &format!("{name} to copy back its parts"),
        Duration::from_secs(90),
        Duration::from_millis(250),
        || {
            let client = client.clone();
            async move {
                let response = client.get("/queue").await?;
                let rows: Vec<serde_json::Value> = serde_json::from_slice(&response.body)?;
                let old = rows
                    .iter()
                    .filter(|r| r["type"] == "GET_PART")
                    .filter(|r| r["create_time"].as_i64().is_some_and(|t| t <= since + 1))
                    .count();
                Ok(if old == 0 {
                    Check::Done(())
                } else {
                    Check::Wait(format!("{old} GET_PART entries from before the wipe"))
                })
            }
        },
    )
    .await;
    if let Err(e) = outcome {
        println!("nemesis: {e:#}");
    }
}

async fn restart_replica(c: &mut Cluster, i: usize) {
    c.replicas[i].start_again().expect("restart replica");
    c.replicas[i]
        .wait_ready(READY)
        .await
        .expect("replica ready again");
}

/// Blocking harness calls (ZooKeeper restarts poll with std sleeps) off the async workers.
fn blocking<T>(f: impl FnOnce() -> T) -> T {
    tokio::task::block_in_place(f)
}

/// Waits until replica `observer` sees `n` active replicas.
async fn wait_active(c: &Cluster, observer: usize, n: u32) {
    let client = c.client(observer).clone();
    poll_until(
        &format!("{n} active replicas"),
        READY,
        Duration::from_millis(100),
        || {
            let client = client.clone();
            async move {
                let s = client.status().await?;
                Ok(if s.active_replicas == Some(n) {
                    Check::Done(())
                } else {
                    Check::Wait(format!("active_replicas {:?}", s.active_replicas))
                })
            }
        },
    )
    .await
    .expect("active replica count");
}

fn seed_from_env(var: &str) -> u64 {
    match std::env::var(var) {
        Ok(v) if !v.trim().is_empty() => v
            .trim()
            .parse()
            .unwrap_or_else(|e| panic!("{var}={v} is not a u64: {e}")),
        _ => Rng::random_seed(),
    }
}

fn report_line(name: &str, started: Instant, report: &Report) {
    println!(
        "scenario {name}: {:.1}s, {} acked inserts ({} rows) on {} replicas",
        started.elapsed().as_secs_f64(),
        report.acked,
        report.acked_rows,
        report.live_replicas
    );
}

/// An HTTP client for one-off big inserts.
fn big_http() -> reqwest::Client {
    reqwest::Client::builder()
        .connect_timeout(Duration::from_secs(1))
        .timeout(Duration::from_secs(60))
        .build()
        .expect("http client")
}

/// A big insert into its own partition (`month`), so its part is recognisable on disk.
fn big_plan(checker: &Checker, prefix: &str, month: u32) -> InsertPlan {
    let mut plan = checker.plan(prefix, 12_000, 400, false);
    plan.month = month;
    plan
}

/// Retries `plan` with its token on the given targets until acknowledged.
async fn retry_until_acked(checker: &Checker, plan: &InsertPlan, targets: &[Target]) {
    let http = big_http();
    let body = plan.body();
    let deadline = Instant::now() + PROGRESS;
    let mut k = 0;
    loop {
        let t = &targets[k % targets.len()];
        let a = checker
            .try_insert(&http, &t.url, &t.name, plan, &body, None)
            .await;
        if matches!(a, Attempt::Acked { .. }) {
            return;
        }
        assert!(
            Instant::now() < deadline,
            "insert {} never acknowledged; last try {a:?}",
            plan.token
        );
        k += 1;
        tokio::time::sleep(Duration::from_millis(200)).await;
    }
}

/// Polls `dir` (a replica's `parts` directory) until an entry starting with `prefix`
/// exists; `false` when `done_prefix` shows up first (the moment passed) or at timeout.
fn wait_for_entry(dir: &Path, prefix: &str, done_prefix: &str, timeout: Duration) -> bool {
    let deadline = Instant::now() + timeout;
    while Instant::now() < deadline {
        if let Ok(entries) = std::fs::read_dir(dir) {
            let mut done = false;
            for e in entries.flatten() {
                let name = e.file_name();
                let name = name.to_string_lossy();
                if name.starts_with(prefix) {
                    return true;
                }
                if name.starts_with(done_prefix) {
                    done = true;
                }
            }
            if done {
                return false;
            }
        }
        std::thread::sleep(Duration::from_millis(2));
    }
    false
}

fn leftover_entries(dir: &Path, prefix: &str) -> Vec<String> {
    std::fs::read_dir(dir)
        .map(|entries| {
            entries
                .flatten()
                .map(|e| e.file_name().to_string_lossy().into_owned())
                .filter(|n| n.starts_with(prefix))
                .collect()
        })
        .unwrap_or_default()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn sigkill_of_a_replica_mid_insert_and_mid_fetch() {
    let _serial = serial();
    let started = Instant::now();
    let mut c = start_cluster().await;
    let checker = Arc::new(Checker::new());
    let all = targets(&c);
    let driver = Driver::start(
        all.clone(),
        checker.clone(),
        DriverConfig {
            clients: 2,
            prefix: "bg".into(),
            seed: 11,
            ..DriverConfig::default()
        },
    );
    wait_acks(&checker, 5, PROGRESS).await.unwrap();
    let http = big_http();

    // Mid-insert, twice: killed while the big body is being written (on a timer), then
    // while its commit is in flight (its `staged_` part is on disk). The client retries
    // the same token on another replica.
    for round in 0..2usize {
        let victim = round;
        let month = 6 + round as u32;
        let plan = big_plan(&checker, &format!("mid-insert-{round}"), month);
        let body = plan.body();
        let t = all[victim].clone();
        let send = {
            let checker = checker.clone();
            let http = http.clone();
            let plan = plan.clone();
            tokio::spawn(async move {
                checker
                    .try_insert(&http, &t.url, &t.name, &plan, &body, None)
                    .await
            })
        };
        let parts_dir = c.replicas[victim].data_dir().join("parts");
        if round == 0 {
            tokio::time::sleep(Duration::from_millis(150)).await;
        } else {
            let staged = blocking(|| {
                wait_for_entry(
                    &parts_dir,
                    &format!("staged_2025{month:02}_"),
                    &format!("2025{month:02}_"),
                    Duration::from_secs(30),
                )
            });
            println!("mid-insert round {round}: staged part seen before the kill: {staged}");
        }
        c.replicas[victim].kill().expect("SIGKILL mid-insert");
        let attempt = send.await.expect("insert task");
        println!("mid-insert round {round}: the killed try ended as {attempt:?}");
        restart_replica(&mut c, victim).await;
        let others: Vec<Target> = all
            .iter()
            .enumerate()
            .filter(|(i, _)| *i != victim)
            .map(|(_, t)| t.clone())
            .collect();
        retry_until_acked(&checker, &plan, &others).await;
    }

    // Mid-fetch, at least twice and until one kill lands mid-fetch: a big part is inserted
    // on events-0; a peer is killed while its `tmp-fetch_` directory for that part
    // exists, then restarted.
    let mut mid_fetch_kills = 0;
    for round in 0..4usize {
        if round >= 2 && mid_fetch_kills > 0 {
            break;
        }
        let fetcher = 2 - round % 2;
        let month = 8 + round as u32;
        let plan = big_plan(&checker, &format!("mid-fetch-{round}"), month);
        let body = plan.body();
        let parts_dir = c.replicas[fetcher].data_dir().join("parts");
        let send = {
            let checker = checker.clone();
            let http = http.clone();
            let plan = plan.clone();
            let t = all[0].clone();
            tokio::spawn(async move {
                checker
                    .try_insert(&http, &t.url, &t.name, &plan, &body, None)
                    .await
            })
        };
        let fetching = blocking(|| {
            wait_for_entry(
                &parts_dir,
                &format!("tmp-fetch_2025{month:02}_"),
                &format!("2025{month:02}_"),
                Duration::from_secs(60),
            )
        });
        c.replicas[fetcher].kill().expect("SIGKILL mid-fetch");
        if fetching {
            mid_fetch_kills += 1;
        }
        println!("mid-fetch round {round}: killed events-{fetcher} mid-fetch: {fetching}");
        let attempt = send.await.expect("insert task");
        assert!(
            matches!(attempt, Attempt::Acked { .. }),
            "the big insert on events-0 failed: {attempt:?}"
        );
        restart_replica(&mut c, fetcher).await;
    }
    assert!(
        mid_fetch_kills > 0,
        "no kill landed while a fetch was in progress"
    );
    wait_more_acks(&checker, 5, PROGRESS).await.unwrap();
    driver.stop().await;
    let report = checker.verify(&c).await.expect("checker");
    for r in &c.replicas {
        let dir = r.data_dir().join("parts");
        let left = leftover_entries(&dir, "tmp-fetch_");
        assert!(left.is_empty(), "{}: leftover downloads {left:?}", r.name());
    }
    assert!(report.acked >= 10);
    report_line("sigkill_mid_insert_and_mid_fetch", started, &report);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn sigkill_of_the_zookeeper_leader_under_load() {
    let _serial = serial();
    let started = Instant::now();
    let mut c = start_cluster().await;
    let checker = Arc::new(Checker::new());
    // No retries: inserts cut off by the leader's death stay unknown (at most once).
    let driver = Driver::start(
        targets(&c),
        checker.clone(),
        DriverConfig {
            clients: 4,
            retry: false,
            seed: 21,
            ..DriverConfig::default()
        },
    );
    for round in 0..2 {
        wait_more_acks(&checker, 20, PROGRESS).await.unwrap();
        let leader = blocking(|| c.zk.leader_index()).expect("a leader");
        println!(
            "round {round}: SIGKILL ZooKeeper leader node {}",
            leader + 1
        );
        blocking(|| c.zk.kill(leader)).expect("kill the leader");
        // Inserts resume under the new leader while the old one is down.
        wait_more_acks(&checker, 20, PROGRESS)
            .await
            .expect("inserts resume without the old leader");
        blocking(|| c.zk.restart(leader)).expect("restart the old leader");
    }
    wait_more_acks(&checker, 10, PROGRESS).await.unwrap();
    driver.stop().await;
    let report = checker.verify(&c).await.expect("checker");
    assert!(report.acked >= 60);
    report_line("zookeeper_leader_sigkill", started, &report);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn losing_one_zookeeper_follower_is_invisible_to_clients() {
    let _serial = serial();
    let started = Instant::now();
    // A production-like session timeout: the replicas connected to the lost member must
    // move to another one within it, on a machine the whole cluster shares.
    let mut c = Cluster::start(ClusterOptions {
        session_timeout_ms: 10_000,
        ..ClusterOptions::ensemble()
    })
    .await
    .expect("cluster starts");
    let checker = Arc::new(Checker::new());
    // No retries and a generous attempt timeout: any error a client sees is a failure.
    let driver = Driver::start(
        targets(&c),
        checker.clone(),
        DriverConfig {
            clients: 4,
            retry: false,
            attempt_timeout: Duration::from_secs(20),
            seed: 23,
            ..DriverConfig::default()
        },
    );
    for round in 0..2 {
        wait_more_acks(&checker, 20, PROGRESS).await.unwrap();
        let leader = blocking(|| c.zk.leader_index()).expect("a leader");
        let follower = (leader + 1 + round) % c.zk.size();
        println!(
            "round {round}: SIGKILL ZooKeeper follower node {}",
            follower + 1
        );
        // Sidecars connected to it move to another member within their session.
        blocking(|| c.zk.kill(follower)).expect("kill a follower");
        wait_more_acks(&checker, 20, PROGRESS)
            .await
            .expect("inserts go on without the follower");
        blocking(|| c.zk.restart(follower)).expect("restart the follower");
    }
    wait_more_acks(&checker, 10, PROGRESS).await.unwrap();
    driver.stop().await;
    let report = checker.verify(&c).await.expect("checker");
    assert!(report.acked >= 50);
    assert_eq!(
        (
            report.tries_503,
            report.tries_other_5xx,
            report.tries_timeout,
            report.tries_connection,
            report.tries_4xx
        ),
        (0, 0, 0, 0, 0),
        "a client saw the follower go: {report}"
    );
    report_line("zookeeper_follower_sigkill", started, &report);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn session_expiry_by_sigstop_past_the_session_timeout() {
    let _serial = serial();
    let started = Instant::now();
    let mut c = start_cluster().await;
    let checker = Arc::new(Checker::new());
    let driver = Driver::start(
        targets(&c),
        checker.clone(),
        DriverConfig {
            clients: 4,
            attempt_timeout: Duration::from_secs(2),
            seed: 31,
            ..DriverConfig::default()
        },
    );
    for victim in [1usize, 0] {
        let observer = (victim + 1) % 3;
        wait_more_acks(&checker, 10, PROGRESS).await.unwrap();
        let frozen = Instant::now();
        c.replicas[victim].stop().expect("SIGSTOP");
        // Its session expires: the others see its is_active node vanish.
        wait_active(&c, observer, 2).await;
        let expired_after = frozen.elapsed();
        assert!(
            expired_after >= Duration::from_millis(SESSION_MS / 2),
            "is_active vanished after {expired_after:?}, before the session could expire"
        );
        wait_more_acks(&checker, 10, PROGRESS)
            .await
            .expect("inserts go on while a replica is frozen");
        c.replicas[victim].cont().expect("SIGCONT");
        println!(
            "{} frozen {:.1}s (session expired after {:.1}s)",
            c.replicas[victim].name(),
            frozen.elapsed().as_secs_f64(),
            expired_after.as_secs_f64()
        );
        // It notices the expiry, opens a new session and is writable again, no restart.
        c.replicas[victim]
            .wait_ready(READY)
            .await
            .expect("ready after SIGCONT");
        wait_active(&c, observer, 3).await;
    }
    wait_more_acks(&checker, 10, PROGRESS).await.unwrap();
    driver.stop().await;
    let report = checker.verify(&c).await.expect("checker");
    assert!(report.acked >= 50);
    report_line("session_expiry_sigstop", started, &report);
}

/// A replica frozen between ZooKeeper applying its insert's commit and reading the reply
/// comes back on a new session with the reply lost. Its new session must keep
/// `replicas/<me>/parts/<part>` while the committer resolves the outcome from it: CI once
/// saw the new session forget the part and re-queue a fetch of it, the resolver then read
/// "not committed" and discarded the only copy, and the client's retry was acknowledged
/// as a duplicate of rows no replica held. The `commit_reply_lost` failpoint holds the
/// reply until the new session is active, so the race happens on every run.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_commit_reply_lost_to_a_session_expiry_keeps_the_part() {
    let _serial = serial();
    let started = Instant::now();
    let c = Cluster::start(ClusterOptions {
        session_timeout_ms: SESSION_MS,
        env: vec![(
            "RTABLE_FAILPOINTS".to_string(),
            "commit_reply_lost".to_string(),
        )],
        ..ClusterOptions::ensemble()
    })
    .await
    .expect("cluster starts");
    // A session that ends while the cluster is still settling would send the commit down
    // the unknown-outcome path, which never reaches the failpoint.
    wait_active(&c, 0, 3).await;
    let checker = Arc::new(Checker::new());
    let plan = checker.plan("reply-lost", 20, 0, false);
    let insert = {
        let (checker, plan) = (checker.clone(), plan.clone());
        let (url, name) = (c.replicas[0].url(), c.replicas[0].name().to_string());
        tokio::spawn(async move {
            let body = plan.body();
            checker
                .try_insert(&big_http(), &url, &name, &plan, &body, None)
                .await
        })
    };
    // The commit is applied: ZooKeeper lists the part while the client still waits.
    let zk = c.zk_client().await.expect("zk client");
    let parts = c.paths().replica(c.replicas[0].name()).parts();
    let committed = poll_until(
        "the insert's commit",
        PROGRESS,
        Duration::from_millis(50),
        || {
            let (zk, parts) = (zk.clone(), parts.clone());
            async move {
                let children = zk.list_children(&parts).await?;
                Ok(match children.first() {
                    Some(part) => Check::Done(part.clone()),
                    None => Check::Wait("no part listed yet".to_string()),
                })
            }
        },
    )
    .await
    .expect("commit applied");
    assert!(
        !insert.is_finished(),
        "the failpoint did not hold the reply"
    );
    c.replicas[0].stop().expect("SIGSTOP");
    wait_active(&c, 1, 2).await;
    c.replicas[0].cont().expect("SIGCONT");
    let attempt = insert.await.expect("insert task");
    assert_eq!(
        attempt,
        Attempt::Acked {
            deduplicated: false
        },
        "the committed insert is acknowledged as committed by its own try"
    );
    let log = std::fs::read_to_string(c.replicas[0].log_path()).expect("replica log");
    assert!(
        log.contains("failpoint commit_reply_lost"),
        "the failpoint never fired; the commit's path in events-0's log:\n{}",
        log.lines()
            .filter(|l| l.contains("commit") || l.contains("session"))
            .collect::<Vec<_>>()
            .join("\n")
    );
    let report = checker.verify(&c).await.expect("checker");
    assert_eq!((report.acked, report.acked_rows), (1, 20));
    let still = zk.list_children(&parts).await.expect("parts of events-0");
    assert!(
        still.contains(&committed),
        "events-0 forgot its part {committed}: {still:?}"
    );
    report_line("commit_reply_lost", started, &report);
}

/// A replica that dies after installing a fetched part but before recording it in
/// ZooKeeper finds the part "unexpected" at restart. Its queue still holds the GET that
/// produced it, which proves the part: it is kept and recorded, not set aside as
/// `unexpected_*` and fetched again. The failpoint kills both followers in that gap.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_part_fetched_but_not_recorded_before_a_crash_is_kept() {
    let _serial = serial();
    let started = Instant::now();
    let mut c = Cluster::start(ClusterOptions {
        session_timeout_ms: SESSION_MS,
        env: vec![(
            "RTABLE_FAILPOINTS".to_string(),
            "crash_before_recording_fetch".to_string(),
        )],
        ..ClusterOptions::ensemble()
    })
    .await
    .expect("cluster starts");
    let checker = Arc::new(Checker::new());
    let plan = checker.plan("fetch-crash", 20, 0, false);
    let body = plan.body();
    let (url, name) = (c.replicas[0].url(), c.replicas[0].name().to_string());
    let attempt = checker
        .try_insert(&big_http(), &url, &name, &plan, &body, None)
        .await;
    assert_eq!(
        attempt,
        Attempt::Acked {
            deduplicated: false
        }
    );
    for i in [1usize, 2] {
        let deadline = Instant::now() + PROGRESS;
        while c.replicas[i].is_running() {
            assert!(
                Instant::now() < deadline,
                "{} never hit the failpoint",
                c.replicas[i].name()
            );
            tokio::time::sleep(Duration::from_millis(50)).await;
        }
    }
    for i in [1usize, 2] {
        c.replicas[i].start_again().expect("restart");
    }
    for i in [1usize, 2] {
        c.replicas[i].wait_ready(READY).await.expect("ready again");
    }
    let report = checker.verify(&c).await.expect("checker");
    assert_eq!((report.acked, report.acked_rows), (1, 20));
    for i in [1usize, 2] {
        let detached: Vec<String> = std::fs::read_dir(c.replicas[i].data_dir().join("detached"))
            .map(|d| {
                d.flatten()
                    .map(|e| e.file_name().to_string_lossy().into_owned())
                    .collect()
            })
            .unwrap_or_default();
        assert!(
            detached.is_empty(),
            "{} set aside {detached:?} instead of recording the fetched part",
            c.replicas[i].name()
        );
        let fetches = c
            .client(i)
            .metric("rtable_fetches_total")
            .await
            .expect("metrics");
        assert_eq!(
            fetches.unwrap_or(0.0),
            0.0,
            "{} fetched the part again after the restart",
            c.replicas[i].name()
        );
    }
    report_line("fetch_not_recorded_crash", started, &report);
}

/// A quorum insert whose quorum is not reached within `insert_quorum_timeout` (one of
/// the three replicas frozen, its session still alive so it still counts as active) is
/// answered "outcome unknown", never as failed or acknowledged: the part stays committed
/// and reaches its quorum once the replica thaws, and the client's retry with the same
/// token is acknowledged as a duplicate, so the rows land exactly once.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_quorum_timeout_is_an_unknown_outcome_and_the_retry_lands_once() {
    let _serial = serial();
    let started = Instant::now();
    let c = Cluster::start(ClusterOptions {
        session_timeout_ms: 15_000,
        env: vec![(
            "RTABLE_INSERT_QUORUM_TIMEOUT_MS".to_string(),
            "1500".to_string(),
        )],
        ..ClusterOptions::ensemble()
    })
    .await
    .expect("cluster starts");
    let checker = Arc::new(Checker::new());
    let plan = checker.plan("quorum-timeout", 10, 0, false);
    let body = plan.body();
    let (url, name) = (c.replicas[0].url(), c.replicas[0].name().to_string());
    c.replicas[2].stop().expect("SIGSTOP");
    let first = checker
        .try_insert(&big_http(), &url, &name, &plan, &body, Some(3))
        .await;
    c.replicas[2].cont().expect("SIGCONT");
    match &first {
        Attempt::Unavailable { status: 503, error } => assert!(
            error.contains("outcome unknown") && error.contains("insert_quorum_timeout"),
            "the 503 must say the outcome is unknown and why: {error}"
        ),
        other => panic!("a timed-out quorum must be an unknown outcome (503), got {other:?}"),
    }
    // The thawed replica fetches the part and completes the quorum; the node goes.
    let zk = c.zk_client().await.expect("zk client");
    let parallel = c.paths().quorum_parallel();
    poll_until(
        "the quorum to complete",
        PROGRESS,
        Duration::from_millis(100),
        || {
            let (zk, parallel) = (zk.clone(), parallel.clone());
            async move {
                let pending = zk.list_children(&parallel).await?;
                Ok(if pending.is_empty() {
                    Check::Done(())
                } else {
                    Check::Wait(format!("pending quorums {pending:?}"))
                })
            }
        },
    )
    .await
    .expect("quorum completes after the thaw");
    let retry = checker
        .try_insert(&big_http(), &url, &name, &plan, &body, Some(3))
        .await;
    assert_eq!(retry, Attempt::Acked { deduplicated: true });
    let report = checker.verify(&c).await.expect("checker");
    assert_eq!((report.acked, report.acked_rows), (1, 10));
    assert_eq!(report.tries_503, 1);
    report_line("quorum_timeout", started, &report);
}

/// A quorum insert's part handed off to a peer is recorded for it by the commit while
/// the peer's fsync still runs; the insert is acknowledged only once the peer says the
/// copy is durable. Here that fsync fails (the `handoff_fsync_fails` failpoint, armed on
/// every replica, so whichever follower is chosen fails): the peer discards its copy, the
/// client is told the outcome is unknown rather than acknowledged, the peer's GET entry
/// fetches the part instead, and the retry with the same token is acknowledged as a
/// duplicate: the rows land exactly once on every replica.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_peer_whose_handoff_fsync_fails_is_not_counted_for_the_quorum() {
    let _serial = serial();
    let started = Instant::now();
    let c = Cluster::start(ClusterOptions {
        // Only the followers are handed parts: replica 0 takes every insert.
        env: vec![(
            "RTABLE_FAILPOINTS".to_string(),
            "handoff_fsync_fails".to_string(),
        )],
        ..ClusterOptions::ensemble()
    })
    .await
    .expect("cluster starts");
    wait_active(&c, 0, 3).await;
    let checker = Arc::new(Checker::new());
    let plan = checker.plan("handoff-fsync", 10, 0, false);
    let body = plan.body();
    let (url, name) = (c.replicas[0].url(), c.replicas[0].name().to_string());
    let first = checker
        .try_insert(&big_http(), &url, &name, &plan, &body, Some(2))
        .await;
    match &first {
        Attempt::Unavailable { status: 503, error } => assert!(
            error.contains("outcome unknown") && error.contains("did not confirm its copy durable"),
            "the 503 must say the outcome is unknown and why: {error}"
        ),
        other => panic!("an unconfirmed handoff must be an unknown outcome (503), got {other:?}"),
    }
    let failed_on: Vec<usize> = (1..3)
        .filter(|&i| {
            std::fs::read_to_string(c.replicas[i].log_path())
                .is_ok_and(|log| log.contains("cannot write or fsync a handed-off part"))
        })
        .collect();
    assert_eq!(
        failed_on.len(),
        1,
        "exactly one peer was handed the part and failed its fsync"
    );
    let retry = checker
        .try_insert(&big_http(), &url, &name, &plan, &body, Some(2))
        .await;
    assert_eq!(retry, Attempt::Acked { deduplicated: true });
    let report = checker.verify(&c).await.expect("checker");
    assert_eq!((report.acked, report.acked_rows), (1, 10));
    assert_eq!(report.tries_503, 1);
    report_line("handoff_fsync_fails", started, &report);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn full_restart_of_every_process_under_load() {
    let _serial = serial();
    let started = Instant::now();
    let mut c = start_cluster().await;
    let checker = Arc::new(Checker::new());
    let driver = Driver::start(
        targets(&c),
        checker.clone(),
        DriverConfig {
            clients: 4,
            attempt_timeout: Duration::from_secs(3),
            retry_deadline: Duration::from_secs(90),
            seed: 41,
            ..DriverConfig::default()
        },
    );
    for round in 0..2 {
        wait_more_acks(&checker, 20, PROGRESS).await.unwrap();
        println!("round {round}: SIGKILL every sidecar and every ZooKeeper node");
        for r in &mut c.replicas {
            r.kill().expect("SIGKILL sidecar");
        }
        blocking(|| c.zk.kill_all()).expect("SIGKILL ZooKeeper");
        blocking(|| c.zk.start_stopped(Duration::from_secs(60))).expect("ensemble back");
        for r in &mut c.replicas {
            r.start_again().expect("start sidecar");
        }
        for r in &mut c.replicas {
            r.wait_ready(READY).await.expect("sidecar ready");
        }
    }
    wait_more_acks(&checker, 20, PROGRESS).await.unwrap();
    driver.stop().await;
    let report = checker.verify(&c).await.expect("checker");
    assert!(report.acked >= 60);
    assert!(report.acked_after_retry > 0 || report.unknown_present + report.unknown_absent > 0);
    report_line("full_restart", started, &report);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]

async fn one_replica_disk_wiped() {
    let _serial = serial();
    let started = Instant::now();
    let mut c = start_cluster().await;
    let checker = Arc::new(Checker::new());
    // Quorum 2: an acknowledged part is on two disks, so wiping one loses nothing.
    let driver = Driver::start(targets(&c), checker.clone(), disk_fault_load(51));
    for victim in [2usize, 0] {
        wait_more_acks(&checker, 20, PROGRESS).await.unwrap();
        let before = c.client((victim + 1) % 3).status().await.expect("status");
        println!(
            "wiping {} ({} rows in {} parts cluster-wide)",
            c.replicas[victim].name(),
            before.rows,
            before.parts.len()
        );
        c.replicas[victim].kill().expect("SIGKILL");
        c.replicas[victim].wipe_data_dir().expect("rm -rf data dir");
        let wiped_at = chrono::Utc::now().timestamp();
        restart_replica(&mut c, victim).await;
        // Quorum 2 keeps every acknowledged part on two disks only once the wiped replica
        // has its copies back; wiping the next one before that could lose the only copy.
        wait_resynced(&c, victim, wiped_at).await;
    }
    wait_more_acks(&checker, 20, PROGRESS).await.unwrap();
    driver.stop().await;
    let report = checker.verify(&c).await.expect("checker");
    assert!(report.acked >= 60);
    report_line("disk_wiped", started, &report);
}

/// Load for the disk faults: quorum 2 keeps every acknowledged part on two disks, so
/// damaging or wiping one copy loses nothing.
fn disk_fault_load(seed: u64) -> DriverConfig {
    DriverConfig {
        clients: 4,
        quorum: Some(2),
        rows: 20,
        pad: 64,
        seed,
        ..DriverConfig::default()
    }
}

/// Halves `part`'s `data.parquet` on `victim`'s disk (a bad block, bit rot): its footer is
/// gone, so any read of the part fails. False when the part left the disk first.
fn damage_part(c: &Cluster, victim: usize, part: &str) -> bool {
    let file = c.replicas[victim]
        .data_dir()
        .join("parts")
        .join(part)
        .join("data.parquet");
    let Ok(meta) = std::fs::metadata(&file) else {
        return false;
    };
    std::fs::OpenOptions::new()
        .write(true)
        .open(&file)
        .and_then(|f| f.set_len(meta.len() / 2))
        .is_ok()
}

/// The biggest of `victim`'s active parts (the least likely to be merged away next).
async fn biggest_part(c: &Cluster, victim: usize, skip: &[String]) -> Option<String> {
    let status = c.client(victim).status().await.ok()?;
    let parts_dir = c.replicas[victim].data_dir().join("parts");
    status
        .parts
        .iter()
        .filter(|p| !skip.contains(p))
        .filter_map(|p| {
            let size = std::fs::metadata(parts_dir.join(p).join("data.parquet")).ok()?;
            Some((size.len(), p.clone()))
        })
        .max()
        .map(|(_, p)| p)
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_part_damaged_on_disk_is_detached_and_fetched_again() {
    let _serial = serial();
    let started = Instant::now();
    let c = start_cluster().await;
    let checker = Arc::new(Checker::new());
    let driver = Driver::start(targets(&c), checker.clone(), disk_fault_load(71));
    wait_more_acks(&checker, 30, PROGRESS).await.unwrap();
    let victim = 1usize;
    let client = c.client(victim).clone();
    let detached = c.replicas[victim].data_dir().join("detached");
    // A damaged part merged away (or replaced by a fetched merge) before anything read it
    // harms nobody and proves nothing: then damage another one.
    let mut tried = Vec::new();
    let mut repaired = None;
    while repaired.is_none() && tried.len() < 5 {
        let part = biggest_part(&c, victim, &tried)
            .await
            .expect("a part to damage");
        tried.push(part.clone());
        if !damage_part(&c, victim, &part) {
            continue;
        }
        println!("damaged {part} on {}", c.replicas[victim].name());
        let parts_dir = c.replicas[victim].data_dir().join("parts");
        let outcome = poll_until(
            &format!("{part} to be detached as broken"),
            Duration::from_secs(20),
            Duration::from_millis(200),
            || {
                let client = client.clone();
                let broken = detached.join(format!("broken_{part}"));
                let gone = !parts_dir.join(&part).exists();
                async move {
                    // The reads that find it damaged (the first may fail, which is the point).
                    let _ = client.select("JSONEachRow").await;
                    Ok(if broken.exists() {
                        Check::Done(true)
                    } else if gone {
                        Check::Done(false)
                    } else {
                        Check::Wait("not detached yet".to_string())
                    })
                }
            },
        )
        .await
        .expect("the damaged part is detached or merged away");
        if outcome {
            repaired = Some(part);
        }
    }
    let part = repaired.expect("one damaged part was read, detected and detached");
    // The replica serves every row again without a restart, the load going on meanwhile.
    wait_more_acks(&checker, 20, PROGRESS).await.unwrap();
    driver.stop().await;
    let report = checker.verify(&c).await.expect("checker");
    assert!(report.acked >= 50);
    let broken = client
        .metric("rtable_broken_parts_total")
        .await
        .expect("metrics")
        .expect("rtable_broken_parts_total");
    assert!(broken >= 1.0, "rtable_broken_parts_total {broken}");
    // Detached, never deleted: the damaged copy stays for inspection.
    assert!(
        detached
            .join(format!("broken_{part}"))
            .join("checksums.txt")
            .exists()
    );
    report_line("damaged_part", started, &report);
}

async fn is_lost(c: &Cluster, zk: &zookeeper_client::Client, replica: &str) -> Option<String> {
    rtable_protocol::tree::get_string(zk, &c.paths().replica(replica).is_lost())
        .await
        .ok()
        .flatten()
}

async fn wait_is_lost(c: &Cluster, replica: &str, want: &str, timeout: Duration) {
    let zk = c.zk_client().await.expect("zk client");
    let path = c.paths().replica(replica).is_lost();
    poll_until(
        &format!("{path} to be {want}"),
        timeout,
        Duration::from_millis(200),
        || {
            let zk = zk.clone();
            let path = path.clone();
            async move {
                let v = rtable_protocol::tree::get_string(&zk, &path).await?;
                Ok(if v.as_deref().map(str::trim) == Some(want) {
                    Check::Done(())
                } else {
                    Check::Wait(format!("is_lost {v:?}"))
                })
            }
        },
    )
    .await
    .expect("is_lost");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_replica_down_long_enough_is_marked_lost_and_recovers() {
    let _serial = serial();
    let started = Instant::now();
    let mut c = start_cluster().await;
    restart_all_with_args(&mut c, lost_quickly_args()).await;
    let checker = Arc::new(Checker::new());
    let driver = Driver::start(
        targets(&c),
        checker.clone(),
        DriverConfig {
            clients: 4,
            quorum: Some(2),
            seed: 61,
            ..DriverConfig::default()
        },
    );
    wait_acks(&checker, 10, PROGRESS).await.unwrap();
    let victim = 2;
    let name = c.replicas[victim].name().to_string();
    c.replicas[victim].kill().expect("SIGKILL");
    let zk = c.zk_client().await.expect("zk");
    assert_eq!(is_lost(&c, &zk, &name).await.as_deref(), Some("0"));
    // Inserts go on until cleanup drops the log entries it still needs and marks it lost.
    wait_is_lost(&c, &name, "1", Duration::from_secs(90)).await;
    let mut marked = 0.0;
    for r in &c.replicas[..2] {
        let text = r.client().metrics().await.expect("metrics");
        marked += metric_value(&text, "rtable_replicas_marked_lost_total").unwrap_or(0.0);
    }
    assert!(
        marked >= 1.0,
        "is_lost=1 but no replica counts rtable_replicas_marked_lost_total"
    );
    let log_max = c.client(0).status().await.expect("status").log_max_index;
    // Cleanup really removed entries the stopped replica had not pulled yet: that is why
    // it had to be marked lost.
    let pointer: u64 =
        rtable_protocol::tree::get_string(&zk, &c.paths().replica(&name).log_pointer())
            .await
            .expect("log_pointer")
            .and_then(|p| p.trim().parse().ok())
            .expect("a numeric log_pointer");
    let oldest = zk
        .list_children(&c.paths().log())
        .await
        .expect("log")
        .iter()
        .filter_map(|n| rtable_protocol::paths::sequence_of(n))
        .min()
        .expect("log entries");
    assert!(
        oldest > pointer,
        "log cleanup kept everything from {name}'s log_pointer {pointer} (oldest entry {oldest})"
    );
    println!(
        "{name} marked lost (log_pointer {pointer}, oldest log entry {oldest}, log_max_index {log_max:?}, marked by metrics: {marked})"
    );
    wait_more_acks(&checker, 10, PROGRESS).await.unwrap();
    restart_replica(&mut c, victim).await;
    // It clones from a healthy replica and clears its flag.
    wait_is_lost(&c, &name, "0", READY).await;
    wait_more_acks(&checker, 10, PROGRESS).await.unwrap();
    driver.stop().await;
    let report = checker.verify(&c).await.expect("checker");
    assert!(report.acked >= 40);
    report_line("marked_lost", started, &report);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn clients_retry_every_unacknowledged_insert_with_its_token() {
    let _serial = serial();
    let started = Instant::now();
    let mut c = start_cluster().await;
    let checker = Arc::new(Checker::new());
    // Short tries (timeouts become unknown outcomes), one insert in four sent to two
    // replicas at once, one in twenty-five malformed.
    let driver = Driver::start(
        targets(&c),
        checker.clone(),
        DriverConfig {
            clients: 6,
            rows: 20,
            pad: 32,
            attempt_timeout: Duration::from_millis(1500),
            hedge_every: 4,
            poison_every: 25,
            seed: 71,
            ..DriverConfig::default()
        },
    );
    let mut rng = Rng::new(71);
    for round in 0..4 {
        wait_more_acks(&checker, 15, PROGRESS).await.unwrap();
        let victim = rng.below(3) as usize;
        println!("round {round}: SIGKILL {}", c.replicas[victim].name());
        c.replicas[victim].kill().expect("SIGKILL");
        wait_more_acks(&checker, 10, PROGRESS)
            .await
            .expect("retries land on the other replicas");
        restart_replica(&mut c, victim).await;
    }
    wait_more_acks(&checker, 10, PROGRESS).await.unwrap();
    driver.stop().await;
    let report = checker.verify(&c).await.expect("checker");
    assert!(report.acked >= 60);
    assert!(
        report.hedged > 0 && report.acks_deduplicated > 0,
        "{report}"
    );
    assert!(report.acked_after_retry > 0, "{report}");
    assert!(report.poison > 0, "{report}");
    assert_eq!(
        report.unknown_present + report.unknown_absent,
        0,
        "with retries every insert ends acknowledged: {report}"
    );
    report_line("clients_retry_with_token", started, &report);
}

#[derive(Debug, Clone, Copy)]
enum Fault {
    KillReplica,
    KillReplicaDuringBigInsert,
    SigStop,
    KillZkLeader,
    FullRestart,
    WipeDisk,
    DownUntilLost,
}

const FAULTS: [Fault; 7] = [
    Fault::KillReplica,
    Fault::KillReplicaDuringBigInsert,
    Fault::SigStop,
    Fault::KillZkLeader,
    Fault::FullRestart,
    Fault::WipeDisk,
    Fault::DownUntilLost,
];

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn nemesis_soak() {
    let _serial = serial();
    let seed = seed_from_env("RTABLE_NEMESIS_SEED");
    let secs: u64 = std::env::var("RTABLE_NEMESIS_SECS")
        .ok()
        .and_then(|v| v.trim().parse().ok())
        .unwrap_or(150);
    println!("nemesis: seed {seed}, {secs}s (replay with RTABLE_NEMESIS_SEED={seed})");
    eprintln!("nemesis: seed {seed}, {secs}s (replay with RTABLE_NEMESIS_SEED={seed})");
    let started = Instant::now();
    let mut rng = Rng::new(seed);
    let mut c = start_cluster().await;
    restart_all_with_args(&mut c, lost_quickly_args()).await;
    let checker = Arc::new(Checker::new());
    let all = targets(&c);
    // Quorum 2 so that a wiped disk or a cloned lost replica never holds the only copy
    // of an acknowledged part.
    let driver = Driver::start(
        all.clone(),
        checker.clone(),
        DriverConfig {
            clients: 4,
            quorum: Some(2),
            rows: 10,
            pad: 32,
            attempt_timeout: Duration::from_secs(3),
            retry_deadline: Duration::from_secs(90),
            hedge_every: 10,
            poison_every: 40,
            seed,
            prefix: "n".into(),
            ..DriverConfig::default()
        },
    );
    let http = big_http();
    let soak = Duration::from_secs(secs);
    let mut applied = Vec::new();
    wait_acks(&checker, 5, PROGRESS).await.unwrap();
    while started.elapsed() < soak {
        let fault = FAULTS[rng.below(FAULTS.len() as u64) as usize];
        let victim = rng.below(3) as usize;
        let name = c.replicas[victim].name().to_string();
        println!(
            "nemesis {:>6.1}s: {fault:?} on {name}",
            started.elapsed().as_secs_f64()
        );
        match fault {
            Fault::KillReplica => {
                c.replicas[victim].kill().expect("SIGKILL");
                tokio::time::sleep(
                    rng.duration(Duration::from_millis(100), Duration::from_secs(3)),
                )
                .await;
                restart_replica(&mut c, victim).await;
            }
            Fault::KillReplicaDuringBigInsert => {
                let mut plan = checker.plan("nbig", 4000, 200, false);
                plan.month = 6;
                let body = plan.body();
                let source = (victim + 1 + rng.below(2) as usize) % 3;
                let t = all[if rng.below(2) == 0 { victim } else { source }].clone();
                let send = {
                    let (checker, http, plan) = (checker.clone(), http.clone(), plan.clone());
                    tokio::spawn(async move {
                        checker
                            .try_insert(&http, &t.url, &t.name, &plan, &body, Some(2))
                            .await
                    })
                };
                tokio::time::sleep(
                    rng.duration(Duration::from_millis(20), Duration::from_millis(1500)),
                )
                .await;
                c.replicas[victim].kill().expect("SIGKILL");
                let attempt = send.await.expect("insert task");
                restart_replica(&mut c, victim).await;
                if !matches!(attempt, Attempt::Acked { .. }) {
                    retry_until_acked_quorum(&checker, &plan, &all).await;
                }
            }
            Fault::SigStop => {
                c.replicas[victim].stop().expect("SIGSTOP");
                tokio::time::sleep(
                    rng.duration(Duration::from_millis(500), Duration::from_secs(6)),
                )
                .await;
                c.replicas[victim].cont().expect("SIGCONT");
                c.replicas[victim]
                    .wait_ready(READY)
                    .await
                    .expect("ready after SIGCONT");
            }
            Fault::KillZkLeader => {
                let leader = blocking(|| c.zk.leader_index()).expect("a leader");
                blocking(|| c.zk.kill(leader)).expect("kill leader");
                tokio::time::sleep(
                    rng.duration(Duration::from_millis(300), Duration::from_secs(4)),
                )
                .await;
                blocking(|| c.zk.restart(leader)).expect("restart leader");
            }
            Fault::FullRestart => {
                for r in &mut c.replicas {
                    r.kill().expect("SIGKILL");
                }
                blocking(|| c.zk.kill_all()).expect("kill ZooKeeper");
                blocking(|| c.zk.start_stopped(Duration::from_secs(60))).expect("ensemble");
                for r in &mut c.replicas {
                    r.start_again().expect("start");
                }
                for r in &mut c.replicas {
                    r.wait_ready(READY).await.expect("ready");
                }
            }
            Fault::WipeDisk => {
                c.replicas[victim].kill().expect("SIGKILL");
                c.replicas[victim].wipe_data_dir().expect("wipe");
                let wiped_at = chrono::Utc::now().timestamp();
                restart_replica(&mut c, victim).await;
                // Quorum 2 survives one lost disk, not two: like an operator replacing
                // a disk, the nemesis lets the replica copy back what it lost (the GETs
                // its recovery queued) before it may break another disk.
                wait_resynced(&c, victim, wiped_at).await;
            }
            Fault::DownUntilLost => {
                c.replicas[victim].kill().expect("SIGKILL");
                wait_is_lost(&c, &name, "1", Duration::from_secs(90)).await;
                restart_replica(&mut c, victim).await;
                wait_is_lost(&c, &name, "0", READY).await;
            }
        }
        applied.push(fault);
        // Liveness: the cluster takes inserts again after every fault.
        wait_more_acks(&checker, 5, PROGRESS)
            .await
            .unwrap_or_else(|e| {
                panic!("no progress after {fault:?} on {name} (seed {seed}): {e:#}")
            });
        tokio::time::sleep(rng.duration(Duration::from_millis(200), Duration::from_secs(2))).await;
    }
    driver.stop().await;
    let report = checker
        .verify(&c)
        .await
        .unwrap_or_else(|e| panic!("nemesis seed {seed}: {e:#}"));
    println!("nemesis seed {seed}: {} faults: {applied:?}", applied.len());
    assert!(report.acked >= 50);
    report_line("nemesis", started, &report);
}

/// Like `retry_until_acked`, with `insert_quorum=2`.
async fn retry_until_acked_quorum(checker: &Checker, plan: &InsertPlan, targets: &[Target]) {
    let http = big_http();
    let body = plan.body();
    let deadline = Instant::now() + PROGRESS;
    let mut k = 0;
    loop {
        let t = &targets[k % targets.len()];
        let a = checker
            .try_insert(&http, &t.url, &t.name, plan, &body, Some(2))
            .await;
        if matches!(a, Attempt::Acked { .. }) {
            return;
        }
        assert!(
            Instant::now() < deadline,
            "insert {} never acknowledged; last try {a:?}",
            plan.token
        );
        k += 1;
        tokio::time::sleep(Duration::from_millis(200)).await;
    }
}
