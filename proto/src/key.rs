//! Device keys: 256-bit pre-shared keys, written as 64 hex digits in files and on terminals.

use std::fmt;
use std::str::FromStr;

use thiserror::Error;

/// A device's 256-bit pre-shared key. `Debug` never prints the key.
#[derive(Clone, PartialEq, Eq)]
pub struct DeviceKey(pub [u8; 32]);

impl DeviceKey {
    /// The key as 64 lowercase hex digits, the form used in fleet files and the database.
    pub fn to_hex(&self) -> String {
        hex::encode(self.0)
    }
}

impl fmt::Debug for DeviceKey {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str("DeviceKey(..)")
    }
}

/// A key given as text is not 64 hex digits.
#[derive(Debug, Error, Clone, PartialEq, Eq)]
#[error("a device key is 64 hex digits")]
pub struct KeyParseError;

impl FromStr for DeviceKey {
    type Err = KeyParseError;

    fn from_str(s: &str) -> Result<Self, Self::Err> {
        let mut key = [0u8; 32];
        hex::decode_to_slice(s.trim(), &mut key).map_err(|_| KeyParseError)?;
        Ok(DeviceKey(key))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn hex_round_trip_and_errors() {
        let key = DeviceKey([0xab; 32]);
        assert_eq!(key.to_hex().parse::<DeviceKey>(), Ok(key.clone()));
        assert_eq!("abc".parse::<DeviceKey>(), Err(KeyParseError));
        assert_eq!("zz".repeat(32).parse::<DeviceKey>(), Err(KeyParseError));
        assert!(!format!("{key:?}").contains("ab"));
    }
}

/// A device key prepared for sealing and opening datagrams. Cheap to keep one per device.
#[derive(Clone)]
pub struct Cipher(pub(crate) chacha20poly1305::ChaCha20Poly1305);

impl DeviceKey {
    /// Prepares the key for sealing and opening.
    pub fn cipher(&self) -> Cipher {
        use chacha20poly1305::KeyInit;
        Cipher(chacha20poly1305::ChaCha20Poly1305::new(
            &chacha20poly1305::Key::from(self.0),
        ))
    }
}

impl fmt::Debug for Cipher {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str("Cipher(..)")
    }
}
