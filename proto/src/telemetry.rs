//! The telemetry datagram: a fixed 14-byte header followed by a sealed postcard batch.
//!
//! ```text
//! offset  size  field
//!      0     1  version (1)
//!      1     1  flags (bit 0: ack requested; bits 1..7 reserved, zero)
//!      2     4  device id, u32 little-endian
//!      6     8  sequence number, u64 little-endian, below 2^63
//!     14     n  ChaCha20-Poly1305 ciphertext of postcard(Batch)
//!   14+n    16  tag (the 14 header bytes are the associated data)
//! ```
//! The nonce is the sequence number (u64 LE, top bit 0 for device-to-gateway) followed by the
//! device id (u32 LE). A device never reuses a sequence number, so a nonce is never reused.

use chacha20poly1305::{AeadInOut, Nonce, Tag};
use serde::{Deserialize, Serialize};

use crate::error::{DecodeError, EncodeError};
use crate::key::Cipher;
use crate::{HEADER_LEN, MAX_DATAGRAM, MAX_READINGS, MIN_DATAGRAM, SEQ_LIMIT, TAG_LEN, VERSION};

/// Identifies a device; assigned by the gateway when the device is provisioned.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, PartialOrd, Ord, Serialize, Deserialize)]
pub struct DeviceId(pub u32);

/// Identifies a sensor within a device.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, PartialOrd, Ord, Serialize, Deserialize)]
pub struct SensorId(pub u16);

/// Milliseconds since the Unix epoch, as measured by the device.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, PartialOrd, Ord, Serialize, Deserialize)]
pub struct Millis(pub u64);

/// A device's datagram sequence number: strictly increasing per device, below [`SEQ_LIMIT`].
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, PartialOrd, Ord, Serialize, Deserialize)]
pub struct Seq(pub u64);

/// Header flags.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub struct Flags(pub u8);

impl Flags {
    /// The device asks for an ack once the readings are committed.
    pub const ACK_REQUESTED: u8 = 0b0000_0001;
    /// Set only on ack datagrams sent by the gateway.
    pub const ACK: u8 = 0b1000_0000;

    /// Whether the device asked for an ack.
    pub fn ack_requested(self) -> bool {
        self.0 & Self::ACK_REQUESTED != 0
    }
}

/// One measurement.
#[derive(Debug, Clone, Copy, PartialEq, Serialize, Deserialize)]
pub struct Reading {
    /// Which sensor of the device.
    pub sensor: SensorId,
    /// When it was measured, by the device's clock.
    pub ts: Millis,
    /// The measured value, in the sensor's unit.
    pub value: f64,
}

/// The payload of a telemetry datagram: up to [`MAX_READINGS`] readings.
#[derive(Debug, Clone, PartialEq, Default, Serialize, Deserialize)]
pub struct Batch {
    /// The readings, in the order the device took them; their position is part of their identity.
    pub readings: Vec<Reading>,
}

/// The fixed header that starts every datagram.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Header {
    /// Header flags.
    pub flags: Flags,
    /// Sending device (telemetry) or addressed device (ack).
    pub device: DeviceId,
    /// Sequence number of the telemetry datagram (or of the datagram an ack answers).
    pub seq: Seq,
}

impl Header {
    /// The 14 header bytes.
    pub fn to_bytes(&self) -> [u8; HEADER_LEN] {
        let mut out = [0u8; HEADER_LEN];
        out[0] = VERSION;
        out[1] = self.flags.0;
        out[2..6].copy_from_slice(&self.device.0.to_le_bytes());
        out[6..14].copy_from_slice(&self.seq.0.to_le_bytes());
        out
    }

    /// Parses the header of a telemetry datagram after checking its length, without
    /// authenticating anything. Rejects ack datagrams and reserved flags.
    ///
    /// # Errors
    /// [`DecodeError::TooShort`], [`DecodeError::TooLong`], [`DecodeError::BadVersion`],
    /// [`DecodeError::BadHeader`].
    pub fn peek(datagram: &[u8]) -> Result<Header, DecodeError> {
        if datagram.len() > MAX_DATAGRAM {
            return Err(DecodeError::TooLong { max: MAX_DATAGRAM });
        }
        if datagram.len() < MIN_DATAGRAM {
            // A too-short datagram is reported as such even when its version byte is odd:
            // it cannot be anything we know.
            return Err(DecodeError::TooShort {
                len: datagram.len(),
                min: MIN_DATAGRAM,
            });
        }
        let header = parse_header(datagram)?;
        if header.flags.0 & !Flags::ACK_REQUESTED != 0 {
            return Err(DecodeError::BadHeader {
                reason: "reserved flag bits set",
            });
        }
        Ok(header)
    }
}

/// Parses version, flags, device and sequence from at least [`HEADER_LEN`] bytes.
pub(crate) fn parse_header(bytes: &[u8]) -> Result<Header, DecodeError> {
    let Some(fixed) = bytes.get(..HEADER_LEN) else {
        return Err(DecodeError::TooShort {
            len: bytes.len(),
            min: HEADER_LEN,
        });
    };
    if fixed[0] != VERSION {
        return Err(DecodeError::BadVersion { version: fixed[0] });
    }
    let mut device = [0u8; 4];
    device.copy_from_slice(&fixed[2..6]);
    let mut seq = [0u8; 8];
    seq.copy_from_slice(&fixed[6..14]);
    let seq = u64::from_le_bytes(seq);
    if seq >= SEQ_LIMIT {
        return Err(DecodeError::BadHeader {
            reason: "sequence number out of range",
        });
    }
    Ok(Header {
        flags: Flags(fixed[1]),
        device: DeviceId(u32::from_le_bytes(device)),
        seq: Seq(seq),
    })
}

/// The nonce for a datagram of `device` with `seq`; `to_device` sets the direction bit.
pub(crate) fn nonce(device: DeviceId, seq: Seq, to_device: bool) -> Nonce {
    let mut n = [0u8; 12];
    let dir = if to_device { SEQ_LIMIT } else { 0 };
    n[..8].copy_from_slice(&(seq.0 | dir).to_le_bytes());
    n[8..].copy_from_slice(&device.0.to_le_bytes());
    Nonce::from(n)
}

/// A sealed telemetry datagram, ready to send.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Sealed(pub Vec<u8>);

/// Seals arbitrary payload bytes as a telemetry datagram. Real devices use [`Batch::seal`];
/// this exists for tests and fuzzers that need authentic datagrams with invalid payloads.
pub fn seal_payload(header: &Header, payload: &[u8], cipher: &Cipher) -> Vec<u8> {
    let head = header.to_bytes();
    let mut out = Vec::with_capacity(HEADER_LEN + payload.len() + TAG_LEN);
    out.extend_from_slice(&head);
    out.extend_from_slice(payload);
    // ChaCha20-Poly1305 accepts any length a datagram can have.
    if let Ok(tag) = cipher.0.encrypt_inout_detached(
        &nonce(header.device, header.seq, false),
        &head,
        (&mut out[HEADER_LEN..]).into(),
    ) {
        out.extend_from_slice(tag.as_slice());
    }
    out
}

impl Batch {
    /// Seals the batch into a datagram for `header`, with the device's key.
    ///
    /// # Errors
    /// [`EncodeError::TooManyReadings`] past [`MAX_READINGS`], [`EncodeError::SeqOutOfRange`]
    /// for a sequence number not below [`SEQ_LIMIT`].
    pub fn seal(&self, header: &Header, cipher: &Cipher) -> Result<Sealed, EncodeError> {
        if self.readings.len() > MAX_READINGS {
            return Err(EncodeError::TooManyReadings {
                count: self.readings.len(),
                max: MAX_READINGS,
            });
        }
        if header.seq.0 >= SEQ_LIMIT {
            return Err(EncodeError::SeqOutOfRange { seq: header.seq.0 });
        }
        let head = header.to_bytes();
        let mut out = Vec::with_capacity(MAX_DATAGRAM);
        out.extend_from_slice(&head);
        let out = postcard::to_extend(self, out).map_err(|_| EncodeError::Payload)?;
        let mut out = out;
        let tag = cipher
            .0
            .encrypt_inout_detached(
                &nonce(header.device, header.seq, false),
                &head,
                (&mut out[HEADER_LEN..]).into(),
            )
            .map_err(|_| EncodeError::Payload)?;
        out.extend_from_slice(tag.as_slice());
        debug_assert!(out.len() <= MAX_DATAGRAM);
        Ok(Sealed(out))
    }

    /// Authenticates and decrypts a datagram whose header was parsed by [`Header::peek`],
    /// in place, and decodes its batch. `datagram` is left holding plaintext on success,
    /// unchanged on [`DecodeError::BadTag`] (the tag is checked before anything is decrypted,
    /// so a receiver may try a second key), and unspecified bytes on other failures.
    ///
    /// # Errors
    /// [`DecodeError::BadTag`] when the key does not match or any bit was changed,
    /// [`DecodeError::BadPayload`] or [`DecodeError::TooManyReadings`] for an authentic but
    /// invalid payload, and the errors of [`Header::peek`].
    pub fn open(datagram: &mut [u8], cipher: &Cipher) -> Result<(Header, Batch), DecodeError> {
        let header = Header::peek(datagram)?;
        let len = datagram.len();
        let (head, rest) = datagram.split_at_mut(HEADER_LEN);
        let (body, tag) = rest.split_at_mut(len - HEADER_LEN - TAG_LEN);
        let tag = Tag::try_from(&*tag).map_err(|_| DecodeError::BadTag)?;
        cipher
            .0
            .decrypt_inout_detached(
                &nonce(header.device, header.seq, false),
                head,
                body.into(),
                &tag,
            )
            .map_err(|_| DecodeError::BadTag)?;
        let (batch, rest): (Batch, &[u8]) =
            postcard::take_from_bytes(body).map_err(|_| DecodeError::BadPayload)?;
        if !rest.is_empty() {
            return Err(DecodeError::BadPayload);
        }
        if batch.readings.len() > MAX_READINGS {
            return Err(DecodeError::TooManyReadings {
                count: batch.readings.len(),
                max: MAX_READINGS,
            });
        }
        Ok((header, batch))
    }
}
