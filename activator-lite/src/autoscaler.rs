//! The durable websocket to the autoscaler (knative/pkg `websocket/connection.go`,
//! `pkg/activator/stat_reporter.go`): binary `WireStatMessages` frames, reconnect with
//! 100 ms × 1.3 backoff, a ping every 3.3 s, dead after 10 s without a pong. Readiness
//! follows the connection. Stats produced while disconnected are dropped, as Knative does.

use std::sync::Arc;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::time::Duration;

use futures::{SinkExt, StreamExt};
use prost::Message as _;
use tokio::sync::mpsc;
use tokio::time::Instant;
use tokio_tungstenite::tungstenite::Message;

use crate::proto::WireStatMessages;

pub const PING_PERIOD: Duration = Duration::from_millis(3300);
pub const PONG_TIMEOUT: Duration = Duration::from_secs(10);
const BACKOFF_START: Duration = Duration::from_millis(100);
const BACKOFF_FACTOR: f64 = 1.3;
/// 100 ms × 1.3^19, the last of Knative's 20 steps; retries continue at this spacing.
const BACKOFF_MAX: Duration = Duration::from_millis(14_619);

/// Connection state shared with the health handler and metrics.
#[derive(Debug, Default)]
pub struct LinkStatus {
    connected: AtomicBool,
    errors: AtomicU64,
}

impl LinkStatus {
    pub fn connected(&self) -> bool {
        self.connected.load(Ordering::Acquire)
    }
    pub fn errors(&self) -> u64 {
        self.errors.load(Ordering::Relaxed)
    }
    fn set(&self, up: bool) {
        self.connected.store(up, Ordering::Release);
    }
    fn error(&self) {
        self.errors.fetch_add(1, Ordering::Relaxed);
    }
}

fn next_backoff(d: Duration) -> Duration {
    d.mul_f64(BACKOFF_FACTOR).min(BACKOFF_MAX)
}

/// Runs forever: connects, forwards stats, reconnects.
pub async fn run(
    url: String,
    mut stats: mpsc::UnboundedReceiver<WireStatMessages>,
    status: Arc<LinkStatus>,
) {
    let mut backoff = BACKOFF_START;
    loop {
        let connect = tokio_tungstenite::connect_async(url.as_str());
        tokio::pin!(connect);
        let ws = loop {
            tokio::select! {
                r = &mut connect => break r,
                m = stats.recv() => {
                    if m.is_none() {
                        return;
                    }
                    tracing::debug!("autoscaler not connected, stat dropped");
                }
            }
        };
        let mut ws = match ws {
            Ok((ws, _)) => ws,
            Err(e) => {
                status.error();
                tracing::warn!(error = %e, url = %url, retry_in_ms = backoff.as_millis() as u64, "autoscaler connection failed");
                let sleep = tokio::time::sleep(backoff);
                tokio::pin!(sleep);
                loop {
                    tokio::select! {
                        _ = &mut sleep => break,
                        m = stats.recv() => if m.is_none() { return },
                    }
                }
                backoff = next_backoff(backoff);
                continue;
            }
        };
        backoff = BACKOFF_START;
        status.set(true);
        tracing::info!(url = %url, "connected to the autoscaler");
        let mut ping = tokio::time::interval_at(Instant::now() + PING_PERIOD, PING_PERIOD);
        let mut last_pong = Instant::now();
        let reason: String = loop {
            tokio::select! {
                m = stats.recv() => {
                    let Some(m) = m else {
                        let _ = ws.close(None).await;
                        status.set(false);
                        return;
                    };
                    if let Err(e) = ws.send(Message::Binary(m.encode_to_vec().into())).await {
                        break format!("send failed: {e}");
                    }
                }
                _ = ping.tick() => {
                    if last_pong.elapsed() > PONG_TIMEOUT {
                        break "no pong within 10s".into();
                    }
                    if let Err(e) = ws.send(Message::Ping(Vec::new().into())).await {
                        break format!("ping failed: {e}");
                    }
                }
                frame = ws.next() => match frame {
                    None => break "closed".into(),
                    Some(Err(e)) => break format!("read failed: {e}"),
                    Some(Ok(Message::Close(c))) => break format!("closed by autoscaler: {c:?}"),
                    Some(Ok(_)) => last_pong = Instant::now(),
                }
            }
        };
        status.set(false);
        status.error();
        tracing::warn!(reason = %reason, "autoscaler connection lost, reconnecting");
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn backoff_grows_and_caps() {
        let mut d = BACKOFF_START;
        let mut steps = vec![d];
        for _ in 0..30 {
            d = next_backoff(d);
            steps.push(d);
        }
        assert_eq!(steps[1], Duration::from_millis(130));
        assert_eq!(*steps.last().unwrap(), BACKOFF_MAX);
    }
}
