//! The error a client gets back for a body that does not fit the table.

use std::fmt;

use serde::Serialize;

/// A rejected insert body (or format name). Serialized as the JSON body of the HTTP 400:
/// `{"error": "...", "line": 3, "column": "x"}`, the same shape as every other error answer;
/// `error` is complete on its own, `line` and `column` let a client point at the input.
#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
pub struct InputError {
    /// 1-based line of the body (JSONEachRow, CSV); `None` for Parquet and whole-body errors.
    pub line: Option<usize>,
    /// The column the error is about, when there is one.
    pub column: Option<String>,
    #[serde(rename = "error")]
    pub message: String,
}

impl InputError {
    pub fn new(message: impl Into<String>) -> Self {
        InputError {
            line: None,
            column: None,
            message: message.into(),
        }
    }

    pub fn at(line: Option<usize>, column: Option<&str>, message: impl Into<String>) -> Self {
        InputError {
            line,
            column: column.map(str::to_string),
            message: message.into(),
        }
    }

    pub fn empty_body() -> Self {
        InputError::new("empty body: send at least one row")
    }
}

impl fmt::Display for InputError {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(&self.message)
    }
}

impl std::error::Error for InputError {}
