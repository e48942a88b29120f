//! broker-shm: placeholder until its issue lands.

fn main() -> anyhow::Result<()> {
    anyhow::bail!("broker-shm is not built yet; see its issue")
}
