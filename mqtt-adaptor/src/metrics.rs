//! Prometheus metrics (text exposition format on GET /metrics).

use std::sync::atomic::{AtomicBool, Ordering};

use prometheus_client::encoding::text::encode;
use prometheus_client::metrics::counter::Counter;
use prometheus_client::metrics::gauge::Gauge;
use prometheus_client::metrics::histogram::{Histogram, exponential_buckets};
use prometheus_client::registry::Registry;

/// All counters of the adaptor plus the readiness flags.
#[derive(Debug)]
pub struct Metrics {
    registry: Registry,
    /// MQTT messages received from the broker.
    pub received: Counter,
    /// Events the sink accepted (2xx).
    pub delivered: Counter,
    /// Retried sink attempts.
    pub retried: Counter,
    /// Events given up on (non-retryable answer or retries exhausted) and not dead-lettered.
    pub failed: Counter,
    /// Events sent to the dead-letter sink.
    pub dead_lettered: Counter,
    /// Invalid CloudEvents and oversize messages seen.
    pub invalid: Counter,
    /// Events currently in flight to the sink.
    pub inflight: Gauge,
    /// Sink request latency (successful and failed attempts).
    pub sink_latency: Histogram,
    /// CloudEvents published to MQTT (sink direction), acknowledged by the broker.
    pub published: Counter,
    /// CloudEvents refused by the HTTP receiver or not acknowledged by the broker in time.
    pub publish_failed: Counter,
    /// 1 while the source connection is up.
    pub connected: Gauge,
    /// 1 while requests to the sink are pipelined (`--sink-pipeline` N > 1, or auto while
    /// the sink is fast).
    pub sink_pipelined: Gauge,
    /// Times `--sink-pipeline auto` turned pipelining on or off.
    pub sink_pipeline_switches: Counter,
    source_ready: AtomicBool,
    publisher_ready: AtomicBool,
}

impl Metrics {
    pub fn new() -> Self {
        let mut registry = Registry::with_prefix("mqtt_adaptor");
        let received = Counter::default();
        let delivered = Counter::default();
        let retried = Counter::default();
        let failed = Counter::default();
        let dead_lettered = Counter::default();
        let invalid = Counter::default();
        let inflight = Gauge::default();
        let sink_latency = Histogram::new(exponential_buckets(0.000_25, 2.0, 16));
        let published = Counter::default();
        let publish_failed = Counter::default();
        let connected = Gauge::default();
        let sink_pipelined = Gauge::default();
        let sink_pipeline_switches = Counter::default();
        registry.register(
            "messages_received",
            "MQTT messages received",
            received.clone(),
        );
        registry.register(
            "events_delivered",
            "Events accepted by the sink",
            delivered.clone(),
        );
        registry.register(
            "events_retried",
            "Sink delivery attempts retried",
            retried.clone(),
        );
        registry.register(
            "events_failed",
            "Events given up on without a dead-letter sink",
            failed.clone(),
        );
        registry.register(
            "events_dead_lettered",
            "Events sent to the dead-letter sink",
            dead_lettered.clone(),
        );
        registry.register(
            "messages_invalid",
            "Invalid CloudEvent or oversize MQTT messages",
            invalid.clone(),
        );
        registry.register(
            "events_inflight",
            "Events in flight to the sink",
            inflight.clone(),
        );
        registry.register(
            "sink_latency_seconds",
            "Latency of sink requests",
            sink_latency.clone(),
        );
        registry.register(
            "events_published",
            "CloudEvents published to MQTT and acknowledged by the broker",
            published.clone(),
        );
        registry.register(
            "events_publish_failed",
            "CloudEvents received over HTTP that were not published",
            publish_failed.clone(),
        );
        registry.register(
            "mqtt_connected",
            "1 while the MQTT source connection is up",
            connected.clone(),
        );
        registry.register(
            "sink_pipelined",
            "1 while HTTP/1.1 requests to the sink are pipelined",
            sink_pipelined.clone(),
        );
        registry.register(
            "sink_pipeline_switches",
            "Times the adaptive sink pipelining turned on or off",
            sink_pipeline_switches.clone(),
        );
        Metrics {
            registry,
            sink_pipelined,
            sink_pipeline_switches,
            received,
            delivered,
            retried,
            failed,
            dead_lettered,
            invalid,
            inflight,
            sink_latency,
            published,
            publish_failed,
            connected,
            source_ready: AtomicBool::new(false),
            publisher_ready: AtomicBool::new(false),
        }
    }

    pub fn encode(&self) -> String {
        let mut out = String::with_capacity(4096);
        // Writing into a String cannot fail.
        let _ = encode(&mut out, &self.registry);
        out
    }

    pub fn set_source_ready(&self, v: bool) {
        self.source_ready.store(v, Ordering::Relaxed);
        self.connected.set(i64::from(v));
    }

    pub fn set_publisher_ready(&self, v: bool) {
        self.publisher_ready.store(v, Ordering::Relaxed);
    }

    pub fn source_ready(&self) -> bool {
        self.source_ready.load(Ordering::Relaxed)
    }

    pub fn publisher_ready(&self) -> bool {
        self.publisher_ready.load(Ordering::Relaxed)
    }
}

impl Default for Metrics {
    fn default() -> Self {
        Self::new()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn exposition_has_names() {
        let m = Metrics::new();
        m.received.inc();
        m.sink_latency.observe(0.001);
        let text = m.encode();
        assert!(text.contains("mqtt_adaptor_messages_received_total 1"));
        assert!(text.contains("mqtt_adaptor_sink_latency_seconds_bucket"));
        assert!(text.contains("mqtt_adaptor_events_inflight 0"));
        assert!(text.contains("mqtt_adaptor_sink_pipelined 0"));
        assert!(text.contains("mqtt_adaptor_sink_pipeline_switches_total 0"));
    }
}
