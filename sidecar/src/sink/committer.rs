//! Group commit. Concurrent inserts queue their blocks here; one task takes everything
//! waiting, allocates all block numbers in one multi and commits them in another, so N
//! concurrent inserts cost two ZooKeeper round trips instead of 2N. Small blocks of the
//! same partition share one part (ClickHouse's async inserts do the same): one block
//! number, one log entry, one part to fetch, merge and clean up instead of N. Every block
//! keeps its own `blocks/<id>` node and answer, so dedup and acknowledgement stay per
//! insert: a duplicate found in the group is answered as such, and the shared part is
//! written again without it.

use std::collections::{HashMap, HashSet};
use std::sync::Arc;
use std::time::Duration;

use arrow::array::RecordBatch;
use tokio::sync::{mpsc, oneshot};
use tracing::{debug, error, info, warn};
use zookeeper_client as zk;

use rtable_protocol::part_header::PartHeader;
use rtable_protocol::paths::sequence_of;
use rtable_protocol::quorum::QuorumEntry;
use rtable_protocol::tree::{self, TreeError};
use rtable_protocol::{LogEntry, PartName};

use crate::metrics::Metrics;
use crate::replica::Replica;
use crate::sink::handoff::Accepted;
use crate::sink::{Block, BlockOutcome, InsertError, Payload};
use crate::store::verify::Unsynced;
use crate::store::{EncodedPart, StagedPart, StoreError, TempPart};

/// At most a log entry, lock removal, blocks node and parts node per block: 100 blocks
/// keep a multi far below ZooKeeper's 1 MB packet limit.
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
    /// The committer inserts hand their blocks to, and the task that commits them, for the
    /// caller to run with [`collect`] under the supervisor (which may start it again).
    pub fn new(replica: Arc<Replica>) -> (Committer, Arc<Collector>) {
        let (tx, rx) = mpsc::channel(1024);
        let slots = tokio::sync::Semaphore::new(replica.cfg.commit_groups_in_flight.max(1));
        let collector = Collector {
            rx: tokio::sync::Mutex::new(rx),
            slots: Arc::new(slots),
            known: KnownPartitions::default(),
            replica,
        };
        (Committer { tx }, Arc::new(collector))
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
        // Unanswered only when the task committing its group died (a panic) part way:
        // the commit may have happened.
        rx.await.map_err(|_| {
            InsertError::OutcomeUnknown(
                "the task committing this insert failed before answering".to_string(),
            )
        })?
    }
}

/// Partitions whose `block_numbers/<partition>` node is known to exist.
type KnownPartitions = Arc<parking_lot::Mutex<HashSet<String>>>;

/// What the collecting task keeps across restarts: the queue of waiting inserts (which a
/// restart must not lose), the group slots (groups still committing hold theirs) and the
/// partitions known to exist.
pub struct Collector {
    replica: Arc<Replica>,
    rx: tokio::sync::Mutex<mpsc::Receiver<Job>>,
    slots: Arc<tokio::sync::Semaphore>,
    known: KnownPartitions,
}

/// Inserts taken off the queue and not yet handed to a group commit. When the collecting
/// task dies with them (a panic, or an abort at shutdown) they are answered that nothing
/// was committed, rather than dropped unanswered, so their clients retry at once.
struct Held(Vec<Job>);

impl Drop for Held {
    fn drop(&mut self) {
        for job in self.0.drain(..) {
            let _ = job.reply.send(Err(InsertError::Interrupted(
                "the commit task stopped before committing it".to_string(),
            )));
        }
    }
}

/// Collects waiting inserts into groups and commits up to `--commit-groups-in-flight` of
/// them at once (one by default: every insert that arrives while a group commits joins
/// the next one). Groups stay independent (a
/// dedup id committed by two groups at once fails the second's commit on `blocks/<id>` and
/// is answered as a duplicate), and block-number locks keep merges away from what is in
/// flight. Runs until shutdown; started again after a panic, it resumes with the inserts
/// still queued.
pub async fn collect(collector: Arc<Collector>) {
    let replica = &collector.replica;
    // Free: a previous run released it when it unwound or was aborted.
    let mut rx = collector.rx.lock().await;
    let delay = Duration::from_micros(replica.cfg.commit_delay_us);
    let mut previous_jobs = 0;
    let mut held = Held(Vec::new());
    loop {
        let Some(first) = rx.recv().await else {
            // Every `Committer` is gone: the HTTP server stopped and the process is
            // shutting down. Returning would read as a failure to the supervisor.
            std::future::pending::<()>().await;
            return;
        };
        held.0.push(first);
        // Waiting for a slot before collecting lets the group gather every insert that
        // arrived meanwhile.
        let Ok(slot) = collector.slots.clone().acquire_owned().await else {
            return;
        };
        // Without the delay, concurrent clients split into two cohorts that take turns:
        // the one just answered resends while the other's group commits.
        let deadline = lingers(previous_jobs, delay).then(|| tokio::time::Instant::now() + delay);
        let mut n = held.0[0].blocks.len();
        while n < MAX_GROUP_BLOCKS {
            let job = match (rx.try_recv(), deadline) {
                (Ok(job), _) => job,
                (Err(mpsc::error::TryRecvError::Empty), Some(deadline)) => {
                    match tokio::time::timeout_at(deadline, rx.recv()).await {
                        Ok(Some(job)) => job,
                        Ok(None) | Err(_) => break,
                    }
                }
                (Err(_), _) => break,
            };
            n += job.blocks.len();
            held.0.push(job);
        }
        let jobs = std::mem::take(&mut held.0);
        previous_jobs = jobs.len();
        let replica = replica.clone();
        let known = collector.known.clone();
        tokio::spawn(async move {
            commit_group(&replica, &known, jobs).await;
            drop(slot);
        });
    }
}

/// Whether a group waits for more inserts: only after a group of two or more, so a lone
/// client's inserts never wait.
fn lingers(previous_jobs: usize, delay: Duration) -> bool {
    previous_jobs >= 2 && !delay.is_zero()
}

/// One insert's block inside the group.
struct Member {
    job: usize,
    slot: usize,
    block_id: String,
    /// The rows of a block in a shared part, kept until the commit so the part can be
    /// written again without a block that turned out to be a duplicate.
    rows: Option<RecordBatch>,
    outcome: Option<BlockOutcome>,
    /// Refused before its commit: too few active replicas for its quorum.
    refused: Option<String>,
    /// Same dedup id as an earlier member of this group: answered as its duplicate.
    same_as: Option<usize>,
    /// Committed, but a peer the commit recorded a copy for did not confirm it durable.
    unconfirmed: Option<String>,
}

/// One part to commit: the shared part of a partition's small blocks, or the own part of
/// a large or quorum block.
struct Unit {
    partition_id: String,
    quorum: u32,
    quorum_mode: crate::quorum::Mode,
    /// Members not yet answered.
    members: Vec<usize>,
    /// This attempt's `block_numbers/<partition>/block-N` lock.
    lock: Option<String>,
    state: UnitState,
    /// The peers that took this attempt's part before the commit (all the quorum needs,
    /// or none): the commit records it for them and no quorum node is needed.
    handoff: Vec<Accepted>,
    /// The active replicas were counted for its quorum (by the insert, or here).
    quorum_checked: bool,
}

enum UnitState {
    /// Shared rows not (or no longer) written.
    Unwritten,
    /// Written as a temporary part; its fsyncs, if still to run, go with the commit.
    Temp(TempPart, Option<Unsynced>),
    /// A quorum block's own part, in memory until its number is known (see
    /// [`start_encoded_writes`]).
    Encoded(EncodedPart),
    Staged(StagedPart),
    Done,
}

impl Unit {
    fn is_open(&self) -> bool {
        !self.members.is_empty() && !matches!(self.state, UnitState::Done)
    }

    /// Drops what was written (after a member left, or the group failed).
    fn discard(&mut self, replica: &Replica) {
        match std::mem::replace(&mut self.state, UnitState::Unwritten) {
            UnitState::Temp(t, _) => replica.store.discard_temp(t),
            UnitState::Staged(s) => replica.store.discard_staged(s),
            UnitState::Unwritten | UnitState::Encoded(_) => {}
            UnitState::Done => self.state = UnitState::Done,
        }
    }
}

struct Group {
    members: Vec<Member>,
    units: Vec<Unit>,
    /// A commit failed on a peer's changed `host`: the rest go without handoffs.
    no_handoff: bool,
}

impl Group {
    fn build(replica: &Replica, jobs: Vec<Job>) -> (Group, Vec<Reply>) {
        let mut replies = Vec::with_capacity(jobs.len());
        let mut group = Group {
            members: Vec::new(),
            units: Vec::new(),
            no_handoff: false,
        };
        let mut first_by_id: HashMap<String, usize> = HashMap::new();
        let mut shared_unit: HashMap<String, usize> = HashMap::new();
        for (job_index, job) in jobs.into_iter().enumerate() {
            replies.push(job.reply);
            for (slot, block) in job.blocks.into_iter().enumerate() {
                let m = group.members.len();
                let mut member = Member {
                    job: job_index,
                    slot,
                    block_id: block.block_id.clone(),
                    rows: None,
                    outcome: None,
                    refused: None,
                    same_as: None,
                    unconfirmed: None,
                };
                if let Some(&first) = first_by_id.get(&block.block_id) {
                    block.payload.discard(replica);
                    member.same_as = Some(first);
                    group.members.push(member);
                    continue;
                }
                first_by_id.insert(block.block_id.clone(), m);
                match block.payload {
                    Payload::Rows(rows) => {
                        member.rows = Some(rows);
                        let u = *shared_unit
                            .entry(block.partition_id.clone())
                            .or_insert_with(|| {
                                group.units.push(Unit {
                                    partition_id: block.partition_id.clone(),
                                    quorum: 0,
                                    quorum_mode: block.quorum_mode,
                                    members: Vec::new(),
                                    lock: None,
                                    state: UnitState::Unwritten,
                                    handoff: Vec::new(),
                                    quorum_checked: true,
                                });
                                group.units.len() - 1
                            });
                        group.units[u].members.push(m);
                    }
                    Payload::Written(temp, unsynced) => group.units.push(Unit {
                        partition_id: block.partition_id.clone(),
                        quorum: block.quorum,
                        quorum_mode: block.quorum_mode,
                        members: vec![m],
                        lock: None,
                        state: UnitState::Temp(temp, unsynced),
                        handoff: Vec::new(),
                        quorum_checked: block.quorum_checked,
                    }),
                    Payload::Encoded(encoded) => group.units.push(Unit {
                        partition_id: block.partition_id.clone(),
                        quorum: block.quorum,
                        quorum_mode: block.quorum_mode,
                        members: vec![m],
                        lock: None,
                        state: UnitState::Encoded(encoded),
                        handoff: Vec::new(),
                        quorum_checked: block.quorum_checked,
                    }),
                }
                group.members.push(member);
            }
        }
        (group, replies)
    }

    /// Answers a member as a duplicate of `part` and takes it out of its unit, whose
    /// shared part must then be written again without it.
    fn duplicate(&mut self, replica: &Replica, u: usize, m: usize, part: String) {
        self.members[m].outcome = Some(BlockOutcome::Duplicate { part });
        self.members[m].rows = None;
        let unit = &mut self.units[u];
        unit.members.retain(|&x| x != m);
        unit.discard(replica);
    }

    fn open(&self) -> Vec<usize> {
        (0..self.units.len())
            .filter(|&u| self.units[u].is_open())
            .collect()
    }

    /// Why a member (or the first with its dedup id) was refused before its commit.
    fn refused(&self, m: usize) -> Option<String> {
        let m = self.members[m].same_as.unwrap_or(m);
        self.members[m].refused.clone()
    }

    /// Why a member (or the first with its dedup id) is committed but not acknowledged.
    fn unconfirmed(&self, m: usize) -> Option<String> {
        let m = self.members[m].same_as.unwrap_or(m);
        self.members[m].unconfirmed.clone()
    }

    /// Every member's answer, `None` where the group did not reach one.
    fn outcome(&self, m: usize) -> Option<BlockOutcome> {
        match self.members[m].same_as {
            Some(first) => match self.members[first].outcome.as_ref()? {
                BlockOutcome::Committed { part, .. } | BlockOutcome::Duplicate { part } => {
                    Some(BlockOutcome::Duplicate { part: part.clone() })
                }
            },
            None => self.members[m].outcome.clone(),
        }
    }
}

async fn commit_group(replica: &Arc<Replica>, known_partitions: &KnownPartitions, jobs: Vec<Job>) {
    let (mut group, replies) = Group::build(replica, jobs);
    let result = commit_pending(replica, known_partitions, &mut group).await;
    if let Err(e) = &result {
        // Whatever did not reach a known outcome is discarded (never acknowledged), except
        // staged parts whose commit may have happened: those wait for a resolver.
        let mut unresolved: Vec<StagedPart> = Vec::new();
        for unit in group.units.iter_mut() {
            match std::mem::replace(&mut unit.state, UnitState::Unwritten) {
                UnitState::Staged(s) if !unit.members.is_empty() => unresolved.push(s),
                other => {
                    unit.state = other;
                    unit.discard(replica);
                }
            }
        }
        if !unresolved.is_empty() {
            tokio::spawn(crate::outcome::resolve_later(replica.clone(), unresolved));
        }
        debug!(replica = %replica.name, error = %e, "group commit failed");
    }
    let mut per_job: Vec<Result<Vec<(usize, BlockOutcome)>, InsertError>> =
        (0..replies.len()).map(|_| Ok(Vec::new())).collect();
    for m in 0..group.members.len() {
        let job = group.members[m].job;
        match (group.outcome(m), &mut per_job[job]) {
            (Some(o), Ok(outcomes)) => outcomes.push((group.members[m].slot, o)),
            (Some(_), Err(_)) => {}
            (None, answer) if group.refused(m).is_some() => {
                let reason = group.refused(m).unwrap_or_default();
                *answer = Err(InsertError::TooFewReplicas(reason));
            }
            (None, answer) if group.unconfirmed(m).is_some() => {
                let reason = group.unconfirmed(m).unwrap_or_default();
                *answer = Err(InsertError::OutcomeUnknown(reason));
            }
            (None, answer) => {
                *answer = Err(match &result {
                    Err(e) => clone_error(e),
                    Ok(()) => InsertError::Internal("block left without outcome".to_string()),
                })
            }
        }
    }
    for (reply, answer) in replies.into_iter().zip(per_job) {
        let answer = answer.map(|mut outcomes| {
            outcomes.sort_by_key(|(slot, _)| *slot);
            outcomes.into_iter().map(|(_, o)| o).collect()
        });
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

/// Allocates and commits every unit still open; returns an error only for members whose
/// fate is not known (their units stay open in `group`).
async fn commit_pending(
    replica: &Arc<Replica>,
    known_partitions: &KnownPartitions,
    group: &mut Group,
) -> Result<(), InsertError> {
    let mut attempt = 0;
    // Connection trouble (one ensemble member lost, a leader election) is waited out for
    // up to a session timeout: the client reconnects to another member meanwhile, and a
    // session that really ends turns the replica read-only, which answers at once.
    let patience = tokio::time::Instant::now() + replica.session_timeout;
    let mut transient_waits: u64 = 0;
    // Fsyncs of the parts (and of their renames to staged names), run alongside the commit.
    let mut pending_sync: Vec<Unsynced> = Vec::new();
    loop {
        attempt += 1;
        let open = group.open();
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
        if let Err(e) = ensure_partitions(replica, &client, known_partitions, group, &open).await {
            if e.is_transient() && tokio::time::Instant::now() < patience {
                transient_waits += 1;
                attempt -= 1;
                tokio::time::sleep(Duration::from_millis((50 * transient_waits).min(500))).await;
                continue;
            }
            return Err(InsertError::Unavailable(e.to_string()));
        }
        let partitions: Vec<String> = open
            .iter()
            .map(|&u| group.units[u].partition_id.clone())
            .collect();
        let wanted: Vec<&str> = partitions.iter().map(String::as_str).collect();
        let t0 = std::time::Instant::now();
        let reserved = replica.block_reserve.take_all(generation, &wanted).await;
        // With reserved numbers the shared parts are written straight under their staged
        // names; without, they are written while the allocation multi is in flight.
        let staged_names: Option<Vec<PartName>> = reserved.as_ref().map(|locks| {
            open.iter()
                .zip(locks)
                .map(|(&u, lock)| PartName::new_insert(&group.units[u].partition_id, lock.number))
                .collect()
        });
        let writes = start_shared_writes(replica, group, &open, staged_names.as_deref());
        // Numbers reserved after an earlier commit save the allocation round trip; without
        // the allocation's early dedup check a duplicate is found by the commit instead.
        let used_reserve = reserved.is_some();
        let allocated = match reserved {
            Some(locks) => Ok(Some(
                locks.into_iter().map(|r| (r.number, r.path)).collect(),
            )),
            None => allocate(replica, &client, group, &open).await,
        };
        let joined = match writes {
            Some(SharedWrites::Done(written)) => Some(Ok(written)),
            Some(SharedWrites::Spawned(handle)) => Some(handle.await),
            None => None,
        };
        let written = match joined {
            Some(joined) => finish_shared_writes(replica, group, joined, &mut pending_sync),
            None => Ok(()),
        };
        if let (Err(e), Ok(Some(numbers))) = (&written, &allocated) {
            for (_, lock) in numbers {
                let _ = client.delete(lock, None).await;
            }
            return Err(InsertError::Store(clone_store_error(e)));
        }
        let numbers = match allocated {
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
                if e.is_transient() && tokio::time::Instant::now() < patience {
                    transient_waits += 1;
                    attempt -= 1;
                    tokio::time::sleep(Duration::from_millis((50 * transient_waits).min(500)))
                        .await;
                    continue;
                }
                return Err(InsertError::Unavailable(e.to_string()));
            }
        };
        // Name every unit by its number; a staged part from an earlier attempt is renamed.
        let mut names = Vec::with_capacity(open.len());
        for (&u, (number, lock)) in open.iter().zip(numbers) {
            let unit = &mut group.units[u];
            names.push(PartName::new_insert(&unit.partition_id, number));
            unit.lock = Some(lock);
        }
        let mut encoded: Vec<(usize, PartName, EncodedPart)> = Vec::new();
        for (&u, name) in open.iter().zip(&names) {
            let unit = &mut group.units[u];
            let staged = match std::mem::replace(&mut unit.state, UnitState::Unwritten) {
                UnitState::Encoded(e) => {
                    encoded.push((u, name.clone(), e.clone()));
                    unit.state = UnitState::Encoded(e);
                    continue;
                }
                UnitState::Staged(s) if s.name == *name => Ok(s),
                // The part's own fsyncs, if it deferred them, and its rename's.
                UnitState::Temp(t, unsynced) => {
                    pending_sync.extend(unsynced);
                    replica.store.stage_unsynced(t, name).map(|(s, parent)| {
                        pending_sync.push(parent);
                        s
                    })
                }
                UnitState::Staged(s) => replica.store.restage(s, name),
                UnitState::Unwritten | UnitState::Done => Err(StoreError::Refused {
                    op: "staging a block",
                    reason: "block in an unexpected state".to_string(),
                }),
            };
            match staged {
                Ok(s) => unit.state = UnitState::Staged(s),
                Err(e) => {
                    // A failed rename loses the part; the inserts fail as a whole, and the
                    // numbers go back at once rather than block merges until the session ends.
                    release_all_locks(&client, group, &open).await;
                    return Err(InsertError::Store(e));
                }
            }
        }
        let t1 = std::time::Instant::now();
        // The parts' fsyncs overlap the handoff and the commit, and the outcome waits for
        // them: a process crash keeps the written pages, and a machine crash before the
        // fsyncs end leaves a staged part that fails verification at the next start and is
        // fetched again. Encoded parts are written, and their fsyncs started, while the
        // same bytes go to the peers.
        let mut syncing: Vec<Syncing> = start_syncs(&mut pending_sync).into_iter().collect();
        let writing = start_encoded_writes(replica, encoded);
        hand_off_units(replica, &client, group, &open, &names).await;
        if let Some((written, encoded_syncing)) = writing {
            syncing.push(encoded_syncing);
            if let Err(e) = finish_encoded_writes(group, written).await {
                release_all_locks(&client, group, &open).await;
                return Err(InsertError::Store(e));
            }
        }
        let open = refuse_short_quorums(replica, &client, group, open).await;
        let handed_off_at = std::time::Instant::now();
        if open.is_empty() {
            // Every unit was refused; what remains is their parts' fsyncs.
            let _ = finish_syncs(syncing).await;
            continue;
        }
        // Each reservation's lock carries a token of its own, so one created by a multi
        // whose outcome was unknown can be found and given back.
        let tokens = reservation_tokens(replica, group, &open);
        let committed = commit(replica, &client, group, &open, &tokens).await;
        let synced = finish_syncs(syncing).await;
        let committed = match committed {
            CommitResult::Committed(_)
                if crate::failpoint::fire(crate::failpoint::COMMIT_REPLY_LOST) =>
            {
                warn!(replica = %replica.name, "failpoint commit_reply_lost: holding the commit's reply until a new session is active");
                wait_for_new_session(replica, generation).await;
                CommitResult::Unknown("failpoint commit_reply_lost".to_string())
            }
            other => other,
        };
        let t2 = std::time::Instant::now();
        match committed {
            CommitResult::Committed(extras) => {
                Metrics::inc(&replica.metrics.insert_commits);
                report_sync_failure(replica, &names, synced);
                let unconfirmed = confirm_handoffs(replica, group, &open).await;
                activate_all(replica, group, &open, &unconfirmed);
                replica.block_reserve.keep(
                    replica.clone(),
                    client.clone(),
                    generation,
                    extras.reserved,
                );
                crate::push::spawn(replica.clone(), client.clone(), extras.pushes);
                debug!(
                    parts = %names.iter().map(ToString::to_string).collect::<Vec<_>>().join(","),
                    blocks = open
                        .iter()
                        .map(|&u| group.units[u].members.len())
                        .sum::<usize>(),
                    used_reserve,
                    allocate_and_stage_us = (t1 - t0).as_micros() as u64,
                    handoff_us = (handed_off_at - t1).as_micros() as u64,
                    commit_us = (t2 - handed_off_at).as_micros() as u64,
                    activate_us = t2.elapsed().as_micros() as u64,
                    "group commit timing"
                );
                replica.merge_notify.notify_one();
                return Ok(());
            }
            CommitResult::Duplicate(u, m) => {
                // Someone committed the same block between our allocation and commit.
                release_all_locks(&client, group, &open).await;
                match duplicate_of(&client, replica, &group.members[m].block_id).await {
                    Ok(Some(part)) => {
                        group.duplicate(replica, u, m, part);
                        attempt -= 1;
                    }
                    // Gone again (cleanup): the next attempt allocates it as a new block.
                    Ok(None) => {}
                    // Unread: the next attempt's allocation meets the block again.
                    Err(e) => {
                        debug!(replica = %replica.name, error = %e, "cannot read a duplicate's block; retrying")
                    }
                }
            }
            CommitResult::HandoffStale(reason) => {
                info!(replica = %replica.name, %reason, "commit not applied; retrying without handoffs");
                group.no_handoff = true;
                release_all_locks(&client, group, &open).await;
                if let Err(e) = synced {
                    return Err(InsertError::Store(e));
                }
            }
            CommitResult::Retry(reason) => {
                debug!(replica = %replica.name, %reason, "commit not applied; retrying");
                release_all_locks(&client, group, &open).await;
                if let Err(e) = synced {
                    return Err(InsertError::Store(e));
                }
            }
            CommitResult::Refused(reason) => {
                release_all_locks(&client, group, &open).await;
                return Err(InsertError::Unavailable(reason));
            }
            CommitResult::Unknown(reason) => {
                // Resolve by checking our parts node, on whatever session comes back.
                match resolve(replica, group, &open).await {
                    Some(true) => {
                        Metrics::inc(&replica.metrics.insert_commits);
                        report_sync_failure(replica, &names, synced);
                        let unconfirmed = confirm_handoffs(replica, group, &open).await;
                        activate_all(replica, group, &open, &unconfirmed);
                        tokio::spawn(crate::sink::reserve::give_back_tokens(
                            replica.clone(),
                            tokens,
                        ));
                        return Ok(());
                    }
                    Some(false) => {
                        info!(replica = %replica.name, %reason, "commit was not applied; retrying with new block numbers");
                        // On a session that survived the blip the old numbers are still
                        // locked; left alone they would bar merges across them until it ends.
                        release_all_locks(&client, group, &open).await;
                        if let Err(e) = synced {
                            return Err(InsertError::Store(e));
                        }
                        continue;
                    }
                    None => return Err(InsertError::OutcomeUnknown(reason)),
                }
            }
        }
    }
}

/// A shared part written as a temporary part (fsynced) or straight under its staged name
/// (fsyncs still to run).
enum Written {
    Temp(TempPart),
    Staged(StagedPart, Unsynced),
}

type Syncing = tokio::task::JoinHandle<Result<(), StoreError>>;

type EncodedWrites = oneshot::Receiver<Vec<(usize, Result<StagedPart, StoreError>)>>;

/// Writes the encoded parts under their staged names on a blocking thread, while the
/// committer hands the same bytes to the peers, and then fsyncs them: what was written
/// comes first, the fsyncs' outcome with the returned handle.
fn start_encoded_writes(
    replica: &Replica,
    encoded: Vec<(usize, PartName, EncodedPart)>,
) -> Option<(EncodedWrites, Syncing)> {
    if encoded.is_empty() {
        return None;
    }
    let store = replica.store.clone();
    let (written_tx, written_rx) = oneshot::channel();
    let syncing = tokio::task::spawn_blocking(move || {
        let mut unsynced = Vec::with_capacity(encoded.len());
        let written = encoded
            .into_iter()
            .map(|(u, name, part)| {
                let staged = crate::store::write_encoded_staged(&store, &part, &name);
                (
                    u,
                    staged.map(|(s, files)| {
                        unsynced.push(files);
                        s
                    }),
                )
            })
            .collect();
        let _ = written_tx.send(written);
        unsynced.into_iter().try_for_each(Unsynced::sync)
    });
    Some((written_rx, syncing))
}

/// Each written part becomes its unit's staged part. On a failed write the units keep
/// what they hold (a staged part is discarded with its group), and the error fails the
/// inserts as a failed rename would.
async fn finish_encoded_writes(
    group: &mut Group,
    written: EncodedWrites,
) -> Result<(), StoreError> {
    let written = written.await.map_err(|e| StoreError::Refused {
        op: "writing inserted parts",
        reason: e.to_string(),
    })?;
    let mut failed = None;
    for (u, result) in written {
        match result {
            Ok(staged) => group.units[u].state = UnitState::Staged(staged),
            Err(e) => failed = failed.or(Some(e)),
        }
    }
    failed.map_or(Ok(()), Err)
}

fn start_syncs(pending: &mut Vec<Unsynced>) -> Option<Syncing> {
    if pending.is_empty() {
        return None;
    }
    let batch = std::mem::take(pending);
    Some(tokio::task::spawn_blocking(move || {
        batch.into_iter().try_for_each(Unsynced::sync)
    }))
}

async fn finish_syncs(syncing: Vec<Syncing>) -> Result<(), StoreError> {
    let mut outcome = Ok(());
    for handle in syncing {
        let synced = handle.await.map_err(|e| StoreError::Refused {
            op: "fsyncing inserted parts",
            reason: e.to_string(),
        });
        if outcome.is_ok() {
            outcome = synced.and_then(|r| r);
        }
    }
    outcome
}

/// A committed part whose fsync failed is still acknowledged: ZooKeeper names it, a retry
/// would be answered as its duplicate, and peers copy it from this replica's page cache.
/// The disk is what needs attention.
fn report_sync_failure(replica: &Replica, names: &[PartName], synced: Result<(), StoreError>) {
    if let Err(e) = synced {
        let parts = names
            .iter()
            .map(ToString::to_string)
            .collect::<Vec<_>>()
            .join(",");
        error!(replica = %replica.name, %parts, error = %e, "committed parts could not be fsynced; check this replica's disk");
    }
}

/// Per unit written: its index, its member count when the write started, the outcome.
type SharedWritten = Vec<(usize, usize, Result<Written, StoreError>)>;
enum SharedWrites {
    Done(SharedWritten),
    Spawned(tokio::task::JoinHandle<SharedWritten>),
}

/// Starts writing the shared part of every open unit that has none (yet, or any more),
/// off the async runtime, all of a group's in one blocking task. Each result remembers
/// how many members its unit had, so a unit that lost a duplicate meanwhile is rewritten.
fn start_shared_writes(
    replica: &Arc<Replica>,
    group: &Group,
    open: &[usize],
    staged_names: Option<&[PartName]>,
) -> Option<SharedWrites> {
    let todo: Todo = open
        .iter()
        .enumerate()
        .filter(|(_, u)| matches!(group.units[**u].state, UnitState::Unwritten))
        .map(|(i, &u)| {
            let members = &group.units[u].members;
            let rows = members
                .iter()
                .filter_map(|&m| group.members[m].rows.clone())
                .collect();
            let name = staged_names.and_then(|names| names.get(i).cloned());
            (u, members.len(), rows, name)
        })
        .collect();
    if todo.is_empty() {
        return None;
    }
    // Without reserved numbers the write overlaps the allocation multi instead.
    let small = staged_names.is_some()
        && todo
            .iter()
            .flat_map(|(_, _, rows, _)| rows)
            .map(RecordBatch::get_array_memory_size)
            .sum::<usize>()
            <= INLINE_WRITE_MAX_BYTES;
    if small {
        return Some(SharedWrites::Done(write_units(replica, todo)));
    }
    let r = replica.clone();
    Some(SharedWrites::Spawned(tokio::task::spawn_blocking(
        move || write_units(&r, todo),
    )))
}

/// Below this many bytes of rows, a group's parts with reserved numbers are written on the
/// committer's own task: under a millisecond of work, where a blocking thread costs two
/// wake-ups, each a millisecond or more on a busy machine. Groups under load are bigger and
/// keep the blocking thread, so the runtime's workers stay free for the requests that form
/// the next group.
const INLINE_WRITE_MAX_BYTES: usize = 16 << 10;

type Todo = Vec<(usize, usize, Vec<RecordBatch>, Option<PartName>)>;

fn write_units(r: &Replica, todo: Todo) -> SharedWritten {
    todo.into_iter()
        .map(|(u, members, rows, name)| {
            let refs: Vec<&RecordBatch> = rows.iter().collect();
            let schema = &r.table.schema;
            let written = match name {
                Some(name) => crate::store::write_shared_staged(&r.store, &refs, schema, &name)
                    .map(|(staged, unsynced)| Written::Staged(staged, unsynced)),
                None => crate::store::write_shared(&r.store, &refs, schema).map(Written::Temp),
            };
            (u, members, written)
        })
        .collect()
}

fn finish_shared_writes(
    replica: &Replica,
    group: &mut Group,
    joined: Result<SharedWritten, tokio::task::JoinError>,
    pending_sync: &mut Vec<Unsynced>,
) -> Result<(), StoreError> {
    let written = joined.map_err(|e| StoreError::Refused {
        op: "writing shared parts",
        reason: e.to_string(),
    })?;
    let mut failure = None;
    for (u, members, result) in written {
        let unit = &mut group.units[u];
        match result {
            Ok(written)
                if matches!(unit.state, UnitState::Unwritten) && unit.members.len() == members =>
            {
                unit.state = match written {
                    Written::Temp(t) => UnitState::Temp(t, None),
                    Written::Staged(s, unsynced) => {
                        pending_sync.push(unsynced);
                        UnitState::Staged(s)
                    }
                }
            }
            Ok(Written::Temp(t)) => replica.store.discard_temp(t),
            Ok(Written::Staged(s, _)) => replica.store.discard_staged(s),
            Err(e) => failure = Some(e),
        }
    }
    failure.map_or(Ok(()), Err)
}

/// The error again, for a second owner (store errors carry no clonable sources).
fn clone_store_error(e: &StoreError) -> StoreError {
    StoreError::Refused {
        op: "writing an insert",
        reason: e.to_string(),
    }
}

/// Waits for the word of every peer whose copy a commit recorded before it was durable.
/// Returns the units some peer failed, with why: the part is committed (and the peer's
/// GET entry fetches it), but the insert cannot be acknowledged as on `insert_quorum`
/// replicas.
async fn confirm_handoffs(
    replica: &Replica,
    group: &mut Group,
    open: &[usize],
) -> HashMap<usize, String> {
    let patience = replica.cfg.insert_quorum_timeout();
    let mut waits = Vec::new();
    for &u in open {
        let unit = &mut group.units[u];
        let part = match &unit.state {
            UnitState::Staged(s) => s.name.to_string(),
            _ => continue,
        };
        for accepted in &mut unit.handoff {
            if let Some(durable) = accepted.durable.take() {
                let (peer, part) = (accepted.peer.clone(), part.clone());
                waits.push(async move { (u, peer, part, durable.wait(patience).await) });
            }
        }
    }
    let mut failed = HashMap::new();
    for (u, peer, part, outcome) in futures::future::join_all(waits).await {
        if let Err(reason) = outcome {
            warn!(replica = %replica.name, %peer, %part, %reason, "a peer did not confirm its handed-off copy durable");
            failed.entry(u).or_insert(format!(
                "part {part} is committed, but replica {peer} did not confirm its copy durable ({reason}); \
                 a retry with the same dedup token is answered once the part is on insert_quorum replicas"
            ));
        }
    }
    failed
}

fn activate_all(
    replica: &Replica,
    group: &mut Group,
    open: &[usize],
    unconfirmed: &HashMap<usize, String>,
) {
    for &u in open {
        let unit = &mut group.units[u];
        let UnitState::Staged(s) = std::mem::replace(&mut unit.state, UnitState::Done) else {
            continue;
        };
        let part = s.name.to_string();
        let quorum_reached = !unit.handoff.is_empty();
        if quorum_reached {
            Metrics::inc(&replica.metrics.handoffs_sent);
        }
        if let Err(e) = replica.store.activate_staged(s) {
            // Committed in ZooKeeper but not renamed: the next start finds the staged
            // directory and activates it; peers can't fetch it until then.
            warn!(replica = %replica.name, %part, error = %e, "committed part could not be activated");
        }
        for &m in &unit.members {
            let member = &mut group.members[m];
            match unconfirmed.get(&u) {
                Some(reason) => member.unconfirmed = Some(reason.clone()),
                None => {
                    member.outcome = Some(BlockOutcome::Committed {
                        part: part.clone(),
                        quorum_reached,
                    })
                }
            }
            member.rows = None;
        }
    }
}

async fn ensure_partitions(
    replica: &Replica,
    client: &zk::Client,
    known: &KnownPartitions,
    group: &Group,
    open: &[usize],
) -> Result<(), TreeError> {
    for &u in open {
        let pid = &group.units[u].partition_id;
        if known.lock().contains(pid) {
            continue;
        }
        tree::ensure_partition_node(client, &replica.paths, &replica.zk_acl, pid).await?;
        known.lock().insert(pid.clone());
    }
    Ok(())
}

/// What each op of the allocation multi is, to map a failed op index back to its member.
#[derive(Clone, Copy)]
enum AllocOp {
    Absent { unit: usize, member: usize },
    Delete,
    Lock,
}

/// One multi: for each member, `blocks/<id>` must not exist (create + delete, ClickHouse's
/// trick, since multi has no "absent" check), and for each unit an ephemeral sequential
/// lock under `block_numbers/<partition>` gives the block number. `Ok(None)`: a duplicate
/// was found and answered; call again for the rest.
async fn allocate(
    replica: &Replica,
    client: &zk::Client,
    group: &mut Group,
    open: &[usize],
) -> Result<Option<Vec<(u64, String)>>, TreeError> {
    let mut multi = client.new_multi_writer();
    let mut ops: Vec<AllocOp> = Vec::new();
    for &u in open {
        for &m in &group.units[u].members {
            let block = replica.paths.block(&group.members[m].block_id);
            multi
                .add_create(&block, b"", &replica.zk_acl.persistent())
                .map_err(|e| TreeError::zk("create", block.clone(), e))?;
            multi
                .add_delete(&block, None)
                .map_err(|e| TreeError::zk("delete", block.clone(), e))?;
            ops.extend([AllocOp::Absent { unit: u, member: m }, AllocOp::Delete]);
        }
        let lock = replica
            .paths
            .block_number_lock_prefix(&group.units[u].partition_id);
        multi
            .add_create(&lock, b"", &replica.zk_acl.ephemeral_sequential())
            .map_err(|e| TreeError::zk("create", lock.clone(), e))?;
        ops.push(AllocOp::Lock);
    }
    match multi.commit().await {
        Ok(results) => {
            let mut numbers = Vec::with_capacity(open.len());
            for (op, result) in ops.iter().zip(&results) {
                if !matches!(op, AllocOp::Lock) {
                    continue;
                }
                let zk::MultiWriteResult::Create { path, .. } = result else {
                    return Err(TreeError::Corrupt {
                        path: replica.paths.block_numbers(),
                        message: "allocation multi returned an unexpected result".to_string(),
                    });
                };
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
            if numbers.len() != open.len() {
                return Err(TreeError::Corrupt {
                    path: replica.paths.block_numbers(),
                    message: "allocation multi returned too few locks".to_string(),
                });
            }
            Ok(Some(numbers))
        }
        Err(zk::MultiWriteError::OperationFailed {
            index,
            source: zk::Error::NodeExists,
        }) if matches!(ops.get(index), Some(AllocOp::Absent { .. })) => {
            let Some(AllocOp::Absent { unit, member }) = ops.get(index).copied() else {
                return Ok(None);
            };
            // Gone again (cleanup): the next allocation takes it like any new block.
            if let Some(part) =
                duplicate_of(client, replica, &group.members[member].block_id).await?
            {
                group.duplicate(replica, unit, member, part);
            }
            Ok(None)
        }
        Err(e) => Err(tree::multi_error(
            "allocate block numbers",
            &[replica.paths.block_numbers()],
            e,
        )),
    }
}

/// The part an existing block committed: the answer to an insert found to be its duplicate.
/// `None` when the block is gone again (cleanup). Every block node rtable or ClickHouse
/// commits names its part, so an empty one is reported rather than answered as part "".
async fn duplicate_of(
    client: &zk::Client,
    replica: &Replica,
    block_id: &str,
) -> Result<Option<String>, TreeError> {
    let block = replica.paths.block(block_id);
    match tree::get_string(client, &block).await? {
        Some(part) if part.is_empty() => Err(TreeError::Corrupt {
            path: block,
            message: "the block names no part, so an insert cannot be answered as its duplicate"
                .into(),
        }),
        part => Ok(part),
    }
}

/// What a successful commit multi produced besides the commit itself.
#[derive(Default)]
struct CommitExtras {
    /// The parts to push and their log entries' indexes (quorum-0 units).
    pushes: Vec<crate::push::Committed>,
    /// The next block number of each partition, reserved by the same multi.
    reserved: Vec<(String, crate::sink::reserve::Reserved)>,
}

enum CommitResult {
    Committed(CommitExtras),
    /// This member of this unit is a duplicate.
    Duplicate(usize, usize),
    /// Definitely not applied.
    Retry(String),
    /// Definitely not applied: a peer that took the part is no longer the activation that
    /// took it.
    HandoffStale(String),
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
    Block {
        unit: usize,
        member: usize,
    },
    Part,
    Quorum,
    /// A peer's `host` at the version it handed out, or its `parts/<part>` (handoff).
    Handoff,
    /// This replica's `is_active` or `host` at the versions its activation left them.
    Identity,
    /// The next block number lock of a partition, for the next insert (see `reserve`).
    Reserve,
}

/// (partition, token) of the next-number lock the commit multi creates per partition.
fn reservation_tokens(replica: &Replica, group: &Group, open: &[usize]) -> Vec<(String, String)> {
    let mut partitions: Vec<&str> = open
        .iter()
        .map(|&u| group.units[u].partition_id.as_str())
        .collect();
    partitions.sort_unstable();
    partitions.dedup();
    partitions
        .into_iter()
        .map(|p| {
            let token = format!(
                "reserved by {} {:016x}",
                replica.name,
                rand::random::<u64>()
            );
            (p.to_string(), token)
        })
        .collect()
}

/// ONE multi for the whole group: per unit the GET_PART log entry, the lock removal,
/// `blocks/<id>` of every member, `replicas/<me>/parts/<part>` and, for quorum inserts,
/// the quorum node; per partition the next block number's lock (`tokens`). The log entry
/// names the first member's block id (a quorum unit has only one, which a failed quorum
/// removes).
async fn commit(
    replica: &Replica,
    client: &zk::Client,
    group: &Group,
    open: &[usize],
    tokens: &[(String, String)],
) -> CommitResult {
    let rp = replica.paths.replica(&replica.name);
    let now = chrono::Utc::now().timestamp();
    let mut multi = client.new_multi_writer();
    let mut ops: Vec<Op> = Vec::with_capacity(open.len() * 5 + 2);
    let mut identity_checked = false;
    // Where the quorum-0 GET entries are among the ops: the log pull skips them.
    let mut own_entries: Vec<usize> = Vec::new();
    // With the peers that took each part as a handoff (a push to them is declined).
    let mut own_parts: Vec<(PartName, Vec<String>)> = Vec::new();
    for &u in open {
        let unit = &group.units[u];
        let UnitState::Staged(s) = &unit.state else {
            return CommitResult::Retry("block not staged".to_string());
        };
        let Some(&first) = unit.members.first() else {
            return CommitResult::Retry("unit without blocks".to_string());
        };
        let part = s.name.to_string();
        let requested = if unit.quorum > 1 { unit.quorum } else { 0 };
        // Handed off to every peer the quorum needs: reached by this multi, so the entry
        // asks for no quorum and no node tracks it.
        let handed_off = requested > 0 && !unit.handoff.is_empty();
        let quorum = if handed_off { 0 } else { requested };
        let entry = LogEntry::get(
            &replica.name,
            &group.members[first].block_id,
            &part,
            quorum,
            now,
        )
        .render();
        let header = PartHeader::new(&replica.columns_text, s.rows, &s.checksums).render();
        let lock = unit.lock.clone().unwrap_or_default();
        let mut results = vec![
            multi.add_create(
                &replica.paths.log_entry_prefix(),
                entry.as_bytes(),
                &replica.zk_acl.persistent_sequential(),
            ),
            multi.add_delete(&lock, None),
        ];
        if quorum == 0 {
            own_entries.push(ops.len());
            let holders = unit.handoff.iter().map(|a| a.peer.clone()).collect();
            own_parts.push((s.name.clone(), holders));
        }
        ops.extend([Op::Log, Op::Unlock]);
        for &m in &unit.members {
            results.push(multi.add_create(
                &replica.paths.block(&group.members[m].block_id),
                part.as_bytes(),
                &replica.zk_acl.persistent(),
            ));
            ops.push(Op::Block { unit: u, member: m });
        }
        results.push(multi.add_create(
            &rp.part(&part),
            header.as_bytes(),
            &replica.zk_acl.persistent(),
        ));
        ops.push(Op::Part);
        if handed_off {
            for accepted in &unit.handoff {
                let peer = replica.paths.replica(&accepted.peer);
                results.push(multi.add_check_version(&peer.host(), accepted.host_version));
                results.push(multi.add_create(
                    &peer.part(&part),
                    header.as_bytes(),
                    &replica.zk_acl.persistent(),
                ));
                ops.extend([Op::Handoff, Op::Handoff]);
            }
            identity_checked = true;
        }
        if quorum > 0 {
            let node = crate::quorum::node_path(replica, unit.quorum_mode, &part);
            let value = QuorumEntry::new(&part, quorum, &replica.name).render();
            results.push(multi.add_create(&node, value.as_bytes(), &replica.zk_acl.persistent()));
            ops.push(Op::Quorum);
            identity_checked = true;
        }
        if let Some(Err(e)) = results.into_iter().find(|r| r.is_err()) {
            return CommitResult::Retry(format!("building the commit: {e}"));
        }
    }
    // A quorum insert commits only while this replica is still the one that counted the
    // live replicas: a session that ended and came back, or another process that took the
    // name over, changes `is_active` or `host` (ClickHouse checks the same two versions).
    if identity_checked {
        let Some(activation) = replica.sessions.view().activation else {
            return CommitResult::Retry("the replica is not active".to_string());
        };
        for (path, version) in [
            (rp.is_active(), activation.is_active_version),
            (rp.host(), activation.host_version),
        ] {
            if let Err(e) = multi.add_check_version(&path, version) {
                return CommitResult::Retry(format!("building the commit: {e}"));
            }
            ops.push(Op::Identity);
        }
    }
    // The next number of each partition, reserved in the same request (see `reserve`).
    let mut reserve_at: Vec<(usize, String)> = Vec::new();
    for (partition, token) in tokens {
        let prefix = replica.paths.block_number_lock_prefix(partition);
        if let Err(e) = multi.add_create(
            &prefix,
            token.as_bytes(),
            &replica.zk_acl.ephemeral_sequential(),
        ) {
            return CommitResult::Retry(format!("building the commit: {e}"));
        }
        reserve_at.push((ops.len(), partition.clone()));
        ops.push(Op::Reserve);
    }
    let committing = replica.own_log.begin_commit();
    match multi.commit().await {
        Ok(results) => {
            let indexes = crate::queue::own_log::created_indexes(&results, &own_entries);
            committing.committed(client.session_id().0, &indexes);
            let mut extras = CommitExtras::default();
            if indexes.len() == own_parts.len() {
                extras.pushes = own_parts
                    .into_iter()
                    .zip(indexes)
                    .map(|((part, holders), log_index)| crate::push::Committed {
                        part,
                        log_index,
                        holders,
                    })
                    .collect();
            }
            for (at, partition) in reserve_at {
                if let Some(zk::MultiWriteResult::Create { path, .. }) = results.get(at)
                    && let Some(lock) = crate::sink::reserve::parse_lock(path)
                {
                    extras.reserved.push((partition, lock));
                }
            }
            CommitResult::Committed(extras)
        }
        Err(zk::MultiWriteError::OperationFailed { index, source }) => match (ops.get(index), source) {
            (Some(Op::Block { unit, member }), zk::Error::NodeExists) => {
                CommitResult::Duplicate(*unit, *member)
            }
            (Some(Op::Quorum), zk::Error::NodeExists) => CommitResult::Refused(
                "a previous sequential quorum insert has not reached its quorum yet (UNSATISFIED_QUORUM_FOR_PREVIOUS_WRITE); retry later or use insert_quorum_parallel=1".to_string(),
            ),
            (Some(Op::Handoff), source) => CommitResult::HandoffStale(format!(
                "a peer that took the part changed since ({source})"
            )),
            (Some(Op::Identity), source) => CommitResult::Retry(format!(
                "this replica's is_active or host changed since its activation ({source}); committing again on the current session"
            )),
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

/// Hands each open quorum unit's part to the peers its quorum needs (see `handoff`),
/// all units at once; a unit keeps them only when every needed peer took it.
async fn hand_off_units(
    replica: &Arc<Replica>,
    client: &zk::Client,
    group: &mut Group,
    open: &[usize],
    names: &[PartName],
) {
    for &u in open {
        group.units[u].handoff.clear();
    }
    if group.no_handoff {
        return;
    }
    use crate::sink::handoff::{Source, hand_off};
    let wanted: Vec<(usize, &PartName)> = open
        .iter()
        .copied()
        .zip(names)
        .filter(|&(u, _)| {
            let unit = &group.units[u];
            unit.quorum > 1
                && unit.quorum_mode == crate::quorum::Mode::Parallel
                && unit.lock.is_some()
                && matches!(unit.state, UnitState::Staged(_) | UnitState::Encoded(_))
        })
        .collect();
    if wanted.is_empty() {
        return;
    }
    let sends = wanted.iter().map(|&(u, name)| {
        let unit = &group.units[u];
        let needed = unit.quorum as usize - 1;
        let source = match &unit.state {
            UnitState::Encoded(e) => Some(Source::Encoded(name, e)),
            UnitState::Staged(s) => Some(Source::Staged(s)),
            _ => None,
        };
        async move {
            match (source, &unit.lock) {
                (Some(source), Some(lock)) => hand_off(replica, client, source, lock, needed).await,
                _ => Vec::new(),
            }
        }
    });
    let handed = futures::future::join_all(sends).await;
    for ((u, _), accepted) in wanted.into_iter().zip(handed) {
        group.units[u].handoff = accepted;
    }
}

/// Counts the active replicas for each quorum unit no peer took before its commit and
/// whose insert skipped that count, and refuses the units whose quorum cannot be reached,
/// as the insert would have before writing them. Returns the units still to commit.
async fn refuse_short_quorums(
    replica: &Replica,
    client: &zk::Client,
    group: &mut Group,
    open: Vec<usize>,
) -> Vec<usize> {
    let unchecked: Vec<usize> = open
        .iter()
        .copied()
        .filter(|&u| {
            let unit = &group.units[u];
            unit.quorum > 1 && !unit.quorum_checked && unit.handoff.is_empty()
        })
        .collect();
    let Some(&most) = unchecked.iter().map(|&u| &group.units[u].quorum).max() else {
        return open;
    };
    for &u in &unchecked {
        group.units[u].quorum_checked = true;
    }
    // A failed count proves nothing: those units commit and wait for their quorum.
    let active = match crate::quorum::active_replicas(replica, client).await {
        Ok(active) if active < most => active,
        Ok(_) => return open,
        Err(e) => {
            debug!(replica = %replica.name, error = %e, "cannot count the active replicas; committing anyway");
            return open;
        }
    };
    // An insert is refused whole: its other parts (one per partition) go with it.
    let refused_jobs: HashSet<usize> = unchecked
        .iter()
        .filter(|&&u| group.units[u].quorum > active)
        .flat_map(|&u| group.units[u].members.iter().map(|&m| group.members[m].job))
        .collect();
    for &u in &open {
        let unit = &group.units[u];
        let quorum = unit.quorum;
        if quorum <= 1
            || !unit
                .members
                .iter()
                .any(|&m| refused_jobs.contains(&group.members[m].job))
        {
            continue;
        }
        let reason = crate::sink::too_few_replicas(active, quorum);
        if let Some(lock) = group.units[u].lock.take() {
            let _ = client.delete(&lock, None).await;
        }
        group.units[u].discard(replica);
        for m in std::mem::take(&mut group.units[u].members) {
            group.members[m].refused = Some(reason.clone());
        }
    }
    open.into_iter()
        .filter(|&u| group.units[u].is_open())
        .collect()
}

async fn wait_for_new_session(replica: &Replica, generation: u64) {
    let mut views = replica.sessions.subscribe();
    loop {
        if matches!(replica.sessions.active(), Ok((_, g)) if g != generation) {
            return;
        }
        if views.changed().await.is_err() {
            return;
        }
    }
}

async fn release_all_locks(client: &zk::Client, group: &mut Group, open: &[usize]) {
    for &u in open {
        if let Some(lock) = group.units[u].lock.take() {
            let _ = client.delete(&lock, None).await;
        }
    }
}

/// Did the commit of these units happen? All units of one multi share the answer, so
/// checking the first one's `parts` node settles it. `None`: ZooKeeper stayed
/// unreachable for longer than a session timeout.
async fn resolve(replica: &Replica, group: &Group, open: &[usize]) -> Option<bool> {
    let first = open.iter().find_map(|&u| match &group.units[u].state {
        UnitState::Staged(s) => Some(s.name.to_string()),
        _ => None,
    })?;
    crate::outcome::check_committed(
        replica,
        &first,
        replica.session_timeout + Duration::from_secs(2),
    )
    .await
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn only_a_group_after_a_concurrent_one_waits() {
        let delay = Duration::from_millis(2);
        assert!(!lingers(0, delay), "the first group");
        assert!(!lingers(1, delay), "a lone client's next insert");
        assert!(lingers(2, delay));
        assert!(lingers(16, delay));
        assert!(!lingers(16, Duration::ZERO), "turned off");
    }

    #[test]
    fn inserts_held_by_a_collector_that_dies_are_answered_nothing_was_committed() {
        let (reply, mut answer) = oneshot::channel();
        let held = Held(vec![Job {
            blocks: Vec::new(),
            reply,
        }]);
        drop(held);
        match answer.try_recv() {
            Ok(Err(InsertError::Interrupted(_))) => {}
            other => panic!("expected Interrupted, got {other:?}"),
        }
    }
}
