//! activator-lite binary: parse config, build, run, drain on SIGTERM.

fn main() -> anyhow::Result<()> {
    spright_core::logging::init("activator", "info");
    let cfg = activator_lite::Config::load()?;
    let rt = tokio::runtime::Builder::new_multi_thread()
        .enable_all()
        .build()?;
    rt.block_on(activator_lite::run(cfg))
}
