//! Checking a part directory against its `checksums.txt` and `count.txt`, and the small
//! file helpers (hash, fsync) the store shares.

use std::fs::{self, File};
use std::io::{ErrorKind, Read};
use std::path::{Path, PathBuf};

use parquet::file::reader::{FileReader, SerializedFileReader};
use rtable_protocol::hash::{FileHasher, Hash128};
use rtable_protocol::part_header::{Checksums, FileChecksum, is_safe_file_name};

use super::{CHECKSUMS_FILE, COUNT_FILE, DATA_FILE, StoreError};

/// Size and XXH3-128 of a file, streamed.
pub fn hash_file(path: &Path) -> Result<FileChecksum, StoreError> {
    let mut file = File::open(path).map_err(|e| StoreError::io("opening", path, e))?;
    let mut hasher = FileHasher::default();
    let mut buf = vec![0u8; 1 << 20];
    let mut size = 0u64;
    loop {
        let n = match file.read(&mut buf) {
            Ok(0) => break,
            Ok(n) => n,
            Err(e) if e.kind() == ErrorKind::Interrupted => continue,
            Err(e) => return Err(StoreError::io("reading", path, e)),
        };
        hasher.update(&buf[..n]);
        size += n as u64;
    }
    Ok(FileChecksum {
        size,
        hash: hasher.finish(),
    })
}

/// fsync of a file or directory by path.
pub fn sync_path(path: &Path) -> Result<(), StoreError> {
    File::open(path)
        .and_then(|f| f.sync_all())
        .map_err(|e| StoreError::io("fsyncing", path, e))
}

/// Starts writing a file's dirty pages back without waiting (a hint: failures are left to
/// the fsync that follows).
#[cfg(target_os = "linux")]
fn start_writeback(file: &File) {
    use std::os::fd::AsRawFd;
    // SAFETY: a valid open descriptor; the call only schedules writeback of its pages.
    unsafe {
        libc::sync_file_range(file.as_raw_fd(), 0, 0, libc::SYNC_FILE_RANGE_WRITE);
    }
}

#[cfg(not(target_os = "linux"))]
fn start_writeback(_file: &File) {}

/// Writes a small file whose fsync comes later (see [`open_for_sync`]).
fn write_unsynced(path: &Path, bytes: &[u8]) -> Result<(), StoreError> {
    fs::write(path, bytes).map_err(|e| StoreError::io("writing", path, e))
}

/// Row count from the Parquet footer.
pub fn parquet_rows(path: &Path) -> Result<u64, StoreError> {
    let file = File::open(path).map_err(|e| StoreError::io("opening", path, e))?;
    let reader = SerializedFileReader::new(file).map_err(|e| StoreError::Parquet {
        op: "reading the footer of",
        path: path.to_path_buf(),
        source: e,
    })?;
    let rows = reader.metadata().file_metadata().num_rows();
    u64::try_from(rows).map_err(|_| StoreError::corrupt(path, format!("negative row count {rows}")))
}

pub(super) fn parse_count(text: &str) -> Option<u64> {
    let t = text.strip_suffix('\n').unwrap_or(text);
    if t.is_empty() || !t.bytes().all(|b| b.is_ascii_digit()) {
        return None;
    }
    t.parse().ok()
}

/// What a part directory may hold besides the files its checksums list.
fn check_entries(dir: &Path, listed: &Checksums, optional: &[&str]) -> Result<(), StoreError> {
    let entries = fs::read_dir(dir).map_err(|e| StoreError::io("listing", dir, e))?;
    for entry in entries {
        let entry = entry.map_err(|e| StoreError::io("listing", dir, e))?;
        let name = entry.file_name();
        let Some(name) = name.to_str() else {
            return Err(StoreError::corrupt(
                dir,
                format!(
                    "unexpected file {:?} (name is not UTF-8)",
                    entry.file_name()
                ),
            ));
        };
        if !listed.files.contains_key(name) && !optional.contains(&name) {
            return Err(StoreError::corrupt(
                dir,
                format!("unexpected file `{name}` not listed in {CHECKSUMS_FILE}"),
            ));
        }
        let ty = entry
            .file_type()
            .map_err(|e| StoreError::io("inspecting", &entry.path(), e))?;
        if !ty.is_file() {
            return Err(StoreError::corrupt(
                dir,
                format!("`{name}` is not a regular file"),
            ));
        }
    }
    Ok(())
}

/// What is wrong with a `checksums.txt` listing itself, if anything: it must list
/// `data.parquet`, and only names a part may hold. Shared by the directory checks and the
/// in-memory ones of a handed-off part.
pub(super) fn listing_problem(listed: &Checksums) -> Option<String> {
    if !listed.files.contains_key(DATA_FILE) {
        return Some(format!("{CHECKSUMS_FILE} does not list {DATA_FILE}"));
    }
    listed
        .files
        .keys()
        .find(|name| !is_safe_file_name(name) || *name == CHECKSUMS_FILE || *name == COUNT_FILE)
        .map(|name| format!("{CHECKSUMS_FILE} lists `{name}`, which a part may not hold"))
}

/// Checks every listed file's size and hash. A file in `streamed` was hashed from its
/// bytes as they were written into this directory; it is not read back (for a big
/// fetched part that second read cost as much as the download itself).
fn check_files(dir: &Path, listed: &Checksums, streamed: &Checksums) -> Result<(), StoreError> {
    if let Some(problem) = listing_problem(listed) {
        return Err(StoreError::corrupt(dir, problem));
    }
    for (name, want) in &listed.files {
        let path = dir.join(name);
        let meta = match fs::metadata(&path) {
            Ok(m) => m,
            Err(e) if e.kind() == ErrorKind::NotFound => {
                return Err(StoreError::corrupt(dir, format!("`{name}` is missing")));
            }
            Err(e) => return Err(StoreError::io("inspecting", &path, e)),
        };
        if meta.len() != want.size {
            return Err(StoreError::corrupt(
                dir,
                format!(
                    "`{name}` has {} bytes, checksums say {}",
                    meta.len(),
                    want.size
                ),
            ));
        }
        let got = match streamed.files.get(name) {
            Some(known) => *known,
            None => hash_file(&path)?,
        };
        if got.size != want.size || got.hash != want.hash {
            return Err(StoreError::corrupt(
                dir,
                format!(
                    "`{name}` hash is {}, checksums say {}",
                    got.hash.to_hex(),
                    want.hash.to_hex()
                ),
            ));
        }
    }
    Ok(())
}

fn read_text(path: &Path, dir: &Path) -> Result<Option<String>, StoreError> {
    match fs::read(path) {
        Ok(bytes) => String::from_utf8(bytes)
            .map(Some)
            .map_err(|_| StoreError::corrupt(dir, format!("`{}` is not UTF-8", path.display()))),
        Err(e) if e.kind() == ErrorKind::NotFound => Ok(None),
        Err(e) => Err(StoreError::io("reading", path, e)),
    }
}

fn check_count(dir: &Path, text: &str) -> Result<u64, StoreError> {
    let count = parse_count(text).ok_or_else(|| {
        StoreError::corrupt(
            dir,
            format!("{COUNT_FILE} holds `{}`, not a row count", text.trim()),
        )
    })?;
    let rows = parquet_rows(&dir.join(DATA_FILE))?;
    if rows != count {
        return Err(StoreError::corrupt(
            dir,
            format!("{COUNT_FILE} says {count} rows, {DATA_FILE} holds {rows}"),
        ));
    }
    Ok(count)
}

/// Verifies a committed part directory: `checksums.txt` parses, every listed file has its
/// size and hash, nothing unlisted is there, and `count.txt` matches the Parquet footer.
pub fn verify_part_dir(dir: &Path) -> Result<(Checksums, u64), StoreError> {
    let text = read_text(&dir.join(CHECKSUMS_FILE), dir)?
        .ok_or_else(|| StoreError::corrupt(dir, format!("{CHECKSUMS_FILE} is missing")))?;
    let checksums = Checksums::parse(&text)
        .map_err(|e| StoreError::corrupt(dir, format!("{CHECKSUMS_FILE} is malformed: {e}")))?;
    check_entries(dir, &checksums, &[CHECKSUMS_FILE, COUNT_FILE])?;
    check_files(dir, &checksums, &Checksums::default())?;
    let count = read_text(&dir.join(COUNT_FILE), dir)?
        .ok_or_else(|| StoreError::corrupt(dir, format!("{COUNT_FILE} is missing")))?;
    let rows = check_count(dir, &count)?;
    Ok((checksums, rows))
}

/// Verifies a downloaded directory against the checksums the part's owner published and
/// completes it: `checksums.txt` and `count.txt` are written when the download lacks them
/// and must match when it has them. Nothing is fsynced here: the install does it with the
/// descriptors of [`open_for_sync`], after making the part visible.
/// `streamed` holds the sizes and hashes the download computed while writing (empty
/// when unknown): those files are not read again.
pub fn verify_fetched_dir(
    dir: &Path,
    expected: &Checksums,
    streamed: &Checksums,
) -> Result<u64, StoreError> {
    check_entries(dir, expected, &[CHECKSUMS_FILE, COUNT_FILE])?;
    check_files(dir, expected, streamed)?;
    let checksums_path = dir.join(CHECKSUMS_FILE);
    match read_text(&checksums_path, dir)? {
        Some(text) => {
            let got = Checksums::parse(&text).map_err(|e| {
                StoreError::corrupt(dir, format!("fetched {CHECKSUMS_FILE} is malformed: {e}"))
            })?;
            if &got != expected {
                return Err(StoreError::corrupt(
                    dir,
                    format!("fetched {CHECKSUMS_FILE} differs from the expected checksums"),
                ));
            }
        }
        None => write_unsynced(&checksums_path, expected.render().as_bytes())?,
    }
    let count_path = dir.join(COUNT_FILE);
    let rows = match read_text(&count_path, dir)? {
        Some(text) => check_count(dir, &text)?,
        None => {
            let rows = parquet_rows(&dir.join(DATA_FILE))?;
            write_unsynced(&count_path, format!("{rows}\n").as_bytes())?;
            rows
        }
    };
    Ok(rows)
}

/// Open descriptors of a part's files and directories, fsynced later (after the rename that
/// installs a download, or alongside the commit of an insert): they reach the same inodes
/// whatever the paths are by then.
#[derive(Debug)]
pub struct Unsynced {
    handles: Vec<(PathBuf, File)>,
}

impl Unsynced {
    pub fn new(handles: Vec<(PathBuf, File)>) -> Unsynced {
        Unsynced { handles }
    }

    /// Adds one more file or directory to fsync with the rest.
    pub fn with(mut self, path: PathBuf, file: File) -> Unsynced {
        self.handles.push((path, file));
        self
    }

    /// Fsyncs every file and directory, writeback of all of them started first: the disk
    /// then works on them together, and the later fsyncs find little left to wait for.
    /// Each is still fsynced, so this is as durable as fsyncing them one after the other.
    pub fn sync(self) -> Result<(), StoreError> {
        for (_, file) in &self.handles {
            start_writeback(file);
        }
        for (path, file) in &self.handles {
            file.sync_all()
                .map_err(|e| StoreError::io("fsyncing", path, e))?;
        }
        Ok(())
    }
}

/// Opens every listed file, `checksums.txt`, `count.txt` and the directory itself.
pub fn open_for_sync(dir: &Path, expected: &Checksums) -> Result<Unsynced, StoreError> {
    let mut handles = Vec::with_capacity(expected.files.len() + 3);
    let names = expected
        .files
        .keys()
        .map(String::as_str)
        .chain([CHECKSUMS_FILE, COUNT_FILE]);
    for name in names {
        let path = dir.join(name);
        let file = File::open(&path).map_err(|e| StoreError::io("opening", &path, e))?;
        handles.push((path, file));
    }
    let file = File::open(dir).map_err(|e| StoreError::io("opening", dir, e))?;
    handles.push((dir.to_path_buf(), file));
    Ok(Unsynced { handles })
}

/// The data hash of a part: the XXH3-128 of its `data.parquet`.
pub fn data_hash(checksums: &Checksums) -> Option<Hash128> {
    checksums.files.get(DATA_FILE).map(|c| c.hash)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn counts_are_strict_decimals() {
        assert_eq!(parse_count("12\n"), Some(12));
        assert_eq!(parse_count("12"), Some(12));
        assert_eq!(parse_count(" 12\n"), None);
        assert_eq!(parse_count("-1\n"), None);
        assert_eq!(parse_count(""), None);
    }

    #[test]
    fn file_hashes_stream_the_whole_file() {
        let tmp = tempfile::tempdir().expect("tempdir");
        let path = tmp.path().join("f");
        let bytes: Vec<u8> = (0..3_000_000u32).map(|i| (i % 251) as u8).collect();
        std::fs::write(&path, &bytes).expect("write");
        let c = hash_file(&path).expect("hash");
        assert_eq!(c.size, bytes.len() as u64);
        assert_eq!(c.hash, rtable_protocol::hash::file_hash(&bytes));
        assert!(matches!(
            hash_file(&tmp.path().join("missing")),
            Err(StoreError::Io { .. })
        ));
    }
}
