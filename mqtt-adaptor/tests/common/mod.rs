//! Test harness: a real mosquitto on a free loopback port, a recording HTTP sink, the adaptor
//! binary, and an MQTT test client. Every child process is killed on drop.
#![allow(dead_code)]

use std::collections::HashMap;
use std::convert::Infallible;
use std::io::Read;
use std::net::{SocketAddr, TcpStream};
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::sync::atomic::{AtomicU16, AtomicU64, AtomicUsize, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use bytes::Bytes;
use http_body_util::{BodyExt, Full};
use hyper_util::rt::{TokioExecutor, TokioIo};

pub use spright_test_support::free_port;

static DIRS: AtomicUsize = AtomicUsize::new(0);

/// A fresh temp directory (removed on drop).
pub struct TempDir(pub PathBuf);
impl TempDir {
    pub fn new(tag: &str) -> Self {
        let d = std::env::temp_dir().join(format!(
            "mqtt-adaptor-test-{}-{}-{tag}",
            std::process::id(),
            DIRS.fetch_add(1, Ordering::Relaxed)
        ));
        let _ = std::fs::remove_dir_all(&d);
        std::fs::create_dir_all(&d).expect("temp dir");
        TempDir(d)
    }
    pub fn path(&self, name: &str) -> PathBuf {
        self.0.join(name)
    }
}
impl Drop for TempDir {
    fn drop(&mut self) {
        let _ = std::fs::remove_dir_all(&self.0);
    }
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

/// A mosquitto broker with a temp config.
pub struct Mosquitto {
    pub port: u16,
    pub dir: TempDir,
    child: Child,
}

impl Mosquitto {
    /// Anonymous plain listener on a free port; `extra` is appended to the config.
    pub fn start(extra: &str) -> Self {
        let port = free_port();
        Self::start_with(
            &format!("listener {port} 127.0.0.1\nallow_anonymous true\n{extra}"),
            port,
        )
    }

    /// Full listener config; `port` is the one to wait for.
    pub fn start_with(listeners: &str, port: u16) -> Self {
        let dir = TempDir::new("mosquitto");
        let conf = dir.path("mosquitto.conf");
        let text = format!(
            "persistence false\nmax_queued_messages 100000\nmax_inflight_messages 100\nlog_dest stderr\nlog_type error\n{listeners}\n"
        );
        std::fs::write(&conf, text).expect("write mosquitto.conf");
        let child = Command::new("/usr/sbin/mosquitto")
            .arg("-c")
            .arg(&conf)
            .stdout(Stdio::null())
            .stderr(Stdio::null())
            .spawn()
            .expect("start mosquitto (apt-get install mosquitto)");
        assert!(
            wait_port(port, Duration::from_secs(10)),
            "mosquitto did not listen"
        );
        Mosquitto { port, dir, child }
    }
}

impl Drop for Mosquitto {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

/// One request the sink saw.
#[derive(Debug, Clone)]
pub struct Received {
    pub headers: http::HeaderMap,
    pub body: Bytes,
}

impl Received {
    pub fn header(&self, name: &str) -> Option<String> {
        self.headers
            .get(name)
            .and_then(|v| v.to_str().ok())
            .map(str::to_owned)
    }
}

/// A recording HTTP sink whose answer can be changed at run time.
#[derive(Clone)]
pub struct Sink {
    pub addr: SocketAddr,
    pub status: Arc<AtomicU16>,
    pub delay_ms: Arc<AtomicU64>,
    /// Accepted (2xx) requests only.
    pub accepted: Arc<Mutex<Vec<Received>>>,
    pub attempts: Arc<AtomicUsize>,
}

impl Sink {
    pub async fn start() -> Self {
        let listener = tokio::net::TcpListener::bind("127.0.0.1:0")
            .await
            .expect("bind sink");
        let sink = Sink {
            addr: listener.local_addr().expect("addr"),
            status: Arc::new(AtomicU16::new(202)),
            delay_ms: Arc::new(AtomicU64::new(0)),
            accepted: Arc::new(Mutex::new(Vec::new())),
            attempts: Arc::new(AtomicUsize::new(0)),
        };
        let s = sink.clone();
        tokio::spawn(async move {
            loop {
                let Ok((stream, _)) = listener.accept().await else {
                    continue;
                };
                let s = s.clone();
                tokio::spawn(async move {
                    let svc = hyper::service::service_fn(
                        move |req: http::Request<hyper::body::Incoming>| {
                            let s = s.clone();
                            async move {
                                let (parts, body) = req.into_parts();
                                let body = body
                                    .collect()
                                    .await
                                    .map(|b| b.to_bytes())
                                    .unwrap_or_default();
                                s.attempts.fetch_add(1, Ordering::Relaxed);
                                let delay = s.delay_ms.load(Ordering::Relaxed);
                                if delay > 0 {
                                    tokio::time::sleep(Duration::from_millis(delay)).await;
                                }
                                let status = s.status.load(Ordering::Relaxed);
                                if (200..300).contains(&status) {
                                    s.accepted.lock().unwrap().push(Received {
                                        headers: parts.headers,
                                        body,
                                    });
                                }
                                let mut r = http::Response::new(Full::new(Bytes::new()));
                                *r.status_mut() = http::StatusCode::from_u16(status).unwrap();
                                Ok::<_, Infallible>(r)
                            }
                        },
                    );
                    let _ = hyper_util::server::conn::auto::Builder::new(TokioExecutor::new())
                        .serve_connection(TokioIo::new(stream), svc)
                        .await;
                });
            }
        });
        sink
    }

    pub fn url(&self) -> String {
        format!("http://{}/", self.addr)
    }

    pub fn count(&self) -> usize {
        self.accepted.lock().unwrap().len()
    }

    pub fn snapshot(&self) -> Vec<Received> {
        self.accepted.lock().unwrap().clone()
    }

    /// Waits until `pred` holds for the accepted requests.
    pub async fn wait_for(&self, timeout: Duration, pred: impl Fn(&[Received]) -> bool) -> bool {
        let deadline = Instant::now() + timeout;
        while Instant::now() < deadline {
            if pred(&self.accepted.lock().unwrap()) {
                return true;
            }
            tokio::time::sleep(Duration::from_millis(50)).await;
        }
        false
    }
}

/// Distinct bodies among the accepted requests, and how often each arrived.
pub fn body_counts(r: &[Received]) -> HashMap<Vec<u8>, usize> {
    let mut m = HashMap::new();
    for x in r {
        *m.entry(x.body.to_vec()).or_insert(0) += 1;
    }
    m
}

/// The adaptor binary, killed on drop.
pub struct Adaptor {
    pub http_port: u16,
    child: Option<Child>,
    pub log: PathBuf,
    args: Vec<String>,
    envs: Vec<(String, String)>,
}

impl Adaptor {
    pub fn start(args: &[&str], envs: &[(&str, &str)], log: &Path) -> Self {
        let mut a = Adaptor {
            http_port: free_port(),
            child: None,
            log: log.to_owned(),
            args: args.iter().map(|s| s.to_string()).collect(),
            envs: envs
                .iter()
                .map(|(k, v)| (k.to_string(), v.to_string()))
                .collect(),
        };
        a.spawn();
        a
    }

    /// Starts the adaptor as a source of `topic` on `broker_port` posting to `sink`, with
    /// `extra` arguments, and waits until it is ready.
    pub fn source_ready(
        broker_port: u16,
        topic: &str,
        client_id: &str,
        extra: &[&str],
        sink: &str,
        log: &Path,
    ) -> Self {
        let broker = format!("mqtt://127.0.0.1:{broker_port}");
        let mut args = vec![
            "--broker",
            &broker,
            "--topic",
            topic,
            "--client-id",
            client_id,
        ];
        args.extend_from_slice(extra);
        let mut a = Self::start(&args, &[("K_SINK", sink)], log);
        assert!(
            a.wait_ready(Duration::from_secs(20)),
            "not ready: {}",
            a.logs()
        );
        a
    }

    fn spawn(&mut self) {
        let log = std::fs::OpenOptions::new()
            .create(true)
            .append(true)
            .open(&self.log)
            .expect("log file");
        let mut cmd = Command::new(env!("CARGO_BIN_EXE_mqtt-adaptor"));
        cmd.args(&self.args)
            .arg("--http-port")
            .arg(self.http_port.to_string())
            .arg("--http-address")
            .arg("127.0.0.1")
            .env_remove("K_SINK")
            .env_remove("K_CE_OVERRIDES")
            .env_remove("K_CA_CERTS")
            .env_remove("MQTT_BROKER")
            .env("MQTT_OIDC_TOKEN_FILE", "/nonexistent/oidc/token")
            .stdout(Stdio::null())
            .stderr(log);
        for (k, v) in &self.envs {
            cmd.env(k, v);
        }
        self.child = Some(cmd.spawn().expect("start mqtt-adaptor"));
    }

    /// SIGKILL (no drain), then start again with the same arguments.
    pub fn kill(&mut self) {
        if let Some(mut c) = self.child.take() {
            let _ = c.kill();
            let _ = c.wait();
        }
    }

    pub fn restart(&mut self) {
        self.kill();
        self.spawn();
    }

    pub fn exited(&mut self) -> Option<i32> {
        self.child
            .as_mut()
            .and_then(|c| c.try_wait().ok().flatten())
            .and_then(|s| s.code())
    }

    pub fn logs(&self) -> String {
        let mut s = String::new();
        if let Ok(mut f) = std::fs::File::open(&self.log) {
            let _ = f.read_to_string(&mut s);
        }
        s
    }

    /// GET a path on the adaptor's HTTP port: (status, body).
    pub fn get(&self, path: &str) -> Option<(u16, String)> {
        http_get(self.http_port, path)
    }

    pub fn wait_ready(&mut self, timeout: Duration) -> bool {
        let deadline = Instant::now() + timeout;
        while Instant::now() < deadline {
            if let Some((200, _)) = self.get("/readyz") {
                return true;
            }
            if self.exited().is_some() {
                return false;
            }
            std::thread::sleep(Duration::from_millis(50));
        }
        false
    }
}

impl Drop for Adaptor {
    fn drop(&mut self) {
        self.kill();
    }
}

/// Minimal blocking HTTP/1.0 GET.
pub fn http_get(port: u16, path: &str) -> Option<(u16, String)> {
    use std::io::Write;
    let mut s = TcpStream::connect(("127.0.0.1", port)).ok()?;
    s.set_read_timeout(Some(Duration::from_secs(5))).ok()?;
    write!(s, "GET {path} HTTP/1.0\r\nHost: x\r\n\r\n").ok()?;
    let mut out = String::new();
    s.read_to_string(&mut out).ok()?;
    let status = out.split_whitespace().nth(1)?.parse().ok()?;
    let body = out
        .split_once("\r\n\r\n")
        .map(|x| x.1)
        .unwrap_or("")
        .to_owned();
    Some((status, body))
}

/// An MQTT 3.1.1 test client (auto-acks) with its event loop on a task.
pub struct TestClient {
    pub client: rumqttc::AsyncClient,
    pub messages: Arc<Mutex<Vec<rumqttc::Publish>>>,
    pub acked: Arc<AtomicUsize>,
}

impl TestClient {
    pub async fn connect(port: u16, id: &str) -> Self {
        let mut o = rumqttc::MqttOptions::new(id, "127.0.0.1", port);
        o.set_keep_alive(Duration::from_secs(30)).set_inflight(100);
        let (client, mut el) = rumqttc::AsyncClient::new(o, 2000);
        let messages = Arc::new(Mutex::new(Vec::new()));
        let acked = Arc::new(AtomicUsize::new(0));
        let (m, a) = (messages.clone(), acked.clone());
        tokio::spawn(async move {
            loop {
                match el.poll().await {
                    Ok(rumqttc::Event::Incoming(rumqttc::Packet::Publish(p))) => {
                        m.lock().unwrap().push(p)
                    }
                    Ok(rumqttc::Event::Incoming(rumqttc::Packet::PubAck(_))) => {
                        a.fetch_add(1, Ordering::Relaxed);
                    }
                    Ok(_) => {}
                    Err(_) => tokio::time::sleep(Duration::from_millis(100)).await,
                }
            }
        });
        TestClient {
            client,
            messages,
            acked,
        }
    }

    /// Publishes at QoS 1 and waits until the broker acknowledged all of them.
    pub async fn publish_all(&self, msgs: &[(String, Vec<u8>)]) {
        let start = self.acked.load(Ordering::Relaxed);
        for (t, p) in msgs {
            self.client
                .publish(t.clone(), rumqttc::QoS::AtLeastOnce, false, p.clone())
                .await
                .expect("publish");
        }
        let deadline = Instant::now() + Duration::from_secs(60);
        while self.acked.load(Ordering::Relaxed) < start + msgs.len() {
            assert!(
                Instant::now() < deadline,
                "broker did not ack our publishes"
            );
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
    }
}
