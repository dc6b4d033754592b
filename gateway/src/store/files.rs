//! Files for devices and their transfers: the bytes live in a folder beside the database, the
//! rows here; a transfer's confirmed offset is kept so a cut session resumes where it stopped.

use std::path::{Path, PathBuf};

use proto::DeviceId;
use proto::control::TransferId;
use serde::Serialize;

use crate::store::{Store, StoreError, now_ms};

/// A transfer the session should run.
#[derive(Debug, Clone)]
pub struct PendingTransfer {
    /// Transfer id.
    pub id: TransferId,
    /// Name the device stores it under.
    pub name: String,
    /// Size in bytes.
    pub size: u64,
    /// SHA-256 of the bytes.
    pub sha256: [u8; 32],
    /// Where the gateway keeps the bytes.
    pub path: PathBuf,
}

/// A transfer as operators see it.
#[derive(Debug, Clone, Serialize, sqlx::FromRow)]
pub struct TransferRow {
    /// Transfer id.
    pub id: i64,
    /// File id.
    pub file: i64,
    /// File name.
    pub name: String,
    /// Device.
    pub device: i64,
    /// queued, sending, done, failed.
    pub status: String,
    /// Bytes confirmed by the device.
    pub acked_offset: i64,
    /// File size.
    pub size: i64,
    /// Last change, ms since the epoch.
    pub updated_ms: i64,
    /// Failure detail.
    pub detail: Option<String>,
}

pub use proto::control::sanitize_name;

impl Store {
    /// Records a file already written to `path` and queues it for `devices`.
    ///
    /// # Errors
    /// Driver errors.
    pub async fn add_file(
        &self,
        name: &str,
        size: u64,
        sha256: &[u8; 32],
        path: &Path,
        devices: &[DeviceId],
    ) -> Result<(i64, Vec<(DeviceId, TransferId)>), StoreError> {
        let now = now_ms();
        let mut tx = self.pool().begin_with("BEGIN IMMEDIATE").await?;
        let (file,): (i64,) = sqlx::query_as(
            "INSERT INTO files (name, size, sha256, path, created_ms) VALUES (?, ?, ?, ?, ?) \
             RETURNING id",
        )
        .bind(name)
        .bind(size as i64)
        .bind(&sha256[..])
        .bind(path.to_string_lossy().as_ref())
        .bind(now)
        .fetch_one(&mut *tx)
        .await?;
        let mut out = Vec::with_capacity(devices.len());
        for d in devices {
            let (id,): (i64,) = sqlx::query_as(
                "INSERT INTO file_transfers (file, device, status, updated_ms) \
                 VALUES (?, ?, 'queued', ?) RETURNING id",
            )
            .bind(file)
            .bind(i64::from(d.0))
            .bind(now)
            .fetch_one(&mut *tx)
            .await?;
            out.push((*d, TransferId(id as u64)));
        }
        tx.commit().await?;
        Ok((file, out))
    }

    /// The oldest unfinished transfer for `device`, if any.
    ///
    /// # Errors
    /// Driver errors; a corrupt digest is [`StoreError::Corrupt`].
    pub async fn next_transfer(
        &self,
        device: DeviceId,
    ) -> Result<Option<PendingTransfer>, StoreError> {
        type Row = (i64, String, i64, Vec<u8>, String);
        let row: Option<Row> = sqlx::query_as(
            "SELECT t.id, f.name, f.size, f.sha256, f.path FROM file_transfers t \
             JOIN files f ON f.id = t.file \
             WHERE t.device = ? AND t.status IN ('queued', 'sending') ORDER BY t.id LIMIT 1",
        )
        .bind(i64::from(device.0))
        .fetch_optional(self.pool())
        .await?;
        row.map(|(id, name, size, sha, path)| {
            Ok(PendingTransfer {
                id: TransferId(id as u64),
                name,
                size: size as u64,
                sha256: sha.try_into().map_err(|_| StoreError::Corrupt {
                    table: "files",
                    reason: "sha256 is not 32 bytes",
                })?,
                path: PathBuf::from(path),
            })
        })
        .transpose()
    }

    /// Records progress or the end of a transfer of `device` (other devices' ids are ignored).
    ///
    /// # Errors
    /// Driver errors.
    pub async fn update_transfer(
        &self,
        device: DeviceId,
        id: TransferId,
        status: &str,
        acked_offset: u64,
        detail: Option<&str>,
    ) -> Result<(), StoreError> {
        sqlx::query(
            "UPDATE file_transfers SET status = ?, acked_offset = ?, updated_ms = ?, \
             detail = coalesce(?, detail) WHERE id = ? AND device = ?",
        )
        .bind(status)
        .bind(acked_offset as i64)
        .bind(now_ms())
        .bind(detail)
        .bind(id.0 as i64)
        .bind(i64::from(device.0))
        .execute(self.pool())
        .await?;
        Ok(())
    }

    /// Transfers per status (`queued`, `sending`, `done`, `failed`), with 0 for statuses none
    /// has.
    ///
    /// # Errors
    /// Database errors.
    pub async fn transfer_counts(&self) -> Result<Vec<(&'static str, u64)>, StoreError> {
        let rows: Vec<(String, i64)> =
            sqlx::query_as("SELECT status, count(*) FROM file_transfers GROUP BY status")
                .fetch_all(self.pool())
                .await?;
        Ok(["queued", "sending", "done", "failed"]
            .into_iter()
            .map(|st| {
                let n = rows.iter().find(|(s, _)| s == st).map_or(0, |(_, n)| *n);
                (st, n.max(0) as u64)
            })
            .collect())
    }

    /// Transfers, newest first, optionally of one file.
    ///
    /// # Errors
    /// Driver errors.
    pub async fn list_transfers(
        &self,
        file: Option<i64>,
        limit: i64,
    ) -> Result<Vec<TransferRow>, StoreError> {
        Ok(sqlx::query_as(
            "SELECT t.id, t.file, f.name, t.device, t.status, t.acked_offset, f.size, \
             t.updated_ms, t.detail FROM file_transfers t JOIN files f ON f.id = t.file \
             WHERE ?1 IS NULL OR t.file = ?1 ORDER BY t.id DESC LIMIT ?2",
        )
        .bind(file)
        .bind(limit)
        .fetch_all(self.pool())
        .await?)
    }
}
