//! The operator as its users run it: installed by `helm`, two replicas as pods on
//! rtable-node electing a leader over a Lease, a table's `kubectl get rt -o wide`, a spec
//! edit rolling the StatefulSet, and `helm upgrade` / `helm uninstall`.
//!
//! Throughout, a sampler reads every operator pod's `/metrics` (reconciles and the leader
//! gauge) a few times a second; at the end no two operator processes may have been seen
//! reconciling at once.
//!
//! Needs root and `ip` (iproute2). Run with
//! `cargo test -p rtable-e2e --test kube_operator -- --test-threads=1 --nocapture`.

use std::collections::BTreeMap;
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, Ordering};
use std::time::{Duration, Instant};

use k8s_openapi::api::apps::v1::StatefulSet;
use k8s_openapi::api::coordination::v1::Lease;
use k8s_openapi::api::core::v1::Pod;
use k8s_openapi::apiextensions_apiserver::pkg::apis::apiextensions::v1::CustomResourceDefinition;
use kube::api::{Api, ApiResource, DynamicObject, GroupVersionKind, ListParams};
use rtable_e2e::kube::node_cluster::{NodeCluster, container_pids, repository_image_map};
use rtable_e2e::{Check, poll_until};
use serde_json::Value;

const OPERATOR_NS: &str = "rtable-system";
const OPERATOR_PODS: &str = "app.kubernetes.io/name=rtable-operator";
const LEASE: &str = "rtable-operator";
/// Short lease settings (chart values `leaderElection.*`), so takeovers fit a test.
const LEASE_SECONDS: u64 = 6;
const RETRY_SECONDS: u64 = 2;
/// What a takeover may take beyond the election's own bound: the API calls, a
/// reconcile in flight that the stopping leader finishes before releasing.
const SLACK: Duration = Duration::from_millis(2500);

async fn start() -> NodeCluster {
    let image_map = repository_image_map().unwrap_or_else(|e| panic!("{e:#}"));
    NodeCluster::start(
        std::path::Path::new(env!("CARGO_BIN_EXE_rtable-node")),
        &image_map,
    )
    .await
    .unwrap_or_else(|e| panic!("{e:#}"))
}

fn http() -> reqwest::Client {
    reqwest::Client::builder()
        .no_proxy()
        .timeout(Duration::from_millis(800))
        .build()
        .expect("http client")
}

async fn kubectl(cluster: &NodeCluster, args: &[&str], stdin: Option<&str>) -> String {
    cluster
        .kubectl
        .run(args, stdin)
        .await
        .and_then(|o| o.ok(&format!("kubectl {}", args.join(" "))))
        .unwrap_or_else(|e| panic!("{e:#}"))
        .stdout
}

async fn helm(cluster: &NodeCluster, args: &[&str]) -> String {
    cluster
        .helm()
        .run(args, None)
        .await
        .and_then(|o| o.ok(&format!("helm {}", args.join(" "))))
        .unwrap_or_else(|e| panic!("{e:#}"))
        .stdout
}

// ---------------------------------------------------------------------------------------
// The operator pods' metrics, sampled over a whole scenario.

/// One reading of one operator pod's `/metrics`.
#[derive(Debug, Clone)]
struct Sample {
    at: Duration,
    pod: String,
    reconciles: u64,
    leader: bool,
}

/// `rtable_operator_reconciles_total` and `rtable_operator_leader` from a `/metrics` text.
fn parse_metrics(text: &str) -> Option<(u64, bool)> {
    let value = |name: &str| {
        text.lines().find_map(|l| {
            l.strip_prefix(name)?
                .strip_prefix(' ')?
                .trim()
                .parse::<f64>()
                .ok()
        })
    };
    Some((
        value("rtable_operator_reconciles_total")? as u64,
        value("rtable_operator_leader")? == 1.0,
    ))
}

async fn operator_metrics(http: &reqwest::Client, ip: &str) -> anyhow::Result<(u64, bool)> {
    let text = http
        .get(format!("http://{ip}:8080/metrics"))
        .send()
        .await?
        .error_for_status()?
        .text()
        .await?;
    parse_metrics(&text).ok_or_else(|| anyhow::anyhow!("no operator metrics in {text}"))
}

/// Reads every operator pod's metrics every 200 ms until stopped.
struct Sampler {
    stop: Arc<AtomicBool>,
    task: tokio::task::JoinHandle<Vec<Sample>>,
}

impl Sampler {
    fn start(admin: &kube::Client) -> Sampler {
        let pods: Api<Pod> = Api::namespaced(admin.clone(), OPERATOR_NS);
        let stop = Arc::new(AtomicBool::new(false));
        let stopped = stop.clone();
        let task = tokio::spawn(async move {
            let (http, began) = (http(), Instant::now());
            let mut samples = Vec::new();
            while !stopped.load(Ordering::SeqCst) {
                let listed = pods
                    .list(&ListParams::default().labels(OPERATOR_PODS))
                    .await;
                for pod in listed.map(|l| l.items).unwrap_or_default() {
                    let name = pod.metadata.name.clone().unwrap_or_default();
                    let Some(ip) = pod.status.and_then(|s| s.pod_ip) else {
                        continue;
                    };
                    if let Ok((reconciles, leader)) = operator_metrics(&http, &ip).await {
                        samples.push(Sample {
                            at: began.elapsed(),
                            pod: name,
                            reconciles,
                            leader,
                        });
                    }
                }
                tokio::time::sleep(Duration::from_millis(200)).await;
            }
            samples
        });
        Sampler { stop, task }
    }

    async fn finish(self) -> Vec<Sample> {
        self.stop.store(true, Ordering::SeqCst);
        self.task.await.expect("the sampler")
    }
}

/// When one operator process was seen leading: evidence as intervals `(after, by]` in
/// which it reconciled (its counter grew) or said it leads.
#[derive(Debug, Default)]
struct Term {
    /// The earliest time by which it had certainly started leading.
    first_by: Option<Duration>,
    /// The latest time after which it certainly still led.
    last_after: Option<Duration>,
    reconciles: u64,
}

impl Term {
    fn saw(&mut self, after: Duration, by: Duration) {
        self.first_by = Some(self.first_by.map_or(by, |f| f.min(by)));
        self.last_after = Some(self.last_after.map_or(after, |l| l.max(after)));
    }
}

/// The terms of every operator process (a pod, and a new term when its counter restarts).
fn terms(samples: &[Sample]) -> BTreeMap<String, Term> {
    let mut by_pod: BTreeMap<&str, Vec<&Sample>> = BTreeMap::new();
    for s in samples {
        by_pod.entry(&s.pod).or_default().push(s);
    }
    let mut terms = BTreeMap::new();
    for (pod, samples) in by_pod {
        let mut incarnation = 0;
        let mut previous: Option<&Sample> = None;
        for s in samples {
            if previous.is_some_and(|p| s.reconciles < p.reconciles) {
                incarnation += 1;
            }
            let term: &mut Term = terms.entry(format!("{pod}#{incarnation}")).or_default();
            term.reconciles = s.reconciles;
            let grew = match previous {
                Some(p) if s.reconciles >= p.reconciles => s.reconciles > p.reconciles,
                _ => s.reconciles > 0,
            };
            if grew {
                // It reconciled after the previous reading (or at any time before this one).
                let after = previous.filter(|p| s.reconciles > p.reconciles);
                term.saw(after.map_or(Duration::ZERO, |p| p.at), s.at);
            }
            if s.leader {
                term.saw(s.at, s.at);
            }
            previous = Some(s);
        }
    }
    terms.retain(|_, t| t.first_by.is_some());
    terms
}

/// No two operator processes were seen leading at overlapping times: for any two, one's
/// last sign of leading came before the other's first.
fn assert_one_reconciler_at_a_time(samples: &[Sample]) -> BTreeMap<String, Term> {
    let terms = terms(samples);
    for (a, ta) in &terms {
        for (b, tb) in &terms {
            if a >= b {
                continue;
            }
            let (Some(a_first), Some(a_last), Some(b_first), Some(b_last)) =
                (ta.first_by, ta.last_after, tb.first_by, tb.last_after)
            else {
                continue;
            };
            assert!(
                !(b_first <= a_last && a_first <= b_last),
                "two operators led at once: {a} from {a_first:?} to after {a_last:?}, \
                 {b} from {b_first:?} to after {b_last:?}; samples:\n{samples:#?}"
            );
        }
    }
    terms
}

// ---------------------------------------------------------------------------------------
// The Lease and the operator pods.

async fn lease(admin: &kube::Client) -> Option<Lease> {
    Api::<Lease>::namespaced(admin.clone(), OPERATOR_NS)
        .get_opt(LEASE)
        .await
        .ok()
        .flatten()
}

fn holder(lease: &Option<Lease>) -> Option<String> {
    lease.as_ref()?.spec.as_ref()?.holder_identity.clone()
}

/// The operator pods that run and are Ready, by name, with their addresses.
async fn ready_operator_pods(admin: &kube::Client) -> anyhow::Result<BTreeMap<String, String>> {
    let pods: Api<Pod> = Api::namespaced(admin.clone(), OPERATOR_NS);
    Ok(pods
        .list(&ListParams::default().labels(OPERATOR_PODS))
        .await?
        .items
        .into_iter()
        .filter(|p| p.metadata.deletion_timestamp.is_none())
        .filter_map(|p| {
            let status = p.status?;
            let ready = status
                .conditions
                .iter()
                .flatten()
                .any(|c| c.type_ == "Ready" && c.status == "True");
            Some((p.metadata.name?, status.pod_ip.filter(|_| ready)?))
        })
        .collect())
}

/// Waits for `count` Ready operator pods of which exactly one, not in `not`, holds the
/// Lease and reports itself the leader, reconciling, while every other reports following
/// and has never reconciled. Returns the holder and the followers.
async fn one_leader(admin: &kube::Client, count: usize, not: &[&str]) -> (String, Vec<String>) {
    let http = http();
    poll_until(
        &format!("{count} operator pods, one holding the Lease and the only one reconciling"),
        Duration::from_secs(60),
        Duration::from_millis(300),
        || {
            let http = http.clone();
            async move {
                let pods = ready_operator_pods(admin).await?;
                let holder = holder(&lease(admin).await);
                if pods.len() != count {
                    return Ok(Check::Wait(format!("pods {pods:?}, holder {holder:?}")));
                }
                let Some(holder) = holder
                    .clone()
                    .filter(|h| pods.contains_key(h) && !not.contains(&h.as_str()))
                else {
                    return Ok(Check::Wait(format!("holder {holder:?} not in {pods:?}")));
                };
                let mut seen = BTreeMap::new();
                for (name, ip) in &pods {
                    seen.insert(name.clone(), operator_metrics(&http, ip).await?);
                }
                let leader_ok = seen[&holder].1 && seen[&holder].0 > 0;
                let followers_ok = seen
                    .iter()
                    .filter(|(n, _)| **n != holder)
                    .all(|(_, (reconciles, leader))| *reconciles == 0 && !leader);
                Ok(if leader_ok && followers_ok {
                    let followers = pods.keys().filter(|n| **n != holder).cloned().collect();
                    Check::Done((holder, followers))
                } else {
                    Check::Wait(format!("holder {holder}, (reconciles, leader): {seen:?}"))
                })
            }
        },
    )
    .await
    .unwrap_or_else(|e| panic!("{e:#}"))
}

/// Polls the Lease every 100 ms until someone other than `old` holds it; returns the new
/// holder, when it took over, and the last renewal by `old` that was seen.
async fn takeover(
    admin: &kube::Client,
    old: &str,
    since: Instant,
    within: Duration,
) -> (String, Duration, Option<Lease>) {
    let mut last_old: Option<Lease> = None;
    loop {
        let current = lease(admin).await;
        match holder(&current) {
            Some(h) if h != old => return (h, since.elapsed(), last_old),
            Some(_) => last_old = current.clone(),
            None => {}
        }
        assert!(
            since.elapsed() < within,
            "nobody took the Lease over from {old} within {within:?}: {current:?}"
        );
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
}

// ---------------------------------------------------------------------------------------
// `kubectl get rt -o wide`.

/// The cells of a `kubectl get -o wide` table, cut at the header's column starts.
fn wide_cells(text: &str, columns: &[&str]) -> Vec<BTreeMap<String, String>> {
    let mut lines = text.lines();
    let header = lines.next().unwrap_or_default();
    let starts: Vec<usize> = columns
        .iter()
        .map(|c| {
            header
                .find(c)
                .unwrap_or_else(|| panic!("column {c} in {header:?}"))
        })
        .collect();
    lines
        .map(|line| {
            columns
                .iter()
                .enumerate()
                .map(|(i, c)| {
                    let from = starts[i].min(line.len());
                    let to = starts.get(i + 1).map_or(line.len(), |&s| s.min(line.len()));
                    (c.to_string(), line[from..to].trim().to_string())
                })
                .collect()
        })
        .collect()
}

/// kubectl's age ("45s", "2m3s", "3h") in seconds.
fn parse_age(age: &str) -> u64 {
    let mut total = 0;
    let mut number = 0;
    for ch in age.chars() {
        if let Some(d) = ch.to_digit(10) {
            number = number * 10 + u64::from(d);
            continue;
        }
        total += number
            * match ch {
                's' => 1,
                'm' => 60,
                'h' => 3600,
                'd' => 86400,
                other => panic!("unit {other} in age {age:?}"),
            };
        number = 0;
    }
    total
}

fn table_api(admin: &kube::Client, ns: &str) -> Api<DynamicObject> {
    let gvk = GroupVersionKind::gvk("rtable.io", "v1alpha1", "ReplicatedTable");
    Api::namespaced_with(admin.clone(), ns, &ApiResource::from_gvk(&gvk))
}

fn condition<'a>(table: &'a DynamicObject, type_: &str) -> Option<&'a Value> {
    table.data["status"]["conditions"]
        .as_array()?
        .iter()
        .find(|c| c["type"] == type_)
}

/// Every printer column of `kubectl get rt -o wide` against the object's spec and status
/// and against the pods themselves.
async fn printer_columns_show_the_table(cluster: &NodeCluster) {
    let tables = table_api(&cluster.admin, "default");
    const COLUMNS: [&str; 9] = [
        "NAME",
        "REPLICAS",
        "ACTIVE",
        "READY",
        "MAX DELAY",
        "AGE",
        "QUORUM",
        "STATUS",
        "PATH",
    ];
    // The status is refreshed every resync: compare one listing against the object read
    // just before and just after it, unchanged in between.
    let (row, table, wide) = poll_until(
        "a `kubectl get rt -o wide` between two equal reads of the table",
        Duration::from_secs(30),
        Duration::from_millis(300),
        || {
            let (tables, kubectl) = (tables.clone(), cluster.kubectl.clone());
            async move {
                let before = tables.get("events").await?;
                let wide = kubectl
                    .run(&["get", "rt", "-n", "default", "-o", "wide"], None)
                    .await?
                    .ok("kubectl get rt -o wide")?
                    .stdout;
                let after = tables.get("events").await?;
                if before.data["status"] != after.data["status"] {
                    return Ok(Check::Wait("the status changed meanwhile".into()));
                }
                let rows = wide_cells(&wide, &COLUMNS);
                anyhow::ensure!(rows.len() == 1, "one table listed:\n{wide}");
                Ok(Check::Done((rows[0].clone(), after, wide)))
            }
        },
    )
    .await
    .unwrap_or_else(|e| panic!("{e:#}"));
    let (spec, status) = (&table.data["spec"], &table.data["status"]);
    let ready = condition(&table, "Ready").expect("a Ready condition");
    let created = table
        .metadata
        .creation_timestamp
        .as_ref()
        .expect("creationTimestamp")
        .0;
    let age = k8s_openapi::jiff::Timestamp::now()
        .duration_since(created)
        .as_secs() as u64;
    let expected = [
        ("NAME", "events".to_string()),
        ("REPLICAS", spec["replicas"].to_string()),
        ("ACTIVE", status["activeReplicas"].to_string()),
        ("READY", status["readyReplicas"].to_string()),
        ("MAX DELAY", status["maxDelaySeconds"].to_string()),
        ("QUORUM", status["quorum"].to_string()),
        (
            "STATUS",
            ready["reason"].as_str().unwrap_or_default().to_string(),
        ),
        (
            "PATH",
            status["tablePath"].as_str().unwrap_or_default().to_string(),
        ),
    ];
    for (column, value) in expected {
        assert_eq!(row[column], value, "column {column}:\n{wide}\n{table:#?}");
    }
    let shown_age = parse_age(&row["AGE"]);
    assert!(
        shown_age.abs_diff(age) <= 5,
        "AGE {} is the table's age ({age}s):\n{wide}",
        row["AGE"]
    );
    // And the status those columns show is the table's real state: three replicas, each
    // pod Ready and active in ZooKeeper, insert quorum from the spec, the tree's path.
    let pods: Api<Pod> = Api::namespaced(cluster.admin.clone(), "default");
    let selector = status["selector"].as_str().expect("status.selector");
    let ready_pods = pods
        .list(&ListParams::default().labels(selector))
        .await
        .expect("the table's pods")
        .items
        .iter()
        .filter(|p| {
            p.status
                .as_ref()
                .and_then(|s| s.conditions.as_ref())
                .is_some_and(|c| c.iter().any(|c| c.type_ == "Ready" && c.status == "True"))
        })
        .count();
    assert_eq!(row["REPLICAS"], "3", "{wide}");
    assert_eq!(row["READY"], ready_pods.to_string(), "{wide}");
    assert_eq!(row["ACTIVE"], "3", "every replica active: {wide}");
    assert_eq!(row["MAX DELAY"], "0", "in sync: {wide}");
    assert_eq!(row["QUORUM"], spec["insertQuorum"].to_string(), "{wide}");
    assert_eq!(row["STATUS"], "AllReplicasReady", "{wide}");
    assert_eq!(ready["status"], "True");
    assert_eq!(
        row["PATH"], "/clickhouse/tables/01/default.events",
        "{wide}"
    );
}

// ---------------------------------------------------------------------------------------
// A spec edit rolling the StatefulSet.

/// Whether the StatefulSet has rolled out its current template to every pod.
fn rolled_out(sts: &StatefulSet, replicas: i32) -> bool {
    let Some(s) = sts.status.as_ref() else {
        return false;
    };
    s.observed_generation == sts.metadata.generation
        && s.update_revision.is_some()
        && s.current_revision == s.update_revision
        && s.updated_replicas == Some(replicas)
        && s.ready_replicas == Some(replicas)
}

/// Edits `spec.pod.annotations` (which rolls the StatefulSet's pods) and watches the
/// table and the StatefulSet until both are done: `Ready` never says True for the new
/// generation before the StatefulSet has rolled out the new template.
async fn ready_waits_for_the_rollout(cluster: &NodeCluster) {
    let tables = table_api(&cluster.admin, "default");
    let sets: Api<StatefulSet> = Api::namespaced(cluster.admin.clone(), "default");
    let old_revision = sets
        .get("events")
        .await
        .expect("the StatefulSet")
        .status
        .and_then(|s| s.update_revision)
        .expect("an update revision");
    let old_generation = tables
        .get("events")
        .await
        .expect("the table")
        .metadata
        .generation
        .expect("generation");
    kubectl(
        cluster,
        &[
            "patch",
            "rt",
            "events",
            "-n",
            "default",
            "--type=merge",
            "-p",
            r#"{"spec":{"pod":{"annotations":{"example.com/rollout":"1"}}}}"#,
        ],
        None,
    )
    .await;
    let began = Instant::now();
    let mut reasons_while_rolling = Vec::<String>::new();
    let mut rolling_seen = false;
    loop {
        assert!(
            began.elapsed() < Duration::from_secs(180),
            "no Ready for the edit within 180 s; reasons seen {reasons_while_rolling:?}"
        );
        // The table first, then the StatefulSet: a rollout finished in between would
        // only make the check stricter.
        let (Ok(table), Ok(sts)) = (tables.get("events").await, sets.get("events").await) else {
            tokio::time::sleep(Duration::from_millis(150)).await;
            continue;
        };
        let generation = table.metadata.generation.unwrap_or(0);
        assert!(
            generation > old_generation,
            "the edit bumped the generation"
        );
        let ready = condition(&table, "Ready").cloned().unwrap_or_default();
        let for_new = ready["observedGeneration"].as_i64() == Some(generation);
        let done = rolled_out(&sts, 3)
            && sts
                .status
                .as_ref()
                .and_then(|s| s.update_revision.as_ref())
                .is_some_and(|r| *r != old_revision);
        if !done {
            rolling_seen = true;
        }
        if for_new && ready["status"] == "True" {
            assert!(
                done,
                "Ready True for generation {generation} before the StatefulSet rolled out: \
                 {ready}\nStatefulSet status: {:?}",
                sts.status
            );
            break;
        }
        if for_new {
            let progressing = condition(&table, "Progressing")
                .cloned()
                .unwrap_or_default();
            let reason = format!(
                "Ready={} {}, Progressing={} {}",
                ready["status"].as_str().unwrap_or_default(),
                ready["reason"].as_str().unwrap_or_default(),
                progressing["status"].as_str().unwrap_or_default(),
                progressing["reason"].as_str().unwrap_or_default()
            );
            if reasons_while_rolling.last() != Some(&reason) {
                reasons_while_rolling.push(reason);
            }
        }
        tokio::time::sleep(Duration::from_millis(150)).await;
    }
    assert!(rolling_seen, "the edit rolled the StatefulSet");
    assert!(
        reasons_while_rolling
            .iter()
            .any(|r| r.starts_with("Ready=False") && r.ends_with("Progressing=True RollingUpdate")),
        "while rolling, the new generation was not Ready and Progressing said why: \
         {reasons_while_rolling:?}"
    );
    eprintln!(
        "rollout of the edit: {:.1}s, Ready reasons meanwhile {reasons_while_rolling:?}",
        began.elapsed().as_secs_f64()
    );
}

// ---------------------------------------------------------------------------------------
// Scenarios.

/// `helm install` with two operator replicas and short leases; examples/zookeeper.yaml
/// and examples/events.yaml. Then: one Lease holder and the only pod reconciling;
/// `kubectl get rt -o wide`; a spec edit whose Ready waits for the rollout; the holder
/// stopped (SIGTERM through `kubectl delete pod`: another replica takes over within the
/// retry period) and killed (SIGKILL: another takes over once the lease has expired,
/// within lease duration plus retry period); never two reconciling at once.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn two_operator_replicas_lead_one_at_a_time_over_a_table_and_its_rollout() {
    let _serial = rtable_e2e::serial();
    let mut cluster = start().await;
    let lease_values = [
        format!("leaderElection.leaseDurationSeconds={LEASE_SECONDS}"),
        format!("leaderElection.retryPeriodSeconds={RETRY_SECONDS}"),
    ];
    let mut values = vec!["replicaCount=2", "resyncSeconds=2", "logFormat=text"];
    values.extend(lease_values.iter().map(String::as_str));
    let sampler = Sampler::start(&cluster.admin);
    cluster
        .install_examples_with(&values)
        .await
        .unwrap_or_else(|e| panic!("{e:#}"));
    let admin = cluster.admin.clone();

    // 1. Exactly one Lease holder, one of the two pods, and the only one reconciling.
    let (leader, followers) = one_leader(&admin, 2, &[]).await;
    assert_eq!(followers.len(), 1);
    cluster.clock.lap(&format!(
        "{leader} holds the Lease and reconciles; {followers:?} follow"
    ));

    // 2. The printer columns.
    printer_columns_show_the_table(&cluster).await;
    cluster
        .clock
        .lap("kubectl get rt -o wide: every column checked");

    // 3. A spec edit: Ready waits for the rollout.
    ready_waits_for_the_rollout(&cluster).await;
    cluster
        .clock
        .lap("spec edit rolled out; Ready waited for it");

    // 4. SIGTERM: the pod deleted; its operator releases the Lease once its reconciles
    // have finished and another replica takes it on its next try.
    let transitions = |l: &Option<Lease>| {
        l.as_ref()
            .and_then(|l| l.spec.as_ref())
            .and_then(|s| s.lease_transitions)
            .unwrap_or(0)
    };
    let before = transitions(&lease(&admin).await);
    let stopping = Instant::now();
    kubectl(
        &cluster,
        &["delete", "pod", "-n", OPERATOR_NS, &leader, "--wait=false"],
        None,
    )
    .await;
    let (new_leader, took, _) = takeover(
        &admin,
        &leader,
        stopping,
        Duration::from_secs(RETRY_SECONDS) + SLACK + Duration::from_secs(10),
    )
    .await;
    // The follower, or the pod the Deployment started in the stopped one's place: whichever
    // tries first once the Lease is released.
    assert_ne!(new_leader, leader, "another replica takes over");
    assert!(
        took <= Duration::from_secs(RETRY_SECONDS) + SLACK,
        "SIGTERM: the follower took over after {took:?}, more than the {RETRY_SECONDS}s retry period"
    );
    assert_eq!(transitions(&lease(&admin).await), before + 1);
    let (leader, _) = one_leader(&admin, 2, &[]).await;
    assert_eq!(leader, new_leader);
    cluster.clock.lap(&format!(
        "SIGTERM: {new_leader} took over after {:.2}s (retry period {RETRY_SECONDS}s)",
        took.as_secs_f64()
    ));

    // 5. SIGKILL: nothing is released; the pod is then removed at once (as with a lost
    // node) so that it does not restart in place. Another replica takes over once the
    // lease has expired.
    let pids = container_pids(&leader, "rtable-operator").unwrap_or_else(|e| panic!("{e:#}"));
    assert_eq!(pids.len(), 1, "one operator process in {leader}: {pids:?}");
    let killing = Instant::now();
    nix::sys::signal::kill(
        nix::unistd::Pid::from_raw(pids[0]),
        nix::sys::signal::Signal::SIGKILL,
    )
    .expect("kill -9 the leader");
    kubectl(
        &cluster,
        &[
            "delete",
            "pod",
            "-n",
            OPERATOR_NS,
            &leader,
            "--grace-period=0",
            "--force",
            "--wait=false",
        ],
        None,
    )
    .await;
    let bound = Duration::from_secs(LEASE_SECONDS + RETRY_SECONDS);
    let (next_leader, took, last_renewal) = takeover(
        &admin,
        &leader,
        killing,
        bound + SLACK + Duration::from_secs(10),
    )
    .await;
    assert_ne!(next_leader, leader);
    assert!(
        took <= bound + SLACK,
        "SIGKILL: taken over after {took:?}, more than lease + retry ({bound:?})"
    );
    // Never before the killed leader's lease had expired.
    let renewed = last_renewal
        .and_then(|l| l.spec)
        .and_then(|s| s.renew_time)
        .expect("the killed leader's last renewal")
        .0;
    let acquired = lease(&admin)
        .await
        .and_then(|l| l.spec)
        .and_then(|s| s.acquire_time)
        .expect("acquireTime")
        .0;
    let waited = acquired.duration_since(renewed);
    assert!(
        waited.as_secs_f64() >= LEASE_SECONDS as f64,
        "taken {waited:?} after the last renewal, before the {LEASE_SECONDS}s lease expired"
    );
    let (now_leading, _) = one_leader(&admin, 2, &[]).await;
    assert_eq!(now_leading, next_leader);
    cluster.clock.lap(&format!(
        "SIGKILL: {next_leader} took over after {:.2}s ({:.2}s after the last renewal; \
         lease {LEASE_SECONDS}s + retry {RETRY_SECONDS}s)",
        took.as_secs_f64(),
        waited.as_secs_f64()
    ));

    // Never two reconciling at once, over the whole scenario.
    let samples = sampler.finish().await;
    let terms = assert_one_reconciler_at_a_time(&samples);
    // The first leader and the one after SIGKILL lead for seconds; the one in between may be
    // killed within a sampling period of taking over.
    assert!(
        terms.len() >= 2,
        "the operators led in turn (install, after SIGTERM, after SIGKILL): {terms:?}"
    );
    eprintln!(
        "{} metric samples; terms: {:?}",
        samples.len(),
        terms
            .iter()
            .map(|(k, t)| format!(
                "{k}: {:?}..{:?} ({} reconciles)",
                t.first_by, t.last_after, t.reconciles
            ))
            .collect::<Vec<_>>()
    );
    drop(cluster);
}

/// A copy of the chart as its previous release: `version`/`appVersion` 0.0.1 and a CRD
/// without `spec.pod.priorityClassName` (the "new field" of the current chart).
fn previous_chart(dir: &std::path::Path) -> std::path::PathBuf {
    let source = rtable_e2e::repo_root().join("charts/rtable-operator");
    let chart = dir.join("rtable-operator");
    let copy = std::process::Command::new("cp")
        .arg("-r")
        .arg(&source)
        .arg(&chart)
        .status()
        .expect("cp");
    assert!(copy.success(), "copying the chart");
    let meta = chart.join("Chart.yaml");
    let text = std::fs::read_to_string(&meta).expect("Chart.yaml");
    let text = text
        .replace("version: 0.1.0", "version: 0.0.1")
        .replace("appVersion: \"0.1.0\"", "appVersion: \"0.0.1\"");
    assert!(
        text.contains("version: 0.0.1") && text.contains("\"0.0.1\""),
        "{text}"
    );
    std::fs::write(&meta, text).expect("Chart.yaml");
    let crd_path = chart.join("crds/replicatedtable.yaml");
    let mut crd: serde_yaml::Value =
        serde_yaml::from_str(&std::fs::read_to_string(&crd_path).expect("the CRD")).expect("yaml");
    let pod = &mut crd["spec"]["versions"][0]["schema"]["openAPIV3Schema"]["properties"]["spec"]["properties"]
        ["pod"]["properties"];
    let removed = pod
        .as_mapping_mut()
        .and_then(|m| m.remove("priorityClassName"));
    assert!(
        removed.is_some(),
        "the chart's CRD has spec.pod.priorityClassName"
    );
    std::fs::write(&crd_path, serde_yaml::to_string(&crd).expect("yaml")).expect("write the CRD");
    chart
}

/// `helm upgrade` from a release whose CRD lacks a field to the current chart: Helm skips
/// `crds/` on upgrade, and the upgraded operator applies its own CRD when it starts, so the
/// API server accepts the field afterwards. The operators of the two releases never
/// reconcile at once. `helm uninstall` then removes the operator's pods and leaves the
/// CRD and the tables.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn helm_upgrade_brings_the_new_crd_field_and_uninstall_leaves_crd_and_tables() {
    let _serial = rtable_e2e::serial();
    let mut cluster = start().await;
    let admin = cluster.admin.clone();
    let dir = tempfile::tempdir().expect("tempdir");
    let old_chart = previous_chart(dir.path());
    let old_chart = old_chart.display().to_string();
    let chart = rtable_e2e::repo_root()
        .join("charts/rtable-operator")
        .display()
        .to_string();
    let sampler = Sampler::start(&admin);

    // The previous release: its CRD from crds/, and its operator (which would apply its
    // own, older CRD: the same as crds/) told not to apply the current binary's.
    let common = [
        "-n",
        OPERATOR_NS,
        "--set",
        "replicaCount=1",
        "--set",
        "resyncSeconds=2",
        "--set",
        "logFormat=text",
    ];
    let mut install = vec!["install", "rtable", &old_chart, "--create-namespace"];
    install.extend(common);
    install.extend(["--set", "installCRD=false"]);
    helm(&cluster, &install).await;
    kubectl(&cluster, &["create", "namespace", "tables"], None).await;
    let table = |priority_class: bool| {
        let text = std::fs::read_to_string(rtable_e2e::example_manifest()).expect("the example");
        let mut doc: serde_yaml::Value = serde_yaml::from_str(&text).expect("yaml");
        doc["metadata"]["namespace"] = "tables".into();
        if priority_class {
            doc["spec"]["pod"] =
                serde_yaml::from_str("{priorityClassName: rtable-high}").expect("yaml");
        }
        serde_yaml::to_string(&doc).expect("yaml")
    };
    let refused = cluster
        .kubectl
        .run(&["apply", "-f", "-"], Some(&table(true)))
        .await
        .expect("kubectl runs");
    assert!(
        !refused.success,
        "the old CRD has no such field: {refused:?}"
    );
    assert!(
        refused
            .stderr
            .contains(r#"unknown field "spec.pod.priorityClassName""#),
        "{}",
        refused.stderr
    );
    kubectl(&cluster, &["apply", "-f", "-"], Some(&table(false))).await;
    let (old_leader, _) = one_leader(&admin, 1, &[]).await;
    cluster
        .clock
        .lap("release 0.0.1 installed; its CRD refuses spec.pod.priorityClassName");

    // The upgrade.
    let mut upgrade = vec!["upgrade", "rtable", &chart];
    upgrade.extend(common);
    helm(&cluster, &upgrade).await;
    let crds: Api<CustomResourceDefinition> = Api::all(admin.clone());
    poll_until(
        "the CRD with spec.pod.priorityClassName",
        Duration::from_secs(60),
        Duration::from_millis(250),
        || {
            let crds = crds.clone();
            async move {
                let crd = crds.get("replicatedtables.rtable.io").await?;
                let schema = serde_json::to_value(&crd.spec.versions[0].schema)?;
                let field = &schema["openAPIV3Schema"]["properties"]["spec"]["properties"]["pod"]
                    ["properties"]["priorityClassName"];
                Ok(if field.is_null() {
                    Check::Wait("not yet".into())
                } else {
                    Check::Done(())
                })
            }
        },
    )
    .await
    .unwrap_or_else(|e| panic!("{e:#}"));
    let crd = crds
        .get("replicatedtables.rtable.io")
        .await
        .expect("the CRD");
    let managers: Vec<(String, String)> = crd
        .metadata
        .managed_fields
        .iter()
        .flatten()
        .map(|m| {
            (
                m.manager.clone().unwrap_or_default(),
                m.operation.clone().unwrap_or_default(),
            )
        })
        .collect();
    assert!(
        managers.contains(&("rtable-operator".to_string(), "Apply".to_string())),
        "the upgraded operator applied the CRD: {managers:?}"
    );
    // Marked with its version, so that an older operator never downgrades it.
    let marked = crd
        .metadata
        .annotations
        .as_ref()
        .and_then(|a| a.get("rtable.io/operator-version"));
    assert_eq!(marked.map(String::as_str), Some("0.1.0"));
    kubectl(&cluster, &["apply", "-f", "-"], Some(&table(true))).await;
    let stored = table_api(&admin, "tables")
        .get("events")
        .await
        .expect("the table");
    assert_eq!(
        stored.data["spec"]["pod"]["priorityClassName"],
        "rtable-high"
    );
    let releases: Value =
        serde_json::from_str(&helm(&cluster, &["list", "-n", OPERATOR_NS, "-o", "json"]).await)
            .expect("helm list json");
    assert_eq!(releases[0]["chart"], "rtable-operator-0.1.0", "{releases}");
    // The new release's pod leads once the old one has stopped.
    one_leader(&admin, 1, &[&old_leader]).await;
    cluster
        .clock
        .lap("helm upgrade to 0.1.0: the operator applied its CRD; the new field is stored");

    // Uninstall: the operator goes; the CRD and the tables stay.
    helm(&cluster, &["uninstall", "rtable", "-n", OPERATOR_NS]).await;
    let pods: Api<Pod> = Api::namespaced(admin.clone(), OPERATOR_NS);
    poll_until(
        "the operator pods gone",
        Duration::from_secs(60),
        Duration::from_millis(250),
        || {
            let pods = pods.clone();
            async move {
                let left: Vec<String> = pods
                    .list(&ListParams::default().labels(OPERATOR_PODS))
                    .await?
                    .items
                    .into_iter()
                    .filter_map(|p| p.metadata.name)
                    .collect();
                Ok(if left.is_empty() {
                    Check::Done(())
                } else {
                    Check::Wait(format!("{left:?}"))
                })
            }
        },
    )
    .await
    .unwrap_or_else(|e| panic!("{e:#}"));
    assert!(
        crds.get_opt("replicatedtables.rtable.io")
            .await
            .expect("get the CRD")
            .is_some(),
        "helm uninstall leaves the CRD"
    );
    let kept = table_api(&admin, "tables")
        .get("events")
        .await
        .expect("the table outlives the operator");
    assert!(kept.metadata.deletion_timestamp.is_none());
    assert_eq!(kept.data["spec"]["pod"]["priorityClassName"], "rtable-high");
    cluster
        .clock
        .lap("helm uninstall: operator pods gone; the CRD and the table stay");

    let samples = sampler.finish().await;
    let terms = assert_one_reconciler_at_a_time(&samples);
    assert!(terms.len() >= 2, "both releases' operators led: {terms:?}");
    drop(cluster);
}
