//! Bounded retries of pods that could not be attached.
//!
//! A pod from a manifest or from the Kubernetes API may fail to attach for a
//! while: its cgroup or network namespace does not exist yet (the runtime is
//! still creating it), or the kernel refused once. Rather than waiting for the
//! pod's next change, the agent tries again after 1 s, 2 s, 4 s ... (at most
//! [`Backoff::max`] apart), [`Backoff::attempts`] times, logging every failure;
//! after the last one it gives up until the pod changes. A retry is a
//! short-lived timer that exists only while a pod waits to be attached: an
//! agent whose pods are all attached has none.
//!
//! Registrations through the API are not retried: the caller got the error.
//!
//! Ordering: a retry attaches only while its entry is pending, and the entry
//! is checked and the pod attached under one lock, so after [`Retries::cancel`]
//! returns no retry of that pod attaches any more. Callers cancel before they
//! detach.

use std::collections::HashMap;
use std::sync::{Arc, Mutex, MutexGuard};
use std::time::Duration;

use crate::pod::PodSpec;
use crate::registry::{Registry, Source};

/// When retries happen.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Backoff {
    /// Delay before the first retry; doubled for each next one.
    pub first: Duration,
    /// Longest delay between two retries.
    pub max: Duration,
    /// Retries before giving up.
    pub attempts: u32,
}

impl Default for Backoff {
    /// 1 s, 2 s, 4 s ... 32 s, 60 s, 60 s: ten retries over about five minutes.
    fn default() -> Self {
        Self {
            first: Duration::from_secs(1),
            max: Duration::from_secs(60),
            attempts: 10,
        }
    }
}

impl Backoff {
    /// The delay before retry number `attempt` (1-based).
    pub fn delay(&self, attempt: u32) -> Duration {
        spright_core::backoff::exponential(self.first, self.max, attempt.saturating_sub(1))
    }
}

/// Builds the registration of a pod for a retry (a manifest's is fixed; a
/// Kubernetes pod's is translated again, its cgroup looked up again).
pub type MakeSpec = Arc<dyn Fn() -> Result<PodSpec, String> + Send + Sync>;

/// One pod waiting to be attached.
struct Pending {
    /// Tells this retry from a later one of the same pod.
    generation: u64,
    task: tokio::task::AbortHandle,
}

#[derive(Default)]
struct State {
    pending: HashMap<String, Pending>,
    generation: u64,
}

/// The retries in flight, by pod name.
pub struct Retries {
    registry: Arc<Registry>,
    backoff: Backoff,
    state: Mutex<State>,
}

impl std::fmt::Debug for Retries {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Retries")
            .field("backoff", &self.backoff)
            .field("pending", &self.pending())
            .finish_non_exhaustive()
    }
}

impl Retries {
    /// Retries for pods of `registry`.
    pub fn new(registry: Arc<Registry>, backoff: Backoff) -> Arc<Self> {
        Arc::new(Self {
            registry,
            backoff,
            state: Mutex::new(State::default()),
        })
    }

    fn lock(&self) -> MutexGuard<'_, State> {
        self.state
            .lock()
            .unwrap_or_else(std::sync::PoisonError::into_inner)
    }

    /// Attaches `spec` now; on failure logs the error and schedules retries.
    /// Replaces any retry pending for the same pod. Call from a Tokio runtime.
    pub fn attach(self: &Arc<Self>, spec: PodSpec, source: Source) -> bool {
        self.cancel(&spec.name);
        match self.registry.add(spec.clone(), source) {
            Ok(_) => true,
            Err(error) => {
                let name = spec.name.clone();
                self.retry(
                    &name,
                    source,
                    &error.to_string(),
                    Arc::new(move || Ok(spec.clone())),
                );
                false
            }
        }
    }

    /// Schedules retries of the pod `name`, whose first attempt failed with
    /// `error`: each builds its registration with `make`, then attaches it.
    /// Replaces any retry pending for the same pod. Call from a Tokio runtime.
    pub fn retry(self: &Arc<Self>, name: &str, source: Source, error: &str, make: MakeSpec) {
        let delay = self.backoff.delay(1);
        tracing::error!(pod = %name, %error, retry_in_ms = delay.as_millis() as u64, "cannot attach the pod; retrying");
        let mut state = self.lock();
        state.generation += 1;
        let generation = state.generation;
        let this = Arc::clone(self);
        let owned = name.to_owned();
        let task = tokio::spawn(async move { this.run(owned, generation, source, make).await });
        let pending = Pending {
            generation,
            task: task.abort_handle(),
        };
        if let Some(old) = state.pending.insert(name.to_owned(), pending) {
            old.task.abort();
        }
    }

    /// Stops retrying `name`, if it was pending.
    pub fn cancel(&self, name: &str) {
        if let Some(p) = self.lock().pending.remove(name) {
            p.task.abort();
        }
    }

    /// Whether `name` waits for a retry.
    pub fn is_pending(&self, name: &str) -> bool {
        self.lock().pending.contains_key(name)
    }

    /// Names of the pods waiting for a retry.
    pub fn pending(&self) -> Vec<String> {
        let mut names: Vec<String> = self.lock().pending.keys().cloned().collect();
        names.sort();
        names
    }

    async fn run(self: Arc<Self>, name: String, generation: u64, source: Source, make: MakeSpec) {
        for attempt in 1..=self.backoff.attempts {
            tokio::time::sleep(self.backoff.delay(attempt)).await;
            let mut state = self.lock();
            if state.pending.get(&name).map(|p| p.generation) != Some(generation) {
                return;
            }
            let result =
                make().and_then(|spec| self.registry.add(spec, source).map_err(|e| e.to_string()));
            match result {
                Ok(_) => {
                    tracing::info!(pod = %name, attempt, "attached the pod on retry");
                    state.pending.remove(&name);
                    return;
                }
                Err(error) if attempt < self.backoff.attempts => {
                    let next = self.backoff.delay(attempt + 1);
                    tracing::warn!(pod = %name, attempt, %error, retry_in_ms = next.as_millis() as u64, "cannot attach the pod; retrying");
                }
                Err(error) => {
                    tracing::error!(pod = %name, attempt, %error, "cannot attach the pod; giving up until it changes");
                    state.pending.remove(&name);
                    return;
                }
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use std::net::{IpAddr, Ipv4Addr};
    use std::path::PathBuf;

    use spright_test_support::cgroup::{CGROUP_ROOT, TestCgroup};

    use super::*;
    use crate::pod::DataplaneMode;

    fn spec(name: &str, ip: u8, cgroup: &std::path::Path) -> PodSpec {
        PodSpec {
            name: name.to_owned(),
            ip: IpAddr::V4(Ipv4Addr::new(127, 0, 9, ip)),
            port: 8080,
            cgroup: Some(cgroup.to_owned()),
            pid: None,
            netns: None,
            mode: DataplaneMode::Userspace,
            serving_port: 8012,
            bypass: Vec::new(),
        }
    }

    /// Real kernel (root): a pod whose cgroup appears after its registration
    /// is attached by a retry; a cancelled retry attaches nothing.
    #[tokio::test]
    async fn a_pod_whose_cgroup_appears_later_is_attached_by_a_retry() {
        let late = TestCgroup::new("retry-late");
        late.remove();
        let never = TestCgroup::new("retry-cancelled");
        never.remove();
        let registry = Arc::new(Registry::new(
            PathBuf::from(CGROUP_ROOT),
            Box::new(|_: &std::path::Path, _: bool| {}),
        ));
        let retries = Retries::new(
            Arc::clone(&registry),
            Backoff {
                first: Duration::from_millis(20),
                max: Duration::from_millis(100),
                attempts: 100,
            },
        );
        assert!(!retries.attach(spec("late", 1, late.path()), Source::Manifest));
        assert!(!retries.attach(spec("cancelled", 2, never.path()), Source::Manifest));
        assert_eq!(retries.pending(), ["cancelled", "late"]);
        retries.cancel("cancelled");
        std::fs::create_dir(never.path()).expect("mkdir cgroup");
        std::fs::create_dir(late.path()).expect("mkdir cgroup");
        for _ in 0..500 {
            if registry.contains("late") {
                break;
            }
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
        assert!(registry.contains("late"), "not attached by a retry");
        assert!(retries.pending().is_empty(), "{:?}", retries.pending());
        tokio::time::sleep(Duration::from_millis(300)).await;
        assert!(
            !registry.contains("cancelled"),
            "a cancelled retry attached"
        );
        registry.remove("late").expect("detach");
    }

    #[test]
    fn delays_double_up_to_the_cap() {
        let b = Backoff::default();
        let secs: Vec<u64> = (1..=b.attempts).map(|a| b.delay(a).as_secs()).collect();
        assert_eq!(secs, [1, 2, 4, 8, 16, 32, 60, 60, 60, 60]);
        assert_eq!(b.delay(0), Duration::from_secs(1));
        assert_eq!(b.delay(u32::MAX), Duration::from_secs(60));
    }
}
