//! Node paths of one table's tree, in ClickHouse's names.

/// The paths under a table's ZooKeeper root (`/clickhouse/tables/01/default.events`).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct TablePaths {
    root: String,
}

/// Sequential node prefixes; ZooKeeper appends a 10-digit counter.
pub const LOG_PREFIX: &str = "log-";
pub const QUEUE_PREFIX: &str = "queue-";
pub const BLOCK_PREFIX: &str = "block-";

impl TablePaths {
    pub fn new(root: impl Into<String>) -> Self {
        let root: String = root.into();
        TablePaths {
            root: root.trim_end_matches('/').to_string(),
        }
    }

    pub fn root(&self) -> &str {
        &self.root
    }

    fn child(&self, name: &str) -> String {
        format!("{}/{}", self.root, name)
    }

    pub fn metadata(&self) -> String {
        self.child("metadata")
    }
    pub fn columns(&self) -> String {
        self.child("columns")
    }
    pub fn log(&self) -> String {
        self.child("log")
    }
    pub fn log_entry(&self, node: &str) -> String {
        format!("{}/log/{node}", self.root)
    }
    /// Prefix to create a persistent-sequential log entry with.
    pub fn log_entry_prefix(&self) -> String {
        format!("{}/log/{LOG_PREFIX}", self.root)
    }
    pub fn blocks(&self) -> String {
        self.child("blocks")
    }
    pub fn block(&self, block_id: &str) -> String {
        format!("{}/blocks/{block_id}", self.root)
    }
    pub fn block_numbers(&self) -> String {
        self.child("block_numbers")
    }
    pub fn block_numbers_partition(&self, partition_id: &str) -> String {
        format!("{}/block_numbers/{partition_id}", self.root)
    }
    pub fn block_number_lock_prefix(&self, partition_id: &str) -> String {
        format!("{}/block_numbers/{partition_id}/{BLOCK_PREFIX}", self.root)
    }
    pub fn leader_election(&self) -> String {
        self.child("leader_election")
    }
    pub fn replicas(&self) -> String {
        self.child("replicas")
    }
    pub fn quorum(&self) -> String {
        self.child("quorum")
    }
    pub fn quorum_status(&self) -> String {
        self.child("quorum/status")
    }
    pub fn quorum_last_part(&self) -> String {
        self.child("quorum/last_part")
    }
    pub fn quorum_failed_parts(&self) -> String {
        self.child("quorum/failed_parts")
    }
    pub fn quorum_parallel(&self) -> String {
        self.child("quorum/parallel")
    }
    pub fn mutations(&self) -> String {
        self.child("mutations")
    }
    pub fn replica(&self, replica: &str) -> ReplicaPaths {
        ReplicaPaths {
            root: format!("{}/replicas/{replica}", self.root),
        }
    }

    /// Every table-level node, parents before children, as the first replica creates them.
    pub fn table_nodes(&self) -> Vec<String> {
        [
            "",
            "metadata",
            "columns",
            "log",
            "blocks",
            "block_numbers",
            "nonincrement_block_numbers",
            "leader_election",
            "replicas",
            "quorum",
            "quorum/last_part",
            "quorum/failed_parts",
            "quorum/parallel",
            "mutations",
            "temp",
            "async_blocks",
        ]
        .iter()
        .map(|n| {
            if n.is_empty() {
                self.root.clone()
            } else {
                self.child(n)
            }
        })
        .collect()
    }
}

/// The paths under `replicas/<name>`.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ReplicaPaths {
    root: String,
}

impl ReplicaPaths {
    pub fn root(&self) -> &str {
        &self.root
    }
    fn child(&self, name: &str) -> String {
        format!("{}/{}", self.root, name)
    }
    pub fn host(&self) -> String {
        self.child("host")
    }
    pub fn is_active(&self) -> String {
        self.child("is_active")
    }
    pub fn is_lost(&self) -> String {
        self.child("is_lost")
    }
    pub fn log_pointer(&self) -> String {
        self.child("log_pointer")
    }
    pub fn queue(&self) -> String {
        self.child("queue")
    }
    pub fn queue_entry(&self, node: &str) -> String {
        format!("{}/queue/{node}", self.root)
    }
    pub fn queue_entry_prefix(&self) -> String {
        format!("{}/queue/{QUEUE_PREFIX}", self.root)
    }
    pub fn parts(&self) -> String {
        self.child("parts")
    }
    pub fn part(&self, part: &str) -> String {
        format!("{}/parts/{part}", self.root)
    }
    pub fn metadata(&self) -> String {
        self.child("metadata")
    }
    pub fn columns(&self) -> String {
        self.child("columns")
    }
    pub fn metadata_version(&self) -> String {
        self.child("metadata_version")
    }
    pub fn min_unprocessed_insert_time(&self) -> String {
        self.child("min_unprocessed_insert_time")
    }
    pub fn max_processed_insert_time(&self) -> String {
        self.child("max_processed_insert_time")
    }
    pub fn mutation_pointer(&self) -> String {
        self.child("mutation_pointer")
    }
    pub fn flags(&self) -> String {
        self.child("flags")
    }
}

/// The 10-digit sequence number of a sequential node name (`log-0000000042` -> 42).
pub fn sequence_of(node_name: &str) -> Option<u64> {
    let digits = node_name.rsplit('-').next()?;
    if digits.len() != 10 || !digits.bytes().all(|b| b.is_ascii_digit()) {
        return None;
    }
    digits.parse().ok()
}

/// `log-0000000042` for index 42.
pub fn log_node_name(index: u64) -> String {
    format!("{LOG_PREFIX}{index:010}")
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn paths_use_clickhouse_names() {
        let t = TablePaths::new("/clickhouse/tables/01/default.events/");
        assert_eq!(t.root(), "/clickhouse/tables/01/default.events");
        assert_eq!(
            t.log_entry_prefix(),
            "/clickhouse/tables/01/default.events/log/log-"
        );
        assert_eq!(
            t.block_number_lock_prefix("202405"),
            "/clickhouse/tables/01/default.events/block_numbers/202405/block-"
        );
        let r = t.replica("r1");
        assert_eq!(
            r.part("all_1_1_0"),
            "/clickhouse/tables/01/default.events/replicas/r1/parts/all_1_1_0"
        );
        assert_eq!(
            r.queue_entry_prefix(),
            "/clickhouse/tables/01/default.events/replicas/r1/queue/queue-"
        );
        assert_eq!(t.table_nodes()[0], t.root());
    }

    #[test]
    fn sequence_numbers() {
        assert_eq!(sequence_of("log-0000000042"), Some(42));
        assert_eq!(sequence_of("queue-0000000001"), Some(1));
        assert_eq!(sequence_of("block-0000000007"), Some(7));
        assert_eq!(sequence_of("log-42"), None);
        assert_eq!(log_node_name(42), "log-0000000042");
    }
}
