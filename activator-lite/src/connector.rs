//! The connector of the hyper path's HTTP/1.1 client. A pod may answer before it has read
//! the request body (rejecting an upload) and close the connection; sending the rest of the
//! body then fails (broken pipe, reset) although the pod's answer is already on its way.
//! Go's transport, Knative's activator's, relays that answer. Here a write that fails
//! because the pod went away is taken as written (the rest of the body is discarded) so
//! that hyper goes on reading: the pod's answer reaches the client when there is one, and
//! the read fails (502) when there is none.

use std::future::Future;
use std::io;
use std::pin::Pin;
use std::task::{Context, Poll};

use hyper::Uri;
use hyper::rt::{Read, ReadBufCursor, Write};
use hyper_util::client::legacy::connect::{Connected, Connection, HttpConnector};
use hyper_util::rt::TokioIo;
use tokio::net::TcpStream;

/// [`HttpConnector`] whose streams are [`PodStream`]s.
#[derive(Debug, Clone)]
pub struct PodConnector(pub HttpConnector);

impl tower_service::Service<Uri> for PodConnector {
    type Response = PodStream;
    type Error = <HttpConnector as tower_service::Service<Uri>>::Error;
    type Future = Pin<Box<dyn Future<Output = Result<PodStream, Self::Error>> + Send>>;

    fn poll_ready(&mut self, cx: &mut Context<'_>) -> Poll<Result<(), Self::Error>> {
        self.0.poll_ready(cx)
    }

    fn call(&mut self, dst: Uri) -> Self::Future {
        let connecting = self.0.call(dst);
        Box::pin(async move {
            Ok(PodStream {
                io: connecting.await?,
                write_failed: false,
            })
        })
    }
}

/// A connection to a pod that swallows writes once the pod has gone away.
#[derive(Debug)]
pub struct PodStream {
    io: TokioIo<TcpStream>,
    write_failed: bool,
}

/// Write errors that mean the pod closed the connection (its answer may still be readable).
fn pod_gone(e: &io::Error) -> bool {
    matches!(
        e.kind(),
        io::ErrorKind::BrokenPipe
            | io::ErrorKind::ConnectionReset
            | io::ErrorKind::ConnectionAborted
    )
}

impl PodStream {
    /// `r` of a write or flush; a failure because the pod is gone turns into `ok`.
    fn absorb<T>(&mut self, r: Poll<io::Result<T>>, ok: T) -> Poll<io::Result<T>> {
        match r {
            Poll::Ready(Err(e)) if pod_gone(&e) => {
                tracing::debug!(error = %e, "the pod stopped reading; reading its answer");
                self.write_failed = true;
                Poll::Ready(Ok(ok))
            }
            r => r,
        }
    }
}

impl Connection for PodStream {
    fn connected(&self) -> Connected {
        self.io.connected()
    }
}

impl Read for PodStream {
    fn poll_read(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: ReadBufCursor<'_>,
    ) -> Poll<io::Result<()>> {
        Pin::new(&mut self.io).poll_read(cx, buf)
    }
}

impl Write for PodStream {
    fn poll_write(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &[u8],
    ) -> Poll<io::Result<usize>> {
        if self.write_failed {
            return Poll::Ready(Ok(buf.len()));
        }
        let r = Pin::new(&mut self.io).poll_write(cx, buf);
        self.absorb(r, buf.len())
    }

    fn poll_write_vectored(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        bufs: &[io::IoSlice<'_>],
    ) -> Poll<io::Result<usize>> {
        let len = bufs.iter().map(|b| b.len()).sum();
        if self.write_failed {
            return Poll::Ready(Ok(len));
        }
        let r = Pin::new(&mut self.io).poll_write_vectored(cx, bufs);
        self.absorb(r, len)
    }

    fn is_write_vectored(&self) -> bool {
        self.io.is_write_vectored()
    }

    fn poll_flush(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        if self.write_failed {
            return Poll::Ready(Ok(()));
        }
        let r = Pin::new(&mut self.io).poll_flush(cx);
        self.absorb(r, ())
    }

    fn poll_shutdown(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        if self.write_failed {
            return Poll::Ready(Ok(()));
        }
        Pin::new(&mut self.io).poll_shutdown(cx)
    }
}
