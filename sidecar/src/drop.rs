//! DROP PARTITION (ClickHouse's dropPartition): a block number taken in the partition
//! marks the end of the range, and one multi publishes DROP_RANGE with the fake covering
//! part `<partition>_0_<N-1>_999999999_999999999` and releases the number. Every replica
//! then removes the covered parts (ZooKeeper first, then disk) and cancels queued entries
//! that would produce parts inside the range.

use tracing::info;
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
    let parent = replica.paths.block_numbers_partition(partition);
    match client.create(&parent, b"", &tree::persistent()).await {
        Ok(_) | Err(zk::Error::NodeExists) => {}
        Err(e) => return Err(TreeError::zk("create", parent, e).into()),
    }
    let prefix = replica.paths.block_number_lock_prefix(partition);
    let (_, seq) = client
        .create(&prefix, b"", &tree::ephemeral_sequential())
        .await
        .map_err(|e| TreeError::zk("create", prefix.clone(), e))?;
    let lock = format!("{prefix}{seq}");
    let next = lock
        .rsplit('/')
        .next()
        .and_then(sequence_of)
        .ok_or_else(|| TreeError::Corrupt {
            path: lock.clone(),
            message: "lock without a sequence number".into(),
        })?;
    let range = PartName::drop_range(partition, next).to_string();
    let entry = LogEntry::drop_range(&replica.name, &range, chrono::Utc::now().timestamp());
    let mut multi = client.new_multi_writer();
    multi
        .add_create(
            &replica.paths.log_entry_prefix(),
            entry.render().as_bytes(),
            &tree::persistent_sequential(),
        )
        .map_err(|e| TreeError::zk("create", replica.paths.log_entry_prefix(), e))?;
    multi
        .add_delete(&lock, None)
        .map_err(|e| TreeError::zk("delete", lock.clone(), e))?;
    // Bumping `log` voids merges other leaders are about to assign over this range.
    multi
        .add_set_data(&replica.paths.log(), b"", None)
        .map_err(|e| TreeError::zk("set", replica.paths.log(), e))?;
    multi
        .commit()
        .await
        .map_err(|e| tree::multi_error("drop partition", &[replica.paths.log(), lock], e))?;
    info!(replica = %replica.name, %partition, %range, "published DROP_RANGE");
    replica.pull_notify.notify_one();
    Ok(range)
}
