//! The handler chain of the serving port (serving `pkg/queue/sharedmain/handlers.go`,
//! knative-contract.md A.3), outermost first:
//! request log -> drainer (health checks, network probes) -> timeouts -> `Forwarded` shim ->
//! accounting + host rewrite -> breaker -> request metrics -> reverse proxy.
//! Each concern lives in its own module; this one only composes them.

use std::net::SocketAddr;
use std::sync::Arc;
use std::time::Instant as StdInstant;

use http::{HeaderValue, Request, Response, StatusCode, header, response::Parts};
use http_body_util::BodyExt;
use hyper::body::Incoming;
use spright_core::sniff;
use tokio::time::Instant;

use crate::accounting::RequestAccounting;
use crate::body::{self, Body};
use crate::breaker::{self, Breaker, Ticket};
use crate::drain::Drainer;
use crate::forwarded;
use crate::health::{self, Kind};
use crate::metrics::RequestMetrics;
use crate::proxy::{self, Proxy};
use crate::readiness::Prober;
use crate::reqlog::RequestLog;
use crate::sniff::Prepended;
use crate::timeout::{self, TimedBody, Timeouts};
use crate::timer::Timers;
use crate::upstream::UpstreamBody;

pub struct Chain {
    pub drainer: Arc<Drainer>,
    pub prober: Option<Arc<Prober>>,
    pub accounting: Arc<dyn RequestAccounting>,
    pub breaker: Option<Arc<Breaker>>,
    pub timeouts: Timeouts,
    /// Per-request deadlines (the revision timeouts).
    pub timers: Arc<Timers>,
    pub proxy: Proxy,
    pub metrics: Option<Arc<RequestMetrics>>,
    pub request_log: Option<Arc<RequestLog>>,
}

impl std::fmt::Debug for Chain {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Chain")
            .field("timeouts", &self.timeouts)
            .finish_non_exhaustive()
    }
}

/// Released when the response is complete: the completion event for the autoscaler and
/// the duration for the request metrics.
pub(crate) struct Guard {
    pub(crate) accounting: Arc<dyn RequestAccounting>,
    pub(crate) proxied: bool,
    pub(crate) metrics: Option<(Arc<RequestMetrics>, StdInstant, u16)>,
    pub(crate) _ticket: Option<Ticket>,
}

impl Drop for Guard {
    fn drop(&mut self) {
        self.accounting.completion(self.proxied, StdInstant::now());
        if let Some((m, start, status)) = self.metrics.take() {
            m.record(status, start.elapsed().as_secs_f64());
        }
    }
}

impl Chain {
    /// Serves one request from `client`.
    pub async fn handle(
        self: Arc<Self>,
        req: Request<Incoming>,
        client: SocketAddr,
    ) -> Response<Body> {
        match &self.request_log {
            Some(log) => {
                let entry = log.begin(&req, client);
                let res = self.drainer_layer(req, client).await;
                RequestLog::finish(entry, res)
            }
            None => self.drainer_layer(req, client).await,
        }
    }

    async fn drainer_layer(&self, req: Request<Incoming>, client: SocketAddr) -> Response<Body> {
        match health::classify(req.headers()) {
            Kind::HealthCheck => {
                if self.drainer.draining() {
                    return health::shutting_down();
                }
                if let Some(r) = health::bad_probe_header(req.headers()) {
                    return r;
                }
                let ready = match &self.prober {
                    Some(p) => p.probe().await,
                    None => true,
                };
                health::probe_result(ready)
            }
            Kind::NetworkProbe => {
                if self.drainer.draining() {
                    health::shutting_down()
                } else {
                    health::network_probe(req.headers())
                }
            }
            Kind::Request => {
                self.drainer.touch();
                self.timeout_layer(req, client).await
            }
        }
    }

    async fn timeout_layer(
        &self,
        mut req: Request<Incoming>,
        client: SocketAddr,
    ) -> Response<Body> {
        let start = Instant::now();
        let total_deadline = start + self.timeouts.total;
        forwarded::apply(req.headers_mut());
        let inner = self.proxy_layer(req, client, total_deadline);
        let (res, guard) = tokio::select! {
            res = inner => match res {
                Ok(r) => r,
                Err(res) => return res,
            },
            () = self.timers.sleep_until(self.timeouts.before_start(start)) => return timeout::gateway_timeout(),
        };
        let (mut parts, body) = res.into_parts();
        if !needs_sniffing(&parts) {
            return Response::from_parts(
                parts,
                TimedBody::new(
                    Prepended::new(None, body),
                    total_deadline,
                    self.timeouts.idle,
                    guard,
                    &self.timers,
                )
                .boxed(),
            );
        }
        // Like Go's server, hold the head until the first bytes show the content type. Go's
        // reverse proxy flushes the head of a response without Content-Length at once, so
        // there only bytes that are already here are sniffed.
        let mut body = body;
        if http_body::Body::size_hint(&body).exact().is_none() {
            use futures::FutureExt;
            let first = match body.frame().now_or_never() {
                Some(Some(Ok(frame))) => Some(frame),
                _ => None,
            };
            if let Some(data) = first
                .as_ref()
                .and_then(|f| f.data_ref())
                .filter(|d| !d.is_empty())
            {
                parts.headers.insert(
                    header::CONTENT_TYPE,
                    HeaderValue::from_static(sniff::detect(data)),
                );
            }
            return Response::from_parts(
                parts,
                TimedBody::new(
                    Prepended::new(first, body),
                    total_deadline,
                    self.timeouts.idle,
                    guard,
                    &self.timers,
                )
                .boxed(),
            );
        }
        let deadline = match self.timeouts.idle {
            Some(idle) => total_deadline.min(Instant::now() + idle),
            None => total_deadline,
        };
        let first = match tokio::select! {
            f = body.frame() => Ok(f),
            () = self.timers.sleep_until(deadline) => Err(()),
        } {
            Ok(Some(Ok(frame))) => Some(frame),
            Ok(Some(Err(e))) => {
                tracing::error!(error = %e, "error reading the user container's response");
                return proxy::error_response(&proxy::ProxyError::Upstream(e.to_string()));
            }
            Ok(None) => None,
            Err(_) => {
                // The head was already "written" with the upstream status; Knative's
                // timeout message becomes the body.
                drop(guard);
                parts.headers.insert(
                    header::CONTENT_TYPE,
                    HeaderValue::from_static(body::TEXT_PLAIN),
                );
                parts.headers.remove(header::CONTENT_LENGTH);
                return Response::from_parts(parts, body::full(timeout::MESSAGE));
            }
        };
        if let Some(data) = first
            .as_ref()
            .and_then(|f| f.data_ref())
            .filter(|d| !d.is_empty())
        {
            parts.headers.insert(
                header::CONTENT_TYPE,
                HeaderValue::from_static(sniff::detect(data)),
            );
        }
        Response::from_parts(
            parts,
            TimedBody::new(
                Prepended::new(first, body),
                total_deadline,
                self.timeouts.idle,
                guard,
                &self.timers,
            )
            .boxed(),
        )
    }

    /// Accounting, host rewrite, breaker, metrics and the proxy itself.
    async fn proxy_layer(
        &self,
        mut req: Request<Incoming>,
        client: SocketAddr,
        deadline: Instant,
    ) -> Result<(Response<UpstreamBody>, Option<Guard>), Response<Body>> {
        let probe = health::is_probe(req.headers());
        if health::is_kubelet_probe(req.headers()) {
            // Kubelet probes that got past the drainer (only `K-Kubelet-Probe` marks them)
            // skip accounting and the breaker.
            return match self.proxy.forward(req, client).await {
                Ok((res, splice)) => {
                    if let Some(s) = splice {
                        s.start((), Some(deadline));
                    }
                    Ok((res, None))
                }
                Err(e) => Err(proxy::error_response(&e)),
            };
        }
        let proxied = health::is_proxied(req.headers());
        self.accounting.arrival(proxied, StdInstant::now());
        let mut guard = Guard {
            accounting: Arc::clone(&self.accounting),
            proxied,
            metrics: None,
            _ticket: None,
        };
        if let Some(host) = req.headers_mut().remove(health::K_ORIGINAL_HOST)
            && !host.is_empty()
        {
            // The original host replaces whatever authority the request carried.
            req.headers_mut().insert(header::HOST, host);
            if req.uri().authority().is_some() {
                let pq = req.uri().path_and_query().cloned();
                let mut parts = http::uri::Parts::default();
                parts.path_and_query =
                    pq.or_else(|| Some(http::uri::PathAndQuery::from_static("/")));
                if let Ok(u) = http::Uri::from_parts(parts) {
                    *req.uri_mut() = u;
                }
            }
        }
        if let Some(b) = &self.breaker {
            let mut ticket = b
                .enter()
                .map_err(|_| body::error(StatusCode::SERVICE_UNAVAILABLE, breaker::QUEUE_FULL))?;
            ticket.wait().await;
            guard._ticket = Some(ticket);
        }
        if let Some(m) = &self.metrics {
            if let Some(b) = &self.breaker {
                m.set_queue_depth(b.in_flight());
            }
            if !probe {
                guard.metrics = Some((Arc::clone(m), StdInstant::now(), 200));
            }
        }
        match self.proxy.forward(req, client).await {
            Ok((res, splice)) => {
                if let Some(m) = guard.metrics.as_mut() {
                    m.2 = res.status().as_u16();
                }
                match splice {
                    Some(s) => {
                        s.start(guard, Some(deadline));
                        Ok((res, None))
                    }
                    None => Ok((res, Some(guard))),
                }
            }
            Err(e) => {
                tracing::error!(error = %e, "error reverse proxying request");
                if let Some(m) = guard.metrics.as_mut() {
                    m.2 = e.status().as_u16();
                }
                Err(proxy::error_response(&e))
            }
        }
    }
}

/// Go's server sniffs a `Content-Type` for bodies that come without one.
fn needs_sniffing(parts: &Parts) -> bool {
    spright_core::sniff::go_sniffs(
        parts.status.as_u16(),
        parts.headers.contains_key(header::CONTENT_TYPE),
        parts
            .headers
            .get(header::CONTENT_ENCODING)
            .map(HeaderValue::as_bytes),
    )
}
