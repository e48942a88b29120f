//! mqtt-adaptor binary: parse configuration, start the parts, drain on SIGTERM.

use std::sync::Arc;
use std::time::Duration;

use mqtt_adaptor::config::{Config, EXIT_CONFIG};
use mqtt_adaptor::{embedded, metrics::Metrics, publisher, server, source};
use tokio::signal::unix::{SignalKind, signal};

// Per-message buffers (MQTT publish, CloudEvent headers, HTTP request) are allocated and
// freed at a high rate on a few threads; mimalloc's thread-local free lists cost less here
// than glibc malloc (measured with `spright-bench mqtt`).
#[global_allocator]
static GLOBAL: mimalloc::MiMalloc = mimalloc::MiMalloc;

fn main() {
    spright_core::logging::init("mqtt-adaptor", "info");
    let cfg = match Config::from_env_and_args() {
        Ok(c) => c,
        Err(e) => {
            tracing::error!(error = %e, "invalid configuration");
            eprintln!("mqtt-adaptor: invalid configuration: {e}");
            std::process::exit(EXIT_CONFIG);
        }
    };
    // TLS material is configuration too: refuse to start on unusable files.
    if let Some(tls) = &cfg.tls
        && let Err(e) = mqtt_adaptor::mqtt::rustls_config(tls)
    {
        tracing::error!(error = %e, "invalid configuration");
        eprintln!("mqtt-adaptor: invalid configuration: {e}");
        std::process::exit(EXIT_CONFIG);
    }
    if let Some(pem) = &cfg.ca_certs
        && let Err(e) = reqwest_ca_check(pem)
    {
        tracing::error!(error = %e, "invalid configuration");
        eprintln!("mqtt-adaptor: invalid configuration: {e}");
        std::process::exit(EXIT_CONFIG);
    }
    let rt = match tokio::runtime::Builder::new_multi_thread()
        .enable_all()
        .build()
    {
        Ok(rt) => rt,
        Err(e) => {
            eprintln!("mqtt-adaptor: cannot start the runtime: {e}");
            std::process::exit(1);
        }
    };
    if let Err(e) = rt.block_on(run(cfg)) {
        tracing::error!(error = %format!("{e:#}"), "mqtt-adaptor failed");
        std::process::exit(1);
    }
}

/// K_CA_CERTS must hold at least one PEM certificate.
fn reqwest_ca_check(pem: &str) -> anyhow::Result<()> {
    mqtt_adaptor::sink::SinkClient::new(
        mqtt_adaptor::config::Format::Binary,
        Duration::from_secs(1),
        Some(pem),
        std::path::PathBuf::new(),
        1,
    )?;
    Ok(())
}

async fn run(mut cfg: Config) -> anyhow::Result<()> {
    if cfg.broker.is_none() {
        embedded::start(cfg.embedded_listen, cfg.protocol)?;
        // Give the broker thread a moment to bind before the first connect attempt; the
        // clients reconnect with backoff anyway.
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    if cfg.sink.is_some() && cfg.topics.is_empty() {
        // The prototype's default topic.
        cfg.topics.push("mqtt-topic".to_owned());
    }
    let metrics = Arc::new(Metrics::new());
    let (stop_tx, stop_rx) = tokio::sync::watch::channel(false);

    let mut source_task = match (&cfg.sink, cfg.topics.is_empty()) {
        (Some(sink), false) => Some(tokio::spawn(source::run(
            cfg.clone(),
            sink.clone(),
            metrics.clone(),
            stop_rx.clone(),
        ))),
        _ => {
            tracing::info!("no sink (K_SINK) configured: the MQTT source is disabled");
            None
        }
    };
    let (publisher, publisher_task) = match publisher::start(&cfg, metrics.clone(), stop_rx.clone())
    {
        Ok((p, t)) => (Some(p), Some(t)),
        Err(e) => return Err(e.into()),
    };
    let listener = tokio::net::TcpListener::bind(cfg.http_addr)
        .await
        .map_err(|e| anyhow::anyhow!("cannot listen on {}: {e}", cfg.http_addr))?;
    tracing::info!(address = %cfg.http_addr, "HTTP listener ready (POST /, /healthz, /readyz, /metrics)");
    let state = Arc::new(server::AppState {
        cfg: cfg.clone(),
        metrics: metrics.clone(),
        publisher,
        source_enabled: source_task.is_some(),
    });
    let server_task = tokio::spawn(server::serve(listener, state, stop_rx.clone()));

    let mut term = signal(SignalKind::terminate())?;
    let mut int = signal(SignalKind::interrupt())?;
    let source_failed = async {
        match source_task.as_mut() {
            Some(t) => t.await,
            None => std::future::pending().await,
        }
    };
    tokio::select! {
        _ = term.recv() => tracing::info!("SIGTERM received, draining"),
        _ = int.recv() => tracing::info!("SIGINT received, draining"),
        r = source_failed => {
            let _ = stop_tx.send(true);
            match r {
                Ok(Err(e)) => return Err(e.context("MQTT source failed")),
                Ok(Ok(())) => anyhow::bail!("MQTT source stopped unexpectedly"),
                Err(e) => anyhow::bail!("MQTT source task failed: {e}"),
            }
        }
    }
    let _ = stop_tx.send(true);
    if let Some(t) = source_task {
        match tokio::time::timeout(cfg.drain_timeout + Duration::from_secs(2), t).await {
            Ok(Ok(Err(e))) => tracing::error!(error = %e, "source ended with an error"),
            Err(_) => tracing::warn!("source drain timed out"),
            _ => {}
        }
    }
    if let Some(t) = publisher_task {
        let _ = tokio::time::timeout(Duration::from_secs(2), t).await;
    }
    let _ = tokio::time::timeout(Duration::from_secs(1), server_task).await;
    tracing::info!("stopped");
    Ok(())
}
