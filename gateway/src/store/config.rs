//! Device configuration: what operators want (desired) and what devices applied (reported).

use proto::DeviceId;
use proto::control::DeviceConfig;
use serde::{Deserialize, Serialize};

use crate::store::{Store, StoreError, now_ms};

/// JSON form of a device configuration (the API's and the table's).
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct ConfigJson {
    /// Milliseconds between telemetry datagrams.
    pub interval_ms: u32,
    /// Readings per datagram.
    pub batch: u16,
    /// Sensors that are on.
    pub sensors: Vec<u16>,
}

impl From<&DeviceConfig> for ConfigJson {
    fn from(c: &DeviceConfig) -> Self {
        Self {
            interval_ms: c.interval_ms,
            batch: c.batch,
            sensors: c.sensors.clone(),
        }
    }
}

impl From<&ConfigJson> for DeviceConfig {
    fn from(c: &ConfigJson) -> Self {
        Self {
            interval_ms: c.interval_ms,
            batch: c.batch,
            sensors: c.sensors.clone(),
        }
    }
}

impl ConfigJson {
    /// Checks the bounds a device can honour.
    ///
    /// # Errors
    /// A message naming the bad field.
    pub fn validate(&self) -> Result<(), String> {
        if self.interval_ms == 0 {
            return Err("interval_ms must be positive".into());
        }
        if self.batch == 0 || usize::from(self.batch) > proto::MAX_READINGS {
            return Err(format!("batch must be 1..={}", proto::MAX_READINGS));
        }
        if self.sensors.is_empty() || self.sensors.len() > 64 {
            return Err("sensors must list 1 to 64 sensor ids".into());
        }
        Ok(())
    }
}

/// Desired and reported configuration of one device.
#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct ConfigPair {
    /// Device id.
    pub device: u32,
    /// What the operator wants.
    pub desired: Option<ConfigJson>,
    /// When it was set, ms since the epoch.
    pub desired_ms: Option<i64>,
    /// What the device last reported applied.
    pub reported: Option<ConfigJson>,
    /// When, ms since the epoch.
    pub reported_ms: Option<i64>,
    /// Whether the device runs what is desired.
    pub in_sync: bool,
}

fn parse(text: Option<String>) -> Option<ConfigJson> {
    text.and_then(|t| serde_json::from_str(&t).ok())
}

/// Upsert of a device's reported configuration: binds device, JSON, time (ms).
pub(crate) const SET_REPORTED: &str = "INSERT INTO device_config (device, reported, reported_ms) \
     VALUES (?1, ?2, ?3) ON CONFLICT(device) DO UPDATE SET reported = ?2, reported_ms = ?3";

impl Store {
    /// Stores the desired configuration of a device.
    ///
    /// # Errors
    /// Driver errors.
    pub async fn set_desired_config(
        &self,
        device: DeviceId,
        config: &ConfigJson,
    ) -> Result<(), StoreError> {
        self.store_config(
            device,
            config,
            "INSERT INTO device_config (device, desired, desired_ms) VALUES (?1, ?2, ?3) \
             ON CONFLICT(device) DO UPDATE SET desired = ?2, desired_ms = ?3",
        )
        .await
    }

    /// Stores what a device reports it applied (sessions hand reports to the presence task,
    /// which writes them in batches with [`SET_REPORTED`]).
    ///
    /// # Errors
    /// Driver errors.
    pub async fn set_reported_config(
        &self,
        device: DeviceId,
        config: &ConfigJson,
    ) -> Result<(), StoreError> {
        self.store_config(device, config, SET_REPORTED).await
    }

    async fn store_config(
        &self,
        device: DeviceId,
        config: &ConfigJson,
        sql: &'static str,
    ) -> Result<(), StoreError> {
        let text = serde_json::to_string(config).map_err(|_| StoreError::Corrupt {
            table: "device_config",
            reason: "config does not serialise",
        })?;
        sqlx::query(sql)
            .bind(i64::from(device.0))
            .bind(text)
            .bind(now_ms())
            .execute(self.pool())
            .await?;
        Ok(())
    }

    /// Desired and reported configuration of one device (both None when never set).
    ///
    /// # Errors
    /// Driver errors.
    pub async fn device_config(&self, device: DeviceId) -> Result<ConfigPair, StoreError> {
        type Row = (Option<String>, Option<i64>, Option<String>, Option<i64>);
        let row: Option<Row> = sqlx::query_as(
            "SELECT desired, desired_ms, reported, reported_ms FROM device_config WHERE device = ?",
        )
        .bind(i64::from(device.0))
        .fetch_optional(self.pool())
        .await?;
        let (desired, desired_ms, reported, reported_ms) = row.unwrap_or_default();
        let desired = parse(desired);
        let reported = parse(reported);
        Ok(ConfigPair {
            device: device.0,
            in_sync: desired.is_some() && desired == reported,
            desired,
            desired_ms,
            reported,
            reported_ms,
        })
    }
}
