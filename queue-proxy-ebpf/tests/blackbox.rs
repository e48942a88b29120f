//! Black-box cases for ours alone, where Knative's queue-proxy cannot be run the same way.

mod common;

use std::time::Duration;

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
    env.insert("QUEUE_SERVING_TLS_PORT".into(), "28112".into());
    let _p = start(Impl::Ours, &env, Some((28022, 29090)));
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
                "https://127.0.0.1:28112/echo",
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
    assert_eq!(get(SERVING_PORT, "/echo", &[]).status, 200);
}

/// Idle means idle: with nothing to do, the process uses no CPU (no polling timers).
#[test]
fn idle_process_sleeps() {
    let _g = port_lock();
    let up = Upstream::start();
    let env = knative_env(up.port);
    let p = start(Impl::Ours, &env, Some((28022, 29090)));
    get(SERVING_PORT, "/echo", &[]);
    let pid = p.child.id();
    let ticks = || {
        let s = std::fs::read_to_string(format!("/proc/{pid}/stat")).expect("stat");
        let rest = s
            .rsplit_once(')')
            .map(|(_, r)| r.to_owned())
            .unwrap_or_default();
        let f: Vec<u64> = rest
            .split_whitespace()
            .skip(11)
            .take(2)
            .filter_map(|v| v.parse().ok())
            .collect();
        f.iter().sum::<u64>()
    };
    let ctx = || {
        let s = std::fs::read_to_string(format!("/proc/{pid}/status")).expect("status");
        s.lines()
            .filter(|l| {
                l.starts_with("voluntary_ctxt_switches")
                    || l.starts_with("nonvoluntary_ctxt_switches")
            })
            .filter_map(|l| {
                l.split_whitespace()
                    .nth(1)
                    .and_then(|v| v.parse::<u64>().ok())
            })
            .sum::<u64>()
    };
    // Threads other than the main one, summed through /proc/<pid>/task.
    let task_switches = || {
        std::fs::read_dir(format!("/proc/{pid}/task"))
            .map(|d| {
                d.filter_map(Result::ok)
                    .filter_map(|t| std::fs::read_to_string(t.path().join("status")).ok())
                    .map(|s| {
                        s.lines()
                            .filter(|l| l.starts_with("voluntary_ctxt_switches"))
                            .filter_map(|l| {
                                l.split_whitespace()
                                    .nth(1)
                                    .and_then(|v| v.parse::<u64>().ok())
                            })
                            .sum::<u64>()
                    })
                    .sum::<u64>()
            })
            .unwrap_or(0)
    };
    // Let the closed client connection be reaped first.
    std::thread::sleep(Duration::from_millis(500));
    let (t0, c0, s0) = (ticks(), ctx(), task_switches());
    std::thread::sleep(Duration::from_secs(3));
    let (t1, c1, s1) = (ticks(), ctx(), task_switches());
    // No wake-ups at all while idle (a 1 s stats ticker would show 2 here).
    assert_eq!(s1 - s0, 0, "threads woke up while idle");
    assert_eq!(c1 - c0, 0);
    assert_eq!(t1 - t0, 0);
}

/// The controller runs the sidecar as non-root with every capability dropped; it must start
/// and serve like that. (Needs root to switch to uid 65534 with setpriv from util-linux.)
#[test]
fn runs_as_nobody_without_capabilities() {
    let _g = port_lock();
    let up = Upstream::start();
    let env = knative_env(up.port);
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
        .env("QUEUE_ADMIN_PORT", "28022")
        .env("QUEUE_AUTOSCALING_METRICS_PORT", "29090")
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
        if let Ok(a) = runtime().block_on(send(SERVING_PORT, "GET", "/echo", &[], false)) {
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
    let _p = start(Impl::Ours, &env, Some((28022, 29090)));
    let order = runtime().block_on(async {
        let done = std::sync::Arc::new(std::sync::Mutex::new(Vec::new()));
        let mut hs = Vec::new();
        for i in 0..8 {
            let done = std::sync::Arc::clone(&done);
            hs.push(tokio::spawn(async move {
                let a = send(SERVING_PORT, "GET", "/sleep?ms=120", &[], false).await;
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
