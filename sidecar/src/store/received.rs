//! A handed-off part checked in memory, before any of it touches the disk: the exchange
//! body split into its files, each file's size and hash matching the exchange header,
//! `checksums.txt` listing exactly those files, `count.txt` (when sent) matching the
//! Parquet footer, and the columns readable by this table: what a fetch checks on disk.
//! A handoff is small (at most `--push-max-bytes`), so the peer can answer "verified" at
//! once and let its writes and fsyncs overlap the inserter's commit.

use arrow::datatypes::SchemaRef;
use bytes::Bytes;
use parquet::arrow::arrow_reader::ParquetRecordBatchReaderBuilder;
use rtable_protocol::hash::{Hash128, file_hash};
use rtable_protocol::part_header::Checksums;

use super::verify::{listing_problem, parse_count};
use super::{CHECKSUMS_FILE, COUNT_FILE, DATA_FILE};
use crate::exchange;

/// Why a received part was refused; the message names what was wrong with it.
#[derive(Debug, thiserror::Error, PartialEq, Eq)]
#[error("received part refused: {0}")]
pub struct ReceivedError(String);

fn refuse(message: impl Into<String>) -> ReceivedError {
    ReceivedError(message.into())
}

/// A part's files, verified, and what its directory needs besides them.
#[derive(Debug, Clone)]
pub struct ReceivedPart {
    /// Every file as sent, `checksums.txt` included.
    pub files: Vec<(String, Bytes)>,
    pub checksums: Checksums,
    pub rows: u64,
    /// The `count.txt` to write when the sender sent none (from the Parquet footer).
    pub count_file: Option<String>,
}

struct SentFile {
    name: String,
    bytes: Bytes,
    hash: Hash128,
}

/// Splits an exchange body (header, then each file's bytes in order) and verifies it as a
/// fetch verifies its directory. `table`: this replica's columns, which the part's
/// columns must be a prefix of (or extend).
pub fn verify_received(body: Bytes, table: &SchemaRef) -> Result<ReceivedPart, ReceivedError> {
    let sent = split(body)?;
    let checksums = listed_checksums(&sent)?;
    check_listing(&sent, &checksums)?;
    let data = file(&sent, DATA_FILE).ok_or_else(|| refuse(format!("no {DATA_FILE} sent")))?;
    let footer = ParquetRecordBatchReaderBuilder::try_new(data.clone())
        .map_err(|e| refuse(format!("{DATA_FILE}: {e}")))?;
    let rows = u64::try_from(footer.metadata().file_metadata().num_rows())
        .map_err(|_| refuse(format!("{DATA_FILE} has a negative row count")))?;
    let columns = crate::rows::memory_schema(footer.schema());
    crate::rows::check_prefix(columns.fields(), table.fields())
        .map_err(|e| refuse(format!("{DATA_FILE}: {e}")))?;
    let count_file = match file(&sent, COUNT_FILE) {
        Some(text) => {
            if std::str::from_utf8(text).ok().and_then(parse_count) != Some(rows) {
                return Err(refuse(format!(
                    "{COUNT_FILE} holds `{}`, {DATA_FILE} holds {rows} rows",
                    String::from_utf8_lossy(text).trim()
                )));
            }
            None
        }
        None => Some(format!("{rows}\n")),
    };
    Ok(ReceivedPart {
        files: sent.into_iter().map(|f| (f.name, f.bytes)).collect(),
        checksums,
        rows,
        count_file,
    })
}

fn file<'a>(sent: &'a [SentFile], name: &str) -> Option<&'a Bytes> {
    sent.iter().find(|f| f.name == name).map(|f| &f.bytes)
}

/// The header's files, each checked against its size and hash; nothing may follow them.
fn split(mut body: Bytes) -> Result<Vec<SentFile>, ReceivedError> {
    let head = &body[..body.len().min(exchange::MAX_HEADER_BYTES)];
    let Some((len, start)) = exchange::header_end(head) else {
        return Err(refuse("the exchange header is missing or too long"));
    };
    let text = std::str::from_utf8(&body[..len]).map_err(|_| refuse("header is not UTF-8"))?;
    let entries = exchange::parse_header(text).map_err(|e| refuse(e.to_string()))?;
    let _header = body.split_to(start);
    let mut sent: Vec<SentFile> = Vec::with_capacity(entries.len());
    // `parse_header` refused unsafe and repeated names already.
    for entry in entries {
        let size = usize::try_from(entry.size).unwrap_or(usize::MAX);
        if size > body.len() {
            return Err(refuse(format!(
                "stream ended with {} bytes of {} missing",
                size - body.len(),
                entry.name
            )));
        }
        let bytes = body.split_to(size);
        let hash = file_hash(&bytes);
        if hash != entry.hash {
            return Err(refuse(format!(
                "hash mismatch in {}: header says {}, bytes hash to {}",
                entry.name,
                entry.hash.to_hex(),
                hash.to_hex()
            )));
        }
        sent.push(SentFile {
            name: entry.name,
            bytes,
            hash,
        });
    }
    if !body.is_empty() {
        return Err(refuse("unexpected bytes after the last file"));
    }
    Ok(sent)
}

fn listed_checksums(sent: &[SentFile]) -> Result<Checksums, ReceivedError> {
    let text =
        file(sent, CHECKSUMS_FILE).ok_or_else(|| refuse(format!("no {CHECKSUMS_FILE} sent")))?;
    let text =
        std::str::from_utf8(text).map_err(|_| refuse(format!("{CHECKSUMS_FILE} is not UTF-8")))?;
    Checksums::parse(text).map_err(|e| refuse(format!("{CHECKSUMS_FILE} is malformed: {e}")))
}

/// The files sent are exactly those `checksums.txt` lists (plus it and `count.txt`), each
/// with its listed size and hash.
fn check_listing(sent: &[SentFile], listed: &Checksums) -> Result<(), ReceivedError> {
    if let Some(problem) = listing_problem(listed) {
        return Err(refuse(problem));
    }
    if let Some(name) = listed.files.keys().find(|name| file(sent, name).is_none()) {
        return Err(refuse(format!("`{name}` is missing")));
    }
    for f in sent {
        if f.name == CHECKSUMS_FILE || f.name == COUNT_FILE {
            continue;
        }
        let Some(want) = listed.files.get(&f.name) else {
            return Err(refuse(format!(
                "unexpected file `{}` not listed in {CHECKSUMS_FILE}",
                f.name
            )));
        };
        if want.size != f.bytes.len() as u64 || want.hash != f.hash {
            return Err(refuse(format!(
                "`{}` differs from its line in {CHECKSUMS_FILE}",
                f.name
            )));
        }
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use rtable_protocol::schema::{Column, TableSchema};

    use super::*;
    use crate::exchange::{FileEntry, render_header};
    use crate::rows::{self, InputFormat};
    use crate::store::{PartStore, write_temp};

    fn table(id_type: &str) -> TableSchema {
        let col = |name: &str, ty: &str| Column {
            name: name.into(),
            ty: ty.parse().expect("type"),
        };
        TableSchema::new(
            vec![col("id", id_type), col("msg", "String")],
            vec!["id".into()],
            "tuple()".parse().expect("partition key"),
        )
        .expect("schema")
    }

    /// The files of a freshly written 3-row part of `table`.
    fn part_files(table: &TableSchema) -> Vec<(String, Vec<u8>)> {
        let tmp = tempfile::tempdir().expect("tempdir");
        let (store, _) = PartStore::open(tmp.path()).expect("store");
        let body = "{\"id\":3,\"msg\":\"c\"}\n{\"id\":1,\"msg\":\"a\"}\n{\"id\":2,\"msg\":\"b\"}\n";
        let batch = rows::decode(InputFormat::JsonEachRow, body.as_bytes(), table).expect("rows");
        let temp = write_temp(&store, &batch, table).expect("write");
        let mut files: Vec<(String, Vec<u8>)> = std::fs::read_dir(&temp.dir)
            .expect("list")
            .map(|e| {
                let e = e.expect("entry");
                let name = e.file_name().to_string_lossy().into_owned();
                (name, std::fs::read(e.path()).expect("read"))
            })
            .collect();
        files.sort();
        files
    }

    fn body(files: &[(String, Vec<u8>)]) -> Bytes {
        let entries: Vec<FileEntry> = files
            .iter()
            .map(|(name, bytes)| FileEntry {
                name: name.clone(),
                size: bytes.len() as u64,
                hash: file_hash(bytes),
            })
            .collect();
        let mut out = render_header(&entries).into_bytes();
        for (_, bytes) in files {
            out.extend_from_slice(bytes);
        }
        Bytes::from(out)
    }

    fn refusal(files: &[(String, Vec<u8>)]) -> String {
        let arrow = rows::arrow_schema(&table("UInt64"));
        verify_received(body(files), &arrow)
            .expect_err("refused")
            .to_string()
    }

    #[test]
    fn a_whole_part_verifies_and_every_defect_is_named() {
        let files = part_files(&table("UInt64"));
        let arrow = rows::arrow_schema(&table("UInt64"));
        let good = verify_received(body(&files), &arrow).expect("verifies");
        assert_eq!(good.rows, 3);
        assert_eq!(good.files.len(), files.len());
        assert!(good.checksums.files.contains_key(DATA_FILE));

        // Without count.txt the count comes from the footer.
        let without = |name: &str| -> Vec<(String, Vec<u8>)> {
            files.iter().filter(|(n, _)| n != name).cloned().collect()
        };
        let ok = verify_received(body(&without(COUNT_FILE)), &arrow).expect("verifies");
        assert_eq!(ok.count_file.as_deref(), Some("3\n"));

        let with = |name: &str, bytes: &[u8]| -> Vec<(String, Vec<u8>)> {
            let mut f = without(name);
            f.push((name.to_string(), bytes.to_vec()));
            f
        };
        assert!(refusal(&with(COUNT_FILE, b"4\n")).contains("count.txt holds `4`"));
        assert!(refusal(&with("extra.bin", b"x")).contains("unexpected file `extra.bin`"));
        assert!(refusal(&without(DATA_FILE)).contains("`data.parquet` is missing"));
        assert!(refusal(&without(CHECKSUMS_FILE)).contains("no checksums.txt sent"));

        let mut trailing = body(&files).to_vec();
        trailing.push(b'!');
        let err = verify_received(Bytes::from(trailing), &arrow).expect_err("refused");
        assert!(err.to_string().contains("after the last file"), "{err}");
        let mut short = body(&files).to_vec();
        short.truncate(short.len() - 1);
        let err = verify_received(Bytes::from(short), &arrow).expect_err("refused");
        assert!(err.to_string().contains("missing"), "{err}");
        let err = verify_received(Bytes::from_static(b"not a part"), &arrow).expect_err("refused");
        assert!(err.to_string().contains("header"), "{err}");
    }

    #[test]
    fn a_part_of_other_columns_is_refused() {
        // Same names, but `id` is a Float64 there: no reader of this table could read it.
        let files = part_files(&table("Float64"));
        let err = refusal(&files);
        assert!(err.contains("data.parquet"), "{err}");
    }
}
