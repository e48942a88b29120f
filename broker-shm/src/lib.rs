//! broker-shm: a Knative Broker (class `SprightBroker`) whose events are stored in a
//! memory-mapped log and dispatched to Trigger subscribers, plus drop-in ingress/filter modes.

pub mod event;
pub mod filter;
pub mod log;
pub mod manifests;
