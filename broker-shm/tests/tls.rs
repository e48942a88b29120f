//! https subscribers: delivery over TLS trusting the trigger's `spec.subscriber.CACerts`
//! (a test CA made with openssl, Debian package openssl), and a failed TLS handshake with an
//! untrusted CA that ends at the dead-letter sink.

mod common;

use bytes::Bytes;
use common::*;
use http::{Request, Response, StatusCode};
use http_body_util::{BodyExt, Full};
use hyper::body::Incoming;
use hyper_util::rt::TokioIo;
use spright_test_support::tls::{Certificate, ca_and_server};
use std::sync::{Arc, Mutex};
use std::time::Duration;

const WAIT: Duration = Duration::from_secs(15);

/// An https subscriber recording the paths it got; answers 202.
async fn https_subscriber(certificate: &Certificate) -> (u16, Arc<Mutex<Vec<String>>>) {
    let acceptor = tokio_rustls::TlsAcceptor::from(certificate.server_config());
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0")
        .await
        .expect("bind");
    let port = listener.local_addr().expect("addr").port();
    let got: Arc<Mutex<Vec<String>>> = Arc::default();
    let g = got.clone();
    tokio::spawn(async move {
        while let Ok((stream, _)) = listener.accept().await {
            let (acceptor, g) = (acceptor.clone(), g.clone());
            tokio::spawn(async move {
                // A client that does not trust us ends the handshake: nothing to serve.
                let Ok(tls) = acceptor.accept(stream).await else {
                    return;
                };
                let svc = hyper::service::service_fn(move |req: Request<Incoming>| {
                    let g = g.clone();
                    async move {
                        let path = req.uri().path().to_string();
                        let _ = req.into_body().collect().await;
                        g.lock().expect("lock").push(path);
                        let mut r = Response::new(Full::new(Bytes::new()));
                        *r.status_mut() = StatusCode::ACCEPTED;
                        Ok::<_, std::convert::Infallible>(r)
                    }
                });
                let _ = hyper::server::conn::http1::Builder::new()
                    .serve_connection(TokioIo::new(tls), svc)
                    .await;
            });
        }
    });
    (port, got)
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn https_subscriber_trusted_through_cacerts() {
    let tmp = tempfile::tempdir().expect("tempdir");
    let test_ca = ca_and_server(tmp.path());
    let ca = test_ca.ca_pem();
    let (port, got) = https_subscriber(&test_ca.server).await;
    let dls = Recorder::start().await;
    let indented: String = ca.lines().map(|l| format!("      {l}\n")).collect();
    let files = [
        ("b.yaml", broker_yaml("tls", "default", "")),
        (
            "trusted.yaml",
            trigger_yaml(
                "tls",
                "trusted",
                "default",
                &format!("https://127.0.0.1:{port}/trusted"),
                &format!("    CACerts: |\n{indented}  filters:\n    - exact: {{type: to.trusted}}"),
            ),
        ),
        (
            "untrusted.yaml",
            trigger_yaml(
                "tls",
                "untrusted",
                "default",
                &format!("https://127.0.0.1:{port}/untrusted"),
                &format!(
                    "  filters:\n    - exact: {{type: to.untrusted}}\n  delivery:\n    retry: 0\n    deadLetterSink:\n      uri: {}",
                    dls.url("/dls")
                ),
            ),
        ),
        (
            "bad.yaml",
            trigger_yaml(
                "tls",
                "bad",
                "default",
                &format!("https://127.0.0.1:{port}/bad"),
                "    CACerts: not a certificate",
            ),
        ),
    ];
    let mut b = BrokerProc::start(&files, &[], &[]).await;
    let url = b.url("/tls/default");
    assert_eq!(
        send_binary(&url, "t", "to.trusted", &[]).await,
        StatusCode::ACCEPTED
    );
    assert_eq!(
        send_binary(&url, "u", "to.untrusted", &[]).await,
        StatusCode::ACCEPTED
    );
    let dead = dls.wait_n("/dls", 1, WAIT).await;
    let deadline = std::time::Instant::now() + WAIT;
    while got.lock().expect("lock").is_empty() && std::time::Instant::now() < deadline {
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    assert_eq!(
        got.lock().expect("lock").as_slice(),
        ["/trusted"],
        "only the trigger that trusts the test CA gets through: {}",
        b.logs()
    );
    assert_eq!(dead.len(), 1, "{}", b.logs());
    assert_eq!(dead[0].ce("id").as_deref(), Some("u"));
    assert_eq!(
        dead[0].ce("knativeerrordest"),
        Some(format!("https://127.0.0.1:{port}/untrusted"))
    );
    assert!(
        b.logs().contains("CACerts"),
        "the trigger with a malformed CACerts is rejected with the reason: {}",
        b.logs()
    );
    b.assert_alive();
}
