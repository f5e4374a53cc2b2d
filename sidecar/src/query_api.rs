//! SQL over HTTP: `POST /query` (the SQL is the body) and `GET /query?sql=`, answered by
//! `rtable_query` over the same pinned snapshot `/select` streams; and ClickHouse's HTTP
//! interface for what rtable supports, so ClickHouse's HTTP clients work:
//! `POST /?query=INSERT INTO <table> FORMAT <fmt>` with the rows as the body (the insert
//! path of `/insert`) and `/?query=SELECT ... [FORMAT <fmt>]`. Everything else on `/` gets
//! ClickHouse's error shape, `Code: <n>. DB::Exception: <message>`.

use std::collections::HashMap;
use std::sync::Arc;

use axum::Router;
use axum::body::{Body, Bytes};
use axum::extract::{Query, Request, State};
use axum::http::{HeaderValue, Method, StatusCode, header};
use axum::response::{IntoResponse, Response};
use axum::routing::get;
use futures::StreamExt;
use rtable_query::{Answer, Format, QueryError, TableSnapshot, code};
use serde_json::json;

use crate::config::Config;
use crate::replica::Replica;
use crate::rows::{self, InputFormat};
use crate::select;
use crate::sink::{self, Committer, InsertError, InsertRequest};

/// What the handlers use: the replica, the insert path and the engine.
#[derive(Clone)]
pub struct QueryState {
    pub replica: Arc<Replica>,
    pub committer: Committer,
    pub engine: Arc<rtable_query::Engine>,
}

/// The query engine's resources, from the sidecar's flags.
pub fn limits(cfg: &Config) -> rtable_query::Limits {
    let cpus = std::thread::available_parallelism().map_or(2, |n| n.get());
    rtable_query::Limits {
        memory_bytes: cfg.query_memory_limit_bytes,
        timeout: std::time::Duration::from_secs(cfg.query_timeout_seconds),
        max_concurrent: cfg.query_max_concurrent,
        threads: if cfg.query_threads == 0 {
            cpus
        } else {
            cfg.query_threads
        },
    }
}

/// `/query` and ClickHouse's `/`.
pub fn routes(state: QueryState) -> Router {
    Router::new()
        .route("/query", get(query_get).post(query_post))
        .route("/", get(clickhouse).post(clickhouse))
        .with_state(state)
}

/// Why a SQL request got no answer.
#[derive(Debug)]
enum Failure {
    Query(QueryError),
    /// A parameter or body the request got wrong.
    BadRequest(String),
    /// The replica cannot answer now (sequential consistency without the quorum's parts).
    Unavailable(String),
}

impl Failure {
    fn status(&self) -> StatusCode {
        match self {
            Failure::Query(e) => {
                StatusCode::from_u16(e.status()).unwrap_or(StatusCode::INTERNAL_SERVER_ERROR)
            }
            Failure::BadRequest(_) => StatusCode::BAD_REQUEST,
            Failure::Unavailable(_) => StatusCode::SERVICE_UNAVAILABLE,
        }
    }

    fn message(&self) -> String {
        match self {
            Failure::Query(e) => e.to_string(),
            Failure::BadRequest(m) | Failure::Unavailable(m) => m.clone(),
        }
    }

    fn clickhouse_code(&self) -> u32 {
        match self {
            Failure::Query(e) => e.clickhouse_code(),
            Failure::BadRequest(_) => code::BAD_ARGUMENTS,
            // REPLICA_IS_NOT_IN_QUORUM
            Failure::Unavailable(_) => 289,
        }
    }

    /// `/query`'s error: JSON, as every other endpoint of the replica answers.
    fn json(self) -> Response {
        (
            self.status(),
            axum::Json(json!({ "error": self.message() })),
        )
            .into_response()
    }
}

/// Parameters besides the SQL itself.
struct Options {
    format: Format,
    sequential: bool,
}

fn parse_sequential(name: &str, value: Option<&String>) -> Result<bool, Failure> {
    match value.map(String::as_str) {
        None | Some("0") => Ok(false),
        Some("1") => Ok(true),
        Some(other) => Err(Failure::BadRequest(format!(
            "`{name}={other}` must be 0 or 1"
        ))),
    }
}

fn query_options(params: &HashMap<String, String>, allowed: &[&str]) -> Result<Options, Failure> {
    if let Some(unknown) = params.keys().find(|k| !allowed.contains(&k.as_str())) {
        return Err(Failure::BadRequest(format!(
            "unknown query parameter `{unknown}`; /query takes {}",
            allowed
                .iter()
                .map(|k| format!("`{k}`"))
                .collect::<Vec<_>>()
                .join(", ")
        )));
    }
    let format = match params.get("format") {
        None => Format::JsonEachRow,
        Some(name) => Format::parse(name).map_err(Failure::Query)?,
    };
    Ok(Options {
        format,
        sequential: parse_sequential(
            "sequential_consistency",
            params.get("sequential_consistency"),
        )?,
    })
}

async fn query_get(
    State(state): State<QueryState>,
    Query(params): Query<HashMap<String, String>>,
) -> Response {
    let answer = async {
        let options = query_options(&params, &["sql", "format", "sequential_consistency"])?;
        let sql = params.get("sql").ok_or_else(|| {
            Failure::BadRequest(
                "`sql` is required: GET /query?sql=SELECT ... (or POST /query with the SQL as the body)"
                    .into(),
            )
        })?;
        run(&state, sql, options).await
    };
    answer.await.unwrap_or_else(Failure::json)
}

async fn query_post(
    State(state): State<QueryState>,
    Query(params): Query<HashMap<String, String>>,
    body: Bytes,
) -> Response {
    let answer = async {
        let options = query_options(&params, &["format", "sequential_consistency"])?;
        let sql = std::str::from_utf8(&body)
            .map_err(|e| Failure::BadRequest(format!("the SQL in the body is not UTF-8: {e}")))?;
        if sql.trim().is_empty() {
            return Err(Failure::BadRequest(
                "the body is empty: POST /query with one SELECT as the body".into(),
            ));
        }
        run(&state, sql, options).await
    };
    answer.await.unwrap_or_else(Failure::json)
}

/// The table as queries see it, over `parts`: columns as stored in the parts' files
/// (DateTime in milliseconds, see `rows`), the ORDER BY key, the data files.
fn table_snapshot(replica: &Replica, parts: &[Arc<crate::store::ActivePart>]) -> TableSnapshot {
    TableSnapshot {
        name: replica.table.manifest.metadata.name.clone(),
        schema: rows::storage_schema(&rows::arrow_schema(&replica.table.schema)),
        order_by: replica.table.schema.order_by.clone(),
        files: parts.iter().map(|p| p.data_path()).collect(),
    }
}

/// Runs one query on a snapshot pinned for its whole life, `/select`'s (quorum-visible
/// parts only with sequential consistency).
async fn answer(state: &QueryState, sql: &str, options: Options) -> Result<Answer, Failure> {
    let replica = &state.replica;
    let visible = if options.sequential {
        Some(
            select::quorum_view(replica)
                .await
                .map_err(Failure::Unavailable)?,
        )
    } else {
        None
    };
    let parts = select::pinned(replica, visible.as_ref());
    let table = table_snapshot(replica, &parts);
    state
        .engine
        .run(sql, options.format, table, parts)
        .await
        .map_err(Failure::Query)
}

fn streamed(answer: Answer) -> Response {
    let format = answer.format;
    let body = answer
        .body
        .map(|chunk| chunk.map_err(std::io::Error::other));
    let mut response = Body::from_stream(body).into_response();
    let headers = response.headers_mut();
    headers.insert(
        header::CONTENT_TYPE,
        HeaderValue::from_static(format.content_type()),
    );
    headers.insert(
        "x-clickhouse-format",
        HeaderValue::from_static(format.name()),
    );
    response
}

async fn run(state: &QueryState, sql: &str, options: Options) -> Result<Response, Failure> {
    answer(state, sql, options).await.map(streamed)
}

/// ClickHouse's name of an error code, for its message shape.
fn code_name(code: u32) -> &'static str {
    match code {
        27 => "CANNOT_PARSE_INPUT_ASSERTION_FAILED",
        36 => "BAD_ARGUMENTS",
        47 => "UNKNOWN_IDENTIFIER",
        48 => "NOT_IMPLEMENTED",
        60 => "UNKNOWN_TABLE",
        62 => "SYNTAX_ERROR",
        73 => "UNKNOWN_FORMAT",
        115 => "UNKNOWN_SETTING",
        159 => "TIMEOUT_EXCEEDED",
        164 => "READONLY",
        202 => "TOO_MANY_SIMULTANEOUS_QUERIES",
        241 => "MEMORY_LIMIT_EXCEEDED",
        242 => "TABLE_IS_READ_ONLY",
        289 => "REPLICA_IS_NOT_IN_QUORUM",
        307 => "TOO_LARGE_STRING_SIZE",
        319 => "UNKNOWN_STATUS_OF_INSERT",
        394 => "QUERY_WAS_CANCELLED",
        _ => "UNKNOWN_EXCEPTION",
    }
}

/// ClickHouse's error answer: the code in `X-ClickHouse-Exception-Code` and the text
/// `Code: <n>. DB::Exception: <message>. (<NAME>)`.
fn clickhouse_error(status: StatusCode, code: u32, message: &str) -> Response {
    let text = format!(
        "Code: {code}. DB::Exception: {}. ({}) (version rtable {})\n",
        message.trim_end_matches('.'),
        code_name(code),
        env!("CARGO_PKG_VERSION")
    );
    let mut response = (status, text).into_response();
    response
        .headers_mut()
        .insert("x-clickhouse-exception-code", HeaderValue::from(code));
    response
}

fn clickhouse_failure(f: Failure) -> Response {
    clickhouse_error(f.status(), f.clickhouse_code(), &f.message())
}

/// An `INSERT INTO <table> [TABLE] FORMAT <fmt> [rows]` statement.
#[derive(Debug, PartialEq, Eq)]
struct InsertStatement {
    table: String,
    format: String,
    /// Rows written after the format name in the query text itself.
    inline: String,
}

/// The next word (letters, digits, `_`, `-`, or a quoted name) and the rest.
fn word(text: &str) -> Option<(String, &str)> {
    let text = text.trim_start();
    let quote = text.chars().next().filter(|c| *c == '`' || *c == '"');
    if let Some(q) = quote {
        let rest = &text[1..];
        let end = rest.find(q)?;
        return Some((rest[..end].to_string(), &rest[end + 1..]));
    }
    let end = text
        .find(|c: char| !(c.is_alphanumeric() || c == '_' || c == '-'))
        .unwrap_or(text.len());
    (end > 0).then(|| (text[..end].to_string(), &text[end..]))
}

/// A possibly qualified name (`db.table`, `` `db`.`table` ``): its last part and the rest.
fn table_name(text: &str) -> Option<(String, &str)> {
    let (mut last, mut rest) = word(text)?;
    while let Some(after_dot) = rest.strip_prefix('.') {
        (last, rest) = word(after_dot)?;
    }
    Some((last, rest))
}

fn is_insert(text: &str) -> bool {
    word(text).is_some_and(|(w, _)| w.eq_ignore_ascii_case("INSERT"))
}

fn parse_insert(text: &str) -> Result<InsertStatement, String> {
    const SHAPE: &str = "INSERT INTO <table> FORMAT <JSONEachRow|CSV|CSVWithNames|Parquet> with the rows as the body";
    let expect = |text: &str, keyword: &str| -> Result<String, String> {
        match word(text) {
            Some((w, rest)) if w.eq_ignore_ascii_case(keyword) => Ok(rest.to_string()),
            _ => Err(format!("expected {keyword}: send {SHAPE}")),
        }
    };
    let rest = expect(text, "INSERT")?;
    let rest = expect(&rest, "INTO")?;
    // `database.table`: the database is the namespace, which a replica serves only one of.
    let (mut table, mut rest) =
        table_name(&rest).ok_or(format!("the table is missing: send {SHAPE}"))?;
    if table.eq_ignore_ascii_case("TABLE") {
        (table, rest) = table_name(rest).ok_or(format!("the table is missing: send {SHAPE}"))?;
    }
    if rest.trim_start().starts_with('(') {
        return Err(
            "column lists are not supported: send every column of the table, in its order or by name (JSONEachRow, CSVWithNames)".into(),
        );
    }
    let (keyword, after) = word(rest).ok_or(format!("FORMAT is missing: send {SHAPE}"))?;
    if keyword.eq_ignore_ascii_case("VALUES") || keyword.eq_ignore_ascii_case("SELECT") {
        return Err(format!(
            "INSERT ... {} is not supported: send {SHAPE}",
            keyword.to_uppercase()
        ));
    }
    if !keyword.eq_ignore_ascii_case("FORMAT") {
        return Err(format!("expected FORMAT, found `{keyword}`: send {SHAPE}"));
    }
    let (format, inline) = word(after).ok_or(format!("the format is missing: send {SHAPE}"))?;
    Ok(InsertStatement {
        table,
        format,
        inline: inline.trim_start().to_string(),
    })
}

/// ClickHouse settings this endpoint takes as URL parameters; `user`, `password` and
/// `database` are the client's identity and namespace, which the listener handles.
const CLICKHOUSE_PARAMS: [&str; 7] = [
    "query",
    "default_format",
    "database",
    "user",
    "password",
    "insert_deduplication_token",
    "select_sequential_consistency",
];

async fn clickhouse(
    State(state): State<QueryState>,
    method: Method,
    Query(params): Query<HashMap<String, String>>,
    request: Request,
) -> Response {
    if let Some(unknown) = params
        .keys()
        .find(|k| !CLICKHOUSE_PARAMS.contains(&k.as_str()))
    {
        return clickhouse_error(
            StatusCode::BAD_REQUEST,
            115,
            &format!(
                "Setting {unknown} is not supported here; rtable takes {}",
                CLICKHOUSE_PARAMS.join(", ")
            ),
        );
    }
    let query = params.get("query").cloned().unwrap_or_default();
    if is_insert(&query) {
        return clickhouse_insert(&state, &params, &query, request.into_body()).await;
    }
    let body = match axum::body::to_bytes(request.into_body(), MAX_QUERY_BYTES).await {
        Ok(b) => b,
        Err(e) => {
            return clickhouse_error(
                StatusCode::PAYLOAD_TOO_LARGE,
                code::BAD_ARGUMENTS,
                &format!(
                    "cannot read the query within {MAX_QUERY_BYTES} bytes: {e}; rows to insert go with INSERT INTO <table> FORMAT <fmt> in the `query` parameter"
                ),
            );
        }
    };
    if query.trim().is_empty() && (method == Method::GET || body.is_empty()) {
        // ClickHouse's answer to a bare `GET /`: clients use it as a ping.
        return (StatusCode::OK, "Ok.\n").into_response();
    }
    let mut sql = query;
    if method == Method::POST {
        // ClickHouse's rule: the body continues the query.
        match std::str::from_utf8(&body) {
            Ok(text) => sql.push_str(text),
            Err(e) => {
                return clickhouse_error(
                    StatusCode::BAD_REQUEST,
                    code::SYNTAX_ERROR,
                    &format!("the query in the body is not UTF-8: {e}"),
                );
            }
        }
    }
    if is_insert(&sql) {
        return clickhouse_error(
            StatusCode::BAD_REQUEST,
            code::SYNTAX_ERROR,
            "an INSERT goes in the `query` parameter with the rows as the body: POST /?query=INSERT INTO <table> FORMAT <fmt>",
        );
    }
    let options = async {
        let format = match params.get("default_format") {
            None => Format::JsonEachRow,
            Some(name) => Format::parse(name).map_err(Failure::Query)?,
        };
        let sequential = parse_sequential(
            "select_sequential_consistency",
            params.get("select_sequential_consistency"),
        )?;
        Ok(Options { format, sequential })
    };
    let options = match options.await {
        Ok(o) => o,
        Err(f) => return clickhouse_failure(f),
    };
    run(&state, &sql, options)
        .await
        .unwrap_or_else(clickhouse_failure)
}

/// The longest query text (the `query` parameter aside) a POST body may hold.
const MAX_QUERY_BYTES: usize = 1 << 20;

async fn clickhouse_insert(
    state: &QueryState,
    params: &HashMap<String, String>,
    query: &str,
    body: Body,
) -> Response {
    let statement = match parse_insert(query) {
        Ok(s) => s,
        Err(message) => {
            return clickhouse_error(StatusCode::BAD_REQUEST, code::SYNTAX_ERROR, &message);
        }
    };
    let replica = &state.replica;
    let name = &replica.table.manifest.metadata.name;
    if statement.table != *name {
        return clickhouse_error(
            StatusCode::NOT_FOUND,
            code::UNKNOWN_TABLE,
            &format!(
                "Table {} does not exist: this replica holds table `{name}`",
                statement.table
            ),
        );
    }
    let format = match InputFormat::parse(&statement.format) {
        Ok(f) => f,
        Err(e) => {
            return clickhouse_error(
                StatusCode::BAD_REQUEST,
                code::UNKNOWN_FORMAT,
                &e.to_string(),
            );
        }
    };
    // As `/insert`: a body bigger than one block streams through `sink::stream`.
    let threshold = replica.cfg.max_insert_block_bytes;
    let (head, rest) = match sink::stream::read_head(body.into_data_stream(), threshold).await {
        Ok(read) => read,
        Err(e) => {
            return clickhouse_error(
                StatusCode::BAD_REQUEST,
                27,
                &format!("cannot read the body: {e}"),
            );
        }
    };
    let limit = replica.cfg.max_insert_bytes;
    if head.len() as u64 > limit {
        return clickhouse_error(
            StatusCode::PAYLOAD_TOO_LARGE,
            307,
            &format!(
                "the body is larger than the {limit}-byte limit (--max-insert-bytes); split the insert or raise the limit"
            ),
        );
    }
    let body = if statement.inline.is_empty() {
        head
    } else {
        let mut rows = statement.inline.into_bytes();
        if !rows.ends_with(b"\n") && !head.is_empty() {
            rows.push(b'\n');
        }
        rows.extend_from_slice(&head);
        Bytes::from(rows)
    };
    let dedup_token = params
        .get("insert_deduplication_token")
        .filter(|t| !t.is_empty())
        .cloned();
    let request = InsertRequest {
        format,
        body,
        dedup_token,
        quorum: None,
        quorum_parallel: None,
    };
    match sink::insert_streamed(replica, &state.committer, request, rest).await {
        Ok(answer) => {
            let summary = json!({
                "written_rows": answer.rows.to_string(),
                "parts": answer.parts,
                "deduplicated": answer.deduplicated,
            });
            let mut response = StatusCode::OK.into_response();
            if let Ok(value) = HeaderValue::from_str(&summary.to_string()) {
                response.headers_mut().insert("x-clickhouse-summary", value);
            }
            response
        }
        Err(e) => {
            let status =
                StatusCode::from_u16(e.status()).unwrap_or(StatusCode::INTERNAL_SERVER_ERROR);
            let code = match &e {
                InsertError::Input(_) => 27,
                _ if status == StatusCode::SERVICE_UNAVAILABLE => 242,
                _ => code::UNKNOWN_EXCEPTION,
            };
            clickhouse_error(status, code, &e.to_string())
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn insert_statements_parse_with_their_format_and_inline_rows() {
        assert_eq!(
            parse_insert("INSERT INTO events FORMAT JSONEachRow"),
            Ok(InsertStatement {
                table: "events".into(),
                format: "JSONEachRow".into(),
                inline: String::new(),
            })
        );
        assert_eq!(
            parse_insert("insert into table default.`events` format CSV\n1,2\n"),
            Ok(InsertStatement {
                table: "events".into(),
                format: "CSV".into(),
                inline: "1,2\n".into(),
            })
        );
        for (bad, expected) in [
            ("INSERT INTO events (a, b) FORMAT CSV", "column lists"),
            ("INSERT INTO events VALUES (1)", "VALUES is not supported"),
            ("INSERT INTO events", "FORMAT is missing"),
            ("INSERT events FORMAT CSV", "expected INTO"),
        ] {
            let message = parse_insert(bad).expect_err(bad);
            assert!(message.contains(expected), "{bad}: {message}");
        }
    }

    #[test]
    fn errors_have_clickhouses_shape() {
        let response = clickhouse_error(StatusCode::BAD_REQUEST, 62, "Syntax error: nope.");
        assert_eq!(
            response.headers().get("x-clickhouse-exception-code"),
            Some(&HeaderValue::from(62u32))
        );
    }
}
