//! `rtable-e2e`: the local playground (a real ZooKeeper ensemble and N sidecar replicas of
//! a ReplicatedTable manifest on this machine).

mod bench;
mod playground_view;

use std::io::IsTerminal as _;
use std::path::PathBuf;
use std::process::ExitCode;
use std::time::Duration;

use anyhow::Context as _;
use clap::{Parser, Subcommand};
use serde_json::{Value, json};

use rtable_e2e::sidecar_proc::{SidecarConfig, SidecarProc};
use rtable_e2e::zk_ensemble::{Jit, NodePorts, ZkEnsemble};
use rtable_e2e::{ReplicaClient, ports};
use rtable_protocol::ReplicatedTableManifest;

use crate::playground_view::StatusView;

#[derive(Debug, Parser)]
#[command(
    name = "rtable-e2e",
    version,
    about = "rtable's local playground and test harness"
)]
struct Cli {
    #[command(subcommand)]
    command: Command,
}

#[derive(Debug, Subcommand)]
enum Command {
    /// Start a 3-node ZooKeeper ensemble and the table's replicas on 127.0.0.1, insert sample
    /// rows and show each replica's status until Ctrl-C.
    Playground(PlaygroundArgs),
    /// Run the benchmark table (3-node ZooKeeper, 3 release sidecars) and write
    /// BENCHMARKS.md. Build first: `cargo build --release -p rtable-sidecar`.
    Bench(bench::BenchArgs),
}

#[derive(Debug, clap::Args)]
struct PlaygroundArgs {
    /// The ReplicatedTable manifest to run.
    #[arg(long, default_value_os_t = rtable_e2e::example_manifest())]
    manifest: PathBuf,
    /// Number of replicas (sidecar processes).
    #[arg(long, default_value_t = 3)]
    replicas: usize,
    /// Number of ZooKeeper nodes.
    #[arg(long, default_value_t = 3)]
    zk_nodes: usize,
    /// Replica i listens on base+i; ZooKeeper node i uses base+10+i (client),
    /// base+20+i (peer) and base+30+i (election).
    #[arg(long, default_value_t = 9100)]
    base_port: u16,
    /// Where logs and data go (wiped at start).
    #[arg(long, default_value_os_t = rtable_e2e::repo_root().join(".playground"))]
    dir: PathBuf,
    /// Seconds between status refreshes (default 2; 5 with --kubernetes).
    #[arg(long)]
    interval: Option<u64>,
    /// ZooKeeper session timeout of the replicas, in milliseconds.
    #[arg(long, default_value_t = 10_000)]
    session_timeout_ms: u64,
    /// Print the status table once and exit (a smoke test).
    #[arg(long)]
    once: bool,
    /// Run the journey on Kubernetes on this machine instead (needs root): a control plane,
    /// the process kubelet rtable-node, `kubectl apply` ZooKeeper, `helm install` the
    /// operator, `kubectl apply` examples/events.yaml; prints a kubeconfig and the kubectl
    /// commands to try. --manifest, --replicas, --zk-nodes and --base-port do not apply.
    #[arg(long)]
    kubernetes: bool,
}

fn main() -> ExitCode {
    let cli = Cli::parse();
    if matches!(cli.command, Command::Bench(_))
        && let Err(e) = bench::use_release_sidecar()
    {
        eprintln!("rtable-e2e: {e:#}");
        return ExitCode::FAILURE;
    }
    let runtime = match tokio::runtime::Builder::new_multi_thread()
        .worker_threads(2)
        .enable_all()
        .build()
    {
        Ok(r) => r,
        Err(e) => {
            eprintln!("rtable-e2e: cannot start the runtime: {e}");
            return ExitCode::FAILURE;
        }
    };
    let result = match cli.command {
        Command::Playground(args) if args.kubernetes => {
            runtime.block_on(kubernetes_playground(args))
        }
        Command::Playground(args) => runtime.block_on(playground(args)),
        Command::Bench(args) => runtime.block_on(bench::run(args)),
    };
    match result {
        Ok(()) => ExitCode::SUCCESS,
        Err(e) => {
            eprintln!("rtable-e2e: {e:#}");
            ExitCode::FAILURE
        }
    }
}

/// `playground --kubernetes`: 30 sample rows of examples/events.yaml through events-0.
async fn kubernetes_playground(args: PlaygroundArgs) -> anyhow::Result<()> {
    let manifest = rtable_e2e::example_manifest();
    let table = ReplicatedTableManifest::from_file(&manifest)
        .with_context(|| format!("{}", manifest.display()))?;
    let rows = (0..3).flat_map(|b| sample_rows(&table, b, 10)).collect();
    let node_binary =
        rtable_e2e::sidecar_proc::workspace_binary("rtable-node", "RTABLE_NODE_BIN", "rtable-e2e")?;
    rtable_e2e::kube::playground::run(rtable_e2e::kube::playground::Options {
        node_binary,
        dir: args.dir,
        rows,
        interval: Duration::from_secs(args.interval.unwrap_or(5).max(1)),
        once: args.once,
    })
    .await
}

struct Playground {
    replicas: Vec<SidecarProc>,
    zk: ZkEnsemble,
}

impl Playground {
    fn shutdown(&mut self) {
        for r in &mut self.replicas {
            match r.terminate(Duration::from_secs(10)) {
                Ok(Some(status)) if !status.success() => {
                    eprintln!("replica {} exited with {status}", r.name());
                }
                Ok(_) => {}
                Err(e) => eprintln!("stopping replica {}: {e:#}", r.name()),
            }
        }
        self.zk.shutdown();
    }
}

async fn playground(args: PlaygroundArgs) -> anyhow::Result<()> {
    anyhow::ensure!(
        (1..=10).contains(&args.replicas),
        "--replicas must be between 1 and 10"
    );
    anyhow::ensure!(
        (1..=9).contains(&args.zk_nodes),
        "--zk-nodes must be between 1 and 9"
    );
    anyhow::ensure!(
        args.base_port >= 1024 && args.base_port <= 65_000,
        "--base-port must be between 1024 and 65000"
    );
    let table = ReplicatedTableManifest::from_file(&args.manifest)
        .with_context(|| format!("--manifest {}", args.manifest.display()))?;
    rtable_e2e::zk_ensemble::prerequisites()?;
    let base = args.base_port;
    let replica_ports: Vec<u16> = (0..args.replicas as u16).map(|i| base + i).collect();
    let zk_ports: Vec<NodePorts> = (0..args.zk_nodes as u16)
        .map(|i| NodePorts {
            client: base + 10 + i,
            peer: base + 20 + i,
            election: base + 30 + i,
        })
        .collect();
    let mut all: Vec<u16> = replica_ports.clone();
    all.extend(zk_ports.iter().flat_map(|p| [p.client, p.peer, p.election]));
    ports::check_all_free(&all)?;

    if args.dir.exists() {
        std::fs::remove_dir_all(&args.dir)
            .with_context(|| format!("wiping {}", args.dir.display()))?;
    }
    std::fs::create_dir_all(&args.dir)
        .with_context(|| format!("creating {}", args.dir.display()))?;
    let manifest = args.dir.join("table.yaml");
    std::fs::copy(&args.manifest, &manifest)
        .with_context(|| format!("copying {}", args.manifest.display()))?;

    let name = table.manifest.metadata.name.clone();
    println!(
        "starting a {}-node ZooKeeper ensemble on 127.0.0.1:{}..{} (logs in {})",
        args.zk_nodes,
        base + 10,
        base + 10 + args.zk_nodes as u16 - 1,
        args.dir.display()
    );
    let zk = ZkEnsemble::start_with_ports(&zk_ports, &args.dir.join("zookeeper"), Jit::Full)?;
    let mut pg = Playground {
        replicas: Vec::new(),
        zk,
    };
    let result = run(&mut pg, &args, &manifest, &name, &replica_ports, &table).await;
    println!(
        "\nshutting down {} replicas and ZooKeeper...",
        pg.replicas.len()
    );
    pg.shutdown();
    if result.is_ok() {
        println!("stopped; logs and data are in {}", args.dir.display());
    }
    result
}

async fn run(
    pg: &mut Playground,
    args: &PlaygroundArgs,
    manifest: &std::path::Path,
    name: &str,
    replica_ports: &[u16],
    table: &rtable_protocol::ValidatedTable,
) -> anyhow::Result<()> {
    // The pods exactly as the operator renders them, but for the listed substitutions.
    let rendering = rtable_e2e::rendered::render(
        &args.manifest,
        replica_ports.len() as u32,
        replica_ports,
        &pg.zk.connect_string(),
        &args.dir,
    )?;
    // The table as the operator would report it, from the same observations; "applied" now.
    let mut view = StatusView::new(&args.manifest, replica_ports.len(), &pg.zk.connect_string())?;
    println!(
        "rendered StatefulSet {name} through the operator's builders: {} pods; local substitutions:",
        rendering.pods.len()
    );
    for s in &rendering.substitutions {
        println!("  {s}");
    }
    for pod in rendering.pods {
        let cfg = SidecarConfig {
            table: manifest.to_path_buf(),
            data_dir: pod.data_dir.clone(),
            log: args.dir.join(format!("{}.log", pod.name)),
            replica: pod.name.clone(),
            port: pod.port,
            zookeeper: pg.zk.connect_string(),
            session_timeout_ms: args.session_timeout_ms,
            interserver_secret_file: None,
            max_body_bytes: None,
            env: pod.env.clone(),
        };
        let cmdline = args.dir.join(format!("{}.cmdline", pod.name));
        std::fs::write(&cmdline, pod.args.join("\n"))
            .with_context(|| format!("writing {}", cmdline.display()))?;
        println!("starting pod {} on 127.0.0.1:{}", pod.name, pod.port);
        pg.replicas
            .push(SidecarProc::spawn_with_args(cfg, pod.args)?);
    }
    for r in &mut pg.replicas {
        r.wait_ready(Duration::from_secs(60)).await?;
    }
    let clients: Vec<(String, ReplicaClient)> = pg
        .replicas
        .iter()
        .map(|r| (r.name().to_string(), r.client().clone()))
        .collect();

    let inserted = insert_samples(&clients, table).await?;
    println!("inserted {inserted} sample rows, spread over the replicas");
    print_curl_examples(&clients, table);

    let ctrl_c = tokio::signal::ctrl_c();
    tokio::pin!(ctrl_c);
    let interactive = std::io::stdout().is_terminal() && !args.once;
    if args.once {
        // Give replication a moment to settle so the smoke output is meaningful.
        // Settled = every replica has every row and an empty queue for 1.5 s in a row:
        // merges are assigned a moment after the parts they merge arrive.
        let deadline = std::time::Instant::now() + Duration::from_secs(30);
        let mut stable_polls = 0;
        while std::time::Instant::now() < deadline && stable_polls < 8 {
            let mut settled = true;
            for (_, c) in &clients {
                match c.status().await {
                    Ok(s) if s.queue_size == 0 && s.rows == inserted => {}
                    _ => settled = false,
                }
            }
            stable_polls = if settled { stable_polls + 1 } else { 0 };
            tokio::time::sleep(Duration::from_millis(200)).await;
        }
        print!("\n{}", view.observe(&clients).await.render());
        return Ok(());
    }
    println!("\nPress Ctrl-C to stop.\n");
    let interval = args.interval.unwrap_or(2);
    loop {
        let snapshot = view.observe(&clients).await;
        if interactive {
            print!("\x1b[2J\x1b[H");
        }
        print!("{}", snapshot.render());
        if !interactive {
            println!();
        } else {
            println!("\n(refreshing every {}s; Ctrl-C to stop)", interval);
        }
        tokio::select! {
            _ = &mut ctrl_c => return Ok(()),
            _ = tokio::time::sleep(Duration::from_secs(interval.max(1))) => {}
        }
        for r in &mut pg.replicas {
            if let Some(status) = r.exit_status() {
                anyhow::bail!(
                    "replica {} exited with {status}; its log {} ends with:\n{}",
                    r.name(),
                    r.log_path().display(),
                    rtable_e2e::tail(r.log_path(), 20)
                );
            }
        }
    }
}

/// Sample rows built from the table's columns, so any manifest gets some data.
fn sample_rows(table: &rtable_protocol::ValidatedTable, batch: usize, n: usize) -> Vec<Value> {
    use rtable_protocol::ColumnType as T;
    const EVENTS: [&str; 4] = ["click", "view", "purchase", "signup"];
    (0..n)
        .map(|k| {
            let seq = (batch * n + k) as u64;
            let mut row = serde_json::Map::new();
            for c in &table.schema.columns {
                let v = match c.ty.inner() {
                    T::UInt8 | T::UInt16 | T::UInt32 | T::UInt64 => json!(seq % 100),
                    T::Int8 | T::Int16 | T::Int32 | T::Int64 => json!((seq % 100) as i64 - 50),
                    T::Float32 | T::Float64 => {
                        if c.ty.is_nullable() && seq.is_multiple_of(5) {
                            Value::Null
                        } else {
                            json!(seq as f64 * 1.5)
                        }
                    }
                    T::String => json!(EVENTS[seq as usize % EVENTS.len()]),
                    T::Bool => json!(seq.is_multiple_of(2)),
                    // Two months, so `toYYYYMM` tables get two partitions.
                    T::Date => json!(if seq.is_multiple_of(2) {
                        "2025-01-15"
                    } else {
                        "2025-02-15"
                    }),
                    T::DateTime => json!(format!(
                        "2025-0{}-15 12:{:02}:{:02}",
                        1 + seq % 2,
                        seq % 60,
                        (seq * 7) % 60
                    )),
                    T::Nullable(_) => Value::Null,
                };
                row.insert(c.name.clone(), v);
            }
            Value::Object(row)
        })
        .collect()
}

async fn insert_samples(
    clients: &[(String, ReplicaClient)],
    table: &rtable_protocol::ValidatedTable,
) -> anyhow::Result<u64> {
    let mut total = 0;
    for (batch, (name, client)) in clients.iter().enumerate() {
        let rows = sample_rows(table, batch, 10);
        let answer = client
            .insert_json(&rows)
            .await
            .with_context(|| format!("inserting sample rows on {name}"))?;
        total += answer.rows;
    }
    Ok(total)
}

fn print_curl_examples(
    clients: &[(String, ReplicaClient)],
    table: &rtable_protocol::ValidatedTable,
) {
    let Some((_, first)) = clients.first() else {
        return;
    };
    let other = clients
        .last()
        .map(|(_, c)| c.base())
        .unwrap_or(first.base());
    let example = sample_rows(table, 1000, 1)
        .first()
        .map(Value::to_string)
        .unwrap_or_default();
    let name = &table.manifest.metadata.name;
    let key = table
        .schema
        .order_by
        .first()
        .or(table.schema.columns.first().map(|c| &c.name))
        .map_or("*", String::as_str);
    println!(
        "\nTry it:\n  \
         curl -s -X POST '{b}/insert?format=JSONEachRow' --data-binary '{example}'\n  \
         curl -s -X POST '{b}/insert?format=JSONEachRow&dedup_token=my-batch-1' --data-binary '{example}'   # retry-safe\n  \
         curl -s '{o}/select?format=JSONEachRow'\n  \
         curl -s '{o}/select?format=Parquet' -o events.parquet\n  \
         curl -s '{o}/query' --data-binary 'SELECT count(), uniqExact({key}) FROM {name}'   # SQL, see docs/query.md\n  \
         curl -s '{o}/?query=SELECT+*+FROM+{name}+ORDER+BY+{key}+LIMIT+3+FORMAT+CSVWithNames'   # ClickHouse's HTTP shape\n  \
         curl -s '{b}/status' | python3 -m json.tool\n  \
         curl -s '{b}/queue'\n  \
         curl -s '{b}/metrics' | grep ^rtable_",
        b = first.base(),
        o = other,
    );
}
