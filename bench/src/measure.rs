//! Measuring processes from outside: CPU time and memory from /proc, CPU pinning, and the
//! closed-loop HTTP load generator the benches share.

use std::path::Path;
use std::time::{Duration, Instant};

use anyhow::{Context, bail};

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

/// Peak resident set size of a process, in KiB (VmHWM).
pub fn peak_rss_kb(pid: u32) -> anyhow::Result<u64> {
    let status = std::fs::read_to_string(format!("/proc/{pid}/status"))?;
    status
        .lines()
        .find_map(|l| l.strip_prefix("VmHWM:"))
        .and_then(|v| v.split_whitespace().next())
        .and_then(|v| v.parse().ok())
        .context("no VmHWM")
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

/// Waits until `url` answers POST `body` with 200, or fails after `deadline`.
pub fn wait_http_ok(url: &str, body: &[u8], deadline: Duration) -> anyhow::Result<()> {
    let start = Instant::now();
    loop {
        let answer = http_request("POST", url, body);
        if matches!(answer, Ok((200, _))) {
            return Ok(());
        }
        if start.elapsed() > deadline {
            bail!("{url} did not answer 200 within {deadline:?}; last answer: {answer:?}");
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

/// One HTTP/1.1 request on a fresh connection; the status and the body (for small control
/// endpoints and readiness checks, not for load).
pub fn http_request(method: &str, url: &str, body: &[u8]) -> anyhow::Result<(u16, String)> {
    use std::io::{Read, Write};
    let uri: hyper::Uri = url.parse()?;
    let addr = format!(
        "{}:{}",
        uri.host().context("no host")?,
        uri.port_u16().unwrap_or(80)
    );
    let mut s = std::net::TcpStream::connect(addr)?;
    s.set_read_timeout(Some(Duration::from_secs(10)))?;
    let path = uri.path_and_query().map_or("/", |p| p.as_str());
    write!(
        s,
        "{method} {path} HTTP/1.1\r\nHost: x\r\nContent-Length: {}\r\nConnection: close\r\n\r\n",
        body.len()
    )?;
    s.write_all(body)?;
    let mut raw = String::new();
    s.read_to_string(&mut raw)?;
    let (head, body) = raw.split_once("\r\n\r\n").context("malformed response")?;
    let status = head
        .split(' ')
        .nth(1)
        .and_then(|c| c.parse().ok())
        .context("malformed status line")?;
    Ok((status, body.to_owned()))
}

/// GET `url` and return the body, which must come with a 200.
pub fn http_get(url: &str) -> anyhow::Result<String> {
    match http_request("GET", url, b"")? {
        (200, body) => Ok(body),
        (status, _) => bail!("GET {url}: {status}"),
    }
}

/// What wrk measured.
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct WrkResult {
    pub requests: u64,
    pub rps: f64,
    pub p50_us: f64,
    pub p99_us: f64,
    /// Non-2xx answers and socket errors.
    pub errors: u64,
}

fn wrk_duration_us(s: &str) -> Option<f64> {
    let s = s.trim();
    let (num, mul) = if let Some(n) = s.strip_suffix("us") {
        (n, 1.0)
    } else if let Some(n) = s.strip_suffix("ms") {
        (n, 1e3)
    } else if let Some(n) = s.strip_suffix('m') {
        (n, 60e6)
    } else if let Some(n) = s.strip_suffix('s') {
        (n, 1e6)
    } else {
        return None;
    };
    num.trim().parse::<f64>().ok().map(|v| v * mul)
}

/// Parses the output of `wrk --latency`.
pub fn parse_wrk(out: &str) -> anyhow::Result<WrkResult> {
    let mut r = WrkResult {
        requests: 0,
        rps: 0.0,
        p50_us: f64::NAN,
        p99_us: f64::NAN,
        errors: 0,
    };
    for line in out.lines() {
        let t = line.trim();
        let mut words = t.split_whitespace();
        match (words.next(), words.next()) {
            (Some("50%"), Some(v)) => r.p50_us = wrk_duration_us(v).unwrap_or(f64::NAN),
            (Some("99%"), Some(v)) => r.p99_us = wrk_duration_us(v).unwrap_or(f64::NAN),
            (Some("Requests/sec:"), Some(v)) => r.rps = v.parse().unwrap_or(0.0),
            (Some(n), Some("requests")) => r.requests = n.parse().unwrap_or(0),
            (Some("Non-2xx"), _) => {
                r.errors += t
                    .rsplit(' ')
                    .next()
                    .and_then(|n| n.parse().ok())
                    .unwrap_or(0)
            }
            (Some("Socket"), Some("errors:")) => {
                r.errors += t
                    .split(',')
                    .filter_map(|part| part.split_whitespace().last()?.parse::<u64>().ok())
                    .sum::<u64>();
            }
            _ => {}
        }
    }
    if r.requests == 0 || r.p50_us.is_nan() {
        bail!("cannot parse wrk output:\n{out}");
    }
    Ok(r)
}

/// Runs wrk (one thread, pinned to `cpu`) against `url` for `seconds`, POSTing `body` when
/// given (through a Lua script in `dir`), and parses its report.
pub fn wrk(
    cpu: usize,
    url: &str,
    body: Option<&[u8]>,
    connections: usize,
    seconds: f64,
    dir: &Path,
) -> anyhow::Result<WrkResult> {
    let mut cmd = std::process::Command::new("taskset");
    cmd.args(["-c", &cpu.to_string(), "wrk", "-t1", "--latency"])
        .arg(format!("-c{connections}"))
        .arg(format!("-d{}s", seconds.ceil().max(1.0)));
    if let Some(body) = body {
        let data = dir.join("wrk-body");
        std::fs::write(&data, body)?;
        let script = dir.join("wrk-post.lua");
        std::fs::write(
            &script,
            format!(
                "wrk.method = \"POST\"\nlocal f = io.open({:?}, \"rb\")\nwrk.body = f:read(\"*a\")\nf:close()\n",
                data.display().to_string()
            ),
        )?;
        cmd.arg("-s").arg(&script);
    }
    let out = cmd
        .arg(url)
        .output()
        .context("running wrk (scripts/setup.sh installs it)")?;
    if !out.status.success() {
        bail!("wrk failed: {}", String::from_utf8_lossy(&out.stderr));
    }
    parse_wrk(&String::from_utf8_lossy(&out.stdout))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn wrk_durations() {
        assert_eq!(wrk_duration_us("850.00us"), Some(850.0));
        assert_eq!(wrk_duration_us("1.50s"), Some(1.5e6));
        assert_eq!(wrk_duration_us("2.5ms"), Some(2500.0));
        assert_eq!(wrk_duration_us("fast"), None);
    }
}
