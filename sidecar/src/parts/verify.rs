//! Checks a part directory against its own checksums: every listed file has its size and
//! hash, nothing unlisted is there, and the row count matches the Parquet footer.

use std::io::Read;
use std::path::Path;

use parquet::file::reader::{FileReader, SerializedFileReader};

use rtable_protocol::hash::FileHasher;
use rtable_protocol::part_header::Checksums;

use super::{CHECKSUMS_FILE, COUNT_FILE, DATA_FILE, StoreError, io};

fn broken(path: &Path, message: impl Into<String>) -> StoreError {
    StoreError::Broken {
        path: path.to_path_buf(),
        message: message.into(),
    }
}

/// Returns the row count and checksums of a valid part directory.
pub fn verify_dir(dir: &Path) -> Result<(u64, Checksums), StoreError> {
    let checksums_path = dir.join(CHECKSUMS_FILE);
    let text = std::fs::read_to_string(&checksums_path)
        .map_err(|e| broken(dir, format!("{CHECKSUMS_FILE}: {e}")))?;
    let checksums = Checksums::parse(&text).map_err(|e| broken(dir, e.to_string()))?;
    for name in [DATA_FILE, COUNT_FILE] {
        if !checksums.files.contains_key(name) {
            return Err(broken(
                dir,
                format!("{CHECKSUMS_FILE} does not list {name}"),
            ));
        }
    }
    for entry in std::fs::read_dir(dir).map_err(io("list", dir))? {
        let entry = entry.map_err(io("list", dir))?;
        let name = entry.file_name().to_string_lossy().into_owned();
        if name != CHECKSUMS_FILE && !checksums.files.contains_key(&name) {
            return Err(broken(dir, format!("unexpected file {name}")));
        }
    }
    for (name, expected) in &checksums.files {
        let path = dir.join(name);
        let mut file =
            std::fs::File::open(&path).map_err(|e| broken(dir, format!("{name}: {e}")))?;
        let mut hasher = FileHasher::new();
        let mut size = 0u64;
        let mut buf = vec![0u8; 1 << 16];
        loop {
            let n = file.read(&mut buf).map_err(io("read", &path))?;
            if n == 0 {
                break;
            }
            hasher.update(&buf[..n]);
            size += n as u64;
        }
        if size != expected.size {
            return Err(broken(
                dir,
                format!("{name} has {size} bytes, checksums say {}", expected.size),
            ));
        }
        let actual = hasher.finish();
        if actual != expected.hash {
            return Err(broken(
                dir,
                format!(
                    "{name} hashes to {}, checksums say {}",
                    actual.to_hex(),
                    expected.hash.to_hex()
                ),
            ));
        }
    }
    let count_text = std::fs::read_to_string(dir.join(COUNT_FILE)).map_err(io("read", dir))?;
    let count: u64 = count_text
        .trim()
        .parse()
        .map_err(|_| broken(dir, format!("{COUNT_FILE} is not a number")))?;
    let data = dir.join(DATA_FILE);
    let file = std::fs::File::open(&data).map_err(io("open", &data))?;
    let reader =
        SerializedFileReader::new(file).map_err(|e| broken(dir, format!("{DATA_FILE}: {e}")))?;
    let rows = reader.metadata().file_metadata().num_rows();
    if u64::try_from(rows).ok() != Some(count) {
        return Err(broken(
            dir,
            format!("{COUNT_FILE} says {count} rows, the Parquet file has {rows}"),
        ));
    }
    Ok((count, checksums))
}
