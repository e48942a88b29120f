//! The pods on this node and their attached accounting programs.
//!
//! A pod is attached when it is registered (API call or manifest file) and
//! detached when it is unregistered, when its manifest goes, or when it
//! disappears: the agent watches the pod's `cgroup.events` with inotify (no
//! polling) and detaches once the cgroup is removed or its last process has
//! exited (`populated 0` after it was populated).

use std::collections::HashMap;
use std::net::IpAddr;
use std::path::{Path, PathBuf};
use std::sync::Mutex;

use serde::Serialize;
use spright_ebpf::EbpfError;
use spright_ebpf::accounting::{PodAccounting, PodCounters};
use spright_ebpf::loopback::Loopback;
use spright_ebpf::steering::{SourcePrefix, Steering};

use crate::pod::{DataplaneMode, PodSpec, SpecError};

/// Where a registration came from.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize)]
#[serde(rename_all = "lowercase")]
pub enum Source {
    /// The registration API.
    Api,
    /// A file in the manifest directory.
    Manifest,
    /// The Kubernetes API (cluster mode).
    Cluster,
}

/// Errors of registry operations, each with its HTTP status.
#[derive(Debug, thiserror::Error)]
pub enum RegistryError {
    /// Bad specification.
    #[error(transparent)]
    Spec(#[from] SpecError),
    /// The name is taken.
    #[error("pod {0} is already registered")]
    Exists(String),
    /// Another pod has this IP.
    #[error("IP {ip} already belongs to pod {owner}")]
    IpInUse {
        /// The IP.
        ip: IpAddr,
        /// Its pod.
        owner: String,
    },
    /// Unknown pod.
    #[error("pod {0} is not registered")]
    NotFound(String),
    /// An h2c pod: the kernel does not count HTTP/2, so the sidecar counts its requests.
    #[error(
        "pod {0} serves h2c: the kernel does not count HTTP/2 requests, so the agent keeps no counters for it; count them in the sidecar (userspace accounting)"
    )]
    NotCounted(String),
    /// No pod has the caller's address.
    #[error("no pod on this node has address {0}")]
    UnknownCaller(IpAddr),
    /// The kernel refused.
    #[error("pod {name}: {source}")]
    Ebpf {
        /// Pod.
        name: String,
        /// Cause.
        #[source]
        source: Box<EbpfError>,
    },
}

impl RegistryError {
    /// The HTTP status answering this error.
    pub fn status(&self) -> http::StatusCode {
        use http::StatusCode;
        match self {
            Self::Spec(_) => StatusCode::BAD_REQUEST,
            Self::Exists(_) | Self::IpInUse { .. } => StatusCode::CONFLICT,
            Self::NotFound(_) | Self::NotCounted(_) => StatusCode::NOT_FOUND,
            Self::UnknownCaller(_) => StatusCode::FORBIDDEN,
            Self::Ebpf { source, .. } if source.is_permission_denied() => StatusCode::FORBIDDEN,
            Self::Ebpf { source, .. } => match **source {
                EbpfError::CgroupNotFound { .. } | EbpfError::NotCgroupV2 { .. } => {
                    StatusCode::BAD_REQUEST
                }
                _ => StatusCode::INTERNAL_SERVER_ERROR,
            },
        }
    }
}

/// What the API lists about a pod.
#[derive(Debug, Clone, Serialize)]
pub struct PodInfo {
    /// Registration.
    pub spec: PodSpec,
    /// Resolved cgroup directory.
    pub cgroup: PathBuf,
    /// Origin of the registration.
    pub source: Source,
    /// Kernel program ids (ingress, egress, sock_ops; in event-driven mode
    /// also sk_lookup and the listen hook).
    pub program_ids: Vec<u32>,
    /// Kernel map ids.
    pub map_ids: Vec<u32>,
    /// Event-driven mode: connections steered to the user container so far.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub steered: Option<u64>,
    /// Event-driven mode: connections left to the sidecar (`bypass`).
    #[serde(skip_serializing_if = "Option::is_none")]
    pub bypassed: Option<u64>,
    /// Event-driven mode: user-container listeners taken as steering target
    /// (at attach time and by the in-kernel listen hook).
    #[serde(skip_serializing_if = "Option::is_none")]
    pub listeners_taken: Option<u64>,
}

/// A pod's counters as served to its sidecar.
#[derive(Debug, Clone, Serialize)]
pub struct PodReport {
    /// Pod name.
    pub pod: String,
    /// Counters since attach.
    #[serde(flatten)]
    pub counters: CountersJson,
}

/// JSON form of [`PodCounters`].
#[derive(Debug, Clone, Copy, Serialize, serde::Deserialize, PartialEq, Eq)]
pub struct CountersJson {
    /// CLOCK_MONOTONIC of the read, ns.
    pub now_ns: u64,
    /// In flight.
    pub concurrency: u32,
    /// Proxied in flight.
    pub proxied_concurrency: u32,
    /// Arrivals.
    pub arrivals: u64,
    /// Proxied arrivals.
    pub proxied_arrivals: u64,
    /// Completions.
    pub completions: u64,
    /// Proxied completions.
    pub proxied_completions: u64,
    /// ∫ concurrency dt, request·ns.
    pub weighted_ns: u64,
    /// ∫ proxied concurrency dt, request·ns.
    pub weighted_proxied_ns: u64,
}

impl From<PodCounters> for CountersJson {
    fn from(c: PodCounters) -> Self {
        Self {
            now_ns: c.now_ns,
            concurrency: c.concurrency,
            proxied_concurrency: c.proxied_concurrency,
            arrivals: c.arrivals,
            proxied_arrivals: c.proxied_arrivals,
            completions: c.completions,
            proxied_completions: c.proxied_completions,
            weighted_ns: c.weighted_ns,
            weighted_proxied_ns: c.weighted_proxied_ns,
        }
    }
}

struct Pod {
    spec: PodSpec,
    cgroup: PathBuf,
    source: Source,
    accounting: PodAccounting,
    /// Event-driven mode: the serving port's steering.
    steering: Option<Steering>,
    /// Full mode: the sidecar's hop to the user container through a sockmap.
    loopback: Option<Loopback>,
    /// Listeners taken from the pod's processes at attach time.
    listeners_at_attach: u64,
    /// The cgroup had processes at some point since attach.
    was_populated: bool,
}

/// Called with a `cgroup.events` path to watch (true) or forget (false).
pub type WatchHook = Box<dyn Fn(&Path, bool) + Send + Sync>;

/// The node's pods.
pub struct Registry {
    cgroup_root: PathBuf,
    pods: Mutex<HashMap<String, Pod>>,
    watch: WatchHook,
}

impl std::fmt::Debug for Registry {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Registry")
            .field("cgroup_root", &self.cgroup_root)
            .finish_non_exhaustive()
    }
}

/// The `cgroup.events` file of a cgroup directory.
pub fn events_path(cgroup: &Path) -> PathBuf {
    cgroup.join("cgroup.events")
}

/// Whether the cgroup has processes: `Some(populated)`, `None` if it is gone.
fn populated(cgroup: &Path) -> Option<bool> {
    let text = std::fs::read_to_string(events_path(cgroup)).ok()?;
    Some(text.lines().any(|line| line.trim() == "populated 1"))
}

impl Registry {
    /// An empty registry; `watch` is told which files to watch.
    pub fn new(cgroup_root: PathBuf, watch: WatchHook) -> Self {
        Self {
            cgroup_root,
            pods: Mutex::new(HashMap::new()),
            watch,
        }
    }

    fn lock(&self) -> std::sync::MutexGuard<'_, HashMap<String, Pod>> {
        self.pods
            .lock()
            .unwrap_or_else(std::sync::PoisonError::into_inner)
    }

    /// Attaches the accounting programs to a new pod.
    pub fn add(&self, spec: PodSpec, source: Source) -> Result<PodInfo, RegistryError> {
        spec.check()?;
        let cgroup = spec.resolve_cgroup(&self.cgroup_root)?;
        let mut pods = self.lock();
        if pods.contains_key(&spec.name) {
            return Err(RegistryError::Exists(spec.name));
        }
        if let Some(owner) = pods.values().find(|p| p.spec.ip == spec.ip) {
            return Err(RegistryError::IpInUse {
                ip: spec.ip,
                owner: owner.spec.name.clone(),
            });
        }
        let ebpf_error = |source| RegistryError::Ebpf {
            name: spec.name.clone(),
            source: Box::new(source),
        };
        let accounting = PodAccounting::attach(&cgroup, spec.counted_port()).map_err(ebpf_error)?;
        let (steering, listeners_at_attach) = match spec.mode {
            DataplaneMode::EventDriven => {
                let (steering, taken) = steer(&spec, &cgroup).map_err(ebpf_error)?;
                (Some(steering), taken)
            }
            DataplaneMode::Userspace | DataplaneMode::Full => (None, 0),
        };
        let loopback = match spec.mode {
            DataplaneMode::Full => {
                Some(Loopback::attach(&cgroup, &[spec.port]).map_err(ebpf_error)?)
            }
            DataplaneMode::Userspace | DataplaneMode::EventDriven => None,
        };
        (self.watch)(&events_path(&cgroup), true);
        let pod = Pod {
            was_populated: populated(&cgroup).unwrap_or(false),
            spec,
            cgroup,
            source,
            accounting,
            steering,
            loopback,
            listeners_at_attach,
        };
        let info = info(&pod);
        tracing::info!(pod = %pod.spec.name, cgroup = %pod.cgroup.display(), mode = %pod.spec.mode, port = pod.spec.counted_port(), "attached request accounting");
        pods.insert(pod.spec.name.clone(), pod);
        Ok(info)
    }

    /// Whether the pod `name` is attached.
    pub fn contains(&self, name: &str) -> bool {
        self.lock().contains_key(name)
    }

    /// Detaches and forgets a pod.
    pub fn remove(&self, name: &str) -> Result<(), RegistryError> {
        let pod = self
            .lock()
            .remove(name)
            .ok_or_else(|| RegistryError::NotFound(name.to_owned()))?;
        self.release(pod, "unregistered");
        Ok(())
    }

    fn release(&self, pod: Pod, why: &str) {
        (self.watch)(&events_path(&pod.cgroup), false);
        let name = pod.spec.name.clone();
        if let Some(loopback) = pod.loopback {
            match loopback.detach() {
                Ok(()) => {
                    tracing::info!(pod = %name, reason = why, "detached the loopback redirect")
                }
                Err(error) => {
                    tracing::warn!(pod = %name, %error, "detaching the loopback redirect failed")
                }
            }
        }
        if let Some(steering) = pod.steering {
            match steering.detach() {
                Ok(()) => tracing::info!(pod = %name, reason = why, "detached steering"),
                Err(error) => tracing::warn!(pod = %name, %error, "detaching steering failed"),
            }
        }
        match pod.accounting.detach() {
            Ok(()) => tracing::info!(pod = %name, reason = why, "detached request accounting"),
            Err(error) => {
                tracing::warn!(pod = %name, %error, "detaching request accounting failed")
            }
        }
    }

    /// Re-checks the pod whose `cgroup.events` changed; detaches it if the
    /// cgroup is gone or emptied. Returns the detached pod's name.
    pub fn cgroup_changed(&self, events: &Path) -> Option<String> {
        let mut pods = self.lock();
        let name = pods
            .values()
            .find(|p| events_path(&p.cgroup) == events)?
            .spec
            .name
            .clone();
        let pod = pods.get_mut(&name)?;
        let gone = match populated(&pod.cgroup) {
            None => true,
            Some(true) => {
                pod.was_populated = true;
                false
            }
            Some(false) => pod.was_populated,
        };
        if !gone {
            return None;
        }
        let pod = pods.remove(&name)?;
        drop(pods);
        self.release(pod, "pod disappeared");
        Some(name)
    }

    /// The counters of the pod whose IP is `caller`.
    pub fn counters_for(&self, caller: IpAddr) -> Result<PodReport, RegistryError> {
        let caller = canonical(caller);
        let pods = self.lock();
        let pod = pods
            .values()
            .find(|p| canonical(p.spec.ip) == caller)
            .ok_or(RegistryError::UnknownCaller(caller))?;
        if pod.spec.is_h2c() {
            return Err(RegistryError::NotCounted(pod.spec.name.clone()));
        }
        let counters = pod
            .accounting
            .counters()
            .map_err(|source| RegistryError::Ebpf {
                name: pod.spec.name.clone(),
                source: Box::new(source),
            })?;
        Ok(PodReport {
            pod: pod.spec.name.clone(),
            counters: counters.into(),
        })
    }

    /// Every pod.
    pub fn list(&self) -> Vec<PodInfo> {
        let mut list: Vec<_> = self.lock().values().map(info).collect();
        list.sort_by(|a, b| a.spec.name.cmp(&b.spec.name));
        list
    }

    /// Names and specs of the pods from `source`.
    pub fn specs(&self, source: Source) -> HashMap<String, PodSpec> {
        self.lock()
            .values()
            .filter(|p| p.source == source)
            .map(|p| (p.spec.name.clone(), p.spec.clone()))
            .collect()
    }

    /// Detaches every pod.
    pub fn clear(&self) {
        let pods: Vec<Pod> = self.lock().drain().map(|(_, p)| p).collect();
        for pod in pods {
            self.release(pod, "agent stopping");
        }
    }
}

impl Drop for Registry {
    fn drop(&mut self) {
        self.clear();
    }
}

/// IPv4-mapped IPv6 callers (dual-stack sockets) compare as IPv4.
fn canonical(ip: IpAddr) -> IpAddr {
    match ip {
        IpAddr::V6(v6) => v6.to_ipv4_mapped().map_or(ip, IpAddr::V4),
        v4 => v4,
    }
}

fn info(pod: &Pod) -> PodInfo {
    let ids = pod.accounting.ids().ok();
    let mut program_ids = ids.as_ref().map(|i| i.programs.clone()).unwrap_or_default();
    let mut map_ids = ids.map(|i| i.maps).unwrap_or_default();
    let steering = pod.steering.as_ref();
    if let Some(ids) = steering.and_then(|s| s.ids().ok()) {
        program_ids.extend(ids.programs);
        map_ids.extend(ids.maps);
    }
    if let Some(ids) = pod.loopback.as_ref().and_then(|l| l.ids().ok()) {
        program_ids.extend(ids.programs);
        map_ids.extend(ids.maps);
    }
    map_ids.sort_unstable();
    map_ids.dedup();
    PodInfo {
        spec: pod.spec.clone(),
        cgroup: pod.cgroup.clone(),
        source: pod.source,
        program_ids,
        map_ids,
        steered: steering.and_then(|s| s.steered().ok()),
        bypassed: steering.and_then(|s| s.bypassed().ok()),
        listeners_taken: steering
            .and_then(|s| s.listeners_taken().ok())
            .map(|n| n + pod.listeners_at_attach),
    }
}

/// The source address this node uses toward `ip` (what kubelet probes of the
/// pod come from): the local address of a UDP socket "connected" to it (no
/// packet is sent).
fn node_address_toward(ip: IpAddr, port: u16) -> std::io::Result<IpAddr> {
    let any: IpAddr = if ip.is_ipv4() {
        std::net::Ipv4Addr::UNSPECIFIED.into()
    } else {
        std::net::Ipv6Addr::UNSPECIFIED.into()
    };
    let socket = std::net::UdpSocket::bind((any, 0))?;
    socket.connect((ip, port))?;
    Ok(socket.local_addr()?.ip())
}

/// Event-driven mode: attaches the steering of the serving port to the pod's
/// network namespace with the in-kernel listen hook on its cgroup, and makes
/// the user container's current listeners the target. Returns the steering
/// and the number of listeners taken now (none is fine: the user container
/// may not listen yet, the hook takes its socket at `listen(2)`).
fn steer(spec: &PodSpec, cgroup: &Path) -> Result<(Steering, u64), EbpfError> {
    let netns = spec.netns_path().unwrap_or_default();
    let mut steering = Steering::attach_pod(&netns, cgroup, spec.serving_port, spec.port)?;
    for entry in &spec.bypass {
        let prefix = if entry == crate::pod::BYPASS_NODE {
            match node_address_toward(spec.ip, spec.serving_port) {
                Ok(addr) => SourcePrefix {
                    len: if addr.is_ipv4() { 32 } else { 128 },
                    addr,
                },
                Err(error) => {
                    tracing::warn!(pod = %spec.name, %error, "cannot find the node's address toward the pod; kubelet probes will be steered");
                    continue;
                }
            }
        } else {
            match entry.parse() {
                Ok(p) => p,
                // Checked when the spec was parsed.
                Err(_) => continue,
            }
        };
        steering.bypass(prefix)?;
        tracing::info!(pod = %spec.name, %prefix, "connections from this source reach the sidecar");
    }
    let mut taken = 0;
    match spright_ebpf::steering::pod_listeners(cgroup, spec.port) {
        Ok(listeners) => {
            for listener in &listeners {
                steering.set_target(listener)?;
                taken += 1;
            }
        }
        Err(error) => {
            tracing::warn!(pod = %spec.name, %error, "cannot take the user container's listener now; steering starts at its next listen(2)");
        }
    }
    tracing::info!(pod = %spec.name, netns = %netns.display(), serving_port = spec.serving_port, user_port = spec.port, listeners = taken, "steering the serving port to the user container");
    Ok((steering, taken))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn mapped_ipv6_callers_compare_as_ipv4() {
        let mapped: IpAddr = "::ffff:10.0.0.2".parse().unwrap();
        assert_eq!(canonical(mapped), "10.0.0.2".parse::<IpAddr>().unwrap());
        let v6: IpAddr = "fd00::2".parse().unwrap();
        assert_eq!(canonical(v6), v6);
    }

    #[test]
    fn h2c_pods_get_no_counters() {
        let err = RegistryError::NotCounted("demo.h2c".into());
        assert_eq!(err.status(), http::StatusCode::NOT_FOUND);
        assert!(err.to_string().contains("h2c"));
    }

    #[test]
    fn unknown_callers_are_forbidden() {
        let registry = Registry::new("/sys/fs/cgroup/unified".into(), Box::new(|_, _| {}));
        let err = registry
            .counters_for("10.9.9.9".parse().unwrap())
            .unwrap_err();
        assert_eq!(err.status(), http::StatusCode::FORBIDDEN);
        assert_eq!(
            registry.remove("nope").unwrap_err().status(),
            http::StatusCode::NOT_FOUND
        );
    }

    #[test]
    fn the_node_address_toward_loopback_is_loopback() {
        let addr = node_address_toward("127.0.0.1".parse().unwrap(), 8012).unwrap();
        assert!(addr.is_loopback());
    }

    #[test]
    fn events_file_is_read() {
        assert_eq!(populated(Path::new("/nonexistent")), None);
    }
}
