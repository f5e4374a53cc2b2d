//! A load driver for fault scenarios: N concurrent client tasks inserting small batches
//! with dedup tokens into random replicas, recording every try in a [`Checker`]. With
//! `retry` on, a client retries every unacknowledged insert with the same token (and the
//! same body) on another replica until it is acknowledged or its deadline passes.

use std::sync::Arc;
use std::sync::atomic::{AtomicBool, Ordering};
use std::time::{Duration, Instant};

use anyhow::Context as _;
use tokio::task::JoinHandle;

use crate::checker::{Attempt, Checker};
use crate::cluster::Cluster;
use crate::poll::{Check, poll_until};

/// A small deterministic PRNG (xorshift64* seeded through splitmix64): scenarios and the
/// nemesis replay exactly from a printed seed.
#[derive(Debug, Clone)]
pub struct Rng(u64);

impl Rng {
    pub fn new(seed: u64) -> Rng {
        let mut z = seed.wrapping_add(0x9E37_79B9_7F4A_7C15);
        z = (z ^ (z >> 30)).wrapping_mul(0xBF58_476D_1CE4_E5B9);
        z = (z ^ (z >> 27)).wrapping_mul(0x94D0_49BB_1331_11EB);
        Rng((z ^ (z >> 31)) | 1)
    }

    pub fn next_u64(&mut self) -> u64 {
        let mut x = self.0;
        x ^= x >> 12;
        x ^= x << 25;
        x ^= x >> 27;
        self.0 = x;
        x.wrapping_mul(0x2545_F491_4F6C_DD1D)
    }

    /// Uniform in `0..n` (`0` when `n == 0`).
    pub fn below(&mut self, n: u64) -> u64 {
        if n == 0 { 0 } else { self.next_u64() % n }
    }

    /// A duration uniform in `lo..=hi`.
    pub fn duration(&mut self, lo: Duration, hi: Duration) -> Duration {
        let span = hi.saturating_sub(lo).as_millis() as u64;
        lo + Duration::from_millis(self.below(span + 1))
    }

    /// A seed from the clock and the process id (for runs without a given seed).
    pub fn random_seed() -> u64 {
        let nanos = std::time::SystemTime::now()
            .duration_since(std::time::UNIX_EPOCH)
            .map(|d| d.as_nanos() as u64)
            .unwrap_or(0);
        Rng::new(nanos ^ (u64::from(std::process::id()) << 32)).next_u64()
    }
}

#[derive(Debug, Clone)]
pub struct DriverConfig {
    /// Concurrent client tasks.
    pub clients: usize,
    /// Rows per insert.
    pub rows: u64,
    /// Pseudo-random bytes per row (part size).
    pub pad: usize,
    /// Retry every unacknowledged insert with its token until acked or `retry_deadline`.
    pub retry: bool,
    pub retry_deadline: Duration,
    /// HTTP timeout of one try; past it the outcome is unknown.
    pub attempt_timeout: Duration,
    /// `insert_quorum` of every insert (the table's when `None`).
    pub quorum: Option<u32>,
    /// One insert in this many goes to two replicas at once with the same token (0: never).
    pub hedge_every: u64,
    /// One insert in this many carries a malformed line every replica must refuse (0: never).
    pub poison_every: u64,
    /// Pause between two inserts of one client.
    pub pause: Duration,
    pub seed: u64,
    /// Token prefix (`<prefix><client>-<insert index>`).
    pub prefix: String,
}

impl Default for DriverConfig {
    fn default() -> Self {
        DriverConfig {
            clients: 4,
            rows: 5,
            pad: 16,
            retry: true,
            retry_deadline: Duration::from_secs(60),
            attempt_timeout: Duration::from_secs(5),
            quorum: None,
            hedge_every: 0,
            poison_every: 0,
            pause: Duration::from_millis(20),
            seed: 1,
            prefix: "c".to_string(),
        }
    }
}

/// One replica as a client sees it: its name and base URL (stable across restarts).
#[derive(Debug, Clone)]
pub struct Target {
    pub name: String,
    pub url: String,
}

/// The targets of every replica of `cluster` (running or not).
pub fn targets(cluster: &Cluster) -> Vec<Target> {
    cluster
        .replicas
        .iter()
        .map(|r| Target {
            name: r.name().to_string(),
            url: r.url(),
        })
        .collect()
}

/// Running client tasks; `stop` ends them after their current insert.
pub struct Driver {
    stop: Arc<AtomicBool>,
    tasks: Vec<JoinHandle<()>>,
}

impl Driver {
    pub fn start(targets: Vec<Target>, checker: Arc<Checker>, cfg: DriverConfig) -> Driver {
        let stop = Arc::new(AtomicBool::new(false));
        let targets = Arc::new(targets);
        let tasks = (0..cfg.clients)
            .map(|n| {
                let stop = stop.clone();
                let targets = targets.clone();
                let checker = checker.clone();
                let cfg = cfg.clone();
                tokio::spawn(async move { client_loop(n, &targets, &checker, &cfg, &stop).await })
            })
            .collect();
        Driver { stop, tasks }
    }

    /// Stops the clients: each finishes (and, with retries, settles) its current insert.
    pub async fn stop(self) {
        self.stop.store(true, Ordering::SeqCst);
        for t in self.tasks {
            let _ = t.await;
        }
    }
}

fn http_client(timeout: Duration) -> reqwest::Client {
    reqwest::Client::builder()
        .connect_timeout(Duration::from_secs(1))
        .timeout(timeout)
        .pool_max_idle_per_host(2)
        .build()
        .expect("building an HTTP client")
}

async fn client_loop(
    n: usize,
    targets: &[Target],
    checker: &Checker,
    cfg: &DriverConfig,
    stop: &AtomicBool,
) {
    let http = http_client(cfg.attempt_timeout);
    let mut rng = Rng::new(cfg.seed.wrapping_add(n as u64 * 7919));
    let count = targets.len() as u64;
    while !stop.load(Ordering::SeqCst) {
        let poison = cfg.poison_every > 0 && rng.below(cfg.poison_every) == 0;
        let plan = checker.plan(&format!("{}{n}", cfg.prefix), cfg.rows, cfg.pad, poison);
        let body = plan.body();
        let mut target = rng.below(count) as usize;
        let deadline = Instant::now() + cfg.retry_deadline;
        let hedge = !poison && cfg.hedge_every > 0 && rng.below(cfg.hedge_every) == 0;
        let mut first = true;
        loop {
            let done = if first && hedge && count > 1 {
                checker.mark_hedged(plan.index);
                let other = (target + 1 + rng.below(count - 1) as usize) % targets.len();
                let (a, b) = tokio::join!(
                    checker.try_insert(
                        &http,
                        &targets[target].url,
                        &targets[target].name,
                        &plan,
                        &body,
                        cfg.quorum
                    ),
                    checker.try_insert(
                        &http,
                        &targets[other].url,
                        &targets[other].name,
                        &plan,
                        &body,
                        cfg.quorum
                    ),
                );
                settled(&a) || settled(&b)
            } else {
                let a = checker
                    .try_insert(
                        &http,
                        &targets[target].url,
                        &targets[target].name,
                        &plan,
                        &body,
                        cfg.quorum,
                    )
                    .await;
                settled(&a)
            };
            first = false;
            if done || !cfg.retry || Instant::now() >= deadline {
                break;
            }
            tokio::time::sleep(rng.duration(Duration::from_millis(50), Duration::from_millis(250)))
                .await;
            if count > 1 {
                target = (target + 1 + rng.below(count - 1) as usize) % targets.len();
            }
        }
        if !cfg.pause.is_zero() {
            tokio::time::sleep(cfg.pause).await;
        }
    }
}

/// Acknowledged, or refused for good (4xx): no retry.
fn settled(a: &Attempt) -> bool {
    matches!(a, Attempt::Acked { .. } | Attempt::Rejected { .. })
}

/// Waits until the checker has seen at least `n` acknowledged inserts.
pub async fn wait_acks(checker: &Checker, n: usize, timeout: Duration) -> anyhow::Result<()> {
    poll_until(
        &format!("{n} acknowledged inserts"),
        timeout,
        Duration::from_millis(50),
        || {
            let acked = checker.acked();
            async move {
                Ok(if acked >= n {
                    Check::Done(())
                } else {
                    Check::Wait(format!("{acked} acknowledged"))
                })
            }
        },
    )
    .await
    .context("clients made no progress")
}

/// Waits for `more` acknowledged inserts beyond the current count.
pub async fn wait_more_acks(
    checker: &Checker,
    more: usize,
    timeout: Duration,
) -> anyhow::Result<()> {
    let target = checker.acked() + more;
    wait_acks(checker, target, timeout).await
}
