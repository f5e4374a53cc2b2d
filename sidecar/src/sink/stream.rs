//! Streaming inserts: a body bigger than one block (`--max-insert-block-rows`,
//! `--max-insert-block-bytes`) is decoded and written block by block as it arrives, each
//! block's partitions a temporary part with its own dedup id, so memory holds a few blocks
//! whatever the body's size. Up to [`IN_FLIGHT`] blocks are decoded, sorted and encoded
//! at once (on blocking threads) while the next one is read. Nothing touches ZooKeeper
//! here: the caller commits every block of the body together, so a bad row anywhere
//! commits nothing; on any failure every part written so far is removed.
//!
//! Block boundaries are a function of the body and the two limits alone (see
//! `rows::split` and `rows::ParquetBlocks`), so a retried body gets the same block ids.
//! A Parquet body (its footer comes last) is spooled to a file under `parts/` first.

use std::collections::VecDeque;
use std::path::{Path, PathBuf};
use std::pin::Pin;
use std::sync::Arc;

use bytes::{Bytes, BytesMut};
use futures::{Stream, StreamExt};
use tokio::io::AsyncWriteExt;
use tokio::task::JoinHandle;

use crate::replica::Replica;
use crate::rows::parquet_blocks::ParquetBlocks;
use crate::rows::{self, BlockSplitter, InputError, InputFormat, RowSyntax};
use crate::store::verify::Unsynced;
use crate::store::{StoreError, TempPart};

/// Why a streamed body was not written (nothing of it stays on disk).
#[derive(Debug, thiserror::Error)]
pub enum StreamError {
    #[error("{0}")]
    Input(#[from] InputError),
    /// The body exceeds `--max-insert-bytes`.
    #[error("{0}")]
    TooLarge(String),
    #[error("writing the part failed: {0}")]
    Store(#[from] StoreError),
    #[error("internal error: {0}")]
    Internal(String),
}

/// The rest of a body still arriving, after the bytes already read.
pub type BodyStream = Pin<Box<dyn Stream<Item = Result<Bytes, String>> + Send>>;

/// Blocks prepared at once: one per core of the machine this was measured on, more only
/// adds memory.
const IN_FLIGHT: usize = 2;

/// A whole Parquet body above this size is read block by block as well: its rows may be
/// many times its size.
const PARQUET_WHOLE_MAX_BYTES: usize = 1 << 20;

/// The file a spooled Parquet body is written to, inside its own `parts/tmp_*` directory.
const SPOOL_FILE: &str = "body.parquet";

/// Reads a body until it ends or exceeds `threshold` bytes: the bytes read, and what is
/// still to come when it did not end (the body then takes the streaming path).
pub async fn read_head<S, E>(
    mut body: S,
    threshold: usize,
) -> Result<(Bytes, Option<BodyStream>), String>
where
    S: Stream<Item = Result<Bytes, E>> + Send + Unpin + 'static,
    E: std::fmt::Display,
{
    let mut pieces: Vec<Bytes> = Vec::new();
    let mut total = 0usize;
    let ended = loop {
        match body.next().await {
            None => break true,
            Some(Err(e)) => return Err(e.to_string()),
            Some(Ok(piece)) => {
                total += piece.len();
                pieces.push(piece);
                if total > threshold {
                    break false;
                }
            }
        }
    };
    let head = match pieces.len() {
        1 => pieces.pop().unwrap_or_default(),
        _ => {
            let mut all = BytesMut::with_capacity(total);
            for p in &pieces {
                all.extend_from_slice(p);
            }
            all.freeze()
        }
    };
    let rest: Option<BodyStream> =
        (!ended).then(|| Box::pin(body.map(|r| r.map_err(|e| e.to_string()))) as BodyStream);
    Ok((head, rest))
}

/// Whether a whole body still takes the streaming path: it holds more than one block, or
/// it is Parquet and big enough that its rows may not fit in memory at once.
pub fn is_bulk(replica: &Replica, format: InputFormat, body: &[u8]) -> bool {
    let cfg = &replica.cfg;
    match syntax(format) {
        None => body.len() > PARQUET_WHOLE_MAX_BYTES,
        // Every row takes at least one byte: fewer bytes than the row limit is one block.
        Some(syntax) => {
            (body.len() > cfg.max_insert_block_rows || body.len() > cfg.max_insert_block_bytes)
                && BlockSplitter::new(
                    syntax,
                    cfg.max_insert_block_rows,
                    cfg.max_insert_block_bytes,
                )
                .next_cut(body)
                .is_some_and(|cut| cut.len < body.len())
        }
    }
}

fn syntax(format: InputFormat) -> Option<RowSyntax> {
    match format {
        InputFormat::JsonEachRow => Some(RowSyntax::Lines),
        InputFormat::Csv | InputFormat::CsvWithNames => Some(RowSyntax::Csv),
        InputFormat::Parquet => None,
    }
}

/// One partition of one block, written as a temporary part.
pub struct Written {
    pub partition_id: String,
    pub rows: u64,
    pub temp: TempPart,
    /// Its fsyncs, left to the commit (quorum inserts, as for a single block).
    pub unsynced: Option<Unsynced>,
}

/// Decodes, splits, sorts and writes the whole body (`head`, then `rest`) block by block;
/// the parts in body order. On failure nothing written stays behind.
pub async fn prepare(
    replica: &Arc<Replica>,
    format: InputFormat,
    head: Bytes,
    rest: Option<BodyStream>,
    unsynced: bool,
) -> Result<Vec<Written>, StreamError> {
    let mut pipeline = Pipeline {
        replica: replica.clone(),
        in_flight: VecDeque::new(),
        written: Vec::new(),
        unsynced,
    };
    let read = match syntax(format) {
        Some(syntax) => read_text(&mut pipeline, format, syntax, head, rest).await,
        None => read_parquet(&mut pipeline, head, rest).await,
    };
    let written = match read {
        Ok(()) => pipeline.finish().await,
        Err(e) => Err(e),
    };
    match written {
        Ok(w) if w.is_empty() => Err(InputError::empty_body().into()),
        Ok(w) => Ok(w),
        Err(e) => {
            pipeline.discard().await;
            Err(e)
        }
    }
}

/// Blocks being prepared on blocking threads, at most [`IN_FLIGHT`] at once, and the
/// parts of those done, in body order.
struct Pipeline {
    replica: Arc<Replica>,
    in_flight: VecDeque<JoinHandle<Result<Vec<Written>, StreamError>>>,
    written: Vec<Written>,
    /// A quorum insert's parts leave their fsyncs to the commit (as a single block's do).
    unsynced: bool,
}

impl Pipeline {
    /// Starts preparing one block once a slot is free.
    async fn submit(
        &mut self,
        job: impl FnOnce(&Replica, bool) -> Result<Vec<Written>, StreamError> + Send + 'static,
    ) -> Result<(), StreamError> {
        while self.in_flight.len() >= IN_FLIGHT {
            self.finish_oldest().await?;
        }
        let replica = self.replica.clone();
        let unsynced = self.unsynced;
        let span = tracing::Span::current();
        self.in_flight
            .push_back(tokio::task::spawn_blocking(move || {
                let _entered = span.enter();
                job(&replica, unsynced)
            }));
        Ok(())
    }

    async fn finish_oldest(&mut self) -> Result<(), StreamError> {
        let Some(handle) = self.in_flight.pop_front() else {
            return Ok(());
        };
        let parts = handle
            .await
            .map_err(|e| StreamError::Internal(format!("preparing an insert block: {e}")))??;
        self.written.extend(parts);
        Ok(())
    }

    async fn finish(&mut self) -> Result<Vec<Written>, StreamError> {
        while !self.in_flight.is_empty() {
            self.finish_oldest().await?;
        }
        Ok(std::mem::take(&mut self.written))
    }

    /// Waits for the blocks still in flight and removes every part written.
    async fn discard(mut self) {
        while let Some(handle) = self.in_flight.pop_front() {
            if let Ok(Ok(parts)) = handle.await {
                self.written.extend(parts);
            }
        }
        for w in self.written {
            self.replica.store.discard_temp(w.temp);
        }
    }
}

/// Splits a text body into blocks as it arrives and submits each.
async fn read_text(
    pipeline: &mut Pipeline,
    format: InputFormat,
    syntax: RowSyntax,
    head: Bytes,
    mut rest: Option<BodyStream>,
) -> Result<(), StreamError> {
    let cfg = &pipeline.replica.cfg;
    let (max_rows, max_bytes, limit) = (
        cfg.max_insert_block_rows,
        cfg.max_insert_block_bytes,
        cfg.max_insert_bytes,
    );
    // Room for a block and the piece of body that completes it, so it rarely regrows.
    let capacity = max_bytes.saturating_add(1 << 20).min(256 << 20);
    let mut pending = BytesMut::with_capacity(capacity.max(head.len()));
    pending.extend_from_slice(&head);
    drop(head);
    let mut total = pending.len() as u64;
    // 1-based line of the body where `pending` starts.
    let mut line = 1usize;
    // CSVWithNames: the header row, sent again in front of every block.
    let mut header: Option<(Bytes, usize)> = None;
    if format == InputFormat::CsvWithNames {
        let mut splitter = BlockSplitter::new(syntax, 1, 1);
        loop {
            if let Some(cut) = splitter.next_cut(&pending) {
                header = Some((pending.split_to(cut.len).freeze(), cut.lines));
                line += cut.lines;
                break;
            }
            match next_piece(&mut rest, &mut total, limit).await? {
                Some(piece) => pending.extend_from_slice(&piece),
                None => break,
            }
        }
        if header.is_none() {
            // The body is its header alone (or less): the whole-body decoder says why.
            let whole = pending.split().freeze();
            return submit_text(pipeline, format, whole, 0).await;
        }
    }
    let mut splitter = BlockSplitter::new(syntax, max_rows, max_bytes);
    loop {
        while let Some(cut) = splitter.next_cut(&pending) {
            let mut next = BytesMut::with_capacity(capacity);
            next.extend_from_slice(&pending[cut.len..]);
            pending.truncate(cut.len);
            let block = std::mem::replace(&mut pending, next).freeze();
            submit_block(pipeline, format, block, line, header.as_ref()).await?;
            line += cut.lines;
        }
        match next_piece(&mut rest, &mut total, limit).await? {
            Some(piece) => pending.extend_from_slice(&piece),
            None => break,
        }
    }
    if !pending.is_empty() {
        submit_block(pipeline, format, pending.freeze(), line, header.as_ref()).await?;
    }
    Ok(())
}

/// The next piece of the body, refusing a body over `--max-insert-bytes`.
async fn next_piece(
    rest: &mut Option<BodyStream>,
    total: &mut u64,
    limit: u64,
) -> Result<Option<Bytes>, StreamError> {
    let Some(stream) = rest.as_mut() else {
        return Ok(None);
    };
    match stream.next().await {
        None => {
            *rest = None;
            Ok(None)
        }
        Some(Err(e)) => Err(InputError::new(format!("cannot read the body: {e}")).into()),
        Some(Ok(piece)) => {
            *total += piece.len() as u64;
            if *total > limit {
                return Err(StreamError::TooLarge(format!(
                    "the body is larger than the {limit}-byte limit (--max-insert-bytes); split the insert or raise the limit"
                )));
            }
            Ok(Some(piece))
        }
    }
}

/// Submits one block starting at `line`; blank blocks (trailing newlines) are skipped.
async fn submit_block(
    pipeline: &mut Pipeline,
    format: InputFormat,
    block: Bytes,
    line: usize,
    header: Option<&(Bytes, usize)>,
) -> Result<(), StreamError> {
    if block.iter().all(u8::is_ascii_whitespace) {
        return Ok(());
    }
    match header {
        None => submit_text(pipeline, format, block, line - 1).await,
        Some((header, header_lines)) => {
            let mut with_header = BytesMut::with_capacity(header.len() + block.len());
            with_header.extend_from_slice(header);
            with_header.extend_from_slice(&block);
            drop(block);
            let shift = line - 1 - header_lines;
            submit_text(pipeline, format, with_header.freeze(), shift).await
        }
    }
}

async fn submit_text(
    pipeline: &mut Pipeline,
    format: InputFormat,
    block: Bytes,
    shift: usize,
) -> Result<(), StreamError> {
    pipeline
        .submit(move |replica, unsynced| {
            let batch = rows::decode_block(format, &block, &replica.table.schema, shift)?;
            drop(block);
            write_partitions(replica, batch, unsynced)
        })
        .await
}

/// Writes one decoded block: one temporary part per partition.
fn write_partitions(
    replica: &Replica,
    batch: arrow::array::RecordBatch,
    unsynced: bool,
) -> Result<Vec<Written>, StreamError> {
    let schema = &replica.table.schema;
    let partitions = rows::partition_split(&batch, schema)?;
    drop(batch);
    let mut written: Vec<Written> = Vec::with_capacity(partitions.len());
    for (partition_id, rows) in partitions {
        // Sorted here so the decoded rows are freed before the part is encoded (the
        // writer leaves sorted rows as they are).
        let sorted = rows::sort_by_key(&rows, &schema.order_by);
        drop(rows);
        let rows = match sorted {
            Ok(sorted) => sorted,
            Err(e) => {
                for w in written {
                    replica.store.discard_temp(w.temp);
                }
                return Err(StreamError::Internal(format!(
                    "sorting an insert block: {e}"
                )));
            }
        };
        let result = if unsynced {
            crate::store::write_temp_unsynced(&replica.store, &rows, schema)
                .map(|(t, u)| (t, Some(u)))
        } else {
            crate::store::write_temp(&replica.store, &rows, schema).map(|t| (t, None))
        };
        match result {
            Ok((temp, unsynced)) => written.push(Written {
                partition_id,
                rows: rows.num_rows() as u64,
                temp,
                unsynced,
            }),
            Err(e) => {
                for w in written {
                    replica.store.discard_temp(w.temp);
                }
                return Err(e.into());
            }
        }
    }
    Ok(written)
}

/// A Parquet body: held as is when whole, otherwise spooled to a file; then read block by
/// block on one blocking thread while earlier blocks are written.
async fn read_parquet(
    pipeline: &mut Pipeline,
    head: Bytes,
    rest: Option<BodyStream>,
) -> Result<(), StreamError> {
    let replica = pipeline.replica.clone();
    let cfg = &replica.cfg;
    let (max_rows, max_bytes) = (cfg.max_insert_block_rows, cfg.max_insert_block_bytes);
    let schema = replica.table.schema.clone();
    let spool = match rest {
        None => None,
        Some(rest) => Some(Spool::write(&replica, head.clone(), rest).await?),
    };
    let opened = match &spool {
        None => ParquetBlocks::open(head, &schema, max_rows, max_bytes),
        Some(spool) => {
            let path = spool.file.clone();
            let file = std::fs::File::open(&path)
                .map_err(|e| StoreError::io("opening the spooled body", &path, e))?;
            ParquetBlocks::open(file, &schema, max_rows, max_bytes)
        }
    };
    let mut blocks = Some(opened?);
    loop {
        let Some(mut reader) = blocks.take() else {
            break;
        };
        let (reader, next) = tokio::task::spawn_blocking(move || {
            let next = reader.next_block();
            (reader, next)
        })
        .await
        .map_err(|e| StreamError::Internal(format!("reading a Parquet body: {e}")))?;
        let Some(next) = next else {
            break;
        };
        let (batch, _shift) = next?;
        blocks = Some(reader);
        pipeline
            .submit(move |replica, unsynced| write_partitions(replica, batch, unsynced))
            .await?;
    }
    drop(spool);
    Ok(())
}

/// A body written to `parts/tmp_insert-body_*/body.parquet`, removed when dropped.
struct Spool {
    dir: PathBuf,
    file: PathBuf,
}

impl Spool {
    async fn write(replica: &Replica, head: Bytes, rest: BodyStream) -> Result<Spool, StreamError> {
        let dir = replica.store.new_tmp_dir("insert-body")?;
        let spool = Spool {
            file: dir.join(SPOOL_FILE),
            dir,
        };
        let limit = replica.cfg.max_insert_bytes;
        let io = |e: std::io::Error, path: &Path| StoreError::io("spooling the body to", path, e);
        let file = tokio::fs::File::create(&spool.file)
            .await
            .map_err(|e| io(e, &spool.file))?;
        let mut out = tokio::io::BufWriter::with_capacity(1 << 20, file);
        out.write_all(&head).await.map_err(|e| io(e, &spool.file))?;
        let mut total = head.len() as u64;
        drop(head);
        let mut rest = Some(rest);
        while let Some(piece) = next_piece(&mut rest, &mut total, limit).await? {
            out.write_all(&piece)
                .await
                .map_err(|e| io(e, &spool.file))?;
        }
        out.flush().await.map_err(|e| io(e, &spool.file))?;
        Ok(spool)
    }
}

impl Drop for Spool {
    fn drop(&mut self) {
        if let Err(e) = std::fs::remove_dir_all(&self.dir) {
            tracing::warn!(dir = %self.dir.display(), error = %e, "removing a spooled insert body");
        }
    }
}
