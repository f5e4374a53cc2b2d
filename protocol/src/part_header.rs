//! rtable's own part header (a documented difference from ClickHouse's binary one): the
//! `checksums.txt` of a part directory and the summary stored in `replicas/<r>/parts/<part>`.

use std::collections::BTreeMap;

use crate::codec::{CodecError, Lines};
use crate::hash::{Hash128, file_hash};

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct FileChecksum {
    pub size: u64,
    pub hash: Hash128,
}

#[derive(Debug, Clone, PartialEq, Eq, Default)]
pub struct Checksums {
    pub files: BTreeMap<String, FileChecksum>,
}

/// File names a part may contain: one plain component, never hidden or `..`.
pub fn is_safe_file_name(name: &str) -> bool {
    !name.is_empty()
        && name.len() <= 255
        && !name.starts_with('.')
        && !name.contains(['/', '\\', '\0'])
        && !name.contains("..")
}

impl Checksums {
    pub fn render(&self) -> String {
        let mut out = format!("checksums format version: 1\n{} files:\n", self.files.len());
        for (name, c) in &self.files {
            out.push_str(&format!("{name}\t{}\t{}\n", c.size, c.hash.to_hex()));
        }
        out
    }

    pub fn parse(text: &str) -> Result<Checksums, CodecError> {
        let mut lines = Lines::new("checksums", text);
        let version = lines.field("checksums format version: ")?;
        if version != "1" {
            return Err(lines.error(format!("unsupported checksums format version `{version}`")));
        }
        let header = lines.next_line("`<N> files:`")?;
        let count: usize = header
            .strip_suffix(" files:")
            .and_then(|n| n.parse().ok())
            .ok_or_else(|| lines.error(format!("expected `<N> files:`, got `{header}`")))?;
        let mut files = BTreeMap::new();
        for _ in 0..count {
            let line = lines.next_line("`<name>\\t<size>\\t<hash>`")?;
            let mut f = line.split('\t');
            let (Some(name), Some(size), Some(hash), None) =
                (f.next(), f.next(), f.next(), f.next())
            else {
                return Err(
                    lines.error(format!("expected `<name>\\t<size>\\t<hash>`, got `{line}`"))
                );
            };
            if !is_safe_file_name(name) {
                return Err(lines.error(format!("unsafe file name `{name}`")));
            }
            let size = size
                .parse()
                .map_err(|_| lines.error(format!("bad size `{size}`")))?;
            let hash =
                Hash128::from_hex(hash).ok_or_else(|| lines.error(format!("bad hash `{hash}`")))?;
            if files
                .insert(name.to_string(), FileChecksum { size, hash })
                .is_some()
            {
                return Err(lines.error(format!("file `{name}` listed twice")));
            }
        }
        match lines.rest().as_slice() {
            [] | [""] => Ok(Checksums { files }),
            _ => Err(crate::codec::CodecError::new(
                "checksums",
                count + 3,
                "text after the last file",
            )),
        }
    }

    /// Identifies the part's content: the hash of the rendered checksums.
    pub fn total_hash(&self) -> Hash128 {
        file_hash(self.render().as_bytes())
    }

    pub fn total_bytes(&self) -> u64 {
        self.files.values().map(|c| c.size).sum()
    }
}

/// The value of `replicas/<r>/parts/<part>`.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct PartHeader {
    pub columns_hash: Hash128,
    pub rows: u64,
    pub bytes: u64,
    pub checksums_hash: Hash128,
}

pub fn columns_hash(columns_text: &str) -> Hash128 {
    file_hash(columns_text.as_bytes())
}

impl PartHeader {
    pub fn new(columns_text: &str, rows: u64, checksums: &Checksums) -> PartHeader {
        PartHeader {
            columns_hash: columns_hash(columns_text),
            rows,
            bytes: checksums.total_bytes(),
            checksums_hash: checksums.total_hash(),
        }
    }

    pub fn render(&self) -> String {
        format!(
            "part header format version: 1\ncolumns hash: {}\nrows: {}\nbytes: {}\nchecksums hash: {}\n",
            self.columns_hash.to_hex(),
            self.rows,
            self.bytes,
            self.checksums_hash.to_hex()
        )
    }

    pub fn parse(text: &str) -> Result<PartHeader, CodecError> {
        let mut lines = Lines::new("part header", text);
        let version = lines.field("part header format version: ")?;
        if version != "1" {
            return Err(lines.error(format!("unsupported part header version `{version}`")));
        }
        let columns = lines.field("columns hash: ")?;
        let columns_hash = Hash128::from_hex(columns)
            .ok_or_else(|| lines.error(format!("bad hash `{columns}`")))?;
        let rows = lines.number("rows: ")?;
        let bytes = lines.number("bytes: ")?;
        let checksums = lines.field("checksums hash: ")?;
        let checksums_hash = Hash128::from_hex(checksums)
            .ok_or_else(|| lines.error(format!("bad hash `{checksums}`")))?;
        Ok(PartHeader {
            columns_hash,
            rows,
            bytes,
            checksums_hash,
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn sample() -> Checksums {
        let mut files = BTreeMap::new();
        files.insert(
            "data.parquet".to_string(),
            FileChecksum {
                size: 1234,
                hash: file_hash(b"data"),
            },
        );
        Checksums { files }
    }

    #[test]
    fn checksums_round_trip() {
        let c = sample();
        let text = c.render();
        assert!(text.starts_with("checksums format version: 1\n1 files:\ndata.parquet\t1234\t"));
        assert_eq!(Checksums::parse(&text).expect("parses"), c);
        assert_eq!(c.total_bytes(), 1234);
        assert_eq!(
            c.total_hash(),
            Checksums::parse(&text).expect("parses").total_hash()
        );
    }

    #[test]
    fn header_round_trips_and_tracks_content() {
        let h = PartHeader::new("columns format version: 1\n0 columns:\n", 10, &sample());
        let text = h.render();
        assert_eq!(PartHeader::parse(&text).expect("parses"), h);
        assert!(text.len() < 200, "headers stay small: {}", text.len());
        let mut other = sample();
        other.files.get_mut("data.parquet").expect("file").size = 1235;
        assert_ne!(
            PartHeader::new("c", 10, &other).checksums_hash,
            h.checksums_hash
        );
    }

    #[test]
    fn rejects_unsafe_and_malformed() {
        let zeros = "0".repeat(32);
        for name in ["../x", "a/b", ".hidden", "a\\b", ""] {
            let text = format!("checksums format version: 1\n1 files:\n{name}\t1\t{zeros}\n");
            assert!(Checksums::parse(&text).is_err(), "{name:?} must be refused");
        }
        assert!(Checksums::parse("checksums format version: 1\n1 files:\nx\t1\tzz\n").is_err());
        assert!(Checksums::parse("checksums format version: 2\n0 files:\n").is_err());
        assert!(PartHeader::parse("part header format version: 1\ncolumns hash: x\n").is_err());
    }
}
