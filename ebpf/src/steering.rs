//! Event-driven mode (EPROXY): kernel steering of a pod's serving port.
//!
//! An `sk_lookup` program (`bpf/steering.bpf.c`) attached to the pod's
//! network namespace runs when a TCP connection arrives for a port with no
//! established socket. For the serving port (e.g. 8012) it hands the
//! connection to the socket in its target map, the user container's listening
//! socket, so the user container accepts it directly and no userspace proxy
//! copies a byte. While the target is empty, or for other ports, the normal
//! lookup applies, so the sidecar's own listener on the serving port keeps
//! answering.
//!
//! A steered connection keeps the port it was addressed to: the user
//! container's accepted socket has the serving port (8012) as its local port.
//! So in this mode the request accounting must be attached for the serving
//! port, not the user port.
//!
//! Where the target comes from ([`Steering::attach_pod`]):
//! - at attach time, from the processes of the pod's cgroup: the sockets
//!   listening on the user port are found through `/proc/<pid>/net/tcp{,6}`
//!   and `/proc/<pid>/fd`, and duplicated with `pidfd_open` + `pidfd_getfd`
//!   (root, or CAP_SYS_PTRACE over the pod's processes) — [`pod_listeners`];
//! - afterwards in the kernel: a `sock_ops` program on the pod's cgroup sees
//!   every `listen(2)` (`BPF_SOCK_OPS_TCP_LISTEN_CB`) and puts a socket
//!   listening on the user port into the target map. A restarted user
//!   container is therefore steered to from its first `listen(2)`, with no
//!   polling and no userspace wake-up; a listener that closes leaves the
//!   sockmap by itself and connections fall back to the sidecar until then.
//!
//! The target map has one slot per family (0: AF_INET, 1: AF_INET6); IPv4
//! connections use the AF_INET listener, else a dual-stack AF_INET6 one.
//!
//! Connections from the source prefixes given to [`Steering::bypass`] are
//! not steered and reach the sidecar's own listener: give it the node's
//! address toward the pod, and kubelet probes of the serving port get the
//! queue-proxy's answers (200 `queue` from the readiness probe, 503 while
//! draining) instead of the user container's.
//! Loading needs root (CAP_BPF, CAP_NET_ADMIN).

use std::fs::File;
use std::net::IpAddr;
use std::os::fd::{AsFd, AsRawFd, FromRawFd, OwnedFd};
use std::path::{Path, PathBuf};

use aya::maps::lpm_trie::{Key, LpmTrie};
use aya::maps::{MapData, PerCpuArray, SockMap};
use aya::programs::{SkLookup, SockOps, sk_lookup::SkLookupLinkId, sock_ops::SockOpsLinkId};
use aya::{Ebpf, include_bytes_aligned};

use crate::{
    EbpfError, cgroup_attach_mode, kernel_ids, map_error, map_type_error, open_cgroup_v2,
    program_error, take_map,
};

/// Names in the embedded steering object.
pub mod names {
    /// The `sk_lookup` program.
    pub const PROG_LOOKUP: &str = "steer_lookup";
    /// The `sock_ops` program taking listeners of the user port.
    pub const PROG_LISTEN: &str = "steer_listen";
    /// ARRAY[1]: the steered port and the user port.
    pub const MAP_CONFIG: &str = "steer_config";
    /// SOCKMAP[2]: the target listening sockets (AF_INET, AF_INET6).
    pub const MAP_TARGET: &str = "steer_target";
    /// PERCPU_ARRAY[3]: connections steered, listeners taken, connections bypassed.
    pub const MAP_COUNT: &str = "steer_count";
    /// LPM_TRIE: source prefixes that are not steered (IPv4 as ::ffff:0:0/96).
    pub const MAP_BYPASS: &str = "steer_bypass";
}

static OBJECT: &[u8] = include_bytes_aligned!(concat!(env!("OUT_DIR"), "/steering.bpf.o"));

/// The steering programs attached to one pod.
pub struct Steering {
    ebpf: Ebpf,
    target: SockMap<MapData>,
    count: PerCpuArray<MapData, u64>,
    bypass: LpmTrie<MapData, [u8; 16], u8>,
    link: Option<SkLookupLinkId>,
    listen_link: Option<SockOpsLinkId>,
    port: u16,
    user_port: u16,
}

impl std::fmt::Debug for Steering {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Steering")
            .field("port", &self.port)
            .field("user_port", &self.user_port)
            .field("attached", &self.link.is_some())
            .field("retargets", &self.listen_link.is_some())
            .finish_non_exhaustive()
    }
}

/// Kernel ids of the steering programs and their maps.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct SteeringIds {
    /// Program ids.
    pub programs: Vec<u32>,
    /// Map ids.
    pub maps: Vec<u32>,
}

impl Steering {
    /// Loads the program, sets the port and attaches it to the network
    /// namespace at `netns` (e.g. `/var/run/netns/<name>` or
    /// `/proc/<pid>/ns/net`). Nothing is steered until [`Self::set_target`].
    pub fn attach(netns: &Path, port: u16) -> Result<Self, EbpfError> {
        Self::load(netns, None, port, 0)
    }

    /// [`Self::attach`] plus the in-kernel re-targeting: every socket a
    /// process of the cgroup `cgroup` puts into listening state on
    /// `user_port` becomes the target. Sockets already listening are not
    /// seen by it: give them to [`Self::set_target`] ([`pod_listeners`]).
    pub fn attach_pod(
        netns: &Path,
        cgroup: &Path,
        port: u16,
        user_port: u16,
    ) -> Result<Self, EbpfError> {
        Self::load(netns, Some(cgroup), port, user_port)
    }

    fn load(
        netns: &Path,
        cgroup: Option<&Path>,
        port: u16,
        user_port: u16,
    ) -> Result<Self, EbpfError> {
        let ns = File::open(netns).map_err(|source| EbpfError::PinPath {
            action: "opening the network namespace",
            path: netns.to_owned(),
            source,
        })?;
        let cgroup = cgroup.map(open_cgroup_v2).transpose()?;
        let mut ebpf = crate::accounting::load_with_config(
            OBJECT,
            names::MAP_CONFIG,
            port,
            u32::from(user_port),
        )?;
        let target = SockMap::try_from(take_map(&mut ebpf, names::MAP_TARGET)?)
            .map_err(|e| map_type_error(names::MAP_TARGET, e))?;
        let count = PerCpuArray::try_from(take_map(&mut ebpf, names::MAP_COUNT)?)
            .map_err(|e| map_type_error(names::MAP_COUNT, e))?;
        let bypass = LpmTrie::try_from(take_map(&mut ebpf, names::MAP_BYPASS)?)
            .map_err(|e| map_type_error(names::MAP_BYPASS, e))?;
        let listen_link =
            match &cgroup {
                Some(cgroup) => {
                    let prog = listen_program(&mut ebpf)?;
                    prog.load()
                        .map_err(|e| program_error(names::PROG_LISTEN, "loading", e))?;
                    Some(prog.attach(cgroup, cgroup_attach_mode()).map_err(|e| {
                        program_error(names::PROG_LISTEN, "attaching to the cgroup", e)
                    })?)
                }
                None => None,
            };
        let prog = lookup_program(&mut ebpf)?;
        prog.load()
            .map_err(|e| program_error(names::PROG_LOOKUP, "loading", e))?;
        // If this fails, dropping `ebpf` closes the sock_ops link too.
        let link = prog.attach(&ns).map_err(|e| {
            program_error(names::PROG_LOOKUP, "attaching to the network namespace", e)
        })?;
        Ok(Self {
            ebpf,
            target,
            count,
            bypass,
            link: Some(link),
            listen_link,
            port,
            user_port,
        })
    }

    /// The steered (serving) port.
    pub fn port(&self) -> u16 {
        self.port
    }

    /// The user port whose listeners [`Self::attach_pod`] takes (0: none).
    pub fn user_port(&self) -> u16 {
        self.user_port
    }

    /// Steers new connections for the port to `listener` (a listening TCP
    /// socket, in the same network namespace), in the slot of its family.
    pub fn set_target(&mut self, listener: &impl AsRawFd) -> Result<(), EbpfError> {
        let slot = u32::from(socket_family(listener.as_raw_fd()) == libc::AF_INET6);
        self.target
            .set(slot, listener, 0)
            .map_err(|e| map_error(names::MAP_TARGET, "setting the target socket".into(), e))
    }

    /// Stops steering; new connections take the normal lookup again.
    pub fn clear_target(&mut self) -> Result<(), EbpfError> {
        for slot in [0, 1] {
            match self.target.clear_index(&slot) {
                // A sockmap answers EINVAL for an empty slot.
                Err(aya::maps::MapError::SyscallError(e))
                    if e.io_error.raw_os_error() == Some(libc::EINVAL) => {}
                Err(e) if !crate::is_not_found(&e) => {
                    return Err(map_error(
                        names::MAP_TARGET,
                        "clearing the target socket".into(),
                        e,
                    ));
                }
                _ => {}
            }
        }
        Ok(())
    }

    /// Leaves connections from `prefix` (e.g. the node's address toward the
    /// pod) to the normal lookup.
    pub fn bypass(&mut self, prefix: SourcePrefix) -> Result<(), EbpfError> {
        let (len, addr) = prefix.as_v6();
        self.bypass
            .insert(&Key::new(u32::from(len), addr), 1, 0)
            .map_err(|e| map_error(names::MAP_BYPASS, format!("adding {prefix}"), e))
    }

    /// Connections left to the normal lookup by [`Self::bypass`] so far.
    pub fn bypassed(&self) -> Result<u64, EbpfError> {
        self.counter(2)
    }

    /// Connections steered so far.
    pub fn steered(&self) -> Result<u64, EbpfError> {
        self.counter(0)
    }

    /// Listeners taken in the kernel by the `listen(2)` hook so far.
    pub fn listeners_taken(&self) -> Result<u64, EbpfError> {
        self.counter(1)
    }

    fn counter(&self, index: u32) -> Result<u64, EbpfError> {
        self.count
            .get(&index, 0)
            .map(|values| values.iter().copied().fold(0u64, u64::wrapping_add))
            .map_err(|e| map_error(names::MAP_COUNT, "reading the count".into(), e))
    }

    /// Kernel ids of the attached programs and of the maps they use.
    pub fn ids(&self) -> Result<SteeringIds, EbpfError> {
        let mut programs = vec![names::PROG_LOOKUP];
        if self.listen_link.is_some() {
            programs.push(names::PROG_LISTEN);
        }
        let (programs, maps) = kernel_ids(&self.ebpf, &programs, "steering")?;
        Ok(SteeringIds { programs, maps })
    }

    /// Detaches the programs; the kernel frees them and their maps with this value.
    pub fn detach(mut self) -> Result<(), EbpfError> {
        self.teardown()
    }

    fn teardown(&mut self) -> Result<(), EbpfError> {
        let mut result = Ok(());
        if let Some(link) = self.listen_link.take() {
            result = listen_program(&mut self.ebpf).and_then(|p| {
                p.detach(link)
                    .map_err(|e| program_error(names::PROG_LISTEN, "detaching", e))
            });
        }
        if let Some(link) = self.link.take() {
            result = result.and(lookup_program(&mut self.ebpf).and_then(|p| {
                p.detach(link)
                    .map_err(|e| program_error(names::PROG_LOOKUP, "detaching", e))
            }));
        }
        result
    }
}

impl Drop for Steering {
    fn drop(&mut self) {
        if let Err(error) = self.teardown() {
            tracing::warn!(%error, "detaching the steering programs failed");
        }
    }
}

fn lookup_program(ebpf: &mut Ebpf) -> Result<&mut SkLookup, EbpfError> {
    ebpf.program_mut(names::PROG_LOOKUP)
        .and_then(|p| <&mut SkLookup>::try_from(p).ok())
        .ok_or(EbpfError::MissingProgram {
            name: names::PROG_LOOKUP,
            kind: "sk_lookup",
        })
}

fn listen_program(ebpf: &mut Ebpf) -> Result<&mut SockOps, EbpfError> {
    ebpf.program_mut(names::PROG_LISTEN)
        .and_then(|p| <&mut SockOps>::try_from(p).ok())
        .ok_or(EbpfError::MissingProgram {
            name: names::PROG_LISTEN,
            kind: "sock_ops",
        })
}

/// A source prefix that is not steered: an address and a prefix length.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct SourcePrefix {
    /// Network address.
    pub addr: IpAddr,
    /// Prefix length (at most 32 for IPv4, 128 for IPv6).
    pub len: u8,
}

impl SourcePrefix {
    /// The prefix in the trie's IPv6 form (IPv4 as `::ffff:a.b.c.d`).
    fn as_v6(self) -> (u8, [u8; 16]) {
        match self.addr {
            IpAddr::V4(v4) => (96 + self.len, v4.to_ipv6_mapped().octets()),
            IpAddr::V6(v6) => (self.len, v6.octets()),
        }
    }
}

impl std::fmt::Display for SourcePrefix {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "{}/{}", self.addr, self.len)
    }
}

impl std::str::FromStr for SourcePrefix {
    type Err = String;

    /// `10.0.0.1`, `10.244.0.0/16`, `fd00::/8`; a bare address is a host prefix.
    fn from_str(s: &str) -> Result<Self, String> {
        let bad =
            || format!("{s:?} is not an IP address or prefix (e.g. 10.244.1.1 or 10.244.0.0/16)");
        let (addr, len) = match s.trim().split_once('/') {
            Some((a, l)) => (a, Some(l)),
            None => (s.trim(), None),
        };
        let addr: IpAddr = addr.parse().map_err(|_| bad())?;
        let max = if addr.is_ipv4() { 32 } else { 128 };
        let len = match len {
            Some(l) => l.parse::<u8>().ok().filter(|l| *l <= max).ok_or_else(bad)?,
            None => max,
        };
        Ok(Self { addr, len })
    }
}

/// `SO_DOMAIN` of a socket (AF_INET when it cannot be read).
fn socket_family(fd: std::os::fd::RawFd) -> libc::c_int {
    let mut domain: libc::c_int = libc::AF_INET;
    let mut len = std::mem::size_of::<libc::c_int>() as libc::socklen_t;
    // SAFETY: getsockopt writes at most `len` bytes into `domain`, a c_int on our stack.
    let rc = unsafe {
        libc::getsockopt(
            fd,
            libc::SOL_SOCKET,
            libc::SO_DOMAIN,
            (&raw mut domain).cast(),
            &raw mut len,
        )
    };
    if rc == 0 { domain } else { libc::AF_INET }
}

/// Why the user container's listening sockets could not be taken.
#[derive(Debug, thiserror::Error)]
pub enum ListenerError {
    /// The cgroup's process list is unreadable.
    #[error("reading the processes of cgroup {}: {source}", path.display())]
    Procs {
        /// cgroup directory.
        path: PathBuf,
        /// Cause.
        #[source]
        source: std::io::Error,
    },
    /// `pidfd_open` or `pidfd_getfd` failed (EPERM: CAP_SYS_PTRACE missing).
    #[error(
        "taking socket fd {fd} of process {pid} ({call}): {source}; this needs root or CAP_SYS_PTRACE over the pod's processes"
    )]
    Take {
        /// Process.
        pid: u32,
        /// Its descriptor.
        fd: i32,
        /// The failing call.
        call: &'static str,
        /// Cause.
        #[source]
        source: std::io::Error,
    },
}

/// The processes of a cgroup v2 directory and of its descendants (the
/// containers of a pod have cgroups below the pod's).
pub fn cgroup_pids(cgroup: &Path) -> Result<Vec<u32>, ListenerError> {
    let mut pids = Vec::new();
    let mut dirs = vec![cgroup.to_owned()];
    while let Some(dir) = dirs.pop() {
        let procs = dir.join("cgroup.procs");
        let text = std::fs::read_to_string(&procs).map_err(|source| ListenerError::Procs {
            path: dir.clone(),
            source,
        })?;
        pids.extend(text.lines().filter_map(|l| l.trim().parse::<u32>().ok()));
        if let Ok(entries) = std::fs::read_dir(&dir) {
            dirs.extend(
                entries
                    .flatten()
                    .filter(|e| e.file_type().is_ok_and(|t| t.is_dir()))
                    .map(|e| e.path()),
            );
        }
    }
    pids.sort_unstable();
    pids.dedup();
    Ok(pids)
}

/// Socket inodes in LISTEN state on `port` in a `/proc/<pid>/net/tcp{,6}` text.
pub fn listening_inodes(table: &str, port: u16) -> Vec<u64> {
    table
        .lines()
        .skip(1)
        .filter_map(|line| {
            let fields: Vec<&str> = line.split_whitespace().collect();
            let local = fields.get(1)?;
            let state = fields.get(3)?;
            let inode = fields.get(9)?;
            let (_, hex_port) = local.rsplit_once(':')?;
            (*state == "0A" && u16::from_str_radix(hex_port, 16).ok()? == port)
                .then(|| inode.parse().ok())
                .flatten()
        })
        .filter(|inode| *inode != 0)
        .collect()
}

/// Duplicates, into this process, every socket listening on `port` held by a
/// process of `cgroup` (or its descendants): the user container's listeners.
/// Processes that exit meanwhile are skipped.
pub fn pod_listeners(cgroup: &Path, port: u16) -> Result<Vec<OwnedFd>, ListenerError> {
    let mut taken = Vec::new();
    let mut seen = Vec::new();
    for pid in cgroup_pids(cgroup)? {
        let mut inodes = Vec::new();
        for table in ["tcp", "tcp6"] {
            if let Ok(text) = std::fs::read_to_string(format!("/proc/{pid}/net/{table}")) {
                inodes.extend(listening_inodes(&text, port));
            }
        }
        inodes.retain(|i| !seen.contains(i));
        if inodes.is_empty() {
            continue;
        }
        let Ok(fds) = std::fs::read_dir(format!("/proc/{pid}/fd")) else {
            continue;
        };
        for entry in fds.flatten() {
            let Ok(link) = std::fs::read_link(entry.path()) else {
                continue;
            };
            let Some(inode) = link
                .to_str()
                .and_then(|l| l.strip_prefix("socket:["))
                .and_then(|l| l.strip_suffix(']'))
                .and_then(|l| l.parse::<u64>().ok())
            else {
                continue;
            };
            let Some(fd) = entry.file_name().to_str().and_then(|n| n.parse().ok()) else {
                continue;
            };
            if inodes.contains(&inode) && !seen.contains(&inode) {
                taken.push(take_fd(pid, fd)?);
                seen.push(inode);
            }
        }
    }
    Ok(taken)
}

/// `pidfd_getfd(pidfd_open(pid), fd)`.
fn take_fd(pid: u32, fd: i32) -> Result<OwnedFd, ListenerError> {
    let err = |call| {
        let source = std::io::Error::last_os_error();
        ListenerError::Take {
            pid,
            fd,
            call,
            source,
        }
    };
    // SAFETY: pidfd_open takes a pid and flags and returns a new descriptor or -1.
    let pidfd = unsafe { libc::syscall(libc::SYS_pidfd_open, pid as libc::pid_t, 0) };
    if pidfd < 0 {
        return Err(err("pidfd_open"));
    }
    // SAFETY: pidfd_open returned a fresh descriptor that we now own.
    let pidfd = unsafe { OwnedFd::from_raw_fd(pidfd as i32) };
    // SAFETY: pidfd_getfd takes a pidfd, a descriptor number and flags; it returns a new
    // descriptor or -1.
    let dup = unsafe { libc::syscall(libc::SYS_pidfd_getfd, pidfd.as_fd().as_raw_fd(), fd, 0) };
    if dup < 0 {
        return Err(err("pidfd_getfd"));
    }
    // SAFETY: pidfd_getfd returned a fresh descriptor that we now own.
    Ok(unsafe { OwnedFd::from_raw_fd(dup as i32) })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn object_exports_the_programs_and_maps() {
        let obj = aya_obj::Object::parse(OBJECT).expect("embedded object parses");
        assert!(obj.programs.contains_key(names::PROG_LOOKUP));
        assert!(obj.programs.contains_key(names::PROG_LISTEN));
        for map in [
            names::MAP_CONFIG,
            names::MAP_TARGET,
            names::MAP_COUNT,
            names::MAP_BYPASS,
        ] {
            assert!(obj.maps.contains_key(map), "{map}");
        }
    }

    #[test]
    fn a_missing_namespace_is_named() {
        let err = Steering::attach(Path::new("/nonexistent/netns"), 8012).unwrap_err();
        assert!(err.to_string().contains("/nonexistent/netns"), "{err}");
    }

    #[test]
    fn source_prefixes_parse() {
        let p: SourcePrefix = "10.244.1.1".parse().unwrap();
        assert_eq!((p.len, p.as_v6().0), (32, 128));
        let p: SourcePrefix = "10.244.0.0/16".parse().unwrap();
        assert_eq!(p.as_v6().0, 112);
        assert_eq!(p.as_v6().1[10..12], [0xff, 0xff]);
        let p: SourcePrefix = " fd00::/8 ".parse().unwrap();
        assert_eq!(p.as_v6().0, 8);
        assert_eq!(p.to_string(), "fd00::/8");
        for bad in ["", "node", "10.0.0.1/33", "fd00::/129", "10.0.0.1/x", "/8"] {
            assert!(bad.parse::<SourcePrefix>().is_err(), "{bad}");
        }
    }

    #[test]
    fn listeners_are_found_in_proc_tables() {
        let table = "  sl  local_address rem_address   st tx_queue rx_queue tr tm->when retrnsmt   uid  timeout inode\n\
   0: 00000000:1F90 00000000:0000 0A 00000000:00000000 00:00000000 00000000     0        0 4242 1 0 100 0 0 10 0\n\
   1: 0100007F:1F90 0100007F:9C40 01 00000000:00000000 00:00000000 00000000     0        0 4343 1 0 100 0 0 10 0\n\
   2: 00000000:1F4C 00000000:0000 0A 00000000:00000000 00:00000000 00000000     0        0 4444 1 0 100 0 0 10 0\n\
   garbage\n";
        assert_eq!(listening_inodes(table, 8080), vec![4242]);
        assert_eq!(listening_inodes(table, 8012), vec![4444]);
        assert!(listening_inodes(table, 9).is_empty());
        assert!(listening_inodes("", 8080).is_empty());
    }

    #[test]
    fn our_own_listener_is_taken_from_our_cgroup() {
        let text = std::fs::read_to_string("/proc/self/cgroup").unwrap();
        let rel = text
            .lines()
            .find_map(|l| l.strip_prefix("0::"))
            .expect("cgroup v2 entry");
        let cgroup = Path::new(crate::DEFAULT_CGROUP_PATH).join(rel.trim_start_matches('/'));
        let listener = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
        let port = listener.local_addr().unwrap().port();
        let taken = pod_listeners(&cgroup, port).unwrap();
        assert_eq!(taken.len(), 1);
        assert_eq!(socket_family(taken[0].as_raw_fd()), libc::AF_INET);
    }
}
