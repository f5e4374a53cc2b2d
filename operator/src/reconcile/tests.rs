//! Scripted mock-API-server scenarios (see [`crate::mock`]): `reconcile()` runs against an
//! exact sequence of requests, each asserted on method, path, content type and body.

use std::sync::Mutex;

use futures::future::BoxFuture;
use k8s_openapi::api::core::v1::Secret;
use rtable_protocol::schema::TableSchema;
use rtable_protocol::tree::ReplicaState;
use serde_json::{Value, json};
use zookeeper_client as zk;

use super::*;
use crate::build::fixtures;
use crate::mock::{self, Step, exactly, json_patch_step, ssa_step, step, to_json};
use crate::status::SidecarStatus;

const NS: &str = "/namespaces/analytics";
fn rt_path() -> String {
    format!("/apis/rtable.io/v1alpha1{NS}/replicatedtables/events")
}

/// The fake ZooKeeper: replica states the test controls, and a log of the calls made.
#[derive(Default)]
struct FakeBackend {
    down: Mutex<bool>,
    mismatch: Mutex<bool>,
    replicas: Mutex<Vec<ReplicaState>>,
    /// `/status` answers by replica name; the others answer a healthy default.
    sidecars: Mutex<Vec<(String, SidecarStatus)>>,
    calls: Mutex<Vec<String>>,
    /// Fully qualified names that exist in DNS; every other name does not.
    resolvable: Mutex<Vec<String>>,
    /// The connect string of every tree call (`ensure`, `remove`), in order.
    targets: Mutex<Vec<String>>,
    /// When set, `remove_table` fails with this ZooKeeper error (not a connection error).
    remove_refused: Mutex<Option<zk::Error>>,
    /// `replicas/<name>/parts` by replica name; an absent name has none.
    parts: Mutex<Vec<(String, Vec<String>)>>,
}

fn transient() -> TreeError {
    TreeError::zk("connect", "zk-0.zk:2181", zk::Error::ConnectionLoss)
}

impl FakeBackend {
    fn with_replicas(n: u32) -> Self {
        let b = FakeBackend::default();
        *b.replicas.lock().expect("lock") = (0..n)
            .map(|i| ReplicaState {
                name: format!("events-{i}"),
                is_active: true,
                log_pointer: Some(5),
                parts_count: 2,
                ..ReplicaState::default()
            })
            .collect();
        b
    }
    fn log(&self, s: String) {
        self.calls.lock().expect("lock").push(s);
    }
    fn calls(&self) -> Vec<String> {
        self.calls.lock().expect("lock").clone()
    }
    fn is_down(&self) -> bool {
        *self.down.lock().expect("lock")
    }
    fn target(&self, t: &ZkTarget) {
        self.targets.lock().expect("lock").push(t.connect.clone());
    }
    fn targets(&self) -> Vec<String> {
        self.targets.lock().expect("lock").clone()
    }
}

impl Backend for FakeBackend {
    fn ensure_table<'a>(
        &'a self,
        target: &'a ZkTarget,
        path: &'a str,
        _: &'a TableSchema,
    ) -> BoxFuture<'a, Result<(), TreeError>> {
        Box::pin(async move {
            self.log(format!("ensure {path}"));
            self.target(target);
            if self.is_down() {
                return Err(transient());
            }
            if *self.mismatch.lock().expect("lock") {
                return Err(TreeError::SchemaMismatch {
                    path: path.to_string(),
                    diff: "columns differ".into(),
                    local: String::new(),
                    tree: String::new(),
                });
            }
            Ok(())
        })
    }
    fn replicas<'a>(
        &'a self,
        _: &'a ZkTarget,
        _: &'a str,
    ) -> BoxFuture<'a, Result<Vec<ReplicaState>, TreeError>> {
        Box::pin(async move { Ok(self.replicas.lock().expect("lock").clone()) })
    }
    fn parts<'a>(
        &'a self,
        _: &'a ZkTarget,
        _: &'a str,
        replica: &'a str,
    ) -> BoxFuture<'a, Result<Vec<String>, TreeError>> {
        Box::pin(async move {
            self.log(format!("parts {replica}"));
            if self.is_down() {
                return Err(transient());
            }
            Ok(self
                .parts
                .lock()
                .expect("lock")
                .iter()
                .find(|(name, _)| name == replica)
                .map(|(_, parts)| parts.clone())
                .unwrap_or_default())
        })
    }
    fn drop_replica<'a>(
        &'a self,
        _: &'a ZkTarget,
        _: &'a str,
        replica: &'a str,
    ) -> BoxFuture<'a, Result<DropOutcome, TreeError>> {
        Box::pin(async move {
            self.log(format!("drop {replica}"));
            let mut replicas = self.replicas.lock().expect("lock");
            match replicas.iter().position(|r| r.name == replica) {
                Some(i) if replicas[i].is_active => Err(TreeError::ReplicaActive {
                    replica: replica.to_string(),
                    owner: 0x1234,
                }),
                Some(i) => {
                    replicas.remove(i);
                    Ok(DropOutcome::Dropped)
                }
                None => Ok(DropOutcome::AlreadyGone),
            }
        })
    }
    fn remove_table<'a>(
        &'a self,
        target: &'a ZkTarget,
        path: &'a str,
    ) -> BoxFuture<'a, Result<(), TreeError>> {
        Box::pin(async move {
            self.log(format!("remove {path}"));
            self.target(target);
            if self.is_down() {
                return Err(transient());
            }
            match self.remove_refused.lock().expect("lock").clone() {
                Some(e) => Err(TreeError::zk("delete", path, e)),
                None => Ok(()),
            }
        })
    }
    fn resolves<'a>(&'a self, host: &'a str, port: u16) -> BoxFuture<'a, bool> {
        Box::pin(async move {
            assert_eq!(port, 2181, "{host}");
            self.resolvable
                .lock()
                .expect("lock")
                .iter()
                .any(|h| h == host)
        })
    }
    fn sidecar_status<'a>(&'a self, url: &'a str) -> BoxFuture<'a, Option<SidecarStatus>> {
        Box::pin(async move {
            self.log(format!("status {url}"));
            let host = url.trim_start_matches("http://");
            if let Some((_, s)) = self
                .sidecars
                .lock()
                .expect("lock")
                .iter()
                .find(|(name, _)| host.starts_with(&format!("{name}.")))
            {
                return Some(s.clone());
            }
            Some(SidecarStatus {
                absolute_delay: 0,
                parts_count: 2,
                ..SidecarStatus::default()
            })
        })
    }
}

/// Runs one reconcile against the scripted API server and returns its result.
async fn run(
    rt: ReplicatedTable,
    backend: Arc<FakeBackend>,
    steps: Vec<Step>,
) -> Result<Action, Error> {
    let (client, verifier) = mock::server(steps);
    let ctx = Arc::new(Context {
        client,
        backend,
        build: BuildConfig::default(),
        metrics: Metrics::default(),
        reporter: Reporter {
            controller: "rtable-operator".into(),
            instance: None,
        },
        zookeeper_grace: Duration::from_secs(600),
        resync: Duration::from_secs(60),
        failures: Default::default(),
    });
    let result = tokio::time::timeout(Duration::from_secs(10), reconcile(Arc::new(rt), ctx))
        .await
        .expect("reconcile finished in time");
    // Dropping the context drops the client, which closes the mock, so the verifier's
    // check for extra requests ends.
    mock::finish(verifier).await;
    result
}

fn table() -> ReplicatedTable {
    let mut rt = fixtures::table("table.yaml");
    rt.metadata.finalizers = Some(vec![FINALIZER.to_string()]);
    rt
}

fn sts_with_status(replicas: i32) -> impl Fn(&Value) -> (u16, Value) + Send {
    move |body| {
        let mut sts = body.clone();
        sts["status"] = json!({"replicas": replicas, "readyReplicas": replicas, "updatedReplicas": replicas, "availableReplicas": replicas});
        (200, sts)
    }
}

/// The apply steps every reconcile of a valid table makes, in order. Every body must be
/// exactly what the builders make of `rt`; `sts_check` adds the scenario's own assertions.
/// The StatefulSet exists with `rt`'s replica count.
fn apply_steps(
    rt: &ReplicatedTable,
    secret_exists: bool,
    sts_replicas: i32,
    sts_check: impl Fn(&Value) + Send + 'static,
) -> Vec<Step> {
    let n = rt.spec.replicas;
    apply_steps_scaling(rt, secret_exists, Some(n), n, sts_replicas, sts_check)
}

/// [`apply_steps`] with the StatefulSet's count before (`current`, `None`: not created yet)
/// and as applied (`applied`: the builder's object with that count).
fn apply_steps_scaling(
    rt: &ReplicatedTable,
    secret_exists: bool,
    current: Option<i32>,
    applied: i32,
    sts_replicas: i32,
    sts_check: impl Fn(&Value) + Send + 'static,
) -> Vec<Step> {
    let manifest = crate::validate::manifest(rt).expect("valid manifest");
    let config_map = to_json(&build::config_map(rt, &manifest).expect("renders"));
    let headless = to_json(&build::headless_service(rt));
    let client = to_json(&build::client_service(rt));
    let mut built = build::stateful_set(rt, &BuildConfig::default());
    let before = current.map(|n| {
        let mut b = to_json(&built);
        b["spec"]["replicas"] = json!(n);
        b
    });
    built.spec.as_mut().expect("spec").replicas = Some(applied);
    let sts = to_json(&built);
    let pdb = to_json(&build::pod_disruption_budget(rt));
    let owner = rt.clone();
    let get_sts = step("GET", &format!("/apis/apps/v1{NS}/statefulsets/events"));
    let mut steps = vec![match before {
        Some(b) => get_sts.respond(move |_| (200, b.clone())),
        None => get_sts.not_found(),
    }];
    if secret_exists {
        steps.push(
            step("GET", &format!("/api/v1{NS}/secrets/events-interserver"))
                .respond(|_| (200, json!({"apiVersion": "v1", "kind": "Secret", "metadata": {"name": "events-interserver"}}))),
        );
    } else {
        steps.push(step("GET", &format!("/api/v1{NS}/secrets/events-interserver")).not_found());
        steps.push(
            step("POST", &format!("/api/v1{NS}/secrets")).check(move |b| {
                // The value is random: read it back, then the rest must be the builder's Secret.
                let sent: Secret = serde_json::from_value(b.clone()).expect("a Secret");
                let value = sent
                    .data
                    .as_ref()
                    .and_then(|d| d.get(build::INTERSERVER_KEY))
                    .map(|v| String::from_utf8(v.0.clone()).expect("UTF-8"))
                    .expect("secret value");
                assert_eq!(value.len(), 64, "32 random bytes as hex: {value}");
                assert!(value.chars().all(|c| c.is_ascii_hexdigit()), "{value}");
                exactly(to_json(&build::interserver_secret(&owner, &value)))(b);
            }),
        );
    }
    steps
        .push(ssa_step(&format!("/api/v1{NS}/configmaps/events-table")).check(exactly(config_map)));
    steps.push(
        ssa_step(&format!("/api/v1{NS}/services/events-replicas")).check(move |b| {
            assert_eq!(b["spec"]["clusterIP"], "None");
            exactly(headless.clone())(b);
        }),
    );
    steps.push(
        ssa_step(&format!("/api/v1{NS}/services/events")).check(move |b| {
            assert_eq!(b["spec"]["type"], "ClusterIP");
            exactly(client.clone())(b);
        }),
    );
    steps.push(
        ssa_step(&format!("/apis/apps/v1{NS}/statefulsets/events"))
            .check(move |b| {
                sts_check(b);
                exactly(sts.clone())(b);
            })
            .respond(sts_with_status(sts_replicas)),
    );
    steps.push(
        ssa_step(&format!("/apis/policy/v1{NS}/poddisruptionbudgets/events")).check(exactly(pdb)),
    );
    steps
}

fn status_step(check: impl Fn(&Value) + Send + 'static) -> Step {
    ssa_step(&format!("{}/status", rt_path()))
        .check(move |b| {
            assert_eq!(b["apiVersion"], "rtable.io/v1alpha1");
            assert_eq!(b["kind"], "ReplicatedTable");
            let keys: Vec<&String> = b.as_object().expect("object").keys().collect();
            assert_eq!(
                keys,
                ["apiVersion", "kind", "status"],
                "only the status is applied"
            );
            check(&b["status"])
        })
        .respond(|_| (200, serde_json::to_value(table()).expect("json")))
}

fn event_step(reason: &'static str, type_: &'static str) -> Step {
    step("POST", &format!("/apis/events.k8s.io/v1{NS}/events")).check(move |b| {
        assert_eq!(
            (b["reason"].as_str(), b["type"].as_str()),
            (Some(reason), Some(type_)),
            "{b}"
        );
        assert_eq!(b["regarding"]["name"], "events");
    })
}

fn condition<'a>(status: &'a Value, type_: &str) -> &'a Value {
    status["conditions"]
        .as_array()
        .and_then(|c| c.iter().find(|c| c["type"] == type_))
        .unwrap_or_else(|| panic!("no {type_} condition in {status}"))
}

fn pods_step(names: &'static [&'static str]) -> Step {
    let mut s = step("GET", &format!("/api/v1{NS}/pods"));
    s.query = vec![
        "labelSelector=app.kubernetes.io%2Finstance%3Devents%2Capp.kubernetes.io%2Fname%3Drtable",
    ];
    s.respond(move |_| {
        let items: Vec<Value> = names.iter().map(|n| json!({"metadata": {"name": n}})).collect();
        (200, json!({"apiVersion": "meta.k8s.io/v1", "kind": "PartialObjectMetadataList", "metadata": {}, "items": items}))
    })
}

#[tokio::test]
async fn first_create_adds_the_finalizer_then_builds_everything() {
    let backend = Arc::new(FakeBackend::with_replicas(3));
    // The pods' short names exist in the table's namespace (zk-2's pod is being rescheduled).
    *backend.resolvable.lock().expect("lock") = vec![
        "zk-0.zk.analytics.svc.cluster.local".into(),
        "zk-1.zk.analytics.svc.cluster.local".into(),
    ];
    let fresh = fixtures::table("table.yaml");
    let action = run(
        fresh,
        backend.clone(),
        vec![
            json_patch_step(&rt_path())
                .check(exactly(json!([
                    {"op": "test", "path": "/metadata/finalizers", "value": null},
                    {"op": "add", "path": "/metadata/finalizers", "value": [FINALIZER]}
                ])))
                .respond(|_| (200, serde_json::to_value(table()).expect("json"))),
        ],
    )
    .await
    .expect("ok");
    assert_eq!(action, Action::await_change());
    assert!(
        backend.calls().is_empty(),
        "nothing touches ZooKeeper before the finalizer is in place"
    );

    let mut steps = apply_steps_scaling(&table(), false, None, 3, 3, |b| {
        assert_eq!(b["spec"]["replicas"], 3);
        assert_eq!(
            b["metadata"]["ownerReferences"][0]["kind"],
            "ReplicatedTable"
        );
    });
    steps.push(status_step(|s| {
        assert_eq!(condition(s, "Ready")["status"], "True");
        assert_eq!(condition(s, "Ready")["observedGeneration"], 1);
        assert_eq!(s["activeReplicas"], 3);
        assert_eq!(s["tablePath"], "/clickhouse/tables/01/analytics.events");
        assert_eq!(
            s["selector"],
            "app.kubernetes.io/instance=events,app.kubernetes.io/name=rtable"
        );
    }));
    for (reason, type_) in [
        ("AllReplicasReady", "Normal"),
        ("QuorumActive", "Normal"),
        ("Stable", "Normal"),
        ("AsExpected", "Normal"),
    ] {
        steps.push(event_step(reason, type_));
    }
    let action = run(table(), backend.clone(), steps).await.expect("ok");
    assert_eq!(action, Action::requeue(Duration::from_secs(60)));
    let calls = backend.calls();
    assert_eq!(calls[0], "ensure /clickhouse/tables/01/analytics.events");
    assert_eq!(
        calls[1],
        "status http://events-0.events-replicas.analytics.svc.cluster.local:9009/status"
    );
    // The operator runs in its own namespace: the manifest's `zk-0.zk:2181` is resolved
    // relative to the table's namespace `analytics`, as the pods resolve it.
    assert_eq!(
        backend.targets(),
        [
            "zk-0.zk.analytics.svc.cluster.local:2181,zk-1.zk.analytics.svc.cluster.local:2181,zk-2.zk:2181"
        ]
    );
}

/// `<service>.<namespace>` names and qualified names reach ZooKeeper as written, the chroot
/// follows the nodes.
#[tokio::test]
async fn zookeeper_names_of_another_namespace_are_kept() {
    let backend = Arc::new(FakeBackend::with_replicas(3));
    let mut rt = settled(backend.clone()).await;
    rt.spec.zookeeper.nodes = vec![
        "zk.infra:2181".into(),
        "zk-1.zk.infra.svc:2181".into(),
        "10.1.2.3:2181".into(),
    ];
    rt.spec.zookeeper.root = Some("/rtable".into());
    let mut steps = apply_steps(&rt, true, 3, |_| {});
    steps.push(status_step(|s| {
        assert_eq!(condition(s, "Ready")["status"], "True")
    }));
    run(rt, backend.clone(), steps).await.expect("ok");
    assert_eq!(
        backend.targets(),
        ["zk.infra:2181,zk-1.zk.infra.svc:2181,10.1.2.3:2181/rtable"]
    );
}

/// Previous status as the first reconcile left it, so the next one has no transitions.
async fn settled(backend: Arc<FakeBackend>) -> ReplicatedTable {
    let mut rt = table();
    let obs = Observation {
        generation: Some(1),
        desired_replicas: 3,
        quorum: 2,
        selector: String::new(),
        table_path: None,
        pods: PodsObservation {
            replicas: 3,
            ready: 3,
            updated: 3,
            pending_rollout: false,
        },
        tree: TreeObservation::Healthy(
            backend
                .replicas
                .lock()
                .expect("lock")
                .iter()
                .map(|r| ReplicaObservation {
                    name: r.name.clone(),
                    desired: true,
                    active: true,
                    ..ReplicaObservation::default()
                })
                .collect(),
        ),
        pending_drops: vec![],
        scale_down_hold: None,
        apply_failures: vec![],
    };
    rt.status = Some(status::compute(&obs, &[], &Time(Timestamp::now())));
    rt
}

/// The status update: replica state from ZooKeeper and the sidecars' `/status` lands in
/// `replicaStatuses`, the counters and the conditions, and each transition is an Event.
#[tokio::test]
async fn status_update_reports_every_replica_and_publishes_transitions() {
    let backend = Arc::new(FakeBackend::with_replicas(3));
    let rt = settled(backend.clone()).await;
    {
        let mut replicas = backend.replicas.lock().expect("lock");
        replicas[2].is_active = false;
        replicas[2].queue_size = 3;
        replicas[1].log_pointer = Some(4);
    }
    backend.sidecars.lock().expect("lock").push((
        "events-1".into(),
        SidecarStatus {
            queue_size: 7,
            inserts_in_queue: 2,
            absolute_delay: 900,
            parts_count: 5,
            ..SidecarStatus::default()
        },
    ));
    let mut steps = apply_steps(&rt, true, 3, |_| {});
    steps.push(status_step(|s| {
        assert_eq!(
            s["replicaStatuses"],
            json!([
                {"name": "events-0", "active": true, "lost": false, "logPointer": 5, "queueSize": 0,
                 "insertsInQueue": 0, "absoluteDelaySeconds": 0, "parts": 2},
                {"name": "events-1", "active": true, "lost": false, "logPointer": 4, "queueSize": 7,
                 "insertsInQueue": 2, "absoluteDelaySeconds": 900, "parts": 5},
                {"name": "events-2", "active": false, "lost": false, "logPointer": 5, "queueSize": 3,
                 "insertsInQueue": 0, "parts": 2}
            ])
        );
        assert_eq!(
            (
                &s["replicas"],
                &s["readyReplicas"],
                &s["activeReplicas"],
                &s["quorum"],
                &s["maxDelaySeconds"],
                &s["observedGeneration"]
            ),
            (&json!(3), &json!(3), &json!(2), &json!(2), &json!(900), &json!(1))
        );
        for (type_, status, reason) in [
            ("Ready", "False", "ReplicaInactive"),
            ("Available", "True", "QuorumActive"),
            ("Progressing", "False", "Stable"),
            ("Degraded", "True", "ReplicaInactive"),
        ] {
            let c = condition(s, type_);
            assert_eq!((&c["status"], &c["reason"]), (&json!(status), &json!(reason)), "{c}");
            assert_eq!(c["observedGeneration"], 1, "{c}");
            assert!(c["lastTransitionTime"].is_string(), "{c}");
        }
        assert!(
            condition(s, "Ready")["message"]
                .as_str()
                .unwrap_or_default()
                .contains("events-2")
        );
    }));
    // Only the two conditions that changed become Events, as Warnings naming the replica.
    for _ in 0..2 {
        steps.push(event_step("ReplicaInactive", "Warning").check(|b| {
            assert_eq!(b["reason"], "ReplicaInactive");
            assert_eq!(b["type"], "Warning");
            assert_eq!(b["action"], "Reconcile");
            assert_eq!(b["regarding"]["kind"], "ReplicatedTable");
            assert_eq!(b["reportingController"], "rtable-operator");
            let note = b["note"].as_str().unwrap_or_default();
            assert!(note.contains("events-2"), "{note}");
        }));
    }
    let action = run(rt, backend.clone(), steps).await.expect("ok");
    assert_eq!(
        action,
        Action::requeue(Duration::from_secs(10)),
        "a table that is not Ready is looked at again soon"
    );
    let statuses: Vec<_> = backend
        .calls()
        .into_iter()
        .filter(|c| c.starts_with("status"))
        .collect();
    assert_eq!(
        statuses.len(),
        2,
        "only active replicas are asked for /status: {statuses:?}"
    );
}

#[tokio::test]
async fn spec_change_reapplies_without_regenerating_the_secret() {
    let backend = Arc::new(FakeBackend::with_replicas(3));
    let mut rt = settled(backend.clone()).await;
    rt.metadata.generation = Some(2);
    rt.spec.image = Some("rtable-sidecar:dev".into());
    let mut steps = apply_steps(&rt, true, 3, |b| {
        assert_eq!(
            b["spec"]["template"]["spec"]["containers"][0]["image"],
            "rtable-sidecar:dev"
        );
    });
    steps.push(status_step(|s| {
        assert_eq!(s["observedGeneration"], 2);
        assert_eq!(condition(s, "Ready")["observedGeneration"], 2);
    }));
    run(rt, backend, steps).await.expect("ok");
}

#[tokio::test]
async fn scale_down_drops_a_replica_only_after_its_session_is_gone() {
    let backend = Arc::new(FakeBackend::with_replicas(3));
    let mut rt = settled(backend.clone()).await;
    rt.spec.replicas = 2;

    // Round 1: events-2 has no part (none registered), so the StatefulSet goes to 2 at once.
    // The pod is gone but its session still holds is_active: refused, retried.
    let mut steps = apply_steps_scaling(&rt, true, Some(3), 2, 2, |b| {
        assert_eq!(b["spec"]["replicas"], 2)
    });
    steps.push(pods_step(&["events-0", "events-1"]));
    steps.push(status_step(|s| {
        assert_eq!(condition(s, "Progressing")["reason"], "ScalingDown");
        assert!(
            condition(s, "Progressing")["message"]
                .as_str()
                .unwrap_or_default()
                .contains("events-2")
        );
    }));
    steps.push(event_step("ScalingDown", "Warning"));
    steps.push(event_step("ScalingDown", "Normal"));
    let action = run(rt.clone(), backend.clone(), steps).await.expect("ok");
    assert_eq!(
        action,
        Action::requeue(Duration::from_secs(10)),
        "a pending drop is retried soon"
    );
    assert!(backend.calls().contains(&"drop events-2".to_string()));
    assert_eq!(
        backend.replicas.lock().expect("lock").len(),
        3,
        "an active replica is never dropped"
    );

    // Round 2: still a pod for it (terminating): not even attempted.
    let before = backend
        .calls()
        .iter()
        .filter(|c| c.starts_with("drop"))
        .count();
    let mut steps = apply_steps(&rt, true, 2, |_| {});
    steps.push(pods_step(&["events-0", "events-1", "events-2"]));
    steps.push(status_step(|s| {
        assert_eq!(condition(s, "Progressing")["reason"], "ScalingDown")
    }));
    steps.push(event_step("ScalingDown", "Warning"));
    steps.push(event_step("ScalingDown", "Normal"));
    run(rt.clone(), backend.clone(), steps).await.expect("ok");
    assert_eq!(
        backend
            .calls()
            .iter()
            .filter(|c| c.starts_with("drop"))
            .count(),
        before
    );

    // Round 3: the session expired: dropped, with an Event.
    backend.replicas.lock().expect("lock")[2].is_active = false;
    let mut steps = apply_steps(&rt, true, 2, |_| {});
    steps.push(pods_step(&["events-0", "events-1"]));
    steps.push(event_step("ReplicaDropped", "Normal"));
    steps.push(status_step(|s| {
        assert_eq!(condition(s, "Ready")["status"], "True");
        assert_eq!(s["replicaStatuses"].as_array().map(Vec::len), Some(2));
    }));
    // `rt` still carries the settled (Ready) status, so no condition transitions here.
    run(rt, backend.clone(), steps).await.expect("ok");
    let names: Vec<_> = backend
        .replicas
        .lock()
        .expect("lock")
        .iter()
        .map(|r| r.name.clone())
        .collect();
    assert_eq!(names, ["events-0", "events-1"]);
}

/// `kubectl scale --replicas=2` of a 3-replica table whose events-2 holds a part no
/// survivor has: the StatefulSet stays at 3 (its volume would go with the pod) and the
/// status says why, until a survivor holds a covering part; events-2 is never dropped
/// meanwhile. With ZooKeeper down the parts cannot be checked, and nothing is removed.
#[tokio::test]
async fn scale_down_waits_until_the_removed_replicas_parts_are_on_a_survivor() {
    let backend = Arc::new(FakeBackend::with_replicas(3));
    let parts = |names: &[&str]| names.iter().map(|p| p.to_string()).collect::<Vec<_>>();
    *backend.parts.lock().expect("lock") = vec![
        ("events-0".into(), parts(&["all_1_1_0"])),
        ("events-1".into(), parts(&["all_1_1_0"])),
        ("events-2".into(), parts(&["all_1_1_0", "all_2_2_0"])),
    ];
    backend.replicas.lock().expect("lock")[2].is_active = false;
    let mut rt = settled(backend.clone()).await;
    rt.spec.replicas = 2;

    // Held: applied with 3; events-2 is neither listed for a drop nor dropped.
    let mut steps = apply_steps_scaling(&rt, true, Some(3), 3, 3, |b| {
        assert_eq!(b["spec"]["replicas"], 3, "the StatefulSet keeps events-2")
    });
    steps.push(status_step(|s| {
        let p = condition(s, "Progressing");
        assert_eq!(
            (&p["status"], &p["reason"]),
            (&json!("True"), &json!("ScalingDown"))
        );
        assert_eq!(
            p["message"],
            "keeping events-2 (3 pods, 2 desired): 1 of its 2 parts are not on a surviving \
             replica yet (all_2_2_0); it is removed once they are fetched"
        );
        assert_eq!(condition(s, "Ready")["reason"], "ScalingDown");
    }));
    steps.push(event_step("ScalingDown", "Warning"));
    steps.push(event_step("ScalingDown", "Normal"));
    let action = run(rt.clone(), backend.clone(), steps).await.expect("ok");
    assert_eq!(action, Action::requeue(Duration::from_secs(10)));
    let calls = backend.calls();
    for replica in ["events-0", "events-1", "events-2"] {
        assert!(calls.contains(&format!("parts {replica}")), "{calls:?}");
    }
    assert!(!calls.iter().any(|c| c.starts_with("drop")), "{calls:?}");

    // ZooKeeper down: the parts cannot be read, so nothing is removed either.
    *backend.down.lock().expect("lock") = true;
    let mut steps = apply_steps_scaling(&rt, true, Some(3), 3, 3, |b| {
        assert_eq!(b["spec"]["replicas"], 3)
    });
    steps.push(status_step(|s| {
        let message = condition(s, "Progressing")["message"]
            .as_str()
            .unwrap_or_default();
        assert!(
            message
                .starts_with("keeping 3 pods (2 desired) until the replicas' parts can be read: "),
            "{message}"
        );
    }));
    steps.push(event_step("ZooKeeperUnavailable", "Warning"));
    steps.push(event_step("ZooKeeperUnavailable", "Warning"));
    steps.push(event_step("ScalingDown", "Normal"));
    steps.push(event_step("ZooKeeperUnavailable", "Warning"));
    run(rt.clone(), backend.clone(), steps).await.expect("ok");
    *backend.down.lock().expect("lock") = false;

    // events-0 merged both parts: all_1_2_1 covers all_2_2_0, so events-2 may go; its
    // pod is still terminating, so it waits for the drop as any removed replica does.
    backend.parts.lock().expect("lock")[0].1 = parts(&["all_1_2_1"]);
    let mut steps = apply_steps_scaling(&rt, true, Some(3), 2, 3, |b| {
        assert_eq!(b["spec"]["replicas"], 2)
    });
    steps.push(pods_step(&["events-0", "events-1", "events-2"]));
    steps.push(status_step(|s| {
        assert_eq!(
            condition(s, "Progressing")["message"],
            "waiting to drop replicas: events-2"
        );
    }));
    steps.push(event_step("ScalingDown", "Warning"));
    steps.push(event_step("ScalingDown", "Normal"));
    run(rt.clone(), backend.clone(), steps).await.expect("ok");

    // Pod gone, session gone: dropped.
    let mut steps = apply_steps_scaling(&rt, true, Some(2), 2, 2, |_| {});
    steps.push(pods_step(&["events-0", "events-1"]));
    steps.push(event_step("ReplicaDropped", "Normal"));
    steps.push(status_step(|s| {
        assert_eq!(condition(s, "Ready")["status"], "True")
    }));
    run(rt, backend.clone(), steps).await.expect("ok");
    assert!(backend.calls().contains(&"drop events-2".to_string()));
}

#[tokio::test]
async fn zookeeper_down_and_schema_mismatch_are_written_to_status() {
    let backend = Arc::new(FakeBackend::with_replicas(3));
    let rt = settled(backend.clone()).await;
    *backend.down.lock().expect("lock") = true;
    let mut steps = apply_steps(&rt, true, 3, |_| {});
    steps.push(status_step(|s| {
        assert_eq!(condition(s, "Ready")["reason"], "ZooKeeperUnavailable");
        assert_eq!(condition(s, "Available")["status"], "Unknown");
        assert!(
            condition(s, "Degraded")["message"]
                .as_str()
                .unwrap_or_default()
                .contains("zk-0.zk:2181")
        );
    }));
    steps.push(event_step("ZooKeeperUnavailable", "Warning"));
    steps.push(event_step("ZooKeeperUnavailable", "Warning"));
    steps.push(event_step("ZooKeeperUnavailable", "Warning"));
    run(rt.clone(), backend.clone(), steps).await.expect("ok");

    *backend.down.lock().expect("lock") = false;
    *backend.mismatch.lock().expect("lock") = true;
    let mut steps = apply_steps(&rt, true, 3, |_| {});
    steps.push(status_step(|s| {
        assert_eq!(condition(s, "Degraded")["reason"], "SchemaMismatch");
        assert!(
            condition(s, "Degraded")["message"]
                .as_str()
                .unwrap_or_default()
                .contains("columns differ")
        );
        let available = condition(s, "Available");
        assert_eq!(
            (&available["status"], &available["reason"]),
            (&json!("Unknown"), &json!("SchemaMismatch")),
            "{available}"
        );
        assert!(
            available["message"]
                .as_str()
                .unwrap_or_default()
                .starts_with("replicas not read"),
            "{available}"
        );
    }));
    // Ready, Available (Unknown: no replica was read) and Degraded.
    for _ in 0..3 {
        steps.push(event_step("SchemaMismatch", "Warning"));
    }
    run(rt, backend, steps).await.expect("ok");
}

fn deleting(policy: DeletionPolicy) -> ReplicatedTable {
    deleted_at(policy, Timestamp::now())
}

fn deleted_at(policy: DeletionPolicy, at: Timestamp) -> ReplicatedTable {
    let mut rt = table();
    rt.spec.deletion_policy = policy;
    rt.metadata.deletion_timestamp = Some(Time(at));
    rt
}

/// Deleted long before the grace period (600 s in [`run`]).
fn deleted_long_ago() -> ReplicatedTable {
    deleted_at(
        DeletionPolicy::Delete,
        Timestamp::from_second(946_684_800).expect("2000-01-01"),
    )
}

/// Deleted 599 s ago: one second of the grace period left.
fn deleted_within_grace() -> ReplicatedTable {
    deleted_at(
        DeletionPolicy::Delete,
        Timestamp::now() - SignedDuration::from_secs(599),
    )
}

fn finalizer_removal() -> Step {
    json_patch_step(&rt_path())
        .check(exactly(json!([
            {"op": "test", "path": "/metadata/finalizers/0", "value": FINALIZER},
            {"op": "remove", "path": "/metadata/finalizers/0"}
        ])))
        .respond(|_| (200, serde_json::to_value(table()).expect("json")))
}

fn sts_delete() -> Step {
    step("DELETE", &format!("/apis/apps/v1{NS}/statefulsets/events"))
        .check(|b| assert_eq!(b["propagationPolicy"], "Background", "{b}"))
        .respond(|_| {
            (
                200,
                json!({"kind": "Status", "apiVersion": "v1", "status": "Success", "code": 200}),
            )
        })
}

/// The Warning that releases the finalizer without the tree: its note must say why, what
/// was left behind and the command that removes it.
fn abandoned_step(why: &'static str) -> Step {
    event_step("ZooKeeperTreeAbandoned", "Warning").check(move |b| {
        assert_eq!(b["reason"], "ZooKeeperTreeAbandoned");
        assert_eq!(b["type"], "Warning");
        assert_eq!(b["regarding"]["name"], "events");
        let note = b["note"].as_str().unwrap_or_default();
        assert!(note.len() <= 1024, "an Event note holds 1 KiB: {note}");
        assert!(
            note.starts_with("could not remove the ZooKeeper tree within 600s of deletion ("),
            "{note}"
        );
        assert!(note.contains(why), "{note}");
        assert!(
            note.ends_with(
                "finalizer released. Left behind: /clickhouse/tables/01/analytics.events on \
                 zk-0.zk:2181,zk-1.zk:2181,zk-2.zk:2181. Once no replica of it runs, remove it \
                 by hand: zkCli.sh -server zk-0.zk:2181,zk-1.zk:2181,zk-2.zk:2181 deleteall \
                 /clickhouse/tables/01/analytics.events"
            ),
            "{note}"
        );
    })
}

#[tokio::test]
async fn delete_waits_for_pods_then_removes_the_tree_and_the_finalizer() {
    let backend = Arc::new(FakeBackend::with_replicas(3));
    *backend.resolvable.lock().expect("lock") = vec![
        "zk-0.zk.analytics.svc.cluster.local".into(),
        "zk-1.zk.analytics.svc.cluster.local".into(),
        "zk-2.zk.analytics.svc.cluster.local".into(),
    ];
    let err = run(
        deleting(DeletionPolicy::Delete),
        backend.clone(),
        vec![sts_delete(), pods_step(&["events-0"])],
    )
    .await
    .expect_err("pods still running keeps the finalizer");
    assert!(matches!(err, Error::PodsStillRunning(1)), "{err}");
    assert!(backend.calls().is_empty());

    run(
        deleting(DeletionPolicy::Delete),
        backend.clone(),
        vec![
            sts_delete().not_found(),
            pods_step(&[]),
            event_step("ZooKeeperTreeRemoved", "Normal"),
            finalizer_removal(),
        ],
    )
    .await
    .expect("ok");
    assert_eq!(
        backend.calls(),
        ["remove /clickhouse/tables/01/analytics.events"]
    );
    assert_eq!(
        backend.targets(),
        [
            "zk-0.zk.analytics.svc.cluster.local:2181,zk-1.zk.analytics.svc.cluster.local:2181,zk-2.zk.analytics.svc.cluster.local:2181"
        ]
    );
}

#[tokio::test]
async fn delete_with_retain_keeps_the_tree() {
    let backend = Arc::new(FakeBackend::with_replicas(3));
    run(
        deleting(DeletionPolicy::Retain),
        backend.clone(),
        vec![finalizer_removal()],
    )
    .await
    .expect("ok");
    assert!(backend.calls().is_empty());
}

#[tokio::test]
async fn delete_with_zookeeper_unreachable_lets_go_after_the_grace_period() {
    let backend = Arc::new(FakeBackend::with_replicas(3));
    *backend.down.lock().expect("lock") = true;

    // Within the grace period (counted from the deletionTimestamp): the finalizer is kept,
    // and nothing else is written.
    for rt in [deleting(DeletionPolicy::Delete), deleted_within_grace()] {
        let err = run(
            rt,
            backend.clone(),
            vec![sts_delete().not_found(), pods_step(&[])],
        )
        .await
        .expect_err("kept while within the grace period");
        assert!(matches!(err, Error::ZooKeeper(_)), "{err}");
    }

    // Past it: a Warning Event and the finalizer goes.
    run(
        deleted_long_ago(),
        backend.clone(),
        vec![
            sts_delete().not_found(),
            pods_step(&[]),
            abandoned_step("ZooKeeper connect zk-0.zk:2181: connection to server has lost"),
            finalizer_removal(),
        ],
    )
    .await
    .expect("released");
    assert_eq!(
        backend.calls(),
        ["remove /clickhouse/tables/01/analytics.events"; 3]
    );
}

/// A ZooKeeper that answers but refuses us (here: no permission on the tree) is retried
/// within the grace period like an unreachable one, then let go of the same way.
#[tokio::test]
async fn delete_with_zookeeper_refusing_lets_go_after_the_grace_period() {
    let backend = Arc::new(FakeBackend::with_replicas(3));
    *backend.remove_refused.lock().expect("lock") = Some(zk::Error::NoAuth);

    let err = run(
        deleted_within_grace(),
        backend.clone(),
        vec![sts_delete().not_found(), pods_step(&[])],
    )
    .await
    .expect_err("kept while within the grace period");
    assert!(
        matches!(&err, Error::ZooKeeper(e) if !e.is_transient()),
        "{err}"
    );

    run(
        deleted_long_ago(),
        backend.clone(),
        vec![
            sts_delete().not_found(),
            pods_step(&[]),
            abandoned_step("ZooKeeper delete /clickhouse/tables/01/analytics.events: "),
            finalizer_removal(),
        ],
    )
    .await
    .expect("released");
    assert_eq!(
        backend.calls(),
        ["remove /clickhouse/tables/01/analytics.events"; 2]
    );
}

/// Pods stuck terminating (a node gone, a stuck volume) never let the tree be removed: the
/// finalizer waits for them through the grace period, then lets go without touching
/// ZooKeeper, whose tree a still-running replica would recreate.
#[tokio::test]
async fn delete_with_pods_stuck_terminating_lets_go_after_the_grace_period() {
    let backend = Arc::new(FakeBackend::with_replicas(3));
    let err = run(
        deleted_within_grace(),
        backend.clone(),
        vec![sts_delete(), pods_step(&["events-0", "events-2"])],
    )
    .await
    .expect_err("kept while within the grace period");
    assert!(matches!(err, Error::PodsStillRunning(2)), "{err}");

    run(
        deleted_long_ago(),
        backend.clone(),
        vec![
            sts_delete().not_found(),
            pods_step(&["events-0", "events-2"]),
            abandoned_step("waiting for 2 pods to terminate"),
            finalizer_removal(),
        ],
    )
    .await
    .expect("released");
    assert!(backend.calls().is_empty(), "{:?}", backend.calls());
}

/// The Kubernetes API failing the cleanup's own calls is bounded the same way.
#[tokio::test]
async fn delete_with_the_api_failing_lets_go_after_the_grace_period() {
    let backend = Arc::new(FakeBackend::with_replicas(3));
    let forbidden = || {
        sts_delete().respond(|_| {
            (
                403,
                json!({"kind": "Status", "apiVersion": "v1", "status": "Failure", "reason": "Forbidden", "code": 403, "message": "statefulsets.apps \"events\" is forbidden"}),
            )
        })
    };
    let err = run(deleted_within_grace(), backend.clone(), vec![forbidden()])
        .await
        .expect_err("kept while within the grace period");
    assert!(matches!(err, Error::Kube { .. }), "{err}");

    run(
        deleted_long_ago(),
        backend.clone(),
        vec![
            forbidden(),
            abandoned_step("delete statefulset"),
            finalizer_removal(),
        ],
    )
    .await
    .expect("released");
    assert!(backend.calls().is_empty(), "{:?}", backend.calls());
}

#[test]
fn the_abandon_note_names_the_chroot_the_auth_and_fits_an_event() {
    let rt = fixtures::table("table-full.yaml");
    let note = abandon_note(
        "ZooKeeper delete /x: not authenticated",
        Duration::from_secs(120),
        Some("/tables/x"),
        &rt.spec.zookeeper,
    );
    assert_eq!(
        note,
        "could not remove the ZooKeeper tree within 120s of deletion (ZooKeeper delete /x: not \
         authenticated); finalizer released. Left behind: /rtable/tables/x on zk.infra:2181. Once \
         no replica of it runs, remove it by hand: zkCli.sh -server zk.infra:2181 deleteall \
         /rtable/tables/x (after `addauth digest user:password` from the auth Secret)"
    );
    // A long reason (a schema diff, a long API message) is shortened, never the command.
    let long = "x".repeat(5000);
    let mut zookeeper = rt.spec.zookeeper.clone();
    zookeeper.nodes = (0..16)
        .map(|i| format!("zookeeper-{i}.zookeeper-headless.infrastructure.svc.cluster.local:2181"))
        .collect();
    let note = abandon_note(&long, Duration::from_secs(600), Some("/t"), &zookeeper);
    assert!(note.len() <= 1024, "{} bytes", note.len());
    assert!(
        note.ends_with(
            "deleteall /rtable/t (after `addauth digest user:password` from the auth Secret)"
        ),
        "{note}"
    );
    assert_eq!(
        abandon_note("bad", Duration::from_secs(1), None, &zookeeper),
        "could not remove the ZooKeeper tree within 1s of deletion (bad); finalizer released; \
         the spec is invalid, so no tree path is known"
    );
}

#[test]
fn the_grace_period_counts_from_the_deletion_timestamp() {
    let at = Timestamp::from_second(1_000_000).expect("ts");
    let grace = Duration::from_secs(600);
    let plus = |s: i64| at + SignedDuration::from_secs(s);
    assert!(!grace_expired(Some(&Time(at)), plus(599), grace));
    assert!(grace_expired(Some(&Time(at)), plus(600), grace));
    assert!(!grace_expired(None, plus(10_000), grace));
    assert!(grace_expired(Some(&Time(at)), at, Duration::ZERO));
}

#[tokio::test]
async fn invalid_spec_is_reported_and_nothing_is_applied() {
    let backend = Arc::new(FakeBackend::with_replicas(0));
    let mut rt = table();
    rt.spec.order_by = vec!["nope".into()];
    let steps = vec![
        status_step(|s| {
            assert_eq!(condition(s, "Ready")["reason"], "InvalidSpec");
            assert!(
                condition(s, "Ready")["message"]
                    .as_str()
                    .unwrap_or_default()
                    .contains("`nope`")
            );
        }),
        event_step("InvalidSpec", "Warning"),
        event_step("InvalidSpec", "Warning"),
        event_step("Stable", "Normal"),
        event_step("InvalidSpec", "Warning"),
    ];
    let action = run(rt, backend.clone(), steps).await.expect("ok");
    assert_eq!(action, Action::await_change());
    assert!(backend.calls().is_empty());
}
