//! The function SDK: how a function process joins the node's dataplane, receives events as
//! zero-copy views of the pool and sends its result on.
//!
//! ```no_run
//! use spright_core::sdk::{Function, Next};
//! let f = Function::join("/run/spright/control.sock".as_ref(), "upper")?;
//! f.run(|event| {
//!     event.payload_mut().make_ascii_uppercase(); // in place, in shared memory
//!     Ok(Next::Chain) // on to the chain's next step (or back to the gateway at the end)
//! })?;
//! # Ok::<(), spright_core::sdk::SdkError>(())
//! ```

use std::path::Path;
use std::sync::Arc;

use thiserror::Error;
use tracing::warn;

use crate::chain::RoutingTable;
use crate::control::{ControlConn, ControlError, FunctionMessage, OwnerMessage};
use crate::descriptor::{Descriptor, GATEWAY_ID};
use crate::pool::{Pool, PoolError, Slot};
use crate::transport::{SkMsgEndpoint, Transport, TransportError, TransportKind, UnixEndpoint};

/// Most descriptors taken per wakeup.
const BATCH: usize = 64;

/// SDK errors.
#[derive(Debug, Error)]
pub enum SdkError {
    #[error(transparent)]
    Control(#[from] ControlError),
    #[error(transparent)]
    Transport(#[from] TransportError),
    #[error(transparent)]
    Pool(#[from] PoolError),
    #[error("the dataplane sent no pool with its welcome")]
    NoPool,
    #[error("the dataplane's welcome lacks {0}")]
    Incomplete(&'static str),
    #[error(transparent)]
    Placement(#[from] PlacementError),
}

/// The environment variable naming the CPUs a dataplane process's threads run on (a Linux
/// cpu list: `0`, `0-1`, `0,2-3`). Unset or empty: the threads keep the CPUs they inherit
/// (in a pod, the container's cpuset). Setting the broker and its functions to the same
/// core keeps each hand-over of a descriptor a wake-up on that core, with no inter-processor
/// interrupt; every CPU named must be in the process's cpuset.
pub const CPUS_ENV: &str = "SPRIGHT_CPUS";

/// Why [`place`] refused a CPU list.
#[derive(Debug, Error)]
pub enum PlacementError {
    #[error("{CPUS_ENV}={value:?}: {reason}")]
    Invalid { value: String, reason: String },
    #[error("{CPUS_ENV}={value:?}: CPU {cpu} is not in this process's cpuset ({allowed})")]
    OutsideCpuset {
        value: String,
        cpu: usize,
        allowed: String,
    },
    #[error("{CPUS_ENV}: {0}")]
    Affinity(nix::Error),
}

/// Parses a Linux cpu list (`0`, `1-3`, `0,2-3`) into sorted, distinct CPU numbers.
pub fn parse_cpu_list(list: &str) -> Result<Vec<usize>, String> {
    let max = nix::sched::CpuSet::count();
    let cpu = |s: &str| -> Result<usize, String> {
        let n: usize = s
            .trim()
            .parse()
            .map_err(|_| format!("{s:?} is not a CPU number"))?;
        if n >= max {
            return Err(format!("CPU {n} is beyond the largest ({})", max - 1));
        }
        Ok(n)
    };
    let mut cpus = Vec::new();
    for part in list.split(',') {
        match part.split_once('-') {
            Some((a, b)) => {
                let (a, b) = (cpu(a)?, cpu(b)?);
                if a > b {
                    return Err(format!("range {part:?} runs backwards"));
                }
                cpus.extend(a..=b);
            }
            None => cpus.push(cpu(part)?),
        }
    }
    cpus.sort_unstable();
    cpus.dedup();
    Ok(cpus)
}

/// Runs the calling thread, and every thread it starts afterwards, on the CPUs of `list` (a
/// [`CPUS_ENV`] value); `None` or blank leaves the inherited CPUs alone. Returns the CPUs
/// applied.
pub fn place(list: Option<&str>) -> Result<Option<Vec<usize>>, PlacementError> {
    let Some(value) = list.map(str::trim).filter(|v| !v.is_empty()) else {
        return Ok(None);
    };
    let cpus = parse_cpu_list(value).map_err(|reason| PlacementError::Invalid {
        value: value.to_owned(),
        reason,
    })?;
    let me = nix::unistd::Pid::from_raw(0);
    let allowed = nix::sched::sched_getaffinity(me).map_err(PlacementError::Affinity)?;
    let mut set = nix::sched::CpuSet::new();
    for &c in &cpus {
        if !allowed.is_set(c).unwrap_or(false) {
            let allowed = (0..nix::sched::CpuSet::count())
                .filter(|i| allowed.is_set(*i).unwrap_or(false))
                .map(|i| i.to_string())
                .collect::<Vec<_>>()
                .join(",");
            return Err(PlacementError::OutsideCpuset {
                value: value.to_owned(),
                cpu: c,
                allowed,
            });
        }
        set.set(c).map_err(PlacementError::Affinity)?;
    }
    nix::sched::sched_setaffinity(me, &set).map_err(PlacementError::Affinity)?;
    Ok(Some(cpus))
}

/// [`place`] with the value of [`CPUS_ENV`].
pub fn place_from_env() -> Result<Option<Vec<usize>>, PlacementError> {
    place(std::env::var(CPUS_ENV).ok().as_deref())
}

/// Where an event goes after the handler.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Next {
    /// The chain's next step; back to the gateway after the last.
    Chain,
    /// The named function (the chain continues after it if it is a step of the chain).
    To(String),
    /// Straight back to the gateway as the chain's result.
    Reply,
}

/// A handler's refusal: the gateway answers `status` with `message` as the body.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Reject {
    pub status: u16,
    pub message: String,
}

impl Reject {
    /// A 400: the input was bad.
    pub fn bad_request(message: impl Into<String>) -> Self {
        Self {
            status: 400,
            message: message.into(),
        }
    }
}

/// One event, held by this function: its payload lives in the shared pool.
#[derive(Debug)]
pub struct Event<'f> {
    slot: Slot,
    function: &'f Function,
}

impl Event<'_> {
    /// The payload, in place.
    pub fn payload(&self) -> &[u8] {
        self.slot.payload()
    }

    /// The payload, writable in place.
    pub fn payload_mut(&mut self) -> &mut [u8] {
        let len = self.slot.len();
        &mut self.slot.buffer_mut()[..len]
    }

    /// The whole slot (capacity bytes) for a result written in place; then [`Event::set_len`].
    pub fn buffer_mut(&mut self) -> &mut [u8] {
        self.slot.buffer_mut()
    }

    /// Sets the payload length after writing into [`Event::buffer_mut`].
    pub fn set_len(&mut self, len: usize) -> Result<(), Reject> {
        self.slot.set_len(len).map_err(|e| Reject {
            status: 413,
            message: e.to_string(),
        })
    }

    /// Puts the result in a new slot (out of place); the input slot is freed.
    pub fn replace(&mut self, bytes: &[u8]) -> Result<(), Reject> {
        let mut fresh = self
            .function
            .pool
            .alloc(self.function.id)
            .map_err(|e| Reject {
                status: 503,
                message: e.to_string(),
            })?;
        fresh.write(bytes).map_err(|e| Reject {
            status: 413,
            message: e.to_string(),
        })?;
        fresh.set_request_id(self.slot.request_id());
        let (c, h) = self.slot.route();
        fresh.set_route(c, h);
        self.slot = fresh; // the old slot drops here and returns to the pool
        Ok(())
    }

    /// The request this event belongs to.
    pub fn request_id(&self) -> u64 {
        self.slot.request_id()
    }
}

/// A function process attached to the dataplane.
pub struct Function {
    name: String,
    id: u32,
    pool: Arc<Pool>,
    transport: Arc<dyn Transport>,
    routing: RoutingTable,
}

impl std::fmt::Debug for Function {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Function")
            .field("name", &self.name)
            .field("id", &self.id)
            .field("transport", &self.transport.kind())
            .finish()
    }
}

impl Function {
    /// Joins the dataplane whose control socket is at `control` as function `name`. When
    /// [`CPUS_ENV`] is set, the calling thread (the one that runs the handler) and the
    /// threads the SDK starts run on those CPUs from here on.
    pub fn join(control: &Path, name: &str) -> Result<Self, SdkError> {
        if let Some(cpus) = place_from_env()? {
            tracing::info!(function = name, ?cpus, "placed on CPUs");
        }
        let conn = ControlConn::connect(control)?;
        conn.send(
            &FunctionMessage::Hello {
                function: name.to_owned(),
                pid: std::process::id(),
            },
            None,
        )?;
        let (welcome, fd) = match conn.recv::<OwnerMessage>()? {
            (OwnerMessage::Welcome(w), fd) => (w, fd),
            (OwnerMessage::Reject { reason }, _) => {
                return Err(ControlError::Rejected(reason).into());
            }
            (other, _) => {
                return Err(ControlError::Unexpected {
                    expected: "welcome",
                    got: format!("{other:?}"),
                }
                .into());
            }
        };
        let pool = Arc::new(Pool::open(fd.ok_or(SdkError::NoPool)?)?);
        let registered = |conn: &ControlConn| -> Result<(), ControlError> {
            match conn.recv::<OwnerMessage>()?.0 {
                OwnerMessage::Registered => Ok(()),
                OwnerMessage::Reject { reason } => Err(ControlError::Rejected(reason)),
                other => Err(ControlError::Unexpected {
                    expected: "registered",
                    got: format!("{other:?}"),
                }),
            }
        };
        let transport: Arc<dyn Transport> = match welcome.transport {
            TransportKind::SkMsg => {
                let hub = welcome.hub.ok_or(SdkError::Incomplete("the hub address"))?;
                let mut control_err = None;
                let ep = SkMsgEndpoint::connect(hub, |port| {
                    let r = conn
                        .send(&FunctionMessage::Register { port: Some(port) }, None)
                        .and_then(|()| registered(&conn));
                    r.map_err(|e| {
                        let msg = e.to_string();
                        control_err = Some(e);
                        TransportError::Io(std::io::Error::other(msg))
                    })
                });
                match (ep, control_err) {
                    (Ok(ep), _) => Arc::new(ep),
                    (Err(_), Some(e)) => return Err(e.into()),
                    (Err(e), None) => return Err(e.into()),
                }
            }
            TransportKind::Unix => {
                let dir = welcome
                    .unix_dir
                    .ok_or(SdkError::Incomplete("the socket directory"))?;
                let ep = UnixEndpoint::bind(&dir, welcome.id)?;
                conn.send(&FunctionMessage::Register { port: None }, None)?;
                registered(&conn)?;
                Arc::new(ep)
            }
        };
        conn.send(&FunctionMessage::Attached, None)?;
        watch_owner(conn, Arc::clone(&transport));
        Ok(Self {
            name: name.to_owned(),
            id: welcome.id,
            pool,
            transport,
            routing: welcome.routing,
        })
    }

    /// This function's id.
    pub fn id(&self) -> u32 {
        self.id
    }

    /// This function's name.
    pub fn name(&self) -> &str {
        &self.name
    }

    /// The transport in use.
    pub fn transport_kind(&self) -> TransportKind {
        self.transport.kind()
    }

    /// The routing table the dataplane handed over.
    pub fn routing(&self) -> &RoutingTable {
        &self.routing
    }

    /// Serves events until the dataplane goes away. The thread sleeps in the kernel between
    /// events.
    pub fn run<H>(&self, mut handler: H) -> Result<(), SdkError>
    where
        H: FnMut(&mut Event<'_>) -> Result<Next, Reject>,
    {
        let mut batch = Vec::with_capacity(BATCH);
        let mut out = Vec::with_capacity(BATCH);
        loop {
            batch.clear();
            match self.transport.recv_batch(&mut batch, BATCH) {
                Ok(()) => {}
                Err(TransportError::Closed) => return Ok(()),
                Err(e) => return Err(e.into()),
            }
            out.clear();
            for desc in &batch {
                if let Some(next) = self.handle(desc, &mut handler)? {
                    out.push(next);
                }
            }
            self.deliver(&out)?;
        }
    }

    /// Sends the batch's results. sk_msg sends them in one write (the kernel routes each
    /// descriptor on its own; an unknown destination passes to the hub, which answers 503);
    /// the Unix transport sends one by one and recalls what cannot be delivered.
    fn deliver(&self, out: &[Descriptor]) -> Result<(), SdkError> {
        if self.transport.kind() == TransportKind::SkMsg {
            return Ok(self.transport.send_batch(out)?);
        }
        for sent in out {
            if let Err(e) = self.transport.send(sent) {
                self.recall(sent, &e)?;
            }
        }
        Ok(())
    }

    /// Takes back a slot in flight to a function that cannot take it, and tells the gateway.
    /// If the host reclaimed it first (the function died), the request has been answered.
    fn recall(&self, sent: &Descriptor, e: &TransportError) -> Result<(), SdkError> {
        match self.pool.claim(sent, sent.dst) {
            Ok(mut back) => {
                fail(
                    &mut back,
                    503,
                    &format!("function {} is not attached: {e}", sent.dst),
                );
                let d = back.send_to(GATEWAY_ID)?;
                self.transport.send(&d)?;
            }
            Err(reclaimed) => {
                warn!(function = %self.name, dst = sent.dst, error = %reclaimed, "send failed; slot already reclaimed");
            }
        }
        Ok(())
    }

    /// Runs the handler on one received descriptor; returns the descriptor to send on.
    fn handle<H>(&self, desc: &Descriptor, handler: &mut H) -> Result<Option<Descriptor>, SdkError>
    where
        H: FnMut(&mut Event<'_>) -> Result<Next, Reject>,
    {
        let slot = match self.pool.claim(desc, self.id) {
            Ok(s) => s,
            Err(e) => {
                warn!(function = %self.name, error = %e, "dropping an invalid descriptor");
                return Ok(None);
            }
        };
        let mut event = Event {
            slot,
            function: self,
        };
        let outcome = handler(&mut event);
        let mut slot = event.slot;
        let (chain, hop) = slot.route();
        let (dst, hop) = match outcome {
            Ok(Next::Chain) => match self.routing.next(chain, hop) {
                Some((next_hop, id)) => (id, next_hop),
                None => (GATEWAY_ID, hop),
            },
            Ok(Next::Reply) => (GATEWAY_ID, hop),
            Ok(Next::To(name)) => match self.routing.id(&name) {
                Some(id) => {
                    let pos = self
                        .routing
                        .chains
                        .get(usize::from(chain))
                        .and_then(|steps| steps.iter().position(|s| *s == id))
                        .and_then(|p| u16::try_from(p).ok())
                        .unwrap_or(hop);
                    (id, pos)
                }
                None => {
                    fail(
                        &mut slot,
                        500,
                        &format!("function {:?} sent to unknown function {name:?}", self.name),
                    );
                    (GATEWAY_ID, hop)
                }
            },
            Err(reject) => {
                fail(&mut slot, reject.status, &reject.message);
                (GATEWAY_ID, hop)
            }
        };
        slot.set_route(chain, hop);
        Ok(Some(slot.send_to(dst)?))
    }
}

/// Holds the control connection for the function's life and ends `run` when the owner goes
/// away (the connection closes): a function never outlives its dataplane, whatever the
/// transport. The thread sleeps in the kernel until then.
fn watch_owner(conn: ControlConn, transport: Arc<dyn Transport>) {
    let spawned = std::thread::Builder::new()
        .name("spright-owner-watch".into())
        .spawn(move || {
            while let Ok(_) | Err(ControlError::Malformed(_)) = conn.recv::<OwnerMessage>() {}
            warn!("the dataplane owner went away; stopping");
            transport.shutdown();
        });
    if let Err(e) = spawned {
        warn!(error = %e, "cannot watch the dataplane owner; the function will not notice it leave");
    }
}

fn fail(slot: &mut Slot, status: u16, message: &str) {
    let bytes = message.as_bytes();
    let n = bytes.len().min(slot.capacity());
    slot.buffer_mut()[..n].copy_from_slice(&bytes[..n]);
    let _ = slot.set_len(n);
    slot.set_status(u32::from(status));
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn cpu_lists() {
        assert_eq!(parse_cpu_list("0"), Ok(vec![0]));
        assert_eq!(parse_cpu_list("3,0-1, 1"), Ok(vec![0, 1, 3]));
        for bad in ["", "a", "1-", "-1", "2-1", "0,,1", "99999", "1.5"] {
            assert!(parse_cpu_list(bad).is_err(), "{bad:?}");
        }
    }

    #[test]
    fn cpu_lists_random_input_never_panic() {
        let mut x: u64 = 0x9e37_79b9_7f4a_7c15;
        let alphabet = b"0123456789,- x";
        for _ in 0..5000 {
            x ^= x << 13;
            x ^= x >> 7;
            x ^= x << 17;
            let len = (x % 12) as usize;
            let s: String = (0..len)
                .map(|i| alphabet[((x >> (i * 4)) % alphabet.len() as u64) as usize] as char)
                .collect();
            if let Ok(cpus) = parse_cpu_list(&s) {
                assert!(cpus.windows(2).all(|w| w[0] < w[1]), "{s:?}");
            }
        }
    }

    #[test]
    fn placement_stays_inside_the_cpuset() {
        std::thread::spawn(|| {
            let me = nix::unistd::Pid::from_raw(0);
            let allowed = nix::sched::sched_getaffinity(me).expect("affinity");
            let first = (0..nix::sched::CpuSet::count())
                .find(|c| allowed.is_set(*c).unwrap_or(false))
                .expect("some CPU");
            assert!(place(None).expect("unset").is_none());
            assert!(place(Some("  ")).expect("blank").is_none());
            let outside = (0..nix::sched::CpuSet::count())
                .find(|c| !allowed.is_set(*c).unwrap_or(true))
                .expect("some CPU outside");
            let err = place(Some(&outside.to_string())).expect_err("outside the cpuset");
            assert!(matches!(err, PlacementError::OutsideCpuset { .. }), "{err}");
            assert!(err.to_string().contains(CPUS_ENV));
            assert!(matches!(
                place(Some("x")),
                Err(PlacementError::Invalid { .. })
            ));
            assert_eq!(
                place(Some(&first.to_string())).expect("inside"),
                Some(vec![first])
            );
            let now = nix::sched::sched_getaffinity(me).expect("affinity");
            assert!(now.is_set(first).unwrap_or(false));
            assert_eq!(
                (0..nix::sched::CpuSet::count())
                    .filter(|c| now.is_set(*c).unwrap_or(false))
                    .count(),
                1
            );
        })
        .join()
        .expect("placement thread");
    }
}
