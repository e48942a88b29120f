//! The eBPF half of the spright dataplane and its typed loader.
//!
//! # Data path
//!
//! Co-located functions exchange 16-byte descriptors (little endian: destination
//! function id, slot offset, length, generation; see [`DESCRIPTOR_LEN`]) that point
//! into a shared-memory pool. Each function process owns one loopback TCP socket:
//! the client end of a connection to the local hub listener.
//!
//! 1. Before a function's socket connects, userspace records its local port with
//!    [`Dataplane::register_port`] (map `fn_ports`: port → function id).
//! 2. When the connection is established, the `sock_ops` program (attached to the
//!    cgroup v2 root) finds the port in `fn_ports` and files the socket in the
//!    sockhash `fn_socks` under the function id.
//! 3. Every `send()` on a socket in `fn_socks` runs the `sk_msg` program. It reads
//!    the destination id from the descriptor's first 4 bytes and redirects the
//!    descriptor into the receive queue of the destination's socket
//!    (`bpf_msg_redirect_hash` with `BPF_F_INGRESS`), where the destination picks
//!    it up with a plain `read()`. Nothing crosses the TCP stack and nothing polls.
//! 4. A descriptor whose destination has no socket in `fn_socks` (or that is too
//!    short to carry an id) continues on the normal TCP path to the hub peer.
//!
//! Several descriptors written in one `send()` are judged one by one (the program
//! applies each verdict to 16 bytes). When one of them has an unknown destination,
//! it and the rest of that write go to the hub in one piece: the kernel cannot mix
//! "pass" and "redirect" inside one write without delaying the passed bytes. To
//! send to the hub the program redirects to the sender's own socket (egress), found
//! through its local port, so a port must stay registered while its socket is open.
//! Writers must write whole descriptors; a write shorter than 4 bytes goes to the
//! hub and counts as unknown.
//!
//! Per-CPU counters count messages and bytes per destination id (`fn_msgs`,
//! `fn_bytes`; slot [`UNKNOWN_INDEX`] counts descriptors that went to the hub);
//! read them with [`Dataplane::counters`].
//!
//! Programs are compiled from `bpf/dataplane.bpf.c` by `build.rs` (clang-19) and
//! embedded in this crate. Loading needs root (CAP_BPF and CAP_NET_ADMIN).

pub mod accounting;
pub mod loopback;
pub mod steering;

use std::error::Error as StdError;
use std::fs::{self, File};
use std::io;
use std::path::{Path, PathBuf};
use std::sync::Mutex;

use aya::maps::{HashMap as BpfHashMap, MapData, MapError, PerCpuArray, SockHash};
use aya::pin::PinError;
use aya::programs::{
    CgroupAttachMode, ProgramError, SkMsg, SockOps, sk_msg::SkMsgLinkId, sock_ops::SockOpsLinkId,
};
use aya::{Ebpf, EbpfLoader, include_bytes_aligned};

/// Function ids that can be registered: `0..MAX_FUNCTIONS`.
pub const MAX_FUNCTIONS: u32 = 256;
/// Counter slot for descriptors whose destination is unknown or that are too
/// short to carry a destination id.
pub const UNKNOWN_INDEX: u32 = 256;
/// Size of one descriptor; the kernel judges each 16-byte unit separately.
pub const DESCRIPTOR_LEN: usize = 16;
/// Cgroup v2 mount the `sock_ops` program attaches to by default (hybrid mode).
pub const DEFAULT_CGROUP_PATH: &str = "/sys/fs/cgroup/unified";
/// Where the BPF filesystem is mounted when pinning is requested.
pub const BPFFS_PATH: &str = "/sys/fs/bpf";

/// Names of the programs and maps in the embedded object: the interface between
/// `bpf/dataplane.bpf.c` and this loader.
pub mod names {
    /// `sock_ops` program filing established sockets into `fn_socks`.
    pub const PROG_SOCK_OPS: &str = "spright_sockops";
    /// `sk_msg` program redirecting descriptors, attached to `fn_socks`.
    pub const PROG_SK_MSG: &str = "spright_msg";
    /// HASH: local TCP port (u32, host order) → function id (u32).
    pub const MAP_FN_PORTS: &str = "fn_ports";
    /// SOCKHASH: function id (u32) → socket.
    pub const MAP_FN_SOCKS: &str = "fn_socks";
    /// PERCPU_ARRAY of u64: messages per destination id (+ unknown slot).
    pub const MAP_FN_MSGS: &str = "fn_msgs";
    /// PERCPU_ARRAY of u64: bytes per destination id (+ unknown slot).
    pub const MAP_FN_BYTES: &str = "fn_bytes";
    /// Every map, in pinning order.
    pub const MAPS: [&str; 4] = [MAP_FN_PORTS, MAP_FN_SOCKS, MAP_FN_MSGS, MAP_FN_BYTES];
}

/// Capacity of `fn_ports` and `fn_socks`.
pub const MAX_ENTRIES: u32 = 1024;

/// The compiled programs (see build.rs).
static OBJECT: &[u8] = include_bytes_aligned!(concat!(env!("OUT_DIR"), "/dataplane.bpf.o"));

const PERMISSION_HINT: &str = "loading eBPF programs needs CAP_BPF and CAP_NET_ADMIN (run as root)";

type BoxError = Box<dyn StdError + Send + Sync + 'static>;

/// Errors of the dataplane loader.
#[derive(Debug, thiserror::Error)]
pub enum EbpfError {
    /// The kernel refused for lack of privileges.
    #[error("{PERMISSION_HINT}: {operation}: {}", chain(source.as_ref()))]
    PermissionDenied {
        /// What was refused.
        operation: String,
        /// The kernel's answer.
        #[source]
        source: BoxError,
    },
    /// The cgroup v2 directory does not exist.
    #[error(
        "cgroup v2 path {} does not exist: mount cgroup2 there (hybrid mode: /sys/fs/cgroup/unified) or set another cgroup path",
        path.display()
    )]
    CgroupNotFound {
        /// The configured cgroup path.
        path: PathBuf,
    },
    /// The cgroup path is not on a cgroup v2 filesystem.
    #[error("{} is not a cgroup v2 directory (sock_ops programs attach to cgroup v2 only)", path.display())]
    NotCgroupV2 {
        /// The configured cgroup path.
        path: PathBuf,
    },
    /// The cgroup path could not be opened or inspected.
    #[error("cannot open cgroup v2 path {}: {source}", path.display())]
    Cgroup {
        /// The configured cgroup path.
        path: PathBuf,
        /// Cause.
        #[source]
        source: io::Error,
    },
    /// The embedded object could not be loaded.
    #[error("loading the embedded eBPF object failed: {}", chain(.0))]
    Object(#[source] aya::EbpfError),
    /// The embedded object lacks a program the loader expects.
    #[error("the embedded eBPF object has no {kind} program `{name}` (rebuild spright-ebpf)")]
    MissingProgram {
        /// Program name.
        name: &'static str,
        /// Expected program type.
        kind: &'static str,
    },
    /// The embedded object lacks a map the loader expects.
    #[error("the embedded eBPF object has no usable map `{name}`: {detail}")]
    MissingMap {
        /// Map name.
        name: &'static str,
        /// Why it is unusable.
        detail: String,
    },
    /// Loading, attaching or detaching a program failed.
    #[error("{action} eBPF program `{program}` failed: {}", chain(source))]
    Program {
        /// Program name.
        program: &'static str,
        /// What was attempted.
        action: &'static str,
        /// Cause (includes the verifier log when loading failed).
        #[source]
        source: ProgramError,
    },
    /// A map operation failed.
    #[error("{action} in eBPF map `{map}` failed: {}", chain(source))]
    Map {
        /// Map name.
        map: &'static str,
        /// What was attempted.
        action: String,
        /// Cause.
        #[source]
        source: MapError,
    },
    /// A function id outside `0..MAX_FUNCTIONS`.
    #[error("function id {0} is out of range: ids must be below {MAX_FUNCTIONS}")]
    FunctionIdOutOfRange(u32),
    /// The BPF filesystem is missing and could not be mounted.
    #[error("mounting the BPF filesystem at {} failed (needed to pin maps): {source}", path.display())]
    MountBpffs {
        /// Mount point.
        path: PathBuf,
        /// Cause.
        #[source]
        source: nix::Error,
    },
    /// The pin directory is not on a BPF filesystem.
    #[error("pin directory {} is not on a BPF filesystem (mount bpffs or pin under /sys/fs/bpf)", path.display())]
    NotBpffs {
        /// The configured pin directory.
        path: PathBuf,
    },
    /// Creating, inspecting or cleaning up the pin directory failed.
    #[error("{action} {} failed: {source}", path.display())]
    PinPath {
        /// What was attempted.
        action: &'static str,
        /// The path.
        path: PathBuf,
        /// Cause.
        #[source]
        source: io::Error,
    },
    /// Pinning a map failed.
    #[error("pinning eBPF map at {} failed: {}", path.display(), chain(source))]
    Pin {
        /// Pin path.
        path: PathBuf,
        /// Cause.
        #[source]
        source: PinError,
    },
    /// The user ports given to [`loopback::Loopback::attach`] are unusable.
    #[error("loopback redirect: {0}")]
    UserPorts(String),
    /// RLIMIT_MEMLOCK could not be raised (kernels before 5.11 charge BPF memory to it).
    #[error("raising RLIMIT_MEMLOCK for eBPF maps failed (run as root or raise `ulimit -l`): {0}")]
    Memlock(#[source] nix::Error),
}

impl EbpfError {
    /// Wraps `source` as a permission error when the kernel answered EPERM/EACCES,
    /// otherwise with `other`.
    fn classify<E>(operation: impl Into<String>, source: E, other: impl FnOnce(E) -> Self) -> Self
    where
        E: StdError + Send + Sync + 'static,
    {
        if is_permission_error(&source) {
            Self::PermissionDenied {
                operation: operation.into(),
                source: Box::new(source),
            }
        } else {
            other(source)
        }
    }

    /// True when the kernel refused for lack of privileges.
    pub fn is_permission_denied(&self) -> bool {
        matches!(self, Self::PermissionDenied { .. })
    }
}

/// Renders an error with its causes ("a: b: c"), skipping causes whose text the
/// outer message already contains (aya embeds some of them).
fn chain(error: &(dyn StdError + 'static)) -> String {
    let mut text = error.to_string();
    let mut current = error.source();
    while let Some(cause) = current {
        let cause_text = cause.to_string();
        if !text.contains(&cause_text) {
            text.push_str(": ");
            text.push_str(&cause_text);
        }
        current = cause.source();
    }
    text
}

/// Whether an `EPERM`/`EACCES` from the kernel is somewhere in the error chain.
fn is_permission_error(error: &(dyn StdError + 'static)) -> bool {
    let mut current = Some(error);
    while let Some(err) = current {
        if let Some(io_err) = err.downcast_ref::<io::Error>()
            && matches!(io_err.raw_os_error(), Some(libc::EPERM | libc::EACCES))
        {
            return true;
        }
        if let Some(nix_err) = err.downcast_ref::<nix::Error>()
            && matches!(nix_err, nix::Error::EPERM | nix::Error::EACCES)
        {
            return true;
        }
        current = err.source();
    }
    false
}

/// Whether the kernel answered `ENOENT` somewhere in the error chain.
fn is_not_found(error: &(dyn StdError + 'static)) -> bool {
    let mut current = Some(error);
    while let Some(err) = current {
        if let Some(MapError::KeyNotFound) = err.downcast_ref::<MapError>() {
            return true;
        }
        if let Some(io_err) = err.downcast_ref::<io::Error>()
            && io_err.raw_os_error() == Some(libc::ENOENT)
        {
            return true;
        }
        current = err.source();
    }
    false
}

/// Where and how to load the dataplane.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct DataplaneOptions {
    /// Cgroup v2 directory the `sock_ops` program attaches to; it sees the sockets
    /// of every process in this cgroup and its descendants.
    pub cgroup_path: PathBuf,
    /// Directory (on bpffs, e.g. `/sys/fs/bpf/<name>`) to pin the maps in, so
    /// tools such as bpftool can inspect them. bpffs is mounted at /sys/fs/bpf
    /// when needed. Stale pins with the same names are replaced.
    pub pin_dir: Option<PathBuf>,
}

impl Default for DataplaneOptions {
    fn default() -> Self {
        Self {
            cgroup_path: PathBuf::from(DEFAULT_CGROUP_PATH),
            pin_dir: None,
        }
    }
}

/// Message and byte counts for one destination, summed over CPUs.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct Counters {
    /// Descriptors (16-byte units) judged.
    pub messages: u64,
    /// Bytes judged.
    pub bytes: u64,
}

/// Kernel ids of the loaded programs (as listed by `bpftool prog`).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct ProgramIds {
    /// Id of the `sock_ops` program.
    pub sock_ops: u32,
    /// Id of the `sk_msg` program.
    pub sk_msg: u32,
}

/// The loaded and attached dataplane. Dropping it detaches the programs and
/// removes the pins, like [`Dataplane::detach`].
pub struct Dataplane {
    // Field order matters for Drop: programs (and their links) go before maps.
    ebpf: Ebpf,
    ports: BpfHashMap<MapData, u32, u32>,
    socks: SockHash<MapData, u32>,
    msgs: PerCpuArray<MapData, u64>,
    bytes: PerCpuArray<MapData, u64>,
    sock_ops_link: Option<SockOpsLinkId>,
    sk_msg_link: Option<SkMsgLinkId>,
    pins: Option<Pins>,
}

impl std::fmt::Debug for Dataplane {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Dataplane")
            .field("attached", &self.sock_ops_link.is_some())
            .field("pin_dir", &self.pins.as_ref().map(|p| &p.dir))
            .finish_non_exhaustive()
    }
}

/// Pinned map files and whether the directory was created by us.
#[derive(Debug)]
struct Pins {
    dir: PathBuf,
    created_dir: bool,
    files: Vec<PathBuf>,
}

impl Pins {
    /// Removes the pin files (and the directory if we created it).
    fn remove(self) -> Result<(), EbpfError> {
        let mut result = Ok(());
        for file in &self.files {
            if let Err(source) = fs::remove_file(file)
                && source.kind() != io::ErrorKind::NotFound
            {
                result = result.and(Err(EbpfError::PinPath {
                    action: "removing pinned map",
                    path: file.clone(),
                    source,
                }));
            }
        }
        if self.created_dir
            && let Err(source) = fs::remove_dir(&self.dir)
            && source.kind() != io::ErrorKind::NotFound
        {
            result = result.and(Err(EbpfError::PinPath {
                action: "removing pin directory",
                path: self.dir.clone(),
                source,
            }));
        }
        result
    }
}

impl Dataplane {
    /// Loads the programs, attaches `sock_ops` to the cgroup (allow-multiple mode,
    /// so several dataplanes can share a cgroup) and `sk_msg` to `fn_socks`, and
    /// pins the maps under `opts.pin_dir` if set.
    pub fn load(opts: &DataplaneOptions) -> Result<Self, EbpfError> {
        let cgroup = open_cgroup_v2(&opts.cgroup_path)?;
        raise_memlock_if_needed()?;

        let mut ebpf = Ebpf::load(OBJECT)
            .map_err(|e| EbpfError::classify("creating eBPF maps", e, EbpfError::Object))?;

        let mut pins = None;
        if let Some(dir) = &opts.pin_dir {
            pins = Some(pin_maps(&ebpf, dir)?);
        }
        // From here on, a failure must not leave pins behind.
        let guard = PinGuard(pins);

        let ports = BpfHashMap::try_from(take_map(&mut ebpf, names::MAP_FN_PORTS)?)
            .map_err(|e| map_type_error(names::MAP_FN_PORTS, e))?;
        let socks = SockHash::try_from(take_map(&mut ebpf, names::MAP_FN_SOCKS)?)
            .map_err(|e| map_type_error(names::MAP_FN_SOCKS, e))?;
        let msgs = PerCpuArray::try_from(take_map(&mut ebpf, names::MAP_FN_MSGS)?)
            .map_err(|e| map_type_error(names::MAP_FN_MSGS, e))?;
        let bytes = PerCpuArray::try_from(take_map(&mut ebpf, names::MAP_FN_BYTES)?)
            .map_err(|e| map_type_error(names::MAP_FN_BYTES, e))?;

        let sk_msg_link = {
            let prog = sk_msg_program(&mut ebpf)?;
            prog.load()
                .map_err(|e| program_error(names::PROG_SK_MSG, "loading", e))?;
            prog.attach(socks.fd())
                .map_err(|e| program_error(names::PROG_SK_MSG, "attaching to fn_socks", e))?
        };
        let sock_ops_link = {
            let prog = sock_ops_program(&mut ebpf)?;
            prog.load()
                .map_err(|e| program_error(names::PROG_SOCK_OPS, "loading", e))?;
            prog.attach(&cgroup, cgroup_attach_mode())
                .map_err(|e| program_error(names::PROG_SOCK_OPS, "attaching to the cgroup", e))?
        };

        tracing::debug!(
            cgroup = %opts.cgroup_path.display(),
            pin_dir = ?opts.pin_dir,
            "spright dataplane attached"
        );
        Ok(Self {
            ebpf,
            ports,
            socks,
            msgs,
            bytes,
            sock_ops_link: Some(sock_ops_link),
            sk_msg_link: Some(sk_msg_link),
            pins: guard.disarm(),
        })
    }

    /// Records that the socket bound to `local_port` belongs to `function_id`
    /// (below [`MAX_FUNCTIONS`]). Call before the socket connects: only
    /// connections established afterwards are filed into `fn_socks`. Keep the
    /// port registered while the socket is open (the hub path needs it).
    pub fn register_port(&mut self, local_port: u16, function_id: u32) -> Result<(), EbpfError> {
        check_function_id(function_id)?;
        self.ports
            .insert(u32::from(local_port), function_id, 0)
            .map_err(|e| {
                map_error(
                    names::MAP_FN_PORTS,
                    format!("registering port {local_port}"),
                    e,
                )
            })
    }

    /// Forgets `local_port` (call after its socket is closed). Succeeds if it
    /// was not registered.
    pub fn unregister_port(&mut self, local_port: u16) -> Result<(), EbpfError> {
        match self.ports.remove(&u32::from(local_port)) {
            Err(e) if !is_not_found(&e) => Err(map_error(
                names::MAP_FN_PORTS,
                format!("unregistering port {local_port}"),
                e,
            )),
            _ => Ok(()),
        }
    }

    /// Removes the socket of `function_id` from `fn_socks`, so descriptors to it
    /// go to the hub again. Succeeds if there is none. (Closing the socket also
    /// removes it.)
    pub fn remove_function(&mut self, function_id: u32) -> Result<(), EbpfError> {
        match self.socks.remove(&function_id) {
            Err(e) if !is_not_found(&e) => Err(map_error(
                names::MAP_FN_SOCKS,
                format!("removing function {function_id}"),
                e,
            )),
            _ => Ok(()),
        }
    }

    /// Whether `fn_socks` holds a socket for `function_id`.
    pub fn has_socket(&self, function_id: u32) -> Result<bool, EbpfError> {
        // Userspace lookups in a SOCKHASH with 4-byte values are refused by the
        // kernel, so walk the keys (at most MAX_ENTRIES).
        for key in self.socks.keys() {
            match key {
                Ok(key) if key == function_id => return Ok(true),
                Ok(_) => {}
                Err(e) => {
                    return Err(map_error(
                        names::MAP_FN_SOCKS,
                        format!("looking up function {function_id}"),
                        e,
                    ));
                }
            }
        }
        Ok(false)
    }

    /// Descriptors redirected to `function_id`, summed over CPUs.
    pub fn counters(&self, function_id: u32) -> Result<Counters, EbpfError> {
        check_function_id(function_id)?;
        self.read_counters(function_id)
    }

    /// Descriptors that went to the hub (unknown destination or too short).
    pub fn unknown_counters(&self) -> Result<Counters, EbpfError> {
        self.read_counters(UNKNOWN_INDEX)
    }

    /// Kernel ids of the loaded programs.
    pub fn program_ids(&self) -> Result<ProgramIds, EbpfError> {
        Ok(ProgramIds {
            sock_ops: self.program_id(names::PROG_SOCK_OPS, "sock_ops")?,
            sk_msg: self.program_id(names::PROG_SK_MSG, "sk_msg")?,
        })
    }

    fn program_id(&self, name: &'static str, kind: &'static str) -> Result<u32, EbpfError> {
        let program = self
            .ebpf
            .program(name)
            .ok_or(EbpfError::MissingProgram { name, kind })?;
        let info = program
            .info()
            .map_err(|e| program_error(name, "inspecting", e))?;
        Ok(info.id())
    }

    /// Detaches both programs and removes the pinned maps. The kernel frees the
    /// programs and maps once this value is gone; sockets fall back to plain TCP.
    pub fn detach(mut self) -> Result<(), EbpfError> {
        self.teardown()
    }

    fn read_counters(&self, index: u32) -> Result<Counters, EbpfError> {
        let read = |map: &PerCpuArray<MapData, u64>, name: &'static str| {
            map.get(&index, 0)
                .map(|values| values.iter().copied().fold(0u64, u64::wrapping_add))
                .map_err(|e| map_error(name, format!("reading counter {index}"), e))
        };
        Ok(Counters {
            messages: read(&self.msgs, names::MAP_FN_MSGS)?,
            bytes: read(&self.bytes, names::MAP_FN_BYTES)?,
        })
    }

    /// Detaches what is still attached and removes pins; idempotent.
    fn teardown(&mut self) -> Result<(), EbpfError> {
        let mut result = Ok(());
        if let Some(link) = self.sock_ops_link.take() {
            result = result.and(sock_ops_program(&mut self.ebpf).and_then(|prog| {
                prog.detach(link)
                    .map_err(|e| program_error(names::PROG_SOCK_OPS, "detaching", e))
            }));
        }
        if let Some(link) = self.sk_msg_link.take() {
            result = result.and(sk_msg_program(&mut self.ebpf).and_then(|prog| {
                prog.detach(link)
                    .map_err(|e| program_error(names::PROG_SK_MSG, "detaching", e))
            }));
        }
        if let Some(pins) = self.pins.take() {
            result = result.and(pins.remove());
        }
        result
    }
}

impl Drop for Dataplane {
    fn drop(&mut self) {
        if let Err(error) = self.teardown() {
            tracing::warn!(%error, "detaching the spright dataplane failed");
        }
    }
}

/// Checks cheaply whether the dataplane can be loaded and attached here: loads,
/// attaches and detaches it once (no pinning).
pub fn check_support(opts: &DataplaneOptions) -> Result<(), EbpfError> {
    let probe = DataplaneOptions {
        cgroup_path: opts.cgroup_path.clone(),
        pin_dir: None,
    };
    Dataplane::load(&probe)?.detach()
}

/// Removes pins if `load` fails half-way.
struct PinGuard(Option<Pins>);

impl PinGuard {
    fn disarm(mut self) -> Option<Pins> {
        self.0.take()
    }
}

impl Drop for PinGuard {
    fn drop(&mut self) {
        if let Some(pins) = self.0.take()
            && let Err(error) = pins.remove()
        {
            tracing::warn!(%error, "cleaning up pinned maps failed");
        }
    }
}

fn check_function_id(function_id: u32) -> Result<(), EbpfError> {
    if function_id < MAX_FUNCTIONS {
        Ok(())
    } else {
        Err(EbpfError::FunctionIdOutOfRange(function_id))
    }
}

fn map_error(map: &'static str, action: String, source: MapError) -> EbpfError {
    EbpfError::classify(action.clone(), source, |source| EbpfError::Map {
        map,
        action,
        source,
    })
}

fn map_type_error(name: &'static str, source: MapError) -> EbpfError {
    EbpfError::MissingMap {
        name,
        detail: source.to_string(),
    }
}

fn program_error(program: &'static str, action: &'static str, source: ProgramError) -> EbpfError {
    EbpfError::classify(format!("{action} `{program}`"), source, |source| {
        EbpfError::Program {
            program,
            action,
            source,
        }
    })
}

/// Loads an object that has no CO-RE relocations (accounting, steering,
/// loopback). `Ebpf::load` would parse the kernel's BTF
/// (/sys/kernel/btf/vmlinux) a second time on top of the parse in
/// `EbpfLoader::new()`: about 17 MB more peak memory in the process that
/// loads them.
///
/// `EbpfLoader::new()` itself still reads and parses that file (5.5 MB,
/// about 20 MB parsed) before `.btf(None)` drops it: a sidecar that loads its
/// own programs peaked at 25-29 MB for ~5 MB resident. So the loader runs in
/// a thread of its own that first moves to a private mount namespace where
/// /sys/kernel/btf is hidden under an empty tmpfs ([`hide_kernel_btf`]): the
/// parse finds no file. Without CAP_SYS_ADMIN (or where the mount is refused)
/// the thread loads all the same, with the higher peak. Nothing outside that
/// thread sees its namespace, which ends with it.
fn load_without_btf(object: &[u8]) -> Result<Ebpf, EbpfError> {
    raise_memlock_if_needed()?;
    let loaded = std::thread::scope(|scope| {
        scope
            .spawn(|| {
                // Best effort: failure only costs peak memory.
                let _ = hide_kernel_btf();
                EbpfLoader::new().btf(None).load(object)
            })
            .join()
    })
    .unwrap_or_else(|panic| std::panic::resume_unwind(panic));
    loaded.map_err(|e| EbpfError::classify("creating eBPF maps", e, EbpfError::Object))
}

/// Gives the calling thread a private mount namespace in which
/// /sys/kernel/btf is an empty read-only tmpfs. The mounts are made private
/// first, so the tmpfs cannot propagate to the namespace the process lives in.
fn hide_kernel_btf() -> nix::Result<()> {
    use nix::mount::{MsFlags, mount};
    use nix::sched::{CloneFlags, unshare};

    // A thread may unshare its mount namespace (CLONE_FS comes with it);
    // the rest of the process keeps its own.
    unshare(CloneFlags::CLONE_NEWNS)?;
    mount(
        None::<&str>,
        "/",
        None::<&str>,
        MsFlags::MS_REC | MsFlags::MS_PRIVATE,
        None::<&str>,
    )?;
    mount(
        Some("none"),
        "/sys/kernel/btf",
        Some("tmpfs"),
        MsFlags::MS_RDONLY | MsFlags::MS_NOSUID | MsFlags::MS_NODEV | MsFlags::MS_NOEXEC,
        Some("size=4k"),
    )
}

/// Kernel ids of the programs `names` in `ebpf` and of the maps they use
/// (sorted, each once), as `bpftool` lists them. `kind` names the object in
/// the error when a program is missing.
fn kernel_ids(
    ebpf: &Ebpf,
    names: &[&'static str],
    kind: &'static str,
) -> Result<(Vec<u32>, Vec<u32>), EbpfError> {
    let mut programs = Vec::new();
    let mut maps = Vec::new();
    for &name in names {
        let program = ebpf
            .program(name)
            .ok_or(EbpfError::MissingProgram { name, kind })?;
        let info = program
            .info()
            .map_err(|e| program_error(name, "inspecting", e))?;
        programs.push(info.id());
        for map in info
            .map_ids()
            .map_err(|e| program_error(name, "inspecting", e))?
            .unwrap_or_default()
        {
            if !maps.contains(&map) {
                maps.push(map);
            }
        }
    }
    maps.sort_unstable();
    Ok((programs, maps))
}

fn take_map(ebpf: &mut Ebpf, name: &'static str) -> Result<aya::maps::Map, EbpfError> {
    ebpf.take_map(name).ok_or(EbpfError::MissingMap {
        name,
        detail: "not in the object".to_owned(),
    })
}

fn sock_ops_program(ebpf: &mut Ebpf) -> Result<&mut SockOps, EbpfError> {
    ebpf.program_mut(names::PROG_SOCK_OPS)
        .and_then(|p| <&mut SockOps>::try_from(p).ok())
        .ok_or(EbpfError::MissingProgram {
            name: names::PROG_SOCK_OPS,
            kind: "sock_ops",
        })
}

fn sk_msg_program(ebpf: &mut Ebpf) -> Result<&mut SkMsg, EbpfError> {
    ebpf.program_mut(names::PROG_SK_MSG)
        .and_then(|p| <&mut SkMsg>::try_from(p).ok())
        .ok_or(EbpfError::MissingProgram {
            name: names::PROG_SK_MSG,
            kind: "sk_msg",
        })
}

/// Attach mode that lets several dataplanes share one cgroup.
///
/// aya attaches through a BPF link on kernels >= 5.7. Cgroup links always
/// coexist (the kernel implies BPF_F_ALLOW_MULTI) and the kernel rejects the
/// explicit flag there with EINVAL, so ask for allow-multiple only on older
/// kernels, where aya falls back to BPF_PROG_ATTACH.
fn cgroup_attach_mode() -> CgroupAttachMode {
    use aya::util::KernelVersion;
    match KernelVersion::current() {
        Ok(version) if version >= KernelVersion::new(5, 7, 0) => CgroupAttachMode::Single,
        _ => CgroupAttachMode::AllowMultiple,
    }
}

/// Opens `path` after checking that it is a cgroup v2 directory.
fn open_cgroup_v2(path: &Path) -> Result<File, EbpfError> {
    match nix::sys::statfs::statfs(path) {
        Ok(stat) => {
            if stat.filesystem_type() != nix::sys::statfs::CGROUP2_SUPER_MAGIC {
                return Err(EbpfError::NotCgroupV2 {
                    path: path.to_owned(),
                });
            }
        }
        Err(nix::Error::ENOENT | nix::Error::ENOTDIR) => {
            return Err(EbpfError::CgroupNotFound {
                path: path.to_owned(),
            });
        }
        Err(errno) => {
            return Err(EbpfError::Cgroup {
                path: path.to_owned(),
                source: errno.into(),
            });
        }
    }
    File::open(path).map_err(|source| EbpfError::Cgroup {
        path: path.to_owned(),
        source,
    })
}

/// Kernels before 5.11 charge BPF maps to RLIMIT_MEMLOCK; lift it there.
fn raise_memlock_if_needed() -> Result<(), EbpfError> {
    use nix::sys::resource::{RLIM_INFINITY, Resource, getrlimit, setrlimit};

    let needs_memlock = aya::util::KernelVersion::current()
        .map(|v| v < aya::util::KernelVersion::new(5, 11, 0))
        .unwrap_or(true);
    if !needs_memlock {
        return Ok(());
    }
    let (soft, _) = getrlimit(Resource::RLIMIT_MEMLOCK).map_err(EbpfError::Memlock)?;
    if soft == RLIM_INFINITY {
        return Ok(());
    }
    setrlimit(Resource::RLIMIT_MEMLOCK, RLIM_INFINITY, RLIM_INFINITY).map_err(EbpfError::Memlock)
}

/// Serializes the "is bpffs mounted? mount it" step within this process, so
/// parallel loads do not stack two mounts on /sys/fs/bpf.
static BPFFS_MOUNT: Mutex<()> = Mutex::new(());

fn is_bpffs(path: &Path) -> bool {
    nix::sys::statfs::statfs(path)
        .map(|s| s.filesystem_type() == nix::sys::statfs::BPF_FS_MAGIC)
        .unwrap_or(false)
}

/// Makes sure `dir` exists on bpffs, mounting bpffs at /sys/fs/bpf if `dir`
/// lies below it and nothing is mounted there yet. Returns whether `dir` was
/// created.
fn prepare_pin_dir(dir: &Path) -> Result<bool, EbpfError> {
    let bpffs = Path::new(BPFFS_PATH);
    if dir.starts_with(bpffs) {
        let _lock = BPFFS_MOUNT.lock().unwrap_or_else(|e| e.into_inner());
        if !is_bpffs(bpffs) {
            fs::create_dir_all(bpffs).map_err(|source| EbpfError::PinPath {
                action: "creating",
                path: bpffs.to_owned(),
                source,
            })?;
            nix::mount::mount(
                Some("bpf"),
                bpffs,
                Some("bpf"),
                nix::mount::MsFlags::empty(),
                None::<&str>,
            )
            .map_err(|source| {
                EbpfError::classify(
                    format!("mounting bpffs at {BPFFS_PATH}"),
                    source,
                    |source| EbpfError::MountBpffs {
                        path: bpffs.to_owned(),
                        source,
                    },
                )
            })?;
            tracing::info!(path = BPFFS_PATH, "mounted the BPF filesystem");
        }
    }
    let created = !dir.exists();
    fs::create_dir_all(dir).map_err(|source| EbpfError::PinPath {
        action: "creating pin directory",
        path: dir.to_owned(),
        source,
    })?;
    if !is_bpffs(dir) {
        if created {
            let _ = fs::remove_dir(dir);
        }
        return Err(EbpfError::NotBpffs {
            path: dir.to_owned(),
        });
    }
    Ok(created)
}

/// Pins every map under `dir` (replacing stale pins of the same name).
fn pin_maps(ebpf: &Ebpf, dir: &Path) -> Result<Pins, EbpfError> {
    let created_dir = prepare_pin_dir(dir)?;
    let mut pins = Pins {
        dir: dir.to_owned(),
        created_dir,
        files: Vec::new(),
    };
    for name in names::MAPS {
        match pin_map(ebpf, dir, name) {
            Ok(path) => pins.files.push(path),
            Err(error) => {
                if let Err(cleanup) = pins.remove() {
                    tracing::warn!(error = %cleanup, "cleaning up pinned maps failed");
                }
                return Err(error);
            }
        }
    }
    Ok(pins)
}

fn pin_map(ebpf: &Ebpf, dir: &Path, name: &'static str) -> Result<PathBuf, EbpfError> {
    let map = ebpf.map(name).ok_or(EbpfError::MissingMap {
        name,
        detail: "not in the object".to_owned(),
    })?;
    let path = dir.join(name);
    match fs::remove_file(&path) {
        Ok(()) => tracing::info!(path = %path.display(), "replaced a stale pinned map"),
        Err(e) if e.kind() == io::ErrorKind::NotFound => {}
        Err(source) => {
            return Err(EbpfError::PinPath {
                action: "removing stale pin",
                path,
                source,
            });
        }
    }
    map.pin(&path).map_err(|source| EbpfError::Pin {
        path: path.clone(),
        source,
    })?;
    Ok(path)
}

#[cfg(test)]
mod tests {
    use super::*;
    use aya_obj::ProgramSection;
    use aya_obj::generated::bpf_map_type;

    fn object() -> aya_obj::Object {
        aya_obj::Object::parse(OBJECT).expect("embedded object parses")
    }

    #[test]
    fn object_exports_the_programs_the_loader_expects() {
        let obj = object();
        let section = |name: &str| {
            obj.programs
                .get(name)
                .unwrap_or_else(|| panic!("program {name} missing"))
                .section
                .clone()
        };
        assert!(matches!(
            section(names::PROG_SOCK_OPS),
            ProgramSection::SockOps
        ));
        assert!(matches!(section(names::PROG_SK_MSG), ProgramSection::SkMsg));
        assert_eq!(obj.programs.len(), 2);
        assert_eq!(obj.license.to_str(), Ok("GPL"));
    }

    #[test]
    fn object_exports_the_maps_the_loader_expects() {
        let obj = object();
        let expect = |name: &str, map_type: bpf_map_type, value_size: u32, max_entries: u32| {
            let map = obj
                .maps
                .get(name)
                .unwrap_or_else(|| panic!("map {name} missing"));
            assert_eq!(map.map_type(), map_type as u32, "{name} type");
            assert_eq!(map.key_size(), 4, "{name} key size");
            assert_eq!(map.value_size(), value_size, "{name} value size");
            assert_eq!(map.max_entries(), max_entries, "{name} max entries");
        };
        expect(
            names::MAP_FN_PORTS,
            bpf_map_type::BPF_MAP_TYPE_HASH,
            4,
            MAX_ENTRIES,
        );
        expect(
            names::MAP_FN_SOCKS,
            bpf_map_type::BPF_MAP_TYPE_SOCKHASH,
            4,
            MAX_ENTRIES,
        );
        for counters in [names::MAP_FN_MSGS, names::MAP_FN_BYTES] {
            expect(
                counters,
                bpf_map_type::BPF_MAP_TYPE_PERCPU_ARRAY,
                8,
                UNKNOWN_INDEX + 1,
            );
        }
        assert_eq!(obj.maps.len(), names::MAPS.len());
    }

    #[test]
    fn dataplane_is_send() {
        fn assert_send<T: Send>() {}
        assert_send::<Dataplane>();
        assert_send::<EbpfError>();
    }

    #[test]
    fn function_ids_above_255_are_rejected() {
        assert!(check_function_id(MAX_FUNCTIONS - 1).is_ok());
        assert!(matches!(
            check_function_id(MAX_FUNCTIONS),
            Err(EbpfError::FunctionIdOutOfRange(256))
        ));
    }

    #[test]
    fn eperm_becomes_a_permission_error_naming_the_capabilities() {
        let err = EbpfError::classify(
            "creating eBPF maps",
            io::Error::from_raw_os_error(libc::EPERM),
            |e| EbpfError::Cgroup {
                path: PathBuf::new(),
                source: e,
            },
        );
        assert!(err.is_permission_denied());
        assert!(err.to_string().starts_with(PERMISSION_HINT), "{err}");

        let nested = MapError::CreateError {
            name: "fn_ports".to_owned(),
            io_error: io::Error::from_raw_os_error(libc::EPERM),
        };
        assert!(is_permission_error(&nested));
        let other = io::Error::from_raw_os_error(libc::EINVAL);
        assert!(!is_permission_error(&other));
    }

    #[test]
    fn missing_cgroup_path_is_named() {
        let path = PathBuf::from("/nonexistent/spright-cgroup");
        let err = open_cgroup_v2(&path).unwrap_err();
        assert!(matches!(err, EbpfError::CgroupNotFound { .. }), "{err}");
        assert!(err.to_string().contains("/nonexistent/spright-cgroup"));
    }

    #[test]
    fn non_cgroup2_path_is_rejected() {
        let err = open_cgroup_v2(Path::new("/proc")).unwrap_err();
        assert!(matches!(err, EbpfError::NotCgroupV2 { .. }), "{err}");
        assert!(err.to_string().contains("/proc"));
    }

    /// Real kernel (root): the loader thread's mount namespace hides the
    /// kernel BTF from that thread only, and nothing leaks to the process.
    #[test]
    fn hiding_the_kernel_btf_stays_in_its_thread() {
        let vmlinux = Path::new("/sys/kernel/btf/vmlinux");
        assert!(vmlinux.exists(), "this kernel has no BTF");
        let seen = std::thread::spawn(move || {
            hide_kernel_btf().expect("unshare + mount (needs root: CAP_SYS_ADMIN)");
            vmlinux.exists()
        })
        .join()
        .expect("thread");
        assert!(!seen, "hidden in the thread");
        assert!(vmlinux.exists(), "still visible to the process");
        let mounts = std::fs::read_to_string("/proc/self/mountinfo").expect("mountinfo");
        assert!(!mounts.contains(" /sys/kernel/btf "), "{mounts}");
    }

    #[test]
    fn default_options_use_the_unified_hierarchy() {
        let opts = DataplaneOptions::default();
        assert_eq!(opts.cgroup_path, Path::new(DEFAULT_CGROUP_PATH));
        assert_eq!(opts.pin_dir, None);
    }
}
