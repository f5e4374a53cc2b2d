//! A table's pods through their life on a real control plane: the StatefulSet controller
//! scaling them, rtable-node restarting a killed container in place, a deleted pod coming
//! back with its volume, evictions through the operator's PodDisruptionBudget, and a pod cut
//! off from the network. The sidecars run as pods of `rtable-node`; the operator as the
//! chart's pod. Every scenario applies examples/events.yaml in a namespace of its own (with
//! ZooKeeper's shortest session timeout, 4 s, so sessions of dead replicas go quickly) and
//! ends with the e2e checker: every acknowledged row on every replica exactly once.
//!
//! Needs root and `ip` (iproute2). Run with
//! `cargo test -p rtable-e2e --test kube_lifecycle -- --test-threads=1 --nocapture`.

mod kube_common;

use std::collections::BTreeSet;
use std::sync::{Arc, Mutex};
use std::time::Duration;

use k8s_openapi::api::core::v1::{PersistentVolume, PersistentVolumeClaim, Pod};
use k8s_openapi::api::policy::v1::PodDisruptionBudget;
use kube::api::{Api, EvictParams};
use kube_common::{events_manifest, eventually};
use rtable_e2e::ReplicaClient;
use rtable_e2e::checker::{Attempt, Checker, LiveReplica};
use rtable_e2e::driver::{Driver, DriverConfig, Target, wait_more_acks};
use rtable_e2e::kube::Cli;
use rtable_e2e::kube::shared_node::{NodeScenarioGuard, SharedNode};
use rtable_e2e::node::pod_faults;
use serde_json::Value;
use zookeeper_client as zk;

const PORT: u16 = 9009;

/// One scenario's table: examples/events.yaml in namespace `ns`, its pods, its tree.
struct Table {
    ns: String,
    kubectl: Cli,
    pods: Api<Pod>,
    claims: Api<PersistentVolumeClaim>,
    volumes: Api<PersistentVolume>,
    zk: zk::Client,
    paths: rtable_protocol::TablePaths,
    _scenario: NodeScenarioGuard,
}

impl Table {
    /// The shared node cluster, namespace `ns` and the table in it with `replicas` pods
    /// and `insert_quorum`, Ready.
    async fn create(ns: &str, replicas: u32, insert_quorum: u32) -> Table {
        let node = tokio::task::spawn_blocking(|| {
            SharedNode::get(std::path::Path::new(env!("CARGO_BIN_EXE_rtable-node")))
        })
        .await
        .expect("the node cluster starts");
        let scenario = node.scenario();
        let admin = node.client().await.unwrap_or_else(|e| panic!("{e:#}"));
        let kubectl = node.kubectl();
        run(&kubectl, &["create", "namespace", ns], None).await;
        let manifest = events_manifest(ns, |d| {
            d["spec"]["replicas"] = replicas.into();
            d["spec"]["insertQuorum"] = insert_quorum.into();
            d["spec"]["zookeeper"]["sessionTimeoutSeconds"] = 4.into();
        });
        run(&kubectl, &["apply", "-f", "-"], Some(&manifest)).await;
        let zk = zookeeper_session(&Api::namespaced(admin.clone(), "default")).await;
        let mut table = Table {
            ns: ns.to_string(),
            kubectl,
            pods: Api::namespaced(admin.clone(), ns),
            claims: Api::namespaced(admin.clone(), ns),
            volumes: Api::all(admin),
            zk,
            paths: rtable_protocol::TablePaths::new(String::new()),
            _scenario: scenario,
        };
        table.ready(replicas).await;
        let rt = table.rt().await;
        let path = rt["status"]["tablePath"]
            .as_str()
            .expect("status.tablePath");
        table.paths = rtable_protocol::TablePaths::new(path.to_string());
        table
    }

    async fn rt(&self) -> Value {
        let out = run(
            &self.kubectl,
            &["get", "rt/events", "-n", &self.ns, "-o", "json"],
            None,
        )
        .await;
        serde_json::from_str(&out).expect("kubectl prints JSON")
    }

    /// The table Ready for its current generation with `replicas` ready, active replicas.
    async fn ready(&self, replicas: u32) {
        let what = format!("rt/events in {} Ready with {replicas} replicas", self.ns);
        eventually(&what, 180, || async {
            let rt = self.rt().await;
            let status = &rt["status"];
            let ready = status["conditions"].as_array().is_some_and(|c| {
                c.iter()
                    .any(|c| c["type"] == "Ready" && c["status"] == "True")
            });
            (ready
                && status["observedGeneration"] == rt["metadata"]["generation"]
                && status["readyReplicas"] == replicas
                && status["activeReplicas"] == replicas)
                .then_some(())
        })
        .await;
    }

    async fn pod(&self, name: &str) -> Pod {
        self.pods
            .get(name)
            .await
            .unwrap_or_else(|e| panic!("pod {name}: {e}"))
    }

    /// `name` Ready, with `restarts` restarts of its container and another UID than
    /// `not_uid` when given.
    async fn ready_pod(&self, name: &str, restarts: i32, not_uid: Option<&str>) -> Pod {
        let what = format!("pod {name} Ready with {restarts} restarts");
        eventually(&what, 120, || async {
            let pod = self.pods.get_opt(name).await.ok()??;
            let status = pod.status.as_ref()?;
            let ready = status
                .conditions
                .iter()
                .flatten()
                .any(|c| c.type_ == "Ready" && c.status == "True");
            let restart_count = status.container_statuses.as_ref()?.first()?.restart_count;
            let new = not_uid.is_none_or(|old| pod.metadata.uid.as_deref() != Some(old));
            (ready && restart_count == restarts && new && status.pod_ip.is_some()).then_some(pod)
        })
        .await
    }

    async fn url(&self, name: &str) -> String {
        let ip = self
            .pod(name)
            .await
            .status
            .and_then(|s| s.pod_ip)
            .unwrap_or_else(|| panic!("{name} has an address"));
        format!("http://{ip}:{PORT}")
    }

    async fn client(&self, name: &str) -> ReplicaClient {
        ReplicaClient::new(&self.url(name).await).expect("client")
    }

    async fn targets(&self, names: &[&str]) -> Vec<Target> {
        let mut targets = Vec::new();
        for name in names {
            targets.push(Target {
                name: name.to_string(),
                url: self.url(name).await,
            });
        }
        targets
    }

    /// Inserts by two clients through the replicas `names` (retried until acknowledged),
    /// running once 5 are acknowledged.
    async fn load(&self, names: &[&str], prefix: &str) -> (Arc<Checker>, Driver) {
        let checker = Arc::new(Checker::new());
        let driver = Driver::start(
            self.targets(names).await,
            checker.clone(),
            DriverConfig {
                clients: 2,
                pause: Duration::from_millis(150),
                prefix: prefix.into(),
                ..DriverConfig::default()
            },
        );
        wait_more_acks(&checker, 5, Duration::from_secs(60))
            .await
            .expect("inserts acknowledged");
        (checker, driver)
    }

    /// Where the replica's volume is mounted on this host: its bound PersistentVolume's
    /// local path.
    async fn volume_dir(&self, name: &str) -> (String, std::path::PathBuf) {
        let claim = format!("data-{name}");
        let pv = self
            .claims
            .get(&claim)
            .await
            .ok()
            .and_then(|c| c.spec)
            .and_then(|s| s.volume_name)
            .unwrap_or_else(|| panic!("claim {claim} is bound"));
        let path = self
            .volumes
            .get(&pv)
            .await
            .ok()
            .and_then(|v| v.spec)
            .and_then(|s| s.local)
            .map(|l| std::path::PathBuf::from(l.path))
            .unwrap_or_else(|| panic!("volume {pv} is local"));
        (pv, path)
    }

    /// The checker's verification on the replicas `names`, the only ones registered.
    async fn verify(&self, checker: &Checker, names: &[&str]) {
        let mut live = Vec::new();
        for name in names {
            live.push(LiveReplica {
                name: name.to_string(),
                client: self.client(name).await,
                parts_dir: self.volume_dir(name).await.1.join("parts"),
            });
        }
        let total = u32::try_from(names.len()).expect("a few replicas");
        checker
            .verify_replicas(&live, &self.zk, &self.paths, total)
            .await
            .unwrap_or_else(|e| panic!("{e:#}"));
    }

    /// Deleted with its namespace, not waited for: the operator removes its tree.
    async fn delete(self) {
        run(
            &self.kubectl,
            &["delete", "namespace", &self.ns, "--wait=false"],
            None,
        )
        .await;
    }
}

/// `kubectl args`, panicking with its output when it fails; returns what it printed.
async fn run(kubectl: &Cli, args: &[&str], stdin: Option<&str>) -> String {
    kubectl
        .run(args, stdin)
        .await
        .and_then(|o| o.ok(&format!("kubectl {}", args.join(" "))))
        .unwrap_or_else(|e| panic!("{e:#}"))
        .stdout
}

/// A session to the ZooKeeper pods of examples/zookeeper.yaml, by their addresses.
async fn zookeeper_session(pods: &Api<Pod>) -> zk::Client {
    let mut nodes = Vec::new();
    for name in ["zk-0", "zk-1", "zk-2"] {
        let ip = pods
            .get(name)
            .await
            .ok()
            .and_then(|p| p.status)
            .and_then(|s| s.pod_ip)
            .unwrap_or_else(|| panic!("{name} has an address"));
        nodes.push(format!("{ip}:2181"));
    }
    rtable_protocol::tree::connect(
        &nodes.join(","),
        Duration::from_secs(10),
        Duration::from_secs(5),
    )
    .await
    .expect("a ZooKeeper session")
}

fn http() -> reqwest::Client {
    reqwest::Client::builder()
        .no_proxy()
        .connect_timeout(Duration::from_secs(2))
        .timeout(Duration::from_secs(20))
        .build()
        .expect("http client")
}

/// Inserts `count` inserts of `rows` rows through `url`, each acknowledged.
async fn insert_acked(
    checker: &Checker,
    url: &str,
    name: &str,
    count: usize,
    rows: u64,
    pad: usize,
) {
    let http = http();
    for _ in 0..count {
        let plan = checker.plan(&format!("to-{name}"), rows, pad, false);
        let attempt = checker
            .try_insert(&http, url, name, &plan, &plan.body(), None)
            .await;
        assert!(
            matches!(attempt, Attempt::Acked { .. }),
            "insert {} through {name}: {attempt:?}",
            plan.token
        );
    }
}

fn uid(pod: &Pod) -> String {
    pod.metadata.uid.clone().expect("a pod has a UID")
}

fn restarts(pod: &Pod) -> i32 {
    pod.status
        .as_ref()
        .and_then(|s| s.container_statuses.as_ref())
        .and_then(|c| c.first())
        .map_or(0, |c| c.restart_count)
}

/// The bytes of every file under `dir`.
fn bytes_under(dir: &std::path::Path) -> u64 {
    std::fs::read_dir(dir)
        .map(|entries| {
            entries
                .flatten()
                .map(|e| match e.file_type() {
                    Ok(t) if t.is_dir() => bytes_under(&e.path()),
                    _ => e.metadata().map_or(0, |m| m.len()),
                })
                .sum()
        })
        .unwrap_or(0)
}

/// `kubectl scale rt/events --replicas=5`, then `--replicas=2`, under inserts through
/// events-0 and events-1: the StatefulSet controller creates events-3 and events-4 and
/// removes events-2..4; each removed replica's `replicas/<name>` is dropped from
/// ZooKeeper, and only after its `is_active` went (a recursive watch on `replicas` sees
/// the deletions in order); every acknowledged row ends up on both survivors once.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn scaling_to_5_and_back_to_2_keeps_every_acknowledged_row() {
    let _serial = rtable_e2e::serial();
    let t = Table::create("lc-scale", 3, 1).await;
    let replicas_dir = t.paths.replicas();
    let mut watch =
        t.zk.watch(&replicas_dir, zk::AddWatchMode::PersistentRecursive)
            .await
            .expect("a recursive watch on replicas");
    let deletions: Arc<Mutex<Vec<String>>> = Arc::default();
    let watcher = tokio::spawn({
        let deletions = deletions.clone();
        async move {
            loop {
                let event = watch.changed().await;
                if event.event_type == zk::EventType::NodeDeleted {
                    deletions.lock().expect("lock").push(event.path);
                } else if event.event_type == zk::EventType::Session
                    && event.session_state != zk::SessionState::SyncConnected
                {
                    panic!(
                        "the watching session is {:?}: events may be lost",
                        event.session_state
                    );
                }
            }
        }
    });

    let (checker, driver) = t.load(&["events-0", "events-1"], "scale").await;

    run(
        &t.kubectl,
        &["scale", "rt/events", "--replicas=5", "-n", &t.ns],
        None,
    )
    .await;
    t.ready(5).await;
    for name in ["events-3", "events-4"] {
        let pod = t.pod(name).await;
        let owner = pod.metadata.owner_references.unwrap_or_default();
        assert!(
            owner
                .iter()
                .any(|o| o.kind == "StatefulSet" && o.name == "events"),
            "{name} is the StatefulSet's: {owner:?}"
        );
    }
    wait_more_acks(&checker, 5, Duration::from_secs(60))
        .await
        .expect("inserts acknowledged at 5 replicas");

    run(
        &t.kubectl,
        &["scale", "rt/events", "--replicas=2", "-n", &t.ns],
        None,
    )
    .await;
    let removed = ["events-2", "events-3", "events-4"];
    for name in removed {
        let root = t.paths.replica(name).root().to_string();
        eventually(&format!("{name} gone: pod and ZooKeeper"), 120, || async {
            let pod = t.pods.get_opt(name).await.ok()?;
            let node = t.zk.check_stat(&root).await.expect("stat");
            (pod.is_none() && node.is_none()).then_some(())
        })
        .await;
    }
    t.ready(2).await;
    wait_more_acks(&checker, 5, Duration::from_secs(60))
        .await
        .expect("inserts acknowledged at 2 replicas");
    driver.stop().await;
    t.verify(&checker, &["events-0", "events-1"]).await;

    watcher.abort();
    let deleted = deletions.lock().expect("lock").clone();
    for name in removed {
        let replica = t.paths.replica(name);
        let position = |path: &str| deleted.iter().rposition(|p| p == path);
        let inactive = position(&replica.is_active())
            .unwrap_or_else(|| panic!("{name}'s is_active was never deleted: {deleted:?}"));
        let first_drop = deleted
            .iter()
            .position(|p| p == &replica.host() || p == replica.root());
        let dropped = position(replica.root());
        assert!(
            first_drop.is_some_and(|d| d > inactive) && dropped.is_some(),
            "{name}: dropped (host at {:?}, node at {dropped:?}) only after is_active went (at {inactive})",
            first_drop
        );
    }
    t.delete().await;
}

/// events-1's sidecar killed with SIGKILL: rtable-node restarts the container in place
/// (same pod UID, restartCount + 1) and it catches up on the inserts made while it was
/// down. Then `kubectl delete pod events-1`: the StatefulSet controller makes a new pod
/// (new UID) of the same name on the same claim and volume, whose parts are still there
/// (it fetches only what it missed) and it catches up again.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_killed_sidecar_restarts_in_place_and_a_deleted_pod_returns_with_its_volume() {
    let _serial = rtable_e2e::serial();
    let t = Table::create("lc-restart", 3, 1).await;
    let checker = Checker::new();
    let (url0, url2) = (t.url("events-0").await, t.url("events-2").await);
    // Three partitions (the checker's months), one part each: large enough that fetching
    // them again would show. Fewer than 5 parts per partition: no merges.
    insert_acked(&checker, &url0, "events-0", 3, 200, 2000).await;

    let before = t.pod("events-1").await;
    let pids = pod_faults::pids(&uid(&before))
        .await
        .unwrap_or_else(|e| panic!("{e}"));
    assert!(!pids.is_empty(), "events-1 runs a process");
    for pid in &pids {
        nix::sys::signal::kill(
            nix::unistd::Pid::from_raw(*pid),
            nix::sys::signal::Signal::SIGKILL,
        )
        .expect("kill -9 the sidecar");
    }
    insert_acked(&checker, &url2, "events-2", 3, 5, 16).await;
    let restarted = t.ready_pod("events-1", restarts(&before) + 1, None).await;
    assert_eq!(
        uid(&restarted),
        uid(&before),
        "restarted in place, same pod"
    );
    t.verify(&checker, &["events-0", "events-1", "events-2"])
        .await;

    let (pv, volume) = t.volume_dir("events-1").await;
    let held_parts = t
        .client("events-1")
        .await
        .status()
        .await
        .expect("status")
        .parts;
    let held_bytes = bytes_under(&volume.join("parts"));
    run(
        &t.kubectl,
        &["delete", "pod", "events-1", "-n", &t.ns, "--wait=false"],
        None,
    )
    .await;
    let missed: u32 = 3;
    insert_acked(&checker, &url0, "events-0", missed as usize, 5, 16).await;
    let replaced = t.ready_pod("events-1", 0, Some(&uid(&restarted))).await;
    assert_ne!(uid(&replaced), uid(&before));
    assert_eq!(t.volume_dir("events-1").await.0, pv, "the same volume");
    t.verify(&checker, &["events-0", "events-1", "events-2"])
        .await;
    let events_1 = t.client("events-1").await;
    let parts: BTreeSet<String> = events_1
        .status()
        .await
        .expect("status")
        .parts
        .into_iter()
        .collect();
    assert!(
        held_parts.iter().all(|p| parts.contains(p)),
        "the parts it held ({held_parts:?}) are still its parts: {parts:?}"
    );
    let fetches = events_1
        .metric("rtable_fetches_total")
        .await
        .expect("metrics");
    let fetched = events_1
        .metric("rtable_fetched_bytes_total")
        .await
        .expect("metrics");
    assert!(
        fetches.is_some_and(|f| f <= f64::from(missed)),
        "the new pod fetched only what it missed ({missed} inserts): {fetches:?} fetches"
    );
    assert!(
        fetched.is_some_and(|b| b < held_bytes as f64),
        "fetched {fetched:?} bytes; its volume held {held_bytes}"
    );
    t.delete().await;
}

/// Whether the eviction of `name` went through (`Ok`) or the API server refused it with
/// the PDB's 429 (`Err` with its message); anything else fails the test. `pods` must come
/// from a client without kube's retries of 429 answers, which would retry a refused
/// eviction until the budget allows it.
async fn evict(pods: &Api<Pod>, name: &str) -> Result<(), String> {
    match pods.evict(name, &EvictParams::default()).await {
        Ok(_) => Ok(()),
        Err(kube::Error::Api(status)) if status.code == 429 => Err(status.message),
        Err(e) => panic!("evicting {name}: {e}"),
    }
}

/// The PDB's rule, `maxUnavailable = max(1, replicas - quorum)` (docs/operator.md), seen
/// through the policy/v1 Eviction subresource: with 3 replicas and insert quorum 1 two
/// may go and a third is refused (429); with quorum 3 (every replica) one still may go and
/// a second is refused. The disruption controller computes the budget.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn evictions_follow_the_disruption_budget() {
    let _serial = rtable_e2e::serial();
    let t = Table::create("lc-evict", 3, 1).await;
    let pdbs: Api<PodDisruptionBudget> = Api::namespaced(t.pods.clone().into_client(), &t.ns);
    let node = SharedNode::get(std::path::Path::new(env!("CARGO_BIN_EXE_rtable-node")));
    let mut config = rtable_e2e::kube::control_plane::config_for(&node.kubeconfig)
        .await
        .unwrap_or_else(|e| panic!("{e:#}"));
    config.default_retry = false;
    let no_retries: Api<Pod> =
        Api::namespaced(kube::Client::try_from(config).expect("a client"), &t.ns);
    for (quorum, allowed) in [(1u32, 2i32), (3, 1)] {
        let patch = format!(r#"{{"spec":{{"insertQuorum":{quorum}}}}}"#);
        run(
            &t.kubectl,
            &[
                "patch",
                "rt/events",
                "-n",
                &t.ns,
                "--type=merge",
                "-p",
                &patch,
            ],
            None,
        )
        .await;
        t.ready(3).await;
        eventually(
            &format!("the PDB allowing {allowed} disruptions"),
            60,
            || async {
                let pdb = pdbs.get("events").await.ok()?;
                let spec = pdb.spec?;
                let status = pdb.status?;
                let max = match spec.max_unavailable? {
                    k8s_openapi::apimachinery::pkg::util::intstr::IntOrString::Int(n) => n,
                    other => panic!("maxUnavailable {other:?}"),
                };
                (max == allowed
                    && status.observed_generation == pdb.metadata.generation
                    && status.current_healthy == 3
                    && status.disruptions_allowed == allowed)
                    .then_some(())
            },
        )
        .await;
        let names = ["events-0", "events-1", "events-2"];
        let mut uids = Vec::new();
        for name in names {
            uids.push(uid(&t.pod(name).await));
        }
        for name in &names[..allowed as usize] {
            evict(&no_retries, name)
                .await
                .unwrap_or_else(|e| panic!("quorum {quorum}: evicting {name} refused: {e}"));
        }
        let refused = names[allowed as usize];
        let message = evict(&no_retries, refused).await.expect_err(&format!(
            "quorum {quorum}: one eviction more than the budget is refused"
        ));
        assert!(
            message.contains("disruption budget"),
            "quorum {quorum}: {refused}: {message}"
        );
        for (name, old) in names.iter().zip(&uids).take(allowed as usize) {
            t.ready_pod(name, 0, Some(old)).await;
        }
        assert_eq!(
            uid(&t.pod(refused).await),
            uids[allowed as usize],
            "{refused} stayed"
        );
    }
    t.delete().await;
}

/// events-1's link set down for three ZooKeeper session timeouts under inserts through
/// events-0 and events-2: from inside its namespace its sidecar reports read-only, the
/// table's Degraded condition and replica statuses name it; once the link is up it
/// re-activates and catches up, and no acknowledged row is lost or duplicated.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_pod_cut_off_from_the_network_turns_read_only_and_catches_up() {
    let _serial = rtable_e2e::serial();
    let t = Table::create("lc-netcut", 3, 1).await;
    let (checker, driver) = t.load(&["events-0", "events-2"], "cut").await;
    let pod_uid = uid(&t.pod("events-1").await);
    pod_faults::set_link(&pod_uid, false)
        .await
        .unwrap_or_else(|e| panic!("{e}"));
    let cut = std::time::Instant::now();

    let reason = eventually("events-1 read-only (from inside its pod)", 30, || async {
        let uid = pod_uid.clone();
        let (code, body) =
            tokio::task::spawn_blocking(move || pod_faults::http_get_inside(&uid, PORT, "/status"))
                .await
                .expect("join")
                .unwrap_or_else(|e| panic!("{e}"));
        assert_eq!(code, 200, "{body}");
        let status: Value = serde_json::from_str(&body).expect("/status is JSON");
        (status["is_readonly"] == true).then(|| status["readonly_reason"].to_string())
    })
    .await;
    let read_only_after = cut.elapsed();
    let degraded = eventually("Degraded naming events-1", 30, || async {
        let rt = t.rt().await;
        let conditions = rt["status"]["conditions"].as_array()?.clone();
        let degraded = conditions
            .iter()
            .find(|c| c["type"] == "Degraded" && c["status"] == "True")?;
        let message = degraded["message"].as_str()?.to_string();
        let inactive = rt["status"]["replicaStatuses"]
            .as_array()?
            .iter()
            .any(|r| r["name"] == "events-1" && r["active"] == false);
        (message.contains("events-1") && inactive)
            .then(|| format!("{}: {message}", degraded["reason"]))
    })
    .await;
    let degraded_after = cut.elapsed();
    // The cut outlasts three session timeouts, so the replica's session is gone for sure.
    tokio::time::sleep(Duration::from_secs(12).saturating_sub(cut.elapsed())).await;
    wait_more_acks(&checker, 5, Duration::from_secs(60))
        .await
        .expect("inserts acknowledged through the other replicas during the cut");
    eprintln!(
        "cut off: read-only after {:.1}s ({reason}); table {degraded} after {:.1}s",
        read_only_after.as_secs_f64(),
        degraded_after.as_secs_f64()
    );
    pod_faults::set_link(&pod_uid, true)
        .await
        .unwrap_or_else(|e| panic!("{e}"));
    let up = std::time::Instant::now();
    t.ready(3).await;
    eprintln!(
        "the table Ready again {:.1}s after the link came up",
        up.elapsed().as_secs_f64()
    );
    driver.stop().await;
    t.verify(&checker, &["events-0", "events-1", "events-2"])
        .await;
    t.delete().await;
}
