//! HTTP front end: the broker ingress contract (knative-contract C.2) and the plumbing to
//! serve any handler with graceful drain.

use crate::broker::Runtime;
use crate::event::CloudEvent;
use bytes::Bytes;
use http::{Method, Request, Response, StatusCode};
use http_body_util::{BodyExt, Full, Limited};
use hyper::body::Incoming;
use std::future::Future;
use std::sync::Arc;
use tokio::net::TcpListener;

/// Response type of every handler.
pub type Resp = Response<Full<Bytes>>;

/// Builds a response with an optional text body.
pub fn respond(status: StatusCode, body: impl Into<Bytes>) -> Resp {
    let mut r = Response::new(Full::new(body.into()));
    *r.status_mut() = status;
    r
}

/// Outcome of reading a request body with a limit.
pub enum BodyRead {
    Ok(Bytes),
    TooLarge,
    Failed(String),
}

/// Reads a body, refusing more than `limit` bytes.
pub async fn read_body(body: Incoming, limit: usize) -> BodyRead {
    match Limited::new(body, limit).collect().await {
        Ok(c) => BodyRead::Ok(c.to_bytes()),
        Err(e) => {
            if e.downcast_ref::<http_body_util::LengthLimitError>()
                .is_some()
            {
                BodyRead::TooLarge
            } else {
                BodyRead::Failed(e.to_string())
            }
        }
    }
}

/// True for kubelet probes and the health paths (answered 200 before routing, like
/// Knative's drainer does for kubelet user agents).
pub fn is_probe(req: &Request<Incoming>) -> bool {
    let ua = req
        .headers()
        .get(http::header::USER_AGENT)
        .and_then(|v| v.to_str().ok())
        .unwrap_or("");
    req.method() == Method::GET
        && (ua.starts_with("kube-probe/") || matches!(req.uri().path(), "/healthz" | "/readyz"))
}

/// Parses `/<namespace>/<broker>` (trailing slash allowed). `Err(status)` per the contract:
/// `/` is 404, anything but two segments is 400.
pub fn broker_path(path: &str) -> Result<(String, String), StatusCode> {
    if path == "/" || path.is_empty() {
        return Err(StatusCode::NOT_FOUND);
    }
    let trimmed = path.strip_suffix('/').unwrap_or(path);
    let parts: Vec<&str> = trimmed.split('/').collect();
    match parts.as_slice() {
        ["", ns, name] if !ns.is_empty() && !name.is_empty() => {
            Ok((ns.to_string(), name.to_string()))
        }
        _ => Err(StatusCode::BAD_REQUEST),
    }
}

/// Pre-decoding checks shared by the broker ingress and the drop-in ingress: OPTIONS,
/// probes, method, path. `Err(response)` ends the request.
pub fn ingress_preamble(req: &Request<Incoming>) -> Result<(String, String), Box<Resp>> {
    let early = |status: StatusCode| {
        let mut r = respond(status, Bytes::new());
        r.headers_mut().insert(
            http::header::ALLOW,
            http::HeaderValue::from_static("POST, OPTIONS"),
        );
        r
    };
    if req.method() == Method::OPTIONS {
        let mut r = early(StatusCode::OK);
        let h = r.headers_mut();
        h.insert(
            "webhook-allowed-origin",
            http::HeaderValue::from_static("*"),
        );
        h.insert("webhook-allowed-rate", http::HeaderValue::from_static("*"));
        return Err(Box::new(r));
    }
    if is_probe(req) {
        return Err(Box::new(early(StatusCode::OK)));
    }
    if req.method() != Method::POST {
        return Err(Box::new(early(StatusCode::METHOD_NOT_ALLOWED)));
    }
    broker_path(req.uri().path()).map_err(|s| Box::new(early(s)))
}

/// The broker-shm ingress: decode, validate, apply extensions, append, 202.
pub async fn handle(rt: Arc<Runtime>, req: Request<Incoming>) -> Resp {
    let (ns, name) = match ingress_preamble(&req) {
        Ok(p) => p,
        Err(r) => return *r,
    };
    let broker = format!("{ns}/{name}");
    let resp = handle_event(&rt, &ns, &name, req).await;
    let code = resp.status();
    rt.metrics.inc(
        "broker_shm_ingress_requests_total",
        &[("broker", broker.as_str()), ("code", code.as_str())],
    );
    resp
}

async fn handle_event(rt: &Arc<Runtime>, ns: &str, name: &str, req: Request<Incoming>) -> Resp {
    let (parts, body) = req.into_parts();
    let body = match read_body(body, rt.config().log.segment_bytes).await {
        BodyRead::Ok(b) => b,
        BodyRead::TooLarge => return respond(StatusCode::PAYLOAD_TOO_LARGE, "event too large\n"),
        BodyRead::Failed(e) => return respond(StatusCode::BAD_REQUEST, format!("{e}\n")),
    };
    let ev = match CloudEvent::from_http(&parts.headers, body) {
        Ok(ev) => ev,
        Err(e) => {
            tracing::debug!(error = %e, "rejected request");
            return respond(StatusCode::BAD_REQUEST, format!("{e}\n"));
        }
    };
    crate::probe::mark("ingress.decoded", &ev);
    match rt.ingest(ns, name, ev) {
        Ok(_) => respond(StatusCode::ACCEPTED, Bytes::new()),
        Err(e) => {
            let status = e.status();
            if status.is_server_error() {
                tracing::error!(broker = %format!("{ns}/{name}"), error = %e, "event not stored");
            }
            respond(status, format!("{e}\n"))
        }
    }
}

/// Serves `handler` on `listener` (HTTP/1.1 and h2c) until `shutdown` resolves, then drains
/// open connections.
pub async fn serve<H, F>(listener: TcpListener, handler: H, shutdown: impl Future<Output = ()>)
where
    H: Fn(Request<Incoming>) -> F + Clone + Send + Sync + 'static,
    F: Future<Output = Resp> + Send + 'static,
{
    use hyper_util::rt::{TokioExecutor, TokioIo};
    use hyper_util::server::conn::auto::Builder;
    let graceful = hyper_util::server::graceful::GracefulShutdown::new();
    let builder = Builder::new(TokioExecutor::new());
    tokio::pin!(shutdown);
    loop {
        tokio::select! {
            accepted = listener.accept() => {
                let (stream, _) = match accepted {
                    Ok(s) => s,
                    Err(e) => {
                        tracing::warn!(error = %e, "accept failed");
                        continue;
                    }
                };
                let _ = stream.set_nodelay(true);
                let h = handler.clone();
                let svc = hyper::service::service_fn(move |req| {
                    let h = h.clone();
                    async move { Ok::<_, std::convert::Infallible>(h(req).await) }
                });
                let conn = builder.serve_connection(TokioIo::new(stream), svc).into_owned();
                let conn = graceful.watch(conn);
                tokio::spawn(async move {
                    let _ = conn.await;
                });
            }
            _ = &mut shutdown => break,
        }
    }
    drop(listener);
    let _ = tokio::time::timeout(std::time::Duration::from_secs(30), graceful.shutdown()).await;
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn paths() {
        assert_eq!(broker_path("/"), Err(StatusCode::NOT_FOUND));
        assert_eq!(broker_path("/ns"), Err(StatusCode::BAD_REQUEST));
        assert_eq!(broker_path("/ns/b/c"), Err(StatusCode::BAD_REQUEST));
        assert_eq!(broker_path("//b"), Err(StatusCode::BAD_REQUEST));
        assert_eq!(broker_path("/ns/b/"), Ok(("ns".into(), "b".into())));
        assert_eq!(broker_path("/ns/b"), Ok(("ns".into(), "b".into())));
    }
}
