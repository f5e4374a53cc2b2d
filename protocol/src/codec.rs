//! The error every text codec of the tree reports: which format, which line, what's wrong.

use chrono::{DateTime, NaiveDateTime};

/// ClickHouse's `LocalDateTime` text. ClickHouse writes it in the server's time zone;
/// rtable reads and writes UTC, which agrees because rtable pods run in UTC.
const TIME_FORMAT: &str = "%Y-%m-%d %H:%M:%S";

/// `unix_seconds` as ClickHouse's `YYYY-MM-DD hh:mm:ss`.
pub(crate) fn render_time(unix_seconds: i64) -> String {
    // Only reachable with a time hundreds of millennia away; the epoch keeps the node
    // parseable instead of making render fallible for every caller.
    DateTime::from_timestamp(unix_seconds, 0)
        .map(|t| t.naive_utc().format(TIME_FORMAT).to_string())
        .unwrap_or_else(|| "1970-01-01 00:00:00".to_string())
}

#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error("{what} line {line}: {message}")]
pub struct CodecError {
    /// The node format being parsed ("log entry", "metadata", ...).
    pub what: &'static str,
    /// 1-based line of the input where parsing stopped.
    pub line: usize,
    pub message: String,
}

impl CodecError {
    pub fn new(what: &'static str, line: usize, message: impl Into<String>) -> Self {
        CodecError {
            what,
            line,
            message: message.into(),
        }
    }
}

/// Reads a text node line by line, remembering where it is for error messages.
pub(crate) struct Lines<'a> {
    what: &'static str,
    lines: std::str::Split<'a, char>,
    line: usize,
}

impl<'a> Lines<'a> {
    pub(crate) fn new(what: &'static str, text: &'a str) -> Self {
        Lines {
            what,
            lines: text.split('\n'),
            line: 0,
        }
    }

    pub(crate) fn line(&self) -> usize {
        self.line
    }

    pub(crate) fn error(&self, message: impl Into<String>) -> CodecError {
        CodecError::new(self.what, self.line.max(1), message)
    }

    /// The next line, or an error naming what was expected.
    pub(crate) fn next_line(&mut self, expected: &str) -> Result<&'a str, CodecError> {
        self.line += 1;
        self.lines.next().ok_or_else(|| {
            CodecError::new(
                self.what,
                self.line,
                format!("unexpected end, expected {expected}"),
            )
        })
    }

    /// The next line without consuming it.
    pub(crate) fn peek(&self) -> Option<&'a str> {
        self.lines.clone().next()
    }

    /// The value after `prefix` on the next line.
    pub(crate) fn field(&mut self, prefix: &str) -> Result<&'a str, CodecError> {
        let line = self.next_line(&format!("`{prefix}`"))?;
        line.strip_prefix(prefix)
            .ok_or_else(|| self.error(format!("expected `{prefix}`, got `{line}`")))
    }

    /// A numeric field.
    pub(crate) fn number<T: std::str::FromStr>(&mut self, prefix: &str) -> Result<T, CodecError> {
        let value = self.field(prefix)?;
        value
            .trim()
            .parse()
            .map_err(|_| self.error(format!("`{prefix}` needs a number, got `{value}`")))
    }

    /// A `YYYY-MM-DD hh:mm:ss` field, as unix seconds.
    pub(crate) fn time(&mut self, prefix: &str) -> Result<i64, CodecError> {
        let text = self.field(prefix)?;
        NaiveDateTime::parse_from_str(text, TIME_FORMAT)
            .map(|t| t.and_utc().timestamp())
            .map_err(|_| {
                self.error(format!(
                    "bad `{prefix}` value `{text}`, expected YYYY-MM-DD hh:mm:ss"
                ))
            })
    }

    /// Everything not read yet, for codecs that tolerate appended fields.
    pub(crate) fn rest(self) -> Vec<&'a str> {
        self.lines.collect()
    }
}
