//! Only reads of this table: the SQL is parsed with DataFusion's parser (ClickHouse
//! dialect) and refused unless it is one `SELECT` whose tables are all this table. The plan
//! is checked again after planning (`engine`), so a statement that slips through the
//! syntax check still cannot write, define or set anything.

use datafusion::common::TableReference;
use datafusion::sql::parser::{DFParserBuilder, Statement as DfStatement};
use datafusion::sql::resolve::resolve_table_references;
use datafusion::sql::sqlparser::ast::{FormatClause, Statement};
use datafusion::sql::sqlparser::dialect::ClickHouseDialect;

use crate::error::{QueryError, code};

/// One `SELECT` of the table, with the `FORMAT` clause taken out (the engine has none).
pub(crate) struct Checked {
    pub statement: DfStatement,
    pub format: Option<String>,
}

pub(crate) fn check(sql: &str, table: &str) -> Result<Checked, QueryError> {
    let mut statements = DFParserBuilder::new(sql)
        .with_dialect(&ClickHouseDialect {})
        .build()
        .and_then(|mut parser| parser.parse_statements())
        .map_err(|e| QueryError::from_engine(e, 0))?;
    if statements.len() != 1 {
        return Err(QueryError::refused(
            format!(
                "send exactly one SELECT statement per query; this has {}",
                statements.len()
            ),
            code::SYNTAX_ERROR,
        ));
    }
    let Some(statement) = statements.pop_front() else {
        return Err(QueryError::refused(
            "the query is empty",
            code::SYNTAX_ERROR,
        ));
    };
    let mut query = match statement {
        DfStatement::Statement(s) => match *s {
            Statement::Query(q) => q,
            other => return Err(not_a_read(&other)),
        },
        DfStatement::CreateExternalTable(_) => return Err(refused_kind("CREATE EXTERNAL TABLE")),
        DfStatement::CopyTo(_) => return Err(refused_kind("COPY")),
        DfStatement::Explain(_) => return Err(refused_kind("EXPLAIN")),
        DfStatement::Reset(_) => return Err(refused_kind("RESET")),
    };
    let format = match query.format_clause.take() {
        None => None,
        Some(FormatClause::Identifier(name)) => Some(name.value),
        Some(FormatClause::Null) => {
            return Err(QueryError::refused(
                "FORMAT Null is not supported: use JSONEachRow, CSV, CSVWithNames or Parquet",
                code::UNKNOWN_FORMAT,
            ));
        }
    };
    if query.settings.is_some() {
        return Err(QueryError::refused(
            "the SETTINGS clause is not supported: the replica's query limits apply (--query-memory-limit-bytes, --query-timeout-seconds)",
            code::NOT_IMPLEMENTED,
        ));
    }
    let statement = DfStatement::Statement(Box::new(Statement::Query(query)));
    let (tables, _ctes) =
        resolve_table_references(&statement, true).map_err(|e| QueryError::from_engine(e, 0))?;
    for reference in tables {
        match &reference {
            TableReference::Bare { table: name } if name.as_ref() == table => {}
            other => {
                return Err(QueryError::refused(
                    format!(
                        "only table `{table}` can be read here: `{other}` is not it (no other tables, table functions or files)"
                    ),
                    code::UNKNOWN_TABLE,
                ));
            }
        }
    }
    Ok(Checked { statement, format })
}

fn refused_kind(kind: &str) -> QueryError {
    QueryError::refused(
        format!("{kind} is not allowed: this endpoint answers one SELECT of the table"),
        code::READONLY,
    )
}

/// The refusal of a statement that is not a query, named by its leading keywords.
fn not_a_read(statement: &Statement) -> QueryError {
    if matches!(statement, Statement::Insert(_)) {
        return QueryError::refused(
            "INSERT is not allowed here: send rows to POST /insert?format=<fmt> (or POST /?query=INSERT INTO <table> FORMAT <fmt> with the rows as the body)",
            code::READONLY,
        );
    }
    let text = statement.to_string();
    let mut words = text.split_whitespace();
    let first = words.next().unwrap_or("").to_uppercase();
    let kind = match first.as_str() {
        "CREATE" | "DROP" | "ALTER" | "SHOW" | "TRUNCATE" => {
            format!("{first} {}", words.next().unwrap_or("").to_uppercase())
        }
        _ => first,
    };
    refused_kind(&kind)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn refusal(sql: &str) -> String {
        match check(sql, "events") {
            Ok(_) => panic!("`{sql}` was accepted"),
            Err(e) => e.to_string(),
        }
    }

    #[test]
    fn one_select_of_the_table_passes_with_its_format() {
        let checked = check(
            "SELECT event, count() FROM events WHERE user_id = 4 GROUP BY event FORMAT CSVWithNames",
            "events",
        )
        .expect("a read");
        assert_eq!(checked.format.as_deref(), Some("CSVWithNames"));
        let with_cte = check(
            "WITH recent AS (SELECT * FROM events) SELECT count(*) FROM recent",
            "events",
        )
        .expect("a CTE over the table");
        assert_eq!(with_cte.format, None);
    }

    #[test]
    fn everything_else_is_refused_by_name() {
        for (sql, expected) in [
            ("INSERT INTO events VALUES (1)", "INSERT is not allowed"),
            ("DROP TABLE events", "DROP TABLE is not allowed"),
            ("CREATE TABLE x (a INT)", "CREATE TABLE is not allowed"),
            ("SET max_threads = 1", "SET is not allowed"),
            ("DELETE FROM events WHERE 1", "DELETE is not allowed"),
            ("COPY (SELECT 1) TO '/tmp/x.csv'", "COPY is not allowed"),
            (
                "CREATE EXTERNAL TABLE t STORED AS PARQUET LOCATION '/etc'",
                "CREATE EXTERNAL TABLE is not allowed",
            ),
            ("SELECT * FROM other", "`other` is not it"),
            (
                "SELECT * FROM events JOIN system.tables ON 1",
                "`system.tables` is not it",
            ),
            ("SELECT * FROM '/etc/passwd'", "is not it"),
            (
                "SELECT * FROM read_parquet('/x.parquet')",
                "`read_parquet` is not it",
            ),
            ("SELECT 1; SELECT 2", "exactly one SELECT"),
            (
                "SELECT * FROM events SETTINGS max_threads = 1",
                "SETTINGS clause",
            ),
        ] {
            let message = refusal(sql);
            assert!(message.contains(expected), "`{sql}`: {message}");
        }
    }

    #[test]
    fn a_syntax_error_names_the_position() {
        let message = refusal("SELECT count( FROM events");
        assert!(message.contains("Line: 1, Column"), "{message}");
    }
}
