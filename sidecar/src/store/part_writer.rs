//! Writing a new part into a temporary directory `parts/tmp_<kind>_<id>/`.
//!
//! The Parquet writer is deterministic (fixed `created_by`, no timestamps), so identical
//! rows give identical `data.parquet` bytes and the same [`TempPart::data_hash`], which the
//! insert path uses for the dedup block id.

use std::fs::{self, File};
use std::io::{BufWriter, Write};
use std::path::{Path, PathBuf};

use arrow::array::RecordBatch;
use arrow::datatypes::SchemaRef;
use parquet::arrow::ArrowWriter;
use rtable_protocol::hash::{FileHasher, Hash128};
use rtable_protocol::part_header::{Checksums, FileChecksum};
use rtable_protocol::schema::TableSchema;

use super::verify::Unsynced;
use super::{CHECKSUMS_FILE, COUNT_FILE, DATA_FILE, PartStore, StagedPart, StoreError};
use crate::rows::{
    ParquetOutput, arrow_schema, parquet_writer_properties_for, sort_by_key, storage_schema,
    to_storage,
};
use parquet::file::properties::WriterProperties;
use rtable_protocol::PartName;

/// A written, fsynced, not yet active part. Commit it with [`PartStore::commit_temp`] or
/// remove it with [`TempPart::discard`]; dropping it leaves the directory, which the next
/// [`PartStore::open`] moves to `detached/tmp_...` (never silently deleted, because an
/// insert whose ZooKeeper commit is uncertain may still need it).
#[derive(Debug)]
pub struct TempPart {
    pub dir: PathBuf,
    pub checksums: Checksums,
    pub rows: u64,
    pub bytes: u64,
}

impl TempPart {
    /// The XXH3-128 of `data.parquet`: the data hash of the insert's dedup block id.
    pub fn data_hash(&self) -> Hash128 {
        data_hash(&self.checksums)
    }

    /// Removes the temporary directory (an insert that failed before its commit).
    pub fn discard(self) -> Result<(), StoreError> {
        fs::remove_dir_all(&self.dir).map_err(|e| StoreError::io("removing", &self.dir, e))
    }
}

/// Counts and hashes what goes to the file.
struct HashingWriter {
    inner: BufWriter<File>,
    hasher: FileHasher,
    size: u64,
}

impl Write for HashingWriter {
    fn write(&mut self, buf: &[u8]) -> std::io::Result<usize> {
        let n = self.inner.write(buf)?;
        self.hasher.update(&buf[..n]);
        self.size += n as u64;
        Ok(n)
    }

    fn flush(&mut self) -> std::io::Result<()> {
        self.inner.flush()
    }
}

/// Streams sorted batches into a new temporary part (for inserts one batch; merges write
/// many). Batches must already be in ORDER BY order and have the table's columns.
pub struct PartWriter {
    dir: PathBuf,
    /// The directory holding `dir`, fsynced with the part when `dir` was created under its
    /// final name (a staged insert: no rename follows to make durable).
    parent_to_sync: Option<PathBuf>,
    data_path: PathBuf,
    schema: SchemaRef,
    writer: ArrowWriter<HashingWriter>,
    rows: u64,
}

impl PartWriter {
    /// Creates `parts/tmp_<kind>_<unique>/data.parquet`; `kind` is e.g. `insert` or `merge`.
    /// `properties`: `rows::parquet_writer_properties` for a merge, `..._for(rows)` for
    /// rows written in one go.
    pub fn create(
        store: &PartStore,
        table: &TableSchema,
        kind: &str,
        properties: WriterProperties,
    ) -> Result<PartWriter, StoreError> {
        let dir = store.new_tmp_dir(kind)?;
        Self::start_in(dir, None, table, properties)
    }

    /// Creates `parts/staged_<name>/data.parquet` for an insert whose number is known.
    fn create_staged(
        store: &PartStore,
        table: &TableSchema,
        name: &PartName,
        properties: WriterProperties,
    ) -> Result<PartWriter, StoreError> {
        let dir = store.new_staged_dir(name)?;
        let parent = Some(store.parts_dir().to_path_buf());
        Self::start_in(dir, parent, table, properties)
    }

    fn start_in(
        dir: PathBuf,
        parent_to_sync: Option<PathBuf>,
        table: &TableSchema,
        properties: WriterProperties,
    ) -> Result<PartWriter, StoreError> {
        match Self::start(dir.clone(), parent_to_sync, table, properties) {
            Ok(w) => Ok(w),
            Err(e) => {
                let _ignored = fs::remove_dir_all(&dir);
                Err(e)
            }
        }
    }

    fn start(
        dir: PathBuf,
        parent_to_sync: Option<PathBuf>,
        table: &TableSchema,
        properties: WriterProperties,
    ) -> Result<PartWriter, StoreError> {
        let data_path = dir.join(DATA_FILE);
        let file =
            File::create(&data_path).map_err(|e| StoreError::io("creating", &data_path, e))?;
        let schema = arrow_schema(table);
        let sink = HashingWriter {
            inner: BufWriter::with_capacity(1 << 20, file),
            hasher: FileHasher::default(),
            size: 0,
        };
        let writer = ArrowWriter::try_new(sink, storage_schema(&schema), Some(properties))
            .map_err(|e| StoreError::parquet("starting", &data_path, e))?;
        Ok(PartWriter {
            dir,
            parent_to_sync,
            data_path,
            schema,
            writer,
            rows: 0,
        })
    }

    pub fn dir(&self) -> &Path {
        &self.dir
    }

    /// Appends rows; the batch is re-labelled with the table's Arrow schema (which checks
    /// column types and that non-Nullable columns hold no null).
    pub fn write(&mut self, batch: &RecordBatch) -> Result<(), StoreError> {
        let batch =
            RecordBatch::try_new(self.schema.clone(), batch.columns().to_vec()).map_err(|e| {
                StoreError::arrow("matching rows to the table schema for", &self.data_path, e)
            })?;
        let stored = to_storage(&batch).map_err(|e| {
            StoreError::arrow("converting rows to storage types for", &self.data_path, e)
        })?;
        self.writer
            .write(&stored)
            .map_err(|e| StoreError::parquet("writing", &self.data_path, e))?;
        self.rows += batch.num_rows() as u64;
        Ok(())
    }

    /// Writes the footer, `checksums.txt` and `count.txt`, and fsyncs files and directory
    /// (together, see [`Unsynced::sync`]).
    pub fn finish(self) -> Result<TempPart, StoreError> {
        let (part, unsynced) = self.finish_unsynced()?;
        sync_or_remove(part, unsynced)
    }

    /// [`PartWriter::finish`] without the fsyncs: the caller runs them (alongside the
    /// commit that names the part) before it counts on the part surviving a machine crash.
    fn finish_unsynced(self) -> Result<(TempPart, Unsynced), StoreError> {
        let dir = self.dir.clone();
        match self.finish_inner() {
            Ok(t) => Ok(t),
            Err(e) => {
                let _ignored = fs::remove_dir_all(&dir);
                Err(e)
            }
        }
    }

    /// Gives up: removes the temporary directory.
    pub fn abort(self) -> Result<(), StoreError> {
        fs::remove_dir_all(&self.dir).map_err(|e| StoreError::io("removing", &self.dir, e))
    }

    fn finish_inner(self) -> Result<(TempPart, Unsynced), StoreError> {
        let PartWriter {
            dir,
            parent_to_sync,
            data_path,
            writer,
            rows,
            ..
        } = self;
        let mut sink = writer
            .into_inner()
            .map_err(|e| StoreError::parquet("finishing", &data_path, e))?;
        sink.flush()
            .map_err(|e| StoreError::io("writing", &data_path, e))?;
        let data = FileChecksum {
            size: sink.size,
            hash: sink.hasher.finish(),
        };
        let file = sink
            .inner
            .into_inner()
            .map_err(|e| StoreError::io("writing", &data_path, e.into_error()))?;
        let checksums = checksums_of(data);
        let unsynced =
            write_small_files(&dir, parent_to_sync, (data_path, file), &checksums, rows)?;
        let bytes = checksums.total_bytes();
        Ok((
            TempPart {
                dir,
                checksums,
                rows,
                bytes,
            },
            unsynced,
        ))
    }
}

fn data_hash(checksums: &Checksums) -> Hash128 {
    checksums
        .files
        .get(DATA_FILE)
        .map(|c| c.hash)
        .unwrap_or(Hash128(0))
}

fn checksums_of(data: FileChecksum) -> Checksums {
    let mut checksums = Checksums::default();
    checksums.files.insert(DATA_FILE.to_string(), data);
    checksums
}

/// Writes `checksums.txt` and `count.txt` next to the written data file, and opens what
/// the part's fsyncs need: the three files, the directory, and `parent` when given.
fn write_small_files(
    dir: &Path,
    parent: Option<PathBuf>,
    data: (PathBuf, File),
    checksums: &Checksums,
    rows: u64,
) -> Result<Unsynced, StoreError> {
    let checksums_path = dir.join(CHECKSUMS_FILE);
    let count_path = dir.join(COUNT_FILE);
    let checksums_file = write_file(&checksums_path, checksums.render().as_bytes())?;
    let count_file = write_file(&count_path, count_text(rows).as_bytes())?;
    let dir_file = File::open(dir).map_err(|e| StoreError::io("opening", dir, e))?;
    let mut handles = vec![
        data,
        (checksums_path, checksums_file),
        (count_path, count_file),
        (dir.to_path_buf(), dir_file),
    ];
    if let Some(parent) = parent {
        let parent_file = File::open(&parent).map_err(|e| StoreError::io("opening", &parent, e))?;
        handles.push((parent, parent_file));
    }
    Ok(Unsynced::new(handles))
}

fn count_text(rows: u64) -> String {
    format!("{rows}\n")
}

/// A small part encoded in memory and not yet on disk: a quorum insert's own part. Its
/// number, and so its directory's name, is known only in the committer, which writes it
/// under its staged name while the same bytes go to the peers (no read back from disk).
#[derive(Debug, Clone)]
pub struct EncodedPart {
    pub data: bytes::Bytes,
    pub checksums: Checksums,
    pub rows: u64,
}

impl EncodedPart {
    /// The XXH3-128 of `data.parquet`, as [`TempPart::data_hash`] gives for the same rows.
    pub fn data_hash(&self) -> Hash128 {
        data_hash(&self.checksums)
    }

    /// The part's files, named as in its directory.
    pub fn files(&self) -> [(&'static str, bytes::Bytes); 3] {
        [
            (DATA_FILE, self.data.clone()),
            (
                CHECKSUMS_FILE,
                bytes::Bytes::from(self.checksums.render().into_bytes()),
            ),
            (
                COUNT_FILE,
                bytes::Bytes::from(count_text(self.rows).into_bytes()),
            ),
        ]
    }
}

/// Sorts one insert's rows by ORDER BY and encodes them as the part [`write_temp`] would
/// write (the same bytes), in memory.
pub fn encode(
    store: &PartStore,
    batch: &RecordBatch,
    schema: &TableSchema,
) -> Result<EncodedPart, StoreError> {
    let context = store.parts_dir();
    let conformed = conform(store, batch, schema)?;
    let properties = parquet_writer_properties_for(batch);
    let mut output = ParquetOutput::with_properties(Vec::new(), conformed.schema(), properties)
        .map_err(|e| StoreError::parquet("starting", context, e))?;
    output
        .write(&conformed)
        .map_err(|e| StoreError::parquet("writing", context, e))?;
    let data = output
        .finish()
        .map_err(|e| StoreError::parquet("finishing", context, e))?;
    let mut hasher = FileHasher::default();
    hasher.update(&data);
    let checksum = FileChecksum {
        size: data.len() as u64,
        hash: hasher.finish(),
    };
    Ok(EncodedPart {
        data: bytes::Bytes::from(data),
        checksums: checksums_of(checksum),
        rows: conformed.num_rows() as u64,
    })
}

/// Writes an encoded part straight into `staged_<name>`, its fsyncs (files, directory and
/// `parts/`, which holds the new name) left to the caller.
pub fn write_encoded_staged(
    store: &PartStore,
    part: &EncodedPart,
    name: &PartName,
) -> Result<(StagedPart, Unsynced), StoreError> {
    let dir = store.new_staged_dir(name)?;
    let written = (|| {
        let data_path = dir.join(DATA_FILE);
        let file = write_file(&data_path, &part.data)?;
        let parent = Some(store.parts_dir().to_path_buf());
        write_small_files(&dir, parent, (data_path, file), &part.checksums, part.rows)
    })();
    match written {
        Ok(unsynced) => Ok((
            StagedPart {
                name: name.clone(),
                dir,
                rows: part.rows,
                checksums: part.checksums.clone(),
            },
            unsynced,
        )),
        Err(e) => {
            let _ignored = fs::remove_dir_all(&dir);
            Err(e)
        }
    }
}

/// Creates a small file with `bytes`, left open for its fsync.
fn write_file(path: &Path, bytes: &[u8]) -> Result<File, StoreError> {
    let mut file = File::create(path).map_err(|e| StoreError::io("creating", path, e))?;
    file.write_all(bytes)
        .map_err(|e| StoreError::io("writing", path, e))?;
    Ok(file)
}

/// Writes one insert's rows as a temporary part: sorted by the table's ORDER BY (stable;
/// already sorted input is left as is), one Parquet file, checksums and count, all fsynced.
pub fn write_temp(
    store: &PartStore,
    batch: &RecordBatch,
    schema: &TableSchema,
) -> Result<TempPart, StoreError> {
    let (part, unsynced) = write_temp_unsynced(store, batch, schema)?;
    sync_or_remove(part, unsynced)
}

/// [`write_temp`] with the fsyncs left to the caller (an insert runs them alongside its
/// commit).
pub fn write_temp_unsynced(
    store: &PartStore,
    batch: &RecordBatch,
    schema: &TableSchema,
) -> Result<(TempPart, Unsynced), StoreError> {
    write_sorted(
        PartWriter::create(
            store,
            schema,
            "insert",
            parquet_writer_properties_for(batch),
        )?,
        store,
        batch,
        schema,
    )
}

/// Fsyncs a written part, or removes it when that fails.
fn sync_or_remove(part: TempPart, unsynced: Unsynced) -> Result<TempPart, StoreError> {
    match unsynced.sync() {
        Ok(()) => Ok(part),
        Err(e) => {
            let _ignored = fs::remove_dir_all(&part.dir);
            Err(e)
        }
    }
}

/// Sorts `batch` by ORDER BY and writes it with `writer` (removed again on failure); the
/// fsyncs are left to the caller.
fn write_sorted(
    mut writer: PartWriter,
    store: &PartStore,
    batch: &RecordBatch,
    schema: &TableSchema,
) -> Result<(TempPart, Unsynced), StoreError> {
    let sorted = match sort_by_key(batch, &schema.order_by) {
        Ok(sorted) => sorted,
        Err(e) => {
            let _ignored = writer.abort();
            return Err(StoreError::arrow("sorting rows for", store.parts_dir(), e));
        }
    };
    if let Err(e) = writer.write(&sorted) {
        let _ignored = writer.abort();
        return Err(e);
    }
    writer.finish_unsynced()
}

/// Sorts one block by ORDER BY and labels it with the table's Arrow schema, which checks
/// column types and that non-Nullable columns hold no null: what [`write_temp`] would
/// refuse is refused here, before the block is shared with other inserts.
pub fn conform(
    store: &PartStore,
    batch: &RecordBatch,
    schema: &TableSchema,
) -> Result<RecordBatch, StoreError> {
    let sorted = sort_by_key(batch, &schema.order_by)
        .map_err(|e| StoreError::arrow("sorting rows for", store.parts_dir(), e))?;
    RecordBatch::try_new(arrow_schema(schema), sorted.columns().to_vec()).map_err(|e| {
        StoreError::arrow(
            "matching rows to the table schema for",
            store.parts_dir(),
            e,
        )
    })
}

/// [`write_shared`] straight into `staged_<name>` (the block number is reserved already),
/// with its fsyncs left to the caller: one batch makes the part and its directory entry
/// durable, and no rename follows.
pub fn write_shared_staged(
    store: &PartStore,
    blocks: &[&RecordBatch],
    schema: &TableSchema,
    name: &PartName,
) -> Result<(StagedPart, Unsynced), StoreError> {
    let combined = combine(store, blocks, schema)?;
    let properties = parquet_writer_properties_for(&combined);
    let writer = PartWriter::create_staged(store, schema, name, properties)?;
    let (temp, unsynced) = write_sorted(writer, store, &combined, schema)?;
    Ok((
        StagedPart {
            name: name.clone(),
            dir: temp.dir,
            rows: temp.rows,
            checksums: temp.checksums,
        },
        unsynced,
    ))
}

/// Writes conformed blocks of several inserts as one temporary part, sorted by ORDER BY
/// (stable, so rows with equal keys keep the blocks' order).
pub fn write_shared(
    store: &PartStore,
    blocks: &[&RecordBatch],
    schema: &TableSchema,
) -> Result<TempPart, StoreError> {
    write_temp(store, &combine(store, blocks, schema)?, schema)
}

/// Concatenates conformed blocks into one batch of the table's schema.
fn combine(
    store: &PartStore,
    blocks: &[&RecordBatch],
    schema: &TableSchema,
) -> Result<RecordBatch, StoreError> {
    arrow::compute::concat_batches(&arrow_schema(schema), blocks.iter().copied())
        .map_err(|e| StoreError::arrow("combining inserts for", store.parts_dir(), e))
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::rows::{self, InputFormat};
    use crate::store::verify;
    use rtable_protocol::schema::{Column, TableSchema};

    fn table() -> TableSchema {
        TableSchema::new(
            vec![
                Column {
                    name: "id".into(),
                    ty: "UInt64".parse().expect("type"),
                },
                Column {
                    name: "name".into(),
                    ty: "Nullable(String)".parse().expect("type"),
                },
            ],
            vec!["id".into()],
            "tuple()".parse().expect("partition key"),
        )
        .expect("schema")
    }

    #[test]
    fn an_encoded_part_is_the_part_written_to_disk() {
        let dir = tempfile::tempdir().expect("tempdir");
        let (store, _) = PartStore::open(dir.path()).expect("store");
        let table = table();
        // Unsorted on purpose: both ways sort by ORDER BY.
        let body =
            "{\"id\":3,\"name\":\"c\"}\n{\"id\":1,\"name\":null}\n{\"id\":2,\"name\":\"b\"}\n";
        let batch = rows::decode(InputFormat::JsonEachRow, body.as_bytes(), &table).expect("rows");
        let written = write_temp(&store, &batch, &table).expect("write");
        let encoded = encode(&store, &batch, &table).expect("encode");
        assert_eq!(encoded.rows, 3);
        assert_eq!(encoded.checksums, written.checksums);
        assert_eq!(encoded.data_hash(), written.data_hash());
        let on_disk = fs::read(written.dir.join(DATA_FILE)).expect("read");
        assert_eq!(encoded.data.as_ref(), on_disk.as_slice());
        for (file, bytes) in encoded.files() {
            let disk = fs::read(written.dir.join(file)).expect("read");
            assert_eq!(bytes.as_ref(), disk.as_slice(), "{file}");
        }

        let name: PartName = "all_7_7_0".parse().expect("name");
        let (staged, unsynced) = write_encoded_staged(&store, &encoded, &name).expect("stage");
        unsynced.sync().expect("fsync");
        assert_eq!(staged.dir, store.parts_dir().join("staged_all_7_7_0"));
        let (checksums, rows) = verify::verify_part_dir(&staged.dir).expect("verifies");
        assert_eq!((checksums, rows), (written.checksums.clone(), 3));
        // A second part under the same name is refused, never written over the first.
        assert!(write_encoded_staged(&store, &encoded, &name).is_err());
        assert!(verify::verify_part_dir(&staged.dir).is_ok());
    }

    fn compression_of(data: &bytes::Bytes) -> parquet::basic::Compression {
        use parquet::file::reader::{FileReader, SerializedFileReader};
        let reader = SerializedFileReader::new(data.clone()).expect("parquet");
        reader.metadata().row_group(0).column(0).compression()
    }

    #[test]
    fn tiny_inserts_are_stored_uncompressed_and_larger_ones_zstd() {
        use parquet::basic::Compression;
        let dir = tempfile::tempdir().expect("tempdir");
        let (store, _) = PartStore::open(dir.path()).expect("store");
        let table = table();
        let rows = |n: u64| {
            let body: String = (0..n)
                .map(|i| format!("{{\"id\":{i},\"name\":\"user number {i}\"}}\n"))
                .collect();
            rows::decode(InputFormat::JsonEachRow, body.as_bytes(), &table).expect("rows")
        };
        let tiny = encode(&store, &rows(3), &table).expect("encode");
        assert_eq!(compression_of(&tiny.data), Compression::UNCOMPRESSED);
        let large = encode(&store, &rows(5000), &table).expect("encode");
        assert!(matches!(compression_of(&large.data), Compression::ZSTD(_)));
        // Written to disk, the same rows give the same bytes either way.
        let written = write_temp(&store, &rows(5000), &table).expect("write");
        assert_eq!(written.checksums, large.checksums);
    }
}
