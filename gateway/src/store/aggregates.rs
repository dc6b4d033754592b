//! The `aggregates` table: the latest revision of every closed window. The writer stores what
//! the aggregator emits in the readings' transaction ([`upsert`]); on start the aggregator is
//! restored from this table and the recent readings ([`Store::restore_aggregator`]);
//! `gateway aggregates rebuild` recomputes windows from the readings ([`Store::rebuild`]).

use std::collections::BTreeMap;
use std::sync::OnceLock;

use serde::Serialize;
use sqlx::SqlStr;

use futures_util::StreamExt;

use super::outbox::KIND_AGG;
use super::query::ReadingsFilter;
use super::{Store, StoreError, now_ms, pow2_chunk, values_sql};
use crate::aggregate::outbox_message;
use crate::aggregate::window::{Aggregate, Aggregator, AggregatorConfig, Sample, Stats};

/// Most aggregates per INSERT (15 parameters each).
const MAX_ROWS: usize = 64;

fn upsert_sql(n: usize) -> SqlStr {
    static SQL: OnceLock<Vec<SqlStr>> = OnceLock::new();
    values_sql(
        &SQL,
        MAX_ROWS,
        "INSERT INTO aggregates (device, window_ms, start_ms, sensor, revision, count, min, max, \
         mean, stddev, last, last_ts, last_seq, last_idx, updated_ms)",
        "(?,?,?,?,?,?,?,?,?,?,?,?,?,?,?)",
        "ON CONFLICT (device, window_ms, start_ms, sensor) DO UPDATE SET \
         revision = excluded.revision, count = excluded.count, min = excluded.min, \
         max = excluded.max, mean = excluded.mean, stddev = excluded.stddev, \
         last = excluded.last, last_ts = excluded.last_ts, last_seq = excluded.last_seq, \
         last_idx = excluded.last_idx, updated_ms = excluded.updated_ms",
        n,
    )
}

fn outbox_sql(n: usize) -> SqlStr {
    static SQL: OnceLock<Vec<SqlStr>> = OnceLock::new();
    values_sql(
        &SQL,
        MAX_ROWS,
        "INSERT INTO outbox (kind, topic, payload, created_ms)",
        "(?,?,?,?)",
        "",
        n,
    )
}

/// Stores `aggs` (in order: a later revision of the same window wins) inside the caller's
/// transaction, and, with `to_outbox`, queues them for the broker. Returns the outbox rows and
/// payload bytes added.
///
/// # Errors
/// Driver errors.
pub async fn upsert(
    conn: &mut sqlx::SqliteConnection,
    aggs: &[Aggregate],
    to_outbox: bool,
) -> Result<(i64, i64), sqlx::Error> {
    let now = now_ms();
    let mut rest = aggs;
    while !rest.is_empty() {
        let n = pow2_chunk(rest.len(), MAX_ROWS);
        let (chunk, tail) = rest.split_at(n);
        let mut q = sqlx::query(upsert_sql(n));
        for a in chunk {
            let (ts, seq, idx) = a.stats.last_key;
            q = q
                .bind(i64::from(a.device))
                .bind(a.window_ms as i64)
                .bind(a.start_ms)
                .bind(i64::from(a.sensor))
                .bind(i64::from(a.revision))
                .bind(a.stats.count as i64)
                .bind(a.stats.min)
                .bind(a.stats.max)
                .bind(a.stats.mean)
                .bind(a.stats.stddev())
                .bind(a.stats.last)
                .bind(ts)
                .bind(seq as i64)
                .bind(i64::from(idx))
                .bind(now);
        }
        q.execute(&mut *conn).await?;
        rest = tail;
    }
    if !to_outbox {
        return Ok((0, 0));
    }
    let messages: Vec<(String, String)> = aggs.iter().map(outbox_message).collect();
    let bytes = messages.iter().map(|(_, p)| p.len() as i64).sum();
    let mut rest = &messages[..];
    while !rest.is_empty() {
        let n = pow2_chunk(rest.len(), MAX_ROWS);
        let (chunk, tail) = rest.split_at(n);
        let mut q = sqlx::query(outbox_sql(n));
        for (topic, payload) in chunk {
            q = q.bind(KIND_AGG).bind(topic).bind(payload).bind(now);
        }
        q.execute(&mut *conn).await?;
        rest = tail;
    }
    Ok((aggs.len() as i64, bytes))
}

type AggRow = (
    i64,
    i64,
    i64,
    i64,
    i64,
    i64,
    f64,
    f64,
    f64,
    f64,
    f64,
    i64,
    i64,
    i64,
);

fn from_row(r: AggRow) -> Aggregate {
    Aggregate {
        device: r.0 as u32,
        window_ms: r.1 as u64,
        start_ms: r.2,
        sensor: r.3 as u16,
        revision: r.4 as u32,
        stats: Stats::from_parts(
            r.5 as u64,
            r.6,
            r.7,
            r.8,
            r.9,
            (r.11, r.12 as u64, r.13 as u16),
            r.10,
        ),
    }
}

const AGG_COLUMNS: &str = "device, window_ms, start_ms, sensor, revision, count, min, max, mean, \
                           stddev, last, last_ts, last_seq, last_idx";

/// What `gateway aggregates rebuild` found.
#[derive(Debug, Default, Clone, Serialize)]
pub struct RebuildReport {
    /// Windows recomputed from the readings (closed by their device's watermark, or stored).
    pub recomputed: u64,
    /// Stored windows equal to the recomputation (to 1e-9 relative for mean and deviation).
    pub identical: u64,
    /// Stored windows that differ from it.
    pub differing: u64,
    /// Closed windows with readings but no stored aggregate.
    pub missing: u64,
    /// Stored windows with no readings left.
    pub without_readings: u64,
    /// Windows written (with `--write`): corrected with the next revision, or added.
    pub written: u64,
}

/// Whether two aggregates of the same window agree: exact for count, min, max and last;
/// to 1e-9 relative for mean and standard deviation, which depend on the order in which the
/// readings were added.
pub fn same_stats(a: &Stats, b: &Stats) -> bool {
    let close = |x: f64, y: f64| (x - y).abs() <= 1e-9 * x.abs().max(y.abs()).max(1.0);
    (a.count, a.min, a.max, a.last_key, a.last) == (b.count, b.min, b.max, b.last_key, b.last)
        && close(a.mean, b.mean)
        && close(a.stddev(), b.stddev())
}

impl Store {
    /// Stores aggregates in one transaction (and queues them for the broker with
    /// `to_outbox`), outside the writer: rebuilds and benchmarks.
    ///
    /// # Errors
    /// Driver errors.
    pub async fn store_aggregates(
        &self,
        aggs: &[Aggregate],
        to_outbox: bool,
    ) -> Result<(), StoreError> {
        let mut tx = self.pool().begin().await?;
        let (rows, bytes) = upsert(&mut tx, aggs, to_outbox).await?;
        tx.commit().await?;
        self.outbox().changed(rows, bytes);
        Ok(())
    }

    async fn device_watermark(&self, device: i64) -> Result<Option<i64>, StoreError> {
        // The newest blocks by ts_min hold the latest timestamp: no block spans more than
        // BLOCK_SPAN_MS, so only those within that span of the newest need to be looked at.
        // Blocks not yet merged are in staging (small; scanned).
        let (wm,): (Option<i64>,) = sqlx::query_as(
            "SELECT max(m) FROM ( \
               SELECT max(ts_max) AS m FROM blocks WHERE device = ?1 AND ts_min >= \
                 (SELECT max(ts_min) FROM blocks WHERE device = ?1) - ?2 \
               UNION ALL SELECT max(ts_max) FROM staging WHERE device = ?1)",
        )
        .bind(device)
        .bind(super::block::BLOCK_SPAN_MS)
        .fetch_one(self.pool())
        .await?;
        Ok(wm)
    }

    async fn device_samples(&self, device: i64, from_ts: i64) -> Result<Vec<Sample>, StoreError> {
        let filter = ReadingsFilter {
            device: Some(device as u32),
            from_ms: Some(from_ts),
            ..Default::default()
        };
        let mut out = Vec::new();
        let mut rows = std::pin::pin!(self.readings(&filter));
        while let Some(r) = rows.next().await {
            let r = r?;
            if let Some(value) = r.value {
                out.push(Sample {
                    device: r.device,
                    sensor: r.sensor,
                    ts: r.ts_ms,
                    seq: r.seq,
                    idx: r.idx as u16,
                    value,
                });
            }
        }
        Ok(out)
    }

    async fn stored_aggregates(
        &self,
        device: i64,
        ends_after: i64,
    ) -> Result<Vec<Aggregate>, StoreError> {
        let rows: Vec<AggRow> = sqlx::query_as(sqlx::AssertSqlSafe(format!(
            "SELECT {AGG_COLUMNS} FROM aggregates WHERE device = ? AND start_ms + window_ms > ?"
        )))
        .bind(device)
        .bind(ends_after)
        .fetch_all(self.pool())
        .await?;
        Ok(rows.into_iter().map(from_row).collect())
    }

    /// Restores the aggregator after a start: for every device with readings, its watermark,
    /// the closed windows still kept for revisions, and the readings of windows that were open
    /// when the gateway stopped. Returns the readings replayed.
    ///
    /// # Errors
    /// Driver errors.
    pub async fn restore_aggregator(
        &self,
        agg: &mut Aggregator,
        devices: &[u32],
        now_ms: u64,
    ) -> Result<u64, StoreError> {
        let cfg = agg.config().clone();
        let longest = cfg.windows_ms.iter().copied().max().unwrap_or(0) as i64;
        let mut replayed = 0;
        for &d in devices {
            let id = i64::from(d);
            let Some(wm) = self.device_watermark(id).await? else {
                continue;
            };
            let keep_from = wm.saturating_sub(cfg.keep_closed_ms as i64);
            let closed = self.stored_aggregates(id, keep_from).await?;
            agg.restore(d, wm, &closed, now_ms);
            let from = wm
                .saturating_sub(longest)
                .saturating_sub(cfg.lateness_ms as i64);
            for s in self.device_samples(id, from).await? {
                agg.replay(s);
                replayed += 1;
            }
        }
        Ok(replayed)
    }

    /// Recomputes every window starting at or after `since_ms` from the stored readings and
    /// compares it with the stored aggregate. With `write`, differing windows are stored as the
    /// next revision and missing ones added (and queued for the broker with `to_outbox`).
    /// `progress` is called after each device.
    ///
    /// # Errors
    /// Driver errors.
    pub async fn rebuild(
        &self,
        cfg: &AggregatorConfig,
        since_ms: i64,
        write: bool,
        to_outbox: bool,
        mut progress: impl FnMut(usize, usize, &RebuildReport),
    ) -> Result<RebuildReport, StoreError> {
        let devices: Vec<(i64,)> = sqlx::query_as("SELECT id FROM devices ORDER BY id")
            .fetch_all(self.pool())
            .await?;
        let mut report = RebuildReport::default();
        let total = devices.len();
        for (i, (id,)) in devices.into_iter().enumerate() {
            let Some(wm) = self.device_watermark(id).await? else {
                progress(i + 1, total, &report);
                continue;
            };
            let mut agg = Aggregator::new(cfg.clone());
            let mut out = Vec::new();
            for s in self.device_samples(id, since_ms).await? {
                agg.push(s, 0, &mut out);
            }
            out.clear();
            agg.flush(&mut out);
            let computed: BTreeMap<(u64, i64, u16), Aggregate> = out
                .into_iter()
                .filter(|a| a.start_ms >= since_ms)
                .map(|a| ((a.window_ms, a.start_ms, a.sensor), a))
                .collect();
            let stored: BTreeMap<(u64, i64, u16), Aggregate> = self
                .stored_aggregates(id, i64::MIN)
                .await?
                .into_iter()
                .filter(|a| a.start_ms >= since_ms)
                .map(|a| ((a.window_ms, a.start_ms, a.sensor), a))
                .collect();
            let mut to_write = Vec::new();
            for (key, c) in &computed {
                let closed = c
                    .start_ms
                    .saturating_add(c.window_ms as i64)
                    .saturating_add(cfg.lateness_ms as i64)
                    <= wm;
                match stored.get(key) {
                    Some(s) => {
                        report.recomputed += 1;
                        if same_stats(&s.stats, &c.stats) {
                            report.identical += 1;
                        } else {
                            report.differing += 1;
                            to_write.push(Aggregate {
                                revision: s.revision + 1,
                                ..c.clone()
                            });
                        }
                    }
                    None if closed => {
                        report.recomputed += 1;
                        report.missing += 1;
                        to_write.push(c.clone());
                    }
                    // Still open: the running gateway emits it when it closes.
                    None => {}
                }
            }
            report.without_readings +=
                stored.keys().filter(|k| !computed.contains_key(k)).count() as u64;
            if write && !to_write.is_empty() {
                self.store_aggregates(&to_write, to_outbox).await?;
                report.written += to_write.len() as u64;
            }
            progress(i + 1, total, &report);
        }
        Ok(report)
    }
}
