//! Reconciles local parts with ZooKeeper around activation (ClickHouse's startup checks and
//! cloneReplica):
//! - before activation: parts that ZooKeeper doesn't know are detached (never deleted);
//!   parts ZooKeeper lists but the disk lacks are re-queued as fetches; inserts staged by a
//!   previous process are activated or discarded by whether their commit happened;
//! - after activation: the queue is loaded, and a replica marked lost clones the best
//!   healthy replica (its log pointer, its queue, and a fetch for each part it holds).

use std::collections::BTreeSet;
use std::sync::Arc;
use std::sync::atomic::Ordering;

use tracing::{info, warn};
use zookeeper_client as zk;

use rtable_protocol::paths::{ReplicaPaths, sequence_of};
use rtable_protocol::tree::{self, TreeError};
use rtable_protocol::zk_acl::TreeAcl;
use rtable_protocol::{LogEntry, PartName};

use crate::queue::pull;
use crate::replica::Replica;

const BATCH: usize = 50;

pub async fn before_activation(
    replica: &Arc<Replica>,
    client: &zk::Client,
) -> Result<(), TreeError> {
    let rp = replica.paths.replica(&replica.name);
    let zk_parts: BTreeSet<String> = client
        .list_children(&rp.parts())
        .await
        .map_err(|e| TreeError::zk("list", rp.parts(), e))?
        .into_iter()
        .collect();

    // Only the first session of this process may touch staged inserts: later ones belong
    // to the running committer, which resolves its own.
    if !replica.startup_recovery_done.swap(true, Ordering::SeqCst) {
        for staged in replica.store.staged_on_disk() {
            let name = staged.name.to_string();
            if zk_parts.contains(&name) {
                info!(replica = %replica.name, part = %name, "activating a part committed by the previous process");
                if let Err(e) = replica.store.activate_staged(staged) {
                    warn!(replica = %replica.name, part = %name, error = %e, "cannot activate staged part");
                }
            } else {
                info!(replica = %replica.name, part = %name, "discarding an insert the previous process never committed");
                replica.store.discard_staged(staged);
            }
        }
    }

    let mut zk_parts = zk_parts;
    for failed in set_aside_failed_quorum_parts(replica, client).await? {
        zk_parts.remove(&failed);
    }

    // Staged parts belong to commits of this process whose outcome is still open (an
    // insert or merge whose multi was cut off by the session's end): their resolver
    // activates them when `parts/<part>` exists, so that node must stay. Read before the
    // active parts: a part only moves from staged to active, so it is seen in one of them.
    // Copies handed off here are resolved after the activation (see `handoff`).
    let mut staged = replica.store.staged_names();
    staged.extend(replica.store.handoff_names());
    let local: BTreeSet<String> = replica
        .store
        .parts()
        .iter()
        .map(|p| p.name.to_string())
        .collect();
    let unexpected: Vec<&String> = local.difference(&zk_parts).collect();
    // A part our own queue produces (a fetch or merge that installed it and died before
    // recording it) is proved by that entry: it stays, and executing the entry finds it
    // here and records it. Only parts nothing accounts for are set aside.
    let proved = if unexpected.is_empty() {
        BTreeSet::new()
    } else {
        queued_results(replica, client).await?
    };
    for name in unexpected {
        if proved.contains(name) {
            info!(replica = %replica.name, part = %name, "part is not in ZooKeeper yet but a queued entry produces it; keeping it for the queue to record");
            continue;
        }
        let Ok(part) = PartName::parse(name) else {
            continue;
        };
        warn!(replica = %replica.name, part = %name, "part is not in ZooKeeper; detaching it as unexpected");
        if let Err(e) = replica.store.detach(&part, "unexpected") {
            warn!(replica = %replica.name, part = %name, error = %e, "cannot detach unexpected part");
        }
    }

    // Parts ZooKeeper says we have but the disk lost (a wiped volume): forget them and
    // fetch them again, in one multi per batch so nothing is forgotten without a fetch.
    let missing: Vec<&String> = zk_parts
        .difference(&local)
        .filter(|name| !staged.contains(*name))
        .collect();
    if !missing.is_empty() {
        warn!(replica = %replica.name, count = missing.len(), "parts missing locally; re-queueing fetches");
    }
    let now = chrono::Utc::now().timestamp();
    for chunk in missing.chunks(BATCH) {
        let mut multi = client.new_multi_writer();
        let mut paths = Vec::new();
        for name in chunk {
            add_refetch(&mut multi, &replica.zk_acl, &replica.name, &rp, name, now)?;
            paths.push(rp.part(name));
            paths.push(rp.queue_entry_prefix());
        }
        multi
            .commit()
            .await
            .map_err(|e| tree::multi_error("re-queue lost parts", &paths, e))?;
    }
    Ok(())
}

/// Adds the two operations that make replica `me` fetch `part` again: its
/// `replicas/<me>/parts/<part>` node goes, and a GET_PART sourced from `me` is queued (the
/// executor then asks ZooKeeper which replica holds the part, or one covering it). In one
/// multi, nothing is forgotten without its fetch. Returns the queued entry.
pub(crate) fn add_refetch(
    multi: &mut zk::MultiWriter<'_>,
    acl: &TreeAcl,
    me: &str,
    rp: &ReplicaPaths,
    part: &str,
    now: i64,
) -> Result<LogEntry, TreeError> {
    let entry = LogEntry::get(me, "", part, 0, now);
    let part_path = rp.part(part);
    multi
        .add_delete(&part_path, None)
        .map_err(|e| TreeError::zk("delete", part_path, e))?;
    multi
        .add_create(
            &rp.queue_entry_prefix(),
            entry.render().as_bytes(),
            &acl.persistent_sequential(),
        )
        .map_err(|e| TreeError::zk("create", rp.queue_entry_prefix(), e))?;
    Ok(entry)
}

/// The parts that the entries of `replicas/<me>/queue` produce.
async fn queued_results(
    replica: &Replica,
    client: &zk::Client,
) -> Result<BTreeSet<String>, TreeError> {
    Ok(pull::read_queue(replica, client)
        .await?
        .entries
        .into_iter()
        .filter_map(|(_, entry)| entry.new_part_name())
        .collect())
}

/// Parts whose quorum failed were never acknowledged: forget them in ZooKeeper and set
/// them aside on disk (never deleted). Returns the failed part names.
async fn set_aside_failed_quorum_parts(
    replica: &Replica,
    client: &zk::Client,
) -> Result<Vec<String>, TreeError> {
    let rp = replica.paths.replica(&replica.name);
    let failed_parts = crate::quorum::failed_parts(replica, client).await?;
    for failed in &failed_parts {
        let Ok(part) = PartName::parse(failed) else {
            continue;
        };
        match client.delete(&rp.part(failed), None).await {
            Ok(()) | Err(zk::Error::NoNode) => {}
            Err(e) => return Err(TreeError::zk("delete", rp.part(failed), e)),
        }
        if replica.store.contains(&part) {
            warn!(replica = %replica.name, part = %failed, "part failed its quorum; detaching it");
            if let Err(e) = replica.store.detach(&part, "noquorum") {
                warn!(replica = %replica.name, part = %failed, error = %e, "cannot detach failed-quorum part");
            }
        }
    }
    Ok(failed_parts)
}

pub async fn after_activation(
    replica: &Arc<Replica>,
    client: &zk::Client,
) -> Result<(), TreeError> {
    // Again now that `is_active` exists: while this replica was inactive, a peer may have
    // failed the quorum of a part only this replica held (the check before activation
    // can't see that), and the client's retry has committed the rows anew since.
    set_aside_failed_quorum_parts(replica, client).await?;
    // The activation moved `host` on: no commit counting on a copy left over can land now.
    crate::handoff::resolve_left_over(replica, client).await?;
    let rp = replica.paths.replica(&replica.name);
    if tree::get_string(client, &rp.is_lost()).await?.as_deref() == Some("1") {
        clone_replica(replica, client).await?;
        client
            .set_data(&rp.is_lost(), b"0", None)
            .await
            .map_err(|e| TreeError::zk("set", rp.is_lost(), e))?;
    }
    let n = pull::load_queue(replica, client).await?;
    info!(replica = %replica.name, queued = n, "queue loaded");
    // A quorum this replica satisfied before a crash may lack its acknowledgement.
    let parallel = replica.paths.quorum_parallel();
    let pending = match client.list_children(&parallel).await {
        Ok(c) => c,
        Err(zk::Error::NoNode) => Vec::new(),
        Err(e) => return Err(TreeError::zk("list", parallel, e)),
    };
    for part in pending {
        if let Ok(name) = PartName::parse(&part)
            && replica.store.covering(&name).is_some()
        {
            crate::quorum::acknowledge(replica, client, &name).await?;
        }
    }
    Ok(())
}

struct Candidate {
    name: String,
    lag: u64,
}

/// Copies the state of the healthiest non-lost replica: its log pointer (with version
/// checks so the copy is of one moment), its queue, and a GET for every part it has that
/// this replica lacks. Idempotent: `is_lost` stays 1 until everything is copied.
async fn clone_replica(replica: &Arc<Replica>, client: &zk::Client) -> Result<(), TreeError> {
    let me = replica.paths.replica(&replica.name);
    let log_max = tree::log_max_index(client, &replica.paths)
        .await?
        .map(|i| i + 1)
        .unwrap_or(0);
    let mut best: Option<Candidate> = None;
    for name in tree::list_replicas(client, &replica.paths).await? {
        if name == replica.name {
            continue;
        }
        let state = match tree::read_replica_state(client, &replica.paths, &name).await {
            Ok(s) => s,
            Err(TreeError::NoReplica { .. }) => continue,
            Err(e) => return Err(e),
        };
        if state.is_lost || state.host.is_none() {
            continue;
        }
        let Some(pointer) = state.log_pointer else {
            continue;
        };
        let lag = log_max.saturating_sub(pointer) + u64::from(state.queue_size);
        if best.as_ref().is_none_or(|b| lag < b.lag) {
            best = Some(Candidate { name, lag });
        }
    }
    let Some(source) = best else {
        info!(replica = %replica.name, "no healthy replica to clone; replaying the log instead");
        return Ok(());
    };
    info!(replica = %replica.name, source = %source.name, "cloning a lost replica");
    let src = replica.paths.replica(&source.name);

    // 1. Forget our own queue: the source's replaces it.
    let own_queue = client
        .list_children(&me.queue())
        .await
        .map_err(|e| TreeError::zk("list", me.queue(), e))?;
    for chunk in own_queue.chunks(BATCH) {
        let mut multi = client.new_multi_writer();
        for node in chunk {
            multi
                .add_delete(&me.queue_entry(node), None)
                .map_err(|e| TreeError::zk("delete", me.queue_entry(node), e))?;
        }
        match multi.commit().await {
            Ok(_)
            | Err(zk::MultiWriteError::OperationFailed {
                source: zk::Error::NoNode,
                ..
            }) => {}
            Err(e) => return Err(tree::multi_error("clear queue", &[me.queue()], e)),
        }
    }

    // 2. Copy the pointer, the queue and the parts list as of one moment: the pointer
    //    copy is checked against the versions we read.
    let (pointer, pointer_stat) = client
        .get_data(&src.log_pointer())
        .await
        .map_err(|e| TreeError::zk("get", src.log_pointer(), e))?;
    let (_, lost_stat) = client
        .get_data(&src.is_lost())
        .await
        .map_err(|e| TreeError::zk("get", src.is_lost(), e))?;
    let mut src_queue = client
        .list_children(&src.queue())
        .await
        .map_err(|e| TreeError::zk("list", src.queue(), e))?;
    src_queue.sort_by_key(|n| sequence_of(n).unwrap_or(u64::MAX));
    let mut entries: Vec<Vec<u8>> = Vec::with_capacity(src_queue.len());
    for node in &src_queue {
        match client.get_data(&src.queue_entry(node)).await {
            Ok((data, _)) => entries.push(data),
            Err(zk::Error::NoNode) => {}
            Err(e) => return Err(TreeError::zk("get", src.queue_entry(node), e)),
        }
    }
    let src_parts = client
        .list_children(&src.parts())
        .await
        .map_err(|e| TreeError::zk("list", src.parts(), e))?;
    let now = chrono::Utc::now().timestamp();
    for name in &src_parts {
        if let Ok(part) = PartName::parse(name)
            && replica.store.covering(&part).is_none()
        {
            entries.push(
                LogEntry::get(&source.name, "", name, 0, now)
                    .render()
                    .into_bytes(),
            );
        }
    }
    replica.log_pointer_cache.lock().take();
    let mut multi = client.new_multi_writer();
    multi
        .add_check_version(&src.log_pointer(), pointer_stat.version)
        .map_err(|e| TreeError::zk("check", src.log_pointer(), e))?;
    multi
        .add_check_version(&src.is_lost(), lost_stat.version)
        .map_err(|e| TreeError::zk("check", src.is_lost(), e))?;
    multi
        .add_set_data(&me.log_pointer(), &pointer, None)
        .map_err(|e| TreeError::zk("set", me.log_pointer(), e))?;
    match multi.commit().await {
        Ok(_) => {}
        Err(zk::MultiWriteError::OperationFailed {
            source: zk::Error::BadVersion,
            ..
        }) => {
            return Err(TreeError::Contention {
                what: format!("cloning from {} (its log pointer moved)", source.name),
                attempts: 1,
            });
        }
        Err(e) => {
            return Err(tree::multi_error(
                "copy log pointer",
                &[me.log_pointer()],
                e,
            ));
        }
    }
    // 3. The active set is the source's parts plus what its queue will produce; a local
    //    part nothing in it covers is history this replica missed the end of (merged or
    //    dropped elsewhere): set it aside, and out of our `parts/`, before anything can
    //    merge or serve it.
    let mut active_set: Vec<PartName> = src_parts
        .iter()
        .filter_map(|n| PartName::parse(n).ok())
        .collect();
    active_set.extend(entries.iter().filter_map(|data| {
        let entry = LogEntry::parse(std::str::from_utf8(data).ok()?).ok()?;
        PartName::parse(&entry.new_part_name()?).ok()
    }));
    detach_uncovered(replica, client, &active_set).await?;
    for chunk in entries.chunks(BATCH) {
        let mut multi = client.new_multi_writer();
        for data in chunk {
            multi
                .add_create(
                    &me.queue_entry_prefix(),
                    data,
                    &replica.zk_acl.persistent_sequential(),
                )
                .map_err(|e| TreeError::zk("create", me.queue_entry_prefix(), e))?;
        }
        multi
            .commit()
            .await
            .map_err(|e| tree::multi_error("copy queue", &[me.queue()], e))?;
    }
    info!(replica = %replica.name, source = %source.name, queued = entries.len(), "cloned replica state");
    Ok(())
}

/// Detaches every local part no part of `active_set` covers, dropping its `parts/` node.
async fn detach_uncovered(
    replica: &Replica,
    client: &zk::Client,
    active_set: &[PartName],
) -> Result<(), TreeError> {
    let me = replica.paths.replica(&replica.name);
    for part in replica.store.parts() {
        if active_set.iter().any(|a| a.contains(&part.name)) {
            continue;
        }
        // Newer than anything the source knows of in its partition (its log entry lies
        // past the copied pointer): nothing merged or dropped it, and the log brings it.
        let newest_known = active_set
            .iter()
            .filter(|a| a.partition_id == part.name.partition_id)
            .map(|a| a.max_block)
            .max();
        if newest_known.is_some_and(|max| part.name.min_block > max) {
            continue;
        }
        let name = part.name.to_string();
        match client.delete(&me.part(&name), None).await {
            Ok(()) | Err(zk::Error::NoNode) => {}
            Err(e) => return Err(TreeError::zk("delete", me.part(&name), e)),
        }
        warn!(replica = %replica.name, part = %name, "cloned replica: no part of the source covers this one; detaching it");
        if let Err(e) = replica.store.detach(&part.name, "clone") {
            warn!(replica = %replica.name, part = %name, error = %e, "cannot detach uncovered part");
        }
    }
    Ok(())
}
