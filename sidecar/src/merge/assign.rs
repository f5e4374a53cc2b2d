//! Merge assignment. Every replica may lead (ClickHouse >= 21.12): each looks at the parts
//! it holds, picks a merge with the policy, and publishes MERGE_PARTS with a version check
//! on `log`, so when two replicas choose at once only one entry lands. Checks run on local
//! state first; ZooKeeper is touched only when there is something to merge, so an idle
//! table costs the ensemble nothing.

use std::collections::{BTreeMap, HashSet};
use std::sync::Arc;
use std::time::Duration;

use tracing::{debug, info, warn};
use zookeeper_client as zk;

use rtable_protocol::paths::sequence_of;
use rtable_protocol::tree::{self, TreeError};
use rtable_protocol::{LogEntry, PartName};

use crate::merge::policy::{self, Candidate, MergePolicy};
use crate::replica::Replica;
use crate::store::Snapshot;

/// Cap on merges this replica keeps in flight in the queue (ClickHouse limits merges too).
const MAX_QUEUED_MERGES: usize = 4;

pub async fn run(replica: Arc<Replica>) {
    let policy = replica.merge_policy.clone();
    let stagger = stagger(&replica.name);
    loop {
        tokio::select! {
            _ = replica.merge_notify.notified() => {}
            _ = tokio::time::sleep(Duration::from_secs(5)) => {}
        }
        // Every replica sees the same parts at about the same time. Staggering the leaders
        // lets the first one publish and the others find its entry in their queue (a
        // local check) instead of all paying the ZooKeeper reads and losing the version
        // check; it also batches a burst of inserts into one look.
        tokio::time::sleep(stagger).await;
        let Ok((client, _)) = replica.sessions.active() else {
            continue;
        };
        match assign_once(&replica, &client, &policy).await {
            Ok(Some(part)) => debug!(replica = %replica.name, %part, "assigned merge"),
            Ok(None) => {}
            Err(e) => warn!(replica = %replica.name, error = %e, "merge assignment failed"),
        }
    }
}

/// 50 ms plus 0-3 steps of 200 ms, fixed per replica name.
fn stagger(name: &str) -> Duration {
    let step = name
        .bytes()
        .fold(0u64, |h, b| h.wrapping_mul(31).wrapping_add(b as u64))
        % 4;
    Duration::from_millis(50 + 200 * step)
}

/// Parts currently produced or consumed by queued entries: not mergeable now.
fn busy_parts(replica: &Replica) -> (HashSet<String>, usize) {
    let q = replica.queue.lock();
    let mut busy = HashSet::new();
    let mut merges = 0;
    for item in q.items() {
        if let Some(p) = item.entry.new_part_name() {
            busy.insert(p);
        }
        if let rtable_protocol::LogEntryKind::Drop { range } = &item.entry.kind
            && let Ok(range) = PartName::parse(range)
        {
            for part in replica.store.parts() {
                if range.contains(&part.name) {
                    busy.insert(part.name.to_string());
                }
            }
        }
        let sources = item.entry.source_parts();
        if !sources.is_empty() {
            merges += 1;
        }
        busy.extend(sources);
    }
    (busy, merges)
}

pub async fn assign_once(
    replica: &Replica,
    client: &zk::Client,
    policy: &MergePolicy,
) -> Result<Option<String>, TreeError> {
    // Cheap local pre-check: is there anything worth a look at all?
    if !has_candidate(replica, policy, &[]) {
        return Ok(None);
    }
    // Order matters. A merge must not span a block number whose part may still appear,
    // so for every gap between two chosen parts: the chosen parts are taken from a
    // snapshot BEFORE the block-number locks are read. A block number below a chosen part
    // was allocated before that part, hence before the lock read; at the lock read it is
    // either still locked (a barrier), or given up (never a part), or committed, and then
    // the log pulled AFTER the lock read names it (queued, or already held here, or, for
    // this replica's own insert, staged here awaiting activation: all barriers below).
    // Reading the locks first would miss a block allocated after the read whose part is
    // still committing while a later-allocated neighbour already is in the snapshot
    // (concurrent group commits, inserts on several replicas).
    // The log version comes first of all, so a merge another leader publishes meanwhile
    // voids ours.
    let (_, log_stat) = client
        .get_data(&replica.paths.log())
        .await
        .map_err(|e| TreeError::zk("get", replica.paths.log(), e))?;
    let snapshot = replica.store.snapshot();
    let mut locked: BTreeMap<String, Vec<u64>> = BTreeMap::new();
    for partition in partitions(&snapshot) {
        let locks_path = replica.paths.block_numbers_partition(&partition);
        let numbers = match client.list_children(&locks_path).await {
            Ok(children) => children.iter().filter_map(|c| sequence_of(c)).collect(),
            Err(zk::Error::NoNode) => Vec::new(),
            Err(e) => return Err(TreeError::zk("list", locks_path, e)),
        };
        locked.insert(partition, numbers);
    }
    crate::queue::pull::pull_all(replica, client).await?;
    let (busy, queued_merges, mut known) = queue_view(replica);
    if queued_merges >= MAX_QUEUED_MERGES {
        return Ok(None);
    }
    // This replica's own committed inserts still staged (committed, not yet renamed into
    // place) are known parts too: the pull skips their GETs as held, and their locks went
    // with their commits. Listed before the store is looked at again, so a part activated
    // in between is in that second look.
    known.extend(
        replica
            .store
            .staged_names()
            .iter()
            .filter_map(|n| PartName::parse(n).ok()),
    );
    // Parts that became visible here after the snapshot (committed or fetched since,
    // their GETs skipped by the pull as already held) are known parts too.
    let chosen_from: HashSet<&PartName> = snapshot.parts().iter().map(|p| &p.name).collect();
    known.extend(
        replica
            .store
            .snapshot()
            .parts()
            .iter()
            .map(|p| p.name.clone())
            .filter(|n| !chosen_from.contains(n)),
    );
    let mut by_partition = candidates(&snapshot, &busy);
    // The snapshot may predate a drop this replica ran since: parts a drop range covers
    // (queued or executed) or that left the store are not merged into a part that every
    // replica would then have to skip.
    {
        let queue = replica.queue.lock();
        for parts in by_partition.values_mut() {
            for c in parts.iter_mut() {
                if queue.dropped_by(&c.name).is_some() || !replica.store.contains(&c.name) {
                    c.busy = true;
                }
            }
        }
    }
    // A part the queue will produce (a fetch of a merged part, say after a clone) that
    // overlaps a local part makes that part unmergeable: a merge of it would publish a
    // range intersecting the coming one, and no replica could ever hold both.
    for parts in by_partition.values_mut() {
        for c in parts.iter_mut() {
            if known
                .iter()
                .any(|k| *k != c.name && !k.is_disjoint(&c.name))
            {
                c.busy = true;
            }
        }
    }
    // Read after the snapshot: a part in it was committed together with its quorum node,
    // so a quorum still in progress shows here. Such a part may yet fail its quorum and be
    // inserted again by the client's retry; merged, it would come back as a duplicate.
    let in_quorum = crate::quorum::parts_in_progress(replica, client).await?;
    for parts in by_partition.values_mut() {
        for c in parts.iter_mut() {
            if in_quorum.contains(&c.name.to_string()) {
                c.busy = true;
            }
        }
    }
    for (partition, parts) in by_partition {
        if parts.iter().filter(|c| !c.busy).count() < policy.min_parts {
            continue;
        }
        let mut barriers: Vec<(u64, u64)> = locked
            .get(&partition)
            .map(|v| v.iter().map(|n| (*n, *n)).collect())
            .unwrap_or_default();
        barriers.extend(
            known
                .iter()
                .filter(|p| p.partition_id == partition && !parts.iter().any(|c| c.name == **p))
                .map(|p| (p.min_block, p.max_block)),
        );
        let Some(sources) = policy::select(policy, &parts, &barriers) else {
            continue;
        };
        let Some(into) = policy::merged_name(&sources) else {
            continue;
        };
        let entry = LogEntry::merge(
            &replica.name,
            sources.iter().map(PartName::to_string).collect(),
            &into.to_string(),
            chrono::Utc::now().timestamp(),
        );
        let mut multi = client.new_multi_writer();
        multi
            .add_create(
                &replica.paths.log_entry_prefix(),
                entry.render().as_bytes(),
                &replica.zk_acl.persistent_sequential(),
            )
            .map_err(|e| TreeError::zk("create", replica.paths.log_entry_prefix(), e))?;
        multi
            .add_set_data(&replica.paths.log(), b"", Some(log_stat.version))
            .map_err(|e| TreeError::zk("set", replica.paths.log(), e))?;
        match multi.commit().await {
            Ok(_) => {
                info!(replica = %replica.name, part = %into, sources = sources.len(), "published merge");
                replica.pull_notify.notify_one();
                return Ok(Some(into.to_string()));
            }
            // Another leader assigned something first; its entry reaches us through the log.
            Err(zk::MultiWriteError::OperationFailed {
                source: zk::Error::BadVersion,
                ..
            }) => return Ok(None),
            Err(e) => return Err(tree::multi_error("assign merge", &[replica.paths.log()], e)),
        }
    }
    Ok(None)
}

/// Busy part names, the number of queued merges, and every part the queue will produce.
fn queue_view(replica: &Replica) -> (HashSet<String>, usize, Vec<PartName>) {
    let (busy, merges) = busy_parts(replica);
    let known = replica
        .queue
        .lock()
        .items()
        .filter_map(|i| i.entry.new_part_name())
        .filter_map(|n| PartName::parse(&n).ok())
        .collect();
    (busy, merges, known)
}

fn partitions(snapshot: &Snapshot) -> Vec<String> {
    let mut ids: Vec<String> = snapshot
        .parts()
        .iter()
        .map(|p| p.name.partition_id.clone())
        .collect();
    ids.dedup();
    ids
}

fn candidates(snapshot: &Snapshot, busy: &HashSet<String>) -> BTreeMap<String, Vec<Candidate>> {
    let mut by_partition: BTreeMap<String, Vec<Candidate>> = BTreeMap::new();
    for part in snapshot.parts() {
        by_partition
            .entry(part.name.partition_id.clone())
            .or_default()
            .push(Candidate {
                busy: busy.contains(&part.name.to_string()),
                name: part.name.clone(),
                bytes: part.bytes,
            });
    }
    by_partition
}

fn has_candidate(replica: &Replica, policy: &MergePolicy, barriers: &[(u64, u64)]) -> bool {
    let (busy, merges) = busy_parts(replica);
    merges < MAX_QUEUED_MERGES
        && candidates(&replica.store.snapshot(), &busy)
            .values()
            .any(|parts| policy::select(policy, parts, barriers).is_some())
}
