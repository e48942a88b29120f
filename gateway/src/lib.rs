//! The gateway: HTTP in, a chain of functions over the shared pool, HTTP out.
//!
//! A request's body is copied once into a pool slot; from there only 16-byte descriptors move
//! until the chain's last function sends the slot back to the gateway (function id 0), which
//! copies the result into the response. Requests wait on a oneshot keyed by request id; a
//! dedicated thread blocks on the gateway's endpoint and completes them.

pub mod config;
pub mod supervisor;

use std::collections::HashMap;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use bytes::Bytes;
use http::{Method, Request, Response, StatusCode, header};
use http_body_util::{BodyExt, Full, Limited};
use hyper::body::Incoming;
use spright_core::descriptor::GATEWAY_ID;
use spright_core::host::{Host, HostEvent};
use spright_core::pool::PoolError;
use spright_core::transport::TransportError;
use tokio::sync::oneshot;
use tracing::{info, warn};

/// What a chain produced: a status and a body.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Outcome {
    pub status: u16,
    pub body: Bytes,
}

impl Outcome {
    fn error(status: u16, message: impl Into<String>) -> Self {
        Self {
            status,
            body: Bytes::from(message.into()),
        }
    }
}

/// Requests in flight, by request id.
#[derive(Debug, Default)]
pub struct Pending {
    waiting: Mutex<HashMap<u64, oneshot::Sender<Outcome>>>,
}

impl Pending {
    fn insert(&self, id: u64) -> oneshot::Receiver<Outcome> {
        let (tx, rx) = oneshot::channel();
        self.lock().insert(id, tx);
        rx
    }

    /// Completes request `id`, if it is still waiting.
    pub fn complete(&self, id: u64, outcome: Outcome) -> bool {
        let tx = self.lock().remove(&id);
        tx.is_some_and(|tx| tx.send(outcome).is_ok())
    }

    fn forget(&self, id: u64) {
        self.lock().remove(&id);
    }

    /// Number of requests in flight.
    pub fn len(&self) -> usize {
        self.lock().len()
    }

    /// Whether no request is in flight.
    pub fn is_empty(&self) -> bool {
        self.len() == 0
    }

    fn lock(&self) -> std::sync::MutexGuard<'_, HashMap<u64, oneshot::Sender<Outcome>>> {
        self.waiting
            .lock()
            .unwrap_or_else(std::sync::PoisonError::into_inner)
    }
}

/// Turns host events into request outcomes: requests whose slots died with a function get a
/// 502, requests sent to a function that is not attached a 503.
pub fn on_host_event(pending: &Pending, event: HostEvent) {
    match event {
        HostEvent::Joined { .. } => {}
        HostEvent::Died {
            function, requests, ..
        } => {
            for id in requests {
                pending.complete(
                    id,
                    Outcome::error(
                        502,
                        format!("function {function:?} died while handling the request\n"),
                    ),
                );
            }
        }
        HostEvent::Unroutable { dst, request } => {
            pending.complete(
                request,
                Outcome::error(
                    503,
                    format!("function {dst} is not attached to the dataplane\n"),
                ),
            );
        }
    }
}

#[derive(Debug, Default)]
struct ChainStats {
    by_class: [AtomicU64; 6],
}

/// The gateway's shared state.
pub struct Gateway {
    host: Host,
    pending: Arc<Pending>,
    routes: HashMap<String, u16>,
    names: Vec<String>,
    stats: Vec<ChainStats>,
    next_id: AtomicU64,
    request_timeout: Duration,
    access_log: bool,
}

impl std::fmt::Debug for Gateway {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Gateway")
            .field("routes", &self.routes)
            .finish()
    }
}

impl Gateway {
    /// Builds the gateway over a started host. `routes` maps HTTP paths to chain indexes.
    pub fn new(
        host: Host,
        pending: Arc<Pending>,
        chains: &[spright_core::chain::ChainSpec],
        request_timeout: Duration,
        access_log: bool,
    ) -> Arc<Self> {
        let routes = chains
            .iter()
            .zip(0u16..)
            .map(|(c, i)| (c.route.clone(), i))
            .collect();
        let gw = Arc::new(Self {
            host,
            pending,
            routes,
            names: chains.iter().map(|c| c.name.clone()).collect(),
            stats: chains.iter().map(|_| ChainStats::default()).collect(),
            next_id: AtomicU64::new(1),
            request_timeout,
            access_log,
        });
        let reader = Arc::clone(&gw);
        tokio::spawn(async move { reader.reply_loop().await });
        gw
    }

    /// The host.
    pub fn host(&self) -> &Host {
        &self.host
    }

    /// Requests in flight.
    pub fn pending(&self) -> &Pending {
        &self.pending
    }

    /// Receives results on the gateway's endpoint from the runtime's event loop (epoll on the
    /// socket, non-blocking reads in batches), so a result completes its request on the same
    /// thread that serves the HTTP connection, with no extra thread wakeup.
    async fn reply_loop(&self) {
        use tokio::io::Interest;
        use tokio::io::unix::AsyncFd;
        /// Keeps the endpoint (and so its socket) alive for as long as the reactor watches it.
        struct Watched(Arc<dyn spright_core::transport::Transport>);
        impl std::os::fd::AsRawFd for Watched {
            fn as_raw_fd(&self) -> std::os::fd::RawFd {
                self.0.recv_fd()
            }
        }
        let endpoint = Arc::clone(self.host.endpoint());
        // SAFETY: `Watched` owns an `Arc` of the endpoint, so the socket behind `recv_fd` stays
        // open, and is the same file description, for the whole life of the `AsyncFd`. The
        // socket stays in blocking mode for the endpoint's sends; the reactor only reports
        // readiness, and every read here is MSG_DONTWAIT (`try_recv_batch`), so nothing blocks
        // the runtime.
        let registered = unsafe {
            AsyncFd::register_with_interest(Watched(Arc::clone(&endpoint)), Interest::READABLE)
        };
        let afd = match registered {
            Ok(a) => a,
            Err(e) => {
                tracing::error!(error = %e, "watching the gateway endpoint");
                return;
            }
        };
        let mut batch = Vec::with_capacity(64);
        loop {
            let Ok(mut ready) = afd.readable().await else {
                return;
            };
            batch.clear();
            match endpoint.try_recv_batch(&mut batch, 64) {
                Ok(true) => {}
                Ok(false) => {
                    ready.clear_ready();
                    continue;
                }
                Err(TransportError::Closed) => return,
                Err(e) => {
                    warn!(error = %e, "gateway endpoint");
                    return;
                }
            }
            for desc in &batch {
                self.complete(desc);
            }
        }
    }

    /// Completes the request a result descriptor belongs to.
    fn complete(&self, desc: &spright_core::descriptor::Descriptor) {
        let slot = match self.host.pool().claim(desc, GATEWAY_ID) {
            Ok(s) => s,
            Err(e) => {
                warn!(error = %e, "dropping an invalid result descriptor");
                return;
            }
        };
        let outcome = Outcome {
            status: slot.http_status(),
            body: Bytes::copy_from_slice(slot.payload()),
        };
        let id = slot.request_id();
        drop(slot); // back to the pool before the waiter runs
        self.pending.complete(id, outcome);
    }

    /// Runs one request through chain `chain`.
    pub async fn run_chain(&self, chain: u16, body: &[u8]) -> Outcome {
        let routing = self.host.routing();
        let Some(&first) = routing
            .chains
            .get(usize::from(chain))
            .and_then(|s| s.first())
        else {
            return Outcome::error(404, "no such chain\n");
        };
        let pool = self.host.pool();
        let mut slot = match pool.alloc(GATEWAY_ID) {
            Ok(s) => s,
            Err(e @ PoolError::Exhausted(_)) => return Outcome::error(503, format!("{e}\n")),
            Err(e) => return Outcome::error(500, format!("{e}\n")),
        };
        if let Err(e) = slot.write(body) {
            return Outcome::error(413, format!("{e}\n"));
        }
        let id = self.next_id.fetch_add(1, Ordering::Relaxed);
        slot.set_request_id(id);
        slot.set_route(chain, 0);
        let rx = self.pending.insert(id);
        let desc = match slot.send_to(first) {
            Ok(d) => d,
            Err(e) => {
                self.pending.forget(id);
                return Outcome::error(500, format!("{e}\n"));
            }
        };
        if let Err(e) = self.host.endpoint().send(&desc) {
            self.pending.forget(id);
            // The slot is in flight to a function that cannot take it: recall and free it.
            if let Ok(s) = pool.claim(&desc, desc.dst) {
                drop(s);
            }
            return Outcome::error(503, format!("{e}\n"));
        }
        match tokio::time::timeout(self.request_timeout, rx).await {
            Ok(Ok(outcome)) => outcome,
            Ok(Err(_)) => Outcome::error(502, "the request was dropped\n"),
            Err(_) => {
                self.pending.forget(id);
                Outcome::error(504, "the chain did not answer in time\n")
            }
        }
    }

    /// Whether every function of every chain is attached.
    pub fn ready(&self) -> bool {
        self.host
            .routing()
            .functions
            .values()
            .all(|id| self.host.is_attached(*id))
    }

    /// Prometheus text exposition of the gateway's metrics.
    pub fn metrics_text(&self) -> String {
        use std::fmt::Write;
        let mut out = String::new();
        let _ = writeln!(
            out,
            "# HELP spright_gateway_requests_total Requests served, by chain and status class."
        );
        let _ = writeln!(out, "# TYPE spright_gateway_requests_total counter");
        for (name, st) in self.names.iter().zip(&self.stats) {
            for (class, n) in st.by_class.iter().enumerate().skip(1) {
                let _ = writeln!(
                    out,
                    "spright_gateway_requests_total{{chain=\"{name}\",code_class=\"{class}xx\"}} {}",
                    n.load(Ordering::Relaxed)
                );
            }
        }
        let cfg = self.host.pool().config();
        let _ = writeln!(
            out,
            "# HELP spright_pool_slots Slots in the shared-memory pool."
        );
        let _ = writeln!(out, "# TYPE spright_pool_slots gauge");
        let _ = writeln!(out, "spright_pool_slots {}", cfg.slot_count);
        let _ = writeln!(
            out,
            "# HELP spright_pool_free_slots Free slots in the shared-memory pool."
        );
        let _ = writeln!(out, "# TYPE spright_pool_free_slots gauge");
        let _ = writeln!(
            out,
            "spright_pool_free_slots {}",
            self.host.pool().free_count()
        );
        let _ = writeln!(
            out,
            "# HELP spright_gateway_inflight_requests Requests waiting for their chain."
        );
        let _ = writeln!(out, "# TYPE spright_gateway_inflight_requests gauge");
        let _ = writeln!(
            out,
            "spright_gateway_inflight_requests {}",
            self.pending.len()
        );
        if let Some((per, unknown)) = self.host.counters() {
            let routing = self.host.routing();
            let label = |id: u32| {
                if id == GATEWAY_ID {
                    "gateway".to_owned()
                } else {
                    routing.name(id).unwrap_or("?").to_owned()
                }
            };
            let _ = writeln!(
                out,
                "# HELP spright_skmsg_messages_total Descriptors the sk_msg program redirected, by destination."
            );
            let _ = writeln!(out, "# TYPE spright_skmsg_messages_total counter");
            for (id, c) in &per {
                let _ = writeln!(
                    out,
                    "spright_skmsg_messages_total{{destination=\"{}\"}} {}",
                    label(*id),
                    c.messages
                );
            }
            let _ = writeln!(
                out,
                "spright_skmsg_messages_total{{destination=\"unknown\"}} {}",
                unknown.messages
            );
            let _ = writeln!(
                out,
                "# HELP spright_skmsg_bytes_total Bytes the sk_msg program judged, by destination."
            );
            let _ = writeln!(out, "# TYPE spright_skmsg_bytes_total counter");
            for (id, c) in &per {
                let _ = writeln!(
                    out,
                    "spright_skmsg_bytes_total{{destination=\"{}\"}} {}",
                    label(*id),
                    c.bytes
                );
            }
            let _ = writeln!(
                out,
                "spright_skmsg_bytes_total{{destination=\"unknown\"}} {}",
                unknown.bytes
            );
        }
        out
    }

    /// The HTTP handler.
    pub async fn handle(
        self: Arc<Self>,
        req: Request<Incoming>,
    ) -> Result<Response<Full<Bytes>>, std::convert::Infallible> {
        let start = Instant::now();
        let seen = self
            .access_log
            .then(|| (req.method().clone(), req.uri().path().to_owned()));
        let (response, chain) = self.route(req).await;
        if let Some(c) = chain {
            let class = usize::from(response.status().as_u16() / 100).min(5);
            if let Some(st) = self.stats.get(usize::from(c)) {
                st.by_class[class].fetch_add(1, Ordering::Relaxed);
            }
        }
        if let Some((method, path)) = seen {
            info!(
                method = %method,
                path = %path,
                status = response.status().as_u16(),
                latency_us = u64::try_from(start.elapsed().as_micros()).unwrap_or(u64::MAX),
                "request"
            );
        }
        Ok(response)
    }

    async fn route(&self, req: Request<Incoming>) -> (Response<Full<Bytes>>, Option<u16>) {
        let path = req.uri().path();
        match (req.method(), path) {
            (&Method::GET, "/healthz") => {
                return if self.ready() {
                    (text(200, "ok\n"), None)
                } else {
                    (text(503, "waiting for functions to attach\n"), None)
                };
            }
            (&Method::GET, "/functions") => {
                let list: Vec<_> = self
                    .host
                    .attached()
                    .into_iter()
                    .map(|(name, id, pid)| serde_json::json!({"name": name, "id": id, "pid": pid}))
                    .collect();
                let mut r = text(200, serde_json::Value::Array(list).to_string());
                r.headers_mut().insert(
                    header::CONTENT_TYPE,
                    header::HeaderValue::from_static("application/json"),
                );
                return (r, None);
            }
            (&Method::GET, "/metrics") => {
                let mut r = text(200, self.metrics_text());
                r.headers_mut().insert(
                    header::CONTENT_TYPE,
                    header::HeaderValue::from_static("text/plain; version=0.0.4"),
                );
                return (r, None);
            }
            _ => {}
        }
        let Some(&chain) = self.routes.get(path) else {
            return (text(404, format!("no chain at {path}\n")), None);
        };
        if req.method() != Method::POST {
            let mut r = text(405, "chains take POST\n");
            r.headers_mut()
                .insert(header::ALLOW, header::HeaderValue::from_static("POST"));
            return (r, Some(chain));
        }
        let limit = self.host.pool().config().slot_size as usize;
        let body = match Limited::new(req.into_body(), limit).collect().await {
            Ok(b) => b.to_bytes(),
            Err(e) => {
                let status = if e.is::<http_body_util::LengthLimitError>() {
                    413
                } else {
                    400
                };
                return (
                    text(status, format!("reading the request body: {e}\n")),
                    Some(chain),
                );
            }
        };
        let outcome = self.run_chain(chain, &body).await;
        let mut r = Response::new(Full::new(outcome.body));
        *r.status_mut() =
            StatusCode::from_u16(outcome.status).unwrap_or(StatusCode::INTERNAL_SERVER_ERROR);
        (r, Some(chain))
    }
}

fn text(status: u16, body: impl Into<Bytes>) -> Response<Full<Bytes>> {
    let mut r = Response::new(Full::new(body.into()));
    *r.status_mut() = StatusCode::from_u16(status).unwrap_or(StatusCode::INTERNAL_SERVER_ERROR);
    r.headers_mut().insert(
        header::CONTENT_TYPE,
        header::HeaderValue::from_static("text/plain; charset=utf-8"),
    );
    r
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn died_and_unroutable_complete_waiters_with_the_right_status() {
        let pending = Pending::default();
        let mut a = pending.insert(1);
        let mut b = pending.insert(2);
        on_host_event(
            &pending,
            HostEvent::Died {
                function: "f".into(),
                id: 3,
                pid: 9,
                requests: vec![1, 1, 77],
            },
        );
        on_host_event(&pending, HostEvent::Unroutable { dst: 4, request: 2 });
        assert_eq!(a.try_recv().expect("a").status, 502);
        assert_eq!(b.try_recv().expect("b").status, 503);
        assert!(pending.is_empty());
    }
}
