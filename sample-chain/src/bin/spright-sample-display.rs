//! spright-sample-display: a small CloudEvents subscriber for the local stack, in the spirit
//! of Knative's `event_display`. Every CloudEvent POSTed to it (binary or structured mode) is
//! logged as one JSON line and counted per request path and type; the answer is 202 with no body (no reply
//! event). `GET /metrics` shows the counts in Prometheus text format, `GET /healthz` is 200.
//!
//! Usage: `spright-sample-display [listen-addr]` (default 127.0.0.1:8084).

#[cfg(test)]
mod common;

use std::collections::BTreeMap;
use std::sync::{Arc, Mutex};

use bytes::Bytes;
use http_body_util::{BodyExt, Limited};
use hyper::body::Incoming;
use hyper::header::{CONTENT_TYPE, HeaderMap};
use hyper::{Method, Request, StatusCode};
use spright_sample_chain::http::{Answer, answer};

/// Largest event body accepted (larger ones get 413).
const MAX_BODY: usize = 4 << 20;
/// Data longer than this is cut in the log line.
const LOGGED_DATA: usize = 200;

/// Events received, by (request path, event type).
type Counts = Arc<Mutex<BTreeMap<(String, String), u64>>>;

fn main() {
    spright_core::logging::init("spright-sample-display", "info");
    let listen = std::env::args()
        .nth(1)
        .unwrap_or_else(|| "127.0.0.1:8084".to_owned());
    if let Err(e) = run(&listen) {
        eprintln!("spright-sample-display: {e:#}");
        std::process::exit(64);
    }
}

fn run(listen: &str) -> anyhow::Result<()> {
    let counts: Counts = Arc::default();
    spright_sample_chain::http::serve("event display", listen, move |req| {
        handle(Arc::clone(&counts), req)
    })
}

async fn handle(
    counts: Counts,
    req: Request<Incoming>,
) -> Result<Answer, std::convert::Infallible> {
    match (req.method(), req.uri().path()) {
        (&Method::GET, "/healthz") => return Ok(answer(StatusCode::OK, "ok\n")),
        (&Method::GET, "/metrics") => return Ok(answer(StatusCode::OK, render(&counts))),
        (&Method::POST, _) => {}
        _ => {
            return Ok(answer(
                StatusCode::METHOD_NOT_ALLOWED,
                "POST a CloudEvent, or GET /metrics\n",
            ));
        }
    }
    let (parts, body) = req.into_parts();
    let body = match Limited::new(body, MAX_BODY).collect().await {
        Ok(b) => b.to_bytes(),
        Err(e) => {
            let status = if e.is::<http_body_util::LengthLimitError>() {
                StatusCode::PAYLOAD_TOO_LARGE
            } else {
                StatusCode::BAD_REQUEST
            };
            return Ok(answer(status, format!("reading the body: {e}\n")));
        }
    };
    let event = match decode(&parts.headers, &body) {
        Ok(ev) => ev,
        Err(reason) => {
            tracing::warn!(path = %parts.uri.path(), reason, "not a CloudEvent");
            return Ok(answer(StatusCode::BAD_REQUEST, format!("{reason}\n")));
        }
    };
    let total = {
        let mut c = counts.lock().unwrap_or_else(|p| p.into_inner());
        let n = c
            .entry((parts.uri.path().to_owned(), event.ty.clone()))
            .or_default();
        *n += 1;
        *n
    };
    let mut data = String::from_utf8_lossy(&event.data).into_owned();
    if data.len() > LOGGED_DATA {
        let mut cut = LOGGED_DATA;
        while !data.is_char_boundary(cut) {
            cut -= 1;
        }
        data.truncate(cut);
        data.push_str("...");
    }
    tracing::info!(
        path = %parts.uri.path(),
        r#type = %event.ty,
        source = %event.source,
        id = %event.id,
        subject = event.subject.as_deref().unwrap_or(""),
        data = %data,
        count = total,
        "event received"
    );
    Ok(answer(StatusCode::ACCEPTED, Bytes::new()))
}

/// The attributes this display logs, and the data.
#[derive(Debug, PartialEq)]
struct Received {
    ty: String,
    source: String,
    id: String,
    subject: Option<String>,
    data: Vec<u8>,
}

/// Decodes a binary-mode (`ce-*` headers) or structured-mode (JSON) CloudEvent.
fn decode(headers: &HeaderMap, body: &[u8]) -> Result<Received, String> {
    let header = |name: &str| {
        headers
            .get(name)
            .and_then(|v| v.to_str().ok())
            .map(str::to_owned)
    };
    if header("ce-specversion").is_some() {
        let required = |name: &str| header(name).ok_or_else(|| format!("missing {name} header"));
        return Ok(Received {
            ty: required("ce-type")?,
            source: required("ce-source")?,
            id: required("ce-id")?,
            subject: header("ce-subject"),
            data: body.to_vec(),
        });
    }
    let structured = header(CONTENT_TYPE.as_str())
        .is_some_and(|ct| ct.starts_with("application/cloudevents+json"));
    if !structured {
        return Err("not a CloudEvent: no ce-specversion header and no \
                    application/cloudevents+json content type"
            .to_owned());
    }
    let v: serde_json::Value =
        serde_json::from_slice(body).map_err(|e| format!("malformed structured event: {e}"))?;
    let attr = |name: &str| v.get(name).and_then(|a| a.as_str()).map(str::to_owned);
    let required = |name: &str| attr(name).ok_or_else(|| format!("missing attribute {name}"));
    if attr("specversion").is_none() {
        return Err("missing attribute specversion".to_owned());
    }
    let data = match v.get("data") {
        None | Some(serde_json::Value::Null) => Vec::new(),
        Some(serde_json::Value::String(s)) => s.clone().into_bytes(),
        Some(other) => other.to_string().into_bytes(),
    };
    Ok(Received {
        ty: required("type")?,
        source: required("source")?,
        id: required("id")?,
        subject: attr("subject"),
        data,
    })
}

/// The per-type counts in Prometheus text format.
fn render(counts: &Counts) -> String {
    let c = counts.lock().unwrap_or_else(|p| p.into_inner());
    let mut out = String::from(
        "# HELP spright_sample_display_events_total CloudEvents received, by request path and type.\n\
         # TYPE spright_sample_display_events_total counter\n",
    );
    for ((path, ty), n) in c.iter() {
        let (path, ty) = (label(path), label(ty));
        out.push_str(&format!(
            "spright_sample_display_events_total{{path=\"{path}\",type=\"{ty}\"}} {n}\n"
        ));
    }
    out
}

/// A Prometheus label value, escaped.
fn label(v: &str) -> String {
    v.replace('\\', "\\\\")
        .replace('"', "\\\"")
        .replace('\n', "\\n")
}

#[cfg(test)]
mod tests {
    use super::*;
    use hyper::header::HeaderValue;

    #[test]
    fn decodes_binary_mode() {
        let mut h = HeaderMap::new();
        for (k, v) in [
            ("ce-specversion", "1.0"),
            ("ce-type", "t"),
            ("ce-source", "/s"),
            ("ce-id", "1"),
        ] {
            h.insert(k, HeaderValue::from_static(v));
        }
        let ev = decode(&h, b"hi").expect("binary event");
        assert_eq!(ev.ty, "t");
        assert_eq!(ev.data, b"hi");
        assert_eq!(ev.subject, None);
        h.remove("ce-id");
        assert!(decode(&h, b"").unwrap_err().contains("ce-id"));
    }

    #[test]
    fn decodes_structured_mode_and_refuses_other_bodies() {
        let mut h = HeaderMap::new();
        h.insert(
            CONTENT_TYPE,
            HeaderValue::from_static("application/cloudevents+json; charset=utf-8"),
        );
        let body = br#"{"specversion":"1.0","type":"t","source":"/s","id":"1","subject":"x","data":{"a":1}}"#;
        let ev = decode(&h, body).expect("structured event");
        assert_eq!(ev.subject.as_deref(), Some("x"));
        assert_eq!(ev.data, br#"{"a":1}"#);
        assert!(decode(&h, b"{not json").is_err());
        assert!(decode(&h, br#"{"type":"t","source":"/s","id":"1"}"#).is_err());
        assert!(decode(&HeaderMap::new(), b"plain").is_err());
    }

    #[test]
    fn random_bodies_never_panic() {
        let mut h = HeaderMap::new();
        h.insert(
            CONTENT_TYPE,
            HeaderValue::from_static("application/cloudevents+json"),
        );
        for body in common::random_inputs(b"{}[]\":,aeiou0123 \\", 2000, 96) {
            let _ = decode(&h, &body);
        }
    }

    #[test]
    fn metrics_escape_label_values() {
        let counts: Counts = Arc::default();
        counts
            .lock()
            .unwrap()
            .insert(("/p".into(), "a\"b".into()), 2);
        assert!(render(&counts).contains("{path=\"/p\",type=\"a\\\"b\"} 2\n"));
    }
}
