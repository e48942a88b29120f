//! activator-lite: Knative's activator (serving `cmd/activator`) with the same external
//! contract: it buffers requests for revisions without ready pods, pokes the autoscaler
//! over its websocket, probes pods the moment they appear and load-balances across them
//! under containerConcurrency.
//!
//! Plain HTTP/1.1 requests take the byte-level fast path of [`fast`] (one parse, one
//! write each way, pooled keep-alive connections to the pods); everything else is served
//! by hyper ([`handler`]). Revisions annotated `spright.dev/dataplane-mode: event-driven`
//! (queue-proxy-ebpf's EPROXY mode, where the kernel steers the pod's serving port past
//! the sidecar) are probed on the sidecar's admin port instead of the serving port; see
//! [`manifests::DataplaneMode`] and [`backends`].

pub mod admission;
pub mod autoscaler;
pub mod backends;
pub mod config;
pub mod connector;
pub mod fast;
pub mod handler;
pub mod manifests;
pub mod metrics;
pub mod proto;
pub mod server;
pub mod stats;
pub mod throttler;
pub mod tls;

pub use config::Config;
pub use server::run;
