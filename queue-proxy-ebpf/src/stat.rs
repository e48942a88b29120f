//! The autoscaler's `Stat` message (serving `pkg/autoscaler/metrics/stat.proto`), with the
//! field numbers of the contract (knative-contract.md A.6). Hand-written prost derive: no
//! build step.

use crate::accounting::Report;

/// `Content-Type` the scraper insists on.
pub const PROTOBUF_MIME: &str = "application/protobuf";

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

impl Stat {
    /// The message for `pod`, given the latest closed window (`None`: only `pod_name`).
    pub fn from_report(pod: &str, report: Option<Report>) -> Self {
        let r = report.unwrap_or_default();
        Self {
            pod_name: pod.to_owned(),
            average_concurrent_requests: r.average_concurrency,
            average_proxied_concurrent_requests: r.average_proxied_concurrency,
            request_count: r.request_count,
            proxied_request_count: r.proxied_request_count,
            process_uptime: r.uptime,
            timestamp: 0,
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use prost::Message;

    #[test]
    fn wire_format_matches_field_numbers() {
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
    fn fits_scraper_limit() {
        let s = Stat {
            pod_name: "x".repeat(253),
            average_concurrent_requests: 1.5,
            average_proxied_concurrent_requests: 1.5,
            request_count: 3.0,
            proxied_request_count: 3.0,
            process_uptime: 100.0,
            timestamp: 0,
        };
        assert!(s.encode_to_vec().len() <= 336);
    }
}
