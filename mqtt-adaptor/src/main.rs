//! mqtt-adaptor: placeholder until its issue lands.

fn main() -> anyhow::Result<()> {
    anyhow::bail!("mqtt-adaptor is not built yet; see its issue")
}
