//! Configuration from flags and environment, in one place.
//!
//! Knative injects `K_SINK`, `K_CE_OVERRIDES`, `K_CA_CERTS` (SinkBinding/ContainerSource) and
//! mounts the OIDC token at `/oidc/token`. The prototype image's Go-style flags (`-source`,
//! `-topic`, `-clientid`, `-eventSource`, `-sink`) are accepted so this binary can replace it.

use std::collections::BTreeMap;
use std::path::PathBuf;
use std::time::Duration;

use clap::{Parser, ValueEnum};

/// Exit code for bad configuration (sysexits EX_USAGE).
pub const EXIT_CONFIG: i32 = 64;

/// Default CloudEvent `type` for wrapped (non-CloudEvent) MQTT messages.
pub const DEFAULT_EVENT_TYPE: &str = "dev.spright.mqtt.message";

#[derive(Debug, thiserror::Error)]
pub enum ConfigError {
    #[error("{0}")]
    Args(String),
    #[error("invalid broker address `{0}`: want mqtt://host:port, mqtts://host:port or host:port")]
    Broker(String),
    #[error("invalid sink URL `{0}`: {1}")]
    Sink(String, String),
    #[error(
        "K_CE_OVERRIDES is not valid JSON of shape {{\"extensions\":{{\"name\":\"value\"}}}}: {0}"
    )]
    Overrides(String),
    #[error("invalid extension name `{0}` in K_CE_OVERRIDES (lowercase a-z and 0-9 only)")]
    OverrideName(String),
    #[error("cannot read {what} `{path}`: {err}")]
    File {
        what: &'static str,
        path: String,
        err: String,
    },
    #[error("{0}")]
    Invalid(String),
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, ValueEnum)]
pub enum ProtocolVersion {
    #[value(name = "3.1.1", alias = "4", alias = "v4", alias = "3")]
    V311,
    #[value(name = "5", alias = "v5", alias = "5.0")]
    V5,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, ValueEnum)]
pub enum Format {
    /// Attributes as headers / MQTT v5 user properties, data as the body.
    Binary,
    /// The JSON event format (`application/cloudevents+json`).
    Structured,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, ValueEnum)]
pub enum InvalidPolicy {
    /// Deliver the raw payload wrapped like any non-CloudEvent message.
    Wrap,
    /// Send it to the dead-letter sink (wrapped, with a `mqtterror` extension); without a
    /// dead-letter sink it is logged, counted as failed and acknowledged.
    DeadLetter,
}

/// Raw command line and environment.
#[derive(Debug, Clone, Parser)]
#[command(name = "mqtt-adaptor", version, about)]
pub struct Args {
    /// MQTT broker: mqtt://host:port, mqtts://host:port (TLS) or host:port. Without it an
    /// embedded broker is started on --embedded-listen.
    #[arg(long, env = "MQTT_BROKER", alias = "source")]
    pub broker: Option<String>,
    /// Topic filters to subscribe to (wildcards allowed), comma separated or repeated.
    #[arg(long = "topic", env = "MQTT_TOPICS", value_delimiter = ',')]
    pub topics: Vec<String>,
    /// MQTT client id; must be stable so the persistent session survives restarts. Default:
    /// derived from NAMESPACE/NAME when set, else `spright-mqtt-adaptor`.
    #[arg(long, env = "MQTT_CLIENT_ID", alias = "clientid")]
    pub client_id: Option<String>,
    #[arg(long, env = "MQTT_PROTOCOL_VERSION", value_enum, default_value = "5")]
    pub protocol_version: ProtocolVersion,
    /// Subscription QoS (0, 1 or 2). At-least-once delivery needs 1 or 2.
    #[arg(long, env = "MQTT_QOS", default_value_t = 1, value_parser = clap::value_parser!(u8).range(0..=2))]
    pub qos: u8,
    #[arg(long, env = "MQTT_USERNAME")]
    pub username: Option<String>,
    #[arg(long, env = "MQTT_PASSWORD", hide_env_values = true)]
    pub password: Option<String>,
    /// File holding the MQTT password (e.g. a mounted Secret); wins over --password.
    #[arg(long, env = "MQTT_PASSWORD_FILE")]
    pub password_file: Option<PathBuf>,
    /// PEM CA bundle to verify the broker (implies TLS).
    #[arg(long, env = "MQTT_TLS_CA_FILE")]
    pub tls_ca_file: Option<PathBuf>,
    /// PEM client certificate chain for mutual TLS.
    #[arg(long, env = "MQTT_TLS_CERT_FILE")]
    pub tls_cert_file: Option<PathBuf>,
    /// PEM private key of the client certificate.
    #[arg(long, env = "MQTT_TLS_KEY_FILE")]
    pub tls_key_file: Option<PathBuf>,
    /// Keep-alive interval in seconds.
    #[arg(long, env = "MQTT_KEEP_ALIVE", default_value_t = 30)]
    pub keep_alive: u64,
    /// MQTT v5 session expiry in seconds (how long the broker keeps undelivered messages for
    /// us while we are down).
    #[arg(long, env = "MQTT_SESSION_EXPIRY", default_value_t = 604_800)]
    pub session_expiry: u32,
    /// Messages in flight to the sink at once (also the v5 receive maximum).
    #[arg(long, env = "MQTT_INFLIGHT", default_value_t = 100)]
    pub inflight: u16,
    /// Largest MQTT message delivered to the sink; larger ones follow --invalid-policy
    /// (wrap is not possible for them: they are dead-lettered as metadata only, or dropped).
    #[arg(long, env = "MQTT_MAX_MESSAGE_BYTES", default_value_t = 4 * 1024 * 1024)]
    pub max_message_bytes: usize,

    /// CloudEvent `source` for wrapped messages (default: mqtt://<broker>/<topic>).
    #[arg(long, env = "MQTT_EVENT_SOURCE", alias = "eventSource")]
    pub event_source: Option<String>,
    /// CloudEvent `type` for wrapped messages.
    #[arg(long, env = "MQTT_EVENT_TYPE", default_value = DEFAULT_EVENT_TYPE)]
    pub event_type: String,
    /// `datacontenttype` for wrapped messages without an MQTT v5 content type.
    #[arg(
        long,
        env = "MQTT_DATA_CONTENT_TYPE",
        default_value = "application/octet-stream"
    )]
    pub data_content_type: String,
    /// What to do with messages that claim to be CloudEvents but are not valid.
    #[arg(long, env = "MQTT_INVALID_POLICY", value_enum, default_value = "wrap")]
    pub invalid_policy: InvalidPolicy,

    /// Sink URL (K_SINK wins, as with the prototype).
    #[arg(long)]
    pub sink: Option<String>,
    #[arg(long = "k-sink", env = "K_SINK", hide = true)]
    pub k_sink: Option<String>,
    /// How events are posted to the sink.
    #[arg(long, env = "MQTT_SINK_FORMAT", value_enum, default_value = "binary")]
    pub sink_format: Format,
    /// Per-request sink timeout in seconds.
    #[arg(long, env = "K_SINK_TIMEOUT", default_value_t = 30)]
    pub sink_timeout: u64,
    /// HTTP/1.1 requests outstanding at once on one connection to a plain-HTTP sink
    /// (pipelining). `auto` (the default) keeps up to --inflight requests at the sink at once,
    /// one per connection, and pipelines up to 16 per connection over ceil(inflight / 16)
    /// connections only while the sink's answer time shows it is fast (see the README). 1
    /// sends the next request only after the answer to the previous one, over --inflight
    /// connections. N > 1 always spreads the --inflight window over ceil(inflight / N)
    /// connections with up to N requests each, written together and answered in order: far
    /// fewer writes, reads and wake-ups per event, for sinks that answer pipelined requests
    /// (Go's net/http, hyper) and answer fast; a slow sink then works on fewer events at once.
    /// Ignored for https:// sinks.
    #[arg(long, env = "MQTT_SINK_PIPELINE", default_value = "auto", value_parser = parse_sink_pipeline)]
    pub sink_pipeline: SinkPipeline,
    /// Dead-letter sink for events the sink rejects permanently or that are invalid.
    #[arg(long, env = "MQTT_DEAD_LETTER_SINK")]
    pub dead_letter_sink: Option<String>,
    /// Retries per event for retryable answers; 0 retries forever (nothing is dropped).
    #[arg(long, env = "MQTT_RETRY", default_value_t = 0)]
    pub retry: u32,
    /// First retry delay in milliseconds; doubles each attempt.
    #[arg(long, env = "MQTT_RETRY_BACKOFF_MS", default_value_t = 200)]
    pub retry_backoff_ms: u64,
    /// Largest retry delay in milliseconds.
    #[arg(long, env = "MQTT_RETRY_BACKOFF_MAX_MS", default_value_t = 30_000)]
    pub retry_backoff_max_ms: u64,
    #[arg(long = "ce-overrides", env = "K_CE_OVERRIDES", hide = true)]
    pub ce_overrides: Option<String>,
    #[arg(long = "ca-certs", env = "K_CA_CERTS", hide = true)]
    pub ca_certs: Option<String>,
    /// OIDC token sent as a bearer to the sink when the file exists.
    #[arg(long, env = "MQTT_OIDC_TOKEN_FILE", default_value = "/oidc/token")]
    pub oidc_token_file: PathBuf,

    /// HTTP port: POST / (CloudEvents to MQTT), /healthz, /readyz, /metrics.
    #[arg(long, env = "PORT", default_value_t = 8080)]
    pub http_port: u16,
    /// Address of the HTTP listener.
    #[arg(long, env = "MQTT_HTTP_ADDRESS", default_value = "0.0.0.0")]
    pub http_address: String,
    /// Topic template for CloudEvents received over HTTP, e.g. `devices/{subject}/commands`;
    /// `{name}` is replaced by that attribute. The extension named by --publish-topic-attribute
    /// wins when present.
    #[arg(long, env = "MQTT_PUBLISH_TOPIC")]
    pub publish_topic: Option<String>,
    #[arg(
        long,
        env = "MQTT_PUBLISH_TOPIC_ATTRIBUTE",
        default_value = "mqtttopic"
    )]
    pub publish_topic_attribute: String,
    #[arg(long, env = "MQTT_PUBLISH_QOS", default_value_t = 1, value_parser = clap::value_parser!(u8).range(0..=2))]
    pub publish_qos: u8,
    /// MQTT binding mode for published events (binary needs MQTT v5; 3.1.1 is always structured).
    #[arg(
        long,
        env = "MQTT_PUBLISH_FORMAT",
        value_enum,
        default_value = "binary"
    )]
    pub publish_format: Format,
    /// Seconds to wait for the broker's acknowledgement before answering 503.
    #[arg(long, env = "MQTT_PUBLISH_TIMEOUT", default_value_t = 10)]
    pub publish_timeout: u64,
    /// Largest accepted HTTP body.
    #[arg(long, env = "MQTT_MAX_REQUEST_BYTES", default_value_t = 4 * 1024 * 1024)]
    pub max_request_bytes: usize,

    /// Listen address of the embedded broker used when --broker is not set.
    #[arg(long, env = "MQTT_EMBEDDED_LISTEN", default_value = "127.0.0.1:1883")]
    pub embedded_listen: String,
    /// Seconds to drain in-flight deliveries on SIGTERM.
    #[arg(long, env = "MQTT_DRAIN_TIMEOUT", default_value_t = 20)]
    pub drain_timeout: u64,
}

/// Broker endpoint.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct BrokerAddr {
    pub host: String,
    pub port: u16,
    pub tls: bool,
}

impl BrokerAddr {
    pub fn parse(s: &str) -> Result<Self, ConfigError> {
        let err = || ConfigError::Broker(s.to_owned());
        let (tls, rest) = if let Some(r) = s.strip_prefix("mqtts://").or(s.strip_prefix("ssl://")) {
            (true, r)
        } else if let Some(r) = s.strip_prefix("mqtt://").or(s.strip_prefix("tcp://")) {
            (false, r)
        } else if s.contains("://") {
            return Err(err());
        } else {
            (false, s)
        };
        let rest = rest.trim_end_matches('/');
        let (host, port) = if let Some(r) = rest.strip_prefix('[') {
            let (h, after) = r.split_once(']').ok_or_else(err)?;
            if !after.is_empty() && !after.starts_with(':') {
                return Err(err());
            }
            (h.to_owned(), after.strip_prefix(':'))
        } else {
            match rest.rsplit_once(':') {
                Some((h, p)) => (h.to_owned(), Some(p)),
                None => (rest.to_owned(), None),
            }
        };
        // `[`/`]` only as the IPv6 bracket form (stripped above); no whitespace or control
        // characters: such a host never resolves, and url() could not render it.
        let odd = |c: char| c == '/' || c == '[' || c == ']' || c.is_whitespace() || c.is_control();
        if host.is_empty() || host.contains(odd) {
            return Err(err());
        }
        let port = match port {
            Some(p) => p.parse().map_err(|_| err())?,
            None if tls => 8883,
            None => 1883,
        };
        Ok(BrokerAddr { host, port, tls })
    }

    pub fn url(&self) -> String {
        let scheme = if self.tls { "mqtts" } else { "mqtt" };
        if self.host.contains(':') {
            format!("{scheme}://[{}]:{}", self.host, self.port)
        } else {
            format!("{scheme}://{}:{}", self.host, self.port)
        }
    }
}

/// TLS material for the MQTT connection.
#[derive(Debug, Clone, Default)]
pub struct TlsFiles {
    pub ca_pem: Option<Vec<u8>>,
    pub client_cert_pem: Option<Vec<u8>>,
    pub client_key_pem: Option<Vec<u8>>,
}

/// Validated configuration.
#[derive(Debug, Clone)]
pub struct Config {
    /// `None`: start the embedded broker on `embedded_listen` and connect to it.
    pub broker: Option<BrokerAddr>,
    pub embedded_listen: std::net::SocketAddr,
    pub topics: Vec<String>,
    pub client_id: String,
    pub protocol: ProtocolVersion,
    pub qos: u8,
    pub username: Option<String>,
    pub password: Option<String>,
    pub tls: Option<TlsFiles>,
    pub keep_alive: Duration,
    pub session_expiry: u32,
    pub inflight: u16,
    pub max_message_bytes: usize,
    pub event_source: Option<String>,
    pub event_type: String,
    pub data_content_type: String,
    pub invalid_policy: InvalidPolicy,
    pub sink: Option<String>,
    pub sink_format: Format,
    pub sink_timeout: Duration,
    /// Requests outstanding per sink connection.
    pub sink_pipeline: SinkPipeline,
    pub dead_letter_sink: Option<String>,
    pub retry: u32,
    pub retry_backoff: Duration,
    pub retry_backoff_max: Duration,
    pub ce_overrides: BTreeMap<String, String>,
    pub ca_certs: Option<String>,
    pub oidc_token_file: PathBuf,
    pub http_addr: std::net::SocketAddr,
    pub publish_topic: Option<String>,
    pub publish_topic_attribute: String,
    pub publish_qos: u8,
    pub publish_format: Format,
    pub publish_timeout: Duration,
    pub max_request_bytes: usize,
    pub drain_timeout: Duration,
}

/// Rewrites the prototype's Go-style single-dash long flags (`-source x`, `-topic=x`) to
/// clap's `--` form. Go's flag package accepts both, so `--source` keeps working too.
pub fn normalize_go_flags<I: IntoIterator<Item = String>>(args: I) -> Vec<String> {
    const GO_FLAGS: [&str; 5] = ["source", "topic", "clientid", "eventSource", "sink"];
    args.into_iter()
        .enumerate()
        .map(|(i, a)| {
            if i == 0 {
                return a;
            }
            if let Some(rest) = a.strip_prefix('-')
                && !rest.starts_with('-')
            {
                let name = rest.split('=').next().unwrap_or("");
                if GO_FLAGS.contains(&name) {
                    return format!("-{a}");
                }
            }
            a
        })
        .collect()
}

fn read_file(what: &'static str, path: &std::path::Path) -> Result<Vec<u8>, ConfigError> {
    std::fs::read(path).map_err(|e| ConfigError::File {
        what,
        path: path.display().to_string(),
        err: e.to_string(),
    })
}

/// Parses `K_CE_OVERRIDES` (`{"extensions":{...}}`; empty means none).
/// `--sink-pipeline`: adaptive, or a fixed number of requests per connection.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum SinkPipeline {
    /// Pipelining only while the sink is evidently fast ([`crate::adaptive`]).
    Auto,
    /// Up to this many requests per connection (1: no pipelining).
    Fixed(u16),
}

impl std::fmt::Display for SinkPipeline {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            SinkPipeline::Auto => f.write_str("auto"),
            SinkPipeline::Fixed(n) => write!(f, "{n}"),
        }
    }
}

/// Parses `auto` or a number from 1 to 1024.
pub fn parse_sink_pipeline(raw: &str) -> Result<SinkPipeline, String> {
    let raw = raw.trim();
    if raw.eq_ignore_ascii_case("auto") {
        return Ok(SinkPipeline::Auto);
    }
    match raw.parse::<u16>() {
        Ok(n @ 1..=1024) => Ok(SinkPipeline::Fixed(n)),
        _ => Err(format!(
            "{raw:?} is neither \"auto\" nor a number of requests from 1 to 1024"
        )),
    }
}

pub fn parse_overrides(raw: &str) -> Result<BTreeMap<String, String>, ConfigError> {
    if raw.trim().is_empty() {
        return Ok(BTreeMap::new());
    }
    #[derive(serde::Deserialize)]
    struct Overrides {
        #[serde(default)]
        extensions: BTreeMap<String, String>,
    }
    let o: Overrides =
        serde_json::from_str(raw).map_err(|e| ConfigError::Overrides(e.to_string()))?;
    if let Some(bad) = o.extensions.keys().find(|k| {
        !spright_core::cloudevent::valid_attr_name(k)
            || spright_core::cloudevent::reserved_attr_name(k)
    }) {
        return Err(ConfigError::OverrideName(bad.clone()));
    }
    Ok(o.extensions)
}

fn check_url(s: &str) -> Result<String, ConfigError> {
    let uri: http::Uri = s
        .parse()
        .map_err(|e: http::uri::InvalidUri| ConfigError::Sink(s.to_owned(), e.to_string()))?;
    match uri.scheme_str() {
        Some("http") | Some("https") if uri.host().is_some() => Ok(s.to_owned()),
        _ => Err(ConfigError::Sink(
            s.to_owned(),
            "want an absolute http:// or https:// URL".into(),
        )),
    }
}

fn default_client_id() -> String {
    match (std::env::var("NAMESPACE"), std::env::var("NAME")) {
        (Ok(ns), Ok(name)) if !ns.is_empty() && !name.is_empty() => {
            format!("knative-mqtt-{ns}-{name}")
        }
        _ => "spright-mqtt-adaptor".to_owned(),
    }
}

impl Config {
    /// Parses the process arguments and environment.
    pub fn from_env_and_args() -> Result<Self, ConfigError> {
        let args = normalize_go_flags(std::env::args());
        let parsed = Args::try_parse_from(args).map_err(|e| match e.kind() {
            clap::error::ErrorKind::DisplayHelp | clap::error::ErrorKind::DisplayVersion => {
                let _ = e.print();
                std::process::exit(0)
            }
            _ => ConfigError::Args(e.to_string()),
        })?;
        Self::from_args(parsed)
    }

    pub fn from_args(a: Args) -> Result<Self, ConfigError> {
        let broker = match a.broker.as_deref().map(str::trim) {
            None | Some("") => None,
            Some(b) => Some(BrokerAddr::parse(b)?),
        };
        let embedded_listen = a.embedded_listen.parse().map_err(|_| {
            ConfigError::Invalid(format!(
                "invalid --embedded-listen `{}`: want ip:port",
                a.embedded_listen
            ))
        })?;
        let topics: Vec<String> = a
            .topics
            .into_iter()
            .map(|t| t.trim().to_owned())
            .filter(|t| !t.is_empty())
            .collect();
        for t in &topics {
            if !valid_topic_filter(t) {
                return Err(ConfigError::Invalid(format!("invalid topic filter `{t}`")));
            }
        }
        let sink = match a.k_sink.filter(|s| !s.is_empty()).or(a.sink) {
            Some(s) if !s.is_empty() => Some(check_url(&s)?),
            _ => None,
        };
        let dead_letter_sink = match a.dead_letter_sink.filter(|s| !s.is_empty()) {
            Some(s) => Some(check_url(&s)?),
            None => None,
        };
        let password = match &a.password_file {
            Some(p) => Some(
                String::from_utf8_lossy(&read_file("password file", p)?)
                    .trim_end_matches(['\r', '\n'])
                    .to_owned(),
            ),
            None => a.password,
        };
        let any_tls = a.tls_ca_file.is_some() || a.tls_cert_file.is_some();
        if a.tls_cert_file.is_some() != a.tls_key_file.is_some() {
            return Err(ConfigError::Invalid(
                "--tls-cert-file and --tls-key-file must be given together".into(),
            ));
        }
        let tls = if any_tls || broker.as_ref().is_some_and(|b| b.tls) {
            Some(TlsFiles {
                ca_pem: a
                    .tls_ca_file
                    .as_deref()
                    .map(|p| read_file("TLS CA file", p))
                    .transpose()?,
                client_cert_pem: a
                    .tls_cert_file
                    .as_deref()
                    .map(|p| read_file("TLS certificate file", p))
                    .transpose()?,
                client_key_pem: a
                    .tls_key_file
                    .as_deref()
                    .map(|p| read_file("TLS key file", p))
                    .transpose()?,
            })
        } else {
            None
        };
        if a.inflight == 0 {
            return Err(ConfigError::Invalid("--inflight must be at least 1".into()));
        }
        if a.event_type.is_empty() {
            return Err(ConfigError::Invalid(
                "--event-type must not be empty".into(),
            ));
        }
        if !spright_core::cloudevent::valid_attr_name(&a.publish_topic_attribute) {
            return Err(ConfigError::Invalid(format!(
                "--publish-topic-attribute `{}` is not a CloudEvents attribute name",
                a.publish_topic_attribute
            )));
        }
        let http_addr = format!("{}:{}", a.http_address, a.http_port)
            .parse()
            .or_else(|_| format!("[{}]:{}", a.http_address, a.http_port).parse())
            .map_err(|_| {
                ConfigError::Invalid(format!("invalid --http-address `{}`", a.http_address))
            })?;
        if a.keep_alive < 5 {
            return Err(ConfigError::Invalid(
                "--keep-alive must be at least 5 s".into(),
            ));
        }
        Ok(Config {
            broker,
            embedded_listen,
            topics,
            client_id: a
                .client_id
                .filter(|c| !c.is_empty())
                .unwrap_or_else(default_client_id),
            protocol: a.protocol_version,
            qos: a.qos,
            username: a.username.filter(|u| !u.is_empty()),
            password,
            tls,
            keep_alive: Duration::from_secs(a.keep_alive),
            session_expiry: a.session_expiry,
            inflight: a.inflight,
            max_message_bytes: a.max_message_bytes,
            event_source: a.event_source.filter(|s| !s.is_empty()),
            event_type: a.event_type,
            data_content_type: a.data_content_type,
            invalid_policy: a.invalid_policy,
            sink,
            sink_format: a.sink_format,
            sink_timeout: Duration::from_secs(a.sink_timeout.max(1)),
            sink_pipeline: a.sink_pipeline,
            dead_letter_sink,
            retry: a.retry,
            retry_backoff: Duration::from_millis(a.retry_backoff_ms.max(1)),
            retry_backoff_max: Duration::from_millis(
                a.retry_backoff_max_ms.max(a.retry_backoff_ms),
            ),
            ce_overrides: parse_overrides(a.ce_overrides.as_deref().unwrap_or(""))?,
            ca_certs: a.ca_certs.filter(|c| !c.trim().is_empty()),
            oidc_token_file: a.oidc_token_file,
            http_addr,
            publish_topic: a.publish_topic.filter(|t| !t.is_empty()),
            publish_topic_attribute: a.publish_topic_attribute,
            publish_qos: a.publish_qos,
            publish_format: a.publish_format,
            publish_timeout: Duration::from_secs(a.publish_timeout.max(1)),
            max_request_bytes: a.max_request_bytes,
            drain_timeout: Duration::from_secs(a.drain_timeout),
        })
    }

    /// The broker actually connected to (the embedded one when none is configured).
    pub fn effective_broker(&self) -> BrokerAddr {
        self.broker.clone().unwrap_or_else(|| BrokerAddr {
            host: self.embedded_listen.ip().to_string(),
            port: self.embedded_listen.port(),
            tls: false,
        })
    }
}

/// MQTT topic filter rules: non-empty, `#` only last and alone in its level, `+` alone in its
/// level, no NUL.
pub fn valid_topic_filter(t: &str) -> bool {
    if t.is_empty() || t.contains('\0') {
        return false;
    }
    let levels: Vec<&str> = t.split('/').collect();
    let last = levels.len() - 1;
    levels.iter().enumerate().all(|(i, l)| {
        (!l.contains('#') || (*l == "#" && i == last)) && (!l.contains('+') || *l == "+")
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    fn parse(args: &[&str]) -> Result<Config, ConfigError> {
        let mut v = vec!["mqtt-adaptor".to_owned()];
        v.extend(args.iter().map(|s| s.to_string()));
        let a = Args::try_parse_from(normalize_go_flags(v))
            .map_err(|e| ConfigError::Args(e.to_string()))?;
        Config::from_args(a)
    }

    #[test]
    fn prototype_flags_accepted() {
        let c = parse(&[
            "-source",
            "broker:1883",
            "-topic=a/b",
            "-clientid",
            "x",
            "-eventSource",
            "https://example.com/src",
            "-sink",
            "http://sink.default.svc",
        ])
        .unwrap();
        assert_eq!(
            c.broker,
            Some(BrokerAddr {
                host: "broker".into(),
                port: 1883,
                tls: false
            })
        );
        assert_eq!(c.topics, vec!["a/b"]);
        assert_eq!(c.client_id, "x");
        assert_eq!(c.event_source.as_deref(), Some("https://example.com/src"));
        assert_eq!(c.sink.as_deref(), Some("http://sink.default.svc"));
    }

    #[test]
    fn broker_addresses() {
        assert_eq!(
            BrokerAddr::parse("mqtts://h").unwrap(),
            BrokerAddr {
                host: "h".into(),
                port: 8883,
                tls: true
            }
        );
        assert_eq!(BrokerAddr::parse("[::1]:1884").unwrap().host, "::1");
        assert!(BrokerAddr::parse("http://h:1").is_err());
        assert!(BrokerAddr::parse("h:notaport").is_err());
        assert!(BrokerAddr::parse(":1883").is_err());
    }

    /// Fuzz finding (mqtt_config, `broker-host-bracket-minimal`): `mqtt://x:a]:1` was
    /// accepted with host `x:a]`, whose url() `mqtt://[x:a]]:1` did not parse again.
    #[test]
    fn broker_hosts_url_cannot_render_are_refused() {
        for bad in [
            "mqtt://x:a]:1",
            "mqtt://x[:1",
            "[a]b]:1",
            "[[::1]]:1",
            "mqtt://a b:1",
            "mqtt://a\tb",
            "mqtt://a\0b:1",
            "mqtt://a\u{85}b:1",
            "mqtt:// :1",
        ] {
            assert!(
                matches!(BrokerAddr::parse(bad), Err(ConfigError::Broker(_))),
                "{bad:?} accepted"
            );
        }
        for good in [
            "mqtt://[::1]:1",
            "mqtts://h.example:8883",
            "x:a:1",
            "tcp://10.0.0.1",
        ] {
            let addr = BrokerAddr::parse(good).unwrap();
            assert_eq!(BrokerAddr::parse(&addr.url()).unwrap(), addr, "{good}");
        }
    }

    #[test]
    fn overrides() {
        assert!(parse_overrides("").unwrap().is_empty());
        let o = parse_overrides(r#"{"extensions":{"team":"a"}}"#).unwrap();
        assert_eq!(o.get("team").map(String::as_str), Some("a"));
        assert!(parse_overrides("{").is_err());
        assert!(parse_overrides(r#"{"extensions":{"Bad":"a"}}"#).is_err());
        assert!(parse_overrides(r#"{"extensions":{"data":"a"}}"#).is_err());
        assert!(parse_overrides(r#"{"extensions":{"data_base64":"a"}}"#).is_err());
    }

    #[test]
    fn topic_filters() {
        assert!(valid_topic_filter("a/+/c/#"));
        assert!(valid_topic_filter("#"));
        assert!(!valid_topic_filter("a/#/c"));
        assert!(!valid_topic_filter("a+/b"));
        assert!(!valid_topic_filter(""));
    }

    #[test]
    fn bad_values_are_errors() {
        assert!(parse(&["--sink", "not a url"]).is_err());
        assert!(parse(&["--qos", "3"]).is_err());
        assert!(parse(&["--tls-cert-file", "/x"]).is_err());
        assert!(parse(&["--inflight", "0"]).is_err());
        assert!(parse(&["--sink-pipeline", "0"]).is_err());
        assert!(parse(&["--sink-pipeline", "1025"]).is_err());
        assert!(parse(&["--sink-pipeline", "fast"]).is_err());
        assert!(parse(&["--sink-pipeline", ""]).is_err());
        let pipeline = |a: &[&str]| parse(a).map(|c| c.sink_pipeline).ok();
        assert_eq!(
            pipeline(&["--sink-pipeline", "16"]),
            Some(SinkPipeline::Fixed(16))
        );
        assert_eq!(
            pipeline(&["--sink-pipeline", "1"]),
            Some(SinkPipeline::Fixed(1))
        );
        assert_eq!(
            pipeline(&["--sink-pipeline", "AUTO"]),
            Some(SinkPipeline::Auto)
        );
        assert_eq!(pipeline(&[]), Some(SinkPipeline::Auto));
    }

    proptest::proptest! {
        #[test]
        fn sink_pipeline_accepts_only_auto_and_1_to_1024(raw in "\\PC{0,8}") {
            let want = if raw.trim().eq_ignore_ascii_case("auto") {
                Some(SinkPipeline::Auto)
            } else {
                match raw.trim().parse::<u16>() {
                    Ok(n @ 1..=1024) => Some(SinkPipeline::Fixed(n)),
                    _ => None,
                }
            };
            proptest::prop_assert_eq!(parse_sink_pipeline(&raw).ok(), want);
        }

        #[test]
        fn sink_pipeline_numbers_round_trip(n in 0u32..70_000) {
            let parsed = parse_sink_pipeline(&n.to_string()).ok();
            proptest::prop_assert_eq!(parsed.is_some(), (1..=1024).contains(&n));
            if let Some(p) = parsed {
                proptest::prop_assert_eq!(p.to_string(), n.to_string());
            }
        }
    }
}
