//! Full mode, standalone, on the real kernel: queue-proxy-ebpf and its upstream in one test
//! cgroup, the sidecar loading the accounting and the loopback redirect itself.
//!
//! Needs root (CAP_BPF + CAP_NET_ADMIN), cgroup v2 at /sys/fs/cgroup/unified and bpftool;
//! without them the test fails, it never skips. The same requests go through a userspace-mode
//! queue-proxy-ebpf (outside the cgroup) in front of the same upstream, and the answers must
//! be the same; the redirect's own counters, read with bpftool from the sidecar's programs,
//! must show the hop went through the sockmap.

mod common;

use std::time::{Duration, Instant};

use bytes::Bytes;
use common::*;
use spright_test_support::bpftool;
use spright_test_support::cgroup::TestCgroup;

/// Sums every number found under a "value" key (per-CPU values, with or without BTF).
fn sum_values(v: &serde_json::Value) -> u64 {
    match v {
        serde_json::Value::Array(items) => items.iter().map(sum_values).sum(),
        serde_json::Value::Object(map) => map
            .iter()
            .map(|(k, v)| match (k.as_str(), v) {
                ("value", serde_json::Value::Number(n)) => n.as_u64().unwrap_or(0),
                ("value", serde_json::Value::Array(bytes))
                    if bytes.iter().all(|b| b.is_string()) =>
                {
                    // Raw hex bytes (no BTF): little-endian u64.
                    let raw: Vec<u8> = bytes
                        .iter()
                        .filter_map(|b| {
                            u8::from_str_radix(b.as_str()?.trim_start_matches("0x"), 16).ok()
                        })
                        .collect();
                    let mut word = [0u8; 8];
                    let n = raw.len().min(8);
                    word[..n].copy_from_slice(&raw[..n]);
                    u64::from_le_bytes(word)
                }
                _ => sum_values(v),
            })
            .sum(),
        _ => 0,
    }
}

/// Ids of the BPF maps process `pid` holds open (from its fdinfo).
fn maps_held_by(pid: u32) -> Vec<u64> {
    let dir = format!("/proc/{pid}/fdinfo");
    std::fs::read_dir(&dir)
        .unwrap_or_else(|e| panic!("{dir}: {e}"))
        .filter_map(|entry| std::fs::read_to_string(entry.ok()?.path()).ok())
        .filter_map(|info| {
            info.lines()
                .find_map(|l| l.strip_prefix("map_id:"))
                .and_then(|id| id.trim().parse().ok())
        })
        .collect()
}

/// The loopback counters (slot -> sum over CPUs) in the `lb_counters` map `pid` holds.
fn loopback_counters(pid: u32) -> Vec<u64> {
    let map_id = maps_held_by(pid)
        .into_iter()
        .find(|id| bpftool::json(&["map", "show", "id", &id.to_string()])["name"] == "lb_counters")
        .unwrap_or_else(|| panic!("pid {pid} holds no lb_counters map: full mode not attached"));
    let dump = bpftool::json(&["map", "dump", "id", &map_id.to_string()]);
    dump.as_array()
        .into_iter()
        .flatten()
        .map(|entry| sum_values(&entry["values"]))
        .collect()
}

struct Case {
    method: &'static str,
    path: &'static str,
    body: Bytes,
}

fn cases() -> Vec<Case> {
    let big: Bytes = (0..1_000_000u32)
        .map(|i| b'a' + (i % 26) as u8)
        .collect::<Vec<u8>>()
        .into();
    let case = |method, path, body: &Bytes| Case {
        method,
        path,
        body: body.clone(),
    };
    let empty = Bytes::new();
    vec![
        case("GET", "/echo?x=1", &empty),
        case("POST", "/echo", &Bytes::from_static(b"hello full mode")),
        case("POST", "/echo-large", &big),
        case("GET", "/status?code=404", &empty),
        case("GET", "/status?code=503", &empty),
        case("GET", "/stream?n=5", &empty),
        case("GET", "/hop", &empty),
        case("HEAD", "/echo", &empty),
        case("GET", "/truncate", &empty),
    ]
}

/// What must be the same through both modes.
fn view(answer: Result<Answer, String>) -> String {
    match answer {
        Ok(a) => format!(
            "{} {:?} {:?}",
            a.status,
            a.key_headers(),
            String::from_utf8_lossy(&a.body)
        ),
        // Both sides must fail the same way (e.g. the truncated body).
        Err(e) => format!("error: {}", e.split(':').next().unwrap_or_default()),
    }
}

fn start_ours(upstream: u16, extra: &[(&str, &str)]) -> Proc {
    let mut env = knative_env(upstream);
    env.insert(
        "QUEUE_SERVING_PORT".to_owned(),
        spright_test_support::free_port().to_string(),
    );
    for (k, v) in extra {
        env.insert((*k).to_owned(), (*v).to_owned());
    }
    let alt = (
        spright_test_support::free_port(),
        spright_test_support::free_port(),
    );
    start_opts(Impl::Ours, &env, Some(alt), false)
}

#[test]
fn full_mode_answers_like_userspace_mode_and_the_hop_goes_through_the_sockmap() {
    let cgroup = TestCgroup::new("qp-full");
    let cgroup_path = cgroup.path().to_str().expect("utf-8 path").to_owned();
    // The upstream's listener and the full-mode sidecar live in the cgroup.
    let (upstream, full) = cgroup.inside(|| {
        let upstream = Upstream::start();
        let full = start_ours(
            upstream.port,
            &[
                ("SPRIGHT_DATAPLANE_MODE", "full"),
                ("SPRIGHT_ACCOUNTING", "standalone"),
                ("SPRIGHT_ACCOUNTING_CGROUP", &cgroup_path),
            ],
        );
        (upstream, full)
    });
    let userspace = start_ours(upstream.port, &[("SPRIGHT_DATAPLANE_MODE", "userspace")]);

    let rt = runtime();
    let headers = [("host", "hello.default.example.com"), ("x-test", "full")];
    for round in 0..3 {
        for case in cases() {
            let ask = |port| {
                rt.block_on(send_body(
                    port,
                    case.method,
                    case.path,
                    &headers,
                    false,
                    case.body.clone(),
                ))
            };
            let expected = view(ask(userspace.ports.serving));
            let got = view(ask(full.ports.serving));
            assert_eq!(
                got, expected,
                "round {round}: {} {} differs between full and userspace mode",
                case.method, case.path
            );
        }
    }
    // h2c on the serving port, the hop to the user container stays HTTP/1.1.
    // (h2 requests carry the authority with the serving port, which differs.)
    let h2 = |port: u16| {
        view(rt.block_on(send(port, "GET", "/echo-h2", &headers, true)))
            .replace(&port.to_string(), "PORT")
    };
    assert_eq!(h2(full.ports.serving), h2(userspace.ports.serving));

    // The full-mode sidecar's redirect moved the hop's bytes (slots: redirected messages,
    // redirected bytes, passed messages, passed bytes, sockets filed, insert failures).
    let deadline = Instant::now() + Duration::from_secs(5);
    let counters = loop {
        let c = loopback_counters(full.child.id());
        if c.get(1).copied().unwrap_or(0) > 2_000_000 || Instant::now() > deadline {
            break c;
        }
        std::thread::sleep(Duration::from_millis(50));
    };
    eprintln!("loopback counters of the full-mode sidecar: {counters:?}");
    assert_eq!(counters.len(), 6, "{counters:?}");
    assert!(counters[0] > 0, "no write redirected: {counters:?}");
    // Each 1 MB request body went over the redirected hop three times.
    assert!(
        counters[1] > 3_000_000,
        "too few bytes redirected: {counters:?}"
    );
    assert!(counters[4] >= 2, "no socket filed: {counters:?}");
    assert_eq!(
        counters[5], 0,
        "sockets that could not be filed: {counters:?}"
    );

    drop(full);
    drop(userspace);
    drop(upstream);
}
