//! mqtt-adaptor: MQTT devices in and out of Knative eventing.
//!
//! - Source: subscribes to MQTT topic filters and posts each message as a CloudEvent to
//!   `K_SINK`, acknowledging to the broker only after the sink accepted it.
//! - Sink: an HTTP CloudEvents receiver that publishes to MQTT and answers 202 only after the
//!   broker acknowledged.
//! - Without a broker address it embeds rumqttd on 127.0.0.1:1883.

pub mod adaptive;
pub mod config;
pub mod embedded;
pub mod h1;
pub mod mapping;
pub mod metrics;
pub mod mqtt;
pub mod publisher;
pub mod server;
pub mod session;
pub mod sink;
pub mod source;
