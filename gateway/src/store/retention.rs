//! Retention: deletes raw readings and aggregate windows past their age, and the oldest data
//! when the database is past its size cap; freed pages are reused by later writes (the file
//! stops growing), `gateway db vacuum` gives them back to the filesystem.
//!
//! Every delete is one statement over at most `batch` rows located through a primary key
//! range (device first, then time), so it is a short write transaction. The writer parks
//! between two commits while one runs ([`super::WriteTurn`]: a busy writer would otherwise
//! starve it), and the pruner then pauses nine times as long as the statement took, so the
//! writer keeps at least nine tenths of its time. A window still waiting in the outbox (updated at or after the oldest unsent outbox
//! row) is never deleted: the outbox has its own bounds.

use std::time::Duration;

use serde::Serialize;

use super::block::BLOCK_SPAN_MS;
use super::outbox::KIND_AGG;
use super::{Store, StoreError};

/// What to enforce, in milliseconds and bytes.
#[derive(Debug, Clone, Default)]
pub struct Policy {
    /// Keep raw readings this long.
    pub readings_ms: Option<i64>,
    /// Per window length (ms): keep its windows this long.
    pub aggregates_ms: Vec<(i64, Option<i64>)>,
    /// Largest database, bytes of pages in use.
    pub max_bytes: Option<u64>,
    /// Bytes the database may grow by before the next run (twice the most it rose by between
    /// recent runs): the cap is enforced that much lower, so the file, which keeps its
    /// largest size, stays under the cap until the next run.
    pub headroom: u64,
    /// Rows per delete statement.
    pub batch: u32,
    /// Longest a run works towards the size cap before it reports and lets the next run go on
    /// (None: until done).
    pub cap_budget: Option<Duration>,
    /// Where each delete statement counts what it deleted, as soon as it commits (a run cut
    /// short by an error or a shutdown still counts what it did).
    pub counters: Option<std::sync::Arc<crate::events::Counters>>,
}

impl Policy {
    /// The policy of the configuration.
    pub fn from_config(cfg: &crate::config::Config) -> Self {
        let ms = |d: Duration| i64::try_from(d.as_millis()).unwrap_or(i64::MAX);
        let r = &cfg.retention;
        Policy {
            readings_ms: r.readings.map(ms),
            aggregates_ms: cfg
                .aggregate
                .windows
                .iter()
                .map(|w| (ms(*w), r.keep_aggregates(*w).map(ms)))
                .collect(),
            max_bytes: r.max_db_size.map(|b| b.0),
            headroom: 0,
            batch: r.batch.max(1),
            cap_budget: Some(r.interval.max(Duration::from_secs(5))),
            counters: None,
        }
    }

    /// Counts one committed delete statement.
    fn deleted(&self, readings: u64, aggregates: u64) {
        use std::sync::atomic::Ordering::Relaxed;
        if let Some(c) = &self.counters {
            c.retention_readings_deleted.fetch_add(readings, Relaxed);
            c.retention_aggregates_deleted
                .fetch_add(aggregates, Relaxed);
        }
    }
}

/// What one enforcement did.
#[derive(Debug, Clone, Default, Serialize, PartialEq, Eq)]
pub struct PruneReport {
    /// Raw readings deleted.
    pub readings: u64,
    /// Rows of the blocks and staging tables deleted.
    pub blocks: u64,
    /// Aggregate windows deleted.
    pub aggregates: u64,
    /// Windows kept only because they are still in the outbox.
    pub kept_unsent: u64,
    /// Pages given back to the filesystem.
    pub pages_freed: u64,
    /// Bytes of pages in use before and after.
    pub used_before: u64,
    /// Bytes of pages in use after.
    pub used_after: u64,
    /// Size of the database (pages in use and free) before and after: it only grows when the
    /// pages in use pass it, so a rise marks a new peak.
    pub size_before: u64,
    /// Size of the database after.
    pub size_after: u64,
    /// Whether the size cap could not be met with what may be deleted.
    pub cap_unmet: bool,
}

/// Sizes and ranges, for `gateway db status`.
#[derive(Debug, Clone, Serialize)]
pub struct DbStatus {
    /// Bytes of the database file (without its WAL).
    pub file_bytes: u64,
    /// Bytes of pages in use.
    pub used_bytes: u64,
    /// Bytes of free pages (given back by an incremental vacuum).
    pub free_bytes: u64,
    /// Bytes of the write-ahead log.
    pub wal_bytes: u64,
    /// `none`, `full` or `incremental`.
    pub auto_vacuum: String,
    /// Readings stored (in merged blocks and staging).
    pub readings: i64,
    /// Earliest and latest reading timestamp, ms (device clock).
    pub readings_from_ms: Option<i64>,
    /// Latest reading timestamp, ms.
    pub readings_to_ms: Option<i64>,
    /// Per window length: (window_ms, windows, earliest start, latest start).
    pub aggregates: Vec<(i64, i64, Option<i64>, Option<i64>)>,
    /// Rows waiting in the outbox.
    pub outbox_rows: i64,
}

impl Store {
    /// Bytes of pages in use and in the file.
    pub async fn db_size(&self) -> Result<(u64, u64), StoreError> {
        let (pages, free, size): (i64, i64, i64) = sqlx::query_as(
            "SELECT (SELECT page_count FROM pragma_page_count), \
             (SELECT freelist_count FROM pragma_freelist_count), \
             (SELECT page_size FROM pragma_page_size)",
        )
        .fetch_one(self.pool())
        .await?;
        let used = (pages - free).max(0) as u64 * size as u64;
        Ok((used, pages.max(0) as u64 * size as u64))
    }

    /// Deletes, for every device, the blocks whose readings are all before `cutoff`. Returns
    /// (readings, blocks).
    async fn prune_blocks_before(
        &self,
        devices: &[i64],
        cutoff: i64,
        policy: &Policy,
    ) -> Result<(u64, u64), StoreError> {
        let batch = policy.batch;
        let (mut readings, mut blocks) = (0u64, 0u64);
        for &device in devices {
            loop {
                // A read first (no lock, an index seek): most devices have nothing to delete,
                // and a turn costs the writer a pause.
                let any: Option<i64> = sqlx::query_scalar(
                    "SELECT 1 FROM blocks WHERE device = ? AND ts_min < ? AND ts_max < ? LIMIT 1",
                )
                .bind(device)
                .bind(cutoff)
                .bind(cutoff)
                .fetch_optional(self.pool())
                .await?;
                if any.is_none() {
                    break;
                }
                let (counts, took) = self
                    .turn()
                    .take(
                        sqlx::query_scalar(
                            "DELETE FROM blocks WHERE (device, ts_min, seq, idx) IN \
                             (SELECT device, ts_min, seq, idx FROM blocks \
                              WHERE device = ? AND ts_min < ? AND ts_max < ? LIMIT ?) \
                             RETURNING count",
                        )
                        .bind(device)
                        .bind(cutoff)
                        .bind(cutoff)
                        .bind(i64::from(batch))
                        .fetch_all(self.pool()),
                    )
                    .await;
                let counts: Vec<i64> = counts?;
                let n = counts.iter().map(|c| *c as u64).sum::<u64>();
                policy.deleted(n, 0);
                blocks += counts.len() as u64;
                readings += n;
                let full = counts.len() as u32 == batch;
                pace(took).await;
                if !full {
                    break;
                }
            }
        }
        Ok((readings, blocks))
    }

    /// Deletes staged rows (written, not yet merged into blocks) whose readings are all before
    /// `cutoff` (`None`: the oldest staged rows, one batch). Staging is in insertion order, so
    /// its oldest rows are its first. Returns (readings, rows).
    async fn prune_staging(
        &self,
        cutoff: Option<i64>,
        policy: &Policy,
    ) -> Result<(u64, u64), StoreError> {
        let batch = policy.batch;
        let (mut readings, mut rows) = (0u64, 0u64);
        loop {
            let q = match cutoff {
                // Rows a merge in progress has already copied into blocks are left to the
                // merge (their copies are pruned as blocks), so nothing is counted twice.
                Some(c) => sqlx::query_scalar(
                    "DELETE FROM staging WHERE rowid IN (SELECT s.rowid FROM staging s, \
                     staging_merge m WHERE s.ts_max < ? \
                     AND NOT (s.rowid <= m.hi AND s.device < m.upto) LIMIT ?) RETURNING count",
                )
                .bind(c),
                None => sqlx::query_scalar(
                    "DELETE FROM staging WHERE rowid IN (SELECT s.rowid FROM staging s, \
                     staging_merge m WHERE NOT (s.rowid <= m.hi AND s.device < m.upto) \
                     ORDER BY s.rowid LIMIT ?) RETURNING count",
                ),
            };
            let (counts, took) = self
                .turn()
                .take(q.bind(i64::from(batch)).fetch_all(self.pool()))
                .await;
            let counts: Vec<i64> = counts?;
            let n = counts.iter().map(|c| *c as u64).sum::<u64>();
            policy.deleted(n, 0);
            rows += counts.len() as u64;
            readings += n;
            let full = counts.len() as u32 == batch;
            pace(took).await;
            if !full || cutoff.is_none() {
                return Ok((readings, rows));
            }
        }
    }

    /// The update time before which every window has left the outbox (None: nothing waits).
    async fn oldest_unsent_ms(&self) -> Result<Option<i64>, StoreError> {
        Ok(
            sqlx::query_scalar("SELECT min(created_ms) FROM outbox WHERE kind = ?")
                .bind(KIND_AGG)
                .fetch_one(self.pool())
                .await?,
        )
    }

    /// Deletes the windows of length `window_ms` that start before `cutoff` and have been sent.
    /// Returns (deleted, kept because unsent).
    async fn prune_windows_before(
        &self,
        devices: &[i64],
        window_ms: i64,
        cutoff: i64,
        policy: &Policy,
    ) -> Result<(u64, u64), StoreError> {
        let batch = policy.batch;
        let guard = self.oldest_unsent_ms().await?.unwrap_or(i64::MAX);
        let (mut deleted, mut kept) = (0u64, 0u64);
        for &device in devices {
            loop {
                let any: Option<i64> = sqlx::query_scalar(
                    "SELECT 1 FROM aggregates WHERE device = ? AND window_ms = ? AND start_ms < ? \
                     AND updated_ms < ? LIMIT 1",
                )
                .bind(device)
                .bind(window_ms)
                .bind(cutoff)
                .bind(guard)
                .fetch_optional(self.pool())
                .await?;
                if any.is_none() {
                    break;
                }
                let (n, took) = self
                    .turn()
                    .take(
                        sqlx::query(
                            "DELETE FROM aggregates WHERE (device, window_ms, start_ms, sensor) \
                             IN (SELECT device, window_ms, start_ms, sensor FROM aggregates \
                             WHERE device = ? AND window_ms = ? AND start_ms < ? \
                             AND updated_ms < ? LIMIT ?)",
                        )
                        .bind(device)
                        .bind(window_ms)
                        .bind(cutoff)
                        .bind(guard)
                        .bind(i64::from(batch))
                        .execute(self.pool()),
                    )
                    .await;
                let n = n?.rows_affected();
                policy.deleted(0, n);
                deleted += n;
                pace(took).await;
                if n < u64::from(batch) {
                    break;
                }
            }
            if guard != i64::MAX {
                let (k,): (i64,) = sqlx::query_as(
                    "SELECT count(*) FROM aggregates WHERE device = ? AND window_ms = ? \
                     AND start_ms < ? AND updated_ms >= ?",
                )
                .bind(device)
                .bind(window_ms)
                .bind(cutoff)
                .bind(guard)
                .fetch_one(self.pool())
                .await?;
                kept += k as u64;
            }
        }
        Ok((deleted, kept))
    }

    /// Gives free pages back to the filesystem, a few megabytes per statement, in a database
    /// whose `auto_vacuum` is INCREMENTAL (the gateway does not create those: see `open`);
    /// elsewhere it does nothing and freed pages are reused.
    pub async fn incremental_vacuum(&self) -> Result<u64, StoreError> {
        let mut freed = 0u64;
        loop {
            let before: i64 =
                sqlx::query_scalar("SELECT freelist_count FROM pragma_freelist_count")
                    .fetch_one(self.pool())
                    .await?;
            if before == 0 {
                return Ok(freed);
            }
            // A pragma argument cannot be bound; this is a constant.
            let (done, took) = self
                .turn()
                .take(sqlx::query("PRAGMA incremental_vacuum(2048)").execute(self.pool()))
                .await;
            done?;
            let after: i64 = sqlx::query_scalar("SELECT freelist_count FROM pragma_freelist_count")
                .fetch_one(self.pool())
                .await?;
            pace(took).await;
            if after >= before {
                // Not in incremental mode: nothing to give back this way.
                return Ok(freed);
            }
            freed += (before - after) as u64;
        }
    }

    /// Enforces `policy` once at gateway time `now_ms`.
    ///
    /// # Errors
    /// Database errors (what was deleted before stays deleted).
    pub async fn prune(&self, policy: &Policy, now_ms: i64) -> Result<PruneReport, StoreError> {
        let mut r = PruneReport::default();
        // Every device, revoked ones included: their readings age like any other.
        let devices: Vec<i64> = sqlx::query_scalar("SELECT id FROM devices ORDER BY id")
            .fetch_all(self.pool())
            .await?;
        (r.used_before, r.size_before) = self.db_size().await?;
        if let Some(keep) = policy.readings_ms {
            let cutoff = now_ms.saturating_sub(keep);
            let (n, b) = self.prune_blocks_before(&devices, cutoff, policy).await?;
            let (sn, sb) = self.prune_staging(Some(cutoff), policy).await?;
            r.readings += n + sn;
            r.blocks += b + sb;
        }
        for &(window, keep) in &policy.aggregates_ms {
            if let Some(keep) = keep {
                let (n, k) = self
                    .prune_windows_before(&devices, window, now_ms.saturating_sub(keep), policy)
                    .await?;
                r.aggregates += n;
                r.kept_unsent += k;
            }
        }
        if let Some(cap) = policy.max_bytes {
            self.enforce_cap(&devices, now_ms, cap, policy, &mut r)
                .await?;
        }
        r.pages_freed += self.incremental_vacuum().await?;
        (r.used_after, r.size_after) = self.db_size().await?;
        Ok(r)
    }

    /// Deletes the oldest readings, then the oldest sent windows, until the pages in use are at
    /// 90 % of a line under `cap`: the cap less the headroom and an eighth (never below half).
    async fn enforce_cap(
        &self,
        devices: &[i64],
        now_ms: i64,
        cap: u64,
        policy: &Policy,
        r: &mut PruneReport,
    ) -> Result<(), StoreError> {
        // An eighth of the cap on top of the headroom, for rises larger than any seen lately.
        let limit = cap
            .saturating_sub(policy.headroom)
            .saturating_sub(cap / 8)
            .max(cap / 2);
        if self.db_size().await?.0 <= limit {
            return Ok(());
        }
        let target = limit / 10 * 9;
        let deadline = policy.cap_budget.map(|b| tokio::time::Instant::now() + b);
        while self.db_size().await?.0 > target {
            if deadline.is_some_and(|d| tokio::time::Instant::now() >= d) {
                // Ingest outpaces what retention may delete in its share of the writer's
                // time: report, and go on at the next run.
                r.cap_unmet = true;
                tracing::warn!(
                    cap,
                    "database above retention.max_db_size: ingest outpaces retention's share \
                     of write time; continuing at the next run"
                );
                return Ok(());
            }
            // The oldest reading of any device (an index seek each), then a step of a twentieth
            // of the time up to now (at least one block span) past it. Measured against the
            // gateway's clock, not the newest reading: a device whose clock runs years ahead
            // must not make one step swallow everything.
            let mut oldest: Option<i64> = None;
            for &d in devices {
                let lo: Option<i64> =
                    sqlx::query_scalar("SELECT min(ts_min) FROM blocks WHERE device = ?")
                        .bind(d)
                        .fetch_one(self.pool())
                        .await?;
                if let Some(lo) = lo {
                    oldest = Some(oldest.map_or(lo, |o| o.min(lo)));
                }
            }
            if let Some(lo) = oldest {
                let step = (now_ms.saturating_sub(lo) / 20).max(BLOCK_SPAN_MS);
                let cutoff = lo.saturating_add(step).saturating_add(BLOCK_SPAN_MS);
                let (n, b) = self.prune_blocks_before(devices, cutoff, policy).await?;
                r.readings += n;
                r.blocks += b;
                if b > 0 {
                    continue;
                }
            }
            // Under heavy load most readings may still be staged (not merged into blocks yet):
            // the oldest staged rows next.
            let (n, b) = self.prune_staging(None, policy).await?;
            r.readings += n;
            r.blocks += b;
            if b > 0 {
                continue;
            }
            // No readings left to delete: the oldest sent windows, tier by tier.
            let mut any = false;
            for &(window, _) in &policy.aggregates_ms {
                let lo: Option<i64> =
                    sqlx::query_scalar("SELECT min(start_ms) FROM aggregates WHERE window_ms = ?")
                        .bind(window)
                        .fetch_one(self.pool())
                        .await?;
                if let Some(lo) = lo {
                    let cutoff = lo + window.max(1) * 100;
                    let (n, k) = self
                        .prune_windows_before(devices, window, cutoff, policy)
                        .await?;
                    r.aggregates += n;
                    r.kept_unsent = r.kept_unsent.max(k);
                    any |= n > 0;
                }
            }
            if !any {
                r.cap_unmet = true;
                tracing::warn!(
                    cap,
                    "database above retention.max_db_size with nothing more that may be deleted \
                     (what is left is unsent or not covered by the policy)"
                );
                return Ok(());
            }
        }
        Ok(())
    }

    /// Sizes and ranges of what is stored.
    ///
    /// # Errors
    /// Database errors.
    pub async fn db_status(&self, db_path: &std::path::Path) -> Result<DbStatus, StoreError> {
        let (used, file) = self.db_size().await?;
        let mode: i64 = sqlx::query_scalar("SELECT auto_vacuum FROM pragma_auto_vacuum")
            .fetch_one(self.pool())
            .await?;
        let (readings, lo, hi): (Option<i64>, Option<i64>, Option<i64>) = sqlx::query_as(
            "SELECT sum(c), min(lo), max(hi) FROM (\
             SELECT sum(count) AS c, min(ts_min) AS lo, max(ts_max) AS hi FROM blocks UNION ALL \
             SELECT sum(count), min(ts_min), max(ts_max) FROM staging s, staging_merge m \
             WHERE NOT (s.rowid <= m.hi AND s.device < m.upto))",
        )
        .fetch_one(self.pool())
        .await?;
        let aggregates = sqlx::query_as(
            "SELECT window_ms, count(*), min(start_ms), max(start_ms) FROM aggregates \
             GROUP BY window_ms ORDER BY window_ms",
        )
        .fetch_all(self.pool())
        .await?;
        let outbox_rows: i64 = sqlx::query_scalar("SELECT count(*) FROM outbox")
            .fetch_one(self.pool())
            .await?;
        let mut wal = db_path.as_os_str().to_owned();
        wal.push("-wal");
        Ok(DbStatus {
            file_bytes: file,
            used_bytes: used,
            free_bytes: file.saturating_sub(used),
            wal_bytes: std::fs::metadata(&wal).map(|m| m.len()).unwrap_or(0),
            auto_vacuum: match mode {
                1 => "full",
                2 => "incremental",
                _ => "none",
            }
            .into(),
            readings: readings.unwrap_or(0),
            readings_from_ms: lo,
            readings_to_ms: hi,
            aggregates,
            outbox_rows,
        })
    }

    /// Rewrites the whole database, giving its free pages back to the filesystem; returns
    /// (bytes before, bytes after). Needs as much free disk as the database and an exclusive
    /// lock: run it with the gateway stopped.
    ///
    /// # Errors
    /// Database errors, among them a busy database.
    pub async fn vacuum_full(&self) -> Result<(u64, u64), StoreError> {
        let before = self.db_size().await?.1;
        sqlx::query("VACUUM").execute(self.pool()).await?;
        Ok((before, self.db_size().await?.1))
    }
}

/// Waits nine times as long as a statement ran (at least 1 ms, at most 2 s): the writer,
/// which parks for each statement, keeps at least nine tenths of its time.
async fn pace(took: Duration) {
    tokio::time::sleep((took * 9).clamp(Duration::from_millis(1), Duration::from_secs(2))).await;
}

/// Rises of the database the size cap's headroom is taken from.
const RISES_KEPT: usize = 16;

/// How far under its size cap retention works: twice the largest rise of the pages in use over
/// the last runs (pure: the pruner feeds it sizes). The database file keeps its largest size,
/// so the cap has to hold the peak of the pages in use, not their level at a run. A rise is
/// measured from where a run left the pages in use to where they are at the next run, or to
/// the database's size when that grew meanwhile or during a run: the size only grows when the
/// pages in use pass it, so a grown size is the exact peak (a merge of staged readings copies
/// before it frees, a transient no run would see).
#[derive(Debug, Default)]
struct Headroom {
    /// Pages in use and size after the last run, bytes.
    last: Option<(u64, u64)>,
    rises: std::collections::VecDeque<u64>,
}

impl Headroom {
    fn record(&mut self, rise: u64) {
        if self.rises.len() == RISES_KEPT {
            self.rises.pop_front();
        }
        self.rises.push_back(rise);
    }

    /// Pages in use and size just before a run: records the rise since the last run and
    /// returns the headroom for this one.
    fn before_run(&mut self, used: u64, size: u64) -> u64 {
        if let Some((last_used, last_size)) = self.last {
            let peak = if size > last_size {
                size.max(used)
            } else {
                used
            };
            self.record(peak.saturating_sub(last_used));
        }
        self.rises.iter().max().map_or(0, |m| m.saturating_mul(2))
    }

    /// What a run found and left: a database that grew during the run peaked at its new size.
    fn after_run(&mut self, r: &PruneReport) {
        if r.size_after > r.size_before {
            self.record(r.size_after.saturating_sub(r.used_before));
        }
        self.last = Some((r.used_after, r.size_after));
    }
}

/// Runs the policy every interval until `cancel` fires, counting what it does; takes new
/// settings from `settings` (SIGHUP) and idles while they enforce nothing.
pub async fn run(
    store: Store,
    mut settings: tokio::sync::watch::Receiver<crate::reload::RetentionSettings>,
    counters: std::sync::Arc<crate::events::Counters>,
    cancel: tokio_util::sync::CancellationToken,
) {
    use std::sync::atomic::Ordering::Relaxed;
    let mut closed = false;
    // Kept across reloads: the database's growth does not depend on the settings.
    let mut headroom = Headroom::default();
    loop {
        let current = settings.borrow_and_update().clone();
        let mut policy = current.policy;
        // Deletions are counted per statement, so a run cut short still counts what it did.
        policy.counters = Some(counters.clone());
        let mut tick = tokio::time::interval(current.interval);
        tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
        loop {
            tokio::select! {
                _ = cancel.cancelled() => return,
                changed = settings.changed(), if !closed => {
                    if changed.is_err() {
                        // Nobody can change the settings any more: keep these.
                        closed = true;
                        continue;
                    }
                    break;
                }
                _ = tick.tick(), if current.active => {}
            }
            // The rise since the last run counts for this one already (and a reload, which
            // rebuilt `policy`, keeps what was learnt).
            match store.db_size().await {
                Ok((used, size)) => policy.headroom = headroom.before_run(used, size),
                Err(error) => tracing::warn!(%error, "retention could not read the database size"),
            }
            let pruned = tokio::select! {
                _ = cancel.cancelled() => return,
                r = store.prune(&policy, super::now_ms()) => r,
            };
            match pruned {
                Ok(r) => {
                    headroom.after_run(&r);
                    counters.retention_runs.fetch_add(1, Relaxed);
                    counters.db_used_bytes.store(r.used_after, Relaxed);
                    if r.readings + r.aggregates > 0 {
                        tracing::info!(
                            readings = r.readings,
                            aggregates = r.aggregates,
                            kept_unsent = r.kept_unsent,
                            pages_freed = r.pages_freed,
                            used_bytes = r.used_after,
                            "retention pruned"
                        );
                    }
                }
                Err(error) => {
                    tracing::warn!(%error, "retention failed; retried at the next interval")
                }
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::store::OpenOptions;
    use crate::store::block;
    use proto::{Millis, Reading, SensorId};
    use std::sync::Arc;
    use std::sync::atomic::Ordering::Relaxed;

    /// Stages one datagram of `n` readings, all at `ts`.
    async fn stage(s: &Store, device: u32, seq: u64, ts: u64, n: u16) {
        let rs: Vec<Reading> = (0..n)
            .map(|i| Reading {
                sensor: SensorId(i),
                ts: Millis(ts),
                value: f64::from(i),
            })
            .collect();
        let (mut buf, mut rows) = (Vec::new(), Vec::new());
        block::encode(device, seq, &rs, &mut buf, &mut rows);
        for b in rows {
            sqlx::query(
                "INSERT INTO staging (device, ts_min, seq, idx, ts_max, count, data) \
                 VALUES (?, ?, ?, ?, ?, ?, ?)",
            )
            .bind(b.device)
            .bind(b.ts_min)
            .bind(b.seq)
            .bind(b.idx)
            .bind(b.ts_max)
            .bind(b.count)
            .bind(&buf[b.data])
            .execute(s.pool())
            .await
            .expect("stage");
        }
    }

    /// Stages ten datagrams of three readings per device (0-5), a second apart from `t0`.
    async fn stage_round(s: &Store, seq: &mut u64, t0: u64) -> u64 {
        for d in 0..6u32 {
            for k in 0..10u64 {
                *seq += 1;
                stage(s, d, *seq, t0 + k * 1_000, 3).await;
            }
        }
        6 * 10 * 3
    }

    /// Readings a query would see (blocks, and staged rows no merge has copied yet).
    async fn visible(s: &Store, path: &std::path::Path) -> u64 {
        s.db_status(path).await.expect("status").readings as u64
    }

    /// Interleaves the writer's merge steps with prunes at a moving cutoff: every reading is
    /// either still visible or counted as deleted, once, whatever step the merge is at.
    #[test]
    fn the_headroom_is_twice_the_largest_recent_rise_peaks_included() {
        let mut h = Headroom::default();
        let run = |used_before, size_before, used_after, size_after| PruneReport {
            used_before,
            size_before,
            used_after,
            size_after,
            ..PruneReport::default()
        };
        // Nothing known before the first run.
        assert_eq!(h.before_run(100, 120), 0);
        h.after_run(&run(100, 120, 90, 120));
        // Rose from 90 to 110, the size unchanged: a rise of 20.
        assert_eq!(h.before_run(110, 120), 40);
        h.after_run(&run(110, 120, 90, 120));
        // In use only 100 now, but the size grew to 170 meanwhile: the peak was 170, a rise of 80.
        assert_eq!(h.before_run(100, 170), 160);
        h.after_run(&run(100, 170, 95, 170));
        // Growth during a run counts too: from 100 at its start to a size of 260.
        assert_eq!(h.before_run(100, 170), 160);
        h.after_run(&run(100, 170, 90, 260));
        assert_eq!(h.before_run(95, 260), 320);
        // Sixteen quiet runs later the big rises are forgotten.
        for _ in 0..RISES_KEPT {
            h.after_run(&run(95, 260, 90, 260));
            h.before_run(95, 260);
        }
        assert_eq!(h.before_run(95, 260), 10);
    }

    #[tokio::test]
    async fn every_deletion_is_counted_once_while_a_merge_runs() {
        let dir = tempfile::tempdir().expect("tempdir");
        let path = dir.path().join("r.db");
        let s = Store::open(&OpenOptions::cli(&path, true))
            .await
            .expect("open");
        for d in 0..6i64 {
            sqlx::query(
                "INSERT INTO devices (id, name, key, created_ms, revoked_ms) VALUES (?, ?, ?, 0, ?)",
            )
            .bind(d)
            .bind(format!("d{d}"))
            .bind(vec![0u8; 32])
            .bind(if d == 5 { Some(1i64) } else { None })
            .execute(s.pool())
            .await
            .expect("device");
        }
        let counters = Arc::new(crate::events::Counters::default());
        let policy = Policy {
            readings_ms: Some(10_000),
            batch: 7,
            counters: Some(counters.clone()),
            ..Policy::default()
        };
        let mut sent = 0u64;
        let mut seq = 0u64;
        sent += stage_round(&s, &mut seq, 0).await;
        let mut now = 5_000i64;
        let check = async |s: &Store, now: i64| {
            let r = s.prune(&policy, now).await.expect("prune");
            let counted = counters.retention_readings_deleted.load(Relaxed);
            (r, counted)
        };
        let mut conn = s.pool().acquire().await.expect("conn");
        let (_, hi) = block::staged(&mut conn).await.expect("staged");
        // A merge cycle, a prune between every step, with new rows staged mid-cycle.
        let bounds = [i64::MIN, 2, 4, i64::MAX];
        for w in bounds.windows(2) {
            block::copy_step(&mut conn, hi, w[0], w[1])
                .await
                .expect("copy");
            now += 2_500;
            let (_, counted) = check(&s, now).await;
            assert_eq!(counted + visible(&s, &path).await, sent, "after copy {w:?}");
        }
        sent += stage_round(&s, &mut seq, 10_000).await;
        loop {
            let (_, finished) = block::delete_step(&mut conn, hi, 11).await.expect("delete");
            now += 1_000;
            let (_, counted) = check(&s, now).await;
            assert_eq!(counted + visible(&s, &path).await, sent, "during deletes");
            if finished {
                break;
            }
        }
        drop(conn);
        sent += stage_round(&s, &mut seq, 20_000).await;
        s.merge_staging().await.expect("merge");
        let (r, counted) = check(&s, 100_000).await;
        assert!(r.readings > 0);
        assert_eq!(visible(&s, &path).await, 0, "everything aged out");
        assert_eq!(counted, sent, "every reading counted once");
        // The revoked device's readings aged out too.
        let left: i64 = sqlx::query_scalar("SELECT count(*) FROM blocks WHERE device = 5")
            .fetch_one(s.pool())
            .await
            .expect("count");
        assert_eq!(left, 0);
    }
}
