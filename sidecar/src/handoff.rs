//! Handoff, the receiving side: a quorum insert's inserter copies its part here *before*
//! its commit, and the commit multi itself records the part for this replica
//! (`replicas/<me>/parts/<part>`), so the insert reaches `insert_quorum` in one ZooKeeper
//! write instead of a commit followed by this replica's fetch and record.
//!
//! The rules that keep "recorded here" and "on this disk" the same thing:
//! - The copy is verified (in memory) before this replica answers; the inserter records it
//!   only after that answer. Writing it as `handoff_<part>` and its fsync overlap the
//!   inserter's commit, and the inserter acknowledges only once a second answer says the
//!   copy is durable. Until then the copy cannot turn active, and a failed write or fsync
//!   discards it: the record then names a part this replica does not hold, which its GET
//!   entry fetches like any other (the same window as a machine crash before an
//!   inserter's own fsync ends).
//! - The answer carries the version of this replica's `host` node, which every activation
//!   rewrites; the commit checks it. So a commit cut off in flight cannot land after this
//!   replica restarted (or took a new session) and decided the copy's fate.
//! - A copy is discarded only once its commit cannot land any more: its block number lock
//!   (an ephemeral the commit deletes) is gone and `parts/<part>` is not there, or, at a
//!   start, after the activation moved `host` on. Otherwise it is kept.
//! - It turns active only with proof of the commit: its log entry (the queue executes the
//!   GET and finds it here), or `parts/<part>` at a start. A drop range covering it removes
//!   the record and the copy together once the commit's fate is settled.

use std::collections::HashMap;
use std::sync::Arc;
use std::time::{Duration, Instant};

use parking_lot::Mutex;
use tracing::{debug, info, warn};
use zookeeper_client as zk;

use rtable_protocol::PartName;
use rtable_protocol::tree::TreeError;

use crate::metrics::Metrics;
use crate::replica::Replica;
use crate::store::ActivePart;
use crate::store::handoff::HandoffPart;

/// How long a copy waits for its entry before its commit's fate is looked up.
const SETTLE_AFTER: Duration = Duration::from_secs(10);
/// How often unclaimed copies are looked at.
const SWEEP_EVERY: Duration = Duration::from_secs(5);

/// Copies taken (or being taken) whose commit's entry has not activated them yet.
#[derive(Default)]
pub struct Handoffs {
    held: Mutex<HashMap<String, Held>>,
    /// Woken whenever a copy turns durable or is given up, for entries waiting on one.
    settled: tokio::sync::Notify,
}

struct Held {
    /// The inserter's block number lock, which its commit deletes.
    lock: String,
    since: Instant,
    /// `None` while the copy is still arriving.
    copy: Option<HandoffPart>,
    /// The commit landed (`parts/<part>` seen with the lock gone): only its entry is awaited.
    recorded: bool,
}

impl Handoffs {
    pub fn contains(&self, part: &PartName) -> bool {
        self.held.lock().contains_key(&part.to_string())
    }

    fn claim(&self, part: &PartName, lock: &str) -> bool {
        match self.held.lock().entry(part.to_string()) {
            std::collections::hash_map::Entry::Occupied(_) => false,
            std::collections::hash_map::Entry::Vacant(slot) => {
                slot.insert(Held {
                    lock: lock.to_string(),
                    since: Instant::now(),
                    copy: None,
                    recorded: false,
                });
                true
            }
        }
    }

    fn release(&self, part: &PartName) {
        self.held.lock().remove(&part.to_string());
        self.settled.notify_waiters();
    }

    fn arrived(&self, part: &PartName, copy: HandoffPart) {
        if let Some(held) = self.held.lock().get_mut(&part.to_string()) {
            held.copy = Some(copy);
        }
        self.settled.notify_waiters();
    }

    /// Parts held here that `range` contains.
    fn in_range(&self, range: &PartName) -> Vec<PartName> {
        self.held
            .lock()
            .keys()
            .filter_map(|k| PartName::parse(k).ok())
            .filter(|p| range.contains(p))
            .collect()
    }
}

/// Why a handoff is refused (the inserter then commits without counting on this replica),
/// or the `host` version the inserter's commit must check.
pub fn refuse(replica: &Replica, source: &str, part: &PartName, lock: &str) -> Result<i32, String> {
    if source == replica.name {
        return Err("the handoff came from this replica".to_string());
    }
    if part.is_drop_range() || part.level != 0 {
        return Err("only a newly inserted part is handed off".to_string());
    }
    if !lock.starts_with(&replica.paths.block_numbers()) {
        return Err(format!("`{lock}` is not a block number lock of this table"));
    }
    let view = replica.sessions.view();
    let Some(activation) = view.activation else {
        return Err("this replica is not active".to_string());
    };
    if replica.sessions.active().is_err() {
        return Err("no ZooKeeper session".to_string());
    }
    if replica.store.covering(part).is_some() {
        return Err("held already".to_string());
    }
    if replica.queue.lock().dropped_by(part).is_some() {
        return Err("a drop range covers it".to_string());
    }
    if !replica.handoffs.claim(part, lock) {
        return Err("already handed off here".to_string());
    }
    Ok(activation.host_version)
}

/// The outcome of a verified copy's fsync, still to come.
pub struct Durable(tokio::sync::oneshot::Receiver<Result<(), String>>);

impl Durable {
    /// `Ok` once the copy is durable here, or why it was discarded.
    pub async fn wait(self) -> Result<(), String> {
        self.0
            .await
            .unwrap_or_else(|_| Err("the handoff task failed".to_string()))
    }
}

/// Receives a copy [`refuse`] accepted (and claimed) and answers once it is verified,
/// which happens in memory (see `store::received`); writing and fsyncing it then run on,
/// and their outcome arrives through the returned [`Durable`]. The inserter's commit
/// overlaps them and its acknowledgement waits for them, the way an insert's own part is
/// fsynced alongside its commit.
///
/// Runs in a task of its own, so an inserter that goes away mid-request cannot leave a
/// claim without its outcome. Until its fsync succeeded the copy stays "arriving": no
/// entry activates it, and a failed write or fsync discards it, so its GET entry fetches
/// the part like any other.
pub async fn take<S, E>(
    replica: Arc<Replica>,
    source: String,
    part: PartName,
    body: S,
) -> Result<Durable, String>
where
    S: futures::Stream<Item = Result<bytes::Bytes, E>> + Unpin + Send + 'static,
    E: std::fmt::Display + Send + 'static,
{
    let (verified_tx, verified_rx) = tokio::sync::oneshot::channel();
    let (durable_tx, durable_rx) = tokio::sync::oneshot::channel();
    tokio::spawn(async move {
        // A download of the same part (a prefetch) waits for this copy rather than race it.
        let Some(_in_flight) = crate::fetcher::InFlight::claim(&replica, &part) else {
            replica.handoffs.release(&part);
            let _ = verified_tx.send(Err("a download of the part is in flight".to_string()));
            return;
        };
        let received = match receive(&replica, body).await {
            Ok(r) => r,
            Err(reason) => {
                replica.handoffs.release(&part);
                debug!(replica = %replica.name, %part, %source, error = %reason, "handoff refused");
                let _ = verified_tx.send(Err(reason));
                return;
            }
        };
        let _ = verified_tx.send(Ok(()));
        let started = Instant::now();
        let store = replica.store.clone();
        let name = part.clone();
        let written = tokio::task::spawn_blocking(move || {
            let (copy, unsynced) = store
                .write_handoff(&name, &received)
                .map_err(|e| e.to_string())?;
            match unsynced.sync() {
                Ok(()) => Ok(copy),
                Err(e) => {
                    store.discard_handoff(&copy);
                    Err(e.to_string())
                }
            }
        })
        .await;
        let written = match written {
            _ if crate::failpoint::fire(crate::failpoint::HANDOFF_FSYNC_FAILS) => {
                if let Ok(Ok(copy)) = &written {
                    replica.store.discard_handoff(copy);
                }
                Err("failpoint handoff_fsync_fails".to_string())
            }
            Ok(written) => written,
            Err(e) => Err(format!("the write task failed: {e}")),
        };
        match written {
            Ok(copy) => {
                let bytes = copy.checksums.total_bytes();
                replica.handoffs.arrived(&part, copy);
                Metrics::inc(&replica.metrics.handoffs_taken);
                debug!(replica = %replica.name, %part, %source, bytes, sync_us = started.elapsed().as_micros() as u64, "took a handed-off part");
                let _ = durable_tx.send(Ok(()));
            }
            Err(reason) => {
                replica.handoffs.release(&part);
                warn!(replica = %replica.name, %part, %source, error = %reason, "cannot write or fsync a handed-off part; discarded it, its entry will fetch the part");
                let _ = durable_tx.send(Err(reason));
            }
        }
    });
    match verified_rx.await {
        Ok(Ok(())) => Ok(Durable(durable_rx)),
        Ok(Err(reason)) => Err(reason),
        Err(_) => Err("the handoff task failed".to_string()),
    }
}

/// The most a handoff body may hold: a part the inserter may hand off (its
/// `--push-max-bytes`, at least the default 1 MiB, as replicas may differ) and its header.
fn body_limit(replica: &Replica) -> usize {
    let part = usize::try_from(replica.cfg.push_max_bytes).unwrap_or(usize::MAX);
    part.max(1 << 20)
        .saturating_add(crate::exchange::MAX_HEADER_BYTES)
}

/// Reads the whole body and verifies it in memory.
async fn receive<S, E>(
    replica: &Replica,
    mut body: S,
) -> Result<crate::store::received::ReceivedPart, String>
where
    S: futures::Stream<Item = Result<bytes::Bytes, E>> + Unpin,
    E: std::fmt::Display,
{
    use futures::StreamExt;
    let limit = body_limit(replica);
    let mut buf = bytes::BytesMut::new();
    while let Some(chunk) = body.next().await {
        let chunk = chunk.map_err(|e| format!("reading the handoff body: {e}"))?;
        if buf.len() + chunk.len() > limit {
            return Err(format!(
                "a handoff body is at most {limit} bytes; larger parts are fetched"
            ));
        }
        buf.extend_from_slice(&chunk);
    }
    let table = crate::rows::arrow_schema(&replica.table.schema);
    crate::store::received::verify_received(buf.freeze(), &table).map_err(|e| e.to_string())
}

/// What the queue executor found for a GET's part.
pub enum Consumed {
    /// No copy here.
    None,
    /// The copy is still arriving: try again shortly.
    Arriving,
    /// The copy is active now.
    Active(Arc<ActivePart>),
}

/// How long a GET entry waits for its copy to finish arriving (its fsync overlaps the
/// commit, so the entry can come first) before it is postponed.
const ARRIVAL_PATIENCE: Duration = Duration::from_secs(2);

/// [`consume`], waiting a little for a copy still arriving.
pub async fn consume_when_ready(replica: &Replica, part: &PartName) -> Consumed {
    let deadline = tokio::time::Instant::now() + ARRIVAL_PATIENCE;
    loop {
        // Taken before looking, so a copy that settles in between still wakes us.
        let settled = replica.handoffs.settled.notified();
        match consume(replica, part) {
            Consumed::Arriving if tokio::time::Instant::now() < deadline => {
                let _ = tokio::time::timeout_at(deadline, settled).await;
            }
            other => return other,
        }
    }
}

/// Activates the copy of `part`, if one is here: its GET entry proves the commit.
pub fn consume(replica: &Replica, part: &PartName) -> Consumed {
    let copy = {
        let mut held = replica.handoffs.held.lock();
        let key = part.to_string();
        match held.get(&key) {
            None => return Consumed::None,
            Some(h) if h.copy.is_none() => return Consumed::Arriving,
            Some(_) => held.remove(&key).and_then(|h| h.copy),
        }
    };
    let Some(copy) = copy else {
        return Consumed::None;
    };
    match replica.store.activate_handoff(copy.clone()) {
        Ok(active) => {
            info!(replica = %replica.name, %part, "activated a handed-off part");
            Consumed::Active(active)
        }
        Err(e) => {
            // Held already through another path (a covering part): the copy is surplus.
            warn!(replica = %replica.name, %part, error = %e, "cannot activate a handed-off part; discarding it");
            replica.store.discard_handoff(&copy);
            Consumed::None
        }
    }
}

/// Whether the commit that would record `lock`'s part can still land: its lock exists.
async fn may_still_commit(client: &zk::Client, lock: &str) -> Result<bool, TreeError> {
    client
        .check_stat(lock)
        .await
        .map(|s| s.is_some())
        .map_err(|e| TreeError::zk("exists", lock.to_string(), e))
}

async fn recorded_here(
    replica: &Replica,
    client: &zk::Client,
    part: &PartName,
) -> Result<bool, TreeError> {
    let path = replica.paths.replica(&replica.name).part(&part.to_string());
    client
        .check_stat(&path)
        .await
        .map(|s| s.is_some())
        .map_err(|e| TreeError::zk("exists", path, e))
}

/// A drop range about to run over copies held here: each must be settled first. Its
/// record (if the commit landed) goes with the copy. `Err`: why the drop must wait.
pub async fn settle_for_drop(
    replica: &Replica,
    client: &zk::Client,
    range: &PartName,
) -> Result<Result<(), String>, TreeError> {
    for part in replica.handoffs.in_range(range) {
        let (lock, copy) = {
            let held = replica.handoffs.held.lock();
            match held.get(&part.to_string()) {
                None => continue,
                Some(h) => (h.lock.clone(), h.copy.clone()),
            }
        };
        let Some(copy) = copy else {
            return Ok(Err(format!(
                "waiting for the handed-off part {part} to arrive"
            )));
        };
        if may_still_commit(client, &lock).await? {
            return Ok(Err(format!(
                "waiting for the commit of the handed-off part {part}"
            )));
        }
        let path = replica.paths.replica(&replica.name).part(&part.to_string());
        match client.delete(&path, None).await {
            Ok(()) | Err(zk::Error::NoNode) => {}
            Err(e) => return Err(TreeError::zk("delete", path, e)),
        }
        replica.handoffs.release(&part);
        replica.store.discard_handoff(&copy);
        info!(replica = %replica.name, %part, %range, "a drop range removed a handed-off part");
    }
    Ok(Ok(()))
}

/// Looks after copies no entry claimed: a copy whose commit can no longer land and did not
/// record it is discarded (a commit that failed, or an inserter that died before it).
pub async fn run(replica: Arc<Replica>) {
    loop {
        tokio::time::sleep(SWEEP_EVERY).await;
        let due: Vec<(PartName, String, HandoffPart)> = replica
            .handoffs
            .held
            .lock()
            .iter()
            .filter(|(_, h)| !h.recorded && h.since.elapsed() >= SETTLE_AFTER)
            .filter_map(|(k, h)| Some((PartName::parse(k).ok()?, h.lock.clone(), h.copy.clone()?)))
            .collect();
        if due.is_empty() {
            continue;
        }
        let Ok((client, _)) = replica.sessions.active() else {
            continue;
        };
        for (part, lock, copy) in due {
            if let Err(e) = settle(&replica, &client, &part, &lock, &copy).await {
                debug!(replica = %replica.name, %part, error = %e, "cannot settle a handed-off part yet");
            }
        }
    }
}

async fn settle(
    replica: &Replica,
    client: &zk::Client,
    part: &PartName,
    lock: &str,
    copy: &HandoffPart,
) -> Result<(), TreeError> {
    if may_still_commit(client, lock).await? {
        return Ok(());
    }
    // The lock is gone: the commit landed before that, or never will.
    if recorded_here(replica, client, part).await? {
        if let Some(h) = replica.handoffs.held.lock().get_mut(&part.to_string()) {
            h.recorded = true;
        }
        return Ok(());
    }
    let removed = {
        let mut held = replica.handoffs.held.lock();
        match held.get(&part.to_string()) {
            Some(h) if h.copy.is_some() => held.remove(&part.to_string()).is_some(),
            _ => false,
        }
    };
    if removed {
        info!(replica = %replica.name, %part, "discarding a handed-off part whose commit did not happen");
        replica.store.discard_handoff(copy);
    }
    Ok(())
}

/// After an activation: copies a previous process left are activated when their commit
/// recorded them here and discarded otherwise. The activation moved `host` on, so no
/// commit counting on them can land any more.
pub async fn resolve_left_over(replica: &Replica, client: &zk::Client) -> Result<(), TreeError> {
    let store = replica.store.clone();
    let on_disk = tokio::task::spawn_blocking(move || store.handoffs_on_disk())
        .await
        .unwrap_or_default();
    for copy in on_disk {
        if replica.handoffs.contains(&copy.name) {
            continue;
        }
        let part = copy.name.clone();
        if recorded_here(replica, client, &part).await? {
            info!(replica = %replica.name, %part, "activating a handed-off part its commit recorded");
            if let Err(e) = replica.store.activate_handoff(copy.clone()) {
                warn!(replica = %replica.name, %part, error = %e, "cannot activate a handed-off part; discarding it");
                replica.store.discard_handoff(&copy);
            }
        } else {
            info!(replica = %replica.name, %part, "discarding a handed-off part no commit recorded");
            replica.store.discard_handoff(&copy);
        }
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    fn p(s: &str) -> PartName {
        PartName::parse(s).expect("part name")
    }

    #[test]
    fn a_part_is_claimed_once_and_a_drop_finds_what_it_covers() {
        let h = Handoffs::default();
        assert!(h.claim(
            &p("202501_5_5_0"),
            "/t/block_numbers/202501/block-0000000005"
        ));
        assert!(!h.claim(
            &p("202501_5_5_0"),
            "/t/block_numbers/202501/block-0000000005"
        ));
        assert!(h.claim(
            &p("202501_9_9_0"),
            "/t/block_numbers/202501/block-0000000009"
        ));
        assert!(h.claim(
            &p("202502_1_1_0"),
            "/t/block_numbers/202502/block-0000000001"
        ));
        assert!(h.contains(&p("202501_5_5_0")));
        let mut covered = h.in_range(&p("202501_0_6_999999999"));
        covered.sort();
        assert_eq!(covered, vec![p("202501_5_5_0")]);
        h.release(&p("202501_5_5_0"));
        assert!(!h.contains(&p("202501_5_5_0")));
        assert!(h.in_range(&p("202501_0_6_999999999")).is_empty());
    }
}
