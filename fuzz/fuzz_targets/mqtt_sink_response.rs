//! mqtt-adaptor source: the HTTP/1.1 response framing of the delivery workers' sink
//! connections (head with interim 1xx, chunked bodies, pipelined answers in a row). Whatever
//! the sink sends: no panic, lengths within the input, and a head complete in a prefix reads
//! the same in the whole.
#![no_main]

use libfuzzer_sys::fuzz_target;
use mqtt_adaptor::h1::{BodyLen, KEEP_BODY, chunked_len, frame_response, parse_head};

fuzz_target!(|data: &[u8]| {
    let Some((&split, data)) = data.split_first() else {
        return;
    };
    let whole = parse_head(data);
    if let Ok(Some(head)) = &whole {
        assert!(head.head_len <= data.len());
        if head.body == BodyLen::Chunked {
            let mut keep = Vec::new();
            if let Ok(Some(n)) = chunked_len(&data[head.head_len..], &mut keep) {
                assert!(n <= data.len() - head.head_len);
            }
            assert!(keep.len() <= KEEP_BODY);
        }
    }
    let cut = usize::from(split).min(data.len());
    if let Ok(Some(prefix_head)) = parse_head(&data[..cut]) {
        assert_eq!(whole, Ok(Some(prefix_head)));
    }
    // Pipelined answers: each framed one is taken off the front, within what is left.
    let mut rest = data;
    while let Ok(Some(f)) = frame_response(rest) {
        assert!(f.len > 0 && f.len <= rest.len());
        assert!(f.body.len() <= KEEP_BODY);
        if f.close {
            break;
        }
        rest = &rest[f.len..];
    }
    let mut keep = Vec::new();
    if let Ok(Some(n)) = chunked_len(data, &mut keep) {
        assert!(n <= data.len());
        let mut again = Vec::new();
        assert_eq!(chunked_len(&data[..n], &mut again), Ok(Some(n)));
        assert_eq!(again, keep);
    }
});
