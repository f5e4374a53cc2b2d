//! The insert path (ClickHouse's ReplicatedMergeTreeSink): decode and validate the body,
//! write one temporary part per partition, compute each block's dedup id, and hand the
//! blocks to the group committer, which allocates block numbers and commits them to
//! ZooKeeper together with other concurrent inserts.

pub mod committer;
pub mod handoff;
pub mod reserve;
pub mod stream;

use std::sync::Arc;

use bytes::Bytes;
use serde::Serialize;
use tracing::{Instrument, debug, info_span};

use rtable_protocol::hash::{self, Hash128};

use rtable_protocol::manifest::InsertQuorum;

use crate::metrics::Metrics;
use crate::quorum;
use crate::replica::Replica;
use crate::rows::{self, InputError, InputFormat};
use crate::store::verify::Unsynced;
use crate::store::{EncodedPart, StoreError, TempPart};

pub use committer::Committer;

/// One partition's share of an insert.
pub struct Block {
    pub partition_id: String,
    pub block_id: String,
    pub rows: u64,
    pub payload: Payload,
    /// Replicas that must hold the part before the insert is acknowledged (<= 1: none).
    pub quorum: u32,
    pub quorum_mode: quorum::Mode,
    /// The active replicas were counted for this insert's quorum before it was written.
    /// When not, the committer counts them for a part no peer took before its commit.
    pub quorum_checked: bool,
}

/// A block's rows, either kept for the committer to write together with other small
/// blocks of the same partition (one part for many concurrent inserts, like ClickHouse's
/// async inserts) or, when large, already written as a part of its own.
pub enum Payload {
    /// Sorted by ORDER BY and checked against the table's Arrow schema.
    Rows(arrow::array::RecordBatch),
    /// Written; a quorum block's fsyncs are still to run (alongside the commit).
    Written(TempPart, Option<Unsynced>),
    /// A small quorum block's own part, encoded but not written: its number, and so its
    /// name, comes in the committer, which writes it while handing it to the peers.
    Encoded(EncodedPart),
}

impl Payload {
    pub fn discard(self, replica: &Replica) {
        if let Payload::Written(t, _) = self {
            replica.store.discard_temp(t);
        }
    }
}

/// What happened to one block.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum BlockOutcome {
    Committed {
        part: String,
        /// The commit itself reached the insert's quorum (its part was handed off).
        quorum_reached: bool,
    },
    /// An earlier insert with the same dedup id committed `part`.
    Duplicate { part: String },
}

#[derive(Debug, Serialize)]
pub struct InsertAnswer {
    pub parts: Vec<String>,
    pub rows: u64,
    /// True when every block of this insert was already committed by an earlier insert.
    pub deduplicated: bool,
    /// The parts (of `parts`) that were duplicates, when only some were.
    #[serde(skip_serializing_if = "Vec::is_empty")]
    pub deduplicated_parts: Vec<String>,
}

#[derive(Debug, thiserror::Error)]
pub enum InsertError {
    #[error("{0}")]
    Input(#[from] InputError),
    /// The replica cannot take inserts (no session, session expired, schema mismatch).
    #[error("replica is read-only: {0}; retry on another replica or later")]
    ReadOnly(String),
    /// ZooKeeper did not answer; nothing was committed, retrying is safe.
    #[error("ZooKeeper unavailable, nothing was committed: {0}; retry")]
    Unavailable(String),
    /// The commit may or may not have happened; a retry with the same body or dedup token
    /// is idempotent.
    #[error("outcome unknown, retry (the retry is deduplicated): {0}")]
    OutcomeUnknown(String),
    /// Stopped before its commit (the commit task failed and restarts): nothing was
    /// committed, retrying is safe.
    #[error("insert interrupted, nothing was committed: {0}; retry")]
    Interrupted(String),
    #[error("too few live replicas for insert_quorum: {0}")]
    TooFewReplicas(String),
    /// No active replica held the part: nothing stays committed; retrying is safe.
    #[error("quorum failed for part {0}: no active replica holds it any more; retry the insert")]
    QuorumFailed(String),
    /// The body exceeds `--max-insert-bytes`: nothing was committed.
    #[error("{0}")]
    TooLarge(String),
    #[error("writing the part failed: {0}")]
    Store(#[from] StoreError),
    #[error("internal error: {0}")]
    Internal(String),
}

impl InsertError {
    pub fn status(&self) -> u16 {
        match self {
            InsertError::Input(_) => 400,
            InsertError::ReadOnly(_)
            | InsertError::Unavailable(_)
            | InsertError::Interrupted(_)
            | InsertError::OutcomeUnknown(_)
            | InsertError::TooFewReplicas(_)
            | InsertError::QuorumFailed(_) => 503,
            InsertError::TooLarge(_) => 413,
            InsertError::Store(_) | InsertError::Internal(_) => 500,
        }
    }
}

pub struct InsertRequest {
    pub format: InputFormat,
    pub body: Bytes,
    pub dedup_token: Option<String>,
    /// Per-request `insert_quorum` (a number or `auto`); the table's setting otherwise.
    pub quorum: Option<InsertQuorum>,
    /// Per-request `insert_quorum_parallel`.
    pub quorum_parallel: Option<bool>,
}

pub async fn insert(
    replica: &Arc<Replica>,
    committer: &Committer,
    request: InsertRequest,
) -> Result<InsertAnswer, InsertError> {
    insert_streamed(replica, committer, request, None).await
}

/// [`insert`] of a body whose first bytes are `request.body` and whose `rest` is still
/// arriving (see `stream`).
pub async fn insert_streamed(
    replica: &Arc<Replica>,
    committer: &Committer,
    request: InsertRequest,
    rest: Option<stream::BodyStream>,
) -> Result<InsertAnswer, InsertError> {
    let span = info_span!("insert", replica = %replica.name, bytes = request.body.len());
    async move {
        let started = std::time::Instant::now();
        // Refuse early: a read-only replica should not even write temporary parts.
        let (client, _) = replica
            .sessions
            .active()
            .map_err(|e| InsertError::ReadOnly(e.reason))?;
        // The table file's settings as last reloaded (see table_reload).
        let settings = replica.settings();
        let required = request
            .quorum
            .unwrap_or(settings.insert_quorum)
            .required(settings.replicas);
        let mode = if request
            .quorum_parallel
            .unwrap_or(settings.insert_quorum_parallel)
        {
            quorum::Mode::Parallel
        } else {
            quorum::Mode::Sequential
        };
        // A quorum insert's count of active replicas (ZooKeeper reads) runs while its part
        // is written; a part written for nothing is removed again. A parallel quorum with
        // enough peers in the cached list skips it: the handoff before its commit proves
        // those peers alive, and the committer counts them when the handoff fails.
        let skip_check = required > 1
            && mode == quorum::Mode::Parallel
            && replica
                .push_peers
                .fresh_len()
                .is_some_and(|n| n + 1 >= required as usize);
        let check_quorum = async {
            if required <= 1 || skip_check {
                return Ok(());
            }
            count_active(replica, &client, required).await
        };
        let prepare = async {
            let quorum = QuorumAsk {
                required,
                mode,
                checked: !skip_check,
            };
            if rest.is_some() || stream::is_bulk(replica, request.format, &request.body) {
                let token = request.dedup_token.clone();
                let unsynced = quorum.required > 1;
                stream::prepare(replica, request.format, request.body, rest, unsynced)
                    .await
                    .map(|written| streamed_blocks(written, token.as_deref(), quorum))
                    .map_err(InsertError::from)
            } else if prepares_inline(replica, &request, required) {
                prepare_blocks(replica, request, quorum)
            } else {
                let replica = replica.clone();
                tokio::task::spawn_blocking(move || prepare_blocks(&replica, request, quorum))
                    .await
                    .map_err(|e| InsertError::Internal(e.to_string()))?
            }
        };
        let (checked, prepared_blocks) = tokio::join!(check_quorum, prepare);
        if let Err(e) = checked {
            for block in prepared_blocks.into_iter().flatten() {
                block.payload.discard(replica);
            }
            return Err(e);
        }
        let blocks = prepared_blocks?;
        let rows: u64 = blocks.iter().map(|b| b.rows).sum();
        let prepared = started.elapsed();
        let outcomes = committer.commit(blocks).await;
        debug!(
            prepare_us = prepared.as_micros() as u64,
            commit_us = (started.elapsed() - prepared).as_micros() as u64,
            "insert timing"
        );
        let outcomes = match outcomes {
            Ok(o) => o,
            Err(e) => {
                Metrics::inc(&replica.metrics.failed_inserts);
                return Err(e);
            }
        };
        if required > 1 {
            wait_for_quorum(replica, &outcomes, mode, required).await?;
        }
        let mut answer = InsertAnswer {
            parts: Vec::with_capacity(outcomes.len()),
            rows,
            deduplicated: !outcomes.is_empty()
                && outcomes
                    .iter()
                    .all(|o| matches!(o, BlockOutcome::Duplicate { .. })),
            deduplicated_parts: Vec::new(),
        };
        for o in outcomes {
            match o {
                BlockOutcome::Committed { part, .. } => answer.parts.push(part),
                BlockOutcome::Duplicate { part } => {
                    answer.parts.push(part.clone());
                    answer.deduplicated_parts.push(part);
                }
            }
        }
        if answer.deduplicated {
            answer.deduplicated_parts.clear();
            Metrics::inc(&replica.metrics.deduplicated_inserts);
        } else {
            Metrics::inc(&replica.metrics.inserts);
            Metrics::add(&replica.metrics.inserted_rows, rows);
        }
        Ok(answer)
    }
    .instrument(span)
    .await
}

impl From<stream::StreamError> for InsertError {
    fn from(e: stream::StreamError) -> InsertError {
        match e {
            stream::StreamError::Input(e) => InsertError::Input(e),
            stream::StreamError::TooLarge(m) => InsertError::TooLarge(m),
            stream::StreamError::Store(e) => InsertError::Store(e),
            stream::StreamError::Internal(m) => InsertError::Internal(m),
        }
    }
}

/// The blocks of a streamed body, each written part with the dedup id of its data (or of
/// the token and its index in the body).
fn streamed_blocks(
    written: Vec<stream::Written>,
    token: Option<&str>,
    ask: QuorumAsk,
) -> Vec<Block> {
    written
        .into_iter()
        .enumerate()
        .map(|(index, w)| {
            let hash = match token {
                Some(token) => hash::token_hash(token, index),
                None => w.temp.data_hash(),
            };
            Block {
                block_id: hash::block_id(&w.partition_id, hash),
                partition_id: w.partition_id,
                rows: w.rows,
                payload: Payload::Written(w.temp, w.unsynced),
                quorum: ask.required,
                quorum_mode: ask.mode,
                quorum_checked: ask.checked,
            }
        })
        .collect()
}

/// Fails a quorum insert at once when too few replicas are active to reach it.
async fn count_active(
    replica: &Replica,
    client: &zookeeper_client::Client,
    required: u32,
) -> Result<(), InsertError> {
    let active = quorum::active_replicas(replica, client)
        .await
        .map_err(|e| InsertError::Unavailable(e.to_string()))?;
    if active < required {
        return Err(InsertError::TooFewReplicas(too_few_replicas(
            active, required,
        )));
    }
    Ok(())
}

pub(crate) fn too_few_replicas(active: u32, required: u32) -> String {
    format!(
        "{active} active replicas, insert_quorum needs {required}; start replicas or lower insert_quorum"
    )
}

/// What an insert's quorum asks of its blocks.
#[derive(Clone, Copy)]
struct QuorumAsk {
    required: u32,
    mode: quorum::Mode,
    checked: bool,
}

/// Bodies up to this size are decoded on the request's own task.
const INLINE_PREPARE_MAX_BYTES: usize = 16 << 10;

/// A small insert whose blocks will be shared or encoded (no part written here, so no
/// disk I/O) is decoded where it arrived: tens of microseconds of work, where handing it
/// to a blocking thread and back costs two wake-ups, a millisecond or more on a busy
/// machine.
fn prepares_inline(replica: &Replica, request: &InsertRequest, quorum: u32) -> bool {
    // The decoded rows stay far below the shared-block limit (or, with a quorum, the
    // limit for encoding in memory), so none is written.
    let limit = if quorum <= 1 {
        replica.cfg.coalesce_max_bytes as u64
    } else {
        replica.cfg.push_max_bytes
    };
    request.body.len() <= INLINE_PREPARE_MAX_BYTES && limit >= 16 * INLINE_PREPARE_MAX_BYTES as u64
}

/// Decode, split by partition, sort, and write the large blocks as temporary parts.
/// Nothing here touches ZooKeeper, so bad input never changes the tree.
fn prepare_blocks(
    replica: &Replica,
    request: InsertRequest,
    ask: QuorumAsk,
) -> Result<Vec<Block>, InsertError> {
    let schema = &replica.table.schema;
    let batch = rows::decode(request.format, &request.body, schema)?;
    let partitions = rows::partition_split(&batch, schema)?;
    let mut blocks: Vec<Block> = Vec::with_capacity(partitions.len());
    for (index, (partition_id, part_batch)) in partitions.into_iter().enumerate() {
        match prepare_block(replica, &request, index, &part_batch, ask.required) {
            Ok((hash, payload)) => blocks.push(Block {
                block_id: hash::block_id(&partition_id, hash),
                partition_id,
                rows: part_batch.num_rows() as u64,
                payload,
                quorum: ask.required,
                quorum_mode: ask.mode,
                quorum_checked: ask.checked,
            }),
            Err(e) => {
                for b in blocks {
                    b.payload.discard(replica);
                }
                return Err(e);
            }
        }
    }
    Ok(blocks)
}

/// The dedup hash and payload of one partition's rows. A block is shared with other
/// inserts only when it is small and needs no quorum (a quorum is tracked per part and
/// its failure removes the part's one block id). Which way a block goes depends on its
/// data and the flags alone, so a retry gets the same block id.
fn prepare_block(
    replica: &Replica,
    request: &InsertRequest,
    index: usize,
    batch: &arrow::array::RecordBatch,
    quorum: u32,
) -> Result<(Hash128, Payload), InsertError> {
    let schema = &replica.table.schema;
    let shared = quorum <= 1 && batch.get_array_memory_size() <= replica.cfg.coalesce_max_bytes;
    // A quorum block small enough to hand off is encoded in memory (the same bytes and
    // so the same hash as written) and written by the committer once it has a number.
    if quorum > 1 && batch.get_array_memory_size() as u64 <= replica.cfg.push_max_bytes {
        let encoded = crate::store::encode(&replica.store, batch, schema)?;
        let hash = match &request.dedup_token {
            Some(token) => hash::token_hash(token, index),
            None => encoded.data_hash(),
        };
        return Ok((hash, Payload::Encoded(encoded)));
    }
    if !shared {
        // The writes sort by the ORDER BY themselves. A quorum insert is answered only
        // once peers hold the part, so its own fsyncs can run alongside the commit; a big
        // part without one is made durable first, so that a machine crash cannot lose it
        // after its commit for as long as a big fsync takes.
        let (temp, unsynced) = if quorum > 1 {
            let (temp, unsynced) =
                crate::store::write_temp_unsynced(&replica.store, batch, schema)?;
            (temp, Some(unsynced))
        } else {
            (
                crate::store::write_temp(&replica.store, batch, schema)?,
                None,
            )
        };
        let hash = match &request.dedup_token {
            Some(token) => hash::token_hash(token, index),
            None => temp.data_hash(),
        };
        return Ok((hash, Payload::Written(temp, unsynced)));
    }
    let sorted = crate::store::conform(&replica.store, batch, schema)?;
    let hash = match &request.dedup_token {
        Some(token) => hash::token_hash(token, index),
        None => rows::rows_hash(&sorted)
            .map_err(|e| InsertError::Internal(format!("hashing the rows: {e}")))?,
    };
    Ok((hash, Payload::Rows(sorted)))
}

/// Acknowledges a quorum insert only once every new part reached its quorum.
async fn wait_for_quorum(
    replica: &Replica,
    outcomes: &[BlockOutcome],
    mode: quorum::Mode,
    required: u32,
) -> Result<(), InsertError> {
    let timeout = replica.cfg.insert_quorum_timeout();
    let started = std::time::Instant::now();
    for o in outcomes {
        // One insert_quorum_timeout for the whole insert, however many parts it made.
        let left = timeout.saturating_sub(started.elapsed());
        let outcome = match o {
            BlockOutcome::Committed {
                quorum_reached: true,
                ..
            } => quorum::WaitOutcome::Reached,
            BlockOutcome::Committed { part, .. } => quorum::wait(replica, mode, part, left).await,
            // A retry is acknowledged on the same terms as the first attempt would have been.
            BlockOutcome::Duplicate { part } => {
                quorum::wait_existing(replica, mode, part, required, left).await
            }
        };
        let part = match o {
            BlockOutcome::Committed { part, .. } | BlockOutcome::Duplicate { part } => part,
        };
        match outcome {
            quorum::WaitOutcome::Reached => {}
            quorum::WaitOutcome::Failed => {
                Metrics::inc(&replica.metrics.quorum_failed_inserts);
                return Err(InsertError::QuorumFailed(part.clone()));
            }
            quorum::WaitOutcome::Unknown(reason) => {
                return Err(InsertError::OutcomeUnknown(reason));
            }
        }
    }
    Metrics::add(
        &replica.metrics.quorum_wait_micros,
        started.elapsed().as_micros() as u64,
    );
    Metrics::inc(&replica.metrics.quorum_inserts);
    Ok(())
}
