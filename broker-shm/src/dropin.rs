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
use crate::manifests::{ConfigSource, Format, Snapshot, Target};
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
    let state = Arc::new(State {
        snap: RwLock::new(source.load()),
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
    if let Err(IngestError::TtlExhausted) = apply_ingress_extensions(&mut ev, state.max_ttl) {
        return respond(StatusCode::BAD_REQUEST, Bytes::new());
    }
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
    let Some(address) = address else {
        return respond(
            StatusCode::INTERNAL_SERVER_ERROR,
            "channel address not found in broker status annotations\n",
        );
    };
    let opts = SendOptions {
        format: Format::Binary,
        timeout: None,
        namespace: String::new(),
        prefer_reply: false,
        extra_headers: pass_through(&parts.headers),
        ca_certs: None,
    };
    let attempt = state.http.post(&address, &ev, &opts).await;
    match attempt.status {
        Some(s) => respond(
            StatusCode::from_u16(s).unwrap_or(StatusCode::INTERNAL_SERVER_ERROR),
            Bytes::new(),
        ),
        None => respond(StatusCode::INTERNAL_SERVER_ERROR, Bytes::new()),
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
                let broker_dls = snap
                    .brokers
                    .iter()
                    .find(|b| b.namespace == t.namespace && b.name == t.broker)
                    .and_then(|b| b.delivery.as_ref())
                    .and_then(|d| d.dead_letter_sink.as_ref())
                    .and_then(|d| Some((d.resolve(&t.namespace).ok()?, d.ca_certs.clone())));
                (t.clone(), broker_dls)
            })
    };
    let Some((trigger, broker_dls)) = found else {
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
    let delivery = trigger
        .delivery
        .as_ref()
        .and_then(|d| d.compile(&trigger.namespace, "spec.delivery").ok())
        .unwrap_or_default();
    let pass = pass_through(&parts.headers);
    match sub.as_deref() {
        Some("dls") => {
            let trigger_dls = delivery
                .dead_letter_sink
                .clone()
                .map(|t| (t, delivery.dead_letter_ca_certs.clone()));
            let Some((dls, ca)) = trigger_dls.or(broker_dls) else {
                return respond(StatusCode::ACCEPTED, Bytes::new());
            };
            let Target::Http(url) = dls else {
                return respond(StatusCode::BAD_REQUEST, Bytes::new());
            };
            return relay(&state, &url, &ev, pass, Format::Binary, ca).await;
        }
        Some(_) => {
            // Reply path: re-post to the broker's own address, no TTL change.
            let addr = {
                let snap = state.snap();
                snap.brokers
                    .iter()
                    .find(|b| b.namespace == trigger.namespace && b.name == trigger.broker)
                    .and_then(|b| b.status_annotations.get("address").cloned())
            };
            let Some(addr) = addr else {
                return respond(StatusCode::NOT_FOUND, Bytes::new());
            };
            return relay(&state, &addr, &ev, pass, Format::Binary, None).await;
        }
        None => {}
    }
    let Some(ttl) = ev.remove(TTL_EXT) else {
        return respond(StatusCode::BAD_REQUEST, "missing knativebrokerttl\n");
    };
    let filter = Filter::for_trigger(trigger.spec.filter.as_ref(), &trigger.spec.filters);
    if !filter.passes(&ev) {
        return respond(StatusCode::OK, Bytes::new());
    }
    let Target::Http(url) = &trigger.subscriber else {
        return respond(StatusCode::NOT_FOUND, Bytes::new());
    };
    let opts = SendOptions {
        format: delivery.format,
        timeout: delivery.timeout,
        namespace: trigger.namespace.clone(),
        prefer_reply: true,
        extra_headers: pass,
        ca_certs: trigger.spec.subscriber.ca_certs.clone(),
    };
    let attempt = state.http.post(url, &ev, &opts).await;
    let Some(status) = attempt.status else {
        return respond(StatusCode::INTERNAL_SERVER_ERROR, Bytes::new());
    };
    let code = StatusCode::from_u16(status).unwrap_or(StatusCode::BAD_GATEWAY);
    let resp_pass = pass_through(&attempt.headers);
    if !code.is_success() {
        let body = serde_json::json!({
            "errdestination": url,
            "errresponsebody": B64.encode(&attempt.body),
        });
        let mut r = with_headers(respond(code, body.to_string()), resp_pass);
        r.headers_mut().insert(
            http::header::CONTENT_TYPE,
            http::HeaderValue::from_static("application/json"),
        );
        return r;
    }
    match attempt.reply() {
        Ok(None) => with_headers(respond(code, Bytes::new()), resp_pass),
        Ok(Some(mut reply)) => {
            reply.set(TTL_EXT, ttl);
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

async fn relay(
    state: &State,
    url: &str,
    ev: &CloudEvent,
    pass: HeaderMap,
    format: Format,
    ca_certs: Option<String>,
) -> Resp {
    let opts = SendOptions {
        format,
        timeout: None,
        namespace: String::new(),
        prefer_reply: false,
        extra_headers: pass,
        ca_certs,
    };
    let attempt = state.http.post(url, ev, &opts).await;
    match attempt.status.and_then(|s| StatusCode::from_u16(s).ok()) {
        Some(code) => respond(code, attempt.body),
        None => respond(StatusCode::INTERNAL_SERVER_ERROR, Bytes::new()),
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
