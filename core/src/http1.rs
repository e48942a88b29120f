//! Byte-level HTTP/1.1 pieces shared by the fast paths of queue-proxy-ebpf and
//! activator-lite: header helpers, the response head parsed for its framing and rewritten
//! for the client ([`parse_response`], with each caller's [`ResponseRules`]), the chunked
//! body scanner that finds where a passed-through body ends ([`ChunkScanner`],
//! [`BodyCursor`]), and [`Rewind`], the stream that replays bytes already read from it.

use std::io::{self, Write as _};
use std::pin::Pin;
use std::task::{Context, Poll};

use bytes::{Buf, Bytes, BytesMut};
use tokio::io::{AsyncRead, AsyncWrite, AsyncWriteExt, ReadBuf};

/// Whether `name` is in `list` (case-insensitive).
pub fn is_in(list: &[&str], name: &str) -> bool {
    list.iter().any(|n| n.eq_ignore_ascii_case(name))
}

/// Bytes `http::HeaderValue::to_str` accepts: visible ASCII, space and tab.
pub fn visible_ascii(v: &[u8]) -> bool {
    v.iter().all(|&b| b == b'\t' || (b' '..0x7f).contains(&b))
}

/// Whether the `Connection` values list `token` (case-insensitive).
pub fn lists(connection: &[&[u8]], token: &[u8]) -> bool {
    connection.iter().any(|v| {
        v.split(|&b| b == b',')
            .any(|t| t.trim_ascii().eq_ignore_ascii_case(token))
    })
}

/// Appends `name: value\r\n`, the name as given.
pub fn push_header(out: &mut Vec<u8>, name: &[u8], value: &[u8]) {
    out.extend_from_slice(name);
    push_value(out, value);
}

/// Appends `name: value\r\n` with the name lower-cased (as hyper writes names).
pub fn push_header_lowercase(out: &mut Vec<u8>, name: &[u8], value: &[u8]) {
    out.extend(name.iter().map(u8::to_ascii_lowercase));
    push_value(out, value);
}

fn push_value(out: &mut Vec<u8>, value: &[u8]) {
    out.extend_from_slice(b": ");
    out.extend_from_slice(value);
    out.extend_from_slice(b"\r\n");
}

/// How a response body ends.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Framing {
    /// No body (HEAD, 204, 304).
    Empty,
    Length(u64),
    Chunked,
    /// Read until the upstream closes; the client connection closes after it.
    UntilClose,
}

/// A parsed response head.
#[derive(Debug, PartialEq, Eq)]
pub struct FastResponse {
    pub head_len: usize,
    pub status: u16,
    pub framing: Framing,
    /// The upstream connection may carry another request afterwards.
    pub reusable: bool,
    /// No `Content-Type` and no `Content-Encoding`, on a status that has a body: the client
    /// gets a sniffed one (when Go's server would, [`crate::sniff::go_sniffs`]).
    pub sniff: bool,
    /// The response had a `Date` header.
    pub dated: bool,
    /// Status line and forwarded headers, without the blank line.
    pub out: Vec<u8>,
}

/// Why a response head (or chunked body) is not usable.
#[derive(Debug, thiserror::Error, PartialEq, Eq)]
pub enum ResponseError {
    #[error("malformed HTTP response")]
    Malformed,
    #[error("unexpected 101 Switching Protocols")]
    UnexpectedUpgrade,
}

/// The outcome of parsing bytes from the upstream.
#[derive(Debug, PartialEq, Eq)]
pub enum ParsedResponse {
    Partial,
    /// An interim (1xx) head of this length: skipped.
    Interim(usize),
    Complete(FastResponse),
}

/// What differs between the callers of [`parse_response`].
#[derive(Debug, Clone, Copy)]
pub struct ResponseRules {
    /// Largest head accepted; a longer partial one is malformed.
    pub max_head: usize,
    /// Most headers accepted (at least [`STACK_HEADERS`]; more are parsed on the heap only
    /// when a head has more than that).
    pub max_headers: usize,
    /// Headers not forwarded (besides those the `Connection` header lists).
    pub drop: &'static [&'static str],
    /// Header names are lower-cased in the rewritten head.
    pub lowercase: bool,
    /// `true`: the upstream's `transfer-encoding` is dropped and `transfer-encoding: chunked`
    /// written for a chunked body; `false`: `transfer-encoding` passes as the upstream sent
    /// it, whatever `drop` says (the body passes through in its own framing either way).
    pub rechunk: bool,
}

/// Headers parsed on the stack.
pub const STACK_HEADERS: usize = 64;

/// Parses a response head to a request that was `HEAD` when `head_method`.
pub fn parse_response(
    buf: &[u8],
    head_method: bool,
    rules: &ResponseRules,
) -> Result<ParsedResponse, ResponseError> {
    let mut headers = [httparse::EMPTY_HEADER; STACK_HEADERS];
    let mut resp = httparse::Response::new(&mut headers);
    match resp.parse(buf) {
        Err(httparse::Error::TooManyHeaders) if rules.max_headers > STACK_HEADERS => {
            let mut more = vec![httparse::EMPTY_HEADER; rules.max_headers];
            let mut resp = httparse::Response::new(&mut more);
            let parsed = resp.parse(buf);
            response_from(&resp, parsed, buf.len(), head_method, rules)
        }
        parsed => response_from(&resp, parsed, buf.len(), head_method, rules),
    }
}

fn response_from(
    resp: &httparse::Response<'_, '_>,
    parsed: httparse::Result<usize>,
    buf_len: usize,
    head_method: bool,
    rules: &ResponseRules,
) -> Result<ParsedResponse, ResponseError> {
    let head_len = match parsed {
        Ok(httparse::Status::Complete(n)) => n,
        Ok(httparse::Status::Partial) if buf_len < rules.max_head => {
            return Ok(ParsedResponse::Partial);
        }
        _ => return Err(ResponseError::Malformed),
    };
    let status = resp.code.unwrap_or(0);
    if status == 101 {
        return Err(ResponseError::UnexpectedUpgrade);
    }
    if (100..200).contains(&status) {
        return Ok(ParsedResponse::Interim(head_len));
    }
    let mut reusable = resp.version == Some(1);
    let mut length: Option<u64> = None;
    let mut chunked = None;
    let mut connection: [&[u8]; 4] = [b""; 4];
    let mut n_conn = 0;
    let (mut typed, mut dated) = (false, false);
    let mut encoding: Option<&[u8]> = None;
    for h in resp.headers.iter() {
        let n = h.name;
        if n.eq_ignore_ascii_case("content-length") {
            let l = std::str::from_utf8(h.value)
                .ok()
                .and_then(|v| v.trim().parse::<u64>().ok())
                .ok_or(ResponseError::Malformed)?;
            if length.is_some_and(|p| p != l) {
                return Err(ResponseError::Malformed);
            }
            length = Some(l);
        } else if n.eq_ignore_ascii_case("transfer-encoding") {
            let last = h.value.rsplit(|&b| b == b',').next().unwrap_or(b"");
            chunked = Some(last.trim_ascii().eq_ignore_ascii_case(b"chunked"));
        } else if n.eq_ignore_ascii_case("connection") {
            if n_conn == connection.len() {
                return Err(ResponseError::Malformed);
            }
            connection[n_conn] = h.value;
            n_conn += 1;
        } else if n.eq_ignore_ascii_case("content-type") {
            typed = true;
        } else if n.eq_ignore_ascii_case("content-encoding") {
            // Go's Header.Get: the first value counts.
            encoding = encoding.or(Some(h.value));
        } else if n.eq_ignore_ascii_case("date") {
            dated = true;
        }
    }
    let connection = &connection[..n_conn];
    if lists(connection, b"close") {
        reusable = false;
    }
    let no_body = status == 204 || status == 304;
    let framing = if head_method || no_body {
        Framing::Empty
    } else {
        match (chunked, length) {
            (Some(true), _) => Framing::Chunked,
            (Some(false), _) | (None, None) => Framing::UntilClose,
            (None, Some(l)) => Framing::Length(l),
        }
    };
    if framing == Framing::UntilClose {
        reusable = false;
    }
    let mut out = Vec::with_capacity(head_len + 48);
    let _ = write!(out, "HTTP/1.1 {status} ");
    out.extend_from_slice(resp.reason.unwrap_or("").as_bytes());
    out.extend_from_slice(b"\r\n");
    let push = if rules.lowercase {
        push_header_lowercase
    } else {
        push_header
    };
    for h in resp.headers.iter() {
        let dropped = if h.name.eq_ignore_ascii_case("transfer-encoding") {
            rules.rechunk
        } else {
            is_in(rules.drop, h.name)
        };
        if dropped
            || lists(connection, h.name.as_bytes())
            || (chunked.is_some() && h.name.eq_ignore_ascii_case("content-length"))
        {
            continue;
        }
        push(&mut out, h.name.as_bytes(), h.value);
    }
    if rules.rechunk && framing == Framing::Chunked {
        // The body passes through in its own chunks.
        out.extend_from_slice(b"transfer-encoding: chunked\r\n");
    }
    Ok(ParsedResponse::Complete(FastResponse {
        head_len,
        status,
        framing,
        reusable,
        sniff: crate::sniff::go_sniffs(status, typed, encoding),
        dated,
        out,
    }))
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
enum ChunkState {
    #[default]
    Size,
    Ext,
    SizeLf,
    Data,
    DataCr,
    DataLf,
    TrailerStart,
    TrailerLine,
    TrailerLf,
    FinalLf,
    Done,
}

/// Follows a chunked body as it passes through unchanged, to find where it ends.
#[derive(Debug, Default)]
pub struct ChunkScanner {
    state: ChunkState,
    size: u64,
    digits: u8,
}

/// `next` when `b` is the byte the chunked syntax requires here.
fn want(b: u8, expected: u8, next: ChunkState) -> Result<ChunkState, ResponseError> {
    if b == expected {
        Ok(next)
    } else {
        Err(ResponseError::Malformed)
    }
}

impl ChunkScanner {
    /// Consumes `data`; `Some(n)` when the body ended after its first `n` bytes.
    pub fn feed(&mut self, data: &[u8]) -> Result<Option<usize>, ResponseError> {
        use ChunkState::*;
        let mut i = 0;
        while i < data.len() {
            let b = data[i];
            match self.state {
                Size => match (b as char).to_digit(16) {
                    Some(d) => {
                        self.digits += 1;
                        if self.digits > 15 {
                            return Err(ResponseError::Malformed);
                        }
                        self.size = self.size * 16 + u64::from(d);
                    }
                    None if self.digits == 0 => return Err(ResponseError::Malformed),
                    None => match b {
                        b';' | b' ' | b'\t' => self.state = Ext,
                        b'\r' => self.state = SizeLf,
                        _ => return Err(ResponseError::Malformed),
                    },
                },
                Ext => {
                    if b == b'\r' {
                        self.state = SizeLf;
                    }
                }
                SizeLf => {
                    let next = if self.size == 0 { TrailerStart } else { Data };
                    self.state = want(b, b'\n', next)?;
                }
                Data => {
                    let rest = u64::try_from(data.len() - i).unwrap_or(u64::MAX);
                    let take = rest.min(self.size);
                    self.size -= take;
                    i += usize::try_from(take).unwrap_or(usize::MAX);
                    if self.size == 0 {
                        self.state = DataCr;
                    }
                    continue;
                }
                DataCr => self.state = want(b, b'\r', DataLf)?,
                DataLf => {
                    self.state = want(b, b'\n', Size)?;
                    self.digits = 0;
                }
                TrailerStart => self.state = if b == b'\r' { FinalLf } else { TrailerLine },
                TrailerLine => {
                    if b == b'\r' {
                        self.state = TrailerLf;
                    }
                }
                TrailerLf => self.state = want(b, b'\n', TrailerStart)?,
                FinalLf => {
                    self.state = want(b, b'\n', Done)?;
                    return Ok(Some(i + 1));
                }
                Done => return Ok(Some(i)),
            }
            i += 1;
        }
        Ok((self.state == Done).then_some(i))
    }

    /// Between chunks: a chunk of our own can be written here.
    pub fn at_boundary(&self) -> bool {
        self.state == ChunkState::Size && self.digits == 0
    }
}

/// Where a response body passed through in its own [`Framing`] ends.
#[derive(Debug)]
pub struct BodyCursor {
    framing: Framing,
    left: u64,
    scanner: ChunkScanner,
}

impl BodyCursor {
    pub fn new(framing: Framing) -> Self {
        let left = match framing {
            Framing::Length(n) => n,
            _ => 0,
        };
        Self {
            framing,
            left,
            scanner: ChunkScanner::default(),
        }
    }

    /// How much of `data` (the next bytes from the upstream) belongs to the body, and
    /// whether the body is complete after it.
    pub fn take(&mut self, data: &[u8]) -> Result<(usize, bool), ResponseError> {
        match self.framing {
            Framing::Empty => Ok((0, true)),
            Framing::Length(_) => {
                let n = u64::try_from(data.len()).unwrap_or(u64::MAX).min(self.left);
                self.left -= n;
                Ok((usize::try_from(n).unwrap_or(usize::MAX), self.left == 0))
            }
            Framing::Chunked => match self.scanner.feed(data)? {
                Some(n) => Ok((n, true)),
                None => Ok((data.len(), false)),
            },
            Framing::UntilClose => Ok((data.len(), false)),
        }
    }

    /// Writes `head` (when given) and then the body bytes at the start of `buf` to
    /// `client`, consuming them from `buf`; whether the body is complete. A chunked body
    /// that breaks the syntax is an `InvalidData` error.
    pub async fn pass<W: AsyncWrite + Unpin>(
        &mut self,
        client: &mut W,
        buf: &mut BytesMut,
        head: Option<Vec<u8>>,
    ) -> io::Result<bool> {
        let (n, complete) = self
            .take(buf)
            .map_err(|e| io::Error::new(io::ErrorKind::InvalidData, e))?;
        match head {
            Some(mut head) => {
                head.extend_from_slice(&buf[..n]);
                client.write_all(&head).await?;
            }
            None => client.write_all(&buf[..n]).await?,
        }
        buf.advance(n);
        Ok(complete)
    }

    /// The upstream closed before the body was complete: the end of a body that ends when
    /// the upstream closes, else an `UnexpectedEof` error saying `what`.
    pub fn upstream_closed(&self, what: &'static str) -> io::Result<()> {
        if self.framing == Framing::UntilClose {
            Ok(())
        } else {
            Err(io::Error::new(io::ErrorKind::UnexpectedEof, what))
        }
    }

    /// A chunked body is between chunks (see [`ChunkScanner::at_boundary`]).
    pub fn at_chunk_boundary(&self) -> bool {
        self.scanner.at_boundary()
    }
}

/// A stream that first yields the bytes already read from it (a connection the fast path
/// looked at and hands on).
#[derive(Debug)]
pub struct Rewind<S> {
    pre: Bytes,
    inner: S,
}

impl<S> Rewind<S> {
    pub fn new(pre: Bytes, inner: S) -> Self {
        Self { pre, inner }
    }
}

impl<S: AsyncRead + Unpin> AsyncRead for Rewind<S> {
    fn poll_read(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        out: &mut ReadBuf<'_>,
    ) -> Poll<io::Result<()>> {
        if self.pre.is_empty() {
            return Pin::new(&mut self.inner).poll_read(cx, out);
        }
        let n = self.pre.len().min(out.remaining());
        out.put_slice(&self.pre[..n]);
        self.pre.advance(n);
        Poll::Ready(Ok(()))
    }
}

impl<S: AsyncWrite + Unpin> AsyncWrite for Rewind<S> {
    fn poll_write(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        data: &[u8],
    ) -> Poll<io::Result<usize>> {
        Pin::new(&mut self.inner).poll_write(cx, data)
    }

    fn poll_write_vectored(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        bufs: &[io::IoSlice<'_>],
    ) -> Poll<io::Result<usize>> {
        Pin::new(&mut self.inner).poll_write_vectored(cx, bufs)
    }

    fn is_write_vectored(&self) -> bool {
        self.inner.is_write_vectored()
    }

    fn poll_flush(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        Pin::new(&mut self.inner).poll_flush(cx)
    }

    fn poll_shutdown(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        Pin::new(&mut self.inner).poll_shutdown(cx)
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use rand::{Rng, SeedableRng};

    const KEEP_TE: ResponseRules = ResponseRules {
        max_head: 64 * 1024,
        max_headers: STACK_HEADERS,
        drop: &["connection", "keep-alive", "te", "transfer-encoding"],
        lowercase: false,
        rechunk: false,
    };
    const RECHUNK: ResponseRules = ResponseRules {
        max_head: 1 << 20,
        max_headers: 256,
        drop: &["connection", "keep-alive", "te"],
        lowercase: true,
        rechunk: true,
    };

    fn complete(s: &str, rules: &ResponseRules) -> FastResponse {
        match parse_response(s.as_bytes(), false, rules) {
            Ok(ParsedResponse::Complete(r)) => r,
            other => panic!("{s:?}: {other:?}"),
        }
    }

    #[test]
    fn rules_shape_the_rewritten_head() {
        let head =
            "HTTP/1.1 200 OK\r\nX-A: 1\r\nTransfer-Encoding: chunked\r\nContent-Length: 3\r\n\r\n";
        let r = complete(head, &KEEP_TE);
        assert_eq!(r.framing, Framing::Chunked);
        assert_eq!(
            String::from_utf8(r.out).expect("utf8"),
            "HTTP/1.1 200 OK\r\nX-A: 1\r\nTransfer-Encoding: chunked\r\n"
        );
        let r = complete(head, &RECHUNK);
        assert_eq!(
            String::from_utf8(r.out).expect("utf8"),
            "HTTP/1.1 200 OK\r\nx-a: 1\r\ntransfer-encoding: chunked\r\n"
        );
        // More headers than the stack holds: only for rules that allow them.
        let many: String = (0..100).map(|i| format!("x-h{i}: v\r\n")).collect();
        let head = format!("HTTP/1.1 200 OK\r\n{many}\r\n");
        assert_eq!(
            parse_response(head.as_bytes(), false, &KEEP_TE),
            Err(ResponseError::Malformed)
        );
        assert!(matches!(
            parse_response(head.as_bytes(), false, &RECHUNK),
            Ok(ParsedResponse::Complete(_))
        ));
        // The head size limit is the caller's.
        let long = format!("HTTP/1.1 200 OK\r\nx-a: {}", "v".repeat(70 * 1024));
        assert_eq!(
            parse_response(long.as_bytes(), false, &KEEP_TE),
            Err(ResponseError::Malformed)
        );
        assert_eq!(
            parse_response(long.as_bytes(), false, &RECHUNK),
            Ok(ParsedResponse::Partial)
        );
    }

    #[test]
    fn sniffing_follows_go() {
        let sniff = |head: &str| complete(head, &RECHUNK).sniff;
        assert!(sniff("HTTP/1.1 200 OK\r\nContent-Length: 2\r\n\r\n"));
        assert!(!sniff("HTTP/1.1 200 OK\r\nContent-Type: x/y\r\n\r\n"));
        // Present but empty still counts as set.
        assert!(!sniff("HTTP/1.1 200 OK\r\nContent-Type:\r\n\r\n"));
        assert!(!sniff("HTTP/1.1 204 No Content\r\n\r\n"));
        // A Content-Encoding stops it; Go reads the first value (an empty one does not).
        assert!(!sniff(
            "HTTP/1.1 200 OK\r\nContent-Encoding: gzip\r\nContent-Length: 2\r\n\r\n"
        ));
        assert!(sniff(
            "HTTP/1.1 200 OK\r\nContent-Encoding:\r\nContent-Encoding: br\r\nContent-Length: 2\r\n\r\n"
        ));
    }

    #[test]
    fn chunks() {
        let body = b"5\r\nhello\r\n3;x=1\r\nabc\r\n0\r\nTrailer: t\r\n\r\nNEXT";
        for split in 0..body.len() {
            let mut s = ChunkScanner::default();
            let first = s.feed(&body[..split]).expect("ok");
            let end = match first {
                Some(n) => n,
                None => split + s.feed(&body[split..]).expect("ok").expect("ends"),
            };
            assert_eq!(&body[end..], b"NEXT", "split {split}");
        }
        let mut s = ChunkScanner::default();
        assert!(s.at_boundary());
        assert_eq!(s.feed(b"5\r\nhel"), Ok(None));
        assert!(!s.at_boundary());
        assert_eq!(s.feed(b"lo\r\n"), Ok(None));
        assert!(s.at_boundary());
        assert!(ChunkScanner::default().feed(b"x\r\n").is_err());
    }

    /// Encodes `body` in chunks of random sizes, with extensions and trailers now and then.
    fn encode_chunked(body: &[u8], rng: &mut rand::rngs::StdRng) -> Vec<u8> {
        let mut out = Vec::new();
        let mut rest = body;
        while !rest.is_empty() {
            let n = rng.gen_range(1..=rest.len());
            out.extend_from_slice(format!("{n:x}").as_bytes());
            if rng.gen_bool(0.2) {
                out.extend_from_slice(b";ext=1");
            }
            out.extend_from_slice(b"\r\n");
            out.extend_from_slice(&rest[..n]);
            out.extend_from_slice(b"\r\n");
            rest = &rest[n..];
        }
        out.extend_from_slice(b"0\r\n");
        if rng.gen_bool(0.3) {
            out.extend_from_slice(b"X-Trailer: 1\r\n");
        }
        out.extend_from_slice(b"\r\n");
        out
    }

    #[test]
    fn chunk_scanner_finds_the_end_in_random_splits() {
        let mut rng = rand::rngs::StdRng::seed_from_u64(7);
        for _ in 0..2000 {
            let len = rng.gen_range(0..300);
            let body: Vec<u8> = (0..len).map(|_| rng.r#gen()).collect();
            let enc = encode_chunked(&body, &mut rng);
            let mut wire = enc.clone();
            wire.extend_from_slice(b"HTTP/1.1 200 OK\r\n");
            let mut cursor = BodyCursor::new(Framing::Chunked);
            let mut pos = 0;
            let end = loop {
                let step = rng.gen_range(1..=16).min(wire.len() - pos);
                match cursor.take(&wire[pos..pos + step]).expect("valid") {
                    (n, true) => break pos + n,
                    (n, false) => pos += n,
                }
                assert!(pos < wire.len(), "never ended");
            };
            assert_eq!(end, enc.len());
        }
    }

    #[test]
    fn chunk_scanner_rejects_garbage_without_panicking() {
        assert!(ChunkScanner::default().feed(b"zz\r\n").is_err());
        assert!(ChunkScanner::default().feed(b"3\r\nabcX").is_err());
        assert!(
            ChunkScanner::default()
                .feed(b"ffffffffffffffffff\r\n")
                .is_err()
        );
        let mut rng = rand::rngs::StdRng::seed_from_u64(3);
        for _ in 0..5000 {
            let data: Vec<u8> = (0..rng.gen_range(0..64))
                .map(|_| {
                    *b"0123456789abcdef\r\n; xZ"
                        .get(rng.gen_range(0..23))
                        .unwrap_or(&b'0')
                })
                .collect();
            let _ = ChunkScanner::default().feed(&data);
            let _ = parse_response(&data, false, &RECHUNK);
        }
    }

    #[test]
    fn body_cursor_by_framing() {
        let mut c = BodyCursor::new(Framing::Length(5));
        assert_eq!(c.take(b"abc"), Ok((3, false)));
        assert_eq!(c.take(b"defgh"), Ok((2, true)));
        assert_eq!(BodyCursor::new(Framing::Empty).take(b"x"), Ok((0, true)));
        assert_eq!(
            BodyCursor::new(Framing::UntilClose).take(b"xyz"),
            Ok((3, false))
        );
        let mut c = BodyCursor::new(Framing::Chunked);
        assert!(c.at_chunk_boundary());
        assert_eq!(c.take(b"1\r\na\r\n0\r\n\r\nrest"), Ok((11, true)));
        assert!(BodyCursor::new(Framing::Chunked).take(b"q").is_err());
        assert!(
            BodyCursor::new(Framing::UntilClose)
                .upstream_closed("x")
                .is_ok()
        );
        let e = BodyCursor::new(Framing::Length(1)).upstream_closed("gone");
        assert_eq!(e.map_err(|e| e.kind()), Err(io::ErrorKind::UnexpectedEof));
    }

    #[tokio::test]
    async fn body_cursor_passes_head_then_body() {
        let mut c = BodyCursor::new(Framing::Length(4));
        let mut out = Vec::new();
        let mut buf = BytesMut::from(&b"ab"[..]);
        let done = c.pass(&mut out, &mut buf, Some(b"H|".to_vec())).await;
        assert!(!done.expect("write") && buf.is_empty());
        buf.extend_from_slice(b"cdNEXT");
        assert!(c.pass(&mut out, &mut buf, None).await.expect("write"));
        assert_eq!((&out[..], &buf[..]), (&b"H|abcd"[..], &b"NEXT"[..]));
        let mut c = BodyCursor::new(Framing::Chunked);
        let mut buf = BytesMut::from(&b"zz"[..]);
        let e = c
            .pass(&mut out, &mut buf, None)
            .await
            .expect_err("bad chunk");
        assert_eq!(e.kind(), io::ErrorKind::InvalidData);
    }

    #[tokio::test]
    async fn rewind_replays_then_reads_on() {
        use tokio::io::{AsyncReadExt, AsyncWriteExt};
        let (a, mut b) = tokio::io::duplex(64);
        let mut r = Rewind::new(Bytes::from_static(b"head"), a);
        b.write_all(b" tail").await.expect("write");
        drop(b);
        let mut got = String::new();
        r.read_to_string(&mut got).await.expect("read");
        assert_eq!(got, "head tail");
    }
}
