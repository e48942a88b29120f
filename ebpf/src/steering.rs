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
//! This is only the kernel half. The target socket must come from the user
//! container. The node agent would take it with `pidfd_getfd`, which needs
//! CAP_SYS_PTRACE; that part is not built yet. Loading needs root (CAP_BPF,
//! CAP_NET_ADMIN).

use std::fs::File;
use std::os::fd::AsRawFd;
use std::path::Path;

use aya::maps::{MapData, PerCpuArray, SockMap};
use aya::programs::{SkLookup, sk_lookup::SkLookupLinkId};
use aya::{Ebpf, include_bytes_aligned};

use crate::{EbpfError, map_error, map_type_error, program_error, take_map};

/// Names in the embedded steering object.
pub mod names {
    /// The `sk_lookup` program.
    pub const PROG_LOOKUP: &str = "steer_lookup";
    /// ARRAY[1]: the steered port.
    pub const MAP_CONFIG: &str = "steer_config";
    /// SOCKMAP[1]: the target listening socket.
    pub const MAP_TARGET: &str = "steer_target";
    /// PERCPU_ARRAY[1]: connections steered.
    pub const MAP_COUNT: &str = "steer_count";
}

static OBJECT: &[u8] = include_bytes_aligned!(concat!(env!("OUT_DIR"), "/steering.bpf.o"));

/// The steering program attached to one network namespace.
pub struct Steering {
    ebpf: Ebpf,
    target: SockMap<MapData>,
    count: PerCpuArray<MapData, u64>,
    link: Option<SkLookupLinkId>,
}

impl std::fmt::Debug for Steering {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Steering")
            .field("attached", &self.link.is_some())
            .finish_non_exhaustive()
    }
}

impl Steering {
    /// Loads the program, sets the port and attaches it to the network
    /// namespace at `netns` (e.g. `/var/run/netns/<name>` or
    /// `/proc/<pid>/ns/net`). Nothing is steered until [`Self::set_target`].
    pub fn attach(netns: &Path, port: u16) -> Result<Self, EbpfError> {
        let ns = File::open(netns).map_err(|source| EbpfError::PinPath {
            action: "opening the network namespace",
            path: netns.to_owned(),
            source,
        })?;
        let mut ebpf = crate::accounting::load_with_port(OBJECT, names::MAP_CONFIG, port)?;
        let target = SockMap::try_from(take_map(&mut ebpf, names::MAP_TARGET)?)
            .map_err(|e| map_type_error(names::MAP_TARGET, e))?;
        let count = PerCpuArray::try_from(take_map(&mut ebpf, names::MAP_COUNT)?)
            .map_err(|e| map_type_error(names::MAP_COUNT, e))?;
        let prog = lookup_program(&mut ebpf)?;
        prog.load()
            .map_err(|e| program_error(names::PROG_LOOKUP, "loading", e))?;
        let link = prog.attach(&ns).map_err(|e| {
            program_error(names::PROG_LOOKUP, "attaching to the network namespace", e)
        })?;
        Ok(Self {
            ebpf,
            target,
            count,
            link: Some(link),
        })
    }

    /// Steers new connections for the port to `listener` (a listening TCP
    /// socket, in the same network namespace).
    pub fn set_target(&mut self, listener: &impl AsRawFd) -> Result<(), EbpfError> {
        self.target
            .set(0, listener, 0)
            .map_err(|e| map_error(names::MAP_TARGET, "setting the target socket".into(), e))
    }

    /// Stops steering; new connections take the normal lookup again.
    pub fn clear_target(&mut self) -> Result<(), EbpfError> {
        match self.target.clear_index(&0) {
            Err(e) if !crate::is_not_found(&e) => Err(map_error(
                names::MAP_TARGET,
                "clearing the target socket".into(),
                e,
            )),
            _ => Ok(()),
        }
    }

    /// Connections steered so far.
    pub fn steered(&self) -> Result<u64, EbpfError> {
        self.count
            .get(&0, 0)
            .map(|values| values.iter().copied().fold(0u64, u64::wrapping_add))
            .map_err(|e| map_error(names::MAP_COUNT, "reading the count".into(), e))
    }

    /// Detaches the program; the kernel frees it and its maps with this value.
    pub fn detach(mut self) -> Result<(), EbpfError> {
        self.teardown()
    }

    fn teardown(&mut self) -> Result<(), EbpfError> {
        match self.link.take() {
            Some(link) => lookup_program(&mut self.ebpf).and_then(|p| {
                p.detach(link)
                    .map_err(|e| program_error(names::PROG_LOOKUP, "detaching", e))
            }),
            None => Ok(()),
        }
    }
}

impl Drop for Steering {
    fn drop(&mut self) {
        if let Err(error) = self.teardown() {
            tracing::warn!(%error, "detaching the steering program failed");
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

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn object_exports_the_program_and_maps() {
        let obj = aya_obj::Object::parse(OBJECT).expect("embedded object parses");
        assert!(obj.programs.contains_key(names::PROG_LOOKUP));
        for map in [names::MAP_CONFIG, names::MAP_TARGET, names::MAP_COUNT] {
            assert!(obj.maps.contains_key(map), "{map}");
        }
    }

    #[test]
    fn a_missing_namespace_is_named() {
        let err = Steering::attach(Path::new("/nonexistent/netns"), 8012).unwrap_err();
        assert!(err.to_string().contains("/nonexistent/netns"), "{err}");
    }
}
