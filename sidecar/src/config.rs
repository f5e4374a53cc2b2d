//! Command-line configuration of one replica.

use std::net::SocketAddr;
use std::path::PathBuf;
use std::time::Duration;

use clap::Parser;

/// ClickHouse's `prefer_fetch_merged_part_size_threshold`: merges of at least this many
/// source bytes are fetched when a replica already has the result...
pub const PREFER_FETCH_MERGED_PART_SIZE_THRESHOLD: u64 = 10 << 30;
/// ...and the entry is at least this old (`prefer_fetch_merged_part_time_threshold`).
pub const PREFER_FETCH_MERGED_PART_TIME_THRESHOLD: Duration = Duration::from_secs(3600);

#[derive(Debug, Clone, Parser)]
#[command(
    name = "rtable-sidecar",
    version,
    about = "One replica of an rtable ReplicatedTable"
)]
pub struct Config {
    /// The ReplicatedTable manifest (the YAML a user applies with kubectl).
    #[arg(long, env = "RTABLE_TABLE")]
    pub table: PathBuf,
    /// This replica's name (the pod name in Kubernetes).
    #[arg(long, env = "RTABLE_REPLICA")]
    pub replica: String,
    /// Where parts live; one directory per replica.
    #[arg(long, env = "RTABLE_DATA_DIR")]
    pub data_dir: PathBuf,
    /// Address the HTTP API (client and interserver) listens on.
    #[arg(long, env = "RTABLE_LISTEN", default_value = "0.0.0.0:9009")]
    pub listen: SocketAddr,
    /// host:port peers use to reach this replica; written to its `host` node.
    #[arg(long, env = "RTABLE_ADVERTISE")]
    pub advertise: String,
    /// Overrides spec.zookeeper.nodes (a connect string `h1:p1,h2:p2`).
    #[arg(long, env = "RTABLE_ZOOKEEPER")]
    pub zookeeper: Option<String>,
    /// File holding the interserver secret; when set, part fetches without it get 401.
    #[arg(long, env = "RTABLE_INTERSERVER_SECRET_FILE")]
    pub interserver_secret_file: Option<PathBuf>,
    /// File holding ZooKeeper digest credentials `user:password`. Every node of the table's
    /// tree is then created readable and writable by these credentials only, and a tree
    /// created without credentials is moved to that ACL at start.
    #[arg(long, env = "RTABLE_ZOOKEEPER_AUTH_FILE")]
    pub zookeeper_auth_file: Option<PathBuf>,
    /// Where the auth file comes from (`Secret events-zk key digest`), named in errors.
    #[arg(long, env = "RTABLE_ZOOKEEPER_AUTH_SOURCE")]
    pub zookeeper_auth_source: Option<String>,
    /// With --zookeeper-auth-file: anyone may read (not change) the tree, for debugging.
    #[arg(long, env = "RTABLE_ZOOKEEPER_ACL_WORLD_READ")]
    pub zookeeper_acl_world_read: bool,
    /// CA certificates (PEM) of the ensemble: connect to its secure client port over TLS.
    #[arg(long, env = "RTABLE_ZOOKEEPER_TLS_CA_FILE")]
    pub zookeeper_tls_ca_file: Option<PathBuf>,
    /// Client certificate (PEM) presented to the ensemble; needs --zookeeper-tls-key-file.
    #[arg(long, env = "RTABLE_ZOOKEEPER_TLS_CERT_FILE")]
    pub zookeeper_tls_cert_file: Option<PathBuf>,
    /// Private key (PEM) of --zookeeper-tls-cert-file.
    #[arg(long, env = "RTABLE_ZOOKEEPER_TLS_KEY_FILE")]
    pub zookeeper_tls_key_file: Option<PathBuf>,
    /// Largest accepted insert body in bytes.
    #[arg(long, env = "RTABLE_MAX_BODY_BYTES", default_value_t = 256 * 1024 * 1024)]
    pub max_body_bytes: usize,
    /// Largest accepted `/insert` body in bytes. Bodies bigger than one block are decoded
    /// and written block by block, so this bounds the temporary parts on disk, not memory.
    #[arg(long, env = "RTABLE_MAX_INSERT_BYTES", default_value_t = 1 << 40)]
    pub max_insert_bytes: u64,
    /// Rows per insert block (ClickHouse's `max_insert_block_size`): a body is cut into
    /// blocks at row ends, each its own part with its own dedup id; all of one body commit
    /// together.
    #[arg(
        long,
        env = "RTABLE_MAX_INSERT_BLOCK_ROWS",
        default_value_t = 1_048_576
    )]
    pub max_insert_block_rows: usize,
    /// Bytes per insert block (of the body; of decoded rows for Parquet): a block closes at
    /// the first row end past it. Memory of an insert stays near a few blocks whatever the
    /// body's size.
    #[arg(long, env = "RTABLE_MAX_INSERT_BLOCK_BYTES", default_value_t = 16 << 20)]
    pub max_insert_block_bytes: usize,
    /// Memory one SQL query's hash tables and sorts may hold (`/query`); a query needing
    /// more fails with MEMORY_LIMIT_EXCEEDED (nothing spills to disk).
    #[arg(long, env = "RTABLE_QUERY_MEMORY_LIMIT_BYTES", default_value_t = 1 << 30)]
    pub query_memory_limit_bytes: usize,
    /// Seconds a SQL query may take, streaming its answer included.
    #[arg(long, env = "RTABLE_QUERY_TIMEOUT_SECONDS", default_value_t = 300)]
    pub query_timeout_seconds: u64,
    /// SQL queries running at once; one more gets 429 (TOO_MANY_SIMULTANEOUS_QUERIES).
    #[arg(long, env = "RTABLE_QUERY_MAX_CONCURRENT", default_value_t = 4)]
    pub query_max_concurrent: usize,
    /// Threads of the query engine's own runtime (0: one per CPU).
    #[arg(long, env = "RTABLE_QUERY_THREADS", default_value_t = 0)]
    pub query_threads: usize,
    /// Overrides spec.zookeeper.sessionTimeoutSeconds, in milliseconds.
    #[arg(long, env = "RTABLE_SESSION_TIMEOUT_MS")]
    pub session_timeout_ms: Option<u64>,
    /// How many queue entries (fetches) run at once.
    #[arg(long, default_value_t = 4)]
    pub max_concurrent_fetches: usize,
    /// How long a quorum insert waits for its quorum before answering "outcome unknown".
    #[arg(
        long,
        env = "RTABLE_INSERT_QUORUM_TIMEOUT_MS",
        default_value_t = 600_000
    )]
    pub insert_quorum_timeout_ms: u64,
    /// Log cleanup keeps at least this many entries (min_replicated_logs_to_keep).
    #[arg(long, default_value_t = 10)]
    pub min_logs_to_keep: u64,
    /// Log cleanup keeps at most this many entries (max_replicated_logs_to_keep); replicas
    /// further behind are marked lost.
    #[arg(long, default_value_t = 1000)]
    pub max_logs_to_keep: u64,
    /// Dedup window: block ids kept (replicated_deduplication_window). Overrides the table
    /// file's `spec.deduplicationWindow` (1000 when the file has none), also when the file
    /// changes while running.
    #[arg(long)]
    pub dedup_window: Option<usize>,
    /// Dedup window in seconds, from the newest block (replicated_deduplication_window_seconds).
    #[arg(long, default_value_t = 604_800)]
    pub dedup_window_seconds: u64,
    /// Seconds between cleanup passes (jittered by up to 50%).
    #[arg(long, default_value_t = 30)]
    pub cleanup_period_seconds: u64,
    /// Merges take at least this many adjacent parts (see merge::policy). Five, like the
    /// base of ClickHouse's merge selector: a stream of tiny inserts merges every few
    /// inserts rather than every other one, and every merge costs each replica a pull,
    /// a merge or fetch and a record in ZooKeeper.
    #[arg(long, default_value_t = 5)]
    pub merge_min_parts: usize,
    /// Merges take at most this many parts.
    #[arg(long, default_value_t = 10)]
    pub merge_max_parts: usize,
    /// Merges produce parts of at most this many bytes (sum of the sources).
    #[arg(long, default_value_t = 1 << 30)]
    pub merge_max_bytes: u64,
    /// Insert blocks up to this many bytes (in memory, per partition) that need no quorum
    /// are written together with other concurrent small inserts into one part; each keeps
    /// its own dedup id and acknowledgement. 0 writes every insert as its own part.
    #[arg(long, env = "RTABLE_COALESCE_MAX_BYTES", default_value_t = 1 << 20)]
    pub coalesce_max_bytes: usize,
    /// Parts without a quorum up to this many bytes are pushed to the active peers right
    /// after their commit, saving each peer the log read and download round trips (see
    /// `push`); bigger ones are only fetched. 0 turns pushing off.
    #[arg(long, env = "RTABLE_PUSH_MAX_BYTES", default_value_t = 1 << 20)]
    pub push_max_bytes: u64,
    /// Insert groups committing at once. More overlap ZooKeeper round trips; fewer make
    /// each group (one part, one log entry, one fetch per replica) carry more inserts,
    /// which wins when the CPU is the limit (BENCHMARKS.md has the measurements).
    #[arg(long, env = "RTABLE_COMMIT_GROUPS_IN_FLIGHT", default_value_t = 1)]
    pub commit_groups_in_flight: usize,
    /// Microseconds a group waits for more inserts when the group before it carried two or
    /// more (PostgreSQL's commit_delay with commit_siblings): under concurrent load the
    /// clients just answered resend within it and join, instead of forming every other
    /// group alone. A lone client never waits. 0 turns it off.
    #[arg(long, env = "RTABLE_COMMIT_DELAY_US", default_value_t = 2000)]
    pub commit_delay_us: u64,
    /// A merge whose sources total at least this many bytes is fetched from a replica that
    /// already holds the result instead of being run here, once the entry is older than
    /// `--prefer-fetch-merged-part-time-threshold-seconds` (ClickHouse's
    /// prefer_fetch_merged_part_size_threshold).
    #[arg(long, default_value_t = PREFER_FETCH_MERGED_PART_SIZE_THRESHOLD)]
    pub prefer_fetch_merged_part_size_threshold: u64,
    /// See `--prefer-fetch-merged-part-size-threshold`.
    #[arg(long, default_value_t = PREFER_FETCH_MERGED_PART_TIME_THRESHOLD.as_secs())]
    pub prefer_fetch_merged_part_time_threshold_seconds: u64,
    /// A merge's largest source may be at most this many times the others together.
    #[arg(long, default_value_t = 4.0)]
    pub merge_max_size_ratio: f64,
    /// Log format: `text` or `json`.
    #[arg(long, env = "RTABLE_LOG_FORMAT", default_value = "text")]
    pub log_format: String,
    /// The client API's users (name, role, salted password hash; see docs/security.md).
    /// Without it every client request is allowed: insecure, for a machine nobody else reaches.
    #[arg(long, env = "RTABLE_USERS_FILE")]
    pub users_file: Option<PathBuf>,
    /// `/metrics` needs a user with role reader (else it is open, as `/healthz` and `/readyz` are).
    #[arg(long, env = "RTABLE_METRICS_REQUIRE_AUTH")]
    pub metrics_require_auth: bool,
    /// Address of the interserver listener (ClickHouse's `interserver_http_port`): the part
    /// exchange and peer endpoints, and only those; `--listen` then serves only clients.
    /// `--advertise` must name this listener. Unset: one listener serves both.
    #[arg(long, env = "RTABLE_INTERSERVER_LISTEN")]
    pub interserver_listen: Option<SocketAddr>,
    /// Directory laid out as a `kubernetes.io/tls` Secret (`tls.crt`, `tls.key`, `ca.crt`):
    /// both listeners serve HTTPS with it, peers are verified against `ca.crt` and their
    /// names, and the files are re-read when they change. Unset: plain HTTP.
    #[arg(long, env = "RTABLE_TLS_DIR")]
    pub tls_dir: Option<PathBuf>,
    /// Peers must present a certificate signed by `ca.crt` on the interserver listener
    /// (mutual TLS, on top of the interserver secret). Needs `--tls-dir`.
    #[arg(long, env = "RTABLE_INTERSERVER_MTLS")]
    pub interserver_mtls: bool,
    /// How often the users file and the TLS files are checked for changes, in milliseconds.
    #[arg(long, env = "RTABLE_SECURITY_RELOAD_MS", default_value_t = 2000)]
    pub security_reload_ms: u64,
}

impl Config {
    pub fn validate(&self) -> Result<(), String> {
        if self.replica.is_empty()
            || !self
                .replica
                .chars()
                .all(|c| c.is_ascii_alphanumeric() || c == '-' || c == '_' || c == '.')
        {
            return Err(format!(
                "--replica `{}` is invalid: use letters, digits, `-`, `_` and `.` (a pod name)",
                self.replica
            ));
        }
        if self
            .advertise
            .rsplit_once(':')
            .and_then(|(_, p)| p.parse::<u16>().ok())
            .is_none()
        {
            return Err(format!(
                "--advertise `{}` must be host:port",
                self.advertise
            ));
        }
        if self.log_format != "text" && self.log_format != "json" {
            return Err(format!(
                "--log-format `{}` must be `text` or `json`",
                self.log_format
            ));
        }
        if self.max_body_bytes == 0 {
            return Err("--max-body-bytes must be above 0".to_string());
        }
        if self.max_insert_bytes == 0
            || self.max_insert_block_rows == 0
            || self.max_insert_block_bytes == 0
        {
            return Err(
                "--max-insert-bytes, --max-insert-block-rows and --max-insert-block-bytes must be above 0"
                    .to_string(),
            );
        }
        if self.interserver_mtls && self.tls_dir.is_none() {
            return Err(
                "--interserver-mtls needs --tls-dir (the CA that signs the peers' certificates)"
                    .to_string(),
            );
        }
        if self.interserver_listen.is_some_and(|i| i == self.listen) {
            return Err(format!(
                "--interserver-listen {} is also --listen; give the interserver listener a port of its own",
                self.listen
            ));
        }
        Ok(())
    }

    pub fn insert_quorum_timeout(&self) -> Duration {
        Duration::from_millis(self.insert_quorum_timeout_ms)
    }

    /// The dedup window in force: `--dedup-window` when given, else the table file's.
    pub fn dedup_window(&self, manifest_window: u32) -> usize {
        self.dedup_window.unwrap_or(manifest_window as usize)
    }

    pub fn session_timeout(&self, manifest_seconds: u32) -> Duration {
        match self.session_timeout_ms {
            Some(ms) => Duration::from_millis(ms),
            None => Duration::from_secs(u64::from(manifest_seconds)),
        }
    }
}

/// A configuration as the command line `extra` (after the required flags) gives it.
#[cfg(test)]
pub(crate) fn parse_for_test(extra: &[&str]) -> Config {
    let mut args = vec![
        "rtable-sidecar",
        "--table",
        "/etc/rtable/table.yaml",
        "--replica",
        "events-0",
        "--data-dir",
        "/var/lib/rtable",
        "--advertise",
        "events-0:9009",
    ];
    args.extend_from_slice(extra);
    Config::try_parse_from(args).expect("parses")
}

#[cfg(test)]
mod tests {
    use super::*;

    /// `spec.deduplicationWindow` of the table file is the window unless the flag is given.
    #[test]
    fn the_dedup_window_comes_from_the_table_file_unless_the_flag_overrides_it() {
        let cfg = parse_for_test(&[]);
        assert_eq!(cfg.dedup_window, None);
        assert_eq!(cfg.dedup_window(250), 250);
        let cfg = parse_for_test(&["--dedup-window", "7"]);
        assert_eq!(cfg.dedup_window(250), 7);
    }
}
