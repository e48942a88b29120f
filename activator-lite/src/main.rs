//! activator-lite binary: parse config, build, run, drain on SIGTERM.

fn main() -> anyhow::Result<()> {
    spright_core::logging::init("activator", "info");
    let cfg = activator_lite::Config::load()?;
    // On one CPU (affinity or quota) a single-threaded runtime serves everything with
    // no cross-thread wakeups; otherwise one worker per CPU.
    let cpus = std::thread::available_parallelism().map_or(1, |n| n.get());
    let mut builder = if cpus == 1 {
        tokio::runtime::Builder::new_current_thread()
    } else {
        tokio::runtime::Builder::new_multi_thread()
    };
    let rt = builder.enable_all().build()?;
    rt.block_on(activator_lite::run(cfg))
}
