//! Runs a merge on this replica: a streaming k-way merge of the source parts by the
//! table's ORDER BY into one new part. Every source is already sorted by ORDER BY, so
//! the merge holds one batch per source plus one output batch in memory, whatever the
//! parts' sizes. Ties keep source order (the sources in block order, then row order), so
//! the result depends only on the sources' bytes and the table's columns: every replica
//! that merges the same parts with the same definition writes the same file, and the same
//! bytes as the part a replica fetches. Sources written before a column was appended are
//! read with it filled in (`store::read_part_batches`); see [`output_schema`] for sources
//! written with columns this replica does not know yet.

use std::sync::Arc;

use arrow::compute::interleave_record_batch;
use arrow::error::ArrowError;
use arrow::record_batch::RecordBatch;
use arrow::row::{RowConverter, Rows, SortField};

use arrow::datatypes::SchemaRef;
use rtable_protocol::schema::{Column, TableSchema};

use crate::store::{
    ActivePart, PartBatches, PartStore, PartWriter, StoreError, TempPart, part_columns,
    read_part_batches,
};

/// Rows per written batch.
const OUTPUT_ROWS: usize = 8192;

/// One source part being read: its current batch, that batch's sort keys, the next row.
struct Cursor {
    batches: PartBatches,
    /// Index of the current batch in the output's batch list.
    held: usize,
    keys: Rows,
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
    let output = output_schema(sources, schema)?;
    let target = crate::rows::arrow_schema(&output);
    let keys = KeyMaker::new(&output).map_err(arrow_err)?;
    let properties = crate::rows::parquet_writer_properties();
    let mut writer = PartWriter::create(store, &output, "merge", properties)?;
    let merged = run(sources, &target, &keys, &mut writer, &arrow_err);
    match merged {
        Ok(()) => writer.finish(),
        Err(e) => {
            let _ignored = writer.abort();
            Err(e)
        }
    }
}

/// The columns of the merged part: the table's, or, when a source was written by a replica
/// that already runs a definition with columns appended (this replica has not restarted
/// with it yet), the table's plus those columns, so a merge never drops values of a column
/// this replica does not know yet. Sources with fewer columns are filled with defaults
/// (see `rows::conform_to`). So replicas running the same definition merge the same
/// sources into the same bytes.
fn output_schema(
    sources: &[Arc<ActivePart>],
    schema: &TableSchema,
) -> Result<TableSchema, StoreError> {
    let table = crate::rows::arrow_schema(schema);
    let mut output = schema.clone();
    for part in sources {
        let columns = part_columns(part)?;
        if columns.fields().len() <= output.columns.len() {
            continue;
        }
        let data = part.dir.join(crate::store::DATA_FILE);
        crate::rows::check_prefix(columns.fields(), table.fields())
            .map_err(|e| StoreError::arrow("merging", &data, e))?;
        let mut extended = schema.columns.clone();
        for field in &columns.fields()[schema.columns.len()..] {
            let ty = crate::rows::column_type_of(field).ok_or_else(|| {
                StoreError::corrupt(
                    &data,
                    format!(
                        "column `{}` has Arrow type {}, which no ClickHouse type maps to",
                        field.name(),
                        field.data_type()
                    ),
                )
            })?;
            extended.push(Column {
                name: field.name().clone(),
                ty,
            });
        }
        output.columns = extended;
    }
    Ok(output)
}

fn run(
    sources: &[Arc<ActivePart>],
    target: &SchemaRef,
    keys: &KeyMaker,
    writer: &mut PartWriter,
    arrow_err: &dyn Fn(ArrowError) -> StoreError,
) -> Result<(), StoreError> {
    let mut out = Pending::default();
    let mut cursors: Vec<Cursor> = Vec::with_capacity(sources.len());
    for part in sources {
        let mut batches = read_part_batches(part, target)?;
        if let Some((batch, k)) = next_batch(&mut batches, keys, arrow_err)? {
            out.batches.push(batch);
            cursors.push(Cursor {
                batches,
                held: out.batches.len() - 1,
                keys: k,
                pos: 0,
            });
        }
    }
    loop {
        // k is the number of source parts (a handful): a linear scan beats a heap here.
        // Strictly smaller wins, so among equal keys the earlier source goes first.
        let mut best: Option<usize> = None;
        for (i, c) in cursors.iter().enumerate() {
            if c.pos >= c.keys.num_rows() {
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
        if c.pos == c.keys.num_rows()
            && let Some((batch, k)) = next_batch(&mut c.batches, keys, arrow_err)?
        {
            out.batches.push(batch);
            c.held = out.batches.len() - 1;
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
            .flat_map(|p| read_part(p, &rowcodec::arrow_schema(&table())).expect("read"))
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

    /// `table()` with `note Nullable(String)` and `score UInt32` appended.
    fn wider() -> TableSchema {
        let mut t = table();
        t.columns.push(Column {
            name: "note".into(),
            ty: "Nullable(String)".parse().expect("type"),
        });
        t.columns.push(Column {
            name: "score".into(),
            ty: "UInt32".parse().expect("type"),
        });
        t
    }

    fn wide_part(store: &PartStore, name: &str, ids: &[u64]) -> Arc<ActivePart> {
        let body: String = ids
            .iter()
            .map(|id| {
                format!(
                    "{{\"id\": {id}, \"msg\": \"w{id}\", \"note\": \"n{id}\", \"score\": {id}}}\n"
                )
            })
            .collect();
        let batch =
            rowcodec::decode(InputFormat::JsonEachRow, body.as_bytes(), &wider()).expect("rows");
        let temp = write_temp(store, &batch, &wider()).expect("write");
        store
            .commit_temp(temp, &name.parse().expect("part name"))
            .expect("commit")
    }

    fn json_of(store: &PartStore, temp: TempPart, name: &str, schema: &TableSchema) -> String {
        let part = store
            .commit_temp(temp, &name.parse().expect("part name"))
            .expect("commit");
        let mut out = Vec::new();
        for (i, b) in read_part(&part, &rowcodec::arrow_schema(schema))
            .expect("read")
            .iter()
            .enumerate()
        {
            rowcodec::encode_text(rowcodec::OutputFormat::JsonEachRow, b, &mut out, i == 0)
                .expect("encode");
        }
        String::from_utf8(out).expect("utf-8")
    }

    #[test]
    fn parts_from_before_an_append_merge_with_the_appended_columns_filled() {
        let dir = tempfile::tempdir().expect("tempdir");
        let (store, _) = PartStore::open(dir.path()).expect("store");
        let sources = vec![
            part(&store, "all_1_1_0", &[1, 3], "a"),
            wide_part(&store, "all_2_2_0", &[2]),
        ];
        let temp = merge_parts(&store, &sources, &wider()).expect("merge");
        assert_eq!(
            json_of(&store, temp, "all_1_2_1", &wider()),
            "{\"id\":1,\"msg\":\"a1\",\"note\":null,\"score\":0}\n\
             {\"id\":2,\"msg\":\"w2\",\"note\":\"n2\",\"score\":2}\n\
             {\"id\":3,\"msg\":\"a3\",\"note\":null,\"score\":0}\n"
        );
    }

    /// A replica still running the older definition merges parts that have the appended
    /// columns: the result keeps them (it would otherwise drop their values for everyone who
    /// fetches it), and is byte-identical to the merge on a replica running the new one.
    #[test]
    fn a_replica_behind_an_append_keeps_the_appended_columns_when_it_merges() {
        let dir = tempfile::tempdir().expect("tempdir");
        let (store, _) = PartStore::open(dir.path()).expect("store");
        let sources = vec![
            part(&store, "all_1_1_0", &[1, 3], "a"),
            wide_part(&store, "all_2_2_0", &[2]),
        ];
        let behind = merge_parts(&store, &sources, &table()).expect("merge on the old definition");
        let current = merge_parts(&store, &sources, &wider()).expect("merge on the new one");
        assert_eq!(behind.checksums, current.checksums);
        assert_eq!(
            json_of(&store, behind, "all_1_2_1", &wider()),
            "{\"id\":1,\"msg\":\"a1\",\"note\":null,\"score\":0}\n\
             {\"id\":2,\"msg\":\"w2\",\"note\":\"n2\",\"score\":2}\n\
             {\"id\":3,\"msg\":\"a3\",\"note\":null,\"score\":0}\n"
        );
    }
}
