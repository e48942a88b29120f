//! Holding requests cheaply. A request for a revision without a free pod can wait for
//! minutes; a full HTTP/1 server connection keeps two 8 KiB buffers the whole time. So a
//! new connection's first request head is read into a small buffer and parsed here; if it
//! targets a known revision, its pod slot is acquired *before* the connection is handed
//! to hyper (which replays the buffered bytes through [`Rewind`]). While waiting, a
//! client that hangs up frees its place in the queue at once.

use std::io;

use bytes::BytesMut;
use tokio::io::AsyncReadExt;
use tokio::net::TcpStream;

use crate::manifests::RevisionKey;

/// Largest request head parsed here; bigger ones go to hyper unparsed.
pub const MAX_HEAD: usize = 16 * 1024;

/// What the first request head says.
#[derive(Debug, PartialEq, Eq)]
pub enum Head {
    /// A request for this revision that is not a probe.
    Revision(RevisionKey),
    /// Anything else (probes, health checks, unknown targets, HTTP/2): hyper handles it.
    Other,
    /// Incomplete: read more.
    Partial,
}

/// Classifies a (possibly partial) request head.
pub fn classify(buf: &[u8]) -> Head {
    match crate::fast::parse_request(buf, None) {
        crate::fast::Parsed::Partial => Head::Partial,
        crate::fast::Parsed::Fast(r) => Head::Revision(r.key),
        crate::fast::Parsed::Slow(h) => h,
    }
}

/// Reads until the request head at the start of `buf` is complete (or clearly not ours)
/// and parses it for the fast path (`peer`, `spare`: see
/// [`crate::fast::parse_request_into`]). `Ok(None)`: the client closed before a head.
pub async fn read_request(
    stream: &mut TcpStream,
    buf: &mut BytesMut,
    peer: Option<&[u8]>,
    spare: &mut Vec<u8>,
) -> io::Result<Option<crate::fast::Parsed>> {
    loop {
        if !buf.is_empty() {
            match crate::fast::parse_request_into(buf, peer, spare) {
                crate::fast::Parsed::Partial => {}
                p => return Ok(Some(p)),
            }
        }
        if buf.capacity() - buf.len() < 256 {
            let grow = buf.capacity().max(512);
            buf.reserve(grow);
        }
        if stream.read_buf(buf).await? == 0 {
            return Ok(None);
        }
    }
}

/// Resolves when the client has closed its side (or the socket failed). Pending forever
/// once the client sends more bytes (a body or a pipelined request): those stay in the
/// socket for hyper.
pub async fn client_gone(stream: &TcpStream) {
    let mut one = [0u8; 1];
    match stream.peek(&mut one).await {
        Ok(0) | Err(_) => {}
        Ok(_) => std::future::pending::<()>().await,
    }
}

/// A stream that first yields bytes already read from it.
pub type Rewind = spright_core::http1::Rewind<TcpStream>;

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn classifies_heads() {
        let r = |s: &str| classify(s.as_bytes());
        assert_eq!(
            r(
                "GET / HTTP/1.1\r\nKnative-Serving-Namespace: ns\r\nKnative-Serving-Revision: rev\r\n\r\n"
            ),
            Head::Revision(RevisionKey::new("ns", "rev"))
        );
        assert_eq!(
            r("GET / HTTP/1.1\r\nHost: rev.ns.svc.cluster.local\r\n\r\n"),
            Head::Revision(RevisionKey::new("ns", "rev"))
        );
        assert_eq!(r("GET / HTTP/1.1\r\nHost: rev.ns"), Head::Partial);
        assert_eq!(r("GET / HTTP/1.1\r\nHost: localhost\r\n\r\n"), Head::Other);
        assert_eq!(
            r(
                "GET / HTTP/1.1\r\nHost: rev.ns.svc.cluster.local\r\nK-Network-Probe: activator\r\n\r\n"
            ),
            Head::Other
        );
        assert_eq!(
            r(
                "GET / HTTP/1.1\r\nHost: rev.ns.svc.cluster.local\r\nUser-Agent: kube-probe/1.31\r\n\r\n"
            ),
            Head::Other
        );
        assert_eq!(r("PRI * HTTP/2.0\r\n\r\nSM\r\n\r\n"), Head::Other);
        assert_eq!(r("PR"), Head::Partial);
        assert_eq!(r("\x00\x01garbage\r\n\r\n"), Head::Other);
    }
}
