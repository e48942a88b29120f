//! One result row, the side-by-side table and the JSON file every bench writes.

use serde::Serialize;

/// One measured path.
#[derive(Debug, Clone, Serialize)]
pub struct Row {
    pub name: String,
    pub connections: Option<usize>,
    pub p50_us: Option<f64>,
    pub p99_us: Option<f64>,
    pub rps: Option<f64>,
    pub cpu_s_per_1k: Option<f64>,
    /// CPU use while idle, in percent of one core.
    pub idle_cpu_pct: Option<f64>,
}

impl Row {
    /// A row with only a name.
    pub fn named(name: impl Into<String>) -> Self {
        Self {
            name: name.into(),
            connections: None,
            p50_us: None,
            p99_us: None,
            rps: None,
            cpu_s_per_1k: None,
            idle_cpu_pct: None,
        }
    }
}

fn cell(v: Option<f64>, prec: usize) -> String {
    v.map_or_else(|| "-".to_owned(), |v| format!("{v:.prec$}"))
}

/// The rows as an aligned text table.
pub fn table(rows: &[Row]) -> String {
    let mut out = format!(
        "{:<44} {:>5} {:>10} {:>10} {:>11} {:>12} {:>9}\n",
        "path", "conns", "p50 us", "p99 us", "req/s", "cpu s/1k", "idle %"
    );
    for r in rows {
        out.push_str(&format!(
            "{:<44} {:>5} {:>10} {:>10} {:>11} {:>12} {:>9}\n",
            r.name,
            r.connections
                .map_or_else(|| "-".to_owned(), |c| c.to_string()),
            cell(r.p50_us, 1),
            cell(r.p99_us, 1),
            cell(r.rps, 0),
            cell(r.cpu_s_per_1k, 4),
            cell(r.idle_cpu_pct, 3),
        ));
    }
    out
}

/// Writes the rows as a JSON array.
pub fn write_json(path: &std::path::Path, rows: &[Row]) -> anyhow::Result<()> {
    std::fs::write(path, serde_json::to_string_pretty(rows)?)?;
    Ok(())
}
