//! The table-level `metadata` node, in ClickHouse's order-sensitive text. Replicas compare
//! it field by field with their own definition; a difference is a schema mismatch.

use crate::codec::{CodecError, Lines};
use crate::schema::TableSchema;

const WHAT: &str = "metadata";

#[derive(Debug, Clone, PartialEq, Eq)]
pub struct TableMetadata {
    pub date_column: String,
    pub sampling_expression: String,
    pub index_granularity: u64,
    pub mode: u32,
    pub sign_column: String,
    pub primary_key: String,
    pub data_format_version: u32,
    pub partition_key: String,
    /// Fields ClickHouse appended in later versions (`sorting key:`, `ttl:`, ...), kept
    /// verbatim so a round trip loses nothing.
    pub extra: Vec<String>,
}

impl TableMetadata {
    pub fn from_schema(schema: &TableSchema) -> TableMetadata {
        TableMetadata {
            date_column: String::new(),
            sampling_expression: String::new(),
            index_granularity: 8192,
            mode: 0,
            sign_column: String::new(),
            primary_key: schema.order_by_expr(),
            data_format_version: 1,
            partition_key: schema.partition_by.to_string(),
            extra: Vec::new(),
        }
    }

    pub fn render(&self) -> String {
        let mut out = format!(
            "metadata format version: 1\ndate column: {}\nsampling expression: {}\nindex granularity: {}\nmode: {}\nsign column: {}\nprimary key: {}\ndata format version: {}\npartition key: {}\n",
            self.date_column,
            self.sampling_expression,
            self.index_granularity,
            self.mode,
            self.sign_column,
            self.primary_key,
            self.data_format_version,
            self.partition_key
        );
        for line in &self.extra {
            out.push_str(line);
            out.push('\n');
        }
        out
    }

    pub fn parse(text: &str) -> Result<TableMetadata, CodecError> {
        let mut lines = Lines::new(WHAT, text);
        let version = lines.field("metadata format version: ")?;
        if version != "1" {
            return Err(lines.error(format!("unsupported metadata format version `{version}`")));
        }
        let date_column = lines.field("date column: ")?.to_string();
        let sampling_expression = lines.field("sampling expression: ")?.to_string();
        let index_granularity = lines.number("index granularity: ")?;
        let mode = lines.number("mode: ")?;
        let sign_column = lines.field("sign column: ")?.to_string();
        let primary_key = lines.field("primary key: ")?.to_string();
        let data_format_version = lines.number("data format version: ")?;
        let partition_key = lines.field("partition key: ")?.to_string();
        let mut extra: Vec<String> = lines.rest().into_iter().map(str::to_string).collect();
        while extra.last().is_some_and(|l| l.is_empty()) {
            extra.pop();
        }
        Ok(TableMetadata {
            date_column,
            sampling_expression,
            index_granularity,
            mode,
            sign_column,
            primary_key,
            data_format_version,
            partition_key,
            extra,
        })
    }

    /// Whether `tree` describes this table. Every field rtable writes must be equal. Lines a
    /// newer ClickHouse appends (`granularity bytes:`, `merge params format version:`, ...)
    /// are accepted, except a `sorting key:` that is not this table's sort key: ClickHouse
    /// writes one when the sort key differs from the primary key.
    pub fn same_table(&self, tree: &TableMetadata) -> bool {
        let sorting_key = |m: &TableMetadata| {
            m.extra
                .iter()
                .find_map(|l| l.strip_prefix("sorting key: "))
                .map(str::to_string)
                .unwrap_or_else(|| m.primary_key.clone())
        };
        self.date_column == tree.date_column
            && self.sampling_expression == tree.sampling_expression
            && self.index_granularity == tree.index_granularity
            && self.mode == tree.mode
            && self.sign_column == tree.sign_column
            && self.primary_key == tree.primary_key
            && self.data_format_version == tree.data_format_version
            && self.partition_key == tree.partition_key
            && sorting_key(self) == sorting_key(tree)
    }

    /// One line per differing field, local value first.
    pub fn diff(&self, tree: &TableMetadata) -> Vec<String> {
        let mut out = Vec::new();
        let mut field = |name: &str, local: String, other: String| {
            if local != other {
                out.push(format!("{name}: local `{local}` vs tree `{other}`"));
            }
        };
        field(
            "date column",
            self.date_column.clone(),
            tree.date_column.clone(),
        );
        field(
            "sampling expression",
            self.sampling_expression.clone(),
            tree.sampling_expression.clone(),
        );
        field(
            "index granularity",
            self.index_granularity.to_string(),
            tree.index_granularity.to_string(),
        );
        field("mode", self.mode.to_string(), tree.mode.to_string());
        field(
            "sign column",
            self.sign_column.clone(),
            tree.sign_column.clone(),
        );
        field(
            "primary key",
            self.primary_key.clone(),
            tree.primary_key.clone(),
        );
        field(
            "data format version",
            self.data_format_version.to_string(),
            tree.data_format_version.to_string(),
        );
        field(
            "partition key",
            self.partition_key.clone(),
            tree.partition_key.clone(),
        );
        field("other fields", self.extra.join("; "), tree.extra.join("; "));
        out
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_newer_clickhouses_extra_lines_are_the_same_table_unless_they_change_the_sort() {
        let ours = TableMetadata::parse(
            "metadata format version: 1\ndate column: \nsampling expression: \nindex granularity: 8192\nmode: 0\nsign column: \nprimary key: user_id, ts\ndata format version: 1\npartition key: toYYYYMM(ts)\n",
        )
        .expect("parses");
        let newer = |extra: &str| {
            TableMetadata::parse(&format!("{}{extra}", ours.render())).expect("parses")
        };
        assert!(ours.same_table(&newer(
            "granularity bytes: 10485760\nmerge params format version: 2\n"
        )));
        assert!(ours.same_table(&newer("sorting key: user_id, ts\n")));
        assert!(!ours.same_table(&newer("sorting key: user_id, ts, event\n")));
        let mut other_key = ours.clone();
        other_key.partition_key = "toYYYYMMDD(ts)".into();
        assert!(!ours.same_table(&other_key));
    }
    use crate::schema::{Column, PartitionKey};

    fn schema() -> TableSchema {
        TableSchema::new(
            vec![
                Column {
                    name: "ts".into(),
                    ty: "DateTime".parse().expect("type"),
                },
                Column {
                    name: "user_id".into(),
                    ty: "UInt64".parse().expect("type"),
                },
            ],
            vec!["user_id".into(), "ts".into()],
            PartitionKey::ToYyyyMm("ts".into()),
        )
        .expect("schema")
    }

    #[test]
    fn renders_clickhouse_layout_and_round_trips() {
        let m = TableMetadata::from_schema(&schema());
        let text = m.render();
        assert_eq!(
            text,
            "metadata format version: 1\ndate column: \nsampling expression: \nindex granularity: 8192\nmode: 0\nsign column: \nprimary key: user_id, ts\ndata format version: 1\npartition key: toYYYYMM(ts)\n"
        );
        assert_eq!(TableMetadata::parse(&text).expect("parses"), m);
    }

    #[test]
    fn keeps_fields_appended_by_newer_versions() {
        let text = "metadata format version: 1\ndate column: \nsampling expression: \nindex granularity: 8192\nmode: 0\nsign column: \nprimary key: a\ndata format version: 1\npartition key: \nsorting key: a, b\ngranularity bytes: 10485760\n";
        let m = TableMetadata::parse(text).expect("parses");
        assert_eq!(
            m.extra,
            ["sorting key: a, b", "granularity bytes: 10485760"]
        );
        assert_eq!(m.render(), text);
    }

    #[test]
    fn diff_names_each_field() {
        let a = TableMetadata::from_schema(&schema());
        let mut b = a.clone();
        b.primary_key = "user_id".into();
        b.partition_key = String::new();
        let d = a.diff(&b);
        assert_eq!(d.len(), 2);
        assert_eq!(d[0], "primary key: local `user_id, ts` vs tree `user_id`");
        assert!(a.diff(&a).is_empty());
    }

    #[test]
    fn rejects_malformed() {
        assert!(TableMetadata::parse("").is_err());
        assert!(TableMetadata::parse("metadata format version: 2\n").is_err());
        let e = TableMetadata::parse("metadata format version: 1\ndate column: \nsampling expression: \nindex granularity: x\n")
            .expect_err("bad number");
        assert_eq!(e.line, 4);
    }
}
