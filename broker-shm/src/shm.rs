//! The shared-memory fast path: Trigger subscribers that are dataplane-SDK functions
//! (`subscriber.ref.kind: SprightFunction`) on this node receive each event as a 16-byte
//! descriptor into the pool owned by broker-shm, with no HTTP hop.
//!
//! Wire convention inside the slot: the event in the CloudEvents JSON format. A function
//! answers through the SDK by leaving a CloudEvent (JSON format) in the slot as its reply, an
//! empty payload for "no reply", or a rejection status. The function's descriptor comes back
//! to the broker (the SDK's gateway id), whose reply thread completes the delivery in place:
//! with [`Sink::start`] the broker's routing of the reply (log append, next descriptor) runs
//! on that thread, so a step of a chain wakes no task.

use crate::delivery::{Attempt, Done, SendOptions, Sink, SinkFuture};
use crate::event::CloudEvent;
use crate::manifests::Target;
use bytes::Bytes;
use spright_core::chain::RoutingTable;
use spright_core::descriptor::GATEWAY_ID;
use spright_core::host::{Host, HostConfig, HostEvent};
use spright_core::pool::PoolConfig;
use spright_core::transport::{TransportChoice, TransportError, TransportKind};
use std::collections::HashMap;
use std::path::PathBuf;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Condvar, Mutex};
use std::time::{Duration, Instant};
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

/// Most descriptors the reply thread sends to one function before that function has answered
/// the earlier ones, per transport: below the smallest queue the transport offers, so a send
/// from the reply thread never blocks (a blocked reply thread could not drain the answers the
/// function is blocked sending). Unix datagram sockets hold `net.unix.max_dgram_qlen`
/// datagrams, 10 by default; an sk_msg redirect queues the 16-byte descriptors in the
/// receiving socket's memory (`tcp_rmem`, 128 KiB by default), room for thousands. Beyond
/// the limit a delivery runs as a task instead (a wake-up more per event).
fn reply_thread_sends(kind: TransportKind) -> u32 {
    match kind {
        TransportKind::Unix => 8,
        TransportKind::SkMsg => 64,
    }
}

/// How long an answer that timed out is still expected before its descriptor counts as lost.
const FORGET_AFTER: Duration = Duration::from_secs(60);

/// Descriptors taken per wakeup of the reply thread.
const BATCH: usize = 64;

std::thread_local! {
    static ON_REPLY_THREAD: std::cell::Cell<bool> = const { std::cell::Cell::new(false) };
}

struct PendingCall {
    function: u32,
    deadline: Instant,
    /// `None` once the call timed out (the entry stays until the late answer or
    /// [`FORGET_AFTER`], so the per-function count stays true).
    done: Option<Done>,
}

#[derive(Default)]
struct Calls {
    map: HashMap<u64, PendingCall>,
    /// Descriptors sent to each function and not answered yet.
    outstanding: HashMap<u32, u32>,
    /// When the timeout thread will look next (`None`: it sleeps until told).
    armed: Option<Instant>,
    closed: bool,
}

impl Calls {
    fn forget(&mut self, id: u64) -> Option<PendingCall> {
        let call = self.map.remove(&id)?;
        if let Some(n) = self.outstanding.get_mut(&call.function) {
            *n = n.saturating_sub(1);
        }
        Some(call)
    }
}

/// The pool owner plus the request/answer bookkeeping. Answers are handed to their
/// callbacks on the reply thread itself (no task wakes up); timeouts are found by one
/// thread that sleeps until the earliest deadline (no polling).
pub struct ShmDataplane {
    host: Host,
    /// [`reply_thread_sends`] of the transport in use.
    reply_thread_sends: u32,
    calls: Mutex<Calls>,
    timeouts: Condvar,
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

/// A function's answer as a delivery attempt.
fn answer(status: u16, payload: &[u8]) -> Attempt {
    let mut headers = http::HeaderMap::new();
    if !payload.is_empty() {
        headers.insert(
            http::header::CONTENT_TYPE,
            http::HeaderValue::from_static("application/cloudevents+json"),
        );
    }
    Attempt {
        status: Some(status),
        headers,
        body: Bytes::copy_from_slice(payload),
        error: None,
    }
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
            reply_thread_sends: reply_thread_sends(host.kind()),
            host,
            calls: Mutex::default(),
            timeouts: Condvar::new(),
            next_id: AtomicU64::new(1),
        });
        let reader = dp.clone();
        std::thread::Builder::new()
            .name("shm-replies".into())
            .spawn(move || {
                ON_REPLY_THREAD.with(|f| f.set(true));
                reader.reply_loop();
                lock(&reader.calls).closed = true;
                reader.timeouts.notify_all();
            })?;
        let sweeper = dp.clone();
        std::thread::Builder::new()
            .name("shm-timeouts".into())
            .spawn(move || sweeper.timeout_loop())?;
        tracing::info!(control = %dp.host.control_path().display(), transport = ?dp.host.kind(), "shared-memory dataplane ready");
        Ok(dp)
    }

    /// Path of the control socket functions join through.
    pub fn control_path(&self) -> PathBuf {
        self.host.control_path()
    }

    /// Blocks in the kernel until functions hand descriptors back; completes each call on
    /// this thread.
    fn reply_loop(&self) {
        let pool = self.host.pool();
        let mut batch = Vec::with_capacity(BATCH);
        loop {
            batch.clear();
            match self.host.endpoint().recv_batch(&mut batch, BATCH) {
                Ok(()) => {}
                Err(TransportError::Closed) => return,
                Err(e) => {
                    tracing::warn!(error = %e, "dataplane endpoint failed");
                    return;
                }
            }
            for desc in &batch {
                let Ok(slot) = pool.claim(desc, GATEWAY_ID) else {
                    tracing::warn!("dropping an invalid descriptor");
                    continue;
                };
                let id = slot.request_id();
                let done = lock(&self.calls).forget(id).and_then(|c| c.done);
                if let Some(done) = done {
                    let attempt = answer(slot.http_status(), slot.payload());
                    drop(slot);
                    done(attempt);
                }
            }
        }
    }

    /// Fails calls whose deadline passed; sleeps until the earliest remaining deadline.
    fn timeout_loop(&self) {
        let mut calls = lock(&self.calls);
        loop {
            if calls.closed {
                return;
            }
            let now = Instant::now();
            let mut expired = Vec::new();
            let mut lost = Vec::new();
            let mut next: Option<Instant> = None;
            for (id, c) in calls.map.iter_mut() {
                if c.done.is_some() && c.deadline <= now {
                    expired.extend(c.done.take());
                }
                let at = if c.done.is_some() {
                    c.deadline
                } else {
                    c.deadline + FORGET_AFTER
                };
                if at <= now {
                    lost.push(*id);
                } else {
                    next = Some(next.map_or(at, |n| n.min(at)));
                }
            }
            for id in lost {
                calls.forget(id);
            }
            calls.armed = next;
            drop(calls);
            for done in expired {
                done(Attempt::failed("the function did not answer in time"));
            }
            calls = lock(&self.calls);
            calls = match calls.armed {
                None => self
                    .timeouts
                    .wait(calls)
                    .unwrap_or_else(std::sync::PoisonError::into_inner),
                Some(at) => {
                    let wait = at.saturating_duration_since(Instant::now());
                    self.timeouts
                        .wait_timeout(calls, wait)
                        .unwrap_or_else(std::sync::PoisonError::into_inner)
                        .0
                }
            };
        }
    }

    /// Sends `payload` to `function`; `done` gets the answer (or the failure) exactly once.
    fn begin(
        &self,
        function: &str,
        payload: &[u8],
        timeout: Duration,
        done: Done,
        probe: Option<&CloudEvent>,
    ) {
        let routing = self.host.routing();
        let Some(fid) = routing.id(function) else {
            return done(Attempt::failed(format!(
                "function {function} is not declared in --shm-functions"
            )));
        };
        if !self.host.is_attached(fid) {
            return done(Attempt::failed(format!(
                "function {function} has not joined the dataplane"
            )));
        }
        let pool = self.host.pool();
        let mut slot = match pool.alloc(GATEWAY_ID) {
            Ok(s) => s,
            Err(e) => return done(Attempt::failed(format!("pool: {e}"))),
        };
        if let Err(e) = slot.write(payload) {
            return done(Attempt {
                status: Some(413),
                ..Attempt::failed(format!("event does not fit a pool slot: {e}"))
            });
        }
        let id = self.next_id.fetch_add(1, Ordering::Relaxed);
        slot.set_request_id(id);
        let chain = u16::try_from(fid - 1).unwrap_or(u16::MAX);
        slot.set_route(chain, 0);
        let deadline = Instant::now() + timeout;
        {
            let mut calls = lock(&self.calls);
            calls.map.insert(
                id,
                PendingCall {
                    function: fid,
                    deadline,
                    done: Some(done),
                },
            );
            *calls.outstanding.entry(fid).or_insert(0) += 1;
            if calls.armed.is_none_or(|a| a > deadline) {
                calls.armed = Some(deadline);
                self.timeouts.notify_one();
            }
        }
        if let Some(ev) = probe {
            crate::probe::mark("shm.slot_written", ev);
        }
        let failure = match slot.send_to(fid) {
            Ok(desc) => match self.host.endpoint().send(&desc) {
                Ok(()) => return,
                Err(e) => {
                    if let Ok(s) = pool.claim(&desc, desc.dst) {
                        drop(s);
                    }
                    format!("sending to {function}: {e}")
                }
            },
            Err(e) => e.to_string(),
        };
        if let Some(done) = lock(&self.calls).forget(id).and_then(|c| c.done) {
            done(Attempt::failed(failure));
        }
    }

    /// True when a send to `function` may not happen on the current thread right now: the
    /// reply thread must never block on a full queue.
    fn must_not_send_here(&self, function: &str) -> bool {
        if !ON_REPLY_THREAD.with(std::cell::Cell::get) {
            return false;
        }
        let Some(fid) = self.host.routing().id(function) else {
            return false;
        };
        lock(&self.calls)
            .outstanding
            .get(&fid)
            .is_some_and(|n| *n >= self.reply_thread_sends)
    }
}

/// The function name of a `SprightFunction` target: functions join with the bare name of the
/// subscriber ref.
fn function_name(name: &str) -> &str {
    name.rsplit('/').next().unwrap_or(name)
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
            let (tx, rx) = oneshot::channel();
            self.begin(
                function_name(name),
                &event.to_structured(),
                opts.timeout.unwrap_or(DEFAULT_TIMEOUT),
                Box::new(move |a| {
                    let _ = tx.send(a);
                }),
                None,
            );
            rx.await
                .unwrap_or_else(|_| Attempt::failed("the dataplane dropped the event"))
        })
    }

    fn start(
        &self,
        target: &Target,
        event: &CloudEvent,
        opts: &SendOptions,
        done: Done,
    ) -> Result<(), Done> {
        let Target::ShmFunction(name) = target else {
            return Err(done);
        };
        let name = function_name(name);
        if self.must_not_send_here(name) {
            return Err(done);
        }
        let payload = event.to_structured();
        crate::probe::mark("shm.encoded", event);
        self.begin(
            name,
            &payload,
            opts.timeout.unwrap_or(DEFAULT_TIMEOUT),
            done,
            Some(event),
        );
        Ok(())
    }
}
