//! This replica's own entries in the shared log, and the `log_pointer` write that skipping
//! them defers.
//!
//! The inserter's GET_PART of a quorum-0 insert needs nothing from its own log pull: the
//! commit multi that created `log/log-N` also created `replicas/<me>/parts/<part>`. So the
//! committer records N here, and the pull moves an in-memory *pending* pointer past such
//! entries without reading them or writing anything. The pointer write is folded into the
//! next real pull's multi (which sets the pointer past a foreign entry anyway) or flushed
//! after [`FLUSH_DELAY`] without foreign entries. A pointer left behind (a crash, a lost
//! session) only makes the next pull read these entries again, and `already_held` skips
//! them as before.
//!
//! Consequences of the lag, all bounded by about [`FLUSH_DELAY`] while this replica only
//! inserts: `/status` shows the written pointer, slightly behind, and log cleanup keeps
//! entries until every replica's written pointer passed them, a second or so longer.

use std::collections::BTreeSet;
use std::time::{Duration, Instant};

use parking_lot::Mutex;
use tokio::sync::Notify;
use zookeeper_client as zk;

use rtable_protocol::paths::sequence_of;

/// How long a skipped own entry may stay unwritten in `log_pointer` when no foreign entry
/// comes to carry the write.
pub const FLUSH_DELAY: Duration = Duration::from_secs(1);
/// At most this many own indexes are remembered; the oldest go first (they are the
/// likeliest to have been passed already, and a forgotten one is only read again).
const MAX_REMEMBERED: usize = 4096;

#[derive(Default)]
pub struct OwnLog {
    state: Mutex<State>,
    /// Wakes a pull waiting for this replica's in-flight commits to learn their indexes.
    settled: Notify,
    /// Wakes the log pull's loop when a deferred pointer write appears, to arm its flush.
    deferred: Notify,
}

/// The bookkeeping, pure and clock-free except for the instants handed in.
#[derive(Default, Debug)]
struct State {
    /// ZooKeeper session the indexes and the pending pointer belong to.
    session: i64,
    /// Log indexes of own quorum-0 GET entries the pull has not passed yet.
    indexes: BTreeSet<u64>,
    /// Pointer value past skipped entries, not written yet, and since when.
    pending: Option<(u64, Instant)>,
    /// Commits in flight: the watch may announce their entries before their replies.
    committing: usize,
}

impl State {
    /// Forgets everything of another session: a new session lists and re-reads anyway.
    fn for_session(&mut self, session: i64) -> &mut Self {
        if self.session != session {
            self.session = session;
            self.indexes.clear();
            self.pending = None;
        }
        self
    }

    fn record(&mut self, indexes: &[u64]) {
        self.indexes.extend(indexes.iter().copied());
        while self.indexes.len() > MAX_REMEMBERED {
            self.indexes.pop_first();
        }
    }

    /// The pointer as far as pulls are concerned: the written one or past skipped entries.
    fn effective(&self, written: u64) -> u64 {
        self.pending.map_or(written, |(p, _)| p.max(written))
    }

    /// Moves the pending pointer from `from` past the run of own entries starting there;
    /// the new pending value, or None when `from` is not an own entry.
    fn skip_run(&mut self, from: u64, now: Instant) -> Option<u64> {
        let mut next = from;
        while self.indexes.remove(&next) {
            next += 1;
        }
        (next > from).then(|| self.defer(next, now))
    }

    /// Raises the pending pointer to `value` (never lowers it); returns the pending value.
    fn defer(&mut self, value: u64, now: Instant) -> u64 {
        let pending = match self.pending {
            Some((p, since)) => (p.max(value), since),
            None => (value, now),
        };
        self.pending = Some(pending);
        pending.0
    }

    /// `batch` without this replica's own entries, which are forgotten: the pull passes
    /// them now (and a failed pull reads them back, for `already_held` to skip).
    fn take_foreign(&mut self, batch: &[u64]) -> Vec<u64> {
        batch
            .iter()
            .copied()
            .filter(|i| !self.indexes.remove(i))
            .collect()
    }

    /// `log_pointer` now holds `value`: a pending write at or below it is done, and own
    /// indexes below it can never be announced as next again.
    fn written(&mut self, value: u64) {
        if self.pending.is_some_and(|(p, _)| p <= value) {
            self.pending = None;
        }
        self.indexes = self.indexes.split_off(&value);
    }
}

impl OwnLog {
    /// Marks a commit of this replica in flight until the guard is dropped.
    pub fn begin_commit(&self) -> Committing<'_> {
        self.state.lock().committing += 1;
        Committing { log: self }
    }

    /// The pointer pulls start from, given the value `written` in ZooKeeper.
    pub fn effective(&self, session: i64, written: u64) -> u64 {
        let state = self.state.lock();
        if state.session == session {
            state.effective(written)
        } else {
            written
        }
    }

    pub fn is_own(&self, session: i64, index: u64) -> bool {
        let state = self.state.lock();
        state.session == session && state.indexes.contains(&index)
    }

    /// Skips the run of own entries starting at `from` (the current pointer); see
    /// [`State::skip_run`].
    pub fn skip_run(&self, session: i64, from: u64) -> Option<u64> {
        let skipped = self
            .state
            .lock()
            .for_session(session)
            .skip_run(from, Instant::now());
        if skipped.is_some() {
            self.deferred.notify_one();
        }
        skipped
    }

    /// Defers writing `value` (entries before it need nothing from this replica).
    pub fn defer(&self, session: i64, value: u64) {
        self.state
            .lock()
            .for_session(session)
            .defer(value, Instant::now());
        self.deferred.notify_one();
    }

    pub fn take_foreign(&self, session: i64, batch: &[u64]) -> Vec<u64> {
        self.state.lock().for_session(session).take_foreign(batch)
    }

    pub fn written(&self, session: i64, value: u64) {
        self.state.lock().for_session(session).written(value);
    }

    /// The deferred pointer value, if any, and when it is due to be written.
    pub fn pending(&self, session: i64) -> Option<(u64, Instant)> {
        let state = self.state.lock();
        let pending = state.pending.filter(|_| state.session == session);
        pending.map(|(p, since)| (p, since + FLUSH_DELAY))
    }

    /// Forgets a deferred write (another writer moved the pointer; see the flush).
    pub fn discard_pending(&self, session: i64) {
        self.state.lock().for_session(session).pending = None;
    }

    /// Resolves when a deferred write appears (the pull loop then arms its flush timer).
    pub async fn deferred(&self) {
        self.deferred.notified().await
    }

    /// Waits, at most `limit`, until `index` is known to be own or no commit of this
    /// replica is in flight. ZooKeeper sends a watch event before the reply of the request
    /// that caused it, so the pull may hear of its own entry just before the committer
    /// learns its index; the gap is that of two packets, so `limit` stays small.
    pub async fn settle(&self, session: i64, index: u64, limit: Duration) {
        let deadline = tokio::time::Instant::now() + limit;
        loop {
            let notified = self.settled.notified();
            tokio::pin!(notified);
            notified.as_mut().enable();
            {
                let state = self.state.lock();
                if state.committing == 0
                    || (state.session == session && state.indexes.contains(&index))
                {
                    return;
                }
            }
            if tokio::time::timeout_at(deadline, notified).await.is_err() {
                return;
            }
        }
    }
}

/// A commit in flight (see [`OwnLog::begin_commit`]).
pub struct Committing<'a> {
    log: &'a OwnLog,
}

impl Committing<'_> {
    /// The commit succeeded on `session`, creating own entries at these log indexes.
    pub fn committed(self, session: i64, indexes: &[u64]) {
        if !indexes.is_empty() {
            self.log.state.lock().for_session(session).record(indexes);
        }
    }
}

impl Drop for Committing<'_> {
    fn drop(&mut self) {
        {
            let mut state = self.log.state.lock();
            state.committing = state.committing.saturating_sub(1);
        }
        self.log.settled.notify_waiters();
    }
}

/// Log indexes of the nodes created by the operations at `at` of a committed multi.
pub fn created_indexes(results: &[zk::MultiWriteResult], at: &[usize]) -> Vec<u64> {
    at.iter()
        .filter_map(|&i| match results.get(i) {
            Some(zk::MultiWriteResult::Create { path, .. }) => {
                path.rsplit('/').next().and_then(sequence_of)
            }
            _ => None,
        })
        .collect()
}

#[cfg(test)]
mod tests {
    use super::*;

    fn state(own: &[u64]) -> State {
        let mut s = State::default();
        s.for_session(7).record(own);
        s
    }

    #[test]
    fn a_run_of_own_entries_moves_only_the_pending_pointer() {
        let now = Instant::now();
        let mut s = state(&[10, 11, 13]);
        assert_eq!(s.skip_run(9, now), None, "9 is foreign");
        assert_eq!(s.skip_run(10, now), Some(12));
        assert_eq!(s.effective(10), 12, "the written pointer lags");
        // 12 is foreign: the pull reads it and its multi writes 13, carrying the deferred
        // write; 13 is own and skipped after it.
        assert_eq!(s.take_foreign(&[12]), vec![12]);
        s.written(13);
        assert_eq!(s.pending, None);
        assert_eq!(s.skip_run(13, now), Some(14));
        assert_eq!(s.pending.map(|(p, _)| p), Some(14));
    }

    #[test]
    fn the_pending_pointer_never_goes_back_and_keeps_its_first_instant() {
        let first = Instant::now();
        let later = first + Duration::from_millis(500);
        let mut s = state(&[]);
        assert_eq!(s.defer(20, first), 20);
        assert_eq!(s.defer(15, later), 20);
        assert_eq!(s.defer(25, later), 25);
        assert_eq!(
            s.pending,
            Some((25, first)),
            "the flush is due 1 s after the first"
        );
        assert_eq!(s.effective(30), 30, "a pointer written past it wins");
        s.written(24);
        assert!(
            s.pending.is_some(),
            "a write below the pending value leaves it due"
        );
        s.written(25);
        assert_eq!(s.pending, None);
    }

    #[test]
    fn a_listed_batch_reads_only_foreign_entries_and_forgets_the_own_ones() {
        let mut s = state(&[3, 5, 6]);
        assert_eq!(s.take_foreign(&[3, 4, 5, 6, 7]), vec![4, 7]);
        assert!(s.indexes.is_empty());
    }

    #[test]
    fn a_new_session_forgets_everything_and_old_indexes_are_pruned() {
        let now = Instant::now();
        let mut s = state(&[1, 2, 8]);
        s.skip_run(1, now);
        s.written(5);
        assert_eq!(s.indexes.iter().copied().collect::<Vec<_>>(), vec![8]);
        s.defer(9, now);
        s.for_session(8);
        assert!(s.indexes.is_empty() && s.pending.is_none());
    }

    #[test]
    fn the_remembered_indexes_are_bounded() {
        let all: Vec<u64> = (0..(MAX_REMEMBERED as u64 + 10)).collect();
        let s = state(&all);
        assert_eq!(s.indexes.len(), MAX_REMEMBERED);
        assert_eq!(s.indexes.first(), Some(&10), "the oldest went first");
    }

    #[tokio::test]
    async fn a_pull_waits_for_an_in_flight_commit_to_learn_its_index() {
        let log = std::sync::Arc::new(OwnLog::default());
        let guard_log = log.clone();
        let committer = tokio::spawn(async move {
            let committing = guard_log.begin_commit();
            tokio::time::sleep(Duration::from_millis(20)).await;
            committing.committed(7, &[42]);
        });
        // Let the committer start its commit first.
        tokio::time::sleep(Duration::from_millis(5)).await;
        log.settle(7, 42, Duration::from_secs(5)).await;
        assert!(log.is_own(7, 42));
        committer.await.expect("committer");
        // Nothing in flight: returns at once even for a foreign index.
        let started = Instant::now();
        log.settle(7, 43, Duration::from_secs(5)).await;
        assert!(started.elapsed() < Duration::from_secs(1));
    }
}
