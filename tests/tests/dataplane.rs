//! The dataplane end to end: the real gateway and the real sample-chain function processes,
//! over the real eBPF sk_msg redirect and over the Unix-socket fallback. Every case runs on
//! both transports. The sk_msg cases load the eBPF programs, so they need root; without it
//! they fail with the loader's message naming the missing capability.

use std::net::SocketAddr;
use std::path::PathBuf;
use std::process::Command;
use std::time::Duration;

use nix::sys::signal::{Signal, kill};
use nix::unistd::Pid;
use spright_e2e::{Proc, Resp, bin, free_port, http, metric, temp_dir, wait_until};
use spright_sample_chain::{run_chain_locally, sample_body};

const TRANSPORTS: [&str; 2] = ["sk_msg", "unix"];

struct Stack {
    gateway: Proc,
    addr: SocketAddr,
    transport: &'static str,
    _dir: PathBuf,
}

impl Stack {
    /// Starts the gateway with the motion chain (plus a `ghost` function nobody starts, on
    /// route /ghost), waits until the four real functions are attached.
    fn start(transport: &'static str, slots: u32) -> Self {
        let dir = temp_dir(&format!("dp-{transport}"));
        let fn_bin = bin("spright-sample-chain");
        let mut yaml = String::from("functions:\n");
        for step in spright_sample_chain::STEPS {
            yaml.push_str(&format!(
                "  - name: {step}\n    command: [{:?}, {step:?}]\n",
                fn_bin.display().to_string()
            ));
        }
        yaml.push_str("  - name: ghost\n");
        yaml.push_str("chains:\n  - name: motion\n    route: /motion\n    steps: [decode, denoise, detect, alert]\n");
        yaml.push_str("  - name: ghost\n    route: /ghost\n    steps: [decode, ghost]\n");
        let chain = dir.join("chain.yaml");
        std::fs::write(&chain, yaml).expect("chain file");
        let port = free_port();
        let addr: SocketAddr = ([127, 0, 0, 1], port).into();
        let mut cmd = Command::new(bin("spright-gateway"));
        cmd.arg("--chain")
            .arg(&chain)
            .arg("--listen")
            .arg(addr.to_string())
            .arg("--transport")
            .arg(transport)
            .arg("--run-dir")
            .arg(dir.join("run"))
            .arg("--slots")
            .arg(slots.to_string())
            .arg("--slot-size")
            .arg("65536")
            .arg("--request-timeout")
            .arg("20s");
        let mut gateway = Proc::spawn(cmd, &dir.join("gateway.log"));
        let up = wait_until(Duration::from_secs(30), || {
            http(addr, "GET", "/functions", b"")
                .ok()
                .and_then(|r| serde_json::from_slice::<Vec<serde_json::Value>>(&r.body).ok())
                .is_some_and(|v| v.len() == 4)
        });
        assert!(
            up && gateway.running(),
            "gateway ({transport}) did not attach its 4 functions:\n{}",
            gateway.log_text()
        );
        Self {
            gateway,
            addr,
            transport,
            _dir: dir,
        }
    }

    fn post(&self, path: &str, body: &[u8]) -> Resp {
        http(self.addr, "POST", path, body).expect("request")
    }

    /// Sends `n` motion requests from threads; join the handles for the answers.
    fn post_in_background(&self, n: usize) -> Vec<std::thread::JoinHandle<Resp>> {
        (0..n)
            .map(|_| {
                let addr = self.addr;
                std::thread::spawn(move || {
                    http(addr, "POST", "/motion", sample_body(16).as_bytes()).expect("request")
                })
            })
            .collect()
    }

    fn metrics(&self) -> String {
        http(self.addr, "GET", "/metrics", b"")
            .expect("metrics")
            .text()
    }

    fn free_slots(&self) -> f64 {
        metric(&self.metrics(), "spright_pool_free_slots").expect("free slots metric")
    }

    fn pid_of(&self, function: &str) -> i32 {
        let r = http(self.addr, "GET", "/functions", b"").expect("functions");
        let list: Vec<serde_json::Value> = serde_json::from_slice(&r.body).expect("json");
        list.iter()
            .find(|f| f["name"] == function)
            .and_then(|f| f["pid"].as_i64())
            .and_then(|p| i32::try_from(p).ok())
            .unwrap_or_else(|| panic!("{function} is not attached: {list:?}"))
    }
}

#[test]
fn chain_answers_like_the_reference_on_both_transports() {
    for t in TRANSPORTS {
        let stack = Stack::start(t, 256);
        let body = sample_body(64);
        let want = run_chain_locally(body.as_bytes()).expect("reference");
        let r = stack.post("/motion", body.as_bytes());
        assert_eq!(r.status, 200, "{t}: {}", r.text());
        assert_eq!(r.body, want, "{t}");
        assert!(r.text().contains("\"motion\":true"));
        // Many at once from several connections: every answer right, every slot back.
        let threads: Vec<_> = (0..8)
            .map(|i| {
                let addr = stack.addr;
                std::thread::spawn(move || {
                    for n in 0..25 {
                        let body = sample_body(8 + (i * 25 + n) % 100);
                        let want = run_chain_locally(body.as_bytes()).expect("reference");
                        let r = http(addr, "POST", "/motion", body.as_bytes()).expect("request");
                        assert_eq!((r.status, r.body), (200, want));
                    }
                })
            })
            .collect();
        for th in threads {
            th.join().expect("client thread");
        }
        assert_eq!(stack.free_slots(), 256.0, "{t}: slots leaked");
        let m = stack.metrics();
        assert_eq!(
            metric(
                &m,
                "spright_gateway_requests_total{chain=\"motion\",code_class=\"2xx\"}"
            ),
            Some(201.0),
            "{t}"
        );
    }
}

#[test]
fn bad_input_gets_the_right_status_on_both_transports() {
    for t in TRANSPORTS {
        let stack = Stack::start(t, 64);
        let r = stack.post("/motion", b"0,0,1\n0,oops,1\n");
        assert_eq!(r.status, 400, "{t}: {}", r.text());
        assert!(r.text().contains("line 2"), "{}", r.text());
        assert_eq!(stack.post("/motion", b"").status, 400);
        assert_eq!(stack.post("/motion", &[0xff, 0xfe, 0xfd]).status, 400);
        assert_eq!(stack.post("/motion", &vec![b'1'; 70_000]).status, 413);
        assert_eq!(stack.post("/nowhere", b"x").status, 404);
        assert_eq!(
            http(stack.addr, "GET", "/motion", b"").expect("get").status,
            405
        );
        // The chain still works after all that, and nothing leaked.
        assert_eq!(stack.post("/motion", sample_body(8).as_bytes()).status, 200);
        assert_eq!(stack.free_slots(), 64.0, "{t}");
    }
}

#[test]
fn skmsg_counters_match_the_traffic() {
    let stack = Stack::start("sk_msg", 64);
    let (good, bad) = (30u32, 7u32);
    for _ in 0..good {
        assert_eq!(
            stack.post("/motion", sample_body(16).as_bytes()).status,
            200
        );
    }
    for _ in 0..bad {
        assert_eq!(stack.post("/motion", b"not,a,number\n").status, 400);
    }
    let m = stack.metrics();
    let c = |dst: &str| {
        metric(
            &m,
            &format!("spright_skmsg_messages_total{{destination=\"{dst}\"}}"),
        )
        .unwrap_or(-1.0)
    };
    let b = |dst: &str| {
        metric(
            &m,
            &format!("spright_skmsg_bytes_total{{destination=\"{dst}\"}}"),
        )
        .unwrap_or(-1.0)
    };
    let total = f64::from(good + bad);
    // Every request enters at decode and comes back to the gateway; bad ones stop at decode.
    assert_eq!(c("decode"), total, "{m}");
    assert_eq!(c("gateway"), total, "{m}");
    for f in ["denoise", "detect", "alert"] {
        assert_eq!(c(f), f64::from(good), "{f}: {m}");
        assert_eq!(b(f), 16.0 * f64::from(good), "{f}: {m}");
    }
    assert_eq!(b("decode"), 16.0 * total);
    assert_eq!(c("unknown"), 0.0);
    let _ = stack.transport;
}

#[test]
fn function_not_attached_gets_503_and_loses_no_slot_on_both_transports() {
    for t in TRANSPORTS {
        let stack = Stack::start(t, 32);
        let r = stack.post("/ghost", sample_body(8).as_bytes());
        assert_eq!(r.status, 503, "{t}: {}", r.text());
        assert!(r.text().contains("not attached"), "{t}: {}", r.text());
        assert!(
            wait_until(Duration::from_secs(5), || stack.free_slots() == 32.0),
            "{t}: slot leaked"
        );
        if t == "sk_msg" {
            // The descriptor passed through sk_msg to the hub and was counted as unknown.
            let m = stack.metrics();
            assert_eq!(
                metric(&m, "spright_skmsg_messages_total{destination=\"unknown\"}"),
                Some(1.0),
                "{m}"
            );
        }
    }
}

#[test]
fn pool_exhaustion_is_a_clear_503_and_loses_nothing_on_both_transports() {
    for t in TRANSPORTS {
        let stack = Stack::start(t, 4);
        let detect = stack.pid_of("detect");
        kill(Pid::from_raw(detect), Signal::SIGSTOP).expect("stop detect");
        // Four requests fill the pool: they wait at the stopped function.
        let held = stack.post_in_background(4);
        assert!(
            wait_until(Duration::from_secs(10), || stack.free_slots() == 0.0),
            "{t}: the pool did not fill"
        );
        let r = stack.post("/motion", sample_body(16).as_bytes());
        assert_eq!(r.status, 503, "{t}: {}", r.text());
        assert!(r.text().contains("exhausted"), "{t}: {}", r.text());
        kill(Pid::from_raw(detect), Signal::SIGCONT).expect("continue detect");
        for h in held {
            let r = h.join().expect("client");
            assert_eq!(r.status, 200, "{t}: a held request was lost: {}", r.text());
        }
        assert!(
            wait_until(Duration::from_secs(5), || stack.free_slots() == 4.0),
            "{t}"
        );
    }
}

#[test]
fn function_killed_mid_chain_gets_502_and_its_slots_come_back_on_both_transports() {
    for t in TRANSPORTS {
        let mut stack = Stack::start(t, 16);
        let detect = stack.pid_of("detect");
        kill(Pid::from_raw(detect), Signal::SIGSTOP).expect("stop detect");
        let held = stack.post_in_background(3);
        assert!(
            wait_until(Duration::from_secs(10), || stack.free_slots() == 13.0),
            "{t}: requests did not reach detect"
        );
        kill(Pid::from_raw(detect), Signal::SIGKILL).expect("kill detect");
        for h in held {
            let r = h.join().expect("client");
            // 502 when the request was at the function that died; 503 when it was still on
            // its way there (the function was gone by the time the previous step sent it).
            let why = r.text();
            assert!(
                (r.status == 502 && why.contains("died"))
                    || (r.status == 503 && why.contains("not attached")),
                "{t}: {} {why}",
                r.status
            );
        }
        assert!(
            wait_until(Duration::from_secs(5), || stack.free_slots() == 16.0),
            "{t}: slots not reclaimed"
        );
        // The gateway restarts the function; the chain serves again.
        assert!(
            wait_until(Duration::from_secs(15), || stack
                .post("/motion", sample_body(8).as_bytes())
                .status
                == 200),
            "{t}: chain did not recover:\n{}",
            stack.gateway.log_text()
        );
        assert!(stack.gateway.running());
    }
}

/// Whether `pid` has exited (gone, or a zombie waiting for its new parent to reap it).
fn exited(pid: i32) -> bool {
    std::fs::read_to_string(format!("/proc/{pid}/stat"))
        .map(|s| {
            s.rsplit_once(") ")
                .is_some_and(|(_, rest)| rest.starts_with('Z'))
        })
        .unwrap_or(true)
}

#[test]
fn functions_stop_when_the_gateway_dies_on_both_transports() {
    for t in TRANSPORTS {
        let mut stack = Stack::start(t, 16);
        let pids: Vec<i32> = spright_sample_chain::STEPS
            .iter()
            .map(|f| stack.pid_of(f))
            .collect();
        let _ = stack.gateway.child.kill(); // SIGKILL: no chance to stop its children
        let _ = stack.gateway.child.wait();
        assert!(
            wait_until(Duration::from_secs(10), || pids.iter().all(|p| exited(*p))),
            "{t}: functions outlived their gateway: {:?}",
            pids.iter().filter(|p| !exited(**p)).collect::<Vec<_>>()
        );
    }
}
