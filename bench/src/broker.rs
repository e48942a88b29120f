//! `spright-bench broker`: events per second and p50/p99 ingress-to-subscriber latency of
//! broker-shm, side by side with the stock MT channel-based broker's topology, in one run.
//!
//! Paths (all in this process, on loopback; the brokers are broker-shm's own library):
//! - `http`: broker-shm ingress → mmap log → trigger → HTTP subscriber;
//! - `shm`: broker-shm ingress → log → trigger → dataplane-SDK function by descriptor;
//! - `chain-shm`: 3 functions chained by triggers over shared memory (each reply re-enters
//!   the broker without HTTP); latency measured when the third function receives the event;
//!   the broker's dispatch is inline (the reply thread appends a reply and sends the next
//!   descriptor itself);
//! - `chain-http`: the same 3-step reply chain with HTTP subscribers;
//! - `chain-stock`: the same 3-step chain in the stock broker's topology: drop-in ingress →
//!   HTTP → an in-memory channel (IMC-like: fan-out to every subscription in parallel, each
//!   reply posted back to the ingress as a Subscription's `reply`, then 202, as Knative's IMC
//!   answers by default; `--async-channel`: 202 first) → HTTP → drop-in filter → HTTP →
//!   subscriber, the reply returned in the filter's response;
//! - `chain-knative`: the same topology on Knative's own code, the
//!   `knative-broker-oracle` that `scripts/setup.sh` builds from `oracle/knative-broker`:
//!   Knative's mt-broker-ingress and mt-broker-filter handlers and the in-memory channel's
//!   fan-out (knative.dev/eventing v0.49.2) in one Go process on the component's core, the
//!   same bench subscribers;
//! - `chain-swap`: what an operator actually runs after swapping
//!   only the mt-broker-ingress and mt-broker-filter images (issue 5, item 5): broker-shm's
//!   drop-in ingress and filter, as in `chain-stock`, around Knative's own InMemoryChannel
//!   fan-out in the oracle process (its channel server only, on the component's core): the
//!   Broker's `knative.dev/channelAddress` names the oracle's channel, whose subscribers are
//!   the drop-in filter's `/triggers/<ns>/<name>/<uid>` URLs with the drop-in ingress as
//!   `replyUri`. Synchronous like Knative's IMC by default, `--async-channel` as for the
//!   others.
//!
//! `chain-knative` and `chain-swap` need the oracle binary that `scripts/setup.sh` builds (as
//! the queue-proxy and dataplane benches need Knative's queue-proxy from it); without it they
//! fail with that hint, nothing is skipped. `chain-stock` stands in for Knative's channel with
//! a lean Rust one, the fastest baseline of the three.
//!
//! Each path runs two phases. Throughput: `--concurrency` closed-loop senders POST binary-mode
//! events to the ingress, each waiting for the 202; events/s is what reaches the last step.
//! Then the backlog drains (every accepted event reaches the last step). Latency: events
//! paced at `--latency-rate` per second for `--latency-seconds` (open loop, the same rate for
//! every path and well below the slowest path's throughput, so the figures are not queueing
//! delay; a warning says when it is not); p50/p99 from the sender's timestamp taken before
//! the POST to the ingress to the receipt at the last step, for every path alike. The send
//! time rides in the extension `benchsent`. A second row per path, `[from ingress]`, measures
//! the same paced events from the ingress handler's receipt of the decoded event (broker-shm's
//! ingress or the drop-in ingress, through `broker_shm::probe`) to the last step: the issue's
//! ingress-to-subscriber latency without the sender's own cost. Knative's own ingress in Go
//! has no such probe: for `chain-knative` the oracle runs with
//! `--stamp-ingress-extension benchingress`, a wrapper around its ingress handler only that
//! sets the extension `benchingress` to the wall-clock receipt time (ns since the Unix epoch)
//! on a binary-mode event that has none; the subscribers copy it into their replies (the
//! first stamp stays), and the last step reads its receipt on the same clock (CLOCK_REALTIME,
//! where the other rows use the bench's monotonic clock). The stamp is taken before Knative's
//! handler reads and parses the request, whereas broker-shm's probe fires after its decode:
//! Knative's `[from ingress]` figure includes its own parsing of the first event, which
//! makes it larger, and the shm / Knative ratio smaller (more favourable to shm), by that
//! parse time. (`chain-swap`'s row comes from the drop-in ingress's own probe, as
//! `chain-stock`'s.)
//!
//! Placement, the same for every path and as in `spright-bench queue-proxy`: the component
//! under test — broker-shm, or the drop-in ingress, the channel and the drop-in filter — with
//! its functions, HTTP subscribers and the dataplane's threads on one core
//! (`--component-cpu`, default 0), the load generator on another (`--load-cpu`, default 1;
//! its own one-worker runtime). Every thread is pinned from its start (the main thread
//! before it starts any other; the others inherit it), so no hop inside the component under
//! test pays a cross-core wake-up, and the sender's cost stays off the component's core.
//! By default every component runs on one shared runtime worker (what a runtime picks in a
//! one-core cpuset); the functions and broker-shm's dataplane reply thread are threads of
//! their own. That favours the stock topology: its HTTP hops between ingress, channel,
//! filter and subscribers wake no thread at all, while each shared-memory step wakes a
//! function and the reply thread. `--component-threads` gives each component a thread of
//! its own, as separate pods would (broker-shm's ingress, each HTTP subscriber, the drop-in
//! ingress, the channel, the drop-in filter, each with a one-thread runtime); on a loaded
//! machine the stock topology's throughput then collapses (its backlog outgrows the drain,
//! and the paced phase warns that its latency includes queueing), so the default is the
//! shared runtime. The run prints the placement first. The oracle (`chain-knative`: all
//! three Knative components; `chain-swap`: Knative's channel) is a Go process started from a
//! thread on the component's core: it inherits that core (Go then runs one P), and its
//! goroutines share it with the bench's subscribers (and, in `chain-swap`, the drop-in
//! ingress and filter), as the Rust components do.
//!
//! `post` is the floor of every path: one POST answered 202 at once, through the same sender.
//! `--stages` prints, per path, the paced events' time since the send at every probed stage
//! (ingress, log append, trigger match, encode, slot write, descriptor send, function receipt,
//! reply; channel and subscriber receipts for the HTTP paths): where the time goes.

use crate::measure::pin_self;
use crate::report::{Row, table, write_json};
use anyhow::Context;
use broker_shm::broker::{Runtime, RuntimeConfig};
use broker_shm::config::Mode;
use broker_shm::delivery::Sinks;
use broker_shm::event::CloudEvent;
use broker_shm::log::{Durability, LogConfig};
use broker_shm::manifests::{ConfigSource, Delivery, Snapshot};
use broker_shm::shm::{ShmConfig, ShmDataplane};
use bytes::Bytes;
use hdrhistogram::Histogram;
use http::{Request, Response, StatusCode};
use http_body_util::{BodyExt, Full};
use hyper::body::Incoming;
use hyper_util::client::legacy::Client;
use hyper_util::client::legacy::connect::HttpConnector;
use hyper_util::rt::{TokioExecutor, TokioIo};
use spright_core::sdk::{Function, Next};
use std::path::PathBuf;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::{Arc, Mutex, OnceLock};
use std::time::{Duration, Instant};
use tokio::net::TcpListener;

/// Arguments of `spright-bench broker`.
#[derive(Debug, Clone, clap::Args)]
pub struct BrokerBenchArgs {
    /// Seconds of load per path (after a short warm-up).
    #[arg(long, default_value_t = 3.0)]
    pub seconds: f64,
    /// Concurrent closed-loop senders.
    #[arg(long, default_value_t = 16)]
    pub concurrency: usize,
    /// Paths to run: http, shm, chain-shm, chain-http, chain-stock; chain-swap: broker-shm's
    /// drop-in ingress and filter around Knative's own InMemoryChannel (the operator's image
    /// swap); chain-knative: the stock topology on Knative's own Go handlers (both from
    /// `scripts/setup.sh`'s knative-broker-oracle, as the other benches take Knative's
    /// binaries from it); post (not in the default set): a bare POST answered 202 at once,
    /// the floor of every path.
    #[arg(
        long,
        value_delimiter = ',',
        default_value = "http,shm,chain-shm,chain-http,chain-stock,chain-swap,chain-knative"
    )]
    pub paths: Vec<String>,
    /// Events per second of the paced (open-loop) phase that measures latency: the same for
    /// every path, well below the slowest path's throughput.
    #[arg(long, default_value_t = 100.0)]
    pub latency_rate: f64,
    /// Seconds of the paced phase (rate × seconds samples per path).
    #[arg(long, default_value_t = 5.0)]
    pub latency_seconds: f64,
    /// Dataplane transport for the shared-memory paths: auto, sk_msg or unix.
    #[arg(long, default_value = "auto")]
    pub transport: String,
    /// Log durability of broker-shm: append or msync.
    #[arg(long, default_value = "append")]
    pub durability: String,
    /// Print where the paced events' time goes, stage by stage, for every path.
    #[arg(long)]
    pub stages: bool,
    /// Core of the component under test: the brokers (broker-shm, or the drop-in ingress,
    /// channel and filter), their runtime, the dataplane threads, the functions and the HTTP
    /// subscribers.
    #[arg(long, default_value_t = 0)]
    pub component_cpu: usize,
    /// Run each component on a thread of its own (as separate pods would), instead of every
    /// component on the one shared runtime worker.
    #[arg(long)]
    pub component_threads: bool,
    /// Core of the load generator (the senders and their runtime).
    #[arg(long, default_value_t = 1)]
    pub load_cpu: usize,
    /// The stock topology's channel answers 202 at once and fans out afterwards, as an
    /// InMemoryChannel with the `messaging.knative.dev/async-handler: "true"` annotation.
    /// Without it the channel answers after every subscription's delivery (and reply) is done,
    /// as Knative's IMC does by default (knative.dev/eventing pkg/channel/fanout).
    #[arg(long)]
    pub async_channel: bool,
    /// Also write the figures as JSON here.
    #[arg(long)]
    pub json: Option<PathBuf>,
}

const WARMUP: Duration = Duration::from_millis(500);

fn start() -> Instant {
    static START: OnceLock<Instant> = OnceLock::new();
    *START.get_or_init(Instant::now)
}

/// Monotonic ns since the bench started: the sender's `benchsent` and every receipt.
fn now_ns() -> u64 {
    u64::try_from(start().elapsed().as_nanos()).unwrap_or(u64::MAX)
}

/// Wall-clock ns since the Unix epoch (CLOCK_REALTIME, the clock of Go's
/// `time.Now().UnixNano()`): the clock of the oracle's [`INGRESS_STAMP`], so the last step's
/// receipt is read on it too for chain-knative's `[from ingress]` row.
fn wall_ns() -> u64 {
    std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map_or(0, |d| u64::try_from(d.as_nanos()).unwrap_or(u64::MAX))
}

/// The extension Knative's own ingress (the oracle, `--stamp-ingress-extension`) sets to its
/// receipt time in wall-clock ns; the bench subscribers copy it into their replies.
const INGRESS_STAMP: &str = "benchingress";

/// Latencies and counts seen at the final step of a path.
struct Stats {
    hist: Mutex<Histogram<u64>>,
    /// From the ingress's receipt of the event (its handler has the decoded event) to the
    /// last step: the issue's "ingress-to-subscriber" latency, without the sender's own cost.
    from_ingress: Mutex<Histogram<u64>>,
    count: AtomicU64,
    /// Events seen at the final step whether recording or not (to tell when a backlog is
    /// drained).
    seen: AtomicU64,
    recording: AtomicBool,
}

impl Stats {
    fn new() -> Arc<Stats> {
        Arc::new(Stats {
            hist: Mutex::new(micros()),
            from_ingress: Mutex::new(micros()),
            count: AtomicU64::new(0),
            seen: AtomicU64::new(0),
            recording: AtomicBool::new(false),
        })
    }

    /// Records an event at the last step: `sent` is its `benchsent`, `stamp` its
    /// [`INGRESS_STAMP`] (set only by Knative's own ingress in the oracle).
    fn record(&self, ev: &CloudEvent) {
        self.record_sent(ev.get("benchsent"), ev.get(INGRESS_STAMP));
    }

    fn record_sent(&self, sent: Option<&str>, stamp: Option<&str>) {
        self.seen.fetch_add(1, Ordering::Relaxed);
        if !self.recording.load(Ordering::Relaxed) {
            return;
        }
        let Some(sent) = sent.and_then(|s| s.parse::<u64>().ok()) else {
            return;
        };
        let (now, wall) = (now_ns(), wall_ns());
        let us = now.saturating_sub(sent) / 1000;
        self.count.fetch_add(1, Ordering::Relaxed);
        if let Ok(mut h) = self.hist.lock() {
            let _ = h.record(us.max(1));
        }
        let at_ingress = ingress_times()
            .lock()
            .ok()
            .and_then(|mut m| m.remove(&sent));
        // broker-shm's probe (on the monotonic clock), else the oracle ingress's stamp (on
        // the wall clock).
        let from_ingress = at_ingress.map(|t| now.saturating_sub(t)).or_else(|| {
            stamp
                .and_then(|s| s.parse::<u64>().ok())
                .map(|t| wall.saturating_sub(t))
        });
        if let (Some(ns), Ok(mut h)) = (from_ingress, self.from_ingress.lock()) {
            let _ = h.record((ns / 1000).max(1));
        }
    }

    fn reset(&self) {
        for h in [&self.hist, &self.from_ingress] {
            if let Ok(mut h) = h.lock() {
                h.reset();
            }
        }
        self.count.store(0, Ordering::Relaxed);
    }
}

fn micros() -> Histogram<u64> {
    Histogram::new_with_bounds(1, 60_000_000, 3).unwrap_or_else(|_| {
        Histogram::new(3).unwrap_or_else(|_| unreachable!("3 sigfigs is valid"))
    })
}

/// When each paced event (by its `benchsent`) first reached an ingress handler.
fn ingress_times() -> &'static Mutex<std::collections::HashMap<u64, u64>> {
    static TIMES: OnceLock<Mutex<std::collections::HashMap<u64, u64>>> = OnceLock::new();
    TIMES.get_or_init(Mutex::default)
}

/// Per-stage times since the send (`benchsent`), keyed by event type and stage, recorded
/// during the paced phase: where an event's time goes (broker-shm's probes plus the bench's
/// own marks at the functions, subscribers, channel and the 202).
struct Stages {
    /// The paced phase is on (arrivals at the ingress are noted).
    on: AtomicBool,
    /// `--stages`: also record every stage.
    detail: AtomicBool,
    hists: Mutex<std::collections::BTreeMap<String, Histogram<u64>>>,
}

fn stages() -> &'static Stages {
    static STAGES: OnceLock<Stages> = OnceLock::new();
    STAGES.get_or_init(|| Stages {
        on: AtomicBool::new(false),
        detail: AtomicBool::new(false),
        hists: Mutex::new(std::collections::BTreeMap::new()),
    })
}

/// Records that an event sent at `sent` (the `benchsent` value) reached `stage`.
fn mark_sent(stage: &str, ty: &str, sent: Option<&str>) {
    let s = stages();
    if !s.on.load(Ordering::Relaxed) || !s.detail.load(Ordering::Relaxed) {
        return;
    }
    let Some(sent) = sent.and_then(|v| v.parse::<u64>().ok()) else {
        return;
    };
    let ns = now_ns().saturating_sub(sent).max(1);
    if let Ok(mut h) = s.hists.lock() {
        let h = h.entry(format!("{ty:<9} {stage}")).or_insert_with(|| {
            Histogram::new_with_bounds(1, 60_000_000_000, 3)
                .unwrap_or_else(|_| Histogram::new(3).unwrap_or_else(|_| unreachable!()))
        });
        let _ = h.record(ns);
    }
}

/// The probe broker-shm calls at each of its stages (both ingresses mark
/// `ingress.decoded`, which starts the ingress-to-last-step latency).
fn mark(stage: &'static str, ev: &CloudEvent) {
    if stage == "ingress.decoded"
        && stages().on.load(Ordering::Relaxed)
        && let Some(sent) = ev.get("benchsent").and_then(|v| v.parse::<u64>().ok())
        && let Ok(mut m) = ingress_times().lock()
    {
        // A reply re-entering the ingress keeps the first arrival.
        m.entry(sent).or_insert_with(now_ns);
    }
    mark_sent(stage, ev.get("type").unwrap_or("?"), ev.get("benchsent"));
}

/// Prints the stage breakdown recorded since the last call, in order of median time.
fn print_stages(name: &str) {
    let Ok(mut hists) = stages().hists.lock() else {
        return;
    };
    if hists.is_empty() {
        return;
    }
    let mut rows: Vec<(u64, u64, u64, &String)> = hists
        .iter()
        .map(|(k, h)| {
            (
                h.value_at_quantile(0.5),
                h.value_at_quantile(0.9),
                h.len(),
                k,
            )
        })
        .collect();
    rows.sort();
    println!("{name}: time since send, per stage (p50 / p90 us, samples)");
    let mut prev = 0;
    for (p50, p90, n, k) in rows {
        println!(
            "  {k:<40} {:>8.1} {:>8.1}  (+{:>6.1})  {n}",
            p50 as f64 / 1000.0,
            p90 as f64 / 1000.0,
            p50.saturating_sub(prev) as f64 / 1000.0
        );
        prev = p50;
    }
    hists.clear();
}

fn client() -> Client<HttpConnector, Full<Bytes>> {
    let mut c = HttpConnector::new();
    c.set_nodelay(true);
    Client::builder(TokioExecutor::new())
        .pool_max_idle_per_host(1024)
        .build(c)
}

async fn bind() -> anyhow::Result<(TcpListener, u16)> {
    let l = TcpListener::bind("127.0.0.1:0").await?;
    let port = l.local_addr()?.port();
    Ok((l, port))
}

/// Serves `f` on a fresh port; returns the port.
async fn serve_fn<F, Fut>(f: F) -> anyhow::Result<u16>
where
    F: Fn(Request<Incoming>) -> Fut + Clone + Send + Sync + 'static,
    Fut: std::future::Future<Output = Response<Full<Bytes>>> + Send + 'static,
{
    let (listener, port) = bind().await?;
    tokio::spawn(async move {
        loop {
            let Ok((stream, _)) = listener.accept().await else {
                break;
            };
            let _ = stream.set_nodelay(true);
            let f = f.clone();
            tokio::spawn(async move {
                let svc = hyper::service::service_fn(move |req| {
                    let f = f.clone();
                    async move { Ok::<_, std::convert::Infallible>(f(req).await) }
                });
                let _ = hyper::server::conn::http1::Builder::new()
                    .serve_connection(TokioIo::new(stream), svc)
                    .await;
            });
        }
    });
    Ok(port)
}

fn resp(status: StatusCode) -> Response<Full<Bytes>> {
    let mut r = Response::new(Full::new(Bytes::new()));
    *r.status_mut() = status;
    r
}

fn reply_event(ev: &CloudEvent, next_type: &str) -> CloudEvent {
    let mut r = CloudEvent::new(
        &format!("{}-r", ev.get("id").unwrap_or("x")),
        "/bench/step",
        next_type,
    );
    // The send time, and the first ingress stamp (a reply re-entering the ingress keeps it).
    for ext in ["benchsent", INGRESS_STAMP] {
        if let Some(s) = ev.get(ext) {
            r.set(ext, s);
        }
    }
    r.set("datacontenttype", "application/json");
    r.data = ev.data.clone();
    r
}

/// [`http_subscriber`] on a thread of its own.
async fn subscriber(next_type: Option<&'static str>, stats: &Arc<Stats>) -> anyhow::Result<u16> {
    let stats = stats.clone();
    own_thread("subscriber", move || http_subscriber(next_type, stats)).await
}

/// An HTTP subscriber: records at the final step, or replies with `next_type`.
async fn http_subscriber(
    next_type: Option<&'static str>,
    stats: Arc<Stats>,
) -> anyhow::Result<u16> {
    serve_fn(move |req: Request<Incoming>| {
        let stats = stats.clone();
        async move {
            let (parts, body) = req.into_parts();
            let body = body
                .collect()
                .await
                .map(|c| c.to_bytes())
                .unwrap_or_default();
            let Ok(ev) = CloudEvent::from_http(&parts.headers, body) else {
                return resp(StatusCode::BAD_REQUEST);
            };
            mark("subscriber.received", &ev);
            match next_type {
                None => {
                    stats.record(&ev);
                    resp(StatusCode::ACCEPTED)
                }
                Some(t) => {
                    let r = reply_event(&ev, t);
                    let mut out = Response::new(Full::new(r.data.clone().unwrap_or_default()));
                    *out.headers_mut() = r.binary_headers();
                    out
                }
            }
        }
    })
    .await
}

/// A dataplane-SDK function thread: records at the final step, or replies with `next_type`.
fn shm_function(
    control: PathBuf,
    name: &'static str,
    next_type: Option<&'static str>,
    stats: Arc<Stats>,
) {
    let spawned = std::thread::Builder::new()
        .name(format!("fn-{name}"))
        .spawn(move || {
            let f = match Function::join(&control, name) {
                Ok(f) => f,
                Err(e) => {
                    eprintln!("function {name} could not join: {e}");
                    return;
                }
            };
            let _ = f.run(|event| {
                let ev = CloudEvent::from_structured(event.payload())
                    .map_err(|e| spright_core::sdk::Reject::bad_request(e.to_string()))?;
                mark("fn.received", &ev);
                match next_type {
                    None => {
                        stats.record(&ev);
                        event.set_len(0)?;
                    }
                    Some(t) => event.replace(&reply_event(&ev, t).to_structured())?,
                }
                Ok(Next::Chain)
            });
        });
    if let Err(e) = spawned {
        eprintln!("cannot spawn function thread {name}: {e}");
    }
}

fn trigger(name: &str, ty: &str, subscriber: &str) -> String {
    format!(
        "apiVersion: eventing.knative.dev/v1\nkind: Trigger\nmetadata: {{name: {name}, namespace: bench, uid: uid-{name}}}\nspec:\n  broker: default\n  filters:\n    - exact: {{type: {ty}}}\n  subscriber:\n{subscriber}\n  delivery: {{retry: 3, backoffPolicy: linear, backoffDelay: PT0.01S}}\n"
    )
}

/// A Trigger as the stock Trigger reconciler leaves it: `status.subscriberUri` set to its
/// subscriber, which is where mt-broker-filter (and the drop-in filter) delivers.
fn resolved_trigger(name: &str, ty: &str, port: u16) -> String {
    format!(
        "{}status:\n  subscriberUri: http://127.0.0.1:{port}/\n",
        trigger(name, ty, &uri(port))
    )
}

/// The chain's HTTP subscribers: the first two reply with the next step's type, the last
/// records at `stats`; their ports.
async fn chain_subscribers(stats: &Arc<Stats>) -> anyhow::Result<[u16; 3]> {
    Ok([
        subscriber(Some("chain.s2"), stats).await?,
        subscriber(Some("chain.s3"), stats).await?,
        subscriber(None, stats).await?,
    ])
}

/// The chain's Triggers t1, t2, t3 (types chain.s1, chain.s2, chain.s3), resolved to the
/// subscribers on `ports`.
fn resolved_chain_triggers(ports: [u16; 3]) -> String {
    let docs: Vec<String> = [("t1", "chain.s1"), ("t2", "chain.s2"), ("t3", "chain.s3")]
        .into_iter()
        .zip(ports)
        .map(|((t, ty), port)| resolved_trigger(t, ty, port))
        .collect();
    docs.join("---\n")
}

fn uri(port: u16) -> String {
    format!("    uri: http://127.0.0.1:{port}/")
}

fn function_ref(name: &str) -> String {
    format!("    ref: {{apiVersion: spright.dev/v1, kind: SprightFunction, name: {name}}}")
}

const BROKER: &str = "apiVersion: eventing.knative.dev/v1\nkind: Broker\nmetadata: {name: default, namespace: bench}\n";

/// A fixed snapshot as a [`ConfigSource`] (no watching needed).
struct Static(Snapshot);

impl ConfigSource for Static {
    fn load(&self) -> Snapshot {
        self.0.clone()
    }
    fn watch(&self, _changed: Box<dyn Fn() + Send + Sync>) -> anyhow::Result<()> {
        Ok(())
    }
}

fn snapshot(yaml: &str) -> anyhow::Result<Snapshot> {
    let mut s = Snapshot::default();
    s.add_yaml("bench", yaml);
    if let Some(r) = s.rejected.first() {
        anyhow::bail!(
            "bench manifest rejected: {} {}: {}",
            r.kind,
            r.name,
            r.reason
        );
    }
    Ok(s)
}

/// Starts a broker-shm runtime for `yaml` on a thread of its own; returns its ingress URL.
async fn broker_shm(
    yaml: &str,
    data: &std::path::Path,
    durability: Durability,
    sinks: Sinks,
) -> anyhow::Result<(String, Arc<Runtime>)> {
    let (yaml, data) = (yaml.to_string(), data.to_path_buf());
    own_thread("broker-shm", move || {
        broker_shm_here(yaml, data, durability, sinks)
    })
    .await
}

async fn broker_shm_here(
    yaml: String,
    data: PathBuf,
    durability: Durability,
    sinks: Sinks,
) -> anyhow::Result<(String, Arc<Runtime>)> {
    let rt = Runtime::new(
        RuntimeConfig {
            data_dir: data,
            log: LogConfig {
                segment_bytes: 8 << 20,
                retention_bytes: 1 << 30,
                durability,
            },
            max_ttl: 255,
            max_inflight: 256,
            default_delivery: Delivery::default(),
        },
        sinks,
    );
    rt.reconcile(&snapshot(&yaml)?);
    let (listener, port) = bind().await?;
    let handler_rt = rt.clone();
    tokio::spawn(broker_shm::ingress::serve(
        listener,
        move |req| broker_shm::ingress::handle(handler_rt.clone(), req),
        std::future::pending::<()>(),
    ));
    Ok((format!("http://127.0.0.1:{port}/bench/default"), rt))
}

/// Without `--component-threads`, [`own_thread`] runs its setup on the caller's runtime.
static SHARED_RUNTIME: AtomicBool = AtomicBool::new(true);

/// With `--component-threads`, runs `setup` on a thread of the component's own, as its own
/// pod would have its own process (otherwise on the caller's runtime): a one-thread runtime
/// on that thread (pinned like the thread starting it) runs everything `setup` spawns, so a
/// hop between two components wakes the receiving component's thread, in every topology
/// alike. Returns what `setup` returns.
async fn own_thread<T, F, Fut>(name: &str, setup: F) -> anyhow::Result<T>
where
    T: Send + 'static,
    F: FnOnce() -> Fut + Send + 'static,
    Fut: std::future::Future<Output = anyhow::Result<T>> + 'static,
{
    if SHARED_RUNTIME.load(Ordering::Relaxed) {
        return setup().await;
    }
    let (tx, rx) = tokio::sync::oneshot::channel();
    std::thread::Builder::new()
        .name(name.to_string())
        .spawn(move || {
            let rt = match tokio::runtime::Builder::new_current_thread()
                .enable_all()
                .build()
            {
                Ok(rt) => rt,
                Err(e) => {
                    let _ = tx.send(Err(e.into()));
                    return;
                }
            };
            rt.block_on(async move {
                let _ = tx.send(setup().await);
                std::future::pending::<()>().await
            });
        })?;
    rx.await?
}

/// A bound listener to hand to another component's thread (registered with a runtime there).
fn std_listener() -> anyhow::Result<(std::net::TcpListener, u16)> {
    let l = std::net::TcpListener::bind("127.0.0.1:0")?;
    l.set_nonblocking(true)?;
    let port = l.local_addr()?.port();
    Ok((l, port))
}

/// The stock topology: drop-in ingress and filter plus an IMC-like channel.
async fn stock_topology(yaml_triggers: &str, async_channel: bool) -> anyhow::Result<String> {
    let (ing_l, ing_port) = std_listener()?;
    let (fil_l, fil_port) = std_listener()?;
    let ingress_url = format!("http://127.0.0.1:{ing_port}/bench/default");
    let subs: Vec<String> = ["t1", "t2", "t3"]
        .iter()
        .map(|t| format!("http://127.0.0.1:{fil_port}/triggers/bench/{t}/uid-{t}"))
        .collect();
    let reply_to = ingress_url.clone();
    let channel_port =
        own_thread("channel", move || channel(subs, reply_to, async_channel)).await?;
    dropins(
        ing_l,
        fil_l,
        &format!("http://127.0.0.1:{channel_port}/"),
        yaml_triggers,
    )
    .await?;
    Ok(ingress_url)
}

/// The operator's drop-in swap: broker-shm's drop-in ingress and filter (as in
/// [`stock_topology`]) around Knative's own InMemoryChannel fan-out, served by the oracle
/// (channel port only; see [`knative_topology`] for where it runs). Returns the drop-in
/// ingress URL and the oracle process.
async fn swap_topology(
    dir: &std::path::Path,
    yaml_triggers: &str,
    async_channel: bool,
) -> anyhow::Result<(String, KillOnDrop)> {
    let (ing_l, ing_port) = std_listener()?;
    let (fil_l, fil_port) = std_listener()?;
    let ch = unused_port()?;
    let ingress_url = format!("http://127.0.0.1:{ing_port}/bench/default");
    let oracle = start_oracle(
        dir,
        &imc_yaml(fil_port, &ingress_url, async_channel),
        &[("--channel-port", ch)],
        &[],
    )
    .await?;
    dropins(
        ing_l,
        fil_l,
        &format!("http://127.0.0.1:{ch}/bench/{IMC}"),
        yaml_triggers,
    )
    .await?;
    Ok((ingress_url, oracle))
}

/// broker-shm's drop-in ingress and filter on `ing_l` and `fil_l`, each on its own thread with
/// `--component-threads`: the Broker's status names `channel_url` as its channel
/// (`knative.dev/channelAddress`), the Triggers are `yaml_triggers`.
async fn dropins(
    ing_l: std::net::TcpListener,
    fil_l: std::net::TcpListener,
    channel_url: &str,
    yaml_triggers: &str,
) -> anyhow::Result<()> {
    let broker =
        format!("{BROKER}status:\n  annotations:\n    knative.dev/channelAddress: {channel_url}\n");
    let source: Arc<dyn ConfigSource> =
        Arc::new(Static(snapshot(&format!("{broker}---\n{yaml_triggers}"))?));
    for (name, mode, listener) in [
        ("mt-broker-ingress", Mode::Ingress, ing_l),
        ("mt-broker-filter", Mode::Filter, fil_l),
    ] {
        let source = source.clone();
        own_thread(name, move || async move {
            let listener = TcpListener::from_std(listener)?;
            tokio::spawn(broker_shm::dropin::run(
                Some(mode),
                source,
                255,
                listener,
                std::future::pending::<()>(),
            ));
            Ok(())
        })
        .await?;
    }
    Ok(())
}

/// Where `scripts/setup.sh` builds `oracle/knative-broker`: `$GOBIN`, else `$HOME/go/bin`.
fn knative_oracle_bin() -> PathBuf {
    std::env::var_os("GOBIN")
        .filter(|v| !v.is_empty())
        .map(PathBuf::from)
        .or_else(|| std::env::var_os("HOME").map(|h| PathBuf::from(h).join("go/bin")))
        .unwrap_or_else(|| PathBuf::from("/root/go/bin"))
        .join("knative-broker-oracle")
}

/// A child process killed (and reaped) when the path's run ends.
struct KillOnDrop(std::process::Child);

impl Drop for KillOnDrop {
    fn drop(&mut self) {
        let _ = self.0.kill();
        let _ = self.0.wait();
    }
}

/// A loopback port nothing listens on right now, for a child process to bind.
fn unused_port() -> anyhow::Result<u16> {
    Ok(std_listener()?.1)
}

/// The name of the InMemoryChannel Knative's MT broker creates for Broker `default`.
const IMC: &str = "default-kne-trigger";

/// The Broker's InMemoryChannel as the Subscription reconciler leaves it: one subscriber per
/// Trigger, the filter's `/triggers/<ns>/<name>/<uid>` on `filter_port`, each reply to
/// `reply_url` (the ingress); with `async_channel`, the annotation that makes the IMC answer
/// 202 before its fan-out.
fn imc_yaml(filter_port: u16, reply_url: &str, async_channel: bool) -> String {
    let mut yaml = format!(
        "apiVersion: messaging.knative.dev/v1\nkind: InMemoryChannel\nmetadata:\n  name: {IMC}\n  namespace: bench\n  uid: uid-channel\n{}spec:\n  subscribers:\n",
        if async_channel {
            "  annotations:\n    messaging.knative.dev/async-handler: \"true\"\n"
        } else {
            ""
        }
    );
    for t in ["t1", "t2", "t3"] {
        yaml.push_str(&format!(
            "    - uid: sub-{t}\n      subscriberUri: http://127.0.0.1:{filter_port}/triggers/bench/{t}/uid-{t}\n      replyUri: {reply_url}\n"
        ));
    }
    yaml
}

/// Starts `knative-broker-oracle` on the manifest `yaml` (written into `dir`) with the
/// servers `ports` (`--ingress-port` etc.; the others off) and `extra` flags, and waits
/// until every port listens. Started from this thread, it inherits the component's core (Go
/// then runs one P).
async fn start_oracle(
    dir: &std::path::Path,
    yaml: &str,
    ports: &[(&str, u16)],
    extra: &[&str],
) -> anyhow::Result<KillOnDrop> {
    let bin = knative_oracle_bin();
    if !bin.exists() {
        anyhow::bail!(
            "chain-knative and chain-swap need Knative's broker oracle at {}: run scripts/setup.sh",
            bin.display()
        );
    }
    std::fs::create_dir_all(dir)?;
    std::fs::write(dir.join("chain.yaml"), yaml)?;
    let log = std::fs::File::create(dir.join("oracle.log"))?;
    let mut cmd = std::process::Command::new(&bin);
    cmd.arg("--manifests").arg(dir);
    // Every server off unless given (the ingress would default to INGRESS_PORT or 8080).
    for flag in ["--ingress-port", "--filter-port", "--channel-port"] {
        let port = ports.iter().find(|(f, _)| *f == flag).map_or(0, |p| p.1);
        cmd.args([flag, &port.to_string()]);
    }
    let child = cmd
        .args(extra)
        .args(["--log-level", "error"])
        .stdout(std::process::Stdio::null())
        .stderr(log)
        .spawn()
        .with_context(|| format!("starting {}", bin.display()))?;
    let mut child = KillOnDrop(child);
    let deadline = Instant::now() + Duration::from_secs(30);
    for &(_, port) in ports {
        while tokio::net::TcpStream::connect(("127.0.0.1", port))
            .await
            .is_err()
        {
            if let Some(status) = child.0.try_wait()? {
                anyhow::bail!(
                    "knative-broker-oracle exited with {status}: {}",
                    std::fs::read_to_string(dir.join("oracle.log")).unwrap_or_default()
                );
            }
            if Instant::now() > deadline {
                anyhow::bail!("knative-broker-oracle did not listen on port {port} within 30 s");
            }
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
    }
    Ok(child)
}

/// The stock topology on Knative's own code: `knative-broker-oracle` runs the mt-broker-ingress
/// and mt-broker-filter handlers and the in-memory channel's fan-out of knative.dev/eventing
/// v0.49.2 (imported, fed from manifests with the status blocks Knative's controllers would
/// write) in one Go process on the component's core. Its ingress stamps each event with
/// [`INGRESS_STAMP`]. Returns the ingress URL and the process.
async fn knative_topology(
    dir: &std::path::Path,
    subs: [u16; 3],
    async_channel: bool,
) -> anyhow::Result<(String, KillOnDrop)> {
    let (ing, fil, ch) = (unused_port()?, unused_port()?, unused_port()?);
    let ingress_url = format!("http://127.0.0.1:{ing}/bench/default");
    let mut yaml = format!(
        "apiVersion: eventing.knative.dev/v1\nkind: Broker\nmetadata:\n  name: default\n  namespace: bench\n  annotations:\n    eventing.knative.dev/broker.class: MTChannelBasedBroker\nstatus:\n  address:\n    url: {ingress_url}\n  annotations:\n    knative.dev/channelAddress: http://127.0.0.1:{ch}/bench/{IMC}\n---\n{}",
        imc_yaml(fil, &ingress_url, async_channel)
    );
    yaml.push_str(&format!("---\n{}", resolved_chain_triggers(subs)));
    let child = start_oracle(
        dir,
        &yaml,
        &[
            ("--ingress-port", ing),
            ("--filter-port", fil),
            ("--channel-port", ch),
        ],
        &["--stamp-ingress-extension", INGRESS_STAMP],
    )
    .await?;
    Ok((ingress_url, child))
}

/// An IMC-like channel: delivers to every subscription at once and posts replies back to
/// `reply_to`; answers 202 when all are done (or at once when `asynchronous`, then delivers);
/// returns its port.
async fn channel(subs: Vec<String>, reply_to: String, asynchronous: bool) -> anyhow::Result<u16> {
    let c = client();
    serve_fn(move |req: Request<Incoming>| {
        let (c, subs, reply_to) = (c.clone(), subs.clone(), reply_to.clone());
        async move {
            let (parts, body) = req.into_parts();
            let body = body
                .collect()
                .await
                .map(|b| b.to_bytes())
                .unwrap_or_default();
            let hv = |k: &str| parts.headers.get(k).and_then(|v| v.to_str().ok());
            mark_sent(
                "channel.received",
                hv("ce-type").unwrap_or("?"),
                hv("ce-benchsent"),
            );
            // Like the IMC dispatcher's fan-out: every subscription at once.
            let mut fanout = tokio::task::JoinSet::new();
            for sub in subs {
                let (c, reply_to, headers, body) = (
                    c.clone(),
                    reply_to.clone(),
                    parts.headers.clone(),
                    body.clone(),
                );
                fanout.spawn(async move {
                    let mut rb = Request::post(&sub);
                    if let Some(h) = rb.headers_mut() {
                        *h = headers;
                    }
                    let Ok(req) = rb.body(Full::new(body)) else {
                        return false;
                    };
                    let Ok(resp) = c.request(req).await else {
                        return false;
                    };
                    let (rp, rbody) = resp.into_parts();
                    let rbody = rbody
                        .collect()
                        .await
                        .map(|b| b.to_bytes())
                        .unwrap_or_default();
                    if rp.status.is_success() && rp.headers.contains_key("ce-specversion") {
                        let mut rb = Request::post(&reply_to);
                        if let Some(h) = rb.headers_mut() {
                            *h = rp.headers.clone();
                        }
                        let Ok(req) = rb.body(Full::new(rbody)) else {
                            return false;
                        };
                        return c.request(req).await.is_ok_and(|r| r.status().is_success());
                    }
                    rp.status.is_success()
                });
            }
            if asynchronous {
                fanout.detach_all();
                return resp(StatusCode::ACCEPTED);
            }
            // Knative's default: the answer waits for every subscription (and its reply);
            // any failure is a 500, which makes the sender retry.
            let mut ok = true;
            while let Some(done) = fanout.join_next().await {
                ok &= done.unwrap_or(false);
            }
            if ok {
                resp(StatusCode::ACCEPTED)
            } else {
                resp(StatusCode::INTERNAL_SERVER_ERROR)
            }
        }
    })
    .await
}

/// Closed-loop load against `url`, generated on the load runtime `on`; returns the row
/// measured at `stats` (from the sender's timestamp) and, when the path has a probed ingress,
/// the same paced events measured from the ingress's receipt.
async fn load(
    on: &tokio::runtime::Handle,
    name: &str,
    url: &str,
    first_type: &str,
    stats: Arc<Stats>,
    args: &BrokerBenchArgs,
) -> Vec<Row> {
    let (name, url, ty, args) = (
        name.to_string(),
        url.to_string(),
        first_type.to_string(),
        args.clone(),
    );
    on.spawn(async move { generate(&name, &url, &ty, stats, &args).await })
        .await
        .unwrap_or_default()
}

async fn generate(
    name: &str,
    url: &str,
    first_type: &str,
    stats: Arc<Stats>,
    args: &BrokerBenchArgs,
) -> Vec<Row> {
    let stop = Arc::new(AtomicBool::new(false));
    let seq = Arc::new(AtomicU64::new(0));
    let errors = Arc::new(AtomicU64::new(0));
    let accepted = Arc::new(AtomicU64::new(0));
    let seen_before = stats.seen.load(Ordering::Relaxed);
    let mut senders = Vec::new();
    for _ in 0..args.concurrency.max(1) {
        let (stop, seq, errors, accepted) =
            (stop.clone(), seq.clone(), errors.clone(), accepted.clone());
        let (url, ty, c) = (url.to_string(), first_type.to_string(), client());
        senders.push(tokio::spawn(async move {
            while !stop.load(Ordering::Relaxed) {
                let n = seq.fetch_add(1, Ordering::Relaxed);
                if send_one(&c, &url, &format!("b{n}"), &ty).await == Some(StatusCode::ACCEPTED) {
                    accepted.fetch_add(1, Ordering::Relaxed);
                } else {
                    errors.fetch_add(1, Ordering::Relaxed);
                    tokio::time::sleep(Duration::from_millis(1)).await;
                }
            }
        }));
    }
    tokio::time::sleep(WARMUP).await;
    stats.recording.store(true, Ordering::Relaxed);
    let t0 = Instant::now();
    tokio::time::sleep(Duration::from_secs_f64(args.seconds.max(0.1))).await;
    stats.recording.store(false, Ordering::Relaxed);
    let elapsed = t0.elapsed().as_secs_f64();
    stop.store(true, Ordering::Relaxed);
    for s in senders {
        let _ = s.await;
    }
    let count = stats.count.load(Ordering::Relaxed);
    let mut row = Row::named(name);
    row.connections = Some(args.concurrency);
    row.rps = Some(count as f64 / elapsed);
    // Let the backlog of the throughput phase drain (every accepted event reached the last
    // step, or nothing moved for 2 s), then measure latency paced.
    let drained = Instant::now();
    let (mut last, mut still) = (u64::MAX, Instant::now());
    while drained.elapsed() < Duration::from_secs(60) {
        tokio::time::sleep(Duration::from_millis(100)).await;
        let seen = stats.seen.load(Ordering::Relaxed) - seen_before;
        if seen >= accepted.load(Ordering::Relaxed) {
            break;
        }
        if seen != last {
            (last, still) = (seen, Instant::now());
        } else if still.elapsed() > Duration::from_secs(2) {
            eprintln!(
                "{name}: {} accepted events had not reached the last step after the throughput phase",
                accepted.load(Ordering::Relaxed) - seen
            );
            break;
        }
    }
    stats.reset();
    if let Ok(mut m) = ingress_times().lock() {
        m.clear();
    }
    stats.recording.store(true, Ordering::Relaxed);
    let c = client();
    // Time to the ingress's 202 of the same paced events (the stock ingress answers once the
    // channel has; under contention its 202 can come after the chain finished).
    let acks = Stats::new();
    acks.recording.store(true, Ordering::Relaxed);
    let period = Duration::from_secs_f64(1.0 / args.latency_rate.max(1.0));
    let mut tick = tokio::time::interval(period);
    tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Skip);
    let paced_end = Instant::now() + Duration::from_secs_f64(args.latency_seconds.max(0.1));
    let mut n = 0u64;
    if let Ok(mut h) = stages().hists.lock() {
        h.clear();
    }
    stages().on.store(true, Ordering::Relaxed);
    while Instant::now() < paced_end {
        tick.tick().await;
        n += 1;
        let (c, url, ty, acks) = (
            c.clone(),
            url.to_string(),
            first_type.to_string(),
            acks.clone(),
        );
        tokio::spawn(async move {
            let sent = now_ns().to_string();
            if send_one(&c, &url, &format!("p{n}"), &ty).await == Some(StatusCode::ACCEPTED) {
                mark_sent("ingress 202 at sender", &ty, Some(&sent));
                acks.record_sent(Some(&sent), None);
            }
        });
    }
    tokio::time::sleep(Duration::from_millis(500)).await;
    stats.recording.store(false, Ordering::Relaxed);
    stages().on.store(false, Ordering::Relaxed);
    if args.stages {
        print_stages(name);
    }
    if let Ok(h) = stats.hist.lock()
        && !h.is_empty()
    {
        row.p50_us = Some(h.value_at_quantile(0.5) as f64);
        row.p99_us = Some(h.value_at_quantile(0.99) as f64);
        if h.len() + h.len() / 20 < n {
            eprintln!("{name}: only {} of {n} paced events measured", h.len());
        }
    }
    if let Ok(h) = acks.hist.lock()
        && !h.is_empty()
    {
        println!(
            "{name}: paced send -> ingress 202 p50 {} us, last step p50 {} us",
            h.value_at_quantile(0.5),
            row.p50_us.unwrap_or(0.0)
        );
    }
    if let Some(rps) = row.rps
        && args.latency_rate > rps / 4.0
    {
        eprintln!(
            "{name}: the paced rate {} /s is above a quarter of this path's throughput ({rps:.0} /s): its latency includes queueing",
            args.latency_rate
        );
    }
    let errs = errors.load(Ordering::Relaxed);
    if errs > 0 {
        eprintln!("{name}: {errs} sends not accepted");
    }
    let mut rows = vec![row];
    if let Ok(h) = stats.from_ingress.lock()
        && !h.is_empty()
    {
        let mut r = Row::named(format!("{name} {FROM_INGRESS}"));
        r.p50_us = Some(h.value_at_quantile(0.5) as f64);
        r.p99_us = Some(h.value_at_quantile(0.99) as f64);
        rows.push(r);
    }
    rows
}

/// Suffix of the rows measured from the ingress's receipt instead of the sender.
const FROM_INGRESS: &str = "[from ingress]";

async fn send_one(
    c: &Client<HttpConnector, Full<Bytes>>,
    url: &str,
    id: &str,
    ty: &str,
) -> Option<StatusCode> {
    let mut ev = CloudEvent::new(id, "/bench/load", ty);
    ev.set("benchsent", now_ns().to_string());
    ev.set("datacontenttype", "application/json");
    ev.data = Some(Bytes::from_static(b"{\"reading\":21.5,\"unit\":\"C\"}"));
    let mut rb = Request::post(url);
    if let Some(h) = rb.headers_mut() {
        *h = ev.binary_headers();
    }
    let req = rb
        .body(Full::new(ev.data.clone().unwrap_or_default()))
        .ok()?;
    c.request(req).await.ok().map(|r| r.status())
}

/// Runs `spright-bench broker`.
pub fn run(args: BrokerBenchArgs) -> anyhow::Result<()> {
    let allowed = nix::sched::sched_getaffinity(nix::unistd::Pid::from_raw(0))?;
    for cpu in [args.component_cpu, args.load_cpu] {
        if !allowed.is_set(cpu).unwrap_or(false) {
            anyhow::bail!(
                "CPU {cpu} is not in this process's cpuset: choose others with --component-cpu and --load-cpu"
            );
        }
    }
    // Placement (see the module doc): this thread, and so every thread it starts (the
    // dataplane's reply and timeout threads, the functions), on the component's core.
    pin_self(args.component_cpu)
        .with_context(|| format!("pinning the component to CPU {}", args.component_cpu))?;
    let component = runtime_on(args.component_cpu)?;
    let load = runtime_on(args.load_cpu)?;
    println!(
        "placement: component under test on CPU {} ({}), load generator on CPU {} (one runtime worker)",
        args.component_cpu,
        if args.component_threads {
            "--component-threads: a thread per component: broker-shm (ingress, plus its dataplane reply thread), each function, each HTTP subscriber; stock and swap: drop-in ingress, channel (swap: the oracle process), drop-in filter"
        } else {
            "every component on one runtime worker; the functions and the dataplane's reply thread on threads of their own"
        },
        args.load_cpu
    );
    if args.component_cpu == args.load_cpu {
        eprintln!(
            "warning: the component and the load generator share CPU {}",
            args.load_cpu
        );
    }
    SHARED_RUNTIME.store(!args.component_threads, Ordering::Relaxed);
    let result = component.block_on(run_async(args, load.handle().clone()));
    drop(load);
    result
}

/// A one-worker runtime whose threads (worker and blocking pool) all run on `cpu`: the
/// worker count a runtime picks by itself in a one-core cpuset.
fn runtime_on(cpu: usize) -> anyhow::Result<tokio::runtime::Runtime> {
    Ok(tokio::runtime::Builder::new_multi_thread()
        .worker_threads(1)
        .on_thread_start(move || {
            if let Err(e) = pin_self(cpu) {
                eprintln!("cannot pin a runtime thread to CPU {cpu}: {e}");
            }
        })
        .enable_all()
        .build()?)
}

async fn run_async(args: BrokerBenchArgs, on: tokio::runtime::Handle) -> anyhow::Result<()> {
    start();
    broker_shm::probe::install(mark);
    stages().detail.store(args.stages, Ordering::Relaxed);
    let tmp = std::env::temp_dir().join(format!("spright-bench-broker-{}", std::process::id()));
    std::fs::create_dir_all(&tmp)?;
    let durability: Durability = args.durability.parse().map_err(anyhow::Error::msg)?;
    let want = |p: &str| args.paths.iter().any(|x| x == p);
    let mut rows = Vec::new();

    // One dataplane for the shared-memory paths.
    let stats_fn = Stats::new();
    let stats_chain_shm = Stats::new();
    let dp = if want("shm") || want("chain-shm") {
        let dp = ShmDataplane::start(ShmConfig {
            run_dir: tmp.join("run"),
            functions: ["fb", "f1", "f2", "f3"].map(String::from).to_vec(),
            transport: args.transport.parse().map_err(anyhow::Error::msg)?,
            pool: spright_core::pool::PoolConfig {
                slot_size: 64 * 1024,
                slot_count: 4096,
            },
        })?;
        let control = dp.control_path();
        shm_function(control.clone(), "fb", None, stats_fn.clone());
        shm_function(
            control.clone(),
            "f1",
            Some("chain.s2"),
            stats_chain_shm.clone(),
        );
        shm_function(
            control.clone(),
            "f2",
            Some("chain.s3"),
            stats_chain_shm.clone(),
        );
        shm_function(control, "f3", None, stats_chain_shm.clone());
        tokio::time::sleep(Duration::from_millis(300)).await;
        Some(dp)
    } else {
        None
    };
    let shm_sinks = || Sinks {
        shm: dp.clone().map(|d| d as Arc<dyn broker_shm::delivery::Sink>),
        ..Sinks::default()
    };

    if want("post") {
        // The floor of every path: one POST to a server that answers 202 at once.
        let stats = Stats::new();
        let st = stats.clone();
        let port = own_thread("post", move || {
            serve_fn(move |req: Request<Incoming>| {
                let st = st.clone();
                async move {
                    let sent = req
                        .headers()
                        .get("ce-benchsent")
                        .and_then(|v| v.to_str().ok());
                    st.record_sent(sent, None);
                    resp(StatusCode::ACCEPTED)
                }
            })
        })
        .await?;
        let url = format!("http://127.0.0.1:{port}/bench/default");
        rows.extend(
            load(
                &on,
                "bare HTTP POST (202 at once)",
                &url,
                "bench.in",
                stats,
                &args,
            )
            .await,
        );
    }
    if want("http") {
        let stats = Stats::new();
        let port = subscriber(None, &stats).await?;
        let yaml = format!("{BROKER}---\n{}", trigger("t", "bench.in", &uri(port)));
        let (url, _rt) = broker_shm(&yaml, &tmp.join("http"), durability, Sinks::default()).await?;
        rows.extend(
            load(
                &on,
                "broker-shm -> HTTP subscriber",
                &url,
                "bench.in",
                stats,
                &args,
            )
            .await,
        );
    }
    if want("shm") {
        let yaml = format!(
            "{BROKER}---\n{}",
            trigger("t", "bench.in", &function_ref("fb"))
        );
        let (url, _rt) = broker_shm(&yaml, &tmp.join("shm"), durability, shm_sinks()).await?;
        rows.extend(
            load(
                &on,
                "broker-shm -> shm function",
                &url,
                "bench.in",
                stats_fn.clone(),
                &args,
            )
            .await,
        );
    }
    if want("chain-shm") {
        let yaml = format!(
            "{BROKER}---\n{}---\n{}---\n{}",
            trigger("t1", "chain.s1", &function_ref("f1")),
            trigger("t2", "chain.s2", &function_ref("f2")),
            trigger("t3", "chain.s3", &function_ref("f3")),
        );
        let (url, _rt) = broker_shm(&yaml, &tmp.join("chain-shm"), durability, shm_sinks()).await?;
        rows.extend(
            load(
                &on,
                "3-step chain, broker-shm + shm",
                &url,
                "chain.s1",
                stats_chain_shm.clone(),
                &args,
            )
            .await,
        );
    }
    if want("chain-http") {
        let stats = Stats::new();
        let [p1, p2, p3] = chain_subscribers(&stats).await?;
        let yaml = format!(
            "{BROKER}---\n{}---\n{}---\n{}",
            trigger("t1", "chain.s1", &uri(p1)),
            trigger("t2", "chain.s2", &uri(p2)),
            trigger("t3", "chain.s3", &uri(p3)),
        );
        let (url, _rt) =
            broker_shm(&yaml, &tmp.join("chain-http"), durability, Sinks::default()).await?;
        rows.extend(
            load(
                &on,
                "3-step chain, broker-shm + HTTP",
                &url,
                "chain.s1",
                stats,
                &args,
            )
            .await,
        );
    }
    if want("chain-stock") {
        let stats = Stats::new();
        let triggers = resolved_chain_triggers(chain_subscribers(&stats).await?);
        let url = stock_topology(&triggers, args.async_channel).await?;
        rows.extend(
            load(
                &on,
                "3-step chain, stock topology",
                &url,
                "chain.s1",
                stats,
                &args,
            )
            .await,
        );
    }

    if want("chain-knative") {
        let stats = Stats::new();
        let subs = chain_subscribers(&stats).await?;
        let (url, _oracle) =
            knative_topology(&tmp.join("chain-knative"), subs, args.async_channel).await?;
        rows.extend(
            load(
                &on,
                "3-step chain, Knative's own broker (Go)",
                &url,
                "chain.s1",
                stats,
                &args,
            )
            .await,
        );
    }

    if want("chain-swap") {
        let stats = Stats::new();
        let triggers = resolved_chain_triggers(chain_subscribers(&stats).await?);
        let (url, _oracle) =
            swap_topology(&tmp.join("chain-swap"), &triggers, args.async_channel).await?;
        rows.extend(
            load(
                &on,
                "3-step chain, drop-in swap (Knative's IMC)",
                &url,
                "chain.s1",
                stats,
                &args,
            )
            .await,
        );
    }

    print!("{}", table(&rows));
    let find = |n: &str| {
        rows.iter()
            .find(|r| r.name.starts_with(n) && !r.name.ends_with(FROM_INGRESS))
    };
    let from_ingress = |n: &str| {
        rows.iter()
            .find(|r| r.name.starts_with(n) && r.name.ends_with(FROM_INGRESS))
            .and_then(|r| r.p50_us)
    };
    // The baselines the shared-memory chain is compared with: row prefix, label, and whether
    // their p50 latency is compared too.
    let baselines = [
        (
            "3-step chain, stock",
            "stock topology (the bench's Rust channel)",
            true,
        ),
        (
            "3-step chain, Knative's own broker",
            "Knative's own broker",
            true,
        ),
        (
            "3-step chain, drop-in swap",
            "drop-in swap (Knative's IMC)",
            true,
        ),
        ("3-step chain, broker-shm + HTTP", "HTTP subscribers", false),
    ];
    let shm_from_ingress = from_ingress("3-step chain, broker-shm + shm");
    for (prefix, label, _) in baselines.iter().filter(|b| b.2) {
        if let (Some(a), Some(b)) = (shm_from_ingress, from_ingress(prefix)) {
            println!(
                "chain p50 latency from the ingress's receipt, shm / {label}: {:.3}",
                a / b.max(1e-9)
            );
        }
    }
    // The shared-memory chain against each baseline that ran: events/s and p50 (from the sender).
    let shm = find("3-step chain, broker-shm + shm");
    for (prefix, label, latency) in baselines {
        let (Some(shm), Some(base)) = (shm, find(prefix)) else {
            continue;
        };
        if let (Some(a), Some(b)) = (shm.rps, base.rps) {
            println!("chain events/s, shm vs {label}: {:.1}x", a / b.max(1e-9));
        }
        if latency && let (Some(a), Some(b)) = (shm.p50_us, base.p50_us) {
            println!("chain p50 latency, shm / {label}: {:.3}", a / b.max(1e-9));
        }
    }
    if let Some(p) = &args.json {
        write_json(p, &rows)?;
    }
    let _ = std::fs::remove_dir_all(&tmp);
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn replies_carry_the_send_time_and_the_first_ingress_stamp() {
        let mut ev = CloudEvent::new("e1", "/src", "chain.s1");
        ev.set("benchsent", "10");
        ev.set(INGRESS_STAMP, "20");
        let r = reply_event(&ev, "chain.s2");
        assert_eq!(r.get("type"), Some("chain.s2"));
        assert_eq!(r.get("benchsent"), Some("10"));
        assert_eq!(r.get(INGRESS_STAMP), Some("20"));
        let plain = reply_event(&CloudEvent::new("e2", "/src", "chain.s1"), "chain.s2");
        assert_eq!(plain.get(INGRESS_STAMP), None);
    }

    #[test]
    fn an_ingress_stamp_is_read_on_the_wall_clock() {
        let stats = Stats::new();
        stats.recording.store(true, Ordering::Relaxed);
        let mut ev = CloudEvent::new("e1", "/src", "chain.s3");
        ev.set("benchsent", now_ns().to_string());
        // Stamped a second ago on the wall clock: the row reads about a second, whatever the
        // bench's monotonic clock says.
        ev.set(INGRESS_STAMP, (wall_ns() - 1_000_000_000).to_string());
        stats.record(&ev);
        let h = stats.from_ingress.lock().map(|h| h.max()).unwrap_or(0);
        assert!(
            (1_000_000..60_000_000).contains(&h),
            "{h} us is not about a second"
        );
        // A stamp that is not a number is not a sample.
        let mut bad = ev.clone();
        bad.set(INGRESS_STAMP, "soon");
        stats.record(&bad);
        assert_eq!(stats.from_ingress.lock().map(|h| h.len()).unwrap_or(0), 1);
    }

    #[test]
    fn the_channel_manifest_names_every_trigger_and_the_reply_address() {
        let sync = imc_yaml(4000, "http://127.0.0.1:5000/bench/default", false);
        for t in ["t1", "t2", "t3"] {
            assert!(sync.contains(&format!(
                "subscriberUri: http://127.0.0.1:4000/triggers/bench/{t}/uid-{t}\n      replyUri: http://127.0.0.1:5000/bench/default\n"
            )));
        }
        assert!(!sync.contains("async-handler"));
        assert!(
            imc_yaml(4000, "http://x/", true)
                .contains("messaging.knative.dev/async-handler: \"true\"")
        );
    }
}
