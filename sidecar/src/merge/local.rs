//! Runs a merge on this replica: reads the source parts, sorts all rows by the ORDER BY
//! and then by every other column, and writes one new part. The full-row order makes the
//! result independent of which replica merges, so every replica that merges locally
//! writes the same bytes as one that fetched the merged part.

use arrow::compute::concat_batches;
use arrow::compute::{SortColumn, SortOptions, lexsort_to_indices, take_record_batch};
use arrow::record_batch::RecordBatch;

use rtable_protocol::schema::TableSchema;

use crate::parts::part_reader::read_part;
use crate::parts::part_writer::{TempPart, write_temp};
use crate::parts::{ActivePart, PartStore, StoreError};

/// Sort keys: the ORDER BY, then the remaining columns in table order.
fn merge_key(schema: &TableSchema) -> Vec<String> {
    let mut key = schema.order_by.clone();
    for c in &schema.columns {
        if !key.contains(&c.name) {
            key.push(c.name.clone());
        }
    }
    key
}

pub fn merge_parts(
    store: &PartStore,
    sources: &[ActivePart],
    schema: &TableSchema,
) -> Result<TempPart, StoreError> {
    let mut batches: Vec<RecordBatch> = Vec::new();
    for part in sources {
        batches.extend(read_part(part)?);
    }
    let arrow_schema = crate::rows::arrow_schema(schema);
    let all = concat_batches(&arrow_schema, &batches)
        .map_err(|e| StoreError::Invariant(e.to_string()))?;
    let sorted = if all.num_rows() < 2 {
        all
    } else {
        let mut columns = Vec::new();
        for name in merge_key(schema) {
            let values = all
                .column_by_name(&name)
                .ok_or_else(|| StoreError::Invariant(format!("column {name} missing in a part")))?
                .clone();
            columns.push(SortColumn {
                values,
                options: Some(SortOptions {
                    descending: false,
                    nulls_first: true,
                }),
            });
        }
        let indices =
            lexsort_to_indices(&columns, None).map_err(|e| StoreError::Invariant(e.to_string()))?;
        take_record_batch(&all, &indices).map_err(|e| StoreError::Invariant(e.to_string()))?
    };
    write_temp(store, &sorted, schema)
}
