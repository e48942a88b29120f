//! Differential suite: every case runs against Knative's queue-proxy (v1.23.0, the oracle at
//! /root/go/bin/queue) and against ours, with the same environment and the same upstream, and
//! the answers must be equal. Differences kept on purpose are named where they are removed
//! from the comparison, with the reason.

mod common;

use std::collections::BTreeMap;
use std::fmt::Debug;
use std::sync::MutexGuard;
use std::time::{Duration, Instant};

use common::*;

/// Runs `case` against both implementations (oracle first) with `env`, returns both results.
fn both<T: Debug>(env: &BTreeMap<String, String>, mut case: impl FnMut(&mut Proc) -> T) -> (T, T) {
    let mut results = Vec::new();
    for which in [Impl::Knative, Impl::Ours] {
        let mut p = start(which, env, None);
        results.push(case(&mut p));
    }
    let ours = results.pop().expect("ours");
    let knative = results.pop().expect("knative");
    (knative, ours)
}

fn assert_same<T: Debug + PartialEq>(what: &str, knative: &T, ours: &T) {
    assert_eq!(
        knative, ours,
        "{what}: Knative (left) and ours (right) differ"
    );
}

fn oracle_present() -> bool {
    std::path::Path::new(KNATIVE_QUEUE).exists()
}

macro_rules! require_oracle {
    () => {
        assert!(
            oracle_present(),
            "Knative's queue-proxy is missing at {KNATIVE_QUEUE}: go install knative.dev/serving/cmd/queue@v0.50.0"
        );
    };
}

/// What every case starts with: the oracle present, Knative's fixed ports held (keep the
/// guard until the case ends), an upstream and Knative's environment for it.
fn oracle_case() -> (MutexGuard<'static, ()>, Upstream, BTreeMap<String, String>) {
    require_oracle!();
    let guard = port_lock();
    let up = Upstream::start();
    let env = knative_env(up.port);
    (guard, up, env)
}

fn summary(a: &Answer) -> (u16, String, BTreeMap<String, String>) {
    (a.status, a.text(), a.key_headers())
}

#[test]
fn probe_matrix() {
    let (_g, up, mut env) = oracle_case();
    env.insert(
        "SERVING_READINESS_PROBE".into(),
        format!(
            r#"{{"tcpSocket":{{"port":{},"host":"127.0.0.1"}},"successThreshold":1}}"#,
            up.port
        ),
    );
    let cases: Vec<Vec<(&str, &str)>> = vec![
        vec![
            ("user-agent", "kube-probe/1.30"),
            ("k-network-probe", "queue"),
        ],
        vec![("user-agent", "kube-probe/1.30")],
        vec![("k-kubelet-probe", "1"), ("k-network-probe", "queue")],
        vec![
            ("user-agent", "Knative-Activator-Probe"),
            ("k-network-probe", "queue"),
        ],
        vec![
            ("user-agent", "Knative-Activator-Probe/1.0"),
            ("k-network-probe", "activator"),
        ],
        vec![
            ("user-agent", "Knative-Autoscaling-Probe"),
            ("k-network-probe", "activator"),
        ],
        vec![("k-network-probe", "probe"), ("k-network-hash", "deadbeef")],
        vec![("k-network-probe", "probe")],
        // Not a health check: proxied to the user container.
        vec![("k-network-probe", "queue")],
        vec![
            ("user-agent", "Knative-Ingress-Probe"),
            ("k-network-probe", "probe"),
            ("k-network-hash", "h"),
        ],
    ];
    let (k, o) = both(&env, |p| {
        cases
            .iter()
            .map(|h| {
                let a = get(p.ports.serving, "/some/path", h);
                let (s, body, hdr) = summary(&a);
                // The echoed request differs only where the two listeners differ in
                // nature; for this matrix the status and whether it was proxied matter.
                let proxied = hdr.contains_key("x-upstream");
                let body = if proxied { String::new() } else { body };
                (
                    s,
                    body,
                    hdr.get("content-type").cloned(),
                    hdr.get("k-network-hash").cloned(),
                    proxied,
                )
            })
            .collect::<Vec<_>>()
    });
    assert_same("probe matrix", &k, &o);
    assert_eq!(o[0].0, 200);
    assert_eq!(o[0].1, "queue");
    assert_eq!(o[5].0, 400, "the autoscaler's activator probe must get 400");

    // A failing readiness probe (nothing listens on the probed port).
    // Nothing listens on a free port.
    let closed = free_port();
    env.insert(
        "SERVING_READINESS_PROBE".into(),
        format!(r#"{{"tcpSocket":{{"port":{closed},"host":"127.0.0.1"}},"periodSeconds":1,"timeoutSeconds":1}}"#),
    );
    let (k, o) = both(&env, |p| {
        summary(&get(
            p.ports.serving,
            "/",
            &[
                ("user-agent", "kube-probe/1.30"),
                ("k-network-probe", "queue"),
            ],
        ))
    });
    assert_same("failing readiness probe", &k, &o);
    assert_eq!(o.0, 503);

    // An HTTP probe without a scheme fails in Knative (the controller always sets one).
    env.insert(
        "SERVING_READINESS_PROBE".into(),
        format!(
            r#"{{"httpGet":{{"port":{},"host":"127.0.0.1","path":"/healthz"}},"periodSeconds":1,"timeoutSeconds":1}}"#,
            up.port
        ),
    );
    let (k, o) = both(&env, |p| {
        summary(&get(
            p.ports.serving,
            "/",
            &[
                ("user-agent", "kube-probe/1.30"),
                ("k-network-probe", "queue"),
            ],
        ))
    });
    assert_same("http probe without scheme", &k, &o);

    // HTTP readiness probe against the upstream's /healthz, ready then not.
    env.insert(
        "SERVING_READINESS_PROBE".into(),
        format!(
            r#"{{"httpGet":{{"port":{},"host":"127.0.0.1","path":"/healthz","scheme":"HTTP","httpHeaders":[{{"name":"x-probe","value":"1"}}]}},"periodSeconds":1,"timeoutSeconds":1}}"#,
            up.port
        ),
    );
    let (k, o) = both(&env, |p| {
        let probe = [
            ("user-agent", "kube-probe/1.30"),
            ("k-network-probe", "queue"),
        ];
        up.ready.store(true, std::sync::atomic::Ordering::SeqCst);
        let a = summary(&get(p.ports.serving, "/", &probe));
        up.ready.store(false, std::sync::atomic::Ordering::SeqCst);
        let b = summary(&get(p.ports.serving, "/", &probe));
        up.ready.store(true, std::sync::atomic::Ordering::SeqCst);
        (a, b)
    });
    assert_same("http readiness probe", &k, &o);
    assert_eq!((o.0.0, o.1.0), (200, 503));
}

#[test]
fn proxied_request_headers() {
    let (_g, _up, env) = oracle_case();
    let headers = [
        ("host", "hello.default.example.com"),
        ("user-agent", "diff-test"),
        ("x-forwarded-for", "10.1.2.3, ::1"),
        ("x-forwarded-proto", "https"),
        ("knative-serving-revision", "hello-00001"),
        ("knative-serving-namespace", "default"),
        ("connection", "x-hop"),
        ("x-hop", "1"),
        ("k-proxy-request", "activator"),
        (
            "traceparent",
            "00-0af7651916cd43dd8448eb211c80319c-b7ad6b7169203331-01",
        ),
    ];
    let (k, o) = both(&env, |p| {
        let a = get(p.ports.serving, "/echo?x=1", &headers);
        let mut echoed: serde_json::Value = serde_json::from_slice(&a.body).expect("echo json");
        // Knative's server adds its OTel instrumentation; its outgoing request carries a new
        // `traceparent` span id (and `tracestate`/`baggage` when set). Ours propagates the
        // incoming trace context unchanged (no tracing backend), so only its presence is
        // compared.
        if let Some(h) = echoed["headers"].as_object_mut() {
            for t in ["traceparent"] {
                if h.contains_key(t) {
                    h.insert(t.into(), serde_json::json!(["<present>"]));
                }
            }
            // Go's transport always sends `Accept-Encoding: gzip`? No: Knative disables
            // compression. Any difference here is real and must show.
        }
        (a.status, a.key_headers(), echoed)
    });
    assert_same("proxied request", &k, &o);

    // K-Original-Host replaces Host and is removed.
    let (k, o) = both(&env, |p| {
        let a = get(
            p.ports.serving,
            "/",
            &[
                ("host", "internal"),
                ("k-original-host", "original.example.com"),
            ],
        );
        let v: serde_json::Value = serde_json::from_slice(&a.body).expect("json");
        (
            v["headers"]["host"].clone(),
            v["headers"]["k-original-host"].clone(),
        )
    });
    assert_same("K-Original-Host", &k, &o);

    assert_eq!(o.0, serde_json::json!(["original.example.com"]));
    // Many headers (Go limits header bytes, hyper by default 100 headers).
    let (k, o) = both(&env, |p| {
        let names: Vec<String> = (0..150).map(|i| format!("x-h{i}")).collect();
        let hs: Vec<(&str, &str)> = names.iter().map(|n| (n.as_str(), "v")).collect();
        let a = get(p.ports.serving, "/echo", &hs);
        let v: serde_json::Value = serde_json::from_slice(&a.body).unwrap_or_default();
        (a.status, v["headers"].as_object().map(|m| m.len()))
    });
    assert_same("150 request headers", &k, &o);
    assert_eq!(o.0, 200);
    // Request bodies pass through, over HTTP/1.1 and h2c.
    let (k, o) = both(&env, |p| {
        let port = p.ports.serving;
        runtime().block_on(async move {
            let mut out = Vec::new();
            for h2 in [false, true] {
                let a = send_body(
                    port,
                    "POST",
                    "/echo",
                    &[("content-type", "text/plain")],
                    h2,
                    bytes::Bytes::from_static(b"payload"),
                )
                .await
                .expect("answer");
                let v: serde_json::Value = serde_json::from_slice(&a.body).expect("json");
                out.push((a.status, v["body"].clone(), v["method"].clone()));
            }
            out
        })
    });
    assert_same("request bodies", &k, &o);
    assert_eq!(o[0].1, serde_json::json!("payload"));
}

#[test]
fn upstream_errors() {
    let (_g, _up, env) = oracle_case();
    // Nothing listens on a free port.
    let mut refused = env.clone();
    refused.insert("USER_PORT".into(), free_port().to_string());
    let (k, o) = both(&refused, |p| summary(&get(p.ports.serving, "/", &[])));
    assert_same("502 on refused connection", &k, &o);
    assert_eq!(o.0, 502);
    let (k, o) = both(&env, |p| {
        [404u16, 500, 503]
            .iter()
            .map(|c| summary(&get(p.ports.serving, &format!("/status?code={c}"), &[])))
            .collect::<Vec<_>>()
    });
    assert_same("upstream statuses pass through", &k, &o);

    let (k, o) = both(&env, |p| {
        let hop = get(p.ports.serving, "/hop", &[]);
        let mut hop_headers: Vec<String> = hop
            .headers
            .keys()
            .filter(|h| *h != "date")
            .cloned()
            .collect();
        hop_headers.sort();
        let head = runtime()
            .block_on(send(p.ports.serving, "HEAD", "/echo", &[], false))
            .expect("answer");
        (hop.status, hop_headers, head.status, head.body.len())
    });
    assert_same("hop-by-hop response headers, HEAD", &k, &o);
}

#[test]
fn breaker_overflow() {
    let (_g, _up, mut env) = oracle_case();
    env.insert("CONTAINER_CONCURRENCY".into(), "1".into());
    let (k, o) = both(&env, |p| {
        let port = p.ports.serving;
        let rt = runtime();
        rt.block_on(async move {
            // 1 active + 10 queued are admitted; the 12th is refused at once.
            let mut hs = Vec::new();
            for _ in 0..11 {
                hs.push(tokio::spawn(send(port, "GET", "/sleep?ms=150", &[], false)));
            }
            tokio::time::sleep(Duration::from_millis(100)).await;
            let over = send(port, "GET", "/sleep?ms=150", &[], false)
                .await
                .expect("answer");
            // `K-Kubelet-Probe` requests skip the breaker (and the accounting).
            let kubelet = send(port, "GET", "/echo", &[("k-kubelet-probe", "1")], false)
                .await
                .expect("answer")
                .status;
            let mut ok = 0;
            for h in hs {
                if h.await.expect("join").expect("answer").status == 200 {
                    ok += 1;
                }
            }
            (ok, summary(&over), kubelet)
        })
    });
    assert_same("breaker overflow", &k, &o);
    assert_eq!(o.2, 200);
    assert_eq!(o.0, 11);
    assert_eq!(o.1.0, 503);
    assert_eq!(o.1.1, "pending request queue full\n");
}

#[test]
fn timeouts() {
    // Total timeout before the response starts, and after it started (cut with the message).
    let (_g, up, mut env) = oracle_case();
    env.insert("REVISION_TIMEOUT_SECONDS".into(), "1".into());
    let (k, o) = both(&env, |p| {
        (
            summary(&get(p.ports.serving, "/sleep?ms=2500", &[])),
            summary(&get(p.ports.serving, "/stream?n=5&ms=400", &[])).1,
        )
    });
    assert_same("total timeout", &k, &o);
    assert_eq!(o.0.0, 504);
    assert_eq!(o.0.1, "request timeout");
    assert_eq!(o.1, "chunk0\nchunk1\nchunk2\nrequest timeout");

    // Response-start timeout: only before the first byte.
    let mut env = knative_env(up.port);
    env.insert("REVISION_RESPONSE_START_TIMEOUT_SECONDS".into(), "1".into());
    let (k, o) = both(&env, |p| {
        (
            summary(&get(p.ports.serving, "/sleep?ms=2500", &[])).0,
            summary(&get(p.ports.serving, "/stream?n=3&ms=600", &[])),
        )
    });
    assert_same("response start timeout", &k, &o);
    assert_eq!(o.0, 504);
    assert_eq!(o.1.1, "chunk0\nchunk1\nchunk2\n");

    // Idle timeout: from the start, then from the last write.
    let mut env = knative_env(up.port);
    env.insert("REVISION_IDLE_TIMEOUT_SECONDS".into(), "1".into());
    let (k, o) = both(&env, |p| {
        (
            summary(&get(p.ports.serving, "/sleep?ms=2500", &[])).0,
            summary(&get(p.ports.serving, "/stream?n=3&ms=1600", &[])).1,
            summary(&get(p.ports.serving, "/stream?n=3&ms=300", &[])).1,
        )
    });
    assert_same("idle timeout", &k, &o);
    assert_eq!(o.0, 504);
    assert_eq!(o.1, "chunk0\nrequest timeout");
}

/// Closes autoscaler windows by scraping often enough to see each one.
fn collect_windows(port: u16, for_how_long: Duration) -> Vec<Stat> {
    let mut out: Vec<Stat> = Vec::new();
    let end = Instant::now() + for_how_long;
    while Instant::now() < end {
        let (_, s) = scrape(port);
        if out
            .last()
            .is_none_or(|l| (l.process_uptime - s.process_uptime).abs() > 0.5)
        {
            out.push(s);
        }
        std::thread::sleep(Duration::from_millis(150));
    }
    out
}

#[test]
fn autoscaler_stats_and_proxied_accounting() {
    let (_g, _up, env) = oracle_case();
    let (k, o) = both(&env, |p| {
        // Before the first window closes: only pod_name.
        let (first_answer, first) = scrape(p.ports.stats);
        let early = first.process_uptime == 0.0;
        let port = p.ports.serving;
        let rt = runtime();
        let statuses = rt.block_on(async move {
            let mut hs = Vec::new();
            for i in 0..5 {
                let h: &'static [(&'static str, &'static str)] = if i < 3 {
                    &[("k-proxy-request", "activator")]
                } else {
                    &[]
                };
                hs.push(tokio::spawn(send(port, "GET", "/sleep?ms=500", h, false)));
            }
            // Probes are not counted.
            let _ = send(
                port,
                "GET",
                "/",
                &[
                    ("user-agent", "kube-probe/1.30"),
                    ("k-network-probe", "queue"),
                ],
                false,
            )
            .await;
            let mut st = Vec::new();
            for h in hs {
                st.push(h.await.expect("join").expect("answer").status);
            }
            st
        });
        let windows = collect_windows(p.ports.stats, Duration::from_millis(2600));
        let sum = |f: fn(&Stat) -> f64| windows.iter().map(f).sum::<f64>();
        let round = |x: f64| (x * 10.0).round() / 10.0;
        let other = get(p.ports.stats, "/other", &[]).status;
        (
            early.then(|| first.clone()),
            first_answer.headers.get("content-type").cloned(),
            statuses,
            sum(|s| s.request_count),
            sum(|s| s.proxied_request_count),
            round(sum(|s| s.average_concurrent_requests)),
            round(sum(|s| s.average_proxied_concurrent_requests)),
            windows
                .iter()
                .all(|s| s.pod_name == "hello-00001-deployment-5d8f7c-abcde" && s.timestamp == 0),
            other,
        )
    });
    // Whether the very first scrape came before Knative's first tick depends on its start-up
    // time; only compare when both saw it.
    let (mut k, mut o) = (k, o);
    if k.0.is_none() || o.0.is_none() {
        k.0 = None;
        o.0 = None;
    }
    // Knative's time-weighted averages move with where its 1 s ticks fall (2.5 to 3.0 were
    // seen for these 5 x 0.5 s on a loaded machine); ours are closed from exact timestamps.
    // Compare them within half a request, the rest exactly.
    for (what, kv, ov) in [
        ("average concurrency", &mut k.5, &mut o.5),
        ("average proxied concurrency", &mut k.6, &mut o.6),
    ] {
        assert!((*kv - *ov).abs() <= 0.5, "{what}: Knative {kv}, ours {ov}");
        *kv = 0.0;
        *ov = 0.0;
    }
    assert_same("autoscaler stats", &k, &o);
    assert_eq!(o.1.as_deref(), Some("application/protobuf"));
    assert_eq!((o.3, o.4), (5.0, 3.0));
    assert_eq!(o.8, 404);
}

#[test]
fn h2c_streaming_and_websocket() {
    let (_g, up, env) = oracle_case();
    let release = up.release.clone();
    let (k, o) = both(&env, |p| {
        let port = p.ports.serving;
        let rt = runtime();
        let release = release.clone();
        rt.block_on(async move {
            // h2c with prior knowledge on the serving port, proxied as h2c.
            let h2 = send(port, "GET", "/echo?q=1", &[("x-test", "1"), ("k-original-host", "orig.example")], true).await.expect("h2c answer");
            let v: serde_json::Value = serde_json::from_slice(&h2.body).expect("json");
            let h2_seen = (h2.status, h2.key_headers(), v);

            // Streaming: the first chunk must arrive while the upstream still holds the rest.
            use http_body_util::BodyExt;
            let stream = tokio::net::TcpStream::connect(("127.0.0.1", port)).await.expect("connect");
            let (mut s, c) = hyper::client::conn::http1::handshake(hyper_util::rt::TokioIo::new(stream))
                .await
                .expect("handshake");
            tokio::spawn(c);
            let req = http::Request::builder()
                .uri("/stream?n=2&ms=0&hold=1")
                .header("host", "x")
                .body(http_body_util::Empty::<bytes::Bytes>::new())
                .expect("req");
            let res = s.send_request(req).await.expect("response");
            let mut body = res.into_body();
            let first = tokio::time::timeout(Duration::from_secs(5), body.frame())
                .await
                .ok()
                .flatten()
                .and_then(|f| f.ok())
                .and_then(|f| f.into_data().ok());
            release.notify_one();
            let rest = body.collect().await.map(|c| c.to_bytes()).unwrap_or_default();
            let streamed = (first, rest);

            // Websocket upgrade passed through, bytes spliced both ways.
            use tokio::io::{AsyncReadExt, AsyncWriteExt};
            let mut ws = tokio::net::TcpStream::connect(("127.0.0.1", port)).await.expect("connect");
            ws.write_all(b"GET /ws HTTP/1.1\r\nHost: x\r\nConnection: Upgrade\r\nUpgrade: websocket\r\nSec-WebSocket-Version: 13\r\nSec-WebSocket-Key: dGhlIHNhbXBsZSBub25jZQ==\r\n\r\n")
                .await
                .expect("write");
            let mut buf = vec![0u8; 1024];
            let mut head = Vec::new();
            while !head.windows(4).any(|w| w == b"\r\n\r\n") {
                let n = ws.read(&mut buf).await.expect("read");
                if n == 0 {
                    break;
                }
                head.extend_from_slice(&buf[..n]);
            }
            let status_line = String::from_utf8_lossy(&head).lines().next().unwrap_or("").to_owned();
            ws.write_all(b"ping").await.expect("write");
            let mut echo = [0u8; 4];
            let echoed = tokio::time::timeout(Duration::from_secs(5), ws.read_exact(&mut echo))
                .await
                .is_ok_and(|r| r.is_ok());
            (h2_seen, streamed, status_line, echoed.then_some(echo))
        })
    });
    assert_same("h2c, streaming, websocket", &k, &o);
    assert_eq!(o.1.0.as_deref(), Some(&b"chunk0\n"[..]));
    assert_eq!(o.2, "HTTP/1.1 101 Switching Protocols");
    assert_eq!(o.3, Some(*b"ping"));
}

#[test]
fn wait_for_drain_without_sigterm_resets() {
    let (_g, _up, env) = oracle_case();
    let (k, o) = both(&env, |p| {
        let (admin, serving) = (p.ports.admin, p.ports.serving);
        let probe = [
            ("user-agent", "kube-probe/1.30"),
            ("k-network-probe", "queue"),
        ];
        let waiter = std::thread::spawn(move || get(admin, "/wait-for-drain", &[]).status);
        std::thread::sleep(Duration::from_millis(300));
        let during = summary(&get(serving, "/", &probe));
        let returned = waiter.join().expect("join");
        std::thread::sleep(Duration::from_millis(100));
        let after = summary(&get(serving, "/", &probe));
        let other = get(admin, "/other", &[]).status;
        (returned, during, after, other)
    });
    assert_same("/wait-for-drain without SIGTERM", &k, &o);
    assert_eq!(o.0, 200);
    assert_eq!(o.1.0, 503);
    assert_eq!(o.1.1, "shutting down\n");
    assert_eq!(o.2.0, 200);
}

#[test]
fn sigterm_drain() {
    let (_g, _up, env) = oracle_case();
    // The drain lasts Knative's 30 s quiet period, so both run at once: ours on other ports.
    let mut env_ours = env.clone();
    env_ours.insert("QUEUE_SERVING_PORT".into(), free_port().to_string());
    let mut procs = [
        start(Impl::Knative, &env, None),
        start(Impl::Ours, &env_ours, None),
    ];
    let t0 = Instant::now();
    let waiters: Vec<_> = procs
        .iter()
        .map(|p| {
            let admin = p.ports.admin;
            std::thread::spawn(move || {
                let s = get(admin, "/wait-for-drain", &[]).status;
                (s, t0.elapsed())
            })
        })
        .collect();
    std::thread::sleep(Duration::from_millis(200));
    for p in &procs {
        p.sigterm();
    }
    std::thread::sleep(Duration::from_millis(300));
    let probe = [
        ("user-agent", "kube-probe/1.30"),
        ("k-network-probe", "queue"),
    ];
    let observed: Vec<_> = procs
        .iter()
        .map(|p| {
            (
                summary(&get(p.ports.serving, "/", &probe)),
                summary(&get(
                    p.ports.serving,
                    "/",
                    &[("k-network-probe", "probe"), ("k-network-hash", "x")],
                )),
                get(p.ports.serving, "/sleep?ms=10", &[]).status,
            )
        })
        .collect();
    let last_request = Instant::now();
    let exits: Vec<_> = procs
        .iter_mut()
        .map(|p| (p.wait_exit(Duration::from_secs(45)), last_request.elapsed()))
        .collect();
    let waits: Vec<_> = waiters
        .into_iter()
        .map(|w| w.join().expect("join"))
        .collect();
    assert_same("probes while draining", &observed[0], &observed[1]);
    assert_eq!(observed[1].0.0, 503);
    assert_eq!(
        observed[1].2, 200,
        "requests are still served while draining"
    );
    assert_eq!(exits[0].0, Some(0));
    assert_eq!(exits[1].0, Some(0));
    assert_eq!(waits[0].0, 200);
    assert_eq!(waits[1].0, 200);
    // Both wait out the quiet period counted from the last request (a lower bound, not a
    // performance figure).
    for (i, (_, took)) in exits.iter().enumerate() {
        assert!(
            took.as_secs_f64() >= 29.0,
            "instance {i} exited after {took:?}"
        );
    }
    eprintln!(
        "drain: exit after last request knative {:?} ours {:?}; /wait-for-drain returned knative {:?} ours {:?}",
        exits[0].1, exits[1].1, waits[0].1, waits[1].1
    );
}

#[test]
fn configuration_errors() {
    require_oracle!();
    let _g = port_lock();
    let mut env = knative_env(8080);
    env.remove("SERVING_POD");
    let run = |bin: &str| {
        std::process::Command::new(bin)
            .env_clear()
            .envs(&env)
            .stdout(std::process::Stdio::null())
            .output()
            .expect("run")
    };
    let k = run(KNATIVE_QUEUE);
    let o = run(OURS);
    // Kept difference: Knative exits 1 on a missing variable; the issue asks for 64
    // (EX_USAGE), which tells a configuration error from a crash.
    assert_eq!(k.status.code(), Some(1));
    assert_eq!(o.status.code(), Some(64));
    let (ke, oe) = (
        String::from_utf8_lossy(&k.stderr),
        String::from_utf8_lossy(&o.stderr),
    );
    assert!(
        ke.contains("required key SERVING_POD missing value"),
        "{ke}"
    );
    assert!(
        oe.contains("required key SERVING_POD missing value"),
        "{oe}"
    );
}

#[test]
fn readiness_variants() {
    let (_g, up, _) = oracle_case();
    let probe = [
        ("user-agent", "kube-probe/1.30"),
        ("k-network-probe", "queue"),
    ];
    // Nothing listens on a free port.
    let closed = free_port();
    let mut cases: Vec<(&str, bool, String, (u16, u16))> = vec![
        (
            "grpc serving",
            false,
            format!(
                r#"{{"grpc":{{"port":{}}},"periodSeconds":1,"timeoutSeconds":1}}"#,
                up.port
            ),
            (200, 503),
        ),
        (
            "multi-container, all pass",
            true,
            format!(
                r#"[{{"tcpSocket":{{"port":{p},"host":"127.0.0.1"}},"periodSeconds":1,"timeoutSeconds":1}},{{"httpGet":{{"port":{p},"host":"127.0.0.1","path":"/healthz","scheme":"HTTP"}},"periodSeconds":1,"timeoutSeconds":1}}]"#,
                p = up.port
            ),
            (200, 503),
        ),
        (
            "multi-container, one fails",
            true,
            format!(
                r#"[{{"tcpSocket":{{"port":{p},"host":"127.0.0.1"}},"periodSeconds":1,"timeoutSeconds":1}},{{"tcpSocket":{{"port":{closed},"host":"127.0.0.1"}},"periodSeconds":1,"timeoutSeconds":1}}]"#,
                p = up.port
            ),
            (503, 503),
        ),
        (
            "exec probe",
            false,
            r#"{"exec":{"command":["true"]},"periodSeconds":1}"#.to_owned(),
            (503, 503),
        ),
    ];
    for (what, multi, json, expect) in cases.drain(..) {
        let mut env = knative_env(up.port);
        env.insert("SERVING_READINESS_PROBE".into(), json);
        env.insert("ENABLE_MULTI_CONTAINER_PROBES".into(), multi.to_string());
        let (k, o) = both(&env, |p| {
            let a = summary(&get(p.ports.serving, "/", &probe));
            up.ready.store(false, std::sync::atomic::Ordering::SeqCst);
            let b = summary(&get(p.ports.serving, "/", &probe));
            up.ready.store(true, std::sync::atomic::Ordering::SeqCst);
            (a, b)
        });
        assert_same(what, &k, &o);
        assert_eq!((o.0.0, o.1.0), expect, "{what}");
    }

    // Aggressive mode (periodSeconds 0): the probe retries until the container listens, and
    // concurrent probes share the one in flight.
    // Not an ephemeral port: no connection can take it before the listener binds it.
    let late = free_port();
    let mut env = knative_env(up.port);
    env.insert(
        "SERVING_READINESS_PROBE".into(),
        format!(r#"{{"tcpSocket":{{"port":{late},"host":"127.0.0.1"}},"successThreshold":1}}"#),
    );
    let (k, o) = both(&env, |p| {
        let serving = p.ports.serving;
        let probes: Vec<_> = (0..3)
            .map(|_| std::thread::spawn(move || get(serving, "/", &probe).status))
            .collect();
        std::thread::sleep(Duration::from_millis(400));
        let listener = std::net::TcpListener::bind(("127.0.0.1", late)).expect("bind late");
        let statuses: Vec<u16> = probes
            .into_iter()
            .map(|h| h.join().expect("join"))
            .collect();
        drop(listener);
        statuses
    });
    assert_same("aggressive probe waits for the container", &k, &o);
    assert_eq!(o, vec![200, 200, 200]);
}

#[test]
fn queued_request_times_out() {
    let (_g, _up, mut env) = oracle_case();
    env.insert("CONTAINER_CONCURRENCY".into(), "1".into());
    env.insert("REVISION_TIMEOUT_SECONDS".into(), "1".into());
    let (k, o) = both(&env, |p| {
        let port = p.ports.serving;
        runtime().block_on(async move {
            let first = tokio::spawn(send(port, "GET", "/sleep?ms=700", &[], false));
            tokio::time::sleep(Duration::from_millis(100)).await;
            // Waits in the queue for the slot, then has too little time left.
            let second = send(port, "GET", "/sleep?ms=700", &[], false)
                .await
                .expect("answer");
            let first = first.await.expect("join").expect("answer");
            (summary(&first), summary(&second))
        })
    });
    assert_same("queued request and the revision timeout", &k, &o);
    assert_eq!((o.0.0, o.1.0), (200, 504));
}

/// Knative also exports otelhttp and Go runtime series; the contract's two instruments
/// are compared.
fn kn_series(metrics: &str) -> Vec<String> {
    let mut series: Vec<String> = metrics
        .lines()
        .filter(|l| {
            l.starts_with("kn_serving_invocation_duration_seconds_count")
                || l.starts_with("kn_serving_queue_depth")
                || l.starts_with("# TYPE kn_serving")
        })
        .map(str::to_owned)
        .collect();
    series.sort();
    series
}

/// Without request logs, ordinary requests take our fast path (src/fast.rs): its request
/// metrics, pipelined requests and `Connection: close` against Knative's.
#[test]
fn fast_path_metrics_and_pipelining() {
    let (_g, _up, mut env) = oracle_case();
    env.insert("CONTAINER_CONCURRENCY".into(), "2".into());
    env.insert(
        "OBSERVABILITY_CONFIG".into(),
        r#"{"requestMetrics":{"protocol":"prometheus"}}"#.into(),
    );
    let (k, o) = both(&env, |p| {
        let port_open = (0..50).any(|_| {
            let ok = std::net::TcpStream::connect(("127.0.0.1", 9091)).is_ok();
            if !ok {
                std::thread::sleep(Duration::from_millis(20));
            }
            ok
        });
        let a = summary(&get(p.ports.serving, "/status?code=404", &[]));
        let b = summary(&get(p.ports.serving, "/sleep?ms=1", &[]));
        // Two requests in one write; the second closes the connection.
        let pipelined = raw_answers(
            p.ports.serving,
            b"GET /status?code=500 HTTP/1.1\r\nHost: a\r\n\r\nPOST /echo HTTP/1.1\r\nHost: b\r\nContent-Length: 2\r\nConnection: close\r\n\r\nhi",
        );
        std::thread::sleep(Duration::from_millis(200));
        let series = kn_series(&get(9091, "/metrics", &[]).text());
        (port_open, a, b, pipelined, series)
    });
    assert_same("fast path: metrics, pipelining, Connection: close", &k, &o);
    assert_eq!(
        o.3.0,
        vec!["HTTP/1.1 500 Internal Server Error", "HTTP/1.1 200 OK"]
    );
    assert!(o.3.1.contains("\"body\":\"hi\""), "{}", o.3.1);
    assert!(
        o.4.iter()
            .any(|l| l.contains("http_response_status_code=\"500\"")),
        "{:?}",
        o.4
    );
}

/// The status lines of every answer on one connection (which must close), and the text
/// after the last head.
fn raw_answers(port: u16, raw: &[u8]) -> (Vec<String>, String) {
    let text = raw_text(port, raw);
    // A body need not end with a newline: status lines are found anywhere.
    let statuses = text
        .match_indices("HTTP/1.1 ")
        .filter_map(|(i, _)| text[i..].split("\r\n").next())
        .map(str::to_owned)
        .collect();
    let last = text.rsplit("\r\n\r\n").next().unwrap_or("").to_owned();
    (statuses, last)
}

#[test]
fn request_metrics_and_logs() {
    let (_g, _up, mut env) = oracle_case();
    env.insert("CONTAINER_CONCURRENCY".into(), "2".into());
    env.insert(
        "OBSERVABILITY_CONFIG".into(),
        r#"{"requestMetrics":{"protocol":"prometheus"},"enableRequestLog":true}"#.into(),
    );
    let mut results = Vec::new();
    for which in [Impl::Knative, Impl::Ours] {
        let mut p = start_opts(which, &env, None, true);
        // 9091 opens with the prometheus protocol (a port Knative's cannot be moved from).
        let port_open = (0..50).any(|_| {
            let ok = std::net::TcpStream::connect(("127.0.0.1", 9091)).is_ok();
            if !ok {
                std::thread::sleep(Duration::from_millis(20));
            }
            ok
        });
        get(p.ports.serving, "/a", &[("user-agent", "diff-test")]);
        get(
            p.ports.serving,
            "/status?code=404",
            &[("user-agent", "diff-test")],
        );
        get(
            p.ports.serving,
            "/",
            &[
                ("user-agent", "kube-probe/1.30"),
                ("k-network-probe", "queue"),
            ],
        );
        std::thread::sleep(Duration::from_millis(200));
        let m = get(9091, "/metrics", &[]);
        let text = m.text();
        let series = kn_series(&text);
        let target: Vec<String> = text
            .lines()
            .find(|l| l.starts_with("target_info{"))
            .map(|l| {
                l.trim_start_matches("target_info{")
                    .split(',')
                    // The SDK's own identity differs by nature.
                    .filter(|kv| !kv.starts_with("telemetry_sdk_"))
                    .map(str::to_owned)
                    .collect()
            })
            .unwrap_or_default();
        let logs: Vec<serde_json::Value> = p
            .stdout()
            .lines()
            .filter_map(|l| serde_json::from_str::<serde_json::Value>(l).ok())
            .map(|mut v| {
                // Per-request values.
                for k in ["latency", "remoteIp"] {
                    v["httpRequest"][k] = serde_json::Value::Null;
                }
                v
            })
            .collect();
        results.push((
            port_open,
            m.headers.get("content-type").cloned(),
            series,
            target,
            logs,
        ));
    }
    let o = results.pop().expect("ours");
    let k = results.pop().expect("knative");
    assert_same("request metrics and logs", &k, &o);
    assert!(o.0);
    assert!(
        o.2.iter()
            .any(|l| l.contains("http_response_status_code=\"404\"")),
        "{:?}",
        o.2
    );
    assert!(
        o.2.iter().any(|l| l.starts_with("kn_serving_queue_depth")),
        "{:?}",
        o.2
    );
    assert!(
        o.3.iter()
            .any(|kv| kv == "kn_revision_name=\"hello-00001\""),
        "{:?}",
        o.3
    );
    assert_eq!(o.4.len(), 2, "one log line per request, probes left out");
}

#[test]
fn open_websocket_counts_as_in_flight() {
    let (_g, _up, env) = oracle_case();
    let (k, o) = both(&env, |p| {
        let (port, stats) = (p.ports.serving, p.ports.stats);
        let rt = runtime();
        let ws = rt.block_on(async move {
            use tokio::io::{AsyncReadExt, AsyncWriteExt};
            let mut ws = tokio::net::TcpStream::connect(("127.0.0.1", port))
                .await
                .expect("connect");
            ws.write_all(
                b"GET /ws HTTP/1.1\r\nHost: x\r\nConnection: Upgrade\r\nUpgrade: websocket\r\n\r\n",
            )
            .await
            .expect("write");
            let mut buf = [0u8; 512];
            let _ = ws.read(&mut buf).await;
            ws
        });
        // Whole windows with the websocket open report concurrency 1.
        let windows = collect_windows(stats, Duration::from_millis(2600));
        drop(ws);
        let max = windows
            .iter()
            .map(|s| (s.average_concurrent_requests * 10.0).round() / 10.0)
            .fold(0.0, f64::max);
        let arrivals: f64 = windows.iter().map(|s| s.request_count).sum();
        (max, arrivals)
    });
    assert_same("open websocket in the autoscaler's concurrency", &k, &o);
    assert_eq!(o.0, 1.0);
}

#[test]
fn grpc_through_h2c() {
    let (_g, _up, env) = oracle_case();
    let (k, o) = both(&env, |p| {
        let port = p.ports.serving;
        runtime().block_on(async move {
            let a = send_body(
                port,
                "POST",
                "/grpc.health.v1.Health/Check",
                &[("content-type", "application/grpc"), ("te", "trailers")],
                true,
                bytes::Bytes::from_static(&[0, 0, 0, 0, 0]),
            )
            .await
            .expect("answer");
            (a.status, a.key_headers(), a.body.to_vec(), a.trailers)
        })
    });
    assert_same("gRPC over h2c with trailers", &k, &o);
    assert_eq!(o.3.get("grpc-status").map(String::as_str), Some("0"));
}

#[test]
fn revision_timeout_ends_websockets() {
    let (_g, _up, mut env) = oracle_case();
    env.insert("REVISION_TIMEOUT_SECONDS".into(), "1".into());
    let (k, o) = both(&env, |p| {
        let port = p.ports.serving;
        runtime().block_on(async move {
            use tokio::io::{AsyncReadExt, AsyncWriteExt};
            let mut ws = tokio::net::TcpStream::connect(("127.0.0.1", port))
                .await
                .expect("connect");
            ws.write_all(
                b"GET /ws HTTP/1.1\r\nHost: x\r\nConnection: Upgrade\r\nUpgrade: websocket\r\n\r\n",
            )
            .await
            .expect("write");
            let mut buf = [0u8; 512];
            let _ = ws.read(&mut buf).await;
            ws.write_all(b"ping").await.expect("write");
            let mut echo = [0u8; 4];
            let before = ws.read_exact(&mut echo).await.is_ok();
            tokio::time::sleep(Duration::from_millis(1500)).await;
            let _ = ws.write_all(b"pong").await;
            let after = tokio::time::timeout(Duration::from_secs(5), ws.read(&mut buf))
                .await
                .map(|r| r.map(|n| n > 0).unwrap_or(false))
                .unwrap_or(true);
            (before, after)
        })
    });
    assert_same("websocket cut at the revision timeout", &k, &o);
    assert_eq!(o, (true, false));
}

/// Sends `raw` on a fresh connection and returns the status and the echoed request.
fn raw_exchange(port: u16, raw: &[u8]) -> (String, serde_json::Value) {
    let text = raw_text(port, raw);
    let status = text.lines().next().unwrap_or("").to_owned();
    let body = text.split_once("\r\n\r\n").map(|(_, b)| b).unwrap_or("");
    let v = serde_json::from_str(body).unwrap_or(serde_json::Value::Null);
    (status, v)
}

/// Sends `raw` on a fresh connection and returns all that comes back until the connection
/// closes (or 5 s pass).
fn raw_text(port: u16, raw: &[u8]) -> String {
    let raw = raw.to_vec();
    runtime().block_on(async move {
        use tokio::io::{AsyncReadExt, AsyncWriteExt};
        let mut s = tokio::net::TcpStream::connect(("127.0.0.1", port))
            .await
            .expect("connect");
        s.write_all(&raw).await.expect("write");
        let mut out = Vec::new();
        let _ = tokio::time::timeout(Duration::from_secs(5), s.read_to_end(&mut out)).await;
        String::from_utf8_lossy(&out).into_owned()
    })
}

#[test]
fn http10_and_absolute_form() {
    let (_g, _up, env) = oracle_case();
    let (k, o) = both(&env, |p| {
        let a = raw_exchange(
            p.ports.serving,
            b"GET /echo HTTP/1.0\r\nHost: h10.example\r\n\r\n",
        );
        let b = raw_exchange(
            p.ports.serving,
            b"GET http://abs.example/echo?x=1 HTTP/1.1\r\nHost: other.example\r\nConnection: close\r\n\r\n",
        );
        let pick = |v: &serde_json::Value| {
            (
                v["uri"].clone(),
                v["headers"]["host"].clone(),
                v["version"].clone(),
            )
        };
        ((a.0, pick(&a.1)), (b.0, pick(&b.1)))
    });
    assert_same("HTTP/1.0 and absolute-form requests", &k, &o);
}

#[test]
fn malformed_requests() {
    let (_g, _up, env) = oracle_case();
    let (k, o) = both(&env, |p| {
        [
            &b"GARBAGE\r\n\r\n"[..],
            b"GET / HTTP/1.1\r\n\r\n",
            b"GET /echo HTTP/1.1\r\nHost: x\r\nContent-Length: abc\r\n\r\n",
            b"GET /echo HTTP/1.1\r\nHost: x\r\nBad Header\r\n\r\n",
        ]
        .iter()
        .map(|raw| raw_exchange(p.ports.serving, raw).0)
        .collect::<Vec<_>>()
    });
    assert_same("malformed requests", &k, &o);
}

#[test]
fn large_upload_and_truncated_upstream() {
    let (_g, _up, env) = oracle_case();
    let (k, o) = both(&env, |p| {
        let port = p.ports.serving;
        runtime().block_on(async move {
            let big = bytes::Bytes::from(vec![b'a'; 3 << 20]);
            let a = send_body(port, "POST", "/echo", &[], false, big)
                .await
                .expect("answer");
            let v: serde_json::Value = serde_json::from_slice(&a.body).expect("json");
            let uploaded = v["body"].as_str().map(str::len);
            let t = send(port, "GET", "/truncate", &[], false).await;
            let truncated = t
                .map(|a| (a.status, a.body.len()))
                .map_err(|_| "connection error");
            (a.status, uploaded, truncated)
        })
    });
    assert_same("3 MiB upload, truncated upstream response", &k, &o);
}

#[test]
fn timeouts_when_the_head_waits_for_sniffing() {
    // The head counts as the response start even before Go sends it (it waits for the
    // first bytes to sniff a Content-Type).
    let (_g, up, mut env) = oracle_case();
    env.insert("REVISION_RESPONSE_START_TIMEOUT_SECONDS".into(), "1".into());
    let (k, o) = both(&env, |p| {
        summary(&get(
            p.ports.serving,
            "/stream?n=2&ms=300&delay=1500&ct=0",
            &[],
        ))
    });
    assert_same("response-start timeout, head without content type", &k, &o);
    let mut env = knative_env(up.port);
    env.insert("REVISION_IDLE_TIMEOUT_SECONDS".into(), "1".into());
    let (k, o) = both(&env, |p| {
        summary(&get(
            p.ports.serving,
            "/stream?n=2&ms=300&delay=1500&ct=0",
            &[],
        ))
    });
    assert_same("idle timeout, head without content type", &k, &o);
}

/// An answer with a Content-Encoding and no Content-Type gets no sniffed type; an empty first
/// Content-Encoding does not count (Go's server reads the first value). HTTP/1.1 and 1.0.
#[test]
fn encoded_answers_are_not_sniffed() {
    let (_g, _up, env) = oracle_case();
    let (k, o) = both(&env, |p| {
        let mut types = Vec::new();
        for path in ["/encoded", "/encoded?empty=1"] {
            let a = get(p.ports.serving, path, &[]);
            types.push((a.status, a.headers.get("content-type").cloned()));
            let raw = raw_text(
                p.ports.serving,
                format!("GET {path} HTTP/1.0\r\nHost: x\r\n\r\n").as_bytes(),
            );
            let ty = raw.lines().find_map(|l| {
                let (name, value) = l.split_once(':')?;
                name.eq_ignore_ascii_case("content-type")
                    .then(|| value.trim().to_string())
            });
            types.push((raw.get(9..12).and_then(|s| s.parse().ok()).unwrap_or(0), ty));
        }
        types
    });
    assert_same("encoded answers", &k, &o);
    assert_eq!(o[0], (200, None));
    assert_eq!(o[2], (200, Some("application/x-gzip".to_string())));
}

#[test]
fn probe_request_logs_and_custom_template() {
    let (_g, _up, mut env) = oracle_case();
    env.insert(
        "OBSERVABILITY_CONFIG".into(),
        r#"{"enableRequestLog":true,"enableProbeRequestLog":true,"requestLogTemplate":"{\"m\":\"{{.Request.Method}}\",\"u\":\"{{js .Request.RequestURI}}\",\"c\":{{.Response.Code}},\"rev\":\"{{.Revision.Name}}\",\"ns\":\"{{.Revision.Namespace}}\",\"pod\":\"{{.Revision.PodName}}\",\"ua\":\"{{js .Request.UserAgent}}\"}"}"#.into(),
    );
    let mut results = Vec::new();
    for which in [Impl::Knative, Impl::Ours] {
        let mut p = start_opts(which, &env, None, true);
        get(p.ports.serving, "/a?x='y'", &[("user-agent", "diff<test>")]);
        get(
            p.ports.serving,
            "/",
            &[
                ("user-agent", "kube-probe/1.30"),
                ("k-network-probe", "queue"),
            ],
        );
        std::thread::sleep(Duration::from_millis(200));
        let lines: Vec<String> = p.stdout().lines().map(str::to_owned).collect();
        results.push(lines);
    }
    let o = results.pop().expect("ours");
    let k = results.pop().expect("knative");
    assert_same("probe request logs with a custom template", &k, &o);
    assert_eq!(o.len(), 2);
}
