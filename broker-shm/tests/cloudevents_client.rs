//! End-to-end cases with a real CloudEvents client (the `cloudevents-sdk` crate): events are
//! built with its EventBuilderV10/V03, sent with its reqwest binding in binary and structured
//! mode, and what subscribers receive is decoded with its HTTP binding. Every case runs against
//! two black boxes, from the Broker's address to the subscribers: broker-shm in native mode
//! (class SprightBroker) and Knative's own MT broker topology (ingress -> in-memory channel ->
//! filter -> subscriber, knative-broker-oracle), each set up from the same `BrokerDesc`.

mod common;

use base64::Engine as _;
use cloudevents::binding::http::{Builder, Serializer, to_event};
use cloudevents::binding::reqwest::{RequestBuilderExt, RequestSerializer};
use cloudevents::message::{BinaryDeserializer, StructuredDeserializer};
use cloudevents::{AttributesReader, Data, Event, EventBuilder, EventBuilderV03, EventBuilderV10};
use common::*;
use std::collections::BTreeMap;
use std::time::Duration;

const WAIT: Duration = Duration::from_secs(15);

#[derive(Debug, Clone, Copy)]
enum Mode {
    Binary,
    Structured,
}

/// Sends `ev` to `url` with the SDK's reqwest binding; the HTTP status.
async fn send(url: &str, ev: Event, mode: Mode) -> u16 {
    try_send(url, ev, mode).await.expect("send")
}

/// Like `send`, with a transport error as `Err`.
async fn try_send(url: &str, ev: Event, mode: Mode) -> Result<u16, String> {
    let req = reqwest::Client::new().post(url);
    let req = match mode {
        Mode::Binary => req.event(ev),
        Mode::Structured => {
            StructuredDeserializer::deserialize_structured(ev, RequestSerializer::new(req))
        }
    }
    .expect("SDK serialises the event");
    let resp = tokio::time::timeout(Duration::from_secs(10), req.send())
        .await
        .map_err(|_| "send timed out".to_string())?
        .map_err(|e| format!("{e:?}"))?;
    Ok(resp.status().as_u16())
}

/// Decodes what a subscriber received with the SDK's HTTP binding.
fn decode(r: &Received) -> Event {
    to_event(&r.headers, r.body.to_vec()).unwrap_or_else(|e| {
        panic!(
            "subscriber got no CloudEvent ({e}): {:?} {:?}",
            r.headers, r.body
        )
    })
}

/// A subscriber's answer carrying `ev` in binary mode, written by the SDK's HTTP serializer.
struct ReplyBuilder(Reply);

impl Builder<Reply> for ReplyBuilder {
    fn header(&mut self, key: &str, value: http::HeaderValue) {
        let v = value.to_str().expect("ascii header").to_string();
        self.0.headers.push((key.to_string(), v));
    }
    fn body(&mut self, bytes: Vec<u8>) -> cloudevents::message::Result<Reply> {
        self.0.body = bytes.into();
        Ok(self.0.clone())
    }
    fn finish(&mut self) -> cloudevents::message::Result<Reply> {
        Ok(self.0.clone())
    }
}

fn reply_with(ev: Event) -> Reply {
    BinaryDeserializer::deserialize_binary(ev, Serializer::new(ReplyBuilder(Reply::status(200))))
        .expect("SDK serialises the reply")
}

/// The same in structured mode.
fn structured_reply_with(ev: Event) -> Reply {
    StructuredDeserializer::deserialize_structured(
        ev,
        Serializer::new(ReplyBuilder(Reply::status(200))),
    )
    .expect("SDK serialises the reply")
}

/// Context attributes and extensions of `ev` as text, minus `skip`.
fn attributes(ev: &Event, skip: &[&str]) -> BTreeMap<String, String> {
    let mut m: BTreeMap<String, String> = ev
        .iter_attributes()
        .map(|(k, v)| (k.to_string(), v.to_string()))
        .collect();
    m.extend(
        ev.iter_extensions()
            .map(|(k, v)| (k.to_string(), v.to_string())),
    );
    m.retain(|k, _| !skip.contains(&k.as_str()));
    m
}

/// The data as a JSON value when the content type is JSON, else as bytes.
fn data_view(ev: &Event) -> Option<Result<serde_json::Value, Vec<u8>>> {
    let bytes = match ev.data()? {
        Data::Binary(b) => b.clone(),
        Data::String(s) => s.clone().into_bytes(),
        Data::Json(v) => serde_json::to_vec(v).expect("json"),
    };
    let json = ev.datacontenttype().is_some_and(|ct| ct.contains("json"));
    Some(match json {
        true => serde_json::from_slice(&bytes).map_err(|_| bytes),
        false => Err(bytes),
    })
}

/// Asserts that `got` carries every attribute, extension and the data of `sent`, and the
/// Knative extensions every broker adds on the way: knativearrivaltime present (RFC 3339),
/// knativebrokerttl gone (the filter strips it before delivery, C.3).
fn assert_intact(sent: &Event, got: &Event) {
    let knative = ["knativearrivaltime", "knativebrokerttl"];
    assert_eq!(
        attributes(got, &knative),
        attributes(sent, &knative),
        "attributes of {}",
        sent.id()
    );
    assert_eq!(data_view(got), data_view(sent), "data of {}", sent.id());
    let arrival = got
        .extension("knativearrivaltime")
        .unwrap_or_else(|| panic!("no knativearrivaltime on {}", sent.id()))
        .to_string();
    assert!(
        chrono::DateTime::parse_from_rfc3339(&arrival).is_ok(),
        "knativearrivaltime {arrival:?}"
    );
    assert!(
        got.extension("knativebrokerttl").is_none(),
        "knativebrokerttl reached the subscriber of {}",
        sent.id()
    );
}

fn trigger(
    name: &str,
    ty: &str,
    subscriber: String,
    delivery: Option<DeliveryDesc>,
) -> TriggerDesc {
    TriggerDesc {
        name: name.into(),
        filters: vec![format!("exact: {{type: {ty}}}")],
        subscriber,
        delivery,
    }
}

/// A Broker with an explicit delivery (no retries) so neither side falls back to defaults.
fn broker(ns: &str, triggers: Vec<TriggerDesc>) -> BrokerDesc {
    BrokerDesc {
        ns: ns.into(),
        name: "default".into(),
        delivery: Some(DeliveryDesc {
            retry: Some(0),
            ..DeliveryDesc::default()
        }),
        triggers,
        async_channel: false,
    }
}

/// Linear retries PT0.05S apart, optionally ending in `dls`.
fn quick_retries(retry: u32, dls: Option<String>) -> Option<DeliveryDesc> {
    Some(DeliveryDesc {
        retry: Some(retry),
        backoff_policy: Some("linear"),
        backoff_delay: Some("PT0.05S"),
        dead_letter_sink: dls,
        format: None,
        timeout: None,
    })
}

/// One event per spec version x mode x kind of data, each with subject, time, schema and
/// string, integer and boolean extensions.
fn event_matrix(ty: &str) -> Vec<(Event, Mode)> {
    let datas: [(&str, &str, Data); 3] = [
        (
            "json",
            "application/json",
            serde_json::json!({"hello": "world", "n": 1, "nested": {"ok": true}}).into(),
        ),
        ("text", "text/plain", "plain text, with punctuation!".into()),
        (
            "bin",
            "application/octet-stream",
            vec![0u8, 1, 2, 0x7f, 0x80, 0xfe, 0xff].into(),
        ),
    ];
    let mut out = vec![];
    for spec in ["1.0", "0.3"] {
        for mode in [Mode::Binary, Mode::Structured] {
            for (kind, ct, data) in &datas {
                let id = format!("{spec}-{mode:?}-{kind}");
                let schema = "https://example.com/schemas/client.json";
                macro_rules! build {
                    ($b:expr) => {
                        $b.id(id.clone())
                            .source("/client/source")
                            .ty(ty)
                            .subject("subject-1")
                            .time("2026-11-30T10:00:00.123Z")
                            .extension("comexamplestr", "ext-value")
                            .extension("comexampleint", 42i64)
                            .extension("comexamplebool", true)
                            .data_with_schema(*ct, schema, data.clone())
                            .build()
                            .expect("valid event")
                    };
                }
                let ev = match spec {
                    "1.0" => build!(EventBuilderV10::new()),
                    _ => build!(EventBuilderV03::new()),
                };
                out.push((ev, mode));
            }
        }
    }
    out
}

/// Every event of the matrix reaches the matching Trigger's subscriber intact; the Trigger for
/// another type gets nothing.
async fn attributes_case(imp: Impl) {
    let sub = Recorder::start().await;
    let desc = broker(
        "ceattrs",
        vec![
            trigger("match", "client.attrs", sub.url("/match"), None),
            trigger("other", "client.other", sub.url("/other"), None),
        ],
    );
    let mut bk = EndToEnd::start(imp, &desc).await;
    let url = bk.broker_url(&desc);
    let events: Vec<(Event, Mode)> = event_matrix("client.attrs")
        .into_iter()
        .filter(|(e, _)| e.id() != V03_BASE64_ROW)
        .collect();
    for (ev, mode) in &events {
        let status = send(&url, ev.clone(), *mode).await;
        assert_eq!(status, 202, "{} {mode:?}: {}", ev.id(), bk.logs());
    }
    let got = sub.wait_n("/match", events.len(), WAIT).await;
    assert_eq!(got.len(), events.len(), "{}", bk.logs());
    for (sent, _) in &events {
        let hits: Vec<Event> = got
            .iter()
            .map(decode)
            .filter(|e| e.id() == sent.id())
            .collect();
        assert_eq!(hits.len(), 1, "deliveries of {}", sent.id());
        assert_intact(sent, &hits[0]);
    }
    for r in &got {
        // Binary mode by default, a sender that takes replies, the Trigger's namespace (C.3).
        assert!(r.headers.contains_key("ce-id"), "{:?}", r.headers);
        assert_eq!(r.headers["prefer"], "reply");
        assert_eq!(r.headers["kn-namespace"], "ceattrs");
    }
    assert!(
        sub.on("/other").is_empty(),
        "non-matching Trigger got events"
    );
    bk.assert_alive();
}

differential!(attributes_case: attributes_intact_broker_shm, attributes_intact_knative);

/// The matrix row that differs: a 0.3 structured event whose binary data the SDK writes as
/// base64 `data` with `datacontentencoding: base64`.
const V03_BASE64_ROW: &str = "0.3-Structured-bin";

/// Knative decodes the base64 data of a 0.3 structured event and delivers the bytes in binary
/// mode without `datacontentencoding` (sdk-go v2.16.1 event/event_unmarshal.go reads it into the
/// 0.3 context and decodes the data; binding/spec/spec.go's 0.3 attribute set, which the binary
/// writer walks, has no datacontentencoding). broker-shm used to deliver the decoded bytes
/// with a `ce-datacontentencoding: base64` header (a 0.3 receiver would decode them again);
/// it drops the attribute once the data is bytes since 46c88bf (row k5 of dropin.rs).
async fn v03_base64_case(imp: Impl) {
    let sub = Recorder::start().await;
    let desc = broker(
        "ce03b64",
        vec![trigger("match", "client.attrs", sub.url("/match"), None)],
    );
    let mut bk = EndToEnd::start(imp, &desc).await;
    let (sent, mode) = event_matrix("client.attrs")
        .into_iter()
        .find(|(e, _)| e.id() == V03_BASE64_ROW)
        .expect("row");
    assert_eq!(send(&bk.broker_url(&desc), sent.clone(), mode).await, 202);
    let got = sub.wait_n("/match", 1, WAIT).await;
    assert_eq!(got.len(), 1, "{}", bk.logs());
    assert!(got[0].headers.get("ce-datacontentencoding").is_none());
    assert_eq!(&got[0].body[..], &[0u8, 1, 2, 0x7f, 0x80, 0xfe, 0xff]);
    assert_intact(&sent, &decode(&got[0]));
    bk.assert_alive();
}

differential!(v03_base64_case: v03_structured_base64_data_broker_shm, v03_structured_base64_data_knative);

/// A subscriber's reply event re-enters the broker and reaches the next Trigger's subscriber
/// intact (a 1.0 reply in binary mode, a 0.3 reply in structured mode).
async fn reply_chain_case(imp: Impl) {
    macro_rules! reply {
        ($b:expr, $id:expr) => {
            $b.id($id)
                .source("/step/one")
                .ty("client.step2")
                .subject("reply")
                .extension("comexamplehop", "1")
                .data("application/json", serde_json::json!({"step": 2}))
                .build()
                .expect("reply")
        };
    }
    let (r10, r03) = (
        reply!(EventBuilderV10::new(), "reply-1.0"),
        reply!(EventBuilderV03::new(), "reply-0.3"),
    );
    let (a, b) = (r10.clone(), r03.clone());
    let sub = Recorder::scripted(move |r, _| match r.path.as_str() {
        "/step" => match to_event(&r.headers, r.body.to_vec()).map(|e| e.id().to_string()) {
            Ok(id) if id == "start-0.3" => structured_reply_with(b.clone()),
            Ok(_) => reply_with(a.clone()),
            Err(_) => Reply::status(400),
        },
        _ => Reply::status(200),
    })
    .await;
    let desc = broker(
        "cereply",
        vec![
            trigger("step", "client.start", sub.url("/step"), None),
            trigger("final", "client.step2", sub.url("/final"), None),
        ],
    );
    let mut bk = EndToEnd::start(imp, &desc).await;
    let url = bk.broker_url(&desc);
    for (id, mode) in [("start-1.0", Mode::Binary), ("start-0.3", Mode::Structured)] {
        let ev = EventBuilderV10::new()
            .id(id)
            .source("/client")
            .ty("client.start")
            .build()
            .expect("start");
        assert_eq!(send(&url, ev, mode).await, 202, "{}", bk.logs());
    }
    let got = sub.wait_n("/final", 2, WAIT).await;
    assert_eq!(got.len(), 2, "{}", bk.logs());
    for sent in [&r10, &r03] {
        let hit = got
            .iter()
            .map(decode)
            .find(|e| e.id() == sent.id())
            .unwrap_or_else(|| panic!("{} did not reach /final", sent.id()));
        assert_intact(sent, &hit);
    }
    assert_eq!(sub.on("/step").len(), 2);
    bk.assert_alive();
}

differential!(reply_chain_case: reply_chain_broker_shm, reply_chain_knative);

/// A subscriber that answers 500 and then 200 gets the event again per the Trigger's
/// delivery.retry, and nothing goes to the dead-letter sink.
async fn retry_case(imp: Impl) {
    let sub = Recorder::scripted(|r, n| match r.path.as_str() {
        "/flaky" if n == 0 => Reply::status(500),
        _ => Reply::status(200),
    })
    .await;
    let desc = broker(
        "ceretry",
        vec![trigger(
            "flaky",
            "client.flaky",
            sub.url("/flaky"),
            quick_retries(3, Some(sub.url("/dls"))),
        )],
    );
    let mut bk = EndToEnd::start(imp, &desc).await;
    let sent = EventBuilderV10::new()
        .id("flaky-1")
        .source("/client")
        .ty("client.flaky")
        .data("text/plain", "try again")
        .build()
        .expect("event");
    assert_eq!(
        send(&bk.broker_url(&desc), sent.clone(), Mode::Binary).await,
        202
    );
    let got = sub.wait_n("/flaky", 2, WAIT).await;
    assert_eq!(got.len(), 2, "{}", bk.logs());
    for r in &got {
        assert_intact(&sent, &decode(r));
    }
    // The second attempt succeeded: no third attempt and nothing dead-lettered, also after
    // the longest backoff the Trigger allows has passed.
    tokio::time::sleep(Duration::from_millis(400)).await;
    assert_eq!(sub.on("/flaky").len(), 2);
    assert!(sub.on("/dls").is_empty());
    bk.assert_alive();
}

differential!(retry_case: retry_then_success_broker_shm, retry_then_success_knative);

/// A subscriber that always fails gets 1 + retry attempts, then the event goes to the
/// dead-letter sink with knativeerrordest (the subscriber), knativeerrorcode and
/// knativeerrordata (base64 of the subscriber's body). `on_broker`: the delivery (retries and
/// sink) is the Broker's, which a Trigger without one inherits.
async fn dead_letter_case(imp: Impl, on_broker: bool) {
    let sub = Recorder::scripted(|r, _| match r.path.as_str() {
        "/down" => Reply {
            body: bytes::Bytes::from_static(b"subscriber exploded"),
            ..Reply::status(500)
        },
        _ => Reply::status(200),
    })
    .await;
    let delivery = quick_retries(2, Some(sub.url("/dls")));
    let desc = match on_broker {
        false => broker(
            "cedls",
            vec![trigger("down", "client.down", sub.url("/down"), delivery)],
        ),
        true => BrokerDesc {
            delivery,
            ..broker(
                "cedlsb",
                vec![trigger("down", "client.down", sub.url("/down"), None)],
            )
        },
    };
    let mut bk = EndToEnd::start(imp, &desc).await;
    let sent = EventBuilderV10::new()
        .id("down-1")
        .source("/client")
        .ty("client.down")
        .extension("comexamplestr", "kept")
        .data("application/json", serde_json::json!({"n": 1}))
        .build()
        .expect("event");
    assert_eq!(
        send(&bk.broker_url(&desc), sent.clone(), Mode::Structured).await,
        202
    );
    let dls = sub.wait_n("/dls", 1, WAIT).await;
    assert_eq!(dls.len(), 1, "{}", bk.logs());
    assert_eq!(sub.on("/down").len(), 3, "1 attempt + 2 retries");
    let dead = decode(&dls[0]);
    let errors = ["knativeerrordest", "knativeerrorcode", "knativeerrordata"];
    let ext = |name: &str| dead.extension(name).map(|v| v.to_string());
    assert_eq!(ext("knativeerrordest"), Some(sub.url("/down")));
    assert_eq!(ext("knativeerrorcode").as_deref(), Some("500"));
    assert_eq!(
        ext("knativeerrordata"),
        Some(base64::engine::general_purpose::STANDARD.encode("subscriber exploded"))
    );
    let mut skip = errors.to_vec();
    skip.extend(["knativearrivaltime", "knativebrokerttl"]);
    assert_eq!(attributes(&dead, &skip), attributes(&sent, &skip));
    assert_eq!(data_view(&dead), data_view(&sent));
    assert!(dead.extension("knativearrivaltime").is_some());
    // The dead-lettered event is the one the broker stored: the TTL the ingress gave it stays.
    assert_eq!(ext("knativebrokerttl").as_deref(), Some("255"));
    bk.assert_alive();
}

async fn trigger_dead_letter_case(imp: Impl) {
    dead_letter_case(imp, false).await;
}

differential!(trigger_dead_letter_case: dead_letter_extensions_broker_shm, dead_letter_extensions_knative);

async fn broker_dead_letter_case(imp: Impl) {
    dead_letter_case(imp, true).await;
}

differential!(broker_dead_letter_case: broker_delivery_dead_letter_broker_shm, broker_delivery_dead_letter_knative);

/// A subscriber that replies with the type it subscribed to makes a loop; the TTL the client
/// sends (3) allows 2 deliveries: the ingress decrements it to 2, the reply re-enters with 2
/// and gets 1, the next reply would get 0 and is refused.
async fn ttl_loop(imp: Impl, async_channel: bool) {
    let sub = Recorder::scripted(|r, n| match r.path.as_str() {
        "/loop" => reply_with(
            EventBuilderV10::new()
                .id(format!("loop-{}", n + 1))
                .source("/loop")
                .ty("client.loop")
                .build()
                .expect("reply"),
        ),
        _ => Reply::status(200),
    })
    .await;
    let desc = BrokerDesc {
        async_channel,
        ..broker(
            "cettl",
            vec![trigger("loop", "client.loop", sub.url("/loop"), None)],
        )
    };
    let mut bk = EndToEnd::start(imp, &desc).await;
    let ev = EventBuilderV10::new()
        .id("loop-0")
        .source("/client")
        .ty("client.loop")
        .extension("knativebrokerttl", 3i64)
        .build()
        .expect("event");
    // What the client hears differs, by design of each side. broker-shm answers 202 once the
    // event is stored and delivers afterwards. Knative's in-memory channel fans out
    // synchronously by default (no messaging.knative.dev/async-handler annotation:
    // pkg/reconciler/inmemorychannel/dispatcher/inmemorychannel.go builds fanout.Config with
    // AsyncHandler false), so the channel answers only after delivery and the reply's own
    // trip through the ingress: the last reply's 400 (TTL exhausted,
    // pkg/broker/ingress/ingress_handler.go) fails the reply forwarding
    // (pkg/kncloudevents/event_dispatcher.go), the fan-out answers 500, each ingress up the
    // chain answers 500 for a non-2xx channel answer, and the client gets 500 although both
    // deliveries happened.
    // With the channel's async-handler annotation Knative answers 202 too.
    let expected = match (imp, async_channel) {
        (Impl::Knative, false) => 500,
        _ => 202,
    };
    assert_eq!(
        send(&bk.broker_url(&desc), ev, Mode::Binary).await,
        expected,
        "{}",
        bk.logs()
    );
    let got = sub.wait_n("/loop", 2, WAIT).await;
    assert_eq!(got.len(), 2, "{}", bk.logs());
    // Give a third delivery time to show up if the loop were not stopped.
    tokio::time::sleep(Duration::from_millis(500)).await;
    let ids: Vec<String> = sub
        .on("/loop")
        .iter()
        .map(|r| decode(r).id().to_string())
        .collect();
    assert_eq!(ids, ["loop-0", "loop-1"], "{}", bk.logs());
    bk.assert_alive();
}

async fn ttl_loop_case(imp: Impl) {
    ttl_loop(imp, false).await;
}

differential!(ttl_loop_case: ttl_exhausted_loop_stops_broker_shm, ttl_exhausted_loop_stops_knative);

/// Knative's in-memory channel with `messaging.knative.dev/async-handler: "true"` answers
/// before delivery: the client of the same loop hears 202, as from broker-shm.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn ttl_exhausted_loop_stops_async_channel_knative() {
    ttl_loop(Impl::Knative, true).await;
}

/// `delivery.format` chooses the mode of delivery: `json` structured, `binary` binary, for an
/// event the client sent in the other mode; the event arrives intact either way.
async fn format_case(imp: Impl) {
    let sub = Recorder::start().await;
    let format = |f: &'static str| {
        Some(DeliveryDesc {
            retry: Some(0),
            format: Some(f),
            ..DeliveryDesc::default()
        })
    };
    let desc = broker(
        "ceformat",
        vec![
            trigger("json", "client.format", sub.url("/json"), format("json")),
            trigger("bin", "client.format", sub.url("/bin"), format("binary")),
        ],
    );
    let mut bk = EndToEnd::start(imp, &desc).await;
    let url = bk.broker_url(&desc);
    let sent: Vec<(Event, Mode)> = event_matrix("client.format")
        .into_iter()
        .filter(|(e, _)| e.id().starts_with("1.0-") && e.id().ends_with("-json"))
        .collect();
    assert_eq!(sent.len(), 2);
    for (ev, mode) in &sent {
        assert_eq!(send(&url, ev.clone(), *mode).await, 202, "{}", bk.logs());
    }
    for (path, structured) in [("/json", true), ("/bin", false)] {
        let got = sub.wait_n(path, 2, WAIT).await;
        assert_eq!(got.len(), 2, "{path}: {}", bk.logs());
        for r in &got {
            let ct = r
                .headers
                .get("content-type")
                .map(|v| v.to_str().unwrap_or(""));
            let is_structured = ct.is_some_and(|c| c.starts_with("application/cloudevents+json"));
            assert_eq!(is_structured, structured, "{path}: {:?}", r.headers);
            assert_eq!(r.headers.contains_key("ce-id"), !structured, "{path}");
            let ev = decode(r);
            let (orig, _) = sent.iter().find(|(e, _)| e.id() == ev.id()).expect("sent");
            assert_intact(orig, &ev);
        }
    }
    bk.assert_alive();
}

differential!(format_case: delivery_format_broker_shm, delivery_format_knative);

/// One Trigger of a status table: what its subscriber answers and what follows: the number
/// of attempts and the dead-letter event's knativeerrordest (true: the subscriber's URL),
/// knativeerrorcode and knativeerrordata.
struct StatusRow {
    name: &'static str,
    status: u16,
    body: &'static str,
    /// Answer after this long, with a delivery timeout of PT0.2S and no retries.
    slow: bool,
    attempts: usize,
    dest: bool,
    code: Option<&'static str>,
    data: Option<&'static str>,
}

const fn row(
    name: &'static str,
    status: u16,
    body: &'static str,
    attempts: usize,
    code: Option<&'static str>,
    data: Option<&'static str>,
) -> StatusRow {
    StatusRow {
        name,
        status,
        body,
        slow: false,
        attempts,
        dest: true,
        code,
        data,
    }
}

/// Sends one event per row to a Trigger with `retry: 1` (PT0.05S) and a dead-letter sink, and
/// checks the attempts and the dead-letter extensions.
async fn status_rows(imp: Impl, ns: &str, rows: &'static [StatusRow]) {
    let sub = Recorder::scripted(move |r, _| {
        let Some(row) = rows.iter().find(|x| r.path == format!("/{}", x.name)) else {
            return Reply::status(200);
        };
        let mut reply = Reply {
            body: bytes::Bytes::from_static(row.body.as_bytes()),
            ..Reply::status(row.status)
        };
        if row.status == 200 && !row.body.is_empty() {
            reply.headers = vec![("content-type".into(), "text/html".into())];
        }
        if row.slow {
            reply.delay = Duration::from_secs(1);
        }
        reply
    })
    .await;
    let triggers = rows
        .iter()
        .map(|x| {
            let mut d = quick_retries(1, Some(sub.url(&format!("/dls/{}", x.name))));
            if x.slow
                && let Some(d) = d.as_mut()
            {
                d.retry = Some(0);
                d.timeout = Some("PT0.2S");
            }
            trigger(
                x.name,
                &format!("client.{}", x.name),
                sub.url(&format!("/{}", x.name)),
                d,
            )
        })
        .collect();
    let desc = broker(ns, triggers);
    let mut bk = EndToEnd::start(imp, &desc).await;
    let url = bk.broker_url(&desc);
    for x in rows {
        let ev = EventBuilderV10::new()
            .id(x.name)
            .source("/client")
            .ty(format!("client.{}", x.name))
            .build()
            .expect("event");
        assert_eq!(send(&url, ev, Mode::Binary).await, 202, "{}", bk.logs());
    }
    for x in rows {
        let dls = sub.wait_n(&format!("/dls/{}", x.name), 1, WAIT).await;
        assert_eq!(dls.len(), 1, "{}: {}", x.name, bk.logs());
        assert_eq!(
            sub.on(&format!("/{}", x.name)).len(),
            x.attempts,
            "{}",
            x.name
        );
        let dead = decode(&dls[0]);
        assert_eq!(dead.id(), x.name);
        let ext = |k: &str| dead.extension(k).map(|v| v.to_string());
        let dest = x.dest.then(|| sub.url(&format!("/{}", x.name)));
        assert_eq!(ext("knativeerrordest"), dest, "{}", x.name);
        assert_eq!(ext("knativeerrorcode").as_deref(), x.code, "{}", x.name);
        assert_eq!(ext("knativeerrordata").as_deref(), x.data, "{}", x.name);
    }
    bk.assert_alive();
}

/// Retried answers (404, 408, 409, 429, 5xx) get a second attempt, others (400) none; the
/// dead-letter event names the subscriber, its status and base64 of its body.
///
/// Not in the table: a body longer than 768 bytes. Knative means knativeerrordata to be at
/// most 1024 characters of base64 (pkg/kncloudevents/attributes/knative_error.go
/// KnativeErrorDataExtensionMaxLength; contract C.6), but v0.49.2 panics building it
/// (pkg/kncloudevents/event_dispatcher.go dispatchExecutionInfoTransformers caps the buffer at
/// 1024 bytes and base64-encodes the whole body into it: "index out of range [1024]"), which
/// takes the whole channel dispatcher down. broker-shm keeps what Knative means: the first
/// 768 bytes of the body, 1024 characters of base64 (broker-shm/src/delivery.rs
/// with_error_extensions, ERROR_DATA_MAX).
const STATUS_ROWS: &[StatusRow] = &[
    // A failure with an empty body: all three extensions, knativeerrordata "".
    row("empty", 500, "", 2, Some("500"), Some("")),
    row("s400", 400, "bad", 1, Some("400"), Some("YmFk")),
    row("s404", 404, "nf", 2, Some("404"), Some("bmY=")),
    row("s408", 408, "late", 2, Some("408"), Some("bGF0ZQ==")),
    row(
        "s409",
        409,
        "conflict",
        2,
        Some("409"),
        Some("Y29uZmxpY3Q="),
    ),
    row("s429", 429, "busy", 2, Some("429"), Some("YnVzeQ==")),
    row(
        "s503",
        503,
        "unavailable",
        2,
        Some("503"),
        Some("dW5hdmFpbGFibGU="),
    ),
];

async fn status_table_case(imp: Impl) {
    status_rows(imp, "cestatus", STATUS_ROWS).await;
}

differential!(status_table_case: retried_statuses_broker_shm, retried_statuses_knative);

/// Where broker-shm differs from Knative's MT broker (Knative only until it changes):
/// - `junk`: 200 with a body that is no CloudEvent. Knative's filter answers 502 with an empty
///   body (pkg/broker/filter/filter_handler.go writeResponse), the channel dispatcher retries
///   it, then cannot read the filter's error JSON and adds no error extension at all
///   (event_dispatcher.go dispatchExecutionInfoTransformers returns nil when json.Unmarshal of
///   the filter's body fails). broker-shm adds knativeerrordest, knativeerrorcode 502 and the
///   body as knativeerrordata.
/// - `slow`: the subscriber answers after the delivery timeout. The channel's request to the
///   filter times out, there is no filter body, and Knative adds no extension either;
///   broker-shm adds what Knative's dispatcher adds when it reaches a subscriber directly:
///   knativeerrordest, knativeerrorcode 500 and base64 of "dispatch error: ...".
const KNATIVE_ONLY_STATUS_ROWS: &[StatusRow] = &[
    StatusRow {
        dest: false,
        ..row("junk", 200, "<html>not an event</html>", 2, None, None)
    },
    StatusRow {
        slow: true,
        dest: false,
        ..row("slow", 200, "", 1, None, None)
    },
];

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn dead_letter_extensions_without_subscriber_body_knative() {
    status_rows(Impl::Knative, "cestatusk", KNATIVE_ONLY_STATUS_ROWS).await;
}

/// A Trigger's delivery in structured mode (`format: json`), without retries.
fn json_delivery() -> Option<DeliveryDesc> {
    Some(DeliveryDesc {
        retry: Some(0),
        format: Some("json"),
        ..DeliveryDesc::default()
    })
}

/// `s` without the whitespace outside JSON strings (what Go's encoding/json Compact leaves).
fn compact_json(s: &[u8]) -> Vec<u8> {
    let (mut out, mut in_str, mut esc) = (Vec::with_capacity(s.len()), false, false);
    for &b in s {
        match (in_str, esc, b) {
            (true, true, _) => esc = false,
            (true, false, b'\\') => esc = true,
            (true, false, b'"') | (false, _, b'"') => in_str = !in_str,
            (false, _, b' ' | b'\t' | b'\n' | b'\r') => continue,
            _ => {}
        }
        out.push(b);
    }
    out
}

/// A structured event's JSON `data` reaches a binary-mode subscriber byte for byte: big and
/// long numbers, spacing and key order as the client wrote them, from right after the colon
/// (sdk-go v2.16.1 event/event_unmarshal.go keeps the member's raw text and the binary writer
/// sends it as the body). A structured-mode subscriber gets the same text; Knative's filter
/// writes it through Go's json.Marshal, which drops the whitespace and escapes `<`, `&`, `>`
/// inside strings, so the two are compared without whitespace (and without those characters).
/// Sent as raw HTTP: the SDK client would re-serialise the data through a serde_json Value.
async fn raw_json_data_case(imp: Impl) {
    let sub = Recorder::start().await;
    let json = json_delivery();
    let desc = broker(
        "ceraw",
        vec![
            trigger("bin", "client.raw", sub.url("/bin"), None),
            trigger("json", "client.raw", sub.url("/json"), json),
        ],
    );
    let mut bk = EndToEnd::start(imp, &desc).await;
    let data = r#" {"n": 12345678901234567890123, "x": 1.10, "e": 1e2, "s" : "a"}"#;
    let body = format!(
        r#"{{"specversion":"1.0","id":"raw-1","source":"/client","type":"client.raw","datacontenttype":"application/json","data":{data}}}"#
    );
    let ce = headers(&[("content-type", "application/cloudevents+json")]);
    let (status, _, _) = raw(http::Method::POST, &bk.broker_url(&desc), ce, body.into())
        .await
        .expect("send");
    assert_eq!(status, 202, "{}", bk.logs());
    let got = sub.wait_n("/bin", 1, WAIT).await;
    assert_eq!(got.len(), 1, "{}", bk.logs());
    assert_eq!(got[0].headers["content-type"], "application/json");
    assert_eq!(&got[0].body[..], data.as_bytes());
    let got = sub.wait_n("/json", 1, WAIT).await;
    assert_eq!(got.len(), 1, "{}", bk.logs());
    let member = [b"\"data\":".as_slice(), &compact_json(data.as_bytes())].concat();
    let received = compact_json(&got[0].body);
    assert!(
        received.windows(member.len()).any(|w| w == member),
        "{}",
        String::from_utf8_lossy(&got[0].body)
    );
    bk.assert_alive();
}

differential!(raw_json_data_case: raw_json_data_reaches_subscribers_broker_shm, raw_json_data_reaches_subscribers_knative);

/// A 0.3 event with binary data delivered in structured mode (`delivery.format: json`) is
/// valid JSON that reads back as the same bytes: 0.3 has no `data_base64`, so broker-shm writes
/// base64 `data` with `datacontentencoding: base64` (what sdk-go writes for a 0.3 event whose
/// context carries that encoding: broker-shm/tests/dropin.rs filter_structured_data_case).
/// broker-shm only: behind Knative's in-memory channel the event has crossed a binary-mode hop,
/// its context no longer carries the encoding, and sdk-go (event/event_marshal.go) writes the
/// bytes as a JSON string as they are (`"data":"\u0000\u0001\u0002\x7f\x80\xfe\xff"`, raw
/// bytes that are not UTF-8), which a JSON parser refuses.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn v03_binary_data_in_structured_delivery_broker_shm() {
    let sub = Recorder::start().await;
    let json = json_delivery();
    let desc = broker(
        "ce03json",
        vec![trigger("json", "client.attrs", sub.url("/json"), json)],
    );
    let mut bk = EndToEnd::start(Impl::BrokerShm, &desc).await;
    let url = bk.broker_url(&desc);
    let sent: Vec<(Event, Mode)> = event_matrix("client.attrs")
        .into_iter()
        .filter(|(e, _)| e.id().starts_with("0.3-") && e.id().ends_with("-bin"))
        .collect();
    assert_eq!(sent.len(), 2);
    for (ev, mode) in &sent {
        assert_eq!(send(&url, ev.clone(), *mode).await, 202, "{}", bk.logs());
    }
    let got = sub.wait_n("/json", 2, WAIT).await;
    assert_eq!(got.len(), 2, "{}", bk.logs());
    for r in &got {
        let v: serde_json::Value = serde_json::from_slice(&r.body).expect("valid JSON");
        assert_eq!(v["datacontentencoding"], "base64", "{v}");
        assert_eq!(v["data"], "AAECf4D+/w==", "{v}");
        assert!(v.get("data_base64").is_none(), "{v}");
        let ev = decode(r);
        let (orig, _) = sent.iter().find(|(e, _)| e.id() == ev.id()).expect("sent");
        assert_intact(orig, &ev);
    }
    bk.assert_alive();
}
