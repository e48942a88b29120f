//! Revision backends (Knative `pkg/activator/net/revision_backends.go`): which pods of a
//! revision are healthy. Each pod is probed with `K-Network-Probe: queue` and
//! `User-Agent: Knative-Activator-Probe` and counts as healthy on 200 with body `queue`.
//! A pod is probed the moment it appears or changes (not-ready again), and a failed probe
//! is retried after 1, 2, 4, 8… ms, capped at `PROBE_FREQUENCY`: no fixed tick delays a
//! cold start. Healthy pods are handed to the revision's throttler.
//!
//! Revisions in event-driven mode (annotation `spright.dev/dataplane-mode: event-driven`,
//! see [`DataplaneMode`]) have their serving port steered in the kernel to the user
//! container, which would not answer `queue`; their pods are probed with the same request
//! (path `/`) on the sidecar's admin port instead (`http-queueadm` in the Endpoints,
//! default 8022), and requests still go to the serving port.

use std::collections::{BTreeMap, BTreeSet, HashMap};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use bytes::Bytes;
use http_body_util::{BodyExt, Empty};
use hyper_util::client::legacy::Client;
use hyper_util::client::legacy::connect::HttpConnector;
use hyper_util::rt::TokioExecutor;
use tokio::sync::watch;
use tokio::task::JoinHandle;

use crate::manifests::{ClusterState, DataplaneMode, RevisionKey};
use crate::throttler::{Throttler, activator_position};

pub const PROBE_HEADER: &str = "k-network-probe";
pub const PROBE_USER_AGENT: &str = "Knative-Activator-Probe";
const FIRST_RETRY: Duration = Duration::from_millis(1);

/// Where and how a pod is probed.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ProbeTarget {
    /// `ip:port`.
    pub addr: String,
    pub path: &'static str,
}

impl ProbeTarget {
    /// The serving port, as Knative probes it (`/healthz`).
    pub fn serving(dest: &str) -> Self {
        Self {
            addr: dest.to_owned(),
            path: "/healthz",
        }
    }

    /// The sidecar's admin port (event-driven mode).
    pub fn admin(addr: String) -> Self {
        Self { addr, path: "/" }
    }
}

/// Probes a pod once.
#[derive(Clone, Debug)]
pub struct PodProber {
    client: Client<HttpConnector, Empty<Bytes>>,
    timeout: Duration,
}

impl PodProber {
    pub fn new(timeout: Duration) -> Self {
        let mut conn = HttpConnector::new();
        conn.set_nodelay(true);
        conn.set_connect_timeout(Some(timeout));
        Self {
            client: Client::builder(TokioExecutor::new())
                .pool_max_idle_per_host(1)
                .build(conn),
            timeout,
        }
    }

    /// True when the pod answers 200 with body `queue`.
    pub async fn probe(&self, target: &ProbeTarget) -> bool {
        let req = match http::Request::get(format!("http://{}{}", target.addr, target.path))
            .header(PROBE_HEADER, "queue")
            .header(http::header::USER_AGENT, PROBE_USER_AGENT)
            .body(Empty::new())
        {
            Ok(r) => r,
            Err(_) => return false,
        };
        let fut = async {
            let resp = self.client.request(req).await.ok()?;
            if resp.status() != http::StatusCode::OK {
                return None;
            }
            let body = resp.into_body().collect().await.ok()?.to_bytes();
            Some(body.as_ref() == b"queue")
        };
        matches!(
            tokio::time::timeout(self.timeout, fut).await,
            Ok(Some(true))
        )
    }
}

/// Capped exponential retry delay.
pub fn next_delay(d: Duration, cap: Duration) -> Duration {
    (d * 2).min(cap)
}

#[derive(Default)]
struct RevState {
    healthy: BTreeSet<String>,
    /// dest → (was in the ready set, probe task)
    known: HashMap<String, (bool, Option<JoinHandle<()>>)>,
}

/// Keeps throttlers and pod health in line with the cluster state.
pub struct Backends {
    throttler: Arc<Throttler>,
    prober: PodProber,
    probe_cap: Duration,
    queue_depth: usize,
    own_ip: String,
    revs: Mutex<BTreeMap<RevisionKey, RevState>>,
}

impl std::fmt::Debug for Backends {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Backends").finish_non_exhaustive()
    }
}

impl Backends {
    pub fn new(
        throttler: Arc<Throttler>,
        prober: PodProber,
        probe_cap: Duration,
        queue_depth: usize,
        own_ip: String,
    ) -> Arc<Self> {
        Arc::new(Self {
            throttler,
            prober,
            probe_cap: probe_cap.max(FIRST_RETRY),
            queue_depth,
            own_ip,
            revs: Mutex::new(BTreeMap::new()),
        })
    }

    fn lock(&self) -> std::sync::MutexGuard<'_, BTreeMap<RevisionKey, RevState>> {
        self.revs.lock().unwrap_or_else(|p| p.into_inner())
    }

    /// Applies one cluster snapshot.
    pub fn apply(self: &Arc<Self>, st: &ClusterState) {
        let mut revs = self.lock();
        // Revision delete: drop throttler and stop probing.
        let gone: Vec<RevisionKey> = revs
            .keys()
            .filter(|k| !st.revisions.contains_key(*k))
            .cloned()
            .collect();
        for k in gone {
            if let Some(rs) = revs.remove(&k) {
                for (_, (_, task)) in rs.known {
                    if let Some(t) = task {
                        t.abort();
                    }
                }
            }
            self.throttler.remove(&k);
            tracing::info!(revision = %k, "revision removed");
        }
        for (key, spec) in &st.revisions {
            let rt = self
                .throttler
                .upsert(key, spec.container_concurrency, self.queue_depth);
            let (idx, n) = activator_position(
                st.public.get(key).map(Vec::as_slice).unwrap_or(&[]),
                &self.own_ip,
            );
            rt.update_activators(idx, n);
            let (ready, not_ready) = st
                .private
                .get(key)
                .map(|e| e.dests(spec.h2c))
                .unwrap_or_default();
            // Event-driven pods answer `queue` on the admin port only.
            let admin = (spec.dataplane_mode == DataplaneMode::EventDriven).then(|| {
                st.private
                    .get(key)
                    .map(|e| e.admin_dests(spec.h2c))
                    .unwrap_or_default()
            });
            let target = |dest: &String| match admin.as_ref().and_then(|a| a.get(dest)) {
                Some(addr) => ProbeTarget::admin(addr.clone()),
                None => ProbeTarget::serving(dest),
            };
            let rs = revs.entry(key.clone()).or_default();
            let mut changed = false;
            let all: BTreeSet<&String> = ready.iter().chain(not_ready.iter()).collect();
            // Pods that left the endpoints.
            rs.known.retain(|d, (_, task)| {
                if all.contains(d) {
                    return true;
                }
                if let Some(t) = task.take() {
                    t.abort();
                }
                false
            });
            let before = rs.healthy.len();
            rs.healthy.retain(|d| all.contains(d));
            changed |= before != rs.healthy.len();
            for (dest, is_ready) in ready
                .iter()
                .map(|d| (d, true))
                .chain(not_ready.iter().map(|d| (d, false)))
            {
                let entry = rs.known.get(dest).map(|(r, _)| *r);
                let needs_probe = match entry {
                    None => true,
                    // Ready → not ready: probe again.
                    Some(true) if !is_ready => {
                        changed |= rs.healthy.remove(dest);
                        true
                    }
                    _ => false,
                };
                if needs_probe {
                    let task = self.spawn_probe(key.clone(), dest.clone(), target(dest));
                    if let Some((_, Some(old))) =
                        rs.known.insert(dest.clone(), (is_ready, Some(task)))
                    {
                        old.abort();
                    }
                } else if let Some(e) = rs.known.get_mut(dest) {
                    e.0 = is_ready;
                }
            }
            if changed {
                let healthy: Vec<String> = rs.healthy.iter().cloned().collect();
                rt.update_dests(&healthy);
            }
        }
    }

    fn spawn_probe(
        self: &Arc<Self>,
        key: RevisionKey,
        dest: String,
        target: ProbeTarget,
    ) -> JoinHandle<()> {
        let me = self.clone();
        tokio::spawn(async move {
            let mut delay = FIRST_RETRY;
            loop {
                if me.prober.probe(&target).await {
                    me.mark_healthy(&key, &dest);
                    return;
                }
                tokio::time::sleep(delay).await;
                delay = next_delay(delay, me.probe_cap);
            }
        })
    }

    fn mark_healthy(&self, key: &RevisionKey, dest: &str) {
        let mut revs = self.lock();
        let Some(rs) = revs.get_mut(key) else { return };
        let Some(entry) = rs.known.get_mut(dest) else {
            return;
        };
        entry.1 = None;
        if rs.healthy.insert(dest.to_owned()) {
            tracing::info!(revision = %key, dest, "pod is ready");
            let healthy: Vec<String> = rs.healthy.iter().cloned().collect();
            if let Some(rt) = self.throttler.get(key) {
                rt.update_dests(&healthy);
            }
        }
    }

    /// Follows a cluster source until it closes.
    pub async fn run(self: Arc<Self>, mut rx: watch::Receiver<Arc<ClusterState>>) {
        loop {
            let st = rx.borrow_and_update().clone();
            self.apply(&st);
            if rx.changed().await.is_err() {
                return;
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn retry_delays() {
        let cap = Duration::from_millis(200);
        let mut d = FIRST_RETRY;
        let mut seen = vec![d.as_millis()];
        for _ in 0..10 {
            d = next_delay(d, cap);
            seen.push(d.as_millis());
        }
        assert_eq!(seen, [1, 2, 4, 8, 16, 32, 64, 128, 200, 200, 200]);
    }
}
