//! queue-proxy-ebpf fast path (src/h1.rs): request heads as a client sends them, response
//! heads and chunked bodies as a user container sends them.
//! Format: first byte picks the peer address family and whether the request was `HEAD`;
//! the rest is raw HTTP/1 bytes.
//! Checked: no panic; a fast request's rewritten head is one complete, well-formed
//! HTTP/1.1 request head without hop-by-hop or Knative revision headers; the chunk scanner
//! finds the same end whichever way its input is split.
#![no_main]

#[allow(dead_code)]
#[path = "../../queue-proxy-ebpf/src/body.rs"]
mod body;
#[allow(dead_code)]
#[path = "../../queue-proxy-ebpf/src/forwarded.rs"]
mod forwarded;
#[allow(dead_code)]
#[path = "../../queue-proxy-ebpf/src/h1.rs"]
mod h1;
#[allow(dead_code)]
#[path = "../../queue-proxy-ebpf/src/health.rs"]
mod health;

use std::net::IpAddr;

use libfuzzer_sys::fuzz_target;
use spright_core::http1::ChunkScanner;

const GONE: [&str; 8] = [
    "connection",
    "keep-alive",
    "transfer-encoding",
    "upgrade",
    "k-original-host",
    "knative-serving-revision",
    "knative-serving-namespace",
    "proxy-connection",
];

fuzz_target!(|data: &[u8]| {
    let Some((&flags, raw)) = data.split_first() else {
        return;
    };
    let peer: IpAddr = if flags & 1 == 0 {
        [10, 0, 0, 1].into()
    } else {
        "fd00::1".parse().expect("literal address")
    };
    if let h1::Parsed::Fast(r) = h1::parse_request(raw, peer) {
        assert!(r.head_len + r.body_len <= raw.len() + h1::MAX_FAST_BODY);
        let mut headers = [httparse::EMPTY_HEADER; 128];
        let mut req = httparse::Request::new(&mut headers);
        match req.parse(&r.out) {
            Ok(httparse::Status::Complete(n)) => assert_eq!(n, r.out.len()),
            other => panic!("rewritten head does not parse: {other:?}"),
        }
        assert_eq!(req.version, Some(1));
        for h in req.headers.iter() {
            assert!(
                !GONE.iter().any(|g| h.name.eq_ignore_ascii_case(g)),
                "{} forwarded",
                h.name
            );
        }
    }
    let _ = h1::parse_response(raw, flags & 2 != 0);
    let _ = h1::first_chunk_data(raw);
    let whole = ChunkScanner::default().feed(raw);
    let cut = usize::from(flags).min(raw.len());
    let mut s = ChunkScanner::default();
    let split = match s.feed(&raw[..cut]) {
        Ok(Some(n)) => Ok(Some(n)),
        Ok(None) => s.feed(&raw[cut..]).map(|e| e.map(|n| n + cut)),
        Err(e) => Err(e),
    };
    assert_eq!(whole, split, "split at {cut}");
});
