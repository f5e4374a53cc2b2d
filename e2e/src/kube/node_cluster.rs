//! A control plane on a bridge of its own with one `rtable-node` registered and Ready: what
//! the `kube_pods` tests and the Kubernetes playground run pods on. Needs root and `ip`.
//!
//! Fields drop in order: the agent (which stops its pods) first, then its directory, the
//! control plane, and the bridge last.

use std::path::Path;
use std::time::{Duration, Instant};

use anyhow::Context as _;
use k8s_openapi::api::core::v1::Node;
use kube::api::{Api, PostParams};
use serde_json::Value;

use super::control_plane::{ControlPlane, ControlPlaneOptions};
use super::kubectl::Cli;
use crate::node::config::NodeConfig;
use crate::node::process::{self, Bridge, NodeProcess};
use crate::node::provisioner;
use crate::poll::{Check, poll_until};

/// The one node's name.
pub const NODE: &str = "node-1";

/// The agent's directory (state, container logs and specs, its own log), kept when a test
/// fails, when starting failed, or when `RTABLE_E2E_KEEP` is set.
pub struct WorkDir {
    dir: Option<tempfile::TempDir>,
    keep: bool,
}

impl WorkDir {
    pub fn path(&self) -> &Path {
        self.dir
            .as_ref()
            .map_or(Path::new("/nonexistent"), |d| d.path())
    }
}

impl Drop for WorkDir {
    fn drop(&mut self) {
        if (self.keep || std::thread::panicking() || crate::keep_dirs())
            && let Some(dir) = self.dir.take()
        {
            eprintln!("rtable-node directory kept: {}", dir.keep().display());
        }
    }
}

/// Prints how long each phase took.
pub struct Clock(Instant, Instant);

impl Clock {
    pub fn new() -> Clock {
        Clock(Instant::now(), Instant::now())
    }

    pub fn lap(&mut self, what: &str) {
        let now = Instant::now();
        eprintln!(
            "[{:6.1}s] {what} ({:.1}s)",
            (now - self.0).as_secs_f64(),
            (now - self.1).as_secs_f64()
        );
        self.1 = now;
    }
}

impl Default for Clock {
    fn default() -> Self {
        Clock::new()
    }
}

/// A control plane on a bridge of its own, with one `rtable-node` registered and Ready.
pub struct NodeCluster {
    pub node: NodeProcess,
    pub work: WorkDir,
    pub plane: ControlPlane,
    pub bridge: Bridge,
    pub admin: kube::Client,
    pub kubectl: Cli,
    pub clock: Clock,
}

impl NodeCluster {
    /// Starts everything: `node_binary` is `rtable-node`, `image_map` the text of its image
    /// map.
    pub async fn start(node_binary: &Path, image_map: &str) -> anyhow::Result<NodeCluster> {
        process::preflight()?;
        let mut clock = Clock::new();
        let bridge = Bridge::create()?;
        let mut plane = ControlPlane::start(ControlPlaneOptions {
            address: bridge.cidr.gateway(),
            node_monitor_grace: Duration::from_secs(20),
        })
        .await
        .context("starting the control plane")?;
        clock.lap(&format!(
            "control plane on {} (bridge {})",
            plane.server, bridge.name
        ));
        let admin = plane.client().await.context("admin client")?;
        let kubectl = Cli::new(&plane.binaries().path("kubectl"), &plane.kubeconfig);
        let mut work = WorkDir {
            dir: Some(
                tempfile::Builder::new()
                    .prefix("rtable-node-")
                    .tempdir()
                    .context("creating the agent's directory")?,
            ),
            keep: false,
        };
        let node = match start_node(&plane, &bridge, &work, &admin, node_binary, image_map).await {
            Ok(node) => node,
            Err(e) => {
                work.keep = true;
                plane.keep();
                return Err(e);
            }
        };
        let mut cluster = NodeCluster {
            node,
            work,
            plane,
            bridge,
            admin,
            kubectl,
            clock,
        };
        if let Err(e) = cluster.wait_node_ready().await {
            cluster.work.keep = true;
            cluster.plane.keep();
            return Err(e);
        }
        cluster
            .clock
            .lap("node registered, lease renewed, not-ready taint removed");
        Ok(cluster)
    }

    /// The node registers, heartbeats (its lease), and loses its not-ready taint.
    async fn wait_node_ready(&mut self) -> anyhow::Result<()> {
        let nodes: Api<Node> = Api::all(self.admin.clone());
        let node = &mut self.node;
        poll_until(
            "the node Ready without the not-ready taint",
            Duration::from_secs(60),
            Duration::from_millis(250),
            || {
                let running = node.check_running();
                let nodes = nodes.clone();
                async move {
                    running?;
                    let Some(n) = nodes.get_opt(NODE).await? else {
                        return Ok(Check::Wait("no Node".into()));
                    };
                    let ready = n
                        .status
                        .as_ref()
                        .and_then(|s| s.conditions.as_ref())
                        .is_some_and(|c| {
                            c.iter().any(|c| c.type_ == "Ready" && c.status == "True")
                        });
                    let tainted = n
                        .spec
                        .as_ref()
                        .and_then(|s| s.taints.as_ref())
                        .is_some_and(|t| t.iter().any(|t| t.key.contains("not-ready")));
                    Ok(if ready && !tainted {
                        Check::Done(())
                    } else {
                        Check::Wait(format!("ready {ready}, tainted {tainted}"))
                    })
                }
            },
        )
        .await?;
        let lease = self
            .kubectl
            .run(
                &["get", "lease", "-n", "kube-node-lease", NODE, "-o", "json"],
                None,
            )
            .await
            .and_then(|o| o.ok("kubectl get lease"))?;
        let lease: Value = serde_json::from_str(&lease.stdout).context("lease json")?;
        anyhow::ensure!(
            lease["spec"]["holderIdentity"] == NODE,
            "the node's lease is held by {}",
            lease["spec"]["holderIdentity"]
        );
        Ok(())
    }

    /// Keeps the plane's and the agent's directories when dropped (a scenario failed).
    pub fn keep(&mut self) {
        self.work.keep = true;
        self.plane.keep();
    }

    /// `helm` with the admin kubeconfig.
    pub fn helm(&self) -> Cli {
        Cli::new(&self.plane.binaries().path("helm"), &self.plane.kubeconfig)
    }

    /// The project's own journey, its manifests unmodified: `kubectl apply`
    /// examples/zookeeper.yaml, `helm install` the operator's chart (one replica, a 5 s
    /// resync), `kubectl apply` examples/events.yaml, and `kubectl wait` until the table is
    /// Ready.
    pub async fn install_examples(&mut self) -> anyhow::Result<()> {
        self.install_examples_with(&["replicaCount=1", "resyncSeconds=5", "logFormat=text"])
            .await
    }

    /// [`NodeCluster::install_examples`] with the chart's values set by `operator_values`
    /// (each a `helm --set` argument).
    pub async fn install_examples_with(&mut self, operator_values: &[&str]) -> anyhow::Result<()> {
        let repo = crate::repo_root();
        let path = |p: &str| repo.join(p).display().to_string();
        let zookeeper = path("examples/zookeeper.yaml");
        let chart = path("charts/rtable-operator");
        let events = path("examples/events.yaml");
        let helm = self.helm();
        let steps: [(&Cli, Vec<&str>, &str); 4] = [
            (
                &self.kubectl,
                vec!["apply", "-n", "default", "-f", &zookeeper],
                "kubectl apply examples/zookeeper.yaml",
            ),
            (
                &helm,
                [
                    "install",
                    "rtable",
                    &chart,
                    "-n",
                    "rtable-system",
                    "--create-namespace",
                ]
                .into_iter()
                .chain(operator_values.iter().flat_map(|v| ["--set", *v]))
                .collect(),
                "helm install the operator",
            ),
            (
                &self.kubectl,
                vec!["apply", "-f", &events],
                "kubectl apply examples/events.yaml",
            ),
            (
                &self.kubectl,
                vec![
                    "wait",
                    "--for=condition=Ready",
                    "--timeout=240s",
                    "-n",
                    "default",
                    "rt/events",
                ],
                "kubectl wait for the table to be Ready",
            ),
        ];
        for (cli, args, what) in steps {
            cli.run(&args, None).await.and_then(|o| o.ok(what))?;
        }
        self.clock
            .lap("ZooKeeper, the operator (Helm) and the events table Ready");
        Ok(())
    }
}

/// The pids of the processes that run `program` in the pod `pod` (its containers see the
/// pod's name as `HOSTNAME`), found in /proc: what a test signals to stop or kill a
/// container's process itself.
pub fn container_pids(pod: &str, program: &str) -> anyhow::Result<Vec<i32>> {
    let wanted = format!("HOSTNAME={pod}");
    let mut pids = Vec::new();
    for entry in std::fs::read_dir("/proc").context("listing /proc")? {
        let Ok(entry) = entry else { continue };
        let Some(pid) = entry
            .file_name()
            .to_str()
            .and_then(|n| n.parse::<i32>().ok())
        else {
            continue;
        };
        // A process may exit while it is read: skip what cannot be read. A binary rebuilt
        // while it runs reads as "NAME (deleted)".
        let runs_program = std::fs::read_link(entry.path().join("exe")).is_ok_and(|exe| {
            exe.file_name()
                .is_some_and(|n| n.to_string_lossy().trim_end_matches(" (deleted)") == program)
        });
        if !runs_program {
            continue;
        }
        let in_pod = std::fs::read(entry.path().join("environ"))
            .is_ok_and(|env| env.split(|b| *b == 0).any(|v| v == wanted.as_bytes()));
        if in_pod {
            pids.push(pid);
        }
    }
    Ok(pids)
}

async fn start_node(
    plane: &ControlPlane,
    bridge: &Bridge,
    work: &WorkDir,
    admin: &kube::Client,
    node_binary: &Path,
    image_map: &str,
) -> anyhow::Result<NodeProcess> {
    // The agent's two identities: the node's, and the add-ons' (DNS, provisioner).
    let (role, binding) = provisioner::addon_rbac("rtable:node-addons");
    Api::all(admin.clone())
        .create(&PostParams::default(), &role)
        .await
        .context("ClusterRole")?;
    Api::all(admin.clone())
        .create(&PostParams::default(), &binding)
        .await
        .context("ClusterRoleBinding")?;
    let node_kubeconfig = plane
        .client_kubeconfig(&format!("system:node:{NODE}"), &["system:nodes"])
        .context("node kubeconfig")?;
    let addons_kubeconfig = plane
        .client_kubeconfig("rtable:node-addons", &[])
        .context("addons kubeconfig")?;
    // Written beside the agent's logs: the map a failed run used is kept with them.
    let image_map_path = work.path().join("images.yaml");
    std::fs::write(&image_map_path, image_map).context("writing the image map")?;
    let mut config = NodeConfig::new(
        NODE,
        node_kubeconfig,
        addons_kubeconfig,
        work.path().join("state"),
        image_map_path,
    );
    config.bridge = bridge.name.clone();
    config.pod_cidr = bridge.cidr;
    config.backoff_initial = Duration::from_secs(1);
    config.backoff_max = Duration::from_secs(10);
    config.volume_resync = Duration::from_secs(5);
    Ok(NodeProcess::start(node_binary, config)?)
}

/// The repository's image map (e2e/node-images/images.yaml), with the sidecar and operator
/// binaries where they are built (`RTABLE_SIDECAR_BIN` / `RTABLE_OPERATOR_BIN`, or the
/// target directory) and the ZooKeeper scripts by absolute path.
pub fn repository_image_map() -> anyhow::Result<String> {
    let images_dir = crate::repo_root().join("e2e/node-images");
    let bin_dir = |name: &str, var: &str| -> anyhow::Result<String> {
        Ok(crate::sidecar_proc::workspace_binary(name, var, name)?
            .parent()
            .context("a binary outside any directory")?
            .display()
            .to_string())
    };
    let map_path = images_dir.join("images.yaml");
    let text = std::fs::read_to_string(&map_path)
        .with_context(|| format!("reading {}", map_path.display()))?;
    Ok(text
        .replace(
            "ghcr.io/rtable/rtable-sidecar\n    path: [../../target/debug]",
            &format!(
                "ghcr.io/rtable/rtable-sidecar\n    path: [{}]",
                bin_dir("rtable-sidecar", "RTABLE_SIDECAR_BIN")?
            ),
        )
        .replace(
            "ghcr.io/rtable/rtable-operator\n    path: [../../target/debug]",
            &format!(
                "ghcr.io/rtable/rtable-operator\n    path: [{}]",
                bin_dir("rtable-operator", "RTABLE_OPERATOR_BIN")?
            ),
        )
        .replace(
            ": zookeeper/",
            &format!(": {}/zookeeper/", images_dir.display()),
        ))
}
