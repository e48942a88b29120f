//! The shared CloudEvents model (spright_core::cloudevent) as mqtt-adaptor's sink uses it:
//! CloudEvents over HTTP (binary and structured mode, batch refused)
//! and the JSON event format; what is accepted must encode and decode again.
//! Format: an HTTP head (`name: value` lines), a blank line, the body.
#![no_main]

use bytes::Bytes;
use libfuzzer_sys::fuzz_target;
use spright_core::cloudevent::{CloudEvent, percent_decode, percent_encode};
use spright_fuzz::{headers_and_body, text};

fuzz_target!(|data: &[u8]| {
    if let Some(json) = data.strip_prefix(b"\x01") {
        if let Ok(ev) = CloudEvent::from_structured(json) {
            let back = CloudEvent::from_structured(&ev.to_structured())
                .expect("to_structured output must parse");
            assert_eq!(back.attrs, ev.attrs);
        }
        return;
    }
    if let Some(s) = data.strip_prefix(b"\x02") {
        let s = text(s);
        assert_eq!(
            percent_decode(&percent_encode(&s)).as_deref(),
            Some(s.as_ref())
        );
        return;
    }
    let (headers, body) = headers_and_body(data);
    if let Ok(ev) = CloudEvent::from_http(&headers, Bytes::copy_from_slice(body)) {
        assert_eq!(ev.validate(), Ok(()));
        let again =
            CloudEvent::from_http(&ev.binary_headers(), ev.data.clone().unwrap_or_default());
        if let Ok(again) = again {
            assert_eq!(again.attrs.get("id"), ev.attrs.get("id"));
        }
        let back = CloudEvent::from_structured(&ev.to_structured())
            .expect("to_structured output must parse");
        assert_eq!(back.attrs, ev.attrs);
    }
});
