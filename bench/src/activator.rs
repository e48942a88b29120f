//! `spright-bench activator`: activator-lite against a direct call and against nginx as a
//! reverse proxy, side by side in one run.
//!
//! - Added latency and CPU per request: `wrk` drives the same upstream directly, through
//!   activator-lite and through nginx.
//! - Cold start: a request for a revision without endpoints is held (the activator's
//!   metrics show it queued), then the Endpoints manifest appears; the delay from writing
//!   it to the held request's answer is taken (inotify, reload, pod probe, proxy).
//! - Memory: RSS of activator-lite with `--held` requests held for a revision without pods.
//!
//! # Method of the proxy comparison
//!
//! Placement is the same for both proxies and decides more than anything else: on this
//! kind of VM a thread waking a thread on the *other* core costs about 30 µs (a pipe
//! ping-pong takes 9-16 µs per round trip on one core, 56-76 µs across cores), more than
//! a proxied request's own work. So:
//!
//! - wrk (one thread) and the upstream (this process's single runtime thread) run on
//!   CPU 0; each proxy runs alone on CPU 1 with one thread of execution: nginx with one
//!   worker and no master process, activator-lite started under `taskset -c 1`, where
//!   it sees one CPU and runs tokio's current-thread runtime. Every hop of a request
//!   (wrk → proxy → upstream → proxy → wrk) therefore crosses cores the same way for both.
//! - CPU is the proxy's on-CPU time from `/proc/<pid>/task/*/schedstat` (nanoseconds,
//!   all threads; not the 10 ms ticks of `/proc/<pid>/stat`), read right before and
//!   after each wrk run, divided by the requests wrk completed in that run.
//! - Per-request CPU depends on how many requests one wake-up serves, which depends on
//!   the load. It is measured at two loads: `--connections` (16: the proxy batches, the
//!   figure shifts with the rate the run reached) and `--light-connections` (1: every
//!   request wakes the proxy exactly twice, so both proxies do the same number of
//!   wake-ups and the figure compares their work per request).
//! - Paths take turns (direct, then the two proxies in an order that alternates each
//!   round), and each proxy's figure is compared with its neighbour in time: the
//!   headline ratios are the medians of the per-round ratios, printed with the rounds.

use std::io::Write as _;
use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

use anyhow::{Context, bail};
use bytes::Bytes;
use futures::StreamExt;
use http_body_util::{BodyExt, Full};
use hyper::body::Incoming;
use hyper_util::rt::TokioIo;
use tokio::io::AsyncWriteExt;
use tokio::net::TcpListener;

use crate::measure::{pin_self, sibling};
use crate::report::{Row, table};

/// Arguments of `spright-bench activator`.
#[derive(Debug, clap::Args)]
pub struct ActivatorBenchArgs {
    /// Seconds of load per measured path and round.
    #[arg(long, default_value_t = 2)]
    pub seconds: u64,
    /// Rounds in which the paths take turns (activator-lite and nginx swap places every
    /// round); the median round is reported, and the median of the per-round ratios.
    #[arg(long, default_value_t = 5)]
    pub rounds: usize,
    /// Concurrent keep-alive connections of the load generator.
    #[arg(long, default_value_t = 16)]
    pub connections: usize,
    /// Connections of the light-load rounds that follow (added latency without
    /// queueing); 0 skips them.
    #[arg(long, default_value_t = 1)]
    pub light_connections: usize,
    /// Scale-from-zero repetitions for the endpoint-ready → first-answer delay.
    #[arg(long, default_value_t = 30)]
    pub cold_runs: usize,
    /// Requests held for a revision without pods when measuring memory.
    #[arg(long, default_value_t = 10_000)]
    pub held: usize,
    /// The activator-lite binary (default: next to this executable).
    #[arg(long)]
    pub activator: Option<PathBuf>,
    /// nginx binary.
    #[arg(long, default_value = "/usr/sbin/nginx")]
    pub nginx: PathBuf,
    /// wrk binary.
    #[arg(long, default_value = "wrk")]
    pub wrk: String,
    /// Write the rows as JSON to this path.
    #[arg(long)]
    pub json: Option<PathBuf>,
}

const NS: &str = "default";
const REV: &str = "bench-00001";
const HELD_REV: &str = "held-00001";

/// A child process killed on drop.
struct Proc(Child);

impl Drop for Proc {
    fn drop(&mut self) {
        let _ = self.0.kill();
        let _ = self.0.wait();
    }
}

/// A temporary directory removed on drop.
struct TempDir(PathBuf);

impl Drop for TempDir {
    fn drop(&mut self) {
        let _ = std::fs::remove_dir_all(&self.0);
    }
}

fn free_port() -> anyhow::Result<u16> {
    Ok(std::net::TcpListener::bind("127.0.0.1:0")?
        .local_addr()?
        .port())
}

fn write_atomic(dir: &Path, name: &str, text: &str) -> anyhow::Result<()> {
    let tmp = dir.join(format!(".{name}.tmp"));
    std::fs::write(&tmp, text)?;
    std::fs::rename(&tmp, dir.join(name))?;
    Ok(())
}

fn revision_yaml(name: &str, cc: u32) -> String {
    format!(
        "apiVersion: serving.knative.dev/v1\nkind: Revision\nmetadata:\n  name: {name}\n  namespace: {NS}\nspec:\n  containerConcurrency: {cc}\n  timeoutSeconds: 300\n"
    )
}

fn endpoints_yaml(rev: &str, pod: Option<SocketAddr>) -> String {
    let head = format!(
        "apiVersion: v1\nkind: Endpoints\nmetadata:\n  name: {rev}-private\n  namespace: {NS}\n  labels:\n    serving.knative.dev/revision: {rev}\n    serving.knative.dev/revisionUID: bench-uid\n    networking.internal.knative.dev/serviceType: Private\n"
    );
    match pod {
        None => format!("{head}subsets: []\n"),
        Some(a) => format!(
            "{head}subsets:\n- addresses:\n  - ip: {}\n  ports:\n  - name: http\n    port: {}\n",
            a.ip(),
            a.port()
        ),
    }
}

/// The upstream "pod": answers queue-proxy probes with `queue`, everything else with `ok`.
async fn upstream() -> anyhow::Result<SocketAddr> {
    let l = TcpListener::bind("127.0.0.1:0").await?;
    let addr = l.local_addr()?;
    tokio::spawn(async move {
        loop {
            let Ok((s, _)) = l.accept().await else {
                continue;
            };
            let _ = s.set_nodelay(true);
            tokio::spawn(async move {
                let svc = hyper::service::service_fn(|req: hyper::Request<Incoming>| async move {
                    let body = if req
                        .headers()
                        .get("k-network-probe")
                        .is_some_and(|v| v == "queue")
                    {
                        "queue"
                    } else {
                        "ok"
                    };
                    let _ = req.into_body().collect().await;
                    // A revision's pod answers through its queue-proxy, a Go server, which
                    // sets the Content-Type Go sniffs when the app sets none: an answer
                    // reaching the activator always has one (else the activators sniff).
                    let mut resp =
                        hyper::Response::new(Full::new(Bytes::from_static(body.as_bytes())));
                    resp.headers_mut().insert(
                        hyper::header::CONTENT_TYPE,
                        hyper::header::HeaderValue::from_static("text/plain; charset=utf-8"),
                    );
                    Ok::<_, std::convert::Infallible>(resp)
                });
                let _ = hyper::server::conn::http1::Builder::new()
                    .serve_connection(TokioIo::new(s), svc)
                    .await;
            });
        }
    });
    Ok(addr)
}

/// The autoscaler stand-in: accepts the websocket and reads (drops) the stat frames.
async fn autoscaler() -> anyhow::Result<u16> {
    let l = TcpListener::bind("127.0.0.1:0").await?;
    let port = l.local_addr()?.port();
    tokio::spawn(async move {
        loop {
            let Ok((s, _)) = l.accept().await else {
                continue;
            };
            tokio::spawn(async move {
                let Ok(mut ws) = tokio_tungstenite::accept_async(s).await else {
                    return;
                };
                // Reading answers the activator's pings.
                while let Some(Ok(_)) = ws.next().await {}
            });
        }
    });
    Ok(port)
}

/// One HTTP/1.1 GET through the activator for `rev`; returns the status.
async fn get_status(port: u16, rev: &str) -> anyhow::Result<u16> {
    let s = tokio::net::TcpStream::connect(("127.0.0.1", port)).await?;
    let (mut sender, conn) = hyper::client::conn::http1::handshake(TokioIo::new(s)).await?;
    tokio::spawn(conn);
    let req = hyper::Request::get("/")
        .header("host", "bench")
        .header("knative-serving-namespace", NS)
        .header("knative-serving-revision", rev)
        .body(Full::new(Bytes::new()))?;
    let resp = sender.send_request(req).await?;
    let status = resp.status().as_u16();
    let _ = resp.into_body().collect().await;
    Ok(status)
}

/// Waits (polling the metrics endpoint) until `n` requests of `rev` are queued.
async fn queued(metrics_port: u16, rev: &str, n: usize, within: Duration) -> anyhow::Result<bool> {
    let want = format!("kn_revision_name=\"{rev}\"}} {n}");
    let deadline = Instant::now() + within;
    loop {
        let url = format!("http://127.0.0.1:{metrics_port}/metrics");
        let body = tokio::task::block_in_place(|| crate::measure::http_get(&url))?;
        if body
            .lines()
            .any(|l| l.starts_with("kn_revision_request_queued") && l.ends_with(&want))
        {
            return Ok(true);
        }
        if Instant::now() > deadline {
            return Ok(false);
        }
        tokio::time::sleep(Duration::from_millis(1)).await;
    }
}

async fn wait_ready(port: u16) -> anyhow::Result<()> {
    let deadline = Instant::now() + Duration::from_secs(20);
    loop {
        if let Ok(mut s) = tokio::net::TcpStream::connect(("127.0.0.1", port)).await {
            let _ = s
                .write_all(b"GET / HTTP/1.1\r\nHost: x\r\nUser-Agent: kube-probe/1.31\r\nConnection: close\r\n\r\n")
                .await;
            let mut buf = Vec::new();
            let _ = tokio::io::AsyncReadExt::read_to_end(&mut s, &mut buf).await;
            if buf.starts_with(b"HTTP/1.1 200") {
                return Ok(());
            }
        }
        if Instant::now() > deadline {
            bail!("activator-lite on :{port} never became ready");
        }
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
}

/// What wrk measured.
#[derive(Debug)]
struct Wrk {
    p50_us: f64,
    p99_us: f64,
    rps: f64,
    requests: f64,
}

/// wrk's report through the shared parser; any error response fails the measurement.
fn parse_wrk(out: &str) -> anyhow::Result<Wrk> {
    let r = crate::measure::parse_wrk(out)?;
    if r.errors > 0 {
        bail!("wrk saw {} errors", r.errors);
    }
    Ok(Wrk {
        p50_us: r.p50_us,
        p99_us: r.p99_us,
        rps: r.rps,
        requests: r.requests as f64,
    })
}

/// On-CPU seconds of all threads of `pid` so far, from the scheduler's nanosecond
/// accounting (`/proc/<pid>/task/*/schedstat`, first field).
fn task_cpu_seconds(pid: u32) -> anyhow::Result<f64> {
    let mut ns: u64 = 0;
    let dir = format!("/proc/{pid}/task");
    for t in std::fs::read_dir(&dir).with_context(|| format!("reading {dir}"))? {
        let path = t?.path().join("schedstat");
        // A thread that exited meanwhile has no file any more: its time is lost either way.
        let Ok(text) = std::fs::read_to_string(&path) else {
            continue;
        };
        ns += parse_schedstat(&text).with_context(|| format!("parsing {}", path.display()))?;
    }
    Ok(ns as f64 / 1e9)
}

/// The run time (ns) of a `schedstat` line: `<run ns> <wait ns> <timeslices>`.
fn parse_schedstat(text: &str) -> Option<u64> {
    text.split_whitespace().next()?.parse().ok()
}

/// Runs wrk pinned to CPU 0 against `port`; returns its figures and the CPU seconds
/// `pid` used meanwhile.
fn wrk(
    args: &ActivatorBenchArgs,
    conns: usize,
    port: u16,
    pid: Option<u32>,
    seconds: u64,
) -> anyhow::Result<(Wrk, Option<f64>)> {
    let cpu0 = pid.map(task_cpu_seconds).transpose()?;
    let out = Command::new("taskset")
        .args(["-c", "0", &args.wrk, "-t1", "--latency"])
        .arg(format!("-c{conns}"))
        .arg(format!("-d{seconds}s"))
        .args(["-H", &format!("Knative-Serving-Namespace: {NS}")])
        .args(["-H", &format!("Knative-Serving-Revision: {REV}")])
        .arg(format!("http://127.0.0.1:{port}/"))
        .output()
        .with_context(|| format!("running {} (apt-get install wrk)", args.wrk))?;
    if !out.status.success() {
        bail!("wrk failed: {}", String::from_utf8_lossy(&out.stderr));
    }
    let w = parse_wrk(&String::from_utf8_lossy(&out.stdout))?;
    let cpu = match (pid, cpu0) {
        (Some(p), Some(c0)) => Some(task_cpu_seconds(p)? - c0),
        _ => None,
    };
    Ok((w, cpu))
}

fn rss_kib(pid: u32) -> anyhow::Result<u64> {
    let status = std::fs::read_to_string(format!("/proc/{pid}/status"))?;
    status
        .lines()
        .find_map(|l| l.strip_prefix("VmRSS:"))
        .and_then(|v| v.split_whitespace().next())
        .and_then(|v| v.parse().ok())
        .context("no VmRSS")
}

fn percentile(sorted: &[f64], q: f64) -> f64 {
    if sorted.is_empty() {
        return f64::NAN;
    }
    let i = ((sorted.len() as f64 - 1.0) * q).round() as usize;
    sorted[i.min(sorted.len() - 1)]
}

fn nginx_conf(dir: &Path, port: u16, upstream: SocketAddr) -> String {
    let d = dir.display();
    format!(
        "daemon off;\nmaster_process off;\nworker_processes 1;\npid {d}/nginx.pid;\nerror_log {d}/nginx-error.log error;\nevents {{ worker_connections 4096; }}\nhttp {{\n  access_log off;\n  client_body_temp_path {d}/body;\n  proxy_temp_path {d}/proxy;\n  fastcgi_temp_path {d}/fastcgi;\n  uwsgi_temp_path {d}/uwsgi;\n  scgi_temp_path {d}/scgi;\n  upstream pod {{ server {upstream}; keepalive 128; }}\n  server {{\n    listen 127.0.0.1:{port};\n    location / {{\n      proxy_pass http://pod;\n      proxy_http_version 1.1;\n      proxy_set_header Connection \"\";\n      proxy_set_header K-Proxy-Request activator;\n      proxy_set_header K-Original-Host $host;\n      proxy_set_header Knative-Serving-Namespace \"\";\n      proxy_set_header Knative-Serving-Revision \"\";\n    }}\n  }}\n}}\n"
    )
}

/// Runs the whole comparison.
pub fn run(args: ActivatorBenchArgs) -> anyhow::Result<()> {
    pin_self(0)?;
    let rt = tokio::runtime::Builder::new_multi_thread()
        .worker_threads(1)
        .enable_all()
        .build()?;
    rt.block_on(run_async(args))
}

async fn run_async(args: ActivatorBenchArgs) -> anyhow::Result<()> {
    let bin = match &args.activator {
        Some(p) => p.clone(),
        None => sibling("activator-lite")?,
    };
    let dir = TempDir(
        std::env::temp_dir().join(format!("spright-bench-activator-{}", std::process::id())),
    );
    let manifests = dir.0.join("manifests");
    std::fs::create_dir_all(&manifests)?;
    let pod = upstream().await?;
    let as_port = autoscaler().await?;
    write_atomic(&manifests, "rev.yaml", &revision_yaml(REV, 0))?;
    write_atomic(&manifests, "ep.yaml", &endpoints_yaml(REV, Some(pod)))?;
    write_atomic(&manifests, "held.yaml", &revision_yaml(HELD_REV, 0))?;

    let (a_port, a_h2c, a_metrics, a_prof) =
        (free_port()?, free_port()?, free_port()?, free_port()?);
    // Each proxy runs on CPU 1 from the start (so it sizes its thread pool to one
    // core, as nginx runs one worker); wrk and the upstream share CPU 0.
    let act = Proc(
        Command::new("taskset")
            .args(["-c", "1"])
            .arg(&bin)
            .env("POD_NAME", "activator-bench")
            .env("POD_IP", "127.0.0.1")
            .env("SYSTEM_NAMESPACE", "knative-serving")
            .env("RUST_LOG", "warn")
            .arg("--manifests")
            .arg(&manifests)
            .args(["--autoscaler", &format!("ws://127.0.0.1:{as_port}/")])
            .args(["--bind", "127.0.0.1"])
            .args(["--http1-port", &a_port.to_string()])
            .args(["--h2c-port", &a_h2c.to_string()])
            .args(["--metrics-port", &a_metrics.to_string()])
            .args(["--profiling-port", &a_prof.to_string()])
            .args(["--drain-timeout-secs", "0"])
            .stdout(Stdio::null())
            .spawn()
            .with_context(|| format!("starting {}", bin.display()))?,
    );
    let act_pid = act.0.id();
    wait_ready(a_port).await?;

    let n_port = free_port()?;
    let conf = dir.0.join("nginx.conf");
    std::fs::write(&conf, nginx_conf(&dir.0, n_port, pod))?;
    let nginx = Proc(
        Command::new("taskset")
            .args(["-c", "1"])
            .arg(&args.nginx)
            .arg("-e")
            .arg(dir.0.join("nginx-error.log"))
            .arg("-c")
            .arg(&conf)
            .stdout(Stdio::null())
            .stderr(Stdio::null())
            .spawn()
            .with_context(|| {
                format!(
                    "starting {} (apt-get install nginx-light)",
                    args.nginx.display()
                )
            })?,
    );
    let nginx_pid = nginx.0.id();
    let deadline = Instant::now() + Duration::from_secs(10);
    while tokio::net::TcpStream::connect(("127.0.0.1", n_port))
        .await
        .is_err()
    {
        if Instant::now() > deadline {
            bail!("nginx never listened on :{n_port}");
        }
        tokio::time::sleep(Duration::from_millis(20)).await;
    }

    // Latency and CPU per request.
    let mut rows = Vec::new();
    // The paths take turns, `rounds` times; each figure is the round with the median p50
    // (CPU per request over all rounds), so a burst of load from elsewhere on the machine
    // does not decide the comparison.
    let paths = [
        (pod.port(), None),
        (a_port, Some(act_pid)),
        (n_port, Some(nginx_pid)),
    ];
    let mut results: Vec<Vec<(Wrk, Option<f64>)>> = vec![Vec::new(), Vec::new(), Vec::new()];
    tokio::task::block_in_place(|| -> anyhow::Result<()> {
        for &(port, pid) in &paths {
            wrk(&args, args.connections, port, pid, 1)?; // warm-up (pools, caches)
        }
        for round in 0..args.rounds.max(1) {
            // direct, then the two proxies in alternating order, so drift in the
            // machine's load does not favour one of them.
            let order: [usize; 3] = if round % 2 == 0 { [0, 1, 2] } else { [0, 2, 1] };
            for i in order {
                let (port, pid) = paths[i];
                results[i].push(wrk(&args, args.connections, port, pid, args.seconds)?);
            }
        }
        Ok(())
    })?;
    // Light load: the same turns with few connections: p50 added over direct and CPU per
    // request of each proxy, per round.
    struct Light {
        added: [f64; 2],
        cpu_per_req: [f64; 2],
    }
    let mut light: Vec<Light> = Vec::new();
    if args.light_connections > 0 {
        tokio::task::block_in_place(|| -> anyhow::Result<()> {
            for round in 0..args.rounds.max(1) {
                let order: [usize; 3] = if round % 2 == 0 { [0, 1, 2] } else { [0, 2, 1] };
                let mut p50 = [0.0; 3];
                let mut cpu = [f64::NAN; 3];
                for i in order {
                    let (port, pid) = paths[i];
                    let (w, c) = wrk(&args, args.light_connections, port, pid, args.seconds)?;
                    p50[i] = w.p50_us;
                    cpu[i] = c.unwrap_or(f64::NAN) / w.requests.max(1.0);
                }
                light.push(Light {
                    added: [p50[1] - p50[0], p50[2] - p50[0]],
                    cpu_per_req: [cpu[1], cpu[2]],
                });
            }
            Ok(())
        })?;
    }
    // Ratios of the proxies within each round (neighbours in time), then their median.
    let per_round: Vec<(f64, f64)> = (0..results[0].len())
        .map(|r| {
            let direct = results[0][r].0.p50_us;
            let added = |i: usize| results[i][r].0.p50_us - direct;
            let cpu = |i: usize| results[i][r].1.unwrap_or(f64::NAN) / results[i][r].0.requests;
            (added(1) / added(2), cpu(1) / cpu(2))
        })
        .collect();
    let median = |mut v: Vec<f64>| {
        v.sort_by(|a, b| a.total_cmp(b));
        percentile(&v, 0.5)
    };
    let round_p50 = median(per_round.iter().map(|r| r.0).collect());
    let round_cpu = median(per_round.iter().map(|r| r.1).collect());
    let mut pick = |i: usize| -> (Wrk, Option<f64>) {
        let runs = &mut results[i];
        let requests: f64 = runs.iter().map(|(w, _)| w.requests).sum();
        let cpu: Option<f64> = runs.iter().map(|(_, c)| *c).sum();
        runs.sort_by(|a, b| a.0.p50_us.total_cmp(&b.0.p50_us));
        let (mut w, _) = runs.swap_remove(runs.len() / 2);
        let per_request = cpu.map(|c| c / requests * w.requests);
        w.requests = w.requests.max(1.0);
        (w, per_request)
    };
    let (direct, _) = pick(0);
    let (through_act, act_cpu) = pick(1);
    let (through_nginx, nginx_cpu) = pick(2);
    let row = |name: &str, w: &Wrk, cpu: Option<f64>| Row {
        connections: Some(args.connections),
        p50_us: Some(w.p50_us),
        p99_us: Some(w.p99_us),
        rps: Some(w.rps),
        cpu_s_per_1k: cpu.map(|c| c / w.requests * 1000.0),
        ..Row::named(name)
    };
    rows.push(row("direct (upstream)", &direct, None));
    rows.push(row("activator-lite", &through_act, act_cpu));
    rows.push(row("nginx reverse proxy", &through_nginx, nginx_cpu));
    let added = |name: &str, w: &Wrk| Row {
        p50_us: Some(w.p50_us - direct.p50_us),
        p99_us: Some(w.p99_us - direct.p99_us),
        ..Row::named(name)
    };
    rows.push(added("activator-lite added", &through_act));
    rows.push(added("nginx added", &through_nginx));

    let light_median = |f: &dyn Fn(&Light) -> f64| median(light.iter().map(f).collect());
    let light_ratio = light_median(&|r| r.added[0] / r.added[1]);
    let light_cpu_ratio = light_median(&|r| r.cpu_per_req[0] / r.cpu_per_req[1]);
    if !light.is_empty() {
        for (i, name) in [(0, "activator-lite"), (1, "nginx")] {
            rows.push(Row {
                connections: Some(args.light_connections),
                p50_us: Some(light_median(&|r| r.added[i])),
                cpu_s_per_1k: Some(light_median(&|r| r.cpu_per_req[i]) * 1000.0),
                ..Row::named(format!("{name} added, light load"))
            });
        }
    }

    // Endpoint ready -> first held request answered.
    let mut delays = Vec::with_capacity(args.cold_runs);
    for i in 0..args.cold_runs {
        let rev = format!("cold-{i:05}");
        write_atomic(&manifests, &format!("{rev}.yaml"), &revision_yaml(&rev, 0))?;
        write_atomic(
            &manifests,
            &format!("{rev}-ep.yaml"),
            &endpoints_yaml(&rev, None),
        )?;
        // Hold a request (retry while the revision is not known yet: 404).
        let held = loop {
            let rev2 = rev.clone();
            let h = tokio::spawn(async move { get_status(a_port, &rev2).await });
            if queued(a_metrics, &rev, 1, Duration::from_millis(500)).await? {
                break h;
            }
            let status = h.await??;
            if status != 404 {
                bail!("cold request for {rev} answered {status} before its endpoint existed");
            }
        };
        let t0 = Instant::now();
        write_atomic(
            &manifests,
            &format!("{rev}-ep.yaml"),
            &endpoints_yaml(&rev, Some(pod)),
        )?;
        let status = held.await??;
        let d = t0.elapsed();
        if status != 200 {
            bail!("held request for {rev} answered {status}");
        }
        delays.push(d.as_secs_f64() * 1e6);
    }
    delays.sort_by(|a, b| a.total_cmp(b));
    rows.push(Row {
        p50_us: Some(percentile(&delays, 0.5)),
        p99_us: Some(percentile(&delays, 0.99)),
        ..Row::named("endpoint ready -> first held answer")
    });

    // Memory with N held requests.
    let rss_idle = rss_kib(act_pid)?;
    let mut conns = Vec::with_capacity(args.held);
    let req = format!(
        "GET / HTTP/1.1\r\nHost: bench\r\nKnative-Serving-Namespace: {NS}\r\nKnative-Serving-Revision: {HELD_REV}\r\n\r\n"
    );
    for _ in 0..args.held {
        let mut s = tokio::net::TcpStream::connect(("127.0.0.1", a_port))
            .await
            .context("opening held connections (raise ulimit -n?)")?;
        s.write_all(req.as_bytes()).await?;
        conns.push(s);
    }
    if !queued(a_metrics, HELD_REV, args.held, Duration::from_secs(60)).await? {
        bail!("activator-lite never held {} requests", args.held);
    }
    let rss_held = rss_kib(act_pid)?;
    drop(conns);

    drop(nginx);
    drop(act);

    let mut out = std::io::stdout().lock();
    writeln!(out, "{}", table(&rows))?;
    let ratio = |a: Option<f64>, b: Option<f64>| match (a, b) {
        (Some(a), Some(b)) if b != 0.0 => format!("{:.2}x", a / b),
        _ => "-".into(),
    };
    writeln!(
        out,
        "median-round figures, activator-lite / nginx: added p50 {}; cpu per request (all rounds) {}",
        ratio(rows[3].p50_us, rows[4].p50_us),
        ratio(rows[1].cpu_s_per_1k, rows[2].cpu_s_per_1k)
    )?;
    let list = |f: fn(&(f64, f64)) -> f64| {
        per_round
            .iter()
            .map(|r| format!("{:.2}", f(r)))
            .collect::<Vec<_>>()
            .join(" ")
    };
    writeln!(
        out,
        "per round, activator-lite / nginx: added p50 [{}] median {round_p50:.2}x; cpu per request [{}] median {round_cpu:.2}x",
        list(|r| r.0),
        list(|r| r.1)
    )?;
    if !light.is_empty() {
        let list = |f: &dyn Fn(&Light) -> f64| {
            light
                .iter()
                .map(|r| format!("{:.2}", f(r)))
                .collect::<Vec<_>>()
                .join(" ")
        };
        writeln!(
            out,
            "light load ({} connection(s)), per round activator-lite / nginx: added p50 [{}] median {light_ratio:.2}x; cpu per request [{}] median {light_cpu_ratio:.2}x",
            args.light_connections,
            list(&|r| r.added[0] / r.added[1]),
            list(&|r| r.cpu_per_req[0] / r.cpu_per_req[1]),
        )?;
    }
    writeln!(
        out,
        "endpoint ready -> first held answer p50: {:.2} ms (Knative's probe tick alone: 200 ms; target < 10 ms)",
        percentile(&delays, 0.5) / 1000.0
    )?;
    writeln!(
        out,
        "activator-lite RSS: idle {:.1} MiB, with {} held requests {:.1} MiB (target < 64 MiB)",
        rss_idle as f64 / 1024.0,
        args.held,
        rss_held as f64 / 1024.0
    )?;
    if let Some(path) = &args.json {
        let mut values = Vec::new();
        for r in &rows {
            let mut v = serde_json::to_value(r)?;
            if let Some(o) = v.as_object_mut() {
                o.insert("rss_mib".into(), serde_json::Value::Null);
            }
            values.push(v);
        }
        let mut mem = serde_json::to_value(Row::named(format!(
            "activator-lite rss with {} held",
            args.held
        )))?;
        if let Some(o) = mem.as_object_mut() {
            o.insert(
                "rss_mib".into(),
                serde_json::json!(rss_held as f64 / 1024.0),
            );
        }
        values.push(mem);
        std::fs::write(path, serde_json::to_string_pretty(&values)?)
            .with_context(|| format!("writing {}", path.display()))?;
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn schedstat_run_time() {
        assert_eq!(parse_schedstat("123456789 5000 42\n"), Some(123_456_789));
        assert_eq!(parse_schedstat(""), None);
        assert_eq!(parse_schedstat("x 1 2"), None);
    }

    #[test]
    fn wrk_output() {
        let out = "Running 1s test @ http://127.0.0.1:1/\n  1 threads and 16 connections\n  Latency Distribution\n     50%  101.00us\n     75%  1.20ms\n     90%  2.00ms\n     99%    1.50s\n  12345 requests in 1.00s, 1.00MB read\nRequests/sec:  12345.67\n";
        let w = parse_wrk(out).unwrap();
        assert_eq!(
            (w.p50_us, w.p99_us, w.rps, w.requests),
            (101.0, 1_500_000.0, 12345.67, 12345.0)
        );
        assert!(parse_wrk("Non-2xx or 3xx responses: 3\n").is_err());
    }
}
