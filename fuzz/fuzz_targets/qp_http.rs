//! queue-proxy-ebpf request path: the Forwarded shim over X-Forwarded-* headers, content
//! type sniffing of the first body bytes, probe classification, and the request log
//! template rendered with fields taken from the request.
//! Format: `<log template>\0<METHOD URI>\n<headers>\n\n<body>`.
#![no_main]

#[allow(dead_code)]
#[path = "../../queue-proxy-ebpf/src/body.rs"]
mod body;
#[allow(dead_code)]
#[path = "../../queue-proxy-ebpf/src/forwarded.rs"]
mod forwarded;
#[allow(dead_code)]
#[path = "../../queue-proxy-ebpf/src/health.rs"]
mod health;
#[allow(dead_code)]
#[path = "../../queue-proxy-ebpf/src/reqlog.rs"]
mod reqlog;

use std::sync::Arc;

use libfuzzer_sys::fuzz_target;
use spright_fuzz::{qp::request, split_once, text};

fuzz_target!(|data: &[u8]| {
    let (template, rest) = split_once(data, 0);
    let (mut req, body) = request(rest);
    // Go's content sniffing, shared with activator-lite (spright-core).
    let _ = spright_core::sniff::detect(body);
    let _ = spright_core::sniff::chunked_prefix(body, &mut [0; spright_core::sniff::SNIFF_LEN]);
    let _ = health::is_kubelet_probe(req.headers());
    let _ = health::is_probe(req.headers());
    let _ = health::classify(req.headers());
    let _ = health::network_probe(req.headers());
    let _ = health::bad_probe_header(req.headers());
    forwarded::apply(req.headers_mut());
    let log = Arc::new(reqlog::RequestLog::new(
        &text(template),
        &[("Name", "hello-00001"), ("PodIP", "10.0.0.1")],
        true,
    ));
    let entry = log.begin(&req, "[::1]:1234".parse().expect("literal address"));
    drop(reqlog::RequestLog::finish(
        entry,
        http::Response::new(body::full(body.to_vec())),
    ));
});
