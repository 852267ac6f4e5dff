//! Prometheus metrics of the runtime (`/metrics`), prefixed `obsrv_connector_`.

use std::sync::atomic::AtomicU64;

use prometheus_client::{
    encoding::{EncodeLabelSet, text::encode},
    metrics::{
        counter::Counter,
        family::Family,
        gauge::Gauge,
        histogram::{Histogram, exponential_buckets},
    },
    registry::Registry,
};

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct OutcomeLabels {
    /// `ingested` or `failed`.
    pub outcome: String,
}

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct ReasonLabels {
    pub reason: String,
}

pub struct Metrics {
    registry: Registry,
    pub records: Family<OutcomeLabels, Counter>,
    pub bytes: Family<OutcomeLabels, Counter>,
    pub errors: Family<ReasonLabels, Counter>,
    pub batch_seconds: Histogram,
    pub lag_records: Gauge,
    pub lag_seconds: Gauge<f64, AtomicU64>,
    pub last_success: Gauge,
}

impl Default for Metrics {
    fn default() -> Self {
        Self::new()
    }
}

impl Metrics {
    pub fn new() -> Metrics {
        let mut registry = Registry::with_prefix("obsrv_connector");
        let m = Metrics {
            registry: Registry::default(),
            records: Family::default(),
            bytes: Family::default(),
            errors: Family::default(),
            batch_seconds: Histogram::new(exponential_buckets(0.001, 2.0, 16)),
            lag_records: Gauge::default(),
            lag_seconds: Gauge::default(),
            last_success: Gauge::default(),
        };
        registry.register(
            "records",
            "Records written, by outcome (ingested, failed)",
            m.records.clone(),
        );
        registry.register(
            "bytes",
            "Bytes written, by outcome (ingested, failed)",
            m.bytes.clone(),
        );
        registry.register("errors", "Errors by reason", m.errors.clone());
        registry.register(
            "batch_latency_seconds",
            "Time from handing a batch to the producer to its acknowledgement",
            m.batch_seconds.clone(),
        );
        registry.register(
            "lag_records",
            "Records not yet read, when the source can tell",
            m.lag_records.clone(),
        );
        registry.register(
            "lag_seconds",
            "Age of the oldest unread record, when the source can tell",
            m.lag_seconds.clone(),
        );
        registry.register(
            "last_success_timestamp_seconds",
            "When source and sink last worked: a batch acknowledged, or a clean read with nothing new (unix seconds)",
            m.last_success.clone(),
        );
        Metrics { registry, ..m }
    }

    pub fn add(&self, outcome: &str, records: u64, bytes: u64) {
        let l = OutcomeLabels {
            outcome: outcome.to_string(),
        };
        self.records.get_or_create(&l).inc_by(records);
        self.bytes.get_or_create(&l).inc_by(bytes);
    }

    pub fn error(&self, reason: &str) {
        self.errors
            .get_or_create(&ReasonLabels {
                reason: reason.to_string(),
            })
            .inc();
    }

    pub fn render(&self) -> String {
        let mut out = String::new();
        encode(&mut out, &self.registry).expect("writing to a String cannot fail");
        out
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn metrics_render_with_prefix_and_outcomes() {
        let m = Metrics::new();
        m.add("ingested", 3, 300);
        m.add("failed", 1, 10);
        m.error("SinkUnreachable");
        m.batch_seconds.observe(0.01);
        let text = m.render();
        assert!(
            text.contains("obsrv_connector_records_total{outcome=\"ingested\"} 3"),
            "{text}"
        );
        assert!(
            text.contains("obsrv_connector_bytes_total{outcome=\"failed\"} 10"),
            "{text}"
        );
        assert!(
            text.contains("obsrv_connector_errors_total{reason=\"SinkUnreachable\"} 1"),
            "{text}"
        );
        assert!(
            text.contains("obsrv_connector_batch_latency_seconds_count 1"),
            "{text}"
        );
        assert!(text.contains("obsrv_connector_lag_records"), "{text}");
    }
}
