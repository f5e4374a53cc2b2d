//! The one part of the kubelet's HTTPS API the agent serves: container logs, which the API
//! server proxies for `kubectl logs` (`GET /containerLogs/{namespace}/{pod}/{container}`
//! with `follow`, `previous`, `tailLines` and `limitBytes`), on the node's InternalIP at
//! the port the Node announces (10250).
//!
//! The API server reaches it with no client certificate and, without
//! `--kubelet-certificate-authority`, checks no server certificate, so a self-signed one
//! made at start is enough; like a kubelet with `--anonymous-auth`, it serves anyone who can
//! reach the node's address (only this machine). `exec`, `attach` and `port-forward` are
//! not served.

use std::convert::Infallible;
use std::net::{IpAddr, SocketAddr};
use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::time::Duration;

use bytes::Bytes;
use http_body_util::combinators::BoxBody;
use http_body_util::{BodyExt as _, Full, StreamBody};
use hyper::body::{Frame, Incoming};
use hyper::{Request, Response, StatusCode};
use tokio::io::{AsyncReadExt as _, AsyncSeekExt as _};
use tokio_rustls::TlsAcceptor;
use tokio_rustls::rustls::{self, pki_types};
use tokio_util::sync::CancellationToken;
use tracing::{debug, warn};

/// The port a kubelet serves on, announced in the Node's `daemonEndpoints`.
pub const PORT: u16 = 10250;

#[derive(Debug, thiserror::Error)]
pub enum KubeletApiError {
    #[error("making the kubelet API's certificate: {0}")]
    Certificate(#[from] rcgen::Error),
    #[error("configuring TLS for the kubelet API: {0}")]
    Tls(#[from] rustls::Error),
    #[error("binding the kubelet API to {address}: {source}")]
    Bind {
        address: SocketAddr,
        #[source]
        source: std::io::Error,
    },
}

type Body = BoxBody<Bytes, std::io::Error>;

fn text(status: StatusCode, message: impl Into<String>) -> Response<Body> {
    let mut response = Response::new(
        Full::new(Bytes::from(message.into()))
            .map_err(|never| match never {})
            .boxed(),
    );
    *response.status_mut() = status;
    response
}

/// `GET /containerLogs/...` parameters.
#[derive(Debug, Default, Clone, PartialEq, Eq)]
pub struct LogQuery {
    pub namespace: String,
    pub pod: String,
    pub container: String,
    pub follow: bool,
    pub previous: bool,
    pub tail_lines: Option<usize>,
    pub limit_bytes: Option<usize>,
}

/// Parses a `/containerLogs/{namespace}/{pod}/{container}?...` request target.
pub fn parse(path: &str, query: Option<&str>) -> Option<LogQuery> {
    let rest = path.strip_prefix("/containerLogs/")?;
    let mut parts = rest.split('/');
    let (namespace, pod, container) = (parts.next()?, parts.next()?, parts.next()?);
    if parts.next().is_some() || [namespace, pod, container].iter().any(|p| p.is_empty()) {
        return None;
    }
    let mut q = LogQuery {
        namespace: namespace.into(),
        pod: pod.into(),
        container: container.into(),
        ..LogQuery::default()
    };
    for pair in query.unwrap_or_default().split('&') {
        let (key, value) = pair.split_once('=').unwrap_or((pair, ""));
        match key {
            "follow" => q.follow = value == "true",
            "previous" => q.previous = value == "true",
            "tailLines" => q.tail_lines = value.parse().ok(),
            "limitBytes" => q.limit_bytes = value.parse().ok(),
            _ => {}
        }
    }
    Some(q)
}

/// The log file of the container's current (or previous) run: the newest pod of that name
/// (a replaced pod keeps its name, not its UID), its highest-numbered run.
pub fn log_file(logs_dir: &Path, q: &LogQuery) -> Option<PathBuf> {
    let prefix = format!("{}_{}_", q.namespace, q.pod);
    let pod_dir = std::fs::read_dir(logs_dir)
        .ok()?
        .flatten()
        .filter(|e| e.file_name().to_string_lossy().starts_with(&prefix))
        .max_by_key(|e| e.metadata().and_then(|m| m.modified()).ok())?
        .path();
    let mut runs: Vec<(u64, PathBuf)> = std::fs::read_dir(pod_dir.join(&q.container))
        .ok()?
        .flatten()
        .filter_map(|e| {
            let name = e.file_name().to_string_lossy().into_owned();
            let n = name.strip_suffix(".log")?.parse().ok()?;
            Some((n, e.path()))
        })
        .collect();
    runs.sort();
    let index = runs.len().checked_sub(if q.previous { 2 } else { 1 })?;
    runs.into_iter().nth(index).map(|(_, p)| p)
}

/// The last `n` lines of `bytes`.
fn tail(bytes: &[u8], n: usize) -> &[u8] {
    if n == 0 {
        return &[];
    }
    let body = bytes.strip_suffix(b"\n").unwrap_or(bytes);
    let start = body
        .iter()
        .enumerate()
        .rev()
        .filter(|(_, b)| **b == b'\n')
        .nth(n - 1)
        .map_or(0, |(i, _)| i + 1);
    &bytes[start..]
}

async fn logs(logs_dir: &Path, q: LogQuery) -> Response<Body> {
    let Some(path) = log_file(logs_dir, &q) else {
        let which = if q.previous {
            "previous terminated"
        } else {
            "current"
        };
        return text(
            StatusCode::NOT_FOUND,
            format!(
                "no {which} log of container {} in pod {}/{} on this node",
                q.container, q.namespace, q.pod
            ),
        );
    };
    let bytes = match tokio::fs::read(&path).await {
        Ok(b) => b,
        Err(e) => {
            return text(
                StatusCode::INTERNAL_SERVER_ERROR,
                format!("{}: {e}", path.display()),
            );
        }
    };
    let mut shown = q
        .tail_lines
        .map_or(&bytes[..], |n| tail(&bytes, n))
        .to_vec();
    if let Some(limit) = q.limit_bytes {
        shown.truncate(limit);
    }
    if !q.follow {
        let mut response = text(StatusCode::OK, String::new());
        *response.body_mut() = Full::new(Bytes::from(shown))
            .map_err(|never| match never {})
            .boxed();
        return response;
    }
    // Following: what is there, then whatever the container appends, until the client goes.
    let offset = bytes.len() as u64;
    let first = futures::stream::once(async move { Ok(Frame::data(Bytes::from(shown))) });
    let rest = futures::stream::unfold((path, offset), |(path, offset)| async move {
        loop {
            let Ok(mut file) = tokio::fs::File::open(&path).await else {
                return None;
            };
            if file.seek(std::io::SeekFrom::Start(offset)).await.is_err() {
                return None;
            }
            let mut chunk = Vec::new();
            if file.read_to_end(&mut chunk).await.is_err() {
                return None;
            }
            if !chunk.is_empty() {
                let next = offset + chunk.len() as u64;
                return Some((Ok(Frame::data(Bytes::from(chunk))), (path, next)));
            }
            tokio::time::sleep(Duration::from_millis(250)).await;
        }
    });
    let mut response = text(StatusCode::OK, String::new());
    *response.body_mut() = StreamBody::new(futures::StreamExt::chain(first, rest)).boxed();
    response
}

async fn handle(
    logs_dir: Arc<PathBuf>,
    request: Request<Incoming>,
) -> Result<Response<Body>, Infallible> {
    let uri = request.uri();
    debug!(path = %uri, "kubelet API request");
    Ok(match uri.path() {
        "/healthz" => text(StatusCode::OK, "ok"),
        path => match parse(path, uri.query()) {
            Some(q) => logs(&logs_dir, q).await,
            None => text(
                StatusCode::NOT_FOUND,
                format!(
                    "{path}: rtable-node serves only /containerLogs (no exec, attach or port-forward)"
                ),
            ),
        },
    })
}

fn tls(address: IpAddr, node: &str) -> Result<TlsAcceptor, KubeletApiError> {
    let key = rcgen::KeyPair::generate()?;
    let mut params = rcgen::CertificateParams::new(vec![node.to_string()])?;
    params
        .subject_alt_names
        .push(rcgen::SanType::IpAddress(address));
    let cert = params.self_signed(&key)?;
    let der_key =
        pki_types::PrivateKeyDer::Pkcs8(pki_types::PrivatePkcs8KeyDer::from(key.serialize_der()));
    let config = rustls::ServerConfig::builder_with_provider(Arc::new(
        rustls::crypto::ring::default_provider(),
    ))
    .with_safe_default_protocol_versions()?
    .with_no_client_auth()
    .with_single_cert(vec![cert.der().clone()], der_key)?;
    Ok(TlsAcceptor::from(Arc::new(config)))
}

/// Serves container logs from `logs_dir` on `address:10250` until `stop`.
pub async fn serve(
    address: IpAddr,
    node: &str,
    logs_dir: PathBuf,
    stop: CancellationToken,
) -> Result<(), KubeletApiError> {
    let acceptor = tls(address, node)?;
    let socket_address = SocketAddr::new(address, PORT);
    let listener = tokio::net::TcpListener::bind(socket_address)
        .await
        .map_err(|source| KubeletApiError::Bind {
            address: socket_address,
            source,
        })?;
    let logs_dir = Arc::new(logs_dir);
    loop {
        let (stream, peer) = tokio::select! {
            () = stop.cancelled() => return Ok(()),
            accepted = listener.accept() => match accepted {
                Ok(a) => a,
                Err(e) => {
                    warn!(error = %e, "kubelet API accept failed");
                    continue;
                }
            },
        };
        let (acceptor, logs_dir, stop) = (acceptor.clone(), logs_dir.clone(), stop.clone());
        tokio::spawn(async move {
            let stream = match acceptor.accept(stream).await {
                Ok(s) => s,
                Err(e) => {
                    debug!(%peer, error = %e, "kubelet API TLS handshake failed");
                    return;
                }
            };
            let service = hyper::service::service_fn(move |r| handle(logs_dir.clone(), r));
            let connection = hyper::server::conn::http1::Builder::new()
                .serve_connection(hyper_util::rt::TokioIo::new(stream), service);
            tokio::select! {
                result = connection => if let Err(e) = result {
                    debug!(%peer, error = %e, "kubelet API connection ended");
                },
                () = stop.cancelled() => {}
            }
        });
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn requests_parse() {
        let q = parse(
            "/containerLogs/ns/web-0/app",
            Some("follow=true&tailLines=10&previous=false"),
        )
        .expect("logs");
        assert_eq!(
            q,
            LogQuery {
                namespace: "ns".into(),
                pod: "web-0".into(),
                container: "app".into(),
                follow: true,
                previous: false,
                tail_lines: Some(10),
                limit_bytes: None,
            }
        );
        assert!(parse("/exec/ns/web-0/app", None).is_none());
        assert!(parse("/containerLogs/ns/web-0", None).is_none());
    }

    #[test]
    fn tails_and_runs() {
        assert_eq!(tail(b"a\nb\nc\n", 2), b"b\nc\n");
        assert_eq!(tail(b"a\nb\nc", 1), b"c");
        assert_eq!(tail(b"a\n", 5), b"a\n");
        let dir = tempfile::tempdir().expect("tempdir");
        let old = dir.path().join("ns_web-0_uid1/app");
        std::fs::create_dir_all(&old).expect("mkdir");
        std::fs::write(old.join("0.log"), "old pod").expect("write");
        std::thread::sleep(Duration::from_millis(20));
        let new = dir.path().join("ns_web-0_uid2/app");
        std::fs::create_dir_all(&new).expect("mkdir");
        for n in [0, 1, 10, 2] {
            std::fs::write(new.join(format!("{n}.log")), format!("run {n}")).expect("write");
        }
        let q = parse("/containerLogs/ns/web-0/app", None).expect("q");
        assert_eq!(log_file(dir.path(), &q), Some(new.join("10.log")));
        let previous = LogQuery {
            previous: true,
            ..q
        };
        assert_eq!(log_file(dir.path(), &previous), Some(new.join("2.log")));
    }
}
