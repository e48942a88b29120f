//! Concurrency reporting to the autoscaler (Knative `handler/concurrency_reporter.go`).
//!
//! The first request of a revision without a stats entry sends the scale-from-zero poke
//! at once. While any revision has an entry, a report goes out every second with the
//! time-weighted average concurrency and the request count of the window. Entries are
//! dropped after a window with zero average concurrency and no request in flight, and
//! the reporting timer stops when no entry is left: an idle activator does not wake up.

use std::collections::HashMap;
use std::sync::{Arc, Mutex, MutexGuard};
use std::time::{Duration, Instant};

use tokio::sync::{Notify, mpsc};

use crate::manifests::RevisionKey;
use crate::proto::{Stat, WireStatMessage, WireStatMessages};

/// The reporting period.
pub const REPORT_PERIOD: Duration = Duration::from_secs(1);

#[derive(Debug)]
struct RevStat {
    in_flight: u32,
    /// Concurrency × seconds accumulated in the current window.
    accum: f64,
    last_change: Instant,
    window_start: Instant,
    requests: u64,
    /// The poke has been sent and not yet subtracted from a report.
    first_adj: bool,
}

impl RevStat {
    fn advance(&mut self, now: Instant) {
        let dt = now
            .saturating_duration_since(self.last_change)
            .as_secs_f64();
        self.accum += f64::from(self.in_flight) * dt;
        self.last_change = self.last_change.max(now);
    }
}

/// Per-revision request accounting and report building (no I/O).
#[derive(Debug)]
pub struct ConcurrencyReporter {
    pod_name: String,
    stats: Mutex<HashMap<Arc<RevisionKey>, RevStat>>,
    out: mpsc::UnboundedSender<WireStatMessages>,
    wake: Notify,
}

/// Held for the duration of one request; dropping it ends the request.
#[derive(Debug)]
pub struct InFlight {
    reporter: Arc<ConcurrencyReporter>,
    /// Shared with the stats entry: starting a request allocates nothing.
    key: Arc<RevisionKey>,
}

impl Drop for InFlight {
    fn drop(&mut self) {
        let now = Instant::now();
        let mut m = self.reporter.lock();
        if let Some(s) = m.get_mut(&*self.key) {
            s.advance(now);
            s.in_flight = s.in_flight.saturating_sub(1);
        }
    }
}

fn message(pod: &str, key: &RevisionKey, concurrency: f64, count: f64) -> WireStatMessage {
    WireStatMessage {
        namespace: key.namespace.clone(),
        name: key.name.clone(),
        stat: Some(Stat {
            pod_name: pod.to_owned(),
            average_concurrent_requests: concurrency,
            request_count: count,
            ..Default::default()
        }),
    }
}

impl ConcurrencyReporter {
    /// Reports go to `out` (the autoscaler connection drops them while disconnected).
    pub fn new(pod_name: String, out: mpsc::UnboundedSender<WireStatMessages>) -> Arc<Self> {
        Arc::new(Self {
            pod_name,
            stats: Mutex::new(HashMap::new()),
            out,
            wake: Notify::new(),
        })
    }

    fn lock(&self) -> MutexGuard<'_, HashMap<Arc<RevisionKey>, RevStat>> {
        self.stats.lock().unwrap_or_else(|p| p.into_inner())
    }

    /// A request for `key` arrived.
    pub fn request_start(self: &Arc<Self>, key: &RevisionKey) -> InFlight {
        let now = Instant::now();
        let mut m = self.lock();
        let (shared, poke) = match m.get_key_value(key).map(|(k, _)| k.clone()) {
            Some(shared) => {
                if let Some(s) = m.get_mut(&*shared) {
                    s.advance(now);
                    s.in_flight += 1;
                    s.requests += 1;
                }
                (shared, false)
            }
            None => {
                let shared = Arc::new(key.clone());
                m.insert(
                    shared.clone(),
                    RevStat {
                        in_flight: 1,
                        accum: 0.0,
                        last_change: now,
                        window_start: now,
                        requests: 1,
                        first_adj: true,
                    },
                );
                (shared, true)
            }
        };
        drop(m);
        if poke {
            let _ = self.out.send(WireStatMessages {
                messages: vec![message(&self.pod_name, key, 1.0, 1.0)],
            });
            self.wake.notify_one();
        }
        InFlight {
            reporter: self.clone(),
            key: shared,
        }
    }

    /// Builds the report of the window ending at `now` and drops idle entries.
    pub fn report(&self, now: Instant) -> WireStatMessages {
        let mut m = self.lock();
        let mut messages = Vec::with_capacity(m.len());
        m.retain(|key, s| {
            s.advance(now);
            let window = now
                .saturating_duration_since(s.window_start)
                .as_secs_f64()
                .max(1e-3);
            let avg = s.accum / window;
            let adj = if s.first_adj { 1.0 } else { 0.0 };
            messages.push(message(
                &self.pod_name,
                key,
                (avg - adj).max(0.0),
                (s.requests as f64 - adj).max(0.0),
            ));
            let keep = !(avg == 0.0 && s.in_flight == 0);
            s.accum = 0.0;
            s.window_start = now;
            s.requests = 0;
            s.first_adj = false;
            keep
        });
        WireStatMessages { messages }
    }

    /// Requests of `key` in flight through this activator.
    pub fn in_flight(&self, key: &RevisionKey) -> u32 {
        self.lock().get(key).map_or(0, |s| s.in_flight)
    }

    pub fn is_empty(&self) -> bool {
        self.lock().is_empty()
    }

    /// Sends a report every [`REPORT_PERIOD`] while there is anything to report;
    /// sleeps without a timer otherwise.
    pub async fn run(self: Arc<Self>) {
        loop {
            while self.is_empty() {
                self.wake.notified().await;
            }
            let mut tick = tokio::time::interval_at(
                tokio::time::Instant::now() + REPORT_PERIOD,
                REPORT_PERIOD,
            );
            tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
            while !self.is_empty() {
                tick.tick().await;
                let report = self.report(Instant::now());
                if !report.messages.is_empty() && self.out.send(report).is_err() {
                    return;
                }
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[tokio::test]
    async fn poke_then_adjusted_reports_then_dropped() {
        let (tx, mut rx) = mpsc::unbounded_channel();
        let r = ConcurrencyReporter::new("act-1".into(), tx);
        let key = RevisionKey::new("ns", "rev");
        let t0 = Instant::now();
        let a = r.request_start(&key);
        let poke = rx.try_recv().unwrap();
        let s = poke.messages[0].stat.clone().unwrap();
        assert_eq!(
            (
                s.pod_name.as_str(),
                s.average_concurrent_requests,
                s.request_count
            ),
            ("act-1", 1.0, 1.0)
        );
        let b = r.request_start(&key);
        assert!(rx.try_recv().is_err(), "only the first request pokes");
        // Two requests in flight for the whole window: avg 2, minus the poke's 1.
        let rep = r.report(t0 + Duration::from_secs(1));
        let s = rep.messages[0].stat.clone().unwrap();
        assert!((s.average_concurrent_requests - 1.0).abs() < 0.01, "{s:?}");
        assert_eq!(s.request_count, 1.0);
        drop((a, b));
        // Next window: nothing in flight, no requests: reported as zero, then dropped.
        let rep = r.report(Instant::now() + Duration::from_secs(3));
        let s = rep.messages[0].stat.clone().unwrap();
        assert!(s.average_concurrent_requests < 0.5);
        assert_eq!(s.request_count, 0.0);
        let rep = r.report(Instant::now() + Duration::from_secs(4));
        assert!(rep.messages.is_empty(), "{rep:?}");
        assert!(r.is_empty());
        // A new first request pokes again.
        let _c = r.request_start(&key);
        assert_eq!(rx.try_recv().unwrap().messages.len(), 1);
    }
}
