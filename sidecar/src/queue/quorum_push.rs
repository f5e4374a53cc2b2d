//! A pushed quorum part, recorded and counted by the peer the moment its commit lands.
//!
//! A small part without a quorum is pushed after its commit and installed as a prefetch:
//! its entry records it later. A quorum part cannot wait for that: its inserter answers
//! only once enough replicas hold it, and the entry's path (the log watch, the entry read,
//! the queue multi, the record multi) is four ZooKeeper round trips after the commit. So
//! the inserter pushes it while its commit multi is in flight (see `prepush`), and the
//! peer:
//!
//! 1. verifies and fsyncs the part but keeps it invisible (held, in its download
//!    directory), holding its in-flight slot so that the entry, should it come, waits;
//! 2. waits for the inserter's word on the commit (a second request, `go`): aborted, or
//!    committed as log entry N. Nothing is recorded for a part whose commit did not land;
//! 3. records it in one multi: `parts/<part>` created, and the quorum node as its inserter
//!    created it (version 0) rewritten with this replica added, or removed when that
//!    reaches the quorum. A node someone wrote since fails the multi, and the node is read
//!    and the multi tried again; a node already gone is checked not to have failed
//!    (`failed_parts/<part>` absent, in the same multi) and the part recorded alone;
//! 4. makes the part visible only once that multi committed, and answers the `go` with
//!    whether it completed the quorum (the inserter still learns it from ZooKeeper too).
//!
//! Why this is safe where a plain install would not be: a quorum fails only while its
//! node exists and while no replica listed in `parts/` is active (`quorum::fail` checks
//! both in its multi). The record here either lands before the failure, and then the
//! failure cannot (this replica is active and listed, and the node's version moved), or
//! after it, and then its version-checked write or its `failed_parts` check fails and the
//! part is thrown away, never visible. A part that is visible was counted, so the held
//! path of its entry, which records without checking `failed_parts`, never meets a part
//! of a failed quorum.
//!
//! A crash before the multi leaves a download directory that the next start sets aside;
//! after it, ZooKeeper lists the part and recovery fetches it again if the rename was lost.
//! The entry itself, when pulled, finds the part held and recorded and is skipped.

use std::collections::{HashMap, HashSet};
use std::sync::Arc;
use std::time::Duration;

use parking_lot::Mutex;
use tracing::{debug, info, warn};
use zookeeper_client as zk;

use rtable_protocol::PartName;
use rtable_protocol::part_header::PartHeader;
use rtable_protocol::tree::{self, TreeError};

use crate::fetcher;
use crate::metrics::Metrics;
use crate::quorum::{self, PendingAck};
use crate::replica::Replica;
use crate::store::HeldPart;

/// How long an unknown outcome of the record multi is resolved for before the held part
/// is given up (the entry or the next start's recovery then handles the part).
const RESOLVE_FOR: Duration = Duration::from_secs(30);

/// Quorum parts recorded from a push whose log entry the pull has not met yet: it skips
/// them, as it skips the entries of this replica's own inserts.
#[derive(Default)]
pub struct Recorded {
    parts: Mutex<HashSet<String>>,
}

impl Recorded {
    fn insert(&self, part: &PartName) {
        self.parts.lock().insert(part.to_string());
    }

    /// Whether `part` was recorded from a push; forgets it (its entry is being skipped).
    pub fn take(&self, part: &PartName) -> bool {
        self.parts.lock().remove(&part.to_string())
    }
}

/// How long a held part waits for its inserter's word on the commit, and a `go` for the
/// outcome of its record.
const GO_WAIT: Duration = Duration::from_secs(10);

/// The inserter's word on a pushed quorum part's commit.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Go {
    /// Committed as log entry `log-<index>`.
    Commit(u64),
    Abort,
}

/// Where a held part's push and its `go` meet (either may come first).
#[derive(Default)]
pub struct Gates {
    open: Mutex<HashMap<String, Arc<Gate>>>,
}

struct Gate {
    go: tokio::sync::watch::Sender<Option<Go>>,
    result: tokio::sync::watch::Sender<Option<Result<Taken, String>>>,
}

impl Gates {
    fn open(&self, part: &PartName) -> Arc<Gate> {
        self.open
            .lock()
            .entry(part.to_string())
            .or_insert_with(|| {
                Arc::new(Gate {
                    go: tokio::sync::watch::channel(None).0,
                    result: tokio::sync::watch::channel(None).0,
                })
            })
            .clone()
    }

    /// Waits (at most `limit`) for the push of `part` under way here, if any, to record
    /// the part or give up. The log pull calls this before deciding whether the part's
    /// entry needs queueing: a part about to be recorded by its push does not, and
    /// queueing it would put the queue multi ahead of the record on this session.
    pub async fn settled(&self, part: &PartName, limit: Duration) {
        let Some(gate) = self.open.lock().get(&part.to_string()).cloned() else {
            return;
        };
        let mut result = gate.result.subscribe();
        let _ = tokio::time::timeout(limit, result.wait_for(Option::is_some)).await;
    }

    fn close(&self, part: &PartName, gate: &Arc<Gate>) {
        let mut open = self.open.lock();
        if open
            .get(&part.to_string())
            .is_some_and(|g| Arc::ptr_eq(g, gate))
        {
            open.remove(&part.to_string());
        }
    }
}

/// What a pushed quorum part's peer did with it.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Taken {
    /// Recorded and counted; the quorum needs more replicas.
    Counted,
    /// Recorded, and this replica completed the quorum.
    Completed,
    /// Recorded after the quorum was already reached.
    Recorded,
}

impl Taken {
    pub fn text(self) -> &'static str {
        match self {
            Taken::Counted => "counted",
            Taken::Completed => "completed",
            Taken::Recorded => "recorded",
        }
    }
}

/// Takes a pushed quorum part (after `prefetch::refuse_push` said yes, which claimed it):
/// holds it, waits for its `go` and records it. `Err`: why it was not taken; the part's
/// entry then fetches it as usual. The `go` gets the same answer.
pub async fn take<S, E>(
    replica: Arc<Replica>,
    source: &str,
    part: &PartName,
    required: u32,
    body: S,
) -> Result<Taken, String>
where
    S: futures::Stream<Item = Result<bytes::Bytes, E>> + Unpin,
    E: std::fmt::Display,
{
    let gate = replica.quorum_gates.open(part);
    let taken = take_claimed(&replica, source, part, required, body, &gate).await;
    gate.result.send_replace(Some(taken.clone()));
    replica.quorum_gates.close(part, &gate);
    replica.prefetched.forget(part);
    match &taken {
        Ok(how) => {
            Metrics::inc(&replica.metrics.pushed_parts_taken);
            Metrics::inc(&replica.metrics.quorum_pushes_recorded);
            info!(replica = %replica.name, %part, %source, how = how.text(), "pushed quorum part recorded");
        }
        Err(reason) => {
            debug!(replica = %replica.name, %part, %source, %reason, "pushed quorum part not taken; its entry will fetch it");
        }
    }
    replica.queue_notify.notify_one();
    taken
}

/// The inserter's word on a pushed part's commit; returns what the push made of it.
pub async fn go(replica: &Replica, part: &PartName, go: Go) -> Result<Taken, String> {
    let gate = replica.quorum_gates.open(part);
    gate.go.send_replace(Some(go));
    let mut result = gate.result.subscribe();
    let outcome = tokio::time::timeout(GO_WAIT, result.wait_for(Option::is_some)).await;
    let answer = match outcome {
        Ok(Ok(r)) => r.clone().unwrap_or_else(|| Err("no outcome".to_string())),
        Ok(Err(_)) => Err("the push ended without an outcome".to_string()),
        Err(_) => Err("no push of this part arrived in time".to_string()),
    };
    // A gate this call opened for a push that never came.
    replica.quorum_gates.close(part, &gate);
    answer
}

/// Waits for the inserter's word on the commit of a held part.
async fn wait_go(gate: &Gate) -> Result<u64, String> {
    let mut go = gate.go.subscribe();
    match tokio::time::timeout(GO_WAIT, go.wait_for(Option::is_some)).await {
        Ok(Ok(g)) => match *g {
            Some(Go::Commit(index)) => Ok(index),
            _ => Err("its commit was aborted".to_string()),
        },
        Ok(Err(_)) => Err("no word on its commit".to_string()),
        Err(_) => Err(format!(
            "no word on its commit within {} s",
            GO_WAIT.as_secs()
        )),
    }
}

async fn take_claimed<S, E>(
    replica: &Arc<Replica>,
    source: &str,
    part: &PartName,
    required: u32,
    body: S,
    gate: &Gate,
) -> Result<Taken, String>
where
    S: futures::Stream<Item = Result<bytes::Bytes, E>> + Unpin,
    E: std::fmt::Display,
{
    let started = std::time::Instant::now();
    let (held, _slot, bytes) = fetcher::receive_pushed_held(replica, source, part, body)
        .await
        .map_err(|e| e.to_string())?;
    let held_at = started.elapsed();
    let log_index = match wait_go(gate).await {
        Ok(index) => index,
        Err(reason) => {
            replica.store.discard_held(held);
            return Err(reason);
        }
    };
    // The entry pulled already: a drop range after it may have executed here too.
    if let Some(reason) = super::prefetch::pulled_already(replica, log_index) {
        replica.store.discard_held(held);
        return Err(reason);
    }
    Metrics::inc(&replica.metrics.fetches);
    Metrics::add(&replica.metrics.fetched_bytes, bytes);
    let header = PartHeader::new(&replica.columns_text, held.rows, &held.checksums).render();
    let recorded = match replica.sessions.active() {
        Ok((client, _)) => record(replica, &client, part, source, required, &header).await,
        Err(e) => Err(Unrecorded::Not(e.reason)),
    };
    let taken = match recorded {
        Ok(taken) => taken,
        Err(Unrecorded::Not(reason)) => {
            replica.store.discard_held(held);
            return Err(reason);
        }
        Err(Unrecorded::Unknown(reason)) => match resolve(replica, part).await {
            Some(true) => Taken::Recorded,
            Some(false) => {
                replica.store.discard_held(held);
                return Err(reason);
            }
            None => {
                // ZooKeeper may list the part: recovery at the next start fetches it if
                // so. Visible without knowing that, it could be a failed quorum's part.
                warn!(replica = %replica.name, %part, %reason, "cannot tell whether a pushed quorum part was recorded; dropping the held copy");
                replica.store.discard_held(held);
                return Err(reason);
            }
        },
    };
    let recorded_at = started.elapsed();
    activate(replica, part, held)?;
    replica.quorum_pushed.insert(part);
    tokio::spawn(forget_if_dropped(replica.clone(), part.clone()));
    debug!(
        replica = %replica.name,
        %part,
        held_us = held_at.as_micros() as u64,
        recorded_us = recorded_at.as_micros() as u64,
        activated_us = started.elapsed().as_micros() as u64,
        "pushed quorum part timing"
    );
    Ok(taken)
}

fn activate(replica: &Replica, part: &PartName, held: HeldPart) -> Result<(), String> {
    match replica.store.activate_held(held) {
        Ok(_) => Ok(()),
        // Only an entry's own fetch installs the part meanwhile, and it waits for the
        // in-flight slot held until here: anything else is a store fault, reported.
        Err(e) => {
            warn!(replica = %replica.name, %part, error = %e, "cannot make a recorded pushed part visible; recovery fetches it again");
            Err(e.to_string())
        }
    }
}

/// A drop range pulled while the part was held may have executed before it was recorded
/// and so missed it: the part then goes again, from disk (as for a prefetch) and from
/// this replica's `parts/`.
async fn forget_if_dropped(replica: Arc<Replica>, part: PartName) {
    super::prefetch::remove_if_dropped(&replica, &part).await;
    if replica.store.contains(&part) {
        return;
    }
    let path = replica.paths.replica(&replica.name).part(&part.to_string());
    if let Ok((client, _)) = replica.sessions.active() {
        match client.delete(&path, None).await {
            Ok(()) | Err(zk::Error::NoNode) => {}
            Err(e) => {
                warn!(replica = %replica.name, %part, error = %e, "cannot remove the record of a dropped pushed part")
            }
        }
    }
}

/// Why the record did not happen.
enum Unrecorded {
    /// Certainly not recorded.
    Not(String),
    /// The multi's outcome is unknown (connection lost).
    Unknown(String),
}

/// The record multi (see the module doc): with the acknowledgement as created, then as
/// read, then, once the node is gone, with the check that the quorum did not fail.
async fn record(
    replica: &Replica,
    client: &zk::Client,
    part: &PartName,
    source: &str,
    required: u32,
    header: &str,
) -> Result<Taken, Unrecorded> {
    let name = part.to_string();
    let mut ack = Some(PendingAck::as_created(replica, &name, required, source));
    for _ in 0..5 {
        let taken = match &ack {
            Some(a) if a.completes() => Taken::Completed,
            Some(_) => Taken::Counted,
            None => Taken::Recorded,
        };
        let committed = record_once(replica, client, &name, header, ack.as_ref())
            .await
            .map_err(|e| Unrecorded::Not(e.to_string()))?;
        match committed {
            Ok(()) => {
                if let Some(a) = &ack {
                    a.log_done(replica);
                }
                return Ok(taken);
            }
            Err(zk::MultiWriteError::OperationFailed { source, .. }) => match (&ack, source) {
                // Someone wrote the quorum node since it was created, or removed it: read
                // it (None once it is gone or counts this replica already).
                (Some(_), zk::Error::BadVersion | zk::Error::NoNode) => {
                    ack = quorum::prepare_ack(replica, client, part)
                        .await
                        .map_err(|e| Unrecorded::Unknown(e.to_string()))?;
                }
                (_, source) => {
                    return Err(Unrecorded::Not(format!(
                        "recording the pushed part failed ({source}): its quorum failed, or it is recorded already"
                    )));
                }
            },
            Err(e) => return Err(Unrecorded::Unknown(e.to_string())),
        }
    }
    Err(Unrecorded::Not(
        "its quorum node kept changing; its entry will record it".to_string(),
    ))
}

async fn record_once(
    replica: &Replica,
    client: &zk::Client,
    part: &str,
    header: &str,
    ack: Option<&PendingAck>,
) -> Result<Result<(), zk::MultiWriteError>, TreeError> {
    let part_path = replica.paths.replica(&replica.name).part(part);
    let mut multi = client.new_multi_writer();
    multi
        .add_create(&part_path, header.as_bytes(), &tree::persistent())
        .map_err(|e| TreeError::zk("create", part_path.clone(), e))?;
    match ack {
        Some(ack) => ack.add_to(&mut multi)?,
        None => quorum::add_not_failed(replica, &mut multi, part)?,
    }
    Ok(multi.commit().await.map(|_| ()))
}

/// After a lost connection: whether `parts/<part>` exists, read on whatever session comes
/// back (a multi applies whole or not at all). `None` when no answer came in time.
async fn resolve(replica: &Replica, part: &PartName) -> Option<bool> {
    let path = replica.paths.replica(&replica.name).part(&part.to_string());
    let deadline = tokio::time::Instant::now() + RESOLVE_FOR;
    while tokio::time::Instant::now() < deadline {
        if let Ok((client, _)) = replica.sessions.active() {
            match client.check_stat(&path).await {
                Ok(stat) => return Some(stat.is_some()),
                Err(e) => {
                    debug!(replica = %replica.name, %part, error = %e, "resolving a pushed part's record")
                }
            }
        }
        tokio::time::sleep(Duration::from_millis(200)).await;
    }
    None
}

#[cfg(test)]
mod tests {
    use super::*;

    fn part() -> PartName {
        PartName::parse("202501_7_7_0").expect("part name")
    }

    #[tokio::test]
    async fn a_held_part_waits_for_its_word_whichever_comes_first() {
        let gates = Gates::default();
        // The push first, then the word.
        let gate = gates.open(&part());
        let waiting = tokio::spawn({
            let gate = gate.clone();
            async move { wait_go(&gate).await }
        });
        tokio::task::yield_now().await;
        gates.open(&part()).go.send_replace(Some(Go::Commit(42)));
        assert_eq!(waiting.await.expect("joined"), Ok(42));
        gates.close(&part(), &gate);
        assert!(gates.open.lock().is_empty());
        // The word first (the push's request was slower than the commit).
        let early = gates.open(&part());
        early.go.send_replace(Some(Go::Commit(43)));
        let gate = gates.open(&part());
        assert!(Arc::ptr_eq(&early, &gate));
        assert_eq!(wait_go(&gate).await, Ok(43));
    }

    #[tokio::test]
    async fn an_aborted_commit_is_not_taken() {
        let gates = Gates::default();
        let gate = gates.open(&part());
        gate.go.send_replace(Some(Go::Abort));
        assert!(wait_go(&gate).await.is_err());
    }

    #[test]
    fn closing_a_stale_gate_keeps_the_newer_one() {
        let gates = Gates::default();
        let old = gates.open(&part());
        gates.close(&part(), &old);
        let new = gates.open(&part());
        gates.close(&part(), &old);
        assert!(Arc::ptr_eq(&gates.open(&part()), &new));
    }

    #[test]
    fn a_pushed_quorum_part_is_remembered_until_its_entry_is_skipped() {
        let recorded = Recorded::default();
        recorded.insert(&part());
        assert!(recorded.take(&part()));
        assert!(!recorded.take(&part()));
    }
}
