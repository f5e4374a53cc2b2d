//! Log and queue entries (`log/log-N`, `replicas/<r>/queue/queue-N`) in ClickHouse's text
//! format version 4. Queue entries are byte copies of log entries, so parsing tolerates
//! what newer writers add (versions 5-7) and keeps unknown verbs as `Other`.
//!
//! `create_time` is written in the writer's local time zone by ClickHouse; rtable renders
//! and parses it as UTC (the pods run in UTC), so equal instants give equal bytes.

use chrono::{DateTime, NaiveDateTime};

use crate::codec::{CodecError, Lines};

const WHAT: &str = "log entry";
const TIME_FORMAT: &str = "%Y-%m-%d %H:%M:%S";

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
    /// A verb rtable does not execute (mutate, alter, ...): kept so the queue can show it.
    Other {
        type_line: String,
        body: Vec<String>,
    },
}

#[derive(Debug, Clone, PartialEq, Eq)]
pub struct LogEntry {
    pub format_version: u32,
    /// Unix seconds.
    pub create_time: i64,
    pub source_replica: String,
    pub block_id: String,
    pub kind: LogEntryKind,
    /// `part_type: Compact` trailer (ClickHouse writes it only for non-Wide parts).
    pub compact: bool,
    pub quorum: u32,
}

const VERBS: &[&str] = &[
    "get",
    "attach",
    "merge",
    "drop",
    "detach",
    "mutate",
    "alter",
    "clear_column",
    "clear_index",
    "replace_range",
    "sync_pinned_part_uuids",
    "clone_part_from_shard",
];

impl LogEntry {
    fn new(
        source_replica: &str,
        block_id: &str,
        kind: LogEntryKind,
        quorum: u32,
        create_time: i64,
    ) -> LogEntry {
        LogEntry {
            format_version: 4,
            create_time,
            source_replica: source_replica.to_string(),
            block_id: block_id.to_string(),
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
        let time = DateTime::from_timestamp(self.create_time, 0)
            .map(|t| t.naive_utc().format(TIME_FORMAT).to_string())
            .unwrap_or_else(|| "1970-01-01 00:00:00".to_string());
        let mut out = format!(
            "format version: {}\ncreate_time: {time}\nsource replica: {}\nblock_id: {}\n",
            self.format_version, self.source_replica, self.block_id
        );
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
        if !(3..=7).contains(&format_version) {
            return Err(lines.error(format!("unsupported format version {format_version}")));
        }
        let time_text = lines.field("create_time: ")?;
        let create_time = NaiveDateTime::parse_from_str(time_text, TIME_FORMAT)
            .map_err(|_| {
                lines.error(format!(
                    "bad create_time `{time_text}`, expected YYYY-MM-DD hh:mm:ss"
                ))
            })?
            .and_utc()
            .timestamp();
        let source_replica = lines.field("source replica: ")?.to_string();
        let block_id = lines.field("block_id: ")?.to_string();
        // Newer writers add header fields (e.g. `log_entry_id: `) before the verb.
        let verb = loop {
            let line = lines.next_line("an entry type")?;
            if VERBS.contains(&line) {
                break line;
            }
            if !line.contains(": ") {
                return Err(lines.error(format!("unknown entry type `{line}`")));
            }
        };
        let kind = match verb {
            "get" => LogEntryKind::Get {
                part: non_empty(&mut lines, "a part name")?,
            },
            "attach" => {
                let part = non_empty(&mut lines, "a part name")?;
                let checksum = lines.field("part_checksum: ")?.to_string();
                LogEntryKind::Attach { part, checksum }
            }
            "merge" => {
                let mut sources = Vec::new();
                loop {
                    let line = lines.next_line("a source part or `into`")?;
                    if line == "into" {
                        break;
                    }
                    if line.is_empty() {
                        return Err(lines.error("empty source part name"));
                    }
                    sources.push(line.to_string());
                }
                let into = non_empty(&mut lines, "the merged part name")?;
                let deduplicate = match lines.peek() {
                    Some(l) if l.starts_with("deduplicate: ") => {
                        lines.field("deduplicate: ")? == "1"
                    }
                    _ => false,
                };
                let merge_type = match lines.peek() {
                    Some(l) if l.starts_with("merge_type: ") => Some(lines.number("merge_type: ")?),
                    _ => None,
                };
                if sources.is_empty() {
                    return Err(lines.error("merge without source parts"));
                }
                LogEntryKind::Merge {
                    sources,
                    into,
                    deduplicate,
                    merge_type,
                }
            }
            "drop" => LogEntryKind::Drop {
                range: non_empty(&mut lines, "a part range")?,
            },
            other => {
                let type_line = other.to_string();
                let mut body = Vec::new();
                while let Some(l) = lines.peek() {
                    if l.is_empty() || l.starts_with("part_type: ") || l.starts_with("quorum: ") {
                        break;
                    }
                    body.push(lines.next_line("body")?.to_string());
                }
                LogEntryKind::Other { type_line, body }
            }
        };
        let mut compact = false;
        let mut quorum = 0;
        let trailer_start = lines.line();
        for (i, line) in lines.rest().into_iter().enumerate() {
            if let Some(t) = line.strip_prefix("part_type: ") {
                compact = t == "Compact";
            } else if let Some(q) = line.strip_prefix("quorum: ") {
                quorum = q.parse().map_err(|_| {
                    CodecError::new(WHAT, trailer_start + i + 1, format!("bad quorum `{q}`"))
                })?;
            }
            // Other trailers (part uuid, ...) are tolerated: the queue keeps the raw bytes.
        }
        Ok(LogEntry {
            format_version,
            create_time,
            source_replica,
            block_id,
            kind,
            compact,
            quorum,
        })
    }
}

fn non_empty(lines: &mut Lines<'_>, what: &str) -> Result<String, CodecError> {
    let line = lines.next_line(what)?;
    if line.is_empty() {
        return Err(lines.error(format!("expected {what}, got an empty line")));
    }
    Ok(line.to_string())
}

#[cfg(test)]
mod tests {
    use super::*;

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
        let mutate = "format version: 4\ncreate_time: 2024-05-01 12:00:00\nsource replica: r1\nblock_id: \nmutate\nall_1_1_0\nto\nall_1_1_0_2\n";
        let e = LogEntry::parse(mutate).expect("mutate");
        assert_eq!(e.type_name(), "UNKNOWN");
        assert_eq!(e.render(), mutate);
    }

    #[test]
    fn rejects_malformed() {
        assert!(LogEntry::parse("").is_err());
        assert!(LogEntry::parse("format version: 9\n").is_err());
        let bad_time = GET.replace("2024-05-01 12:00:00", "yesterday");
        assert_eq!(LogEntry::parse(&bad_time).expect_err("time").line, 2);
        let no_source = GET.replace("source replica: r1\n", "");
        assert!(LogEntry::parse(&no_source).is_err());
        assert!(LogEntry::parse(&GET.replace("get\n", "fly\n")).is_err());
        assert!(LogEntry::parse(&GET.replace("quorum: 2", "quorum: two")).is_err());
        assert!(LogEntry::parse("format version: 4\ncreate_time: 2024-05-01 12:00:00\nsource replica: r\nblock_id: \nmerge\ninto\nx\n").is_err());
    }
}
