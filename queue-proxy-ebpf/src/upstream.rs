//! HTTP/1.1 connections to the user container: a stack of idle keep-alive connections, each
//! driven by its own hyper connection task.
//!
//! hyper-util's pooled client spawns a task per request to put a connection back once the
//! response body is read, hashes a pool key and resolves the address on blocking threads.
//! Here a connection rides with its response body ([`UpstreamBody`]) and goes back on the
//! stack when that body ends, which costs no task and no wake-up. The most recently used
//! connection is taken first.

use std::net::SocketAddr;
use std::pin::Pin;
use std::sync::{Arc, Mutex, MutexGuard, PoisonError};
use std::task::{Context, Poll};
use std::time::{Duration, Instant};

use bytes::Bytes;
use http::{Request, Response};
use http_body::{Body as HttpBody, Frame, SizeHint};
use hyper::body::Incoming;
use hyper::client::conn::http1;
use hyper_util::rt::TokioIo;

/// Connections idle for longer are closed when next seen (Go's `IdleConnTimeout`).
const IDLE_TIMEOUT: Duration = Duration::from_secs(90);

#[derive(Debug, thiserror::Error)]
pub enum SendError {
    #[error("dial tcp {0}: connect: connection refused")]
    Connect(SocketAddr),
    #[error(transparent)]
    Http(#[from] hyper::Error),
}

struct Idle {
    sender: http1::SendRequest<Incoming>,
    since: Instant,
}

pub struct H1Pool {
    addr: SocketAddr,
    max_idle: usize,
    idle: Mutex<Vec<Idle>>,
}

impl std::fmt::Debug for H1Pool {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("H1Pool")
            .field("addr", &self.addr)
            .field("max_idle", &self.max_idle)
            .finish_non_exhaustive()
    }
}

impl H1Pool {
    pub fn new(addr: SocketAddr, max_idle: usize) -> Arc<Self> {
        Arc::new(Self {
            addr,
            max_idle,
            idle: Mutex::new(Vec::new()),
        })
    }

    fn lock(&self) -> MutexGuard<'_, Vec<Idle>> {
        self.idle.lock().unwrap_or_else(PoisonError::into_inner)
    }

    fn checkout(&self) -> Option<http1::SendRequest<Incoming>> {
        let mut idle = self.lock();
        while let Some(c) = idle.pop() {
            if c.since.elapsed() > IDLE_TIMEOUT {
                // Everything below is older still.
                idle.clear();
                return None;
            }
            if !c.sender.is_closed() {
                return Some(c.sender);
            }
        }
        None
    }

    fn checkin(&self, sender: http1::SendRequest<Incoming>) {
        if sender.is_closed() || self.max_idle == 0 {
            return;
        }
        let mut idle = self.lock();
        if idle.len() >= self.max_idle {
            idle.remove(0);
        }
        idle.push(Idle {
            sender,
            since: Instant::now(),
        });
    }

    async fn connect(&self) -> Result<http1::SendRequest<Incoming>, SendError> {
        let stream = tokio::net::TcpStream::connect(self.addr)
            .await
            .map_err(|_| SendError::Connect(self.addr))?;
        let _ = stream.set_nodelay(true);
        let (sender, conn) = http1::Builder::new()
            .max_headers(crate::server::MAX_HEADERS)
            .max_buf_size(crate::server::MAX_HEADER_BYTES)
            .handshake(TokioIo::new(stream))
            .await?;
        tokio::spawn(async move {
            if let Err(e) = conn.with_upgrades().await {
                tracing::debug!(error = %e, "connection to the user container ended");
            }
        });
        Ok(sender)
    }

    /// Sends `req` on an idle connection or a new one. A request that an idle connection
    /// could not take (it closed meanwhile) is sent again on another.
    pub async fn send(
        self: &Arc<Self>,
        mut req: Request<Incoming>,
    ) -> Result<(Response<Incoming>, http1::SendRequest<Incoming>), SendError> {
        loop {
            let (mut sender, reused) = match self.checkout() {
                Some(s) => (s, true),
                None => (self.connect().await?, false),
            };
            // A connection goes back when its last body ended; its task may not have
            // seen that yet.
            if let Err(e) = sender.ready().await {
                if reused {
                    continue;
                }
                return Err(e.into());
            }
            match sender.try_send_request(req).await {
                Ok(res) => return Ok((res, sender)),
                Err(mut e) => match e.take_message() {
                    Some(r) if reused => req = r,
                    _ => return Err(e.into_error().into()),
                },
            }
        }
    }
}

/// A response body from the user container; an HTTP/1 connection goes back to its pool
/// once the body has ended.
pub struct UpstreamBody {
    inner: Incoming,
    conn: Option<(Arc<H1Pool>, http1::SendRequest<Incoming>)>,
}

impl UpstreamBody {
    /// A body whose connection is not pooled (HTTP/2, upgrades).
    pub fn unpooled(inner: Incoming) -> Self {
        Self { inner, conn: None }
    }

    pub fn pooled(
        inner: Incoming,
        pool: Arc<H1Pool>,
        sender: http1::SendRequest<Incoming>,
    ) -> Self {
        Self {
            inner,
            conn: Some((pool, sender)),
        }
    }

    fn release(&mut self) {
        if let Some((pool, sender)) = self.conn.take() {
            pool.checkin(sender);
        }
    }
}

impl HttpBody for UpstreamBody {
    type Data = Bytes;
    type Error = hyper::Error;

    fn poll_frame(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
    ) -> Poll<Option<Result<Frame<Bytes>, hyper::Error>>> {
        let r = Pin::new(&mut self.inner).poll_frame(cx);
        match &r {
            Poll::Ready(None) => self.release(),
            // A broken exchange leaves the connection unusable.
            Poll::Ready(Some(Err(_))) => self.conn = None,
            _ => {}
        }
        r
    }

    fn is_end_stream(&self) -> bool {
        self.inner.is_end_stream()
    }

    fn size_hint(&self) -> SizeHint {
        self.inner.size_hint()
    }
}

impl Drop for UpstreamBody {
    fn drop(&mut self) {
        // A body dropped before its end leaves the connection mid-response: not reused.
        if self.inner.is_end_stream() {
            self.release();
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use http_body_util::BodyExt;
    use tokio::io::{AsyncReadExt, AsyncWriteExt};

    /// A user container answering every request on a connection with `body`, counting
    /// the connections it accepted.
    async fn upstream(body: &'static str) -> (SocketAddr, Arc<std::sync::atomic::AtomicUsize>) {
        let l = tokio::net::TcpListener::bind("127.0.0.1:0")
            .await
            .expect("bind");
        let addr = l.local_addr().expect("addr");
        let conns = Arc::new(std::sync::atomic::AtomicUsize::new(0));
        let c = Arc::clone(&conns);
        tokio::spawn(async move {
            while let Ok((mut s, _)) = l.accept().await {
                c.fetch_add(1, std::sync::atomic::Ordering::SeqCst);
                tokio::spawn(async move {
                    let mut buf = vec![0u8; 4096];
                    let mut have = Vec::new();
                    loop {
                        let Ok(n) = s.read(&mut buf).await else {
                            return;
                        };
                        if n == 0 {
                            return;
                        }
                        have.extend_from_slice(&buf[..n]);
                        while let Some(i) = have.windows(4).position(|w| w == b"\r\n\r\n") {
                            have.drain(..i + 4);
                            let res = format!(
                                "HTTP/1.1 200 OK\r\ncontent-length: {}\r\n\r\n{body}",
                                body.len()
                            );
                            if s.write_all(res.as_bytes()).await.is_err() {
                                return;
                            }
                        }
                    }
                });
            }
        });
        (addr, conns)
    }

    #[tokio::test]
    async fn connections_are_reused_after_the_body_ends() {
        let (addr, conns) = upstream("hello").await;
        let pool = H1Pool::new(addr, 10);
        // Requests with an `Incoming` body need a hyper server in front: relay through one.
        let l = tokio::net::TcpListener::bind("127.0.0.1:0")
            .await
            .expect("bind");
        let front = l.local_addr().expect("addr");
        let p = Arc::clone(&pool);
        tokio::spawn(async move {
            while let Ok((s, _)) = l.accept().await {
                let p = Arc::clone(&p);
                tokio::spawn(async move {
                    let svc = hyper::service::service_fn(move |req: Request<Incoming>| {
                        let p = Arc::clone(&p);
                        async move {
                            let (res, sender) = p.send(req).await?;
                            Ok::<_, SendError>(res.map(|b| UpstreamBody::pooled(b, p, sender)))
                        }
                    });
                    let _ = hyper::server::conn::http1::Builder::new()
                        .serve_connection(TokioIo::new(s), svc)
                        .await;
                });
            }
        });
        let s = tokio::net::TcpStream::connect(front)
            .await
            .expect("connect");
        let (mut send, conn) = http1::handshake::<_, http_body_util::Empty<Bytes>>(TokioIo::new(s))
            .await
            .expect("handshake");
        tokio::spawn(conn);
        for _ in 0..5 {
            send.ready().await.expect("ready");
            let req = Request::builder()
                .uri("/")
                .header("host", "x")
                .body(http_body_util::Empty::new())
                .expect("request");
            let res = send.send_request(req).await.expect("response");
            let body = res.into_body().collect().await.expect("body").to_bytes();
            assert_eq!(body, "hello");
        }
        assert_eq!(conns.load(std::sync::atomic::Ordering::SeqCst), 1);
        assert_eq!(pool.lock().len(), 1);
    }

    #[tokio::test]
    async fn refused_connection_is_named() {
        let l = std::net::TcpListener::bind("127.0.0.1:0").expect("bind");
        let addr = l.local_addr().expect("addr");
        drop(l);
        let pool = H1Pool::new(addr, 1);
        let e = pool.connect().await.expect_err("refused");
        assert_eq!(
            e.to_string(),
            format!("dial tcp {addr}: connect: connection refused")
        );
    }
}
