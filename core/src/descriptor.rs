//! The 16-byte descriptor: all that moves between functions. The payload stays in the pool.
//!
//! Layout, little endian (the sk_msg program reads only the first four bytes):
//!
//! | bytes  | field        | meaning                                         |
//! |--------|--------------|-------------------------------------------------|
//! | 0..4   | `dst`        | destination function id                         |
//! | 4..8   | `slot`       | slot index in the pool (an offset, never a pointer) |
//! | 8..12  | `len`        | payload length in bytes                         |
//! | 12..16 | `generation` | the slot's generation when the descriptor was made |

use thiserror::Error;

/// Size of a descriptor on the wire.
pub const DESCRIPTOR_LEN: usize = 16;

/// Function id of the gateway (the pool owner): chain results and errors go back to it.
pub const GATEWAY_ID: u32 = 0;

/// A descriptor that points into the shared pool.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub struct Descriptor {
    /// Destination function id.
    pub dst: u32,
    /// Slot index in the pool.
    pub slot: u32,
    /// Payload length in bytes.
    pub len: u32,
    /// Generation of the slot this descriptor refers to.
    pub generation: u32,
}

/// A byte string that is not a descriptor.
#[derive(Debug, Error, PartialEq, Eq)]
#[error("a descriptor is {DESCRIPTOR_LEN} bytes, got {0}")]
pub struct BadDescriptor(pub usize);

impl Descriptor {
    /// Encodes to the wire layout.
    pub fn encode(&self) -> [u8; DESCRIPTOR_LEN] {
        let mut out = [0u8; DESCRIPTOR_LEN];
        out[0..4].copy_from_slice(&self.dst.to_le_bytes());
        out[4..8].copy_from_slice(&self.slot.to_le_bytes());
        out[8..12].copy_from_slice(&self.len.to_le_bytes());
        out[12..16].copy_from_slice(&self.generation.to_le_bytes());
        out
    }

    /// Decodes from the wire layout. Only the length is checked here; the pool checks that
    /// slot, length and generation are valid before any access.
    pub fn decode(bytes: &[u8]) -> Result<Self, BadDescriptor> {
        let b: &[u8; DESCRIPTOR_LEN] = bytes.try_into().map_err(|_| BadDescriptor(bytes.len()))?;
        let word = |i: usize| u32::from_le_bytes([b[i], b[i + 1], b[i + 2], b[i + 3]]);
        Ok(Self {
            dst: word(0),
            slot: word(4),
            len: word(8),
            generation: word(12),
        })
    }

    /// The same descriptor addressed to another function.
    #[must_use]
    pub fn to(self, dst: u32) -> Self {
        Self { dst, ..self }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn round_trip() {
        let d = Descriptor {
            dst: 7,
            slot: 1234,
            len: 65_536,
            generation: u32::MAX,
        };
        let wire = d.encode();
        assert_eq!(&wire[0..4], &7u32.to_le_bytes());
        assert_eq!(Descriptor::decode(&wire), Ok(d));
    }

    #[test]
    fn wrong_lengths_are_errors() {
        for n in [0, 1, 15, 17, 64] {
            assert_eq!(Descriptor::decode(&vec![0; n]), Err(BadDescriptor(n)));
        }
    }
}
