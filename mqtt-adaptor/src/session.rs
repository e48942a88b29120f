//! The source's own MQTT client connection (3.1.1 or 5, plain or TLS), on rumqttc's packet
//! codec: everything available is read and decoded at once, and everything queued to send
//! (all acknowledgements that are ready, PUBCOMPs, pings) goes out in one write. rumqttc's
//! event loop writes and flushes each manual acknowledgement on its own: one syscall per
//! message here and one wake-up and read in the broker.

use std::time::Duration;

use bytes::BytesMut;
use rumqttc::v5 as r5;
use rumqttc::v5::mqttbytes::v5 as p5;
use tokio::io::{AsyncRead, AsyncReadExt, AsyncWrite, AsyncWriteExt};

use crate::config::ProtocolVersion;
use crate::mapping::InboundMessage;
use crate::mqtt::{
    ConnSettings, MAX_PACKET, MqttError, qos_of, qos5_of, rustls_config, v4_refusal, v5_refusal,
};

trait Io: AsyncRead + AsyncWrite + Send + Unpin {}
impl<T: AsyncRead + AsyncWrite + Send + Unpin> Io for T {}

/// What was decoded from the broker.
#[derive(Debug)]
pub enum Incoming {
    Message(Box<InboundMessage>),
    /// The broker granted every topic filter of the SUBSCRIBE (SUBACK).
    Subscribed,
    /// The broker refused a subscription (filter and reason).
    SubscribeRefused(String),
    PingResp,
    Other,
}

/// One connected session.
pub struct Session {
    io: Box<dyn Io>,
    v5: bool,
    rbuf: BytesMut,
    wbuf: BytesMut,
    pub session_present: bool,
    /// A PINGREQ went out and no PINGRESP was read since.
    pub ping_outstanding: bool,
}

impl std::fmt::Debug for Session {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Session").field("v5", &self.v5).finish()
    }
}

fn codec(e: impl std::fmt::Debug) -> MqttError {
    MqttError::Connection(format!("MQTT packet: {e:?}"))
}

fn not_connack(p: impl std::fmt::Debug) -> MqttError {
    MqttError::Connection(format!("expected CONNACK, got {p:?}"))
}

const CONNECT_TIMEOUT: Duration = Duration::from_secs(10);

impl Session {
    /// Connects (TCP, TLS when configured), sends CONNECT and waits for the CONNACK.
    pub async fn connect(s: &ConnSettings) -> Result<Session, MqttError> {
        let tls = s.tls.as_ref().map(rustls_config).transpose()?;
        let setup = async {
            let tcp = tokio::net::TcpStream::connect((s.host.as_str(), s.port))
                .await
                .map_err(|e| {
                    MqttError::Connection(format!("connect {}:{}: {e}", s.host, s.port))
                })?;
            let _ = tcp.set_nodelay(true);
            let io: Box<dyn Io> = match tls {
                Some(cfg) => {
                    let name = rustls::pki_types::ServerName::try_from(s.host.clone())
                        .map_err(|e| MqttError::Tls(format!("server name {}: {e}", s.host)))?;
                    let stream = rumqttc::tokio_rustls::TlsConnector::from(cfg)
                        .connect(name, tcp)
                        .await
                        .map_err(|e| MqttError::Tls(e.to_string()))?;
                    Box::new(stream)
                }
                None => Box::new(tcp),
            };
            let mut sess = Session {
                io,
                v5: s.protocol == ProtocolVersion::V5,
                rbuf: BytesMut::with_capacity(64 * 1024),
                wbuf: BytesMut::with_capacity(4 * 1024),
                session_present: false,
                ping_outstanding: false,
            };
            sess.write_connect(s)?;
            sess.flush().await?;
            loop {
                sess.read_more().await?;
                if sess.read_connack()? {
                    return Ok(sess);
                }
            }
        };
        tokio::time::timeout(CONNECT_TIMEOUT, setup)
            .await
            .map_err(|_| MqttError::Connection("no CONNACK within 10 s".into()))?
    }

    fn write_connect(&mut self, s: &ConnSettings) -> Result<(), MqttError> {
        let keep_alive = u16::try_from(s.keep_alive.as_secs()).unwrap_or(u16::MAX);
        if self.v5 {
            let props = p5::ConnectProperties {
                session_expiry_interval: s.persistent.then_some(s.session_expiry),
                receive_maximum: Some(s.inflight.max(1)),
                max_packet_size: Some(MAX_PACKET),
                ..p5::ConnectProperties::new()
            };
            let connect = p5::Connect {
                keep_alive,
                client_id: s.client_id.clone(),
                clean_start: !s.persistent,
                properties: Some(props),
            };
            let login = s
                .username
                .as_ref()
                .map(|u| p5::Login::new(u.clone(), s.password.clone().unwrap_or_default()));
            self.put5(p5::Packet::Connect(connect, None, login))?;
        } else {
            let mut connect = rumqttc::Connect::new(s.client_id.clone());
            connect.keep_alive = keep_alive;
            connect.clean_session = !s.persistent;
            if let Some(u) = &s.username {
                connect.set_login(u.clone(), s.password.clone().unwrap_or_default());
            }
            self.put4(rumqttc::Packet::Connect(connect))?;
        }
        Ok(())
    }

    /// `Ok(true)` once the CONNACK was read (and accepted).
    fn read_connack(&mut self) -> Result<bool, MqttError> {
        // (session present, refusal), or `None` while incomplete.
        let ack = if self.v5 {
            match p5::Packet::read(&mut self.rbuf, Some(MAX_PACKET)) {
                Ok(p5::Packet::ConnAck(a)) => Some((
                    a.session_present,
                    (a.code != p5::ConnectReturnCode::Success).then(|| v5_refusal(a.code)),
                )),
                Ok(other) => return Err(not_connack(other)),
                Err(r5::mqttbytes::Error::InsufficientBytes(_)) => None,
                Err(e) => return Err(codec(e)),
            }
        } else {
            match rumqttc::Packet::read(&mut self.rbuf, MAX_PACKET as usize) {
                Ok(rumqttc::Packet::ConnAck(a)) => Some((
                    a.session_present,
                    (a.code != rumqttc::ConnectReturnCode::Success).then(|| v4_refusal(a.code)),
                )),
                Ok(other) => return Err(not_connack(other)),
                Err(rumqttc::mqttbytes::Error::InsufficientBytes(_)) => None,
                Err(e) => return Err(codec(e)),
            }
        };
        match ack {
            None => Ok(false),
            Some((_, Some(refusal))) => Err(MqttError::Refused(refusal)),
            Some((session_present, None)) => {
                self.session_present = session_present;
                Ok(true)
            }
        }
    }

    /// Queues a SUBSCRIBE of all `topics` (packet id 1).
    pub fn queue_subscribe(&mut self, topics: &[String], qos: u8) -> Result<(), MqttError> {
        if self.v5 {
            let mut sub = p5::Subscribe::new_many(
                topics
                    .iter()
                    .map(|t| p5::Filter::new(t.clone(), qos5_of(qos))),
                None,
            );
            sub.pkid = 1;
            self.put5(p5::Packet::Subscribe(sub))?;
        } else {
            let mut sub = rumqttc::Subscribe::new_many(
                topics
                    .iter()
                    .map(|t| rumqttc::SubscribeFilter::new(t.clone(), qos_of(qos))),
            );
            sub.pkid = 1;
            self.put4(rumqttc::Packet::Subscribe(sub))?;
        }
        Ok(())
    }

    /// Queues the acknowledgement of a delivered message: PUBACK (QoS 1) or PUBREC (QoS 2).
    pub fn queue_ack(&mut self, pkid: u16, qos: u8) -> Result<(), MqttError> {
        match (self.v5, qos) {
            (true, 1) => self.put5(p5::Packet::PubAck(p5::PubAck::new(pkid, None))),
            (true, _) => self.put5(p5::Packet::PubRec(p5::PubRec::new(pkid, None))),
            (false, 1) => self.put4(rumqttc::Packet::PubAck(rumqttc::PubAck::new(pkid))),
            (false, _) => self.put4(rumqttc::Packet::PubRec(rumqttc::PubRec::new(pkid))),
        }
    }

    pub fn queue_ping(&mut self) -> Result<(), MqttError> {
        self.ping_outstanding = true;
        if self.v5 {
            self.put5(p5::Packet::PingReq(p5::PingReq))
        } else {
            self.put4(rumqttc::Packet::PingReq)
        }
    }

    pub fn queue_disconnect(&mut self) -> Result<(), MqttError> {
        if self.v5 {
            self.put5(p5::Packet::Disconnect(p5::Disconnect::new(
                p5::DisconnectReasonCode::NormalDisconnection,
            )))
        } else {
            self.put4(rumqttc::Packet::Disconnect)
        }
    }

    fn put4(&mut self, packet: rumqttc::Packet) -> Result<(), MqttError> {
        put4(&mut self.wbuf, packet)
    }

    fn put5(&mut self, packet: p5::Packet) -> Result<(), MqttError> {
        put5(&mut self.wbuf, packet)
    }

    /// Something is queued to send.
    pub fn has_output(&self) -> bool {
        !self.wbuf.is_empty()
    }

    /// Writes everything queued, in one write when the socket takes it.
    pub async fn flush(&mut self) -> Result<(), MqttError> {
        if self.wbuf.is_empty() {
            return Ok(());
        }
        self.io
            .write_all(&self.wbuf)
            .await
            .map_err(|e| MqttError::Connection(format!("write: {e}")))?;
        self.io
            .flush()
            .await
            .map_err(|e| MqttError::Connection(format!("write: {e}")))?;
        self.wbuf.clear();
        Ok(())
    }

    /// Reads what is available (waits for at least one byte).
    pub async fn read_more(&mut self) -> Result<(), MqttError> {
        if self.rbuf.capacity() - self.rbuf.len() < 4096 {
            self.rbuf.reserve(64 * 1024);
        }
        match self.io.read_buf(&mut self.rbuf).await {
            Ok(0) => Err(MqttError::Connection(
                "the broker closed the connection".into(),
            )),
            Ok(_) => Ok(()),
            Err(e) => Err(MqttError::Connection(format!("read: {e}"))),
        }
    }

    /// Decodes the next complete packet from what was read (`None`: read more). PUBREL is
    /// answered here (PUBCOMP queued).
    pub fn next_packet(&mut self) -> Result<Option<Incoming>, MqttError> {
        let packet = decode(self.v5, &mut self.rbuf, &mut self.wbuf)?;
        if matches!(packet, Some(Incoming::PingResp)) {
            self.ping_outstanding = false;
        }
        Ok(packet)
    }
}

fn put4(wbuf: &mut BytesMut, packet: rumqttc::Packet) -> Result<(), MqttError> {
    packet
        .write(wbuf, MAX_PACKET as usize)
        .map(drop)
        .map_err(codec)
}

fn put5(wbuf: &mut BytesMut, packet: p5::Packet) -> Result<(), MqttError> {
    packet.write(wbuf, None).map(drop).map_err(codec)
}

/// Decodes the next complete packet at the start of `rbuf` (consuming it) as broker input of
/// MQTT 5 (`v5`) or 3.1.1: `Ok(None)` while incomplete. A PUBREL is answered with a PUBCOMP
/// queued in `wbuf`.
pub fn decode(
    v5: bool,
    rbuf: &mut BytesMut,
    wbuf: &mut BytesMut,
) -> Result<Option<Incoming>, MqttError> {
    if v5 {
        let packet = match p5::Packet::read(rbuf, Some(MAX_PACKET)) {
            Ok(p) => p,
            Err(r5::mqttbytes::Error::InsufficientBytes(_)) => return Ok(None),
            Err(e) => return Err(codec(e)),
        };
        Ok(Some(match packet {
            p5::Packet::Publish(p) => {
                let props = p.properties.unwrap_or_default();
                Incoming::Message(Box::new(InboundMessage {
                    topic: String::from_utf8_lossy(&p.topic).into_owned(),
                    payload: p.payload,
                    qos: p.qos as u8,
                    pkid: p.pkid,
                    content_type: props.content_type,
                    user_properties: props.user_properties,
                }))
            }
            p5::Packet::PubRel(r) => {
                put5(wbuf, p5::Packet::PubComp(p5::PubComp::new(r.pkid, None)))?;
                Incoming::Other
            }
            p5::Packet::PingResp(_) => Incoming::PingResp,
            p5::Packet::SubAck(a) => refused_v5(&a.return_codes),
            p5::Packet::Disconnect(d) => {
                return Err(MqttError::Connection(format!(
                    "the broker disconnected: {:?}",
                    d.reason_code
                )));
            }
            _ => Incoming::Other,
        }))
    } else {
        let packet = match rumqttc::Packet::read(rbuf, MAX_PACKET as usize) {
            Ok(p) => p,
            Err(rumqttc::mqttbytes::Error::InsufficientBytes(_)) => return Ok(None),
            Err(e) => return Err(codec(e)),
        };
        Ok(Some(match packet {
            rumqttc::Packet::Publish(p) => Incoming::Message(Box::new(InboundMessage {
                topic: p.topic,
                payload: p.payload,
                qos: p.qos as u8,
                pkid: p.pkid,
                content_type: None,
                user_properties: Vec::new(),
            })),
            rumqttc::Packet::PubRel(r) => {
                put4(
                    wbuf,
                    rumqttc::Packet::PubComp(rumqttc::PubComp::new(r.pkid)),
                )?;
                Incoming::Other
            }
            rumqttc::Packet::PingResp => Incoming::PingResp,
            rumqttc::Packet::SubAck(a) => {
                if a.return_codes
                    .iter()
                    .any(|c| matches!(c, rumqttc::SubscribeReasonCode::Failure))
                {
                    Incoming::SubscribeRefused("the broker refused a topic filter".into())
                } else {
                    Incoming::Subscribed
                }
            }
            _ => Incoming::Other,
        }))
    }
}

fn refused_v5(codes: &[p5::SubscribeReasonCode]) -> Incoming {
    match codes
        .iter()
        .find(|c| !matches!(c, p5::SubscribeReasonCode::Success(_)))
    {
        Some(c) => Incoming::SubscribeRefused(format!("{c:?}")),
        None => Incoming::Subscribed,
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn publish_v4() -> Vec<u8> {
        // PUBLISH QoS 1, topic "a/b", packet id 1, payload "hi".
        vec![0x32, 9, 0, 3, b'a', b'/', b'b', 0, 1, b'h', b'i']
    }

    #[test]
    fn decodes_messages_and_answers_pubrel() {
        let mut input = publish_v4();
        input.extend_from_slice(&[0x62, 2, 0, 7, 0xd0, 0]);
        let mut rbuf = BytesMut::from(&input[..3]);
        let mut wbuf = BytesMut::new();
        assert!(matches!(decode(false, &mut rbuf, &mut wbuf), Ok(None)));
        let mut rbuf = BytesMut::from(&input[..]);
        match decode(false, &mut rbuf, &mut wbuf) {
            Ok(Some(Incoming::Message(m))) => {
                assert_eq!(
                    (m.topic.as_str(), &m.payload[..], m.qos, m.pkid),
                    ("a/b", &b"hi"[..], 1, 1)
                );
            }
            other => panic!("{other:?}"),
        }
        assert!(matches!(
            decode(false, &mut rbuf, &mut wbuf),
            Ok(Some(Incoming::Other))
        ));
        assert_eq!(&wbuf[..], &[0x70, 2, 0, 7], "PUBCOMP for the PUBREL");
        assert!(matches!(
            decode(false, &mut rbuf, &mut wbuf),
            Ok(Some(Incoming::PingResp))
        ));
        assert!(rbuf.is_empty());
        // MQTT 5: the same PUBLISH with an empty property section, then a refused SUBACK.
        let mut v5 = vec![0x32, 10, 0, 3, b'a', b'/', b'b', 0, 1, 0, b'h', b'i'];
        v5.extend_from_slice(&[0x90, 4, 0, 1, 0, 0x87]);
        let mut rbuf = BytesMut::from(&v5[..]);
        assert!(matches!(
            decode(true, &mut rbuf, &mut wbuf),
            Ok(Some(Incoming::Message(_)))
        ));
        assert!(matches!(
            decode(true, &mut rbuf, &mut wbuf),
            Ok(Some(Incoming::SubscribeRefused(_)))
        ));
    }

    /// A SUBACK granting every filter is what makes the source ready, in both protocols; one
    /// refused filter among granted ones is a refusal.
    #[test]
    fn suback_grants_or_refuses() {
        let mut wbuf = BytesMut::new();
        // MQTT 3.1.1: packet id 1, QoS 1 and QoS 0 granted; then QoS 1 and failure (0x80).
        let mut rbuf = BytesMut::from(&[0x90, 4, 0, 1, 1, 0, 0x90, 4, 0, 1, 1, 0x80][..]);
        assert!(matches!(
            decode(false, &mut rbuf, &mut wbuf),
            Ok(Some(Incoming::Subscribed))
        ));
        assert!(matches!(
            decode(false, &mut rbuf, &mut wbuf),
            Ok(Some(Incoming::SubscribeRefused(_)))
        ));
        // MQTT 5: packet id 1, no properties, QoS 1 granted; then QoS 1 and 0x87 (not authorized).
        let mut rbuf = BytesMut::from(&[0x90, 4, 0, 1, 0, 1, 0x90, 5, 0, 1, 0, 1, 0x87][..]);
        assert!(matches!(
            decode(true, &mut rbuf, &mut wbuf),
            Ok(Some(Incoming::Subscribed))
        ));
        assert!(matches!(
            decode(true, &mut rbuf, &mut wbuf),
            Ok(Some(Incoming::SubscribeRefused(_)))
        ));
        assert!(rbuf.is_empty() && wbuf.is_empty());
    }

    #[test]
    fn random_input_never_panics_and_always_progresses() {
        let mut x: u64 = 0x2545_f491_4f6c_dd1d;
        for _ in 0..20_000 {
            x ^= x << 13;
            x ^= x >> 7;
            x ^= x << 17;
            let len = (x % 64) as usize;
            let mut bytes: Vec<u8> = (0..len).map(|i| (x >> ((i * 5) % 57)) as u8).collect();
            if x & 2 == 0 {
                bytes.splice(0..0, publish_v4());
            }
            let mut rbuf = BytesMut::from(&bytes[..]);
            let mut wbuf = BytesMut::new();
            loop {
                let before = rbuf.len();
                match decode(x & 1 == 1, &mut rbuf, &mut wbuf) {
                    Ok(Some(_)) => assert!(rbuf.len() < before),
                    Ok(None) | Err(_) => break,
                }
            }
        }
    }
}
