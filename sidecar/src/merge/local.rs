//! Runs a merge on this replica: reads the source parts, sorts all rows by the ORDER BY
//! and then by every other column, and writes one new part. The full-row order makes the
//! result independent of which replica merges, so every replica that merges locally
//! writes the same bytes as one that fetched the merged part.

use std::sync::Arc;

use arrow::compute::{
    SortColumn, SortOptions, concat_batches, lexsort_to_indices, take_record_batch,
};
use arrow::error::ArrowError;
use arrow::record_batch::RecordBatch;

use rtable_protocol::schema::TableSchema;

use crate::store::{ActivePart, PartStore, PartWriter, StoreError, TempPart, read_part};

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

fn sort_all(all: &RecordBatch, schema: &TableSchema) -> Result<RecordBatch, ArrowError> {
    if all.num_rows() < 2 {
        return Ok(all.clone());
    }
    let mut columns = Vec::new();
    for name in merge_key(schema) {
        let values = all
            .column_by_name(&name)
            .ok_or_else(|| ArrowError::SchemaError(format!("column {name} missing in a part")))?
            .clone();
        columns.push(SortColumn {
            values,
            options: Some(SortOptions {
                descending: false,
                nulls_first: true,
            }),
        });
    }
    let indices = lexsort_to_indices(&columns, None)?;
    take_record_batch(all, &indices)
}

pub fn merge_parts(
    store: &PartStore,
    sources: &[Arc<ActivePart>],
    schema: &TableSchema,
) -> Result<TempPart, StoreError> {
    let mut batches: Vec<RecordBatch> = Vec::new();
    for part in sources {
        batches.extend(read_part(part)?);
    }
    let arrow_schema = crate::rows::arrow_schema(schema);
    let merged = concat_batches(&arrow_schema, &batches)
        .and_then(|all| sort_all(&all, schema))
        .map_err(|e| StoreError::Arrow {
            op: "merging parts in",
            path: store.parts_dir().to_path_buf(),
            source: e,
        })?;
    let mut writer = PartWriter::create(store, schema, "merge")?;
    if let Err(e) = writer.write(&merged) {
        let _ignored = writer.abort();
        return Err(e);
    }
    writer.finish()
}
