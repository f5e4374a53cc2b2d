//! `rtable-e2e bench`: the benchmark table of BENCHMARKS.md.
//!
//! One run starts a real 3-node ZooKeeper ensemble and three release sidecars of the
//! example table on loopback, and measures every figure next to its physical baseline on
//! the same ensemble, in the same run: insert commit latency against bare multi round
//! trips, acknowledged inserts/s against bare multi throughput, replication lag against a
//! bare watch, ZooKeeper requests per insert (from `mntr`), fetch throughput against a raw
//! loopback HTTP copy of the same bytes, catch-up time, sidecar RSS and idle ZooKeeper
//! traffic. Nothing here runs under `cargo test`.

mod fetch;
mod machine;
mod part_watch;
mod stats;
mod zkbase;

use std::fmt::Write as _;
use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::time::{Duration, Instant, SystemTime};

use anyhow::Context as _;
use zookeeper_client as zk;

use rtable_e2e::client::metric_value;
use rtable_e2e::{Check, Cluster, ClusterOptions, InsertAnswer, poll_until};

use stats::{Samples, count, mib, ms, ratio};

#[derive(Debug, clap::Args)]
pub struct BenchArgs {
    /// Smaller sizes and shorter windows (32 MB part, 500 missed inserts, 10 s idle).
    #[arg(long)]
    pub quick: bool,
    /// Where the report goes.
    #[arg(long, default_value_os_t = rtable_e2e::repo_root().join("BENCHMARKS.md"))]
    pub out: PathBuf,
    /// ZooKeeper session timeout of the replicas and baseline sessions, in milliseconds
    /// (the example manifest's `sessionTimeoutSeconds: 30` by default).
    #[arg(long, default_value_t = 30_000)]
    pub session_timeout_ms: u64,
    /// Run only these figures (`lag`, `fetch`, `latency`, `throughput`, `catchup`; repeatable) instead of the whole table, to
    /// iterate on one figure; the report then holds only those rows.
    #[arg(long, value_parser = ["lag", "fetch", "latency", "throughput", "catchup"])]
    pub only: Vec<String>,
    /// Inserts the catch-up replica misses (5,000, or 500 with `--quick`).
    #[arg(long)]
    pub catchup_inserts: Option<usize>,
    /// Throughput only at these concurrencies (repeatable; 1, 16 and 64 by default), to
    /// iterate on one of them.
    #[arg(long)]
    pub concurrency: Vec<usize>,
}

/// Makes the harness start `target/release/rtable-sidecar` (unless `RTABLE_SIDECAR_BIN`
/// names a binary). Call before any thread starts: it sets an environment variable.
pub fn use_release_sidecar() -> anyhow::Result<()> {
    if std::env::var_os("RTABLE_SIDECAR_BIN").is_some() {
        return Ok(());
    }
    let target = std::env::var_os("CARGO_TARGET_DIR")
        .map(PathBuf::from)
        .unwrap_or_else(|| rtable_e2e::repo_root().join("target"));
    let bin = target.join("release").join("rtable-sidecar");
    anyhow::ensure!(
        bin.exists(),
        "{} is missing: build it first with `cargo build --release -p rtable-sidecar` (the benchmark measures release binaries)",
        bin.display()
    );
    if let (Ok(built), Some(newest)) = (
        std::fs::metadata(&bin).and_then(|m| m.modified()),
        newest_source(),
    ) && newest > built
    {
        eprintln!(
            "bench: warning: {} is older than the sidecar's sources; rebuild it with `cargo build --release -p rtable-sidecar`",
            bin.display()
        );
    }
    // SAFETY: called from `main` before the runtime (or any other thread) starts, so no
    // other thread can read the environment concurrently.
    unsafe { std::env::set_var("RTABLE_SIDECAR_BIN", &bin) };
    Ok(())
}

/// Newest modification time under the sidecar's and protocol's `src`.
fn newest_source() -> Option<SystemTime> {
    fn walk(dir: &Path, newest: &mut Option<SystemTime>) {
        let Ok(entries) = std::fs::read_dir(dir) else {
            return;
        };
        for e in entries.flatten() {
            let path = e.path();
            if path.is_dir() {
                walk(&path, newest);
            } else if let Ok(t) = e.metadata().and_then(|m| m.modified()) {
                *newest = Some(newest.map_or(t, |n: SystemTime| n.max(t)));
            }
        }
    }
    let root = rtable_e2e::repo_root();
    let mut newest = None;
    walk(&root.join("sidecar").join("src"), &mut newest);
    walk(&root.join("protocol").join("src"), &mut newest);
    newest
}

/// The pause before each paced commit-latency measurement.
const PACE: Duration = Duration::from_millis(30);

/// How much of everything to do.
#[derive(Debug, Clone)]
struct Sizes {
    latency_inserts: usize,
    lag_inserts: usize,
    zk_inserts: usize,
    window: Duration,
    catchup_inserts: usize,
    fetch_bytes: u64,
    idle: Duration,
    warm_up: Duration,
}

impl Sizes {
    fn new(quick: bool) -> Sizes {
        if quick {
            Sizes {
                latency_inserts: 200,
                lag_inserts: 100,
                zk_inserts: 50,
                window: Duration::from_secs(3),
                catchup_inserts: 500,
                fetch_bytes: 32 * 1024 * 1024,
                idle: Duration::from_secs(10),
                warm_up: Duration::from_secs(3),
            }
        } else {
            Sizes {
                latency_inserts: 1000,
                lag_inserts: 500,
                zk_inserts: 200,
                window: Duration::from_secs(10),
                catchup_inserts: 5000,
                fetch_bytes: 256 * 1024 * 1024,
                idle: Duration::from_secs(30),
                warm_up: Duration::from_secs(10),
            }
        }
    }
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Met {
    Yes,
    No,
    /// No target for this line.
    Info,
}

impl Met {
    fn from(ok: bool) -> Met {
        if ok { Met::Yes } else { Met::No }
    }

    fn text(self) -> &'static str {
        match self {
            Met::Yes => "yes",
            Met::No => "**NO**",
            Met::Info => "-",
        }
    }
}

#[derive(Debug, Clone)]
struct Row {
    figure: String,
    rtable: String,
    baseline: String,
    ratio: String,
    target: String,
    met: Met,
}

struct Bench {
    cluster: Cluster,
    http: reqwest::Client,
    urls: Vec<String>,
    zk_ports: Vec<u16>,
    seq: Arc<AtomicU64>,
    sizes: Sizes,
    session_timeout: Duration,
    rows: Vec<Row>,
    notes: Vec<String>,
    /// Rows acknowledged so far (all inserts are distinct).
    acked_rows: u64,
    /// Inserts that failed (their rows may or may not be committed).
    failed_inserts: u64,
    /// The throughput windows to run (`--concurrency`, or 1, 16 and 64).
    concurrencies: Vec<usize>,
}

/// Outcome of a batch of concurrent inserts.
struct Load {
    acked: u64,
    failed: u64,
    first_error: Option<String>,
    elapsed: Duration,
    latencies: Samples,
}

enum Limit {
    Window(Duration),
    Count(u64),
}

pub async fn run(args: BenchArgs) -> anyhow::Result<()> {
    rtable_e2e::zk_ensemble::prerequisites()?;
    let mut sizes = Sizes::new(args.quick);
    if let Some(n) = args.catchup_inserts {
        sizes.catchup_inserts = n;
    }
    let session_timeout = Duration::from_millis(args.session_timeout_ms);
    let started_at = chrono::Utc::now();
    let wall = Instant::now();
    println!("bench: starting a 3-node ZooKeeper ensemble and 3 release sidecars...");
    let cluster = Cluster::start(ClusterOptions {
        session_timeout_ms: args.session_timeout_ms,
        // The big-part insert sends ~1.3x its part size as CSV.
        max_body_bytes: Some(
            usize::try_from(sizes.fetch_bytes * 2 + (64 << 20)).unwrap_or(usize::MAX),
        ),
        // Measured as ZooKeeper runs in production, not as the tests start it.
        zk_jit: rtable_e2e::zk_ensemble::Jit::Full,
        ..ClusterOptions::ensemble()
    })
    .await
    .context("starting the benchmark cluster")?;
    let zk_ports: Vec<u16> = (0..cluster.zk.size())
        .filter_map(|i| cluster.zk.client_port(i))
        .collect();
    let urls: Vec<String> = cluster.replicas.iter().map(|r| r.url()).collect();
    let http = reqwest::Client::builder()
        .connect_timeout(Duration::from_secs(2))
        .timeout(Duration::from_secs(600))
        .pool_max_idle_per_host(256)
        .tcp_nodelay(true)
        .build()
        .context("building the HTTP client")?;
    let mut bench = Bench {
        cluster,
        http,
        urls,
        zk_ports,
        seq: Arc::new(AtomicU64::new(1)),
        sizes,
        session_timeout,
        rows: Vec::new(),
        notes: Vec::new(),
        acked_rows: 0,
        failed_inserts: 0,
        concurrencies: if args.concurrency.is_empty() {
            vec![1, 16, 64]
        } else {
            args.concurrency.clone()
        },
    };
    let result = if args.only.is_empty() {
        bench.run_all().await
    } else {
        bench.run_only(&args.only).await
    };
    if let Err(e) = &result {
        eprintln!("bench: failed: {e:#}");
        bench.cluster.dump_logs(40);
    }
    result?;
    let report = bench.report(&args, started_at, wall.elapsed());
    println!("\n{report}");
    std::fs::write(&args.out, &report)
        .with_context(|| format!("writing {}", args.out.display()))?;
    println!("bench: wrote {}", args.out.display());
    Ok(())
}

impl Bench {
    async fn run_all(&mut self) -> anyhow::Result<()> {
        tokio::time::sleep(Duration::from_secs(3)).await;
        let idle_rss = self.rss_all();
        self.idle_zookeeper().await?;
        let base = zkbase::session(&self.cluster.zk.connect_string(), self.session_timeout).await?;
        let watcher =
            zkbase::session(&self.cluster.zk.connect_string(), self.session_timeout).await?;
        self.warm_up(&base).await?;
        self.context_figures(&base).await?;
        let sequential_zk = self.zk_per_insert().await?;
        self.commit_latency(&base).await?;
        self.replication_lag(&base, &watcher).await?;
        // Catch-up and fetch run on a table of a few thousand parts, before the throughput
        // windows leave tens of thousands of small parts behind.
        if let Err(e) = self.catch_up().await {
            self.phase_failed("Catch-up of a replica that missed inserts", &e);
            // Whatever happened, replica 2 should run for the rest.
            if !self.cluster.replicas[2].is_running() {
                self.cluster.replicas[2].start_again()?;
            }
        }
        if let Err(e) = self.wait_converged(Duration::from_secs(600)).await {
            self.notes.push(format!(
                "Before the fetch: the replicas had not converged after 600 s: {e:#}."
            ));
        }
        if let Err(e) = self.fetch().await {
            self.phase_failed("Fetch throughput of a big part", &e);
            if !self.cluster.replicas[2].is_running() {
                self.cluster.replicas[2].start_again()?;
            }
        }
        let load_rss = self.throughput(&base, sequential_zk).await?;
        self.rss_rows(&idle_rss, load_rss);
        let after = self.rss_all();
        self.notes.push(format!(
            "Sidecar RSS at idle after the whole run (parts: thousands of small ones, one big one): {}.",
            rss_list(&after)
        ));
        Ok(())
    }

    /// Load before the timed figures, not counted: the ZooKeeper JVMs compile their hot
    /// paths in the first seconds under load (full JIT, as in production), and a figure
    /// measured during that would time the compiler. The baseline's bare multis get the
    /// same warm-up. Ends once the replicas converged and merges had a moment to settle.
    async fn warm_up(&mut self, base: &zk::Client) -> anyhow::Result<()> {
        let window = self.sizes.warm_up;
        println!(
            "bench: warming up ({}s of inserts at concurrency 16, {}s of bare multis)...",
            window.as_secs(),
            window.as_secs()
        );
        zkbase::multi_throughput(base, 16, window).await?;
        let load = self.load(16, Limit::Window(window), 10, None).await;
        anyhow::ensure!(load.failed == 0, "{} warm-up inserts failed", load.failed);
        self.wait_converged(Duration::from_secs(120)).await?;
        tokio::time::sleep(Duration::from_secs(3)).await;
        self.notes.push(format!(
            "Warm-up before the timed figures (after the idle ones), not counted: {}s of bare multis and {}s of 10-row inserts at concurrency 16 ({} inserts), so that no figure times the ZooKeeper JVMs' JIT compiler.",
            window.as_secs(),
            window.as_secs(),
            load.acked
        ));
        Ok(())
    }

    /// The figures named by `--only`, in table order, on a fresh cluster.
    async fn run_only(&mut self, only: &[String]) -> anyhow::Result<()> {
        tokio::time::sleep(Duration::from_secs(3)).await;
        if only
            .iter()
            .any(|o| o == "lag" || o == "latency" || o == "throughput")
        {
            let base =
                zkbase::session(&self.cluster.zk.connect_string(), self.session_timeout).await?;
            self.warm_up(&base).await?;
        }
        if only.iter().any(|o| o == "lag") {
            let base =
                zkbase::session(&self.cluster.zk.connect_string(), self.session_timeout).await?;
            let watcher =
                zkbase::session(&self.cluster.zk.connect_string(), self.session_timeout).await?;
            self.replication_lag(&base, &watcher).await?;
        }
        if only.iter().any(|o| o == "fetch") {
            self.fetch().await?;
        }
        if only.iter().any(|o| o == "catchup") {
            self.catch_up().await?;
        }
        if only.iter().any(|o| o == "latency" || o == "throughput") {
            let base =
                zkbase::session(&self.cluster.zk.connect_string(), self.session_timeout).await?;
            let sequential_zk = self.zk_per_insert().await?;
            if only.iter().any(|o| o == "latency") {
                self.commit_latency(&base).await?;
            }
            if only.iter().any(|o| o == "throughput") {
                self.throughput(&base, sequential_zk).await?;
            }
        }
        Ok(())
    }

    /// A phase that could not finish: its figure is reported as failed, the run goes on.
    fn phase_failed(&mut self, figure: &str, e: &anyhow::Error) {
        eprintln!("bench: {figure}: failed: {e:#}");
        self.push(Row {
            figure: figure.to_string(),
            rtable: format!("failed: {}", format!("{e:#}").replace('|', "/")),
            baseline: "-".to_string(),
            ratio: "-".to_string(),
            target: "-".to_string(),
            met: Met::No,
        });
    }

    fn pids(&self) -> Vec<(String, Option<u32>)> {
        self.cluster
            .replicas
            .iter()
            .map(|r| (r.name().to_string(), r.pid()))
            .collect()
    }

    fn rss_all(&self) -> Vec<(String, Option<u64>)> {
        self.pids()
            .into_iter()
            .map(|(n, pid)| (n, pid.and_then(machine::rss_bytes)))
            .collect()
    }

    fn push(&mut self, row: Row) {
        println!(
            "bench: {} | rtable {} | baseline {} | {} | target {} | {}",
            row.figure,
            row.rtable,
            row.baseline,
            row.ratio,
            row.target,
            row.met.text()
        );
        self.rows.push(row);
    }

    async fn packets(&self) -> anyhow::Result<u64> {
        zkbase::packets_received(&self.zk_ports).await
    }

    /// Idle traffic of the three replicas, then of three bare sessions on top of them.
    async fn idle_zookeeper(&mut self) -> anyhow::Result<()> {
        let window = self.sizes.idle;
        println!(
            "bench: idle ZooKeeper traffic ({}s with no inserts)...",
            window.as_secs()
        );
        let p0 = self.packets().await?;
        let t0 = Instant::now();
        tokio::time::sleep(window).await;
        let p1 = self.packets().await?;
        let secs = t0.elapsed().as_secs_f64();
        let replicas = self.cluster.replicas.len() as f64;
        let per_replica = (p1 - p0) as f64 / secs / replicas;

        // Baseline: three bare sessions with the same timeouts, idle for the same time.
        let connect = self.cluster.zk.connect_string();
        let mut bare: Vec<zk::Client> = Vec::new();
        for _ in 0..3 {
            bare.push(zkbase::session(&connect, self.session_timeout).await?);
        }
        tokio::time::sleep(Duration::from_secs(1)).await;
        let q0 = self.packets().await?;
        let t1 = Instant::now();
        tokio::time::sleep(window).await;
        let q1 = self.packets().await?;
        let secs_b = t1.elapsed().as_secs_f64();
        drop(bare);
        let with_bare = (q1 - q0) as f64 / secs_b;
        let bare_per_session = ((with_bare - (p1 - p0) as f64 / secs) / 3.0).max(0.0);
        self.push(Row {
            figure: "Idle ZooKeeper requests per replica per second".to_string(),
            rtable: format!("{per_replica:.3}/s"),
            baseline: format!("{bare_per_session:.3}/s (bare session, pings only)"),
            ratio: ratio(Some(per_replica), Some(bare_per_session)),
            target: "< 0.5/s".to_string(),
            met: Met::from(per_replica < 0.5),
        });
        self.notes.push(format!(
            "Idle traffic: {} packets over {secs:.1}s from {} replicas (sum of `zk_packets_received` over the 3 ZooKeeper nodes). \
             Baseline: the same window with 3 extra bare sessions (session timeout {} ms, same connector settings as the sidecar), their share divided by 3.",
            p1 - p0,
            replicas,
            self.session_timeout.as_millis()
        ));
        Ok(())
    }

    /// Context for the latency figures: bare HTTP round trip to a sidecar, and the cost
    /// of an fsync on the disk that holds the parts.
    async fn context_figures(&mut self, base: &zk::Client) -> anyhow::Result<()> {
        let n = 200;
        let mut http_rt = Samples::with_capacity(n);
        let url = format!("{}/healthz", self.urls[0]);
        for _ in 0..n {
            let t = Instant::now();
            let r = self.http.get(&url).send().await.context("GET /healthz")?;
            r.bytes().await.context("reading /healthz")?;
            http_rt.push(t.elapsed());
        }
        let dir = self.cluster.dir().join("fsync-probe");
        let fsync = tokio::task::spawn_blocking(move || fsync_probe(&dir, 100))
            .await
            .context("fsync probe panicked")??;
        let multi = zkbase::multi_latency(base, n).await?;
        self.notes.push(format!(
            "Where an insert's time can go, measured now on this machine: HTTP round trip to a sidecar (GET /healthz) p50 {} / p99 {}; \
             write 4 KiB + fsync file + fsync directory on the parts' disk p50 {} / p99 {} (an insert fsyncs its part's files and directories); \
             bare ZooKeeper multi p50 {} / p99 {}.",
            ms(http_rt.p50()),
            ms(http_rt.p99()),
            ms(fsync.p50()),
            ms(fsync.p99()),
            ms(multi.p50()),
            ms(multi.p99()),
        ));
        Ok(())
    }

    /// ZooKeeper requests per single insert, summed over the ensemble.
    async fn zk_per_insert(&mut self) -> anyhow::Result<f64> {
        let n = self.sizes.zk_inserts;
        println!("bench: ZooKeeper requests per insert ({n} sequential 1-row inserts)...");
        // A warm-up insert, so one-time work (partition nodes) is not counted.
        let warm = self.insert(0, 1, None).await?;
        self.wait_part_everywhere(&warm).await?;
        self.wait_queues_empty(Duration::from_secs(60)).await?;
        let p0 = self.packets().await?;
        let t0 = Instant::now();
        let mut last = warm;
        for _ in 0..n {
            last = self.insert(0, 1, None).await?;
        }
        self.wait_part_everywhere(&last).await?;
        self.wait_queues_empty(Duration::from_secs(60)).await?;
        let p1 = self.packets().await?;
        let secs = t0.elapsed().as_secs_f64();
        let per_insert = (p1 - p0) as f64 / n as f64;
        self.push(Row {
            figure: "ZooKeeper requests per insert (1 insert at a time, 3 replicas)".to_string(),
            rtable: format!("{per_insert:.1}"),
            baseline: "-".to_string(),
            ratio: "-".to_string(),
            target: "<= 12".to_string(),
            met: Met::from(per_insert <= 12.0),
        });
        self.notes.push(format!(
            "ZooKeeper requests per insert: {} packets received by the ensemble over {n} sequential 1-row inserts on replica 0, \
             until every replica held the last part and no queue had a part left to fetch ({secs:.1}s, which includes about {:.1} idle packets per insert of pings and background work at the idle rate).",
            p1 - p0,
            0.0f64.max(secs * self.idle_rate() / n as f64),
        ));
        Ok(per_insert)
    }

    /// Idle packets per second of the whole table, from the idle row.
    fn idle_rate(&self) -> f64 {
        self.rows
            .iter()
            .find(|r| r.figure.starts_with("Idle ZooKeeper"))
            .and_then(|r| r.rtable.trim_end_matches("/s").parse::<f64>().ok())
            .map(|per_replica| per_replica * self.cluster.replicas.len() as f64)
            .unwrap_or(0.0)
    }

    /// A bare session on the ZooKeeper server replica `r`'s session is connected to (its
    /// `is_active` node's owner, looked up in each server's `cons`), and that server as
    /// `node <i>, <mode>`.
    async fn session_beside(
        &self,
        r: usize,
        base: &zk::Client,
    ) -> anyhow::Result<(zk::Client, Option<String>)> {
        let name = &self.cluster.replicas[r].cfg.replica;
        let path = self.cluster.paths().replica(name).is_active();
        let (_, stat) = base
            .get_data(&path)
            .await
            .with_context(|| format!("reading {path}"))?;
        let needle = format!("sid=0x{:x},", stat.ephemeral_owner);
        for i in 0..self.cluster.zk.size() {
            let connections = self.cluster.zk.four_letter(i, "cons")?;
            if !connections.contains(&needle) {
                continue;
            }
            let port = self
                .cluster
                .zk
                .client_port(i)
                .context("the server's client port")?;
            let session =
                zkbase::session(&format!("127.0.0.1:{port}"), self.session_timeout).await?;
            let mode = self
                .cluster
                .zk
                .mode(i)
                .unwrap_or_else(|| "mode unknown".to_string());
            return Ok((session, Some(format!("node {i}, {mode}"))));
        }
        anyhow::bail!("no ZooKeeper server lists replica {name}'s session ({needle})")
    }

    async fn commit_latency(&mut self, base: &zk::Client) -> anyhow::Result<()> {
        let n = self.sizes.latency_inserts;
        let paced_n = n / 2;
        println!(
            "bench: commit latency ({paced_n} paced bare multis and inserts per quorum, then {n} back to back)..."
        );
        // An insert's peers copy its part right after the answer; on this one machine
        // their work shares the inserter's two cores and disk, which a deployment spreads
        // over three nodes. Each paced operation starts once that has settled (replication
        // lag p99 is well under the pause), like the baseline's multis on an idle ensemble.
        // The baseline and both quorum settings take turns, one operation each per round,
        // so a host that slows down or speeds up during the minute this takes moves all
        // three alike instead of skewing their ratio.
        // The baseline's multis go through the ZooKeeper server replica 0's session uses:
        // a follower forwards a write to the leader and answers once it applied it, a
        // leader answers once a quorum logged it, and the two differ (p50 2.20 against
        // 1.95 ms measured on this machine). Each client picks a server at random, so a
        // baseline on another server would move the ratio from run to run.
        let (beside, server) = match self.session_beside(0, base).await {
            Ok(found) => found,
            Err(e) => {
                println!("bench: {e:#}; the baseline uses its own session");
                (base.clone(), None)
            }
        };
        let base = &beside;
        let mut paced_multi = Samples::with_capacity(paced_n);
        let mut lat = [
            Samples::with_capacity(paced_n),
            Samples::with_capacity(paced_n),
        ];
        for i in 0..paced_n {
            tokio::time::sleep(PACE).await;
            paced_multi.push(zkbase::timed_multi(base, i).await?);
            for (quorum, samples) in [1u32, 2].into_iter().zip(lat.iter_mut()) {
                tokio::time::sleep(PACE).await;
                let t = Instant::now();
                self.insert(0, 1, Some(quorum)).await?;
                samples.push(t.elapsed());
            }
        }
        let two_p50 = paced_multi.p50().map(|v| 2.0 * v);
        let two_p99 = paced_multi.p99().map(|v| 2.0 * v);
        for (quorum, lat) in [1u32, 2].into_iter().zip(lat) {
            let p50_ok = matches!((lat.p50(), two_p50), (Some(a), Some(b)) if a <= 1.5 * b);
            self.push(Row {
                figure: format!("Insert commit latency p50 (1 row, quorum {quorum})"),
                rtable: ms(lat.p50()),
                baseline: format!("{} (2 bare multis)", ms(two_p50)),
                ratio: ratio(lat.p50(), two_p50),
                target: "<= 1.5x".to_string(),
                met: Met::from(p50_ok),
            });
            self.push(Row {
                figure: format!("Insert commit latency p99 (1 row, quorum {quorum})"),
                rtable: ms(lat.p99()),
                baseline: format!("{} (2 bare multis)", ms(two_p99)),
                ratio: ratio(lat.p99(), two_p99),
                target: "-".to_string(),
                met: Met::Info,
            });
        }
        let multi = zkbase::multi_latency(base, n).await?;
        let mut back_to_back = Samples::with_capacity(n);
        for _ in 0..n {
            let t = Instant::now();
            self.insert(0, 1, Some(1)).await?;
            back_to_back.push(t.elapsed());
        }
        let b2b_two = multi.p50().map(|v| 2.0 * v);
        self.push(Row {
            figure: "Insert commit latency p50 (1 row, quorum 1, back to back)".to_string(),
            rtable: format!(
                "{} (p99 {})",
                ms(back_to_back.p50()),
                ms(back_to_back.p99())
            ),
            baseline: format!("{} (2 bare multis back to back)", ms(b2b_two)),
            ratio: ratio(back_to_back.p50(), b2b_two),
            target: "-".to_string(),
            met: Met::Info,
        });
        self.notes.push(format!(
            "Commit latency: {paced_n} sequential 1-row inserts on replica 0 per quorum setting, each sent {} ms after the previous answer, timed by the client from sending the request to the answer. \
             Baseline: {paced_n} sequential bare multis (create + delete of one node) on the same ensemble with the same pause, p50 {} / p99 {}, {}. \
             The three take turns (a multi, a quorum-1 insert, a quorum-2 insert, and again), so a change in the shared host's speed during the measurement affects them alike. \
             The pause lets the peers finish copying the previous part first: on this machine they share the inserter's 2 cores and disk, which in a deployment are three nodes' own. \
             Back to back (no pause, the peers replicating each part while the next insert runs): {n} inserts p50 {} / p99 {}, against {n} bare multis back to back p50 {} / p99 {}.",
            PACE.as_millis(),
            ms(paced_multi.p50()),
            ms(paced_multi.p99()),
            match &server {
                Some(server) => format!("on a session connected to the ZooKeeper server replica 0's session uses ({server})"),
                None => "on a session of its own (replica 0's server was not found)".to_string(),
            },
            ms(back_to_back.p50()),
            ms(back_to_back.p99()),
            ms(multi.p50()),
            ms(multi.p99())
        ));
        Ok(())
    }

    async fn replication_lag(
        &mut self,
        base: &zk::Client,
        watcher: &zk::Client,
    ) -> anyhow::Result<()> {
        let n = self.sizes.lag_inserts;
        println!("bench: replication lag ({n} inserts on replica 0, watched on replica 1)...");
        let mut lag = Samples::with_capacity(n);
        let watch_dir = self.cluster.replicas[1].data_dir().join("parts");
        let parts_watch = part_watch::PartWatch::start(&watch_dir)?;
        let parts_watch = Arc::new(parts_watch);
        for _ in 0..n {
            let parts = self.insert(0, 1, None).await?;
            let acked = Instant::now();
            let mut visible = acked;
            for part in parts {
                let w = parts_watch.clone();
                let at =
                    tokio::task::spawn_blocking(move || w.appeared(&part, Duration::from_secs(60)))
                        .await
                        .context("part watcher panicked")??;
                visible = visible.max(at);
            }
            // A part already visible when the answer arrived counts as no lag.
            lag.push(visible.saturating_duration_since(acked));
        }
        let watch = zkbase::watch_latency(base, watcher, n).await?;
        self.push(Row {
            figure: "Replication lag p50 (ack on replica 0 -> visible on replica 1)".to_string(),
            rtable: ms(lag.p50()),
            baseline: format!("{} (bare create -> watch fires)", ms(watch.p50())),
            ratio: ratio(lag.p50(), watch.p50()),
            target: "< 5 ms".to_string(),
            met: Met::from(lag.p50().is_some_and(|v| v < 5.0)),
        });
        self.push(Row {
            figure: "Replication lag p99".to_string(),
            rtable: ms(lag.p99()),
            baseline: format!("{} (bare create -> watch fires)", ms(watch.p99())),
            ratio: ratio(lag.p99(), watch.p99()),
            target: "< 20 ms".to_string(),
            met: Met::from(lag.p99().is_some_and(|v| v < 20.0)),
        });
        self.notes.push(format!(
            "Replication lag: {n} sequential 1-row inserts on replica 0; after each acknowledgement the client waits, woken by inotify on replica 1's part directory, until the part (or a merged part covering it) is there, \
             i.e. renamed into `parts/` by the fetch, the moment it becomes visible to /select. A thread of the client reads the inotify events and stamps each name as it arrives, so the figure does not include the client's own wake-up of its async task. \
             Baseline: a bare session creates a node another bare session watches; time from issuing the create to the watch firing."
        ));
        Ok(())
    }

    /// Inserts/s at concurrency 1, 16, 64 against bare multis/s; returns the peak RSS of
    /// the sidecars during the loaded windows.
    async fn throughput(&mut self, base: &zk::Client, sequential_zk: f64) -> anyhow::Result<u64> {
        let window = self.sizes.window;
        let mut peak_rss = 0u64;
        for concurrency in self.concurrencies.clone() {
            println!(
                "bench: throughput at concurrency {concurrency} ({}s bare multis, {}s 10-row inserts)...",
                window.as_secs(),
                window.as_secs()
            );
            let bare = zkbase::multi_throughput(base, concurrency, window).await?;
            let sampler = RssSampler::start(self.pids());
            let p0 = self.packets().await?;
            let load = self
                .load(concurrency, Limit::Window(window), 10, None)
                .await;
            let settle = Instant::now();
            let settled = self.wait_queues_empty(Duration::from_secs(300)).await;
            let p1 = self.packets().await?;
            peak_rss = peak_rss.max(sampler.stop().await);
            if let Err(e) = &settled {
                self.notes.push(format!(
                    "Concurrency {concurrency}: replication had not caught up when the ZooKeeper count was taken: {e:#}."
                ));
            }
            let settle_secs = settle.elapsed().as_secs_f64();
            let converge = self.wait_converged(Duration::from_secs(300)).await;
            let per_s = load.acked as f64 / load.elapsed.as_secs_f64();
            let (converged, converge_text) = match &converge {
                Ok((rows, t)) => (
                    true,
                    format!(
                        "3 replicas converged on {} rows {:.1}s after the load",
                        count(*rows as f64),
                        t.as_secs_f64() + settle_secs
                    ),
                ),
                Err(e) => (false, format!("replicas did NOT converge: {e:#}")),
            };
            let target_ok = per_s >= 1000.0 && converged && load.failed == 0;
            self.push(Row {
                figure: format!("Acknowledged 10-row inserts/s, concurrency {concurrency}"),
                rtable: format!("{}/s", count(per_s)),
                baseline: format!("{}/s (bare multis)", count(bare)),
                ratio: ratio(Some(per_s), Some(bare)),
                target: if concurrency == 1 {
                    "-".to_string()
                } else {
                    ">= 1,000/s, converged".to_string()
                },
                met: if concurrency == 1 {
                    Met::Info
                } else {
                    Met::from(target_ok)
                },
            });
            let zk_per = (p1 - p0) as f64 / load.acked.max(1) as f64;
            self.notes.push(format!(
                "Concurrency {concurrency}: {} inserts acknowledged in {:.1}s ({} failed{}), client latency p50 {} / p99 {}; {converge_text}; \
                 {:.1} ZooKeeper requests per insert over the load and until no queue had a part left to fetch (merges included).",
                count(load.acked as f64),
                load.elapsed.as_secs_f64(),
                load.failed,
                load.first_error.as_deref().map(|e| format!(", first error: {e}")).unwrap_or_default(),
                ms(load.latencies.p50()),
                ms(load.latencies.p99()),
                zk_per,
            ));
            if concurrency == 64 {
                self.push(Row {
                    figure: "ZooKeeper requests per insert under load (concurrency 64)".to_string(),
                    rtable: format!("{zk_per:.1}"),
                    baseline: format!("{sequential_zk:.1} (1 insert at a time)"),
                    ratio: ratio(Some(zk_per), Some(sequential_zk)),
                    target: "< 1 insert at a time".to_string(),
                    met: Met::from(zk_per < sequential_zk),
                });
            }
        }
        Ok(peak_rss)
    }

    fn rss_rows(&mut self, idle: &[(String, Option<u64>)], load_peak: u64) {
        let idle_max = idle.iter().filter_map(|(_, r)| *r).max();
        self.push(Row {
            figure: "Sidecar RSS at idle (largest of 3)".to_string(),
            rtable: idle_max.map_or("-".to_string(), |b| format!("{:.1} MiB", mib(b))),
            baseline: "-".to_string(),
            ratio: "-".to_string(),
            target: "< 30 MiB".to_string(),
            met: Met::from(idle_max.is_some_and(|b| mib(b) < 30.0)),
        });
        self.push(Row {
            figure: "Sidecar RSS under load (peak of 3, concurrency 1-64)".to_string(),
            rtable: format!("{:.1} MiB", mib(load_peak)),
            baseline: "-".to_string(),
            ratio: "-".to_string(),
            target: "-".to_string(),
            met: Met::Info,
        });
        self.notes.push(format!(
            "RSS: VmRSS from /proc/<pid>/status; idle = 3 s after start, before any insert: {}; under load = sampled every 100 ms during the throughput windows.",
            rss_list(idle)
        ));
    }

    /// Replica 2 misses `catchup_inserts` inserts while killed; time from its restart
    /// until its queue is empty and it holds replica 0's rows.
    async fn catch_up(&mut self) -> anyhow::Result<()> {
        let n = self.sizes.catchup_inserts as u64;
        println!("bench: catch-up of a replica that missed {n} inserts...");
        let lost_before = self.metric_sum("rtable_replicas_marked_lost_total").await;
        // A clean stop (SIGTERM: the sidecar closes its session), so the restart does not
        // wait for a dead session to expire and the figure is the catching up itself.
        self.cluster.replicas[2].terminate(Duration::from_secs(30))?;
        let load = self.load(16, Limit::Count(n), 10, None).await;
        anyhow::ensure!(
            load.failed == 0,
            "{} of the catch-up inserts failed: {}",
            load.failed,
            load.first_error.unwrap_or_default()
        );
        // Replica 0 took every insert itself: once it has nothing to fetch, its rows are
        // the table's rows.
        let expected = self.wait_rows_on(&[0], Duration::from_secs(300)).await?;
        let started = Instant::now();
        self.cluster.replicas[2].start_again()?;
        let r3 = self.cluster.client(2).clone();
        let writable_at: Arc<std::sync::Mutex<Option<Instant>>> = Arc::default();
        let writable = writable_at.clone();
        poll_until(
            "replica 2 to catch up",
            Duration::from_secs(600),
            Duration::from_millis(50),
            || {
                let r3 = r3.clone();
                let writable = writable.clone();
                async move {
                    let s = r3.status().await?;
                    if !s.is_readonly
                        && let Ok(mut w) = writable.lock()
                    {
                        w.get_or_insert_with(Instant::now);
                    }
                    Ok(
                        if s.inserts_in_queue == 0 && s.rows == expected && !s.is_readonly {
                            Check::Done(())
                        } else {
                            Check::Wait(format!(
                                "queue {} rows {} of {expected}",
                                s.queue_size, s.rows
                            ))
                        },
                    )
                }
            },
        )
        .await?;
        let catch_up = started.elapsed();
        let until_active = writable_at
            .lock()
            .ok()
            .and_then(|w| *w)
            .map(|t| t.saturating_duration_since(started));
        let lost_after = self.metric_sum("rtable_replicas_marked_lost_total").await;
        // Baseline: the same replica restarting with nothing to catch up.
        self.cluster.replicas[2].terminate(Duration::from_secs(30))?;
        let restart = Instant::now();
        self.cluster.replicas[2].start_again()?;
        self.cluster.replicas[2]
            .wait_ready(Duration::from_secs(120))
            .await?;
        let r3 = self.cluster.client(2).clone();
        poll_until(
            "replica 2 to report its rows after a restart",
            Duration::from_secs(120),
            Duration::from_millis(50),
            || {
                let r3 = r3.clone();
                async move {
                    let s = r3.status().await?;
                    Ok(if s.inserts_in_queue == 0 && s.rows == expected {
                        Check::Done(())
                    } else {
                        Check::Wait(format!("queue {} rows {}", s.queue_size, s.rows))
                    })
                }
            },
        )
        .await?;
        let restart = restart.elapsed();
        self.push(Row {
            figure: format!(
                "Catch-up of a replica that missed {} inserts",
                count(n as f64)
            ),
            rtable: format!("{:.2} s", catch_up.as_secs_f64()),
            baseline: format!("{:.2} s (restart, nothing missed)", restart.as_secs_f64()),
            ratio: ratio(Some(catch_up.as_secs_f64()), Some(restart.as_secs_f64())),
            target: "-".to_string(),
            met: Met::Info,
        });
        let lost = match (lost_before, lost_after) {
            (Some(a), Some(b)) if b > a => {
                "it was marked lost while down (more log entries than --max-logs-to-keep) and recovered by cloning a healthy replica"
            }
            _ => "it replayed the log entries it missed",
        };
        self.notes.push(format!(
            "Catch-up: replica 2 stopped with SIGTERM, {} 10-row inserts at concurrency 16 on replica 0 ({:.1}s), replica 2 restarted; time from the restart until its /status showed no part left to fetch and the {} rows replica 0 holds; {lost}. \
             Baseline: the same replica stopped the same way and restarted right after, with nothing missed, until its /status showed the same rows and no part left to fetch. \
             Of the catch-up time, {} passed before the replica was active again (a restarted sidecar waits for its previous session's `is_active` node to expire, up to the session timeout, since the stopped process did not close its session).",
            count(n as f64),
            load.elapsed.as_secs_f64(),
            count(expected as f64),
            until_active.map_or("-".to_string(), |d| format!("{:.2} s", d.as_secs_f64())),
        ));
        Ok(())
    }

    /// A big part: replica 1 fetches it from replica 0; against a raw HTTP copy of the
    /// same file over loopback. Both peers are down while the part is inserted, so the
    /// part exists before the fetcher starts, and the fetch is timed by the fetcher itself
    /// (`rtable_fetch_microseconds_total`: from its request to the part's installation).
    async fn fetch(&mut self) -> anyhow::Result<()> {
        let target = self.sizes.fetch_bytes;
        println!(
            "bench: fetch of a ~{:.0} MiB part (generating the rows)...",
            mib(target)
        );
        // Only replica 1 fetches, so its fetch has replica 0's uplink to itself.
        self.cluster.replicas[2].kill()?;
        self.cluster.replicas[1].terminate(Duration::from_secs(30))?;
        let body = big_csv(target, &self.seq);
        let body_len = body.len();
        let inserter = RssSampler::start(vec![(
            self.cluster.replicas[0].name().to_string(),
            self.cluster.replicas[0].pid(),
        )]);
        let t = Instant::now();
        let r = self
            .http
            .post(format!("{}/insert?format=CSV", self.urls[0]))
            .body(body)
            .send()
            .await
            .context("POST the big insert")?;
        let status = r.status();
        let text = r.text().await.context("reading the big insert's answer")?;
        anyhow::ensure!(status.is_success(), "big insert answered {status}: {text}");
        let insert_secs = t.elapsed().as_secs_f64();
        let insert_peak = inserter.stop().await;
        let answer: InsertAnswer =
            serde_json::from_str(&text).with_context(|| format!("big insert answer: {text}"))?;
        let part = answer
            .parts
            .first()
            .cloned()
            .context("the big insert created no part")?;
        self.acked_rows += answer.rows;

        self.cluster.replicas[1].start_again()?;
        let fetcher = RssSampler::start(vec![(
            self.cluster.replicas[1].name().to_string(),
            self.cluster.replicas[1].pid(),
        )]);
        let r2 = self.cluster.client(1).clone();
        let part_name = part.clone();
        poll_until(
            "replica 1 to fetch the big part",
            Duration::from_secs(600),
            Duration::from_millis(20),
            || {
                let r2 = r2.clone();
                let part = part_name.clone();
                async move {
                    let s = r2.status().await?;
                    Ok(if s.parts.contains(&part) {
                        Check::Done(())
                    } else {
                        Check::Wait(format!("parts {}", s.parts.len()))
                    })
                }
            },
        )
        .await?;
        let fetch_peak = fetcher.stop().await;
        // The restarted process counts from zero: its counters are this fetch's alone
        // (plus any part merged on replica 0 meanwhile, which the note reports).
        let metrics = self
            .http
            .get(format!("{}/metrics", self.urls[1]))
            .send()
            .await
            .context("GET replica 1's /metrics")?
            .text()
            .await
            .context("reading replica 1's /metrics")?;
        let counter = |name: &str| {
            metric_value(&metrics, name)
                .with_context(|| format!("replica 1's /metrics has no {name}"))
        };
        let fetched_bytes = counter("rtable_fetched_bytes_total")?;
        let fetch_secs = counter("rtable_fetch_microseconds_total")? / 1e6;
        let fetches = counter("rtable_fetches_total")?;
        anyhow::ensure!(
            fetches >= 1.0 && fetch_secs > 0.0,
            "replica 1 holds the part but counted {fetches} fetches in {fetch_secs}s"
        );

        let data = self.cluster.replicas[0]
            .data_dir()
            .join("parts")
            .join(&part)
            .join("data.parquet");
        let size = std::fs::metadata(&data)
            .with_context(|| format!("stat {}", data.display()))?
            .len();
        let scratch = self.cluster.dir().join("fetch-baseline");
        std::fs::create_dir_all(&scratch)
            .with_context(|| format!("creating {}", scratch.display()))?;
        // The sender side alone: the same part over the interserver endpoint, to a file;
        // and the baseline: the part's data.parquet over a minimal HTTP server on loopback.
        // Three of each, alternating; the median of each counts.
        let server = fetch::FileServer::start(data.clone()).await?;
        let mut via_parts = Vec::new();
        let mut raws = Vec::new();
        for i in 0..3 {
            via_parts.push(
                fetch::download_to_file(
                    &self.http,
                    &format!("{}/parts/{part}", self.urls[0]),
                    &[],
                    &scratch.join(format!("via-parts-endpoint-{i}")),
                )
                .await?,
            );
            raws.push(
                fetch::download_to_file(
                    &self.http,
                    &format!("http://127.0.0.1:{}/data.parquet", server.port),
                    &[],
                    &scratch.join(format!("raw-copy-{i}")),
                )
                .await?,
            );
        }
        drop(server);
        via_parts.sort_by_key(|(_, t)| *t);
        raws.sort_by_key(|(_, t)| *t);
        let (sent, sent_time) = via_parts[1];
        let (raw, raw_time) = raws[1];
        anyhow::ensure!(raw == size, "raw copy got {raw} of {size} bytes");
        let _ = std::fs::remove_dir_all(&scratch);
        let mbps = |bytes: f64, secs: f64| bytes / secs / 1e6;
        let fetch_rate = mbps(fetched_bytes, fetch_secs);
        let raw_rate = mbps(raw as f64, raw_time.as_secs_f64());
        self.push(Row {
            figure: format!(
                "Fetch throughput of a {:.0} MiB part (replica 0 -> replica 1)",
                mib(size)
            ),
            rtable: format!("{fetch_rate:.0} MB/s"),
            baseline: format!("{raw_rate:.0} MB/s (raw loopback HTTP copy)"),
            ratio: ratio(Some(fetch_rate), Some(raw_rate)),
            target: ">= 0.85x".to_string(),
            met: Met::from(fetch_rate >= 0.85 * raw_rate),
        });
        self.notes.push(format!(
            "Fetch: one CSV insert of {:.0} MiB of poorly compressible strings on replica 0 ({insert_secs:.1}s to acknowledge, peak RSS {:.0} MiB) made a {:.1} MiB part \
             while replicas 1 and 2 were down; then replica 1 started and fetched it alone. Timed by replica 1 itself, from its request to the part's installation \
             (download, hash verification, fsync, rename): {fetches:.0} fetch(es), {:.1} MiB in {fetch_secs:.2}s; peak RSS of the fetching sidecar {:.0} MiB. \
             The same part through `GET /parts/<name>` into a file (median of 3): {:.0} MB/s ({} bytes in {:.2}s). \
             Baseline: the part's data.parquet served by a minimal HTTP/1.1 server over loopback, downloaded with reqwest into a file and fsynced: {} bytes in {:.2}s (median of 3, alternating with the `GET /parts` copies).",
            mib(body_len as u64),
            mib(insert_peak),
            mib(size),
            fetched_bytes / 1048576.0,
            mib(fetch_peak),
            mbps(sent as f64, sent_time.as_secs_f64()),
            sent,
            sent_time.as_secs_f64(),
            raw,
            raw_time.as_secs_f64(),
        ));
        self.cluster.replicas[2].start_again()?;
        self.cluster.replicas[2]
            .wait_ready(Duration::from_secs(120))
            .await?;
        Ok(())
    }

    /// One insert of `rows` distinct rows on replica `r`; the parts it created.
    async fn insert(
        &mut self,
        r: usize,
        rows: usize,
        quorum: Option<u32>,
    ) -> anyhow::Result<Vec<String>> {
        let answer = insert_once(&self.http, &self.urls[r], &self.seq, rows, quorum).await?;
        self.acked_rows += answer.rows;
        Ok(answer.parts)
    }

    /// `concurrency` clients inserting `rows`-row batches on replica 0.
    async fn load(
        &mut self,
        concurrency: usize,
        limit: Limit,
        rows: usize,
        quorum: Option<u32>,
    ) -> Load {
        let started = Instant::now();
        let issued = Arc::new(AtomicU64::new(0));
        let mut tasks = Vec::with_capacity(concurrency);
        for _ in 0..concurrency {
            let http = self.http.clone();
            let url = self.urls[0].clone();
            let seq = self.seq.clone();
            let issued = issued.clone();
            let (deadline, max) = match limit {
                Limit::Window(d) => (Some(started + d), u64::MAX),
                Limit::Count(n) => (None, n),
            };
            tasks.push(tokio::spawn(async move {
                let mut acked = 0u64;
                let mut acked_rows = 0u64;
                let mut failed = 0u64;
                let mut first_error = None;
                let mut latencies = Samples::with_capacity(1024);
                loop {
                    if deadline.is_some_and(|d| Instant::now() >= d) {
                        break;
                    }
                    if issued.fetch_add(1, Ordering::Relaxed) >= max {
                        break;
                    }
                    let t = Instant::now();
                    match insert_once(&http, &url, &seq, rows, quorum).await {
                        Ok(a) => {
                            latencies.push(t.elapsed());
                            acked += 1;
                            acked_rows += a.rows;
                        }
                        Err(e) => {
                            failed += 1;
                            first_error.get_or_insert_with(|| format!("{e:#}"));
                            tokio::time::sleep(Duration::from_millis(10)).await;
                        }
                    }
                }
                (acked, acked_rows, failed, first_error, latencies)
            }));
        }
        let mut load = Load {
            acked: 0,
            failed: 0,
            first_error: None,
            elapsed: Duration::ZERO,
            latencies: Samples::default(),
        };
        let mut all: Vec<Samples> = Vec::new();
        for task in tasks {
            match task.await {
                Ok((acked, acked_rows, failed, first_error, latencies)) => {
                    load.acked += acked;
                    self.acked_rows += acked_rows;
                    load.failed += failed;
                    if load.first_error.is_none() {
                        load.first_error = first_error;
                    }
                    all.push(latencies);
                }
                Err(e) => {
                    load.failed += 1;
                    load.first_error
                        .get_or_insert_with(|| format!("client task panicked: {e}"));
                }
            }
        }
        load.elapsed = started.elapsed();
        load.latencies = Samples::merge(all);
        self.failed_inserts += load.failed;
        load
    }

    /// Waits until replicas 1 and 2 hold `parts` or parts covering them (merges run
    /// meanwhile), looking at their part directories: nothing reads ZooKeeper.
    async fn wait_part_everywhere(&self, parts: &[String]) -> anyhow::Result<()> {
        for r in self.cluster.replicas.iter().skip(1) {
            for part in parts {
                let dir = r.data_dir().join("parts");
                let part = part.clone();
                tokio::task::spawn_blocking(move || {
                    wait_covered(&dir, &part, Duration::from_secs(60))
                })
                .await
                .context("part watcher panicked")??;
            }
        }
        Ok(())
    }

    /// Waits until no running replica has a part to fetch (GET_PART entries; merges may
    /// go on) on two polls in a row, through /metrics (which, unlike /status, reads
    /// nothing from ZooKeeper).
    async fn wait_queues_empty(&self, timeout: Duration) -> anyhow::Result<()> {
        let started = Instant::now();
        let mut empty_in_a_row = 0;
        loop {
            let mut total = 0.0;
            for u in &self.urls {
                // A replica that is down has no queue to drain.
                if let Ok(r) = self.http.get(format!("{u}/metrics")).send().await
                    && let Ok(text) = r.text().await
                {
                    total += metric_value(&text, "rtable_inserts_in_queue").unwrap_or(0.0);
                }
            }
            if total == 0.0 {
                empty_in_a_row += 1;
                if empty_in_a_row >= 2 {
                    return Ok(());
                }
            } else {
                empty_in_a_row = 0;
            }
            anyhow::ensure!(
                started.elapsed() < timeout,
                "queues still hold {total} parts to fetch after {}s",
                timeout.as_secs()
            );
            tokio::time::sleep(Duration::from_millis(100)).await;
        }
    }

    /// Waits until no replica has a part to fetch and all have the same row count, at least the
    /// rows acknowledged so far; returns (rows, time waited).
    async fn wait_converged(&self, timeout: Duration) -> anyhow::Result<(u64, Duration)> {
        let started = Instant::now();
        let rows = self.wait_rows_on(&[0, 1, 2], timeout).await?;
        anyhow::ensure!(
            rows >= self.acked_rows,
            "replicas hold {rows} rows but {} were acknowledged",
            self.acked_rows
        );
        if self.failed_inserts == 0 {
            anyhow::ensure!(
                rows == self.acked_rows,
                "replicas hold {rows} rows, {} were acknowledged and none failed",
                self.acked_rows
            );
        }
        Ok((rows, started.elapsed()))
    }

    /// Waits until replicas `which` have no part left to fetch and equal row counts (merges
    /// may still be queued: they do not change rows); returns the row count.
    async fn wait_rows_on(&self, which: &[usize], timeout: Duration) -> anyhow::Result<u64> {
        let clients: Vec<rtable_e2e::ReplicaClient> = which
            .iter()
            .map(|&i| self.cluster.client(i).clone())
            .collect();
        let at_least = self.acked_rows;
        poll_until(
            "replicas to converge",
            timeout,
            Duration::from_millis(100),
            || {
                let clients = clients.clone();
                async move {
                    let mut seen = Vec::new();
                    for c in &clients {
                        let s = c.status().await?;
                        if s.inserts_in_queue != 0 {
                            return Ok(Check::Wait(format!(
                                "{} has {} parts to fetch",
                                s.replica_name, s.inserts_in_queue
                            )));
                        }
                        seen.push(s.rows);
                    }
                    let first = seen.first().copied().unwrap_or(0);
                    Ok(if seen.iter().all(|&r| r == first) && first >= at_least {
                        Check::Done(first)
                    } else {
                        Check::Wait(format!("rows {seen:?}, acknowledged {at_least}"))
                    })
                }
            },
        )
        .await
    }

    async fn metric_sum(&self, name: &str) -> Option<f64> {
        let mut sum = None;
        for u in &self.urls {
            if let Ok(r) = self.http.get(format!("{u}/metrics")).send().await
                && let Ok(text) = r.text().await
                && let Some(v) = metric_value(&text, name)
            {
                *sum.get_or_insert(0.0) += v;
            }
        }
        sum
    }

    fn report(
        &self,
        args: &BenchArgs,
        started_at: chrono::DateTime<chrono::Utc>,
        took: Duration,
    ) -> String {
        let root = rtable_e2e::repo_root();
        let mut out = String::new();
        let _ = writeln!(out, "# rtable benchmarks\n");
        let _ = writeln!(
            out,
            "Measured by `cargo run --release -p rtable-e2e -- bench{}` (`--quick` shrinks every size). \
             Every figure is measured next to its physical baseline on the same machine, in the same run.\n",
            if args.quick { " --quick" } else { "" }
        );
        let _ = writeln!(
            out,
            "- Date: {} (the run took {:.0} s)",
            started_at.format("%Y-%m-%d %H:%M:%S UTC"),
            took.as_secs_f64()
        );
        let _ = writeln!(
            out,
            "- Commit: `{}`",
            machine::git_head(&root).unwrap_or_else(|| "unknown".to_string())
        );
        let _ = writeln!(
            out,
            "- Machine: {}, {} logical CPUs, {:.1} GiB RAM, Linux {} (shared with other work; the 3 ZooKeeper JVMs, 3 sidecars and the load generator all run on it)",
            machine::cpu_model(),
            machine::cores(),
            machine::mem_total_bytes().map_or(0.0, |b| b as f64 / (1u64 << 30) as f64),
            machine::kernel()
        );
        let _ = writeln!(
            out,
            "- Setup: 3-node ZooKeeper {} ensemble on loopback (tickTime 500 ms), 3 release `rtable-sidecar` processes of `examples/events.yaml`, ZooKeeper session timeout {} ms; \
             every insert goes to replica 0 over HTTP with JSONEachRow rows that are all distinct (no deduplication).\n",
            zk_version(&self.zk_ports),
            self.session_timeout.as_millis()
        );
        let _ = writeln!(
            out,
            "| Figure | rtable | Baseline | Ratio | Target | Met? |"
        );
        let _ = writeln!(out, "|---|---|---|---|---|---|");
        for r in &self.rows {
            let _ = writeln!(
                out,
                "| {} | {} | {} | {} | {} | {} |",
                r.figure,
                r.rtable,
                r.baseline,
                r.ratio,
                r.target,
                r.met.text()
            );
        }
        let missed: Vec<&str> = self
            .rows
            .iter()
            .filter(|r| r.met == Met::No)
            .map(|r| r.figure.as_str())
            .collect();
        let _ = writeln!(out);
        if missed.is_empty() {
            let _ = writeln!(out, "Every target was met in this run.\n");
        } else {
            let _ = writeln!(out, "Targets missed in this run: {}.\n", missed.join("; "));
        }
        let _ = writeln!(out, "## How each figure was measured\n");
        for n in &self.notes {
            let _ = writeln!(out, "- {n}");
        }
        out
    }
}

/// POST one insert of `rows` distinct rows.
async fn insert_once(
    http: &reqwest::Client,
    base: &str,
    seq: &AtomicU64,
    rows: usize,
    quorum: Option<u32>,
) -> anyhow::Result<InsertAnswer> {
    let mut url = format!("{base}/insert?format=JSONEachRow");
    if let Some(q) = quorum {
        let _ = write!(url, "&insert_quorum={q}");
    }
    let r = http
        .post(url)
        .body(rows_body(seq, rows))
        .send()
        .await
        .with_context(|| format!("POST {base}/insert"))?;
    let status = r.status();
    let body = r.bytes().await.context("reading the /insert answer")?;
    anyhow::ensure!(
        status.is_success(),
        "insert answered {status}: {}",
        String::from_utf8_lossy(&body)
    );
    let answer: InsertAnswer = serde_json::from_slice(&body)
        .with_context(|| format!("insert answer: {}", String::from_utf8_lossy(&body)))?;
    anyhow::ensure!(
        !answer.deduplicated,
        "a distinct insert was deduplicated: {answer:?}"
    );
    Ok(answer)
}

/// `n` rows of the example table, all distinct (`user_id` is a global sequence), all in
/// one partition so an insert makes one part.
fn rows_body(seq: &AtomicU64, n: usize) -> String {
    let mut out = String::with_capacity(n * 90);
    for _ in 0..n {
        let id = seq.fetch_add(1, Ordering::Relaxed);
        let _ = writeln!(
            out,
            r#"{{"ts":"2025-01-15 12:{:02}:{:02}","user_id":{id},"event":"bench","value":{}.5}}"#,
            (id / 60) % 60,
            id % 60,
            id % 1000
        );
    }
    out
}

/// CSV rows with long random strings (they compress poorly) in a partition of their own,
/// about `part_bytes` of Parquet once compressed.
fn big_csv(part_bytes: u64, seq: &AtomicU64) -> String {
    const ALPHABET: &[u8; 64] = b"ABCDEFGHIJKLMNOPQRSTUVWXYZabcdefghijklmnopqrstuvwxyz0123456789_.";
    const STRING_LEN: usize = 1000;
    // 64 symbols carry 6 bits per byte: zstd gets close to 6/8 of the text.
    let text_bytes = part_bytes as f64 / 0.76;
    let rows = (text_bytes / STRING_LEN as f64).ceil() as usize;
    let mut out = String::with_capacity(rows * (STRING_LEN + 48));
    let mut state: u64 = 0x9E37_79B9_7F4A_7C15 ^ seq.load(Ordering::Relaxed);
    let mut next = || {
        // xorshift64*
        state ^= state >> 12;
        state ^= state << 25;
        state ^= state >> 27;
        state.wrapping_mul(0x2545_F491_4F6C_DD1D)
    };
    for _ in 0..rows {
        let id = seq.fetch_add(1, Ordering::Relaxed);
        let _ = write!(out, "2024-06-{:02} 08:00:00,{id},", 1 + id % 28);
        let mut left = STRING_LEN;
        while left > 0 {
            let mut r = next();
            for _ in 0..left.min(10) {
                out.push(char::from(ALPHABET[(r & 63) as usize]));
                r >>= 6;
                left -= 1;
            }
        }
        let _ = writeln!(out, ",{}.25", id % 1000);
    }
    out
}

/// Blocks until `parts_dir` holds `part` or a merged part covering it; returns how many
/// times it woke up. Woken by inotify on the directory (a fetch's rename into `parts/`
/// is an IN_MOVED_TO), so the wait costs no CPU and adds no polling interval to the lag
/// it measures; the watch is in place before the first look, so no rename is missed.
fn wait_covered(parts_dir: &Path, part: &str, timeout: Duration) -> anyhow::Result<u64> {
    let wanted = rtable_protocol::PartName::parse(part)
        .map_err(|e| anyhow::anyhow!("part name {part}: {e}"))?;
    let present = || {
        parts_dir.join(part).is_dir()
            || std::fs::read_dir(parts_dir).is_ok_and(|entries| {
                entries.flatten().any(|e| {
                    e.file_name()
                        .to_str()
                        .and_then(|n| rtable_protocol::PartName::parse(n).ok())
                        .is_some_and(|p| p.contains(&wanted))
                })
            })
    };
    let inotify = part_watch::Inotify::watch(parts_dir)
        .with_context(|| format!("watching {} with inotify", parts_dir.display()))?;
    let started = Instant::now();
    let mut wakeups = 0u64;
    while !present() {
        let left = timeout.saturating_sub(started.elapsed());
        anyhow::ensure!(
            !left.is_zero(),
            "part {part} did not appear in {} within {}s",
            parts_dir.display(),
            timeout.as_secs()
        );
        inotify.wait(left)?;
        wakeups += 1;
    }
    Ok(wakeups)
}

/// An inotify instance watching one directory for entries created or renamed into it.
fn fsync_probe(dir: &Path, n: usize) -> anyhow::Result<Samples> {
    use std::io::Write as _;
    std::fs::create_dir_all(dir).with_context(|| format!("creating {}", dir.display()))?;
    let block = vec![7u8; 4096];
    let mut samples = Samples::with_capacity(n);
    for i in 0..n {
        let path = dir.join(format!("probe-{i}"));
        let t = Instant::now();
        let mut f =
            std::fs::File::create(&path).with_context(|| format!("creating {}", path.display()))?;
        f.write_all(&block)
            .with_context(|| format!("writing {}", path.display()))?;
        f.sync_all()
            .with_context(|| format!("fsyncing {}", path.display()))?;
        std::fs::File::open(dir)
            .and_then(|d| d.sync_all())
            .with_context(|| format!("fsyncing {}", dir.display()))?;
        samples.push(t.elapsed());
    }
    let _ = std::fs::remove_dir_all(dir);
    Ok(samples)
}

fn rss_list(rss: &[(String, Option<u64>)]) -> String {
    rss.iter()
        .map(|(n, r)| match r {
            Some(b) => format!("{n} {:.1} MiB", mib(*b)),
            None => format!("{n} -"),
        })
        .collect::<Vec<_>>()
        .join(", ")
}

fn zk_version(ports: &[u16]) -> String {
    ports
        .first()
        .and_then(|p| rtable_e2e::zk_ensemble::four_letter(*p, "mntr").ok())
        .and_then(|t| {
            rtable_e2e::zk_ensemble::parse_mntr(&t)
                .get("zk_version")
                .and_then(|v| v.split(['-', ',']).next().map(str::to_string))
        })
        .unwrap_or_else(|| "?".to_string())
}

/// Samples the RSS of the sidecars every 100 ms and keeps the peak.
struct RssSampler {
    stop: Arc<AtomicBool>,
    task: tokio::task::JoinHandle<u64>,
}

impl RssSampler {
    fn start(pids: Vec<(String, Option<u32>)>) -> RssSampler {
        let stop = Arc::new(AtomicBool::new(false));
        let flag = stop.clone();
        let task = tokio::spawn(async move {
            let mut peak = 0u64;
            while !flag.load(Ordering::Relaxed) {
                for (_, pid) in &pids {
                    if let Some(b) = pid.and_then(machine::rss_bytes) {
                        peak = peak.max(b);
                    }
                }
                tokio::time::sleep(Duration::from_millis(100)).await;
            }
            peak
        });
        RssSampler { stop, task }
    }

    async fn stop(self) -> u64 {
        self.stop.store(true, Ordering::Relaxed);
        self.task.await.unwrap_or(0)
    }
}
