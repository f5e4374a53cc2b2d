//! This replica's replication queue (ClickHouse's ReplicatedMergeTreeQueue): entries copied
//! from the shared log into `replicas/<me>/queue`, mirrored in memory with their execution
//! state, and executed out of order with per-entry backoff.
//!
//! Selection ([`plan`]) is a pure function of the queue, the drop ranges this replica has
//! executed and the clock:
//! - DROP_RANGE entries go first, and one runs only while nothing inside its range runs.
//! - An entry whose part a drop range covers (queued, executing or executed here) is skipped:
//!   removed without fetching or merging, never counted as lost. "Covers" is block-number
//!   containment in the same partition: a part whose blocks lie above the range's max was
//!   allocated after the drop took its block number and survives it.
//! - An entry whose part only intersects a queued drop range waits for the drop.
//! - A GET whose part a merged (or wider fetched) part of another runnable entry covers is
//!   postponed behind that entry, unless that entry's last attempt found the part nowhere:
//!   one fetch of the merged part replaces the fetches of all the parts it covers.

pub mod executor;
pub mod own_log;
pub mod prefetch;
pub mod pull;

use std::collections::BTreeMap;
use std::fmt;
use std::time::{Duration, Instant};

use serde::Serialize;

use rtable_protocol::log_entry::LogEntryKind;
use rtable_protocol::{LogEntry, PartName};

/// One queue entry and what happened to it so far.
#[derive(Debug, Clone)]
pub struct QueueItem {
    /// `queue-NNNNNNNNNN`.
    pub node_name: String,
    pub entry: LogEntry,
    pub is_currently_executing: bool,
    pub num_tries: u32,
    pub last_exception: Option<String>,
    pub last_attempt_time: Option<i64>,
    pub num_postponed: u32,
    pub postpone_reason: Option<String>,
    /// Not retried before this instant (backoff after failures).
    pub not_before: Option<Instant>,
    /// The last attempt found no replica holding the entry's part (nor, for a merge, every
    /// source here): entries whose parts it covers stop waiting for it.
    pub no_source: bool,
    /// Marked executing only to be removed unexecuted (a drop range covers its part).
    pub skipping: bool,
}

/// A row of `/queue`, shaped like system.replication_queue.
#[derive(Debug, Default, Serialize)]
pub struct QueueRow {
    pub position: usize,
    pub node_name: String,
    #[serde(rename = "type")]
    pub kind: &'static str,
    pub create_time: i64,
    pub required_quorum: u32,
    pub source_replica: String,
    pub new_part_name: String,
    pub parts_to_merge: Vec<String>,
    pub is_currently_executing: bool,
    pub num_tries: u32,
    pub last_exception: String,
    pub last_attempt_time: i64,
    pub num_postponed: u32,
    pub postpone_reason: String,
}

#[derive(Default)]
pub struct QueueState {
    items: BTreeMap<String, QueueItem>,
    /// The widest drop range this process executed, per partition. Every drop range starts
    /// at block 0, so the widest one covers all earlier ones. Kept across sessions: block
    /// numbers only grow, so what a drop covered stays dropped.
    executed_drops: BTreeMap<String, PartName>,
    /// Queue nodes that do not parse, with why: never executed, never deleted (a person
    /// should see them), shown in `/queue` and counted in `/status`.
    unreadable: BTreeMap<String, String>,
    /// Set once the queue was loaded from ZooKeeper in this session.
    pub loaded: bool,
    /// Unix seconds of the last successful log pull, for absolute_delay.
    pub last_queue_update: Option<i64>,
    pub last_queue_update_exception: Option<String>,
    /// Entries with a quorum this process has queued: every quorum insert's GET passes
    /// through the queue (quorum entries are never skipped), before any merge covering it.
    quorum_entries_seen: u64,
    /// `quorum/parallel` was found empty when `quorum_entries_seen` had this value; `None`
    /// until then (a previous process may have queued quorum entries).
    parallel_quorums_clear_at: Option<u64>,
}

impl QueueState {
    pub fn insert(&mut self, node_name: String, entry: LogEntry) {
        if entry.quorum > 0 && !self.items.contains_key(&node_name) {
            self.quorum_entries_seen += 1;
        }
        self.items.entry(node_name.clone()).or_insert(QueueItem {
            node_name,
            entry,
            is_currently_executing: false,
            num_tries: 0,
            last_exception: None,
            last_attempt_time: None,
            num_postponed: 0,
            postpone_reason: None,
            not_before: None,
            no_source: false,
            skipping: false,
        });
    }

    pub fn clear(&mut self) {
        self.items.clear();
        self.unreadable.clear();
        self.loaded = false;
        self.parallel_quorums_clear_at = None;
    }

    /// A token for [`Self::parallel_quorums_known_clear`]: how many quorum entries so far.
    pub fn quorum_entries_seen(&self) -> u64 {
        self.quorum_entries_seen
    }

    /// True when `quorum/parallel` was found empty and no quorum entry was queued since, so
    /// no parallel quorum can be waiting for a part this replica holds.
    pub fn parallel_quorums_known_clear(&self) -> bool {
        self.parallel_quorums_clear_at == Some(self.quorum_entries_seen)
    }

    /// Records that `quorum/parallel` was empty when `seen` quorum entries had been queued
    /// (ignored when more arrived meanwhile).
    pub fn mark_parallel_quorums_clear(&mut self, seen: u64) {
        if seen == self.quorum_entries_seen {
            self.parallel_quorums_clear_at = Some(seen);
        }
    }

    pub fn note_unreadable(&mut self, node_name: String, error: String) {
        self.unreadable.insert(node_name, error);
    }

    pub fn unreadable_count(&self) -> usize {
        self.unreadable.len()
    }

    pub fn remove(&mut self, node_name: &str) {
        self.items.remove(node_name);
    }

    pub fn len(&self) -> usize {
        self.items.len()
    }

    pub fn is_empty(&self) -> bool {
        self.items.is_empty()
    }

    pub fn items(&self) -> impl Iterator<Item = &QueueItem> {
        self.items.values()
    }

    pub fn get_mut(&mut self, node_name: &str) -> Option<&mut QueueItem> {
        self.items.get_mut(node_name)
    }

    /// Parts some queued entry will produce (the "virtual" future parts).
    pub fn inserts_in_queue(&self) -> usize {
        self.items
            .values()
            .filter(|i| i.entry.type_name() == "GET_PART")
            .count()
    }

    /// Oldest create_time among unprocessed GET_PART entries.
    pub fn oldest_insert_time(&self) -> Option<i64> {
        self.items
            .values()
            .filter(|i| i.entry.type_name() == "GET_PART")
            .map(|i| i.entry.create_time)
            .min()
    }

    /// One selection round (see [`plan`]): entries to run now and entries to remove
    /// without running, all marked executing until the executor is done with them;
    /// postponed entries get their reason.
    pub fn select_runnable(&mut self, max: usize, now: Instant) -> Selection {
        let decisions = {
            let items: Vec<&QueueItem> = self.items.values().collect();
            plan(
                &items,
                &self.executed_drops,
                max,
                now,
                chrono::Utc::now().timestamp(),
            )
        };
        let mut selection = Selection::default();
        for (node, decision) in decisions {
            let Some(item) = self.items.get_mut(&node) else {
                continue;
            };
            match decision {
                Decision::Run => {
                    item.is_currently_executing = true;
                    selection.run.push(item.clone());
                }
                Decision::Skip(reason) => {
                    item.is_currently_executing = true;
                    item.skipping = true;
                    item.postpone_reason = Some(reason.clone());
                    selection.skip.push((item.clone(), reason));
                }
                Decision::Postpone(reason) => {
                    item.num_postponed += 1;
                    item.postpone_reason = Some(reason);
                }
            }
        }
        selection
    }

    /// Records an executed DROP_RANGE: later entries inside it are skipped.
    pub fn remember_drop(&mut self, range: PartName) {
        match self.executed_drops.get(&range.partition_id) {
            Some(known) if known.max_block >= range.max_block => {}
            _ => {
                self.executed_drops
                    .insert(range.partition_id.clone(), range);
            }
        }
    }

    /// The drop range, queued, executing or executed here, that removes `part`.
    pub fn dropped_by(&self, part: &PartName) -> Option<DropCover> {
        let queued = queued_drops(self.items.values());
        covering_drop(part, &queued, &self.executed_drops)
    }

    /// Records a failed attempt; retries back off exponentially up to 60 s like newer
    /// ClickHouse. `no_source`: the attempt found the entry's part on no replica.
    pub fn record_failure(
        &mut self,
        node_name: &str,
        error: String,
        postpone: Option<String>,
        no_source: bool,
    ) {
        if let Some(item) = self.items.get_mut(node_name) {
            item.is_currently_executing = false;
            item.skipping = false;
            item.num_tries += 1;
            item.last_exception = Some(error);
            item.last_attempt_time = Some(chrono::Utc::now().timestamp());
            if postpone.is_some() {
                item.num_postponed += 1;
            }
            item.postpone_reason = postpone;
            item.no_source = no_source;
            let exp = item.num_tries.min(10);
            let delay = Duration::from_millis(100u64 << exp).min(Duration::from_secs(60));
            item.not_before = Some(Instant::now() + delay);
        }
    }

    /// The soonest instant at which some entry in backoff becomes runnable.
    pub fn next_wakeup(&self) -> Option<Instant> {
        self.items
            .values()
            .filter(|i| !i.is_currently_executing)
            .filter_map(|i| i.not_before)
            .min()
    }

    pub fn rows(&self) -> Vec<QueueRow> {
        self.items
            .values()
            .map(|i| QueueRow {
                position: 0,
                node_name: i.node_name.clone(),
                kind: i.entry.type_name(),
                create_time: i.entry.create_time,
                required_quorum: i.entry.quorum,
                source_replica: i.entry.source_replica.clone(),
                new_part_name: i.entry.new_part_name().unwrap_or_default(),
                parts_to_merge: i.entry.source_parts(),
                is_currently_executing: i.is_currently_executing,
                num_tries: i.num_tries,
                last_exception: i.last_exception.clone().unwrap_or_default(),
                last_attempt_time: i.last_attempt_time.unwrap_or(0),
                num_postponed: i.num_postponed,
                postpone_reason: i.postpone_reason.clone().unwrap_or_default(),
            })
            .chain(self.unreadable.iter().map(|(node, error)| QueueRow {
                node_name: node.clone(),
                kind: "UNREADABLE",
                last_exception: format!(
                    "the entry does not parse, so it is never executed: {error}"
                ),
                ..QueueRow::default()
            }))
            .enumerate()
            .map(|(position, row)| QueueRow { position, ..row })
            .collect()
    }
}

/// What one selection round decided for one entry.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Decision {
    /// Execute now.
    Run,
    /// Remove from the queue without executing it, for this reason.
    Skip(String),
    /// Not now, for this reason (shown in `/queue`).
    Postpone(String),
}

/// The entries one selection round hands to the executor.
#[derive(Debug, Default)]
pub struct Selection {
    pub run: Vec<QueueItem>,
    /// Entries whose part a drop range removes: their queue nodes go, nothing is fetched.
    pub skip: Vec<(QueueItem, String)>,
}

/// A drop range that removes a part: a DROP_RANGE entry of this queue (`node`), or one
/// this replica executed already (`node` is `None`).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct DropCover {
    pub range: PartName,
    pub node: Option<String>,
}

impl fmt::Display for DropCover {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match &self.node {
            Some(node) => write!(f, "drop range {} ({node})", self.range),
            None => write!(f, "drop range {} (executed here)", self.range),
        }
    }
}

/// The DROP_RANGE entries among `items`, with their queue nodes.
fn queued_drops<'a>(items: impl Iterator<Item = &'a QueueItem>) -> Vec<(&'a str, PartName)> {
    items
        .filter_map(|i| match &i.entry.kind {
            LogEntryKind::Drop { range } => PartName::parse(range)
                .ok()
                .map(|r| (i.node_name.as_str(), r)),
            _ => None,
        })
        .collect()
}

/// The drop range that removes `part`, among the queued ones and the executed ones.
///
/// A range covers a part when it contains it: same partition and every block of the part
/// at or below the range's max (a partition's drop range always starts at block 0). A part
/// with a block above the max was allocated after the drop took its own block number (an
/// insert acknowledged after the drop, or a merge of such parts): the drop does not touch
/// it. The drop publisher waits until every lower block number is committed or given up,
/// so every part inside a range is logged before the range and containment alone decides.
pub fn covering_drop(
    part: &PartName,
    queued: &[(&str, PartName)],
    executed: &BTreeMap<String, PartName>,
) -> Option<DropCover> {
    if part.is_drop_range() {
        return None;
    }
    if let Some((node, range)) = queued.iter().find(|(_, r)| r.contains(part)) {
        return Some(DropCover {
            range: range.clone(),
            node: Some(node.to_string()),
        });
    }
    executed
        .get(&part.partition_id)
        .filter(|r| r.contains(part))
        .map(|r| DropCover {
            range: r.clone(),
            node: None,
        })
}

fn part_of(item: &QueueItem) -> Option<PartName> {
    item.entry
        .new_part_name()
        .and_then(|n| PartName::parse(&n).ok())
}

fn is_drop(item: &QueueItem) -> bool {
    matches!(item.entry.kind, LogEntryKind::Drop { .. })
}

/// One selection round over `items` (in queue order), pure: which entries run now (at
/// most `max` executing at once), which are removed unexecuted, which are postponed and
/// why. Entries not named are left alone (executing, backing off, or no room this round).
///
/// - DROP_RANGE entries are considered first. One runs only when no other drop range
///   intersecting it and no entry producing a part inside it is executing.
/// - Any other entry whose part a queued, executing or executed drop range covers is
///   skipped; one whose part merely intersects a queued drop range waits for it.
/// - An entry waits while a part it merges, the part it produces, or a part covering that
///   is being produced by an executing entry.
/// - A GET_PART waits while another runnable entry (a merge, or a fetch of a wider part)
///   produces a part covering its part, unless that entry's last attempt found its part on
///   no replica: the covering part replaces it, and once it is here the GET is done.
pub fn plan(
    items: &[&QueueItem],
    executed_drops: &BTreeMap<String, PartName>,
    max: usize,
    now: Instant,
    now_unix: i64,
) -> Vec<(String, Decision)> {
    let drops = queued_drops(items.iter().copied());
    let ready = |i: &QueueItem| !i.is_currently_executing && i.not_before.is_none_or(|t| t <= now);
    // Executing entries (those only being removed produce nothing): (node, parsed part,
    // raw part name, is a drop).
    let mut running: Vec<(String, Option<PartName>, Option<String>, bool)> = items
        .iter()
        .filter(|i| i.is_currently_executing && !i.skipping)
        .map(|i| {
            (
                i.node_name.clone(),
                part_of(i),
                i.entry.new_part_name(),
                is_drop(i),
            )
        })
        .collect();
    let mut room = max.saturating_sub(
        items
            .iter()
            .filter(|i| i.is_currently_executing && !i.skipping)
            .count(),
    );
    let order = items
        .iter()
        .filter(|i| is_drop(i))
        .chain(items.iter().filter(|i| !is_drop(i)));
    let mut decisions = Vec::new();
    for item in order {
        if !ready(item) {
            continue;
        }
        let part = part_of(item);
        if !is_drop(item)
            && let Some(p) = &part
            && let Some(cover) = covering_drop(p, &drops, executed_drops)
        {
            decisions.push((
                item.node_name.clone(),
                Decision::Skip(format!("part {p} is removed by {cover}")),
            ));
            continue;
        }
        if room == 0 {
            continue;
        }
        let decision = if is_drop(item) {
            decide_drop(item, part.as_ref(), &running)
        } else {
            decide_other(
                item,
                part.as_ref(),
                items,
                &drops,
                &running,
                &ready,
                now_unix,
            )
        };
        if decision == Decision::Run {
            room -= 1;
            running.push((
                item.node_name.clone(),
                part.clone(),
                item.entry.new_part_name(),
                is_drop(item),
            ));
        }
        decisions.push((item.node_name.clone(), decision));
    }
    decisions
}

fn decide_drop(
    item: &QueueItem,
    range: Option<&PartName>,
    running: &[(String, Option<PartName>, Option<String>, bool)],
) -> Decision {
    let Some(range) = range else {
        // Unparsable: the executor reports it.
        return Decision::Run;
    };
    for (node, part, _, drop) in running {
        let Some(part) = part else { continue };
        if node == &item.node_name || part.is_disjoint(range) {
            continue;
        }
        return Decision::Postpone(if *drop {
            format!("drop range {part} ({node}) intersecting {range} is being executed")
        } else {
            format!("waiting for {node} producing {part} inside {range} to finish")
        });
    }
    Decision::Run
}

fn decide_other(
    item: &QueueItem,
    part: Option<&PartName>,
    items: &[&QueueItem],
    drops: &[(&str, PartName)],
    running: &[(String, Option<PartName>, Option<String>, bool)],
    ready: &dyn Fn(&QueueItem) -> bool,
    now_unix: i64,
) -> Decision {
    if let Some(p) = part
        && let Some((node, range)) = drops.iter().find(|(_, r)| !r.is_disjoint(p))
    {
        return Decision::Postpone(format!(
            "part {p} intersects drop range {range} ({node}); waiting for the drop"
        ));
    }
    for source in item.entry.source_parts() {
        if running
            .iter()
            .any(|(_, _, raw, _)| raw.as_deref() == Some(&source))
        {
            return Decision::Postpone(format!("source part {source} is being fetched"));
        }
    }
    let raw = item.entry.new_part_name();
    for (node, running_part, running_raw, drop) in running {
        if *drop {
            continue;
        }
        if raw.is_some() && running_raw == &raw {
            return Decision::Postpone(format!(
                "part {} is being produced by another entry ({node})",
                raw.as_deref().unwrap_or_default()
            ));
        }
        if let (Some(p), Some(y)) = (part, running_part)
            && y != p
            && y.contains(p)
        {
            return Decision::Postpone(format!("part {y} covering {p} is being produced ({node})"));
        }
    }
    if let (LogEntryKind::Get { .. }, Some(p)) = (&item.entry.kind, part) {
        let raw = item.entry.new_part_name();
        let cover = items.iter().find(|other| {
            other.node_name != item.node_name
                && !is_drop(other)
                && ready(other)
                && !other.no_source
                && part_of(other).is_some_and(|y| &y != p && y.contains(p))
                && !fresh_merge_of(other, raw.as_deref(), now_unix)
        });
        if let Some(other) = cover {
            return Decision::Postpone(format!(
                "part {} of {} ({}) covers {p}; fetching or merging that instead",
                other.entry.new_part_name().unwrap_or_default(),
                other.node_name,
                other.entry.type_name()
            ));
        }
    }
    Decision::Run
}

/// A merge this young that consumes `part` itself is most likely still running on the
/// replica that assigned it, with no merged part to fetch yet, and merging here needs
/// `part` anyway: waiting for it would only delay the fetch (steady-state replication
/// lag). An older one (a replica catching up) is worth waiting for: one fetch of the
/// merged part replaces the fetches of every part it covers.
const FRESH_MERGE_SECS: i64 = 5;

fn fresh_merge_of(other: &QueueItem, part: Option<&str>, now_unix: i64) -> bool {
    matches!(other.entry.kind, LogEntryKind::Merge { .. })
        && part.is_some_and(|p| other.entry.source_parts().iter().any(|s| s == p))
        && now_unix - other.entry.create_time < FRESH_MERGE_SECS
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn an_unreadable_entry_is_listed_never_run_and_forgotten_with_the_queue() {
        let mut q = QueueState::default();
        q.insert(
            "queue-0000000001".into(),
            LogEntry::get("r1", "b", "all_1_1_0", 0, 0),
        );
        q.note_unreadable(
            "queue-0000000002".into(),
            "line 1: expected `format version: `".into(),
        );
        let rows = q.rows();
        assert_eq!(rows.len(), 2);
        assert_eq!((rows[1].position, rows[1].kind), (1, "UNREADABLE"));
        assert!(
            rows[1].last_exception.contains("never executed: line 1"),
            "{}",
            rows[1].last_exception
        );
        assert_eq!((q.len(), q.unreadable_count()), (1, 1));
        q.clear();
        assert_eq!(q.unreadable_count(), 0);
    }

    fn get(part: &str) -> LogEntry {
        LogEntry::get("r1", "", part, 0, 1_700_000_000)
    }

    fn merge(sources: &[&str], into: &str) -> LogEntry {
        LogEntry::merge(
            "r1",
            sources.iter().map(|s| s.to_string()).collect(),
            into,
            1_700_000_000,
        )
    }

    fn drop(range: &str) -> LogEntry {
        LogEntry::drop_range("r2", range, 1_700_000_000)
    }

    fn queue(entries: Vec<LogEntry>) -> QueueState {
        let mut q = QueueState::default();
        for (i, e) in entries.into_iter().enumerate() {
            q.insert(format!("queue-{i:010}"), e);
        }
        q
    }

    fn node(i: usize) -> String {
        format!("queue-{i:010}")
    }

    fn run_names(s: &Selection) -> Vec<String> {
        s.run.iter().map(|i| i.node_name.clone()).collect()
    }

    fn skip_names(s: &Selection) -> Vec<String> {
        s.skip.iter().map(|(i, _)| i.node_name.clone()).collect()
    }

    fn reason(q: &QueueState, i: usize) -> String {
        q.items
            .get(&node(i))
            .and_then(|i| i.postpone_reason.clone())
            .unwrap_or_default()
    }

    fn p(s: &str) -> PartName {
        PartName::parse(s).expect(s)
    }

    #[test]
    fn a_drop_range_runs_first_and_the_gets_it_covers_are_skipped_not_fetched() {
        // The lagging replica: GETs of parts no replica holds any more, then the drop.
        let mut q = queue(vec![
            get("202501_1_1_0"),
            get("202501_2_2_0"),
            get("202502_3_3_0"),
            drop("202501_0_4_999999999_999999999"),
        ]);
        let s = q.select_runnable(4, Instant::now());
        assert_eq!(run_names(&s)[0], node(3), "the drop goes first");
        assert_eq!(run_names(&s), vec![node(3), node(2)]);
        assert_eq!(skip_names(&s), vec![node(0), node(1)]);
        assert!(s.skip[0].1.contains("202501_0_4_999999999_999999999"));
        // Marked executing until the executor removed them: never selected twice.
        let again = q.select_runnable(4, Instant::now());
        assert!(again.run.is_empty() && again.skip.is_empty());
    }

    #[test]
    fn a_part_above_the_drop_range_survives_it() {
        // Blocks 5 and 6 were allocated after the drop took block number 5.
        let mut q = queue(vec![
            drop("202501_0_4_999999999_999999999"),
            get("202501_5_5_0"),
            merge(&["202501_5_5_0", "202501_6_6_0"], "202501_5_6_1"),
            get("202501_4_4_0"),
        ]);
        let s = q.select_runnable(4, Instant::now());
        assert_eq!(skip_names(&s), vec![node(3)]);
        // The drop and the merge above it run; the GET of block 5 waits for the merge.
        assert_eq!(run_names(&s), vec![node(0), node(2)]);
        assert!(reason(&q, 1).contains("202501_5_6_1"));
        assert!(
            covering_drop(
                &p("202501_5_6_1"),
                &[("queue-0", p("202501_0_4_999999999_999999999"))],
                &BTreeMap::new()
            )
            .is_none()
        );
    }

    #[test]
    fn nothing_inside_an_executing_drop_runs_and_the_drop_waits_for_running_entries() {
        let mut q = queue(vec![
            get("202501_1_1_0"),
            drop("202501_0_4_999999999_999999999"),
        ]);
        // The GET started before the drop was pulled: the drop waits for it.
        q.get_mut(&node(0)).unwrap().is_currently_executing = true;
        let s = q.select_runnable(4, Instant::now());
        assert!(s.run.is_empty() && s.skip.is_empty());
        assert!(
            reason(&q, 1).contains("queue-0000000000"),
            "{}",
            reason(&q, 1)
        );
        // Once it is done the drop runs, and a GET arriving for a part inside is skipped.
        q.remove(&node(0));
        q.insert(node(2), get("202501_3_3_0"));
        let s = q.select_runnable(4, Instant::now());
        assert_eq!(run_names(&s), vec![node(1)]);
        assert_eq!(skip_names(&s), vec![node(2)]);
        // A merge crossing the range's end waits for the drop instead of running beside it.
        q.insert(
            node(3),
            merge(&["202501_4_4_0", "202501_5_5_0"], "202501_4_5_1"),
        );
        let s = q.select_runnable(4, Instant::now());
        assert!(s.run.is_empty());
        assert!(reason(&q, 3).contains("intersects drop range"));
    }

    #[test]
    fn entries_being_skipped_hold_nothing_back() {
        let mut q = queue(vec![get("202501_1_1_0"), get("202501_2_2_0")]);
        q.remember_drop(p("202501_0_1_999999999_999999999"));
        let s = q.select_runnable(1, Instant::now());
        assert_eq!(skip_names(&s), vec![node(0)]);
        assert_eq!(run_names(&s), vec![node(1)], "a skip takes no room");
        // While its queue node is being removed, a new drop over it runs at once.
        q.remove(&node(1));
        q.insert(node(2), drop("202501_0_9_999999999_999999999"));
        let s = q.select_runnable(1, Instant::now());
        assert_eq!(run_names(&s), vec![node(2)]);
    }

    #[test]
    fn parallel_quorums_stay_known_clear_only_until_a_quorum_entry_is_queued() {
        let mut q = QueueState::default();
        assert!(!q.parallel_quorums_known_clear(), "unknown at start");
        let seen = q.quorum_entries_seen();
        q.mark_parallel_quorums_clear(seen);
        assert!(q.parallel_quorums_known_clear());
        q.insert(node(1), get("202501_1_1_0"));
        assert!(
            q.parallel_quorums_known_clear(),
            "a quorum-0 entry changes nothing"
        );
        let mut quorum = get("202501_2_2_0");
        quorum.quorum = 2;
        q.insert(node(2), quorum.clone());
        assert!(!q.parallel_quorums_known_clear());
        // A listing that started before the quorum entry arrived proves nothing.
        q.mark_parallel_quorums_clear(seen);
        assert!(!q.parallel_quorums_known_clear());
        q.insert(node(2), quorum);
        let seen = q.quorum_entries_seen();
        q.mark_parallel_quorums_clear(seen);
        assert!(
            q.parallel_quorums_known_clear(),
            "re-inserting a known node counts once"
        );
        q.clear();
        assert!(!q.parallel_quorums_known_clear(), "a reload starts unknown");
    }

    #[test]
    fn executed_drop_ranges_are_remembered() {
        let mut q = queue(vec![]);
        q.remember_drop(p("202501_0_9_999999999_999999999"));
        q.remember_drop(p("202501_0_4_999999999_999999999"));
        q.insert(node(0), get("202501_7_7_0"));
        q.insert(node(1), get("202501_10_10_0"));
        q.insert(node(2), get("202502_7_7_0"));
        let s = q.select_runnable(4, Instant::now());
        assert_eq!(skip_names(&s), vec![node(0)]);
        assert!(s.skip[0].1.contains("executed here"));
        assert_eq!(run_names(&s), vec![node(1), node(2)]);
        assert_eq!(
            q.dropped_by(&p("202501_3_8_1")).map(|c| c.range),
            Some(p("202501_0_9_999999999_999999999"))
        );
        assert_eq!(q.dropped_by(&p("202501_8_10_1")), None);
    }

    #[test]
    fn covering_drop_is_containment_on_block_numbers() {
        let queued = [("queue-0000000004", p("202501_0_9_999999999_999999999"))];
        let none = BTreeMap::new();
        let cover = covering_drop(&p("202501_3_3_0"), &queued, &none).expect("covered");
        assert_eq!(cover.node.as_deref(), Some("queue-0000000004"));
        assert!(covering_drop(&p("202501_0_9_3"), &queued, &none).is_some());
        // Above the max (allocated after the drop), straddling it, other partitions: no.
        assert!(covering_drop(&p("202501_10_10_0"), &queued, &none).is_none());
        assert!(covering_drop(&p("202501_8_12_1"), &queued, &none).is_none());
        assert!(covering_drop(&p("202502_3_3_0"), &queued, &none).is_none());
        // A drop range is not "removed" by another.
        assert!(covering_drop(&p("202501_0_5_999999999_999999999"), &queued, &none).is_none());
    }

    #[test]
    fn a_get_waits_for_the_merge_that_covers_it() {
        let mut q = queue(vec![
            get("202501_1_1_0"),
            get("202501_2_2_0"),
            merge(&["202501_1_1_0", "202501_2_2_0"], "202501_1_2_1"),
            get("202501_3_3_0"),
        ]);
        let s = q.select_runnable(4, Instant::now());
        assert_eq!(run_names(&s), vec![node(2), node(3)]);
        assert!(
            reason(&q, 0).contains("202501_1_2_1") && reason(&q, 0).contains(&node(2)),
            "{}",
            reason(&q, 0)
        );
        // While the merge runs, the GETs it covers keep waiting.
        let s = q.select_runnable(4, Instant::now());
        assert!(s.run.is_empty());
        assert!(
            reason(&q, 1).contains("being produced"),
            "{}",
            reason(&q, 1)
        );
        // The merged part was on no replica and a source is missing: fetch the sources.
        q.record_failure(&node(2), "no replica has it".into(), None, true);
        let s = q.select_runnable(4, Instant::now());
        assert_eq!(run_names(&s), vec![node(0), node(1)]);
    }

    #[test]
    fn a_get_does_not_wait_for_a_fresh_merge_that_needs_its_part() {
        // Steady state: the leader merged the part right after its insert; the merge is
        // seconds old and needs this very part, so the GET runs at once.
        let now = chrono::Utc::now().timestamp();
        let mut fresh = merge(&["202501_1_1_0", "202501_2_2_0"], "202501_1_2_1");
        fresh.create_time = now;
        let mut q = queue(vec![get("202501_2_2_0"), fresh.clone()]);
        let s = q.select_runnable(4, Instant::now());
        assert!(
            run_names(&s).contains(&node(0)),
            "the GET waited: {}",
            reason(&q, 0)
        );
        // The same merge minutes old (a replica catching up): the GET waits for it.
        let mut old = fresh;
        old.create_time = now - 600;
        let mut q = queue(vec![get("202501_2_2_0"), old]);
        let s = q.select_runnable(4, Instant::now());
        assert_eq!(run_names(&s), vec![node(1)]);
    }

    #[test]
    fn a_get_waits_for_the_fetch_of_a_wider_part_but_not_for_one_in_backoff() {
        let mut q = queue(vec![get("202501_1_1_0"), get("202501_1_5_2")]);
        let s = q.select_runnable(4, Instant::now());
        assert_eq!(run_names(&s), vec![node(1)]);
        assert!(reason(&q, 0).contains("GET_PART"));
        // The wide fetch failed for another reason and backs off: the narrow one goes on.
        q.record_failure(&node(1), "connection refused".into(), None, false);
        let s = q.select_runnable(4, Instant::now());
        assert_eq!(run_names(&s), vec![node(0)]);
    }

    #[test]
    fn selection_keeps_the_existing_limits() {
        let mut q = queue(vec![
            get("202501_1_1_0"),
            get("202501_1_1_0"),
            get("202501_2_2_0"),
            get("202501_3_3_0"),
        ]);
        let s = q.select_runnable(2, Instant::now());
        // The same part twice: the second waits; room for two.
        assert_eq!(run_names(&s), vec![node(0), node(2)]);
        assert!(reason(&q, 1).contains("being produced"));
        // A merge waits while one of its sources is being fetched.
        let mut q = queue(vec![
            get("202501_1_1_0"),
            merge(&["202501_1_1_0", "202501_2_2_0"], "202501_1_2_1"),
        ]);
        q.get_mut(&node(0)).unwrap().is_currently_executing = true;
        let s = q.select_runnable(4, Instant::now());
        assert!(s.run.is_empty());
        assert!(reason(&q, 1).contains("source part 202501_1_1_0"));
        // Entries in backoff are left alone, even when a drop covers them.
        let mut q = queue(vec![get("202501_1_1_0")]);
        q.record_failure(&node(0), "x".into(), None, false);
        q.insert(node(1), drop("202501_0_4_999999999_999999999"));
        let s = q.select_runnable(4, Instant::now());
        assert_eq!(run_names(&s), vec![node(1)]);
        assert!(s.skip.is_empty());
        let later = Instant::now() + Duration::from_secs(61);
        q.get_mut(&node(1)).unwrap().is_currently_executing = false;
        q.remove(&node(1));
        q.remember_drop(p("202501_0_4_999999999_999999999"));
        let s = q.select_runnable(4, later);
        assert_eq!(skip_names(&s), vec![node(0)]);
    }
}
