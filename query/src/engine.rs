//! Runs one SQL read over a pinned list of parts. Each query gets its own DataFusion
//! session: the table registered as a listing of exactly the parts it was given (declared
//! sorted by the ORDER BY key, so row-group and page statistics prune key ranges), a
//! memory pool of `Limits::memory_bytes` with spilling off (a query over it fails with
//! MEMORY_LIMIT_EXCEEDED instead of filling the replica's disk), and a deadline.
//!
//! Queries run on a runtime of their own (`Limits::threads` workers), so a heavy scan
//! never delays the replica's replication tasks on the main runtime; the answer reaches
//! the caller through a small channel, which also bounds how far encoding runs ahead of
//! the client. The caller's pin (the snapshot's parts) lives as long as that task.

use std::num::NonZeroUsize;
use std::path::PathBuf;
use std::sync::Arc;
use std::time::{Duration, Instant};

use arrow::datatypes::SchemaRef;
use bytes::Bytes;
use datafusion::catalog::{MemTable, TableProvider};
use datafusion::common::Column;
use datafusion::datasource::file_format::parquet::ParquetFormat;
use datafusion::datasource::listing::{
    ListingOptions, ListingTable, ListingTableConfig, ListingTableUrl,
};
use datafusion::error::DataFusionError;
use datafusion::execution::SessionStateDefaults;
use datafusion::execution::disk_manager::{DiskManagerBuilder, DiskManagerMode};
use datafusion::execution::memory_pool::{GreedyMemoryPool, MemoryPool, TrackConsumersPool};
use datafusion::execution::runtime_env::{RuntimeEnv, RuntimeEnvBuilder};
use datafusion::execution::session_state::SessionStateBuilder;
use datafusion::logical_expr::{AggregateUDF, Expr, ScalarUDF, SortExpr, WindowUDF};
use datafusion::physical_plan::{ExecutionPlan, execute_stream};
use datafusion::prelude::{SQLOptions, SessionConfig, SessionContext};
use datafusion::sql::parser::Statement as DfStatement;
use futures::StreamExt;
use futures::stream::BoxStream;
use tokio::sync::{Semaphore, mpsc};
use tracing::{Instrument, info, info_span};

use crate::error::{QueryError, code};
use crate::metrics::{QueryMetrics, QuerySummary};
use crate::output::{Encoder, Format};
use crate::{clickhouse, guard};

/// The resources one replica gives to queries.
#[derive(Debug, Clone, Copy)]
pub struct Limits {
    /// Memory each query's operators (hash tables, sorts) may hold.
    pub memory_bytes: usize,
    /// How long a query may take, answer streaming included.
    pub timeout: Duration,
    /// Queries running at once; one more is refused (TOO_MANY_SIMULTANEOUS_QUERIES).
    pub max_concurrent: usize,
    /// Worker threads of the query runtime, and the partitions a query is split into.
    pub threads: usize,
}

/// The table as one query sees it: its name in `FROM`, its columns as they are stored in
/// the parts' Parquet files, its ORDER BY key and the data files of the pinned parts.
#[derive(Debug, Clone)]
pub struct TableSnapshot {
    pub name: String,
    pub schema: SchemaRef,
    pub order_by: Vec<String>,
    pub files: Vec<PathBuf>,
}

/// An answer whose first bytes (or emptiness) are known: errors of parsing, planning and
/// of computing the first batch came back as `Err` from [`Engine::run`] instead.
pub struct Answer {
    pub format: Format,
    pub body: BoxStream<'static, Result<Bytes, QueryError>>,
}

pub struct Engine {
    limits: Limits,
    permits: Arc<Semaphore>,
    runtime: Option<tokio::runtime::Runtime>,
    base: Arc<RuntimeEnv>,
    metrics: Arc<QueryMetrics>,
    scalars: Vec<Arc<ScalarUDF>>,
    aggregates: Vec<Arc<AggregateUDF>>,
    windows: Vec<Arc<WindowUDF>>,
}

impl Drop for Engine {
    fn drop(&mut self) {
        // Queries still streaming are cut; a runtime may not block on drop inside another.
        if let Some(runtime) = self.runtime.take() {
            runtime.shutdown_background();
        }
    }
}

/// One query's work, moved onto the query runtime.
struct Job {
    statement: DfStatement,
    format: Format,
    table: TableSnapshot,
    context: SessionContext,
    memory_bytes: usize,
}

impl Engine {
    pub fn new(limits: Limits) -> Result<Engine, QueryError> {
        let threads = limits.threads.max(1);
        let runtime = tokio::runtime::Builder::new_multi_thread()
            .worker_threads(threads)
            .thread_name("rtable-query")
            .enable_all()
            .build()
            .map_err(|e| QueryError::Execution(format!("cannot start the query runtime: {e}")))?;
        let base = RuntimeEnvBuilder::new()
            .with_disk_manager_builder(
                DiskManagerBuilder::default().with_mode(DiskManagerMode::Disabled),
            )
            .build_arc()
            .map_err(|e| QueryError::from_engine(e, limits.memory_bytes))?;
        let mut scalars = SessionStateDefaults::default_scalar_functions();
        scalars.extend(clickhouse::scalar_functions());
        let mut aggregates = SessionStateDefaults::default_aggregate_functions();
        aggregates.extend(clickhouse::aggregate_functions());
        Ok(Engine {
            limits: Limits { threads, ..limits },
            permits: Arc::new(Semaphore::new(limits.max_concurrent.max(1))),
            runtime: Some(runtime),
            base,
            metrics: Arc::new(QueryMetrics::default()),
            scalars,
            aggregates,
            windows: SessionStateDefaults::default_window_functions(),
        })
    }

    pub fn limits(&self) -> Limits {
        self.limits
    }

    pub fn metrics(&self) -> &QueryMetrics {
        &self.metrics
    }

    /// Answers `sql` (one SELECT of `table.name`, with an optional `FORMAT` clause that
    /// wins over `default_format`) over `table`'s files. `pin` is dropped when the query
    /// ends: hand it what keeps the files on disk.
    pub async fn run<P: Send + 'static>(
        &self,
        sql: &str,
        default_format: Format,
        table: TableSnapshot,
        pin: P,
    ) -> Result<Answer, QueryError> {
        let started = Instant::now();
        self.metrics.started();
        let prepared = self.prepare(sql, default_format, table);
        let (job, permit) = match prepared {
            Ok(p) => p,
            Err(e) => {
                self.metrics.failed(&e);
                return Err(e);
            }
        };
        let format = job.format;
        let (tx, mut rx) = mpsc::channel::<Result<Bytes, QueryError>>(4);
        let metrics = self.metrics.clone();
        let timeout = self.limits.timeout;
        let span = info_span!("query", sql = %shorten(sql));
        let Some(runtime) = &self.runtime else {
            return Err(QueryError::Execution(
                "the query runtime is shut down".into(),
            ));
        };
        runtime.spawn(
            async move {
                let _permit = permit;
                let _pin = pin;
                metrics.running(true);
                let outcome = match tokio::time::timeout(timeout, job.produce(&tx)).await {
                    Ok(outcome) => outcome,
                    Err(_) => Err(QueryError::Timeout(timeout)),
                };
                metrics.running(false);
                let micros = started.elapsed().as_micros() as u64;
                match &outcome {
                    Ok(summary) => info!(
                        rows = summary.rows,
                        bytes_scanned = summary.bytes_scanned,
                        ms = micros / 1000,
                        "query answered"
                    ),
                    Err(e) => {
                        info!(error = %e, kind = e.kind(), ms = micros / 1000, "query failed")
                    }
                }
                metrics.finished(&outcome, micros);
                if let Err(e) = outcome {
                    // Nobody to tell when the client is gone; the failure is counted and logged.
                    let _ignored = tx.send(Err(e)).await;
                }
            }
            .instrument(span),
        );
        let first = rx.recv().await;
        let body = match first {
            None => futures::stream::empty().boxed(),
            Some(Err(e)) => return Err(e),
            Some(Ok(bytes)) => {
                let rest = futures::stream::poll_fn(move |cx| rx.poll_recv(cx));
                futures::stream::once(async move { Ok(bytes) })
                    .chain(rest)
                    .boxed()
            }
        };
        Ok(Answer { format, body })
    }

    fn prepare(
        &self,
        sql: &str,
        default_format: Format,
        table: TableSnapshot,
    ) -> Result<(Job, tokio::sync::OwnedSemaphorePermit), QueryError> {
        let checked = guard::check(sql, &table.name)?;
        let format = match checked.format {
            Some(name) => Format::parse(&name)?,
            None => default_format,
        };
        let permit = self
            .permits
            .clone()
            .try_acquire_owned()
            .map_err(|_| QueryError::TooMany {
                limit: self.limits.max_concurrent,
            })?;
        let context = self
            .context()
            .map_err(|e| QueryError::from_engine(e, self.limits.memory_bytes))?;
        Ok((
            Job {
                statement: checked.statement,
                format,
                table,
                context,
                memory_bytes: self.limits.memory_bytes,
            },
            permit,
        ))
    }

    /// A session with this query's own memory pool, DataFusion's functions plus
    /// ClickHouse's, and no table functions, file formats or table factories (nothing that
    /// could read outside the parts it is given).
    fn context(&self) -> Result<SessionContext, DataFusionError> {
        let pool: Arc<dyn MemoryPool> = Arc::new(TrackConsumersPool::new(
            GreedyMemoryPool::new(self.limits.memory_bytes),
            NonZeroUsize::new(3).unwrap_or(NonZeroUsize::MIN),
        ));
        let env = RuntimeEnvBuilder::from_runtime_env(&self.base)
            .with_memory_pool(pool)
            .build_arc()?;
        let mut config = SessionConfig::new()
            .with_target_partitions(self.limits.threads)
            .with_information_schema(false);
        let options = config.options_mut();
        options.sql_parser.collect_spans = true;
        // File-level min/max of every part: a key range skips whole parts before reading.
        options.execution.collect_statistics = true;
        options.sql_parser.map_string_types_to_utf8view = false;
        options.execution.parquet.pushdown_filters = true;
        options.execution.parquet.reorder_filters = true;
        options.execution.parquet.schema_force_view_types = false;
        let state = SessionStateBuilder::new()
            .with_config(config)
            .with_runtime_env(env)
            .with_scalar_functions(self.scalars.clone())
            .with_aggregate_functions(self.aggregates.clone())
            .with_window_functions(self.windows.clone())
            .with_expr_planners(SessionStateDefaults::default_expr_planners())
            .build();
        Ok(SessionContext::new_with_state(state))
    }
}

impl Job {
    async fn produce(
        self,
        tx: &mpsc::Sender<Result<Bytes, QueryError>>,
    ) -> Result<QuerySummary, QueryError> {
        let memory = self.memory_bytes;
        let engine = |e: DataFusionError| QueryError::from_engine(e, memory);
        let provider = self.provider().map_err(engine)?;
        self.context
            .register_table(self.table.name.as_str(), provider)
            .map_err(engine)?;
        let state = self.context.state();
        let plan = state
            .statement_to_plan(self.statement)
            .await
            .map_err(engine)?;
        SQLOptions::new()
            .with_allow_ddl(false)
            .with_allow_dml(false)
            .with_allow_statements(false)
            .verify_plan(&plan)
            .map_err(|e| QueryError::refused(e.message().to_string(), code::READONLY))?;
        let physical = state.create_physical_plan(&plan).await.map_err(engine)?;
        let schema = physical.schema();
        let mut batches =
            execute_stream(physical.clone(), self.context.task_ctx()).map_err(engine)?;
        let mut encoder = Encoder::new(self.format, &schema)?;
        let mut rows = 0u64;
        while let Some(batch) = batches.next().await {
            let batch = batch.map_err(engine)?;
            rows += batch.num_rows() as u64;
            let bytes = encoder.batch(&batch)?;
            if !bytes.is_empty() {
                send(tx, bytes).await?;
            }
        }
        let tail = encoder.finish(&schema)?;
        if !tail.is_empty() {
            send(tx, tail).await?;
        }
        Ok(QuerySummary {
            rows,
            bytes_scanned: bytes_scanned(&physical),
        })
    }

    /// The table over exactly the pinned parts' files, declared sorted by the ORDER BY key
    /// (ascending, NULLs first: how the parts are written).
    fn provider(&self) -> Result<Arc<dyn TableProvider>, DataFusionError> {
        let table = &self.table;
        if table.files.is_empty() {
            return Ok(Arc::new(MemTable::try_new(
                table.schema.clone(),
                vec![vec![]],
            )?));
        }
        let urls = table
            .files
            .iter()
            .map(|p| ListingTableUrl::parse(p.to_string_lossy()))
            .collect::<Result<Vec<_>, _>>()?;
        let sort: Vec<SortExpr> = table
            .order_by
            .iter()
            .map(|c| Expr::Column(Column::new_unqualified(c)).sort(true, true))
            .collect();
        let parquet = self.context.state().default_table_options().parquet;
        let options = ListingOptions::new(Arc::new(ParquetFormat::default().with_options(parquet)))
            .with_file_extension(".parquet")
            .with_file_sort_order(if sort.is_empty() { vec![] } else { vec![sort] });
        let config = ListingTableConfig::new_with_multi_paths(urls)
            .with_listing_options(options)
            .with_schema(table.schema.clone());
        Ok(Arc::new(ListingTable::try_new(config)?))
    }
}

async fn send(
    tx: &mpsc::Sender<Result<Bytes, QueryError>>,
    bytes: Bytes,
) -> Result<(), QueryError> {
    tx.send(Ok(bytes)).await.map_err(|_| QueryError::Cancelled)
}

/// Bytes the plan's Parquet scans read from the files.
fn bytes_scanned(plan: &Arc<dyn ExecutionPlan>) -> u64 {
    let own = plan
        .metrics()
        .and_then(|m| m.sum_by_name("bytes_scanned"))
        .map_or(0, |v| v.as_usize() as u64);
    own + plan.children().into_iter().map(bytes_scanned).sum::<u64>()
}

/// The SQL for a log line: one line, at most 300 characters.
fn shorten(sql: &str) -> String {
    let flat: String = sql.split_whitespace().collect::<Vec<_>>().join(" ");
    if flat.chars().count() <= 300 {
        flat
    } else {
        format!("{}...", flat.chars().take(300).collect::<String>())
    }
}
