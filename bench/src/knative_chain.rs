//! The Knative-shaped peer of the shared-memory chain.
//!
//! Every function of the chain runs the way Knative Serving runs a revision pod: the user
//! container (`spright-sample-chain http <step> 127.0.0.1:8080 [next-url]`) next to Knative's own
//! queue-proxy (`/root/go/bin/queue`, v1.23.0), in a network namespace of its own. Function `i`
//! posts its result to `http://<pod i+1>:8012/`, i.e. through the next pod's queue-proxy, the way
//! a Knative function calls the next service; the last function answers and the answer travels
//! back up the chain.
//!
//! Network: one Linux bridge in the root namespace holding `10.213.<n>.1/24`, one veth per pod
//! whose pod end is `eth0` with `10.213.<n>.<i + 2>/24`. Pod-to-pod traffic is switched by the
//! bridge and the load generator in the root namespace reaches every pod directly, so no sysctl
//! (e.g. `ip_forward`) is touched. `<n>` is a /24 that no interface or route on this machine uses
//! yet; allocation is serialised by a lock file so that concurrent runs never share a subnet.
//!
//! queue-proxy gets the environment the revision reconciler builds in
//! `pkg/reconciler/revision/resources/queue.go` for a revision with the stock defaults
//! (containerConcurrency from the config, timeoutSeconds 300, the defaulted TCP readiness
//! probe of port 8080, stock config-logging and config-observability); see [`queue_proxy_env`].
//!
//! Everything is torn down on drop: processes are killed and reaped, then namespaces, veths and
//! the bridge are deleted. Resources left behind by a process that died without dropping (e.g.
//! killed by a signal) are reclaimed by the next [`KnativeChain::start`].

use std::fmt::Write as _;
use std::fs::{self, File, OpenOptions};
use std::io::{self, Read, Write};
use std::net::{Ipv4Addr, SocketAddr, SocketAddrV4, TcpStream};
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::sync::atomic::{AtomicU32, Ordering};
use std::time::{Duration, Instant};

use anyhow::{Context, bail};

/// Port of the user container inside each pod (Knative's default `containerPort`).
const USER_PORT: u16 = 8080;
/// queue-proxy's HTTP serving port (`QUEUE_SERVING_PORT` for HTTP/1 revisions).
const QUEUE_SERVING_PORT: u16 = 8012;
/// How long [`KnativeChain::start`] waits for the whole chain to answer.
const READY_DEADLINE: Duration = Duration::from_secs(20);
/// First two octets of the private /24s we allocate; nothing outside our namespaces uses them.
const SUBNET_PREFIX: [u8; 2] = [10, 213];
/// A small valid body for the sample chain: three accelerometer samples with a jolt.
const PROBE_BODY: &str = "0.01,-0.02,1.0\n0.01,-0.02,3.0\n0.01,-0.02,1.0\n";
/// Network namespace names start with this, followed by `<pid>-<instance>-<pod>`.
const NETNS_PREFIX: &str = "spright-kc-";
/// Interface names (bridge and root-side veths) start with this, followed by the hex pid.
const IFACE_PREFIX: &str = "kc";

/// Stock `zap-logger-config` of Knative's config-logging ConfigMap, as the controller passes it.
const STOCK_ZAP_CONFIG: &str = r#"{"level":"info","development":false,"outputPaths":["stdout"],"errorOutputPaths":["stderr"],"encoding":"json","encoderConfig":{"timeKey":"timestamp","levelKey":"severity","nameKey":"logger","callerKey":"caller","messageKey":"message","stacktraceKey":"stacktrace","lineEnding":"","levelEncoder":"","timeEncoder":"iso8601","durationEncoder":"","callerEncoder":""}}"#;
/// Stock config-observability (v1.19+) as JSON: no tracing, no metrics export, profiling off,
/// runtime stats every 15 s (Go nanoseconds), no request metrics, request log off.
const STOCK_OBSERVABILITY_CONFIG: &str = r#"{"tracing":{"protocol":"none"},"metrics":{"protocol":"none"},"runtime":{"profiling":"disabled","exportInterval":15000000000},"requestMetrics":{"protocol":"none"}}"#;

static INSTANCES: AtomicU32 = AtomicU32::new(0);

/// What to run: the functions' binary, queue-proxy, the chain's steps in order.
#[derive(Debug, Clone)]
pub struct KnativeChainConfig {
    /// `spright-sample-chain`, run as `spright-sample-chain http <step> <listen-addr> [next-url]`.
    pub sample_chain_bin: PathBuf,
    /// Knative's queue-proxy (`go install knative.dev/serving/cmd/queue@v0.50.0`).
    pub queue_bin: PathBuf,
    /// Steps in chain order, e.g. `["decode", "denoise", "detect", "alert"]`.
    pub steps: Vec<String>,
    /// `spec.containerConcurrency` of every revision; 0 = unlimited (Knative's default).
    pub container_concurrency: u32,
}

/// A running Knative-shaped chain. Dropping it tears everything down.
#[derive(Debug)]
pub struct KnativeChain {
    /// Namespaces we created, in creation order.
    netns: Vec<String>,
    /// The bridge in the root namespace, once created.
    bridge: Option<String>,
    /// Root-side veth ends we created.
    veths: Vec<String>,
    /// Every process of the topology.
    procs: Vec<PodProcess>,
    /// Pod addresses, in chain order.
    pod_ips: Vec<Ipv4Addr>,
    /// Where the processes' logs go.
    log_dir: PathBuf,
}

#[derive(Debug)]
struct PodProcess {
    /// e.g. `pod 2 (detect) queue-proxy`.
    label: String,
    /// Index of the pod in the chain.
    pod: usize,
    child: Child,
    log: PathBuf,
}

impl KnativeChain {
    /// Creates the namespaces, bridge and veths, starts one function and one queue-proxy per
    /// step, and waits (at most 20 s) until the entry URL answers a real chain request.
    pub fn start(cfg: &KnativeChainConfig) -> anyhow::Result<Self> {
        check_config(cfg)?;
        check_capabilities()?;
        reclaim_stale();
        let pid = std::process::id();
        let instance = INSTANCES.fetch_add(1, Ordering::Relaxed);
        let log_dir = std::env::temp_dir().join(format!("{NETNS_PREFIX}{pid}-{instance}"));
        fs::create_dir_all(&log_dir)
            .with_context(|| format!("creating the log directory {}", log_dir.display()))?;
        let mut chain = KnativeChain {
            netns: Vec::new(),
            bridge: None,
            veths: Vec::new(),
            procs: Vec::new(),
            pod_ips: Vec::new(),
            log_dir,
        };
        // From here on, an early return drops `chain`, which removes what was created so far.
        chain.build_network(pid, instance, cfg.steps.len())?;
        chain.spawn_pods(cfg)?;
        chain.wait_ready(cfg)?;
        Ok(chain)
    }

    /// The entry URL: the first pod's queue-proxy, reachable from the root namespace.
    pub fn url(&self) -> String {
        format!("http://{}/", self.entry())
    }

    /// Every process of the topology (queue-proxies and functions).
    pub fn pids(&self) -> Vec<u32> {
        self.procs.iter().map(|p| p.child.id()).collect()
    }

    fn entry(&self) -> SocketAddr {
        // `start` only returns a chain with at least one pod.
        let ip = self
            .pod_ips
            .first()
            .copied()
            .unwrap_or(Ipv4Addr::UNSPECIFIED);
        SocketAddr::V4(SocketAddrV4::new(ip, QUEUE_SERVING_PORT))
    }

    fn build_network(&mut self, pid: u32, instance: u32, pods: usize) -> anyhow::Result<()> {
        // Serialise subnet allocation with other runs (other processes, other tests).
        let lock = lock_allocation()?;
        let used = ip_text(&["-o", "-4", "addr", "show"])? + &ip_text(&["-o", "-4", "route"])?;
        let third = (0..=255u8)
            .find(|n| !used.contains(&format!("{}.{}.{n}.", SUBNET_PREFIX[0], SUBNET_PREFIX[1])))
            .context("no free 10.213.<n>.0/24 subnet left for the chain's bridge")?;
        let net = |host: u8| Ipv4Addr::new(SUBNET_PREFIX[0], SUBNET_PREFIX[1], third, host);

        let bridge = iface_name(pid, instance, "b")?;
        ip(&["link", "add", "name", &bridge, "type", "bridge"])?;
        self.bridge = Some(bridge.clone());
        ip(&["addr", "add", &format!("{}/24", net(1)), "dev", &bridge])?;
        ip(&["link", "set", &bridge, "up"])?;
        // The bridge's address is what makes the subnet visible to the next allocation.
        drop(lock);

        for i in 0..pods {
            let host = u8::try_from(i + 2)
                .ok()
                .filter(|h| *h < 255)
                .context("too many steps: at most 253 pods fit in the chain's /24")?;
            let ns = format!("{NETNS_PREFIX}{pid}-{instance}-{i}");
            ip(&["netns", "add", &ns]).map_err(|e| {
                e.context(format!(
                    "creating network namespace {ns} (`ip netns add` needs root / CAP_SYS_ADMIN)"
                ))
            })?;
            self.netns.push(ns.clone());
            let veth = iface_name(pid, instance, &i.to_string())?;
            ip(&[
                "link", "add", "name", &veth, "type", "veth", "peer", "name", "eth0", "netns", &ns,
            ])?;
            self.veths.push(veth.clone());
            ip(&["link", "set", &veth, "master", &bridge, "up"])?;
            let pod_ip = net(host);
            ip(&[
                "-n",
                &ns,
                "addr",
                "add",
                &format!("{pod_ip}/24"),
                "dev",
                "eth0",
            ])?;
            ip(&["-n", &ns, "link", "set", "eth0", "up"])?;
            ip(&["-n", &ns, "link", "set", "lo", "up"])?;
            self.pod_ips.push(pod_ip);
        }
        Ok(())
    }

    fn spawn_pods(&mut self, cfg: &KnativeChainConfig) -> anyhow::Result<()> {
        let host_ip = self
            .pod_ips
            .first()
            .map(|ip| Ipv4Addr::new(ip.octets()[0], ip.octets()[1], ip.octets()[2], 1))
            .unwrap_or(Ipv4Addr::UNSPECIFIED);
        // Downstream first, so that each function's next hop exists when it starts.
        for i in (0..cfg.steps.len()).rev() {
            let step = &cfg.steps[i];
            let ns = self.netns[i].clone();
            let pod_ip = self.pod_ips[i];

            let mut function = Command::new("ip");
            function
                .args(["netns", "exec", &ns])
                .arg(&cfg.sample_chain_bin)
                .args(["http", step, &format!("127.0.0.1:{USER_PORT}")]);
            if let Some(next) = self.pod_ips.get(i + 1) {
                function.arg(format!("http://{next}:{QUEUE_SERVING_PORT}/"));
            }
            // What Knative gives the user container.
            function
                .env("PORT", USER_PORT.to_string())
                .env("K_SERVICE", step)
                .env("K_CONFIGURATION", step)
                .env("K_REVISION", revision_name(step));
            self.spawn(i, format!("pod {i} ({step}) function"), function)?;

            let mut queue = Command::new("ip");
            queue
                .args(["netns", "exec", &ns])
                .arg(&cfg.queue_bin)
                .env_clear()
                .env(
                    "PATH",
                    "/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin",
                );
            for (k, v) in queue_proxy_env(step, i, pod_ip, host_ip, cfg.container_concurrency) {
                queue.env(k, v);
            }
            self.spawn(i, format!("pod {i} ({step}) queue-proxy"), queue)?;
        }
        Ok(())
    }

    fn spawn(&mut self, pod: usize, label: String, mut cmd: Command) -> anyhow::Result<()> {
        let file_name: String = label
            .chars()
            .map(|c| if c.is_ascii_alphanumeric() { c } else { '-' })
            .collect();
        let log = self.log_dir.join(format!("{file_name}.log"));
        let out = File::create(&log).with_context(|| format!("creating {}", log.display()))?;
        let err = out.try_clone()?;
        // `ip netns exec` enters the namespace and execs the program: the child's pid is the
        // program's own pid.
        let child = cmd
            .stdin(Stdio::null())
            .stdout(out)
            .stderr(err)
            .spawn()
            .with_context(|| format!("starting {label}: {cmd:?}"))?;
        self.procs.push(PodProcess {
            label,
            pod,
            child,
            log,
        });
        Ok(())
    }

    fn wait_ready(&mut self, cfg: &KnativeChainConfig) -> anyhow::Result<()> {
        let deadline = Instant::now() + READY_DEADLINE;
        // Each queue-proxy, last pod first, answers the kubelet's readiness probe once its user
        // container accepts connections; then the whole chain must answer through the entry.
        for i in (0..cfg.steps.len()).rev() {
            let addr = SocketAddr::V4(SocketAddrV4::new(self.pod_ips[i], QUEUE_SERVING_PORT));
            let probe = request(
                "GET",
                addr,
                &[
                    ("User-Agent", "kube-probe/1.34"),
                    ("K-Network-Probe", "queue"),
                ],
                b"",
            );
            let what = format!("pod {i} ({}) readiness probe", cfg.steps[i]);
            self.poll(deadline, &what, Some(i), addr, &probe, |status, body| {
                status == 200 && body == b"queue"
            })?;
        }
        let entry = self.entry();
        let post = request(
            "POST",
            entry,
            &[("Content-Type", "text/plain")],
            PROBE_BODY.as_bytes(),
        );
        self.poll(
            deadline,
            "chain request",
            None,
            entry,
            &post,
            |status, body| status == 200 && contains(body, b"\"motion\""),
        )
    }

    /// Sends `req` to `addr` every 50 ms until `ok` accepts the answer, a process of the
    /// topology exits, or the deadline passes. A timeout error carries the log tails of `pod`'s
    /// processes, or of all processes when `pod` is `None`.
    fn poll(
        &mut self,
        deadline: Instant,
        what: &str,
        pod: Option<usize>,
        addr: SocketAddr,
        req: &[u8],
        ok: impl Fn(u16, &[u8]) -> bool,
    ) -> anyhow::Result<()> {
        loop {
            if let Some(dead) = self.exited() {
                bail!("{dead}");
            }
            let last = match exchange(addr, req, Duration::from_secs(2)) {
                Ok((status, body)) if ok(status, &body) => return Ok(()),
                Ok((status, body)) => {
                    format!("HTTP {status}: {}", String::from_utf8_lossy(&body).trim())
                }
                Err(e) => e.to_string(),
            };
            if Instant::now() >= deadline {
                bail!(
                    "{what} at http://{addr}/ did not succeed within {}s (last answer: {last}){}",
                    READY_DEADLINE.as_secs(),
                    self.log_tails(pod)
                );
            }
            std::thread::sleep(Duration::from_millis(50));
        }
    }

    /// A description of the first process that has exited, with its log tail.
    fn exited(&mut self) -> Option<String> {
        self.procs
            .iter_mut()
            .find_map(|p| match p.child.try_wait() {
                Ok(Some(status)) => Some(format!(
                    "{} exited during start-up ({status}); its log ends with:\n{}",
                    p.label,
                    tail(&p.log)
                )),
                _ => None,
            })
    }

    fn log_tails(&self, pod: Option<usize>) -> String {
        let mut out = String::new();
        for p in &self.procs {
            if pod.is_none_or(|i| i == p.pod) {
                let _ = write!(out, "\n--- {} log ends with:\n{}", p.label, tail(&p.log));
            }
        }
        out
    }
}

impl Drop for KnativeChain {
    fn drop(&mut self) {
        for p in &mut self.procs {
            let _ = p.child.kill();
            let _ = p.child.wait();
        }
        self.procs.clear();
        for ns in self.netns.drain(..) {
            let _ = ip(&["netns", "del", &ns]);
        }
        // Deleting a namespace takes its veth pair with it; these are for half-built pods.
        for veth in self.veths.drain(..) {
            if iface_exists(&veth) {
                let _ = ip(&["link", "del", &veth]);
            }
        }
        if let Some(bridge) = self.bridge.take() {
            let _ = ip(&["link", "del", &bridge]);
        }
        let _ = fs::remove_dir_all(&self.log_dir);
    }
}

/// The environment Knative's revision reconciler gives queue-proxy (serving v1.23,
/// `makeQueueContainer`), for a revision named after its step with stock defaults.
fn queue_proxy_env(
    step: &str,
    index: usize,
    pod_ip: Ipv4Addr,
    host_ip: Ipv4Addr,
    container_concurrency: u32,
) -> Vec<(&'static str, String)> {
    let revision = revision_name(step);
    vec![
        ("SERVING_NAMESPACE", "default".into()),
        ("SERVING_SERVICE", step.into()),
        ("SERVING_CONFIGURATION", step.into()),
        ("SERVING_REVISION", revision.clone()),
        ("QUEUE_SERVING_PORT", QUEUE_SERVING_PORT.to_string()),
        ("QUEUE_SERVING_TLS_PORT", "8112".into()),
        ("CONTAINER_CONCURRENCY", container_concurrency.to_string()),
        ("REVISION_TIMEOUT_SECONDS", "300".into()),
        ("REVISION_RESPONSE_START_TIMEOUT_SECONDS", "0".into()),
        ("REVISION_IDLE_TIMEOUT_SECONDS", "0".into()),
        ("SERVING_POD", format!("{revision}-deployment-kc{index}")),
        ("SERVING_POD_IP", pod_ip.to_string()),
        ("SERVING_LOGGING_CONFIG", STOCK_ZAP_CONFIG.into()),
        ("SERVING_LOGGING_LEVEL", "info".into()),
        ("USER_PORT", USER_PORT.to_string()),
        ("SYSTEM_NAMESPACE", "knative-serving".into()),
        (
            "SERVING_READINESS_PROBE",
            format!(r#"{{"tcpSocket":{{"port":{USER_PORT},"host":"127.0.0.1"}}}}"#),
        ),
        ("HOST_IP", host_ip.to_string()),
        ("ENABLE_HTTP2_AUTO_DETECTION", "false".into()),
        ("ENABLE_HTTP_FULL_DUPLEX", "false".into()),
        ("ROOT_CA", String::new()),
        ("QUEUE_PROXY_TLS_MIN_VERSION", String::new()),
        ("QUEUE_PROXY_TLS_MAX_VERSION", String::new()),
        ("QUEUE_PROXY_TLS_CIPHER_SUITES", String::new()),
        ("QUEUE_PROXY_TLS_CURVE_PREFERENCES", String::new()),
        ("ENABLE_MULTI_CONTAINER_PROBES", "false".into()),
        ("OBSERVABILITY_CONFIG", STOCK_OBSERVABILITY_CONFIG.into()),
    ]
}

fn revision_name(step: &str) -> String {
    format!("{step}-00001")
}

fn check_config(cfg: &KnativeChainConfig) -> anyhow::Result<()> {
    if cfg.steps.is_empty() {
        bail!("the Knative chain needs at least one step");
    }
    for (what, path, how) in [
        (
            "spright-sample-chain",
            &cfg.sample_chain_bin,
            "cargo build --release -p spright-sample-chain",
        ),
        (
            "queue-proxy",
            &cfg.queue_bin,
            "go install knative.dev/serving/cmd/queue@v0.50.0",
        ),
    ] {
        if !path.is_file() {
            bail!(
                "{what} binary not found at {} (install it with `{how}`)",
                path.display()
            );
        }
    }
    Ok(())
}

/// Namespaces, veths and bridges need CAP_SYS_ADMIN and CAP_NET_ADMIN: say so up front instead
/// of failing half-way through with a bare `Operation not permitted`.
fn check_capabilities() -> anyhow::Result<()> {
    const CAP_NET_ADMIN: u32 = 12;
    const CAP_SYS_ADMIN: u32 = 21;
    let status = fs::read_to_string("/proc/self/status").context("reading /proc/self/status")?;
    let effective = status
        .lines()
        .find_map(|l| l.strip_prefix("CapEff:"))
        .and_then(|hex| u64::from_str_radix(hex.trim(), 16).ok())
        .context("no CapEff line in /proc/self/status")?;
    let missing: Vec<&str> = [
        (CAP_SYS_ADMIN, "CAP_SYS_ADMIN"),
        (CAP_NET_ADMIN, "CAP_NET_ADMIN"),
    ]
    .into_iter()
    .filter(|(bit, _)| effective & (1 << bit) == 0)
    .map(|(_, name)| name)
    .collect();
    if !missing.is_empty() {
        bail!(
            "the Knative chain creates network namespaces, veths and a bridge (`ip netns add`, \
             `ip link add`): run it as root; this process lacks {}",
            missing.join(" and ")
        );
    }
    Ok(())
}

/// `kc<pid hex>-<instance>-<suffix>`, checked against the kernel's 15-byte limit.
fn iface_name(pid: u32, instance: u32, suffix: &str) -> anyhow::Result<String> {
    let name = format!("{IFACE_PREFIX}{pid:x}-{instance}-{suffix}");
    if name.len() > 15 {
        bail!("interface name {name} is longer than 15 bytes (too many chains in one process)");
    }
    Ok(name)
}

/// Holds an exclusive lock on a file shared by every run on this machine while held.
fn lock_allocation() -> anyhow::Result<File> {
    let path = std::env::temp_dir().join("spright-kc.lock");
    let file = OpenOptions::new()
        .create(true)
        .truncate(false)
        .write(true)
        .open(&path)
        .with_context(|| format!("opening {}", path.display()))?;
    file.lock()
        .with_context(|| format!("locking {}", path.display()))?;
    Ok(file)
}

/// Runs `ip <args>`; a non-zero exit is an error carrying ip's stderr.
fn ip(args: &[&str]) -> anyhow::Result<()> {
    ip_text(args).map(drop)
}

fn ip_text(args: &[&str]) -> anyhow::Result<String> {
    let out = Command::new("ip")
        .args(args)
        .stdin(Stdio::null())
        .output()
        .context("running `ip` (iproute2 is required)")?;
    if !out.status.success() {
        bail!(
            "`ip {}` failed ({}): {}",
            args.join(" "),
            out.status,
            String::from_utf8_lossy(&out.stderr).trim()
        );
    }
    Ok(String::from_utf8_lossy(&out.stdout).into_owned())
}

fn iface_exists(name: &str) -> bool {
    Path::new("/sys/class/net").join(name).exists()
}

/// Removes namespaces, bridges and log directories of runs whose process no longer exists (a run killed before
/// it could drop its chain). Best effort: errors are ignored.
fn reclaim_stale() {
    let alive = |pid: &str| Path::new("/proc").join(pid).exists();
    if let Ok(list) = ip_text(&["netns", "list"]) {
        for name in list.split_whitespace() {
            let Some(rest) = name.strip_prefix(NETNS_PREFIX) else {
                continue;
            };
            let Some(pid) = rest.split('-').next() else {
                continue;
            };
            if pid.parse::<u32>().is_err() || alive(pid) {
                continue;
            }
            if let Ok(pids) = ip_text(&["netns", "pids", name]) {
                for p in pids.split_whitespace() {
                    let _ = Command::new("kill").args(["-KILL", p]).output();
                }
            }
            let _ = ip(&["netns", "del", name]);
        }
    }
    if let Ok(dir) = fs::read_dir(std::env::temp_dir()) {
        for entry in dir.filter_map(Result::ok) {
            let name = entry.file_name().to_string_lossy().into_owned();
            let Some(pid) = name
                .strip_prefix(NETNS_PREFIX)
                .and_then(|rest| rest.split('-').next())
            else {
                continue;
            };
            if pid.parse::<u32>().is_ok() && !alive(pid) {
                let _ = fs::remove_dir_all(entry.path());
            }
        }
    }
    if let Ok(list) = ip_text(&["-o", "link", "show", "type", "bridge"]) {
        for line in list.lines() {
            let Some(name) = line.split(": ").nth(1) else {
                continue;
            };
            let Some(rest) = name.strip_prefix(IFACE_PREFIX) else {
                continue;
            };
            let Some(pid) = rest
                .split('-')
                .next()
                .and_then(|h| u32::from_str_radix(h, 16).ok())
            else {
                continue;
            };
            if rest.ends_with("-b") && !alive(&pid.to_string()) {
                let _ = ip(&["link", "del", name]);
            }
        }
    }
}

/// The last lines (at most 3 KiB) of a log file.
fn tail(path: &Path) -> String {
    match fs::read(path) {
        Ok(bytes) => {
            let start = bytes.len().saturating_sub(3 * 1024);
            let text = String::from_utf8_lossy(&bytes[start..]);
            let lines: Vec<&str> = text.lines().collect();
            if lines.is_empty() {
                return "(empty)".to_owned();
            }
            lines[lines.len().saturating_sub(20)..].join("\n")
        }
        Err(e) => format!("(log unreadable: {e})"),
    }
}

fn contains(haystack: &[u8], needle: &[u8]) -> bool {
    haystack.windows(needle.len()).any(|w| w == needle)
}

/// An HTTP/1.1 request that closes the connection after the answer.
fn request(method: &str, addr: SocketAddr, headers: &[(&str, &str)], body: &[u8]) -> Vec<u8> {
    let mut head = format!(
        "{method} / HTTP/1.1\r\nHost: {addr}\r\nConnection: close\r\nContent-Length: {}\r\n",
        body.len()
    );
    for (k, v) in headers {
        let _ = write!(head, "{k}: {v}\r\n");
    }
    head.push_str("\r\n");
    let mut req = head.into_bytes();
    req.extend_from_slice(body);
    req
}

/// Sends one request and reads the answer until the server closes: (status, body).
fn exchange(addr: SocketAddr, req: &[u8], timeout: Duration) -> io::Result<(u16, Vec<u8>)> {
    let mut stream = TcpStream::connect_timeout(&addr, timeout)?;
    stream.set_read_timeout(Some(timeout))?;
    stream.set_write_timeout(Some(timeout))?;
    stream.write_all(req)?;
    let mut raw = Vec::new();
    stream.read_to_end(&mut raw)?;
    parse_response(&raw)
}

fn invalid(msg: &str) -> io::Error {
    io::Error::new(io::ErrorKind::InvalidData, msg.to_owned())
}

/// Parses a complete HTTP/1.1 response (Content-Length, chunked, or read-to-close body).
fn parse_response(raw: &[u8]) -> io::Result<(u16, Vec<u8>)> {
    let end = raw
        .windows(4)
        .position(|w| w == b"\r\n\r\n")
        .ok_or_else(|| invalid("incomplete HTTP response head"))?;
    let head = std::str::from_utf8(&raw[..end]).map_err(|_| invalid("non-UTF-8 response head"))?;
    let mut lines = head.split("\r\n");
    let status = lines
        .next()
        .and_then(|l| l.split(' ').nth(1))
        .and_then(|c| c.parse::<u16>().ok())
        .ok_or_else(|| invalid("malformed HTTP status line"))?;
    let mut length = None;
    let mut chunked = false;
    for line in lines {
        let Some((name, value)) = line.split_once(':') else {
            continue;
        };
        let value = value.trim();
        if name.eq_ignore_ascii_case("content-length") {
            length = Some(
                value
                    .parse::<usize>()
                    .map_err(|_| invalid("bad Content-Length"))?,
            );
        } else if name.eq_ignore_ascii_case("transfer-encoding") {
            chunked = value.to_ascii_lowercase().contains("chunked");
        }
    }
    let rest = &raw[end + 4..];
    let body = if chunked {
        dechunk(rest)?
    } else if let Some(n) = length {
        rest.get(..n)
            .ok_or_else(|| invalid("truncated HTTP body"))?
            .to_vec()
    } else {
        rest.to_vec()
    };
    Ok((status, body))
}

fn dechunk(mut rest: &[u8]) -> io::Result<Vec<u8>> {
    let mut body = Vec::new();
    loop {
        let eol = rest
            .windows(2)
            .position(|w| w == b"\r\n")
            .ok_or_else(|| invalid("truncated chunk size"))?;
        let size_text = std::str::from_utf8(&rest[..eol]).map_err(|_| invalid("bad chunk size"))?;
        let size_text = size_text.split(';').next().unwrap_or("").trim();
        let size = usize::from_str_radix(size_text, 16).map_err(|_| invalid("bad chunk size"))?;
        rest = &rest[eol + 2..];
        if size == 0 {
            return Ok(body);
        }
        let chunk = rest.get(..size).ok_or_else(|| invalid("truncated chunk"))?;
        body.extend_from_slice(chunk);
        rest = rest
            .get(size + 2..)
            .ok_or_else(|| invalid("truncated chunk"))?;
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn parses_length_chunked_and_close_delimited_answers() {
        let r = b"HTTP/1.1 200 OK\r\nContent-Length: 5\r\n\r\nqueueXX";
        assert_eq!(parse_response(r).ok(), Some((200, b"queue".to_vec())));
        let r = b"HTTP/1.1 502 Bad Gateway\r\nTransfer-Encoding: chunked\r\n\r\n3\r\nabc\r\n2;x=1\r\nde\r\n0\r\n\r\n";
        assert_eq!(parse_response(r).ok(), Some((502, b"abcde".to_vec())));
        let r = b"HTTP/1.0 503 Service Unavailable\r\n\r\nshutting down";
        assert_eq!(
            parse_response(r).ok(),
            Some((503, b"shutting down".to_vec()))
        );
    }

    #[test]
    fn malformed_answers_are_errors_not_panics() {
        for r in [
            &b""[..],
            b"HTTP/1.1 200 OK\r\n",
            b"garbage\r\n\r\n",
            b"HTTP/1.1 abc OK\r\n\r\n",
            b"HTTP/1.1 200 OK\r\nContent-Length: 9\r\n\r\nshort",
            b"HTTP/1.1 200 OK\r\nContent-Length: -1\r\n\r\n",
            b"HTTP/1.1 200 OK\r\nTransfer-Encoding: chunked\r\n\r\nzz\r\n",
            b"HTTP/1.1 200 OK\r\nTransfer-Encoding: chunked\r\n\r\n10\r\nabc",
            b"HTTP/1.1 200 OK\r\nTransfer-Encoding: chunked\r\n\r\n3\r\nabc",
        ] {
            assert!(parse_response(r).is_err(), "{}", String::from_utf8_lossy(r));
        }
        // Random bytes, with and without a valid head in front.
        let mut x: u64 = 0x2545_F491_4F6C_DD1D;
        for round in 0..5_000 {
            let mut buf = if round % 2 == 0 {
                b"HTTP/1.1 200 OK\r\nTransfer-Encoding: chunked\r\n\r\n".to_vec()
            } else {
                Vec::new()
            };
            for _ in 0..(x % 64) {
                x ^= x << 13;
                x ^= x >> 7;
                x ^= x << 17;
                let alphabet = b"0123456789abcdef\r\n;: HTTP/1.1";
                buf.push(alphabet[(x % alphabet.len() as u64) as usize]);
            }
            let _ = parse_response(&buf);
        }
    }

    #[test]
    fn queue_proxy_gets_every_variable_it_requires() {
        let env = queue_proxy_env(
            "detect",
            2,
            Ipv4Addr::new(10, 213, 7, 4),
            Ipv4Addr::new(10, 213, 7, 1),
            0,
        );
        let get = |k: &str| env.iter().find(|(n, _)| *n == k).map(|(_, v)| v.as_str());
        // Required by envconfig in pkg/queue/sharedmain/main.go (`config` and `Env`).
        for k in [
            "CONTAINER_CONCURRENCY",
            "QUEUE_SERVING_PORT",
            "QUEUE_SERVING_TLS_PORT",
            "USER_PORT",
            "REVISION_TIMEOUT_SECONDS",
            "SERVING_LOGGING_CONFIG",
            "SERVING_LOGGING_LEVEL",
            "SERVING_NAMESPACE",
            "SERVING_CONFIGURATION",
            "SERVING_REVISION",
            "SERVING_POD",
            "SERVING_POD_IP",
        ] {
            assert!(get(k).is_some(), "{k} missing");
        }
        assert_eq!(get("USER_PORT"), Some("8080"));
        assert_eq!(get("QUEUE_SERVING_PORT"), Some("8012"));
        assert_eq!(get("SERVING_POD_IP"), Some("10.213.7.4"));
        assert_eq!(
            get("SERVING_READINESS_PROBE"),
            Some(r#"{"tcpSocket":{"port":8080,"host":"127.0.0.1"}}"#)
        );
        assert_eq!(get("SERVING_REVISION"), Some("detect-00001"));
    }

    #[test]
    fn interface_names_fit_the_kernel_limit() {
        assert_eq!(
            iface_name(4_194_304, 12, "b").ok().as_deref(),
            Some("kc400000-12-b")
        );
        assert!(iface_name(4_194_304, 99, "252").is_ok());
        assert!(iface_name(4_194_304, 1000, "252").is_err());
    }

    /// Where the test finds `spright-sample-chain`: `SPRIGHT_SAMPLE_CHAIN_BIN`, else the release
    /// or debug binary of the target directory this test runs from.
    fn sample_chain_bin() -> PathBuf {
        if let Some(p) = std::env::var_os("SPRIGHT_SAMPLE_CHAIN_BIN") {
            return PathBuf::from(p);
        }
        let exe = std::env::current_exe().unwrap_or_default();
        // <target>/<profile>/deps/<test binary>
        let target = exe.ancestors().nth(3).map(Path::to_path_buf);
        let candidates: Vec<PathBuf> = target
            .iter()
            .flat_map(|t| ["release", "debug"].map(|p| t.join(p).join("spright-sample-chain")))
            .collect();
        candidates
            .iter()
            .find(|p| p.is_file())
            .cloned()
            .unwrap_or_else(|| {
                panic!(
                    "spright-sample-chain not found: set SPRIGHT_SAMPLE_CHAIN_BIN or run \
                     `cargo build --release -p spright-sample-chain` first (looked at {candidates:?})"
                )
            })
    }

    fn our_leftovers() -> (Vec<String>, Vec<String>) {
        let pid = std::process::id();
        let ns_prefix = format!("{NETNS_PREFIX}{pid}-");
        let if_prefix = format!("{IFACE_PREFIX}{pid:x}-");
        let netns = ip_text(&["netns", "list"])
            .unwrap_or_default()
            .split_whitespace()
            .filter(|n| n.starts_with(&ns_prefix))
            .map(str::to_owned)
            .collect();
        let ifaces = fs::read_dir("/sys/class/net")
            .map(|d| {
                d.filter_map(Result::ok)
                    .map(|e| e.file_name().to_string_lossy().into_owned())
                    .filter(|n| n.starts_with(&if_prefix))
                    .collect()
            })
            .unwrap_or_default();
        (netns, ifaces)
    }

    /// Needs root and iproute2, Knative's queue-proxy (`SPRIGHT_QUEUE_BIN`, default
    /// /root/go/bin/queue) and spright-sample-chain (see [`sample_chain_bin`]).
    #[test]
    fn chain_answers_through_real_queue_proxies_and_cleans_up() {
        let cfg = KnativeChainConfig {
            sample_chain_bin: sample_chain_bin(),
            queue_bin: std::env::var_os("SPRIGHT_QUEUE_BIN")
                .map_or_else(|| PathBuf::from("/root/go/bin/queue"), PathBuf::from),
            steps: ["decode", "denoise", "detect", "alert"]
                .map(String::from)
                .to_vec(),
            container_concurrency: 0,
        };
        let chain = match KnativeChain::start(&cfg) {
            Ok(c) => c,
            Err(e) => panic!("starting the Knative chain: {e:#}"),
        };
        assert_eq!(chain.pids().len(), 8);
        for pid in chain.pids() {
            assert!(
                Path::new("/proc")
                    .join(pid.to_string())
                    .join("stat")
                    .exists()
            );
        }
        let url = chain.url();
        assert!(
            url.starts_with("http://10.213.") && url.ends_with(":8012/"),
            "{url}"
        );
        let body = "0.01,-0.02,1.0\n0.01,-0.02,1.0\n0.01,-0.02,4.0\n0.01,-0.02,1.0\n";
        let req = request("POST", chain.entry(), &[], body.as_bytes());
        let (status, answer) = match exchange(chain.entry(), &req, Duration::from_secs(5)) {
            Ok(r) => r,
            Err(e) => panic!("request to {url}: {e}"),
        };
        let answer = String::from_utf8_lossy(&answer).into_owned();
        assert_eq!(status, 200, "{answer}");
        assert!(answer.contains("\"motion\":true"), "{answer}");
        let pids = chain.pids();
        drop(chain);
        assert_eq!(our_leftovers(), (Vec::new(), Vec::new()));
        for pid in pids {
            assert!(
                !Path::new("/proc").join(pid.to_string()).exists(),
                "{pid} survived"
            );
        }
    }
}
