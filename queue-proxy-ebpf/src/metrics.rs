//! Request metrics for port 9091 in Prometheus text format (knative-contract.md A.7):
//! `kn.serving.invocation.duration` (histogram, seconds, by response status) and
//! `kn.serving.queue.depth` (gauge), named as the OTel Prometheus exporter names them.

use std::collections::BTreeMap;
use std::fmt::Write;
use std::sync::Mutex;

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
    /// Only recorded with a breaker (containerConcurrency > 0), like Knative.
    queue_depth: Mutex<Option<i64>>,
    target_info: String,
}

/// Labels the OTel Prometheus exporter puts on every series of the queue's meter.
const SCOPE: &str = "otel_scope_name=\"knative.dev/serving/pkg/queue\",otel_scope_schema_url=\"\",otel_scope_version=\"\"";

/// The exposition content type of Knative's exporter.
pub const CONTENT_TYPE: &str = "text/plain; version=0.0.4; charset=utf-8; escaping=underscores";

fn escape(v: &str) -> String {
    v.replace('\\', "\\\\")
        .replace('"', "\\\"")
        .replace('\n', "\\n")
}

impl RequestMetrics {
    /// `resource`: the OTel resource attributes (Prometheus-escaped names), shown as
    /// `target_info`.
    pub fn new(resource: &[(&str, &str)]) -> Self {
        let mut attrs: Vec<(String, String)> = resource
            .iter()
            .map(|(k, v)| ((*k).to_owned(), escape(v)))
            .collect();
        attrs.sort();
        let target_info = attrs
            .iter()
            .map(|(k, v)| format!("{k}=\"{v}\""))
            .collect::<Vec<_>>()
            .join(",");
        Self {
            durations: Mutex::new(BTreeMap::new()),
            queue_depth: Mutex::new(None),
            target_info,
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
        *self
            .queue_depth
            .lock()
            .unwrap_or_else(std::sync::PoisonError::into_inner) =
            Some(i64::try_from(depth).unwrap_or(i64::MAX));
    }

    pub fn render(&self) -> String {
        let mut out = String::new();
        let g = self
            .durations
            .lock()
            .unwrap_or_else(std::sync::PoisonError::into_inner);
        if !g.is_empty() {
            let _ = writeln!(
                out,
                "# HELP kn_serving_invocation_duration_seconds The duration of task execution\n# TYPE kn_serving_invocation_duration_seconds histogram"
            );
        }
        for (status, h) in g.iter() {
            let l = format!("http_response_status_code=\"{status}\",{SCOPE}");
            let mut cum = 0;
            for (b, n) in BOUNDS.iter().zip(h.buckets.iter()) {
                cum += n;
                let _ = writeln!(
                    out,
                    "kn_serving_invocation_duration_seconds_bucket{{{l},le=\"{b}\"}} {cum}"
                );
            }
            let _ = writeln!(
                out,
                "kn_serving_invocation_duration_seconds_bucket{{{l},le=\"+Inf\"}} {}\nkn_serving_invocation_duration_seconds_sum{{{l}}} {}\nkn_serving_invocation_duration_seconds_count{{{l}}} {}",
                h.count, h.sum, h.count
            );
        }
        drop(g);
        if let Some(d) = *self
            .queue_depth
            .lock()
            .unwrap_or_else(std::sync::PoisonError::into_inner)
        {
            let _ = writeln!(
                out,
                "# HELP kn_serving_queue_depth Number of current requests in the queue\n# TYPE kn_serving_queue_depth gauge\nkn_serving_queue_depth{{{SCOPE}}} {d}"
            );
        }
        let _ = writeln!(
            out,
            "# HELP target_info Target metadata\n# TYPE target_info gauge\ntarget_info{{{}}} 1",
            self.target_info
        );
        out
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn renders_cumulative_buckets() {
        let m = RequestMetrics::new(&[("k8s_pod_name", "p\"1"), ("container_name", "queue-proxy")]);
        assert!(!m.render().contains("kn_serving_queue_depth"));
        m.record(200, 0.02);
        m.record(200, 20.0);
        m.set_queue_depth(3);
        let t = m.render();
        assert!(t.contains(
            "kn_serving_invocation_duration_seconds_bucket{http_response_status_code=\"200\",otel_scope_name=\"knative.dev/serving/pkg/queue\",otel_scope_schema_url=\"\",otel_scope_version=\"\",le=\"0.025\"} 1"
        ));
        assert!(t.contains("le=\"+Inf\"} 2"));
        assert!(t.contains("kn_serving_queue_depth{otel_scope_name=\"knative.dev/serving/pkg/queue\",otel_scope_schema_url=\"\",otel_scope_version=\"\"} 3"));
        assert!(
            t.contains("target_info{container_name=\"queue-proxy\",k8s_pod_name=\"p\\\"1\"} 1")
        );
    }
}
