//! SQL reads of one rtable table: DataFusion over a pinned list of the table's Parquet
//! parts, ClickHouse's function names, per-query memory and time limits, a limit on
//! queries at once, and metrics. Pure engine: no HTTP; the sidecar pins a snapshot of its
//! parts, hands their files here and streams the answer.
//!
//! Only reads of the one table are answered (see `guard`); the answer comes in the formats
//! `/select` has (see `output`).

mod clickhouse;
mod engine;
mod error;
mod guard;
mod metrics;
mod output;

pub use engine::{Answer, Engine, Limits, TableSnapshot};
pub use error::{QueryError, code};
pub use metrics::{QueryMetrics, QuerySummary};
pub use output::Format;

#[cfg(test)]
mod tests;
