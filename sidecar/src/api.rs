//! The HTTP surface of a replica: client endpoints (insert, select, status, queue,
//! health, metrics) and the interserver part exchange, on one listener or two. Handlers translate; the work is in
//! `sink`, `status`, `select` and the store.

use std::collections::HashMap;
use std::sync::Arc;

use axum::Router;
use axum::body::Body;
use axum::extract::{Path, Query, Request, State};
use axum::http::{HeaderMap, HeaderValue, StatusCode, header};
use axum::response::{IntoResponse, Response};
use axum::routing::{get, post};
use futures::StreamExt;
use serde_json::json;
use tracing::warn;

use rtable_protocol::PartName;
use rtable_protocol::manifest::{AutoQuorum, InsertQuorum};

use crate::auth::{Gate, Role};
use crate::exchange;
use crate::metrics::Metrics;
use crate::replica::{Replica, SECRET_HEADER};
use crate::rows::{InputFormat, OutputFormat};
use crate::sink::{self, Committer, InsertRequest};
use crate::supervisor::Health;
use crate::{select, status};

#[derive(Clone)]
pub struct AppState {
    pub replica: Arc<Replica>,
    pub committer: Committer,
    /// The background tasks' health (see `supervisor`), for `/readyz` and `/metrics`.
    pub tasks: Health,
    /// The SQL engine of `/query` (see `query_api`).
    pub query: Arc<rtable_query::Engine>,
}

/// The client endpoints, each with the role it needs (see `auth`); probes stay open.
pub fn client_router(state: AppState, gate: &Gate) -> Router {
    Router::new()
        .route("/insert", gate.require(Role::Writer, post(insert)))
        .route("/select", gate.require(Role::Reader, get(select_rows)))
        .route(
            "/drop_partition",
            gate.require(Role::Admin, post(drop_partition)),
        )
        .route("/status", gate.require(Role::Reader, get(get_status)))
        .route("/queue", gate.require(Role::Reader, get(get_queue)))
        .route("/healthz", get(|| async { "ok\n" }))
        .route("/readyz", get(readyz))
        .route("/metrics", gate.metrics(get(metrics)))
        .with_state(state.clone())
        .merge(gate.require_all(
            sql_role,
            crate::query_api::routes(crate::query_api::QueryState {
                replica: state.replica,
                committer: state.committer,
                engine: state.query,
            }),
        ))
}

/// The role the SQL endpoints need: `/query` only reads; `/` (ClickHouse's HTTP
/// interface) inserts on POST, so a POST there needs a writer; GET there is read-only,
/// as in ClickHouse.
fn sql_role(method: &axum::http::Method, path: &str) -> Role {
    if path == "/" && method != axum::http::Method::GET {
        Role::Writer
    } else {
        Role::Reader
    }
}

/// The peer endpoints (ClickHouse's interserver port): the part exchange, pushes and
/// handoffs, authenticated by the interserver secret (and the peer's certificate with
/// mutual TLS), never by the client users.
pub fn interserver_router(state: AppState) -> Router {
    Router::new()
        .route("/parts/{name}", get(send_part))
        .route("/push/{name}", post(receive_push))
        .route("/handoff/{name}", post(receive_handoff))
        .with_state(state)
}

/// Both on one listener (no `--interserver-listen`).
pub fn router(state: AppState, gate: &Gate) -> Router {
    client_router(state.clone(), gate).merge(interserver_router(state))
}

pub fn error(status: StatusCode, message: impl Into<String>) -> Response {
    (status, axum::Json(json!({ "error": message.into() }))).into_response()
}

async fn insert(
    State(state): State<AppState>,
    Query(params): Query<HashMap<String, String>>,
    request: Request,
) -> Response {
    let replica = &state.replica;
    for key in params.keys() {
        if ![
            "format",
            "dedup_token",
            "insert_quorum",
            "insert_quorum_parallel",
        ]
        .contains(&key.as_str())
        {
            return error(
                StatusCode::BAD_REQUEST,
                format!(
                    "unknown query parameter `{key}`; /insert takes `format`, `dedup_token`, `insert_quorum` and `insert_quorum_parallel`"
                ),
            );
        }
    }
    let quorum = match params.get("insert_quorum").map(String::as_str) {
        None => None,
        Some("auto") => Some(InsertQuorum::Auto(AutoQuorum::Auto)),
        Some(n) => match n.parse::<u32>() {
            Ok(n) => Some(InsertQuorum::Replicas(n)),
            Err(_) => {
                return error(
                    StatusCode::BAD_REQUEST,
                    format!("`insert_quorum={n}` must be a number of replicas or `auto`"),
                );
            }
        },
    };
    let quorum_parallel = match params.get("insert_quorum_parallel").map(String::as_str) {
        None => None,
        Some("1" | "true") => Some(true),
        Some("0" | "false") => Some(false),
        Some(other) => {
            return error(
                StatusCode::BAD_REQUEST,
                format!("`insert_quorum_parallel={other}` must be 0 or 1"),
            );
        }
    };
    let format = match InputFormat::parse(
        params
            .get("format")
            .map(String::as_str)
            .unwrap_or("JSONEachRow"),
    ) {
        Ok(f) => f,
        Err(e) => return error(StatusCode::BAD_REQUEST, e.to_string()),
    };
    let dedup_token = params.get("dedup_token").cloned();
    if dedup_token.as_deref() == Some("") {
        return error(
            StatusCode::BAD_REQUEST,
            "`dedup_token` is empty; omit it or send a non-empty token",
        );
    }
    // A body bigger than one block streams: it is decoded and written block by block as
    // it arrives (see sink::stream).
    let threshold = replica.cfg.max_insert_block_bytes;
    let (body, rest) =
        match sink::stream::read_head(request.into_body().into_data_stream(), threshold).await {
            Ok(read) => read,
            Err(e) => {
                Metrics::inc(&replica.metrics.failed_inserts);
                return error(
                    StatusCode::BAD_REQUEST,
                    format!("cannot read the body: {e}"),
                );
            }
        };
    let limit = replica.cfg.max_insert_bytes;
    if body.len() as u64 > limit {
        Metrics::inc(&replica.metrics.failed_inserts);
        return error(
            StatusCode::PAYLOAD_TOO_LARGE,
            format!(
                "the body is larger than the {limit}-byte limit (--max-insert-bytes); split the insert or raise the limit"
            ),
        );
    }
    match sink::insert_streamed(
        replica,
        &state.committer,
        InsertRequest {
            format,
            body,
            dedup_token,
            quorum,
            quorum_parallel,
        },
        rest,
    )
    .await
    {
        Ok(answer) => axum::Json(answer).into_response(),
        Err(sink::InsertError::Input(e)) => {
            Metrics::inc(&replica.metrics.failed_inserts);
            (StatusCode::BAD_REQUEST, axum::Json(e)).into_response()
        }
        Err(e) => {
            let status =
                StatusCode::from_u16(e.status()).unwrap_or(StatusCode::INTERNAL_SERVER_ERROR);
            if status.is_server_error() && status != StatusCode::SERVICE_UNAVAILABLE {
                warn!(replica = %replica.name, error = %e, "insert failed");
            }
            error(status, e.to_string())
        }
    }
}

async fn drop_partition(
    State(state): State<AppState>,
    Query(params): Query<HashMap<String, String>>,
) -> Response {
    let Some(partition) = params.get("partition") else {
        return error(
            StatusCode::BAD_REQUEST,
            "`partition` is required: POST /drop_partition?partition=<id> (ids are the first field of part names)",
        );
    };
    match crate::drop::drop_partition(&state.replica, partition).await {
        Ok(range) => {
            axum::Json(json!({ "partition": partition, "drop_range": range })).into_response()
        }
        Err(e @ crate::drop::DropError::BadPartition(_)) => {
            error(StatusCode::BAD_REQUEST, e.to_string())
        }
        Err(e) => error(StatusCode::SERVICE_UNAVAILABLE, e.to_string()),
    }
}

async fn select_rows(
    State(state): State<AppState>,
    Query(params): Query<HashMap<String, String>>,
) -> Response {
    let format = match OutputFormat::parse(
        params
            .get("format")
            .map(String::as_str)
            .unwrap_or("JSONEachRow"),
    ) {
        Ok(f) => f,
        Err(e) => return error(StatusCode::BAD_REQUEST, e.to_string()),
    };
    let visible = match params.get("sequential_consistency").map(String::as_str) {
        None | Some("0") => None,
        Some("1") => match select::quorum_view(&state.replica).await {
            Ok(v) => Some(v),
            Err(e) => return error(StatusCode::SERVICE_UNAVAILABLE, e),
        },
        Some(other) => {
            return error(
                StatusCode::BAD_REQUEST,
                format!("`sequential_consistency={other}` must be 0 or 1"),
            );
        }
    };
    let stream = select::stream(state.replica.clone(), format, visible);
    Response::builder()
        .header(header::CONTENT_TYPE, format.content_type())
        .body(Body::from_stream(stream))
        .unwrap_or_else(|e| error(StatusCode::INTERNAL_SERVER_ERROR, e.to_string()))
}

async fn get_status(State(state): State<AppState>) -> Response {
    axum::Json(status::collect(&state.replica).await).into_response()
}

async fn get_queue(State(state): State<AppState>) -> Response {
    let rows = state.replica.queue.lock().rows();
    axum::Json(rows).into_response()
}

async fn readyz(State(state): State<AppState>) -> Response {
    // A task that is down stops part of replication while the session may look fine (a
    // dead session task even leaves the last session published): checked first.
    if let Err(down) = state.tasks.check() {
        return error(StatusCode::SERVICE_UNAVAILABLE, down.to_string());
    }
    match state.replica.sessions.active() {
        Ok(_) => (StatusCode::OK, "ready\n").into_response(),
        Err(e) => error(StatusCode::SERVICE_UNAVAILABLE, e.reason),
    }
}

async fn metrics(State(state): State<AppState>) -> Response {
    let replica = &state.replica;
    let (queue_size, inserts) = {
        let q = replica.queue.lock();
        (q.len() as f64, q.inserts_in_queue() as f64)
    };
    let view = replica.sessions.view();
    let gauges = [
        (
            "rtable_queue_size",
            "Entries in this replica's replication queue",
            queue_size,
        ),
        (
            "rtable_inserts_in_queue",
            "GET_PART entries waiting in the queue",
            inserts,
        ),
        (
            "rtable_absolute_delay_seconds",
            "How far this replica is behind (system.replicas absolute_delay)",
            status::absolute_delay(replica) as f64,
        ),
        (
            "rtable_readonly",
            "1 while the replica refuses inserts",
            if view.readonly_reason.is_some() {
                1.0
            } else {
                0.0
            },
        ),
        (
            "rtable_parts",
            "Active parts on this replica",
            replica.store.parts().len() as f64,
        ),
    ];
    let mut text = replica.metrics.render(&replica.name, &gauges);
    state.tasks.write_metrics(&replica.name, &mut text);
    state.query.metrics().render(&replica.name, &mut text);
    (
        [(
            header::CONTENT_TYPE,
            HeaderValue::from_static("text/plain; version=0.0.4"),
        )],
        text,
    )
        .into_response()
}

/// The refusal of an interserver request without the shared secret (when one is set).
fn refuse_unauthenticated(replica: &Replica, headers: &HeaderMap) -> Option<Response> {
    let secret = replica.secret.as_ref()?;
    let given = headers.get(SECRET_HEADER).and_then(|v| v.to_str().ok());
    if crate::auth::secret_matches(secret, given) {
        return None;
    }
    Metrics::inc(&replica.metrics.rejected_interserver);
    Some(error(
        StatusCode::UNAUTHORIZED,
        format!("interserver requests need the `{SECRET_HEADER}` header with the shared secret"),
    ))
}

/// An interserver request's part: authenticated, and a safe part name.
fn interserver_part(
    replica: &Replica,
    headers: &HeaderMap,
    name: &str,
) -> Result<PartName, Box<Response>> {
    if let Some(refused) = refuse_unauthenticated(replica, headers) {
        return Err(Box::new(refused));
    }
    PartName::parse(name).map_err(|e| {
        Box::new(error(
            StatusCode::BAD_REQUEST,
            format!("unsafe or invalid part name: {e}"),
        ))
    })
}

#[derive(serde::Deserialize)]
struct PushQuery {
    source: String,
    log: u64,
}

/// Interserver: a peer pushes a part it just committed (see `push`). The answer says
/// whether it was taken; one not taken is fetched when its log entry comes, as always.
async fn receive_push(
    State(state): State<AppState>,
    Path(name): Path<String>,
    Query(query): Query<PushQuery>,
    headers: HeaderMap,
    body: Body,
) -> Response {
    let replica = &state.replica;
    let part = match interserver_part(replica, &headers, &name) {
        Ok(p) => p,
        Err(refused) => return *refused,
    };
    if let Some(reason) =
        crate::queue::prefetch::refuse_push(replica, &query.source, &part, query.log)
    {
        return axum::Json(json!({ "taken": false, "reason": reason })).into_response();
    }
    let taken = crate::queue::prefetch::take_push(
        replica.clone(),
        &query.source,
        &part,
        body.into_data_stream(),
    )
    .await;
    let answer = match taken {
        Ok(()) => json!({ "taken": true }),
        // The entry fetches the part when it comes; the reason is for the pusher's log.
        Err(reason) => json!({ "taken": false, "reason": reason }),
    };
    axum::Json(answer).into_response()
}

#[derive(serde::Deserialize)]
struct HandoffQuery {
    source: String,
    lock: String,
    /// Answer once the copy is verified, and again once it is durable (an inserter that
    /// overlaps the fsync with its commit). Without it the one answer waits for both.
    #[serde(default)]
    early: bool,
}

/// Interserver: a peer hands off a quorum insert's part before committing it (see
/// `handoff`). `staged: true` means the commit may record the copy for this replica,
/// checking `host_version`. With `early=true` the body is two JSON lines: the first says
/// `durable: false` once the copy is verified, the second `durable: true` once it is
/// fsynced (or `false` and why it was discarded). Otherwise one answer comes once it is
/// durable.
async fn receive_handoff(
    State(state): State<AppState>,
    Path(name): Path<String>,
    Query(query): Query<HandoffQuery>,
    headers: HeaderMap,
    body: Body,
) -> Response {
    let replica = &state.replica;
    let part = match interserver_part(replica, &headers, &name) {
        Ok(p) => p,
        Err(refused) => return *refused,
    };
    let host_version = match crate::handoff::refuse(replica, &query.source, &part, &query.lock) {
        Ok(v) => v,
        Err(reason) => {
            return axum::Json(json!({ "staged": false, "reason": reason })).into_response();
        }
    };
    let started = std::time::Instant::now();
    let taken =
        crate::handoff::take(replica.clone(), query.source, part, body.into_data_stream()).await;
    tracing::debug!(replica = %replica.name, take_us = started.elapsed().as_micros() as u64, "handoff taken");
    let durable = match taken {
        Ok(durable) => durable,
        Err(reason) => {
            return axum::Json(json!({ "staged": false, "reason": reason })).into_response();
        }
    };
    if !query.early {
        let answer = match durable.wait().await {
            Ok(()) => json!({ "staged": true, "host_version": host_version }),
            Err(reason) => json!({ "staged": false, "reason": reason }),
        };
        return axum::Json(answer).into_response();
    }
    let verified = json!({ "staged": true, "host_version": host_version, "durable": false });
    let lines = futures::stream::once(async move { verified })
        .chain(futures::stream::once(async move {
            match durable.wait().await {
                Ok(()) => json!({ "durable": true }),
                Err(reason) => json!({ "durable": false, "reason": reason }),
            }
        }))
        .map(|line| Ok::<_, std::convert::Infallible>(format!("{line}\n")));
    (
        [(header::CONTENT_TYPE, "application/x-ndjson")],
        Body::from_stream(lines),
    )
        .into_response()
}

/// Interserver: streams a part's files after the exchange header (see `exchange`).
async fn send_part(
    State(state): State<AppState>,
    Path(name): Path<String>,
    headers: HeaderMap,
) -> Response {
    let replica = &state.replica;
    let part = match interserver_part(replica, &headers, &name) {
        Ok(p) => p,
        Err(refused) => return *refused,
    };
    let store = replica.store.clone();
    let part_name = part.clone();
    let opened =
        tokio::task::spawn_blocking(move || exchange::open_for_sending(&store, &part)).await;
    let (mut outgoing, first, active) = match opened {
        Ok(Ok(Some(opened))) => opened,
        Ok(Ok(None)) => {
            return error(
                StatusCode::NOT_FOUND,
                format!("part {name} is not active on replica {}", replica.name),
            );
        }
        Ok(Err(e)) => {
            let message = format!("reading part {name}: {e}");
            replica
                .part_check
                .report(&replica.name, &part_name, &message);
            return error(StatusCode::INTERNAL_SERVER_ERROR, message);
        }
        Err(e) => return error(StatusCode::INTERNAL_SERVER_ERROR, e.to_string()),
    };
    let length = outgoing.content_length();
    let first = bytes::Bytes::from(first);
    let body = if first.len() as u64 == length {
        // A small part (every insert's) leaves in one write together with the response
        // head. Sent as a second, small write, it would wait for the peer's delayed ACK
        // (Nagle): ~40 ms added to every fetch of a small part.
        Body::from(first)
    } else {
        // A blocking thread reads ahead in big chunks while the connection sends; the
        // bounded channel keeps a fetch to a few MiB of memory however big the part is.
        let (tx, rx) = tokio::sync::mpsc::channel::<std::io::Result<bytes::Bytes>>(2);
        let replica = replica.clone();
        tokio::task::spawn_blocking(move || {
            // Holding `active` keeps the part's snapshot alive while the body streams.
            let _keep = active;
            loop {
                let item = match outgoing.next_chunk(exchange::CHUNK_BYTES) {
                    Ok(Some(chunk)) => Ok(bytes::Bytes::from(chunk)),
                    Ok(None) => return,
                    Err(e) => {
                        let message = format!("sending part {part_name}: {e}");
                        replica
                            .part_check
                            .report(&replica.name, &part_name, &message);
                        Err(e)
                    }
                };
                let failed = item.is_err();
                // A closed channel: the peer went away.
                if tx.blocking_send(item).is_err() || failed {
                    return;
                }
            }
        });
        let rest = futures::stream::unfold(rx, |mut rx| async move {
            rx.recv().await.map(|item| (item, rx))
        });
        Body::from_stream(futures::stream::once(async move { Ok(first) }).chain(rest))
    };
    // The exact length lets the peer (and hyper) tell a complete body from a cut one.
    Response::builder()
        .header(header::CONTENT_TYPE, "application/octet-stream")
        .header(header::CONTENT_LENGTH, length)
        .body(body)
        .unwrap_or_else(|e| error(StatusCode::INTERNAL_SERVER_ERROR, e.to_string()))
}
