//! Configuration from the environment, exactly as Knative's revision reconciler sets it
//! (knative-contract.md A.1). Both generations of variables are accepted: the OpenTelemetry
//! era (v1.19+, `OBSERVABILITY_CONFIG`) and the OpenCensus era (up to v1.18,
//! `SERVING_ENABLE_REQUEST_LOG`, `SERVING_REQUEST_METRICS_BACKEND`, ...). Unknown variables
//! are ignored. A missing required variable or an unparsable value is an [`EnvError`]; the
//! binary exits with code 64 on it.

use std::time::Duration;

use serde::Deserialize;

pub const CONTAINER_CONCURRENCY: &str = "CONTAINER_CONCURRENCY";
pub const QUEUE_SERVING_PORT: &str = "QUEUE_SERVING_PORT";
pub const QUEUE_SERVING_TLS_PORT: &str = "QUEUE_SERVING_TLS_PORT";
pub const USER_PORT: &str = "USER_PORT";
pub const REVISION_TIMEOUT_SECONDS: &str = "REVISION_TIMEOUT_SECONDS";
pub const REVISION_RESPONSE_START_TIMEOUT_SECONDS: &str = "REVISION_RESPONSE_START_TIMEOUT_SECONDS";
pub const REVISION_IDLE_TIMEOUT_SECONDS: &str = "REVISION_IDLE_TIMEOUT_SECONDS";
pub const SERVING_READINESS_PROBE: &str = "SERVING_READINESS_PROBE";
pub const ENABLE_HTTP_FULL_DUPLEX: &str = "ENABLE_HTTP_FULL_DUPLEX";
pub const ENABLE_HTTP2_AUTO_DETECTION: &str = "ENABLE_HTTP2_AUTO_DETECTION";
pub const ENABLE_MULTI_CONTAINER_PROBES: &str = "ENABLE_MULTI_CONTAINER_PROBES";
pub const SERVING_LOGGING_CONFIG: &str = "SERVING_LOGGING_CONFIG";
pub const SERVING_LOGGING_LEVEL: &str = "SERVING_LOGGING_LEVEL";
pub const SERVING_NAMESPACE: &str = "SERVING_NAMESPACE";
pub const SERVING_SERVICE: &str = "SERVING_SERVICE";
pub const SERVING_CONFIGURATION: &str = "SERVING_CONFIGURATION";
pub const SERVING_REVISION: &str = "SERVING_REVISION";
pub const SERVING_POD: &str = "SERVING_POD";
pub const SERVING_POD_IP: &str = "SERVING_POD_IP";
pub const OBSERVABILITY_CONFIG: &str = "OBSERVABILITY_CONFIG";
pub const OTEL_SERVICE_NAME: &str = "OTEL_SERVICE_NAME";
/// knative/pkg `system.PodName()`: the pod in OTel resource attributes (not `SERVING_POD`).
pub const POD_NAME: &str = "POD_NAME";
// v1.22+: TLS server settings (knative/pkg `network/tls/config.go`, prefix `QUEUE_PROXY_`).
pub const QUEUE_PROXY_TLS_MIN_VERSION: &str = "QUEUE_PROXY_TLS_MIN_VERSION";
pub const QUEUE_PROXY_TLS_MAX_VERSION: &str = "QUEUE_PROXY_TLS_MAX_VERSION";
pub const QUEUE_PROXY_TLS_CIPHER_SUITES: &str = "QUEUE_PROXY_TLS_CIPHER_SUITES";
pub const QUEUE_PROXY_TLS_CURVE_PREFERENCES: &str = "QUEUE_PROXY_TLS_CURVE_PREFERENCES";
// Up to v1.18 (OpenCensus era).
pub const SERVING_ENABLE_REQUEST_LOG: &str = "SERVING_ENABLE_REQUEST_LOG";
pub const SERVING_REQUEST_LOG_TEMPLATE: &str = "SERVING_REQUEST_LOG_TEMPLATE";
pub const SERVING_ENABLE_PROBE_REQUEST_LOG: &str = "SERVING_ENABLE_PROBE_REQUEST_LOG";
pub const SERVING_REQUEST_METRICS_BACKEND: &str = "SERVING_REQUEST_METRICS_BACKEND";
pub const ENABLE_PROFILING: &str = "ENABLE_PROFILING";
// Not set by Knative: fixed ports in Knative, overridable here so that tests and benches can
// run several instances side by side. Defaults are Knative's constants.
pub const QUEUE_ADMIN_PORT: &str = "QUEUE_ADMIN_PORT";
pub const QUEUE_AUTOSCALING_METRICS_PORT: &str = "QUEUE_AUTOSCALING_METRICS_PORT";
pub const QUEUE_USER_METRICS_PORT: &str = "QUEUE_USER_METRICS_PORT";
pub const QUEUE_CERT_DIR: &str = "QUEUE_CERT_DIR";

/// Knative's `networking.QueueAdminPort`.
pub const DEFAULT_ADMIN_PORT: u16 = 8022;
/// Knative's `networking.AutoscalingQueueMetricsPort`.
pub const DEFAULT_AUTOSCALING_METRICS_PORT: u16 = 9090;
/// Knative's `networking.UserQueueMetricsPort`.
pub const DEFAULT_USER_METRICS_PORT: u16 = 9091;
/// Knative's `queue.CertDirectory`.
pub const DEFAULT_CERT_DIR: &str = "/var/lib/knative/certs";
/// Knative's `DefaultRequestLogTemplate` (serving `pkg/observability/config.go`).
pub const DEFAULT_REQUEST_LOG_TEMPLATE: &str = r#"{"httpRequest": {"requestMethod": "{{.Request.Method}}", "requestUrl": "{{js .Request.RequestURI}}", "requestSize": "{{.Request.ContentLength}}", "status": {{.Response.Code}}, "responseSize": "{{.Response.Size}}", "userAgent": "{{js .Request.UserAgent}}", "remoteIp": "{{js .Request.RemoteAddr}}", "serverIp": "{{.Revision.PodIP}}", "referer": "{{js .Request.Referer}}", "latency": "{{.Response.Latency}}s", "protocol": "{{.Request.Proto}}"}, "traceId": "{{.TraceID}}"}"#;

/// Why the environment was rejected.
#[derive(Debug, thiserror::Error, PartialEq, Eq)]
pub enum EnvError {
    #[error("required key {0} missing value")]
    Missing(&'static str),
    #[error("{var}: cannot parse {value:?} as {kind}")]
    Invalid {
        var: &'static str,
        value: String,
        kind: &'static str,
    },
    #[error("{var}: invalid JSON: {reason}")]
    Json { var: &'static str, reason: String },
}

/// How request metrics are exported (`requestMetrics.protocol`).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub enum RequestMetricsProtocol {
    #[default]
    None,
    Prometheus,
    /// OTLP (`grpc` or `http/protobuf`): accepted, not exported by this implementation.
    Otlp,
}

/// Everything the queue-proxy reads at start-up.
#[derive(Debug, Clone, PartialEq)]
pub struct Config {
    pub container_concurrency: u32,
    pub serving_port: u16,
    pub serving_tls_port: u16,
    pub user_port: u16,
    pub revision_timeout: Duration,
    pub response_start_timeout: Option<Duration>,
    pub idle_timeout: Option<Duration>,
    pub readiness_probe: Option<String>,
    pub enable_http_full_duplex: bool,
    pub enable_http2_auto_detection: bool,
    pub enable_multi_container_probes: bool,
    pub logging_config: String,
    pub logging_level: String,
    pub namespace: String,
    pub service: String,
    pub configuration: String,
    pub revision: String,
    pub pod: String,
    pub pod_ip: String,
    pub observability: Observability,
    pub admin_port: u16,
    pub autoscaling_metrics_port: u16,
    pub user_metrics_port: u16,
    pub cert_dir: String,
    pub otel_service_name: Option<String>,
    pub otel_pod_name: String,
    pub tls: TlsSettings,
}

/// A TLS protocol version as Knative names it.
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord)]
pub enum TlsVersion {
    V1_2,
    V1_3,
}

/// The TLS server settings of the serving port's TLS listener.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct TlsSettings {
    /// Knative's default minimum is TLS 1.3.
    pub min_version: TlsVersion,
    pub max_version: Option<TlsVersion>,
    /// Go cipher suite names; empty means the library's defaults.
    pub cipher_suites: Vec<String>,
    /// Go curve names (`X25519`, `CurveP256`, ...); empty means defaults.
    pub curve_preferences: Vec<String>,
}

/// The parts of `OBSERVABILITY_CONFIG` (or its v1.18 predecessors) the queue-proxy acts on.
#[derive(Debug, Clone, PartialEq)]
pub struct Observability {
    pub request_metrics: RequestMetricsProtocol,
    pub enable_request_log: bool,
    pub request_log_template: String,
    pub enable_probe_request_log: bool,
    pub profiling: bool,
}

impl Default for Observability {
    fn default() -> Self {
        Self {
            request_metrics: RequestMetricsProtocol::None,
            enable_request_log: false,
            request_log_template: DEFAULT_REQUEST_LOG_TEMPLATE.to_owned(),
            enable_probe_request_log: false,
            profiling: false,
        }
    }
}

#[derive(Deserialize, Default)]
#[serde(default)]
struct ObsJson {
    #[serde(rename = "requestMetrics")]
    request_metrics: ObsMetrics,
    runtime: ObsRuntime,
    #[serde(rename = "enableRequestLog")]
    enable_request_log: bool,
    #[serde(rename = "requestLogTemplate")]
    request_log_template: Option<String>,
    #[serde(rename = "enableProbeRequestLog")]
    enable_probe_request_log: bool,
}

#[derive(Deserialize, Default)]
#[serde(default)]
struct ObsMetrics {
    protocol: String,
}

#[derive(Deserialize, Default)]
#[serde(default)]
struct ObsRuntime {
    profiling: String,
}

/// Reads variables through a lookup function so parsing is testable without touching the
/// process environment.
struct Vars<F: Fn(&str) -> Option<String>>(F);

impl<F: Fn(&str) -> Option<String>> Vars<F> {
    fn opt(&self, name: &'static str) -> Option<String> {
        (self.0)(name)
    }
    fn req(&self, name: &'static str) -> Result<String, EnvError> {
        self.opt(name).ok_or(EnvError::Missing(name))
    }
    fn int<T: std::str::FromStr>(
        name: &'static str,
        v: &str,
        kind: &'static str,
    ) -> Result<T, EnvError> {
        v.trim().parse::<T>().map_err(|_| EnvError::Invalid {
            var: name,
            value: v.to_owned(),
            kind,
        })
    }
    fn req_int<T: std::str::FromStr>(
        &self,
        name: &'static str,
        kind: &'static str,
    ) -> Result<T, EnvError> {
        Self::int(name, &self.req(name)?, kind)
    }
    fn opt_int<T: std::str::FromStr>(
        &self,
        name: &'static str,
        kind: &'static str,
    ) -> Result<Option<T>, EnvError> {
        self.opt(name)
            .map(|v| Self::int(name, &v, kind))
            .transpose()
    }
    fn port(&self, name: &'static str, default: Option<u16>) -> Result<u16, EnvError> {
        match (self.opt(name), default) {
            (Some(v), _) => Self::int(name, &v, "a TCP port"),
            (None, Some(d)) => Ok(d),
            (None, None) => Err(EnvError::Missing(name)),
        }
    }
    fn tls_version(&self, name: &'static str) -> Result<Option<TlsVersion>, EnvError> {
        match self.opt(name).as_deref() {
            None | Some("") => Ok(None),
            Some("1.2") => Ok(Some(TlsVersion::V1_2)),
            Some("1.3") => Ok(Some(TlsVersion::V1_3)),
            Some(other) => Err(EnvError::Invalid {
                var: name,
                value: other.to_owned(),
                kind: "a TLS version (\"1.2\" or \"1.3\")",
            }),
        }
    }
    fn list(&self, name: &'static str) -> Vec<String> {
        self.opt(name)
            .map(|v| {
                v.split(',')
                    .map(str::trim)
                    .filter(|s| !s.is_empty())
                    .map(str::to_owned)
                    .collect()
            })
            .unwrap_or_default()
    }
    fn bool(&self, name: &'static str) -> Result<bool, EnvError> {
        match self.opt(name) {
            None => Ok(false),
            Some(v) => parse_go_bool(&v).ok_or(EnvError::Invalid {
                var: name,
                value: v,
                kind: "a boolean",
            }),
        }
    }
}

/// Go's `strconv.ParseBool`, which envconfig uses.
fn parse_go_bool(v: &str) -> Option<bool> {
    match v {
        "1" | "t" | "T" | "TRUE" | "true" | "True" => Some(true),
        "0" | "f" | "F" | "FALSE" | "false" | "False" => Some(false),
        _ => None,
    }
}

fn seconds(v: i64) -> Option<Duration> {
    u64::try_from(v)
        .ok()
        .filter(|s| *s > 0)
        .map(Duration::from_secs)
}

impl Config {
    /// Parses the process environment.
    pub fn from_env() -> Result<Self, EnvError> {
        Self::from_lookup(|k| std::env::var(k).ok())
    }

    /// Parses variables supplied by `lookup` (a missing variable is `None`). Checks the
    /// required variables in the order Knative's envconfig does, so the first error matches.
    pub fn from_lookup(lookup: impl Fn(&str) -> Option<String>) -> Result<Self, EnvError> {
        let v = Vars(lookup);
        let container_concurrency: i64 = v.req_int(CONTAINER_CONCURRENCY, "an integer")?;
        let serving_port = v.port(QUEUE_SERVING_PORT, None)?;
        let serving_tls_port = v.port(QUEUE_SERVING_TLS_PORT, None)?;
        let user_port = v.port(USER_PORT, None)?;
        let revision_timeout: i64 = v.req_int(REVISION_TIMEOUT_SECONDS, "an integer")?;
        let response_start: Option<i64> =
            v.opt_int(REVISION_RESPONSE_START_TIMEOUT_SECONDS, "an integer")?;
        let idle: Option<i64> = v.opt_int(REVISION_IDLE_TIMEOUT_SECONDS, "an integer")?;
        let readiness_probe = v.opt(SERVING_READINESS_PROBE).filter(|p| !p.is_empty());
        let enable_http_full_duplex = v.bool(ENABLE_HTTP_FULL_DUPLEX)?;
        let enable_http2_auto_detection = v.bool(ENABLE_HTTP2_AUTO_DETECTION)?;
        let enable_multi_container_probes = v.bool(ENABLE_MULTI_CONTAINER_PROBES)?;
        let logging_config = v.req(SERVING_LOGGING_CONFIG)?;
        let logging_level = v.req(SERVING_LOGGING_LEVEL)?;
        let namespace = v.req(SERVING_NAMESPACE)?;
        let service = v.opt(SERVING_SERVICE).unwrap_or_default();
        let configuration = v.req(SERVING_CONFIGURATION)?;
        let revision = v.req(SERVING_REVISION)?;
        let pod = v.req(SERVING_POD)?;
        let pod_ip = v.req(SERVING_POD_IP)?;
        let observability = Self::observability(&v)?;

        Ok(Self {
            // A negative containerConcurrency is rejected by Knative's webhook; treat it as
            // "unlimited" like Knative's breaker construction (`< 1` means no breaker).
            container_concurrency: u32::try_from(container_concurrency.max(0)).unwrap_or(u32::MAX),
            serving_port,
            serving_tls_port,
            user_port,
            revision_timeout: seconds(revision_timeout).unwrap_or(Duration::ZERO),
            response_start_timeout: response_start.and_then(seconds),
            idle_timeout: idle.and_then(seconds),
            readiness_probe,
            enable_http_full_duplex,
            enable_http2_auto_detection,
            enable_multi_container_probes,
            logging_config,
            logging_level,
            namespace,
            service,
            configuration,
            revision,
            pod,
            pod_ip,
            observability,
            admin_port: v.port(QUEUE_ADMIN_PORT, Some(DEFAULT_ADMIN_PORT))?,
            autoscaling_metrics_port: v.port(
                QUEUE_AUTOSCALING_METRICS_PORT,
                Some(DEFAULT_AUTOSCALING_METRICS_PORT),
            )?,
            user_metrics_port: v.port(QUEUE_USER_METRICS_PORT, Some(DEFAULT_USER_METRICS_PORT))?,
            cert_dir: v
                .opt(QUEUE_CERT_DIR)
                .unwrap_or_else(|| DEFAULT_CERT_DIR.to_owned()),
            otel_service_name: v.opt(OTEL_SERVICE_NAME).filter(|s| !s.is_empty()),
            otel_pod_name: v.opt(POD_NAME).unwrap_or_default(),
            tls: TlsSettings {
                min_version: v
                    .tls_version(QUEUE_PROXY_TLS_MIN_VERSION)?
                    .unwrap_or(TlsVersion::V1_3),
                max_version: v.tls_version(QUEUE_PROXY_TLS_MAX_VERSION)?,
                cipher_suites: v.list(QUEUE_PROXY_TLS_CIPHER_SUITES),
                curve_preferences: v.list(QUEUE_PROXY_TLS_CURVE_PREFERENCES),
            },
        })
    }

    fn observability<F: Fn(&str) -> Option<String>>(
        v: &Vars<F>,
    ) -> Result<Observability, EnvError> {
        let mut o = Observability::default();
        if let Some(json) = v.opt(OBSERVABILITY_CONFIG).filter(|j| !j.is_empty()) {
            let parsed: ObsJson = serde_json::from_str(&json).map_err(|e| EnvError::Json {
                var: OBSERVABILITY_CONFIG,
                reason: e.to_string(),
            })?;
            o.request_metrics = match parsed.request_metrics.protocol.as_str() {
                "prometheus" => RequestMetricsProtocol::Prometheus,
                "grpc" | "http/protobuf" => RequestMetricsProtocol::Otlp,
                _ => RequestMetricsProtocol::None,
            };
            o.enable_request_log = parsed.enable_request_log;
            if let Some(t) = parsed.request_log_template.filter(|t| !t.is_empty()) {
                o.request_log_template = t;
            }
            o.enable_probe_request_log = parsed.enable_probe_request_log;
            o.profiling = parsed.runtime.profiling == "enabled";
            return Ok(o);
        }
        // v1.18 and earlier: one variable per setting; the OpenCensus Prometheus exporter
        // served 9091 by default.
        o.enable_request_log = v.bool(SERVING_ENABLE_REQUEST_LOG)?;
        if let Some(t) = v
            .opt(SERVING_REQUEST_LOG_TEMPLATE)
            .filter(|t| !t.is_empty())
        {
            o.request_log_template = t;
        }
        o.enable_probe_request_log = v.bool(SERVING_ENABLE_PROBE_REQUEST_LOG)?;
        o.profiling = v.bool(ENABLE_PROFILING)?;
        o.request_metrics = match v.opt(SERVING_REQUEST_METRICS_BACKEND).as_deref() {
            Some("prometheus") => RequestMetricsProtocol::Prometheus,
            Some("opencensus") => RequestMetricsProtocol::Otlp,
            _ => RequestMetricsProtocol::None,
        };
        Ok(o)
    }

    /// Breaker queue depth (10 x containerConcurrency), `None` when unlimited.
    pub fn breaker_params(&self) -> Option<(usize, usize)> {
        let cc = usize::try_from(self.container_concurrency).ok()?;
        (cc > 0).then_some((cc, 10 * cc))
    }

    /// `service.name` as Knative's OTel setup picks it.
    pub fn service_name(&self) -> &str {
        [
            self.otel_service_name.as_deref().unwrap_or(""),
            &self.service,
            &self.configuration,
            &self.revision,
        ]
        .into_iter()
        .find(|s| !s.is_empty())
        .unwrap_or(&self.pod)
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::collections::HashMap;

    pub(crate) fn base() -> HashMap<&'static str, String> {
        [
            (CONTAINER_CONCURRENCY, "0"),
            (QUEUE_SERVING_PORT, "8012"),
            (QUEUE_SERVING_TLS_PORT, "8112"),
            (USER_PORT, "8080"),
            (REVISION_TIMEOUT_SECONDS, "300"),
            (SERVING_LOGGING_CONFIG, ""),
            (SERVING_LOGGING_LEVEL, ""),
            (SERVING_NAMESPACE, "default"),
            (SERVING_CONFIGURATION, ""),
            (SERVING_REVISION, "hello-00001"),
            (SERVING_POD, "hello-00001-deployment-abc"),
            (SERVING_POD_IP, "10.0.0.1"),
        ]
        .into_iter()
        .map(|(k, v)| (k, v.to_owned()))
        .collect()
    }

    fn parse(m: &HashMap<&'static str, String>) -> Result<Config, EnvError> {
        Config::from_lookup(|k| m.get(k).cloned())
    }

    #[test]
    fn parses_defaults() {
        let c = parse(&base()).expect("valid");
        assert_eq!(c.serving_port, 8012);
        assert_eq!(c.admin_port, 8022);
        assert_eq!(c.autoscaling_metrics_port, 9090);
        assert_eq!(c.revision_timeout, Duration::from_secs(300));
        assert_eq!(c.response_start_timeout, None);
        assert_eq!(c.breaker_params(), None);
        assert_eq!(c.observability, Observability::default());
        assert_eq!(c.service_name(), "hello-00001");
    }

    #[test]
    fn every_required_variable_is_required() {
        for k in [
            CONTAINER_CONCURRENCY,
            QUEUE_SERVING_PORT,
            QUEUE_SERVING_TLS_PORT,
            USER_PORT,
            REVISION_TIMEOUT_SECONDS,
            SERVING_LOGGING_CONFIG,
            SERVING_LOGGING_LEVEL,
            SERVING_NAMESPACE,
            SERVING_CONFIGURATION,
            SERVING_REVISION,
            SERVING_POD,
            SERVING_POD_IP,
        ] {
            let mut m = base();
            m.remove(k);
            assert_eq!(parse(&m), Err(EnvError::Missing(k)), "{k}");
        }
    }

    #[test]
    fn bad_values_are_errors() {
        for (k, v) in [
            (CONTAINER_CONCURRENCY, "ten"),
            (CONTAINER_CONCURRENCY, ""),
            (USER_PORT, "70000"),
            (REVISION_IDLE_TIMEOUT_SECONDS, "x"),
            (ENABLE_HTTP2_AUTO_DETECTION, "yes"),
            (OBSERVABILITY_CONFIG, "{"),
            (QUEUE_PROXY_TLS_MIN_VERSION, "1.1"),
        ] {
            let mut m = base();
            m.insert(k, v.to_owned());
            assert!(parse(&m).is_err(), "{k}={v}");
        }
    }

    #[test]
    fn both_generations() {
        let mut m = base();
        m.insert(CONTAINER_CONCURRENCY, "10".into());
        m.insert(
            OBSERVABILITY_CONFIG,
            r#"{"requestMetrics":{"protocol":"prometheus"},"enableRequestLog":true,"runtime":{"profiling":"enabled"},"unknown":1}"#.into(),
        );
        let c = parse(&m).expect("valid");
        assert_eq!(c.breaker_params(), Some((10, 100)));
        assert_eq!(
            c.observability.request_metrics,
            RequestMetricsProtocol::Prometheus
        );
        assert!(c.observability.enable_request_log);
        assert!(c.observability.profiling);
        assert_eq!(
            c.observability.request_log_template,
            DEFAULT_REQUEST_LOG_TEMPLATE
        );

        let mut m = base();
        m.insert(SERVING_ENABLE_REQUEST_LOG, "true".into());
        m.insert(SERVING_REQUEST_LOG_TEMPLATE, "{{.Request.Method}}".into());
        m.insert(SERVING_REQUEST_METRICS_BACKEND, "prometheus".into());
        m.insert("METRICS_DOMAIN", "knative.dev/internal/serving".into());
        let c = parse(&m).expect("valid");
        assert!(c.observability.enable_request_log);
        assert_eq!(c.observability.request_log_template, "{{.Request.Method}}");
        assert_eq!(
            c.observability.request_metrics,
            RequestMetricsProtocol::Prometheus
        );
    }

    #[test]
    fn random_values_never_panic() {
        use rand::{Rng, SeedableRng};
        let mut rng = rand::rngs::StdRng::seed_from_u64(7);
        let keys: Vec<&'static str> = base().keys().copied().collect();
        for _ in 0..2000 {
            let mut m = base();
            let k = keys[rng.gen_range(0..keys.len())];
            let len = rng.gen_range(0..12);
            let s: String = (0..len)
                .map(|_| char::from(rng.gen_range(0x20u8..0x7f)))
                .collect();
            m.insert(k, s);
            let _ = parse(&m);
        }
    }
}
