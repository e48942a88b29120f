//! MQTT message <-> CloudEvent mapping (CloudEvents MQTT protocol binding, plus wrapping of
//! plain payloads).
//!
//! Inbound, a message is a CloudEvent when:
//! - MQTT v5 binary mode: a user property `specversion` is present; every user property whose
//!   name is a valid attribute name becomes an attribute, the v5 content type becomes
//!   `datacontenttype`, the payload is the data;
//! - structured mode: the v5 content type, or a user property `Content-Type` (what the Knative
//!   prototype reads), starts with `application/cloudevents`; or, without any content type
//!   (MQTT 3.1.1), the payload is a JSON object with a `specversion` member.
//!
//! Anything else is wrapped:
//! - `specversion` 1.0, `type` the configured type (default `dev.spright.mqtt.message`),
//! - `source` the configured event source, else `mqtt://<host>:<port>/<topic>`,
//! - `subject` the topic (none for a topic of blanks), `time` the receive time,
//! - `datacontenttype` the v5 content type, else the configured one,
//! - `id`: for QoS 1/2, `mqtt-` + 32 hex digits of SHA-256 over (client id, topic, packet id,
//!   payload). A broker resends an unacknowledged message in a resumed session with the same
//!   packet id, so a redelivery after a crash or reconnect keeps its id and a receiver can
//!   drop it by (`source`, `id`). Packet ids are recycled (at most 65,535 in flight), so two
//!   distinct messages with identical topic and payload can collide only when they also get
//!   the same packet id; receivers that dedupe over a short window are not affected. Producers
//!   needing exact ids should publish CloudEvents, whose `id` is kept. For QoS 0 (never
//!   redelivered) the id is a random UUID.

use bytes::Bytes;
use sha2::{Digest, Sha256};

use crate::config::InvalidPolicy;
use spright_core::cloudevent::{
    CloudEvent, EventError, go_media_type_parses, is_structured_content_type, valid_attr_name,
};

/// One received MQTT message, independent of protocol version.
#[derive(Debug, Clone, Default)]
pub struct InboundMessage {
    pub topic: String,
    pub payload: Bytes,
    pub qos: u8,
    pub pkid: u16,
    /// MQTT v5 content type property.
    pub content_type: Option<String>,
    /// MQTT v5 user properties.
    pub user_properties: Vec<(String, String)>,
}

/// Settings for wrapping.
#[derive(Debug, Clone)]
pub struct WrapSettings {
    pub client_id: String,
    /// `mqtt://host:port` of the broker.
    pub broker_url: String,
    pub event_source: Option<String>,
    pub event_type: String,
    pub data_content_type: String,
}

/// Result of mapping one message.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Mapped {
    /// A valid CloudEvent (carried or wrapped).
    Event(CloudEvent),
    /// The message claimed to be a CloudEvent but was not valid; `wrapped` is the payload
    /// wrapped as a plain message, for the configured policy.
    Invalid {
        wrapped: CloudEvent,
        error: EventError,
    },
}

/// Does the message claim to be a CloudEvent, and in which mode?
fn claimed_mode(msg: &InboundMessage) -> Option<bool> {
    // Some(true) structured, Some(false) binary.
    let ct_prop = msg.content_type.as_deref();
    let ct_user = msg
        .user_properties
        .iter()
        .find(|(k, _)| k.eq_ignore_ascii_case("content-type"))
        .map(|(_, v)| v.as_str());
    if ct_prop.or(ct_user).is_some_and(is_structured_content_type) {
        return Some(true);
    }
    if msg.user_properties.iter().any(|(k, _)| k == "specversion") {
        return Some(false);
    }
    if ct_prop.is_none() && ct_user.is_none() && looks_like_structured(&msg.payload) {
        return Some(true);
    }
    None
}

/// A cheap sniff for a JSON object carrying `"specversion"`, before a full parse.
fn looks_like_structured(p: &[u8]) -> bool {
    let trimmed = p.iter().position(|b| !b.is_ascii_whitespace());
    matches!(trimmed.map(|i| p[i]), Some(b'{')) && p.windows(13).any(|w| w == b"\"specversion\"")
}

/// Maps an MQTT message to a CloudEvent (see the module docs for the rules).
pub fn to_cloudevent(msg: &InboundMessage, s: &WrapSettings) -> Mapped {
    match claimed_mode(msg) {
        None => Mapped::Event(wrap(msg, s)),
        Some(structured) => {
            let parsed = if structured {
                CloudEvent::from_structured(&msg.payload)
            } else {
                from_v5_binary(msg)
            };
            match parsed {
                Ok(ev) => Mapped::Event(ev),
                Err(error) => Mapped::Invalid {
                    wrapped: wrap(msg, s),
                    error,
                },
            }
        }
    }
}

fn from_v5_binary(msg: &InboundMessage) -> Result<CloudEvent, EventError> {
    let mut ev = CloudEvent::default();
    for (k, v) in &msg.user_properties {
        if valid_attr_name(k) && k != "datacontenttype" {
            ev.attrs.insert(k.clone(), v.clone());
        }
    }
    let ct = msg.content_type.clone().or_else(|| {
        msg.user_properties
            .iter()
            .find(|(k, _)| k == "datacontenttype")
            .map(|(_, v)| v.clone())
    });
    if let Some(ct) = ct {
        ev.attrs.insert("datacontenttype".into(), ct);
    }
    if !msg.payload.is_empty() {
        ev.data = Some(msg.payload.clone());
    }
    ev.drop_binary_datacontentencoding();
    ev.validate()?;
    Ok(ev)
}

/// Stable id for QoS 1/2 messages (see module docs).
pub fn stable_id(client_id: &str, msg: &InboundMessage) -> String {
    let mut h = Sha256::new();
    h.update((client_id.len() as u64).to_be_bytes());
    h.update(client_id.as_bytes());
    h.update((msg.topic.len() as u64).to_be_bytes());
    h.update(msg.topic.as_bytes());
    h.update(msg.pkid.to_be_bytes());
    h.update(&msg.payload);
    let d = h.finalize();
    let mut id = String::with_capacity(37);
    id.push_str("mqtt-");
    for b in &d[..16] {
        id.push(char::from_digit(u32::from(b >> 4), 16).unwrap_or('0'));
        id.push(char::from_digit(u32::from(b & 15), 16).unwrap_or('0'));
    }
    id
}

/// Percent-encodes a topic for use in a URI path (keeps `/` and unreserved characters).
fn topic_path(topic: &str) -> String {
    let mut out = String::with_capacity(topic.len());
    for b in topic.bytes() {
        if b.is_ascii_alphanumeric() || matches!(b, b'/' | b'-' | b'.' | b'_' | b'~') {
            out.push(b as char);
        } else {
            out.push_str(&format!("%{b:02X}"));
        }
    }
    out
}

/// Wraps any payload as a CloudEvent.
pub fn wrap(msg: &InboundMessage, s: &WrapSettings) -> CloudEvent {
    let mut ev = CloudEvent::default();
    ev.set("specversion", "1.0");
    let id = if msg.qos == 0 {
        uuid::Uuid::new_v4().to_string()
    } else {
        stable_id(&s.client_id, msg)
    };
    ev.set("id", id);
    let source = match &s.event_source {
        Some(src) => src.clone(),
        None => format!("{}/{}", s.broker_url, topic_path(&msg.topic)),
    };
    ev.set("source", source);
    ev.set("type", s.event_type.clone());
    // A blank subject is invalid (spec: non-empty when present); MQTT allows a topic of
    // blanks.
    if !msg.topic.trim().is_empty() {
        ev.set("subject", msg.topic.clone());
    }
    ev.set(
        "time",
        chrono::Utc::now().to_rfc3339_opts(chrono::SecondsFormat::Micros, true),
    );
    // datacontenttype must be a media type (blank or malformed makes the event invalid): a
    // v5 content type that is not one falls back to the configured type, left out if that
    // is not one either.
    let ct = msg
        .content_type
        .clone()
        .filter(|c| go_media_type_parses(c))
        .unwrap_or_else(|| s.data_content_type.clone());
    if go_media_type_parses(&ct) {
        ev.set("datacontenttype", ct);
    }
    if !msg.payload.is_empty() {
        ev.data = Some(msg.payload.clone());
    }
    ev
}

/// What to deliver for a message under the invalid-message policy.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Disposition {
    /// Post to the sink.
    Sink(CloudEvent),
    /// Post to the dead-letter sink (or, without one, log, count and acknowledge).
    DeadLetter(CloudEvent, String),
}

/// Applies the invalid-message policy and the oversize limit to a received message.
pub fn dispose(
    msg: &InboundMessage,
    s: &WrapSettings,
    policy: InvalidPolicy,
    max_bytes: usize,
) -> Disposition {
    if msg.payload.len() > max_bytes {
        let mut meta = InboundMessage {
            payload: Bytes::new(),
            ..msg.clone()
        };
        meta.content_type = None;
        let mut ev = wrap(&meta, s);
        // Keep the id the full message would have had.
        ev.set("id", wrap(msg, s).id().to_owned());
        ev.set("mqttsize", msg.payload.len().to_string());
        let reason = format!(
            "message of {} bytes exceeds the limit of {max_bytes} bytes",
            msg.payload.len()
        );
        ev.set("mqtterror", reason.clone());
        return Disposition::DeadLetter(ev, reason);
    }
    match to_cloudevent(msg, s) {
        Mapped::Event(ev) => Disposition::Sink(ev),
        Mapped::Invalid { mut wrapped, error } => {
            let reason = format!("invalid CloudEvent: {error}");
            match policy {
                InvalidPolicy::Wrap => Disposition::Sink(wrapped),
                InvalidPolicy::DeadLetter => {
                    wrapped.set("mqtterror", reason.clone());
                    Disposition::DeadLetter(wrapped, reason)
                }
            }
        }
    }
}

/// Applies `K_CE_OVERRIDES` extensions.
pub fn apply_overrides(
    ev: &mut CloudEvent,
    overrides: &std::collections::BTreeMap<String, String>,
) {
    for (k, v) in overrides {
        ev.attrs.insert(k.clone(), v.clone());
    }
}

/// An MQTT publication derived from a CloudEvent (sink direction).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Outbound {
    pub topic: String,
    pub payload: Bytes,
    /// v5 content type property.
    pub content_type: Option<String>,
    /// v5 user properties.
    pub user_properties: Vec<(String, String)>,
}

#[derive(Debug, thiserror::Error, PartialEq, Eq)]
pub enum TopicError {
    #[error("no MQTT topic: set the `{0}` extension or configure a topic template")]
    NoTopic(String),
    #[error("template attribute `{0}` is missing from the event")]
    MissingAttribute(String),
    #[error("resulting topic `{0}` is not a valid MQTT topic name")]
    InvalidTopic(String),
}

/// Chooses the topic: the extension `attr` when present, else the template with `{name}`
/// replaced by attribute values.
pub fn topic_for(
    ev: &CloudEvent,
    attr: &str,
    template: Option<&str>,
) -> Result<String, TopicError> {
    let topic = if let Some(t) = ev.get(attr) {
        t.to_owned()
    } else if let Some(tpl) = template {
        let mut out = String::with_capacity(tpl.len() + 16);
        let mut rest = tpl;
        while let Some(open) = rest.find('{') {
            out.push_str(&rest[..open]);
            let after = &rest[open + 1..];
            let Some(close) = after.find('}') else {
                out.push_str(&rest[open..]);
                rest = "";
                break;
            };
            let name = &after[..close];
            let value = ev
                .get(name)
                .ok_or_else(|| TopicError::MissingAttribute(name.to_owned()))?;
            out.push_str(value);
            rest = &after[close + 1..];
        }
        out.push_str(rest);
        out
    } else {
        return Err(TopicError::NoTopic(attr.to_owned()));
    };
    if topic.is_empty() || topic.contains(['+', '#', '\0']) || topic.len() > 65_535 {
        return Err(TopicError::InvalidTopic(topic));
    }
    Ok(topic)
}

/// Encodes a CloudEvent for MQTT: binary (v5 only) or structured.
pub fn to_mqtt(ev: &CloudEvent, topic: String, binary_v5: bool) -> Outbound {
    if binary_v5 {
        let user_properties = ev
            .attrs
            .iter()
            .filter(|(k, _)| k.as_str() != "datacontenttype")
            .map(|(k, v)| (k.clone(), v.clone()))
            .collect();
        Outbound {
            topic,
            payload: ev.data.clone().unwrap_or_default(),
            content_type: ev.get("datacontenttype").map(str::to_owned),
            user_properties,
        }
    } else {
        Outbound {
            topic,
            payload: Bytes::from(ev.to_structured()),
            content_type: Some(spright_core::cloudevent::STRUCTURED_CONTENT_TYPE.to_owned()),
            user_properties: Vec::new(),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn settings() -> WrapSettings {
        WrapSettings {
            client_id: "c".into(),
            broker_url: "mqtt://127.0.0.1:1883".into(),
            event_source: None,
            event_type: "dev.spright.mqtt.message".into(),
            data_content_type: "application/octet-stream".into(),
        }
    }

    fn msg(topic: &str, payload: &[u8]) -> InboundMessage {
        InboundMessage {
            topic: topic.into(),
            payload: Bytes::copy_from_slice(payload),
            qos: 1,
            pkid: 7,
            ..Default::default()
        }
    }

    /// A v5 binary-mode message: the four required attributes plus one more user property.
    fn v5_binary_with(name: &str, value: &str) -> InboundMessage {
        let mut m = msg("t", b"payload");
        m.user_properties = vec![
            ("specversion".into(), "1.0".into()),
            ("id".into(), "42".into()),
            ("source".into(), "/s".into()),
            ("type".into(), "t".into()),
            (name.into(), value.into()),
        ];
        m
    }

    /// Fuzz finding (mqtt_cloudevent): a v5 binary-mode message with a user property named
    /// `data` is not a valid CloudEvent; it follows the invalid-message policy.
    #[test]
    fn v5_property_named_data_is_an_invalid_event() {
        // `data_base64` is no attribute name (underscore): ignored like any other property.
        let m = v5_binary_with("data_base64", "x");
        assert!(
            matches!(to_cloudevent(&m, &settings()), Mapped::Event(ev) if ev.get("data_base64").is_none())
        );

        let m = v5_binary_with("data", "x");
        let Mapped::Invalid { wrapped, error } = to_cloudevent(&m, &settings()) else {
            panic!("data: accepted")
        };
        assert_eq!(error, EventError::AttributeName("data".into()));
        assert_eq!(wrapped.data.as_deref(), Some(&b"payload"[..]));
        // Wrapped as a plain message, it encodes and parses back.
        assert_eq!(
            CloudEvent::from_structured(&wrapped.to_structured()).unwrap(),
            wrapped
        );
        let d = dispose(&m, &settings(), InvalidPolicy::Wrap, 1 << 20);
        assert!(
            matches!(&d, Disposition::Sink(ev) if ev.id() == wrapped.id() && ev.data == wrapped.data),
            "{d:?}"
        );
        let d = dispose(&m, &settings(), InvalidPolicy::DeadLetter, 1 << 20);
        assert!(
            matches!(&d, Disposition::DeadLetter(_, r) if r.contains("data")),
            "{d:?}"
        );
    }

    #[test]
    fn plain_payload_is_wrapped() {
        let Mapped::Event(ev) = to_cloudevent(&msg("a b/c", b"hello"), &settings()) else {
            panic!("not an event")
        };
        assert_eq!(ev.get("source"), Some("mqtt://127.0.0.1:1883/a%20b/c"));
        assert_eq!(ev.get("subject"), Some("a b/c"));
        assert_eq!(ev.get("type"), Some("dev.spright.mqtt.message"));
        assert_eq!(ev.get("datacontenttype"), Some("application/octet-stream"));
        assert_eq!(ev.data.as_deref(), Some(&b"hello"[..]));
        assert!(ev.id().starts_with("mqtt-") && ev.id().len() == 37);
        ev.validate().unwrap();
    }

    /// Fuzz findings (mqtt_mapping): a topic or v5 content type of blanks made the wrapped
    /// event invalid (blank subject / datacontenttype).
    #[test]
    fn blank_topic_and_content_type_are_left_out() {
        let mut m = msg(" ", b"hello");
        m.content_type = Some("\r".into());
        let Mapped::Event(ev) = to_cloudevent(&m, &settings()) else {
            panic!("not an event")
        };
        assert_eq!(ev.get("subject"), None);
        assert_eq!(ev.get("datacontenttype"), Some("application/octet-stream"));
        ev.validate().unwrap();
    }

    #[test]
    fn ids_stable_for_redelivery_and_distinct_otherwise() {
        let s = settings();
        let a = wrap(&msg("t", b"x"), &s);
        let b = wrap(&msg("t", b"x"), &s);
        assert_eq!(a.id(), b.id());
        let mut other = msg("t", b"x");
        other.pkid = 8;
        assert_ne!(wrap(&other, &s).id(), a.id());
        assert_ne!(wrap(&msg("t", b"y"), &s).id(), a.id());
        let mut q0 = msg("t", b"x");
        q0.qos = 0;
        assert_ne!(wrap(&q0, &s).id(), wrap(&q0, &s).id());
    }

    #[test]
    fn structured_payload_keeps_attributes() {
        let body =
            br#"{"specversion":"1.0","id":"abc","source":"/dev/1","type":"temp","data":{"c":21}}"#;
        let Mapped::Event(ev) = to_cloudevent(&msg("t", body), &settings()) else {
            panic!()
        };
        assert_eq!(ev.id(), "abc");
        assert_eq!(ev.get("source"), Some("/dev/1"));
        assert_eq!(ev.data.as_deref(), Some(&br#"{"c":21}"#[..]));
    }

    #[test]
    fn prototype_style_content_type_user_property() {
        let mut m = msg(
            "t",
            br#"{"specversion":"1.0","id":"1","source":"/s","type":"t"}"#,
        );
        m.user_properties = vec![("Content-Type".into(), "application/cloudevents+json".into())];
        assert!(matches!(to_cloudevent(&m, &settings()), Mapped::Event(ev) if ev.id() == "1"));
    }

    #[test]
    fn v5_binary_mode() {
        let mut m = msg("t", b"\x01\x02");
        m.content_type = Some("application/x-raw".into());
        m.user_properties = vec![
            ("specversion".into(), "1.0".into()),
            ("id".into(), "42".into()),
            ("source".into(), "/s".into()),
            ("type".into(), "t".into()),
            ("Not-An-Attr".into(), "x".into()),
            ("myext".into(), "v".into()),
        ];
        let Mapped::Event(ev) = to_cloudevent(&m, &settings()) else {
            panic!()
        };
        assert_eq!(ev.id(), "42");
        assert_eq!(ev.get("myext"), Some("v"));
        assert_eq!(ev.get("datacontenttype"), Some("application/x-raw"));
        assert!(ev.get("Not-An-Attr").is_none());
        // Back to MQTT and in again.
        let out = to_mqtt(&ev, "t".into(), true);
        let again = InboundMessage {
            content_type: out.content_type,
            user_properties: out.user_properties,
            payload: out.payload,
            ..m
        };
        assert_eq!(to_cloudevent(&again, &settings()), Mapped::Event(ev));
    }

    #[test]
    fn invalid_cloudevents_follow_policy() {
        let m = msg("t", br#"{"specversion":"1.0","id":"1"}"#);
        match dispose(&m, &settings(), InvalidPolicy::Wrap, 1000) {
            Disposition::Sink(ev) => assert_eq!(ev.get("subject"), Some("t")),
            d => panic!("{d:?}"),
        }
        match dispose(&m, &settings(), InvalidPolicy::DeadLetter, 1000) {
            Disposition::DeadLetter(ev, reason) => {
                assert!(reason.contains("missing required attribute `source`"));
                assert!(ev.get("mqtterror").is_some());
            }
            d => panic!("{d:?}"),
        }
        match dispose(&msg("t", &[0u8; 20]), &settings(), InvalidPolicy::Wrap, 10) {
            Disposition::DeadLetter(ev, _) => {
                assert!(ev.data.is_none());
                assert_eq!(ev.get("mqttsize"), Some("20"));
            }
            d => panic!("{d:?}"),
        }
    }

    #[test]
    fn topics_from_extension_or_template() {
        let mut ev = CloudEvent::default();
        ev.set("subject", "dev1");
        ev.set("type", "cmd");
        assert_eq!(
            topic_for(&ev, "mqtttopic", Some("devices/{subject}/{type}")).unwrap(),
            "devices/dev1/cmd"
        );
        assert_eq!(
            topic_for(&ev, "mqtttopic", Some("x/{missing}")),
            Err(TopicError::MissingAttribute("missing".into()))
        );
        ev.set("mqtttopic", "direct/t");
        assert_eq!(topic_for(&ev, "mqtttopic", None).unwrap(), "direct/t");
        ev.set("mqtttopic", "bad/#");
        assert!(topic_for(&ev, "mqtttopic", None).is_err());
        let empty = CloudEvent::default();
        assert!(matches!(
            topic_for(&empty, "mqtttopic", None),
            Err(TopicError::NoTopic(_))
        ));
    }

    proptest::proptest! {
        /// Any payload and properties map without panicking, and valid outputs validate.
        #[test]
        fn mapping_never_panics(
            payload in proptest::collection::vec(proptest::num::u8::ANY, 0..300),
            topic in "[a-z/ #+]{0,20}",
            qos in 0u8..3,
            ct in proptest::option::of(proptest::sample::select(vec![
                "application/cloudevents+json", "application/json", "text/plain", ""])),
            props in proptest::collection::vec((
                proptest::sample::select(vec!["specversion", "id", "source", "type", "Content-Type", "x", "BAD", "datacontenttype"]),
                ".{0,8}"), 0..6),
        ) {
            let m = InboundMessage {
                topic,
                payload: Bytes::from(payload),
                qos,
                pkid: 1,
                content_type: ct.map(str::to_owned),
                user_properties: props.into_iter().map(|(k, v)| (k.to_owned(), v)).collect(),
            };
            match dispose(&m, &settings(), InvalidPolicy::Wrap, 200) {
                Disposition::Sink(ev) => proptest::prop_assert!(ev.validate().is_ok()),
                Disposition::DeadLetter(ev, _) => proptest::prop_assert!(ev.validate().is_ok()),
            }
        }

        /// Structured JSON built from random attributes maps back to the same attributes.
        #[test]
        fn structured_roundtrip(id in "[!-~][ -~]{0,15}", src in "[!-~][ -~]{0,15}", ext in "[ -~]{0,16}") {
            // A source Go's url.Parse refuses makes the event invalid (as in Knative).
            proptest::prop_assume!(spright_core::cloudevent::go_url_parses(&src));
            let mut ev = CloudEvent::default();
            ev.set("specversion", "1.0");
            ev.set("id", id);
            ev.set("source", src);
            ev.set("type", "t");
            ev.set("myext", ext);
            let out = to_mqtt(&ev, "t".into(), false);
            let m = InboundMessage { topic: "t".into(), payload: out.payload, qos: 1, pkid: 1,
                content_type: out.content_type, user_properties: vec![] };
            proptest::prop_assert_eq!(to_cloudevent(&m, &settings()), Mapped::Event(ev));
        }
    }
}
