//! Random-input tests: no parser of broker-shm panics on arbitrary input.

use broker_shm::event::{CloudEvent, EventRecord as _, percent_decode};
use broker_shm::ingress::broker_path;
use broker_shm::manifests::{Snapshot, parse_iso8601};
use bytes::Bytes;
use spright_test_support::Rng;

/// Up to `max` pieces: mostly `frags`, now and then a random character.
fn soup(rng: &mut Rng, frags: &[&str], max: usize) -> String {
    let n = rng.below(max);
    let mut s = String::new();
    for _ in 0..n {
        if rng.below(8) == 0 {
            s.push(char::from_u32((rng.next_u64() % 0x3000) as u32).unwrap_or('?'));
        } else {
            s.push_str(rng.pick(frags));
        }
    }
    s
}

#[test]
fn structured_events_never_panic() {
    let frags = [
        "{",
        "}",
        "[",
        "]",
        ":",
        ",",
        "\"",
        "specversion",
        "\"1.0\"",
        "\"0.3\"",
        "id",
        "source",
        "type",
        "data",
        "data_base64",
        "\"aGk=\"",
        "datacontentencoding",
        "\"base64\"",
        "null",
        "true",
        "1e999",
        "-0",
        "\\u0000",
        "time",
        "\"2020-01-01T00:00:00Z\"",
        " ",
    ];
    let mut rng = Rng(0xdead_beef_cafe_f00d);
    for _ in 0..20_000 {
        let s = soup(&mut rng, &frags, 40);
        if let Ok(ev) = CloudEvent::from_structured(s.as_bytes()) {
            let _ = ev.validate();
            let back = CloudEvent::from_record(&ev.to_record());
            assert_eq!(back.as_ref().ok(), Some(&ev));
            let _ = ev.to_structured();
            let _ = ev.binary_headers();
        }
    }
}

#[test]
fn binary_headers_never_panic() {
    let mut rng = Rng(42);
    for _ in 0..5_000 {
        let mut h = http::HeaderMap::new();
        for _ in 0..rng.below(8) {
            let name = rng.pick(&[
                "ce-specversion",
                "ce-id",
                "ce-source",
                "ce-type",
                "ce-x",
                "content-type",
                "ce-time",
            ]);
            let bytes: Vec<u8> = (0..rng.below(20))
                .map(|_| (rng.next_u64() % 94 + 32) as u8)
                .collect();
            if let Ok(v) = http::HeaderValue::from_bytes(&bytes) {
                h.append(name, v);
            }
        }
        let n = rng.below(64);
        let body = Bytes::from(rng.bytes(n));
        let _ = CloudEvent::from_http(&h, body);
    }
    for s in ["%", "%%", "%4", "%41%", "%C3", "%FF%FE", "a%2"] {
        let _ = percent_decode(s);
    }
}

#[test]
fn manifests_durations_and_paths_never_panic() {
    let frags = [
        "apiVersion: eventing.knative.dev/v1\n",
        "kind: Trigger\n",
        "kind: Broker\n",
        "kind: List\n",
        "metadata:\n",
        "  name: a\n",
        "  namespace: b\n",
        "spec:\n",
        "  broker: default\n",
        "  filters:\n",
        "    - cesql: \"",
        "'\"\n",
        "    - exact: {a: b}\n",
        "    - not: {}\n",
        "  subscriber: {uri: http://x}\n",
        "  delivery: {retry: -1, backoffDelay: PT}\n",
        "---\n",
        "items:\n",
        "  - ",
        "{",
        "}",
        "[",
        "]",
        ": ",
        "&a ",
        "*a ",
        "!!binary ",
        "\t",
        "\n",
    ];
    let mut rng = Rng(7);
    for _ in 0..3_000 {
        let mut s = Snapshot::default();
        s.add_yaml("random", &soup(&mut rng, &frags, 30));
    }
    let dfrags = [
        "P",
        "T",
        "1",
        "0",
        ".",
        "5",
        "S",
        "M",
        "H",
        "D",
        "W",
        "Y",
        "999999999999",
        "-",
    ];
    for _ in 0..20_000 {
        let _ = parse_iso8601(&soup(&mut rng, &dfrags, 12));
    }
    let pfrags = ["/", "a", "%", "..", "//", "?x=1", "é"];
    for _ in 0..20_000 {
        let _ = broker_path(&soup(&mut rng, &pfrags, 10));
        let _ = broker_shm::dropin::trigger_path(&soup(&mut rng, &pfrags, 10));
    }
}
