//! The broker runtime: per-broker logs, ingest (the ingress contract's processing steps),
//! and the per-Trigger dispatch.
//!
//! Dispatch is inline: right after an append, the appending thread (an ingress task, or the
//! shared-memory reply thread for a function's reply) filters the event for every trigger
//! that has nothing older pending and starts its delivery at once; a delivery to a
//! shared-memory function is just a descriptor sent, completed later on the reply thread. A
//! per-trigger dispatcher task wakes (by notification, never on a timer) only when a trigger
//! falls behind: backlog after a restart, the in-flight limit reached, or appends racing.
//! Either way an event is claimed once under the trigger's progress lock, and the persisted
//! cursor only moves to the lowest offset not yet finished (at least once).

use crate::delivery::{Attempt, Done, SendOptions, Sinks, with_error_extensions};
use crate::event::{ARRIVAL_EXT, CloudEvent, EventRecord as _, TTL_EXT};
use crate::filter::Filter;
use crate::log::{BrokerLog, Cursor, LogConfig, LogError};
use crate::manifests::{Delivery, DeliverySpec, Snapshot, Target, Trigger};
use crate::metrics::{Counter, Metrics};
use http::StatusCode;
use std::collections::{BTreeSet, HashMap};
use std::path::PathBuf;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex, RwLock};
use tokio::sync::{Notify, watch};

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
            IngestError::Log(LogError::Full(_) | LogError::NoSpace { .. }) => {
                StatusCode::SERVICE_UNAVAILABLE
            }
            IngestError::Log(
                LogError::Io { .. } | LogError::BadSegment { .. } | LogError::OffsetsExhausted(_),
            ) => StatusCode::INTERNAL_SERVER_ERROR,
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
    // Knative's ingress re-encodes the event: `time` goes on in UTC, as sdk-go writes it.
    if let Some(utc) = ev
        .get("time")
        .and_then(spright_core::cloudevent::go_time_utc_text)
    {
        ev.set("time", utc);
    }
    // Knative's TTL defaulter (pkg/broker/ttl.go): missing, or not a CloudEvents integer
    // (sdk-go's ParseInteger: a decimal number truncated to int32, out-of-range refused) →
    // MAX_TTL; otherwise decremented, floor 0.
    let ttl = match ev.get(TTL_EXT).map(parse_ce_integer) {
        None | Some(None) => max_ttl,
        Some(Some(t)) => t.saturating_sub(1).max(0),
    };
    ev.set(TTL_EXT, ttl.to_string());
    if ttl <= 0 {
        return Err(IngestError::TtlExhausted);
    }
    Ok(())
}

/// A CloudEvents integer as sdk-go reads one from text (`types.ParseInteger`): any decimal
/// floating-point number within int32's range, truncated toward zero; blanks around it
/// are ignored (HTTP trims header values). `None` for anything else, NaN included.
fn parse_ce_integer(raw: &str) -> Option<i32> {
    let raw = raw.trim();
    if let Ok(n) = raw.parse::<i32>() {
        return Some(n);
    }
    let f: f64 = raw.parse().ok()?;
    if !f.is_finite() || f > f64::from(i32::MAX) || f < f64::from(i32::MIN) {
        return None;
    }
    // In range and finite: the cast truncates toward zero, as Go's int32(f).
    Some(f as i32)
}

struct TriggerRun {
    trigger: Trigger,
    stop: watch::Sender<bool>,
    core: Arc<TriggerCore>,
}

impl TriggerRun {
    fn stop(&self) {
        let _ = self.stop.send(true);
    }
}

/// An open log, shared by every `BrokerState` of the same broker (a broker removed and
/// re-added while deliveries are in flight keeps one writer).
pub struct SharedLog {
    log: Mutex<BrokerLog>,
    /// End offset of the oldest segment when it is sealed (`u64::MAX` otherwise): a cursor
    /// passing it may let retention delete a segment.
    front_end: AtomicU64,
}

impl SharedLog {
    fn note_front(&self, log: &BrokerLog) {
        self.front_end.store(
            log.first_sealed_end().unwrap_or(u64::MAX),
            Ordering::Release,
        );
    }
}

/// One broker: its log, the append notifier and its running triggers.
pub struct BrokerState {
    pub namespace: String,
    pub name: String,
    delivery: RwLock<Option<DeliverySpec>>,
    log: Arc<SharedLog>,
    triggers: Mutex<HashMap<String, TriggerRun>>,
    /// The running triggers, read on every append for inline dispatch.
    cores: RwLock<Arc<Vec<Arc<TriggerCore>>>>,
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
    /// Then hands the event to every trigger (inline dispatch).
    pub fn append(&self, ev: CloudEvent) -> Result<u64, IngestError> {
        let rec = ev.to_record();
        let try_append = || {
            let mut log = lock(&self.log.log);
            let start = log.tail();
            let end = log.append(&rec);
            self.log.note_front(&log);
            end.map(|end| (start, end))
        };
        let (start, end) = match try_append() {
            Err(LogError::Full(_) | LogError::NoSpace { .. }) => {
                // Segments every trigger has passed (all of them when there is no trigger)
                // may still be on disk: drop them and try once more.
                self.truncate();
                try_append()?
            }
            other => other?,
        };
        crate::probe::mark("log.appended", &ev);
        let cores = self
            .cores
            .read()
            .unwrap_or_else(std::sync::PoisonError::into_inner)
            .clone();
        // Every trigger claims (or passes) the record before any delivery starts: a delivery
        // to a function may be answered, and its reply appended by the reply thread, before
        // this thread gets the CPU back; that reply must find every trigger past this record
        // to be dispatched inline rather than by a woken dispatcher task.
        let mut claimed: Vec<&Arc<TriggerCore>> = cores
            .iter()
            .filter(|core| core.claim(start, end, &ev))
            .collect();
        // The last trigger takes the event itself, the others a copy.
        if let Some(last) = claimed.pop() {
            for core in claimed {
                crate::probe::mark("trigger.matched", &ev);
                core.deliver(start, ev.clone());
            }
            crate::probe::mark("trigger.matched", &ev);
            last.deliver(start, ev);
        }
        Ok(end)
    }

    fn set_cores(&self, runs: &HashMap<String, TriggerRun>) {
        let cores: Vec<Arc<TriggerCore>> = runs.values().map(|r| r.core.clone()).collect();
        *self
            .cores
            .write()
            .unwrap_or_else(std::sync::PoisonError::into_inner) = Arc::new(cores);
    }

    /// Ingress: extensions, TTL check, append.
    pub fn ingest(&self, mut ev: CloudEvent) -> Result<u64, IngestError> {
        apply_ingress_extensions(&mut ev, self.max_ttl)?;
        self.append(ev)
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
        self.log.note_front(&log);
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
                let pos = run.core.position.load(Ordering::Acquire);
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
        snap.log_rejected();
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
                    run.stop();
                }
                state.set_cores(&HashMap::new());
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
                        run.stop();
                    }
                    existing.set_cores(&HashMap::new());
                }
                continue;
            }
            let dir = self.cfg.data_dir.join(&b.namespace).join(&b.name);
            let mut open = lock(&self.open_logs);
            open.retain(|_, w| w.strong_count() > 0);
            let shared = match open.get(&dir).and_then(std::sync::Weak::upgrade) {
                Some(s) => Ok(s),
                None => BrokerLog::open(&dir, self.cfg.log).map(|log| {
                    let s = Arc::new(SharedLog {
                        front_end: AtomicU64::new(log.first_sealed_end().unwrap_or(u64::MAX)),
                        log: Mutex::new(log),
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
                            cores: RwLock::new(Arc::new(Vec::new())),
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
                    run.stop();
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
            state.set_cores(&runs);
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
        let next_read = cursor.get();
        let core = Arc::new(TriggerCore {
            key: t.key(),
            counts: TriggerCounters::new(&self.metrics, &t.key()),
            metrics: self.metrics.clone(),
            broker: state.clone(),
            filter: Filter::for_trigger(t.spec.filter.as_ref(), &t.spec.filters),
            trigger: t.clone(),
            opts: TriggerCore::send_options(t, &delivery),
            delivery,
            sinks: self.sinks.clone(),
            position,
            max_inflight: self.cfg.max_inflight.max(1),
            progress: Mutex::new(Progress {
                next_read,
                inflight: BTreeSet::new(),
                cursor,
            }),
            wake: Notify::new(),
            stop: stop_rx,
            tasks: tokio::runtime::Handle::current(),
        });
        tracing::info!(trigger = %t.key(), subscriber = %t.subscriber.display(), position = next_read, "trigger started");
        tokio::spawn(core.clone().dispatch());
        Ok(TriggerRun {
            trigger: t.clone(),
            stop,
            core,
        })
    }
}

/// The event of a shared handle: moved out when this is the last handle, copied otherwise.
fn unshare(ev: Arc<CloudEvent>) -> CloudEvent {
    Arc::try_unwrap(ev).unwrap_or_else(|ev| (*ev).clone())
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

struct Progress {
    /// First offset not yet claimed by a delivery.
    next_read: u64,
    /// Offsets claimed and not finished.
    inflight: BTreeSet<u64>,
    cursor: Cursor,
}

/// One running trigger: filter, delivery settings and dispatch progress, shared by the
/// inline path, its dispatcher task and its deliveries.
struct TriggerCore {
    key: String,
    metrics: Arc<Metrics>,
    /// The counters every event bumps, registered once.
    counts: TriggerCounters,
    broker: Arc<BrokerState>,
    trigger: Trigger,
    filter: Filter,
    delivery: Delivery,
    /// How every attempt to the subscriber is sent.
    opts: SendOptions,
    sinks: Sinks,
    position: Arc<AtomicU64>,
    max_inflight: usize,
    progress: Mutex<Progress>,
    /// Wakes the dispatcher task (a permit is kept when it is busy: no wakeup is lost).
    wake: Notify,
    stop: watch::Receiver<bool>,
    /// Runtime for delivery tasks (retries, HTTP), also from non-runtime threads.
    tasks: tokio::runtime::Handle,
}

/// A trigger's per-event counters.
struct TriggerCounters {
    delivered: Counter,
    filtered: Counter,
    stored: Counter,
}

impl TriggerCounters {
    fn new(metrics: &Metrics, key: &str) -> TriggerCounters {
        let delivery = |what| {
            metrics.counter(
                "broker_shm_deliveries_total",
                &[("trigger", key), ("outcome", what)],
            )
        };
        TriggerCounters {
            delivered: delivery("delivered"),
            filtered: delivery("filtered"),
            stored: metrics.counter(
                "broker_shm_replies_total",
                &[("trigger", key), ("outcome", "stored")],
            ),
        }
    }
}

/// Marks an in-flight offset unfinished if its delivery task dies without finishing.
struct Unfinished<'a> {
    core: &'a Arc<TriggerCore>,
    armed: bool,
}

impl Drop for Unfinished<'_> {
    fn drop(&mut self) {
        if self.armed {
            tracing::error!(trigger = %self.core.key, "delivery task failed; resuming from committed position");
            self.core.rewind();
        }
    }
}

impl TriggerCore {
    fn stopped(&self) -> bool {
        *self.stop.borrow()
    }

    fn outcome(&self, what: &str) {
        match what {
            "delivered" => self.counts.delivered.inc(),
            "filtered" => self.counts.filtered.inc(),
            _ => self.metrics.inc(
                "broker_shm_deliveries_total",
                &[("trigger", self.key.as_str()), ("outcome", what)],
            ),
        }
    }

    /// Inline dispatch of the record `[start, end)` just appended: claims it when this
    /// trigger has nothing older to dispatch and room in flight (`true`: the caller starts
    /// the delivery); a non-matching event is done here; otherwise the dispatcher is woken.
    fn claim(&self, start: u64, end: u64, ev: &CloudEvent) -> bool {
        if self.stopped() {
            return false;
        }
        let mut p = lock(&self.progress);
        if p.next_read != start || p.inflight.len() >= self.max_inflight {
            drop(p);
            self.wake.notify_one();
            return false;
        }
        p.next_read = end;
        if !self.filter.passes(ev) {
            let truncate = self.commit(&mut p);
            drop(p);
            self.after_commit(truncate);
            self.outcome("filtered");
            return false;
        }
        p.inflight.insert(start);
        true
    }

    /// The dispatcher task: catches up with the log whenever woken.
    async fn dispatch(self: Arc<Self>) {
        let mut stop = self.stop.clone();
        loop {
            self.catch_up();
            tokio::select! {
                _ = self.wake.notified() => {}
                _ = stop.wait_for(|s| *s) => break,
            }
        }
    }

    /// Claims and starts every record from `next_read` on, up to the in-flight limit.
    fn catch_up(self: &Arc<Self>) {
        loop {
            if self.stopped() {
                return;
            }
            let mut p = lock(&self.progress);
            if p.inflight.len() >= self.max_inflight {
                return;
            }
            let off = p.next_read;
            let rec = lock(&self.broker.log.log).read(off);
            let Some((bytes, next)) = rec else {
                let truncate = self.commit(&mut p);
                drop(p);
                self.after_commit(truncate);
                return;
            };
            p.next_read = next;
            // Decode and filter here: a non-matching event is done without a task.
            let ev = match CloudEvent::from_record(&bytes) {
                Ok(ev) if self.filter.passes(&ev) => ev,
                Ok(_) => {
                    drop(p);
                    self.outcome("filtered");
                    continue;
                }
                Err(e) => {
                    drop(p);
                    tracing::error!(error = %e, offset = off, "skipping undecodable log record");
                    continue;
                }
            };
            p.inflight.insert(off);
            drop(p);
            self.deliver(off, ev);
        }
    }

    /// Persists the lowest unfinished offset; returns whether retention may now drop a
    /// segment. A stopped trigger leaves the cursor to its successor.
    fn commit(&self, p: &mut Progress) -> bool {
        let commit = p.inflight.first().copied().unwrap_or(p.next_read);
        if self.stopped() || commit == p.cursor.get() {
            return false;
        }
        if let Err(e) = p.cursor.set(commit) {
            tracing::error!(error = %e, "cannot persist trigger position");
        }
        self.position.store(commit, Ordering::Release);
        commit >= self.broker.log.front_end.load(Ordering::Acquire)
    }

    fn after_commit(&self, truncate: bool) {
        if truncate {
            self.broker.truncate();
        }
    }

    /// The delivery of `off` is over (delivered, dead-lettered or given up).
    fn finish(&self, off: u64) {
        let mut p = lock(&self.progress);
        let was_full = p.inflight.len() >= self.max_inflight;
        if !p.inflight.remove(&off) {
            return;
        }
        let truncate = self.commit(&mut p);
        drop(p);
        self.after_commit(truncate);
        if was_full {
            self.wake.notify_one();
        }
    }

    /// A delivery vanished: dispatch again from the committed position (duplicates, no loss).
    fn rewind(&self) {
        let mut p = lock(&self.progress);
        p.inflight.clear();
        p.next_read = p.cursor.get();
        drop(p);
        self.wake.notify_one();
    }

    fn send_options(trigger: &Trigger, delivery: &Delivery) -> SendOptions {
        SendOptions {
            format: delivery.format,
            timeout: delivery.timeout,
            namespace: trigger.namespace.clone(),
            prefer_reply: true,
            extra_headers: http::HeaderMap::new(),
            ca_certs: trigger.spec.subscriber.ca_certs.clone(),
        }
    }

    /// Starts the delivery of a claimed event. The first attempt to a shared-memory function
    /// is a descriptor sent from this thread, finished by the reply thread; anything else
    /// (HTTP, retries, the dead-letter sink) runs as a task.
    fn deliver(self: &Arc<Self>, off: u64, mut ev: CloudEvent) {
        // The filter strips the TTL before delivery and re-attaches it to a reply.
        let ttl = ev.remove(TTL_EXT);
        if let (Target::ShmFunction(_), Some(shm)) = (&self.trigger.subscriber, &self.sinks.shm) {
            // Shared by the send and the completion (a retry needs the event again).
            let ev = Arc::new(ev);
            let ev2 = ev.clone();
            let core = self.clone();
            let ttl2 = ttl.clone();
            let done: Done = Box::new(move |attempt: Attempt| {
                crate::probe::mark("reply.received", &ev2);
                if attempt.is_success()
                    && let Ok(reply) = attempt.reply()
                {
                    drop(ev2);
                    core.delivered(reply, ttl2.as_deref());
                    core.finish(off);
                } else {
                    core.spawn(off, unshare(ev2), ttl2, Some(attempt));
                }
            });
            match shm.start(&self.trigger.subscriber, &ev, &self.opts, done) {
                Ok(()) => {
                    crate::probe::mark("descriptor.sent", &ev);
                    return;
                }
                Err(_) => return self.spawn(off, unshare(ev), ttl, None),
            }
        }
        self.spawn(off, ev, ttl, None)
    }

    /// Runs (the rest of) a delivery as a task; `first` is an attempt already made.
    fn spawn(
        self: &Arc<Self>,
        off: u64,
        ev: CloudEvent,
        ttl: Option<String>,
        first: Option<Attempt>,
    ) {
        let core = self.clone();
        self.tasks.spawn(async move {
            let mut stop = core.stop.clone();
            let mut guard = Unfinished {
                core: &core,
                armed: true,
            };
            tokio::select! {
                _ = core.handle(ev, ttl, first) => core.finish(off),
                // Stopped: the successor resumes from the committed cursor.
                _ = stop.wait_for(|s| *s) => {}
            }
            guard.armed = false;
        });
    }

    /// A successful delivery: count it and store the reply, if any.
    fn delivered(&self, reply: Option<CloudEvent>, ttl: Option<&str>) {
        self.outcome("delivered");
        let Some(mut reply) = reply else { return };
        if let Some(ttl) = ttl {
            reply.set(TTL_EXT, ttl);
        }
        let result = match self.broker.ingest(reply) {
            Ok(_) => "stored",
            Err(IngestError::TtlExhausted) => {
                tracing::info!(trigger = %self.key, "reply dropped: TTL exhausted");
                "ttl_exhausted"
            }
            Err(e) => {
                tracing::error!(trigger = %self.key, error = %e, "reply not stored");
                "refused"
            }
        };
        if result == "stored" {
            self.counts.stored.inc();
        } else {
            self.metrics.inc(
                "broker_shm_replies_total",
                &[("trigger", self.key.as_str()), ("outcome", result)],
            );
        }
    }

    async fn handle(&self, ev: CloudEvent, ttl: Option<String>, first: Option<Attempt>) {
        let t = &self.trigger;
        let opts = self.opts.clone();
        let (attempt, reply) = self
            .sinks
            .send_with_retries_after(&t.subscriber, &ev, &opts, &self.delivery, first)
            .await;
        if attempt.is_success() {
            self.delivered(reply, ttl.as_deref());
            return;
        }
        self.outcome("failed");
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
            ca_certs: self.delivery.dead_letter_ca_certs.clone(),
            ..opts
        };
        let (res, _) = self
            .sinks
            .send_with_retries(dls, &dead, &dls_opts, &self.delivery)
            .await;
        if res.is_success() {
            self.outcome("dead_lettered");
        } else {
            tracing::error!(trigger = %t.key(), dls = %dls.display(), status = res.status, "dead-letter delivery failed; event dropped");
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_full_disk_is_503_like_a_full_log() {
        let no_space = IngestError::Log(LogError::NoSpace {
            path: "/data/x.seg".into(),
            bytes: 1,
        });
        assert_eq!(no_space.status(), StatusCode::SERVICE_UNAVAILABLE);
        assert_eq!(
            IngestError::Log(LogError::Full(1)).status(),
            StatusCode::SERVICE_UNAVAILABLE
        );
    }

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
        // Knative's defaulter: a decimal number is truncated; anything that is not a
        // CloudEvents integer (or out of int32's range) is replaced by MAX_TTL.
        for (raw, want) in [
            ("5.0", Some("4")),
            ("5.9", Some("4")),
            ("1e1", Some("9")),
            (" 3 ", Some("2")),
            ("abc", Some("255")),
            ("99999999999", Some("255")),
            ("NaN", Some("255")),
            ("inf", Some("255")),
            ("-3", None),
            ("0.5", None),
        ] {
            ev.set(TTL_EXT, raw);
            let res = apply_ingress_extensions(&mut ev, 255);
            match want {
                Some(w) => {
                    assert!(res.is_ok(), "{raw}");
                    assert_eq!(ev.get(TTL_EXT), Some(w), "{raw}");
                }
                None => assert!(matches!(res, Err(IngestError::TtlExhausted)), "{raw}"),
            }
        }
    }
}
