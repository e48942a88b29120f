//! Black-box tests of the source direction (MQTT -> sink) against a real mosquitto.

mod common;

use std::collections::{HashMap, HashSet};
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use common::*;

fn broker_arg(m: &Mosquitto) -> String {
    format!("mqtt://127.0.0.1:{}", m.port)
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn thousand_qos1_messages_arrive_exactly_as_sent() {
    let broker = Mosquitto::start("");
    let sink = Sink::start().await;
    let dir = TempDir::new("thousand");
    let b = broker_arg(&broker);
    let mut adaptor = Adaptor::start(
        &[
            "--broker",
            &b,
            "--topic",
            "devices/+/telemetry,ce/#",
            "--client-id",
            "thousand",
        ],
        &[
            ("K_SINK", &sink.url()),
            ("K_CE_OVERRIDES", r#"{"extensions":{"cluster":"edge1"}}"#),
        ],
        &dir.path("adaptor.log"),
    );
    assert!(
        adaptor.wait_ready(Duration::from_secs(20)),
        "not ready: {}",
        adaptor.logs()
    );

    let pubc = TestClient::connect(broker.port, "thousand-testpub").await;
    let mut msgs = Vec::new();
    for i in 0..1000 {
        msgs.push((
            format!("devices/d{}/telemetry", i % 10),
            format!("reading-{i}").into_bytes(),
        ));
    }
    // One structured CloudEvent too: its attributes must be kept.
    let ce = br#"{"specversion":"1.0","id":"ce-1","source":"/sensors/x","type":"com.example.temp","subject":"s1","datacontenttype":"application/json","data":{"c":21.5}}"#;
    msgs.push(("ce/x".into(), ce.to_vec()));
    pubc.publish_all(&msgs).await;

    assert!(
        sink.wait_for(Duration::from_secs(60), |r| body_counts(r).len() >= 1001)
            .await,
        "only {} of 1001 arrived: {}",
        body_counts(&sink.snapshot()).len(),
        adaptor.logs()
    );
    let got = sink.snapshot();
    let by_body: HashMap<Vec<u8>, &Received> = got.iter().map(|r| (r.body.to_vec(), r)).collect();
    for (topic, payload) in &msgs[..1000] {
        let r = by_body.get(payload).expect("message missing");
        assert_eq!(r.header("ce-subject").as_deref(), Some(topic.as_str()));
        assert_eq!(
            r.header("ce-type").as_deref(),
            Some("dev.spright.mqtt.message")
        );
        assert_eq!(
            r.header("ce-source"),
            Some(format!("mqtt://127.0.0.1:{}/{topic}", broker.port))
        );
        assert_eq!(r.header("ce-specversion").as_deref(), Some("1.0"));
        assert_eq!(
            r.header("content-type").as_deref(),
            Some("application/octet-stream")
        );
        assert_eq!(r.header("ce-cluster").as_deref(), Some("edge1"));
        assert!(r.header("ce-id").is_some_and(|id| id.starts_with("mqtt-")));
        assert!(r.header("ce-time").is_some());
    }
    let ids: HashSet<String> = got.iter().filter_map(|r| r.header("ce-id")).collect();
    assert_eq!(ids.len(), 1001, "ids are unique per message");
    let r = by_body
        .get(br#"{"c":21.5}"#.as_slice())
        .expect("structured CE missing");
    assert_eq!(r.header("ce-id").as_deref(), Some("ce-1"));
    assert_eq!(r.header("ce-source").as_deref(), Some("/sensors/x"));
    assert_eq!(r.header("ce-type").as_deref(), Some("com.example.temp"));
    assert_eq!(r.header("ce-subject").as_deref(), Some("s1"));
    assert_eq!(
        r.header("content-type").as_deref(),
        Some("application/json")
    );
    assert_eq!(r.header("ce-cluster").as_deref(), Some("edge1"));
    let dups = got.len() - 1001;
    eprintln!("1001 distinct events, {dups} duplicates");

    let (status, metrics) = adaptor.get("/metrics").expect("metrics");
    assert_eq!(status, 200);
    assert!(
        metrics.contains("mqtt_adaptor_events_delivered_total"),
        "{metrics}"
    );
    assert!(metrics.contains("mqtt_adaptor_sink_latency_seconds_bucket"));
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn sink_outage_loses_nothing() {
    sink_outage("1").await;
}

/// The same outage with pipelined sink connections: answers that say retry take the events
/// out of the pipeline, and they still all arrive.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn sink_outage_loses_nothing_pipelined() {
    sink_outage("4").await;
}

/// The same outage with the adaptive pipelining (the default).
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn sink_outage_loses_nothing_auto() {
    sink_outage("auto").await;
}

async fn sink_outage(pipeline: &str) {
    let broker = Mosquitto::start("");
    let sink = Sink::start().await;
    sink.status.store(503, std::sync::atomic::Ordering::Relaxed);
    let dir = TempDir::new(&format!("outage-p{pipeline}"));
    let b = broker_arg(&broker);
    let mut adaptor = Adaptor::start(
        &[
            "--broker",
            &b,
            "--topic",
            "outage/#",
            "--client-id",
            "outage",
            "--protocol-version",
            "3.1.1",
            "--retry-backoff-ms",
            "20",
            "--retry-backoff-max-ms",
            "300",
            "--inflight",
            "10",
            "--sink-pipeline",
            pipeline,
        ],
        &[("K_SINK", &sink.url())],
        &dir.path("adaptor.log"),
    );
    assert!(
        adaptor.wait_ready(Duration::from_secs(20)),
        "{}",
        adaptor.logs()
    );
    let pubc = TestClient::connect(broker.port, "outage-testpub").await;
    let msgs: Vec<_> = (0..300)
        .map(|i| (format!("outage/{}", i % 3), format!("o-{i}").into_bytes()))
        .collect();
    pubc.publish_all(&msgs).await;
    // The sink keeps failing for a while: attempts happen, nothing is accepted.
    let attempts_seen = {
        let deadline = std::time::Instant::now() + Duration::from_secs(10);
        while sink.attempts.load(std::sync::atomic::Ordering::Relaxed) < 100
            && std::time::Instant::now() < deadline
        {
            tokio::time::sleep(Duration::from_millis(50)).await;
        }
        sink.attempts.load(std::sync::atomic::Ordering::Relaxed)
    };
    tokio::time::sleep(Duration::from_secs(1)).await;
    assert_eq!(sink.count(), 0);
    // Backpressure: while the sink fails, the adaptor stops reading at 2 x --inflight waiting
    // messages (plus at most one read of 10); the rest stays with the broker.
    let (_, metrics) = adaptor.get("/metrics").expect("metrics");
    let received: u64 = metrics
        .lines()
        .find_map(|l| l.strip_prefix("mqtt_adaptor_messages_received_total "))
        .and_then(|v| v.parse().ok())
        .unwrap_or(u64::MAX);
    eprintln!("received during the outage: {received} of 300");
    assert!(
        received <= 40,
        "read {received} messages while the sink was down"
    );
    sink.status.store(202, std::sync::atomic::Ordering::Relaxed);
    assert!(
        sink.wait_for(Duration::from_secs(60), |r| body_counts(r).len() >= 300)
            .await,
        "only {} of 300 after recovery: {}",
        body_counts(&sink.snapshot()).len(),
        adaptor.logs()
    );
    let (_, metrics) = adaptor.get("/metrics").expect("metrics");
    let retried = metrics
        .lines()
        .find(|l| l.starts_with("mqtt_adaptor_events_retried_total"))
        .unwrap_or("")
        .to_owned();
    eprintln!("sink attempts during outage: {attempts_seen}; {retried}");
    assert!(!retried.ends_with(" 0"), "{retried}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn killed_and_restarted_mid_stream_loses_nothing() {
    // MQTT 5 with pipelined sink connections, 3.1.1 with one request per connection.
    for (version, pipeline) in [("5", "8"), ("3.1.1", "1")] {
        let broker = Mosquitto::start("");
        let sink = Sink::start().await;
        // A slow sink keeps messages in flight when the adaptor is killed.
        sink.delay_ms.store(5, std::sync::atomic::Ordering::Relaxed);
        let dir = TempDir::new("restart");
        let b = broker_arg(&broker);
        let client_id = format!("restart-{}", version.replace('.', ""));
        let mut adaptor = Adaptor::start(
            &[
                "--broker",
                &b,
                "--topic",
                "r/#",
                "--client-id",
                &client_id,
                "--protocol-version",
                version,
                "--inflight",
                "20",
                "--sink-pipeline",
                pipeline,
            ],
            &[("K_SINK", &sink.url())],
            &dir.path("adaptor.log"),
        );
        assert!(
            adaptor.wait_ready(Duration::from_secs(20)),
            "{}",
            adaptor.logs()
        );
        let pubc = TestClient::connect(broker.port, &format!("{client_id}-testpub")).await;
        let msgs: Vec<_> = (0..600)
            .map(|i| (format!("r/{}", i % 4), format!("r-{i}").into_bytes()))
            .collect();
        pubc.publish_all(&msgs[..300]).await;
        assert!(
            sink.wait_for(Duration::from_secs(30), |r| r.len() >= 100)
                .await,
            "{}",
            adaptor.logs()
        );
        adaptor.kill();
        let before_restart = sink.count();
        // Published while the adaptor is down: the persistent session keeps them.
        pubc.publish_all(&msgs[300..]).await;
        adaptor.restart();
        assert!(
            sink.wait_for(Duration::from_secs(60), |r| body_counts(r).len() >= 600)
                .await,
            "v{version}: only {} of 600 after restart: {}",
            body_counts(&sink.snapshot()).len(),
            adaptor.logs()
        );
        let got = sink.snapshot();
        let mut ids: HashMap<Vec<u8>, HashSet<String>> = HashMap::new();
        for r in &got {
            ids.entry(r.body.to_vec())
                .or_default()
                .insert(r.header("ce-id").unwrap_or_default());
        }
        for (topic, payload) in &msgs {
            assert!(ids.contains_key(payload), "lost {topic} {payload:?}");
        }
        assert!(
            ids.values().all(|s| s.len() == 1),
            "a redelivered message changed its id"
        );
        let dups = got.len() - 600;
        eprintln!(
            "MQTT v{version}: {} delivered before the kill, 600 distinct after restart, {dups} duplicates (same ids)",
            before_restart
        );
    }
}

#[test]
fn bad_configuration_exits_64() {
    let bin = env!("CARGO_BIN_EXE_mqtt-adaptor");
    for (args, envs) in [
        (vec!["--qos", "3"], vec![]),
        (vec!["--broker", "http://x:1"], vec![]),
        (vec![], vec![("K_CE_OVERRIDES", "{not json")]),
        (vec![], vec![("K_SINK", "not a url")]),
        (vec![], vec![("K_CA_CERTS", "not a PEM bundle")]),
        (vec!["--tls-ca-file", "/nonexistent/ca.pem"], vec![]),
        (vec!["-source", "h:notaport"], vec![]),
    ] {
        let out = std::process::Command::new(bin)
            .args(&args)
            .envs(envs.iter().copied())
            .output()
            .expect("run");
        assert_eq!(out.status.code(), Some(64), "{args:?} {envs:?}");
        let err = String::from_utf8_lossy(&out.stderr);
        assert!(err.contains("invalid configuration"), "{err}");
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn qos2_subscription_delivers_each_message() {
    let broker = Mosquitto::start("");
    let sink = Sink::start().await;
    let dir = TempDir::new("qos2");
    for (version, id) in [("5", "qos2-v5"), ("3.1.1", "qos2-v311")] {
        let topic = format!("{id}/#");
        let adaptor = Adaptor::source_ready(
            broker.port,
            &topic,
            id,
            &["--qos", "2", "--protocol-version", version],
            &sink.url(),
            &dir.path(&format!("{id}.log")),
        );
        let pubc = TestClient::connect(broker.port, &format!("{id}-testpub")).await;
        for i in 0..50 {
            pubc.client
                .publish(
                    format!("{id}/t"),
                    rumqttc::QoS::ExactlyOnce,
                    false,
                    format!("{id}-{i}"),
                )
                .await
                .expect("publish");
        }
        let prefix = format!("{id}-");
        assert!(
            sink.wait_for(Duration::from_secs(30), |r| {
                body_counts(r)
                    .keys()
                    .filter(|b| b.starts_with(prefix.as_bytes()))
                    .count()
                    >= 50
            })
            .await,
            "v{version}: {}",
            adaptor.logs()
        );
    }
    // Nothing arrived twice without a fault.
    assert!(body_counts(&sink.snapshot()).values().all(|&n| n == 1));
}

/// A sink that answers one to three requests per connection, then closes it (half the time
/// announcing it with `Connection: close`, half the time silently) with the rest of the
/// pipelined requests unanswered. Bodies of answered requests are recorded.
async fn closing_sink(
    bodies: Arc<Mutex<Vec<Vec<u8>>>>,
    unanswered: Arc<AtomicUsize>,
) -> std::net::SocketAddr {
    use tokio::io::{AsyncReadExt, AsyncWriteExt};
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0")
        .await
        .expect("bind");
    let addr = listener.local_addr().expect("addr");
    tokio::spawn(async move {
        let mut conns = 0usize;
        loop {
            let Ok((mut s, _)) = listener.accept().await else {
                continue;
            };
            conns += 1;
            let (answer, polite) = (1 + conns % 3, conns.is_multiple_of(2));
            let (bodies, unanswered) = (bodies.clone(), unanswered.clone());
            tokio::spawn(async move {
                let mut buf = Vec::new();
                let mut chunk = [0u8; 8192];
                let mut answered = 0;
                loop {
                    while let Some((len, body)) = one_request(&buf) {
                        buf.drain(..len);
                        answered += 1;
                        bodies.lock().unwrap().push(body);
                        let last = answered == answer;
                        let resp: &[u8] = if last && polite {
                            b"HTTP/1.1 202 Accepted\r\nconnection: close\r\ncontent-length: 0\r\n\r\n"
                        } else {
                            b"HTTP/1.1 202 Accepted\r\ncontent-length: 0\r\n\r\n"
                        };
                        if s.write_all(resp).await.is_err() || last {
                            let mut rest = &buf[..];
                            while let Some((len, _)) = one_request(rest) {
                                unanswered.fetch_add(1, Ordering::Relaxed);
                                rest = &rest[len..];
                            }
                            return;
                        }
                    }
                    match s.read(&mut chunk).await {
                        Ok(0) | Err(_) => return,
                        Ok(k) => buf.extend_from_slice(&chunk[..k]),
                    }
                }
            });
        }
    });
    addr
}

/// Length and body of the complete `Content-Length` request at the start of `buf`.
fn one_request(buf: &[u8]) -> Option<(usize, Vec<u8>)> {
    let head_end = buf.windows(4).position(|w| w == b"\r\n\r\n")? + 4;
    let head = std::str::from_utf8(&buf[..head_end]).ok()?;
    let len: usize = head.lines().find_map(|l| {
        let (k, v) = l.split_once(':')?;
        if k.eq_ignore_ascii_case("content-length") {
            v.trim().parse().ok()
        } else {
            None
        }
    })?;
    let end = head_end + len;
    (buf.len() >= end).then(|| (end, buf[head_end..end].to_vec()))
}

/// Pipelined sink connections that the sink closes with requests unanswered: those requests
/// are sent again, and every message arrives.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn pipelined_connections_closed_by_the_sink_lose_nothing() {
    closed_by_the_sink("8").await;
}

/// The same with the adaptive pipelining (the default): the sink answers fast, so the
/// adaptor pipelines.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn pipelined_connections_closed_by_the_sink_lose_nothing_auto() {
    closed_by_the_sink("auto").await;
}

async fn closed_by_the_sink(pipeline: &str) {
    let broker = Mosquitto::start("");
    let bodies = Arc::new(Mutex::new(Vec::new()));
    let unanswered = Arc::new(AtomicUsize::new(0));
    let sink = closing_sink(bodies.clone(), unanswered.clone()).await;
    let dir = TempDir::new(&format!("closing-p{pipeline}"));
    let client_id = format!("closing-p{pipeline}");
    let mut adaptor = Adaptor::source_ready(
        broker.port,
        "closing/#",
        &client_id,
        &["--sink-pipeline", pipeline, "--inflight", "16"],
        &format!("http://{sink}/"),
        &dir.path("adaptor.log"),
    );
    burst_after_restart(&mut adaptor, broker.port, "closing", 200, &bodies).await;
    eprintln!(
        "200 distinct messages in {} answered requests; {} pipelined requests were left unanswered at a close",
        bodies.lock().unwrap().len(),
        unanswered.load(Ordering::Relaxed)
    );
}

/// Publishes `n` messages to `{prefix}/0` and `{prefix}/1` while the adaptor is down (its
/// session keeps them), so that they come in one burst after the restart and fill the
/// window; then waits until every one of them is among the sink's `bodies`.
async fn burst_after_restart(
    adaptor: &mut Adaptor,
    broker_port: u16,
    prefix: &str,
    n: usize,
    bodies: &Mutex<Vec<Vec<u8>>>,
) {
    adaptor.kill();
    let pubc = TestClient::connect(broker_port, &format!("{prefix}-testpub")).await;
    let msgs: Vec<_> = (0..n)
        .map(|i| {
            (
                format!("{prefix}/{}", i % 2),
                format!("{prefix}-{i}").into_bytes(),
            )
        })
        .collect();
    pubc.publish_all(&msgs).await;
    adaptor.restart();
    let want: HashSet<Vec<u8>> = msgs.into_iter().map(|(_, p)| p).collect();
    let deadline = std::time::Instant::now() + Duration::from_secs(60);
    loop {
        let got: HashSet<Vec<u8>> = bodies.lock().unwrap().iter().cloned().collect();
        let missing = want.difference(&got).count();
        if missing == 0 {
            return;
        }
        assert!(
            std::time::Instant::now() < deadline,
            "{missing} of {n} never arrived: {}",
            adaptor.logs()
        );
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
}

/// A sink that answers each request 20 ms after reading it, one request at a time per
/// connection (as Go's net/http does with pipelined requests), and counts the requests it is
/// working on at once. Returns its address, the highest count seen and the bodies answered.
async fn slow_sink(
    most: Arc<AtomicUsize>,
    bodies: Arc<Mutex<Vec<Vec<u8>>>>,
) -> std::net::SocketAddr {
    use tokio::io::{AsyncReadExt, AsyncWriteExt};
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0")
        .await
        .expect("bind");
    let addr = listener.local_addr().expect("addr");
    let now = Arc::new(AtomicUsize::new(0));
    tokio::spawn(async move {
        loop {
            let Ok((mut s, _)) = listener.accept().await else {
                continue;
            };
            let (most, bodies, now) = (most.clone(), bodies.clone(), now.clone());
            tokio::spawn(async move {
                let mut buf = Vec::new();
                let mut chunk = [0u8; 8192];
                loop {
                    while let Some((len, body)) = one_request(&buf) {
                        buf.drain(..len);
                        let working = now.fetch_add(1, Ordering::SeqCst) + 1;
                        most.fetch_max(working, Ordering::SeqCst);
                        tokio::time::sleep(Duration::from_millis(20)).await;
                        bodies.lock().unwrap().push(body);
                        now.fetch_sub(1, Ordering::SeqCst);
                        let resp = b"HTTP/1.1 202 Accepted\r\ncontent-length: 0\r\n\r\n";
                        if s.write_all(resp).await.is_err() {
                            return;
                        }
                    }
                    match s.read(&mut chunk).await {
                        Ok(0) | Err(_) => return,
                        Ok(k) => buf.extend_from_slice(&chunk[..k]),
                    }
                }
            });
        }
    });
    addr
}

/// A slow sink (20 ms per answer) under the adaptive pipelining (the default): a burst keeps
/// the whole --inflight window at the sink at once, as without pipelining, and every message
/// arrives.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn slow_sink_gets_the_whole_window_in_auto_mode() {
    let broker = Mosquitto::start("");
    let most = Arc::new(AtomicUsize::new(0));
    let bodies = Arc::new(Mutex::new(Vec::new()));
    let sink = slow_sink(most.clone(), bodies.clone()).await;
    let dir = TempDir::new("slow-auto");
    let mut adaptor = Adaptor::source_ready(
        broker.port,
        "slow/#",
        "slow-auto",
        &["--inflight", "16"],
        &format!("http://{sink}/"),
        &dir.path("adaptor.log"),
    );
    burst_after_restart(&mut adaptor, broker.port, "slow", 160, &bodies).await;
    let most = most.load(Ordering::SeqCst);
    eprintln!("the slow sink worked on up to {most} requests at once (--inflight 16)");
    assert!(
        most >= 16,
        "the slow sink saw at most {most} requests at once, not the --inflight window of 16"
    );
}
