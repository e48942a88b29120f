//! Knative broker data-plane conformance (rekt `DataPlaneConformance`, the legacy
//! `broker_data_plane_test`) re-expressed against the real binary.

mod common;

use bytes::Bytes;
use common::*;
use http::{Method, StatusCode};
use std::time::Duration;

const WAIT: Duration = Duration::from_secs(10);

async fn setup() -> (BrokerProc, Recorder) {
    let sink = Recorder::start().await;
    let files = [
        (
            "broker.yaml",
            broker_yaml("conf", "default", "  delivery: {retry: 0}"),
        ),
        (
            "trigger.yaml",
            trigger_yaml("conf", "all", "default", &sink.url("/all"), ""),
        ),
    ];
    let b = BrokerProc::start(&files, &[], &[]).await;
    (b, sink)
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn methods_paths_and_options() {
    let (mut b, _sink) = setup().await;
    let url = b.url("/conf/default");
    let (s, h, _) = raw(Method::OPTIONS, &url, Default::default(), Bytes::new())
        .await
        .unwrap();
    assert_eq!(s, StatusCode::OK);
    assert_eq!(h["allow"], "POST, OPTIONS");
    assert_eq!(h["webhook-allowed-origin"], "*");
    assert_eq!(h["webhook-allowed-rate"], "*");
    for m in [Method::GET, Method::PUT, Method::DELETE, Method::PATCH] {
        let (s, _, _) = raw(m.clone(), &url, Default::default(), Bytes::new())
            .await
            .unwrap();
        assert_eq!(s, StatusCode::METHOD_NOT_ALLOWED, "{m}");
    }
    assert_eq!(
        send_binary(&b.url("/"), "1", "t", &[]).await,
        StatusCode::NOT_FOUND
    );
    for p in ["/conf", "/conf/default/extra", "//default"] {
        assert_eq!(
            send_binary(&b.url(p), "1", "t", &[]).await,
            StatusCode::BAD_REQUEST,
            "{p}"
        );
    }
    assert_eq!(
        send_binary(&b.url("/conf/nope"), "1", "t", &[]).await,
        StatusCode::NOT_FOUND
    );
    assert_eq!(
        send_binary(&b.url("/other/default"), "1", "t", &[]).await,
        StatusCode::NOT_FOUND
    );
    assert_eq!(
        send_binary(&b.url("/conf/default/"), "1", "t", &[]).await,
        StatusCode::ACCEPTED
    );
    b.assert_alive();
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn versions_and_modes_are_accepted_and_preserved() {
    let (mut b, sink) = setup().await;
    let url = b.url("/conf/default");
    // 1.0 binary with an extension and a percent-encoded subject.
    let s = send_binary(
        &url,
        "bin-10",
        "conf.t",
        &[("ce-myext", "v1"), ("ce-subject", "a%20b")],
    )
    .await;
    assert_eq!(s, StatusCode::ACCEPTED);
    // 0.3 binary.
    let h = headers(&[
        ("ce-specversion", "0.3"),
        ("ce-id", "bin-03"),
        ("ce-source", "/s"),
        ("ce-type", "conf.t"),
        ("ce-schemaurl", "http://schema"),
        ("content-type", "text/plain"),
    ]);
    let (s, _, _) = raw(Method::POST, &url, h, Bytes::from_static(b"plain"))
        .await
        .unwrap();
    assert_eq!(s, StatusCode::ACCEPTED);
    // 1.0 and 0.3 structured.
    for (sv, id) in [("1.0", "str-10"), ("0.3", "str-03")] {
        let body = format!(
            r#"{{"specversion":"{sv}","id":"{id}","source":"/s","type":"conf.t","datacontenttype":"application/json","data":{{"k":"v"}}}}"#
        );
        let (s, _, _) = raw(
            Method::POST,
            &url,
            headers(&[(
                "content-type",
                "application/cloudevents+json; charset=UTF-8",
            )]),
            Bytes::from(body),
        )
        .await
        .unwrap();
        assert_eq!(s, StatusCode::ACCEPTED, "{sv}");
    }
    let got = sink.wait_n("/all", 4, WAIT).await;
    assert_eq!(got.len(), 4, "{}", b.logs());
    let by_id = |id: &str| {
        got.iter()
            .find(|r| r.ce("id").as_deref() == Some(id))
            .cloned()
            .unwrap()
    };
    let r = by_id("bin-10");
    assert_eq!(r.ce("myext").as_deref(), Some("v1"));
    assert_eq!(
        r.ce("subject").as_deref(),
        Some("a%20b"),
        "header stays percent-encoded on the wire"
    );
    assert_eq!(r.body, Bytes::from_static(b"{\"hello\":\"world\"}"));
    assert!(r.ce("knativearrivaltime").is_some());
    assert!(
        r.ce("knativebrokerttl").is_none(),
        "TTL is stripped before delivery"
    );
    assert_eq!(r.headers["prefer"], "reply");
    assert_eq!(r.headers["kn-namespace"], "conf");
    let r = by_id("bin-03");
    assert_eq!(
        r.ce("specversion").as_deref(),
        Some("0.3"),
        "no specversion upgrade"
    );
    assert_eq!(r.ce("schemaurl").as_deref(), Some("http://schema"));
    assert_eq!(r.headers["content-type"], "text/plain");
    let r = by_id("str-03");
    assert_eq!(r.ce("specversion").as_deref(), Some("0.3"));
    assert_eq!(r.body, Bytes::from_static(b"{\"k\":\"v\"}"));
    b.assert_alive();
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn invalid_events_get_400() {
    let (mut b, sink) = setup().await;
    let url = b.url("/conf/default");
    let structured = |body: &str| {
        (
            headers(&[("content-type", "application/cloudevents+json")]),
            body.to_string(),
        )
    };
    let cases = vec![
        (
            "unknown specversion",
            headers(&[
                ("ce-specversion", "9.9"),
                ("ce-id", "1"),
                ("ce-source", "/s"),
                ("ce-type", "t"),
            ]),
            String::new(),
        ),
        (
            "missing id",
            headers(&[
                ("ce-specversion", "1.0"),
                ("ce-source", "/s"),
                ("ce-type", "t"),
            ]),
            String::new(),
        ),
        (
            "missing source",
            headers(&[("ce-specversion", "1.0"), ("ce-id", "1"), ("ce-type", "t")]),
            String::new(),
        ),
        (
            "missing type",
            headers(&[
                ("ce-specversion", "1.0"),
                ("ce-id", "1"),
                ("ce-source", "/s"),
            ]),
            String::new(),
        ),
        (
            "bad time",
            headers(&[
                ("ce-specversion", "1.0"),
                ("ce-id", "1"),
                ("ce-source", "/s"),
                ("ce-type", "t"),
                ("ce-time", "yesterday"),
            ]),
            String::new(),
        ),
        (
            "not an event",
            headers(&[("content-type", "application/json")]),
            "{}".into(),
        ),
        (
            "batch",
            headers(&[("content-type", "application/cloudevents-batch+json")]),
            "[]".into(),
        ),
        {
            let (h, b) = structured("{not json");
            ("broken json", h, b)
        },
        {
            let (h, b) = structured(r#"{"specversion":"1.0","id":"1","source":"/s"}"#);
            ("structured missing type", h, b)
        },
        {
            let (h, b) = structured(r#"[1,2]"#);
            ("structured array", h, b)
        },
        (
            "TTL exhausted",
            headers(&[
                ("ce-specversion", "1.0"),
                ("ce-id", "1"),
                ("ce-source", "/s"),
                ("ce-type", "t"),
                ("ce-knativebrokerttl", "1"),
            ]),
            String::new(),
        ),
        (
            // A TTL that is not a number gets MAX_TTL (Knative's defaulter); one that
            // truncates to 0 is exhausted.
            "TTL 0.5",
            headers(&[
                ("ce-specversion", "1.0"),
                ("ce-id", "1"),
                ("ce-source", "/s"),
                ("ce-type", "t"),
                ("ce-knativebrokerttl", "0.5"),
            ]),
            String::new(),
        ),
    ];
    for (what, h, body) in cases {
        let (s, _, _) = raw(Method::POST, &url, h, Bytes::from(body)).await.unwrap();
        assert_eq!(s, StatusCode::BAD_REQUEST, "{what}");
    }
    // Nothing invalid was stored or delivered; a valid event still is.
    assert_eq!(
        send_binary(&url, "ok", "t", &[]).await,
        StatusCode::ACCEPTED
    );
    let got = sink.wait_n("/all", 1, WAIT).await;
    tokio::time::sleep(Duration::from_millis(200)).await;
    assert_eq!(sink.on("/all").len(), 1, "{got:?}");
    b.assert_alive();
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn structured_delivery_format_and_long_message() {
    let sink = Recorder::start().await;
    let files = [
        (
            "b.yaml",
            broker_yaml("fmt", "default", "  delivery: {retry: 0}"),
        ),
        (
            "t.yaml",
            trigger_yaml(
                "fmt",
                "json",
                "default",
                &sink.url("/json"),
                "  delivery:\n    format: json",
            ),
        ),
    ];
    let mut b = BrokerProc::start(&files, &[], &[]).await;
    let big = "x".repeat(1 << 20);
    let body = format!(
        r#"{{"specversion":"1.0","id":"long","source":"/s","type":"t","datacontenttype":"text/plain","data":"{big}"}}"#
    );
    let (s, _, _) = raw(
        Method::POST,
        &b.url("/fmt/default"),
        headers(&[("content-type", "application/cloudevents+json")]),
        Bytes::from(body),
    )
    .await
    .unwrap();
    assert_eq!(s, StatusCode::ACCEPTED);
    let got = sink.wait_n("/json", 1, WAIT).await;
    assert_eq!(got.len(), 1, "{}", b.logs());
    assert!(
        got[0].headers["content-type"]
            .to_str()
            .unwrap()
            .starts_with("application/cloudevents+json")
    );
    let v: serde_json::Value = serde_json::from_slice(&got[0].body).unwrap();
    assert_eq!(v["id"], "long");
    assert_eq!(v["data"].as_str().map(str::len), Some(1 << 20));
    b.assert_alive();
}
