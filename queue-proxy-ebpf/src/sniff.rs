//! Go's `http.DetectContentType` (the WHATWG sniffing subset Go implements): Knative's server
//! adds the sniffed `Content-Type` to every response that has a body and none of its own,
//! including proxied ones, so clients see the same header through ours.

use std::pin::Pin;
use std::task::{Context, Poll};

use bytes::Bytes;
use http_body::{Body as HttpBody, Frame, SizeHint};

const HTML_TAGS: [&[u8]; 17] = [
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

const MAGIC: [(&[u8], &str); 14] = [
    (b"%PDF-", "application/pdf"),
    (b"%!PS-Adobe-", "application/postscript"),
    (b"GIF87a", "image/gif"),
    (b"GIF89a", "image/gif"),
    (b"\x89PNG\x0D\x0A\x1A\x0A", "image/png"),
    (b"\xFF\xD8\xFF", "image/jpeg"),
    (b"BM", "image/bmp"),
    (b"\x00\x00\x01\x00", "image/x-icon"),
    (b"\x1F\x8B\x08", "application/x-gzip"),
    (b"PK\x03\x04", "application/zip"),
    (b"Rar!\x1A\x07\x00", "application/x-rar-compressed"),
    (b"\x00asm", "application/wasm"),
    (b"OggS\x00", "application/ogg"),
    (b"\x1A\x45\xDF\xA3", "video/webm"),
];

fn is_ws(b: u8) -> bool {
    matches!(b, b'\t' | b'\n' | b'\x0C' | b'\r' | b' ')
}

fn is_tag_end(b: u8) -> bool {
    b == b' ' || b == b'>'
}

/// The content type Go would sniff from the first bytes of a body.
pub fn detect(data: &[u8]) -> &'static str {
    let data = &data[..data.len().min(512)];
    if data.starts_with(b"\xFE\xFF") {
        return "text/plain; charset=utf-16be";
    }
    if data.starts_with(b"\xFF\xFE") {
        return "text/plain; charset=utf-16le";
    }
    if data.starts_with(b"\xEF\xBB\xBF") {
        return "text/plain; charset=utf-8";
    }
    let start = data.iter().position(|b| !is_ws(*b)).unwrap_or(data.len());
    let trimmed = &data[start..];
    for tag in HTML_TAGS {
        if trimmed.len() > tag.len()
            && trimmed[..tag.len()].eq_ignore_ascii_case(tag)
            && is_tag_end(trimmed[tag.len()])
        {
            return "text/html; charset=utf-8";
        }
    }
    if trimmed.starts_with(b"<?xml") {
        return "text/xml; charset=utf-8";
    }
    for (magic, ct) in MAGIC {
        if data.starts_with(magic) {
            return ct;
        }
    }
    if data.len() >= 14 && data.starts_with(b"RIFF") && &data[8..14] == b"WEBPVP" {
        return "image/webp";
    }
    let binary = data
        .iter()
        .any(|b| matches!(b, 0x00..=0x08 | 0x0B | 0x0E..=0x1A | 0x1C..=0x1F));
    if binary {
        "application/octet-stream"
    } else {
        "text/plain; charset=utf-8"
    }
}

/// A body with one frame put back in front.
pub struct Prepended<B> {
    first: Option<Frame<Bytes>>,
    inner: B,
}

impl<B> Prepended<B> {
    pub fn new(first: Option<Frame<Bytes>>, inner: B) -> Self {
        Self { first, inner }
    }
}

impl<B: HttpBody<Data = Bytes> + Unpin> HttpBody for Prepended<B> {
    type Data = Bytes;
    type Error = B::Error;

    fn poll_frame(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
    ) -> Poll<Option<Result<Frame<Bytes>, B::Error>>> {
        if let Some(f) = self.first.take() {
            return Poll::Ready(Some(Ok(f)));
        }
        Pin::new(&mut self.inner).poll_frame(cx)
    }

    fn is_end_stream(&self) -> bool {
        self.first.is_none() && self.inner.is_end_stream()
    }

    fn size_hint(&self) -> SizeHint {
        let h = self.inner.size_hint();
        let n = self
            .first
            .as_ref()
            .and_then(|f| f.data_ref())
            .map_or(0, |d| d.len() as u64);
        let mut out = SizeHint::new();
        if let Some(u) = h.upper() {
            out.set_upper(u.saturating_add(n));
        }
        out.set_lower(h.lower().saturating_add(n));
        out
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn like_go() {
        assert_eq!(detect(b"hello"), "text/plain; charset=utf-8");
        assert_eq!(detect(b"  <html><body>"), "text/html; charset=utf-8");
        assert_eq!(detect(b"{\"a\":1}"), "text/plain; charset=utf-8");
        assert_eq!(detect(b"\x00\x01"), "application/octet-stream");
        assert_eq!(detect(b"\x89PNG\r\n\x1a\nxxxx"), "image/png");
        assert_eq!(detect(b"<?xml version"), "text/xml; charset=utf-8");
    }

    #[test]
    fn random_never_panics() {
        use rand::{Rng, SeedableRng};
        let mut rng = rand::rngs::StdRng::seed_from_u64(11);
        for _ in 0..5000 {
            let v: Vec<u8> = (0..rng.gen_range(0..40)).map(|_| rng.r#gen()).collect();
            let _ = detect(&v);
        }
    }
}
