//! Delivery to subscribers: one attempt through a [`Sink`], retries with backoff, and the
//! dead-letter sink with Knative's error extensions (knative-contract C.3, C.6).

use crate::event::CloudEvent;
use crate::manifests::{Delivery, Format, Target};
use base64::Engine as _;
use base64::engine::general_purpose::STANDARD as B64;
use bytes::Bytes;
use http::{HeaderMap, Method, Request, StatusCode};
use http_body_util::{BodyExt, Full, Limited};
use hyper_rustls::{HttpsConnector, HttpsConnectorBuilder};
use hyper_util::client::legacy::Client;
use hyper_util::client::legacy::connect::HttpConnector;
use hyper_util::rt::TokioExecutor;
use rustls::pki_types::CertificateDer;
use std::collections::HashMap;
use std::future::Future;
use std::pin::Pin;
use std::sync::{Arc, Mutex, OnceLock};
use std::time::Duration;

/// Largest subscriber response body read (bigger replies fail the attempt).
pub const MAX_RESPONSE_BYTES: usize = 16 << 20;
/// `knativeerrordata` is at most this many characters of base64 (Knative's
/// `KnativeErrorDataExtensionMaxLength`): the first 768 bytes of the response body.
pub const ERROR_DATA_MAX: usize = 1024;

/// How one attempt should be sent.
#[derive(Debug, Clone)]
pub struct SendOptions {
    pub format: Format,
    pub timeout: Option<Duration>,
    /// `Kn-Namespace` header value (the trigger's namespace); empty for none.
    pub namespace: String,
    /// Send `Prefer: reply`.
    pub prefer_reply: bool,
    /// Extra headers passed through (e.g. from the original request).
    pub extra_headers: HeaderMap,
    /// PEM CA certificates trusted for an `https` target besides the system roots
    /// (Knative's Destination `CACerts`).
    pub ca_certs: Option<String>,
}

/// The outcome of one attempt.
#[derive(Debug, Clone, Default)]
pub struct Attempt {
    /// Response status; `None` when no response arrived.
    pub status: Option<u16>,
    pub headers: HeaderMap,
    pub body: Bytes,
    /// Transport error text.
    pub error: Option<String>,
}

impl Attempt {
    /// A failure without a response.
    pub fn failed(msg: impl Into<String>) -> Attempt {
        Attempt {
            error: Some(msg.into()),
            ..Attempt::default()
        }
    }

    /// 2xx and no transport error.
    pub fn is_success(&self) -> bool {
        self.error.is_none() && self.status.is_some_and(|s| (200..300).contains(&s))
    }

    /// Retry table: network errors, 5xx, 404, 408, 409, 429.
    pub fn is_retryable(&self) -> bool {
        match self.status {
            None => true,
            Some(s) => s >= 500 || matches!(s, 404 | 408 | 409 | 429),
        }
    }

    /// The reply event in a 2xx response. `Err` (treated as 502) when the body is non-empty
    /// but not a valid CloudEvent.
    pub fn reply(&self) -> Result<Option<CloudEvent>, String> {
        if self.body.is_empty() && !self.headers.contains_key("ce-specversion") {
            return Ok(None);
        }
        CloudEvent::from_http(&self.headers, self.body.clone())
            .map(Some)
            .map_err(|e| {
                format!(
                    "subscriber replied with a non-empty body that is not a valid CloudEvent: {e}"
                )
            })
    }
}

/// Boxed future used by [`Sink`].
pub type SinkFuture<'a> = Pin<Box<dyn Future<Output = Attempt> + Send + 'a>>;

/// Receives the outcome of an attempt started with [`Sink::start`], on whichever thread
/// learns it (for the shared-memory path, the thread that reads the function's answer).
pub type Done = Box<dyn FnOnce(Attempt) + Send>;

/// Something events are delivered to: HTTP, or a shared-memory function of the dataplane SDK.
pub trait Sink: Send + Sync {
    /// Makes exactly one delivery attempt.
    fn send<'a>(
        &'a self,
        target: &'a Target,
        event: &'a CloudEvent,
        opts: &'a SendOptions,
    ) -> SinkFuture<'a>;

    /// Starts one attempt without a task waiting for it: `done` gets the outcome. A sink
    /// that cannot do this hands `done` back (`Err`) and the caller uses [`Sink::send`].
    fn start(
        &self,
        target: &Target,
        event: &CloudEvent,
        opts: &SendOptions,
        done: Done,
    ) -> Result<(), Done> {
        let _ = (target, event, opts);
        Err(done)
    }
}

type HttpsClient = Client<HttpsConnector<HttpConnector>, Full<Bytes>>;

/// HTTP/1.1 delivery with pooled hyper clients, over TLS for `https` targets: one client
/// trusting the system roots, and one per distinct `CACerts` set (system roots plus those).
#[derive(Clone)]
pub struct HttpSink {
    client: HttpsClient,
    with_ca: Arc<Mutex<HashMap<String, HttpsClient>>>,
}

impl std::fmt::Debug for HttpSink {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str("HttpSink")
    }
}

/// The system's trusted roots (loaded once; unreadable entries are skipped with a warning).
fn system_roots() -> &'static [CertificateDer<'static>] {
    static ROOTS: OnceLock<Vec<CertificateDer<'static>>> = OnceLock::new();
    ROOTS.get_or_init(|| {
        let found = rustls_native_certs::load_native_certs();
        for e in &found.errors {
            tracing::warn!(error = %e, "skipping unreadable system CA certificates");
        }
        found.certs
    })
}

/// Parses PEM `CACerts`: at least one certificate, nothing malformed.
pub fn parse_ca_certs(pem: &str) -> Result<Vec<CertificateDer<'static>>, String> {
    let certs: Vec<CertificateDer<'static>> = rustls_pemfile::certs(&mut pem.as_bytes())
        .collect::<Result<_, _>>()
        .map_err(|e| format!("CACerts is not valid PEM: {e}"))?;
    if certs.is_empty() {
        return Err("CACerts holds no PEM certificate".into());
    }
    Ok(certs)
}

fn build_client(ca_certs: Option<&str>) -> Result<HttpsClient, String> {
    let mut roots = rustls::RootCertStore::empty();
    let (_, ignored) = roots.add_parsable_certificates(system_roots().iter().cloned());
    if ignored > 0 {
        tracing::debug!(ignored, "system CA certificates rustls cannot use");
    }
    if let Some(pem) = ca_certs {
        for cert in parse_ca_certs(pem)? {
            roots
                .add(cert)
                .map_err(|e| format!("CACerts certificate rejected: {e}"))?;
        }
    }
    let tls = rustls::ClientConfig::builder_with_provider(Arc::new(
        rustls::crypto::ring::default_provider(),
    ))
    .with_safe_default_protocol_versions()
    .map_err(|e| format!("TLS setup: {e}"))?
    .with_root_certificates(roots)
    .with_no_client_auth();
    let mut conn = HttpConnector::new();
    conn.set_nodelay(true);
    conn.enforce_http(false);
    let https = HttpsConnectorBuilder::new()
        .with_tls_config(tls)
        .https_or_http()
        .enable_http1()
        .wrap_connector(conn);
    Ok(Client::builder(TokioExecutor::new())
        .pool_max_idle_per_host(1000)
        .pool_idle_timeout(Duration::from_secs(30))
        .build(https))
}

impl Default for HttpSink {
    fn default() -> Self {
        let client = build_client(None).unwrap_or_else(|e| {
            // Only the TLS protocol setup can fail here, and ring supports the defaults.
            tracing::error!(error = %e, "TLS client setup failed; https targets will fail");
            let mut conn = HttpConnector::new();
            conn.set_nodelay(true);
            Client::builder(TokioExecutor::new()).build(
                HttpsConnectorBuilder::new()
                    .with_tls_config(
                        rustls::ClientConfig::builder_with_provider(Arc::new(
                            rustls::crypto::ring::default_provider(),
                        ))
                        .with_protocol_versions(&[&rustls::version::TLS13])
                        .unwrap_or_else(|_| unreachable!("ring supports TLS 1.3"))
                        .with_root_certificates(rustls::RootCertStore::empty())
                        .with_no_client_auth(),
                    )
                    .https_or_http()
                    .enable_http1()
                    .wrap_connector(conn),
            )
        });
        HttpSink {
            client,
            with_ca: Arc::default(),
        }
    }
}

impl HttpSink {
    fn client_for(&self, ca_certs: Option<&str>) -> Result<HttpsClient, String> {
        let Some(pem) = ca_certs.filter(|p| !p.trim().is_empty()) else {
            return Ok(self.client.clone());
        };
        let mut cache = self
            .with_ca
            .lock()
            .unwrap_or_else(std::sync::PoisonError::into_inner);
        if let Some(c) = cache.get(pem) {
            return Ok(c.clone());
        }
        let c = build_client(Some(pem))?;
        cache.insert(pem.to_string(), c.clone());
        Ok(c)
    }
}

/// Builds the HTTP request for an event.
pub fn build_request(
    url: &str,
    event: &CloudEvent,
    opts: &SendOptions,
) -> Result<Request<Full<Bytes>>, String> {
    let mut builder = Request::builder().method(Method::POST).uri(url);
    let headers = builder
        .headers_mut()
        .ok_or_else(|| format!("invalid URL {url}"))?;
    for (k, v) in &opts.extra_headers {
        headers.insert(k.clone(), v.clone());
    }
    let body = match opts.format {
        Format::Binary => {
            for (k, v) in event.binary_headers() {
                if let Some(k) = k {
                    headers.insert(k, v);
                }
            }
            event.data.clone().unwrap_or_default()
        }
        Format::Structured => {
            headers.insert(
                http::header::CONTENT_TYPE,
                http::HeaderValue::from_static("application/cloudevents+json"),
            );
            Bytes::from(event.to_structured())
        }
    };
    if opts.prefer_reply {
        headers.insert("prefer", http::HeaderValue::from_static("reply"));
    }
    if !opts.namespace.is_empty()
        && let Ok(v) = http::HeaderValue::from_str(&opts.namespace)
    {
        headers.insert("kn-namespace", v);
    }
    builder
        .body(Full::new(body))
        .map_err(|e| format!("cannot build request to {url}: {e}"))
}

impl HttpSink {
    /// POSTs an event to a URL, once.
    pub async fn post(&self, url: &str, event: &CloudEvent, opts: &SendOptions) -> Attempt {
        let req = match build_request(url, event, opts) {
            Ok(r) => r,
            Err(e) => return Attempt::failed(e),
        };
        let client = match self.client_for(opts.ca_certs.as_deref()) {
            Ok(c) => c,
            Err(e) => return Attempt::failed(e),
        };
        let fut = async {
            let resp = client.request(req).await.map_err(|e| {
                let mut msg = e.to_string();
                let mut src = std::error::Error::source(&e);
                while let Some(s) = src {
                    msg.push_str(": ");
                    msg.push_str(&s.to_string());
                    src = s.source();
                }
                msg
            })?;
            let (parts, body) = resp.into_parts();
            let body = Limited::new(body, MAX_RESPONSE_BYTES)
                .collect()
                .await
                .map_err(|e| format!("reading response body: {e}"))?
                .to_bytes();
            Ok::<_, String>(Attempt {
                status: Some(parts.status.as_u16()),
                headers: parts.headers,
                body,
                error: None,
            })
        };
        let res = match opts.timeout {
            Some(t) => match tokio::time::timeout(t, fut).await {
                Ok(r) => r,
                Err(_) => Err(format!("timed out after {t:?}")),
            },
            None => fut.await,
        };
        res.unwrap_or_else(Attempt::failed)
    }
}

/// Routes attempts by target kind.
#[derive(Clone, Default)]
pub struct Sinks {
    pub http: HttpSink,
    /// The shared-memory fast path, when this node runs the dataplane.
    pub shm: Option<Arc<dyn Sink>>,
}

impl std::fmt::Debug for Sinks {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Sinks")
            .field("shm", &self.shm.is_some())
            .finish()
    }
}

impl Sinks {
    /// One attempt to any target.
    pub async fn send(&self, target: &Target, event: &CloudEvent, opts: &SendOptions) -> Attempt {
        match target {
            Target::Http(url) => self.http.post(url, event, opts).await,
            Target::ShmFunction(name) => match &self.shm {
                Some(s) => s.send(target, event, opts).await,
                None => Attempt::failed(format!(
                    "shared-memory function {name}: no dataplane on this node"
                )),
            },
        }
    }

    /// Sends with the delivery's retries and backoff. A 2xx whose body is not a CloudEvent
    /// counts as a 502 failure (what Knative's filter answers), and is retried.
    pub async fn send_with_retries(
        &self,
        target: &Target,
        event: &CloudEvent,
        opts: &SendOptions,
        delivery: &Delivery,
    ) -> (Attempt, Option<CloudEvent>) {
        self.send_with_retries_after(target, event, opts, delivery, None)
            .await
    }

    /// [`Sinks::send_with_retries`] when the first attempt may already have been made.
    pub async fn send_with_retries_after(
        &self,
        target: &Target,
        event: &CloudEvent,
        opts: &SendOptions,
        delivery: &Delivery,
        mut first: Option<Attempt>,
    ) -> (Attempt, Option<CloudEvent>) {
        let mut n = 0u32;
        loop {
            let mut attempt = match first.take() {
                Some(a) => a,
                None => self.send(target, event, opts).await,
            };
            if attempt.is_success() {
                match attempt.reply() {
                    Ok(reply) => return (attempt, reply),
                    Err(e) => {
                        attempt.status = Some(StatusCode::BAD_GATEWAY.as_u16());
                        attempt.error = Some(e);
                    }
                }
            }
            if !attempt.is_retryable() || n >= delivery.retry {
                return (attempt, None);
            }
            n += 1;
            let retry_after = attempt
                .headers
                .get(http::header::RETRY_AFTER)
                .and_then(|v| v.to_str().ok());
            tokio::time::sleep(delivery.retry_delay(n, attempt.status, retry_after)).await;
        }
    }
}

/// Adds `knativeerrordest`, `knativeerrorcode` and `knativeerrordata` for the dead-letter sink.
pub fn with_error_extensions(event: &CloudEvent, dest: &Target, failure: &Attempt) -> CloudEvent {
    let mut ev = event.clone();
    ev.set("knativeerrordest", dest.display());
    // As kncloudevents' dispatcher: no response at all counts as 500 with the dispatch error
    // as the body; the data is always there (empty when the body was).
    let (code, body) = match failure.status {
        Some(code) => (code, failure.body.clone()),
        None => (
            500,
            Bytes::from(format!(
                "dispatch error: {}",
                failure.error.as_deref().unwrap_or("no response")
            )),
        ),
    };
    ev.set("knativeerrorcode", code.to_string());
    let n = body.len().min(ERROR_DATA_MAX / 4 * 3);
    ev.set("knativeerrordata", B64.encode(&body[..n]));
    ev
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn retry_table() {
        let with = |s| Attempt {
            status: Some(s),
            ..Attempt::default()
        };
        for s in [500, 502, 503, 404, 408, 409, 429] {
            assert!(with(s).is_retryable(), "{s}");
        }
        for s in [300, 400, 401, 403, 410, 413] {
            assert!(!with(s).is_retryable(), "{s}");
        }
        assert!(Attempt::failed("x").is_retryable());
        assert!(with(202).is_success());
    }

    #[test]
    fn error_extensions() {
        let ev = CloudEvent::new("1", "/s", "t");
        let fail = Attempt {
            status: Some(500),
            body: Bytes::from(vec![b'a'; 2000]),
            ..Attempt::default()
        };
        let out = with_error_extensions(&ev, &Target::Http("http://x/y".into()), &fail);
        assert_eq!(out.get("knativeerrordest"), Some("http://x/y"));
        assert_eq!(out.get("knativeerrorcode"), Some("500"));
        assert_eq!(
            out.get("knativeerrordata").map(str::len),
            Some(ERROR_DATA_MAX)
        );
        let data = B64.decode(out.get("knativeerrordata").unwrap()).unwrap();
        assert_eq!(data.len(), 768);
        // An empty body still gives the extension; no response is 500 with the error.
        let empty = Attempt {
            status: Some(503),
            ..Attempt::default()
        };
        let out = with_error_extensions(&ev, &Target::Http("http://x/y".into()), &empty);
        assert_eq!(out.get("knativeerrordata"), Some(""));
        let out = with_error_extensions(
            &ev,
            &Target::Http("http://x/y".into()),
            &Attempt::failed("connection refused"),
        );
        assert_eq!(out.get("knativeerrorcode"), Some("500"));
        let data = B64.decode(out.get("knativeerrordata").unwrap()).unwrap();
        assert_eq!(data, b"dispatch error: connection refused");
    }

    #[test]
    fn request_shapes() {
        let mut ev = CloudEvent::new("1", "/s", "t");
        ev.set("datacontenttype", "application/json");
        ev.data = Some(Bytes::from_static(b"{\"a\":1}"));
        let opts = SendOptions {
            format: Format::Binary,
            timeout: None,
            namespace: "ns".into(),
            prefer_reply: true,
            extra_headers: HeaderMap::new(),
            ca_certs: None,
        };
        let r = build_request("http://127.0.0.1:1/x", &ev, &opts).unwrap();
        assert_eq!(r.headers()["ce-id"], "1");
        assert_eq!(r.headers()["content-type"], "application/json");
        assert_eq!(r.headers()["prefer"], "reply");
        assert_eq!(r.headers()["kn-namespace"], "ns");
        let s = build_request(
            "http://127.0.0.1:1/x",
            &ev,
            &SendOptions {
                format: Format::Structured,
                ..opts
            },
        )
        .unwrap();
        assert_eq!(s.headers()["content-type"], "application/cloudevents+json");
    }
}
