//! queue-proxy-ebpf: a drop-in replacement for Knative's queue-proxy sidecar.
//!
//! Thin main: read the environment (exit 64 on bad config), start the listeners, wait for
//! SIGTERM, drain, exit 0.

mod accounting;
mod app;
mod body;
mod breaker;
mod chain;
mod drain;
mod ebpf_accounting;
mod env;
mod eproxy;
mod fast;
mod forwarded;
mod h1;
mod health;
mod loopback;
mod memory;
mod metrics;
mod mode;
mod proxy;
mod readiness;
mod reqlog;
mod server;
mod sniff;
mod stat;
mod timeout;
mod timer;
mod tls;
mod upstream;

use std::process::ExitCode;

/// `EX_USAGE`: configuration error.
const EXIT_CONFIG: u8 = 64;

fn main() -> ExitCode {
    let config = match env::Config::from_env() {
        Ok(c) => c,
        Err(e) => {
            eprintln!("queue-proxy-ebpf: invalid configuration: {e}");
            return ExitCode::from(EXIT_CONFIG);
        }
    };
    let level = if config.logging_level.is_empty() {
        "info"
    } else {
        config.logging_level.as_str()
    };
    spright_core::logging::init("queueproxy", level);
    // Pinned to one core (the usual sidecar budget), a single-threaded runtime avoids
    // cross-thread wake-ups: one syscall less per request.
    let cores = std::thread::available_parallelism().map_or(1, std::num::NonZeroUsize::get);
    let mut builder = if cores == 1 {
        tokio::runtime::Builder::new_current_thread()
    } else {
        let mut b = tokio::runtime::Builder::new_multi_thread();
        b.worker_threads(cores);
        b
    };
    let runtime = match builder.enable_all().build() {
        Ok(r) => r,
        Err(e) => {
            eprintln!("queue-proxy-ebpf: cannot start runtime: {e}");
            return ExitCode::FAILURE;
        }
    };
    match runtime.block_on(app::run(config)) {
        Ok(()) => ExitCode::SUCCESS,
        Err(app::AppError::Config(e)) => {
            tracing::error!(error = %e, "invalid configuration");
            ExitCode::from(EXIT_CONFIG)
        }
        Err(e) => {
            tracing::error!(error = %e, "queue-proxy failed");
            ExitCode::FAILURE
        }
    }
}
