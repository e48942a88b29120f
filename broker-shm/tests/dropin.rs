//! Drop-in modes: `broker-shm ingress` (mt-broker-ingress, C.2) and `broker-shm filter`
//! (mt-broker-filter, C.3) against the real binary, and the same test bodies against Knative's
//! own handlers (knative-broker-oracle, built from oracle/knative-broker by scripts/setup.sh):
//! every case runs once per implementation, so a difference fails one of the two.

mod common;

use base64::Engine as _;
use bytes::Bytes;
use common::*;
use http::{Method, StatusCode};
use std::time::Duration;

/// A Broker of the stock class as the MT broker controller leaves it: the channel address in the
/// status annotations (absent when `channel` is None) and its own address.
fn mt_broker(ns: &str, name: &str, channel: Option<&str>) -> String {
    let annotations = channel
        .map(|c| format!("  annotations:\n    knative.dev/channelAddress: {c}\n"))
        .unwrap_or_default();
    format!(
        "apiVersion: eventing.knative.dev/v1\nkind: Broker\nmetadata:\n  name: {name}\n  namespace: {ns}\n  annotations:\n    eventing.knative.dev/broker.class: MTChannelBasedBroker\nstatus:\n  address:\n    url: http://broker-ingress.knative-eventing.svc.cluster.local/{ns}/{name}\n{annotations}"
    )
}

/// A Trigger with uid `uid-<name>` as the trigger reconciler leaves it: `status.subscriberUri`
/// is the resolved `spec.subscriber.uri`. `spec_extra` is indented YAML under spec.
fn mt_trigger(ns: &str, name: &str, uri: &str, spec_extra: &str) -> String {
    format!(
        "apiVersion: eventing.knative.dev/v1\nkind: Trigger\nmetadata:\n  name: {name}\n  namespace: {ns}\n  uid: uid-{name}\nspec:\n  broker: default\n  subscriber:\n    uri: {uri}\n{spec_extra}\nstatus:\n  subscriberUri: {uri}\n"
    )
}

/// A binary-mode event with the given attribute headers (`ce-` prefixed) and a JSON body.
async fn post(url: &str, pairs: &[(&str, &str)]) -> (StatusCode, http::HeaderMap, Bytes) {
    raw(
        Method::POST,
        url,
        headers(pairs),
        Bytes::from_static(b"{\"hello\":\"world\"}"),
    )
    .await
    .unwrap()
}

/// A POST with only a content type and a body: the status.
async fn post_typed(url: &str, content_type: &str, body: Bytes) -> StatusCode {
    raw(
        Method::POST,
        url,
        headers(&[("content-type", content_type)]),
        body,
    )
    .await
    .unwrap()
    .0
}

async fn ingress_case(imp: Impl) {
    let channel = Recorder::scripted(|_, _| Reply::status(202)).await;
    let files = [
        (
            "b.yaml",
            mt_broker("di", "default", Some(&channel.url("/channel"))),
        ),
        ("n.yaml", mt_broker("di", "noaddr", None)),
    ];
    let mut b = DropIn::start(imp, Role::Ingress, &files).await;
    let url = b.url("/di/default");
    let (s, h, _) = raw(Method::OPTIONS, &url, Default::default(), Bytes::new())
        .await
        .unwrap();
    assert_eq!(
        (s, h["allow"].to_str().unwrap()),
        (StatusCode::OK, "POST, OPTIONS")
    );
    assert_eq!(h["webhook-allowed-origin"], "*");
    assert_eq!(h["webhook-allowed-rate"], "*");
    let (s, _, _) = raw(Method::GET, &url, Default::default(), Bytes::new())
        .await
        .unwrap();
    assert_eq!(s, StatusCode::METHOD_NOT_ALLOWED);
    assert_eq!(
        send_binary(
            &url,
            "i1",
            "t",
            &[
                ("x-request-id", "rid"),
                ("knative-foo", "bar"),
                ("authorization", "secret")
            ]
        )
        .await,
        StatusCode::ACCEPTED
    );
    let got = channel.wait_n("/channel", 1, Duration::from_secs(10)).await;
    assert_eq!(got.len(), 1);
    assert_eq!(got[0].ce("id").as_deref(), Some("i1"));
    assert_eq!(got[0].ce("knativebrokerttl").as_deref(), Some("255"));
    assert!(got[0].ce("knativearrivaltime").is_some());
    assert_eq!(got[0].headers["x-request-id"], "rid");
    assert_eq!(got[0].headers["knative-foo"], "bar");
    assert!(got[0].headers.get("authorization").is_none());
    assert_eq!(
        send_binary(&b.url("/di/noaddr"), "i2", "t", &[]).await,
        StatusCode::INTERNAL_SERVER_ERROR
    );
    assert_eq!(
        send_binary(&b.url("/di/none"), "i3", "t", &[]).await,
        StatusCode::NOT_FOUND
    );
    // Loop protection: a TTL of 1 or 0 is 0 after the decrement, and the event is dropped.
    for ttl in ["1", "0"] {
        assert_eq!(
            send_binary(&url, "i4", "t", &[("ce-knativebrokerttl", ttl)]).await,
            StatusCode::BAD_REQUEST,
            "TTL {ttl}"
        );
    }
    // A TTL above 1 is decremented before the channel sees it.
    assert_eq!(
        send_binary(&url, "i5", "t", &[("ce-knativebrokerttl", "9")]).await,
        StatusCode::ACCEPTED
    );
    let got = channel.wait_n("/channel", 2, Duration::from_secs(10)).await;
    assert_eq!(got[1].ce("id").as_deref(), Some("i5"));
    assert_eq!(got[1].ce("knativebrokerttl").as_deref(), Some("8"));
    b.assert_alive();
}

differential!(ingress_case: ingress_forwards_to_the_channel_address_broker_shm, ingress_forwards_to_the_channel_address_knative);

/// C.2's request rules: paths, bad events, both modes and spec versions.
async fn ingress_requests_case(imp: Impl) {
    let channel = Recorder::scripted(|_, _| Reply::status(202)).await;
    let files = [(
        "b.yaml",
        mt_broker("dr", "default", Some(&channel.url("/channel"))),
    )];
    let mut b = DropIn::start(imp, Role::Ingress, &files).await;
    let url = b.url("/dr/default");
    let ok = [
        ("ce-specversion", "1.0"),
        ("ce-id", "p"),
        ("ce-source", "/s"),
        ("ce-type", "t"),
    ];
    assert_eq!(post(&b.url("/"), &ok).await.0, StatusCode::NOT_FOUND);
    for path in ["/dr", "/dr/default/extra"] {
        assert_eq!(
            post(&b.url(path), &ok).await.0,
            StatusCode::BAD_REQUEST,
            "{path}"
        );
    }
    // Not a CloudEvent at all.
    let s = post_typed(&url, "text/plain", Bytes::from_static(b"hello")).await;
    assert_eq!(s, StatusCode::BAD_REQUEST, "non-event");
    // Unknown spec version, a missing required attribute.
    assert_eq!(
        post(
            &url,
            &[
                ("ce-specversion", "2.0"),
                ("ce-id", "p"),
                ("ce-source", "/s"),
                ("ce-type", "t")
            ]
        )
        .await
        .0,
        StatusCode::BAD_REQUEST
    );
    assert_eq!(
        post(
            &url,
            &[("ce-specversion", "1.0"), ("ce-id", "p"), ("ce-type", "t")]
        )
        .await
        .0,
        StatusCode::BAD_REQUEST
    );
    // Batched mode is not supported by the MT broker's ingress.
    let s = post_typed(
        &url,
        "application/cloudevents-batch+json",
        Bytes::from_static(br#"[{"specversion":"1.0","id":"b","source":"/s","type":"t"}]"#),
    )
    .await;
    assert_eq!(s, StatusCode::BAD_REQUEST, "batch");
    // Structured 1.0 and binary 0.3 are accepted; the spec version is kept.
    let structured = br#"{"specversion":"1.0","id":"st","source":"/s","type":"t",
        "datacontenttype":"application/json","data":{"a":1}}"#;
    let s = post_typed(
        &url,
        "application/cloudevents+json",
        Bytes::from_static(structured),
    )
    .await;
    assert_eq!(s, StatusCode::ACCEPTED, "structured");
    assert_eq!(
        post(
            &url,
            &[
                ("ce-specversion", "0.3"),
                ("ce-id", "v03"),
                ("ce-source", "/s"),
                ("ce-type", "t"),
                ("content-type", "application/json")
            ]
        )
        .await
        .0,
        StatusCode::ACCEPTED,
        "0.3"
    );
    let got = channel.wait_n("/channel", 2, Duration::from_secs(10)).await;
    assert_eq!(got.len(), 2);
    let st = got.iter().find(|r| r.ce("id").as_deref() == Some("st"));
    let st = st.expect("structured event forwarded");
    assert_eq!(st.ce("specversion").as_deref(), Some("1.0"));
    let data: serde_json::Value = serde_json::from_slice(&st.body).unwrap();
    assert_eq!(data, serde_json::json!({"a": 1}));
    let v03 = got.iter().find(|r| r.ce("id").as_deref() == Some("v03"));
    assert_eq!(
        v03.expect("0.3 event forwarded")
            .ce("specversion")
            .as_deref(),
        Some("0.3")
    );
    b.assert_alive();
}

differential!(ingress_requests_case: ingress_request_rules_broker_shm, ingress_request_rules_knative);

/// A binary event of type `t` with TTL 7, as the channel sends it to the filter.
fn ev7(id: &str) -> [(&str, &str); 5] {
    [
        ("ce-specversion", "1.0"),
        ("ce-id", id),
        ("ce-source", "/s"),
        ("ce-type", "t"),
        ("ce-knativebrokerttl", "7"),
    ]
}

async fn filter_case(imp: Impl) {
    let sub = Recorder::scripted(|r, _| match r.path.as_str() {
        "/fail" => Reply {
            body: Bytes::from_static(b"nope"),
            headers: vec![("x-request-id".into(), "back".into())],
            ..Reply::status(503)
        },
        "/junk" => Reply {
            body: Bytes::from_static(b"not an event"),
            ..Reply::status(200)
        },
        "/reply" => Reply::event("r1", "reply.t"),
        "/sreply" => Reply {
            headers: vec![("content-type".into(), "application/cloudevents+json".into())],
            body: Bytes::from_static(
                br#"{"specversion":"1.0","id":"sr","source":"/x","type":"t",
                "datacontenttype":"application/json","data":{"k":2},"knativebrokerttl":99}"#,
            ),
            ..Reply::status(200)
        },
        "/hdr" => Reply {
            headers: vec![
                ("x-request-id".into(), "back".into()),
                ("knative-x".into(), "k".into()),
                ("other".into(), "o".into()),
            ],
            ..Reply::status(202)
        },
        _ => Reply::status(202),
    })
    .await;
    let t = |name: &str, path: &str, extra: &str| mt_trigger("df", name, &sub.url(path), extra);
    let files = [
        ("b.yaml", mt_broker("df", "default", None)),
        (
            "ok.yaml",
            t("ok", "/ok", "  filters:\n    - exact: {type: want}"),
        ),
        (
            "attrs.yaml",
            t("attrs", "/attrs", "  filter:\n    attributes: {type: want}"),
        ),
        (
            "json.yaml",
            t("json", "/json", "  delivery:\n    format: json"),
        ),
        ("fail.yaml", t("fail", "/fail", "")),
        ("junk.yaml", t("junk", "/junk", "")),
        ("reply.yaml", t("reply", "/reply", "")),
        ("sreply.yaml", t("sreply", "/sreply", "")),
        ("hdr.yaml", t("hdr", "/hdr", "")),
    ];
    let mut b = DropIn::start(imp, Role::Filter, &files).await;
    let ttl = [("ce-knativebrokerttl", "7")];
    // Method, path, trigger and uid checks.
    let (s, h, _) = raw(
        Method::GET,
        &b.url("/triggers/df/ok/uid-ok"),
        Default::default(),
        Bytes::new(),
    )
    .await
    .unwrap();
    assert_eq!(
        (s, h["allow"].to_str().unwrap()),
        (StatusCode::METHOD_NOT_ALLOWED, "POST")
    );
    assert_eq!(
        send_binary(&b.url("/triggers/df/ok"), "1", "want", &ttl).await,
        StatusCode::BAD_REQUEST
    );
    assert_eq!(
        send_binary(&b.url("/triggers/df/nope/u"), "1", "want", &ttl).await,
        StatusCode::NOT_FOUND
    );
    assert_eq!(
        send_binary(&b.url("/triggers/df/ok/wrong"), "1", "want", &ttl).await,
        StatusCode::BAD_REQUEST
    );
    assert_eq!(
        send_binary(&b.url("/triggers/df/ok/uid-ok"), "1", "want", &[]).await,
        StatusCode::BAD_REQUEST,
        "TTL missing"
    );
    let s = post_typed(
        &b.url("/triggers/df/ok/uid-ok"),
        "text/plain",
        Bytes::from_static(b"hello"),
    )
    .await;
    assert_eq!(s, StatusCode::BAD_REQUEST, "non-event");
    // Filter mismatch (new filters and attribute filter): 200 with an empty body, nothing
    // forwarded.
    for trigger in ["ok", "attrs"] {
        let (s, _, body) = post(
            &b.url(&format!("/triggers/df/{trigger}/uid-{trigger}")),
            &[
                ("ce-specversion", "1.0"),
                ("ce-id", "m"),
                ("ce-source", "/s"),
                ("ce-type", "other"),
                ("ce-knativebrokerttl", "7"),
            ],
        )
        .await;
        assert_eq!((s, body.len()), (StatusCode::OK, 0), "{trigger}");
    }
    // Match: forwarded with Prefer: reply and Kn-Namespace, TTL stripped; status relayed.
    assert_eq!(
        send_binary(&b.url("/triggers/df/ok/uid-ok"), "2", "want", &ttl).await,
        StatusCode::ACCEPTED
    );
    assert_eq!(
        send_binary(&b.url("/triggers/df/attrs/uid-attrs"), "2a", "want", &ttl).await,
        StatusCode::ACCEPTED
    );
    let got = sub.wait_n("/ok", 1, Duration::from_secs(5)).await;
    assert_eq!(got.len(), 1);
    assert_eq!(got[0].ce("id").as_deref(), Some("2"));
    assert!(got[0].ce("knativebrokerttl").is_none());
    assert_eq!(got[0].headers["prefer"], "reply");
    assert_eq!(got[0].headers["kn-namespace"], "df");
    let got = sub.wait_n("/attrs", 1, Duration::from_secs(5)).await;
    assert_eq!(got.len(), 1, "nothing but the matching event");
    assert_eq!(got[0].ce("id").as_deref(), Some("2a"));
    // delivery.format json: the subscriber gets a structured event.
    assert_eq!(
        send_binary(&b.url("/triggers/df/json/uid-json"), "3j", "t", &ttl).await,
        StatusCode::ACCEPTED
    );
    let got = sub.wait_n("/json", 1, Duration::from_secs(5)).await;
    assert_eq!(got.len(), 1);
    assert!(
        got[0].headers["content-type"]
            .to_str()
            .unwrap()
            .starts_with("application/cloudevents+json"),
        "{:?}",
        got[0].headers
    );
    assert!(got[0].headers.get("ce-id").is_none());
    assert_eq!(got[0].ce("id").as_deref(), Some("3j"));
    assert!(got[0].ce("knativebrokerttl").is_none());
    // Subscriber error: same status, error JSON, pass-through response headers.
    let (s, h, body) = post(&b.url("/triggers/df/fail/uid-fail"), &ev7("3")).await;
    assert_eq!(s, StatusCode::SERVICE_UNAVAILABLE);
    assert_eq!(h["x-request-id"], "back");
    let v: serde_json::Value = serde_json::from_slice(&body).unwrap();
    assert_eq!(v["errdestination"], sub.url("/fail"));
    let eb = base64::engine::general_purpose::STANDARD
        .decode(v["errresponsebody"].as_str().unwrap())
        .unwrap();
    assert_eq!(eb, b"nope");
    // Non-event body on 2xx: 502.
    assert_eq!(
        send_binary(&b.url("/triggers/df/junk/uid-junk"), "4", "t", &ttl).await,
        StatusCode::BAD_GATEWAY
    );
    // Reply event written back with the TTL it had.
    let (s, h, body) = post(&b.url("/triggers/df/reply/uid-reply"), &ev7("5")).await;
    assert_eq!(s, StatusCode::OK);
    assert_eq!(h["ce-id"], "r1");
    assert_eq!(h["ce-knativebrokerttl"], "7");
    assert_eq!(body, Bytes::from_static(b"reply"));
    // A structured reply is written back in binary mode, its own TTL replaced by the request's.
    let (s, h, body) = post(&b.url("/triggers/df/sreply/uid-sreply"), &ev7("6")).await;
    assert_eq!(s, StatusCode::OK);
    assert_eq!(h["ce-id"], "sr");
    assert_eq!(h["ce-knativebrokerttl"], "7");
    assert_eq!(h["content-type"], "application/json");
    assert_eq!(body, Bytes::from_static(br#"{"k":2}"#));
    // Response headers: only the pass-through ones come back.
    let (s, h, _) = post(&b.url("/triggers/df/hdr/uid-hdr"), &ev7("7")).await;
    assert_eq!(s, StatusCode::ACCEPTED);
    assert_eq!(
        (&h["x-request-id"], &h["knative-x"]),
        (&"back".parse().unwrap(), &"k".parse().unwrap())
    );
    assert!(h.get("other").is_none());
    b.assert_alive();
}

differential!(filter_case: filter_speaks_the_filter_contract_broker_shm, filter_speaks_the_filter_contract_knative);

/// The stock topology with Knative's own in-memory channel between the two drop-in processes,
/// as an operator who swaps only the ingress and filter images runs it: client -> ingress ->
/// IMC fan-out -> filter -> subscriber, whose reply goes back through the IMC's replyUri to the
/// ingress (TTL decremented) and reaches a second Trigger's subscriber.
async fn stock_chain_case(imp: Impl) {
    let sub = Recorder::scripted(|r, _| match r.path.as_str() {
        "/step" => Reply::event("r1", "step2"),
        _ => Reply::status(202),
    })
    .await;
    let channel_port = free_port();
    let channel_url = format!("http://127.0.0.1:{channel_port}/dk/default-kne-trigger");
    let first = mt_trigger(
        "dk",
        "first",
        &sub.url("/step"),
        "  filters:\n    - exact: {type: start}",
    );
    let second = mt_trigger(
        "dk",
        "second",
        &sub.url("/final"),
        "  filters:\n    - exact: {type: step2}",
    );
    let broker = mt_broker("dk", "default", Some(&channel_url));
    let files = [
        ("b.yaml", broker.clone()),
        ("first.yaml", first),
        ("second.yaml", second),
    ];
    let mut ingress = DropIn::start(imp, Role::Ingress, &files[..1]).await;
    let mut filter = DropIn::start(imp, Role::Filter, &files).await;
    // What the trigger reconciler makes of the two Triggers: Subscriptions on the Broker's
    // channel, subscriber = the filter's trigger path, reply = the Broker (the ingress).
    let reply = ingress.url("/dk/default");
    let subscriber = |t: &str| {
        format!(
            "    - uid: sub-{t}\n      generation: 1\n      subscriberUri: {}\n      replyUri: {reply}\n",
            filter.url(&format!("/triggers/dk/{t}/uid-{t}"))
        )
    };
    let imc = format!(
        "apiVersion: messaging.knative.dev/v1\nkind: InMemoryChannel\nmetadata:\n  name: default-kne-trigger\n  namespace: dk\n  uid: imc-uid\nspec:\n  subscribers:\n{}{}",
        subscriber("first"),
        subscriber("second")
    );
    let channel = OracleProc::start_channel(&[("imc.yaml", imc)], channel_port).await;
    assert_eq!(
        send_binary(&reply, "c1", "start", &[("x-request-id", "chain")]).await,
        StatusCode::ACCEPTED,
        "{}",
        channel.logs()
    );
    let got = sub.wait_n("/final", 1, Duration::from_secs(10)).await;
    assert_eq!(got.len(), 1, "{}", channel.logs());
    assert_eq!(got[0].ce("id").as_deref(), Some("r1"));
    assert_eq!(got[0].ce("type").as_deref(), Some("step2"));
    assert!(got[0].ce("knativebrokerttl").is_none());
    assert!(got[0].ce("knativearrivaltime").is_some());
    let step = sub.on("/step");
    assert_eq!(step.len(), 1);
    assert_eq!(step[0].ce("id").as_deref(), Some("c1"));
    assert_eq!(step[0].headers["x-request-id"], "chain");
    ingress.assert_alive();
    filter.assert_alive();
}

differential!(stock_chain_case: stock_chain_through_knative_imc_broker_shm, stock_chain_through_knative_imc_knative);

/// One request to the ingress per row: (id, headers, body, status; then, for an accepted event,
/// what the channel receives: attribute, `body` or `content-type` -> value, None = absent).
type IngressRow = (
    &'static str,
    &'static [(&'static str, &'static str)],
    &'static [u8],
    u16,
    &'static [(&'static str, Option<&'static str>)],
);

async fn ingress_rows(imp: Impl, rows: &[IngressRow]) {
    let channel = Recorder::scripted(|_, _| Reply::status(202)).await;
    let files = [(
        "b.yaml",
        mt_broker("dv", "default", Some(&channel.url("/channel"))),
    )];
    let mut b = DropIn::start(imp, Role::Ingress, &files).await;
    for (id, pairs, body, status, _) in rows {
        let (s, _, _) = raw(
            Method::POST,
            &b.url("/dv/default"),
            headers(pairs),
            Bytes::from_static(body),
        )
        .await
        .unwrap();
        assert_eq!(s.as_u16(), *status, "{id}: {pairs:?}");
    }
    let accepted = rows.iter().filter(|r| r.3 == 202).count();
    let got = channel
        .wait_n("/channel", accepted, Duration::from_secs(10))
        .await;
    assert_eq!(got.len(), accepted);
    for (id, _, _, status, expect) in rows.iter().filter(|r| r.3 == 202) {
        let r = got.iter().find(|r| r.ce("id").as_deref() == Some(id));
        let r = r.unwrap_or_else(|| panic!("{id} ({status}) not forwarded"));
        for (what, want) in *expect {
            let have = match *what {
                "body" => Some(String::from_utf8_lossy(&r.body).into_owned()),
                "content-type" => r
                    .headers
                    .get(*what)
                    .map(|v| v.to_str().unwrap().to_string()),
                attr => r.ce(attr),
            };
            assert_eq!(have.as_deref(), *want, "{id}: {what}");
        }
    }
    b.assert_alive();
}

/// CloudEvents forms both ingresses treat alike: binary-mode attribute and extension edge
/// cases, the TTL as pkg/broker/ttl.go `TTLDefaulter` reads it (`5.0` is 5; not an int32:
/// MAX_TTL), structured events with typed extensions, `data` and `data_base64`, all forwarded
/// in binary mode.
async fn ingress_event_forms_case(imp: Impl) {
    const CE: &str = "application/cloudevents+json";
    #[rustfmt::skip]
    const ROWS: &[IngressRow] = &[
        ("b1", &[("ce-specversion", "1.0"), ("ce-id", "b1"), ("ce-source", "/s"), ("ce-type", "t"), ("ce-knativebrokerttl", " 5")], b"x", 202, &[("knativebrokerttl", Some("4")), ("body", Some("x"))]),
        ("b2", &[("ce-specversion", "1.0"), ("ce-id", "b2"), ("ce-source", "/s"), ("ce-type", "t"), ("ce-time", "x")], b"", 400, &[]),
        ("b3", &[("ce-specversion", "1.0"), ("ce-id", "b3"), ("ce-source", "/s"), ("ce-type", "t"), ("ce-my_ext", "v")], b"", 400, &[]),
        ("b4", &[("ce-specversion", "1.0"), ("ce-id", "b4"), ("ce-source", "/s"), ("ce-type", "t"), ("Ce-MyExt", "v")], b"", 202, &[("myext", Some("v"))]),
        ("b5", &[("ce-specversion", "1.0"), ("ce-id", "b5"), ("ce-source", "/s"), ("ce-type", "t"), ("ce-myext", "")], b"", 202, &[("myext", Some(""))]),
        ("b6", &[("ce-specversion", "1.0"), ("ce-id", "b6"), ("ce-source", "/s"), ("ce-type", "t"), ("ce-myext", "a%20b")], b"", 202, &[("myext", Some("a%20b"))]),
        ("b7", &[("ce-specversion", "1.0"), ("ce-id", ""), ("ce-source", "/s"), ("ce-type", "t")], b"", 400, &[]),
        ("b8", &[("ce-specversion", "1.0"), ("ce-id", "b8"), ("ce-source", "/s"), ("ce-type", "t"), ("content-type", CE)], b"{\"a\":1}", 400, &[]),
        ("b10", &[("ce-specversion", "1.0"), ("ce-id", "b10"), ("ce-source", "/s"), ("ce-type", "t"), ("ce-knativebrokerttl", "abc")], b"", 202, &[("knativebrokerttl", Some("255"))]),
        ("b11", &[("ce-specversion", "1.0"), ("ce-id", "b11"), ("ce-source", "/s"), ("ce-type", "t"), ("ce-knativebrokerttl", "5.0")], b"", 202, &[("knativebrokerttl", Some("4"))]),
        ("b12", &[("ce-specversion", "1.0"), ("ce-id", "b12"), ("ce-source", "/s"), ("ce-type", "t"), ("ce-knativebrokerttl", "99999999999")], b"", 202, &[("knativebrokerttl", Some("255"))]),
        ("b9", &[("ce-specversion", "1.0"), ("ce-id", "b9"), ("ce-source", "/s"), ("ce-type", "t"), ("ce-abcdefghijklmnopqrstuvwxyz", "v")], b"", 202, &[("abcdefghijklmnopqrstuvwxyz", Some("v"))]),
        ("s1", &[("content-type", CE)], br#"{"specversion":"1.0","id":"s1","source":"/s","type":"t","knativebrokerttl":5}"#, 202, &[("knativebrokerttl", Some("4"))]),
        ("s2", &[("content-type", CE)], br#"{"specversion":"1.0","id":"s2","source":"/s","type":"t","knativebrokerttl":"5"}"#, 202, &[("knativebrokerttl", Some("4"))]),
        ("s3", &[("content-type", CE)], br#"{"specversion":"1.0","id":"s3","source":"/s","type":"t","datacontenttype":"text/plain","data_base64":"aGk="}"#, 202, &[("body", Some("hi")), ("content-type", Some("text/plain"))]),
        ("s4", &[("content-type", CE)], br#"{"specversion":"1.0","id""#, 400, &[]),
        ("s5", &[("content-type", CE)], br#"{"specversion":"1.0","id":"s5","source":"/s","type":"t","myext":true}"#, 202, &[("myext", Some("true"))]),
        ("s6", &[("content-type", CE)], br#"{"specversion":"1.0","id":"s6","source":"/s","type":"t","myext":{"a":1}}"#, 400, &[]),
        ("s7", &[("content-type", "application/cloudevents+json; charset=utf-8")], br#"{"specversion":"1.0","id":"s7","source":"/s","type":"t","data":"hello"}"#, 202, &[("body", Some("\"hello\""))]),
        ("s8", &[("content-type", CE)], br#"{"specversion":"1.0","id":"s8","source":"/s","type":"t","data":{"x":[1,2]}}"#, 202, &[("body", Some(r#"{"x":[1,2]}"#))]),
        ("s9", &[("content-type", CE)], br#"{"specversion":"1.0","id":"s9","source":"/s","type":"t","datacontenttype":"application/xml","data":"<a/>"}"#, 202, &[("body", Some("<a/>")), ("content-type", Some("application/xml"))]),
    ];
    ingress_rows(imp, ROWS).await;
}

differential!(ingress_event_forms_case: ingress_event_forms_broker_shm, ingress_event_forms_knative);

/// One Trigger per row, each sent the same event (type `want`, source `/s`, no subject, plus the
/// row's extra headers): does the filter pass it to the subscriber (202) or answer 200-empty?
type DialectRow = (bool, &'static str, &'static [(&'static str, &'static str)]);

async fn filter_rows(imp: Impl, rows: &[DialectRow]) {
    let sub = Recorder::scripted(|_, _| Reply::status(202)).await;
    let mut files = vec![("b.yaml".to_string(), mt_broker("dd", "default", None))];
    for (i, (_, filter, _)) in rows.iter().enumerate() {
        let name = format!("t{i}");
        let uri = sub.url(&format!("/{name}"));
        files.push((
            format!("{name}.yaml"),
            mt_trigger("dd", &name, &uri, filter),
        ));
    }
    let files: Vec<(&str, String)> = files.iter().map(|(n, y)| (n.as_str(), y.clone())).collect();
    let mut b = DropIn::start(imp, Role::Filter, &files).await;
    for (i, (pass, filter, extra)) in rows.iter().enumerate() {
        let mut pairs = vec![
            ("ce-specversion", "1.0"),
            ("ce-id", "e"),
            ("ce-source", "/s"),
            ("ce-type", "want"),
            ("ce-knativebrokerttl", "5"),
            ("content-type", "application/json"),
        ];
        pairs.extend_from_slice(extra);
        let (s, _, body) = post(&b.url(&format!("/triggers/dd/t{i}/uid-t{i}")), &pairs).await;
        let want = if *pass {
            (StatusCode::ACCEPTED, 0)
        } else {
            (StatusCode::OK, 0)
        };
        assert_eq!((s, body.len()), want, "{filter:?} {extra:?}");
    }
    let forwarded = rows.iter().filter(|r| r.0).count();
    let got = sub
        .wait_for(Duration::from_secs(5), |v| v.len() >= forwarded)
        .await;
    assert_eq!(got.len(), forwarded);
    b.assert_alive();
}

/// Trigger filters in every dialect where both implementations agree (CESQL errors fail the
/// filter, empty `exact`/`prefix` values and empty dialect lists mean no filter, `schemaurl`
/// reads `dataschema`, several keys in one `exact`, an attribute value "" asks for a present
/// non-empty attribute, `time` compared in canonical RFC 3339 form).
async fn filter_dialects_case(imp: Impl) {
    #[rustfmt::skip]
    const ROWS: &[DialectRow] = &[
        (true, "  filters:\n    - exact: {type: want}", &[]),
        (false, "  filters:\n    - exact: {type: nope}", &[]),
        (true, "  filters:\n    - exact: {myext: '7'}", &[("ce-myext", "7")]),
        (false, "  filters:\n    - exact: {myext: '7'}", &[]),
        (true, "  filters:\n    - exact: {specversion: '1.0'}", &[]),
        (true, "  filters:\n    - exact: {datacontenttype: application/json}", &[]),
        (true, "  filters:\n    - exact: {schemaurl: 'http://x'}", &[("ce-dataschema", "http://x")]),
        (true, "  filters:\n    - exact: {time: '2021-01-01T00:00:00Z'}", &[("ce-time", "2021-01-01T00:00:00Z")]),
        (true, "  filters:\n    - exact: {myext: ''}", &[]),
        (true, "  filters:\n    - prefix: {type: wa}", &[]),
        (false, "  filters:\n    - prefix: {type: x}", &[]),
        (true, "  filters:\n    - prefix: {myext: ''}", &[]),
        (true, "  filters:\n    - suffix: {type: ant}", &[]),
        (false, "  filters:\n    - suffix: {type: x}", &[]),
        (true, "  filters:\n    - not: {exact: {myext: x}}", &[]),
        (false, "  filters:\n    - not: {exact: {type: want}}", &[]),
        (true, "  filters:\n    - any: [{exact: {type: nope}}, {exact: {type: want}}]", &[]),
        (false, "  filters:\n    - any: [{exact: {type: nope}}, {prefix: {type: x}}]", &[]),
        (false, "  filters:\n    - all: [{exact: {type: want}}, {exact: {source: /nope}}]", &[]),
        (true, "  filters:\n    - all: [{exact: {type: want}}, {suffix: {source: s}}]", &[]),
        (true, "  filters:\n    - any: []", &[]),
        (true, "  filters:\n    - {}", &[]),
        (false, "  filters:\n    - exact: {type: want}\n    - exact: {source: /nope}", &[]),
        (true, "  filters:\n    - cesql: \"type LIKE 'w%'\"", &[]),
        (false, "  filters:\n    - cesql: \"subject = 'x'\"", &[]),
        (false, "  filters:\n    - cesql: \"NOT (subject = 'x')\"", &[]),
        (false, "  filters:\n    - cesql: \"EXISTS myext\"", &[]),
        (true, "  filters:\n    - cesql: \"myext = 7\"", &[("ce-myext", "7")]),
        (true, "  filters:\n    - cesql: \"INT(myext) > 5\"", &[("ce-myext", "7")]),
        (false, "  filters:\n    - cesql: \"myext = 3\"", &[("ce-myext", "abc")]),
        (true, "  filters:\n    - cesql: \"ABS(myext) = 3\"", &[("ce-myext", "-3")]),
        (true, "  filters:\n    - cesql: \"myext = TRUE\"", &[("ce-myext", "true")]),
        (false, "  filters:\n    - cesql: \"1/0 = 0\"", &[]),
        (true, "  filters:\n    - cesql: \"type = 'want' OR 1/0 = 0\"", &[]),
        (false, "  filters:\n    - cesql: \"type = 'nope' OR 1/0 = 0\"", &[]),
        (true, "  filters:\n    - cesql: \"UPPER(type) = 'WANT'\"", &[]),
        (true, "  filters:\n    - cesql: \"type IN ('a', 'want')\"", &[]),
        (true, "  filters:\n    - cesql: \"dataschema = 'http://x'\"", &[("ce-dataschema", "http://x")]),
        (true, "  filter:\n    attributes: {type: want, myext: ''}", &[("ce-myext", "x")]),
        (false, "  filter:\n    attributes: {myext: ''}", &[]),
        (false, "  filter:\n    attributes: {myext: ''}", &[("ce-myext", "")]),
        (false, "  filter:\n    attributes: {subject: ''}", &[]),
        (true, "  filters:\n    - exact: {type: want, source: /s}", &[]),
        (false, "  filters:\n    - exact: {type: want, source: /nope}", &[]),
        (true, "  filters:\n    - exact: {time: '2021-01-01T00:00:00Z'}", &[("ce-time", "2021-01-01T00:00:00.000Z")]),
        (true, "  filter:\n    attributes: {schemaurl: 'http://x'}", &[("ce-dataschema", "http://x")]),
        (false, "  filter:\n    attributes: {type: want}\n  filters:\n    - exact: {type: nope}", &[]),
        (false, "  filter:\n    attributes: {type: nope}\n  filters: []", &[]),
    ];
    filter_rows(imp, ROWS).await;
}

differential!(filter_dialects_case: filter_dialects_broker_shm, filter_dialects_knative);

/// The watched manifest directory: a Trigger added, changed and removed while the filter runs.
async fn filter_follows_manifests_case(imp: Impl) {
    let sub = Recorder::scripted(|_, _| Reply::status(202)).await;
    let b = DropIn::start(
        imp,
        Role::Filter,
        &[("b.yaml", mt_broker("dw", "default", None))],
    )
    .await;
    let url = b.url("/triggers/dw/t/uid-t");
    let until = |want: StatusCode| {
        let url = url.clone();
        async move {
            let deadline = std::time::Instant::now() + Duration::from_secs(10);
            loop {
                let s = send_binary(&url, "w", "want", &[("ce-knativebrokerttl", "5")]).await;
                if s == want || std::time::Instant::now() > deadline {
                    return s;
                }
                tokio::time::sleep(Duration::from_millis(50)).await;
            }
        }
    };
    assert_eq!(until(StatusCode::NOT_FOUND).await, StatusCode::NOT_FOUND);
    let trigger = |ty: &str| {
        let filters = format!("  filters:\n    - exact: {{type: {ty}}}");
        mt_trigger("dw", "t", &sub.url("/t"), &filters)
    };
    b.write_manifest("t.yaml", &trigger("want"));
    assert_eq!(
        until(StatusCode::ACCEPTED).await,
        StatusCode::ACCEPTED,
        "added"
    );
    b.write_manifest("t.yaml", &trigger("other"));
    assert_eq!(until(StatusCode::OK).await, StatusCode::OK, "changed");
    b.remove_manifest("t.yaml");
    assert_eq!(
        until(StatusCode::NOT_FOUND).await,
        StatusCode::NOT_FOUND,
        "removed"
    );
}

differential!(filter_follows_manifests_case: filter_follows_manifests_broker_shm, filter_follows_manifests_knative);

// Cases found by running the tests above against Knative's handlers, each read from its
// source (knative.dev/eventing v0.49.2). broker-shm differed in each until its fixes
// (broker-shm/src/dropin.rs, filter.rs, broker.rs and spright_core::cloudevent); all now run
// on both implementations.

/// pkg/broker/ingress/ingress_handler.go `receive`: the dispatcher treats any non-2xx answer of
/// the channel as a send error, so the ingress answers 500 (never the channel's 4xx or 503).
async fn ingress_channel_answers_case(imp: Impl) {
    let channel = Recorder::scripted(|r, _| match r.path.as_str() {
        "/busy" => Reply::status(503),
        _ => Reply::status(400),
    })
    .await;
    let files = [
        (
            "busy.yaml",
            mt_broker("dc", "busy", Some(&channel.url("/busy"))),
        ),
        (
            "bad.yaml",
            mt_broker("dc", "bad", Some(&channel.url("/bad"))),
        ),
    ];
    let mut b = DropIn::start(imp, Role::Ingress, &files).await;
    for broker in ["busy", "bad"] {
        assert_eq!(
            send_binary(&b.url(&format!("/dc/{broker}")), "c1", "t", &[]).await,
            StatusCode::INTERNAL_SERVER_ERROR,
            "channel of {broker}"
        );
    }
    assert_eq!(channel.on("/busy").len(), 1, "a single attempt");
    b.assert_alive();
}

differential!(ingress_channel_answers_case: ingress_channel_answers_broker_shm, ingress_channel_answers_knative);

/// pkg/broker/filter/filter_handler.go: the filter sends where the controllers resolved to, the
/// Trigger's `status.subscriberUri` (none: 404), `status.deadLetterSinkUri` for `/dls` (none
/// there or on the Broker: 200, nothing sent) and the Broker's `status.address` for `/reply`,
/// TTL untouched; a subscriber it cannot reach gives 500 with the error JSON naming the
/// subscriber (the channel dispatcher fills the dead-letter extensions from it, and adds none
/// when the body is not that JSON: pkg/kncloudevents/event_dispatcher.go
/// `dispatchExecutionInfoTransformers`).
async fn filter_resolved_targets_case(imp: Impl) {
    let rec = Recorder::scripted(|_, _| Reply::status(202)).await;
    let broker = mt_broker("ds", "default", None).replace(
        "http://broker-ingress.knative-eventing.svc.cluster.local/ds/default",
        &rec.url("/broker"),
    );
    let diff = mt_trigger("ds", "diff", &rec.url("/status"), "").replacen(
        &rec.url("/status"),
        &rec.url("/spec"),
        1,
    );
    let nostat = format!(
        "apiVersion: eventing.knative.dev/v1\nkind: Trigger\nmetadata:\n  name: nostat\n  namespace: ds\n  uid: uid-nostat\nspec:\n  broker: default\n  subscriber:\n    uri: {}\n",
        rec.url("/nostat")
    );
    let dls = mt_trigger(
        "ds",
        "dls",
        &rec.url("/sub"),
        &format!(
            "  delivery:\n    deadLetterSink:\n      uri: {}",
            rec.url("/spec-dls")
        ),
    ) + &format!("  deadLetterSinkUri: {}\n", rec.url("/status-dls"));
    let files = [
        ("b.yaml", broker),
        ("diff.yaml", diff),
        ("nostat.yaml", nostat),
        ("dls.yaml", dls),
        ("t.yaml", mt_trigger("ds", "t", &rec.url("/sub"), "")),
        (
            "dead.yaml",
            mt_trigger("ds", "dead", "http://127.0.0.1:1/x", ""),
        ),
    ];
    let mut b = DropIn::start(imp, Role::Filter, &files).await;
    let ev = |id: &'static str| {
        [
            ("ce-specversion", "1.0"),
            ("ce-id", id),
            ("ce-source", "/s"),
            ("ce-type", "t"),
            ("ce-knativebrokerttl", "7"),
        ]
    };
    let at = |path: &str| b.url(path);
    assert_eq!(
        post(&at("/triggers/ds/diff/uid-diff"), &ev("d1")).await.0,
        StatusCode::ACCEPTED
    );
    assert_eq!(
        post(&at("/triggers/ds/nostat/uid-nostat"), &ev("n1"))
            .await
            .0,
        StatusCode::NOT_FOUND
    );
    let (s, _, body) = post(&at("/triggers/ds/dead/uid-dead"), &ev("x1")).await;
    assert_eq!(s, StatusCode::INTERNAL_SERVER_ERROR);
    let v: serde_json::Value = serde_json::from_slice(&body).unwrap_or_default();
    assert_eq!(v["errdestination"], "http://127.0.0.1:1/x", "{v}");
    assert!(!v["errresponsebody"].as_str().unwrap_or_default().is_empty());
    assert_eq!(
        post(&at("/triggers/ds/t/uid-t/reply"), &ev("r1")).await.0,
        StatusCode::ACCEPTED
    );
    assert_eq!(
        post(&at("/triggers/ds/dls/uid-dls/dls"), &ev("l1")).await.0,
        StatusCode::ACCEPTED
    );
    let (s, _, body) = post(&at("/triggers/ds/t/uid-t/dls"), &ev("l2")).await;
    assert_eq!((s, body.len()), (StatusCode::OK, 0), "no dead-letter sink");
    let got = rec
        .wait_for(Duration::from_secs(10), |v| v.len() >= 3)
        .await;
    let paths: Vec<&str> = got.iter().map(|r| r.path.as_str()).collect();
    assert_eq!(got.len(), 3, "{paths:?}");
    let one = |path: &str| {
        let r: Vec<_> = got.iter().filter(|r| r.path == path).collect();
        assert_eq!(r.len(), 1, "{path} in {paths:?}");
        r[0].clone()
    };
    assert_eq!(one("/status").ce("id").as_deref(), Some("d1"));
    let reply = one("/broker");
    assert_eq!(reply.ce("id").as_deref(), Some("r1"));
    assert_eq!(reply.ce("knativebrokerttl").as_deref(), Some("7"));
    assert_eq!(one("/status-dls").ce("id").as_deref(), Some("l1"));
    b.assert_alive();
}

differential!(filter_resolved_targets_case: filter_resolved_targets_broker_shm, filter_resolved_targets_knative);

/// Knative's CESQL (cloudevents/sdk-go sql/v2, behind pkg/eventfilter/subscriptionsapi) reads
/// `time` in its canonical RFC 3339 form, so a `.000` fraction does not matter (as every
/// broker-shm dialect does, through spright_core::cloudevent::go_time_text).
async fn filter_cesql_time_case(imp: Impl) {
    #[rustfmt::skip]
    const ROWS: &[DialectRow] = &[
        (true, "  filters:\n    - cesql: \"time = '2021-01-01T00:00:00Z'\"", &[("ce-time", "2021-01-01T00:00:00.000Z")]),
        (false, "  filters:\n    - cesql: \"time = '2021-01-01T00:00:00.000Z'\"", &[("ce-time", "2021-01-01T00:00:00.000Z")]),
    ];
    filter_rows(imp, ROWS).await;
}

differential!(filter_cesql_time_case: filter_cesql_time_broker_shm, filter_cesql_time_knative);

/// sdk-go's decoding and validation behind pkg/broker/ingress (`binding.ToEvent`,
/// `event.Validate`): `source` must be a URI-reference and `dataschema` a URI (400
/// otherwise); a 0.3 structured event with `datacontentencoding: base64` goes on with its
/// decoded data and without that attribute; `time` goes on in canonical RFC 3339 form (UTC).
async fn ingress_strict_forms_case(imp: Impl) {
    const CE: &str = "application/cloudevents+json";
    #[rustfmt::skip]
    const ROWS: &[IngressRow] = &[
        ("k3", &[("ce-specversion", "1.0"), ("ce-id", "k3"), ("ce-source", "%%"), ("ce-type", "t")], b"", 400, &[]),
        ("k4", &[("ce-specversion", "1.0"), ("ce-id", "k4"), ("ce-source", "/s"), ("ce-type", "t"), ("ce-dataschema", "not a uri")], b"", 400, &[]),
        ("k5", &[("content-type", CE)], br#"{"specversion":"0.3","id":"k5","source":"/s","type":"t","datacontenttype":"text/plain","datacontentencoding":"base64","data":"aGk="}"#, 202, &[("body", Some("hi")), ("datacontentencoding", None), ("specversion", Some("0.3"))]),
        ("k6", &[("content-type", CE)], br#"{"specversion":"1.0","id":"k6","source":"/s","type":"t","time":"2021-01-01T00:00:00.000Z"}"#, 202, &[("time", Some("2021-01-01T00:00:00Z"))]),
    ];
    ingress_rows(imp, ROWS).await;
}

differential!(ingress_strict_forms_case: ingress_strict_forms_broker_shm, ingress_strict_forms_knative);

/// Structured-mode `data` as sdk-go reads it (v2.16.1 event/event_unmarshal.go) behind
/// Knative's ingress, forwarded in binary mode:
/// - JSON data (no datacontenttype, or sdk-go's exact JSON types) is the member's raw text from
///   right after the colon, leading whitespace included (jsoniter SkipAndReturnBytes): big and
///   long numbers, exponents, escapes, spacing and key order reach the channel byte for byte,
///   `null` as the text `null`, from any member position, the last duplicate winning;
/// - another media type (`application/ld+json`, `text/plain`, a different case) takes only a
///   JSON string, its text (an unpaired surrogate escape read as U+FFFD, as jsoniter reads
///   it); anything else is 400;
/// - a null `data_base64` is 400.
///
/// Not in the table: a 0.3 event with a `data_base64` member. Knative keeps it as an extension
/// named `data_base64` (sent on as a `ce-data_base64` header) and the event has no data;
/// broker-shm reads it as the data, as in 1.0 (an attribute may not be named data_base64).
async fn ingress_data_bytes_case(imp: Impl) {
    const CE: &str = "application/cloudevents+json";
    #[rustfmt::skip]
    const ROWS: &[IngressRow] = &[
        ("d1", &[("content-type", CE)], br#"{"specversion":"1.0","id":"d1","source":"/s","type":"t","data": {"n": 12345678901234567890123, "x": 1.10, "s" : "a"}}"#, 202, &[("body", Some(r#" {"n": 12345678901234567890123, "x": 1.10, "s" : "a"}"#))]),
        ("d2", &[("content-type", CE)], br#"{"specversion":"1.0","id":"d2","source":"/s","type":"t","data":1e2}"#, 202, &[("body", Some("1e2"))]),
        ("d3", &[("content-type", CE)], b"{\"specversion\":\"1.0\",\"id\":\"d3\",\"source\":\"/s\",\"type\":\"t\",\"datacontenttype\":\"application/json\",\"data\" :\n [ 1.0 ,2 ] }", 202, &[("body", Some("\n [ 1.0 ,2 ]")), ("content-type", Some("application/json"))]),
        ("d4", &[("content-type", CE)], br#"{"data": {"k": 1.50}, "specversion":"1.0","id":"d4","source":"/s","type":"t"}"#, 202, &[("body", Some(r#" {"k": 1.50}"#))]),
        ("d5", &[("content-type", CE)], br#"{"specversion":"0.3","id":"d5","source":"/s","type":"t","data":{"a" : 1}}"#, 202, &[("body", Some(r#"{"a" : 1}"#))]),
        ("d6", &[("content-type", CE)], br#"{"specversion":"1.0","id":"d6","source":"/s","type":"t","datacontenttype":"application/ld+json","data":{"a":1}}"#, 400, &[]),
        ("d7", &[("content-type", CE)], br#"{"specversion":"1.0","id":"d7","source":"/s","type":"t","datacontenttype":"text/plain","data":{"a":1}}"#, 400, &[]),
        ("d8", &[("content-type", CE)], br#"{"specversion":"1.0","id":"d8","source":"/s","type":"t","datacontenttype":"Application/JSON","data":{"a":1}}"#, 400, &[]),
        ("d9", &[("content-type", CE)], br#"{"specversion":"1.0","id":"d9","source":"/s","type":"t","datacontenttype":"application/ld+json","data":"x"}"#, 202, &[("body", Some("x")), ("content-type", Some("application/ld+json"))]),
        ("d10", &[("content-type", CE)], br#"{"specversion":"1.0","id":"d10","source":"/s","type":"t","data":null}"#, 202, &[("body", Some("null"))]),
        ("d11", &[("content-type", CE)], br#"{"specversion":"1.0","id":"d11","source":"/s","type":"t","datacontenttype":"text/plain","data":null}"#, 202, &[("body", Some(""))]),
        ("d12", &[("content-type", CE)], br#"{"specversion":"1.0","id":"d12","source":"/s","type":"t","data_base64":null}"#, 400, &[]),
        ("d13", &[("content-type", CE)], br#"{"data_base64":null,"specversion":"1.0","id":"d13","source":"/s","type":"t"}"#, 400, &[]),
        ("d14", &[("content-type", CE)], br#"{"specversion":"1.0","id":"d14","source":"/s","type":"t","data":"a<b>&\u2028"}"#, 202, &[("body", Some(r#""a<b>&\u2028""#))]),
        ("d15", &[("content-type", CE)], br#"{"specversion":"1.0","id":"d15","source":"/s","type":"t","data":{"a":1},"data":[2]}"#, 202, &[("body", Some("[2]"))]),
        ("d16", &[("content-type", CE)], br#"{"specversion":"1.0","id":"d16","source":"/s","type":"t","datacontenttype":"application/json ","data":{"a":1}}"#, 400, &[]),
        ("d17", &[("content-type", CE)], br#"{"specversion":"1.0","id":"d17","source":"/s","type":"t","datacontenttype":"text/plain","data":"a\ud800b\n"}"#, 202, &[("body", Some("a\u{fffd}b\n"))]),
    ];
    ingress_rows(imp, ROWS).await;
}

differential!(ingress_data_bytes_case: ingress_data_bytes_broker_shm, ingress_data_bytes_knative);

/// The filter's structured delivery (`delivery.format: json`) of structured events as the
/// channel may send them: a 0.3 event with `datacontentencoding: base64` and binary data goes
/// on as base64 `data` with that encoding (sdk-go v2.16.1 event/event_marshal.go writes the
/// encoding the 0.3 context carries; 0.3 has no `data_base64`), and a binary delivery has the
/// bytes without it. JSON data keeps its text (Go's json.Marshal in Knative's writer drops the
/// whitespace: compared without it).
async fn filter_structured_data_case(imp: Impl) {
    let sub = Recorder::scripted(|_, _| Reply::status(202)).await;
    let t = |name: &str, extra: &str| mt_trigger("dj", name, &sub.url(&format!("/{name}")), extra);
    let files = [
        ("b.yaml", mt_broker("dj", "default", None)),
        ("json.yaml", t("json", "  delivery:\n    format: json")),
        ("bin.yaml", t("bin", "")),
    ];
    let mut b = DropIn::start(imp, Role::Filter, &files).await;
    let events: [&[u8]; 2] = [
        br#"{"specversion":"0.3","id":"f1","source":"/s","type":"t","datacontenttype":"application/octet-stream","datacontentencoding":"base64","data":"AAEC/w==","knativebrokerttl":7}"#,
        br#"{"specversion":"1.0","id":"f2","source":"/s","type":"t","data": {"n": 12345678901234567890123, "x": 1.10, "s" : "a"},"knativebrokerttl":7}"#,
    ];
    for trigger in ["json", "bin"] {
        for ev in events {
            let (s, _, _) = raw(
                Method::POST,
                &b.url(&format!("/triggers/dj/{trigger}/uid-{trigger}")),
                headers(&[("content-type", "application/cloudevents+json")]),
                Bytes::from_static(ev),
            )
            .await
            .unwrap();
            assert_eq!(s, StatusCode::ACCEPTED, "{trigger}: {}", b.logs());
        }
    }
    let json = sub.wait_n("/json", 2, Duration::from_secs(10)).await;
    let bin = sub.wait_n("/bin", 2, Duration::from_secs(10)).await;
    let by_id = |v: &[Received], id: &str| {
        v.iter()
            .find(|r| r.ce("id").as_deref() == Some(id))
            .unwrap_or_else(|| panic!("{id} not delivered"))
            .clone()
    };
    let f1: serde_json::Value = serde_json::from_slice(&by_id(&json, "f1").body).unwrap();
    assert_eq!(f1["datacontentencoding"], "base64", "{f1}");
    assert_eq!(f1["data"], "AAEC/w==", "{f1}");
    assert!(f1.get("data_base64").is_none(), "{f1}");
    let f1 = by_id(&bin, "f1");
    assert_eq!(&f1.body[..], &[0u8, 1, 2, 255]);
    assert!(f1.headers.get("ce-datacontentencoding").is_none());
    let f2 = by_id(&json, "f2").body;
    let compact: String = String::from_utf8_lossy(&f2)
        .chars()
        .filter(|c| !c.is_ascii_whitespace())
        .collect();
    assert!(
        compact.contains(r#""data":{"n":12345678901234567890123,"x":1.10,"s":"a"}"#),
        "{compact}"
    );
    assert_eq!(
        &by_id(&bin, "f2").body[..],
        br#" {"n": 12345678901234567890123, "x": 1.10, "s" : "a"}"#
    );
    b.assert_alive();
}

differential!(filter_structured_data_case: filter_structured_data_broker_shm, filter_structured_data_knative);
