//! The sample binaries' small HTTP/1.1 server and plain answers.

use std::convert::Infallible;
use std::future::Future;
use std::net::SocketAddr;

use anyhow::Context;
use bytes::Bytes;
use http_body_util::Full;
use hyper::body::Incoming;
use hyper::{Request, Response, StatusCode};
use hyper_util::rt::TokioIo;

/// A complete answer.
pub type Answer = Response<Full<Bytes>>;

/// An answer with `status` and `body`.
pub fn answer(status: StatusCode, body: impl Into<Bytes>) -> Answer {
    let mut r = Response::new(Full::new(body.into()));
    *r.status_mut() = status;
    r
}

/// Serves HTTP/1.1 on `listen` with `handle`, on a runtime with one worker thread, until an
/// accept fails. `what` names the server in the start-up log line.
pub fn serve<F, Fut>(what: &str, listen: &str, handle: F) -> anyhow::Result<()>
where
    F: Fn(Request<Incoming>) -> Fut + Clone + Send + 'static,
    Fut: Future<Output = Result<Answer, Infallible>> + Send + 'static,
{
    let addr: SocketAddr = listen
        .parse()
        .with_context(|| format!("listen address {listen:?}"))?;
    let rt = tokio::runtime::Builder::new_multi_thread()
        .worker_threads(1)
        .enable_all()
        .build()?;
    rt.block_on(async move {
        let listener = tokio::net::TcpListener::bind(addr)
            .await
            .with_context(|| format!("binding {addr}"))?;
        tracing::info!(listen = %addr, "{what} listening");
        loop {
            let (stream, _) = listener.accept().await?;
            let _ = stream.set_nodelay(true);
            let handle = handle.clone();
            tokio::spawn(async move {
                let _ = hyper::server::conn::http1::Builder::new()
                    .serve_connection(TokioIo::new(stream), hyper::service::service_fn(handle))
                    .await;
            });
        }
    })
}
