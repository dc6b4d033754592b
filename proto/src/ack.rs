//! The ack datagram: header with the ACK flag, no payload, a tag made with the device's key.
//!
//! ```text
//! offset  size  field
//!      0     1  version (1)
//!      1     1  flags (0x80: ack)
//!      2     4  device id, u32 LE
//!      6     8  acknowledged sequence number, u64 LE
//!     14    16  tag over an empty plaintext, header as associated data,
//!               nonce with the direction bit (bit 63 of the sequence) set
//! ```
//! An ack is 30 bytes, shorter than any telemetry datagram (at least 31), so answering never
//! amplifies. The ack for a given sequence number is always the same bytes, so sending it again
//! for a retransmitted datagram reveals nothing new.

use chacha20poly1305::{AeadInOut, Tag};

use crate::error::DecodeError;
use crate::key::Cipher;
use crate::telemetry::{DeviceId, Flags, Header, Seq, nonce, parse_header};
use crate::{ACK_LEN, HEADER_LEN};

/// An acknowledgement: the readings of datagram `seq` of `device` are committed.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Ack {
    /// The device the ack is for.
    pub device: DeviceId,
    /// The acknowledged sequence number.
    pub seq: Seq,
}

impl Ack {
    /// The 30 bytes of the ack, sealed with the device's key.
    pub fn seal(&self, cipher: &Cipher) -> [u8; ACK_LEN] {
        let head = Header {
            flags: Flags(Flags::ACK),
            device: self.device,
            seq: self.seq,
        }
        .to_bytes();
        let mut out = [0u8; ACK_LEN];
        out[..HEADER_LEN].copy_from_slice(&head);
        let empty: &mut [u8] = &mut [];
        // Encryption of an empty message cannot fail (no length limit is reached).
        if let Ok(tag) = cipher.0.encrypt_inout_detached(
            &nonce(self.device, self.seq, true),
            &head,
            empty.into(),
        ) {
            out[HEADER_LEN..].copy_from_slice(tag.as_slice());
        }
        out
    }

    /// The device an ack datagram claims to be for, read without checking its tag: for a
    /// receiver that serves several devices on one socket and must pick the key to check it
    /// with. `None` when the datagram is not shaped like an ack.
    pub fn peek_device(datagram: &[u8]) -> Option<DeviceId> {
        if datagram.len() != ACK_LEN {
            return None;
        }
        let header = parse_header(datagram).ok()?;
        (header.flags.0 == Flags::ACK).then_some(header.device)
    }

    /// Checks and parses an ack received by a device.
    ///
    /// # Errors
    /// [`DecodeError::TooShort`]/[`DecodeError::TooLong`] for a wrong length,
    /// [`DecodeError::BadVersion`], [`DecodeError::BadHeader`] when it is not an ack,
    /// [`DecodeError::BadTag`] when it was not made with this key.
    pub fn open(datagram: &[u8], cipher: &Cipher) -> Result<Ack, DecodeError> {
        if datagram.len() < ACK_LEN {
            return Err(DecodeError::TooShort {
                len: datagram.len(),
                min: ACK_LEN,
            });
        }
        if datagram.len() > ACK_LEN {
            return Err(DecodeError::TooLong { max: ACK_LEN });
        }
        let header = parse_header(datagram)?;
        if header.flags.0 != Flags::ACK {
            return Err(DecodeError::BadHeader {
                reason: "not an ack",
            });
        }
        let tag = Tag::try_from(&datagram[HEADER_LEN..]).map_err(|_| DecodeError::BadTag)?;
        let empty: &mut [u8] = &mut [];
        cipher
            .0
            .decrypt_inout_detached(
                &nonce(header.device, header.seq, true),
                &datagram[..HEADER_LEN],
                empty.into(),
                &tag,
            )
            .map_err(|_| DecodeError::BadTag)?;
        Ok(Ack {
            device: header.device,
            seq: header.seq,
        })
    }
}
