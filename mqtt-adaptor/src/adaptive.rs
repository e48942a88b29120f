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
//! ([`ewma`], 1/8 weight per sample). A pipelined connection measures it directly: the time
//! from the later of the request's write and the previous answer on that connection to this
//! answer (a sink answers one connection's requests one after another). A connection with one
//! request measures the whole answer time, which includes waiting behind the other requests
//! at a sink that works on one at a time, so that sample is divided by the requests in flight
//! ([`sample_ns`]). The mode turns pipelined once the average falls below [`ENTER_FAST_NS`]
//! and concurrent once it rises above [`LEAVE_FAST_NS`]; after leaving, it stays concurrent
//! for at least [`HOLD_CONCURRENT`] ([`next_mode`]).
//!
//! A slow sink that works on many requests at once (20 ms each, say) can look fast in the
//! concurrent mode (20 ms over 100 in flight is 0.2 ms), so the adaptor tries pipelining; the
//! first pipelined answers then take 20 ms each, the mode is concurrent again within a few
//! answers and stays so for [`HOLD_CONCURRENT`]. Such a sink therefore works on the full
//! window except for these short trials, at most one per [`HOLD_CONCURRENT`].

use std::sync::atomic::{AtomicU64, Ordering};
use std::time::{Duration, Instant};

/// Requests per connection in the pipelined mode.
pub const AUTO_DEPTH: usize = 16;
/// The average answer time under which the sink counts as fast.
pub const ENTER_FAST_NS: u64 = 500_000;
/// The average answer time over which pipelining stops.
pub const LEAVE_FAST_NS: u64 = 2_000_000;
/// How long the concurrent mode holds after pipelining stopped.
pub const HOLD_CONCURRENT: Duration = Duration::from_secs(5);

/// The moving average with one more sample (weight 1/8).
pub fn ewma(avg: u64, sample: u64) -> u64 {
    if sample >= avg {
        avg + (sample - avg) / 8
    } else {
        avg - (avg - sample) / 8
    }
}

/// The sink's time for one answer: `elapsed` (from the later of the request's write and the
/// previous answer on its connection) as it is on a connection with several requests
/// (`pipelined`), else divided by the requests in flight at the sink (at least 1).
pub fn sample_ns(elapsed: Duration, pipelined: bool, in_flight: usize) -> u64 {
    let ns = u64::try_from(elapsed.as_nanos()).unwrap_or(u64::MAX);
    if pipelined {
        ns
    } else {
        ns / (in_flight.max(1) as u64)
    }
}

/// The next mode (`true`: pipelined) from the current one, the average answer time and how
/// long ago pipelining last stopped (`None`: never).
pub fn next_mode(pipelined: bool, avg_ns: u64, since_left: Option<Duration>) -> bool {
    if pipelined {
        avg_ns <= LEAVE_FAST_NS
    } else {
        avg_ns < ENTER_FAST_NS && since_left.is_none_or(|d| d >= HOLD_CONCURRENT)
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

/// The shared state of the rule: the average and the mode, published over a watch channel so
/// that waiting workers wake when it turns concurrent.
#[derive(Debug)]
pub struct Adaptive {
    avg_ns: AtomicU64,
    /// When pipelining last stopped (only read and written with the mode's lock held).
    left: std::sync::Mutex<Option<Instant>>,
    mode: tokio::sync::watch::Sender<bool>,
}

impl Default for Adaptive {
    fn default() -> Self {
        Adaptive {
            // Start well above the threshold: the first answers have to show a fast sink.
            avg_ns: AtomicU64::new(LEAVE_FAST_NS),
            left: std::sync::Mutex::new(None),
            mode: tokio::sync::watch::Sender::new(false),
        }
    }
}

impl Adaptive {
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
        let avg = ewma(self.avg_ns.load(Ordering::Relaxed), sample);
        self.avg_ns.store(avg, Ordering::Relaxed);
        let now = self.pipelined();
        let since_left = |l: &Option<Instant>| l.map(|t| t.elapsed());
        let mut left = self.left.lock().unwrap_or_else(|p| p.into_inner());
        if next_mode(now, avg, since_left(&left)) == now {
            return;
        }
        self.mode.send_if_modified(|m| {
            let next = next_mode(*m, avg, since_left(&left));
            if next == *m {
                return false;
            }
            if !next {
                *left = Some(Instant::now());
            }
            tracing::debug!(
                pipelined = next,
                avg_answer_us = avg / 1000,
                "sink pipelining mode changed"
            );
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
        assert!(next_mode(false, ENTER_FAST_NS - 1, None));
        assert!(!next_mode(false, ENTER_FAST_NS, None));
        assert!(!next_mode(false, 0, Some(Duration::from_secs(1))));
        assert!(next_mode(false, 0, Some(HOLD_CONCURRENT)));
        // Pipelined: stays up to the upper threshold.
        assert!(next_mode(true, LEAVE_FAST_NS, None));
        assert!(next_mode(true, ENTER_FAST_NS + 1, None));
        assert!(!next_mode(true, LEAVE_FAST_NS + 1, None));
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
        let a = Adaptive::default();
        assert!(!a.pipelined(), "starts concurrent");
        // Fast answers: pipelined.
        for _ in 0..40 {
            a.observe(10_000);
        }
        assert!(a.pipelined());
        // Pipelined answers taking 20 ms each: concurrent after a few.
        let mut n = 0;
        while a.pipelined() {
            a.observe(20_000_000);
            n += 1;
        }
        assert!(n <= 3, "{n}");
        // Fast-looking samples again: held concurrent.
        for _ in 0..100 {
            a.observe(1_000);
        }
        assert!(!a.pipelined());
    }
}
