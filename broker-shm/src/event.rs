//! CloudEvents 0.3 / 1.0 model and the HTTP protocol binding (binary and structured JSON).
//!
//! Written against the CloudEvents HTTP binding spec. Header values are percent-decoded on the
//! way in and percent-encoded on the way out (binding §3.1.3.2).

use base64::Engine as _;
use base64::engine::general_purpose::STANDARD as B64;
use bytes::Bytes;
use http::{HeaderMap, HeaderName, HeaderValue};
use serde_json::Value as Json;
use std::collections::BTreeMap;

/// Knative's broker TTL extension.
pub const TTL_EXT: &str = "knativebrokerttl";
/// Knative's arrival time extension.
pub const ARRIVAL_EXT: &str = "knativearrivaltime";

/// Why a request is not a valid CloudEvent (every variant maps to HTTP 400).
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum EventError {
    #[error("batched content mode is not supported")]
    Batch,
    #[error("not a CloudEvent: no ce-specversion header and no structured content type")]
    NotAnEvent,
    #[error("unsupported structured format {0:?}")]
    Format(String),
    #[error("malformed structured event: {0}")]
    Json(String),
    #[error("unknown specversion {0:?}")]
    SpecVersion(String),
    #[error("missing required attribute {0}")]
    Missing(&'static str),
    #[error("invalid attribute {0}: {1}")]
    Invalid(String, String),
}

/// A CloudEvent: context attributes as text plus the data bytes.
#[derive(Debug, Clone, PartialEq, Eq, Default)]
pub struct CloudEvent {
    /// All context attributes and extensions, lower-case names, including `specversion`.
    pub attrs: BTreeMap<String, String>,
    /// The data, if any.
    pub data: Option<Bytes>,
}

fn valid_ext_name(n: &str) -> bool {
    !n.is_empty()
        && n.bytes()
            .all(|b| b.is_ascii_lowercase() || b.is_ascii_digit())
}

impl CloudEvent {
    /// Builds a minimal 1.0 event (tests, benches, error events).
    pub fn new(id: &str, source: &str, ty: &str) -> Self {
        let mut attrs = BTreeMap::new();
        attrs.insert("specversion".into(), "1.0".into());
        attrs.insert("id".into(), id.into());
        attrs.insert("source".into(), source.into());
        attrs.insert("type".into(), ty.into());
        Self { attrs, data: None }
    }

    /// Attribute value.
    pub fn get(&self, name: &str) -> Option<&str> {
        self.attrs.get(name).map(String::as_str)
    }

    /// Sets an attribute or extension.
    pub fn set(&mut self, name: &str, value: impl Into<String>) {
        self.attrs.insert(name.to_string(), value.into());
    }

    /// Removes an attribute, returning it.
    pub fn remove(&mut self, name: &str) -> Option<String> {
        self.attrs.remove(name)
    }

    /// Spec version text.
    pub fn specversion(&self) -> &str {
        self.get("specversion").unwrap_or("")
    }

    /// `event.Validate()`: required attributes, known spec version, attribute syntax.
    pub fn validate(&self) -> Result<(), EventError> {
        let sv = self.specversion();
        if sv != "1.0" && sv != "0.3" {
            return Err(EventError::SpecVersion(sv.to_string()));
        }
        for req in ["id", "source", "type"] {
            if self.get(req).is_none_or(str::is_empty) {
                return Err(EventError::Missing(req));
            }
        }
        if let Some(t) = self.get("time")
            && chrono::DateTime::parse_from_rfc3339(t).is_err()
        {
            return Err(EventError::Invalid(
                "time".into(),
                format!("{t:?} is not RFC 3339"),
            ));
        }
        for (k, v) in &self.attrs {
            if !valid_ext_name(k) {
                return Err(EventError::Invalid(
                    k.clone(),
                    "attribute names must be lower-case letters and digits".into(),
                ));
            }
            if k == "data" {
                return Err(EventError::Invalid(k.clone(), "reserved name".into()));
            }
            if v.is_empty() && matches!(k.as_str(), "subject" | "dataschema" | "schemaurl") {
                return Err(EventError::Invalid(k.clone(), "must not be empty".into()));
            }
        }
        Ok(())
    }

    /// Decodes an HTTP request or response (binary or structured mode) and validates it.
    pub fn from_http(headers: &HeaderMap, body: Bytes) -> Result<CloudEvent, EventError> {
        let ct = headers
            .get(http::header::CONTENT_TYPE)
            .and_then(|v| v.to_str().ok())
            .unwrap_or("");
        let ct_lower = ct.to_ascii_lowercase();
        let ev = if ct_lower.starts_with("application/cloudevents-batch") {
            return Err(EventError::Batch);
        } else if ct_lower.starts_with("application/cloudevents") {
            let fmt = ct_lower.split(';').next().unwrap_or("").trim();
            if fmt != "application/cloudevents+json" && fmt != "application/cloudevents" {
                return Err(EventError::Format(fmt.to_string()));
            }
            Self::from_structured(&body)?
        } else if headers.contains_key("ce-specversion") {
            Self::from_binary(headers, body)?
        } else {
            return Err(EventError::NotAnEvent);
        };
        ev.validate()?;
        Ok(ev)
    }

    fn from_binary(headers: &HeaderMap, body: Bytes) -> Result<CloudEvent, EventError> {
        let mut ev = CloudEvent::default();
        for (name, value) in headers {
            let Some(attr) = name.as_str().strip_prefix("ce-") else {
                continue;
            };
            let raw = String::from_utf8_lossy(value.as_bytes());
            ev.attrs.insert(attr.to_string(), percent_decode(&raw));
        }
        if let Some(ct) = headers.get(http::header::CONTENT_TYPE) {
            let ct = String::from_utf8_lossy(ct.as_bytes()).into_owned();
            ev.attrs.insert("datacontenttype".into(), ct);
        }
        ev.data = (!body.is_empty()).then_some(body);
        Ok(ev)
    }

    /// Parses the JSON event format.
    pub fn from_structured(body: &[u8]) -> Result<CloudEvent, EventError> {
        let v: Json = serde_json::from_slice(body).map_err(|e| EventError::Json(e.to_string()))?;
        let Json::Object(obj) = v else {
            return Err(EventError::Json("not a JSON object".into()));
        };
        let mut ev = CloudEvent::default();
        let mut data: Option<Json> = None;
        let mut data_b64: Option<String> = None;
        for (k, v) in obj {
            match k.as_str() {
                "data" => data = Some(v),
                "data_base64" => match v {
                    Json::String(s) => data_b64 = Some(s),
                    Json::Null => {}
                    _ => return Err(EventError::Json("data_base64 must be a string".into())),
                },
                _ => {
                    let text = match v {
                        Json::String(s) => s,
                        Json::Bool(b) => b.to_string(),
                        Json::Number(n) => n.to_string(),
                        Json::Null => continue,
                        other => {
                            return Err(EventError::Invalid(
                                k,
                                format!("attribute values must be scalars, got {other}"),
                            ));
                        }
                    };
                    ev.attrs.insert(k, text);
                }
            }
        }
        if data.is_some() && data_b64.is_some() {
            return Err(EventError::Json("both data and data_base64 present".into()));
        }
        if let Some(b) = data_b64 {
            let bytes = B64
                .decode(b.as_bytes())
                .map_err(|e| EventError::Invalid("data_base64".into(), e.to_string()))?;
            ev.data = Some(Bytes::from(bytes));
        } else if let Some(d) = data {
            let base64_03 = ev.get("datacontentencoding") == Some("base64");
            ev.data = match d {
                Json::Null => None,
                Json::String(s) if base64_03 => {
                    Some(Bytes::from(B64.decode(s.as_bytes()).map_err(|e| {
                        EventError::Invalid("data".into(), e.to_string())
                    })?))
                }
                Json::String(s) if !is_json_type(ev.get("datacontenttype")) => {
                    Some(Bytes::from(s.into_bytes()))
                }
                other => Some(Bytes::from(other.to_string().into_bytes())),
            };
            if base64_03 {
                ev.attrs.remove("datacontentencoding");
            }
        }
        Ok(ev)
    }

    /// Serializes to the JSON event format. Written straight into one buffer (members in
    /// name order): JSON data is embedded as it came once it parses as JSON, without building
    /// a value tree (this runs once per shared-memory delivery).
    pub fn to_structured(&self) -> Vec<u8> {
        let data_len = self.data.as_ref().map_or(0, |d| d.len() * 4 / 3 + 16);
        let attrs_len: usize = self.attrs.iter().map(|(k, v)| k.len() + v.len() + 8).sum();
        let mut out = Vec::with_capacity(2 + attrs_len + data_len);
        let data = self.data.as_ref().map(|d| {
            let json = is_json_type(self.get("datacontenttype"));
            if json && serde_json::from_slice::<serde::de::IgnoredAny>(d).is_ok() {
                ("data", Data::Raw(d))
            } else {
                match std::str::from_utf8(d) {
                    Ok(s) if !json => ("data", Data::Text(s)),
                    _ => ("data_base64", Data::Base64(d)),
                }
            }
        });
        out.push(b'{');
        let mut first = true;
        let mut member = |out: &mut Vec<u8>, name: &str| {
            if !first {
                out.push(b',');
            }
            first = false;
            json_string(out, name);
            out.push(b':');
        };
        let mut pending = data;
        for (k, v) in &self.attrs {
            if let Some((name, d)) = pending.take_if(|(name, _)| *name < k.as_str()) {
                member(&mut out, name);
                d.write(&mut out);
            }
            member(&mut out, k);
            json_string(&mut out, v);
        }
        if let Some((name, d)) = pending {
            member(&mut out, name);
            d.write(&mut out);
        }
        out.push(b'}');
        out
    }

    /// Binary-mode headers (`ce-*` plus `Content-Type`) for this event.
    pub fn binary_headers(&self) -> HeaderMap {
        let mut h = HeaderMap::new();
        for (k, v) in &self.attrs {
            if k == "datacontenttype" {
                if let Ok(val) = HeaderValue::from_str(v) {
                    h.insert(http::header::CONTENT_TYPE, val);
                }
                continue;
            }
            let (Ok(name), Ok(val)) = (
                HeaderName::from_bytes(format!("ce-{k}").as_bytes()),
                HeaderValue::from_str(&percent_encode(v)),
            ) else {
                continue;
            };
            h.insert(name, val);
        }
        h
    }

    /// Compact, lossless storage form: `0x01`, attribute count (u16), then per attribute
    /// name length (u16), name, value length (u32), value, then a data flag byte and, when
    /// set, data length (u32) and data. All integers little-endian.
    pub fn to_record(&self) -> Vec<u8> {
        let data_len = self.data.as_ref().map_or(0, |d| d.len());
        let attrs_len: usize = self.attrs.iter().map(|(k, v)| 6 + k.len() + v.len()).sum();
        let mut out = Vec::with_capacity(8 + attrs_len + data_len);
        out.push(RECORD_V1);
        let n = u16::try_from(self.attrs.len()).unwrap_or(u16::MAX);
        out.extend_from_slice(&n.to_le_bytes());
        for (k, v) in self.attrs.iter().take(usize::from(n)) {
            let kl = u16::try_from(k.len()).unwrap_or(u16::MAX);
            out.extend_from_slice(&kl.to_le_bytes());
            out.extend_from_slice(&k.as_bytes()[..usize::from(kl)]);
            let vl = u32::try_from(v.len()).unwrap_or(u32::MAX);
            out.extend_from_slice(&vl.to_le_bytes());
            out.extend_from_slice(&v.as_bytes()[..vl as usize]);
        }
        match &self.data {
            Some(d) => {
                out.push(1);
                out.extend_from_slice(&u32::try_from(d.len()).unwrap_or(u32::MAX).to_le_bytes());
                out.extend_from_slice(d);
            }
            None => out.push(0),
        }
        out
    }

    /// Inverse of [`CloudEvent::to_record`] (also reads JSON-format records).
    pub fn from_record(rec: &[u8]) -> Result<CloudEvent, EventError> {
        if rec.first() != Some(&RECORD_V1) {
            return Self::from_structured(rec);
        }
        let bad = || EventError::Json("corrupt log record".into());
        let mut r = Reader { buf: rec, pos: 1 };
        let n = r.u16().ok_or_else(bad)?;
        let mut ev = CloudEvent::default();
        for _ in 0..n {
            let kl = usize::from(r.u16().ok_or_else(bad)?);
            let k = r.take(kl).ok_or_else(bad)?;
            let vl = r.u32().ok_or_else(bad)? as usize;
            let v = r.take(vl).ok_or_else(bad)?;
            ev.attrs.insert(
                String::from_utf8_lossy(k).into_owned(),
                String::from_utf8_lossy(v).into_owned(),
            );
        }
        match r.take(1).ok_or_else(bad)? {
            [1] => {
                let dl = r.u32().ok_or_else(bad)? as usize;
                ev.data = Some(Bytes::copy_from_slice(r.take(dl).ok_or_else(bad)?));
            }
            _ => ev.data = None,
        }
        Ok(ev)
    }
}

const RECORD_V1: u8 = 1;

struct Reader<'a> {
    buf: &'a [u8],
    pos: usize,
}

impl<'a> Reader<'a> {
    fn take(&mut self, n: usize) -> Option<&'a [u8]> {
        let s = self.buf.get(self.pos..self.pos.checked_add(n)?)?;
        self.pos += n;
        Some(s)
    }
    fn u16(&mut self) -> Option<u16> {
        self.take(2).map(|b| u16::from_le_bytes([b[0], b[1]]))
    }
    fn u32(&mut self) -> Option<u32> {
        self.take(4)
            .map(|b| u32::from_le_bytes([b[0], b[1], b[2], b[3]]))
    }
}

/// The data member of the JSON format.
enum Data<'a> {
    /// Valid JSON, embedded as is.
    Raw(&'a [u8]),
    Text(&'a str),
    Base64(&'a [u8]),
}

impl Data<'_> {
    fn write(&self, out: &mut Vec<u8>) {
        match self {
            Data::Raw(d) => out.extend_from_slice(d),
            Data::Text(s) => json_string(out, s),
            Data::Base64(d) => {
                out.push(b'"');
                out.extend_from_slice(B64.encode(d).as_bytes());
                out.push(b'"');
            }
        }
    }
}

/// Appends `s` as a JSON string.
fn json_string(out: &mut Vec<u8>, s: &str) {
    // Writing into a Vec cannot fail.
    let _ = serde_json::to_writer(&mut *out, s);
}

fn is_json_type(ct: Option<&str>) -> bool {
    match ct {
        None => true,
        Some(ct) => {
            let media = ct
                .split(';')
                .next()
                .unwrap_or("")
                .trim()
                .to_ascii_lowercase();
            media == "application/json" || media == "text/json" || media.ends_with("+json")
        }
    }
}

/// Percent-encodes space, `"`, `%` and every byte outside printable ASCII.
pub fn percent_encode(s: &str) -> String {
    let mut out = String::with_capacity(s.len());
    for b in s.bytes() {
        if b == b' ' || b == b'"' || b == b'%' || !(0x21..0x7f).contains(&b) {
            out.push_str(&format!("%{b:02X}"));
        } else {
            out.push(char::from(b));
        }
    }
    out
}

/// Decodes `%XX` sequences; invalid sequences are kept verbatim.
pub fn percent_decode(s: &str) -> String {
    if !s.contains('%') {
        return s.to_string();
    }
    let bytes = s.as_bytes();
    let mut out = Vec::with_capacity(bytes.len());
    let mut i = 0;
    while i < bytes.len() {
        if bytes[i] == b'%'
            && i + 2 < bytes.len()
            && let (Some(h), Some(l)) = (hex(bytes[i + 1]), hex(bytes[i + 2]))
        {
            out.push(h * 16 + l);
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

impl cesql::EventAttributes for CloudEvent {
    fn attribute(&self, name: &str) -> Option<cesql::Value> {
        self.attrs
            .get(name)
            .map(|v| cesql::Value::String(v.clone()))
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use serde_json::Map;

    fn hm(pairs: &[(&str, &str)]) -> HeaderMap {
        let mut h = HeaderMap::new();
        for (k, v) in pairs {
            h.insert(
                HeaderName::from_bytes(k.as_bytes()).unwrap(),
                HeaderValue::from_str(v).unwrap(),
            );
        }
        h
    }

    /// The JSON format as a value tree: what `to_structured` must mean.
    fn reference(ev: &CloudEvent) -> Json {
        let mut obj = Map::new();
        for (k, v) in &ev.attrs {
            obj.insert(k.clone(), Json::String(v.clone()));
        }
        if let Some(d) = &ev.data {
            let json = is_json_type(ev.get("datacontenttype"));
            match serde_json::from_slice::<Json>(d) {
                Ok(j) if json => obj.insert("data".into(), j),
                _ => match std::str::from_utf8(d) {
                    Ok(s) if !json => obj.insert("data".into(), Json::String(s.into())),
                    _ => obj.insert("data_base64".into(), Json::String(B64.encode(d))),
                },
            };
        }
        Json::Object(obj)
    }

    #[test]
    fn structured_writer_matches_the_value_tree() {
        let cases: [(Option<&str>, &[u8]); 7] = [
            (
                Some("application/json"),
                b" {\"a\": [1, 2.50, \"\\u00e9\"]} ",
            ),
            (None, b"null"),
            (Some("application/json"), b"{not json"),
            (Some("text/plain"), "caf\u{e9} \"q\"\n".as_bytes()),
            (Some("application/octet-stream"), &[0, 159, 255, 1]),
            (Some("application/cloudevents+json; charset=utf-8"), b"42"),
            (Some("text/plain"), b""),
        ];
        for (ct, data) in cases {
            let mut ev = CloudEvent::new("id-\"1\"", "/s\\x", "t\u{1}");
            ev.set("zz", "last");
            ev.set("dataschema", "d");
            if let Some(ct) = ct {
                ev.set("datacontenttype", ct);
            }
            ev.data = Some(Bytes::copy_from_slice(data));
            let out = ev.to_structured();
            let parsed: Json = serde_json::from_slice(&out).unwrap();
            assert_eq!(parsed, reference(&ev), "{}", String::from_utf8_lossy(&out));
            let back = CloudEvent::from_structured(&out).unwrap();
            assert_eq!(back.attrs, ev.attrs);
        }
        let ev = CloudEvent::new("1", "/s", "t");
        assert_eq!(
            serde_json::from_slice::<Json>(&ev.to_structured()).unwrap(),
            reference(&ev)
        );
    }

    #[test]
    fn binary_roundtrip() {
        let h = hm(&[
            ("ce-specversion", "1.0"),
            ("ce-id", "1"),
            ("ce-source", "/s"),
            ("ce-type", "t"),
            ("ce-subject", "a%20b"),
            ("content-type", "text/plain"),
        ]);
        let ev = CloudEvent::from_http(&h, Bytes::from_static(b"hi")).unwrap();
        assert_eq!(ev.get("subject"), Some("a b"));
        assert_eq!(ev.get("datacontenttype"), Some("text/plain"));
        let out = ev.binary_headers();
        assert_eq!(out["ce-subject"], "a%20b");
        assert_eq!(out["content-type"], "text/plain");
        let back = CloudEvent::from_record(&ev.to_record()).unwrap();
        assert_eq!(back, ev);
    }

    #[test]
    fn structured_and_errors() {
        let h = hm(&[(
            "content-type",
            "Application/CloudEvents+JSON; charset=utf-8",
        )]);
        let body =
            br#"{"specversion":"0.3","id":"1","source":"/s","type":"t","data":{"a":1},"ext":5}"#;
        let ev = CloudEvent::from_http(&h, Bytes::from_static(body)).unwrap();
        assert_eq!(ev.get("ext"), Some("5"));
        assert_eq!(ev.data.as_deref(), Some(&br#"{"a":1}"#[..]));
        let s = CloudEvent::from_structured(&ev.to_structured()).unwrap();
        assert_eq!(s, ev);
        let bad = [
            (
                r#"{"specversion":"2.0","id":"1","source":"/s","type":"t"}"#,
                "spec",
            ),
            (r#"{"specversion":"1.0","source":"/s","type":"t"}"#, "id"),
            (
                r#"{"specversion":"1.0","id":"1","source":"/s","type":"t","time":"x"}"#,
                "time",
            ),
            (r#"[1]"#, "array"),
            (r#"{"#, "json"),
            (
                r#"{"specversion":"1.0","id":"1","source":"/s","type":"t","Bad":"x"}"#,
                "name",
            ),
        ];
        for (b, what) in bad {
            assert!(
                CloudEvent::from_http(&h, Bytes::from(b.to_string())).is_err(),
                "{what}"
            );
        }
        let batch = hm(&[("content-type", "application/cloudevents-batch+json")]);
        assert_eq!(
            CloudEvent::from_http(&batch, Bytes::from_static(b"[]")),
            Err(EventError::Batch)
        );
        assert_eq!(
            CloudEvent::from_http(&HeaderMap::new(), Bytes::new()),
            Err(EventError::NotAnEvent)
        );
    }

    #[test]
    fn record_roundtrip_and_garbage() {
        let mut ev = CloudEvent::new("1", "/s", "t");
        ev.set("ext", "é");
        ev.data = Some(Bytes::from_static(&[0, 1, 2, 255]));
        let rec = ev.to_record();
        assert_eq!(CloudEvent::from_record(&rec).unwrap(), ev);
        for cut in 0..rec.len() {
            let _ = CloudEvent::from_record(&rec[..cut]);
        }
        let mut x: u32 = 7;
        for _ in 0..2000 {
            let mut r = vec![1u8];
            for _ in 0..(x % 64) {
                x = x.wrapping_mul(1_103_515_245).wrapping_add(12345);
                r.push((x >> 16) as u8);
            }
            let _ = CloudEvent::from_record(&r);
        }
    }

    #[test]
    fn percent() {
        assert_eq!(percent_encode("a b\"%é"), "a%20b%22%25%C3%A9");
        assert_eq!(percent_decode("a%20b%22%25%C3%A9"), "a b\"%é");
        assert_eq!(percent_decode("100%"), "100%");
        assert_eq!(percent_decode("%zz"), "%zz");
    }
}
