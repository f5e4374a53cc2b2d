//! DROP PARTITION (ClickHouse's dropPartition): a block number taken in the partition
//! marks the end of the range, and one multi publishes DROP_RANGE with the fake covering
//! part `<partition>_0_<N-1>_999999999_999999999` and releases the number. Every replica
//! then removes the covered parts (ZooKeeper first, then disk) and cancels queued entries
//! that would produce parts inside the range.
//!
//! An insert that took block number K < N before the drop but commits after it would log
//! its GET_PART behind the DROP_RANGE: replicas that already ran the drop would fetch a
//! part the drop was meant to remove, or find no holder and count it lost, and the
//! inserter may keep it or not depending on timing. So the drop is published only once no
//! block number below N is still locked: each such insert has then committed (its GET is
//! in the log before the drop, which removes it everywhere) or given its number up (its
//! retry allocates above N and survives the drop). Inserts that allocate after the drop
//! took N get numbers above the range and are never touched. The lock N itself keeps
//! merges from spanning the boundary meanwhile.

use std::time::{Duration, Instant};

use tracing::{info, warn};
use zookeeper_client as zk;

use rtable_protocol::part_name::is_valid_partition_id;
use rtable_protocol::paths::sequence_of;
use rtable_protocol::tree::{self, TreeError};
use rtable_protocol::{LogEntry, PartName};

use crate::replica::Replica;

#[derive(Debug, thiserror::Error)]
pub enum DropError {
    #[error("`{0}` is not a partition id (letters, digits and `-`; see the part names in /status)")]
    BadPartition(String),
    #[error("replica is read-only: {0}")]
    ReadOnly(String),
    #[error(
        "inserts holding block numbers {pending:?} below the drop's {number} in partition {partition} did not finish within {waited:?}; nothing was dropped, retry"
    )]
    InsertsInFlight {
        partition: String,
        number: u64,
        pending: Vec<u64>,
        waited: Duration,
    },
    #[error(transparent)]
    Tree(#[from] TreeError),
}

/// Publishes the drop; returns the covering range's name.
pub async fn drop_partition(replica: &Replica, partition: &str) -> Result<String, DropError> {
    if !is_valid_partition_id(partition) {
        return Err(DropError::BadPartition(partition.to_string()));
    }
    let (client, _) = replica
        .sessions
        .active()
        .map_err(|e| DropError::ReadOnly(e.reason))?;
    tree::ensure_partition_node(&client, &replica.paths, &replica.zk_acl, partition).await?;
    // This replica's own reservation would hold the drop back until it idles out.
    replica
        .block_reserve
        .release_partition(replica, &client, partition)
        .await;
    let prefix = replica.paths.block_number_lock_prefix(partition);
    let (_, seq) = client
        .create(&prefix, b"", &replica.zk_acl.ephemeral_sequential())
        .await
        .map_err(|e| TreeError::zk("create", prefix.clone(), e))?;
    let lock = format!("{prefix}{seq}");
    let result = publish(replica, &client, partition, &lock).await;
    if result.is_err() {
        // Left alone, the number would bar merges across it until the session ends.
        if let Err(e) = client.delete(&lock, None).await
            && !matches!(e, zk::Error::NoNode)
        {
            warn!(replica = %replica.name, %lock, error = %e, "could not release the drop's block number");
        }
    }
    result
}

/// Waits out the inserts below the drop's number, then ONE multi: the DROP_RANGE entry,
/// the release of the number, and a bump of `log`.
async fn publish(
    replica: &Replica,
    client: &zk::Client,
    partition: &str,
    lock: &str,
) -> Result<String, DropError> {
    let next = lock
        .rsplit('/')
        .next()
        .and_then(sequence_of)
        .ok_or_else(|| TreeError::Corrupt {
            path: lock.to_string(),
            message: "lock without a sequence number".into(),
        })?;
    wait_for_lower_locks(replica, client, partition, next).await?;
    let range = PartName::drop_range(partition, next).to_string();
    let entry = LogEntry::drop_range(&replica.name, &range, chrono::Utc::now().timestamp());
    let mut multi = client.new_multi_writer();
    multi
        .add_create(
            &replica.paths.log_entry_prefix(),
            entry.render().as_bytes(),
            &replica.zk_acl.persistent_sequential(),
        )
        .map_err(|e| TreeError::zk("create", replica.paths.log_entry_prefix(), e))?;
    multi
        .add_delete(lock, None)
        .map_err(|e| TreeError::zk("delete", lock.to_string(), e))?;
    // Bumping `log` voids merges other leaders are about to assign over this range.
    multi
        .add_set_data(&replica.paths.log(), b"", None)
        .map_err(|e| TreeError::zk("set", replica.paths.log(), e))?;
    multi.commit().await.map_err(|e| {
        tree::multi_error(
            "drop partition",
            &[replica.paths.log(), lock.to_string()],
            e,
        )
    })?;
    info!(replica = %replica.name, %partition, %range, "published DROP_RANGE");
    replica.pull_notify.notify_one();
    Ok(range)
}

/// Block numbers of `children` (lock nodes of one partition) below `number`.
pub fn locks_below(children: &[String], number: u64) -> Vec<u64> {
    let mut below: Vec<u64> = children
        .iter()
        .filter_map(|c| sequence_of(c))
        .filter(|n| *n < number)
        .collect();
    below.sort_unstable();
    below
}

/// Watches the partition's locks until none is below `number`. No new lock can appear
/// below it (numbers only grow), so this ends when the inserts holding them commit or
/// give up; their sessions end within a session timeout when their process is gone.
async fn wait_for_lower_locks(
    replica: &Replica,
    client: &zk::Client,
    partition: &str,
    number: u64,
) -> Result<(), DropError> {
    let path = replica.paths.block_numbers_partition(partition);
    let started = Instant::now();
    let budget = replica.session_timeout * 2 + Duration::from_secs(5);
    loop {
        let (children, watcher) = client
            .list_and_watch_children(&path)
            .await
            .map_err(|e| TreeError::zk("list", path.clone(), e))?;
        let pending = locks_below(&children, number);
        if pending.is_empty() {
            return Ok(());
        }
        let left = budget.saturating_sub(started.elapsed());
        if left.is_zero() {
            return Err(DropError::InsertsInFlight {
                partition: partition.to_string(),
                number,
                pending,
                waited: started.elapsed(),
            });
        }
        // Any lock created or removed fires the watch; the timeout only bounds a lost one.
        let _ = tokio::time::timeout(left.min(Duration::from_millis(500)), watcher.changed()).await;
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn only_lower_lock_numbers_hold_the_drop_back() {
        let children: Vec<String> = [
            "block-0000000012",
            "block-0000000007",
            "block-0000000015",
            "junk",
        ]
        .iter()
        .map(|s| s.to_string())
        .collect();
        // The drop's own number (15) and later inserts' numbers do not count.
        assert_eq!(locks_below(&children, 15), vec![7, 12]);
        assert_eq!(locks_below(&children, 7), Vec::<u64>::new());
        assert!(locks_below(&[], 3).is_empty());
    }
}
