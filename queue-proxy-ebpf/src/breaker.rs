//! containerConcurrency enforcement (knative-contract.md A.5): `cc` active slots and a queue
//! of `10 x cc`; the request beyond that is refused at once. Unlike Knative's breaker, queued
//! requests are served strictly in arrival order (tokio's semaphore is fair), so a new request
//! never overtakes one that has been waiting.

use std::sync::Arc;
use std::sync::atomic::{AtomicUsize, Ordering};

use tokio::sync::{OwnedSemaphorePermit, Semaphore};

/// Knative's `ErrRequestQueueFull` text.
pub const QUEUE_FULL: &str = "pending request queue full";

#[derive(Debug, thiserror::Error, PartialEq, Eq)]
pub enum BreakerError {
    #[error("pending request queue full")]
    QueueFull,
}

#[derive(Debug)]
pub struct Breaker {
    in_flight: AtomicUsize,
    total: usize,
    slots: Arc<Semaphore>,
}

/// Holds a pending slot (queued or active) and, once granted, an active slot.
#[derive(Debug)]
pub struct Ticket {
    breaker: Arc<Breaker>,
    permit: Option<OwnedSemaphorePermit>,
}

impl Drop for Ticket {
    fn drop(&mut self) {
        self.permit.take();
        self.breaker.in_flight.fetch_sub(1, Ordering::AcqRel);
    }
}

impl Breaker {
    pub fn new(concurrency: usize, queue_depth: usize) -> Arc<Self> {
        Arc::new(Self {
            in_flight: AtomicUsize::new(0),
            total: concurrency + queue_depth,
            slots: Arc::new(Semaphore::new(concurrency)),
        })
    }

    /// Takes a pending slot or fails with [`BreakerError::QueueFull`].
    pub fn enter(self: &Arc<Self>) -> Result<Ticket, BreakerError> {
        let mut cur = self.in_flight.load(Ordering::Acquire);
        loop {
            if cur >= self.total {
                return Err(BreakerError::QueueFull);
            }
            match self.in_flight.compare_exchange_weak(
                cur,
                cur + 1,
                Ordering::AcqRel,
                Ordering::Acquire,
            ) {
                Ok(_) => {
                    return Ok(Ticket {
                        breaker: Arc::clone(self),
                        permit: None,
                    });
                }
                Err(now) => cur = now,
            }
        }
    }

    /// Requests admitted and not finished (queued plus active).
    pub fn in_flight(&self) -> usize {
        self.in_flight.load(Ordering::Acquire)
    }
}

impl Ticket {
    /// Waits, in arrival order, for an active slot.
    pub async fn wait(&mut self) {
        if self.permit.is_none() {
            // The semaphore is never closed, so acquisition only fails if it were.
            self.permit = Arc::clone(&self.breaker.slots).acquire_owned().await.ok();
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[tokio::test]
    async fn overflow_and_fifo() {
        let b = Breaker::new(1, 2);
        let mut t1 = b.enter().expect("slot");
        t1.wait().await;
        let t2 = b.enter().expect("queued");
        let t3 = b.enter().expect("queued");
        assert_eq!(b.enter().err(), Some(BreakerError::QueueFull));
        let order = Arc::new(std::sync::Mutex::new(Vec::new()));
        let mut hs = Vec::new();
        for (i, mut t) in [(2, t2), (3, t3)] {
            let order = Arc::clone(&order);
            hs.push(tokio::spawn(async move {
                t.wait().await;
                order.lock().expect("lock").push(i);
            }));
            tokio::task::yield_now().await;
        }
        drop(t1);
        for h in hs {
            h.await.expect("join");
        }
        assert_eq!(*order.lock().expect("lock"), vec![2, 3]);
        assert_eq!(b.in_flight(), 0);
    }
}
