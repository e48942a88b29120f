//! Request logs (serving `pkg/http/request_log.go`): one line per request on stdout, from
//! the revision's Go text/template. The template subset Knative's templates use is
//! supported: `{{.Field.Path}}` and `{{js .Field.Path}}` (the default template uses both).
//! Unknown fields render empty.

use std::collections::HashMap;
use std::io::Write;
use std::net::SocketAddr;
use std::pin::Pin;
use std::sync::Arc;
use std::task::{Context, Poll};
use std::time::Instant;

use bytes::Bytes;
use http::{Request, Response, Version, header};
use http_body::{Body as HttpBody, Frame, SizeHint};
use http_body_util::BodyExt;

use crate::body::{Body, BoxError};
use crate::health;

#[derive(Debug, Clone, PartialEq)]
enum Piece {
    Lit(String),
    Field { path: String, js: bool },
}

/// A parsed template plus the revision fields.
#[derive(Debug)]
pub struct RequestLog {
    pieces: Vec<Piece>,
    revision: HashMap<&'static str, String>,
    log_probes: bool,
}

/// What is known about a request when it arrives.
#[derive(Debug)]
pub struct Entry {
    log: Arc<RequestLog>,
    fields: HashMap<&'static str, String>,
    start: Instant,
    skip: bool,
}

fn parse(t: &str) -> Vec<Piece> {
    let mut out = Vec::new();
    let mut rest = t;
    while let Some(open) = rest.find("{{") {
        if open > 0 {
            out.push(Piece::Lit(rest[..open].to_owned()));
        }
        let after = &rest[open + 2..];
        let Some(close) = after.find("}}") else {
            out.push(Piece::Lit(rest[open..].to_owned()));
            return out;
        };
        let action = after[..close].trim().trim_matches('-').trim();
        let (js, path) = match action.strip_prefix("js ") {
            Some(p) => (true, p.trim()),
            None => (false, action),
        };
        out.push(Piece::Field {
            path: path.trim_start_matches('.').to_owned(),
            js,
        });
        rest = &after[close + 2..];
    }
    if !rest.is_empty() {
        out.push(Piece::Lit(rest.to_owned()));
    }
    out
}

/// Go's `template.JSEscapeString`.
fn js_escape(s: &str) -> String {
    let mut o = String::with_capacity(s.len());
    for c in s.chars() {
        match c {
            '\\' => o.push_str("\\\\"),
            '\'' => o.push_str("\\'"),
            '"' => o.push_str("\\\""),
            '<' => o.push_str("\\u003C"),
            '>' => o.push_str("\\u003E"),
            '&' => o.push_str("\\u0026"),
            '=' => o.push_str("\\u003D"),
            c if (c as u32) < 0x20 || c.is_control() => {
                o.push_str(&format!("\\u{:04X}", c as u32));
            }
            c => o.push(c),
        }
    }
    o
}

fn proto(v: Version) -> &'static str {
    match v {
        Version::HTTP_09 => "HTTP/0.9",
        Version::HTTP_10 => "HTTP/1.0",
        Version::HTTP_2 => "HTTP/2.0",
        Version::HTTP_3 => "HTTP/3.0",
        _ => "HTTP/1.1",
    }
}

impl RequestLog {
    pub fn new(template: &str, revision: &[(&'static str, &str)], log_probes: bool) -> Self {
        Self {
            pieces: parse(template),
            revision: revision
                .iter()
                .map(|(k, v)| (*k, (*v).to_owned()))
                .collect(),
            log_probes,
        }
    }

    pub fn begin<B>(self: &Arc<Self>, req: &Request<B>, client: SocketAddr) -> Entry {
        let h = req.headers();
        let get = |n: header::HeaderName| {
            h.get(n)
                .and_then(|v| v.to_str().ok())
                .unwrap_or("")
                .to_owned()
        };
        let mut f = HashMap::new();
        f.insert("Request.Method", req.method().to_string());
        f.insert(
            "Request.RequestURI",
            req.uri()
                .path_and_query()
                .map_or("/", |p| p.as_str())
                .to_owned(),
        );
        let cl = h
            .get(header::CONTENT_LENGTH)
            .and_then(|v| v.to_str().ok())
            .and_then(|v| v.parse::<i64>().ok())
            .unwrap_or(if req.method() == http::Method::GET {
                0
            } else {
                -1
            });
        f.insert("Request.ContentLength", cl.to_string());
        f.insert("Request.UserAgent", get(header::USER_AGENT));
        f.insert("Request.Referer", get(header::REFERER));
        f.insert("Request.RemoteAddr", client.to_string());
        f.insert("Request.Proto", proto(req.version()).to_owned());
        f.insert(
            "Request.Host",
            req.uri()
                .authority()
                .map(|a| a.to_string())
                .unwrap_or_else(|| get(header::HOST)),
        );
        let trace = h
            .get("traceparent")
            .and_then(|v| v.to_str().ok())
            .and_then(|t| t.split('-').nth(1))
            .unwrap_or("")
            .to_owned();
        f.insert("TraceID", trace);
        Entry {
            log: Arc::clone(self),
            fields: f,
            start: Instant::now(),
            skip: health::is_probe(h) && !self.log_probes,
        }
    }

    /// Wraps the response so the line is written when its body is done.
    pub fn finish(entry: Entry, res: Response<Body>) -> Response<Body> {
        if entry.skip {
            return res;
        }
        let code = res.status().as_u16();
        res.map(|b| {
            LoggedBody {
                inner: b,
                entry: Some(entry),
                code,
                size: 0,
            }
            .boxed()
        })
    }

    fn render(&self, fields: &HashMap<&'static str, String>) -> String {
        let mut out = String::new();
        for p in &self.pieces {
            match p {
                Piece::Lit(s) => out.push_str(s),
                Piece::Field { path, js } => {
                    let v = fields
                        .get(path.as_str())
                        .or_else(|| {
                            path.strip_prefix("Revision.")
                                .and_then(|k| self.revision.get(k))
                        })
                        .map_or("", String::as_str);
                    if *js {
                        out.push_str(&js_escape(v));
                    } else {
                        out.push_str(v);
                    }
                }
            }
        }
        out
    }
}

struct LoggedBody {
    inner: Body,
    entry: Option<Entry>,
    code: u16,
    size: u64,
}

impl Drop for LoggedBody {
    fn drop(&mut self) {
        if let Some(mut e) = self.entry.take() {
            e.fields.insert("Response.Code", self.code.to_string());
            e.fields.insert("Response.Size", self.size.to_string());
            e.fields.insert(
                "Response.Latency",
                format!("{}", e.start.elapsed().as_secs_f64()),
            );
            let line = e.log.render(&e.fields);
            let mut out = std::io::stdout().lock();
            let _ = writeln!(out, "{line}");
        }
    }
}

impl HttpBody for LoggedBody {
    type Data = Bytes;
    type Error = BoxError;

    fn poll_frame(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
    ) -> Poll<Option<Result<Frame<Bytes>, BoxError>>> {
        let r = Pin::new(&mut self.inner).poll_frame(cx);
        if let Poll::Ready(Some(Ok(f))) = &r
            && let Some(d) = f.data_ref()
        {
            self.size += d.len() as u64;
        }
        r
    }

    fn is_end_stream(&self) -> bool {
        self.inner.is_end_stream()
    }

    fn size_hint(&self) -> SizeHint {
        self.inner.size_hint()
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::env::DEFAULT_REQUEST_LOG_TEMPLATE;

    #[test]
    fn renders_default_template() {
        let log = Arc::new(RequestLog::new(
            DEFAULT_REQUEST_LOG_TEMPLATE,
            &[("PodIP", "10.0.0.1")],
            false,
        ));
        let req = Request::builder()
            .uri("/a?b=%22c&d=1")
            .header("user-agent", "curl")
            .body(())
            .expect("req");
        let mut e = log.begin(&req, "127.0.0.1:5000".parse().expect("addr"));
        e.fields.insert("Response.Code", "200".into());
        let line = log.render(&e.fields);
        let v: serde_json::Value = serde_json::from_str(&line).expect(&line);
        assert_eq!(v["httpRequest"]["requestUrl"], "/a?b=%22c&d=1");
        assert_eq!(v["httpRequest"]["status"], 200);
        assert_eq!(v["httpRequest"]["serverIp"], "10.0.0.1");
    }

    #[test]
    fn random_templates_never_panic() {
        use rand::{Rng, SeedableRng};
        let mut rng = rand::rngs::StdRng::seed_from_u64(9);
        for _ in 0..2000 {
            let s: String = (0..rng.gen_range(0..30))
                .map(|_| ['{', '}', '.', 'j', 's', ' ', 'é', 'R'][rng.gen_range(0..8)])
                .collect();
            let l = RequestLog::new(&s, &[], true);
            let _ = l.render(&HashMap::new());
        }
    }
}
