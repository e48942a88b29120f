//! activator-lite: placeholder until its issue lands.

fn main() -> anyhow::Result<()> {
    anyhow::bail!("activator-lite is not built yet; see its issue")
}
