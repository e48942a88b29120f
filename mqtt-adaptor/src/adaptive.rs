//! `--sink-pipeline auto`: pipeline onto busy sink connections only while the sink is
//! evidently fast, so a slow sink keeps the full `--inflight` concurrency.
//!
//! The source runs `--inflight` pipelined workers, each with its own connection. Two modes:
//!
//! - **concurrent** (the start, and whenever the sink looks slow): every worker carries one
//!   request at a time, so up to `--inflight` requests are at the sink at once, as with
//!   `--sink-pipeline 1`.
//! - **pipelined** (the sink is evidently fast): the first ceil(inflight / [`AUTO_DEPTH`])
//!   workers carry up to [`AUTO_DEPTH`] requests each, written together and answered in order;
//!   the others finish what they carry and then wait, taking nothing.
//!
//! Evidence is the sink's time per answer, as a moving average over all connections
//! ([`ewma`], 1/8 weight per sample, each sample counted at most [`MAX_SAMPLE_NS`] so that one
//! stray slow answer on a busy machine does not end pipelining). A pipelined connection
//! measures it directly: a request written while another was unanswered on its connection
//! counts from the previous answer on that connection to its own (a sink answers one
//! connection's requests one after another). A request that had its connection to itself
//! counts its whole answer time, which includes waiting behind the requests on other
//! connections at a sink that works on one at a time, so that
//! sample is divided by the requests in flight ([`sample_ns`]). The mode turns pipelined once
//! the average falls below [`ENTER_FAST_NS`] and concurrent once it rises above
//! [`LEAVE_FAST_NS`] ([`next_mode`]); after leaving, it stays concurrent for a hold that
//! starts at [`HOLD_CONCURRENT`] and doubles, up to [`MAX_HOLD`], each time pipelining lasted
//! less than [`TRIAL`] ([`next_hold`]).
//!
//! A slow sink that works on many requests at once (20 ms each, say) can look fast in the
//! concurrent mode (20 ms over 100 in flight is 0.2 ms), so the adaptor tries pipelining; the
//! first pipelined answers then take 20 ms each, the mode is concurrent again within six
//! answers and stays so for the hold. Such a sink therefore works on the full window except
//! for these short trials, which come ever more rarely (every 32 s at most once the hold has
//! grown).

use std::sync::atomic::{AtomicU64, Ordering};
use std::time::{Duration, Instant};

use prometheus_client::metrics::counter::Counter;
use prometheus_client::metrics::gauge::Gauge;

use crate::metrics::Metrics;

/// Requests per connection in the pipelined mode.
pub const AUTO_DEPTH: usize = 16;
/// The average answer time under which the sink counts as fast.
pub const ENTER_FAST_NS: u64 = 500_000;
/// The average answer time over which pipelining stops.
pub const LEAVE_FAST_NS: u64 = 2_000_000;
/// A sample counts at most this much: one stray slow answer (a sink or adaptor descheduled on
/// a busy machine) cannot end pipelining alone; six slow answers in a row from a fast average
/// do.
pub const MAX_SAMPLE_NS: u64 = 2 * LEAVE_FAST_NS;
/// How long the concurrent mode holds after pipelining stopped, at first.
pub const HOLD_CONCURRENT: Duration = Duration::from_secs(1);
/// The longest hold: a hold doubles each time pipelining did not last [`TRIAL`].
pub const MAX_HOLD: Duration = Duration::from_secs(32);
/// Pipelining that lasted at least this long was no failed trial: the hold starts over.
pub const TRIAL: Duration = Duration::from_secs(10);

/// The moving average with one more sample (weight 1/8).
pub fn ewma(avg: u64, sample: u64) -> u64 {
    if sample >= avg {
        avg + (sample - avg) / 8
    } else {
        avg - (avg - sample) / 8
    }
}

/// The sink's time for one answer: `elapsed` (from the later of the request's write and the
/// previous answer on its connection) as it is when the request waited behind another on its
/// connection (`behind`: the previous answer came after this request was written), else
/// divided by the requests in flight at the sink (at least 1).
pub fn sample_ns(elapsed: Duration, behind: bool, in_flight: usize) -> u64 {
    let ns = u64::try_from(elapsed.as_nanos()).unwrap_or(u64::MAX);
    if behind {
        ns
    } else {
        ns / (in_flight.max(1) as u64)
    }
}

/// The next mode (`true`: pipelined) from the current one, the average answer time and
/// whether the concurrent mode is still held.
pub fn next_mode(pipelined: bool, avg_ns: u64, held: bool) -> bool {
    if pipelined {
        avg_ns <= LEAVE_FAST_NS
    } else {
        avg_ns < ENTER_FAST_NS && !held
    }
}

/// The hold after pipelining stopped: twice the previous one (at most [`MAX_HOLD`]) when
/// pipelining `lasted` less than [`TRIAL`] (a failed trial), else [`HOLD_CONCURRENT`].
pub fn next_hold(previous: Option<Duration>, lasted: Duration) -> Duration {
    match previous {
        Some(h) if lasted < TRIAL => (h * 2).min(MAX_HOLD),
        _ => HOLD_CONCURRENT,
    }
}

/// Requests worker `index` of `workers` may carry at once: one each in the concurrent mode;
/// in the pipelined mode `depth` for the first ceil(workers / depth), none for the rest.
pub fn worker_depth(index: usize, workers: usize, depth: usize, pipelined: bool) -> usize {
    if !pipelined || depth <= 1 {
        1
    } else if index < workers.div_ceil(depth) {
        depth
    } else {
        0
    }
}

/// When the mode last changed, and the hold that followed the last stop.
#[derive(Debug, Default)]
struct Switch {
    /// When pipelining started, while it is on.
    entered: Option<Instant>,
    /// When pipelining last stopped, and the hold from then.
    left: Option<(Instant, Duration)>,
}

/// The shared state of the rule: the average and the mode, published over a watch channel so
/// that waiting workers wake when it turns concurrent.
#[derive(Debug)]
pub struct Adaptive {
    avg_ns: AtomicU64,
    switch: std::sync::Mutex<Switch>,
    mode: tokio::sync::watch::Sender<bool>,
    /// The mode and its changes, as metrics.
    pipelined_gauge: Gauge,
    switches: Counter,
}

impl Adaptive {
    /// Starts in the concurrent mode, reporting the mode in `metrics`.
    pub fn new(metrics: &Metrics) -> Self {
        metrics.sink_pipelined.set(0);
        Adaptive {
            // Start well above the threshold: the first answers have to show a fast sink.
            avg_ns: AtomicU64::new(LEAVE_FAST_NS),
            switch: std::sync::Mutex::new(Switch::default()),
            mode: tokio::sync::watch::Sender::new(false),
            pipelined_gauge: metrics.sink_pipelined.clone(),
            switches: metrics.sink_pipeline_switches.clone(),
        }
    }

    /// Whether the pipelined mode is on.
    pub fn pipelined(&self) -> bool {
        *self.mode.borrow()
    }

    /// A receiver for mode changes.
    pub fn subscribe(&self) -> tokio::sync::watch::Receiver<bool> {
        self.mode.subscribe()
    }

    /// Takes one answer-time sample; switches the mode when the rule says so.
    pub fn observe(&self, sample: u64) {
        // Racing updates may lose a sample; the average stays an average.
        let avg = ewma(
            self.avg_ns.load(Ordering::Relaxed),
            sample.min(MAX_SAMPLE_NS),
        );
        self.avg_ns.store(avg, Ordering::Relaxed);
        let now = self.pipelined();
        // Cheap first test; the hold is only looked at when the average says switch.
        if next_mode(now, avg, false) == now {
            return;
        }
        let mut sw = self.switch.lock().unwrap_or_else(|p| p.into_inner());
        let held = |sw: &Switch| sw.left.is_some_and(|(at, hold)| at.elapsed() < hold);
        self.mode.send_if_modified(|m| {
            let next = next_mode(*m, avg, held(&sw));
            if next == *m {
                return false;
            }
            if next {
                sw.entered = Some(Instant::now());
            } else {
                let lasted = sw.entered.take().map_or(Duration::ZERO, |t| t.elapsed());
                let hold = next_hold(sw.left.map(|(_, h)| h), lasted);
                sw.left = Some((Instant::now(), hold));
            }
            tracing::info!(
                pipelined = next,
                avg_answer_us = avg / 1000,
                "sink pipelining mode changed"
            );
            self.pipelined_gauge.set(i64::from(next));
            self.switches.inc();
            *m = next;
            true
        });
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn average_moves_an_eighth_each_way() {
        assert_eq!(ewma(800, 1600), 900);
        assert_eq!(ewma(800, 0), 700);
        assert_eq!(ewma(800, 800), 800);
        assert_eq!(ewma(0, u64::MAX), u64::MAX / 8);
        let mut a = LEAVE_FAST_NS;
        for _ in 0..40 {
            a = ewma(a, 20_000);
        }
        assert!(a < ENTER_FAST_NS, "{a}");
    }

    #[test]
    fn samples_divide_single_requests_by_the_requests_in_flight() {
        let d = Duration::from_millis(20);
        assert_eq!(sample_ns(d, true, 100), 20_000_000);
        assert_eq!(sample_ns(d, false, 100), 200_000);
        assert_eq!(sample_ns(d, false, 0), 20_000_000);
        assert_eq!(sample_ns(d, false, 1), 20_000_000);
    }

    #[test]
    fn mode_enters_below_and_leaves_above_with_a_hold() {
        // Concurrent: enters only under the lower threshold, and not during the hold.
        assert!(next_mode(false, ENTER_FAST_NS - 1, false));
        assert!(!next_mode(false, ENTER_FAST_NS, false));
        assert!(!next_mode(false, 0, true));
        // Pipelined: stays up to the upper threshold, held or not.
        assert!(next_mode(true, LEAVE_FAST_NS, false));
        assert!(next_mode(true, ENTER_FAST_NS + 1, true));
        assert!(!next_mode(true, LEAVE_FAST_NS + 1, false));
    }

    #[test]
    fn holds_double_after_failed_trials_and_start_over_after_a_good_one() {
        let short = Duration::from_millis(30);
        assert_eq!(next_hold(None, short), HOLD_CONCURRENT);
        let mut h = HOLD_CONCURRENT;
        let mut seen = vec![h];
        for _ in 0..8 {
            h = next_hold(Some(h), short);
            seen.push(h);
        }
        assert_eq!(seen[1], 2 * HOLD_CONCURRENT);
        assert_eq!(*seen.last().unwrap(), MAX_HOLD);
        assert!(seen.windows(2).all(|w| w[0] <= w[1]));
        assert_eq!(next_hold(Some(MAX_HOLD), TRIAL), HOLD_CONCURRENT);
    }

    #[test]
    fn one_stray_slow_answer_does_not_end_pipelining() {
        let a = Adaptive::new(&Metrics::new());
        for _ in 0..40 {
            a.observe(20_000);
        }
        assert!(a.pipelined());
        a.observe(50_000_000);
        assert!(a.pipelined(), "one 50 ms answer");
        for _ in 0..40 {
            a.observe(20_000);
        }
        a.observe(50_000_000);
        a.observe(50_000_000);
        assert!(a.pipelined(), "two 50 ms answers");
    }

    #[test]
    fn depths_keep_the_window_in_both_modes() {
        for workers in [1, 7, 16, 100, 1000] {
            // Concurrent: one each, the whole window.
            let total: usize = (0..workers)
                .map(|i| worker_depth(i, workers, AUTO_DEPTH, false))
                .sum();
            assert_eq!(total, workers);
            // Pipelined: at least the window, on ceil(workers / depth) connections.
            let depths: Vec<usize> = (0..workers)
                .map(|i| worker_depth(i, workers, AUTO_DEPTH, true))
                .collect();
            assert!(depths.iter().sum::<usize>() >= workers);
            let busy = depths.iter().filter(|d| **d > 0).count();
            assert_eq!(busy, workers.div_ceil(AUTO_DEPTH));
        }
        assert_eq!(worker_depth(5, 10, 1, true), 1);
    }

    #[test]
    fn a_slow_sink_turns_pipelining_off_and_holds() {
        let metrics = Metrics::new();
        let a = Adaptive::new(&metrics);
        assert!(!a.pipelined(), "starts concurrent");
        // Fast answers: pipelined.
        for _ in 0..40 {
            a.observe(10_000);
        }
        assert!(a.pipelined());
        assert_eq!(metrics.sink_pipelined.get(), 1);
        // Pipelined answers taking 20 ms each: concurrent after a few.
        let mut n = 0;
        while a.pipelined() {
            a.observe(20_000_000);
            n += 1;
        }
        assert!(n <= 8, "{n}");
        assert_eq!(metrics.sink_pipelined.get(), 0);
        assert_eq!(metrics.sink_pipeline_switches.get(), 2);
        // Fast-looking samples again: held concurrent.
        for _ in 0..100 {
            a.observe(1_000);
        }
        assert!(!a.pipelined());
    }
}
