//! spright-bench: side-by-side benchmarks of spright-rs against its peers, one subcommand per
//! component. Each run prints one table with ratios, and `--json PATH` writes the figures.

mod activator;
mod broker;
mod dataplane;
mod knative_chain;
mod measure;
mod mqtt;
mod queue_proxy;
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
    /// broker-shm: events per second and latency to an HTTP subscriber, a shared-memory
    /// function, and 3-step reply chains over shared memory, over HTTP and through the stock
    /// broker's topology (drop-in ingress and filter).
    Broker(broker::BrokerBenchArgs),
    /// mqtt-adaptor: messages per second and publish-to-sink latency, ours against Knative's
    /// mqttsource prototype, with CPU per message and peak memory.
    Mqtt(mqtt::MqttBenchArgs),
    /// queue-proxy-ebpf: direct, through Knative's queue-proxy, through ours and through nginx
    /// at 1 and 32 connections: requests/s, p50/p99, CPU per 10k requests, peak RSS, idle CPU.
    QueueProxy(queue_proxy::QueueProxyBenchArgs),
    /// activator-lite: added latency and CPU per request against a direct call and nginx, the
    /// delay from endpoint ready to the first held request answered, memory under held load.
    Activator(activator::ActivatorBenchArgs),
}

fn main() -> anyhow::Result<()> {
    match Cli::parse().command {
        Cmd::Dataplane(a) => dataplane::run(a),
        Cmd::Broker(a) => broker::run(a),
        Cmd::Mqtt(a) => mqtt::run(a),
        Cmd::QueueProxy(a) => queue_proxy::run(a),
        Cmd::Activator(a) => activator::run(a),
    }
}
