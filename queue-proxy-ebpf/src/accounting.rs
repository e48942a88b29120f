//! Request accounting for the autoscaler (knative-contract.md A.6).
//!
//! Knative ticks every second and folds the events of the past second into a report. We get
//! the same reports without any timer: windows are anchored at start-up, and whenever an
//! event arrives or the stats are scraped, the windows that ended in the meantime are closed
//! from the recorded transition timestamps. An idle process does nothing at all.
//!
//! The accounting sits behind [`RequestAccounting`] so an in-kernel (eBPF) counter can
//! replace it.

use std::sync::Mutex;
use std::time::{Duration, Instant};

/// The report of one closed window, in Knative's units.
#[derive(Debug, Clone, Copy, PartialEq, Default)]
pub struct Report {
    pub average_concurrency: f64,
    pub average_proxied_concurrency: f64,
    /// Arrivals per second.
    pub request_count: f64,
    pub proxied_request_count: f64,
    /// Seconds since start at the end of the window.
    pub uptime: f64,
}

/// Arrival / completion events and a snapshot of the latest closed window.
pub trait RequestAccounting: Send + Sync + 'static {
    fn arrival(&self, proxied: bool, now: Instant);
    fn completion(&self, proxied: bool, now: Instant);
    /// The report of the newest window that ended at or before `now`; `None` before the
    /// first window has ended.
    fn snapshot(&self, now: Instant) -> Option<Report>;
}

/// The reporting period (Knative's `reportingPeriod`).
pub const PERIOD: Duration = Duration::from_secs(1);

#[derive(Debug)]
struct State {
    /// Index of the open window: it spans `[start + k*PERIOD, start + (k+1)*PERIOD)`.
    window: u64,
    concurrency: f64,
    proxied_concurrency: f64,
    last_change: Instant,
    weighted: f64,
    weighted_proxied: f64,
    seconds_in_use: f64,
    requests: f64,
    proxied: f64,
    last: Option<Report>,
}

/// Time-weighted concurrency and arrival counts per one-second window, computed lazily.
#[derive(Debug)]
pub struct WindowedStats {
    start: Instant,
    state: Mutex<State>,
}

impl WindowedStats {
    pub fn new(start: Instant) -> Self {
        Self {
            start,
            state: Mutex::new(State {
                window: 0,
                concurrency: 0.0,
                proxied_concurrency: 0.0,
                last_change: start,
                weighted: 0.0,
                weighted_proxied: 0.0,
                seconds_in_use: 0.0,
                requests: 0.0,
                proxied: 0.0,
                last: None,
            }),
        }
    }

    fn boundary(&self, k: u64) -> Instant {
        self.start + PERIOD * u32::try_from(k).unwrap_or(u32::MAX)
    }

    fn lock(&self) -> std::sync::MutexGuard<'_, State> {
        self.state
            .lock()
            .unwrap_or_else(std::sync::PoisonError::into_inner)
    }

    /// Integrates concurrency up to `t` (Knative's `compute`).
    fn integrate(s: &mut State, t: Instant) {
        if t > s.last_change {
            let d = (t - s.last_change).as_secs_f64();
            s.seconds_in_use += d;
            s.weighted += s.concurrency * d;
            s.weighted_proxied += s.proxied_concurrency * d;
            s.last_change = t;
        }
    }

    fn close(&self, s: &mut State, end: Instant) {
        Self::integrate(s, end);
        let period = PERIOD.as_secs_f64();
        let mut r = Report {
            request_count: s.requests / period,
            proxied_request_count: s.proxied / period,
            uptime: (end - self.start).as_secs_f64(),
            ..Report::default()
        };
        if s.seconds_in_use > 0.0 {
            r.average_concurrency = s.weighted / s.seconds_in_use;
            r.average_proxied_concurrency = s.weighted_proxied / s.seconds_in_use;
        }
        s.weighted = 0.0;
        s.weighted_proxied = 0.0;
        s.seconds_in_use = 0.0;
        s.requests = 0.0;
        s.proxied = 0.0;
        s.last = Some(r);
    }

    /// Closes every window that ended at or before `now`.
    fn advance(&self, s: &mut State, now: Instant) {
        let elapsed = now.saturating_duration_since(self.start);
        let current = elapsed.as_secs() / PERIOD.as_secs().max(1);
        if current <= s.window {
            return;
        }
        let first_end = self.boundary(s.window + 1);
        self.close(s, first_end);
        if current > s.window + 1 {
            // Quiet windows in between: constant concurrency, no arrivals.
            let last_start = self.boundary(current - 1);
            s.last_change = s.last_change.max(last_start);
            self.close(s, self.boundary(current));
        }
        s.window = current;
    }
}

impl RequestAccounting for WindowedStats {
    fn arrival(&self, proxied: bool, now: Instant) {
        let mut s = self.lock();
        self.advance(&mut s, now);
        Self::integrate(&mut s, now);
        s.requests += 1.0;
        s.concurrency += 1.0;
        if proxied {
            s.proxied += 1.0;
            s.proxied_concurrency += 1.0;
        }
    }

    fn completion(&self, proxied: bool, now: Instant) {
        let mut s = self.lock();
        self.advance(&mut s, now);
        Self::integrate(&mut s, now);
        s.concurrency -= 1.0;
        if proxied {
            s.proxied_concurrency -= 1.0;
        }
    }

    fn snapshot(&self, now: Instant) -> Option<Report> {
        let mut s = self.lock();
        self.advance(&mut s, now);
        s.last
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn ms(n: u64) -> Duration {
        Duration::from_millis(n)
    }

    #[test]
    fn nothing_before_first_window() {
        let t0 = Instant::now();
        let s = WindowedStats::new(t0);
        s.arrival(false, t0 + ms(10));
        assert_eq!(s.snapshot(t0 + ms(999)), None);
    }

    #[test]
    fn two_half_second_requests_average_one() {
        let t0 = Instant::now();
        let s = WindowedStats::new(t0);
        s.arrival(false, t0);
        s.arrival(true, t0);
        s.completion(false, t0 + ms(500));
        s.completion(true, t0 + ms(500));
        let r = s.snapshot(t0 + ms(1200)).expect("window closed");
        assert!((r.average_concurrency - 1.0).abs() < 1e-9);
        assert!((r.average_proxied_concurrency - 0.5).abs() < 1e-9);
        assert_eq!(r.request_count, 2.0);
        assert_eq!(r.proxied_request_count, 1.0);
        assert!((r.uptime - 1.0).abs() < 1e-9);
    }

    #[test]
    fn quiet_windows_report_live_concurrency() {
        let t0 = Instant::now();
        let s = WindowedStats::new(t0);
        s.arrival(false, t0 + ms(500));
        let r = s.snapshot(t0 + ms(3500)).expect("closed");
        assert_eq!(r.request_count, 0.0);
        assert!((r.average_concurrency - 1.0).abs() < 1e-9);
        assert!((r.uptime - 3.0).abs() < 1e-9);
        // The window that held the arrival was reported before, and is not lost for the
        // integral: a scrape at 1.2 s would have seen it.
        let s2 = WindowedStats::new(t0);
        s2.arrival(false, t0 + ms(500));
        let r = s2.snapshot(t0 + ms(1200)).expect("closed");
        assert_eq!(r.request_count, 1.0);
        assert!((r.average_concurrency - 0.5).abs() < 1e-9);
    }

    #[test]
    fn events_close_windows_too() {
        let t0 = Instant::now();
        let s = WindowedStats::new(t0);
        s.arrival(false, t0 + ms(100));
        s.completion(false, t0 + ms(1100));
        s.arrival(false, t0 + ms(1500));
        let r = s.snapshot(t0 + ms(1900)).expect("closed");
        assert_eq!(r.request_count, 1.0);
        assert!((r.average_concurrency - 0.9).abs() < 1e-9);
        let r = s.snapshot(t0 + ms(2000)).expect("closed");
        assert_eq!(r.request_count, 1.0);
        assert!((r.average_concurrency - 0.6).abs() < 1e-9);
    }
}
