//! One MQTT connection over rumqttc, hiding whether it speaks 3.1.1 or 5 (the sink
//! direction's publisher; the source has its own client loop in [`crate::session`]), and the
//! settings and TLS setup both share.

use std::sync::Arc;
use std::time::Duration;

use bytes::Bytes;
use rumqttc::v5 as r5;

use crate::config::{Config, ProtocolVersion, TlsFiles};
use crate::mapping::Outbound;

/// Largest packet we let the client library accept; the adaptor applies its own, smaller
/// message limit with a policy instead of dropping the connection.
pub(crate) const MAX_PACKET: u32 = 268_435_455;

#[derive(Debug, thiserror::Error)]
pub enum MqttError {
    #[error("TLS setup: {0}")]
    Tls(String),
    #[error("the broker refused the connection: {0}")]
    Refused(String),
    #[error("MQTT connection: {0}")]
    Connection(String),
    #[error("MQTT request queue: {0}")]
    Request(String),
}

impl MqttError {
    /// Refusals for credentials or authorisation: the operator must act.
    pub fn is_auth(&self) -> bool {
        matches!(self, MqttError::Refused(r) if r.contains("user name or password") || r.contains("not authorized"))
    }
}

/// Connection options independent of the protocol version.
#[derive(Debug, Clone)]
pub struct ConnSettings {
    pub client_id: String,
    pub host: String,
    pub port: u16,
    pub protocol: ProtocolVersion,
    /// Keep the session (and its queued messages) across disconnects.
    pub persistent: bool,
    pub session_expiry: u32,
    pub keep_alive: Duration,
    pub username: Option<String>,
    pub password: Option<String>,
    pub tls: Option<TlsFiles>,
    /// v5 receive maximum / v4 outgoing in-flight limit.
    pub inflight: u16,
    pub manual_acks: bool,
}

impl ConnSettings {
    pub fn from_config(cfg: &Config, client_id: String, persistent: bool) -> Self {
        let broker = cfg.effective_broker();
        ConnSettings {
            client_id,
            host: broker.host,
            port: broker.port,
            protocol: cfg.protocol,
            persistent,
            session_expiry: cfg.session_expiry,
            keep_alive: cfg.keep_alive,
            username: cfg.username.clone(),
            password: cfg.password.clone(),
            tls: cfg.tls.clone(),
            inflight: cfg.inflight,
            manual_acks: persistent,
        }
    }
}

/// What a poll of the event loop produced.
#[derive(Debug)]
pub enum MqttEvent {
    Connected {
        session_present: bool,
    },
    OutgoingPublish(u16),
    /// A publish waits for its packet id to be freed (rumqttc collision).
    AwaitAck(u16),
    /// The broker acknowledged our QoS 1 publish (`Err` carries a v5 failure reason).
    PubAck(u16, Result<(), String>),
    /// QoS 2: PUBREC with a failure reason ends the flow.
    PubRecFailed(u16, String),
    PubComp(u16),
    Other,
}

/// Handle to send requests (acks, subscribes, publishes).
#[derive(Debug, Clone)]
pub enum Client {
    V4(rumqttc::AsyncClient),
    V5(r5::AsyncClient),
}

/// The connection's event loop; must be polled continuously.
pub enum EventLoop {
    V4(Box<rumqttc::EventLoop>),
    V5(Box<r5::EventLoop>),
}

impl std::fmt::Debug for EventLoop {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(match self {
            EventLoop::V4(_) => "EventLoop::V4",
            EventLoop::V5(_) => "EventLoop::V5",
        })
    }
}

pub(crate) fn qos_of(q: u8) -> rumqttc::QoS {
    match q {
        0 => rumqttc::QoS::AtMostOnce,
        1 => rumqttc::QoS::AtLeastOnce,
        _ => rumqttc::QoS::ExactlyOnce,
    }
}

pub(crate) fn qos5_of(q: u8) -> r5::mqttbytes::QoS {
    match q {
        0 => r5::mqttbytes::QoS::AtMostOnce,
        1 => r5::mqttbytes::QoS::AtLeastOnce,
        _ => r5::mqttbytes::QoS::ExactlyOnce,
    }
}

/// Builds the rustls client configuration (ring provider) for the broker connection.
pub fn rustls_config(tls: &TlsFiles) -> Result<Arc<rustls::ClientConfig>, MqttError> {
    let mut roots = rustls::RootCertStore::empty();
    let ca_pem = match &tls.ca_pem {
        Some(p) => p.clone(),
        None => std::fs::read("/etc/ssl/certs/ca-certificates.crt").map_err(|e| {
            MqttError::Tls(format!(
                "no --tls-ca-file and the system CA bundle is unreadable: {e}"
            ))
        })?,
    };
    for cert in rustls_pemfile::certs(&mut ca_pem.as_slice()) {
        let cert = cert.map_err(|e| MqttError::Tls(format!("CA PEM: {e}")))?;
        roots
            .add(cert)
            .map_err(|e| MqttError::Tls(format!("CA certificate: {e}")))?;
    }
    if roots.is_empty() {
        return Err(MqttError::Tls("the CA file holds no certificate".into()));
    }
    let builder = rustls::ClientConfig::builder_with_provider(Arc::new(
        rustls::crypto::ring::default_provider(),
    ))
    .with_safe_default_protocol_versions()
    .map_err(|e| MqttError::Tls(e.to_string()))?
    .with_root_certificates(roots);
    let config = match (&tls.client_cert_pem, &tls.client_key_pem) {
        (Some(cert), Some(key)) => {
            let chain = rustls_pemfile::certs(&mut cert.as_slice())
                .collect::<Result<Vec<_>, _>>()
                .map_err(|e| MqttError::Tls(format!("client certificate PEM: {e}")))?;
            let key = rustls_pemfile::private_key(&mut key.as_slice())
                .map_err(|e| MqttError::Tls(format!("client key PEM: {e}")))?
                .ok_or_else(|| MqttError::Tls("the client key file holds no key".into()))?;
            builder
                .with_client_auth_cert(chain, key)
                .map_err(|e| MqttError::Tls(format!("client certificate: {e}")))?
        }
        _ => builder.with_no_client_auth(),
    };
    Ok(Arc::new(config))
}

/// Creates the client and its event loop (nothing is sent before the first poll).
pub fn connect(s: &ConnSettings) -> Result<(Client, EventLoop), MqttError> {
    let cap = usize::from(s.inflight) * 4 + 64;
    let transport = match &s.tls {
        Some(tls) => Some(rumqttc::Transport::tls_with_config(
            rumqttc::TlsConfiguration::Rustls(rustls_config(tls)?),
        )),
        None => None,
    };
    match s.protocol {
        ProtocolVersion::V311 => {
            let mut o = rumqttc::MqttOptions::new(&s.client_id, &s.host, s.port);
            o.set_keep_alive(s.keep_alive)
                .set_clean_session(!s.persistent)
                .set_manual_acks(s.manual_acks)
                .set_inflight(s.inflight.max(1))
                .set_max_packet_size(MAX_PACKET as usize, MAX_PACKET as usize);
            if let Some(u) = &s.username {
                o.set_credentials(u, s.password.clone().unwrap_or_default());
            }
            if let Some(t) = transport {
                o.set_transport(t);
            }
            let (c, e) = rumqttc::AsyncClient::new(o, cap);
            Ok((Client::V4(c), EventLoop::V4(Box::new(e))))
        }
        ProtocolVersion::V5 => {
            let mut o = r5::MqttOptions::new(&s.client_id, &s.host, s.port);
            o.set_keep_alive(s.keep_alive)
                .set_clean_start(!s.persistent)
                .set_manual_acks(s.manual_acks)
                .set_receive_maximum(Some(s.inflight.max(1)))
                .set_max_packet_size(Some(MAX_PACKET));
            if s.persistent {
                o.set_session_expiry_interval(Some(s.session_expiry));
            }
            if let Some(u) = &s.username {
                o.set_credentials(u, s.password.clone().unwrap_or_default());
            }
            if let Some(t) = transport {
                o.set_transport(t);
            }
            let (c, e) = r5::AsyncClient::new(o, cap);
            Ok((Client::V5(c), EventLoop::V5(Box::new(e))))
        }
    }
}

pub(crate) fn v4_refusal(code: rumqttc::ConnectReturnCode) -> String {
    use rumqttc::ConnectReturnCode as C;
    match code {
        C::BadUserNamePassword => "bad user name or password".into(),
        C::NotAuthorized => "not authorized".into(),
        C::BadClientId => "client id rejected".into(),
        C::RefusedProtocolVersion => {
            "protocol version not supported (try --protocol-version)".into()
        }
        other => format!("{other:?}"),
    }
}

pub(crate) fn v5_refusal(code: r5::mqttbytes::v5::ConnectReturnCode) -> String {
    use r5::mqttbytes::v5::ConnectReturnCode as C;
    match code {
        C::BadUserNamePassword => "bad user name or password".into(),
        C::NotAuthorized => "not authorized".into(),
        C::ClientIdentifierNotValid | C::BadClientId => "client id rejected".into(),
        C::UnsupportedProtocolVersion | C::RefusedProtocolVersion => {
            "protocol version not supported (try --protocol-version 3.1.1)".into()
        }
        other => format!("{other:?}"),
    }
}

impl EventLoop {
    /// Drives the connection; reconnects on the next call after an error.
    pub async fn poll(&mut self) -> Result<MqttEvent, MqttError> {
        match self {
            EventLoop::V4(e) => {
                use rumqttc::{Event, Outgoing, Packet};
                match e.poll().await {
                    Ok(Event::Incoming(Packet::ConnAck(a))) => Ok(MqttEvent::Connected {
                        session_present: a.session_present,
                    }),
                    Ok(Event::Incoming(Packet::PubAck(a))) => Ok(MqttEvent::PubAck(a.pkid, Ok(()))),
                    Ok(Event::Incoming(Packet::PubComp(a))) => Ok(MqttEvent::PubComp(a.pkid)),
                    Ok(Event::Outgoing(Outgoing::Publish(id))) => {
                        Ok(MqttEvent::OutgoingPublish(id))
                    }
                    Ok(Event::Outgoing(Outgoing::AwaitAck(id))) => Ok(MqttEvent::AwaitAck(id)),
                    Ok(_) => Ok(MqttEvent::Other),
                    Err(rumqttc::ConnectionError::ConnectionRefused(c)) => {
                        Err(MqttError::Refused(v4_refusal(c)))
                    }
                    Err(err) => Err(MqttError::Connection(err.to_string())),
                }
            }
            EventLoop::V5(e) => {
                use r5::mqttbytes::v5::{Packet, PubAckReason, PubRecReason};
                use rumqttc::Outgoing;
                match e.poll().await {
                    Ok(r5::Event::Incoming(Packet::ConnAck(a))) => Ok(MqttEvent::Connected {
                        session_present: a.session_present,
                    }),
                    Ok(r5::Event::Incoming(Packet::PubAck(a))) => {
                        let res = match a.reason {
                            PubAckReason::Success | PubAckReason::NoMatchingSubscribers => Ok(()),
                            other => Err(format!("{other:?}")),
                        };
                        Ok(MqttEvent::PubAck(a.pkid, res))
                    }
                    Ok(r5::Event::Incoming(Packet::PubRec(a))) => match a.reason {
                        PubRecReason::Success | PubRecReason::NoMatchingSubscribers => {
                            Ok(MqttEvent::Other)
                        }
                        other => Ok(MqttEvent::PubRecFailed(a.pkid, format!("{other:?}"))),
                    },
                    Ok(r5::Event::Incoming(Packet::PubComp(a))) => Ok(MqttEvent::PubComp(a.pkid)),
                    Ok(r5::Event::Outgoing(Outgoing::Publish(id))) => {
                        Ok(MqttEvent::OutgoingPublish(id))
                    }
                    Ok(r5::Event::Outgoing(Outgoing::AwaitAck(id))) => Ok(MqttEvent::AwaitAck(id)),
                    Ok(_) => Ok(MqttEvent::Other),
                    Err(r5::ConnectionError::ConnectionRefused(c)) => {
                        Err(MqttError::Refused(v5_refusal(c)))
                    }
                    Err(err) => Err(MqttError::Connection(err.to_string())),
                }
            }
        }
    }
}

impl Client {
    /// Queues a publish without waiting; fails when the request queue is full.
    pub fn try_publish(&self, out: &Outbound, qos: u8) -> Result<(), MqttError> {
        match self {
            Client::V4(c) => c
                .try_publish(out.topic.clone(), qos_of(qos), false, out.payload.clone())
                .map_err(|e| MqttError::Request(e.to_string())),
            Client::V5(c) => {
                let props = r5::mqttbytes::v5::PublishProperties {
                    content_type: out.content_type.clone(),
                    user_properties: out.user_properties.clone(),
                    ..Default::default()
                };
                c.try_publish_with_properties(
                    out.topic.clone(),
                    qos5_of(qos),
                    false,
                    Bytes::clone(&out.payload),
                    props,
                )
                .map_err(|e| MqttError::Request(e.to_string()))
            }
        }
    }

    pub async fn disconnect(&self) {
        let _ = match self {
            Client::V4(c) => c.disconnect().await.map_err(|e| e.to_string()),
            Client::V5(c) => c.disconnect().await.map_err(|e| e.to_string()),
        };
    }
}
