//! Reconcile: dereference -> validate -> build -> apply -> status, wrapped in a finalizer.
//!
//! Level-triggered and idempotent: every step is safe to repeat, and every cleanup (a
//! replica drop on scale-down, the tree on delete) is retried until done.

use std::collections::HashSet;
use std::sync::Arc;
use std::time::Duration;

use k8s_openapi::api::apps::v1::StatefulSet;
use k8s_openapi::api::core::v1::Pod;
use k8s_openapi::apimachinery::pkg::apis::meta::v1::Time;
use k8s_openapi::jiff::{SignedDuration, Timestamp};
use kube::api::{DeleteParams, ListParams, Patch};
use kube::runtime::controller::Action;
use kube::runtime::events::{EventType, Reporter};
use kube::runtime::finalizer::{self, finalizer};
use kube::{Api, Client, Resource, ResourceExt};
use rtable_protocol::tree::{DropOutcome, TreeError};
use serde_json::json;

pub use crate::apply::FIELD_MANAGER;
use crate::apply::{Objects, apply_all, apply_params};
use crate::backend::{Backend, ZkTarget};
use crate::build::{self, BuildConfig, Names};
use crate::crd::{
    DeletionPolicy, FINALIZER, ReplicatedTable, ReplicatedTableStatus, selector_labels,
};
pub use crate::error::Error;
use crate::error::kube_err;
use crate::events;
use crate::metrics::Metrics;
use crate::retry;
use crate::scale_down;
use crate::status::{self, Observation, PodsObservation, ReplicaObservation, TreeObservation};
use crate::validate;
use crate::zk_secrets;
use crate::zookeeper_address;
use rtable_protocol::zk_access::ZkAccess;

/// Everything reconcile needs besides the object.
pub struct Context {
    pub client: Client,
    pub backend: Arc<dyn Backend>,
    pub build: BuildConfig,
    pub metrics: Metrics,
    pub reporter: Reporter,
    /// How long after the deletionTimestamp the finalizer keeps trying to remove the tree
    /// before letting go of it (whatever the failure: pods, ZooKeeper, the API).
    pub zookeeper_grace: Duration,
    /// Requeue interval of a healthy table: replica state lives in ZooKeeper, which the
    /// operator does not watch, so status is refreshed by polling.
    pub resync: Duration,
    /// Consecutive failed reconciles per table, for the backoff.
    pub failures: retry::Failures,
}

pub async fn reconcile(rt: Arc<ReplicatedTable>, ctx: Arc<Context>) -> Result<Action, Error> {
    let _timer = ctx.metrics.start();
    let ns = rt.namespace().ok_or(Error::NoNamespace)?;
    let api: Api<ReplicatedTable> = Api::namespaced(ctx.client.clone(), &ns);
    tracing::info!(table = %rt.name_any(), namespace = %ns, "reconciling");
    let key = table_key(&ns, &rt.name_any());
    finalizer(&api, FINALIZER, rt, |event| async {
        match event {
            finalizer::Event::Apply(rt) => apply(rt, ctx.clone()).await,
            finalizer::Event::Cleanup(rt) => cleanup(rt, ctx.clone()).await,
        }
    })
    .await
    .map_err(|e| match e {
        finalizer::Error::ApplyFailed(e) | finalizer::Error::CleanupFailed(e) => e,
        other => Error::Finalizer(Box::new(other)),
    })
    .inspect(|_| ctx.failures.forget(&key))
}

/// The key of a table's failure count.
fn table_key(ns: &str, name: &str) -> String {
    format!("{ns}/{name}")
}

pub fn error_policy(rt: Arc<ReplicatedTable>, error: &Error, ctx: Arc<Context>) -> Action {
    ctx.metrics.failed(error.metric_label());
    match error {
        Error::PodsStillRunning(_) => tracing::info!(table = %rt.name_any(), "{error}"),
        _ => tracing::warn!(table = %rt.name_any(), error = %error, "reconcile failed"),
    }
    let class = match error {
        Error::PodsStillRunning(_) => retry::Class::Transient,
        Error::ZooKeeper(e) if e.is_transient() => retry::Class::Transient,
        Error::Kube { .. } => retry::Class::Transient,
        _ => retry::Class::NeedsChange,
    };
    let key = table_key(&rt.namespace().unwrap_or_default(), &rt.name_any());
    let failures = ctx.failures.record(&key);
    let delay = retry::with_jitter(retry::delay(class, failures), rand::random::<f64>());
    tracing::debug!(table = %key, failures, delay_ms = delay.as_millis() as u64, "retrying after backoff");
    Action::requeue(delay)
}

/// How the operator reaches the table's ensemble. The nodes are written for the table's
/// pods, so a short name (`zk-0.zk:2181`) is qualified with the table's namespace when that
/// name exists (see [`zookeeper_address`]); the operator itself runs in another namespace.
async fn zk_target(rt: &ReplicatedTable, ctx: &Context, ns: &str, access: ZkAccess) -> ZkTarget {
    let domain = &ctx.build.cluster_domain;
    let candidates = zookeeper_address::candidates(&rt.spec.zookeeper, ns, domain);
    let answers = futures::future::join_all(
        candidates
            .iter()
            .map(|(host, port)| ctx.backend.resolves(host, *port)),
    )
    .await;
    let resolved: HashSet<String> = candidates
        .into_iter()
        .zip(answers)
        .filter_map(|((host, _), exists)| exists.then_some(host))
        .collect();
    ZkTarget {
        connect: zookeeper_address::connect_string(&rt.spec.zookeeper, ns, domain, &resolved),
        session_timeout: Duration::from_secs(u64::from(rt.spec.zookeeper.session_timeout_seconds)),
        access,
    }
}

async fn apply(rt: Arc<ReplicatedTable>, ctx: Arc<Context>) -> Result<Action, Error> {
    let ns = rt.namespace().ok_or(Error::NoNamespace)?;
    let names = Names::of(&rt);
    let client = &ctx.client;
    let desired = u32::try_from(rt.spec.replicas).unwrap_or(0);
    let selector = selector_labels(&rt.name_any());
    let selector_string = selector
        .iter()
        .map(|(k, v)| format!("{k}={v}"))
        .collect::<Vec<_>>()
        .join(",");
    let mut obs = Observation {
        generation: rt.meta().generation,
        desired_replicas: desired,
        quorum: rt.spec.quorum(),
        selector: selector_string.clone(),
        table_path: None,
        pods: PodsObservation::default(),
        tree: TreeObservation::Healthy(vec![]),
        pending_drops: vec![],
        scale_down_hold: None,
        apply_failures: vec![],
    };

    // Validate: an invalid spec is reported in status and waits for the next edit.
    let table = match validate::validate(&rt) {
        Ok(t) => t,
        Err(e) => {
            obs.tree = TreeObservation::InvalidSpec(e.to_string());
            write_status(&rt, &ctx, &obs).await?;
            return Ok(Action::await_change());
        }
    };
    obs.table_path = Some(table.table_path.clone());

    // The ensemble, before the apply: a scale-down reads the replicas' parts first. Without
    // its credentials the tree cannot be read; that is reported like any other refusal.
    let target = match zk_secrets::zk_access(&rt, client, &ns).await {
        Ok(access) => Ok(zk_target(&rt, &ctx, &ns, access).await),
        Err(e @ Error::Auth(_)) => Err(e.to_string()),
        Err(e) => return Err(e),
    };
    // Without the current count a scale-down cannot be checked: fail the round (retried)
    // rather than apply a count that might remove a replica's only copy of a part.
    let current = scale_down::current_replicas(client, &ns, &names.statefulset).await?;
    let plan = scale_down::plan(
        ctx.backend.as_ref(),
        target
            .as_ref()
            .map_err(|_| "no ZooKeeper credentials (see Degraded)"),
        &table.table_path,
        &names,
        desired,
        current,
    )
    .await;
    let mut stateful_set = build::stateful_set(&rt, &ctx.build);
    scale_down::limit(&mut stateful_set, plan.replicas);
    obs.scale_down_hold = plan.hold;

    // Build, then apply every object; refusals go into the status (and fail the round
    // below, after the status is written), the other objects are applied regardless.
    let objects = Objects {
        secret: build::interserver_secret(&rt, &build::new_interserver_secret()),
        config_map: build::config_map(&rt, &table.manifest)?,
        services: vec![build::headless_service(&rt), build::client_service(&rt)],
        stateful_set,
        pdb: build::pod_disruption_budget(&rt),
    };
    let applied = apply_all(client, &ns, &objects).await;
    obs.apply_failures = applied.refused;
    if let Some(sts) = &applied.stateful_set {
        obs.pods = PodsObservation::of(sts);
    }

    // ZooKeeper: the tree, then every replica's state.
    obs.tree = match &target {
        Err(e) => {
            obs.apply_failures.push(e.clone());
            TreeObservation::Unavailable("no ZooKeeper credentials (see Degraded)".to_string())
        }
        Ok(target) => {
            observe(
                &rt,
                &ctx,
                target,
                &table,
                &names,
                &ns,
                plan.replicas,
                &mut obs.pending_drops,
            )
            .await?
        }
    };

    let ready = write_status(&rt, &ctx, &obs).await?;
    if !obs.apply_failures.is_empty() {
        return Err(Error::Refused(obs.apply_failures.join("; ")));
    }
    let secs = if !obs.pending_drops.is_empty() || obs.scale_down_hold.is_some() || !ready {
        10
    } else {
        ctx.resync.as_secs()
    };
    Ok(Action::requeue(Duration::from_secs(secs)))
}

/// The tree as the status reports it: healthy with its replicas, or why not. `kept` is the
/// StatefulSet's replica count as applied (see [`observe_tree`]).
#[allow(clippy::too_many_arguments)]
async fn observe(
    rt: &ReplicatedTable,
    ctx: &Context,
    target: &ZkTarget,
    table: &rtable_protocol::ValidatedTable,
    names: &Names,
    ns: &str,
    kept: u32,
    pending_drops: &mut Vec<String>,
) -> Result<TreeObservation, Error> {
    Ok(
        match observe_tree(
            rt,
            ctx,
            target,
            &table.table_path,
            &table.schema,
            names,
            ns,
            kept,
            pending_drops,
        )
        .await
        {
            Ok(replicas) => TreeObservation::Healthy(replicas),
            Err(TreeError::SchemaMismatch { diff, path, .. }) => TreeObservation::SchemaMismatch(
                format!("the tree at {path} holds another definition (left unchanged): {diff}"),
            ),
            Err(e) if e.is_transient() => TreeObservation::Unavailable(e.to_string()),
            Err(e) => return Err(e.into()),
        },
    )
}

/// Ensures the tree, drops replicas of removed ordinals whose pod and session are gone,
/// and reads every replica's state (plus its sidecar's `/status`). Removed means at or past
/// `kept`, the StatefulSet's count as applied: an ordinal a held scale-down keeps (between
/// the desired count and `kept`) may hold the only copy of a part, and is never dropped.
#[allow(clippy::too_many_arguments)]
async fn observe_tree(
    rt: &ReplicatedTable,
    ctx: &Context,
    target: &ZkTarget,
    table_path: &str,
    schema: &rtable_protocol::schema::TableSchema,
    names: &Names,
    ns: &str,
    kept: u32,
    pending_drops: &mut Vec<String>,
) -> Result<Vec<ReplicaObservation>, TreeError> {
    ctx.backend.ensure_table(target, table_path, schema).await?;
    let states = ctx.backend.replicas(target, table_path).await?;
    let desired = u32::try_from(rt.spec.replicas).unwrap_or(0);

    let removed: Vec<&str> = states
        .iter()
        .filter(|s| names.ordinal_of(&s.name).is_some_and(|o| o >= kept))
        .map(|s| s.name.as_str())
        .collect();
    let mut dropped = Vec::new();
    if !removed.is_empty() {
        let pods = match list_pods(&ctx.client, ns, &rt.name_any()).await {
            Ok(p) => p,
            Err(e) => {
                // Without the pod list nothing may be dropped; retry on the next round.
                tracing::warn!(error = %e, "cannot list pods; replica drops postponed");
                removed.clone().into_iter().map(str::to_string).collect()
            }
        };
        for replica in &removed {
            if pods.iter().any(|p| p == replica) {
                pending_drops.push(replica.to_string());
                continue;
            }
            // The tree call itself refuses an active replica, so a pod that is gone but
            // whose session has not expired yet is retried, never dropped.
            match ctx.backend.drop_replica(target, table_path, replica).await {
                Ok(DropOutcome::Dropped) => {
                    tracing::info!(
                        table = %rt.name_any(),
                        replica,
                        "dropped replica metadata after scale-down"
                    );
                    publish(
                        ctx,
                        rt,
                        EventType::Normal,
                        "ReplicaDropped",
                        format!("dropped replica {replica} from {table_path}"),
                    )
                    .await;
                    dropped.push(replica.to_string());
                }
                Ok(DropOutcome::AlreadyGone) => dropped.push(replica.to_string()),
                Err(TreeError::ReplicaActive { .. }) => pending_drops.push(replica.to_string()),
                Err(e) => return Err(e),
            }
        }
    }

    let mut out = Vec::new();
    for s in states.into_iter().filter(|s| !dropped.contains(&s.name)) {
        let is_desired = names.ordinal_of(&s.name).is_some_and(|o| o < desired);
        let sidecar = if s.is_active && is_desired {
            let url = format!(
                "http://{}.{}.{ns}.svc.{}:{}/status",
                s.name,
                names.headless_service,
                ctx.build.cluster_domain,
                build::SIDECAR_PORT
            );
            ctx.backend.sidecar_status(&url).await
        } else {
            None
        };
        out.push(ReplicaObservation {
            name: s.name,
            desired: is_desired,
            active: s.is_active,
            lost: s.is_lost,
            log_pointer: s.log_pointer,
            queue_size: s.queue_size,
            parts: s.parts_count,
            sidecar,
        });
    }
    Ok(out)
}

async fn list_pods(client: &Client, ns: &str, name: &str) -> Result<Vec<String>, Error> {
    let pods: Api<Pod> = Api::namespaced(client.clone(), ns);
    let selector = selector_labels(name)
        .iter()
        .map(|(k, v)| format!("{k}={v}"))
        .collect::<Vec<_>>()
        .join(",");
    let list = pods
        .list_metadata(&ListParams::default().labels(&selector))
        .await
        .map_err(kube_err("list pods"))?;
    Ok(list.items.iter().map(|p| p.name_any()).collect())
}

/// Computes and writes the status (server-side apply on the status subresource), then
/// publishes one Event per condition transition. Returns whether the table is Ready.
async fn write_status(
    rt: &ReplicatedTable,
    ctx: &Context,
    obs: &Observation,
) -> Result<bool, Error> {
    let previous = rt
        .status
        .as_ref()
        .map(|s| s.conditions.clone())
        .unwrap_or_default();
    let new_status: ReplicatedTableStatus =
        status::compute(obs, &previous, &Time(Timestamp::now()));
    patch_status(rt, ctx, &new_status).await?;
    for t in status::transitions(&previous, &new_status.conditions) {
        let kind = if t.warning {
            EventType::Warning
        } else {
            EventType::Normal
        };
        publish(
            ctx,
            rt,
            kind,
            &t.reason,
            format!("{} is {}: {}", t.type_, t.status, t.message),
        )
        .await;
    }
    Ok(new_status
        .conditions
        .iter()
        .any(|c| c.type_ == status::READY && c.status == "True"))
}

async fn patch_status(
    rt: &ReplicatedTable,
    ctx: &Context,
    status: &ReplicatedTableStatus,
) -> Result<(), Error> {
    let ns = rt.namespace().ok_or(Error::NoNamespace)?;
    let api: Api<ReplicatedTable> = Api::namespaced(ctx.client.clone(), &ns);
    let body = json!({
        "apiVersion": "rtable.io/v1alpha1",
        "kind": "ReplicatedTable",
        "status": status,
    });
    api.patch_status(&rt.name_any(), &apply_params(), &Patch::Apply(&body))
        .await
        .map_err(kube_err("apply status"))?;
    Ok(())
}

async fn publish(
    ctx: &Context,
    rt: &ReplicatedTable,
    type_: EventType,
    reason: &str,
    note: String,
) {
    let reference = rt.object_ref(&());
    events::publish(&ctx.client, &ctx.reporter, &reference, type_, reason, note).await;
}

/// Deletion: with `deletionPolicy: Delete`, stop the pods, then remove the tree. Returning
/// `Ok` releases the finalizer; an error keeps it and retries, but only until the grace
/// period after the deletionTimestamp has passed: whatever keeps the tree from being removed
/// (pods stuck terminating, ZooKeeper unreachable or refusing us, the Kubernetes API failing),
/// the finalizer is then released with a Warning Event naming what was left behind and how
/// to remove it by hand, so namespace deletion never hangs forever.
async fn cleanup(rt: Arc<ReplicatedTable>, ctx: Arc<Context>) -> Result<Action, Error> {
    if rt.spec.deletion_policy == DeletionPolicy::Retain {
        tracing::info!(table = %rt.name_any(), "deletionPolicy Retain: ZooKeeper tree kept");
        return Ok(Action::await_change());
    }
    let error = match remove_tree(&rt, &ctx).await {
        Ok(()) => return Ok(Action::await_change()),
        Err(e) => e,
    };
    if !grace_expired(
        rt.meta().deletion_timestamp.as_ref(),
        Timestamp::now(),
        ctx.zookeeper_grace,
    ) {
        return Err(error);
    }
    let table_path = validate::validate(&rt)
        .map(|t| t.table_path)
        .ok()
        .or_else(|| rt.status.as_ref().and_then(|s| s.table_path.clone()));
    let note = abandon_note(
        &error.to_string(),
        ctx.zookeeper_grace,
        table_path.as_deref(),
        &rt.spec.zookeeper,
    );
    tracing::warn!(table = %rt.name_any(), error = %error, "{note}");
    publish(
        &ctx,
        &rt,
        EventType::Warning,
        "ZooKeeperTreeAbandoned",
        note,
    )
    .await;
    Ok(Action::await_change())
}

/// Every step of the tree removal; any error is retried by [`cleanup`] within the grace period.
async fn remove_tree(rt: &ReplicatedTable, ctx: &Context) -> Result<(), Error> {
    let ns = rt.namespace().ok_or(Error::NoNamespace)?;
    let names = Names::of(rt);
    // Owned objects are only garbage-collected once the table is gone, which the finalizer
    // holds up; the pods must stop first or their sessions would recreate what we remove.
    let sts: Api<StatefulSet> = Api::namespaced(ctx.client.clone(), &ns);
    match sts
        .delete(&names.statefulset, &DeleteParams::background())
        .await
    {
        Ok(_) => {}
        Err(kube::Error::Api(s)) if s.is_not_found() => {}
        Err(e) => return Err(kube_err("delete statefulset")(e)),
    }
    let pods = list_pods(&ctx.client, &ns, &rt.name_any()).await?;
    if !pods.is_empty() {
        return Err(Error::PodsStillRunning(pods.len()));
    }
    let table = match validate::validate(rt) {
        Ok(t) => t,
        Err(e) => {
            // An invalid spec never got a tree from us: nothing to remove.
            tracing::warn!(error = %e, "invalid spec at deletion; no tree to remove");
            return Ok(());
        }
    };
    let access = match zk_secrets::zk_access(rt, &ctx.client, &ns).await {
        Ok(access) => access,
        // The credentials Secret may already be gone in a namespace deletion.
        Err(Error::Auth(_)) => ZkAccess::default(),
        Err(e) => return Err(e),
    };
    let target = zk_target(rt, ctx, &ns, access).await;
    ctx.backend.remove_table(&target, &table.table_path).await?;
    publish(
        ctx,
        rt,
        EventType::Normal,
        "ZooKeeperTreeRemoved",
        format!("removed {}", table.table_path),
    )
    .await;
    Ok(())
}

/// Whether the grace period since the deletionTimestamp is over (never without one).
fn grace_expired(deleted_at: Option<&Time>, now: Timestamp, grace: Duration) -> bool {
    let grace = SignedDuration::try_from(grace).unwrap_or(SignedDuration::MAX);
    deleted_at.is_some_and(|t| now.duration_since(t.0) >= grace)
}

/// The Warning Event's note when the finalizer lets go of a tree it could not remove: why,
/// what is left and the command that removes it. An Event note holds at most 1 KiB, so the
/// reason is shortened to keep the rest whole.
fn abandon_note(
    why: &str,
    grace: Duration,
    table_path: Option<&str>,
    zookeeper: &crate::crd::ZooKeeperConfig,
) -> String {
    let mut why = why.replace('\n', " ");
    if why.len() > 300 {
        let mut end = 300;
        while !why.is_char_boundary(end) {
            end -= 1;
        }
        why.truncate(end);
        why.push('…');
    }
    let head = format!(
        "could not remove the ZooKeeper tree within {}s of deletion ({why}); finalizer released",
        grace.as_secs()
    );
    let Some(path) = table_path else {
        return format!("{head}; the spec is invalid, so no tree path is known");
    };
    let absolute = format!("{}{path}", zookeeper.root.as_deref().unwrap_or(""));
    let auth = if zookeeper.auth.is_some() {
        " (after `addauth digest user:password` from the auth Secret)"
    } else {
        ""
    };
    let mut note = format!(
        "{head}. Left behind: {absolute} on {nodes}. Once no replica of it runs, remove it by hand: zkCli.sh -server {nodes} deleteall {absolute}{auth}",
        nodes = zookeeper.nodes.join(","),
    );
    if note.len() > 1024 {
        // Sixteen long node names: name the first one only.
        let first = zookeeper.nodes.first().map(String::as_str).unwrap_or("");
        note = format!(
            "{head}. Left behind: {absolute}. Remove it by hand: zkCli.sh -server {first} deleteall {absolute}{auth}"
        );
    }
    note
}

#[cfg(test)]
mod tests;
