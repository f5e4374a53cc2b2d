//! `rtable-sidecar`: runs one replica of a ReplicatedTable.

use std::process::ExitCode;
use std::sync::Arc;
use std::sync::atomic::AtomicBool;

use clap::Parser;
use tracing::{error, info, warn};

use rtable_protocol::TablePaths;
use rtable_protocol::columns;
use rtable_protocol::host::HostInfo;
use rtable_protocol::manifest::ValidatedTable;
use rtable_sidecar::api::AppState;
use rtable_sidecar::auth::{Gate, Users};
use rtable_sidecar::config::Config;
use rtable_sidecar::metrics::Metrics;
use rtable_sidecar::queue::{self, QueueState};
use rtable_sidecar::replica::Replica;
use rtable_sidecar::session::{self, Sessions};
use rtable_sidecar::sink::{Committer, committer};
use rtable_sidecar::store::PartStore;
use rtable_sidecar::supervisor::Supervisor;
use rtable_sidecar::table_reload::{self, LiveSettings, TableReload};
use rtable_sidecar::tls::{Tls, peer_client};
use rtable_sidecar::zk_access;
use rtable_sidecar::{cleanup, handoff, merge, part_check, query_api, serve};

/// How long the background tasks get to stop once the HTTP server has.
const SHUTDOWN_TASKS_TIMEOUT: std::time::Duration = std::time::Duration::from_secs(5);

fn main() -> ExitCode {
    let cfg = Config::parse();
    init_tracing(&cfg.log_format);
    rtable_sidecar::heap::configure();
    if let Err(e) = cfg.validate() {
        eprintln!("rtable-sidecar: {e}");
        return ExitCode::from(2);
    }
    let runtime = match tokio::runtime::Builder::new_multi_thread()
        .worker_threads(2)
        .max_blocking_threads(16)
        .enable_all()
        .build()
    {
        Ok(r) => r,
        Err(e) => {
            eprintln!("rtable-sidecar: cannot start the runtime: {e}");
            return ExitCode::FAILURE;
        }
    };
    match runtime.block_on(run(cfg)) {
        Ok(()) => ExitCode::SUCCESS,
        Err(e) => {
            error!("{e}");
            eprintln!("rtable-sidecar: {e}");
            ExitCode::FAILURE
        }
    }
}

fn init_tracing(format: &str) {
    let filter = tracing_subscriber::EnvFilter::try_from_default_env()
        .unwrap_or_else(|_| tracing_subscriber::EnvFilter::new("info"));
    let builder = tracing_subscriber::fmt()
        .with_env_filter(filter)
        .with_writer(std::io::stderr);
    if format == "json" {
        builder.json().init();
    } else {
        builder.init();
    }
}

async fn run(cfg: Config) -> Result<(), String> {
    let table = ValidatedTable::from_file(&cfg.table)
        .map_err(|e| format!("--table {}: {e}", cfg.table.display()))?;
    let secret = match &cfg.interserver_secret_file {
        Some(path) => {
            let text = std::fs::read_to_string(path)
                .map_err(|e| format!("--interserver-secret-file {}: {e}", path.display()))?;
            let secret = text.trim().to_string();
            if secret.is_empty() {
                return Err(format!(
                    "--interserver-secret-file {} is empty; put the shared secret in it",
                    path.display()
                ));
            }
            Some(secret)
        }
        None => None,
    };
    let access = zk_access::from_config(&cfg)?;
    let data_dir = cfg.data_dir.clone();
    let (store, detached) = tokio::task::spawn_blocking(move || PartStore::open(&data_dir))
        .await
        .map_err(|e| e.to_string())?
        .map_err(|e| format!("--data-dir {}: {e}", cfg.data_dir.display()))?;
    for d in &detached {
        warn!(replica = %cfg.replica, detached = ?d, "moved a directory aside at start");
    }
    store.start_spares();
    let (host, port) = cfg
        .advertise
        .rsplit_once(':')
        .and_then(|(h, p)| p.parse::<u16>().ok().map(|p| (h.to_string(), p)))
        .ok_or_else(|| format!("--advertise `{}` must be host:port", cfg.advertise))?;
    let namespace = table
        .manifest
        .metadata
        .namespace
        .clone()
        .unwrap_or_else(|| "default".to_string());
    // `port` is where peers fetch parts (the interserver listener when there is one);
    // `tcp_port` is where clients connect, as ClickHouse writes it.
    let host = HostInfo {
        host,
        port,
        tcp_port: cfg.listen.port(),
        database: namespace,
        table: table.manifest.metadata.name.clone(),
        scheme: if cfg.tls_dir.is_some() {
            "https"
        } else {
            "http"
        }
        .to_string(),
    };
    let session_timeout =
        cfg.session_timeout(table.manifest.spec.zookeeper.session_timeout_seconds);
    let tls = match &cfg.tls_dir {
        Some(dir) => Some(Tls::load(dir, cfg.interserver_mtls).map_err(|e| e.to_string())?),
        None => None,
    };
    let mut http = reqwest::Client::builder().connect_timeout(std::time::Duration::from_secs(5));
    if let Some(tls) = &tls {
        http = http.use_preconfigured_tls(peer_client::config(tls.clone()));
    }
    let http = http
        .build()
        .map_err(|e| format!("cannot build the HTTP client: {e}"))?;
    let listeners = serve::bind(&cfg).await.map_err(|e| e.to_string())?;
    let gate = match &cfg.users_file {
        Some(path) => Gate::with_users(
            Users::load(path).map_err(|e| format!("--users-file: {e}"))?,
            cfg.metrics_require_auth,
        ),
        None => {
            warn!(
                "no --users-file: every client request is allowed (insecure; see docs/security.md)"
            );
            Gate::open()
        }
    };
    let settings = LiveSettings::of(&table.manifest.spec, &cfg);
    let replica = Arc::new(Replica {
        name: cfg.replica.clone(),
        paths: TablePaths::new(table.table_path.clone()),
        columns_text: columns::render(&table.schema.columns),
        table,
        store,
        sessions: Sessions::new(),
        queue: parking_lot::Mutex::new(QueueState::default()),
        metrics: Metrics::default(),
        host,
        secret,
        zk_acl: access.tree_acl(),
        zk_access: access,
        http,
        queue_notify: tokio::sync::Notify::new(),
        pull_notify: tokio::sync::Notify::new(),
        block_reserve: Default::default(),
        session_timeout,
        startup_recovery_done: AtomicBool::new(false),
        started_at: std::time::Instant::now(),
        merge_notify: tokio::sync::Notify::new(),
        merge_policy: merge::policy::MergePolicy {
            min_parts: cfg.merge_min_parts.max(2),
            max_parts: cfg.merge_max_parts.max(2),
            max_bytes: cfg.merge_max_bytes,
            max_size_ratio: cfg.merge_max_size_ratio,
        },
        lost_part_count: std::sync::atomic::AtomicU64::new(0),
        fetching: Default::default(),
        part_check: Default::default(),
        prefetched: Default::default(),
        own_log: Default::default(),
        pull_lock: tokio::sync::Mutex::new(()),
        queue_unsure: AtomicBool::new(false),
        log_pointer_cache: parking_lot::Mutex::new(None),
        peer_addresses: Default::default(),
        push_peers: Default::default(),
        handoffs: Default::default(),
        table_reload: TableReload::new(settings),
        cfg,
    });
    info!(
        replica = %replica.name,
        table_path = %replica.paths.root(),
        listen = %replica.cfg.listen,
        parts = replica.store.parts().len(),
        dedup_window = replica.settings().dedup_window,
        "starting replica"
    );
    zk_access::verify_at_start(
        &replica.connect_string(),
        replica.session_timeout,
        &replica.paths,
        &replica.zk_access,
    )
    .await?;
    let failpoints = rtable_sidecar::failpoint::armed_names();
    if !failpoints.is_empty() {
        warn!(replica = %replica.name, failpoints = %failpoints.join(","), "failpoints armed (RTABLE_FAILPOINTS): for fault tests only");
    }
    // Every background task runs under the supervisor, which restarts one that panics
    // or returns and reports it in /readyz and /metrics while it is down.
    let mut tasks = Supervisor::new(&replica.name);
    tasks.spawn_with("session", replica.clone(), session::run);
    tasks.spawn_with("queue_pull", replica.clone(), queue::pull::run);
    tasks.spawn_with("queue_executor", replica.clone(), queue::executor::run);
    tasks.spawn_with("merge_assign", replica.clone(), merge::assign::run);
    tasks.spawn_with("cleanup", replica.clone(), cleanup::run);
    tasks.spawn_with("table_reload", replica.clone(), table_reload::run);
    tasks.spawn_with("handoff", replica.clone(), handoff::run);
    tasks.spawn_with("part_check", replica.clone(), part_check::run);
    let (committer, collector) = Committer::new(replica.clone());
    tasks.spawn_with("committer", collector, committer::collect);
    if let Some(path) = replica.cfg.users_file.clone() {
        let period = std::time::Duration::from_millis(replica.cfg.security_reload_ms);
        tasks.spawn_with("users_reload", gate.clone(), move |g: Gate| {
            g.watch(path.clone(), period)
        });
    }
    if let Some(tls) = tls.clone() {
        let period = std::time::Duration::from_millis(replica.cfg.security_reload_ms);
        tasks.spawn_with("tls_reload", tls, move |t: Arc<Tls>| t.watch(period));
    }
    let query =
        rtable_query::Engine::new(query_api::limits(&replica.cfg)).map_err(|e| e.to_string())?;
    let state = AppState {
        replica: replica.clone(),
        committer,
        tasks: tasks.health(),
        query: Arc::new(query),
    };
    serve::run(listeners, state, &gate, tls, shutdown_signal())
        .await
        .map_err(|e| e.to_string())?;
    // The server has answered its last request: stop the tasks before leaving, so that
    // neither the session task nor the executor acts on a replica removing its is_active.
    if tokio::time::timeout(SHUTDOWN_TASKS_TIMEOUT, tasks.shutdown())
        .await
        .is_err()
    {
        warn!(replica = %replica.name, "background tasks did not stop in time; leaving anyway");
    }
    deactivate(&replica).await;
    info!(replica = %replica.name, "shut down");
    Ok(())
}

/// Removes this replica's `is_active` on a clean stop, so the others see it leave at once
/// and its next start does not wait for this session to time out. The owner check leaves
/// alone a node a newer process created after our session expired.
async fn deactivate(replica: &Replica) {
    let Ok((client, _)) = replica.sessions.active() else {
        return;
    };
    let path = replica.paths.replica(&replica.name).is_active();
    let delete = async {
        let (_, stat) = client.get_data(&path).await?;
        if stat.ephemeral_owner == client.session_id().0 {
            client.delete(&path, Some(stat.version)).await?;
        }
        Ok::<(), zookeeper_client::Error>(())
    };
    match tokio::time::timeout(std::time::Duration::from_secs(2), delete).await {
        Ok(Ok(())) => info!(replica = %replica.name, "deactivated"),
        Ok(Err(e)) => {
            warn!(replica = %replica.name, error = %e, "cannot remove is_active on shutdown")
        }
        Err(_) => warn!(replica = %replica.name, "removing is_active on shutdown timed out"),
    }
}

async fn shutdown_signal() {
    let ctrl_c = tokio::signal::ctrl_c();
    #[cfg(unix)]
    {
        match tokio::signal::unix::signal(tokio::signal::unix::SignalKind::terminate()) {
            Ok(mut term) => {
                tokio::select! {
                    _ = ctrl_c => {}
                    _ = term.recv() => {}
                }
            }
            Err(_) => {
                let _ = ctrl_c.await;
            }
        }
    }
    #[cfg(not(unix))]
    {
        let _ = ctrl_c.await;
    }
}
