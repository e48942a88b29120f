//! spright-sample-motion: the whole motion-detection chain (decode, denoise, detect, alert)
//! in one process, for the local stack's event and serving paths.
//!
//! - `spright-sample-motion shm`: a broker-shm function. Joins the dataplane at
//!   `SPRIGHT_CONTROL` (broker-shm's `<shm-run-dir>/control.sock`) as `SPRIGHT_FUNCTION`
//!   (default `motion`). Each event arrives in the pool slot in the CloudEvents JSON format; its
//!   data (`x,y,z` lines, as text or base64) goes through the chain and the reply event, type
//!   `dev.spright.sample.motion` with the JSON summary as data, is left in the slot for the
//!   broker to store and route to the next trigger. Bad samples are refused with 400.
//! - `spright-sample-motion http <listen-addr>`: the same chain as a plain HTTP app (the user
//!   container behind queue-proxy): `POST` the lines, get the JSON summary; `GET` any path
//!   answers 200 (readiness).

#[cfg(test)]
mod common;

use std::path::PathBuf;

use anyhow::Context;
use base64::Engine as _;
use http_body_util::{BodyExt, Limited};
use hyper::{Method, Request, StatusCode};
use spright_core::sdk::{Function, Next, Reject};
use spright_sample_chain::http::{Answer, answer};
use spright_sample_chain::{StepError, run_chain_locally};

/// The reply event's type.
const REPLY_TYPE: &str = "dev.spright.sample.motion";
/// Largest request body of the HTTP mode (the chain's own buffer is 64 KiB).
const MAX_BODY: usize = 64 * 1024;

fn main() {
    let args: Vec<String> = std::env::args().skip(1).collect();
    let result = match args.iter().map(String::as_str).collect::<Vec<_>>()[..] {
        ["shm"] => run_shm(),
        ["http", listen] => run_http(listen),
        _ => Err(anyhow::anyhow!(
            "usage: spright-sample-motion shm | spright-sample-motion http <listen-addr>"
        )),
    };
    if let Err(e) = result {
        eprintln!("spright-sample-motion: {e:#}");
        std::process::exit(64);
    }
}

fn run_shm() -> anyhow::Result<()> {
    spright_core::logging::init("spright-sample-motion", "info");
    let control = std::env::var_os("SPRIGHT_CONTROL")
        .map(PathBuf::from)
        .context("SPRIGHT_CONTROL (broker-shm's control socket) is not set")?;
    let name = std::env::var("SPRIGHT_FUNCTION").unwrap_or_else(|_| "motion".to_owned());
    let f = Function::join(&control, &name)
        .with_context(|| format!("joining the dataplane at {}", control.display()))?;
    tracing::info!(function = %name, id = f.id(), transport = %f.transport_kind(), "attached");
    f.run(|event| {
        let reply = reply_to(&name, event.payload()).map_err(|e| {
            tracing::warn!(status = e.status, error = %e.message, "event refused");
            Reject {
                status: e.status,
                message: e.message,
            }
        })?;
        event.replace(&reply)?;
        Ok(Next::Chain)
    })?;
    Ok(())
}

/// The reply event (JSON format) for one incoming event (JSON format).
fn reply_to(function: &str, event: &[u8]) -> Result<Vec<u8>, StepError> {
    let bad = |message: String| StepError {
        status: 400,
        message,
    };
    let v: serde_json::Value = serde_json::from_slice(event)
        .map_err(|e| bad(format!("the slot does not hold a JSON CloudEvent: {e}")))?;
    let samples: Vec<u8> = match (v.get("data"), v.get("data_base64")) {
        (Some(serde_json::Value::String(s)), _) => s.clone().into_bytes(),
        (_, Some(serde_json::Value::String(b))) => base64::engine::general_purpose::STANDARD
            .decode(b)
            .map_err(|e| bad(format!("data_base64: {e}")))?,
        _ => return Err(bad("the event carries no x,y,z lines as data".to_owned())),
    };
    let summary = run_chain_locally(&samples)?;
    let summary: serde_json::Value = serde_json::from_slice(&summary).map_err(|e| StepError {
        status: 500,
        message: format!("the chain's summary is not JSON: {e}"),
    })?;
    let id = v.get("id").and_then(|i| i.as_str()).unwrap_or("?");
    let mut reply = serde_json::json!({
        "specversion": "1.0",
        "id": format!("{function}-{id}"),
        "source": format!("/fn/{function}"),
        "type": REPLY_TYPE,
        "datacontenttype": "application/json",
        "data": summary,
    });
    if let Some(subject) = v.get("subject").and_then(|s| s.as_str()) {
        reply["subject"] = subject.into();
    }
    Ok(reply.to_string().into_bytes())
}

fn run_http(listen: &str) -> anyhow::Result<()> {
    spright_core::logging::init("spright-sample-motion", "info");
    spright_sample_chain::http::serve("motion app", listen, handle)
}

async fn handle(req: Request<hyper::body::Incoming>) -> Result<Answer, std::convert::Infallible> {
    if req.method() != Method::POST {
        return Ok(answer(
            StatusCode::OK,
            "POST x,y,z accelerometer lines to detect motion\n",
        ));
    }
    let body = match Limited::new(req.into_body(), MAX_BODY).collect().await {
        Ok(b) => b.to_bytes(),
        Err(e) => {
            return Ok(answer(
                StatusCode::PAYLOAD_TOO_LARGE,
                format!("reading the body: {e}\n"),
            ));
        }
    };
    Ok(match run_chain_locally(&body) {
        Ok(summary) => {
            let mut r = answer(StatusCode::OK, summary);
            r.headers_mut().insert(
                hyper::header::CONTENT_TYPE,
                hyper::header::HeaderValue::from_static("application/json"),
            );
            r
        }
        Err(e) => answer(
            StatusCode::from_u16(e.status).unwrap_or(StatusCode::BAD_REQUEST),
            format!("{}\n", e.message),
        ),
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn replies_with_the_summary_as_a_new_event() {
        let ev = serde_json::json!({
            "specversion": "1.0", "id": "e1", "source": "/mqtt", "type": "t",
            "subject": "sensors/1", "data": "0,0,1\n0,0,1\n0,0,3\n0,0,1\n",
        });
        let out = reply_to("motion", ev.to_string().as_bytes()).expect("reply");
        let r: serde_json::Value = serde_json::from_slice(&out).expect("json");
        assert_eq!(r["type"], REPLY_TYPE);
        assert_eq!(r["id"], "motion-e1");
        assert_eq!(r["subject"], "sensors/1");
        assert_eq!(r["data"]["motion"], true);
        assert_eq!(r["data"]["samples"], 4);
    }

    #[test]
    fn reads_base64_data_and_refuses_bad_events() {
        let b64 = base64::engine::general_purpose::STANDARD.encode("0,0,1\n0,0,1\n");
        let ev = serde_json::json!({"specversion": "1.0", "id": "e", "data_base64": b64});
        let r: serde_json::Value =
            serde_json::from_slice(&reply_to("m", ev.to_string().as_bytes()).expect("reply"))
                .expect("json");
        assert_eq!(r["data"]["motion"], false);
        assert_eq!(reply_to("m", b"{oops").unwrap_err().status, 400);
        assert_eq!(reply_to("m", b"{\"id\":\"x\"}").unwrap_err().status, 400);
        let bad = serde_json::json!({"id": "x", "data": "0,oops,1\n"});
        assert_eq!(
            reply_to("m", bad.to_string().as_bytes())
                .unwrap_err()
                .status,
            400
        );
    }

    #[test]
    fn random_slots_never_panic() {
        for slot in common::random_inputs(b"{}\":,0123.-\nabdt_ ", 1500, 88) {
            let _ = reply_to("m", &slot);
        }
    }
}
