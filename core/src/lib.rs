//! spright-core: the SPRIGHT dataplane as a library.
//!
//! - [`pool`]: the shared-memory slot pool (memmap2), offsets not pointers.
//! - [`descriptor`]: the 16-byte descriptor that moves between functions.
//! - [`transport`]: the `Transport` trait with the sk_msg and Unix-socket implementations.
//! - [`control`]: the control protocol by which a function joins the node's dataplane.
//! - [`sdk`]: the function SDK.
//! - [`http1`]: HTTP/1.1 response framing, chunked-body scanning and `Rewind` for the fast paths.
//! - [`logging`]: zap-compatible JSON logs shared by every component.
//! - [`autoscaler`]: the Knative autoscaler's wire messages (`Stat`, `WireStatMessages`).
//! - [`cloudevent`]: the CloudEvents model, the JSON event format and the HTTP binding.

pub mod autoscaler;
pub mod backoff;
pub mod chain;
pub mod cloudevent;
pub mod control;
pub mod dataplane_mode;
pub mod descriptor;
pub mod duration;
pub mod host;
pub mod http1;
pub mod logging;
pub mod pool;
pub mod sdk;
pub mod sniff;
pub mod transport;
