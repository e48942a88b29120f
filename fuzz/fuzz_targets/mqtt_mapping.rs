//! mqtt-adaptor inbound and outbound mapping: an MQTT message (topic, v5 content type and
//! user properties, payload, QoS) to a CloudEvent under both invalid-message policies and
//! the size limit; then the event back to MQTT through a topic template.
//! Format: `<topic>\n<content type or "-">\n<template>\n<k=v user properties...>\0<payload>`;
//! QoS and packet id come from the payload's length.
#![no_main]

use bytes::Bytes;
use libfuzzer_sys::fuzz_target;
use mqtt_adaptor::config::InvalidPolicy;
use mqtt_adaptor::mapping::{
    Disposition, InboundMessage, WrapSettings, dispose, to_cloudevent, to_mqtt, topic_for,
};
use spright_core::cloudevent::CloudEvent;
use spright_fuzz::{key_values, split_once, text};

fn outbound(ev: &CloudEvent, template: &str) {
    if let Ok(topic) = topic_for(ev, "mqtttopic", Some(template)) {
        assert!(!topic.is_empty() && !topic.contains(['+', '#', '\0']));
        for binary in [false, true] {
            let out = to_mqtt(ev, topic.clone(), binary);
            if !binary {
                // Structured output must read back as the same event.
                let back = CloudEvent::from_structured(&out.payload);
                if ev.validate().is_ok() {
                    let back = back.expect("structured output of a valid event must parse");
                    assert_eq!(back.attrs, ev.attrs);
                }
            }
        }
    }
    let _ = ev.binary_headers();
    let _ = ev.to_structured();
}

fuzz_target!(|data: &[u8]| {
    let (head, payload) = split_once(data, 0);
    let mut lines = head.splitn(4, |b| *b == b'\n');
    let topic = text(lines.next().unwrap_or_default()).into_owned();
    let content_type = text(lines.next().unwrap_or_default()).into_owned();
    let template = text(lines.next().unwrap_or_default()).into_owned();
    let user_properties = key_values(lines.next().unwrap_or_default());
    let msg = InboundMessage {
        topic,
        payload: Bytes::copy_from_slice(payload),
        qos: (payload.len() % 3) as u8,
        pkid: (payload.len() % 65_536) as u16,
        content_type: (content_type != "-").then_some(content_type),
        user_properties,
    };
    let settings = WrapSettings {
        client_id: "fuzz".into(),
        broker_url: "mqtt://127.0.0.1:1883".into(),
        event_source: None,
        event_type: "dev.spright.mqtt.message".into(),
        data_content_type: "application/octet-stream".into(),
    };
    let _ = to_cloudevent(&msg, &settings);
    for policy in [InvalidPolicy::Wrap, InvalidPolicy::DeadLetter] {
        for max in [usize::MAX, 16] {
            match dispose(&msg, &settings, policy, max) {
                Disposition::Sink(ev) => {
                    // Everything delivered to the sink is a valid CloudEvent.
                    assert_eq!(ev.validate(), Ok(()), "invalid event sent to the sink");
                    outbound(&ev, &template);
                }
                Disposition::DeadLetter(ev, reason) => {
                    assert!(!reason.is_empty());
                    outbound(&ev, &template);
                }
            }
        }
    }
});
