//! Sorting a batch by the table's ORDER BY.

use arrow::array::{RecordBatch, UInt32Array};
use arrow::compute::{LexicographicalComparator, SortColumn, SortOptions, take_record_batch};
use arrow::error::ArrowError;

/// Sorts ascending by the named columns, nulls first, stable (equal keys keep input order).
/// An empty ORDER BY (`tuple()`) returns the batch as it is.
pub fn sort_by_key(batch: &RecordBatch, order_by: &[String]) -> Result<RecordBatch, ArrowError> {
    if order_by.is_empty() || batch.num_rows() < 2 {
        return Ok(batch.clone());
    }
    let columns = order_by
        .iter()
        .map(|name| {
            let values = batch.column_by_name(name).cloned().ok_or_else(|| {
                ArrowError::InvalidArgumentError(format!(
                    "ORDER BY column `{name}` is not in the rows"
                ))
            })?;
            Ok(SortColumn {
                values,
                options: Some(SortOptions {
                    descending: false,
                    nulls_first: true,
                }),
            })
        })
        .collect::<Result<Vec<_>, ArrowError>>()?;
    let cmp = LexicographicalComparator::try_new(&columns)?;
    let n = batch.num_rows();
    if (1..n).all(|i| cmp.compare(i - 1, i).is_le()) {
        return Ok(batch.clone());
    }
    let mut indices: Vec<u32> = (0..n as u32).collect();
    // `sort_by` is stable.
    indices.sort_by(|&a, &b| cmp.compare(a as usize, b as usize));
    take_record_batch(batch, &UInt32Array::from(indices))
}
