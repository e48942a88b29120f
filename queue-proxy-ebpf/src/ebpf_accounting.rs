//! Request accounting from in-kernel counters (knative-contract.md A.6).
//!
//! Selected with `SPRIGHT_ACCOUNTING`:
//! - `userspace` (default): [`WindowedStats`], fed by the proxy chain;
//! - `agent`: counters kept in the kernel by the programs spright-node-agent
//!   attached to this pod's cgroup, read from the agent at
//!   `http://$HOST_IP:$SPRIGHT_AGENT_PORT/v1/counters` (default port 9095;
//!   the agent answers only the pod whose IP the request comes from);
//! - `standalone`: this process loads the programs itself (root, CAP_BPF +
//!   CAP_NET_ADMIN) on `SPRIGHT_ACCOUNTING_CGROUP` (default: its own cgroup).
//!
//! If the agent is unreachable at start-up, or the programs cannot be
//! loaded, the sidecar says so in its log and uses userspace accounting.
//!
//! The kernel counters are monotonic (arrivals, proxied arrivals, and the
//! integral of concurrency over time in request·ns). Nothing ticks: when the
//! autoscaler scrapes and at least one [`PERIOD`] has passed since the last
//! read, the counters are read again and the report covers the time between
//! the two reads: average concurrency = Δ integral / Δt, request count =
//! Δ arrivals / Δt (per second, as Knative divides by its 1 s period). With
//! the autoscaler scraping every second this is Knative's one-second window;
//! after a longer gap it is the average over the gap.
//!
//! The userspace accounting keeps being fed as well (a mutex per request
//! edge), so that a failure to read the kernel counters later on falls back
//! to it instead of to nothing.

use std::io::{Read, Write};
use std::net::{SocketAddr, TcpStream};
use std::path::{Path, PathBuf};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use crate::accounting::{PERIOD, Report, RequestAccounting, WindowedStats};

/// Default port of spright-node-agent's pod-facing API.
pub const DEFAULT_AGENT_PORT: u16 = 9095;
/// Connect/read timeout towards the agent (it runs on the same node).
const AGENT_TIMEOUT: Duration = Duration::from_millis(500);
/// Largest agent answer read.
const MAX_ANSWER: usize = 16 * 1024;

/// Which accounting `SPRIGHT_ACCOUNTING` asks for.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Mode {
    /// In the proxy chain.
    Userspace,
    /// From spright-node-agent at this address.
    Agent(SocketAddr),
    /// Load the programs here, on this cgroup (None: our own).
    Standalone(Option<std::path::PathBuf>),
}

/// Errors of the accounting selection (all configuration errors).
#[derive(Debug, thiserror::Error, PartialEq, Eq)]
pub enum ModeError {
    #[error("SPRIGHT_ACCOUNTING={0:?}: use userspace, agent or standalone")]
    Unknown(String),
    #[error("SPRIGHT_ACCOUNTING=agent needs HOST_IP (the node's address), got {0:?}")]
    HostIp(String),
    #[error("SPRIGHT_AGENT_PORT={0:?} is not a port number")]
    Port(String),
    #[error("SPRIGHT_STEERING_BYPASS: {0}")]
    Bypass(String),
}

impl Mode {
    /// Reads the mode from the environment through `get`.
    pub fn from_env(get: impl Fn(&str) -> Option<String>) -> Result<Self, ModeError> {
        let mode = get("SPRIGHT_ACCOUNTING").unwrap_or_default();
        match mode.trim() {
            "" | "userspace" => Ok(Self::Userspace),
            "agent" => {
                let host = get("HOST_IP").unwrap_or_default();
                let ip = host
                    .trim()
                    .parse::<std::net::IpAddr>()
                    .map_err(|_| ModeError::HostIp(host.clone()))?;
                let port = match get("SPRIGHT_AGENT_PORT") {
                    None => DEFAULT_AGENT_PORT,
                    Some(p) if p.trim().is_empty() => DEFAULT_AGENT_PORT,
                    Some(p) => p.trim().parse().map_err(|_| ModeError::Port(p.clone()))?,
                };
                Ok(Self::Agent(SocketAddr::new(ip, port)))
            }
            "standalone" => Ok(Self::Standalone(
                get("SPRIGHT_ACCOUNTING_CGROUP")
                    .filter(|p| !p.trim().is_empty())
                    .map(Into::into),
            )),
            other => Err(ModeError::Unknown(other.to_owned())),
        }
    }
}

/// One read of the kernel counters.
#[derive(Debug, Clone, Copy, PartialEq, Default)]
pub struct Sample {
    pub now_ns: u64,
    /// Requests in flight at `now_ns` (what a drain in event-driven mode waits for).
    pub concurrency: u64,
    pub arrivals: u64,
    pub proxied_arrivals: u64,
    pub weighted_ns: u64,
    pub weighted_proxied_ns: u64,
}

impl Sample {
    /// Parses the agent's JSON answer.
    pub fn from_json(body: &[u8]) -> Result<Self, String> {
        let v: serde_json::Value =
            serde_json::from_slice(body).map_err(|e| format!("agent answer is not JSON: {e}"))?;
        let field = |key: &str| {
            v.get(key)
                .and_then(serde_json::Value::as_u64)
                .ok_or_else(|| format!("agent answer lacks {key}"))
        };
        Ok(Self {
            now_ns: field("now_ns")?,
            concurrency: field("concurrency")?,
            arrivals: field("arrivals")?,
            proxied_arrivals: field("proxied_arrivals")?,
            weighted_ns: field("weighted_ns")?,
            weighted_proxied_ns: field("weighted_proxied_ns")?,
        })
    }

    /// The report for the time between `earlier` and `self`.
    pub fn report_since(&self, earlier: &Self, uptime: f64) -> Option<Report> {
        let elapsed_ns = self.now_ns.checked_sub(earlier.now_ns).filter(|d| *d > 0)? as f64;
        let seconds = elapsed_ns / 1e9;
        let delta = |a: u64, b: u64| a.saturating_sub(b) as f64;
        Some(Report {
            average_concurrency: delta(self.weighted_ns, earlier.weighted_ns) / elapsed_ns,
            average_proxied_concurrency: delta(
                self.weighted_proxied_ns,
                earlier.weighted_proxied_ns,
            ) / elapsed_ns,
            request_count: delta(self.arrivals, earlier.arrivals) / seconds,
            proxied_request_count: delta(self.proxied_arrivals, earlier.proxied_arrivals) / seconds,
            uptime,
        })
    }
}

/// Where the counters come from.
pub trait CounterSource: Send + Sync + 'static {
    fn read(&self) -> Result<Sample, String>;
    fn describe(&self) -> String;
}

impl<T: CounterSource + ?Sized> CounterSource for Arc<T> {
    fn read(&self) -> Result<Sample, String> {
        T::read(self)
    }

    fn describe(&self) -> String {
        T::describe(self)
    }
}

/// spright-node-agent over HTTP on the node's address.
#[derive(Debug)]
pub struct AgentSource {
    addr: SocketAddr,
}

impl AgentSource {
    pub fn new(addr: SocketAddr) -> Self {
        Self { addr }
    }
}

impl CounterSource for AgentSource {
    fn read(&self) -> Result<Sample, String> {
        let (status, body) = get(self.addr, "/v1/counters").map_err(|e| e.to_string())?;
        if status != 200 {
            return Err(format!(
                "agent answered {status}: {}",
                String::from_utf8_lossy(&body).trim()
            ));
        }
        Sample::from_json(&body)
    }

    fn describe(&self) -> String {
        format!("spright-node-agent at {}", self.addr)
    }
}

/// A blocking HTTP/1.1 GET with short timeouts (the agent is on this node).
fn get(addr: SocketAddr, path: &str) -> std::io::Result<(u16, Vec<u8>)> {
    let mut stream = TcpStream::connect_timeout(&addr, AGENT_TIMEOUT)?;
    stream.set_read_timeout(Some(AGENT_TIMEOUT))?;
    stream.set_write_timeout(Some(AGENT_TIMEOUT))?;
    write!(
        stream,
        "GET {path} HTTP/1.1\r\nHost: {addr}\r\nConnection: close\r\n\r\n"
    )?;
    let mut raw = Vec::new();
    stream.take(MAX_ANSWER as u64).read_to_end(&mut raw)?;
    let bad = || std::io::Error::other("malformed answer from the agent");
    let end = raw
        .windows(4)
        .position(|w| w == b"\r\n\r\n")
        .ok_or_else(bad)?;
    let head = std::str::from_utf8(&raw[..end]).map_err(|_| bad())?;
    let status = head
        .split_whitespace()
        .nth(1)
        .and_then(|s| s.parse().ok())
        .ok_or_else(bad)?;
    Ok((status, raw[end + 4..].to_vec()))
}

/// This process's own programs (standalone mode).
pub struct LocalSource {
    accounting: Mutex<spright_ebpf::accounting::PodAccounting>,
}

impl LocalSource {
    /// Loads and attaches the programs on `cgroup` (None: this process's own
    /// cgroup v2) for `port`.
    pub fn attach(cgroup: Option<&Path>, port: u16) -> Result<Self, String> {
        let cgroup = match cgroup {
            Some(path) => path.to_owned(),
            None => own_cgroup()?,
        };
        let accounting = spright_ebpf::accounting::PodAccounting::attach(&cgroup, port)
            .map_err(|e| format!("attaching to {}: {e}", cgroup.display()))?;
        Ok(Self {
            accounting: Mutex::new(accounting),
        })
    }
}

impl CounterSource for LocalSource {
    fn read(&self) -> Result<Sample, String> {
        let c = self
            .accounting
            .lock()
            .unwrap_or_else(std::sync::PoisonError::into_inner)
            .counters()
            .map_err(|e| e.to_string())?;
        Ok(Sample {
            now_ns: c.now_ns,
            concurrency: u64::from(c.concurrency),
            arrivals: c.arrivals,
            proxied_arrivals: c.proxied_arrivals,
            weighted_ns: c.weighted_ns,
            weighted_proxied_ns: c.weighted_proxied_ns,
        })
    }

    fn describe(&self) -> String {
        let acc = self
            .accounting
            .lock()
            .unwrap_or_else(std::sync::PoisonError::into_inner);
        format!(
            "programs loaded by this process on {} (port {})",
            acc.cgroup_path().display(),
            acc.port()
        )
    }
}

/// This process's cgroup v2 directory (the `0::` line of /proc/self/cgroup).
pub(crate) fn own_cgroup() -> Result<PathBuf, String> {
    let text = std::fs::read_to_string("/proc/self/cgroup")
        .map_err(|e| format!("reading /proc/self/cgroup: {e}"))?;
    let relative = text
        .lines()
        .find_map(|l| l.strip_prefix("0::"))
        .ok_or("/proc/self/cgroup has no cgroup v2 entry")?;
    Ok(Path::new(spright_ebpf::DEFAULT_CGROUP_PATH).join(relative.trim_start_matches('/')))
}

/// Builds the accounting `mode` asks for, falling back to userspace (and
/// saying so) when the kernel counters are not available. With kernel
/// counters, also their view of the counted port for the drainer
/// ([`crate::drain::KernelLoad`]).
pub fn select_with_load(
    mode: &Mode,
    user_port: u16,
    start: Instant,
) -> (Arc<dyn RequestAccounting>, Option<crate::drain::LoadProbe>) {
    let source: Result<Arc<dyn CounterSource>, (String, String)> = match mode {
        Mode::Userspace => return (Arc::new(WindowedStats::new(start)), None),
        Mode::Agent(addr) => {
            // In a cluster the agent registers the pod only once the pod runs, after this
            // process started: until the agent answers, userspace accounting stands in.
            let source: Arc<dyn CounterSource> = Arc::new(AgentSource::new(*addr));
            let (accounting, error) = KernelAccounting::waiting(Arc::clone(&source), start);
            match error {
                None => tracing::info!(mode = ?mode, "request accounting in the kernel"),
                Some(error) => {
                    tracing::warn!(source = %source.describe(), %error, "kernel request counters unavailable: falling back to userspace accounting until the agent answers (it registers the pod once the pod runs)");
                }
            }
            return (Arc::new(accounting), Some(load_probe(source)));
        }
        Mode::Standalone(cgroup) => LocalSource::attach(cgroup.as_deref(), user_port)
            .map(|s| Arc::new(s) as Arc<dyn CounterSource>)
            .map_err(|e| ("programs loaded by this process".to_owned(), e)),
    };
    let kernel =
        source.and_then(
            |source| match KernelAccounting::new(Arc::clone(&source), start) {
                Ok(k) => Ok((k, source)),
                Err(e) => Err((source.describe(), e)),
            },
        );
    match kernel {
        Ok((accounting, source)) => {
            tracing::info!(mode = ?mode, "request accounting in the kernel");
            (Arc::new(accounting), Some(load_probe(source)))
        }
        Err((source, error)) => {
            tracing::warn!(%source, %error, "kernel request counters unavailable: falling back to userspace accounting");
            (Arc::new(WindowedStats::new(start)), None)
        }
    }
}

/// Requests in flight and arrivals from `source`, for the drainer.
pub fn load_probe(source: Arc<dyn CounterSource>) -> crate::drain::LoadProbe {
    Arc::new(move || {
        source.read().map(|s| crate::drain::KernelLoad {
            in_flight: s.concurrency,
            arrivals: s.arrivals,
        })
    })
}

#[derive(Debug, Default)]
struct State {
    previous: Option<(Instant, Sample)>,
    last: Option<Report>,
    failing: bool,
}

/// [`RequestAccounting`] from kernel counters, with userspace accounting as
/// the fallback.
pub struct KernelAccounting<S> {
    source: S,
    start: Instant,
    fallback: WindowedStats,
    state: Mutex<State>,
}

impl<S: CounterSource> KernelAccounting<S> {
    /// Takes the first sample now; fails (so the caller falls back) if the
    /// source cannot be read.
    pub fn new(source: S, start: Instant) -> Result<Self, String> {
        match Self::waiting(source, start) {
            (k, None) => Ok(k),
            (_, Some(error)) => Err(error),
        }
    }

    /// Like [`Self::new`], but a source that cannot be read yet is not final: userspace
    /// accounting answers until a read succeeds (each scrape tries again). Returns why the
    /// first read failed, if it did.
    pub fn waiting(source: S, start: Instant) -> (Self, Option<String>) {
        let (previous, error) = match source.read() {
            Ok(first) => (Some((Instant::now(), first)), None),
            Err(e) => (None, Some(e)),
        };
        let k = Self {
            source,
            start,
            fallback: WindowedStats::new(start),
            state: Mutex::new(State {
                previous,
                last: None,
                failing: error.is_some(),
            }),
        };
        (k, error)
    }
}

impl<S: CounterSource> RequestAccounting for KernelAccounting<S> {
    fn arrival(&self, proxied: bool, now: Instant) {
        self.fallback.arrival(proxied, now);
    }

    fn completion(&self, proxied: bool, now: Instant) {
        self.fallback.completion(proxied, now);
    }

    fn snapshot(&self, now: Instant) -> Option<Report> {
        let mut s = self
            .state
            .lock()
            .unwrap_or_else(std::sync::PoisonError::into_inner);
        if let Some((at, _)) = s.previous
            && now.saturating_duration_since(at) < PERIOD
            && !s.failing
        {
            return s.last;
        }
        match self.source.read() {
            Ok(sample) => {
                if s.failing {
                    tracing::info!(source = %self.source.describe(), "kernel request counters readable again");
                    s.failing = false;
                }
                let uptime = now.saturating_duration_since(self.start).as_secs_f64();
                if let Some((_, earlier)) = s.previous
                    && let Some(report) = sample.report_since(&earlier, uptime)
                {
                    s.last = Some(report);
                }
                s.previous = Some((now, sample));
                // The first read after a wait has nothing to compare with yet.
                s.last.or_else(|| self.fallback.snapshot(now))
            }
            Err(error) => {
                if !s.failing {
                    tracing::warn!(source = %self.source.describe(), %error, "cannot read the kernel request counters: using userspace accounting until they are back");
                    s.failing = true;
                }
                self.fallback.snapshot(now)
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn env(pairs: &[(&str, &str)]) -> impl Fn(&str) -> Option<String> {
        let map: std::collections::HashMap<String, String> = pairs
            .iter()
            .map(|(k, v)| ((*k).to_owned(), (*v).to_owned()))
            .collect();
        move |k| map.get(k).cloned()
    }

    #[test]
    fn modes_from_env() {
        assert_eq!(Mode::from_env(env(&[])), Ok(Mode::Userspace));
        assert_eq!(
            Mode::from_env(env(&[
                ("SPRIGHT_ACCOUNTING", "agent"),
                ("HOST_IP", "10.0.0.1")
            ])),
            Ok(Mode::Agent("10.0.0.1:9095".parse().unwrap()))
        );
        assert_eq!(
            Mode::from_env(env(&[
                ("SPRIGHT_ACCOUNTING", "agent"),
                ("HOST_IP", "10.0.0.1"),
                ("SPRIGHT_AGENT_PORT", "7000")
            ])),
            Ok(Mode::Agent("10.0.0.1:7000".parse().unwrap()))
        );
        assert!(matches!(
            Mode::from_env(env(&[("SPRIGHT_ACCOUNTING", "agent")])),
            Err(ModeError::HostIp(_))
        ));
        assert!(matches!(
            Mode::from_env(env(&[("SPRIGHT_ACCOUNTING", "kernel")])),
            Err(ModeError::Unknown(_))
        ));
        assert_eq!(
            Mode::from_env(env(&[("SPRIGHT_ACCOUNTING", "standalone")])),
            Ok(Mode::Standalone(None))
        );
    }

    #[test]
    fn reports_are_differences_over_the_elapsed_time() {
        let a = Sample {
            now_ns: 1_000_000_000,
            concurrency: 2,
            arrivals: 10,
            proxied_arrivals: 2,
            weighted_ns: 5_000_000_000,
            weighted_proxied_ns: 0,
        };
        // 1 s later: 4 arrivals (1 proxied), 2 requests in flight all along,
        // one of them proxied for half the time.
        let b = Sample {
            now_ns: 2_000_000_000,
            concurrency: 2,
            arrivals: 14,
            proxied_arrivals: 3,
            weighted_ns: 7_000_000_000,
            weighted_proxied_ns: 500_000_000,
        };
        let r = b.report_since(&a, 3.0).unwrap();
        assert!((r.average_concurrency - 2.0).abs() < 1e-9);
        assert!((r.average_proxied_concurrency - 0.5).abs() < 1e-9);
        assert!((r.request_count - 4.0).abs() < 1e-9);
        assert!((r.proxied_request_count - 1.0).abs() < 1e-9);
        assert_eq!(r.uptime, 3.0);
        assert_eq!(a.report_since(&a, 1.0), None);
    }

    #[test]
    fn agent_answers_are_parsed_and_checked() {
        let s = Sample::from_json(
            br#"{"pod":"p","now_ns":5,"concurrency":0,"proxied_concurrency":0,"arrivals":3,"proxied_arrivals":1,"completions":3,"proxied_completions":1,"weighted_ns":9,"weighted_proxied_ns":4}"#,
        )
        .unwrap();
        assert_eq!((s.arrivals, s.concurrency), (3, 0));
        assert_eq!(s.weighted_proxied_ns, 4);
        assert!(Sample::from_json(b"{").is_err());
        assert!(
            Sample::from_json(br#"{"now_ns":1,"concurrency":0}"#)
                .unwrap_err()
                .contains("arrivals")
        );
    }

    /// A sample taken `s` seconds in, after `arrivals` requests.
    fn sample(s: u64, arrivals: u64) -> Sample {
        Sample {
            now_ns: s * 1_000_000_000,
            arrivals,
            ..Sample::default()
        }
    }

    struct Scripted(Mutex<Vec<Result<Sample, String>>>);

    impl CounterSource for Scripted {
        fn read(&self) -> Result<Sample, String> {
            self.0.lock().unwrap().remove(0)
        }
        fn describe(&self) -> String {
            "scripted".into()
        }
    }

    #[test]
    fn unreadable_counters_fall_back_to_userspace() {
        let t0 = Instant::now();
        let source = Scripted(Mutex::new(vec![
            Ok(sample(1, 0)),
            Ok(sample(2, 5)),
            Err("agent gone".into()),
        ]));
        let acc = KernelAccounting::new(source, t0).unwrap();
        acc.arrival(false, t0);
        acc.completion(false, t0 + Duration::from_millis(100));
        let r = acc
            .snapshot(Instant::now() + Duration::from_secs(1))
            .unwrap();
        assert!((r.request_count - 5.0).abs() < 1e-9);
        // Within the period: the same report, no read.
        assert_eq!(
            acc.snapshot(Instant::now() + Duration::from_secs(1)),
            Some(r)
        );
        // The source fails: the userspace window answers (1 arrival).
        let r = acc
            .snapshot(Instant::now() + Duration::from_secs(3))
            .unwrap();
        assert_eq!(r.request_count, 0.0);
        assert!(KernelAccounting::new(Scripted(Mutex::new(vec![Err("no".into())])), t0).is_err());
    }

    #[test]
    fn an_agent_that_answers_late_takes_over_from_userspace() {
        let t0 = Instant::now();
        let source = Scripted(Mutex::new(vec![
            Err("agent answered 403: no pod on this node has address 10.0.0.2".into()),
            Err("still not registered".into()),
            Ok(sample(5, 0)),
            Ok(sample(6, 7)),
        ]));
        let (acc, error) = KernelAccounting::waiting(source, t0);
        assert!(error.is_some_and(|e| e.contains("403")));
        acc.arrival(false, t0);
        // Not registered yet: the userspace window answers (one arrival, in flight).
        let r = acc.snapshot(t0 + Duration::from_secs(2)).unwrap();
        assert!(r.average_concurrency > 0.0);
        // First good read: nothing to compare with yet, userspace still answers.
        let r = acc.snapshot(t0 + Duration::from_secs(3)).unwrap();
        assert!(r.average_concurrency > 0.0);
        // From then on the kernel's counters: 7 arrivals in 1 s.
        let r = acc.snapshot(t0 + Duration::from_secs(4)).unwrap();
        assert!((r.request_count - 7.0).abs() < 1e-9, "{r:?}");
    }

    #[test]
    fn an_absent_agent_is_an_error() {
        // Port 9 on loopback (discard) is closed in test environments.
        let source = AgentSource::new("127.0.0.1:9".parse().unwrap());
        assert!(source.read().is_err());
    }
}
