//! Full mode rows of `spright-bench queue-proxy`: queue-proxy-ebpf with the hop to the user
//! container redirected through a sockmap and the accounting in the kernel
//! (`ours-full-ebpf`), measured interleaved with queue-proxy-ebpf in userspace mode
//! (`ours-userspace`) in the same run: for each connection count, [`ROUNDS`] rounds, or
//! [`ROUNDS_AT_ONE_CONNECTION`] at 1 connection (where the per-round ratio swings most and a
//! round is cheap), in ABBA order (userspace then full in even rounds, full then userspace in
//! odd ones: see [`order`]), so that a drift of the machine's load over the run weighs on
//! both alike and each order counts as often; the ratios are given per round and as their
//! median.
//!
//! The emulated pod is a cgroup of its own holding the full-mode sidecar and its own upstream
//! nginx (both start inside it, so every socket they create belongs to it); the sidecar runs
//! with `SPRIGHT_DATAPLANE_MODE=full` and `SPRIGHT_ACCOUNTING=standalone` on that cgroup. The
//! userspace-mode sidecar and its upstream nginx (same configuration, another port) stay
//! outside it, so the redirect never touches them. Everything is pinned to the proxy core,
//! wrk to the load core. Needs root (CAP_BPF, CAP_NET_ADMIN); without it the rows are
//! skipped with the reason.
//!
//! A third, diagnostic variant (`ours-sockmap-only`) separates the two halves of full mode:
//! a userspace-mode sidecar with userspace accounting in a pod cgroup of its own, whose hop
//! to its upstream is redirected by the same programs, loaded by this bench process
//! ([`spright_ebpf::loopback::Loopback`]).
//!
//! CPU per 10,000 requests, for every row:
//! - `sidecar`, `upstream`: utime + stime of queue-proxy-ebpf and of nginx;
//! - `procs`: the two together;
//! - `core`: busy time of the proxy core (user, system, irq, softirq from /proc/stat), so the
//!   kernel's work that lands on that core (loopback softirq, the sockmap's copy) counts
//!   wherever it is charged; anything else running on that core counts too (noisy machine).

use std::fmt::Write as _;
use std::path::Path;
use std::process::Command;

use anyhow::{Context, Result, bail};

use super::{BenchCgroup, QueueProxyBenchArgs, Row, Running};
use crate::measure::{WrkResult, cpu_seconds, peak_rss_kb};

/// The row name in the queue-proxy table.
pub const ROW_NAME: &str = "ours-full-ebpf";
/// The interleaved userspace-mode baseline.
const BASELINE: &str = "ours-userspace";
/// The diagnostic variant: userspace mode, hop redirected by programs this bench loads.
const SOCKMAP_ONLY: &str = "ours-sockmap-only";
/// Rounds per connection count, except 1.
pub const ROUNDS: usize = 3;
/// Rounds at 1 connection: its per-round ratios swing by ±15% on a quiet machine, so the
/// median needs more of them; even, so that both orders count alike. The diagnostic
/// [`SOCKMAP_ONLY`] variant is measured in the first [`ROUNDS`] only (a round of the two
/// compared variants costs two loads, not three).
pub const ROUNDS_AT_ONE_CONNECTION: usize = 8;

/// Rounds at `connections`.
fn rounds(connections: u32) -> usize {
    if connections == 1 {
        ROUNDS_AT_ONE_CONNECTION
    } else {
        ROUNDS
    }
}

/// The variants measured in `round`, in order: as given in even rounds, reversed in odd ones
/// (ABBA); the last (diagnostic) one only in the first [`ROUNDS`] rounds.
fn order<T>(items: &[T], round: usize) -> Vec<&T> {
    let keep = if round < ROUNDS {
        items.len()
    } else {
        items.len().saturating_sub(1)
    };
    let mut v: Vec<&T> = items[..keep].iter().collect();
    if round % 2 == 1 {
        v.reverse();
    }
    v
}

/// Ports of one sidecar and its upstream.
#[derive(Debug, Clone, Copy)]
struct Ports {
    upstream: u16,
    serving: u16,
    admin: u16,
    stats: u16,
}

const FULL: Ports = Ports {
    upstream: 18091,
    serving: 18016,
    admin: 18026,
    stats: 19096,
};
const USERSPACE: Ports = Ports {
    upstream: 18092,
    serving: 18017,
    admin: 18027,
    stats: 19097,
};
const SOCKMAP: Ports = Ports {
    upstream: 18093,
    serving: 18018,
    admin: 18028,
    stats: 19098,
};

/// `program args...` pinned to `cpu`, started inside `cgroup` when given (a shell joins the
/// cgroup, then execs: the process exists only inside it).
fn command(cpu: u32, cgroup: Option<&Path>, program: &Path) -> Command {
    let mut c = Command::new("sh");
    c.arg("-c")
        .arg(
            r#"cg=$0; cpu=$1; shift; if [ -n "$cg" ]; then echo $$ > "$cg/cgroup.procs" || exit 97; fi; exec taskset -c "$cpu" "$@""#,
        )
        .arg(cgroup.map(|p| p.display().to_string()).unwrap_or_default())
        .arg(cpu.to_string())
        .arg(program);
    c
}

fn start_upstream(
    args: &QueueProxyBenchArgs,
    dir: &Path,
    name: &str,
    ports: Ports,
    cgroup: Option<&Path>,
) -> Result<Running> {
    super::wait_free(&[ports.upstream])?;
    let conf = super::nginx_conf(dir, name, ports.upstream, "return 200 \"hello\\n\";")?;
    super::spawn_nginx(
        command(args.proxy_cpu, cgroup, Path::new("nginx")),
        &conf,
        ports.upstream,
        name,
    )
}

/// Starts queue-proxy-ebpf in front of `ports.upstream`, inside `cgroup` when given; in full
/// mode (standalone, on that cgroup) when `full`, else in userspace mode.
fn start_sidecar(
    args: &QueueProxyBenchArgs,
    ours: &Path,
    ports: Ports,
    cgroup: Option<&Path>,
    full: bool,
    log: &Path,
) -> Result<Running> {
    let mut env = vec![
        ("QUEUE_SERVING_PORT", ports.serving.to_string()),
        ("USER_PORT", ports.upstream.to_string()),
        (
            "SERVING_READINESS_PROBE",
            format!(
                r#"{{"tcpSocket":{{"port":{},"host":"127.0.0.1"}},"successThreshold":1}}"#,
                ports.upstream
            ),
        ),
        ("QUEUE_ADMIN_PORT", ports.admin.to_string()),
        ("QUEUE_AUTOSCALING_METRICS_PORT", ports.stats.to_string()),
        ("SERVING_LOGGING_LEVEL", "info".to_owned()),
    ];
    match cgroup.filter(|_| full) {
        Some(path) => env.extend([
            ("SPRIGHT_DATAPLANE_MODE", "full".to_owned()),
            ("SPRIGHT_ACCOUNTING", "standalone".to_owned()),
            ("SPRIGHT_ACCOUNTING_CGROUP", path.display().to_string()),
        ]),
        None => env.push(("SPRIGHT_DATAPLANE_MODE", "userspace".to_owned())),
    }
    let running = super::spawn_queue(
        command(args.proxy_cpu, cgroup, ours),
        0,
        env,
        &[ports.serving, ports.admin, ports.stats],
        "queue-proxy-ebpf",
        std::fs::File::create(log)?.into(),
    )?;
    if full {
        for (needle, what) in [
            ("redirected in the kernel", "the loopback redirect"),
            ("request accounting in the kernel", "the kernel accounting"),
        ] {
            if let Some(warnings) = super::missing_in_log(log, needle) {
                bail!(
                    "queue-proxy-ebpf in full mode did not attach {what} (root with CAP_BPF and CAP_NET_ADMIN needed): {warnings}"
                );
            }
        }
    }
    Ok(running)
}

/// Starts `name`'s upstream nginx, then its queue-proxy-ebpf in front of it (in full mode when
/// `full`, logging to `<name>.log` in `dir`), both inside `cgroup` when given.
fn start_pod(
    args: &QueueProxyBenchArgs,
    ours: &Path,
    dir: &Path,
    name: &str,
    ports: Ports,
    cgroup: Option<&Path>,
    full: bool,
) -> Result<(Running, Running)> {
    let upstream = start_upstream(args, dir, &format!("{name}-upstream"), ports, cgroup)?;
    let log = dir.join(format!("{name}.log"));
    let sidecar = start_sidecar(args, ours, ports, cgroup, full, &log)?;
    Ok((upstream, sidecar))
}

/// One measurement: CPU seconds over the run.
#[derive(Debug, Clone, PartialEq)]
struct Sample {
    name: &'static str,
    round: usize,
    connections: u32,
    wrk: WrkResult,
    sidecar: f64,
    upstream: f64,
    core: f64,
    rss_kb: u64,
}

impl Sample {
    fn per_10k(&self, seconds: f64) -> f64 {
        super::per_10k(seconds, self.wrk.requests)
    }

    fn procs(&self) -> f64 {
        self.sidecar + self.upstream
    }
}

struct Setup<'a> {
    name: &'static str,
    ports: Ports,
    sidecar: &'a Running,
    upstream: &'a Running,
}

fn measure(
    args: &QueueProxyBenchArgs,
    s: &Setup<'_>,
    round: usize,
    connections: u32,
) -> Result<Sample> {
    let (w, grew) = super::load(args, s.name, s.ports.serving, connections, || {
        Ok(vec![
            cpu_seconds(s.sidecar.pid())?,
            cpu_seconds(s.upstream.pid())?,
            super::busy_seconds(Some(args.proxy_cpu))?,
        ])
    })?;
    Ok(Sample {
        name: s.name,
        round,
        connections,
        wrk: w,
        sidecar: grew[0],
        upstream: grew[1],
        core: grew[2],
        rss_kb: peak_rss_kb(s.sidecar.pid())?,
    })
}

/// Measures userspace and full mode interleaved; returns the `ours-full-ebpf` rows for the
/// queue-proxy table (medians over the rounds) and the detailed report.
pub fn rows(args: &QueueProxyBenchArgs, ours: &Path, dir: &Path) -> Result<(Vec<Row>, String)> {
    let (user_up, user) = start_pod(args, ours, dir, "userspace", USERSPACE, None, false)?;
    let full_pod = BenchCgroup::new("full")?;
    let (full_up, full) = start_pod(args, ours, dir, "full", FULL, Some(&full_pod.path), true)?;
    let sockmap_pod = BenchCgroup::new("sockmap")?;
    let redirect = spright_ebpf::loopback::Loopback::attach(&sockmap_pod.path, &[SOCKMAP.upstream])
        .context("loading the loopback redirect (root, CAP_BPF, CAP_NET_ADMIN)")?;
    let (sockmap_up, sockmap) = start_pod(
        args,
        ours,
        dir,
        "sockmap",
        SOCKMAP,
        Some(&sockmap_pod.path),
        false,
    )?;
    // The diagnostic variant last (see `order`).
    let setups = [
        Setup {
            name: BASELINE,
            ports: USERSPACE,
            sidecar: &user,
            upstream: &user_up,
        },
        Setup {
            name: ROW_NAME,
            ports: FULL,
            sidecar: &full,
            upstream: &full_up,
        },
        Setup {
            name: SOCKMAP_ONLY,
            ports: SOCKMAP,
            sidecar: &sockmap,
            upstream: &sockmap_up,
        },
    ];
    for s in &setups {
        super::warm_up(args, s.ports.serving)?;
    }
    let mut samples = Vec::new();
    for &c in &args.connections {
        for round in 0..rounds(c) {
            for s in order(&setups, round) {
                samples.push(measure(args, s, round, c)?);
            }
        }
    }
    let redirected = redirect
        .counters()
        .map(|c| c.redirected_messages)
        .unwrap_or(0);
    drop((full, full_up, user, user_up, sockmap, sockmap_up, redirect));
    drop((full_pod, sockmap_pod));
    let rows = args
        .connections
        .iter()
        .filter_map(|&c| median_row(&samples, c))
        .collect();
    let mut text = report(&samples);
    let _ = writeln!(
        text,
        "{SOCKMAP_ONLY}: {redirected} writes redirected on its hop"
    );
    Ok((rows, text))
}

/// The median of the finite values (NaN without any).
pub(super) fn median(mut v: Vec<f64>) -> f64 {
    v.retain(|x| x.is_finite());
    if v.is_empty() {
        return f64::NAN;
    }
    v.sort_by(f64::total_cmp);
    let n = v.len();
    if n % 2 == 1 {
        v[n / 2]
    } else {
        (v[n / 2 - 1] + v[n / 2]) / 2.0
    }
}

/// The `ours-full-ebpf` row at `connections`: medians over the rounds.
fn median_row(samples: &[Sample], connections: u32) -> Option<Row> {
    let full: Vec<&Sample> = samples
        .iter()
        .filter(|s| s.name == ROW_NAME && s.connections == connections)
        .collect();
    let of = |f: &dyn Fn(&Sample) -> f64| median(full.iter().map(|s| f(s)).collect());
    let medians = WrkResult {
        requests: full.iter().map(|s| s.wrk.requests).max()?,
        rps: of(&|s| s.wrk.rps),
        p50_us: of(&|s| s.wrk.p50_us),
        p99_us: of(&|s| s.wrk.p99_us),
        errors: full.iter().map(|s| s.wrk.errors).sum(),
    };
    Some(Row {
        cpu_s_per_10k: Some(of(&|s| s.per_10k(s.sidecar))),
        rss_kb: full.iter().map(|s| s.rss_kb).max(),
        ..Row::measured(ROW_NAME, connections, 0, &medians)
    })
}

fn report(samples: &[Sample]) -> String {
    let mut s = String::new();
    let _ = writeln!(
        s,
        "\nfull mode (sockmap on the in-pod hop, kernel accounting) beside userspace mode, interleaved; CPU seconds per 10k requests:\n{:<17} {:>5} {:>5} {:>9} {:>8} {:>8} {:>8} {:>8} {:>8} {:>8}",
        "path", "round", "conns", "rps", "p50_us", "p99_us", "sidecar", "upstream", "procs", "core"
    );
    for m in samples {
        let _ = writeln!(
            s,
            "{:<17} {:>5} {:>5} {:>9.0} {:>8.1} {:>8.1} {:>8.4} {:>8.4} {:>8.4} {:>8.4}",
            m.name,
            m.round,
            m.connections,
            m.wrk.rps,
            m.wrk.p50_us,
            m.wrk.p99_us,
            m.per_10k(m.sidecar),
            m.per_10k(m.upstream),
            m.per_10k(m.procs()),
            m.per_10k(m.core),
        );
    }
    let show = |v: &[f64]| {
        let each: Vec<String> = v.iter().map(|r| format!("{r:.2}")).collect();
        format!("{:.2}x [{}]", median(v.to_vec()), each.join(" "))
    };
    let mut conns: Vec<u32> = samples.iter().map(|m| m.connections).collect();
    conns.dedup();
    for c in conns {
        for variant in [ROW_NAME, SOCKMAP_ONLY] {
            // Each variant against the baseline of the same round.
            let pairs: Vec<(&Sample, &Sample)> = samples
                .iter()
                .filter(|m| m.connections == c && m.name == variant)
                .filter_map(|v| {
                    samples
                        .iter()
                        .find(|b| b.name == BASELINE && b.connections == c && b.round == v.round)
                        .map(|b| (b, v))
                })
                .collect();
            if pairs.is_empty() {
                continue;
            }
            let ratios = |f: &dyn Fn(&Sample) -> f64| -> Vec<f64> {
                pairs.iter().map(|(b, v)| f(v) / f(b)).collect()
            };
            let _ = writeln!(
                s,
                "{c} conns, {variant}/{BASELINE} (median [per round]): throughput {}; CPU per request: sidecar {}, upstream {}, processes {}, proxy core {}",
                show(&ratios(&|m| m.wrk.rps)),
                show(&ratios(&|m| m.per_10k(m.sidecar))),
                show(&ratios(&|m| m.per_10k(m.upstream))),
                show(&ratios(&|m| m.per_10k(m.procs()))),
                show(&ratios(&|m| m.per_10k(m.core))),
            );
        }
    }
    s
}

#[cfg(test)]
mod tests {
    use std::process::Stdio;

    use super::*;

    fn sample(name: &'static str, round: usize, rps: f64, sidecar: f64) -> Sample {
        Sample {
            name,
            round,
            connections: 32,
            wrk: WrkResult {
                requests: 100_000,
                rps,
                p50_us: 100.0,
                p99_us: 300.0,
                errors: 0,
            },
            sidecar,
            upstream: 1.0,
            core: 4.0,
            rss_kb: 9000,
        }
    }

    #[test]
    fn report_pairs_interleaved_rounds_and_takes_medians() {
        let samples = vec![
            sample(BASELINE, 0, 10_000.0, 2.0),
            sample(ROW_NAME, 0, 12_000.0, 1.0),
            sample(BASELINE, 1, 10_000.0, 2.0),
            sample(ROW_NAME, 1, 11_000.0, 1.6),
            sample(BASELINE, 2, 10_000.0, 2.0),
            sample(ROW_NAME, 2, 13_000.0, 1.2),
        ];
        let r = report(&samples);
        assert!(
            r.contains("ours-full-ebpf/ours-userspace (median [per round]): throughput 1.20x [1.20 1.10 1.30]"),
            "{r}"
        );
        assert!(!r.contains(SOCKMAP_ONLY), "no such samples: {r}");
        assert!(r.contains("sidecar 0.60x [0.50 0.80 0.60]"), "{r}");
        let row = median_row(&samples, 32).expect("row");
        assert_eq!(row.name, ROW_NAME);
        assert!((row.rps - 12_000.0).abs() < 1e-9);
        assert!((row.cpu_s_per_10k.expect("cpu") - 0.12).abs() < 1e-9);
        assert!(median_row(&samples, 1).is_none());
    }

    #[test]
    fn commands_get_their_arguments_and_join_the_cgroup_first() {
        let out = command(0, None, Path::new("echo"))
            .args(["-n", "a b", "c"])
            .output()
            .expect("sh and taskset");
        assert_eq!(String::from_utf8_lossy(&out.stdout), "a b c");
        let missing = command(0, Some(Path::new("/nonexistent/cgroup")), Path::new("true"))
            .stderr(Stdio::null())
            .status()
            .expect("sh");
        assert_eq!(missing.code(), Some(97));
    }

    #[test]
    fn core_busy_reads_proc_stat() {
        assert!(super::super::busy_seconds(Some(0)).expect("cpu0") > 0.0);
        assert!(super::super::busy_seconds(Some(9999)).is_err());
    }

    #[test]
    fn rounds_alternate_their_order_and_one_connection_gets_more() {
        let v = ["u", "f", "s"];
        assert_eq!(order(&v, 0), [&"u", &"f", &"s"]);
        assert_eq!(order(&v, 1), [&"s", &"f", &"u"]);
        assert_eq!(order(&v, 2), [&"u", &"f", &"s"]);
        // Past ROUNDS, the diagnostic variant (last) is left out.
        assert_eq!(order(&v, ROUNDS), [&"f", &"u"]);
        assert_eq!(order(&v, ROUNDS + 1), [&"u", &"f"]);
        assert_eq!(rounds(1), ROUNDS_AT_ONE_CONNECTION);
        assert_eq!(rounds(32), ROUNDS);
        // Each order as often at 1 connection.
        assert_eq!(ROUNDS_AT_ONE_CONNECTION % 2, 0);
    }

    #[test]
    fn medians() {
        assert_eq!(median(vec![3.0, 1.0, 2.0]), 2.0);
        assert_eq!(median(vec![4.0, 1.0, 2.0, 3.0]), 2.5);
        assert!(median(vec![f64::NAN]).is_nan());
    }
}
