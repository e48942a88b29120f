//! The reverse proxy to the user container (serving `pkg/http/proxy.go`, Go's
//! `httputil.ReverseProxy`): HTTP/1.1 upstream for HTTP/1 requests, h2c for HTTP/2 ones,
//! hop-by-hop headers removed, `X-Forwarded-For` appended, Knative's revision headers pruned,
//! websocket upgrades spliced, errors mapped to 502.

use std::net::SocketAddr;
use std::sync::Arc;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::time::Duration;

use http::{
    HeaderMap, HeaderName, HeaderValue, Request, Response, StatusCode, Uri, Version, header,
};
use hyper::body::Incoming;
use hyper::client::conn::http2;
use hyper_util::rt::{TokioExecutor, TokioIo};
use tokio::sync::Notify;

use crate::body::{self, Body};
use crate::upstream::{H1Pool, SendError, UpstreamBody};

/// Knative's `activator.RevisionHeaders`, removed before proxying.
const REVISION_HEADERS: [HeaderName; 2] = [
    HeaderName::from_static("knative-serving-revision"),
    HeaderName::from_static("knative-serving-namespace"),
];

const X_FORWARDED_FOR: HeaderName = HeaderName::from_static("x-forwarded-for");

const HOP_BY_HOP: [HeaderName; 9] = [
    header::CONNECTION,
    HeaderName::from_static("proxy-connection"),
    HeaderName::from_static("keep-alive"),
    header::PROXY_AUTHENTICATE,
    header::PROXY_AUTHORIZATION,
    header::TE,
    header::TRAILER,
    header::TRANSFER_ENCODING,
    header::UPGRADE,
];

/// Who failed, so the caller can pick the status (pingora-style error kinds).
#[derive(Debug, thiserror::Error)]
pub enum ProxyError {
    /// The user container refused or broke the connection: 502. (A client that goes away
    /// drops the request future, so no downstream kind is needed: nothing is written.)
    #[error("{0}")]
    Upstream(String),
}

impl ProxyError {
    pub fn status(&self) -> StatusCode {
        match self {
            ProxyError::Upstream(_) => StatusCode::BAD_GATEWAY,
        }
    }
}

/// Counts spliced (upgraded) connections so shutdown can wait for them.
#[derive(Debug, Default)]
pub struct HijackTracker {
    count: AtomicUsize,
    idle: Notify,
}

struct HijackGuard(Arc<HijackTracker>);

impl Drop for HijackGuard {
    fn drop(&mut self) {
        if self.0.count.fetch_sub(1, Ordering::AcqRel) == 1 {
            self.0.idle.notify_waiters();
        }
    }
}

impl HijackTracker {
    fn enter(self: &Arc<Self>) -> HijackGuard {
        self.count.fetch_add(1, Ordering::AcqRel);
        HijackGuard(Arc::clone(self))
    }

    pub fn active(&self) -> usize {
        self.count.load(Ordering::Acquire)
    }

    /// Waits until no upgraded connection is open, at most `limit`.
    pub async fn drain(&self, limit: Duration) -> bool {
        let wait = async {
            loop {
                let notified = self.idle.notified();
                if self.active() == 0 {
                    return;
                }
                notified.await;
            }
        };
        tokio::time::timeout(limit, wait).await.is_ok()
    }
}

pub struct Proxy {
    user_port: u16,
    h1: Arc<H1Pool>,
    /// `Host` for a request that came without one (HTTP/1.0).
    default_host: HeaderValue,
    /// One multiplexed h2c connection to the user container, opened on first use.
    h2: tokio::sync::Mutex<Option<http2::SendRequest<Incoming>>>,
    pub hijacks: Arc<HijackTracker>,
}

impl std::fmt::Debug for Proxy {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Proxy")
            .field("user_port", &self.user_port)
            .finish_non_exhaustive()
    }
}

fn connection_tokens(h: &HeaderMap) -> Vec<String> {
    h.get_all(header::CONNECTION)
        .iter()
        .filter_map(|v| v.to_str().ok())
        .flat_map(|v| v.split(','))
        .map(|t| t.trim().to_ascii_lowercase())
        .filter(|t| !t.is_empty())
        .collect()
}

fn upgrade_type(h: &HeaderMap) -> Option<HeaderValue> {
    connection_tokens(h)
        .iter()
        .any(|t| t == "upgrade")
        .then(|| h.get(header::UPGRADE).cloned())
        .flatten()
}

/// Removes hop-by-hop headers (those named in `Connection` as well).
fn strip_hop_by_hop(h: &mut HeaderMap) {
    for t in connection_tokens(h) {
        if let Ok(name) = HeaderName::from_bytes(t.as_bytes()) {
            h.remove(name);
        }
    }
    let keep_te_trailers = h.get_all(header::TE).iter().any(|v| {
        v.to_str()
            .is_ok_and(|s| s.split(',').any(|t| t.trim() == "trailers"))
    });
    for name in HOP_BY_HOP {
        h.remove(name);
    }
    if keep_te_trailers {
        h.insert(header::TE, HeaderValue::from_static("trailers"));
    }
}

impl Proxy {
    pub fn new(user_port: u16, max_idle: usize) -> Self {
        let addr = SocketAddr::from(([127, 0, 0, 1], user_port));
        Self {
            user_port,
            h1: H1Pool::new(addr, max_idle),
            default_host: HeaderValue::from_str(&addr.to_string())
                .unwrap_or(HeaderValue::from_static("127.0.0.1")),
            h2: tokio::sync::Mutex::new(None),
            hijacks: Arc::new(HijackTracker::default()),
        }
    }

    /// Forwards `req` (whose Host is already final) to the user container.
    pub async fn forward(
        &self,
        mut req: Request<Incoming>,
        client: SocketAddr,
    ) -> Result<(Response<UpstreamBody>, Option<Splice>), ProxyError> {
        let is_h2 = req.version() == Version::HTTP_2;
        // Like Go's `r.Host`: the authority of an absolute-form target (or HTTP/2's
        // :authority) wins over the Host header.
        let host = match req.uri().authority() {
            Some(a) => HeaderValue::from_str(a.as_str()).ok(),
            None => req.headers().get(header::HOST).cloned(),
        };
        let uri = if is_h2 {
            let pq = req.uri().path_and_query().map_or("/", |p| p.as_str());
            // HTTP/2 carries the Host as :authority (Go sets it from the request's Host).
            let authority = host
                .as_ref()
                .and_then(|h| h.to_str().ok())
                .map_or_else(|| format!("127.0.0.1:{}", self.user_port), str::to_owned);
            format!("http://{authority}{pq}")
                .parse()
                .or_else(|_| format!("http://127.0.0.1:{}{}", self.user_port, pq).parse())
                .map_err(|e| ProxyError::Upstream(format!("bad request target: {e}")))?
        } else {
            // HTTP/1.1 to the user container: origin form.
            match req.uri().path_and_query() {
                Some(pq) if pq.as_str().starts_with('/') => Uri::from(pq.clone()),
                Some(pq) => format!("/{}", pq.as_str())
                    .parse()
                    .map_err(|e| ProxyError::Upstream(format!("bad request target: {e}")))?,
                None => Uri::from_static("/"),
            }
        };
        *req.uri_mut() = uri;
        let upgrade = if is_h2 {
            None
        } else {
            upgrade_type(req.headers())
        };
        let downstream_upgrade = upgrade.as_ref().map(|_| hyper::upgrade::on(&mut req));
        {
            let h = req.headers_mut();
            for name in REVISION_HEADERS {
                h.remove(name);
            }
            strip_hop_by_hop(h);
            if let Some(u) = &upgrade {
                h.insert(header::CONNECTION, HeaderValue::from_static("Upgrade"));
                h.insert(header::UPGRADE, u.clone());
            }
            let ip = client.ip().to_canonical().to_string();
            let xff = if h.contains_key(&X_FORWARDED_FOR) {
                let prior: Vec<&str> = h
                    .get_all(&X_FORWARDED_FOR)
                    .iter()
                    .filter_map(|v| v.to_str().ok())
                    .collect();
                format!("{}, {ip}", prior.join(", "))
            } else {
                ip
            };
            if let Ok(v) = HeaderValue::from_str(&xff) {
                h.insert(X_FORWARDED_FOR, v);
            }
            if !is_h2 {
                h.insert(
                    header::HOST,
                    host.unwrap_or_else(|| self.default_host.clone()),
                );
            }
        }
        *req.version_mut() = if is_h2 {
            Version::HTTP_2
        } else {
            Version::HTTP_11
        };
        if is_h2 {
            req.headers_mut().remove(header::HOST);
            let mut sender = self.h2_sender().await?;
            sender
                .ready()
                .await
                .map_err(|e| ProxyError::Upstream(e.to_string()))?;
            let mut res = sender
                .send_request(req)
                .await
                .map_err(|e| ProxyError::Upstream(e.to_string()))?;
            strip_hop_by_hop(res.headers_mut());
            return Ok((res.map(UpstreamBody::unpooled), None));
        }
        let (mut res, sender) = self.h1.send(req).await.map_err(|e| match e {
            SendError::Connect(_) => ProxyError::Upstream(e.to_string()),
            SendError::Http(e) => ProxyError::Upstream(go_error_text(&e)),
        })?;
        if res.status() == StatusCode::SWITCHING_PROTOCOLS {
            let splice = downstream_upgrade.map(|down| Splice {
                down,
                up: hyper::upgrade::on(&mut res),
                _tracked: self.hijacks.enter(),
            });
            return Ok((res.map(UpstreamBody::unpooled), splice));
        }
        strip_hop_by_hop(res.headers_mut());
        let pool = Arc::clone(&self.h1);
        Ok((res.map(|b| UpstreamBody::pooled(b, pool, sender)), None))
    }
}

/// An upgraded (websocket) exchange: once both sides have switched protocols, bytes are
/// copied both ways until either closes.
pub struct Splice {
    down: hyper::upgrade::OnUpgrade,
    up: hyper::upgrade::OnUpgrade,
    _tracked: HijackGuard,
}

impl Splice {
    /// Runs the splice in its own task, holding `keep` (the request's accounting and
    /// breaker slot: like Knative, an open websocket counts as an in-flight request) until
    /// the connection ends, or until `deadline` (Knative's revision timeout also ends
    /// upgraded connections).
    pub fn start<K: Send + 'static>(self, keep: K, deadline: Option<tokio::time::Instant>) {
        tokio::spawn(async move {
            let _keep = keep;
            let _tracked = self._tracked;
            let splice = async {
                if let (Ok(d), Ok(u)) = (self.down.await, self.up.await) {
                    let mut d = TokioIo::new(d);
                    let mut u = TokioIo::new(u);
                    let _ = tokio::io::copy_bidirectional(&mut d, &mut u).await;
                }
            };
            match deadline {
                Some(d) => {
                    let _ = tokio::time::timeout_at(d, splice).await;
                }
                None => splice.await,
            }
        });
    }
}

impl Proxy {
    async fn h2_sender(&self) -> Result<http2::SendRequest<Incoming>, ProxyError> {
        let mut g = self.h2.lock().await;
        if let Some(s) = g.as_ref().filter(|s| !s.is_closed()) {
            return Ok(s.clone());
        }
        let stream = tokio::net::TcpStream::connect(("127.0.0.1", self.user_port))
            .await
            .map_err(|_| {
                ProxyError::Upstream(format!(
                    "dial tcp 127.0.0.1:{}: connect: connection refused",
                    self.user_port
                ))
            })?;
        let _ = stream.set_nodelay(true);
        let (sender, conn) = http2::Builder::new(TokioExecutor::new())
            .timer(hyper_util::rt::TokioTimer::new())
            .handshake(TokioIo::new(stream))
            .await
            .map_err(|e| ProxyError::Upstream(e.to_string()))?;
        tokio::spawn(async move {
            if let Err(e) = conn.await {
                tracing::debug!(error = %e, "h2c connection to the user container ended");
            }
        });
        *g = Some(sender.clone());
        Ok(sender)
    }
}

/// The text Go's transport would report for an upstream failure, where they map.
fn go_error_text(e: &(dyn std::error::Error + 'static)) -> String {
    let mut cur: Option<&(dyn std::error::Error + 'static)> = Some(e);
    while let Some(err) = cur {
        if let Some(h) = err.downcast_ref::<hyper::Error>()
            && h.is_incomplete_message()
        {
            // The user container closed the connection without a (complete) response.
            return "EOF".to_owned();
        }
        cur = err.source();
    }
    match e.source() {
        Some(s) => s.to_string(),
        None => e.to_string(),
    }
}

/// The 502 answer for a proxy error (Go's `http.Error(w, err.Error(), 502)`).
pub fn error_response(e: &ProxyError) -> Response<Body> {
    body::error(e.status(), &e.to_string())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn hop_by_hop_removed() {
        let mut h = HeaderMap::new();
        h.insert("connection", HeaderValue::from_static("close, x-custom"));
        h.insert("x-custom", HeaderValue::from_static("1"));
        h.insert("keep-alive", HeaderValue::from_static("5"));
        h.insert("te", HeaderValue::from_static("trailers, gzip"));
        h.insert("x-keep", HeaderValue::from_static("1"));
        strip_hop_by_hop(&mut h);
        assert!(h.get("x-custom").is_none());
        assert!(h.get("keep-alive").is_none());
        assert!(h.get("connection").is_none());
        assert_eq!(h["te"], "trailers");
        assert_eq!(h["x-keep"], "1");
    }

    #[test]
    fn upgrade_detection() {
        let mut h = HeaderMap::new();
        h.insert(
            "connection",
            HeaderValue::from_static("keep-alive, Upgrade"),
        );
        h.insert("upgrade", HeaderValue::from_static("websocket"));
        assert_eq!(
            upgrade_type(&h),
            Some(HeaderValue::from_static("websocket"))
        );
        h.remove("connection");
        assert_eq!(upgrade_type(&h), None);
    }
}
