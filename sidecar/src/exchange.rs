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

use rtable_protocol::hash::Hash128;

pub const MAGIC: &str = "rtable-part-exchange 1";
/// A part directory holds a handful of files; a header beyond this is not a peer talking.
pub const MAX_HEADER_BYTES: usize = 64 * 1024;

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
}
