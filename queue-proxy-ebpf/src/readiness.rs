//! Readiness probing of the user container (serving `pkg/queue/readiness/probe.go`,
//! `pkg/queue/health/probe.go`; knative-contract.md A.8).
//!
//! The controller moves the user container's readiness probe into `SERVING_READINESS_PROBE`
//! and the queue-proxy runs it when the kubelet probes the queue-proxy. TCP, HTTP (optionally
//! h2c first) and gRPC health probes; `periodSeconds == 0` means aggressive mode (an attempt
//! of 100 ms every 50 ms for up to 10 s until `successThreshold` consecutive successes).
//! Concurrent callers share one in-flight probe. With several containers all must pass.

use std::sync::Arc;
use std::sync::atomic::{AtomicI32, Ordering};
use std::time::Duration;

use bytes::{Buf, BufMut, Bytes, BytesMut};
use http::{Method, Request, header};
use http_body_util::{BodyExt, Empty, Full};
use hyper_util::rt::{TokioExecutor, TokioIo};
use serde::Deserialize;
use tokio::net::TcpStream;
use tokio::sync::{Mutex, watch};

const AGGRESSIVE_TIMEOUT: Duration = Duration::from_millis(100);
const POLL_TIMEOUT: Duration = Duration::from_secs(10);
const RETRY_INTERVAL: Duration = Duration::from_millis(50);

#[derive(Debug, thiserror::Error)]
pub enum ProbeConfigError {
    #[error("failed to parse readiness probe: {0}")]
    Json(String),
}

/// `intstr.IntOrString`.
#[derive(Debug, Clone, Deserialize, PartialEq)]
#[serde(untagged)]
pub enum Port {
    Int(i64),
    Str(String),
}

impl Port {
    fn render(&self) -> String {
        match self {
            Port::Int(i) => i.to_string(),
            Port::Str(s) => s.clone(),
        }
    }
}

#[derive(Debug, Clone, Deserialize, PartialEq)]
pub struct TcpAction {
    #[serde(default)]
    pub host: String,
    pub port: Port,
}

#[derive(Debug, Clone, Deserialize, PartialEq)]
pub struct HttpHeader {
    pub name: String,
    pub value: String,
}

#[derive(Debug, Clone, Deserialize, PartialEq)]
#[serde(rename_all = "camelCase")]
pub struct HttpAction {
    #[serde(default)]
    pub host: String,
    pub port: Port,
    #[serde(default)]
    pub path: String,
    #[serde(default)]
    pub scheme: String,
    #[serde(default)]
    pub http_headers: Vec<HttpHeader>,
}

#[derive(Debug, Clone, Deserialize, PartialEq)]
pub struct GrpcAction {
    pub port: i64,
    #[serde(default)]
    pub service: Option<String>,
}

/// The fields of a `corev1.Probe` the queue-proxy uses.
#[derive(Debug, Clone, Deserialize, PartialEq, Default)]
#[serde(rename_all = "camelCase", default)]
pub struct ProbeSpec {
    pub tcp_socket: Option<TcpAction>,
    pub http_get: Option<HttpAction>,
    pub grpc: Option<GrpcAction>,
    pub exec: Option<serde_json::Value>,
    pub period_seconds: i32,
    pub timeout_seconds: i32,
    pub success_threshold: i32,
}

/// Parses `SERVING_READINESS_PROBE`: one object, or an array with multi-container probes.
pub fn decode(json: &str, multi: bool) -> Result<Vec<ProbeSpec>, ProbeConfigError> {
    let err = |e: serde_json::Error| ProbeConfigError::Json(e.to_string());
    if multi {
        serde_json::from_str::<Vec<ProbeSpec>>(json).map_err(err)
    } else {
        serde_json::from_str::<Option<ProbeSpec>>(json)
            .map(|p| vec![p.unwrap_or_default()])
            .map_err(err)
    }
}

#[derive(Debug)]
struct Wrapped {
    spec: ProbeSpec,
    count: AtomicI32,
}

/// Probes the user container; `None` probes mean "always ready".
#[derive(Debug)]
pub struct Prober {
    probes: Vec<Wrapped>,
    auto_h2: bool,
    in_flight: Mutex<Option<watch::Receiver<Option<bool>>>>,
}

type ProbeError = String;

impl Prober {
    pub fn new(specs: Vec<ProbeSpec>, auto_h2: bool) -> Arc<Self> {
        Arc::new(Self {
            probes: specs
                .into_iter()
                .map(|spec| Wrapped {
                    spec,
                    count: AtomicI32::new(0),
                })
                .collect(),
            auto_h2,
            in_flight: Mutex::new(None),
        })
    }

    /// Runs the probes, sharing a probe already in flight.
    pub async fn probe(self: &Arc<Self>) -> bool {
        if self.probes.is_empty() {
            return true;
        }
        let tx = {
            let mut g = self.in_flight.lock().await;
            if let Some(rx) = g.as_ref() {
                let mut rx = rx.clone();
                drop(g);
                return match rx.wait_for(Option::is_some).await {
                    Ok(v) => v.unwrap_or(false),
                    Err(_) => false,
                };
            }
            let (tx, rx) = watch::channel(None);
            *g = Some(rx);
            tx
        };
        // Run in its own task so a caller that goes away does not strand the others.
        let me = Arc::clone(self);
        let result = tokio::spawn(async move {
            let results = futures::future::join_all(me.probes.iter().map(|p| me.run(p))).await;
            let mut ok = true;
            for r in results {
                if let Err(e) = r {
                    tracing::warn!(error = %e, "readiness probe failed");
                    ok = false;
                }
            }
            *me.in_flight.lock().await = None;
            ok
        })
        .await
        .unwrap_or(false);
        let _ = tx.send(Some(result));
        result
    }

    async fn run(&self, p: &Wrapped) -> Result<(), ProbeError> {
        let spec = &p.spec;
        if spec.period_seconds != 0 {
            let t = Duration::from_secs(u64::try_from(spec.timeout_seconds.max(1)).unwrap_or(1));
            return self.attempt(spec, t).await;
        }
        let deadline = tokio::time::Instant::now() + POLL_TIMEOUT;
        let mut last = String::from("probe timed out");
        let mut failures = 0u32;
        loop {
            match self.attempt(spec, AGGRESSIVE_TIMEOUT).await {
                Ok(()) => {
                    let n = p.count.fetch_add(1, Ordering::AcqRel) + 1;
                    if n >= spec.success_threshold {
                        return Ok(());
                    }
                }
                Err(e) => {
                    p.count.store(0, Ordering::Release);
                    failures += 1;
                    last = e;
                }
            }
            if tokio::time::Instant::now() + RETRY_INTERVAL > deadline {
                return Err(format!(
                    "aggressive probe error (failed {failures} times): {last}"
                ));
            }
            tokio::time::sleep(RETRY_INTERVAL).await;
        }
    }

    async fn attempt(&self, spec: &ProbeSpec, timeout: Duration) -> Result<(), ProbeError> {
        let fut = async {
            if let Some(h) = &spec.http_get {
                http_probe(h, self.auto_h2).await
            } else if let Some(t) = &spec.tcp_socket {
                let host = if t.host.is_empty() {
                    "127.0.0.1"
                } else {
                    &t.host
                };
                connect(host, &t.port.render()).await.map(drop)
            } else if let Some(g) = &spec.grpc {
                grpc_probe(g).await
            } else if spec.exec.is_some() {
                Err("exec probe not supported".into())
            } else {
                Err("no probe found".into())
            }
        };
        tokio::time::timeout(timeout, fut)
            .await
            .map_err(|_| format!("probe timed out after {timeout:?}"))?
    }
}

async fn connect(host: &str, port: &str) -> Result<TcpStream, ProbeError> {
    let addr = if host.contains(':') {
        format!("[{host}]:{port}")
    } else {
        format!("{host}:{port}")
    };
    TcpStream::connect(&addr)
        .await
        .map_err(|e| format!("dial tcp {addr}: {e}"))
}

async fn http_probe(h: &HttpAction, auto_h2: bool) -> Result<(), ProbeError> {
    // The controller always defaults the scheme; like Knative, a probe without one fails.
    if h.scheme.is_empty() {
        return Err("error constructing probe url: missing protocol scheme".into());
    }
    let host = if h.host.is_empty() {
        "127.0.0.1"
    } else {
        &h.host
    };
    let port = h.port.render();
    let path = format!("/{}", h.path.trim_start_matches('/'));
    if h.scheme.eq_ignore_ascii_case("https") {
        return https_get(h, host, &port, &path).await;
    }
    if !h.scheme.eq_ignore_ascii_case("http") {
        return Err(format!(
            "unsupported protocol scheme {:?}",
            h.scheme.to_ascii_lowercase()
        ));
    }
    if auto_h2 && http_get(h, host, &port, &path, true).await.is_ok() {
        return Ok(());
    }
    http_get(h, host, &port, &path, false).await
}

/// Where Go looks for the system's CA bundle on Linux (after `SSL_CERT_FILE`).
const CA_BUNDLES: [&str; 6] = [
    "/etc/ssl/certs/ca-certificates.crt",
    "/etc/pki/tls/certs/ca-bundle.crt",
    "/etc/ssl/ca-bundle.pem",
    "/etc/pki/tls/cacert.pem",
    "/etc/pki/ca-trust/extracted/pem/tls-ca-bundle.pem",
    "/etc/ssl/cert.pem",
];

/// The system's trusted CAs, as Go's default transport loads them; none if no bundle exists
/// (then every certificate is refused, as in Go).
fn system_roots() -> rustls::RootCertStore {
    let mut roots = rustls::RootCertStore::empty();
    let from_env = std::env::var("SSL_CERT_FILE")
        .ok()
        .filter(|p| !p.is_empty());
    let pem = from_env
        .iter()
        .map(String::as_str)
        .chain(CA_BUNDLES)
        .find_map(|p| std::fs::read(p).ok());
    if let Some(pem) = pem {
        let mut rd = pem.as_slice();
        let certs = rustls_pemfile::certs(&mut rd).filter_map(Result::ok);
        roots.add_parsable_certificates(certs);
    }
    roots
}

/// Client TLS for HTTPS probes: like Knative's probe transports (Go's default TLS
/// settings), the certificate is verified against the system's CAs, with or without HTTP/2
/// auto-detection (the differential suite shows a self-signed certificate failing in both).
fn probe_tls() -> Result<Arc<rustls::ClientConfig>, ProbeError> {
    static CONFIG: std::sync::OnceLock<Result<Arc<rustls::ClientConfig>, String>> =
        std::sync::OnceLock::new();
    CONFIG
        .get_or_init(|| {
            let provider = Arc::new(rustls::crypto::ring::default_provider());
            let cfg = rustls::ClientConfig::builder_with_provider(provider)
                .with_safe_default_protocol_versions()
                .map_err(|e| e.to_string())?
                .with_root_certificates(system_roots())
                .with_no_client_auth();
            Ok(Arc::new(cfg))
        })
        .clone()
}

/// An HTTPS probe over HTTP/1.1, the certificate verified (see [`probe_tls`]).
async fn https_get(h: &HttpAction, host: &str, port: &str, path: &str) -> Result<(), ProbeError> {
    let stream = connect(host, port).await?;
    let name = rustls::pki_types::ServerName::try_from(host.to_owned())
        .map_err(|e| format!("error constructing probe request {e}"))?;
    let tls = tokio_rustls::TlsConnector::from(probe_tls()?)
        .connect(name, stream)
        .await
        .map_err(|e| format!("tls handshake with {host}:{port}: {e}"))?;
    let req = probe_request(h, path, Some(&format!("{host}:{port}")))?;
    ready_status(h1_exchange(TokioIo::new(tls), req).await?)
}

/// One HTTP/1.1 request on `io`; the status, once the body has been read.
async fn h1_exchange<T>(io: T, req: Request<Empty<Bytes>>) -> Result<http::StatusCode, ProbeError>
where
    T: hyper::rt::Read + hyper::rt::Write + Unpin + Send + 'static,
{
    let (mut send, conn) = hyper::client::conn::http1::handshake(io)
        .await
        .map_err(|e| e.to_string())?;
    tokio::spawn(conn);
    let res = send.send_request(req).await.map_err(|e| e.to_string())?;
    let status = res.status();
    let _ = res.into_body().collect().await;
    Ok(status)
}

fn probe_request(
    h: &HttpAction,
    target: &str,
    host: Option<&str>,
) -> Result<Request<Empty<Bytes>>, ProbeError> {
    let mut req = Request::builder()
        .method(Method::GET)
        .uri(target)
        .header(header::USER_AGENT, "kube-probe//");
    if let Some(host) = host {
        req = req.header(header::HOST, host);
    }
    for hh in &h.http_headers {
        req = req.header(hh.name.as_str(), hh.value.as_str());
    }
    req.body(Empty::<Bytes>::new())
        .map_err(|e| format!("error constructing probe request {e}"))
}

fn ready_status(status: http::StatusCode) -> Result<(), ProbeError> {
    if (200..400).contains(&status.as_u16()) {
        Ok(())
    } else {
        Err(format!(
            "HTTP probe did not respond Ready, got status code: {}",
            status.as_u16()
        ))
    }
}

async fn http_get(
    h: &HttpAction,
    host: &str,
    port: &str,
    path: &str,
    h2: bool,
) -> Result<(), ProbeError> {
    let stream = connect(host, port).await?;
    let req = if h2 {
        probe_request(h, &format!("http://{host}:{port}{path}"), None)?
    } else {
        probe_request(h, path, Some(&format!("{host}:{port}")))?
    };
    let io = TokioIo::new(stream);
    let status = if h2 {
        let (mut send, conn) = hyper::client::conn::http2::handshake(TokioExecutor::new(), io)
            .await
            .map_err(|e| e.to_string())?;
        tokio::spawn(conn);
        let res = send.send_request(req).await.map_err(|e| e.to_string())?;
        res.status()
    } else {
        h1_exchange(io, req).await?
    };
    ready_status(status)
}

#[derive(Clone, PartialEq, prost::Message)]
struct HealthCheckRequest {
    #[prost(string, tag = "1")]
    service: String,
}

#[derive(Clone, PartialEq, prost::Message)]
struct HealthCheckResponse {
    #[prost(int32, tag = "1")]
    status: i32,
}

/// `grpc.health.v1.HealthCheckResponse.ServingStatus.SERVING`.
const SERVING: i32 = 1;

async fn grpc_probe(g: &GrpcAction) -> Result<(), ProbeError> {
    use prost::Message;
    let stream = connect("127.0.0.1", &g.port.to_string()).await?;
    let msg = HealthCheckRequest {
        service: g.service.clone().unwrap_or_default(),
    }
    .encode_to_vec();
    let mut framed = BytesMut::with_capacity(5 + msg.len());
    framed.put_u8(0);
    framed.put_u32(u32::try_from(msg.len()).unwrap_or(u32::MAX));
    framed.put_slice(&msg);
    let req = Request::builder()
        .method(Method::POST)
        .uri(format!(
            "http://127.0.0.1:{}/grpc.health.v1.Health/Check",
            g.port
        ))
        .header(header::CONTENT_TYPE, "application/grpc")
        .header("te", "trailers")
        .header(header::USER_AGENT, "kube-probe//")
        .body(Full::new(framed.freeze()))
        .map_err(|e| e.to_string())?;
    let (mut send, conn) =
        hyper::client::conn::http2::handshake(TokioExecutor::new(), TokioIo::new(stream))
            .await
            .map_err(|e| format!("failed to connect service: {e}"))?;
    tokio::spawn(conn);
    let res = send
        .send_request(req)
        .await
        .map_err(|e| format!("health rpc probe failed: {e}"))?;
    let head_status = res
        .headers()
        .get("grpc-status")
        .and_then(|v| v.to_str().ok())
        .map(str::to_owned);
    let collected = res
        .into_body()
        .collect()
        .await
        .map_err(|e| format!("health rpc probe failed: {e}"))?;
    let trailer_status = collected
        .trailers()
        .and_then(|t| t.get("grpc-status"))
        .and_then(|v| v.to_str().ok())
        .map(str::to_owned);
    let code = trailer_status.or(head_status).unwrap_or_default();
    if code != "0" {
        return Err(match code.as_str() {
            "12" => {
                "this server does not implement the grpc health protocol (grpc.health.v1.Health)"
                    .into()
            }
            _ => format!("health rpc probe failed: grpc-status {code}"),
        });
    }
    let mut body = collected.to_bytes();
    if body.len() < 5 {
        return Err("health rpc probe failed: empty response".into());
    }
    body.advance(1);
    let len = usize::try_from(body.get_u32()).unwrap_or(usize::MAX);
    let msg = body
        .get(..len)
        .ok_or("health rpc probe failed: short response")?;
    let resp = HealthCheckResponse::decode(msg).map_err(|e| e.to_string())?;
    if resp.status == SERVING {
        Ok(())
    } else {
        Err(format!(
            "service unhealthy (responded with status {})",
            resp.status
        ))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn decodes_single_and_multi() {
        let p = decode(r#"{"tcpSocket":{"port":8080,"host":"127.0.0.1"}}"#, false).expect("ok");
        assert_eq!(p.len(), 1);
        assert_eq!(
            p[0].tcp_socket.as_ref().map(|t| t.port.clone()),
            Some(Port::Int(8080))
        );
        assert_eq!(p[0].period_seconds, 0);
        let p = decode(
            r#"[{"httpGet":{"port":"8080","path":"healthz","httpHeaders":[{"name":"a","value":"b"}]},"periodSeconds":1},{"grpc":{"port":9000}}]"#,
            true,
        )
        .expect("ok");
        assert_eq!(p.len(), 2);
        assert!(decode("{", false).is_err());
        assert!(decode("{}", true).is_err());
    }

    #[tokio::test]
    async fn tcp_probe_against_listener() {
        let l = tokio::net::TcpListener::bind("127.0.0.1:0")
            .await
            .expect("bind");
        let port = l.local_addr().expect("addr").port();
        let spec = ProbeSpec {
            tcp_socket: Some(TcpAction {
                host: "127.0.0.1".into(),
                port: Port::Int(i64::from(port)),
            }),
            period_seconds: 1,
            ..ProbeSpec::default()
        };
        let p = Prober::new(vec![spec.clone()], false);
        assert!(p.probe().await);
        drop(l);
        assert!(!p.probe().await);
    }

    #[test]
    fn random_json_never_panics() {
        use rand::{Rng, SeedableRng};
        let mut rng = rand::rngs::StdRng::seed_from_u64(5);
        let alphabet = br#"{}[]":,0123tcpSocketporthttpGet"#;
        for _ in 0..3000 {
            let s: String = (0..rng.gen_range(0..40))
                .map(|_| char::from(alphabet[rng.gen_range(0..alphabet.len())]))
                .collect();
            let _ = decode(&s, rng.gen_bool(0.5));
        }
    }
}
