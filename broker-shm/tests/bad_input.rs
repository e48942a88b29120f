//! Bad input of every kind gets the contract's status code and never a crash.

mod common;

use bytes::Bytes;
use common::*;
use http::{Method, StatusCode};
use spright_test_support::Rng;
use std::time::Duration;
use tokio::io::{AsyncReadExt, AsyncWriteExt};

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn random_requests_get_contract_statuses() {
    let sink = Recorder::start().await;
    let files = [
        (
            "b.yaml",
            broker_yaml("bad", "default", "  delivery: {retry: 0}"),
        ),
        (
            "t.yaml",
            trigger_yaml("bad", "t", "default", &sink.url("/t"), ""),
        ),
        // Broken manifests must not stop the broker either.
        ("garbage.yaml", ":\n  - [unclosed".to_string()),
        (
            "wrong.yaml",
            "apiVersion: eventing.knative.dev/v1\nkind: Trigger\nmetadata: {name: x}\nspec: 7\n"
                .to_string(),
        ),
    ];
    let mut b = BrokerProc::start(&files, &[], &[]).await;
    let url = b.url("/bad/default");
    let mut rng = Rng(0x1234_5678_9abc_def1);
    let cts = [
        "application/cloudevents+json",
        "application/cloudevents+avro",
        "application/cloudevents-batch+json",
        "application/json",
        "text/plain",
        "APPLICATION/CLOUDEVENTS+JSON",
    ];
    let svs = ["1.0", "0.3", "2.0", "", "1.0 "];
    for i in 0..300 {
        let mut h = http::HeaderMap::new();
        if rng.next_u64().is_multiple_of(2) {
            h.insert("content-type", rng.pick(&cts).parse().unwrap());
        }
        if rng.next_u64().is_multiple_of(2) {
            h.insert("ce-specversion", rng.pick(&svs).parse().unwrap());
            h.insert("ce-id", format!("id{i}").parse().unwrap());
            if !rng.next_u64().is_multiple_of(3) {
                h.insert("ce-source", "/s".parse().unwrap());
            }
            if !rng.next_u64().is_multiple_of(3) {
                h.insert("ce-type", "t".parse().unwrap());
            }
            if rng.next_u64().is_multiple_of(4) {
                h.insert("ce-time", "not-a-time".parse().unwrap());
            }
            if rng.next_u64().is_multiple_of(4) {
                h.insert(
                    "ce-knativebrokerttl",
                    rng.pick(&["0", "1", "-5", "x", "99999999999"])
                        .parse()
                        .unwrap(),
                );
            }
            if rng.next_u64().is_multiple_of(5) {
                h.insert(
                    http::HeaderName::from_bytes(b"ce-bad_name").unwrap(),
                    http::HeaderValue::from_bytes(&[0xff, 0xfe, b'%', b'z']).unwrap(),
                );
            }
        }
        let body = match rng.next_u64() % 4 {
            0 => Bytes::new(),
            1 => {
                let n = (rng.next_u64() % 2048) as usize;
                Bytes::from(rng.bytes(n))
            }
            2 => Bytes::from(format!(
                r#"{{"specversion":"{}","id":"{i}","source":"/s","type":"t","data_base64":"{}"}}"#,
                rng.pick(&svs),
                rng.pick(&["aGk=", "!!!", ""])
            )),
            _ => Bytes::from(
                r#"{"specversion":"1.0","id":"1","source":"/s","type":"t","data":"x","data_base64":"eA=="}"#,
            ),
        };
        let (s, _, _) = raw(Method::POST, &url, h, body).await.expect("request");
        assert!(
            matches!(s, StatusCode::ACCEPTED | StatusCode::BAD_REQUEST),
            "request {i}: unexpected {s}"
        );
    }
    // Paths and methods.
    for (m, p, want) in [
        (Method::POST, "/", StatusCode::NOT_FOUND),
        (Method::POST, "/a/b/c/d", StatusCode::BAD_REQUEST),
        (Method::POST, "/%ff/%00", StatusCode::BAD_REQUEST), // decoded before lookup
        (Method::HEAD, "/bad/default", StatusCode::METHOD_NOT_ALLOWED),
        (
            Method::from_bytes(b"BREW").unwrap(),
            "/bad/default",
            StatusCode::METHOD_NOT_ALLOWED,
        ),
    ] {
        let (s, _, _) = raw(m.clone(), &b.url(p), Default::default(), Bytes::new())
            .await
            .unwrap();
        assert_eq!(s, want, "{m} {p}");
    }
    let long = format!("/{}/{}", "n".repeat(5000), "b".repeat(5000));
    let (s, _, _) = raw(
        Method::POST,
        &b.url(&long),
        Default::default(),
        Bytes::new(),
    )
    .await
    .unwrap();
    assert!(s.is_client_error());
    // Garbage on the socket, and a connection dropped mid-body.
    for junk in [
        &b"\x00\x01\x02garbage\r\n\r\n"[..],
        b"POST /bad/default HTTP/1.1\r\nContent-Length: 999999\r\nce-specversion: 1.0\r\n\r\npartial",
        b"POST /bad/default HTTP/1.1\r\nTransfer-Encoding: chunked\r\n\r\nzz\r\n",
    ] {
        let mut s = tokio::net::TcpStream::connect(("127.0.0.1", b.port)).await.unwrap();
        let _ = s.write_all(junk).await;
        let _ = s.shutdown().await;
        let mut buf = Vec::new();
        let _ = tokio::time::timeout(Duration::from_secs(2), s.read_to_end(&mut buf)).await;
    }
    // Still serving, still delivering.
    assert_eq!(
        send_binary(&url, "still-alive", "t", &[]).await,
        StatusCode::ACCEPTED
    );
    sink.wait_for(Duration::from_secs(10), |v| {
        v.iter()
            .any(|r| r.ce("id").as_deref() == Some("still-alive"))
    })
    .await;
    assert!(
        sink.on("/t")
            .iter()
            .any(|r| r.ce("id").as_deref() == Some("still-alive"))
    );
    assert!(b.logs().contains("object rejected"));
    b.assert_alive();
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn bad_configuration_exits_with_a_clear_error() {
    let out = std::process::Command::new(env!("CARGO_BIN_EXE_broker-shm"))
        .env_remove("BROKER_MANIFESTS")
        .env("INGRESS_PORT", free_port().to_string())
        .output()
        .unwrap();
    assert_eq!(out.status.code(), Some(64));
    assert!(String::from_utf8_lossy(&out.stderr).contains("--manifests"));
    let out = std::process::Command::new(env!("CARGO_BIN_EXE_broker-shm"))
        .args(["--manifests", "/nonexistent/broker-shm-test"])
        .env("INGRESS_PORT", free_port().to_string())
        .env("METRICS_PORT", "0")
        .output()
        .unwrap();
    assert_eq!(out.status.code(), Some(64));
    assert!(String::from_utf8_lossy(&out.stderr).contains("is not a directory"));
    let out = std::process::Command::new(env!("CARGO_BIN_EXE_broker-shm"))
        .args(["--manifests", "/nonexistent", "--durability", "sometimes"])
        .output()
        .unwrap();
    assert!(!out.status.success());
    assert!(String::from_utf8_lossy(&out.stderr).contains("durability"));
    for cpus in ["x", "1-0", "1023"] {
        let out = std::process::Command::new(env!("CARGO_BIN_EXE_broker-shm"))
            .args(["--manifests", "/nonexistent"])
            .env("SPRIGHT_CPUS", cpus)
            .env("INGRESS_PORT", free_port().to_string())
            .env("METRICS_PORT", "0")
            .output()
            .unwrap();
        assert_eq!(out.status.code(), Some(64), "SPRIGHT_CPUS={cpus}");
        assert!(String::from_utf8_lossy(&out.stderr).contains("SPRIGHT_CPUS"));
    }
}
