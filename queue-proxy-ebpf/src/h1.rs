//! Byte-level HTTP/1.1 for the fast path ([`crate::fast`]): the request head is parsed once
//! with `httparse` and rewritten straight into the bytes sent to the user container, with
//! the rules of the handler chain (knative-contract.md A.3) for an ordinary proxied request:
//! the `Forwarded` shim, `K-Original-Host`, Knative's revision headers and hop-by-hop headers
//! removed, `X-Forwarded-For` appended. Response heads are parsed for their framing and
//! rewritten the way the hyper path answers (hop-by-hop headers dropped, names lower-cased).
//!
//! Only requests whose every detail is covered here are [`Parsed::Fast`]; anything else
//! (probes, health checks, h2c, upgrades, `Expect`, chunked or large bodies, repeated or
//! non-ASCII values in the headers the chain reads, absolute-form targets, HTTP/1.0,
//! malformed heads) is [`Parsed::Slow`] and goes to the hyper path unchanged.

use std::io::Write as _;
use std::net::IpAddr;

pub use spright_core::http1::{ParsedResponse, ResponseError};
use spright_core::http1::{
    ResponseRules, is_in, lists, push_header_lowercase as push_header, visible_ascii,
};

use crate::health::{ACTIVATOR_UA, AUTOSCALING_UA, KUBE_PROBE_UA_PREFIX};

/// Largest request body the fast path buffers; bigger or chunked ones are streamed by hyper.
pub const MAX_FAST_BODY: usize = 64 * 1024;
/// Largest request head the fast path parses; bigger ones go to hyper (which allows 1 MiB).
pub const MAX_FAST_HEAD: usize = 16 * 1024;
/// Largest response head accepted from the user container: the hyper path's limit (Go's
/// `DefaultMaxHeaderBytes` plus its slack, `server::MAX_HEADER_BYTES`).
pub const MAX_RESPONSE_HEAD: usize = (1 << 20) + 4096;
/// Headers parsed on the stack; a request with more goes to hyper.
const MAX_HEADERS: usize = 64;
/// Most response headers accepted, as on the hyper path (`server::MAX_HEADERS`).
const MAX_RESPONSE_HEADERS: usize = 256;

/// Hop-by-hop headers (Go's `hopHeaders`), removed in both directions.
const HOP_BY_HOP: [&str; 9] = [
    "connection",
    "proxy-connection",
    "keep-alive",
    "proxy-authenticate",
    "proxy-authorization",
    "te",
    "trailer",
    "transfer-encoding",
    "upgrade",
];

/// Request headers that send a request to the hyper path whatever their value.
const SLOW_REQUEST_HEADERS: [&str; 6] = [
    "transfer-encoding",
    "upgrade",
    "expect",
    "k-network-probe",
    "k-kubelet-probe",
    "http2-settings",
];

/// Request headers the chain reads: each must appear at most once, as visible ASCII.
const READ: [&str; 10] = [
    "host",
    "content-length",
    "k-original-host",
    "k-proxy-request",
    "user-agent",
    "x-forwarded-for",
    "x-forwarded-proto",
    "x-forwarded-host",
    "forwarded",
    "te",
];
const HOST: usize = 0;
const CONTENT_LENGTH: usize = 1;
const K_ORIGINAL_HOST: usize = 2;
const K_PROXY_REQUEST: usize = 3;
const USER_AGENT: usize = 4;
const XFF: usize = 5;
const XFP: usize = 6;
const XFH: usize = 7;
const FORWARDED: usize = 8;
const TE: usize = 9;

/// A request the fast path serves.
#[derive(Debug, PartialEq, Eq)]
pub struct FastRequest {
    /// Length of the head in the client buffer.
    pub head_len: usize,
    /// Length of the body that follows the head.
    pub body_len: usize,
    /// The client asked to close the connection after this request.
    pub close: bool,
    /// `HEAD`: the response has no body whatever its headers say.
    pub head_method: bool,
    /// Safe to send again when a reused connection closes before answering (Go's
    /// transport: idempotent method or an idempotency key).
    pub replayable: bool,
    /// `K-Proxy-Request: activator`: counted as proxied by the autoscaler stats.
    pub proxied: bool,
    /// The head for the user container, ending with the blank line.
    pub out: Vec<u8>,
}

/// What a (possibly partial) request head allows.
#[derive(Debug, PartialEq, Eq)]
pub enum Parsed {
    /// Incomplete: read more.
    Partial,
    Fast(FastRequest),
    /// For the hyper path.
    Slow,
}

/// Parses a request head from `buf`; `peer` is appended to `X-Forwarded-For`.
pub fn parse_request(buf: &[u8], peer: IpAddr) -> Parsed {
    if buf.len() < 4 && b"PRI ".starts_with(buf) {
        return Parsed::Partial;
    }
    if buf.starts_with(b"PRI ") {
        return Parsed::Slow;
    }
    let mut headers = [httparse::EMPTY_HEADER; MAX_HEADERS];
    let mut req = httparse::Request::new(&mut headers);
    let head_len = match req.parse(buf) {
        Ok(httparse::Status::Complete(n)) => n,
        Ok(httparse::Status::Partial) if buf.len() < MAX_FAST_HEAD => return Parsed::Partial,
        _ => return Parsed::Slow,
    };
    let (Some(method), Some(path), Some(1)) = (req.method, req.path, req.version) else {
        return Parsed::Slow;
    };
    if !path.starts_with('/') || method == "CONNECT" {
        return Parsed::Slow;
    }
    let mut read: [Option<&[u8]>; READ.len()] = [None; READ.len()];
    let mut connection: [&[u8]; 4] = [b""; 4];
    let mut n_conn = 0;
    let mut idempotency_key = false;
    for h in req.headers.iter() {
        let n = h.name;
        if is_in(&SLOW_REQUEST_HEADERS, n) {
            return Parsed::Slow;
        }
        if n.eq_ignore_ascii_case("connection") {
            if n_conn == connection.len() || !visible_ascii(h.value) {
                return Parsed::Slow;
            }
            connection[n_conn] = h.value;
            n_conn += 1;
        } else if let Some(i) = READ.iter().position(|r| n.eq_ignore_ascii_case(r)) {
            if read[i].is_some() || !visible_ascii(h.value) {
                return Parsed::Slow;
            }
            read[i] = Some(h.value);
        }
        idempotency_key |= n.eq_ignore_ascii_case("idempotency-key")
            || n.eq_ignore_ascii_case("x-idempotency-key");
    }
    let connection = &connection[..n_conn];
    if lists(connection, b"upgrade") {
        return Parsed::Slow;
    }
    let Some(host) = read[HOST] else {
        // Go's 400 for a missing Host is the hyper path's.
        return Parsed::Slow;
    };
    let ua = read[USER_AGENT].unwrap_or(b"");
    if [KUBE_PROBE_UA_PREFIX, ACTIVATOR_UA, AUTOSCALING_UA]
        .iter()
        .any(|p| ua.starts_with(p.as_bytes()))
    {
        return Parsed::Slow;
    }
    let body_len = match read[CONTENT_LENGTH] {
        None => 0,
        Some(v) if !v.is_empty() && v.iter().all(u8::is_ascii_digit) => {
            match std::str::from_utf8(v)
                .ok()
                .and_then(|s| s.parse::<usize>().ok())
            {
                Some(l) if l <= MAX_FAST_BODY => l,
                _ => return Parsed::Slow,
            }
        }
        Some(_) => return Parsed::Slow,
    };
    let host = match read[K_ORIGINAL_HOST] {
        Some(o) if !o.is_empty() => o,
        _ => host,
    };
    let mut out = Vec::with_capacity(head_len + 96);
    out.extend_from_slice(method.as_bytes());
    out.push(b' ');
    out.extend_from_slice(path.as_bytes());
    out.extend_from_slice(b" HTTP/1.1\r\n");
    let mut xff_written = false;
    for h in req.headers.iter() {
        let n = h.name;
        if is_in(&HOP_BY_HOP, n)
            || lists(connection, n.as_bytes())
            || n.eq_ignore_ascii_case("k-original-host")
            || n.eq_ignore_ascii_case("knative-serving-revision")
            || n.eq_ignore_ascii_case("knative-serving-namespace")
        {
            continue;
        }
        if n.eq_ignore_ascii_case("host") {
            push_header(&mut out, b"host", host);
        } else if n.eq_ignore_ascii_case("x-forwarded-for") {
            out.extend_from_slice(b"x-forwarded-for: ");
            out.extend_from_slice(h.value);
            let _ = write!(out, ", {}\r\n", peer.to_canonical());
            xff_written = true;
        } else {
            push_header(&mut out, n.as_bytes(), h.value);
        }
    }
    if read[TE].is_some_and(|v| lists(&[v], b"trailers")) {
        out.extend_from_slice(b"te: trailers\r\n");
    }
    // The shim runs before the proxy appends the peer to `X-Forwarded-For`.
    let text = |i: usize| {
        read[i]
            .and_then(|v| std::str::from_utf8(v).ok())
            .unwrap_or("")
    };
    if text(FORWARDED).is_empty()
        && !(text(XFF).is_empty() && text(XFP).is_empty() && text(XFH).is_empty())
    {
        let f = crate::forwarded::generate(text(XFF), text(XFP), text(XFH));
        push_header(&mut out, b"forwarded", f.as_bytes());
    }
    if !xff_written {
        let _ = write!(out, "x-forwarded-for: {}\r\n", peer.to_canonical());
    }
    out.extend_from_slice(b"\r\n");
    Parsed::Fast(FastRequest {
        head_len,
        body_len,
        close: lists(connection, b"close"),
        head_method: method == "HEAD",
        replayable: idempotency_key || matches!(method, "GET" | "HEAD" | "OPTIONS" | "TRACE"),
        proxied: read[K_PROXY_REQUEST] == Some(b"activator"),
        out,
    })
}

/// The hyper path's rules for a response head from the user container: hop-by-hop headers
/// dropped, names lower-cased, a chunked body announced as such.
const RESPONSE_RULES: ResponseRules = ResponseRules {
    max_head: MAX_RESPONSE_HEAD,
    max_headers: MAX_RESPONSE_HEADERS,
    drop: &HOP_BY_HOP,
    lowercase: true,
    rechunk: true,
};

/// Parses a response head to a request that was `HEAD` when `head_method`.
pub fn parse_response(buf: &[u8], head_method: bool) -> Result<ParsedResponse, ResponseError> {
    spright_core::http1::parse_response(buf, head_method, &RESPONSE_RULES)
}

/// The data of the first chunk of a chunked body, as far as `buf` holds it.
pub fn first_chunk_data(buf: &[u8]) -> Option<&[u8]> {
    let line_end = buf.windows(2).position(|w| w == b"\r\n")?;
    let size = buf[..line_end]
        .split(|&b| b == b';')
        .next()
        .and_then(|s| std::str::from_utf8(s).ok())
        .and_then(|s| usize::from_str_radix(s.trim(), 16).ok())?;
    let data = &buf[line_end + 2..];
    Some(&data[..data.len().min(size)]).filter(|d| !d.is_empty())
}

#[cfg(test)]
mod tests {
    use spright_core::http1::{FastResponse, Framing};

    use super::*;

    const PEER: IpAddr = IpAddr::V4(std::net::Ipv4Addr::new(10, 0, 0, 1));

    fn fast(s: &str) -> FastRequest {
        match parse_request(s.as_bytes(), PEER) {
            Parsed::Fast(r) => r,
            other => panic!("not fast: {s:?} {other:?}"),
        }
    }

    fn out(r: &FastRequest) -> String {
        String::from_utf8(r.out.clone()).expect("utf8")
    }

    #[test]
    fn request_rewritten_as_the_chain_does() {
        let r = fast(
            "POST /a?b=1 HTTP/1.1\r\nHost: internal\r\nK-Original-Host: orig.example\r\nKnative-Serving-Namespace: default\r\nKnative-Serving-Revision: hello-00001\r\nConnection: keep-alive, x-hop\r\nX-Hop: 1\r\nTE: trailers, gzip\r\nX-Forwarded-For: 1.1.1.1\r\nX-Forwarded-Proto: https\r\nX-User: kept\r\nK-Proxy-Request: activator\r\nContent-Length: 3\r\n\r\nabc",
        );
        assert_eq!((r.body_len, r.close, r.head_method), (3, false, false));
        assert!(r.proxied && !r.replayable);
        assert_eq!(
            out(&r),
            "POST /a?b=1 HTTP/1.1\r\nhost: orig.example\r\nx-forwarded-for: 1.1.1.1, 10.0.0.1\r\nx-forwarded-proto: https\r\nx-user: kept\r\nk-proxy-request: activator\r\ncontent-length: 3\r\nte: trailers\r\nforwarded: for=1.1.1.1;proto=https\r\n\r\n"
        );
    }

    #[test]
    fn plain_get() {
        let r = fast("GET / HTTP/1.1\r\nHost: a\r\nConnection: close\r\n\r\n");
        assert!(r.close && r.replayable && !r.proxied);
        assert_eq!(
            out(&r),
            "GET / HTTP/1.1\r\nhost: a\r\nx-forwarded-for: 10.0.0.1\r\n\r\n"
        );
        // An empty K-Original-Host keeps the Host.
        let r = fast("GET / HTTP/1.1\r\nHost: a\r\nk-original-host: \r\n\r\n");
        assert!(out(&r).contains("host: a\r\n"));
        let v6 = parse_request(
            b"GET / HTTP/1.1\r\nHost: a\r\n\r\n",
            "::ffff:127.0.0.1".parse().expect("ip"),
        );
        let Parsed::Fast(r) = v6 else {
            panic!("{v6:?}")
        };
        assert!(out(&r).contains("x-forwarded-for: 127.0.0.1\r\n"));
    }

    #[test]
    fn what_goes_to_hyper() {
        for s in [
            "GET / HTTP/1.0\r\nHost: a\r\n\r\n",
            "GET / HTTP/1.1\r\n\r\n",
            "GET http://a/ HTTP/1.1\r\nHost: a\r\n\r\n",
            "CONNECT a:1 HTTP/1.1\r\nHost: a\r\n\r\n",
            "PRI * HTTP/2.0\r\n\r\nSM\r\n\r\n",
            "GET / HTTP/1.1\r\nHost: a\r\nHost: b\r\n\r\n",
            "GET / HTTP/1.1\r\nHost: a\r\nUser-Agent: kube-probe/1.30\r\n\r\n",
            "GET / HTTP/1.1\r\nHost: a\r\nUser-Agent: Knative-Activator-Probe\r\n\r\n",
            "GET / HTTP/1.1\r\nHost: a\r\nUser-Agent: Knative-Autoscaling-Probe\r\n\r\n",
            "GET / HTTP/1.1\r\nHost: a\r\nK-Network-Probe: queue\r\n\r\n",
            "GET / HTTP/1.1\r\nHost: a\r\nK-Kubelet-Probe: 1\r\n\r\n",
            "GET / HTTP/1.1\r\nHost: a\r\nConnection: Upgrade\r\nUpgrade: websocket\r\n\r\n",
            "GET / HTTP/1.1\r\nHost: a\r\nConnection: upgrade\r\n\r\n",
            "POST / HTTP/1.1\r\nHost: a\r\nTransfer-Encoding: chunked\r\n\r\n",
            "POST / HTTP/1.1\r\nHost: a\r\nExpect: 100-continue\r\nContent-Length: 1\r\n\r\n",
            "POST / HTTP/1.1\r\nHost: a\r\nContent-Length: abc\r\n\r\n",
            "POST / HTTP/1.1\r\nHost: a\r\nContent-Length: +1\r\n\r\n",
            "POST / HTTP/1.1\r\nHost: a\r\nContent-Length: 1\r\nContent-Length: 1\r\n\r\n",
            "POST / HTTP/1.1\r\nHost: a\r\nContent-Length: 99999999\r\n\r\n",
            "GET / HTTP/1.1\r\nHost: a\r\nX-Forwarded-For: 1\r\nX-Forwarded-For: 2\r\n\r\n",
            "GET / HTTP/1.1\r\nHost: a\u{e9}\r\n\r\n",
            "GARBAGE\r\n\r\n",
        ] {
            assert_eq!(parse_request(s.as_bytes(), PEER), Parsed::Slow, "{s:?}");
        }
        assert_eq!(
            parse_request(b"GET / HTTP/1.1\r\nHo", PEER),
            Parsed::Partial
        );
        assert_eq!(parse_request(b"PR", PEER), Parsed::Partial);
    }

    fn response(s: &str, head: bool) -> FastResponse {
        match parse_response(s.as_bytes(), head) {
            Ok(ParsedResponse::Complete(r)) => r,
            other => panic!("{s:?}: {other:?}"),
        }
    }

    #[test]
    fn response_heads() {
        let r = response(
            "HTTP/1.1 200 OK\r\nContent-Type: text/plain\r\nConnection: x-drop\r\nX-Drop: 1\r\nKeep-Alive: 5\r\nContent-Length: 5\r\n\r\nhello",
            false,
        );
        assert_eq!(r.framing, Framing::Length(5));
        assert!(r.reusable && !r.sniff && !r.dated);
        assert_eq!(
            String::from_utf8(r.out).expect("utf8"),
            "HTTP/1.1 200 OK\r\ncontent-type: text/plain\r\ncontent-length: 5\r\n"
        );
        let r = response(
            "HTTP/1.1 200 OK\r\nTransfer-Encoding: chunked\r\nContent-Length: 9\r\nDate: x\r\n\r\n",
            false,
        );
        assert_eq!(r.framing, Framing::Chunked);
        assert!(r.sniff && r.dated);
        assert_eq!(
            String::from_utf8(r.out).expect("utf8"),
            "HTTP/1.1 200 OK\r\ndate: x\r\ntransfer-encoding: chunked\r\n"
        );
        let r = response("HTTP/1.0 200 OK\r\n\r\n", false);
        assert_eq!((r.framing, r.reusable), (Framing::UntilClose, false));
        let r = response("HTTP/1.1 204 No Content\r\n\r\n", false);
        assert_eq!((r.framing, r.sniff), (Framing::Empty, false));
        let r = response("HTTP/1.1 200 OK\r\nContent-Length: 5\r\n\r\n", true);
        assert_eq!(r.framing, Framing::Empty);
        assert_eq!(
            parse_response(b"HTTP/1.1 100 Continue\r\n\r\n", false),
            Ok(ParsedResponse::Interim(25))
        );
        assert_eq!(
            parse_response(b"HTTP/1.1 101 Switching\r\n\r\n", false),
            Err(ResponseError::UnexpectedUpgrade)
        );
        assert_eq!(
            parse_response(
                b"HTTP/1.1 200 OK\r\nContent-Length: 1\r\nContent-Length: 2\r\n\r\n",
                false
            ),
            Err(ResponseError::Malformed)
        );
        assert_eq!(
            parse_response(b"HTTP/1.1 200", false),
            Ok(ParsedResponse::Partial)
        );
        // More headers than the stack holds, as many as the hyper path takes.
        let many: String = (0..200).map(|i| format!("x-h{i}: v\r\n")).collect();
        let r = response(
            &format!("HTTP/1.1 200 OK\r\n{many}Content-Length: 0\r\n\r\n"),
            false,
        );
        assert_eq!(r.framing, Framing::Length(0));
        assert!(
            String::from_utf8(r.out)
                .expect("utf8")
                .contains("x-h199: v\r\n")
        );
        let too_many: String = (0..300).map(|i| format!("x-h{i}: v\r\n")).collect();
        assert_eq!(
            parse_response(
                format!("HTTP/1.1 200 OK\r\n{too_many}\r\n").as_bytes(),
                false
            ),
            Err(ResponseError::Malformed)
        );
    }

    #[test]
    fn first_chunk() {
        assert_eq!(first_chunk_data(b"5\r\nhello\r\n"), Some(&b"hello"[..]));
        assert_eq!(first_chunk_data(b"a;e\r\nhel"), Some(&b"hel"[..]));
        assert_eq!(first_chunk_data(b"5\r\n"), None);
        assert_eq!(first_chunk_data(b"5"), None);
    }

    #[test]
    fn random_input_never_panics() {
        use rand::{Rng, SeedableRng};
        let mut rng = rand::rngs::StdRng::seed_from_u64(7);
        let alphabet = b"GETPOST /HTP1.\r\n:abcxz0-9;,\t\xff";
        for _ in 0..5000 {
            let len = rng.gen_range(0..120);
            let b: Vec<u8> = (0..len)
                .map(|_| alphabet[rng.gen_range(0..alphabet.len())])
                .collect();
            let _ = parse_request(&b, PEER);
            let _ = parse_response(&b, rng.r#gen());
            let _ = spright_core::http1::ChunkScanner::default().feed(&b);
            let _ = first_chunk_data(&b);
        }
    }
}
