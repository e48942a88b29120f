//! Per-revision throttling (Knative `pkg/activator/net/throttler.go`, `lb_policy.go`).
//!
//! Knative stacks a revision-wide breaker (capacity = CC × assigned pods, queue depth
//! 10 000) on top of one breaker per pod (capacity = CC). Here both levels live under one
//! lock: a request takes a pod slot at once when one is free and nobody is waiting,
//! otherwise it joins the revision's FIFO queue; every released slot and every change of
//! pods hands slots to the queue head first. The revision capacity is therefore exactly
//! CC × assigned pods, CC = 0 blocks only while there are no pods, and waiting requests
//! are served in arrival order.

use std::collections::{BTreeMap, HashMap, VecDeque};
use std::sync::{Arc, Mutex, MutexGuard};

use rand::Rng;
use tokio::sync::oneshot;

use crate::manifests::RevisionKey;

/// Why a request could not get a pod.
#[derive(Debug, thiserror::Error, PartialEq, Eq)]
pub enum ThrottleError {
    #[error("pending request queue full")]
    QueueFull,
    #[error("revision is gone")]
    RevisionGone,
}

/// Load-balancing policy, chosen by containerConcurrency as Knative does.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum LbPolicy {
    /// CC = 0: power of two random choices, the less loaded wins.
    RandomChoice2,
    /// CC 1..=3: the first pod (in address order) with a free slot.
    FirstAvailable,
    /// CC > 3: round robin over pods with a free slot.
    RoundRobin,
}

impl LbPolicy {
    pub fn for_cc(cc: u32) -> Self {
        match cc {
            0 => LbPolicy::RandomChoice2,
            1..=3 => LbPolicy::FirstAvailable,
            _ => LbPolicy::RoundRobin,
        }
    }
}

/// The pods this activator uses out of all `dests` (sorted), given its index among
/// `num_activators` (index −1: not in the public endpoints yet, use all).
pub fn assign_slice<T: Clone>(dests: &[T], self_index: i32, num_activators: usize) -> Vec<T> {
    if self_index < 0 || num_activators <= 1 || dests.is_empty() {
        return dests.to_vec();
    }
    let idx = self_index as usize;
    let n = dests.len();
    if num_activators > n {
        return vec![dests[idx % n].clone()];
    }
    let per = n / num_activators;
    let start = (idx * per).min(n);
    let end = (start + per).min(n);
    let mut out = dests[start..end].to_vec();
    let remnants = n % num_activators;
    if idx < remnants {
        out.push(dests[per * num_activators + idx].clone());
    }
    out
}

/// This activator's index among the sorted activator IPs, and their count.
pub fn activator_position(activator_ips: &[String], own_ip: &str) -> (i32, usize) {
    let mut ips = activator_ips.to_vec();
    ips.sort();
    ips.dedup();
    let idx = ips
        .iter()
        .position(|ip| ip == own_ip)
        .map_or(-1, |i| i as i32);
    (idx, ips.len().max(1))
}

#[derive(Debug)]
struct Tracker {
    id: u64,
    in_flight: u32,
}

struct Inner {
    cc: u32,
    policy: LbPolicy,
    queue_depth: usize,
    trackers: BTreeMap<Arc<str>, Tracker>,
    assigned: Vec<Arc<str>>,
    activator_index: i32,
    num_activators: usize,
    waiters: VecDeque<oneshot::Sender<Lease>>,
    rr_next: usize,
    next_id: u64,
    active: u64,
}

impl Inner {
    fn has_capacity(&self, t: &Tracker) -> bool {
        self.cc == 0 || t.in_flight < self.cc
    }

    /// Picks a pod with a free slot according to the policy.
    fn pick(&mut self) -> Option<Arc<str>> {
        let n = self.assigned.len();
        if n == 0 {
            return None;
        }
        let cap = |s: &Self, i: usize| -> bool {
            s.trackers
                .get(&s.assigned[i])
                .is_some_and(|t| s.has_capacity(t))
        };
        let idx = match self.policy {
            LbPolicy::FirstAvailable => (0..n).find(|&i| cap(self, i)),
            LbPolicy::RoundRobin => {
                let start = self.rr_next % n;
                let found = (0..n).map(|k| (start + k) % n).find(|&i| cap(self, i));
                if let Some(i) = found {
                    self.rr_next = i + 1;
                }
                found
            }
            LbPolicy::RandomChoice2 => {
                let load = |s: &Self, i: usize| {
                    s.trackers
                        .get(&s.assigned[i])
                        .map_or(u32::MAX, |t| t.in_flight)
                };
                if n == 1 {
                    cap(self, 0).then_some(0)
                } else {
                    let mut rng = rand::thread_rng();
                    let a = rng.gen_range(0..n);
                    let mut b = rng.gen_range(0..n - 1);
                    if b >= a {
                        b += 1;
                    }
                    let best = if load(self, b) < load(self, a) { b } else { a };
                    let other = if best == a { b } else { a };
                    if cap(self, best) {
                        Some(best)
                    } else if cap(self, other) {
                        Some(other)
                    } else {
                        (0..n).find(|&i| cap(self, i))
                    }
                }
            }
        }?;
        let dest = self.assigned[idx].clone();
        if let Some(t) = self.trackers.get_mut(&dest) {
            t.in_flight += 1;
        }
        self.active += 1;
        Some(dest)
    }

    fn release(&mut self, dest: &str, id: u64) {
        self.active = self.active.saturating_sub(1);
        if let Some(t) = self.trackers.get_mut(dest)
            && t.id == id
        {
            t.in_flight = t.in_flight.saturating_sub(1);
        }
    }

    fn reassign(&mut self) {
        let dests: Vec<Arc<str>> = self.trackers.keys().cloned().collect();
        self.assigned = assign_slice(&dests, self.activator_index, self.num_activators);
    }
}

/// The throttler of one revision.
pub struct RevisionThrottler {
    key: RevisionKey,
    inner: Mutex<Inner>,
}

impl std::fmt::Debug for RevisionThrottler {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("RevisionThrottler")
            .field("key", &self.key)
            .finish_non_exhaustive()
    }
}

/// A pod slot. Dropping it frees the slot and hands it to the next waiting request.
#[derive(Debug)]
pub struct Lease {
    rt: Option<Arc<RevisionThrottler>>,
    dest: Arc<str>,
    id: u64,
}

impl Lease {
    /// The pod's `ip:port`.
    pub fn dest(&self) -> &str {
        &self.dest
    }

    /// The pod's `ip:port`, shared.
    pub fn dest_arc(&self) -> Arc<str> {
        self.dest.clone()
    }
}

impl Drop for Lease {
    fn drop(&mut self) {
        if let Some(rt) = self.rt.take() {
            let mut g = rt.lock();
            g.release(&self.dest, self.id);
            rt.dispatch(&mut g);
        }
    }
}

impl RevisionThrottler {
    pub fn new(key: RevisionKey, cc: u32, queue_depth: usize) -> Arc<Self> {
        Arc::new(Self {
            key,
            inner: Mutex::new(Inner {
                cc,
                policy: LbPolicy::for_cc(cc),
                queue_depth,
                trackers: BTreeMap::new(),
                assigned: Vec::new(),
                activator_index: -1,
                num_activators: 1,
                waiters: VecDeque::new(),
                rr_next: 0,
                next_id: 0,
                active: 0,
            }),
        })
    }

    pub fn key(&self) -> &RevisionKey {
        &self.key
    }

    fn lock(&self) -> MutexGuard<'_, Inner> {
        // A panic while holding this lock cannot leave counters inconsistent enough
        // to matter more than stopping all traffic would, so recover the guard.
        self.inner.lock().unwrap_or_else(|p| p.into_inner())
    }

    fn lease(self: &Arc<Self>, g: &Inner, dest: Arc<str>) -> Lease {
        let id = g.trackers.get(&dest).map_or(0, |t| t.id);
        Lease {
            rt: Some(self.clone()),
            dest,
            id,
        }
    }

    /// Hands free slots to waiting requests in arrival order.
    fn dispatch(self: &Arc<Self>, g: &mut Inner) {
        while let Some(front) = g.waiters.front() {
            if front.is_closed() {
                g.waiters.pop_front();
                continue;
            }
            let Some(dest) = g.pick() else { break };
            let lease = self.lease(g, dest);
            let Some(w) = g.waiters.pop_front() else {
                break;
            };
            if let Err(mut lease) = w.send(lease) {
                // The waiter went away between the check and the send.
                lease.rt = None;
                g.release(&lease.dest, lease.id);
            }
        }
    }

    /// Gets a pod slot, waiting in FIFO order while none is free.
    pub async fn acquire(self: &Arc<Self>) -> Result<Lease, ThrottleError> {
        let rx = {
            let mut g = self.lock();
            if g.waiters.is_empty()
                && let Some(dest) = g.pick()
            {
                return Ok(self.lease(&g, dest));
            }
            if g.waiters.len() >= g.queue_depth {
                g.waiters.retain(|w| !w.is_closed());
                if g.waiters.len() >= g.queue_depth {
                    return Err(ThrottleError::QueueFull);
                }
            }
            let (tx, rx) = oneshot::channel();
            g.waiters.push_back(tx);
            rx
        };
        rx.await.map_err(|_| ThrottleError::RevisionGone)
    }

    /// Sets the healthy pods (`ip:port`).
    pub fn update_dests(self: &Arc<Self>, healthy: &[String]) {
        let mut g = self.lock();
        let keep: HashMap<&str, ()> = healthy.iter().map(|d| (d.as_str(), ())).collect();
        g.trackers.retain(|d, _| keep.contains_key(&**d));
        for d in healthy {
            if !g.trackers.contains_key(d.as_str()) {
                g.next_id += 1;
                let id = g.next_id;
                g.trackers
                    .insert(Arc::from(d.as_str()), Tracker { id, in_flight: 0 });
            }
        }
        g.reassign();
        self.dispatch(&mut g);
    }

    /// Sets this activator's position among the activators of the revision.
    pub fn update_activators(self: &Arc<Self>, index: i32, count: usize) {
        let mut g = self.lock();
        if g.activator_index == index && g.num_activators == count {
            return;
        }
        g.activator_index = index;
        g.num_activators = count.max(1);
        g.reassign();
        self.dispatch(&mut g);
    }

    /// Applies a containerConcurrency change.
    pub fn update_cc(self: &Arc<Self>, cc: u32) {
        let mut g = self.lock();
        if g.cc != cc {
            g.cc = cc;
            g.policy = LbPolicy::for_cc(cc);
            self.dispatch(&mut g);
        }
    }

    /// `(queued, active)` request counts.
    pub fn counts(&self) -> (usize, u64) {
        let g = self.lock();
        (
            g.waiters.iter().filter(|w| !w.is_closed()).count(),
            g.active,
        )
    }

    /// Pods assigned to this activator.
    pub fn assigned(&self) -> Vec<String> {
        self.lock().assigned.iter().map(|d| d.to_string()).collect()
    }

    /// Revision capacity: CC × assigned pods (None = unbounded, CC = 0 with pods).
    pub fn capacity(&self) -> Option<u64> {
        let g = self.lock();
        if g.cc == 0 {
            if g.assigned.is_empty() { Some(0) } else { None }
        } else {
            Some(u64::from(g.cc) * g.assigned.len() as u64)
        }
    }
}

/// All revision throttlers.
#[derive(Debug, Default)]
pub struct Throttler {
    revisions: Mutex<HashMap<RevisionKey, Arc<RevisionThrottler>>>,
}

impl Throttler {
    pub fn get(&self, key: &RevisionKey) -> Option<Arc<RevisionThrottler>> {
        self.lock().get(key).cloned()
    }

    fn lock(&self) -> MutexGuard<'_, HashMap<RevisionKey, Arc<RevisionThrottler>>> {
        self.revisions.lock().unwrap_or_else(|p| p.into_inner())
    }

    /// Creates the throttler on Revision add, updates CC on change.
    pub fn upsert(&self, key: &RevisionKey, cc: u32, queue_depth: usize) -> Arc<RevisionThrottler> {
        let mut m = self.lock();
        if let Some(rt) = m.get(key) {
            rt.update_cc(cc);
            return rt.clone();
        }
        let rt = RevisionThrottler::new(key.clone(), cc, queue_depth);
        m.insert(key.clone(), rt.clone());
        rt
    }

    /// Deletes the throttler on Revision delete; its waiters get [`ThrottleError::RevisionGone`].
    pub fn remove(&self, key: &RevisionKey) {
        let rt = self.lock().remove(key);
        if let Some(rt) = rt {
            rt.lock().waiters.clear();
        }
    }

    pub fn all(&self) -> Vec<Arc<RevisionThrottler>> {
        self.lock().values().cloned().collect()
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::time::Duration;

    fn key() -> RevisionKey {
        RevisionKey::new("default", "r")
    }

    #[test]
    fn policy_thresholds() {
        assert_eq!(LbPolicy::for_cc(0), LbPolicy::RandomChoice2);
        assert_eq!(LbPolicy::for_cc(1), LbPolicy::FirstAvailable);
        assert_eq!(LbPolicy::for_cc(3), LbPolicy::FirstAvailable);
        assert_eq!(LbPolicy::for_cc(4), LbPolicy::RoundRobin);
    }

    #[test]
    fn slices() {
        let d: Vec<u32> = (0..5).collect();
        assert_eq!(assign_slice(&d, -1, 3), d);
        assert_eq!(assign_slice(&d, 0, 1), d);
        // 5 pods, 2 activators: 2 each + remnant pod 4 to activator 0.
        assert_eq!(assign_slice(&d, 0, 2), vec![0, 1, 4]);
        assert_eq!(assign_slice(&d, 1, 2), vec![2, 3]);
        // More activators than pods: index modulo pods.
        assert_eq!(assign_slice(&d[..2], 4, 5), vec![0]);
        assert_eq!(assign_slice(&d[..2], 3, 5), vec![1]);
        assert!(assign_slice::<u32>(&[], 1, 3).is_empty());
        // Every pod is assigned to exactly one activator.
        for pods in 0..12u32 {
            for acts in 1..6usize {
                let d: Vec<u32> = (0..pods).collect();
                let mut all: Vec<u32> = (0..acts as i32)
                    .flat_map(|i| assign_slice(&d, i, acts))
                    .collect();
                all.sort();
                if pods as usize >= acts {
                    assert_eq!(all, d, "pods {pods} activators {acts}");
                }
            }
        }
        assert_eq!(
            activator_position(&["10.0.0.9".into(), "10.0.0.1".into()], "10.0.0.9"),
            (1, 2)
        );
        assert_eq!(activator_position(&[], "10.0.0.9"), (-1, 1));
    }

    fn now_or_never<F: std::future::Future>(f: F) -> Option<F::Output> {
        futures::FutureExt::now_or_never(f)
    }

    #[tokio::test]
    async fn cc_enforced_and_fifo() {
        let rt = RevisionThrottler::new(key(), 1, 100);
        // No pods: requests wait.
        let mut waiting: Vec<_> = (0..4)
            .map(|i| {
                let rt = rt.clone();
                tokio::spawn(async move { (i, rt.acquire().await) })
            })
            .collect();
        tokio::time::sleep(Duration::from_millis(20)).await;
        assert_eq!(rt.counts(), (4, 0));
        rt.update_dests(&["a:1".into(), "b:1".into()]);
        // Two slots: the first two arrivals get them.
        let first = waiting.remove(0).await.unwrap();
        let second = waiting.remove(0).await.unwrap();
        assert_eq!(first.0, 0);
        let l1 = first.1.unwrap();
        let l2 = second.1.unwrap();
        assert_ne!(l1.dest(), l2.dest());
        tokio::time::sleep(Duration::from_millis(10)).await;
        assert_eq!(rt.counts(), (2, 2));
        assert_eq!(rt.capacity(), Some(2));
        drop(l1);
        let third = waiting.remove(0).await.unwrap();
        assert_eq!(third.0, 2);
        let l3 = third.1.unwrap();
        assert_eq!(rt.counts(), (1, 2));
        // l3 took the slot l1 freed: "a:1".
        assert_eq!(l3.dest(), "a:1", "first available picks the first free pod");
        drop(l2);
        let fourth = waiting.remove(0).await.unwrap().1.unwrap();
        assert_eq!(
            fourth.dest(),
            "b:1",
            "the freed slot goes to the queue head"
        );
        drop((l3, fourth));
        assert_eq!(rt.acquire().await.unwrap().dest(), "a:1");
    }

    #[tokio::test]
    async fn queue_full() {
        let rt = RevisionThrottler::new(key(), 1, 2);
        let a = tokio::spawn({
            let rt = rt.clone();
            async move { rt.acquire().await.map(|_| ()) }
        });
        let b = tokio::spawn({
            let rt = rt.clone();
            async move { rt.acquire().await.map(|_| ()) }
        });
        tokio::time::sleep(Duration::from_millis(10)).await;
        assert_eq!(
            now_or_never(rt.acquire()).map(|r| r.map(|_| ())),
            Some(Err(ThrottleError::QueueFull))
        );
        a.abort();
        let _ = a.await;
        // The abandoned waiter's place is reclaimed.
        let c = tokio::spawn({
            let rt = rt.clone();
            async move { rt.acquire().await.map(|_| ()) }
        });
        tokio::time::sleep(Duration::from_millis(10)).await;
        assert_eq!(rt.counts().0, 2);
        rt.update_dests(&["a:1".into()]);
        assert_eq!(b.await.unwrap(), Ok(()));
        assert_eq!(c.await.unwrap(), Ok(()));
    }

    #[tokio::test]
    async fn round_robin_and_random_choice() {
        let rt = RevisionThrottler::new(key(), 10, 10);
        rt.update_dests(&["a:1".into(), "b:1".into(), "c:1".into()]);
        let mut leases = Vec::new();
        for _ in 0..6 {
            leases.push(rt.acquire().await.unwrap());
        }
        let dests: Vec<&str> = leases.iter().map(Lease::dest).collect();
        assert_eq!(dests, ["a:1", "b:1", "c:1", "a:1", "b:1", "c:1"]);
        drop(leases);

        let rt = RevisionThrottler::new(key(), 0, 10);
        rt.update_dests(&["a:1".into(), "b:1".into()]);
        let mut leases = Vec::new();
        for _ in 0..100 {
            leases.push(rt.acquire().await.unwrap());
        }
        let on_a = leases.iter().filter(|l| l.dest() == "a:1").count();
        // Power of two choices keeps the two pods within one request of each other.
        assert!((49..=51).contains(&on_a), "{on_a}");
        assert_eq!(rt.capacity(), None);
    }

    #[tokio::test]
    async fn pod_removed_and_readded_does_not_corrupt_counts() {
        let rt = RevisionThrottler::new(key(), 1, 10);
        rt.update_dests(&["a:1".into()]);
        let l = rt.acquire().await.unwrap();
        rt.update_dests(&[]);
        rt.update_dests(&["a:1".into()]);
        let l2 = rt.acquire().await.unwrap();
        drop(l); // old generation: must not free the new tracker's slot
        assert!(now_or_never(rt.acquire()).is_none());
        drop(l2);
    }

    #[tokio::test]
    async fn subsetting_limits_pods() {
        let rt = RevisionThrottler::new(key(), 1, 10);
        rt.update_dests(&["a:1".into(), "b:1".into(), "c:1".into(), "d:1".into()]);
        rt.update_activators(1, 2);
        assert_eq!(rt.assigned(), vec!["c:1", "d:1"]);
        assert_eq!(rt.capacity(), Some(2));
    }
}
