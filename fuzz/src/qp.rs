//! Builds a request from fuzz bytes for the queue-proxy's request-path parsers.

use http::{Method, Request, Uri, Version};

/// `METHOD URI\n` then headers as in [`crate::headers_and_body`]; invalid parts fall
/// back to `GET /`, as hyper would have refused them before the handler chain runs.
pub fn request(data: &[u8]) -> (Request<()>, &[u8]) {
    let (line, rest) = crate::split_once(data, b'\n');
    let (method, uri) = crate::split_once(line, b' ');
    let (headers, body) = crate::headers_and_body(rest);
    let mut req = Request::new(());
    *req.method_mut() = Method::from_bytes(method).unwrap_or(Method::GET);
    *req.uri_mut() = Uri::try_from(uri).unwrap_or_else(|_| Uri::from_static("/"));
    *req.version_mut() = match data.len() % 4 {
        0 => Version::HTTP_10,
        1 => Version::HTTP_2,
        _ => Version::HTTP_11,
    };
    *req.headers_mut() = headers;
    (req, body)
}
