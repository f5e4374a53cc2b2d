//! A user's mutation command, checked against the table and rendered as the command text a
//! mutation node stores (see [`crate::mutation_entry`]).
//!
//! Accepted: `DELETE WHERE <predicate>` and `UPDATE <col> = <expr>[, ...] WHERE <predicate>`,
//! parsed with `sqlparser` (ClickHouse dialect). Expressions are a subset every replica
//! evaluates to the same value: columns of the table, number, string, boolean and NULL
//! literals, `+ - * / %`, comparisons, `AND OR NOT`, `IS [NOT] NULL`, `[NOT] IN (list)`,
//! `[NOT] BETWEEN`, parentheses, and the deterministic functions in [`FUNCTIONS`].
//! Functions whose value changes between calls or replicas (`now()`, `rand()`, ...) are
//! refused by name, so a part rewritten on two replicas has the same bytes. Key columns
//! (ORDER BY, PARTITION BY) cannot be updated: their rows would leave their part's order
//! or partition.

use sqlparser::ast::{
    BinaryOperator, Expr, FunctionArg, FunctionArgExpr, FunctionArguments, UnaryOperator, Value,
};
use sqlparser::dialect::ClickHouseDialect;
use sqlparser::keywords::Keyword;
use sqlparser::parser::Parser;
use sqlparser::tokenizer::Token;

use crate::schema::TableSchema;

/// Deterministic functions accepted in a command, by their ClickHouse name.
pub const FUNCTIONS: &[&str] = &[
    "abs",
    "coalesce",
    "concat",
    "if",
    "ifNull",
    "length",
    "lower",
    "upper",
    "substring",
    "round",
    "floor",
    "ceil",
    "toString",
    "toInt64",
    "toUInt64",
    "toFloat64",
    "toDate",
    "toDateTime",
    "toYYYYMM",
    "toYYYYMMDD",
];

/// Functions refused because their value depends on when or where they run.
const NON_DETERMINISTIC: &[&str] = &[
    "now",
    "now64",
    "today",
    "yesterday",
    "current_timestamp",
    "current_date",
    "rand",
    "rand32",
    "rand64",
    "randconstant",
    "randomstring",
    "generateuuidv4",
    "rownumberinblock",
    "rownumberinallblocks",
    "blocknumber",
    "hostname",
    "uptime",
    "currentuser",
];

#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum CommandError {
    #[error(
        "mutation command `{command}`: {message}; write `DELETE WHERE <predicate>` or `UPDATE <col> = <expr>[, ...] WHERE <predicate>`"
    )]
    Syntax { command: String, message: String },
    #[error(
        "`{function}()` is not deterministic: every replica must rewrite a part to the same rows, so write its value as a literal"
    )]
    NonDeterministic { function: String },
    #[error("function `{function}` is not in the accepted subset ({})", FUNCTIONS.join(", "))]
    UnknownFunction { function: String },
    #[error("unknown column `{column}`; the table has {known}")]
    UnknownColumn { column: String, known: String },
    #[error(
        "column `{column}` is in the table's key (ORDER BY or PARTITION BY) and cannot be updated"
    )]
    KeyColumn { column: String },
    #[error("column `{column}` is assigned twice in one UPDATE")]
    DuplicateAssignment { column: String },
    #[error("`{expression}` is not in the accepted expression subset (columns, literals, arithmetic, comparisons, AND/OR/NOT, IS NULL, IN, BETWEEN, {} )", FUNCTIONS.join(", "))]
    Unsupported { expression: String },
}

/// One parsed and checked command; expressions are held as ClickHouse SQL text.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum MutationCommand {
    Delete {
        predicate: String,
    },
    Update {
        assignments: Vec<(String, String)>,
        predicate: String,
    },
}

impl MutationCommand {
    /// Parses `text` and checks it against `schema`.
    pub fn parse(text: &str, schema: &TableSchema) -> Result<MutationCommand, CommandError> {
        let syntax = |message: String| CommandError::Syntax {
            command: text.to_string(),
            message,
        };
        let dialect = ClickHouseDialect {};
        let mut parser = Parser::new(&dialect)
            .try_with_sql(text)
            .map_err(|e| syntax(e.to_string()))?;
        let check = Check { schema };
        let command = if parser.parse_keyword(Keyword::DELETE) {
            parser
                .expect_keyword_is(Keyword::WHERE)
                .map_err(|e| syntax(e.to_string()))?;
            let predicate = parser.parse_expr().map_err(|e| syntax(e.to_string()))?;
            MutationCommand::Delete {
                predicate: check.expr(&predicate)?,
            }
        } else if parser.parse_keyword(Keyword::UPDATE) {
            let pairs = parser
                .parse_comma_separated(|p| {
                    let column = p.parse_identifier()?;
                    p.expect_token(&Token::Eq)?;
                    Ok((column.value, p.parse_expr()?))
                })
                .map_err(|e| syntax(e.to_string()))?;
            parser
                .expect_keyword_is(Keyword::WHERE)
                .map_err(|e| syntax(e.to_string()))?;
            let predicate = parser.parse_expr().map_err(|e| syntax(e.to_string()))?;
            let mut assignments: Vec<(String, String)> = Vec::with_capacity(pairs.len());
            for (column, value) in pairs {
                check.updatable(&column)?;
                if assignments.iter().any(|(c, _)| *c == column) {
                    return Err(CommandError::DuplicateAssignment { column });
                }
                assignments.push((column, check.expr(&value)?));
            }
            MutationCommand::Update {
                assignments,
                predicate: check.expr(&predicate)?,
            }
        } else {
            return Err(syntax("expected DELETE or UPDATE".to_string()));
        };
        let rest = parser.peek_token();
        if rest.token != Token::EOF {
            return Err(syntax(format!(
                "unexpected `{}` after the predicate",
                rest.token
            )));
        }
        Ok(command)
    }

    /// The command as ClickHouse's one-line SQL text (unescaped).
    pub fn render(&self) -> String {
        match self {
            MutationCommand::Delete { predicate } => format!("DELETE WHERE {predicate}"),
            MutationCommand::Update {
                assignments,
                predicate,
            } => {
                let set: Vec<String> = assignments
                    .iter()
                    .map(|(c, e)| format!("{} = {e}", identifier(c)))
                    .collect();
                format!("UPDATE {} WHERE {predicate}", set.join(", "))
            }
        }
    }
}

/// A command list as a mutation node's `commands:` text holds it.
pub fn render_all(commands: &[MutationCommand]) -> String {
    let texts: Vec<String> = commands.iter().map(MutationCommand::render).collect();
    texts.join(", ")
}

struct Check<'a> {
    schema: &'a TableSchema,
}

impl Check<'_> {
    fn column(&self, name: &str) -> Result<(), CommandError> {
        if self.schema.column(name).is_some() {
            return Ok(());
        }
        let known: Vec<String> = self
            .schema
            .columns
            .iter()
            .map(|c| format!("`{}`", c.name))
            .collect();
        Err(CommandError::UnknownColumn {
            column: name.to_string(),
            known: known.join(", "),
        })
    }

    fn updatable(&self, name: &str) -> Result<(), CommandError> {
        self.column(name)?;
        let in_key = self.schema.order_by.iter().any(|c| c == name)
            || self.schema.partition_by.column() == Some(name);
        if in_key {
            return Err(CommandError::KeyColumn {
                column: name.to_string(),
            });
        }
        Ok(())
    }

    /// Checks `expr` against the subset and renders it; every compound operand is put in
    /// parentheses so the text means the same whatever the reader's operator precedence.
    fn expr(&self, expr: &Expr) -> Result<String, CommandError> {
        let unsupported = || CommandError::Unsupported {
            expression: expr.to_string(),
        };
        Ok(match expr {
            Expr::Identifier(ident) => {
                self.column(&ident.value)?;
                identifier(&ident.value)
            }
            Expr::Value(v) => match &v.value {
                Value::Number(n, false) => n.clone(),
                Value::SingleQuotedString(s) => format!("'{}'", crate::escaped::escape(s)),
                Value::Boolean(b) => b.to_string(),
                Value::Null => "NULL".to_string(),
                _ => return Err(unsupported()),
            },
            Expr::Nested(inner) => self.expr(inner)?,
            Expr::BinaryOp { left, op, right } => {
                let op = match op {
                    BinaryOperator::Plus => "+",
                    BinaryOperator::Minus => "-",
                    BinaryOperator::Multiply => "*",
                    BinaryOperator::Divide => "/",
                    BinaryOperator::Modulo => "%",
                    BinaryOperator::Eq => "=",
                    BinaryOperator::NotEq => "!=",
                    BinaryOperator::Lt => "<",
                    BinaryOperator::LtEq => "<=",
                    BinaryOperator::Gt => ">",
                    BinaryOperator::GtEq => ">=",
                    BinaryOperator::And => "AND",
                    BinaryOperator::Or => "OR",
                    _ => return Err(unsupported()),
                };
                format!("{} {op} {}", self.operand(left)?, self.operand(right)?)
            }
            Expr::UnaryOp { op, expr: inner } => match op {
                UnaryOperator::Not => format!("NOT {}", self.operand(inner)?),
                UnaryOperator::Minus => format!("-{}", self.operand(inner)?),
                _ => return Err(unsupported()),
            },
            Expr::IsNull(inner) => format!("{} IS NULL", self.operand(inner)?),
            Expr::IsNotNull(inner) => format!("{} IS NOT NULL", self.operand(inner)?),
            Expr::InList {
                expr: inner,
                list,
                negated,
            } => {
                let items = list
                    .iter()
                    .map(|e| self.expr(e))
                    .collect::<Result<Vec<_>, _>>()?;
                let not = if *negated { "NOT " } else { "" };
                format!("{} {not}IN ({})", self.operand(inner)?, items.join(", "))
            }
            Expr::Between {
                expr: inner,
                negated,
                low,
                high,
            } => {
                let not = if *negated { "NOT " } else { "" };
                format!(
                    "{} {not}BETWEEN {} AND {}",
                    self.operand(inner)?,
                    self.operand(low)?,
                    self.operand(high)?
                )
            }
            Expr::Function(f) => {
                let name = f.name.to_string();
                if NON_DETERMINISTIC.contains(&name.to_ascii_lowercase().as_str()) {
                    return Err(CommandError::NonDeterministic { function: name });
                }
                if !FUNCTIONS.contains(&name.as_str()) {
                    return Err(CommandError::UnknownFunction { function: name });
                }
                let FunctionArguments::List(list) = &f.args else {
                    return Err(unsupported());
                };
                if list.duplicate_treatment.is_some()
                    || !list.clauses.is_empty()
                    || f.filter.is_some()
                    || f.over.is_some()
                {
                    return Err(unsupported());
                }
                let mut args = Vec::with_capacity(list.args.len());
                for arg in &list.args {
                    let FunctionArg::Unnamed(FunctionArgExpr::Expr(e)) = arg else {
                        return Err(unsupported());
                    };
                    args.push(self.expr(e)?);
                }
                format!("{name}({})", args.join(", "))
            }
            // `CURRENT_TIMESTAMP` and friends parse as bare identifiers in some forms.
            _ => return Err(unsupported()),
        })
    }

    /// An operand of an operator: parenthesized unless it is a single term.
    fn operand(&self, expr: &Expr) -> Result<String, CommandError> {
        let text = self.expr(expr)?;
        let single = matches!(
            expr,
            Expr::Identifier(_) | Expr::Value(_) | Expr::Function(_)
        );
        Ok(if single { text } else { format!("({text})") })
    }
}

/// A column name as ClickHouse writes it: bare when it is a plain identifier, else quoted
/// with backticks.
fn identifier(name: &str) -> String {
    let mut chars = name.chars();
    let plain = chars
        .next()
        .is_some_and(|c| c.is_ascii_alphabetic() || c == '_')
        && chars.all(|c| c.is_ascii_alphanumeric() || c == '_');
    if plain {
        name.to_string()
    } else {
        format!("`{}`", name.replace('\\', "\\\\").replace('`', "\\`"))
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::schema::{Column, PartitionKey};

    fn schema() -> TableSchema {
        let column = |name: &str, ty: &str| Column {
            name: name.to_string(),
            ty: ty.parse().expect("type"),
        };
        TableSchema::new(
            vec![
                column("id", "UInt64"),
                column("ts", "DateTime"),
                column("v", "String"),
                column("n", "Int64"),
            ],
            vec!["id".to_string()],
            PartitionKey::ToYyyyMm("ts".to_string()),
        )
        .expect("schema")
    }

    fn parse(text: &str) -> Result<MutationCommand, CommandError> {
        MutationCommand::parse(text, &schema())
    }

    #[test]
    fn accepted_commands_render_as_clickhouse_command_text() {
        for (text, rendered) in [
            ("DELETE WHERE id = 5", "DELETE WHERE id = 5"),
            (
                "delete where id in (1, 2) and v is not null",
                "DELETE WHERE (id IN (1, 2)) AND (v IS NOT NULL)",
            ),
            (
                "UPDATE v = concat(v, '!'), n = n * 2 + 1 WHERE n BETWEEN -3 AND 10 OR NOT (v = 'it''s')",
                "UPDATE v = concat(v, '!'), n = (n * 2) + 1 WHERE (n BETWEEN (-3) AND 10) OR (NOT (v = 'it\\'s'))",
            ),
            (
                "UPDATE n = if(toYYYYMM(ts) = 202405, 0, n) WHERE true",
                "UPDATE n = if(toYYYYMM(ts) = 202405, 0, n) WHERE true",
            ),
        ] {
            let command = parse(text).unwrap_or_else(|e| panic!("{text}: {e}"));
            assert_eq!(command.render(), rendered);
            // The rendered text is itself an accepted command meaning the same.
            assert_eq!(parse(&command.render()).expect("again"), command);
        }
        let both = [
            parse("DELETE WHERE id = 1").expect("delete"),
            parse("UPDATE n = 0 WHERE id = 2").expect("update"),
        ];
        assert_eq!(
            render_all(&both),
            "DELETE WHERE id = 1, UPDATE n = 0 WHERE id = 2"
        );
    }

    #[test]
    fn refused_commands_say_why() {
        for (text, message) in [
            ("DELETE WHERE ts < now()", "`now()` is not deterministic"),
            (
                "UPDATE n = rand() WHERE id = 1",
                "`rand()` is not deterministic",
            ),
            (
                "UPDATE v = generateUUIDv4() WHERE 1",
                "`generateUUIDv4()` is not deterministic",
            ),
            (
                "DELETE WHERE sleep(1) = 0",
                "function `sleep` is not in the accepted subset",
            ),
            (
                "DELETE WHERE missing = 1",
                "unknown column `missing`; the table has `id`, `ts`, `v`, `n`",
            ),
            (
                "UPDATE id = 1 WHERE n = 0",
                "column `id` is in the table's key",
            ),
            (
                "UPDATE ts = ts WHERE n = 0",
                "column `ts` is in the table's key",
            ),
            (
                "UPDATE n = 1, n = 2 WHERE id = 0",
                "column `n` is assigned twice",
            ),
            (
                "DELETE WHERE id IN (SELECT 1)",
                "is not in the accepted expression subset",
            ),
            (
                "DELETE WHERE v LIKE 'a%'",
                "is not in the accepted expression subset",
            ),
            ("DELETE id = 1", "Expected: WHERE, found: id"),
            ("DROP TABLE t", "expected DELETE or UPDATE"),
            (
                "DELETE WHERE id = 1; DROP TABLE t",
                "unexpected `;` after the predicate",
            ),
            (
                "UPDATE WHERE id = 1",
                "mutation command `UPDATE WHERE id = 1`",
            ),
        ] {
            let error = parse(text).expect_err(text).to_string();
            assert!(error.contains(message), "{text}: {error}");
        }
    }
}
