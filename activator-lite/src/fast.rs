//! The plain HTTP/1.1 fast path: the common request (HTTP/1.1, a known revision,
//! no upgrade, no `Expect`, a body of known length up to [`MAX_FAST_BODY`]) is proxied
//! as bytes, the way nginx does it: the request head is parsed once with `httparse` and
//! rewritten straight into the outgoing buffer (Knative's header rules, the same as
//! [`crate::handler::rewrite_request_headers`]), sent on a pooled keep-alive connection
//! to the pod, and the response head is rewritten (hop-by-hop headers dropped, and the
//! `Content-Type` Go's server would sniff added when there is none: [`sniff_type`]) while
//! its body is passed through in its own framing (length, chunked, or until close).
//! No header map, no per-connection client task, no channel between tasks.
//!
//! Anything else (probes, health checks, HTTP/2, upgrades, chunked or large request
//! bodies) goes to the hyper path in [`crate::handler`], which then owns
//! the connection for the rest of its life.

use std::collections::HashMap;
use std::io;
use std::net::{IpAddr, SocketAddr};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use bytes::{Buf, BytesMut};
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::TcpStream;
use tokio::time::Instant;

use spright_core::http1::{BodyCursor, ResponseRules, is_in, lists, push_header, visible_ascii};
pub use spright_core::http1::{FastResponse, Framing, ParsedResponse, ResponseError};
use spright_core::sniff;

use crate::admission::{Head, MAX_HEAD, client_gone};
use crate::handler::{Admission, HOP_BY_HOP, RequestError, first_byte_timeout};
use crate::manifests::RevisionKey;

/// Largest request body the fast path buffers; bigger (or chunked) bodies are streamed
/// by the hyper path.
pub const MAX_FAST_BODY: usize = 64 * 1024;
const MAX_HEADERS: usize = 64;
/// Largest response head accepted from a pod.
const MAX_RESPONSE_HEAD: usize = 64 * 1024;
const READ_CHUNK: usize = 16 * 1024;
/// Largest request-head buffer a connection keeps for its next request.
const MAX_SPARE: usize = 4 * 1024;

/// Request headers the activator drops or sets itself, besides the hop-by-hop ones
/// (`K-Network-Hash`: knative/networking `pkg/http/probe/handler.go` deletes it from every
/// request that is not a network probe).
const REQ_DROP: [&str; 6] = [
    "host",
    "upgrade",
    "knative-serving-namespace",
    "knative-serving-revision",
    "k-proxy-request",
    "k-network-hash",
];

/// A request the fast path serves.
#[derive(Debug)]
pub struct FastRequest {
    pub key: RevisionKey,
    /// Length of the head in the client buffer.
    pub head_len: usize,
    /// Length of the body that follows the head.
    pub body_len: usize,
    /// The client asked to close the connection after this request.
    pub close: bool,
    /// `HEAD`: the response has no body whatever its headers say.
    pub head_method: bool,
    /// Safe to send again when a pooled connection closes before answering (idempotent
    /// method or an idempotency key, as Go's transport decides).
    pub replayable: bool,
    /// Request line and rewritten headers for the pod, without `Host` and the blank line.
    pub out: Vec<u8>,
}

/// What a (possibly partial) request head allows.
#[derive(Debug)]
pub enum Parsed {
    /// Incomplete: read more.
    Partial,
    /// Served here.
    Fast(FastRequest),
    /// Served by hyper; the classification decides whether a pod slot is taken before.
    Slow(Head),
}

/// The cluster domain Hosts are matched against ([`set_cluster_domain`]).
static CLUSTER_DOMAIN: std::sync::OnceLock<Box<str>> = std::sync::OnceLock::new();

/// Sets the cluster domain once at startup (before that, and in tests, `cluster.local`).
pub fn set_cluster_domain(domain: &str) {
    let _ = CLUSTER_DOMAIN.set(domain.into());
}

fn cluster_domain() -> &'static str {
    CLUSTER_DOMAIN.get().map_or("cluster.local", |d| d)
}

/// The revision a request targets: the `Knative-Serving-*` headers, else the Host (or the
/// authority of an absolute request target) when it reads
/// `<name>.<namespace>.svc.<cluster-domain>[:port]` (Knative's `context_handler.go`: the
/// Host split in at most 4 parts on `.`, the third `svc`, the fourth up to `:` the
/// cluster domain). `None` names no revision (Knative looks up the empty name: 404).
pub fn revision_key(ns: &str, name: &str, host: Option<&str>) -> Option<RevisionKey> {
    if !ns.is_empty() && !name.is_empty() {
        return Some(RevisionKey::new(ns, name));
    }
    let mut parts = host?.splitn(4, '.');
    let name = parts.next()?;
    let ns = parts.next()?;
    let svc = parts.next()?;
    let domain = parts.next()?;
    let domain = domain.split_once(':').map_or(domain, |(d, _)| d);
    if svc != "svc" || domain != cluster_domain() || name.is_empty() || ns.is_empty() {
        return None;
    }
    Some(RevisionKey::new(ns, name))
}

/// The request headers that name the target revision, in the order `parse_request` reads.
const ROUTING: [&str; 3] = [
    "knative-serving-namespace",
    "knative-serving-revision",
    "host",
];

/// Parses a request head; `peer` is appended to `X-Forwarded-For`.
pub fn parse_request(buf: &[u8], peer: Option<IpAddr>) -> Parsed {
    let peer = peer.map(|ip| ip.to_string());
    parse_request_into(buf, peer.as_deref().map(str::as_bytes), &mut Vec::new())
}

/// [`parse_request`] for a connection: `peer` is the client's address already written
/// out (once per connection, not per request), and a fast request's rewritten head is
/// built in `spare` (taken; a connection hands the buffer of its previous request back,
/// see [`serve`]), so a keep-alive request allocates nothing here.
pub fn parse_request_into(buf: &[u8], peer: Option<&[u8]>, spare: &mut Vec<u8>) -> Parsed {
    if buf.starts_with(b"PRI ") || (buf.len() < 4 && b"PRI ".starts_with(buf)) {
        return if buf.len() < 4 {
            Parsed::Partial
        } else {
            Parsed::Slow(Head::Other)
        };
    }
    let mut headers = [httparse::EMPTY_HEADER; MAX_HEADERS];
    let mut req = httparse::Request::new(&mut headers);
    let head_len = match req.parse(buf) {
        Ok(httparse::Status::Complete(n)) => n,
        Ok(httparse::Status::Partial) => {
            return if buf.len() >= MAX_HEAD {
                Parsed::Slow(Head::Other)
            } else {
                Parsed::Partial
            };
        }
        Err(_) => return Parsed::Slow(Head::Other),
    };
    let (mut ns, mut name, mut host) = ("", "", None);
    let mut fast = req.version == Some(1);
    let mut body_len: Option<usize> = None;
    let mut connection: [&[u8]; 4] = [b""; 4];
    let mut n_conn = 0;
    let mut idempotency_key = false;
    let mut seen = [false; ROUTING.len()];
    // RewriteHostIn keeps a `K-Original-Host` whose first value is not empty; Go's
    // reverse proxy sends `TE: trailers` on when any TE value lists `trailers`.
    let mut original_host: Option<&[u8]> = None;
    let mut te_trailers = false;
    for h in req.headers.iter() {
        let n = h.name;
        idempotency_key |= n.eq_ignore_ascii_case("idempotency-key")
            || n.eq_ignore_ascii_case("x-idempotency-key");
        if n.eq_ignore_ascii_case("k-network-probe") || n.eq_ignore_ascii_case("k-kubelet-probe") {
            return Parsed::Slow(Head::Other);
        }
        // The headers naming the revision: the handler (`revision_from`) reads the first
        // value and only visible ASCII, and answers 400 to a repeated Host; a repeated one
        // or one holding other bytes goes to the handler so both always agree.
        let routing = ROUTING.iter().position(|r| n.eq_ignore_ascii_case(r));
        if let Some(i) = routing {
            if seen[i] || !visible_ascii(h.value) {
                return Parsed::Slow(Head::Other);
            }
            seen[i] = true;
        }
        let Ok(v) = std::str::from_utf8(h.value) else {
            fast = false;
            continue;
        };
        if n.eq_ignore_ascii_case("user-agent") && v.starts_with("kube-probe/") {
            return Parsed::Slow(Head::Other);
        }
        if routing == Some(0) {
            ns = v;
        } else if routing == Some(1) {
            name = v;
        } else if routing == Some(2) {
            host = Some(v);
        } else if n.eq_ignore_ascii_case("content-length") {
            match (v.trim().parse::<usize>(), body_len) {
                (Ok(l), None) if l <= MAX_FAST_BODY => body_len = Some(l),
                _ => fast = false,
            }
        } else if n.eq_ignore_ascii_case("connection") {
            if n_conn < connection.len() {
                connection[n_conn] = h.value;
                n_conn += 1;
            } else {
                fast = false;
            }
        } else if n.eq_ignore_ascii_case("k-original-host") {
            original_host.get_or_insert(h.value);
        } else if n.eq_ignore_ascii_case("te") {
            te_trailers |= lists(&[h.value], b"trailers");
        } else if n.eq_ignore_ascii_case("transfer-encoding")
            || n.eq_ignore_ascii_case("upgrade")
            || n.eq_ignore_ascii_case("expect")
        {
            fast = false;
        }
    }
    let path = req.path.unwrap_or("/");
    let authority = if host.is_none() && !path.starts_with('/') {
        path.parse::<http::Uri>()
            .ok()
            .and_then(|u| u.authority().map(|a| a.as_str().to_owned()))
    } else {
        None
    };
    let Some(key) = revision_key(ns, name, host.or(authority.as_deref())) else {
        return Parsed::Slow(Head::Other);
    };
    let connection = &connection[..n_conn];
    let method = req.method.unwrap_or("GET");
    if !fast || !path.starts_with('/') || method == "CONNECT" || lists(connection, b"upgrade") {
        return Parsed::Slow(Head::Revision(key));
    }
    let mut out = std::mem::take(spare);
    out.clear();
    out.reserve(head_len + 96);
    out.extend_from_slice(method.as_bytes());
    out.push(b' ');
    out.extend_from_slice(path.as_bytes());
    out.extend_from_slice(b" HTTP/1.1\r\n");
    let mut xff: Option<&[u8]> = None;
    let mut xff_more = false;
    let keep_original_host = original_host.is_some_and(|v| !v.is_empty());
    for h in req.headers.iter() {
        if is_in(&HOP_BY_HOP, h.name)
            || is_in(&REQ_DROP, h.name)
            || lists(connection, h.name.as_bytes())
            || (!keep_original_host && h.name.eq_ignore_ascii_case("k-original-host"))
        {
            continue;
        }
        if h.name.eq_ignore_ascii_case("x-forwarded-for") {
            if xff.is_some() {
                xff_more = true;
            } else {
                xff = Some(h.value);
            }
            continue;
        }
        push_header(&mut out, h.name.as_bytes(), h.value);
    }
    out.extend_from_slice(b"k-proxy-request: activator\r\n");
    if te_trailers {
        out.extend_from_slice(b"te: trailers\r\n");
    }
    if let Some(host) = host.filter(|_| !keep_original_host) {
        push_header(&mut out, b"k-original-host", host.as_bytes());
    }
    if xff.is_some() || peer.is_some() {
        out.extend_from_slice(b"x-forwarded-for: ");
        let mut first = true;
        for h in req.headers.iter() {
            if h.name.eq_ignore_ascii_case("x-forwarded-for") {
                if !first {
                    out.extend_from_slice(b", ");
                }
                out.extend_from_slice(h.value);
                first = false;
                if !xff_more {
                    break;
                }
            }
        }
        if let Some(ip) = peer {
            if !first {
                out.extend_from_slice(b", ");
            }
            out.extend_from_slice(ip);
        }
        out.extend_from_slice(b"\r\n");
    }
    Parsed::Fast(FastRequest {
        key,
        head_len,
        body_len: body_len.unwrap_or(0),
        close: lists(connection, b"close"),
        head_method: method == "HEAD",
        replayable: idempotency_key || matches!(method, "GET" | "HEAD" | "OPTIONS" | "TRACE"),
        out,
    })
}

/// How a response head from a pod is rewritten: the hop-by-hop headers dropped but
/// `transfer-encoding` (the body passes through in its own framing), names as sent.
const RESPONSE_RULES: ResponseRules = ResponseRules {
    max_head: MAX_RESPONSE_HEAD,
    max_headers: MAX_HEADERS,
    drop: &HOP_BY_HOP,
    lowercase: false,
    rechunk: false,
};

/// Parses a response head to a request that was `HEAD` when `head_method`.
pub fn parse_response(buf: &[u8], head_method: bool) -> Result<ParsedResponse, ResponseError> {
    spright_core::http1::parse_response(buf, head_method, &RESPONSE_RULES)
}

/// What the client is told when the pod's response is not usable.
fn pod_error(e: &ResponseError) -> &'static str {
    match e {
        ResponseError::Malformed => "malformed response head from the pod",
        ResponseError::UnexpectedUpgrade => "the pod switched protocols without being asked",
    }
}

/// An idle keep-alive connection to a pod.
#[derive(Debug)]
struct Idle {
    stream: TcpStream,
}

/// Idle keep-alive connections per pod (`ip:port`), at most `MAX_IDLE_PROXY_CONNS_PER_HOST`
/// per pod and `MAX_IDLE_PROXY_CONNS` in all (Knative's transport limits).
#[derive(Debug)]
pub struct UpstreamPool {
    idle: Mutex<Pooled>,
    max_per_host: usize,
    max_total: usize,
}

#[derive(Debug, Default)]
struct Pooled {
    by_dest: HashMap<Arc<str>, Vec<Idle>>,
    total: usize,
}

/// True when a pooled connection shows no sign of having been closed (costs no system
/// call unless the poller saw it become readable).
fn looks_open(s: &TcpStream) -> bool {
    let mut one = [0u8; 1];
    matches!(s.try_read(&mut one), Err(e) if e.kind() == io::ErrorKind::WouldBlock)
}

impl UpstreamPool {
    pub fn new(max_total: usize, max_per_host: usize) -> Self {
        Self {
            idle: Mutex::new(Pooled::default()),
            max_per_host,
            max_total,
        }
    }

    fn lock(&self) -> std::sync::MutexGuard<'_, Pooled> {
        self.idle.lock().unwrap_or_else(|p| p.into_inner())
    }

    fn take(&self, dest: &str) -> Option<TcpStream> {
        let mut p = self.lock();
        let Pooled { by_dest, total } = &mut *p;
        let list = by_dest.get_mut(dest)?;
        while let Some(c) = list.pop() {
            *total -= 1;
            if looks_open(&c.stream) {
                return Some(c.stream);
            }
        }
        None
    }

    fn put(&self, dest: &Arc<str>, stream: TcpStream) {
        let mut p = self.lock();
        let Pooled { by_dest, total } = &mut *p;
        if by_dest.len() > 64 || *total >= self.max_total {
            // Pods come and go: drop what their pods closed.
            by_dest.retain(|_, l| {
                l.retain(|c| looks_open(&c.stream));
                !l.is_empty()
            });
            *total = by_dest.values().map(Vec::len).sum();
        }
        if *total >= self.max_total {
            return;
        }
        let list = by_dest.entry(dest.clone()).or_default();
        if list.len() < self.max_per_host {
            list.push(Idle { stream });
            *total += 1;
        }
    }

    /// Idle connections held (for tests and metrics).
    pub fn idle_count(&self) -> usize {
        self.lock().total
    }
}

fn error_response(e: &RequestError, close: bool) -> Vec<u8> {
    use std::io::Write as _;
    let status = e.status();
    let (msg, nosniff) = e.body();
    let mut out = Vec::with_capacity(160 + msg.len());
    let _ = write!(
        out,
        "HTTP/1.1 {} {}\r\ncontent-type: text/plain; charset=utf-8\r\n{}content-length: {}\r\n{}\r\n{msg}",
        status.as_u16(),
        status.canonical_reason().unwrap_or(""),
        if nosniff {
            "x-content-type-options: nosniff\r\n"
        } else {
            ""
        },
        msg.len(),
        if close { "connection: close\r\n" } else { "" }
    );
    out
}

/// Reads more from `s` into `buf`; 0 at end of stream.
async fn fill(s: &mut TcpStream, buf: &mut BytesMut) -> io::Result<usize> {
    if buf.capacity() - buf.len() < 1024 {
        buf.reserve(READ_CHUNK);
    }
    s.read_buf(buf).await
}

/// Reads until `buf` holds at least `want` bytes; false at end of stream.
pub async fn fill_to(s: &mut TcpStream, buf: &mut BytesMut, want: usize) -> io::Result<bool> {
    while buf.len() < want {
        buf.reserve(want - buf.len());
        if s.read_buf(buf).await? == 0 {
            return Ok(false);
        }
    }
    Ok(true)
}

async fn connect(dest: &str) -> io::Result<TcpStream> {
    let addr: SocketAddr = dest
        .parse()
        .map_err(|_| io::Error::new(io::ErrorKind::InvalidInput, "bad pod address"))?;
    let s = TcpStream::connect(addr).await?;
    let _ = s.set_nodelay(true);
    Ok(s)
}

/// Why an exchange with the pod failed.
enum Failed {
    Upstream(String),
    Timeout,
    ClientGone,
}

/// Sends the request and reads the response head into `ubuf`, on a pooled connection
/// when there is one (retried once on a fresh connection if a pooled one turns out
/// to be closed before answering).
async fn exchange(
    pool: &UpstreamPool,
    dest: &str,
    out: &[u8],
    ubuf: &mut BytesMut,
    head_method: bool,
    replayable: bool,
) -> Result<(TcpStream, FastResponse), Failed> {
    let up = |e: io::Error| Failed::Upstream(format!("dial tcp {dest}: {e}"));
    let mut pooled = pool.take(dest);
    loop {
        let reused = pooled.is_some();
        let mut s = match pooled.take() {
            Some(s) => s,
            None => connect(dest).await.map_err(up)?,
        };
        ubuf.clear();
        // A pod may answer before reading the body and close: its answer is relayed even
        // though the request could not be sent whole (as Go's transport does).
        let mut write_failed = None;
        if let Err(e) = s.write_all(out).await {
            if reused {
                continue;
            }
            write_failed = Some(e);
        }
        loop {
            match parse_response(ubuf, head_method) {
                Ok(ParsedResponse::Complete(mut r)) => {
                    r.reusable &= write_failed.is_none();
                    return Ok((s, r));
                }
                Ok(ParsedResponse::Interim(n)) => {
                    ubuf.advance(n);
                    continue;
                }
                Ok(ParsedResponse::Partial) => {}
                Err(e) => return Err(Failed::Upstream(pod_error(&e).into())),
            }
            // A pooled connection the pod closed before this request reached it.
            let retry_read = reused && replayable && ubuf.is_empty();
            match fill(&mut s, ubuf).await {
                Ok(0) if retry_read => break,
                Ok(0) => {
                    return Err(Failed::Upstream(write_failed.map_or_else(
                        || "unexpected EOF from the pod".into(),
                        |e| e.to_string(),
                    )));
                }
                Ok(_) => {}
                Err(_) if retry_read => break,
                Err(e) => return Err(Failed::Upstream(write_failed.unwrap_or(e).to_string())),
            }
        }
    }
}

/// Serves one fast request whose head is at the start of `buf`, holding `adm` (its pod
/// slot) until the response body has been passed on. Returns whether the client
/// connection stays open for another request. The buffer of the request head sent to
/// the pod is handed back in `spare` for the connection's next request.
pub async fn serve(
    pool: &UpstreamPool,
    client: &mut TcpStream,
    buf: &mut BytesMut,
    ubuf: &mut BytesMut,
    spare: &mut Vec<u8>,
    req: FastRequest,
    adm: Admission,
) -> bool {
    let total = req.head_len + req.body_len;
    match fill_to(client, buf, total).await {
        Ok(true) => {}
        _ => return false,
    }
    let Admission {
        spec,
        result,
        started,
    } = adm;
    let (lease, in_flight) = match result {
        Ok(held) => held,
        Err(e) => {
            buf.advance(total);
            tracing::debug!(error = %e, "request failed");
            let resp = error_response(&e, req.close);
            return client.write_all(&resp).await.is_ok() && !req.close;
        }
    };
    let mut out = req.out;
    out.extend_from_slice(b"host: ");
    out.extend_from_slice(lease.dest().as_bytes());
    out.extend_from_slice(b"\r\n\r\n");
    out.extend_from_slice(&buf[req.head_len..total]);
    buf.advance(total);

    let first_byte = first_byte_timeout(&spec).map(|t| started + t);
    let total_deadline = (!spec.timeout.is_zero()).then(|| started + spec.timeout);
    let idle = spec.idle_timeout.filter(|d| !d.is_zero());
    let dest = lease.dest_arc();
    let answer = async {
        let ex = exchange(pool, &dest, &out, ubuf, req.head_method, req.replayable);
        let ex = async {
            match first_byte {
                Some(at) => tokio::time::timeout_at(at, ex)
                    .await
                    .unwrap_or(Err(Failed::Timeout)),
                None => ex.await,
            }
        };
        tokio::select! {
            r = ex => r,
            _ = client_gone(client) => Err(Failed::ClientGone),
        }
    };
    let answer = answer.await;
    // Kept only while small: an idle keep-alive connection does not pin a big body's buffer.
    if out.capacity() <= MAX_SPARE {
        *spare = out;
    }
    let (mut upstream, resp) = match answer {
        Ok(x) => x,
        Err(Failed::ClientGone) => return false,
        Err(f) => {
            let e = match f {
                Failed::Timeout => RequestError::Timeout,
                Failed::Upstream(m) => RequestError::Upstream(m),
                Failed::ClientGone => return false,
            };
            tracing::debug!(error = %e, "request failed");
            let resp = error_response(&e, req.close);
            return client.write_all(&resp).await.is_ok() && !req.close;
        }
    };
    ubuf.advance(resp.head_len);
    let close = req.close || resp.framing == Framing::UntilClose;
    let mut head = resp.out;
    if resp.sniff {
        match sniff_type(&mut upstream, ubuf, resp.framing, total_deadline, idle).await {
            Ok(Some(ct)) => push_header(&mut head, b"Content-Type", ct.as_bytes()),
            Ok(None) => {}
            Err(e) => {
                // Nothing of the answer has gone out yet: the client gets the activator's
                // own error (Go's server would drop the connection instead).
                let e = match e.kind() {
                    io::ErrorKind::TimedOut => RequestError::Timeout,
                    _ => RequestError::Upstream(e.to_string()),
                };
                tracing::debug!(error = %e, status = resp.status, "response body failed");
                let resp = error_response(&e, req.close);
                return client.write_all(&resp).await.is_ok() && !req.close;
            }
        }
    }
    if close {
        head.extend_from_slice(b"connection: close\r\n");
    }
    head.extend_from_slice(b"\r\n");
    let (done, reusable) = match pass_body(
        &mut upstream,
        client,
        ubuf,
        head,
        resp.framing,
        total_deadline,
        idle,
    )
    .await
    {
        Ok(clean) => (true, clean && resp.reusable),
        Err(e) => {
            tracing::debug!(error = %e, status = resp.status, "response body aborted");
            (false, false)
        }
    };
    drop((lease, in_flight));
    if reusable {
        pool.put(&dest, upstream);
    }
    done && !close
}

/// The `Content-Type` Go's server gives a pod answer that has none (the caller checked
/// [`sniff::go_sniffs`]), from the body bytes Go would sniff; the first of them follow the
/// head in `ubuf`.
///
/// A body of known length: Go's reverse proxy (`FlushInterval` 0) flushes nothing until
/// its server's 2 KiB buffer is full or the body ends, so the type comes from the first
/// `min(length, 512)` bytes, and the head waits for them here too. Chunked and
/// read-until-close bodies: the proxy flushes the head at once (a timer armed with a
/// negative interval races the first body write), so only body bytes already received
/// with the head count, as they do in Go when its first read finds them buffered; the head
/// never waits for a streamed body. No body bytes: no type (Go sniffs only non-empty
/// writes).
async fn sniff_type(
    upstream: &mut TcpStream,
    ubuf: &mut BytesMut,
    framing: Framing,
    deadline: Option<Instant>,
    idle: Option<Duration>,
) -> io::Result<Option<&'static str>> {
    match framing {
        Framing::Length(n) if n > 0 => {
            let want = usize::try_from(n)
                .unwrap_or(usize::MAX)
                .min(sniff::SNIFF_LEN);
            while ubuf.len() < want {
                if bounded(fill(upstream, ubuf), deadline, idle).await? == 0 {
                    return Err(io::ErrorKind::UnexpectedEof.into());
                }
            }
            Ok(Some(sniff::detect(&ubuf[..want])))
        }
        Framing::Chunked => {
            let mut first = [0u8; sniff::SNIFF_LEN];
            let n = sniff::chunked_prefix(ubuf, &mut first);
            Ok((n > 0).then(|| sniff::detect(&first[..n])))
        }
        Framing::UntilClose if !ubuf.is_empty() => Ok(Some(sniff::detect(ubuf))),
        _ => Ok(None),
    }
}

/// Waits for `fut` until `deadline` or for `idle` of inactivity, whichever is first.
async fn bounded<T>(
    fut: impl std::future::Future<Output = io::Result<T>>,
    deadline: Option<Instant>,
    idle: Option<Duration>,
) -> io::Result<T> {
    let at = match (deadline, idle.map(|d| Instant::now() + d)) {
        (Some(a), Some(b)) => Some(a.min(b)),
        (a, b) => a.or(b),
    };
    match at {
        Some(at) => tokio::time::timeout_at(at, fut).await.unwrap_or_else(|_| {
            Err(io::Error::new(
                io::ErrorKind::TimedOut,
                "activator request timeout",
            ))
        }),
        None => fut.await,
    }
}

/// Passes the response body (its first bytes are in `ubuf`) to the client after `head`.
/// `Ok(true)`: the body ended exactly and nothing else came from the pod.
async fn pass_body(
    upstream: &mut TcpStream,
    client: &mut TcpStream,
    ubuf: &mut BytesMut,
    head: Vec<u8>,
    framing: Framing,
    deadline: Option<Instant>,
    idle: Option<Duration>,
) -> io::Result<bool> {
    let mut cursor = BodyCursor::new(framing);
    let mut complete = cursor.pass(client, ubuf, Some(head)).await?;
    while !complete {
        ubuf.clear();
        let got = bounded(fill(upstream, ubuf), deadline, idle).await?;
        if got == 0 {
            return cursor
                .upstream_closed("the pod closed mid-body")
                .map(|()| false);
        }
        complete = cursor.pass(client, ubuf, None).await?;
    }
    Ok(ubuf.is_empty())
}

#[cfg(test)]
mod tests {
    use super::*;
    use rand::{Rng, SeedableRng};

    fn fast(s: &str) -> FastRequest {
        match parse_request(s.as_bytes(), Some("10.0.0.1".parse().unwrap())) {
            Parsed::Fast(r) => r,
            other => panic!("not fast: {other:?}"),
        }
    }

    /// Fuzz finding (activator_request): the fast path kept the last Host and accepted
    /// UTF-8 in it while the handler reads the first, visible-ASCII value.
    #[test]
    fn repeated_or_non_ascii_routing_header_goes_to_handler() {
        let slow = |b: &[u8]| {
            assert!(
                matches!(parse_request(b, None), Parsed::Slow(Head::Other)),
                "{:?}",
                String::from_utf8_lossy(b)
            )
        };
        slow(b"GET / HTTP/1.1\r\nHost: a.one\r\nHost: b.two\r\n\r\n");
        slow(b"GET / HTTP/1.1\r\nhost: a.one\r\nHOST: a.one\r\n\r\n");
        slow(b"GET /x HTTP/1.1\r\nHost: hedefault.svc.cluserfing\xd3\xa8evision: h\r\n\r\n");
        slow(b"GET / HTTP/1.1\r\nHost: r.ns\r\nKnative-Serving-Namespace: a\r\nknative-serving-namespace: b\r\nKnative-Serving-Revision: r\r\n\r\n");
        slow(b"GET / HTTP/1.1\r\nHost: r.ns\r\nKnative-Serving-Namespace: a\r\nKnative-Serving-Revision: r\r\nKnative-Serving-Revision: s\r\n\r\n");
        slow(b"GET / HTTP/1.1\r\nHost: r.ns\r\nKnative-Serving-Namespace: a\r\nKnative-Serving-Revision: r\x80\r\n\r\n");
        // One of each, visible ASCII (tab included, as HeaderValue::to_str allows): fast.
        let r = fast(
            "GET / HTTP/1.1\r\nHost: x.y\r\nKnative-Serving-Namespace: ns\r\nKnative-Serving-Revision: r\t\r\n\r\n",
        );
        assert_eq!(r.key, RevisionKey::new("ns", "r"));
    }

    #[tokio::test]
    async fn idle_pool_limits_per_pod_and_in_all() {
        let l = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
        let dest: Arc<str> = l.local_addr().unwrap().to_string().into();
        let other: Arc<str> = "127.0.0.1:1".into();
        let mut accepted = Vec::new();
        let mut conns = Vec::new();
        for _ in 0..5 {
            conns.push(connect(&dest).await.unwrap());
            accepted.push(l.accept().await.unwrap().0);
        }
        // MAX_IDLE_PROXY_CONNS = 3, MAX_IDLE_PROXY_CONNS_PER_HOST = 2.
        let pool = UpstreamPool::new(3, 2);
        for c in conns.drain(..3) {
            pool.put(&dest, c);
        }
        assert_eq!(pool.idle_count(), 2, "per-pod limit");
        for c in conns.drain(..) {
            pool.put(&other, c);
        }
        assert_eq!(pool.idle_count(), 3, "limit in all");
        assert!(pool.take(&dest).is_some());
        assert_eq!(pool.idle_count(), 2);
        assert!(pool.take(&dest).is_some());
        assert!(pool.take(&dest).is_none());
        assert_eq!(pool.idle_count(), 1);
    }

    #[test]
    fn connection_buffer_and_peer_text_are_reused() {
        let head = b"GET /x HTTP/1.1\r\nHost: rev.ns.svc.cluster.local\r\nX-Forwarded-For: 1.1.1.1\r\n\r\n";
        let mut spare = Vec::with_capacity(1024);
        let at = spare.as_ptr();
        let Parsed::Fast(r) = parse_request_into(head, Some(b"10.0.0.9"), &mut spare) else {
            panic!("not fast");
        };
        assert_eq!(r.out.as_ptr(), at, "the spare buffer was not used");
        assert!(spare.is_empty());
        let out = String::from_utf8(r.out).unwrap();
        assert!(
            out.contains("x-forwarded-for: 1.1.1.1, 10.0.0.9\r\n"),
            "{out}"
        );
        // The same bytes as the one-shot parser writes.
        let Parsed::Fast(once) = parse_request(head, Some("10.0.0.9".parse().unwrap())) else {
            panic!("not fast");
        };
        assert_eq!(once.out, out.as_bytes());
        // A partial head leaves the buffer alone.
        let mut spare = Vec::with_capacity(64);
        assert!(matches!(
            parse_request_into(b"GET / HTTP/1.1\r\nHo", None, &mut spare),
            Parsed::Partial
        ));
        assert_eq!(spare.capacity(), 64);
    }

    #[test]
    fn request_rewritten_as_knative_does() {
        let r = fast(
            "POST /a?b=1 HTTP/1.1\r\nHost: hello.default.example.com\r\nKnative-Serving-Namespace: default\r\nKnative-Serving-Revision: hello-00001\r\nConnection: keep-alive, x-hop\r\nX-Hop: 1\r\nTE: deflate, trailers\r\nK-Network-Hash: h\r\nX-Forwarded-For: 1.1.1.1\r\nX-User: kept\r\nContent-Length: 3\r\n\r\nabc",
        );
        assert_eq!(r.key, RevisionKey::new("default", "hello-00001"));
        assert_eq!((r.body_len, r.close, r.head_method), (3, false, false));
        let out = String::from_utf8(r.out).unwrap();
        assert!(out.starts_with("POST /a?b=1 HTTP/1.1\r\n"), "{out}");
        for want in [
            "X-User: kept\r\n",
            "Content-Length: 3\r\n",
            "k-proxy-request: activator\r\n",
            "k-original-host: hello.default.example.com\r\n",
            "x-forwarded-for: 1.1.1.1, 10.0.0.1\r\n",
            "te: trailers\r\n",
        ] {
            assert!(out.contains(want), "{want:?} missing in {out}");
        }
        let lower = out.to_ascii_lowercase();
        for gone in [
            "\r\nhost:",
            "knative-serving",
            "connection:",
            "x-hop",
            "deflate",
            "k-network-hash",
        ] {
            assert!(!lower.contains(gone), "{gone:?} left in {out}");
        }
    }

    /// RewriteHostIn keeps a non-empty `K-Original-Host`; an empty one is replaced.
    #[test]
    fn existing_original_host_kept() {
        let r = fast(
            "GET / HTTP/1.1\r\nHost: r.ns.svc.cluster.local\r\nK-Original-Host: app.example.com\r\n\r\n",
        );
        let out = String::from_utf8(r.out).unwrap();
        assert!(
            out.contains("K-Original-Host: app.example.com\r\n"),
            "{out}"
        );
        assert_eq!(
            out.matches("-host:").count() + out.matches("-Host:").count(),
            1,
            "{out}"
        );
        let r = fast("GET / HTTP/1.1\r\nHost: r.ns.svc.cluster.local\r\nK-Original-Host:\r\n\r\n");
        let out = String::from_utf8(r.out).unwrap();
        assert!(
            out.contains("k-original-host: r.ns.svc.cluster.local\r\n"),
            "{out}"
        );
        assert!(!out.contains("K-Original-Host"), "{out}");
    }

    #[test]
    fn what_goes_to_hyper() {
        let slow = |s: &str| match parse_request(s.as_bytes(), None) {
            Parsed::Slow(h) => h,
            other => panic!("{s:?}: {other:?}"),
        };
        let rev = || Head::Revision(RevisionKey::new("ns", "rev"));
        let h = "Host: rev.ns.svc.cluster.local\r\n";
        assert_eq!(slow(&format!("GET / HTTP/1.0\r\n{h}\r\n")), rev());
        assert_eq!(
            slow(&format!(
                "POST / HTTP/1.1\r\n{h}Transfer-Encoding: chunked\r\n\r\n"
            )),
            rev()
        );
        assert_eq!(
            slow(&format!(
                "GET / HTTP/1.1\r\n{h}Connection: Upgrade\r\nUpgrade: websocket\r\n\r\n"
            )),
            rev()
        );
        assert_eq!(
            slow(&format!(
                "POST / HTTP/1.1\r\n{h}Expect: 100-continue\r\nContent-Length: 1\r\n\r\n"
            )),
            rev()
        );
        assert_eq!(
            slow(&format!(
                "POST / HTTP/1.1\r\n{h}Content-Length: 999999\r\n\r\n"
            )),
            rev()
        );
        assert_eq!(
            slow(&format!(
                "GET / HTTP/1.1\r\n{h}K-Network-Probe: activator\r\n\r\n"
            )),
            Head::Other
        );
        assert_eq!(
            slow("GET / HTTP/1.1\r\nHost: localhost\r\n\r\n"),
            Head::Other
        );
        // Only `<name>.<namespace>.svc.<cluster-domain>[:port]` names a revision.
        for host in [
            "rev.ns",
            "rev.ns.example.com",
            "rev.ns.svc",
            "rev.ns.svc.other.domain",
            "rev.ns.svc.cluster.local.x",
            ".ns.svc.cluster.local",
        ] {
            assert_eq!(
                slow(&format!("GET / HTTP/1.1\r\nHost: {host}\r\n\r\n")),
                Head::Other,
                "{host}"
            );
        }
        assert_eq!(slow("PRI * HTTP/2.0\r\n\r\nSM\r\n\r\n"), Head::Other);
        assert!(matches!(
            parse_request(b"GET / HTTP/1.1\r\nHost: rev", None),
            Parsed::Partial
        ));
        let r = fast(
            "HEAD / HTTP/1.1\r\nHost: rev.ns.svc.cluster.local:80\r\nConnection: close\r\n\r\n",
        );
        assert!(r.close && r.head_method && r.replayable);
        let r = fast("POST / HTTP/1.1\r\nHost: rev.ns.svc.cluster.local\r\n\r\n");
        assert!(!r.replayable, "a POST is not sent twice");
        let r = fast(
            "POST / HTTP/1.1\r\nHost: rev.ns.svc.cluster.local\r\nIdempotency-Key: k1\r\n\r\n",
        );
        assert!(r.replayable);
    }

    fn complete(buf: &[u8], head: bool) -> FastResponse {
        match parse_response(buf, head) {
            Ok(ParsedResponse::Complete(r)) => r,
            other => panic!("{other:?}"),
        }
    }

    #[test]
    fn responses() {
        let r = complete(
            b"HTTP/1.1 200 OK\r\nContent-Length: 2\r\nConnection: keep-alive, x-a\r\nX-A: 1\r\nKeep-Alive: timeout=5\r\nX-B: 2\r\n\r\nok",
            false,
        );
        assert_eq!(
            (r.framing, r.reusable, r.status),
            (Framing::Length(2), true, 200)
        );
        let out = String::from_utf8(r.out).unwrap();
        assert_eq!(out, "HTTP/1.1 200 OK\r\nContent-Length: 2\r\nX-B: 2\r\n");
        let r = complete(
            b"HTTP/1.1 200 OK\r\nTransfer-Encoding: chunked\r\nContent-Length: 5\r\n\r\n",
            false,
        );
        assert_eq!(r.framing, Framing::Chunked);
        assert!(!String::from_utf8(r.out).unwrap().contains("Content-Length"));
        let r = complete(
            b"HTTP/1.1 200 OK\r\nConnection: close\r\nContent-Length: 0\r\n\r\n",
            false,
        );
        assert!(!r.reusable);
        let r = complete(b"HTTP/1.0 200 OK\r\n\r\nbody", false);
        assert_eq!((r.framing, r.reusable), (Framing::UntilClose, false));
        let r = complete(b"HTTP/1.1 204 No Content\r\n\r\n", false);
        assert_eq!(r.framing, Framing::Empty);
        let r = complete(b"HTTP/1.1 200 OK\r\nContent-Length: 10\r\n\r\n", true);
        assert_eq!(r.framing, Framing::Empty);
        assert!(matches!(
            parse_response(b"HTTP/1.1 100 Continue\r\n\r\nHTTP/1.1 200", false),
            Ok(ParsedResponse::Interim(25))
        ));
        assert_eq!(
            parse_response(
                b"HTTP/1.1 200 OK\r\nContent-Length: 1\r\nContent-Length: 2\r\n\r\n",
                false
            )
            .err(),
            Some(ResponseError::Malformed)
        );
        assert_eq!(
            parse_response(b"HTTP/1.1 101 Switching\r\n\r\n", false).err(),
            Some(ResponseError::UnexpectedUpgrade)
        );
        assert!(matches!(
            parse_response(b"HTTP/1.1 200 OK\r\nCont", false),
            Ok(ParsedResponse::Partial)
        ));
    }

    #[test]
    fn responses_keep_transfer_encoding_and_upgrade() {
        let r = complete(
            b"HTTP/1.1 200 OK\r\nTransfer-Encoding: gzip\r\nUpgrade: x\r\n\r\n",
            false,
        );
        assert_eq!(r.framing, Framing::UntilClose);
        assert_eq!(
            String::from_utf8(r.out).unwrap(),
            "HTTP/1.1 200 OK\r\nTransfer-Encoding: gzip\r\nUpgrade: x\r\n"
        );
        let err = parse_response(b"HTTP/1.1 101 Switching\r\n\r\n", false).unwrap_err();
        assert_eq!(
            pod_error(&err),
            "the pod switched protocols without being asked"
        );
    }

    #[test]
    fn random_request_heads_never_panic() {
        let mut rng = rand::rngs::StdRng::seed_from_u64(5);
        let base = b"POST /x HTTP/1.1\r\nHost: rev.ns.svc.cluster.local\r\nKnative-Serving-Revision: r\r\nConnection: close, x\r\nX-Forwarded-For: a\r\nContent-Length: 2\r\n\r\nab";
        for _ in 0..5000 {
            let mut b = base.to_vec();
            for _ in 0..rng.gen_range(1..8) {
                let i = rng.gen_range(0..b.len());
                b[i] = rng.r#gen();
            }
            b.truncate(rng.gen_range(0..=b.len()));
            let _ = parse_request(&b, Some("::1".parse().unwrap()));
            let _ = parse_response(&b, false);
        }
    }
}
