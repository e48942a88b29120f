//! Go's content sniffing, for answers relayed by components that replace Go servers.
//!
//! Go's `net/http` server gives a response without `Content-Type` the type
//! [`detect`]ed from the first bytes of its body (`server.go` `chunkWriter.writeHeader`;
//! the HTTP/2 server does the same in `h2_bundle.go` `writeChunk`), and Knative's
//! activator and queue-proxy relay pod answers through such servers. [`go_sniffs`] is
//! when that happens, [`detect`] is `http.DetectContentType` (`sniff.go`), and
//! [`chunked_prefix`] reads what the byte-level HTTP/1.1 fast paths have at hand (their
//! head parser, `http1::parse_response`, applies [`go_sniffs`] to the head).

/// How many leading body bytes [`detect`] looks at (Go's `sniffLen`).
pub const SNIFF_LEN: usize = 512;

/// The type of the sniffed answers that are text.
pub const TEXT_PLAIN: &str = "text/plain; charset=utf-8";

/// The HTML signatures: matched case-insensitively after leading whitespace, and followed
/// by a space or `>`.
const HTML: [&[u8]; 17] = [
    b"<!DOCTYPE HTML",
    b"<HTML",
    b"<HEAD",
    b"<SCRIPT",
    b"<IFRAME",
    b"<H1",
    b"<DIV",
    b"<FONT",
    b"<TABLE",
    b"<A",
    b"<STYLE",
    b"<TITLE",
    b"<B",
    b"<BODY",
    b"<BR",
    b"<P",
    b"<!--",
];

/// A signature after the HTML ones, in Go's order: `mask[i] & data[i] == pattern[i]` for
/// every byte (a mask of `None` is all ones, a plain prefix).
struct Sig {
    pattern: &'static [u8],
    mask: Option<&'static [u8]>,
    ct: &'static str,
}

const fn prefix(pattern: &'static [u8], ct: &'static str) -> Sig {
    Sig {
        pattern,
        mask: None,
        ct,
    }
}

const fn masked(pattern: &'static [u8], mask: &'static [u8], ct: &'static str) -> Sig {
    Sig {
        pattern,
        mask: Some(mask),
        ct,
    }
}

/// `RIFF????<four>`: the RIFF containers.
const RIFF_MASK: &[u8] = b"\xFF\xFF\xFF\xFF\x00\x00\x00\x00\xFF\xFF\xFF\xFF";

/// Go's table from `<?xml` (matched after whitespace, see [`detect`]) to the wasm magic;
/// mp4 is checked at its place in the table by [`is_mp4`] (between AVI/WAVE and webm).
const BEFORE_MP4: [Sig; 19] = [
    prefix(b"%PDF-", "application/pdf"),
    prefix(b"%!PS-Adobe-", "application/postscript"),
    // The byte-order marks need two more bytes of any value.
    masked(
        b"\xFE\xFF\x00\x00",
        b"\xFF\xFF\x00\x00",
        "text/plain; charset=utf-16be",
    ),
    masked(
        b"\xFF\xFE\x00\x00",
        b"\xFF\xFF\x00\x00",
        "text/plain; charset=utf-16le",
    ),
    masked(b"\xEF\xBB\xBF\x00", b"\xFF\xFF\xFF\x00", TEXT_PLAIN),
    prefix(b"\x00\x00\x01\x00", "image/x-icon"),
    prefix(b"\x00\x00\x02\x00", "image/x-icon"),
    prefix(b"BM", "image/bmp"),
    prefix(b"GIF87a", "image/gif"),
    prefix(b"GIF89a", "image/gif"),
    masked(
        b"RIFF\x00\x00\x00\x00WEBPVP",
        b"\xFF\xFF\xFF\xFF\x00\x00\x00\x00\xFF\xFF\xFF\xFF\xFF\xFF",
        "image/webp",
    ),
    prefix(b"\x89PNG\x0D\x0A\x1A\x0A", "image/png"),
    prefix(b"\xFF\xD8\xFF", "image/jpeg"),
    masked(b"FORM\x00\x00\x00\x00AIFF", RIFF_MASK, "audio/aiff"),
    prefix(b"ID3", "audio/mpeg"),
    prefix(b"OggS\x00", "application/ogg"),
    prefix(b"MThd\x00\x00\x00\x06", "audio/midi"),
    masked(b"RIFF\x00\x00\x00\x00AVI ", RIFF_MASK, "video/avi"),
    masked(b"RIFF\x00\x00\x00\x00WAVE", RIFF_MASK, "audio/wave"),
];

const AFTER_MP4: [Sig; 12] = [
    prefix(b"\x1A\x45\xDF\xA3", "video/webm"),
    // Embedded OpenType: `LP` at offset 34.
    masked(
        b"\x00\x00\x00\x00\x00\x00\x00\x00\x00\x00\x00\x00\x00\x00\x00\x00\x00\x00\
          \x00\x00\x00\x00\x00\x00\x00\x00\x00\x00\x00\x00\x00\x00\x00\x00LP",
        b"\x00\x00\x00\x00\x00\x00\x00\x00\x00\x00\x00\x00\x00\x00\x00\x00\x00\x00\
          \x00\x00\x00\x00\x00\x00\x00\x00\x00\x00\x00\x00\x00\x00\x00\x00\xFF\xFF",
        "application/vnd.ms-fontobject",
    ),
    prefix(b"\x00\x01\x00\x00", "font/ttf"),
    prefix(b"OTTO", "font/otf"),
    prefix(b"ttcf", "font/collection"),
    prefix(b"wOFF", "font/woff"),
    prefix(b"wOF2", "font/woff2"),
    prefix(b"\x1F\x8B\x08", "application/x-gzip"),
    prefix(b"PK\x03\x04", "application/zip"),
    prefix(b"Rar!\x1A\x07\x00", "application/x-rar-compressed"),
    prefix(b"Rar!\x1A\x07\x01\x00", "application/x-rar-compressed"),
    prefix(b"\x00asm", "application/wasm"),
];

impl Sig {
    fn matches(&self, data: &[u8]) -> bool {
        if data.len() < self.pattern.len() {
            return false;
        }
        match self.mask {
            None => data.starts_with(self.pattern),
            Some(mask) => self
                .pattern
                .iter()
                .zip(mask)
                .zip(data)
                .all(|((p, m), d)| d & m == *p),
        }
    }
}

fn is_ws(b: u8) -> bool {
    matches!(b, b'\t' | b'\n' | b'\x0C' | b'\r' | b' ')
}

fn is_html(data: &[u8], sig: &[u8]) -> bool {
    data.len() > sig.len()
        && data[..sig.len()].eq_ignore_ascii_case(sig)
        && matches!(data[sig.len()], b' ' | b'>')
}

/// An ISO base media file: a `ftyp` box whose brands (past the minor version) name `mp4`.
fn is_mp4(data: &[u8]) -> bool {
    if data.len() < 12 {
        return false;
    }
    let size = u32::from_be_bytes([data[0], data[1], data[2], data[3]]);
    let Ok(size) = usize::try_from(size) else {
        return false;
    };
    if data.len() < size || size % 4 != 0 || &data[4..8] != b"ftyp" {
        return false;
    }
    (8..size)
        .step_by(4)
        .filter(|&at| at != 12)
        .any(|at| data.get(at..at + 3) == Some(b"mp4"))
}

/// Go's `http.DetectContentType`: the content type of a body that starts with `data` (of
/// which the first [`SNIFF_LEN`] bytes count). Never empty; `application/octet-stream`
/// when nothing else fits.
pub fn detect(data: &[u8]) -> &'static str {
    let data = &data[..data.len().min(SNIFF_LEN)];
    let start = data.iter().position(|b| !is_ws(*b)).unwrap_or(data.len());
    let text = &data[start..];
    if HTML.iter().any(|sig| is_html(text, sig)) {
        return "text/html; charset=utf-8";
    }
    if text.starts_with(b"<?xml") {
        return "text/xml; charset=utf-8";
    }
    if let Some(sig) = BEFORE_MP4.iter().find(|s| s.matches(data)) {
        return sig.ct;
    }
    if is_mp4(data) {
        return "video/mp4";
    }
    if let Some(sig) = AFTER_MP4.iter().find(|s| s.matches(data)) {
        return sig.ct;
    }
    let binary = text
        .iter()
        .any(|b| matches!(b, 0x00..=0x08 | 0x0B | 0x0E..=0x1A | 0x1C..=0x1F));
    if binary {
        "application/octet-stream"
    } else {
        TEXT_PLAIN
    }
}

/// Whether Go's server sniffs a `Content-Type` for an answer with this status and these
/// headers (given its first body bytes are not empty): the status allows a body (not 1xx,
/// 204 or 304, Go's `bodyAllowedForStatus`), there is no `Content-Type` header at all (a
/// present but empty one counts as set), and the first `Content-Encoding` value is
/// empty or missing (Go issue 31753). `X-Content-Type-Options: nosniff` plays no part:
/// it tells browsers, not Go's server.
pub fn go_sniffs(status: u16, has_content_type: bool, content_encoding: Option<&[u8]>) -> bool {
    let body_allowed = !(100..200).contains(&status) && status != 204 && status != 304;
    body_allowed && !has_content_type && content_encoding.is_none_or(|v| v.trim_ascii().is_empty())
}

/// The body bytes of the chunks whose size line is in `buf` (a chunked body from its
/// start), as far as they are there, copied into `out` up to its length: what Go's
/// chunked reader returns from its first read of bytes already received. The count
/// copied; 0 when no data is there yet (or the framing is broken: the relay finds out).
pub fn chunked_prefix(buf: &[u8], out: &mut [u8]) -> usize {
    let mut at = 0;
    let mut n = 0;
    while n < out.len() {
        let rest = &buf[at..];
        let Some(eol) = rest.windows(2).position(|w| w == b"\r\n") else {
            break;
        };
        let line = &rest[..eol];
        let digits = line
            .iter()
            .position(|b| !b.is_ascii_hexdigit())
            .unwrap_or(line.len());
        let size = std::str::from_utf8(&line[..digits])
            .ok()
            .and_then(|s| usize::from_str_radix(s, 16).ok());
        let Some(size) = size.filter(|&s| s > 0) else {
            break;
        };
        let data = &rest[eol + 2..];
        let take = size.min(data.len()).min(out.len() - n);
        out[n..n + take].copy_from_slice(&data[..take]);
        n += take;
        if take < size || data.len() < size + 2 {
            break;
        }
        at += eol + 2 + size + 2;
    }
    n
}

#[cfg(test)]
mod tests {
    use super::*;

    /// Inputs and what Go 1.26's `http.DetectContentType` answers for them (checked
    /// against the Go function; several are cases of Go's `sniff_test.go`).
    const GO: &[(&[u8], &str)] = &[
        (b"", TEXT_PLAIN),
        (b"hello", TEXT_PLAIN),
        (b"{\"a\":1}", TEXT_PLAIN),
        (b"\n\t <html><body>", "text/html; charset=utf-8"),
        (b"<HtMl>", "text/html; charset=utf-8"),
        (b"<html", TEXT_PLAIN),
        (b"<htmlx>", TEXT_PLAIN),
        (b"<!DOCTYPE html >", "text/html; charset=utf-8"),
        (b"<!-- c -->", "text/html; charset=utf-8"),
        (b"<p>x", "text/html; charset=utf-8"),
        (b"<?xml version", "text/xml; charset=utf-8"),
        (b"  <?xml", "text/xml; charset=utf-8"),
        (b"%PDF-1.4", "application/pdf"),
        (b"%!PS-Adobe-3.0", "application/postscript"),
        (b"\xFE\xFF\x00\x41", "text/plain; charset=utf-16be"),
        (b"\xFF\xFE\x41\x00", "text/plain; charset=utf-16le"),
        (b"\xFE\xFF", TEXT_PLAIN),
        (b"\xEF\xBB\xBFhi", TEXT_PLAIN),
        (b"\x00\x00\x01\x00\x01", "image/x-icon"),
        (b"\x00\x00\x02\x00\x01", "image/x-icon"),
        (b"BM....", "image/bmp"),
        (b"GIF89a..", "image/gif"),
        (b"RIFF\x01\x02\x03\x04WEBPVP8 ", "image/webp"),
        (b"\x89PNG\x0D\x0A\x1A\x0Axxxx", "image/png"),
        (b"\xFF\xD8\xFF\xE0", "image/jpeg"),
        (b"FORM\x00\x00\x00\x00AIFF", "audio/aiff"),
        (b"ID3\x03", "audio/mpeg"),
        (b"OggS\x00\x02", "application/ogg"),
        (b"MThd\x00\x00\x00\x06\x00\x01", "audio/midi"),
        (b"RIFF\x00\x00\x00\x00AVI LIST", "video/avi"),
        (b"RIFF\x00\x00\x00\x00WAVEfmt ", "audio/wave"),
        (
            b"\x00\x00\x00\x18ftypmp42\x00\x00\x00\x00mp42isom",
            "video/mp4",
        ),
        (b"\x00\x00\x00\x10ftypmp41\x00\x00\x00\x00", "video/mp4"),
        (
            b"\x00\x00\x00\x10ftypisom\x00\x00\x00\x00",
            "application/octet-stream",
        ),
        (b"\x1A\x45\xDF\xA3\x01", "video/webm"),
        (b"\x00\x01\x00\x00\x00", "font/ttf"),
        (b"OTTO\x00", "font/otf"),
        (b"ttcf\x00", "font/collection"),
        (b"wOFF\x00", "font/woff"),
        (b"wOF2\x00", "font/woff2"),
        (b"\x1F\x8B\x08\x00", "application/x-gzip"),
        (b"PK\x03\x04\x14", "application/zip"),
        (b"Rar!\x1A\x07\x00", "application/x-rar-compressed"),
        (b"Rar!\x1A\x07\x01\x00", "application/x-rar-compressed"),
        (b"\x00asm\x01\x00\x00\x00", "application/wasm"),
        (b"\x00\x01", "application/octet-stream"),
        (b"text then \x1B escape", TEXT_PLAIN),
        (b"text then \x1A sub", "application/octet-stream"),
    ];

    #[test]
    fn like_go() {
        for (data, want) in GO {
            assert_eq!(detect(data), *want, "{:?}", String::from_utf8_lossy(data));
        }
    }

    #[test]
    fn only_the_first_512_bytes_count() {
        let mut v = vec![b'a'; SNIFF_LEN];
        v.push(0);
        assert_eq!(detect(&v), TEXT_PLAIN);
        v[SNIFF_LEN - 1] = 0;
        assert_eq!(detect(&v), "application/octet-stream");
        let mut fontobject = vec![0u8; 34];
        fontobject.extend_from_slice(b"LP");
        assert_eq!(detect(&fontobject), "application/vnd.ms-fontobject");
    }

    #[test]
    fn when_go_sniffs() {
        assert!(go_sniffs(200, false, None));
        assert!(go_sniffs(500, false, Some(b"")));
        assert!(!go_sniffs(200, true, None));
        assert!(!go_sniffs(200, false, Some(b"gzip")));
        for s in [100, 103, 204, 304] {
            assert!(!go_sniffs(s, false, None), "{s}");
        }
    }

    #[test]
    fn chunked_prefix_reads_what_is_there() {
        let mut out = [0u8; SNIFF_LEN];
        let n = chunked_prefix(b"5\r\nhello\r\n3;x=y\r\n, w\r\n4\r\norl", &mut out);
        assert_eq!(&out[..n], b"hello, worl");
        assert_eq!(chunked_prefix(b"5\r\nhel", &mut out), 3);
        assert_eq!(chunked_prefix(b"5\r", &mut out), 0);
        assert_eq!(chunked_prefix(b"0\r\n\r\n", &mut out), 0);
        assert_eq!(chunked_prefix(b"zz\r\nhello", &mut out), 0);
        let mut small = [0u8; 4];
        assert_eq!(chunked_prefix(b"5\r\nhello\r\n", &mut small), 4);
        assert_eq!(&small, b"hell");
    }

    #[test]
    fn random_input_never_panics() {
        use rand::{Rng, SeedableRng};
        let mut rng = rand::rngs::StdRng::seed_from_u64(11);
        let mut out = [0u8; 16];
        for _ in 0..5000 {
            let v: Vec<u8> = (0..rng.gen_range(0..64)).map(|_| rng.r#gen()).collect();
            let _ = detect(&v);
            let _ = chunked_prefix(&v, &mut out);
        }
    }
}
