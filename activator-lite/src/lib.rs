//! activator-lite: Knative's activator (serving `cmd/activator`) with the same external
//! contract: it buffers requests for revisions without ready pods, pokes the autoscaler
//! over its websocket, probes pods the moment they appear and load-balances across them
//! under containerConcurrency.

pub mod admission;
pub mod autoscaler;
pub mod backends;
pub mod config;
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
