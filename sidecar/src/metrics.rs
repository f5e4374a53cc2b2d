//! Counters and gauges of one replica, rendered in Prometheus text format. Names follow
//! ClickHouse's events (ReplicatedPartFetches, DuplicatedInsertedBlocks, ...).

use std::fmt::Write as _;
use std::sync::atomic::{AtomicU64, Ordering};

use rtable_protocol::status::Counters;

#[derive(Default)]
pub struct Metrics {
    pub inserts: AtomicU64,
    pub inserted_rows: AtomicU64,
    pub deduplicated_inserts: AtomicU64,
    pub failed_inserts: AtomicU64,
    pub insert_commits: AtomicU64,
    pub fetches: AtomicU64,
    pub failed_fetches: AtomicU64,
    pub fetched_bytes: AtomicU64,
    pub fetch_micros: AtomicU64,
    pub rejected_interserver: AtomicU64,
    pub sessions_started: AtomicU64,
    pub log_entries_pulled: AtomicU64,
    pub merges: AtomicU64,
    pub quorum_inserts: AtomicU64,
    pub quorum_failed_inserts: AtomicU64,
    pub quorum_wait_micros: AtomicU64,
    pub lost_parts: AtomicU64,
    pub cleanup_runs: AtomicU64,
    pub replicas_marked_lost: AtomicU64,
    pub merged_part_fetches: AtomicU64,
    pub pushed_parts_taken: AtomicU64,
    pub handoffs_sent: AtomicU64,
    pub handoffs_taken: AtomicU64,
    pub broken_parts: AtomicU64,
}

impl Metrics {
    pub fn inc(counter: &AtomicU64) {
        counter.fetch_add(1, Ordering::Relaxed);
    }

    pub fn add(counter: &AtomicU64, n: u64) {
        counter.fetch_add(n, Ordering::Relaxed);
    }

    /// One part installed from a peer (fetched, prefetched or pushed): `seconds` from the
    /// download's request to the part's installation, as the fetcher measured it.
    pub fn record_fetch(&self, bytes: u64, seconds: f64, merged: bool) {
        Self::inc(&self.fetches);
        if merged {
            Self::inc(&self.merged_part_fetches);
        }
        Self::add(&self.fetched_bytes, bytes);
        Self::add(&self.fetch_micros, (seconds * 1e6) as u64);
    }

    /// Renders counters plus the gauges the caller measured just now.
    pub fn render(&self, replica: &str, gauges: &[(&str, &str, f64)]) -> String {
        let counters: [(&str, &str, &AtomicU64); 24] = [
            (
                "rtable_inserts_total",
                "Acknowledged inserts (new data)",
                &self.inserts,
            ),
            (
                "rtable_inserted_rows_total",
                "Rows in acknowledged inserts",
                &self.inserted_rows,
            ),
            (
                "rtable_deduplicated_inserts_total",
                "Inserts answered as duplicates of an earlier block (DuplicatedInsertedBlocks)",
                &self.deduplicated_inserts,
            ),
            (
                "rtable_failed_inserts_total",
                "Inserts that got an error",
                &self.failed_inserts,
            ),
            (
                "rtable_insert_commits_total",
                "ZooKeeper commit multis (one per group commit)",
                &self.insert_commits,
            ),
            (
                "rtable_fetches_total",
                "Parts fetched from peers (ReplicatedPartFetches)",
                &self.fetches,
            ),
            (
                "rtable_failed_fetches_total",
                "Part fetches that failed (ReplicatedPartFailedFetches)",
                &self.failed_fetches,
            ),
            (
                "rtable_broken_parts_total",
                "Active parts found damaged on disk, detached and fetched again",
                &self.broken_parts,
            ),
            (
                "rtable_fetched_bytes_total",
                "Bytes of fetched parts",
                &self.fetched_bytes,
            ),
            (
                "rtable_fetch_microseconds_total",
                "Time spent fetching parts, from the request to the part's installation",
                &self.fetch_micros,
            ),
            (
                "rtable_interserver_rejected_total",
                "Interserver requests refused for a missing or wrong secret",
                &self.rejected_interserver,
            ),
            (
                "rtable_sessions_started_total",
                "ZooKeeper sessions activated",
                &self.sessions_started,
            ),
            (
                "rtable_log_entries_pulled_total",
                "Log entries copied into this replica's queue",
                &self.log_entries_pulled,
            ),
            (
                "rtable_merges_total",
                "Merges run on this replica (ReplicatedPartMerges)",
                &self.merges,
            ),
            (
                "rtable_quorum_inserts_total",
                "Inserts acknowledged after reaching their quorum (QuorumParts)",
                &self.quorum_inserts,
            ),
            (
                "rtable_quorum_failed_inserts_total",
                "Quorum inserts whose quorum failed (QuorumFailedInserts)",
                &self.quorum_failed_inserts,
            ),
            (
                "rtable_quorum_wait_microseconds_total",
                "Time inserts spent waiting for quorums (QuorumWaitMicroseconds)",
                &self.quorum_wait_micros,
            ),
            (
                "rtable_lost_parts_total",
                "Parts no replica holds any more, declared lost (ReplicatedDataLoss)",
                &self.lost_parts,
            ),
            (
                "rtable_cleanup_runs_total",
                "Log and block cleanup passes",
                &self.cleanup_runs,
            ),
            (
                "rtable_replicas_marked_lost_total",
                "Replicas this leader marked is_lost=1 during log cleanup",
                &self.replicas_marked_lost,
            ),
            (
                "rtable_merged_part_fetches_total",
                "Merged parts fetched instead of merged here (ReplicatedPartFetchesOfMerged)",
                &self.merged_part_fetches,
            ),
            (
                "rtable_pushed_parts_taken_total",
                "Parts a peer pushed right after committing them and this replica installed (also counted in fetches)",
                &self.pushed_parts_taken,
            ),
            (
                "rtable_handoffs_sent_total",
                "Quorum inserts whose peers took their part before the commit, which recorded it for them",
                &self.handoffs_sent,
            ),
            (
                "rtable_handoffs_taken_total",
                "Parts a peer handed off to this replica before committing them",
                &self.handoffs_taken,
            ),
        ];
        let mut out = String::new();
        for (name, help, value) in counters {
            let _ = writeln!(out, "# HELP {name} {help}\n# TYPE {name} counter");
            let _ = writeln!(
                out,
                "{name}{{replica=\"{replica}\"}} {}",
                value.load(Ordering::Relaxed)
            );
        }
        for (name, help, value) in gauges {
            let _ = writeln!(out, "# HELP {name} {help}\n# TYPE {name} gauge");
            let _ = writeln!(out, "{name}{{replica=\"{replica}\"}} {value}");
        }
        out
    }
}

impl Metrics {
    /// The counters `/status` repeats, so one request shows what the replica has been doing.
    pub fn counters(&self) -> Counters {
        let get = |c: &AtomicU64| c.load(Ordering::Relaxed);
        Counters {
            inserts: get(&self.inserts),
            deduplicated_inserts: get(&self.deduplicated_inserts),
            quorum_inserts: get(&self.quorum_inserts),
            quorum_failed_inserts: get(&self.quorum_failed_inserts),
            quorum_wait_ms: get(&self.quorum_wait_micros) / 1000,
            fetches: get(&self.fetches),
            failed_fetches: get(&self.failed_fetches),
            merges: get(&self.merges),
            merged_part_fetches: get(&self.merged_part_fetches),
            pushed_parts_taken: get(&self.pushed_parts_taken),
            handoffs_sent: get(&self.handoffs_sent),
            handoffs_taken: get(&self.handoffs_taken),
            broken_parts: get(&self.broken_parts),
            lost_parts: get(&self.lost_parts),
            cleanup_runs: get(&self.cleanup_runs),
            replicas_marked_lost: get(&self.replicas_marked_lost),
        }
    }
}
