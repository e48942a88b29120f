//! The three revision timeouts (serving `pkg/http/handler/timeout.go`).
//!
//! Before the response starts: the earliest of total, response-start and idle deadlines gives
//! a 504 `request timeout`. Once it has started, the total deadline and the idle timer (reset
//! by every chunk) still apply: Knative then writes `request timeout` into the body and ends
//! the response; [`TimedBody`] does the same. The body also carries the request's guards
//! (accounting, breaker slot, ...) so they are released when the response is done.

use std::future::Future;
use std::pin::Pin;
use std::sync::Arc;
use std::task::{Context, Poll};
use std::time::Duration;

use bytes::Bytes;
use http::{Response, StatusCode};
use http_body::{Body as HttpBody, Frame, SizeHint};
use tokio::time::Instant;

use crate::body::{self, BoxError};
use crate::timer::{Sleep, Timers};

/// Knative's timeout message.
pub const MESSAGE: &str = "request timeout";

#[derive(Debug, Clone, Copy)]
pub struct Timeouts {
    pub total: Duration,
    pub response_start: Option<Duration>,
    pub idle: Option<Duration>,
}

impl Timeouts {
    /// When a request started at `start` times out if no response has started.
    pub fn before_start(&self, start: Instant) -> Instant {
        let mut d = start + self.total;
        for t in [self.response_start, self.idle].into_iter().flatten() {
            d = d.min(start + t);
        }
        d
    }
}

pub fn gateway_timeout() -> Response<body::Body> {
    body::text(StatusCode::GATEWAY_TIMEOUT, MESSAGE)
}

/// A response body under the total and idle deadlines, holding `G` until it ends.
pub struct TimedBody<B, G> {
    inner: B,
    total: Sleep,
    idle: Option<(Duration, Sleep)>,
    guard: Option<G>,
    state: State,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum State {
    Streaming,
    TimedOut,
    Done,
}

impl<B, G> TimedBody<B, G> {
    pub fn new(
        inner: B,
        total_deadline: Instant,
        idle: Option<Duration>,
        guard: G,
        timers: &Arc<Timers>,
    ) -> Self {
        Self {
            inner,
            total: timers.sleep_until(total_deadline),
            idle: idle.map(|d| (d, timers.sleep(d))),
            guard: Some(guard),
            state: State::Streaming,
        }
    }
}

impl<B, G> HttpBody for TimedBody<B, G>
where
    B: HttpBody<Data = Bytes> + Unpin,
    B::Error: Into<BoxError>,
    G: Unpin,
{
    type Data = Bytes;
    type Error = BoxError;

    fn poll_frame(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
    ) -> Poll<Option<Result<Frame<Bytes>, BoxError>>> {
        let this = self.get_mut();
        match this.state {
            State::Done => return Poll::Ready(None),
            State::TimedOut => {
                this.state = State::Done;
                return Poll::Ready(None);
            }
            State::Streaming => {}
        }
        match Pin::new(&mut this.inner).poll_frame(cx) {
            Poll::Ready(Some(Ok(frame))) => {
                if let Some((d, sleep)) = this.idle.as_mut() {
                    sleep.reset(Instant::now() + *d);
                }
                return Poll::Ready(Some(Ok(frame)));
            }
            Poll::Ready(Some(Err(e))) => {
                this.state = State::Done;
                this.guard.take();
                return Poll::Ready(Some(Err(e.into())));
            }
            Poll::Ready(None) => {
                this.state = State::Done;
                this.guard.take();
                return Poll::Ready(None);
            }
            Poll::Pending => {}
        }
        let idle_fired = this
            .idle
            .as_mut()
            .is_some_and(|(_, s)| Pin::new(s).poll(cx).is_ready());
        if Pin::new(&mut this.total).poll(cx).is_ready() || idle_fired {
            this.state = State::TimedOut;
            this.guard.take();
            return Poll::Ready(Some(Ok(Frame::data(Bytes::from_static(
                MESSAGE.as_bytes(),
            )))));
        }
        Poll::Pending
    }

    fn is_end_stream(&self) -> bool {
        self.state == State::Done
    }

    fn size_hint(&self) -> SizeHint {
        if self.state == State::Streaming {
            self.inner.size_hint()
        } else {
            SizeHint::with_exact(0)
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use http_body_util::{BodyExt, StreamBody};

    #[test]
    fn earliest_deadline_before_start() {
        let t = Timeouts {
            total: Duration::from_secs(10),
            response_start: Some(Duration::from_secs(3)),
            idle: Some(Duration::from_secs(5)),
        };
        let s = Instant::now();
        assert_eq!(t.before_start(s), s + Duration::from_secs(3));
    }

    #[tokio::test(start_paused = true)]
    async fn idle_timeout_appends_message() {
        let (tx, rx) = tokio::sync::mpsc::channel::<Result<Frame<Bytes>, BoxError>>(4);
        let stream = StreamBody::new(tokio_stream_from(rx));
        let timers = Timers::start();
        let mut b = TimedBody::new(
            stream,
            Instant::now() + Duration::from_secs(100),
            Some(Duration::from_secs(2)),
            (),
            &timers,
        );
        tx.send(Ok(Frame::data(Bytes::from_static(b"a"))))
            .await
            .expect("send");
        let f = b.frame().await.expect("frame").expect("ok");
        assert_eq!(f.into_data().ok(), Some(Bytes::from_static(b"a")));
        let f = b.frame().await.expect("frame").expect("ok");
        assert_eq!(
            f.into_data().ok(),
            Some(Bytes::from_static(b"request timeout"))
        );
        assert!(b.frame().await.is_none());
        drop(tx);
    }

    fn tokio_stream_from<T: Send + 'static>(
        mut rx: tokio::sync::mpsc::Receiver<T>,
    ) -> impl futures::Stream<Item = T> + Unpin {
        Box::pin(futures::stream::poll_fn(move |cx| rx.poll_recv(cx)))
    }
}
