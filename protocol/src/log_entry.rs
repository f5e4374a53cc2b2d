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
    /// `mutate`: rewrite `source` into `into` (same blocks and level, the mutation's
    /// block number as the part's data version).
    Mutate {
        source: String,
        into: String,
        /// `to_uuid` (ClickHouse writes it only for parts with a UUID).
        to_uuid: Option<String>,
        /// Set when the mutation belongs to an ALTER with that metadata version.
        alter_version: Option<i64>,
    },
    /// `alter`: make this replica's `columns` and `metadata` the given texts, recording
    /// `alter_version` as its `metadata_version`; `have_mutation` says a mutation with the
    /// same alter version rewrites the data.
    Alter {
        alter_version: i64,
        have_mutation: bool,
        columns: String,
        metadata: String,
    },
    /// A verb rtable does not execute (`detach`, `REPLACE_RANGE`, ...).
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
            LogEntryKind::Mutate { .. } => "MUTATE_PART",
            LogEntryKind::Alter { .. } => "ALTER_METADATA",
            LogEntryKind::Other { .. } => "UNKNOWN",
        }
    }

    /// The part this entry produces (for a drop: the covering range).
    pub fn new_part_name(&self) -> Option<String> {
        match &self.kind {
            LogEntryKind::Get { part } | LogEntryKind::Attach { part, .. } => Some(part.clone()),
            LogEntryKind::Merge { into, .. } | LogEntryKind::Mutate { into, .. } => {
                Some(into.clone())
            }
            LogEntryKind::Drop { range } => Some(range.clone()),
            LogEntryKind::Alter { .. } | LogEntryKind::Other { .. } => None,
        }
    }

    pub fn source_parts(&self) -> Vec<String> {
        match &self.kind {
            LogEntryKind::Merge { sources, .. } => sources.clone(),
            LogEntryKind::Mutate { source, .. } => vec![source.clone()],
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
            LogEntryKind::Mutate {
                source,
                into,
                to_uuid,
                alter_version,
            } => {
                out.push_str(&format!("mutate\n{source}\nto\n{into}"));
                if let Some(uuid) = to_uuid {
                    out.push_str(&format!("\nto_uuid\n{uuid}"));
                }
                if let Some(v) = alter_version {
                    out.push_str(&format!("\nalter_version\n{v}"));
                }
            }
            LogEntryKind::Alter {
                alter_version,
                have_mutation,
                columns,
                metadata,
            } => out.push_str(&format!(
                "alter\nalter_version\n{alter_version}\nhave_mutation\n{}\ncolumns_str_size:\n{}\n{columns}\nmetadata_str_size:\n{}\n{metadata}",
                u8::from(*have_mutation),
                columns.len(),
                metadata.len()
            )),
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
        let body = lines.rest();
        let (kind, compact, quorum) = if verb == "alter" {
            // Its texts are measured in bytes and may hold any line, trailers included.
            (parse_alter(&body.join("\n"), body_start)?, false, 0)
        } else {
            parse_lines(verb, body, body_start)?
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

/// The body of an entry whose fields are lines, its trailer (`part_type`, `quorum`) peeled
/// off the end: the kind, whether the part is Compact, and the quorum.
fn parse_lines(
    verb: &str,
    mut body: Vec<&str>,
    body_start: usize,
) -> Result<(LogEntryKind, bool, u32), CodecError> {
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
        "mutate" => parse_mutate(&body)?,
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
    Ok((kind, compact, quorum))
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

fn parse_mutate(body: &Body<'_>) -> Result<LogEntryKind, CodecError> {
    let source = body
        .lines
        .first()
        .ok_or_else(|| body.error(0, "unexpected end, expected the source part"))?;
    let source = body.non_empty(0, source)?;
    match body.lines.get(1) {
        Some(&"to") => {}
        Some(other) => return Err(body.error(1, format!("expected `to`, got `{other}`"))),
        None => return Err(body.error(1, "unexpected end, expected `to`")),
    }
    let into = body
        .lines
        .get(2)
        .ok_or_else(|| body.error(2, "unexpected end, expected the mutated part"))?;
    let into = body.non_empty(2, into)?;
    let (mut to_uuid, mut alter_version) = (None, None);
    let mut i = 3;
    while let Some(name) = body.lines.get(i) {
        let value = body
            .lines
            .get(i + 1)
            .ok_or_else(|| body.error(i + 1, format!("unexpected end, expected the {name}")))?;
        match *name {
            "to_uuid" if to_uuid.is_none() => to_uuid = Some(body.non_empty(i + 1, value)?),
            "alter_version" if alter_version.is_none() => {
                alter_version = Some(
                    value
                        .parse()
                        .map_err(|_| body.error(i + 1, format!("bad alter_version `{value}`")))?,
                )
            }
            other => {
                return Err(body.error(i, format!("unexpected line `{other}` in a mutate")));
            }
        }
        i += 2;
    }
    Ok(LogEntryKind::Mutate {
        source,
        into,
        to_uuid,
        alter_version,
    })
}

/// The body of an `alter` entry, `text` being everything after its verb line.
fn parse_alter(text: &str, first_line: usize) -> Result<LogEntryKind, CodecError> {
    let mut rest = text;
    let line_at = |rest: &str| first_line + text[..text.len() - rest.len()].matches('\n').count();
    let expect = |rest: &mut &str, prefix: &str| -> Result<(), CodecError> {
        match rest.strip_prefix(prefix) {
            Some(r) => {
                *rest = r;
                Ok(())
            }
            None => Err(CodecError::new(
                WHAT,
                line_at(rest),
                format!("expected `{}` in an alter", prefix.trim_end_matches('\n')),
            )),
        }
    };
    let number = |rest: &mut &str, what: &str| -> Result<i64, CodecError> {
        let (value, after) = rest.split_once('\n').unwrap_or((rest, ""));
        let n = value
            .parse()
            .map_err(|_| CodecError::new(WHAT, line_at(rest), format!("bad {what} `{value}`")))?;
        *rest = after;
        Ok(n)
    };
    let sized = |rest: &mut &str, what: &str, size: i64| -> Result<String, CodecError> {
        let at = line_at(rest);
        let taken = usize::try_from(size)
            .ok()
            .and_then(|n| rest.get(..n))
            .ok_or_else(|| {
                CodecError::new(
                    WHAT,
                    at,
                    format!(
                        "{what} of {size} bytes does not fit the {} left",
                        rest.len()
                    ),
                )
            })?;
        *rest = &rest[taken.len()..];
        Ok(taken.to_string())
    };
    expect(&mut rest, "alter_version\n")?;
    let alter_version = number(&mut rest, "alter_version")?;
    expect(&mut rest, "have_mutation\n")?;
    let have_mutation = match number(&mut rest, "have_mutation")? {
        0 => false,
        1 => true,
        v => {
            return Err(CodecError::new(
                WHAT,
                line_at(rest) - 1,
                format!("have_mutation must be 0 or 1, got `{v}`"),
            ));
        }
    };
    expect(&mut rest, "columns_str_size:\n")?;
    let size = number(&mut rest, "columns_str_size")?;
    let columns = sized(&mut rest, "columns text", size)?;
    expect(&mut rest, "\nmetadata_str_size:\n")?;
    let size = number(&mut rest, "metadata_str_size")?;
    let metadata = sized(&mut rest, "metadata text", size)?;
    // What follows is the newline ending every entry; ClickHouse writes no trailer for an
    // alter, which makes no part.
    if rest != "\n" {
        return Err(CodecError::new(
            WHAT,
            line_at(rest),
            format!(
                "expected only the newline ending the entry after the metadata text, got `{}`",
                rest.trim_end()
            ),
        ));
    }
    Ok(LogEntryKind::Alter {
        alter_version,
        have_mutation,
        columns,
        metadata,
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
        assert_eq!(e.type_name(), "MUTATE_PART");
        assert!(e.compact);
        assert_eq!(e.new_part_name().as_deref(), Some("all_1_1_0_2"));
        assert_eq!(e.source_parts(), ["all_1_1_0"]);
        assert_eq!(e.render(), mutate);

        // An alter body embeds texts that end in `\n`, so it contains blank lines.
        let alter = "format version: 4\ncreate_time: 2024-05-01 12:00:00\nsource replica: r1\nblock_id: \nalter\nalter_version\n1\nhave_mutation\n0\ncolumns_str_size:\n47\ncolumns format version: 1\n1 columns:\n`a` UInt8\n\nmetadata_str_size:\n4\nx: \n\n";
        let e = LogEntry::parse(alter).expect("alter");
        assert_eq!(e.type_name(), "ALTER_METADATA");
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
        let head = "format version: 4\ncreate_time: 2024-05-01 12:00:00\nsource replica: r1\nblock_id: \nclear_column\n";
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

    // The shapes ClickHouse's writeText gives MUTATE_PART and ALTER_METADATA.
    const HEAD: &str =
        "format version: 4\ncreate_time: 2024-05-01 12:00:00\nsource replica: r1\nblock_id: \n";

    #[test]
    fn mutate_entries_read_field_by_field_and_round_trip() {
        let text = format!(
            "{HEAD}mutate\n202405_1_5_1\nto\n202405_1_5_1_7\nto_uuid\n0f0e0d0c-0b0a-0908-0706-050403020100\nalter_version\n3\npart_type: Compact\n"
        );
        let e = LogEntry::parse(&text).expect("mutate");
        assert_eq!(
            e.kind,
            LogEntryKind::Mutate {
                source: "202405_1_5_1".into(),
                into: "202405_1_5_1_7".into(),
                to_uuid: Some("0f0e0d0c-0b0a-0908-0706-050403020100".into()),
                alter_version: Some(3),
            }
        );
        assert_eq!(e.render(), text);
        // ClickHouse reads the optional pairs in any order; rendering puts the uuid first.
        let swapped =
            format!("{HEAD}mutate\na_1_1_0\nto\na_1_1_0_2\nalter_version\n1\nto_uuid\nu\n");
        let e = LogEntry::parse(&swapped).expect("any order");
        assert_eq!(LogEntry::parse(&e.render()).expect("again"), e);
        for (body, line, needle) in [
            ("mutate\n", 6, "source part"),
            ("mutate\na_1_1_0\ninto\na_1_1_0_2\n", 7, "expected `to`"),
            ("mutate\na_1_1_0\nto\n", 8, "mutated part"),
            (
                "mutate\na_1_1_0\nto\na_1_1_0_2\nalter_version\n",
                10,
                "alter_version",
            ),
            (
                "mutate\na_1_1_0\nto\na_1_1_0_2\nalter_version\nx\n",
                10,
                "bad alter_version",
            ),
            (
                "mutate\na_1_1_0\nto\na_1_1_0_2\nsurprise\n1\n",
                9,
                "surprise",
            ),
        ] {
            let e = LogEntry::parse(&format!("{HEAD}{body}")).expect_err(needle);
            assert_eq!((e.line, e.message.contains(needle)), (line, true), "{e}");
        }
    }

    #[test]
    fn alter_entries_measure_their_texts_in_bytes() {
        // Texts that hold blank lines and lines shaped like trailers read back exactly.
        let columns = "columns format version: 1\n2 columns:\n`id` UInt64\n`é` String\n";
        let metadata = "metadata format version: 1\nquorum: 2\n\n";
        let entry = LogEntry {
            kind: LogEntryKind::Alter {
                alter_version: 2,
                have_mutation: true,
                columns: columns.into(),
                metadata: metadata.into(),
            },
            ..LogEntry::drop_range("r1", "x", 1_714_564_800)
        };
        let text = entry.render();
        assert_eq!(
            text,
            format!(
                "{HEAD}alter\nalter_version\n2\nhave_mutation\n1\ncolumns_str_size:\n{}\n{columns}\nmetadata_str_size:\n{}\n{metadata}\n",
                columns.len(),
                metadata.len()
            )
        );
        assert_eq!(LogEntry::parse(&text).expect("alter"), entry);
        assert_eq!(entry.new_part_name(), None);
        for (bad, needle) in [
            (
                text.replace("have_mutation\n1", "have_mutation\n2"),
                "0 or 1",
            ),
            (text.replace("\n38\n", "\n99\n"), "does not fit"),
            (
                text.replace(
                    &format!("\n{}\n", columns.len()),
                    &format!("\n{}\n", columns.len() - 1),
                ),
                "metadata_str_size",
            ),
            (format!("{text}quorum: 1\n"), "only the newline"),
            (
                text.replace("alter_version\n2", "alter_version\ntwo"),
                "bad alter_version",
            ),
        ] {
            let e = LogEntry::parse(&bad).expect_err(needle);
            assert!(e.message.contains(needle), "{needle}: {e}");
        }
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
