//! A Parquet body read block by block (ClickHouse's `max_insert_block_size` for Parquet):
//! blocks of at most `max_rows` rows, closed early once they hold `max_bytes` of decoded
//! rows, in the file's row order. The cut depends on the file and the limits alone, so a
//! retried body deduplicates block by block. Memory holds one block and the row group
//! being read (its size is the writer's choice).

use arrow::array::RecordBatch;
use arrow::compute::concat_batches;
use arrow::datatypes::SchemaRef;
use parquet::arrow::arrow_reader::{ParquetRecordBatchReader, ParquetRecordBatchReaderBuilder};
use parquet::file::reader::ChunkReader;
use rtable_protocol::schema::TableSchema;

use super::decode::{not_parquet, parquet_rows, parquet_sources};
use super::error::InputError;

/// Rows decoded at a time; a block gathers several.
const READ_ROWS: usize = 8192;

pub struct ParquetBlocks {
    reader: ParquetRecordBatchReader,
    file_schema: SchemaRef,
    sources: Vec<usize>,
    schema: TableSchema,
    max_rows: usize,
    max_bytes: usize,
    /// Rows of the body before the next block (errors name rows of the whole body).
    rows_before: usize,
    /// Rows read past the previous block's end.
    carry: Option<RecordBatch>,
    finished: bool,
}

impl ParquetBlocks {
    /// Checks the file's columns against the table before any row is read.
    pub fn open<R: ChunkReader + 'static>(
        file: R,
        schema: &TableSchema,
        max_rows: usize,
        max_bytes: usize,
    ) -> Result<ParquetBlocks, InputError> {
        let max_rows = max_rows.max(1);
        let builder =
            ParquetRecordBatchReaderBuilder::try_new(file).map_err(|e| not_parquet(&e))?;
        let file_schema = builder.schema().clone();
        let sources = parquet_sources(&file_schema, schema)?;
        let reader = builder
            .with_batch_size(READ_ROWS.min(max_rows))
            .build()
            .map_err(|e| not_parquet(&e))?;
        Ok(ParquetBlocks {
            reader,
            file_schema,
            sources,
            schema: schema.clone(),
            max_rows,
            max_bytes: max_bytes.max(1),
            rows_before: 0,
            carry: None,
            finished: false,
        })
    }

    /// The next block, converted to the table's schema and checked, with the number of
    /// rows of the body before it; `None` after the last.
    pub fn next_block(&mut self) -> Option<Result<(RecordBatch, usize), InputError>> {
        let mut taken: Vec<RecordBatch> = Vec::new();
        let (mut rows, mut bytes) = (0usize, 0usize);
        while rows < self.max_rows && bytes < self.max_bytes {
            let batch = match self.carry.take() {
                Some(b) => b,
                None if self.finished => break,
                None => match self.reader.next() {
                    Some(Ok(b)) => b,
                    Some(Err(e)) => return Some(Err(not_parquet(&e))),
                    None => {
                        self.finished = true;
                        break;
                    }
                },
            };
            let room = self.max_rows - rows;
            let batch = if batch.num_rows() > room {
                self.carry = Some(batch.slice(room, batch.num_rows() - room));
                batch.slice(0, room)
            } else {
                batch
            };
            rows += batch.num_rows();
            bytes += batch.get_array_memory_size();
            taken.push(batch);
        }
        if rows == 0 {
            return None;
        }
        let shift = self.rows_before;
        self.rows_before += rows;
        let block = concat_batches(&self.file_schema, &taken)
            .map_err(|e| not_parquet(&e))
            .and_then(|whole| parquet_rows(&whole, &self.sources, &self.schema, shift));
        Some(block.map(|b| (b, shift)))
    }
}
