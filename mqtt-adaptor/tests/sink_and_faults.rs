//! Black-box tests: sink direction (HTTP CloudEvents -> MQTT), TLS, credentials, invalid and
//! oversize messages, the embedded broker.

mod common;

use std::io::{Read, Write};
use std::net::TcpStream;
use std::process::Command;
use std::time::{Duration, Instant};

use common::*;

/// Raw HTTP/1.1 POST; returns the status code.
fn post(port: u16, headers: &[(&str, &str)], body: &[u8]) -> u16 {
    let mut s = TcpStream::connect(("127.0.0.1", port)).expect("connect");
    s.set_read_timeout(Some(Duration::from_secs(20))).unwrap();
    let mut req = format!(
        "POST / HTTP/1.1\r\nHost: x\r\nConnection: close\r\nContent-Length: {}\r\n",
        body.len()
    );
    for (k, v) in headers {
        req.push_str(&format!("{k}: {v}\r\n"));
    }
    req.push_str("\r\n");
    s.write_all(req.as_bytes()).unwrap();
    s.write_all(body).unwrap();
    let mut out = String::new();
    let _ = s.read_to_string(&mut out);
    out.split_whitespace()
        .nth(1)
        .and_then(|c| c.parse().ok())
        .unwrap_or(0)
}

async fn wait_messages(c: &TestClient, n: usize, timeout: Duration) -> Vec<rumqttc::Publish> {
    let deadline = Instant::now() + timeout;
    loop {
        let got = c.messages.lock().unwrap().clone();
        if got.len() >= n || Instant::now() > deadline {
            return got;
        }
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn cloudevents_posted_arrive_on_mqtt() {
    let broker = Mosquitto::start("");
    let dir = TempDir::new("sinkdir");
    let b = format!("mqtt://127.0.0.1:{}", broker.port);
    let mut adaptor = Adaptor::start(
        &[
            "--broker",
            &b,
            "--publish-topic",
            "cmd/{subject}",
            "--client-id",
            "sinkdir",
        ],
        &[],
        &dir.path("adaptor.log"),
    );
    assert!(
        adaptor.wait_ready(Duration::from_secs(20)),
        "{}",
        adaptor.logs()
    );
    let sub = TestClient::connect(broker.port, "sinkdir-sub").await;
    sub.client
        .subscribe("#", rumqttc::QoS::AtLeastOnce)
        .await
        .unwrap();
    tokio::time::sleep(Duration::from_millis(300)).await;

    // Binary mode, topic from the extension attribute.
    let status = post(
        adaptor.http_port,
        &[
            ("ce-specversion", "1.0"),
            ("ce-id", "b1"),
            ("ce-source", "/knative/trigger"),
            ("ce-type", "actuator.set"),
            ("ce-mqtttopic", "direct/valve"),
            ("content-type", "application/json"),
        ],
        br#"{"open":true}"#,
    );
    assert_eq!(status, 202);
    // Structured mode, topic from the template.
    let status = post(
        adaptor.http_port,
        &[("content-type", "application/cloudevents+json")],
        br#"{"specversion":"1.0","id":"s1","source":"/x","type":"t","subject":"dev7","data":"ping","datacontenttype":"text/plain"}"#,
    );
    assert_eq!(status, 202);
    // Invalid events are refused, not published.
    assert_eq!(
        post(
            adaptor.http_port,
            &[("ce-specversion", "1.0"), ("ce-id", "x")],
            b"x"
        ),
        400
    );
    assert_eq!(
        post(
            adaptor.http_port,
            &[("content-type", "application/cloudevents+json")],
            b"{oops"
        ),
        400
    );

    let got = wait_messages(&sub, 2, Duration::from_secs(10)).await;
    let find = |t: &str| got.iter().find(|p| p.topic == t).cloned();
    let valve = find("direct/valve").expect("no message on direct/valve");
    assert_eq!(&valve.payload[..], br#"{"open":true}"#);
    let dev = find("cmd/dev7").expect("no message on cmd/dev7");
    assert_eq!(&dev.payload[..], b"ping");
    tokio::time::sleep(Duration::from_millis(300)).await;
    assert_eq!(
        sub.messages.lock().unwrap().len(),
        2,
        "invalid events were published"
    );
}

fn openssl(args: &[&str], dir: &std::path::Path) {
    let st = Command::new("openssl")
        .args(args)
        .current_dir(dir)
        .stdout(std::process::Stdio::null())
        .stderr(std::process::Stdio::null())
        .status()
        .expect("openssl");
    assert!(st.success(), "openssl {args:?}");
}

/// A test CA, a server certificate for 127.0.0.1 and a client certificate.
fn make_pki(dir: &std::path::Path) {
    openssl(
        &[
            "req",
            "-x509",
            "-newkey",
            "rsa:2048",
            "-nodes",
            "-days",
            "2",
            "-subj",
            "/CN=test-ca",
            "-keyout",
            "ca.key",
            "-out",
            "ca.pem",
        ],
        dir,
    );
    std::fs::write(
        dir.join("server.ext"),
        "subjectAltName=IP:127.0.0.1,DNS:localhost\nbasicConstraints=CA:FALSE\n",
    )
    .unwrap();
    std::fs::write(
        dir.join("client.ext"),
        "basicConstraints=CA:FALSE\nextendedKeyUsage=clientAuth\n",
    )
    .unwrap();
    for name in ["server", "client"] {
        openssl(
            &[
                "req",
                "-newkey",
                "rsa:2048",
                "-nodes",
                "-subj",
                &format!("/CN={name}"),
                "-keyout",
                &format!("{name}.key"),
                "-out",
                &format!("{name}.csr"),
            ],
            dir,
        );
        let (csr, pem) = (format!("{name}.csr"), format!("{name}.pem"));
        let mut args = vec![
            "x509",
            "-req",
            "-in",
            &csr,
            "-CA",
            "ca.pem",
            "-CAkey",
            "ca.key",
            "-CAcreateserial",
            "-days",
            "2",
            "-out",
            &pem,
        ];
        args.extend([
            "-extfile",
            if name == "server" {
                "server.ext"
            } else {
                "client.ext"
            },
        ]);
        openssl(&args, dir);
    }
    // mosquitto drops root privileges before reading the key files.
    for f in ["ca.key", "server.key", "client.key"] {
        use std::os::unix::fs::PermissionsExt;
        let _ = std::fs::set_permissions(dir.join(f), std::fs::Permissions::from_mode(0o644));
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn tls_with_test_ca_and_client_certificate() {
    let pki = TempDir::new("pki");
    make_pki(&pki.0);
    let plain = free_port();
    let tls = free_port();
    let p = |f: &str| pki.path(f).display().to_string();
    let broker = Mosquitto::start_with(
        &format!(
            "per_listener_settings false\nallow_anonymous true\nlistener {plain} 127.0.0.1\nlistener {tls} 127.0.0.1\ncafile {}\ncertfile {}\nkeyfile {}\nrequire_certificate true\n",
            p("ca.pem"),
            p("server.pem"),
            p("server.key")
        ),
        plain,
    );
    let sink = Sink::start().await;
    let dir = TempDir::new("tls");
    let b = format!("mqtts://127.0.0.1:{tls}");
    let mut adaptor = Adaptor::start(
        &[
            "--broker",
            &b,
            "--topic",
            "secure/#",
            "--client-id",
            "tls",
            "--tls-ca-file",
            &p("ca.pem"),
            "--tls-cert-file",
            &p("client.pem"),
            "--tls-key-file",
            &p("client.key"),
        ],
        &[("K_SINK", &sink.url())],
        &dir.path("adaptor.log"),
    );
    assert!(
        adaptor.wait_ready(Duration::from_secs(20)),
        "{}",
        adaptor.logs()
    );
    let pubc = TestClient::connect(broker.port, "tls-testpub").await;
    let msgs: Vec<_> = (0..20)
        .map(|i| ("secure/a".to_owned(), format!("t-{i}").into_bytes()))
        .collect();
    pubc.publish_all(&msgs).await;
    assert!(
        sink.wait_for(Duration::from_secs(20), |r| body_counts(r).len() >= 20)
            .await,
        "{}",
        adaptor.logs()
    );

    // Without the client certificate the broker refuses the TLS handshake: not ready.
    let dir2 = TempDir::new("tls-nocert");
    let mut refused = Adaptor::start(
        &[
            "--broker",
            &b,
            "--topic",
            "secure/#",
            "--client-id",
            "tls2",
            "--tls-ca-file",
            &p("ca.pem"),
        ],
        &[("K_SINK", &sink.url())],
        &dir2.path("adaptor.log"),
    );
    std::thread::sleep(Duration::from_secs(2));
    assert_eq!(refused.get("/readyz").map(|r| r.0), Some(503));
    assert!(refused.exited().is_none());
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn wrong_credentials_give_clear_error_and_not_ready() {
    let dir = TempDir::new("auth");
    let pw = dir.path("passwd");
    let st = Command::new("mosquitto_passwd")
        .args(["-b", "-c"])
        .arg(&pw)
        .args(["device", "s3cret"])
        .status()
        .expect("mosquitto_passwd");
    assert!(st.success());
    let port = free_port();
    let broker = Mosquitto::start_with(
        &format!(
            "listener {port} 127.0.0.1\nallow_anonymous false\npassword_file {}\n",
            pw.display()
        ),
        port,
    );
    let sink = Sink::start().await;
    let b = format!("mqtt://127.0.0.1:{}", broker.port);
    for version in ["5", "3.1.1"] {
        let bad = Adaptor::start(
            &[
                "--broker",
                &b,
                "--topic",
                "a",
                "--username",
                "device",
                "--password",
                "wrong",
                "--protocol-version",
                version,
                "--client-id",
                "auth-bad",
            ],
            &[("K_SINK", &sink.url())],
            &dir.path(&format!("bad-{version}.log")),
        );
        let deadline = Instant::now() + Duration::from_secs(10);
        while !bad.logs().contains("credentials rejected") && Instant::now() < deadline {
            std::thread::sleep(Duration::from_millis(100));
        }
        let logs = bad.logs();
        assert!(logs.contains("credentials rejected"), "v{version}: {logs}");
        assert!(
            logs.contains("bad user name or password") || logs.contains("not authorized"),
            "{logs}"
        );
        let (status, body) = bad.get("/readyz").expect("readyz");
        assert_eq!(status, 503);
        assert!(
            body.contains("MQTT source is not connected and subscribed"),
            "{body}"
        );
        assert_eq!(bad.get("/healthz").map(|r| r.0), Some(200));
    }
    let mut good = Adaptor::start(
        &[
            "--broker",
            &b,
            "--topic",
            "a",
            "--username",
            "device",
            "--password",
            "s3cret",
            "--client-id",
            "auth-good",
        ],
        &[("K_SINK", &sink.url())],
        &dir.path("good.log"),
    );
    assert!(good.wait_ready(Duration::from_secs(20)), "{}", good.logs());
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn malformed_and_oversize_messages_follow_policy() {
    let broker = Mosquitto::start("");
    let sink = Sink::start().await;
    let dls = Sink::start().await;
    let dir = TempDir::new("malformed");
    let b = format!("mqtt://127.0.0.1:{}", broker.port);
    let mut dead = Adaptor::start(
        &[
            "--broker",
            &b,
            "--topic",
            "dl/#",
            "--client-id",
            "malformed-dl",
            "--invalid-policy",
            "dead-letter",
            "--dead-letter-sink",
            &dls.url(),
            "--max-message-bytes",
            "1000",
        ],
        &[("K_SINK", &sink.url())],
        &dir.path("dl.log"),
    );
    let mut wrap = Adaptor::start(
        &[
            "--broker",
            &b,
            "--topic",
            "wrap/#",
            "--client-id",
            "malformed-wrap",
            "--max-message-bytes",
            "1000",
        ],
        &[("K_SINK", &sink.url())],
        &dir.path("wrap.log"),
    );
    assert!(dead.wait_ready(Duration::from_secs(20)), "{}", dead.logs());
    assert!(wrap.wait_ready(Duration::from_secs(20)), "{}", wrap.logs());
    let pubc = TestClient::connect(broker.port, "malformed-testpub").await;
    let bad_ce = br#"{"specversion":"1.0","id":"no-source"}"#.to_vec();
    let big = vec![b'x'; 5000];
    pubc.publish_all(&[
        ("dl/a".into(), bad_ce.clone()),
        ("dl/a".into(), big.clone()),
        ("dl/a".into(), b"fine".to_vec()),
        ("wrap/a".into(), bad_ce.clone()),
        ("wrap/a".into(), big.clone()),
    ])
    .await;
    assert!(
        dls.wait_for(Duration::from_secs(20), |r| r.len() >= 2)
            .await,
        "{}",
        dead.logs()
    );
    assert!(
        sink.wait_for(Duration::from_secs(20), |r| r.len() >= 2)
            .await,
        "{}",
        wrap.logs()
    );
    tokio::time::sleep(Duration::from_millis(300)).await;
    let to_dls = dls.snapshot();
    assert!(to_dls.iter().all(|r| r.header("ce-mqtterror").is_some()));
    assert!(to_dls.iter().any(|r| r.body.as_ref() == bad_ce.as_slice()));
    let oversize: Vec<_> = to_dls
        .iter()
        .filter(|r| r.header("ce-mqttsize").as_deref() == Some("5000"))
        .collect();
    assert_eq!(
        oversize.len(),
        1,
        "the oversize message is dead-lettered as metadata"
    );
    assert_eq!(to_dls.len(), 2);
    assert!(oversize.iter().all(|r| r.body.is_empty()));
    let to_sink = sink.snapshot();
    assert!(to_sink.iter().any(|r| r.body.as_ref() == b"fine"));
    // Under the wrap policy the invalid CloudEvent arrives wrapped.
    assert!(to_sink.iter().any(|r| r.body.as_ref() == bad_ce.as_slice()
        && r.header("ce-type").as_deref() == Some("dev.spright.mqtt.message")));
    assert_eq!(to_sink.len(), 2);
    assert!(
        dead.logs()
            .contains("invalid CloudEvent: missing required attribute `source`"),
        "{}",
        dead.logs()
    );
    assert!(dead.logs().contains("exceeds the limit of 1000 bytes"));
    // Without a dead-letter sink an oversize message is logged, counted and acknowledged.
    assert!(
        wrap.logs()
            .contains("event dropped: no dead-letter sink configured"),
        "{}",
        wrap.logs()
    );
    let (_, metrics) = wrap.get("/metrics").expect("metrics");
    assert!(
        metrics.contains("mqtt_adaptor_events_failed_total 1"),
        "{metrics}"
    );
    assert!(dead.exited().is_none() && wrap.exited().is_none());
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn embedded_broker_when_none_configured() {
    let sink = Sink::start().await;
    let port = free_port();
    let listen = format!("127.0.0.1:{port}");
    let dir = TempDir::new("embedded");
    let mut adaptor = Adaptor::start(
        &[
            "--embedded-listen",
            &listen,
            "--topic",
            "edge/#",
            "--protocol-version",
            "3.1.1",
            "--publish-topic",
            "edge/{subject}",
            "--client-id",
            "embedded",
        ],
        &[("K_SINK", &sink.url())],
        &dir.path("adaptor.log"),
    );
    assert!(
        adaptor.wait_ready(Duration::from_secs(20)),
        "{}",
        adaptor.logs()
    );
    let pubc = TestClient::connect(port, "embedded-testpub").await;
    let msgs: Vec<_> = (0..50)
        .map(|i| ("edge/t".to_owned(), format!("e-{i}").into_bytes()))
        .collect();
    pubc.publish_all(&msgs).await;
    assert!(
        sink.wait_for(Duration::from_secs(20), |r| body_counts(r).len() >= 50)
            .await,
        "{}",
        adaptor.logs()
    );
    // Round trip through the embedded broker: HTTP -> MQTT -> sink.
    let status = post(
        adaptor.http_port,
        &[
            ("ce-specversion", "1.0"),
            ("ce-id", "rt"),
            ("ce-source", "/x"),
            ("ce-type", "t"),
            ("ce-subject", "loop"),
            ("content-type", "text/plain"),
        ],
        b"round-trip",
    );
    assert_eq!(status, 202, "{}", adaptor.logs());
    assert!(
        sink.wait_for(Duration::from_secs(20), |r| r
            .iter()
            .any(|x| x.body.as_ref() == b"round-trip"))
            .await,
        "{}",
        adaptor.logs()
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn structured_sink_format_and_oidc_bearer() {
    let broker = Mosquitto::start("");
    let sink = Sink::start().await;
    let dir = TempDir::new("structured");
    std::fs::write(dir.path("token"), "header.payload.sig\n").unwrap();
    let b = format!("mqtt://127.0.0.1:{}", broker.port);
    let token = dir.path("token").display().to_string();
    let mut adaptor = Adaptor::start(
        &[
            "--broker",
            &b,
            "--topic",
            "s/#",
            "--client-id",
            "structured",
            "--sink-format",
            "structured",
            "--data-content-type",
            "text/plain",
        ],
        &[("K_SINK", &sink.url()), ("MQTT_OIDC_TOKEN_FILE", &token)],
        &dir.path("adaptor.log"),
    );
    assert!(
        adaptor.wait_ready(Duration::from_secs(20)),
        "{}",
        adaptor.logs()
    );
    let pubc = TestClient::connect(broker.port, "structured-testpub").await;
    pubc.publish_all(&[("s/1".into(), b"hello".to_vec())]).await;
    assert!(
        sink.wait_for(Duration::from_secs(20), |r| !r.is_empty())
            .await,
        "{}",
        adaptor.logs()
    );
    let r = &sink.snapshot()[0];
    assert_eq!(
        r.header("authorization").as_deref(),
        Some("Bearer header.payload.sig")
    );
    assert!(
        r.header("content-type")
            .unwrap_or_default()
            .starts_with("application/cloudevents+json")
    );
    let v: serde_json::Value = serde_json::from_slice(&r.body).expect("structured JSON");
    assert_eq!(v["data"], "hello");
    assert_eq!(v["subject"], "s/1");
    assert_eq!(v["datacontenttype"], "text/plain");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn broker_restart_reconnects_and_readiness_follows() {
    let port = free_port();
    let listener = format!("listener {port} 127.0.0.1\nallow_anonymous true\n");
    let broker = Mosquitto::start_with(&listener, port);
    let sink = Sink::start().await;
    let dir = TempDir::new("restart-broker");
    let mut adaptor = Adaptor::source_ready(
        port,
        "rb/#",
        "restart-broker",
        &[],
        &sink.url(),
        &dir.path("adaptor.log"),
    );
    drop(broker);
    let deadline = Instant::now() + Duration::from_secs(10);
    while adaptor.get("/readyz").map(|r| r.0) != Some(503) && Instant::now() < deadline {
        std::thread::sleep(Duration::from_millis(50));
    }
    assert_eq!(
        adaptor.get("/readyz").map(|r| r.0),
        Some(503),
        "still ready with the broker down"
    );
    let broker = Mosquitto::start_with(&listener, port);
    assert!(
        adaptor.wait_ready(Duration::from_secs(20)),
        "did not reconnect: {}",
        adaptor.logs()
    );
    let pubc = TestClient::connect(broker.port, "restart-broker-testpub").await;
    let deadline = Instant::now() + Duration::from_secs(20);
    let mut i = 0;
    // The subscription is renewed after the reconnect; publish until messages flow again.
    while sink.count() == 0 && Instant::now() < deadline {
        pubc.publish_all(&[("rb/x".into(), format!("after-{i}").into_bytes())])
            .await;
        i += 1;
        tokio::time::sleep(Duration::from_millis(200)).await;
    }
    assert!(sink.count() > 0, "{}", adaptor.logs());
}

/// A blocking HTTPS sink (rustls) answering 202; returns its port and the `ce-id`s it saw.
fn https_sink(
    cert: &std::path::Path,
    key: &std::path::Path,
) -> (u16, std::sync::Arc<std::sync::Mutex<Vec<String>>>) {
    use std::io::BufRead;
    let certs = rustls_pemfile::certs(&mut std::fs::read(cert).unwrap().as_slice())
        .collect::<Result<Vec<_>, _>>()
        .unwrap();
    let key = rustls_pemfile::private_key(&mut std::fs::read(key).unwrap().as_slice())
        .unwrap()
        .unwrap();
    let config = std::sync::Arc::new(
        rustls::ServerConfig::builder_with_provider(std::sync::Arc::new(
            rustls::crypto::ring::default_provider(),
        ))
        .with_safe_default_protocol_versions()
        .unwrap()
        .with_no_client_auth()
        .with_single_cert(certs, key)
        .unwrap(),
    );
    let listener = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
    let port = listener.local_addr().unwrap().port();
    let seen = std::sync::Arc::new(std::sync::Mutex::new(Vec::new()));
    let seen2 = seen.clone();
    std::thread::spawn(move || {
        for stream in listener.incoming().flatten() {
            let config = config.clone();
            let seen = seen2.clone();
            std::thread::spawn(move || {
                let Ok(conn) = rustls::ServerConnection::new(config) else {
                    return;
                };
                let mut tls = std::io::BufReader::new(rustls::StreamOwned::new(conn, stream));
                loop {
                    let (mut len, mut id) = (0usize, None);
                    loop {
                        let mut line = String::new();
                        if tls.read_line(&mut line).unwrap_or(0) == 0 {
                            return;
                        }
                        let l = line.trim_end().to_ascii_lowercase();
                        if l.is_empty() {
                            break;
                        }
                        if let Some(v) = l.strip_prefix("content-length:") {
                            len = v.trim().parse().unwrap_or(0);
                        }
                        if let Some(v) = l.strip_prefix("ce-id:") {
                            id = Some(v.trim().to_owned());
                        }
                    }
                    let mut body = vec![0; len];
                    if tls.read_exact(&mut body).is_err() {
                        return;
                    }
                    seen.lock().unwrap().extend(id);
                    let out = tls.get_mut();
                    if out
                        .write_all(b"HTTP/1.1 202 Accepted\r\ncontent-length: 0\r\n\r\n")
                        .and_then(|_| out.flush())
                        .is_err()
                    {
                        return;
                    }
                }
            });
        }
    });
    (port, seen)
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn https_sink_trusted_through_k_ca_certs() {
    let pki = TempDir::new("pki-sink");
    make_pki(&pki.0);
    let (port, seen) = https_sink(&pki.path("server.pem"), &pki.path("server.key"));
    let broker = Mosquitto::start("");
    let dir = TempDir::new("https-sink");
    let ca = std::fs::read_to_string(pki.path("ca.pem")).unwrap();
    let b = format!("mqtt://127.0.0.1:{}", broker.port);
    let sink = format!("https://127.0.0.1:{port}/");
    let mut adaptor = Adaptor::start(
        &[
            "--broker",
            &b,
            "--topic",
            "tls/#",
            "--client-id",
            "https-sink",
        ],
        &[("K_SINK", &sink), ("K_CA_CERTS", &ca)],
        &dir.path("adaptor.log"),
    );
    assert!(
        adaptor.wait_ready(Duration::from_secs(20)),
        "{}",
        adaptor.logs()
    );
    let pubc = TestClient::connect(broker.port, "https-sink-testpub").await;
    let msgs: Vec<_> = (0..10)
        .map(|i| ("tls/a".to_owned(), format!("h-{i}").into_bytes()))
        .collect();
    pubc.publish_all(&msgs).await;
    let deadline = Instant::now() + Duration::from_secs(20);
    while seen.lock().unwrap().len() < 10 && Instant::now() < deadline {
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    assert_eq!(seen.lock().unwrap().len(), 10, "{}", adaptor.logs());

    // Without K_CA_CERTS the sink's certificate is not trusted: retried, not delivered.
    let untrusting = Adaptor::source_ready(
        broker.port,
        "untrusted/#",
        "https-sink-untrusted",
        &["--retry-backoff-ms", "50"],
        &sink,
        &dir.path("untrusted.log"),
    );
    pubc.publish_all(&[("untrusted/a".into(), b"u".to_vec())])
        .await;
    let deadline = Instant::now() + Duration::from_secs(10);
    while !untrusting.logs().contains("sink delivery failed, retrying") && Instant::now() < deadline
    {
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    assert!(
        untrusting.logs().contains("sink delivery failed, retrying"),
        "{}",
        untrusting.logs()
    );
    assert_eq!(seen.lock().unwrap().len(), 10);
}
