//! A small CloudEvents 1.0 model with the JSON event format and the HTTP binding (binary and
//! structured), written for this adaptor's hot path: attributes stay strings, data stays bytes.
//!
//! The cloudevents-sdk crate is not used here because its server-side decoder matches the
//! structured content type case-sensitively and does not percent-decode `ce-*` headers
//! (see the contract, E.2), and because the MQTT binding is not in it at all.

use std::collections::BTreeMap;
use std::fmt::Write as _;

use base64::Engine as _;
use bytes::Bytes;
use http::{HeaderMap, HeaderName, HeaderValue};
use serde_json::Value;

/// Content type of the structured JSON format.
pub const STRUCTURED_CONTENT_TYPE: &str = "application/cloudevents+json; charset=UTF-8";

/// Why bytes or headers are not a valid CloudEvent.
#[derive(Debug, Clone, thiserror::Error, PartialEq, Eq)]
pub enum CeError {
    #[error("body is not a JSON object: {0}")]
    NotJsonObject(String),
    #[error("missing required attribute `{0}`")]
    Missing(&'static str),
    #[error("unsupported specversion `{0}` (want 1.0 or 0.3)")]
    SpecVersion(String),
    #[error(
        "invalid attribute name `{0}` (lowercase a-z and 0-9 only; data and data_base64 are reserved)"
    )]
    AttributeName(String),
    #[error("attribute `{0}` must be a string, number or boolean")]
    AttributeType(String),
    #[error("data_base64 is not valid base64")]
    Base64,
    #[error("both data and data_base64 present")]
    BothData,
    #[error("batched CloudEvents are not accepted")]
    Batch,
    #[error("header `{0}` is not valid text")]
    HeaderValue(String),
}

/// One CloudEvent: context attributes (including extensions) as strings, data as bytes.
#[derive(Debug, Clone, PartialEq, Eq, Default)]
pub struct CloudEvent {
    /// All attributes except `data`/`data_base64`, keyed by their lowercase name.
    pub attrs: BTreeMap<String, String>,
    pub data: Option<Bytes>,
}

const REQUIRED: [&str; 4] = ["specversion", "id", "source", "type"];

/// Is `name` a valid CloudEvents attribute name (lowercase ASCII letters and digits)?
pub fn valid_attr_name(name: &str) -> bool {
    !name.is_empty()
        && name
            .bytes()
            .all(|b| b.is_ascii_lowercase() || b.is_ascii_digit())
}

/// `data` and `data_base64` name the event's data in the JSON format (CloudEvents spec,
/// attribute naming convention): never context attributes or extensions.
pub fn reserved_attr_name(name: &str) -> bool {
    name == "data" || name == "data_base64"
}

/// Does this media type carry JSON (`application/json`, `text/json`, `*+json`)?
pub fn is_json_media_type(ct: &str) -> bool {
    let essence = ct
        .split(';')
        .next()
        .unwrap_or("")
        .trim()
        .to_ascii_lowercase();
    essence == "application/json" || essence == "text/json" || essence.ends_with("+json")
}

/// Does this content type announce the structured CloudEvents format?
pub fn is_structured_content_type(ct: &str) -> bool {
    ct.trim_start()
        .get(..23)
        .is_some_and(|p| p.eq_ignore_ascii_case("application/cloudevents"))
}

fn is_batch_content_type(ct: &str) -> bool {
    ct.trim_start()
        .get(..29)
        .is_some_and(|p| p.eq_ignore_ascii_case("application/cloudevents-batch"))
}

impl CloudEvent {
    pub fn attr(&self, name: &str) -> Option<&str> {
        self.attrs.get(name).map(String::as_str)
    }

    pub fn id(&self) -> &str {
        self.attr("id").unwrap_or("")
    }

    pub fn set(&mut self, name: &str, value: impl Into<String>) {
        self.attrs.insert(name.to_owned(), value.into());
    }

    /// Checks the required attributes, the spec version and the attribute names.
    pub fn validate(&self) -> Result<(), CeError> {
        for r in REQUIRED {
            if self.attr(r).is_none_or(str::is_empty) {
                return Err(CeError::Missing(r));
            }
        }
        let sv = self.attr("specversion").unwrap_or("");
        if sv != "1.0" && sv != "0.3" {
            return Err(CeError::SpecVersion(sv.to_owned()));
        }
        if let Some(bad) = self
            .attrs
            .keys()
            .find(|k| !valid_attr_name(k) || reserved_attr_name(k))
        {
            return Err(CeError::AttributeName(bad.clone()));
        }
        Ok(())
    }

    /// Parses the JSON event format (structured mode) and validates the result.
    pub fn from_json(body: &[u8]) -> Result<Self, CeError> {
        let value: Value =
            serde_json::from_slice(body).map_err(|e| CeError::NotJsonObject(e.to_string()))?;
        let Value::Object(map) = value else {
            if value.is_array() {
                return Err(CeError::Batch);
            }
            return Err(CeError::NotJsonObject("not an object".into()));
        };
        let mut ev = CloudEvent::default();
        let mut data: Option<Value> = None;
        let mut data_b64: Option<Value> = None;
        for (k, v) in map {
            match k.as_str() {
                "data" => data = Some(v),
                "data_base64" => data_b64 = Some(v),
                _ => {
                    let s = match v {
                        Value::Null => continue,
                        Value::String(s) => s,
                        Value::Bool(b) => b.to_string(),
                        Value::Number(n) => n.to_string(),
                        Value::Array(_) | Value::Object(_) => {
                            return Err(CeError::AttributeType(k));
                        }
                    };
                    ev.attrs.insert(k, s);
                }
            }
        }
        let data = data.filter(|d| !d.is_null());
        let data_b64 = data_b64.filter(|d| !d.is_null());
        match (data, data_b64) {
            (Some(_), Some(_)) => return Err(CeError::BothData),
            (Some(d), None) => {
                let json_ct = ev.attr("datacontenttype").is_none_or(is_json_media_type);
                ev.data = Some(match d {
                    Value::String(s) if !json_ct => Bytes::from(s),
                    other => Bytes::from(serde_json::to_vec(&other).unwrap_or_default()),
                });
            }
            (None, Some(Value::String(b))) => {
                let raw = base64::engine::general_purpose::STANDARD
                    .decode(b.as_bytes())
                    .map_err(|_| CeError::Base64)?;
                ev.data = Some(Bytes::from(raw));
            }
            (None, Some(_)) => return Err(CeError::Base64),
            (None, None) => {}
        }
        ev.validate()?;
        Ok(ev)
    }

    /// Serialises to the JSON event format. JSON data is embedded as JSON, UTF-8 text of a
    /// non-JSON type as a string, anything else as `data_base64`.
    pub fn to_json(&self) -> Vec<u8> {
        let mut out = String::with_capacity(
            128 + self.data.as_ref().map_or(0, |d| d.len() * 4 / 3 + 4) + self.attrs.len() * 32,
        );
        out.push('{');
        let mut first = true;
        for (k, v) in &self.attrs {
            if !first {
                out.push(',');
            }
            first = false;
            push_json_str(&mut out, k);
            out.push(':');
            push_json_str(&mut out, v);
        }
        if let Some(data) = &self.data {
            if !first {
                out.push(',');
            }
            let json_ct = self.attr("datacontenttype").is_none_or(is_json_media_type);
            match std::str::from_utf8(data) {
                Ok(text)
                    if json_ct && serde_json::from_str::<serde::de::IgnoredAny>(text).is_ok() =>
                {
                    out.push_str("\"data\":");
                    out.push_str(text);
                }
                Ok(text) if !json_ct => {
                    out.push_str("\"data\":");
                    push_json_str(&mut out, text);
                }
                _ => {
                    out.push_str("\"data_base64\":\"");
                    base64::engine::general_purpose::STANDARD.encode_string(data, &mut out);
                    out.push('"');
                }
            }
        }
        out.push('}');
        out.into_bytes()
    }

    /// Decodes an HTTP request (structured or binary mode).
    pub fn from_http(headers: &HeaderMap, body: Bytes) -> Result<Self, CeError> {
        let ct = headers
            .get(http::header::CONTENT_TYPE)
            .and_then(|v| v.to_str().ok())
            .unwrap_or("");
        if is_batch_content_type(ct) {
            return Err(CeError::Batch);
        }
        if is_structured_content_type(ct) {
            return Self::from_json(&body);
        }
        let mut ev = CloudEvent::default();
        for (name, value) in headers {
            let Some(attr) = name.as_str().strip_prefix("ce-") else {
                continue;
            };
            let raw = std::str::from_utf8(value.as_bytes())
                .map_err(|_| CeError::HeaderValue(name.as_str().to_owned()))?;
            ev.attrs.insert(attr.to_owned(), percent_decode(raw));
        }
        if !ct.is_empty() {
            ev.attrs.insert("datacontenttype".into(), ct.to_owned());
        }
        if !body.is_empty() {
            ev.data = Some(body);
        }
        ev.validate()?;
        Ok(ev)
    }

    /// Headers for binary mode: `ce-<name>` (percent-encoded) and `Content-Type`.
    pub fn binary_headers(&self) -> HeaderMap {
        let mut h = HeaderMap::with_capacity(self.attrs.len() + 1);
        for (k, v) in &self.attrs {
            if k == "datacontenttype" {
                if let Ok(val) = HeaderValue::from_str(v) {
                    h.insert(http::header::CONTENT_TYPE, val);
                }
                continue;
            }
            let (Some(name), Ok(val)) =
                (ce_header_name(k), HeaderValue::try_from(percent_encode(v)))
            else {
                continue;
            };
            h.insert(name, val);
        }
        h
    }
}

fn push_json_str(out: &mut String, s: &str) {
    // serde_json's escaping of a &str cannot fail.
    out.push_str(&serde_json::to_string(s).unwrap_or_else(|_| "\"\"".into()));
}

/// `ce-<name>`: static for the attributes every event carries (no allocation per event).
fn ce_header_name(name: &str) -> Option<HeaderName> {
    Some(match name {
        "id" => HeaderName::from_static("ce-id"),
        "source" => HeaderName::from_static("ce-source"),
        "type" => HeaderName::from_static("ce-type"),
        "specversion" => HeaderName::from_static("ce-specversion"),
        "time" => HeaderName::from_static("ce-time"),
        "subject" => HeaderName::from_static("ce-subject"),
        "dataschema" => HeaderName::from_static("ce-dataschema"),
        _ => return HeaderName::from_bytes(format!("ce-{name}").as_bytes()).ok(),
    })
}

/// Percent-encodes a header value as the HTTP binding requires (§3.1.3.2): space, `"`, `%`,
/// and any byte outside printable ASCII.
pub fn percent_encode(v: &str) -> String {
    if v.bytes()
        .all(|b| b.is_ascii_graphic() && b != b'"' && b != b'%')
    {
        return v.to_owned();
    }
    let mut out = String::with_capacity(v.len() + 8);
    for b in v.bytes() {
        if b.is_ascii_graphic() && b != b'"' && b != b'%' {
            out.push(b as char);
        } else {
            let _ = write!(out, "%{b:02X}");
        }
    }
    out
}

/// Decodes `%XX` sequences; malformed sequences are kept literally. Invalid UTF-8 after
/// decoding is replaced rather than rejected.
pub fn percent_decode(v: &str) -> String {
    if !v.contains('%') {
        return v.to_owned();
    }
    let bytes = v.as_bytes();
    let mut out = Vec::with_capacity(bytes.len());
    let mut i = 0;
    while i < bytes.len() {
        if bytes[i] == b'%'
            && i + 2 < bytes.len()
            && let (Some(h), Some(l)) = (hex(bytes[i + 1]), hex(bytes[i + 2]))
        {
            out.push(h << 4 | l);
            i += 3;
            continue;
        }
        out.push(bytes[i]);
        i += 1;
    }
    String::from_utf8_lossy(&out).into_owned()
}

fn hex(b: u8) -> Option<u8> {
    match b {
        b'0'..=b'9' => Some(b - b'0'),
        b'a'..=b'f' => Some(b - b'a' + 10),
        b'A'..=b'F' => Some(b - b'A' + 10),
        _ => None,
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn sample() -> CloudEvent {
        let mut ev = CloudEvent::default();
        ev.set("specversion", "1.0");
        ev.set("id", "1");
        ev.set("source", "/s");
        ev.set("type", "t");
        ev
    }

    #[test]
    fn json_roundtrip_json_data() {
        let mut ev = sample();
        ev.set("datacontenttype", "application/json");
        ev.data = Some(Bytes::from_static(br#"{"a":1}"#));
        let back = CloudEvent::from_json(&ev.to_json()).unwrap();
        assert_eq!(back, ev);
    }

    #[test]
    fn json_roundtrip_binary_data() {
        let mut ev = sample();
        ev.set("datacontenttype", "application/octet-stream");
        ev.data = Some(Bytes::from_static(&[0, 159, 146, 150]));
        let json = ev.to_json();
        assert!(std::str::from_utf8(&json).unwrap().contains("data_base64"));
        assert_eq!(CloudEvent::from_json(&json).unwrap(), ev);
    }

    #[test]
    fn json_roundtrip_text_data() {
        let mut ev = sample();
        ev.set("datacontenttype", "text/plain");
        ev.data = Some(Bytes::from_static("héllo \"x\"".as_bytes()));
        assert_eq!(CloudEvent::from_json(&ev.to_json()).unwrap(), ev);
    }

    #[test]
    fn json_rejects_missing_and_bad() {
        assert_eq!(
            CloudEvent::from_json(br#"{"specversion":"1.0","id":"1","source":"/s"}"#),
            Err(CeError::Missing("type"))
        );
        assert_eq!(
            CloudEvent::from_json(br#"{"specversion":"2.0","id":"1","source":"/s","type":"t"}"#),
            Err(CeError::SpecVersion("2.0".into()))
        );
        assert_eq!(CloudEvent::from_json(b"[]"), Err(CeError::Batch));
        assert!(CloudEvent::from_json(b"{").is_err());
        assert_eq!(
            CloudEvent::from_json(
                br#"{"specversion":"1.0","id":"1","source":"/s","type":"t","Bad":"x"}"#
            ),
            Err(CeError::AttributeName("Bad".into()))
        );
    }

    #[test]
    fn http_binary_roundtrip_with_percent_encoding() {
        let mut ev = sample();
        ev.set("subject", "a b\"%é");
        ev.set("datacontenttype", "text/plain");
        ev.data = Some(Bytes::from_static(b"x"));
        let h = ev.binary_headers();
        assert_eq!(h.get("ce-subject").unwrap(), "a%20b%22%25%C3%A9");
        assert!(h.get("ce-datacontenttype").is_none());
        let back = CloudEvent::from_http(&h, Bytes::from_static(b"x")).unwrap();
        assert_eq!(back, ev);
    }

    /// Fuzz finding (mqtt_cloudevent, `attribute-named-data-minimal`): a binary-mode
    /// request with `ce-data: x` was accepted, and its structured JSON did not parse back.
    #[test]
    fn attributes_named_data_are_refused() {
        let mut h = sample().binary_headers();
        h.insert("ce-data", HeaderValue::from_static("x"));
        h.insert(
            http::header::CONTENT_TYPE,
            HeaderValue::from_static("text/plain"),
        );
        assert_eq!(
            CloudEvent::from_http(&h, Bytes::from_static(b"body")),
            Err(CeError::AttributeName("data".into()))
        );
        h.remove("ce-data");
        h.insert("ce-data_base64", HeaderValue::from_static("eA=="));
        assert_eq!(
            CloudEvent::from_http(&h, Bytes::from_static(b"body")),
            Err(CeError::AttributeName("data_base64".into()))
        );
        for name in ["data", "data_base64"] {
            let mut ev = sample();
            ev.set(name, "x");
            assert_eq!(ev.validate(), Err(CeError::AttributeName(name.into())));
        }
        let mut ev = sample();
        ev.set("dataref", "x");
        assert_eq!(ev.validate(), Ok(()));
    }

    #[test]
    fn http_structured_case_insensitive() {
        let mut h = HeaderMap::new();
        h.insert(
            http::header::CONTENT_TYPE,
            HeaderValue::from_static("Application/CloudEvents+JSON"),
        );
        let ev = CloudEvent::from_http(&h, Bytes::from(sample().to_json())).unwrap();
        assert_eq!(ev, sample());
        h.insert(
            http::header::CONTENT_TYPE,
            HeaderValue::from_static("application/cloudevents-batch+json"),
        );
        assert_eq!(
            CloudEvent::from_http(&h, Bytes::from_static(b"[]")),
            Err(CeError::Batch)
        );
    }

    #[test]
    fn percent_decode_malformed_kept() {
        assert_eq!(percent_decode("a%2"), "a%2");
        assert_eq!(percent_decode("%zz%41"), "%zzA");
        assert_eq!(percent_decode("%"), "%");
    }

    proptest::proptest! {
        #[test]
        fn from_json_never_panics(body in proptest::collection::vec(proptest::num::u8::ANY, 0..256)) {
            let _ = CloudEvent::from_json(&body);
        }

        #[test]
        fn from_http_never_panics(
            headers in proptest::collection::vec((
                proptest::sample::select(vec!["ce-specversion", "ce-id", "ce-source", "ce-type", "ce-bad_x", "content-type", "ce-x"]),
                proptest::collection::vec(0x20u8..0x7f, 0..24)), 0..8),
            body in proptest::collection::vec(proptest::num::u8::ANY, 0..128),
        ) {
            let mut h = HeaderMap::new();
            for (k, v) in headers {
                if let Ok(v) = HeaderValue::from_bytes(&v) {
                    h.append(HeaderName::from_static(k), v);
                }
            }
            if let Ok(ev) = CloudEvent::from_http(&h, Bytes::from(body)) {
                proptest::prop_assert!(ev.validate().is_ok());
                // Whatever was accepted survives both encodings.
                proptest::prop_assert_eq!(CloudEvent::from_http(&ev.binary_headers(), ev.data.clone().unwrap_or_default()).map(|e| e.attrs), Ok(ev.attrs.clone()));
            }
        }

        #[test]
        fn percent_roundtrip(s in ".*") {
            proptest::prop_assert_eq!(percent_decode(&percent_encode(&s)), s);
        }

        #[test]
        fn json_roundtrip_any(id in "[ -~]{1,20}", subject in ".*", data in proptest::collection::vec(proptest::num::u8::ANY, 0..64), ct in proptest::sample::select(vec!["application/json", "text/plain", "application/octet-stream"])) {
            let mut ev = sample();
            ev.set("id", id);
            ev.set("subject", subject);
            ev.set("datacontenttype", ct);
            ev.data = Some(Bytes::from(data));
            let back = CloudEvent::from_json(&ev.to_json()).unwrap();
            // JSON data may be re-serialised (whitespace); compare parsed values then.
            if ct == "application/json" && serde_json::from_slice::<Value>(ev.data.as_ref().unwrap()).is_ok() {
                let a: Value = serde_json::from_slice(back.data.as_ref().unwrap()).unwrap();
                let b: Value = serde_json::from_slice(ev.data.as_ref().unwrap()).unwrap();
                proptest::prop_assert_eq!(a, b);
                proptest::prop_assert_eq!(back.attrs, ev.attrs);
            } else {
                proptest::prop_assert_eq!(back, ev);
            }
        }
    }
}
