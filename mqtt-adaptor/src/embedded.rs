//! The embedded rumqttd broker, started when no broker address is configured so that
//! `mqtt-adaptor` alone is a working edge stack.

use std::net::SocketAddr;

use crate::config::ProtocolVersion;

#[derive(Debug, thiserror::Error)]
pub enum EmbeddedError {
    #[error("embedded broker configuration: {0}")]
    Config(String),
    #[error("cannot start the embedded broker thread: {0}")]
    Thread(String),
}

/// rumqttd configuration for one listener speaking `protocol` on `listen`.
pub fn broker_config(
    listen: SocketAddr,
    protocol: ProtocolVersion,
) -> Result<rumqttd::Config, EmbeddedError> {
    let server = serde_json::json!({
        "embedded": {
            "name": "embedded",
            "listen": listen.to_string(),
            "next_connection_delay_ms": 1,
            "connections": {
                "connection_timeout_ms": 60000,
                "max_payload_size": 16 * 1024 * 1024,
                "max_inflight_count": 500,
                "dynamic_filters": true
            }
        }
    });
    let mut cfg = serde_json::json!({
        "id": 0,
        "router": {
            "max_connections": 10010,
            "max_outgoing_packet_count": 200,
            "max_segment_size": 104857600,
            "max_segment_count": 10
        }
    });
    let key = match protocol {
        ProtocolVersion::V311 => "v4",
        ProtocolVersion::V5 => "v5",
    };
    cfg[key] = server;
    serde_json::from_value(cfg).map_err(|e| EmbeddedError::Config(e.to_string()))
}

/// Starts the broker on its own thread (rumqttd runs its own runtime).
pub fn start(listen: SocketAddr, protocol: ProtocolVersion) -> Result<(), EmbeddedError> {
    let cfg = broker_config(listen, protocol)?;
    std::thread::Builder::new()
        .name("rumqttd".into())
        .spawn(move || {
            let mut broker = rumqttd::Broker::new(cfg);
            if let Err(e) = broker.start() {
                tracing::error!(error = %e, "embedded MQTT broker stopped");
            }
        })
        .map_err(|e| EmbeddedError::Thread(e.to_string()))?;
    tracing::info!(listen = %listen, protocol = ?protocol, "embedded MQTT broker (rumqttd) started");
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn config_builds_for_both_versions() {
        let a: SocketAddr = "127.0.0.1:1883".parse().unwrap();
        assert!(
            broker_config(a, ProtocolVersion::V311)
                .unwrap()
                .v4
                .is_some()
        );
        assert!(broker_config(a, ProtocolVersion::V5).unwrap().v5.is_some());
    }
}
