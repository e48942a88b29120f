//! Listeners (knative-contract.md A.2): the serving port (HTTP/1.1 and h2c on one socket),
//! the admin port with `/wait-for-drain`, autoscaler stats, user metrics. Each accept loop
//! stops on the shutdown signal and then waits for its open connections.

use std::convert::Infallible;
use std::future::Future;
use std::net::SocketAddr;
use std::sync::Arc;
use std::time::{Duration, Instant};

use http::{HeaderValue, Request, Response, StatusCode, header};
use hyper::body::Incoming;
use hyper::service::service_fn;
use hyper_util::rt::{TokioExecutor, TokioIo, TokioTimer};
use hyper_util::server::conn::auto;
use hyper_util::server::graceful::GracefulShutdown;
use prost::Message;
use tokio::io::{AsyncRead, AsyncWrite};
use tokio::net::TcpListener;
use tokio::sync::watch;

use crate::accounting::RequestAccounting;
use crate::body::{self, Body};
use crate::drain::Drainer;
use crate::metrics::RequestMetrics;
use crate::stat::{PROTOBUF_MIME, stat_from_report};
use crate::timer::{HyperTimer, Timers};

/// Go's `ReadHeaderTimeout` on every server.
const READ_HEADER_TIMEOUT: Duration = Duration::from_secs(60);
/// Go's `DefaultMaxHeaderBytes` (1 MiB) plus its 4 KiB slack.
pub const MAX_HEADER_BYTES: usize = (1 << 20) + 4096;
/// Go limits header bytes, not their number; hyper needs a count (its default is 100).
pub const MAX_HEADERS: usize = 256;

/// `timers` carries the HTTP/1 header-read timeout, which every keep-alive request restarts.
pub fn builder(timers: &Arc<Timers>) -> auto::Builder<TokioExecutor> {
    let mut b = auto::Builder::new(TokioExecutor::new());
    b.http1()
        .timer(HyperTimer(Arc::clone(timers)))
        .header_read_timeout(READ_HEADER_TIMEOUT)
        .max_headers(MAX_HEADERS)
        .max_buf_size(MAX_HEADER_BYTES);
    b.http2()
        .timer(TokioTimer::new())
        .max_header_list_size(u32::try_from(MAX_HEADER_BYTES).unwrap_or(u32::MAX));
    b
}

/// Accepts connections from `listener` until `stop` turns true, serving each with `handler`
/// (given the peer address), then waits for the open connections to finish.
pub async fn serve<H, F, W>(
    listener: TcpListener,
    handler: H,
    mut stop: watch::Receiver<bool>,
    wrap: W,
) where
    H: Fn(Request<Incoming>, SocketAddr) -> F + Clone + Send + Sync + 'static,
    F: Future<Output = Response<Body>> + Send + 'static,
    W: Wrap,
{
    let graceful = GracefulShutdown::new();
    let builder = builder(&Timers::start());
    loop {
        let accepted = tokio::select! {
            r = listener.accept() => r,
            _ = stop.wait_for(|s| *s) => break,
        };
        let (stream, peer) = match accepted {
            Ok(c) => c,
            Err(e) => {
                tracing::warn!(error = %e, "accept failed");
                // Out of descriptors and the like: back off instead of spinning.
                tokio::time::sleep(Duration::from_millis(10)).await;
                continue;
            }
        };
        let _ = stream.set_nodelay(true);
        let h = handler.clone();
        let svc = service_fn(move |req: Request<Incoming>| {
            let early = missing_host(&req);
            let f = early.is_none().then(|| h(req, peer));
            async move {
                Ok::<_, Infallible>(match (f, early) {
                    (Some(f), _) => f.await,
                    (None, Some(r)) => r,
                    (None, None) => not_found(),
                })
            }
        });
        let builder = builder.clone();
        let graceful_watch = graceful.watcher();
        let wrap = wrap.clone();
        let stop_conn = stop.clone();
        tokio::spawn(async move {
            let Some(io) = wrap.wrap(stream, peer, stop_conn).await else {
                return;
            };
            let conn = builder.serve_connection_with_upgrades(TokioIo::new(io), svc);
            let _ = graceful_watch.watch(conn.into_owned()).await;
        });
    }
    drop(listener);
    graceful.shutdown().await;
}

/// Turns an accepted stream into the one hyper serves (identity, TLS, or what the fast
/// path hands over); `None` when the connection is done. `stop` turns true on shutdown.
pub trait Wrap: Clone + Send + Sync + 'static {
    type Io: AsyncRead + AsyncWrite + Unpin + Send + 'static;
    fn wrap(
        &self,
        s: tokio::net::TcpStream,
        peer: SocketAddr,
        stop: watch::Receiver<bool>,
    ) -> impl Future<Output = Option<Self::Io>> + Send;
}

#[derive(Clone, Copy, Debug)]
pub struct Plain;

impl Wrap for Plain {
    type Io = tokio::net::TcpStream;
    async fn wrap(
        &self,
        s: tokio::net::TcpStream,
        _: SocketAddr,
        _: watch::Receiver<bool>,
    ) -> Option<Self::Io> {
        Some(s)
    }
}

/// Go's server refuses an HTTP/1.1 request without a Host header before any handler runs.
fn missing_host(req: &Request<Incoming>) -> Option<Response<Body>> {
    const MSG: &str = "Bad Request: missing required Host header";
    if req.version() != http::Version::HTTP_11
        || req.headers().contains_key(header::HOST)
        || req.uri().authority().is_some()
    {
        return None;
    }
    let mut r = Response::new(body::full(format!("400 {MSG}")));
    *r.status_mut() = StatusCode::BAD_REQUEST;
    r.headers_mut().insert(
        header::CONTENT_TYPE,
        HeaderValue::from_static(body::TEXT_PLAIN),
    );
    r.headers_mut()
        .insert(header::CONNECTION, HeaderValue::from_static("close"));
    r.extensions_mut()
        .insert(hyper::ext::ReasonPhrase::from_static(MSG.as_bytes()));
    Some(r)
}

fn not_found() -> Response<Body> {
    body::error(StatusCode::NOT_FOUND, "404 page not found")
}

/// The admin handler: `/wait-for-drain` drains, then answers 200. Without a SIGTERM within a
/// second of the call the drain is cancelled again (a user-container restart, not a pod
/// shutdown).
pub async fn admin(
    req: Request<Incoming>,
    drainer: Arc<Drainer>,
    terminating: watch::Receiver<bool>,
) -> Response<Body> {
    if req.uri().path() != "/wait-for-drain" {
        return not_found();
    }
    tracing::info!("Attached drain handler from user-container");
    let d = Arc::clone(&drainer);
    let mut term = terminating;
    tokio::spawn(async move {
        let signalled = tokio::time::timeout(Duration::from_secs(1), term.wait_for(|t| *t)).await;
        if !matches!(signalled, Ok(Ok(_))) {
            d.reset();
        }
    });
    drainer.drain().await;
    body::status(StatusCode::OK)
}

/// The autoscaler stats handler (`/metrics` only, protobuf whatever the Accept header).
pub fn stats(
    req: &Request<Incoming>,
    pod: &str,
    accounting: &dyn RequestAccounting,
) -> Response<Body> {
    if req.uri().path() != "/metrics" {
        return not_found();
    }
    let stat = stat_from_report(pod, accounting.snapshot(Instant::now()));
    let mut r = Response::new(body::full(stat.encode_to_vec()));
    r.headers_mut().insert(
        header::CONTENT_TYPE,
        HeaderValue::from_static(PROTOBUF_MIME),
    );
    r
}

/// The user metrics handler (`/metrics`, Prometheus text).
pub fn user_metrics(req: &Request<Incoming>, m: &RequestMetrics) -> Response<Body> {
    if req.uri().path() != "/metrics" {
        return not_found();
    }
    let mut r = Response::new(body::full(m.render()));
    r.headers_mut().insert(
        header::CONTENT_TYPE,
        HeaderValue::from_static(crate::metrics::CONTENT_TYPE),
    );
    r
}
