//! The outbox: messages for the MQTT broker, kept in SQLite until the broker acknowledges
//! them (store-and-forward). Rows are written in the same transaction as what they report
//! (aggregates with the readings that closed them, command results with the status change,
//! presence events with the presence change); the forwarder reads them in sequence order and
//! the writer deletes them once acknowledged.
//!
//! [`OutboxGauge`] mirrors the table's size in memory for the cap and for metrics; every
//! writer of the table updates it after its commit.

use std::sync::atomic::{AtomicBool, AtomicI64, Ordering::Relaxed};

use serde::Serialize;
use tokio::sync::Notify;

use super::{Store, StoreError, now_ms};

/// Kinds of outbox rows. Only [`KIND_AGG`] rows are dropped when the outbox is full.
pub const KIND_AGG: &str = "agg";
/// A device online/offline event.
pub const KIND_EVENT: &str = "event";
/// The final status of a command that came from the broker.
pub const KIND_CMD_RESULT: &str = "cmd-result";

/// In-memory view of the outbox, shared by its writers and the forwarder.
#[derive(Debug, Default)]
pub struct OutboxGauge {
    /// Whether rows are written at all (MQTT forwarding enabled).
    pub enabled: AtomicBool,
    /// Rows in the table.
    pub rows: AtomicI64,
    /// Payload bytes in the table.
    pub bytes: AtomicI64,
    /// Woken when rows were added.
    pub added: Notify,
}

impl OutboxGauge {
    /// Records committed changes: rows and bytes added (positive) or removed (negative).
    pub fn changed(&self, rows: i64, bytes: i64) {
        self.rows.fetch_add(rows, Relaxed);
        self.bytes.fetch_add(bytes, Relaxed);
        if rows > 0 {
            self.added.notify_one();
        }
    }
}

/// One message waiting for the broker.
#[derive(Debug, Clone, sqlx::FromRow)]
pub struct OutboxRow {
    /// Per-gateway sequence number.
    pub seq: i64,
    /// Topic relative to `<prefix>/v1/<gateway-id>/`.
    pub topic: String,
    /// JSON object without `seq` and `gateway`.
    pub payload: String,
}

/// The outbox's size, for `gateway stats` and metrics.
#[derive(Debug, Clone, Serialize)]
pub struct OutboxStatus {
    /// Rows waiting.
    pub rows: i64,
    /// Payload bytes waiting.
    pub bytes: i64,
    /// Age of the oldest waiting message, ms (0 when empty).
    pub oldest_age_ms: i64,
}

/// Adds one row inside the caller's transaction; returns its payload size.
///
/// # Errors
/// Driver errors.
pub async fn insert(
    conn: &mut sqlx::SqliteConnection,
    kind: &str,
    topic: &str,
    payload: &str,
) -> Result<i64, sqlx::Error> {
    sqlx::query("INSERT INTO outbox (kind, topic, payload, created_ms) VALUES (?, ?, ?, ?)")
        .bind(kind)
        .bind(topic)
        .bind(payload)
        .bind(now_ms())
        .execute(conn)
        .await?;
    Ok(payload.len() as i64)
}

impl Store {
    /// The shared outbox gauge.
    pub fn outbox(&self) -> &OutboxGauge {
        &self.outbox
    }

    /// Reads the outbox's size into the gauge (at start) and says whether rows are written.
    ///
    /// # Errors
    /// Driver errors.
    pub async fn outbox_init(&self, enabled: bool) -> Result<(), StoreError> {
        let (rows, bytes): (i64, Option<i64>) =
            sqlx::query_as("SELECT count(*), sum(length(CAST(payload AS BLOB))) FROM outbox")
                .fetch_one(self.pool())
                .await?;
        self.outbox.rows.store(rows, Relaxed);
        self.outbox.bytes.store(bytes.unwrap_or(0), Relaxed);
        self.outbox.enabled.store(enabled, Relaxed);
        Ok(())
    }

    /// Up to `limit` rows with `after < seq < before`, oldest first.
    ///
    /// # Errors
    /// Driver errors.
    pub async fn outbox_after(
        &self,
        after: i64,
        before: i64,
        limit: usize,
    ) -> Result<Vec<OutboxRow>, StoreError> {
        Ok(sqlx::query_as(
            "SELECT seq, topic, payload FROM outbox WHERE seq > ? AND seq < ? ORDER BY seq LIMIT ?",
        )
        .bind(after)
        .bind(before)
        .bind(limit as i64)
        .fetch_all(self.pool())
        .await?)
    }

    /// Adds one row in its own transaction.
    ///
    /// # Errors
    /// Driver errors.
    pub async fn outbox_insert(
        &self,
        kind: &str,
        topic: &str,
        payload: &str,
    ) -> Result<(), StoreError> {
        let mut tx = self.pool().begin().await?;
        let bytes = insert(&mut tx, kind, topic, payload).await?;
        tx.commit().await?;
        self.outbox.changed(1, bytes);
        Ok(())
    }

    /// The highest sequence number ever given (0 before the first row).
    ///
    /// # Errors
    /// Driver errors.
    pub async fn outbox_last_seq(&self) -> Result<i64, StoreError> {
        let (seq,): (Option<i64>,) =
            sqlx::query_as("SELECT max(seq) FROM sqlite_sequence WHERE name = 'outbox'")
                .fetch_one(self.pool())
                .await?;
        Ok(seq.unwrap_or(0))
    }

    /// Size and age of the outbox, read from the table.
    ///
    /// # Errors
    /// Driver errors.
    pub async fn outbox_status(&self) -> Result<OutboxStatus, StoreError> {
        let (rows, bytes): (i64, Option<i64>) =
            sqlx::query_as("SELECT count(*), sum(length(CAST(payload AS BLOB))) FROM outbox")
                .fetch_one(self.pool())
                .await?;
        let oldest: Option<(i64,)> =
            sqlx::query_as("SELECT created_ms FROM outbox ORDER BY seq LIMIT 1")
                .fetch_optional(self.pool())
                .await?;
        Ok(OutboxStatus {
            rows,
            bytes: bytes.unwrap_or(0),
            oldest_age_ms: oldest.map_or(0, |(t,)| now_ms().saturating_sub(t).max(0)),
        })
    }
}
