//! Full mode: the in-pod loopback hop between the queue-proxy sidecar and the
//! user container, short-circuited through a sockmap (SPRIGHT's redirect
//! applied to that hop).
//!
//! # Mechanism
//!
//! One copy of `bpf/loopback.bpf.c` is loaded per pod. Its `sock_ops` program
//! is attached to the pod's cgroup v2 directory (the directory must contain
//! both the sidecar and the user container: a pod cgroup, or one cgroup both
//! processes run in). When a TCP connection over loopback (`127.0.0.0/8`,
//! `::1`, or the pod's own address to itself) is established and one of its
//! ports is a user port given to [`Loopback::attach`], both of its ends are
//! filed in a SOCKHASH keyed by their 4-tuple, and each end keeps its peer's
//! 4-tuple in socket-local storage. The `sk_msg` program then runs on every
//! `sendmsg()` of those sockets and moves the bytes into the receive queue of
//! the peer socket (`bpf_msg_redirect_hash` with `BPF_F_INGRESS`): requests
//! from the sidecar to the user container and responses back skip the
//! TCP/IP stack (no segmentation, no ACKs, no softirq); the reader's `read()`
//! takes them as usual. Everything else (other ports, other addresses) is not
//! touched.
//!
//! The `sock_ops` program coexists with the request accounting's `sock_ops`
//! on the same cgroup: both are attached through BPF links, which the kernel
//! runs one after the other (allow-multiple semantics). The accounting counts
//! the serving port (8012), whose connections come from outside the pod and
//! are not redirected, so its `cgroup_skb` programs still see every packet;
//! this program never changes a socket's callback flags, so it leaves the
//! accounting's state callbacks alone.
//!
//! # Pitfalls handled
//!
//! - **Order.** The reader drains redirected bytes before bytes that came over
//!   TCP. If a sender writes before its peer is filed (the client's first
//!   write can race the server's `ESTABLISHED` callback), the write goes over
//!   TCP and that sender keeps using TCP for the rest of the connection, so no
//!   stream is ever reordered; only redirect → TCP switches happen, never
//!   TCP → redirect. The counters show such fallbacks as passed messages.
//! - **Closing peers.** A socket leaves the SOCKHASH when it closes; a write
//!   to a peer that is gone falls back to TCP (and gets TCP's answer: RST,
//!   `EPIPE`), one that races the close gets `EPIPE` from the redirect.
//! - **Partial sends, `MSG_MORE`.** Each `sendmsg()` is judged as a whole
//!   (no `apply_bytes`/`cork_bytes`), so what a call accepted is what was
//!   queued at the peer; `MSG_MORE` does not hold bytes back.
//! - **Detach.** [`Loopback`]'s drop first tells the program to stop
//!   redirecting (new writes take TCP, which the reader sees after the bytes
//!   redirected before), then detaches both programs: nothing stays on the
//!   cgroup and no new connection is filed. Connections filed before keep
//!   the (now pass-through) `sk_msg` program until they close, then the
//!   kernel frees it and every map. Taking them out of the map at once would
//!   make the kernel drop bytes redirected but not yet read.
//!
//! # Limits
//!
//! - A reader using `splice()` from the socket, or `FIONREAD`, sees only the
//!   bytes that came over TCP (kernel behaviour for sockmap sockets): neither
//!   the sidecar nor common HTTP servers do that on their client side, but a
//!   user container that splices its request bodies must not run in full mode.
//! - Redirected bytes bypass the receiver's TCP window: a peer that does not
//!   read lets the sender queue up to the receiver's memory limits (the
//!   sender then gets `ENOMEM`/`EAGAIN` instead of blocking on the window).
//! - Connections established before [`Loopback::attach`] stay on TCP.
//!
//! Loading needs root (CAP_BPF, CAP_NET_ADMIN).

use std::fs::File;
use std::path::{Path, PathBuf};

use aya::maps::{Array, HashMap as BpfHashMap, MapData, PerCpuArray, SockHash};
use aya::programs::{SkMsg, SockOps, sk_msg::SkMsgLinkId, sock_ops::SockOpsLinkId};
use aya::{Ebpf, include_bytes_aligned};

use crate::{
    EbpfError, cgroup_attach_mode, kernel_ids, load_without_btf, map_error, map_type_error,
    open_cgroup_v2, program_error, take_map,
};

/// Names of the programs and maps in the embedded loopback object.
pub mod names {
    /// `sockops`: files established loopback connections of the user ports.
    pub const PROG_SOCK_OPS: &str = "lb_sockops";
    /// `sk_msg`: redirects each write to the peer's receive queue.
    pub const PROG_SK_MSG: &str = "lb_msg";
    /// HASH: user port (u32, host order) → 1.
    pub const MAP_PORTS: &str = "lb_ports";
    /// SOCKHASH: 4-tuple → socket.
    pub const MAP_SOCKS: &str = "lb_socks";
    /// SK_STORAGE: the peer's 4-tuple and the TCP fallback flag.
    pub const MAP_STATE: &str = "lb_state";
    /// ARRAY[1]: `{ draining, pad }`.
    pub const MAP_CONFIG: &str = "lb_config";
    /// PERCPU_ARRAY of u64: the counters (see [`super::LoopbackCounters`]).
    pub const MAP_COUNTERS: &str = "lb_counters";
    /// Every program.
    pub const PROGRAMS: [&str; 2] = [PROG_SOCK_OPS, PROG_SK_MSG];
    /// Every map.
    pub const MAPS: [&str; 5] = [MAP_PORTS, MAP_SOCKS, MAP_STATE, MAP_CONFIG, MAP_COUNTERS];
}

/// How many user ports one pod may list (`lb_ports` capacity).
pub const MAX_USER_PORTS: usize = 16;

/// The compiled programs (see build.rs).
static OBJECT: &[u8] = include_bytes_aligned!(concat!(env!("OUT_DIR"), "/loopback.bpf.o"));

// Counter slots in `lb_counters`.
const C_REDIRECT_MSGS: u32 = 0;
const C_REDIRECT_BYTES: u32 = 1;
const C_PASS_MSGS: u32 = 2;
const C_PASS_BYTES: u32 = 3;
const C_SOCKETS: u32 = 4;
const C_INSERT_FAILED: u32 = 5;

/// Layout of `struct lb_key` in the C program: one end's view of a
/// connection, addresses as IPv6 (IPv4 mapped) in network order, ports in
/// host order.
#[repr(C)]
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct SocketKey {
    /// Local address (16 bytes, network order).
    pub local_ip: [u32; 4],
    /// Remote address (16 bytes, network order).
    pub remote_ip: [u32; 4],
    /// Local port, host order.
    pub local_port: u32,
    /// Remote port, host order.
    pub remote_port: u32,
}

// SAFETY: plain integers, repr(C), no padding.
unsafe impl aya::Pod for SocketKey {}

impl SocketKey {
    /// The key of the end of a connection with these addresses.
    pub fn new(local: std::net::SocketAddr, remote: std::net::SocketAddr) -> Self {
        Self {
            local_ip: ip_words(local.ip()),
            remote_ip: ip_words(remote.ip()),
            local_port: u32::from(local.port()),
            remote_port: u32::from(remote.port()),
        }
    }
}

fn ip_words(ip: std::net::IpAddr) -> [u32; 4] {
    let v6 = match ip {
        std::net::IpAddr::V4(v4) => v4.to_ipv6_mapped(),
        std::net::IpAddr::V6(v6) => v6,
    };
    let o = v6.octets();
    // Network order in memory: the words are the octets as they lie.
    std::array::from_fn(|i| {
        u32::from_ne_bytes([o[4 * i], o[4 * i + 1], o[4 * i + 2], o[4 * i + 3]])
    })
}

/// Layout of `struct lb_cfg` in the C program.
#[repr(C)]
#[derive(Debug, Clone, Copy, Default)]
struct RawConfig {
    draining: u32,
    pad: u32,
}

// SAFETY: plain integers, repr(C).
unsafe impl aya::Pod for RawConfig {}

/// What the programs did since they were attached, summed over CPUs.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct LoopbackCounters {
    /// Writes moved straight into the peer's receive queue.
    pub redirected_messages: u64,
    /// Bytes of those writes.
    pub redirected_bytes: u64,
    /// Writes of filed sockets that went over TCP (peer not filed yet or
    /// gone, or draining).
    pub passed_messages: u64,
    /// Bytes of those writes.
    pub passed_bytes: u64,
    /// Sockets filed in the SOCKHASH (both ends count).
    pub sockets_filed: u64,
    /// Sockets that qualified but could not be filed (map full, no memory).
    pub insert_failures: u64,
}

/// Kernel ids of one pod's loopback programs and maps (as `bpftool` lists them).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct LoopbackIds {
    /// Program ids: sock_ops, sk_msg.
    pub programs: Vec<u32>,
    /// Map ids used by the programs.
    pub maps: Vec<u32>,
}

/// One pod's loopback redirect, attached to its cgroup. Dropping it stops the
/// redirect and detaches the programs; the kernel frees programs and maps once
/// the connections filed before have closed (see the module docs).
pub struct Loopback {
    // Field order matters for Drop: programs (and links) go before maps.
    ebpf: Ebpf,
    socks: SockHash<MapData, SocketKey>,
    config: Array<MapData, RawConfig>,
    counters: PerCpuArray<MapData, u64>,
    links: Option<Links>,
    cgroup_path: PathBuf,
    user_ports: Vec<u16>,
}

struct Links {
    sock_ops: SockOpsLinkId,
    sk_msg: SkMsgLinkId,
}

impl std::fmt::Debug for Loopback {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Loopback")
            .field("cgroup_path", &self.cgroup_path)
            .field("user_ports", &self.user_ports)
            .field("attached", &self.links.is_some())
            .finish_non_exhaustive()
    }
}

impl Loopback {
    /// Loads a fresh copy of the programs, lists `user_ports` (1 to
    /// [`MAX_USER_PORTS`] ports, none 0) and attaches them to `cgroup` (a
    /// cgroup v2 directory holding both ends of the loopback hop).
    /// Connections established before this call stay on TCP.
    pub fn attach(cgroup: &Path, user_ports: &[u16]) -> Result<Self, EbpfError> {
        check_ports(user_ports)?;
        let cgroup_file = open_cgroup_v2(cgroup)?;
        let mut ebpf = load_without_btf(OBJECT)?;

        let mut ports: BpfHashMap<MapData, u32, u32> =
            BpfHashMap::try_from(take_map(&mut ebpf, names::MAP_PORTS)?)
                .map_err(|e| map_type_error(names::MAP_PORTS, e))?;
        for &port in user_ports {
            ports
                .insert(u32::from(port), 1, 0)
                .map_err(|e| map_error(names::MAP_PORTS, format!("listing port {port}"), e))?;
        }
        let socks = SockHash::try_from(take_map(&mut ebpf, names::MAP_SOCKS)?)
            .map_err(|e| map_type_error(names::MAP_SOCKS, e))?;
        let config = Array::try_from(take_map(&mut ebpf, names::MAP_CONFIG)?)
            .map_err(|e| map_type_error(names::MAP_CONFIG, e))?;
        let counters = PerCpuArray::try_from(take_map(&mut ebpf, names::MAP_COUNTERS)?)
            .map_err(|e| map_type_error(names::MAP_COUNTERS, e))?;

        let links = attach_programs(&mut ebpf, &socks, &cgroup_file)?;
        // `ports` may go: the programs hold the map.
        drop(ports);
        tracing::debug!(cgroup = %cgroup.display(), ?user_ports, "loopback redirect attached");
        Ok(Self {
            ebpf,
            socks,
            config,
            counters,
            links: Some(links),
            cgroup_path: cgroup.to_owned(),
            user_ports: user_ports.to_vec(),
        })
    }

    /// The cgroup the programs are attached to.
    pub fn cgroup_path(&self) -> &Path {
        &self.cgroup_path
    }

    /// The user ports whose loopback connections are redirected.
    pub fn user_ports(&self) -> &[u16] {
        &self.user_ports
    }

    /// Reads the counters, summed over CPUs.
    pub fn counters(&self) -> Result<LoopbackCounters, EbpfError> {
        let read = |slot: u32| {
            self.counters
                .get(&slot, 0)
                .map(|values| values.iter().copied().fold(0u64, u64::wrapping_add))
                .map_err(|e| map_error(names::MAP_COUNTERS, format!("reading counter {slot}"), e))
        };
        Ok(LoopbackCounters {
            redirected_messages: read(C_REDIRECT_MSGS)?,
            redirected_bytes: read(C_REDIRECT_BYTES)?,
            passed_messages: read(C_PASS_MSGS)?,
            passed_bytes: read(C_PASS_BYTES)?,
            sockets_filed: read(C_SOCKETS)?,
            insert_failures: read(C_INSERT_FAILED)?,
        })
    }

    /// The sockets filed right now (closed sockets leave by themselves).
    pub fn filed_sockets(&self) -> Result<Vec<SocketKey>, EbpfError> {
        self.socks
            .keys()
            .collect::<Result<Vec<_>, _>>()
            .map_err(|e| map_error(names::MAP_SOCKS, "listing sockets".into(), e))
    }

    /// Kernel ids of the programs and of the maps they use.
    pub fn ids(&self) -> Result<LoopbackIds, EbpfError> {
        let (programs, maps) = kernel_ids(&self.ebpf, &names::PROGRAMS, "loopback")?;
        Ok(LoopbackIds { programs, maps })
    }

    /// Stops redirecting and detaches the programs; the kernel frees them and
    /// the maps once this value is gone and the connections filed before
    /// have closed.
    pub fn detach(mut self) -> Result<(), EbpfError> {
        self.teardown()
    }

    fn teardown(&mut self) -> Result<(), EbpfError> {
        let Some(links) = self.links.take() else {
            return Ok(());
        };
        // New writes take TCP from now on; the readers see them after what
        // was redirected before.
        let mut result = self
            .config
            .set(
                0,
                RawConfig {
                    draining: 1,
                    pad: 0,
                },
                0,
            )
            .map_err(|e| map_error(names::MAP_CONFIG, "setting draining".into(), e));
        result = result.and(sock_ops(&mut self.ebpf).and_then(|p| {
            p.detach(links.sock_ops)
                .map_err(|e| program_error(names::PROG_SOCK_OPS, "detaching", e))
        }));
        result = result.and(sk_msg(&mut self.ebpf).and_then(|p| {
            p.detach(links.sk_msg)
                .map_err(|e| program_error(names::PROG_SK_MSG, "detaching", e))
        }));
        result
    }
}

impl Drop for Loopback {
    fn drop(&mut self) {
        if let Err(error) = self.teardown() {
            tracing::warn!(%error, "detaching the loopback redirect failed");
        }
    }
}

/// Error for a bad user port list.
fn check_ports(user_ports: &[u16]) -> Result<(), EbpfError> {
    let problem = if user_ports.is_empty() {
        Some("no user port given".to_owned())
    } else if user_ports.len() > MAX_USER_PORTS {
        Some(format!(
            "{} user ports given, at most {MAX_USER_PORTS} are supported",
            user_ports.len()
        ))
    } else if user_ports.contains(&0) {
        Some("user port 0 is not a port".to_owned())
    } else {
        None
    };
    match problem {
        Some(detail) => Err(EbpfError::UserPorts(detail)),
        None => Ok(()),
    }
}

fn attach_programs(
    ebpf: &mut Ebpf,
    socks: &SockHash<MapData, SocketKey>,
    cgroup: &File,
) -> Result<Links, EbpfError> {
    let prog = sk_msg(ebpf)?;
    prog.load()
        .map_err(|e| program_error(names::PROG_SK_MSG, "loading", e))?;
    let sk_msg = prog
        .attach(socks.fd())
        .map_err(|e| program_error(names::PROG_SK_MSG, "attaching to lb_socks", e))?;
    let prog = sock_ops(ebpf)?;
    prog.load()
        .map_err(|e| program_error(names::PROG_SOCK_OPS, "loading", e))?;
    let sock_ops = prog
        .attach(cgroup, cgroup_attach_mode())
        .map_err(|e| program_error(names::PROG_SOCK_OPS, "attaching to the cgroup", e))?;
    // If a later step fails, dropping `ebpf` closes the program fds and the
    // links with them: nothing stays attached.
    Ok(Links { sock_ops, sk_msg })
}

fn sock_ops(ebpf: &mut Ebpf) -> Result<&mut SockOps, EbpfError> {
    program(ebpf, names::PROG_SOCK_OPS, "sock_ops")
}

fn sk_msg(ebpf: &mut Ebpf) -> Result<&mut SkMsg, EbpfError> {
    program(ebpf, names::PROG_SK_MSG, "sk_msg")
}

/// The program `name` of type `P` in `ebpf`.
fn program<'a, P>(
    ebpf: &'a mut Ebpf,
    name: &'static str,
    kind: &'static str,
) -> Result<&'a mut P, EbpfError>
where
    &'a mut P: TryFrom<&'a mut aya::programs::Program>,
{
    ebpf.program_mut(name)
        .and_then(|p| <&mut P>::try_from(p).ok())
        .ok_or(EbpfError::MissingProgram { name, kind })
}

#[cfg(test)]
mod tests {
    use super::*;
    use aya_obj::ProgramSection;

    #[test]
    fn object_exports_the_programs_and_maps_the_loader_expects() {
        let obj = aya_obj::Object::parse(OBJECT).expect("embedded object parses");
        assert!(matches!(
            obj.programs[names::PROG_SOCK_OPS].section,
            ProgramSection::SockOps
        ));
        assert!(matches!(
            obj.programs[names::PROG_SK_MSG].section,
            ProgramSection::SkMsg
        ));
        assert_eq!(obj.programs.len(), names::PROGRAMS.len());
        for name in names::MAPS {
            assert!(obj.maps.contains_key(name), "map {name} missing");
        }
        assert_eq!(obj.maps.len(), names::MAPS.len());
        assert_eq!(
            obj.maps[names::MAP_SOCKS].key_size() as usize,
            std::mem::size_of::<SocketKey>()
        );
        assert_eq!(
            obj.maps[names::MAP_CONFIG].value_size() as usize,
            std::mem::size_of::<RawConfig>()
        );
        assert_eq!(
            obj.maps[names::MAP_PORTS].max_entries() as usize,
            MAX_USER_PORTS
        );
        assert_eq!(obj.license.to_str(), Ok("GPL"));
    }

    #[test]
    fn keys_map_ipv4_into_ipv6_in_network_order() {
        let key = SocketKey::new(
            "127.0.0.1:40000".parse().unwrap(),
            "127.0.0.1:8080".parse().unwrap(),
        );
        let bytes: Vec<u8> = key.remote_ip.iter().flat_map(|w| w.to_ne_bytes()).collect();
        assert_eq!(
            bytes,
            [0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0xff, 0xff, 127, 0, 0, 1]
        );
        assert_eq!((key.local_port, key.remote_port), (40000, 8080));
        let v6 = SocketKey::new("[::1]:1".parse().unwrap(), "[::1]:2".parse().unwrap());
        assert_eq!(v6.local_ip[3].to_ne_bytes(), [0, 0, 0, 1]);
    }

    #[test]
    fn port_lists_are_checked() {
        assert!(check_ports(&[8080]).is_ok());
        assert!(check_ports(&[]).is_err());
        assert!(check_ports(&[0]).is_err());
        assert!(check_ports(&[1; MAX_USER_PORTS + 1]).is_err());
    }

    #[test]
    fn missing_cgroup_is_named() {
        let err = Loopback::attach(Path::new("/nonexistent/spright-pod"), &[8080]).unwrap_err();
        assert!(matches!(err, EbpfError::CgroupNotFound { .. }), "{err}");
    }

    #[test]
    fn loopback_is_send() {
        fn assert_send<T: Send>() {}
        assert_send::<Loopback>();
    }
}
