//! `/status`: this replica in the shape of ClickHouse's system.replicas.

use serde::Serialize;
use zookeeper_client as zk;

use rtable_protocol::tree::{self, TreeError};

use crate::replica::Replica;

#[derive(Debug, Serialize)]
pub struct ReplicaStatus {
    pub replica_name: String,
    pub table_path: String,
    /// Every replica may assign merges (ClickHouse >= 21.12 "multiple leaders").
    pub is_leader: bool,
    pub is_readonly: bool,
    pub readonly_reason: Option<String>,
    pub is_session_expired: bool,
    pub zookeeper_exception: Option<String>,
    pub queue_size: usize,
    pub inserts_in_queue: usize,
    pub log_max_index: Option<u64>,
    pub log_pointer: Option<u64>,
    pub last_queue_update: Option<i64>,
    pub last_queue_update_exception: Option<String>,
    pub absolute_delay: u64,
    pub total_replicas: Option<u32>,
    pub active_replicas: Option<u32>,
    pub replica_is_active: bool,
    pub lost_part_count: u64,
    pub parts_count: usize,
    pub parts: Vec<String>,
    pub rows: u64,
    pub bytes: u64,
    /// Entries in the queue that are merges, and those postponed at least once.
    pub merges_in_queue: usize,
    pub postponed_in_queue: usize,
    /// A change of the table's definition (or ensemble) in the table file that this running
    /// replica does not apply; see `table_reload`.
    pub pending_definition_change: Option<String>,
    /// Why the table file could not be reloaded (settings stay as they were).
    pub table_file_error: Option<String>,
    pub counters: crate::metrics::Counters,
}

/// system.replicas' absolute_delay: how far behind the newest data this replica is, in
/// seconds. Before the first log pull it counts from process start (ClickHouse says
/// "infinite"; a number stays machine-readable).
pub fn absolute_delay(replica: &Replica) -> u64 {
    let q = replica.queue.lock();
    let now = chrono::Utc::now().timestamp();
    match (
        q.last_queue_update,
        q.oldest_insert_time(),
        &q.last_queue_update_exception,
    ) {
        (None, _, _) => replica.started_at.elapsed().as_secs(),
        (Some(_), Some(oldest), _) => (now - oldest).max(0) as u64,
        (Some(last), None, Some(_)) => (now - last).max(0) as u64,
        (Some(_), None, None) => 0,
    }
}

pub async fn collect(replica: &Replica) -> ReplicaStatus {
    let view = replica.sessions.view();
    let snapshot = replica.store.snapshot();
    let parts = snapshot.names();
    let (rows, bytes) = (snapshot.rows(), snapshot.bytes());
    drop(snapshot);
    let (queue_size, inserts_in_queue, last_queue_update, last_queue_update_exception) = {
        let q = replica.queue.lock();
        (
            q.len(),
            q.inserts_in_queue(),
            q.last_queue_update,
            q.last_queue_update_exception.clone(),
        )
    };
    let (merges_in_queue, postponed_in_queue) = {
        let q = replica.queue.lock();
        (
            q.items()
                .filter(|i| i.entry.type_name() == "MERGE_PARTS")
                .count(),
            q.items().filter(|i| i.postpone_reason.is_some()).count(),
        )
    };
    let mut status = ReplicaStatus {
        replica_name: replica.name.clone(),
        table_path: replica.paths.root().to_string(),
        is_leader: view.readonly_reason.is_none(),
        is_readonly: view.readonly_reason.is_some(),
        readonly_reason: view.readonly_reason.clone(),
        is_session_expired: view.session_expired,
        zookeeper_exception: None,
        queue_size,
        inserts_in_queue,
        log_max_index: None,
        log_pointer: None,
        last_queue_update,
        last_queue_update_exception,
        absolute_delay: absolute_delay(replica),
        total_replicas: None,
        active_replicas: None,
        replica_is_active: view.readonly_reason.is_none(),
        lost_part_count: replica
            .lost_part_count
            .load(std::sync::atomic::Ordering::Relaxed),
        parts_count: parts.len(),
        parts,
        rows,
        bytes,
        merges_in_queue,
        postponed_in_queue,
        pending_definition_change: replica.table_reload.pending_definition_change(),
        table_file_error: replica.table_reload.table_file_error(),
        counters: replica.metrics.counters(),
    };
    if let Some(client) = &view.client
        && let Err(e) = read_tree(replica, client, &mut status).await
    {
        status.zookeeper_exception = Some(e.to_string());
    }
    status
}

async fn read_tree(
    replica: &Replica,
    client: &zk::Client,
    status: &mut ReplicaStatus,
) -> Result<(), TreeError> {
    status.log_max_index = tree::log_max_index(client, &replica.paths).await?;
    let rp = replica.paths.replica(&replica.name);
    // The next entry this replica will look at: the written pointer, or past own entries
    // whose pointer write is deferred (up to a second; see queue::own_log).
    status.log_pointer = tree::get_string(client, &rp.log_pointer())
        .await?
        .and_then(|s| s.trim().parse().ok())
        .map(|written| replica.own_log.effective(client.session_id().0, written));
    let names = tree::list_replicas(client, &replica.paths).await?;
    let mut active = 0;
    for name in &names {
        let path = replica.paths.replica(name).is_active();
        if client
            .check_stat(&path)
            .await
            .map_err(|e| TreeError::zk("exists", path, e))?
            .is_some()
        {
            active += 1;
        }
    }
    status.total_replicas = Some(names.len() as u32);
    status.active_replicas = Some(active);
    Ok(())
}
