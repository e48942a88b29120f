//! CloudEvents to MQTT: publish and learn when the broker acknowledged.
//!
//! rumqttc assigns packet ids inside its event loop and reports `Outgoing::Publish(pkid)` in
//! request order, so waiters are queued in the order requests are queued (under one lock) and
//! bound to their packet id when that event arrives. PUBACK (QoS 1) or PUBCOMP (QoS 2)
//! completes them. After a reconnect rumqttc resends unacknowledged publishes with their old
//! packet ids; those `Outgoing::Publish` events match an already-bound id and are ignored.

use std::collections::{HashMap, VecDeque};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use tokio::sync::{oneshot, watch};

use crate::config::Config;
use crate::mapping::Outbound;
use crate::metrics::Metrics;
use crate::mqtt::{self, Client, ConnSettings, MqttError, MqttEvent};

type Waiter = oneshot::Sender<Result<(), String>>;

#[derive(Debug, Default)]
struct Waiters {
    queued: VecDeque<(u8, Waiter)>,
    bound: HashMap<u16, Waiter>,
    collided: Option<(u16, Waiter)>,
}

/// Handle used by the HTTP receiver.
#[derive(Debug, Clone)]
pub struct Publisher {
    client: Client,
    waiters: Arc<Mutex<Waiters>>,
    metrics: Arc<Metrics>,
}

#[derive(Debug, thiserror::Error)]
pub enum PublishError {
    #[error("not connected to the MQTT broker")]
    NotConnected,
    #[error("publish queue full")]
    Busy,
    #[error("the broker did not acknowledge in time")]
    Timeout,
    #[error("the broker refused the publish: {0}")]
    Refused(String),
}

impl Publisher {
    /// Publishes and waits for the broker's acknowledgement (QoS 0: until written).
    pub async fn publish(
        &self,
        out: &Outbound,
        qos: u8,
        timeout: Duration,
    ) -> Result<(), PublishError> {
        if !self.metrics.publisher_ready() {
            return Err(PublishError::NotConnected);
        }
        let (tx, rx) = oneshot::channel();
        {
            let mut w = self.waiters.lock().unwrap_or_else(|p| p.into_inner());
            if let Err(e) = self.client.try_publish(out, qos) {
                tracing::warn!(error = %e, "cannot queue the publish");
                return Err(PublishError::Busy);
            }
            w.queued.push_back((qos, tx));
        }
        match tokio::time::timeout(timeout, rx).await {
            Ok(Ok(Ok(()))) => Ok(()),
            Ok(Ok(Err(reason))) => Err(PublishError::Refused(reason)),
            Ok(Err(_)) | Err(_) => Err(PublishError::Timeout),
        }
    }
}

fn complete(w: &mut Waiters, pkid: u16, result: Result<(), String>) {
    if let Some(tx) = w.bound.remove(&pkid) {
        let _ = tx.send(result);
    }
    if w.collided.as_ref().is_some_and(|(id, _)| *id == pkid)
        && let Some((id, tx)) = w.collided.take()
    {
        w.bound.insert(id, tx);
    }
}

/// Starts the publishing connection; its event loop runs until `shutdown`.
pub fn start(
    cfg: &Config,
    metrics: Arc<Metrics>,
    mut shutdown: watch::Receiver<bool>,
) -> Result<(Publisher, tokio::task::JoinHandle<()>), MqttError> {
    let settings = ConnSettings::from_config(cfg, format!("{}-publisher", cfg.client_id), false);
    let (client, mut eventloop) = mqtt::connect(&settings)?;
    let waiters = Arc::new(Mutex::new(Waiters::default()));
    let publisher = Publisher {
        client: client.clone(),
        waiters: waiters.clone(),
        metrics: metrics.clone(),
    };
    let task = tokio::spawn(async move {
        let mut delay = Duration::from_millis(100);
        let mut last_error = String::new();
        loop {
            let ev = tokio::select! {
                ev = eventloop.poll() => ev,
                _ = shutdown.changed() => break,
            };
            match ev {
                Ok(MqttEvent::Connected { .. }) => {
                    delay = Duration::from_millis(100);
                    last_error.clear();
                    metrics.set_publisher_ready(true);
                    tracing::info!("publisher connected to the MQTT broker");
                }
                Ok(MqttEvent::OutgoingPublish(pkid)) => {
                    let mut w = waiters.lock().unwrap_or_else(|p| p.into_inner());
                    if pkid != 0 && w.bound.contains_key(&pkid) {
                        continue; // a resend after reconnect
                    }
                    if let Some((qos, tx)) = w.queued.pop_front() {
                        if qos == 0 {
                            let _ = tx.send(Ok(()));
                        } else {
                            w.bound.insert(pkid, tx);
                        }
                    }
                }
                Ok(MqttEvent::AwaitAck(pkid)) => {
                    let mut w = waiters.lock().unwrap_or_else(|p| p.into_inner());
                    if let Some((_, tx)) = w.queued.pop_front() {
                        w.collided = Some((pkid, tx));
                    }
                }
                Ok(MqttEvent::PubAck(pkid, res)) => {
                    let mut w = waiters.lock().unwrap_or_else(|p| p.into_inner());
                    complete(&mut w, pkid, res);
                }
                Ok(MqttEvent::PubRecFailed(pkid, reason)) => {
                    let mut w = waiters.lock().unwrap_or_else(|p| p.into_inner());
                    complete(&mut w, pkid, Err(reason));
                }
                Ok(MqttEvent::PubComp(pkid)) => {
                    let mut w = waiters.lock().unwrap_or_else(|p| p.into_inner());
                    complete(&mut w, pkid, Ok(()));
                }
                Ok(_) => {}
                Err(e) => {
                    metrics.set_publisher_ready(false);
                    let text = e.to_string();
                    if text != last_error {
                        tracing::warn!(error = %text, "publisher MQTT connection down, reconnecting");
                        last_error = text;
                    }
                    tokio::select! {
                        _ = tokio::time::sleep(delay) => {}
                        _ = shutdown.changed() => break,
                    }
                    delay = (delay * 2).min(Duration::from_secs(5));
                }
            }
        }
        metrics.set_publisher_ready(false);
        client.disconnect().await;
        let _ = tokio::time::timeout(Duration::from_millis(300), async {
            while eventloop.poll().await.is_ok() {}
        })
        .await;
    });
    Ok((publisher, task))
}
