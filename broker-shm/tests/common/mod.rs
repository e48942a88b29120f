//! Black-box harness: runs the real `broker-shm` binary with temp dirs and free ports, a
//! recording HTTP subscriber, and a raw-HTTP CloudEvents client.
#![allow(dead_code)]

use bytes::Bytes;
use http::{HeaderMap, Request, Response, StatusCode};
use http_body_util::{BodyExt, Full};
use hyper::body::Incoming;
use hyper_util::client::legacy::Client;
use hyper_util::client::legacy::connect::HttpConnector;
use hyper_util::rt::{TokioExecutor, TokioIo};
use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};
use tokio::sync::Notify;

/// Runs the case `async fn(Impl)` as two tests, one per implementation: broker-shm and
/// Knative's own handlers (the oracle).
#[allow(unused_macros)]
macro_rules! differential {
    ($case:ident: $broker_shm:ident, $knative:ident) => {
        #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
        async fn $broker_shm() {
            $case(Impl::BrokerShm).await;
        }

        #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
        async fn $knative() {
            $case(Impl::Knative).await;
        }
    };
}
#[allow(unused_imports)]
pub(crate) use differential;

pub use spright_test_support::free_port;

/// A running broker-shm process.
pub struct BrokerProc {
    pub child: Child,
    pub port: u16,
    pub metrics_port: u16,
    pub manifests: PathBuf,
    pub data: PathBuf,
    pub log_path: PathBuf,
    pub _tmp: Option<tempfile::TempDir>,
    pub extra_args: Vec<String>,
    pub env: Vec<(String, String)>,
}

impl BrokerProc {
    /// Starts the broker with manifest files (name, yaml) and extra args.
    pub async fn start(
        files: &[(&str, String)],
        extra_args: &[&str],
        env: &[(&str, &str)],
    ) -> BrokerProc {
        let tmp = tempfile::tempdir().expect("tempdir");
        let manifests = tmp.path().join("manifests");
        let data = tmp.path().join("data");
        std::fs::create_dir_all(&manifests).expect("mkdir");
        for (name, yaml) in files {
            std::fs::write(manifests.join(name), yaml).expect("write manifest");
        }
        let mut p = BrokerProc {
            child: Command::new("true").spawn().expect("spawn true"),
            port: free_port(),
            metrics_port: free_port(),
            log_path: tmp.path().join("broker.log"),
            manifests,
            data,
            _tmp: Some(tmp),
            extra_args: extra_args.iter().map(|s| s.to_string()).collect(),
            env: env
                .iter()
                .map(|(k, v)| (k.to_string(), v.to_string()))
                .collect(),
        };
        let _ = p.child.wait();
        p.spawn().await;
        p
    }

    pub fn mode_args(&self) -> Vec<String> {
        self.extra_args.clone()
    }

    /// (Re)starts the process on the same dirs and port.
    pub async fn spawn(&mut self) {
        let log = std::fs::OpenOptions::new()
            .create(true)
            .append(true)
            .open(&self.log_path)
            .expect("log file");
        let mut cmd = Command::new(env!("CARGO_BIN_EXE_broker-shm"));
        cmd.arg("--manifests")
            .arg(&self.manifests)
            .arg("--data-dir")
            .arg(&self.data)
            .args(self.mode_args())
            .env("INGRESS_PORT", self.port.to_string())
            .env("METRICS_PORT", self.metrics_port.to_string())
            .env_remove("RUST_LOG")
            .stdout(Stdio::null())
            .stderr(Stdio::from(log));
        for (k, v) in &self.env {
            cmd.env(k, v);
        }
        self.child = cmd.spawn().expect("spawn broker-shm");
        let url = format!("http://127.0.0.1:{}/healthz", self.port);
        wait_ready(&mut self.child, "broker-shm", &url, &[], &self.log_path).await;
    }

    pub fn url(&self, path: &str) -> String {
        format!("http://127.0.0.1:{}{}", self.port, path)
    }

    pub async fn metrics(&self) -> String {
        let url = format!("http://127.0.0.1:{}/metrics", self.metrics_port);
        raw(http::Method::GET, &url, HeaderMap::new(), Bytes::new())
            .await
            .map(|r| String::from_utf8_lossy(&r.2).into_owned())
            .unwrap_or_default()
    }

    pub fn logs(&self) -> String {
        std::fs::read_to_string(&self.log_path).unwrap_or_default()
    }

    pub fn kill9(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }

    pub fn write_manifest(&self, name: &str, yaml: &str) {
        write_manifest_in(&self.manifests, name, yaml);
    }

    pub fn assert_alive(&mut self) {
        assert!(
            self.child.try_wait().expect("try_wait").is_none(),
            "broker-shm died: {}",
            self.logs()
        );
    }
}

impl Drop for BrokerProc {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

pub fn client() -> Client<HttpConnector, Full<Bytes>> {
    Client::builder(TokioExecutor::new()).build(HttpConnector::new())
}

/// One raw HTTP request: (status, headers, body).
pub async fn raw(
    method: http::Method,
    url: &str,
    headers: HeaderMap,
    body: Bytes,
) -> Result<(StatusCode, HeaderMap, Bytes), String> {
    let mut req = Request::builder().method(method).uri(url);
    if let Some(h) = req.headers_mut() {
        *h = headers;
    }
    let req = req.body(Full::new(body)).map_err(|e| e.to_string())?;
    let resp = tokio::time::timeout(Duration::from_secs(10), client().request(req))
        .await
        .map_err(|_| "timeout".to_string())?
        .map_err(|e| e.to_string())?;
    let (parts, body) = resp.into_parts();
    let body = body.collect().await.map_err(|e| e.to_string())?.to_bytes();
    Ok((parts.status, parts.headers, body))
}

pub fn headers(pairs: &[(&str, &str)]) -> HeaderMap {
    let mut h = HeaderMap::new();
    for (k, v) in pairs {
        h.insert(
            http::HeaderName::from_bytes(k.as_bytes()).expect("name"),
            http::HeaderValue::from_str(v).expect("value"),
        );
    }
    h
}

/// Sends a binary-mode 1.0 event; returns the status.
pub async fn send_binary(url: &str, id: &str, ty: &str, extra: &[(&str, &str)]) -> StatusCode {
    let mut pairs = vec![
        ("ce-specversion", "1.0"),
        ("ce-id", id),
        ("ce-source", "/test/source"),
        ("ce-type", ty),
        ("content-type", "application/json"),
    ];
    pairs.extend_from_slice(extra);
    raw(
        http::Method::POST,
        url,
        headers(&pairs),
        Bytes::from_static(b"{\"hello\":\"world\"}"),
    )
    .await
    .map(|r| r.0)
    .unwrap_or(StatusCode::INTERNAL_SERVER_ERROR)
}

/// A request the recording subscriber received.
#[derive(Debug, Clone)]
pub struct Received {
    pub path: String,
    pub headers: HeaderMap,
    pub body: Bytes,
    pub at: Instant,
}

impl Received {
    pub fn ce(&self, attr: &str) -> Option<String> {
        if let Some(v) = self.headers.get(format!("ce-{attr}")) {
            return v.to_str().ok().map(str::to_string);
        }
        let ct = self
            .headers
            .get("content-type")
            .and_then(|v| v.to_str().ok())
            .unwrap_or("");
        if ct.starts_with("application/cloudevents") {
            let v: serde_json::Value = serde_json::from_slice(&self.body).ok()?;
            return v.get(attr).map(|x| match x {
                serde_json::Value::String(s) => s.clone(),
                other => other.to_string(),
            });
        }
        None
    }
}

/// A scripted reply of the subscriber.
#[derive(Debug, Clone)]
pub struct Reply {
    pub status: u16,
    pub headers: Vec<(String, String)>,
    pub body: Bytes,
    pub delay: Duration,
}

impl Reply {
    pub fn status(s: u16) -> Reply {
        Reply {
            status: s,
            headers: vec![],
            body: Bytes::new(),
            delay: Duration::ZERO,
        }
    }
    pub fn event(id: &str, ty: &str) -> Reply {
        Reply {
            status: 200,
            headers: vec![
                ("ce-specversion".into(), "1.0".into()),
                ("ce-id".into(), id.into()),
                ("ce-source".into(), "/reply".into()),
                ("ce-type".into(), ty.into()),
                ("content-type".into(), "text/plain".into()),
            ],
            body: Bytes::from_static(b"reply"),
            delay: Duration::ZERO,
        }
    }
}

type Script = Box<dyn Fn(&Received, usize) -> Reply + Send + Sync>;

/// A recording HTTP subscriber.
pub struct Recorder {
    pub addr: SocketAddr,
    pub got: Arc<Mutex<Vec<Received>>>,
    notify: Arc<Notify>,
    _task: tokio::task::JoinHandle<()>,
}

impl Recorder {
    /// Answers 200 with an empty body.
    pub async fn start() -> Recorder {
        Self::scripted(|_, _| Reply::status(200)).await
    }

    /// `script(request, index of this request among those on the same path)`.
    pub async fn scripted(
        script: impl Fn(&Received, usize) -> Reply + Send + Sync + 'static,
    ) -> Recorder {
        Self::scripted_on(0, script).await
    }

    pub async fn scripted_on(
        port: u16,
        script: impl Fn(&Received, usize) -> Reply + Send + Sync + 'static,
    ) -> Recorder {
        let listener = tokio::net::TcpListener::bind(("127.0.0.1", port))
            .await
            .expect("bind recorder");
        let addr = listener.local_addr().expect("addr");
        let got: Arc<Mutex<Vec<Received>>> = Arc::default();
        let notify = Arc::new(Notify::new());
        let script: Arc<Script> = Arc::new(Box::new(script));
        let (g, n) = (got.clone(), notify.clone());
        let task = tokio::spawn(async move {
            loop {
                let Ok((stream, _)) = listener.accept().await else {
                    break;
                };
                let (g, n, script) = (g.clone(), n.clone(), script.clone());
                tokio::spawn(async move {
                    let svc = hyper::service::service_fn(move |req: Request<Incoming>| {
                        let (g, n, script) = (g.clone(), n.clone(), script.clone());
                        async move {
                            let (parts, body) = req.into_parts();
                            let body = body
                                .collect()
                                .await
                                .map(|c| c.to_bytes())
                                .unwrap_or_default();
                            let rec = Received {
                                path: parts.uri.path().to_string(),
                                headers: parts.headers,
                                body,
                                at: Instant::now(),
                            };
                            let idx = {
                                let mut v = g.lock().expect("lock");
                                let idx = v.iter().filter(|r| r.path == rec.path).count();
                                v.push(rec.clone());
                                idx
                            };
                            n.notify_waiters();
                            let reply = script(&rec, idx);
                            if !reply.delay.is_zero() {
                                tokio::time::sleep(reply.delay).await;
                            }
                            let mut resp = Response::new(Full::new(reply.body));
                            *resp.status_mut() =
                                StatusCode::from_u16(reply.status).expect("status");
                            for (k, v) in reply.headers {
                                resp.headers_mut().insert(
                                    http::HeaderName::from_bytes(k.as_bytes()).expect("h"),
                                    http::HeaderValue::from_str(&v).expect("v"),
                                );
                            }
                            Ok::<_, std::convert::Infallible>(resp)
                        }
                    });
                    let _ = hyper::server::conn::http1::Builder::new()
                        .serve_connection(TokioIo::new(stream), svc)
                        .await;
                });
            }
        });
        Recorder {
            addr,
            got,
            notify,
            _task: task,
        }
    }

    pub fn url(&self, path: &str) -> String {
        format!("http://{}{}", self.addr, path)
    }

    pub fn on(&self, path: &str) -> Vec<Received> {
        self.got
            .lock()
            .expect("lock")
            .iter()
            .filter(|r| r.path == path)
            .cloned()
            .collect()
    }

    /// Waits until `pred` holds over everything received, or the timeout passes.
    pub async fn wait_for(
        &self,
        timeout: Duration,
        pred: impl Fn(&[Received]) -> bool,
    ) -> Vec<Received> {
        let deadline = Instant::now() + timeout;
        loop {
            let notified = self.notify.notified();
            {
                let v = self.got.lock().expect("lock").clone();
                if pred(&v) || Instant::now() >= deadline {
                    return v;
                }
            }
            let _ = tokio::time::timeout(Duration::from_millis(200), notified).await;
        }
    }

    /// Waits for at least `n` requests on `path`.
    pub async fn wait_n(&self, path: &str, n: usize, timeout: Duration) -> Vec<Received> {
        self.wait_for(timeout, |v| {
            v.iter().filter(|r| r.path == path).count() >= n
        })
        .await;
        self.on(path)
    }
}

pub fn broker_yaml(ns: &str, name: &str, delivery: &str) -> String {
    format!(
        "apiVersion: eventing.knative.dev/v1\nkind: Broker\nmetadata:\n  name: {name}\n  namespace: {ns}\n  annotations:\n    eventing.knative.dev/broker.class: SprightBroker\nspec:\n{delivery}\n"
    )
}

/// A trigger; `spec_extra` is indented YAML (filters, delivery) under spec.
pub fn trigger_yaml(ns: &str, name: &str, broker: &str, uri: &str, spec_extra: &str) -> String {
    format!(
        "apiVersion: eventing.knative.dev/v1\nkind: Trigger\nmetadata:\n  name: {name}\n  namespace: {ns}\n  uid: uid-{name}\nspec:\n  broker: {broker}\n  subscriber:\n    uri: {uri}\n{spec_extra}\n"
    )
}

pub fn dir_bytes(p: &Path) -> u64 {
    let mut total = 0;
    if let Ok(rd) = std::fs::read_dir(p) {
        for e in rd.flatten() {
            let path = e.path();
            if path.is_dir() {
                total += dir_bytes(&path);
            } else if let Ok(m) = e.metadata() {
                total += m.len();
            }
        }
    }
    total
}

/// Writes `dir/name` atomically (a hidden temporary file renamed over it).
pub fn write_manifest_in(dir: &Path, name: &str, yaml: &str) {
    let tmp = dir.join(format!(".{name}.tmp"));
    std::fs::write(&tmp, yaml).expect("write");
    std::fs::rename(&tmp, dir.join(name)).expect("rename");
}

/// Polls `url` (GET with `probe` headers) until it answers 200; panics with the process log when
/// `child` exits first or 20 s pass.
async fn wait_ready(
    child: &mut Child,
    name: &str,
    url: &str,
    probe: &[(&str, &str)],
    log_path: &Path,
) {
    let logs = || std::fs::read_to_string(log_path).unwrap_or_default();
    let deadline = Instant::now() + Duration::from_secs(20);
    loop {
        if let Some(status) = child.try_wait().expect("try_wait") {
            panic!("{name} exited early with {status}: {}", logs());
        }
        if let Ok(r) = raw(http::Method::GET, url, headers(probe), Bytes::new()).await
            && r.0 == StatusCode::OK
        {
            return;
        }
        assert!(
            Instant::now() < deadline,
            "{name} did not come up: {}",
            logs()
        );
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
}

/// The implementation a differential drop-in test runs against: broker-shm's drop-in modes or
/// Knative's own handlers (the oracle, `oracle/knative-broker`).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Impl {
    BrokerShm,
    Knative,
}

/// Which stock deployment a drop-in process stands in for.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Role {
    /// mt-broker-ingress (contract C.2).
    Ingress,
    /// mt-broker-filter (contract C.3).
    Filter,
}

/// Where `scripts/setup.sh` puts the oracle: `$GOBIN`, else `$HOME/go/bin`.
pub fn oracle_bin() -> PathBuf {
    spright_test_support::go_bin("knative-broker-oracle")
}

/// A running knative-broker-oracle: Knative's mt-broker-ingress or mt-broker-filter handler
/// serving the objects of a manifest directory.
pub struct OracleProc {
    pub child: Child,
    pub port: u16,
    pub manifests: PathBuf,
    pub log_path: PathBuf,
    pub _tmp: tempfile::TempDir,
}

impl OracleProc {
    /// Starts the oracle in `role` on a free port. Fails (never skips) when the binary is missing.
    pub async fn start(files: &[(&str, String)], role: Role) -> OracleProc {
        let flag = match role {
            Role::Ingress => "--ingress-port",
            Role::Filter => "--filter-port",
        };
        Self::start_on(files, flag, free_port()).await
    }

    /// Starts the oracle's in-memory channel fan-out alone on `port` (channels of the
    /// manifests at `/<namespace>/<name>`).
    pub async fn start_channel(files: &[(&str, String)], port: u16) -> OracleProc {
        Self::start_on(files, "--channel-port", port).await
    }

    /// Starts the oracle with one server, `port_flag` (`--ingress-port`, `--filter-port` or
    /// `--channel-port`), on `port`.
    pub async fn start_on(files: &[(&str, String)], port_flag: &str, port: u16) -> OracleProc {
        let on = |flag: &str| if flag == port_flag { port } else { 0 };
        Self::start_ports(
            files,
            on("--ingress-port"),
            on("--filter-port"),
            on("--channel-port"),
        )
        .await
    }

    pub fn url(&self, path: &str) -> String {
        format!("http://127.0.0.1:{}{}", self.port, path)
    }

    pub fn logs(&self) -> String {
        std::fs::read_to_string(&self.log_path).unwrap_or_default()
    }
}

impl Drop for OracleProc {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

/// A drop-in data plane under test: `broker-shm ingress|filter` or the oracle in the same role.
pub enum DropIn {
    Shm(BrokerProc),
    Knative(OracleProc),
}

impl DropIn {
    pub async fn start(imp: Impl, role: Role, files: &[(&str, String)]) -> DropIn {
        match imp {
            Impl::BrokerShm => {
                let mode = match role {
                    Role::Ingress => "ingress",
                    Role::Filter => "filter",
                };
                DropIn::Shm(BrokerProc::start(files, &[mode], &[]).await)
            }
            Impl::Knative => DropIn::Knative(OracleProc::start(files, role).await),
        }
    }

    pub fn url(&self, path: &str) -> String {
        match self {
            DropIn::Shm(p) => p.url(path),
            DropIn::Knative(p) => p.url(path),
        }
    }

    pub fn logs(&self) -> String {
        match self {
            DropIn::Shm(p) => p.logs(),
            DropIn::Knative(p) => p.logs(),
        }
    }

    /// The watched manifest directory.
    pub fn manifests(&self) -> &Path {
        match self {
            DropIn::Shm(p) => &p.manifests,
            DropIn::Knative(p) => &p.manifests,
        }
    }

    /// Writes (atomically, by rename) or replaces a manifest file.
    pub fn write_manifest(&self, name: &str, yaml: &str) {
        write_manifest_in(self.manifests(), name, yaml);
    }

    pub fn remove_manifest(&self, name: &str) {
        std::fs::remove_file(self.manifests().join(name)).expect("remove manifest");
    }

    pub fn assert_alive(&mut self) {
        let (name, child) = match self {
            DropIn::Shm(p) => ("broker-shm", &mut p.child),
            DropIn::Knative(p) => ("knative-broker-oracle", &mut p.child),
        };
        let exited = child.try_wait().expect("try_wait");
        assert!(exited.is_none(), "{name} died: {}", self.logs());
    }
}

/// `spec.delivery` of a Broker or Trigger as a user writes it (C.6).
#[derive(Debug, Clone, Default)]
pub struct DeliveryDesc {
    pub retry: Option<u32>,
    /// `linear` or `exponential`.
    pub backoff_policy: Option<&'static str>,
    /// ISO-8601, e.g. `PT0.05S`.
    pub backoff_delay: Option<&'static str>,
    /// URI of the dead-letter sink.
    pub dead_letter_sink: Option<String>,
    /// `json` (structured) or `binary`.
    pub format: Option<&'static str>,
    /// ISO-8601 per-request timeout.
    pub timeout: Option<&'static str>,
}

impl DeliveryDesc {
    /// `delivery:` and its fields, `indent` spaces in.
    fn yaml(&self, indent: usize) -> String {
        let pad = " ".repeat(indent);
        let mut out = format!("{pad}delivery:\n");
        if let Some(r) = self.retry {
            out += &format!("{pad}  retry: {r}\n");
        }
        if let Some(p) = self.backoff_policy {
            out += &format!("{pad}  backoffPolicy: {p}\n");
        }
        if let Some(d) = self.backoff_delay {
            out += &format!("{pad}  backoffDelay: {d}\n");
        }
        if let Some(s) = &self.dead_letter_sink {
            out += &format!("{pad}  deadLetterSink:\n{pad}    uri: {s}\n");
        }
        if let Some(t) = self.timeout {
            out += &format!("{pad}  timeout: {t}\n");
        }
        if let Some(f) = self.format {
            out += &format!("{pad}  format: {f}\n");
        }
        out
    }
}

/// A Trigger as a user writes it: `spec.filters` elements in YAML flow style (e.g.
/// `exact: {type: start}`), an HTTP subscriber URI and an optional delivery. Its uid is
/// `uid-<name>`.
#[derive(Debug, Clone)]
pub struct TriggerDesc {
    pub name: String,
    pub filters: Vec<String>,
    pub subscriber: String,
    pub delivery: Option<DeliveryDesc>,
}

/// A Broker and its Triggers as a user writes them, turned into the manifests each
/// implementation serves: broker-shm's own class (`spright_manifests`) or the objects Knative's
/// MT broker controllers leave in a cluster (`stock_manifests`, for one knative-broker-oracle
/// process running ingress, in-memory channel and filter).
#[derive(Debug, Clone)]
pub struct BrokerDesc {
    pub ns: String,
    pub name: String,
    pub delivery: Option<DeliveryDesc>,
    pub triggers: Vec<TriggerDesc>,
    /// Knative only: the InMemoryChannel fans out asynchronously (annotation
    /// `messaging.knative.dev/async-handler: "true"`); by default it answers after delivery.
    pub async_channel: bool,
}

/// Knative's stock Services (contract C.1, C.2); the oracle dials them on its own ports.
pub const STOCK_INGRESS_HOST: &str = "broker-ingress.knative-eventing.svc.cluster.local";
pub const STOCK_FILTER_HOST: &str = "broker-filter.knative-eventing.svc.cluster.local";

impl BrokerDesc {
    fn trigger_yaml(&self, t: &TriggerDesc, status: &str) -> String {
        let mut spec = String::new();
        if !t.filters.is_empty() {
            spec += "  filters:\n";
            for f in &t.filters {
                spec += &format!("    - {f}\n");
            }
        }
        if let Some(d) = &t.delivery {
            spec += &d.yaml(2);
        }
        format!(
            "apiVersion: eventing.knative.dev/v1\nkind: Trigger\nmetadata:\n  name: {name}\n  namespace: {ns}\n  uid: uid-{name}\nspec:\n  broker: {broker}\n  subscriber:\n    uri: {sub}\n{spec}{status}",
            name = t.name,
            ns = self.ns,
            broker = self.name,
            sub = t.subscriber,
        )
    }

    fn broker_yaml(&self, class: &str, status: &str) -> String {
        let delivery = self
            .delivery
            .as_ref()
            .map(|d| d.yaml(2))
            .unwrap_or_default();
        format!(
            "apiVersion: eventing.knative.dev/v1\nkind: Broker\nmetadata:\n  name: {name}\n  namespace: {ns}\n  annotations:\n    eventing.knative.dev/broker.class: {class}\nspec:\n{delivery}{status}",
            name = self.name,
            ns = self.ns,
        )
    }

    /// broker-shm's native mode: a Broker of class SprightBroker and the Triggers as written.
    pub fn spright_manifests(&self) -> Vec<(String, String)> {
        let mut files = vec![(
            "broker.yaml".to_string(),
            self.broker_yaml("SprightBroker", ""),
        )];
        for t in &self.triggers {
            files.push((format!("trigger-{}.yaml", t.name), self.trigger_yaml(t, "")));
        }
        files
    }

    /// The in-memory channel's address as the oracle serves it (path-keyed: the oracle has no
    /// cluster DNS for `<broker>-kne-trigger-kn-channel.<ns>.svc.cluster.local`; Knative's IMC
    /// dispatcher serves the same `/<ns>/<name>` path form too).
    pub fn stock_channel_url(&self, channel_port: u16) -> String {
        format!(
            "http://127.0.0.1:{channel_port}/{}/{}-kne-trigger",
            self.ns, self.name
        )
    }

    /// What Knative's controllers leave for this Broker (class MTChannelBasedBroker, OIDC and
    /// transport encryption off): the Broker with `status.address` on the stock ingress Service
    /// and the channel address in `status.annotations`; each Trigger with
    /// `status.subscriberUri` (and `status.deadLetterSinkUri`); the Broker's InMemoryChannel
    /// `<broker>-kne-trigger` with one `spec.subscribers` entry per Trigger as the Subscription
    /// reconciler writes it (pkg/reconciler/broker/trigger/trigger.go
    /// subscribeToBrokerChannel): subscriberUri = the filter's `/triggers/<ns>/<name>/<uid>`,
    /// replyUri = the Broker's address, delivery = the Trigger's, else the Broker's (which
    /// Knative's webhook defaults from config-br-defaults: retry 10, exponential, PT0.2S).
    pub fn stock_manifests(&self, channel_port: u16) -> Vec<(String, String)> {
        let broker_url = format!("http://{STOCK_INGRESS_HOST}/{}/{}", self.ns, self.name);
        let broker_dls = self
            .delivery
            .as_ref()
            .and_then(|d| d.dead_letter_sink.clone());
        let mut status = format!(
            "status:\n  address:\n    url: {broker_url}\n  annotations:\n    knative.dev/channelAddress: {}\n",
            self.stock_channel_url(channel_port)
        );
        if let Some(dls) = &broker_dls {
            status += &format!("  deadLetterSinkUri: {dls}\n");
        }
        let mut files = vec![(
            "broker.yaml".to_string(),
            self.broker_yaml("MTChannelBasedBroker", &status),
        )];
        let stock_default = DeliveryDesc {
            retry: Some(10),
            backoff_policy: Some("exponential"),
            backoff_delay: Some("PT0.2S"),
            ..DeliveryDesc::default()
        };
        let mut subscribers = String::new();
        for t in &self.triggers {
            let dls = t
                .delivery
                .as_ref()
                .and_then(|d| d.dead_letter_sink.clone())
                .or_else(|| broker_dls.clone());
            let mut status = format!("status:\n  subscriberUri: {}\n", t.subscriber);
            if let Some(dls) = &dls {
                status += &format!("  deadLetterSinkUri: {dls}\n");
            }
            files.push((
                format!("trigger-{}.yaml", t.name),
                self.trigger_yaml(t, &status),
            ));
            let delivery = t
                .delivery
                .as_ref()
                .or(self.delivery.as_ref())
                .unwrap_or(&stock_default);
            subscribers += &format!(
                "    - uid: sub-{name}\n      generation: 1\n      subscriberUri: http://{STOCK_FILTER_HOST}/triggers/{ns}/{name}/uid-{name}\n      replyUri: {broker_url}\n{delivery}",
                name = t.name,
                ns = self.ns,
                delivery = delivery.yaml(6),
            );
        }
        if subscribers.is_empty() {
            subscribers = "    []\n".to_string();
        }
        let async_annotation = match self.async_channel {
            true => "  annotations:\n    messaging.knative.dev/async-handler: \"true\"\n",
            false => "",
        };
        files.push((
            "channel.yaml".to_string(),
            format!(
                "apiVersion: messaging.knative.dev/v1\nkind: InMemoryChannel\nmetadata:\n  name: {}-kne-trigger\n  namespace: {}\n  uid: imc-{}\n{async_annotation}spec:\n  subscribers:\n{subscribers}",
                self.name, self.ns, self.name
            ),
        ));
        files
    }
}

impl OracleProc {
    /// Starts the oracle with the ingress, filter and channel servers on the given ports (0
    /// disables one) and waits until every enabled one answers; `port` is the first enabled
    /// of ingress, filter, channel. Fails (never skips) when the binary is missing. With all
    /// three it is Knative's whole MT broker topology in one process; it dials the stock
    /// Service names (`STOCK_INGRESS_HOST`, `STOCK_FILTER_HOST`, port 80) on its own ingress
    /// and filter ports.
    pub async fn start_ports(
        files: &[(&str, String)],
        ingress: u16,
        filter: u16,
        channel: u16,
    ) -> OracleProc {
        let bin = oracle_bin();
        assert!(
            bin.is_file(),
            "Knative's broker oracle is missing at {}: run scripts/setup.sh (it builds \
             oracle/knative-broker into $GOBIN/knative-broker-oracle)",
            bin.display()
        );
        let tmp = tempfile::tempdir().expect("tempdir");
        let manifests = tmp.path().join("manifests");
        std::fs::create_dir_all(&manifests).expect("mkdir");
        for (name, yaml) in files {
            std::fs::write(manifests.join(name), yaml).expect("write manifest");
        }
        let log_path = tmp.path().join("oracle.log");
        let log = std::fs::File::create(&log_path).expect("log file");
        let ports = [ingress, filter, channel];
        let mut cmd = Command::new(&bin);
        cmd.arg("--manifests").arg(&manifests);
        for (flag, p) in ["--ingress-port", "--filter-port", "--channel-port"]
            .iter()
            .zip(ports)
        {
            cmd.arg(flag).arg(p.to_string());
        }
        let child = cmd
            .env_remove("INGRESS_PORT")
            .env_remove("FILTER_PORT")
            .env_remove("MAX_TTL")
            .stdout(Stdio::null())
            .stderr(Stdio::from(log))
            .spawn()
            .unwrap_or_else(|e| panic!("spawn {}: {e}", bin.display()));
        let mut p = OracleProc {
            child,
            port: ports.into_iter().find(|p| *p != 0).unwrap_or(0),
            manifests,
            log_path,
            _tmp: tmp,
        };
        // Knative's receiver answers kubelet probes on any path once it listens.
        let probe = [("user-agent", "kube-probe/1.30")];
        for port in ports.into_iter().filter(|p| *p != 0) {
            let url = format!("http://127.0.0.1:{port}/healthz");
            wait_ready(
                &mut p.child,
                "knative-broker-oracle",
                &url,
                &probe,
                &p.log_path,
            )
            .await;
        }
        p
    }
}

/// A whole broker as a user sees it, from the Broker's address to the subscribers: broker-shm
/// in native mode (class SprightBroker) or Knative's MT broker topology (ingress -> in-memory
/// channel -> filter -> subscriber) in one oracle process.
pub enum EndToEnd {
    Shm(BrokerProc),
    Knative(OracleProc),
}

impl EndToEnd {
    pub async fn start(imp: Impl, desc: &BrokerDesc) -> EndToEnd {
        match imp {
            Impl::BrokerShm => {
                let owned = desc.spright_manifests();
                let files: Vec<(&str, String)> =
                    owned.iter().map(|(n, y)| (n.as_str(), y.clone())).collect();
                EndToEnd::Shm(BrokerProc::start(&files, &[], &[]).await)
            }
            Impl::Knative => {
                let (ingress, filter, channel) = (free_port(), free_port(), free_port());
                let owned = desc.stock_manifests(channel);
                let files: Vec<(&str, String)> =
                    owned.iter().map(|(n, y)| (n.as_str(), y.clone())).collect();
                EndToEnd::Knative(OracleProc::start_ports(&files, ingress, filter, channel).await)
            }
        }
    }

    /// The Broker's address as a client outside the cluster reaches it.
    pub fn broker_url(&self, desc: &BrokerDesc) -> String {
        let path = format!("/{}/{}", desc.ns, desc.name);
        match self {
            EndToEnd::Shm(p) => p.url(&path),
            EndToEnd::Knative(p) => p.url(&path),
        }
    }

    pub fn logs(&self) -> String {
        match self {
            EndToEnd::Shm(p) => p.logs(),
            EndToEnd::Knative(p) => p.logs(),
        }
    }

    pub fn assert_alive(&mut self) {
        let (name, child) = match self {
            EndToEnd::Shm(p) => ("broker-shm", &mut p.child),
            EndToEnd::Knative(p) => ("knative-broker-oracle", &mut p.child),
        };
        let exited = child.try_wait().expect("try_wait");
        assert!(exited.is_none(), "{name} died: {}", self.logs());
    }
}
