//! `rtable-e2e playground --kubernetes`: the project's journey on a Kubernetes cluster on
//! this machine (a control plane on a bridge of its own and the process kubelet
//! `rtable-node`): `kubectl apply` ZooKeeper, `helm install` the operator, `kubectl apply`
//! the events table, sample rows inserted, then the `kubectl` commands to try and
//! `kubectl get rt -o wide` every few seconds until Ctrl-C, which tears everything down.

use std::path::PathBuf;
use std::time::Duration;

use anyhow::Context as _;
use k8s_openapi::api::core::v1::Pod;
use kube::api::{Api, ListParams};
use serde_json::Value;

use super::binaries::Binaries;
use super::node_cluster::{NodeCluster, repository_image_map};
use crate::client::ReplicaClient;
use crate::poll::{Check, poll_until};

/// What the playground needs from its command line.
#[derive(Debug, Clone)]
pub struct Options {
    /// The `rtable-node` binary.
    pub node_binary: PathBuf,
    /// Where the user's kubeconfig goes (`<dir>/kubeconfig`).
    pub dir: PathBuf,
    /// The rows inserted through events-0.
    pub rows: Vec<Value>,
    /// Between two `kubectl get rt -o wide`.
    pub interval: Duration,
    /// Print once and exit.
    pub once: bool,
}

const TABLE: &str = "events";
const NAMESPACE: &str = "default";

/// Runs the playground until Ctrl-C (or once); everything started is stopped on return.
pub async fn run(opts: Options) -> anyhow::Result<()> {
    anyhow::ensure!(
        nix::unistd::geteuid().is_root(),
        "the Kubernetes playground runs pods in network namespaces: run as root"
    );
    if std::env::var_os("RTABLE_KUBE_BIN").is_none() {
        println!(
            "locating the Kubernetes binaries (scripts/kube-binaries.sh: the first run on a machine \
             builds etcd, the control plane, kubectl and helm from source, ~12 min)..."
        );
    }
    let binaries = tokio::task::spawn_blocking(Binaries::locate)
        .await
        .context("the binary lookup panicked")??;
    println!("Kubernetes binaries in {}", binaries.dir().display());
    let image_map = repository_image_map()?;
    println!("starting a control plane and rtable-node (the process kubelet)...");
    // Ctrl-C ends whatever is under way; dropping it stops what it started.
    let ctrl_c = tokio::signal::ctrl_c();
    tokio::pin!(ctrl_c);
    let mut cluster = tokio::select! {
        c = NodeCluster::start(&opts.node_binary, &image_map) => c?,
        _ = &mut ctrl_c => {
            println!("\ninterrupted; stopping what was started");
            return Ok(());
        }
    };
    let kubeconfig = opts.dir.join("kubeconfig");
    let result = tokio::select! {
        r = journey(&mut cluster, &opts, &kubeconfig) => r,
        _ = &mut ctrl_c => {
            println!("\ninterrupted");
            Ok(())
        }
    };
    println!("\ntearing down: the pods, rtable-node, the control plane and the bridge...");
    if kubeconfig.exists()
        && let Err(e) = std::fs::remove_file(&kubeconfig)
    {
        eprintln!("removing {}: {e}", kubeconfig.display());
    }
    drop(cluster);
    if result.is_ok() {
        println!("stopped");
    }
    result
}

async fn journey(
    cluster: &mut NodeCluster,
    opts: &Options,
    kubeconfig: &std::path::Path,
) -> anyhow::Result<()> {
    println!(
        "kubectl apply -f examples/zookeeper.yaml; helm install rtable charts/rtable-operator; \
         kubectl apply -f examples/events.yaml; kubectl wait --for=condition=Ready rt/{TABLE}..."
    );
    cluster.install_examples().await?;

    // The replicas and their addresses.
    let pods: Api<Pod> = Api::namespaced(cluster.admin.clone(), NAMESPACE);
    let mut replicas: Vec<(String, String)> = pods
        .list(&ListParams::default())
        .await
        .context("listing the pods")?
        .items
        .into_iter()
        .filter_map(|p| {
            let name = p.metadata.name?;
            let ip = p.status?.pod_ip?;
            name.strip_prefix(&format!("{TABLE}-"))?
                .parse::<u32>()
                .ok()?;
            Some((name, ip))
        })
        .collect();
    replicas.sort_by_key(|(name, _)| name[TABLE.len() + 1..].parse::<u32>().unwrap_or(0));
    let clients: Vec<(String, ReplicaClient)> = replicas
        .iter()
        .map(|(name, ip)| {
            Ok((
                name.clone(),
                ReplicaClient::new(&format!("http://{ip}:9009"))?,
            ))
        })
        .collect::<anyhow::Result<_>>()?;
    let (first, writer) = clients.first().context("no events-N pod has an address")?;
    let inserted = writer
        .insert_json(&opts.rows)
        .await
        .with_context(|| format!("inserting the sample rows through {first}"))?
        .rows;
    poll_until(
        "every replica has the sample rows",
        Duration::from_secs(60),
        Duration::from_millis(250),
        || {
            let clients = clients.clone();
            async move {
                let mut missing = Vec::new();
                for (name, client) in &clients {
                    let rows = client.status().await?.rows;
                    if rows != inserted {
                        missing.push(format!("{name}: {rows} rows"));
                    }
                }
                Ok(if missing.is_empty() {
                    Check::Done(())
                } else {
                    Check::Wait(missing.join(", "))
                })
            }
        },
    )
    .await?;
    cluster.clock.lap(&format!(
        "{inserted} sample rows inserted through {first}, on all {} replicas",
        clients.len()
    ));

    std::fs::create_dir_all(&opts.dir)
        .with_context(|| format!("creating {}", opts.dir.display()))?;
    std::fs::copy(&cluster.plane.kubeconfig, kubeconfig)
        .with_context(|| format!("writing {}", kubeconfig.display()))?;
    let kubectl = cluster.plane.binaries().path("kubectl");
    println!(
        "\nThe cluster is up: API server {server}, node {node} (rtable-node, pods on bridge {bridge}).\n\
         kubeconfig: {kc}\n\
         kubectl:    {kubectl}\n\n\
         Try it (in another shell):\n  \
         export KUBECONFIG={kc}\n  \
         export PATH={bin}:$PATH\n  \
         kubectl get rt -o wide -A\n  \
         kubectl wait --for=condition=Ready rt/{TABLE}\n  \
         kubectl get pods -o wide\n  \
         kubectl logs {first} -c sidecar\n  \
         kubectl scale rt/{TABLE} --replicas=4\n  \
         curl http://{ip}:9009/status",
        server = cluster.plane.server,
        node = super::node_cluster::NODE,
        bridge = cluster.bridge.name,
        kc = kubeconfig.display(),
        kubectl = kubectl.display(),
        bin = cluster.plane.binaries().dir().display(),
        ip = replicas[0].1,
    );
    if !opts.once {
        println!("\nPress Ctrl-C to stop (and tear everything down).");
    }
    loop {
        let out = cluster
            .kubectl
            .run(&["get", "rt", "-o", "wide", "-n", NAMESPACE], None)
            .await
            .and_then(|o| o.ok("kubectl get rt -o wide"))?;
        println!("\n$ kubectl get rt -o wide\n{}", out.stdout.trim_end());
        if opts.once {
            return Ok(());
        }
        tokio::time::sleep(opts.interval).await;
        cluster.node.check_running()?;
        cluster.plane.check_running()?;
    }
}
