//! The request path on 8012/8013 (Knative `pkg/activator/handler`, outermost first):
//! kubelet health, network probe (`K-Network-Hash`), activator probe, revision lookup,
//! concurrency reporting, revision timeouts, throttling and proxying.

use std::collections::VecDeque;
use std::convert::Infallible;
use std::net::SocketAddr;
use std::pin::Pin;
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, Ordering};
use std::task::{Context, Poll};
use std::time::Duration;

use bytes::Bytes;
use http::header::{self, HeaderMap, HeaderName, HeaderValue};
use http::{Request, Response, StatusCode, Uri};
use http_body::{Body, Frame, SizeHint};
use http_body_util::combinators::BoxBody;
use http_body_util::{BodyExt, Full};
use hyper::body::Incoming;
use hyper_util::client::legacy::Client;
use hyper_util::client::legacy::connect::HttpConnector;
use hyper_util::rt::{TokioExecutor, TokioIo};
use tokio::sync::watch;
use tokio::time::Sleep;

use spright_core::sniff;

use crate::autoscaler::LinkStatus;
use crate::manifests::{ClusterState, RevisionKey, RevisionSpec};
use crate::stats::{ConcurrencyReporter, InFlight};
use crate::throttler::{Lease, ThrottleError, Throttler};

pub type BoxError = Box<dyn std::error::Error + Send + Sync>;
pub type RespBody = BoxBody<Bytes, BoxError>;

pub const HDR_NETWORK_PROBE: &str = "k-network-probe";
pub const HDR_NETWORK_HASH: &str = "k-network-hash";
pub const HDR_KUBELET_PROBE: &str = "k-kubelet-probe";
pub const HDR_PROXY_REQUEST: &str = "k-proxy-request";
pub const HDR_ORIGINAL_HOST: &str = "k-original-host";
pub const HDR_REV_NAMESPACE: &str = "knative-serving-namespace";
pub const HDR_REV_NAME: &str = "knative-serving-revision";

/// Where a request for a revision could not be served, with the status Knative answers.
/// The texts are Knative's: the 404 is the informer lister's NotFound as
/// `context_handler.go` sendError words it (the looked-up name quoted as Go's `%q` does
/// for the visible ASCII a header holds).
#[derive(Debug, thiserror::Error)]
pub enum RequestError {
    #[error("Error getting active endpoint: revision.serving.knative.dev {0:?} not found")]
    NotFound(String),
    #[error("activator request timeout")]
    Timeout,
    #[error("{0}")]
    Throttled(#[from] ThrottleError),
    #[error("{0}")]
    Upstream(String),
}

impl RequestError {
    pub fn status(&self) -> StatusCode {
        match self {
            RequestError::NotFound(_) => StatusCode::NOT_FOUND,
            RequestError::Timeout => StatusCode::GATEWAY_TIMEOUT,
            RequestError::Throttled(_) => StatusCode::SERVICE_UNAVAILABLE,
            RequestError::Upstream(_) => StatusCode::BAD_GATEWAY,
        }
    }

    /// The response body and whether it is Go's `http.Error` (message and a newline, with
    /// `X-Content-Type-Options: nosniff`). Only the timeout is not: Knative's timeout
    /// handler writes its message as it is.
    pub fn body(&self) -> (String, bool) {
        match self {
            RequestError::Timeout => (self.to_string(), false),
            _ => (format!("{self}\n"), true),
        }
    }

    /// The whole answer for the hyper path.
    pub fn response(&self) -> Response<RespBody> {
        match self.body() {
            (body, true) => go_http_error(self.status(), body),
            (body, false) => text(self.status(), body),
        }
    }
}

/// Go's `http.Error`: `body` (which already ends in a newline) as plain text that browsers
/// must not sniff.
fn go_http_error(status: StatusCode, body: impl Into<Bytes>) -> Response<RespBody> {
    let mut r = text(status, body);
    r.headers_mut().insert(
        "x-content-type-options",
        HeaderValue::from_static("nosniff"),
    );
    r
}

/// An answer without a body (Go's `WriteHeader` alone: no Content-Type).
fn empty(status: StatusCode) -> Response<RespBody> {
    let mut r = Response::new(Full::new(Bytes::new()).map_err(|e| match e {}).boxed());
    *r.status_mut() = status;
    r
}

/// Go's answer to a request with more than one Host header (net/http readRequest).
fn too_many_hosts() -> Response<RespBody> {
    let mut r = text(StatusCode::BAD_REQUEST, "400 Bad Request");
    r.headers_mut()
        .insert(header::CONNECTION, HeaderValue::from_static("close"));
    r
}

pub fn text(status: StatusCode, body: impl Into<Bytes>) -> Response<RespBody> {
    let mut r = Response::new(Full::new(body.into()).map_err(|e| match e {}).boxed());
    *r.status_mut() = status;
    r.headers_mut().insert(
        header::CONTENT_TYPE,
        HeaderValue::from_static("text/plain; charset=utf-8"),
    );
    r
}

/// A request's pod slot (or the reason it has none), acquired before proxying; for
/// a connection's first request it is acquired before hyper takes the connection over.
#[derive(Debug)]
pub struct Admission {
    pub(crate) spec: Arc<RevisionSpec>,
    pub(crate) result: Result<(Lease, InFlight), RequestError>,
    pub(crate) started: tokio::time::Instant,
}

/// The time allowed until the response starts (`responseStartTimeoutSeconds`, capped by
/// `timeoutSeconds`; 0 disables).
pub(crate) fn first_byte_timeout(spec: &RevisionSpec) -> Option<Duration> {
    let total = (!spec.timeout.is_zero()).then_some(spec.timeout);
    match (spec.response_start_timeout, total) {
        (Some(rs), Some(t)) if !rs.is_zero() => Some(rs.min(t)),
        (Some(rs), None) if !rs.is_zero() => Some(rs),
        _ => total,
    }
}

/// Shared state of the request path.
pub struct App {
    pub state: watch::Receiver<Arc<ClusterState>>,
    pub throttler: Arc<Throttler>,
    pub reporter: Arc<ConcurrencyReporter>,
    pub link: Arc<LinkStatus>,
    pub draining: AtomicBool,
    pub queue_depth: usize,
    /// Keep-alive connections of the fast path ([`crate::fast`]).
    pub pool: crate::fast::UpstreamPool,
    client_h1: Client<crate::connector::PodConnector, Incoming>,
    client_h2: Client<HttpConnector, Incoming>,
}

impl std::fmt::Debug for App {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("App").finish_non_exhaustive()
    }
}

fn is_kubelet_probe(h: &HeaderMap) -> bool {
    h.contains_key(HDR_KUBELET_PROBE)
        || h.get(header::USER_AGENT)
            .and_then(|v| v.to_str().ok())
            .is_some_and(|ua| ua.starts_with("kube-probe/"))
}

/// Go's `html.EscapeString`.
fn html_escape(s: &str) -> std::borrow::Cow<'_, str> {
    if !s.contains(['<', '>', '&', '\'', '"']) {
        return s.into();
    }
    let mut out = String::with_capacity(s.len() + 16);
    for c in s.chars() {
        match c {
            '<' => out.push_str("&lt;"),
            '>' => out.push_str("&gt;"),
            '&' => out.push_str("&amp;"),
            '\'' => out.push_str("&#39;"),
            '"' => out.push_str("&#34;"),
            c => out.push(c),
        }
    }
    out.into()
}

fn header_str<'a>(h: &'a HeaderMap, name: &str) -> &'a str {
    h.get(name).and_then(|v| v.to_str().ok()).unwrap_or("")
}

/// The target revision from the Knative-Serving-* headers, else from the Host
/// `<name>.<namespace>.svc.<cluster-domain>[:port]` ([`crate::fast::revision_key`]).
pub fn revision_from(h: &HeaderMap, uri: &Uri) -> Option<RevisionKey> {
    let host = h
        .get(header::HOST)
        .and_then(|v| v.to_str().ok())
        .or_else(|| uri.authority().map(|a| a.as_str()));
    crate::fast::revision_key(
        header_str(h, HDR_REV_NAMESPACE),
        header_str(h, HDR_REV_NAME),
        host,
    )
}

pub(crate) const HOP_BY_HOP: [&str; 8] = [
    "connection",
    "keep-alive",
    "proxy-connection",
    "proxy-authenticate",
    "proxy-authorization",
    "te",
    "trailer",
    "transfer-encoding",
];

fn is_upgrade(h: &HeaderMap) -> bool {
    h.contains_key(header::UPGRADE)
        && h.get_all(header::CONNECTION).iter().any(|v| {
            v.to_str().is_ok_and(|s| {
                s.split(',')
                    .any(|t| t.trim().eq_ignore_ascii_case("upgrade"))
            })
        })
}

/// Removes hop-by-hop headers (and those named in Connection); keeps the upgrade pair
/// when `upgrade`.
fn strip_hop_by_hop(h: &mut HeaderMap, upgrade: bool) {
    // One pass over the (few) headers; nothing is allocated when none is hop-by-hop.
    let mut doomed: Vec<HeaderName> = Vec::new();
    for name in h.keys() {
        let n = name.as_str();
        if HOP_BY_HOP.contains(&n) || (!upgrade && name == header::UPGRADE) {
            doomed.push(name.clone());
        }
    }
    if !doomed.is_empty() {
        let named: Vec<HeaderName> = h
            .get_all(header::CONNECTION)
            .iter()
            .filter_map(|v| v.to_str().ok())
            .flat_map(|s| s.split(','))
            .filter_map(|t| HeaderName::from_bytes(t.trim().as_bytes()).ok())
            .filter(|n| !(upgrade && n == header::UPGRADE))
            .collect();
        doomed.extend(named);
        for n in doomed {
            h.remove(n);
        }
    }
    if upgrade {
        h.insert(header::CONNECTION, HeaderValue::from_static("upgrade"));
    }
}

/// Rewrites the request headers for the pod (Knative `handler.go` proxyRequest).
pub fn rewrite_request_headers(
    h: &mut HeaderMap,
    uri: &Uri,
    upgrade: bool,
    peer: Option<SocketAddr>,
) {
    // Go's reverse proxy: `TE: trailers` goes on when the client's TE lists `trailers`.
    let te_trailers = h.get_all(header::TE).iter().any(|v| {
        v.as_bytes()
            .split(|&b| b == b',')
            .any(|t| t.trim_ascii().eq_ignore_ascii_case(b"trailers"))
    });
    strip_hop_by_hop(h, upgrade);
    if te_trailers {
        h.insert(header::TE, HeaderValue::from_static("trailers"));
    }
    // knative/networking probe handler: outside probes `K-Network-Hash` is deleted.
    h.remove(HDR_NETWORK_HASH);
    let original_host = h.remove(header::HOST).or_else(|| {
        uri.authority()
            .and_then(|a| HeaderValue::from_str(a.as_str()).ok())
    });
    // RewriteHostIn: an existing non-empty K-Original-Host is kept.
    let keep = h.get(HDR_ORIGINAL_HOST).is_some_and(|v| !v.is_empty());
    if let Some(host) = original_host.filter(|_| !keep) {
        h.insert(HDR_ORIGINAL_HOST, host);
    }
    h.remove(HDR_REV_NAMESPACE);
    h.remove(HDR_REV_NAME);
    h.insert(HDR_PROXY_REQUEST, HeaderValue::from_static("activator"));
    if let Some(peer) = peer {
        let ip = peer.ip().to_string();
        let xff = match h.get("x-forwarded-for").and_then(|v| v.to_str().ok()) {
            Some(prior) => format!("{prior}, {ip}"),
            None => ip,
        };
        if let Ok(v) = HeaderValue::from_str(&xff) {
            h.insert("x-forwarded-for", v);
        }
    }
}

/// A response body that keeps the pod slot and the concurrency count until it ends,
/// and enforces the revision's total and idle timeouts while streaming. Frames read
/// ahead to sniff a `Content-Type` ([`GuardedBody::sniff`]) are passed on first.
struct GuardedBody {
    inner: Incoming,
    read_ahead: VecDeque<Frame<Bytes>>,
    hold: Option<(Lease, InFlight)>,
    deadline: Option<Pin<Box<Sleep>>>,
    idle: Option<(Duration, Pin<Box<Sleep>>)>,
}

impl GuardedBody {
    /// The `Content-Type` Go's server gives a pod answer that has none (the caller checked
    /// [`sniff::go_sniffs`]), from the body bytes Go would sniff, read ahead here and kept
    /// for the client.
    ///
    /// A body of known length: Go's reverse proxy (`FlushInterval` 0) flushes nothing until
    /// its server's buffer is full (2 KiB for HTTP/1, 4 KiB for HTTP/2) or the body ends, so
    /// the type comes from the first `min(length, 512)` bytes, and the head waits for them
    /// here too. A body of unknown length (chunked, or HTTP/2 without `content-length`): the
    /// proxy flushes the head at once (a timer armed with a negative interval races the
    /// first body write), so only a first frame that is already here counts, as in Go when
    /// its first read finds body bytes buffered; the head never waits for a streamed body.
    /// No body bytes: no type (Go sniffs only non-empty writes).
    async fn sniff(&mut self) -> Result<Option<&'static str>, RequestError> {
        use futures::FutureExt;
        let failed = |e: BoxError| {
            if e.is::<hyper::Error>() {
                RequestError::Upstream(e.to_string())
            } else {
                RequestError::Timeout
            }
        };
        match self.inner.size_hint().exact() {
            Some(0) => return Ok(None),
            Some(n) => {
                let want = usize::try_from(n)
                    .unwrap_or(usize::MAX)
                    .min(sniff::SNIFF_LEN);
                let mut have = 0;
                while have < want {
                    match std::future::poll_fn(|cx| self.poll_inner(cx)).await {
                        Some(Ok(frame)) => {
                            let data = frame.data_ref().map_or(0, Bytes::len);
                            let trailers = frame.is_trailers();
                            self.read_ahead.push_back(frame);
                            have += data;
                            if trailers {
                                break;
                            }
                        }
                        Some(Err(e)) => return Err(failed(e)),
                        None => break,
                    }
                }
            }
            None => match std::future::poll_fn(|cx| self.poll_inner(cx)).now_or_never() {
                Some(Some(Ok(frame))) => self.read_ahead.push_back(frame),
                Some(Some(Err(e))) => return Err(failed(e)),
                Some(None) | None => {}
            },
        }
        let mut data = self.read_ahead.iter().filter_map(Frame::data_ref);
        let (Some(first), None) = (data.next(), data.next()) else {
            // Several frames (or none): their first bytes, side by side.
            let mut head = [0u8; sniff::SNIFF_LEN];
            let mut n = 0;
            for d in self.read_ahead.iter().filter_map(Frame::data_ref) {
                let take = d.len().min(head.len() - n);
                head[n..n + take].copy_from_slice(&d[..take]);
                n += take;
            }
            return Ok((n > 0).then(|| sniff::detect(&head[..n])));
        };
        Ok((!first.is_empty()).then(|| sniff::detect(first)))
    }

    /// The next frame from the pod, within the timeouts.
    fn poll_inner(&mut self, cx: &mut Context<'_>) -> Poll<Option<Result<Frame<Bytes>, BoxError>>> {
        let this = self;
        if let Some(d) = this.deadline.as_mut()
            && d.as_mut().poll(cx).is_ready()
        {
            this.hold = None;
            return Poll::Ready(Some(Err("activator request timeout".into())));
        }
        if let Some((_, d)) = this.idle.as_mut()
            && d.as_mut().poll(cx).is_ready()
        {
            this.hold = None;
            return Poll::Ready(Some(Err("activator request idle timeout".into())));
        }
        match Pin::new(&mut this.inner).poll_frame(cx) {
            Poll::Ready(Some(Ok(f))) => {
                if let Some((dur, d)) = this.idle.as_mut() {
                    d.as_mut().reset(tokio::time::Instant::now() + *dur);
                }
                Poll::Ready(Some(Ok(f)))
            }
            Poll::Ready(Some(Err(e))) => {
                this.hold = None;
                Poll::Ready(Some(Err(e.into())))
            }
            Poll::Ready(None) => {
                this.hold = None;
                Poll::Ready(None)
            }
            Poll::Pending => Poll::Pending,
        }
    }
}

impl Body for GuardedBody {
    type Data = Bytes;
    type Error = BoxError;

    fn poll_frame(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
    ) -> Poll<Option<Result<Frame<Bytes>, BoxError>>> {
        match self.read_ahead.pop_front() {
            Some(frame) => Poll::Ready(Some(Ok(frame))),
            None => self.poll_inner(cx),
        }
    }

    fn is_end_stream(&self) -> bool {
        self.read_ahead.is_empty() && self.inner.is_end_stream()
    }

    fn size_hint(&self) -> SizeHint {
        let inner = self.inner.size_hint();
        if self.read_ahead.is_empty() {
            return inner;
        }
        let ahead: u64 = self
            .read_ahead
            .iter()
            .filter_map(Frame::data_ref)
            .map(|d| u64::try_from(d.len()).unwrap_or(u64::MAX))
            .sum();
        let mut hint = SizeHint::new();
        hint.set_lower(inner.lower().saturating_add(ahead));
        if let Some(upper) = inner.upper() {
            hint.set_upper(upper.saturating_add(ahead));
        }
        hint
    }
}

impl App {
    pub fn new(
        state: watch::Receiver<Arc<ClusterState>>,
        throttler: Arc<Throttler>,
        reporter: Arc<ConcurrencyReporter>,
        link: Arc<LinkStatus>,
        queue_depth: usize,
        max_idle: usize,
        max_idle_per_host: usize,
    ) -> Arc<Self> {
        let mut conn = HttpConnector::new();
        conn.set_nodelay(true);
        let client_h1 = Client::builder(TokioExecutor::new())
            .pool_max_idle_per_host(max_idle_per_host)
            .build(crate::connector::PodConnector(conn.clone()));
        let client_h2 = Client::builder(TokioExecutor::new())
            .http2_only(true)
            .build(conn);
        Arc::new(Self {
            state,
            throttler,
            reporter,
            link,
            draining: AtomicBool::new(false),
            queue_depth,
            pool: crate::fast::UpstreamPool::new(max_idle, max_idle_per_host),
            client_h1,
            client_h2,
        })
    }

    /// The revision `key`, if known.
    pub fn revision(&self, key: &RevisionKey) -> Option<Arc<RevisionSpec>> {
        self.state.borrow().revisions.get(key).cloned()
    }

    /// Counts the request for the autoscaler (the first one of a revision pokes it) and
    /// waits for a pod slot within the revision's timeout. `None` when `gone` resolves
    /// first (the client hung up while waiting).
    pub async fn admit(
        self: &Arc<Self>,
        spec: Arc<RevisionSpec>,
        gone: impl std::future::Future<Output = ()>,
    ) -> Option<Admission> {
        let key = &spec.key;
        let rt = match self.throttler.get(key) {
            Some(rt) => rt,
            None => self
                .throttler
                .upsert(key, spec.container_concurrency, self.queue_depth),
        };
        let in_flight = self.reporter.request_start(key);
        let started = tokio::time::Instant::now();
        let wait = async {
            match first_byte_timeout(&spec) {
                Some(t) => match tokio::time::timeout(t, rt.acquire()).await {
                    Ok(r) => r.map_err(RequestError::from),
                    Err(_) => Err(RequestError::Timeout),
                },
                None => rt.acquire().await.map_err(RequestError::from),
            }
        };
        let result = tokio::select! {
            r = wait => r,
            _ = gone => return None,
        };
        Some(Admission {
            result: result.map(|lease| (lease, in_flight)),
            spec,
            started,
        })
    }

    /// The whole handler chain. `admission`: the slot acquired before hyper took the
    /// connection (first request only).
    pub async fn handle(
        self: Arc<Self>,
        mut req: Request<Incoming>,
        peer: Option<SocketAddr>,
        admission: Option<Admission>,
    ) -> Result<Response<RespBody>, Infallible> {
        // Go's net/http refuses a request with more than one Host header before any handler
        // runs: 400, body "400 Bad Request", and the connection is closed.
        if req.headers().get_all(header::HOST).iter().nth(1).is_some() {
            return Ok(too_many_hosts());
        }
        if admission.is_some() {
            return Ok(self.respond(req, peer, admission).await);
        }
        // 1. Kubelet health checks: ready only while the autoscaler link is up.
        if is_kubelet_probe(req.headers()) {
            // Knative's texts: cmd/activator/main.go newHealthCheck and knative/pkg
            // websocket ErrConnectionNotEstablished.
            if self.draining.load(Ordering::Acquire) {
                return Ok(go_http_error(
                    StatusCode::INTERNAL_SERVER_ERROR,
                    "received SIGTERM from kubelet\n",
                ));
            }
            if !self.link.connected() {
                return Ok(go_http_error(
                    StatusCode::INTERNAL_SERVER_ERROR,
                    "connection has not yet been established\n",
                ));
            }
            return Ok(empty(StatusCode::OK));
        }
        // 2. Network probe.
        let probe = req.headers().get(HDR_NETWORK_PROBE).cloned();
        let probe = probe
            .as_ref()
            .map_or("", |v| v.to_str().unwrap_or("\u{fffd}"));
        if probe == "probe" {
            let hash = req.headers().get(HDR_NETWORK_HASH).cloned();
            return Ok(match hash.filter(|h| !h.is_empty()) {
                Some(h) => {
                    let mut r = empty(StatusCode::OK);
                    r.headers_mut().insert(HDR_NETWORK_HASH, h);
                    r
                }
                None => go_http_error(
                    StatusCode::BAD_REQUEST,
                    "a probe request must contain a non-empty \"K-Network-Hash\" header\n",
                ),
            });
        }
        if req.headers().contains_key(HDR_NETWORK_HASH) {
            req.headers_mut().remove(HDR_NETWORK_HASH);
        }
        // 3. Activator probe.
        if !probe.is_empty() {
            return Ok(if probe == "activator" {
                text(StatusCode::OK, "activator")
            } else {
                // probe_handler.go: `%q` of the HTML-escaped value.
                go_http_error(
                    StatusCode::BAD_REQUEST,
                    format!("unexpected probe header value: {:?}\n", html_escape(probe)),
                )
            });
        }
        Ok(self.respond(req, peer, None).await)
    }

    async fn respond(
        self: &Arc<Self>,
        req: Request<Incoming>,
        peer: Option<SocketAddr>,
        admission: Option<Admission>,
    ) -> Response<RespBody> {
        match self.serve_revision(req, peer, admission).await {
            Ok(r) => r,
            Err(e) => {
                tracing::debug!(error = %e, "request failed");
                e.response()
            }
        }
    }

    fn lookup(&self, req: &Request<Incoming>) -> Result<Arc<RevisionSpec>, RequestError> {
        // Without a revision from headers or Host, Knative looks up the
        // Knative-Serving-Revision header's value (maybe empty) and fails on that name.
        let Some(key) = revision_from(req.headers(), req.uri()) else {
            let name = header_str(req.headers(), HDR_REV_NAME);
            return Err(RequestError::NotFound(name.to_owned()));
        };
        let spec = self.state.borrow().revisions.get(&key).cloned();
        spec.ok_or(RequestError::NotFound(key.name))
    }

    async fn serve_revision(
        self: &Arc<Self>,
        req: Request<Incoming>,
        peer: Option<SocketAddr>,
        admission: Option<Admission>,
    ) -> Result<Response<RespBody>, RequestError> {
        let admission = match admission {
            Some(a) => a,
            None => {
                // 5. Context: the revision must exist. 10-12: report, time out, throttle.
                let spec = self.lookup(&req)?;
                let gone = std::future::pending();
                let Some(a) = self.admit(spec, gone).await else {
                    return Err(RequestError::Timeout);
                };
                a
            }
        };
        let Admission {
            spec,
            result,
            started,
        } = admission;
        let (lease, in_flight) = result?;
        self.proxy(req, lease, in_flight, &spec, started, peer)
            .await
    }

    async fn proxy(
        &self,
        mut req: Request<Incoming>,
        lease: Lease,
        in_flight: InFlight,
        spec: &RevisionSpec,
        started: tokio::time::Instant,
        peer: Option<SocketAddr>,
    ) -> Result<Response<RespBody>, RequestError> {
        // knative/pkg network/transports.go newAutoTransport: HTTP/2 (h2c) to the pod only
        // when the client spoke HTTP/2, whatever the revision's port.
        let h2 = req.version() == http::Version::HTTP_2;
        let upgrade = !h2 && is_upgrade(req.headers());
        let client_upgrade = upgrade.then(|| hyper::upgrade::on(&mut req));
        let (mut parts, body) = req.into_parts();
        let pq = parts.uri.path_and_query().map_or("/", |pq| pq.as_str());
        let uri: Uri = format!("http://{}{}", lease.dest(), pq)
            .parse()
            .map_err(|e: http::uri::InvalidUri| RequestError::Upstream(e.to_string()))?;
        rewrite_request_headers(&mut parts.headers, &parts.uri, upgrade, peer);
        parts.uri = uri;
        let out = Request::from_parts(parts, body);
        let mut out = out;
        let send = if h2 {
            *out.version_mut() = http::Version::HTTP_2;
            self.client_h2.request(out)
        } else {
            *out.version_mut() = http::Version::HTTP_11;
            self.client_h1.request(out)
        };
        // One timer serves the first-byte timeout and then, when it ends at the same
        // instant (the usual case), the total timeout of the streamed body.
        let mut timer =
            first_byte_timeout(spec).map(|t| Box::pin(tokio::time::sleep_until(started + t)));
        let sent = match timer.as_mut() {
            Some(t) => tokio::select! {
                r = send => r,
                _ = t.as_mut() => return Err(RequestError::Timeout),
            },
            None => send.await,
        };
        let mut resp = sent.map_err(|e| {
            let mut msg = e.to_string();
            let mut src = std::error::Error::source(&e);
            while let Some(s) = src {
                msg = format!("{msg}: {s}");
                src = s.source();
            }
            RequestError::Upstream(msg)
        })?;
        if resp.status() == StatusCode::SWITCHING_PROTOCOLS
            && let Some(client_upgrade) = client_upgrade
        {
            let upstream_upgrade = hyper::upgrade::on(&mut resp);
            tokio::spawn(async move {
                let _hold = (lease, in_flight);
                match tokio::try_join!(client_upgrade, upstream_upgrade) {
                    Ok((c, u)) => {
                        let mut c = TokioIo::new(c);
                        let mut u = TokioIo::new(u);
                        let _ = tokio::io::copy_bidirectional(&mut c, &mut u).await;
                    }
                    Err(e) => tracing::debug!(error = %e, "upgrade failed"),
                }
            });
            let (parts, _) = resp.into_parts();
            return Ok(Response::from_parts(
                parts,
                Full::new(Bytes::new()).map_err(|e| match e {}).boxed(),
            ));
        }
        let (mut parts, body) = resp.into_parts();
        strip_hop_by_hop(&mut parts.headers, false);
        let deadline = match (
            (!spec.timeout.is_zero()).then(|| started + spec.timeout),
            timer,
        ) {
            (None, _) => None,
            (Some(at), Some(mut t)) => {
                if t.deadline() != at {
                    t.as_mut().reset(at);
                }
                Some(t)
            }
            (Some(at), None) => Some(Box::pin(tokio::time::sleep_until(at))),
        };
        let idle = spec
            .idle_timeout
            .filter(|d| !d.is_zero())
            .map(|d| (d, Box::pin(tokio::time::sleep(d))));
        let mut body = GuardedBody {
            inner: body,
            read_ahead: VecDeque::new(),
            hold: Some((lease, in_flight)),
            deadline,
            idle,
        };
        // The common answer has a Content-Type: one lookup, nothing read ahead.
        if !parts.headers.contains_key(header::CONTENT_TYPE)
            && sniff::go_sniffs(
                parts.status.as_u16(),
                false,
                parts
                    .headers
                    .get(header::CONTENT_ENCODING)
                    .map(HeaderValue::as_bytes),
            )
            && let Some(ct) = body.sniff().await?
        {
            parts
                .headers
                .insert(header::CONTENT_TYPE, HeaderValue::from_static(ct));
        }
        Ok(Response::from_parts(parts, body.boxed()))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn hm(pairs: &[(&'static str, &'static str)]) -> HeaderMap {
        let mut h = HeaderMap::new();
        for (k, v) in pairs {
            h.append(*k, HeaderValue::from_static(v));
        }
        h
    }

    #[test]
    fn revision_from_headers_or_host() {
        let uri: Uri = "/x".parse().unwrap();
        let h = hm(&[
            (HDR_REV_NAMESPACE, "ns"),
            (HDR_REV_NAME, "rev"),
            ("host", "other.x"),
        ]);
        assert_eq!(revision_from(&h, &uri), Some(RevisionKey::new("ns", "rev")));
        let h = hm(&[("host", "hello-00001.default.svc.cluster.local:80")]);
        assert_eq!(
            revision_from(&h, &uri),
            Some(RevisionKey::new("default", "hello-00001"))
        );
        assert_eq!(
            revision_from(&hm(&[("host", "localhost:8012")]), &uri),
            None
        );
        assert_eq!(revision_from(&hm(&[]), &uri), None);
        let abs: Uri = "http://r.ns.svc.cluster.local/x".parse().unwrap();
        assert_eq!(
            revision_from(&hm(&[]), &abs),
            Some(RevisionKey::new("ns", "r"))
        );
    }

    #[test]
    fn headers_rewritten_as_knative_does() {
        let mut h = hm(&[
            ("host", "hello.default.example.com"),
            (HDR_REV_NAMESPACE, "default"),
            (HDR_REV_NAME, "hello-00001"),
            ("connection", "keep-alive, x-hop"),
            ("x-hop", "1"),
            ("te", "deflate, trailers"),
            (HDR_NETWORK_HASH, "h"),
            ("x-forwarded-for", "1.1.1.1"),
            ("x-user", "kept"),
        ]);
        let uri: Uri = "/".parse().unwrap();
        rewrite_request_headers(&mut h, &uri, false, Some("10.0.0.1:5555".parse().unwrap()));
        assert_eq!(
            h.get(HDR_ORIGINAL_HOST).unwrap(),
            "hello.default.example.com"
        );
        assert!(h.get("host").is_none());
        assert_eq!(h.get(HDR_PROXY_REQUEST).unwrap(), "activator");
        assert!(h.get(HDR_REV_NAMESPACE).is_none() && h.get(HDR_REV_NAME).is_none());
        assert!(h.get("x-hop").is_none() && h.get("connection").is_none());
        assert!(h.get(HDR_NETWORK_HASH).is_none());
        assert_eq!(h.get("te").unwrap(), "trailers");
        assert_eq!(h.get("x-forwarded-for").unwrap(), "1.1.1.1, 10.0.0.1");
        assert_eq!(h.get("x-user").unwrap(), "kept");

        let mut h = hm(&[("connection", "Upgrade"), ("upgrade", "websocket")]);
        assert!(is_upgrade(&h));
        rewrite_request_headers(&mut h, &uri, true, None);
        assert_eq!(h.get("upgrade").unwrap(), "websocket");
        assert_eq!(h.get("connection").unwrap(), "upgrade");
    }

    #[test]
    fn statuses() {
        assert_eq!(RequestError::NotFound("x".into()).status(), 404);
        assert_eq!(
            RequestError::NotFound("nope".into()).body(),
            (
                "Error getting active endpoint: revision.serving.knative.dev \"nope\" not found\n"
                    .into(),
                true
            )
        );
        assert_eq!(
            RequestError::Timeout.body(),
            ("activator request timeout".into(), false)
        );
        assert_eq!(html_escape("<a&'\">"), "&lt;a&amp;&#39;&#34;&gt;");
        assert_eq!(RequestError::Timeout.status(), 504);
        assert_eq!(
            RequestError::Throttled(ThrottleError::QueueFull).status(),
            503
        );
        assert_eq!(RequestError::Upstream("x".into()).status(), 502);
    }
}
