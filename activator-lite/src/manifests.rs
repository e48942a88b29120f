//! Where Revisions and Endpoints come from. Knative's activator watches them with
//! informers (Revisions, core/v1 Endpoints); here a [`ClusterSource`] publishes a
//! [`ClusterState`] snapshot. [`ManifestDir`] reads a directory of Knative-shaped YAML
//! manifests and re-reads it on inotify events; a Kubernetes watch can implement the
//! same trait later.

use std::collections::{BTreeMap, BTreeSet, HashMap};
use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::time::Duration;

use notify::{RecursiveMode, Watcher};
use serde::Deserialize;
use tokio::sync::{mpsc, watch};

pub const LABEL_REVISION: &str = "serving.knative.dev/revision";
pub const LABEL_REVISION_UID: &str = "serving.knative.dev/revisionUID";
pub const LABEL_SERVICE: &str = "serving.knative.dev/service";
pub const LABEL_CONFIGURATION: &str = "serving.knative.dev/configuration";
pub const LABEL_SERVICE_TYPE: &str = "networking.internal.knative.dev/serviceType";

/// The Revision (and pod) annotation that selects the pods' data path (see
/// [`DataplaneMode`]).
pub const ANNOTATION_DATAPLANE_MODE: &str = spright_core::dataplane_mode::ANNOTATION;
/// The Endpoints port of queue-proxy's admin server (`http-queueadm`, serving's
/// `QueueAdminPortName`, exposed on the private service).
pub const PORT_NAME_QUEUE_ADMIN: &str = "http-queueadm";
/// queue-proxy's admin port (`networking.QueueAdminPort`) when the Endpoints do not name it.
pub const DEFAULT_QUEUE_ADMIN_PORT: u16 = 8022;

/// The data path of a revision's pods (annotation [`ANNOTATION_DATAPLANE_MODE`]; the
/// one type queue-proxy-ebpf and the node agent read too). How activator-lite uses it:
///
/// - `userspace` (default) and `full`: the sidecar proxies the serving port; pods are
///   probed there, as Knative does.
/// - `event-driven` (EPROXY): the kernel steers the serving port straight to the user
///   container, so a probe there would reach the user's app. Pods are probed on the
///   sidecar's admin port instead (the Endpoints port `http-queueadm`, default 8022;
///   same request, path `/`), while requests still go to the serving port. The sidecar's
///   breaker and timeouts are gone in that mode; the activator's own per-pod
///   containerConcurrency and the revision timeouts still hold.
pub use spright_core::dataplane_mode::DataplaneMode;

/// Default Revision timeout (`config-defaults` revision-timeout-seconds).
pub const DEFAULT_TIMEOUT: Duration = Duration::from_secs(300);

/// Errors from the manifest source.
#[derive(Debug, thiserror::Error)]
pub enum ManifestError {
    #[error("reading {path}: {source}")]
    Io {
        path: PathBuf,
        source: std::io::Error,
    },
    #[error("parsing {path}: {source}")]
    Yaml {
        path: PathBuf,
        source: serde_yaml::Error,
    },
    #[error("{path}: {reason}")]
    Invalid { path: PathBuf, reason: String },
    #[error("watching {path}: {source}")]
    Watch {
        path: PathBuf,
        source: notify::Error,
    },
}

/// Namespace/name of a revision.
#[derive(Debug, Clone, PartialEq, Eq, PartialOrd, Ord, Hash)]
pub struct RevisionKey {
    pub namespace: String,
    pub name: String,
}

impl RevisionKey {
    pub fn new(namespace: impl Into<String>, name: impl Into<String>) -> Self {
        Self {
            namespace: namespace.into(),
            name: name.into(),
        }
    }
}

impl std::fmt::Display for RevisionKey {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "{}/{}", self.namespace, self.name)
    }
}

/// What the activator needs from a Revision.
#[derive(Debug, Clone, PartialEq)]
pub struct RevisionSpec {
    pub key: RevisionKey,
    pub service: String,
    pub configuration: String,
    pub container_concurrency: u32,
    pub timeout: Duration,
    pub response_start_timeout: Option<Duration>,
    pub idle_timeout: Option<Duration>,
    /// The user container declares a port named `h2c`.
    pub h2c: bool,
    /// How the pods are probed (see [`DataplaneMode`]).
    pub dataplane_mode: DataplaneMode,
}

/// One subset of a private Endpoints object.
#[derive(Debug, Clone, PartialEq, Default)]
pub struct Subset {
    pub ready: Vec<String>,
    pub not_ready: Vec<String>,
    pub ports: Vec<(String, u16)>,
}

/// The private Endpoints of a revision (its pods).
#[derive(Debug, Clone, PartialEq, Default)]
pub struct PrivateEndpoints {
    pub subsets: Vec<Subset>,
}

impl PrivateEndpoints {
    /// `(ready, not_ready)` destinations `ip:port` on the port named `http` (`http2` for h2c).
    pub fn dests(&self, h2c: bool) -> (Vec<String>, Vec<String>) {
        let want = if h2c { "http2" } else { "http" };
        let mut ready = Vec::new();
        let mut not_ready = Vec::new();
        for s in &self.subsets {
            let Some(port) = s.ports.iter().find(|(n, _)| n == want).map(|(_, p)| *p) else {
                continue;
            };
            ready.extend(s.ready.iter().map(|ip| join_host_port(ip, port)));
            not_ready.extend(s.not_ready.iter().map(|ip| join_host_port(ip, port)));
        }
        ready.sort();
        ready.dedup();
        not_ready.sort();
        not_ready.dedup();
        not_ready.retain(|d| ready.binary_search(d).is_err());
        (ready, not_ready)
    }

    /// Where each destination of [`Self::dests`] is probed in event-driven mode: the same
    /// address on the subset's `http-queueadm` port (8022 when the subset has none).
    pub fn admin_dests(&self, h2c: bool) -> HashMap<String, String> {
        let want = if h2c { "http2" } else { "http" };
        let mut out = HashMap::new();
        for s in &self.subsets {
            let Some(port) = s.ports.iter().find(|(n, _)| n == want).map(|(_, p)| *p) else {
                continue;
            };
            let admin = s
                .ports
                .iter()
                .find(|(n, _)| n == PORT_NAME_QUEUE_ADMIN)
                .map_or(DEFAULT_QUEUE_ADMIN_PORT, |(_, p)| *p);
            for ip in s.ready.iter().chain(&s.not_ready) {
                out.insert(join_host_port(ip, port), join_host_port(ip, admin));
            }
        }
        out
    }
}

fn join_host_port(ip: &str, port: u16) -> String {
    if ip.contains(':') {
        format!("[{ip}]:{port}")
    } else {
        format!("{ip}:{port}")
    }
}

/// Everything the activator knows about the cluster.
#[derive(Debug, Clone, PartialEq, Default)]
pub struct ClusterState {
    pub revisions: BTreeMap<RevisionKey, Arc<RevisionSpec>>,
    /// Private Endpoints (label serviceType=Private, with a revisionUID label).
    pub private: BTreeMap<RevisionKey, PrivateEndpoints>,
    /// Ready addresses of the public Endpoints (serviceType=Public): the activators.
    pub public: BTreeMap<RevisionKey, Vec<String>>,
}

/// A source of cluster state snapshots.
pub trait ClusterSource: Send + Sync {
    /// The latest snapshot; changes are announced through the receiver.
    fn subscribe(&self) -> watch::Receiver<Arc<ClusterState>>;
}

#[derive(Deserialize, Default)]
#[serde(rename_all = "camelCase")]
struct Meta {
    #[serde(default)]
    name: String,
    #[serde(default)]
    namespace: Option<String>,
    #[serde(default)]
    labels: HashMap<String, serde_yaml::Value>,
    #[serde(default)]
    annotations: HashMap<String, serde_yaml::Value>,
}

impl Meta {
    /// A label value; scalars of any YAML type are read as their text.
    fn label(&self, k: &str) -> Option<String> {
        scalar(self.labels.get(k)?)
    }

    fn annotation(&self, k: &str) -> Option<String> {
        scalar(self.annotations.get(k)?)
    }
}

/// A scalar of any YAML type as its text.
fn scalar(v: &serde_yaml::Value) -> Option<String> {
    match v {
        serde_yaml::Value::String(s) => Some(s.clone()),
        serde_yaml::Value::Number(n) => Some(n.to_string()),
        serde_yaml::Value::Bool(b) => Some(b.to_string()),
        _ => None,
    }
}

#[derive(Deserialize)]
#[serde(rename_all = "camelCase")]
struct Doc {
    #[serde(default)]
    kind: String,
    #[serde(default)]
    api_version: String,
    #[serde(default)]
    metadata: Meta,
    #[serde(default)]
    spec: serde_yaml::Value,
    #[serde(default)]
    subsets: Vec<EpSubset>,
}

#[derive(Deserialize, Default)]
#[serde(rename_all = "camelCase")]
struct RevSpec {
    container_concurrency: Option<i64>,
    timeout_seconds: Option<i64>,
    response_start_timeout_seconds: Option<i64>,
    idle_timeout_seconds: Option<i64>,
    #[serde(default)]
    containers: Vec<Container>,
}

#[derive(Deserialize, Default)]
struct Container {
    #[serde(default)]
    ports: Vec<ContainerPort>,
}

#[derive(Deserialize, Default)]
struct ContainerPort {
    #[serde(default)]
    name: String,
}

#[derive(Deserialize, Default)]
#[serde(rename_all = "camelCase")]
struct EpSubset {
    #[serde(default)]
    addresses: Vec<EpAddress>,
    #[serde(default)]
    not_ready_addresses: Vec<EpAddress>,
    #[serde(default)]
    ports: Vec<EpPort>,
}

#[derive(Deserialize)]
struct EpAddress {
    ip: String,
}

#[derive(Deserialize)]
struct EpPort {
    #[serde(default)]
    name: String,
    port: u16,
}

/// Objects parsed from one file.
#[derive(Debug, Clone, Default, PartialEq)]
pub struct FileObjects {
    pub revisions: Vec<RevisionSpec>,
    pub private: Vec<(RevisionKey, PrivateEndpoints)>,
    pub public: Vec<(RevisionKey, Vec<String>)>,
}

fn secs(v: Option<i64>, field: &str, path: &Path) -> Result<Option<Duration>, ManifestError> {
    match v {
        None => Ok(None),
        Some(s) if s >= 0 => Ok(Some(Duration::from_secs(s as u64))),
        Some(s) => Err(ManifestError::Invalid {
            path: path.to_owned(),
            reason: format!("{field} must not be negative, got {s}"),
        }),
    }
}

/// Parses a (multi-document) YAML file. Objects of other kinds are ignored.
pub fn parse_manifests(text: &str, path: &Path) -> Result<FileObjects, ManifestError> {
    let mut out = FileObjects::default();
    for de in serde_yaml::Deserializer::from_str(text) {
        let value = serde_yaml::Value::deserialize(de).map_err(|source| ManifestError::Yaml {
            path: path.to_owned(),
            source,
        })?;
        if value.is_null() {
            continue;
        }
        let doc: Doc = serde_yaml::from_value(value).map_err(|source| ManifestError::Yaml {
            path: path.to_owned(),
            source,
        })?;
        let invalid = |reason: String| ManifestError::Invalid {
            path: path.to_owned(),
            reason,
        };
        let ns = doc
            .metadata
            .namespace
            .clone()
            .filter(|n| !n.is_empty())
            .unwrap_or_else(|| "default".to_owned());
        match (doc.kind.as_str(), doc.api_version.as_str()) {
            ("Revision", v) if v.starts_with("serving.knative.dev/") => {
                if doc.metadata.name.is_empty() {
                    return Err(invalid("Revision without metadata.name".into()));
                }
                let spec: RevSpec = if doc.spec.is_null() {
                    RevSpec::default()
                } else {
                    serde_yaml::from_value(doc.spec).map_err(|source| ManifestError::Yaml {
                        path: path.to_owned(),
                        source,
                    })?
                };
                let cc = spec.container_concurrency.unwrap_or(0);
                if !(0..=1000).contains(&cc) {
                    return Err(invalid(format!(
                        "containerConcurrency must be within 0..=1000, got {cc}"
                    )));
                }
                let label = |k: &str| doc.metadata.label(k).unwrap_or_default();
                let mode = doc.metadata.annotation(ANNOTATION_DATAPLANE_MODE);
                let dataplane_mode = match DataplaneMode::from_annotation(mode.as_deref()) {
                    Ok(m) => m,
                    Err(_) => {
                        // The sidecar refuses to start with such a value; its pods never
                        // get ready, whatever the activator probes.
                        tracing::warn!(
                            path = %path.display(),
                            revision = %doc.metadata.name,
                            value = mode.as_deref().unwrap_or(""),
                            "unknown {ANNOTATION_DATAPLANE_MODE}; probing as in userspace mode"
                        );
                        DataplaneMode::default()
                    }
                };
                out.revisions.push(RevisionSpec {
                    key: RevisionKey::new(ns, doc.metadata.name.clone()),
                    service: label(LABEL_SERVICE),
                    configuration: label(LABEL_CONFIGURATION),
                    container_concurrency: cc as u32,
                    timeout: secs(spec.timeout_seconds, "timeoutSeconds", path)?
                        .unwrap_or(DEFAULT_TIMEOUT),
                    response_start_timeout: secs(
                        spec.response_start_timeout_seconds,
                        "responseStartTimeoutSeconds",
                        path,
                    )?,
                    idle_timeout: secs(spec.idle_timeout_seconds, "idleTimeoutSeconds", path)?,
                    h2c: spec
                        .containers
                        .iter()
                        .flat_map(|c| &c.ports)
                        .any(|p| p.name == "h2c"),
                    dataplane_mode,
                });
            }
            ("Endpoints", "v1") => {
                let meta = &doc.metadata;
                let Some(rev) = meta.label(LABEL_REVISION) else {
                    continue;
                };
                let key = RevisionKey::new(ns, rev);
                match meta.label(LABEL_SERVICE_TYPE).as_deref() {
                    Some("Private") if meta.label(LABEL_REVISION_UID).is_some() => {
                        let subsets = doc
                            .subsets
                            .iter()
                            .map(|s| Subset {
                                ready: s.addresses.iter().map(|a| a.ip.clone()).collect(),
                                not_ready: s
                                    .not_ready_addresses
                                    .iter()
                                    .map(|a| a.ip.clone())
                                    .collect(),
                                ports: s.ports.iter().map(|p| (p.name.clone(), p.port)).collect(),
                            })
                            .collect();
                        out.private.push((key, PrivateEndpoints { subsets }));
                    }
                    Some("Public") => {
                        let mut ips: Vec<String> = doc
                            .subsets
                            .iter()
                            .flat_map(|s| s.addresses.iter().map(|a| a.ip.clone()))
                            .collect();
                        ips.sort();
                        ips.dedup();
                        out.public.push((key, ips));
                    }
                    _ => {}
                }
            }
            _ => {}
        }
    }
    Ok(out)
}

/// Merges per-file objects into one state (files in name order; later files win).
pub fn merge(files: &BTreeMap<PathBuf, FileObjects>) -> ClusterState {
    let mut st = ClusterState::default();
    for objs in files.values() {
        for r in &objs.revisions {
            st.revisions.insert(r.key.clone(), Arc::new(r.clone()));
        }
        for (k, e) in &objs.private {
            st.private.insert(k.clone(), e.clone());
        }
        for (k, ips) in &objs.public {
            st.public.insert(k.clone(), ips.clone());
        }
    }
    st
}

fn is_manifest(path: &Path) -> bool {
    let name = path.file_name().and_then(|n| n.to_str()).unwrap_or("");
    !name.starts_with('.') && (name.ends_with(".yaml") || name.ends_with(".yml"))
}

/// A directory of manifests, re-read on every inotify event.
pub struct ManifestDir {
    rx: watch::Receiver<Arc<ClusterState>>,
    _watcher: notify::RecommendedWatcher,
}

impl std::fmt::Debug for ManifestDir {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("ManifestDir").finish_non_exhaustive()
    }
}

struct DirState {
    dir: PathBuf,
    files: BTreeMap<PathBuf, FileObjects>,
}

impl DirState {
    /// Re-reads the directory. A file that fails to parse keeps its last good
    /// content (a half-written file must not make its revision vanish).
    fn reload(&mut self) -> Result<ClusterState, ManifestError> {
        let entries = std::fs::read_dir(&self.dir).map_err(|source| ManifestError::Io {
            path: self.dir.clone(),
            source,
        })?;
        let mut seen = Vec::new();
        for entry in entries.flatten() {
            let path = self.dir.join(entry.file_name());
            if !is_manifest(&path) || !path.is_file() {
                continue;
            }
            seen.push(path.clone());
            let parsed = std::fs::read_to_string(&path)
                .map_err(|source| ManifestError::Io {
                    path: path.clone(),
                    source,
                })
                .and_then(|text| parse_manifests(&text, &path));
            match parsed {
                Ok(objs) => {
                    self.files.insert(path, objs);
                }
                Err(e) => {
                    tracing::warn!(error = %e, "manifest skipped, keeping its last good version")
                }
            }
        }
        self.files.retain(|p, _| seen.contains(p));
        Ok(merge(&self.files))
    }

    /// Re-reads only the files an event named (created, written, renamed or removed).
    fn reload_paths(&mut self, paths: &BTreeSet<PathBuf>) -> ClusterState {
        for path in paths {
            let Some(name) = path.file_name() else {
                continue;
            };
            let path = self.dir.join(name);
            if !is_manifest(&path) {
                continue;
            }
            if !path.is_file() {
                self.files.remove(&path);
                continue;
            }
            let parsed = std::fs::read_to_string(&path)
                .map_err(|source| ManifestError::Io {
                    path: path.clone(),
                    source,
                })
                .and_then(|text| parse_manifests(&text, &path));
            match parsed {
                Ok(objs) => {
                    self.files.insert(path, objs);
                }
                Err(e) => {
                    tracing::warn!(error = %e, "manifest skipped, keeping its last good version")
                }
            }
        }
        merge(&self.files)
    }
}

impl ManifestDir {
    /// Loads `dir` and starts watching it. Must be called inside a Tokio runtime.
    pub fn start(dir: &Path) -> Result<Self, ManifestError> {
        let mut state = DirState {
            dir: dir.to_owned(),
            files: BTreeMap::new(),
        };
        let initial = state.reload()?;
        let (tx, rx) = watch::channel(Arc::new(initial));
        // Each event names the files it touched; `None` asks for a full re-read.
        let (ev_tx, mut ev_rx) = mpsc::unbounded_channel::<Option<Vec<PathBuf>>>();
        let mut watcher =
            notify::recommended_watcher(move |res: notify::Result<notify::Event>| match res {
                Ok(ev) if ev.kind.is_access() => {}
                Ok(ev) => {
                    let full = ev.paths.is_empty() || ev.need_rescan();
                    let _ = ev_tx.send((!full).then_some(ev.paths));
                }
                Err(e) => {
                    tracing::warn!(error = %e, "manifest watch error; re-reading the directory");
                    let _ = ev_tx.send(None);
                }
            })
            .map_err(|source| ManifestError::Watch {
                path: dir.to_owned(),
                source,
            })?;
        watcher
            .watch(dir, RecursiveMode::NonRecursive)
            .map_err(|source| ManifestError::Watch {
                path: dir.to_owned(),
                source,
            })?;
        tokio::spawn(async move {
            while let Some(first) = ev_rx.recv().await {
                // Coalesce a burst of events into one reload.
                let mut full = first.is_none();
                let mut paths: BTreeSet<PathBuf> = first.into_iter().flatten().collect();
                while let Ok(more) = ev_rx.try_recv() {
                    match more {
                        Some(p) => paths.extend(p),
                        None => full = true,
                    }
                }
                let st = if full {
                    match state.reload() {
                        Ok(st) => st,
                        Err(e) => {
                            tracing::error!(error = %e, "manifest directory unreadable");
                            continue;
                        }
                    }
                } else {
                    state.reload_paths(&paths)
                };
                tx.send_if_modified(|cur| {
                    if **cur == st {
                        false
                    } else {
                        *cur = Arc::new(st);
                        true
                    }
                });
            }
        });
        Ok(Self {
            rx,
            _watcher: watcher,
        })
    }
}

impl ClusterSource for ManifestDir {
    fn subscribe(&self) -> watch::Receiver<Arc<ClusterState>> {
        self.rx.clone()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    const SAMPLE: &str = r#"
apiVersion: serving.knative.dev/v1
kind: Revision
metadata:
  name: hello-00001
  namespace: default
  labels:
    serving.knative.dev/service: hello
    serving.knative.dev/configuration: hello
spec:
  containerConcurrency: 2
  timeoutSeconds: 30
  responseStartTimeoutSeconds: 10
  containers:
  - image: x
    ports:
    - containerPort: 8080
---
apiVersion: v1
kind: Endpoints
metadata:
  name: hello-00001-private
  namespace: default
  labels:
    serving.knative.dev/revision: hello-00001
    serving.knative.dev/revisionUID: 1234
    networking.internal.knative.dev/serviceType: Private
subsets:
- addresses:
  - ip: 10.0.0.2
  - ip: 10.0.0.1
  notReadyAddresses:
  - ip: 10.0.0.3
  ports:
  - name: http
    port: 8012
  - name: http-queueadm
    port: 8022
---
apiVersion: v1
kind: Endpoints
metadata:
  name: hello-00001
  namespace: default
  labels:
    serving.knative.dev/revision: hello-00001
    networking.internal.knative.dev/serviceType: Public
subsets:
- addresses:
  - ip: 10.1.0.9
  - ip: 10.1.0.8
  ports:
  - name: http
    port: 8012
---
apiVersion: v1
kind: ConfigMap
metadata:
  name: ignored
"#;

    #[test]
    fn parses_knative_shapes() {
        let objs = parse_manifests(SAMPLE, Path::new("x.yaml")).unwrap();
        assert_eq!(objs.revisions.len(), 1);
        let r = &objs.revisions[0];
        assert_eq!(r.key, RevisionKey::new("default", "hello-00001"));
        assert_eq!(r.container_concurrency, 2);
        assert_eq!(r.timeout, Duration::from_secs(30));
        assert_eq!(r.response_start_timeout, Some(Duration::from_secs(10)));
        assert_eq!(r.idle_timeout, None);
        assert_eq!(r.service, "hello");
        assert!(!r.h2c);
        let (ready, not_ready) = objs.private[0].1.dests(false);
        assert_eq!(ready, vec!["10.0.0.1:8012", "10.0.0.2:8012"]);
        assert_eq!(not_ready, vec!["10.0.0.3:8012"]);
        assert!(objs.private[0].1.dests(true).0.is_empty());
        assert_eq!(objs.public[0].1, vec!["10.1.0.8", "10.1.0.9"]);
    }

    #[test]
    fn dataplane_mode_and_admin_port() {
        let rev = |ann: &str| {
            let text = format!(
                "apiVersion: serving.knative.dev/v1\nkind: Revision\nmetadata:\n  name: r\n{ann}"
            );
            parse_manifests(&text, Path::new("m.yaml"))
                .unwrap()
                .revisions[0]
                .dataplane_mode
        };
        let ann = |v: &str| format!("  annotations:\n    spright.dev/dataplane-mode: {v}\n");
        assert_eq!(rev(""), DataplaneMode::Userspace);
        assert_eq!(rev(&ann("event-driven")), DataplaneMode::EventDriven);
        assert_eq!(rev(&ann("full")), DataplaneMode::Full);
        assert_eq!(rev(&ann("userspace")), DataplaneMode::Userspace);
        // Unknown values are logged and probed as in userspace mode.
        assert_eq!(rev(&ann("warp")), DataplaneMode::Userspace);

        let ep = PrivateEndpoints {
            subsets: vec![
                Subset {
                    ready: vec!["10.0.0.1".into()],
                    not_ready: vec!["fd00::2".into()],
                    ports: vec![("http".into(), 8012), (PORT_NAME_QUEUE_ADMIN.into(), 9022)],
                },
                Subset {
                    ready: vec!["10.0.0.3".into()],
                    not_ready: vec![],
                    ports: vec![("http".into(), 8012)],
                },
            ],
        };
        let admin = ep.admin_dests(false);
        assert_eq!(admin["10.0.0.1:8012"], "10.0.0.1:9022");
        assert_eq!(admin["[fd00::2]:8012"], "[fd00::2]:9022");
        assert_eq!(admin["10.0.0.3:8012"], "10.0.0.3:8022");
        assert!(ep.admin_dests(true).is_empty());
    }

    #[test]
    fn bad_input_is_an_error_not_a_panic() {
        for bad in [
            "kind: Revision\napiVersion: serving.knative.dev/v1\nmetadata: {name: a}\nspec: {containerConcurrency: -1}",
            "kind: Revision\napiVersion: serving.knative.dev/v1\nmetadata: {name: a}\nspec: {timeoutSeconds: x}",
            "kind: Revision\napiVersion: serving.knative.dev/v1\nmetadata: {}",
            "{[",
            "kind: Endpoints\napiVersion: v1\nsubsets: 7",
        ] {
            assert!(parse_manifests(bad, Path::new("b.yaml")).is_err(), "{bad}");
        }
    }

    #[test]
    fn random_input_never_panics() {
        use rand::{Rng, SeedableRng};
        let mut rng = rand::rngs::StdRng::seed_from_u64(3);
        let bytes = SAMPLE.as_bytes();
        for _ in 0..300 {
            let mut b = bytes.to_vec();
            for _ in 0..rng.gen_range(1..20) {
                let i = rng.gen_range(0..b.len());
                b[i] = rng.gen_range(0x20..0x7f);
            }
            if let Ok(s) = std::str::from_utf8(&b) {
                let _ = parse_manifests(s, Path::new("r.yaml"));
            }
        }
    }

    #[tokio::test]
    async fn directory_changes_are_followed() {
        let dir = std::env::temp_dir().join(format!("manifests-unit-{}", std::process::id()));
        let _ = std::fs::remove_dir_all(&dir);
        std::fs::create_dir_all(&dir).unwrap();
        std::fs::write(dir.join("a.yaml"), SAMPLE).unwrap();
        let src = ManifestDir::start(&dir).unwrap();
        let mut rx = src.subscribe();
        assert_eq!(rx.borrow_and_update().revisions.len(), 1);
        let wait = |rx: &mut watch::Receiver<Arc<ClusterState>>| {
            let mut rx = rx.clone();
            async move {
                tokio::time::timeout(Duration::from_secs(5), rx.changed())
                    .await
                    .expect("no change seen")
                    .unwrap();
                rx.borrow_and_update().clone()
            }
        };
        // A second revision appears (written then renamed into place).
        let second = SAMPLE.replace("hello-00001", "hello-00002");
        std::fs::write(dir.join(".b.tmp"), &second).unwrap();
        std::fs::rename(dir.join(".b.tmp"), dir.join("b.yaml")).unwrap();
        let st = wait(&mut rx).await;
        assert_eq!(st.revisions.len(), 2);
        // A broken edit keeps the last good content; removal drops it.
        std::fs::write(dir.join("b.yaml"), "{[").unwrap();
        std::fs::remove_file(dir.join("b.yaml")).unwrap();
        let mut st = wait(&mut rx).await;
        while st.revisions.len() != 1 {
            st = wait(&mut rx).await;
        }
        assert!(
            st.revisions
                .contains_key(&RevisionKey::new("default", "hello-00001"))
        );
        let _ = std::fs::remove_dir_all(&dir);
    }
}
