//! Shared harness for the black-box and differential tests: a hyper upstream standing in for
//! the user container, a spawner for either queue-proxy binary with Knative's environment, and
//! small HTTP/1.1 and h2c clients.

#![allow(dead_code)]

use std::collections::BTreeMap;
use std::convert::Infallible;
use std::net::SocketAddr;
use std::process::{Child, Command, Stdio};
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex, MutexGuard};
use std::time::{Duration, Instant};

use bytes::Bytes;
use http::{Request, Response, StatusCode};
use http_body_util::{BodyExt, Full, StreamBody};
use hyper::body::{Frame, Incoming};
use hyper::service::service_fn;
use hyper_util::rt::{TokioExecutor, TokioIo};
pub use spright_test_support::free_port;
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::{TcpListener, TcpStream};
use tokio::sync::Notify;

/// Knative's queue-proxy, v1.23.0 (`go install knative.dev/serving/cmd/queue@v0.50.0`).
pub const KNATIVE_QUEUE: &str = "/root/go/bin/queue";
pub const OURS: &str = env!("CARGO_BIN_EXE_queue-proxy-ebpf");

/// Knative's queue-proxy binds its admin port 8022, its stats port 9090, its profiling port
/// 8008 and (with request metrics over Prometheus) 9091 whatever its environment says
/// (`pkg/networking/constants.go`), so every case that runs Knative's holds this lock. Every
/// other port (serving, TLS, ours' admin and stats, the upstream) is a free one per test.
static PORTS: Mutex<()> = Mutex::new(());

pub fn port_lock() -> MutexGuard<'static, ()> {
    PORTS
        .lock()
        .unwrap_or_else(std::sync::PoisonError::into_inner)
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Impl {
    Knative,
    Ours,
}

impl Impl {
    pub fn binary(self) -> &'static str {
        match self {
            Impl::Knative => KNATIVE_QUEUE,
            Impl::Ours => OURS,
        }
    }
}

/// Ports of one running queue-proxy.
#[derive(Debug, Clone, Copy)]
pub struct Ports {
    pub serving: u16,
    pub admin: u16,
    pub stats: u16,
}

/// The environment Knative's revision reconciler would set, for `user_port`, with a free
/// serving port and TLS serving port of this test's own (Knative reads both from here).
pub fn knative_env(user_port: u16) -> BTreeMap<String, String> {
    [
        ("SERVING_NAMESPACE", "default"),
        ("SERVING_SERVICE", "hello"),
        ("SERVING_CONFIGURATION", "hello"),
        ("SERVING_REVISION", "hello-00001"),
        ("SERVING_POD", "hello-00001-deployment-5d8f7c-abcde"),
        ("SERVING_POD_IP", "127.0.0.1"),
        ("QUEUE_SERVING_PORT", &free_port().to_string()),
        ("QUEUE_SERVING_TLS_PORT", &free_port().to_string()),
        ("USER_PORT", &user_port.to_string()),
        ("CONTAINER_CONCURRENCY", "0"),
        ("REVISION_TIMEOUT_SECONDS", "300"),
        ("SERVING_LOGGING_CONFIG", ""),
        ("SERVING_LOGGING_LEVEL", ""),
        ("SYSTEM_NAMESPACE", "knative-serving"),
        ("ENABLE_HTTP2_AUTO_DETECTION", "false"),
        ("ENABLE_MULTI_CONTAINER_PROBES", "false"),
        (
            "OBSERVABILITY_CONFIG",
            r#"{"requestMetrics":{"protocol":"none"}}"#,
        ),
    ]
    .into_iter()
    .map(|(k, v)| (k.to_owned(), v.to_owned()))
    .collect()
}

pub struct Proc {
    pub child: Child,
    pub ports: Ports,
    pub which: Impl,
}

impl Drop for Proc {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

impl Proc {
    pub fn sigterm(&self) {
        // SAFETY: kill(2) on the pid of a child we spawned and have not reaped.
        unsafe {
            libc::kill(self.child.id() as i32, libc::SIGTERM);
        }
    }

    /// Kills the process and returns what it wrote to stdout (needs `capture`).
    pub fn stdout(&mut self) -> String {
        use std::io::Read;
        let _ = self.child.kill();
        let _ = self.child.wait();
        let mut s = String::new();
        if let Some(mut out) = self.child.stdout.take() {
            let _ = out.read_to_string(&mut s);
        }
        s
    }

    /// Waits for exit, at most `limit`; returns the exit code.
    pub fn wait_exit(&mut self, limit: Duration) -> Option<i32> {
        let end = Instant::now() + limit;
        while Instant::now() < end {
            if let Ok(Some(s)) = self.child.try_wait() {
                return s.code();
            }
            std::thread::sleep(Duration::from_millis(20));
        }
        None
    }
}

fn port_open(port: u16) -> bool {
    std::net::TcpStream::connect_timeout(
        &SocketAddr::from(([127, 0, 0, 1], port)),
        Duration::from_millis(100),
    )
    .is_ok()
}

/// Starts `which` with `env`. Knative's binds its fixed admin/stats ports; ours gets the
/// admin/stats ports `alt`, or free ones.
pub fn start(which: Impl, env: &BTreeMap<String, String>, alt: Option<(u16, u16)>) -> Proc {
    start_opts(which, env, alt, false)
}

/// Like [`start`]; with `capture`, stdout (request logs) is piped for [`Proc::stdout`].
pub fn start_opts(
    which: Impl,
    env: &BTreeMap<String, String>,
    alt: Option<(u16, u16)>,
    capture: bool,
) -> Proc {
    let serving: u16 = env
        .get("QUEUE_SERVING_PORT")
        .and_then(|p| p.parse().ok())
        .expect("QUEUE_SERVING_PORT in the environment");
    let (admin, stats) = match (which, alt) {
        (Impl::Ours, Some(a)) => a,
        (Impl::Ours, None) => (free_port(), free_port()),
        (Impl::Knative, _) => (8022, 9090),
    };
    // Knative's fixed ports may be held for a while by another suite that runs the real
    // queue-proxy (e.g. activator-lite's, when test binaries run side by side).
    let busy_until = Instant::now() + Duration::from_secs(90);
    for attempt in 0..50 {
        while [serving, admin, stats].iter().any(|p| port_open(*p)) {
            assert!(
                Instant::now() < busy_until,
                "ports {serving}/{admin}/{stats} stayed busy for 90 s"
            );
            std::thread::sleep(Duration::from_millis(100));
        }
        let mut cmd = Command::new(which.binary());
        cmd.env_clear()
            .envs(env)
            .env("PATH", "/usr/bin:/bin")
            .env("QUEUE_ADMIN_PORT", admin.to_string())
            .env("QUEUE_AUTOSCALING_METRICS_PORT", stats.to_string())
            .stdin(Stdio::null())
            .stdout(if capture {
                Stdio::piped()
            } else {
                Stdio::null()
            })
            .stderr(Stdio::null());
        let Ok(child) = cmd.spawn() else {
            panic!("cannot start {}", which.binary());
        };
        let mut p = Proc {
            child,
            ports: Ports {
                serving,
                admin,
                stats,
            },
            which,
        };
        let end = Instant::now() + Duration::from_secs(10);
        while Instant::now() < end {
            if let Ok(Some(_)) = p.child.try_wait() {
                break;
            }
            if [serving, admin, stats].iter().all(|port| port_open(*port)) {
                return p;
            }
            std::thread::sleep(Duration::from_millis(20));
        }
        drop(p);
        eprintln!("{which:?} did not come up (attempt {attempt}), retrying");
        std::thread::sleep(Duration::from_millis(200));
    }
    panic!("{which:?} never came up");
}

/// The user container stand-in.
pub struct Upstream {
    pub port: u16,
    pub release: Arc<Notify>,
    pub ready: Arc<AtomicBool>,
    rt: Option<tokio::runtime::Runtime>,
}

impl Drop for Upstream {
    fn drop(&mut self) {
        if let Some(rt) = self.rt.take() {
            rt.shutdown_background();
        }
    }
}

type UBody = http_body_util::combinators::BoxBody<Bytes, Infallible>;

fn full(b: impl Into<Bytes>) -> UBody {
    Full::new(b.into()).boxed()
}

fn query(req: &Request<Incoming>, key: &str) -> Option<u64> {
    req.uri().query()?.split('&').find_map(|kv| {
        let (k, v) = kv.split_once('=')?;
        (k == key).then(|| v.parse().ok()).flatten()
    })
}

async fn upstream_handle(
    mut req: Request<Incoming>,
    release: Arc<Notify>,
    ready: Arc<AtomicBool>,
) -> Response<UBody> {
    let path = req.uri().path().to_owned();
    match path.as_str() {
        "/sleep" => {
            tokio::time::sleep(Duration::from_millis(query(&req, "ms").unwrap_or(0))).await;
            Response::new(full("slept"))
        }
        "/status" => {
            let code = query(&req, "code").unwrap_or(200);
            let mut r = Response::new(full(format!("status {code}")));
            *r.status_mut() =
                StatusCode::from_u16(u16::try_from(code).unwrap_or(500)).unwrap_or(StatusCode::OK);
            r
        }
        "/grpc.health.v1.Health/Check" => {
            // SERVING (field 1 = 1) when ready, else NOT_SERVING (2), gRPC-framed, status in
            // the trailers.
            let status: u8 = if ready.load(Ordering::SeqCst) { 1 } else { 2 };
            let msg = Bytes::from(vec![0u8, 0, 0, 0, 2, 0x08, status]);
            let mut trailers = http::HeaderMap::new();
            trailers.insert("grpc-status", "0".parse().expect("static"));
            let frames: Vec<Result<Frame<Bytes>, Infallible>> =
                vec![Ok(Frame::data(msg)), Ok(Frame::trailers(trailers))];
            let mut r = Response::new(StreamBody::new(futures::stream::iter(frames)).boxed());
            r.headers_mut()
                .insert("content-type", "application/grpc".parse().expect("static"));
            r
        }
        "/truncate" => {
            // Announces 100 bytes, sends 10: the connection is cut short.
            let frames: Vec<Result<Frame<Bytes>, Infallible>> =
                vec![Ok(Frame::data(Bytes::from_static(b"0123456789")))];
            let mut r = Response::new(StreamBody::new(futures::stream::iter(frames)).boxed());
            r.headers_mut()
                .insert("content-length", "100".parse().expect("static"));
            r
        }
        "/encoded" => {
            // A gzip body without Content-Type: Go's server sniffs no type for an encoded
            // answer. `empty=1`: an empty Content-Encoding comes first, which Go's
            // `Header.Get` reads, so it sniffs after all.
            let gzip: &'static [u8] = &[0x1f, 0x8b, 8, 0, 0, 0, 0, 0, 0, 3, 3, 0];
            let mut r = Response::new(full(Bytes::from_static(gzip)));
            if query(&req, "empty") == Some(1) {
                r.headers_mut()
                    .append("content-encoding", "".parse().expect("static"));
            }
            r.headers_mut()
                .append("content-encoding", "gzip".parse().expect("static"));
            r
        }
        "/hop" => {
            // Hop-by-hop headers the proxy must not forward, and an empty body.
            let mut r = Response::new(full(""));
            for (k, v) in [
                ("connection", "x-drop"),
                ("x-drop", "1"),
                ("keep-alive", "timeout=5"),
                ("x-keep", "1"),
            ] {
                r.headers_mut().insert(k, v.parse().expect("static"));
            }
            r
        }
        "/healthz" => {
            let mut r = Response::new(full("ok"));
            if !ready.load(Ordering::SeqCst) {
                *r.status_mut() = StatusCode::SERVICE_UNAVAILABLE;
            }
            r
        }
        "/stream" => {
            // n chunks, `ms` apart; with `hold=1` the second chunk waits for `release`.
            let n = query(&req, "n").unwrap_or(3);
            let ms = query(&req, "ms").unwrap_or(0);
            let hold = query(&req, "hold").unwrap_or(0) == 1;
            // `delay`: ms before the first chunk; `ct=0`: no Content-Type (Go sniffs one).
            let delay = query(&req, "delay").unwrap_or(0);
            let with_ct = query(&req, "ct").unwrap_or(1) == 1;
            let (tx, rx) = tokio::sync::mpsc::channel::<Result<Frame<Bytes>, Infallible>>(4);
            tokio::spawn(async move {
                tokio::time::sleep(Duration::from_millis(delay)).await;
                for i in 0..n {
                    if i > 0 {
                        if hold && i == 1 {
                            release.notified().await;
                        }
                        tokio::time::sleep(Duration::from_millis(ms)).await;
                    }
                    if tx
                        .send(Ok(Frame::data(Bytes::from(format!("chunk{i}\n")))))
                        .await
                        .is_err()
                    {
                        return;
                    }
                }
            });
            let stream =
                futures::stream::unfold(
                    rx,
                    |mut rx| async move { rx.recv().await.map(|f| (f, rx)) },
                );
            let mut r = Response::new(StreamBody::new(stream).boxed());
            if with_ct {
                r.headers_mut()
                    .insert("content-type", "text/plain".parse().expect("static"));
            }
            r
        }
        "/ws" => {
            let up = hyper::upgrade::on(&mut req);
            tokio::spawn(async move {
                if let Ok(io) = up.await {
                    let mut io = TokioIo::new(io);
                    let mut buf = [0u8; 1024];
                    while let Ok(n) = io.read(&mut buf).await {
                        if n == 0 || io.write_all(&buf[..n]).await.is_err() {
                            break;
                        }
                    }
                }
            });
            let mut r = Response::new(full(""));
            *r.status_mut() = StatusCode::SWITCHING_PROTOCOLS;
            r.headers_mut()
                .insert("connection", "Upgrade".parse().expect("static"));
            r.headers_mut()
                .insert("upgrade", "websocket".parse().expect("static"));
            r
        }
        _ => {
            // Echo what arrived, so proxied requests can be compared.
            let mut headers = BTreeMap::new();
            for (k, v) in req.headers() {
                headers
                    .entry(k.as_str().to_owned())
                    .or_insert_with(Vec::new)
                    .push(String::from_utf8_lossy(v.as_bytes()).into_owned());
            }
            let (parts, incoming) = req.into_parts();
            let req = Request::from_parts(parts, ());
            let received = incoming
                .collect()
                .await
                .map(|c| c.to_bytes())
                .unwrap_or_default();
            let body = serde_json::json!({
                "body": String::from_utf8_lossy(&received),
                "method": req.method().as_str(),
                "uri": req.uri().to_string(),
                "version": format!("{:?}", req.version()),
                "headers": headers,
            });
            let mut r = Response::new(full(body.to_string()));
            r.headers_mut()
                .insert("x-upstream", "yes".parse().expect("static"));
            r.headers_mut()
                .insert("content-type", "application/json".parse().expect("static"));
            r
        }
    }
}

impl Upstream {
    pub fn start() -> Self {
        let rt = tokio::runtime::Builder::new_multi_thread()
            .worker_threads(1)
            .enable_all()
            .build()
            .expect("runtime");
        let listener = rt
            .block_on(TcpListener::bind("127.0.0.1:0"))
            .expect("bind upstream");
        let port = listener.local_addr().expect("addr").port();
        let release = Arc::new(Notify::new());
        let ready = Arc::new(AtomicBool::new(true));
        let (r2, rd2) = (Arc::clone(&release), Arc::clone(&ready));
        rt.spawn(async move {
            loop {
                let Ok((s, _)) = listener.accept().await else {
                    continue;
                };
                let (r3, rd3) = (Arc::clone(&r2), Arc::clone(&rd2));
                tokio::spawn(async move {
                    let svc = service_fn(move |req| {
                        let (r4, rd4) = (Arc::clone(&r3), Arc::clone(&rd3));
                        async move { Ok::<_, Infallible>(upstream_handle(req, r4, rd4).await) }
                    });
                    let mut b = hyper_util::server::conn::auto::Builder::new(TokioExecutor::new());
                    b.http1().max_headers(1000);
                    let _ = b.serve_connection_with_upgrades(TokioIo::new(s), svc).await;
                });
            }
        });
        Self {
            port,
            release,
            ready,
            rt: Some(rt),
        }
    }
}

/// What a response looked like.
#[derive(Debug, Clone, PartialEq)]
pub struct Answer {
    pub status: u16,
    pub headers: BTreeMap<String, String>,
    pub body: Bytes,
    pub trailers: BTreeMap<String, String>,
}

impl Answer {
    pub fn text(&self) -> String {
        String::from_utf8_lossy(&self.body).into_owned()
    }

    /// Only the headers a client or Knative component acts on; `Date` and the like differ by
    /// nature.
    pub fn key_headers(&self) -> BTreeMap<String, String> {
        const KEEP: [&str; 6] = [
            "content-type",
            "x-content-type-options",
            "k-network-hash",
            "x-upstream",
            "content-length",
            "upgrade",
        ];
        self.headers
            .iter()
            .filter(|(k, _)| KEEP.contains(&k.as_str()))
            .map(|(k, v)| (k.clone(), v.clone()))
            .collect()
    }
}

pub fn runtime() -> tokio::runtime::Runtime {
    tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
        .expect("runtime")
}

/// One request on a fresh connection; `h2` selects h2c with prior knowledge.
pub async fn send(
    port: u16,
    method: &str,
    path: &str,
    headers: &[(&str, &str)],
    h2: bool,
) -> Result<Answer, String> {
    send_body(port, method, path, headers, h2, Bytes::new()).await
}

/// [`send`] with a request body.
pub async fn send_body(
    port: u16,
    method: &str,
    path: &str,
    headers: &[(&str, &str)],
    h2: bool,
    body: Bytes,
) -> Result<Answer, String> {
    let stream = TcpStream::connect(("127.0.0.1", port))
        .await
        .map_err(|e| e.to_string())?;
    let mut b = Request::builder().method(method).uri(if h2 {
        format!("http://127.0.0.1:{port}{path}")
    } else {
        path.to_owned()
    });
    if !h2 && !headers.iter().any(|(k, _)| k.eq_ignore_ascii_case("host")) {
        b = b.header("host", format!("127.0.0.1:{port}"));
    }
    for (k, v) in headers {
        b = b.header(*k, *v);
    }
    let req = b.body(Full::new(body)).map_err(|e| e.to_string())?;
    let io = TokioIo::new(stream);
    let res = if h2 {
        let (mut s, c) = hyper::client::conn::http2::handshake(TokioExecutor::new(), io)
            .await
            .map_err(|e| e.to_string())?;
        tokio::spawn(c);
        s.send_request(req).await.map_err(|e| e.to_string())?
    } else {
        let (mut s, c) = hyper::client::conn::http1::handshake(io)
            .await
            .map_err(|e| e.to_string())?;
        tokio::spawn(c);
        s.send_request(req).await.map_err(|e| e.to_string())?
    };
    let status = res.status().as_u16();
    let headers = res
        .headers()
        .iter()
        .map(|(k, v)| {
            (
                k.as_str().to_owned(),
                String::from_utf8_lossy(v.as_bytes()).into_owned(),
            )
        })
        .collect();
    let collected = res.into_body().collect().await.ok();
    let trailers = collected
        .as_ref()
        .and_then(|c| c.trailers())
        .map(|t| {
            t.iter()
                .map(|(k, v)| {
                    (
                        k.as_str().to_owned(),
                        String::from_utf8_lossy(v.as_bytes()).into_owned(),
                    )
                })
                .collect()
        })
        .unwrap_or_default();
    let body = collected.map(|c| c.to_bytes()).unwrap_or_default();
    Ok(Answer {
        status,
        headers,
        body,
        trailers,
    })
}

pub fn get(port: u16, path: &str, headers: &[(&str, &str)]) -> Answer {
    runtime()
        .block_on(send(port, "GET", path, headers, false))
        .unwrap_or_else(|e| panic!("GET {path} on {port}: {e}"))
}

/// The autoscaler's view (serving `stat.proto`).
#[derive(Clone, PartialEq, prost::Message)]
pub struct Stat {
    #[prost(string, tag = "1")]
    pub pod_name: String,
    #[prost(double, tag = "2")]
    pub average_concurrent_requests: f64,
    #[prost(double, tag = "3")]
    pub average_proxied_concurrent_requests: f64,
    #[prost(double, tag = "4")]
    pub request_count: f64,
    #[prost(double, tag = "5")]
    pub proxied_request_count: f64,
    #[prost(double, tag = "6")]
    pub process_uptime: f64,
    #[prost(int64, tag = "7")]
    pub timestamp: i64,
}

/// Scrapes like the autoscaler (`Accept: application/protobuf`).
pub fn scrape(port: u16) -> (Answer, Stat) {
    use prost::Message;
    let a = get(port, "/metrics", &[("accept", "application/protobuf")]);
    let s = Stat::decode(a.body.clone()).expect("protobuf Stat");
    (a, s)
}
