//! Everything one replica's tasks share: its identity, table, part store, session, queue
//! and counters. Built once in `main` and handed to every task behind an `Arc`.

use std::sync::atomic::AtomicBool;
use std::time::Duration;

use parking_lot::Mutex;
use tokio::sync::Notify;

use rtable_protocol::TablePaths;
use rtable_protocol::host::HostInfo;
use rtable_protocol::manifest::ValidatedTable;

use crate::config::Config;
use crate::metrics::Metrics;
use crate::queue::QueueState;
use crate::session::Sessions;
use crate::store::PartStore;

/// The header peers must send on interserver requests when a secret is configured.
pub const SECRET_HEADER: &str = "x-rtable-secret";

pub struct Replica {
    pub name: String,
    pub cfg: Config,
    pub table: ValidatedTable,
    pub paths: TablePaths,
    pub store: PartStore,
    pub sessions: Sessions,
    pub queue: Mutex<QueueState>,
    pub metrics: Metrics,
    pub host: HostInfo,
    pub secret: Option<String>,
    /// Credentials and TLS of the ZooKeeper sessions.
    pub zk_access: rtable_protocol::zk_access::ZkAccess,
    /// The ACL of every node this replica creates (from `zk_access`).
    pub zk_acl: rtable_protocol::zk_acl::TreeAcl,
    pub http: reqwest::Client,
    /// Wakes the queue executor (new entries, a finished fetch, a new session).
    pub queue_notify: Notify,
    /// Wakes the log puller ahead of its watch (after this replica published an entry
    /// it must see at once, such as a merge or a drop).
    pub pull_notify: Notify,
    /// Block numbers allocated ahead of the next insert (see sink::reserve).
    pub block_reserve: std::sync::Arc<crate::sink::reserve::Reserve>,
    pub session_timeout: Duration,
    /// `columns` text of the table, whose hash goes into every part header.
    pub columns_text: String,
    /// Set once the first session handled inserts staged by a previous process.
    pub startup_recovery_done: AtomicBool,
    pub started_at: std::time::Instant,
    /// Wakes merge assignment (a part became active).
    pub merge_notify: Notify,
    pub merge_policy: crate::merge::policy::MergePolicy,
    /// Parts declared lost since start (system.replicas lost_part_count).
    pub lost_part_count: std::sync::atomic::AtomicU64,
    /// Parts being downloaded right now. Two entries can resolve to the same covering part
    /// (two GET_PARTs answered by one merged part, a MERGE fetched while a GET finds it);
    /// the second waits instead of reusing the first one's temp directory. Each download's
    /// sender is dropped when it ends, which wakes `fetcher::wait_in_flight`.
    pub fetching: crate::fetcher::Slots,
    /// Parts a failed read reported, waiting for `part_check` to verify them.
    pub part_check: crate::part_check::PartCheck,
    /// Parts the log pull fetched ahead of their queue entries and no entry recorded yet
    /// (see `queue::prefetch`).
    pub prefetched: crate::queue::prefetch::Prefetched,
    /// Log entries of this replica's own inserts, skipped by the log pull, and the
    /// `log_pointer` write that skipping defers (see `queue::own_log`).
    pub own_log: crate::queue::own_log::OwnLog,
    /// One log pull at a time: merge assignment pulls too, and must not see `log_pointer`
    /// already moved by the pull task before that task put the entries into `queue`.
    pub pull_lock: tokio::sync::Mutex<()>,
    /// A pull's multi failed without a known outcome: it may have queued entries in
    /// ZooKeeper that memory lacks. The next pull reads the queue back first.
    pub queue_unsure: AtomicBool,
    /// `log_pointer` as this process last wrote it: (session id, value, znode version).
    /// Only this replica writes its pointer, under `pull_lock`, with a version check, so
    /// a pull need not read it back; any failed write or other writer clears it.
    pub log_pointer_cache: Mutex<Option<(i64, Vec<u8>, i32)>>,
    /// Interserver address of each peer, from its `host` node as last read. A GET is
    /// first fetched straight from its entry's source at this address (the inserter holds
    /// its part); any failure forgets the address and falls back to reading ZooKeeper.
    pub peer_addresses: Mutex<std::collections::HashMap<String, String>>,
    /// Where to push freshly committed small parts (see `push`).
    pub push_peers: crate::push::Peers,
    /// Quorum inserts' parts peers handed off here before committing (see `handoff`).
    pub handoffs: crate::handoff::Handoffs,
    /// The table file's settings that change live (quorum, quorum mode, dedup window); the
    /// file is re-read by `table_reload::run`. `table` stays what the replica started with.
    pub table_reload: crate::table_reload::TableReload,
}

impl Replica {
    pub fn connect_string(&self) -> String {
        self.cfg
            .zookeeper
            .clone()
            .unwrap_or_else(|| self.table.manifest.spec.connect_string())
    }

    /// Insert quorum this table requires (0 and 1 both mean "no quorum").
    pub fn insert_quorum(&self) -> u32 {
        self.settings().required_quorum()
    }

    /// The table's live settings, as the table file last gave them.
    pub fn settings(&self) -> crate::table_reload::LiveSettings {
        self.table_reload.settings()
    }
}
