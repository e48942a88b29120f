//! The shared-memory fast path: Trigger subscribers that are dataplane-SDK functions
//! (`subscriber.ref.kind: SprightFunction`) on this node receive each event as a 16-byte
//! descriptor into the pool owned by broker-shm, with no HTTP hop.
//!
//! Wire convention inside the slot: the event in the CloudEvents JSON format. A function
//! answers through the SDK by leaving a CloudEvent (JSON format) in the slot as its reply, an
//! empty payload for "no reply", or a rejection status. The function's descriptor comes back
//! to the broker (the SDK's gateway id), whose reply thread completes the waiting delivery.

use crate::delivery::{Attempt, SendOptions, Sink, SinkFuture};
use crate::event::CloudEvent;
use crate::manifests::Target;
use bytes::Bytes;
use spright_core::chain::RoutingTable;
use spright_core::descriptor::GATEWAY_ID;
use spright_core::host::{Host, HostConfig, HostEvent};
use spright_core::pool::PoolConfig;
use spright_core::transport::{TransportChoice, TransportError};
use std::collections::HashMap;
use std::path::PathBuf;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::time::Duration;
use tokio::sync::oneshot;

/// Default wait for a function's answer when the delivery sets no timeout.
pub const DEFAULT_TIMEOUT: Duration = Duration::from_secs(30);

/// Settings of the node's dataplane as seen by broker-shm.
#[derive(Debug, Clone)]
pub struct ShmConfig {
    /// Control socket and Unix transport directory.
    pub run_dir: PathBuf,
    /// Function names that may join (each becomes a one-step chain).
    pub functions: Vec<String>,
    pub transport: TransportChoice,
    pub pool: PoolConfig,
}

struct Outcome {
    status: u16,
    payload: Bytes,
}

type Pending = Mutex<HashMap<u64, oneshot::Sender<Outcome>>>;

/// The pool owner plus the request/answer bookkeeping.
pub struct ShmDataplane {
    host: Host,
    pending: Arc<Pending>,
    next_id: AtomicU64,
}

impl std::fmt::Debug for ShmDataplane {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("ShmDataplane")
            .field("host", &self.host)
            .finish()
    }
}

fn lock<T>(m: &Mutex<T>) -> std::sync::MutexGuard<'_, T> {
    m.lock().unwrap_or_else(std::sync::PoisonError::into_inner)
}

impl ShmDataplane {
    /// Creates the pool, the transport and the control socket; functions join at
    /// `<run_dir>/control.sock` with the SDK's `Function::join`.
    pub fn start(cfg: ShmConfig) -> anyhow::Result<Arc<ShmDataplane>> {
        let mut routing = RoutingTable::default();
        for (i, name) in cfg.functions.iter().enumerate() {
            let id = u32::try_from(i + 1)?;
            routing.functions.insert(name.clone(), id);
            routing.chains.push(vec![id]);
        }
        let host = Host::start(
            HostConfig {
                run_dir: cfg.run_dir.clone(),
                transport: cfg.transport,
                pool: cfg.pool,
                ebpf: Default::default(),
                routing,
            },
            |ev| match ev {
                HostEvent::Joined { function, id, pid } => {
                    tracing::info!(function, id, pid, "shared-memory function joined");
                }
                other => tracing::info!(event = ?other, "dataplane event"),
            },
        )?;
        let dp = Arc::new(ShmDataplane {
            host,
            pending: Arc::default(),
            next_id: AtomicU64::new(1),
        });
        let reader = dp.clone();
        std::thread::Builder::new()
            .name("shm-replies".into())
            .spawn(move || reader.reply_loop())?;
        tracing::info!(control = %dp.host.control_path().display(), transport = ?dp.host.kind(), "shared-memory dataplane ready");
        Ok(dp)
    }

    /// Path of the control socket functions join through.
    pub fn control_path(&self) -> PathBuf {
        self.host.control_path()
    }

    /// Blocks in the kernel until a function hands a descriptor back.
    fn reply_loop(&self) {
        let pool = self.host.pool();
        loop {
            let desc = match self.host.endpoint().recv() {
                Ok(d) => d,
                Err(TransportError::Closed) => return,
                Err(e) => {
                    tracing::warn!(error = %e, "dataplane endpoint failed");
                    return;
                }
            };
            let Ok(slot) = pool.claim(&desc, GATEWAY_ID) else {
                tracing::warn!("dropping an invalid descriptor");
                continue;
            };
            let outcome = Outcome {
                status: slot.http_status(),
                payload: Bytes::copy_from_slice(slot.payload()),
            };
            let id = slot.request_id();
            drop(slot);
            if let Some(tx) = lock(&self.pending).remove(&id) {
                let _ = tx.send(outcome);
            }
        }
    }

    async fn call(&self, function: &str, payload: &[u8], timeout: Duration) -> Attempt {
        let routing = self.host.routing();
        let Some(fid) = routing.id(function) else {
            return Attempt::failed(format!(
                "function {function} is not declared in --shm-functions"
            ));
        };
        if !self.host.is_attached(fid) {
            return Attempt::failed(format!("function {function} has not joined the dataplane"));
        }
        let pool = self.host.pool();
        let mut slot = match pool.alloc(GATEWAY_ID) {
            Ok(s) => s,
            Err(e) => return Attempt::failed(format!("pool: {e}")),
        };
        if let Err(e) = slot.write(payload) {
            return Attempt {
                status: Some(413),
                ..Attempt::failed(format!("event does not fit a pool slot: {e}"))
            };
        }
        let id = self.next_id.fetch_add(1, Ordering::Relaxed);
        slot.set_request_id(id);
        let chain = u16::try_from(fid - 1).unwrap_or(u16::MAX);
        slot.set_route(chain, 0);
        let (tx, rx) = oneshot::channel();
        lock(&self.pending).insert(id, tx);
        let desc = match slot.send_to(fid) {
            Ok(d) => d,
            Err(e) => {
                lock(&self.pending).remove(&id);
                return Attempt::failed(e.to_string());
            }
        };
        if let Err(e) = self.host.endpoint().send(&desc) {
            lock(&self.pending).remove(&id);
            if let Ok(s) = pool.claim(&desc, desc.dst) {
                drop(s);
            }
            return Attempt::failed(format!("sending to {function}: {e}"));
        }
        match tokio::time::timeout(timeout, rx).await {
            Ok(Ok(o)) => {
                let mut headers = http::HeaderMap::new();
                if !o.payload.is_empty() {
                    headers.insert(
                        http::header::CONTENT_TYPE,
                        http::HeaderValue::from_static("application/cloudevents+json"),
                    );
                }
                Attempt {
                    status: Some(o.status),
                    headers,
                    body: o.payload,
                    error: None,
                }
            }
            Ok(Err(_)) => Attempt::failed(format!("function {function} dropped the event")),
            Err(_) => {
                lock(&self.pending).remove(&id);
                Attempt::failed(format!("function {function} timed out after {timeout:?}"))
            }
        }
    }
}

impl Sink for ShmDataplane {
    fn send<'a>(
        &'a self,
        target: &'a Target,
        event: &'a CloudEvent,
        opts: &'a SendOptions,
    ) -> SinkFuture<'a> {
        Box::pin(async move {
            let Target::ShmFunction(name) = target else {
                return Attempt::failed("not a shared-memory function");
            };
            // Functions join with the bare name of the subscriber ref.
            let fname = name.rsplit('/').next().unwrap_or(name);
            let payload = event.to_structured();
            self.call(fname, &payload, opts.timeout.unwrap_or(DEFAULT_TIMEOUT))
                .await
        })
    }
}
