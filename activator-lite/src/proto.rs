//! The autoscaler's wire messages, shared with the queue-proxy through spright-core.

pub use spright_core::autoscaler::{Stat, WireStatMessage, WireStatMessages};
