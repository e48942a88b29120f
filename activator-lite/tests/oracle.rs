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

    let by_host = |host: &'static str| {
        let port = s.port();
        async move {
            let req = hyper::Request::get(format!("http://127.0.0.1:{port}/"))
                .header("host", host)
                .body(http_body_util::Full::new(bytes::Bytes::new()))
                .expect("request");
            send(req).await
        }
    };
    let r = by_host("nope.default.svc.cluster.local").await;
    assert_eq!(r.status, StatusCode::NOT_FOUND, "{}", r.body);
    let r = by_host("example.com").await;
    assert_eq!(r.status, StatusCode::NOT_FOUND, "{}", r.body);
    // The known revision by Host alone is proxied.
    let r = by_host("hello-00001.default.svc.cluster.local").await;
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
