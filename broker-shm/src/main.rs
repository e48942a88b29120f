//! broker-shm: thin main. Parse config, build, run, drain on SIGTERM.

use broker_shm::broker::{Runtime, RuntimeConfig};
use broker_shm::config::{Cli, Mode};
use broker_shm::delivery::Sinks;
use broker_shm::manifests::{ConfigSource, DirectorySource};
use clap::Parser;
use std::net::SocketAddr;
use std::sync::Arc;

fn main() -> std::process::ExitCode {
    let cli = Cli::parse();
    spright_core::logging::init("broker-shm", "info");
    // Before any other thread exists: every thread inherits the placement.
    match spright_core::sdk::place(cli.broker.cpus.as_deref()) {
        Ok(Some(cpus)) => tracing::info!(?cpus, "placed on CPUs"),
        Ok(None) => {}
        Err(e) => {
            tracing::error!(error = %e, "broker-shm failed");
            return std::process::ExitCode::from(64);
        }
    }
    let rt = match tokio::runtime::Builder::new_multi_thread()
        .enable_all()
        .build()
    {
        Ok(rt) => rt,
        Err(e) => {
            eprintln!("cannot start the async runtime: {e}");
            return std::process::ExitCode::from(70);
        }
    };
    match rt.block_on(run(cli)) {
        Ok(()) => std::process::ExitCode::SUCCESS,
        Err(e) => {
            tracing::error!(error = %format!("{e:#}"), "broker-shm failed");
            let code = if e
                .downcast_ref::<broker_shm::config::ConfigError>()
                .is_some()
            {
                64
            } else {
                1
            };
            std::process::ExitCode::from(code)
        }
    }
}

async fn shutdown_signal() {
    use tokio::signal::unix::{SignalKind, signal};
    let (Ok(mut term), Ok(mut int)) = (
        signal(SignalKind::terminate()),
        signal(SignalKind::interrupt()),
    ) else {
        std::future::pending::<()>().await;
        return;
    };
    tokio::select! {
        _ = term.recv() => {}
        _ = int.recv() => {}
    }
    tracing::info!("signal received, draining");
}

async fn run(cli: Cli) -> anyhow::Result<()> {
    let args = cli.broker;
    let manifests = args
        .manifests
        .clone()
        .ok_or(broker_shm::config::ConfigError::NoManifests)?;
    if !manifests.is_dir() {
        return Err(broker_shm::config::ConfigError::Invalid(
            "--manifests",
            format!("{} is not a directory", manifests.display()),
        )
        .into());
    }
    let source: Arc<dyn ConfigSource> = Arc::new(DirectorySource::new(&manifests));
    let addr = SocketAddr::from(([0, 0, 0, 0], args.port));
    let listener = tokio::net::TcpListener::bind(addr).await?;
    tracing::info!(%addr, mode = ?cli.mode, "listening");
    match cli.mode {
        None => {
            let mut sinks = Sinks::default();
            if let Some(shm) = args.shm_config() {
                let dp = broker_shm::shm::ShmDataplane::start(shm)?;
                sinks.shm = Some(dp);
            }
            let runtime = Runtime::new(
                RuntimeConfig {
                    data_dir: args.data_dir.clone(),
                    log: args.log_config()?,
                    max_ttl: args.max_ttl,
                    max_inflight: args.max_inflight,
                    default_delivery: args.default_delivery()?,
                },
                sinks,
            );
            runtime.reconcile(&source.load());
            let (tx, mut rx) = tokio::sync::mpsc::unbounded_channel::<()>();
            source.watch(Box::new(move || {
                let _ = tx.send(());
            }))?;
            let watcher = {
                let runtime = runtime.clone();
                let source = source.clone();
                tokio::spawn(async move {
                    while rx.recv().await.is_some() {
                        while rx.try_recv().is_ok() {}
                        runtime.reconcile(&source.load());
                    }
                })
            };
            if args.metrics_port != 0 {
                let maddr = SocketAddr::from(([0, 0, 0, 0], args.metrics_port));
                match tokio::net::TcpListener::bind(maddr).await {
                    Ok(l) => {
                        let rt = runtime.clone();
                        tokio::spawn(broker_shm::ingress::serve(
                            l,
                            move |_req| {
                                let text = rt.metrics_text();
                                async move { broker_shm::ingress::respond(http::StatusCode::OK, text) }
                            },
                            std::future::pending::<()>(),
                        ));
                        tracing::info!(addr = %maddr, "metrics listening");
                    }
                    Err(e) => {
                        tracing::error!(addr = %maddr, error = %e, "metrics port unavailable; continuing without metrics")
                    }
                }
            }
            let handler = move |req| broker_shm::ingress::handle(runtime.clone(), req);
            broker_shm::ingress::serve(listener, handler, shutdown_signal()).await;
            watcher.abort();
        }
        Some(Mode::Ingress) | Some(Mode::Filter) => {
            broker_shm::dropin::run(cli.mode, source, args.max_ttl, listener, shutdown_signal())
                .await?;
        }
    }
    Ok(())
}
