//! HTTP listener: the CloudEvents receiver (POST, sink direction), probes and metrics.
//!
//! - `POST <any path>`: a CloudEvent (binary or structured) to publish to MQTT; 202 once the
//!   broker acknowledged, 400 for an invalid event or no topic, 413 when too large, 503 when
//!   the broker is unreachable or did not acknowledge in time (the sender retries).
//! - `OPTIONS`: `Allow: POST`.
//! - `GET /healthz`: liveness (200 while the process serves).
//! - `GET /readyz`: 200 when every configured MQTT connection is up, else 503 with the reason.
//! - `GET /metrics`: Prometheus text format.

use std::convert::Infallible;
use std::sync::Arc;

use bytes::Bytes;
use http::{Method, Request, Response, StatusCode};
use http_body_util::{BodyExt, Full, Limited};
use hyper::body::Incoming;
use hyper_util::rt::{TokioExecutor, TokioIo};
use tokio::net::TcpListener;
use tokio::sync::watch;

use crate::config::{Config, Format, ProtocolVersion};
use crate::mapping;
use crate::metrics::Metrics;
use crate::publisher::{PublishError, Publisher};
use spright_core::cloudevent::CloudEvent;

/// What the handlers need.
#[derive(Debug)]
pub struct AppState {
    pub cfg: Config,
    pub metrics: Arc<Metrics>,
    pub publisher: Option<Publisher>,
    /// Whether the source direction runs (then readiness requires its connection).
    pub source_enabled: bool,
}

fn text(status: StatusCode, body: impl Into<Bytes>) -> Response<Full<Bytes>> {
    let mut r = Response::new(Full::new(body.into()));
    *r.status_mut() = status;
    r.headers_mut().insert(
        http::header::CONTENT_TYPE,
        http::HeaderValue::from_static("text/plain; charset=utf-8"),
    );
    r
}

async fn handle(state: Arc<AppState>, req: Request<Incoming>) -> Response<Full<Bytes>> {
    match (req.method(), req.uri().path()) {
        (&Method::GET, "/healthz") => text(StatusCode::OK, "ok"),
        (&Method::GET, "/readyz") => {
            let mut problems = Vec::new();
            if state.source_enabled && !state.metrics.source_ready() {
                problems.push("MQTT source is not connected and subscribed");
            }
            if state.publisher.is_some() && !state.metrics.publisher_ready() {
                problems.push("MQTT publisher connection is down");
            }
            if problems.is_empty() {
                text(StatusCode::OK, "ready")
            } else {
                text(StatusCode::SERVICE_UNAVAILABLE, problems.join("; "))
            }
        }
        (&Method::GET, "/metrics") => {
            let mut r = text(StatusCode::OK, state.metrics.encode());
            r.headers_mut().insert(
                http::header::CONTENT_TYPE,
                http::HeaderValue::from_static(
                    "application/openmetrics-text; version=1.0.0; charset=utf-8",
                ),
            );
            r
        }
        (&Method::OPTIONS, _) => {
            let mut r = text(StatusCode::OK, "");
            r.headers_mut()
                .insert(http::header::ALLOW, http::HeaderValue::from_static("POST"));
            r
        }
        (&Method::POST, _) => receive(state, req).await,
        _ => text(StatusCode::METHOD_NOT_ALLOWED, "method not allowed"),
    }
}

async fn receive(state: Arc<AppState>, req: Request<Incoming>) -> Response<Full<Bytes>> {
    let Some(publisher) = &state.publisher else {
        return text(StatusCode::NOT_FOUND, "the sink direction is not enabled");
    };
    let (parts, body) = req.into_parts();
    let body = match Limited::new(body, state.cfg.max_request_bytes)
        .collect()
        .await
    {
        Ok(b) => b.to_bytes(),
        Err(e) => {
            state.metrics.publish_failed.inc();
            if e.downcast_ref::<http_body_util::LengthLimitError>()
                .is_some()
            {
                tracing::warn!(limit = state.cfg.max_request_bytes, "CloudEvent too large");
                return text(StatusCode::PAYLOAD_TOO_LARGE, "request body too large");
            }
            return text(
                StatusCode::BAD_REQUEST,
                format!("cannot read the body: {e}"),
            );
        }
    };
    let ev = match CloudEvent::from_http(&parts.headers, body) {
        Ok(ev) => ev,
        Err(e) => {
            state.metrics.publish_failed.inc();
            tracing::warn!(error = %e, "invalid CloudEvent received over HTTP");
            return text(StatusCode::BAD_REQUEST, format!("invalid CloudEvent: {e}"));
        }
    };
    let topic = match mapping::topic_for(
        &ev,
        &state.cfg.publish_topic_attribute,
        state.cfg.publish_topic.as_deref(),
    ) {
        Ok(t) => t,
        Err(e) => {
            state.metrics.publish_failed.inc();
            tracing::warn!(id = %ev.id(), error = %e, "no MQTT topic for the event");
            return text(StatusCode::BAD_REQUEST, e.to_string());
        }
    };
    let binary =
        state.cfg.publish_format == Format::Binary && state.cfg.protocol == ProtocolVersion::V5;
    let out = mapping::to_mqtt(&ev, topic, binary);
    match publisher
        .publish(&out, state.cfg.publish_qos, state.cfg.publish_timeout)
        .await
    {
        Ok(()) => {
            state.metrics.published.inc();
            text(StatusCode::ACCEPTED, "")
        }
        Err(e) => {
            state.metrics.publish_failed.inc();
            tracing::warn!(id = %ev.id(), topic = %out.topic, error = %e, "publish to MQTT failed");
            let status = match e {
                PublishError::Refused(_) => StatusCode::BAD_GATEWAY,
                _ => StatusCode::SERVICE_UNAVAILABLE,
            };
            text(status, e.to_string())
        }
    }
}

/// Serves until `shutdown` turns true.
pub async fn serve(
    listener: TcpListener,
    state: Arc<AppState>,
    mut shutdown: watch::Receiver<bool>,
) -> anyhow::Result<()> {
    loop {
        let (stream, _) = tokio::select! {
            r = listener.accept() => match r {
                Ok(s) => s,
                Err(e) => {
                    tracing::warn!(error = %e, "accept failed");
                    continue;
                }
            },
            _ = shutdown.changed() => return Ok(()),
        };
        let _ = stream.set_nodelay(true);
        let state = state.clone();
        tokio::spawn(async move {
            let svc = hyper::service::service_fn(move |req| {
                let state = state.clone();
                async move { Ok::<_, Infallible>(handle(state, req).await) }
            });
            let _ = hyper_util::server::conn::auto::Builder::new(TokioExecutor::new())
                .serve_connection(TokioIo::new(stream), svc)
                .await;
        });
    }
}
