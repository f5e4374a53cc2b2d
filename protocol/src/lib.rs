//! The shared language of a replicated table's ZooKeeper tree.
//!
//! Pure codecs (one module per node format) are byte-compatible with ClickHouse where
//! ClickHouse defines the format; `tree` holds the few ZooKeeper operations that both the
//! operator and the sidecar perform.

pub mod codec;
pub mod columns;
pub mod definition;
pub mod escaped;
pub mod hash;
pub mod host;
pub mod log_entry;
pub mod manifest;
pub mod metadata;
pub mod mutation_command;
pub mod mutation_entry;
pub mod part_header;
pub mod part_name;
pub mod paths;
pub mod quorum;
pub mod replica_progress;
pub mod schema;
pub mod status;
pub mod tree;
pub mod zk_access;
pub mod zk_acl;

pub use manifest::{ReplicatedTableManifest, TableSpec, ZooKeeperSpec};
pub use part_name::PartName;

pub use log_entry::{LogEntry, LogEntryKind};
pub use manifest::ValidatedTable;
pub use paths::TablePaths;
pub use schema::{Column, ColumnType, PartitionKey, TableSchema};
