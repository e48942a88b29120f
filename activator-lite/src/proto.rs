//! The autoscaler's wire messages (`pkg/autoscaler/metrics/stat.proto`), derived with
//! prost so no build step or protoc is needed. Field numbers follow the .proto.

/// One pod's (here: the activator's) stat for a revision.
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

/// One websocket binary frame.
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
    fn encoding_matches_field_numbers() {
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
        // field 1 (messages), length-delimited
        assert_eq!(b[0], 0x0a);
        // inner: field 1 namespace "ns"
        assert_eq!(&b[2..6], &[0x0a, 2, b'n', b's']);
        assert_eq!(WireStatMessages::decode(b.as_slice()).unwrap(), m);
        // stat: pod_name (0x0a), field 2 double (0x11), field 4 double (0x21)
        let stat = m.messages[0].stat.clone().unwrap().encode_to_vec();
        assert_eq!(stat[0], 0x0a);
        assert_eq!(stat[3], 0x11);
        assert_eq!(stat[12], 0x21);
    }
}
