//! Prefetch: the log pull starts downloading a GET_PART's part as soon as it has read the
//! entry, concurrently with the multi that queues it, so the part is usually installed
//! (visible) by the time the entry is queued, and the executor only records it.
//!
//! Only the plain case is prefetched: a quorum-0 GET_PART from another replica whose
//! address is known (no ZooKeeper read is added), of a part not held here, while no drop
//! range is queued or running and none executed covers the part. Anything else, and any
//! failure, is left to the executor exactly as before.
//!
//! Why installing before the queue node exists is safe:
//! - The part is in [`Prefetched`] from before its download until an entry records it, and
//!   the pull's `already_held` does not count such a part as held: were the pull's multi
//!   to fail, the entry read again is queued, not skipped, and so the part gets recorded.
//! - A crash before the multi leaves `log_pointer` where it was: the entry is pulled again
//!   after the restart, and recovery detaches the unrecorded part as unexpected (no queue
//!   entry proves it), so it is fetched again, never counted twice. After the multi, the
//!   queued entry proves the part and executing it records it.
//! - A drop range pulled while the download runs may execute before the part is installed;
//!   [`remove_if_dropped`] then removes the part again, as the drop would have.

use std::collections::{HashMap, HashSet};
use std::sync::Arc;
use std::time::Duration;

use parking_lot::Mutex;
use tracing::{debug, info};

use rtable_protocol::log_entry::LogEntryKind;
use rtable_protocol::{LogEntry, PartName};

use crate::fetcher::{self, Purpose};
use crate::metrics::Metrics;
use crate::replica::Replica;

/// How often a prefetched part inside a queued drop range checks whether the drop ran.
const DROP_POLL: Duration = Duration::from_millis(50);

/// Parts prefetched (or being prefetched) whose queue entry has not recorded them yet.
#[derive(Default)]
pub struct Prefetched {
    parts: Mutex<HashSet<String>>,
}

impl Prefetched {
    pub fn contains(&self, part: &PartName) -> bool {
        self.parts.lock().contains(&part.to_string())
    }

    /// Claims `part` for a prefetch; false when one already claimed it.
    fn claim(&self, part: &PartName) -> bool {
        self.parts.lock().insert(part.to_string())
    }

    /// The part is recorded in ZooKeeper (or was never installed); true when it was here.
    pub fn forget(&self, part: &PartName) -> bool {
        self.parts.lock().remove(&part.to_string())
    }
}

/// What to prefetch: a part and the address of the entry's source.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Candidate {
    pub part: PartName,
    pub source: String,
    pub address: String,
}

/// The prefetch an entry deserves, if any (see the module doc). `held`: this replica has
/// the part or a covering one; `dropped`: an executed drop range covers it.
pub fn candidate(
    entry: &LogEntry,
    me: &str,
    addresses: &HashMap<String, String>,
    held: impl Fn(&PartName) -> bool,
    dropped: impl Fn(&PartName) -> bool,
) -> Option<Candidate> {
    let LogEntryKind::Get { part } = &entry.kind else {
        return None;
    };
    if entry.quorum != 0 || entry.source_replica == me {
        return None;
    }
    let address = addresses.get(&entry.source_replica)?;
    let part = PartName::parse(part).ok()?;
    if part.is_drop_range() || held(&part) || dropped(&part) {
        return None;
    }
    Some(Candidate {
        part,
        source: entry.source_replica.clone(),
        address: address.clone(),
    })
}

/// Starts a prefetch for every eligible entry among those just read from the log, unless
/// a drop range is among them or queued here (a drop and a download of a part inside it
/// must never overlap unnoticed; drops are rare, so none is attempted then).
pub fn start(replica: &Arc<Replica>, entries: &[(u64, Vec<u8>)]) {
    let parsed: Vec<LogEntry> = entries
        .iter()
        .filter_map(|(_, data)| LogEntry::parse(std::str::from_utf8(data).ok()?).ok())
        .collect();
    if parsed.iter().any(is_drop) || replica.queue.lock().items().any(|i| is_drop(&i.entry)) {
        return;
    }
    let addresses = replica.peer_addresses.lock().clone();
    for entry in &parsed {
        let found = candidate(
            entry,
            &replica.name,
            &addresses,
            |p| replica.store.covering(p).is_some() || replica.handoffs.contains(p),
            |p| replica.queue.lock().dropped_by(p).is_some(),
        );
        if let Some(c) = found
            && replica.prefetched.claim(&c.part)
        {
            tokio::spawn(run(replica.clone(), c));
        }
    }
}

fn is_drop(entry: &LogEntry) -> bool {
    matches!(entry.kind, LogEntryKind::Drop { .. })
}

/// Why a pushed part was not taken (the entry fetches it as usual when it comes).
pub fn refuse_push(
    replica: &Replica,
    source: &str,
    part: &PartName,
    log_index: u64,
) -> Option<String> {
    if source == replica.name {
        return Some("the push came from this replica".to_string());
    }
    if part.is_drop_range() {
        return Some("a drop range is not a part".to_string());
    }
    if replica.store.covering(part).is_some() {
        return Some("held already".to_string());
    }
    if replica.handoffs.contains(part) {
        return Some("handed off here before its commit".to_string());
    }
    let Ok((client, _)) = replica.sessions.active() else {
        return Some("no ZooKeeper session".to_string());
    };
    // The entry not pulled yet means no drop range after it was either (a drop lands in
    // the log after every insert below its numbers), so none executed here that the part
    // should have met. A drop pulled while the push runs is handled as for a prefetch.
    match crate::queue::pull::known_pointer(replica, client.session_id().0) {
        Some(pointer) if pointer <= log_index => {}
        Some(_) => return Some("its log entry was pulled already".to_string()),
        None => return Some("this replica's log pointer is not known yet".to_string()),
    }
    let queue = replica.queue.lock();
    if queue.items().any(|i| is_drop(&i.entry)) {
        return Some("a drop range is queued".to_string());
    }
    if queue.dropped_by(part).is_some() {
        return Some("an executed drop range covers it".to_string());
    }
    drop(queue);
    if !replica.prefetched.claim(part) {
        return Some("already being prefetched".to_string());
    }
    None
}

/// Installs a part its source pushed (after [`refuse_push`] said yes, which claimed it),
/// then wakes the executor like a prefetch. `Err`: why it was not installed.
pub async fn take_push<S, E>(
    replica: Arc<Replica>,
    source: &str,
    part: &PartName,
    body: S,
) -> Result<(), String>
where
    S: futures::Stream<Item = Result<bytes::Bytes, E>> + Unpin,
    E: std::fmt::Display,
{
    let fetched = fetcher::receive_pushed(&replica, source, part, body).await;
    let taken = finish(&replica, part, source, fetched, "pushed part").await;
    if taken.is_ok() {
        Metrics::inc(&replica.metrics.pushed_parts_taken);
    }
    taken
}

/// Downloads and installs one part, then wakes the executor (its entry finds it held).
async fn run(replica: Arc<Replica>, c: Candidate) {
    let fetched = fetcher::fetch(&replica, &c.address, &c.part, None, Purpose::Prefetch).await;
    let _ = finish(&replica, &c.part, &c.source, fetched, "prefetched part").await;
}

/// Metrics and drop check after a prefetch or push; `Err` says why nothing was installed.
async fn finish(
    replica: &Arc<Replica>,
    part: &PartName,
    source: &str,
    fetched: Result<fetcher::Fetched, fetcher::FetchError>,
    what: &'static str,
) -> Result<(), String> {
    let installed = match fetched {
        Ok(fetched) => {
            replica
                .metrics
                .record_fetch(fetched.bytes, fetched.seconds, part.level > 0);
            info!(
                replica = %replica.name,
                part = %part,
                source = %source,
                bytes = fetched.bytes,
                mb_per_s = fetched.bytes as f64 / 1e6 / fetched.seconds.max(1e-9),
                "{what}"
            );
            remove_if_dropped(replica, part).await;
            Ok(())
        }
        Err(e) => {
            // Nothing was installed; the entry's own execution fetches as before.
            replica.prefetched.forget(part);
            debug!(replica = %replica.name, part = %part, source = %source, error = %e, "{what}: failed; the queue entry will fetch");
            Err(e.to_string())
        }
    };
    replica.queue_notify.notify_one();
    installed
}

/// A drop range covering the part, pulled while it downloaded, may have executed before
/// the part was installed and so missed it. Waits until no queued drop covers the part:
/// a drop still queued will see the installed part and remove it (ZooKeeper and disk);
/// one executed meanwhile removed its entry here (cancelled or skipped, never recorded),
/// so the part, still active, is removed here.
async fn remove_if_dropped(replica: &Replica, part: &PartName) {
    loop {
        let cover = replica.queue.lock().dropped_by(part);
        match cover {
            None => return,
            Some(cover) if cover.node.is_some() => tokio::time::sleep(DROP_POLL).await,
            Some(cover) => {
                if replica.store.contains(part) {
                    info!(replica = %replica.name, %part, %cover, "removing a prefetched part that a drop range executed meanwhile covers");
                    let store = replica.store.clone();
                    let name = part.clone();
                    let removed =
                        tokio::task::spawn_blocking(move || store.drop_range(&name)).await;
                    if !matches!(removed, Ok(Ok(_))) {
                        tracing::warn!(replica = %replica.name, %part, "could not remove a dropped prefetched part");
                    }
                }
                replica.prefetched.forget(part);
                return;
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn get(source: &str, part: &str, quorum: u32) -> LogEntry {
        LogEntry::get(source, "", part, quorum, 1_700_000_000)
    }

    fn peers() -> HashMap<String, String> {
        HashMap::from([("r1".to_string(), "127.0.0.1:9001".to_string())])
    }

    fn pick(entry: &LogEntry, held: bool, dropped: bool) -> Option<Candidate> {
        candidate(entry, "r2", &peers(), |_| held, |_| dropped)
    }

    #[test]
    fn a_plain_get_from_a_known_peer_is_prefetched() {
        let c = pick(&get("r1", "202501_5_5_0", 0), false, false).expect("eligible");
        assert_eq!(c.part.to_string(), "202501_5_5_0");
        assert_eq!(
            (c.source.as_str(), c.address.as_str()),
            ("r1", "127.0.0.1:9001")
        );
    }

    #[test]
    fn everything_else_is_left_to_the_executor() {
        // Quorum inserts, own entries, unknown addresses.
        assert_eq!(pick(&get("r1", "202501_5_5_0", 2), false, false), None);
        assert_eq!(pick(&get("r2", "202501_5_5_0", 0), false, false), None);
        assert_eq!(pick(&get("r3", "202501_5_5_0", 0), false, false), None);
        // Held already, or inside an executed drop range.
        assert_eq!(pick(&get("r1", "202501_5_5_0", 0), true, false), None);
        assert_eq!(pick(&get("r1", "202501_5_5_0", 0), false, true), None);
        // Not a GET, or not a part name.
        let drop = LogEntry::drop_range("r1", "202501_0_4_999999999_999999999", 1_700_000_000);
        assert_eq!(pick(&drop, false, false), None);
        assert_eq!(pick(&get("r1", "not a part", 0), false, false), None);
    }
}
