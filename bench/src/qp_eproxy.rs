//! Event-driven mode (EPROXY) rows of `spright-bench queue-proxy`, measured beside a direct
//! baseline in the same run, interleaved: for each connection count, [`ROUNDS`] rounds in the
//! order direct, event-driven, then event-driven, direct (ABBA, so a drift of the machine during
//! the run weighs on both alike); ratios are given per round and as their median, and the rows
//! are the medians. One sample each was too few: a single disturbed 10 s run moved the 32
//! connection ratio from +3% to +26% between two quiet runs.
//!
//! The upstream nginx of the queue-proxy bench is moved into a cgroup of its own, the emulated
//! pod. queue-proxy-ebpf then runs in event-driven mode with standalone accounting on that
//! cgroup: it steers its serving port in the host network namespace (loopback) to nginx's
//! listener and counts requests in the kernel. wrk connects to the serving port; no userspace
//! proxy is on the path. Needs root (CAP_BPF, CAP_NET_ADMIN, CAP_SYS_PTRACE); without it the
//! rows are skipped with the reason.
//!
//! CPU per 10,000 requests, for every row:
//! - `sidecar`: queue-proxy-ebpf (utime + stime);
//! - `upstream`: nginx;
//! - `procs`: the two together;
//! - `machine`: busy time of every core (user, system, irq, softirq: /proc/stat) minus wrk's
//!   own CPU. It includes the kernel's share of the connection work (system time) wherever it
//!   ran, and whatever else the machine did meanwhile: compare it on a quiet machine.
//!
//! No node agent takes part (standalone); with the agent the sidecar's work is the same and the
//! agent only wakes up when the counters are scraped.

use std::fmt::Write as _;
use std::path::{Path, PathBuf};

use anyhow::{Context, Result, bail};

use super::full::median;
use super::{BenchCgroup, QueueProxyBenchArgs, Row, Running, UPSTREAM_PORT};
use crate::measure::{WrkResult, cpu_seconds, peak_rss_kb};

/// The event-driven sidecar's ports (its serving port is steered).
const SERVING_PORT: u16 = 18014;
const ADMIN_PORT: u16 = 18023;
const STATS_PORT: u16 = 19091;
/// The row name in the queue-proxy table.
pub const ROW_NAME: &str = "ours-event-driven";
/// The baseline's name.
const DIRECT: &str = "direct";
/// Rounds per connection count.
pub const ROUNDS: usize = 3;

/// One measurement with every process's CPU.
#[derive(Debug, Clone)]
struct Measured {
    name: &'static str,
    round: usize,
    connections: u32,
    wrk: WrkResult,
    sidecar: Option<f64>,
    upstream: f64,
    machine: f64,
    rss_kb: Option<u64>,
}

impl Measured {
    fn per_10k(&self, seconds: f64) -> f64 {
        super::per_10k(seconds, self.wrk.requests)
    }

    fn procs(&self) -> f64 {
        self.upstream + self.sidecar.unwrap_or(0.0)
    }
}

/// CPU seconds of the children this process has waited for (wrk).
fn children_cpu() -> f64 {
    // SAFETY: getrusage writes into the zeroed struct we own.
    let mut u: libc::rusage = unsafe { std::mem::zeroed() };
    // SAFETY: as above; RUSAGE_CHILDREN is a valid `who`.
    unsafe { libc::getrusage(libc::RUSAGE_CHILDREN, &raw mut u) };
    let tv = |t: libc::timeval| t.tv_sec as f64 + t.tv_usec as f64 / 1e6;
    tv(u.ru_utime) + tv(u.ru_stime)
}

fn measure_one(
    args: &QueueProxyBenchArgs,
    name: &'static str,
    round: usize,
    port: u16,
    connections: u32,
    upstream: u32,
    sidecar: Option<u32>,
) -> Result<Measured> {
    // Machine time minus wrk's own: (m1 - m0) - (w1 - w0) is the growth of m - w.
    let (w, grew) = super::load(args, name, port, connections, || {
        Ok(vec![
            cpu_seconds(upstream)?,
            super::busy_seconds(None)? - children_cpu(),
            sidecar.map_or(Ok(0.0), cpu_seconds)?,
        ])
    })?;
    Ok(Measured {
        name,
        round,
        connections,
        wrk: w,
        sidecar: sidecar.map(|_| grew[2]),
        upstream: grew[0],
        machine: grew[1],
        rss_kb: sidecar.map(peak_rss_kb).transpose()?,
    })
}

/// The emulated pod's cgroup with the upstream in it; puts the upstream back on drop.
struct PodCgroup {
    cgroup: BenchCgroup,
    upstream: u32,
    home: PathBuf,
}

impl PodCgroup {
    fn new(upstream: u32) -> Result<Self> {
        let root = Path::new(spright_ebpf::DEFAULT_CGROUP_PATH);
        let own = std::fs::read_to_string(format!("/proc/{upstream}/cgroup"))?;
        let rel = own
            .lines()
            .find_map(|l| l.strip_prefix("0::"))
            .context("the upstream has no cgroup v2 entry")?;
        let home = root.join(rel.trim_start_matches('/'));
        let cg = Self {
            cgroup: BenchCgroup::new("eproxy")?,
            upstream,
            home,
        };
        std::fs::write(cg.cgroup.path.join("cgroup.procs"), upstream.to_string())
            .context("moving the upstream into the pod cgroup")?;
        Ok(cg)
    }
}

impl Drop for PodCgroup {
    /// Puts the upstream back; then `cgroup` is removed.
    fn drop(&mut self) {
        let _ = std::fs::write(self.home.join("cgroup.procs"), self.upstream.to_string());
    }
}

fn start_sidecar(
    args: &QueueProxyBenchArgs,
    ours: &Path,
    cgroup: &Path,
    log: &Path,
) -> Result<Running> {
    let running = super::spawn_queue(
        super::pinned(args.proxy_cpu, ours),
        0,
        vec![
            ("QUEUE_SERVING_PORT", SERVING_PORT.to_string()),
            ("QUEUE_ADMIN_PORT", ADMIN_PORT.to_string()),
            ("QUEUE_AUTOSCALING_METRICS_PORT", STATS_PORT.to_string()),
            ("SERVING_LOGGING_LEVEL", "info".to_owned()),
            ("SPRIGHT_DATAPLANE_MODE", "event-driven".to_owned()),
            ("SPRIGHT_ACCOUNTING", "standalone".to_owned()),
            ("SPRIGHT_ACCOUNTING_CGROUP", cgroup.display().to_string()),
        ],
        &[SERVING_PORT, ADMIN_PORT, STATS_PORT],
        "queue-proxy-ebpf (event-driven)",
        std::fs::File::create(log)?.into(),
    )?;
    if let Some(warnings) =
        super::missing_in_log(log, "steered in the kernel to the user container")
    {
        bail!(
            "queue-proxy-ebpf did not steer (root with CAP_BPF, CAP_NET_ADMIN and CAP_SYS_PTRACE needed): {warnings}"
        );
    }
    Ok(running)
}

/// Measures direct and event-driven interleaved; returns the rows for the queue-proxy table
/// and the detailed report. `upstream` is the pid of the bench's upstream nginx.
pub fn rows(
    args: &QueueProxyBenchArgs,
    ours: &Path,
    dir: &Path,
    upstream: u32,
) -> Result<(Vec<Row>, String)> {
    let cgroup = PodCgroup::new(upstream)?;
    let sidecar = start_sidecar(
        args,
        ours,
        &cgroup.cgroup.path,
        &dir.join("eproxy-sidecar.log"),
    )?;
    super::warm_up(args, SERVING_PORT)?;
    super::warm_up(args, UPSTREAM_PORT)?;
    let mut measured = Vec::new();
    for &c in &args.connections {
        for round in 0..ROUNDS {
            let direct = |m: &mut Vec<Measured>| -> Result<()> {
                m.push(measure_one(
                    args,
                    DIRECT,
                    round,
                    UPSTREAM_PORT,
                    c,
                    upstream,
                    None,
                )?);
                Ok(())
            };
            let event_driven = |m: &mut Vec<Measured>| -> Result<()> {
                m.push(measure_one(
                    args,
                    ROW_NAME,
                    round,
                    SERVING_PORT,
                    c,
                    upstream,
                    Some(sidecar.pid()),
                )?);
                Ok(())
            };
            if round % 2 == 0 {
                direct(&mut measured)?;
                event_driven(&mut measured)?;
            } else {
                event_driven(&mut measured)?;
                direct(&mut measured)?;
            }
        }
    }
    drop(sidecar);
    drop(cgroup);
    let rows = args
        .connections
        .iter()
        .filter_map(|&c| median_row(&measured, c))
        .collect();
    Ok((rows, report(&measured)))
}

/// The event-driven row at `connections`: medians over the rounds.
fn median_row(measured: &[Measured], connections: u32) -> Option<Row> {
    let ours: Vec<&Measured> = measured
        .iter()
        .filter(|m| m.name == ROW_NAME && m.connections == connections)
        .collect();
    let of = |f: &dyn Fn(&Measured) -> f64| median(ours.iter().map(|m| f(m)).collect());
    let medians = WrkResult {
        requests: ours.iter().map(|m| m.wrk.requests).max()?,
        rps: of(&|m| m.wrk.rps),
        p50_us: of(&|m| m.wrk.p50_us),
        p99_us: of(&|m| m.wrk.p99_us),
        errors: ours.iter().map(|m| m.wrk.errors).sum(),
    };
    Some(Row {
        cpu_s_per_10k: Some(of(&|m| m.per_10k(m.sidecar.unwrap_or(0.0)))),
        rss_kb: ours.iter().filter_map(|m| m.rss_kb).max(),
        ..Row::measured(ROW_NAME, connections, 0, &medians)
    })
}

fn report(measured: &[Measured]) -> String {
    let mut s = String::new();
    let _ = writeln!(
        s,
        "\nevent-driven mode (EPROXY) beside direct, interleaved; CPU seconds per 10k requests:\n{:<18} {:>5} {:>5} {:>10} {:>9} {:>9} {:>9} {:>9} {:>9} {:>9}",
        "path",
        "round",
        "conns",
        "rps",
        "p50_us",
        "p99_us",
        "sidecar",
        "upstream",
        "procs",
        "machine"
    );
    for m in measured {
        let _ = writeln!(
            s,
            "{:<18} {:>5} {:>5} {:>10.0} {:>9.1} {:>9.1} {:>9} {:>9.4} {:>9.4} {:>9.4}",
            m.name,
            m.round,
            m.connections,
            m.wrk.rps,
            m.wrk.p50_us,
            m.wrk.p99_us,
            m.sidecar
                .map_or_else(|| "-".to_owned(), |v| format!("{:.4}", m.per_10k(v))),
            m.per_10k(m.upstream),
            m.per_10k(m.procs()),
            m.per_10k(m.machine),
        );
    }
    let show = |v: &[f64], fmt: &dyn Fn(f64) -> String| {
        let each: Vec<String> = v.iter().map(|r| fmt(*r)).collect();
        format!("{} [{}]", fmt(median(v.to_vec())), each.join(" "))
    };
    let times = |r: f64| format!("{r:.2}x");
    let percent = |r: f64| format!("{:+.1}%", (r - 1.0) * 100.0);
    let mut conns: Vec<u32> = measured.iter().map(|m| m.connections).collect();
    conns.dedup();
    for c in conns {
        // Each event-driven sample against the direct one of the same round.
        let pairs: Vec<(&Measured, &Measured)> = measured
            .iter()
            .filter(|e| e.connections == c && e.name == ROW_NAME)
            .filter_map(|e| {
                measured
                    .iter()
                    .find(|d| d.name == DIRECT && d.connections == c && d.round == e.round)
                    .map(|d| (d, e))
            })
            .collect();
        if pairs.is_empty() {
            continue;
        }
        let ratios = |f: &dyn Fn(&Measured) -> f64| -> Vec<f64> {
            pairs.iter().map(|(d, e)| f(e) / f(d)).collect()
        };
        let added: Vec<f64> = pairs
            .iter()
            .map(|(d, e)| e.wrk.p50_us - d.wrk.p50_us)
            .collect();
        let _ = writeln!(
            s,
            "{c} conns: event-driven/direct (median [per round]): added p50 {} ({:.1} us), throughput {}, CPU per request: processes {}, machine {}",
            show(&ratios(&|m| m.wrk.p50_us), &percent),
            median(added),
            show(&ratios(&|m| m.wrk.rps), &times),
            show(&ratios(&|m| m.per_10k(m.procs())), &times),
            show(&ratios(&|m| m.per_10k(m.machine)), &times),
        );
    }
    s
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn machine_and_children_cpu_read() {
        assert!(super::super::busy_seconds(None).expect("/proc/stat") > 0.0);
        assert!(children_cpu() >= 0.0);
    }

    #[test]
    fn report_pairs_rounds_and_takes_medians() {
        let m = |name, round, p50, sidecar| Measured {
            name,
            round,
            connections: 1,
            wrk: WrkResult {
                requests: 10_000,
                rps: 10_000.0,
                p50_us: p50,
                p99_us: 2.0 * p50,
                errors: 0,
            },
            sidecar,
            upstream: 1.0,
            machine: 2.0,
            rss_kb: None,
        };
        let r = report(&[
            m(DIRECT, 0, 50.0, None),
            m(ROW_NAME, 0, 55.0, Some(0.0)),
            m(ROW_NAME, 1, 60.0, Some(0.0)),
            m(DIRECT, 1, 50.0, None),
            m(DIRECT, 2, 50.0, None),
            m(ROW_NAME, 2, 51.0, Some(0.0)),
        ]);
        assert!(
            r.contains("added p50 +10.0% [+10.0% +20.0% +2.0%] (5.0 us)"),
            "{r}"
        );
        assert!(r.contains("processes 1.00x [1.00x 1.00x 1.00x]"), "{r}");
        let row = median_row(
            &[
                m(ROW_NAME, 0, 55.0, Some(0.0)),
                m(ROW_NAME, 1, 61.0, Some(0.0)),
            ],
            1,
        )
        .expect("row");
        assert!((row.p50_us - 58.0).abs() < 1e-9);
        assert!(median_row(&[m(DIRECT, 0, 50.0, None)], 1).is_none());
    }
}
