//! Drop-in modes for the stock MT channel-based broker: `broker-shm ingress` replaces
//! mt-broker-ingress (C.2) and `broker-shm filter` replaces mt-broker-filter (C.3).
//! Brokers and Triggers (with the status fields the informers would show) come from the
//! same [`ConfigSource`] as the broker mode.

use crate::broker::{IngestError, apply_ingress_extensions};
use crate::config::Mode;
use crate::delivery::{HttpSink, SendOptions};
use crate::event::{CloudEvent, TTL_EXT};
use crate::filter::Filter;
use crate::ingress::{BodyRead, Resp, ingress_preamble, read_body, respond, serve};
use crate::manifests::{ConfigSource, Format, Snapshot, StatusTarget, Trigger};
use base64::Engine as _;
use base64::engine::general_purpose::STANDARD as B64;
use bytes::Bytes;
use http::{HeaderMap, Method, Request, StatusCode};
use hyper::body::Incoming;
use std::future::Future;
use std::sync::{Arc, RwLock};
use tokio::net::TcpListener;

/// Broker status annotation holding the channel address.
pub const CHANNEL_ADDRESS: &str = "knative.dev/channelAddress";
/// Largest request body accepted by the drop-in modes.
pub const MAX_BODY: usize = 64 << 20;

/// Headers forwarded hop to hop: `x-request-id`, `retry-after`, `knative-*`, `x-b3-*`.
pub fn pass_through(headers: &HeaderMap) -> HeaderMap {
    let mut out = HeaderMap::new();
    for (k, v) in headers {
        let n = k.as_str();
        if n == "x-request-id"
            || n == "retry-after"
            || n.starts_with("knative-")
            || n.starts_with("x-b3-")
        {
            out.append(k.clone(), v.clone());
        }
    }
    out
}

struct State {
    snap: RwLock<Snapshot>,
    http: HttpSink,
    max_ttl: i32,
}

impl State {
    fn snap(&self) -> std::sync::RwLockReadGuard<'_, Snapshot> {
        self.snap
            .read()
            .unwrap_or_else(std::sync::PoisonError::into_inner)
    }
}

/// Runs a drop-in mode until `shutdown`.
pub async fn run(
    mode: Option<Mode>,
    source: Arc<dyn ConfigSource>,
    max_ttl: i32,
    listener: TcpListener,
    shutdown: impl Future<Output = ()>,
) -> anyhow::Result<()> {
    let snap = source.load();
    snap.log_rejected();
    let state = Arc::new(State {
        snap: RwLock::new(snap),
        http: HttpSink::default(),
        max_ttl,
    });
    let (tx, mut rx) = tokio::sync::mpsc::unbounded_channel::<()>();
    source.watch(Box::new(move || {
        let _ = tx.send(());
    }))?;
    {
        let state = state.clone();
        let source = source.clone();
        tokio::spawn(async move {
            while rx.recv().await.is_some() {
                while rx.try_recv().is_ok() {}
                let snap = source.load();
                snap.log_rejected();
                *state
                    .snap
                    .write()
                    .unwrap_or_else(std::sync::PoisonError::into_inner) = snap;
            }
        });
    }
    match mode {
        Some(Mode::Filter) => {
            let h = move |req| filter_handler(state.clone(), req);
            serve(listener, h, shutdown).await;
        }
        _ => {
            let h = move |req| ingress_handler(state.clone(), req);
            serve(listener, h, shutdown).await;
        }
    }
    Ok(())
}

async fn ingress_handler(state: Arc<State>, req: Request<Incoming>) -> Resp {
    let (ns, name) = match ingress_preamble(&req) {
        Ok(p) => p,
        Err(r) => return *r,
    };
    let (parts, body) = req.into_parts();
    let body = match read_body(body, MAX_BODY).await {
        BodyRead::Ok(b) => b,
        BodyRead::TooLarge => return respond(StatusCode::PAYLOAD_TOO_LARGE, Bytes::new()),
        BodyRead::Failed(_) => return respond(StatusCode::BAD_REQUEST, Bytes::new()),
    };
    let mut ev = match CloudEvent::from_http(&parts.headers, body) {
        Ok(ev) => ev,
        Err(e) => return respond(StatusCode::BAD_REQUEST, format!("{e}\n")),
    };
    crate::probe::mark("ingress.decoded", &ev);
    // As mt-broker-ingress: the Broker is looked up (404) before the TTL is applied (400),
    // then the channel address (500).
    let address = {
        let snap = state.snap();
        let Some(b) = snap
            .brokers
            .iter()
            .find(|b| b.namespace == ns && b.name == name)
        else {
            return respond(StatusCode::NOT_FOUND, Bytes::new());
        };
        b.status_annotations.get(CHANNEL_ADDRESS).cloned()
    };
    if let Err(IngestError::TtlExhausted) = apply_ingress_extensions(&mut ev, state.max_ttl) {
        return respond(StatusCode::BAD_REQUEST, Bytes::new());
    }
    let Some(address) = address else {
        return respond(
            StatusCode::INTERNAL_SERVER_ERROR,
            "channel address not found in broker status annotations\n",
        );
    };
    // Knative's dispatcher asks every destination for a reply (`Prefer: reply`).
    let opts = SendOptions {
        format: Format::Binary,
        timeout: None,
        namespace: String::new(),
        prefer_reply: true,
        extra_headers: pass_through(&parts.headers),
        ca_certs: None,
    };
    let attempt = state.http.post(&address, &ev, &opts).await;
    // The channel's own status when it accepted the event; anything else (no answer, or
    // not 2xx) is a failed dispatch: 500, as kncloudevents' SendEvent reports it.
    match attempt.status {
        Some(s) if attempt.is_success() => respond(
            StatusCode::from_u16(s).unwrap_or(StatusCode::INTERNAL_SERVER_ERROR),
            Bytes::new(),
        ),
        _ => {
            tracing::warn!(
                channel = %address,
                status = ?attempt.status,
                error = attempt.error.as_deref().unwrap_or(""),
                "failed to dispatch event to the channel"
            );
            respond(StatusCode::INTERNAL_SERVER_ERROR, Bytes::new())
        }
    }
}

/// Parses `/triggers/<ns>/<name>/<uid>[/reply|/dls]`.
pub fn trigger_path(path: &str) -> Option<(String, String, String, Option<String>)> {
    let parts: Vec<&str> = path.split('/').collect();
    match parts.as_slice() {
        ["", "triggers", ns, name, uid] => {
            Some((ns.to_string(), name.to_string(), uid.to_string(), None))
        }
        ["", "triggers", ns, name, uid, sub @ ("reply" | "dls")] => Some((
            ns.to_string(),
            name.to_string(),
            uid.to_string(),
            Some(sub.to_string()),
        )),
        _ => None,
    }
}

fn with_headers(mut r: Resp, headers: HeaderMap) -> Resp {
    for (k, v) in &headers {
        r.headers_mut().append(k.clone(), v.clone());
    }
    r
}

async fn filter_handler(state: Arc<State>, req: Request<Incoming>) -> Resp {
    if crate::ingress::is_probe(&req) {
        return respond(StatusCode::OK, Bytes::new());
    }
    if req.method() != Method::POST {
        let mut r = respond(StatusCode::METHOD_NOT_ALLOWED, Bytes::new());
        r.headers_mut()
            .insert(http::header::ALLOW, http::HeaderValue::from_static("POST"));
        return r;
    }
    let Some((ns, name, uid, sub)) = trigger_path(req.uri().path()) else {
        return respond(StatusCode::BAD_REQUEST, "malformed trigger path\n");
    };
    let found = {
        let snap = state.snap();
        snap.triggers
            .iter()
            .find(|t| t.namespace == ns && t.name == name)
            .map(|t| {
                let broker = snap
                    .brokers
                    .iter()
                    .find(|b| b.namespace == t.namespace && b.name == t.broker)
                    .cloned();
                (t.clone(), broker)
            })
    };
    let Some((trigger, broker)) = found else {
        return respond(StatusCode::NOT_FOUND, Bytes::new());
    };
    if trigger.uid != uid {
        return respond(StatusCode::BAD_REQUEST, "trigger UID mismatch\n");
    }
    let (parts, body) = req.into_parts();
    let body = match read_body(body, MAX_BODY).await {
        BodyRead::Ok(b) => b,
        BodyRead::TooLarge => return respond(StatusCode::PAYLOAD_TOO_LARGE, Bytes::new()),
        BodyRead::Failed(_) => return respond(StatusCode::BAD_REQUEST, Bytes::new()),
    };
    let mut ev = match CloudEvent::from_http(&parts.headers, body) {
        Ok(ev) => ev,
        Err(e) => return respond(StatusCode::BAD_REQUEST, format!("{e}\n")),
    };
    // The Trigger's delivery (format, timeout), compiled once for whichever path sends.
    let delivery = trigger
        .delivery
        .as_ref()
        .and_then(|d| d.compile(&trigger.namespace, "spec.delivery").ok())
        .unwrap_or_default();
    // The reply and dead-letter paths proxy: every request header goes on, the TTL stays as
    // it is, the answer is relayed as for a subscriber.
    if let Some(sub) = sub.as_deref() {
        let target = if sub == "reply" {
            let Some(broker) = broker else {
                return respond(StatusCode::NOT_FOUND, Bytes::new());
            };
            let Some(address) = broker.status_address else {
                return respond(
                    StatusCode::INTERNAL_SERVER_ERROR,
                    "the Broker has no status.address\n",
                );
            };
            StatusTarget {
                uri: address,
                ca_certs: None,
            }
        } else {
            let target = trigger
                .status
                .dead_letter_sink
                .clone()
                .or_else(|| broker.and_then(|b| b.status_dead_letter_sink));
            // No dead-letter sink anywhere: nothing is sent, 200 with no body.
            let Some(target) = target else {
                return respond(StatusCode::OK, Bytes::new());
            };
            target
        };
        let headers = proxied(&parts.headers);
        return send(
            &state,
            &trigger,
            &target,
            &ev,
            headers,
            (Format::Binary, delivery.timeout),
            None,
        )
        .await;
    }
    let Some(ttl) = ev.remove(TTL_EXT) else {
        return respond(StatusCode::BAD_REQUEST, "missing knativebrokerttl\n");
    };
    // mt-broker-filter delivers to what the Trigger reconciler resolved.
    let Some(target) = trigger.status.subscriber.clone() else {
        return respond(
            StatusCode::NOT_FOUND,
            "the Trigger has no status.subscriberUri\n",
        );
    };
    let filter = Filter::for_trigger(trigger.spec.filter.as_ref(), &trigger.spec.filters);
    if !filter.passes(&ev) {
        return respond(StatusCode::OK, Bytes::new());
    }
    let headers = pass_through(&parts.headers);
    let mode = (delivery.format, delivery.timeout);
    send(&state, &trigger, &target, &ev, headers, mode, Some(ttl)).await
}

/// The request headers a proxying path (`/reply`, `/dls`) sends on: all of them but the
/// connection's own (framing, host, hop-by-hop), which the new request sets itself.
fn proxied(headers: &HeaderMap) -> HeaderMap {
    let mut out = headers.clone();
    for h in [
        "host",
        "content-length",
        "transfer-encoding",
        "connection",
        "keep-alive",
        "te",
        "trailer",
        "upgrade",
        "proxy-connection",
    ] {
        out.remove(h);
    }
    out
}

/// Sends `ev` to `target` as mt-broker-filter's `send` does (with `Prefer: reply` and
/// `Kn-Namespace`), and answers with what came back:
/// - no answer: 500 with the error JSON, the response body being the dispatch error;
/// - not 2xx: the same status, the pass-through response headers and the error JSON
///   (`errdestination`, `errresponsebody` in base64) the channel dispatcher reads for the
///   dead-letter extensions;
/// - 2xx with no body, or a body that is not an event: as received (empty), or 502;
/// - 2xx with an event: the event (its TTL re-attached when `ttl` is given).
async fn send(
    state: &State,
    trigger: &Trigger,
    target: &StatusTarget,
    ev: &CloudEvent,
    headers: HeaderMap,
    (format, timeout): (Format, Option<std::time::Duration>),
    ttl: Option<String>,
) -> Resp {
    let opts = SendOptions {
        format,
        timeout,
        namespace: trigger.namespace.clone(),
        prefer_reply: true,
        extra_headers: headers,
        ca_certs: target.ca_certs.clone(),
    };
    let url = &target.uri;
    let attempt = state.http.post(url, ev, &opts).await;
    let (code, body) = match attempt.status {
        None => (
            StatusCode::INTERNAL_SERVER_ERROR,
            Bytes::from(format!(
                "dispatch error: {}",
                attempt.error.as_deref().unwrap_or("no response")
            )),
        ),
        Some(status) => (
            StatusCode::from_u16(status).unwrap_or(StatusCode::BAD_GATEWAY),
            attempt.body.clone(),
        ),
    };
    let resp_pass = pass_through(&attempt.headers);
    if !code.is_success() {
        let json = serde_json::json!({
            "errdestination": url,
            "errresponsebody": B64.encode(&body),
        });
        let mut r = with_headers(respond(code, json.to_string()), resp_pass);
        r.headers_mut().insert(
            http::header::CONTENT_TYPE,
            http::HeaderValue::from_static("application/json"),
        );
        return r;
    }
    match attempt.reply() {
        Ok(None) => with_headers(respond(code, Bytes::new()), resp_pass),
        Ok(Some(mut reply)) => {
            if let Some(ttl) = ttl {
                reply.set(TTL_EXT, ttl);
            }
            let mut r = respond(code, reply.data.clone().unwrap_or_default());
            for (k, v) in reply.binary_headers() {
                if let Some(k) = k {
                    r.headers_mut().insert(k, v);
                }
            }
            with_headers(r, resp_pass)
        }
        Err(e) => respond(StatusCode::BAD_GATEWAY, format!("{e}\n")),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn paths_and_headers() {
        assert_eq!(
            trigger_path("/triggers/ns/t/u"),
            Some(("ns".into(), "t".into(), "u".into(), None))
        );
        assert_eq!(
            trigger_path("/triggers/ns/t/u/dls").and_then(|p| p.3),
            Some("dls".into())
        );
        assert!(trigger_path("/triggers/ns/t").is_none());
        assert!(trigger_path("/triggers/ns/t/u/x").is_none());
        let mut h = HeaderMap::new();
        h.insert("x-request-id", "1".parse().unwrap());
        h.insert("knative-foo", "2".parse().unwrap());
        h.insert("x-b3-traceid", "3".parse().unwrap());
        h.insert("authorization", "4".parse().unwrap());
        assert_eq!(pass_through(&h).len(), 3);
    }
}
