//! Presence: which devices hold a control session. Sessions report transitions, heartbeats and
//! the configuration each device reports here over a bounded channel; one task writes them in
//! small batched transactions (the devices table's `online` and `control_seen_ms`, the
//! `device_events` history and `device_config.reported`), so thousands of sessions starting at
//! once cost a few transactions, not thousands.
//!
//! The task ends when every sender is gone (the server and all sessions), after writing what is
//! left. Emits: `warn` when a batch cannot be written (it is retried).

use std::time::Duration;

use std::sync::atomic::Ordering::Relaxed;

use proto::DeviceId;
use sqlx::SqlitePool;
use tokio::sync::mpsc;

use crate::store::outbox::{KIND_EVENT, insert};
use crate::store::{Store, now_ms};

/// A presence change.
#[derive(Debug, Clone)]
pub enum Presence {
    /// A session authenticated.
    Online(DeviceId),
    /// A frame arrived on the session.
    Seen(DeviceId),
    /// The session ended, and why.
    Offline(DeviceId, &'static str),
    /// The device reported the configuration it applied (JSON of `ConfigJson`).
    Reported(DeviceId, String),
}

/// Most events written per transaction.
const BATCH: usize = 1024;

/// Writes presence events until every sender is dropped.
pub async fn run(store: Store, mut rx: mpsc::Receiver<Presence>) {
    let pool = store.pool().clone();
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
        let events = store.outbox().enabled.load(Relaxed);
        loop {
            match write(&pool, &batch, ts, events).await {
                Ok((rows, bytes)) => {
                    store.outbox().changed(rows, bytes);
                    break;
                }
                Err(error) => {
                    tracing::warn!(%error, "presence write failed; retrying");
                    tokio::time::sleep(delay).await;
                    delay = (delay * 2).min(Duration::from_secs(5));
                }
            }
        }
        batch.clear();
    }
}

/// Writes one batch; with `events`, online/offline changes also go to the outbox. Returns the
/// outbox rows and bytes added.
async fn write(
    pool: &SqlitePool,
    batch: &[Presence],
    ts: i64,
    events: bool,
) -> Result<(i64, i64), sqlx::Error> {
    let mut tx = pool.begin().await?;
    let (mut rows, mut bytes) = (0, 0);
    for p in batch {
        if events {
            let event = match p {
                Presence::Online(id) => Some((id, "online", None)),
                Presence::Offline(id, why) => Some((id, "offline", Some(*why))),
                Presence::Seen(_) | Presence::Reported(..) => None,
            };
            if let Some((id, event, detail)) = event {
                let payload = serde_json::json!({
                    "device": id.0,
                    "event": event,
                    "detail": detail,
                    "ts_ms": ts,
                })
                .to_string();
                bytes += insert(&mut tx, KIND_EVENT, &format!("event/{}", id.0), &payload).await?;
                rows += 1;
            }
        }
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
            Presence::Reported(id, json) => {
                sqlx::query(crate::store::config::SET_REPORTED)
                    .bind(i64::from(id.0))
                    .bind(json.as_str())
                    .bind(ts)
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
    tx.commit().await?;
    Ok((rows, bytes))
}
