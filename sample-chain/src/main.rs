//! spright-sample-chain: one step of the motion-detection chain as a process.
//!
//! - `spright-sample-chain <step>`: joins the dataplane (control socket from `SPRIGHT_CONTROL`)
//!   and serves the step over shared memory.
//! - `spright-sample-chain http <step> <listen-addr> [next-url]`: the same step as an HTTP
//!   service that posts its result to the next step's URL, the way Knative chains functions.

use std::path::PathBuf;
use std::sync::Arc;

use anyhow::{Context, bail};
use bytes::Bytes;
use http_body_util::{BodyExt, Full};
use hyper::{Request, StatusCode};
use hyper_util::client::legacy::Client;
use hyper_util::client::legacy::connect::HttpConnector;
use hyper_util::rt::TokioExecutor;
use spright_core::sdk::{Function, Next, Reject};
use spright_sample_chain::http::{Answer, answer, serve};
use spright_sample_chain::{STEPS, run_step};

fn main() {
    let args: Vec<String> = std::env::args().skip(1).collect();
    let result = match args.first().map(String::as_str) {
        Some("http") => run_http(&args[1..]),
        Some(step) => run_shm(step),
        None => Err(anyhow::anyhow!(
            "usage: spright-sample-chain <step> | spright-sample-chain http <step> <listen> [next-url]; steps: {}",
            STEPS.join(", ")
        )),
    };
    if let Err(e) = result {
        eprintln!("spright-sample-chain: {e:#}");
        std::process::exit(64);
    }
}

fn check_step(step: &str) -> anyhow::Result<()> {
    if !STEPS.contains(&step) {
        bail!("unknown step {step:?}; steps: {}", STEPS.join(", "));
    }
    Ok(())
}

fn run_shm(step: &str) -> anyhow::Result<()> {
    check_step(step)?;
    spright_core::logging::init(step, "info");
    let control = std::env::var_os("SPRIGHT_CONTROL")
        .map(PathBuf::from)
        .context("SPRIGHT_CONTROL (the gateway's control socket) is not set")?;
    let name = std::env::var("SPRIGHT_FUNCTION").unwrap_or_else(|_| step.to_owned());
    let f = Function::join(&control, &name)
        .with_context(|| format!("joining the dataplane at {}", control.display()))?;
    tracing::info!(function = %name, id = f.id(), transport = %f.transport_kind(), "attached");
    f.run(|event| {
        let len = event.payload().len();
        let out = run_step(step, event.buffer_mut(), len).map_err(|e| Reject {
            status: e.status,
            message: e.message,
        })?;
        event.set_len(out)?;
        Ok(Next::Chain)
    })?;
    Ok(())
}

fn run_http(args: &[String]) -> anyhow::Result<()> {
    let (step, listen) = match args {
        [step, listen, ..] => (step.clone(), listen),
        _ => bail!("usage: spright-sample-chain http <step> <listen-addr> [next-url]"),
    };
    check_step(&step)?;
    let next: Option<hyper::Uri> = args
        .get(2)
        .map(|u| u.parse())
        .transpose()
        .context("next URL")?;
    let client: Client<HttpConnector, Full<Bytes>> =
        Client::builder(TokioExecutor::new()).build_http();
    let state = Arc::new((step, next, client));
    serve("chain step", listen, move |req| {
        handle(Arc::clone(&state), req)
    })
}

type State = (
    String,
    Option<hyper::Uri>,
    Client<HttpConnector, Full<Bytes>>,
);

async fn handle(
    state: Arc<State>,
    req: Request<hyper::body::Incoming>,
) -> Result<Answer, std::convert::Infallible> {
    let (step, next, client) = &*state;
    let reply = |status: u16, body: Bytes| {
        answer(
            StatusCode::from_u16(status).unwrap_or(StatusCode::INTERNAL_SERVER_ERROR),
            body,
        )
    };
    let body = match req.into_body().collect().await {
        Ok(b) => b.to_bytes(),
        Err(e) => return Ok(reply(400, Bytes::from(e.to_string()))),
    };
    let mut buf = vec![0u8; (body.len() * 3 + 64).max(4096)];
    buf[..body.len()].copy_from_slice(&body);
    let len = match run_step(step, &mut buf, body.len()) {
        Ok(n) => n,
        Err(e) => return Ok(reply(e.status, Bytes::from(e.message))),
    };
    buf.truncate(len);
    let Some(next) = next else {
        return Ok(reply(200, Bytes::from(buf)));
    };
    let forward = Request::post(next.clone())
        .body(Full::new(Bytes::from(buf)))
        .map_err(|e| e.to_string());
    let result = match forward {
        Ok(r) => client.request(r).await.map_err(|e| e.to_string()),
        Err(e) => Err(e),
    };
    match result {
        Ok(resp) => {
            let status = resp.status().as_u16();
            match resp.into_body().collect().await {
                Ok(b) => Ok(reply(status, b.to_bytes())),
                Err(e) => Ok(reply(502, Bytes::from(e.to_string()))),
            }
        }
        Err(e) => Ok(reply(502, Bytes::from(e))),
    }
}
