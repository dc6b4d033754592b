//! Presence: which devices hold a control session. Sessions report transitions and heartbeats
//! here over a bounded channel; one task writes them in small batched transactions (the devices
//! table's `online` and `control_seen_ms`, and the `device_events` history), so thousands of
//! sessions starting at once cost a few transactions, not thousands.
//!
//! The task ends when every sender is gone (the server and all sessions), after writing what is
//! left. Emits: `warn` when a batch cannot be written (it is retried).

use std::time::Duration;

use proto::DeviceId;
use sqlx::SqlitePool;
use tokio::sync::mpsc;

use crate::store::now_ms;

/// A presence change.
#[derive(Debug, Clone)]
pub enum Presence {
    /// A session authenticated.
    Online(DeviceId),
    /// A frame arrived on the session.
    Seen(DeviceId),
    /// The session ended, and why.
    Offline(DeviceId, &'static str),
}

/// Most events written per transaction.
const BATCH: usize = 1024;

/// Writes presence events until every sender is dropped.
pub async fn run(pool: SqlitePool, mut rx: mpsc::Receiver<Presence>) {
    // Every device is offline until a session says otherwise (a crash leaves stale flags).
    if let Err(error) = sqlx::query("UPDATE devices SET online = 0 WHERE online = 1")
        .execute(&pool)
        .await
    {
        tracing::warn!(%error, "resetting presence failed");
    }
    let mut batch = Vec::with_capacity(BATCH);
    loop {
        let n = rx.recv_many(&mut batch, BATCH).await;
        if n == 0 {
            break;
        }
        let ts = now_ms();
        let mut delay = Duration::from_millis(50);
        while let Err(error) = write(&pool, &batch, ts).await {
            tracing::warn!(%error, "presence write failed; retrying");
            tokio::time::sleep(delay).await;
            delay = (delay * 2).min(Duration::from_secs(5));
        }
        batch.clear();
    }
}

async fn write(pool: &SqlitePool, batch: &[Presence], ts: i64) -> Result<(), sqlx::Error> {
    let mut tx = pool.begin().await?;
    for p in batch {
        match p {
            Presence::Online(id) => {
                sqlx::query("UPDATE devices SET online = 1, control_seen_ms = ? WHERE id = ?")
                    .bind(ts)
                    .bind(i64::from(id.0))
                    .execute(&mut *tx)
                    .await?;
                sqlx::query(
                    "INSERT INTO device_events (device, ts_ms, event) VALUES (?, ?, 'online')",
                )
                .bind(i64::from(id.0))
                .bind(ts)
                .execute(&mut *tx)
                .await?;
            }
            Presence::Seen(id) => {
                sqlx::query("UPDATE devices SET control_seen_ms = ? WHERE id = ?")
                    .bind(ts)
                    .bind(i64::from(id.0))
                    .execute(&mut *tx)
                    .await?;
            }
            Presence::Offline(id, why) => {
                sqlx::query("UPDATE devices SET online = 0 WHERE id = ?")
                    .bind(i64::from(id.0))
                    .execute(&mut *tx)
                    .await?;
                sqlx::query(
                    "INSERT INTO device_events (device, ts_ms, event, detail) \
                     VALUES (?, ?, 'offline', ?)",
                )
                .bind(i64::from(id.0))
                .bind(ts)
                .bind(*why)
                .execute(&mut *tx)
                .await?;
            }
        }
    }
    tx.commit().await
}
