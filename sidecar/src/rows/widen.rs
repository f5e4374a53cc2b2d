//! Rows of a part written under another column set, seen with the table's columns.
//!
//! The only schema change rtable applies to a live table is appending columns (see
//! `rtable_protocol::definition`), so a part's columns are always a prefix of the table's
//! (a part written before the append) or the table's columns a prefix of the part's (a part
//! written by a replica that already runs the appended definition, read by one that does not
//! yet). [`conform_to`] pads the first kind with the value ClickHouse gives a column missing
//! in an old part (NULL for `Nullable(T)`, else the type's default: 0, `''`, false,
//! 1970-01-01, 1970-01-01 00:00:00) and drops the extra trailing columns of the second.
//! Anything else (a column renamed or retyped) is an error.

use std::sync::Arc;

use arrow::array::{
    ArrayRef, BooleanArray, Date32Array, Float32Array, Float64Array, Int8Array, Int16Array,
    Int32Array, Int64Array, RecordBatch, RecordBatchOptions, StringArray, TimestampSecondArray,
    UInt8Array, UInt16Array, UInt32Array, UInt64Array, new_null_array,
};
use arrow::datatypes::{DataType, Field, SchemaRef, TimeUnit};
use arrow::error::ArrowError;
use rtable_protocol::schema::ColumnType;

use super::DATETIME_TZ;

/// The ClickHouse type of a field of a part (in-memory Arrow types, DateTime in seconds):
/// the inverse of [`super::arrow_type`] plus the field's nullability. `None` for an Arrow
/// type rtable never writes.
pub fn column_type_of(field: &Field) -> Option<ColumnType> {
    let inner = match field.data_type() {
        DataType::UInt8 => ColumnType::UInt8,
        DataType::UInt16 => ColumnType::UInt16,
        DataType::UInt32 => ColumnType::UInt32,
        DataType::UInt64 => ColumnType::UInt64,
        DataType::Int8 => ColumnType::Int8,
        DataType::Int16 => ColumnType::Int16,
        DataType::Int32 => ColumnType::Int32,
        DataType::Int64 => ColumnType::Int64,
        DataType::Float32 => ColumnType::Float32,
        DataType::Float64 => ColumnType::Float64,
        DataType::Utf8 => ColumnType::String,
        DataType::Boolean => ColumnType::Bool,
        DataType::Date32 => ColumnType::Date,
        DataType::Timestamp(TimeUnit::Second, Some(tz)) if tz.as_ref() == DATETIME_TZ => {
            ColumnType::DateTime
        }
        _ => return None,
    };
    Some(if field.is_nullable() {
        ColumnType::Nullable(Box::new(inner))
    } else {
        inner
    })
}

/// `len` rows of the value of a column a part does not have: NULL when the field is
/// nullable, else the type's default.
pub fn default_array(field: &Field, len: usize) -> Result<ArrayRef, ArrowError> {
    if field.is_nullable() {
        return Ok(new_null_array(field.data_type(), len));
    }
    Ok(match field.data_type() {
        DataType::UInt8 => Arc::new(UInt8Array::from(vec![0; len])),
        DataType::UInt16 => Arc::new(UInt16Array::from(vec![0; len])),
        DataType::UInt32 => Arc::new(UInt32Array::from(vec![0; len])),
        DataType::UInt64 => Arc::new(UInt64Array::from(vec![0; len])),
        DataType::Int8 => Arc::new(Int8Array::from(vec![0; len])),
        DataType::Int16 => Arc::new(Int16Array::from(vec![0; len])),
        DataType::Int32 => Arc::new(Int32Array::from(vec![0; len])),
        DataType::Int64 => Arc::new(Int64Array::from(vec![0; len])),
        DataType::Float32 => Arc::new(Float32Array::from(vec![0.0; len])),
        DataType::Float64 => Arc::new(Float64Array::from(vec![0.0; len])),
        DataType::Utf8 => Arc::new(StringArray::from(vec![""; len])),
        DataType::Boolean => Arc::new(BooleanArray::from(vec![false; len])),
        DataType::Date32 => Arc::new(Date32Array::from(vec![0; len])),
        DataType::Timestamp(TimeUnit::Second, tz) => {
            Arc::new(TimestampSecondArray::from(vec![0; len]).with_timezone_opt(tz.clone()))
        }
        other => {
            return Err(ArrowError::SchemaError(format!(
                "column `{}` has type {other}, which has no default",
                field.name()
            )));
        }
    })
}

/// Checks that one column list is a prefix of the other (same names, types and
/// nullability, in order).
pub fn check_prefix(part: &[Arc<Field>], table: &[Arc<Field>]) -> Result<(), ArrowError> {
    let describe = |f: &Field| match column_type_of(f) {
        Some(ty) => format!("`{}` {ty}", f.name()),
        None => format!("`{}` {}", f.name(), f.data_type()),
    };
    for (i, (have, want)) in part.iter().zip(table).enumerate() {
        if have.name() != want.name()
            || have.data_type() != want.data_type()
            || have.is_nullable() != want.is_nullable()
        {
            return Err(ArrowError::SchemaError(format!(
                "column {} of the part is {}, the table's is {}: a part's columns must be the table's, \
                 a prefix of them (written before columns were appended) or extend them at the end",
                i + 1,
                describe(have),
                describe(want)
            )));
        }
    }
    Ok(())
}

/// The rows of `batch` (read from a part) with exactly the columns of `target`: missing
/// trailing columns filled with [`default_array`], extra trailing columns dropped. The
/// result carries `target` as its schema.
pub fn conform_to(batch: &RecordBatch, target: &SchemaRef) -> Result<RecordBatch, ArrowError> {
    let schema = batch.schema();
    check_prefix(schema.fields(), target.fields())?;
    let rows = batch.num_rows();
    let columns = target
        .fields()
        .iter()
        .enumerate()
        .map(|(i, field)| match batch.columns().get(i) {
            Some(column) => Ok(column.clone()),
            None => default_array(field, rows),
        })
        .collect::<Result<Vec<_>, _>>()?;
    RecordBatch::try_new_with_options(
        target.clone(),
        columns,
        &RecordBatchOptions::new().with_row_count(Some(rows)),
    )
}
