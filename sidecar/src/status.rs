//! `/status`: this replica in the shape of ClickHouse's system.replicas
//! (`rtable_protocol::status::ReplicaStatus`, the type the operator reads too).

use zookeeper_client as zk;

use rtable_protocol::LogEntryKind;
use rtable_protocol::status::ReplicaStatus;
use rtable_protocol::tree::{self, TreeError};

use crate::replica::Replica;

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
            q.len() as u64,
            q.inserts_in_queue() as u64,
            q.last_queue_update,
            q.last_queue_update_exception.clone(),
        )
    };
    let (merges_in_queue, postponed_in_queue, unreadable_queue_entries) = {
        let q = replica.queue.lock();
        (
            q.items()
                .filter(|i| matches!(i.entry.kind, LogEntryKind::Merge { .. }))
                .count() as u64,
            q.items().filter(|i| i.postpone_reason.is_some()).count() as u64,
            q.unreadable_count() as u64,
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
        parts_count: parts.len() as u64,
        parts,
        rows,
        bytes,
        merges_in_queue,
        postponed_in_queue,
        unreadable_queue_entries,
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
