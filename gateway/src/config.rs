//! Gateway configuration: flags, each with an environment variable.

use std::net::SocketAddr;
use std::path::PathBuf;
use std::time::Duration;

use clap::Parser;
use spright_core::transport::TransportChoice;

/// spright-gateway: takes HTTP requests, runs them through a chain of functions that share one
/// memory pool, and answers with the chain's result.
#[derive(Debug, Clone, Parser)]
#[command(name = "spright-gateway", version)]
pub struct Config {
    /// Chain file (YAML): the functions and the chains that run them.
    #[arg(long, env = "SPRIGHT_CHAIN")]
    pub chain: PathBuf,
    /// HTTP listen address.
    #[arg(long, env = "SPRIGHT_LISTEN", default_value = "127.0.0.1:8080")]
    pub listen: SocketAddr,
    /// Transport between functions: auto, sk_msg or unix.
    #[arg(long, env = "SPRIGHT_TRANSPORT", default_value = "auto")]
    pub transport: TransportChoice,
    /// Directory for the control socket and Unix transport sockets.
    #[arg(long, env = "SPRIGHT_RUN_DIR", default_value = "/tmp/spright")]
    pub run_dir: PathBuf,
    /// Cgroup v2 directory the sock_ops program attaches to.
    #[arg(long, env = "SPRIGHT_CGROUP", default_value = spright_ebpf::DEFAULT_CGROUP_PATH)]
    pub cgroup: PathBuf,
    /// Pin the eBPF maps under this bpffs directory (e.g. /sys/fs/bpf/spright).
    #[arg(long, env = "SPRIGHT_PIN_DIR")]
    pub pin_dir: Option<PathBuf>,
    /// Bytes per pool slot: the largest request or result.
    #[arg(long, env = "SPRIGHT_SLOT_SIZE", default_value_t = 64 * 1024)]
    pub slot_size: u32,
    /// Number of pool slots: the most requests in flight at once.
    #[arg(long, env = "SPRIGHT_SLOTS", default_value_t = 1024)]
    pub slots: u32,
    /// How long a request may take before the gateway answers 504.
    #[arg(long, env = "SPRIGHT_REQUEST_TIMEOUT", default_value = "30s", value_parser = parse_duration)]
    pub request_timeout: Duration,
    /// How long SIGTERM waits for requests in flight.
    #[arg(long, env = "SPRIGHT_DRAIN_TIMEOUT", default_value = "10s", value_parser = parse_duration)]
    pub drain_timeout: Duration,
    /// Log one JSON line per request.
    #[arg(long, env = "SPRIGHT_ACCESS_LOG")]
    pub access_log: bool,
    /// Log level (debug, info, warn, error).
    #[arg(long, env = "SPRIGHT_LOG_LEVEL", default_value = "info")]
    pub log_level: String,
}

/// Parses a Go duration (`500ms`, `30s`, `1m30s`, `1.5h`: [`spright_core::duration::parse`])
/// or, as this flag always allowed, a bare number of seconds (`3`, `2.5`).
pub fn parse_duration(s: &str) -> Result<Duration, String> {
    let s = s.trim();
    if !s.is_empty() && s.bytes().all(|c| c.is_ascii_digit() || c == b'.') {
        let secs: f64 = s.parse().map_err(|_| format!("bad duration {s:?}"))?;
        // Too large for a Duration (found by fuzz/gateway_config).
        return Duration::try_from_secs_f64(secs).map_err(|_| format!("bad duration {s:?}"));
    }
    spright_core::duration::parse(s).map_err(|e| e.to_string())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn durations() {
        assert_eq!(parse_duration("250ms"), Ok(Duration::from_millis(250)));
        assert_eq!(parse_duration("3"), Ok(Duration::from_secs(3)));
        assert_eq!(parse_duration("2m"), Ok(Duration::from_secs(120)));
        assert_eq!(parse_duration("2.5"), Ok(Duration::from_millis(2500)));
        assert_eq!(parse_duration(" 30s "), Ok(Duration::from_secs(30)));
        // Go's syntax in full since the parser moved to spright-core.
        assert_eq!(parse_duration("5h"), Ok(Duration::from_secs(5 * 3600)));
        assert_eq!(parse_duration("1m30s"), Ok(Duration::from_secs(90)));
        assert_eq!(parse_duration("1.5s"), Ok(Duration::from_millis(1500)));
        for bad in ["x", "", ".", "1..2", "5d", "-1s", "1s2"] {
            assert!(parse_duration(bad).is_err(), "{bad}");
        }
        // Larger than a Duration holds: an error, not a panic.
        assert!(parse_duration("100000000000000000000").is_err());
        assert!(parse_duration("99999999999999999999999m").is_err());
    }

    #[test]
    fn flags_parse() {
        let c = Config::try_parse_from(["g", "--chain", "c.yaml", "--transport", "unix"])
            .expect("parse");
        assert_eq!(
            c.transport,
            TransportChoice::Only(spright_core::transport::TransportKind::Unix)
        );
        assert!(Config::try_parse_from(["g", "--chain", "c.yaml", "--transport", "tcp"]).is_err());
    }
}
