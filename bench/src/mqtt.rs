//! `spright-bench mqtt`: MQTT to sink throughput and publish-to-sink latency of our
//! `mqtt-adaptor` against Knative's prototype `mqttsource`
//! (`go install knative.dev/eventing/cmd/mqttsource@v0.49.2`), side by side in one run.
//!
//! For each contender: a fresh mosquitto on a free loopback port, an in-process HTTP sink that
//! answers 202 and records when each event id arrived, the contender process, then a burst of
//! `--messages` MQTT v5 publishes (QoS 1 to the broker) of structured CloudEvents carrying the
//! `Content-Type: application/cloudevents+json` user property the prototype requires. Both keep
//! the event `id`, so publish and arrival are matched per id inside this process (one
//! monotonic clock). The adaptor subscribes at `--qos` (default 1, manual acks after the sink's
//! 2xx); the prototype always subscribes at QoS 0.
//!
//! Our adaptor runs with its own default `--sink-pipeline` (`auto`: the whole window at the
//! sink one request per connection while the sink looks slow, up to 16 pipelined requests per
//! connection while it is fast; the bench's sink answers pipelined requests in order as Go's
//! net/http does) unless `--sink-pipeline` is given here (`1`: one request per connection;
//! N: always N). Each round prints the mode ours ran in: after the burst the bench reads the
//! adaptor's `mqtt_adaptor_sink_pipelined` gauge and `mqtt_adaptor_sink_pipeline_switches`
//! counter.
//!
//! Placement (`--placement`, printed at the start; the same for both contenders):
//! - `shared` (default): nothing pinned; the contender, mosquitto and this process (publisher
//!   and sink) share every CPU, as in a pod next to its broker on a small node;
//! - `split`: the contender on CPU 0, started under `taskset` so that Go's GOMAXPROCS and
//!   tokio's worker count see one CPU; mosquitto and this process on CPU 1. A contender's
//!   throughput is then bounded by its own CPU on one core, or by mosquitto and the bench on
//!   the other.
//!
//! `--rounds N` interleaves the contenders (ours first in odd rounds, the prototype first in
//! even ones), prints each round's ratios and the median of the per-round throughput and CPU
//! per message ratios; the table shows the round with the median throughput ratio.
//!
//! Two phases per contender:
//! - burst: `--messages` published as fast as the broker takes them; gives messages/s (arrived /
//!   time from the first publish to the last arrival), CPU seconds of the contender process per
//!   10,000 messages (utime + stime from /proc), peak RSS (VmHWM) and how many arrived;
//! - paced: `--latency-messages` at `--latency-rate` per second; gives p50/p99
//!   publish-to-sink latency without the queueing of a burst.

use std::collections::HashMap;
use std::net::{SocketAddr, TcpListener, TcpStream};
use std::path::PathBuf;
use std::process::{Child, Command, Stdio};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use anyhow::{Context, bail};

use crate::measure::{cpu_seconds, pin_self, sibling};
use crate::report::{Row, table, write_json};
use bytes::Bytes;
use rumqttc::v5 as r5;

/// Arguments of `spright-bench mqtt`.
#[derive(Debug, Clone, clap::Args)]
pub struct MqttBenchArgs {
    /// Messages in the measured burst.
    #[arg(long, default_value_t = 20_000)]
    pub messages: usize,
    /// Subscription QoS of our adaptor (the prototype always uses 0).
    #[arg(long, default_value_t = 1)]
    pub qos: u8,
    /// In-flight window of our adaptor.
    #[arg(long, default_value_t = 100)]
    pub inflight: u16,
    /// Our adaptor's `--sink-pipeline` (`auto` or HTTP/1.1 requests outstanding per sink
    /// connection; the bench's sink answers pipelined requests in order, as Go's net/http
    /// does). Unset: not passed, the adaptor's default (`auto`) runs.
    #[arg(long)]
    pub sink_pipeline: Option<String>,
    /// Where the processes run, the same for both contenders: `shared` pins nothing (the
    /// contender, mosquitto and this process share every CPU); `split` runs the contender on
    /// CPU 0 (started under `taskset`, so Go's GOMAXPROCS and tokio's worker count see one
    /// CPU) and mosquitto plus this process (publisher and sink) on CPU 1.
    #[arg(long, value_enum, default_value_t = Placement::Shared)]
    pub placement: Placement,
    /// Our adaptor binary (default: `mqtt-adaptor` next to this executable).
    #[arg(long)]
    pub adaptor_bin: Option<PathBuf>,
    /// Knative's prototype binary.
    #[arg(long, default_value = "/root/go/bin/mqttsource")]
    pub prototype_bin: PathBuf,
    /// Skip the prototype (e.g. when it is not installed).
    #[arg(long)]
    pub skip_prototype: bool,
    /// The mosquitto binary.
    #[arg(long, default_value = "/usr/sbin/mosquitto")]
    pub mosquitto: PathBuf,
    /// Write result rows (name ours / prototype) as JSON to this file.
    #[arg(long)]
    pub json: Option<PathBuf>,
    /// Messages of the paced latency phase.
    #[arg(long, default_value_t = 2_000)]
    pub latency_messages: usize,
    /// Publish rate (messages/s) of the latency phase.
    #[arg(long, default_value_t = 1_000)]
    pub latency_rate: u32,
    /// Seconds to wait for a burst to arrive.
    #[arg(long, default_value_t = 120)]
    pub timeout: u64,
    /// Rounds of ours then the prototype, interleaved; each round prints its throughput ratio
    /// and the table shows the round with the median ratio (use an odd number on a shared
    /// machine).
    #[arg(long, default_value_t = 1)]
    pub rounds: usize,
}

/// CPU placement of the processes of one run (see `--placement`).
#[derive(Debug, Clone, Copy, PartialEq, Eq, clap::ValueEnum)]
pub enum Placement {
    Shared,
    Split,
}

impl Placement {
    fn describe(self) -> &'static str {
        match self {
            Placement::Shared => {
                "shared: nothing pinned; the contender, mosquitto and the publisher+sink share all CPUs"
            }
            Placement::Split => {
                "split: the contender on CPU 0 (started under taskset); mosquitto and the publisher+sink on CPU 1"
            }
        }
    }

    /// A command for `bin` that starts on `cpu` under split placement.
    fn command(self, bin: &std::path::Path, cpu: usize) -> Command {
        match self {
            Placement::Shared => Command::new(bin),
            Placement::Split => {
                let mut c = Command::new("taskset");
                c.args(["-c", &cpu.to_string()]).arg(bin);
                c
            }
        }
    }
}

/// One contender's figures: the shared row plus what only this bench reports.
#[derive(Debug, Clone)]
struct Measured {
    row: Row,
    cpu_s_per_10k: Option<f64>,
    /// mosquitto's CPU seconds per 10,000 messages during the burst.
    broker_cpu_s_per_10k: Option<f64>,
    /// This process's (publisher and sink) CPU seconds per 10,000 messages during the burst.
    bench_cpu_s_per_10k: Option<f64>,
    peak_rss_mib: Option<f64>,
    sent: usize,
    arrived: usize,
    subscribe_qos: u8,
    /// Ours: whether it pipelined at the end of the burst, and how often `auto` switched.
    pipelining: Option<(bool, u64)>,
}

/// `GET path` over HTTP/1.0 on loopback: the whole answer, head included.
fn http_get(port: u16, path: &str) -> Option<String> {
    use std::io::{Read, Write};
    let mut s = TcpStream::connect(("127.0.0.1", port)).ok()?;
    s.write_all(format!("GET {path} HTTP/1.0\r\n\r\n").as_bytes())
        .ok()?;
    let mut out = String::new();
    s.read_to_string(&mut out).ok()?;
    Some(out)
}

/// Our adaptor's sink pipelining from its metrics: (pipelined now, switches so far).
fn pipelining(metrics: &str) -> Option<(bool, u64)> {
    let value = |name: &str| -> Option<f64> {
        metrics
            .lines()
            .find_map(|l| l.strip_prefix(name)?.strip_prefix(' ')?.trim().parse().ok())
    };
    Some((
        value("mqtt_adaptor_sink_pipelined")? > 0.0,
        value("mqtt_adaptor_sink_pipeline_switches_total")? as u64,
    ))
}

fn free_port() -> anyhow::Result<u16> {
    Ok(TcpListener::bind("127.0.0.1:0")?.local_addr()?.port())
}

fn wait_port(port: u16, timeout: Duration) -> bool {
    let deadline = Instant::now() + timeout;
    while Instant::now() < deadline {
        if TcpStream::connect(("127.0.0.1", port)).is_ok() {
            return true;
        }
        std::thread::sleep(Duration::from_millis(20));
    }
    false
}

/// A temp directory removed on drop.
struct TempDir(PathBuf);

impl TempDir {
    fn new(name: &str) -> anyhow::Result<Self> {
        let d = std::env::temp_dir().join(name);
        std::fs::create_dir_all(&d)?;
        Ok(TempDir(d))
    }
}

impl Drop for TempDir {
    fn drop(&mut self) {
        let _ = std::fs::remove_dir_all(&self.0);
    }
}

/// A child process killed and reaped on drop.
struct Proc(Child);

impl Proc {
    fn pid(&self) -> u32 {
        self.0.id()
    }
}

impl Drop for Proc {
    fn drop(&mut self) {
        let _ = self.0.kill();
        let _ = self.0.wait();
    }
}

fn peak_rss_mib(pid: u32) -> Option<f64> {
    let status = std::fs::read_to_string(format!("/proc/{pid}/status")).ok()?;
    let line = status.lines().find(|l| l.starts_with("VmHWM:"))?;
    let kib: f64 = line.split_whitespace().nth(1)?.parse().ok()?;
    Some(kib / 1024.0)
}

/// Arrival times by event id.
#[derive(Clone, Default)]
struct Arrivals(Arc<Mutex<HashMap<u64, Instant>>>);

/// The sink: a lean HTTP/1.1 responder answering 202 to every request, so that it costs both
/// contenders as little CPU as possible on the shared cores and the bench measures the
/// contender, not a server stack. Per read it parses every complete request in the buffer,
/// stamps their `ce-id`s with one clock read and one lock, and writes all the answers at once.
async fn start_sink(arrivals: Arrivals) -> anyhow::Result<SocketAddr> {
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await?;
    let addr = listener.local_addr()?;
    tokio::spawn(async move {
        loop {
            let Ok((stream, _)) = listener.accept().await else {
                continue;
            };
            let _ = stream.set_nodelay(true);
            tokio::spawn(serve_sink_conn(stream, arrivals.clone()));
        }
    });
    Ok(addr)
}

const SINK_ACCEPTED: &[u8] = b"HTTP/1.1 202 Accepted\r\ncontent-length: 0\r\n\r\n";
const SINK_BAD_REQUEST: &[u8] =
    b"HTTP/1.1 400 Bad Request\r\ncontent-length: 0\r\nconnection: close\r\n\r\n";

async fn serve_sink_conn(mut stream: tokio::net::TcpStream, arrivals: Arrivals) {
    use tokio::io::{AsyncReadExt, AsyncWriteExt};
    let mut buf = bytes::BytesMut::with_capacity(16 * 1024);
    let mut out = Vec::with_capacity(1024);
    let mut ids = Vec::new();
    loop {
        match stream.read_buf(&mut buf).await {
            Ok(n) if n > 0 => {}
            _ => return,
        }
        let now = Instant::now();
        let mut close = false;
        loop {
            match parse_sink_request(&buf) {
                Ok(Some(req)) => {
                    let _ = buf.split_to(req.len);
                    ids.extend(req.ce_id);
                    out.extend_from_slice(SINK_ACCEPTED);
                    if req.close {
                        close = true;
                        break;
                    }
                }
                Ok(None) => break,
                Err(()) => {
                    out.extend_from_slice(SINK_BAD_REQUEST);
                    close = true;
                    break;
                }
            }
        }
        if !ids.is_empty() {
            let mut m = arrivals.0.lock().unwrap_or_else(|p| p.into_inner());
            for id in ids.drain(..) {
                m.entry(id).or_insert(now);
            }
        }
        if !out.is_empty() {
            if stream.write_all(&out).await.is_err() {
                return;
            }
            out.clear();
        }
        if close {
            return;
        }
    }
}

/// One complete request at the start of the sink's buffer.
#[derive(Debug, PartialEq, Eq)]
struct SinkRequest {
    /// Bytes of the request (head and body).
    len: usize,
    ce_id: Option<u64>,
    close: bool,
}

fn find(hay: &[u8], needle: &[u8]) -> Option<usize> {
    hay.windows(needle.len()).position(|w| w == needle)
}

/// Parses the request at the start of `buf`: `Ok(None)` while incomplete, `Err` when it is not
/// HTTP/1.1 this sink understands (head over 64 KiB, bad length or chunk size).
fn parse_sink_request(buf: &[u8]) -> Result<Option<SinkRequest>, ()> {
    let Some(head_end) = find(buf, b"\r\n\r\n") else {
        return if buf.len() > 64 * 1024 {
            Err(())
        } else {
            Ok(None)
        };
    };
    let head = &buf[..head_end];
    let mut content_length = 0usize;
    let mut chunked = false;
    let mut req = SinkRequest {
        len: 0,
        ce_id: None,
        close: false,
    };
    for line in head.split(|&b| b == b'\n').skip(1) {
        let Some(colon) = line.iter().position(|&b| b == b':') else {
            continue;
        };
        let name = &line[..colon];
        let value = std::str::from_utf8(&line[colon + 1..])
            .map_err(|_| ())?
            .trim();
        if name.eq_ignore_ascii_case(b"content-length") {
            content_length = value.parse().map_err(|_| ())?;
        } else if name.eq_ignore_ascii_case(b"ce-id") {
            req.ce_id = value.parse().ok();
        } else if name.eq_ignore_ascii_case(b"transfer-encoding") {
            chunked = value.to_ascii_lowercase().contains("chunked");
        } else if name.eq_ignore_ascii_case(b"connection") {
            req.close = value.eq_ignore_ascii_case("close");
        }
    }
    let body = head_end + 4;
    if !chunked {
        req.len = body.checked_add(content_length).ok_or(())?;
        return Ok((buf.len() >= req.len).then_some(req));
    }
    // Chunked: size lines, data, and the last chunk's (empty) trailer section.
    let mut pos = body;
    loop {
        let Some(eol) = find(&buf[pos..], b"\r\n") else {
            return Ok(None);
        };
        let line = std::str::from_utf8(&buf[pos..pos + eol]).map_err(|_| ())?;
        let size_text = line.split(';').next().unwrap_or("").trim();
        let size = usize::from_str_radix(size_text, 16).map_err(|_| ())?;
        pos += eol + 2;
        if size == 0 {
            // Trailer lines until an empty one.
            loop {
                let Some(eol) = find(&buf[pos..], b"\r\n") else {
                    return Ok(None);
                };
                pos += eol + 2;
                if eol == 0 {
                    req.len = pos;
                    return Ok(Some(req));
                }
            }
        }
        pos = pos
            .checked_add(size)
            .and_then(|p| p.checked_add(2))
            .ok_or(())?;
        if buf.len() < pos {
            return Ok(None);
        }
    }
}

fn start_mosquitto(
    bin: &std::path::Path,
    dir: &std::path::Path,
    placement: Placement,
) -> anyhow::Result<(Proc, u16)> {
    let port = free_port()?;
    let conf = dir.join("mosquitto.conf");
    std::fs::write(
        &conf,
        format!(
            "listener {port} 127.0.0.1\nallow_anonymous true\npersistence false\nmax_queued_messages 1000000\nmax_inflight_messages 1000\nlog_dest none\n"
        ),
    )?;
    let child = placement
        .command(bin, 1)
        .arg("-c")
        .arg(&conf)
        .stdout(Stdio::null())
        .stderr(Stdio::null())
        .spawn()
        .with_context(|| format!("starting {}", bin.display()))?;
    let p = Proc(child);
    if !wait_port(port, Duration::from_secs(10)) {
        bail!("mosquitto did not listen on {port}");
    }
    Ok((p, port))
}

/// A structured CloudEvent as the prototype requires it.
fn event(id: u64) -> Bytes {
    Bytes::from(format!(
        r#"{{"specversion":"1.0","id":"{id}","source":"/bench/device","type":"bench.reading","datacontenttype":"application/json","data":{{"seq":{id},"value":21.5}}}}"#
    ))
}

/// A lean MQTT v5 publisher (QoS 1) over one TCP connection: PUBLISH packets queued by
/// the bench are encoded with rumqttc's codec and written in batches of up to 256, with at most
/// the broker's receive maximum unacknowledged; a reader task returns a credit per PUBACK.
/// It costs both contenders the same little CPU, so neither is bounded by the publisher (a
/// rumqttc client writes and flushes every publish on its own).
struct Publisher {
    tx: tokio::sync::mpsc::UnboundedSender<(String, u64)>,
}

async fn publisher(port: u16) -> anyhow::Result<Publisher> {
    use r5::mqttbytes::v5::{Connect, Packet};
    use tokio::io::{AsyncReadExt, AsyncWriteExt};
    let stream = tokio::net::TcpStream::connect(("127.0.0.1", port)).await?;
    stream.set_nodelay(true)?;
    let (mut rd, mut wr) = stream.into_split();
    let mut out = bytes::BytesMut::new();
    Connect {
        keep_alive: 0,
        client_id: format!("bench-pub-{port}"),
        clean_start: true,
        properties: None,
    }
    .write(&None, &None, &mut out)
    .map_err(|e| anyhow::anyhow!("encoding CONNECT: {e:?}"))?;
    wr.write_all(&out).await?;
    let mut inb = bytes::BytesMut::with_capacity(64 * 1024);
    let receive_max = loop {
        match Packet::read(&mut inb, None) {
            Ok(Packet::ConnAck(a)) => {
                break a.properties.and_then(|p| p.receive_max).unwrap_or(65_535);
            }
            Ok(other) => bail!("publisher: expected CONNACK, got {other:?}"),
            Err(r5::mqttbytes::Error::InsufficientBytes(_)) => {
                if rd.read_buf(&mut inb).await? == 0 {
                    bail!("publisher: the broker closed the connection");
                }
            }
            Err(e) => bail!("publisher: {e:?}"),
        }
    };
    let window = usize::from(receive_max).clamp(1, 1000);
    let credits = Arc::new(tokio::sync::Semaphore::new(window));
    let acks = credits.clone();
    tokio::spawn(async move {
        loop {
            match Packet::read(&mut inb, None) {
                Ok(Packet::PubAck(_)) => acks.add_permits(1),
                Ok(_) => {}
                Err(r5::mqttbytes::Error::InsufficientBytes(_)) => {
                    if !matches!(rd.read_buf(&mut inb).await, Ok(n) if n > 0) {
                        return;
                    }
                }
                Err(_) => return,
            }
        }
    });
    let (tx, mut rx) = tokio::sync::mpsc::unbounded_channel::<(String, u64)>();
    let batch = window.min(256);
    tokio::spawn(async move {
        let props = r5::mqttbytes::v5::PublishProperties {
            user_properties: vec![(
                "Content-Type".to_owned(),
                "application/cloudevents+json".to_owned(),
            )],
            ..Default::default()
        };
        let mut pkid: u16 = 0;
        let mut queued = Vec::with_capacity(batch);
        while rx.recv_many(&mut queued, batch).await > 0 {
            let Ok(permits) = credits.acquire_many(queued.len() as u32).await else {
                return;
            };
            permits.forget();
            out.clear();
            for (topic, id) in queued.drain(..) {
                pkid = pkid.checked_add(1).unwrap_or(1);
                let mut p = r5::mqttbytes::v5::Publish::new(
                    topic,
                    r5::mqttbytes::QoS::AtLeastOnce,
                    event(id),
                    Some(props.clone()),
                );
                p.pkid = pkid;
                if p.write(&mut out).is_err() {
                    return;
                }
            }
            if wr.write_all(&out).await.is_err() {
                return;
            }
        }
    });
    Ok(Publisher { tx })
}

async fn publish(p: &Publisher, topic: &str, id: u64) -> anyhow::Result<()> {
    p.tx.send((topic.to_owned(), id))
        .map_err(|_| anyhow::anyhow!("publish: the publisher connection is gone"))
}

async fn wait_arrivals(a: &Arrivals, ids: std::ops::Range<u64>, timeout: Duration) -> usize {
    let deadline = Instant::now() + timeout;
    let want = (ids.end - ids.start) as usize;
    let mut last = 0;
    let mut last_change = Instant::now();
    loop {
        let n = {
            let m = a.0.lock().unwrap_or_else(|p| p.into_inner());
            ids.clone().filter(|i| m.contains_key(i)).count()
        };
        if n >= want || Instant::now() > deadline {
            return n;
        }
        if n != last {
            last = n;
            last_change = Instant::now();
        } else if last_change.elapsed() > Duration::from_secs(10) {
            // Nothing arrived for 10 s: the rest is lost (e.g. QoS 0 under overload).
            return n;
        }
        // Arrival times are stamped by the sink; this poll only decides when to stop, so it
        // is kept rare (a scan costs the sink's lock).
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
}

/// Publishes at a fixed rate and returns sorted publish-to-sink latencies in microseconds.
async fn paced_latencies(
    args: &MqttBenchArgs,
    pubc: &Publisher,
    arrivals: &Arrivals,
    topic: &str,
) -> anyhow::Result<Vec<f64>> {
    let base = 2_000_000_000u64;
    let n = args.latency_messages as u64;
    let mut tick = tokio::time::interval(Duration::from_secs_f64(
        1.0 / f64::from(args.latency_rate.max(1)),
    ));
    let mut sent_at = Vec::with_capacity(args.latency_messages);
    for i in 0..n {
        tick.tick().await;
        sent_at.push(Instant::now());
        publish(pubc, topic, base + i).await?;
    }
    wait_arrivals(arrivals, base..base + n, Duration::from_secs(args.timeout)).await;
    let m = arrivals.0.lock().unwrap_or_else(|p| p.into_inner());
    let mut lat: Vec<f64> = (0..n)
        .filter_map(|i| {
            m.get(&(base + i))
                .map(|t| t.duration_since(sent_at[i as usize]).as_secs_f64() * 1e6)
        })
        .collect();
    lat.sort_by(f64::total_cmp);
    Ok(lat)
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Contender {
    Ours,
    Prototype,
}

async fn measure(args: &MqttBenchArgs, who: Contender) -> anyhow::Result<Measured> {
    let tmp = TempDir::new(&format!(
        "spright-bench-mqtt-{}-{who:?}",
        std::process::id()
    ))?;
    let dir = tmp.0.clone();
    let (broker, port) = start_mosquitto(&args.mosquitto, &dir, args.placement)?;
    let arrivals = Arrivals::default();
    let sink = start_sink(arrivals.clone()).await?;
    let sink_url = format!("http://{sink}/");
    let topic = "bench/readings";
    let log = std::fs::File::create(dir.join(format!("{who:?}.log")))?;
    let mut ours_http = None;
    let proc = match who {
        Contender::Ours => {
            let bin = match &args.adaptor_bin {
                Some(b) => b.clone(),
                None => sibling("mqtt-adaptor")?,
            };
            let http_port = free_port()?;
            let p = Proc(
                args.placement
                    .command(&bin, 0)
                    .args(["--broker", &format!("mqtt://127.0.0.1:{port}")])
                    .args(["--topic", topic, "--client-id", "bench-ours"])
                    .args(["--qos", &args.qos.to_string()])
                    .args(["--inflight", &args.inflight.to_string()])
                    .args(
                        args.sink_pipeline
                            .iter()
                            .flat_map(|p| ["--sink-pipeline", p.as_str()]),
                    )
                    .args([
                        "--http-port",
                        &http_port.to_string(),
                        "--http-address",
                        "127.0.0.1",
                    ])
                    .env("K_SINK", &sink_url)
                    .env("RUST_LOG", "warn")
                    .stdout(Stdio::null())
                    .stderr(log)
                    .spawn()
                    .with_context(|| {
                        format!(
                            "starting {} (cargo build --release -p mqtt-adaptor)",
                            bin.display()
                        )
                    })?,
            );
            let deadline = Instant::now() + Duration::from_secs(20);
            loop {
                let ready = http_get(http_port, "/readyz").is_some_and(|out| {
                    out.starts_with("HTTP/1.1 200") || out.starts_with("HTTP/1.0 200")
                });
                if ready {
                    break;
                }
                if Instant::now() > deadline {
                    bail!("our adaptor did not become ready");
                }
                tokio::time::sleep(Duration::from_millis(50)).await;
            }
            ours_http = Some(http_port);
            p
        }
        Contender::Prototype => Proc(
            args.placement
                .command(&args.prototype_bin, 0)
                .args(["-source", &format!("127.0.0.1:{port}")])
                .args(["-topic", topic, "-clientid", "bench-prototype"])
                .args(["-eventSource", "http://bench.example/mqtt"])
                .args(["-sink", &sink_url])
                .env("K_SINK", &sink_url)
                .stdout(Stdio::null())
                .stderr(log)
                .spawn()
                .with_context(|| {
                    format!(
                        "starting {} (go install knative.dev/eventing/cmd/mqttsource@v0.49.2)",
                        args.prototype_bin.display()
                    )
                })?,
        ),
    };
    let pid = proc.pid();
    let pubc = publisher(port).await?;
    // Warm-up until events flow (the prototype has no readiness signal).
    let warm = 100u64;
    let warm_base = 1_000_000_000u64;
    let deadline = Instant::now() + Duration::from_secs(30);
    let mut warmed = false;
    while Instant::now() < deadline && !warmed {
        for i in 0..warm {
            publish(&pubc, topic, warm_base + i).await?;
        }
        warmed = wait_arrivals(
            &arrivals,
            warm_base..warm_base + warm,
            Duration::from_secs(2),
        )
        .await
            > 0;
    }
    if !warmed {
        bail!(
            "{who:?}: no event reached the sink during warm-up (see {})",
            dir.display()
        );
    }
    tokio::time::sleep(Duration::from_millis(500)).await;
    // Idle: connected, subscribed, nothing published.
    let idle0 = cpu_seconds(pid).ok();
    tokio::time::sleep(Duration::from_secs(2)).await;
    let idle_cpu_pct = match (idle0, cpu_seconds(pid).ok()) {
        (Some(a), Some(b)) => Some((b - a) / 2.0 * 100.0),
        _ => None,
    };

    let cpu0 = cpu_seconds(pid).unwrap_or(0.0);
    let broker0 = cpu_seconds(broker.pid()).ok();
    let bench0 = cpu_seconds(std::process::id()).ok();
    let n = args.messages as u64;
    let start = Instant::now();
    for id in 0..n {
        publish(&pubc, topic, id).await?;
    }
    let arrived = wait_arrivals(&arrivals, 0..n, Duration::from_secs(args.timeout)).await;
    let cpu1 = cpu_seconds(pid).unwrap_or(cpu0);
    let pipelining = ours_http
        .and_then(|port| http_get(port, "/metrics"))
        .and_then(|m| pipelining(&m));
    let broker_cpu = broker0
        .zip(cpu_seconds(broker.pid()).ok())
        .map(|(a, b)| b - a);
    let bench_cpu = bench0
        .zip(cpu_seconds(std::process::id()).ok())
        .map(|(a, b)| b - a);

    let m = arrivals.0.lock().unwrap_or_else(|p| p.into_inner()).clone();
    let mut last = start;
    for id in 0..n {
        if let Some(t) = m.get(&id) {
            last = last.max(*t);
        }
    }
    let lat = paced_latencies(args, &pubc, &arrivals, topic).await?;
    let pct = |p: f64| -> Option<f64> {
        if lat.is_empty() {
            None
        } else {
            let i = ((lat.len() as f64 - 1.0) * p).round() as usize;
            Some(lat[i.min(lat.len() - 1)])
        }
    };
    let rss = peak_rss_mib(pid);
    drop(proc);
    let elapsed = last.duration_since(start).as_secs_f64();
    let cpu = cpu1 - cpu0;
    let per = |k: f64| (arrived > 0).then(|| cpu * k / arrived as f64);
    Ok(Measured {
        row: Row {
            p50_us: pct(0.50),
            p99_us: pct(0.99),
            rps: (arrived > 0 && elapsed > 0.0).then(|| arrived as f64 / elapsed),
            cpu_s_per_1k: per(1000.0),
            idle_cpu_pct,
            ..Row::named(match who {
                Contender::Ours => "ours",
                Contender::Prototype => "prototype",
            })
        },
        cpu_s_per_10k: per(10_000.0),
        broker_cpu_s_per_10k: broker_cpu
            .and_then(|c| (arrived > 0).then(|| c * 1e4 / arrived as f64)),
        bench_cpu_s_per_10k: bench_cpu
            .and_then(|c| (arrived > 0).then(|| c * 1e4 / arrived as f64)),
        peak_rss_mib: rss,
        sent: args.messages,
        arrived,
        subscribe_qos: if who == Contender::Ours { args.qos } else { 0 },
        pipelining,
    })
}

/// How our adaptor sent to the sink, for the round lines and the table.
fn describe_pipelining(p: Option<(bool, u64)>) -> String {
    match p {
        Some((true, switches)) => {
            format!("pipelined at the end of the burst ({switches} mode switches)")
        }
        Some((false, switches)) => {
            format!("one request per connection at the end of the burst ({switches} mode switches)")
        }
        None => "pipelining unknown (no metrics)".into(),
    }
}

fn fmt(v: Option<f64>, prec: usize) -> String {
    v.map_or_else(|| "-".to_owned(), |x| format!("{x:.prec$}"))
}

/// Index of the median value (the upper one for an even count).
fn median_index(values: &[f64]) -> usize {
    let mut order: Vec<usize> = (0..values.len()).collect();
    order.sort_by(|&a, &b| values[a].total_cmp(&values[b]));
    order[order.len() / 2]
}

/// Runs the benchmark and prints the side-by-side table.
pub fn run(args: MqttBenchArgs) -> anyhow::Result<()> {
    let placement = args.placement;
    if placement == Placement::Split {
        let allowed = nix::sched::sched_getaffinity(nix::unistd::Pid::from_raw(0))?;
        if !(allowed.is_set(0)? && allowed.is_set(1)?) {
            bail!("--placement split needs CPUs 0 and 1");
        }
        pin_self(1)?;
    }
    let rt = tokio::runtime::Builder::new_multi_thread()
        .worker_threads(2)
        .enable_all()
        .on_thread_start(move || {
            if placement == Placement::Split
                && let Err(e) = pin_self(1)
            {
                eprintln!("cannot pin a bench thread to CPU 1: {e}");
            }
        })
        .build()?;
    println!("placement: {}", placement.describe());
    println!(
        "ours: --qos {} --inflight {} --sink-pipeline {}; prototype: QoS 0 (fixed)",
        args.qos,
        args.inflight,
        args.sink_pipeline
            .as_deref()
            .unwrap_or("not passed (the adaptor's default: auto)")
    );
    let mut ours_runs = Vec::new();
    let mut proto_runs = Vec::new();
    let mut ratios = Vec::new();
    let mut cpu_ratios = Vec::new();
    for round in 1..=args.rounds.max(1) {
        // Interleaved, and the order alternates per round so neither contender always runs
        // first (warm caches, a neighbour's burst).
        let proto_first = !args.skip_prototype && round % 2 == 0;
        let early_proto = if proto_first {
            Some(rt.block_on(measure(&args, Contender::Prototype))?)
        } else {
            None
        };
        let ours = rt.block_on(measure(&args, Contender::Ours))?;
        if !args.skip_prototype {
            let proto = match early_proto {
                Some(p) => p,
                None => rt.block_on(measure(&args, Contender::Prototype))?,
            };
            let cpu_ratio = match (ours.cpu_s_per_10k, proto.cpu_s_per_10k) {
                (Some(a), Some(b)) if b > 0.0 => Some(a / b),
                _ => None,
            };
            cpu_ratios.extend(cpu_ratio);
            if let (Some(a), Some(b)) = (ours.row.rps, proto.row.rps)
                && b > 0.0
            {
                ratios.push(a / b);
                if args.rounds > 1 {
                    // CPU of all processes (contender, mosquitto, publisher and sink) per
                    // 10,000 messages: what bounds a burst when the cores are shared.
                    let all = |m: &Measured| {
                        Some(m.cpu_s_per_10k? + m.broker_cpu_s_per_10k? + m.bench_cpu_s_per_10k?)
                    };
                    println!(
                        "round {round} ({} first): ours {a:.0} msg/s, prototype {b:.0} msg/s, throughput {:.2}x, CPU per message {}x; all processes s/10k: ours {}, prototype {}; ours {}",
                        if proto_first { "prototype" } else { "ours" },
                        a / b,
                        fmt(cpu_ratio, 2),
                        fmt(all(&ours), 3),
                        fmt(all(&proto), 3),
                        describe_pipelining(ours.pipelining),
                    );
                }
            }
            proto_runs.push(proto);
        }
        ours_runs.push(ours);
    }
    if ratios.len() > 1 {
        let mut sorted = ratios.clone();
        sorted.sort_by(f64::total_cmp);
        println!(
            "throughput ratio over {} rounds: min {:.2}x, median {:.2}x, max {:.2}x",
            sorted.len(),
            sorted[0],
            sorted[sorted.len() / 2],
            sorted[sorted.len() - 1]
        );
        let mut cpu = cpu_ratios.clone();
        cpu.sort_by(f64::total_cmp);
        if let (Some(lo), Some(hi)) = (cpu.first(), cpu.last()) {
            println!(
                "CPU per message ratio over {} rounds: min {lo:.2}x, median {:.2}x, max {hi:.2}x",
                cpu.len(),
                cpu[cpu.len() / 2],
            );
        }
    }
    // The table shows one round, both contenders from it: the round with the median ratio
    // (or, without the prototype, ours with the median throughput).
    let pick = if ratios.len() == ours_runs.len() && !ratios.is_empty() {
        median_index(&ratios)
    } else {
        let rps: Vec<f64> = ours_runs.iter().map(|m| m.row.rps.unwrap_or(0.0)).collect();
        median_index(&rps)
    };
    let mut rows = vec![ours_runs.swap_remove(pick)];
    if pick < proto_runs.len() {
        rows.push(proto_runs.swap_remove(pick));
    }
    let shared: Vec<Row> = rows.iter().map(|m| m.row.clone()).collect();
    print!("{}", table(&shared));
    println!(
        "{:<10} {:>4} {:>8} {:>8} {:>14} {:>10} {:>17} {:>21}",
        "name",
        "qos",
        "sent",
        "arrived",
        "cpu s/10k msg",
        "peak MiB",
        "mosquitto s/10k",
        "publisher+sink s/10k"
    );
    for m in &rows {
        println!(
            "{:<10} {:>4} {:>8} {:>8} {:>14} {:>10} {:>17} {:>21}",
            m.row.name,
            m.subscribe_qos,
            m.sent,
            m.arrived,
            fmt(m.cpu_s_per_10k, 3),
            fmt(m.peak_rss_mib, 1),
            fmt(m.broker_cpu_s_per_10k, 3),
            fmt(m.bench_cpu_s_per_10k, 3)
        );
    }
    println!(
        "ours, sink requests: {}",
        describe_pipelining(rows[0].pipelining)
    );
    if let [ours, proto] = &rows[..] {
        let ratio = |a: Option<f64>, b: Option<f64>| match (a, b) {
            (Some(a), Some(b)) if b > 0.0 => format!("{:.2}x", a / b),
            _ => "-".into(),
        };
        println!(
            "ours/prototype: throughput {}, p50 latency {}, p99 latency {}, CPU per message {}, peak RSS {}",
            ratio(ours.row.rps, proto.row.rps),
            ratio(ours.row.p50_us, proto.row.p50_us),
            ratio(ours.row.p99_us, proto.row.p99_us),
            ratio(ours.cpu_s_per_10k, proto.cpu_s_per_10k),
            ratio(ours.peak_rss_mib, proto.peak_rss_mib),
        );
    }
    if let Some(path) = &args.json {
        write_json(path, &shared).with_context(|| format!("writing {}", path.display()))?;
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn pipelining_is_read_from_the_metrics() {
        let text = "# HELP x\nmqtt_adaptor_sink_pipelined 1\nmqtt_adaptor_sink_pipeline_switches_total 3\n";
        assert_eq!(pipelining(text), Some((true, 3)));
        let text = "mqtt_adaptor_sink_pipelined_x 1\nmqtt_adaptor_sink_pipelined 0\nmqtt_adaptor_sink_pipeline_switches_total 0\n";
        assert_eq!(pipelining(text), Some((false, 0)));
        assert_eq!(pipelining("mqtt_adaptor_sink_pipelined 1\n"), None);
    }

    #[test]
    fn sink_parses_length_chunked_and_partial_requests() {
        let a = b"POST / HTTP/1.1\r\nHost: x\r\nCe-Id: 42\r\nContent-Length: 3\r\n\r\nabc";
        let r = parse_sink_request(a).unwrap().unwrap();
        assert_eq!(r.len, a.len());
        assert_eq!(r.ce_id, Some(42));
        assert!(!r.close);
        assert_eq!(parse_sink_request(&a[..a.len() - 1]).unwrap(), None);
        let c = b"POST / HTTP/1.1\r\nce-id: 7\r\nTransfer-Encoding: chunked\r\nConnection: close\r\n\r\n3\r\nabc\r\n0\r\n\r\nNEXT";
        let r = parse_sink_request(c).unwrap().unwrap();
        assert_eq!(r.len, c.len() - 4);
        assert_eq!(r.ce_id, Some(7));
        assert!(r.close);
        for cut in 0..c.len() - 4 {
            assert_eq!(parse_sink_request(&c[..cut]).unwrap(), None, "cut {cut}");
        }
        assert!(parse_sink_request(b"POST / HTTP/1.1\r\ncontent-length: x\r\n\r\n").is_err());
        assert!(
            parse_sink_request(b"POST / HTTP/1.1\r\ntransfer-encoding: chunked\r\n\r\nzz\r\n")
                .is_err()
        );
    }

    #[test]
    fn sink_parser_survives_random_input() {
        // A small xorshift generator: deterministic, no dependency.
        let mut x: u64 = 0x9e37_79b9_7f4a_7c15;
        let alphabet =
            b"0123456789abcdefPOST /\r\n:;ce-idcontent-lengthtransfer-encodingchunked\x00\xff";
        for _ in 0..20_000 {
            x ^= x << 13;
            x ^= x >> 7;
            x ^= x << 17;
            let len = (x % 200) as usize;
            let input: Vec<u8> = (0..len)
                .map(|i| alphabet[((x >> (i % 56)) as usize + i * 7) % alphabet.len()])
                .collect();
            if let Ok(Some(r)) = parse_sink_request(&input) {
                assert!(r.len <= input.len());
            }
        }
    }
}
