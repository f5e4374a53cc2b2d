//! Physical baselines on the bare ZooKeeper ensemble, through the same client library the
//! sidecar uses: the round trip of a multi (create + delete of one node), multi throughput
//! at a given concurrency, and how long a watch takes to fire on another session.

use std::sync::Arc;
use std::sync::atomic::{AtomicU64, Ordering};
use std::time::{Duration, Instant};

use anyhow::Context as _;
use zookeeper_client as zk;

use super::stats::Samples;

pub const ROOT: &str = "/rtable-bench-baseline";

/// A session like a sidecar's (same session and connection timeouts, so the same ping
/// cadence), with the baseline's root node created.
pub async fn session(connect: &str, session_timeout: Duration) -> anyhow::Result<zk::Client> {
    let client = rtable_protocol::tree::connect(connect, session_timeout, session_timeout)
        .await
        .context("connecting the baseline ZooKeeper session")?;
    match client
        .create(
            ROOT,
            b"",
            &rtable_protocol::zk_acl::TreeAcl::open().persistent(),
        )
        .await
    {
        Ok(_) | Err(zk::Error::NodeExists) => Ok(client),
        Err(e) => Err(e).with_context(|| format!("creating {ROOT}")),
    }
}

/// One multi: create `path` and delete it again (what an insert's block-id check does).
pub async fn multi_once(client: &zk::Client, path: &str) -> anyhow::Result<()> {
    let mut multi = client.new_multi_writer();
    multi
        .add_create(
            path,
            b"x",
            &rtable_protocol::zk_acl::TreeAcl::open().persistent(),
        )
        .with_context(|| format!("multi create {path}"))?;
    multi
        .add_delete(path, None)
        .with_context(|| format!("multi delete {path}"))?;
    multi
        .commit()
        .await
        .map_err(|e| anyhow::anyhow!("multi create+delete {path}: {e}"))?;
    Ok(())
}

/// `n` sequential multis; their round trips.
pub async fn multi_latency(client: &zk::Client, n: usize) -> anyhow::Result<Samples> {
    let mut samples = Samples::with_capacity(n);
    for i in 0..n {
        let path = format!("{ROOT}/lat-{i}");
        let started = Instant::now();
        multi_once(client, &path).await?;
        samples.push(started.elapsed());
    }
    Ok(samples)
}

/// The round trip of one bare multi (create + delete of `paced-<i>`).
pub async fn timed_multi(client: &zk::Client, i: usize) -> anyhow::Result<Duration> {
    let path = format!("{ROOT}/paced-{i}");
    let started = Instant::now();
    multi_once(client, &path).await?;
    Ok(started.elapsed())
}

/// `concurrency` tasks doing multis back to back on one session for `window`; completed
/// multis per second.
pub async fn multi_throughput(
    client: &zk::Client,
    concurrency: usize,
    window: Duration,
) -> anyhow::Result<f64> {
    let done = Arc::new(AtomicU64::new(0));
    let started = Instant::now();
    let deadline = started + window;
    let mut tasks = Vec::with_capacity(concurrency);
    for t in 0..concurrency {
        let client = client.clone();
        let done = done.clone();
        tasks.push(tokio::spawn(async move {
            let mut i = 0u64;
            while Instant::now() < deadline {
                multi_once(&client, &format!("{ROOT}/tp-{concurrency}-{t}-{i}")).await?;
                done.fetch_add(1, Ordering::Relaxed);
                i += 1;
            }
            anyhow::Ok(())
        }));
    }
    for task in tasks {
        task.await.context("baseline task panicked")??;
    }
    let elapsed = started.elapsed().as_secs_f64();
    Ok(done.load(Ordering::Relaxed) as f64 / elapsed)
}

/// `n` times: `watcher` watches a node that does not exist yet, `writer` creates it; the
/// time from issuing the create to the watch firing on the other session.
pub async fn watch_latency(
    writer: &zk::Client,
    watcher: &zk::Client,
    n: usize,
) -> anyhow::Result<Samples> {
    let mut samples = Samples::with_capacity(n);
    for i in 0..n {
        let path = format!("{ROOT}/watch-{i}");
        let (stat, watch) = watcher
            .check_and_watch_stat(&path)
            .await
            .with_context(|| format!("watching {path}"))?;
        anyhow::ensure!(stat.is_none(), "{path} exists already");
        let started = Instant::now();
        writer
            .create(
                &path,
                b"x",
                &rtable_protocol::zk_acl::TreeAcl::open().persistent(),
            )
            .await
            .with_context(|| format!("creating {path}"))?;
        tokio::time::timeout(Duration::from_secs(10), watch.changed())
            .await
            .with_context(|| format!("the watch on {path} did not fire"))?;
        samples.push(started.elapsed());
        writer
            .delete(&path, None)
            .await
            .with_context(|| format!("deleting {path}"))?;
    }
    Ok(samples)
}

/// `zk_packets_received` summed over the ensemble's nodes (every node must answer).
pub async fn packets_received(client_ports: &[u16]) -> anyhow::Result<u64> {
    let ports = client_ports.to_vec();
    tokio::task::spawn_blocking(move || {
        let mut sum = 0u64;
        for port in ports {
            let text = rtable_e2e::zk_ensemble::four_letter(port, "mntr")?;
            let map = rtable_e2e::zk_ensemble::parse_mntr(&text);
            let v = map
                .get("zk_packets_received")
                .and_then(|v| v.parse::<u64>().ok())
                .with_context(|| {
                    format!("ZooKeeper on port {port} has no zk_packets_received in mntr")
                })?;
            sum += v;
        }
        anyhow::Ok(sum)
    })
    .await
    .context("mntr task panicked")?
}
