//! The shared-memory fast path: two dataplane-SDK functions chained by Triggers, with no HTTP
//! hop between broker and functions (Unix transport, so no root is needed).

mod common;

use common::*;
use http::StatusCode;
use spright_core::sdk::{Function, Next, Reject};
use std::time::{Duration, Instant};

fn join_function(control: std::path::PathBuf, name: &'static str, reply_type: &'static str) {
    std::thread::spawn(move || {
        let f = Function::join(&control, name).expect("join dataplane");
        let _ = f.run(|event| {
            let v: serde_json::Value = serde_json::from_slice(event.payload())
                .map_err(|e| Reject::bad_request(e.to_string()))?;
            let id = v["id"].as_str().unwrap_or("?").to_string();
            let reply = serde_json::json!({
                "specversion": "1.0",
                "id": format!("{name}-{id}"),
                "source": format!("/fn/{name}"),
                "type": reply_type,
                "datacontenttype": "application/json",
                "data": {"via": name, "in": v["data"].clone()},
            });
            event.replace(reply.to_string().as_bytes())?;
            Ok(Next::Chain)
        });
    });
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn trigger_chain_across_shm_functions() {
    let run = tempfile::tempdir().unwrap();
    let sink = Recorder::start().await;
    let fn_trigger = |name: &str, ty: &str, func: &str| {
        format!(
            "apiVersion: eventing.knative.dev/v1\nkind: Trigger\nmetadata: {{name: {name}, namespace: shm, uid: u-{name}}}\nspec:\n  broker: default\n  filters:\n    - exact: {{type: {ty}}}\n  subscriber:\n    ref: {{apiVersion: spright.dev/v1, kind: SprightFunction, name: {func}}}\n  delivery: {{retry: 50, backoffPolicy: linear, backoffDelay: PT0.05S}}\n"
        )
    };
    let files = [
        (
            "b.yaml",
            broker_yaml("shm", "default", "  delivery: {retry: 0}"),
        ),
        ("t1.yaml", fn_trigger("t1", "chain.start", "step1")),
        ("t2.yaml", fn_trigger("t2", "chain.mid", "step2")),
        (
            "t3.yaml",
            trigger_yaml(
                "shm",
                "t3",
                "default",
                &sink.url("/done"),
                "  filters:\n    - exact: {type: chain.done}",
            ),
        ),
    ];
    let run_dir = run.path().to_str().unwrap().to_string();
    let mut b = BrokerProc::start(
        &files,
        &[
            "--shm-functions",
            "step1,step2",
            "--shm-transport",
            "unix",
            "--shm-run-dir",
            &run_dir,
        ],
        &[],
    )
    .await;
    let control = run.path().join("control.sock");
    join_function(control.clone(), "step1", "chain.mid");
    join_function(control, "step2", "chain.done");
    let deadline = Instant::now() + Duration::from_secs(10);
    while b.logs().matches("shared-memory function joined").count() < 2 {
        assert!(
            Instant::now() < deadline,
            "functions did not join: {}",
            b.logs()
        );
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    let url = b.url("/shm/default");
    for i in 0..20 {
        assert_eq!(
            send_binary(&url, &format!("e{i}"), "chain.start", &[]).await,
            StatusCode::ACCEPTED
        );
    }
    let got = sink.wait_n("/done", 20, Duration::from_secs(20)).await;
    assert_eq!(got.len(), 20, "{}", b.logs());
    let r = got
        .iter()
        .find(|r| r.ce("id").as_deref() == Some("step2-step1-e0"))
        .expect("chained id");
    assert_eq!(r.ce("source").as_deref(), Some("/fn/step2"));
    let body: serde_json::Value = serde_json::from_slice(&r.body).unwrap();
    assert_eq!(body["via"], "step2");
    assert_eq!(body["in"]["via"], "step1");
    assert_eq!(body["in"]["in"]["hello"], "world");
    // A burst: more events in flight than a Unix datagram queue holds (10 by default), so
    // the reply thread must hand sends to tasks instead of blocking; nothing is lost.
    let mut burst = tokio::task::JoinSet::new();
    for i in 0..200 {
        let url = url.clone();
        burst.spawn(
            async move { send_binary(&url, &format!("burst{i}"), "chain.start", &[]).await },
        );
    }
    while let Some(code) = burst.join_next().await {
        assert_eq!(code.expect("send task"), StatusCode::ACCEPTED);
    }
    let got = sink.wait_n("/done", 220, Duration::from_secs(60)).await;
    for i in 0..200 {
        let id = format!("step2-step1-burst{i}");
        assert!(
            got.iter()
                .any(|r| r.ce("id").as_deref() == Some(id.as_str())),
            "{id} missing: {}",
            b.logs()
        );
    }
    b.assert_alive();
}
