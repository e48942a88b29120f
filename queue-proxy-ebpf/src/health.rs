//! Which requests are probes, and the answers to them (knative/pkg drain.go, serving
//! `pkg/queue/health/handler.go`, networking `header.go`).

use http::{HeaderMap, HeaderName, HeaderValue, Response, StatusCode, header::USER_AGENT};

use crate::body::{self, Body};

// Pre-parsed names: no parsing or case folding per lookup.
pub const K_NETWORK_PROBE: HeaderName = HeaderName::from_static("k-network-probe");
pub const K_NETWORK_HASH: HeaderName = HeaderName::from_static("k-network-hash");
pub const K_KUBELET_PROBE: HeaderName = HeaderName::from_static("k-kubelet-probe");
pub const K_PROXY_REQUEST: HeaderName = HeaderName::from_static("k-proxy-request");
pub const K_ORIGINAL_HOST: HeaderName = HeaderName::from_static("k-original-host");
pub const KUBE_PROBE_UA_PREFIX: &str = "kube-probe/";
pub const ACTIVATOR_UA: &str = "Knative-Activator-Probe";
pub const AUTOSCALING_UA: &str = "Knative-Autoscaling-Probe";
/// The queue-proxy's own probe value and probe reply (`queue.Name`).
pub const QUEUE: &str = "queue";

fn get(h: &HeaderMap, name: HeaderName) -> &str {
    h.get(name).and_then(|v| v.to_str().ok()).unwrap_or("")
}

fn user_agent(h: &HeaderMap) -> &str {
    get(h, USER_AGENT)
}

/// networking's `IsKubeletProbe`: the kubelet's user agent or the (deprecated)
/// `K-Kubelet-Probe` header. The drainer only looks at the user agent.
pub fn is_kubelet_probe(h: &HeaderMap) -> bool {
    user_agent(h).starts_with(KUBE_PROBE_UA_PREFIX) || !get(h, K_KUBELET_PROBE).is_empty()
}

/// What the drainer does with a request.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Kind {
    /// Kubelet, activator or autoscaler health check: answered by the probe handler.
    HealthCheck,
    /// `K-Network-Probe: probe`: answered with the echoed hash.
    NetworkProbe,
    /// Everything else: proxied.
    Request,
}

pub fn classify(h: &HeaderMap) -> Kind {
    let ua = user_agent(h);
    if ua.starts_with(KUBE_PROBE_UA_PREFIX)
        || ua.starts_with(ACTIVATOR_UA)
        || ua.starts_with(AUTOSCALING_UA)
    {
        Kind::HealthCheck
    } else if get(h, K_NETWORK_PROBE) == "probe" {
        Kind::NetworkProbe
    } else {
        Kind::Request
    }
}

/// Probes of any kind are left out of request logs (unless asked) and tracing.
pub fn is_probe(h: &HeaderMap) -> bool {
    is_kubelet_probe(h) || !get(h, K_NETWORK_PROBE).is_empty()
}

pub fn is_proxied(h: &HeaderMap) -> bool {
    get(h, K_PROXY_REQUEST) == "activator"
}

pub fn shutting_down() -> Response<Body> {
    body::error(StatusCode::SERVICE_UNAVAILABLE, "shutting down")
}

/// The network probe answer: 200 echoing `K-Network-Hash`, 400 without one.
pub fn network_probe(h: &HeaderMap) -> Response<Body> {
    let hash = get(h, K_NETWORK_HASH);
    if hash.is_empty() {
        return body::error(
            StatusCode::BAD_REQUEST,
            "a probe request must contain a non-empty \"K-Network-Hash\" header",
        );
    }
    let mut r = body::status(StatusCode::OK);
    if let Ok(v) = HeaderValue::from_str(hash) {
        r.headers_mut().insert(K_NETWORK_HASH, v);
    }
    r
}

/// Checks the probe header of a health check: the 400 answer when it is not `queue`.
pub fn bad_probe_header(h: &HeaderMap) -> Option<Response<Body>> {
    let v = get(h, K_NETWORK_PROBE);
    if v == QUEUE {
        None
    } else {
        Some(body::error(
            StatusCode::BAD_REQUEST,
            &format!("unexpected probe header value: {v}"),
        ))
    }
}

/// The answer once the user container has been probed.
pub fn probe_result(ready: bool) -> Response<Body> {
    if ready {
        body::text(StatusCode::OK, QUEUE)
    } else {
        body::status(StatusCode::SERVICE_UNAVAILABLE)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn headers(pairs: &[(&'static str, &'static str)]) -> HeaderMap {
        let mut h = HeaderMap::new();
        for (k, v) in pairs {
            h.insert(*k, HeaderValue::from_static(v));
        }
        h
    }

    #[test]
    fn classification_matrix() {
        use Kind::*;
        for (pairs, kind) in [
            (vec![("user-agent", "kube-probe/1.30")], HealthCheck),
            // knative/pkg's drainer only checks the user agent.
            (vec![("k-kubelet-probe", "x")], Request),
            (vec![("user-agent", "Knative-Activator-Probe")], HealthCheck),
            (
                vec![
                    ("user-agent", "Knative-Autoscaling-Probe"),
                    ("k-network-probe", "activator"),
                ],
                HealthCheck,
            ),
            (vec![("k-network-probe", "probe")], NetworkProbe),
            (vec![("k-network-probe", "queue")], Request),
            (vec![("user-agent", "curl/8")], Request),
        ] {
            assert_eq!(classify(&headers(&pairs)), kind, "{pairs:?}");
        }
    }

    #[test]
    fn probe_header_checked() {
        assert!(bad_probe_header(&headers(&[("k-network-probe", "queue")])).is_none());
        let r = bad_probe_header(&headers(&[("k-network-probe", "activator")])).expect("400");
        assert_eq!(r.status(), StatusCode::BAD_REQUEST);
        assert_eq!(network_probe(&HeaderMap::new()).status(), 400);
        let r = network_probe(&headers(&[("k-network-hash", "abc")]));
        assert_eq!(r.headers()[K_NETWORK_HASH], "abc");
    }
}
