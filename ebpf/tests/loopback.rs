//! Full mode's loopback redirect on the real kernel: a client and a server on
//! loopback in a test cgroup, their bytes moved by the sockmap.
//!
//! Needs root (CAP_BPF + CAP_NET_ADMIN) and cgroup v2 at
//! /sys/fs/cgroup/unified; without them the tests fail with the loader's
//! error, they never skip. Each test makes its own cgroup. A socket belongs to
//! the cgroup of the process that creates it (an accepted socket to its
//! listener's), so the tests create their sockets while this process sits in
//! the test cgroup, one test at a time (see [`TestCgroup::inside`]).

use std::io::{Read, Write};
use std::net::{Shutdown, SocketAddr, TcpListener, TcpStream};
use std::os::fd::{AsRawFd, OwnedFd};
use std::time::{Duration, Instant};

use nix::sys::socket::{AddressFamily, SockFlag, SockType, SockaddrStorage, connect, socket};
use spright_ebpf::accounting::PodAccounting;
use spright_ebpf::loopback::{Loopback, LoopbackCounters};
use spright_test_support::bpftool;
use spright_test_support::cgroup::{TestCgroup, program_ids};

fn attach(cgroup: &TestCgroup, ports: &[u16]) -> Loopback {
    Loopback::attach(cgroup.path(), ports)
        .unwrap_or_else(|e| panic!("attaching the loopback redirect failed: {e}"))
}

/// A test cgroup, a listener on 127.0.0.1 made inside it, and the redirect attached for the
/// listener's port.
fn redirected_listener(test: &str) -> (TestCgroup, TcpListener, Loopback) {
    let cgroup = TestCgroup::new(test);
    let listener = listener(&cgroup, "127.0.0.1:0");
    let lb = attach(&cgroup, &[listener.local_addr().expect("addr").port()]);
    (cgroup, listener, lb)
}

/// A connected pair: `client` made inside the cgroup, `server` accepted from a
/// listener made inside it.
struct Pair {
    client: TcpStream,
    server: TcpStream,
}

fn listener(cgroup: &TestCgroup, addr: &str) -> TcpListener {
    cgroup.inside(|| TcpListener::bind(addr).expect("bind listener"))
}

fn unconnected(cgroup: &TestCgroup, family: AddressFamily) -> OwnedFd {
    cgroup
        .inside(|| socket(family, SockType::Stream, SockFlag::SOCK_CLOEXEC, None).expect("socket"))
}

fn connect_pair(cgroup: &TestCgroup, listener: &TcpListener) -> Pair {
    let addr = listener.local_addr().expect("listener addr");
    let family = match addr {
        SocketAddr::V4(_) => AddressFamily::Inet,
        SocketAddr::V6(_) => AddressFamily::Inet6,
    };
    let fd = unconnected(cgroup, family);
    connect(fd.as_raw_fd(), &SockaddrStorage::from(addr)).expect("connect");
    let (server, _) = listener.accept().expect("accept");
    let client = TcpStream::from(fd);
    for s in [&client, &server] {
        s.set_read_timeout(Some(Duration::from_secs(20)))
            .expect("timeout");
        s.set_write_timeout(Some(Duration::from_secs(20)))
            .expect("timeout");
    }
    Pair { client, server }
}

/// Waits (bounded) until `n` sockets are filed.
fn wait_filed(lb: &Loopback, n: usize) {
    let deadline = Instant::now() + Duration::from_secs(5);
    loop {
        let filed = lb
            .filed_sockets()
            .unwrap_or_else(|e| panic!("listing sockets: {e}"))
            .len();
        if filed == n {
            return;
        }
        assert!(
            Instant::now() < deadline,
            "{filed} sockets filed, expected {n}"
        );
        std::thread::sleep(Duration::from_millis(5));
    }
}

fn counters(lb: &Loopback) -> LoopbackCounters {
    lb.counters().unwrap_or_else(|e| panic!("counters: {e}"))
}

/// Deterministic bytes that show misordering: position-dependent.
fn pattern(len: usize, seed: u8) -> Vec<u8> {
    (0..len)
        .map(|i| {
            (i as u8)
                .wrapping_mul(31)
                .wrapping_add(seed ^ (i >> 8) as u8)
        })
        .collect()
}

/// Writes `data` on one end while the other end reads it back (no deadlock
/// on large transfers); returns what arrived.
fn transfer(from: &TcpStream, to: &TcpStream, data: &[u8], chunk: usize) -> Vec<u8> {
    let mut reader = to.try_clone().expect("clone");
    let expected = data.len();
    let handle = std::thread::spawn(move || {
        let mut got = vec![0u8; expected];
        reader.read_exact(&mut got).expect("read transfer");
        got
    });
    let mut writer = from;
    for piece in data.chunks(chunk) {
        writer.write_all(piece).expect("write transfer");
    }
    handle.join().expect("reader thread")
}

#[test]
fn bytes_arrive_intact_both_ways_and_counters_equal_the_traffic() {
    let (cgroup, listener, lb) = redirected_listener("lb-intact");
    let pair = connect_pair(&cgroup, &listener);
    wait_filed(&lb, 2);

    let mut total = 0u64;
    // Small, both ways.
    for (i, (from, to)) in [(&pair.client, &pair.server), (&pair.server, &pair.client)]
        .into_iter()
        .enumerate()
    {
        let data = pattern(100, i as u8);
        assert_eq!(transfer(from, to, &data, data.len()), data);
        total += data.len() as u64;
    }
    // 1 MiB both ways, in one write_all and in 64 KiB writes.
    for (i, (from, to)) in [(&pair.client, &pair.server), (&pair.server, &pair.client)]
        .into_iter()
        .enumerate()
    {
        let data = pattern(1 << 20, 10 + i as u8);
        assert_eq!(
            transfer(from, to, &data, data.len()),
            data,
            "1 MiB in one write, direction {i}"
        );
        assert_eq!(
            transfer(from, to, &data, 64 << 10),
            data,
            "1 MiB in 64 KiB writes, direction {i}"
        );
        total += 2 * data.len() as u64;
    }
    // Many small messages of varying sizes.
    let data = pattern(300_000, 7);
    let mut sizes = (1..=599).cycle();
    let mut offset = 0;
    let reader_data = data.clone();
    let mut reader = pair.server.try_clone().expect("clone");
    let handle = std::thread::spawn(move || {
        let mut got = vec![0u8; reader_data.len()];
        reader.read_exact(&mut got).expect("read many");
        got == reader_data
    });
    let mut writes = 0u64;
    let mut writer = &pair.client;
    while offset < data.len() {
        let n = sizes.next().unwrap_or(1).min(data.len() - offset);
        writer
            .write_all(&data[offset..offset + n])
            .expect("write many");
        offset += n;
        writes += 1;
    }
    assert!(
        handle.join().expect("reader"),
        "many small messages arrived out of order"
    );
    total += data.len() as u64;

    let c = counters(&lb);
    assert_eq!(c.redirected_bytes, total, "{c:?}");
    assert_eq!(c.passed_messages, 0, "{c:?}");
    assert!(c.redirected_messages >= writes, "{c:?}");
    assert_eq!(c.sockets_filed, 2, "{c:?}");
    assert_eq!(c.insert_failures, 0, "{c:?}");

    drop(pair);
    wait_filed(&lb, 0);
    lb.detach().unwrap_or_else(|e| panic!("detach: {e}"));
}

#[test]
fn ipv6_loopback_is_redirected_and_other_ports_are_not_touched() {
    let cgroup = TestCgroup::new("lb-v6");
    let user = listener(&cgroup, "[::1]:0");
    let other = listener(&cgroup, "127.0.0.1:0");
    let port = user.local_addr().expect("addr").port();
    let lb = attach(&cgroup, &[port]);

    let v6 = connect_pair(&cgroup, &user);
    wait_filed(&lb, 2);
    let data = pattern(10_000, 3);
    assert_eq!(transfer(&v6.client, &v6.server, &data, 1000), data);
    assert_eq!(transfer(&v6.server, &v6.client, &data, 1000), data);

    let plain = connect_pair(&cgroup, &other);
    assert_eq!(transfer(&plain.client, &plain.server, &data, 1000), data);
    assert_eq!(transfer(&plain.server, &plain.client, &data, 1000), data);
    // Only the user-port connection's two ends are filed.
    wait_filed(&lb, 2);
    let c = counters(&lb);
    assert_eq!(c.redirected_bytes, 2 * data.len() as u64, "{c:?}");
    assert_eq!(c.passed_bytes, 0, "{c:?}");
}

#[test]
fn msg_more_and_vectored_writes_are_delivered() {
    let (cgroup, listener, lb) = redirected_listener("lb-more");
    let pair = connect_pair(&cgroup, &listener);
    wait_filed(&lb, 2);

    let head = b"GET / HTTP/1.1\r\nHost: x\r\n";
    let tail = b"\r\n";
    nix::sys::socket::send(
        pair.client.as_raw_fd(),
        head,
        nix::sys::socket::MsgFlags::from_bits_retain(libc::MSG_MORE),
    )
    .expect("send with MSG_MORE");
    nix::sys::socket::send(
        pair.client.as_raw_fd(),
        tail,
        nix::sys::socket::MsgFlags::empty(),
    )
    .expect("send");
    let mut got = vec![0u8; head.len() + tail.len()];
    (&pair.server).read_exact(&mut got).expect("read");
    assert_eq!(&got[..head.len()], head);
    assert_eq!(&got[head.len()..], tail);

    let parts = [
        std::io::IoSlice::new(b"HTTP/1.1 200 OK\r\n"),
        std::io::IoSlice::new(b"content-length: 2\r\n\r\nok"),
    ];
    let n = (&pair.server).write_vectored(&parts).expect("writev");
    assert_eq!(n, 17 + 23);
    let mut answer = vec![0u8; n];
    (&pair.client).read_exact(&mut answer).expect("read answer");
    assert_eq!(answer, b"HTTP/1.1 200 OK\r\ncontent-length: 2\r\n\r\nok");
    let c = counters(&lb);
    assert_eq!(
        c.redirected_bytes,
        (head.len() + tail.len() + n) as u64,
        "{c:?}"
    );
}

#[test]
fn closed_and_reset_connections_do_not_hang_or_leak() {
    let (cgroup, listener, lb) = redirected_listener("lb-close");

    // The server closes mid-stream: the reader of the client side sees EOF
    // after the bytes sent before the close; writes after it fail, never hang.
    let pair = connect_pair(&cgroup, &listener);
    wait_filed(&lb, 2);
    let data = pattern(50_000, 9);
    (&pair.server).write_all(&data).expect("server writes");
    drop(pair.server);
    let mut got = Vec::new();
    (&pair.client)
        .read_to_end(&mut got)
        .expect("client reads to EOF");
    assert_eq!(got, data);
    let mut failed = false;
    for _ in 0..100 {
        if (&pair.client).write_all(&data).is_err() {
            failed = true;
            break;
        }
        std::thread::sleep(Duration::from_millis(2));
    }
    assert!(failed, "writes to a closed peer kept succeeding");
    drop(pair.client);
    wait_filed(&lb, 0);

    // Reset (SO_LINGER 0) while the other side is blocked reading and while
    // it is writing a large amount.
    for round in 0..20 {
        let pair = connect_pair(&cgroup, &listener);
        wait_filed(&lb, 2);
        let reader = pair.client.try_clone().expect("clone");
        let blocked = std::thread::spawn(move || {
            let mut buf = [0u8; 4096];
            let mut total = 0usize;
            loop {
                match (&reader).read(&mut buf) {
                    Ok(0) => return Ok(total),
                    Ok(n) => total += n,
                    Err(e) => return Err(e.kind()),
                }
            }
        });
        let writer = pair.server.try_clone().expect("clone");
        let big = pattern(4 << 20, round);
        let writing = std::thread::spawn(move || (&writer).write_all(&big).is_ok());
        std::thread::sleep(Duration::from_millis(1 + u64::from(round % 5)));
        nix::sys::socket::setsockopt(
            &pair.client,
            nix::sys::socket::sockopt::Linger,
            &libc::linger {
                l_onoff: 1,
                l_linger: 0,
            },
        )
        .expect("linger 0");
        pair.client.shutdown(Shutdown::Both).ok();
        drop(pair.client);
        // Neither side may hang: both threads end (the timeouts are 20 s).
        let read_result = blocked.join().expect("reader thread");
        assert!(read_result.is_ok() || read_result.is_err());
        let _ = writing.join().expect("writer thread");
        drop(pair.server);
        wait_filed(&lb, 0);
    }
    let c = counters(&lb);
    assert_eq!(c.insert_failures, 0, "{c:?}");
    assert_eq!(c.sockets_filed, 42, "{c:?}");
}

fn left_behind(ids: &spright_ebpf::loopback::LoopbackIds) -> Vec<String> {
    ids.programs
        .iter()
        .filter(|id| bpftool::exists("prog", u64::from(**id)))
        .map(|id| format!("prog {id}"))
        .chain(
            ids.maps
                .iter()
                .filter(|id| bpftool::exists("map", u64::from(**id)))
                .map(|id| format!("map {id}")),
        )
        .collect()
}

#[test]
fn detach_keeps_unread_bytes_in_order_and_leaves_nothing_once_the_connection_closes() {
    let (cgroup, listener, lb) = redirected_listener("lb-detach");
    let ids = lb.ids().unwrap_or_else(|e| panic!("ids: {e}"));
    assert_eq!(ids.programs.len(), 2);
    let attached = program_ids(cgroup.path());
    assert_eq!(
        attached.len(),
        1,
        "one sock_ops program on the cgroup: {attached:?}"
    );
    assert!(
        ids.programs
            .iter()
            .any(|id| attached.contains(&u64::from(*id)))
    );

    let pair = connect_pair(&cgroup, &listener);
    wait_filed(&lb, 2);
    let data = pattern(20_000, 1);
    assert_eq!(transfer(&pair.client, &pair.server, &data, 500), data);
    // Bytes redirected but not read yet when the programs are detached.
    let before = pattern(30_000, 2);
    (&pair.client)
        .write_all(&before)
        .expect("write before detach");
    drop(lb);
    assert_eq!(
        program_ids(cgroup.path()),
        Vec::<u64>::new(),
        "programs left on the cgroup"
    );

    // The open connection goes on over TCP, in order after the unread bytes.
    let after = pattern(30_000, 3);
    (&pair.client)
        .write_all(&after)
        .expect("write after detach");
    let mut got = vec![0u8; before.len() + after.len()];
    (&pair.server)
        .read_exact(&mut got)
        .expect("read across detach");
    assert!(
        got[..before.len()] == before[..],
        "bytes redirected before detach lost or changed"
    );
    assert!(
        got[before.len()..] == after[..],
        "bytes sent after detach lost or reordered"
    );
    assert_eq!(transfer(&pair.server, &pair.client, &data, 500), data);

    // The filed sockets hold the sk_msg program until they close; then the
    // kernel frees it and every map (asynchronously: wait, bounded).
    drop(pair);
    let deadline = Instant::now() + Duration::from_secs(10);
    loop {
        let left = left_behind(&ids);
        if left.is_empty() {
            break;
        }
        assert!(
            Instant::now() < deadline,
            "left behind after detach and close: {left:?}"
        );
        std::thread::sleep(Duration::from_millis(50));
    }
}

#[test]
fn detach_without_connections_frees_everything() {
    let cgroup = TestCgroup::new("lb-detach-idle");
    let lb = attach(&cgroup, &[8080, 9000]);
    let ids = lb.ids().unwrap_or_else(|e| panic!("ids: {e}"));
    lb.detach().unwrap_or_else(|e| panic!("detach: {e}"));
    assert_eq!(program_ids(cgroup.path()), Vec::<u64>::new());
    let deadline = Instant::now() + Duration::from_secs(10);
    while !left_behind(&ids).is_empty() {
        assert!(
            Instant::now() < deadline,
            "left behind: {:?}",
            left_behind(&ids)
        );
        std::thread::sleep(Duration::from_millis(50));
    }
}

/// A one-shot HTTP/1.1 proxy hop: serving port -> user port, as the sidecar.
fn proxy_once(serving: &TcpListener, cgroup: &TestCgroup, user: SocketAddr) {
    let (mut downstream, _) = serving.accept().expect("accept serving");
    let fd = unconnected(cgroup, AddressFamily::Inet);
    connect(fd.as_raw_fd(), &SockaddrStorage::from(user)).expect("connect user port");
    let mut upstream = TcpStream::from(fd);
    let request = read_head(&mut downstream);
    upstream.write_all(&request).expect("forward request");
    let response = read_head(&mut upstream);
    downstream.write_all(&response).expect("forward response");
}

/// Reads one message that ends with "\r\n\r\n" + body "ok" (fixed shape here).
fn read_head(stream: &mut TcpStream) -> Vec<u8> {
    let mut buf = Vec::new();
    let mut byte = [0u8; 1];
    while !buf.ends_with(b"\r\n\r\n") {
        stream.read_exact(&mut byte).expect("read head");
        buf.push(byte[0]);
    }
    if buf.starts_with(b"HTTP/") {
        let mut body = [0u8; 2];
        stream.read_exact(&mut body).expect("read body");
        buf.extend_from_slice(&body);
    }
    buf
}

#[test]
fn accounting_on_the_serving_port_and_the_loopback_redirect_work_at_once() {
    let cgroup = TestCgroup::new("lb-both");
    let serving = listener(&cgroup, "127.0.0.1:0");
    let user = listener(&cgroup, "127.0.0.1:0");
    let serving_port = serving.local_addr().expect("addr").port();
    let user_addr = user.local_addr().expect("addr");
    let accounting = PodAccounting::attach(cgroup.path(), serving_port)
        .unwrap_or_else(|e| panic!("attaching accounting failed: {e}"));
    let lb = attach(&cgroup, &[user_addr.port()]);
    assert_eq!(
        program_ids(cgroup.path()).len(),
        4,
        "accounting (3) and loopback (1) on one cgroup"
    );

    let requests = 20u64;
    let user_thread = std::thread::spawn(move || {
        for _ in 0..requests {
            let (mut conn, _) = user.accept().expect("accept user");
            let request = read_head(&mut conn);
            assert!(request.starts_with(b"GET /"), "{request:?}");
            conn.write_all(b"HTTP/1.1 200 OK\r\ncontent-length: 2\r\n\r\nok")
                .expect("answer");
        }
    });
    for i in 0..requests {
        // The client is outside the cgroup, like the kubelet or the activator.
        let mut client =
            TcpStream::connect(serving.local_addr().expect("addr")).expect("connect serving");
        client
            .set_read_timeout(Some(Duration::from_secs(20)))
            .expect("timeout");
        client
            .write_all(format!("GET /{i} HTTP/1.1\r\nHost: x\r\n\r\n").as_bytes())
            .expect("request");
        proxy_once(&serving, &cgroup, user_addr);
        let mut answer = Vec::new();
        client.read_to_end(&mut answer).ok();
        assert!(
            answer.ends_with(b"\r\n\r\nok"),
            "{:?}",
            String::from_utf8_lossy(&answer)
        );
    }
    user_thread.join().expect("user thread");

    let deadline = Instant::now() + Duration::from_secs(5);
    let stats = loop {
        let stats = accounting
            .counters()
            .unwrap_or_else(|e| panic!("accounting counters: {e}"));
        if stats.completions == requests || Instant::now() > deadline {
            break stats;
        }
        std::thread::sleep(Duration::from_millis(10));
    };
    assert_eq!(stats.arrivals, requests, "{stats:?}");
    assert_eq!(stats.completions, requests, "{stats:?}");
    let c = counters(&lb);
    // Every answer is redirected (the proxy's end is filed before the user
    // container's end exists); a request written before the user container's
    // end was filed goes over TCP (the race the ordering rule handles).
    assert!(c.redirected_messages >= requests, "{c:?}");
    assert_eq!(
        c.redirected_messages + c.passed_messages,
        2 * requests,
        "{c:?}"
    );
}
