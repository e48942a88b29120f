//! Builds the queue-proxy from its [`Config`] and runs it until SIGTERM has been handled.

use std::net::{Ipv6Addr, SocketAddr};
use std::sync::Arc;
use std::time::{Duration, Instant};

use tokio::net::TcpListener;
use tokio::signal::unix::{SignalKind, signal};
use tokio::sync::watch;

use crate::breaker::Breaker;
use crate::chain::Chain;
use crate::drain::Drainer;
use crate::env::{Config, RequestMetricsProtocol};
use crate::metrics::RequestMetrics;
use crate::proxy::Proxy;
use crate::readiness::{self, Prober};
use crate::reqlog::RequestLog;
use crate::server::{self, Plain};
use crate::timeout::Timeouts;
use crate::tls;

/// Knative's `hijackDrainDuration`.
const HIJACK_DRAIN: Duration = Duration::from_secs(60);

#[derive(Debug, thiserror::Error)]
pub enum AppError {
    #[error("{0}")]
    Config(String),
    #[error("cannot listen on port {port}: {source}")]
    Bind { port: u16, source: std::io::Error },
    #[error("TLS: {0}")]
    Tls(#[from] crate::tls::TlsError),
    #[error("signal handling: {0}")]
    Signal(std::io::Error),
}

async fn bind(port: u16) -> Result<TcpListener, AppError> {
    // Dual-stack like Go's ":port"; fall back to IPv4 where IPv6 is off.
    let v6 = SocketAddr::from((Ipv6Addr::UNSPECIFIED, port));
    match TcpListener::bind(v6).await {
        Ok(l) => Ok(l),
        Err(_) => TcpListener::bind(SocketAddr::from(([0, 0, 0, 0], port)))
            .await
            .map_err(|source| AppError::Bind { port, source }),
    }
}

pub async fn run(cfg: Config) -> Result<(), AppError> {
    let start = Instant::now();
    let mut sigterm = signal(SignalKind::terminate()).map_err(AppError::Signal)?;
    let mut sigint = signal(SignalKind::interrupt()).map_err(AppError::Signal)?;

    let prober = match &cfg.readiness_probe {
        Some(json) => {
            let specs = readiness::decode(json, cfg.enable_multi_container_probes)
                .map_err(|e| AppError::Config(e.to_string()))?;
            Some(Prober::new(specs, cfg.enable_http2_auto_detection))
        }
        None => None,
    };
    // Data path per revision: SPRIGHT_DATAPLANE_MODE or the podinfo annotation (mode.rs).
    let (dataplane, mode_source) =
        crate::mode::from_process().map_err(|e| AppError::Config(e.to_string()))?;
    tracing::info!(mode = %dataplane, source = ?mode_source, "data path mode");
    // SPRIGHT_ACCOUNTING: userspace (default), agent or standalone (ebpf_accounting.rs).
    // Event-driven mode defaults to kernel accounting (eproxy.rs).
    let event_driven = dataplane == crate::mode::DataplaneMode::EventDriven;
    let accounting_mode = crate::eproxy::accounting_mode(event_driven, |k| std::env::var(k).ok())
        .map_err(|e| AppError::Config(e.to_string()))?;
    let (accounting, kernel_load) = crate::ebpf_accounting::select_with_load(
        &accounting_mode,
        if event_driven {
            cfg.serving_port
        } else {
            crate::loopback::accounting_port(dataplane, cfg.serving_port, cfg.user_port)
        },
        start,
    );
    // Full mode: the hop to the user container through a sockmap (loopback.rs), until return.
    let _full_mode = crate::loopback::attach(dataplane, &accounting_mode, cfg.user_port);
    let _steering = crate::eproxy::steer(event_driven, &accounting_mode, &cfg);
    let breaker = cfg
        .breaker_params()
        .map(|(cc, depth)| Breaker::new(cc, depth));
    let max_idle = match cfg.container_concurrency {
        0 => 1000,
        cc => usize::try_from(cc).unwrap_or(1000),
    };
    let metrics =
        (cfg.observability.request_metrics == RequestMetricsProtocol::Prometheus).then(|| {
            let mut resource = vec![
                ("container_name", "queue-proxy"),
                ("k8s_namespace_name", cfg.namespace.as_str()),
                ("k8s_pod_name", cfg.otel_pod_name.as_str()),
                ("kn_configuration_name", cfg.configuration.as_str()),
                ("kn_revision_name", cfg.revision.as_str()),
                ("service_instance_id", ""),
                ("service_name", cfg.service_name()),
                ("service_version", "unknown"),
                ("telemetry_sdk_language", "rust"),
                ("telemetry_sdk_name", "spright-rs"),
            ];
            if !cfg.service.is_empty() {
                resource.push(("kn_service_name", cfg.service.as_str()));
            }
            Arc::new(RequestMetrics::new(&resource))
        });
    let request_log = cfg.observability.enable_request_log.then(|| {
        Arc::new(RequestLog::new(
            &cfg.observability.request_log_template,
            &[
                ("Name", &cfg.revision),
                ("Namespace", &cfg.namespace),
                ("Service", &cfg.service),
                ("Configuration", &cfg.configuration),
                ("PodName", &cfg.pod),
                ("PodIP", &cfg.pod_ip),
            ],
            cfg.observability.enable_probe_request_log,
        ))
    });
    // Event-driven mode: the drain also waits for the kernel's requests in flight (drain.rs).
    let quiet = crate::drain::quiet_period(|k| std::env::var(k).ok()).map_err(AppError::Config)?;
    let drainer = Drainer::watching_kernel(quiet, kernel_load.filter(|_| event_driven));
    let queue_probe = event_driven.then(|| crate::eproxy::QueueProbe {
        prober: prober.clone(),
        drainer: Arc::clone(&drainer),
    });
    let proxy = Proxy::new(cfg.user_port, max_idle);
    let hijacks = Arc::clone(&proxy.hijacks);
    let chain = Arc::new(Chain {
        drainer: Arc::clone(&drainer),
        prober,
        accounting: Arc::clone(&accounting),
        breaker,
        timeouts: Timeouts {
            total: cfg.revision_timeout,
            response_start: cfg.response_start_timeout,
            idle: cfg.idle_timeout,
        },
        timers: crate::timer::Timers::start(),
        proxy,
        metrics: metrics.clone(),
        request_log,
    });

    let main_l = bind(cfg.serving_port).await?;
    let admin_l = bind(cfg.admin_port).await?;
    let stats_l = bind(cfg.autoscaling_metrics_port).await?;
    let tls = if tls::enabled(&cfg.cert_dir) {
        let watcher = Arc::new(tls::CertWatcher::new(&cfg.cert_dir)?);
        let sc = tls::server_config(&cfg.tls, watcher).map_err(|e| match e {
            e @ (tls::TlsError::CipherSuite(_)
            | tls::TlsError::Curve(_)
            | tls::TlsError::Config(_)) => AppError::Config(e.to_string()),
            e => AppError::Tls(e),
        })?;
        Some((
            bind(cfg.serving_tls_port).await?,
            tls::Tls(tokio_rustls::TlsAcceptor::from(Arc::new(sc))),
        ))
    } else {
        None
    };
    let user_l = match &metrics {
        Some(_) => Some(bind(cfg.user_metrics_port).await?),
        None => None,
    };

    let (stop_tx, stop_rx) = watch::channel(false);
    let (term_tx, term_rx) = watch::channel(false);
    let mut servers = tokio::task::JoinSet::new();

    let c = Arc::clone(&chain);
    let handler = move |req, peer| Arc::clone(&c).handle(req, peer);
    if chain.request_log.is_none() {
        // Ordinary requests take the fast path (fast.rs); request logs need the hyper path.
        let fast = crate::fast::Fast::new(Arc::clone(&chain), cfg.user_port, max_idle);
        servers.spawn(server::serve(main_l, handler, stop_rx.clone(), fast));
    } else {
        servers.spawn(server::serve(main_l, handler, stop_rx.clone(), Plain));
    }
    if let Some((l, wrap)) = tls {
        let c = Arc::clone(&chain);
        tracing::info!(port = cfg.serving_tls_port, "Starting tls server main");
        servers.spawn(server::serve(
            l,
            move |req, peer| Arc::clone(&c).handle(req, peer),
            stop_rx.clone(),
            wrap,
        ));
    }
    let d = Arc::clone(&drainer);
    servers.spawn(server::serve(
        admin_l,
        move |req, _| {
            let (d, term, probe) = (Arc::clone(&d), term_rx.clone(), queue_probe.clone());
            async move {
                // Event-driven mode: activator-lite's readiness probe (eproxy.rs).
                if let Some(p) = probe
                    && let Some(r) = p.answer(req.headers()).await
                {
                    return r;
                }
                server::admin(req, d, term).await
            }
        },
        stop_rx.clone(),
        Plain,
    ));
    let acc = Arc::clone(&accounting);
    let pod = cfg.pod.clone();
    servers.spawn(server::serve(
        stats_l,
        move |req, _| {
            let r = server::stats(&req, &pod, acc.as_ref());
            async move { r }
        },
        stop_rx.clone(),
        Plain,
    ));
    if let (Some(l), Some(m)) = (user_l, metrics) {
        servers.spawn(server::serve(
            l,
            move |req, _| {
                let r = server::user_metrics(&req, &m);
                async move { r }
            },
            stop_rx.clone(),
            Plain,
        ));
    }
    tracing::info!(
        port = cfg.serving_port,
        admin = cfg.admin_port,
        stats = cfg.autoscaling_metrics_port,
        "Starting queue-proxy"
    );
    // Start-up is done: its code need not stay resident (memory.rs).
    crate::memory::trim_startup_pages();

    tokio::select! {
        _ = sigterm.recv() => {}
        _ = sigint.recv() => {}
    }
    let _ = term_tx.send(true);
    tracing::info!(
        "Received TERM signal, attempting to gracefully shutdown servers. Sleeping {quiet:?} to allow K8s propagation of non-ready state"
    );
    drainer.drain().await;
    let _ = stop_tx.send(true);
    while servers.join_next().await.is_some() {}
    if !hijacks.drain(HIJACK_DRAIN).await {
        tracing::warn!("Hijack connection drain failed");
    }
    tracing::info!("Shutdown complete, exiting...");
    Ok(())
}
