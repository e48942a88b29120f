//! Measuring processes from outside: CPU time and memory from /proc, CPU pinning, and the
//! closed-loop HTTP load generator the benches share.

use std::path::Path;
use std::time::{Duration, Instant};

use anyhow::{Context, bail};
use bytes::Bytes;
use hdrhistogram::Histogram;
use http_body_util::{BodyExt, Full};
use hyper_util::rt::TokioIo;

/// Clock ticks per second for /proc times.
fn ticks_per_second() -> f64 {
    // SAFETY: sysconf has no preconditions; it only reads a system constant.
    let t = unsafe { libc::sysconf(libc::_SC_CLK_TCK) };
    if t > 0 { t as f64 } else { 100.0 }
}

/// User plus system CPU seconds a process has used so far (all its threads).
pub fn cpu_seconds(pid: u32) -> anyhow::Result<f64> {
    let stat = std::fs::read_to_string(format!("/proc/{pid}/stat"))
        .with_context(|| format!("reading /proc/{pid}/stat"))?;
    // The command name may contain spaces: fields start after the last ')'.
    let rest = stat
        .rsplit_once(')')
        .map(|(_, r)| r)
        .context("malformed stat")?;
    let fields: Vec<&str> = rest.split_whitespace().collect();
    // After ')': state is field 3 of the full line, utime 14 and stime 15 -> indexes 11, 12.
    let utime: f64 = fields.get(11).context("no utime")?.parse()?;
    let stime: f64 = fields.get(12).context("no stime")?.parse()?;
    Ok((utime + stime) / ticks_per_second())
}

/// Sum of [`cpu_seconds`] over several processes.
pub fn total_cpu(pids: &[u32]) -> anyhow::Result<f64> {
    pids.iter().map(|p| cpu_seconds(*p)).sum()
}

/// Pins every thread of process `pid` (and what it starts later) to `cpu`.
pub fn pin(pid: u32, cpu: usize) -> anyhow::Result<()> {
    let mut set = nix::sched::CpuSet::new();
    set.set(cpu)?;
    let tasks = std::fs::read_dir(format!("/proc/{pid}/task"))?;
    for t in tasks.flatten() {
        if let Some(tid) = t.file_name().to_str().and_then(|s| s.parse::<i32>().ok()) {
            let _ = nix::sched::sched_setaffinity(nix::unistd::Pid::from_raw(tid), &set);
        }
    }
    Ok(())
}

/// Pins the calling thread to `cpu`.
pub fn pin_self(cpu: usize) -> anyhow::Result<()> {
    let mut set = nix::sched::CpuSet::new();
    set.set(cpu)?;
    nix::sched::sched_setaffinity(nix::unistd::Pid::from_raw(0), &set)?;
    Ok(())
}

/// What a load run measured.
#[derive(Debug)]
pub struct LoadResult {
    pub requests: u64,
    pub errors: u64,
    pub elapsed: Duration,
    pub hist: Histogram<u64>,
}

impl LoadResult {
    /// Requests per second.
    pub fn rps(&self) -> f64 {
        self.requests as f64 / self.elapsed.as_secs_f64()
    }
    /// Latency percentile in microseconds.
    pub fn pct_us(&self, q: f64) -> f64 {
        self.hist.value_at_quantile(q) as f64 / 1000.0
    }
}

/// Closed-loop load: `connections` keep-alive HTTP/1.1 connections each send POST `body` to
/// `url` back to back for `duration` (at least one request each). Runs on the calling thread (pin it first). A response
/// other than 200 counts as an error.
pub fn http_load(
    url: &str,
    body: &Bytes,
    connections: usize,
    duration: Duration,
) -> anyhow::Result<LoadResult> {
    let uri: hyper::Uri = url.parse()?;
    let host = uri.host().context("url has no host")?.to_owned();
    let port = uri.port_u16().unwrap_or(80);
    let path = uri
        .path_and_query()
        .map(|p| p.as_str().to_owned())
        .unwrap_or_else(|| "/".into());
    let rt = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()?;
    rt.block_on(async move {
        let start = Instant::now();
        let deadline = start + duration;
        let mut tasks = Vec::new();
        for _ in 0..connections {
            let (host, path, body) = (host.clone(), path.clone(), body.clone());
            tasks.push(tokio::spawn(async move {
                let mut hist = Histogram::<u64>::new_with_bounds(1, 60_000_000_000, 3)?;
                let (mut ok, mut errors) = (0u64, 0u64);
                let stream = tokio::net::TcpStream::connect((host.as_str(), port)).await?;
                stream.set_nodelay(true)?;
                let (mut sender, conn) =
                    hyper::client::conn::http1::handshake(TokioIo::new(stream)).await?;
                tokio::spawn(conn);
                loop {
                    let req = hyper::Request::post(path.as_str())
                        .header(hyper::header::HOST, host.as_str())
                        .body(Full::new(body.clone()))?;
                    let t0 = Instant::now();
                    let resp = sender.send_request(req).await?;
                    let status = resp.status();
                    let _ = resp.into_body().collect().await?;
                    let ns = u64::try_from(t0.elapsed().as_nanos()).unwrap_or(u64::MAX);
                    hist.record(ns.max(1))?;
                    if status == 200 {
                        ok += 1
                    } else {
                        errors += 1
                    }
                    if Instant::now() >= deadline {
                        break;
                    }
                }
                anyhow::Ok((ok, errors, hist))
            }));
        }
        let mut hist = Histogram::<u64>::new_with_bounds(1, 60_000_000_000, 3)?;
        let (mut requests, mut errors) = (0, 0);
        for t in tasks {
            let (ok, err, h) = t.await??;
            requests += ok;
            errors += err;
            hist.add(h)?;
        }
        Ok(LoadResult {
            requests,
            errors,
            elapsed: start.elapsed(),
            hist,
        })
    })
}

/// Waits until `url` answers POST `body` with 200, or fails after `deadline`.
pub fn wait_http_ok(url: &str, body: &Bytes, deadline: Duration) -> anyhow::Result<()> {
    let start = Instant::now();
    loop {
        if http_load(url, body, 1, Duration::from_millis(1)).is_ok_and(|r| r.requests > 0) {
            return Ok(());
        }
        if start.elapsed() > deadline {
            bail!("{url} did not answer 200 within {deadline:?}");
        }
        std::thread::sleep(Duration::from_millis(50));
    }
}

/// The directory of this executable (where the workspace's other binaries are built).
pub fn bin_dir() -> anyhow::Result<std::path::PathBuf> {
    let exe = std::env::current_exe()?;
    Ok(exe
        .parent()
        .context("executable has no directory")?
        .to_owned())
}

/// A sibling binary of this executable, or a clear error with the build command.
pub fn sibling(name: &str) -> anyhow::Result<std::path::PathBuf> {
    let p = bin_dir()?.join(name);
    if !Path::new(&p).is_file() {
        bail!(
            "{} is missing: build it with `cargo build --release --workspace --bins`",
            p.display()
        );
    }
    Ok(p)
}

/// GET `url` and return the body (for small control endpoints).
pub fn http_get(url: &str) -> anyhow::Result<String> {
    let uri: hyper::Uri = url.parse()?;
    let addr = format!(
        "{}:{}",
        uri.host().context("no host")?,
        uri.port_u16().unwrap_or(80)
    );
    let mut s = std::net::TcpStream::connect(addr)?;
    let path = uri.path_and_query().map_or("/", |p| p.as_str());
    use std::io::{Read, Write};
    write!(
        s,
        "GET {path} HTTP/1.1\r\nHost: x\r\nConnection: close\r\n\r\n"
    )?;
    let mut raw = String::new();
    s.read_to_string(&mut raw)?;
    let (head, body) = raw.split_once("\r\n\r\n").context("malformed response")?;
    if !head.starts_with("HTTP/1.1 200") {
        bail!("GET {url}: {}", head.lines().next().unwrap_or(""));
    }
    Ok(body.to_owned())
}
