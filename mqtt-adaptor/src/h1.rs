//! The lean HTTP/1.1 exchange of the source's delivery workers with a plain `http://` sink:
//! a request encoded into one buffer (one write), the response read in the worker's own task
//! (no connection task, no channel hop per event) and framed by the pure functions below.
//!
//! By default one request, then its whole response, on a keep-alive connection; with
//! `--sink-pipeline` several requests are written at once and [`frame_response`] takes their
//! answers off the connection in order. Response framing follows RFC 9112 section 6.3: no body for 1xx (skipped), 204
//! and 304; chunked when `Transfer-Encoding` ends in `chunked`; else `Content-Length`; else
//! until the sink closes.

use bytes::Bytes;

/// Longest response head accepted.
pub const MAX_HEAD: usize = 64 * 1024;
/// Largest response body read to keep the connection; a larger one closes it instead.
pub const MAX_BODY: usize = 1024 * 1024;
/// Bytes of the body kept for error messages.
pub const KEEP_BODY: usize = 256;

#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum H1Error {
    #[error("malformed HTTP response: {0}")]
    Malformed(String),
    #[error("HTTP response head over {MAX_HEAD} bytes")]
    HeadTooLarge,
    #[error("malformed chunked body")]
    BadChunk,
    #[error("the sink switched protocols (101)")]
    Upgrade,
}

/// How the body of a response is delimited.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum BodyLen {
    Empty,
    Length(usize),
    Chunked,
    UntilClose,
}

/// A final (non-1xx) response head.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ResponseHead {
    pub status: u16,
    /// Bytes before the body, including skipped 1xx responses.
    pub head_len: usize,
    pub body: BodyLen,
    /// The connection cannot be reused after this response.
    pub close: bool,
}

/// Parses the response head at the start of `buf`, skipping interim 1xx responses:
/// `Ok(None)` while incomplete.
pub fn parse_head(buf: &[u8]) -> Result<Option<ResponseHead>, H1Error> {
    let mut offset = 0;
    loop {
        let rest = &buf[offset..];
        let mut headers = [httparse::EMPTY_HEADER; 64];
        let mut resp = httparse::Response::new(&mut headers);
        let len = match resp.parse(rest) {
            Ok(httparse::Status::Complete(len)) => len,
            Ok(httparse::Status::Partial) => {
                return if rest.len() > MAX_HEAD {
                    Err(H1Error::HeadTooLarge)
                } else {
                    Ok(None)
                };
            }
            Err(e) => return Err(H1Error::Malformed(e.to_string())),
        };
        if len > MAX_HEAD {
            return Err(H1Error::HeadTooLarge);
        }
        let status = resp.code.unwrap_or(0);
        if status == 101 {
            return Err(H1Error::Upgrade);
        }
        if (100..200).contains(&status) {
            offset += len;
            continue;
        }
        let mut close = resp.version != Some(1);
        let mut length: Option<usize> = None;
        let mut chunked = false;
        for h in resp.headers.iter() {
            if h.name.eq_ignore_ascii_case("content-length") {
                let v = std::str::from_utf8(h.value)
                    .ok()
                    .and_then(|v| v.trim().parse::<usize>().ok())
                    .ok_or_else(|| H1Error::Malformed("bad content-length".into()))?;
                if length.is_some_and(|l| l != v) {
                    return Err(H1Error::Malformed("conflicting content-length".into()));
                }
                length = Some(v);
            } else if h.name.eq_ignore_ascii_case("transfer-encoding") {
                let last = h.value.rsplit(|&b| b == b',').next().unwrap_or_default();
                chunked = last.trim_ascii().eq_ignore_ascii_case(b"chunked");
                if !chunked {
                    // A transfer coding other than chunked: delimited by close (RFC 9112 6.3).
                    close = true;
                }
            } else if h.name.eq_ignore_ascii_case("connection") {
                for token in h.value.split(|&b| b == b',') {
                    let token = token.trim_ascii();
                    if token.eq_ignore_ascii_case(b"close") {
                        close = true;
                    } else if token.eq_ignore_ascii_case(b"keep-alive") && resp.version == Some(0) {
                        close = false;
                    }
                }
            }
        }
        let body = if status == 204 || status == 304 {
            BodyLen::Empty
        } else if chunked {
            BodyLen::Chunked
        } else if close && length.is_none() {
            BodyLen::UntilClose
        } else {
            match length {
                Some(0) => BodyLen::Empty,
                Some(n) => BodyLen::Length(n),
                None => {
                    close = true;
                    BodyLen::UntilClose
                }
            }
        };
        return Ok(Some(ResponseHead {
            status,
            head_len: offset + len,
            body,
            close,
        }));
    }
}

/// Scans a chunked body at the start of `buf`: `Ok(Some(n))` when it is complete in the first
/// `n` bytes (trailers included), `Ok(None)` while incomplete. Up to [`KEEP_BODY`] bytes of
/// chunk data are appended to `keep` (only on the call that completes, so retries do not
/// duplicate them).
pub fn chunked_len(buf: &[u8], keep: &mut Vec<u8>) -> Result<Option<usize>, H1Error> {
    let mut data: Vec<&[u8]> = Vec::new();
    let mut pos = 0usize;
    loop {
        let Some(eol) = find_crlf(&buf[pos..]) else {
            return if buf.len() - pos > 1024 {
                Err(H1Error::BadChunk)
            } else {
                Ok(None)
            };
        };
        let line = &buf[pos..pos + eol];
        let size_text = line.split(|&b| b == b';').next().unwrap_or_default();
        let size_text =
            std::str::from_utf8(size_text.trim_ascii()).map_err(|_| H1Error::BadChunk)?;
        if size_text.is_empty() || size_text.len() > 15 {
            return Err(H1Error::BadChunk);
        }
        let size = usize::from_str_radix(size_text, 16).map_err(|_| H1Error::BadChunk)?;
        pos += eol + 2;
        if size == 0 {
            // Trailer fields until an empty line.
            loop {
                let Some(eol) = find_crlf(&buf[pos..]) else {
                    return if buf.len() - pos > MAX_HEAD {
                        Err(H1Error::BadChunk)
                    } else {
                        Ok(None)
                    };
                };
                pos += eol + 2;
                if eol == 0 {
                    for d in data {
                        let room = KEEP_BODY.saturating_sub(keep.len());
                        keep.extend_from_slice(&d[..d.len().min(room)]);
                    }
                    return Ok(Some(pos));
                }
            }
        }
        let end = pos.checked_add(size).ok_or(H1Error::BadChunk)?;
        if buf.len() < end + 2 {
            return Ok(None);
        }
        if &buf[end..end + 2] != b"\r\n" {
            return Err(H1Error::BadChunk);
        }
        data.push(&buf[pos..end]);
        pos = end + 2;
    }
}

/// One whole response at the start of a pipelined connection's buffer.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Framed {
    pub status: u16,
    /// Bytes of the buffer it took (head and body).
    pub len: usize,
    /// Up to [`KEEP_BODY`] bytes of its body, for error messages.
    pub body: Bytes,
    /// Nothing more can be read from the connection after it: the sink closes it, or the body
    /// is delimited by the close or too large to read (`len` then takes the whole buffer).
    pub close: bool,
}

/// Frames the response at the start of `buf`: `Ok(None)` while incomplete.
pub fn frame_response(buf: &[u8]) -> Result<Option<Framed>, H1Error> {
    let Some(head) = parse_head(buf)? else {
        return Ok(None);
    };
    let body = &buf[head.head_len..];
    let whole = |keep: &[u8]| Framed {
        status: head.status,
        len: buf.len(),
        body: Bytes::copy_from_slice(&keep[..keep.len().min(KEEP_BODY)]),
        close: true,
    };
    let (body_len, keep) = match head.body {
        BodyLen::Empty => (0, Bytes::new()),
        BodyLen::Length(n) if n > MAX_BODY => return Ok(Some(whole(body))),
        BodyLen::Length(n) if body.len() < n => return Ok(None),
        BodyLen::Length(n) => (n, Bytes::copy_from_slice(&body[..n.min(KEEP_BODY)])),
        BodyLen::Chunked => {
            let mut keep = Vec::new();
            match chunked_len(body, &mut keep)? {
                Some(n) => (n, Bytes::from(keep)),
                None if body.len() > MAX_BODY => return Ok(Some(whole(b""))),
                None => return Ok(None),
            }
        }
        BodyLen::UntilClose => return Ok(Some(whole(body))),
    };
    Ok(Some(Framed {
        status: head.status,
        len: head.head_len + body_len,
        body: keep,
        close: head.close,
    }))
}

fn find_crlf(hay: &[u8]) -> Option<usize> {
    hay.windows(2).position(|w| w == b"\r\n")
}

/// Appends `POST <path> HTTP/1.1` with `headers` (values are valid header values by
/// construction) and a `Content-Length` body to `out`.
pub fn encode_request(
    out: &mut Vec<u8>,
    path: &str,
    host: &[u8],
    headers: &http::HeaderMap,
    body: &Bytes,
) {
    out.reserve(256 + body.len());
    out.extend_from_slice(b"POST ");
    out.extend_from_slice(path.as_bytes());
    out.extend_from_slice(b" HTTP/1.1\r\nhost: ");
    out.extend_from_slice(host);
    out.extend_from_slice(b"\r\n");
    for (name, value) in headers {
        out.extend_from_slice(name.as_str().as_bytes());
        out.extend_from_slice(b": ");
        out.extend_from_slice(value.as_bytes());
        out.extend_from_slice(b"\r\n");
    }
    out.extend_from_slice(b"content-length: ");
    out.extend_from_slice(body.len().to_string().as_bytes());
    out.extend_from_slice(b"\r\n\r\n");
    out.extend_from_slice(body);
}

#[cfg(test)]
mod tests {
    use super::*;

    fn head(s: &[u8]) -> ResponseHead {
        parse_head(s).unwrap().unwrap()
    }

    #[test]
    fn framing() {
        let h = head(b"HTTP/1.1 202 Accepted\r\ncontent-length: 0\r\n\r\n");
        assert_eq!((h.status, h.body, h.close), (202, BodyLen::Empty, false));
        let h = head(b"HTTP/1.1 503 x\r\nContent-Length: 5\r\n\r\nbusy!");
        assert_eq!((h.status, h.body), (503, BodyLen::Length(5)));
        let h = head(
            b"HTTP/1.1 200 OK\r\nTransfer-Encoding: gzip, chunked\r\nContent-Length: 3\r\n\r\n",
        );
        assert_eq!(h.body, BodyLen::Chunked);
        let h = head(b"HTTP/1.1 200 OK\r\nConnection: close\r\n\r\n");
        assert_eq!((h.body, h.close), (BodyLen::UntilClose, true));
        let h = head(b"HTTP/1.0 200 OK\r\ncontent-length: 2\r\n\r\nok");
        assert!(h.close);
        let h = head(b"HTTP/1.0 200 OK\r\nConnection: keep-alive\r\ncontent-length: 2\r\n\r\nok");
        assert!(!h.close);
        let h = head(b"HTTP/1.1 204 No Content\r\ncontent-length: 9\r\n\r\n");
        assert_eq!(h.body, BodyLen::Empty);
        let h = head(b"HTTP/1.1 200 OK\r\n\r\n");
        assert_eq!((h.body, h.close), (BodyLen::UntilClose, true));
        let interim =
            b"HTTP/1.1 100 Continue\r\n\r\nHTTP/1.1 202 Accepted\r\ncontent-length: 0\r\n\r\n";
        let h = head(interim);
        assert_eq!((h.status, h.head_len), (202, interim.len()));
        assert_eq!(parse_head(b"HTTP/1.1 202 Acc").unwrap(), None);
        assert!(parse_head(b"HTTP/1.1 101 Switching\r\n\r\n").is_err());
        assert!(parse_head(b"garbage\r\n\r\n").is_err());
        assert!(
            parse_head(b"HTTP/1.1 200 OK\r\ncontent-length: 1\r\ncontent-length: 2\r\n\r\n")
                .is_err()
        );
        assert!(parse_head(b"HTTP/1.1 200 OK\r\ncontent-length: -1\r\n\r\n").is_err());
        let mut big = b"HTTP/1.1 200 OK\r\nx: ".to_vec();
        big.resize(MAX_HEAD + 10, b'a');
        assert_eq!(parse_head(&big), Err(H1Error::HeadTooLarge));
    }

    #[test]
    fn pipelined_responses_in_order() {
        let two = b"HTTP/1.1 202 Accepted\r\ncontent-length: 0\r\n\r\nHTTP/1.1 503 x\r\nTransfer-Encoding: chunked\r\n\r\n4\r\nbusy\r\n0\r\n\r\nHTTP/1.1 2";
        let a = frame_response(two).unwrap().unwrap();
        assert_eq!((a.status, a.close, &a.body[..]), (202, false, &b""[..]));
        let rest = &two[a.len..];
        let b = frame_response(rest).unwrap().unwrap();
        assert_eq!((b.status, b.close, &b.body[..]), (503, false, &b"busy"[..]));
        assert_eq!(frame_response(&rest[b.len..]).unwrap(), None);
        for cut in 0..a.len {
            assert_eq!(frame_response(&two[..cut]).unwrap(), None, "cut {cut}");
        }
        let l = b"HTTP/1.1 500 x\r\ncontent-length: 3\r\n\r\nabcHTTP";
        let f = frame_response(l).unwrap().unwrap();
        assert_eq!((f.len, &f.body[..]), (l.len() - 4, &b"abc"[..]));
        assert_eq!(frame_response(&l[..l.len() - 5]).unwrap(), None);
        let c = b"HTTP/1.1 200 OK\r\nconnection: close\r\n\r\nuntil close";
        let f = frame_response(c).unwrap().unwrap();
        assert_eq!(
            (f.len, f.close, &f.body[..]),
            (c.len(), true, &b"until close"[..])
        );
        let k = b"HTTP/1.1 202 Accepted\r\nconnection: close\r\ncontent-length: 0\r\n\r\n";
        assert!(frame_response(k).unwrap().unwrap().close);
        assert!(
            frame_response(b"HTTP/1.1 200 OK\r\ntransfer-encoding: chunked\r\n\r\nzz\r\n").is_err()
        );
    }

    #[test]
    fn chunked_bodies() {
        let body = b"4;ext=1\r\nbusy\r\n3\r\n!!!\r\n0\r\nx-trailer: 1\r\n\r\nNEXT";
        let mut keep = Vec::new();
        assert_eq!(chunked_len(body, &mut keep), Ok(Some(body.len() - 4)));
        assert_eq!(keep, b"busy!!!");
        for cut in 0..body.len() - 4 {
            let mut keep = Vec::new();
            assert_eq!(chunked_len(&body[..cut], &mut keep), Ok(None), "cut {cut}");
            assert!(keep.is_empty());
        }
        assert!(chunked_len(b"zz\r\n", &mut Vec::new()).is_err());
        assert!(chunked_len(b"2\r\nabc\r\n", &mut Vec::new()).is_err());
        assert!(chunked_len(b"ffffffffffffffffff\r\n", &mut Vec::new()).is_err());
    }

    #[test]
    fn request_encoding() {
        let mut h = http::HeaderMap::new();
        h.insert("ce-id", http::HeaderValue::from_static("1"));
        let mut out = Vec::new();
        encode_request(
            &mut out,
            "/a?b",
            b"sink:80",
            &h,
            &Bytes::from_static(b"xyz"),
        );
        assert_eq!(
            out,
            b"POST /a?b HTTP/1.1\r\nhost: sink:80\r\nce-id: 1\r\ncontent-length: 3\r\n\r\nxyz"
        );
    }
}
