//! What a query can end with besides rows, with the HTTP status and the ClickHouse error
//! code each maps to (the ClickHouse-shaped endpoint answers `Code: <n>. DB::Exception`).

use std::time::Duration;

use datafusion::error::DataFusionError;

/// ClickHouse's error codes for the failures a query can have.
pub mod code {
    pub const BAD_ARGUMENTS: u32 = 36;
    pub const UNKNOWN_IDENTIFIER: u32 = 47;
    pub const NOT_IMPLEMENTED: u32 = 48;
    pub const UNKNOWN_TABLE: u32 = 60;
    pub const SYNTAX_ERROR: u32 = 62;
    pub const UNKNOWN_FORMAT: u32 = 73;
    pub const TIMEOUT_EXCEEDED: u32 = 159;
    pub const READONLY: u32 = 164;
    pub const TOO_MANY_SIMULTANEOUS_QUERIES: u32 = 202;
    pub const MEMORY_LIMIT_EXCEEDED: u32 = 241;
    pub const QUERY_WAS_CANCELLED: u32 = 394;
    pub const UNKNOWN_EXCEPTION: u32 = 1002;
}

#[derive(Debug, thiserror::Error)]
pub enum QueryError {
    /// A statement that is not one read of this table (DDL, DML, another table, ...).
    #[error("{message}")]
    Refused { message: String, code: u32 },
    /// The engine could not parse or plan the query: its message, with the position.
    #[error("{message}")]
    Invalid { message: String, code: u32 },
    #[error(
        "too many queries at once: {limit} are running (--query-max-concurrent); retry when one has finished"
    )]
    TooMany { limit: usize },
    #[error(
        "the query needs more than its {limit}-byte memory limit (--query-memory-limit-bytes): {detail}; narrow it with a WHERE, fewer GROUP BY keys or a smaller ORDER BY ... LIMIT"
    )]
    MemoryLimit { limit: usize, detail: String },
    #[error(
        "the query ran longer than its {0:?} limit (--query-timeout-seconds) and was cancelled; narrow it with a WHERE on the ORDER BY key or a LIMIT"
    )]
    Timeout(Duration),
    /// The client went away before the answer was complete.
    #[error("the query was cancelled: the client went away")]
    Cancelled,
    /// Reading a part or computing the answer failed (not the query's fault).
    #[error("the query failed: {0}")]
    Execution(String),
}

impl QueryError {
    pub fn refused(message: impl Into<String>, code: u32) -> QueryError {
        QueryError::Refused {
            message: message.into(),
            code,
        }
    }

    /// The HTTP status: 400 for what the query asked, 429 when too many run, 503 for
    /// limits of this replica's resources, 500 for failures of the replica.
    pub fn status(&self) -> u16 {
        match self {
            QueryError::Refused { .. } | QueryError::Invalid { .. } => 400,
            QueryError::TooMany { .. } => 429,
            QueryError::MemoryLimit { .. } | QueryError::Timeout(_) => 503,
            QueryError::Cancelled | QueryError::Execution(_) => 500,
        }
    }

    /// ClickHouse's error code for the same failure.
    pub fn clickhouse_code(&self) -> u32 {
        match self {
            QueryError::Refused { code, .. } | QueryError::Invalid { code, .. } => *code,
            QueryError::TooMany { .. } => code::TOO_MANY_SIMULTANEOUS_QUERIES,
            QueryError::MemoryLimit { .. } => code::MEMORY_LIMIT_EXCEEDED,
            QueryError::Timeout(_) => code::TIMEOUT_EXCEEDED,
            QueryError::Cancelled => code::QUERY_WAS_CANCELLED,
            QueryError::Execution(_) => code::UNKNOWN_EXCEPTION,
        }
    }

    /// The label of this failure in `/metrics`.
    pub fn kind(&self) -> &'static str {
        match self {
            QueryError::Refused { .. } => "refused",
            QueryError::Invalid { .. } => "invalid",
            QueryError::TooMany { .. } => "too_many",
            QueryError::MemoryLimit { .. } => "memory_limit",
            QueryError::Timeout(_) => "timeout",
            QueryError::Cancelled => "cancelled",
            QueryError::Execution(_) => "failed",
        }
    }

    /// An error of the engine, sorted by whose fault it is. Parse and plan errors carry
    /// the position the engine found (`at line L, column C`).
    pub(crate) fn from_engine(e: DataFusionError, memory_limit: usize) -> QueryError {
        let position = e
            .diagnostic()
            .and_then(|d| d.span)
            .map(|s| format!(" (at line {}, column {})", s.start.line, s.start.column))
            .unwrap_or_default();
        let root = e.find_root();
        let message = format!("{}{position}", root.message());
        match root {
            DataFusionError::SQL(..) => QueryError::Invalid {
                message,
                code: code::SYNTAX_ERROR,
            },
            DataFusionError::SchemaError(..) => QueryError::Invalid {
                message,
                code: code::UNKNOWN_IDENTIFIER,
            },
            // Casts, arithmetic and function arguments that fail on the rows are the
            // query's: reading the parts (I/O, Parquet) is the replica's.
            DataFusionError::Plan(..)
            | DataFusionError::ArrowError(..)
            | DataFusionError::Execution(..) => QueryError::Invalid {
                message,
                code: code::BAD_ARGUMENTS,
            },
            DataFusionError::NotImplemented(..) => QueryError::Invalid {
                message,
                code: code::NOT_IMPLEMENTED,
            },
            DataFusionError::ResourcesExhausted(..) => QueryError::MemoryLimit {
                limit: memory_limit,
                detail: message,
            },
            _ => QueryError::Execution(message),
        }
    }
}
