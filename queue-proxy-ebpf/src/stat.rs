//! The autoscaler's `Stat` message (contract A.6; defined in `spright_core::autoscaler`) built
//! from the request accounting's latest window.

use crate::accounting::Report;

pub use spright_core::autoscaler::{PROTOBUF_MIME, Stat};

/// The message for `pod`, given the latest closed window (`None`: only `pod_name`).
pub fn stat_from_report(pod: &str, report: Option<Report>) -> Stat {
    let r = report.unwrap_or_default();
    Stat {
        pod_name: pod.to_owned(),
        average_concurrent_requests: r.average_concurrency,
        average_proxied_concurrent_requests: r.average_proxied_concurrency,
        request_count: r.request_count,
        proxied_request_count: r.proxied_request_count,
        process_uptime: r.uptime,
        timestamp: 0,
    }
}
