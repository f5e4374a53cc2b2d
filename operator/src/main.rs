//! `rtable-operator`: `crd` prints the CRD; `run` (the default) runs the controller.

use std::net::SocketAddr;
use std::sync::Arc;
use std::time::Duration;

use anyhow::Context as _;
use clap::{Parser, Subcommand};
use futures::StreamExt;
use k8s_openapi::api::apps::v1::StatefulSet;
use k8s_openapi::api::core::v1::{ConfigMap, Service};
use k8s_openapi::api::policy::v1::PodDisruptionBudget;
use kube::runtime::events::Reporter;
use kube::runtime::{Controller, WatchStreamExt as _, reflector, watcher};
use kube::{Api, Client};
use prometheus_client::registry::Registry;
use rtable_operator::backend::ZooKeeperBackend;
use rtable_operator::build::BuildConfig;
use rtable_operator::crd::crd_yaml;
use rtable_operator::guard::{GuardedTable, error_policy_guarded, reconcile_guarded};
use rtable_operator::metrics::Metrics;
use rtable_operator::reconcile::Context;

#[derive(Parser)]
#[command(
    name = "rtable-operator",
    about = "Kubernetes operator for rtable replicated tables"
)]
struct Cli {
    #[command(subcommand)]
    command: Option<Command>,
    #[command(flatten)]
    run: RunArgs,
}

#[derive(Subcommand)]
enum Command {
    /// Print the ReplicatedTable CRD as YAML.
    Crd,
    /// Run the controller (the default; takes the options above).
    Run,
}

#[derive(clap::Args, Clone)]
struct RunArgs {
    /// Sidecar image for tables without `spec.image`.
    #[arg(
        long,
        env = "RTABLE_SIDECAR_IMAGE",
        default_value = "ghcr.io/rtable/rtable-sidecar:0.1.0"
    )]
    sidecar_image: String,
    /// Address of /metrics and /healthz.
    #[arg(long, env = "RTABLE_OPERATOR_LISTEN", default_value = "0.0.0.0:8080")]
    listen: SocketAddr,
    #[arg(long, env = "RTABLE_CLUSTER_DOMAIN", default_value = "cluster.local")]
    cluster_domain: String,
    /// Seconds after a table's deletionTimestamp within which its ZooKeeper tree must be
    /// removed (pods stopped, ZooKeeper reachable and willing); past it the finalizer is
    /// released with a Warning Event naming the tree left behind.
    #[arg(long, env = "RTABLE_ZOOKEEPER_GRACE_SECONDS", default_value_t = 600)]
    zookeeper_grace_seconds: u64,
    /// Seconds between status refreshes of a healthy table.
    #[arg(long, env = "RTABLE_RESYNC_SECONDS", default_value_t = 30)]
    resync_seconds: u64,
    /// Apply the CRD at start, so `helm upgrade` (which skips `crds/`) still upgrades it.
    #[arg(long, env = "RTABLE_INSTALL_CRD", default_value_t = true, action = clap::ArgAction::Set)]
    install_crd: bool,
    /// Elect a leader over a Lease; off for a single-replica install or local runs.
    #[arg(long, env = "RTABLE_LEADER_ELECTION", default_value_t = true, action = clap::ArgAction::Set)]
    leader_election: bool,
    /// Seconds a leader Lease lasts without renewal before another replica may take it.
    #[arg(long, env = "RTABLE_LEASE_DURATION_SECONDS", default_value_t = 15)]
    lease_duration_seconds: u64,
    /// Seconds between a follower's attempts to take the Lease and the leader's renewals
    /// (below two thirds of the lease duration).
    #[arg(long, env = "RTABLE_LEASE_RETRY_SECONDS", default_value_t = 5)]
    lease_retry_seconds: u64,
    #[arg(long, env = "POD_NAMESPACE", default_value = "default")]
    namespace: String,
    #[arg(long, env = "POD_NAME", default_value = "rtable-operator-local")]
    identity: String,
    /// `json` (the default, for log collectors) or `text`.
    #[arg(long, env = "RTABLE_LOG_FORMAT", default_value = "json")]
    log_format: String,
}

fn init_tracing(format: &str) {
    let filter = tracing_subscriber::EnvFilter::try_from_default_env()
        .unwrap_or_else(|_| tracing_subscriber::EnvFilter::new("info,kube=warn"));
    let builder = tracing_subscriber::fmt().with_env_filter(filter);
    if format == "text" {
        builder.init();
    } else {
        builder.json().flatten_event(true).init();
    }
}

/// SIGTERM (what the kubelet sends) or SIGINT (Ctrl-C).
async fn shutdown_signal() {
    let term = async {
        match tokio::signal::unix::signal(tokio::signal::unix::SignalKind::terminate()) {
            Ok(mut s) => {
                s.recv().await;
            }
            Err(e) => {
                tracing::warn!(error = %e, "cannot listen for SIGTERM");
                std::future::pending::<()>().await;
            }
        }
    };
    tokio::select! {
        () = term => {}
        r = tokio::signal::ctrl_c() => {
            if let Err(e) = r {
                tracing::warn!(error = %e, "cannot listen for SIGINT");
                std::future::pending::<()>().await;
            }
        }
    }
}

#[tokio::main]
async fn main() -> anyhow::Result<()> {
    let cli = Cli::parse();
    match cli.command {
        Some(Command::Crd) => {
            print!("{}", crd_yaml().context("render the CRD")?);
            Ok(())
        }
        Some(Command::Run) | None => run(cli.run).await,
    }
}

async fn run(args: RunArgs) -> anyhow::Result<()> {
    init_tracing(&args.log_format);
    let timings = rtable_operator::leader::LeaseTimings::new(
        args.lease_duration_seconds,
        args.lease_retry_seconds,
    )?;
    let client = Client::try_default()
        .await
        .context("connect to the Kubernetes API")?;

    let metrics = Metrics::default();
    let mut registry = Registry::default();
    metrics.register(&mut registry);
    let listener = tokio::net::TcpListener::bind(args.listen)
        .await
        .with_context(|| format!("bind {}", args.listen))?;
    tokio::spawn(async move {
        if let Err(e) = axum::serve(
            listener,
            rtable_operator::metrics::router(Arc::new(registry)),
        )
        .await
        {
            tracing::error!(error = %e, "metrics server stopped");
        }
    });

    if args.install_crd {
        use rtable_operator::install::{CrdApplied, apply_crd};
        match apply_crd(&client, env!("CARGO_PKG_VERSION")).await? {
            CrdApplied::Applied { name } => tracing::info!(crd = %name, "CRD applied"),
            CrdApplied::NewerKept { name, installed } => tracing::warn!(
                crd = %name,
                installed = %installed,
                ours = env!("CARGO_PKG_VERSION"),
                "CRD of a newer operator kept: this older operator does not downgrade it"
            ),
        }
    }

    let elector = args.leader_election.then(|| {
        rtable_operator::leader::LeaderElector::new(
            client.clone(),
            &args.namespace,
            "rtable-operator",
            &args.identity,
            timings,
        )
    });
    if let Some(e) = &elector {
        tracing::info!(identity = %args.identity, "waiting for leadership");
        tokio::select! {
            () = e.acquire() => tracing::info!(identity = %args.identity, "leading"),
            () = shutdown_signal() => {
                tracing::info!("shutdown requested while following; exiting");
                return Ok(());
            }
        }
    }

    metrics.leader.set(1);
    let leader = metrics.leader.clone();
    let ctx = Arc::new(Context {
        client: client.clone(),
        backend: Arc::new(
            ZooKeeperBackend::new(Duration::from_secs(5)).context("build the HTTP client")?,
        ),
        build: BuildConfig {
            default_image: args.sidecar_image.clone(),
            cluster_domain: args.cluster_domain.clone(),
        },
        metrics,
        reporter: Reporter {
            controller: "rtable-operator".into(),
            instance: Some(args.identity.clone()),
        },
        zookeeper_grace: Duration::from_secs(args.zookeeper_grace_seconds),
        resync: Duration::from_secs(args.resync_seconds),
        failures: Default::default(),
    });
    // Guarded: one table this operator cannot read must not stop the watch of all others.
    let tables: Api<GuardedTable> = Api::all(client.clone());
    let owned = watcher::Config::default().labels("app.kubernetes.io/managed-by=rtable-operator");
    let (reader, writer) = reflector::store();
    let changes = watcher(tables, watcher::Config::default().any_semantic())
        .default_backoff()
        .reflect(writer)
        .applied_objects()
        .predicate_filter(rtable_operator::watch::relevant_change, Default::default());
    let controller = Controller::for_stream(changes, reader)
        .owns(Api::<StatefulSet>::all(client.clone()), owned.clone())
        .owns(Api::<Service>::all(client.clone()), owned.clone())
        .owns(Api::<ConfigMap>::all(client.clone()), owned.clone())
        .owns(Api::<PodDisruptionBudget>::all(client.clone()), owned)
        .shutdown_on_signal()
        .run(reconcile_guarded, error_policy_guarded, ctx)
        .for_each(|result| async move {
            use kube::runtime::controller::Error as ControllerError;
            match result {
                Ok(_) => {}
                // Logged by the error policy, with the table's name.
                Err(ControllerError::ReconcilerFailed(..)) => {}
                // A table deleted while it waited in the queue.
                Err(e @ ControllerError::ObjectNotFound(_)) => {
                    tracing::debug!(error = %e, "queued table is gone")
                }
                // The watch itself failing (API server down, RBAC): every table waits on it.
                Err(e) => tracing::warn!(error = %e, "controller error"),
            }
        });

    match &elector {
        Some(e) => {
            tokio::select! {
                () = controller => {
                    // Reconciles in flight have finished: hand over at once instead of
                    // making the other replica wait for the lease to expire.
                    tracing::info!("controller stopped; releasing the lease");
                    leader.set(0);
                    match e.release().await {
                        Ok(true) => tracing::info!("lease released"),
                        Ok(false) => tracing::info!("lease was no longer ours"),
                        Err(err) => tracing::warn!(error = %err, "cannot release the lease; it expires on its own"),
                    }
                }
                () = e.hold() => {
                    // Another operator may already be reconciling: stop at once and let
                    // the Deployment restart this pod as a follower.
                    leader.set(0);
                    anyhow::bail!("leadership lost");
                }
            }
        }
        None => controller.await,
    }
    Ok(())
}
