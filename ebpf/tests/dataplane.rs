//! Loads the real programs into the kernel and drives descriptors through them.
//!
//! Needs root (CAP_BPF + CAP_NET_ADMIN) and cgroup v2 at /sys/fs/cgroup/unified;
//! without them the tests fail with the loader's error, they never skip. Each
//! test loads its own dataplane and hub listener, so they run in parallel.

use std::io::{ErrorKind, Read, Write};
use std::net::{Ipv4Addr, SocketAddrV4, TcpListener, TcpStream};
use std::os::fd::OwnedFd;
use std::path::{Path, PathBuf};
use std::process::Command;
use std::time::{Duration, Instant};

use nix::sys::socket::{
    AddressFamily, SockFlag, SockType, SockaddrIn, bind, connect, getsockname, socket,
};
use spright_ebpf::{
    Counters, DEFAULT_CGROUP_PATH, DESCRIPTOR_LEN, Dataplane, DataplaneOptions, EbpfError,
    MAX_FUNCTIONS, UNKNOWN_INDEX, check_support, names,
};
use spright_test_support::cgroup::program_ids;

type Descriptor = [u8; DESCRIPTOR_LEN];

fn descriptor(dst: u32, offset: u32, len: u32, generation: u32) -> Descriptor {
    let mut d = [0u8; DESCRIPTOR_LEN];
    d[0..4].copy_from_slice(&dst.to_le_bytes());
    d[4..8].copy_from_slice(&offset.to_le_bytes());
    d[8..12].copy_from_slice(&len.to_le_bytes());
    d[12..16].copy_from_slice(&generation.to_le_bytes());
    d
}

fn load(opts: &DataplaneOptions) -> Dataplane {
    Dataplane::load(opts).unwrap_or_else(|e| panic!("loading the dataplane failed: {e}"))
}

/// A local hub: the listener every function socket connects to.
struct Hub {
    listener: TcpListener,
}

impl Hub {
    fn new() -> Self {
        let listener = TcpListener::bind("127.0.0.1:0").expect("bind hub");
        Self { listener }
    }

    fn addr(&self) -> SockaddrIn {
        match self.listener.local_addr().expect("hub addr") {
            std::net::SocketAddr::V4(v4) => SockaddrIn::from(v4),
            other => panic!("unexpected hub address {other}"),
        }
    }
}

/// One function: its socket and the hub's end of the connection.
struct Function {
    id: u32,
    port: u16,
    socket: TcpStream,
    hub_peer: TcpStream,
}

/// Binds a socket to learn its port, registers it, then connects it to the hub.
fn attach_function(dp: &mut Dataplane, hub: &Hub, id: u32) -> Function {
    let fd: OwnedFd = socket(
        AddressFamily::Inet,
        SockType::Stream,
        SockFlag::SOCK_CLOEXEC,
        None,
    )
    .expect("socket");
    bind(
        std::os::fd::AsRawFd::as_raw_fd(&fd),
        &SockaddrIn::from(SocketAddrV4::new(Ipv4Addr::LOCALHOST, 0)),
    )
    .expect("bind function socket");
    let local: SockaddrIn = getsockname(std::os::fd::AsRawFd::as_raw_fd(&fd)).expect("getsockname");
    let port = local.port();
    dp.register_port(port, id)
        .unwrap_or_else(|e| panic!("register port {port}: {e}"));
    connect(std::os::fd::AsRawFd::as_raw_fd(&fd), &hub.addr()).expect("connect to hub");
    let (hub_peer, _) = hub.listener.accept().expect("hub accept");
    let socket = TcpStream::from(fd);
    for s in [&socket, &hub_peer] {
        s.set_read_timeout(Some(Duration::from_secs(10)))
            .expect("timeout");
        s.set_nodelay(true).expect("nodelay");
    }
    Function {
        id,
        port,
        socket,
        hub_peer,
    }
}

/// Waits (bounded) until the sock_ops program filed the function's socket.
fn wait_for_socket(dp: &Dataplane, id: u32, present: bool) {
    let deadline = Instant::now() + Duration::from_secs(5);
    loop {
        let has = dp
            .has_socket(id)
            .unwrap_or_else(|e| panic!("has_socket({id}): {e}"));
        if has == present {
            return;
        }
        assert!(
            Instant::now() < deadline,
            "fn_socks entry for function {id} never became present={present}"
        );
        std::thread::sleep(Duration::from_millis(5));
    }
}

fn read_descriptor(stream: &mut TcpStream) -> Descriptor {
    let mut d = [0u8; DESCRIPTOR_LEN];
    stream.read_exact(&mut d).expect("read descriptor");
    d
}

/// Asserts that nothing is queued on `stream` right now.
fn assert_empty(stream: &TcpStream, what: &str) {
    stream.set_nonblocking(true).expect("nonblocking");
    let mut buf = [0u8; 64];
    match (&*stream).read(&mut buf) {
        Err(e) if e.kind() == ErrorKind::WouldBlock => {}
        Ok(n) => panic!("{what} unexpectedly received {n} bytes: {:?}", &buf[..n]),
        Err(e) => panic!("{what}: read failed: {e}"),
    }
    stream.set_nonblocking(false).expect("blocking");
}

/// Counters after `messages` whole descriptors.
fn sent(messages: u64) -> Counters {
    Counters {
        messages,
        bytes: messages * DESCRIPTOR_LEN as u64,
    }
}

fn counters(dp: &Dataplane, id: u32) -> Counters {
    dp.counters(id)
        .unwrap_or_else(|e| panic!("counters({id}): {e}"))
}

fn unknown(dp: &Dataplane) -> Counters {
    dp.unknown_counters()
        .unwrap_or_else(|e| panic!("unknown_counters: {e}"))
}

fn setup_pair(dp: &mut Dataplane, hub: &Hub, a: u32, b: u32) -> (Function, Function) {
    let fa = attach_function(dp, hub, a);
    let fb = attach_function(dp, hub, b);
    wait_for_socket(dp, a, true);
    wait_for_socket(dp, b, true);
    (fa, fb)
}

#[test]
fn descriptor_goes_straight_to_the_destination_and_unknown_ones_to_the_hub() {
    let mut dp = load(&DataplaneOptions::default());
    let hub = Hub::new();
    let (mut a, mut b) = setup_pair(&mut dp, &hub, 1, 2);

    let to_b = descriptor(b.id, 4096, 512, 7);
    a.socket.write_all(&to_b).expect("send to b");
    assert_eq!(read_descriptor(&mut b.socket), to_b);

    let to_nowhere = descriptor(99, 0, 64, 1);
    a.socket.write_all(&to_nowhere).expect("send to unknown");
    // TCP keeps order: the first thing the hub peer sees is the unknown
    // descriptor, so the one for B never went through the hub.
    assert_eq!(read_descriptor(&mut a.hub_peer), to_nowhere);
    assert_empty(&a.hub_peer, "hub peer of A");
    assert_empty(&b.hub_peer, "hub peer of B");
    assert_empty(&b.socket, "socket of B");
    assert_empty(&a.socket, "socket of A");

    // B answers A the same way.
    let to_a = descriptor(a.id, 8192, 16, 3);
    b.socket.write_all(&to_a).expect("send to a");
    assert_eq!(read_descriptor(&mut a.socket), to_a);

    assert_eq!(counters(&dp, b.id), sent(1));
    assert_eq!(counters(&dp, a.id), sent(1));
    assert_eq!(unknown(&dp), sent(1));
    assert_eq!(counters(&dp, 99), Counters::default());
    dp.detach().unwrap_or_else(|e| panic!("detach: {e}"));
}

#[test]
fn batched_descriptors_are_judged_one_by_one() {
    let mut dp = load(&DataplaneOptions::default());
    let hub = Hub::new();
    let (mut a, mut b) = setup_pair(&mut dp, &hub, 3, 4);
    let mut c = attach_function(&mut dp, &hub, 5);
    wait_for_socket(&dp, c.id, true);

    let batch = [
        descriptor(b.id, 0, 1, 1),
        descriptor(c.id, 0, 2, 2),
        descriptor(b.id, 0, 3, 3),
    ];
    a.socket.write_all(&batch.concat()).expect("send batch");
    assert_eq!(read_descriptor(&mut b.socket), batch[0]);
    assert_eq!(read_descriptor(&mut b.socket), batch[2]);
    assert_eq!(read_descriptor(&mut c.socket), batch[1]);
    assert_eq!(counters(&dp, b.id), sent(2));
    assert_eq!(counters(&dp, c.id), sent(1));

    // From the first unknown destination on, the rest of the write goes to
    // the hub in one piece (and arrives without waiting for more writes).
    let mixed = [
        descriptor(c.id, 0, 4, 4),
        descriptor(200, 0, 5, 5),
        descriptor(b.id, 0, 6, 6),
    ];
    a.socket
        .write_all(&mixed.concat())
        .expect("send mixed batch");
    assert_eq!(read_descriptor(&mut c.socket), mixed[0]);
    assert_eq!(read_descriptor(&mut a.hub_peer), mixed[1]);
    assert_eq!(read_descriptor(&mut a.hub_peer), mixed[2]);
    assert_empty(&a.hub_peer, "hub peer of A");
    assert_empty(&b.socket, "socket of B");
    assert_empty(&a.socket, "socket of A");
    assert_eq!(unknown(&dp), sent(2));
    assert_eq!(counters(&dp, c.id), sent(2));
}

#[test]
fn ten_thousand_descriptors_arrive_complete_and_in_order() {
    const COUNT: u32 = 10_000;
    let mut dp = load(&DataplaneOptions::default());
    let hub = Hub::new();
    let (mut a, b) = setup_pair(&mut dp, &hub, 10, 11);
    let dst = b.id;
    let mut receiver = b.socket;
    let reader = std::thread::spawn(move || {
        for seq in 0..COUNT {
            let d = read_descriptor(&mut receiver);
            assert_eq!(d, descriptor(dst, seq, seq.wrapping_mul(3), seq ^ 0x5a5a));
        }
    });
    for seq in 0..COUNT {
        a.socket
            .write_all(&descriptor(dst, seq, seq.wrapping_mul(3), seq ^ 0x5a5a))
            .expect("send");
    }
    reader.join().expect("reader saw every descriptor in order");
    assert_eq!(counters(&dp, dst), sent(u64::from(COUNT)));
    assert_eq!(unknown(&dp), Counters::default());
    assert_empty(&a.hub_peer, "hub peer of A");
}

#[test]
fn many_descriptors_to_unknown_ids_reach_the_hub_in_order() {
    const COUNT: u32 = 2_000;
    let mut dp = load(&DataplaneOptions::default());
    let hub = Hub::new();
    let mut a = attach_function(&mut dp, &hub, 30);
    wait_for_socket(&dp, a.id, true);
    let mut hub_peer = a.hub_peer;
    let reader = std::thread::spawn(move || {
        for seq in 0..COUNT {
            assert_eq!(
                read_descriptor(&mut hub_peer),
                descriptor(100 + seq % 100, seq, 0, 0)
            );
        }
        hub_peer
    });
    for seq in 0..COUNT {
        a.socket
            .write_all(&descriptor(100 + seq % 100, seq, 0, 0))
            .expect("send");
    }
    let hub_peer = reader.join().expect("hub saw every descriptor in order");
    assert_empty(&hub_peer, "hub peer of A");
    assert_eq!(unknown(&dp), sent(u64::from(COUNT)));
}

#[test]
fn two_dataplanes_on_one_cgroup_do_not_interfere() {
    let mut dp1 = load(&DataplaneOptions::default());
    let mut dp2 = load(&DataplaneOptions::default());
    let hub = Hub::new();
    // Same function ids in both dataplanes.
    let (mut a1, mut b1) = setup_pair(&mut dp1, &hub, 1, 2);
    let (mut a2, mut b2) = setup_pair(&mut dp2, &hub, 1, 2);

    let d1 = descriptor(2, 111, 1, 1);
    let d2 = descriptor(2, 222, 2, 2);
    a1.socket.write_all(&d1).expect("send in dp1");
    a2.socket.write_all(&d2).expect("send in dp2");
    assert_eq!(read_descriptor(&mut b1.socket), d1);
    assert_eq!(read_descriptor(&mut b2.socket), d2);
    assert_empty(&b1.socket, "B of dp1");
    assert_empty(&b2.socket, "B of dp2");
    assert_eq!(counters(&dp1, 2), sent(1));
    assert_eq!(counters(&dp2, 2), sent(1));

    // Detaching one leaves the other working.
    dp1.detach().unwrap_or_else(|e| panic!("detach dp1: {e}"));
    let d3 = descriptor(2, 333, 3, 3);
    a2.socket
        .write_all(&d3)
        .expect("send in dp2 after dp1 detached");
    assert_eq!(read_descriptor(&mut b2.socket), d3);
    assert_eq!(counters(&dp2, 2), sent(2));
}

fn cgroup_program_ids() -> Vec<u64> {
    program_ids(Path::new(DEFAULT_CGROUP_PATH))
}

#[test]
fn detach_leaves_no_attached_programs() {
    let dp = load(&DataplaneOptions::default());
    let ids = dp.program_ids().unwrap_or_else(|e| panic!("{e}"));
    assert!(
        cgroup_program_ids().contains(&u64::from(ids.sock_ops)),
        "sock_ops program {} not listed on {DEFAULT_CGROUP_PATH}",
        ids.sock_ops
    );
    dp.detach().unwrap_or_else(|e| panic!("detach: {e}"));
    assert!(!cgroup_program_ids().contains(&u64::from(ids.sock_ops)));

    // Dropping detaches too.
    let dp = load(&DataplaneOptions::default());
    let ids = dp.program_ids().unwrap_or_else(|e| panic!("{e}"));
    assert!(cgroup_program_ids().contains(&u64::from(ids.sock_ops)));
    drop(dp);
    assert!(!cgroup_program_ids().contains(&u64::from(ids.sock_ops)));
}

fn unique_pin_dir() -> PathBuf {
    PathBuf::from(format!(
        "/sys/fs/bpf/spright-{}",
        spright_test_support::unique_name("ebpf-pin")
    ))
}

fn assert_pinned(dir: &Path) {
    for name in names::MAPS {
        assert!(
            dir.join(name).exists(),
            "{name} not pinned in {}",
            dir.display()
        );
    }
}

#[test]
fn pinning_under_bpffs_works_and_is_cleaned_up() {
    let dir = unique_pin_dir();
    let opts = DataplaneOptions {
        pin_dir: Some(dir.clone()),
        ..DataplaneOptions::default()
    };
    let dp = load(&opts);
    assert_pinned(&dir);
    dp.detach().unwrap_or_else(|e| panic!("detach: {e}"));
    assert!(!dir.exists(), "{} left behind by detach", dir.display());

    // A stale pin left by a crashed run is replaced, and Drop cleans up too.
    std::fs::create_dir_all(&dir).expect("create pin dir");
    let stale = dir.join(names::MAP_FN_PORTS);
    let status = Command::new("bpftool")
        .args(["map", "create"])
        .arg(&stale)
        .args([
            "type", "hash", "key", "4", "value", "4", "entries", "1", "name", "stale",
        ])
        .status()
        .expect("run bpftool");
    assert!(status.success(), "bpftool map create failed");
    let dp = load(&opts);
    assert_pinned(&dir);
    drop(dp);
    // The directory existed before, so it stays; the pins are gone.
    for name in names::MAPS {
        assert!(!dir.join(name).exists(), "{name} still pinned");
    }
    std::fs::remove_dir(&dir).expect("remove test pin dir");
}

#[test]
fn removed_functions_and_unregistered_ports_fall_back_to_the_hub() {
    let mut dp = load(&DataplaneOptions::default());
    let hub = Hub::new();
    let (mut a, b) = setup_pair(&mut dp, &hub, 20, 21);

    dp.remove_function(b.id).unwrap_or_else(|e| panic!("{e}"));
    dp.remove_function(b.id)
        .unwrap_or_else(|e| panic!("removing twice is fine: {e}"));
    assert!(!dp.has_socket(b.id).unwrap_or_else(|e| panic!("{e}")));
    let d = descriptor(b.id, 1, 2, 3);
    a.socket.write_all(&d).expect("send");
    assert_eq!(read_descriptor(&mut a.hub_peer), d);
    assert_empty(&b.socket, "removed B");

    // Closing a function's socket removes it from fn_socks.
    drop(a.socket);
    wait_for_socket(&dp, a.id, false);

    // A port that was unregistered before connecting is not filed.
    dp.unregister_port(b.port).unwrap_or_else(|e| panic!("{e}"));
    dp.unregister_port(b.port)
        .unwrap_or_else(|e| panic!("unregistering twice is fine: {e}"));
    let c = attach_function(&mut dp, &hub, 22);
    dp.unregister_port(c.port).unwrap_or_else(|e| panic!("{e}"));
    wait_for_socket(&dp, c.id, true);
}

#[test]
fn out_of_range_function_ids_are_rejected() {
    let mut dp = load(&DataplaneOptions::default());
    let err = dp.register_port(40000, MAX_FUNCTIONS).unwrap_err();
    assert!(matches!(err, EbpfError::FunctionIdOutOfRange(256)), "{err}");
    assert!(dp.counters(UNKNOWN_INDEX).is_err());
}

#[test]
fn support_check_passes_here() {
    check_support(&DataplaneOptions::default()).unwrap_or_else(|e| panic!("{e}"));
}

#[test]
fn missing_cgroup_is_reported_with_its_path() {
    let err = Dataplane::load(&DataplaneOptions {
        cgroup_path: PathBuf::from("/sys/fs/cgroup/no-such-cgroup-v2"),
        pin_dir: None,
    })
    .unwrap_err();
    assert!(
        err.to_string().contains("/sys/fs/cgroup/no-such-cgroup-v2"),
        "{err}"
    );
    assert!(
        check_support(&DataplaneOptions {
            cgroup_path: PathBuf::from("/sys/fs/cgroup/no-such-cgroup-v2"),
            pin_dir: None,
        })
        .is_err()
    );
}

const UNPRIVILEGED_CHILD: &str = "SPRIGHT_EBPF_UNPRIVILEGED_CHILD";

#[test]
fn load_without_capabilities_names_the_missing_capabilities() {
    if std::env::var_os(UNPRIVILEGED_CHILD).is_some() {
        // Running inside setpriv below, with every capability dropped.
        let err = Dataplane::load(&DataplaneOptions::default()).unwrap_err();
        assert!(err.is_permission_denied(), "{err}");
        assert!(
            err.to_string()
                .starts_with("loading eBPF programs needs CAP_BPF and CAP_NET_ADMIN (run as root)"),
            "{err}"
        );
        assert!(check_support(&DataplaneOptions::default()).is_err());
        return;
    }
    let exe = std::env::current_exe().expect("test binary path");
    let output = Command::new("setpriv")
        .args([
            "--bounding-set=-all",
            "--inh-caps=-all",
            "--ambient-caps=-all",
        ])
        .arg(exe)
        .args([
            "--exact",
            "load_without_capabilities_names_the_missing_capabilities",
            "--test-threads=1",
        ])
        .env(UNPRIVILEGED_CHILD, "1")
        .output()
        .expect("run setpriv (util-linux)");
    let stdout = String::from_utf8_lossy(&output.stdout);
    assert!(
        output.status.success() && stdout.contains("1 passed"),
        "unprivileged child failed:\n{stdout}\n{}",
        String::from_utf8_lossy(&output.stderr)
    );
}
