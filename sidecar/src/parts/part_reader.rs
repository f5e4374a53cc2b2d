//! Reads a part's rows back, batch by batch.

use arrow::record_batch::RecordBatch;
use parquet::arrow::arrow_reader::{ParquetRecordBatchReader, ParquetRecordBatchReaderBuilder};

use super::{ActivePart, DATA_FILE, StoreError, io};

pub fn read_part_batches(part: &ActivePart) -> Result<ParquetRecordBatchReader, StoreError> {
    let path = part.dir.join(DATA_FILE);
    let file = std::fs::File::open(&path).map_err(io("open", &path))?;
    let parquet_error = |e: parquet::errors::ParquetError| StoreError::Parquet {
        path: path.clone(),
        message: e.to_string(),
    };
    ParquetRecordBatchReaderBuilder::try_new(file)
        .map_err(parquet_error)?
        .with_batch_size(8192)
        .build()
        .map_err(parquet_error)
}

pub fn read_part(part: &ActivePart) -> Result<Vec<RecordBatch>, StoreError> {
    let path = part.dir.join(DATA_FILE);
    read_part_batches(part)?
        .map(|b| {
            b.map_err(|e| StoreError::Parquet {
                path: path.clone(),
                message: e.to_string(),
            })
        })
        .collect()
}
