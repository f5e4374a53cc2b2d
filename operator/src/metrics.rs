//! Prometheus metrics of the operator: reconciles, their duration, and failures by reason;
//! and the HTTP endpoints that serve them (`/metrics`, `/healthz`).

use std::sync::Arc;
use std::time::Instant;

use axum::Router;
use axum::http::{StatusCode, header};
use axum::response::IntoResponse;
use axum::routing::get;

use prometheus_client::encoding::EncodeLabelSet;
use prometheus_client::metrics::counter::Counter;
use prometheus_client::metrics::family::Family;
use prometheus_client::metrics::gauge::Gauge;
use prometheus_client::metrics::histogram::Histogram;
use prometheus_client::registry::Registry;

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct ErrorLabels {
    pub reason: String,
}

#[derive(Clone)]
pub struct Metrics {
    pub reconciles: Counter,
    pub failures: Family<ErrorLabels, Counter>,
    pub duration: Histogram,
    /// 1 while this process holds the leader Lease (or runs without leader election).
    pub leader: Gauge,
}

impl Default for Metrics {
    fn default() -> Self {
        Metrics {
            reconciles: Counter::default(),
            failures: Family::default(),
            // 10 ms .. ~20 s: a reconcile is a handful of API calls plus ZooKeeper reads.
            duration: Histogram::new([0.01, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 20.0]),
            leader: Gauge::default(),
        }
    }
}

impl Metrics {
    pub fn register(&self, registry: &mut Registry) {
        registry.register(
            "rtable_operator_reconciles",
            "Reconciles started",
            self.reconciles.clone(),
        );
        registry.register(
            "rtable_operator_reconcile_failures",
            "Reconciles that failed, by reason",
            self.failures.clone(),
        );
        registry.register(
            "rtable_operator_reconcile_duration_seconds",
            "Time a reconcile took",
            self.duration.clone(),
        );
        registry.register(
            "rtable_operator_leader",
            "1 while this replica leads (holds the Lease) and reconciles, 0 while it follows",
            self.leader.clone(),
        );
    }

    /// Counts a reconcile and times it until the guard is dropped.
    pub fn start(&self) -> ReconcileTimer {
        self.reconciles.inc();
        ReconcileTimer {
            start: Instant::now(),
            histogram: self.duration.clone(),
        }
    }

    pub fn failed(&self, reason: &str) {
        self.failures
            .get_or_create(&ErrorLabels {
                reason: reason.to_string(),
            })
            .inc();
    }
}

/// `/healthz` (the process is up; followers of the leader election are healthy too) and
/// `/metrics` in the Prometheus text format.
pub fn router(registry: Arc<Registry>) -> Router {
    Router::new()
        .route("/healthz", get(|| async { "ok\n" }))
        .route(
            "/metrics",
            get(move || {
                let registry = registry.clone();
                async move {
                    let mut text = String::new();
                    match prometheus_client::encoding::text::encode(&mut text, &registry) {
                        Ok(()) => (
                            StatusCode::OK,
                            [(
                                header::CONTENT_TYPE,
                                "application/openmetrics-text; version=1.0.0; charset=utf-8",
                            )],
                            text,
                        )
                            .into_response(),
                        Err(e) => {
                            (StatusCode::INTERNAL_SERVER_ERROR, e.to_string()).into_response()
                        }
                    }
                }
            }),
        )
}

pub struct ReconcileTimer {
    start: Instant,
    histogram: Histogram,
}

impl Drop for ReconcileTimer {
    fn drop(&mut self) {
        self.histogram.observe(self.start.elapsed().as_secs_f64());
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn metrics_render_in_text_format() {
        let m = Metrics::default();
        let mut r = Registry::default();
        m.register(&mut r);
        drop(m.start());
        m.failed("zookeeper");
        m.leader.set(1);
        let mut text = String::new();
        prometheus_client::encoding::text::encode(&mut text, &r).expect("encodes");
        assert!(
            text.contains("rtable_operator_reconciles_total 1"),
            "{text}"
        );
        assert!(
            text.contains(r#"rtable_operator_reconcile_failures_total{reason="zookeeper"} 1"#),
            "{text}"
        );
        assert!(
            text.contains("rtable_operator_reconcile_duration_seconds_count 1"),
            "{text}"
        );
        assert!(text.contains("rtable_operator_leader 1"), "{text}");
    }

    #[tokio::test]
    async fn healthz_and_metrics_are_served_over_http() {
        let m = Metrics::default();
        let mut r = Registry::default();
        m.register(&mut r);
        m.failed("kubernetes");
        let listener = tokio::net::TcpListener::bind("127.0.0.1:0")
            .await
            .expect("bind");
        let addr = listener.local_addr().expect("address");
        let server = tokio::spawn(async move { axum::serve(listener, router(Arc::new(r))).await });
        let http = reqwest::Client::new();

        let health = http
            .get(format!("http://{addr}/healthz"))
            .send()
            .await
            .expect("healthz answers");
        assert_eq!(health.status(), 200);
        assert_eq!(health.text().await.expect("body"), "ok\n");

        let metrics = http
            .get(format!("http://{addr}/metrics"))
            .send()
            .await
            .expect("metrics answers");
        assert_eq!(metrics.status(), 200);
        let content_type = metrics
            .headers()
            .get("content-type")
            .and_then(|v| v.to_str().ok())
            .unwrap_or_default()
            .to_string();
        assert!(
            content_type.starts_with("application/openmetrics-text"),
            "{content_type}"
        );
        let text = metrics.text().await.expect("body");
        assert!(
            text.contains(r#"rtable_operator_reconcile_failures_total{reason="kubernetes"} 1"#),
            "{text}"
        );
        assert!(
            text.contains("rtable_operator_reconciles_total 0"),
            "{text}"
        );

        let missing = http
            .get(format!("http://{addr}/nope"))
            .send()
            .await
            .expect("answers");
        assert_eq!(missing.status(), 404);
        server.abort();
    }
}
