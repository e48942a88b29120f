//! The broker runtime: per-broker logs, ingest (the ingress contract's processing steps),
//! and one dispatcher per Trigger that wakes on append, never on a timer.

use crate::delivery::{SendOptions, Sinks, with_error_extensions};
use crate::event::{ARRIVAL_EXT, CloudEvent, TTL_EXT};
use crate::filter::Filter;
use crate::log::{BrokerLog, Cursor, LogConfig, LogError};
use crate::manifests::{Delivery, DeliverySpec, Snapshot, Trigger};
use crate::metrics::Metrics;
use http::StatusCode;
use std::collections::{BTreeSet, HashMap};
use std::path::PathBuf;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex, RwLock};
use tokio::sync::watch;
use tokio::task::JoinSet;

/// Runtime settings.
#[derive(Debug, Clone)]
pub struct RuntimeConfig {
    pub data_dir: PathBuf,
    pub log: LogConfig,
    /// `MAX_TTL` (Knative default 255).
    pub max_ttl: i32,
    /// Concurrent deliveries per trigger.
    pub max_inflight: usize,
    /// Delivery used when neither Trigger nor Broker set one (config-br-defaults).
    pub default_delivery: Delivery,
}

/// Why an event was not accepted.
#[derive(Debug, thiserror::Error)]
pub enum IngestError {
    #[error("broker {0} not found")]
    NotFound(String),
    #[error("event dropped: TTL exhausted")]
    TtlExhausted,
    #[error(transparent)]
    Log(#[from] LogError),
}

impl IngestError {
    /// The status code the ingress answers with.
    pub fn status(&self) -> StatusCode {
        match self {
            IngestError::NotFound(_) => StatusCode::NOT_FOUND,
            IngestError::TtlExhausted => StatusCode::BAD_REQUEST,
            IngestError::Log(LogError::TooLarge(_)) => StatusCode::PAYLOAD_TOO_LARGE,
            IngestError::Log(LogError::Full(_)) => StatusCode::SERVICE_UNAVAILABLE,
            IngestError::Log(LogError::Io { .. }) => StatusCode::INTERNAL_SERVER_ERROR,
        }
    }
}

/// Applies the ingress steps: `knativearrivaltime`, then the TTL defaulter (missing → max,
/// present → decremented, floor 0); TTL ≤ 0 drops the event.
pub fn apply_ingress_extensions(ev: &mut CloudEvent, max_ttl: i32) -> Result<(), IngestError> {
    ev.set(
        ARRIVAL_EXT,
        chrono::Utc::now().to_rfc3339_opts(chrono::SecondsFormat::Nanos, true),
    );
    let ttl = match ev.get(TTL_EXT) {
        None => max_ttl,
        Some(raw) => raw
            .trim()
            .parse::<i32>()
            .map_or(0, |t| t.saturating_sub(1).max(0)),
    };
    ev.set(TTL_EXT, ttl.to_string());
    if ttl <= 0 {
        return Err(IngestError::TtlExhausted);
    }
    Ok(())
}

struct TriggerRun {
    trigger: Trigger,
    stop: watch::Sender<bool>,
    position: Arc<AtomicU64>,
}

/// An open log and its append notifier, shared by every `BrokerState` of the same broker
/// (a broker removed and re-added while deliveries are in flight keeps one writer).
pub struct SharedLog {
    log: Mutex<BrokerLog>,
    tail: watch::Sender<u64>,
}

/// One broker: its log, the append notifier and its running triggers.
pub struct BrokerState {
    pub namespace: String,
    pub name: String,
    delivery: RwLock<Option<DeliverySpec>>,
    log: Arc<SharedLog>,
    triggers: Mutex<HashMap<String, TriggerRun>>,
    /// Dispatch position of every trigger of this broker, running or restarting.
    positions: Mutex<HashMap<String, Arc<AtomicU64>>>,
    retired: std::sync::atomic::AtomicBool,
    max_ttl: i32,
}

impl std::fmt::Debug for BrokerState {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "Broker({}/{})", self.namespace, self.name)
    }
}

fn lock<T>(m: &Mutex<T>) -> std::sync::MutexGuard<'_, T> {
    m.lock().unwrap_or_else(std::sync::PoisonError::into_inner)
}

impl BrokerState {
    /// Stores an event that already went through the ingress steps; returns after the
    /// append (and msync, per durability), i.e. when a 202 may be sent.
    pub fn append(&self, ev: &CloudEvent) -> Result<u64, IngestError> {
        let rec = ev.to_record();
        let appended = lock(&self.log.log).append(&rec);
        let tail = match appended {
            Err(LogError::Full(_)) => {
                // Segments every trigger has passed (all of them when there is no trigger)
                // may still be on disk: drop them and try once more.
                self.truncate();
                lock(&self.log.log).append(&rec)?
            }
            other => other?,
        };
        self.log.tail.send_replace(tail);
        Ok(tail)
    }

    /// Ingress: extensions, TTL check, append.
    pub fn ingest(&self, mut ev: CloudEvent) -> Result<u64, IngestError> {
        apply_ingress_extensions(&mut ev, self.max_ttl)?;
        self.append(&ev)
    }

    /// Log statistics: (head, tail, disk bytes).
    pub fn log_stats(&self) -> (u64, u64, u64) {
        let log = lock(&self.log.log);
        (log.head(), log.tail(), log.disk_bytes())
    }

    /// Deletes segments every trigger has passed. Positions outlive trigger restarts (they
    /// leave `positions` only when the trigger is deleted), and a retired broker state never
    /// truncates, so a segment is never deleted under a trigger that still needs it.
    fn truncate(&self) {
        if self.retired.load(Ordering::Acquire) {
            return;
        }
        let min = {
            let positions = lock(&self.positions);
            positions.values().map(|p| p.load(Ordering::Acquire)).min()
        };
        let mut log = lock(&self.log.log);
        let upto = min.unwrap_or_else(|| log.tail());
        log.truncate_below(upto);
    }
}

/// All brokers of this process.
pub struct Runtime {
    cfg: RuntimeConfig,
    sinks: Sinks,
    /// Counters served on the metrics port.
    pub metrics: Arc<Metrics>,
    brokers: RwLock<HashMap<(String, String), Arc<BrokerState>>>,
    open_logs: Mutex<HashMap<PathBuf, std::sync::Weak<SharedLog>>>,
}

impl std::fmt::Debug for Runtime {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Runtime").field("cfg", &self.cfg).finish()
    }
}

impl Runtime {
    pub fn new(cfg: RuntimeConfig, sinks: Sinks) -> Arc<Runtime> {
        Arc::new(Runtime {
            cfg,
            sinks,
            metrics: Arc::default(),
            brokers: RwLock::new(HashMap::new()),
            open_logs: Mutex::new(HashMap::new()),
        })
    }

    /// Settings.
    pub fn config(&self) -> &RuntimeConfig {
        &self.cfg
    }

    /// Looks a broker up.
    pub fn broker(&self, ns: &str, name: &str) -> Option<Arc<BrokerState>> {
        self.brokers
            .read()
            .unwrap_or_else(std::sync::PoisonError::into_inner)
            .get(&(ns.to_string(), name.to_string()))
            .cloned()
    }

    /// Prometheus exposition: counters plus log and lag gauges.
    pub fn metrics_text(&self) -> String {
        let brokers: Vec<Arc<BrokerState>> = self
            .brokers
            .read()
            .unwrap_or_else(std::sync::PoisonError::into_inner)
            .values()
            .cloned()
            .collect();
        let (mut disk, mut lag) = (Vec::new(), Vec::new());
        for b in &brokers {
            let (_, tail, bytes) = b.log_stats();
            let label = format!("broker=\"{}/{}\"", b.namespace, b.name);
            disk.push((label, bytes as f64));
            for (k, run) in lock(&b.triggers).iter() {
                let pos = run.position.load(Ordering::Acquire);
                lag.push((
                    format!("broker=\"{}/{}\",trigger=\"{k}\"", b.namespace, b.name),
                    tail.saturating_sub(pos) as f64,
                ));
            }
        }
        self.metrics.render(&[
            (
                "broker_shm_log_disk_bytes",
                "Bytes of log segments on disk.",
                disk,
            ),
            (
                "broker_shm_trigger_lag_bytes",
                "Log bytes not yet dispatched by each trigger.",
                lag,
            ),
        ])
    }

    /// Ingress for `POST /<ns>/<broker>` once the event is decoded and valid.
    pub fn ingest(&self, ns: &str, name: &str, ev: CloudEvent) -> Result<u64, IngestError> {
        let b = self
            .broker(ns, name)
            .ok_or_else(|| IngestError::NotFound(format!("{ns}/{name}")))?;
        b.ingest(ev)
    }

    /// Brings brokers and dispatchers in line with a snapshot.
    pub fn reconcile(self: &Arc<Self>, snap: &Snapshot) {
        for r in &snap.rejected {
            tracing::warn!(source = %r.source, kind = %r.kind, name = %r.name, reason = %r.reason, "object rejected");
        }
        let mut brokers = self
            .brokers
            .write()
            .unwrap_or_else(std::sync::PoisonError::into_inner);
        // Remove brokers that disappeared (their data stays on disk).
        let wanted: BTreeSet<(String, String)> = snap
            .brokers
            .iter()
            .map(|b| (b.namespace.clone(), b.name.clone()))
            .collect();
        brokers.retain(|k, state| {
            let keep = wanted.contains(k);
            if !keep {
                state.retired.store(true, Ordering::Release);
                for (_, run) in lock(&state.triggers).drain() {
                    let _ = run.stop.send(true);
                }
                tracing::info!(broker = %format!("{}/{}", k.0, k.1), "broker removed");
            }
            keep
        });
        for b in &snap.brokers {
            let key = (b.namespace.clone(), b.name.clone());
            if let Some(existing) = brokers.get(&key) {
                let mut d = existing
                    .delivery
                    .write()
                    .unwrap_or_else(std::sync::PoisonError::into_inner);
                if *d != b.delivery {
                    // Delivery defaults changed: restart the triggers (positions are kept).
                    *d = b.delivery.clone();
                    for (_, run) in lock(&existing.triggers).drain() {
                        let _ = run.stop.send(true);
                    }
                }
                continue;
            }
            let dir = self.cfg.data_dir.join(&b.namespace).join(&b.name);
            let mut open = lock(&self.open_logs);
            open.retain(|_, w| w.strong_count() > 0);
            let shared = match open.get(&dir).and_then(std::sync::Weak::upgrade) {
                Some(s) => Ok(s),
                None => BrokerLog::open(&dir, self.cfg.log).map(|log| {
                    let tail = log.tail();
                    let s = Arc::new(SharedLog {
                        log: Mutex::new(log),
                        tail: watch::Sender::new(tail),
                    });
                    open.insert(dir.clone(), Arc::downgrade(&s));
                    s
                }),
            };
            drop(open);
            match shared {
                Ok(log) => {
                    let tail = lock(&log.log).tail();
                    tracing::info!(broker = %format!("{}/{}", b.namespace, b.name), tail, "broker ready");
                    brokers.insert(
                        key,
                        Arc::new(BrokerState {
                            namespace: b.namespace.clone(),
                            name: b.name.clone(),
                            delivery: RwLock::new(b.delivery.clone()),
                            log,
                            triggers: Mutex::new(HashMap::new()),
                            positions: Mutex::new(HashMap::new()),
                            retired: std::sync::atomic::AtomicBool::new(false),
                            max_ttl: self.cfg.max_ttl,
                        }),
                    );
                }
                Err(e) => tracing::error!(error = %e, "cannot open broker log"),
            }
        }
        // Triggers.
        for (key, state) in brokers.iter() {
            let desired: HashMap<String, &Trigger> = snap
                .triggers
                .iter()
                .filter(|t| t.namespace == key.0 && t.broker == key.1)
                .map(|t| (t.key(), t))
                .collect();
            let mut runs = lock(&state.triggers);
            let gone: Vec<String> = runs
                .iter()
                .filter(|(k, r)| desired.get(*k).is_none_or(|t| **t != r.trigger))
                .map(|(k, _)| k.clone())
                .collect();
            for k in gone {
                if let Some(run) = runs.remove(&k) {
                    let _ = run.stop.send(true);
                    if !desired.contains_key(&k) {
                        // Trigger deleted: its position goes too.
                        lock(&state.positions).remove(&k);
                        let path = state_dir(&self.cfg, state).join("cursors");
                        let _ = std::fs::remove_file(path.join(sanitize(&k)));
                        tracing::info!(trigger = %k, "trigger removed");
                    }
                }
            }
            for (k, t) in desired {
                if runs.contains_key(&k) {
                    continue;
                }
                match self.start_trigger(state, t) {
                    Ok(run) => {
                        runs.insert(k, run);
                    }
                    Err(e) => tracing::error!(trigger = %k, error = %e, "cannot start trigger"),
                }
            }
        }
        for t in &snap.triggers {
            if !brokers.contains_key(&(t.namespace.clone(), t.broker.clone())) {
                tracing::warn!(trigger = %format!("{}/{}", t.namespace, t.name), broker = %t.broker, "trigger waits for its broker (BrokerDoesNotExist)");
            }
        }
    }

    fn start_trigger(
        self: &Arc<Self>,
        state: &Arc<BrokerState>,
        t: &Trigger,
    ) -> Result<TriggerRun, LogError> {
        let dir = state_dir(&self.cfg, state);
        let tail = lock(&state.log.log).tail();
        let cursor = Cursor::open(&dir, &sanitize(&t.key()), tail, self.cfg.log.durability)?;
        let position = lock(&state.positions)
            .entry(t.key())
            .or_insert_with(|| Arc::new(AtomicU64::new(cursor.get())))
            .clone();
        position.store(cursor.get(), Ordering::Release);
        let broker_delivery = state
            .delivery
            .read()
            .unwrap_or_else(std::sync::PoisonError::into_inner)
            .clone();
        let delivery = match t.delivery.as_ref().or(broker_delivery.as_ref()) {
            Some(spec) => spec
                .compile(&t.namespace, "spec.delivery")
                .unwrap_or_else(|_| self.cfg.default_delivery.clone()),
            None => self.cfg.default_delivery.clone(),
        };
        let (stop, stop_rx) = watch::channel(false);
        let d = Dispatcher {
            key: t.key(),
            metrics: self.metrics.clone(),
            broker: state.clone(),
            filter: Arc::new(Filter::for_trigger(t.spec.filter.as_ref(), &t.spec.filters)),
            trigger: Arc::new(t.clone()),
            delivery: Arc::new(delivery),
            sinks: self.sinks.clone(),
            position: position.clone(),
            max_inflight: self.cfg.max_inflight.max(1),
        };
        tracing::info!(trigger = %t.key(), subscriber = %t.subscriber.display(), position = cursor.get(), "trigger started");
        tokio::spawn(d.run(cursor, stop_rx));
        Ok(TriggerRun {
            trigger: t.clone(),
            stop,
            position,
        })
    }
}

fn state_dir(cfg: &RuntimeConfig, b: &BrokerState) -> PathBuf {
    cfg.data_dir.join(&b.namespace).join(&b.name)
}

fn sanitize(key: &str) -> String {
    key.chars()
        .map(|c| {
            if c.is_ascii_alphanumeric() || c == '-' || c == '.' {
                c
            } else {
                '_'
            }
        })
        .collect()
}

struct Dispatcher {
    key: String,
    metrics: Arc<Metrics>,
    broker: Arc<BrokerState>,
    trigger: Arc<Trigger>,
    filter: Arc<Filter>,
    delivery: Arc<Delivery>,
    sinks: Sinks,
    position: Arc<AtomicU64>,
    max_inflight: usize,
}

impl Dispatcher {
    async fn run(self, mut cursor: Cursor, mut stop: watch::Receiver<bool>) {
        let mut tail_rx = self.broker.log.tail.subscribe();
        let mut next_read = cursor.get();
        let mut inflight: BTreeSet<u64> = BTreeSet::new();
        let mut tasks: JoinSet<u64> = JoinSet::new();
        loop {
            tail_rx.borrow_and_update();
            while inflight.len() < self.max_inflight {
                let rec = lock(&self.broker.log.log).read(next_read);
                let Some((bytes, next)) = rec else { break };
                let off = next_read;
                next_read = next;
                // Decode and filter here: a non-matching event is done without a task.
                let ev = match CloudEvent::from_record(&bytes) {
                    Ok(ev) => ev,
                    Err(e) => {
                        tracing::error!(error = %e, offset = off, "skipping undecodable log record");
                        continue;
                    }
                };
                if !self.filter.passes(&ev) {
                    self.metrics.inc(
                        "broker_shm_deliveries_total",
                        &[("trigger", self.key.as_str()), ("outcome", "filtered")],
                    );
                    continue;
                }
                inflight.insert(off);
                let job = self.job();
                tasks.spawn(async move {
                    job.handle(ev).await;
                    off
                });
            }
            let commit = inflight.first().copied().unwrap_or(next_read);
            if commit != cursor.get() {
                if let Err(e) = cursor.set(commit) {
                    tracing::error!(error = %e, "cannot persist trigger position");
                }
                self.position.store(commit, Ordering::Release);
                self.broker.truncate();
            }
            tokio::select! {
                Some(done) = tasks.join_next(), if !tasks.is_empty() => {
                    match done {
                        Ok(off) => { inflight.remove(&off); }
                        Err(e) => {
                            // A panicking delivery must not stall the trigger: drop the lowest
                            // in-flight offset only if its task is gone (cannot be told apart
                            // here), so restart the dispatcher loop from the committed cursor.
                            tracing::error!(error = %e, "delivery task failed; resuming from committed position");
                            tasks.abort_all();
                            inflight.clear();
                            next_read = cursor.get();
                        }
                    }
                }
                changed = tail_rx.changed() => {
                    if changed.is_err() { break; }
                }
                _ = stop.changed() => break,
            }
        }
        tasks.abort_all();
    }

    fn job(&self) -> Job {
        Job {
            metrics: self.metrics.clone(),
            broker: self.broker.clone(),
            trigger: self.trigger.clone(),
            delivery: self.delivery.clone(),
            sinks: self.sinks.clone(),
        }
    }
}

struct Job {
    metrics: Arc<Metrics>,
    broker: Arc<BrokerState>,
    trigger: Arc<Trigger>,
    delivery: Arc<Delivery>,
    sinks: Sinks,
}

impl Job {
    async fn handle(&self, mut ev: CloudEvent) {
        let key = self.trigger.key();
        let outcome = |what: &str| {
            self.metrics.inc(
                "broker_shm_deliveries_total",
                &[("trigger", key.as_str()), ("outcome", what)],
            );
        };
        // The filter strips the TTL before delivery and re-attaches it to a reply.
        let ttl = ev.remove(TTL_EXT);
        let t = &self.trigger;
        let opts = SendOptions {
            format: self.delivery.format,
            timeout: self.delivery.timeout,
            namespace: t.namespace.clone(),
            prefer_reply: true,
            extra_headers: http::HeaderMap::new(),
        };
        let (attempt, reply) = self
            .sinks
            .send_with_retries(&t.subscriber, &ev, &opts, &self.delivery)
            .await;
        if attempt.is_success() {
            outcome("delivered");
            if let Some(mut reply) = reply {
                if let Some(ttl) = &ttl {
                    reply.set(TTL_EXT, ttl.clone());
                }
                let result = match self.broker.ingest(reply) {
                    Ok(_) => "stored",
                    Err(IngestError::TtlExhausted) => {
                        tracing::info!(trigger = %t.key(), "reply dropped: TTL exhausted");
                        "ttl_exhausted"
                    }
                    Err(e) => {
                        tracing::error!(trigger = %t.key(), error = %e, "reply not stored");
                        "refused"
                    }
                };
                self.metrics.inc(
                    "broker_shm_replies_total",
                    &[("trigger", key.as_str()), ("outcome", result)],
                );
            }
            return;
        }
        outcome("failed");
        tracing::warn!(
            trigger = %t.key(),
            subscriber = %t.subscriber.display(),
            status = attempt.status,
            error = attempt.error.as_deref().unwrap_or(""),
            id = ev.get("id").unwrap_or(""),
            "delivery failed"
        );
        let Some(dls) = &self.delivery.dead_letter_sink else {
            return;
        };
        let mut dead = with_error_extensions(&ev, &t.subscriber, &attempt);
        if let Some(ttl) = ttl {
            dead.set(TTL_EXT, ttl);
        }
        let dls_opts = SendOptions {
            prefer_reply: false,
            ..opts
        };
        let (res, _) = self
            .sinks
            .send_with_retries(dls, &dead, &dls_opts, &self.delivery)
            .await;
        if res.is_success() {
            outcome("dead_lettered");
        } else {
            tracing::error!(trigger = %t.key(), dls = %dls.display(), status = res.status, "dead-letter delivery failed; event dropped");
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn ttl_rules() {
        let mut ev = CloudEvent::new("1", "/s", "t");
        apply_ingress_extensions(&mut ev, 255).unwrap();
        assert_eq!(ev.get(TTL_EXT), Some("255"));
        assert!(ev.get(ARRIVAL_EXT).is_some());
        ev.set(TTL_EXT, "2");
        apply_ingress_extensions(&mut ev, 255).unwrap();
        assert_eq!(ev.get(TTL_EXT), Some("1"));
        assert!(matches!(
            apply_ingress_extensions(&mut ev, 255),
            Err(IngestError::TtlExhausted)
        ));
        ev.set(TTL_EXT, "abc");
        assert!(apply_ingress_extensions(&mut ev, 255).is_err());
    }
}
