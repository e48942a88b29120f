//! rekt `new_trigger_filters` features re-expressed, plus manifest validation and watching.

mod common;

use common::*;
use http::StatusCode;
use std::time::Duration;

const WAIT: Duration = Duration::from_secs(10);

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn every_dialect_routes_as_knative_does() {
    let sink = Recorder::start().await;
    // (trigger name, spec YAML under `spec:`) and which event ids it must receive.
    let triggers: Vec<(&str, &str, &[&str])> = vec![
        (
            "exact",
            "  filters:\n    - exact: {type: ft.a}",
            &["e1", "e4"],
        ),
        (
            "prefix",
            "  filters:\n    - prefix: {type: ft.}",
            &["e1", "e2", "e4"],
        ),
        (
            "suffix",
            "  filters:\n    - suffix: {source: /special}",
            &["e3"],
        ),
        (
            "all",
            "  filters:\n    - all:\n        - exact: {type: ft.a}\n        - exact: {myext: yes}",
            &["e4"],
        ),
        (
            "any",
            "  filters:\n    - any:\n        - exact: {type: ft.b}\n        - exact: {source: /special}",
            &["e2", "e3"],
        ),
        (
            "anymulti",
            "  filters:\n    - any:\n        - exact: {type: ft.a}\n        - exact: {type: ft.b}",
            &["e1", "e2", "e4"],
        ),
        (
            "not",
            "  filters:\n    - not:\n        prefix: {type: ft.}",
            &["e3"],
        ),
        (
            "cesql",
            "  filters:\n    - cesql: \"type = 'ft.a' AND EXISTS myext\"",
            &["e4"],
        ),
        ("missingattr", "  filters:\n    - exact: {nothere: x}", &[]),
        (
            "cesqlmissing",
            "  filters:\n    - cesql: \"nothere = 'x' OR type = 'ft.b'\"",
            &[],
        ),
        ("attrs", "  filter:\n    attributes: {type: ft.b}", &["e2"]),
        (
            "attrsany",
            "  filter:\n    attributes: {myext: \"\"}",
            &["e4"],
        ),
        (
            "attrsemptyfilters",
            "  filter:\n    attributes: {type: ft.b}\n  filters: []",
            &["e2"],
        ),
        (
            "override",
            "  filter:\n    attributes: {type: ft.b}\n  filters:\n    - exact: {type: other.x}",
            &["e3"],
        ),
        ("nofilter", "", &["e1", "e2", "e3", "e4"]),
    ];
    let mut files = vec![(
        "broker.yaml".to_string(),
        broker_yaml("flt", "default", "  delivery: {retry: 0}"),
    )];
    for (name, spec, _) in &triggers {
        files.push((
            format!("{name}.yaml"),
            trigger_yaml("flt", name, "default", &sink.url(&format!("/{name}")), spec),
        ));
    }
    let files: Vec<(&str, String)> = files.iter().map(|(n, y)| (n.as_str(), y.clone())).collect();
    let mut b = BrokerProc::start(&files, &[], &[]).await;
    let url = b.url("/flt/default");
    assert_eq!(
        send_binary(&url, "e1", "ft.a", &[]).await,
        StatusCode::ACCEPTED
    );
    assert_eq!(
        send_binary(&url, "e2", "ft.b", &[]).await,
        StatusCode::ACCEPTED
    );
    assert_eq!(
        send_binary(&url, "e3", "other.x", &[("ce-source", "/special")]).await,
        StatusCode::ACCEPTED
    );
    assert_eq!(
        send_binary(&url, "e4", "ft.a", &[("ce-myext", "yes")]).await,
        StatusCode::ACCEPTED
    );
    // Wait for the unfiltered trigger to see everything, then a little for stragglers.
    sink.wait_n("/nofilter", 4, WAIT).await;
    let expected_total: usize = triggers.iter().map(|t| t.2.len()).sum();
    sink.wait_for(WAIT, |v| v.len() >= expected_total).await;
    tokio::time::sleep(Duration::from_millis(300)).await;
    for (name, _, want) in &triggers {
        let mut got: Vec<String> = sink
            .on(&format!("/{name}"))
            .iter()
            .filter_map(|r| r.ce("id"))
            .collect();
        got.sort();
        assert_eq!(got, want.to_vec(), "trigger {name}\n{}", b.logs());
    }
    b.assert_alive();
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn invalid_triggers_are_rejected_with_reason_and_watch_applies_changes() {
    let sink = Recorder::start().await;
    let files = [
        (
            "broker.yaml",
            broker_yaml("wat", "default", "  delivery: {retry: 0}"),
        ),
        (
            "bad.yaml",
            trigger_yaml(
                "wat",
                "bad",
                "default",
                &sink.url("/bad"),
                "  filters:\n    - exact: {type: a}\n      prefix: {type: b}",
            ),
        ),
        (
            "badsql.yaml",
            trigger_yaml(
                "wat",
                "badsql",
                "default",
                &sink.url("/badsql"),
                "  filters:\n    - cesql: \"type = \"",
            ),
        ),
    ];
    let mut b = BrokerProc::start(&files, &[], &[]).await;
    let logs = b.logs();
    assert!(
        logs.contains("multiple dialects found, filters can have only one dialect set"),
        "{logs}"
    );
    assert!(logs.contains("spec.filters[0].cesql"), "{logs}");
    let url = b.url("/wat/default");
    assert_eq!(
        send_binary(&url, "before", "w.t", &[]).await,
        StatusCode::ACCEPTED
    );
    // Add a valid trigger while running: it starts at the log tail (new events only).
    b.write_manifest(
        "good.yaml",
        &trigger_yaml(
            "wat",
            "good",
            "default",
            &sink.url("/good"),
            "  filters:\n    - exact: {type: w.t}",
        ),
    );
    let mut delivered = false;
    for i in 0..100 {
        assert_eq!(
            send_binary(&url, &format!("after-{i}"), "w.t", &[]).await,
            StatusCode::ACCEPTED
        );
        if !sink
            .wait_n("/good", 1, Duration::from_millis(100))
            .await
            .is_empty()
        {
            delivered = true;
            break;
        }
    }
    assert!(delivered, "watched trigger never started: {}", b.logs());
    assert!(
        sink.on("/good")
            .iter()
            .all(|r| r.ce("id").as_deref() != Some("before"))
    );
    assert!(sink.on("/bad").is_empty() && sink.on("/badsql").is_empty());
    // Removing the broker manifest makes the broker unknown (404).
    std::fs::remove_file(b.manifests.join("broker.yaml")).unwrap();
    let mut gone = false;
    for _ in 0..100 {
        if send_binary(&url, "x", "w.t", &[]).await == StatusCode::NOT_FOUND {
            gone = true;
            break;
        }
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    assert!(gone);
    b.assert_alive();
}
