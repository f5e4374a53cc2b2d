//! Log and block cleanup (ClickHouse's ReplicatedMergeTreeCleanupThread). Every replica
//! may lead, so every replica runs it; concurrent cleaners only ever delete the same
//! nodes, and each batch is checked against the `replicas` version so a replica that
//! registers meanwhile is never left with a pointer into deleted entries.
//!
//! - Log: keep at least `min_logs_to_keep` entries and everything at or after the
//!   smallest `log_pointer` of the replicas that still count. An inactive replica more
//!   than `max_logs_to_keep` entries behind stops counting: it is marked `is_lost=1`
//!   (multi with a `host` version check, never every replica) and will clone on return.
//!   A half-removed replica (no `host`) never blocks cleanup.
//! - Blocks: dedup ids beyond the newest `dedup_window`, or older than
//!   `dedup_window_seconds` before the newest block, are removed.

use std::sync::Arc;
use std::time::Duration;

use rand::Rng;
use tracing::{debug, info, warn};
use zookeeper_client as zk;

use rtable_protocol::PartName;
use rtable_protocol::paths::{log_node_name, sequence_of};
use rtable_protocol::tree::{self, TreeError};

use crate::metrics::Metrics;
use crate::replica::Replica;

const BATCH: usize = 100;

pub async fn run(replica: Arc<Replica>) {
    let period = Duration::from_secs(replica.cfg.cleanup_period_seconds.max(1));
    let mut pass: u64 = 0;
    loop {
        let jitter = rand::rng().random_range(0..=period.as_millis() as u64 / 2);
        tokio::time::sleep(period + Duration::from_millis(jitter)).await;
        // Files of replaced parts go once the last reader let go of them.
        let store = replica.store.clone();
        if let Ok(Err(e)) = tokio::task::spawn_blocking(move || store.collect_garbage()).await {
            warn!(replica = %replica.name, error = %e, "removing replaced parts failed");
        }
        let Ok((client, _)) = replica.sessions.active() else {
            continue;
        };
        pass += 1;
        if let Err(e) = clean_log(&replica, &client).await {
            warn!(replica = %replica.name, error = %e, "log cleanup failed");
        }
        // Ages need every block's ctime: look at them one pass in ten, counts every pass.
        if let Err(e) = clean_blocks(&replica, &client, pass % 10 == 1).await {
            warn!(replica = %replica.name, error = %e, "block cleanup failed");
        }
        if let Err(e) = clean_covered_parts(&replica, &client).await {
            warn!(replica = %replica.name, error = %e, "covered part cleanup failed");
        }
        Metrics::inc(&replica.metrics.cleanup_runs);
    }
}

/// Parts `replicas/<me>/parts/` still lists although a wider local part, itself recorded,
/// covers them: left by a fetch or merge cut short between recording one part and
/// retiring another. ZooKeeper forgets them first, then the disk (ClickHouse's cleanup of
/// outdated parts). Returns how many went.
pub async fn clean_covered_parts(
    replica: &Replica,
    client: &zk::Client,
) -> Result<usize, TreeError> {
    let rp = replica.paths.replica(&replica.name);
    let listed: std::collections::HashSet<String> = client
        .list_children(&rp.parts())
        .await
        .map_err(|e| TreeError::zk("list", rp.parts(), e))?
        .into_iter()
        .collect();
    let mut removed = 0;
    for name in &listed {
        let Ok(part) = PartName::parse(name) else {
            continue;
        };
        let Some(cover) = replica.store.covering(&part) else {
            continue;
        };
        // An unrecorded cover (a fetch not yet recorded) would leave the rows in no list.
        if cover == part || !listed.contains(&cover.to_string()) {
            continue;
        }
        match client.delete(&rp.part(name), None).await {
            Ok(()) | Err(zk::Error::NoNode) => {}
            Err(e) => return Err(TreeError::zk("delete", rp.part(name), e)),
        }
        if replica.store.contains(&part) {
            replica.store.retire_covered(&part);
        }
        info!(replica = %replica.name, part = %name, covered_by = %cover, "forgot a covered part");
        removed += 1;
    }
    Ok(removed)
}

/// One replica as log cleanup sees it.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct PointerInfo {
    pub name: String,
    pub active: bool,
    pub lost: bool,
    /// `None` for a half-removed replica (no `host` node).
    pub host_version: Option<i32>,
    pub log_pointer: Option<u64>,
}

/// What to do with the log, decided from the tree's state (pure).
#[derive(Debug, Clone, PartialEq, Eq, Default)]
pub struct LogPlan {
    /// Delete every entry with an index below this.
    pub delete_below: u64,
    /// Inactive replicas to mark lost.
    pub mark_lost: Vec<String>,
}

pub fn plan_log_cleanup(
    entries: &[u64],
    replicas: &[PointerInfo],
    min_keep: u64,
    max_keep: u64,
) -> LogPlan {
    let mut plan = LogPlan::default();
    let count = entries.len() as u64;
    if count <= min_keep {
        return plan;
    }
    // Entry index below which a replica is "too far behind" (ClickHouse's threshold).
    let threshold = if count > max_keep {
        entries[(count - max_keep) as usize]
    } else {
        0
    };
    // A lost replica that is active again is recovering (cloning a peer, then pulling the
    // log from the pointer it copied): it still needs those entries, as in ClickHouse's
    // cleanup. Only a lost replica that is not running is left out.
    let counted: Vec<&PointerInfo> = replicas
        .iter()
        .filter(|r| (!r.lost || r.active) && r.host_version.is_some())
        .collect();
    let mut min_pointer = u64::MAX;
    for r in &counted {
        let pointer = r.log_pointer.unwrap_or(0);
        if !r.active && pointer < threshold {
            plan.mark_lost.push(r.name.clone());
            continue;
        }
        min_pointer = min_pointer.min(pointer);
    }
    // Never mark every replica lost: keep the most advanced one counting.
    if !counted.is_empty() && plan.mark_lost.len() == counted.len() {
        let keep = counted
            .iter()
            .max_by_key(|r| r.log_pointer.unwrap_or(0))
            .map(|r| r.name.clone())
            .unwrap_or_default();
        plan.mark_lost.retain(|n| n != &keep);
        min_pointer = counted
            .iter()
            .filter(|r| r.name == keep)
            .map(|r| r.log_pointer.unwrap_or(0))
            .min()
            .unwrap_or(0);
    }
    let keep_from = entries[(count - min_keep) as usize];
    plan.delete_below = keep_from.min(min_pointer);
    plan
}

async fn read_pointers(
    replica: &Replica,
    client: &zk::Client,
) -> Result<(Vec<PointerInfo>, i32), TreeError> {
    let (_, replicas_stat) = client
        .get_data(&replica.paths.replicas())
        .await
        .map_err(|e| TreeError::zk("get", replica.paths.replicas(), e))?;
    let mut out = Vec::new();
    for name in tree::list_replicas(client, &replica.paths).await? {
        let rp = replica.paths.replica(&name);
        let host_version = client
            .check_stat(&rp.host())
            .await
            .map_err(|e| TreeError::zk("exists", rp.host(), e))?
            .map(|s| s.version);
        let active = client
            .check_stat(&rp.is_active())
            .await
            .map_err(|e| TreeError::zk("exists", rp.is_active(), e))?
            .is_some();
        let lost = tree::get_string(client, &rp.is_lost()).await?.as_deref() == Some("1");
        let log_pointer = tree::get_string(client, &rp.log_pointer())
            .await?
            .and_then(|s| s.trim().parse().ok());
        out.push(PointerInfo {
            name,
            active,
            lost,
            host_version,
            log_pointer,
        });
    }
    Ok((out, replicas_stat.version))
}

pub async fn clean_log(replica: &Replica, client: &zk::Client) -> Result<(), TreeError> {
    let log = replica.paths.log();
    let mut entries: Vec<u64> = client
        .list_children(&log)
        .await
        .map_err(|e| TreeError::zk("list", log.clone(), e))?
        .iter()
        .filter_map(|c| sequence_of(c))
        .collect();
    if entries.len() as u64 <= replica.cfg.min_logs_to_keep {
        return Ok(());
    }
    entries.sort_unstable();
    let (pointers, replicas_version) = read_pointers(replica, client).await?;
    let plan = plan_log_cleanup(
        &entries,
        &pointers,
        replica.cfg.min_logs_to_keep,
        replica.cfg.max_logs_to_keep,
    );
    for name in &plan.mark_lost {
        let Some(info) = pointers.iter().find(|p| &p.name == name) else {
            continue;
        };
        let Some(host_version) = info.host_version else {
            continue;
        };
        let rp = replica.paths.replica(name);
        let mut multi = client.new_multi_writer();
        multi
            .add_check_version(&rp.host(), host_version)
            .map_err(|e| TreeError::zk("check", rp.host(), e))?;
        multi
            .add_set_data(&rp.is_lost(), b"1", None)
            .map_err(|e| TreeError::zk("set", rp.is_lost(), e))?;
        match multi.commit().await {
            Ok(_) => {
                info!(replica = %replica.name, lost = %name, "marked an inactive replica lost: it fell behind the log");
                Metrics::inc(&replica.metrics.replicas_marked_lost);
            }
            // It came back (host rewritten) or went away: leave it for the next pass.
            Err(zk::MultiWriteError::OperationFailed { .. }) => return Ok(()),
            Err(e) => return Err(tree::multi_error("mark replica lost", &[rp.is_lost()], e)),
        }
    }
    let doomed: Vec<u64> = entries
        .into_iter()
        .filter(|i| *i < plan.delete_below)
        .collect();
    for chunk in doomed.chunks(BATCH) {
        let mut multi = client.new_multi_writer();
        multi
            .add_check_version(&replica.paths.replicas(), replicas_version)
            .map_err(|e| TreeError::zk("check", replica.paths.replicas(), e))?;
        for index in chunk {
            let path = replica.paths.log_entry(&log_node_name(*index));
            multi
                .add_delete(&path, None)
                .map_err(|e| TreeError::zk("delete", path.clone(), e))?;
        }
        match multi.commit().await {
            Ok(_) => {}
            // Another cleaner got there first, or a replica registered: next pass.
            Err(zk::MultiWriteError::OperationFailed { .. }) => return Ok(()),
            Err(e) => return Err(tree::multi_error("clean log", &[log], e)),
        }
    }
    if !doomed.is_empty() {
        debug!(replica = %replica.name, removed = doomed.len(), "cleaned log");
    }
    Ok(())
}

/// Which blocks to delete, given (name, ctime ms) pairs (pure).
pub fn plan_block_cleanup(
    mut blocks: Vec<(String, i64)>,
    window: usize,
    window_seconds: u64,
) -> Vec<String> {
    blocks.sort_by(|a, b| b.1.cmp(&a.1).then_with(|| b.0.cmp(&a.0)));
    let newest = blocks.first().map(|b| b.1).unwrap_or(0);
    let oldest_allowed = newest - (window_seconds as i64) * 1000;
    blocks
        .into_iter()
        .enumerate()
        .filter(|(i, (_, ctime))| *i >= window || *ctime < oldest_allowed)
        .map(|(_, (name, _))| name)
        .collect()
}

pub async fn clean_blocks(
    replica: &Replica,
    client: &zk::Client,
    check_ages: bool,
) -> Result<(), TreeError> {
    let path = replica.paths.blocks();
    let Some(stat) = client
        .check_stat(&path)
        .await
        .map_err(|e| TreeError::zk("exists", path.clone(), e))?
    else {
        return Ok(());
    };
    let dedup_window = replica.settings().dedup_window;
    if !check_ages && (stat.num_children.max(0) as usize) <= dedup_window {
        return Ok(());
    }
    let names = client
        .list_children(&path)
        .await
        .map_err(|e| TreeError::zk("list", path.clone(), e))?;
    let mut blocks = Vec::with_capacity(names.len());
    for chunk in names.chunks(BATCH) {
        let mut reader = client.new_multi_reader();
        for name in chunk {
            reader
                .add_get_data(&replica.paths.block(name))
                .map_err(|e| TreeError::zk("get", replica.paths.block(name), e))?;
        }
        let results = reader
            .commit()
            .await
            .map_err(|e| TreeError::zk("multi-get", path.clone(), e))?;
        for (name, r) in chunk.iter().zip(results) {
            if let zk::MultiReadResult::Data { stat, .. } = r {
                blocks.push((name.clone(), stat.ctime));
            }
        }
    }
    let doomed = plan_block_cleanup(blocks, dedup_window, replica.cfg.dedup_window_seconds);
    // A hundred deletions per request; a batch another replica's cleanup got into first
    // fails as a whole (multi is atomic) and is deleted one by one instead.
    for chunk in doomed.chunks(BATCH) {
        let mut multi = client.new_multi_writer();
        for name in chunk {
            let path = replica.paths.block(name);
            multi
                .add_delete(&path, None)
                .map_err(|e| TreeError::zk("delete", path.clone(), e))?;
        }
        match multi.commit().await {
            Ok(_) => continue,
            Err(zk::MultiWriteError::OperationFailed {
                source: zk::Error::NoNode,
                ..
            }) => {}
            Err(e) => {
                return Err(tree::multi_error(
                    "clean blocks",
                    std::slice::from_ref(&path),
                    e,
                ));
            }
        }
        for name in chunk {
            match client.delete(&replica.paths.block(name), None).await {
                Ok(()) | Err(zk::Error::NoNode) => {}
                Err(e) => return Err(TreeError::zk("delete", replica.paths.block(name), e)),
            }
        }
    }
    if !doomed.is_empty() {
        debug!(replica = %replica.name, removed = doomed.len(), "cleaned dedup blocks");
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    fn r(name: &str, active: bool, pointer: u64) -> PointerInfo {
        PointerInfo {
            name: name.into(),
            active,
            lost: false,
            host_version: Some(1),
            log_pointer: Some(pointer),
        }
    }

    #[test]
    fn keeps_the_minimum_and_everything_a_replica_still_needs() {
        let entries: Vec<u64> = (0..50).collect();
        let plan = plan_log_cleanup(&entries, &[r("a", true, 50), r("b", true, 30)], 10, 1000);
        assert_eq!(plan.delete_below, 30);
        assert!(plan.mark_lost.is_empty());
        let plan = plan_log_cleanup(&entries, &[r("a", true, 50), r("b", true, 50)], 10, 1000);
        assert_eq!(plan.delete_below, 40, "the last 10 entries stay");
        let plan = plan_log_cleanup(&(0..5).collect::<Vec<_>>(), &[r("a", true, 5)], 10, 1000);
        assert_eq!(plan.delete_below, 0);
    }

    #[test]
    fn an_inactive_replica_far_behind_is_marked_lost_and_stops_counting() {
        let entries: Vec<u64> = (0..100).collect();
        let plan = plan_log_cleanup(&entries, &[r("a", true, 100), r("b", false, 3)], 10, 50);
        assert_eq!(plan.mark_lost, ["b"]);
        assert_eq!(plan.delete_below, 90);
        // Active replicas are never marked, however far behind.
        let plan = plan_log_cleanup(&entries, &[r("a", true, 100), r("b", true, 3)], 10, 50);
        assert!(plan.mark_lost.is_empty());
        assert_eq!(plan.delete_below, 3);
    }

    #[test]
    fn never_marks_every_replica_lost() {
        let entries: Vec<u64> = (0..100).collect();
        let plan = plan_log_cleanup(&entries, &[r("a", false, 10), r("b", false, 3)], 10, 50);
        assert_eq!(plan.mark_lost, ["b"]);
        assert_eq!(plan.delete_below, 10);
    }

    #[test]
    fn half_removed_and_lost_replicas_do_not_block_cleanup() {
        let entries: Vec<u64> = (0..100).collect();
        let mut ghost = r("ghost", false, 0);
        ghost.host_version = None;
        let mut lost = r("lost", false, 0);
        lost.lost = true;
        let plan = plan_log_cleanup(&entries, &[r("a", true, 100), ghost, lost], 10, 1000);
        assert_eq!(plan.delete_below, 90);
        assert!(plan.mark_lost.is_empty());
    }

    #[test]
    fn a_lost_replica_that_is_recovering_keeps_the_entries_it_still_needs() {
        let entries: Vec<u64> = (0..100).collect();
        let mut recovering = r("recovering", true, 20);
        recovering.lost = true;
        let plan = plan_log_cleanup(&entries, &[r("a", true, 100), recovering], 10, 1000);
        assert_eq!(plan.delete_below, 20);
        assert!(plan.mark_lost.is_empty());
    }

    #[test]
    fn blocks_outside_the_count_or_age_window_go() {
        let blocks: Vec<(String, i64)> = (0..10).map(|i| (format!("b{i}"), i * 1000)).collect();
        let mut doomed = plan_block_cleanup(blocks.clone(), 5, 3600);
        doomed.sort();
        assert_eq!(doomed, ["b0", "b1", "b2", "b3", "b4"]);
        let mut doomed = plan_block_cleanup(blocks, 100, 3);
        doomed.sort();
        assert_eq!(doomed, ["b0", "b1", "b2", "b3", "b4", "b5"]);
    }
}
