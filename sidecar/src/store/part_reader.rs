//! Reading a part's rows back, with the table's columns.
//!
//! Every reader of a part's rows (`/select`, the local merge) goes through
//! [`read_part_batches`], which hands out batches with exactly the columns asked for: a
//! part written before columns were appended to the table gets them filled (NULL for
//! `Nullable(T)`, else the type's default, as ClickHouse fills columns missing in old
//! parts), and a part written with columns appended after the ones asked for (by a replica
//! already running a newer definition) has them dropped. See `rows::conform_to`.

use std::fs::File;
use std::path::PathBuf;

use arrow::array::RecordBatch;
use arrow::datatypes::SchemaRef;
use parquet::arrow::arrow_reader::{ParquetRecordBatchReader, ParquetRecordBatchReaderBuilder};

use super::{ActivePart, DATA_FILE, StoreError};
use crate::rows::{check_prefix, conform_to, from_storage, memory_schema};

/// The batches of one part, read lazily (8192 rows at a time), with in-memory types
/// (DateTime in seconds, see `rows::from_storage`) and the columns of the schema given to
/// [`read_part_batches`].
pub struct PartBatches {
    path: PathBuf,
    reader: ParquetRecordBatchReader,
    target: SchemaRef,
}

impl Iterator for PartBatches {
    type Item = Result<RecordBatch, StoreError>;

    fn next(&mut self) -> Option<Self::Item> {
        self.reader.next().map(|r| {
            r.and_then(|b| from_storage(&b))
                .and_then(|b| conform_to(&b, &self.target))
                .map_err(|e| StoreError::arrow("reading", &self.path, e))
        })
    }
}

/// Opens a part for streaming, its rows seen with the columns of `table` (in-memory Arrow
/// types, e.g. `rows::arrow_schema(&table_schema)`). Fails at once when the part's columns
/// are neither a prefix nor an extension of `table`'s. Hold the part's `Arc` (a
/// [`super::Snapshot`]) while reading.
pub fn read_part_batches(part: &ActivePart, table: &SchemaRef) -> Result<PartBatches, StoreError> {
    let path = part.dir.join(DATA_FILE);
    let file = File::open(&path).map_err(|e| StoreError::io("opening", &path, e))?;
    let builder = ParquetRecordBatchReaderBuilder::try_new(file)
        .map_err(|e| StoreError::parquet("opening", &path, e))?;
    let columns = memory_schema(builder.schema());
    check_prefix(columns.fields(), table.fields())
        .map_err(|e| StoreError::arrow("reading", &path, e))?;
    let reader = builder
        .build()
        .map_err(|e| StoreError::parquet("opening", &path, e))?;
    Ok(PartBatches {
        path,
        reader,
        target: table.clone(),
    })
}

/// All rows of a part, with the columns of `table` (see [`read_part_batches`]).
pub fn read_part(part: &ActivePart, table: &SchemaRef) -> Result<Vec<RecordBatch>, StoreError> {
    read_part_batches(part, table)?.collect()
}

/// The columns the part's file holds (in-memory Arrow types), read from its footer.
pub fn part_columns(part: &ActivePart) -> Result<SchemaRef, StoreError> {
    columns_in(&part.dir)
}

/// The columns of the data file in a part directory (installed or still downloading).
pub fn columns_in(dir: &std::path::Path) -> Result<SchemaRef, StoreError> {
    let path = dir.join(DATA_FILE);
    let file = File::open(&path).map_err(|e| StoreError::io("opening", &path, e))?;
    let builder = ParquetRecordBatchReaderBuilder::try_new(file)
        .map_err(|e| StoreError::parquet("opening", &path, e))?;
    Ok(memory_schema(builder.schema()))
}

#[cfg(test)]
mod tests {
    use std::sync::Arc;

    use rtable_protocol::PartName;
    use rtable_protocol::schema::{Column, TableSchema};

    use super::*;
    use crate::rows::{self, InputFormat, OutputFormat};
    use crate::store::{PartStore, write_temp};

    fn col(name: &str, ty: &str) -> Column {
        Column {
            name: name.into(),
            ty: ty.parse().expect("type"),
        }
    }

    fn schema(columns: Vec<Column>) -> TableSchema {
        TableSchema::new(
            columns,
            vec!["id".into()],
            "tuple()".parse().expect("partition key"),
        )
        .expect("schema")
    }

    fn old_table() -> TableSchema {
        schema(vec![col("id", "UInt64"), col("msg", "Nullable(String)")])
    }

    /// The old table with one column of every kind appended.
    fn new_table() -> TableSchema {
        let mut columns = old_table().columns;
        columns.extend([
            col("note", "Nullable(String)"),
            col("score", "UInt32"),
            col("delta", "Int64"),
            col("ratio", "Float64"),
            col("name", "String"),
            col("flag", "Bool"),
            col("day", "Date"),
            col("at", "DateTime"),
            col("maybe_at", "Nullable(DateTime)"),
        ]);
        schema(columns)
    }

    fn part(store: &PartStore, name: &str, body: &str, table: &TableSchema) -> Arc<ActivePart> {
        let batch = rows::decode(InputFormat::JsonEachRow, body.as_bytes(), table).expect("rows");
        let temp = write_temp(store, &batch, table).expect("write");
        let name: PartName = name.parse().expect("part name");
        store.commit_temp(temp, &name).expect("commit")
    }

    /// What `/select?format=JSONEachRow` sends for these batches.
    fn json(batches: &[RecordBatch]) -> String {
        let mut out = Vec::new();
        for (i, b) in batches.iter().enumerate() {
            rows::encode_text(OutputFormat::JsonEachRow, b, &mut out, i == 0).expect("encode");
        }
        String::from_utf8(out).expect("utf-8")
    }

    #[test]
    fn a_part_written_before_columns_were_appended_reads_with_nulls_and_defaults() {
        let dir = tempfile::tempdir().expect("tempdir");
        let (store, _) = PartStore::open(dir.path()).expect("store");
        let old = part(
            &store,
            "all_1_1_0",
            "{\"id\": 1, \"msg\": \"a\"}\n{\"id\": 2, \"msg\": null}\n",
            &old_table(),
        );
        let table = rows::arrow_schema(&new_table());
        let batches = read_part(&old, &table).expect("read with the new columns");
        assert!(batches.iter().all(|b| b.schema() == table));
        assert_eq!(
            json(&batches),
            "{\"id\":1,\"msg\":\"a\",\"note\":null,\"score\":0,\"delta\":0,\"ratio\":0.0,\"name\":\"\",\"flag\":false,\"day\":\"1970-01-01\",\"at\":\"1970-01-01 00:00:00\",\"maybe_at\":null}\n\
             {\"id\":2,\"msg\":null,\"note\":null,\"score\":0,\"delta\":0,\"ratio\":0.0,\"name\":\"\",\"flag\":false,\"day\":\"1970-01-01\",\"at\":\"1970-01-01 00:00:00\",\"maybe_at\":null}\n"
        );
        // Read with the columns it was written with, it is unchanged.
        let same = read_part(&old, &rows::arrow_schema(&old_table())).expect("read");
        assert_eq!(
            json(&same),
            "{\"id\":1,\"msg\":\"a\"}\n{\"id\":2,\"msg\":null}\n"
        );
    }

    #[test]
    fn a_part_with_appended_columns_reads_without_them_on_an_older_definition() {
        let dir = tempfile::tempdir().expect("tempdir");
        let (store, _) = PartStore::open(dir.path()).expect("store");
        let new = part(
            &store,
            "all_1_1_0",
            "{\"id\": 7, \"msg\": \"x\", \"note\": \"n\", \"score\": 3, \"delta\": -1, \"ratio\": 0.5, \"name\": \"z\", \"flag\": true, \"day\": \"2024-05-01\", \"at\": \"2024-05-01 10:00:00\", \"maybe_at\": null}\n",
            &new_table(),
        );
        let batches = read_part(&new, &rows::arrow_schema(&old_table())).expect("read");
        assert_eq!(json(&batches), "{\"id\":7,\"msg\":\"x\"}\n");
        assert_eq!(part_columns(&new).expect("columns").fields().len(), 11);
    }

    #[test]
    fn a_part_whose_columns_are_not_a_prefix_is_refused() {
        let dir = tempfile::tempdir().expect("tempdir");
        let (store, _) = PartStore::open(dir.path()).expect("store");
        let old = part(
            &store,
            "all_1_1_0",
            "{\"id\": 1, \"msg\": \"a\"}\n",
            &old_table(),
        );
        for other in [
            schema(vec![col("id", "UInt64"), col("msg", "String")]),
            schema(vec![col("id", "UInt64"), col("text", "Nullable(String)")]),
            schema(vec![
                col("id", "UInt64"),
                col("extra", "UInt8"),
                col("msg", "Nullable(String)"),
            ]),
        ] {
            let err = read_part_batches(&old, &rows::arrow_schema(&other))
                .err()
                .expect("refused");
            assert!(err.to_string().contains("prefix"), "{err}");
        }
    }
}
