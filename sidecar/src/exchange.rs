//! The interserver part-exchange format (rtable's own, over HTTP; ClickHouse's
//! DataPartsExchange plays the same role):
//!
//! ```text
//! rtable-part-exchange 1
//! <file name>\t<size>\t<32-hex xxh3-128>
//! ...
//! <empty line>
//! <the files' bytes, concatenated in the order listed>
//! ```
//!
//! Every hash is verified by the receiver before the part becomes visible.

use std::collections::VecDeque;
use std::fs::File;
use std::io::{ErrorKind, Read, Seek};
use std::path::Path;
use std::sync::Arc;

use rtable_protocol::PartName;
use rtable_protocol::hash::{FileHasher, Hash128};
use rtable_protocol::part_header::Checksums;

use crate::store::{ActivePart, PartStore};

pub const MAGIC: &str = "rtable-part-exchange 1";
/// A part directory holds a handful of files; a header beyond this is not a peer talking.
pub const MAX_HEADER_BYTES: usize = 64 * 1024;
/// The unit a part is read, sent and written in. At 1 MiB the per-chunk costs (a
/// blocking-pool hop, a syscall, a channel message) disappear next to copying the bytes;
/// 4 KiB reads made a 256 MiB transfer run at a small fraction of a plain file copy.
pub const CHUNK_BYTES: usize = 1 << 20;

#[derive(Debug, Clone, PartialEq, Eq)]
pub struct FileEntry {
    pub name: String,
    pub size: u64,
    pub hash: Hash128,
}

#[derive(Debug, thiserror::Error, PartialEq, Eq)]
pub enum ExchangeError {
    #[error("part exchange header line {line}: {message}")]
    Header { line: usize, message: String },
}

fn header_error(line: usize, message: impl Into<String>) -> ExchangeError {
    ExchangeError::Header {
        line,
        message: message.into(),
    }
}

/// A file name a peer may send: one plain path component, never hidden, never `..`.
pub fn is_safe_file_name(name: &str) -> bool {
    !name.is_empty()
        && name.len() <= 255
        && !name.starts_with('.')
        && name
            .chars()
            .all(|c| c.is_ascii_alphanumeric() || c == '_' || c == '-' || c == '.')
}

pub fn render_header(files: &[FileEntry]) -> String {
    let mut out = String::with_capacity(64 + files.len() * 64);
    out.push_str(MAGIC);
    out.push('\n');
    for f in files {
        out.push_str(&format!("{}\t{}\t{}\n", f.name, f.size, f.hash.to_hex()));
    }
    out.push('\n');
    out
}

/// The body [`OutgoingPart`] sends for a part directory holding exactly `files`, built from
/// bytes in memory (a part not yet on disk, or being written while it is sent).
pub fn body_of(files: &[(&str, bytes::Bytes)]) -> bytes::Bytes {
    let mut sorted: Vec<&(&str, bytes::Bytes)> = files.iter().collect();
    sorted.sort_by_key(|(name, _)| *name);
    let entries: Vec<FileEntry> = sorted
        .iter()
        .map(|(name, bytes)| {
            let mut hasher = FileHasher::new();
            hasher.update(bytes);
            FileEntry {
                name: name.to_string(),
                size: bytes.len() as u64,
                hash: hasher.finish(),
            }
        })
        .collect();
    let header = render_header(&entries);
    let mut body =
        Vec::with_capacity(header.len() + files.iter().map(|(_, b)| b.len()).sum::<usize>());
    body.extend_from_slice(header.as_bytes());
    for (_, bytes) in sorted {
        body.extend_from_slice(bytes);
    }
    bytes::Bytes::from(body)
}

/// Parses the header text without its terminating empty line.
pub fn parse_header(text: &str) -> Result<Vec<FileEntry>, ExchangeError> {
    let mut lines = text.lines();
    match lines.next() {
        Some(MAGIC) => {}
        other => {
            return Err(header_error(
                1,
                format!("expected `{MAGIC}`, got `{}`", other.unwrap_or_default()),
            ));
        }
    }
    let mut files: Vec<FileEntry> = Vec::new();
    for (i, line) in lines.enumerate() {
        let n = i + 2;
        if line.is_empty() {
            continue;
        }
        let mut fields = line.split('\t');
        let (Some(name), Some(size), Some(hash), None) =
            (fields.next(), fields.next(), fields.next(), fields.next())
        else {
            return Err(header_error(n, "expected `<name>\\t<size>\\t<hash>`"));
        };
        if !is_safe_file_name(name) {
            return Err(header_error(n, format!("unsafe file name `{name}`")));
        }
        if files.iter().any(|f| f.name == name) {
            return Err(header_error(n, format!("file `{name}` listed twice")));
        }
        let size = size
            .parse::<u64>()
            .map_err(|_| header_error(n, format!("bad size `{size}`")))?;
        let hash =
            Hash128::from_hex(hash).ok_or_else(|| header_error(n, format!("bad hash `{hash}`")))?;
        files.push(FileEntry {
            name: name.to_string(),
            size,
            hash,
        });
    }
    if files.is_empty() {
        return Err(header_error(2, "no files listed"));
    }
    Ok(files)
}

/// Finds the end of the header (the empty line) in a buffer; returns the header text
/// length and the offset where file bytes start.
pub fn header_end(buf: &[u8]) -> Option<(usize, usize)> {
    buf.windows(2)
        .position(|w| w == b"\n\n")
        .map(|p| (p + 1, p + 2))
}

/// A part's files opened for sending: the exchange header, then every file's bytes.
/// The files stay open, so a part retired while it streams is still sent whole.
pub struct OutgoingPart {
    header: Option<Vec<u8>>,
    /// Each file with exactly its listed size left to read.
    files: VecDeque<(String, std::io::Take<File>)>,
    content_length: u64,
}

impl OutgoingPart {
    /// Opens the regular files of a part directory in name order. Sizes and hashes come
    /// from the part's verified checksums, so the data is read once; the files they do
    /// not list (`checksums.txt`, `count.txt`, a few bytes each) are hashed here.
    pub fn open(dir: &Path, known: &Checksums) -> std::io::Result<OutgoingPart> {
        let mut names: Vec<String> = Vec::new();
        for entry in std::fs::read_dir(dir)? {
            let entry = entry?;
            if !entry.file_type()?.is_file() {
                continue;
            }
            if let Ok(name) = entry.file_name().into_string()
                && is_safe_file_name(&name)
            {
                names.push(name);
            }
        }
        names.sort();
        let mut entries = Vec::with_capacity(names.len());
        let mut files = VecDeque::with_capacity(names.len());
        for name in names {
            let mut file = File::open(dir.join(&name))?;
            let on_disk = file.metadata()?.len();
            let (size, hash) = match known.files.get(&name) {
                Some(c) => {
                    // The framing is the listed size: a file that differs must not go out
                    // as if it were the part (the peer would misread every later file).
                    if on_disk != c.size {
                        return Err(std::io::Error::new(
                            ErrorKind::InvalidData,
                            format!(
                                "`{name}` has {on_disk} bytes on disk, its checksums say {}",
                                c.size
                            ),
                        ));
                    }
                    (c.size, c.hash)
                }
                None => {
                    let mut hasher = FileHasher::new();
                    let mut buf = vec![0u8; 64 * 1024];
                    let mut size = 0u64;
                    loop {
                        let n = match file.read(&mut buf) {
                            Ok(0) => break,
                            Ok(n) => n,
                            Err(e) if e.kind() == ErrorKind::Interrupted => continue,
                            Err(e) => return Err(e),
                        };
                        hasher.update(&buf[..n]);
                        size += n as u64;
                    }
                    file.rewind()?;
                    (size, hasher.finish())
                }
            };
            entries.push(FileEntry {
                name: name.clone(),
                size,
                hash,
            });
            files.push_back((name, file.take(size)));
        }
        let header = render_header(&entries).into_bytes();
        let content_length = header.len() as u64 + entries.iter().map(|f| f.size).sum::<u64>();
        Ok(OutgoingPart {
            header: Some(header),
            files,
            content_length,
        })
    }

    /// Bytes of the whole exchange body (header included).
    pub fn content_length(&self) -> u64 {
        self.content_length
    }

    /// The next up to `max` bytes of the body (the header leads the first chunk, so a
    /// small part is one chunk); `None` once everything was returned.
    pub fn next_chunk(&mut self, max: usize) -> std::io::Result<Option<Vec<u8>>> {
        let mut buf = Vec::with_capacity(max.max(1));
        if let Some(header) = self.header.take() {
            buf.extend_from_slice(&header);
        }
        while buf.len() < max {
            let Some((name, reader)) = self.files.front_mut() else {
                break;
            };
            let left = reader.limit();
            if left == 0 {
                self.files.pop_front();
                continue;
            }
            let start = buf.len();
            let want = (max - start).min(usize::try_from(left).unwrap_or(usize::MAX));
            buf.resize(start + want, 0);
            match reader.read(&mut buf[start..]) {
                Ok(0) => {
                    return Err(std::io::Error::new(
                        ErrorKind::UnexpectedEof,
                        format!("`{name}` ended {left} bytes before its listed size"),
                    ));
                }
                Ok(n) => buf.truncate(start + n),
                Err(e) if e.kind() == ErrorKind::Interrupted => buf.truncate(start),
                Err(e) => return Err(e),
            }
        }
        Ok(if buf.is_empty() { None } else { Some(buf) })
    }
}

/// An opened part to send, its first chunk, and the active part it came from (held while
/// the body streams, so the part's files outlive a merge that retires it meanwhile).
pub type Opened = (OutgoingPart, Vec<u8>, Option<Arc<ActivePart>>);

/// Opens an active part for sending, or a committed insert in the instant before its
/// activation: a peer asking for it read its name from the committed log entry, so it
/// need not wait for the rename (the open descriptors keep working across it).
pub fn open_for_sending(store: &PartStore, part: &PartName) -> std::io::Result<Option<Opened>> {
    let open = |dir: &Path, known: &Checksums| {
        let mut outgoing = OutgoingPart::open(dir, known)?;
        let first = outgoing.next_chunk(CHUNK_BYTES)?;
        Ok::<_, std::io::Error>((outgoing, first.unwrap_or_default()))
    };
    if store.get(part).is_none()
        && let Some((dir, known)) = store.staged_for_sending(part)
    {
        match open(&dir, &known) {
            Ok((outgoing, first)) => return Ok(Some((outgoing, first, None))),
            // Renamed while we opened it: it is active now.
            Err(e) if e.kind() == ErrorKind::NotFound => {}
            Err(e) => return Err(e),
        }
    }
    let Some(active) = store.get(part) else {
        return Ok(None);
    };
    let (outgoing, first) = open(&active.dir, &active.checksums)?;
    Ok(Some((outgoing, first, Some(active))))
}

#[cfg(test)]
mod tests {
    use super::*;

    fn entry(name: &str, size: u64) -> FileEntry {
        FileEntry {
            name: name.to_string(),
            size,
            hash: rtable_protocol::hash::file_hash(name.as_bytes()),
        }
    }

    #[test]
    fn header_round_trips() {
        let files = vec![entry("data.parquet", 1234), entry("checksums.txt", 80)];
        let text = render_header(&files);
        let (len, start) = header_end(text.as_bytes()).expect("terminated");
        assert_eq!(start, text.len());
        assert_eq!(parse_header(&text[..len]).expect("parses"), files);
    }

    #[test]
    fn refuses_unsafe_names_and_garbage() {
        let bad_name = format!("{MAGIC}\n../etc/passwd\t1\t{}\n", "0".repeat(32));
        assert!(matches!(
            parse_header(&bad_name),
            Err(ExchangeError::Header { line: 2, .. })
        ));
        let hidden = format!("{MAGIC}\n.hidden\t1\t{}\n", "0".repeat(32));
        assert!(parse_header(&hidden).is_err());
        let slash = format!("{MAGIC}\na/b\t1\t{}\n", "0".repeat(32));
        assert!(parse_header(&slash).is_err());
        assert!(parse_header("HTTP/1.1 200 OK\n").is_err());
        let bad_size = format!("{MAGIC}\ndata.parquet\t-1\t{}\n", "0".repeat(32));
        assert!(parse_header(&bad_size).is_err());
        let bad_hash = format!("{MAGIC}\ndata.parquet\t1\txyz\n");
        assert!(parse_header(&bad_hash).is_err());
        assert!(parse_header(&format!("{MAGIC}\n")).is_err());
    }

    #[test]
    fn a_body_built_in_memory_is_the_one_read_from_the_directory() {
        let tmp = tempfile::tempdir().expect("tempdir");
        let files: Vec<(&str, bytes::Bytes)> = vec![
            ("data.parquet", bytes::Bytes::from(vec![7u8; 5000])),
            ("checksums.txt", bytes::Bytes::from_static(b"sums\n")),
            ("count.txt", bytes::Bytes::from_static(b"3\n")),
        ];
        for (name, bytes) in &files {
            std::fs::write(tmp.path().join(name), bytes).expect("write");
        }
        let mut outgoing = OutgoingPart::open(tmp.path(), &Checksums::default()).expect("open");
        let mut from_disk = Vec::new();
        while let Some(chunk) = outgoing.next_chunk(CHUNK_BYTES).expect("read") {
            from_disk.extend_from_slice(&chunk);
        }
        assert_eq!(body_of(&files).as_ref(), from_disk.as_slice());
        assert!(from_disk.starts_with(MAGIC.as_bytes()));
    }

    #[test]
    fn outgoing_part_frames_every_file_in_chunks() {
        let tmp = tempfile::tempdir().expect("tempdir");
        let data: Vec<u8> = (0..300_000u32).map(|i| (i % 251) as u8).collect();
        std::fs::write(tmp.path().join("data.parquet"), &data).expect("write data");
        std::fs::write(tmp.path().join("count.txt"), b"7\n").expect("write count");
        std::fs::create_dir(tmp.path().join("subdir")).expect("mkdir");
        let mut known = Checksums::default();
        known.files.insert(
            "data.parquet".to_string(),
            rtable_protocol::part_header::FileChecksum {
                size: data.len() as u64,
                hash: rtable_protocol::hash::file_hash(&data),
            },
        );
        let mut part = OutgoingPart::open(tmp.path(), &known).expect("open");
        let mut body = Vec::new();
        let mut chunks = 0;
        while let Some(chunk) = part.next_chunk(64 * 1024).expect("chunk") {
            assert!(chunk.len() <= 64 * 1024);
            body.extend_from_slice(&chunk);
            chunks += 1;
        }
        assert!(chunks > 4);
        assert_eq!(body.len() as u64, part.content_length());
        let (len, start) = header_end(&body).expect("header");
        let files = parse_header(std::str::from_utf8(&body[..len]).expect("utf8")).expect("parses");
        let names: Vec<&str> = files.iter().map(|f| f.name.as_str()).collect();
        assert_eq!(names, ["count.txt", "data.parquet"]);
        assert_eq!(files[0].hash, rtable_protocol::hash::file_hash(b"7\n"));
        assert_eq!(&body[start..start + 2], b"7\n");
        assert_eq!(&body[start + 2..], &data[..]);
    }

    #[test]
    fn outgoing_part_refuses_a_file_that_differs_from_its_checksums() {
        let tmp = tempfile::tempdir().expect("tempdir");
        std::fs::write(tmp.path().join("data.parquet"), b"short").expect("write");
        let mut known = Checksums::default();
        known.files.insert(
            "data.parquet".to_string(),
            rtable_protocol::part_header::FileChecksum {
                size: 100,
                hash: rtable_protocol::hash::file_hash(b"short"),
            },
        );
        assert!(OutgoingPart::open(tmp.path(), &known).is_err());
    }
}
