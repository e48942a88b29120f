//! Shared by the sample binaries: a small HTTP/1.1 server and plain answers. A directory
//! without `main.rs`, so Cargo does not take it for a binary of its own.

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

/// Serves HTTP/1.1 on `listen` with `handle`, on a single-threaded runtime, until an accept
/// fails. `what` names the server in the start-up log line.
pub fn serve<F, Fut>(what: &str, listen: &str, handle: F) -> anyhow::Result<()>
where
    F: Fn(Request<Incoming>) -> Fut + Clone + Send + 'static,
    Fut: Future<Output = Result<Answer, Infallible>> + Send + 'static,
{
    let addr: SocketAddr = listen
        .parse()
        .with_context(|| format!("listen address {listen:?}"))?;
    let rt = tokio::runtime::Builder::new_current_thread()
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

/// `count` pseudo-random inputs of up to `max_len` bytes drawn from `alphabet` (xorshift),
/// for the binaries' random-input tests.
#[cfg(test)]
pub fn random_inputs(alphabet: &[u8], count: usize, max_len: usize) -> Vec<Vec<u8>> {
    let mut x: u64 = 0x9e37_79b9_7f4a_7c15;
    (0..count)
        .map(|i| {
            (0..i % (max_len + 1))
                .map(|_| {
                    x ^= x << 13;
                    x ^= x >> 7;
                    x ^= x << 17;
                    alphabet[(x % alphabet.len() as u64) as usize]
                })
                .collect()
        })
        .collect()
}
