//! The drainer (knative/pkg `network/handlers/drain.go`, knative-contract.md A.3/A.4).
//!
//! Not draining: nothing runs. `drain()` starts a quiet-period countdown that every ordinary
//! request pushes back; it resolves when the period passes without requests, or when
//! `reset()` cancels the drain (the `/wait-for-drain` call that no SIGTERM followed).
//! Health checks fail with 503 from the moment a drain starts until a reset.

use std::sync::{Arc, Mutex};
use std::time::Duration;

use tokio::sync::watch;
use tokio::time::Instant;

/// Knative's `drainSleepDuration`.
pub const QUIET_PERIOD: Duration = Duration::from_secs(30);

#[derive(Debug)]
struct Run {
    deadline: Instant,
    fired: bool,
    done: watch::Sender<bool>,
}

#[derive(Debug)]
pub struct Drainer {
    quiet: Duration,
    run: Mutex<Option<Run>>,
}

impl Drainer {
    pub fn new(quiet: Duration) -> Arc<Self> {
        Arc::new(Self {
            quiet,
            run: Mutex::new(None),
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
        loop {
            let deadline = match self.lock().as_ref() {
                Some(run) if !run.fired => run.deadline,
                _ => return,
            };
            tokio::time::sleep_until(deadline).await;
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
