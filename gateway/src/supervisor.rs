//! Starts the function processes the chain file gives a command for, and restarts them with
//! backoff when they exit (their slots are reclaimed by the host meanwhile).

use std::path::{Path, PathBuf};
use std::time::Duration;

use spright_core::chain::FunctionSpec;
use tokio::process::{Child, Command};
use tokio::sync::watch;
use tracing::{error, info, warn};

/// Spawns a supervisor task for every function with a command. The tasks end (killing their
/// child) when `stop` turns true.
pub fn supervise(
    functions: &[FunctionSpec],
    control: &Path,
    stop: &watch::Receiver<bool>,
) -> Vec<tokio::task::JoinHandle<()>> {
    functions
        .iter()
        .filter(|f| !f.command.is_empty())
        .map(|f| {
            let f = f.clone();
            let control = control.to_owned();
            let stop = stop.clone();
            tokio::spawn(async move { run(f, control, stop).await })
        })
        .collect()
}

fn spawn(f: &FunctionSpec, control: &Path) -> std::io::Result<Child> {
    let program = resolve(&f.command[0]);
    Command::new(program)
        .args(&f.command[1..])
        .env("SPRIGHT_CONTROL", control)
        .env("SPRIGHT_FUNCTION", &f.name)
        .kill_on_drop(true)
        .spawn()
}

/// A bare program name is looked up next to the gateway's own executable first, so the
/// sample chain runs from a build directory without installing anything.
fn resolve(program: &str) -> PathBuf {
    let beside_us = std::env::current_exe()
        .ok()
        .and_then(|p| p.parent().map(|dir| dir.join(program)))
        .filter(|candidate| !program.contains('/') && candidate.is_file());
    beside_us.unwrap_or_else(|| PathBuf::from(program))
}

async fn run(f: FunctionSpec, control: PathBuf, mut stop: watch::Receiver<bool>) {
    let mut backoff = Duration::from_millis(200);
    loop {
        let mut child = match spawn(&f, &control) {
            Ok(c) => c,
            Err(e) => {
                error!(function = %f.name, command = ?f.command, error = %e, "starting function");
                tokio::select! {
                    () = tokio::time::sleep(backoff) => {}
                    _ = stop.changed() => return,
                }
                backoff = (backoff * 2).min(Duration::from_secs(30));
                continue;
            }
        };
        info!(function = %f.name, pid = child.id().unwrap_or(0), "function started");
        let started = std::time::Instant::now();
        tokio::select! {
            status = child.wait() => {
                warn!(function = %f.name, status = ?status.ok(), "function exited; restarting");
                if started.elapsed() > Duration::from_secs(10) {
                    backoff = Duration::from_millis(200);
                }
                tokio::select! {
                    () = tokio::time::sleep(backoff) => {}
                    _ = stop.changed() => return,
                }
                backoff = (backoff * 2).min(Duration::from_secs(30));
            }
            _ = stop.changed() => {
                let _ = child.start_kill();
                let _ = child.wait().await;
                return;
            }
        }
    }
}
