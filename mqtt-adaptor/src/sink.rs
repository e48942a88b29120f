//! HTTP delivery of CloudEvents to `K_SINK` (and the dead-letter sink).

use std::path::PathBuf;
use std::sync::Mutex;
use std::time::{Duration, Instant};

use bytes::Bytes;
use http::StatusCode;

use crate::config::Format;
use crate::h1;
use spright_core::cloudevent::{CloudEvent, STRUCTURED_CONTENT_TYPE};

#[derive(Debug, thiserror::Error)]
pub enum SinkError {
    #[error("cannot build the HTTP client: {0}")]
    Client(String),
    #[error("K_CA_CERTS holds no usable PEM certificate: {0}")]
    CaCerts(String),
}

/// Outcome of one delivery attempt.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Attempt {
    Accepted(StatusCode),
    /// Retryable per the Knative data-plane table: network errors, 5xx, 404, 408, 409, 429.
    Retry(String),
    /// Not retryable (3xx, other 4xx).
    Reject(StatusCode, String),
}

/// Knative's retry table (contract C.6).
pub fn retryable(status: StatusCode) -> bool {
    status.is_server_error() || matches!(status.as_u16(), 404 | 408 | 409 | 429)
}

/// Reads `/oidc/token` (or the configured file), re-reading it at most every 10 s so rotated
/// tokens are picked up without a syscall per event.
#[derive(Debug)]
struct TokenCache {
    path: PathBuf,
    cached: Mutex<(Option<Instant>, Option<String>)>,
}

impl TokenCache {
    fn get(&self) -> Option<String> {
        let mut guard = self.cached.lock().unwrap_or_else(|p| p.into_inner());
        let fresh = guard
            .0
            .is_some_and(|t| t.elapsed() < Duration::from_secs(10));
        if !fresh {
            let token = std::fs::read_to_string(&self.path)
                .ok()
                .map(|t| t.trim().to_owned())
                .filter(|t| !t.is_empty());
            *guard = (Some(Instant::now()), token);
        }
        guard.1.clone()
    }
}

/// Posts CloudEvents over the HTTP binding.
#[derive(Debug)]
pub struct SinkClient {
    client: reqwest::Client,
    format: Format,
    token: TokenCache,
    timeout: Duration,
}

/// A plain `http://` sink, parsed once, for the lean HTTP/1.1 path of the source's delivery
/// workers: each worker keeps one keep-alive connection of its own (no shared pool, no URL
/// parsing or pool lookup per event). `https://` sinks go through reqwest (rustls, K_CA_CERTS).
#[derive(Debug, Clone)]
pub struct H1Target {
    /// `host:port` to connect to.
    connect: String,
    /// `Host` header value.
    host: http::HeaderValue,
    /// Origin-form request target (path and query).
    path: String,
}

impl H1Target {
    /// `Some` for an `http://` URL without user info; `None` sends the URL through reqwest.
    pub fn parse(url: &str) -> Option<Self> {
        let uri: http::Uri = url.parse().ok()?;
        if uri.scheme_str() != Some("http") {
            return None;
        }
        let authority = uri.authority()?;
        if authority.as_str().contains('@') {
            return None;
        }
        let port = authority.port_u16().unwrap_or(80);
        let path = uri.path_and_query().map_or("/", |p| p.as_str());
        Some(H1Target {
            connect: format!("{}:{port}", authority.host()),
            host: http::HeaderValue::from_str(authority.as_str()).ok()?,
            path: path.to_owned(),
        })
    }
}

/// One delivery worker's keep-alive HTTP/1.1 connection to an [`H1Target`], driven by the
/// worker's own task (see [`crate::h1`]).
#[derive(Debug, Default)]
pub struct SinkConn {
    stream: Option<tokio::net::TcpStream>,
    /// The encoded request.
    out: Vec<u8>,
    /// Response bytes read and not yet consumed.
    buf: bytes::BytesMut,
}

/// Why one request/response exchange failed.
enum Exchange {
    /// The reused connection was closed before any byte of a response: send again on a
    /// fresh one.
    Stale(String),
    Failed(String),
}

impl SinkConn {
    /// Connects to the sink (no delay on writes).
    pub async fn open(t: &H1Target) -> Result<tokio::net::TcpStream, String> {
        let stream = tokio::net::TcpStream::connect(&t.connect)
            .await
            .map_err(|e| format!("connect {}: {e}", t.connect))?;
        let _ = stream.set_nodelay(true);
        Ok(stream)
    }

    /// Writes the encoded request and reads its response: the status and the first bytes of
    /// the body. Leaves `stream` as `None` when the connection cannot be reused.
    async fn exchange(&mut self) -> Result<(StatusCode, Bytes), Exchange> {
        use tokio::io::{AsyncReadExt, AsyncWriteExt};
        let Some(stream) = self.stream.as_mut() else {
            return Err(Exchange::Failed("no connection".into()));
        };
        // Responses are never pipelined: anything left over is not ours.
        self.buf.clear();
        if let Err(e) = stream.write_all(&self.out).await {
            self.stream = None;
            return Err(Exchange::Stale(format!("write: {e}")));
        }
        let head = loop {
            match h1::parse_head(&self.buf) {
                Ok(Some(head)) => break head,
                Ok(None) => {}
                Err(e) => {
                    self.stream = None;
                    return Err(Exchange::Failed(e.to_string()));
                }
            }
            match stream.read_buf(&mut self.buf).await {
                Ok(n) if n > 0 => {}
                Ok(_) if self.buf.is_empty() => {
                    self.stream = None;
                    return Err(Exchange::Stale("connection closed".into()));
                }
                Ok(_) => {
                    self.stream = None;
                    return Err(Exchange::Failed("connection closed mid-response".into()));
                }
                Err(e) if self.buf.is_empty() => {
                    self.stream = None;
                    return Err(Exchange::Stale(format!("read: {e}")));
                }
                Err(e) => {
                    self.stream = None;
                    return Err(Exchange::Failed(format!("read: {e}")));
                }
            }
        };
        let status = StatusCode::from_u16(head.status)
            .map_err(|_| Exchange::Failed(format!("bad status {}", head.status)))?;
        let mut keep = Vec::new();
        let mut reusable = !head.close;
        // Read the body so the connection can carry the next request; a body too large to
        // be worth it (or delimited by close) ends the connection once the status is known.
        loop {
            let body = &self.buf[head.head_len..];
            let done = match head.body {
                h1::BodyLen::Empty => true,
                h1::BodyLen::Length(n) if n > h1::MAX_BODY => {
                    reusable = false;
                    true
                }
                h1::BodyLen::Length(n) => body.len() >= n,
                h1::BodyLen::Chunked => match h1::chunked_len(body, &mut keep) {
                    Ok(Some(_)) => true,
                    Ok(None) if body.len() > h1::MAX_BODY => {
                        reusable = false;
                        true
                    }
                    Ok(None) => false,
                    Err(_) => {
                        reusable = false;
                        true
                    }
                },
                h1::BodyLen::UntilClose => {
                    reusable = false;
                    body.len() > h1::MAX_BODY
                }
            };
            if done {
                break;
            }
            match stream.read_buf(&mut self.buf).await {
                Ok(n) if n > 0 => {}
                Ok(_) if head.body == h1::BodyLen::UntilClose => break,
                _ => {
                    reusable = false;
                    break;
                }
            }
        }
        if keep.is_empty() {
            let body = &self.buf[head.head_len..];
            keep.extend_from_slice(&body[..body.len().min(h1::KEEP_BODY)]);
        }
        if !reusable {
            self.stream = None;
        }
        Ok((status, Bytes::from(keep)))
    }
}

impl SinkClient {
    pub fn new(
        format: Format,
        timeout: Duration,
        ca_certs: Option<&str>,
        oidc_token_file: PathBuf,
        pool: usize,
    ) -> Result<Self, SinkError> {
        let mut b = reqwest::Client::builder()
            .use_rustls_tls()
            .timeout(timeout)
            .connect_timeout(Duration::from_secs(5).min(timeout))
            .pool_max_idle_per_host(pool)
            .pool_idle_timeout(Duration::from_secs(60))
            .tcp_nodelay(true)
            .redirect(reqwest::redirect::Policy::none());
        if let Some(pem) = ca_certs {
            let certs = reqwest::Certificate::from_pem_bundle(pem.as_bytes())
                .map_err(|e| SinkError::CaCerts(e.to_string()))?;
            if certs.is_empty() {
                return Err(SinkError::CaCerts("no certificate found".into()));
            }
            for c in certs {
                b = b.add_root_certificate(c);
            }
        }
        let client = b.build().map_err(|e| SinkError::Client(e.to_string()))?;
        Ok(SinkClient {
            client,
            format,
            timeout,
            token: TokenCache {
                path: oidc_token_file,
                cached: Mutex::new((None, None)),
            },
        })
    }

    /// One POST of `ev` to a plain-HTTP sink over the worker's own connection, with the
    /// configured timeout. A request that could not be sent on a reused connection (closed
    /// by the sink while idle) is sent once more on a fresh one.
    pub async fn post_h1(&self, conn: &mut SinkConn, t: &H1Target, ev: &CloudEvent) -> Attempt {
        match tokio::time::timeout(self.timeout, self.post_h1_once(conn, t, ev)).await {
            Ok(a) => a,
            Err(_) => {
                conn.stream = None;
                Attempt::Retry(format!(
                    "sink request timed out after {} s",
                    self.timeout.as_secs()
                ))
            }
        }
    }

    /// Encodes the request for `ev` into the connection's buffer.
    fn encode_h1(&self, conn: &mut SinkConn, t: &H1Target, ev: &CloudEvent) {
        conn.out.clear();
        self.append_h1(&mut conn.out, t, ev);
    }

    /// Appends the request for `ev` to `out` (pipelined connections write several at once).
    pub fn append_h1(&self, out: &mut Vec<u8>, t: &H1Target, ev: &CloudEvent) {
        let (mut headers, body) = match self.format {
            Format::Binary => (ev.binary_headers(), ev.data.clone().unwrap_or_default()),
            Format::Structured => {
                let mut h = http::HeaderMap::with_capacity(2);
                h.insert(
                    http::header::CONTENT_TYPE,
                    http::HeaderValue::from_static(STRUCTURED_CONTENT_TYPE),
                );
                (h, Bytes::from(ev.to_structured()))
            }
        };
        if let Some(token) = self.token.get()
            && let Ok(v) = http::HeaderValue::from_str(&format!("Bearer {token}"))
        {
            headers.insert(http::header::AUTHORIZATION, v);
        }
        h1::encode_request(out, &t.path, t.host.as_bytes(), &headers, &body);
    }

    /// The per-request timeout.
    pub fn timeout(&self) -> Duration {
        self.timeout
    }

    async fn post_h1_once(&self, conn: &mut SinkConn, t: &H1Target, ev: &CloudEvent) -> Attempt {
        self.encode_h1(conn, t, ev);
        let mut resent = false;
        loop {
            let fresh = conn.stream.is_none();
            if fresh {
                match SinkConn::open(t).await {
                    Ok(s) => conn.stream = Some(s),
                    Err(e) => return Attempt::Retry(format!("sink request failed: {e}")),
                }
            }
            match conn.exchange().await {
                Ok((status, body)) => return classify(status, body),
                // A keep-alive connection the sink closed while idle: once more on a fresh
                // one (at worst a duplicate, which at-least-once allows).
                Err(Exchange::Stale(_)) if !fresh && !resent => resent = true,
                Err(Exchange::Stale(e) | Exchange::Failed(e)) => {
                    return Attempt::Retry(format!("sink request failed: {e}"));
                }
            }
        }
    }

    /// One POST of `ev` to `url`.
    pub async fn post(&self, url: &str, ev: &CloudEvent) -> Attempt {
        let mut req = self.client.post(url);
        req = match self.format {
            Format::Binary => req
                .headers(ev.binary_headers())
                .body(ev.data.clone().unwrap_or_default()),
            Format::Structured => req
                .header(http::header::CONTENT_TYPE, STRUCTURED_CONTENT_TYPE)
                .body(Bytes::from(ev.to_structured())),
        };
        if let Some(token) = self.token.get() {
            req = req.bearer_auth(token);
        }
        match req.send().await {
            Ok(resp) => {
                let status = resp.status();
                // Read the body in full so the connection goes back to the pool.
                let body = resp.bytes().await.unwrap_or_default();
                classify(status, body)
            }
            Err(e) => Attempt::Retry(format!("sink request failed: {e}")),
        }
    }
}

/// Maps a sink answer to the delivery outcome (Knative's retry table).
pub fn classify(status: StatusCode, body: Bytes) -> Attempt {
    if status.is_success() {
        return Attempt::Accepted(status);
    }
    let text = String::from_utf8_lossy(&body[..body.len().min(256)]).into_owned();
    if retryable(status) {
        Attempt::Retry(format!("sink answered {status}: {text}"))
    } else {
        Attempt::Reject(status, text)
    }
}

/// Exponential backoff: `base * 2^attempt`, capped.
pub use spright_core::backoff::exponential as backoff;

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn retry_table() {
        for code in [500, 502, 503, 504, 404, 408, 409, 429] {
            assert!(retryable(StatusCode::from_u16(code).unwrap()), "{code}");
        }
        for code in [400, 401, 403, 413, 301] {
            assert!(!retryable(StatusCode::from_u16(code).unwrap()), "{code}");
        }
    }

    #[test]
    fn h1_target_parsing() {
        let t = H1Target::parse("http://sink.default.svc.cluster.local/a/b?c=d").unwrap();
        assert_eq!(t.connect, "sink.default.svc.cluster.local:80");
        assert_eq!(t.host, "sink.default.svc.cluster.local");
        assert_eq!(t.path, "/a/b?c=d");
        let t = H1Target::parse("http://127.0.0.1:8080").unwrap();
        assert_eq!(t.connect, "127.0.0.1:8080");
        assert_eq!(t.host, "127.0.0.1:8080");
        assert_eq!(t.path, "/");
        let t = H1Target::parse("http://[::1]:9/x").unwrap();
        assert_eq!(t.connect, "[::1]:9");
        assert!(H1Target::parse("https://sink/").is_none());
        assert!(H1Target::parse("http://user:pw@sink/").is_none());
        assert!(H1Target::parse("not a url").is_none());
    }

    #[test]
    fn backoff_doubles_and_caps() {
        let b = Duration::from_millis(200);
        let m = Duration::from_secs(5);
        assert_eq!(backoff(b, m, 0), b);
        assert_eq!(backoff(b, m, 3), Duration::from_millis(1600));
        assert_eq!(backoff(b, m, 40), m);
    }
}
