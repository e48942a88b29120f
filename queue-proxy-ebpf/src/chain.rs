//! The handler chain of the serving port (serving `pkg/queue/sharedmain/handlers.go`,
//! knative-contract.md A.3), outermost first:
//! request log -> drainer (health checks, network probes) -> timeouts -> `Forwarded` shim ->
//! accounting + host rewrite -> breaker -> request metrics -> reverse proxy.
//! Each concern lives in its own module; this one only composes them.

use std::net::SocketAddr;
use std::sync::Arc;
use std::time::Instant as StdInstant;

use http::{Request, Response, StatusCode, header};
use http_body_util::BodyExt;
use hyper::body::Incoming;
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
use crate::timeout::{self, TimedBody, Timeouts};

pub struct Chain {
    pub drainer: Arc<Drainer>,
    pub prober: Option<Arc<Prober>>,
    pub accounting: Arc<dyn RequestAccounting>,
    pub breaker: Option<Arc<Breaker>>,
    pub timeouts: Timeouts,
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
struct Guard {
    accounting: Arc<dyn RequestAccounting>,
    proxied: bool,
    metrics: Option<(Arc<RequestMetrics>, StdInstant, u16)>,
    _ticket: Option<Ticket>,
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
        let inner = self.proxy_layer(req, client);
        tokio::select! {
            res = inner => match res {
                Ok((res, guard)) => res.map(|b| {
                    TimedBody::new(b, total_deadline, self.timeouts.idle, guard).boxed()
                }),
                Err(res) => res,
            },
            () = tokio::time::sleep_until(self.timeouts.before_start(start)) => timeout::gateway_timeout(),
        }
    }

    /// Accounting, host rewrite, breaker, metrics and the proxy itself.
    async fn proxy_layer(
        &self,
        mut req: Request<Incoming>,
        client: SocketAddr,
    ) -> Result<(Response<Incoming>, Guard), Response<Body>> {
        let proxied = health::is_proxied(req.headers());
        let probe = health::is_probe(req.headers());
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
            req.headers_mut().insert(header::HOST, host);
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
            Ok(res) => {
                if let Some(m) = guard.metrics.as_mut() {
                    m.2 = res.status().as_u16();
                }
                Ok((res, guard))
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
