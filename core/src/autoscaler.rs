//! The Knative autoscaler's wire messages (serving `pkg/autoscaler/metrics/stat.proto`,
//! contract A.6 and B.5), derived with prost so no build step or protoc is needed. The
//! queue-proxy serves `Stat` on :9090; the activator pushes `WireStatMessages` frames over its
//! websocket. Field numbers follow the .proto.

/// `Content-Type` the autoscaler's scraper insists on.
pub const PROTOBUF_MIME: &str = "application/protobuf";

/// The scraper reads at most this many bytes of a `Stat`.
pub const SCRAPER_READ_LIMIT: usize = 336;

/// One pod's stat for a revision.
#[derive(Clone, PartialEq, prost::Message)]
pub struct Stat {
    #[prost(string, tag = "1")]
    pub pod_name: String,
    #[prost(double, tag = "2")]
    pub average_concurrent_requests: f64,
    #[prost(double, tag = "3")]
    pub average_proxied_concurrent_requests: f64,
    #[prost(double, tag = "4")]
    pub request_count: f64,
    #[prost(double, tag = "5")]
    pub proxied_request_count: f64,
    #[prost(double, tag = "6")]
    pub process_uptime: f64,
    /// Never set by the queue-proxy.
    #[prost(int64, tag = "7")]
    pub timestamp: i64,
}

/// A stat keyed by revision.
#[derive(Clone, PartialEq, prost::Message)]
pub struct WireStatMessage {
    #[prost(string, tag = "1")]
    pub namespace: String,
    #[prost(string, tag = "2")]
    pub name: String,
    #[prost(message, optional, tag = "3")]
    pub stat: Option<Stat>,
}

/// One websocket binary frame from the activator.
#[derive(Clone, PartialEq, prost::Message)]
pub struct WireStatMessages {
    #[prost(message, repeated, tag = "1")]
    pub messages: Vec<WireStatMessage>,
}

#[cfg(test)]
mod tests {
    use super::*;
    use prost::Message;

    #[test]
    fn stat_wire_format_matches_field_numbers() {
        let s = Stat {
            pod_name: "p".into(),
            average_concurrent_requests: 1.0,
            process_uptime: 2.0,
            ..Stat::default()
        };
        let b = s.encode_to_vec();
        // field 1 (len) "p", field 2 (fixed64) 1.0, field 6 (fixed64) 2.0
        assert_eq!(&b[..3], &[0x0a, 1, b'p']);
        assert_eq!(b[3], 0x11);
        assert_eq!(b[12], 0x31);
        assert_eq!(Stat::decode(b.as_slice()).expect("decodes"), s);
    }

    #[test]
    fn a_full_stat_fits_the_scraper_limit() {
        let s = Stat {
            pod_name: "x".repeat(253),
            average_concurrent_requests: 1.5,
            average_proxied_concurrent_requests: 1.5,
            request_count: 3.0,
            proxied_request_count: 3.0,
            process_uptime: 100.0,
            timestamp: 0,
        };
        assert!(s.encode_to_vec().len() <= SCRAPER_READ_LIMIT);
    }

    #[test]
    fn wire_messages_match_field_numbers() {
        let m = WireStatMessages {
            messages: vec![WireStatMessage {
                namespace: "ns".into(),
                name: "rev".into(),
                stat: Some(Stat {
                    pod_name: "p".into(),
                    average_concurrent_requests: 1.0,
                    request_count: 1.0,
                    ..Default::default()
                }),
            }],
        };
        let b = m.encode_to_vec();
        assert_eq!(b[0], 0x0a); // field 1 (messages), length-delimited
        assert_eq!(&b[2..6], &[0x0a, 2, b'n', b's']); // namespace "ns"
        assert_eq!(WireStatMessages::decode(b.as_slice()).expect("decodes"), m);
        let stat = m.messages[0]
            .stat
            .clone()
            .unwrap_or_default()
            .encode_to_vec();
        assert_eq!((stat[0], stat[3], stat[12]), (0x0a, 0x11, 0x21));
    }
}
