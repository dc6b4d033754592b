//! The fleet file: the devices a simulator plays, with their keys and sequence counters.
//!
//! `gateway devices provision` writes it; `device-sim` reads it and writes the counters back,
//! as a real device keeps its counter in flash, so the next run continues where this one
//! stopped. The file holds keys: it is created with mode 0600 and replaced atomically.

use std::io::Write;
use std::path::{Path, PathBuf};

use proto::{DeviceId, DeviceKey};
use serde::{Deserialize, Serialize};
use thiserror::Error;

/// Current version of the fleet file format.
pub const FLEET_VERSION: u32 = 1;

/// A fleet file.
#[derive(Debug, Clone, Serialize, Deserialize, PartialEq)]
#[serde(deny_unknown_fields)]
pub struct FleetFile {
    /// Format version, [`FLEET_VERSION`].
    pub version: u32,
    /// The devices.
    pub devices: Vec<FleetDevice>,
}

/// One device of a fleet.
#[derive(Debug, Clone, Serialize, Deserialize, PartialEq)]
#[serde(deny_unknown_fields)]
pub struct FleetDevice {
    /// Device id, as provisioned in the gateway.
    pub id: u32,
    /// Display name.
    pub name: String,
    /// 256-bit key, 64 hex digits.
    pub key: String,
    /// Next sequence number to use; never reused.
    #[serde(default)]
    pub next_seq: u64,
}

impl FleetDevice {
    /// The device id.
    pub fn device_id(&self) -> DeviceId {
        DeviceId(self.id)
    }

    /// The parsed key.
    ///
    /// # Errors
    /// [`FleetError::Key`] when the key is not 64 hex digits.
    pub fn device_key(&self) -> Result<DeviceKey, FleetError> {
        self.key
            .parse()
            .map_err(|_| FleetError::Key { device: self.id })
    }
}

/// A fleet file that cannot be used.
#[derive(Debug, Error)]
pub enum FleetError {
    /// Reading or writing the file failed.
    #[error("fleet file {path}: {source}")]
    Io {
        /// The file.
        path: PathBuf,
        /// Why.
        source: std::io::Error,
    },
    /// Not valid JSON of the expected shape.
    #[error("fleet file {path} is not a valid fleet: {source}")]
    Parse {
        /// The file.
        path: PathBuf,
        /// Why.
        source: serde_json::Error,
    },
    /// Written by a newer or unknown format version.
    #[error("fleet file version {0} is not supported (expected {FLEET_VERSION})")]
    Version(u32),
    /// A device key is not 64 hex digits.
    #[error("device {device} has an invalid key")]
    Key {
        /// The device.
        device: u32,
    },
    /// The same device id appears twice.
    #[error("device {0} appears twice")]
    Duplicate(u32),
}

impl FleetFile {
    /// A new fleet of `devices`.
    pub fn new(devices: Vec<FleetDevice>) -> Self {
        Self {
            version: FLEET_VERSION,
            devices,
        }
    }

    /// Reads and checks a fleet file.
    ///
    /// # Errors
    /// [`FleetError`] for unreadable, malformed or inconsistent files.
    pub fn load(path: &Path) -> Result<FleetFile, FleetError> {
        let text = std::fs::read_to_string(path).map_err(|source| FleetError::Io {
            path: path.to_owned(),
            source,
        })?;
        let fleet: FleetFile = serde_json::from_str(&text).map_err(|source| FleetError::Parse {
            path: path.to_owned(),
            source,
        })?;
        if fleet.version != FLEET_VERSION {
            return Err(FleetError::Version(fleet.version));
        }
        let mut ids = std::collections::HashSet::new();
        for d in &fleet.devices {
            d.device_key()?;
            if !ids.insert(d.id) {
                return Err(FleetError::Duplicate(d.id));
            }
        }
        Ok(fleet)
    }

    /// Writes the file atomically (temporary file, fsync, rename) with mode 0600.
    ///
    /// # Errors
    /// [`FleetError::Io`].
    pub fn save(&self, path: &Path) -> Result<(), FleetError> {
        use std::os::unix::fs::OpenOptionsExt;
        let io = |source| FleetError::Io {
            path: path.to_owned(),
            source,
        };
        let mut tmp = path.as_os_str().to_owned();
        tmp.push(".tmp");
        let tmp = PathBuf::from(tmp);
        let json = serde_json::to_vec_pretty(self).map_err(|source| FleetError::Parse {
            path: path.to_owned(),
            source,
        })?;
        let mut f = std::fs::OpenOptions::new()
            .write(true)
            .create(true)
            .truncate(true)
            .mode(0o600)
            .open(&tmp)
            .map_err(io)?;
        f.write_all(&json).map_err(io)?;
        f.write_all(b"\n").map_err(io)?;
        f.sync_all().map_err(io)?;
        drop(f);
        std::fs::rename(&tmp, path).map_err(io)?;
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::os::unix::fs::PermissionsExt;

    #[test]
    fn save_load_round_trip_with_private_mode() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("fleet.json");
        let fleet = FleetFile::new(vec![FleetDevice {
            id: 3,
            name: "d3".into(),
            key: "11".repeat(32),
            next_seq: 9,
        }]);
        fleet.save(&path).unwrap();
        assert_eq!(FleetFile::load(&path).unwrap(), fleet);
        let mode = std::fs::metadata(&path).unwrap().permissions().mode() & 0o777;
        assert_eq!(mode, 0o600);
    }

    #[test]
    fn bad_files_are_clear_errors() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("fleet.json");
        assert!(matches!(FleetFile::load(&path), Err(FleetError::Io { .. })));
        std::fs::write(&path, "{").unwrap();
        assert!(matches!(
            FleetFile::load(&path),
            Err(FleetError::Parse { .. })
        ));
        std::fs::write(
            &path,
            r#"{"version":1,"devices":[{"id":1,"name":"a","key":"zz"}]}"#,
        )
        .unwrap();
        assert!(matches!(
            FleetFile::load(&path),
            Err(FleetError::Key { device: 1 })
        ));
        std::fs::write(&path, r#"{"version":7,"devices":[]}"#).unwrap();
        assert!(matches!(
            FleetFile::load(&path),
            Err(FleetError::Version(7))
        ));
    }
}
