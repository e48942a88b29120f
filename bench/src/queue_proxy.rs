//! `spright-bench queue-proxy`: one run measures the same upstream four ways, side by side:
//! direct, through Knative's queue-proxy, through ours (queue-proxy-ebpf), and through nginx
//! as a reverse proxy; at 1 and 32 connections, and with containerConcurrency 10 for the two
//! queue-proxies. Proxy and upstream are pinned to one core, wrk to the other.
//!
//! Reported per row: requests/s, p50 and p99 latency (wrk), the proxy's CPU seconds per
//! 10,000 requests (utime+stime from /proc/<pid>/stat), its peak RSS (VmHWM from
//! /proc/<pid>/status) and, once per proxy, its CPU use over an idle period.
//!
//! The upstream is nginx answering a fixed 6-byte body itself (`return 200`), so the proxies
//! are the only variable. Everything listens on loopback; configs live in a temp dir that is
//! removed afterwards. Needs `wrk`, `nginx` and `taskset` (Debian: wrk, nginx-light,
//! util-linux) and Knative's queue-proxy at /root/go/bin/queue.

use std::fmt::Write as _;
use std::net::TcpStream;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

use anyhow::{Context, Result, bail};

use crate::measure::{WrkResult, cpu_seconds, parse_wrk, peak_rss_kb};

/// Event-driven mode (EPROXY) rows: qp_eproxy.rs.
#[path = "qp_eproxy.rs"]
mod eproxy;

/// Full mode rows: qp_full.rs.
#[path = "qp_full.rs"]
mod full;

/// Knative's fixed ports (admin, autoscaler stats) the queue-proxies bind.
const FIXED_PORTS: [u16; 2] = [8022, 9090];
const UPSTREAM_PORT: u16 = 18080;
const PROXY_PORT: u16 = 18012;

#[derive(Debug, Clone, clap::Args)]
pub struct QueueProxyBenchArgs {
    /// Seconds of load per measurement.
    #[arg(long, default_value_t = 10)]
    pub duration: u64,
    /// Connection counts to measure.
    #[arg(long, value_delimiter = ',', default_values_t = vec![1, 32])]
    pub connections: Vec<u32>,
    /// Seconds of idle CPU measurement per proxy (0 skips it).
    #[arg(long, default_value_t = 30)]
    pub idle_secs: u64,
    /// Also measure the queue-proxies with this containerConcurrency (0 disables).
    #[arg(long, default_value_t = 10)]
    pub cc: u32,
    /// Core for the proxy and the upstream.
    #[arg(long, default_value_t = 0)]
    pub proxy_cpu: u32,
    /// Core for the load generator.
    #[arg(long, default_value_t = 1)]
    pub load_cpu: u32,
    /// Knative's queue-proxy binary.
    #[arg(long, default_value = "/root/go/bin/queue")]
    pub knative: PathBuf,
    /// Our queue-proxy binary (default: `queue-proxy-ebpf` next to this binary).
    #[arg(long)]
    pub ours: Option<PathBuf>,
    /// Write the rows as JSON to this path.
    #[arg(long)]
    pub json: Option<PathBuf>,
}

/// One measured configuration.
#[derive(Debug, Clone, PartialEq)]
pub struct Row {
    pub name: &'static str,
    pub connections: u32,
    pub container_concurrency: u32,
    pub rps: f64,
    pub p50_us: f64,
    pub p99_us: f64,
    pub requests: u64,
    /// `None` for the direct path (no proxy process).
    pub cpu_s_per_10k: Option<f64>,
    pub rss_kb: Option<u64>,
    pub idle_cpu_s: Option<f64>,
}

struct Running {
    child: Child,
}

impl Drop for Running {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

impl Running {
    fn pid(&self) -> u32 {
        self.child.id()
    }
}

fn port_open(port: u16) -> bool {
    TcpStream::connect_timeout(&([127, 0, 0, 1], port).into(), Duration::from_millis(100)).is_ok()
}

fn wait_ports(ports: &[u16], child: &mut Child, what: &str) -> Result<()> {
    let end = Instant::now() + Duration::from_secs(10);
    while Instant::now() < end {
        if ports.iter().all(|p| port_open(*p)) {
            return Ok(());
        }
        if let Some(s) = child.try_wait()? {
            bail!("{what} exited early: {s}");
        }
        std::thread::sleep(Duration::from_millis(20));
    }
    bail!("{what} did not open ports {ports:?}")
}

fn wait_free(ports: &[u16]) -> Result<()> {
    let end = Instant::now() + Duration::from_secs(10);
    while Instant::now() < end {
        if !ports.iter().any(|p| port_open(*p)) {
            return Ok(());
        }
        std::thread::sleep(Duration::from_millis(50));
    }
    bail!("ports {ports:?} stay busy: is another queue-proxy or nginx running?")
}

fn pinned(cpu: u32, program: &Path) -> Command {
    let mut c = Command::new("taskset");
    c.arg("-c").arg(cpu.to_string()).arg(program);
    c
}

fn nginx_conf(dir: &Path, name: &str, port: u16, location: &str) -> Result<PathBuf> {
    let path = dir.join(format!("{name}.conf"));
    let conf = format!(
        "daemon off;\nmaster_process off;\nworker_processes 1;\nerror_log {dir}/{name}.error.log warn;\npid {dir}/{name}.pid;\n\
events {{ worker_connections 4096; }}\n\
http {{\n  access_log off;\n  client_body_temp_path {dir}/{name}.body;\n  proxy_temp_path {dir}/{name}.proxy;\n\
  fastcgi_temp_path {dir}/{name}.fcgi;\n  uwsgi_temp_path {dir}/{name}.uwsgi;\n  scgi_temp_path {dir}/{name}.scgi;\n\
  keepalive_requests 1000000;\n\
  upstream user {{ server 127.0.0.1:{UPSTREAM_PORT}; keepalive 64; }}\n\
  server {{\n    listen 127.0.0.1:{port};\n    location / {{ {location} }}\n  }}\n}}\n",
        dir = dir.display()
    );
    std::fs::write(&path, conf)?;
    Ok(path)
}

fn start_nginx(cpu: u32, conf: &Path, port: u16, what: &str) -> Result<Running> {
    spawn_nginx(pinned(cpu, Path::new("nginx")), conf, port, what)
}

/// Runs nginx with `conf` through `launcher` (a pinned `nginx` command) until it listens on
/// `port`.
fn spawn_nginx(mut launcher: Command, conf: &Path, port: u16, what: &str) -> Result<Running> {
    let mut child = launcher
        .arg("-c")
        .arg(conf)
        .arg("-e")
        .arg("stderr")
        .stdout(Stdio::null())
        .stderr(Stdio::null())
        .spawn()
        .with_context(|| format!("starting {what} (apt-get install nginx-light)"))?;
    wait_ports(&[port], &mut child, what)?;
    Ok(Running { child })
}

fn queue_env(cc: u32) -> Vec<(&'static str, String)> {
    [
        ("SERVING_NAMESPACE", "default"),
        ("SERVING_SERVICE", "bench"),
        ("SERVING_CONFIGURATION", "bench"),
        ("SERVING_REVISION", "bench-00001"),
        ("SERVING_POD", "bench-00001-deployment-0"),
        ("SERVING_POD_IP", "127.0.0.1"),
        ("QUEUE_SERVING_TLS_PORT", "18112"),
        ("REVISION_TIMEOUT_SECONDS", "300"),
        ("SERVING_LOGGING_CONFIG", ""),
        ("SERVING_LOGGING_LEVEL", "warn"),
        ("SYSTEM_NAMESPACE", "knative-serving"),
        ("ENABLE_HTTP2_AUTO_DETECTION", "false"),
        ("OBSERVABILITY_CONFIG", r#"{"requestMetrics":{"protocol":"none"}}"#),
    ]
    .into_iter()
    .map(|(k, v)| (k, v.to_owned()))
    .chain([
        ("QUEUE_SERVING_PORT", PROXY_PORT.to_string()),
        ("USER_PORT", UPSTREAM_PORT.to_string()),
        ("CONTAINER_CONCURRENCY", cc.to_string()),
        (
            "SERVING_READINESS_PROBE",
            format!(r#"{{"tcpSocket":{{"port":{UPSTREAM_PORT},"host":"127.0.0.1"}},"successThreshold":1}}"#),
        ),
    ])
    .collect()
}

fn start_queue(cpu: u32, binary: &Path, cc: u32, what: &str) -> Result<Running> {
    spawn_queue(
        pinned(cpu, binary),
        cc,
        Vec::new(),
        &[PROXY_PORT, FIXED_PORTS[0], FIXED_PORTS[1]],
        &format!("{what} ({})", binary.display()),
        Stdio::null(),
    )
}

/// Runs a queue-proxy through `launcher` (a pinned command of its binary) with only Knative's
/// variables for containerConcurrency `cc`, overridden by `extra`; waits until its `ports`
/// are free, then until it listens on them.
fn spawn_queue(
    mut launcher: Command,
    cc: u32,
    extra: Vec<(&'static str, String)>,
    ports: &[u16],
    what: &str,
    stderr: Stdio,
) -> Result<Running> {
    wait_free(ports)?;
    let mut child = launcher
        .env_clear()
        .env("PATH", "/usr/bin:/bin")
        .envs(queue_env(cc))
        .envs(extra)
        .stdout(Stdio::null())
        .stderr(stderr)
        .spawn()
        .with_context(|| format!("starting {what}"))?;
    wait_ports(ports, &mut child, what)?;
    Ok(Running { child })
}

/// The warning lines of a queue-proxy-ebpf log when `needle` (what a working kernel path
/// logs) is not in it; `None` when it is.
fn missing_in_log(log: &Path, needle: &str) -> Option<String> {
    let text = std::fs::read_to_string(log).unwrap_or_default();
    if text.contains(needle) {
        return None;
    }
    Some(
        text.lines()
            .filter(|l| l.contains("\"level\":\"warn\"") || l.contains("WARN"))
            .collect::<Vec<_>>()
            .join(" "),
    )
}

/// Busy seconds so far (/proc/stat: all but idle and iowait) of core `cpu`, or of every core
/// for `None`.
fn busy_seconds(cpu: Option<u32>) -> Result<f64> {
    let stat = std::fs::read_to_string("/proc/stat").context("reading /proc/stat")?;
    let prefix = cpu.map_or_else(|| "cpu ".to_owned(), |c| format!("cpu{c} "));
    let line = stat
        .lines()
        .find(|l| l.starts_with(&prefix))
        .with_context(|| format!("no {prefix}line in /proc/stat"))?;
    // user nice system idle iowait irq softirq steal ...
    let ticks: Vec<f64> = line
        .split_whitespace()
        .skip(1)
        .take(8)
        .filter_map(|x| x.parse().ok())
        .collect();
    let idle = ticks.get(3).copied().unwrap_or(0.0) + ticks.get(4).copied().unwrap_or(0.0);
    // SAFETY: sysconf has no preconditions; it only reads a system constant.
    let hz = unsafe { libc::sysconf(libc::_SC_CLK_TCK) };
    Ok((ticks.iter().sum::<f64>() - idle) / if hz > 0 { hz as f64 } else { 100.0 })
}

/// A cgroup of this bench run, `spright-bench-<name>-<pid>`; removed on drop (waiting briefly
/// for its processes to leave it).
struct BenchCgroup {
    path: PathBuf,
}

impl BenchCgroup {
    fn new(name: &str) -> Result<Self> {
        let path = Path::new(spright_ebpf::DEFAULT_CGROUP_PATH)
            .join(format!("spright-bench-{name}-{}", std::process::id()));
        std::fs::create_dir_all(&path)
            .with_context(|| format!("creating {} (cgroup v2, root)", path.display()))?;
        Ok(Self { path })
    }
}

impl Drop for BenchCgroup {
    fn drop(&mut self) {
        for _ in 0..100 {
            if std::fs::remove_dir(&self.path).is_ok() {
                return;
            }
            std::thread::sleep(Duration::from_millis(20));
        }
    }
}

/// CPU seconds per 10,000 requests (NaN without requests).
fn per_10k(seconds: f64, requests: u64) -> f64 {
    if requests == 0 {
        return f64::NAN;
    }
    seconds / requests as f64 * 10_000.0
}

/// Warm-up before measuring `port`: connections, pools, page faults.
fn warm_up(args: &QueueProxyBenchArgs, port: u16) -> Result<()> {
    wrk(args.load_cpu, port, 4, 1).map(drop)
}

/// One wrk run of `args.duration` at `connections` against `port` (`name` in warnings), with
/// `counters` (CPU seconds and the like) read right before and after: wrk's result and how
/// much each counter grew.
fn load(
    args: &QueueProxyBenchArgs,
    name: &str,
    port: u16,
    connections: u32,
    counters: impl Fn() -> Result<Vec<f64>>,
) -> Result<(WrkResult, Vec<f64>)> {
    let before = counters()?;
    let w = wrk(args.load_cpu, port, connections, args.duration)?;
    let after = counters()?;
    if w.errors > 0 {
        eprintln!(
            "warning: {name} at {connections} connections: {} errors",
            w.errors
        );
    }
    let grew = after.iter().zip(&before).map(|(a, b)| a - b).collect();
    Ok((w, grew))
}

impl Row {
    /// What wrk measured for `name` at `connections`; no CPU, memory or idle figures.
    fn measured(name: &'static str, connections: u32, cc: u32, w: &WrkResult) -> Self {
        Self {
            name,
            connections,
            container_concurrency: cc,
            rps: w.rps,
            p50_us: w.p50_us,
            p99_us: w.p99_us,
            requests: w.requests,
            cpu_s_per_10k: None,
            rss_kb: None,
            idle_cpu_s: None,
        }
    }
}

fn wrk(cpu: u32, port: u16, connections: u32, secs: u64) -> Result<WrkResult> {
    let out = pinned(cpu, Path::new("wrk"))
        .args(["-t1", "--latency"])
        .arg(format!("-c{connections}"))
        .arg(format!("-d{secs}s"))
        .arg(format!("http://127.0.0.1:{port}/"))
        .output()
        .context("running wrk (apt-get install wrk)")?;
    if !out.status.success() {
        bail!("wrk failed: {}", String::from_utf8_lossy(&out.stderr));
    }
    parse_wrk(&String::from_utf8_lossy(&out.stdout))
}

fn measure(
    args: &QueueProxyBenchArgs,
    name: &'static str,
    cc: u32,
    port: u16,
    proxy: Option<&Running>,
) -> Result<Vec<Row>> {
    warm_up(args, port)?;
    let mut rows = Vec::new();
    for &c in &args.connections {
        let (w, cpu) = load(args, name, port, c, || {
            proxy.map(|p| cpu_seconds(p.pid())).into_iter().collect()
        })?;
        rows.push(Row {
            cpu_s_per_10k: cpu
                .first()
                .filter(|_| w.requests > 0)
                .map(|s| per_10k(*s, w.requests)),
            rss_kb: proxy.map(|p| peak_rss_kb(p.pid())).transpose()?,
            ..Row::measured(name, c, cc, &w)
        });
    }
    Ok(rows)
}

fn idle_cpu(args: &QueueProxyBenchArgs, p: &Running) -> Result<Option<f64>> {
    if args.idle_secs == 0 {
        return Ok(None);
    }
    let b = cpu_seconds(p.pid())?;
    std::thread::sleep(Duration::from_secs(args.idle_secs));
    Ok(Some(cpu_seconds(p.pid())? - b))
}

fn fmt_opt(v: Option<f64>, prec: usize) -> String {
    v.map_or_else(|| "-".to_owned(), |v| format!("{v:.prec$}"))
}

fn json_num(v: Option<f64>) -> String {
    match v {
        Some(v) if v.is_finite() => format!("{v}"),
        _ => "null".to_owned(),
    }
}

/// The rows as a JSON array.
pub fn to_json(rows: &[Row]) -> String {
    let mut s = String::from("[\n");
    for (i, r) in rows.iter().enumerate() {
        let _ = writeln!(
            s,
            "  {{\"name\": \"{}\", \"connections\": {}, \"container_concurrency\": {}, \"p50_us\": {}, \"p99_us\": {}, \"rps\": {}, \"requests\": {}, \"cpu_s_per_10k\": {}, \"rss_kb\": {}, \"idle_cpu_s\": {}}}{}",
            r.name,
            r.connections,
            r.container_concurrency,
            json_num(Some(r.p50_us)),
            json_num(Some(r.p99_us)),
            json_num(Some(r.rps)),
            r.requests,
            json_num(r.cpu_s_per_10k),
            r.rss_kb
                .map_or_else(|| "null".to_owned(), |v| v.to_string()),
            json_num(r.idle_cpu_s),
            if i + 1 == rows.len() { "" } else { "," }
        );
    }
    s.push(']');
    s.push('\n');
    s
}

fn find<'a>(rows: &'a [Row], name: &str, c: u32, cc: u32) -> Option<&'a Row> {
    rows.iter()
        .find(|r| r.name == name && r.connections == c && r.container_concurrency == cc)
}

fn ratio(a: Option<f64>, b: Option<f64>) -> String {
    match (a, b) {
        (Some(a), Some(b)) if b > 0.0 => format!("{:.2}x", a / b),
        _ => "-".to_owned(),
    }
}

/// The side-by-side table and the ratios the issue's targets are stated in.
pub fn report(rows: &[Row]) -> String {
    let mut s = String::new();
    let _ = writeln!(
        s,
        "{:<8} {:>5} {:>4} {:>10} {:>10} {:>10} {:>12} {:>9} {:>9}",
        "path", "conns", "cc", "rps", "p50_us", "p99_us", "cpu_s/10k", "rss_kb", "idle_cpu"
    );
    for r in rows {
        let _ = writeln!(
            s,
            "{:<8} {:>5} {:>4} {:>10.0} {:>10.1} {:>10.1} {:>12} {:>9} {:>9}",
            r.name,
            r.connections,
            r.container_concurrency,
            r.rps,
            r.p50_us,
            r.p99_us,
            fmt_opt(r.cpu_s_per_10k, 4),
            r.rss_kb.map_or_else(|| "-".into(), |v| v.to_string()),
            fmt_opt(r.idle_cpu_s, 3),
        );
    }
    let conns: Vec<u32> = {
        let mut c: Vec<u32> = rows.iter().map(|r| r.connections).collect();
        c.sort_unstable();
        c.dedup();
        c
    };
    for c in conns {
        let (k, o, n, d) = (
            find(rows, "knative", c, 0),
            find(rows, "ours", c, 0),
            find(rows, "nginx", c, 0),
            find(rows, "direct", c, 0),
        );
        let added = |r: Option<&Row>| match (r, d) {
            (Some(r), Some(d)) => Some(r.p50_us - d.p50_us),
            _ => None,
        };
        let _ = writeln!(
            s,
            "{c} conns: throughput ours/knative {}; cpu per request ours/knative {}; rss ours/knative {}; added p50 ours {} us, nginx {} us (ours/nginx {})",
            ratio(o.map(|r| r.rps), k.map(|r| r.rps)),
            ratio(
                o.and_then(|r| r.cpu_s_per_10k),
                k.and_then(|r| r.cpu_s_per_10k)
            ),
            ratio(
                o.and_then(|r| r.rss_kb.map(|v| v as f64)),
                k.and_then(|r| r.rss_kb.map(|v| v as f64))
            ),
            fmt_opt(added(o), 1),
            fmt_opt(added(n), 1),
            ratio(added(o), added(n)),
        );
        for name in ["knative", "ours"] {
            let base = find(rows, name, c, 0);
            if let Some(cc) = rows
                .iter()
                .find(|r| r.name == name && r.connections == c && r.container_concurrency > 0)
            {
                let _ = writeln!(
                    s,
                    "{c} conns: {name} p99 with cc {} / cc 0: {}",
                    cc.container_concurrency,
                    ratio(Some(cc.p99_us), base.map(|b| b.p99_us))
                );
            }
        }
    }
    s
}

fn ours_binary(args: &QueueProxyBenchArgs) -> Result<PathBuf> {
    if let Some(p) = &args.ours {
        return Ok(p.clone());
    }
    let exe = std::env::current_exe()?;
    let p = exe
        .parent()
        .map(|d| d.join("queue-proxy-ebpf"))
        .context("no directory for the current executable")?;
    if !p.exists() {
        bail!(
            "{} not found: cargo build --release -p queue-proxy-ebpf, or pass --ours",
            p.display()
        );
    }
    Ok(p)
}

pub fn run(args: QueueProxyBenchArgs) -> Result<()> {
    let ours = ours_binary(&args)?;
    if !args.knative.exists() {
        bail!(
            "{} not found: go install knative.dev/serving/cmd/queue@v0.50.0",
            args.knative.display()
        );
    }
    let dir = std::env::temp_dir().join(format!("spright-bench-qp-{}", std::process::id()));
    std::fs::create_dir_all(&dir)?;
    let result = run_in(&args, &ours, &dir);
    let _ = std::fs::remove_dir_all(&dir);
    let rows = result?;
    print!("{}", report(&rows));
    if let Some(path) = &args.json {
        std::fs::write(path, to_json(&rows))
            .with_context(|| format!("writing {}", path.display()))?;
    }
    Ok(())
}

fn run_in(args: &QueueProxyBenchArgs, ours: &Path, dir: &Path) -> Result<Vec<Row>> {
    wait_free(&[UPSTREAM_PORT, PROXY_PORT])?;
    let up_conf = nginx_conf(dir, "upstream", UPSTREAM_PORT, "return 200 \"hello\\n\";")?;
    let _upstream = start_nginx(args.proxy_cpu, &up_conf, UPSTREAM_PORT, "upstream nginx")?;
    let mut rows = measure(args, "direct", 0, UPSTREAM_PORT, None)?;

    let mut ccs = vec![0];
    if args.cc > 0 {
        ccs.push(args.cc);
    }
    for (name, bin) in [("knative", args.knative.as_path()), ("ours", ours)] {
        for &cc in &ccs {
            let p = start_queue(args.proxy_cpu, bin, cc, name)?;
            let mut r = measure(args, name, cc, PROXY_PORT, Some(&p))?;
            if cc == 0 {
                let idle = idle_cpu(args, &p)?;
                for row in &mut r {
                    row.idle_cpu_s = idle;
                }
            }
            rows.extend(r);
        }
    }
    match eproxy::rows(args, ours, dir, _upstream.pid()) {
        Ok((r, text)) => {
            rows.extend(r);
            print!("{text}");
        }
        Err(e) => eprintln!("{}: skipped: {e:#}", eproxy::ROW_NAME),
    }

    match full::rows(args, ours, dir) {
        Ok((r, text)) => {
            rows.extend(r);
            print!("{text}");
        }
        Err(e) => eprintln!("{}: skipped: {e:#}", full::ROW_NAME),
    }

    let proxy_conf = nginx_conf(
        dir,
        "proxy",
        PROXY_PORT,
        "proxy_pass http://user; proxy_http_version 1.1; proxy_set_header Connection \"\";",
    )?;
    let p = start_nginx(
        args.proxy_cpu,
        &proxy_conf,
        PROXY_PORT,
        "nginx reverse proxy",
    )?;
    let mut r = measure(args, "nginx", 0, PROXY_PORT, Some(&p))?;
    let idle = idle_cpu(args, &p)?;
    for row in &mut r {
        row.idle_cpu_s = idle;
    }
    rows.extend(r);
    Ok(rows)
}

#[cfg(test)]
mod tests {
    use super::*;

    const WRK: &str = "Running 10s test @ http://127.0.0.1:18012/
  1 threads and 32 connections
  Thread Stats   Avg      Stdev     Max   +/- Stdev
    Latency     1.98ms  300.00us  10.00ms   90.00%
    Req/Sec    16.20k     1.00k   17.00k    80.00%
  Latency Distribution
     50%    1.95ms
     75%    2.05ms
     90%    2.20ms
     99%    3.91ms
  161234 requests in 10.00s, 20.00MB read
  Socket errors: connect 0, read 2, write 0, timeout 1
  Non-2xx or 3xx responses: 5
Requests/sec:  16123.40
Transfer/sec:      2.00MB
";

    #[test]
    fn parses_wrk() {
        let w = parse_wrk(WRK).expect("parses");
        assert_eq!(w.requests, 161_234);
        assert!((w.rps - 16123.4).abs() < 1e-6);
        assert!((w.p50_us - 1950.0).abs() < 1e-6);
        assert!((w.p99_us - 3910.0).abs() < 1e-6);
        assert_eq!(w.errors, 8);
        assert!(parse_wrk("garbage").is_err());
    }

    #[test]
    fn reads_own_proc() {
        let pid = std::process::id();
        assert!(cpu_seconds(pid).expect("stat") >= 0.0);
        assert!(peak_rss_kb(pid).expect("status") > 0);
    }

    #[test]
    fn json_rows() {
        let r = Row {
            name: "ours",
            connections: 32,
            container_concurrency: 0,
            rps: 1.5,
            p50_us: 2.0,
            p99_us: 3.0,
            requests: 10,
            cpu_s_per_10k: None,
            rss_kb: Some(5),
            idle_cpu_s: Some(0.0),
        };
        let j = to_json(&[r]);
        assert!(j.contains("\"name\": \"ours\""));
        assert!(j.contains("\"cpu_s_per_10k\": null"));
        assert!(j.contains("\"rss_kb\": 5"));
    }
}
