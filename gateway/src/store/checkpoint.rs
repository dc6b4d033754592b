//! WAL checkpoints off the writer's path. The serving connections run with
//! `wal_autocheckpoint=0`, so a commit never pays for copying the WAL into the database and its
//! fsync. This task runs a PASSIVE checkpoint (which never blocks the writer) every interval on
//! a connection of its own. Under constant load a passive checkpoint never quite catches up, so
//! the WAL would grow without bound: when it passes [`WAL_RESET_PAGES`] the task raises a flag,
//! and the writer resets the WAL itself between two transactions (see `writer`), when only the
//! few frames written since the last passive checkpoint are left to copy. Doing the reset from
//! the writer avoids two connections waiting on each other's locks, whose busy-handler sleeps
//! showed up as latency spikes of 100 ms and more.
//!
//! Emits: `warn` when a checkpoint fails, `debug` per checkpoint.

use std::sync::Arc;
use std::sync::atomic::{AtomicBool, Ordering::Relaxed};
use std::time::Duration;

use sqlx::SqlitePool;
use tokio_util::sync::CancellationToken;

/// How often a passive checkpoint runs.
pub const CHECKPOINT_EVERY: Duration = Duration::from_millis(250);
/// WAL size (in 4 KiB pages) past which the writer is asked to reset it: 16 MiB.
pub const WAL_RESET_PAGES: i64 = 4096;

/// Runs passive checkpoints until `cancel` fires, setting `reset_wanted` when the WAL is large.
/// The final checkpoint happens when the pool closes.
pub async fn run(pool: SqlitePool, reset_wanted: Arc<AtomicBool>, cancel: CancellationToken) {
    let mut tick = tokio::time::interval(CHECKPOINT_EVERY);
    tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    loop {
        tokio::select! {
            _ = cancel.cancelled() => break,
            _ = tick.tick() => {}
        }
        match sqlx::query_as::<_, (i64, i64, i64)>("PRAGMA wal_checkpoint(PASSIVE)")
            .fetch_one(&pool)
            .await
        {
            Ok((busy, log, done)) => {
                tracing::debug!(busy, log, done, "checkpoint");
                if log > WAL_RESET_PAGES {
                    reset_wanted.store(true, Relaxed);
                }
            }
            Err(error) => tracing::warn!(%error, "checkpoint failed"),
        }
    }
}
