//! Differential tests: every case runs with the same body against activator-lite and against
//! Knative's own activator handler chain (knative-activator-oracle, built from
//! oracle/knative-activator by scripts/setup.sh), both fed the same manifest directory, test
//! pods and autoscaler stand-in. A case that only Knative passes is run for Knative alone,
//! with a comment naming activator-lite's difference.

mod common;

use std::sync::atomic::Ordering;
use std::time::Duration;

use common::*;
use hyper::StatusCode;

const REV: &str = "hello-00001";

macro_rules! differential {
    ($case:ident: $lite:ident, $knative:ident) => {
        #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
        async fn $lite() {
            $case(Impl::Lite).await;
        }

        #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
        async fn $knative() {
            $case(Impl::Knative).await;
        }
    };
}

/// A manifest directory with `rev` (containerConcurrency `cc`) and its private Endpoints
/// listing `ready`, an autoscaler stand-in, and `imp` serving them once healthy.
async fn setup(
    imp: Impl,
    cc: u32,
    ready: &[std::net::SocketAddr],
) -> (Manifests, FakeAutoscaler, Subject) {
    let m = Manifests::new();
    m.revision(REV, cc, "");
    m.endpoints(REV, ready, &[]);
    let asc = FakeAutoscaler::start(0).await;
    let s = Subject::ready(imp, &m.dir, asc.port).await;
    (m, asc, s)
}

/// Contract B.2 (12): the request reaches the pod with `K-Proxy-Request: activator`, the
/// Host moved to `K-Original-Host`, the two Knative-Serving-* headers stripped, path and
/// query kept.
async fn proxies_with_contract_headers(imp: Impl) {
    let pod = Pod::start("pod-a", true).await;
    let (_m, _asc, s) = setup(imp, 0, &[pod.addr]).await;
    let r = s.get(REV, "/some/path?x=1", &[("x-custom", "kept")]).await;
    assert_eq!(
        (r.status, r.body.as_str()),
        (StatusCode::OK, "pod-a"),
        "{}",
        s.logs()
    );
    let seen = pod.served();
    assert_eq!(seen.len(), 1, "{seen:?}");
    let h = &seen[0].headers;
    assert_eq!(seen[0].path, "/some/path");
    assert_eq!(h.get("k-proxy-request").unwrap(), "activator");
    assert_eq!(
        h.get("k-original-host").unwrap(),
        &format!("{REV}.{NS}.example.com")
    );
    assert!(h.get("knative-serving-namespace").is_none(), "{h:?}");
    assert!(h.get("knative-serving-revision").is_none(), "{h:?}");
    assert_eq!(h.get("host").unwrap(), &pod.addr.to_string());
    assert_eq!(h.get("x-custom").unwrap(), "kept");
}
differential!(proxies_with_contract_headers: proxies_with_contract_headers_lite, proxies_with_contract_headers_knative);

/// Contract B.2 (1-3): kubelet health, the network probe (hash echoed in the header) and the
/// activator probe the KPA scaler sends.
async fn probes_and_health(imp: Impl) {
    let (_m, _asc, s) = setup(imp, 0, &[]).await;
    assert_eq!(s.health().await, Some(StatusCode::OK));

    let r = get(s.port(), "nope", "/", &[("k-network-probe", "activator")]).await;
    assert_eq!((r.status, r.body.as_str()), (StatusCode::OK, "activator"));
    let r = get(
        s.port(),
        "nope",
        "/",
        &[
            ("k-network-probe", "activator"),
            ("user-agent", "Knative-Autoscaling-Probe"),
        ],
    )
    .await;
    assert_eq!((r.status, r.body.as_str()), (StatusCode::OK, "activator"));

    let r = get(s.port(), "nope", "/", &[("k-network-probe", "queue")]).await;
    assert_eq!(r.status, StatusCode::BAD_REQUEST);

    let r = get(
        s.port(),
        "nope",
        "/",
        &[("k-network-probe", "probe"), ("k-network-hash", "h-123")],
    )
    .await;
    assert_eq!(r.status, StatusCode::OK);
    assert_eq!(r.headers.get("k-network-hash").unwrap(), "h-123");
    let r = get(s.port(), "nope", "/", &[("k-network-probe", "probe")]).await;
    assert_eq!(r.status, StatusCode::BAD_REQUEST);
}
differential!(probes_and_health: probes_and_health_lite, probes_and_health_knative);

/// Scale from zero: with no endpoints the request is held; it completes once an endpoint
/// appears and its pod answers the queue-proxy probe.
async fn held_until_an_endpoint_appears(imp: Impl) {
    let (m, _asc, s) = setup(imp, 0, &[]).await;
    let port = s.port();
    let held = tokio::spawn(async move { get(port, REV, "/held", &[]).await });
    tokio::time::sleep(Duration::from_millis(500)).await;
    assert!(!held.is_finished(), "the request must be held");

    let pod = Pod::start("pod-a", true).await;
    m.endpoints(REV, &[pod.addr], &[]);
    let r = tokio::time::timeout(Duration::from_secs(10), held)
        .await
        .unwrap_or_else(|_| panic!("the held request never completed:\n{}", s.logs()))
        .expect("join");
    assert_eq!((r.status, r.body.as_str()), (StatusCode::OK, "pod-a"));
    assert_eq!(pod.served()[0].path, "/held");
    assert!(pod.state.probes.load(Ordering::SeqCst) >= 1);
}
differential!(held_until_an_endpoint_appears: held_until_an_endpoint_appears_lite, held_until_an_endpoint_appears_knative);

/// Contract B.2 (5): a revision the informer does not know is 404, whether named by the
/// Knative-Serving-* headers or by a `<name>.<ns>.svc.<cluster-domain>` Host; a Host that
/// names no revision is 404 too.
async fn unknown_revision_is_404(imp: Impl) {
    let pod = Pod::start("pod-a", true).await;
    let (_m, _asc, s) = setup(imp, 0, &[pod.addr]).await;
    let r = s.get("nope", "/", &[]).await;
    assert_eq!(r.status, StatusCode::NOT_FOUND, "{}", r.body);

    let r = by_host(&s, "nope.default.svc.cluster.local").await;
    assert_eq!(r.status, StatusCode::NOT_FOUND, "{}", r.body);
    let r = by_host(&s, "example.com").await;
    assert_eq!(r.status, StatusCode::NOT_FOUND, "{}", r.body);
    // The known revision by Host alone is proxied.
    let r = by_host(&s, "hello-00001.default.svc.cluster.local").await;
    assert_eq!((r.status, r.body.as_str()), (StatusCode::OK, "pod-a"));
    assert!(pod.served().len() == 1);
}
differential!(unknown_revision_is_404: unknown_revision_is_404_lite, unknown_revision_is_404_knative);

/// Contract B.4: containerConcurrency 1 lets one request at a time reach the pod; the others
/// wait in the activator and all complete.
async fn container_concurrency_1_serializes(imp: Impl) {
    let pod = Pod::start("pod-a", true).await;
    let (_m, _asc, s) = setup(imp, 1, &[pod.addr]).await;
    let port = s.port();
    let replies = futures::future::join_all(
        (0..5).map(|i| async move { get(port, REV, &format!("/sleep/100?i={i}"), &[]).await }),
    )
    .await;
    for r in &replies {
        assert_eq!((r.status, r.body.as_str()), (StatusCode::OK, "pod-a"));
    }
    assert_eq!(pod.served().len(), 5);
    assert_eq!(pod.state.max_in_flight.load(Ordering::SeqCst), 1);
}
differential!(container_concurrency_1_serializes: container_concurrency_1_serializes_lite, container_concurrency_1_serializes_knative);

/// Go's reverse proxy (Knative's `pkg/http/proxy.go` NewHeaderPruningReverseProxy wraps
/// `net/http/httputil.ReverseProxy`): hop-by-hop headers and those the Connection header
/// names are dropped, the client address is appended to X-Forwarded-For, other end-to-end
/// headers (traceparent) pass.
async fn hop_by_hop_dropped_and_forwarded_for_appended(imp: Impl) {
    let pod = Pod::start("pod-a", true).await;
    let (_m, _asc, s) = setup(imp, 0, &[pod.addr]).await;
    let trace = "00-0af7651916cd43dd8448eb211c80319c-b7ad6b7169203331-01";
    let r = s
        .get(
            REV,
            "/",
            &[
                ("connection", "x-hop"),
                ("x-hop", "1"),
                ("proxy-authorization", "Basic eDp5"),
                ("x-forwarded-for", "10.0.0.1"),
                ("traceparent", trace),
            ],
        )
        .await;
    assert_eq!((r.status, r.body.as_str()), (StatusCode::OK, "pod-a"));
    let h = &pod.served()[0].headers;
    assert!(h.get("x-hop").is_none(), "{h:?}");
    assert!(h.get("proxy-authorization").is_none(), "{h:?}");
    assert_eq!(h.get("x-forwarded-for").unwrap(), "10.0.0.1, 127.0.0.1");
    assert_eq!(h.get("traceparent").unwrap(), trace);
}
differential!(hop_by_hop_dropped_and_forwarded_for_appended: hop_by_hop_dropped_and_forwarded_for_appended_lite, hop_by_hop_dropped_and_forwarded_for_appended_knative);

/// Contract B.2 (2): outside a network probe, `K-Network-Hash` is stripped before the request
/// goes on (knative/networking `pkg/http/probe/handler.go`: `r.Header.Del(header.HashKey)`
/// when `K-Network-Probe` is not `probe`).
async fn network_hash_stripped_from_proxied_requests(imp: Impl) {
    let pod = Pod::start("pod-a", true).await;
    let (_m, _asc, s) = setup(imp, 0, &[pod.addr]).await;
    let r = s.get(REV, "/", &[("k-network-hash", "h-123")]).await;
    assert_eq!((r.status, r.body.as_str()), (StatusCode::OK, "pod-a"));
    let h = &pod.served()[0].headers;
    assert!(h.get("k-network-hash").is_none(), "{h:?}");
}

differential!(network_hash_stripped_from_proxied_requests: network_hash_stripped_from_proxied_requests_lite, network_hash_stripped_from_proxied_requests_knative);

/// `TE: trailers` from the client reaches the pod (Go's `httputil.ReverseProxy`: "Issue 21096:
/// tell backend applications that care about trailer support that we support trailers",
/// net/http/httputil/reverseproxy.go); gRPC servers require it.
async fn te_trailers_reaches_the_pod(imp: Impl) {
    let pod = Pod::start("pod-a", true).await;
    let (_m, _asc, s) = setup(imp, 0, &[pod.addr]).await;
    let r = s.get(REV, "/", &[("te", "trailers")]).await;
    assert_eq!((r.status, r.body.as_str()), (StatusCode::OK, "pod-a"));
    let h = &pod.served()[0].headers;
    assert_eq!(h.get("te").map(|v| v.as_bytes()), Some(&b"trailers"[..]));
}

differential!(te_trailers_reaches_the_pod: te_trailers_reaches_the_pod_lite, te_trailers_reaches_the_pod_knative);

/// Contract B.2 (11, 12): the revision's timeoutSeconds gives 504 "activator request
/// timeout"; a pod that refuses the connection gives 502.
async fn timeout_504_and_unreachable_pod_502(imp: Impl) {
    let pod = Pod::start("pod-a", true).await;
    let m = Manifests::new();
    m.revision(REV, 0, "  timeoutSeconds: 1\n");
    m.endpoints(REV, &[pod.addr], &[]);
    let asc = FakeAutoscaler::start(0).await;
    let s = Subject::ready(imp, &m.dir, asc.port).await;
    let r = s.get(REV, "/sleep/2500", &[]).await;
    assert_eq!(
        (r.status, r.body.as_str()),
        (StatusCode::GATEWAY_TIMEOUT, "activator request timeout")
    );
    // The pod goes away after it passed its probe: the proxy's dial fails.
    drop(pod);
    tokio::time::sleep(Duration::from_millis(100)).await;
    let r = s.get(REV, "/", &[]).await;
    assert_eq!(r.status, StatusCode::BAD_GATEWAY, "{}", r.body);
}
differential!(timeout_504_and_unreachable_pod_502: timeout_504_and_unreachable_pod_502_lite, timeout_504_and_unreachable_pod_502_knative);

/// Contract B.5: the first request for a revision pokes the autoscaler at once with
/// concurrency 1 and count 1 from the activator's POD_NAME; kubelet health fails (500) once
/// the autoscaler connection is gone.
async fn poke_then_health_follows_the_autoscaler_link(imp: Impl) {
    let pod = Pod::start("pod-a", true).await;
    let (_m, mut asc, s) = setup(imp, 0, &[pod.addr]).await;
    let r = s.get(REV, "/", &[]).await;
    assert_eq!(r.status, StatusCode::OK);
    let poke = asc.next(Duration::from_secs(5)).await.expect("no poke");
    let msg = &poke.messages[0];
    assert_eq!((msg.namespace.as_str(), msg.name.as_str()), (NS, REV));
    let stat = msg.stat.clone().expect("stat");
    assert_eq!(stat.pod_name, POD_NAME);
    assert_eq!(
        (stat.average_concurrent_requests, stat.request_count),
        (1.0, 1.0)
    );
    assert_eq!(
        (
            stat.average_proxied_concurrent_requests,
            stat.proxied_request_count
        ),
        (0.0, 0.0)
    );
    drop(asc);
    let deadline = std::time::Instant::now() + Duration::from_secs(15);
    while s.health().await != Some(StatusCode::INTERNAL_SERVER_ERROR) {
        assert!(
            std::time::Instant::now() < deadline,
            "health never failed:\n{}",
            s.logs()
        );
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
}
differential!(poke_then_health_follows_the_autoscaler_link: poke_then_health_follows_the_autoscaler_link_lite, poke_then_health_follows_the_autoscaler_link_knative);

/// The bodies of the activator's own error answers are Go's `http.Error`: the message and a
/// newline, `X-Content-Type-Options: nosniff`. The 404 names the revision as the informer's
/// lister does (`pkg/activator/handler/context_handler.go` sendError: "Error getting active
/// endpoint: " + the NotFound error); the probe 400s are `probe_handler.go`'s and
/// knative/networking `pkg/http/probe/handler.go`'s texts.
async fn error_bodies_as_go_http_error(imp: Impl) {
    let (_m, _asc, s) = setup(imp, 0, &[]).await;
    let r = s.get("nope", "/", &[]).await;
    assert_eq!(r.status, StatusCode::NOT_FOUND);
    assert_eq!(
        r.body,
        "Error getting active endpoint: revision.serving.knative.dev \"nope\" not found\n"
    );
    assert_eq!(r.headers.get("x-content-type-options").unwrap(), "nosniff");
    let r = get(s.port(), "nope", "/", &[("k-network-probe", "queue")]).await;
    assert_eq!(
        (r.status, r.body.as_str()),
        (
            StatusCode::BAD_REQUEST,
            "unexpected probe header value: \"queue\"\n"
        )
    );
    let r = get(s.port(), "nope", "/", &[("k-network-probe", "probe")]).await;
    assert_eq!(
        (r.status, r.body.as_str()),
        (
            StatusCode::BAD_REQUEST,
            "a probe request must contain a non-empty \"K-Network-Hash\" header\n"
        )
    );
}

differential!(error_bodies_as_go_http_error: error_bodies_as_go_http_error_lite, error_bodies_as_go_http_error_knative);

/// Sequential requests to `rev` until `want` answers (both pods' probes may still be in
/// flight when the activator turns healthy); then the next `n` replies.
async fn after_first(s: &Subject, rev: &str, want: &str, n: usize) -> Vec<String> {
    let deadline = std::time::Instant::now() + Duration::from_secs(10);
    while s.get(rev, "/", &[]).await.body != want {
        assert!(std::time::Instant::now() < deadline, "{want} never served");
    }
    let mut out = Vec::new();
    for _ in 0..n {
        out.push(s.get(rev, "/", &[]).await.body);
    }
    out
}

/// Contract B.4: containerConcurrency 1-3 picks the first pod with capacity in address order
/// (pod trackers sorted by `IP:port` string), above 3 round robin over them.
async fn lb_policy_first_available_then_round_robin(imp: Impl) {
    let a = Pod::start("pod-a", true).await;
    let b = Pod::start("pod-b", true).await;
    let first = if a.addr.to_string() < b.addr.to_string() {
        "pod-a"
    } else {
        "pod-b"
    };
    let m = Manifests::new();
    m.revision("cc2", 2, "");
    m.revision("cc5", 5, "");
    m.endpoints("cc2", &[a.addr, b.addr], &[]);
    m.endpoints("cc5", &[a.addr, b.addr], &[]);
    let asc = FakeAutoscaler::start(0).await;
    let s = Subject::ready(imp, &m.dir, asc.port).await;
    assert_eq!(after_first(&s, "cc2", first, 4).await, [first; 4]);
    // Round robin: once both pods have served (both trackers exist), they alternate.
    let deadline = std::time::Instant::now() + Duration::from_secs(10);
    let mut seen = std::collections::HashSet::new();
    while seen.len() < 2 {
        assert!(std::time::Instant::now() < deadline, "one pod never served");
        seen.insert(s.get("cc5", "/", &[]).await.body);
    }
    let mut seq = Vec::new();
    for _ in 0..4 {
        seq.push(s.get("cc5", "/", &[]).await.body);
    }
    assert!(seq.windows(2).all(|w| w[0] != w[1]), "{seq:?}");
}
differential!(lb_policy_first_available_then_round_robin: lb_policy_first_available_then_round_robin_lite, lb_policy_first_available_then_round_robin_knative);

/// Contract B.3: the queue-proxy probe decides, not Kubernetes readiness: a not-ready address
/// that answers the probe gets traffic ("probe optimisation"); a ready address whose probe
/// fails gets none (mesh-compatibility-mode auto), the request waits until the probe passes.
async fn probe_decides_over_readiness(imp: Impl) {
    let nr = Pod::start("pod-nr", true).await;
    let sick = Pod::start("pod-sick", false).await;
    let m = Manifests::new();
    m.revision("nr", 0, "");
    m.endpoints("nr", &[], &[nr.addr]);
    m.revision("sick", 0, "");
    m.endpoints("sick", &[sick.addr], &[]);
    let asc = FakeAutoscaler::start(0).await;
    let s = Subject::ready(imp, &m.dir, asc.port).await;
    let r = s.get("nr", "/", &[]).await;
    assert_eq!((r.status, r.body.as_str()), (StatusCode::OK, "pod-nr"));

    let port = s.port();
    let held = tokio::spawn(async move { get(port, "sick", "/", &[]).await });
    tokio::time::sleep(Duration::from_millis(500)).await;
    assert!(
        !held.is_finished(),
        "a pod failing its probe must get no traffic"
    );
    assert!(sick.served().is_empty());
    sick.state.healthy.store(true, Ordering::SeqCst);
    let r = tokio::time::timeout(Duration::from_secs(10), held)
        .await
        .expect("held request completes once the probe passes")
        .expect("join");
    assert_eq!((r.status, r.body.as_str()), (StatusCode::OK, "pod-sick"));
}
differential!(probe_decides_over_readiness: probe_decides_over_readiness_lite, probe_decides_over_readiness_knative);

/// A Revision deleted from the cluster (its manifest removed) is unknown again: 404.
async fn deleted_revision_is_404(imp: Impl) {
    let pod = Pod::start("pod-a", true).await;
    let (m, _asc, s) = setup(imp, 0, &[pod.addr]).await;
    assert_eq!(s.get(REV, "/", &[]).await.status, StatusCode::OK);
    m.remove(&format!("rev-{REV}.yaml"));
    let deadline = std::time::Instant::now() + Duration::from_secs(10);
    while s.get(REV, "/", &[]).await.status != StatusCode::NOT_FOUND {
        assert!(
            std::time::Instant::now() < deadline,
            "still served after the Revision was deleted:\n{}",
            s.logs()
        );
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
}
differential!(deleted_revision_is_404: deleted_revision_is_404_lite, deleted_revision_is_404_knative);

/// A raw HTTP/1.1 answer: `head` (status line and headers, without the blank line), then
/// `body` in the same write.
fn answer(head: &str, body: &[u8]) -> Vec<Step> {
    let mut b = format!("{head}\r\n\r\n").into_bytes();
    b.extend_from_slice(body);
    vec![Step::Write(b)]
}

/// A pod answer without Content-Type reaches the client with the one Go's server sniffs from
/// the body: Knative's activator is a `httputil.ReverseProxy` inside a Go `http.Server`,
/// which calls `DetectContentType` on the first body bytes when the handler set no
/// Content-Type (net/http `server.go` `chunkWriter.writeHeader`). Not when the status has
/// no body (204), the body is empty, the pod set a Content-Type (even an empty one) or a
/// Content-Encoding. A body of known length arriving in two pieces is sniffed whole: Go
/// holds the head until its buffer fills or the body ends. Each case goes through the
/// HTTP/1.1 fast path and, as HTTP/1.0, through activator-lite's hyper path.
async fn missing_content_type_is_sniffed(imp: Impl) {
    let pod = Pod::start("pod-a", true).await;
    let (_m, _asc, s) = setup(imp, 0, &[pod.addr]).await;
    let r = s.get(REV, "/", &[]).await;
    assert_eq!((r.status, r.body.as_str()), (StatusCode::OK, "pod-a"));
    assert_eq!(
        r.headers.get("content-type").unwrap(),
        "text/plain; charset=utf-8"
    );
    drop(s);

    let html = HTML_PAGE.as_bytes();
    let html_head = format!("HTTP/1.1 200 OK\r\nContent-Length: {}", html.len());
    let png = b"\x89PNG\r\n\x1a\n\x00\x00\x00\rIHDR";
    let mut split = answer("HTTP/1.1 200 OK\r\nContent-Length: 20", b"hello world ");
    split.push(Step::Pause(Duration::from_millis(200)));
    split.push(Step::Write(b"\x00\x01\x02\x03\x04\x05\x06\x07".to_vec()));
    let raw = RawPod::start(vec![
        ("/html", answer(&html_head, html)),
        (
            "/png",
            answer(
                &format!("HTTP/1.1 200 OK\r\nContent-Length: {}", png.len()),
                png,
            ),
        ),
        (
            "/binary",
            answer("HTTP/1.1 200 OK\r\nContent-Length: 6", b"\x00\x01\x02abc"),
        ),
        (
            "/not-found",
            answer("HTTP/1.1 404 Not Found\r\nContent-Length: 4", b"gone"),
        ),
        (
            "/empty",
            answer("HTTP/1.1 200 OK\r\nContent-Length: 0", b""),
        ),
        ("/no-content", answer("HTTP/1.1 204 No Content", b"")),
        (
            "/typed",
            answer(
                "HTTP/1.1 200 OK\r\nContent-Type: application/json\r\nContent-Length: 6",
                b"<html>",
            ),
        ),
        (
            "/typed-empty",
            answer(&format!("{html_head}\r\nContent-Type: "), html),
        ),
        (
            "/gzip",
            answer(
                "HTTP/1.1 200 OK\r\nContent-Encoding: gzip\r\nContent-Length: 4",
                b"\x1f\x8b\x08\x00",
            ),
        ),
        ("/split", split),
    ])
    .await;
    let (_m, _asc, s) = setup(imp, 0, &[raw.addr]).await;
    let cases: [(&str, StatusCode, Option<&str>); 10] = [
        ("/html", StatusCode::OK, Some("text/html; charset=utf-8")),
        ("/png", StatusCode::OK, Some("image/png")),
        ("/binary", StatusCode::OK, Some("application/octet-stream")),
        (
            "/not-found",
            StatusCode::NOT_FOUND,
            Some("text/plain; charset=utf-8"),
        ),
        ("/empty", StatusCode::OK, None),
        ("/no-content", StatusCode::NO_CONTENT, None),
        ("/typed", StatusCode::OK, Some("application/json")),
        ("/typed-empty", StatusCode::OK, Some("")),
        ("/gzip", StatusCode::OK, None),
        ("/split", StatusCode::OK, Some("application/octet-stream")),
    ];
    for version in [http::Version::HTTP_11, http::Version::HTTP_10] {
        for (path, status, want) in cases {
            let r = get_version(s.port(), REV, path, version).await;
            let ct = r.headers.get("content-type").map(|v| v.to_str().unwrap());
            assert_eq!(
                (r.status, ct),
                (status, want),
                "{path} {version:?}: {:?}\n{}",
                r.headers,
                s.logs()
            );
        }
    }
    let r = s.get(REV, "/html", &[]).await;
    assert_eq!(r.body, HTML_PAGE);
}
differential!(missing_content_type_is_sniffed: missing_content_type_is_sniffed_lite, missing_content_type_is_sniffed_knative);

/// A streamed (chunked) answer without Content-Type whose first bytes are not there yet
/// when its head arrives: Go's reverse proxy flushes the head at once for bodies of unknown
/// length (`httputil.ReverseProxy.flushInterval`: -1), so the client gets it without a
/// Content-Type, before the body; nothing waits for bytes to sniff.
async fn streamed_answer_head_is_not_held_for_sniffing(imp: Impl) {
    use http_body_util::BodyExt;
    let raw = RawPod::start(vec![(
        "/stream",
        vec![
            Step::Write(b"HTTP/1.1 200 OK\r\nTransfer-Encoding: chunked\r\n\r\n".to_vec()),
            Step::WaitRelease,
            Step::Write(b"6\r\n<html>\r\n0\r\n\r\n".to_vec()),
        ],
    )])
    .await;
    let (_m, _asc, s) = setup(imp, 0, &[raw.addr]).await;
    let req = hyper::Request::get(format!("http://127.0.0.1:{}/stream", s.port()))
        .header("knative-serving-namespace", NS)
        .header("knative-serving-revision", REV)
        .body(http_body_util::Full::new(bytes::Bytes::new()))
        .expect("request");
    let resp = tokio::time::timeout(Duration::from_secs(10), client().request(req))
        .await
        .expect("the head comes before the body")
        .expect("stream");
    assert_eq!(resp.status(), StatusCode::OK);
    assert!(
        resp.headers().get("content-type").is_none(),
        "{:?}",
        resp.headers()
    );
    raw.release.notify_one();
    let body = resp.into_body().collect().await.expect("body").to_bytes();
    assert_eq!(body, "<html>");
}
differential!(streamed_answer_head_is_not_held_for_sniffing: streamed_answer_head_is_not_held_for_sniffing_lite, streamed_answer_head_is_not_held_for_sniffing_knative);

/// Over h2c the activator's HTTP/2 server sniffs as its HTTP/1 server does (net/http
/// `h2_bundle.go` `writeChunk`), and the request reaches the pod over HTTP/2.
async fn missing_content_type_is_sniffed_over_h2c(imp: Impl) {
    let pod = Pod::start("pod-a", true).await;
    let (_m, _asc, s) = setup(imp, 0, &[pod.addr]).await;
    let resp = h2c_request(&s, REV, "/html").await;
    assert_eq!(resp.version(), http::Version::HTTP_2);
    assert_eq!(
        resp.headers().get("content-type").unwrap(),
        "text/html; charset=utf-8"
    );
    assert_eq!(pod.served()[0].version, http::Version::HTTP_2);
}
differential!(missing_content_type_is_sniffed_over_h2c: missing_content_type_is_sniffed_over_h2c_lite, missing_content_type_is_sniffed_over_h2c_knative);

/// An HTTP/2 (h2c, prior knowledge) client request for `rev` and `path` to the activator's
/// http1 port.
async fn h2c_request(s: &Subject, rev: &str, path: &str) -> hyper::Response<hyper::body::Incoming> {
    let h2: hyper_util::client::legacy::Client<_, http_body_util::Full<bytes::Bytes>> =
        hyper_util::client::legacy::Client::builder(hyper_util::rt::TokioExecutor::new())
            .http2_only(true)
            .build_http();
    let req = hyper::Request::get(format!("http://127.0.0.1:{}{path}", s.port()))
        .header("knative-serving-namespace", NS)
        .header("knative-serving-revision", rev)
        .body(http_body_util::Full::new(bytes::Bytes::new()))
        .expect("request");
    h2.request(req).await.expect("h2c request")
}

/// An h2c request for `rev`: the protocol and status of the answer.
async fn h2c_get(s: &Subject, rev: &str) -> (http::Version, StatusCode) {
    let resp = h2c_request(s, rev, "/").await;
    (resp.version(), resp.status())
}

/// Manifests with an h2c revision `grpc` (container port named `h2c`, endpoints port
/// `http2`) served by `h2pod`, and the plain revision REV served by `pod`.
fn h2c_and_http_revisions(h2pod: &Pod, pod: &Pod) -> Manifests {
    let m = Manifests::new();
    m.write(
        "rev-grpc.yaml",
        &revision_yaml("grpc", 0, "").replace(
            "- containerPort: 8080",
            "- containerPort: 8080\n      name: h2c",
        ),
    );
    m.write(
        "ep-grpc.yaml",
        &endpoints_yaml_port("grpc", &[h2pod.addr], &[], "http2"),
    );
    m.revision(REV, 0, "");
    m.endpoints(REV, &[pod.addr], &[]);
    m
}

/// Contract B.2 servers: clients may speak h2c (prior knowledge) to the http1 port; an h2c
/// client's request for an h2c revision reaches the pod over HTTP/2 on its `http2` endpoints
/// port; websocket upgrades and streamed answers pass through.
async fn h2c_websocket_and_streaming(imp: Impl) {
    use futures::{SinkExt, StreamExt};
    use http_body_util::BodyExt;
    use tokio_tungstenite::tungstenite::Message;
    use tokio_tungstenite::tungstenite::client::IntoClientRequest;

    let h2pod = Pod::start("pod-h2", true).await;
    let pod = Pod::start("pod-a", true).await;
    let m = h2c_and_http_revisions(&h2pod, &pod);
    let asc = FakeAutoscaler::start(0).await;
    let s = Subject::ready(imp, &m.dir, asc.port).await;

    assert_eq!(
        h2c_get(&s, "grpc").await,
        (http::Version::HTTP_2, StatusCode::OK)
    );
    assert_eq!(h2pod.served()[0].version, http::Version::HTTP_2);

    let mut wreq = format!("ws://127.0.0.1:{}/ws", s.port())
        .into_client_request()
        .expect("ws request");
    wreq.headers_mut()
        .insert("knative-serving-namespace", NS.parse().expect("value"));
    wreq.headers_mut()
        .insert("knative-serving-revision", REV.parse().expect("value"));
    let (mut ws, resp) = tokio_tungstenite::connect_async(wreq)
        .await
        .expect("websocket through the activator");
    assert_eq!(resp.status(), StatusCode::SWITCHING_PROTOCOLS);
    ws.send(Message::text("hello")).await.expect("send");
    let echo = ws.next().await.expect("echo").expect("frame");
    assert_eq!(echo.into_text().expect("text").as_str(), "hello");
    drop(ws);

    let req = hyper::Request::get(format!("http://127.0.0.1:{}/stream", s.port()))
        .header("knative-serving-namespace", NS)
        .header("knative-serving-revision", REV)
        .body(http_body_util::Full::new(bytes::Bytes::new()))
        .expect("request");
    let mut body = client().request(req).await.expect("stream").into_body();
    let first = body
        .frame()
        .await
        .expect("frame")
        .expect("frame")
        .into_data()
        .expect("data");
    assert_eq!(
        first, "first\n",
        "the first chunk is flushed before the rest"
    );
    pod.state.release.notify_one();
    let rest = body.collect().await.expect("rest").to_bytes();
    assert_eq!(rest, "second\n");
}
differential!(h2c_websocket_and_streaming: h2c_websocket_and_streaming_lite, h2c_websocket_and_streaming_knative);

/// The protocol to the pod follows the client's request, not the revision: Knative's proxy
/// transport is knative/pkg `network.NewProxyAutoTransport`, whose `newAutoTransport` picks
/// the h2c transport only when `r.ProtoMajor == 2` (network/transports.go). So an HTTP/1.1
/// request for an h2c revision goes to the pod's `http2` port as HTTP/1.1 (queue-proxy serves
/// both there), and an h2c request for a plain revision goes to the pod as HTTP/2.
async fn protocol_to_the_pod_follows_the_client(imp: Impl) {
    let h2pod = Pod::start("pod-h2", true).await;
    let pod = Pod::start("pod-a", true).await;
    let m = h2c_and_http_revisions(&h2pod, &pod);
    let asc = FakeAutoscaler::start(0).await;
    let s = Subject::ready(imp, &m.dir, asc.port).await;

    let r = s.get("grpc", "/", &[]).await;
    assert_eq!((r.status, r.body.as_str()), (StatusCode::OK, "pod-h2"));
    assert_eq!(h2pod.served()[0].version, http::Version::HTTP_11);

    assert_eq!(
        h2c_get(&s, REV).await,
        (http::Version::HTTP_2, StatusCode::OK)
    );
    assert_eq!(pod.served()[0].version, http::Version::HTTP_2);
}

differential!(protocol_to_the_pod_follows_the_client: protocol_to_the_pod_follows_the_client_lite, protocol_to_the_pod_follows_the_client_knative);

/// A request for the revision by Host alone, without the Knative-Serving-* headers.
async fn by_host(s: &Subject, host: &str) -> Reply {
    let req = hyper::Request::get(format!("http://127.0.0.1:{}/", s.port()))
        .header("host", host)
        .body(http_body_util::Full::new(bytes::Bytes::new()))
        .expect("request");
    send(req).await
}

/// Contract B.2 (5): without the Knative-Serving-* headers, only a Host of the form
/// `<name>.<namespace>.svc.<cluster-domain>[:port]` names a revision
/// (`pkg/activator/handler/context_handler.go`: `strings.SplitN(r.Host, ".", 4)`, 4 parts,
/// `parts[2] == "svc"`, `parts[3]` without port == `network.GetClusterDomainName()`); any
/// other Host looks up the empty name: 404.
async fn host_names_a_revision_only_as_a_cluster_service(imp: Impl) {
    let pod = Pod::start("pod-a", true).await;
    let (_m, _asc, s) = setup(imp, 0, &[pod.addr]).await;
    let r = by_host(&s, &format!("{REV}.{NS}.svc.cluster.local:80")).await;
    assert_eq!((r.status, r.body.as_str()), (StatusCode::OK, "pod-a"));
    for host in [
        format!("{REV}.{NS}.example.com"),
        format!("{REV}.{NS}.svc"),
        format!("{REV}.{NS}.svc.other.domain"),
    ] {
        let r = by_host(&s, &host).await;
        assert_eq!(r.status, StatusCode::NOT_FOUND, "Host {host}: {}", r.body);
    }
    assert_eq!(pod.served().len(), 1);
}

differential!(host_names_a_revision_only_as_a_cluster_service: host_names_a_revision_only_as_a_cluster_service_lite, host_names_a_revision_only_as_a_cluster_service_knative);

/// Contract B.2 (12) RewriteHostIn: the Host moves into `K-Original-Host` only when the request
/// has none; an existing `K-Original-Host` (set by a proxy in front) is kept
/// (knative/networking `pkg/http/header/header.go` RewriteHostIn: "Don't overwrite an existing
/// OriginalHostHeader").
async fn existing_original_host_is_kept(imp: Impl) {
    let pod = Pod::start("pod-a", true).await;
    let (_m, _asc, s) = setup(imp, 0, &[pod.addr]).await;
    let r = s
        .get(REV, "/", &[("k-original-host", "app.example.com")])
        .await;
    assert_eq!((r.status, r.body.as_str()), (StatusCode::OK, "pod-a"));
    let h = &pod.served()[0].headers;
    assert_eq!(h.get("k-original-host").unwrap(), "app.example.com");
}

differential!(existing_original_host_is_kept: existing_original_host_is_kept_lite, existing_original_host_is_kept_knative);
