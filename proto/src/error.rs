//! Errors of decoding and encoding datagrams. Each variant is a reason a receiver counts.

use thiserror::Error;

/// Why a received datagram was rejected. Every variant maps to one drop counter at the gateway.
#[derive(Debug, Error, Clone, PartialEq, Eq)]
pub enum DecodeError {
    /// Shorter than the smallest valid datagram.
    #[error("datagram too short: {len} bytes, at least {min}")]
    TooShort {
        /// Received length.
        len: usize,
        /// Smallest valid length.
        min: usize,
    },
    /// Longer than [`crate::MAX_DATAGRAM`].
    #[error("datagram too long: more than {max} bytes")]
    TooLong {
        /// Largest valid length.
        max: usize,
    },
    /// The version byte is not one this crate speaks.
    #[error("unsupported protocol version {version}")]
    BadVersion {
        /// Version byte found.
        version: u8,
    },
    /// The header is well sized but invalid: reserved flag bits set or sequence number out of range.
    #[error("malformed header: {reason}")]
    BadHeader {
        /// What is wrong.
        reason: &'static str,
    },
    /// The authentication tag does not match: wrong key, corrupted or forged datagram.
    #[error("authentication failed")]
    BadTag,
    /// The payload authenticated but does not decode as a batch (a faulty device).
    #[error("malformed payload")]
    BadPayload,
    /// The batch carries more than [`crate::MAX_READINGS`] readings.
    #[error("too many readings: {count}, at most {max}")]
    TooManyReadings {
        /// Readings in the batch.
        count: usize,
        /// Limit.
        max: usize,
    },
}

/// Why a datagram could not be built.
#[derive(Debug, Error, Clone, PartialEq, Eq)]
pub enum EncodeError {
    /// The batch has more than [`crate::MAX_READINGS`] readings.
    #[error("too many readings: {count}, at most {max}")]
    TooManyReadings {
        /// Readings in the batch.
        count: usize,
        /// Limit.
        max: usize,
    },
    /// The sequence number is not below [`crate::SEQ_LIMIT`].
    #[error("sequence number {seq} out of range")]
    SeqOutOfRange {
        /// The offending sequence number.
        seq: u64,
    },
    /// Serialization failed (cannot happen for in-limit batches; kept rather than panicking).
    #[error("payload encoding failed")]
    Payload,
}
