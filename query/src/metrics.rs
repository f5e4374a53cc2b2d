//! Counters of the queries one replica answered, rendered in Prometheus text format next
//! to the replica's own (`rtable_query_*`).

use std::sync::atomic::{AtomicU64, Ordering};

use crate::error::QueryError;

/// Failure kinds, as [`QueryError::kind`] names them.
const KINDS: [&str; 7] = [
    "refused",
    "invalid",
    "too_many",
    "memory_limit",
    "timeout",
    "cancelled",
    "failed",
];

#[derive(Default)]
pub struct QueryMetrics {
    started: AtomicU64,
    succeeded: AtomicU64,
    failed: [AtomicU64; 7],
    running: AtomicU64,
    rows: AtomicU64,
    bytes_scanned: AtomicU64,
    micros: AtomicU64,
}

/// What one finished query read and answered.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct QuerySummary {
    /// Rows in the answer.
    pub rows: u64,
    /// Bytes read from the parts' Parquet files (after pruning).
    pub bytes_scanned: u64,
}

impl QueryMetrics {
    pub(crate) fn started(&self) {
        self.started.fetch_add(1, Ordering::Relaxed);
    }

    pub(crate) fn running(&self, up: bool) {
        if up {
            self.running.fetch_add(1, Ordering::Relaxed);
        } else {
            self.running.fetch_sub(1, Ordering::Relaxed);
        }
    }

    pub(crate) fn finished(&self, outcome: &Result<QuerySummary, QueryError>, micros: u64) {
        self.micros.fetch_add(micros, Ordering::Relaxed);
        match outcome {
            Ok(summary) => {
                self.succeeded.fetch_add(1, Ordering::Relaxed);
                self.rows.fetch_add(summary.rows, Ordering::Relaxed);
                self.bytes_scanned
                    .fetch_add(summary.bytes_scanned, Ordering::Relaxed);
            }
            Err(e) => self.failed(e),
        }
    }

    pub(crate) fn failed(&self, e: &QueryError) {
        if let Some(i) = KINDS.iter().position(|k| *k == e.kind()) {
            self.failed[i].fetch_add(1, Ordering::Relaxed);
        }
    }

    /// Bytes read from parts by every query so far.
    pub fn bytes_scanned(&self) -> u64 {
        self.bytes_scanned.load(Ordering::Relaxed)
    }

    /// Appends the query metrics of `replica` in Prometheus text format.
    pub fn render(&self, replica: &str, out: &mut String) {
        let get = |c: &AtomicU64| c.load(Ordering::Relaxed);
        let simple = [
            (
                "rtable_queries_total",
                "counter",
                "SQL queries received (/query and the ClickHouse-shaped /?query=SELECT)",
                get(&self.started) as f64,
            ),
            (
                "rtable_queries_succeeded_total",
                "counter",
                "Queries answered in full",
                get(&self.succeeded) as f64,
            ),
            (
                "rtable_queries_running",
                "gauge",
                "Queries running now",
                get(&self.running) as f64,
            ),
            (
                "rtable_query_result_rows_total",
                "counter",
                "Rows in query answers",
                get(&self.rows) as f64,
            ),
            (
                "rtable_query_bytes_scanned_total",
                "counter",
                "Bytes queries read from the parts' Parquet files",
                get(&self.bytes_scanned) as f64,
            ),
            (
                "rtable_query_seconds_total",
                "counter",
                "Time queries took, from receipt to the last byte or the error",
                get(&self.micros) as f64 / 1e6,
            ),
        ];
        for (name, kind, help, value) in simple {
            out.push_str(&format!(
                "# HELP {name} {help}\n# TYPE {name} {kind}\n{name}{{replica=\"{replica}\"}} {value}\n"
            ));
        }
        out.push_str(
            "# HELP rtable_queries_failed_total Queries that ended with an error, by kind\n# TYPE rtable_queries_failed_total counter\n",
        );
        for (kind, counter) in KINDS.iter().zip(&self.failed) {
            out.push_str(&format!(
                "rtable_queries_failed_total{{replica=\"{replica}\",kind=\"{kind}\"}} {}\n",
                get(counter)
            ));
        }
    }
}
