//! broker-shm CloudEvents: HTTP binary/structured decoding, the JSON event format and the
//! log record format, each followed by the encodings the broker applies to what it accepted.
//! The first byte picks the decoder; modes 4 and 5 are the ingress and drop-in filter
//! request paths.
#![no_main]

use broker_shm::dropin::trigger_path;
use broker_shm::event::{CloudEvent, EventRecord as _, percent_decode, percent_encode};
use broker_shm::ingress::broker_path;
use bytes::Bytes;
use libfuzzer_sys::fuzz_target;
use spright_fuzz::{headers_and_body, text};

fn reencode(ev: &CloudEvent) {
    // What ingress stores, and what delivery sends, must decode again.
    let rec = ev.to_record();
    let back = CloudEvent::from_record(&rec).expect("a record the broker wrote must decode");
    assert_eq!(&back, ev, "log record round trip");
    let structured = ev.to_structured();
    let _ = CloudEvent::from_structured(&structured);
    let _ = ev.binary_headers();
    let _ = ev.validate();
    let _ = ev.specversion();
}

fuzz_target!(|data: &[u8]| {
    let Some((&mode, rest)) = data.split_first() else {
        return;
    };
    match mode % 6 {
        0 => {
            let (headers, body) = headers_and_body(rest);
            if let Ok(ev) = CloudEvent::from_http(&headers, Bytes::copy_from_slice(body)) {
                reencode(&ev);
            }
        }
        1 => {
            if let Ok(ev) = CloudEvent::from_structured(rest) {
                reencode(&ev);
            }
        }
        2 => {
            if let Ok(ev) = CloudEvent::from_record(rest) {
                reencode(&ev);
            }
        }
        3 => {
            let s = text(rest);
            assert_eq!(
                percent_decode(&percent_encode(&s)).as_deref(),
                Some(s.as_ref())
            );
        }
        4 => {
            if let Ok((ns, name)) = broker_path(&text(rest)) {
                assert!(!ns.is_empty() && !name.is_empty());
            }
        }
        _ => {
            let _ = trigger_path(&text(rest));
        }
    }
});
