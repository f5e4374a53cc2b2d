//! One [`NodeCluster`] for every scenario of a test binary that runs pods: the control
//! plane, `rtable-node` with the repository's image map, and the user's journey done once
//! (`kubectl apply` examples/zookeeper.yaml, `helm install` of the operator,
//! examples/events.yaml Ready, then that table deleted), so each scenario only applies a
//! table of its own in a namespace of its own and reaches its pods by their IPs.
//!
//! Lifetimes as in [`super::shared`]: the processes belong to a thread that lives as long
//! as the test binary; at exit everything is stopped, and the directories (the plane's
//! and the agent's) are kept when a scenario failed.

use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Mutex, OnceLock};

use super::binaries::Binaries;
use super::kubectl::Cli;
use super::node_cluster::{NodeCluster, repository_image_map};
use super::shared::on_lasting_thread;

/// What scenarios use of the shared node cluster. Clients are made per scenario: each
/// test runs on a runtime of its own.
#[derive(Debug)]
pub struct SharedNode {
    pub kubeconfig: PathBuf,
    pub binaries: Binaries,
    /// The agent's state directory.
    pub state_dir: PathBuf,
    failed: AtomicBool,
}

static SHARED_NODE: OnceLock<SharedNode> = OnceLock::new();
static CLUSTER: Mutex<Option<NodeCluster>> = Mutex::new(None);

impl SharedNode {
    /// The cluster, started on first use with `node_binary` as the agent (later calls get
    /// the same one). Blocking; panics when it cannot start, as every scenario needs it.
    pub fn get(node_binary: &Path) -> &'static SharedNode {
        SHARED_NODE.get_or_init(|| match start(node_binary) {
            Ok(shared) => shared,
            Err(e) => panic!("starting the node cluster: {e:#}"),
        })
    }

    pub fn kubectl(&self) -> Cli {
        Cli::new(&self.binaries.path("kubectl"), &self.kubeconfig)
    }

    pub async fn client(&self) -> anyhow::Result<kube::Client> {
        super::control_plane::client_for(&self.kubeconfig).await
    }

    /// Held for a scenario: if the scenario panics, the directories are kept at exit.
    pub fn scenario(&'static self) -> NodeScenarioGuard {
        NodeScenarioGuard(self)
    }
}

pub struct NodeScenarioGuard(&'static SharedNode);

impl Drop for NodeScenarioGuard {
    fn drop(&mut self) {
        if std::thread::panicking() {
            self.0.failed.store(true, Ordering::SeqCst);
        }
    }
}

fn start(node_binary: &Path) -> anyhow::Result<SharedNode> {
    let image_map = repository_image_map()?;
    let node_binary = node_binary.to_path_buf();
    let cluster = on_lasting_thread("node-cluster", move || async move {
        let mut cluster = NodeCluster::start(&node_binary, &image_map).await?;
        if let Err(e) = journey(&mut cluster).await {
            cluster.keep();
            return Err(e);
        }
        Ok(cluster)
    })?;
    let shared = SharedNode {
        kubeconfig: cluster.plane.kubeconfig.clone(),
        binaries: cluster.plane.binaries().clone(),
        state_dir: cluster.node.config.state_dir.clone(),
        failed: AtomicBool::new(false),
    };
    *CLUSTER.lock().unwrap_or_else(|p| p.into_inner()) = Some(cluster);
    // SAFETY: atexit(3) only records the function pointer; `stop_at_exit` is an
    // `extern "C" fn()` that never unwinds.
    if unsafe { libc::atexit(stop_at_exit) } != 0 {
        eprintln!(
            "node cluster: cannot register its stop at exit; its processes die with the test binary"
        );
    }
    Ok(shared)
}

/// The examples installed, then examples/events.yaml deleted: its three idle replicas
/// would only take CPU from the scenarios' own tables.
async fn journey(cluster: &mut NodeCluster) -> anyhow::Result<()> {
    cluster.install_examples().await?;
    cluster
        .kubectl
        .run(
            &["delete", "rt/events", "-n", "default", "--wait=false"],
            None,
        )
        .await
        .and_then(|o| o.ok("kubectl delete rt/events"))?;
    Ok(())
}

extern "C" fn stop_at_exit() {
    let cluster = CLUSTER.lock().map(|mut c| c.take()).unwrap_or(None);
    if let Some(mut cluster) = cluster {
        if SHARED_NODE
            .get()
            .is_some_and(|s| s.failed.load(Ordering::SeqCst))
        {
            cluster.keep();
        }
        drop(cluster);
    }
}
