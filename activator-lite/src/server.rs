//! Listeners (8012 and 8013 speak HTTP/1.1 and h2c, 9090 metrics, 8008 profiling, which is
//! off as by Knative's default), wiring, and the SIGTERM drain: health checks fail at once,
//! requests keep being served for the drain delay (45 s), then the listeners close and
//! open connections finish gracefully.

use std::net::SocketAddr;
use std::sync::Arc;
use std::sync::atomic::{AtomicUsize, Ordering};

use anyhow::Context as _;
use bytes::BytesMut;
use hyper::body::Incoming;
use hyper::service::service_fn;
use hyper_util::rt::{TokioExecutor, TokioIo};
use hyper_util::server::conn::auto;
use tokio::net::TcpListener;
use tokio::sync::{Notify, mpsc, watch};

use crate::admission::{Head, Rewind, client_gone, read_request};
use crate::autoscaler::{self, LinkStatus};
use crate::backends::{Backends, PodProber};
use crate::config::Config;
use crate::fast::Parsed;
use crate::handler::{App, RespBody, text};
use crate::manifests::{ClusterSource, ManifestDir};
use crate::stats::ConcurrencyReporter;
use crate::throttler::Throttler;

/// Counts open connections so shutdown can wait for them.
#[derive(Debug, Default)]
struct Conns {
    open: AtomicUsize,
    idle: Notify,
}

struct ConnGuard(Arc<Conns>);

impl Drop for ConnGuard {
    fn drop(&mut self) {
        if self.0.open.fetch_sub(1, Ordering::AcqRel) == 1 {
            self.0.idle.notify_waiters();
        }
    }
}

impl Conns {
    fn enter(self: &Arc<Self>) -> ConnGuard {
        self.open.fetch_add(1, Ordering::AcqRel);
        ConnGuard(self.clone())
    }
    async fn wait_idle(&self) {
        loop {
            let n = self.idle.notified();
            if self.open.load(Ordering::Acquire) == 0 {
                return;
            }
            n.await;
        }
    }
}

/// Serves one connection with hyper until it closes or shutdown begins.
async fn drive<I, S>(io: I, svc: S, mut stop: watch::Receiver<bool>)
where
    I: hyper::rt::Read + hyper::rt::Write + Unpin + Send + 'static,
    S: hyper::service::Service<
            hyper::Request<Incoming>,
            Response = hyper::Response<RespBody>,
            Error = std::convert::Infallible,
        > + Send
        + 'static,
    S::Future: Send + 'static,
{
    let builder = auto::Builder::new(TokioExecutor::new());
    let conn = builder.serve_connection_with_upgrades(io, svc);
    tokio::pin!(conn);
    tokio::select! {
        r = conn.as_mut() => {
            if let Err(e) = r {
                tracing::debug!(error = %e, "connection error");
            }
            return;
        }
        _ = stop.wait_for(|s| *s) => {}
    }
    conn.as_mut().graceful_shutdown();
    let _ = conn.await;
}

/// One connection of the request path. Plain HTTP/1.1 requests for a revision are
/// served by the fast path ([`crate::fast`]) as long as the connection sends them; the
/// first request that needs more (probes, HTTP/2, upgrades, streamed bodies…) hands
/// the connection, with the bytes already read, to hyper. A request for a revision
/// gets its pod slot before either path allocates anything for it (see
/// [`crate::admission`]).
async fn app_conn(
    app: Arc<App>,
    mut stream: tokio::net::TcpStream,
    peer: SocketAddr,
    mut stop: watch::Receiver<bool>,
) {
    let mut buf = BytesMut::new();
    let mut ubuf = BytesMut::new();
    // The client's address for X-Forwarded-For, written out once per connection, and the
    // buffer each fast request's head for the pod is built in.
    let peer_ip = peer.ip().to_string();
    let mut spare = Vec::new();
    let mut first = true;
    let admission = loop {
        let parsed = tokio::select! {
            r = read_request(&mut stream, &mut buf, Some(peer_ip.as_bytes()), &mut spare) => r,
            _ = stop.wait_for(|s| *s) => return,
        };
        let key = match parsed {
            Ok(Some(Parsed::Fast(req))) => match app.revision(&req.key) {
                // Any revision: the protocol to the pod follows the client's (HTTP/1.1
                // here), also for h2c revisions (their `http2` port speaks both).
                Some(spec) => {
                    let Some(adm) = app.admit(spec, client_gone(&stream)).await else {
                        return;
                    };
                    // Boxed: a held connection's task stays small (see crate::admission).
                    let serve = crate::fast::serve(
                        &app.pool,
                        &mut stream,
                        &mut buf,
                        &mut ubuf,
                        &mut spare,
                        req,
                        adm,
                    );
                    if !Box::pin(serve).await {
                        return;
                    }
                    first = false;
                    continue;
                }
                None => req.key,
            },
            Ok(Some(Parsed::Slow(Head::Revision(key)))) if first => key,
            Ok(Some(_)) => break None,
            Ok(None) | Err(_) => return,
        };
        // A revision request for hyper: on a fresh connection, hold it cheaply here.
        break match app.revision(&key) {
            Some(spec) if first => match app.admit(spec, client_gone(&stream)).await {
                Some(a) => Some(a),
                None => return,
            },
            _ => None,
        };
    };
    drop((ubuf, spare));
    let first = Arc::new(std::sync::Mutex::new(admission));
    let svc = service_fn(move |req| {
        let adm = first.lock().unwrap_or_else(|p| p.into_inner()).take();
        app.clone().handle(req, Some(peer), adm)
    });
    let io = TokioIo::new(Rewind::new(buf.freeze(), stream));
    // Boxed: the hyper connection is allocated only once a request may proceed.
    Box::pin(drive(io, svc, stop)).await;
}

async fn accept_loop<F, Fut>(
    listener: TcpListener,
    on_conn: F,
    mut stop: watch::Receiver<bool>,
    conns: Arc<Conns>,
) where
    F: Fn(tokio::net::TcpStream, SocketAddr, watch::Receiver<bool>) -> Fut + Send + 'static,
    Fut: std::future::Future<Output = ()> + Send + 'static,
{
    loop {
        let (stream, peer) = tokio::select! {
            r = listener.accept() => match r {
                Ok(x) => x,
                Err(e) => {
                    tracing::warn!(error = %e, "accept failed");
                    continue;
                }
            },
            _ = stop.wait_for(|s| *s) => return,
        };
        let _ = stream.set_nodelay(true);
        let guard = conns.enter();
        let fut = on_conn(stream, peer, stop.clone());
        tokio::spawn(async move {
            let _guard = guard;
            fut.await;
        });
    }
}

async fn bind(cfg: &Config, port: u16, what: &str) -> anyhow::Result<TcpListener> {
    let addr = SocketAddr::new(cfg.bind, port);
    TcpListener::bind(addr)
        .await
        .with_context(|| format!("binding the {what} listener on {addr}"))
}

async fn terminated() -> anyhow::Result<()> {
    use tokio::signal::unix::{SignalKind, signal};
    let mut term = signal(SignalKind::terminate()).context("installing the SIGTERM handler")?;
    let mut int = signal(SignalKind::interrupt()).context("installing the SIGINT handler")?;
    tokio::select! {
        _ = term.recv() => {}
        _ = int.recv() => {}
    }
    Ok(())
}

/// Runs the activator until SIGTERM/SIGINT and the drain are done.
pub async fn run(cfg: Config) -> anyhow::Result<()> {
    crate::fast::set_cluster_domain(&cfg.cluster_domain);
    let source = ManifestDir::start(&cfg.manifests)
        .with_context(|| format!("loading manifests from {}", cfg.manifests.display()))?;
    let state = source.subscribe();
    let throttler = Arc::new(Throttler::default());
    let backends = Backends::new(
        throttler.clone(),
        PodProber::new(cfg.probe_timeout),
        cfg.probe_frequency,
        cfg.queue_depth,
        cfg.pod_ip.clone(),
    );
    backends.apply(&state.borrow());
    tokio::spawn(backends.clone().run(state.clone()));

    let (stats_tx, stats_rx) = mpsc::unbounded_channel();
    let reporter = ConcurrencyReporter::new(cfg.pod_name.clone(), stats_tx);
    tokio::spawn(reporter.clone().run());
    let link = Arc::new(LinkStatus::default());
    tokio::spawn(autoscaler::run(
        cfg.autoscaler_url.clone(),
        stats_rx,
        link.clone(),
    ));

    let app = App::new(
        state.clone(),
        throttler.clone(),
        reporter.clone(),
        link.clone(),
        cfg.queue_depth,
        cfg.max_idle_proxy_conns,
        cfg.max_idle_proxy_conns_per_host,
    );

    let l1 = bind(&cfg, cfg.http1_port, "http1").await?;
    let l2 = bind(&cfg, cfg.h2c_port, "h2c").await?;
    let lm = bind(&cfg, cfg.metrics_port, "metrics").await?;
    let lp = bind(&cfg, cfg.profiling_port, "profiling").await?;
    tracing::info!(
        http1 = cfg.http1_port,
        h2c = cfg.h2c_port,
        metrics = cfg.metrics_port,
        profiling = cfg.profiling_port,
        autoscaler = %cfg.autoscaler_url,
        manifests = %cfg.manifests.display(),
        "activator-lite serving"
    );

    let tls = match &cfg.tls {
        Some((cert, key)) => {
            let tls_cfg = crate::tls::server_config(cert, key, cfg.tls_min_version_13)
                .context("loading the TLS certificate")?;
            let l = bind(&cfg, cfg.https_port, "https").await?;
            tracing::info!(https = cfg.https_port, "serving HTTPS");
            Some((l, tokio_rustls::TlsAcceptor::from(tls_cfg)))
        }
        None => None,
    };
    let (stop_tx, stop_rx) = watch::channel(false);
    let conns = Arc::new(Conns::default());
    if let Some((l, acceptor)) = tls {
        let app = app.clone();
        let on_conn = move |s, peer: SocketAddr, stop| {
            let (app, acceptor) = (app.clone(), acceptor.clone());
            async move {
                let Ok(tls) = acceptor.accept(s).await else {
                    return;
                };
                let svc = service_fn(move |req| app.clone().handle(req, Some(peer), None));
                drive(TokioIo::new(tls), svc, stop).await;
            }
        };
        tokio::spawn(accept_loop(l, on_conn, stop_rx.clone(), conns.clone()));
    }
    for l in [l1, l2] {
        let app = app.clone();
        let on_conn = move |s, peer, stop| app_conn(app.clone(), s, peer, stop);
        tokio::spawn(accept_loop(l, on_conn, stop_rx.clone(), conns.clone()));
    }
    let metrics_handler = {
        let state = state.clone();
        let throttler = throttler.clone();
        let reporter = reporter.clone();
        let link = link.clone();
        move |req: hyper::Request<Incoming>| {
            let st = state.borrow().clone();
            let body = if req.uri().path() == "/metrics" {
                let mut r = text(
                    hyper::StatusCode::OK,
                    crate::metrics::render(
                        &st,
                        &throttler,
                        &|k| reporter.in_flight(k),
                        link.connected(),
                        link.errors(),
                    ),
                );
                r.headers_mut().insert(
                    hyper::header::CONTENT_TYPE,
                    hyper::header::HeaderValue::from_static("text/plain; version=0.0.4"),
                );
                r
            } else {
                text(hyper::StatusCode::NOT_FOUND, "not found")
            };
            std::future::ready(Ok(body))
        }
    };
    // Metrics stay up through the drain and close with the rest.
    let on_metrics_conn = move |s: tokio::net::TcpStream, _peer, stop| {
        drive(TokioIo::new(s), service_fn(metrics_handler.clone()), stop)
    };
    tokio::spawn(accept_loop(
        lm,
        on_metrics_conn,
        stop_rx.clone(),
        Arc::new(Conns::default()),
    ));

    // Knative's profiling server with profiling off: Go's NotFound for every request.
    let on_profiling_conn = |s: tokio::net::TcpStream, _peer, stop| {
        let svc = service_fn(|_req: hyper::Request<Incoming>| {
            let mut r = text(hyper::StatusCode::NOT_FOUND, "404 page not found\n");
            r.headers_mut().insert(
                "x-content-type-options",
                hyper::header::HeaderValue::from_static("nosniff"),
            );
            std::future::ready(Ok(r))
        });
        drive(TokioIo::new(s), svc, stop)
    };
    tokio::spawn(accept_loop(
        lp,
        on_profiling_conn,
        stop_rx,
        Arc::new(Conns::default()),
    ));

    terminated().await?;
    app.draining
        .store(true, std::sync::atomic::Ordering::Release);
    tracing::info!(
        drain_secs = cfg.drain_timeout.as_secs_f64(),
        "received SIGTERM; failing health checks and draining"
    );
    tokio::time::sleep(cfg.drain_timeout).await;
    let _ = stop_tx.send(true);
    conns.wait_idle().await;
    tracing::info!("drained; exiting");
    drop(source);
    Ok(())
}
