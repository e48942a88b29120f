//! spright-node-agent: the privileged half of queue-proxy-ebpf's eBPF mode.
//!
//! In a Knative pod the queue-proxy sidecar runs non-root with every
//! capability dropped, so it cannot load eBPF. One agent per node does it for
//! every pod (edge mode: pods come from a manifest directory or the
//! registration API; cluster mode: from a watch of this node's Pods, see
//! [`cluster`], untested against a real API server):
//!
//! - it attaches [`spright_ebpf::accounting::PodAccounting`] to each pod's
//!   cgroup (own programs and maps per pod) and detaches when the pod is
//!   unregistered, its manifest is removed, or the pod disappears (its cgroup
//!   is removed or its last process exits, seen through inotify on
//!   `cgroup.events`);
//! - it serves each pod its counters at `GET /v1/counters` on the node address
//!   (`HOST_IP` in the pod), answering only callers whose source address is a
//!   registered pod's IP, and only with that pod's counters (403 otherwise);
//! - the registration API listens on loopback: `GET /v1/pods`,
//!   `POST /v1/pods` (a [`PodSpec`] as JSON; 201), `DELETE /v1/pods/<name>`
//!   (204).
//!
//! Idle means idle: no periodic timers; the agent wakes for HTTP requests and
//! inotify events, and for the backoff timers of pods that failed to attach
//! (see [`retry`]) until they attach or the retries run out.

pub mod cluster;
pub mod config;
pub mod pod;
pub mod registry;
pub mod retry;

use std::collections::HashMap;
use std::convert::Infallible;
use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::sync::{Arc, Mutex};

use bytes::Bytes;
use http::{Method, Request, Response, StatusCode, header};
use http_body_util::{BodyExt, Full, Limited};
use hyper::body::Incoming;
use hyper_util::rt::TokioIo;
use notify::{RecursiveMode, Watcher};
use tokio::net::TcpListener;
use tokio::sync::mpsc;

pub use config::Config;
pub use pod::{DataplaneMode, PodSpec};
pub use registry::{CountersJson, PodReport, Registry, RegistryError, Source};
pub use retry::{Backoff, Retries};

/// Largest registration body accepted.
const MAX_BODY: usize = 64 * 1024;

type Body = Full<Bytes>;

/// Runs the agent until SIGTERM or SIGINT, then detaches every pod.
pub async fn run(cfg: Config) -> anyhow::Result<()> {
    let (events_tx, mut events_rx) = mpsc::unbounded_channel::<PathBuf>();
    let watcher = notify::recommended_watcher(move |event: notify::Result<notify::Event>| {
        // Opening and reading a watched file is an event too (our own reads
        // of cgroup.events and of manifests would wake us forever): only
        // changes count.
        if let Ok(event) = event
            && !matches!(event.kind, notify::EventKind::Access(_))
        {
            for path in event.paths {
                let _ = events_tx.send(path);
            }
        }
    })
    .map_err(|e| anyhow::anyhow!("starting inotify: {e}"))?;
    let watcher = Arc::new(Mutex::new(watcher));
    let hook_watcher = Arc::clone(&watcher);
    let registry = Arc::new(Registry::new(
        cfg.cgroup_root.clone(),
        Box::new(move |path: &Path, watch: bool| {
            let mut w = hook_watcher
                .lock()
                .unwrap_or_else(std::sync::PoisonError::into_inner);
            let result = if watch {
                w.watch(path, RecursiveMode::NonRecursive)
            } else {
                w.unwatch(path)
            };
            if let Err(error) = result
                && watch
            {
                tracing::warn!(path = %path.display(), %error, "cannot watch the pod's cgroup; its disappearance will not be noticed");
            }
        }),
    ));

    if let Some(dir) = &cfg.manifest_dir {
        if !dir.is_dir() {
            anyhow::bail!("manifest directory {} does not exist", dir.display());
        }
        watcher
            .lock()
            .unwrap_or_else(std::sync::PoisonError::into_inner)
            .watch(dir, RecursiveMode::NonRecursive)
            .map_err(|e| anyhow::anyhow!("watching {}: {e}", dir.display()))?;
    }
    let retries = Retries::new(Arc::clone(&registry), Backoff::default());
    if let Some(dir) = &cfg.manifest_dir {
        sync_manifests(&registry, &retries, dir);
    }

    let node = TcpListener::bind(cfg.node_address)
        .await
        .map_err(|e| anyhow::anyhow!("binding the node address {}: {e}", cfg.node_address))?;
    let admin = TcpListener::bind(cfg.admin_address)
        .await
        .map_err(|e| anyhow::anyhow!("binding the admin address {}: {e}", cfg.admin_address))?;
    tracing::info!(node = %cfg.node_address, admin = %cfg.admin_address, manifest_dir = ?cfg.manifest_dir, "node agent ready");

    let node_task = tokio::spawn(serve(node, Arc::clone(&registry), Api::Node));
    let admin_task = tokio::spawn(serve(admin, Arc::clone(&registry), Api::Admin));
    let events_registry = Arc::clone(&registry);
    let events_retries = Arc::clone(&retries);
    let manifest_dir = cfg.manifest_dir.clone();
    let events_task = tokio::spawn(async move {
        while let Some(path) = events_rx.recv().await {
            match &manifest_dir {
                Some(dir) if path.parent() == Some(dir.as_path()) || path == *dir => {
                    sync_manifests(&events_registry, &events_retries, dir);
                }
                _ => {
                    events_registry.cgroup_changed(&path);
                }
            }
        }
    });

    let cluster_task = match (cfg.cluster, &cfg.node_name) {
        (true, Some(node)) => Some(tokio::spawn(cluster::run(
            Arc::clone(&registry),
            Arc::clone(&retries),
            node.clone(),
            cfg.image_match.clone(),
            cfg.cgroup_root.clone(),
        ))),
        (true, None) => {
            anyhow::bail!("cluster mode needs the node's name (--node-name or NODE_NAME)")
        }
        (false, _) => None,
    };
    let watch_result = match cluster_task {
        Some(task) => tokio::select! {
            () = shutdown_signal() => Ok(()),
            r = task => match r {
                Ok(Ok(())) => Err(anyhow::anyhow!("the pod watch ended")),
                Ok(Err(e)) => Err(e),
                Err(e) => Err(anyhow::anyhow!("the pod watch failed: {e}")),
            },
        },
        None => {
            shutdown_signal().await;
            Ok(())
        }
    };
    tracing::info!("stopping: detaching every pod");
    node_task.abort();
    admin_task.abort();
    events_task.abort();
    registry.clear();
    watch_result
}

async fn shutdown_signal() {
    use tokio::signal::unix::{SignalKind, signal};
    match (
        signal(SignalKind::terminate()),
        signal(SignalKind::interrupt()),
    ) {
        (Ok(mut term), Ok(mut int)) => {
            tokio::select! {
                _ = term.recv() => {}
                _ = int.recv() => {}
            }
        }
        _ => {
            let _ = tokio::signal::ctrl_c().await;
        }
    }
}

/// Makes the manifest-sourced pods match the `*.json` files in `dir`. A pod
/// that fails to attach is retried with backoff ([`Retries`]); a change of its
/// manifest replaces the retry, a removal cancels it.
pub fn sync_manifests(registry: &Registry, retries: &Arc<Retries>, dir: &Path) {
    let desired = read_manifests(dir);
    let current = registry.specs(Source::Manifest);
    for name in retries.pending() {
        if !desired.contains_key(&name) {
            retries.cancel(&name);
        }
    }
    for (name, spec) in &current {
        if desired.get(name) != Some(spec) {
            retries.cancel(name);
            let _ = registry.remove(name);
        }
    }
    for (name, spec) in desired {
        if current.get(&name) == Some(&spec) {
            continue;
        }
        retries.attach(spec, Source::Manifest);
    }
}

fn read_manifests(dir: &Path) -> HashMap<String, PodSpec> {
    let mut specs = HashMap::new();
    let entries = match std::fs::read_dir(dir) {
        Ok(entries) => entries,
        Err(error) => {
            tracing::error!(dir = %dir.display(), %error, "cannot read the manifest directory");
            return specs;
        }
    };
    for entry in entries.flatten() {
        let path = entry.path();
        if path.extension().and_then(|e| e.to_str()) != Some("json") {
            continue;
        }
        match std::fs::read(&path)
            .map_err(|e| e.to_string())
            .and_then(|bytes| PodSpec::parse(&bytes).map_err(|e| e.to_string()))
        {
            Ok(spec) => {
                specs.insert(spec.name.clone(), spec);
            }
            Err(error) => {
                tracing::error!(file = %path.display(), %error, "ignoring an invalid pod manifest");
            }
        }
    }
    specs
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Api {
    Node,
    Admin,
}

async fn serve(listener: TcpListener, registry: Arc<Registry>, api: Api) {
    loop {
        let (stream, peer) = match listener.accept().await {
            Ok(accepted) => accepted,
            Err(error) => {
                tracing::warn!(%error, "accept failed");
                continue;
            }
        };
        let registry = Arc::clone(&registry);
        tokio::spawn(async move {
            let service = hyper::service::service_fn(move |req| {
                let registry = Arc::clone(&registry);
                async move { Ok::<_, Infallible>(handle(req, peer, &registry, api).await) }
            });
            let _ = hyper::server::conn::http1::Builder::new()
                .serve_connection(TokioIo::new(stream), service)
                .await;
        });
    }
}

async fn handle(
    req: Request<Incoming>,
    peer: SocketAddr,
    registry: &Registry,
    api: Api,
) -> Response<Body> {
    let path = req.uri().path().to_owned();
    match (api, req.method(), path.as_str()) {
        (Api::Node, &Method::GET, "/v1/counters") => match registry.counters_for(peer.ip()) {
            Ok(report) => json(StatusCode::OK, &report),
            Err(error) => error_response(&error),
        },
        (Api::Admin, &Method::GET, "/v1/pods") => json(StatusCode::OK, &registry.list()),
        (Api::Admin, &Method::POST, "/v1/pods") => {
            let bytes = match Limited::new(req.into_body(), MAX_BODY).collect().await {
                Ok(collected) => collected.to_bytes(),
                Err(error) => {
                    return text(
                        StatusCode::PAYLOAD_TOO_LARGE,
                        format!("reading the body failed (limit {MAX_BODY} bytes): {error}"),
                    );
                }
            };
            match PodSpec::parse(&bytes)
                .map_err(RegistryError::from)
                .and_then(|spec| registry.add(spec, Source::Api))
            {
                Ok(info) => json(StatusCode::CREATED, &info),
                Err(error) => error_response(&error),
            }
        }
        (Api::Admin, &Method::DELETE, p) if p.starts_with("/v1/pods/") => {
            match registry.remove(&p["/v1/pods/".len()..]) {
                Ok(()) => empty(StatusCode::NO_CONTENT),
                Err(error) => error_response(&error),
            }
        }
        (Api::Admin, &Method::GET, "/healthz") => text(StatusCode::OK, "ok".into()),
        (Api::Node, _, "/v1/counters") | (Api::Admin, _, "/v1/pods") => {
            empty(StatusCode::METHOD_NOT_ALLOWED)
        }
        _ => text(StatusCode::NOT_FOUND, format!("no route for {path}")),
    }
}

fn error_response(error: &RegistryError) -> Response<Body> {
    let status = error.status();
    if status.is_server_error() {
        tracing::error!(%error, "request failed");
    }
    text(status, error.to_string())
}

fn json<T: serde::Serialize>(status: StatusCode, value: &T) -> Response<Body> {
    match serde_json::to_vec(value) {
        Ok(bytes) => response(status, "application/json", Bytes::from(bytes)),
        Err(error) => text(StatusCode::INTERNAL_SERVER_ERROR, error.to_string()),
    }
}

fn text(status: StatusCode, body: String) -> Response<Body> {
    response(
        status,
        "text/plain; charset=utf-8",
        Bytes::from(body + "\n"),
    )
}

fn empty(status: StatusCode) -> Response<Body> {
    let mut response = Response::new(Full::new(Bytes::new()));
    *response.status_mut() = status;
    response
}

fn response(status: StatusCode, content_type: &'static str, body: Bytes) -> Response<Body> {
    let mut response = Response::new(Full::new(body));
    *response.status_mut() = status;
    response.headers_mut().insert(
        header::CONTENT_TYPE,
        header::HeaderValue::from_static(content_type),
    );
    response
}
