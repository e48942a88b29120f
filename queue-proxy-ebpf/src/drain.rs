//! The drainer (knative/pkg `network/handlers/drain.go`, knative-contract.md A.3/A.4).
//!
//! Not draining: nothing runs. `drain()` starts a quiet-period countdown that every ordinary
//! request pushes back; it resolves when the period passes without requests, or when
//! `reset()` cancels the drain (the `/wait-for-drain` call that no SIGTERM followed).
//! Health checks fail with 503 from the moment a drain starts until a reset.
//!
//! In event-driven mode the kernel steers the serving port past this process, so no request
//! touches the drainer. There the drainer also watches the kernel's counters of the serving
//! port ([`KernelLoad`], the accounting programs' requests in flight and arrivals): while a
//! drain counts down it reads them every [`poll_interval`] (never when not draining), and a
//! request in flight or a new arrival restarts the quiet period, exactly as a request through
//! the proxy does. The drain therefore ends once the kernel has seen no request in flight and
//! no arrival for a whole quiet period. If the counters cannot be read, the drain falls back
//! to the quiet period alone and says so.
//!
//! `SPRIGHT_DRAIN_QUIET_PERIOD` (for edge nodes and tests; `500ms`, `2s`, `1m`) replaces
//! Knative's 30 s quiet period.

use std::sync::{Arc, Mutex};
use std::time::Duration;

use tokio::sync::watch;
use tokio::time::Instant;

/// Knative's `drainSleepDuration`.
pub const QUIET_PERIOD: Duration = Duration::from_secs(30);
/// The variable that replaces [`QUIET_PERIOD`].
pub const ENV_QUIET_PERIOD: &str = "SPRIGHT_DRAIN_QUIET_PERIOD";
/// How often a drain reads the kernel counters at most.
const MAX_POLL: Duration = Duration::from_secs(1);

/// The kernel's view of the counted port.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub struct KernelLoad {
    /// Requests in flight now.
    pub in_flight: u64,
    /// Requests seen since the programs were attached (monotonic).
    pub arrivals: u64,
}

/// Reads the kernel counters (blocking: a map read or a request to the node agent).
pub type LoadProbe = Arc<dyn Fn() -> Result<KernelLoad, String> + Send + Sync>;

/// How often a drain with a quiet period of `quiet` reads the kernel counters.
pub fn poll_interval(quiet: Duration) -> Duration {
    (quiet / 4).clamp(Duration::from_millis(10), MAX_POLL)
}

/// The quiet period: `SPRIGHT_DRAIN_QUIET_PERIOD` (a Go duration such as `500ms`, `1.5s` or
/// `1m30s`, above zero and at most an hour), or Knative's.
pub fn quiet_period(get: impl Fn(&str) -> Option<String>) -> Result<Duration, String> {
    let Some(raw) = get(ENV_QUIET_PERIOD).filter(|v| !v.trim().is_empty()) else {
        return Ok(QUIET_PERIOD);
    };
    let bad = || format!("{ENV_QUIET_PERIOD}={raw:?}: use a duration such as 500ms, 2s or 1m");
    let period = spright_core::duration::parse(raw.trim()).map_err(|_| bad())?;
    if period.is_zero() || period > Duration::from_secs(3600) {
        return Err(bad());
    }
    Ok(period)
}

#[derive(Debug)]
struct Run {
    deadline: Instant,
    fired: bool,
    done: watch::Sender<bool>,
}

pub struct Drainer {
    quiet: Duration,
    run: Mutex<Option<Run>>,
    kernel: Option<LoadProbe>,
}

impl std::fmt::Debug for Drainer {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Drainer")
            .field("quiet", &self.quiet)
            .field("run", &self.run)
            .field("watches_kernel", &self.kernel.is_some())
            .finish()
    }
}

impl Drainer {
    /// A drainer that only counts requests through the proxy.
    #[cfg(test)]
    pub fn new(quiet: Duration) -> Arc<Self> {
        Self::watching_kernel(quiet, None)
    }

    /// A drainer that also waits for the kernel's requests in flight (event-driven mode).
    pub fn watching_kernel(quiet: Duration, kernel: Option<LoadProbe>) -> Arc<Self> {
        Arc::new(Self {
            quiet,
            run: Mutex::new(None),
            kernel,
        })
    }

    fn lock(&self) -> std::sync::MutexGuard<'_, Option<Run>> {
        self.run
            .lock()
            .unwrap_or_else(std::sync::PoisonError::into_inner)
    }

    pub fn draining(&self) -> bool {
        self.lock().is_some()
    }

    /// An ordinary request arrived: restart the quiet period if a drain is counting down.
    pub fn touch(&self) {
        let mut g = self.lock();
        if let Some(run) = g.as_mut().filter(|r| !r.fired) {
            run.deadline = Instant::now() + self.quiet;
        }
    }

    /// Starts draining (if not already) and waits until quiet or reset.
    pub async fn drain(self: &Arc<Self>) {
        let mut rx = {
            let mut g = self.lock();
            match g.as_ref() {
                Some(run) => run.done.subscribe(),
                None => {
                    let (tx, rx) = watch::channel(false);
                    *g = Some(Run {
                        deadline: Instant::now() + self.quiet,
                        fired: false,
                        done: tx,
                    });
                    tokio::spawn(Arc::clone(self).countdown());
                    rx
                }
            }
        };
        // A closed channel means the run was reset and dropped: done as well.
        let _ = rx.wait_for(|d| *d).await;
    }

    async fn countdown(self: Arc<Self>) {
        let mut kernel = self.kernel.clone().map(|probe| KernelWatch {
            probe,
            last_arrivals: None,
        });
        if let Some(k) = kernel.as_mut()
            && !k.check(&self).await
        {
            kernel = None;
        }
        let poll = poll_interval(self.quiet);
        loop {
            let deadline = match self.lock().as_ref() {
                Some(run) if !run.fired => run.deadline,
                _ => return,
            };
            match kernel.as_mut() {
                None => tokio::time::sleep_until(deadline).await,
                Some(k) => {
                    tokio::time::sleep_until(deadline.min(Instant::now() + poll)).await;
                    if !k.check(&self).await {
                        kernel = None;
                    }
                }
            }
            let mut g = self.lock();
            match g.as_mut() {
                Some(run) if !run.fired && run.deadline <= Instant::now() => {
                    run.fired = true;
                    let _ = run.done.send(true);
                    return;
                }
                Some(run) if !run.fired => continue,
                _ => return,
            }
        }
    }

    /// Leaves drain mode and releases anyone waiting in `drain()`.
    pub fn reset(&self) {
        if let Some(run) = self.lock().take() {
            let _ = run.done.send(true);
        }
    }
}

/// The kernel counters as a drain reads them.
struct KernelWatch {
    probe: LoadProbe,
    last_arrivals: Option<u64>,
}

impl KernelWatch {
    /// Reads the counters and restarts the quiet period if a request is in flight or arrived
    /// since the last read. False when they cannot be read (the drain goes on without them).
    async fn check(&mut self, drainer: &Drainer) -> bool {
        let probe = Arc::clone(&self.probe);
        let read = tokio::task::spawn_blocking(move || probe())
            .await
            .unwrap_or_else(|e| Err(format!("counter read failed: {e}")));
        match read {
            Ok(load) => {
                let arrived = self.last_arrivals.is_some_and(|a| a != load.arrivals);
                self.last_arrivals = Some(load.arrivals);
                if load.in_flight > 0 || arrived {
                    tracing::debug!(
                        in_flight = load.in_flight,
                        arrivals = load.arrivals,
                        "drain: the kernel sees requests on the serving port"
                    );
                    drainer.touch();
                }
                true
            }
            Err(error) => {
                tracing::warn!(%error, "drain: cannot read the kernel's requests in flight; waiting for the quiet period only");
                false
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[tokio::test(start_paused = true)]
    async fn quiet_period_restarts_on_requests() {
        let d = Drainer::new(Duration::from_secs(30));
        assert!(!d.draining());
        let start = Instant::now();
        let d2 = Arc::clone(&d);
        let h = tokio::spawn(async move { d2.drain().await });
        tokio::time::sleep(Duration::from_secs(20)).await;
        assert!(d.draining());
        d.touch();
        h.await.expect("join");
        assert_eq!(start.elapsed().as_secs(), 50);
        assert!(d.draining());
        // Once drained, further calls return at once.
        d.drain().await;
        assert_eq!(start.elapsed().as_secs(), 50);
    }

    fn scripted(loads: Vec<Result<KernelLoad, String>>) -> (LoadProbe, Arc<Mutex<usize>>) {
        let reads = Arc::new(Mutex::new(0));
        let r = Arc::clone(&reads);
        let probe: LoadProbe = Arc::new(move || {
            let mut n = r.lock().unwrap();
            *n += 1;
            loads
                .get(*n - 1)
                .cloned()
                .unwrap_or_else(|| loads.last().cloned().unwrap_or(Ok(KernelLoad::default())))
        });
        (probe, reads)
    }

    fn load(in_flight: u64, arrivals: u64) -> Result<KernelLoad, String> {
        Ok(KernelLoad {
            in_flight,
            arrivals,
        })
    }

    #[tokio::test(start_paused = true)]
    async fn the_kernel_in_flight_count_holds_the_drain() {
        // Quiet 4 s, reads every 1 s: in flight at 0..=5 s, then one arrival read at 7 s,
        // then nothing. The drain ends one quiet period after the last read that saw a
        // request (7 s + 4 s).
        let (probe, reads) = scripted(vec![
            load(1, 10),
            load(1, 10),
            load(2, 11),
            load(1, 11),
            load(1, 11),
            load(1, 11),
            load(0, 11),
            load(0, 12),
            load(0, 12),
        ]);
        let d = Drainer::watching_kernel(Duration::from_secs(4), Some(probe));
        let start = Instant::now();
        d.drain().await;
        assert_eq!(start.elapsed().as_secs(), 11);
        assert!(*reads.lock().unwrap() >= 9);
        // Not draining: no reads.
        let before = *reads.lock().unwrap();
        d.reset();
        tokio::time::sleep(Duration::from_secs(60)).await;
        assert_eq!(*reads.lock().unwrap(), before);
    }

    #[tokio::test(start_paused = true)]
    async fn an_idle_kernel_drains_after_one_quiet_period() {
        let (probe, _) = scripted(vec![load(0, 3)]);
        let d = Drainer::watching_kernel(Duration::from_secs(4), Some(probe));
        let start = Instant::now();
        d.drain().await;
        assert_eq!(start.elapsed().as_secs(), 4);
    }

    #[tokio::test(start_paused = true)]
    async fn unreadable_counters_fall_back_to_the_quiet_period() {
        let (probe, reads) = scripted(vec![load(1, 3), Err("agent gone".into())]);
        let d = Drainer::watching_kernel(Duration::from_secs(4), Some(probe));
        let start = Instant::now();
        d.drain().await;
        // Touched at 0 s (in flight), the read at 1 s fails: the countdown from 0 s stands.
        assert_eq!(start.elapsed().as_secs(), 4);
        assert_eq!(*reads.lock().unwrap(), 2);
    }

    #[test]
    fn the_quiet_period_can_be_set() {
        let get = |v: &'static str| move |k: &str| (k == ENV_QUIET_PERIOD).then(|| v.to_owned());
        assert_eq!(quiet_period(|_| None), Ok(QUIET_PERIOD));
        assert_eq!(quiet_period(get(" ")), Ok(QUIET_PERIOD));
        assert_eq!(quiet_period(get("500ms")), Ok(Duration::from_millis(500)));
        assert_eq!(quiet_period(get("2s")), Ok(Duration::from_secs(2)));
        assert_eq!(quiet_period(get(" 1m ")), Ok(Duration::from_secs(60)));
        // Go's syntax since the parser moved to spright-core; every form accepted before
        // gives the same period.
        assert_eq!(quiet_period(get("1.5s")), Ok(Duration::from_millis(1500)));
        assert_eq!(quiet_period(get("1m30s")), Ok(Duration::from_secs(90)));
        assert_eq!(quiet_period(get("1h")), Ok(Duration::from_secs(3600)));
        for (old, want) in [
            ("1ms", Duration::from_millis(1)),
            ("30s", Duration::from_secs(30)),
            ("0030s", Duration::from_secs(30)),
            ("60m", Duration::from_secs(3600)),
            ("3600000ms", Duration::from_secs(3600)),
        ] {
            assert_eq!(quiet_period(get(old)), Ok(want), "{old}");
        }
        for bad in [
            "0s",
            "5",
            "s",
            "2h",
            "-1s",
            "1.5",
            "99999999999999999999m",
            "61m",
        ] {
            let err = quiet_period(get(bad)).unwrap_err();
            assert!(err.contains(ENV_QUIET_PERIOD), "{err}");
        }
        assert_eq!(poll_interval(QUIET_PERIOD), Duration::from_secs(1));
        assert_eq!(
            poll_interval(Duration::from_secs(2)),
            Duration::from_millis(500)
        );
    }

    #[tokio::test(start_paused = true)]
    async fn reset_releases_waiters() {
        let d = Drainer::new(Duration::from_secs(30));
        let d2 = Arc::clone(&d);
        let h = tokio::spawn(async move { d2.drain().await });
        tokio::time::sleep(Duration::from_secs(1)).await;
        d.reset();
        h.await.expect("join");
        assert!(!d.draining());
    }
}
