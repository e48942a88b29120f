//! A pod as the agent knows it: the registration / manifest format.
//!
//! ```json
//! {"name": "hello-00001-deployment-5d8f-abcde", "ip": "10.1.0.2", "port": 8080,
//!  "cgroup": "/sys/fs/cgroup/unified/kubepods/pod1234", "netns": "/var/run/netns/pod1234"}
//! ```
//!
//! `port` is the user container's port (`USER_PORT`). `cgroup` is the pod's
//! cgroup v2 directory; instead of it, `pid` (any process of the pod) lets the
//! agent read the cgroup from `/proc/<pid>/cgroup`.
//!
//! `mode` is the revision's data path (the pod annotation
//! `spright.dev/dataplane-mode`): `userspace` (default) counts the requests
//! the sidecar forwards to `port`; `full` short-circuits the sidecar's hop to
//! `port` through a sockmap (`spright_ebpf::loopback`) and counts requests on
//! the serving port `serving_port` (default 8012, `QUEUE_SERVING_PORT`), since
//! redirected bytes skip the TCP stack; `event-driven` steers the serving port
//! in the kernel to the user container's socket listening on `port` and counts
//! requests on the serving port; `bypass` lists source prefixes left to the
//! sidecar (`"node"` is the node's address toward the pod, where kubelet probes
//! come from). Event-driven mode needs the pod's network namespace: `netns`,
//! or `/proc/<pid>/ns/net` when `pid` is given. Elsewhere `netns` is optional
//! and only checked for existence.

use std::net::IpAddr;
use std::path::{Path, PathBuf};

use serde::{Deserialize, Serialize};

/// Longest pod name accepted (Kubernetes' limit for object names).
pub const MAX_NAME_LEN: usize = 253;

/// A pod registration as sent or written by the operator.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct PodSpec {
    /// Pod name (unique on the node).
    pub name: String,
    /// Pod IP: the only source address allowed to read this pod's counters.
    pub ip: IpAddr,
    /// Serving port counted.
    pub port: u16,
    /// cgroup v2 directory of the pod.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub cgroup: Option<PathBuf>,
    /// A process of the pod (alternative to `cgroup`).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub pid: Option<u32>,
    /// Network namespace path of the pod.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub netns: Option<PathBuf>,
    /// The revision's data path.
    #[serde(default)]
    pub mode: DataplaneMode,
    /// The sidecar's serving port (event-driven mode steers it).
    #[serde(default = "default_serving_port")]
    pub serving_port: u16,
    /// Event-driven mode: source prefixes whose connections are not steered
    /// but reach the sidecar (`"node"`: the node's own address toward the pod,
    /// where kubelet probes come from).
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub bypass: Vec<String>,
}

/// The `bypass` entry naming the node's address toward the pod.
pub const BYPASS_NODE: &str = "node";

/// Knative's `QUEUE_SERVING_PORT` for HTTP/1 revisions.
pub const DEFAULT_SERVING_PORT: u16 = 8012;

/// Knative's `QUEUE_SERVING_PORT` for h2c revisions (the user container port named `h2c`).
pub const H2C_SERVING_PORT: u16 = 8013;

fn default_serving_port() -> u16 {
    DEFAULT_SERVING_PORT
}

/// A revision's data path, as in the annotation `spright.dev/dataplane-mode` (the type
/// spright-core shares with the sidecar and activator-lite). In a pod specification it is
/// `"mode"`: `userspace` (default; the agent counts requests to the user port), `full` or
/// `event-driven`.
pub use spright_core::dataplane_mode::DataplaneMode;

/// Why a pod specification is refused.
#[derive(Debug, thiserror::Error, PartialEq, Eq)]
pub enum SpecError {
    /// JSON did not parse or had unknown fields.
    #[error("invalid pod specification: {0}")]
    Json(String),
    /// Bad name.
    #[error(
        "invalid pod name {0:?}: use 1 to 253 characters of lower-case letters, digits, '-' and '.'"
    )]
    Name(String),
    /// Port 0.
    #[error("invalid serving port 0")]
    Port,
    /// Event-driven mode with the serving port equal to the user port.
    #[error("pod {0}: in event-driven mode serving_port and port must differ")]
    SamePorts(String),
    /// A `bypass` entry that is neither `node` nor an IP prefix.
    #[error("pod {name}: bypass: {reason}")]
    Bypass {
        /// Pod.
        name: String,
        /// What is wrong.
        reason: String,
    },
    /// Event-driven mode without a way to the network namespace.
    #[error("pod {0}: event-driven mode needs the pod's network namespace (`netns` or `pid`)")]
    NoNetns(String),
    /// `full` or `event-driven` on an h2c revision: the kernel counts only HTTP/1.x, so the
    /// autoscaler would see no requests.
    #[error(
        "pod {name}: mode {mode} is for HTTP/1 revisions, but serving_port {H2C_SERVING_PORT} is an h2c revision's and the kernel does not count HTTP/2 requests (its Stat would stay at zero); register it with mode userspace"
    )]
    H2c {
        /// Pod.
        name: String,
        /// Mode asked for.
        mode: DataplaneMode,
    },
    /// Neither cgroup nor pid.
    #[error("pod {0}: give its cgroup v2 directory (`cgroup`) or one of its processes (`pid`)")]
    NoCgroup(String),
    /// cgroup path not absolute or not below the cgroup root.
    #[error("pod {name}: cgroup {} is not a directory below the cgroup v2 root {}", path.display(), root.display())]
    CgroupOutsideRoot {
        /// Pod.
        name: String,
        /// Given path.
        path: PathBuf,
        /// Configured root.
        root: PathBuf,
    },
    /// /proc/<pid>/cgroup unreadable.
    #[error("pod {name}: cannot read the cgroup of process {pid}: {detail}")]
    Pid {
        /// Pod.
        name: String,
        /// Process.
        pid: u32,
        /// Cause.
        detail: String,
    },
    /// netns path missing.
    #[error("pod {name}: network namespace {} does not exist", path.display())]
    Netns {
        /// Pod.
        name: String,
        /// Given path.
        path: PathBuf,
    },
}

impl PodSpec {
    /// Parses and checks a JSON specification (no file-system checks).
    pub fn parse(bytes: &[u8]) -> Result<Self, SpecError> {
        let spec: Self =
            serde_json::from_slice(bytes).map_err(|e| SpecError::Json(e.to_string()))?;
        spec.check()?;
        Ok(spec)
    }

    /// Whether the revision serves h2c (`serving_port` 8013). The kernel does not count its
    /// requests: it runs in userspace mode and the agent keeps no counters for it.
    pub fn is_h2c(&self) -> bool {
        self.serving_port == H2C_SERVING_PORT
    }

    /// Checks the fields that need no file system.
    pub fn check(&self) -> Result<(), SpecError> {
        if !valid_name(&self.name) {
            return Err(SpecError::Name(self.name.clone()));
        }
        if self.port == 0 || self.serving_port == 0 {
            return Err(SpecError::Port);
        }
        if self.is_h2c() && self.mode != DataplaneMode::Userspace {
            return Err(SpecError::H2c {
                name: self.name.clone(),
                mode: self.mode,
            });
        }
        if self.mode == DataplaneMode::EventDriven {
            if self.port == self.serving_port {
                return Err(SpecError::SamePorts(self.name.clone()));
            }
            if self.netns.is_none() && self.pid.is_none() {
                return Err(SpecError::NoNetns(self.name.clone()));
            }
        }
        for entry in &self.bypass {
            if entry != BYPASS_NODE {
                entry
                    .parse::<spright_ebpf::steering::SourcePrefix>()
                    .map_err(|reason| SpecError::Bypass {
                        name: self.name.clone(),
                        reason: format!("{reason}, or \"{BYPASS_NODE}\""),
                    })?;
            }
        }
        if self.cgroup.is_none() && self.pid.is_none() {
            return Err(SpecError::NoCgroup(self.name.clone()));
        }
        Ok(())
    }

    /// The pod's cgroup directory: `cgroup` if given (it must lie below
    /// `root`), else the v2 cgroup of `pid`. Also checks `netns`.
    pub fn resolve_cgroup(&self, root: &Path) -> Result<PathBuf, SpecError> {
        if let Some(netns) = &self.netns
            && !netns.exists()
        {
            return Err(SpecError::Netns {
                name: self.name.clone(),
                path: netns.clone(),
            });
        }
        let path = match (&self.cgroup, self.pid) {
            (Some(path), _) => path.clone(),
            (None, Some(pid)) => {
                let text = std::fs::read_to_string(format!("/proc/{pid}/cgroup")).map_err(|e| {
                    SpecError::Pid {
                        name: self.name.clone(),
                        pid,
                        detail: e.to_string(),
                    }
                })?;
                let relative = v2_cgroup(&text).ok_or_else(|| SpecError::Pid {
                    name: self.name.clone(),
                    pid,
                    detail: "no cgroup v2 entry (\"0::/...\")".to_owned(),
                })?;
                root.join(relative.trim_start_matches('/'))
            }
            (None, None) => return Err(SpecError::NoCgroup(self.name.clone())),
        };
        let escapes = path
            .components()
            .any(|c| matches!(c, std::path::Component::ParentDir));
        if !path.is_absolute() || escapes || !path.starts_with(root) || path == root {
            return Err(SpecError::CgroupOutsideRoot {
                name: self.name.clone(),
                path,
                root: root.to_owned(),
            });
        }
        Ok(path)
    }
}

impl PodSpec {
    /// The port the kernel counts requests on: the user port the sidecar
    /// forwards to over TCP in userspace mode, else the serving port.
    pub fn counted_port(&self) -> u16 {
        match self.mode {
            DataplaneMode::Userspace => self.port,
            DataplaneMode::Full | DataplaneMode::EventDriven => self.serving_port,
        }
    }

    /// The pod's network namespace: `netns`, else that of `pid`.
    pub fn netns_path(&self) -> Option<PathBuf> {
        self.netns.clone().or_else(|| {
            self.pid
                .map(|pid| PathBuf::from(format!("/proc/{pid}/ns/net")))
        })
    }
}

/// The path of the `0::` line of /proc/<pid>/cgroup.
fn v2_cgroup(text: &str) -> Option<&str> {
    text.lines().find_map(|line| line.strip_prefix("0::"))
}

fn valid_name(name: &str) -> bool {
    !name.is_empty()
        && name.len() <= MAX_NAME_LEN
        && name
            .bytes()
            .all(|b| b.is_ascii_lowercase() || b.is_ascii_digit() || b == b'-' || b == b'.')
        && !name.starts_with(['-', '.'])
}

#[cfg(test)]
mod tests {
    use super::*;
    use proptest::prelude::*;

    const ROOT: &str = "/sys/fs/cgroup/unified";

    #[test]
    fn a_full_specification_parses() {
        let spec = PodSpec::parse(
            br#"{"name":"hello-1","ip":"10.1.0.2","port":8080,"cgroup":"/sys/fs/cgroup/unified/pods/hello-1"}"#,
        )
        .unwrap();
        assert_eq!(spec.port, 8080);
        assert_eq!(
            spec.resolve_cgroup(Path::new(ROOT)).unwrap(),
            Path::new("/sys/fs/cgroup/unified/pods/hello-1")
        );
    }

    #[test]
    fn h2c_revisions_are_refused_in_kernel_counted_modes() {
        for mode in ["full", "event-driven"] {
            let json = format!(
                r#"{{"name":"h","ip":"10.0.0.1","port":8080,"pid":1,"netns":"/x","mode":"{mode}","serving_port":8013}}"#
            );
            let err = PodSpec::parse(json.as_bytes()).unwrap_err();
            assert!(matches!(err, SpecError::H2c { .. }), "{err}");
            let text = err.to_string();
            assert!(text.contains("h2c") && text.contains(mode), "{text}");
        }
        let spec = PodSpec::parse(
            br#"{"name":"h","ip":"10.0.0.1","port":8080,"pid":1,"serving_port":8013}"#,
        )
        .unwrap();
        assert!(spec.is_h2c() && spec.mode == DataplaneMode::Userspace);
        let http1 =
            PodSpec::parse(br#"{"name":"h","ip":"10.0.0.1","port":8080,"pid":1,"mode":"full"}"#)
                .unwrap();
        assert!(!http1.is_h2c());
    }

    #[test]
    fn bad_specifications_are_named() {
        let cases: [(&[u8], &str); 5] = [
            (
                br#"{"name":"A","ip":"10.0.0.1","port":1,"pid":1}"#,
                "invalid pod name",
            ),
            (
                br#"{"name":"a","ip":"10.0.0.1","port":0,"pid":1}"#,
                "port 0",
            ),
            (br#"{"name":"a","ip":"10.0.0.1","port":1}"#, "cgroup"),
            (
                br#"{"name":"a","ip":"nope","port":1,"pid":1}"#,
                "invalid pod specification",
            ),
            (
                br#"{"name":"a","ip":"10.0.0.1","port":1,"pid":1,"x":2}"#,
                "unknown field",
            ),
        ];
        for (input, needle) in cases {
            let err = PodSpec::parse(input).unwrap_err().to_string();
            assert!(err.contains(needle), "{err}");
        }
    }

    #[test]
    fn modes_parse_and_event_driven_needs_a_namespace() {
        let spec = PodSpec::parse(
            br#"{"name":"a","ip":"10.0.0.1","port":8080,"pid":1,"mode":"event-driven"}"#,
        )
        .unwrap();
        assert_eq!(spec.mode, DataplaneMode::EventDriven);
        assert_eq!(spec.counted_port(), DEFAULT_SERVING_PORT);
        assert_eq!(spec.netns_path(), Some(PathBuf::from("/proc/1/ns/net")));
        let with_bypass = br#"{"name":"a","ip":"10.0.0.1","port":8080,"pid":1,"bypass":["node","10.244.0.0/16"]}"#;
        assert_eq!(PodSpec::parse(with_bypass).unwrap().bypass.len(), 2);
        let spec = PodSpec::parse(br#"{"name":"a","ip":"10.0.0.1","port":8080,"pid":1}"#).unwrap();
        assert_eq!(
            (spec.mode, spec.counted_port()),
            (DataplaneMode::Userspace, 8080)
        );
        let full = br#"{"name":"a","ip":"10.0.0.1","port":8080,"pid":1,"mode":"full"}"#;
        let full = PodSpec::parse(full).unwrap();
        assert_eq!(
            (full.mode, full.counted_port()),
            (DataplaneMode::Full, 8012)
        );
        for (input, needle) in [
            (
                &br#"{"name":"a","ip":"10.0.0.1","port":8080,"cgroup":"/x","mode":"event-driven"}"#
                    [..],
                "network namespace",
            ),
            (
                br#"{"name":"a","ip":"10.0.0.1","port":8012,"pid":1,"mode":"event-driven"}"#,
                "must differ",
            ),
            (
                br#"{"name":"a","ip":"10.0.0.1","port":8080,"pid":1,"mode":"ebpf"}"#,
                "unknown variant",
            ),
            (
                br#"{"name":"a","ip":"10.0.0.1","port":8080,"pid":1,"bypass":["node","x"]}"#,
                "bypass",
            ),
        ] {
            let err = PodSpec::parse(input).unwrap_err().to_string();
            assert!(err.contains(needle), "{err}");
        }
    }

    #[test]
    fn cgroups_outside_the_root_are_refused() {
        for path in [
            "/etc",
            "/sys/fs/cgroup/unified",
            "/sys/fs/cgroup/unified/../x",
            "pods/a",
        ] {
            let spec = PodSpec {
                name: "a".into(),
                ip: "10.0.0.1".parse().unwrap(),
                port: 80,
                cgroup: Some(path.into()),
                pid: None,
                netns: None,
                mode: DataplaneMode::Userspace,
                serving_port: DEFAULT_SERVING_PORT,
                bypass: Vec::new(),
            };
            assert!(
                matches!(
                    spec.resolve_cgroup(Path::new(ROOT)),
                    Err(SpecError::CgroupOutsideRoot { .. })
                ),
                "{path}"
            );
        }
    }

    #[test]
    fn the_v2_line_of_proc_cgroup_is_used() {
        assert_eq!(v2_cgroup("12:cpu:/x\n0::/pods/a\n"), Some("/pods/a"));
        assert_eq!(v2_cgroup("12:cpu:/x\n"), None);
        let own = PodSpec {
            name: "self".into(),
            ip: "10.0.0.1".parse().unwrap(),
            port: 80,
            cgroup: None,
            pid: Some(std::process::id()),
            netns: None,
            mode: DataplaneMode::Userspace,
            serving_port: DEFAULT_SERVING_PORT,
            bypass: Vec::new(),
        };
        // Our own process is in some cgroup; it resolves or is refused as the root.
        match own.resolve_cgroup(Path::new(ROOT)) {
            Ok(path) => assert!(path.starts_with(ROOT)),
            Err(e) => assert!(
                matches!(
                    e,
                    SpecError::CgroupOutsideRoot { .. } | SpecError::Pid { .. }
                ),
                "{e}"
            ),
        }
    }

    proptest! {
        #[test]
        fn random_input_never_panics(bytes in proptest::collection::vec(any::<u8>(), 0..256)) {
            let _ = PodSpec::parse(&bytes);
        }

        #[test]
        fn random_names_are_checked(name in ".{0,300}") {
            let ok = valid_name(&name);
            if ok {
                prop_assert!(name.len() <= MAX_NAME_LEN);
            }
        }
    }
}
