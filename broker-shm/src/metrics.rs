//! Prometheus text exposition of broker-shm's counters (served on `METRICS_PORT`, 9092 like
//! Knative's broker ingress and filter).

use std::collections::BTreeMap;
use std::fmt::Write as _;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex};

/// A gauge family: name, help text, and (label set, value) samples.
pub type Gauge<'a> = (&'a str, &'a str, Vec<(String, f64)>);

/// Counters keyed by metric name and label set.
#[derive(Debug, Default)]
pub struct Metrics {
    counters: Mutex<BTreeMap<(&'static str, String), Arc<AtomicU64>>>,
}

/// One counter (a metric name with its label set) to bump on a hot path without formatting
/// its labels or taking the registry's lock each time.
#[derive(Debug, Clone)]
pub struct Counter(Arc<AtomicU64>);

impl Counter {
    pub fn inc(&self) {
        self.0.fetch_add(1, Ordering::Relaxed);
    }
}

const HELP: &[(&str, &str)] = &[
    (
        "broker_shm_ingress_requests_total",
        "Ingress requests by broker and response code.",
    ),
    (
        "broker_shm_deliveries_total",
        "Events handled per trigger by outcome (delivered, filtered, failed, dead_lettered).",
    ),
    (
        "broker_shm_replies_total",
        "Reply events by trigger and outcome (stored, ttl_exhausted, refused).",
    ),
];

fn escape(v: &str) -> String {
    v.replace('\\', "\\\\")
        .replace('"', "\\\"")
        .replace('\n', "\\n")
}

impl Metrics {
    /// Adds one to `name{labels}`; labels are (key, value) pairs.
    pub fn inc(&self, name: &'static str, labels: &[(&str, &str)]) {
        self.counter(name, labels).inc();
    }

    /// The counter `name{labels}`, registered on first use; it is rendered once it counted.
    pub fn counter(&self, name: &'static str, labels: &[(&str, &str)]) -> Counter {
        let mut l = String::new();
        for (i, (k, v)) in labels.iter().enumerate() {
            if i > 0 {
                l.push(',');
            }
            let _ = write!(l, "{k}=\"{}\"", escape(v));
        }
        let mut c = self
            .counters
            .lock()
            .unwrap_or_else(std::sync::PoisonError::into_inner);
        Counter(c.entry((name, l)).or_default().clone())
    }

    pub fn render(&self, gauges: &[Gauge<'_>]) -> String {
        let mut out = String::new();
        let c = self
            .counters
            .lock()
            .unwrap_or_else(std::sync::PoisonError::into_inner);
        for (name, help) in HELP {
            let _ = writeln!(out, "# HELP {name} {help}\n# TYPE {name} counter");
            for ((n, labels), v) in c.iter() {
                let v = v.load(Ordering::Relaxed);
                if n == name && v > 0 {
                    let _ = writeln!(out, "{name}{{{labels}}} {v}");
                }
            }
        }
        for (name, help, values) in gauges {
            let _ = writeln!(out, "# HELP {name} {help}\n# TYPE {name} gauge");
            for (labels, v) in values {
                let _ = writeln!(out, "{name}{{{labels}}} {v}");
            }
        }
        out
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn renders() {
        let m = Metrics::default();
        m.inc(
            "broker_shm_ingress_requests_total",
            &[("broker", "a/b"), ("code", "202")],
        );
        m.inc(
            "broker_shm_ingress_requests_total",
            &[("broker", "a/b"), ("code", "202")],
        );
        let text = m.render(&[("g", "a gauge", vec![("x=\"1\"".into(), 2.0)])]);
        assert!(text.contains("broker_shm_ingress_requests_total{broker=\"a/b\",code=\"202\"} 2"));
        assert!(text.contains("g{x=\"1\"} 2"));
        let c = m.counter("broker_shm_deliveries_total", &[("trigger", "t")]);
        assert!(
            !m.render(&[]).contains("trigger=\"t\""),
            "not rendered before it counts"
        );
        c.inc();
        m.inc("broker_shm_deliveries_total", &[("trigger", "t")]);
        assert!(
            m.render(&[])
                .contains("broker_shm_deliveries_total{trigger=\"t\"} 2")
        );
    }
}
