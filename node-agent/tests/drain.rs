//! Drain in event-driven mode, on the real kernel: the kernel steers the serving port straight to
//! the user container, so the sidecar never sees those requests; `/wait-for-drain` and the
//! SIGTERM drain must still wait until the kernel's count of requests in flight is zero, plus
//! the quiet period.
//!
//! A pod is a network namespace (with a veth pair to this namespace) plus a cgroup v2
//! directory, both made and removed here. Its user container is this binary run as
//! `drain user <port>` inside them: it answers `GET /hold` only once the test writes a line to
//! its stdin, and reports each held request with its peer address, so the test can see that the
//! request came straight from the client (steered) and not from the sidecar.
//!
//! Needs root (CAP_BPF, CAP_NET_ADMIN, CAP_SYS_ADMIN), iproute2 and cgroup v2 at
//! /sys/fs/cgroup/unified; without them the tests fail with the reason. The sidecar is
//! queue-proxy-ebpf's binary from the same target directory (`cargo test --workspace` builds
//! it; otherwise `cargo build -p queue-proxy-ebpf` first). SPRIGHT_TEST_LOG=1 shows the
//! sidecars' and agents' logs.

use std::ffi::CString;
use std::io::{BufRead, BufReader, Read, Write};
use std::net::{Ipv4Addr, SocketAddr, TcpListener, TcpStream};
use std::os::unix::process::CommandExt;
use std::path::{Path, PathBuf};
use std::process::{Child, ChildStdin, ChildStdout, Command, ExitCode, Stdio};
use std::sync::atomic::{AtomicU32, Ordering};
use std::sync::{Arc, Condvar, Mutex, mpsc};
use std::thread;
use std::time::{Duration, Instant};

use spright_test_support::cgroup::TestCgroup;
use spright_test_support::{Test, free_port, run_ok, run_tests};

const USER_PORT: u16 = 8080;
const SERVING_PORT: u16 = 8012;
const ADMIN_PORT: u16 = 8022;
/// The sidecar's quiet period in these tests (`SPRIGHT_DRAIN_QUIET_PERIOD`).
const QUIET: Duration = Duration::from_secs(1);
/// How long a request is held in flight: several quiet periods.
const HOLD: Duration = Duration::from_secs(4);
/// Upper bound on any wait (never reached when things work).
const PATIENCE: Duration = Duration::from_secs(30);

fn main() -> ExitCode {
    let args: Vec<String> = std::env::args().collect();
    if args.get(1).map(String::as_str) == Some("user") {
        let port = args
            .get(2)
            .and_then(|p| p.parse().ok())
            .unwrap_or(USER_PORT);
        user_container(port);
        return ExitCode::SUCCESS;
    }
    let tests: [Test; 2] = [
        ("agent_drain_waits_for_steered_requests", || {
            drain_waits_for_steered_requests(Accounting::Agent)
        }),
        ("standalone_drain_waits_for_steered_requests", || {
            drain_waits_for_steered_requests(Accounting::Standalone)
        }),
    ];
    run_tests(&tests, args.get(1).map(String::as_str))
}

// ------------------------------------------------------------------------ the pod

fn sh(program: &str, args: &[&str]) {
    run_ok(Command::new(program).args(args), "install iproute2");
}

/// A network namespace joined to this one by a veth pair, and a cgroup.
struct Pod {
    netns: String,
    veth: String,
    cgroup: TestCgroup,
    node_ip: Ipv4Addr,
    ip: Ipv4Addr,
}

impl Pod {
    fn create() -> Self {
        static SEQ: AtomicU32 = AtomicU32::new(0);
        let seq = SEQ.fetch_add(1, Ordering::SeqCst);
        let pid = std::process::id();
        let id = format!("{}x{seq}", pid % 1_000_000);
        // 10.214.<pid>.<4 seq + 1 | 2>/30: apart from the other kernel tests' ranges.
        let third = u8::try_from(pid % 251).unwrap_or(0);
        let fourth = u8::try_from((seq % 63) * 4).unwrap_or(0);
        let pod = Self {
            netns: format!("spd{id}"),
            veth: format!("spdh{id}"),
            cgroup: TestCgroup::new("drain-pod"),
            node_ip: Ipv4Addr::new(10, 214, third, fourth + 1),
            ip: Ipv4Addr::new(10, 214, third, fourth + 2),
        };
        let inner = format!("spdp{id}");
        sh("ip", &["netns", "add", &pod.netns]);
        sh(
            "ip",
            &[
                "link", "add", &pod.veth, "type", "veth", "peer", "name", &inner,
            ],
        );
        sh("ip", &["link", "set", &inner, "netns", &pod.netns]);
        sh(
            "ip",
            &[
                "addr",
                "add",
                &format!("{}/30", pod.node_ip),
                "dev",
                &pod.veth,
            ],
        );
        sh("ip", &["link", "set", &pod.veth, "up"]);
        let pod_addr = format!("{}/30", pod.ip);
        for cmd in [
            vec!["addr", "add", pod_addr.as_str(), "dev", inner.as_str()],
            vec!["link", "set", inner.as_str(), "up"],
            vec!["link", "set", "lo", "up"],
        ] {
            let mut args = vec!["-n", pod.netns.as_str()];
            args.extend(cmd);
            sh("ip", &args);
        }
        pod
    }

    /// A command that runs inside the pod: it joins the cgroup and the network namespace
    /// between fork and exec, before it opens any socket.
    fn command(&self, program: &Path) -> Command {
        let procs =
            CString::new(format!("{}/cgroup.procs", self.cgroup.path().display())).expect("path");
        let netns = CString::new(format!("/var/run/netns/{}", self.netns)).expect("path");
        let mut cmd = Command::new(program);
        // SAFETY: between fork and exec the closure only makes system calls on memory
        // prepared before the fork (no allocation, no locks).
        unsafe {
            cmd.pre_exec(move || {
                let fd = libc::open(procs.as_ptr(), libc::O_WRONLY | libc::O_CLOEXEC);
                if fd < 0 || libc::write(fd, b"0".as_ptr().cast(), 1) != 1 {
                    return Err(std::io::Error::last_os_error());
                }
                libc::close(fd);
                let ns = libc::open(netns.as_ptr(), libc::O_RDONLY | libc::O_CLOEXEC);
                if ns < 0 || libc::setns(ns, libc::CLONE_NEWNET) != 0 {
                    return Err(std::io::Error::last_os_error());
                }
                libc::close(ns);
                Ok(())
            });
        }
        cmd
    }

    fn addr(&self, port: u16) -> SocketAddr {
        SocketAddr::from((self.ip, port))
    }
}

impl Drop for Pod {
    fn drop(&mut self) {
        // The cgroup empties once its processes are reaped.
        self.cgroup.remove();
        let _ = Command::new("ip")
            .args(["link", "del", &self.veth])
            .status();
        let _ = Command::new("ip")
            .args(["netns", "del", &self.netns])
            .status();
    }
}

/// A child process killed (and reaped) when the test ends, whatever happens.
struct Reaped(Child);

impl Drop for Reaped {
    fn drop(&mut self) {
        let _ = self.0.kill();
        let _ = self.0.wait();
    }
}

fn log_target() -> Stdio {
    if std::env::var_os("SPRIGHT_TEST_LOG").is_some() {
        Stdio::inherit()
    } else {
        Stdio::null()
    }
}

fn wait_for(what: &str, mut ready: impl FnMut() -> bool) {
    let deadline = Instant::now() + PATIENCE;
    while !ready() {
        assert!(Instant::now() < deadline, "gave up waiting for {what}");
        thread::sleep(Duration::from_millis(25));
    }
}

// ------------------------------------------------------------------------ the user container

/// The user container: answers every request with `ok`; `GET /hold` only after a line on
/// stdin (one line releases every request held so far). Prints `ready` once listening and
/// `held <peer>` for each held request.
fn user_container(port: u16) {
    let listener = TcpListener::bind((Ipv4Addr::UNSPECIFIED, port)).expect("user container bind");
    let released = Arc::new((Mutex::new(0u64), Condvar::new()));
    let r = Arc::clone(&released);
    thread::spawn(move || {
        for _ in std::io::stdin().lock().lines() {
            let (count, cv) = &*r;
            *count.lock().unwrap_or_else(|e| e.into_inner()) += 1;
            cv.notify_all();
        }
    });
    let stdout = Arc::new(Mutex::new(std::io::stdout()));
    say(&stdout, "ready");
    for conn in listener.incoming().flatten() {
        let (released, stdout) = (Arc::clone(&released), Arc::clone(&stdout));
        thread::spawn(move || answer(conn, &released, &stdout));
    }
}

fn say(out: &Mutex<std::io::Stdout>, line: &str) {
    let mut out = out.lock().unwrap_or_else(|e| e.into_inner());
    let _ = writeln!(out, "{line}");
    let _ = out.flush();
}

fn answer(mut conn: TcpStream, released: &(Mutex<u64>, Condvar), out: &Mutex<std::io::Stdout>) {
    let Some(head) = read_head(&mut conn) else {
        return;
    };
    if head.starts_with("GET /hold ") {
        let (count, cv) = released;
        let mut n = count.lock().unwrap_or_else(|e| e.into_inner());
        let seen = *n;
        let peer = conn
            .peer_addr()
            .map(|a| a.ip().to_string())
            .unwrap_or_default();
        say(out, &format!("held {peer}"));
        while *n == seen {
            n = cv.wait(n).unwrap_or_else(|e| e.into_inner());
        }
    }
    let _ = conn.write_all(b"HTTP/1.1 200 OK\r\nContent-Length: 2\r\nConnection: close\r\n\r\nok");
}

/// Reads up to the end of an HTTP head.
fn read_head(conn: &mut TcpStream) -> Option<String> {
    let mut raw = Vec::new();
    let mut byte = [0u8; 1024];
    while !raw.ends_with(b"\r\n\r\n") {
        let n = conn.read(&mut byte).ok().filter(|n| *n > 0)?;
        raw.extend_from_slice(&byte[..n]);
    }
    String::from_utf8(raw).ok()
}

struct UserContainer {
    /// Kept to kill the process when the test ends.
    _child: Reaped,
    stdin: ChildStdin,
    stdout: BufReader<ChildStdout>,
}

impl UserContainer {
    fn start(pod: &Pod) -> Self {
        let exe = std::env::current_exe().expect("own path");
        let mut child = pod
            .command(&exe)
            .args(["user", &USER_PORT.to_string()])
            .stdin(Stdio::piped())
            .stdout(Stdio::piped())
            .spawn()
            .expect("start the user container");
        let stdin = child.stdin.take().expect("stdin");
        let stdout = BufReader::new(child.stdout.take().expect("stdout"));
        let mut user = Self {
            _child: Reaped(child),
            stdin,
            stdout,
        };
        assert_eq!(user.line(), "ready");
        user
    }

    fn line(&mut self) -> String {
        let mut line = String::new();
        self.stdout
            .read_line(&mut line)
            .expect("user container output");
        line.trim().to_owned()
    }

    fn release(&mut self) {
        writeln!(self.stdin).expect("release held requests");
        self.stdin.flush().expect("flush");
    }
}

// ------------------------------------------------------------------------ agent and sidecar

struct Agent {
    child: Reaped,
    admin: SocketAddr,
    node_port: u16,
}

impl Agent {
    fn start() -> Self {
        let node_port = free_port();
        let admin = SocketAddr::from(([127, 0, 0, 1], free_port()));
        let child = Command::new(env!("CARGO_BIN_EXE_spright-node-agent"))
            .arg("--node-address")
            .arg(format!("0.0.0.0:{node_port}"))
            .arg("--admin-address")
            .arg(admin.to_string())
            .stdout(Stdio::null())
            .stderr(log_target())
            .spawn()
            .expect("start spright-node-agent");
        let agent = Self {
            child: Reaped(child),
            admin,
            node_port,
        };
        wait_for("the agent", || {
            request(
                agent.admin,
                "GET /healthz HTTP/1.1\r\nHost: a\r\nConnection: close\r\n\r\n",
            )
            .is_ok_and(|(status, _)| status == 200)
        });
        agent
    }

    fn register_event_driven(&self, pod: &Pod) {
        let spec = serde_json::json!({
            "name": format!("drain-{}", pod.netns),
            "ip": pod.ip.to_string(),
            "port": USER_PORT,
            "serving_port": SERVING_PORT,
            "cgroup": pod.cgroup.path(),
            "netns": format!("/var/run/netns/{}", pod.netns),
            "mode": "event-driven",
        })
        .to_string();
        let (status, body) = request(
            self.admin,
            &format!(
                "POST /v1/pods HTTP/1.1\r\nHost: a\r\nConnection: close\r\nContent-Type: application/json\r\nContent-Length: {}\r\n\r\n{spec}",
                spec.len()
            ),
        )
        .expect("register the pod");
        assert_eq!(status, 201, "{body}");
    }
}

impl Drop for Agent {
    fn drop(&mut self) {
        // SIGTERM first: the agent detaches its pods on the way out.
        // SAFETY: a signal to our own child, by its pid.
        unsafe {
            libc::kill(self.child.0.id() as libc::pid_t, libc::SIGTERM);
        }
        let deadline = Instant::now() + Duration::from_secs(5);
        while Instant::now() < deadline && matches!(self.child.0.try_wait(), Ok(None)) {
            thread::sleep(Duration::from_millis(20));
        }
    }
}

#[derive(Clone, Copy, Debug)]
enum Accounting {
    Agent,
    Standalone,
}

fn sidecar_binary() -> PathBuf {
    let exe = std::env::current_exe().expect("own path");
    let bin = exe
        .ancestors()
        .nth(2)
        .expect("target directory")
        .join("queue-proxy-ebpf");
    assert!(
        bin.is_file(),
        "{} not built: run `cargo build -p queue-proxy-ebpf` (cargo test --workspace builds it)",
        bin.display()
    );
    bin
}

/// queue-proxy-ebpf in event-driven mode inside `pod`.
fn start_sidecar(pod: &Pod, accounting: &[(&str, String)]) -> Reaped {
    let ip = pod.ip.to_string();
    let quiet = format!("{}ms", QUIET.as_millis());
    let user_port = USER_PORT.to_string();
    let serving_port = SERVING_PORT.to_string();
    let env: Vec<(&str, &str)> = vec![
        ("SERVING_NAMESPACE", "default"),
        ("SERVING_SERVICE", "drain"),
        ("SERVING_CONFIGURATION", "drain"),
        ("SERVING_REVISION", "drain-00001"),
        ("SERVING_POD", "drain-pod"),
        ("SERVING_POD_IP", &ip),
        ("QUEUE_SERVING_PORT", &serving_port),
        ("QUEUE_SERVING_TLS_PORT", "8112"),
        ("USER_PORT", &user_port),
        ("CONTAINER_CONCURRENCY", "0"),
        ("REVISION_TIMEOUT_SECONDS", "300"),
        ("SERVING_LOGGING_CONFIG", ""),
        ("SERVING_LOGGING_LEVEL", "debug"),
        ("SPRIGHT_DATAPLANE_MODE", "event-driven"),
        ("SPRIGHT_DRAIN_QUIET_PERIOD", &quiet),
    ];
    let child = pod
        .command(&sidecar_binary())
        .env_clear()
        .envs(env)
        .envs(accounting.iter().map(|(k, v)| (*k, v.as_str())))
        .stdout(Stdio::null())
        .stderr(log_target())
        .spawn()
        .expect("start queue-proxy-ebpf");
    wait_for("the sidecar's stats port", || {
        TcpStream::connect_timeout(&pod.addr(9090), Duration::from_millis(200)).is_ok()
    });
    Reaped(child)
}

// ------------------------------------------------------------------------ HTTP

/// Sends `raw` on a fresh connection and reads the whole answer: (status, body).
fn request(addr: SocketAddr, raw: &str) -> std::io::Result<(u16, String)> {
    let mut conn = TcpStream::connect_timeout(&addr, Duration::from_secs(5))?;
    conn.set_read_timeout(Some(PATIENCE))?;
    conn.write_all(raw.as_bytes())?;
    read_answer(&mut conn)
}

fn read_answer(conn: &mut TcpStream) -> std::io::Result<(u16, String)> {
    let mut text = String::new();
    conn.read_to_string(&mut text)?;
    let (head, body) = text
        .split_once("\r\n\r\n")
        .ok_or_else(|| std::io::Error::other(format!("no HTTP answer: {text:?}")))?;
    let status = head
        .split(' ')
        .nth(1)
        .and_then(|s| s.parse().ok())
        .ok_or_else(|| std::io::Error::other(format!("no status: {head:?}")))?;
    Ok((status, body.to_owned()))
}

// ------------------------------------------------------------------------ the test

/// A request held in flight by the user container, steered past the sidecar, keeps both
/// `/wait-for-drain` and the SIGTERM drain going until it is answered; then both end after
/// the quiet period and the sidecar exits 0.
fn drain_waits_for_steered_requests(accounting: Accounting) {
    let pod = Pod::create();
    let mut user = UserContainer::start(&pod);
    let agent = matches!(accounting, Accounting::Agent).then(Agent::start);
    let env = match &agent {
        Some(agent) => {
            agent.register_event_driven(&pod);
            vec![
                ("SPRIGHT_ACCOUNTING", "agent".to_owned()),
                ("HOST_IP", pod.node_ip.to_string()),
                ("SPRIGHT_AGENT_PORT", agent.node_port.to_string()),
            ]
        }
        None => vec![("SPRIGHT_ACCOUNTING", "standalone".to_owned())],
    };
    let mut sidecar = start_sidecar(&pod, &env);

    // A request the user container holds: it must arrive from the client itself.
    let mut held = TcpStream::connect(pod.addr(SERVING_PORT)).expect("connect 8012");
    held.set_read_timeout(Some(PATIENCE)).expect("timeout");
    held.write_all(b"GET /hold HTTP/1.1\r\nHost: drain\r\nUser-Agent: drain-test\r\n\r\n")
        .expect("send the held request");
    assert_eq!(
        user.line(),
        format!("held {}", pod.node_ip),
        "the request did not come straight from the client: not steered"
    );

    // What kubelet does at pod deletion: the preStop hook's /wait-for-drain, then SIGTERM.
    let (drained_tx, drained) = mpsc::channel();
    let admin = pod.addr(ADMIN_PORT);
    thread::spawn(move || {
        let answer = request(
            admin,
            "GET /wait-for-drain HTTP/1.1\r\nHost: drain\r\nConnection: close\r\n\r\n",
        );
        let _ = drained_tx.send((answer.map_err(|e| e.to_string()), Instant::now()));
    });
    thread::sleep(Duration::from_millis(200));
    // SAFETY: a signal to our own child, by its pid.
    unsafe {
        libc::kill(sidecar.0.id() as libc::pid_t, libc::SIGTERM);
    }

    // Several quiet periods pass with the request in flight: the drain goes on.
    let early = drained.recv_timeout(HOLD);
    assert!(
        early.is_err(),
        "/wait-for-drain answered while a steered request was in flight: {early:?}"
    );
    assert!(
        matches!(sidecar.0.try_wait(), Ok(None)),
        "the sidecar exited while a steered request was in flight"
    );

    // The user container answers: the drain ends one quiet period later.
    user.release();
    let answered = Instant::now();
    assert_eq!(
        read_answer(&mut held).expect("held answer"),
        (200, "ok".to_owned())
    );
    let (answer, drained_at) = drained
        .recv_timeout(PATIENCE)
        .expect("the drain never ended");
    assert_eq!(answer, Ok((200, String::new())), "/wait-for-drain");
    wait_for("the sidecar to exit", || {
        matches!(sidecar.0.try_wait(), Ok(Some(_)))
    });
    let status = sidecar.0.wait().expect("sidecar status");
    assert!(status.success(), "the sidecar exited with {status}");
    eprintln!(
        "{accounting:?}: request held {HOLD:?} in flight; /wait-for-drain answered {:?} after the \
         request completed (quiet period {QUIET:?}); sidecar exited 0",
        drained_at.saturating_duration_since(answered)
    );
    drop(user);
    drop(agent);
}
