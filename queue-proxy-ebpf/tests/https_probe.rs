//! Differential case: readiness probes with `scheme: HTTPS` against a user container that
//! serves a self-signed certificate, with and without HTTP/2 auto-detection. Needs `openssl`
//! (Debian package openssl) to make the certificate and Knative's queue-proxy as the oracle.

mod common;

use std::convert::Infallible;
use std::path::Path;
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, Ordering};

use bytes::Bytes;
use http::{Request, Response, StatusCode};
use http_body_util::Full;
use hyper::body::Incoming;
use hyper::service::service_fn;
use hyper_util::rt::TokioIo;

use common::*;
use spright_test_support::TestDir;
use spright_test_support::tls::{self, Certificate};

/// An HTTPS user container: 200 while `ready`, 503 otherwise.
struct TlsUpstream {
    port: u16,
    ready: Arc<AtomicBool>,
    rt: Option<tokio::runtime::Runtime>,
}

impl Drop for TlsUpstream {
    fn drop(&mut self) {
        if let Some(rt) = self.rt.take() {
            rt.shutdown_background();
        }
    }
}

impl TlsUpstream {
    fn start(certificate: &Certificate) -> Self {
        let acceptor = tokio_rustls::TlsAcceptor::from(certificate.server_config());
        let rt = tokio::runtime::Builder::new_multi_thread()
            .worker_threads(1)
            .enable_all()
            .build()
            .expect("runtime");
        let listener = rt
            .block_on(tokio::net::TcpListener::bind("127.0.0.1:0"))
            .expect("bind");
        let port = listener.local_addr().expect("addr").port();
        let ready = Arc::new(AtomicBool::new(true));
        let r = Arc::clone(&ready);
        rt.spawn(async move {
            loop {
                let Ok((s, _)) = listener.accept().await else {
                    continue;
                };
                let (acceptor, r) = (acceptor.clone(), Arc::clone(&r));
                tokio::spawn(async move {
                    let Ok(tls) = acceptor.accept(s).await else {
                        return;
                    };
                    let svc = service_fn(move |_req: Request<Incoming>| {
                        let ok = r.load(Ordering::SeqCst);
                        async move {
                            let mut res = Response::new(Full::new(Bytes::from_static(b"ok")));
                            if !ok {
                                *res.status_mut() = StatusCode::SERVICE_UNAVAILABLE;
                            }
                            Ok::<_, Infallible>(res)
                        }
                    });
                    let _ = hyper::server::conn::http1::Builder::new()
                        .serve_connection(TokioIo::new(tls), svc)
                        .await;
                });
            }
        });
        Self {
            port,
            ready,
            rt: Some(rt),
        }
    }
}

/// Probes the HTTPS container through both queue-proxies (ready, then not ready).
fn probe_both(
    up: &Upstream,
    tls_up: &TlsUpstream,
    auto_h2: bool,
    ca_file: Option<&Path>,
) -> Vec<(u16, u16)> {
    let probe = [
        ("user-agent", "kube-probe/1.30"),
        ("k-network-probe", "queue"),
    ];
    let mut env = knative_env(up.port);
    env.insert(
        "SERVING_READINESS_PROBE".into(),
        format!(
            r#"{{"httpGet":{{"port":{},"host":"127.0.0.1","path":"/healthz","scheme":"HTTPS"}},"periodSeconds":1,"timeoutSeconds":1,"successThreshold":1}}"#,
            tls_up.port
        ),
    );
    env.insert("ENABLE_HTTP2_AUTO_DETECTION".into(), auto_h2.to_string());
    if let Some(f) = ca_file {
        env.insert("SSL_CERT_FILE".into(), f.display().to_string());
    }
    let mut results = Vec::new();
    for which in [Impl::Knative, Impl::Ours] {
        let p = start(which, &env, None);
        let a = get(p.ports.serving, "/", &probe).status;
        tls_up.ready.store(false, Ordering::SeqCst);
        let b = get(p.ports.serving, "/", &probe).status;
        tls_up.ready.store(true, Ordering::SeqCst);
        results.push((a, b));
    }
    results
}

#[test]
fn https_readiness_probes() {
    assert!(
        Path::new(KNATIVE_QUEUE).exists(),
        "Knative's queue-proxy is missing at {KNATIVE_QUEUE}: go install knative.dev/serving/cmd/queue@v0.50.0"
    );
    let _g = port_lock();
    let dir = TestDir::new("qp-https-probe");
    let up = Upstream::start();

    // Knative's probe transports verify the certificate against the system's CAs, with and
    // without HTTP/2 auto-detection: a self-signed one fails, one from a CA that
    // SSL_CERT_FILE names passes.
    let self_signed = TlsUpstream::start(&tls::self_signed(dir.path(), "self", "user-container"));
    let test_ca = tls::ca_and_server(dir.path());
    let signed = TlsUpstream::start(&test_ca.server);
    let ca = test_ca.ca;
    for auto_h2 in [false, true] {
        for (what, tls_up, ca_file, expect) in [
            ("self-signed", &self_signed, None, (503, 503)),
            ("CA-signed", &signed, Some(ca.as_path()), (200, 503)),
        ] {
            let r = probe_both(&up, tls_up, auto_h2, ca_file);
            assert_eq!(
                r[0], r[1],
                "{what}, auto-detect HTTP/2 {auto_h2}: Knative (left) and ours (right) differ"
            );
            assert_eq!(r[1], expect, "{what}, auto-detect HTTP/2 {auto_h2}");
        }
    }
}
