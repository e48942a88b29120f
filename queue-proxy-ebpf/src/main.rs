//! queue-proxy-ebpf: placeholder until its issue lands.

fn main() -> anyhow::Result<()> {
    anyhow::bail!("queue-proxy-ebpf is not built yet; see its issue")
}
