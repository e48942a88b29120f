//! spright-bench: side-by-side benchmarks of spright-rs against its peers, one subcommand per
//! component. Each run prints one table with ratios, and `--json PATH` writes the figures.

mod dataplane;
mod knative_chain;
mod measure;
mod report;

use clap::{Parser, Subcommand};

#[derive(Debug, Parser)]
#[command(name = "spright-bench", version, about)]
struct Cli {
    #[command(subcommand)]
    command: Cmd,
}

#[derive(Debug, Subcommand)]
enum Cmd {
    /// The SPRIGHT dataplane: per-hop round trips, the 4-function chain over shm+sk_msg, HTTP
    /// hops and Knative's queue-proxy, and idle CPU.
    Dataplane(dataplane::DataplaneArgs),
}

fn main() -> anyhow::Result<()> {
    match Cli::parse().command {
        Cmd::Dataplane(a) => dataplane::run(a),
    }
}
