//! Request metrics for port 9091 in Prometheus text format (knative-contract.md A.7):
//! `kn.serving.invocation.duration` (histogram, seconds, by response status) and
//! `kn.serving.queue.depth` (gauge), named as the OTel Prometheus exporter names them.

use std::collections::BTreeMap;
use std::fmt::Write;
use std::sync::Mutex;
use std::sync::atomic::{AtomicI64, Ordering};

/// Knative's `latencyBounds` (seconds).
pub const BOUNDS: [f64; 14] = [
    0.005, 0.01, 0.025, 0.05, 0.075, 0.1, 0.25, 0.5, 0.75, 1.0, 2.5, 5.0, 7.5, 10.0,
];

#[derive(Debug, Default, Clone)]
struct Histogram {
    buckets: [u64; BOUNDS.len()],
    count: u64,
    sum: f64,
}

#[derive(Debug)]
pub struct RequestMetrics {
    durations: Mutex<BTreeMap<u16, Histogram>>,
    queue_depth: AtomicI64,
    labels: String,
}

fn escape(v: &str) -> String {
    v.replace('\\', "\\\\")
        .replace('"', "\\\"")
        .replace('\n', "\\n")
}

impl RequestMetrics {
    /// `labels`: resource attributes as (name, value) pairs, attached to every series.
    pub fn new(labels: &[(&str, &str)]) -> Self {
        let labels = labels
            .iter()
            .map(|(k, v)| format!("{k}=\"{}\"", escape(v)))
            .collect::<Vec<_>>()
            .join(",");
        Self {
            durations: Mutex::new(BTreeMap::new()),
            queue_depth: AtomicI64::new(0),
            labels,
        }
    }

    pub fn record(&self, status: u16, seconds: f64) {
        let mut g = self
            .durations
            .lock()
            .unwrap_or_else(std::sync::PoisonError::into_inner);
        let h = g.entry(status).or_default();
        h.count += 1;
        h.sum += seconds;
        if let Some(i) = BOUNDS.iter().position(|b| seconds <= *b) {
            h.buckets[i] += 1;
        }
    }

    pub fn set_queue_depth(&self, depth: usize) {
        self.queue_depth
            .store(i64::try_from(depth).unwrap_or(i64::MAX), Ordering::Relaxed);
    }

    pub fn render(&self) -> String {
        let mut out = String::new();
        let l = &self.labels;
        let sep = if l.is_empty() { "" } else { "," };
        let _ = writeln!(
            out,
            "# HELP kn_serving_invocation_duration_seconds The duration of task execution\n# TYPE kn_serving_invocation_duration_seconds histogram"
        );
        let g = self
            .durations
            .lock()
            .unwrap_or_else(std::sync::PoisonError::into_inner);
        for (status, h) in g.iter() {
            let mut cum = 0;
            for (b, n) in BOUNDS.iter().zip(h.buckets.iter()) {
                cum += n;
                let _ = writeln!(
                    out,
                    "kn_serving_invocation_duration_seconds_bucket{{{l}{sep}http_response_status_code=\"{status}\",le=\"{b}\"}} {cum}"
                );
            }
            let _ = writeln!(
                out,
                "kn_serving_invocation_duration_seconds_bucket{{{l}{sep}http_response_status_code=\"{status}\",le=\"+Inf\"}} {}\nkn_serving_invocation_duration_seconds_sum{{{l}{sep}http_response_status_code=\"{status}\"}} {}\nkn_serving_invocation_duration_seconds_count{{{l}{sep}http_response_status_code=\"{status}\"}} {}",
                h.count, h.sum, h.count
            );
        }
        let _ = writeln!(
            out,
            "# HELP kn_serving_queue_depth Number of current requests in the queue\n# TYPE kn_serving_queue_depth gauge\nkn_serving_queue_depth{{{l}}} {}",
            self.queue_depth.load(Ordering::Relaxed)
        );
        out
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn renders_cumulative_buckets() {
        let m = RequestMetrics::new(&[("k8s_pod_name", "p\"1")]);
        m.record(200, 0.02);
        m.record(200, 20.0);
        m.set_queue_depth(3);
        let t = m.render();
        assert!(t.contains(
            "kn_serving_invocation_duration_seconds_bucket{k8s_pod_name=\"p\\\"1\",http_response_status_code=\"200\",le=\"0.025\"} 1"
        ));
        assert!(t.contains("le=\"+Inf\"} 2"));
        assert!(t.contains("kn_serving_queue_depth{k8s_pod_name=\"p\\\"1\"} 3"));
    }
}
