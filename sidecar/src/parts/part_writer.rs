//! Writes a sorted batch as a new part in a temporary directory: zstd Parquet, row count,
//! checksums, every file and the directory fsynced before anyone may rename it.

use std::io::Write;
use std::path::{Path, PathBuf};

use arrow::record_batch::RecordBatch;
use parquet::arrow::ArrowWriter;
use parquet::basic::{Compression, ZstdLevel};
use parquet::file::properties::WriterProperties;

use rtable_protocol::hash::{FileHasher, Hash128};
use rtable_protocol::part_header::{Checksums, FileChecksum};
use rtable_protocol::schema::TableSchema;

use super::{CHECKSUMS_FILE, COUNT_FILE, DATA_FILE, PartStore, StoreError, fsync_dir, io};

/// Rows per Parquet row group: big enough for good compression, small enough that a
/// reader streams a large part in bounded memory.
const ROW_GROUP_ROWS: usize = 128 * 1024;

/// A part written to `tmp_insert_*`, not yet named. Dropping it without `into_parts`
/// removes the directory.
#[derive(Debug)]
pub struct TempPart {
    dir: Option<PathBuf>,
    pub rows: u64,
    pub checksums: Checksums,
}

impl TempPart {
    pub fn dir(&self) -> Option<&Path> {
        self.dir.as_deref()
    }

    /// The hash of the data file: identical rows give identical bytes (the writer is
    /// deterministic), so it serves as the insert's dedup id.
    pub fn data_hash(&self) -> Hash128 {
        self.checksums
            .files
            .get(DATA_FILE)
            .map(|c| c.hash)
            .unwrap_or(Hash128(0))
    }

    pub(crate) fn into_parts(mut self) -> (PathBuf, u64, Checksums) {
        let dir = self.dir.take().unwrap_or_default();
        (dir, self.rows, std::mem::take(&mut self.checksums))
    }

    pub(crate) fn discard(mut self) {
        if let Some(dir) = self.dir.take() {
            let _ = std::fs::remove_dir_all(dir);
        }
    }
}

impl Drop for TempPart {
    fn drop(&mut self) {
        if let Some(dir) = self.dir.take() {
            let _ = std::fs::remove_dir_all(dir);
        }
    }
}

/// Hashes and counts what passes through to the file.
struct HashingWriter {
    file: std::fs::File,
    hasher: FileHasher,
    size: u64,
}

impl Write for HashingWriter {
    fn write(&mut self, buf: &[u8]) -> std::io::Result<usize> {
        let n = self.file.write(buf)?;
        self.hasher.update(&buf[..n]);
        self.size += n as u64;
        Ok(n)
    }

    fn flush(&mut self) -> std::io::Result<()> {
        self.file.flush()
    }
}

pub fn writer_properties() -> WriterProperties {
    WriterProperties::builder()
        .set_compression(Compression::ZSTD(ZstdLevel::default()))
        .set_max_row_group_row_count(Some(ROW_GROUP_ROWS))
        // A fixed creator keeps the bytes (and so the dedup hash) stable across builds.
        .set_created_by("rtable".to_string())
        .build()
}

fn write_small(dir: &Path, name: &str, bytes: &[u8]) -> Result<FileChecksum, StoreError> {
    let path = dir.join(name);
    let mut f = std::fs::File::create(&path).map_err(io("create", &path))?;
    f.write_all(bytes).map_err(io("write", &path))?;
    f.sync_all().map_err(io("fsync", &path))?;
    Ok(FileChecksum {
        size: bytes.len() as u64,
        hash: rtable_protocol::hash::file_hash(bytes),
    })
}

/// Writes `batch` (already sorted) as a part in a fresh temporary directory.
pub fn write_temp(
    store: &PartStore,
    batch: &RecordBatch,
    _schema: &TableSchema,
) -> Result<TempPart, StoreError> {
    let dir = store.new_tmp_insert_dir()?;
    let mut temp = TempPart {
        dir: Some(dir.clone()),
        rows: batch.num_rows() as u64,
        checksums: Checksums::default(),
    };
    let data = write_parquet(&dir.join(DATA_FILE), std::slice::from_ref(batch))?;
    temp.checksums.files.insert(DATA_FILE.to_string(), data);
    let count = write_small(&dir, COUNT_FILE, format!("{}\n", temp.rows).as_bytes())?;
    temp.checksums.files.insert(COUNT_FILE.to_string(), count);
    write_small(&dir, CHECKSUMS_FILE, temp.checksums.render().as_bytes())?;
    fsync_dir(&dir)?;
    Ok(temp)
}

/// Writes batches to one Parquet file, fsynced; returns its checksum.
pub fn write_parquet(path: &Path, batches: &[RecordBatch]) -> Result<FileChecksum, StoreError> {
    let schema = batches
        .first()
        .map(|b| b.schema())
        .ok_or_else(|| StoreError::Invariant("a part needs at least one batch".to_string()))?;
    let file = std::fs::File::create(path).map_err(io("create", path))?;
    let out = HashingWriter {
        file,
        hasher: FileHasher::new(),
        size: 0,
    };
    let parquet_error = |e: parquet::errors::ParquetError| StoreError::Parquet {
        path: path.to_path_buf(),
        message: e.to_string(),
    };
    let mut writer =
        ArrowWriter::try_new(out, schema, Some(writer_properties())).map_err(parquet_error)?;
    for b in batches {
        writer.write(b).map_err(parquet_error)?;
    }
    let out = writer.into_inner().map_err(parquet_error)?;
    out.file.sync_all().map_err(io("fsync", path))?;
    Ok(FileChecksum {
        size: out.size,
        hash: out.hasher.finish(),
    })
}
