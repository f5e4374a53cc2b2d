//! This replica's replication queue (ClickHouse's ReplicatedMergeTreeQueue): entries copied
//! from the shared log into `replicas/<me>/queue`, mirrored in memory with their execution
//! state, and executed out of order with per-entry backoff.

pub mod executor;
pub mod pull;

use std::collections::BTreeMap;
use std::time::{Duration, Instant};

use serde::Serialize;

use rtable_protocol::LogEntry;

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
}

/// A row of `/queue`, shaped like system.replication_queue.
#[derive(Debug, Serialize)]
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
    /// Set once the queue was loaded from ZooKeeper in this session.
    pub loaded: bool,
    /// Unix seconds of the last successful log pull, for absolute_delay.
    pub last_queue_update: Option<i64>,
    pub last_queue_update_exception: Option<String>,
}

impl QueueState {
    pub fn insert(&mut self, node_name: String, entry: LogEntry) {
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
        });
    }

    pub fn clear(&mut self) {
        self.items.clear();
        self.loaded = false;
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

    /// Picks up to `max` runnable entries and marks them executing. Not FIFO: an entry in
    /// backoff is passed over, and one whose part is being produced by another is postponed.
    pub fn select_runnable(&mut self, max: usize, now: Instant) -> Vec<QueueItem> {
        let mut executing: Vec<String> = self
            .items
            .values()
            .filter(|i| i.is_currently_executing)
            .filter_map(|i| i.entry.new_part_name())
            .collect();
        let mut room = max.saturating_sub(executing.len());
        let mut chosen = Vec::new();
        for item in self.items.values_mut() {
            if room == 0 {
                break;
            }
            if item.is_currently_executing || item.not_before.is_some_and(|t| t > now) {
                continue;
            }
            if let Some(source) = item
                .entry
                .source_parts()
                .iter()
                .find(|s| executing.contains(s))
            {
                item.num_postponed += 1;
                item.postpone_reason = Some(format!("source part {source} is being fetched"));
                continue;
            }
            if let Some(part) = item.entry.new_part_name()
                && executing.contains(&part)
            {
                item.num_postponed += 1;
                item.postpone_reason =
                    Some(format!("part {part} is being produced by another entry"));
                continue;
            }
            item.is_currently_executing = true;
            if let Some(part) = item.entry.new_part_name() {
                executing.push(part);
            }
            chosen.push(item.clone());
            room -= 1;
        }
        chosen
    }

    /// Records a failed attempt; retries back off exponentially up to 60 s like newer ClickHouse.
    pub fn record_failure(&mut self, node_name: &str, error: String, postpone: Option<String>) {
        if let Some(item) = self.items.get_mut(node_name) {
            item.is_currently_executing = false;
            item.num_tries += 1;
            item.last_exception = Some(error);
            item.last_attempt_time = Some(chrono::Utc::now().timestamp());
            if postpone.is_some() {
                item.num_postponed += 1;
            }
            item.postpone_reason = postpone;
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
            .enumerate()
            .map(|(position, i)| QueueRow {
                position,
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
            .collect()
    }
}
