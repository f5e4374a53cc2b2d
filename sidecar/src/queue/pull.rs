//! Log-to-queue sync (ClickHouse's pullLogsToQueue): new `log/log-N` entries are copied
//! verbatim into `replicas/<me>/queue/queue-` and `log_pointer` moves past them in the
//! same multi, so an entry is never queued twice nor skipped, whatever fails in between.

use std::sync::Arc;
use std::time::Duration;

use tracing::{debug, warn};
use zookeeper_client as zk;

use rtable_protocol::LogEntry;
use rtable_protocol::paths::{log_node_name, sequence_of};
use rtable_protocol::tree::{self, TreeError};

use crate::metrics::Metrics;
use crate::replica::Replica;

/// ClickHouse's batch size: one multi never carries more than this many entries.
pub const MAX_BATCH: usize = 100;
/// The watch is the trigger; this only covers an event lost some other way.
const FALLBACK_PERIOD: Duration = Duration::from_secs(30);
/// How long an announced entry waits for this replica's in-flight commits to say whether
/// it is theirs (see `OwnLog::settle`): the reply trails the watch event by a packet.
const SETTLE_LIMIT: Duration = Duration::from_millis(3);

/// Runs forever. One persistent recursive watch on `log` per session announces every new
/// entry by its path, so a new entry costs one read and one multi; a full listing is
/// only needed at activation, after a reconnect (events during a connection loss are not
/// redelivered, ZOOKEEPER-4698), when an event leaves a gap, and every FALLBACK_PERIOD.
pub async fn run(replica: Arc<Replica>) {
    loop {
        let (client, generation) = replica.sessions.wait_active().await;
        if let Err(e) = follow_session(&replica, &client, generation).await {
            if matches!(
                e.zk_error(),
                Some(zk::Error::SessionExpired | zk::Error::ClientClosed)
            ) {
                replica.sessions.report_expired(generation);
            }
            warn!(replica = %replica.name, error = %e, "log pull failed; retrying");
            replica.queue.lock().last_queue_update_exception = Some(e.to_string());
            tokio::time::sleep(Duration::from_millis(500)).await;
        }
    }
}

/// Pulls on every announced entry until this session ends (`Ok`) or a pull fails.
async fn follow_session(
    replica: &Arc<Replica>,
    client: &zk::Client,
    generation: u64,
) -> Result<(), TreeError> {
    let log_path = replica.paths.log();
    let mut watcher = client
        .watch(&log_path, zk::AddWatchMode::PersistentRecursive)
        .await
        .map_err(|e| TreeError::zk("watch", log_path.clone(), e))?;
    let mut views = replica.sessions.subscribe();
    // Everything created before the watch was in place is found by this listing.
    pull_listed(replica, client).await?;
    let session = client.session_id().0;
    loop {
        // A pointer write deferred past this replica's own entries (see own_log).
        let flush_at = replica
            .own_log
            .pending(session)
            .map(|(_, due)| tokio::time::Instant::from_std(due));
        tokio::select! {
            event = watcher.changed() => match (event.event_type, event.session_state) {
                (zk::EventType::NodeCreated, _) => {
                    let index = event.path.rsplit('/').next().and_then(sequence_of);
                    match index {
                        Some(index) if pull_announced(replica, client, index).await? => {}
                        _ => pull_listed(replica, client).await?,
                    }
                }
                (zk::EventType::Session, zk::SessionState::SyncConnected) => {
                    pull_listed(replica, client).await?
                }
                (
                    zk::EventType::Session,
                    zk::SessionState::Expired | zk::SessionState::Closed | zk::SessionState::AuthFailed,
                ) => return Ok(()),
                // Deletions by log cleanup, the version bump of merge assignment, and
                // connection loss (the reconnect lists again).
                _ => {}
            },
            changed = views.changed() => {
                let view = replica.sessions.view();
                if changed.is_err() || view.generation != generation || view.client.is_none() {
                    return Ok(());
                }
            }
            _ = tokio::time::sleep(FALLBACK_PERIOD) => pull_listed(replica, client).await?,
            _ = replica.pull_notify.notified() => pull_listed(replica, client).await?,
            _ = sleep_until_some(flush_at) => flush_pointer(replica, client).await?,
            // Re-arms the flush timer above.
            _ = replica.own_log.deferred() => {}
        }
    }
}

/// Pulls the announced entry `log-<index>` alone when it is the next one this replica
/// expects (true), skips it when it is this replica's own (true), or does nothing when it
/// was pulled already (true). False: the pointer is unknown here or an entry before it may
/// be missing, and the log must be listed.
async fn pull_announced(
    replica: &Arc<Replica>,
    client: &zk::Client,
    index: u64,
) -> Result<bool, TreeError> {
    let session = client.session_id().0;
    let Some(written) = cached_pointer(replica, session) else {
        return Ok(false);
    };
    let pointer = replica.own_log.effective(session, written);
    if index < pointer {
        return Ok(true);
    }
    if index > pointer {
        return Ok(false);
    }
    replica.own_log.settle(session, index, SETTLE_LIMIT).await;
    if skip_own(replica, session, index).await {
        mark_updated(replica);
        return Ok(true);
    }
    // The pointer only moves forward and the multi checks its version, so a concurrent
    // pull in between makes this one find nothing, never skip an entry.
    pull_batch(replica, client, &[log_node_name(index)], Some(replica)).await?;
    mark_updated(replica);
    Ok(true)
}

/// The next log index this replica will pull on `session`, when known here (own entries
/// skipped but not yet written count as pulled).
pub fn known_pointer(replica: &Replica, session: i64) -> Option<u64> {
    let written = cached_pointer(replica, session)?;
    Some(replica.own_log.effective(session, written))
}

/// `log_pointer` as this process last wrote it on `session`, when known.
fn cached_pointer(replica: &Replica, session: i64) -> Option<u64> {
    replica
        .log_pointer_cache
        .lock()
        .as_ref()
        .filter(|(s, _, _)| *s == session)
        .and_then(|(_, data, _)| std::str::from_utf8(data).ok()?.trim().parse::<u64>().ok())
}

/// Moves the pending pointer past the run of own entries starting at `index`, under the
/// pull lock like every pointer move; false when `index` is not an own entry.
async fn skip_own(replica: &Replica, session: i64, index: u64) -> bool {
    let _pulling = replica.pull_lock.lock().await;
    match replica.own_log.skip_run(session, index) {
        Some(pending) => {
            debug!(replica = %replica.name, log_index = index, pending_log_pointer = pending, "skipped own log entries");
            true
        }
        None => false,
    }
}

/// Writes a deferred pointer (see own_log) with the usual version check. Losing the race
/// to another writer of this replica's pointer only means the skipped entries are read
/// again later, and skipped as held.
async fn flush_pointer(replica: &Replica, client: &zk::Client) -> Result<(), TreeError> {
    let _pulling = replica.pull_lock.lock().await;
    let session = client.session_id().0;
    let Some((target, _)) = replica.own_log.pending(session) else {
        return Ok(());
    };
    let path = replica.paths.replica(&replica.name).log_pointer();
    let (data, version) = current_pointer(replica, client, session).await?;
    if let Some(written) = parse_pointer(&data)
        && written >= target
    {
        replica.own_log.written(session, written);
        return Ok(());
    }
    match client
        .set_data(&path, target.to_string().as_bytes(), Some(version))
        .await
    {
        Ok(stat) => {
            *replica.log_pointer_cache.lock() =
                Some((session, target.to_string().into_bytes(), stat.version));
            replica.own_log.written(session, target);
            debug!(replica = %replica.name, log_pointer = target, "wrote the deferred log pointer");
            Ok(())
        }
        Err(zk::Error::BadVersion) => {
            replica.log_pointer_cache.lock().take();
            replica.own_log.discard_pending(session);
            Ok(())
        }
        Err(e) => {
            replica.log_pointer_cache.lock().take();
            Err(TreeError::zk("set", path, e))
        }
    }
}

async fn sleep_until_some(at: Option<tokio::time::Instant>) {
    match at {
        Some(at) => tokio::time::sleep_until(at).await,
        None => std::future::pending().await,
    }
}

/// Lists `log` and pulls everything at or past the pointer, a batch at a time.
async fn pull_listed(replica: &Arc<Replica>, client: &zk::Client) -> Result<(), TreeError> {
    pull_all_with(replica, client, Some(replica)).await?;
    mark_updated(replica);
    Ok(())
}

fn mark_updated(replica: &Replica) {
    let mut q = replica.queue.lock();
    q.last_queue_update = Some(chrono::Utc::now().timestamp());
    q.last_queue_update_exception = None;
}

/// Copies at most one batch of entries at or past `log_pointer`; returns how many. With
/// `prefetch`, GET_PARTs start downloading as soon as they are read
/// (see `queue::prefetch`). Only the log pull's own task prefetches: merge assignment and
/// the executor pull to learn about entries, not to wait on anything else.
async fn pull_batch(
    replica: &Replica,
    client: &zk::Client,
    children: &[String],
    prefetch: Option<&Arc<Replica>>,
) -> Result<usize, TreeError> {
    // Held until the entries are in memory: a concurrent puller would otherwise see the
    // moved pointer, find nothing new, and believe the queue complete.
    let _pulling = replica.pull_lock.lock().await;
    if replica
        .queue_unsure
        .load(std::sync::atomic::Ordering::SeqCst)
    {
        read_back_queue(replica, client).await?;
        replica
            .queue_unsure
            .store(false, std::sync::atomic::Ordering::SeqCst);
    }
    let rp = replica.paths.replica(&replica.name);
    let session = client.session_id().0;
    let (pointer_data, pointer_version) = current_pointer(replica, client, session).await?;
    let mut indexes: Vec<u64> = children.iter().filter_map(|c| sequence_of(c)).collect();
    indexes.sort_unstable();
    // An empty pointer (a new replica) starts at the oldest entry still in the log; a
    // written one may lag behind own entries skipped since (see own_log).
    let pointer = match parse_pointer(&pointer_data) {
        Some(p) => replica.own_log.effective(session, p),
        None => indexes.first().copied().unwrap_or(0),
    };
    let batch: Vec<u64> = indexes
        .into_iter()
        .filter(|i| *i >= pointer)
        .take(MAX_BATCH)
        .collect();
    let Some(&last) = batch.last() else {
        if pointer_data.is_empty() {
            replica.log_pointer_cache.lock().take();
            set_pointer(client, &rp.log_pointer(), pointer, pointer_version).await?;
        }
        return Ok(0);
    };
    let foreign = replica.own_log.take_foreign(session, &batch);
    let mut entries = read_entries(replica, client, &foreign).await?;
    if let Some(replica) = prefetch {
        super::prefetch::start(replica, &entries);
    }
    // A GET for a part this replica already holds (its own insert) needs no queue node:
    // a held part is in `parts/` already, or its own entry is still queued (a fetch
    // records the part and drops its entry in one multi), so nothing is lost by skipping
    // it, and every insert saves the queue node's create and delete.
    entries.retain(|(_, data)| !already_held(replica, data));
    let next = last + 1;
    if entries.is_empty() && !pointer_data.is_empty() {
        // Nothing to queue: the pointer write waits for the next entry that needs a multi
        // anyway, or for the flush (see own_log). Reading these entries again is harmless.
        replica.own_log.defer(session, next);
        debug!(replica = %replica.name, pending_log_pointer = next, "nothing to queue; log pointer write deferred");
        return Ok(batch.len());
    }
    let results = commit_pull(replica, client, &entries, next, pointer_version).await?;
    *replica.log_pointer_cache.lock() =
        Some((session, next.to_string().into_bytes(), pointer_version + 1));
    replica.own_log.written(session, next);
    remember_queued(replica, &entries, results);
    Metrics::add(&replica.metrics.log_entries_pulled, entries.len() as u64);
    debug!(replica = %replica.name, pulled = entries.len(), log_pointer = next, "pulled log entries");
    replica.queue_notify.notify_one();
    Ok(batch.len())
}

/// `log_pointer`'s data and version: as this process last wrote it on `session`, else read.
async fn current_pointer(
    replica: &Replica,
    client: &zk::Client,
    session: i64,
) -> Result<(Vec<u8>, i32), TreeError> {
    let cached = replica
        .log_pointer_cache
        .lock()
        .clone()
        .filter(|(s, _, _)| *s == session);
    if let Some((_, data, version)) = cached {
        return Ok((data, version));
    }
    let path = replica.paths.replica(&replica.name).log_pointer();
    let (data, stat) = client
        .get_data(&path)
        .await
        .map_err(|e| TreeError::zk("get", path, e))?;
    Ok((data, stat.version))
}

fn parse_pointer(data: &[u8]) -> Option<u64> {
    std::str::from_utf8(data).ok()?.trim().parse::<u64>().ok()
}

/// The entries at `indexes`, in one multi-read; entries gone meanwhile are left out.
async fn read_entries(
    replica: &Replica,
    client: &zk::Client,
    indexes: &[u64],
) -> Result<Vec<(u64, Vec<u8>)>, TreeError> {
    if indexes.is_empty() {
        return Ok(Vec::new());
    }
    let mut reader = client.new_multi_reader();
    for index in indexes {
        reader
            .add_get_data(&replica.paths.log_entry(&log_node_name(*index)))
            .map_err(|e| TreeError::zk("get", replica.paths.log(), e))?;
    }
    let results = reader
        .commit()
        .await
        .map_err(|e| TreeError::zk("multi-get", replica.paths.log(), e))?;
    let mut entries = Vec::with_capacity(indexes.len());
    for (index, result) in indexes.iter().zip(results) {
        match result {
            zk::MultiReadResult::Data { data, .. } => entries.push((*index, data)),
            // Removed by log cleanup after we listed: it is older than every pointer.
            zk::MultiReadResult::Error {
                err: zk::Error::NoNode,
            } => {}
            zk::MultiReadResult::Error { err } => {
                return Err(TreeError::zk(
                    "get",
                    replica.paths.log_entry(&log_node_name(*index)),
                    err,
                ));
            }
            _ => {}
        }
    }
    Ok(entries)
}

/// One multi: a queue node per entry, and `log_pointer` = `next` at `version`.
async fn commit_pull(
    replica: &Replica,
    client: &zk::Client,
    entries: &[(u64, Vec<u8>)],
    next: u64,
    version: i32,
) -> Result<Vec<zk::MultiWriteResult>, TreeError> {
    let rp = replica.paths.replica(&replica.name);
    let mut multi = client.new_multi_writer();
    let prefix = rp.queue_entry_prefix();
    for (_, data) in entries {
        multi
            .add_create(&prefix, data, &replica.zk_acl.persistent_sequential())
            .map_err(|e| TreeError::zk("create", prefix.clone(), e))?;
    }
    // The version check makes a concurrent puller of this replica (an old process whose
    // session has not expired yet) fail rather than queue the entries twice.
    multi
        .add_set_data(
            &rp.log_pointer(),
            next.to_string().as_bytes(),
            Some(version),
        )
        .map_err(|e| TreeError::zk("set", rp.log_pointer(), e))?;
    match multi.commit().await {
        Ok(results) => Ok(results),
        Err(e) => {
            replica.log_pointer_cache.lock().take();
            // A lost connection leaves the outcome unknown: the entries may be queued and
            // the pointer moved. Memory must learn them before anyone trusts the queue
            // (merge selection treats it as complete).
            if !matches!(
                e,
                zk::MultiWriteError::OperationFailed {
                    source: zk::Error::BadVersion,
                    ..
                }
            ) {
                replica
                    .queue_unsure
                    .store(true, std::sync::atomic::Ordering::SeqCst);
            }
            Err(tree::multi_error(
                "pull log",
                &[prefix.clone(), rp.log_pointer()],
                e,
            ))
        }
    }
}

/// Puts the entries the multi queued into memory, under their queue node names.
fn remember_queued(
    replica: &Replica,
    entries: &[(u64, Vec<u8>)],
    results: Vec<zk::MultiWriteResult>,
) {
    let mut queue = replica.queue.lock();
    for ((index, data), result) in entries.iter().zip(results) {
        let zk::MultiWriteResult::Create { path, .. } = result else {
            continue;
        };
        let node_name = path.rsplit('/').next().unwrap_or_default().to_string();
        match std::str::from_utf8(data)
            .map_err(|e| e.to_string())
            .and_then(|t| LogEntry::parse(t).map_err(|e| e.to_string()))
        {
            Ok(entry) => queue.insert(node_name, entry),
            Err(e) => {
                warn!(replica = %replica.name, log_index = index, error = %e, "unreadable log entry queued; reported in /queue and /status");
                queue.note_unreadable(node_name, e);
            }
        }
    }
}

fn already_held(replica: &Replica, data: &[u8]) -> bool {
    let Some(entry) = std::str::from_utf8(data)
        .ok()
        .and_then(|t| LogEntry::parse(t).ok())
    else {
        return false;
    };
    match &entry.kind {
        rtable_protocol::LogEntryKind::Get { part } if entry.quorum == 0 => {
            rtable_protocol::PartName::parse(part).is_ok_and(|name| {
                // A prefetched part is held but not recorded: its entry must be queued.
                replica.store.covering(&name).is_some_and(|have| {
                    !replica.prefetched.contains(&name) && !replica.prefetched.contains(&have)
                })
            })
        }
        _ => false,
    }
}

async fn set_pointer(
    client: &zk::Client,
    path: &str,
    value: u64,
    version: i32,
) -> Result<(), TreeError> {
    match client
        .set_data(path, value.to_string().as_bytes(), Some(version))
        .await
    {
        Ok(_) | Err(zk::Error::BadVersion) => Ok(()),
        Err(e) => Err(TreeError::zk("set", path, e)),
    }
}

/// Adds to memory every entry of `replicas/<me>/queue` it lacks (after a pull whose
/// outcome was unknown). Entries already in memory keep their execution state.
async fn read_back_queue(replica: &Replica, client: &zk::Client) -> Result<(), TreeError> {
    let rp = replica.paths.replica(&replica.name);
    let names = client
        .list_children(&rp.queue())
        .await
        .map_err(|e| TreeError::zk("list", rp.queue(), e))?;
    let missing: Vec<String> = {
        let q = replica.queue.lock();
        let known: std::collections::HashSet<&str> =
            q.items().map(|i| i.node_name.as_str()).collect();
        names
            .into_iter()
            .filter(|n| !known.contains(n.as_str()))
            .collect()
    };
    for name in missing {
        match client.get_data(&rp.queue_entry(&name)).await {
            Ok((data, _)) => {
                if let Some(entry) = std::str::from_utf8(&data)
                    .ok()
                    .and_then(|t| LogEntry::parse(t).ok())
                {
                    replica.queue.lock().insert(name, entry);
                }
            }
            // Executed and removed meanwhile.
            Err(zk::Error::NoNode) => {}
            Err(e) => return Err(TreeError::zk("get", rp.queue_entry(&name), e)),
        }
    }
    replica.queue_notify.notify_one();
    Ok(())
}

/// Loads `replicas/<me>/queue` into memory at activation (entries queued by an earlier
/// process of this replica survive restarts there).
pub async fn load_queue(replica: &Arc<Replica>, client: &zk::Client) -> Result<usize, TreeError> {
    let read = read_queue(replica, client).await?;
    let n = read.entries.len();
    let mut queue = replica.queue.lock();
    queue.clear();
    for (name, entry) in read.entries {
        queue.insert(name, entry);
    }
    for (name, error) in read.unreadable {
        queue.note_unreadable(name, error);
    }
    queue.loaded = true;
    Ok(n)
}

/// `replicas/<me>/queue` as read: the entries in queue order, and the nodes that do not
/// parse with why (kept in ZooKeeper for a person to look at, shown in `/queue`).
pub struct QueueRead {
    pub entries: Vec<(String, LogEntry)>,
    pub unreadable: Vec<(String, String)>,
}

/// Reads `replicas/<me>/queue` in multi-reads of at most MAX_BATCH.
pub async fn read_queue(replica: &Replica, client: &zk::Client) -> Result<QueueRead, TreeError> {
    let rp = replica.paths.replica(&replica.name);
    let mut names = client
        .list_children(&rp.queue())
        .await
        .map_err(|e| TreeError::zk("list", rp.queue(), e))?;
    names.sort();
    let mut loaded = Vec::with_capacity(names.len());
    let mut unreadable = Vec::new();
    for chunk in names.chunks(MAX_BATCH) {
        let mut reader = client.new_multi_reader();
        for name in chunk {
            reader
                .add_get_data(&rp.queue_entry(name))
                .map_err(|e| TreeError::zk("get", rp.queue_entry(name), e))?;
        }
        let results = reader
            .commit()
            .await
            .map_err(|e| TreeError::zk("multi-get", rp.queue(), e))?;
        for (name, result) in chunk.iter().zip(results) {
            if let zk::MultiReadResult::Data { data, .. } = result {
                match std::str::from_utf8(&data)
                    .map_err(|e| e.to_string())
                    .and_then(|t| LogEntry::parse(t).map_err(|e| e.to_string()))
                {
                    Ok(entry) => loaded.push((name.clone(), entry)),
                    Err(e) => {
                        warn!(replica = %replica.name, node = %name, error = %e, "unreadable queue entry left in place; reported in /queue and /status");
                        unreadable.push((name.clone(), e));
                    }
                }
            }
        }
    }
    Ok(QueueRead {
        entries: loaded,
        unreadable,
    })
}

/// Pulls everything in the log right now (merge selection needs an up-to-date queue).
pub async fn pull_all(replica: &Replica, client: &zk::Client) -> Result<(), TreeError> {
    pull_all_with(replica, client, None).await
}

async fn pull_all_with(
    replica: &Replica,
    client: &zk::Client,
    prefetch: Option<&Arc<Replica>>,
) -> Result<(), TreeError> {
    loop {
        let log_path = replica.paths.log();
        let children = client
            .list_children(&log_path)
            .await
            .map_err(|e| TreeError::zk("list", log_path.clone(), e))?;
        if pull_batch(replica, client, &children, prefetch).await? < MAX_BATCH {
            return Ok(());
        }
    }
}
