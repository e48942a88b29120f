//! Knative-shaped Broker and Trigger objects, their validation, and where they come from.
//!
//! [`ConfigSource`] is the seam: [`DirectorySource`] reads a directory of YAML manifests
//! (edge mode) and watches it with inotify; a Kubernetes watch can implement the same trait.

use crate::filter::{self, SubscriptionsApiFilter, TriggerFilter};
use serde::Deserialize;
use std::collections::BTreeMap;
use std::path::{Path, PathBuf};
use std::time::Duration;

/// Our broker class (value of `eventing.knative.dev/broker.class`).
pub const BROKER_CLASS: &str = "SprightBroker";
/// The class annotation key.
pub const CLASS_ANNOTATION: &str = "eventing.knative.dev/broker.class";

#[derive(Debug, Clone, Default, Deserialize, PartialEq)]
#[serde(rename_all = "camelCase")]
pub struct ObjectMeta {
    #[serde(default)]
    pub name: String,
    #[serde(default)]
    pub namespace: String,
    #[serde(default)]
    pub uid: String,
    #[serde(default)]
    pub annotations: BTreeMap<String, String>,
}

#[derive(Debug, Clone, Default, Deserialize, PartialEq)]
#[serde(rename_all = "camelCase")]
pub struct KReference {
    #[serde(default)]
    pub kind: String,
    #[serde(default)]
    pub name: String,
    #[serde(default)]
    pub namespace: String,
    #[serde(default)]
    pub api_version: String,
}

/// A duck-typed Destination (`ref` and/or `uri`).
#[derive(Debug, Clone, Default, Deserialize, PartialEq)]
#[serde(rename_all = "camelCase")]
pub struct Destination {
    #[serde(default, rename = "ref")]
    pub reference: Option<KReference>,
    #[serde(default)]
    pub uri: Option<String>,
    /// PEM certificates of the CAs that sign the destination's TLS certificate.
    #[serde(default, rename = "CACerts")]
    pub ca_certs: Option<String>,
    /// OIDC audience: needs the Kubernetes API server (token requests); not used in edge mode.
    #[serde(default)]
    pub audience: Option<String>,
}

/// Where a resolved destination delivers.
#[derive(Debug, Clone, PartialEq, Eq, Hash)]
pub enum Target {
    /// An HTTP(S) URL.
    Http(String),
    /// A co-located dataplane-SDK function reached through shared memory (by name).
    ShmFunction(String),
}

impl Target {
    /// Text used in `knativeerrordest` and logs.
    pub fn display(&self) -> String {
        match self {
            Target::Http(u) => u.clone(),
            Target::ShmFunction(n) => format!("shm://{n}"),
        }
    }
}

impl Destination {
    /// Resolves like Knative's URI resolver would, without an API server: `uri` alone;
    /// a core or serving `Service` ref to its cluster-local URL (plus a relative `uri`);
    /// a `SprightFunction` ref to the shared-memory fast path.
    pub fn resolve(&self, default_ns: &str) -> Result<Target, String> {
        if let Some(pem) = &self.ca_certs {
            crate::delivery::parse_ca_certs(pem).map_err(|e| format!("{e}: CACerts"))?;
        }
        match (&self.reference, &self.uri) {
            (None, None) => Err("expected at least one, got neither: ref, uri".into()),
            (None, Some(u)) => {
                if u.starts_with("http://") || u.starts_with("https://") {
                    Ok(Target::Http(u.clone()))
                } else {
                    Err(format!(
                        "invalid value: {u}: uri must be an absolute http(s) URL"
                    ))
                }
            }
            (Some(r), uri) => {
                if r.name.is_empty() || r.kind.is_empty() {
                    return Err("ref must have kind and name".into());
                }
                let ns = if r.namespace.is_empty() {
                    default_ns
                } else {
                    &r.namespace
                };
                match r.kind.as_str() {
                    "SprightFunction" => Ok(Target::ShmFunction(format!("{ns}/{}", r.name))),
                    "Service" => {
                        let base = format!("http://{}.{ns}.svc.cluster.local", r.name);
                        let path = uri.as_deref().unwrap_or("");
                        Ok(Target::Http(if path.is_empty() || path.starts_with('/') {
                            format!("{base}{path}")
                        } else {
                            format!("{base}/{path}")
                        }))
                    }
                    other => Err(format!(
                        "cannot resolve ref of kind {other} without Kubernetes; use uri"
                    )),
                }
            }
        }
    }
}

/// `delivery` of a Broker or Trigger (DeliverySpec).
#[derive(Debug, Clone, Default, Deserialize, PartialEq)]
#[serde(rename_all = "camelCase")]
pub struct DeliverySpec {
    #[serde(default)]
    pub dead_letter_sink: Option<Destination>,
    #[serde(default)]
    pub retry: Option<i32>,
    #[serde(default)]
    pub backoff_policy: Option<String>,
    #[serde(default)]
    pub backoff_delay: Option<String>,
    #[serde(default)]
    pub timeout: Option<String>,
    #[serde(default)]
    pub retry_after_max: Option<String>,
    #[serde(default)]
    pub format: Option<String>,
}

/// Event encoding toward subscribers.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Format {
    Binary,
    Structured,
}

/// Backoff policy.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Backoff {
    Linear,
    Exponential,
}

/// A validated, resolved delivery configuration.
#[derive(Debug, Clone, PartialEq)]
pub struct Delivery {
    pub dead_letter_sink: Option<Target>,
    /// The dead-letter sink's `CACerts`.
    pub dead_letter_ca_certs: Option<String>,
    pub retry: u32,
    pub backoff: Backoff,
    pub backoff_delay: Duration,
    pub timeout: Option<Duration>,
    pub format: Format,
    /// `retryAfterMax`: a 429/503's `Retry-After` is honoured up to this long. `None` (unset
    /// or `PT0S`) ignores `Retry-After`, as Knative does while `delivery-retryafter` is not
    /// GA.
    pub retry_after_max: Option<Duration>,
}

impl Default for Delivery {
    fn default() -> Self {
        Delivery {
            dead_letter_sink: None,
            dead_letter_ca_certs: None,
            retry: 0,
            backoff: Backoff::Exponential,
            backoff_delay: Duration::ZERO,
            timeout: None,
            format: Format::Binary,
            retry_after_max: None,
        }
    }
}

impl Delivery {
    /// Delay before retry number `n` (1-based): linear `delay × n`, exponential `delay × 2ⁿ`.
    pub fn backoff_for(&self, n: u32) -> Duration {
        match self.backoff {
            Backoff::Linear => self.backoff_delay.saturating_mul(n),
            Backoff::Exponential => self
                .backoff_delay
                .saturating_mul(2u32.saturating_pow(n.min(31))),
        }
    }
}

impl Delivery {
    /// Wait before retry number `n` (1-based) after `status` with a `Retry-After` header
    /// value: the backoff, or the `Retry-After` delay capped at `retryAfterMax` when that is
    /// longer (only for 429 and 503, only when `retryAfterMax` is set).
    pub fn retry_delay(&self, n: u32, status: Option<u16>, retry_after: Option<&str>) -> Duration {
        let backoff = self.backoff_for(n);
        let (Some(max), Some(429 | 503), Some(value)) = (self.retry_after_max, status, retry_after)
        else {
            return backoff;
        };
        parse_retry_after(value, chrono::Utc::now())
            .map_or(backoff, |asked| backoff.max(asked.min(max)))
    }
}

/// A `Retry-After` value: delay-seconds or an HTTP-date (RFC 9110 §10.2.3); a date in the past
/// is no delay.
pub fn parse_retry_after(value: &str, now: chrono::DateTime<chrono::Utc>) -> Option<Duration> {
    let v = value.trim();
    if !v.is_empty() && v.bytes().all(|b| b.is_ascii_digit()) {
        return Some(Duration::from_secs(v.parse::<u64>().unwrap_or(u64::MAX)));
    }
    let at = chrono::DateTime::parse_from_rfc2822(v).ok()?;
    Some(
        (at.with_timezone(&chrono::Utc) - now)
            .to_std()
            .unwrap_or(Duration::ZERO),
    )
}

impl DeliverySpec {
    /// Validates and resolves (the webhook's DeliverySpec.Validate plus resolution).
    pub fn compile(&self, ns: &str, path: &str) -> Result<Delivery, String> {
        let mut d = Delivery::default();
        if let Some(dls) = &self.dead_letter_sink {
            d.dead_letter_sink = Some(
                dls.resolve(ns)
                    .map_err(|e| format!("{e}: {path}.deadLetterSink"))?,
            );
            d.dead_letter_ca_certs = dls.ca_certs.clone();
        }
        if let Some(r) = self.retry {
            d.retry = u32::try_from(r)
                .map_err(|_| format!("invalid value: {r}: {path}.retry (must be >= 0)"))?;
        }
        if let Some(p) = &self.backoff_policy {
            d.backoff = match p.as_str() {
                "linear" => Backoff::Linear,
                "exponential" => Backoff::Exponential,
                other => return Err(format!("invalid value: {other}: {path}.backoffPolicy")),
            };
        }
        if let Some(s) = &self.backoff_delay {
            d.backoff_delay = parse_iso8601(s)
                .ok_or_else(|| format!("invalid value: {s}: {path}.backoffDelay"))?;
        }
        if let Some(s) = &self.timeout {
            d.timeout = Some(
                parse_iso8601(s).ok_or_else(|| format!("invalid value: {s}: {path}.timeout"))?,
            );
        }
        if let Some(s) = &self.retry_after_max {
            let max = parse_iso8601(s)
                .ok_or_else(|| format!("invalid value: {s}: {path}.retryAfterMax"))?;
            d.retry_after_max = Some(max).filter(|m| !m.is_zero());
        }
        if let Some(f) = &self.format {
            d.format = match f.as_str() {
                "json" => Format::Structured,
                "binary" => Format::Binary,
                other => return Err(format!("invalid value: {other}: {path}.format")),
            };
        }
        Ok(d)
    }
}

/// ISO-8601 duration (`PnDTnHnMn.nS`, also weeks), as used by DeliverySpec.
pub fn parse_iso8601(s: &str) -> Option<Duration> {
    let rest = s.strip_prefix('P')?;
    if rest.is_empty() {
        return None;
    }
    let (date, time) = match rest.split_once('T') {
        Some((d, t)) if !t.is_empty() => (d, Some(t)),
        Some(_) => return None,
        None => (rest, None),
    };
    let mut secs = 0f64;
    let mut take = |part: &str, units: &[(char, f64)]| -> Option<()> {
        let mut num = String::new();
        let mut seen = 0usize;
        for c in part.chars() {
            if c.is_ascii_digit() || c == '.' {
                num.push(c);
            } else {
                let idx = units.iter().position(|(u, _)| *u == c)?;
                if idx < seen || num.is_empty() {
                    return None;
                }
                seen = idx + 1;
                let v: f64 = num.parse().ok()?;
                secs += v * units[idx].1;
                num.clear();
            }
        }
        num.is_empty().then_some(())
    };
    take(
        date,
        &[
            ('Y', 31_536_000.0),
            ('M', 2_592_000.0),
            ('W', 604_800.0),
            ('D', 86_400.0),
        ],
    )?;
    if let Some(t) = time {
        take(t, &[('H', 3600.0), ('M', 60.0), ('S', 1.0)])?;
    }
    (secs.is_finite() && secs < 1e10).then(|| Duration::from_secs_f64(secs))
}

#[derive(Debug, Clone, Default, Deserialize, PartialEq)]
#[serde(rename_all = "camelCase")]
pub struct BrokerSpec {
    #[serde(default)]
    pub config: Option<KReference>,
    #[serde(default)]
    pub delivery: Option<DeliverySpec>,
}

#[derive(Debug, Clone, Default, Deserialize, PartialEq)]
#[serde(rename_all = "camelCase")]
pub struct TriggerSpec {
    #[serde(default)]
    pub broker: String,
    #[serde(default)]
    pub filter: Option<TriggerFilter>,
    #[serde(default)]
    pub filters: Vec<SubscriptionsApiFilter>,
    #[serde(default)]
    pub subscriber: Destination,
    #[serde(default)]
    pub delivery: Option<DeliverySpec>,
}

/// A Broker accepted from a manifest.
#[derive(Debug, Clone, PartialEq)]
pub struct Broker {
    pub namespace: String,
    pub name: String,
    pub delivery: Option<DeliverySpec>,
    /// Status annotations (drop-in ingress reads `knative.dev/channelAddress`).
    pub status_annotations: BTreeMap<String, String>,
    /// `status.address.url`, where the drop-in filter re-posts `/reply` events.
    pub status_address: Option<String>,
    /// `status.deadLetterSinkUri` and `deadLetterSinkCACerts`, the drop-in filter's `/dls`
    /// target when the Trigger has none.
    pub status_dead_letter_sink: Option<StatusTarget>,
}

/// A URL the stock controllers resolved into an object's status, with its CA certificates.
#[derive(Debug, Clone, PartialEq)]
pub struct StatusTarget {
    pub uri: String,
    pub ca_certs: Option<String>,
}

impl StatusTarget {
    /// `status.<uri_field>` with `status.<ca_field>`, when the URI is set.
    fn read(status: &serde_yaml::Value, uri_field: &str, ca_field: &str) -> Option<StatusTarget> {
        let text = |f: &str| {
            status
                .get(f)
                .and_then(serde_yaml::Value::as_str)
                .filter(|v| !v.is_empty())
                .map(str::to_string)
        };
        Some(StatusTarget {
            uri: text(uri_field)?,
            ca_certs: text(ca_field),
        })
    }
}

/// What the stock Trigger reconciler writes into a Trigger's status: the drop-in filter
/// delivers to these, as mt-broker-filter does, not to the spec.
#[derive(Debug, Clone, Default, PartialEq)]
pub struct TriggerStatus {
    /// `status.subscriberUri` (+ `subscriberCACerts`).
    pub subscriber: Option<StatusTarget>,
    /// `status.deadLetterSinkUri` (+ `deadLetterSinkCACerts`).
    pub dead_letter_sink: Option<StatusTarget>,
}

/// A Trigger accepted from a manifest.
#[derive(Debug, Clone, PartialEq)]
pub struct Trigger {
    pub namespace: String,
    pub name: String,
    pub uid: String,
    pub broker: String,
    pub spec: TriggerSpec,
    pub subscriber: Target,
    /// The trigger's own delivery (the broker's applies when absent).
    pub delivery: Option<DeliverySpec>,
    pub status: TriggerStatus,
}

impl Trigger {
    /// Stable cursor key.
    pub fn key(&self) -> String {
        if self.uid.is_empty() {
            format!("{}.{}", self.namespace, self.name)
        } else {
            format!("{}.{}.{}", self.namespace, self.name, self.uid)
        }
    }
}

/// An object that was rejected, with the reason (as the webhook would say it).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Rejected {
    pub source: String,
    pub kind: String,
    pub name: String,
    pub reason: String,
}

/// Everything a source currently holds.
#[derive(Debug, Clone, Default, PartialEq)]
pub struct Snapshot {
    pub brokers: Vec<Broker>,
    pub triggers: Vec<Trigger>,
    pub rejected: Vec<Rejected>,
}

#[derive(Debug, Deserialize)]
#[serde(rename_all = "camelCase")]
struct RawObject {
    #[serde(default)]
    api_version: String,
    #[serde(default)]
    kind: String,
    #[serde(default)]
    metadata: ObjectMeta,
    #[serde(default)]
    spec: serde_yaml::Value,
    #[serde(default)]
    status: serde_yaml::Value,
}

fn valid_dns_label(s: &str) -> bool {
    !s.is_empty()
        && s.len() <= 253
        && s.bytes()
            .all(|b| b.is_ascii_lowercase() || b.is_ascii_digit() || b == b'-' || b == b'.')
        && !s.starts_with('-')
        && !s.ends_with('-')
}

impl Snapshot {
    /// Logs every rejected object with its reason (a warning each), as the webhook would
    /// have refused it.
    pub fn log_rejected(&self) {
        for r in &self.rejected {
            tracing::warn!(source = %r.source, kind = %r.kind, name = %r.name, reason = %r.reason, "object rejected");
        }
    }

    /// Adds every object of one YAML stream (multi-document; `kind: List` supported).
    pub fn add_yaml(&mut self, source: &str, text: &str) {
        for doc in serde_yaml::Deserializer::from_str(text) {
            let value = match serde_yaml::Value::deserialize(doc) {
                Ok(v) => v,
                Err(e) => {
                    self.reject(source, "?", "?", format!("invalid YAML: {e}"));
                    return;
                }
            };
            if value.is_null() {
                continue;
            }
            if value.get("kind").and_then(|k| k.as_str()) == Some("List") {
                for item in value
                    .get("items")
                    .and_then(|i| i.as_sequence())
                    .into_iter()
                    .flatten()
                {
                    self.add_value(source, item.clone());
                }
            } else {
                self.add_value(source, value);
            }
        }
    }

    fn reject(&mut self, source: &str, kind: &str, name: &str, reason: String) {
        self.rejected.push(Rejected {
            source: source.into(),
            kind: kind.into(),
            name: name.into(),
            reason,
        });
    }

    fn add_value(&mut self, source: &str, value: serde_yaml::Value) {
        let raw: RawObject = match serde_yaml::from_value(value) {
            Ok(r) => r,
            Err(e) => return self.reject(source, "?", "?", format!("invalid object: {e}")),
        };
        if !raw.api_version.starts_with("eventing.knative.dev/") {
            return;
        }
        let mut meta = raw.metadata;
        if meta.namespace.is_empty() {
            meta.namespace = "default".into();
        }
        let name = format!("{}/{}", meta.namespace, meta.name);
        let kind = raw.kind.clone();
        if !valid_dns_label(&meta.name) || !valid_dns_label(&meta.namespace) {
            return self.reject(
                source,
                &kind,
                &name,
                "invalid metadata.name or namespace".into(),
            );
        }
        match kind.as_str() {
            "Broker" => match self.broker(meta, raw.spec, raw.status) {
                Ok(Some(b)) => self.brokers.push(b),
                Ok(None) => {}
                Err(e) => self.reject(source, &kind, &name, e),
            },
            "Trigger" => match Self::trigger(meta, raw.spec, &raw.status) {
                Ok(t) => self.triggers.push(t),
                Err(e) => self.reject(source, &kind, &name, e),
            },
            _ => {}
        }
    }

    fn broker(
        &self,
        meta: ObjectMeta,
        spec: serde_yaml::Value,
        status: serde_yaml::Value,
    ) -> Result<Option<Broker>, String> {
        if let Some(class) = meta.annotations.get(CLASS_ANNOTATION)
            && class != BROKER_CLASS
            && class != "MTChannelBasedBroker"
        {
            // Another class's broker: not ours to serve.
            return Ok(None);
        }
        let spec: BrokerSpec = if spec.is_null() {
            BrokerSpec::default()
        } else {
            serde_yaml::from_value(spec).map_err(|e| format!("invalid spec: {e}"))?
        };
        if let Some(d) = &spec.delivery {
            d.compile(&meta.namespace, "spec.delivery")?;
        }
        if self
            .brokers
            .iter()
            .any(|b| b.namespace == meta.namespace && b.name == meta.name)
        {
            return Err("duplicate Broker".into());
        }
        let status_annotations = status
            .get("annotations")
            .and_then(|a| serde_yaml::from_value(a.clone()).ok())
            .unwrap_or_default();
        let status_address = status
            .get("address")
            .and_then(|a| a.get("url"))
            .and_then(serde_yaml::Value::as_str)
            .filter(|u| !u.is_empty())
            .map(str::to_string);
        Ok(Some(Broker {
            namespace: meta.namespace,
            name: meta.name,
            delivery: spec.delivery,
            status_annotations,
            status_address,
            status_dead_letter_sink: StatusTarget::read(
                &status,
                "deadLetterSinkUri",
                "deadLetterSinkCACerts",
            ),
        }))
    }

    fn trigger(
        meta: ObjectMeta,
        spec: serde_yaml::Value,
        status: &serde_yaml::Value,
    ) -> Result<Trigger, String> {
        let status = TriggerStatus {
            subscriber: StatusTarget::read(status, "subscriberUri", "subscriberCACerts"),
            dead_letter_sink: StatusTarget::read(
                status,
                "deadLetterSinkUri",
                "deadLetterSinkCACerts",
            ),
        };
        let spec: TriggerSpec =
            serde_yaml::from_value(spec).map_err(|e| format!("invalid spec: {e}"))?;
        let mut errs: Vec<String> = Vec::new();
        if spec.broker.is_empty() {
            errs.push("missing field(s): spec.broker".into());
        }
        if let Some(f) = &spec.filter {
            errs.extend(
                filter::validate_attributes(f, "spec.filter")
                    .into_iter()
                    .map(|e| e.to_string()),
            );
        }
        errs.extend(
            filter::validate_filters(&spec.filters, "spec.filters")
                .into_iter()
                .map(|e| e.to_string()),
        );
        // A ref only a cluster can resolve is fine when the stock controller already did
        // (status.subscriberUri, what the drop-in filter delivers to).
        let subscriber = match (spec.subscriber.resolve(&meta.namespace), &status.subscriber) {
            (Err(_), Some(resolved)) if spec.subscriber.reference.is_some() => {
                Ok(Target::Http(resolved.uri.clone()))
            }
            (other, _) => other,
        };
        if let Err(e) = &subscriber {
            errs.push(format!("{e}: spec.subscriber"));
        }
        if let Some(d) = &spec.delivery
            && let Err(e) = d.compile(&meta.namespace, "spec.delivery")
        {
            errs.push(e);
        }
        match subscriber {
            Ok(subscriber) if errs.is_empty() => Ok(Trigger {
                namespace: meta.namespace,
                name: meta.name,
                uid: meta.uid,
                broker: spec.broker.clone(),
                delivery: spec.delivery.clone(),
                subscriber,
                spec,
                status,
            }),
            _ => Err(errs.join("; ")),
        }
    }
}

/// Where Brokers and Triggers come from.
pub trait ConfigSource: Send + Sync {
    /// Everything currently defined.
    fn load(&self) -> Snapshot;
    /// Starts watching; `changed` is called after each change (no polling).
    fn watch(&self, changed: Box<dyn Fn() + Send + Sync>) -> anyhow::Result<()>;
}

/// A directory of YAML/JSON manifests.
#[derive(Debug, Clone)]
pub struct DirectorySource {
    dir: PathBuf,
}

impl DirectorySource {
    pub fn new(dir: &Path) -> Self {
        Self {
            dir: dir.to_path_buf(),
        }
    }
}

impl ConfigSource for DirectorySource {
    fn load(&self) -> Snapshot {
        let mut snap = Snapshot::default();
        let mut files: Vec<PathBuf> = match std::fs::read_dir(&self.dir) {
            Ok(rd) => rd
                .filter_map(|e| e.ok().map(|e| e.path()))
                .filter(|p| {
                    p.extension()
                        .and_then(|e| e.to_str())
                        .is_some_and(|e| matches!(e, "yaml" | "yml" | "json"))
                })
                .collect(),
            Err(e) => {
                snap.reject(
                    &self.dir.display().to_string(),
                    "?",
                    "?",
                    format!("cannot read manifests directory: {e}"),
                );
                return snap;
            }
        };
        files.sort();
        for f in files {
            let src = f.display().to_string();
            match std::fs::read_to_string(&f) {
                Ok(text) => snap.add_yaml(&src, &text),
                Err(e) => snap.reject(&src, "?", "?", format!("unreadable: {e}")),
            }
        }
        snap
    }

    fn watch(&self, changed: Box<dyn Fn() + Send + Sync>) -> anyhow::Result<()> {
        use nix::sys::inotify::{AddWatchFlags, InitFlags, Inotify};
        let ino = Inotify::init(InitFlags::IN_CLOEXEC)?;
        ino.add_watch(
            &self.dir,
            AddWatchFlags::IN_CLOSE_WRITE
                | AddWatchFlags::IN_MOVED_TO
                | AddWatchFlags::IN_MOVED_FROM
                | AddWatchFlags::IN_DELETE
                | AddWatchFlags::IN_CREATE,
        )?;
        std::thread::Builder::new()
            .name("manifest-watch".into())
            .spawn(move || {
                // Blocking read: the thread sleeps until the kernel reports a change.
                while ino.read_events().is_ok() {
                    changed();
                }
            })?;
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn retry_after_is_honoured_up_to_retry_after_max() {
        let spec = |max: Option<&str>| DeliverySpec {
            retry: Some(3),
            backoff_policy: Some("linear".into()),
            backoff_delay: Some("PT0.1S".into()),
            retry_after_max: max.map(str::to_string),
            ..DeliverySpec::default()
        };
        let d = spec(Some("PT5S")).compile("ns", "spec.delivery").unwrap();
        let ms = Duration::from_millis;
        assert_eq!(d.retry_delay(1, Some(503), Some("2")), ms(2000));
        assert_eq!(d.retry_delay(1, Some(429), Some("60")), ms(5000), "capped");
        assert_eq!(
            d.retry_delay(2, Some(429), Some("0")),
            ms(200),
            "backoff wins"
        );
        assert_eq!(
            d.retry_delay(1, Some(500), Some("2")),
            ms(100),
            "only 429/503"
        );
        assert_eq!(
            d.retry_delay(1, Some(503), Some("soon")),
            ms(100),
            "invalid"
        );
        assert_eq!(d.retry_delay(1, Some(503), None), ms(100));
        // Unset or PT0S: Retry-After is not honoured (Knative before GA).
        for off in [None, Some("PT0S")] {
            let d = spec(off).compile("ns", "spec.delivery").unwrap();
            assert_eq!(d.retry_delay(1, Some(503), Some("2")), ms(100));
        }
        assert!(spec(Some("5s")).compile("ns", "spec.delivery").is_err());
        let now = chrono::DateTime::parse_from_rfc3339("2015-10-21T07:28:00Z")
            .unwrap()
            .with_timezone(&chrono::Utc);
        assert_eq!(
            parse_retry_after("Wed, 21 Oct 2015 07:28:03 GMT", now),
            Some(ms(3000))
        );
        assert_eq!(
            parse_retry_after("Wed, 21 Oct 2015 07:27:00 GMT", now),
            Some(Duration::ZERO)
        );
        assert_eq!(parse_retry_after("", now), None);
        assert_eq!(parse_retry_after("-1", now), None);
    }

    #[test]
    fn iso8601() {
        assert_eq!(parse_iso8601("PT0.2S"), Some(Duration::from_millis(200)));
        assert_eq!(parse_iso8601("PT1M30S"), Some(Duration::from_secs(90)));
        assert_eq!(parse_iso8601("P1DT1H"), Some(Duration::from_secs(90_000)));
        for bad in ["", "P", "PT", "1S", "PT1X", "PTS", "PT1S2M"] {
            assert_eq!(parse_iso8601(bad), None, "{bad}");
        }
    }

    #[test]
    fn backoff() {
        let d = Delivery {
            backoff_delay: Duration::from_millis(100),
            ..Delivery::default()
        };
        assert_eq!(d.backoff_for(3), Duration::from_millis(800));
        let l = Delivery {
            backoff: Backoff::Linear,
            ..d
        };
        assert_eq!(l.backoff_for(3), Duration::from_millis(300));
    }

    #[test]
    fn manifests_accept_and_reject() {
        let yaml = r#"
apiVersion: eventing.knative.dev/v1
kind: Broker
metadata: {name: default, namespace: ns1, annotations: {eventing.knative.dev/broker.class: SprightBroker}}
spec:
  delivery: {retry: 3, backoffPolicy: linear, backoffDelay: PT0.1S}
---
apiVersion: eventing.knative.dev/v1
kind: Broker
metadata: {name: other, namespace: ns1, annotations: {eventing.knative.dev/broker.class: Kafka}}
---
apiVersion: eventing.knative.dev/v1
kind: Trigger
metadata: {name: t1, namespace: ns1, uid: abc}
spec:
  broker: default
  filters:
    - cesql: "type LIKE 'x.%'"
  subscriber: {uri: "http://127.0.0.1:9/sink"}
---
apiVersion: eventing.knative.dev/v1
kind: Trigger
metadata: {name: bad1, namespace: ns1}
spec:
  broker: default
  filters:
    - exact: {type: a}
      prefix: {type: b}
  subscriber: {uri: "http://127.0.0.1:9/sink"}
---
apiVersion: eventing.knative.dev/v1
kind: Trigger
metadata: {name: bad2, namespace: ns1}
spec:
  broker: default
  subscriber: {}
  delivery: {backoffPolicy: fibonacci}
---
apiVersion: v1
kind: ConfigMap
metadata: {name: ignored}
"#;
        let mut s = Snapshot::default();
        s.add_yaml("test", yaml);
        assert_eq!(s.brokers.len(), 1);
        assert_eq!(s.triggers.len(), 1);
        assert_eq!(s.triggers[0].key(), "ns1.t1.abc");
        assert_eq!(s.rejected.len(), 2, "{:?}", s.rejected);
        assert!(s.rejected[0].reason.contains("multiple dialects found"));
        assert!(s.rejected[1].reason.contains("expected at least one"));
        assert!(s.rejected[1].reason.contains("backoffPolicy"));
    }

    #[test]
    fn status_written_by_the_stock_controllers() {
        let yaml = r#"
apiVersion: eventing.knative.dev/v1
kind: Broker
metadata: {name: default, namespace: ns1, annotations: {eventing.knative.dev/broker.class: MTChannelBasedBroker}}
status:
  address: {url: "http://broker-ingress.knative-eventing.svc.cluster.local/ns1/default"}
  annotations: {knative.dev/channelAddress: "http://ch/"}
  deadLetterSinkUri: "http://dls.ns1.svc.cluster.local"
---
apiVersion: eventing.knative.dev/v1
kind: Trigger
metadata: {name: t1, namespace: ns1, uid: abc}
spec:
  broker: default
  subscriber: {ref: {apiVersion: messaging.knative.dev/v1, kind: InMemoryChannel, name: c}}
status:
  subscriberUri: "http://c-kn-channel.ns1.svc.cluster.local"
  subscriberCACerts: ""
  deadLetterSinkUri: "http://t-dls/"
---
apiVersion: eventing.knative.dev/v1
kind: Trigger
metadata: {name: t2, namespace: ns1}
spec:
  broker: default
  subscriber: {ref: {apiVersion: messaging.knative.dev/v1, kind: InMemoryChannel, name: c}}
"#;
        let mut s = Snapshot::default();
        s.add_yaml("test", yaml);
        let b = &s.brokers[0];
        assert_eq!(
            b.status_address.as_deref(),
            Some("http://broker-ingress.knative-eventing.svc.cluster.local/ns1/default")
        );
        assert_eq!(
            b.status_dead_letter_sink.as_ref().map(|t| t.uri.as_str()),
            Some("http://dls.ns1.svc.cluster.local")
        );
        // A ref only a cluster resolves is accepted when the controller resolved it.
        assert_eq!(s.triggers.len(), 1, "{:?}", s.rejected);
        let t = &s.triggers[0];
        let sub = t.status.subscriber.as_ref().unwrap();
        assert_eq!(sub.uri, "http://c-kn-channel.ns1.svc.cluster.local");
        assert_eq!(sub.ca_certs, None, "an empty CA bundle is none");
        assert_eq!(
            t.subscriber,
            Target::Http("http://c-kn-channel.ns1.svc.cluster.local".into())
        );
        assert_eq!(
            t.status.dead_letter_sink.as_ref().map(|d| d.uri.as_str()),
            Some("http://t-dls/")
        );
        // Without the status it is still refused, with the reason.
        assert!(
            s.rejected[0]
                .reason
                .contains("cannot resolve ref of kind InMemoryChannel")
        );
    }
}
