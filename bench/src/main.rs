//! placeholder

fn main() -> anyhow::Result<()> {
    Ok(())
}
