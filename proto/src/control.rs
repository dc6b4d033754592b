//! The TCP control protocol (v1): frames, messages, and the session's challenge-response.
//!
//! ```text
//! frame := length (u32 big-endian, counts the bytes after it) | version (1) | postcard(message)
//! ```
//! A device sends [`DeviceMsg`] frames and the gateway [`GatewayMsg`] frames. A frame longer
//! than the receiver's maximum (at most [`MAX_FRAME`]) is an error before any byte of its body
//! is buffered, so a hostile length prefix costs nothing.
//!
//! Session start: device `Hello { device, client_nonce }`, gateway `Challenge { server_nonce }`,
//! device `Auth { proof }`, gateway `Welcome` or `Denied`. The proof is
//! HMAC-SHA256(device key, [`AUTH_CONTEXT`] | device id | client nonce | server nonce | binding),
//! where the binding is keying material exported from the TLS session (RFC 5705; empty on plain
//! TCP). The key never crosses the wire; a fresh server nonce per session and the TLS binding
//! make a captured exchange useless on any other session.

use hmac::{Hmac, KeyInit, Mac};
use serde::{Deserialize, Serialize};
use sha2::Sha256;

use crate::error::DecodeError;
use crate::key::DeviceKey;
use crate::telemetry::DeviceId;

/// Version byte that starts every control frame body.
pub const CONTROL_VERSION: u8 = 1;
/// Largest frame body either side accepts, in bytes (a file chunk plus headroom).
pub const MAX_FRAME: usize = 64 * 1024;
/// Largest file chunk the gateway sends, in bytes.
pub const MAX_CHUNK: usize = 32 * 1024;
/// Length of the length prefix.
pub const LEN_PREFIX: usize = 4;
/// Domain separation of the session proof.
pub const AUTH_CONTEXT: &[u8] = b"sensor-gateway control auth v1";
/// Label of the TLS exporter that binds the proof to the TLS session.
pub const TLS_EXPORTER_LABEL: &[u8] = b"EXPORTER-sensor-gateway-control-v1";
/// Domain separation of the key-rotation proof.
pub const ROTATE_CONTEXT: &[u8] = b"sensor-gateway key rotation v1";

/// Identifies a command; unique per gateway, so a device applies each at most once.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, PartialOrd, Ord, Serialize, Deserialize)]
pub struct CommandId(pub u64);

/// Identifies a file transfer.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Serialize, Deserialize)]
pub struct TransferId(pub u64);

/// What an operator asks a device to do. Variants are only ever appended.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub enum Command {
    /// Answer at once.
    Ping,
    /// Change the telemetry sending interval.
    SetInterval {
        /// Milliseconds between datagrams.
        millis: u32,
    },
    /// Restart.
    Reboot,
    /// Set configuration keys.
    SetConfig {
        /// Key/value pairs.
        pairs: Vec<(String, String)>,
    },
    /// An opaque payload for device-specific commands.
    Custom {
        /// The payload.
        payload: Vec<u8>,
    },
}

/// How a command ended on the device.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
pub enum CommandOutcome {
    /// Applied.
    Done,
    /// Refused or failed.
    Failed,
    /// Already applied earlier (a resend); not applied again.
    Duplicate,
}

/// A device's configuration as the gateway wants it or the device reports it.
#[derive(Debug, Clone, PartialEq, Eq, Default, Serialize, Deserialize)]
pub struct DeviceConfig {
    /// Milliseconds between telemetry datagrams.
    pub interval_ms: u32,
    /// Readings per datagram.
    pub batch: u16,
    /// Sensors that are on.
    pub sensors: Vec<u16>,
}

/// Why the gateway refused or ended a session.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
pub enum DenyReason {
    /// Unknown device or wrong proof (deliberately not distinguished).
    AuthFailed,
    /// Protocol version not spoken.
    Version,
    /// Too many sessions.
    Busy,
    /// A newer session of the same device took over.
    Replaced,
}

/// Frames sent by a device. Variants are only ever appended.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub enum DeviceMsg {
    /// Opens a session.
    Hello {
        /// The device.
        device: DeviceId,
        /// Fresh random bytes of the device.
        client_nonce: [u8; 16],
    },
    /// Answers the challenge.
    Auth {
        /// See [`auth_proof`].
        proof: [u8; 32],
    },
    /// I am alive.
    Heartbeat,
    /// The end of a command.
    CommandResult {
        /// Which command.
        id: CommandId,
        /// How it ended.
        outcome: CommandOutcome,
        /// Free text for the operator.
        detail: String,
    },
    /// The configuration now applied.
    ConfigReport {
        /// The applied configuration.
        config: DeviceConfig,
    },
    /// File bytes received and stored up to `offset`.
    FileAck {
        /// The transfer.
        transfer: TransferId,
        /// Bytes stored contiguously from the start.
        offset: u64,
    },
    /// The whole file is stored and its SHA-256 checked.
    FileDone {
        /// The transfer.
        transfer: TransferId,
        /// SHA-256 the device computed.
        sha256: [u8; 32],
        /// Whether it matched the offer.
        ok: bool,
    },
    /// The key of a `RotateKey` is stored and in use from now on.
    KeyRotated {
        /// The version from `RotateKey`.
        version: u32,
        /// See [`rotation_proof`]: made with the new key.
        proof: [u8; 32],
    },
}

/// Frames sent by the gateway. Variants are only ever appended.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub enum GatewayMsg {
    /// Answers `Hello`.
    Challenge {
        /// Fresh random bytes of the gateway.
        server_nonce: [u8; 32],
    },
    /// Authenticated; the session is live.
    Welcome {
        /// Expected heartbeat period.
        heartbeat_ms: u32,
    },
    /// Refused or ended.
    Denied {
        /// Why.
        reason: DenyReason,
    },
    /// Answers a heartbeat.
    HeartbeatAck,
    /// Do this.
    Command {
        /// Its id (the same on a resend).
        id: CommandId,
        /// What to do.
        command: Command,
    },
    /// The desired configuration.
    Config {
        /// Desired configuration.
        config: DeviceConfig,
    },
    /// A file is coming; resume from the offset the device acknowledges.
    FileOffer {
        /// The transfer.
        transfer: TransferId,
        /// Sanitised file name.
        name: String,
        /// Total size in bytes.
        size: u64,
        /// Expected SHA-256.
        sha256: [u8; 32],
    },
    /// File bytes.
    FileChunk {
        /// The transfer.
        transfer: TransferId,
        /// Offset of the first byte.
        offset: u64,
        /// At most [`MAX_CHUNK`] bytes.
        data: Vec<u8>,
    },
    /// Use this key from now on (only ever sent inside TLS). The device stores it durably,
    /// seals everything with it and answers `KeyRotated`; a resend of the same version is
    /// answered again.
    RotateKey {
        /// Version of the new key (the device's first key is version 1).
        version: u32,
        /// The new 256-bit key.
        key: [u8; 32],
    },
}

/// The file name rule both sides apply: letters, digits, `.`, `-` and `_` only (anything else
/// becomes `_`), the part after the last path separator, no leading dots, at most 128
/// characters, and `file` when nothing is left.
pub fn sanitize_name(name: &str) -> String {
    let base = name.rsplit(['/', '\\']).next().unwrap_or("");
    let clean: String = base
        .chars()
        .map(|c| {
            if c.is_ascii_alphanumeric() || matches!(c, '.' | '-' | '_') {
                c
            } else {
                '_'
            }
        })
        .take(128)
        .collect();
    let clean = clean.trim_start_matches('.');
    if clean.is_empty() {
        "file".into()
    } else {
        clean.to_owned()
    }
}

/// Encodes one frame (length prefix, version, postcard body) onto `out`.
///
/// # Errors
/// [`DecodeError::TooLong`] when the body would exceed `max` (messages are built by us, so this
/// means a chunk or list larger than the protocol allows).
pub fn encode_frame<T: Serialize>(
    msg: &T,
    max: usize,
    out: &mut Vec<u8>,
) -> Result<(), DecodeError> {
    let payload = postcard::to_allocvec(msg).map_err(|_| DecodeError::BadPayload)?;
    let body = payload.len() + 1;
    if body > max.min(MAX_FRAME) {
        return Err(DecodeError::TooLong { max });
    }
    out.extend_from_slice(&(body as u32).to_be_bytes());
    out.push(CONTROL_VERSION);
    out.extend_from_slice(&payload);
    Ok(())
}

/// Tries to take one frame from the front of `buf`. Returns the message and the bytes it used,
/// or `Ok(None)` when more bytes are needed (the caller reads more and calls again).
///
/// # Errors
/// [`DecodeError::TooLong`] as soon as a length prefix exceeds `max`, before its body arrives;
/// [`DecodeError::BadVersion`]; [`DecodeError::BadPayload`] for an undecodable body.
pub fn decode_frame<'de, T: Deserialize<'de>>(
    buf: &'de [u8],
    max: usize,
) -> Result<Option<(T, usize)>, DecodeError> {
    let Some(prefix) = buf.get(..LEN_PREFIX) else {
        return Ok(None);
    };
    let mut len = [0u8; LEN_PREFIX];
    len.copy_from_slice(prefix);
    let len = u32::from_be_bytes(len) as usize;
    if len > max.min(MAX_FRAME) {
        return Err(DecodeError::TooLong { max });
    }
    if len == 0 {
        return Err(DecodeError::TooShort { len: 0, min: 1 });
    }
    let Some(body) = buf.get(LEN_PREFIX..LEN_PREFIX + len) else {
        return Ok(None);
    };
    if body[0] != CONTROL_VERSION {
        return Err(DecodeError::BadVersion { version: body[0] });
    }
    let (msg, rest) = postcard::take_from_bytes(&body[1..]).map_err(|_| DecodeError::BadPayload)?;
    if !rest.is_empty() {
        return Err(DecodeError::BadPayload);
    }
    Ok(Some((msg, LEN_PREFIX + len)))
}

fn proof_mac(
    key: &DeviceKey,
    device: DeviceId,
    client_nonce: &[u8; 16],
    server_nonce: &[u8; 32],
    binding: &[u8],
) -> Hmac<Sha256> {
    // HMAC accepts keys of any length, so this cannot fail for a 32-byte key.
    let mut mac =
        <Hmac<Sha256> as KeyInit>::new_from_slice(&key.0).expect("HMAC takes keys of any length");
    mac.update(AUTH_CONTEXT);
    mac.update(&device.0.to_le_bytes());
    mac.update(client_nonce);
    mac.update(server_nonce);
    mac.update(&(binding.len() as u32).to_le_bytes());
    mac.update(binding);
    mac
}

/// The session proof of a device: HMAC-SHA256 over the context, device id (u32 LE), both
/// nonces, the binding's length (u32 LE) and the binding (empty without TLS).
pub fn auth_proof(
    key: &DeviceKey,
    device: DeviceId,
    client_nonce: &[u8; 16],
    server_nonce: &[u8; 32],
    binding: &[u8],
) -> [u8; 32] {
    proof_mac(key, device, client_nonce, server_nonce, binding)
        .finalize()
        .into_bytes()
        .into()
}

/// Checks a proof in constant time.
pub fn verify_proof(
    key: &DeviceKey,
    device: DeviceId,
    client_nonce: &[u8; 16],
    server_nonce: &[u8; 32],
    binding: &[u8],
    proof: &[u8; 32],
) -> bool {
    proof_mac(key, device, client_nonce, server_nonce, binding)
        .verify_slice(proof)
        .is_ok()
}

/// The receiving side of a file transfer, without I/O: which chunks to store and how far the
/// file stands (what `FileAck` reports). A chunk is stored only when it continues the file
/// exactly where it stands and stays within the offered size; anything else (a resend, a gap,
/// an overrun) stores nothing, and the answer (the length held) sends the gateway back to it.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Reassembly {
    size: u64,
    have: u64,
}

impl Reassembly {
    /// A transfer of `size` bytes of which the first `have` are already stored (a resumed
    /// transfer; more than `size` counts as `size`).
    pub fn resume(size: u64, have: u64) -> Self {
        Self {
            size,
            have: have.min(size),
        }
    }

    /// Bytes stored contiguously from the start.
    pub fn have(&self) -> u64 {
        self.have
    }

    /// The offered size.
    pub fn size(&self) -> u64 {
        self.size
    }

    /// Whether every byte is stored.
    pub fn is_complete(&self) -> bool {
        self.have == self.size
    }

    /// Decides about a chunk of `len` bytes at `offset`: true when the caller must append it
    /// (it is then counted as stored), false when it must be ignored.
    pub fn accept(&mut self, offset: u64, len: usize) -> bool {
        let fits = u64::try_from(len).is_ok_and(|len| len <= self.size - self.have);
        if offset == self.have && fits {
            self.have += len as u64;
            true
        } else {
            false
        }
    }
}

fn rotation_mac(
    new_key: &DeviceKey,
    device: DeviceId,
    version: u32,
    binding: &[u8],
) -> Hmac<Sha256> {
    let mut mac = <Hmac<Sha256> as KeyInit>::new_from_slice(&new_key.0)
        .expect("HMAC takes keys of any length");
    mac.update(ROTATE_CONTEXT);
    mac.update(&device.0.to_le_bytes());
    mac.update(&version.to_le_bytes());
    mac.update(&(binding.len() as u32).to_le_bytes());
    mac.update(binding);
    mac
}

/// The proof that a device holds the key of a `RotateKey`: HMAC-SHA256 under the new key over
/// [`ROTATE_CONTEXT`], device id (u32 LE), key version (u32 LE), the binding's length (u32 LE)
/// and the binding of the session it was delivered in.
pub fn rotation_proof(
    new_key: &DeviceKey,
    device: DeviceId,
    version: u32,
    binding: &[u8],
) -> [u8; 32] {
    rotation_mac(new_key, device, version, binding)
        .finalize()
        .into_bytes()
        .into()
}

/// Checks a rotation proof in constant time.
pub fn verify_rotation(
    new_key: &DeviceKey,
    device: DeviceId,
    version: u32,
    binding: &[u8],
    proof: &[u8; 32],
) -> bool {
    rotation_mac(new_key, device, version, binding)
        .verify_slice(proof)
        .is_ok()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn frames_round_trip_and_split_anywhere() {
        let msgs = vec![
            GatewayMsg::Challenge {
                server_nonce: [3; 32],
            },
            GatewayMsg::Command {
                id: CommandId(9),
                command: Command::SetConfig {
                    pairs: vec![("a".into(), "b".into())],
                },
            },
            GatewayMsg::FileChunk {
                transfer: TransferId(1),
                offset: 5,
                data: vec![7; MAX_CHUNK],
            },
        ];
        let mut wire = Vec::new();
        for m in &msgs {
            encode_frame(m, MAX_FRAME, &mut wire).unwrap();
        }
        // Feed byte by byte: a partial frame is never an error.
        let mut got = Vec::new();
        let mut buf: Vec<u8> = Vec::new();
        for b in wire {
            buf.push(b);
            while let Some((m, used)) = decode_frame::<GatewayMsg>(&buf, MAX_FRAME).unwrap() {
                got.push(m);
                buf.drain(..used);
            }
        }
        assert_eq!(got, msgs);
        assert!(buf.is_empty());
    }

    #[test]
    fn hostile_prefixes_fail_fast() {
        let huge = u32::MAX.to_be_bytes();
        assert!(matches!(
            decode_frame::<DeviceMsg>(&huge, MAX_FRAME),
            Err(DecodeError::TooLong { .. })
        ));
        assert!(decode_frame::<DeviceMsg>(&[0, 0, 0, 0], MAX_FRAME).is_err());
        assert!(matches!(
            decode_frame::<DeviceMsg>(&[0, 0, 0, 2, 9, 0], MAX_FRAME),
            Err(DecodeError::BadVersion { version: 9 })
        ));
        assert!(matches!(
            decode_frame::<DeviceMsg>(&[0, 0, 0, 2, 1, 200], MAX_FRAME),
            Err(DecodeError::BadPayload)
        ));
        let mut out = Vec::new();
        let big = GatewayMsg::FileChunk {
            transfer: TransferId(1),
            offset: 0,
            data: vec![0; 100],
        };
        assert!(encode_frame(&big, 50, &mut out).is_err());
        assert!(out.is_empty());
    }

    #[test]
    fn names_are_sanitised() {
        assert_eq!(sanitize_name("fw-1.2.bin"), "fw-1.2.bin");
        assert_eq!(sanitize_name("../../etc/passwd"), "passwd");
        assert_eq!(sanitize_name("C:\\x\\boot.ini"), "boot.ini");
        assert_eq!(sanitize_name(".hidden"), "hidden");
        assert_eq!(sanitize_name("a b;c"), "a_b_c");
        assert_eq!(sanitize_name(""), "file");
        assert_eq!(sanitize_name("/"), "file");
        assert_eq!(sanitize_name(&"x".repeat(500)).len(), 128);
    }

    #[test]
    fn reassembly_stores_only_what_continues_the_file() {
        let mut r = Reassembly::resume(10, 0);
        assert!(r.accept(0, 4));
        assert!(!r.accept(0, 4), "a resend");
        assert!(!r.accept(6, 2), "a gap");
        assert!(!r.accept(4, 7), "past the size");
        assert!(r.accept(4, 6));
        assert!(r.is_complete());
        assert!(!r.accept(10, 1));
        assert!(r.accept(10, 0), "an empty chunk at the end changes nothing");
        assert_eq!(r.have(), 10);
        assert_eq!(Reassembly::resume(10, 99).have(), 10);
    }

    #[test]
    fn rotation_proof_depends_on_every_input() {
        let key = DeviceKey([4; 32]);
        let p = rotation_proof(&key, DeviceId(1), 2, b"tls");
        assert!(verify_rotation(&key, DeviceId(1), 2, b"tls", &p));
        assert!(!verify_rotation(
            &DeviceKey([5; 32]),
            DeviceId(1),
            2,
            b"tls",
            &p
        ));
        assert!(!verify_rotation(&key, DeviceId(2), 2, b"tls", &p));
        assert!(!verify_rotation(&key, DeviceId(1), 3, b"tls", &p));
        assert!(!verify_rotation(&key, DeviceId(1), 2, b"other", &p));
        // Not interchangeable with a session proof.
        assert_ne!(p, auth_proof(&key, DeviceId(1), &[0; 16], &[0; 32], b"tls"));
    }

    #[test]
    fn proof_depends_on_every_input() {
        let key = DeviceKey([1; 32]);
        let p = auth_proof(&key, DeviceId(1), &[2; 16], &[3; 32], b"tls");
        assert!(verify_proof(
            &key,
            DeviceId(1),
            &[2; 16],
            &[3; 32],
            b"tls",
            &p
        ));
        assert!(!verify_proof(
            &DeviceKey([9; 32]),
            DeviceId(1),
            &[2; 16],
            &[3; 32],
            b"tls",
            &p
        ));
        assert!(!verify_proof(
            &key,
            DeviceId(2),
            &[2; 16],
            &[3; 32],
            b"tls",
            &p
        ));
        assert!(!verify_proof(
            &key,
            DeviceId(1),
            &[0; 16],
            &[3; 32],
            b"tls",
            &p
        ));
        assert!(!verify_proof(
            &key,
            DeviceId(1),
            &[2; 16],
            &[0; 32],
            b"tls",
            &p
        ));
        assert!(!verify_proof(
            &key,
            DeviceId(1),
            &[2; 16],
            &[3; 32],
            b"other",
            &p
        ));
    }
}
