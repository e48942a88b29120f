//! Transports: how a descriptor reaches the next function. One trait, two implementations,
//! chosen at start-up by the pool owner and reported in its log:
//!
//! - [`SkMsgEndpoint`]: each function owns the client end of a loopback TCP connection to the
//!   owner's hub listener. Its local port is registered with the eBPF programs before it
//!   connects, so sock_ops puts the socket into the SOCKHASH under the function's id. A send
//!   is one 16-byte write; the sk_msg program redirects it into the destination's receive
//!   queue, so the TCP stack and the hub never see it. A receive is one 16-byte read.
//! - [`UnixEndpoint`]: the unprivileged fallback. Each function binds a Unix datagram socket
//!   at `<dir>/fn-<id>.sock`; senders keep one connected datagram socket per destination, so
//!   a full receive queue blocks the sender (backpressure) instead of dropping.
//!
//! Both block in the kernel while idle: nothing polls.

use std::collections::HashMap;
use std::io::{ErrorKind, Read, Write};
use std::net::{SocketAddr, TcpStream};
use std::os::fd::AsRawFd;
use std::os::unix::net::UnixDatagram;
use std::path::{Path, PathBuf};
use std::sync::{Arc, Mutex};

use serde::{Deserialize, Serialize};
use thiserror::Error;

use crate::descriptor::{BadDescriptor, DESCRIPTOR_LEN, Descriptor};

/// Which transport a dataplane uses.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum TransportKind {
    /// eBPF sk_msg redirect between loopback TCP sockets.
    SkMsg,
    /// Unix datagram sockets (no privileges needed).
    Unix,
}

impl std::fmt::Display for TransportKind {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(match self {
            Self::SkMsg => "sk_msg",
            Self::Unix => "unix",
        })
    }
}

/// The transport an operator asks for.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum TransportChoice {
    /// sk_msg when the kernel and capabilities allow, else unix.
    Auto,
    /// Exactly this one; failing to set it up is an error.
    Only(TransportKind),
}

impl std::str::FromStr for TransportChoice {
    type Err = String;
    fn from_str(s: &str) -> Result<Self, String> {
        match s {
            "auto" => Ok(Self::Auto),
            "sk_msg" | "skmsg" => Ok(Self::Only(TransportKind::SkMsg)),
            "unix" => Ok(Self::Only(TransportKind::Unix)),
            other => Err(format!(
                "unknown transport {other:?}: expected auto, sk_msg or unix"
            )),
        }
    }
}

/// Transport errors.
#[derive(Debug, Error)]
pub enum TransportError {
    #[error("transport I/O: {0}")]
    Io(#[from] std::io::Error),
    #[error("no function with id {0} is attached to the dataplane")]
    UnknownDestination(u32),
    #[error("the transport was closed")]
    Closed,
    #[error(transparent)]
    BadDescriptor(#[from] BadDescriptor),
}

/// One function's endpoint on the dataplane.
pub trait Transport: Send + Sync {
    /// Sends a descriptor to `desc.dst`.
    fn send(&self, desc: &Descriptor) -> Result<(), TransportError>;
    /// Blocks until a descriptor arrives for this endpoint.
    fn recv(&self) -> Result<Descriptor, TransportError>;
    /// Blocks until at least one descriptor arrives, then also takes those already queued, up
    /// to `max` in all, appending them to `out`. Under load this amortises one wakeup and one
    /// system call over many descriptors; idle, it sleeps in the kernel like `recv`.
    fn recv_batch(&self, out: &mut Vec<Descriptor>, max: usize) -> Result<(), TransportError> {
        let _ = max;
        out.push(self.recv()?);
        Ok(())
    }
    /// Sends several descriptors, each to its own destination. Stops at the first error.
    fn send_batch(&self, descs: &[Descriptor]) -> Result<(), TransportError> {
        descs.iter().try_for_each(|d| self.send(d))
    }
    /// Which transport this is.
    fn kind(&self) -> TransportKind;
    /// Wakes a thread blocked in [`Transport::recv`] with [`TransportError::Closed`].
    fn shutdown(&self);
    /// The descriptor to watch for readability (epoll), for callers that receive from an
    /// event loop with [`Transport::try_recv_batch`] instead of blocking in `recv`.
    fn recv_fd(&self) -> std::os::fd::RawFd;
    /// Takes the descriptors already queued, up to `max`, without blocking (MSG_DONTWAIT; the
    /// socket itself stays blocking for `send`). Returns whether it got any.
    fn try_recv_batch(&self, out: &mut Vec<Descriptor>, max: usize)
    -> Result<bool, TransportError>;
}

/// A function's socket in the SOCKHASH.
#[derive(Debug)]
pub struct SkMsgEndpoint {
    stream: TcpStream,
    rx: Mutex<RxBuffer>,
    tx: Mutex<Vec<u8>>,
}

/// Bytes read but not yet decoded: a read returns everything queued, which may end inside a
/// descriptor.
#[derive(Debug)]
struct RxBuffer {
    stream: TcpStream,
    buf: Box<[u8; RX_BUFFER]>,
    start: usize,
    end: usize,
}

/// Up to 64 descriptors per read.
const RX_BUFFER: usize = 64 * DESCRIPTOR_LEN;

impl RxBuffer {
    /// Reads until at least one whole descriptor is buffered.
    fn fill(&mut self) -> Result<(), TransportError> {
        while self.end - self.start < DESCRIPTOR_LEN {
            if self.start > 0 {
                self.buf.copy_within(self.start..self.end, 0);
                self.end -= self.start;
                self.start = 0;
            }
            match self.stream.read(&mut self.buf[self.end..]) {
                Ok(0) => return Err(TransportError::Closed),
                Ok(n) => self.end += n,
                // A blocking sk_msg read returns EAGAIN when a signal (even SIGSTOP/SIGCONT)
                // interrupts its wait for redirected data: wait again.
                Err(e) if matches!(e.kind(), ErrorKind::WouldBlock | ErrorKind::Interrupted) => {}
                Err(e) => return Err(e.into()),
            }
        }
        Ok(())
    }

    /// Reads what is queued without waiting. Returns whether a whole descriptor is buffered.
    fn fill_now(&mut self) -> Result<bool, TransportError> {
        if self.end - self.start >= DESCRIPTOR_LEN {
            return Ok(true);
        }
        if self.start > 0 {
            self.buf.copy_within(self.start..self.end, 0);
            self.end -= self.start;
            self.start = 0;
        }
        match nix::sys::socket::recv(
            self.stream.as_raw_fd(),
            &mut self.buf[self.end..],
            nix::sys::socket::MsgFlags::MSG_DONTWAIT,
        ) {
            Ok(0) => Err(TransportError::Closed),
            Ok(n) => {
                self.end += n;
                Ok(self.end - self.start >= DESCRIPTOR_LEN)
            }
            Err(nix::errno::Errno::EAGAIN | nix::errno::Errno::EINTR) => Ok(false),
            Err(e) => Err(std::io::Error::from(e).into()),
        }
    }

    /// Moves the whole buffered descriptors, up to `max`, into `out`.
    fn drain(&mut self, out: &mut Vec<Descriptor>, max: usize) -> Result<(), TransportError> {
        for _ in 0..max.max(1) {
            if self.end - self.start < DESCRIPTOR_LEN {
                break;
            }
            out.push(self.take()?);
        }
        Ok(())
    }

    fn take(&mut self) -> Result<Descriptor, TransportError> {
        let d = Descriptor::decode(&self.buf[self.start..self.start + DESCRIPTOR_LEN])?;
        self.start += DESCRIPTOR_LEN;
        Ok(d)
    }
}

impl SkMsgEndpoint {
    /// Binds a loopback socket, lets `register` record its local port with the eBPF programs
    /// (directly, or through the control socket), then connects to the hub. When `connect`
    /// returns, sock_ops has already inserted the socket into the SOCKHASH.
    pub fn connect(
        hub: SocketAddr,
        register: impl FnOnce(u16) -> Result<(), TransportError>,
    ) -> Result<Self, TransportError> {
        let socket = socket2::Socket::new(
            socket2::Domain::for_address(hub),
            socket2::Type::STREAM,
            Some(socket2::Protocol::TCP),
        )?;
        let local: SocketAddr = match hub {
            SocketAddr::V4(_) => SocketAddr::from(([127, 0, 0, 1], 0)),
            SocketAddr::V6(_) => SocketAddr::from((std::net::Ipv6Addr::LOCALHOST, 0)),
        };
        socket.bind(&local.into())?;
        let port = socket
            .local_addr()?
            .as_socket()
            .map(|a| a.port())
            .ok_or_else(|| std::io::Error::other("local address is not an inet address"))?;
        register(port)?;
        socket.connect(&hub.into())?;
        let stream: TcpStream = socket.into();
        stream.set_nodelay(true)?;
        let rx = Mutex::new(RxBuffer {
            stream: stream.try_clone()?,
            buf: Box::new([0u8; RX_BUFFER]),
            start: 0,
            end: 0,
        });
        Ok(Self {
            stream,
            rx,
            tx: Mutex::new(Vec::with_capacity(RX_BUFFER)),
        })
    }

    /// The local port this endpoint registered.
    pub fn local_port(&self) -> Result<u16, TransportError> {
        Ok(self.stream.local_addr()?.port())
    }
}

impl Transport for SkMsgEndpoint {
    fn send(&self, desc: &Descriptor) -> Result<(), TransportError> {
        self.send_batch(std::slice::from_ref(desc))
    }

    /// One write for the whole batch: the sk_msg program judges each 16-byte descriptor on
    /// its own, so one write can fan out to several destinations.
    fn send_batch(&self, descs: &[Descriptor]) -> Result<(), TransportError> {
        let mut buf = self.tx.lock().map_err(|_| TransportError::Closed)?;
        buf.clear();
        for d in descs {
            buf.extend_from_slice(&d.encode());
        }
        (&self.stream).write_all(&buf)?;
        Ok(())
    }

    fn recv(&self) -> Result<Descriptor, TransportError> {
        let mut rx = self.rx.lock().map_err(|_| TransportError::Closed)?;
        rx.fill()?;
        rx.take()
    }

    fn recv_batch(&self, out: &mut Vec<Descriptor>, max: usize) -> Result<(), TransportError> {
        let mut rx = self.rx.lock().map_err(|_| TransportError::Closed)?;
        rx.fill()?;
        rx.drain(out, max)
    }

    fn try_recv_batch(
        &self,
        out: &mut Vec<Descriptor>,
        max: usize,
    ) -> Result<bool, TransportError> {
        let mut rx = self.rx.lock().map_err(|_| TransportError::Closed)?;
        if !rx.fill_now()? {
            return Ok(false);
        }
        rx.drain(out, max)?;
        Ok(true)
    }

    fn recv_fd(&self) -> std::os::fd::RawFd {
        self.stream.as_raw_fd()
    }

    fn kind(&self) -> TransportKind {
        TransportKind::SkMsg
    }

    fn shutdown(&self) {
        let _ = self.stream.shutdown(std::net::Shutdown::Both);
    }
}

/// The path of function `id`'s datagram socket under `dir`.
pub fn unix_socket_path(dir: &Path, id: u32) -> PathBuf {
    dir.join(format!("fn-{id}.sock"))
}

/// A function's Unix datagram socket.
#[derive(Debug)]
pub struct UnixEndpoint {
    dir: PathBuf,
    path: PathBuf,
    rx: UnixDatagram,
    /// Connected sockets to each destination, shared (not duplicated) by every send.
    peers: Mutex<HashMap<u32, Arc<UnixDatagram>>>,
}

impl UnixEndpoint {
    /// Binds `<dir>/fn-<id>.sock` (replacing a stale one left by a dead process).
    pub fn bind(dir: &Path, id: u32) -> Result<Self, TransportError> {
        let path = unix_socket_path(dir, id);
        match std::fs::remove_file(&path) {
            Ok(()) => {}
            Err(e) if e.kind() == ErrorKind::NotFound => {}
            Err(e) => return Err(e.into()),
        }
        let rx = UnixDatagram::bind(&path)?;
        Ok(Self {
            dir: dir.to_owned(),
            path,
            rx,
            peers: Mutex::new(HashMap::new()),
        })
    }

    fn peer(&self, dst: u32) -> Result<Arc<UnixDatagram>, TransportError> {
        let mut peers = self.peers.lock().map_err(|_| TransportError::Closed)?;
        if let Some(p) = peers.get(&dst) {
            return Ok(Arc::clone(p));
        }
        let sock = UnixDatagram::unbound()?;
        match sock.connect(unix_socket_path(&self.dir, dst)) {
            Ok(()) => {}
            Err(e) if matches!(e.kind(), ErrorKind::NotFound | ErrorKind::ConnectionRefused) => {
                return Err(TransportError::UnknownDestination(dst));
            }
            Err(e) => return Err(e.into()),
        }
        let sock = Arc::new(sock);
        peers.insert(dst, Arc::clone(&sock));
        Ok(sock)
    }
}

impl Transport for UnixEndpoint {
    fn send(&self, desc: &Descriptor) -> Result<(), TransportError> {
        let bytes = desc.encode();
        for attempt in 0..2 {
            let peer = self.peer(desc.dst)?;
            match peer.send(&bytes) {
                Ok(_) => return Ok(()),
                // The receiver went away (and may have come back at the same path): reconnect once.
                Err(e)
                    if attempt == 0
                        && matches!(
                            e.kind(),
                            ErrorKind::ConnectionRefused | ErrorKind::NotConnected
                        ) =>
                {
                    if let Ok(mut peers) = self.peers.lock() {
                        peers.remove(&desc.dst);
                    }
                }
                Err(e) if matches!(e.kind(), ErrorKind::ConnectionRefused) => {
                    return Err(TransportError::UnknownDestination(desc.dst));
                }
                Err(e) => return Err(e.into()),
            }
        }
        Err(TransportError::UnknownDestination(desc.dst))
    }

    fn recv(&self) -> Result<Descriptor, TransportError> {
        let mut buf = [0u8; DESCRIPTOR_LEN + 1];
        let n = loop {
            match self.rx.recv(&mut buf) {
                Ok(n) => break n,
                Err(e) if e.kind() == ErrorKind::Interrupted => {}
                Err(e) => return Err(e.into()),
            }
        };
        if n == 0 {
            return Err(TransportError::Closed);
        }
        Ok(Descriptor::decode(&buf[..n])?)
    }

    fn recv_batch(&self, out: &mut Vec<Descriptor>, max: usize) -> Result<(), TransportError> {
        out.push(self.recv()?);
        self.try_recv_batch(out, max.saturating_sub(1))?;
        Ok(())
    }

    fn try_recv_batch(
        &self,
        out: &mut Vec<Descriptor>,
        max: usize,
    ) -> Result<bool, TransportError> {
        let mut buf = [0u8; DESCRIPTOR_LEN + 1];
        let mut got = false;
        for _ in 0..max {
            match nix::sys::socket::recv(
                self.rx.as_raw_fd(),
                &mut buf,
                nix::sys::socket::MsgFlags::MSG_DONTWAIT,
            ) {
                // A zero-length datagram is the shutdown wake-up.
                Ok(0) => return Err(TransportError::Closed),
                Ok(n) => {
                    out.push(Descriptor::decode(&buf[..n])?);
                    got = true;
                }
                Err(nix::errno::Errno::EINTR) => {}
                Err(_) => break,
            }
        }
        Ok(got)
    }

    fn recv_fd(&self) -> std::os::fd::RawFd {
        self.rx.as_raw_fd()
    }

    fn kind(&self) -> TransportKind {
        TransportKind::Unix
    }

    fn shutdown(&self) {
        // A zero-length datagram to ourselves wakes the receiver.
        let _ = self.rx.send_to(&[], &self.path);
    }
}

impl Drop for UnixEndpoint {
    fn drop(&mut self) {
        let _ = std::fs::remove_file(&self.path);
    }
}

#[cfg(test)]
pub(crate) mod tests {
    use super::*;

    fn desc(dst: u32, slot: u32) -> Descriptor {
        Descriptor {
            dst,
            slot,
            len: 3,
            generation: 9,
        }
    }

    #[test]
    fn unix_endpoints_exchange_descriptors_in_order() {
        let dir = tempdir();
        let a = UnixEndpoint::bind(&dir, 1).expect("bind a");
        let b = std::sync::Arc::new(UnixEndpoint::bind(&dir, 2).expect("bind b"));
        let reader = {
            let b = std::sync::Arc::clone(&b);
            std::thread::spawn(move || {
                (0..1000)
                    .map(|_| b.recv().expect("recv").slot)
                    .collect::<Vec<_>>()
            })
        };
        for i in 0..1000 {
            a.send(&desc(2, i)).expect("send");
        }
        let got = reader.join().expect("join");
        assert_eq!(got, (0..1000).collect::<Vec<_>>());
    }

    #[test]
    fn unix_unknown_destination_is_an_error() {
        let dir = tempdir();
        let a = UnixEndpoint::bind(&dir, 1).expect("bind");
        assert!(matches!(
            a.send(&desc(7, 0)),
            Err(TransportError::UnknownDestination(7))
        ));
    }

    #[test]
    fn unix_shutdown_wakes_the_receiver() {
        let dir = tempdir();
        let a = std::sync::Arc::new(UnixEndpoint::bind(&dir, 1).expect("bind"));
        let a2 = std::sync::Arc::clone(&a);
        let t = std::thread::spawn(move || a2.recv());
        std::thread::sleep(std::time::Duration::from_millis(20));
        a.shutdown();
        assert!(matches!(
            t.join().expect("join"),
            Err(TransportError::Closed)
        ));
    }

    #[test]
    fn choice_parses() {
        assert_eq!("auto".parse(), Ok(TransportChoice::Auto));
        assert_eq!(
            "sk_msg".parse(),
            Ok(TransportChoice::Only(TransportKind::SkMsg))
        );
        assert!("tcp".parse::<TransportChoice>().is_err());
    }

    pub(crate) fn tempdir() -> PathBuf {
        let d =
            std::env::temp_dir().join(format!("spright-t-{}-{}", std::process::id(), uuid_like()));
        std::fs::create_dir_all(&d).expect("mkdir");
        d
    }

    fn uuid_like() -> u64 {
        use std::sync::atomic::{AtomicU64, Ordering};
        static N: AtomicU64 = AtomicU64::new(0);
        N.fetch_add(1, Ordering::Relaxed)
    }
}
