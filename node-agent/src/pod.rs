//! A pod as the agent knows it: the registration / manifest format.
//!
//! ```json
//! {"name": "hello-00001-deployment-5d8f-abcde", "ip": "10.1.0.2", "port": 8080,
//!  "cgroup": "/sys/fs/cgroup/unified/kubepods/pod1234", "netns": "/var/run/netns/pod1234"}
//! ```
//!
//! `port` is the serving port whose requests are counted (the user container's
//! port, `USER_PORT`). `cgroup` is the pod's cgroup v2 directory; instead of it,
//! `pid` (any process of the pod) lets the agent read the cgroup from
//! `/proc/<pid>/cgroup`. `netns` is optional and only checked for existence.

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
}

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

    /// Checks the fields that need no file system.
    pub fn check(&self) -> Result<(), SpecError> {
        if !valid_name(&self.name) {
            return Err(SpecError::Name(self.name.clone()));
        }
        if self.port == 0 {
            return Err(SpecError::Port);
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
