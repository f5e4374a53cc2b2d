//! The insert path (ClickHouse's ReplicatedMergeTreeSink): decode and validate the body,
//! write one temporary part per partition, compute each block's dedup id, and hand the
//! blocks to the group committer, which allocates block numbers and commits them to
//! ZooKeeper together with other concurrent inserts.

pub mod committer;

use std::sync::Arc;

use bytes::Bytes;
use serde::Serialize;
use tracing::{Instrument, info_span};

use rtable_protocol::hash::{self, Hash128};

use crate::metrics::Metrics;
use crate::parts::{StoreError, TempPart};
use crate::replica::Replica;
use crate::rows::{self, InputError, InputFormat};

pub use committer::Committer;

/// One partition's share of an insert, written to a temporary part.
pub struct Block {
    pub partition_id: String,
    pub block_id: String,
    pub rows: u64,
    pub temp: TempPart,
}

/// What happened to one block.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum BlockOutcome {
    Committed {
        part: String,
    },
    /// An earlier insert with the same dedup id committed `part`.
    Duplicate {
        part: String,
    },
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
            | InsertError::OutcomeUnknown(_) => 503,
            InsertError::Store(_) | InsertError::Internal(_) => 500,
        }
    }
}

pub struct InsertRequest {
    pub format: InputFormat,
    pub body: Bytes,
    pub dedup_token: Option<String>,
}

pub async fn insert(
    replica: &Arc<Replica>,
    committer: &Committer,
    request: InsertRequest,
) -> Result<InsertAnswer, InsertError> {
    let span = info_span!("insert", replica = %replica.name, bytes = request.body.len());
    async move {
        // Refuse early: a read-only replica should not even write temporary parts.
        replica
            .sessions
            .active()
            .map_err(|e| InsertError::ReadOnly(e.reason))?;
        let blocks = {
            let replica = replica.clone();
            tokio::task::spawn_blocking(move || prepare_blocks(&replica, request))
                .await
                .map_err(|e| InsertError::Internal(e.to_string()))??
        };
        let rows: u64 = blocks.iter().map(|b| b.rows).sum();
        let outcomes = committer.commit(blocks).await;
        let outcomes = match outcomes {
            Ok(o) => o,
            Err(e) => {
                Metrics::inc(&replica.metrics.failed_inserts);
                return Err(e);
            }
        };
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
                BlockOutcome::Committed { part } => answer.parts.push(part),
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

/// Decode, split by partition, sort, write temporary parts. Nothing here touches
/// ZooKeeper, so bad input never changes the tree.
fn prepare_blocks(replica: &Replica, request: InsertRequest) -> Result<Vec<Block>, InsertError> {
    let schema = &replica.table.schema;
    let batch = rows::decode(request.format, &request.body, schema)?;
    let partitions = rows::partition_split(&batch, schema)?;
    let mut blocks = Vec::with_capacity(partitions.len());
    for (index, (partition_id, part_batch)) in partitions.into_iter().enumerate() {
        let sorted = rows::sort_by_key(&part_batch, &schema.order_by).map_err(|e| {
            InsertError::Internal(format!("sorting by {}: {e}", schema.order_by_expr()))
        })?;
        let temp = crate::parts::part_writer::write_temp(&replica.store, &sorted, schema)?;
        let hash: Hash128 = match &request.dedup_token {
            Some(token) => hash::token_hash(token, index),
            None => temp.data_hash(),
        };
        blocks.push(Block {
            block_id: hash::block_id(&partition_id, hash),
            partition_id,
            rows: sorted.num_rows() as u64,
            temp,
        });
    }
    Ok(blocks)
}
