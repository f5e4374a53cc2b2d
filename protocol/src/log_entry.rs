//! Log and queue entries (`log/log-N`, `replicas/<r>/queue/queue-N`) in ClickHouse's text
//! format. rtable writes version 4; parsing accepts 4..=7 because queue entries are byte
//! copies of whatever a log writer produced, and keeps verbs it does not execute as `Other`.
//!
//! Known losses on a parse/render round trip, all fields ClickHouse reads as optional:
//! a merge's `into_uuid:` and `deduplicate_by_columns:` lines (rtable has no part UUIDs
//! and never deduplicates by columns).

use crate::codec::{CodecError, Lines, render_time};

const WHAT: &str = "log entry";
const MIN_VERSION: u32 = 4;
/// The first version whose header carries a mandatory `log_entry_id:` line.
const LOG_ENTRY_ID_VERSION: u32 = 7;
const MAX_VERSION: u32 = 7;

#[derive(Debug, Clone, PartialEq, Eq)]
pub enum LogEntryKind {
    Get {
        part: String,
    },
    Attach {
        part: String,
        checksum: String,
    },
    Merge {
        sources: Vec<String>,
        into: String,
        deduplicate: bool,
        merge_type: Option<u32>,
    },
    Drop {
        range: String,
    },
    /// A verb rtable does not execute (`detach`, `mutate`, `alter`, `REPLACE_RANGE`, ...).
    /// The body lines are kept verbatim so the entry renders back byte for byte.
    Other {
        type_line: String,
        body: Vec<String>,
    },
}

/// One log entry.
///
/// `create_time` is unix seconds. ClickHouse renders it in the writer's local time zone;
/// rtable renders and parses it as UTC, which agrees because rtable pods run in UTC.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct LogEntry {
    pub format_version: u32,
    pub create_time: i64,
    pub source_replica: String,
    pub block_id: String,
    /// Version 7+ only; ClickHouse requires the line whenever the version says 7, so it is
    /// kept to render such an entry back readable.
    pub log_entry_id: Option<String>,
    pub kind: LogEntryKind,
    /// `part_type: Compact` trailer (ClickHouse writes it only for non-Wide parts).
    pub compact: bool,
    pub quorum: u32,
}

impl LogEntry {
    fn new(
        source_replica: &str,
        block_id: &str,
        kind: LogEntryKind,
        quorum: u32,
        create_time: i64,
    ) -> LogEntry {
        LogEntry {
            format_version: MIN_VERSION,
            create_time,
            source_replica: source_replica.to_string(),
            block_id: block_id.to_string(),
            log_entry_id: None,
            kind,
            compact: false,
            quorum,
        }
    }

    pub fn get(
        source_replica: &str,
        block_id: &str,
        part: &str,
        quorum: u32,
        create_time: i64,
    ) -> LogEntry {
        Self::new(
            source_replica,
            block_id,
            LogEntryKind::Get {
                part: part.to_string(),
            },
            quorum,
            create_time,
        )
        .making_a_part()
    }

    pub fn merge(
        source_replica: &str,
        sources: Vec<String>,
        into: &str,
        create_time: i64,
    ) -> LogEntry {
        Self::new(
            source_replica,
            "",
            LogEntryKind::Merge {
                sources,
                into: into.to_string(),
                deduplicate: false,
                merge_type: None,
            },
            0,
            create_time,
        )
        .making_a_part()
    }

    /// An rtable part is one data file holding every column, what ClickHouse calls a
    /// Compact part; ClickHouse names the type of every non-Wide part an entry makes.
    fn making_a_part(mut self) -> LogEntry {
        self.compact = true;
        self
    }

    pub fn drop_range(source_replica: &str, range: &str, create_time: i64) -> LogEntry {
        Self::new(
            source_replica,
            "",
            LogEntryKind::Drop {
                range: range.to_string(),
            },
            0,
            create_time,
        )
    }

    /// The name system.replication_queue shows in `type`.
    pub fn type_name(&self) -> &'static str {
        match self.kind {
            LogEntryKind::Get { .. } => "GET_PART",
            LogEntryKind::Attach { .. } => "ATTACH_PART",
            LogEntryKind::Merge { .. } => "MERGE_PARTS",
            LogEntryKind::Drop { .. } => "DROP_RANGE",
            LogEntryKind::Other { .. } => "UNKNOWN",
        }
    }

    /// The part this entry produces (for a drop: the covering range).
    pub fn new_part_name(&self) -> Option<String> {
        match &self.kind {
            LogEntryKind::Get { part } | LogEntryKind::Attach { part, .. } => Some(part.clone()),
            LogEntryKind::Merge { into, .. } => Some(into.clone()),
            LogEntryKind::Drop { range } => Some(range.clone()),
            LogEntryKind::Other { .. } => None,
        }
    }

    pub fn source_parts(&self) -> Vec<String> {
        match &self.kind {
            LogEntryKind::Merge { sources, .. } => sources.clone(),
            _ => Vec::new(),
        }
    }

    pub fn render(&self) -> String {
        let time = render_time(self.create_time);
        let mut out = format!(
            "format version: {}\ncreate_time: {time}\nsource replica: {}\nblock_id: {}\n",
            self.format_version, self.source_replica, self.block_id
        );
        if self.format_version >= LOG_ENTRY_ID_VERSION {
            out.push_str("log_entry_id: ");
            out.push_str(self.log_entry_id.as_deref().unwrap_or_default());
            out.push('\n');
        }
        match &self.kind {
            LogEntryKind::Get { part } => out.push_str(&format!("get\n{part}")),
            LogEntryKind::Attach { part, checksum } => {
                out.push_str(&format!("attach\n{part}\npart_checksum: {checksum}"))
            }
            LogEntryKind::Merge {
                sources,
                into,
                deduplicate,
                merge_type,
            } => {
                out.push_str("merge\n");
                for s in sources {
                    out.push_str(s);
                    out.push('\n');
                }
                out.push_str(&format!(
                    "into\n{into}\ndeduplicate: {}",
                    u8::from(*deduplicate)
                ));
                if let Some(t) = merge_type {
                    out.push_str(&format!("\nmerge_type: {t}"));
                }
            }
            LogEntryKind::Drop { range } => out.push_str(&format!("drop\n{range}")),
            LogEntryKind::Other { type_line, body } => {
                out.push_str(type_line);
                for line in body {
                    out.push('\n');
                    out.push_str(line);
                }
            }
        }
        out.push('\n');
        if self.compact {
            out.push_str("part_type: Compact\n");
        }
        if self.quorum > 0 {
            out.push_str(&format!("quorum: {}\n", self.quorum));
        }
        out
    }

    pub fn parse(text: &str) -> Result<LogEntry, CodecError> {
        let mut lines = Lines::new(WHAT, text);
        let format_version: u32 = lines.number("format version: ")?;
        if !(MIN_VERSION..=MAX_VERSION).contains(&format_version) {
            return Err(lines.error(format!(
                "unsupported format version {format_version}, expected {MIN_VERSION}..={MAX_VERSION}"
            )));
        }
        let create_time = lines.time("create_time: ")?;
        let source_replica = lines.field("source replica: ")?.to_string();
        let block_id = lines.field("block_id: ")?.to_string();
        let log_entry_id = if format_version >= LOG_ENTRY_ID_VERSION {
            Some(lines.field("log_entry_id: ")?.to_string())
        } else {
            None
        };
        let verb = lines.next_line("an entry type")?;
        let body_start = lines.line() + 1;
        let mut body = lines.rest();
        // The body is followed by `\n` and then only the optional trailer lines, so peel
        // them off the end; what remains is exactly the verb's body.
        if body.last() == Some(&"") {
            body.pop();
        } else {
            return Err(CodecError::new(
                WHAT,
                body_start + body.len().saturating_sub(1),
                "missing the newline that ends an entry",
            ));
        }
        let mut quorum = 0;
        if let Some(q) = body.last().and_then(|l| l.strip_prefix("quorum: ")) {
            let at = body_start + body.len() - 1;
            quorum = q
                .parse()
                .map_err(|_| CodecError::new(WHAT, at, format!("bad quorum `{q}`")))?;
            // Writers omit the line without a quorum. Dropping a `quorum: 0` would let a
            // line above it that looks like a trailer be peeled as one when the entry is
            // read again, so the entry would not read back as itself.
            if quorum == 0 {
                return Err(CodecError::new(
                    WHAT,
                    at,
                    "`quorum: 0` is never written: an entry without a quorum has no `quorum:` line",
                ));
            }
            body.pop();
        }
        let mut compact = false;
        if let Some(t) = body.last().and_then(|l| l.strip_prefix("part_type: ")) {
            // ClickHouse names the type of non-Wide parts only, and rtable's parts are
            // Compact; any other type would be lost on rendering (see `quorum: 0`).
            if t != "Compact" {
                return Err(CodecError::new(
                    WHAT,
                    body_start + body.len() - 1,
                    format!(
                        "unsupported `part_type: {t}`: rtable reads Compact parts (and Wide ones, written without the line)"
                    ),
                ));
            }
            compact = true;
            body.pop();
        }
        let body = Body {
            lines: body,
            first_line: body_start,
        };
        let kind = match verb {
            "get" => {
                let [part] = body.exact(["a part name"])?;
                LogEntryKind::Get {
                    part: body.non_empty(0, part)?,
                }
            }
            "attach" => {
                let [part, checksum] = body.exact(["a part name", "`part_checksum: `"])?;
                LogEntryKind::Attach {
                    part: body.non_empty(0, part)?,
                    checksum: body.field(1, checksum, "part_checksum: ")?,
                }
            }
            "drop" => {
                let [range] = body.exact(["a part range"])?;
                LogEntryKind::Drop {
                    range: body.non_empty(0, range)?,
                }
            }
            "merge" => parse_merge(&body)?,
            "" => {
                return Err(CodecError::new(
                    WHAT,
                    body_start - 1,
                    "expected an entry type, got an empty line",
                ));
            }
            other if other.contains(' ') => {
                return Err(CodecError::new(
                    WHAT,
                    body_start - 1,
                    format!("expected an entry type, got `{other}`"),
                ));
            }
            other => LogEntryKind::Other {
                type_line: other.to_string(),
                body: body.lines.iter().map(|l| l.to_string()).collect(),
            },
        };
        Ok(LogEntry {
            format_version,
            create_time,
            source_replica,
            block_id,
            log_entry_id,
            kind,
            compact,
            quorum,
        })
    }
}

/// The lines between an entry's verb and its trailer, with their position in the input.
struct Body<'a> {
    lines: Vec<&'a str>,
    first_line: usize,
}

impl<'a> Body<'a> {
    fn error(&self, index: usize, message: impl Into<String>) -> CodecError {
        CodecError::new(WHAT, self.first_line + index, message)
    }

    /// Exactly `N` lines, or an error naming the first missing or extra one.
    fn exact<const N: usize>(&self, expected: [&str; N]) -> Result<[&'a str; N], CodecError> {
        if let Some(missing) = expected.get(self.lines.len()) {
            return Err(self.error(
                self.lines.len(),
                format!("unexpected end, expected {missing}"),
            ));
        }
        if let Some(extra) = self.lines.get(N) {
            return Err(self.error(N, format!("unexpected line `{extra}`")));
        }
        let mut out = [""; N];
        out.copy_from_slice(&self.lines[..N]);
        Ok(out)
    }

    fn non_empty(&self, index: usize, line: &str) -> Result<String, CodecError> {
        if line.is_empty() {
            return Err(self.error(index, "expected a part name, got an empty line"));
        }
        Ok(line.to_string())
    }

    fn field(&self, index: usize, line: &str, prefix: &str) -> Result<String, CodecError> {
        line.strip_prefix(prefix)
            .map(str::to_string)
            .ok_or_else(|| self.error(index, format!("expected `{prefix}`, got `{line}`")))
    }
}

fn parse_merge(body: &Body<'_>) -> Result<LogEntryKind, CodecError> {
    let into_at = body
        .lines
        .iter()
        .position(|l| *l == "into")
        .ok_or_else(|| body.error(body.lines.len(), "merge without an `into` line"))?;
    if into_at == 0 {
        return Err(body.error(0, "merge without source parts"));
    }
    let mut sources = Vec::with_capacity(into_at);
    for (i, s) in body.lines[..into_at].iter().enumerate() {
        sources.push(body.non_empty(i, s)?);
    }
    let into_line = body
        .lines
        .get(into_at + 1)
        .ok_or_else(|| body.error(into_at + 1, "unexpected end, expected the merged part"))?;
    let into = body.non_empty(into_at + 1, into_line)?;
    let dedup_at = into_at + 2;
    let dedup = body
        .lines
        .get(dedup_at)
        .ok_or_else(|| body.error(dedup_at, "unexpected end, expected `deduplicate: `"))?;
    let deduplicate = match body.field(dedup_at, dedup, "deduplicate: ")?.as_str() {
        "0" => false,
        "1" => true,
        v => {
            return Err(body.error(
                dedup_at,
                format!("`deduplicate: ` must be 0 or 1, got `{v}`"),
            ));
        }
    };
    let mut merge_type = None;
    for (i, line) in body.lines.iter().enumerate().skip(dedup_at + 1) {
        if let Some(t) = line.strip_prefix("merge_type: ") {
            merge_type = Some(
                t.parse()
                    .map_err(|_| body.error(i, format!("bad merge_type `{t}`")))?,
            );
        } else if !(line.starts_with("into_uuid: ") || line.starts_with("deduplicate_by_columns: "))
        {
            return Err(body.error(i, format!("unexpected line `{line}` in a merge")));
        }
    }
    Ok(LogEntryKind::Merge {
        sources,
        into,
        deduplicate,
        merge_type,
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn entries_that_make_a_part_name_its_type_as_clickhouse_does() {
        let get = LogEntry::get("r1", "b", "all_1_1_0", 0, 0).render();
        assert!(
            get.ends_with("get\nall_1_1_0\npart_type: Compact\n"),
            "{get}"
        );
        let merge = LogEntry::merge("r1", vec!["all_1_1_0".into()], "all_1_1_1", 0).render();
        assert!(
            merge.contains("deduplicate: 0\npart_type: Compact\n"),
            "{merge}"
        );
        let drop = LogEntry::drop_range("r1", "all_0_9_999999999", 0).render();
        assert!(!drop.contains("part_type"), "{drop}");
        for text in [get, merge] {
            assert!(LogEntry::parse(&text).expect("parses").compact);
        }
    }

    // Verbatim from the reference (ClickHouse's format version 4).
    const GET: &str = "format version: 4\ncreate_time: 2024-05-01 12:00:00\nsource replica: r1\nblock_id: 202405_4811843427362810870_12736421098634214512\nget\n202405_17_17_0\npart_type: Compact\nquorum: 2\n";
    const MERGE: &str = "format version: 4\ncreate_time: 2024-05-01 12:00:05\nsource replica: r2\nblock_id: \nmerge\n202405_15_15_0\n202405_16_16_0\n202405_17_17_0\ninto\n202405_15_17_1\ndeduplicate: 0\n";

    #[test]
    fn parses_and_renders_the_reference_get_entry() {
        let e = LogEntry::parse(GET).expect("parses");
        assert_eq!(e.format_version, 4);
        assert_eq!(e.create_time, 1_714_564_800);
        assert_eq!(e.source_replica, "r1");
        assert_eq!(
            e.block_id,
            "202405_4811843427362810870_12736421098634214512"
        );
        assert_eq!(
            e.kind,
            LogEntryKind::Get {
                part: "202405_17_17_0".into()
            }
        );
        assert!(e.compact);
        assert_eq!(e.quorum, 2);
        assert_eq!(e.type_name(), "GET_PART");
        assert_eq!(e.render(), GET);
    }

    #[test]
    fn parses_and_renders_the_reference_merge_entry() {
        let e = LogEntry::parse(MERGE).expect("parses");
        assert_eq!(e.block_id, "");
        assert_eq!(
            e.source_parts(),
            ["202405_15_15_0", "202405_16_16_0", "202405_17_17_0"]
        );
        assert_eq!(e.new_part_name().as_deref(), Some("202405_15_17_1"));
        assert_eq!(e.type_name(), "MERGE_PARTS");
        assert_eq!(e.render(), MERGE);
    }

    #[test]
    fn constructors_round_trip() {
        for e in [
            LogEntry::get("r1", "all_1_2", "all_3_3_0", 0, 1_700_000_000),
            LogEntry::merge(
                "r2",
                vec!["all_1_1_0".into(), "all_2_2_0".into()],
                "all_1_2_1",
                1_700_000_001,
            ),
            LogEntry::drop_range("r3", "all_0_9_999999999_999999999", 1_700_000_002),
        ] {
            assert_eq!(LogEntry::parse(&e.render()).expect("round trip"), e);
        }
        let drop = LogEntry::drop_range("r3", "all_0_9_999999999_999999999", 0);
        assert!(
            drop.render()
                .ends_with("drop\nall_0_9_999999999_999999999\n")
        );
    }

    #[test]
    fn tolerates_newer_writers_and_unknown_verbs() {
        let v7 = "format version: 7\ncreate_time: 2024-05-01 12:00:00\nsource replica: r1\nblock_id: \nlog_entry_id: log-0000000001\nget\nall_1_1_0\n";
        let e = LogEntry::parse(v7).expect("v7");
        assert_eq!(e.new_part_name().as_deref(), Some("all_1_1_0"));
        assert_eq!(e.log_entry_id.as_deref(), Some("log-0000000001"));
        assert_eq!(e.render(), v7);

        let mutate = "format version: 4\ncreate_time: 2024-05-01 12:00:00\nsource replica: r1\nblock_id: \nmutate\nall_1_1_0\nto\nall_1_1_0_2\npart_type: Compact\n";
        let e = LogEntry::parse(mutate).expect("mutate");
        assert_eq!(e.type_name(), "UNKNOWN");
        assert!(e.compact);
        assert_eq!(e.new_part_name(), None);
        assert_eq!(e.render(), mutate);

        // An alter body embeds texts that end in `\n`, so it contains blank lines.
        let alter = "format version: 4\ncreate_time: 2024-05-01 12:00:00\nsource replica: r1\nblock_id: \nalter\nalter_version\n1\nhave_mutation\n0\ncolumns_str_size:\n44\ncolumns format version: 1\n1 columns:\n`a` UInt8\n\nmetadata_str_size:\n3\nx: \n\n";
        let e = LogEntry::parse(alter).expect("alter");
        assert_eq!(e.render(), alter);

        let replace = "format version: 4\ncreate_time: 2024-05-01 12:00:00\nsource replica: r1\nblock_id: \nREPLACE_RANGE\ndrop_range_name: all_0_5_999999999\nfrom_database: db\nfrom_table: t\nsource_parts: ['all_1_1_0']\nnew_parts: ['all_6_6_0']\npart_checksums: ['00']\ncolumns_version: -1\n";
        let e = LogEntry::parse(replace).expect("replace range");
        assert_eq!(
            e.kind,
            LogEntryKind::Other {
                type_line: "REPLACE_RANGE".into(),
                body: replace.lines().skip(5).map(str::to_string).collect()
            }
        );
        assert_eq!(e.render(), replace);

        let sync = "format version: 4\ncreate_time: 2024-05-01 12:00:00\nsource replica: r1\nblock_id: \nsync_pinned_part_uuids\n";
        assert_eq!(LogEntry::parse(sync).expect("sync").render(), sync);
    }

    /// Found by the `log_entry` fuzz target: trailer lines that rendering drops let the
    /// line above them be read as a trailer the next time, so the entry changed.
    #[test]
    fn trailers_that_would_not_read_back_are_refused() {
        let head = "format version: 4\ncreate_time: 2024-05-01 12:00:00\nsource replica: r1\nblock_id: \nmutate\n";
        let e = LogEntry::parse(&format!("{head}part_type: A\npart_type: B\n")).expect_err("B");
        assert_eq!(e.line, 7);
        assert!(e.message.contains("part_type: B"), "{e}");
        let e = LogEntry::parse(&format!("{head}quorum: 1\nquorum: 0\n")).expect_err("0");
        assert_eq!(e.line, 7);
        assert!(e.message.contains("quorum: 0"), "{e}");
        let stacked =
            format!("{head}part_type: Compact\npart_type: Compact\nquorum: 1\nquorum: 2\n");
        let entry = LogEntry::parse(&stacked).expect("stacked trailers");
        assert_eq!(entry.render(), stacked);
        assert_eq!(LogEntry::parse(&entry.render()).expect("again"), entry);
    }

    #[test]
    fn reads_merge_extensions() {
        let v5 = MERGE
            .replace("format version: 4", "format version: 5")
            .replace(
                "deduplicate: 0\n",
                "deduplicate: 1\nmerge_type: 2\ninto_uuid: 0f0e0d0c-0b0a-0908-0706-050403020100\n",
            );
        let e = LogEntry::parse(&v5).expect("v5 merge");
        assert_eq!(
            e.kind,
            LogEntryKind::Merge {
                sources: vec![
                    "202405_15_15_0".into(),
                    "202405_16_16_0".into(),
                    "202405_17_17_0".into()
                ],
                into: "202405_15_17_1".into(),
                deduplicate: true,
                merge_type: Some(2),
            }
        );
        let rendered = e.render();
        assert!(rendered.ends_with("deduplicate: 1\nmerge_type: 2\n"));
        assert_eq!(LogEntry::parse(&rendered).expect("re-parse"), e);
    }

    #[test]
    fn rejects_malformed() {
        assert!(LogEntry::parse("").is_err());
        assert!(LogEntry::parse("format version: 9\n").is_err());
        let v3 = GET.replace("format version: 4", "format version: 3");
        assert_eq!(LogEntry::parse(&v3).expect_err("v3").line, 1);
        let bad_time = GET.replace("2024-05-01 12:00:00", "yesterday");
        assert_eq!(LogEntry::parse(&bad_time).expect_err("time").line, 2);
        let no_source = GET.replace("source replica: r1\n", "");
        assert_eq!(LogEntry::parse(&no_source).expect_err("source").line, 3);
        let no_id = GET.replace("format version: 4", "format version: 7");
        let e = LogEntry::parse(&no_id).expect_err("v7 needs log_entry_id");
        assert!(e.to_string().contains("log_entry_id"), "{e}");
        assert!(LogEntry::parse(&GET.replace("get\n", "fly away\n")).is_err());
        assert!(LogEntry::parse(&GET.replace("get\n", "\n")).is_err());
        let e = LogEntry::parse(&GET.replace("quorum: 2", "quorum: two")).expect_err("quorum");
        assert_eq!(e.line, 8);
        assert!(LogEntry::parse(GET.trim_end()).is_err());
        let e = LogEntry::parse(&GET.replace("202405_17_17_0\n", "202405_17_17_0\nextra\n"))
            .expect_err("extra line");
        assert_eq!(e.line, 7);
        assert!(LogEntry::parse(&GET.replace("get\n202405_17_17_0\n", "get\n\n")).is_err());
        let base =
            "format version: 4\ncreate_time: 2024-05-01 12:00:00\nsource replica: r\nblock_id: \n";
        for body in [
            "merge\ninto\nx\ndeduplicate: 0\n",
            "merge\na\nb\n",
            "merge\na\ninto\nb\n",
            "merge\na\ninto\nb\ndeduplicate: 2\n",
            "merge\na\ninto\nb\ndeduplicate: 0\nmerge_type: x\n",
            "merge\na\ninto\nb\ndeduplicate: 0\nsurprise\n",
            "attach\nall_1_1_0\n",
            "attach\nall_1_1_0\nchecksum: 00\n",
            "drop\n",
        ] {
            assert!(
                LogEntry::parse(&format!("{base}{body}")).is_err(),
                "{body:?} must be refused"
            );
        }
        let attach = format!("{base}attach\nall_1_1_0\npart_checksum: 00ff\n");
        let e = LogEntry::parse(&attach).expect("attach");
        assert_eq!(e.type_name(), "ATTACH_PART");
        assert_eq!(e.render(), attach);
    }
}
