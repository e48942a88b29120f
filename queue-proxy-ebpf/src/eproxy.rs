//! Event-driven mode (EPROXY), the sidecar's part (see `modes.md`).
//!
//! Connections to the serving port are steered in the kernel to the user container's listening
//! socket (`spright_ebpf::steering`), so this process sees none of them. What it keeps:
//!
//! - 9090: the autoscaler's `Stat`, from the kernel counters, counted on the serving port (a
//!   steered connection keeps it as its local port);
//! - 8022: `/wait-for-drain`, and the readiness answer for activator-lite: a request with
//!   `K-Network-Probe: queue` gets 200 `queue` when the user container passes its readiness
//!   probe, 503 otherwise or while draining;
//! - its own listener on the serving port, with the whole userspace chain, for the connections
//!   the kernel does not steer (no target yet, the user container restarting).
//!
//! `SPRIGHT_STEERING_BYPASS` (standalone; comma-separated addresses or prefixes) lists sources
//! whose connections are not steered and reach this sidecar's listener: the node's address
//! toward the pod, so that kubelet probes get the queue-proxy's answers.
//!
//! Who steers: the node agent (`SPRIGHT_ACCOUNTING=agent`, the pod registered with
//! `"mode": "event-driven"`), or this process when it runs as root
//! (`SPRIGHT_ACCOUNTING=standalone`). Without `SPRIGHT_ACCOUNTING`, event-driven mode uses the
//! agent when `HOST_IP` is set and standalone otherwise.

use std::path::Path;
use std::sync::Arc;

use http::{HeaderMap, Response};
use spright_ebpf::steering::{SourcePrefix, Steering};

use crate::body::Body;
use crate::drain::Drainer;
use crate::ebpf_accounting::{Mode, ModeError};
use crate::health;
use crate::readiness::Prober;

/// The environment variable listing the sources that are not steered.
pub const ENV_BYPASS: &str = "SPRIGHT_STEERING_BYPASS";

/// `SPRIGHT_STEERING_BYPASS`, parsed.
pub fn bypass_list(get: impl Fn(&str) -> Option<String>) -> Result<Vec<SourcePrefix>, ModeError> {
    get(ENV_BYPASS)
        .unwrap_or_default()
        .split(',')
        .filter(|e| !e.trim().is_empty())
        .map(|e| e.parse().map_err(ModeError::Bypass))
        .collect()
}

/// `SPRIGHT_ACCOUNTING` for a revision in `event_driven` mode: as set, or the default above.
/// Also checks `SPRIGHT_STEERING_BYPASS` in that mode.
pub fn accounting_mode(
    event_driven: bool,
    get: impl Fn(&str) -> Option<String>,
) -> Result<Mode, ModeError> {
    if event_driven {
        bypass_list(&get)?;
    }
    let explicit = get("SPRIGHT_ACCOUNTING").filter(|v| !v.trim().is_empty());
    if !event_driven || explicit.is_some() {
        return Mode::from_env(get);
    }
    let default = if get("HOST_IP").is_some_and(|h| !h.trim().is_empty()) {
        "agent"
    } else {
        "standalone"
    };
    Mode::from_env(|k| {
        if k == "SPRIGHT_ACCOUNTING" {
            Some(default.to_owned())
        } else {
            get(k)
        }
    })
}

/// Starts the steering this process owns: in event-driven mode with standalone accounting (see
/// [`steer_standalone`]); the node agent steers for `agent`. Keep the value until shutdown.
pub fn steer(event_driven: bool, accounting: &Mode, cfg: &crate::env::Config) -> Option<Steering> {
    match (event_driven, accounting) {
        (true, Mode::Standalone(cgroup)) => {
            // Checked by accounting_mode at start-up.
            let bypass = bypass_list(|k| std::env::var(k).ok()).unwrap_or_default();
            steer_standalone(cgroup.as_deref(), cfg.serving_port, cfg.user_port, &bypass)
        }
        (true, Mode::Agent(addr)) => {
            tracing::info!(agent = %addr, "event-driven mode: the node agent steers the serving port (the pod must be registered with \"mode\": \"event-driven\")");
            None
        }
        (true, Mode::Userspace) => {
            tracing::warn!(
                "event-driven mode with SPRIGHT_ACCOUNTING=userspace: nothing steers the serving port; every request takes the userspace proxy"
            );
            None
        }
        (false, _) => None,
    }
}

/// Standalone event-driven mode: steers `serving_port` of this process's network namespace to
/// the sockets listening on `user_port` in the pod's cgroup (`cgroup`, else our own), now and
/// at every later `listen(2)`. None (logged) when the kernel refuses: connections then reach
/// this sidecar's own listener and take the userspace path.
pub fn steer_standalone(
    cgroup: Option<&Path>,
    serving_port: u16,
    user_port: u16,
    bypass: &[SourcePrefix],
) -> Option<Steering> {
    let attach = || -> Result<(Steering, usize), String> {
        let cgroup = match cgroup {
            Some(c) => c.to_owned(),
            None => crate::ebpf_accounting::own_cgroup()?,
        };
        let mut steering = Steering::attach_pod(
            Path::new("/proc/self/ns/net"),
            &cgroup,
            serving_port,
            user_port,
        )
        .map_err(|e| e.to_string())?;
        for prefix in bypass {
            steering.bypass(*prefix).map_err(|e| e.to_string())?;
        }
        let listeners = match spright_ebpf::steering::pod_listeners(&cgroup, user_port) {
            Ok(l) => l,
            Err(error) => {
                tracing::warn!(%error, "cannot take the user container's listener now; steering starts at its next listen(2)");
                Vec::new()
            }
        };
        for l in &listeners {
            steering.set_target(l).map_err(|e| e.to_string())?;
        }
        Ok((steering, listeners.len()))
    };
    match attach() {
        Ok((steering, listeners)) => {
            tracing::info!(
                serving_port,
                user_port,
                listeners,
                "event-driven mode: the serving port is steered in the kernel to the user container"
            );
            Some(steering)
        }
        Err(error) => {
            tracing::warn!(%error, "event-driven mode: cannot steer the serving port; every request takes the userspace proxy");
            None
        }
    }
}

/// The readiness answer on the admin port (event-driven mode only).
#[derive(Clone)]
pub struct QueueProbe {
    pub prober: Option<Arc<Prober>>,
    pub drainer: Arc<Drainer>,
}

impl QueueProbe {
    /// Some answer for `K-Network-Probe: queue`, None for anything else.
    pub async fn answer(&self, headers: &HeaderMap) -> Option<Response<Body>> {
        let value = headers
            .get("k-network-probe")
            .and_then(|v| v.to_str().ok())?;
        if value != "queue" {
            return None;
        }
        if self.drainer.draining() {
            return Some(health::shutting_down());
        }
        let ready = match &self.prober {
            Some(p) => p.probe().await,
            None => true,
        };
        Some(health::probe_result(ready))
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::time::Duration;

    fn env(pairs: &[(&str, &str)]) -> impl Fn(&str) -> Option<String> {
        let map: std::collections::HashMap<String, String> = pairs
            .iter()
            .map(|(k, v)| ((*k).to_owned(), (*v).to_owned()))
            .collect();
        move |k| map.get(k).cloned()
    }

    #[test]
    fn event_driven_defaults_to_kernel_accounting() {
        assert_eq!(accounting_mode(false, env(&[])), Ok(Mode::Userspace));
        assert_eq!(accounting_mode(true, env(&[])), Ok(Mode::Standalone(None)));
        assert_eq!(
            accounting_mode(true, env(&[("HOST_IP", "10.0.0.1")])),
            Ok(Mode::Agent("10.0.0.1:9095".parse().unwrap()))
        );
        assert_eq!(
            accounting_mode(
                true,
                env(&[
                    ("HOST_IP", "10.0.0.1"),
                    ("SPRIGHT_ACCOUNTING", "standalone")
                ])
            ),
            Ok(Mode::Standalone(None))
        );
        assert!(accounting_mode(true, env(&[("SPRIGHT_ACCOUNTING", "x")])).is_err());
        let list = bypass_list(env(&[(ENV_BYPASS, "10.0.0.1, fd00::/8,")]));
        assert_eq!(list.unwrap().len(), 2);
        assert!(matches!(
            accounting_mode(true, env(&[(ENV_BYPASS, "10.0.0.1,node")])),
            Err(ModeError::Bypass(_))
        ));
        // Outside event-driven mode the variable is not read.
        assert!(accounting_mode(false, env(&[(ENV_BYPASS, "x")])).is_ok());
    }

    #[tokio::test]
    async fn the_admin_port_answers_queue_probes() {
        let probe = QueueProbe {
            prober: None,
            drainer: Drainer::new(Duration::from_millis(10)),
        };
        let mut h = HeaderMap::new();
        assert!(probe.answer(&h).await.is_none());
        h.insert("k-network-probe", "probe".parse().unwrap());
        assert!(probe.answer(&h).await.is_none());
        h.insert("k-network-probe", "queue".parse().unwrap());
        let r = probe.answer(&h).await.expect("answer");
        assert_eq!(r.status(), 200);
        // An unreachable user container: 503.
        let specs = crate::readiness::decode(
            r#"{"tcpSocket":{"port":9,"host":"127.0.0.1"},"periodSeconds":1,"timeoutSeconds":1}"#,
            false,
        )
        .unwrap();
        let probe = QueueProbe {
            prober: Some(Prober::new(specs, false)),
            ..probe
        };
        assert_eq!(probe.answer(&h).await.expect("answer").status(), 503);
    }
}
