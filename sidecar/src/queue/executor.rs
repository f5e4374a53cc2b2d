//! Executes queue entries (ClickHouse's queue task): picks runnable entries out of order,
//! runs a bounded number at once, and removes an entry's queue node only in the same multi
//! that records its outcome in `replicas/<me>/parts`.

use std::sync::Arc;
use std::time::{Duration, Instant};

use rand::seq::SliceRandom;
use tracing::{debug, info, warn};
use zookeeper_client as zk;

use rtable_protocol::PartName;
use rtable_protocol::hash::Hash128;
use rtable_protocol::host::HostInfo;
use rtable_protocol::log_entry::LogEntryKind;
use rtable_protocol::part_header::PartHeader;
use rtable_protocol::tree::{self, TreeError};
use rtable_protocol::zk_acl::TreeAcl;

use crate::fetcher::{self, FetchError};
use crate::metrics::Metrics;
use crate::queue::QueueItem;
use crate::quorum;
use crate::replica::Replica;

#[derive(Debug, thiserror::Error)]
pub enum ExecuteError {
    #[error(transparent)]
    Tree(#[from] TreeError),
    #[error(transparent)]
    Fetch(#[from] FetchError),
    #[error("No active replica has part {0} or covering part")]
    NoSource(String),
    /// A merge whose sources are not all here and whose result no replica has yet.
    #[error("{0}")]
    Unavailable(String),
    #[error("{0}")]
    Postponed(String),
    #[error("unparsable part name in queue entry: {0}")]
    BadPart(String),
}

/// Runs forever: executes entries while the replica is active.
pub async fn run(replica: Arc<Replica>) {
    if crate::failpoint::fire(crate::failpoint::EXECUTOR_PANICS) {
        panic!(
            "failpoint {}: the queue executor panics at its start",
            crate::failpoint::EXECUTOR_PANICS
        );
    }
    let (done_tx, mut done_rx) = tokio::sync::mpsc::unbounded_channel::<()>();
    loop {
        let (client, generation) = replica.sessions.wait_active().await;
        let max = replica.cfg.max_concurrent_fetches.max(1);
        let selection = replica.queue.lock().select_runnable(max, Instant::now());
        for (item, reason) in selection.skip {
            let replica = replica.clone();
            let client = client.clone();
            let done = done_tx.clone();
            tokio::spawn(async move {
                let node = item.node_name.clone();
                match drop_entry(&replica, &client, &node).await {
                    Ok(()) => {
                        info!(replica = %replica.name, entry = %node, %reason, "skipped queue entry");
                        replica.queue.lock().remove(&node);
                    }
                    Err(e) => {
                        warn!(replica = %replica.name, entry = %node, error = %e, "could not remove a skipped queue entry; will retry");
                        replica.queue.lock().record_failure(
                            &node,
                            e.to_string(),
                            Some(reason),
                            false,
                        );
                    }
                }
                // Gone when the executor that started this entry was restarted (see
                // `supervisor`): wake the new one, which waits on `queue_notify` only.
                if done.send(()).is_err() {
                    replica.queue_notify.notify_one();
                }
            });
        }
        for item in selection.run {
            let replica = replica.clone();
            let client = client.clone();
            let done = done_tx.clone();
            tokio::spawn(async move {
                let node = item.node_name.clone();
                match execute(&replica, &client, &item).await {
                    Ok(()) => {
                        replica.queue.lock().remove(&node);
                    }
                    Err(e) => {
                        if let ExecuteError::Tree(t) = &e
                            && matches!(
                                t.zk_error(),
                                Some(zk::Error::SessionExpired | zk::Error::ClientClosed)
                            )
                        {
                            replica.sessions.report_expired(generation);
                        }
                        let postpone = match &e {
                            ExecuteError::NoSource(_)
                            | ExecuteError::Unavailable(_)
                            | ExecuteError::Postponed(_)
                            | ExecuteError::Fetch(FetchError::InFlight(_)) => Some(e.to_string()),
                            _ => None,
                        };
                        let no_source =
                            matches!(&e, ExecuteError::NoSource(_) | ExecuteError::Unavailable(_));
                        if matches!(&e, ExecuteError::Fetch(f) if !matches!(f, FetchError::InFlight(_)))
                        {
                            Metrics::inc(&replica.metrics.failed_fetches);
                        }
                        warn!(replica = %replica.name, entry = %node, error = %e, "queue entry failed; will retry");
                        replica.queue.lock().record_failure(
                            &node,
                            e.to_string(),
                            postpone,
                            no_source,
                        );
                    }
                }
                // Gone when the executor that started this entry was restarted (see
                // `supervisor`): wake the new one, which waits on `queue_notify` only.
                if done.send(()).is_err() {
                    replica.queue_notify.notify_one();
                }
            });
        }
        let wake = replica.queue.lock().next_wakeup();
        let sleep = wake
            .map(|t| t.saturating_duration_since(Instant::now()))
            .unwrap_or(Duration::from_secs(60))
            .max(Duration::from_millis(5));
        tokio::select! {
            _ = replica.queue_notify.notified() => {}
            _ = done_rx.recv() => {}
            _ = tokio::time::sleep(sleep) => {}
        }
    }
}

async fn execute(
    replica: &Arc<Replica>,
    client: &zk::Client,
    item: &QueueItem,
) -> Result<(), ExecuteError> {
    match &item.entry.kind {
        LogEntryKind::Get { part } => execute_get(replica, client, item, part).await,
        LogEntryKind::Attach { part, .. } => execute_get(replica, client, item, part).await,
        LogEntryKind::Drop { range } => execute_drop(replica, client, item, range).await,
        LogEntryKind::Merge { sources, into, .. } => {
            execute_merge(replica, client, item, sources, into).await
        }
        other => Err(ExecuteError::Postponed(format!(
            "{} entries are not executed by this version yet ({other:?})",
            item.entry.type_name()
        ))),
    }
}

/// GET_PART: done when this replica already holds the part or a covering one; otherwise
/// fetched from the source replica, or from any active replica that has it.
async fn execute_get(
    replica: &Arc<Replica>,
    client: &zk::Client,
    item: &QueueItem,
    part: &str,
) -> Result<(), ExecuteError> {
    let name = PartName::parse(part).map_err(|_| ExecuteError::BadPart(part.to_string()))?;
    // The log pull's prefetch of this part (or another entry's fetch of it) is about to
    // install it: waiting beats failing with InFlight and backing off.
    fetcher::wait_in_flight(replica, &name, IN_FLIGHT_WAIT).await;
    // The inserter handed the part off here before committing: this entry proves the
    // commit, so the copy turns active.
    let handed_off = match crate::handoff::consume_when_ready(replica, &name).await {
        crate::handoff::Consumed::Arriving => {
            return Err(ExecuteError::Postponed(format!(
                "the handed-off part {name} is still arriving"
            )));
        }
        crate::handoff::Consumed::Active(_) => true,
        crate::handoff::Consumed::None => false,
    };
    if handed_off
        && item.entry.quorum == 0
        && only_remove_entry(replica, client, &item.node_name, &name).await?
    {
        return Ok(());
    }
    if let Some(have) = replica.store.covering(&name) {
        // We hold it (our own insert, prefetched, or fetched before a restart): make sure
        // ZooKeeper agrees, then drop the entry.
        let header = local_header(replica, &have)?;
        crash_if_prefetched(replica, &name);
        let quorum = item.entry.quorum > 0;
        let read = if quorum && have.level == 0 {
            Some(quorum::prepare_ack(replica, client, &have).await)
        } else {
            None
        };
        let ack = Ack::plan(counts(quorum, &have, false), &have, &have, read);
        record_acknowledged(replica, client, &item.node_name, &have, &header, ack).await?;
        replica.prefetched.forget(&name);
        replica.prefetched.forget(&have);
        return Ok(());
    }
    // A quorum part's acknowledgement is read while the part downloads, so that it joins
    // the multi recording the part.
    let download = async {
        if let Some(fetched) = fetch_from_entry_source(replica, item, &name).await {
            return Ok(Download::Done(name.clone(), fetched));
        }
        match find_source(replica, client, &item.entry.source_replica, &name).await {
            Ok((source, address, header_hash)) => {
                let fetched = fetcher::fetch_part(replica, &address, &source, header_hash).await?;
                Ok(Download::Done(source, fetched))
            }
            Err(ExecuteError::NoSource(p)) if item.entry.type_name() == "GET_PART" => {
                Ok(Download::NoSource(p))
            }
            Err(e) => Err(e),
        }
    };
    let quorum = item.entry.quorum > 0;
    let read_ahead = async {
        if quorum && name.level == 0 {
            Some(quorum::prepare_ack(replica, client, &name).await)
        } else {
            None
        }
    };
    let (download, read) = tokio::join!(download, read_ahead);
    let (source, fetched) = match download? {
        Download::Done(source, fetched) => (source, fetched),
        Download::NoSource(p) => return no_source(replica, client, item, &name, p).await,
    };
    replica
        .metrics
        .record_fetch(fetched.bytes, fetched.seconds, source.level > 0);
    let header = PartHeader::new(
        &replica.columns_text,
        fetched.part.rows,
        &fetched.part.checksums,
    );
    let ack = Ack::plan(counts(quorum, &source, true), &source, &name, read);
    record_acknowledged(
        replica,
        client,
        &item.node_name,
        &source,
        &header.render(),
        ack,
    )
    .await?;
    info!(
        replica = %replica.name,
        part = %source,
        bytes = fetched.bytes,
        mb_per_s = fetched.bytes as f64 / 1e6 / fetched.seconds.max(1e-9),
        "fetched part"
    );
    retire_covered(replica, client, &source).await?;
    retire_if_covered(replica, client, &source).await?;
    Ok(())
}

/// How a GET's download ended.
enum Download {
    Done(PartName, fetcher::Fetched),
    /// No active replica has the part (the entry's `NoSource` handling applies).
    NoSource(String),
}

/// How this replica's quorum acknowledgement of a part it records gets written.
#[derive(Debug)]
enum Ack {
    /// Nothing to count: no quorum asked, or its node no longer needs this replica.
    None,
    /// In the multi that records the part.
    Folded(quorum::PendingAck),
    /// After the record ([`quorum::acknowledge`]): a merged part standing in for the parts
    /// it covers, or no acknowledgement could be read ahead.
    After,
}

/// Whether recording `recorded` counts this replica toward a quorum: the entry asked for
/// one, or a merged part was just `fetched`, standing in for the parallel quorums of the
/// parts it covers (a covering part already held was counted when it was merged or
/// fetched here).
fn counts(quorum: bool, recorded: &PartName, fetched: bool) -> bool {
    quorum || (fetched && recorded.level > 0)
}

impl Ack {
    /// `counts`: see [`counts`]; `recorded`: the part recorded (the entry's, or one
    /// covering it); `read`: the acknowledgement of `entry_part` read ahead, if it was.
    fn plan(
        counts: bool,
        recorded: &PartName,
        entry_part: &PartName,
        read: Option<Result<Option<quorum::PendingAck>, TreeError>>,
    ) -> Ack {
        if !counts {
            return Ack::None;
        }
        match read {
            Some(Ok(Some(ack))) if recorded == entry_part => Ack::Folded(ack),
            Some(Ok(None)) if recorded == entry_part => Ack::None,
            _ => Ack::After,
        }
    }
}

/// Records `part` for queue entry `queue_node`, with the quorum acknowledgement `ack`.
async fn record_acknowledged(
    replica: &Replica,
    client: &zk::Client,
    queue_node: &str,
    part: &PartName,
    header: &str,
    ack: Ack,
) -> Result<(), ExecuteError> {
    let name = part.to_string();
    let acknowledge_after = match ack {
        Ack::Folded(ack) => {
            if record_folded(replica, client, queue_node, &name, header, &ack).await? {
                ack.log_done(replica);
                return Ok(());
            }
            true
        }
        Ack::None => false,
        Ack::After => true,
    };
    commit_outcome(replica, client, queue_node, &name, header).await?;
    if acknowledge_after {
        quorum::acknowledge(replica, client, part).await?;
    }
    Ok(())
}

/// Adds the record of a queue entry's outcome: the part's node created, the entry's gone.
fn add_record(
    multi: &mut zk::MultiWriter<'_>,
    acl: &TreeAcl,
    part_path: &str,
    queue_path: &str,
    header: &str,
) -> Result<(), TreeError> {
    multi
        .add_create(part_path, header.as_bytes(), &acl.persistent())
        .map_err(|e| TreeError::zk("create", part_path.to_string(), e))?;
    multi
        .add_delete(queue_path, None)
        .map_err(|e| TreeError::zk("delete", queue_path.to_string(), e))
}

/// One multi: the part recorded, the queue node gone and the quorum counted. `false`
/// when any of it no longer applies (the quorum node changed, an earlier attempt did
/// part of it): the caller then does each step on its own.
async fn record_folded(
    replica: &Replica,
    client: &zk::Client,
    queue_node: &str,
    part: &str,
    header: &str,
    ack: &quorum::PendingAck,
) -> Result<bool, ExecuteError> {
    let rp = replica.paths.replica(&replica.name);
    let part_path = rp.part(part);
    let queue_path = rp.queue_entry(queue_node);
    let mut multi = client.new_multi_writer();
    add_record(&mut multi, &replica.zk_acl, &part_path, &queue_path, header)?;
    ack.add_to(&mut multi)?;
    match multi.commit().await {
        Ok(_) => Ok(true),
        Err(zk::MultiWriteError::OperationFailed { .. }) => Ok(false),
        Err(e) => {
            Err(tree::multi_error("record part and quorum", &[part_path, queue_path], e).into())
        }
    }
}

/// A handed-off part whose commit reached its quorum: that commit recorded it here, so
/// one multi checks the record and removes the entry. `false`: not so, record as usual.
async fn only_remove_entry(
    replica: &Replica,
    client: &zk::Client,
    queue_node: &str,
    part: &PartName,
) -> Result<bool, ExecuteError> {
    let rp = replica.paths.replica(&replica.name);
    let part_path = rp.part(&part.to_string());
    let queue_path = rp.queue_entry(queue_node);
    let mut multi = client.new_multi_writer();
    multi
        .add_check_version(&part_path, -1)
        .map_err(|e| TreeError::zk("check", part_path.clone(), e))?;
    multi
        .add_delete(&queue_path, None)
        .map_err(|e| TreeError::zk("delete", queue_path.clone(), e))?;
    match multi.commit().await {
        Ok(_) => Ok(true),
        Err(zk::MultiWriteError::OperationFailed { .. }) => Ok(false),
        Err(e) => Err(tree::multi_error(
            "remove entry of a handed-off part",
            &[part_path, queue_path],
            e,
        )
        .into()),
    }
}

/// How long a GET waits for a download of its part already in flight (see execute_get).
const IN_FLIGHT_WAIT: Duration = Duration::from_secs(30);

/// The failpoint of a fetch installed but not recorded, for a prefetched part: its gap
/// before the record is here, once its queue entry exists (the fetcher skips a prefetch).
fn crash_if_prefetched(replica: &Replica, part: &PartName) {
    if replica.prefetched.contains(part)
        && crate::failpoint::fire(crate::failpoint::CRASH_BEFORE_RECORDING_FETCH)
    {
        tracing::error!(replica = %replica.name, %part, "failpoint crash_before_recording_fetch: exiting with the prefetched part installed but not in ZooKeeper");
        std::process::abort();
    }
}

/// The common case in one hop: the entry's source inserted the part and still holds it,
/// at the address its `host` node had when last read. The fetch verifies every file's
/// hash as always; only the check against the source's `parts/` header is left out.
/// `None` (no address known, the source gone, the part merged away...): the caller asks
/// ZooKeeper who holds what.
async fn fetch_from_entry_source(
    replica: &Replica,
    item: &QueueItem,
    part: &PartName,
) -> Option<fetcher::Fetched> {
    let source = &item.entry.source_replica;
    if source == &replica.name || item.num_tries > 0 {
        return None;
    }
    let address = replica.peer_addresses.lock().get(source).cloned()?;
    match fetcher::fetch_part(replica, &address, part, None).await {
        Ok(fetched) => Some(fetched),
        Err(e) => {
            debug!(replica = %replica.name, %part, %source, error = %e, "direct fetch from the entry's source failed; asking ZooKeeper");
            replica.peer_addresses.lock().remove(source);
            None
        }
    }
}

/// No active replica has the part. A quorum insert's part fails its quorum (the client
/// retries); a part no replica lists at all, even covered, is lost and stops being waited
/// for; otherwise the entry waits for a replica to come back.
async fn no_source(
    replica: &Arc<Replica>,
    client: &zk::Client,
    item: &QueueItem,
    part: &PartName,
    message: String,
) -> Result<(), ExecuteError> {
    let name = part.to_string();
    // Not lost: its partition was dropped (on every replica, since none lists it). The
    // DROP_RANGE may sit in the log past this replica's pointer; pull it first. A quorum
    // is not failed either: the part was committed, then dropped.
    if let Some(cover) = dropped_by(replica, client, part).await? {
        info!(replica = %replica.name, part = %name, %cover, "no replica holds the part because a drop range removes it; skipping it");
        drop_entry(replica, client, &item.node_name).await?;
        return Ok(());
    }
    if item.entry.quorum > 0 && quorum::fail(replica, client, part, &item.entry.block_id).await? {
        drop_entry(replica, client, &item.node_name).await?;
        return Ok(());
    }
    let failed = client
        .check_stat(&quorum::failed_path(replica, &name))
        .await
        .map_err(|e| TreeError::zk("exists", quorum::failed_path(replica, &name), e))?
        .is_some();
    if failed {
        drop_entry(replica, client, &item.node_name).await?;
        return Ok(());
    }
    if !anyone_has(replica, client, part).await? {
        warn!(replica = %replica.name, part = %name, "no replica holds the part or a covering part; declaring it lost");
        Metrics::inc(&replica.metrics.lost_parts);
        replica
            .lost_part_count
            .fetch_add(1, std::sync::atomic::Ordering::Relaxed);
        drop_entry(replica, client, &item.node_name).await?;
        return Ok(());
    }
    Err(ExecuteError::NoSource(message))
}

/// The drop range (a virtual part covering `part`) queued, executing or executed here,
/// after pulling the log so that a drop published since the last pull counts too.
async fn dropped_by(
    replica: &Replica,
    client: &zk::Client,
    part: &PartName,
) -> Result<Option<crate::queue::DropCover>, ExecuteError> {
    if let Some(cover) = replica.queue.lock().dropped_by(part) {
        return Ok(Some(cover));
    }
    crate::queue::pull::pull_all(replica, client).await?;
    Ok(replica.queue.lock().dropped_by(part))
}

async fn drop_entry(
    replica: &Replica,
    client: &zk::Client,
    node: &str,
) -> Result<(), ExecuteError> {
    let path = replica.paths.replica(&replica.name).queue_entry(node);
    match client.delete(&path, None).await {
        Ok(()) | Err(zk::Error::NoNode) => Ok(()),
        Err(e) => Err(TreeError::zk("delete", path, e).into()),
    }
}

/// Whether any replica, active or not, lists the part or a covering part.
async fn anyone_has(
    replica: &Replica,
    client: &zk::Client,
    part: &PartName,
) -> Result<bool, ExecuteError> {
    Ok(quorum::holders(replica, client, part).await? > 0)
}

/// Whether a merge whose sources are all here should rather fetch its result from a
/// replica that has it: the merge is big (`source_bytes` at least `size_threshold`) and
/// its entry old (`entry_age_seconds` at least `time_threshold`), so the result most likely
/// exists somewhere and copying it is cheaper than merging it again.
pub fn prefer_fetch_merged(
    source_bytes: u64,
    entry_age_seconds: i64,
    size_threshold: u64,
    time_threshold: Duration,
) -> bool {
    source_bytes >= size_threshold && entry_age_seconds.max(0) as u64 >= time_threshold.as_secs()
}

/// MERGE_PARTS: merge locally when every source is here, else fetch the merged part; a
/// big old merge is fetched even with every source here when a replica has the result.
async fn execute_merge(
    replica: &Arc<Replica>,
    client: &zk::Client,
    item: &QueueItem,
    sources: &[String],
    into: &str,
) -> Result<(), ExecuteError> {
    let into_name = PartName::parse(into).map_err(|_| ExecuteError::BadPart(into.to_string()))?;
    if replica.store.covering(&into_name).is_some() {
        // A retry after the record's outcome was unknown: the sources' nodes may be gone
        // with it while the sources are still active here.
        execute_get(replica, client, item, into).await?;
        return retire_covered(replica, client, &into_name).await;
    }
    let mut local = Vec::with_capacity(sources.len());
    for s in sources {
        let name = PartName::parse(s).map_err(|_| ExecuteError::BadPart(s.clone()))?;
        match replica.store.get(&name) {
            Some(p) => local.push(p),
            None => break,
        }
    }
    if local.len() < sources.len() {
        // Some source is not here: fetch the result if a replica has it, otherwise wait
        // (the sources are on their way, or a peer is merging) unless a missing source is
        // on no replica at all: then the merge can never run anywhere, and every replica
        // drops it by the same rule (the parts that exist stay, and merge again later).
        return match execute_get(replica, client, item, into).await {
            Err(ExecuteError::NoSource(_)) => {
                for source in sources {
                    let name = PartName::parse(source)
                        .map_err(|_| ExecuteError::BadPart(source.clone()))?;
                    if replica.store.covering(&name).is_none()
                        && !anyone_has(replica, client, &name).await?
                    {
                        warn!(replica = %replica.name, part = %into, lost = %source, "a source of the merge is on no replica; dropping the merge");
                        drop_entry(replica, client, &item.node_name).await?;
                        return Ok(());
                    }
                }
                Err(ExecuteError::Unavailable(format!(
                    "not every source of {into} is here and no replica has the merged part yet"
                )))
            }
            other => other,
        };
    }
    // Every source is here. A big merge an active replica already finished is fetched
    // rather than run again (ClickHouse's prefer_fetch_merged_part_*_threshold).
    let source_bytes: u64 = local.iter().map(|p| p.bytes).sum();
    let age = chrono::Utc::now().timestamp() - item.entry.create_time;
    if prefer_fetch_merged(
        source_bytes,
        age,
        replica.cfg.prefer_fetch_merged_part_size_threshold,
        Duration::from_secs(replica.cfg.prefer_fetch_merged_part_time_threshold_seconds),
    ) {
        match execute_get(replica, client, item, into).await {
            Ok(()) => {
                info!(replica = %replica.name, part = %into, source_bytes, "fetched the merged part instead of merging");
                return Ok(());
            }
            Err(e) => {
                debug!(replica = %replica.name, part = %into, error = %e, "no replica to fetch the merged part from; merging locally");
            }
        }
    }
    let started = Instant::now();
    let store = replica.store.clone();
    let schema = replica.table.schema.clone();
    let sources_on_disk: Vec<(PartName, std::path::PathBuf)> = local
        .iter()
        .map(|p| (p.name.clone(), p.dir.clone()))
        .collect();
    let temp = tokio::task::spawn_blocking(move || {
        crate::merge::local::merge_parts(&store, &local, &schema)
    })
    .await
    .map_err(|e| ExecuteError::Postponed(format!("merge task failed: {e}")))?
    .map_err(|e| {
        // A source damaged on disk would fail this merge on every retry: have it checked
        // (an intact one is left alone).
        let message = format!("merge failed: {e}");
        let parts_dir = replica.store.parts_dir();
        for name in crate::part_check::merge_suspects(e.path(), parts_dir, &sources_on_disk) {
            replica.part_check.report(&replica.name, &name, &message);
        }
        ExecuteError::Postponed(message)
    })?;
    let staged = replica
        .store
        .stage(temp, &into_name)
        .map_err(|e| ExecuteError::Postponed(format!("staging merged part: {e}")))?;
    let header = PartHeader::new(&replica.columns_text, staged.rows, &staged.checksums).render();
    // The sources leave `replicas/<me>/parts` in the same multi that records the merged
    // part: a request per source per replica less, and ZooKeeper never lists both.
    if let Err(e) = record_outcome(replica, client, &item.node_name, into, &header, sources).await {
        // The multi may have landed before the connection dropped; then ZooKeeper lists
        // the merged part here and the queue entry is gone, and only the staged copy can
        // make that true. The `parts` node decides its fate once ZooKeeper answers.
        tokio::spawn(crate::outcome::resolve_later(replica.clone(), vec![staged]));
        return Err(e);
    }
    if let Err(e) = replica.store.activate_staged(staged) {
        warn!(replica = %replica.name, part = %into, error = %e, "merged part recorded but not activated");
    }
    Metrics::inc(&replica.metrics.merges);
    // Their nodes left ZooKeeper with the record above; only the active set is left. The
    // merged part may make a new merge possible, as `retire_covered` signals for its own.
    for source in sources {
        if let Ok(name) = PartName::parse(source)
            && replica.store.contains(&name)
        {
            replica.store.retire_covered(&name);
        }
    }
    replica.merge_notify.notify_one();
    quorum::acknowledge(replica, client, &into_name).await?;
    info!(
        replica = %replica.name,
        part = %into,
        sources = sources.len(),
        ms = started.elapsed().as_millis() as u64,
        "merged parts"
    );
    retire_covered(replica, client, &into_name).await?;
    retire_if_covered(replica, client, &into_name).await?;
    Ok(())
}

/// A part that arrived after a wider one covering it (a fetch racing a merge) is retired
/// at once, from ZooKeeper too: otherwise `parts/` would list a part no read ever sees.
async fn retire_if_covered(
    replica: &Arc<Replica>,
    client: &zk::Client,
    part: &PartName,
) -> Result<(), ExecuteError> {
    match replica.store.covering(part) {
        Some(cover) if &cover != part => {
            // The wider part's own retirement may have run before our node existed (a
            // merge used this part as a source while its fetch was being recorded): remove
            // our node by name, not through the store.
            let path = replica.paths.replica(&replica.name).part(&part.to_string());
            match client.delete(&path, None).await {
                Ok(()) | Err(zk::Error::NoNode) => {}
                Err(e) => return Err(TreeError::zk("delete", path, e).into()),
            }
            if replica.store.contains(part) {
                replica.store.retire_covered(part);
            }
            retire_covered(replica, client, &cover).await
        }
        _ => Ok(()),
    }
}

/// DROP_RANGE: waits for running entries that produce parts inside the range and for
/// this replica's own inserts inside it still being committed, cancels queued entries the
/// range covers (wherever they are in the queue), removes the covered parts from
/// ZooKeeper and disk, and remembers the range so that entries inside it arriving later
/// are skipped.
async fn execute_drop(
    replica: &Arc<Replica>,
    client: &zk::Client,
    item: &QueueItem,
    range: &str,
) -> Result<(), ExecuteError> {
    let range_name =
        PartName::parse(range).map_err(|_| ExecuteError::BadPart(range.to_string()))?;
    let (cancel, busy) = {
        let q = replica.queue.lock();
        let mut cancel = Vec::new();
        let mut busy = Vec::new();
        for i in q.items().filter(|i| i.node_name != item.node_name) {
            let Some(part) = i
                .entry
                .new_part_name()
                .and_then(|n| PartName::parse(&n).ok())
            else {
                continue;
            };
            if part.is_drop_range() || part.is_disjoint(&range_name) {
                continue;
            }
            // An entry being skipped is removed by its own task; removing it here too is
            // harmless, and waiting for it would only delay the drop.
            if i.is_currently_executing && !i.skipping {
                busy.push(format!("{} ({part})", i.node_name));
            } else if range_name.contains(&part) {
                cancel.push(i.node_name.clone());
            }
        }
        (cancel, busy)
    };
    if !busy.is_empty() {
        return Err(ExecuteError::Postponed(format!(
            "waiting for running entries inside {range} to finish: {}",
            busy.join(", ")
        )));
    }
    // An insert of this replica inside the range is staged from before its commit until
    // it is active (or, commit reply lost, until its fate is resolved). Its commit came
    // before this drop was published, so the drop must remove it: wait until it is
    // active, or else it would turn active after the listing below and stay forever.
    let staged: Vec<String> = replica
        .store
        .staged_names()
        .into_iter()
        .filter(|n| PartName::parse(n).is_ok_and(|p| !p.is_disjoint(&range_name)))
        .collect();
    if !staged.is_empty() {
        return Err(ExecuteError::Postponed(format!(
            "waiting for parts inside {range} being committed here: {}",
            staged.join(", ")
        )));
    }
    // Copies handed off here inside the range go with their records, once settled.
    if let Err(reason) = crate::handoff::settle_for_drop(replica, client, &range_name).await? {
        return Err(ExecuteError::Postponed(reason));
    }
    let started = Instant::now();
    // One pipelined round of deletes rather than a round trip per node.
    futures::future::try_join_all(cancel.iter().map(|node| drop_entry(replica, client, node)))
        .await?;
    for node in &cancel {
        replica.queue.lock().remove(node);
    }
    let covered: Vec<PartName> = replica
        .store
        .parts()
        .iter()
        .filter(|p| range_name.contains(&p.name))
        .map(|p| p.name.clone())
        .collect();
    futures::future::try_join_all(covered.iter().map(|p| delete_part_node(replica, client, p)))
        .await?;
    let store = replica.store.clone();
    let dropped = {
        let range_name = range_name.clone();
        tokio::task::spawn_blocking(move || store.drop_range(&range_name))
            .await
            .map_err(|e| ExecuteError::Postponed(format!("drop task failed: {e}")))?
            .map_err(|e| ExecuteError::Postponed(format!("dropping parts: {e}")))?
    };
    // A part that turned active between the listing and the removal.
    futures::future::try_join_all(
        dropped
            .iter()
            .filter(|p| !covered.contains(p))
            .map(|p| delete_part_node(replica, client, p)),
    )
    .await?;
    replica.queue.lock().remember_drop(range_name);
    drop_entry(replica, client, &item.node_name).await?;
    info!(
        replica = %replica.name,
        %range,
        parts = dropped.len(),
        cancelled = cancel.len(),
        ms = started.elapsed().as_millis() as u64,
        "dropped range"
    );
    Ok(())
}

async fn delete_part_node(
    replica: &Replica,
    client: &zk::Client,
    part: &PartName,
) -> Result<(), ExecuteError> {
    let path = replica.paths.replica(&replica.name).part(&part.to_string());
    match client.delete(&path, None).await {
        Ok(()) | Err(zk::Error::NoNode) => Ok(()),
        Err(e) => Err(TreeError::zk("delete", path, e).into()),
    }
}

/// Parts a newer part covers leave ZooKeeper first, then the active set; their files go
/// once no read snapshot holds them.
async fn retire_covered(
    replica: &Arc<Replica>,
    client: &zk::Client,
    by: &PartName,
) -> Result<(), ExecuteError> {
    let covered: Vec<PartName> = replica
        .store
        .parts()
        .iter()
        .filter(|p| &p.name != by && by.contains(&p.name))
        .map(|p| p.name.clone())
        .collect();
    if covered.is_empty() {
        return Ok(());
    }
    let rp = replica.paths.replica(&replica.name);
    for part in &covered {
        match client.delete(&rp.part(&part.to_string()), None).await {
            Ok(()) | Err(zk::Error::NoNode) => {}
            Err(e) => return Err(TreeError::zk("delete", rp.part(&part.to_string()), e).into()),
        }
        replica.store.retire_covered(part);
    }
    replica.merge_notify.notify_one();
    Ok(())
}

fn local_header(replica: &Replica, part: &PartName) -> Result<String, ExecuteError> {
    let active = replica
        .store
        .get(part)
        .ok_or_else(|| ExecuteError::Postponed(format!("part {part} vanished locally")))?;
    Ok(PartHeader::new(&replica.columns_text, active.rows, &active.checksums).render())
}

/// One multi: `replicas/<me>/parts/<part>` exists and the queue node is gone. Either may
/// already be true (a retry after a lost connection).
async fn commit_outcome(
    replica: &Replica,
    client: &zk::Client,
    queue_node: &str,
    part: &str,
    header: &str,
) -> Result<(), ExecuteError> {
    record_outcome(replica, client, queue_node, part, header, &[]).await
}

/// `commit_outcome` that also removes `retired` parts' nodes in the same multi (a merge's
/// sources). Any of it may already be done (a retry after a lost connection, a source
/// whose node another path removed): then the rest is done one request at a time.
async fn record_outcome(
    replica: &Replica,
    client: &zk::Client,
    queue_node: &str,
    part: &str,
    header: &str,
    retired: &[String],
) -> Result<(), ExecuteError> {
    let rp = replica.paths.replica(&replica.name);
    let part_path = rp.part(part);
    let queue_path = rp.queue_entry(queue_node);
    let retired_paths: Vec<String> = retired.iter().map(|r| rp.part(r)).collect();
    // Optimistic: nearly always nothing is done yet, so no read first.
    let mut multi = client.new_multi_writer();
    add_record(&mut multi, &replica.zk_acl, &part_path, &queue_path, header)?;
    for path in &retired_paths {
        multi
            .add_delete(path, None)
            .map_err(|e| TreeError::zk("delete", path.clone(), e))?;
    }
    match multi.commit().await {
        Ok(_) => Ok(()),
        Err(zk::MultiWriteError::OperationFailed {
            source: zk::Error::NoNode | zk::Error::NodeExists,
            ..
        }) => {
            // Someone (an earlier attempt) did part of it; do the rest one by one. The
            // merged part is recorded before its sources go, as in the multi.
            match client
                .create(&part_path, header.as_bytes(), &replica.zk_acl.persistent())
                .await
            {
                Ok(_) | Err(zk::Error::NodeExists) => {}
                Err(e) => return Err(TreeError::zk("create", part_path, e).into()),
            }
            for path in retired_paths.into_iter().chain([queue_path]) {
                match client.delete(&path, None).await {
                    Ok(()) | Err(zk::Error::NoNode) => {}
                    Err(e) => return Err(TreeError::zk("delete", path, e).into()),
                }
            }
            Ok(())
        }
        Err(e) => {
            let mut paths = vec![part_path, queue_path];
            paths.extend(retired_paths);
            Err(tree::multi_error("record part", &paths, e).into())
        }
    }
}

/// The replica to fetch from: the entry's source when it is active and has the part (or
/// a covering part), else any active replica that does, in random order so load spreads.
/// The entry's source nearly always has the part: it is asked first with one multi-read,
/// without listing the replicas, so the common case costs a single round trip.
async fn find_source(
    replica: &Replica,
    client: &zk::Client,
    preferred: &str,
    part: &PartName,
) -> Result<(PartName, String, Option<Hash128>), ExecuteError> {
    let mut asked = Vec::new();
    if !preferred.is_empty() && preferred != replica.name {
        asked.push(preferred.to_string());
        if let Some(found) = probe_sources(replica, client, &asked, part).await? {
            return Ok(found);
        }
    }
    let mut candidates = tree::list_replicas(client, &replica.paths).await?;
    candidates.retain(|r| r != &replica.name && !asked.contains(r));
    candidates.shuffle(&mut rand::rng());
    if candidates.is_empty() {
        return Err(ExecuteError::NoSource(part.to_string()));
    }
    match probe_sources(replica, client, &candidates, part).await? {
        Some(found) => Ok(found),
        None => Err(ExecuteError::NoSource(part.to_string())),
    }
}

/// One multi-read of every candidate's `is_active`, `host` and `parts/<part>`; the first
/// active candidate (in the given order) holding the part wins. When none holds the part
/// itself, the active candidates' part lists are searched for a covering part, one
/// candidate at a time in the same order (a list can be long; it is read only then).
async fn probe_sources(
    replica: &Replica,
    client: &zk::Client,
    candidates: &[String],
    part: &PartName,
) -> Result<Option<(PartName, String, Option<Hash128>)>, ExecuteError> {
    let part_text = part.to_string();
    let mut reader = client.new_multi_reader();
    let mut paths = Vec::with_capacity(candidates.len() * 3);
    for candidate in candidates {
        let rp = replica.paths.replica(candidate);
        for path in [rp.is_active(), rp.host(), rp.part(&part_text)] {
            reader
                .add_get_data(&path)
                .map_err(|e| TreeError::zk("get", path.clone(), e))?;
            paths.push(path);
        }
    }
    let results = reader
        .commit()
        .await
        .map_err(|e| TreeError::zk("multi-get", replica.paths.replicas(), e))?;
    // Per path: its data, or None when the node does not exist.
    let mut data: Vec<Option<Vec<u8>>> = Vec::with_capacity(paths.len());
    for (path, result) in paths.iter().zip(results) {
        match result {
            zk::MultiReadResult::Data { data: d, .. } => data.push(Some(d)),
            zk::MultiReadResult::Error {
                err: zk::Error::NoNode,
            } => data.push(None),
            zk::MultiReadResult::Error { err } => {
                return Err(TreeError::zk("get", path.clone(), err).into());
            }
            // A get_data answers with data or an error; nothing else can come back.
            _ => data.push(None),
        }
    }
    // (candidate, address, its `parts/<part>` header when it has the part itself)
    let mut active: Vec<(&String, String, Option<&Vec<u8>>)> = Vec::new();
    for (candidate, fields) in candidates.iter().zip(data.chunks(3)) {
        let [is_active, host, header] = fields else {
            continue;
        };
        if is_active.is_none() {
            continue;
        }
        let Some(host) = host
            .as_ref()
            .and_then(|h| std::str::from_utf8(h).ok())
            .and_then(|h| HostInfo::parse(h).ok())
        else {
            continue;
        };
        replica
            .peer_addresses
            .lock()
            .insert(candidate.clone(), host.address());
        active.push((candidate, host.address(), header.as_ref()));
    }
    if let Some((_, address, Some(header))) = active.iter().find(|(_, _, h)| h.is_some()) {
        return Ok(Some((part.clone(), address.clone(), header_hash(header))));
    }
    for (candidate, address, _) in active {
        let rp = replica.paths.replica(candidate);
        let children = match client.list_children(&rp.parts()).await {
            Ok(children) => children,
            Err(zk::Error::NoNode) => continue,
            Err(e) => return Err(TreeError::zk("list", rp.parts(), e).into()),
        };
        let covering = children
            .iter()
            .filter_map(|c| PartName::parse(c).ok())
            .filter(|c| c.contains(part))
            .max_by_key(|c| (c.level, c.max_block - c.min_block));
        let Some(covering) = covering else {
            continue;
        };
        match client.get_data(&rp.part(&covering.to_string())).await {
            Ok((header, _)) => {
                return Ok(Some((covering, address, header_hash(&header))));
            }
            Err(zk::Error::NoNode) => continue,
            Err(e) => {
                return Err(TreeError::zk("get", rp.part(&covering.to_string()), e).into());
            }
        }
    }
    Ok(None)
}

/// The checksums hash in a `parts/<part>` header, when it parses.
fn header_hash(data: &[u8]) -> Option<Hash128> {
    std::str::from_utf8(data)
        .ok()
        .and_then(|t| PartHeader::parse(t).ok())
        .map(|h| h.checksums_hash)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn part(name: &str) -> PartName {
        PartName::parse(name).expect("part name")
    }

    #[test]
    fn a_quorum_ack_read_ahead_joins_the_record_of_the_same_part() {
        let p = part("202501_3_3_0");
        let read = Some(Ok(Some(quorum::PendingAck::counting("202501_3_3_0"))));
        assert!(matches!(Ack::plan(true, &p, &p, read), Ack::Folded(_)));
        // The node no longer needs this replica (reached, failed, or counted it already).
        assert!(matches!(Ack::plan(true, &p, &p, Some(Ok(None))), Ack::None));
        assert!(
            matches!(Ack::plan(counts(false, &p, true), &p, &p, None), Ack::None),
            "no quorum asked"
        );
    }

    #[test]
    fn a_quorum_ack_that_was_not_read_ahead_follows_the_record() {
        let p = part("202501_3_3_0");
        let covering = part("202501_1_5_1");
        let read = Some(Ok(Some(quorum::PendingAck::counting("202501_3_3_0"))));
        assert!(
            matches!(Ack::plan(true, &covering, &p, read), Ack::After),
            "a covering part was fetched instead of the entry's"
        );
        let failed = Some(Err(TreeError::Corrupt {
            path: "/t/quorum/parallel/202501_3_3_0".into(),
            message: "unreadable".into(),
        }));
        assert!(matches!(Ack::plan(true, &p, &p, failed), Ack::After));
        assert!(
            matches!(
                Ack::plan(counts(false, &covering, true), &covering, &covering, None),
                Ack::After
            ),
            "a merged part counts toward the quorums of the parts it covers"
        );
        assert!(
            matches!(
                Ack::plan(counts(false, &covering, false), &covering, &p, None),
                Ack::None
            ),
            "a covering part held already was counted when it came"
        );
    }

    #[test]
    fn a_merge_is_fetched_only_when_big_and_old_enough() {
        const GIB: u64 = 1 << 30;
        let hour = Duration::from_secs(3600);
        let size = crate::config::PREFER_FETCH_MERGED_PART_SIZE_THRESHOLD;
        let time = crate::config::PREFER_FETCH_MERGED_PART_TIME_THRESHOLD;
        assert_eq!((size, time), (10 * GIB, hour), "ClickHouse's defaults");
        assert!(prefer_fetch_merged(10 * GIB, 3600, size, time));
        assert!(prefer_fetch_merged(40 * GIB, 7200, size, time));
        // Small merges, or fresh entries (the result may not exist yet), run locally.
        assert!(!prefer_fetch_merged(10 * GIB - 1, 7200, size, time));
        assert!(!prefer_fetch_merged(40 * GIB, 3599, size, time));
        // A create_time in the future (clock skew) counts as age 0.
        assert!(!prefer_fetch_merged(40 * GIB, -5, size, time));
        assert!(prefer_fetch_merged(0, -5, 0, Duration::ZERO));
    }
}
