//! kill -9 with events in flight, restart, every 202'd event delivered; retention bounds.

mod common;

use common::*;
use http::StatusCode;
use std::collections::BTreeSet;
use std::sync::{Arc, Mutex};
use std::time::Duration;

const WAIT: Duration = Duration::from_secs(30);

fn ids(v: &[Received]) -> BTreeSet<String> {
    v.iter().filter_map(|r| r.ce("id")).collect()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn kill9_then_restart_delivers_every_accepted_event() {
    for durability in ["append", "msync"] {
        let sub_port = free_port();
        let files = [
            (
                "b.yaml",
                broker_yaml("dur", "default", "  delivery: {retry: 0}"),
            ),
            (
                "t.yaml",
                trigger_yaml(
                    "dur",
                    "t",
                    "default",
                    &format!("http://127.0.0.1:{sub_port}/sink"),
                    "  delivery:\n    retry: 1000\n    backoffPolicy: linear\n    backoffDelay: PT0.05S",
                ),
            ),
        ];
        let mut b = BrokerProc::start(&files, &["--durability", durability], &[]).await;
        let url = b.url("/dur/default");
        // Phase 1: the subscriber is down; everything stays in the log, in flight.
        let mut accepted = BTreeSet::new();
        for i in 0..150 {
            let id = format!("down-{i}");
            assert_eq!(
                send_binary(&url, &id, "d.t", &[]).await,
                StatusCode::ACCEPTED
            );
            accepted.insert(id);
        }
        // Phase 2: a slow subscriber comes up while senders keep going; kill -9 mid-stream.
        let sink = Recorder::scripted_on(sub_port, |_, _| Reply {
            delay: Duration::from_millis(5),
            ..Reply::status(200)
        })
        .await;
        let acc = Arc::new(Mutex::new(BTreeSet::new()));
        let mut senders = Vec::new();
        for s in 0..4 {
            let (url, acc) = (url.clone(), acc.clone());
            senders.push(tokio::spawn(async move {
                for i in 0..200 {
                    let id = format!("live-{s}-{i}");
                    if send_binary(&url, &id, "d.t", &[]).await == StatusCode::ACCEPTED {
                        acc.lock().unwrap().insert(id);
                    }
                }
            }));
        }
        sink.wait_n("/sink", 100, WAIT).await;
        b.kill9();
        for s in senders {
            let _ = s.await;
        }
        accepted.extend(acc.lock().unwrap().iter().cloned());
        let before = ids(&sink.on("/sink"));
        assert!(
            accepted.len() > 150,
            "some live sends were accepted before the kill"
        );
        // Phase 3: restart on the same data dir; every accepted id arrives.
        b.spawn().await;
        sink.wait_for(WAIT, |v| accepted.is_subset(&ids(v))).await;
        let got = ids(&sink.on("/sink"));
        let missing: Vec<_> = accepted.difference(&got).collect();
        assert!(
            missing.is_empty(),
            "[{durability}] {} of {} accepted events lost (delivered before kill: {}): {:?}\n{}",
            missing.len(),
            accepted.len(),
            before.len(),
            missing.iter().take(10).collect::<Vec<_>>(),
            b.logs()
        );
        b.assert_alive();
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn retention_bounds_disk_and_refuses_instead_of_dropping() {
    let sub_port = free_port();
    let files = [
        (
            "b.yaml",
            broker_yaml("ret", "default", "  delivery: {retry: 0}"),
        ),
        (
            "t.yaml",
            trigger_yaml(
                "ret",
                "t",
                "default",
                &format!("http://127.0.0.1:{sub_port}/sink"),
                "  delivery:\n    retry: 1000\n    backoffPolicy: linear\n    backoffDelay: PT0.05S",
            ),
        ),
    ];
    let seg = 8192u64;
    let retention = seg * 4;
    let mut b = BrokerProc::start(
        &files,
        &[
            "--segment-bytes",
            "8192",
            "--retention-bytes",
            &retention.to_string(),
        ],
        &[],
    )
    .await;
    let url = b.url("/ret/default");
    // Subscriber down: the log fills to the retention limit, then the ingress says 503.
    let mut accepted = BTreeSet::new();
    let mut refused = 0;
    for i in 0..400 {
        let id = format!("r-{i}");
        match send_binary(&url, &id, "r.t", &[]).await {
            StatusCode::ACCEPTED => {
                accepted.insert(id);
            }
            StatusCode::SERVICE_UNAVAILABLE => refused += 1,
            other => panic!("unexpected {other}"),
        }
    }
    assert!(refused > 0, "retention limit never reached");
    let segs = |b: &BrokerProc| {
        dir_bytes(&b.data.join("ret/default")) - dir_bytes(&b.data.join("ret/default/cursors"))
    };
    assert!(segs(&b) <= retention, "{} > {retention}", segs(&b));
    // Subscriber up: everything accepted is delivered and consumed segments are deleted.
    let sink = Recorder::scripted_on(sub_port, |_, _| Reply::status(200)).await;
    sink.wait_for(WAIT, |v| accepted.is_subset(&ids(v))).await;
    assert!(accepted.is_subset(&ids(&sink.on("/sink"))), "{}", b.logs());
    // Once caught up the broker accepts again and old segments are gone.
    for i in 0..50 {
        assert_eq!(
            send_binary(&url, &format!("again-{i}"), "r.t", &[]).await,
            StatusCode::ACCEPTED
        );
    }
    sink.wait_n("/sink", accepted.len() + 50, WAIT).await;
    assert!(segs(&b) <= retention);
    b.assert_alive();
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn broker_without_triggers_never_fills_and_trigger_updates_keep_position() {
    let sub_port = free_port();
    let files = [(
        "b.yaml",
        broker_yaml("upd", "default", "  delivery: {retry: 0}"),
    )];
    let mut b = BrokerProc::start(
        &files,
        &["--segment-bytes", "8192", "--retention-bytes", "32768"],
        &[],
    )
    .await;
    let url = b.url("/upd/default");
    // No trigger: events are accepted and dropped (as Knative does), the log never fills.
    for i in 0..400 {
        assert_eq!(
            send_binary(&url, &format!("n-{i}"), "u.t", &[]).await,
            StatusCode::ACCEPTED,
            "event {i}"
        );
    }
    // A trigger whose subscriber is down accumulates a backlog...
    let trig = |delay: &str| {
        trigger_yaml(
            "upd",
            "t",
            "default",
            &format!("http://127.0.0.1:{sub_port}/sink"),
            &format!(
                "  delivery:\n    retry: 1000\n    backoffPolicy: linear\n    backoffDelay: {delay}"
            ),
        )
    };
    b.write_manifest("t.yaml", &trig("PT0.05S"));
    let deadline = std::time::Instant::now() + Duration::from_secs(10);
    while !b.logs().contains("trigger started") {
        assert!(std::time::Instant::now() < deadline, "{}", b.logs());
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    let mut accepted = BTreeSet::new();
    for i in 0..100 {
        let id = format!("u-{i}");
        assert_eq!(
            send_binary(&url, &id, "u.t", &[]).await,
            StatusCode::ACCEPTED
        );
        accepted.insert(id);
    }
    // ...then its spec changes (restart with the same position) and the subscriber comes up.
    b.write_manifest("t.yaml", &trig("PT0.02S"));
    tokio::time::sleep(Duration::from_millis(300)).await;
    let sink = Recorder::scripted_on(sub_port, |_, _| Reply::status(200)).await;
    sink.wait_for(WAIT, |v| accepted.is_subset(&ids(v))).await;
    let got = ids(&sink.on("/sink"));
    assert!(
        accepted.is_subset(&got),
        "missing {:?}\n{}",
        accepted.difference(&got).take(5).collect::<Vec<_>>(),
        b.logs()
    );
    assert!(
        got.iter().all(|id| !id.starts_with("n-")),
        "events before the trigger existed are not delivered"
    );
    b.assert_alive();
}
