//! MQTT to CloudEvents: subscribe, map, deliver to the sink with retries, then acknowledge.
//!
//! At-least-once: a QoS 1/2 message is acknowledged to the broker only after the sink (or the
//! dead-letter sink) answered 2xx, or after it was given up on by policy (non-retryable answer
//! without a dead-letter sink, or --retry exhausted). The session is persistent, so anything
//! unacknowledged when the process stops is redelivered by the broker after restart.

use std::collections::VecDeque;
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, AtomicUsize, Ordering};
use std::time::{Duration, Instant};

use bytes::BytesMut;
use tokio::sync::{Notify, watch};

use crate::adaptive::{self, Adaptive};
use crate::config::{Config, SinkPipeline};
use crate::h1;
use crate::mapping::{self, Disposition, InboundMessage, WrapSettings};
use crate::metrics::Metrics;
use crate::mqtt::{self, ConnSettings, MqttError};
use crate::session::{Incoming, Session};
use crate::sink::{self, Attempt, H1Target, SinkClient, SinkConn, backoff};
use spright_core::cloudevent::CloudEvent;

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
    /// Set while the connection task waits for a worker to finish (saturated or draining);
    /// workers wake it only then, so a message costs no extra wake-up in steady state.
    waiting: AtomicBool,
    idle: Notify,
    /// `Some` with `--sink-pipeline auto` on a plain-HTTP sink.
    adaptive: Option<Adaptive>,
}

impl Pipeline {
    /// Ends a message's delivery: when `done` (the sink's 2xx, or the configured policy), a
    /// QoS 1/2 message's ack goes to the connection task; it leaves the in-flight count.
    fn settle(
        &self,
        acks: &tokio::sync::mpsc::UnboundedSender<AckRef>,
        msg: &InboundMessage,
        ack: AckRef,
        done: bool,
    ) {
        if done && msg.qos > 0 && acks.send(ack).is_err() {
            tracing::warn!(
                "cannot acknowledge: the connection task stopped; the broker will redeliver"
            );
        }
        self.metrics.inflight.dec();
    }

    fn finished(&self) {
        self.active.fetch_sub(1, Ordering::SeqCst);
        if self.waiting.load(Ordering::SeqCst) {
            // A stored permit: no lost wake-up.
            self.idle.notify_one();
        }
    }
}

/// What acknowledges a message: its packet id and QoS on the connection it came from
/// (`conn`); an ack for an earlier connection is dropped (the broker redelivers).
#[derive(Debug, Clone, Copy)]
struct AckRef {
    conn: u64,
    pkid: u16,
    qos: u8,
}

type Job = (InboundMessage, AckRef);

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
    // Fail fast on a broken TLS setup (files are read at startup).
    if let Some(tls) = &settings.tls {
        mqtt::rustls_config(tls)?;
    }
    let h1 = H1Target::parse(&sink_url);
    let auto = h1.is_some() && cfg.sink_pipeline == SinkPipeline::Auto;
    let p = Arc::new(Pipeline {
        adaptive: auto.then(|| Adaptive::new(&metrics)),
        cfg,
        h1,
        sink_url,
        wrap,
        sink,
        metrics,
        active: AtomicUsize::new(0),
        waiting: AtomicBool::new(false),
        idle: Notify::new(),
    });
    tracing::info!(
        broker = %broker.url(),
        client_id = %p.cfg.client_id,
        topics = ?p.cfg.topics,
        qos = p.cfg.qos,
        sink = %p.sink_url,
        sink_pipeline = %p.cfg.sink_pipeline,
        "MQTT source starting"
    );

    let window = usize::from(p.cfg.inflight);
    // `window` long-lived delivery workers share one queue: no task spawned per message, and
    // each worker keeps its own sink connection. Messages waiting in the queue are plain data
    // (a few hundred bytes each); `active` counts queued and in-delivery messages. Workers
    // send acknowledgements back over `acks`; the connection task writes all that are ready
    // in one write.
    let (jobs, queue) = flume::unbounded::<Job>();
    let (ack_tx, mut acks) = tokio::sync::mpsc::unbounded_channel::<AckRef>();
    // Auto: a worker (and connection) per slot of the window, pipelining only while the
    // sink is fast (see crate::adaptive); N > 1: ceil(window / N) workers of depth N.
    if p.h1.is_some() && matches!(p.cfg.sink_pipeline, SinkPipeline::Fixed(2..)) {
        p.metrics.sink_pipelined.set(1);
    }
    let (workers, depth) = match p.cfg.sink_pipeline {
        SinkPipeline::Auto => (window, adaptive::AUTO_DEPTH),
        SinkPipeline::Fixed(n) => (window.div_ceil(usize::from(n)), usize::from(n)),
    };
    match &p.h1 {
        Some(t) if depth > 1 => {
            for index in 0..workers {
                tokio::spawn(pipelined_worker(
                    p.clone(),
                    t.clone(),
                    ack_tx.clone(),
                    queue.clone(),
                    Slot {
                        depth,
                        index,
                        workers,
                    },
                ));
            }
        }
        _ => {
            for _ in 0..window {
                tokio::spawn(worker(p.clone(), ack_tx.clone(), queue.clone()));
            }
        }
    }
    drop(queue);
    drop(ack_tx);
    let mut state = Loop {
        reconnect_delay: Duration::from_millis(100),
        draining_since: None,
        last_error: String::new(),
        conn: 0,
    };
    loop {
        if state.draining_since.is_none() && *shutdown.borrow() {
            state.start_draining(&p);
        }
        if state.drained(&p) {
            break;
        }
        let connected = tokio::select! {
            c = Session::connect(&settings) => c,
            _ = shutdown.changed(), if state.draining_since.is_none() => continue,
            _ = p.idle.notified(), if state.draining_since.is_some() => continue,
        };
        let err = match connected {
            Ok(sess) => {
                state.conn += 1;
                state.reconnect_delay = Duration::from_millis(100);
                state.last_error.clear();
                tracing::info!(
                    session_present = sess.session_present,
                    "connected to the MQTT broker"
                );
                match serve(&p, sess, &mut state, &jobs, &mut acks, &mut shutdown).await {
                    Ok(()) => break,
                    Err(e) => e,
                }
            }
            Err(e) => e,
        };
        p.metrics.set_source_ready(false);
        let text = err.to_string();
        if text != state.last_error {
            if err.is_auth() {
                tracing::error!(error = %text, "MQTT credentials rejected; not ready until the broker accepts them");
            } else {
                tracing::warn!(error = %text, retry_in_ms = state.reconnect_delay.as_millis() as u64, "MQTT connection down, reconnecting");
            }
            state.last_error = text;
        }
        if state.draining_since.is_some() {
            break;
        }
        tokio::select! {
            _ = tokio::time::sleep(state.reconnect_delay) => {}
            _ = shutdown.changed() => {}
        }
        state.reconnect_delay = (state.reconnect_delay * 2).min(Duration::from_secs(5));
    }
    p.metrics.set_source_ready(false);
    tracing::info!("MQTT source stopped");
    Ok(())
}

/// State of the connection task across reconnects.
struct Loop {
    reconnect_delay: Duration,
    draining_since: Option<Instant>,
    last_error: String,
    /// Number of the current connection (acks carry it).
    conn: u64,
}

impl Loop {
    fn start_draining(&mut self, p: &Pipeline) {
        self.draining_since = Some(Instant::now());
        p.waiting.store(true, Ordering::SeqCst);
        tracing::info!(
            inflight = p.active.load(Ordering::Relaxed),
            "draining in-flight deliveries"
        );
    }

    fn drained(&self, p: &Pipeline) -> bool {
        self.draining_since.is_some_and(|since| {
            p.active.load(Ordering::Acquire) == 0 || since.elapsed() > p.cfg.drain_timeout
        })
    }
}

/// Serves one connection: subscribes, reads and dispatches messages, writes acknowledgements
/// in batches and pings. `Ok` after a clean disconnect at the end of a drain.
async fn serve(
    p: &Pipeline,
    mut sess: Session,
    state: &mut Loop,
    jobs: &flume::Sender<Job>,
    acks: &mut tokio::sync::mpsc::UnboundedReceiver<AckRef>,
    shutdown: &mut watch::Receiver<bool>,
) -> Result<(), MqttError> {
    let window = usize::from(p.cfg.inflight);
    let pending_limit = window * 2;
    let keep_alive = p.cfg.keep_alive;
    sess.queue_subscribe(&p.cfg.topics, p.cfg.qos)?;
    sess.flush().await?;
    // Ready once the broker's SUBACK grants every filter (see `decode`), not when the
    // SUBSCRIBE is sent: a message published in between would not be routed to us.
    let mut last_write = Instant::now();
    let mut batch = Vec::with_capacity(256);
    // Decoding stopped at the window with packets still buffered.
    let mut backlog = false;
    loop {
        if state.draining_since.is_none() && *shutdown.borrow() {
            state.start_draining(p);
        }
        if state.drained(p) {
            // Acknowledge what finished, then leave cleanly.
            while let Ok(a) = acks.try_recv() {
                if a.conn == state.conn {
                    sess.queue_ack(a.pkid, a.qos)?;
                }
            }
            sess.queue_disconnect()?;
            let _ = tokio::time::timeout(Duration::from_millis(500), sess.flush()).await;
            return Ok(());
        }
        // Backpressure. Brokers do not reliably bound the unacknowledged messages they push
        // (mosquitto 2.0 was seen to exceed both max_inflight_messages and the v5 receive
        // maximum), so with `pending_limit` messages waiting for the sink the task stops
        // reading from the broker; acknowledgements and pings still go out. While draining,
        // nothing more is read (unacknowledged messages are redelivered to the next session).
        let saturated =
            state.draining_since.is_some() || p.active.load(Ordering::SeqCst) >= pending_limit;
        p.waiting.store(saturated, Ordering::SeqCst);
        // Re-check after announcing the wait: a worker that finished in between saw
        // `waiting` unset and did not notify.
        let saturated = saturated
            && (state.draining_since.is_some() || p.active.load(Ordering::SeqCst) >= pending_limit);
        if !saturated && backlog {
            // Packets left in the buffer when the window filled up.
            backlog = decode(p, &mut sess, state.conn, jobs, pending_limit)?;
            if sess.has_output() {
                sess.flush().await?;
                last_write = Instant::now();
            }
            continue;
        }
        let ping_at = last_write + keep_alive;
        // Biased: ready acknowledgements first, then reads, so that a PINGRESP already in
        // the socket is read before the keep-alive check.
        tokio::select! {
            biased;
            n = acks.recv_many(&mut batch, 256) => {
                if n == 0 {
                    return Err(MqttError::Connection("delivery workers stopped".into()));
                }
                for a in batch.drain(..) {
                    if a.conn == state.conn {
                        sess.queue_ack(a.pkid, a.qos)?;
                    }
                }
                // More may be ready: take them into the same write.
                while let Ok(a) = acks.try_recv() {
                    if a.conn == state.conn {
                        sess.queue_ack(a.pkid, a.qos)?;
                    }
                }
            }
            r = sess.read_more(), if !saturated => {
                r?;
                backlog = decode(p, &mut sess, state.conn, jobs, pending_limit)?;
            }
            _ = p.idle.notified(), if saturated => {}
            _ = tokio::time::sleep_until(ping_at.into()), if !keep_alive.is_zero() => {
                if sess.ping_outstanding && !saturated {
                    return Err(MqttError::Connection("no PINGRESP within the keep-alive interval".into()));
                }
                sess.queue_ping()?;
            }
            _ = shutdown.changed(), if state.draining_since.is_none() => {}
            _ = tokio::time::sleep(p.cfg.drain_timeout), if state.draining_since.is_some() => {}
        }
        if sess.has_output() {
            sess.flush().await?;
            last_write = Instant::now();
        }
    }
}

/// Decodes the packets read so far, stopping (the rest stays buffered) once `pending_limit`
/// messages wait for the sink; `Ok(true)` when it stopped there.
fn decode(
    p: &Pipeline,
    sess: &mut Session,
    conn: u64,
    jobs: &flume::Sender<Job>,
    pending_limit: usize,
) -> Result<bool, MqttError> {
    loop {
        if p.active.load(Ordering::SeqCst) >= pending_limit {
            return Ok(true);
        }
        match sess.next_packet()? {
            None => return Ok(false),
            Some(Incoming::Message(msg)) => dispatch(p, *msg, conn, jobs),
            Some(Incoming::Subscribed) => p.metrics.set_source_ready(true),
            Some(Incoming::SubscribeRefused(reason)) => {
                // Not ready: messages on the refused filters would never arrive.
                tracing::error!(reason = %reason, topics = ?p.cfg.topics, "the broker refused the subscription");
            }
            Some(Incoming::Other | Incoming::PingResp) => {}
        }
    }
}

/// Hands a message to the delivery workers (or drops a QoS 0 message under overload).
fn dispatch(p: &Pipeline, msg: InboundMessage, conn: u64, jobs: &flume::Sender<Job>) {
    p.metrics.received.inc();
    let window = usize::from(p.cfg.inflight);
    // QoS 0 has no broker-side flow control and no redelivery: beyond 10 x the window it is
    // dropped (at-most-once by definition), counted and logged.
    if msg.qos == 0 && p.active.load(Ordering::Relaxed) >= window * 10 {
        p.metrics.failed.inc();
        tracing::warn!(topic = %msg.topic, "QoS 0 message dropped: the sink is not keeping up");
        return;
    }
    let ack = AckRef {
        conn,
        pkid: msg.pkid,
        qos: msg.qos,
    };
    p.active.fetch_add(1, Ordering::SeqCst);
    if jobs.send((msg, ack)).is_err() {
        // Unreachable while the connection task holds `jobs` (workers never stop first);
        // the message stays unacknowledged and is redelivered.
        p.active.fetch_sub(1, Ordering::SeqCst);
    }
}

/// One delivery worker: takes messages from the shared queue until it closes.
async fn worker(
    p: Arc<Pipeline>,
    acks: tokio::sync::mpsc::UnboundedSender<AckRef>,
    queue: flume::Receiver<Job>,
) {
    let mut conn = SinkConn::default();
    while let Ok((msg, ack)) = queue.recv_async().await {
        deliver_and_ack(&p, &acks, &mut conn, msg, ack).await;
        p.finished();
    }
}

async fn deliver_and_ack(
    p: &Pipeline,
    acks: &tokio::sync::mpsc::UnboundedSender<AckRef>,
    conn: &mut SinkConn,
    msg: InboundMessage,
    ack: AckRef,
) {
    p.metrics.inflight.inc();
    let disposition =
        mapping::dispose(&msg, &p.wrap, p.cfg.invalid_policy, p.cfg.max_message_bytes);
    let done = match disposition {
        Disposition::Sink(mut ev) => {
            mapping::apply_overrides(&mut ev, &p.cfg.ce_overrides);
            deliver(p, conn, ev, &msg.topic, None).await
        }
        Disposition::DeadLetter(mut ev, reason) => {
            p.metrics.invalid.inc();
            mapping::apply_overrides(&mut ev, &p.cfg.ce_overrides);
            tracing::warn!(topic = %msg.topic, id = %ev.id(), reason = %reason, policy = "dead-letter", "MQTT message not delivered to the sink");
            dead_letter(p, ev, &reason).await
        }
    };
    // Only now, after the sink's 2xx (or the configured policy), is the ack handed over.
    p.settle(acks, &msg, ack, done);
}

/// A request written on a pipelined connection and not answered yet.
struct Outstanding {
    msg: InboundMessage,
    ack: AckRef,
    ev: CloudEvent,
    sent_at: Instant,
}

/// Where a pipelined worker stands: the depth of a pipelined connection, and the worker's
/// place among the others (for the adaptive rule).
#[derive(Debug, Clone, Copy)]
struct Slot {
    depth: usize,
    index: usize,
    workers: usize,
}

/// One pipelined sink connection (`--sink-pipeline` > 1 or auto): takes up to `depth` messages from
/// the shared queue, writes their requests together (one write for all that were queued) and
/// takes the answers off the connection in order, while it keeps taking new messages as
/// answers free room. A 2xx acknowledges the message as on the plain path. Anything else
/// leaves the pipeline: a message whose answer says retry, reject or dead-letter, or that was
/// written on a connection that failed, timed out or closed before its answer, continues on
/// its own in [`deliver`] (with backoff when the sink answered, at once when it never did), so
/// one failing event does not hold up the others and nothing unanswered is acknowledged.
/// In auto mode the depth follows [`adaptive::worker_depth`]: one request while the sink
/// looks slow, `depth` or none (the worker waits for the mode to change) while it is fast.
async fn pipelined_worker(
    p: Arc<Pipeline>,
    t: H1Target,
    acks: tokio::sync::mpsc::UnboundedSender<AckRef>,
    queue: flume::Receiver<Job>,
    slot: Slot,
) {
    use tokio::io::{AsyncReadExt, AsyncWriteExt};
    let mut stream: Option<tokio::net::TcpStream> = None;
    let mut sent: VecDeque<Outstanding> = VecDeque::new();
    let mut out = Vec::new();
    let mut buf = BytesMut::new();
    let mut open = true;
    let mut mode = p.adaptive.as_ref().map(Adaptive::subscribe);
    // When the last answer on this connection came (answer-time samples).
    let mut last_answer = Instant::now();
    loop {
        let depth = match mode.as_mut() {
            Some(m) => {
                let pipelined = *m.borrow_and_update();
                adaptive::worker_depth(slot.index, slot.workers, slot.depth, pipelined)
            }
            None => slot.depth,
        };
        if depth == 0 && sent.is_empty() {
            // Not needed while the sink is fast: wait for the mode to change.
            let Some(m) = mode.as_mut() else { return };
            if !open || m.changed().await.is_err() {
                return;
            }
            continue;
        }
        // Take what is queued, up to the depth, without waiting.
        while open && sent.len() < depth {
            match queue.try_recv() {
                Ok(job) => take_job(&p, &t, &acks, job, &mut sent, &mut out),
                Err(flume::TryRecvError::Empty) => break,
                Err(flume::TryRecvError::Disconnected) => open = false,
            }
        }
        if sent.is_empty() {
            if !open {
                return;
            }
            match queue.recv_async().await {
                Ok(job) => take_job(&p, &t, &acks, job, &mut sent, &mut out),
                Err(_) => open = false,
            }
            continue;
        }
        // Invariant: without a connection, nothing in `sent` was written yet.
        if !out.is_empty() {
            if stream.is_none() {
                match SinkConn::open(&t).await {
                    Ok(s) => {
                        buf.clear();
                        stream = Some(s);
                    }
                    Err(e) => {
                        out.clear();
                        let why = Attempt::Retry(format!("sink request failed: {e}"));
                        leave_pipeline(&p, &acks, &mut sent, Some(why));
                        continue;
                    }
                }
            }
            if let Some(s) = stream.as_mut()
                && s.write_all(&out).await.is_err()
            {
                // Unanswered: sent again on their own (at worst a duplicate).
                stream = None;
                leave_pipeline(&p, &acks, &mut sent, None);
            }
            out.clear();
            continue;
        }
        let (Some(s), Some(oldest)) = (stream.as_mut(), sent.front()) else {
            continue;
        };
        let deadline = oldest.sent_at + p.sink.timeout();
        tokio::select! {
            biased;
            r = s.read_buf(&mut buf) => {
                let lost = match r {
                    Ok(n) if n > 0 => take_answers(&p, &acks, &mut sent, &mut buf, &mut last_answer),
                    _ => Err(None),
                };
                if let Err(why) = lost {
                    stream = None;
                    leave_pipeline(&p, &acks, &mut sent, why);
                }
            }
            job = queue.recv_async(), if open && sent.len() < depth => match job {
                Ok(job) => take_job(&p, &t, &acks, job, &mut sent, &mut out),
                Err(_) => open = false,
            },
            _ = tokio::time::sleep_until(deadline.into()) => {
                stream = None;
                let why = Attempt::Retry(format!(
                    "sink request timed out after {} s",
                    p.sink.timeout().as_secs()
                ));
                leave_pipeline(&p, &acks, &mut sent, Some(why));
            }
        }
    }
}

/// Maps a message for a pipelined connection and appends its request to `out`; a message for
/// the dead-letter sink goes its own way at once.
fn take_job(
    p: &Arc<Pipeline>,
    t: &H1Target,
    acks: &tokio::sync::mpsc::UnboundedSender<AckRef>,
    (msg, ack): Job,
    sent: &mut VecDeque<Outstanding>,
    out: &mut Vec<u8>,
) {
    match mapping::dispose(&msg, &p.wrap, p.cfg.invalid_policy, p.cfg.max_message_bytes) {
        Disposition::Sink(mut ev) => {
            p.metrics.inflight.inc();
            mapping::apply_overrides(&mut ev, &p.cfg.ce_overrides);
            p.sink.append_h1(out, t, &ev);
            sent.push_back(Outstanding {
                msg,
                ack,
                ev,
                sent_at: Instant::now(),
            });
        }
        Disposition::DeadLetter(..) => {
            let (p, acks) = (p.clone(), acks.clone());
            tokio::spawn(async move {
                deliver_and_ack(&p, &acks, &mut SinkConn::default(), msg, ack).await;
                p.finished();
            });
        }
    }
}

/// Takes the complete answers off `buf`, in request order. `Err` when the connection cannot
/// carry more: with the outcome for the requests still unanswered (`None`: send them again).
fn take_answers(
    p: &Arc<Pipeline>,
    acks: &tokio::sync::mpsc::UnboundedSender<AckRef>,
    sent: &mut VecDeque<Outstanding>,
    buf: &mut BytesMut,
    last_answer: &mut Instant,
) -> Result<(), Option<Attempt>> {
    let now = Instant::now();
    loop {
        let framed = match h1::frame_response(buf) {
            Ok(Some(f)) => f,
            Ok(None) => return Ok(()),
            Err(e) => {
                return Err(Some(Attempt::Retry(format!("sink request failed: {e}"))));
            }
        };
        let _ = buf.split_to(framed.len);
        // An answer without a request is not HTTP/1.1 this client can follow.
        let Some(o) = sent.pop_front() else {
            return Err(None);
        };
        p.metrics
            .sink_latency
            .observe(now.duration_since(o.sent_at).as_secs_f64());
        if let Some(a) = &p.adaptive {
            // Whether it waited behind another request on this connection.
            let behind = *last_answer > o.sent_at;
            let since = now.duration_since(o.sent_at.max(*last_answer));
            let in_flight = p
                .active
                .load(Ordering::Relaxed)
                .min(usize::from(p.cfg.inflight));
            a.observe(adaptive::sample_ns(since, behind, in_flight));
        }
        *last_answer = now;
        let status = http::StatusCode::from_u16(framed.status).ok();
        match status.map(|s| sink::classify(s, framed.body)) {
            Some(Attempt::Accepted(_)) => {
                p.metrics.delivered.inc();
                p.settle(acks, &o.msg, o.ack, true);
                p.finished();
            }
            Some(other) => on_its_own(p, acks, o, Some(other)),
            None => {
                let why = Attempt::Retry(format!("bad status {}", framed.status));
                on_its_own(p, acks, o, Some(why));
            }
        }
        if framed.close {
            buf.clear();
            return Err(None);
        }
    }
}

/// Every unanswered request of a pipelined connection continues on its own.
fn leave_pipeline(
    p: &Arc<Pipeline>,
    acks: &tokio::sync::mpsc::UnboundedSender<AckRef>,
    sent: &mut VecDeque<Outstanding>,
    why: Option<Attempt>,
) {
    for o in sent.drain(..) {
        on_its_own(p, acks, o, why.clone());
    }
}

/// Delivers one message that left a pipelined connection, with retries on its own connection,
/// then acknowledges it as the plain path does.
fn on_its_own(
    p: &Arc<Pipeline>,
    acks: &tokio::sync::mpsc::UnboundedSender<AckRef>,
    o: Outstanding,
    first: Option<Attempt>,
) {
    let (p, acks) = (p.clone(), acks.clone());
    tokio::spawn(async move {
        let Outstanding { msg, ack, ev, .. } = o;
        let done = deliver(&p, &mut SinkConn::default(), ev, &msg.topic, first).await;
        p.settle(&acks, &msg, ack, done);
        p.finished();
    });
}

/// Delivers with retries; returns true when the message may be acknowledged. `first` is the
/// outcome of an attempt already made (on a pipelined connection), if any.
async fn deliver(
    p: &Pipeline,
    conn: &mut SinkConn,
    ev: CloudEvent,
    topic: &str,
    mut first: Option<Attempt>,
) -> bool {
    let mut attempt: u32 = 0;
    loop {
        let result = match first.take() {
            Some(a) => a,
            None => {
                let start = Instant::now();
                let result = match &p.h1 {
                    Some(t) => p.sink.post_h1(conn, t, &ev).await,
                    None => p.sink.post(&p.sink_url, &ev).await,
                };
                p.metrics
                    .sink_latency
                    .observe(start.elapsed().as_secs_f64());
                result
            }
        };
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
