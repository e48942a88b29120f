//! The plain HTTP/1.1 fast path of the serving port. An ordinary proxied request costs what
//! it costs nginx: its head is parsed once and rewritten into the bytes for the user
//! container ([`crate::h1`]), sent in one write on a pooled keep-alive connection, and the
//! response head is rewritten while its body passes through in its own framing. No header
//! map, no hyper connection task on either side, no channel between tasks.
//!
//! Every behaviour of the handler chain that applies to such a request is kept: drain
//! tracking, `K-Proxy-Request` accounting, the breaker (503 when full, arrival order), the
//! three timeouts (504 before the response starts, `request timeout` in the body after),
//! request metrics, the sniffed `Content-Type`, 502 on upstream errors. Anything the fast
//! path does not cover ([`crate::h1::Parsed::Slow`]: probes, h2c, upgrades, streamed
//! bodies, malformed input, and every request when request logs are on) hands the
//! connection, with the bytes already read, to the hyper path for the rest of its life.

use std::io;
use std::net::SocketAddr;
use std::sync::{Arc, Mutex, MutexGuard, PoisonError};
use std::time::{Duration, Instant as StdInstant, SystemTime};

use bytes::{Buf, BytesMut};
use http::StatusCode;
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::TcpStream;
use tokio::sync::watch;
use tokio::time::Instant;

use spright_core::http1::{BodyCursor, FastResponse, Framing};

use crate::body::TEXT_PLAIN;
use crate::chain::{Chain, Guard};
use crate::h1::{self, Parsed, ParsedResponse};
use crate::server::Wrap;
use crate::timeout::MESSAGE;

/// Idle upstream connections older than this are closed (Go's `IdleConnTimeout`).
const IDLE_TIMEOUT: Duration = Duration::from_secs(90);
const READ_CHUNK: usize = 8 * 1024;

/// Idle keep-alive connections to the user container, most recently used first.
#[derive(Debug)]
struct Pool {
    addr: SocketAddr,
    max_idle: usize,
    idle: Mutex<Vec<(TcpStream, StdInstant)>>,
}

/// A pooled connection is usable if reading it would block: not closed, no stray bytes.
/// (The read also clears the socket's stale readiness, so the response read that follows
/// the request waits without a syscall.)
fn looks_open(s: &TcpStream) -> bool {
    let mut one = [0u8; 1];
    matches!(s.try_read(&mut one), Err(e) if e.kind() == io::ErrorKind::WouldBlock)
}

impl Pool {
    fn lock(&self) -> MutexGuard<'_, Vec<(TcpStream, StdInstant)>> {
        self.idle.lock().unwrap_or_else(PoisonError::into_inner)
    }

    fn take(&self) -> Option<TcpStream> {
        let mut idle = self.lock();
        while let Some((s, since)) = idle.pop() {
            if since.elapsed() > IDLE_TIMEOUT {
                // Everything below is older still.
                idle.clear();
                return None;
            }
            if looks_open(&s) {
                return Some(s);
            }
        }
        None
    }

    fn put(&self, s: TcpStream) {
        let mut idle = self.lock();
        if idle.len() >= self.max_idle {
            if self.max_idle == 0 {
                return;
            }
            idle.remove(0);
        }
        idle.push((s, StdInstant::now()));
    }

    async fn connect(&self) -> Result<TcpStream, String> {
        let s = TcpStream::connect(self.addr)
            .await
            .map_err(|_| format!("dial tcp {}: connect: connection refused", self.addr))?;
        let _ = s.set_nodelay(true);
        Ok(s)
    }
}

/// The serving port's connection handling: the fast path first, hyper for the rest.
#[derive(Clone, Debug)]
pub struct Fast(Arc<Inner>);

#[derive(Debug)]
struct Inner {
    chain: Arc<Chain>,
    pool: Pool,
}

impl Fast {
    pub fn new(chain: Arc<Chain>, user_port: u16, max_idle: usize) -> Self {
        Self(Arc::new(Inner {
            chain,
            pool: Pool {
                addr: SocketAddr::from(([127, 0, 0, 1], user_port)),
                max_idle,
                idle: Mutex::new(Vec::new()),
            },
        }))
    }
}

impl Wrap for Fast {
    type Io = Rewind;

    /// Serves fast-path requests until the connection ends (`None`) or a request needs
    /// hyper (the stream, replaying what was read).
    async fn wrap(
        &self,
        mut s: TcpStream,
        peer: SocketAddr,
        mut stop: watch::Receiver<bool>,
    ) -> Option<Rewind> {
        let mut buf = BytesMut::new();
        let mut ubuf = BytesMut::new();
        let stopped = stop.wait_for(|s| *s);
        tokio::pin!(stopped);
        loop {
            let parsed = loop {
                if !buf.is_empty() {
                    match h1::parse_request(&buf, peer.ip()) {
                        // A head in pieces: hyper's header-read timeout applies to it.
                        Parsed::Partial => break Parsed::Slow,
                        p => break p,
                    }
                }
                if buf.capacity() < 1024 {
                    buf.reserve(4096);
                }
                tokio::select! {
                    biased;
                    r = s.read_buf(&mut buf) => match r {
                        Ok(0) | Err(_) => return None,
                        Ok(_) => {}
                    },
                    // Shutdown closes idle connections.
                    _ = &mut stopped => return None,
                }
            };
            match parsed {
                Parsed::Fast(req) => {
                    if !self.0.serve(&mut s, &mut buf, &mut ubuf, req).await {
                        return None;
                    }
                }
                Parsed::Slow | Parsed::Partial => return Some(Rewind::new(buf.freeze(), s)),
            }
        }
    }
}

/// Resolves when the client has closed its side (or the socket failed); pending while it
/// is open, also once it sends more (a pipelined request stays in the socket).
async fn client_gone(s: &TcpStream) {
    let mut one = [0u8; 1];
    match s.peek(&mut one).await {
        Ok(0) | Err(_) => {}
        Ok(_) => std::future::pending::<()>().await,
    }
}

fn http_date() -> String {
    httpdate::fmt_http_date(SystemTime::now())
}

/// An answer of our own, as the hyper path writes it (`body::error` with `nosniff`,
/// `body::text` without).
fn canned(status: StatusCode, body: &str, nosniff: bool, close: bool) -> Vec<u8> {
    use std::io::Write as _;
    let mut out = Vec::with_capacity(160 + body.len());
    let _ = write!(
        out,
        "HTTP/1.1 {} {}\r\ncontent-type: {TEXT_PLAIN}\r\n{}content-length: {}\r\n{}date: {}\r\n\r\n{body}",
        status.as_u16(),
        status.canonical_reason().unwrap_or(""),
        if nosniff {
            "x-content-type-options: nosniff\r\n"
        } else {
            ""
        },
        body.len(),
        if close { "connection: close\r\n" } else { "" },
        http_date(),
    );
    out
}

/// `head` without its `content-length` lines.
fn without_length(head: &[u8]) -> Vec<u8> {
    let mut out = Vec::with_capacity(head.len());
    for line in head.split_inclusive(|&b| b == b'\n') {
        if !line
            .get(..15)
            .is_some_and(|n| n.eq_ignore_ascii_case(b"content-length:"))
        {
            out.extend_from_slice(line);
        }
    }
    out
}

enum Failed {
    Upstream(String),
    Timeout,
}

/// The earliest of `total` and `idle` from now.
fn body_deadline(total: Instant, idle: Option<Duration>) -> Instant {
    idle.map_or(total, |i| total.min(Instant::now() + i))
}

impl Inner {
    /// Sends `out` on a pooled or new connection and reads the response head into `ubuf`.
    async fn exchange(
        &self,
        out: &[u8],
        ubuf: &mut BytesMut,
        head_method: bool,
        replayable: bool,
    ) -> Result<(TcpStream, FastResponse), String> {
        let mut pooled = self.pool.take();
        loop {
            let reused = pooled.is_some();
            let mut s = match pooled.take() {
                Some(s) => s,
                None => self.pool.connect().await?,
            };
            ubuf.clear();
            if let Err(e) = s.write_all(out).await {
                if reused {
                    pooled = self.pool.take();
                    continue;
                }
                return Err(e.to_string());
            }
            loop {
                match h1::parse_response(ubuf, head_method) {
                    Ok(ParsedResponse::Complete(r)) => return Ok((s, r)),
                    Ok(ParsedResponse::Interim(n)) => {
                        ubuf.advance(n);
                        continue;
                    }
                    Ok(ParsedResponse::Partial) => {}
                    Err(e) => return Err(e.to_string()),
                }
                // A reused connection the user container closed meanwhile: Go's transport
                // sends an idempotent request again.
                let retry = reused && replayable && ubuf.is_empty();
                if ubuf.capacity() - ubuf.len() < 1024 {
                    ubuf.reserve(READ_CHUNK);
                }
                match s.read_buf(ubuf).await {
                    Ok(0) if retry => break,
                    Ok(0) => return Err("EOF".to_owned()),
                    Ok(_) => {}
                    Err(_) if retry => break,
                    Err(e) => return Err(e.to_string()),
                }
            }
            pooled = self.pool.take();
        }
    }

    /// Serves one request; false when the client connection is done.
    async fn serve(
        &self,
        client: &mut TcpStream,
        buf: &mut BytesMut,
        ubuf: &mut BytesMut,
        req: h1::FastRequest,
    ) -> bool {
        let total = req.head_len + req.body_len;
        while buf.len() < total {
            buf.reserve(total - buf.len());
            match client.read_buf(buf).await {
                Ok(0) | Err(_) => return false,
                Ok(_) => {}
            }
        }
        let chain = &self.chain;
        chain.drainer.touch();
        let std_start = StdInstant::now();
        let start = Instant::from_std(std_start);
        let mut out = req.out;
        out.extend_from_slice(&buf[req.head_len..total]);
        buf.advance(total);
        chain.accounting.arrival(req.proxied, std_start);
        let mut guard = Guard {
            accounting: Arc::clone(&chain.accounting),
            proxied: req.proxied,
            metrics: None,
            _ticket: None,
        };
        if let Some(b) = &chain.breaker {
            match b.enter() {
                Ok(t) => guard._ticket = Some(t),
                Err(_) => {
                    drop(guard);
                    let msg = format!("{}\n", crate::breaker::QUEUE_FULL);
                    let r = canned(StatusCode::SERVICE_UNAVAILABLE, &msg, true, req.close);
                    return client.write_all(&r).await.is_ok() && !req.close;
                }
            }
        }
        let answer = async {
            if let Some(t) = guard._ticket.as_mut() {
                t.wait().await;
            }
            if let Some(m) = &chain.metrics {
                if let Some(b) = &chain.breaker {
                    m.set_queue_depth(b.in_flight());
                }
                guard.metrics = Some((Arc::clone(m), StdInstant::now(), 200));
            }
            self.exchange(&out, ubuf, req.head_method, req.replayable)
                .await
                .map_err(Failed::Upstream)
        };
        let answer = tokio::select! {
            biased;
            r = answer => r,
            () = chain.timers.sleep_until(chain.timeouts.before_start(start)) => Err(Failed::Timeout),
            () = client_gone(client) => return false,
        };
        let (up, resp) = match answer {
            Ok(x) => x,
            Err(f) => {
                let (status, r) = match f {
                    Failed::Timeout => (
                        StatusCode::GATEWAY_TIMEOUT,
                        canned(StatusCode::GATEWAY_TIMEOUT, MESSAGE, false, req.close),
                    ),
                    Failed::Upstream(e) => {
                        tracing::error!(error = %e, "error reverse proxying request");
                        let msg = format!("{e}\n");
                        (
                            StatusCode::BAD_GATEWAY,
                            canned(StatusCode::BAD_GATEWAY, &msg, true, req.close),
                        )
                    }
                };
                if let Some(m) = guard.metrics.as_mut() {
                    m.2 = status.as_u16();
                }
                drop(guard);
                return client.write_all(&r).await.is_ok() && !req.close;
            }
        };
        if let Some(m) = guard.metrics.as_mut() {
            m.2 = resp.status;
        }
        self.relay(client, up, ubuf, resp, req.close, start, guard)
            .await
    }

    /// Writes the response head and passes the body through; false when the client
    /// connection is done.
    #[allow(clippy::too_many_arguments)]
    async fn relay(
        &self,
        client: &mut TcpStream,
        mut up: TcpStream,
        ubuf: &mut BytesMut,
        resp: FastResponse,
        req_close: bool,
        start: Instant,
        guard: Guard,
    ) -> bool {
        let chain = &self.chain;
        let total_deadline = start + chain.timeouts.total;
        let idle = chain.timeouts.idle;
        ubuf.advance(resp.head_len);
        let close = req_close || resp.framing == Framing::UntilClose;
        let mut head = resp.out;
        if resp.sniff {
            let sniffed = match resp.framing {
                Framing::Length(n) if n > 0 => {
                    // Like Go's server, the head waits for the first bytes.
                    if ubuf.is_empty() {
                        if ubuf.capacity() < 1024 {
                            ubuf.reserve(READ_CHUNK);
                        }
                        let read = tokio::select! {
                            biased;
                            r = up.read_buf(ubuf) => Some(r),
                            () = chain.timers.sleep_until(body_deadline(total_deadline, idle)) => None,
                        };
                        match read {
                            Some(Ok(n)) if n > 0 => {}
                            Some(_) => {
                                tracing::error!("error reading the user container's response");
                                drop(guard);
                                let msg = "unexpected EOF\n";
                                let r = canned(StatusCode::BAD_GATEWAY, msg, true, req_close);
                                return client.write_all(&r).await.is_ok() && !req_close;
                            }
                            None => {
                                // The status is the user container's; Knative's timeout
                                // message becomes the body.
                                drop(guard);
                                let mut r = without_length(&head);
                                r.extend_from_slice(
                                    format!(
                                        "content-type: {TEXT_PLAIN}\r\ncontent-length: {}\r\n",
                                        MESSAGE.len()
                                    )
                                    .as_bytes(),
                                );
                                finish_head(&mut r, resp.dated, req_close);
                                r.extend_from_slice(MESSAGE.as_bytes());
                                return client.write_all(&r).await.is_ok() && !req_close;
                            }
                        }
                    }
                    let n = usize::try_from(n).unwrap_or(usize::MAX).min(ubuf.len());
                    Some(spright_core::sniff::detect(&ubuf[..n]))
                }
                Framing::Chunked => h1::first_chunk_data(ubuf).map(spright_core::sniff::detect),
                Framing::UntilClose if !ubuf.is_empty() => Some(spright_core::sniff::detect(ubuf)),
                _ => None,
            };
            if let Some(ct) = sniffed {
                head.extend_from_slice(b"content-type: ");
                head.extend_from_slice(ct.as_bytes());
                head.extend_from_slice(b"\r\n");
            }
        }
        finish_head(&mut head, resp.dated, close);
        let body = pass_body(
            &mut up,
            client,
            ubuf,
            head,
            resp.framing,
            (chain, total_deadline, idle),
        )
        .await;
        drop(guard);
        match body {
            Ok(Passed::Complete) => {
                if resp.reusable && ubuf.is_empty() {
                    self.pool.put(up);
                }
                !close
            }
            Ok(Passed::TimedOut) => !close,
            Ok(Passed::Closed) | Err(_) => false,
        }
    }
}

fn finish_head(head: &mut Vec<u8>, dated: bool, close: bool) {
    if !dated {
        head.extend_from_slice(b"date: ");
        head.extend_from_slice(http_date().as_bytes());
        head.extend_from_slice(b"\r\n");
    }
    if close {
        head.extend_from_slice(b"connection: close\r\n");
    }
    head.extend_from_slice(b"\r\n");
}

/// How a passed-through body ended.
enum Passed {
    /// In its framing: the upstream connection can be reused.
    Complete,
    /// Cut by a revision timeout, with Knative's message as its last chunk.
    TimedOut,
    /// Close-delimited (or cut mid-chunk): the client connection closes.
    Closed,
}

/// Writes `head` plus the body bytes in `ubuf`, then relays the rest of the body from
/// `up` as it arrives (each read written at once: streaming is flushed), under the total
/// and idle deadlines.
async fn pass_body(
    up: &mut TcpStream,
    client: &mut TcpStream,
    ubuf: &mut BytesMut,
    head: Vec<u8>,
    framing: Framing,
    (chain, total, idle): (&Chain, Instant, Option<Duration>),
) -> io::Result<Passed> {
    let mut cursor = BodyCursor::new(framing);
    let mut complete = cursor.pass(client, ubuf, Some(head)).await?;
    while !complete {
        ubuf.clear();
        if ubuf.capacity() < 1024 {
            ubuf.reserve(READ_CHUNK);
        }
        let read = tokio::select! {
            biased;
            r = up.read_buf(ubuf) => Some(r?),
            () = chain.timers.sleep_until(body_deadline(total, idle)) => None,
        };
        let Some(got) = read else {
            // Knative ends the response with its timeout message.
            return match framing {
                Framing::Chunked if cursor.at_chunk_boundary() => {
                    let end = format!("{:x}\r\n{MESSAGE}\r\n0\r\n\r\n", MESSAGE.len());
                    client.write_all(end.as_bytes()).await?;
                    Ok(Passed::TimedOut)
                }
                Framing::UntilClose => {
                    client.write_all(MESSAGE.as_bytes()).await?;
                    Ok(Passed::Closed)
                }
                _ => Ok(Passed::Closed),
            };
        };
        if got == 0 {
            return cursor
                .upstream_closed("the user container closed mid-body")
                .map(|()| Passed::Closed);
        }
        complete = cursor.pass(client, ubuf, None).await?;
    }
    Ok(Passed::Complete)
}

/// A client stream that first yields the bytes the fast path already read from it.
pub type Rewind = spright_core::http1::Rewind<TcpStream>;

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn canned_answers_look_like_hypers() {
        let r =
            String::from_utf8(canned(StatusCode::BAD_GATEWAY, "EOF\n", true, false)).expect("utf8");
        assert!(r.starts_with("HTTP/1.1 502 Bad Gateway\r\n"), "{r}");
        assert!(r.contains("content-type: text/plain; charset=utf-8\r\n"));
        assert!(r.contains("x-content-type-options: nosniff\r\n"));
        assert!(r.contains("content-length: 4\r\n"));
        assert!(r.contains("\r\ndate: "));
        assert!(r.ends_with("\r\n\r\nEOF\n"));
        let r = String::from_utf8(canned(StatusCode::GATEWAY_TIMEOUT, MESSAGE, false, true))
            .expect("utf8");
        assert!(!r.contains("nosniff") && r.contains("connection: close\r\n"));
    }

    #[test]
    fn length_lines_dropped() {
        assert_eq!(
            without_length(b"HTTP/1.1 200 OK\r\nContent-Length: 5\r\nx-a: 1\r\n"),
            b"HTTP/1.1 200 OK\r\nx-a: 1\r\n"
        );
    }
}
