//! Drop-in modes: `broker-shm ingress` (mt-broker-ingress, C.2) and `broker-shm filter`
//! (mt-broker-filter, C.3) against the real binary.

mod common;

use base64::Engine as _;
use bytes::Bytes;
use common::*;
use http::{Method, StatusCode};
use std::time::Duration;

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn dropin_ingress_forwards_to_the_channel_address() {
    let channel = Recorder::scripted(|_, _| Reply::status(202)).await;
    let broker = format!(
        "apiVersion: eventing.knative.dev/v1\nkind: Broker\nmetadata:\n  name: default\n  namespace: di\n  annotations:\n    eventing.knative.dev/broker.class: MTChannelBasedBroker\nstatus:\n  annotations:\n    knative.dev/channelAddress: {}\n",
        channel.url("/channel")
    );
    let noaddr = "apiVersion: eventing.knative.dev/v1\nkind: Broker\nmetadata:\n  name: noaddr\n  namespace: di\n".to_string();
    let files = [("b.yaml", broker), ("n.yaml", noaddr)];
    let mut b = BrokerProc::start(&files, &["ingress"], &[]).await;
    let url = b.url("/di/default");
    let (s, h, _) = raw(Method::OPTIONS, &url, Default::default(), Bytes::new())
        .await
        .unwrap();
    assert_eq!(
        (s, h["allow"].to_str().unwrap()),
        (StatusCode::OK, "POST, OPTIONS")
    );
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
    assert_eq!(
        send_binary(&url, "i4", "t", &[("ce-knativebrokerttl", "1")]).await,
        StatusCode::BAD_REQUEST
    );
    b.assert_alive();
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn dropin_filter_speaks_the_filter_contract() {
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
        _ => Reply::status(202),
    })
    .await;
    let t = |name: &str, path: &str, extra: &str| {
        trigger_yaml("df", name, "default", &sub.url(path), extra)
    };
    let files = [
        (
            "b.yaml",
            broker_yaml("df", "default", "  delivery: {retry: 0}"),
        ),
        (
            "ok.yaml",
            t("ok", "/ok", "  filters:\n    - exact: {type: want}"),
        ),
        ("fail.yaml", t("fail", "/fail", "")),
        ("junk.yaml", t("junk", "/junk", "")),
        ("reply.yaml", t("reply", "/reply", "")),
    ];
    let mut b = BrokerProc::start(&files, &["filter"], &[]).await;
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
    // Filter mismatch: 200 with an empty body, nothing forwarded.
    let (s, _, body) = raw(
        Method::POST,
        &b.url("/triggers/df/ok/uid-ok"),
        headers(&[
            ("ce-specversion", "1.0"),
            ("ce-id", "m"),
            ("ce-source", "/s"),
            ("ce-type", "other"),
            ("ce-knativebrokerttl", "7"),
        ]),
        Bytes::new(),
    )
    .await
    .unwrap();
    assert_eq!((s, body.len()), (StatusCode::OK, 0));
    // Match: forwarded with Prefer: reply and Kn-Namespace, TTL stripped; status relayed.
    assert_eq!(
        send_binary(&b.url("/triggers/df/ok/uid-ok"), "2", "want", &ttl).await,
        StatusCode::ACCEPTED
    );
    let got = sub.wait_n("/ok", 1, Duration::from_secs(5)).await;
    assert_eq!(got.len(), 1);
    assert_eq!(got[0].ce("id").as_deref(), Some("2"));
    assert!(got[0].ce("knativebrokerttl").is_none());
    assert_eq!(got[0].headers["prefer"], "reply");
    assert_eq!(got[0].headers["kn-namespace"], "df");
    // Subscriber error: same status, error JSON, pass-through response headers.
    let (s, h, body) = raw(
        Method::POST,
        &b.url("/triggers/df/fail/uid-fail"),
        headers(&[
            ("ce-specversion", "1.0"),
            ("ce-id", "3"),
            ("ce-source", "/s"),
            ("ce-type", "t"),
            ("ce-knativebrokerttl", "7"),
        ]),
        Bytes::new(),
    )
    .await
    .unwrap();
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
    let (s, h, body) = raw(
        Method::POST,
        &b.url("/triggers/df/reply/uid-reply"),
        headers(&[
            ("ce-specversion", "1.0"),
            ("ce-id", "5"),
            ("ce-source", "/s"),
            ("ce-type", "t"),
            ("ce-knativebrokerttl", "7"),
        ]),
        Bytes::new(),
    )
    .await
    .unwrap();
    assert_eq!(s, StatusCode::OK);
    assert_eq!(h["ce-id"], "r1");
    assert_eq!(h["ce-knativebrokerttl"], "7");
    assert_eq!(body, Bytes::from_static(b"reply"));
    b.assert_alive();
}
