//! A ZooKeeper ensemble plus N sidecar replicas of one table, in a temp directory.

use std::path::{Path, PathBuf};
use std::time::Duration;

use anyhow::Context as _;
use rtable_protocol::{ReplicatedTableManifest, TablePaths};
use zookeeper_client as zk;

use crate::client::ReplicaClient;
use crate::poll::{Check, poll_until};
use crate::sidecar_proc::{SidecarConfig, SidecarProc};
use crate::zk_ensemble::{Jit, ZkEnsemble};

#[derive(Debug, Clone)]
pub struct ClusterOptions {
    pub zk_nodes: usize,
    pub replicas: usize,
    /// The table manifest (copied into the cluster directory); `examples/events.yaml` by default.
    pub manifest: PathBuf,
    pub session_timeout_ms: u64,
    /// Shared interserver secret, written to a file every replica gets.
    pub interserver_secret: Option<String>,
    pub max_body_bytes: Option<usize>,
    /// Extra environment for every replica.
    pub env: Vec<(String, String)>,
    /// How long each replica may take to become ready.
    pub ready_timeout: Duration,
    pub zk_jit: Jit,
    /// Users, separate listeners and TLS for every replica (`security` module).
    pub security: Option<crate::security::ClusterSecurity>,
}

impl Default for ClusterOptions {
    /// One ZooKeeper server: the protocol tests need a real server, not an ensemble, and a
    /// standalone JVM starts in a fraction of an ensemble's time (with its leader election)
    /// and leaves the CPU to the sidecars. The fault scenarios, the benchmark and the
    /// playground run a 3-node ensemble (`ensemble()`).
    fn default() -> Self {
        ClusterOptions {
            zk_nodes: 1,
            replicas: 3,
            manifest: crate::example_manifest(),
            session_timeout_ms: 10_000,
            interserver_secret: None,
            max_body_bytes: None,
            env: Vec::new(),
            ready_timeout: Duration::from_secs(60),
            zk_jit: Jit::QuickStart,
            security: None,
        }
    }
}

impl ClusterOptions {
    /// The defaults on a 3-node ensemble, for what needs one (a leader to kill, a quorum).
    pub fn ensemble() -> Self {
        ClusterOptions {
            zk_nodes: 3,
            ..ClusterOptions::default()
        }
    }
}

/// A running cluster. Dropping it kills every process; when the test panicked (or
/// `RTABLE_E2E_KEEP=1`) its directory is kept and the tail of every log is printed.
pub struct Cluster {
    pub replicas: Vec<SidecarProc>,
    pub zk: ZkEnsemble,
    pub table_path: String,
    pub manifest: PathBuf,
    pub secret: Option<String>,
    root: PathBuf,
    dir: Option<tempfile::TempDir>,
    /// Keep the directory and print logs on drop (set when start-up fails).
    keep: bool,
}

impl Cluster {
    /// Starts the ensemble and the replicas and waits until every replica is ready.
    pub async fn start(opts: ClusterOptions) -> anyhow::Result<Cluster> {
        let dir = tempfile::Builder::new()
            .prefix("rtable-e2e-")
            .tempdir()
            .context("creating the cluster's temp directory")?;
        let root = dir.path().to_path_buf();
        let zk = ZkEnsemble::start(opts.zk_nodes, &root.join("zookeeper"), opts.zk_jit)?;
        let manifest = root.join("table.yaml");
        std::fs::copy(&opts.manifest, &manifest).with_context(|| {
            format!(
                "copying {} to {}",
                opts.manifest.display(),
                manifest.display()
            )
        })?;
        let table = ReplicatedTableManifest::from_file(&manifest)
            .with_context(|| format!("parsing {}", opts.manifest.display()))?;
        let secret_file = match &opts.interserver_secret {
            Some(secret) => {
                let f = root.join("interserver-secret");
                std::fs::write(&f, format!("{secret}\n"))
                    .with_context(|| format!("writing {}", f.display()))?;
                Some(f)
            }
            None => None,
        };
        let ports = crate::ports::free_ports(opts.replicas)?;
        let mut cluster = Cluster {
            replicas: Vec::new(),
            table_path: table.table_path.clone(),
            manifest: manifest.clone(),
            secret: opts.interserver_secret.clone(),
            root: root.clone(),
            dir: Some(dir),
            keep: false,
            zk,
        };
        let name = table.manifest.metadata.name.clone();
        for (i, port) in ports.into_iter().enumerate() {
            let replica = format!("{name}-{i}");
            let cfg = SidecarConfig {
                table: manifest.clone(),
                data_dir: root.join("replicas").join(&replica),
                log: root.join(format!("{replica}.log")),
                replica,
                port,
                zookeeper: cluster.zk.connect_string(),
                session_timeout_ms: opts.session_timeout_ms,
                interserver_secret_file: secret_file.clone(),
                max_body_bytes: opts.max_body_bytes,
                env: opts.env.clone(),
            };
            let proc = match &opts.security {
                None => SidecarProc::spawn(cfg)?,
                Some(security) => {
                    let (args, client) =
                        security.prepare(cfg.args(), &cfg.replica, cfg.port, &root, i)?;
                    let mut proc = SidecarProc::spawn_with_args(cfg, args)?;
                    proc.set_client(client);
                    proc
                }
            };
            cluster.replicas.push(proc);
        }
        for i in 0..cluster.replicas.len() {
            if let Err(e) = cluster.replicas[i].wait_ready(opts.ready_timeout).await {
                cluster.keep = true;
                return Err(e);
            }
        }
        Ok(cluster)
    }

    /// The cluster's directory (logs, data directories, manifest).
    pub fn dir(&self) -> &Path {
        &self.root
    }

    pub fn client(&self, i: usize) -> &ReplicaClient {
        self.replicas[i].client()
    }

    pub fn paths(&self) -> TablePaths {
        TablePaths::new(self.table_path.clone())
    }

    /// A new ZooKeeper session on the ensemble (for reading or changing the tree).
    pub async fn zk_client(&self) -> anyhow::Result<zk::Client> {
        rtable_protocol::tree::connect(
            &self.zk.connect_string(),
            Duration::from_secs(10),
            Duration::from_secs(5),
        )
        .await
        .context("connecting to the test ensemble")
    }

    /// Waits until every running replica has an empty queue and all of them return the
    /// same (sorted) rows; returns those rows.
    pub async fn wait_converged(&mut self, timeout: Duration) -> anyhow::Result<Vec<String>> {
        // Merges are assigned a moment after the parts they merge arrive (leaders are
        // staggered by up to 650 ms), so a converged state must hold across a second.
        let started = std::time::Instant::now();
        loop {
            let remaining = timeout.saturating_sub(started.elapsed());
            let rows = self.converged_now(remaining).await?;
            tokio::time::sleep(Duration::from_millis(1200)).await;
            match self.converged_now(Duration::ZERO).await {
                Ok(again) if again == rows => return Ok(rows),
                Ok(_) | Err(_) if started.elapsed() < timeout => continue,
                Ok(_) => anyhow::bail!("replicas kept changing after converging"),
                Err(e) => return Err(e),
            }
        }
    }

    async fn converged_now(&mut self, timeout: Duration) -> anyhow::Result<Vec<String>> {
        let mut clients = Vec::new();
        for r in &mut self.replicas {
            if r.is_running() {
                clients.push((r.name().to_string(), r.client().clone()));
            }
        }
        anyhow::ensure!(!clients.is_empty(), "no replica is running");
        poll_until(
            "replicas to converge",
            timeout,
            Duration::from_millis(100),
            || {
                let clients = clients.clone();
                async move {
                    let mut first: Option<(String, Vec<String>)> = None;
                    for (name, c) in &clients {
                        let s = c.status().await?;
                        if s.queue_size != 0 {
                            return Ok(Check::Wait(format!(
                                "{name} has {} queue entries",
                                s.queue_size
                            )));
                        }
                        let rows = c.select_sorted_lines().await?;
                        match &first {
                            None => first = Some((name.clone(), rows)),
                            Some((first_name, first_rows)) if *first_rows != rows => {
                                return Ok(Check::Wait(format!(
                                    "{first_name} has {} rows, {name} has {}",
                                    first_rows.len(),
                                    rows.len()
                                )));
                            }
                            Some(_) => {}
                        }
                    }
                    Ok(Check::Done(first.map(|(_, rows)| rows).unwrap_or_default()))
                }
            },
        )
        .await
    }

    /// Like `wait_converged`, and additionally every replica holds `expected` rows.
    pub async fn wait_converged_rows(
        &mut self,
        expected: usize,
        timeout: Duration,
    ) -> anyhow::Result<Vec<String>> {
        let started = std::time::Instant::now();
        loop {
            let left = timeout.saturating_sub(started.elapsed());
            let rows = self.wait_converged(left).await?;
            if rows.len() == expected {
                return Ok(rows);
            }
            anyhow::ensure!(
                started.elapsed() < timeout,
                "replicas converged on {} rows, expected {expected}",
                rows.len()
            );
            tokio::time::sleep(Duration::from_millis(100)).await;
        }
    }

    /// Prints the tail of every log to stderr.
    pub fn dump_logs(&self, lines: usize) {
        for r in &self.replicas {
            eprintln!(
                "===== {} ({}) =====\n{}",
                r.name(),
                r.log_path().display(),
                crate::tail(r.log_path(), lines)
            );
        }
        for (i, log) in self.zk.log_paths().iter().enumerate() {
            eprintln!(
                "===== zookeeper node {} ({}) =====\n{}",
                i + 1,
                log.display(),
                crate::tail(log, lines / 4)
            );
        }
    }
}

impl Drop for Cluster {
    fn drop(&mut self) {
        let failed = std::thread::panicking() || self.keep;
        if failed {
            self.dump_logs(60);
        }
        for r in &mut self.replicas {
            let _ = r.kill();
        }
        if (failed || crate::keep_dirs())
            && let Some(dir) = self.dir.take()
        {
            let kept = dir.keep();
            eprintln!("cluster directory kept: {}", kept.display());
        }
    }
}
