//! spright-gateway: thin main. Parse config, build the host and gateway, serve, drain on SIGTERM.

use std::sync::Arc;

use anyhow::Context;
use clap::Parser;
use hyper_util::rt::{TokioExecutor, TokioIo};
use hyper_util::server::conn::auto;
use spright_core::chain::ChainFile;
use spright_core::host::{Host, HostConfig};
use spright_core::pool::PoolConfig;
use spright_ebpf::DataplaneOptions;
use spright_gateway::config::Config;
use spright_gateway::{Gateway, Pending, on_host_event, supervisor};
use tokio::net::TcpListener;
use tokio::signal::unix::{SignalKind, signal};
use tracing::{error, info};

fn main() {
    let config = match Config::try_parse() {
        Ok(c) => c,
        Err(e) => {
            let code = if e.use_stderr() { 64 } else { 0 };
            let _ = e.print();
            std::process::exit(code);
        }
    };
    spright_core::logging::init("gateway", &config.log_level);
    let runtime = match tokio::runtime::Builder::new_multi_thread()
        .enable_all()
        .build()
    {
        Ok(r) => r,
        Err(e) => {
            error!(error = %e, "building the runtime");
            std::process::exit(70);
        }
    };
    if let Err(e) = runtime.block_on(run(config)) {
        error!(error = format!("{e:#}"), "gateway failed");
        std::process::exit(1);
    }
}

async fn run(config: Config) -> anyhow::Result<()> {
    let chains = ChainFile::load(&config.chain)?;
    let pending = Arc::new(Pending::default());
    let host = {
        let pending = Arc::clone(&pending);
        Host::start(
            HostConfig {
                run_dir: config.run_dir.clone(),
                transport: config.transport,
                pool: PoolConfig {
                    slot_size: config.slot_size,
                    slot_count: config.slots,
                },
                ebpf: DataplaneOptions {
                    cgroup_path: config.cgroup.clone(),
                    pin_dir: config.pin_dir.clone(),
                },
                routing: chains.routing_table(),
            },
            move |event| on_host_event(&pending, event),
        )
        .context("starting the dataplane")?
    };
    let control = host.control_path();
    let gateway = Gateway::new(
        host,
        pending,
        &chains.chains,
        config.request_timeout,
        config.access_log,
    );
    let listener = TcpListener::bind(config.listen)
        .await
        .with_context(|| format!("binding {}", config.listen))?;
    info!(
        listen = %listener.local_addr()?,
        transport = %gateway.host().kind(),
        control = %control.display(),
        chains = chains.chains.len(),
        functions = chains.functions.len(),
        "gateway listening"
    );
    let (stop_tx, stop_rx) = tokio::sync::watch::channel(false);
    let children = supervisor::supervise(&chains.functions, &control, &stop_rx);
    let mut sigterm = signal(SignalKind::terminate())?;
    let mut sigint = signal(SignalKind::interrupt())?;
    loop {
        tokio::select! {
            accepted = listener.accept() => {
                let Ok((stream, _)) = accepted else { continue };
                let _ = stream.set_nodelay(true);
                let gw = Arc::clone(&gateway);
                tokio::spawn(async move {
                    let service = hyper::service::service_fn(move |req| Arc::clone(&gw).handle(req));
                    let _ = auto::Builder::new(TokioExecutor::new())
                        .serve_connection(TokioIo::new(stream), service)
                        .await;
                });
            }
            _ = sigterm.recv() => break,
            _ = sigint.recv() => break,
        }
    }
    info!(in_flight = gateway.pending().len(), "draining");
    drop(listener);
    let deadline = tokio::time::Instant::now() + config.drain_timeout;
    while !gateway.pending().is_empty() && tokio::time::Instant::now() < deadline {
        tokio::time::sleep(std::time::Duration::from_millis(50)).await;
    }
    let _ = stop_tx.send(true);
    for c in children {
        let _ = c.await;
    }
    gateway.host().shutdown();
    info!("gateway stopped");
    Ok(())
}
