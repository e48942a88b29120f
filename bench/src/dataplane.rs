//! `spright-bench dataplane`: the SPRIGHT claim measured on this machine, side by side.
//!
//! 1. Per-hop round trips (one thread each side, pinned to different cores): an sk_msg
//!    descriptor hop, the Unix fallback transport, raw Unix-socket and loopback-TCP ping-pong of
//!    16 bytes, and one HTTP/1.1 keep-alive hop (hyper client to hyper server).
//! 2. The 4-function motion chain through the gateway over shm+sk_msg (and shm+unix), as four
//!    HTTP services each calling the next, and Knative-shaped (each behind Knative's real
//!    queue-proxy in its own network namespace). The system under test runs on core 0, the
//!    load generator on core 1; CPU is the sum over every process of the system under test.
//! 3. The dataplane's idle CPU.

use std::io::{Read, Write};
use std::net::{SocketAddr, TcpListener, TcpStream};
use std::os::unix::net::UnixStream;
use std::path::PathBuf;
use std::process::{Child, Command, Stdio};
use std::sync::Arc;
use std::time::{Duration, Instant};

use anyhow::{Context, bail};
use bytes::Bytes;
use hdrhistogram::Histogram;
use spright_core::descriptor::Descriptor;
use spright_core::transport::{SkMsgEndpoint, Transport, UnixEndpoint};

use crate::knative_chain::{KnativeChain, KnativeChainConfig};
use crate::measure::{cpu_seconds, pin, pin_self, sibling, total_cpu, wait_http_ok, wrk};
use crate::report::{Row, table, write_json};

/// Arguments of `spright-bench dataplane`.
#[derive(Debug, Clone, clap::Args)]
pub struct DataplaneArgs {
    /// Round trips per hop measurement.
    #[arg(long, default_value_t = 20_000)]
    pub hop_iters: u32,
    /// Seconds of load per chain measurement.
    #[arg(long, default_value_t = 5.0)]
    pub seconds: f64,
    /// Seconds of idle CPU measurement.
    #[arg(long, default_value_t = 10.0)]
    pub idle_seconds: f64,
    /// Skip the Knative-shaped chain (needs root and Knative's queue-proxy).
    #[arg(long)]
    pub no_knative: bool,
    /// Knative's queue-proxy binary.
    #[arg(long, default_value = "/root/go/bin/queue")]
    pub queue_bin: PathBuf,
    /// Also write the figures as JSON here.
    #[arg(long)]
    pub json: Option<PathBuf>,
}

const SUT_CPU: usize = 0;
const LOAD_CPU: usize = 1;
const WARMUP: u32 = 1_000;

fn hist() -> Histogram<u64> {
    Histogram::new_with_bounds(1, 60_000_000_000, 3)
        .unwrap_or_else(|_| Histogram::new(3).unwrap_or_else(|_| unreachable!()))
}

fn hop_row(name: &str, h: &Histogram<u64>) -> Row {
    Row {
        p50_us: Some(h.value_at_quantile(0.5) as f64 / 1000.0),
        p99_us: Some(h.value_at_quantile(0.99) as f64 / 1000.0),
        connections: Some(1),
        ..Row::named(name)
    }
}

/// One ping-pong path: `ping` sends 16 bytes (or a descriptor) and waits for the echo, which a
/// thread on the other core sends back; `finish` stops that thread and cleans up.
struct Hop {
    name: &'static str,
    ping: Box<dyn FnMut() -> anyhow::Result<()>>,
    finish: Box<dyn FnOnce() -> anyhow::Result<()>>,
}

/// Starts the echo side on the system-under-test core.
fn echo_thread(
    mut echo: impl FnMut() -> anyhow::Result<bool> + Send + 'static,
) -> std::thread::JoinHandle<anyhow::Result<()>> {
    std::thread::spawn(move || -> anyhow::Result<()> {
        pin_self(SUT_CPU)?;
        while echo()? {}
        Ok(())
    })
}

fn join(t: std::thread::JoinHandle<anyhow::Result<()>>) -> anyhow::Result<()> {
    t.join()
        .map_err(|_| anyhow::anyhow!("echo thread panicked"))?
}

fn desc(dst: u32, slot: u32) -> Descriptor {
    Descriptor {
        dst,
        slot,
        len: 0,
        generation: 0,
    }
}

/// Descriptor ping-pong between two endpoints of a transport. A descriptor with slot
/// u32::MAX tells the echo side to stop.
fn transport_hop(
    name: &'static str,
    a: Arc<dyn Transport>,
    b: Arc<dyn Transport>,
    cleanup: Box<dyn FnOnce() -> anyhow::Result<()>>,
) -> Hop {
    let echo = echo_thread(move || {
        let d = b.recv()?;
        if d.slot == u32::MAX {
            return Ok(false);
        }
        b.send(&d.to(1))?;
        Ok(true)
    });
    let a2 = Arc::clone(&a);
    Hop {
        name,
        ping: Box::new(move || {
            a.send(&desc(2, 1))?;
            a.recv()?;
            Ok(())
        }),
        finish: Box::new(move || {
            a2.send(&desc(2, u32::MAX))?;
            join(echo)?;
            cleanup()
        }),
    }
}

fn hop_skmsg() -> anyhow::Result<Hop> {
    let mut dp = spright_ebpf::Dataplane::load(&spright_ebpf::DataplaneOptions::default())
        .context("the sk_msg hop needs the eBPF programs")?;
    let hub = TcpListener::bind("127.0.0.1:0")?;
    let hub_addr = hub.local_addr()?;
    let holder = std::thread::spawn(move || {
        let mut held = Vec::new();
        for s in hub.incoming().take(2).flatten() {
            held.push(s);
        }
        // Keep the hub ends open until the endpoints close.
        for mut s in held {
            let mut sink = [0u8; 64];
            while matches!(s.read(&mut sink), Ok(n) if n > 0) {}
        }
    });
    let reg = |dp: &mut spright_ebpf::Dataplane, port, id| {
        dp.register_port(port, id).map_err(|e| {
            spright_core::transport::TransportError::Io(std::io::Error::other(e.to_string()))
        })
    };
    let a: Arc<dyn Transport> = Arc::new(SkMsgEndpoint::connect(hub_addr, |p| reg(&mut dp, p, 1))?);
    let b: Arc<dyn Transport> = Arc::new(SkMsgEndpoint::connect(hub_addr, |p| reg(&mut dp, p, 2))?);
    let (a2, b2) = (Arc::clone(&a), Arc::clone(&b));
    Ok(transport_hop(
        "hop/sk_msg-descriptor",
        a,
        b,
        Box::new(move || {
            a2.shutdown();
            b2.shutdown();
            drop((a2, b2));
            let _ = holder.join();
            Ok(dp.detach()?)
        }),
    ))
}

fn hop_unix_transport() -> anyhow::Result<Hop> {
    let dir = std::env::temp_dir().join(format!("spright-bench-hop-{}", std::process::id()));
    std::fs::create_dir_all(&dir)?;
    let a: Arc<dyn Transport> = Arc::new(UnixEndpoint::bind(&dir, 1)?);
    let b: Arc<dyn Transport> = Arc::new(UnixEndpoint::bind(&dir, 2)?);
    Ok(transport_hop(
        "hop/unix-transport-descriptor",
        a,
        b,
        Box::new(move || {
            let _ = std::fs::remove_dir_all(&dir);
            Ok(())
        }),
    ))
}

/// 16-byte ping-pong over a connected stream pair; closing the ping side ends the echo.
fn stream_hop<S: Read + Write + Send + 'static>(name: &'static str, a: S, mut b: S) -> Hop {
    let echo = echo_thread(move || {
        let mut m = [0u8; 16];
        match b.read_exact(&mut m) {
            Ok(()) => {
                b.write_all(&m)?;
                Ok(true)
            }
            Err(_) => Ok(false),
        }
    });
    let a = Arc::new(std::sync::Mutex::new(a));
    let a2 = Arc::clone(&a);
    Hop {
        name,
        ping: Box::new(move || {
            let mut s = a.lock().map_err(|_| anyhow::anyhow!("poisoned"))?;
            let mut buf = [0u8; 16];
            s.write_all(&[7u8; 16])?;
            s.read_exact(&mut buf)?;
            Ok(())
        }),
        finish: Box::new(move || {
            drop(a2);
            join(echo)
        }),
    }
}

fn hop_raw_unix() -> anyhow::Result<Hop> {
    let (a, b) = UnixStream::pair()?;
    Ok(stream_hop("hop/raw-unix-socket", a, b))
}

fn hop_raw_tcp() -> anyhow::Result<Hop> {
    let l = TcpListener::bind("127.0.0.1:0")?;
    let a = TcpStream::connect(l.local_addr()?)?;
    let (b, _) = l.accept()?;
    a.set_nodelay(true)?;
    b.set_nodelay(true)?;
    Ok(stream_hop("hop/raw-loopback-tcp", a, b))
}

/// One HTTP/1.1 keep-alive hop: hyper client to a hyper server echoing a 16-byte body.
fn hop_http() -> anyhow::Result<Hop> {
    use http_body_util::{BodyExt, Full};
    use hyper_util::rt::TokioIo;
    let l = std::net::TcpListener::bind("127.0.0.1:0")?;
    let addr = l.local_addr()?;
    l.set_nonblocking(true)?;
    let server = std::thread::spawn(move || -> anyhow::Result<()> {
        pin_self(SUT_CPU)?;
        let rt = tokio::runtime::Builder::new_current_thread()
            .enable_all()
            .build()?;
        rt.block_on(async move {
            let l = tokio::net::TcpListener::from_std(l)?;
            let (s, _) = l.accept().await?;
            s.set_nodelay(true)?;
            let svc = hyper::service::service_fn(
                |req: hyper::Request<hyper::body::Incoming>| async move {
                    let b = req.into_body().collect().await?.to_bytes();
                    anyhow::Ok(hyper::Response::new(Full::new(b)))
                },
            );
            let _ = hyper::server::conn::http1::Builder::new()
                .serve_connection(TokioIo::new(s), svc)
                .await;
            anyhow::Ok(())
        })
    });
    let rt = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()?;
    let mut tx = rt.block_on(async move {
        let s = tokio::net::TcpStream::connect(addr).await?;
        s.set_nodelay(true)?;
        let (tx, conn) = hyper::client::conn::http1::handshake(TokioIo::new(s)).await?;
        tokio::spawn(conn);
        anyhow::Ok(tx)
    })?;
    let body = Bytes::from_static(&[7u8; 16]);
    let rt = Arc::new(rt);
    let rt2 = Arc::clone(&rt);
    Ok(Hop {
        name: "hop/http1-keepalive",
        ping: Box::new(move || {
            let req = hyper::Request::post("/")
                .header("host", "bench")
                .body(Full::new(body.clone()))?;
            rt.block_on(async {
                let r = tx.send_request(req).await?;
                let _ = r.into_body().collect().await?;
                anyhow::Ok(())
            })
        }),
        finish: Box::new(move || {
            drop(rt2); // closes the connection once the ping closure is gone too
            server
                .join()
                .map_err(|_| anyhow::anyhow!("server thread panicked"))?
        }),
    })
}

/// Round trips over every path, interleaved: `rounds` rounds, each running every path in
/// turn, so drift in the machine's state (frequency, other load) falls on all paths alike.
fn measure_hops(iters: u32, rounds: u32, same_core: bool) -> anyhow::Result<Vec<Row>> {
    pin_self(if same_core { SUT_CPU } else { LOAD_CPU })?;
    let mut hops = vec![
        hop_skmsg()?,
        hop_unix_transport()?,
        hop_raw_unix()?,
        hop_raw_tcp()?,
        hop_http()?,
    ];
    let mut hists: Vec<Histogram<u64>> = hops.iter().map(|_| hist()).collect();
    for h in &mut hops {
        for _ in 0..WARMUP {
            (h.ping)()?;
        }
    }
    let per_round = (iters / rounds.max(1)).max(1);
    for _ in 0..rounds.max(1) {
        for (h, hist) in hops.iter_mut().zip(&mut hists) {
            for _ in 0..per_round {
                let t0 = Instant::now();
                (h.ping)()?;
                hist.record(
                    u64::try_from(t0.elapsed().as_nanos())
                        .unwrap_or(u64::MAX)
                        .max(1),
                )?;
            }
        }
    }
    let place = if same_core { "same core" } else { "cross core" };
    let rows = hops
        .iter()
        .zip(&hists)
        .map(|(h, hist)| hop_row(&format!("{} ({place})", h.name), hist))
        .collect();
    for h in hops {
        let Hop { ping, finish, .. } = h;
        drop(ping);
        finish()?;
    }
    Ok(rows)
}

/// Child processes killed on drop.
struct Procs(Vec<Child>);

impl Drop for Procs {
    fn drop(&mut self) {
        for c in &mut self.0 {
            let _ = c.kill();
            let _ = c.wait();
        }
    }
}

fn free_port() -> anyhow::Result<u16> {
    Ok(TcpListener::bind("127.0.0.1:0")?.local_addr()?.port())
}

/// The gateway with the motion chain on `transport`; returns the processes, the URL and pids.
fn start_shm_chain(
    transport: &str,
    dir: &std::path::Path,
) -> anyhow::Result<(Procs, String, Vec<u32>)> {
    let fn_bin = sibling("spright-sample-chain")?;
    let mut yaml = String::from("functions:\n");
    for step in spright_sample_chain::STEPS {
        yaml.push_str(&format!(
            "  - name: {step}\n    command: [{:?}, {step:?}]\n",
            fn_bin.display().to_string()
        ));
    }
    yaml.push_str("chains:\n  - name: motion\n    route: /motion\n    steps: [decode, denoise, detect, alert]\n");
    let chain = dir.join(format!("chain-{transport}.yaml"));
    std::fs::write(&chain, yaml)?;
    let port = free_port()?;
    let addr: SocketAddr = ([127, 0, 0, 1], port).into();
    let log = std::fs::File::create(dir.join(format!("gateway-{transport}.log")))?;
    let child = Command::new(sibling("spright-gateway")?)
        .args([
            "--chain",
            &chain.display().to_string(),
            "--listen",
            &addr.to_string(),
            "--transport",
            transport,
        ])
        .args([
            "--run-dir",
            &dir.join(format!("run-{transport}")).display().to_string(),
        ])
        .stdin(Stdio::null())
        .stdout(log.try_clone()?)
        .stderr(log)
        .spawn()
        .context("starting spright-gateway")?;
    let gw_pid = child.id();
    let procs = Procs(vec![child]);
    let url = format!("http://{addr}/motion");
    wait_http_ok(
        &url,
        spright_sample_chain::sample_body(4).as_bytes(),
        Duration::from_secs(20),
    )
    .with_context(|| {
        format!(
            "the {transport} chain did not come up; see {}",
            dir.display()
        )
    })?;
    let list = crate::measure::http_get(&format!("http://{addr}/functions"))?;
    let fns: Vec<serde_json::Value> = serde_json::from_str(&list)?;
    let mut pids = vec![gw_pid];
    pids.extend(
        fns.iter()
            .filter_map(|f| f["pid"].as_u64())
            .filter_map(|p| u32::try_from(p).ok()),
    );
    if pids.len() != 5 {
        bail!("expected the gateway and 4 functions, got pids {pids:?}");
    }
    Ok((procs, url, pids))
}

fn start_http_chain(dir: &std::path::Path) -> anyhow::Result<(Procs, String, Vec<u32>)> {
    let fn_bin = sibling("spright-sample-chain")?;
    let ports: Vec<u16> = (0..4).map(|_| free_port()).collect::<anyhow::Result<_>>()?;
    let mut procs = Procs(Vec::new());
    for (i, step) in spright_sample_chain::STEPS.iter().enumerate() {
        let mut cmd = Command::new("taskset");
        cmd.args(["-c", &SUT_CPU.to_string()]).arg(&fn_bin);
        cmd.args(["http", step, &format!("127.0.0.1:{}", ports[i])]);
        if let Some(next) = ports.get(i + 1) {
            cmd.arg(format!("http://127.0.0.1:{next}/"));
        }
        let log = std::fs::File::create(dir.join(format!("http-{step}.log")))?;
        procs.0.push(
            cmd.stdin(Stdio::null())
                .stdout(log.try_clone()?)
                .stderr(log)
                .spawn()?,
        );
    }
    let url = format!("http://127.0.0.1:{}/", ports[0]);
    wait_http_ok(
        &url,
        spright_sample_chain::sample_body(4).as_bytes(),
        Duration::from_secs(20),
    )?;
    let pids = procs.0.iter().map(Child::id).collect();
    Ok((procs, url, pids))
}

/// Load at 1 and 32 connections (wrk on the load core); CPU of `pids` per 1,000 requests.
fn measure_chain(
    name: &str,
    url: &str,
    pids: &[u32],
    seconds: f64,
    dir: &std::path::Path,
    rows: &mut Vec<Row>,
) -> anyhow::Result<()> {
    for pid in pids {
        pin(*pid, SUT_CPU)?;
    }
    let body = spright_sample_chain::sample_body(64);
    // Warm up connections and caches.
    let _ = wrk(LOAD_CPU, url, Some(body.as_bytes()), 4, 1.0, dir)?;
    for conns in [1usize, 32] {
        let cpu0 = total_cpu(pids)?;
        let r = wrk(LOAD_CPU, url, Some(body.as_bytes()), conns, seconds, dir)?;
        let cpu = total_cpu(pids)? - cpu0;
        if r.errors > 0 {
            bail!("{name}: {} of {} requests failed", r.errors, r.requests);
        }
        rows.push(Row {
            connections: Some(conns),
            p50_us: Some(r.p50_us),
            p99_us: Some(r.p99_us),
            rps: Some(r.rps),
            cpu_s_per_1k: Some(cpu / r.requests as f64 * 1000.0),
            ..Row::named(name)
        });
        eprintln!("  {name} c={conns}: {:.0} req/s", r.rps);
    }
    Ok(())
}

/// Runs the whole dataplane bench and prints the table and the targets.
pub fn run(args: DataplaneArgs) -> anyhow::Result<()> {
    let mut rows = Vec::new();
    eprintln!(
        "per-hop round trips ({} each, interleaved in 10 rounds, cross core then same core)...",
        args.hop_iters
    );
    // Both placements: one core each (the wakeup crosses cores: an IPI, costly in a VM) and
    // both ends on one core (the wakeup is a context switch).
    rows.extend(measure_hops(args.hop_iters, 10, false)?);
    rows.extend(measure_hops(args.hop_iters, 10, true)?);
    pin_self(LOAD_CPU)?;

    let dir = std::env::temp_dir().join(format!("spright-bench-dp-{}", std::process::id()));
    std::fs::create_dir_all(&dir)?;
    eprintln!(
        "4-function chain, {} s per point (logs in {})...",
        args.seconds,
        dir.display()
    );
    let idle;
    {
        let (_p, url, pids) = start_shm_chain("sk_msg", &dir)?;
        measure_chain(
            "chain/shm+sk_msg",
            &url,
            &pids,
            args.seconds,
            &dir,
            &mut rows,
        )?;
        eprintln!("  idle dataplane for {} s...", args.idle_seconds);
        std::thread::sleep(Duration::from_secs(1));
        let before: Vec<f64> = pids
            .iter()
            .map(|p| cpu_seconds(*p))
            .collect::<anyhow::Result<_>>()?;
        let t0 = Instant::now();
        std::thread::sleep(Duration::from_secs_f64(args.idle_seconds));
        let after: f64 = total_cpu(&pids)?;
        let pct = (after - before.iter().sum::<f64>()) / t0.elapsed().as_secs_f64() * 100.0;
        idle = pct;
        rows.push(Row {
            idle_cpu_pct: Some(pct),
            ..Row::named("idle/dataplane (gateway+4 fns)")
        });
    }
    {
        let (_p, url, pids) = start_shm_chain("unix", &dir)?;
        measure_chain("chain/shm+unix", &url, &pids, args.seconds, &dir, &mut rows)?;
    }
    {
        let (_p, url, pids) = start_http_chain(&dir)?;
        measure_chain(
            "chain/http-hops",
            &url,
            &pids,
            args.seconds,
            &dir,
            &mut rows,
        )?;
    }
    if !args.no_knative {
        let kc = KnativeChain::start(&KnativeChainConfig {
            sample_chain_bin: sibling("spright-sample-chain")?,
            queue_bin: args.queue_bin.clone(),
            steps: spright_sample_chain::STEPS
                .iter()
                .map(|s| (*s).to_owned())
                .collect(),
            container_concurrency: 0,
        })?;
        measure_chain(
            "chain/knative-queue-proxy",
            &kc.url(),
            &kc.pids(),
            args.seconds,
            &dir,
            &mut rows,
        )?;
    }
    let _ = std::fs::remove_dir_all(&dir);

    println!(
        "\nspright-bench dataplane (system under test on cpu {SUT_CPU}, load on cpu {LOAD_CPU})\n"
    );
    print!("{}", table(&rows));
    println!("\n{}", targets(&rows, idle));
    if let Some(p) = &args.json {
        write_json(p, &rows)?;
        println!("wrote {}", p.display());
    }
    Ok(())
}

fn find<'a>(rows: &'a [Row], name: &str, conns: Option<usize>) -> Option<&'a Row> {
    rows.iter()
        .find(|r| r.name == name && (conns.is_none() || r.connections == conns))
}

fn targets(rows: &[Row], idle: f64) -> String {
    let mut out = String::from("targets (ours vs peers, this run):\n");
    let mut line = |what: &str, value: Option<f64>, ok: &dyn Fn(f64) -> bool, goal: &str| {
        let (v, verdict) = match value {
            Some(v) => (format!("{v:.2}"), if ok(v) { "met" } else { "MISSED" }),
            None => ("-".into(), "not measured"),
        };
        out.push_str(&format!("  {what:<58} {v:>8}  (goal {goal}) {verdict}\n"));
    };
    let p50 = |n: &str| find(rows, n, None).and_then(|r| r.p50_us);
    for place in ["cross core", "same core"] {
        line(
            &format!("sk_msg hop p50 / raw unix-socket p50 ({place})"),
            p50(&format!("hop/sk_msg-descriptor ({place})"))
                .zip(p50(&format!("hop/raw-unix-socket ({place})")))
                .map(|(a, b)| a / b),
            &|v| v <= 1.2,
            "<= 1.2",
        );
    }
    let rps = |n: &str| find(rows, n, Some(32)).and_then(|r| r.rps);
    let cpu = |n: &str| find(rows, n, Some(32)).and_then(|r| r.cpu_s_per_1k);
    let ratio = |a: Option<f64>, b: Option<f64>| a.zip(b).map(|(a, b)| a / b);
    line(
        "chain throughput shm+sk_msg / http-hops (32 conns)",
        ratio(rps("chain/shm+sk_msg"), rps("chain/http-hops")),
        &|v| v >= 5.0,
        ">= 5",
    );
    line(
        "chain CPU per request shm+sk_msg / http-hops",
        ratio(cpu("chain/shm+sk_msg"), cpu("chain/http-hops")),
        &|v| v <= 1.0 / 3.0,
        "<= 0.33",
    );
    line(
        "chain throughput shm+sk_msg / knative-queue-proxy (32 conns)",
        ratio(rps("chain/shm+sk_msg"), rps("chain/knative-queue-proxy")),
        &|v| v >= 20.0,
        ">= 20",
    );
    line(
        "chain CPU per request shm+sk_msg / knative-queue-proxy",
        ratio(cpu("chain/shm+sk_msg"), cpu("chain/knative-queue-proxy")),
        &|v| v <= 0.05,
        "<= 0.05",
    );
    line(
        "idle dataplane CPU, % of one core",
        Some(idle),
        &|v| v < 0.5,
        "< 0.5",
    );
    out
}
