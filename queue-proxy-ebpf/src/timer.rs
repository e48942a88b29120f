//! Deadlines for the hot path: the header-read timeout of every keep-alive request, the
//! revision timeouts of every proxied request.
//!
//! Nearly all of these deadlines are cancelled long before they fire, and each new one lies
//! later than the ones before it. A tokio timer per deadline costs a driver registration and
//! removal per request, and whenever a new deadline is earlier than the one the driver last
//! parked for (the header-read timer of the next request is: 60 s against the 300 s revision
//! timeout) tokio wakes its own driver through an eventfd: one more syscall and epoll event
//! per request. Here deadlines live in an ordered map; one driver task sleeps until the
//! earliest, and it is only told about a new deadline that is earlier than the one it sleeps
//! for. With nothing pending the driver waits on a notification only: no timer while idle
//! (after the last deadline it slept for has passed).

use std::collections::BTreeMap;
use std::future::Future;
use std::pin::Pin;
use std::sync::{Arc, Mutex, MutexGuard, PoisonError};
use std::task::{Context, Poll, Waker};
use std::time::Duration;

use tokio::sync::Notify;
use tokio::time::Instant;

#[derive(Debug, Default)]
struct Inner {
    entries: BTreeMap<(Instant, u64), Waker>,
    next_id: u64,
    /// The deadline the driver sleeps until, if any.
    armed: Option<Instant>,
}

/// The deadlines of one runtime and their driver task.
#[derive(Debug, Default)]
pub struct Timers {
    inner: Mutex<Inner>,
    rearm: Notify,
}

impl Timers {
    /// Creates the timers and spawns their driver on the current runtime.
    pub fn start() -> Arc<Self> {
        let t = Arc::new(Self::default());
        tokio::spawn(Arc::clone(&t).drive());
        t
    }

    fn lock(&self) -> MutexGuard<'_, Inner> {
        self.inner.lock().unwrap_or_else(PoisonError::into_inner)
    }

    /// A future that resolves at `deadline`.
    pub fn sleep_until(self: &Arc<Self>, deadline: Instant) -> Sleep {
        Sleep {
            timers: Arc::clone(self),
            deadline,
            key: None,
        }
    }

    pub fn sleep(self: &Arc<Self>, d: Duration) -> Sleep {
        self.sleep_until(Instant::now() + d)
    }

    async fn drive(self: Arc<Self>) {
        loop {
            let next = {
                let mut g = self.lock();
                let now = Instant::now();
                while let Some(e) = g.entries.first_entry() {
                    if e.key().0 > now {
                        break;
                    }
                    e.remove().wake();
                }
                let next = g.entries.first_key_value().map(|(k, _)| k.0);
                g.armed = next;
                next
            };
            match next {
                Some(at) => {
                    tokio::select! {
                        () = tokio::time::sleep_until(at) => {}
                        () = self.rearm.notified() => {}
                    }
                }
                None => self.rearm.notified().await,
            }
        }
    }

    fn register(&self, deadline: Instant, waker: &Waker) -> u64 {
        let mut g = self.lock();
        let id = g.next_id;
        g.next_id = g.next_id.wrapping_add(1);
        g.entries.insert((deadline, id), waker.clone());
        if g.armed.is_none_or(|a| deadline < a) {
            g.armed = Some(deadline);
            drop(g);
            self.rearm.notify_one();
        }
        id
    }

    fn update(&self, key: (Instant, u64), waker: &Waker) -> bool {
        match self.lock().entries.get_mut(&key) {
            Some(w) => {
                if !w.will_wake(waker) {
                    w.clone_from(waker);
                }
                true
            }
            None => false,
        }
    }

    fn remove(&self, key: (Instant, u64)) {
        self.lock().entries.remove(&key);
    }

    #[cfg(test)]
    fn pending(&self) -> usize {
        self.lock().entries.len()
    }
}

/// A deadline; registered with its [`Timers`] only once polled.
#[derive(Debug)]
pub struct Sleep {
    timers: Arc<Timers>,
    deadline: Instant,
    key: Option<(Instant, u64)>,
}

impl Sleep {
    /// Moves the deadline (registered again on the next poll).
    pub fn reset(&mut self, deadline: Instant) {
        if let Some(k) = self.key.take() {
            self.timers.remove(k);
        }
        self.deadline = deadline;
    }
}

impl Future for Sleep {
    type Output = ();

    fn poll(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<()> {
        let this = self.get_mut();
        if Instant::now() >= this.deadline {
            if let Some(k) = this.key.take() {
                this.timers.remove(k);
            }
            return Poll::Ready(());
        }
        match this.key {
            // Still registered: keep the newest waker.
            Some(k) if this.timers.update(k, cx.waker()) => {}
            _ => {
                let id = this.timers.register(this.deadline, cx.waker());
                this.key = Some((this.deadline, id));
            }
        }
        Poll::Pending
    }
}

impl Drop for Sleep {
    fn drop(&mut self) {
        if let Some(k) = self.key.take() {
            self.timers.remove(k);
        }
    }
}

impl hyper::rt::Sleep for Sleep {}

/// [`Timers`] as hyper's timer (the HTTP/1 header-read timeout).
#[derive(Debug, Clone)]
pub struct HyperTimer(pub Arc<Timers>);

impl hyper::rt::Timer for HyperTimer {
    fn sleep(&self, d: Duration) -> Pin<Box<dyn hyper::rt::Sleep>> {
        Box::pin(self.0.sleep(d))
    }

    fn sleep_until(&self, deadline: std::time::Instant) -> Pin<Box<dyn hyper::rt::Sleep>> {
        Box::pin(self.0.sleep_until(Instant::from_std(deadline)))
    }

    fn reset(&self, sleep: &mut Pin<Box<dyn hyper::rt::Sleep>>, new_deadline: std::time::Instant) {
        match sleep.as_mut().downcast_mut_pin::<Sleep>() {
            Some(s) => s.get_mut().reset(Instant::from_std(new_deadline)),
            None => *sleep = self.sleep_until(new_deadline),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[tokio::test(start_paused = true)]
    async fn fires_in_deadline_order() {
        let t = Timers::start();
        let start = Instant::now();
        let late = t.sleep(Duration::from_secs(60));
        let early = t.sleep(Duration::from_secs(5));
        let mut late = Box::pin(late);
        tokio::select! {
            () = &mut late => panic!("60 s timer fired first"),
            () = early => {}
        }
        assert_eq!(Instant::now() - start, Duration::from_secs(5));
        late.as_mut().await;
        assert_eq!(Instant::now() - start, Duration::from_secs(60));
        assert_eq!(t.pending(), 0);
    }

    #[tokio::test(start_paused = true)]
    async fn dropped_and_reset_deadlines_leave_nothing() {
        let t = Timers::start();
        let start = Instant::now();
        {
            let mut s = Box::pin(t.sleep(Duration::from_secs(1)));
            let waker = futures::task::noop_waker();
            assert!(
                s.as_mut()
                    .poll(&mut Context::from_waker(&waker))
                    .is_pending()
            );
            assert_eq!(t.pending(), 1);
        }
        assert_eq!(t.pending(), 0);
        let mut s = t.sleep(Duration::from_secs(30));
        let waker = futures::task::noop_waker();
        assert!(
            Pin::new(&mut s)
                .poll(&mut Context::from_waker(&waker))
                .is_pending()
        );
        s.reset(start + Duration::from_secs(2));
        assert_eq!(t.pending(), 0);
        s.await;
        assert_eq!(Instant::now() - start, Duration::from_secs(2));
    }

    #[tokio::test(start_paused = true)]
    async fn earlier_deadline_rearms_the_driver() {
        let t = Timers::start();
        let start = Instant::now();
        let mut far = Box::pin(t.sleep(Duration::from_secs(300)));
        let waker = futures::task::noop_waker();
        assert!(
            far.as_mut()
                .poll(&mut Context::from_waker(&waker))
                .is_pending()
        );
        tokio::task::yield_now().await;
        t.sleep(Duration::from_millis(100)).await;
        assert_eq!(Instant::now() - start, Duration::from_millis(100));
    }
}
