//! Quorum inserts (ClickHouse's ReplicatedMergeTreeQuorumEntry and friends).
//!
//! The inserter creates `quorum/parallel/<part>` (parallel mode) or `quorum/status`
//! (sequential mode) in its commit multi, listing itself. Every replica that fetches the
//! part adds itself with a version-checked write; the one that completes the quorum
//! removes the node (sequential mode also moves `quorum/last_part`). The inserter answers
//! once the node is gone. When no active replica holds the part any more, the quorum is
//! failed: one multi rewrites and removes the node, records `failed_parts/<part>` and
//! frees the block id so the client's retry is accepted. The rewrite makes the inserter's
//! watch fire as a data change, never as a deletion, so a deletion alone means reached.

use std::collections::HashSet;
use std::time::Duration;

use tracing::{info, warn};
use zookeeper_client as zk;

use rtable_protocol::PartName;
use rtable_protocol::quorum::{LastPart, QuorumEntry};
use rtable_protocol::tree::{self, TreeError};

use crate::replica::Replica;

/// Which node tracks a part's quorum.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Mode {
    Parallel,
    Sequential,
}

pub fn node_path(replica: &Replica, mode: Mode, part: &str) -> String {
    match mode {
        Mode::Parallel => format!("{}/{part}", replica.paths.quorum_parallel()),
        Mode::Sequential => replica.paths.quorum_status(),
    }
}

pub fn failed_path(replica: &Replica, part: &str) -> String {
    format!("{}/{part}", replica.paths.quorum_failed_parts())
}

/// Active replicas right now (for the fail-fast check before a quorum insert).
pub async fn active_replicas(replica: &Replica, client: &zk::Client) -> Result<u32, TreeError> {
    let names = tree::list_replicas(client, &replica.paths).await?;
    // One round trip for all the checks: the session pipelines them.
    let checks = names.iter().map(|name| async move {
        let path = replica.paths.replica(name).is_active();
        client
            .check_stat(&path)
            .await
            .map(|stat| stat.is_some())
            .map_err(|e| TreeError::zk("exists", path, e))
    });
    let active = futures::future::try_join_all(checks).await?;
    Ok(active.into_iter().filter(|&a| a).count() as u32)
}

/// How a wait for a quorum ended.
#[derive(Debug, PartialEq, Eq)]
pub enum WaitOutcome {
    Reached,
    Failed,
    /// Timed out, or our session changed while waiting: the insert may still reach it.
    Unknown(String),
}

/// Waits until the quorum node of `part` is gone, then tells reached from failed.
pub async fn wait(replica: &Replica, mode: Mode, part: &str, timeout: Duration) -> WaitOutcome {
    let deadline = tokio::time::Instant::now() + timeout;
    let path = node_path(replica, mode, part);
    let start_generation = replica.sessions.view().generation;
    loop {
        let Ok((client, generation)) = replica.sessions.active() else {
            return WaitOutcome::Unknown(
                "the replica lost its ZooKeeper session while waiting for the quorum".into(),
            );
        };
        if generation != start_generation {
            return WaitOutcome::Unknown(
                "the replica's session changed while waiting for the quorum".into(),
            );
        }
        let pending = match client.check_and_watch_stat(&path).await {
            Ok((Some(_), watcher)) => {
                // Sequential mode shares one node: it may already track a later part.
                let ours = match mode {
                    Mode::Parallel => true,
                    Mode::Sequential => match client.get_data(&path).await {
                        Ok((data, _)) => std::str::from_utf8(&data)
                            .ok()
                            .and_then(|t| QuorumEntry::parse(t).ok())
                            .is_some_and(|e| e.part_name == part),
                        Err(_) => true,
                    },
                };
                if ours { Some(watcher) } else { None }
            }
            Ok((None, _)) => None,
            Err(e) => {
                warn!(replica = %replica.name, %part, error = %e, "cannot watch the quorum node");
                tokio::time::sleep(Duration::from_millis(200)).await;
                if tokio::time::Instant::now() >= deadline {
                    return WaitOutcome::Unknown("timed out waiting for the quorum".into());
                }
                continue;
            }
        };
        match pending {
            None => {
                return match client.check_stat(&failed_path(replica, part)).await {
                    Ok(Some(_)) => WaitOutcome::Failed,
                    Ok(None) => WaitOutcome::Reached,
                    Err(e) => WaitOutcome::Unknown(format!("cannot read the quorum outcome: {e}")),
                };
            }
            Some(watcher) => {
                tokio::select! {
                    event = watcher.changed() => {
                        // Only a completed quorum deletes the node outright: a failure
                        // rewrites it in the same multi first, which fires this watch
                        // as a data change, so the loop reads the outcome then.
                        if event.event_type == zk::EventType::NodeDeleted {
                            return WaitOutcome::Reached;
                        }
                    }
                    _ = tokio::time::sleep_until(deadline) => {
                        return WaitOutcome::Unknown(format!(
                            "the quorum was not reached within {} s (insert_quorum_timeout)",
                            timeout.as_secs()
                        ));
                    }
                }
            }
        }
    }
}

/// Waits for the quorum of a part an earlier attempt of this insert committed (a retry
/// answered as duplicate). The retry may only be acknowledged once that part is really on
/// `required` replicas: the first attempt's part may still be waiting for its quorum, have
/// failed it, or never have had one (the first attempt asked for no quorum).
pub async fn wait_existing(
    replica: &Replica,
    mode: Mode,
    part: &str,
    required: u32,
    timeout: Duration,
) -> WaitOutcome {
    match wait(replica, mode, part, timeout).await {
        WaitOutcome::Reached => {}
        other => return other,
    }
    let Ok((client, _)) = replica.sessions.active() else {
        return WaitOutcome::Unknown(
            "the replica lost its ZooKeeper session while checking the quorum".into(),
        );
    };
    let Ok(name) = PartName::parse(part) else {
        return WaitOutcome::Unknown(format!("unparsable part name {part}"));
    };
    match holders(replica, &client, &name).await {
        Ok(n) if n >= required => WaitOutcome::Reached,
        Ok(n) => WaitOutcome::Unknown(format!(
            "the first attempt's part {part} is on {n} of the {required} replicas insert_quorum needs; retry later"
        )),
        Err(e) => WaitOutcome::Unknown(format!("cannot count the replicas holding {part}: {e}")),
    }
}

/// Parts whose quorum is still being collected (parallel nodes and `quorum/status`).
pub async fn parts_in_progress(
    replica: &Replica,
    client: &zk::Client,
) -> Result<HashSet<String>, TreeError> {
    let parallel = replica.paths.quorum_parallel();
    let mut parts: HashSet<String> = match client.list_children(&parallel).await {
        Ok(c) => c.into_iter().collect(),
        Err(zk::Error::NoNode) => HashSet::new(),
        Err(e) => return Err(TreeError::zk("list", parallel, e)),
    };
    let status = replica.paths.quorum_status();
    match client.get_data(&status).await {
        Ok((data, _)) => {
            if let Some(entry) = std::str::from_utf8(&data)
                .ok()
                .and_then(|t| QuorumEntry::parse(t).ok())
            {
                parts.insert(entry.part_name);
            }
        }
        Err(zk::Error::NoNode) => {}
        Err(e) => return Err(TreeError::zk("get", status, e)),
    }
    Ok(parts)
}

/// Replicas whose `parts` list `part` or a part covering it.
async fn holder_names(
    replica: &Replica,
    client: &zk::Client,
    part: &PartName,
) -> Result<Vec<String>, TreeError> {
    let mut holders = Vec::new();
    for name in tree::list_replicas(client, &replica.paths).await? {
        let parts_path = replica.paths.replica(&name).parts();
        let children = match client.list_children(&parts_path).await {
            Ok(c) => c,
            Err(zk::Error::NoNode) => continue,
            Err(e) => return Err(TreeError::zk("list", parts_path, e)),
        };
        if children
            .iter()
            .filter_map(|c| PartName::parse(c).ok())
            .any(|c| c.contains(part))
        {
            holders.push(name);
        }
    }
    Ok(holders)
}

/// How many replicas list `part` or a part covering it.
pub async fn holders(
    replica: &Replica,
    client: &zk::Client,
    part: &PartName,
) -> Result<u32, TreeError> {
    Ok(holder_names(replica, client, part).await?.len() as u32)
}

/// Adds this replica to the quorum of `part` (and, for a merged part, of every part it
/// covers), completing it when the count is reached.
pub async fn acknowledge(
    replica: &Replica,
    client: &zk::Client,
    part: &PartName,
) -> Result<(), TreeError> {
    let name = part.to_string();
    // Quorum nodes name inserted parts (level 0) only; a merged part can only stand in
    // for the parallel quorums of parts it covers. Skipping the two reads that cannot
    // match saves six ZooKeeper requests per merge on three replicas.
    if part.level == 0 {
        // An insert uses one of the two nodes; reading both at once costs one round trip.
        tokio::try_join!(
            add_self(replica, client, Mode::Parallel, &name),
            add_self(replica, client, Mode::Sequential, &name),
        )?;
    } else {
        // A parallel quorum node exists only while its insert's GET (with a quorum) is in
        // the log, and this replica queues that entry before any merge covering the part.
        // Once the directory was seen empty with no quorum entry queued since, listing it
        // again for every merge would cost each replica a request per merge for nothing.
        let seen = {
            let q = replica.queue.lock();
            if q.parallel_quorums_known_clear() {
                return Ok(());
            }
            q.quorum_entries_seen()
        };
        let parallel = replica.paths.quorum_parallel();
        let children = client
            .list_children(&parallel)
            .await
            .map_err(|e| TreeError::zk("list", parallel.clone(), e))?;
        if children.is_empty() {
            replica.queue.lock().mark_parallel_quorums_clear(seen);
        }
        for child in children {
            if let Ok(covered) = PartName::parse(&child)
                && covered != *part
                && part.contains(&covered)
            {
                add_self(replica, client, Mode::Parallel, &child).await?;
            }
        }
    }
    Ok(())
}

async fn add_self(
    replica: &Replica,
    client: &zk::Client,
    mode: Mode,
    part: &str,
) -> Result<(), TreeError> {
    for _ in 0..20 {
        let Some(ack) = prepare_one(replica, client, mode, part).await? else {
            return Ok(());
        };
        let mut multi = client.new_multi_writer();
        ack.add_to(&mut multi)?;
        match multi.commit().await {
            Ok(_) => {
                ack.log_done(replica);
                return Ok(());
            }
            Err(zk::MultiWriteError::OperationFailed {
                source: zk::Error::BadVersion | zk::Error::NoNode,
                ..
            }) => continue,
            Err(e) => return Err(tree::multi_error("update quorum", &[ack.path], e)),
        }
    }
    Err(TreeError::Contention {
        what: format!("quorum node of {part}"),
        attempts: 20,
    })
}

/// This replica's acknowledgement of an inserted part's quorum, read ahead so that its
/// write can join the multi that records the part (see `queue::executor`): the part is
/// then recorded and counted in one step, two round trips sooner when the read overlaps
/// the part's download. Should the node change in between, the versioned write fails the
/// multi and the caller records the part and then acknowledges as usual.
#[derive(Debug)]
pub struct PendingAck {
    part: String,
    path: String,
    version: i32,
    write: AckWrite,
}

#[derive(Debug)]
enum AckWrite {
    /// Counts this replica; the quorum needs more.
    Count(String),
    /// This replica completes the quorum: the node goes, and in sequential mode
    /// `quorum/last_part` (path, new text, version read) moves to the part.
    Complete(Option<(String, String, i32)>),
}

impl PendingAck {
    /// Adds the version-checked quorum write to `multi`.
    pub fn add_to(&self, multi: &mut zk::MultiWriter<'_>) -> Result<(), TreeError> {
        match &self.write {
            AckWrite::Count(entry) => multi
                .add_set_data(&self.path, entry.as_bytes(), Some(self.version))
                .map_err(|e| TreeError::zk("set", self.path.clone(), e)),
            AckWrite::Complete(last) => {
                multi
                    .add_delete(&self.path, Some(self.version))
                    .map_err(|e| TreeError::zk("delete", self.path.clone(), e))?;
                if let Some((lp_path, text, version)) = last {
                    multi
                        .add_set_data(lp_path, text.as_bytes(), Some(*version))
                        .map_err(|e| TreeError::zk("set", lp_path.clone(), e))?;
                }
                Ok(())
            }
        }
    }

    /// An acknowledgement that counts this replica toward `part`'s parallel quorum.
    #[cfg(test)]
    pub fn counting(part: &str) -> PendingAck {
        PendingAck {
            part: part.to_string(),
            path: format!("/t/quorum/parallel/{part}"),
            version: 0,
            write: AckWrite::Count(String::new()),
        }
    }

    /// Logs a completed quorum once the write committed.
    pub fn log_done(&self, replica: &Replica) {
        if matches!(self.write, AckWrite::Complete(_)) {
            info!(replica = %replica.name, part = %self.part, "quorum reached");
        }
    }
}

/// The write that would add this replica to the quorum of inserted part `part`, if a
/// quorum node for it exists and does not count this replica yet. Merged parts have no
/// quorum node of their own: use [`acknowledge`] for them.
pub async fn prepare_ack(
    replica: &Replica,
    client: &zk::Client,
    part: &PartName,
) -> Result<Option<PendingAck>, TreeError> {
    if part.level != 0 {
        return Ok(None);
    }
    let name = part.to_string();
    // An insert uses one of the two nodes; reading both at once costs one round trip.
    let (parallel, sequential) = tokio::try_join!(
        prepare_one(replica, client, Mode::Parallel, &name),
        prepare_one(replica, client, Mode::Sequential, &name),
    )?;
    Ok(parallel.or(sequential))
}

async fn prepare_one(
    replica: &Replica,
    client: &zk::Client,
    mode: Mode,
    part: &str,
) -> Result<Option<PendingAck>, TreeError> {
    let path = node_path(replica, mode, part);
    let (data, stat) = match client.get_data(&path).await {
        Ok(x) => x,
        Err(zk::Error::NoNode) => return Ok(None),
        Err(e) => return Err(TreeError::zk("get", path, e)),
    };
    let Some(mut entry) = std::str::from_utf8(&data)
        .ok()
        .and_then(|t| QuorumEntry::parse(t).ok())
    else {
        return Err(TreeError::Corrupt {
            path,
            message: "unreadable quorum entry".into(),
        });
    };
    // Sequential mode shares one node, which may track another part by now.
    if entry.part_name != part || entry.replicas.contains(&replica.name) {
        return Ok(None);
    }
    entry.replicas.insert(replica.name.clone());
    let write = if !entry.is_reached() {
        AckWrite::Count(entry.render())
    } else if mode == Mode::Sequential {
        let lp_path = replica.paths.quorum_last_part();
        let (lp_data, lp_stat) = client
            .get_data(&lp_path)
            .await
            .map_err(|e| TreeError::zk("get", lp_path.clone(), e))?;
        // An unreadable node is reported, never replaced: rewriting it from an empty default
        // would forget every other partition's newest quorum part, and with it what
        // sequentially consistent reads may show.
        let text = std::str::from_utf8(&lp_data).map_err(|_| TreeError::Corrupt {
            path: lp_path.clone(),
            message: "not UTF-8 text; fix or remove the node by hand".into(),
        })?;
        let mut last = LastPart::parse(text).map_err(|e| TreeError::Corrupt {
            path: lp_path.clone(),
            message: format!("{e}; fix or remove the node by hand"),
        })?;
        let name = PartName::parse(part).map_err(|e| TreeError::Corrupt {
            path: path.clone(),
            message: format!("quorum entry for an unparseable part `{part}`: {e}"),
        })?;
        last.parts
            .insert(name.partition_id.clone(), part.to_string());
        AckWrite::Complete(Some((lp_path, last.render(), lp_stat.version)))
    } else {
        AckWrite::Complete(None)
    };
    Ok(Some(PendingAck {
        part: part.to_string(),
        path,
        version: stat.version,
        write,
    }))
}

/// Fails the quorum of a part no active replica holds: one multi removes the quorum node,
/// records the failure and frees the block id. Returns whether this call failed it.
pub async fn fail(
    replica: &Replica,
    client: &zk::Client,
    part_name: &PartName,
    block_id: &str,
) -> Result<bool, TreeError> {
    let part_string = part_name.to_string();
    let part = part_string.as_str();
    for mode in [Mode::Parallel, Mode::Sequential] {
        let path = node_path(replica, mode, part);
        let (data, stat) = match client.get_data(&path).await {
            Ok(x) => x,
            Err(zk::Error::NoNode) => continue,
            Err(e) => return Err(TreeError::zk("get", path, e)),
        };
        let ours = std::str::from_utf8(&data)
            .ok()
            .and_then(|t| QuorumEntry::parse(t).ok())
            .is_some_and(|e| e.part_name == part);
        if !ours {
            continue;
        }
        let mut multi = client.new_multi_writer();
        // The rewrite tells an inserter waiting on the node a failure from a completion
        // (see `wait`) without a read of `failed_parts`.
        multi
            .add_set_data(&path, &data, Some(stat.version))
            .map_err(|e| TreeError::zk("set", path.clone(), e))?;
        multi
            .add_delete(&path, None)
            .map_err(|e| TreeError::zk("delete", path.clone(), e))?;
        multi
            .add_create(
                &failed_path(replica, part),
                b"",
                &replica.zk_acl.persistent(),
            )
            .map_err(|e| TreeError::zk("create", failed_path(replica, part), e))?;
        // Atomic with the failure: every replica holding the part is still inactive. A
        // create and delete of its `is_active` in the same multi fails if the node exists,
        // so a holder that came back meanwhile voids the failure (its part is fetched
        // instead), and one that comes back later finds `failed_parts` and detaches it.
        for holder in holder_names(replica, client, part_name).await? {
            let active = replica.paths.replica(&holder).is_active();
            multi
                .add_create(&active, b"", &replica.zk_acl.persistent())
                .map_err(|e| TreeError::zk("create", active.clone(), e))?;
            multi
                .add_delete(&active, None)
                .map_err(|e| TreeError::zk("delete", active.clone(), e))?;
        }
        let block = replica.paths.block(block_id);
        let block_exists = !block_id.is_empty()
            && client
                .check_stat(&block)
                .await
                .map_err(|e| TreeError::zk("exists", block.clone(), e))?
                .is_some();
        if block_exists {
            multi
                .add_delete(&block, None)
                .map_err(|e| TreeError::zk("delete", block.clone(), e))?;
        }
        return match multi.commit().await {
            Ok(_) => {
                warn!(replica = %replica.name, %part, "quorum failed: no active replica has the part");
                Ok(true)
            }
            Err(zk::MultiWriteError::OperationFailed { .. }) => Ok(false),
            Err(e) => Err(tree::multi_error("fail quorum", &[path], e)),
        };
    }
    Ok(false)
}

/// `quorum/last_part`: per partition, the newest part that reached its quorum.
pub async fn last_parts(replica: &Replica, client: &zk::Client) -> Result<LastPart, TreeError> {
    let path = replica.paths.quorum_last_part();
    let text = tree::get_string(client, &path).await?.unwrap_or_default();
    LastPart::parse(&text).map_err(|e| TreeError::Corrupt {
        path,
        message: e.to_string(),
    })
}

/// Parts listed in `quorum/failed_parts`.
pub async fn failed_parts(
    replica: &Replica,
    client: &zk::Client,
) -> Result<Vec<String>, TreeError> {
    let path = replica.paths.quorum_failed_parts();
    match client.list_children(&path).await {
        Ok(c) => Ok(c),
        Err(zk::Error::NoNode) => Ok(Vec::new()),
        Err(e) => Err(TreeError::zk("list", path, e)),
    }
}
