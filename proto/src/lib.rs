//! Wire protocol v1 of the sensor gateway: the telemetry datagram, the ack datagram, their
//! sealing with a per-device key, and the protocol limits.
//!
//! This crate owns bytes and nothing else: no sockets, no clocks, no runtime, no logging.
//! Every decode path returns a typed [`DecodeError`] and never panics, whatever the input.
//! `PROTOCOL.md` at the top of the repository describes every byte; the golden vectors in it
//! are checked by this crate's tests, so the document and the code cannot drift apart.
//!
//! # Layout
//! - [`telemetry`] — the header, readings and batches carried by a datagram, sealing and opening.
//! - [`control`] — the TCP control protocol: frames, messages, session proof.
//! - [`ack`] — the ack datagram the gateway sends once a datagram's readings are committed.
//! - [`key`] — device keys and their text form.
//! - [`error`] — decode and encode errors.
//!
//! # Versioning
//! The first byte of every datagram is [`VERSION`]. postcard is positional: adding, removing or
//! reordering a field of a payload type is a new protocol version, never a silent change.

#![warn(missing_docs, unreachable_pub)]

pub mod ack;
pub mod control;
pub mod error;
pub mod key;
pub mod telemetry;

pub use ack::Ack;
pub use error::{DecodeError, EncodeError};
pub use key::{Cipher, DeviceKey, KeyParseError};
pub use telemetry::{
    Batch, DeviceId, Flags, Header, Millis, Reading, Sealed, SensorId, Seq, seal_payload,
};

/// The protocol version this crate speaks, first byte of every datagram.
pub const VERSION: u8 = 1;
/// Largest datagram either side sends or accepts, in bytes. Chosen so that a datagram fits
/// the IPv6 minimum MTU (1,280) minus IPv6 and UDP headers, and is never fragmented.
pub const MAX_DATAGRAM: usize = 1232;
/// Length of the fixed header that starts every datagram, in bytes.
pub const HEADER_LEN: usize = 14;
/// Length of the ChaCha20-Poly1305 authentication tag that ends every datagram, in bytes.
pub const TAG_LEN: usize = 16;
/// Most readings one datagram carries. Any batch of at most this many readings encodes
/// within [`MAX_DATAGRAM`], whatever the values (proven by a test).
pub const MAX_READINGS: usize = 50;
/// Shortest possible telemetry datagram: header, an empty batch (one byte), tag.
pub const MIN_DATAGRAM: usize = HEADER_LEN + 1 + TAG_LEN;
/// Length of an ack datagram: header and tag, no payload. Always shorter than
/// [`MIN_DATAGRAM`], so an ack is never larger than the datagram it answers.
pub const ACK_LEN: usize = HEADER_LEN + TAG_LEN;
/// Sequence numbers are below this bound (63 bits); the top bit of the nonce says the direction.
pub const SEQ_LIMIT: u64 = 1 << 63;

const _: () = assert!(ACK_LEN < MIN_DATAGRAM);
