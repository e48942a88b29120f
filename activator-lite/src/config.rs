//! Configuration: the environment exactly as the stock `activator` Deployment sets it
//! (`config/core/deployments/activator.yaml`, `cmd/activator/main.go`), plus flags for
//! the parts that come from the Kubernetes API in Knative (manifests directory,
//! autoscaler override) and listen ports for tests.

use std::collections::HashMap;
use std::path::PathBuf;
use std::time::Duration;

use clap::Parser;

/// Errors while reading configuration.
#[derive(Debug, thiserror::Error)]
pub enum ConfigError {
    #[error("environment variable {0} is required but not set")]
    Missing(&'static str),
    #[error("environment variable {name}={value:?} is invalid: {reason}")]
    Invalid {
        name: &'static str,
        value: String,
        reason: String,
    },
    #[error("--autoscaler {0:?} is not a ws:// or wss:// URL")]
    AutoscalerUrl(String),
}

/// Command-line flags.
#[derive(Debug, Clone, Parser)]
#[command(name = "activator-lite", about = "Knative activator, lean")]
pub struct Flags {
    /// Directory of Knative-shaped YAML manifests (Revisions and core/v1 Endpoints), watched for changes.
    #[arg(long)]
    pub manifests: PathBuf,
    /// Autoscaler websocket URL; default ws://autoscaler.<SYSTEM_NAMESPACE>.svc.<cluster-domain>:8080
    #[arg(long)]
    pub autoscaler: Option<String>,
    /// HTTP/1.1 + h2c port.
    #[arg(long, default_value_t = 8012)]
    pub http1_port: u16,
    /// h2c port (serves HTTP/1.1 as well, as Knative's does).
    #[arg(long, default_value_t = 8013)]
    pub h2c_port: u16,
    /// Prometheus metrics port.
    #[arg(long, default_value_t = 9090)]
    pub metrics_port: u16,
    /// Profiling port (Knative's `profiling` port, 8008). Profiling is off, as Knative's is
    /// by default (config-observability `profiling.enable: false`): every request gets
    /// Go's 404 "404 page not found".
    #[arg(long, default_value_t = 8008)]
    pub profiling_port: u16,
    /// Address to bind the listeners to.
    #[arg(long, default_value = "0.0.0.0")]
    pub bind: std::net::IpAddr,
    /// Seconds to keep serving after SIGTERM while health checks fail (network.DefaultDrainTimeout).
    #[arg(long, default_value_t = 45.0)]
    pub drain_timeout_secs: f64,
    /// HTTPS port, opened when --tls-cert and --tls-key are given (system-internal-tls).
    #[arg(long, default_value_t = 8112)]
    pub https_port: u16,
    /// Server certificate (PEM), e.g. `tls.crt` of the mounted `routing-serving-certs` Secret.
    #[arg(long, requires = "tls_key")]
    pub tls_cert: Option<PathBuf>,
    /// Private key (PEM) for --tls-cert.
    #[arg(long, requires = "tls_cert")]
    pub tls_key: Option<PathBuf>,
    /// Requests waiting per revision before 503 (breakerQueueDepth).
    #[arg(long, default_value_t = 10_000)]
    pub queue_depth: usize,
}

/// Effective configuration.
#[derive(Debug, Clone)]
pub struct Config {
    pub pod_name: String,
    pub pod_ip: String,
    pub system_namespace: String,
    pub max_idle_proxy_conns: usize,
    pub max_idle_proxy_conns_per_host: usize,
    pub probe_timeout: Duration,
    pub probe_frequency: Duration,
    pub autoscaler_url: String,
    /// The cluster domain (`CLUSTER_DOMAIN`, resolv.conf, or cluster.local): a Host names a
    /// revision only as `<name>.<namespace>.svc.<cluster_domain>`.
    pub cluster_domain: String,
    pub manifests: PathBuf,
    pub bind: std::net::IpAddr,
    pub http1_port: u16,
    pub h2c_port: u16,
    pub metrics_port: u16,
    pub profiling_port: u16,
    pub drain_timeout: Duration,
    pub queue_depth: usize,
    pub https_port: u16,
    /// `(certificate, key)` PEM files; HTTPS on `https_port` when set.
    pub tls: Option<(PathBuf, PathBuf)>,
    /// `ACTIVATOR_TLS_MIN_VERSION`: "1.2" (default) or "1.3".
    pub tls_min_version_13: bool,
}

impl Config {
    /// Builds the configuration from flags and an environment map.
    pub fn from_parts(
        flags: Flags,
        env: &HashMap<String, String>,
        resolv_conf: Option<&str>,
    ) -> Result<Self, ConfigError> {
        let get = |k: &str| env.get(k).filter(|v| !v.is_empty()).cloned();
        let pod_name = get("POD_NAME").ok_or(ConfigError::Missing("POD_NAME"))?;
        let pod_ip = get("POD_IP").ok_or(ConfigError::Missing("POD_IP"))?;
        let system_namespace = get("SYSTEM_NAMESPACE");
        // knative/pkg network.GetClusterDomainName: CLUSTER_DOMAIN, else the `svc.`
        // search domain of resolv.conf, else cluster.local.
        let cluster_domain = get("CLUSTER_DOMAIN")
            .or_else(|| resolv_conf.and_then(cluster_domain_from_resolv))
            .unwrap_or_else(|| "cluster.local".to_owned());
        let autoscaler_url = match flags.autoscaler {
            Some(url) => {
                if !valid_ws_url(&url) {
                    return Err(ConfigError::AutoscalerUrl(url));
                }
                url
            }
            None => {
                let ns = system_namespace
                    .clone()
                    .ok_or(ConfigError::Missing("SYSTEM_NAMESPACE"))?;
                format!("ws://autoscaler.{ns}.svc.{cluster_domain}:8080")
            }
        };
        let int = |name: &'static str, default: usize| -> Result<usize, ConfigError> {
            match get(name) {
                None => Ok(default),
                Some(v) => v
                    .parse()
                    .map_err(|e: std::num::ParseIntError| ConfigError::Invalid {
                        name,
                        value: v.clone(),
                        reason: e.to_string(),
                    }),
            }
        };
        let dur = |name: &'static str, default: Duration| -> Result<Duration, ConfigError> {
            match get(name) {
                None => Ok(default),
                Some(v) => parse_go_duration(&v).map_err(|reason| ConfigError::Invalid {
                    name,
                    value: v.clone(),
                    reason,
                }),
            }
        };
        let drain = flags.drain_timeout_secs;
        // Negative, NaN, infinite or beyond what a Duration holds (found by fuzzing).
        let Ok(drain_timeout) = Duration::try_from_secs_f64(drain) else {
            return Err(ConfigError::Invalid {
                name: "--drain-timeout-secs",
                value: drain.to_string(),
                reason: "must be a non-negative number".into(),
            });
        };
        Ok(Config {
            pod_name,
            pod_ip,
            system_namespace: system_namespace.unwrap_or_else(|| "knative-serving".into()),
            max_idle_proxy_conns: int("MAX_IDLE_PROXY_CONNS", 1000)?,
            max_idle_proxy_conns_per_host: int("MAX_IDLE_PROXY_CONNS_PER_HOST", 100)?,
            probe_timeout: dur("PROBE_TIMEOUT", Duration::from_millis(300))?,
            probe_frequency: dur("PROBE_FREQUENCY", Duration::from_millis(200))?,
            autoscaler_url,
            cluster_domain,
            manifests: flags.manifests,
            bind: flags.bind,
            http1_port: flags.http1_port,
            h2c_port: flags.h2c_port,
            metrics_port: flags.metrics_port,
            profiling_port: flags.profiling_port,
            drain_timeout,
            queue_depth: flags.queue_depth.max(1),
            https_port: flags.https_port,
            tls: flags.tls_cert.zip(flags.tls_key),
            tls_min_version_13: match get("ACTIVATOR_TLS_MIN_VERSION").as_deref() {
                None | Some("1.2") => false,
                Some("1.3") => true,
                Some(v) => {
                    return Err(ConfigError::Invalid {
                        name: "ACTIVATOR_TLS_MIN_VERSION",
                        value: v.to_owned(),
                        reason: "must be 1.2 or 1.3".into(),
                    });
                }
            },
        })
    }

    /// Reads flags from argv and the process environment.
    pub fn load() -> Result<Self, ConfigError> {
        let flags = Flags::parse();
        let env: HashMap<String, String> = std::env::vars().collect();
        let resolv = std::fs::read_to_string("/etc/resolv.conf").ok();
        Self::from_parts(flags, &env, resolv.as_deref())
    }
}

/// A `ws://` or `wss://` URL with a host and, if a port is written, a valid one.
fn valid_ws_url(url: &str) -> bool {
    let Ok(u) = url.parse::<http::Uri>() else {
        return false;
    };
    let Some(a) = u.authority() else {
        return false;
    };
    matches!(u.scheme_str(), Some("ws" | "wss"))
        && !a.host().is_empty()
        && (!a.as_str().contains(':') || a.port_u16().is_some() || a.host().starts_with('['))
        && !a.as_str().ends_with(':')
}

/// The cluster domain as knative/pkg derives it from resolv.conf: the part after
/// `svc.` in the search list (`search ns.svc.cluster.local svc.cluster.local ...`).
pub fn cluster_domain_from_resolv(resolv: &str) -> Option<String> {
    resolv
        .lines()
        .filter_map(|l| l.trim().strip_prefix("search"))
        .flat_map(|rest| rest.split_whitespace())
        .find_map(|tok| tok.strip_prefix("svc.").map(str::to_owned))
        .filter(|d| !d.is_empty())
}

/// Parses a Go `time.Duration` string such as `300ms`, `1.5s`, `1m30s` (surrounding
/// white space ignored) with [`spright_core::duration::parse`].
pub fn parse_go_duration(s: &str) -> Result<Duration, String> {
    spright_core::duration::parse(s.trim()).map_err(|e| e.to_string())
}

#[cfg(test)]
mod tests {
    use super::*;

    fn flags(extra: &[&str]) -> Flags {
        let mut args = vec!["activator-lite", "--manifests", "/tmp/m"];
        args.extend_from_slice(extra);
        Flags::parse_from(args)
    }

    fn env(pairs: &[(&str, &str)]) -> HashMap<String, String> {
        pairs
            .iter()
            .map(|(k, v)| (k.to_string(), v.to_string()))
            .collect()
    }

    #[test]
    fn stock_env() {
        let e = env(&[
            ("POD_NAME", "activator-abc"),
            ("POD_IP", "10.0.0.5"),
            ("SYSTEM_NAMESPACE", "knative-serving"),
            ("CONFIG_LOGGING_NAME", "config-logging"),
            ("CONFIG_OBSERVABILITY_NAME", "config-observability"),
            ("GOGC", "500"),
        ]);
        let resolv = "nameserver 10.96.0.10\nsearch knative-serving.svc.example.org svc.example.org example.org\n";
        let c = Config::from_parts(flags(&[]), &e, Some(resolv)).unwrap();
        assert_eq!(
            c.autoscaler_url,
            "ws://autoscaler.knative-serving.svc.example.org:8080"
        );
        assert_eq!(c.probe_timeout, Duration::from_millis(300));
        assert_eq!(c.probe_frequency, Duration::from_millis(200));
        assert_eq!(c.max_idle_proxy_conns, 1000);
        assert_eq!(c.drain_timeout, Duration::from_secs(45));
        assert_eq!(c.http1_port, 8012);
        assert_eq!(
            (c.h2c_port, c.metrics_port, c.profiling_port),
            (8013, 9090, 8008)
        );
    }

    #[test]
    fn drain_timeout_out_of_range_is_an_error() {
        // Found by fuzz/activator_config: a finite value beyond Duration's range panicked.
        let e = env(&[("POD_NAME", "a"), ("POD_IP", "1.2.3.4")]);
        for bad in ["1e30", "-1", "NaN", "inf"] {
            let arg = format!("--drain-timeout-secs={bad}");
            let f = flags(&["--autoscaler", "ws://127.0.0.1:1", &arg]);
            assert!(
                matches!(
                    Config::from_parts(f, &e, None),
                    Err(ConfigError::Invalid {
                        name: "--drain-timeout-secs",
                        ..
                    })
                ),
                "{bad}"
            );
        }
    }

    #[test]
    fn missing_and_invalid() {
        let e = env(&[("POD_IP", "1.2.3.4")]);
        assert!(matches!(
            Config::from_parts(flags(&[]), &e, None),
            Err(ConfigError::Missing("POD_NAME"))
        ));
        let e = env(&[("POD_NAME", "a"), ("POD_IP", "1.2.3.4")]);
        assert!(matches!(
            Config::from_parts(flags(&[]), &e, None),
            Err(ConfigError::Missing("SYSTEM_NAMESPACE"))
        ));
        let e = env(&[
            ("POD_NAME", "a"),
            ("POD_IP", "1.2.3.4"),
            ("PROBE_TIMEOUT", "fast"),
        ]);
        let err =
            Config::from_parts(flags(&["--autoscaler", "ws://127.0.0.1:1"]), &e, None).unwrap_err();
        assert!(err.to_string().contains("PROBE_TIMEOUT"), "{err}");
        let e = env(&[("POD_NAME", "a"), ("POD_IP", "1.2.3.4")]);
        for bad in ["http://x", "ws://127.0.0.1:/", "ws://", "ws://h:port/", "x"] {
            assert!(
                matches!(
                    Config::from_parts(flags(&["--autoscaler", bad]), &e, None),
                    Err(ConfigError::AutoscalerUrl(_))
                ),
                "{bad}"
            );
        }
        for good in [
            "ws://127.0.0.1:8080/",
            "ws://autoscaler.knative-serving",
            "wss://[::1]:9/",
        ] {
            assert!(
                Config::from_parts(flags(&["--autoscaler", good]), &e, None).is_ok(),
                "{good}"
            );
        }
    }

    #[test]
    fn go_durations() {
        assert_eq!(
            parse_go_duration("300ms").unwrap(),
            Duration::from_millis(300)
        );
        assert_eq!(parse_go_duration("1m30s").unwrap(), Duration::from_secs(90));
        assert_eq!(
            parse_go_duration("1.5s").unwrap(),
            Duration::from_millis(1500)
        );
        assert_eq!(parse_go_duration("0").unwrap(), Duration::ZERO);
        assert_eq!(
            parse_go_duration(" 2h45m ").unwrap(),
            Duration::from_secs(9900)
        );
        for bad in ["", "10", "ms", "1x", "1..2s", "-1s", "1d"] {
            assert!(parse_go_duration(bad).is_err(), "{bad}");
        }
    }

    #[test]
    fn go_duration_random_input_never_panics() {
        use rand::{Rng, SeedableRng};
        let mut rng = rand::rngs::StdRng::seed_from_u64(7);
        let alphabet: Vec<char> = "0123456789.msuhn µ-x".chars().collect();
        for _ in 0..20_000 {
            let len = rng.gen_range(0..12);
            let s: String = (0..len)
                .map(|_| alphabet[rng.gen_range(0..alphabet.len())])
                .collect();
            let _ = parse_go_duration(&s);
        }
    }
}
