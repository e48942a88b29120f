//! In-kernel request accounting for one pod's serving port.
//!
//! # Mechanism
//!
//! One copy of `bpf/accounting.bpf.c` is loaded per pod and attached to the
//! pod's cgroup v2 directory: two `cgroup_skb` programs (ingress and egress)
//! and one `sock_ops` program. Attaching to the cgroup scopes them to the
//! sockets the pod's processes create, whatever network namespace they live
//! in, and gives every pod its own maps, so detaching and dropping a
//! [`PodAccounting`] leaves nothing behind.
//!
//! Why `cgroup_skb` and not `sk_msg`: `sk_msg` only sees what a socket
//! *sends*; a request arriving on the serving port is *received*, and the
//! receive-side alternative (`sk_skb` stream verdicts) reroutes the socket's
//! whole receive path. `cgroup_skb` observes both directions without changing
//! delivery (the programs always return "allow"), costs nothing when no
//! packet flows, and works on every kernel with cgroup v2 (bpf_loop needs
//! 5.17).
//!
//! Each serving connection (local port = the configured serving port) carries
//! a state machine in socket-local storage (freed with the socket):
//! an **arrival** is the first in-order payload on an idle connection that
//! starts with an HTTP method token (`GET `, `POST `, ...); the request ends
//! (**completion**) when the response's last byte is sent: the response headers
//! are parsed in the kernel for the status code, `Content-Length` and
//! `Transfer-Encoding`, then body bytes are counted down (`Content-Length`), or
//! the last chunk `\r\n0\r\n\r\n` is seen (chunked), or the connection closes
//! (no length; `101 Switching Protocols` keeps the request in flight until the
//! connection closes, as Knative does for websockets). `HEAD`, 204 and 304
//! responses end at their headers; 1xx interim answers are skipped. A request
//! whose connection closes or resets before the response ends completes at the
//! close (the `sock_ops` state callback). Keep-alive connections therefore
//! carry many requests; TCP sequence numbers filter retransmissions out.
//!
//! At each arrival and completion the pod-wide record (`acct_stats`, under a
//! BPF spin lock) integrates concurrency over time exactly as Knative's
//! request stats do (`weighted += concurrency × (now − last_change)`), in
//! nanoseconds of `CLOCK_MONOTONIC`, and counts arrivals and completions. The
//! same is kept for **proxied** requests: the request headers are scanned (up
//! to 4 KiB per segment) for the line `K-Proxy-Request: activator` (name
//! case-insensitive, one space, value as the activator writes it); a proxied
//! arrival is counted when that line is seen, normally in the same segment as
//! the request line. Requests carrying `User-Agent: kube-probe/...` (the
//! sidecar's HTTP readiness probes of the user container, which Knative does
//! not count) are taken back as soon as that header is seen: neither arrival
//! nor completion nor concurrency keeps a trace beyond those microseconds,
//! and a proxied arrival already counted from an earlier segment is taken
//! back with it. Every end of a request (response end, close or reset, a new
//! request on the connection) releases exactly what its arrival took.
//!
//! # What is approximated
//!
//! - Pipelined requests (several requests sent before the first answer) count
//!   as one arrival; a new request seen while a response is still being
//!   tracked ends the tracked one at that moment.
//! - A request body still arriving after its response completed, if it starts
//!   with an upper-case word and a space (or is a segment of fewer than 8
//!   upper-case letters: a method split across segments is counted at its
//!   first segment), would count as a request. A `HEAD` split inside its first
//!   four bytes is taken for a request with a response body, so it ends with
//!   the next request on the connection or with the connection.
//! - HTTP/2 (h2c, prior knowledge `PRI * HTTP/2.0`) connections are marked
//!   and not counted; upgrades from HTTP/1.1 to h2c are counted as one request
//!   lasting the connection.
//! - Response headers longer than 4 KiB in one segment, a chunked body with
//!   trailers, or a `Content-Length` the server does not honour end the
//!   request at the connection's close instead.
//! - Time is taken when the kernel hands the last byte to IP (egress) or
//!   receives the first one, a few microseconds from when a userspace proxy
//!   would see them.
//!
//! Loading needs root (CAP_BPF, CAP_NET_ADMIN).

use std::fs::File;
use std::path::{Path, PathBuf};

use aya::maps::{Array, MapData};
use aya::programs::{
    CgroupSkb, CgroupSkbAttachType, SockOps, cgroup_skb::CgroupSkbLinkId, sock_ops::SockOpsLinkId,
};
use aya::{Ebpf, include_bytes_aligned};

use crate::{
    EbpfError, cgroup_attach_mode, kernel_ids, load_without_btf, map_error, map_type_error,
    open_cgroup_v2, program_error, take_map,
};

/// Names of the programs and maps in the embedded accounting object.
pub mod names {
    /// `cgroup_skb/ingress`: request bytes.
    pub const PROG_INGRESS: &str = "acct_ingress";
    /// `cgroup_skb/egress`: response bytes.
    pub const PROG_EGRESS: &str = "acct_egress";
    /// `sockops`: closes of serving connections.
    pub const PROG_SOCK_OPS: &str = "acct_sockops";
    /// ARRAY[1] of the pod-wide counters (with a BPF spin lock).
    pub const MAP_STATS: &str = "acct_stats";
    /// ARRAY[1]: the serving port.
    pub const MAP_CONFIG: &str = "acct_config";
    /// SK_STORAGE: per-connection state.
    pub const MAP_CONNS: &str = "acct_conns";
    /// PERCPU_ARRAY[1]: header scanner scratch space.
    pub const MAP_SCRATCH: &str = "acct_scratch";
    /// Every program.
    pub const PROGRAMS: [&str; 3] = [PROG_INGRESS, PROG_EGRESS, PROG_SOCK_OPS];
    /// Every map.
    pub const MAPS: [&str; 4] = [MAP_STATS, MAP_CONFIG, MAP_CONNS, MAP_SCRATCH];
}

/// The compiled programs (see build.rs).
static OBJECT: &[u8] = include_bytes_aligned!(concat!(env!("OUT_DIR"), "/accounting.bpf.o"));

/// `BPF_F_LOCK`: read the value under its spin lock.
const BPF_F_LOCK: u64 = 4;

/// Layout of `struct pod_stats` in the C program.
#[repr(C)]
#[derive(Debug, Clone, Copy, Default)]
struct RawStats {
    lock: u32,
    concurrency: u32,
    proxied_concurrency: u32,
    pad: u32,
    last_change_ns: u64,
    weighted_ns: u64,
    weighted_proxied_ns: u64,
    arrivals: u64,
    proxied_arrivals: u64,
    completions: u64,
    proxied_completions: u64,
}

// SAFETY: plain integers, repr(C), no padding the kernel does not also write.
unsafe impl aya::Pod for RawStats {}

/// Layout of `struct acct_cfg` in the C program.
#[repr(C)]
#[derive(Debug, Clone, Copy, Default)]
struct RawConfig {
    port: u32,
    pad: u32,
}

// SAFETY: plain integers, repr(C).
unsafe impl aya::Pod for RawConfig {}

/// A consistent snapshot of a pod's counters, extended to `now_ns`.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct PodCounters {
    /// `CLOCK_MONOTONIC` time of the snapshot, ns.
    pub now_ns: u64,
    /// Requests in flight.
    pub concurrency: u32,
    /// Proxied requests in flight.
    pub proxied_concurrency: u32,
    /// Requests seen since the programs were attached.
    pub arrivals: u64,
    /// Proxied requests seen.
    pub proxied_arrivals: u64,
    /// Requests completed.
    pub completions: u64,
    /// Proxied requests completed.
    pub proxied_completions: u64,
    /// ∫ concurrency dt from attach to `now_ns`, in request·ns.
    pub weighted_ns: u64,
    /// ∫ proxied concurrency dt, in request·ns.
    pub weighted_proxied_ns: u64,
}

impl PodCounters {
    /// Extends the kernel's integral (kept up to its last transition) to `now_ns`.
    fn from_raw(raw: &RawStats, now_ns: u64) -> Self {
        let since = now_ns.saturating_sub(raw.last_change_ns);
        Self {
            now_ns,
            concurrency: raw.concurrency,
            proxied_concurrency: raw.proxied_concurrency,
            arrivals: raw.arrivals,
            proxied_arrivals: raw.proxied_arrivals,
            completions: raw.completions,
            proxied_completions: raw.proxied_completions,
            weighted_ns: raw
                .weighted_ns
                .saturating_add(u64::from(raw.concurrency).saturating_mul(since)),
            weighted_proxied_ns: raw
                .weighted_proxied_ns
                .saturating_add(u64::from(raw.proxied_concurrency).saturating_mul(since)),
        }
    }

    /// Average concurrency between an earlier snapshot and this one.
    pub fn average_concurrency_since(&self, earlier: &Self) -> f64 {
        ratio(
            self.weighted_ns.saturating_sub(earlier.weighted_ns),
            self.now_ns.saturating_sub(earlier.now_ns),
        )
    }

    /// Average proxied concurrency between an earlier snapshot and this one.
    pub fn average_proxied_concurrency_since(&self, earlier: &Self) -> f64 {
        ratio(
            self.weighted_proxied_ns
                .saturating_sub(earlier.weighted_proxied_ns),
            self.now_ns.saturating_sub(earlier.now_ns),
        )
    }
}

fn ratio(weighted_ns: u64, elapsed_ns: u64) -> f64 {
    if elapsed_ns == 0 {
        0.0
    } else {
        weighted_ns as f64 / elapsed_ns as f64
    }
}

/// `CLOCK_MONOTONIC` in ns: the clock of `bpf_ktime_get_ns`.
pub fn monotonic_ns() -> u64 {
    let mut ts = libc::timespec {
        tv_sec: 0,
        tv_nsec: 0,
    };
    // SAFETY: `ts` is a valid, writable timespec; CLOCK_MONOTONIC always exists.
    let rc = unsafe { libc::clock_gettime(libc::CLOCK_MONOTONIC, &mut ts) };
    if rc != 0 {
        return 0;
    }
    u64::try_from(ts.tv_sec)
        .unwrap_or(0)
        .saturating_mul(1_000_000_000)
        .saturating_add(u64::try_from(ts.tv_nsec).unwrap_or(0))
}

/// Kernel ids of one pod's programs and maps (as `bpftool` lists them).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct AccountingIds {
    /// Program ids: ingress, egress, sock_ops.
    pub programs: Vec<u32>,
    /// Map ids used by the programs.
    pub maps: Vec<u32>,
}

/// One pod's accounting programs, attached to its cgroup. Dropping it
/// detaches them; the kernel then frees programs and maps.
pub struct PodAccounting {
    // Field order matters for Drop: programs (and links) go before maps.
    ebpf: Ebpf,
    stats: Array<MapData, RawStats>,
    links: Option<Links>,
    cgroup_path: PathBuf,
    port: u16,
}

struct Links {
    ingress: CgroupSkbLinkId,
    egress: CgroupSkbLinkId,
    sock_ops: SockOpsLinkId,
}

impl std::fmt::Debug for PodAccounting {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("PodAccounting")
            .field("cgroup_path", &self.cgroup_path)
            .field("port", &self.port)
            .field("attached", &self.links.is_some())
            .finish_non_exhaustive()
    }
}

impl PodAccounting {
    /// Loads a fresh copy of the programs, sets the serving port and attaches
    /// them to `cgroup_path` (a cgroup v2 directory). Connections accepted
    /// before this call are not counted.
    pub fn attach(cgroup_path: &Path, port: u16) -> Result<Self, EbpfError> {
        let cgroup = open_cgroup_v2(cgroup_path)?;
        let mut ebpf = load_with_port(OBJECT, names::MAP_CONFIG, port)?;
        let stats = Array::try_from(take_map(&mut ebpf, names::MAP_STATS)?)
            .map_err(|e| map_type_error(names::MAP_STATS, e))?;

        let links = attach_programs(&mut ebpf, &cgroup)?;
        tracing::debug!(cgroup = %cgroup_path.display(), port, "request accounting attached");
        Ok(Self {
            ebpf,
            stats,
            links: Some(links),
            cgroup_path: cgroup_path.to_owned(),
            port,
        })
    }

    /// The serving port being counted.
    pub fn port(&self) -> u16 {
        self.port
    }

    /// The cgroup the programs are attached to.
    pub fn cgroup_path(&self) -> &Path {
        &self.cgroup_path
    }

    /// Reads the counters under the kernel's lock and extends the integrals to now.
    pub fn counters(&self) -> Result<PodCounters, EbpfError> {
        let raw = self
            .stats
            .get(&0, BPF_F_LOCK)
            .map_err(|e| map_error(names::MAP_STATS, "reading the pod counters".into(), e))?;
        Ok(PodCounters::from_raw(&raw, monotonic_ns()))
    }

    /// Kernel ids of the programs and of the maps they use.
    pub fn ids(&self) -> Result<AccountingIds, EbpfError> {
        let (programs, maps) = kernel_ids(&self.ebpf, &names::PROGRAMS, "accounting")?;
        Ok(AccountingIds { programs, maps })
    }

    /// Detaches the programs; the kernel frees them and the maps once this
    /// value is gone.
    pub fn detach(mut self) -> Result<(), EbpfError> {
        self.teardown()
    }

    fn teardown(&mut self) -> Result<(), EbpfError> {
        let Some(links) = self.links.take() else {
            return Ok(());
        };
        let mut result = Ok(());
        result = result.and(
            cgroup_skb(&mut self.ebpf, names::PROG_INGRESS).and_then(|p| {
                p.detach(links.ingress)
                    .map_err(|e| program_error(names::PROG_INGRESS, "detaching", e))
            }),
        );
        result = result.and(
            cgroup_skb(&mut self.ebpf, names::PROG_EGRESS).and_then(|p| {
                p.detach(links.egress)
                    .map_err(|e| program_error(names::PROG_EGRESS, "detaching", e))
            }),
        );
        result = result.and(sock_ops(&mut self.ebpf).and_then(|p| {
            p.detach(links.sock_ops)
                .map_err(|e| program_error(names::PROG_SOCK_OPS, "detaching", e))
        }));
        result
    }
}

impl Drop for PodAccounting {
    fn drop(&mut self) {
        if let Err(error) = self.teardown() {
            tracing::warn!(%error, "detaching request accounting failed");
        }
    }
}

/// Loads `object` and writes `port` into its one-entry config array
/// (`struct { __u32 port; __u32 pad; }`): the accounting and steering objects.
pub(crate) fn load_with_port(
    object: &[u8],
    config_map: &'static str,
    port: u16,
) -> Result<Ebpf, EbpfError> {
    load_with_config(object, config_map, port, 0)
}

/// [`load_with_port`] with the config's second word set to `extra` (the
/// steering object's user port).
pub(crate) fn load_with_config(
    object: &[u8],
    config_map: &'static str,
    port: u16,
    extra: u32,
) -> Result<Ebpf, EbpfError> {
    let mut ebpf = load_without_btf(object)?;
    // Borrowed, not taken: the map must live until the programs are loaded.
    let map = ebpf.map_mut(config_map).ok_or(EbpfError::MissingMap {
        name: config_map,
        detail: "not in the object".to_owned(),
    })?;
    let mut config: Array<&mut MapData, RawConfig> =
        Array::try_from(map).map_err(|e| map_type_error(config_map, e))?;
    config
        .set(
            0,
            RawConfig {
                port: u32::from(port),
                pad: extra,
            },
            0,
        )
        .map_err(|e| map_error(config_map, format!("setting port {port}"), e))?;
    Ok(ebpf)
}

fn attach_programs(ebpf: &mut Ebpf, cgroup: &File) -> Result<Links, EbpfError> {
    let mut skb = |name: &'static str, kind: CgroupSkbAttachType| {
        let prog = cgroup_skb(ebpf, name)?;
        prog.load().map_err(|e| program_error(name, "loading", e))?;
        prog.attach(cgroup, kind, cgroup_attach_mode())
            .map_err(|e| program_error(name, "attaching to the cgroup", e))
    };
    let ingress = skb(names::PROG_INGRESS, CgroupSkbAttachType::Ingress)?;
    let egress = skb(names::PROG_EGRESS, CgroupSkbAttachType::Egress)?;
    let prog = sock_ops(ebpf)?;
    prog.load()
        .map_err(|e| program_error(names::PROG_SOCK_OPS, "loading", e))?;
    let sock_ops = prog
        .attach(cgroup, cgroup_attach_mode())
        .map_err(|e| program_error(names::PROG_SOCK_OPS, "attaching to the cgroup", e))?;
    // If a later step fails, dropping `ebpf` closes the program fds and the
    // links with them: nothing stays attached.
    Ok(Links {
        ingress,
        egress,
        sock_ops,
    })
}

fn cgroup_skb<'a>(ebpf: &'a mut Ebpf, name: &'static str) -> Result<&'a mut CgroupSkb, EbpfError> {
    ebpf.program_mut(name)
        .and_then(|p| <&mut CgroupSkb>::try_from(p).ok())
        .ok_or(EbpfError::MissingProgram {
            name,
            kind: "cgroup_skb",
        })
}

fn sock_ops(ebpf: &mut Ebpf) -> Result<&mut SockOps, EbpfError> {
    ebpf.program_mut(names::PROG_SOCK_OPS)
        .and_then(|p| <&mut SockOps>::try_from(p).ok())
        .ok_or(EbpfError::MissingProgram {
            name: names::PROG_SOCK_OPS,
            kind: "sock_ops",
        })
}

#[cfg(test)]
mod tests {
    use super::*;
    use aya_obj::ProgramSection;

    #[test]
    fn object_exports_the_programs_and_maps_the_loader_expects() {
        let obj = aya_obj::Object::parse(OBJECT).expect("embedded object parses");
        for name in names::PROGRAMS {
            assert!(obj.programs.contains_key(name), "program {name} missing");
        }
        assert!(matches!(
            obj.programs[names::PROG_SOCK_OPS].section,
            ProgramSection::SockOps
        ));
        for name in names::MAPS {
            assert!(obj.maps.contains_key(name), "map {name} missing");
        }
        assert_eq!(
            obj.maps[names::MAP_STATS].value_size() as usize,
            std::mem::size_of::<RawStats>()
        );
        assert_eq!(
            obj.maps[names::MAP_CONFIG].value_size() as usize,
            std::mem::size_of::<RawConfig>()
        );
    }

    #[test]
    fn the_integral_is_extended_to_the_read_time() {
        let raw = RawStats {
            concurrency: 2,
            proxied_concurrency: 1,
            last_change_ns: 1_000,
            weighted_ns: 500,
            weighted_proxied_ns: 100,
            ..RawStats::default()
        };
        let c = PodCounters::from_raw(&raw, 1_250);
        assert_eq!(c.weighted_ns, 1_000);
        assert_eq!(c.weighted_proxied_ns, 350);
        let earlier = PodCounters::from_raw(&raw, 1_000);
        assert!((c.average_concurrency_since(&earlier) - 2.0).abs() < 1e-9);
        assert!((c.average_proxied_concurrency_since(&earlier) - 1.0).abs() < 1e-9);
        assert_eq!(c.average_concurrency_since(&c), 0.0);
    }

    #[test]
    fn missing_cgroup_is_named() {
        let err = PodAccounting::attach(Path::new("/nonexistent/spright-pod"), 8080).unwrap_err();
        assert!(matches!(err, EbpfError::CgroupNotFound { .. }), "{err}");
    }
}
