//! Splitting an insert into one batch per partition.
//!
//! Partition ids follow ClickHouse where it is cheap to: no key -> `all`; an integer or Bool
//! column -> its decimal value (Bool as 0/1); a Date column -> `YYYYMMDD`; a DateTime column
//! -> its unix seconds; `toYYYYMM(col)` -> `YYYYMM`; `toYYYYMMDD(col)` -> `YYYYMMDD` (UTC).
//! Deviation: for a String column ClickHouse hashes its binary serialization; rtable uses the
//! 32 hex digits of SipHash-2-4-128 (zero keys) of the string's UTF-8 bytes.

use std::collections::HashMap;

use arrow::array::{Array, AsArray, RecordBatch, UInt32Array};
use arrow::compute::take_record_batch;
use arrow::datatypes::{
    Date32Type, Int8Type, Int16Type, Int32Type, Int64Type, TimestampSecondType, UInt8Type,
    UInt16Type, UInt32Type, UInt64Type,
};
use chrono::Datelike;
use rtable_protocol::hash::sip128;
use rtable_protocol::part_name::is_valid_partition_id;
use rtable_protocol::schema::{ColumnType, PartitionKey, TableSchema};

use super::EPOCH_DAYS_FROM_CE;
use super::error::InputError;

/// One `(partition id, rows)` per partition, sorted by id; rows keep their input order.
pub fn partition_split(
    batch: &RecordBatch,
    schema: &TableSchema,
) -> Result<Vec<(String, RecordBatch)>, InputError> {
    let Some(name) = schema.partition_by.column() else {
        return Ok(vec![("all".to_string(), batch.clone())]);
    };
    let internal = |what: String| {
        InputError::at(
            None,
            Some(name),
            format!("internal error splitting by partition column `{name}`: {what}"),
        )
    };
    let column = schema
        .column(name)
        .ok_or_else(|| internal("not a column of the table".into()))?;
    let array = batch
        .column_by_name(name)
        .ok_or_else(|| internal("missing from the rows".into()))?;
    if let Some(row) = (0..array.len()).find(|&i| array.is_null(i)) {
        return Err(InputError::at(
            None,
            Some(name),
            format!(
                "row {} has null in partition column `{name}`: partition keys need a value",
                row + 1
            ),
        ));
    }
    let mismatch = || internal(format!("unexpected Arrow type {}", array.data_type()));

    let mut groups: Vec<(String, Vec<u32>)> = match column.ty.inner() {
        ColumnType::String => {
            let a = array.as_string_opt::<i32>().ok_or_else(mismatch)?;
            let mut by_value: HashMap<&str, Vec<u32>> = HashMap::new();
            for (i, v) in a.iter().enumerate() {
                by_value
                    .entry(v.unwrap_or_default())
                    .or_default()
                    .push(i as u32);
            }
            by_value
                .into_iter()
                .map(|(v, rows)| (sip128(v.as_bytes()).to_hex(), rows))
                .collect()
        }
        ty => {
            let keys =
                numeric_keys(array.as_ref(), ty, &schema.partition_by).ok_or_else(mismatch)?;
            let mut by_key: HashMap<i128, Vec<u32>> = HashMap::new();
            for (i, k) in keys.into_iter().enumerate() {
                by_key.entry(k).or_default().push(i as u32);
            }
            let mut out = Vec::with_capacity(by_key.len());
            for (k, rows) in by_key {
                let id = if matches!(
                    (ty, &schema.partition_by),
                    (ColumnType::Date, PartitionKey::Column(_))
                ) {
                    yyyymmdd_of_days(k).ok_or_else(|| internal(format!("day {k} out of range")))?
                } else {
                    k.to_string()
                };
                out.push((id, rows));
            }
            out
        }
    };
    groups.sort_by(|a, b| a.0.cmp(&b.0));
    if let Some((id, _)) = groups.iter().find(|(id, _)| !is_valid_partition_id(id)) {
        return Err(InputError::at(
            None,
            Some(name),
            format!("partition id `{id}` from column `{name}` is not valid"),
        ));
    }
    if groups.len() == 1 {
        let (id, _) = groups.remove(0);
        return Ok(vec![(id, batch.clone())]);
    }
    groups
        .into_iter()
        .map(|(id, rows)| {
            take_record_batch(batch, &UInt32Array::from(rows))
                .map(|b| (id, b))
                .map_err(|e| internal(e.to_string()))
        })
        .collect()
}

fn date_of_days(days: i128) -> Option<chrono::NaiveDate> {
    let d = i32::try_from(days).ok()?.checked_add(EPOCH_DAYS_FROM_CE)?;
    chrono::NaiveDate::from_num_days_from_ce_opt(d)
}

fn yyyymmdd_of_days(days: i128) -> Option<String> {
    let d = date_of_days(days)?;
    Some(format!("{:04}{:02}{:02}", d.year(), d.month(), d.day()))
}

/// Per-row integer keys; `None` when the array is not of the column's Arrow type.
fn numeric_keys(array: &dyn Array, ty: &ColumnType, key: &PartitionKey) -> Option<Vec<i128>> {
    macro_rules! prim {
        ($t:ty) => {
            array
                .as_primitive_opt::<$t>()?
                .values()
                .iter()
                .map(|&v| i128::from(v))
                .collect()
        };
    }
    let raw: Vec<i128> = match ty {
        ColumnType::UInt8 => prim!(UInt8Type),
        ColumnType::UInt16 => prim!(UInt16Type),
        ColumnType::UInt32 => prim!(UInt32Type),
        ColumnType::UInt64 => prim!(UInt64Type),
        ColumnType::Int8 => prim!(Int8Type),
        ColumnType::Int16 => prim!(Int16Type),
        ColumnType::Int32 => prim!(Int32Type),
        ColumnType::Int64 => prim!(Int64Type),
        ColumnType::Bool => array
            .as_boolean_opt()?
            .values()
            .iter()
            .map(i128::from)
            .collect(),
        ColumnType::Date => prim!(Date32Type),
        ColumnType::DateTime => prim!(TimestampSecondType),
        _ => return None,
    };
    let date = |days: i128| date_of_days(days);
    let date_of = |v: i128| -> Option<chrono::NaiveDate> {
        match ty {
            ColumnType::Date => date(v),
            _ => date(v.div_euclid(86_400)),
        }
    };
    match key {
        PartitionKey::ToYyyyMm(_) => raw
            .into_iter()
            .map(|v| date_of(v).map(|d| i128::from(d.year()) * 100 + i128::from(d.month())))
            .collect(),
        PartitionKey::ToYyyyMmDd(_) => raw
            .into_iter()
            .map(|v| {
                date_of(v).map(|d| {
                    i128::from(d.year()) * 10_000
                        + i128::from(d.month()) * 100
                        + i128::from(d.day())
                })
            })
            .collect(),
        _ => Some(raw),
    }
}
