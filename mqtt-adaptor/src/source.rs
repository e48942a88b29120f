//! MQTT to CloudEvents: subscribe, map, deliver to the sink with retries, then acknowledge.
//!
//! At-least-once: a QoS 1/2 message is acknowledged to the broker only after the sink (or the
//! dead-letter sink) answered 2xx, or after it was given up on by policy (non-retryable answer
//! without a dead-letter sink, or --retry exhausted). The session is persistent, so anything
//! unacknowledged when the process stops is redelivered by the broker after restart.

use std::sync::Arc;
use std::sync::atomic::{AtomicBool, AtomicI64, AtomicUsize, Ordering};
use std::time::{Duration, Instant};

use tokio::sync::{Notify, watch};

use crate::cloudevent::CloudEvent;
use crate::config::Config;
use crate::mapping::{self, Disposition, InboundMessage, WrapSettings};
use crate::metrics::Metrics;
use crate::mqtt::{self, AckToken, Client, ConnSettings, MqttEvent};
use crate::sink::{Attempt, H1Target, SinkClient, SinkConn, backoff};

/// Shared state of the delivery workers.
#[derive(Debug)]
struct Pipeline {
    cfg: Config,
    sink_url: String,
    /// `Some` for a plain-HTTP sink: workers use their own keep-alive connection.
    h1: Option<H1Target>,
    wrap: WrapSettings,
    sink: SinkClient,
    metrics: Arc<Metrics>,
    /// Messages handed to the workers and not finished (queued or being delivered).
    active: AtomicUsize,
    /// Acknowledgements queued to the event loop and not yet written (may dip below 0 briefly).
    acks_pending: AtomicI64,
    /// Set while the event-loop task waits for a worker to finish (saturated or draining);
    /// workers wake it only then, so a message costs no extra wake-up in steady state.
    waiting: AtomicBool,
    idle: Notify,
}

impl Pipeline {
    fn finished(&self) {
        self.active.fetch_sub(1, Ordering::SeqCst);
        if self.waiting.load(Ordering::SeqCst) {
            // A stored permit: no lost wake-up.
            self.idle.notify_one();
        }
    }
}

type Job = (InboundMessage, AckToken);

/// Runs the source until `shutdown` turns true, then drains in-flight deliveries.
pub async fn run(
    cfg: Config,
    sink_url: String,
    metrics: Arc<Metrics>,
    mut shutdown: watch::Receiver<bool>,
) -> anyhow::Result<()> {
    let sink = SinkClient::new(
        cfg.sink_format,
        cfg.sink_timeout,
        cfg.ca_certs.as_deref(),
        cfg.oidc_token_file.clone(),
        usize::from(cfg.inflight),
    )?;
    let broker = cfg.effective_broker();
    let wrap = WrapSettings {
        client_id: cfg.client_id.clone(),
        broker_url: broker.url(),
        event_source: cfg.event_source.clone(),
        event_type: cfg.event_type.clone(),
        data_content_type: cfg.data_content_type.clone(),
    };
    let settings = ConnSettings::from_config(&cfg, cfg.client_id.clone(), true);
    let (client, mut eventloop) = mqtt::connect(&settings)?;
    let p = Arc::new(Pipeline {
        cfg,
        h1: H1Target::parse(&sink_url),
        sink_url,
        wrap,
        sink,
        metrics,
        active: AtomicUsize::new(0),
        acks_pending: AtomicI64::new(0),
        waiting: AtomicBool::new(false),
        idle: Notify::new(),
    });
    tracing::info!(
        broker = %broker.url(),
        client_id = %p.cfg.client_id,
        topics = ?p.cfg.topics,
        qos = p.cfg.qos,
        sink = %p.sink_url,
        "MQTT source starting"
    );

    let window = usize::from(p.cfg.inflight);
    let pending_limit = window * 2;
    // `window` long-lived delivery workers share one queue: no task spawned per message, and
    // each worker keeps its own sink connection. Messages waiting in the queue are plain data
    // (a few hundred bytes each); `active` counts queued and in-delivery messages.
    let (jobs, queue) = flume::unbounded::<Job>();
    for _ in 0..window {
        tokio::spawn(worker(p.clone(), client.clone(), queue.clone()));
    }
    drop(queue);
    let mut reconnect_delay = Duration::from_millis(100);
    let mut draining_since: Option<Instant> = None;
    let mut last_error = String::new();
    loop {
        if draining_since.is_none() && *shutdown.borrow() {
            draining_since = Some(Instant::now());
            p.waiting.store(true, Ordering::SeqCst);
            tracing::info!(
                inflight = p.active.load(Ordering::Relaxed),
                "draining in-flight deliveries"
            );
        }
        if let Some(since) = draining_since
            && (p.active.load(Ordering::Acquire) == 0 || since.elapsed() > p.cfg.drain_timeout)
        {
            break;
        }
        // Backpressure. Brokers do not reliably bound the unacknowledged messages they push
        // (mosquitto 2.0 was seen to exceed both max_inflight_messages and the v5 receive
        // maximum), so with `pending_limit` messages waiting for the sink the loop stops
        // reading from the broker. It keeps polling while acknowledgements are queued (rumqttc
        // writes them only from its event loop) and reads once per half keep-alive interval
        // to keep the connection alive (at most 10 packets per read).
        let saturated = || {
            draining_since.is_none()
                && p.active.load(Ordering::SeqCst) >= pending_limit
                && p.acks_pending.load(Ordering::SeqCst) <= 0
        };
        let event = if saturated() {
            p.waiting.store(true, Ordering::SeqCst);
            // Re-check after announcing the wait: a worker that finished in between saw
            // `waiting` unset and did not notify.
            if !saturated() {
                p.waiting.store(false, Ordering::SeqCst);
                continue;
            }
            let ev = tokio::select! {
                _ = p.idle.notified() => None,
                _ = shutdown.changed() => None,
                _ = tokio::time::sleep(p.cfg.keep_alive / 2) => Some(eventloop.poll().await),
            };
            p.waiting.store(false, Ordering::SeqCst);
            match ev {
                Some(ev) => ev,
                None => continue,
            }
        } else {
            tokio::select! {
                ev = eventloop.poll() => ev,
                _ = shutdown.changed(), if draining_since.is_none() => continue,
                _ = p.idle.notified(), if draining_since.is_some() => continue,
                _ = tokio::time::sleep(p.cfg.drain_timeout), if draining_since.is_some() => continue,
            }
        };
        match event {
            Ok(MqttEvent::Connected { session_present }) => {
                reconnect_delay = Duration::from_millis(100);
                last_error.clear();
                tracing::info!(session_present, "connected to the MQTT broker");
                if let Err(e) = client.try_subscribe(&p.cfg.topics, p.cfg.qos) {
                    tracing::error!(error = %e, "cannot queue the subscription");
                }
                p.metrics.set_source_ready(true);
            }
            Ok(MqttEvent::Message(boxed)) => {
                let (msg, token) = *boxed;
                p.metrics.received.inc();
                if draining_since.is_some() {
                    // Not acknowledged: the broker redelivers it to the next session.
                    continue;
                }
                // QoS 0 has no broker-side flow control and no redelivery: beyond 10 x the
                // window it is dropped (at-most-once by definition), counted and logged.
                if msg.qos == 0 && p.active.load(Ordering::Relaxed) >= window * 10 {
                    p.metrics.failed.inc();
                    tracing::warn!(topic = %msg.topic, "QoS 0 message dropped: the sink is not keeping up");
                    continue;
                }
                p.active.fetch_add(1, Ordering::SeqCst);
                if jobs.send((msg, token)).is_err() {
                    // Unreachable while this loop holds `jobs` (workers never stop first);
                    // the message stays unacknowledged and is redelivered.
                    p.active.fetch_sub(1, Ordering::SeqCst);
                }
            }
            Ok(MqttEvent::AckFlushed) => {
                p.acks_pending.fetch_sub(1, Ordering::AcqRel);
            }
            Ok(_) => {}
            Err(e) => {
                p.metrics.set_source_ready(false);
                let text = e.to_string();
                if text != last_error {
                    if e.is_auth() {
                        tracing::error!(error = %text, "MQTT credentials rejected; not ready until the broker accepts them");
                    } else {
                        tracing::warn!(error = %text, retry_in_ms = reconnect_delay.as_millis() as u64, "MQTT connection down, reconnecting");
                    }
                    last_error = text;
                }
                if draining_since.is_some() {
                    break;
                }
                tokio::select! {
                    _ = tokio::time::sleep(reconnect_delay) => {}
                    _ = shutdown.changed() => {}
                }
                reconnect_delay = (reconnect_delay * 2).min(Duration::from_secs(5));
            }
        }
    }
    p.metrics.set_source_ready(false);
    client.disconnect().await;
    // Let the DISCONNECT go out.
    let _ = tokio::time::timeout(Duration::from_millis(500), async {
        loop {
            if eventloop.poll().await.is_err() {
                break;
            }
        }
    })
    .await;
    tracing::info!("MQTT source stopped");
    Ok(())
}

/// One delivery worker: takes messages from the shared queue until it closes.
async fn worker(p: Arc<Pipeline>, client: Client, queue: flume::Receiver<Job>) {
    let mut conn = SinkConn::default();
    while let Ok((msg, token)) = queue.recv_async().await {
        deliver_and_ack(&p, &client, &mut conn, msg, token).await;
        p.finished();
    }
}

async fn deliver_and_ack(
    p: &Pipeline,
    client: &Client,
    conn: &mut SinkConn,
    msg: InboundMessage,
    token: AckToken,
) {
    p.metrics.inflight.inc();
    let disposition =
        mapping::dispose(&msg, &p.wrap, p.cfg.invalid_policy, p.cfg.max_message_bytes);
    let done = match disposition {
        Disposition::Sink(mut ev) => {
            mapping::apply_overrides(&mut ev, &p.cfg.ce_overrides);
            deliver(p, conn, ev, &msg.topic).await
        }
        Disposition::DeadLetter(mut ev, reason) => {
            p.metrics.invalid.inc();
            mapping::apply_overrides(&mut ev, &p.cfg.ce_overrides);
            tracing::warn!(topic = %msg.topic, id = %ev.id(), reason = %reason, policy = "dead-letter", "MQTT message not delivered to the sink");
            dead_letter(p, ev, &reason).await
        }
    };
    if done && msg.qos > 0 {
        match client.ack(&token).await {
            Ok(()) => {
                p.acks_pending.fetch_add(1, Ordering::AcqRel);
            }
            Err(e) => {
                tracing::warn!(error = %e, "cannot acknowledge; the broker will redeliver")
            }
        }
    }
    p.metrics.inflight.dec();
}

/// Delivers with retries; returns true when the message may be acknowledged.
async fn deliver(p: &Pipeline, conn: &mut SinkConn, ev: CloudEvent, topic: &str) -> bool {
    let mut attempt: u32 = 0;
    loop {
        let start = Instant::now();
        let result = match &p.h1 {
            Some(t) => p.sink.post_h1(conn, t, &ev).await,
            None => p.sink.post(&p.sink_url, &ev).await,
        };
        p.metrics
            .sink_latency
            .observe(start.elapsed().as_secs_f64());
        match result {
            Attempt::Accepted(_) => {
                p.metrics.delivered.inc();
                return true;
            }
            Attempt::Retry(reason) => {
                if p.cfg.retry > 0 && attempt >= p.cfg.retry {
                    tracing::error!(id = %ev.id(), topic, reason = %reason, attempts = attempt + 1, "retries exhausted");
                    return dead_letter(p, ev, &reason).await;
                }
                let delay = backoff(p.cfg.retry_backoff, p.cfg.retry_backoff_max, attempt);
                if attempt == 0 || attempt.is_power_of_two() {
                    tracing::warn!(id = %ev.id(), topic, reason = %reason, attempt = attempt + 1, retry_in_ms = delay.as_millis() as u64, "sink delivery failed, retrying");
                }
                p.metrics.retried.inc();
                tokio::time::sleep(delay).await;
                attempt = attempt.saturating_add(1);
            }
            Attempt::Reject(status, body) => {
                tracing::error!(id = %ev.id(), topic, status = status.as_u16(), body = %body, "sink rejected the event (not retryable)");
                let mut ev = ev;
                ev.set("knativeerrorcode", status.as_u16().to_string());
                return dead_letter(p, ev, &format!("sink answered {status}")).await;
            }
        }
    }
}

/// Sends to the dead-letter sink with retries, or gives up (counted and logged) without one.
async fn dead_letter(p: &Pipeline, mut ev: CloudEvent, reason: &str) -> bool {
    let Some(dls) = p.cfg.dead_letter_sink.as_deref() else {
        p.metrics.failed.inc();
        tracing::error!(id = %ev.id(), reason, "event dropped: no dead-letter sink configured");
        return true;
    };
    ev.set("knativeerrordest", p.sink_url.clone());
    let mut attempt: u32 = 0;
    loop {
        match p.sink.post(dls, &ev).await {
            Attempt::Accepted(_) => {
                p.metrics.dead_lettered.inc();
                return true;
            }
            Attempt::Retry(r) if p.cfg.retry == 0 || attempt < p.cfg.retry => {
                if attempt == 0 {
                    tracing::warn!(id = %ev.id(), reason = %r, "dead-letter sink failed, retrying");
                }
                p.metrics.retried.inc();
                tokio::time::sleep(backoff(
                    p.cfg.retry_backoff,
                    p.cfg.retry_backoff_max,
                    attempt,
                ))
                .await;
                attempt = attempt.saturating_add(1);
            }
            other => {
                p.metrics.failed.inc();
                tracing::error!(id = %ev.id(), result = ?other, "dead-letter sink refused the event; dropped");
                return true;
            }
        }
    }
}
