//! queue-proxy-ebpf configuration, as Knative's revision reconciler sets it: a valid
//! environment with fuzzed overrides and removals (OBSERVABILITY_CONFIG JSON, ports,
//! timeouts, booleans, TLS settings, the v1.18 variables), then what main builds from it:
//! the readiness probe specs (SERVING_READINESS_PROBE JSON) and the request log template.
//! Format: `KEY=VALUE` lines; `KEY` alone removes the variable.
#![no_main]

// queue-proxy-ebpf is a binary crate: its parser modules are compiled in here as they are.
#[allow(dead_code)]
#[path = "../../queue-proxy-ebpf/src/body.rs"]
mod body;
#[allow(dead_code)]
#[path = "../../queue-proxy-ebpf/src/env.rs"]
mod env;
#[allow(dead_code)]
#[path = "../../queue-proxy-ebpf/src/health.rs"]
mod health;
#[allow(dead_code)]
#[path = "../../queue-proxy-ebpf/src/readiness.rs"]
mod readiness;
#[allow(dead_code)]
#[path = "../../queue-proxy-ebpf/src/reqlog.rs"]
mod reqlog;

use std::collections::HashMap;
use std::sync::Arc;

use libfuzzer_sys::fuzz_target;
use spright_fuzz::split_once;

const BASE: [(&str, &str); 12] = [
    (env::CONTAINER_CONCURRENCY, "0"),
    (env::QUEUE_SERVING_PORT, "8012"),
    (env::QUEUE_SERVING_TLS_PORT, "8112"),
    (env::USER_PORT, "8080"),
    (env::REVISION_TIMEOUT_SECONDS, "300"),
    (env::SERVING_LOGGING_CONFIG, ""),
    (env::SERVING_LOGGING_LEVEL, ""),
    (env::SERVING_NAMESPACE, "default"),
    (env::SERVING_CONFIGURATION, ""),
    (env::SERVING_REVISION, "hello-00001"),
    (env::SERVING_POD, "hello-00001-deployment-abc"),
    (env::SERVING_POD_IP, "10.0.0.1"),
];

fuzz_target!(|data: &[u8]| {
    let mut vars: HashMap<String, String> = BASE
        .iter()
        .map(|(k, v)| ((*k).to_owned(), (*v).to_owned()))
        .collect();
    for line in data.split(|b| *b == b'\n').filter(|l| !l.is_empty()) {
        let (k, v) = split_once(line, b'=');
        let k = String::from_utf8_lossy(k).into_owned();
        if line.contains(&b'=') {
            vars.insert(k, String::from_utf8_lossy(v).into_owned());
        } else {
            vars.remove(&k);
        }
    }
    let Ok(cfg) = env::Config::from_lookup(|k| vars.get(k).cloned()) else {
        return;
    };
    let _ = cfg.breaker_params();
    let _ = cfg.service_name();
    if let Some(json) = &cfg.readiness_probe
        && let Ok(specs) = readiness::decode(json, cfg.enable_multi_container_probes)
    {
        let _ = readiness::Prober::new(specs, cfg.enable_http2_auto_detection);
    }
    let log = Arc::new(reqlog::RequestLog::new(
        &cfg.observability.request_log_template,
        &[
            ("Name", &cfg.revision),
            ("Namespace", &cfg.namespace),
            ("PodIP", &cfg.pod_ip),
        ],
        cfg.observability.enable_probe_request_log,
    ));
    let req = http::Request::new(());
    let entry = log.begin(&req, "127.0.0.1:1234".parse().expect("literal address"));
    // The line is rendered (to stdout) when the response body is dropped.
    drop(reqlog::RequestLog::finish(
        entry,
        http::Response::new(body::full("ok")),
    ));
});
