//! Prometheus metrics of the operator: reconciles, their duration, and failures by reason.

use std::time::Instant;

use prometheus_client::encoding::EncodeLabelSet;
use prometheus_client::metrics::counter::Counter;
use prometheus_client::metrics::family::Family;
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
}

impl Default for Metrics {
    fn default() -> Self {
        Metrics {
            reconciles: Counter::default(),
            failures: Family::default(),
            // 10 ms .. ~20 s: a reconcile is a handful of API calls plus ZooKeeper reads.
            duration: Histogram::new([0.01, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 20.0]),
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
    }
}
