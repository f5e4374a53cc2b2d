//! Group commit. Concurrent inserts queue their blocks here; one task takes everything
//! waiting, allocates all block numbers in one multi and commits all blocks in another, so
//! N concurrent inserts cost two ZooKeeper round trips instead of 2N. Every block keeps
//! its own dedup id, log entry and part, so atomicity and dedup stay per insert: a
//! duplicate found in the group is answered as such and the rest is retried without it.

use std::collections::{HashMap, HashSet};
use std::sync::Arc;
use std::time::Duration;

use tokio::sync::{mpsc, oneshot};
use tracing::{debug, info, warn};
use zookeeper_client as zk;

use rtable_protocol::part_header::PartHeader;
use rtable_protocol::paths::sequence_of;
use rtable_protocol::quorum::QuorumEntry;
use rtable_protocol::tree::{self, TreeError};
use rtable_protocol::{LogEntry, PartName};

use crate::metrics::Metrics;
use crate::replica::Replica;
use crate::sink::{Block, BlockOutcome, InsertError};
use crate::store::StagedPart;

/// Ops per block: log entry, lock removal, blocks node, parts node. 100 blocks keep a
/// multi far below ZooKeeper's 1 MB packet limit.
const MAX_GROUP_BLOCKS: usize = 100;
const MAX_ATTEMPTS: usize = 5;

type Reply = oneshot::Sender<Result<Vec<BlockOutcome>, InsertError>>;

struct Job {
    blocks: Vec<Block>,
    reply: Reply,
}

#[derive(Clone)]
pub struct Committer {
    tx: mpsc::Sender<Job>,
}

impl Committer {
    pub fn start(replica: Arc<Replica>) -> Committer {
        let (tx, rx) = mpsc::channel(1024);
        tokio::spawn(run(replica, rx));
        Committer { tx }
    }

    pub async fn commit(&self, blocks: Vec<Block>) -> Result<Vec<BlockOutcome>, InsertError> {
        if blocks.is_empty() {
            return Ok(Vec::new());
        }
        let (reply, rx) = oneshot::channel();
        self.tx
            .send(Job { blocks, reply })
            .await
            .map_err(|_| InsertError::Internal("committer stopped".to_string()))?;
        rx.await
            .map_err(|_| InsertError::Internal("committer dropped the insert".to_string()))?
    }
}

async fn run(replica: Arc<Replica>, mut rx: mpsc::Receiver<Job>) {
    let mut known_partitions: HashSet<String> = HashSet::new();
    while let Some(first) = rx.recv().await {
        let mut jobs = vec![first];
        let mut n = jobs[0].blocks.len();
        while n < MAX_GROUP_BLOCKS {
            match rx.try_recv() {
                Ok(job) => {
                    n += job.blocks.len();
                    jobs.push(job);
                }
                Err(_) => break,
            }
        }
        commit_group(&replica, &mut known_partitions, jobs).await;
    }
}

/// A block on its way through the group, remembering which job it belongs to.
struct Pending {
    job: usize,
    slot: usize,
    block_id: String,
    partition_id: String,
    /// This attempt's `block_numbers/<partition>/block-N` lock.
    lock: Option<String>,
    quorum: u32,
    quorum_mode: crate::quorum::Mode,
    state: PendingState,
}

enum PendingState {
    Temp(crate::store::TempPart),
    Staged(StagedPart),
    Done(BlockOutcome),
    /// Same dedup id as an earlier block of this group: its outcome is that block's.
    SameAs(usize),
}

async fn commit_group(
    replica: &Arc<Replica>,
    known_partitions: &mut HashSet<String>,
    jobs: Vec<Job>,
) {
    let mut replies: Vec<Reply> = Vec::with_capacity(jobs.len());
    let mut pending: Vec<Pending> = Vec::new();
    let mut first_by_id: HashMap<String, usize> = HashMap::new();
    let mut failed_jobs: HashMap<usize, InsertError> = HashMap::new();
    for (job_index, job) in jobs.into_iter().enumerate() {
        replies.push(job.reply);
        for (slot, block) in job.blocks.into_iter().enumerate() {
            let index = pending.len();
            let state = match first_by_id.get(&block.block_id) {
                Some(&first) => {
                    replica.store.discard_temp(block.temp);
                    PendingState::SameAs(first)
                }
                None => {
                    first_by_id.insert(block.block_id.clone(), index);
                    PendingState::Temp(block.temp)
                }
            };
            pending.push(Pending {
                job: job_index,
                slot,
                block_id: block.block_id,
                partition_id: block.partition_id,
                lock: None,
                quorum: block.quorum,
                quorum_mode: block.quorum_mode,
                state,
            });
        }
    }
    let result = commit_pending(replica, known_partitions, &mut pending).await;
    if let Err(e) = &result {
        // Whatever did not reach a known outcome is discarded (never acknowledged), except
        // staged parts whose commit may have happened: those wait for a resolver.
        let mut unresolved: Vec<StagedPart> = Vec::new();
        for p in pending.iter_mut() {
            match std::mem::replace(&mut p.state, PendingState::SameAs(usize::MAX)) {
                PendingState::Temp(t) => replica.store.discard_temp(t),
                PendingState::Staged(s) => unresolved.push(s),
                other => p.state = other,
            }
            if !matches!(p.state, PendingState::Done(_)) {
                failed_jobs.entry(p.job).or_insert_with(|| clone_error(e));
            }
        }
        if !unresolved.is_empty() {
            tokio::spawn(resolve_later(replica.clone(), unresolved));
        }
    }
    // Assemble every job's answer in its own block order.
    let outcomes: Vec<Option<BlockOutcome>> = (0..pending.len())
        .map(|i| {
            let mut at = i;
            for _ in 0..2 {
                match &pending[at].state {
                    PendingState::Done(o) => {
                        return Some(match (o, at == i) {
                            (o, true) => o.clone(),
                            // A later copy of a block committed in this very group is a duplicate of it.
                            (
                                BlockOutcome::Committed { part } | BlockOutcome::Duplicate { part },
                                false,
                            ) => BlockOutcome::Duplicate { part: part.clone() },
                        });
                    }
                    PendingState::SameAs(first) if *first < pending.len() => at = *first,
                    _ => return None,
                }
            }
            None
        })
        .collect();
    let mut per_job: Vec<Vec<(usize, BlockOutcome)>> =
        (0..replies.len()).map(|_| Vec::new()).collect();
    for (p, outcome) in pending.iter().zip(outcomes) {
        match outcome {
            Some(o) => per_job[p.job].push((p.slot, o)),
            None => {
                failed_jobs.entry(p.job).or_insert_with(|| {
                    InsertError::Internal("block left without outcome".to_string())
                });
            }
        }
    }
    for (job, (reply, mut outcomes)) in replies.into_iter().zip(per_job).enumerate() {
        let answer = match failed_jobs.remove(&job) {
            Some(e) => Err(e),
            None => {
                outcomes.sort_by_key(|(slot, _)| *slot);
                Ok(outcomes.into_iter().map(|(_, o)| o).collect())
            }
        };
        let _ = reply.send(answer);
    }
}

fn clone_error(e: &InsertError) -> InsertError {
    match e {
        InsertError::ReadOnly(s) => InsertError::ReadOnly(s.clone()),
        InsertError::Unavailable(s) => InsertError::Unavailable(s.clone()),
        InsertError::OutcomeUnknown(s) => InsertError::OutcomeUnknown(s.clone()),
        other => InsertError::Internal(other.to_string()),
    }
}

fn is_connection_error(e: &zk::Error) -> bool {
    tree::is_transient(e)
}

/// Allocates and commits every block still open; returns an error only for blocks whose
/// fate is not known (those stay open in `pending`).
async fn commit_pending(
    replica: &Arc<Replica>,
    known_partitions: &mut HashSet<String>,
    pending: &mut [Pending],
) -> Result<(), InsertError> {
    let mut attempt = 0;
    loop {
        attempt += 1;
        let open: Vec<usize> = (0..pending.len())
            .filter(|&i| {
                matches!(
                    pending[i].state,
                    PendingState::Temp(_) | PendingState::Staged(_)
                )
            })
            .collect();
        if open.is_empty() {
            return Ok(());
        }
        if attempt > MAX_ATTEMPTS {
            return Err(InsertError::Unavailable(format!(
                "gave up after {MAX_ATTEMPTS} attempts to commit"
            )));
        }
        let (client, generation) = replica
            .sessions
            .active()
            .map_err(|e| InsertError::ReadOnly(e.reason))?;
        ensure_partitions(replica, &client, known_partitions, pending, &open).await?;
        let t0 = std::time::Instant::now();
        let numbers = match allocate(replica, &client, pending, &open).await {
            Ok(Some(numbers)) => numbers,
            // A duplicate was found and answered; allocate the rest again. Duplicates are
            // progress, not failed attempts.
            Ok(None) => {
                attempt -= 1;
                continue;
            }
            Err(e) => {
                if matches!(
                    e.zk_error(),
                    Some(zk::Error::SessionExpired | zk::Error::ClientClosed)
                ) {
                    replica.sessions.report_expired(generation);
                }
                if e.is_transient() {
                    tokio::time::sleep(Duration::from_millis(100 * attempt as u64)).await;
                    continue;
                }
                return Err(InsertError::Unavailable(e.to_string()));
            }
        };
        // Name every block by its number; a staged part from an earlier attempt is renamed.
        for (&i, (number, lock)) in open.iter().zip(&numbers) {
            let name = PartName::new_insert(&pending[i].partition_id, *number);
            let state = std::mem::replace(&mut pending[i].state, PendingState::SameAs(usize::MAX));
            let staged = match state {
                PendingState::Temp(t) => replica.store.stage(t, &name),
                PendingState::Staged(s) => replica.store.restage(s, &name),
                _ => unreachable_state(),
            };
            match staged {
                Ok(s) => {
                    pending[i].lock = Some(lock.clone());
                    pending[i].state = PendingState::Staged(s);
                }
                Err(e) => {
                    // The part is gone with the failed rename; the insert fails as a whole.
                    return Err(InsertError::Store(e));
                }
            }
        }
        let t1 = std::time::Instant::now();
        let committed = commit(replica, &client, pending, &open).await;
        let t2 = std::time::Instant::now();
        match committed {
            CommitResult::Committed => {
                Metrics::inc(&replica.metrics.insert_commits);
                for &i in &open {
                    activate(replica, &mut pending[i]);
                }
                debug!(
                    blocks = open.len(),
                    allocate_and_stage_us = (t1 - t0).as_micros() as u64,
                    commit_us = (t2 - t1).as_micros() as u64,
                    activate_us = t2.elapsed().as_micros() as u64,
                    "group commit timing"
                );
                replica.pull_notify.notify_one();
                replica.merge_notify.notify_one();
                return Ok(());
            }
            CommitResult::Duplicate(i) => {
                // Someone committed the same block between our allocation and commit.
                let existing = existing_part(&client, replica, &pending[i].block_id).await;
                release_lock(&client, pending[i].lock.take()).await;
                if let PendingState::Staged(s) =
                    std::mem::replace(&mut pending[i].state, PendingState::SameAs(usize::MAX))
                {
                    replica.store.discard_staged(s);
                }
                pending[i].state = PendingState::Done(BlockOutcome::Duplicate { part: existing });
                attempt -= 1;
                // Locks of the others are still ours: allocate anew (simplest; the old
                // numbers are released by the next attempt's session or skipped).
                release_all_locks(&client, pending, &open).await;
            }
            CommitResult::Retry(reason) => {
                debug!(replica = %replica.name, %reason, "commit not applied; retrying");
                release_all_locks(&client, pending, &open).await;
            }
            CommitResult::Refused(reason) => {
                release_all_locks(&client, pending, &open).await;
                return Err(InsertError::Unavailable(reason));
            }
            CommitResult::Unknown(reason) => {
                // Resolve by checking our parts node, on whatever session comes back.
                match resolve(replica, pending, &open).await {
                    Some(true) => {
                        Metrics::inc(&replica.metrics.insert_commits);
                        for &i in &open {
                            activate(replica, &mut pending[i]);
                        }
                        return Ok(());
                    }
                    Some(false) => {
                        info!(replica = %replica.name, %reason, "commit was not applied; retrying with new block numbers");
                        continue;
                    }
                    None => return Err(InsertError::OutcomeUnknown(reason)),
                }
            }
        }
    }
}

fn unreachable_state() -> Result<StagedPart, crate::store::StoreError> {
    Err(crate::store::StoreError::Refused {
        op: "staging a block",
        reason: "block in an unexpected state".to_string(),
    })
}

fn activate(replica: &Replica, p: &mut Pending) {
    let state = std::mem::replace(&mut p.state, PendingState::SameAs(usize::MAX));
    if let PendingState::Staged(s) = state {
        let part = s.name.to_string();
        if let Err(e) = replica.store.activate_staged(s) {
            // Committed in ZooKeeper but not renamed: the next start finds the staged
            // directory and activates it; peers can't fetch it until then.
            warn!(replica = %replica.name, %part, error = %e, "committed part could not be activated");
        }
        p.state = PendingState::Done(BlockOutcome::Committed { part });
    } else {
        p.state = state;
    }
}

async fn ensure_partitions(
    replica: &Replica,
    client: &zk::Client,
    known: &mut HashSet<String>,
    pending: &[Pending],
    open: &[usize],
) -> Result<(), InsertError> {
    for &i in open {
        let pid = &pending[i].partition_id;
        if known.contains(pid) {
            continue;
        }
        let path = replica.paths.block_numbers_partition(pid);
        match client.create(&path, b"", &tree::persistent()).await {
            Ok(_) | Err(zk::Error::NodeExists) => {
                known.insert(pid.clone());
            }
            Err(e) => {
                return Err(InsertError::Unavailable(
                    TreeError::zk("create", path, e).to_string(),
                ));
            }
        }
    }
    Ok(())
}

/// One multi: for each block, `blocks/<id>` must not exist (create + delete, ClickHouse's
/// trick, since multi has no "absent" check) and an ephemeral sequential lock under
/// `block_numbers/<partition>` gives the block number. `Ok(None)`: a duplicate was found
/// and recorded; call again for the rest.
async fn allocate(
    replica: &Replica,
    client: &zk::Client,
    pending: &mut [Pending],
    open: &[usize],
) -> Result<Option<Vec<(u64, String)>>, TreeError> {
    let mut multi = client.new_multi_writer();
    for &i in open {
        let block = replica.paths.block(&pending[i].block_id);
        let lock = replica
            .paths
            .block_number_lock_prefix(&pending[i].partition_id);
        multi
            .add_create(&block, b"", &tree::persistent())
            .map_err(|e| TreeError::zk("create", block.clone(), e))?;
        multi
            .add_delete(&block, None)
            .map_err(|e| TreeError::zk("delete", block.clone(), e))?;
        multi
            .add_create(&lock, b"", &tree::ephemeral_sequential())
            .map_err(|e| TreeError::zk("create", lock.clone(), e))?;
    }
    match multi.commit().await {
        Ok(results) => {
            let mut numbers = Vec::with_capacity(open.len());
            for (k, _) in open.iter().enumerate() {
                match results.get(k * 3 + 2) {
                    Some(zk::MultiWriteResult::Create { path, .. }) => {
                        let n = path
                            .rsplit('/')
                            .next()
                            .and_then(sequence_of)
                            .ok_or_else(|| TreeError::Corrupt {
                                path: path.clone(),
                                message: "lock node without a sequence number".to_string(),
                            })?;
                        numbers.push((n, path.clone()));
                    }
                    _ => {
                        return Err(TreeError::Corrupt {
                            path: replica.paths.block_numbers(),
                            message: "allocation multi returned an unexpected result".to_string(),
                        });
                    }
                }
            }
            Ok(Some(numbers))
        }
        Err(zk::MultiWriteError::OperationFailed {
            index,
            source: zk::Error::NodeExists,
        }) if index % 3 == 0 => {
            let i = open[index / 3];
            let existing = existing_part(client, replica, &pending[i].block_id).await;
            if let PendingState::Temp(t) =
                std::mem::replace(&mut pending[i].state, PendingState::SameAs(usize::MAX))
            {
                replica.store.discard_temp(t);
            }
            if let PendingState::Staged(s) =
                std::mem::replace(&mut pending[i].state, PendingState::SameAs(usize::MAX))
            {
                replica.store.discard_staged(s);
            }
            pending[i].state = PendingState::Done(BlockOutcome::Duplicate { part: existing });
            Ok(None)
        }
        Err(e) => Err(tree::multi_error(
            "allocate block numbers",
            &[replica.paths.block_numbers()],
            e,
        )),
    }
}

async fn existing_part(client: &zk::Client, replica: &Replica, block_id: &str) -> String {
    tree::get_string(client, &replica.paths.block(block_id))
        .await
        .ok()
        .flatten()
        .unwrap_or_default()
}

enum CommitResult {
    Committed,
    /// The block at this index of `pending` is a duplicate.
    Duplicate(usize),
    /// Definitely not applied.
    Retry(String),
    /// Definitely not applied, and retrying cannot help.
    Refused(String),
    /// The connection dropped: applied or not, we can't tell yet.
    Unknown(String),
}

/// What each op of the commit multi does, to map a failed op index back to its block.
#[derive(Clone, Copy, PartialEq, Eq)]
enum Op {
    Log,
    Unlock,
    Block,
    Part,
    Quorum,
}

/// ONE multi for the whole group: per block the GET_PART log entry, the lock removal,
/// `blocks/<id>`, `replicas/<me>/parts/<part>` and, for quorum inserts, the quorum node.
async fn commit(
    replica: &Replica,
    client: &zk::Client,
    pending: &[Pending],
    open: &[usize],
) -> CommitResult {
    let rp = replica.paths.replica(&replica.name);
    let now = chrono::Utc::now().timestamp();
    let mut multi = client.new_multi_writer();
    let mut ops: Vec<(Op, usize)> = Vec::with_capacity(open.len() * 5);
    for &i in open {
        let PendingState::Staged(s) = &pending[i].state else {
            return CommitResult::Retry("block not staged".to_string());
        };
        let part = s.name.to_string();
        let quorum = if pending[i].quorum > 1 {
            pending[i].quorum
        } else {
            0
        };
        let entry = LogEntry::get(&replica.name, &pending[i].block_id, &part, quorum, now).render();
        let header = PartHeader::new(&replica.columns_text, s.rows, &s.checksums).render();
        let lock = pending[i].lock.clone().unwrap_or_default();
        let mut results = vec![
            multi.add_create(
                &replica.paths.log_entry_prefix(),
                entry.as_bytes(),
                &tree::persistent_sequential(),
            ),
            multi.add_delete(&lock, None),
            multi.add_create(
                &replica.paths.block(&pending[i].block_id),
                part.as_bytes(),
                &tree::persistent(),
            ),
            multi.add_create(&rp.part(&part), header.as_bytes(), &tree::persistent()),
        ];
        ops.extend([(Op::Log, i), (Op::Unlock, i), (Op::Block, i), (Op::Part, i)]);
        if quorum > 0 {
            let node = crate::quorum::node_path(replica, pending[i].quorum_mode, &part);
            let value = QuorumEntry::new(&part, quorum, &replica.name).render();
            results.push(multi.add_create(&node, value.as_bytes(), &tree::persistent()));
            ops.push((Op::Quorum, i));
        }
        if let Some(Err(e)) = results.into_iter().find(|r| r.is_err()) {
            return CommitResult::Retry(format!("building the commit: {e}"));
        }
    }
    match multi.commit().await {
        Ok(_) => CommitResult::Committed,
        Err(zk::MultiWriteError::OperationFailed { index, source }) => match (ops.get(index), source) {
            (Some((Op::Block, i)), zk::Error::NodeExists) => CommitResult::Duplicate(*i),
            (Some((Op::Quorum, _)), zk::Error::NodeExists) => CommitResult::Refused(
                "a previous sequential quorum insert has not reached its quorum yet (UNSATISFIED_QUORUM_FOR_PREVIOUS_WRITE); retry later or use insert_quorum_parallel=1".to_string(),
            ),
            (_, source) => CommitResult::Retry(format!("op {index} of the commit failed: {source}")),
        },
        Err(zk::MultiWriteError::RequestFailed { source }) if is_connection_error(&source) => {
            CommitResult::Unknown(format!("connection lost during the commit: {source}"))
        }
        Err(zk::MultiWriteError::RequestFailed { source }) => {
            CommitResult::Unknown(format!("commit request failed: {source}"))
        }
    }
}

async fn release_lock(client: &zk::Client, lock: Option<String>) {
    if let Some(lock) = lock {
        let _ = client.delete(&lock, None).await;
    }
}

async fn release_all_locks(client: &zk::Client, pending: &mut [Pending], open: &[usize]) {
    for &i in open {
        release_lock(client, pending[i].lock.take()).await;
    }
}

/// Did the commit of these blocks happen? All blocks of one multi share the answer, so
/// checking the first block's `parts` node settles it. `None`: ZooKeeper stayed
/// unreachable for longer than a session timeout.
async fn resolve(replica: &Replica, pending: &[Pending], open: &[usize]) -> Option<bool> {
    let first = open.iter().find_map(|&i| match &pending[i].state {
        PendingState::Staged(s) => Some(s.name.to_string()),
        _ => None,
    })?;
    check_committed(
        replica,
        &first,
        replica.session_timeout + Duration::from_secs(2),
    )
    .await
}

async fn check_committed(replica: &Replica, part: &str, patience: Duration) -> Option<bool> {
    let path = replica.paths.replica(&replica.name).part(part);
    let deadline = tokio::time::Instant::now() + patience;
    loop {
        if let Ok((client, _)) = replica.sessions.active() {
            match client.check_stat(&path).await {
                Ok(stat) => return Some(stat.is_some()),
                Err(e) => {
                    debug!(replica = %replica.name, %part, error = %e, "cannot check commit yet")
                }
            }
        }
        if tokio::time::Instant::now() >= deadline {
            return None;
        }
        tokio::time::sleep(Duration::from_millis(200)).await;
    }
}

/// Staged parts whose commit outcome is unknown: keep checking until ZooKeeper answers,
/// then activate (committed) or discard (never acknowledged, the client was told to retry).
async fn resolve_later(replica: Arc<Replica>, parts: Vec<StagedPart>) {
    for s in parts {
        let name = s.name.to_string();
        loop {
            match check_committed(&replica, &name, Duration::from_secs(60)).await {
                Some(true) => {
                    info!(replica = %replica.name, part = %name, "unknown-outcome insert turned out committed");
                    if let Err(e) = replica.store.activate_staged(s) {
                        warn!(replica = %replica.name, part = %name, error = %e, "could not activate resolved part");
                    }
                    break;
                }
                Some(false) => {
                    info!(replica = %replica.name, part = %name, "unknown-outcome insert was not committed; discarding");
                    replica.store.discard_staged(s);
                    break;
                }
                None => continue,
            }
        }
    }
}
