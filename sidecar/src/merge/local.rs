//! Runs a merge on this replica: a streaming k-way merge of the source parts by the
//! table's ORDER BY into one new part. Every source is already sorted by ORDER BY, so
//! the merge holds one batch per source plus one output batch in memory, whatever the
//! parts' sizes. Ties keep source order (the sources in block order, then row order), so
//! the result depends only on the sources' bytes: every replica that merges the same
//! parts writes the same file, and the same bytes as the part a replica fetches.

use std::sync::Arc;

use arrow::compute::interleave_record_batch;
use arrow::error::ArrowError;
use arrow::record_batch::RecordBatch;
use arrow::row::{RowConverter, Rows, SortField};

use rtable_protocol::schema::TableSchema;

use crate::store::{
    ActivePart, PartBatches, PartStore, PartWriter, StoreError, TempPart, read_part_batches,
};

/// Rows per written batch.
const OUTPUT_ROWS: usize = 8192;

/// One source part being read: its current batch, that batch's sort keys, the next row.
struct Cursor {
    batches: PartBatches,
    /// Index of the current batch in the output's batch list.
    held: usize,
    keys: Rows,
    len: usize,
    pos: usize,
}

/// Turns batches into comparable sort keys (ORDER BY columns, ascending, nulls first).
struct KeyMaker {
    converter: RowConverter,
    columns: Vec<String>,
}

impl KeyMaker {
    fn new(schema: &TableSchema) -> Result<KeyMaker, ArrowError> {
        let arrow = crate::rows::arrow_schema(schema);
        let mut fields = Vec::new();
        for name in &schema.order_by {
            let field = arrow.field_with_name(name)?;
            fields.push(SortField::new(field.data_type().clone()));
        }
        Ok(KeyMaker {
            converter: RowConverter::new(fields)?,
            columns: schema.order_by.clone(),
        })
    }

    fn keys(&self, batch: &RecordBatch) -> Result<Rows, ArrowError> {
        let mut columns = Vec::with_capacity(self.columns.len());
        for name in &self.columns {
            columns.push(batch.column_by_name(name).cloned().ok_or_else(|| {
                ArrowError::SchemaError(format!("column {name} missing in a part"))
            })?);
        }
        self.converter.convert_columns(&columns)
    }
}

/// The output under construction: the batches it takes rows from and which rows.
#[derive(Default)]
struct Pending {
    batches: Vec<RecordBatch>,
    picks: Vec<(usize, usize)>,
}

pub fn merge_parts(
    store: &PartStore,
    sources: &[Arc<ActivePart>],
    schema: &TableSchema,
) -> Result<TempPart, StoreError> {
    let arrow_err = |e: ArrowError| StoreError::Arrow {
        op: "merging parts in",
        path: store.parts_dir().to_path_buf(),
        source: e,
    };
    let keys = KeyMaker::new(schema).map_err(arrow_err)?;
    let mut writer = PartWriter::create(store, schema, "merge")?;
    let merged = run(sources, &keys, &mut writer, &arrow_err);
    match merged {
        Ok(()) => writer.finish(),
        Err(e) => {
            let _ignored = writer.abort();
            Err(e)
        }
    }
}

fn run(
    sources: &[Arc<ActivePart>],
    keys: &KeyMaker,
    writer: &mut PartWriter,
    arrow_err: &dyn Fn(ArrowError) -> StoreError,
) -> Result<(), StoreError> {
    let mut out = Pending::default();
    let mut cursors: Vec<Cursor> = Vec::with_capacity(sources.len());
    for part in sources {
        let mut batches = read_part_batches(part)?;
        if let Some((batch, k)) = next_batch(&mut batches, keys, arrow_err)? {
            out.batches.push(batch);
            let len = k.num_rows();
            cursors.push(Cursor {
                batches,
                held: out.batches.len() - 1,
                keys: k,
                len,
                pos: 0,
            });
        }
    }
    loop {
        // k is the number of source parts (a handful): a linear scan beats a heap here.
        // Strictly smaller wins, so among equal keys the earlier source goes first.
        let mut best: Option<usize> = None;
        for (i, c) in cursors.iter().enumerate() {
            if c.pos >= c.len {
                continue;
            }
            match best {
                Some(b) if cursors[b].keys.row(cursors[b].pos) <= c.keys.row(c.pos) => {}
                _ => best = Some(i),
            }
        }
        let Some(i) = best else { break };
        let c = &mut cursors[i];
        out.picks.push((c.held, c.pos));
        c.pos += 1;
        if c.pos == c.len
            && let Some((batch, k)) = next_batch(&mut c.batches, keys, arrow_err)?
        {
            out.batches.push(batch);
            c.held = out.batches.len() - 1;
            c.len = k.num_rows();
            c.keys = k;
            c.pos = 0;
        }
        if out.picks.len() >= OUTPUT_ROWS {
            flush(&mut out, &mut cursors, writer, arrow_err)?;
        }
    }
    flush(&mut out, &mut cursors, writer, arrow_err)
}

/// The next non-empty batch of a source and its keys, `None` at its end.
fn next_batch(
    batches: &mut PartBatches,
    keys: &KeyMaker,
    arrow_err: &dyn Fn(ArrowError) -> StoreError,
) -> Result<Option<(RecordBatch, Rows)>, StoreError> {
    for batch in batches.by_ref() {
        let batch = batch?;
        if batch.num_rows() > 0 {
            let k = keys.keys(&batch).map_err(arrow_err)?;
            return Ok(Some((batch, k)));
        }
    }
    Ok(None)
}

/// Writes the picked rows and keeps only the batches cursors still read from.
fn flush(
    out: &mut Pending,
    cursors: &mut [Cursor],
    writer: &mut PartWriter,
    arrow_err: &dyn Fn(ArrowError) -> StoreError,
) -> Result<(), StoreError> {
    if !out.picks.is_empty() {
        let refs: Vec<&RecordBatch> = out.batches.iter().collect();
        let batch = interleave_record_batch(&refs, &out.picks).map_err(arrow_err)?;
        writer.write(&batch)?;
        out.picks.clear();
    }
    let mut kept = Vec::with_capacity(cursors.len());
    for c in cursors.iter_mut() {
        kept.push(out.batches[c.held].clone());
        c.held = kept.len() - 1;
    }
    out.batches = kept;
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::rows::{self as rowcodec, InputFormat};
    use crate::store::{read_part, write_temp};
    use rtable_protocol::PartName;
    use rtable_protocol::schema::Column;

    fn table() -> TableSchema {
        let col = |name: &str, ty: &str| Column {
            name: name.into(),
            ty: ty.parse().expect("type"),
        };
        TableSchema::new(
            vec![col("id", "UInt64"), col("msg", "Nullable(String)")],
            vec!["id".into()],
            "tuple()".parse().expect("partition key"),
        )
        .expect("schema")
    }

    fn part(store: &PartStore, name: &str, ids: &[u64], tag: &str) -> Arc<ActivePart> {
        let body: String = ids
            .iter()
            .map(|id| format!("{{\"id\": {id}, \"msg\": \"{tag}{id}\"}}\n"))
            .collect();
        let batch =
            rowcodec::decode(InputFormat::JsonEachRow, body.as_bytes(), &table()).expect("rows");
        let temp = write_temp(store, &batch, &table()).expect("write");
        let name: PartName = name.parse().expect("part name");
        store.commit_temp(temp, &name).expect("commit")
    }

    fn rows_of(temp_dir: &std::path::Path) -> Vec<(u64, String)> {
        let file = std::fs::File::open(temp_dir.join(crate::store::DATA_FILE)).expect("data");
        let reader = parquet::arrow::arrow_reader::ParquetRecordBatchReaderBuilder::try_new(file)
            .and_then(|b| b.with_batch_size(7).build())
            .expect("reader");
        let mut out = Vec::new();
        for batch in reader {
            let batch = batch.expect("batch");
            let ids = arrow::array::cast::as_primitive_array::<arrow::datatypes::UInt64Type>(
                batch.column(0),
            );
            let msgs = arrow::array::cast::as_string_array(batch.column(1));
            for i in 0..batch.num_rows() {
                out.push((ids.value(i), msgs.value(i).to_string()));
            }
        }
        out
    }

    #[test]
    fn sources_interleave_in_order_by_order_and_ties_keep_source_order() {
        let dir = tempfile::tempdir().expect("tempdir");
        let (store, _) = PartStore::open(dir.path()).expect("store");
        // Overlapping keys, a duplicate key across parts, more rows than one output batch.
        let a: Vec<u64> = (0..10_000).map(|i| i * 3).collect();
        let b: Vec<u64> = (0..9_000).map(|i| i * 2).collect();
        let c: Vec<u64> = vec![5, 5, 7];
        let sources = vec![
            part(&store, "all_1_1_0", &a, "a"),
            part(&store, "all_2_2_0", &b, "b"),
            part(&store, "all_3_3_0", &c, "c"),
        ];
        let temp = merge_parts(&store, &sources, &table()).expect("merge");
        let merged = rows_of(&temp.dir);
        assert_eq!(merged.len(), a.len() + b.len() + c.len());
        assert!(
            merged.windows(2).all(|w| w[0].0 <= w[1].0),
            "not in ORDER BY order"
        );
        // id 6 is in a (6 = 2*3) and b (6 = 3*2): a's row first.
        let sixes: Vec<&str> = merged
            .iter()
            .filter(|r| r.0 == 6)
            .map(|r| r.1.as_str())
            .collect();
        assert_eq!(sixes, ["a6", "b6"]);
        let mut expected: Vec<(u64, String)> = sources
            .iter()
            .flat_map(|p| read_part(p).expect("read"))
            .flat_map(|batch| {
                let ids = arrow::array::cast::as_primitive_array::<arrow::datatypes::UInt64Type>(
                    batch.column(0),
                )
                .clone();
                let msgs = arrow::array::cast::as_string_array(batch.column(1)).clone();
                (0..batch.num_rows())
                    .map(move |i| (ids.value(i), msgs.value(i).to_string()))
                    .collect::<Vec<_>>()
            })
            .collect();
        let mut got = merged.clone();
        expected.sort();
        got.sort();
        assert_eq!(got, expected, "rows lost or invented");
        // The same sources merge to the same bytes.
        let again = merge_parts(&store, &sources, &table()).expect("merge again");
        assert_eq!(temp.checksums, again.checksums);
    }
}
