//! Row codecs: client bodies (JSONEachRow, CSV, CSVWithNames, Parquet) to Arrow record batches
//! validated against the table schema, the partition split and sort of an insert, and the
//! encoders of `/select`. Pure: no I/O beyond the buffers handed in.
//!
//! Type mapping (ClickHouse -> Arrow), fixed because it is also the schema of every part's
//! `data.parquet`:
//!
//! | ClickHouse | Arrow |
//! |---|---|
//! | UInt8..UInt64, Int8..Int64 | UInt8..UInt64, Int8..Int64 |
//! | Float32, Float64 | Float32, Float64 |
//! | String | Utf8 |
//! | Bool | Boolean |
//! | Date | Date32 (days since 1970-01-01) |
//! | DateTime | Timestamp(Second, Some("UTC")) |
//! | Nullable(T) | nullable field of T (every other field is non-nullable) |
//!
//! DateTime carries the `UTC` time zone so external readers (pyarrow, DuckDB, Polars) see
//! instants, not wall-clock times; ClickHouse stores DateTime as UTC seconds as well.
//! Build DateTime arrays with `TimestampSecondArray::from(..).with_timezone(DATETIME_TZ)`.
//!
//! Parquet has no seconds unit: arrow's writer stores `Timestamp(Second)` as a bare INT64
//! that pyarrow and DuckDB read as integers. Every Parquet file rtable writes (parts and
//! `/select`) therefore stores DateTime as `Timestamp(Millisecond, "UTC")`: [`to_storage`]
//! converts before writing (done by [`ParquetOutput`] and the store's part writer) and
//! [`from_storage`] converts back after reading (done by the store's part reader), so
//! record batches in memory always use seconds. Do not hand batches to a bare `ArrowWriter`.

mod decode;
mod encode;
mod error;
mod fingerprint;
pub mod parquet_blocks;
mod partition;
mod sort;
mod split;
mod value;
mod widen;

use std::sync::Arc;

use arrow::array::RecordBatch;
use arrow::datatypes::{DataType, Field, Schema, SchemaRef, TimeUnit};
use arrow::error::ArrowError;
use rtable_protocol::schema::{ColumnType, TableSchema};

pub use decode::{InputFormat, decode, decode_block};
pub use encode::{
    OutputFormat, ParquetOutput, encode_text, parquet_writer_properties,
    parquet_writer_properties_for,
};
pub use error::InputError;
pub use fingerprint::rows_hash;
pub use partition::partition_split;
pub use sort::sort_by_key;
pub use split::{BlockSplitter, Cut, RowSyntax, blocks_of};
pub use widen::{check_prefix, column_type_of, conform_to, default_array};

/// The time zone of every DateTime column.
pub const DATETIME_TZ: &str = "UTC";

/// ClickHouse's Date range: days 0 (1970-01-01) to 65535 (2149-06-06).
pub const DATE_MAX_DAYS: i32 = 65_535;

/// ClickHouse's DateTime range: 0 (1970-01-01 00:00:00) to 2106-02-07 06:28:15.
pub const DATETIME_MAX_SECONDS: i64 = u32::MAX as i64;

/// The Arrow type of a (non-Nullable) ClickHouse type; Nullable(T) maps to T's type.
pub fn arrow_type(ty: &ColumnType) -> DataType {
    match ty.inner() {
        ColumnType::UInt8 => DataType::UInt8,
        ColumnType::UInt16 => DataType::UInt16,
        ColumnType::UInt32 => DataType::UInt32,
        ColumnType::UInt64 => DataType::UInt64,
        ColumnType::Int8 => DataType::Int8,
        ColumnType::Int16 => DataType::Int16,
        ColumnType::Int32 => DataType::Int32,
        ColumnType::Int64 => DataType::Int64,
        ColumnType::Float32 => DataType::Float32,
        ColumnType::Float64 => DataType::Float64,
        ColumnType::String => DataType::Utf8,
        ColumnType::Bool => DataType::Boolean,
        ColumnType::Date => DataType::Date32,
        ColumnType::DateTime => DataType::Timestamp(TimeUnit::Second, Some(DATETIME_TZ.into())),
        // `inner()` strips the only Nullable level the schema allows.
        ColumnType::Nullable(inner) => arrow_type(inner),
    }
}

/// The Arrow schema of the table: one field per column, in table order.
pub fn arrow_schema(schema: &TableSchema) -> SchemaRef {
    Arc::new(Schema::new(
        schema
            .columns
            .iter()
            .map(|c| Field::new(&c.name, arrow_type(&c.ty), c.ty.is_nullable()))
            .collect::<Vec<_>>(),
    ))
}

/// The schema of a Parquet file holding these rows: `Timestamp(Second, tz)` fields become
/// `Timestamp(Millisecond, tz)`; everything else is unchanged.
pub fn storage_schema(schema: &SchemaRef) -> SchemaRef {
    if !schema.fields().iter().any(|f| is_seconds(f.data_type())) {
        return schema.clone();
    }
    Arc::new(Schema::new_with_metadata(
        schema
            .fields()
            .iter()
            .map(|f| match f.data_type() {
                DataType::Timestamp(TimeUnit::Second, tz) => f
                    .as_ref()
                    .clone()
                    .with_data_type(DataType::Timestamp(TimeUnit::Millisecond, tz.clone())),
                _ => f.as_ref().clone(),
            })
            .collect::<Vec<_>>(),
        schema.metadata().clone(),
    ))
}

fn is_seconds(t: &DataType) -> bool {
    matches!(t, DataType::Timestamp(TimeUnit::Second, _))
}

fn is_millis(t: &DataType) -> bool {
    matches!(t, DataType::Timestamp(TimeUnit::Millisecond, _))
}

fn convert(
    batch: &RecordBatch,
    schema: SchemaRef,
    from: fn(&DataType) -> bool,
) -> Result<RecordBatch, ArrowError> {
    let columns = batch
        .columns()
        .iter()
        .zip(schema.fields())
        .map(|(c, f)| {
            if from(c.data_type()) {
                arrow::compute::cast(c, f.data_type())
            } else {
                Ok(c.clone())
            }
        })
        .collect::<Result<Vec<_>, _>>()?;
    RecordBatch::try_new(schema, columns)
}

/// Rows as they are stored in Parquet (DateTime in milliseconds); see the module docs.
pub fn to_storage(batch: &RecordBatch) -> Result<RecordBatch, ArrowError> {
    let schema = batch.schema();
    if !schema.fields().iter().any(|f| is_seconds(f.data_type())) {
        return Ok(batch.clone());
    }
    convert(batch, storage_schema(&schema), is_seconds)
}

/// Rows read from a Parquet file rtable wrote, back to in-memory types (DateTime in
/// seconds): every `Timestamp(Millisecond, tz)` column becomes `Timestamp(Second, tz)`.
pub fn from_storage(batch: &RecordBatch) -> Result<RecordBatch, ArrowError> {
    let schema = batch.schema();
    if !schema.fields().iter().any(|f| is_millis(f.data_type())) {
        return Ok(batch.clone());
    }
    convert(batch, memory_schema(&schema), is_millis)
}

/// The in-memory schema of rows stored in Parquet (the inverse of [`storage_schema`]):
/// `Timestamp(Millisecond, tz)` fields become `Timestamp(Second, tz)`.
pub fn memory_schema(schema: &SchemaRef) -> SchemaRef {
    if !schema.fields().iter().any(|f| is_millis(f.data_type())) {
        return schema.clone();
    }
    Arc::new(Schema::new_with_metadata(
        schema
            .fields()
            .iter()
            .map(|f| match f.data_type() {
                DataType::Timestamp(TimeUnit::Millisecond, tz) => f
                    .as_ref()
                    .clone()
                    .with_data_type(DataType::Timestamp(TimeUnit::Second, tz.clone())),
                _ => f.as_ref().clone(),
            })
            .collect::<Vec<_>>(),
        schema.metadata().clone(),
    ))
}

/// `YYYY-MM-DD` of a day number (days since 1970-01-01).
pub fn format_date(days: i32) -> Option<String> {
    let d = chrono::NaiveDate::from_num_days_from_ce_opt(days.checked_add(EPOCH_DAYS_FROM_CE)?)?;
    use chrono::Datelike;
    Some(format!("{:04}-{:02}-{:02}", d.year(), d.month(), d.day()))
}

/// `YYYY-MM-DD hh:mm:ss` (UTC) of unix seconds.
pub fn format_datetime(seconds: i64) -> Option<String> {
    use chrono::{Datelike, Timelike};
    let t = chrono::DateTime::from_timestamp(seconds, 0)?.naive_utc();
    Some(format!(
        "{:04}-{:02}-{:02} {:02}:{:02}:{:02}",
        t.year(),
        t.month(),
        t.day(),
        t.hour(),
        t.minute(),
        t.second()
    ))
}

/// Days from 0001-01-01 (CE day 1) to 1970-01-01.
pub(crate) const EPOCH_DAYS_FROM_CE: i32 = 719_163;

#[cfg(test)]
pub(crate) mod test_util {
    use rtable_protocol::schema::{Column, PartitionKey, TableSchema};

    pub fn schema(cols: &[(&str, &str)], order_by: &[&str], partition_by: &str) -> TableSchema {
        let columns = cols
            .iter()
            .map(|(n, t)| Column {
                name: n.to_string(),
                ty: t.parse().expect("test type"),
            })
            .collect();
        let pk: PartitionKey = partition_by.parse().expect("test partition key");
        TableSchema::new(
            columns,
            order_by.iter().map(|s| s.to_string()).collect(),
            pk,
        )
        .expect("test schema")
    }
}

#[cfg(test)]
mod tests;
