//! broker-shm: a Knative Broker (class `SprightBroker`) whose events are stored in a
//! memory-mapped log and dispatched to Trigger subscribers, plus drop-in ingress/filter modes.

pub mod broker;
pub mod config;
pub mod delivery;
pub mod dropin;
pub mod event;
pub mod filter;
pub mod ingress;
pub mod log;
pub mod manifests;
pub mod metrics;
pub mod probe;
pub mod shm;
