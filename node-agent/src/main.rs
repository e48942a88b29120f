//! spright-node-agent binary: parse config, run, detach everything on SIGTERM.

use clap::Parser;

fn main() -> anyhow::Result<()> {
    spright_core::logging::init("node-agent", "info");
    let cfg = spright_node_agent::Config::parse();
    let rt = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()?;
    rt.block_on(spright_node_agent::run(cfg))
}
