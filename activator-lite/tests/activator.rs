//! Black-box tests against the activator-lite binary: test pods answer queue-proxy
//! probes, a websocket server stands in for the autoscaler and decodes the frames, and
//! Revisions/Endpoints come from a manifest directory.

mod common;

use std::time::{Duration, Instant};

use bytes::Bytes;
use common::*;
use futures::{SinkExt, StreamExt};
use http_body_util::{BodyExt, Full};
use hyper::{Request, StatusCode};
use tokio_tungstenite::tungstenite::Message;
use tokio_tungstenite::tungstenite::client::IntoClientRequest;

const REV: &str = "hello-00001";

async fn ready_activator(m: &Manifests, asc: &FakeAutoscaler, extra: &[&str]) -> Activator {
    let act = Activator::spawn(&m.dir, asc.port, extra);
    act.wait_health(StatusCode::OK).await;
    act
}

/// Lets the activator apply a manifest change (inotify → reload takes milliseconds).
async fn settle() {
    tokio::time::sleep(Duration::from_millis(400)).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn scale_from_zero_holds_pokes_and_completes_in_arrival_order() {
    let m = Manifests::new();
    m.revision(REV, 1, "");
    m.endpoints(REV, &[], &[]);
    let mut asc = FakeAutoscaler::start(0).await;
    let act = ready_activator(&m, &asc, &[]).await;

    let mut held = Vec::new();
    for i in 0..5 {
        let port = act.port;
        held.push(tokio::spawn(async move {
            get(port, REV, &format!("/seq/{i}"), &[]).await
        }));
        // Arrival order must be unambiguous.
        tokio::time::sleep(Duration::from_millis(30)).await;
    }

    // The scale-from-zero poke reaches the autoscaler.
    let poke = asc.next(Duration::from_secs(5)).await.expect("no poke");
    let msg = &poke.messages[0];
    assert_eq!((msg.namespace.as_str(), msg.name.as_str()), (NS, REV));
    let stat = msg.stat.clone().expect("stat");
    assert_eq!(stat.pod_name, POD_NAME);
    assert_eq!(stat.average_concurrent_requests, 1.0);
    assert_eq!(stat.request_count, 1.0);
    assert!(
        held.iter().all(|h| !h.is_finished()),
        "requests must be held"
    );
    let metrics = act.metrics().await;
    assert!(
        metrics.contains(&format!(
            "kn_revision_request_queued{{k8s_namespace_name=\"{NS}\",kn_service_name=\"svc\",kn_configuration_name=\"svc\",kn_revision_name=\"{REV}\"}} 5"
        )),
        "{metrics}"
    );

    // The following 1 s report carries the remaining demand.
    let report = asc.next(Duration::from_secs(3)).await.expect("no report");
    let stat = report.messages[0].stat.clone().expect("stat");
    assert_eq!(stat.request_count, 4.0, "first report subtracts the poke");
    assert!(stat.average_concurrent_requests > 3.0, "{stat:?}");

    // An endpoint appears; the pod becomes ready; held requests complete in order.
    let pod = Pod::start("pod-a", true).await;
    m.endpoints(REV, &[], &[pod.addr]);
    for h in held {
        let r = h.await.expect("join");
        assert_eq!((r.status, r.body.as_str()), (StatusCode::OK, "pod-a"));
    }
    let paths: Vec<String> = pod.served().iter().map(|s| s.path.clone()).collect();
    assert_eq!(paths, ["/seq/0", "/seq/1", "/seq/2", "/seq/3", "/seq/4"]);
    assert!(pod.state.probes.load(std::sync::atomic::Ordering::SeqCst) >= 1);

    // Proxy headers as Knative sets them.
    let h = &pod.served()[0].headers;
    assert_eq!(h.get("k-proxy-request").unwrap(), "activator");
    assert_eq!(
        h.get("k-original-host").unwrap(),
        &format!("{REV}.{NS}.example.com")
    );
    assert!(h.get("knative-serving-namespace").is_none());
    assert!(h.get("knative-serving-revision").is_none());
    assert_eq!(h.get("host").unwrap(), &pod.addr.to_string());
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn container_concurrency_enforced_across_pods() {
    let m = Manifests::new();
    m.revision(REV, 2, "");
    let a = Pod::start("pod-a", true).await;
    let b = Pod::start("pod-b", true).await;
    m.endpoints(REV, &[a.addr, b.addr], &[]);
    let asc = FakeAutoscaler::start(0).await;
    let act = ready_activator(&m, &asc, &[]).await;
    let port = act.port;
    let replies = futures::future::join_all(
        (0..12).map(|_| async move { get(port, REV, "/sleep/150", &[]).await }),
    )
    .await;
    assert!(replies.iter().all(|r| r.status == StatusCode::OK));
    let t = tally(&replies);
    assert_eq!(t.values().sum::<usize>(), 12);
    assert_eq!(t.len(), 2, "both pods serve: {t:?}");
    for p in [&a, &b] {
        let max = p
            .state
            .max_in_flight
            .load(std::sync::atomic::Ordering::SeqCst);
        assert!(max <= 2, "{} saw {max} concurrent requests", p.state.name);
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn queue_overflow_is_503_and_held_requests_survive() {
    let m = Manifests::new();
    m.revision(REV, 1, "");
    let asc = FakeAutoscaler::start(0).await;
    let act = ready_activator(&m, &asc, &["--queue-depth", "3"]).await;
    let port = act.port;
    let held: Vec<_> = (0..3)
        .map(|_| tokio::spawn(async move { get(port, REV, "/", &[]).await }))
        .collect();
    let deadline = Instant::now() + Duration::from_secs(5);
    while !act
        .metrics()
        .await
        .contains(&format!("kn_revision_name=\"{REV}\"}} 3"))
    {
        assert!(Instant::now() < deadline, "requests never queued");
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    let over = act.get(REV, "/", &[]).await;
    assert_eq!(over.status, StatusCode::SERVICE_UNAVAILABLE);
    let pod = Pod::start("pod-a", true).await;
    m.endpoints(REV, &[pod.addr], &[]);
    for h in held {
        assert_eq!(h.await.expect("join").status, StatusCode::OK);
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn revision_timeouts_give_504() {
    let m = Manifests::new();
    m.revision(REV, 0, "  timeoutSeconds: 1\n");
    m.revision("held-00001", 0, "  timeoutSeconds: 1\n");
    let pod = Pod::start("pod-a", true).await;
    m.endpoints(REV, &[pod.addr], &[]);
    let asc = FakeAutoscaler::start(0).await;
    let act = ready_activator(&m, &asc, &[]).await;
    assert_eq!(act.get(REV, "/sleep/10", &[]).await.status, StatusCode::OK);
    let slow = act.get(REV, "/sleep/3000", &[]).await;
    assert_eq!(slow.status, StatusCode::GATEWAY_TIMEOUT);
    assert_eq!(slow.body, "activator request timeout");
    // Held without any pod: the same timeout applies.
    let held = act.get("held-00001", "/", &[]).await;
    assert_eq!(held.status, StatusCode::GATEWAY_TIMEOUT);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn pod_failing_its_probe_gets_no_traffic_until_it_passes() {
    let m = Manifests::new();
    m.revision(REV, 0, "");
    let bad = Pod::start("pod-bad", false).await;
    let good = Pod::start("pod-good", true).await;
    // Both listed as ready by Kubernetes; only the probe decides.
    m.endpoints(REV, &[bad.addr, good.addr], &[]);
    let asc = FakeAutoscaler::start(0).await;
    let act = ready_activator(&m, &asc, &[]).await;
    let port = act.port;
    let replies =
        futures::future::join_all((0..10).map(|_| async move { get(port, REV, "/", &[]).await }))
            .await;
    assert!(replies.iter().all(|r| r.status == StatusCode::OK));
    assert_eq!(tally(&replies).get("pod-good"), Some(&10));
    assert!(bad.served().is_empty());
    assert!(bad.state.probes.load(std::sync::atomic::Ordering::SeqCst) >= 1);

    // Once it passes its probe it gets traffic.
    bad.state
        .healthy
        .store(true, std::sync::atomic::Ordering::SeqCst);
    let deadline = Instant::now() + Duration::from_secs(5);
    while bad.served().is_empty() {
        assert!(Instant::now() < deadline, "recovered pod never got traffic");
        let _ = act.get(REV, "/", &[]).await;
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn pod_removed_mid_request() {
    let m = Manifests::new();
    m.revision(REV, 1, "");
    let a = Pod::start("pod-a", true).await;
    let b = Pod::start("pod-b", true).await;
    m.endpoints(REV, &[a.addr, b.addr], &[]);
    let asc = FakeAutoscaler::start(0).await;
    let act = ready_activator(&m, &asc, &[]).await;
    // First-available (CC 1) sends the first request to the first pod in address order.
    let (first, second) = if a.addr.to_string() < b.addr.to_string() {
        (&a, &b)
    } else {
        (&b, &a)
    };
    let port = act.port;
    let in_flight = tokio::spawn(async move { get(port, REV, "/hold", &[]).await });
    let deadline = Instant::now() + Duration::from_secs(5);
    while first.served().is_empty() {
        assert!(
            Instant::now() < deadline,
            "held request never reached the first pod"
        );
        tokio::time::sleep(Duration::from_millis(10)).await;
    }
    m.endpoints(REV, &[second.addr], &[]);
    settle().await;
    first.state.release.notify_one();
    let r = in_flight.await.expect("join");
    assert_eq!(r.status, StatusCode::OK, "the in-flight request completes");
    assert_eq!(r.body, first.state.name);
    for _ in 0..4 {
        let r = act.get(REV, "/", &[]).await;
        assert_eq!(r.body, second.state.name, "removed pod gets no new traffic");
    }
    assert_eq!(first.served().len(), 1);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn autoscaler_connection_lost_not_ready_then_ready_again() {
    let m = Manifests::new();
    m.revision(REV, 0, "");
    let asc = FakeAutoscaler::start(0).await;
    let port = asc.port;
    let act = ready_activator(&m, &asc, &[]).await;
    assert!(
        act.metrics()
            .await
            .contains("kn_activator_stats_conn_reachable 1")
    );
    drop(asc);
    act.wait_health(StatusCode::INTERNAL_SERVER_ERROR).await;
    assert!(
        act.metrics()
            .await
            .contains("kn_activator_stats_conn_reachable 0")
    );
    let mut asc = FakeAutoscaler::start(port).await;
    act.wait_health(StatusCode::OK).await;
    // Stats flow on the new connection: the first request of the revision pokes.
    let pod = Pod::start("pod-a", true).await;
    m.endpoints(REV, &[pod.addr], &[]);
    assert_eq!(act.get(REV, "/", &[]).await.status, StatusCode::OK);
    let poke = asc
        .next(Duration::from_secs(5))
        .await
        .expect("poke after reconnect");
    assert_eq!(poke.messages[0].name, REV);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn probes_unknown_revisions_and_upstream_failure() {
    let m = Manifests::new();
    m.revision(REV, 0, "");
    let pod = Pod::start("pod-a", true).await;
    m.endpoints(REV, &[pod.addr], &[]);
    let asc = FakeAutoscaler::start(0).await;
    let act = ready_activator(&m, &asc, &[]).await;
    let probe = |hdrs: Vec<(&'static str, &'static str)>| {
        let mut b = Request::get(format!("http://127.0.0.1:{}/", act.port));
        for (k, v) in hdrs {
            b = b.header(k, v);
        }
        send(b.body(Full::new(Bytes::new())).unwrap())
    };
    let r = probe(vec![
        ("k-network-probe", "activator"),
        ("user-agent", "Knative-Autoscaling-Probe"),
    ])
    .await;
    assert_eq!((r.status, r.body.as_str()), (StatusCode::OK, "activator"));
    let r = probe(vec![
        ("k-network-probe", "probe"),
        ("k-network-hash", "abc123"),
    ])
    .await;
    assert_eq!(r.status, StatusCode::OK);
    assert_eq!(r.headers.get("k-network-hash").unwrap(), "abc123");
    let r = probe(vec![("k-network-probe", "probe")]).await;
    assert_eq!(r.status, StatusCode::BAD_REQUEST);
    // The profiling port (8008 in Knative) answers with profiling off, as Knative's does.
    let r = send(
        Request::get(format!(
            "http://127.0.0.1:{}/debug/pprof/",
            act.profiling_port
        ))
        .body(Full::new(Bytes::new()))
        .unwrap(),
    )
    .await;
    assert_eq!(
        (r.status, r.body.as_str()),
        (StatusCode::NOT_FOUND, "404 page not found\n")
    );
    let r = probe(vec![("k-network-probe", "queue")]).await;
    assert_eq!(r.status, StatusCode::BAD_REQUEST);
    assert_eq!(
        act.get("nope-00001", "/", &[]).await.status,
        StatusCode::NOT_FOUND
    );
    let r = probe(vec![("host", "localhost")]).await;
    assert_eq!(r.status, StatusCode::NOT_FOUND);
    // Revision from the Host alone.
    let r = probe(vec![("host", "hello-00001.default.svc.cluster.local")]).await;
    assert_eq!((r.status, r.body.as_str()), (StatusCode::OK, "pod-a"));
    // Two Host headers (fuzz finding): Go's net/http answer, 400 and the connection closed,
    // whichever of the two names a revision.
    for hosts in [
        "Host: hello-00001.default\r\nHost: nope-00001.default",
        "Host: nope-00001.default\r\nHost: hello-00001.default",
    ] {
        use tokio::io::{AsyncReadExt, AsyncWriteExt};
        let mut s = tokio::net::TcpStream::connect(("127.0.0.1", act.port))
            .await
            .unwrap();
        s.write_all(format!("GET / HTTP/1.1\r\n{hosts}\r\n\r\n").as_bytes())
            .await
            .unwrap();
        let mut reply = String::new();
        tokio::time::timeout(Duration::from_secs(10), s.read_to_string(&mut reply))
            .await
            .expect("connection closed after the 400")
            .unwrap();
        assert!(reply.starts_with("HTTP/1.1 400 Bad Request\r\n"), "{reply}");
        assert!(reply.ends_with("\r\n\r\n400 Bad Request"), "{reply}");
        assert!(
            reply.to_ascii_lowercase().contains("connection: close\r\n"),
            "{reply}"
        );
    }

    // Streaming: the first chunk arrives while the pod still holds the second.
    let req = Request::get(format!("http://127.0.0.1:{}/stream", act.port))
        .header("knative-serving-namespace", NS)
        .header("knative-serving-revision", REV)
        .body(Full::new(Bytes::new()))
        .unwrap();
    let resp = client().request(req).await.unwrap();
    let mut body = resp.into_body();
    let first = body.frame().await.unwrap().unwrap().into_data().unwrap();
    assert_eq!(first, "first\n");
    pod.state.release.notify_one();
    let rest = body.collect().await.unwrap().to_bytes();
    assert_eq!(rest, "second\n");

    // Websocket upgrade passes through.
    let mut wreq = format!("ws://127.0.0.1:{}/ws", act.port)
        .into_client_request()
        .unwrap();
    wreq.headers_mut()
        .insert("knative-serving-namespace", NS.parse().unwrap());
    wreq.headers_mut()
        .insert("knative-serving-revision", REV.parse().unwrap());
    let (mut ws, resp) = tokio_tungstenite::connect_async(wreq).await.unwrap();
    assert_eq!(resp.status(), StatusCode::SWITCHING_PROTOCOLS);
    ws.send(Message::text("hello")).await.unwrap();
    let echo = ws.next().await.unwrap().unwrap();
    assert_eq!(echo.into_text().unwrap().as_str(), "hello");
    drop(ws);

    // h2c on the second port.
    let h2: hyper_util::client::legacy::Client<_, Full<Bytes>> =
        hyper_util::client::legacy::Client::builder(hyper_util::rt::TokioExecutor::new())
            .http2_only(true)
            .build_http();
    let req = Request::get(format!("http://127.0.0.1:{}/", act.h2c_port))
        .header("knative-serving-namespace", NS)
        .header("knative-serving-revision", REV)
        .body(Full::new(Bytes::new()))
        .unwrap();
    let resp = h2.request(req).await.unwrap();
    assert_eq!(resp.version(), http::Version::HTTP_2);
    assert_eq!(resp.status(), StatusCode::OK);

    // The pod dies without leaving the endpoints: 502.
    drop(pod);
    settle().await;
    assert_eq!(act.get(REV, "/", &[]).await.status, StatusCode::BAD_GATEWAY);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn sigterm_fails_health_keeps_serving_then_exits() {
    let m = Manifests::new();
    m.revision(REV, 0, "");
    let pod = Pod::start("pod-a", true).await;
    m.endpoints(REV, &[pod.addr], &[]);
    let asc = FakeAutoscaler::start(0).await;
    let mut act = ready_activator(&m, &asc, &["--drain-timeout-secs", "2"]).await;
    act.sigterm();
    act.wait_health(StatusCode::INTERNAL_SERVER_ERROR).await;
    assert_eq!(act.get(REV, "/", &[]).await.status, StatusCode::OK);
    let deadline = Instant::now() + Duration::from_secs(15);
    loop {
        if let Some(status) = act.child.try_wait().unwrap() {
            assert!(status.success(), "{status}");
            break;
        }
        assert!(
            Instant::now() < deadline,
            "activator did not exit after the drain"
        );
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
}

/// Knative's real queue-proxy (`/root/go/bin/queue`, v1.23.0) in front of the test app.
/// It binds 8022 and 9090 whatever its environment says, so this is the only case that
/// runs it.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn scale_from_zero_through_knatives_queue_proxy() {
    const QUEUE: &str = "/root/go/bin/queue";
    assert!(
        std::path::Path::new(QUEUE).exists(),
        "{QUEUE} missing: go install knative.dev/serving/cmd/queue@v0.50.0 (scripts/setup.sh)"
    );
    let m = Manifests::new();
    m.revision(REV, 1, "  timeoutSeconds: 150\n");
    let mut asc = FakeAutoscaler::start(0).await;
    let act = ready_activator(&m, &asc, &[]).await;
    let port = act.port;
    let held = tokio::spawn(async move { get(port, REV, "/via-queue", &[]).await });
    let poke = asc.next(Duration::from_secs(5)).await.expect("no poke");
    assert_eq!(poke.messages[0].name, REV);

    let app = Pod::start("app", true).await;
    let (mut qp, qp_port) = QueueProxy::start_serving(app.addr.port()).await;
    // Kubernetes lists the pod as not ready until its own probe passes; the activator
    // probes it directly and uses it as soon as queue-proxy answers "queue".
    m.endpoints(REV, &[], &[format!("127.0.0.1:{qp_port}").parse().unwrap()]);
    let r = held.await.expect("join");
    assert_eq!((r.status, r.body.as_str()), (StatusCode::OK, "app"));
    let seen = app.served();
    assert_eq!(seen.len(), 1);
    // queue-proxy put K-Original-Host back into Host.
    assert_eq!(
        seen[0].headers.get("host").unwrap(),
        &format!("{REV}.{NS}.example.com")
    );
    // queue-proxy counted the request as proxied by the activator (K-Proxy-Request).
    let deadline = Instant::now() + Duration::from_secs(5);
    let mut last = None;
    loop {
        if let Some(stat) = qp.stat().await {
            if stat.pod_name == QP_POD && stat.proxied_request_count > 0.0 {
                break;
            }
            last = Some(stat);
        }
        assert!(
            Instant::now() < deadline,
            "queue-proxy never reported a proxied request; last stat on :9090: {last:?} \
             (another queue-proxy holding :9090 shows a different pod_name)"
        );
        tokio::time::sleep(Duration::from_millis(200)).await;
    }
    qp.stop();
}

const QP_POD: &str = "hello-00001-deployment-abc";

struct QueueProxy {
    child: std::process::Child,
}

impl Drop for QueueProxy {
    fn drop(&mut self) {
        self.stop();
    }
}

impl QueueProxy {
    fn start(port: u16, user_port: u16) -> Self {
        let child = std::process::Command::new("/root/go/bin/queue")
            .env_clear()
            .envs([
                ("SERVING_NAMESPACE", NS),
                ("SERVING_SERVICE", "svc"),
                ("SERVING_CONFIGURATION", "svc"),
                ("SERVING_REVISION", REV),
                ("SERVING_POD", QP_POD),
                ("SERVING_POD_IP", "127.0.0.1"),
                ("QUEUE_SERVING_PORT", &port.to_string()),
                ("QUEUE_SERVING_TLS_PORT", &free_port().to_string()),
                ("USER_PORT", &user_port.to_string()),
                ("CONTAINER_CONCURRENCY", "1"),
                ("REVISION_TIMEOUT_SECONDS", "300"),
                ("SERVING_LOGGING_CONFIG", ""),
                ("SERVING_LOGGING_LEVEL", "error"),
                ("SYSTEM_NAMESPACE", "knative-serving"),
                (
                    "SERVING_READINESS_PROBE",
                    &format!(r#"{{"tcpSocket":{{"port":{user_port},"host":"127.0.0.1"}}}}"#),
                ),
                (
                    "OBSERVABILITY_CONFIG",
                    r#"{"requestMetrics":{"protocol":"none"}}"#,
                ),
            ])
            .stdout(std::process::Stdio::null())
            .stderr(std::process::Stdio::null())
            .spawn()
            .expect("spawn queue-proxy");
        Self { child }
    }

    /// Starts queue-proxy and waits until it answers its probe. Retries when it exits
    /// at once (its fixed ports 8022/9090 may be held by another queue-proxy for a moment).
    async fn start_serving(user_port: u16) -> (Self, u16) {
        // Up to 90 s: other suites on a shared machine may run a queue-proxy for a while.
        let give_up = Instant::now() + Duration::from_secs(90);
        while Instant::now() < give_up {
            let port = free_port();
            let mut qp = Self::start(port, user_port);
            let deadline = Instant::now() + Duration::from_secs(3);
            while Instant::now() < deadline {
                if qp.child.try_wait().ok().flatten().is_some() {
                    break;
                }
                let req = Request::get(format!("http://127.0.0.1:{port}/"))
                    .header("k-network-probe", "queue")
                    .header("user-agent", "Knative-Activator-Probe")
                    .body(Full::new(Bytes::new()))
                    .unwrap();
                if let Ok(r) = client().request(req).await
                    && r.status() == StatusCode::OK
                {
                    return (qp, port);
                }
                tokio::time::sleep(Duration::from_millis(20)).await;
            }
            qp.stop();
            tokio::time::sleep(Duration::from_millis(250)).await;
        }
        panic!("Knative's queue-proxy never became ready (ports 8022/9090 busy?)");
    }

    /// queue-proxy's latest autoscaler stat from :9090.
    async fn stat(&mut self) -> Option<activator_lite::proto::Stat> {
        use prost::Message as _;
        let req = Request::get("http://127.0.0.1:9090/metrics")
            .header("accept", "application/protobuf")
            .body(Full::new(Bytes::new()))
            .ok()?;
        let r = client().request(req).await.ok()?;
        let b = r.into_body().collect().await.ok()?.to_bytes();
        activator_lite::proto::Stat::decode(b.as_ref()).ok()
    }

    fn stop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

/// The protocol to the pod follows the client's, whatever the revision (knative/pkg
/// network/transports.go `newAutoTransport`: h2c only when `r.ProtoMajor == 2`): an
/// HTTP/1.1 request for an h2c revision reaches the pod's `http2` port as HTTP/1.1, an h2c
/// request as HTTP/2.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn h2c_revision_gets_the_clients_protocol() {
    let m = Manifests::new();
    m.write(
        "rev-grpc.yaml",
        &revision_yaml(REV, 0, "").replace(
            "- containerPort: 8080",
            "- containerPort: 8080\n      name: h2c",
        ),
    );
    let pod = Pod::start("pod-h2", true).await;
    m.write(
        "ep-grpc.yaml",
        &endpoints_yaml_port(REV, &[pod.addr], &[], "http2"),
    );
    let asc = FakeAutoscaler::start(0).await;
    let act = ready_activator(&m, &asc, &[]).await;
    let r = act.get(REV, "/h1", &[]).await;
    assert_eq!((r.status, r.body.as_str()), (StatusCode::OK, "pod-h2"));
    let h2: hyper_util::client::legacy::Client<_, http_body_util::Full<bytes::Bytes>> =
        hyper_util::client::legacy::Client::builder(hyper_util::rt::TokioExecutor::new())
            .http2_only(true)
            .build_http();
    let req = hyper::Request::get(format!("http://127.0.0.1:{}/h2", act.port))
        .header("knative-serving-namespace", NS)
        .header("knative-serving-revision", REV)
        .body(http_body_util::Full::new(bytes::Bytes::new()))
        .expect("request");
    let resp = h2.request(req).await.expect("h2c request");
    assert_eq!(
        (resp.version(), resp.status()),
        (http::Version::HTTP_2, StatusCode::OK)
    );
    let seen = pod.served();
    assert_eq!(
        seen.iter()
            .map(|r| (r.path.as_str(), r.version))
            .collect::<Vec<_>>(),
        [
            ("/h1", http::Version::HTTP_11),
            ("/h2", http::Version::HTTP_2)
        ]
    );
    assert_eq!(seen[1].headers.get("k-proxy-request").unwrap(), "activator");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn pods_are_subset_across_activators() {
    let m = Manifests::new();
    m.revision(REV, 0, "");
    let a = Pod::start("pod-a", true).await;
    let b = Pod::start("pod-b", true).await;
    m.endpoints(REV, &[a.addr, b.addr], &[]);
    // The public Endpoints list two activators; this one (POD_IP 127.0.0.1) sorts first
    // and takes the first half of the pods in address order.
    m.write(
        "ep-public.yaml",
        &format!(
            "apiVersion: v1\nkind: Endpoints\nmetadata:\n  name: {REV}\n  namespace: {NS}\n  labels:\n    serving.knative.dev/revision: {REV}\n    networking.internal.knative.dev/serviceType: Public\nsubsets:\n- addresses:\n  - ip: 127.0.0.2\n  - ip: 127.0.0.1\n  ports:\n  - name: http\n    port: 8012\n"
        ),
    );
    let asc = FakeAutoscaler::start(0).await;
    let act = ready_activator(&m, &asc, &[]).await;
    let (mine, other) = if a.addr.to_string() < b.addr.to_string() {
        (&a, &b)
    } else {
        (&b, &a)
    };
    for _ in 0..8 {
        let r = act.get(REV, "/", &[]).await;
        assert_eq!(r.body, mine.state.name);
    }
    assert!(other.served().is_empty());
    // Alone again (public Endpoints list only this activator): both pods are used.
    m.remove("ep-public.yaml");
    m.write(
        "ep-public.yaml",
        &format!(
            "apiVersion: v1\nkind: Endpoints\nmetadata:\n  name: {REV}\n  namespace: {NS}\n  labels:\n    serving.knative.dev/revision: {REV}\n    networking.internal.knative.dev/serviceType: Public\nsubsets:\n- addresses:\n  - ip: 127.0.0.1\n  ports:\n  - name: http\n    port: 8012\n"
        ),
    );
    let deadline = Instant::now() + Duration::from_secs(5);
    while other.served().is_empty() {
        assert!(Instant::now() < deadline, "second pod never used");
        let _ = act.get(REV, "/", &[]).await;
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn held_client_hanging_up_frees_its_queue_place() {
    use tokio::io::AsyncWriteExt;
    let m = Manifests::new();
    m.revision(REV, 1, "");
    let asc = FakeAutoscaler::start(0).await;
    let act = ready_activator(&m, &asc, &["--queue-depth", "1"]).await;
    let queued = |n: usize| {
        format!(
            "kn_revision_request_queued{{k8s_namespace_name=\"{NS}\",kn_service_name=\"svc\",kn_configuration_name=\"svc\",kn_revision_name=\"{REV}\"}} {n}"
        )
    };
    let mut s = tokio::net::TcpStream::connect(("127.0.0.1", act.port))
        .await
        .unwrap();
    s.write_all(
        format!("GET / HTTP/1.1\r\nHost: x\r\nKnative-Serving-Namespace: {NS}\r\nKnative-Serving-Revision: {REV}\r\n\r\n")
            .as_bytes(),
    )
    .await
    .unwrap();
    let deadline = Instant::now() + Duration::from_secs(5);
    while !act.metrics().await.contains(&queued(1)) {
        assert!(Instant::now() < deadline, "request never queued");
        tokio::time::sleep(Duration::from_millis(10)).await;
    }
    assert_eq!(
        act.get(REV, "/", &[]).await.status,
        StatusCode::SERVICE_UNAVAILABLE,
        "queue of one is full"
    );
    drop(s);
    while !act.metrics().await.contains(&queued(0)) {
        assert!(Instant::now() < deadline, "hung-up request still queued");
        tokio::time::sleep(Duration::from_millis(10)).await;
    }
    let port = act.port;
    let next = tokio::spawn(async move { get(port, REV, "/", &[]).await });
    while !act.metrics().await.contains(&queued(1)) {
        assert!(
            Instant::now() < deadline,
            "new request not admitted to the queue"
        );
        tokio::time::sleep(Duration::from_millis(10)).await;
    }
    let pod = Pod::start("pod-a", true).await;
    m.endpoints(REV, &[pod.addr], &[]);
    assert_eq!(next.await.unwrap().status, StatusCode::OK);
    assert_eq!(pod.served().len(), 1, "the hung-up request was never sent");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn https_when_a_certificate_is_configured() {
    let m = Manifests::new();
    m.revision(REV, 0, "");
    let pod = Pod::start("pod-a", true).await;
    m.endpoints(REV, &[pod.addr], &[]);
    // A self-signed certificate, as the routing-serving-certs Secret would hold.
    let crt = m.dir.join("tls.crt.pem");
    let key = m.dir.join("tls.key.pem");
    let ok = std::process::Command::new("openssl")
        .args([
            "req",
            "-x509",
            "-newkey",
            "ec",
            "-pkeyopt",
            "ec_paramgen_curve:P-256",
        ])
        .args([
            "-nodes",
            "-days",
            "1",
            "-subj",
            "/CN=activator-service.knative-serving.svc",
        ])
        .args(["-addext", "subjectAltName=IP:127.0.0.1"])
        .args(["-addext", "basicConstraints=critical,CA:FALSE"])
        .arg("-keyout")
        .arg(&key)
        .arg("-out")
        .arg(&crt)
        .stdout(std::process::Stdio::null())
        .stderr(std::process::Stdio::null())
        .status()
        .expect("openssl (apt-get install openssl) is needed to make a test certificate");
    assert!(ok.success(), "openssl failed to make a certificate");
    let https_port = free_port();
    let asc = FakeAutoscaler::start(0).await;
    let (crt_s, key_s, port_s) = (
        crt.display().to_string(),
        key.display().to_string(),
        https_port.to_string(),
    );
    let _act = ready_activator(
        &m,
        &asc,
        &[
            "--tls-cert",
            &crt_s,
            "--tls-key",
            &key_s,
            "--https-port",
            &port_s,
        ],
    )
    .await;

    let mut roots = rustls::RootCertStore::empty();
    let pem = std::fs::read(&crt).unwrap();
    for c in rustls_pemfile::certs(&mut pem.as_slice()) {
        roots.add(c.unwrap()).unwrap();
    }
    let cfg = rustls::ClientConfig::builder_with_provider(std::sync::Arc::new(
        rustls::crypto::ring::default_provider(),
    ))
    .with_safe_default_protocol_versions()
    .unwrap()
    .with_root_certificates(roots)
    .with_no_client_auth();
    let tcp = tokio::net::TcpStream::connect(("127.0.0.1", https_port))
        .await
        .unwrap();
    let name = rustls::pki_types::ServerName::try_from("127.0.0.1").unwrap();
    let tls = tokio_rustls::TlsConnector::from(std::sync::Arc::new(cfg))
        .connect(name, tcp)
        .await
        .expect("TLS handshake");
    let (mut sender, conn) =
        hyper::client::conn::http1::handshake(hyper_util::rt::TokioIo::new(tls))
            .await
            .unwrap();
    tokio::spawn(conn);
    let req = Request::get("/")
        .header("host", "x")
        .header("knative-serving-namespace", NS)
        .header("knative-serving-revision", REV)
        .body(Full::new(Bytes::new()))
        .unwrap();
    let resp = sender.send_request(req).await.unwrap();
    assert_eq!(resp.status(), StatusCode::OK);
    let body = resp.into_body().collect().await.unwrap().to_bytes();
    assert_eq!(body, "pod-a");
}

/// A user container as it answers on a pod's serving port in event-driven mode (the
/// kernel steers that port past the sidecar): 200 with its own body to everything,
/// probes included. Counts the probes and the proxied requests it sees.
struct UserApp {
    addr: std::net::SocketAddr,
    probes: std::sync::Arc<std::sync::atomic::AtomicUsize>,
    proxied: std::sync::Arc<std::sync::atomic::AtomicUsize>,
    task: tokio::task::JoinHandle<()>,
}

impl Drop for UserApp {
    fn drop(&mut self) {
        self.task.abort();
    }
}

impl UserApp {
    async fn start() -> Self {
        use std::sync::Arc;
        use std::sync::atomic::{AtomicUsize, Ordering};
        let listener = tokio::net::TcpListener::bind("127.0.0.1:0")
            .await
            .expect("bind user app");
        let addr = listener.local_addr().expect("addr");
        let probes = Arc::new(AtomicUsize::new(0));
        let proxied = Arc::new(AtomicUsize::new(0));
        let (p, q) = (probes.clone(), proxied.clone());
        let task = tokio::spawn(async move {
            loop {
                let Ok((stream, _)) = listener.accept().await else {
                    continue;
                };
                let (p, q) = (p.clone(), q.clone());
                tokio::spawn(async move {
                    let svc = hyper::service::service_fn(move |req: Request<_>| {
                        if req.headers().contains_key("k-network-probe") {
                            p.fetch_add(1, Ordering::SeqCst);
                        }
                        if req
                            .headers()
                            .get("k-proxy-request")
                            .is_some_and(|v| v == "activator")
                        {
                            q.fetch_add(1, Ordering::SeqCst);
                        }
                        async {
                            let _ = BodyExt::collect(req.into_body()).await;
                            Ok::<_, std::convert::Infallible>(hyper::Response::new(Full::new(
                                Bytes::from_static(b"user-app"),
                            )))
                        }
                    });
                    let _ = hyper::server::conn::http1::Builder::new()
                        .serve_connection(hyper_util::rt::TokioIo::new(stream), svc)
                        .await;
                });
            }
        });
        Self {
            addr,
            probes,
            proxied,
            task,
        }
    }
}

/// A Revision with the `spright.dev/dataplane-mode` annotation (none when `mode` is
/// empty) and a 1 s timeout, and its private Endpoints naming both the serving port
/// and the sidecar's admin port (`http-queueadm`).
fn mode_manifests(rev: &str, mode: &str, serving: u16, admin: u16) -> String {
    let annotations = if mode.is_empty() {
        String::new()
    } else {
        format!("  annotations:\n    spright.dev/dataplane-mode: {mode}\n")
    };
    format!(
        "apiVersion: serving.knative.dev/v1\nkind: Revision\nmetadata:\n  name: {rev}\n  namespace: {NS}\n{annotations}spec:\n  containerConcurrency: 1\n  timeoutSeconds: 1\n---\napiVersion: v1\nkind: Endpoints\nmetadata:\n  name: {rev}-private\n  namespace: {NS}\n  labels:\n    serving.knative.dev/revision: {rev}\n    serving.knative.dev/revisionUID: uid-{rev}\n    networking.internal.knative.dev/serviceType: Private\nsubsets:\n- addresses:\n  - ip: 127.0.0.1\n  ports:\n  - name: http\n    port: {serving}\n  - name: http-queueadm\n    port: {admin}\n"
    )
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn event_driven_pods_are_probed_on_the_admin_port() {
    use std::sync::atomic::Ordering;
    let m = Manifests::new();
    // One pod per revision: the user app on the serving port (steered past the
    // sidecar), the sidecar answering `queue` on its admin port.
    let modes = ["event-driven", "full", "userspace", ""];
    let mut pods = Vec::new();
    for (i, mode) in modes.iter().enumerate() {
        let app = UserApp::start().await;
        let sidecar = Pod::start("sidecar-admin", true).await;
        let rev = format!("mode{i}-00001");
        m.write(
            &format!("{rev}.yaml"),
            &mode_manifests(&rev, mode, app.addr.port(), sidecar.addr.port()),
        );
        pods.push((rev, app, sidecar));
    }
    let asc = FakeAutoscaler::start(0).await;
    let act = ready_activator(&m, &asc, &[]).await;
    let port = act.port;
    let replies = futures::future::join_all(
        pods.iter()
            .map(|(rev, _, _)| async move { get(port, rev, "/", &[]).await }),
    )
    .await;

    // Event-driven: ready through the admin port, the request reaches the user app.
    let (_, app, sidecar) = &pods[0];
    assert_eq!(
        (replies[0].status, replies[0].body.as_str()),
        (StatusCode::OK, "user-app")
    );
    assert!(sidecar.state.probes.load(Ordering::SeqCst) >= 1);
    assert_eq!(app.probes.load(Ordering::SeqCst), 0, "probed the user app");
    assert_eq!(app.proxied.load(Ordering::SeqCst), 1);

    // full, userspace and no annotation: probed on the serving port, where the user app
    // does not answer `queue`: never ready, the held request times out.
    for (i, (rev, app, sidecar)) in pods.iter().enumerate().skip(1) {
        assert_eq!(
            replies[i].status,
            StatusCode::GATEWAY_TIMEOUT,
            "{rev}: {:?}",
            replies[i]
        );
        assert!(app.probes.load(Ordering::SeqCst) >= 1, "{rev}");
        assert_eq!(app.proxied.load(Ordering::SeqCst), 0, "{rev}");
        assert_eq!(sidecar.state.probes.load(Ordering::SeqCst), 0, "{rev}");
    }
}

/// A pod written at the byte level: echoes request bodies, answers `queue` probes, and
/// closes every connection right after its first answer without saying so (as a pod
/// whose keep-alive timeout fires between requests).
async fn one_shot_pod() -> (std::net::SocketAddr, tokio::task::JoinHandle<()>) {
    use tokio::io::{AsyncReadExt, AsyncWriteExt};
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0")
        .await
        .expect("bind pod");
    let addr = listener.local_addr().expect("addr");
    let task = tokio::spawn(async move {
        loop {
            let Ok((mut s, _)) = listener.accept().await else {
                continue;
            };
            tokio::spawn(async move {
                let mut buf = Vec::new();
                let Some(head_end) = read_head(&mut s, &mut buf).await else {
                    return;
                };
                let head = String::from_utf8_lossy(&buf[..head_end]).to_ascii_lowercase();
                let len: usize = head
                    .lines()
                    .find_map(|l| l.strip_prefix("content-length:"))
                    .and_then(|v| v.trim().parse().ok())
                    .unwrap_or(0);
                while buf.len() < head_end + len {
                    let mut chunk = [0u8; 4096];
                    match s.read(&mut chunk).await {
                        Ok(0) | Err(_) => return,
                        Ok(n) => buf.extend_from_slice(&chunk[..n]),
                    }
                }
                let body = if head.contains("k-network-probe: queue") {
                    b"queue".to_vec()
                } else if head.starts_with("head ") {
                    Vec::new()
                } else {
                    let mut b = b"echo:".to_vec();
                    b.extend_from_slice(&buf[head_end..head_end + len]);
                    b
                };
                let declared = if head.starts_with("head ") {
                    7
                } else {
                    body.len()
                };
                let mut resp =
                    format!("HTTP/1.1 200 OK\r\ncontent-length: {declared}\r\n\r\n").into_bytes();
                resp.extend_from_slice(&body);
                let _ = s.write_all(&resp).await;
            });
        }
    });
    (addr, task)
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn bodies_head_and_pods_closing_idle_connections() {
    let m = Manifests::new();
    m.revision(REV, 0, "");
    let (addr, pod) = one_shot_pod().await;
    m.endpoints(REV, &[addr], &[]);
    let asc = FakeAutoscaler::start(0).await;
    let act = ready_activator(&m, &asc, &[]).await;
    let req = |method: &str, body: &'static str| {
        Request::builder()
            .method(method)
            .uri(format!("http://127.0.0.1:{}/x", act.port))
            .header("knative-serving-namespace", NS)
            .header("knative-serving-revision", REV)
            .body(Full::new(Bytes::from_static(body.as_bytes())))
            .unwrap()
    };
    // Every pod connection serves one request and closes, so the activator's pooled
    // connections go stale: they are dropped, or the GET is retried on a fresh one.
    let r = send(req("POST", "hello")).await;
    assert_eq!((r.status, r.body.as_str()), (StatusCode::OK, "echo:hello"));
    for _ in 0..5 {
        let r = send(req("GET", "")).await;
        assert_eq!((r.status, r.body.as_str()), (StatusCode::OK, "echo:"));
    }
    let r = send(req("HEAD", "")).await;
    assert_eq!(r.status, StatusCode::OK);
    assert_eq!(r.headers.get("content-length").unwrap(), "7");
    assert!(r.body.is_empty());
    pod.abort();
}

/// A pod that answers every request at once without reading its body, then closes the
/// connection (unread bytes make the kernel reset it), as a server that rejects an upload
/// early does. Probes get the queue-proxy answer.
async fn impatient_pod() -> (std::net::SocketAddr, tokio::task::JoinHandle<()>) {
    use tokio::io::{AsyncReadExt, AsyncWriteExt};
    let l = tokio::net::TcpListener::bind("127.0.0.1:0")
        .await
        .expect("bind");
    let addr = l.local_addr().expect("addr");
    let task = tokio::spawn(async move {
        while let Ok((mut s, _)) = l.accept().await {
            tokio::spawn(async move {
                let mut head = Vec::new();
                let mut buf = [0u8; 4096];
                while !head.windows(4).any(|w| w == b"\r\n\r\n") {
                    match s.read(&mut buf).await {
                        Ok(0) | Err(_) => return,
                        Ok(n) => head.extend_from_slice(&buf[..n]),
                    }
                }
                let probe = String::from_utf8_lossy(&head)
                    .to_ascii_lowercase()
                    .contains("k-network-probe: queue");
                let body = if probe { "queue" } else { "early" };
                let resp = format!(
                    "HTTP/1.1 200 OK\r\ncontent-length: {}\r\nconnection: close\r\n\r\n{body}",
                    body.len()
                );
                let _ = s.write_all(resp.as_bytes()).await;
            });
        }
    });
    (addr, task)
}

/// A pod that answers before reading a large request body: its answer reaches the client
/// even though sending the rest of the body fails (Go's transport relays a response that
/// arrived while the body was being written; Knative's activator returned the pod's 200
/// every time). Many quick requests, both through hyper (1 MB) and the fast path (60 KB).
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn early_answer_relayed_when_the_body_cannot_be_sent() {
    let (addr, _pod) = impatient_pod().await;
    let m = Manifests::new();
    m.revision(REV, 0, "");
    m.endpoints(REV, &[addr], &[]);
    let asc = FakeAutoscaler::start(0).await;
    let act = ready_activator(&m, &asc, &[]).await;
    for size in [1 << 20, 60 * 1024] {
        let body = Bytes::from(vec![b'x'; size]);
        for i in 0..15 {
            let req = Request::post(format!("http://127.0.0.1:{}/upload", act.port))
                .header("knative-serving-namespace", NS)
                .header("knative-serving-revision", REV)
                .body(Full::new(body.clone()))
                .expect("request");
            let r = send(req).await;
            assert_eq!(
                (r.status, r.body.as_str()),
                (StatusCode::OK, "early"),
                "body of {size} bytes, attempt {i}"
            );
        }
    }
}
