//! The control protocol between the pool owner (the gateway) and function processes.
//!
//! One SOCK_SEQPACKET Unix socket per function, at `<run_dir>/control.sock`: every message is
//! one packet of JSON, so no framing is needed, and the owner learns that a function died
//! from the end of its connection. The exchange:
//!
//! ```text
//! function                                   owner
//!   Hello {function, pid}            ->
//!                                    <-      Welcome {id, transport, hub, ...} + pool memfd
//!   (sk_msg: bind a loopback port)
//!   Register {port}                  ->      (puts port -> id into the eBPF map)
//!                                    <-      Registered
//!   (sk_msg: connect to the hub; sock_ops inserts the socket into the SOCKHASH)
//!   Attached                         ->      (the function now receives descriptors)
//!   ... the connection stays open for the function's lifetime ...
//! ```

use std::io::{IoSlice, IoSliceMut};
use std::os::fd::{AsRawFd, BorrowedFd, FromRawFd, OwnedFd, RawFd};
use std::path::{Path, PathBuf};

use nix::sys::socket::{
    AddressFamily, ControlMessage, ControlMessageOwned, MsgFlags, SockFlag, SockType, UnixAddr,
    recvmsg, sendmsg,
};
use serde::{Deserialize, Serialize};
use thiserror::Error;

use crate::chain::RoutingTable;
use crate::transport::TransportKind;

/// Largest control packet.
const MAX_PACKET: usize = 256 * 1024;

/// Control protocol errors.
#[derive(Debug, Error)]
pub enum ControlError {
    #[error("control socket {path}: {source}")]
    Connect { path: PathBuf, source: nix::Error },
    #[error("control socket I/O: {0}")]
    Io(#[from] nix::Error),
    #[error("the peer closed the control connection")]
    Closed,
    #[error("malformed control message: {0}")]
    Malformed(String),
    #[error("the dataplane refused the function: {0}")]
    Rejected(String),
    #[error("expected {expected}, got {got}")]
    Unexpected { expected: &'static str, got: String },
}

/// Messages from a function to the owner.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum FunctionMessage {
    Hello { function: String, pid: u32 },
    Register { port: Option<u16> },
    Attached,
}

/// Messages from the owner to a function.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum OwnerMessage {
    /// Accompanied by the pool's file descriptor.
    Welcome(Welcome),
    Registered,
    Reject {
        reason: String,
    },
}

/// What a function learns when it joins.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Welcome {
    pub id: u32,
    pub transport: TransportKind,
    /// The hub listener to connect to (sk_msg).
    pub hub: Option<std::net::SocketAddr>,
    /// The directory of the datagram sockets (unix).
    pub unix_dir: Option<PathBuf>,
    pub routing: RoutingTable,
}

/// One end of a control connection.
#[derive(Debug)]
pub struct ControlConn {
    fd: OwnedFd,
}

impl ControlConn {
    /// Wraps an accepted or connected SOCK_SEQPACKET socket.
    pub fn from_fd(fd: OwnedFd) -> Self {
        Self { fd }
    }

    /// Connects to the owner's control socket.
    pub fn connect(path: &Path) -> Result<Self, ControlError> {
        let (fd, addr) = seqpacket(path)?;
        nix::sys::socket::connect(fd.as_raw_fd(), &addr).map_err(connect_error(path))?;
        Ok(Self { fd })
    }

    /// Sends one message, optionally with a file descriptor.
    pub fn send<T: Serialize>(
        &self,
        msg: &T,
        fd: Option<BorrowedFd<'_>>,
    ) -> Result<(), ControlError> {
        let bytes = serde_json::to_vec(msg).map_err(|e| ControlError::Malformed(e.to_string()))?;
        let iov = [IoSlice::new(&bytes)];
        let raw: [RawFd; 1];
        let cmsgs: Vec<ControlMessage<'_>> = match fd {
            Some(f) => {
                raw = [f.as_raw_fd()];
                vec![ControlMessage::ScmRights(&raw)]
            }
            None => Vec::new(),
        };
        sendmsg::<()>(
            self.fd.as_raw_fd(),
            &iov,
            &cmsgs,
            MsgFlags::MSG_NOSIGNAL,
            None,
        )?;
        Ok(())
    }

    /// Receives one message and the file descriptor that came with it, if any. Blocks.
    pub fn recv<T: for<'de> Deserialize<'de>>(&self) -> Result<(T, Option<OwnedFd>), ControlError> {
        let mut buf = vec![0u8; MAX_PACKET];
        let mut cmsg = nix::cmsg_space!([RawFd; 4]);
        let (n, fd) = {
            let mut iov = [IoSliceMut::new(&mut buf)];
            let msg = recvmsg::<()>(
                self.fd.as_raw_fd(),
                &mut iov,
                Some(&mut cmsg),
                MsgFlags::MSG_CMSG_CLOEXEC,
            )?;
            let mut fd = None;
            for c in msg.cmsgs()? {
                if let ControlMessageOwned::ScmRights(fds) = c {
                    for (i, raw) in fds.into_iter().enumerate() {
                        // SAFETY: the kernel just installed this descriptor in our table for
                        // us (SCM_RIGHTS); nothing else owns it.
                        let owned = unsafe { OwnedFd::from_raw_fd(raw) };
                        if i == 0 && fd.is_none() {
                            fd = Some(owned);
                        }
                    }
                }
            }
            (msg.bytes, fd)
        };
        if n == 0 {
            return Err(ControlError::Closed);
        }
        let value = serde_json::from_slice(&buf[..n])
            .map_err(|e| ControlError::Malformed(format!("{e} in {n}-byte packet")))?;
        Ok((value, fd))
    }

    /// Shuts the connection down in both directions (wakes a blocked `recv`).
    pub fn shutdown(&self) {
        let _ = nix::sys::socket::shutdown(self.fd.as_raw_fd(), nix::sys::socket::Shutdown::Both);
    }
}

/// The error for a control socket at `path`.
fn connect_error(path: &Path) -> impl Fn(nix::Error) -> ControlError + Copy + '_ {
    move |source| ControlError::Connect {
        path: path.to_owned(),
        source,
    }
}

/// A new SOCK_SEQPACKET Unix socket and the address of `path`.
fn seqpacket(path: &Path) -> Result<(OwnedFd, UnixAddr), ControlError> {
    let fd = nix::sys::socket::socket(
        AddressFamily::Unix,
        SockType::SeqPacket,
        SockFlag::SOCK_CLOEXEC,
        None,
    )
    .map_err(connect_error(path))?;
    let addr = UnixAddr::new(path).map_err(connect_error(path))?;
    Ok((fd, addr))
}

/// The owner's listening control socket.
#[derive(Debug)]
pub struct ControlListener {
    fd: OwnedFd,
    path: PathBuf,
}

impl ControlListener {
    /// Binds `path` (replacing a stale socket file).
    pub fn bind(path: &Path) -> Result<Self, ControlError> {
        let map = connect_error(path);
        let _ = std::fs::remove_file(path);
        let (fd, addr) = seqpacket(path)?;
        nix::sys::socket::bind(fd.as_raw_fd(), &addr).map_err(map)?;
        nix::sys::socket::listen(&fd, nix::sys::socket::Backlog::new(128).map_err(map)?)
            .map_err(map)?;
        Ok(Self {
            fd,
            path: path.to_owned(),
        })
    }

    /// Accepts one function connection. Blocks.
    pub fn accept(&self) -> Result<ControlConn, ControlError> {
        let raw = nix::sys::socket::accept4(self.fd.as_raw_fd(), SockFlag::SOCK_CLOEXEC)?;
        // SAFETY: accept4 returned a new descriptor that nothing else owns.
        Ok(ControlConn::from_fd(unsafe { OwnedFd::from_raw_fd(raw) }))
    }

    /// Wakes a thread blocked in `accept` (it then gets an error).
    pub fn shutdown(&self) {
        let _ = nix::sys::socket::shutdown(self.fd.as_raw_fd(), nix::sys::socket::Shutdown::Both);
    }
}

impl Drop for ControlListener {
    fn drop(&mut self) {
        let _ = std::fs::remove_file(&self.path);
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn messages_and_fds_cross_the_socket() {
        let dir = crate::transport::tests::tempdir();
        let path = dir.join("control.sock");
        let listener = ControlListener::bind(&path).expect("bind");
        let client = std::thread::spawn({
            let path = path.clone();
            move || {
                let c = ControlConn::connect(&path).expect("connect");
                c.send(
                    &FunctionMessage::Hello {
                        function: "f".into(),
                        pid: 1,
                    },
                    None,
                )
                .expect("send");
                let (m, fd): (OwnerMessage, _) = c.recv().expect("recv");
                (m, fd.is_some())
            }
        });
        let conn = listener.accept().expect("accept");
        let (hello, fd): (FunctionMessage, _) = conn.recv().expect("recv hello");
        assert!(fd.is_none());
        assert_eq!(
            hello,
            FunctionMessage::Hello {
                function: "f".into(),
                pid: 1
            }
        );
        let file = std::fs::File::open("/dev/null").expect("open");
        conn.send(
            &OwnerMessage::Registered,
            Some(std::os::fd::AsFd::as_fd(&file)),
        )
        .expect("send");
        let (m, had_fd) = client.join().expect("join");
        assert_eq!(m, OwnerMessage::Registered);
        assert!(had_fd);
        drop(conn);
    }

    #[test]
    fn garbage_is_a_clear_error_and_eof_is_closed() {
        let dir = crate::transport::tests::tempdir();
        let path = dir.join("control.sock");
        let listener = ControlListener::bind(&path).expect("bind");
        let c = ControlConn::connect(&path).expect("connect");
        let s = listener.accept().expect("accept");
        nix::sys::socket::send(c.fd.as_raw_fd(), b"{not json", MsgFlags::empty()).expect("send");
        let err = s.recv::<FunctionMessage>().expect_err("garbage");
        assert!(matches!(err, ControlError::Malformed(_)), "{err}");
        drop(c);
        assert!(matches!(
            s.recv::<FunctionMessage>(),
            Err(ControlError::Closed)
        ));
    }
}
