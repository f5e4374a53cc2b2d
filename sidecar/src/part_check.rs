//! Damaged parts found at run time (ClickHouse's part check thread). A read that fails on
//! an active part's files (a select, a peer fetching from here) reports the part; this task
//! verifies it against its checksums and, if it is damaged, detaches it as `broken` (kept
//! for inspection, never deleted) and has this replica fetch an intact copy: one multi
//! removes `replicas/<me>/parts/<part>` and queues a GET_PART for it, the way the startup
//! check re-queues a part the disk lost. A part that verifies is left alone: the read
//! failed for another reason (the disk was full, a descriptor limit).

use std::collections::BTreeSet;
use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::time::Duration;

use parking_lot::Mutex;
use tokio::sync::Notify;
use tracing::{info, warn};
use zookeeper_client as zk;

use rtable_protocol::PartName;
use rtable_protocol::tree::{self, TreeError};

use crate::metrics::Metrics;
use crate::replica::Replica;
use crate::store::{StoreError, verify};

/// How long to wait before retrying the ZooKeeper half of a repair that failed.
const RETRY: Duration = Duration::from_secs(1);

/// Parts reported by failed reads, waiting for their check.
#[derive(Default)]
pub struct PartCheck {
    suspects: Mutex<BTreeSet<PartName>>,
    wake: Notify,
}

impl PartCheck {
    /// Queues `part` for a check; cheap and synchronous, so any reader may call it.
    pub fn report(&self, replica: &str, part: &PartName, error: &str) {
        if self.suspects.lock().insert(part.clone()) {
            warn!(replica, %part, error, "a read of the part failed; checking it");
            self.wake.notify_one();
        }
    }

    fn take(&self) -> Vec<PartName> {
        std::mem::take(&mut *self.suspects.lock())
            .into_iter()
            .collect()
    }
}

/// The sources of a failed merge worth a check. An error naming a file or directory of a
/// source points at that source; one about the parts directory itself (the merge reading
/// batches, without saying whose) at all of them; anything else, such as writing the
/// merged part on a full disk, at none: a merge that keeps failing for its output must not
/// re-hash its sources on every retry.
pub fn merge_suspects(
    error_path: Option<&Path>,
    parts_dir: &Path,
    sources: &[(PartName, PathBuf)],
) -> Vec<PartName> {
    let Some(path) = error_path else {
        return Vec::new();
    };
    if let Some((name, _)) = sources.iter().find(|(_, dir)| path.starts_with(dir)) {
        return vec![name.clone()];
    }
    if path == parts_dir {
        return sources.iter().map(|(name, _)| name.clone()).collect();
    }
    Vec::new()
}

/// Runs forever: checks each reported part, repairs the damaged ones.
pub async fn run(replica: Arc<Replica>) {
    loop {
        replica.part_check.wake.notified().await;
        for part in replica.part_check.take() {
            check(&replica, &part).await;
        }
    }
}

/// Verifies one reported part; detaches and re-fetches it when damaged.
async fn check(replica: &Arc<Replica>, part: &PartName) {
    // Merged away or dropped since the report: nothing to check.
    let Some(active) = replica.store.get(part) else {
        return;
    };
    let verified = tokio::task::spawn_blocking(move || {
        let (found, _rows) = verify::verify_part_dir(&active.dir)?;
        if found != active.checksums {
            return Err(StoreError::corrupt(
                &active.dir,
                "checksums.txt differs from the checksums the part was installed with",
            ));
        }
        Ok(())
    })
    .await;
    let damage = match verified {
        Ok(Ok(())) => {
            info!(replica = %replica.name, %part, "the reported part verifies; keeping it");
            return;
        }
        Ok(Err(e)) => e.to_string(),
        Err(e) => {
            warn!(replica = %replica.name, %part, error = %e, "the part check failed to run");
            return;
        }
    };
    warn!(replica = %replica.name, %part, damage, "the part is damaged; detaching it as broken and fetching it again");
    match replica.store.detach(part, "broken") {
        Ok(to) => {
            info!(replica = %replica.name, %part, to = %to.display(), "detached a broken part")
        }
        // Merged away or dropped meanwhile: its replacement does not need this copy.
        Err(StoreError::NotActive { .. }) => return,
        Err(e) => {
            warn!(replica = %replica.name, %part, error = %e, "cannot detach the broken part");
            return;
        }
    }
    Metrics::inc(&replica.metrics.broken_parts);
    // The local copy is gone from reads now; until ZooKeeper agrees, peers asking for it get
    // a 404 and ask another replica. A restart before this succeeds finds the part listed
    // but missing, and re-queues it the same way.
    loop {
        let (client, _) = replica.sessions.wait_active().await;
        match requeue(replica, &client, part).await {
            Ok(queued) => {
                info!(replica = %replica.name, %part, queued = queued.as_deref().unwrap_or("-"), "queued a fetch of the broken part");
                return;
            }
            Err(e) => {
                warn!(replica = %replica.name, %part, error = %e, "cannot queue a fetch of the broken part; will retry");
                tokio::time::sleep(RETRY).await;
            }
        }
    }
}

/// Forgets `replicas/<me>/parts/<part>` and queues a GET_PART for it, in one multi (the
/// startup re-queue's operations, `recovery::add_refetch`). Returns the queue node, or
/// `None` when ZooKeeper did not list the part: it was not recorded yet, and the entry
/// that installed it finds it gone and fetches it again.
async fn requeue(
    replica: &Replica,
    client: &zk::Client,
    part: &PartName,
) -> Result<Option<String>, TreeError> {
    let rp = replica.paths.replica(&replica.name);
    let name = part.to_string();
    let mut multi = client.new_multi_writer();
    let entry = crate::recovery::add_refetch(
        &mut multi,
        &replica.zk_acl,
        &replica.name,
        &rp,
        &name,
        chrono::Utc::now().timestamp(),
    )?;
    let results = match multi.commit().await {
        Ok(results) => results,
        // The delete (operation 0) found no node: nothing to forget, nothing was queued.
        Err(zk::MultiWriteError::OperationFailed {
            index: 0,
            source: zk::Error::NoNode,
        }) => return Ok(None),
        Err(e) => {
            let paths = [rp.part(&name), rp.queue_entry_prefix()];
            return Err(tree::multi_error("re-queue a broken part", &paths, e));
        }
    };
    let node = results.iter().find_map(|r| match r {
        zk::MultiWriteResult::Create { path, .. } => path.rsplit('/').next().map(str::to_string),
        _ => None,
    });
    if let Some(node) = &node {
        replica.queue.lock().insert(node.clone(), entry);
        replica.queue_notify.notify_one();
    }
    Ok(node)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_part_reported_twice_is_checked_once() {
        let check = PartCheck::default();
        let a = PartName::parse("all_0_5_1").expect("part");
        let b = PartName::parse("all_6_6_0").expect("part");
        check.report("r1", &a, "reading failed");
        check.report("r1", &b, "reading failed");
        check.report("r1", &a, "reading failed again");
        assert_eq!(check.take(), vec![a.clone(), b]);
        assert!(check.take().is_empty());
        check.report("r1", &a, "damaged again later");
        assert_eq!(check.take(), vec![a]);
    }

    #[test]
    fn a_failed_merge_points_at_the_source_its_error_names() {
        let parts = Path::new("/data/parts");
        let a = PartName::parse("all_1_1_0").expect("part");
        let b = PartName::parse("all_2_2_0").expect("part");
        let sources = vec![
            (a.clone(), parts.join("all_1_1_0")),
            (b.clone(), parts.join("all_2_2_0")),
        ];
        let data_of_b = parts.join("all_2_2_0").join("data.parquet");
        assert_eq!(
            merge_suspects(Some(&data_of_b), parts, &sources),
            vec![b.clone()]
        );
        // Reading batches, source unknown: every source.
        assert_eq!(merge_suspects(Some(parts), parts, &sources), vec![a, b]);
        // Writing the merged part, or no path at all: none.
        let output = parts.join("tmp_spare_00ff").join("data.parquet");
        assert!(merge_suspects(Some(&output), parts, &sources).is_empty());
        assert!(merge_suspects(None, parts, &sources).is_empty());
    }
}
