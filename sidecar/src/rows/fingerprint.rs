//! The content hash of a block's rows, for the dedup block id of inserts whose rows are
//! committed inside a part shared with other inserts (the part's file hash then covers
//! more than this insert). Rows are encoded with Arrow's row format, which is canonical:
//! equal values give equal bytes whatever the input format or the arrays' layout.

use arrow::array::RecordBatch;
use arrow::error::ArrowError;
use arrow::row::{RowConverter, SortField};
use rtable_protocol::hash::{FileHasher, Hash128};

/// XXH3-128 over the row-format bytes of every row, each prefixed with its length.
pub fn rows_hash(batch: &RecordBatch) -> Result<Hash128, ArrowError> {
    let fields = batch
        .schema()
        .fields()
        .iter()
        .map(|f| SortField::new(f.data_type().clone()))
        .collect();
    let converter = RowConverter::new(fields)?;
    let rows = converter.convert_columns(batch.columns())?;
    let mut hasher = FileHasher::new();
    hasher.update(&(batch.num_columns() as u64).to_le_bytes());
    for row in rows.iter() {
        let bytes = row.as_ref();
        hasher.update(&(bytes.len() as u64).to_le_bytes());
        hasher.update(bytes);
    }
    Ok(hasher.finish())
}

#[cfg(test)]
mod tests {
    use std::sync::Arc;

    use arrow::array::{Int64Array, StringArray};
    use arrow::datatypes::{DataType, Field, Schema};

    use super::*;

    fn batch(ids: &[i64], names: &[&str]) -> RecordBatch {
        let schema = Arc::new(Schema::new(vec![
            Field::new("id", DataType::Int64, false),
            Field::new("name", DataType::Utf8, false),
        ]));
        RecordBatch::try_new(
            schema,
            vec![
                Arc::new(Int64Array::from(ids.to_vec())),
                Arc::new(StringArray::from(names.to_vec())),
            ],
        )
        .expect("batch")
    }

    #[test]
    fn equal_rows_hash_equal_whatever_the_layout() {
        let whole = batch(&[0, 1, 2, 3], &["x", "a", "b", "y"]);
        let sliced = whole.slice(1, 2);
        let fresh = batch(&[1, 2], &["a", "b"]);
        assert_eq!(
            rows_hash(&sliced).expect("hash"),
            rows_hash(&fresh).expect("hash")
        );
    }

    #[test]
    fn different_rows_or_boundaries_hash_differently() {
        let a = rows_hash(&batch(&[1, 2], &["a", "b"])).expect("hash");
        let b = rows_hash(&batch(&[1, 2], &["a", "c"])).expect("hash");
        let c = rows_hash(&batch(&[1], &["ab"])).expect("hash");
        let d = rows_hash(&batch(&[1, 2], &["ab", ""])).expect("hash");
        assert_ne!(a, b);
        assert_ne!(c, d);
        assert_ne!(a, rows_hash(&batch(&[2, 1], &["b", "a"])).expect("hash"));
    }
}
