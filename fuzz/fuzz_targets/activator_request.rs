//! activator-lite request path: the first request head classified from raw bytes (as read
//! from the socket, possibly partial), the target revision from headers or Host, and the
//! header rewrite toward the pod. Format: raw HTTP/1 request bytes.
#![no_main]

use activator_lite::admission::{Head, classify};
use activator_lite::handler::{revision_from, rewrite_request_headers};
use http::{HeaderMap, HeaderName, HeaderValue, Uri};
use libfuzzer_sys::fuzz_target;

fuzz_target!(|data: &[u8]| {
    // Every prefix of a head must classify without panicking (reads arrive in pieces).
    for cut in [data.len() / 3, data.len() / 2, data.len()] {
        let _ = classify(&data[..cut]);
    }
    let head = classify(data);

    // The same bytes through httparse into the header map hyper would hand the handler.
    let mut raw = [httparse::EMPTY_HEADER; 64];
    let mut req = httparse::Request::new(&mut raw);
    let Ok(httparse::Status::Complete(_)) = req.parse(data) else {
        return;
    };
    let uri: Uri = req.path.and_then(|p| p.parse().ok()).unwrap_or_else(|| Uri::from_static("/"));
    let mut headers = HeaderMap::new();
    for h in req.headers.iter() {
        if let (Ok(n), Ok(v)) = (HeaderName::from_bytes(h.name.as_bytes()), HeaderValue::from_bytes(h.value)) {
            headers.append(n, v);
        }
    }
    let key = revision_from(&headers, &uri);
    if let Head::Revision(k) = &head {
        // The fast path and the handler agree on the revision.
        assert_eq!(key.as_ref(), Some(k), "classify and revision_from disagree");
    }
    for upgrade in [false, true] {
        let mut h = headers.clone();
        rewrite_request_headers(&mut h, &uri, upgrade, Some("[::1]:9".parse().expect("literal")));
    }
});
