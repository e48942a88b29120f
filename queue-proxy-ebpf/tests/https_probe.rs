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

fn openssl(dir: &Path, args: &[&str]) {
    let out = std::process::Command::new("openssl")
        .current_dir(dir)
        .args(["req", "-x509", "-newkey", "ec", "-pkeyopt"])
        .args(["ec_paramgen_curve:prime256v1", "-nodes", "-days", "1"])
        .args(args)
        .output()
        .expect("openssl (Debian package openssl) generates test certificates");
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
}

/// A self-signed certificate (as `openssl req -x509` makes it: a CA certificate, no
/// subject alternative names), and a CA plus a leaf for 127.0.0.1 that it signed.
fn certificates(dir: &Path) {
    openssl(
        dir,
        &[
            "-subj",
            "/CN=user-container",
            "-keyout",
            "self.key",
            "-out",
            "self.pem",
        ],
    );
    openssl(
        dir,
        &[
            "-subj",
            "/CN=test-ca",
            "-keyout",
            "ca.key",
            "-out",
            "ca.pem",
        ],
    );
    openssl(
        dir,
        &[
            "-subj",
            "/CN=user-container",
            "-addext",
            "subjectAltName=IP:127.0.0.1",
            "-addext",
            "basicConstraints=critical,CA:FALSE",
            "-CA",
            "ca.pem",
            "-CAkey",
            "ca.key",
            "-keyout",
            "leaf.key",
            "-out",
            "leaf.pem",
        ],
    );
}

impl TlsUpstream {
    fn start(cert_pem: &[u8], key_pem: &[u8]) -> Self {
        let certs: Vec<_> = rustls_pemfile::certs(&mut &cert_pem[..])
            .collect::<Result<_, _>>()
            .expect("certs");
        let key = rustls_pemfile::private_key(&mut &key_pem[..])
            .expect("key")
            .expect("a key");
        let cfg = rustls::ServerConfig::builder_with_provider(Arc::new(
            rustls::crypto::ring::default_provider(),
        ))
        .with_safe_default_protocol_versions()
        .expect("versions")
        .with_no_client_auth()
        .with_single_cert(certs, key)
        .expect("server config");
        let acceptor = tokio_rustls::TlsAcceptor::from(Arc::new(cfg));
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
    let dir = std::env::temp_dir().join(format!("qp-https-probe-{}", std::process::id()));
    std::fs::create_dir_all(&dir).expect("dir");
    certificates(&dir);
    let read = |f: &str| std::fs::read(dir.join(f)).expect("certificate file");
    let up = Upstream::start();

    // Knative's probe transports verify the certificate against the system's CAs, with and
    // without HTTP/2 auto-detection: a self-signed one fails, one from a CA that
    // SSL_CERT_FILE names passes.
    let self_signed = TlsUpstream::start(&read("self.pem"), &read("self.key"));
    let signed = TlsUpstream::start(&read("leaf.pem"), &read("leaf.key"));
    let ca = dir.join("ca.pem");
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
    let _ = std::fs::remove_dir_all(&dir);
}
