//! The node agent against the real kernel, with pods emulated as a network
//! namespace plus a cgroup v2 directory, both created (and removed) here.
//!
//! Needs root (CAP_BPF, CAP_NET_ADMIN, CAP_SYS_ADMIN), iproute2, bpftool and
//! cgroup v2 at /sys/fs/cgroup/unified; without them the tests fail with the
//! reason, they never skip.
//!
//! This binary has its own `main` (harness = false): run with no arguments it
//! runs the tests in order; `pods upstream <cgroup> <netns> <port>` is the
//! emulated pod's HTTP server and `pods fetch <netns> <url>` a client inside
//! the pod's namespace (both join the cgroup / namespace before opening any
//! socket, so the programs see their sockets as the pod's). Set
//! SPRIGHT_TEST_AGENT_LOG=1 to see the agents' logs.
//!
//! The in-flight time the kernel integrates is checked against two witnesses
//! on the same monotonic clock: the pod's server (how long it held each
//! request, from the kernel's receive timestamp of its head to starting its
//! last write), within 5%, and the client (from writing the request to having
//! read the response), as an upper bound. Neither depends on how soon the
//! scheduler runs the server or the client, so both hold however loaded the
//! machine is. The sidecar's Stat is checked over its own window, with the
//! whole load inside it: rates against the known load, ratios between its
//! fields for the in-flight time.

use std::io::{Read, Write};
use std::net::{Ipv4Addr, SocketAddr, TcpListener, TcpStream};
use std::path::{Path, PathBuf};
use std::process::{Child, Command, ExitCode, Stdio};
use std::sync::atomic::{AtomicU32, Ordering};
use std::thread;
use std::time::{Duration, Instant};

use spright_test_support::cgroup::{TestCgroup, program_ids};
use spright_test_support::{Rng, Test, TestDir, bpftool, free_port, run_ok, run_tests};

const SERVING_PORT: u16 = 8080;
/// Body size of `/big/<ms>`: many TCP segments.
const BIG_BODY: usize = 1_000_000;

fn main() -> ExitCode {
    let args: Vec<String> = std::env::args().collect();
    match args.get(1).map(String::as_str) {
        Some("upstream") => {
            upstream(&args[2], &args[3], args[4].parse().expect("port"));
            ExitCode::SUCCESS
        }
        Some("fetch") => fetch_main(&args[2], &args[3]),
        Some("exec") => exec_main(&args[2], &args[3], &args[4..]),
        _ => run_all(args.get(1).map(String::as_str)),
    }
}

fn run_all(filter: Option<&str>) -> ExitCode {
    let tests: [Test; 16] = [
        (
            "agent_attaches_and_detaches_through_the_api",
            agent_attaches_and_detaches_through_the_api,
        ),
        ("counters_match_a_known_load", counters_match_a_known_load),
        (
            "every_response_framing_ends_its_request",
            every_response_framing_ends_its_request,
        ),
        (
            "split_headers_and_random_bytes_keep_the_counters_sane",
            split_headers_and_random_bytes_keep_the_counters_sane,
        ),
        (
            "a_probe_seen_after_its_proxy_header_takes_back_the_proxied_arrival",
            a_probe_seen_after_its_proxy_header_takes_back_the_proxied_arrival,
        ),
        ("ipv6_requests_are_counted", ipv6_requests_are_counted),
        (
            "event_driven_steering_skips_the_sidecar",
            event_driven_steering_skips_the_sidecar,
        ),
        (
            "a_pod_that_disappears_leaves_nothing_behind",
            a_pod_that_disappears_leaves_nothing_behind,
        ),
        (
            "event_driven_pod_through_the_agent",
            event_driven_pod_through_the_agent,
        ),
        (
            "standalone_event_driven_sidecar_steers_itself",
            standalone_event_driven_sidecar_steers_itself,
        ),
        (
            "kubelet_probes_from_the_node_reach_the_sidecar",
            kubelet_probes_from_the_node_reach_the_sidecar,
        ),
        (
            "full_mode_pod_gets_the_loopback_redirect",
            full_mode_pod_gets_the_loopback_redirect,
        ),
        (
            "manifest_directory_adds_and_removes_pods",
            manifest_directory_adds_and_removes_pods,
        ),
        (
            "queue_proxy_reports_the_kernel_counters",
            queue_proxy_reports_the_kernel_counters,
        ),
        (
            "standalone_queue_proxy_loads_the_programs_itself",
            standalone_queue_proxy_loads_the_programs_itself,
        ),
        (
            "queue_proxy_without_the_agent_falls_back_and_says_so",
            queue_proxy_without_the_agent_falls_back_and_says_so,
        ),
    ];
    run_tests(&tests, filter)
}

// ---------------------------------------------------------------- pod helpers

static NEXT: AtomicU32 = AtomicU32::new(0);

fn run(cmd: &str, args: &[&str]) {
    run_ok(Command::new(cmd).args(args), "install iproute2");
}

/// An emulated pod: netns + veth pair + cgroup + an HTTP server inside both.
struct TestPod {
    name: String,
    netns: String,
    veth: String,
    cgroup: TestCgroup,
    host_ip: Ipv4Addr,
    pod_ip: Ipv4Addr,
    pod_ip6: std::net::Ipv6Addr,
    server: Option<Child>,
}

impl TestPod {
    fn new() -> Self {
        let n = NEXT.fetch_add(1, Ordering::SeqCst);
        let pid = std::process::id();
        let tag = format!("{}{}", pid % 100_000, n);
        let name = format!("sna-pod-{tag}");
        let netns = format!("sna{tag}");
        let veth = format!("snh{tag}");
        let peer = format!("snp{tag}");
        // 10.213.<pid-derived>.<4n+1 / 4n+2>/30
        let third = u8::try_from(pid % 250).unwrap_or(0);
        let base = u8::try_from((n % 60) * 4).unwrap_or(0);
        let host_ip = Ipv4Addr::new(10, 213, third, base + 1);
        let pod_ip = Ipv4Addr::new(10, 213, third, base + 2);
        let host_ip6: std::net::Ipv6Addr = format!("fd13:{third:x}:{n:x}::1").parse().expect("v6");
        let pod_ip6: std::net::Ipv6Addr = format!("fd13:{third:x}:{n:x}::2").parse().expect("v6");
        let pod = Self {
            name,
            netns: netns.clone(),
            veth: veth.clone(),
            cgroup: TestCgroup::new("pod"),
            host_ip,
            pod_ip,
            pod_ip6,
            server: None,
        };
        run("ip", &["netns", "add", &netns]);
        run(
            "ip",
            &["link", "add", &veth, "type", "veth", "peer", "name", &peer],
        );
        run("ip", &["link", "set", &peer, "netns", &netns]);
        run(
            "ip",
            &["addr", "add", &format!("{host_ip}/30"), "dev", &veth],
        );
        run(
            "ip",
            &[
                "-6",
                "addr",
                "add",
                &format!("{host_ip6}/64"),
                "dev",
                &veth,
                "nodad",
            ],
        );
        run("ip", &["link", "set", &veth, "up"]);
        let in_ns = |args: &[&str]| {
            let mut full = vec!["netns", "exec", netns.as_str()];
            full.extend_from_slice(args);
            run("ip", &full);
        };
        in_ns(&["ip", "addr", "add", &format!("{pod_ip}/30"), "dev", &peer]);
        in_ns(&[
            "ip",
            "-6",
            "addr",
            "add",
            &format!("{pod_ip6}/64"),
            "dev",
            &peer,
            "nodad",
        ]);
        in_ns(&["ip", "link", "set", &peer, "up"]);
        in_ns(&["ip", "link", "set", "lo", "up"]);
        pod
    }

    /// Starts the HTTP server in the pod (joins cgroup and netns first).
    fn start_server(&mut self) {
        let child = Command::new(std::env::current_exe().expect("exe"))
            .args([
                "upstream",
                self.cgroup.path().to_str().expect("utf-8"),
                &self.netns,
                &SERVING_PORT.to_string(),
            ])
            .stdout(Stdio::piped())
            .spawn()
            .expect("spawn upstream");
        self.server = Some(child);
        let mut line = [0u8; 6];
        let stdout = self
            .server
            .as_mut()
            .and_then(|c| c.stdout.as_mut())
            .expect("stdout");
        stdout.read_exact(&mut line).expect("upstream ready line");
        assert_eq!(&line, b"ready\n");
    }

    fn stop_server(&mut self) {
        if let Some(mut child) = self.server.take() {
            let _ = child.kill();
            let _ = child.wait();
        }
    }

    fn spec(&self) -> String {
        format!(
            r#"{{"name":"{}","ip":"{}","port":{SERVING_PORT},"cgroup":"{}","netns":"/var/run/netns/{}"}}"#,
            self.name,
            self.pod_ip,
            self.cgroup.path().display(),
            self.netns
        )
    }

    fn serving_addr(&self) -> SocketAddr {
        SocketAddr::from((self.pod_ip, SERVING_PORT))
    }

    /// GET from inside the pod's namespace; returns (status, body).
    fn fetch(&self, url: &str) -> (u16, String) {
        let out = run_ok(
            Command::new(std::env::current_exe().expect("exe")).args(["fetch", &self.netns, url]),
            "the test binary itself",
        );
        let text = String::from_utf8_lossy(&out).into_owned();
        let (status, body) = text.split_once('\n').expect("status line");
        (status.parse().expect("status"), body.to_owned())
    }

    /// Removes everything: server, cgroup, netns, veth.
    fn destroy(&mut self) {
        self.stop_server();
        self.cgroup.remove();
        let _ = Command::new("ip")
            .args(["link", "del", &self.veth])
            .output();
        let _ = Command::new("ip")
            .args(["netns", "del", &self.netns])
            .output();
    }
}

impl Drop for TestPod {
    fn drop(&mut self) {
        self.destroy();
    }
}

// ---------------------------------------------------------------- agent helpers

struct Agent {
    child: Child,
    admin: SocketAddr,
    node_port: u16,
}

impl Agent {
    fn start(manifest_dir: Option<&Path>) -> Self {
        let node_port = free_port();
        let admin = SocketAddr::from(([127, 0, 0, 1], free_port()));
        let mut cmd = Command::new(env!("CARGO_BIN_EXE_spright-node-agent"));
        cmd.args([
            "--node-address",
            &format!("0.0.0.0:{node_port}"),
            "--admin-address",
            &admin.to_string(),
        ])
        .stdout(Stdio::null())
        .stderr(if std::env::var_os("SPRIGHT_TEST_AGENT_LOG").is_some() {
            Stdio::inherit()
        } else {
            Stdio::null()
        });
        if let Some(dir) = manifest_dir {
            cmd.args(["--manifest-dir", dir.to_str().expect("utf-8")]);
        }
        let child = cmd.spawn().expect("spawn agent");
        let agent = Self {
            child,
            admin,
            node_port,
        };
        wait_until("agent ready", || {
            http(agent.admin, "GET", "/healthz", None)
                .map(|(s, _)| s == 200)
                .unwrap_or(false)
        });
        agent
    }

    fn pods(&self) -> serde_json::Value {
        let (status, body) = http(self.admin, "GET", "/v1/pods", None).expect("list pods");
        assert_eq!(status, 200, "{body}");
        serde_json::from_str(&body).expect("pods json")
    }

    /// POST /v1/pods with `spec`; (status, body).
    fn post_pod(&self, spec: &str) -> (u16, String) {
        http(self.admin, "POST", "/v1/pods", Some(spec)).expect("register")
    }

    /// DELETE the pod's registration; the status.
    fn unregister(&self, pod: &TestPod) -> u16 {
        http(
            self.admin,
            "DELETE",
            &format!("/v1/pods/{}", pod.name),
            None,
        )
        .expect("delete")
        .0
    }

    fn register(&self, pod: &TestPod) -> (Vec<u64>, Vec<u64>) {
        let (status, body) = self.post_pod(&pod.spec());
        assert_eq!(status, 201, "{body}");
        let info: serde_json::Value = serde_json::from_str(&body).expect("json");
        ids(&info)
    }

    fn counters_url(&self, pod: &TestPod) -> String {
        format!("http://{}:{}/v1/counters", pod.host_ip, self.node_port)
    }

    /// Context switches of every agent thread so far.
    fn context_switches(&self) -> u64 {
        context_switches(self.child.id())
    }
}

/// A pod with its server running, and a fresh agent (the pod not registered yet).
fn serving_pod_and_agent() -> (TestPod, Agent) {
    let mut pod = TestPod::new();
    pod.start_server();
    (pod, Agent::start(None))
}

impl Drop for Agent {
    fn drop(&mut self) {
        // SIGTERM: the agent detaches every pod and exits.
        // SAFETY: signalling our own child by pid.
        unsafe {
            libc::kill(self.child.id() as i32, libc::SIGTERM);
        }
        let deadline = Instant::now() + Duration::from_secs(5);
        while Instant::now() < deadline {
            if let Ok(Some(_)) = self.child.try_wait() {
                return;
            }
            thread::sleep(Duration::from_millis(20));
        }
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

fn ids(info: &serde_json::Value) -> (Vec<u64>, Vec<u64>) {
    let list = |key: &str| -> Vec<u64> {
        info[key]
            .as_array()
            .unwrap_or_else(|| panic!("{key} in {info}"))
            .iter()
            .filter_map(serde_json::Value::as_u64)
            .collect()
    };
    (list("program_ids"), list("map_ids"))
}

/// Waits (bounded) until every id is gone from the kernel.
fn assert_gone(programs: &[u64], maps: &[u64]) {
    wait_until("programs and maps freed", || {
        programs.iter().all(|id| !bpftool::exists("prog", *id))
            && maps.iter().all(|id| !bpftool::exists("map", *id))
    });
}

fn wait_until(what: &str, mut done: impl FnMut() -> bool) {
    let deadline = Instant::now() + Duration::from_secs(10);
    while !done() {
        assert!(Instant::now() < deadline, "timed out waiting for {what}");
        thread::sleep(Duration::from_millis(20));
    }
}

/// One HTTP/1.1 request on a fresh connection; returns (status, body).
fn http(
    addr: SocketAddr,
    method: &str,
    path: &str,
    body: Option<&str>,
) -> std::io::Result<(u16, String)> {
    let body = body.unwrap_or("");
    raw_http(
        addr,
        format!(
            "{method} {path} HTTP/1.1\r\nHost: agent\r\nConnection: close\r\nContent-Type: application/json\r\nContent-Length: {}\r\n\r\n{body}",
            body.len()
        )
        .as_bytes(),
    )
}

/// Sends `request` as is on a fresh connection; returns (status, body as text).
fn raw_http(addr: SocketAddr, request: &[u8]) -> std::io::Result<(u16, String)> {
    let (status, body) = exchange(addr, request)?;
    Ok((status, String::from_utf8_lossy(&body).into_owned()))
}

/// Sends `request` as is on a fresh connection and reads the answer until the server closes
/// the connection; returns (status, body).
fn exchange(addr: SocketAddr, request: &[u8]) -> std::io::Result<(u16, Vec<u8>)> {
    let mut stream = TcpStream::connect_timeout(&addr, Duration::from_secs(5))?;
    stream.set_read_timeout(Some(Duration::from_secs(10)))?;
    stream.write_all(request)?;
    let mut raw = Vec::new();
    stream.read_to_end(&mut raw)?;
    let bad = || std::io::Error::other(format!("bad response {:?}", String::from_utf8_lossy(&raw)));
    let end = raw
        .windows(4)
        .position(|w| w == b"\r\n\r\n")
        .ok_or_else(bad)?;
    let status = std::str::from_utf8(&raw[..end])
        .ok()
        .and_then(|head| head.split_whitespace().nth(1)?.parse().ok())
        .ok_or_else(bad)?;
    Ok((status, raw[end + 4..].to_vec()))
}

// ---------------------------------------------------------------- pod processes

fn enter(cgroup: Option<&str>, netns: &str) {
    if let Some(cgroup) = cgroup {
        spright_test_support::cgroup::join(Path::new(cgroup));
    }
    let ns = std::fs::File::open(format!("/var/run/netns/{netns}")).expect("open netns");
    nix::sched::setns(ns, nix::sched::CloneFlags::CLONE_NEWNET).expect("setns");
}

/// What the pod's server saw of the requests it answered (kubelet probes aside): for each,
/// the time from the kernel's receive timestamp of its head to the start of the write that
/// ends its response. The kernel's window of a request (its ingress program seeing the head,
/// its egress program the last byte) follows each end by microseconds, whatever the
/// scheduler does to the server, the sidecar or the client.
#[derive(Debug, Default, Clone, Copy, PartialEq)]
struct Held {
    requests: u64,
    proxied: u64,
    ns: u64,
    proxied_ns: u64,
    /// Requests whose head came without a receive timestamp (held from when read).
    unstamped: u64,
}

impl Held {
    fn since(self, earlier: Self) -> Self {
        Self {
            requests: self.requests - earlier.requests,
            proxied: self.proxied - earlier.proxied,
            ns: self.ns - earlier.ns,
            proxied_ns: self.proxied_ns - earlier.proxied_ns,
            unstamped: self.unstamped - earlier.unstamped,
        }
    }
}

/// The server's running totals, answered on `GET /held` (see [`held`]).
static HELD: std::sync::Mutex<Held> = std::sync::Mutex::new(Held {
    requests: 0,
    proxied: 0,
    ns: 0,
    proxied_ns: 0,
    unstamped: 0,
});

/// Query of the load helpers marking a proxied request to the pod's server (the truth of
/// which requests are proxied, whatever a sidecar forwards of K-Proxy-Request).
const PROXIED_MARK: &str = "?proxied";

/// The pod's server. `GET /sleep/<ms>` answers "ok" with Content-Length after
/// <ms>; `GET /chunked/<ms>` the same body chunked, in two writes. Keep-alive.
/// `GET /held` answers [`Held`] as four numbers (ask it as a kubelet probe, so
/// that the kernel does not count it).
fn upstream(cgroup: &str, netns: &str, port: u16) {
    enter(Some(cgroup), netns);
    // Dual-stack: IPv4 and IPv6 clients.
    let listener = TcpListener::bind(("::", port)).expect("bind upstream");
    // Receive timestamps from now on (the kernel turns them on asynchronously): accepted
    // connections inherit the option.
    nix::sys::socket::setsockopt(
        &listener,
        nix::sys::socket::sockopt::ReceiveTimestampns,
        &true,
    )
    .expect("SO_TIMESTAMPNS");
    println!("ready");
    let _ = std::io::stdout().flush();
    for stream in listener.incoming().flatten() {
        thread::spawn(move || serve_connection(stream));
    }
}

/// `clock` now, in ns.
fn clock_ns(clock: libc::clockid_t) -> i128 {
    let mut ts = libc::timespec {
        tv_sec: 0,
        tv_nsec: 0,
    };
    // SAFETY: clock_gettime writes the timespec we pass and nothing else.
    let rc = unsafe { libc::clock_gettime(clock, &mut ts) };
    assert_eq!(rc, 0, "clock_gettime");
    i128::from(ts.tv_sec) * 1_000_000_000 + i128::from(ts.tv_nsec)
}

/// Reads into `buf`; `stamp` gets the kernel's receive timestamp of the data read
/// (SO_TIMESTAMPNS, CLOCK_REALTIME) as CLOCK_MONOTONIC ns, the clock of the BPF programs.
fn read_stamped(stream: &TcpStream, buf: &mut [u8], stamp: &mut Option<i128>) -> Option<usize> {
    use nix::sys::socket::{ControlMessageOwned, MsgFlags, recvmsg};
    use std::os::fd::AsRawFd;
    let mut space = nix::cmsg_space!(nix::sys::time::TimeSpec);
    let mut iov = [std::io::IoSliceMut::new(buf)];
    let msg = recvmsg::<()>(
        stream.as_raw_fd(),
        &mut iov,
        Some(&mut space),
        MsgFlags::empty(),
    )
    .ok()?;
    for cmsg in msg.cmsgs().ok()? {
        if let ControlMessageOwned::ScmTimestampns(ts) = cmsg {
            let offset = clock_ns(libc::CLOCK_REALTIME) - clock_ns(libc::CLOCK_MONOTONIC);
            *stamp =
                Some(i128::from(ts.tv_sec()) * 1_000_000_000 + i128::from(ts.tv_nsec()) - offset);
        }
    }
    Some(msg.bytes)
}

fn serve_connection(mut stream: TcpStream) {
    let _ = stream.set_nodelay(true);
    // Each request's hold starts when the kernel received its head, not when this thread
    // got to run after that (which the load on the machine can delay by many ms).
    let _ = nix::sys::socket::setsockopt(
        &stream,
        nix::sys::socket::sockopt::ReceiveTimestampns,
        &true,
    );
    let mut buf = Vec::new();
    let mut chunk = [0u8; 4096];
    loop {
        let mut stamp = None;
        let end = loop {
            if let Some(pos) = buf.windows(4).position(|w| w == b"\r\n\r\n") {
                break pos + 4;
            }
            match read_stamped(&stream, &mut chunk, &mut stamp) {
                None | Some(0) => return,
                Some(n) => buf.extend_from_slice(&chunk[..n]),
            }
        };
        // Without a timestamp (the head was read with the previous request's) the hold
        // starts now: later, never earlier, than the kernel's window.
        let arrived_ns = stamp.unwrap_or_else(|| clock_ns(libc::CLOCK_MONOTONIC));
        let head = String::from_utf8_lossy(&buf[..end]).into_owned();
        buf.drain(..end);
        let target = head.split_whitespace().nth(1).unwrap_or("/").to_owned();
        let proxied = target.ends_with(PROXIED_MARK);
        let path = target.trim_end_matches(PROXIED_MARK);
        let (kind, ms) = path
            .trim_start_matches('/')
            .split_once('/')
            .unwrap_or((path.trim_start_matches('/'), "0"));
        let probe = head.contains("User-Agent: kube-probe/");
        let held_answer;
        // The response: (pause before, bytes) per write.
        let writes: Vec<(u64, &[u8])> = if head.starts_with("HEAD ") {
            vec![(0, b"HTTP/1.1 200 OK\r\nContent-Length: 2\r\n\r\n")]
        } else if kind == "held" {
            let h = *HELD.lock().unwrap_or_else(|e| e.into_inner());
            let body = format!(
                "{} {} {} {} {}",
                h.requests, h.proxied, h.ns, h.proxied_ns, h.unstamped
            );
            held_answer = format!(
                "HTTP/1.1 200 OK\r\nContent-Length: {}\r\n\r\n{body}",
                body.len()
            );
            vec![(0, held_answer.as_bytes())]
        } else if kind == "nocontent" {
            vec![(0, b"HTTP/1.1 204 No Content\r\n\r\n")]
        } else if kind == "continue" {
            vec![
                (0, b"HTTP/1.1 100 Continue\r\n\r\n"),
                (20, b"HTTP/1.1 200 OK\r\nContent-Length: 2\r\n\r\nok"),
            ]
        } else if kind == "big" {
            held_answer = format!("HTTP/1.1 200 OK\r\nContent-Length: {BIG_BODY}\r\n\r\n")
                + &"x".repeat(BIG_BODY);
            // The last write small: the hold ends once the bulk of the body is sent.
            let (bulk, tail) = held_answer.as_bytes().split_at(held_answer.len() - 1024);
            vec![(0, bulk), (0, tail)]
        } else if kind == "close" {
            // No length: the body ends with the connection.
            vec![(0, b"HTTP/1.1 200 OK\r\nConnection: close\r\n\r\nok")]
        } else if kind == "chunked" {
            vec![
                (
                    0,
                    b"HTTP/1.1 200 OK\r\nTransfer-Encoding: chunked\r\n\r\n2\r\nok\r\n",
                ),
                (2, b"0\r\n\r\n"),
            ]
        } else {
            vec![(0, b"HTTP/1.1 200 OK\r\nContent-Length: 2\r\n\r\nok")]
        };
        thread::sleep(Duration::from_millis(ms.parse().unwrap_or(0)));
        let last = writes.len() - 1;
        for (i, (pause, bytes)) in writes.into_iter().enumerate() {
            thread::sleep(Duration::from_millis(pause));
            if i == last && !probe && kind != "held" {
                let ns = u64::try_from(clock_ns(libc::CLOCK_MONOTONIC) - arrived_ns)
                    .expect("a request held after it arrived");
                let mut h = HELD.lock().unwrap_or_else(|e| e.into_inner());
                h.requests += 1;
                h.ns += ns;
                h.unstamped += u64::from(stamp.is_none());
                if proxied {
                    h.proxied += 1;
                    h.proxied_ns += ns;
                }
            }
            if stream.write_all(bytes).is_err() {
                return;
            }
        }
        // `/held` is asked with Connection: close.
        if kind == "close" || kind == "held" {
            return;
        }
    }
}

/// GET `url` (http://ip:port/path) from inside `netns`; prints status, body.
fn fetch_main(netns: &str, url: &str) -> ExitCode {
    enter(None, netns);
    let rest = url.trim_start_matches("http://");
    let (authority, path) = rest.split_at(rest.find('/').unwrap_or(rest.len()));
    let addr: SocketAddr = authority.parse().expect("ip:port");
    match http(addr, "GET", path, None) {
        Ok((status, body)) => {
            println!("{status}\n{body}");
            ExitCode::SUCCESS
        }
        Err(e) => {
            eprintln!("fetch {url}: {e}");
            ExitCode::FAILURE
        }
    }
}

// ---------------------------------------------------------------- load

/// What the client saw: requests sent and ∫ in-flight dt (ns), from before it wrote each
/// request to after it read the whole response. The kernel's window of a request lies inside
/// this one.
#[derive(Debug, Default, Clone, Copy)]
struct Truth {
    requests: u64,
    proxied: u64,
    in_flight_ns: u128,
    proxied_in_flight_ns: u128,
}

/// `workers` keep-alive connections, each `per_worker` sequential requests
/// of `path`; workers below `proxied_workers` send K-Proxy-Request.
fn drive(
    addr: SocketAddr,
    workers: usize,
    per_worker: usize,
    proxied_workers: usize,
    path: &str,
) -> Truth {
    let handles: Vec<_> = (0..workers)
        .map(|w| {
            let path = path.to_owned();
            thread::spawn(move || {
                let mut stream = connect(addr);
                let proxied = w < proxied_workers;
                let extra = if proxied {
                    "K-Proxy-Request: activator\r\n"
                } else {
                    ""
                };
                let mut truth = Truth::default();
                let path = if proxied { path + PROXIED_MARK } else { path };
                for _ in 0..per_worker {
                    let start = Instant::now();
                    write!(
                        stream,
                        "GET {path} HTTP/1.1\r\nHost: pod\r\n{extra}User-Agent: t\r\n\r\n"
                    )
                    .expect("send");
                    read_response(&mut stream);
                    let took = start.elapsed().as_nanos();
                    truth.in_flight_ns += took;
                    if proxied {
                        truth.proxied_in_flight_ns += took;
                    }
                    truth.requests += 1;
                    truth.proxied += u64::from(proxied);
                }
                truth
            })
        })
        .collect();
    let mut total = Truth::default();
    for h in handles {
        let t = h.join().expect("worker");
        total.requests += t.requests;
        total.proxied += t.proxied;
        total.in_flight_ns += t.in_flight_ns;
        total.proxied_in_flight_ns += t.proxied_in_flight_ns;
    }
    total
}

/// A client connection with Nagle off and a 10 s read timeout.
fn connect(addr: SocketAddr) -> TcpStream {
    let stream = TcpStream::connect(addr).expect("connect to the pod");
    stream.set_nodelay(true).expect("nodelay");
    stream
        .set_read_timeout(Some(Duration::from_secs(10)))
        .expect("timeout");
    stream
}

/// [`connect`], with a receive buffer of `bytes` (SO_RCVBUFFORCE: above rmem_max, as root)
/// set before the handshake, so that the window scale lets the peer send that much unread.
fn connect_with_room(addr: SocketAddr, bytes: usize) -> TcpStream {
    use std::os::fd::AsRawFd;
    let socket = socket2::Socket::new(
        socket2::Domain::for_address(addr),
        socket2::Type::STREAM,
        None,
    )
    .expect("socket");
    let size = libc::c_int::try_from(bytes).expect("buffer size");
    // SAFETY: setsockopt reads the int we pass, for the socket we own.
    let rc = unsafe {
        libc::setsockopt(
            socket.as_raw_fd(),
            libc::SOL_SOCKET,
            libc::SO_RCVBUFFORCE,
            (&raw const size).cast(),
            std::mem::size_of::<libc::c_int>() as libc::socklen_t,
        )
    };
    assert_eq!(
        rc,
        0,
        "SO_RCVBUFFORCE (needs CAP_NET_ADMIN): {}",
        std::io::Error::last_os_error()
    );
    socket.connect(&addr.into()).expect("connect to the pod");
    let stream = TcpStream::from(socket);
    stream.set_nodelay(true).expect("nodelay");
    stream
        .set_read_timeout(Some(Duration::from_secs(10)))
        .expect("timeout");
    stream
}

/// Reads one response of the test upstream (body "ok", plain or chunked).
fn read_response(stream: &mut TcpStream) {
    let mut buf = Vec::new();
    let mut byte = [0u8; 256];
    loop {
        let n = stream.read(&mut byte).expect("read response");
        assert!(n > 0, "connection closed mid-response");
        buf.extend_from_slice(&byte[..n]);
        let text = String::from_utf8_lossy(&buf);
        if let Some((head, body)) = text.split_once("\r\n\r\n") {
            let chunked = head.contains("chunked");
            if (chunked && body.ends_with("0\r\n\r\n")) || (!chunked && body == "ok") {
                return;
            }
        }
    }
}

/// The pod's server's [`Held`] totals so far (asked as a kubelet probe: not a request).
fn held(pod: &TestPod) -> Held {
    let (status, body) = raw_http(
        pod.serving_addr(),
        b"GET /held HTTP/1.1\r\nHost: pod\r\nUser-Agent: kube-probe/1.30\r\nConnection: close\r\n\r\n",
    )
    .expect("the server's totals");
    assert_eq!(status, 200, "{body}");
    let n: Vec<u64> = body
        .split_whitespace()
        .map(|v| v.parse().expect("number"))
        .collect();
    let [requests, proxied, ns, proxied_ns, unstamped] = n[..] else {
        panic!("bad totals {body:?}");
    };
    Held {
        requests,
        proxied,
        ns,
        proxied_ns,
        unstamped,
    }
}

/// Checks the kernel's ∫ concurrency dt over a known load (`what`): within 5% of what the
/// pod's server held (the truth the autoscaler wants: time the requests spent in the pod),
/// and no more than the client saw (each request's kernel window lies inside the client's,
/// on the same monotonic clock, however loaded the machine is).
fn check_in_flight(what: &str, kernel_ns: u64, server_ns: u64, client_ns: u128) {
    eprintln!(
        "{what}: kernel {:.4} s, server {:.4} s, client {:.4} s",
        kernel_ns as f64 / 1e9,
        server_ns as f64 / 1e9,
        client_ns as f64 / 1e9
    );
    assert!(
        u128::from(kernel_ns) <= client_ns,
        "{what}: the kernel's in-flight time exceeds the client's"
    );
    assert!(
        within(kernel_ns as f64, server_ns as f64, 0.05),
        "{what}: the kernel's in-flight time is off the server's by more than 5%"
    );
}

fn counters(agent: &Agent, pod: &TestPod) -> serde_json::Value {
    let (status, body) = pod.fetch(&agent.counters_url(pod));
    assert_eq!(status, 200, "{body}");
    serde_json::from_str(&body).expect("counters json")
}

fn field(v: &serde_json::Value, key: &str) -> u64 {
    v[key].as_u64().unwrap_or_else(|| panic!("{key} in {v}"))
}

fn within(actual: f64, expected: f64, tolerance: f64) -> bool {
    (actual - expected).abs() <= expected * tolerance
}

// ---------------------------------------------------------------- tests

fn agent_attaches_and_detaches_through_the_api() {
    let (pod, agent) = serving_pod_and_agent();
    let (programs, maps) = agent.register(&pod);
    assert_eq!(programs.len(), 3, "ingress, egress and sock_ops programs");
    assert!(maps.len() >= 3, "{maps:?}");
    for id in &programs {
        assert!(
            bpftool::exists("prog", *id),
            "program {id} not in the kernel"
        );
    }
    // Attached to the pod's cgroup.
    let attached = program_ids(pod.cgroup.path());
    for id in &programs {
        assert!(
            attached.contains(id),
            "program {id} not attached to {}: {attached:?}",
            pod.cgroup.path().display()
        );
    }
    // A second registration of the same pod is refused.
    let (status, _) = agent.post_pod(&pod.spec());
    assert_eq!(status, 409);
    // Bad registrations get 400 with the reason.
    let (status, body) = agent.post_pod("{\"name\":1}");
    assert_eq!(status, 400, "{body}");

    // Only the pod itself reads its counters: a caller from the host is refused.
    let from_host = http(
        SocketAddr::from((pod.host_ip, agent.node_port)),
        "GET",
        "/v1/counters",
        None,
    )
    .expect("counters from the host");
    assert_eq!(from_host.0, 403, "{}", from_host.1);
    let own = counters(&agent, &pod);
    assert_eq!(own["pod"], pod.name.as_str());

    assert_eq!(agent.unregister(&pod), 204);
    assert_gone(&programs, &maps);
    assert_eq!(agent.pods().as_array().map(Vec::len), Some(0));
    assert_eq!(agent.unregister(&pod), 404);
}

fn counters_match_a_known_load() {
    let (pod, agent) = serving_pod_and_agent();
    agent.register(&pod);

    // Idle: once the registration's connection is closed, the agent does
    // not wake up at all.
    thread::sleep(Duration::from_millis(300));
    let before = agent.context_switches();
    thread::sleep(Duration::from_secs(1));
    assert_eq!(agent.context_switches(), before, "the idle agent woke up");

    let c0 = counters(&agent, &pod);
    let h0 = held(&pod);
    // 4 keep-alive connections x 5 requests of 200 ms; 2 of them proxied. Long requests:
    // the scheduler's delays (waking the server on each request) stay far below 5%.
    let plain = drive(pod.serving_addr(), 4, 5, 2, "/sleep/200");
    // 3 connections x 3 chunked responses of 150 ms, none proxied.
    let chunked = drive(pod.serving_addr(), 3, 3, 0, "/chunked/150");
    let server = held(&pod).since(h0);
    eprintln!("server: {server:?}");
    let c1 = counters(&agent, &pod);

    let requests = plain.requests + chunked.requests;
    let proxied = plain.proxied + chunked.proxied;
    let d = |key: &str| field(&c1, key) - field(&c0, key);
    eprintln!(
        "kernel: arrivals {} (truth {requests}, server {}), proxied {} (truth {proxied}, server {}), \
         completions {}",
        d("arrivals"),
        server.requests,
        d("proxied_arrivals"),
        server.proxied,
        d("completions"),
    );
    assert_eq!((server.requests, server.proxied), (requests, proxied));
    assert_eq!(d("arrivals"), requests);
    assert_eq!(d("proxied_arrivals"), proxied);
    assert_eq!(d("completions"), requests);
    assert_eq!(field(&c1, "concurrency"), 0);
    assert_eq!(field(&c1, "proxied_concurrency"), 0);
    check_in_flight(
        "in-flight",
        d("weighted_ns"),
        server.ns,
        plain.in_flight_ns + chunked.in_flight_ns,
    );
    check_in_flight(
        "proxied in-flight",
        d("weighted_proxied_ns"),
        server.proxied_ns,
        plain.proxied_in_flight_ns + chunked.proxied_in_flight_ns,
    );
}

fn a_pod_that_disappears_leaves_nothing_behind() {
    let (mut pod, agent) = serving_pod_and_agent();
    let (programs, maps) = agent.register(&pod);
    drive(pod.serving_addr(), 1, 2, 0, "/sleep/1");
    // The pod goes: its process exits and its cgroup and namespace are removed.
    pod.destroy();
    wait_until("the agent to notice", || {
        agent.pods().as_array().map(Vec::len) == Some(0)
    });
    assert_gone(&programs, &maps);
}

fn manifest_directory_adds_and_removes_pods() {
    let dir = TestDir::new("agent-manifests");
    let mut pod = TestPod::new();
    pod.start_server();
    let agent = Agent::start(Some(dir.path()));
    let file = dir.join(format!("{}.json", pod.name));
    std::fs::write(&file, pod.spec()).expect("write manifest");
    std::fs::write(dir.join("broken.json"), "{").expect("write broken manifest");
    wait_until("the manifest pod to be attached", || {
        agent.pods().as_array().map(Vec::len) == Some(1)
    });
    let (programs, maps) = ids(&agent.pods()[0]);
    drive(pod.serving_addr(), 2, 3, 0, "/sleep/1");
    assert_eq!(field(&counters(&agent, &pod), "arrivals"), 6);
    std::fs::remove_file(&file).expect("remove manifest");
    wait_until("the manifest pod to be detached", || {
        agent.pods().as_array().map(Vec::len) == Some(0)
    });
    assert_gone(&programs, &maps);
}

/// Reads until `done(bytes so far)`; returns them.
fn read_until(stream: &mut TcpStream, done: impl Fn(&[u8]) -> bool) -> Vec<u8> {
    let mut buf = Vec::new();
    let mut chunk = [0u8; 65536];
    while !done(&buf) {
        let n = stream.read(&mut chunk).expect("read");
        if n == 0 {
            break;
        }
        buf.extend_from_slice(&chunk[..n]);
    }
    buf
}

/// Whether the bytes read so far hold a whole response.
type ResponseEnd<'a> = &'a dyn Fn(&[u8]) -> bool;

fn ends_with(suffix: &'static [u8]) -> impl Fn(&[u8]) -> bool {
    move |b: &[u8]| b.ends_with(suffix)
}

/// Writes `request` on `stream`, then reads until `done(bytes so far)`.
fn ask(stream: &mut TcpStream, request: &[u8], done: impl Fn(&[u8]) -> bool) {
    stream.write_all(request).expect("send");
    read_until(stream, done);
}

fn timed(truth: &mut Truth, f: impl FnOnce()) {
    let start = Instant::now();
    f();
    truth.in_flight_ns += start.elapsed().as_nanos();
    truth.requests += 1;
}

fn every_response_framing_ends_its_request() {
    let (pod, agent) = serving_pod_and_agent();
    agent.register(&pod);
    let c0 = counters(&agent, &pod);
    let h0 = held(&pod);
    let mut truth = Truth::default();
    // Room for the whole big body in the client's receive buffer, so that the server sends
    // it at the kernel's pace, not at the pace the scheduler lets this thread read.
    let mut stream = connect_with_room(pod.serving_addr(), 4 * BIG_BODY);
    let header_end = |b: &[u8]| b.windows(4).any(|w| w == b"\r\n\r\n");
    let whole_big_body = |b: &[u8]| {
        b.windows(4)
            .position(|w| w == b"\r\n\r\n")
            .is_some_and(|p| b.len() - p - 4 >= BIG_BODY)
    };
    let ok_body = ends_with(b"\r\n\r\nok");
    // (request, end of its response, whether it counts as a request)
    let steps: [(&[u8], ResponseEnd, bool); 6] = [
        // HEAD: the response ends with its headers although it announces a length.
        (
            b"HEAD /sleep/200 HTTP/1.1\r\nHost: pod\r\n\r\n",
            &header_end,
            true,
        ),
        // 204: no body.
        (
            b"GET /nocontent/200 HTTP/1.1\r\nHost: pod\r\n\r\n",
            &header_end,
            true,
        ),
        // 100 Continue, then the real answer.
        (
            b"GET /continue/200 HTTP/1.1\r\nHost: pod\r\n\r\n",
            &ok_body,
            true,
        ),
        // A body of many segments, counted down by Content-Length.
        (
            b"GET /big/200 HTTP/1.1\r\nHost: pod\r\n\r\n",
            &whole_big_body,
            true,
        ),
        // A kubelet-style probe is not a request.
        (
            b"GET /sleep/20 HTTP/1.1\r\nHost: pod\r\nUser-Agent: kube-probe/1.30\r\n\r\n",
            &ok_body,
            false,
        ),
        // Close-delimited body: the request ends with the connection.
        (
            b"GET /close/200 HTTP/1.1\r\nHost: pod\r\n\r\n",
            &|_| false,
            true,
        ),
    ];
    for (request, done, counted) in steps {
        if counted {
            timed(&mut truth, || ask(&mut stream, request, done));
        } else {
            ask(&mut stream, request, done);
        }
    }
    let server = held(&pod).since(h0);
    eprintln!("server: {server:?}");
    let c1 = counters(&agent, &pod);
    let d = |key: &str| field(&c1, key) - field(&c0, key);
    eprintln!(
        "framings: arrivals {} (truth {}, server {}), completions {}",
        d("arrivals"),
        truth.requests,
        server.requests,
        d("completions"),
    );
    assert_eq!(server.requests, truth.requests);
    assert_eq!(d("arrivals"), truth.requests);
    assert_eq!(d("completions"), truth.requests);
    assert_eq!(field(&c1, "concurrency"), 0);
    check_in_flight("framings", d("weighted_ns"), server.ns, truth.in_flight_ns);

    // A client that resets the connection mid-request: the request ends at the reset.
    let aborted = TcpStream::connect(pod.serving_addr()).expect("connect");
    (&aborted)
        .write_all(b"GET /sleep/5000 HTTP/1.1\r\nHost: pod\r\n\r\n")
        .expect("send");
    wait_until("the request to be in flight", || {
        field(&counters(&agent, &pod), "concurrency") == 1
    });
    let socket = socket2::SockRef::from(&aborted);
    socket.set_linger(Some(Duration::ZERO)).expect("linger 0");
    drop(aborted);
    wait_until("the reset to end the request", || {
        field(&counters(&agent, &pod), "concurrency") == 0
    });
    let c2 = counters(&agent, &pod);
    assert_eq!(field(&c2, "completions"), field(&c2, "arrivals"));
}

// ---------------------------------------------------------------- queue-proxy-ebpf

/// Runs `program` inside the pod's cgroup and namespace (replaces this process).
fn exec_main(cgroup: &str, netns: &str, command: &[String]) -> ExitCode {
    use std::os::unix::process::CommandExt;
    enter(Some(cgroup), netns);
    let error = Command::new(&command[0]).args(&command[1..]).exec();
    eprintln!("exec {}: {error}", command[0]);
    ExitCode::FAILURE
}

/// queue-proxy-ebpf's binary, built by `cargo test --workspace` (or
/// `cargo build -p queue-proxy-ebpf`) next to this test's directory.
fn queue_proxy_binary() -> PathBuf {
    let exe = std::env::current_exe().expect("exe");
    let path = exe
        .parent()
        .and_then(Path::parent)
        .expect("target dir")
        .join("queue-proxy-ebpf");
    assert!(
        path.exists(),
        "{} is missing: run `cargo build -p queue-proxy-ebpf` (cargo test --workspace builds it)",
        path.display()
    );
    path
}

/// The autoscaler's view: Knative's Stat message (stat.proto).
#[derive(Clone, PartialEq, prost::Message)]
struct Stat {
    #[prost(string, tag = "1")]
    pod_name: String,
    #[prost(double, tag = "2")]
    average_concurrent_requests: f64,
    #[prost(double, tag = "3")]
    average_proxied_concurrent_requests: f64,
    #[prost(double, tag = "4")]
    request_count: f64,
    #[prost(double, tag = "5")]
    proxied_request_count: f64,
    #[prost(double, tag = "6")]
    process_uptime: f64,
    #[prost(int64, tag = "7")]
    timestamp: i64,
}

struct QueueProxy {
    child: Child,
    log: PathBuf,
}

impl QueueProxy {
    /// Starts queue-proxy-ebpf in `pod` with the `accounting` variables.
    fn start(pod: &TestPod, accounting: &[(&str, String)]) -> Self {
        let log = std::env::temp_dir().join(format!("{}-qp.log", pod.name));
        let log_file = std::fs::File::create(&log).expect("qp log");
        let env = [
            ("SERVING_NAMESPACE", "default"),
            ("SERVING_SERVICE", "hello"),
            ("SERVING_CONFIGURATION", "hello"),
            ("SERVING_REVISION", "hello-00001"),
            ("SERVING_POD", pod.name.as_str()),
            ("SERVING_POD_IP", &pod.pod_ip.to_string()),
            ("QUEUE_SERVING_PORT", "8012"),
            ("QUEUE_SERVING_TLS_PORT", "8112"),
            ("USER_PORT", &SERVING_PORT.to_string()),
            ("CONTAINER_CONCURRENCY", "0"),
            ("REVISION_TIMEOUT_SECONDS", "300"),
            ("SERVING_LOGGING_CONFIG", ""),
            ("SERVING_LOGGING_LEVEL", "info"),
        ]
        .map(|(k, v)| (k.to_owned(), v.to_owned()))
        .into_iter()
        .chain(accounting.iter().map(|(k, v)| ((*k).to_owned(), v.clone())));
        let child = Command::new(std::env::current_exe().expect("exe"))
            .args([
                "exec",
                pod.cgroup.path().to_str().expect("utf-8"),
                &pod.netns,
                queue_proxy_binary().to_str().expect("utf-8"),
            ])
            .env_clear()
            .envs(env)
            .stdout(Stdio::null())
            .stderr(log_file)
            .spawn()
            .expect("spawn queue-proxy-ebpf");
        let qp = Self { child, log };
        wait_until("queue-proxy-ebpf to answer", || {
            TcpStream::connect_timeout(
                &SocketAddr::from((pod.pod_ip, 9090)),
                Duration::from_millis(200),
            )
            .is_ok()
        });
        qp
    }

    fn log(&self) -> String {
        std::fs::read_to_string(&self.log).unwrap_or_default()
    }

    fn stat(&self, pod: &TestPod) -> Stat {
        let (status, body) = exchange(
            SocketAddr::from((pod.pod_ip, 9090)),
            b"GET /metrics HTTP/1.1\r\nHost: qp\r\nAccept: application/protobuf\r\nConnection: close\r\n\r\n",
        )
        .expect("scrape");
        assert_eq!(status, 200, "{}", String::from_utf8_lossy(&body));
        <Stat as prost::Message>::decode(&body[..]).expect("Stat protobuf")
    }
}

impl Drop for QueueProxy {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
        let _ = std::fs::remove_file(&self.log);
    }
}

/// queue-proxy-ebpf's variables for accounting through the agent on `port`.
fn agent_env(pod: &TestPod, port: u16) -> Vec<(&'static str, String)> {
    vec![
        ("SPRIGHT_ACCOUNTING", "agent".to_owned()),
        ("HOST_IP", pod.host_ip.to_string()),
        ("SPRIGHT_AGENT_PORT", port.to_string()),
    ]
}

fn queue_proxy_reports_the_kernel_counters() {
    let (pod, agent) = serving_pod_and_agent();
    agent.register(&pod);
    check_stats(
        &pod,
        &QueueProxy::start(&pod, &agent_env(&pod, agent.node_port)),
    );
}

fn context_switches(pid: u32) -> u64 {
    let mut total = 0;
    for task in std::fs::read_dir(format!("/proc/{pid}/task"))
        .expect("tasks")
        .flatten()
    {
        let status = std::fs::read_to_string(task.path().join("status")).unwrap_or_default();
        for line in status.lines() {
            if line.starts_with("voluntary_ctxt_switches")
                || line.starts_with("nonvoluntary_ctxt_switches")
            {
                total += line
                    .split_whitespace()
                    .last()
                    .and_then(|v| v.parse::<u64>().ok())
                    .unwrap_or(0);
            }
        }
    }
    total
}

fn standalone_queue_proxy_loads_the_programs_itself() {
    let mut pod = TestPod::new();
    pod.start_server();
    let qp = QueueProxy::start(&pod, &[("SPRIGHT_ACCOUNTING", "standalone".to_owned())]);
    check_stats(&pod, &qp);
}

/// Drives a known load through queue-proxy-ebpf and compares its Stat.
fn check_stats(pod: &TestPod, qp: &QueueProxy) {
    assert!(
        qp.log().contains("request accounting in the kernel"),
        "queue-proxy-ebpf did not select kernel accounting: {}",
        qp.log()
    );
    // The first report needs one period since start; the next covers the load: it starts
    // after the first scrape answered and ends before the second is sent, so the sidecar's
    // window (between its two reads of the counters, one in each scrape) holds all of it.
    thread::sleep(Duration::from_millis(1100));
    let h0 = held(pod);
    let outer_start = Instant::now();
    let _ = qp.stat(pod);
    let inner_start = Instant::now();
    // 4 connections x 5 requests of 200 ms, 2 connections proxied.
    let truth = drive(SocketAddr::from((pod.pod_ip, 8012)), 4, 5, 2, "/sleep/200");
    // The report is renewed only a period after the last one.
    thread::sleep(Duration::from_millis(
        1000u64.saturating_sub(inner_start.elapsed().as_millis() as u64),
    ));
    let inner = inner_start.elapsed().as_secs_f64();
    let stat = qp.stat(pod);
    let outer = outer_start.elapsed().as_secs_f64();
    let server = held(pod).since(h0);
    eprintln!("server: {server:?}");
    thread::sleep(Duration::from_millis(300));
    let before = context_switches(qp.child.id());
    thread::sleep(Duration::from_secs(1));
    assert_eq!(
        context_switches(qp.child.id()),
        before,
        "the idle sidecar woke up"
    );
    // The Stat's rates are over the sidecar's window (between its reads of the counters,
    // one inside each scrape), which lies between `inner` and `outer`; how far from either
    // depends on how the scheduler treats the scrapes, so the window is not taken from this
    // side. The load, all inside it, is known exactly: N requests, P proxied, held S s.
    // Then request_count × window = N, proxied_request_count / request_count = P / N and
    // average_concurrent_requests / request_count × N = the kernel's in-flight seconds.
    let n = truth.requests as f64;
    let rc = stat.request_count;
    eprintln!(
        "stat over {inner:.3}..{outer:.3} s: {stat:?}; truth: {} requests ({} proxied); the \
         server held them {:.4} s ({:.4} s proxied), the client {:.4} s ({:.4} s proxied)",
        truth.requests,
        truth.proxied,
        server.ns as f64 / 1e9,
        server.proxied_ns as f64 / 1e9,
        truth.in_flight_ns as f64 / 1e9,
        truth.proxied_in_flight_ns as f64 / 1e9,
    );
    assert_eq!(stat.pod_name, pod.name);
    assert_eq!(
        (server.requests, server.proxied),
        (truth.requests, truth.proxied),
        "the server saw the load"
    );
    let slack = 1e-9;
    assert!(
        rc * inner * (1.0 - slack) <= n && n <= rc * outer * (1.0 + slack),
        "request count: {rc}/s is not {n} requests over a window of {inner:.3}..{outer:.3} s"
    );
    assert!(
        within(
            stat.proxied_request_count / rc,
            truth.proxied as f64 / n,
            slack
        ),
        "proxied request count"
    );
    let kernel_s = stat.average_concurrent_requests / rc * n;
    let kernel_proxied_s = stat.average_proxied_concurrent_requests / rc * n;
    eprintln!("stat: in-flight {kernel_s:.4} s ({kernel_proxied_s:.4} s proxied)");
    check_in_flight(
        "stat in-flight",
        (kernel_s * 1e9) as u64,
        server.ns,
        truth.in_flight_ns,
    );
    check_in_flight(
        "stat proxied in-flight",
        (kernel_proxied_s * 1e9) as u64,
        server.proxied_ns,
        truth.proxied_in_flight_ns,
    );
}

fn queue_proxy_without_the_agent_falls_back_and_says_so() {
    let mut pod = TestPod::new();
    pod.start_server();
    // No agent listens on this port.
    let qp = QueueProxy::start(&pod, &agent_env(&pod, free_port()));
    assert!(
        qp.log().contains("falling back to userspace accounting"),
        "no fallback message in the log: {}",
        qp.log()
    );
    // Userspace accounting still reports: load over more than one period,
    // then the last closed window holds requests.
    let truth = drive(SocketAddr::from((pod.pod_ip, 8012)), 2, 30, 0, "/sleep/40");
    let stat = qp.stat(&pod);
    eprintln!("fallback stat: {stat:?} after {} requests", truth.requests);
    assert_eq!(stat.pod_name, pod.name);
    assert!(stat.request_count > 0.0, "{stat:?}");
    assert!(stat.average_concurrent_requests > 0.0, "{stat:?}");
}

fn split_headers_and_random_bytes_keep_the_counters_sane() {
    let (pod, agent) = serving_pod_and_agent();
    agent.register(&pod);

    // A proxied request written a few bytes at a time: the header scanner
    // keeps its place across segments.
    let c0 = counters(&agent, &pod);
    let mut stream = connect(pod.serving_addr());
    let request = b"GET /sleep/10 HTTP/1.1\r\nHost: pod\r\nK-Proxy-Request: activator\r\n\r\n";
    for piece in request.chunks(3) {
        stream.write_all(piece).expect("send");
        thread::sleep(Duration::from_millis(1));
    }
    read_until(&mut stream, ends_with(b"\r\n\r\nok"));
    drop(stream);
    let c1 = counters(&agent, &pod);
    assert_eq!(field(&c1, "arrivals") - field(&c0, "arrivals"), 1);
    assert_eq!(
        field(&c1, "proxied_arrivals") - field(&c0, "proxied_arrivals"),
        1
    );
    assert_eq!(field(&c1, "proxied_concurrency"), 0);

    // Random bytes, some shaped like requests, in random pieces, on
    // connections closed at random points: whatever was counted ends.
    let seed = 0x5eed_1234_abcd_0001 ^ u64::from(std::process::id());
    // A failure replays with this seed.
    eprintln!("random input seed {seed:#x}");
    let mut rng = Rng(seed);
    let words: [&[u8]; 8] = [
        b"GET ",
        b"POST ",
        b"/sleep/1 HTTP/1.1\r\n",
        b"K-Proxy-Request: activator\r\n",
        b"content-length: 5\r\n",
        b"\r\n",
        b"PRI * HTTP/2.0\r\n",
        b"User-Agent: kube-probe/1\r\n",
    ];
    for _ in 0..40 {
        let stream = connect(pod.serving_addr());
        for _ in 0..rng.below(12) {
            let mut piece: Vec<u8> = if rng.below(2) == 0 {
                words[rng.below(words.len())].to_vec()
            } else {
                (0..rng.below(64)).map(|_| rng.next_u64() as u8).collect()
            };
            if rng.below(8) == 0 {
                piece.extend_from_slice(b"\r\n\r\n");
            }
            if (&stream).write_all(&piece).is_err() {
                break;
            }
        }
        if rng.below(3) == 0 {
            socket2::SockRef::from(&stream)
                .set_linger(Some(Duration::ZERO))
                .expect("linger 0");
        }
        drop(stream);
    }
    let deadline = Instant::now() + Duration::from_secs(10);
    loop {
        let c = counters(&agent, &pod);
        if field(&c, "concurrency") == 0
            && field(&c, "proxied_concurrency") == 0
            && field(&c, "completions") == field(&c, "arrivals")
        {
            break;
        }
        assert!(
            Instant::now() < deadline,
            "requests still counted in flight (seed {seed:#x}): {c}"
        );
        thread::sleep(Duration::from_millis(20));
    }
}

/// Waits until nothing is counted in flight and every arrival has completed.
fn wait_for_quiet(agent: &Agent, pod: &TestPod, what: &str) -> serde_json::Value {
    let deadline = Instant::now() + Duration::from_secs(10);
    loop {
        let c = counters(agent, pod);
        if field(&c, "concurrency") == 0
            && field(&c, "proxied_concurrency") == 0
            && field(&c, "completions") == field(&c, "arrivals")
            && field(&c, "proxied_completions") == field(&c, "proxied_arrivals")
        {
            return c;
        }
        assert!(
            Instant::now() < deadline,
            "{what}: requests still counted in flight: {c}"
        );
        thread::sleep(Duration::from_millis(20));
    }
}

/// Regression: `K-Proxy-Request` counted as a proxied arrival in one segment,
/// `User-Agent: kube-probe/` in a later one. The probe's arrival was taken
/// back but not its proxied arrival, and a probe's end releases nothing, so
/// proxied concurrency stayed at 1 for good. The first case is the exact
/// connection of the random test's seed 0x5eed1234abcd0a10 that did it.
fn a_probe_seen_after_its_proxy_header_takes_back_the_proxied_arrival() {
    let (pod, agent) = serving_pod_and_agent();
    agent.register(&pod);
    let c0 = counters(&agent, &pod);
    let pieces: [&[u8]; 9] = [
        b"\xf3\x9e\x9am\xf8a\x94{\xfb\xdd`\x9c\xfc7v L\xf20\x86\x9f\xce\x81\xa2\x99A\xb4\xce\xa9\x89PU\x01\xd0\x1e\x1a\xa65xq\x17\r\n\r\n",
        b"\x97\xec\xe2j\xa6\xdc\xb0!\x07\xd7\x01\x08\xdce|\xce\xb7\x19V\xf7\xd5\x99\x1b",
        b"\xeb\x9ax\xffn\xfd\xabc<'\xcf\x96\xd3\xb4*^",
        b"POST ",
        b"content-length: 5\r\n",
        b"K-Proxy-Request: activator\r\n",
        b"User-Agent: kube-probe/1\r\n",
        b"User-Agent: kube-probe/1\r\n",
        b"\r\n",
    ];
    let stream = connect(pod.serving_addr());
    for piece in pieces {
        (&stream).write_all(piece).expect("send");
        // One segment per piece (TCP_NODELAY, and time for each to leave).
        thread::sleep(Duration::from_millis(2));
    }
    drop(stream);
    let c1 = wait_for_quiet(&agent, &pod, "seed 0x5eed1234abcd0a10, connection 0");
    let d = |c: &serde_json::Value, key: &str| field(c, key) - field(&c0, key);
    // A probe is not a request, proxied or not.
    assert_eq!(d(&c1, "arrivals"), 0, "{c1}");
    assert_eq!(d(&c1, "proxied_arrivals"), 0, "{c1}");

    // The same with a well-formed probe on a keep-alive connection, then a
    // proxied request on it that is counted as usual.
    let mut stream = connect(pod.serving_addr());
    stream
        .write_all(b"GET /sleep/1 HTTP/1.1\r\nHost: pod\r\nK-Proxy-Request: activator\r\n")
        .expect("send");
    thread::sleep(Duration::from_millis(2));
    ask(
        &mut stream,
        b"User-Agent: kube-probe/1.30\r\n\r\n",
        ends_with(b"\r\n\r\nok"),
    );
    let c2 = wait_for_quiet(&agent, &pod, "well-formed split probe");
    assert_eq!(d(&c2, "arrivals"), 0, "{c2}");
    assert_eq!(d(&c2, "proxied_arrivals"), 0, "{c2}");
    ask(
        &mut stream,
        b"GET /sleep/1 HTTP/1.1\r\nHost: pod\r\nK-Proxy-Request: activator\r\n\r\n",
        ends_with(b"\r\n\r\nok"),
    );
    drop(stream);
    let c3 = wait_for_quiet(&agent, &pod, "proxied request after the probe");
    assert_eq!(d(&c3, "arrivals"), 1, "{c3}");
    assert_eq!(d(&c3, "proxied_arrivals"), 1, "{c3}");
    assert_eq!(d(&c3, "proxied_completions"), 1, "{c3}");
}

fn ipv6_requests_are_counted() {
    let (pod, agent) = serving_pod_and_agent();
    agent.register(&pod);
    let c0 = counters(&agent, &pod);
    let h0 = held(&pod);
    let truth = drive(
        SocketAddr::from((pod.pod_ip6, SERVING_PORT)),
        2,
        2,
        1,
        "/sleep/250",
    );
    let server = held(&pod).since(h0);
    eprintln!("server: {server:?}");
    let c1 = counters(&agent, &pod);
    let d = |key: &str| field(&c1, key) - field(&c0, key);
    eprintln!(
        "ipv6: arrivals {} (truth {}, server {})",
        d("arrivals"),
        truth.requests,
        server.requests
    );
    assert_eq!(server.requests, truth.requests);
    assert_eq!(d("arrivals"), truth.requests);
    assert_eq!(d("proxied_arrivals"), truth.proxied);
    assert_eq!(d("completions"), truth.requests);
    check_in_flight("ipv6", d("weighted_ns"), server.ns, truth.in_flight_ns);
}

/// Binds a listener inside the pod's namespace (from a thread that joined it).
fn listen_in(pod: &TestPod, port: u16) -> TcpListener {
    let netns = pod.netns.clone();
    thread::spawn(move || {
        enter(None, &netns);
        TcpListener::bind(("::", port)).expect("bind in the pod")
    })
    .join()
    .expect("listener thread")
}

fn event_driven_steering_skips_the_sidecar() {
    use spright_ebpf::steering::Steering;
    let pod = TestPod::new();
    let user = listen_in(&pod, SERVING_PORT);
    // The sidecar's own listener on the serving port.
    let sidecar = listen_in(&pod, 8012);
    sidecar.set_nonblocking(true).expect("nonblocking");
    let mut steering = Steering::attach(Path::new(&format!("/var/run/netns/{}", pod.netns)), 8012)
        .unwrap_or_else(|e| panic!("attaching sk_lookup: {e}"));
    steering.set_target(&user).expect("target");

    // A connection to 8012 lands on the user container's socket.
    let mut client = TcpStream::connect((pod.pod_ip, 8012)).expect("connect 8012");
    let (mut accepted, _) = user.accept().expect("user accepts");
    // The steered connection keeps the port it was addressed to.
    assert_eq!(accepted.local_addr().expect("local").port(), 8012);
    client.write_all(b"ping").expect("send");
    let mut buf = [0u8; 4];
    accepted.read_exact(&mut buf).expect("read");
    assert_eq!(&buf, b"ping");
    accepted.write_all(b"pong").expect("answer");
    client.read_exact(&mut buf).expect("read answer");
    assert_eq!(&buf, b"pong");
    assert_eq!(steering.steered().expect("count"), 1);
    // The sidecar saw nothing.
    assert!(matches!(sidecar.accept(), Err(e) if e.kind() == std::io::ErrorKind::WouldBlock));

    // Without a target, the sidecar answers on its port again.
    steering.clear_target().expect("clear");
    let _second = TcpStream::connect((pod.pod_ip, 8012)).expect("connect 8012");
    sidecar.set_nonblocking(false).expect("blocking");
    sidecar.accept().expect("the sidecar accepts");
    assert_eq!(steering.steered().expect("count"), 1);
    steering.detach().expect("detach");
}

// ---------------------------------------------------------------- event-driven mode (EPROXY)

/// The sidecar's variables for event-driven mode: its own request metrics on
/// 9091 (to show it sees no request) and a one-shot TCP readiness probe.
fn event_driven_env() -> Vec<(&'static str, String)> {
    vec![
        ("SPRIGHT_DATAPLANE_MODE", "event-driven".to_owned()),
        (
            "OBSERVABILITY_CONFIG",
            r#"{"requestMetrics":{"protocol":"prometheus"}}"#.to_owned(),
        ),
        (
            "SERVING_READINESS_PROBE",
            format!(
                r#"{{"tcpSocket":{{"port":{SERVING_PORT},"host":"127.0.0.1"}},"periodSeconds":1,"timeoutSeconds":1}}"#
            ),
        ),
    ]
}

/// Requests the sidecar itself served (its request metrics on 9091).
fn sidecar_requests(pod: &TestPod) -> u64 {
    let (status, body) = http(
        SocketAddr::from((pod.pod_ip, 9091)),
        "GET",
        "/metrics",
        None,
    )
    .expect("sidecar metrics");
    assert_eq!(status, 200, "{body}");
    body.lines()
        .filter(|l| l.starts_with("kn_serving_invocation_duration_seconds_count"))
        .filter_map(|l| l.split_whitespace().last()?.parse::<u64>().ok())
        .sum()
}

/// activator-lite's readiness probe on the admin port.
fn queue_probe(pod: &TestPod) -> (u16, String) {
    raw_http(
        SocketAddr::from((pod.pod_ip, 8022)),
        b"GET / HTTP/1.1\r\nHost: qp\r\nK-Network-Probe: queue\r\nUser-Agent: activator-lite\r\nConnection: close\r\n\r\n",
    )
    .expect("probe answer")
}

/// One request to the serving port on a fresh connection that the user
/// container closes after answering.
fn one_request(pod: &TestPod) -> (u16, String) {
    http(
        SocketAddr::from((pod.pod_ip, 8012)),
        "GET",
        "/close/0",
        None,
    )
    .expect("request to the serving port")
}

/// The sk_lookup links attached to the pod's network namespace, from
/// `bpftool link show` (bpftool 7.1's `bpftool net` does not list sk_lookup).
fn sk_lookup_links(pod: &TestPod) -> Vec<serde_json::Value> {
    use std::os::unix::fs::MetadataExt;
    let ino = std::fs::metadata(format!("/var/run/netns/{}", pod.netns))
        .expect("netns")
        .ino();
    bpftool::json(&["link", "show"])
        .as_array()
        .into_iter()
        .flatten()
        .filter(|l| l["attach_type"] == "sk_lookup" && l["netns_ino"] == ino)
        .cloned()
        .collect()
}

/// The sidecar sees no request while a known load is steered past it; its
/// Stat (from the kernel counters) matches the load; a restarted user
/// container is steered to again.
fn check_event_driven(pod: &mut TestPod, qp: &QueueProxy, steered: &dyn Fn() -> (u64, u64)) {
    assert!(
        qp.log().contains("\"mode\":\"event-driven\""),
        "mode not logged: {}",
        qp.log()
    );
    let served_before = sidecar_requests(pod);
    let (steered_before, taken_before) = steered();
    let switches_before = context_switches(qp.child.id());
    check_stats(pod, qp);
    let served = sidecar_requests(pod) - served_before;
    let (steered_after, taken_after) = steered();
    eprintln!(
        "event-driven: sidecar served {served}, kernel steered {} connections",
        steered_after - steered_before
    );
    assert_eq!(served, 0, "requests took the userspace hop");
    // check_stats drives 4 keep-alive connections.
    assert_eq!(steered_after - steered_before, 4, "connections steered");
    assert_eq!(taken_after, taken_before, "no listen(2) during the load");
    // Besides the two scrapes and the metrics reads, the sidecar did nothing
    // per request: far fewer wake-ups than the 20 requests would need.
    let switches = context_switches(qp.child.id()) - switches_before;
    eprintln!("event-driven: sidecar context switches during the load {switches}");

    // activator-lite's probe: ready while the user container listens.
    assert_eq!(queue_probe(pod), (200, "queue".to_owned()));

    // The user container stops: its listener leaves the sockmap, the
    // sidecar's own listener takes the connections (and answers 502), and
    // the probe says not ready.
    pod.stop_server();
    let served_before = sidecar_requests(pod);
    let (status, _) = one_request(pod);
    assert_eq!(status, 502, "the sidecar's fallback answers");
    assert_eq!(sidecar_requests(pod) - served_before, 1);
    assert_eq!(queue_probe(pod).0, 503);

    // It restarts: its listen(2) makes its socket the target again.
    pod.start_server();
    let (steered_before, _) = steered();
    let served_before = sidecar_requests(pod);
    let (status, body) = one_request(pod);
    assert_eq!((status, body.as_str()), (200, "ok"));
    let (steered_after, taken_after) = steered();
    assert_eq!(
        steered_after - steered_before,
        1,
        "restarted container steered"
    );
    assert_eq!(taken_after, taken_before + 1, "new listener taken");
    assert_eq!(sidecar_requests(pod), served_before);
    assert_eq!(queue_probe(pod), (200, "queue".to_owned()));
}

fn event_driven_pod_through_the_agent() {
    let mut pod = TestPod::new();
    // The user container listens before the pod is registered: the agent
    // takes its socket with pidfd_getfd.
    pod.start_server();
    let agent = Agent::start(None);
    let spec = pod.spec().trim_end_matches('}').to_owned() + r#","mode":"event-driven"}"#;
    let (status, body) = agent.post_pod(&spec);
    assert_eq!(status, 201, "{body}");
    let info: serde_json::Value = serde_json::from_str(&body).expect("json");
    let (programs, maps) = ids(&info);
    assert_eq!(
        programs.len(),
        5,
        "accounting (3), sk_lookup and listen hook: {info}"
    );
    assert_eq!(info["listeners_taken"], 1, "{info}");
    let links = sk_lookup_links(&pod);
    assert_eq!(links.len(), 1, "{links:?}");
    assert!(programs.contains(&links[0]["prog_id"].as_u64().expect("prog_id")));

    let mut env = agent_env(&pod, agent.node_port);
    env.extend(event_driven_env());
    let qp = QueueProxy::start(&pod, &env);
    let steered = || {
        let pods = agent.pods();
        let p = &pods[0];
        (
            p["steered"].as_u64().expect("steered"),
            p["listeners_taken"].as_u64().expect("listeners_taken"),
        )
    };
    check_event_driven(&mut pod, &qp, &steered);

    // The pod goes away (its processes exit): nothing is left behind.
    drop(qp);
    pod.stop_server();
    wait_until("the agent to notice", || {
        agent.pods().as_array().map(Vec::len) == Some(0)
    });
    assert_gone(&programs, &maps);
    assert_eq!(sk_lookup_links(&pod), Vec::<serde_json::Value>::new());
}

fn standalone_event_driven_sidecar_steers_itself() {
    let mut pod = TestPod::new();
    pod.start_server();
    let mut env = vec![("SPRIGHT_ACCOUNTING", "standalone".to_owned())];
    env.extend(event_driven_env());
    let qp = QueueProxy::start(&pod, &env);
    assert!(
        qp.log()
            .contains("steered in the kernel to the user container"),
        "{}",
        qp.log()
    );
    // The sidecar's own programs: read the steering count from the kernel
    // (pod netns -> sk_lookup link -> program -> its steer_count map).
    let links = sk_lookup_links(&pod);
    assert_eq!(links.len(), 1, "{links:?}");
    let prog = links[0]["prog_id"].as_u64().expect("prog_id").to_string();
    let count_map = bpftool::json(&["prog", "show", "id", &prog])["map_ids"]
        .as_array()
        .into_iter()
        .flatten()
        .filter_map(serde_json::Value::as_u64)
        .find(|id| bpftool::json(&["map", "show", "id", &id.to_string()])["name"] == "steer_count")
        .expect("steer_count map")
        .to_string();
    let steered = || {
        let dump = bpftool::json(&["map", "dump", "id", &count_map]);
        let sum = |key: u64| -> u64 {
            dump.as_array()
                .into_iter()
                .flatten()
                .filter(|e| e["formatted"]["key"] == key)
                .flat_map(|e| {
                    e["formatted"]["values"]
                        .as_array()
                        .cloned()
                        .unwrap_or_default()
                })
                .filter_map(|c| c["value"].as_u64())
                .sum()
        };
        (sum(0), sum(1))
    };
    check_event_driven(&mut pod, &qp, &steered);
    // The sidecar goes: its programs go with it.
    drop(qp);
    wait_until("the sidecar's sk_lookup link to go", || {
        sk_lookup_links(&pod).is_empty()
    });
}

fn kubelet_probes_from_the_node_reach_the_sidecar() {
    let (pod, agent) = serving_pod_and_agent();
    let spec = pod.spec().trim_end_matches('}').to_owned()
        + r#","mode":"event-driven","bypass":["node"]}"#;
    let (status, body) = agent.post_pod(&spec);
    assert_eq!(status, 201, "{body}");
    let mut env = agent_env(&pod, agent.node_port);
    env.extend(event_driven_env());
    let qp = QueueProxy::start(&pod, &env);
    let counts = || {
        let pods = agent.pods();
        (
            pods[0]["steered"].as_u64().expect("steered"),
            pods[0]["bypassed"].as_u64().expect("bypassed"),
        )
    };
    let (steered0, bypassed0) = counts();

    // Knative's readiness probe of the queue-proxy container, from the node
    // (this test runs in the node's namespace): the sidecar answers it.
    let answer = raw_http(
        SocketAddr::from((pod.pod_ip, 8012)),
        b"GET / HTTP/1.1\r\nHost: pod\r\nUser-Agent: kube-probe/1.30\r\nK-Network-Probe: queue\r\nConnection: close\r\n\r\n",
    )
    .expect("probe answer");
    assert_eq!(answer, (200, "queue".to_owned()));
    let (steered1, bypassed1) = counts();
    assert_eq!((steered1, bypassed1), (steered0, bypassed0 + 1));

    // From inside the pod's namespace (another source), requests are steered.
    let (status, body) = pod.fetch(&format!("http://{}:8012/close/0", pod.pod_ip));
    assert_eq!((status, body.trim()), (200, "ok"));
    assert_eq!(counts(), (steered1 + 1, bypassed1));
    drop(qp);
}

fn full_mode_pod_gets_the_loopback_redirect() {
    let (pod, agent) = serving_pod_and_agent();
    let spec = pod.spec().trim_end_matches('}').to_owned() + r#","mode":"full"}"#;
    let (status, body) = agent.post_pod(&spec);
    assert_eq!(status, 201, "{body}");
    let info: serde_json::Value = serde_json::from_str(&body).expect("json");
    let (programs, maps) = ids(&info);
    assert_eq!(programs.len(), 5, "accounting (3) and loopback (2): {info}");
    for id in &programs {
        assert!(
            bpftool::exists("prog", *id),
            "program {id} not in the kernel"
        );
    }
    assert_eq!(agent.unregister(&pod), 204);
    assert_gone(&programs, &maps);
}
