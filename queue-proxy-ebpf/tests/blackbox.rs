//! Black-box cases for ours alone, where Knative's queue-proxy cannot be run the same way.

mod common;

use std::collections::BTreeMap;
use std::time::{Duration, Instant};

use common::*;
use spright_test_support::TestDir;
use spright_test_support::tls;

/// The serving port over TLS when the certificate files exist. Not differential: Knative
/// reads them from the fixed /var/lib/knative/certs, which a test must not write; ours takes
/// the directory from `QUEUE_CERT_DIR` (default the same path).
#[test]
fn tls_serving_port() {
    let _g = port_lock();
    let up = Upstream::start();
    let dir = TestDir::new("qp-tls");
    tls::self_signed(dir.path(), "tls", "localhost");
    let mut env = knative_env(up.port);
    env.insert("QUEUE_CERT_DIR".into(), dir.path().display().to_string());
    let tls_port = &env["QUEUE_SERVING_TLS_PORT"];
    let url = format!("https://127.0.0.1:{tls_port}/echo");
    let p = start(Impl::Ours, &env, None);
    let mut answered = None;
    for _ in 0..50 {
        let out = std::process::Command::new("curl")
            .args([
                "-sk",
                "--max-time",
                "5",
                "-o",
                "-",
                "-w",
                "\n%{http_code} %{http_version}",
                &url,
            ])
            .output()
            .expect("curl");
        let text = String::from_utf8_lossy(&out.stdout).into_owned();
        if out.status.success() {
            answered = Some(text);
            break;
        }
        std::thread::sleep(Duration::from_millis(50));
    }
    let text = answered.expect("TLS answer");
    assert!(text.ends_with("200 2"), "{text}");
    assert!(text.contains("\"uri\""), "{text}");
    // The plain serving port stays open as well.
    assert_eq!(get(p.ports.serving, "/echo", &[]).status, 200);
}

/// What each thread of `pid` has done so far, by thread id: how often it blocked (voluntary
/// context switches: one per wake-up, whatever woke it) and how long it ran (ns on a CPU,
/// `/proc/<pid>/task/<tid>/schedstat`). A sleeping thread that nothing wakes changes neither,
/// however loaded the machine is; a timer changes both, a busy loop the second.
fn thread_activity(pid: u32) -> BTreeMap<String, (u64, u64)> {
    let tasks = std::fs::read_dir(format!("/proc/{pid}/task")).expect("list /proc/<pid>/task");
    let mut out = BTreeMap::new();
    for task in tasks.filter_map(Result::ok) {
        // A thread that exits between the listing and the reads is left out.
        let (Ok(status), Ok(schedstat)) = (
            std::fs::read_to_string(task.path().join("status")),
            std::fs::read_to_string(task.path().join("schedstat")),
        ) else {
            continue;
        };
        let name = status
            .lines()
            .find_map(|l| l.strip_prefix("Name:"))
            .unwrap_or_default()
            .trim();
        let switches = status
            .lines()
            .find_map(|l| l.strip_prefix("voluntary_ctxt_switches:"))
            .and_then(|v| v.trim().parse().ok())
            .expect("voluntary_ctxt_switches in /proc/<pid>/task/<tid>/status");
        let ran = schedstat
            .split_whitespace()
            .next()
            .and_then(|v| v.parse().ok())
            .expect("run time in /proc/<pid>/task/<tid>/schedstat");
        let tid = task.file_name().to_string_lossy().into_owned();
        out.insert(format!("{tid} ({name})"), (switches, ran));
    }
    out
}

/// The threads whose activity differs between two samples (one that exited in between is
/// not activity: a pool retiring an idle thread once is no polling; one that appeared is).
fn woken(
    before: &BTreeMap<String, (u64, u64)>,
    after: &BTreeMap<String, (u64, u64)>,
) -> Vec<String> {
    after
        .iter()
        .filter(|(tid, now)| before.get(*tid) != Some(now))
        .map(|(tid, (switches, ran))| {
            let (s0, r0) = before.get(tid).copied().unwrap_or_default();
            format!(
                "{tid}: {} wake-ups, {} µs on a CPU",
                switches - s0,
                (ran - r0) / 1000
            )
        })
        .collect()
}

/// Idle means idle: with nothing to do, no thread of the process wakes up (no polling
/// timers, no busy loops). Start-up ends first: the test waits (up to 30 s) until a whole
/// second passes without a wake-up, so a loaded machine only makes it wait longer; a timer of
/// 1 s or shorter never lets that happen, and one of up to 3 s then shows in the window.
/// Nothing talks to the process meanwhile: its ports are this test's own.
#[test]
fn idle_process_sleeps() {
    let _g = port_lock();
    let up = Upstream::start();
    let p = start(Impl::Ours, &knative_env(up.port), None);
    assert_eq!(get(p.ports.serving, "/echo", &[]).status, 200);
    let pid = p.child.id();
    let give_up = Instant::now() + Duration::from_secs(30);
    let mut last = thread_activity(pid);
    let mut quiet_since = Instant::now();
    while quiet_since.elapsed() < Duration::from_secs(1) {
        std::thread::sleep(Duration::from_millis(250));
        let now = thread_activity(pid);
        let busy = woken(&last, &now);
        assert!(
            Instant::now() < give_up,
            "never a quiet second in 30 s after start-up: {busy:?}"
        );
        if !busy.is_empty() {
            quiet_since = Instant::now();
        }
        last = now;
    }
    let before = thread_activity(pid);
    std::thread::sleep(Duration::from_secs(3));
    let busy = woken(&before, &thread_activity(pid));
    assert!(busy.is_empty(), "threads woke up while idle: {busy:?}");
}

/// The controller runs the sidecar as non-root with every capability dropped; it must start
/// and serve like that. (Needs root to switch to uid 65534 with setpriv from util-linux.)
#[test]
fn runs_as_nobody_without_capabilities() {
    let _g = port_lock();
    let up = Upstream::start();
    let env = knative_env(up.port);
    let serving: u16 = env["QUEUE_SERVING_PORT"].parse().expect("port");
    let mut child = std::process::Command::new("setpriv")
        .args([
            "--reuid=65534",
            "--regid=65534",
            "--clear-groups",
            "--inh-caps=-all",
            "--bounding-set=-all",
            "--no-new-privs",
        ])
        .arg(OURS)
        .env_clear()
        .envs(&env)
        .env("QUEUE_ADMIN_PORT", free_port().to_string())
        .env("QUEUE_AUTOSCALING_METRICS_PORT", free_port().to_string())
        .current_dir("/")
        .stdout(std::process::Stdio::null())
        .stderr(std::process::Stdio::piped())
        .spawn()
        .expect(
            "setpriv (util-linux) must be installed; this test needs root to drop to uid 65534",
        );
    let mut status = 0;
    for _ in 0..100 {
        if let Ok(Some(s)) = child.try_wait() {
            panic!("exited as uid 65534: {s}");
        }
        if let Ok(a) = runtime().block_on(send(serving, "GET", "/echo", &[], false)) {
            status = a.status;
            break;
        }
        std::thread::sleep(Duration::from_millis(50));
    }
    let _ = child.kill();
    let _ = child.wait();
    assert_eq!(status, 200);
}

/// Kept difference from Knative: with containerConcurrency 1, queued requests are served in
/// arrival order (Knative's breaker lets later requests overtake waiting ones).
#[test]
fn breaker_serves_in_arrival_order() {
    let _g = port_lock();
    let up = Upstream::start();
    let mut env = knative_env(up.port);
    env.insert("CONTAINER_CONCURRENCY".into(), "1".into());
    let p = start(Impl::Ours, &env, None);
    let port = p.ports.serving;
    let order = runtime().block_on(async {
        let done = std::sync::Arc::new(std::sync::Mutex::new(Vec::new()));
        let mut hs = Vec::new();
        for i in 0..8 {
            let done = std::sync::Arc::clone(&done);
            hs.push(tokio::spawn(async move {
                let a = send(port, "GET", "/sleep?ms=120", &[], false).await;
                if a.is_ok_and(|a| a.status == 200) {
                    done.lock().expect("lock").push(i);
                }
            }));
            // Each request is queued before the next one is sent.
            tokio::time::sleep(Duration::from_millis(50)).await;
        }
        for h in hs {
            h.await.expect("join");
        }
        done.lock().expect("lock").clone()
    });
    assert_eq!(order, (0..8).collect::<Vec<_>>());
}

/// One connection that starts on the fast path (plain keep-alive requests) and then asks
/// for a websocket upgrade: the connection is handed to hyper with the bytes already read,
/// and the upgraded stream echoes. Not differential: the hand-over is ours alone.
#[test]
fn fast_path_hands_the_connection_to_hyper() {
    let _g = port_lock();
    let up = Upstream::start();
    let p = start(Impl::Ours, &knative_env(up.port), None);
    let port = p.ports.serving;
    runtime().block_on(async move {
        use tokio::io::{AsyncReadExt, AsyncWriteExt};
        let mut s = tokio::net::TcpStream::connect(("127.0.0.1", port))
            .await
            .expect("connect");
        let mut got = Vec::new();
        let mut buf = [0u8; 4096];
        for _ in 0..2 {
            s.write_all(b"GET /status?code=201 HTTP/1.1\r\nHost: a\r\n\r\n")
                .await
                .expect("write");
            got.clear();
            while !got.ends_with(b"status 201") {
                let n = tokio::time::timeout(Duration::from_secs(5), s.read(&mut buf))
                    .await
                    .expect("in time")
                    .expect("read");
                assert!(n > 0, "closed after {:?}", String::from_utf8_lossy(&got));
                got.extend_from_slice(&buf[..n]);
            }
            assert!(got.starts_with(b"HTTP/1.1 201 Created\r\n"));
        }
        // The upgrade request and the first websocket bytes in one write.
        s.write_all(
            b"GET /ws HTTP/1.1\r\nHost: a\r\nConnection: Upgrade\r\nUpgrade: websocket\r\n\r\n",
        )
        .await
        .expect("write");
        got.clear();
        while !got.windows(4).any(|w| w == b"\r\n\r\n") {
            let n = s.read(&mut buf).await.expect("read");
            assert!(n > 0);
            got.extend_from_slice(&buf[..n]);
        }
        assert!(
            got.starts_with(b"HTTP/1.1 101 "),
            "{:?}",
            String::from_utf8_lossy(&got)
        );
        s.write_all(b"ping").await.expect("write");
        let mut echo = [0u8; 4];
        tokio::time::timeout(Duration::from_secs(5), s.read_exact(&mut echo))
            .await
            .expect("in time")
            .expect("echo");
        assert_eq!(&echo, b"ping");
    });
}
