//! JSON-lines logging with the field names of Knative's zap configuration
//! (`config-logging`: `severity`, `timestamp`, `logger`, `caller`, `message`), so log
//! pipelines built for Knative's components read ours unchanged.

use std::fmt;

use serde_json::{Map, Value};
use tracing::field::{Field, Visit};
use tracing::{Event, Level, Subscriber};
use tracing_subscriber::EnvFilter;
use tracing_subscriber::fmt::format::Writer;
use tracing_subscriber::fmt::{FmtContext, FormatEvent, FormatFields};
use tracing_subscriber::registry::LookupSpan;

/// Formats each event as one zap-compatible JSON object.
#[derive(Debug, Clone)]
pub struct ZapJson {
    logger: String,
}

impl ZapJson {
    /// `logger` is the component name zap would print (e.g. `queueproxy`, `activator`).
    pub fn new(logger: impl Into<String>) -> Self {
        Self {
            logger: logger.into(),
        }
    }
}

fn severity(level: &Level) -> &'static str {
    match *level {
        Level::ERROR => "ERROR",
        Level::WARN => "WARN",
        Level::INFO => "INFO",
        Level::DEBUG | Level::TRACE => "DEBUG",
    }
}

struct Fields(Map<String, Value>);

impl Visit for Fields {
    fn record_debug(&mut self, field: &Field, value: &dyn fmt::Debug) {
        self.0
            .insert(field.name().to_owned(), Value::String(format!("{value:?}")));
    }
    fn record_str(&mut self, field: &Field, value: &str) {
        self.0
            .insert(field.name().to_owned(), Value::String(value.to_owned()));
    }
    fn record_i64(&mut self, field: &Field, value: i64) {
        self.0.insert(field.name().to_owned(), Value::from(value));
    }
    fn record_u64(&mut self, field: &Field, value: u64) {
        self.0.insert(field.name().to_owned(), Value::from(value));
    }
    fn record_f64(&mut self, field: &Field, value: f64) {
        self.0.insert(field.name().to_owned(), Value::from(value));
    }
    fn record_bool(&mut self, field: &Field, value: bool) {
        self.0.insert(field.name().to_owned(), Value::from(value));
    }
}

impl<S, N> FormatEvent<S, N> for ZapJson
where
    S: Subscriber + for<'a> LookupSpan<'a>,
    N: for<'a> FormatFields<'a> + 'static,
{
    fn format_event(
        &self,
        _ctx: &FmtContext<'_, S, N>,
        mut writer: Writer<'_>,
        event: &Event<'_>,
    ) -> fmt::Result {
        let meta = event.metadata();
        let mut fields = Fields(Map::new());
        event.record(&mut fields);
        let mut out = Map::new();
        out.insert("severity".into(), severity(meta.level()).into());
        out.insert(
            "timestamp".into(),
            chrono::Utc::now()
                .to_rfc3339_opts(chrono::SecondsFormat::Nanos, true)
                .into(),
        );
        out.insert("logger".into(), self.logger.clone().into());
        let caller = match (meta.file(), meta.line()) {
            (Some(f), Some(l)) => format!("{f}:{l}"),
            _ => meta.target().to_owned(),
        };
        out.insert("caller".into(), caller.into());
        let message = fields
            .0
            .remove("message")
            .unwrap_or(Value::String(String::new()));
        out.insert("message".into(), message);
        for (k, v) in fields.0 {
            out.insert(k, v);
        }
        let line = serde_json::to_string(&Value::Object(out)).map_err(|_| fmt::Error)?;
        writeln!(writer, "{line}")
    }
}

/// Installs the JSON logger on stderr. The level comes from `RUST_LOG`, else `default_level`
/// (Knative's `config-logging` levels: debug, info, warn, error).
/// Calling it twice is harmless (the second call keeps the first logger).
pub fn init(logger: &str, default_level: &str) {
    let filter = EnvFilter::try_from_default_env()
        .unwrap_or_else(|_| EnvFilter::new(default_level.to_ascii_lowercase()));
    let _ = tracing_subscriber::fmt()
        .with_env_filter(filter)
        .with_writer(std::io::stderr)
        .event_format(ZapJson::new(logger))
        .try_init();
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::sync::{Arc, Mutex};

    #[derive(Clone, Default)]
    struct Buf(Arc<Mutex<Vec<u8>>>);
    impl std::io::Write for Buf {
        fn write(&mut self, b: &[u8]) -> std::io::Result<usize> {
            self.0.lock().expect("lock").extend_from_slice(b);
            Ok(b.len())
        }
        fn flush(&mut self) -> std::io::Result<()> {
            Ok(())
        }
    }

    #[test]
    fn lines_carry_zap_keys() {
        let buf = Buf::default();
        let b2 = buf.clone();
        let sub = tracing_subscriber::fmt()
            .with_writer(move || b2.clone())
            .event_format(ZapJson::new("gateway"))
            .finish();
        tracing::subscriber::with_default(sub, || {
            tracing::info!(revision = "r1", count = 3u64, "hello world");
        });
        let text = String::from_utf8(buf.0.lock().expect("lock").clone()).expect("utf8");
        let v: Value = serde_json::from_str(text.trim()).expect("one json line");
        assert_eq!(v["severity"], "INFO");
        assert_eq!(v["logger"], "gateway");
        assert_eq!(v["message"], "hello world");
        assert_eq!(v["revision"], "r1");
        assert_eq!(v["count"], 3);
        assert!(v["timestamp"].as_str().expect("ts").ends_with('Z'));
        assert!(v["caller"].as_str().expect("caller").contains("logging.rs"));
    }
}
