//! A mutation node (`mutations/<id>`, ids `0000000000`, `0000000001`, ...) in ClickHouse's
//! text format (`ReplicatedMergeTreeMutationEntry`):
//!
//! ```text
//! format version: 1
//! create time: 2024-05-01 12:00:00
//! source replica: r1
//! block numbers count: 2
//! 202404<TAB>31
//! 202405<TAB>18
//! commands: DELETE WHERE id = 5
//! alter version: -1
//! ```
//!
//! The block number of a partition is the one the mutation took there: it covers every part
//! of that partition whose blocks are all below it, and no part inserted after it. The
//! commands are one line, ClickHouse's `formatAST` text of the command list escaped with
//! [`crate::escaped`]. The last line has no newline after it. `alter version` is `-1` for
//! a mutation not made by an ALTER; older writers omitted the line, read here as `-1`.

use std::collections::BTreeMap;

use crate::codec::{CodecError, Lines, render_time};
use crate::escaped;

const WHAT: &str = "mutation entry";
const FORMAT_VERSION: &str = "1";
/// The alter version of a mutation no ALTER made.
pub const NO_ALTER_VERSION: i64 = -1;

#[derive(Debug, Clone, PartialEq, Eq)]
pub struct MutationEntry {
    /// Unix seconds, rendered in UTC (see [`crate::log_entry::LogEntry`]).
    pub create_time: i64,
    pub source_replica: String,
    /// Partition id -> the block number the mutation took in that partition. Ordered by
    /// partition id, as ClickHouse writes them.
    pub block_numbers: BTreeMap<String, i64>,
    /// The command list as ClickHouse's SQL text, unescaped (`DELETE WHERE id = 5, ...`).
    pub commands: String,
    /// The metadata version of the ALTER this mutation belongs to, or [`NO_ALTER_VERSION`].
    pub alter_version: i64,
}

impl MutationEntry {
    /// A mutation made by a user's command (not by an ALTER).
    pub fn new(
        source_replica: &str,
        block_numbers: BTreeMap<String, i64>,
        commands: &str,
        create_time: i64,
    ) -> MutationEntry {
        MutationEntry {
            create_time,
            source_replica: source_replica.to_string(),
            block_numbers,
            commands: commands.to_string(),
            alter_version: NO_ALTER_VERSION,
        }
    }

    /// Whether `part` (its partition and highest block) is covered by this mutation: a
    /// part is mutated when all its blocks were allocated before the mutation's block.
    pub fn covers(&self, partition_id: &str, max_block: i64) -> bool {
        self.block_numbers
            .get(partition_id)
            .is_some_and(|&n| max_block < n)
    }

    pub fn render(&self) -> String {
        let mut out = format!(
            "format version: {FORMAT_VERSION}\ncreate time: {}\nsource replica: {}\nblock numbers count: {}\n",
            render_time(self.create_time),
            self.source_replica,
            self.block_numbers.len()
        );
        for (partition, number) in &self.block_numbers {
            out.push_str(&format!("{partition}\t{number}\n"));
        }
        out.push_str(&format!(
            "commands: {}\nalter version: {}",
            escaped::escape(&self.commands),
            self.alter_version
        ));
        out
    }

    pub fn parse(text: &str) -> Result<MutationEntry, CodecError> {
        let mut lines = Lines::new(WHAT, text);
        let version = lines.field("format version: ")?;
        if version != FORMAT_VERSION {
            return Err(lines.error(format!(
                "unsupported format version `{version}`, expected {FORMAT_VERSION}"
            )));
        }
        let create_time = lines.time("create time: ")?;
        let source_replica = lines.field("source replica: ")?.to_string();
        let count: usize = lines.number("block numbers count: ")?;
        let mut block_numbers = BTreeMap::new();
        for _ in 0..count {
            let line = lines.next_line("a `<partition id>\\t<block number>` line")?;
            let (partition, number) = line.split_once('\t').ok_or_else(|| {
                lines.error(format!(
                    "expected `<partition id>\\t<block number>`, got `{line}`"
                ))
            })?;
            if partition.is_empty() {
                return Err(lines.error("empty partition id"));
            }
            let number: i64 = number
                .parse()
                .map_err(|_| lines.error(format!("bad block number `{number}`")))?;
            if block_numbers
                .insert(partition.to_string(), number)
                .is_some()
            {
                return Err(lines.error(format!(
                    "partition `{partition}` is listed twice; each partition has one block number"
                )));
            }
        }
        let commands = lines.field("commands: ")?;
        let commands =
            escaped::unescape(commands).map_err(|e| lines.error(format!("bad commands: {e}")))?;
        let alter_version = match lines.peek() {
            None => NO_ALTER_VERSION,
            Some("") => {
                lines.next_line("the end")?;
                NO_ALTER_VERSION
            }
            Some(_) => lines.number("alter version: ")?,
        };
        if let Some(extra) = lines.peek() {
            lines.next_line("the end")?;
            return Err(lines.error(format!("unexpected `{extra}` after the entry")));
        }
        Ok(MutationEntry {
            create_time,
            source_replica,
            block_numbers,
            commands,
            alter_version,
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    // The shape ClickHouse's writeText produces: no newline after the alter version.
    const ENTRY: &str = "format version: 1\ncreate time: 2024-05-01 12:00:00\nsource replica: r1\nblock numbers count: 2\n202404\t31\n202405\t18\ncommands: UPDATE v = \\'x\\' WHERE id = 5\nalter version: -1";

    #[test]
    fn parses_and_renders_clickhouses_shape_field_by_field() {
        let e = MutationEntry::parse(ENTRY).expect("parses");
        assert_eq!(e.create_time, 1_714_564_800);
        assert_eq!(e.source_replica, "r1");
        assert_eq!(
            e.block_numbers,
            BTreeMap::from([("202404".to_string(), 31), ("202405".to_string(), 18)])
        );
        assert_eq!(e.commands, "UPDATE v = 'x' WHERE id = 5");
        assert_eq!(e.alter_version, NO_ALTER_VERSION);
        assert_eq!(e.render(), ENTRY);
    }

    #[test]
    fn constructor_round_trips_with_an_alter_version_and_orders_partitions() {
        let mut e = MutationEntry::new(
            "r2",
            BTreeMap::from([("b".to_string(), 7), ("a".to_string(), 3)]),
            "DELETE WHERE s = 'a\tb'",
            1_700_000_000,
        );
        e.alter_version = 4;
        let text = e.render();
        assert!(text.contains("count: 2\na\t3\nb\t7\n"), "{text}");
        assert!(text.ends_with("commands: DELETE WHERE s = \\'a\\tb\\'\nalter version: 4"));
        assert_eq!(MutationEntry::parse(&text).expect("round trip"), e);
    }

    #[test]
    fn reads_an_entry_without_alter_version_as_minus_one() {
        let old = ENTRY.replace("\nalter version: -1", "\n");
        assert_eq!(MutationEntry::parse(&old).expect("old").alter_version, -1);
        let old = ENTRY.replace("\nalter version: -1", "");
        assert_eq!(MutationEntry::parse(&old).expect("old").alter_version, -1);
    }

    #[test]
    fn covers_only_parts_below_the_block_number_in_listed_partitions() {
        let e = MutationEntry::parse(ENTRY).expect("parses");
        assert!(e.covers("202405", 17));
        assert!(!e.covers("202405", 18), "inserted after the mutation");
        assert!(!e.covers("202406", 1), "partition not in the mutation");
    }

    #[test]
    fn refuses_malformed_entries_naming_the_line() {
        for (text, line, needle) in [
            (
                ENTRY.replace("version: 1", "version: 2"),
                1,
                "format version",
            ),
            (ENTRY.replace("12:00:00", "noon"), 2, "create time"),
            (ENTRY.replace("count: 2", "count: 3"), 7, "partition id"),
            (
                ENTRY.replace("202405\t18", "202405 18"),
                6,
                "<partition id>",
            ),
            (
                ENTRY.replace("202405\t18", "202405\tx"),
                6,
                "bad block number",
            ),
            (ENTRY.replace("202405\t18", "202404\t18"), 6, "listed twice"),
            (ENTRY.replace("\t18", "\t18\n\t1"), 7, "commands"),
            (ENTRY.replace("WHERE id = 5", "\\"), 7, "lone"),
            (ENTRY.replace("-1", "minus one"), 8, "alter version"),
            (format!("{ENTRY}\nmore"), 9, "unexpected `more`"),
        ] {
            let e = MutationEntry::parse(&text).expect_err(needle);
            assert_eq!((e.line, e.message.contains(needle)), (line, true), "{e}");
        }
    }
}
