//! The replica's HTTP listeners: the client one (`--listen`) and, when
//! `--interserver-listen` is set, the interserver one (ClickHouse's `http_port` and
//! `interserver_http_port`), so peer authentication, mutual TLS and network policy apply
//! to peers without touching clients. With `--tls-dir` both serve HTTPS only (see `tls`).
//! Both stop together on the shutdown signal.

use std::future::Future;
use std::net::SocketAddr;
use std::sync::Arc;

use axum::Router;
use tokio::net::TcpListener;
use tokio_util::sync::CancellationToken;
use tracing::{info, warn};

use crate::api::{self, AppState};
use crate::auth::Gate;
use crate::config::Config;
use crate::tls::listener::TlsListener;
use crate::tls::{Side, Tls};

#[derive(Debug, thiserror::Error)]
pub enum ServeError {
    #[error("cannot listen on {flag} {address}: {source} (is the port in use?)")]
    Bind {
        flag: &'static str,
        address: SocketAddr,
        source: std::io::Error,
    },
    #[error("the {which} HTTP server failed: {source}")]
    Serve {
        which: &'static str,
        source: std::io::Error,
    },
}

/// The listeners, bound before the replica starts so a port in use fails the start.
pub struct Bound {
    client: TcpListener,
    interserver: Option<TcpListener>,
}

pub async fn bind(cfg: &Config) -> Result<Bound, ServeError> {
    let open = |flag: &'static str, address: SocketAddr| async move {
        TcpListener::bind(address)
            .await
            .map_err(|source| ServeError::Bind {
                flag,
                address,
                source,
            })
    };
    let client = open("--listen", cfg.listen).await?;
    let interserver = match cfg.interserver_listen {
        Some(address) => Some(open("--interserver-listen", address).await?),
        None => None,
    };
    Ok(Bound {
        client,
        interserver,
    })
}

/// Serves until `shutdown` resolves, then lets in-flight requests finish. With `tls`
/// both listeners speak only HTTPS.
pub async fn run(
    bound: Bound,
    state: AppState,
    gate: &Gate,
    tls: Option<Arc<Tls>>,
    shutdown: impl Future<Output = ()> + Send + 'static,
) -> Result<(), ServeError> {
    let stop = CancellationToken::new();
    let trigger = stop.clone();
    tokio::spawn(async move {
        shutdown.await;
        trigger.cancel();
    });
    match bound.interserver {
        None => {
            let app = api::router(state, gate);
            serve(
                "client and interserver",
                Side::Interserver,
                bound.client,
                tls,
                app,
                stop,
            )
            .await
        }
        Some(interserver) => {
            info!(
                interserver = ?interserver.local_addr().ok(),
                "interserver endpoints on their own listener"
            );
            let clients = serve(
                "client",
                Side::Client,
                bound.client,
                tls.clone(),
                api::client_router(state.clone(), gate),
                stop.clone(),
            );
            let peers = serve(
                "interserver",
                Side::Interserver,
                interserver,
                tls,
                api::interserver_router(state),
                stop,
            );
            tokio::try_join!(clients, peers).map(|_| ())
        }
    }
}

async fn serve(
    which: &'static str,
    side: Side,
    listener: TcpListener,
    tls: Option<Arc<Tls>>,
    app: Router,
    stop: CancellationToken,
) -> Result<(), ServeError> {
    let failed = |source| ServeError::Serve { which, source };
    if let Some(tls) = tls {
        let listener = TlsListener::new(listener, tls, side).map_err(failed)?;
        return axum::serve(listener, app)
            .with_graceful_shutdown(stop.cancelled_owned())
            .await
            .map_err(failed);
    }
    // Small answers (part headers, insert acks) must not wait for a delayed ACK (Nagle).
    let listener = axum::serve::ListenerExt::tap_io(listener, |tcp| {
        if let Err(e) = tcp.set_nodelay(true) {
            warn!(error = %e, "cannot set TCP_NODELAY on a connection");
        }
    });
    axum::serve(listener, app)
        .with_graceful_shutdown(stop.cancelled_owned())
        .await
        .map_err(failed)
}
