//! Content sniffing on the hyper path: Knative's server adds the `Content-Type` Go sniffs
//! ([`spright_core::sniff::detect`]) to every response that has a body and none of its own,
//! including proxied ones; [`Prepended`] puts the first body frame, read to sniff it, back
//! in front of the rest.

use std::pin::Pin;
use std::task::{Context, Poll};

use bytes::Bytes;
use http_body::{Body as HttpBody, Frame, SizeHint};

/// A body with one frame put back in front.
pub struct Prepended<B> {
    first: Option<Frame<Bytes>>,
    inner: B,
}

impl<B> Prepended<B> {
    pub fn new(first: Option<Frame<Bytes>>, inner: B) -> Self {
        Self { first, inner }
    }
}

impl<B: HttpBody<Data = Bytes> + Unpin> HttpBody for Prepended<B> {
    type Data = Bytes;
    type Error = B::Error;

    fn poll_frame(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
    ) -> Poll<Option<Result<Frame<Bytes>, B::Error>>> {
        if let Some(f) = self.first.take() {
            return Poll::Ready(Some(Ok(f)));
        }
        Pin::new(&mut self.inner).poll_frame(cx)
    }

    fn is_end_stream(&self) -> bool {
        self.first.is_none() && self.inner.is_end_stream()
    }

    fn size_hint(&self) -> SizeHint {
        let h = self.inner.size_hint();
        let n = self
            .first
            .as_ref()
            .and_then(|f| f.data_ref())
            .map_or(0, |d| d.len() as u64);
        let mut out = SizeHint::new();
        if let Some(u) = h.upper() {
            out.set_upper(u.saturating_add(n));
        }
        out.set_lower(h.lower().saturating_add(n));
        out
    }
}
