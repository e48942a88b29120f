//! Helpers shared by the fuzz targets: cutting one fuzz input into the several inputs a
//! parser takes (header lists, environment maps, bodies) without losing structure the
//! fuzzer can learn.

use http::{HeaderMap, HeaderName, HeaderValue};

pub mod qp;

/// Splits `data` at the first `sep`: `(before, after)`; all of it and nothing when absent.
pub fn split_once(data: &[u8], sep: u8) -> (&[u8], &[u8]) {
    match data.iter().position(|b| *b == sep) {
        Some(i) => (&data[..i], &data[i + 1..]),
        None => (data, &[]),
    }
}

/// Headers and body from `name: value` lines, a blank line, then the body (an HTTP/1 head
/// without its request line). Lines that are not valid headers are skipped, as a server's
/// HTTP parser would have refused them before any of our code sees them.
pub fn headers_and_body(data: &[u8]) -> (HeaderMap, &[u8]) {
    let (head, body) = match data.windows(2).position(|w| w == b"\n\n") {
        Some(i) => (&data[..i], &data[i + 2..]),
        None => (data, &[][..]),
    };
    let mut headers = HeaderMap::new();
    for line in head.split(|b| *b == b'\n') {
        let (name, value) = split_once(line, b':');
        let value = value.strip_prefix(b" ").unwrap_or(value);
        if let (Ok(n), Ok(v)) = (
            HeaderName::from_bytes(name),
            HeaderValue::from_bytes(value),
        ) {
            headers.append(n, v);
        }
    }
    (headers, body)
}

/// `KEY=VALUE` lines (the value is everything after the first `=`; lossy UTF-8).
pub fn key_values(data: &[u8]) -> Vec<(String, String)> {
    data.split(|b| *b == b'\n')
        .filter(|l| !l.is_empty())
        .map(|l| {
            let (k, v) = split_once(l, b'=');
            (
                String::from_utf8_lossy(k).into_owned(),
                String::from_utf8_lossy(v).into_owned(),
            )
        })
        .collect()
}

/// Lossy UTF-8 view of the input (parsers taking `&str` get every byte pattern the
/// fuzzer finds; invalid sequences become U+FFFD).
pub fn text(data: &[u8]) -> std::borrow::Cow<'_, str> {
    String::from_utf8_lossy(data)
}

/// Arguments for a clap parser: NUL- or newline-separated, program name first.
pub fn argv(program: &str, data: &[u8]) -> Vec<String> {
    std::iter::once(program.to_owned())
        .chain(
            data.split(|b| *b == 0 || *b == b'\n')
                .filter(|a| !a.is_empty())
                .map(|a| String::from_utf8_lossy(a).into_owned()),
        )
        .collect()
}
