//! HTTP delivery of CloudEvents to `K_SINK` (and the dead-letter sink).

use std::path::PathBuf;
use std::sync::Mutex;
use std::time::{Duration, Instant};

use bytes::Bytes;
use http::StatusCode;

use crate::cloudevent::{CloudEvent, STRUCTURED_CONTENT_TYPE};
use crate::config::Format;

#[derive(Debug, thiserror::Error)]
pub enum SinkError {
    #[error("cannot build the HTTP client: {0}")]
    Client(String),
    #[error("K_CA_CERTS holds no usable PEM certificate: {0}")]
    CaCerts(String),
}

/// Outcome of one delivery attempt.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Attempt {
    Accepted(StatusCode),
    /// Retryable per the Knative data-plane table: network errors, 5xx, 404, 408, 409, 429.
    Retry(String),
    /// Not retryable (3xx, other 4xx).
    Reject(StatusCode, String),
}

/// Knative's retry table (contract C.6).
pub fn retryable(status: StatusCode) -> bool {
    status.is_server_error() || matches!(status.as_u16(), 404 | 408 | 409 | 429)
}

/// Reads `/oidc/token` (or the configured file), re-reading it at most every 10 s so rotated
/// tokens are picked up without a syscall per event.
#[derive(Debug)]
struct TokenCache {
    path: PathBuf,
    cached: Mutex<(Option<Instant>, Option<String>)>,
}

impl TokenCache {
    fn get(&self) -> Option<String> {
        let mut guard = self.cached.lock().unwrap_or_else(|p| p.into_inner());
        let fresh = guard
            .0
            .is_some_and(|t| t.elapsed() < Duration::from_secs(10));
        if !fresh {
            let token = std::fs::read_to_string(&self.path)
                .ok()
                .map(|t| t.trim().to_owned())
                .filter(|t| !t.is_empty());
            *guard = (Some(Instant::now()), token);
        }
        guard.1.clone()
    }
}

/// Posts CloudEvents over the HTTP binding.
#[derive(Debug)]
pub struct SinkClient {
    client: reqwest::Client,
    format: Format,
    token: TokenCache,
}

impl SinkClient {
    pub fn new(
        format: Format,
        timeout: Duration,
        ca_certs: Option<&str>,
        oidc_token_file: PathBuf,
        pool: usize,
    ) -> Result<Self, SinkError> {
        let mut b = reqwest::Client::builder()
            .use_rustls_tls()
            .timeout(timeout)
            .connect_timeout(Duration::from_secs(5).min(timeout))
            .pool_max_idle_per_host(pool)
            .pool_idle_timeout(Duration::from_secs(60))
            .tcp_nodelay(true)
            .redirect(reqwest::redirect::Policy::none());
        if let Some(pem) = ca_certs {
            let certs = reqwest::Certificate::from_pem_bundle(pem.as_bytes())
                .map_err(|e| SinkError::CaCerts(e.to_string()))?;
            if certs.is_empty() {
                return Err(SinkError::CaCerts("no certificate found".into()));
            }
            for c in certs {
                b = b.add_root_certificate(c);
            }
        }
        let client = b.build().map_err(|e| SinkError::Client(e.to_string()))?;
        Ok(SinkClient {
            client,
            format,
            token: TokenCache {
                path: oidc_token_file,
                cached: Mutex::new((None, None)),
            },
        })
    }

    /// One POST of `ev` to `url`.
    pub async fn post(&self, url: &str, ev: &CloudEvent) -> Attempt {
        let mut req = self.client.post(url);
        req = match self.format {
            Format::Binary => req
                .headers(ev.binary_headers())
                .body(ev.data.clone().unwrap_or_default()),
            Format::Structured => req
                .header(http::header::CONTENT_TYPE, STRUCTURED_CONTENT_TYPE)
                .body(Bytes::from(ev.to_json())),
        };
        if let Some(token) = self.token.get() {
            req = req.bearer_auth(token);
        }
        match req.send().await {
            Ok(resp) => {
                let status = resp.status();
                if status.is_success() {
                    // Drain the body so the connection goes back to the pool.
                    let _ = resp.bytes().await;
                    Attempt::Accepted(status)
                } else {
                    let body = resp.bytes().await.unwrap_or_default();
                    let text = String::from_utf8_lossy(&body[..body.len().min(256)]).into_owned();
                    if retryable(status) {
                        Attempt::Retry(format!("sink answered {status}: {text}"))
                    } else {
                        Attempt::Reject(status, text)
                    }
                }
            }
            Err(e) => Attempt::Retry(format!("sink request failed: {e}")),
        }
    }
}

/// Exponential backoff: `base * 2^attempt`, capped.
pub fn backoff(base: Duration, max: Duration, attempt: u32) -> Duration {
    let factor = 1u32.checked_shl(attempt.min(30)).unwrap_or(u32::MAX);
    base.saturating_mul(factor).min(max)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn retry_table() {
        for code in [500, 502, 503, 504, 404, 408, 409, 429] {
            assert!(retryable(StatusCode::from_u16(code).unwrap()), "{code}");
        }
        for code in [400, 401, 403, 413, 301] {
            assert!(!retryable(StatusCode::from_u16(code).unwrap()), "{code}");
        }
    }

    #[test]
    fn backoff_doubles_and_caps() {
        let b = Duration::from_millis(200);
        let m = Duration::from_secs(5);
        assert_eq!(backoff(b, m, 0), b);
        assert_eq!(backoff(b, m, 3), Duration::from_millis(1600));
        assert_eq!(backoff(b, m, 40), m);
    }
}
