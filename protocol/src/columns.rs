//! The table-level `columns` node: `columns format version: 1`, the count, then one
//! `` `name` Type`` line per column (ClickHouse's ColumnsDescription text).

use crate::codec::{CodecError, Lines};
use crate::schema::{Column, ColumnType};

const WHAT: &str = "columns";

pub fn render(columns: &[Column]) -> String {
    let mut out = format!("columns format version: 1\n{} columns:\n", columns.len());
    for c in columns {
        out.push_str(&format!("`{}` {}\n", c.name.replace('`', "\\`"), c.ty));
    }
    out
}

pub fn parse(text: &str) -> Result<Vec<Column>, CodecError> {
    let mut lines = Lines::new(WHAT, text);
    let version = lines.field("columns format version: ")?;
    if version != "1" {
        return Err(lines.error(format!("unsupported columns format version `{version}`")));
    }
    let header = lines.next_line("`<N> columns:`")?;
    let count: usize = header
        .strip_suffix(" columns:")
        .and_then(|n| n.parse().ok())
        .ok_or_else(|| lines.error(format!("expected `<N> columns:`, got `{header}`")))?;
    // Not `with_capacity(count)`: the count is the node's word, and a huge one must end in
    // the missing-line error below, not in an allocation failure.
    let mut columns = Vec::new();
    for _ in 0..count {
        let line = lines.next_line("a column line")?;
        let rest = line
            .strip_prefix('`')
            .ok_or_else(|| lines.error(format!("expected `` `name` Type``, got `{line}`")))?;
        let end = rest
            .find("` ")
            .ok_or_else(|| lines.error(format!("unterminated column name in `{line}`")))?;
        let name = rest[..end].replace("\\`", "`");
        let ty: ColumnType = rest[end + 2..]
            .parse()
            .map_err(|e| lines.error(format!("column `{name}`: {e}")))?;
        columns.push(Column { name, ty });
    }
    match lines.rest().as_slice() {
        [] | [""] => Ok(columns),
        _ => Err(CodecError::new(
            WHAT,
            count + 3,
            "text after the last column",
        )),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn cols() -> Vec<Column> {
        vec![
            Column {
                name: "ts".into(),
                ty: "DateTime".parse().expect("type"),
            },
            Column {
                name: "user_id".into(),
                ty: "UInt64".parse().expect("type"),
            },
            Column {
                name: "value".into(),
                ty: "Nullable(Float64)".parse().expect("type"),
            },
        ]
    }

    #[test]
    fn renders_clickhouse_text_and_round_trips() {
        let text = render(&cols());
        assert_eq!(
            text,
            "columns format version: 1\n3 columns:\n`ts` DateTime\n`user_id` UInt64\n`value` Nullable(Float64)\n"
        );
        assert_eq!(parse(&text).expect("parses"), cols());
    }

    /// Found by the `columns` fuzz target: the count was trusted as a capacity, so a huge
    /// one aborted the process (capacity overflow or a failed allocation).
    #[test]
    fn a_huge_column_count_is_a_missing_line() {
        for count in [u64::MAX, 1 << 40] {
            let e = parse(&format!("columns format version: 1\n{count} columns:\n"))
                .expect_err("no column lines");
            assert_eq!(e.line, 3);
            let e = parse(&format!("columns format version: 1\n{count} columns:"))
                .expect_err("no column lines");
            assert!(e.message.contains("expected a column line"), "{e}");
        }
    }

    #[test]
    fn rejects_malformed() {
        assert!(parse("columns format version: 2\n0 columns:\n").is_err());
        assert!(parse("columns format version: 1\nx columns:\n").is_err());
        let e = parse("columns format version: 1\n2 columns:\n`a` UInt8\n").expect_err("short");
        assert_eq!(e.line, 4);
        assert!(parse("columns format version: 1\n1 columns:\n`a` Decimal(9)\n").is_err());
        assert!(parse("columns format version: 1\n1 columns:\na UInt8\n").is_err());
        assert!(parse("columns format version: 1\n1 columns:\n`a` UInt8\n`b` UInt8\n").is_err());
    }
}
