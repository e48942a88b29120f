//! Cluster mode: the pods come from the Kubernetes API.
//!
//! The agent watches the Pods scheduled on its node (`fieldSelector=spec.nodeName=$NODE_NAME`)
//! and registers each running pod whose `queue-proxy` container runs queue-proxy-ebpf (its image
//! contains `--image-match`, default `queue-proxy-ebpf`). From the Pod object it takes:
//!
//! - the name `<namespace>.<name>` (unique on the node);
//! - the IP `status.podIP`;
//! - `USER_PORT` and `QUEUE_SERVING_PORT` from the queue-proxy container's environment;
//! - the mode from the annotation `spright.dev/dataplane-mode` (event-driven pods also get
//!   `"bypass": ["node"]`, so kubelet probes reach the sidecar);
//! - the cgroup: the directory below the cgroup root named after the pod UID (cgroupfs driver
//!   `pod<uid>`, systemd driver `kubepods-<qos>-pod<uid_with_underscores>.slice`), and one of
//!   its processes for the network namespace.
//!
//! A pod is unregistered when it is deleted or leaves the Running phase; a changed pod is
//! re-attached. The agent needs RBAC to get, list and watch Pods.
//!
//! The translation from Pod to [`PodSpec`] and the cgroup lookup are unit-tested. No API server
//! runs in CI; the watch was run by hand against a real kube-apiserver (see the README).

use std::collections::BTreeMap;
use std::path::{Path, PathBuf};
use std::sync::Arc;

use futures::TryStreamExt;
use k8s_openapi::api::core::v1::Pod;
use kube::runtime::watcher;

use crate::pod::{BYPASS_NODE, DEFAULT_SERVING_PORT, DataplaneMode, H2C_SERVING_PORT, PodSpec};
use crate::registry::{Registry, Source};
use crate::retry::Retries;

/// The pod annotation with the revision's data path.
pub const MODE_ANNOTATION: &str = spright_core::dataplane_mode::ANNOTATION;
/// Knative's name of the sidecar container.
pub const QUEUE_CONTAINER: &str = "queue-proxy";
/// Knative's default user port.
const DEFAULT_USER_PORT: u16 = 8080;

/// Why a pod on this node is not registered.
#[derive(Debug, thiserror::Error, PartialEq, Eq)]
pub enum PodError {
    /// Not one of ours (no queue-proxy-ebpf container): ignored silently.
    #[error("no queue-proxy-ebpf container")]
    NotOurs,
    /// Not running yet, or no IP yet: tried again on its next change.
    #[error("not running yet")]
    NotRunning,
    /// Bad annotation or environment.
    #[error("{0}")]
    Invalid(String),
    /// Its cgroup or processes are not found.
    #[error("{0}")]
    Cgroup(String),
}

/// The registration of `pod`, or why there is none. `cgroup_root` is the cgroup v2 mount.
pub fn pod_spec(pod: &Pod, image_match: &str, cgroup_root: &Path) -> Result<PodSpec, PodError> {
    let spec = pod.spec.as_ref().ok_or(PodError::NotOurs)?;
    let queue = spec
        .containers
        .iter()
        .find(|c| {
            c.name == QUEUE_CONTAINER && c.image.as_deref().is_some_and(|i| i.contains(image_match))
        })
        .ok_or(PodError::NotOurs)?;
    let status = pod.status.as_ref().ok_or(PodError::NotRunning)?;
    if status.phase.as_deref() != Some("Running") {
        return Err(PodError::NotRunning);
    }
    let ip = status
        .pod_ip
        .as_deref()
        .ok_or(PodError::NotRunning)?
        .parse()
        .map_err(|_| PodError::Invalid("status.podIP is not an IP address".into()))?;
    let env: BTreeMap<&str, &str> = queue
        .env
        .iter()
        .flatten()
        .filter_map(|e| Some((e.name.as_str(), e.value.as_deref()?)))
        .collect();
    let port_env = |name: &str, default: u16| -> Result<u16, PodError> {
        env.get(name).map_or(Ok(default), |v| {
            v.parse()
                .map_err(|_| PodError::Invalid(format!("{name}={v:?} is not a port")))
        })
    };
    let meta = &pod.metadata;
    let asked = DataplaneMode::from_annotation(
        meta.annotations
            .as_ref()
            .and_then(|a| a.get(MODE_ANNOTATION))
            .map(String::as_str),
    )
    .map_err(|e| PodError::Invalid(format!("annotation {e}")))?;
    let uid = meta
        .uid
        .as_deref()
        .ok_or_else(|| PodError::Invalid("no metadata.uid".into()))?;
    let cgroup = find_pod_cgroup(cgroup_root, uid)
        .ok_or_else(|| PodError::Cgroup(format!("no cgroup for pod uid {uid}")))?;
    let pid = first_pid(&cgroup)
        .ok_or_else(|| PodError::Cgroup(format!("no process in {}", cgroup.display())))?;
    let serving_port = port_env("QUEUE_SERVING_PORT", DEFAULT_SERVING_PORT)?;
    let h2c = serving_port == H2C_SERVING_PORT || serves_h2c(spec);
    let name = format!(
        "{}.{}",
        meta.namespace.as_deref().unwrap_or("default"),
        meta.name.as_deref().unwrap_or_default()
    );
    let mode = userspace_if_h2c(&name, asked, h2c);
    let spec = PodSpec {
        name,
        ip,
        port: port_env("USER_PORT", DEFAULT_USER_PORT)?,
        cgroup: Some(cgroup),
        pid: Some(pid),
        netns: None,
        mode,
        // An h2c revision is counted by its sidecar: `PodSpec::is_h2c` marks it so.
        serving_port: if h2c { H2C_SERVING_PORT } else { serving_port },
        bypass: if mode == DataplaneMode::EventDriven {
            vec![BYPASS_NODE.to_owned()]
        } else {
            Vec::new()
        },
    };
    spec.check().map_err(|e| PodError::Invalid(e.to_string()))?;
    Ok(spec)
}

/// Whether the revision speaks h2c: Knative names the user container's port `h2c` then.
fn serves_h2c(spec: &k8s_openapi::api::core::v1::PodSpec) -> bool {
    spec.containers
        .iter()
        .filter(|c| c.name != QUEUE_CONTAINER)
        .flat_map(|c| c.ports.iter().flatten())
        .any(|p| p.name.as_deref() == Some("h2c"))
}

/// The mode a pod runs in: the kernel counts only HTTP/1.x, so an h2c revision that asks for
/// `full` or `event-driven` stays in `userspace` mode (its sidecar counts the requests) and
/// the agent says so.
pub fn userspace_if_h2c(pod: &str, asked: DataplaneMode, h2c: bool) -> DataplaneMode {
    if h2c && asked != DataplaneMode::Userspace {
        tracing::warn!(%pod, mode = %asked, "h2c revision: the kernel does not count HTTP/2 requests, so the pod runs in userspace mode and its sidecar counts them (it would report no requests otherwise)");
        DataplaneMode::Userspace
    } else {
        asked
    }
}

/// The cgroup directory of the pod with this UID: `pod<uid>` (cgroupfs driver) or
/// `*-pod<uid with '_'>.slice` (systemd driver), searched a few levels below the root.
pub fn find_pod_cgroup(root: &Path, uid: &str) -> Option<PathBuf> {
    let cgroupfs = format!("pod{uid}");
    let systemd = format!("pod{}.slice", uid.replace('-', "_"));
    let mut level = vec![root.to_owned()];
    for _ in 0..4 {
        let mut next = Vec::new();
        for dir in &level {
            for entry in std::fs::read_dir(dir).into_iter().flatten().flatten() {
                if !entry.file_type().is_ok_and(|t| t.is_dir()) {
                    continue;
                }
                let name = entry.file_name();
                let name = name.to_string_lossy();
                if name == cgroupfs || name.ends_with(&systemd) {
                    return Some(entry.path());
                }
                next.push(entry.path());
            }
        }
        level = next;
    }
    None
}

/// A process of the cgroup or of its descendants (the containers' cgroups).
fn first_pid(cgroup: &Path) -> Option<u32> {
    spright_ebpf::steering::cgroup_pids(cgroup)
        .ok()?
        .into_iter()
        .next()
}

/// Watches this node's pods until the stream ends, keeping the registry in step.
pub async fn run(
    registry: Arc<Registry>,
    retries: Arc<Retries>,
    node_name: String,
    image_match: String,
    cgroup_root: PathBuf,
) -> anyhow::Result<()> {
    let client = kube::Client::try_default()
        .await
        .map_err(|e| anyhow::anyhow!("connecting to the Kubernetes API: {e}"))?;
    let pods: kube::Api<Pod> = kube::Api::all(client);
    let config = watcher::Config::default().fields(&format!("spec.nodeName={node_name}"));
    tracing::info!(node = %node_name, "watching this node's pods");
    let mut known: BTreeMap<String, PodSpec> = BTreeMap::new();
    let mut stream = std::pin::pin!(watcher(pods, config));
    let mut listed: Option<BTreeMap<String, PodSpec>> = None;
    // Pods of the initial list that could not be translated (no cgroup yet...).
    let mut failed: Vec<(Pod, String)> = Vec::new();
    while let Some(event) = stream
        .try_next()
        .await
        .map_err(|e| anyhow::anyhow!("watching pods: {e}"))?
    {
        match event {
            watcher::Event::Init => {
                listed = Some(BTreeMap::new());
                failed.clear();
            }
            watcher::Event::InitApply(pod) => match wanted(&pod, &image_match, &cgroup_root) {
                Wanted::Spec(spec) => {
                    if let Some(seen) = listed.as_mut() {
                        seen.insert(spec.name.clone(), spec);
                    }
                }
                Wanted::Failed(error) => failed.push((pod, error)),
                Wanted::No => {}
            },
            watcher::Event::InitDone => {
                let desired = listed.take().unwrap_or_default();
                let gone: Vec<String> = known
                    .keys()
                    .filter(|k| !desired.contains_key(*k))
                    .cloned()
                    .collect();
                for name in gone {
                    forget(&registry, &retries, &mut known, &name);
                }
                for (_, spec) in desired {
                    apply(&registry, &retries, &mut known, spec);
                }
                for (pod, error) in std::mem::take(&mut failed) {
                    retry_later(&retries, &pod, &error, &image_match, &cgroup_root);
                }
            }
            watcher::Event::Apply(pod) => match wanted(&pod, &image_match, &cgroup_root) {
                Wanted::Spec(spec) => apply(&registry, &retries, &mut known, spec),
                Wanted::No => forget(&registry, &retries, &mut known, &pod_name(&pod)),
                Wanted::Failed(error) => {
                    forget(&registry, &retries, &mut known, &pod_name(&pod));
                    retry_later(&retries, &pod, &error, &image_match, &cgroup_root);
                }
            },
            watcher::Event::Delete(pod) => {
                forget(&registry, &retries, &mut known, &pod_name(&pod));
            }
        }
    }
    Ok(())
}

fn pod_name(pod: &Pod) -> String {
    format!(
        "{}.{}",
        pod.metadata.namespace.as_deref().unwrap_or("default"),
        pod.metadata.name.as_deref().unwrap_or_default()
    )
}

/// What a Pod event asks of the agent.
enum Wanted {
    /// Attach (or keep) this registration.
    Spec(PodSpec),
    /// Not ours, or not running: detach.
    No,
    /// Ours, but its registration cannot be built yet (e.g. no cgroup).
    Failed(String),
}

fn wanted(pod: &Pod, image_match: &str, cgroup_root: &Path) -> Wanted {
    match pod_spec(pod, image_match, cgroup_root) {
        Ok(spec) => Wanted::Spec(spec),
        Err(PodError::NotOurs | PodError::NotRunning) => Wanted::No,
        Err(error) => Wanted::Failed(error.to_string()),
    }
}

/// Retries a pod whose registration could not be built, translating it
/// again each time (its cgroup or process may appear).
fn retry_later(
    retries: &Arc<Retries>,
    pod: &Pod,
    error: &str,
    image_match: &str,
    cgroup_root: &Path,
) {
    let name = pod_name(pod);
    let (pod, image_match, root) = (pod.clone(), image_match.to_owned(), cgroup_root.to_owned());
    let make = Arc::new(move || pod_spec(&pod, &image_match, &root).map_err(|e| e.to_string()));
    retries.retry(&name, Source::Cluster, error, make);
}

/// Makes `spec` the wanted state of its pod: `known` holds what the API asks
/// for, attached or waiting for a retry.
fn apply(
    registry: &Registry,
    retries: &Arc<Retries>,
    known: &mut BTreeMap<String, PodSpec>,
    spec: PodSpec,
) {
    let name = spec.name.clone();
    if known.get(&name) == Some(&spec) && retries.is_pending(&name) {
        return;
    }
    let attached = registry.specs(Source::Cluster).remove(&name);
    retries.cancel(&name);
    if attached.as_ref() == Some(&spec) {
        // Attached already (possibly by a retry that built it).
        known.insert(name, spec);
        return;
    }
    // Changed, or its retries ran out: any event of the pod tries again.
    if known.remove(&name).is_some() || attached.is_some() {
        let _ = registry.remove(&name);
    }
    known.insert(name, spec.clone());
    retries.attach(spec, Source::Cluster);
}

fn forget(
    registry: &Registry,
    retries: &Retries,
    known: &mut BTreeMap<String, PodSpec>,
    name: &str,
) {
    retries.cancel(name);
    let attached = registry.specs(Source::Cluster).contains_key(name);
    if known.remove(name).is_some() || attached {
        let _ = registry.remove(name);
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn pod(image: &str, annotations: &str, phase: &str) -> Pod {
        let json = format!(
            r#"{{
  "metadata": {{"name": "hello-00001-deployment-abc", "namespace": "demo",
                "uid": "1234-abcd", "annotations": {annotations}}},
  "spec": {{"containers": [
    {{"name": "user-container", "image": "example/hello"}},
    {{"name": "queue-proxy", "image": "{image}",
     "env": [{{"name": "USER_PORT", "value": "8081"}},
             {{"name": "QUEUE_SERVING_PORT", "value": "8012"}},
             {{"name": "SERVING_POD", "valueFrom": {{"fieldRef": {{"fieldPath": "metadata.name"}}}}}}]}}
  ]}},
  "status": {{"phase": "{phase}", "podIP": "10.244.1.7"}}
}}"#
        );
        serde_json::from_str(&json).expect("pod json")
    }

    /// A fake cgroup tree private to one test: tests run in parallel threads of one
    /// process, so the directory is named after the test as well as the process.
    fn cgroup_tree(test: &str, systemd: bool) -> (PathBuf, PathBuf) {
        let root = std::env::temp_dir().join(format!(
            "spright-cluster-test-{}-{test}-{systemd}",
            std::process::id()
        ));
        let _ = std::fs::remove_dir_all(&root);
        let pod = if systemd {
            root.join(
                "kubepods.slice/kubepods-burstable.slice/kubepods-burstable-pod1234_abcd.slice",
            )
        } else {
            root.join("kubepods/burstable/pod1234-abcd")
        };
        std::fs::create_dir_all(pod.join("container1")).unwrap();
        std::fs::write(pod.join("cgroup.procs"), "").unwrap();
        std::fs::write(pod.join("container1/cgroup.procs"), "4242\n").unwrap();
        (root, pod)
    }

    #[test]
    fn pod_cgroups_are_found_for_both_drivers() {
        for systemd in [false, true] {
            let (root, pod) = cgroup_tree("drivers", systemd);
            assert_eq!(find_pod_cgroup(&root, "1234-abcd"), Some(pod.clone()));
            assert_eq!(find_pod_cgroup(&root, "9999"), None);
            assert_eq!(first_pid(&pod), Some(4242));
            let _ = std::fs::remove_dir_all(&root);
        }
    }

    #[test]
    fn a_knative_pod_becomes_a_registration() {
        let (root, cgroup) = cgroup_tree("registration", false);
        let p = pod(
            "registry.example/queue-proxy-ebpf:v1",
            r#"{"spright.dev/dataplane-mode": "event-driven"}"#,
            "Running",
        );
        let spec = pod_spec(&p, "queue-proxy-ebpf", &root).unwrap();
        assert_eq!(spec.name, "demo.hello-00001-deployment-abc");
        assert_eq!(spec.ip.to_string(), "10.244.1.7");
        assert_eq!((spec.port, spec.serving_port), (8081, 8012));
        assert_eq!(spec.mode, DataplaneMode::EventDriven);
        assert_eq!(spec.bypass, vec!["node".to_owned()]);
        assert_eq!(spec.cgroup, Some(cgroup));
        assert_eq!(spec.pid, Some(4242));

        let userspace = pod("registry.example/queue-proxy-ebpf:v1", "{}", "Running");
        let spec = pod_spec(&userspace, "queue-proxy-ebpf", &root).unwrap();
        assert_eq!(
            (spec.mode, spec.bypass.len()),
            (DataplaneMode::Userspace, 0)
        );
        let _ = std::fs::remove_dir_all(&root);
    }

    #[test]
    fn h2c_pods_fall_back_to_userspace_mode() {
        let (root, _) = cgroup_tree("h2c", false);
        for mode in ["full", "event-driven"] {
            let annotations = format!(r#"{{"spright.dev/dataplane-mode": "{mode}"}}"#);
            let mut p = pod("x/queue-proxy-ebpf", &annotations, "Running");
            let json = serde_json::to_string(&p).unwrap().replace("8012", "8013");
            p = serde_json::from_str(&json).unwrap();
            let spec = pod_spec(&p, "queue-proxy-ebpf", &root).unwrap();
            assert_eq!(
                (spec.mode, spec.serving_port),
                (DataplaneMode::Userspace, 8013)
            );
            assert!(spec.bypass.is_empty() && spec.is_h2c());

            // The user container's port named h2c says the same.
            let mut p = pod("x/queue-proxy-ebpf", &annotations, "Running");
            let user = &mut p.spec.as_mut().unwrap().containers[0];
            user.ports = Some(vec![
                serde_json::from_str(r#"{"name": "h2c", "containerPort": 8080}"#).unwrap(),
            ]);
            let spec = pod_spec(&p, "queue-proxy-ebpf", &root).unwrap();
            assert_eq!(spec.mode, DataplaneMode::Userspace);
            assert!(spec.is_h2c());
        }
        assert_eq!(
            userspace_if_h2c("p", DataplaneMode::Full, false),
            DataplaneMode::Full
        );
        assert_eq!(
            userspace_if_h2c("p", DataplaneMode::EventDriven, true),
            DataplaneMode::Userspace
        );
        let _ = std::fs::remove_dir_all(&root);
    }

    #[test]
    fn other_pods_are_skipped_and_bad_ones_named() {
        let root = Path::new("/nonexistent");
        let stock = pod("gcr.io/knative-releases/queue", "{}", "Running");
        assert_eq!(
            pod_spec(&stock, "queue-proxy-ebpf", root),
            Err(PodError::NotOurs)
        );
        let pending = pod("x/queue-proxy-ebpf", "{}", "Pending");
        assert_eq!(
            pod_spec(&pending, "queue-proxy-ebpf", root),
            Err(PodError::NotRunning)
        );
        let bad = pod(
            "x/queue-proxy-ebpf",
            r#"{"spright.dev/dataplane-mode": "fast"}"#,
            "Running",
        );
        assert!(matches!(
            pod_spec(&bad, "queue-proxy-ebpf", root),
            Err(PodError::Invalid(m)) if m.contains("fast")
        ));
        let no_cgroup = pod("x/queue-proxy-ebpf", "{}", "Running");
        assert!(matches!(
            pod_spec(&no_cgroup, "queue-proxy-ebpf", root),
            Err(PodError::Cgroup(_))
        ));
    }
}
