//! Reading a part's rows back.

use std::fs::File;
use std::path::PathBuf;

use arrow::array::RecordBatch;
use parquet::arrow::arrow_reader::{ParquetRecordBatchReader, ParquetRecordBatchReaderBuilder};

use super::{ActivePart, DATA_FILE, StoreError};
use crate::rows::from_storage;

/// The batches of one part, read lazily (8192 rows at a time), with in-memory types
/// (DateTime in seconds, see `rows::from_storage`).
pub struct PartBatches {
    path: PathBuf,
    reader: ParquetRecordBatchReader,
}

impl Iterator for PartBatches {
    type Item = Result<RecordBatch, StoreError>;

    fn next(&mut self) -> Option<Self::Item> {
        self.reader.next().map(|r| {
            r.and_then(|b| from_storage(&b))
                .map_err(|e| StoreError::arrow("reading", &self.path, e))
        })
    }
}

/// Opens a part for streaming. Hold the part's `Arc` (a [`super::Snapshot`]) while reading.
pub fn read_part_batches(part: &ActivePart) -> Result<PartBatches, StoreError> {
    let path = part.dir.join(DATA_FILE);
    let file = File::open(&path).map_err(|e| StoreError::io("opening", &path, e))?;
    let reader = ParquetRecordBatchReaderBuilder::try_new(file)
        .and_then(|b| b.build())
        .map_err(|e| StoreError::parquet("opening", &path, e))?;
    Ok(PartBatches { path, reader })
}

/// All rows of a part.
pub fn read_part(part: &ActivePart) -> Result<Vec<RecordBatch>, StoreError> {
    read_part_batches(part)?.collect()
}
