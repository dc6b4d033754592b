//! Commands to devices: queued by operators, delivered over control sessions, answered by the
//! devices. Every status change is recorded in `command_events`.

use proto::DeviceId;
use proto::control::{Command, CommandId};
use serde::Serialize;

use crate::store::{Store, StoreError, now_ms};

/// `commands.origin` of commands that came from the MQTT command topic.
pub const ORIGIN_MQTT: &str = "mqtt";

/// Where a command is in its life.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize)]
#[serde(rename_all = "lowercase")]
pub enum CommandStatus {
    /// Waiting for the device to be online.
    Queued,
    /// Written to the device's session; no answer yet (sent again on reconnect).
    Sent,
    /// The device applied it (or had already applied it).
    Acknowledged,
    /// The device refused it or it failed.
    Failed,
    /// Not delivered before its deadline.
    Expired,
}

impl CommandStatus {
    /// The stored name.
    pub fn as_str(self) -> &'static str {
        match self {
            CommandStatus::Queued => "queued",
            CommandStatus::Sent => "sent",
            CommandStatus::Acknowledged => "acknowledged",
            CommandStatus::Failed => "failed",
            CommandStatus::Expired => "expired",
        }
    }
}

/// A stored command as operators see it.
#[derive(Debug, Clone, Serialize, sqlx::FromRow)]
pub struct CommandRow {
    /// Command id.
    pub id: i64,
    /// Target device.
    pub device: i64,
    /// Human summary.
    pub summary: String,
    /// Current status.
    pub status: String,
    /// Created, ms since the epoch.
    pub created_ms: i64,
    /// Deadline for delivery, ms since the epoch.
    pub expires_ms: i64,
    /// Last change, ms since the epoch.
    pub updated_ms: i64,
    /// The device's answer.
    pub result: Option<String>,
}

/// A short human form of a command.
pub fn summary(c: &Command) -> String {
    match c {
        Command::Ping => "ping".into(),
        Command::SetInterval { millis } => format!("set-interval {millis}"),
        Command::Reboot => "reboot".into(),
        Command::SetConfig { pairs } => {
            let kv: Vec<String> = pairs.iter().map(|(k, v)| format!("{k}={v}")).collect();
            format!("set-config {}", kv.join(" "))
        }
        Command::Custom { payload } => format!("custom {} bytes", payload.len()),
    }
}

impl Store {
    /// Queues `command` for each device in `devices`, valid for `ttl_ms`; returns the ids.
    ///
    /// # Errors
    /// Driver errors.
    pub async fn enqueue_commands(
        &self,
        devices: &[DeviceId],
        command: &Command,
        ttl_ms: i64,
    ) -> Result<Vec<(DeviceId, CommandId)>, StoreError> {
        self.enqueue_commands_from(devices, command, ttl_ms, None, None)
            .await
    }

    /// [`Store::enqueue_commands`] for commands from elsewhere than the admin API: `origin`
    /// `mqtt` makes the final status go to the broker with `request_id`.
    ///
    /// # Errors
    /// Driver errors.
    pub async fn enqueue_commands_from(
        &self,
        devices: &[DeviceId],
        command: &Command,
        ttl_ms: i64,
        origin: Option<&str>,
        request_id: Option<&str>,
    ) -> Result<Vec<(DeviceId, CommandId)>, StoreError> {
        let body = postcard::to_allocvec(command).map_err(|_| StoreError::Corrupt {
            table: "commands",
            reason: "command does not encode",
        })?;
        let summary = summary(command);
        let now = now_ms();
        let mut tx = self.pool().begin_with("BEGIN IMMEDIATE").await?;
        let mut out = Vec::with_capacity(devices.len());
        for d in devices {
            let (id,): (i64,) = sqlx::query_as(
                "INSERT INTO commands (device, body, summary, status, created_ms, expires_ms, \
                 updated_ms, origin, request_id) VALUES (?, ?, ?, 'queued', ?, ?, ?, ?, ?) \
                 RETURNING id",
            )
            .bind(i64::from(d.0))
            .bind(&body)
            .bind(&summary)
            .bind(now)
            .bind(now.saturating_add(ttl_ms))
            .bind(now)
            .bind(origin)
            .bind(request_id)
            .fetch_one(&mut *tx)
            .await?;
            sqlx::query(
                "INSERT INTO command_events (command, ts_ms, status) VALUES (?, ?, 'queued')",
            )
            .bind(id)
            .bind(now)
            .execute(&mut *tx)
            .await?;
            out.push((*d, CommandId(id as u64)));
        }
        tx.commit().await?;
        Ok(out)
    }

    /// Commands still owed to `device` (queued or sent without an answer), oldest first;
    /// expired ones are marked expired and left out.
    ///
    /// # Errors
    /// Driver errors; a body that does not decode is marked failed and skipped.
    pub async fn pending_commands(
        &self,
        device: DeviceId,
    ) -> Result<Vec<(CommandId, Command)>, StoreError> {
        self.expire_commands().await?;
        let rows: Vec<(i64, Vec<u8>)> = sqlx::query_as(
            "SELECT id, body FROM commands WHERE device = ? AND status IN ('queued', 'sent') \
             ORDER BY id",
        )
        .bind(i64::from(device.0))
        .fetch_all(self.pool())
        .await?;
        let mut out = Vec::with_capacity(rows.len());
        for (id, body) in rows {
            match postcard::from_bytes::<Command>(&body) {
                Ok(c) => out.push((CommandId(id as u64), c)),
                Err(_) => {
                    self.set_command_status(
                        CommandId(id as u64),
                        CommandStatus::Failed,
                        Some("stored body does not decode"),
                    )
                    .await?;
                }
            }
        }
        Ok(out)
    }

    /// Marks a queued command as sent; a command already answered or expired keeps its status.
    ///
    /// # Errors
    /// Driver errors.
    pub async fn command_sent(&self, id: CommandId) -> Result<(), StoreError> {
        let (current,): (Option<String>,) =
            sqlx::query_as("SELECT max(status) FROM commands WHERE id = ?")
                .bind(id.0 as i64)
                .fetch_one(self.pool())
                .await?;
        if current.as_deref() == Some("queued") {
            self.set_command_status(id, CommandStatus::Sent, None)
                .await?;
        }
        Ok(())
    }

    /// Records a status change (and the device's answer, if any).
    ///
    /// # Errors
    /// Driver errors.
    pub async fn set_command_status(
        &self,
        id: CommandId,
        status: CommandStatus,
        detail: Option<&str>,
    ) -> Result<(), StoreError> {
        let now = now_ms();
        let final_status = matches!(
            status,
            CommandStatus::Acknowledged | CommandStatus::Failed | CommandStatus::Expired
        );
        let mut tx = self.pool().begin().await?;
        // A command ends once: the first final status wins (an answer racing an expiry sweep
        // cannot produce two results).
        let changed = sqlx::query(
            "UPDATE commands SET status = ?, updated_ms = ?, result = coalesce(?, result) \
             WHERE id = ? AND status NOT IN ('acknowledged', 'failed', 'expired')",
        )
        .bind(status.as_str())
        .bind(now)
        .bind(detail)
        .bind(id.0 as i64)
        .execute(&mut *tx)
        .await?
        .rows_affected();
        if changed == 0 {
            return Ok(());
        }
        sqlx::query(
            "INSERT INTO command_events (command, ts_ms, status, detail) VALUES (?, ?, ?, ?)",
        )
        .bind(id.0 as i64)
        .bind(now)
        .bind(status.as_str())
        .bind(detail)
        .execute(&mut *tx)
        .await?;
        let mut added = 0;
        if final_status
            && self
                .outbox()
                .enabled
                .load(std::sync::atomic::Ordering::Relaxed)
        {
            type Origin = (i64, Option<String>, Option<String>, Option<String>);
            let row: Option<Origin> = sqlx::query_as(
                "SELECT device, origin, request_id, result FROM commands WHERE id = ?",
            )
            .bind(id.0 as i64)
            .fetch_optional(&mut *tx)
            .await?;
            if let Some((device, Some(origin), request_id, result)) = row
                && origin == ORIGIN_MQTT
            {
                let payload = serde_json::json!({
                    "device": device,
                    "command_id": id.0,
                    "request_id": request_id,
                    "status": status.as_str(),
                    "detail": result,
                })
                .to_string();
                added = crate::store::outbox::insert(
                    &mut tx,
                    crate::store::outbox::KIND_CMD_RESULT,
                    &format!("cmd-result/{device}"),
                    &payload,
                )
                .await?;
            }
        }
        tx.commit().await?;
        if added > 0 {
            self.outbox().changed(1, added);
        }
        Ok(())
    }

    /// Records a device's answer to one of its commands; answers naming another device's
    /// command are ignored (returns false).
    ///
    /// # Errors
    /// Driver errors.
    pub async fn command_answered(
        &self,
        device: DeviceId,
        id: CommandId,
        status: CommandStatus,
        detail: &str,
    ) -> Result<bool, StoreError> {
        let (owner,): (Option<i64>,) =
            sqlx::query_as("SELECT max(device) FROM commands WHERE id = ?")
                .bind(id.0 as i64)
                .fetch_one(self.pool())
                .await?;
        if owner != Some(i64::from(device.0)) {
            return Ok(false);
        }
        // A resend answered "duplicate" must not overwrite the first answer.
        let (current,): (String,) = sqlx::query_as("SELECT status FROM commands WHERE id = ?")
            .bind(id.0 as i64)
            .fetch_one(self.pool())
            .await?;
        if matches!(current.as_str(), "acknowledged" | "failed") {
            return Ok(true);
        }
        self.set_command_status(id, status, Some(detail)).await?;
        Ok(true)
    }

    /// Marks every undelivered command past its deadline as expired.
    ///
    /// # Errors
    /// Driver errors.
    pub async fn expire_commands(&self) -> Result<(), StoreError> {
        let expired: Vec<(i64,)> = sqlx::query_as(
            "SELECT id FROM commands WHERE status IN ('queued', 'sent') AND expires_ms < ?",
        )
        .bind(now_ms())
        .fetch_all(self.pool())
        .await?;
        for (id,) in expired {
            self.set_command_status(CommandId(id as u64), CommandStatus::Expired, None)
                .await?;
        }
        Ok(())
    }

    /// Commands per status (`queued`, `sent`, ...), with 0 for statuses none has.
    ///
    /// # Errors
    /// Database errors.
    pub async fn command_counts(&self) -> Result<Vec<(&'static str, u64)>, StoreError> {
        let rows: Vec<(String, i64)> =
            sqlx::query_as("SELECT status, count(*) FROM commands GROUP BY status")
                .fetch_all(self.pool())
                .await?;
        Ok([
            CommandStatus::Queued,
            CommandStatus::Sent,
            CommandStatus::Acknowledged,
            CommandStatus::Failed,
            CommandStatus::Expired,
        ]
        .iter()
        .map(|st| {
            let n = rows
                .iter()
                .find(|(s, _)| s == st.as_str())
                .map_or(0, |(_, n)| *n);
            (st.as_str(), n.max(0) as u64)
        })
        .collect())
    }

    /// Commands, newest first, optionally of one device, at most `limit`.
    ///
    /// # Errors
    /// Driver errors.
    pub async fn list_commands(
        &self,
        device: Option<DeviceId>,
        limit: i64,
    ) -> Result<Vec<CommandRow>, StoreError> {
        self.expire_commands().await?;
        let rows = match device {
            Some(d) => {
                sqlx::query_as(
                    "SELECT id, device, summary, status, created_ms, expires_ms, updated_ms, \
                     result FROM commands WHERE device = ? ORDER BY id DESC LIMIT ?",
                )
                .bind(i64::from(d.0))
                .bind(limit)
                .fetch_all(self.pool())
                .await?
            }
            None => {
                sqlx::query_as(
                    "SELECT id, device, summary, status, created_ms, expires_ms, updated_ms, \
                     result FROM commands ORDER BY id DESC LIMIT ?",
                )
                .bind(limit)
                .fetch_all(self.pool())
                .await?
            }
        };
        Ok(rows)
    }

    /// Ids of every device not revoked.
    ///
    /// # Errors
    /// Driver errors.
    pub async fn device_ids(&self) -> Result<Vec<DeviceId>, StoreError> {
        let rows: Vec<(i64,)> =
            sqlx::query_as("SELECT id FROM devices WHERE revoked_ms IS NULL ORDER BY id")
                .fetch_all(self.pool())
                .await?;
        Ok(rows.into_iter().map(|(id,)| DeviceId(id as u32)).collect())
    }
}
