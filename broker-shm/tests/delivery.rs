//! Retries with backoff, dead-letter sink extensions, timeouts, replies and TTL exhaustion.

mod common;

use base64::Engine as _;
use bytes::Bytes;
use common::*;
use http::StatusCode;
use std::time::Duration;

const WAIT: Duration = Duration::from_secs(15);

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn flaky_subscriber_retries_with_backoff_then_dls() {
    // /flaky fails twice with 503 then accepts; /down always answers 500 with a body;
    // /bad answers 400 (not retried); /junk answers 200 with a non-event body (502).
    let sink = Recorder::scripted(|r, n| match r.path.as_str() {
        "/flaky" if n < 2 => Reply::status(503),
        "/down" => Reply {
            body: Bytes::from_static(b"subscriber exploded"),
            ..Reply::status(500)
        },
        "/bad" => Reply::status(400),
        "/junk" => Reply {
            body: Bytes::from_static(b"<html>not an event</html>"),
            headers: vec![("content-type".into(), "text/html".into())],
            ..Reply::status(200)
        },
        _ => Reply::status(202),
    })
    .await;
    let dls = sink.url("/dls");
    let delivery = |retry: u32, policy: &str| {
        format!(
            "  delivery:\n    retry: {retry}\n    backoffPolicy: {policy}\n    backoffDelay: PT0.1S\n    deadLetterSink:\n      uri: {dls}"
        )
    };
    let files = [
        (
            "b.yaml",
            broker_yaml("dlv", "default", "  delivery: {retry: 0}"),
        ),
        (
            "flaky.yaml",
            trigger_yaml(
                "dlv",
                "flaky",
                "default",
                &sink.url("/flaky"),
                &format!(
                    "  filters:\n    - exact: {{type: to.flaky}}\n{}",
                    delivery(3, "exponential")
                ),
            ),
        ),
        (
            "down.yaml",
            trigger_yaml(
                "dlv",
                "down",
                "default",
                &sink.url("/down"),
                &format!(
                    "  filters:\n    - exact: {{type: to.down}}\n{}",
                    delivery(2, "linear")
                ),
            ),
        ),
        (
            "bad.yaml",
            trigger_yaml(
                "dlv",
                "bad",
                "default",
                &sink.url("/bad"),
                &format!(
                    "  filters:\n    - exact: {{type: to.bad}}\n{}",
                    delivery(5, "linear")
                ),
            ),
        ),
        (
            "junk.yaml",
            trigger_yaml(
                "dlv",
                "junk",
                "default",
                &sink.url("/junk"),
                &format!(
                    "  filters:\n    - exact: {{type: to.junk}}\n{}",
                    delivery(1, "linear")
                ),
            ),
        ),
    ];
    let mut b = BrokerProc::start(&files, &[], &[]).await;
    let url = b.url("/dlv/default");
    for (id, ty) in [
        ("f", "to.flaky"),
        ("d", "to.down"),
        ("x", "to.bad"),
        ("j", "to.junk"),
    ] {
        assert_eq!(send_binary(&url, id, ty, &[]).await, StatusCode::ACCEPTED);
    }
    let flaky = sink.wait_n("/flaky", 3, WAIT).await;
    assert_eq!(flaky.len(), 3, "{}", b.logs());
    // Exponential PT0.1S: 200 ms then 400 ms between attempts (no upper timing assertion).
    assert!(flaky[1].at - flaky[0].at >= Duration::from_millis(190));
    assert!(flaky[2].at - flaky[1].at >= Duration::from_millis(390));
    let dead = sink.wait_n("/dls", 3, WAIT).await;
    assert_eq!(dead.len(), 3, "{}", b.logs());
    let down = sink.on("/down");
    assert_eq!(down.len(), 3, "1 attempt + 2 retries");
    // Linear PT0.1S: 100 ms then 200 ms.
    assert!(down[1].at - down[0].at >= Duration::from_millis(90));
    assert!(down[2].at - down[1].at >= Duration::from_millis(190));
    assert_eq!(sink.on("/bad").len(), 1, "400 is not retried");
    assert_eq!(
        sink.on("/junk").len(),
        2,
        "a non-event 2xx body is a 502, retried"
    );
    let by = |id: &str| {
        dead.iter()
            .find(|r| r.ce("id").as_deref() == Some(id))
            .cloned()
            .unwrap()
    };
    let d = by("d");
    assert_eq!(d.ce("knativeerrordest"), Some(sink.url("/down")));
    assert_eq!(d.ce("knativeerrorcode").as_deref(), Some("500"));
    let data = base64::engine::general_purpose::STANDARD
        .decode(d.ce("knativeerrordata").unwrap())
        .unwrap();
    assert_eq!(data, b"subscriber exploded");
    assert_eq!(
        d.body,
        Bytes::from_static(b"{\"hello\":\"world\"}"),
        "original event data"
    );
    assert_eq!(by("x").ce("knativeerrorcode").as_deref(), Some("400"));
    assert_eq!(by("j").ce("knativeerrorcode").as_deref(), Some("502"));
    assert!(dead.iter().all(|r| r.ce("id").as_deref() != Some("f")));
    let m = b.metrics().await;
    assert!(
        m.contains(
            r#"broker_shm_deliveries_total{trigger="dlv.down.uid-down",outcome="dead_lettered"} 1"#
        ),
        "{m}"
    );
    assert!(
        m.contains(
            r#"broker_shm_deliveries_total{trigger="dlv.flaky.uid-flaky",outcome="delivered"} 1"#
        ),
        "{m}"
    );
    assert!(
        m.contains(r#"broker_shm_ingress_requests_total{broker="dlv/default",code="202"} 4"#),
        "{m}"
    );
    assert!(
        m.contains("broker_shm_log_disk_bytes{broker=\"dlv/default\"}"),
        "{m}"
    );
    b.assert_alive();
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn timeout_and_unreachable_subscriber_go_to_dls() {
    let sink = Recorder::scripted(|r, _| match r.path.as_str() {
        "/slow" => Reply {
            delay: Duration::from_secs(3),
            ..Reply::status(200)
        },
        _ => Reply::status(200),
    })
    .await;
    let dead_port = free_port();
    let files = [
        (
            "b.yaml",
            broker_yaml("tmo", "default", "  delivery: {retry: 0}"),
        ),
        (
            "slow.yaml",
            trigger_yaml(
                "tmo",
                "slow",
                "default",
                &sink.url("/slow"),
                &format!(
                    "  filters:\n    - exact: {{type: slow}}\n  delivery:\n    timeout: PT0.3S\n    deadLetterSink:\n      uri: {}",
                    sink.url("/dls")
                ),
            ),
        ),
        (
            "gone.yaml",
            trigger_yaml(
                "tmo",
                "gone",
                "default",
                &format!("http://127.0.0.1:{dead_port}/nothing"),
                &format!(
                    "  filters:\n    - exact: {{type: gone}}\n  delivery:\n    retry: 1\n    backoffDelay: PT0.05S\n    deadLetterSink:\n      uri: {}",
                    sink.url("/dls")
                ),
            ),
        ),
    ];
    let mut b = BrokerProc::start(&files, &[], &[]).await;
    let url = b.url("/tmo/default");
    assert_eq!(
        send_binary(&url, "s", "slow", &[]).await,
        StatusCode::ACCEPTED
    );
    assert_eq!(
        send_binary(&url, "g", "gone", &[]).await,
        StatusCode::ACCEPTED
    );
    let dead = sink.wait_n("/dls", 2, WAIT).await;
    assert_eq!(dead.len(), 2, "{}", b.logs());
    for r in &dead {
        assert!(r.ce("knativeerrordest").is_some());
        // No response: 500 and the dispatch error as the data, as Knative's dispatcher.
        assert_eq!(r.ce("knativeerrorcode").as_deref(), Some("500"));
        let data = base64::engine::general_purpose::STANDARD
            .decode(r.ce("knativeerrordata").unwrap_or_default())
            .unwrap_or_default();
        assert!(data.starts_with(b"dispatch error: "), "{data:?}");
    }
    b.assert_alive();
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn reply_chain_and_ttl_exhaustion() {
    // step1 replies with chain.step2; step2 replies with chain.done; /loop always replies
    // with the same type, so only the TTL stops it.
    let sink = Recorder::scripted(|r, n| match r.path.as_str() {
        "/step1" => Reply::event(
            &format!("s2-{}", r.ce("id").unwrap_or_default()),
            "chain.step2",
        ),
        "/step2" => Reply::event(
            &format!("done-{}", r.ce("id").unwrap_or_default()),
            "chain.done",
        ),
        "/loop" => Reply::event(&format!("loop-{n}"), "loop.again"),
        _ => Reply::status(202),
    })
    .await;
    let t = |name: &str, ty: &str| {
        trigger_yaml(
            "rpl",
            name,
            "default",
            &sink.url(&format!("/{name}")),
            &format!("  filters:\n    - exact: {{type: {ty}}}\n  delivery: {{retry: 0}}"),
        )
    };
    let files = [
        (
            "b.yaml",
            broker_yaml("rpl", "default", "  delivery: {retry: 0}"),
        ),
        ("step1.yaml", t("step1", "chain.step1")),
        ("step2.yaml", t("step2", "chain.step2")),
        ("done.yaml", t("done", "chain.done")),
        ("loop.yaml", t("loop", "loop.again")),
    ];
    let mut b = BrokerProc::start(&files, &[], &[("MAX_TTL", "5")]).await;
    let url = b.url("/rpl/default");
    assert_eq!(
        send_binary(&url, "c1", "chain.step1", &[]).await,
        StatusCode::ACCEPTED
    );
    let done = sink.wait_n("/done", 1, WAIT).await;
    assert_eq!(done.len(), 1, "{}", b.logs());
    assert_eq!(done[0].ce("id").as_deref(), Some("done-s2-c1"));
    assert_eq!(done[0].ce("source").as_deref(), Some("/reply"));
    assert!(done[0].ce("knativebrokerttl").is_none());
    // TTL: ingress sets 5; each reply re-enters with TTL-1; at 0 it is dropped.
    assert_eq!(
        send_binary(&url, "l0", "loop.again", &[]).await,
        StatusCode::ACCEPTED
    );
    sink.wait_n("/loop", 5, WAIT).await;
    tokio::time::sleep(Duration::from_millis(500)).await;
    let loops = sink.on("/loop").len();
    assert_eq!(loops, 5, "TTL 5 allows exactly 5 deliveries\n{}", b.logs());
    b.assert_alive();
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn broker_default_delivery_and_long_response_message() {
    let big = "y".repeat(512 * 1024);
    let big_reply = big.clone();
    let sink = Recorder::scripted(move |r, _| match r.path.as_str() {
        "/fails" => Reply::status(500),
        "/long" => Reply {
            body: bytes::Bytes::from(big_reply.clone()),
            ..Reply::event("long-reply", "long.reply")
        },
        _ => Reply::status(202),
    })
    .await;
    // The broker's delivery (DLS, one retry) applies to a trigger that sets none.
    let broker_delivery = format!(
        "  delivery:\n    retry: 1\n    backoffDelay: PT0.05S\n    deadLetterSink:\n      uri: {}",
        sink.url("/broker-dls")
    );
    let files = [
        ("b.yaml", broker_yaml("bdd", "default", &broker_delivery)),
        (
            "f.yaml",
            trigger_yaml(
                "bdd",
                "fails",
                "default",
                &sink.url("/fails"),
                "  filters:\n    - exact: {type: to.fails}",
            ),
        ),
        (
            "l.yaml",
            trigger_yaml(
                "bdd",
                "long",
                "default",
                &sink.url("/long"),
                "  filters:\n    - exact: {type: to.long}",
            ),
        ),
        (
            "r.yaml",
            trigger_yaml(
                "bdd",
                "reply",
                "default",
                &sink.url("/got-reply"),
                "  filters:\n    - exact: {type: long.reply}",
            ),
        ),
    ];
    let mut b = BrokerProc::start(&files, &[], &[]).await;
    let url = b.url("/bdd/default");
    assert_eq!(
        send_binary(&url, "a", "to.fails", &[]).await,
        StatusCode::ACCEPTED
    );
    assert_eq!(
        send_binary(&url, "b", "to.long", &[]).await,
        StatusCode::ACCEPTED
    );
    let dead = sink.wait_n("/broker-dls", 1, WAIT).await;
    assert_eq!(dead.len(), 1, "{}", b.logs());
    assert_eq!(sink.on("/fails").len(), 2, "broker default retry: 1");
    assert_eq!(dead[0].ce("knativeerrorcode").as_deref(), Some("500"));
    let got = sink.wait_n("/got-reply", 1, WAIT).await;
    assert_eq!(got.len(), 1, "{}", b.logs());
    assert_eq!(got[0].body.len(), big.len());
    b.assert_alive();
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn retry_after_is_honoured_up_to_retry_after_max() {
    // Both subscribers answer 503 with `Retry-After: 1` once, then accept. With
    // retryAfterMax the retry waits the asked second; without it, the backoff (10 ms).
    let sink = Recorder::scripted(|_, n| {
        if n == 0 {
            Reply {
                headers: vec![("retry-after".into(), "1".into())],
                ..Reply::status(503)
            }
        } else {
            Reply::status(202)
        }
    })
    .await;
    let trig = |name: &str, max: &str| {
        trigger_yaml(
            "ra",
            name,
            "default",
            &sink.url(&format!("/{name}")),
            &format!(
                "  filters:\n    - exact: {{type: to.{name}}}\n  delivery:\n    retry: 2\n    backoffPolicy: linear\n    backoffDelay: PT0.01S\n{max}"
            ),
        )
    };
    let files = [
        ("b.yaml", broker_yaml("ra", "default", "")),
        ("honour.yaml", trig("honour", "    retryAfterMax: PT5S")),
        ("ignore.yaml", trig("ignore", "")),
    ];
    let mut b = BrokerProc::start(&files, &[], &[]).await;
    let url = b.url("/ra/default");
    assert_eq!(
        send_binary(&url, "h", "to.honour", &[]).await,
        StatusCode::ACCEPTED
    );
    assert_eq!(
        send_binary(&url, "i", "to.ignore", &[]).await,
        StatusCode::ACCEPTED
    );
    let honour = sink.wait_n("/honour", 2, WAIT).await;
    let ignore = sink.wait_n("/ignore", 2, WAIT).await;
    assert_eq!(honour.len(), 2, "{}", b.logs());
    assert_eq!(ignore.len(), 2, "{}", b.logs());
    // Lower bound only (no upper timing assertion).
    assert!(
        honour[1].at - honour[0].at >= Duration::from_millis(950),
        "Retry-After: 1 honoured: {:?}",
        honour[1].at - honour[0].at
    );
    b.assert_alive();
}
