//! Random-input tests: no parser of broker-shm panics on arbitrary input.

use broker_shm::event::{CloudEvent, percent_decode};
use broker_shm::ingress::broker_path;
use broker_shm::manifests::{Snapshot, parse_iso8601};
use bytes::Bytes;

struct Rng(u64);
impl Rng {
    fn next(&mut self) -> u64 {
        self.0 ^= self.0 << 13;
        self.0 ^= self.0 >> 7;
        self.0 ^= self.0 << 17;
        self.0
    }
    fn below(&mut self, n: usize) -> usize {
        (self.next() % n as u64) as usize
    }
    fn soup(&mut self, frags: &[&str], max: usize) -> String {
        let n = self.below(max);
        let mut s = String::new();
        for _ in 0..n {
            if self.below(8) == 0 {
                s.push(char::from_u32((self.next() % 0x3000) as u32).unwrap_or('?'));
            } else {
                s.push_str(frags[self.below(frags.len())]);
            }
        }
        s
    }
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
        let s = rng.soup(&frags, 40);
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
            let name = [
                "ce-specversion",
                "ce-id",
                "ce-source",
                "ce-type",
                "ce-x",
                "content-type",
                "ce-time",
            ][rng.below(7)];
            let bytes: Vec<u8> = (0..rng.below(20))
                .map(|_| (rng.next() % 94 + 32) as u8)
                .collect();
            if let Ok(v) = http::HeaderValue::from_bytes(&bytes) {
                h.append(name, v);
            }
        }
        let body = Bytes::from(
            (0..rng.below(64))
                .map(|_| rng.next() as u8)
                .collect::<Vec<u8>>(),
        );
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
        s.add_yaml("random", &rng.soup(&frags, 30));
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
        let _ = parse_iso8601(&rng.soup(&dfrags, 12));
    }
    let pfrags = ["/", "a", "%", "..", "//", "?x=1", "é"];
    for _ in 0..20_000 {
        let _ = broker_path(&rng.soup(&pfrags, 10));
        let _ = broker_shm::dropin::trigger_path(&rng.soup(&pfrags, 10));
    }
}
