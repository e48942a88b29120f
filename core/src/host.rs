//! The pool owner's side of the dataplane: creates the pool, chooses and sets up the
//! transport (loading the eBPF programs for sk_msg), admits function processes over the
//! control socket and cleans up after the ones that die.
//!
//! Everything here is thread-per-connection and blocks in the kernel while idle.

use std::collections::HashMap;
use std::net::{SocketAddr, TcpListener, TcpStream};
use std::path::PathBuf;
use std::sync::{Arc, Mutex, MutexGuard};

use spright_ebpf::{Counters, Dataplane, DataplaneOptions, EbpfError};
use thiserror::Error;
use tracing::{error, info, warn};

use crate::chain::RoutingTable;
use crate::control::{
    ControlConn, ControlError, ControlListener, FunctionMessage, OwnerMessage, Welcome,
};
use crate::descriptor::{DESCRIPTOR_LEN, Descriptor, GATEWAY_ID};
use crate::pool::{Pool, PoolConfig, PoolError};
use crate::transport::{
    SkMsgEndpoint, Transport, TransportChoice, TransportError, TransportKind, UnixEndpoint,
};

/// Errors setting up the host.
#[derive(Debug, Error)]
pub enum HostError {
    #[error("the sk_msg transport needs the eBPF programs: {0}")]
    Ebpf(#[from] EbpfError),
    #[error(transparent)]
    Pool(#[from] PoolError),
    #[error(transparent)]
    Transport(#[from] TransportError),
    #[error(transparent)]
    Control(#[from] ControlError),
    #[error("run directory {path}: {source}")]
    RunDir {
        path: PathBuf,
        source: std::io::Error,
    },
}

/// Host configuration.
#[derive(Debug, Clone)]
pub struct HostConfig {
    /// Directory for the control socket and the Unix transport's sockets.
    pub run_dir: PathBuf,
    pub transport: TransportChoice,
    pub pool: PoolConfig,
    pub ebpf: DataplaneOptions,
    pub routing: RoutingTable,
}

/// What happened to the dataplane's functions.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum HostEvent {
    /// A function process joined and receives descriptors now.
    Joined { function: String, id: u32, pid: u32 },
    /// A function process went away; its slots were reclaimed. `requests` are the request ids
    /// those slots carried: they will never come back.
    Died {
        function: String,
        id: u32,
        pid: u32,
        requests: Vec<u64>,
    },
    /// A descriptor was sent to a function that is not attached. Under sk_msg it passed
    /// through to the hub. The slot was recalled and freed; `request` is its request id.
    Unroutable { dst: u32, request: u64 },
}

type EventSink = Arc<dyn Fn(HostEvent) + Send + Sync>;

struct Attachment {
    function: String,
    pid: u32,
}

struct Shared {
    pool: Arc<Pool>,
    kind: TransportKind,
    hub: Option<SocketAddr>,
    unix_dir: PathBuf,
    routing: RoutingTable,
    ebpf: Mutex<Option<Dataplane>>,
    attached: Mutex<HashMap<u32, Attachment>>,
    on_event: EventSink,
}

/// The running host. Dropping it (or [`Host::shutdown`]) detaches the eBPF programs.
pub struct Host {
    shared: Arc<Shared>,
    endpoint: Arc<dyn Transport>,
    control: Arc<ControlListener>,
    run_dir: PathBuf,
}

impl std::fmt::Debug for Host {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Host")
            .field("transport", &self.shared.kind)
            .field("run_dir", &self.run_dir)
            .finish()
    }
}

fn lock<T>(m: &Mutex<T>) -> MutexGuard<'_, T> {
    m.lock().unwrap_or_else(std::sync::PoisonError::into_inner)
}

impl Host {
    /// Creates the pool, sets up the transport and starts admitting functions.
    /// `on_event` is called from the host's threads.
    pub fn start(
        config: HostConfig,
        on_event: impl Fn(HostEvent) + Send + Sync + 'static,
    ) -> Result<Self, HostError> {
        let run_dir = config.run_dir.clone();
        let unix_dir = run_dir.join("fns");
        std::fs::create_dir_all(&unix_dir).map_err(|source| HostError::RunDir {
            path: unix_dir.clone(),
            source,
        })?;
        let pool = Arc::new(Pool::create_memfd("spright-pool", config.pool)?);
        let (kind, ebpf) = match config.transport {
            TransportChoice::Only(TransportKind::Unix) => {
                info!(
                    transport = "unix",
                    reason = "configured",
                    "dataplane transport selected"
                );
                (TransportKind::Unix, None)
            }
            TransportChoice::Only(TransportKind::SkMsg) => {
                let dp = Dataplane::load(&config.ebpf)?;
                info!(transport = "sk_msg", reason = "configured", cgroup = %config.ebpf.cgroup_path.display(), "dataplane transport selected");
                (TransportKind::SkMsg, Some(dp))
            }
            TransportChoice::Auto => match Dataplane::load(&config.ebpf) {
                Ok(dp) => {
                    info!(transport = "sk_msg", reason = "auto: eBPF programs loaded", cgroup = %config.ebpf.cgroup_path.display(), "dataplane transport selected");
                    (TransportKind::SkMsg, Some(dp))
                }
                Err(e) => {
                    warn!(transport = "unix", reason = %format!("auto: sk_msg unavailable: {e}"), "dataplane transport selected");
                    (TransportKind::Unix, None)
                }
            },
        };
        let hub = if kind == TransportKind::SkMsg {
            Some(TcpListener::bind(("127.0.0.1", 0)).map_err(TransportError::from)?)
        } else {
            None
        };
        let hub_addr = match &hub {
            Some(l) => Some(l.local_addr().map_err(TransportError::from)?),
            None => None,
        };
        let shared = Arc::new(Shared {
            pool,
            kind,
            hub: hub_addr,
            unix_dir: unix_dir.clone(),
            routing: config.routing,
            ebpf: Mutex::new(ebpf),
            attached: Mutex::new(HashMap::new()),
            on_event: Arc::new(on_event),
        });
        let endpoint: Arc<dyn Transport> = match (kind, hub_addr) {
            (TransportKind::SkMsg, Some(addr)) => Arc::new(SkMsgEndpoint::connect(addr, |port| {
                lock(&shared.ebpf)
                    .as_mut()
                    .ok_or(TransportError::Closed)?
                    .register_port(port, GATEWAY_ID)
                    .map_err(|e| TransportError::Io(std::io::Error::other(e.to_string())))
            })?),
            _ => Arc::new(UnixEndpoint::bind(&unix_dir, GATEWAY_ID)?),
        };
        if let Some(listener) = hub {
            let shared = Arc::clone(&shared);
            std::thread::Builder::new()
                .name("spright-hub".into())
                .spawn(move || hub_loop(&listener, &shared))
                .map_err(TransportError::from)?;
        }
        let control = Arc::new(ControlListener::bind(&run_dir.join("control.sock"))?);
        {
            let shared = Arc::clone(&shared);
            let control = Arc::clone(&control);
            std::thread::Builder::new()
                .name("spright-control".into())
                .spawn(move || control_loop(&control, &shared))
                .map_err(TransportError::from)?;
        }
        Ok(Self {
            shared,
            endpoint,
            control,
            run_dir,
        })
    }

    /// The shared pool.
    pub fn pool(&self) -> &Arc<Pool> {
        &self.shared.pool
    }

    /// The owner's own endpoint (function id 0): chain results arrive here.
    pub fn endpoint(&self) -> &Arc<dyn Transport> {
        &self.endpoint
    }

    /// The transport in use.
    pub fn kind(&self) -> TransportKind {
        self.shared.kind
    }

    /// The routing table.
    pub fn routing(&self) -> &RoutingTable {
        &self.shared.routing
    }

    /// Path of the control socket functions connect to.
    pub fn control_path(&self) -> PathBuf {
        self.run_dir.join("control.sock")
    }

    /// Whether function `id` is attached.
    pub fn is_attached(&self, id: u32) -> bool {
        lock(&self.shared.attached).contains_key(&id)
    }

    /// The attached functions: (name, id, pid).
    pub fn attached(&self) -> Vec<(String, u32, u32)> {
        let mut v: Vec<_> = lock(&self.shared.attached)
            .iter()
            .map(|(id, a)| (a.function.clone(), *id, a.pid))
            .collect();
        v.sort_by_key(|(_, id, _)| *id);
        v
    }

    /// The sk_msg program's counters per destination id (gateway and functions), then the
    /// unknown-destination counters. `None` under the Unix transport.
    pub fn counters(&self) -> Option<(Vec<(u32, Counters)>, Counters)> {
        let guard = lock(&self.shared.ebpf);
        let dp = guard.as_ref()?;
        let ids =
            std::iter::once(GATEWAY_ID).chain(self.shared.routing.functions.values().copied());
        let per: Vec<_> = ids
            .filter_map(|id| dp.counters(id).ok().map(|c| (id, c)))
            .collect();
        let unknown = dp.unknown_counters().ok()?;
        Some((per, unknown))
    }

    /// Stops admitting functions and detaches the eBPF programs.
    pub fn shutdown(&self) {
        self.control.shutdown();
        self.endpoint.shutdown();
        let taken = lock(&self.shared.ebpf).take();
        if let Some(Err(e)) = taken.map(Dataplane::detach) {
            error!(error = %e, "detaching the eBPF programs");
        }
    }
}

impl Drop for Host {
    fn drop(&mut self) {
        self.shutdown();
    }
}

fn control_loop(listener: &ControlListener, shared: &Arc<Shared>) {
    loop {
        match listener.accept() {
            Ok(conn) => {
                let shared = Arc::clone(shared);
                let spawned = std::thread::Builder::new()
                    .name("spright-fn".into())
                    .spawn(move || serve_function(&conn, &shared));
                if let Err(e) = spawned {
                    error!(error = %e, "spawning a control thread");
                }
            }
            Err(_) => return, // shut down
        }
    }
}

/// Admits one function, then waits for its connection to end and cleans up.
fn serve_function(conn: &ControlConn, shared: &Arc<Shared>) {
    let (function, id, pid, port) = match admit(conn, shared) {
        Ok(v) => v,
        Err(e) => {
            warn!(error = %e, "function not admitted");
            let _ = conn.send(
                &OwnerMessage::Reject {
                    reason: e.to_string(),
                },
                None,
            );
            return;
        }
    };
    info!(function = %function, id, pid, transport = %shared.kind, "function attached");
    (shared.on_event)(HostEvent::Joined {
        function: function.clone(),
        id,
        pid,
    });
    // The connection stays open for the function's lifetime: any end means it is gone.
    loop {
        match conn.recv::<FunctionMessage>() {
            Ok(_) => continue,
            Err(ControlError::Malformed(m)) => {
                warn!(function = %function, error = %m, "ignoring control message")
            }
            Err(_) => break,
        }
    }
    lock(&shared.attached).remove(&id);
    if let Some(dp) = lock(&shared.ebpf).as_mut() {
        let _ = dp.remove_function(id);
        if let Some(p) = port {
            let _ = dp.unregister_port(p);
        }
    }
    let requests = shared.pool.reclaim(id);
    if requests.is_empty() {
        info!(function = %function, id, pid, free = shared.pool.free_count(), "function detached");
    } else {
        warn!(function = %function, id, pid, reclaimed = requests.len(), free = shared.pool.free_count(), "function detached with requests in flight; slots reclaimed");
    }
    (shared.on_event)(HostEvent::Died {
        function,
        id,
        pid,
        requests,
    });
}

fn admit(
    conn: &ControlConn,
    shared: &Arc<Shared>,
) -> Result<(String, u32, u32, Option<u16>), ControlError> {
    let (function, pid) = match conn.recv::<FunctionMessage>()?.0 {
        FunctionMessage::Hello { function, pid } => (function, pid),
        other => {
            return Err(ControlError::Unexpected {
                expected: "hello",
                got: format!("{other:?}"),
            });
        }
    };
    let id = shared.routing.id(&function).ok_or_else(|| {
        ControlError::Rejected(format!("no function named {function:?} in the chain file"))
    })?;
    {
        let attached = lock(&shared.attached);
        if let Some(a) = attached.get(&id) {
            return Err(ControlError::Rejected(format!(
                "function {function:?} is already attached (pid {})",
                a.pid
            )));
        }
    }
    let welcome = Welcome {
        id,
        transport: shared.kind,
        hub: shared.hub,
        unix_dir: Some(shared.unix_dir.clone()),
        routing: shared.routing.clone(),
    };
    conn.send(&OwnerMessage::Welcome(welcome), Some(shared.pool.fd()))?;
    let port = match conn.recv::<FunctionMessage>()?.0 {
        FunctionMessage::Register { port } => port,
        other => {
            return Err(ControlError::Unexpected {
                expected: "register",
                got: format!("{other:?}"),
            });
        }
    };
    if shared.kind == TransportKind::SkMsg {
        let p = port.ok_or_else(|| {
            ControlError::Rejected("sk_msg needs the function's local port".into())
        })?;
        lock(&shared.ebpf)
            .as_mut()
            .ok_or_else(|| ControlError::Rejected("host is shutting down".into()))?
            .register_port(p, id)
            .map_err(|e| ControlError::Rejected(e.to_string()))?;
    }
    conn.send(&OwnerMessage::Registered, None)?;
    match conn.recv::<FunctionMessage>()?.0 {
        FunctionMessage::Attached => {}
        other => {
            return Err(ControlError::Unexpected {
                expected: "attached",
                got: format!("{other:?}"),
            });
        }
    }
    if shared.kind == TransportKind::SkMsg {
        let in_map = lock(&shared.ebpf)
            .as_ref()
            .map(|dp| dp.has_socket(id))
            .transpose()
            .map_err(|e| ControlError::Rejected(e.to_string()))?
            .unwrap_or(false);
        if !in_map {
            return Err(ControlError::Rejected(format!(
                "function {function:?}'s socket did not reach the SOCKHASH (is it in the cgroup the programs are attached to?)"
            )));
        }
    }
    let mut attached = lock(&shared.attached);
    if attached.contains_key(&id) {
        return Err(ControlError::Rejected(format!(
            "function {function:?} attached twice"
        )));
    }
    attached.insert(
        id,
        Attachment {
            function: function.clone(),
            pid,
        },
    );
    Ok((function, id, pid, port))
}

/// Reads what sk_msg let pass through to the hub: descriptors for functions that are not in
/// the SOCKHASH. Their slots are recalled so nothing leaks, and the owner hears about it.
fn hub_loop(listener: &TcpListener, shared: &Arc<Shared>) {
    for conn in listener.incoming() {
        let Ok(stream) = conn else { continue };
        let shared = Arc::clone(shared);
        let _ = std::thread::Builder::new()
            .name("spright-hub-conn".into())
            .spawn(move || drain_hub_conn(stream, &shared));
    }
}

fn drain_hub_conn(mut stream: TcpStream, shared: &Arc<Shared>) {
    use std::io::Read;
    let mut buf = [0u8; DESCRIPTOR_LEN];
    while stream.read_exact(&mut buf).is_ok() {
        let Ok(desc) = Descriptor::decode(&buf) else {
            continue;
        };
        recall_unroutable(shared, &desc);
    }
}

fn recall_unroutable(shared: &Shared, desc: &Descriptor) {
    match shared.pool.claim(desc, desc.dst) {
        Ok(slot) => {
            let request = slot.request_id();
            drop(slot);
            warn!(
                dst = desc.dst,
                request, "descriptor for a function that is not attached; slot recalled"
            );
            (shared.on_event)(HostEvent::Unroutable {
                dst: desc.dst,
                request,
            });
        }
        Err(e) => warn!(dst = desc.dst, error = %e, "unroutable descriptor already reclaimed"),
    }
}
