//! `/select`: streams one consistent snapshot of the active parts. The snapshot pins the
//! parts (a merged-away part's files outlive it), and encoding runs on a blocking thread
//! that hands chunks to the response through a small channel, so memory stays bounded.

use std::collections::BTreeMap;
use std::io::Write;
use std::sync::Arc;

use bytes::Bytes;
use futures::Stream;
use tokio::sync::mpsc;
use tracing::warn;

use crate::replica::Replica;
use crate::rows::{self, OutputFormat};
use crate::store::{ActivePart, part_reader};

const CHUNK: usize = 256 * 1024;

type Chunk = Result<Bytes, std::io::Error>;

/// `visible`: for sequential consistency, the highest quorum-confirmed block per
/// partition; parts above it (and partitions without one) are hidden.
pub fn stream(
    replica: Arc<Replica>,
    format: OutputFormat,
    visible: Option<BTreeMap<String, u64>>,
) -> impl Stream<Item = Chunk> {
    let (tx, rx) = mpsc::channel::<Chunk>(4);
    tokio::task::spawn_blocking(move || {
        if let Err(e) = produce(&replica, format, visible.as_ref(), &tx) {
            warn!(replica = %replica.name, error = %e, "select aborted");
            let _ = tx.blocking_send(Err(std::io::Error::other(e)));
        }
    });
    tokio_stream_from(rx)
}

fn tokio_stream_from(mut rx: mpsc::Receiver<Chunk>) -> impl Stream<Item = Chunk> {
    futures::stream::poll_fn(move |cx| rx.poll_recv(cx))
}

/// Sends bytes written to it as response chunks.
struct ChannelWriter<'a> {
    tx: &'a mpsc::Sender<Chunk>,
    buf: Vec<u8>,
}

impl ChannelWriter<'_> {
    fn send(&mut self) -> std::io::Result<()> {
        if self.buf.is_empty() {
            return Ok(());
        }
        let chunk = Bytes::from(std::mem::take(&mut self.buf));
        self.tx
            .blocking_send(Ok(chunk))
            .map_err(|_| std::io::Error::new(std::io::ErrorKind::BrokenPipe, "client went away"))
    }
}

impl Write for ChannelWriter<'_> {
    fn write(&mut self, data: &[u8]) -> std::io::Result<usize> {
        self.buf.extend_from_slice(data);
        if self.buf.len() >= CHUNK {
            self.send()?;
        }
        Ok(data.len())
    }

    fn flush(&mut self) -> std::io::Result<()> {
        self.send()
    }
}

fn produce(
    replica: &Replica,
    format: OutputFormat,
    visible: Option<&BTreeMap<String, u64>>,
    tx: &mpsc::Sender<Chunk>,
) -> Result<(), String> {
    let parts = pinned(replica, visible);
    // A part that cannot be read is reported for a check (it may be damaged on disk).
    let damaged = |part: &crate::store::ActivePart, e: &dyn std::fmt::Display| {
        let message = format!("reading part {}: {e}", part.name);
        replica
            .part_check
            .report(&replica.name, &part.name, &message);
        message
    };
    let mut out = ChannelWriter {
        tx,
        buf: Vec::with_capacity(CHUNK),
    };
    // Parts written before a column was appended are read with it filled in (and parts of
    // a newer definition without the columns this replica does not know yet).
    let table = rows::arrow_schema(&replica.table.schema);
    match format {
        OutputFormat::Parquet => {
            let mut writer =
                rows::ParquetOutput::new(&mut out, table.clone()).map_err(|e| e.to_string())?;
            for part in &parts {
                for batch in
                    part_reader::read_part_batches(part, &table).map_err(|e| damaged(part, &e))?
                {
                    writer
                        .write(&batch.map_err(|e| damaged(part, &e))?)
                        .map_err(|e| e.to_string())?;
                }
            }
            writer.finish().map_err(|e| e.to_string())?;
        }
        text => {
            let mut first = true;
            let mut buf = Vec::with_capacity(CHUNK);
            for part in &parts {
                for batch in
                    part_reader::read_part_batches(part, &table).map_err(|e| damaged(part, &e))?
                {
                    rows::encode_text(
                        text,
                        &batch.map_err(|e| damaged(part, &e))?,
                        &mut buf,
                        first,
                    )
                    .map_err(|e| e.to_string())?;
                    first = false;
                    if buf.len() >= CHUNK {
                        out.write_all(&buf).map_err(|e| e.to_string())?;
                        buf.clear();
                    }
                }
            }
            if first {
                // No rows: CSVWithNames still owes the header.
                let empty = arrow::record_batch::RecordBatch::new_empty(table.clone());
                rows::encode_text(text, &empty, &mut buf, true).map_err(|e| e.to_string())?;
            }
            out.write_all(&buf).map_err(|e| e.to_string())?;
        }
    }
    out.flush().map_err(|e| e.to_string())
}

/// The parts a read sees, pinned (their files stay while the `Arc`s live): one consistent
/// snapshot of the active parts, without those above `visible` (see [`stream`]).
pub fn pinned(replica: &Replica, visible: Option<&BTreeMap<String, u64>>) -> Vec<Arc<ActivePart>> {
    let mut parts = replica.store.snapshot().parts;
    if let Some(map) = visible {
        parts.retain(|p| {
            map.get(&p.name.partition_id)
                .is_some_and(|max| p.name.max_block <= *max)
        });
    }
    parts
}

/// The sequential-consistency view: refuses when this replica lacks a part that reached
/// its quorum (REPLICA_IS_NOT_IN_QUORUM), else returns the visible block per partition.
pub async fn quorum_view(replica: &Replica) -> Result<BTreeMap<String, u64>, String> {
    let (client, _) = replica.sessions.active().map_err(|e| e.reason)?;
    let last = crate::quorum::last_parts(replica, &client)
        .await
        .map_err(|e| e.to_string())?;
    let mut visible = BTreeMap::new();
    for (partition, part) in last.parts {
        let name = rtable_protocol::PartName::parse(&part).map_err(|e| e.to_string())?;
        if replica.store.covering(&name).is_none() {
            return Err(format!(
                "REPLICA_IS_NOT_IN_QUORUM: replica {} does not have part {part} yet; retry or read from another replica",
                replica.name
            ));
        }
        visible.insert(partition, name.max_block);
    }
    Ok(visible)
}
