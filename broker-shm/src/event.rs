//! CloudEvents in the broker: the workspace's model ([`spright_core::cloudevent`]: validation,
//! the JSON event format, the HTTP binding), Knative's broker extensions, and the broker's own
//! log record format ([`EventRecord`]).

use bytes::Bytes;

pub use spright_core::cloudevent::{CloudEvent, EventError, percent_decode, percent_encode};

/// Knative's broker TTL extension.
pub const TTL_EXT: &str = "knativebrokerttl";
/// Knative's arrival time extension.
pub const ARRIVAL_EXT: &str = "knativearrivaltime";

const RECORD_V1: u8 = 1;

/// The broker log's storage form of an event. Compact and lossless: `0x01`, attribute count
/// (u16), then per attribute name length (u16), name, value length (u32), value, then a data
/// flag byte and, when set, data length (u32) and data. All integers little-endian.
pub trait EventRecord: Sized {
    /// Encodes the event as a log record.
    fn to_record(&self) -> Vec<u8>;
    /// Inverse of [`EventRecord::to_record`]; also reads JSON-format records (validated).
    fn from_record(rec: &[u8]) -> Result<Self, EventError>;
}

impl EventRecord for CloudEvent {
    fn to_record(&self) -> Vec<u8> {
        let data_len = self.data.as_ref().map_or(0, |d| d.len());
        let attrs_len: usize = self.attrs.iter().map(|(k, v)| 6 + k.len() + v.len()).sum();
        let mut out = Vec::with_capacity(8 + attrs_len + data_len);
        out.push(RECORD_V1);
        let n = u16::try_from(self.attrs.len()).unwrap_or(u16::MAX);
        out.extend_from_slice(&n.to_le_bytes());
        for (k, v) in self.attrs.iter().take(usize::from(n)) {
            let kl = u16::try_from(k.len()).unwrap_or(u16::MAX);
            out.extend_from_slice(&kl.to_le_bytes());
            out.extend_from_slice(&k.as_bytes()[..usize::from(kl)]);
            let vl = u32::try_from(v.len()).unwrap_or(u32::MAX);
            out.extend_from_slice(&vl.to_le_bytes());
            out.extend_from_slice(&v.as_bytes()[..vl as usize]);
        }
        match &self.data {
            Some(d) => {
                out.push(1);
                out.extend_from_slice(&u32::try_from(d.len()).unwrap_or(u32::MAX).to_le_bytes());
                out.extend_from_slice(d);
            }
            None => out.push(0),
        }
        out
    }

    fn from_record(rec: &[u8]) -> Result<CloudEvent, EventError> {
        if rec.first() != Some(&RECORD_V1) {
            return CloudEvent::from_structured(rec);
        }
        let bad = || EventError::Json("corrupt log record".into());
        let mut r = Reader { buf: rec, pos: 1 };
        let n = r.u16().ok_or_else(bad)?;
        let mut ev = CloudEvent::default();
        for _ in 0..n {
            let kl = usize::from(r.u16().ok_or_else(bad)?);
            let k = r.take(kl).ok_or_else(bad)?;
            let vl = r.u32().ok_or_else(bad)? as usize;
            let v = r.take(vl).ok_or_else(bad)?;
            ev.attrs.insert(
                String::from_utf8_lossy(k).into_owned(),
                String::from_utf8_lossy(v).into_owned(),
            );
        }
        match r.take(1).ok_or_else(bad)? {
            [1] => {
                let dl = r.u32().ok_or_else(bad)? as usize;
                ev.data = Some(Bytes::copy_from_slice(r.take(dl).ok_or_else(bad)?));
            }
            _ => ev.data = None,
        }
        Ok(ev)
    }
}

struct Reader<'a> {
    buf: &'a [u8],
    pos: usize,
}

impl<'a> Reader<'a> {
    fn take(&mut self, n: usize) -> Option<&'a [u8]> {
        let s = self.buf.get(self.pos..self.pos.checked_add(n)?)?;
        self.pos += n;
        Some(s)
    }
    fn u16(&mut self) -> Option<u16> {
        self.take(2).map(|b| u16::from_le_bytes([b[0], b[1]]))
    }
    fn u32(&mut self) -> Option<u32> {
        self.take(4)
            .map(|b| u32::from_le_bytes([b[0], b[1], b[2], b[3]]))
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use http::{HeaderMap, HeaderValue};

    #[test]
    fn binary_event_record_roundtrip() {
        let mut h = HeaderMap::new();
        for (k, v) in [
            ("ce-specversion", "1.0"),
            ("ce-id", "1"),
            ("ce-source", "/s"),
            ("ce-type", "t"),
            ("ce-subject", "a%20b"),
            ("content-type", "text/plain"),
        ] {
            h.insert(k, HeaderValue::from_static(v));
        }
        let ev = CloudEvent::from_http(&h, Bytes::from_static(b"hi")).unwrap();
        let back = CloudEvent::from_record(&ev.to_record()).unwrap();
        assert_eq!(back, ev);
        // JSON-format records are read too.
        assert_eq!(CloudEvent::from_record(&ev.to_structured()).unwrap(), ev);
    }

    #[test]
    fn record_roundtrip_and_garbage() {
        let mut ev = CloudEvent::new("1", "/s", "t");
        ev.set("ext", "é");
        ev.data = Some(Bytes::from_static(&[0, 1, 2, 255]));
        let rec = ev.to_record();
        assert_eq!(CloudEvent::from_record(&rec).unwrap(), ev);
        for cut in 0..rec.len() {
            let _ = CloudEvent::from_record(&rec[..cut]);
        }
        let mut x: u32 = 7;
        for _ in 0..2000 {
            let mut r = vec![1u8];
            for _ in 0..(x % 64) {
                x = x.wrapping_mul(1_103_515_245).wrapping_add(12345);
                r.push((x >> 16) as u8);
            }
            let _ = CloudEvent::from_record(&r);
        }
    }

    #[test]
    fn cesql_filters_see_the_attributes() {
        let ev = CloudEvent::new("1", "/s", "com.example");
        let expr = cesql::Expression::parse("type LIKE 'com.%' AND id = '1'").unwrap();
        assert!(expr.matches(&ev));
    }
}
