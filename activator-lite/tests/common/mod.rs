//! Harness for black-box tests: the activator-lite binary, test pods that answer
//! queue-proxy probes, a websocket autoscaler stand-in that decodes the protobuf frames,
//! and a manifest directory.
#![allow(dead_code)]

use std::collections::HashMap;
use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::sync::atomic::{AtomicBool, AtomicU64, AtomicUsize, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use activator_lite::proto::WireStatMessages;
use bytes::Bytes;
use futures::{SinkExt, StreamExt};
use http_body_util::combinators::BoxBody;
use http_body_util::{BodyExt, Full, StreamBody};
use hyper::body::{Frame, Incoming};
use hyper::{Request, Response, StatusCode};
use hyper_util::client::legacy::Client;
use hyper_util::client::legacy::connect::HttpConnector;
use hyper_util::rt::{TokioExecutor, TokioIo};
use prost::Message as _;
use tokio::net::TcpListener;
use tokio::sync::{Notify, mpsc};
use tokio::task::{JoinHandle, JoinSet};
use tokio_tungstenite::tungstenite::Message;

pub const BIN: &str = env!("CARGO_BIN_EXE_activator-lite");
pub const POD_NAME: &str = "activator-test-pod";
pub const NS: &str = "default";
/// An HTML page, served without Content-Type by the test pods.
pub const HTML_PAGE: &str = "<!DOCTYPE html>\n<html><body><p>hello</p></body></html>\n";

/// A free loopback port (bound then released).
pub use spright_test_support::free_port;

/// A temporary manifest directory, removed on drop.
pub struct Manifests {
    pub dir: PathBuf,
}

static SEQ: AtomicU64 = AtomicU64::new(0);

impl Manifests {
    pub fn new() -> Self {
        let dir = std::env::temp_dir().join(format!(
            "activator-lite-test-{}-{}",
            std::process::id(),
            SEQ.fetch_add(1, Ordering::Relaxed)
        ));
        std::fs::create_dir_all(&dir).expect("temp dir");
        Self { dir }
    }

    /// Writes `name` atomically (temp file + rename, as kubectl-like tools do).
    pub fn write(&self, name: &str, text: &str) {
        let tmp = self.dir.join(format!(".{name}.tmp"));
        std::fs::write(&tmp, text).expect("write manifest");
        std::fs::rename(&tmp, self.dir.join(name)).expect("rename manifest");
    }

    pub fn remove(&self, name: &str) {
        let _ = std::fs::remove_file(self.dir.join(name));
    }

    pub fn revision(&self, name: &str, cc: u32, extra_spec: &str) {
        self.write(
            &format!("rev-{name}.yaml"),
            &revision_yaml(name, cc, extra_spec),
        );
    }

    pub fn endpoints(&self, rev: &str, ready: &[SocketAddr], not_ready: &[SocketAddr]) {
        self.write(
            &format!("ep-{rev}.yaml"),
            &endpoints_yaml(rev, ready, not_ready),
        );
    }
}

impl Drop for Manifests {
    fn drop(&mut self) {
        let _ = std::fs::remove_dir_all(&self.dir);
    }
}

pub fn revision_yaml(name: &str, cc: u32, extra_spec: &str) -> String {
    format!(
        "apiVersion: serving.knative.dev/v1\nkind: Revision\nmetadata:\n  name: {name}\n  namespace: {NS}\n  labels:\n    serving.knative.dev/service: svc\n    serving.knative.dev/configuration: svc\nspec:\n  containerConcurrency: {cc}\n{extra_spec}  containers:\n  - image: example\n    ports:\n    - containerPort: 8080\n"
    )
}

/// Private Endpoints in Knative's shape: one subset per pod (each test pod has its own port).
pub fn endpoints_yaml(rev: &str, ready: &[SocketAddr], not_ready: &[SocketAddr]) -> String {
    endpoints_yaml_port(rev, ready, not_ready, "http")
}

/// As [`endpoints_yaml`] with the serving port named `port_name` (`http2` for h2c revisions).
pub fn endpoints_yaml_port(
    rev: &str,
    ready: &[SocketAddr],
    not_ready: &[SocketAddr],
    port_name: &str,
) -> String {
    let mut s = format!(
        "apiVersion: v1\nkind: Endpoints\nmetadata:\n  name: {rev}-private\n  namespace: {NS}\n  labels:\n    serving.knative.dev/revision: {rev}\n    serving.knative.dev/revisionUID: 6c0e4f0a-uid\n    networking.internal.knative.dev/serviceType: Private\n"
    );
    s.push_str(if ready.is_empty() && not_ready.is_empty() {
        "subsets: []\n"
    } else {
        "subsets:\n"
    });
    for (addr, is_ready) in ready
        .iter()
        .map(|a| (a, true))
        .chain(not_ready.iter().map(|a| (a, false)))
    {
        let key = if is_ready {
            "addresses"
        } else {
            "notReadyAddresses"
        };
        s.push_str(&format!(
            "- {key}:\n  - ip: {}\n  ports:\n  - name: {port_name}\n    port: {}\n    protocol: TCP\n  - name: http-queueadm\n    port: 8022\n",
            addr.ip(),
            addr.port()
        ));
    }
    s
}

/// The environment the stock `activator` Deployment sets (contract B.1).
pub const STOCK_ENV: [(&str, &str); 6] = [
    ("POD_NAME", POD_NAME),
    ("POD_IP", "127.0.0.1"),
    ("SYSTEM_NAMESPACE", "knative-serving"),
    ("CONFIG_LOGGING_NAME", "config-logging"),
    ("CONFIG_OBSERVABILITY_NAME", "config-observability"),
    ("GOGC", "500"),
];

/// The activator-lite process, killed on drop.
pub struct Activator {
    pub child: Child,
    pub port: u16,
    pub h2c_port: u16,
    pub metrics_port: u16,
    pub profiling_port: u16,
}

impl Drop for Activator {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

impl Activator {
    pub fn spawn(manifests: &Path, autoscaler_port: u16, extra: &[&str]) -> Self {
        let port = free_port();
        let h2c_port = free_port();
        let metrics_port = free_port();
        let profiling_port = free_port();
        let child = Command::new(BIN)
            .env_clear()
            .envs(STOCK_ENV)
            // As for the oracle: the cluster domain whatever the host's resolv.conf says.
            .env("CLUSTER_DOMAIN", "cluster.local")
            .env("RUST_LOG", "warn")
            .arg("--manifests")
            .arg(manifests)
            .args([
                "--autoscaler",
                &format!("ws://127.0.0.1:{autoscaler_port}/"),
            ])
            .args(["--bind", "127.0.0.1"])
            .args(["--http1-port", &port.to_string()])
            .args(["--h2c-port", &h2c_port.to_string()])
            .args(["--metrics-port", &metrics_port.to_string()])
            .args(["--profiling-port", &profiling_port.to_string()])
            .args(if extra.contains(&"--drain-timeout-secs") {
                &[][..]
            } else {
                &["--drain-timeout-secs", "0.5"][..]
            })
            .args(extra)
            .stdin(Stdio::null())
            .spawn()
            .expect("spawn activator-lite");
        Self {
            child,
            port,
            h2c_port,
            metrics_port,
            profiling_port,
        }
    }

    pub fn sigterm(&self) {
        let _ = Command::new("kill")
            .args(["-TERM", &self.child.id().to_string()])
            .status();
    }

    /// Kubelet-style health status.
    pub async fn health(&self) -> Option<StatusCode> {
        kubelet_health(self.port).await
    }

    /// Waits until the health check answers `want` (10 s at most).
    pub async fn wait_health(&self, want: StatusCode) {
        let deadline = Instant::now() + Duration::from_secs(10);
        loop {
            if self.health().await == Some(want) {
                return;
            }
            assert!(Instant::now() < deadline, "health never became {want}");
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
    }

    pub async fn metrics(&self) -> String {
        let req = Request::get(format!("http://127.0.0.1:{}/metrics", self.metrics_port))
            .body(Full::new(Bytes::new()))
            .expect("request");
        let r = client().request(req).await.expect("metrics");
        let b = r.into_body().collect().await.expect("body").to_bytes();
        String::from_utf8_lossy(&b).into_owned()
    }

    /// A request for revision `rev` through the activator.
    pub async fn get(&self, rev: &str, path: &str, headers: &[(&str, &str)]) -> Reply {
        get(self.port, rev, path, headers).await
    }
}

/// The status a kubelet probe (`User-Agent: kube-probe/...`) gets from the activator on
/// `port`; None when it does not answer within 2 s.
pub async fn kubelet_health(port: u16) -> Option<StatusCode> {
    let req = Request::get(format!("http://127.0.0.1:{port}/"))
        .header("user-agent", "kube-probe/1.31")
        .body(Full::new(Bytes::new()))
        .ok()?;
    let r = tokio::time::timeout(Duration::from_secs(2), client().request(req)).await;
    r.ok()?.ok().map(|r| r.status())
}

/// A request for revision `rev` through the activator on `port`.
pub async fn get(port: u16, rev: &str, path: &str, headers: &[(&str, &str)]) -> Reply {
    let mut b = Request::get(format!("http://127.0.0.1:{port}{path}"))
        .header("host", format!("{rev}.{NS}.example.com"))
        .header("knative-serving-namespace", NS)
        .header("knative-serving-revision", rev);
    for (k, v) in headers {
        b = b.header(*k, *v);
    }
    send(b.body(Full::new(Bytes::new())).expect("request")).await
}

#[derive(Debug)]
pub struct Reply {
    pub status: StatusCode,
    pub headers: http::HeaderMap,
    pub body: String,
}

pub fn client() -> Client<HttpConnector, Full<Bytes>> {
    Client::builder(TokioExecutor::new()).build_http()
}

pub async fn send(req: Request<Full<Bytes>>) -> Reply {
    let r = client().request(req).await.expect("request to activator");
    let status = r.status();
    let headers = r.headers().clone();
    let body = r.into_body().collect().await.expect("body").to_bytes();
    Reply {
        status,
        headers,
        body: String::from_utf8_lossy(&body).into_owned(),
    }
}

/// What a test pod saw of one request.
#[derive(Debug, Clone)]
pub struct Seen {
    pub path: String,
    pub headers: http::HeaderMap,
    pub version: http::Version,
}

#[derive(Default)]
pub struct PodState {
    pub name: String,
    pub healthy: AtomicBool,
    pub probes: AtomicUsize,
    pub seen: Mutex<Vec<Seen>>,
    pub in_flight: AtomicUsize,
    pub max_in_flight: AtomicUsize,
    pub release: Notify,
}

/// A test pod: answers `K-Network-Probe: queue` like a queue-proxy would (200 `queue`
/// while healthy, 503 otherwise) and serves a few behaviours by path.
pub struct Pod {
    pub addr: SocketAddr,
    pub state: Arc<PodState>,
    task: JoinHandle<()>,
}

impl Drop for Pod {
    fn drop(&mut self) {
        self.task.abort();
    }
}

type PodBody = BoxBody<Bytes, std::io::Error>;

fn full(s: impl Into<Bytes>) -> PodBody {
    Full::new(s.into()).map_err(|e| match e {}).boxed()
}

async fn pod_handle(st: Arc<PodState>, mut req: Request<Incoming>) -> Response<PodBody> {
    let probe = req
        .headers()
        .get("k-network-probe")
        .and_then(|v| v.to_str().ok())
        .unwrap_or("")
        .to_owned();
    if probe == "queue" {
        st.probes.fetch_add(1, Ordering::SeqCst);
        let ua_ok = req
            .headers()
            .get("user-agent")
            .is_some_and(|v| v == "Knative-Activator-Probe");
        return if st.healthy.load(Ordering::SeqCst) && ua_ok {
            Response::new(full("queue"))
        } else {
            let mut r = Response::new(full("not ready"));
            *r.status_mut() = StatusCode::SERVICE_UNAVAILABLE;
            r
        };
    }
    let path = req.uri().path().to_owned();
    st.seen.lock().expect("lock").push(Seen {
        path: path.clone(),
        headers: req.headers().clone(),
        version: req.version(),
    });
    let now = st.in_flight.fetch_add(1, Ordering::SeqCst) + 1;
    st.max_in_flight.fetch_max(now, Ordering::SeqCst);
    let resp = if let Some(ms) = path.strip_prefix("/sleep/") {
        let ms: u64 = ms.parse().unwrap_or(0);
        tokio::time::sleep(Duration::from_millis(ms)).await;
        Response::new(full(st.name.clone()))
    } else if path == "/hold" {
        st.release.notified().await;
        Response::new(full(st.name.clone()))
    } else if path == "/stream" {
        let (tx, rx) = mpsc::channel::<Result<Frame<Bytes>, std::io::Error>>(4);
        let st2 = st.clone();
        tokio::spawn(async move {
            let _ = tx.send(Ok(Frame::data(Bytes::from("first\n")))).await;
            st2.release.notified().await;
            let _ = tx.send(Ok(Frame::data(Bytes::from("second\n")))).await;
        });
        let stream = tokio_stream_from(rx);
        Response::new(BodyExt::boxed(StreamBody::new(stream)))
    } else if path == "/ws" {
        let key = req
            .headers()
            .get("sec-websocket-key")
            .cloned()
            .unwrap_or_else(|| http::HeaderValue::from_static(""));
        let accept = tokio_tungstenite::tungstenite::handshake::derive_accept_key(key.as_bytes());
        let on_upgrade = hyper::upgrade::on(&mut req);
        tokio::spawn(async move {
            if let Ok(up) = on_upgrade.await {
                let mut ws = tokio_tungstenite::WebSocketStream::from_raw_socket(
                    TokioIo::new(up),
                    tokio_tungstenite::tungstenite::protocol::Role::Server,
                    None,
                )
                .await;
                while let Some(Ok(m)) = ws.next().await {
                    if m.is_text() || m.is_binary() {
                        let _ = ws.send(m).await;
                    }
                }
            }
        });
        let mut r = Response::new(full(""));
        *r.status_mut() = StatusCode::SWITCHING_PROTOCOLS;
        r.headers_mut()
            .insert("upgrade", http::HeaderValue::from_static("websocket"));
        r.headers_mut()
            .insert("connection", http::HeaderValue::from_static("Upgrade"));
        if let Ok(v) = http::HeaderValue::from_str(&accept) {
            r.headers_mut().insert("sec-websocket-accept", v);
        }
        r
    } else if path == "/html" {
        // No Content-Type: the activator's server sniffs one.
        Response::new(full(HTML_PAGE))
    } else {
        Response::new(full(st.name.clone()))
    };
    st.in_flight.fetch_sub(1, Ordering::SeqCst);
    resp
}

fn tokio_stream_from<T: Send + 'static>(
    mut rx: mpsc::Receiver<T>,
) -> impl futures::Stream<Item = T> + Send + 'static {
    futures::stream::poll_fn(move |cx| rx.poll_recv(cx))
}

impl Pod {
    pub async fn start(name: &str, healthy: bool) -> Self {
        let listener = TcpListener::bind("127.0.0.1:0").await.expect("bind pod");
        let addr = listener.local_addr().expect("addr");
        let state = Arc::new(PodState {
            name: name.to_owned(),
            healthy: AtomicBool::new(healthy),
            ..Default::default()
        });
        let st = state.clone();
        let task = tokio::spawn(async move {
            let mut conns = JoinSet::new();
            loop {
                let Ok((stream, _)) = listener.accept().await else {
                    continue;
                };
                let st = st.clone();
                conns.spawn(async move {
                    let svc = hyper::service::service_fn(move |req| {
                        let st = st.clone();
                        async move { Ok::<_, std::convert::Infallible>(pod_handle(st, req).await) }
                    });
                    // HTTP/1.1 and h2c, as a queue-proxy serves.
                    let _ = hyper_util::server::conn::auto::Builder::new(TokioExecutor::new())
                        .serve_connection_with_upgrades(TokioIo::new(stream), svc)
                        .await;
                });
            }
        });
        Self { addr, state, task }
    }

    /// Requests other than probes this pod served, by path.
    pub fn served(&self) -> Vec<Seen> {
        self.state.seen.lock().expect("lock").clone()
    }
}

/// The autoscaler stand-in: accepts websockets on any path, decodes binary frames as
/// `WireStatMessages`.
pub struct FakeAutoscaler {
    pub port: u16,
    pub rx: mpsc::UnboundedReceiver<WireStatMessages>,
    task: JoinHandle<()>,
}

impl Drop for FakeAutoscaler {
    fn drop(&mut self) {
        self.task.abort();
    }
}

impl FakeAutoscaler {
    pub async fn start(port: u16) -> Self {
        let listener = loop {
            match TcpListener::bind(("127.0.0.1", port)).await {
                Ok(l) => break l,
                Err(_) => tokio::time::sleep(Duration::from_millis(20)).await,
            }
        };
        let port = listener.local_addr().expect("addr").port();
        let (tx, rx) = mpsc::unbounded_channel();
        let task = tokio::spawn(async move {
            let mut conns = JoinSet::new();
            loop {
                let Ok((stream, _)) = listener.accept().await else {
                    continue;
                };
                let tx = tx.clone();
                conns.spawn(async move {
                    let Ok(mut ws) = tokio_tungstenite::accept_async(stream).await else {
                        return;
                    };
                    while let Some(Ok(m)) = ws.next().await {
                        if let Message::Binary(b) = m
                            && let Ok(msgs) = WireStatMessages::decode(b.as_ref())
                        {
                            let _ = tx.send(msgs);
                        }
                    }
                });
            }
        });
        Self { port, rx, task }
    }

    /// The next frame, at most `within`.
    pub async fn next(&mut self, within: Duration) -> Option<WireStatMessages> {
        tokio::time::timeout(within, self.rx.recv())
            .await
            .ok()
            .flatten()
    }
}

/// Counts requests per pod name in replies.
pub fn tally(replies: &[Reply]) -> HashMap<String, usize> {
    let mut m = HashMap::new();
    for r in replies {
        *m.entry(r.body.clone()).or_insert(0) += 1;
    }
    m
}

/// Where `scripts/setup.sh` puts Knative's activator oracle: `$GOBIN`, else `$HOME/go/bin`.
pub fn oracle_bin() -> PathBuf {
    spright_test_support::go_bin("knative-activator-oracle")
}

/// knative-activator-oracle (oracle/knative-activator): Knative's own activator handler
/// chain and Throttler serving the manifest directory, killed on drop. Its JSON log goes to
/// a file beside the manifest directory, shown when a test fails.
pub struct Oracle {
    pub child: Child,
    pub port: u16,
    pub log_path: PathBuf,
}

impl Drop for Oracle {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
        let _ = std::fs::remove_file(&self.log_path);
    }
}

impl Oracle {
    /// Starts the oracle with the environment the stock Deployment sets (as
    /// [`Activator::spawn`] does). Fails, never skips, when the binary is missing.
    pub fn spawn(manifests: &Path, autoscaler_port: u16) -> Self {
        let bin = oracle_bin();
        assert!(
            bin.is_file(),
            "Knative's activator oracle is missing at {}: run scripts/setup.sh (it builds \
             oracle/knative-activator into $GOBIN/knative-activator-oracle)",
            bin.display()
        );
        let port = free_port();
        let log_path = manifests.with_extension("oracle.log");
        let log = std::fs::File::create(&log_path).expect("oracle log file");
        let child = Command::new(&bin)
            .env_clear()
            .envs(STOCK_ENV)
            // Knative reads the cluster domain from /etc/resolv.conf's `search svc.<domain>`
            // unless CLUSTER_DOMAIN is set: pin it to the default whatever the host says.
            .env("CLUSTER_DOMAIN", "cluster.local")
            .arg("--manifests")
            .arg(manifests)
            .args([
                "--autoscaler",
                &format!("ws://127.0.0.1:{autoscaler_port}/"),
            ])
            .args(["--bind", "127.0.0.1"])
            .args(["--http1-port", &port.to_string()])
            .args(["--h2c-port", "0"])
            .args(["--drain-timeout", "0s"])
            .stdin(Stdio::null())
            .stdout(Stdio::null())
            .stderr(Stdio::from(log))
            .spawn()
            .unwrap_or_else(|e| panic!("spawn {}: {e}", bin.display()));
        Self {
            child,
            port,
            log_path,
        }
    }

    pub fn logs(&self) -> String {
        std::fs::read_to_string(&self.log_path).unwrap_or_default()
    }
}

/// Which activator a differential test runs against.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Impl {
    Lite,
    Knative,
}

/// An activator under test: activator-lite or Knative's (the oracle), one port each.
pub enum Subject {
    Lite(Activator),
    Knative(Oracle),
}

impl Subject {
    /// Starts `imp` on the manifest directory and waits until its kubelet health check
    /// answers 200 (both need the autoscaler websocket up first).
    pub async fn ready(imp: Impl, manifests: &Path, autoscaler_port: u16) -> Self {
        let mut s = match imp {
            Impl::Lite => Subject::Lite(Activator::spawn(manifests, autoscaler_port, &[])),
            Impl::Knative => Subject::Knative(Oracle::spawn(manifests, autoscaler_port)),
        };
        let deadline = Instant::now() + Duration::from_secs(20);
        loop {
            if s.health().await == Some(StatusCode::OK) {
                return s;
            }
            if let Subject::Knative(o) = &mut s
                && let Ok(Some(status)) = o.child.try_wait()
            {
                // The oracle exits on refused manifests or flags: say why at once.
                panic!("knative-activator-oracle exited ({status}):\n{}", o.logs());
            }
            assert!(
                Instant::now() < deadline,
                "{imp:?} never became healthy:\n{}",
                s.logs()
            );
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
    }

    pub fn port(&self) -> u16 {
        match self {
            Subject::Lite(a) => a.port,
            Subject::Knative(o) => o.port,
        }
    }

    /// The oracle's log (empty for activator-lite, whose log goes to the test's stderr).
    pub fn logs(&self) -> String {
        match self {
            Subject::Lite(_) => String::new(),
            Subject::Knative(o) => o.logs(),
        }
    }

    /// Kubelet-style health status.
    pub async fn health(&self) -> Option<StatusCode> {
        kubelet_health(self.port()).await
    }

    /// A request for revision `rev` through this activator.
    pub async fn get(&self, rev: &str, path: &str, headers: &[(&str, &str)]) -> Reply {
        get(self.port(), rev, path, headers).await
    }
}

/// One step of a [`RawPod`] answer.
#[derive(Debug, Clone)]
pub enum Step {
    /// These bytes, in one write.
    Write(Vec<u8>),
    /// A pause before the next step.
    Pause(Duration),
    /// Waits until the test calls `release.notify_one()`.
    WaitRelease,
}

/// A pod that answers in raw HTTP/1.1 bytes, so a test decides the framing and which
/// bytes travel together: queue-proxy probes get 200 `queue`, any other request the steps
/// given for its path (without query), else 404. Requests carry no body; a connection
/// serves them one after another.
pub struct RawPod {
    pub addr: SocketAddr,
    pub release: Arc<Notify>,
    task: JoinHandle<()>,
}

impl Drop for RawPod {
    fn drop(&mut self) {
        self.task.abort();
    }
}

impl RawPod {
    pub async fn start(answers: Vec<(&'static str, Vec<Step>)>) -> Self {
        let listener = TcpListener::bind("127.0.0.1:0").await.expect("bind pod");
        let addr = listener.local_addr().expect("addr");
        let release = Arc::new(Notify::new());
        let answers: Arc<HashMap<&'static str, Vec<Step>>> =
            Arc::new(answers.into_iter().collect());
        let rel = release.clone();
        let task = tokio::spawn(async move {
            let mut conns = JoinSet::new();
            loop {
                let Ok((stream, _)) = listener.accept().await else {
                    continue;
                };
                conns.spawn(raw_conn(stream, answers.clone(), rel.clone()));
            }
        });
        Self {
            addr,
            release,
            task,
        }
    }
}

async fn raw_conn(
    mut s: tokio::net::TcpStream,
    answers: Arc<HashMap<&'static str, Vec<Step>>>,
    release: Arc<Notify>,
) {
    use tokio::io::AsyncWriteExt;
    let mut buf = Vec::new();
    loop {
        let Some(end) = read_head(&mut s, &mut buf).await else {
            return;
        };
        let mut headers = [httparse::EMPTY_HEADER; 64];
        let mut req = httparse::Request::new(&mut headers);
        if !matches!(req.parse(&buf[..end]), Ok(httparse::Status::Complete(_))) {
            return;
        }
        let probe = req
            .headers
            .iter()
            .any(|h| h.name.eq_ignore_ascii_case("k-network-probe") && h.value == b"queue");
        let path = req
            .path
            .unwrap_or("/")
            .split('?')
            .next()
            .unwrap_or("/")
            .to_owned();
        buf.drain(..end);
        let steps = if probe {
            vec![Step::Write(
                b"HTTP/1.1 200 OK\r\nContent-Length: 5\r\n\r\nqueue".to_vec(),
            )]
        } else {
            answers.get(path.as_str()).cloned().unwrap_or_else(|| {
                vec![Step::Write(
                    b"HTTP/1.1 404 Not Found\r\nContent-Length: 0\r\n\r\n".to_vec(),
                )]
            })
        };
        for step in steps {
            match step {
                Step::Write(b) => {
                    if s.write_all(&b).await.is_err() {
                        return;
                    }
                }
                Step::Pause(d) => tokio::time::sleep(d).await,
                Step::WaitRelease => release.notified().await,
            }
        }
    }
}

/// Reads from `s` into `buf` until it holds a whole request head; the head's length, or
/// `None` when the connection ends first.
pub async fn read_head(s: &mut tokio::net::TcpStream, buf: &mut Vec<u8>) -> Option<usize> {
    use tokio::io::AsyncReadExt;
    loop {
        if let Some(i) = buf.windows(4).position(|w| w == b"\r\n\r\n") {
            return Some(i + 4);
        }
        let mut chunk = [0u8; 4096];
        match s.read(&mut chunk).await {
            Ok(0) | Err(_) => return None,
            Ok(n) => buf.extend_from_slice(&chunk[..n]),
        }
    }
}

/// A GET for revision `rev` through the activator on `port`, in HTTP `version` (1.0 or 1.1).
pub async fn get_version(port: u16, rev: &str, path: &str, version: http::Version) -> Reply {
    let req = Request::get(format!("http://127.0.0.1:{port}{path}"))
        .version(version)
        .header("host", format!("{rev}.{NS}.example.com"))
        .header("knative-serving-namespace", NS)
        .header("knative-serving-revision", rev)
        .body(Full::new(Bytes::new()))
        .expect("request");
    send(req).await
}
