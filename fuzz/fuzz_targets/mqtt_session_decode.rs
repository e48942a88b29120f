//! mqtt-adaptor source: decoding what the broker sends on the source's own client loop
//! (MQTT 3.1.1 or 5 by the first byte's low bit). No panic, and every decoded packet consumes
//! input, so the decode loop ends.
#![no_main]

use bytes::BytesMut;
use libfuzzer_sys::fuzz_target;
use mqtt_adaptor::session::decode;

fuzz_target!(|data: &[u8]| {
    let Some((&mode, rest)) = data.split_first() else {
        return;
    };
    let v5 = mode & 1 == 1;
    let mut rbuf = BytesMut::from(rest);
    let mut wbuf = BytesMut::new();
    loop {
        let before = rbuf.len();
        match decode(v5, &mut rbuf, &mut wbuf) {
            Ok(Some(_)) => assert!(rbuf.len() < before, "a decoded packet consumes input"),
            Ok(None) | Err(_) => break,
        }
    }
});
