//! Helpers shared by the Kubernetes scenarios (`kube*.rs`): the shared control plane with
//! the chart's CRD, a namespace per scenario, kubectl calls, the operator as a local
//! process, and polling.
#![allow(dead_code)]

use rtable_e2e::kube::daemon::Daemon;
use rtable_e2e::kube::kubectl::Output;
use rtable_e2e::kube::{Cli, ControlPlaneOptions, Shared};
use tokio::sync::OnceCell;

pub struct Plane {
    pub shared: &'static Shared,
    pub kubectl: Cli,
}

static CRD: OnceCell<()> = OnceCell::const_new();

/// The shared control plane with the chart's CRD installed and established.
pub async fn plane() -> Plane {
    let shared = tokio::task::spawn_blocking(|| Shared::get(ControlPlaneOptions::default()))
        .await
        .expect("the control plane starts");
    CRD.get_or_init(|| async {
        shared
            .install_chart_crd()
            .await
            .unwrap_or_else(|e| panic!("{e:#}"))
    })
    .await;
    Plane {
        shared,
        kubectl: shared.kubectl(),
    }
}

/// `kubectl args`, panicking with its output when it fails; returns what it printed.
pub async fn kubectl(p: &Plane, args: &[&str], stdin: Option<&str>, what: &str) -> String {
    p.kubectl
        .run(args, stdin)
        .await
        .and_then(|o| o.ok(what))
        .unwrap_or_else(|e| panic!("{e:#}"))
        .stdout
}

/// A fresh namespace for one scenario.
pub async fn namespace(p: &Plane, name: &str) -> String {
    kubectl(
        p,
        &["create", "namespace", name],
        None,
        "kubectl create namespace",
    )
    .await;
    name.to_string()
}

/// examples/events.yaml in namespace `ns`, with `edit` applied to its YAML.
pub fn events_manifest(ns: &str, edit: impl FnOnce(&mut serde_yaml::Value)) -> String {
    let text =
        std::fs::read_to_string(rtable_e2e::example_manifest()).expect("examples/events.yaml");
    let mut doc: serde_yaml::Value = serde_yaml::from_str(&text).expect("the example parses");
    doc["metadata"]["namespace"] = ns.into();
    edit(&mut doc);
    serde_yaml::to_string(&doc).expect("yaml")
}

/// `kubectl apply -f -` of `manifest`; the caller asserts success or refusal.
pub async fn apply(p: &Plane, manifest: &str) -> Output {
    p.kubectl
        .run(&["apply", "-f", "-"], Some(manifest))
        .await
        .unwrap_or_else(|e| panic!("{e:#}"))
}

/// The operator as a process of this host with an admin kubeconfig, reconciling against
/// the real API server (`kube_pods.rs` runs it as a pod of the chart); returns it and the
/// port of its `/metrics`.
pub fn start_operator(shared: &Shared, name: &str) -> (Daemon, u16) {
    start_operator_with(shared, name, &[])
}

pub fn start_operator_with(shared: &Shared, name: &str, extra: &[&str]) -> (Daemon, u16) {
    let bin = rtable_e2e::sidecar_proc::workspace_binary(
        "rtable-operator",
        "RTABLE_OPERATOR_BIN",
        "rtable-operator",
    )
    .unwrap_or_else(|e| panic!("{e:#}"));
    let port = rtable_e2e::ports::free_ports(1).expect("a free port")[0];
    let mut args = vec![
        format!("--listen=127.0.0.1:{port}"),
        "--leader-election=false".to_string(),
        "--resync-seconds=5".to_string(),
        "--log-format=text".to_string(),
    ];
    args.extend(extra.iter().map(|a| a.to_string()));
    let env = [("KUBECONFIG", shared.kubeconfig.display().to_string())];
    let daemon = Daemon::spawn_with_env(name, &bin, &args, &env, shared.dir())
        .unwrap_or_else(|e| panic!("{e:#}"));
    (daemon, port)
}

/// `kubectl get <what> -n <ns> -o json`, parsed; `None` when kubectl fails (not found).
pub async fn get_json(p: &Plane, ns: &str, what: &str) -> Option<serde_json::Value> {
    let out = p
        .kubectl
        .run(&["get", what, "-n", ns, "-o", "json"], None)
        .await
        .unwrap_or_else(|e| panic!("{e:#}"));
    out.success
        .then(|| serde_json::from_str(&out.stdout).expect("kubectl prints JSON"))
}

/// Polls `check` every 500 ms until it returns `Some`, for at most `secs`.
pub async fn eventually<T, F, Fut>(what: &str, secs: u64, mut check: F) -> T
where
    F: FnMut() -> Fut,
    Fut: std::future::Future<Output = Option<T>>,
{
    let deadline = std::time::Instant::now() + std::time::Duration::from_secs(secs);
    loop {
        if let Some(v) = check().await {
            return v;
        }
        assert!(
            std::time::Instant::now() < deadline,
            "timed out after {secs}s waiting for {what}"
        );
        tokio::time::sleep(std::time::Duration::from_millis(500)).await;
    }
}

/// The Events in `ns` with `reason`.
pub async fn events_with_reason(p: &Plane, ns: &str, reason: &str) -> Vec<serde_json::Value> {
    let Some(list) = get_json(p, ns, "events").await else {
        return Vec::new();
    };
    list["items"]
        .as_array()
        .map(|items| {
            items
                .iter()
                .filter(|e| e["reason"] == reason)
                .cloned()
                .collect()
        })
        .unwrap_or_default()
}

/// A one-server ZooKeeper for a scenario, its data and log under the plane's directory
/// (kept with it when the scenario fails).
pub fn local_zookeeper(p: &Plane, name: &str) -> rtable_e2e::ZkEnsemble {
    rtable_e2e::ZkEnsemble::start(
        1,
        &p.shared.dir().join(format!("zookeeper-{name}")),
        rtable_e2e::zk_ensemble::Jit::QuickStart,
    )
    .unwrap_or_else(|e| panic!("{e:#}"))
}

/// A session to `zk`, to look at the tree the operator made.
pub async fn zk_session(zk: &rtable_e2e::ZkEnsemble) -> zookeeper_client::Client {
    rtable_protocol::tree::connect(
        &zk.connect_string(),
        std::time::Duration::from_secs(10),
        std::time::Duration::from_secs(5),
    )
    .await
    .expect("a ZooKeeper session")
}
