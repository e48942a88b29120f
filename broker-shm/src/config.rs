//! Configuration: flags and the environment variables Knative sets.

use crate::log::{Durability, LogConfig};
use crate::manifests::{Backoff, Delivery, parse_iso8601};
use clap::{Args, Parser, Subcommand};
use std::path::PathBuf;

/// broker-shm command line.
#[derive(Debug, Parser)]
#[command(
    name = "broker-shm",
    version,
    about = "Knative Broker on a memory-mapped log"
)]
pub struct Cli {
    #[command(subcommand)]
    pub mode: Option<Mode>,
    #[command(flatten)]
    pub broker: BrokerArgs,
}

/// Run modes (the default runs the whole broker).
#[derive(Debug, Clone, Copy, Subcommand)]
pub enum Mode {
    /// Drop-in for mt-broker-ingress: forwards to the Broker's channel address.
    Ingress,
    /// Drop-in for mt-broker-filter: serves `/triggers/<ns>/<name>/<uid>`.
    Filter,
}

/// Options of the broker (default) mode.
#[derive(Debug, Clone, Args)]
pub struct BrokerArgs {
    /// Directory of Knative-shaped Broker and Trigger YAML manifests (watched).
    #[arg(long, env = "BROKER_MANIFESTS", global = true)]
    pub manifests: Option<PathBuf>,
    /// Where the per-broker logs live.
    #[arg(long, env = "BROKER_DATA_DIR", default_value = "/var/lib/broker-shm")]
    pub data_dir: PathBuf,
    /// When an accepted event counts as stored: `append` (in the shared mapping) or
    /// `msync` (flushed to disk) before the 202.
    #[arg(long, env = "BROKER_DURABILITY", default_value = "append")]
    pub durability: Durability,
    /// Segment file size (also the largest event).
    #[arg(long, env = "BROKER_SEGMENT_BYTES", default_value_t = 16 << 20)]
    pub segment_bytes: usize,
    /// Most bytes of segments per broker; beyond it new events get 503 until triggers catch up.
    #[arg(long, env = "BROKER_RETENTION_BYTES", default_value_t = 1 << 30)]
    pub retention_bytes: u64,
    /// Concurrent deliveries per trigger.
    #[arg(long, env = "BROKER_MAX_INFLIGHT", default_value_t = 64)]
    pub max_inflight: usize,
    /// Retries when neither Trigger nor Broker set `delivery` (config-br-defaults: 10).
    #[arg(long, default_value_t = 10)]
    pub default_retry: u32,
    /// Backoff policy default (config-br-defaults: exponential).
    #[arg(long, default_value = "exponential")]
    pub default_backoff_policy: String,
    /// Backoff delay default (config-br-defaults: PT0.2S).
    #[arg(long, default_value = "PT0.2S")]
    pub default_backoff_delay: String,
    /// CPUs every thread of broker-shm runs on, as a Linux cpu list (`0`, `0-1`): give the
    /// broker and its shared-memory functions (which honour the same variable) the same core
    /// so that handing a descriptor on wakes a thread on that core, with no inter-processor
    /// interrupt. Unset: the CPUs the process inherits (in a pod, the container's cpuset);
    /// every CPU named must be in that cpuset.
    #[arg(long, env = "SPRIGHT_CPUS")]
    pub cpus: Option<String>,
    /// Listening port (`INGRESS_PORT`).
    #[arg(long, env = "INGRESS_PORT", default_value_t = 8080)]
    pub port: u16,
    /// Prometheus metrics port (`METRICS_PORT`; Knative's broker uses 9092). 0 disables.
    #[arg(long, env = "METRICS_PORT", default_value_t = 9092)]
    pub metrics_port: u16,
    /// `MAX_TTL` (Knative default 255).
    #[arg(long = "max-ttl", env = "MAX_TTL", default_value_t = 255)]
    pub max_ttl: i32,
    /// Dataplane-SDK functions that may join the shared-memory fast path (comma separated);
    /// Triggers reach them with `subscriber.ref.kind: SprightFunction`. Empty: no dataplane.
    #[arg(long, env = "BROKER_SHM_FUNCTIONS", value_delimiter = ',')]
    pub shm_functions: Vec<String>,
    /// Directory of the dataplane control socket (`control.sock`).
    #[arg(
        long,
        env = "BROKER_SHM_RUN_DIR",
        default_value = "/run/spright-broker"
    )]
    pub shm_run_dir: PathBuf,
    /// Dataplane transport: auto (sk_msg when permitted, else unix), sk_msg or unix.
    #[arg(long, env = "BROKER_SHM_TRANSPORT", default_value = "auto")]
    pub shm_transport: spright_core::transport::TransportChoice,
    /// Pool slot size in bytes (the largest event on the fast path; multiple of 64).
    #[arg(long, env = "BROKER_SHM_SLOT_SIZE", default_value_t = 64 * 1024)]
    pub shm_slot_size: u32,
    /// Pool slot count.
    #[arg(long, env = "BROKER_SHM_SLOTS", default_value_t = 4096)]
    pub shm_slots: u32,
}

/// A configuration error (exit code 64).
#[derive(Debug, thiserror::Error)]
pub enum ConfigError {
    #[error("--manifests (BROKER_MANIFESTS) is required")]
    NoManifests,
    #[error("invalid {0}: {1}")]
    Invalid(&'static str, String),
}

impl BrokerArgs {
    /// Log settings.
    pub fn log_config(&self) -> Result<LogConfig, ConfigError> {
        if self.segment_bytes < 4096 {
            return Err(ConfigError::Invalid(
                "segment bytes",
                "must be at least 4096".into(),
            ));
        }
        if self.retention_bytes < self.segment_bytes as u64 * 2 {
            return Err(ConfigError::Invalid(
                "retention bytes",
                "must hold at least two segments".into(),
            ));
        }
        Ok(LogConfig {
            segment_bytes: self.segment_bytes,
            retention_bytes: self.retention_bytes,
            durability: self.durability,
        })
    }

    /// The shared-memory dataplane settings, when functions are declared.
    pub fn shm_config(&self) -> Option<crate::shm::ShmConfig> {
        let functions: Vec<String> = self
            .shm_functions
            .iter()
            .map(|f| f.trim().to_string())
            .filter(|f| !f.is_empty())
            .collect();
        (!functions.is_empty()).then(|| crate::shm::ShmConfig {
            run_dir: self.shm_run_dir.clone(),
            functions,
            transport: self.shm_transport,
            pool: spright_core::pool::PoolConfig {
                slot_size: self.shm_slot_size,
                slot_count: self.shm_slots,
            },
        })
    }

    /// The delivery applied when none is set.
    pub fn default_delivery(&self) -> Result<Delivery, ConfigError> {
        let backoff = match self.default_backoff_policy.as_str() {
            "linear" => Backoff::Linear,
            "exponential" => Backoff::Exponential,
            o => return Err(ConfigError::Invalid("default backoff policy", o.into())),
        };
        let backoff_delay = parse_iso8601(&self.default_backoff_delay).ok_or_else(|| {
            ConfigError::Invalid("default backoff delay", self.default_backoff_delay.clone())
        })?;
        Ok(Delivery {
            retry: self.default_retry,
            backoff,
            backoff_delay,
            ..Delivery::default()
        })
    }
}
