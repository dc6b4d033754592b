//! WAL checkpoints off the writer's path. The writer's connections run with
//! `wal_autocheckpoint=0`, so a commit never pays for copying the WAL into the database and its
//! fsync; this task does it on a connection of its own: a PASSIVE checkpoint (never blocks the
//! writer) every interval, and a RESTART checkpoint (briefly holds the writer so the WAL starts
//! over) when the WAL has grown past a bound, so its size stays bounded under constant load.
//!
//! Emits: `warn` when a checkpoint fails, `debug` per checkpoint.

use std::time::Duration;

use sqlx::SqlitePool;
use tokio_util::sync::CancellationToken;

/// How often a passive checkpoint runs.
pub const CHECKPOINT_EVERY: Duration = Duration::from_millis(250);
/// WAL size (in 4 KiB pages) past which a RESTART checkpoint resets it: 16 MiB.
pub const WAL_RESTART_PAGES: i64 = 4096;

/// Runs checkpoints until `cancel` fires. The final checkpoint happens when the pool closes.
pub async fn run(pool: SqlitePool, cancel: CancellationToken) {
    let mut tick = tokio::time::interval(CHECKPOINT_EVERY);
    tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    let mut mode_restart = false;
    loop {
        tokio::select! {
            _ = cancel.cancelled() => break,
            _ = tick.tick() => {}
        }
        let sql = if mode_restart {
            "PRAGMA wal_checkpoint(RESTART)"
        } else {
            "PRAGMA wal_checkpoint(PASSIVE)"
        };
        match sqlx::query_as::<_, (i64, i64, i64)>(sql)
            .fetch_one(&pool)
            .await
        {
            Ok((busy, log, done)) => {
                tracing::debug!(busy, log, done, restart = mode_restart, "checkpoint");
                // Log frames past the bound: reset the WAL next time (or keep trying).
                mode_restart = log > WAL_RESTART_PAGES;
            }
            Err(error) => tracing::warn!(%error, "checkpoint failed"),
        }
    }
}
