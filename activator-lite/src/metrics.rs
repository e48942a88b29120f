//! Prometheus exposition of Knative's activator instruments, named as the OTel
//! Prometheus exporter names them (dots become underscores, counters get `_total`):
//! `kn.revision.request.concurrency`, `kn.revision.request.queued`,
//! `kn.revision.request.active`, `kn.activator.stats.conn.reachable`,
//! `kn.activator.stats.conn.errors`. Values are read at scrape time; nothing ticks.

use std::fmt::Write as _;

use crate::manifests::ClusterState;
use crate::throttler::Throttler;

/// Escapes a label value.
fn esc(v: &str) -> String {
    v.replace('\\', "\\\\")
        .replace('"', "\\\"")
        .replace('\n', "\\n")
}

/// Renders the exposition text.
pub fn render(
    st: &ClusterState,
    throttler: &Throttler,
    in_flight: &dyn Fn(&crate::manifests::RevisionKey) -> u32,
    reachable: bool,
    conn_errors: u64,
) -> String {
    let mut out = String::with_capacity(1024);
    let mut rows: Vec<(String, usize, u64, u32)> = Vec::new();
    for rt in throttler.all() {
        let key = rt.key();
        let (svc, cfg) = st
            .revisions
            .get(key)
            .map(|s| (s.service.clone(), s.configuration.clone()))
            .unwrap_or_default();
        let labels = format!(
            "k8s_namespace_name=\"{}\",kn_service_name=\"{}\",kn_configuration_name=\"{}\",kn_revision_name=\"{}\"",
            esc(&key.namespace),
            esc(&svc),
            esc(&cfg),
            esc(&key.name)
        );
        let (queued, active) = rt.counts();
        rows.push((labels, queued, active, in_flight(key)));
    }
    rows.sort();
    let family = |out: &mut String, name: &str, help: &str, kind: &str| {
        let _ = writeln!(out, "# HELP {name} {help}\n# TYPE {name} {kind}");
    };
    family(
        &mut out,
        "kn_revision_request_concurrency",
        "Concurrent requests that are routed to the Activator",
        "gauge",
    );
    for (l, _, _, c) in &rows {
        let _ = writeln!(out, "kn_revision_request_concurrency{{{l}}} {c}");
    }
    family(
        &mut out,
        "kn_revision_request_queued",
        "Requests waiting in the activator for a pod",
        "gauge",
    );
    for (l, q, _, _) in &rows {
        let _ = writeln!(out, "kn_revision_request_queued{{{l}}} {q}");
    }
    family(
        &mut out,
        "kn_revision_request_active",
        "Requests proxied to a pod by the activator",
        "gauge",
    );
    for (l, _, a, _) in &rows {
        let _ = writeln!(out, "kn_revision_request_active{{{l}}} {a}");
    }
    family(
        &mut out,
        "kn_activator_stats_conn_reachable",
        "Whether the autoscaler is reachable from the activator (1 = reachable, 0 = not reachable)",
        "gauge",
    );
    let _ = writeln!(
        out,
        "kn_activator_stats_conn_reachable {}",
        u8::from(reachable)
    );
    family(
        &mut out,
        "kn_activator_stats_conn_errors_total",
        "Errors of the activator's connection to the autoscaler",
        "counter",
    );
    let _ = writeln!(out, "kn_activator_stats_conn_errors_total {conn_errors}");
    out
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::manifests::RevisionKey;

    #[test]
    fn renders_families() {
        let t = Throttler::default();
        t.upsert(&RevisionKey::new("ns", "r\"1"), 1, 10);
        let text = render(&ClusterState::default(), &t, &|_| 3, true, 2);
        assert!(text.contains("kn_revision_request_concurrency{k8s_namespace_name=\"ns\",kn_service_name=\"\",kn_configuration_name=\"\",kn_revision_name=\"r\\\"1\"} 3"), "{text}");
        assert!(text.contains("kn_activator_stats_conn_reachable 1"));
        assert!(text.contains("kn_activator_stats_conn_errors_total 2"));
        assert!(text.contains("# TYPE kn_revision_request_queued gauge"));
    }
}
