//! The single writer: takes accepted datagrams off the bounded queue, commits their readings in
//! batched transactions together with each device's committed replay window and the counters,
//! and only then sends the acks the devices asked for.
//!
//! Batching is group commit: the writer takes whatever is queued (up to `batch_readings`) and
//! never waits to fill a batch, so a light load commits at once and a heavy load commits large.
//! A failed commit is retried with backoff while the queue backs up (ingest then drops new
//! datagrams as `queue_full`, unacked); nothing already queued is given up.
//!
//! The writer stops when its input channel closes (all senders dropped), after committing what
//! was queued.
//!
//! Emits: `error` on a failed commit (with the retry delay), `info` when it stops.

use std::collections::HashMap;
use std::net::SocketAddr;
use std::sync::atomic::{AtomicBool, Ordering::Relaxed};
use std::sync::{Arc, OnceLock};
use std::time::Duration;

use hdrhistogram::Histogram;
use proto::{ACK_LEN, DeviceId, Reading, Seq};
use sqlx::pool::PoolConnection;
use sqlx::{Connection, SqlSafeStr, SqlStr, Sqlite};
use tokio::net::UdpSocket;
use tokio::sync::mpsc;
use tokio::time::{Instant, MissedTickBehavior};

use crate::aggregate::window::{Aggregate, Aggregator, Pushed, Sample};
use crate::events::{Counters, Snapshot};
use crate::replay::{ReplayWindow, Verdict};
use crate::store::block::{self, BlockRow};
use crate::store::outbox::KIND_AGG;
use crate::store::{DeviceState, Store, aggregates, apply_counters, now_ms};

/// Largest multi-row INSERT, in blocks (7 parameters each, well under SQLite's variable limit).
const MAX_ROWS_PER_STATEMENT: usize = 128;

/// What ingest hands to the writer.
#[derive(Debug)]
pub enum Item {
    /// A datagram that passed every check.
    Datagram(Accepted),
    /// A duplicate of a datagram already accepted: ack it again once everything queued before
    /// it (including the original) is committed.
    Reack {
        /// Where to send it.
        peer: SocketAddr,
        /// The ack bytes.
        ack: [u8; ACK_LEN],
    },
    /// Per-device counts of rejected datagrams since the last report.
    Rejected(Vec<(DeviceId, u64)>),
    /// Outbox rows the broker acknowledged: delete them, then answer on `done`.
    Delivered {
        /// Their sequence numbers.
        seqs: Vec<i64>,
        /// Told once the deletion is committed.
        done: tokio::sync::oneshot::Sender<()>,
    },
}

/// An authenticated, decoded, not-yet-seen datagram.
#[derive(Debug)]
pub struct Accepted {
    /// Sending device.
    pub device: DeviceId,
    /// Its sequence number.
    pub seq: Seq,
    /// Source address, where the ack goes.
    pub peer: SocketAddr,
    /// The ack to send after commit, when the device asked for one.
    pub ack: Option<[u8; ACK_LEN]>,
    /// The readings, in datagram order.
    pub readings: Vec<Reading>,
    /// When the socket returned it, for the receive-to-commit latency.
    pub received: Instant,
}

impl Item {
    fn readings(&self) -> usize {
        match self {
            Item::Datagram(a) => a.readings.len(),
            _ => 0,
        }
    }
}

/// Longest wait between two attempts of a failing commit.
const COMMIT_RETRY_MAX: Duration = Duration::from_secs(1);

/// The outbox's bounds, when MQTT forwarding is on.
#[derive(Debug, Clone, Copy)]
pub struct OutboxLimits {
    /// Most rows.
    pub max_rows: u64,
    /// Most payload bytes.
    pub max_bytes: u64,
}

/// Settings of the writer.
#[derive(Debug, Clone)]
pub struct WriterConfig {
    /// Most readings per transaction.
    pub batch_readings: usize,
    /// How often counters are persisted.
    pub stats_interval: Duration,
    /// How long the writer gathers datagrams before committing a batch that is not full.
    pub commit_delay: Duration,
    /// Set by the checkpoint task when the WAL should be reset (see `checkpoint`).
    pub wal_reset_wanted: Arc<AtomicBool>,
    /// The database file as opened: checked around every transaction (see [`DbFile`]).
    pub db_file: Option<DbFile>,
}

/// The database file's path and identity (device, inode) when the gateway opened it.
///
/// SQLite keeps writing to a database file (and its WAL) that was deleted or replaced under
/// it, and reports success: acks would go out for readings that vanish with the file. So the
/// writer checks before and after every transaction that the path still names the same file;
/// when it does not, the transaction counts as failed (nothing is acked), `/healthz` says
/// why, and the writer keeps retrying until the file is back or the gateway is restarted.
#[derive(Debug, Clone)]
pub struct DbFile {
    path: std::path::PathBuf,
    dev: u64,
    ino: u64,
}

impl DbFile {
    /// The identity of the file at `path`, if it exists.
    pub fn of(path: &std::path::Path) -> Option<DbFile> {
        use std::os::unix::fs::MetadataExt;
        let m = std::fs::metadata(path).ok()?;
        Some(DbFile {
            path: path.to_owned(),
            dev: m.dev(),
            ino: m.ino(),
        })
    }

    /// An error unless `path` still names the file opened.
    fn check(&self) -> Result<(), sqlx::Error> {
        use std::os::unix::fs::MetadataExt;
        match std::fs::metadata(&self.path) {
            Ok(m) if m.dev() == self.dev && m.ino() == self.ino => Ok(()),
            Ok(_) => Err(sqlx::Error::Io(std::io::Error::other(format!(
                "the database file {} was replaced by another file",
                self.path.display()
            )))),
            Err(e) => Err(sqlx::Error::Io(std::io::Error::other(format!(
                "the database file {} is gone ({e})",
                self.path.display()
            )))),
        }
    }
}

/// The writer task's state.
pub struct Writer {
    /// The writer's own connection, held for its whole life: SQLite has one writer.
    conn: PoolConnection<Sqlite>,
    rx: mpsc::Receiver<Item>,
    socket: Arc<UdpSocket>,
    counters: Arc<Counters>,
    cfg: WriterConfig,
    /// Committed replay window per device: the truth that is stored with the readings.
    windows: HashMap<DeviceId, ReplayWindow>,
    /// Counter values as last persisted, to store deltas.
    persisted: Snapshot,
    last_flush: Instant,
    latency: Histogram<u64>,
    /// Windowed aggregation, when enabled.
    aggregator: Option<Aggregator>,
    /// The store, for the outbox gauge.
    store: Store,
    /// Outbox bounds; None when nothing is forwarded (aggregates are then only stored).
    outbox: Option<OutboxLimits>,
    /// When the last "outbox full" warning was logged.
    last_full_log: Option<Instant>,
    /// Stopping with an unwritable database: what is still queued is dropped, never acked.
    gave_up: bool,
    /// Rows in staging (counted at start, then per commit and merge step).
    staged: u64,
    /// The merge of staging into `blocks` in progress.
    merge: Option<MergeCycle>,
    /// When the last merge cycle ended.
    last_merge: Instant,
}

/// One pass over staging: every row up to `hi`, a range of devices per step.
struct MergeCycle {
    hi: i64,
    /// Device bounds: step i moves devices in `[bounds[i], bounds[i + 1])`.
    bounds: Vec<i64>,
    next: usize,
}

/// Staged rows that start a merge cycle.
const MERGE_ROWS: u64 = 16_384;
/// A merge cycle also starts when this much time passed since the last one ended.
const MERGE_EVERY: Duration = Duration::from_secs(1);
/// Devices per merge step: each step rewrites about one page per device.
const MERGE_DEVICES: usize = 128;
/// Staged rows deleted per delete step.
const MERGE_DELETE_ROWS: i64 = 4096;
/// Past this many staged rows, a whole cycle runs at once (the writer fell behind).
const MERGE_ALL_ROWS: u64 = 1 << 20;

/// Per-device changes of one transaction.
#[derive(Default)]
struct DeviceDelta {
    window: Option<ReplayWindow>,
    first_seq: Option<u64>,
    datagrams: i64,
    readings: i64,
    rejected: i64,
}

/// Everything one transaction writes, and what to do after it commits.
#[derive(Default)]
struct Plan {
    /// Blocks of readings, one per datagram (rarely more), blobs in `data`.
    blocks: Vec<BlockRow>,
    data: Vec<u8>,
    /// Readings in `blocks`.
    readings: u64,
    devices: HashMap<DeviceId, DeviceDelta>,
    acks: Vec<(SocketAddr, [u8; ACK_LEN])>,
    received: Vec<Instant>,
    datagrams: u64,
    /// Closed or corrected windows to store.
    aggs: Vec<Aggregate>,
    /// Readings too late for aggregation.
    late_dropped: u64,
    /// Outbox rows to delete (acknowledged by the broker).
    delivered: Vec<i64>,
    /// Told after the commit.
    delivered_done: Vec<tokio::sync::oneshot::Sender<()>>,
}

/// What a transaction did to the outbox, applied to the gauge after the commit.
#[derive(Debug, Default)]
struct OutboxChange {
    added_rows: i64,
    added_bytes: i64,
    removed_rows: i64,
    removed_bytes: i64,
    dropped_rows: u64,
}

/// Largest multi-device UPDATE, in devices (8 parameters each).
const MAX_DEVICES_PER_STATEMENT: usize = 128;

/// One device's row of the batched UPDATE. NULL max_seq/window/seen leave the stored values.
struct DeviceUpdate {
    id: i64,
    max_seq: Option<i64>,
    window: Option<[u8; 16]>,
    first_seq: Option<i64>,
    datagrams: i64,
    readings: i64,
    rejected: i64,
    seen: Option<i64>,
}

fn update_sql(devices: usize) -> SqlStr {
    static SQL: OnceLock<Vec<SqlStr>> = OnceLock::new();
    let all = SQL.get_or_init(|| {
        (0..=MAX_DEVICES_PER_STATEMENT.trailing_zeros())
            .map(|p| {
                let values = vec!["(?,?,?,?,?,?,?,?)"; 1 << p].join(",");
                sqlx::AssertSqlSafe(format!(
                    "WITH v(id, max_seq, window, first_seq, datagrams, readings, rejected, seen) \
                     AS (VALUES {values}) \
                     UPDATE devices SET \
                       max_seq = coalesce(v.max_seq, devices.max_seq), \
                       window = coalesce(v.window, devices.window), \
                       first_seq = coalesce(devices.first_seq, v.first_seq), \
                       datagrams = devices.datagrams + v.datagrams, \
                       readings = devices.readings + v.readings, \
                       rejected = devices.rejected + v.rejected, \
                       last_seen_ms = coalesce(v.seen, devices.last_seen_ms) \
                     FROM v WHERE devices.id = v.id"
                ))
                .into_sql_str()
            })
            .collect()
    });
    all[devices.trailing_zeros() as usize].clone()
}

fn insert_sql(rows: usize) -> SqlStr {
    static SQL: OnceLock<Vec<SqlStr>> = OnceLock::new();
    let all = SQL.get_or_init(|| {
        (0..=MAX_ROWS_PER_STATEMENT.trailing_zeros())
            .map(|p| {
                let values = vec!["(?,?,?,?,?,?,?)"; 1 << p].join(",");
                sqlx::AssertSqlSafe(format!(
                    "INSERT INTO staging (device, ts_min, seq, idx, ts_max, count, data) \
                     VALUES {values}"
                ))
                .into_sql_str()
            })
            .collect()
    });
    all[rows.trailing_zeros() as usize].clone()
}

impl Writer {
    /// A writer on `conn`, starting from the committed windows in `devices`.
    #[allow(clippy::too_many_arguments)]
    pub fn new(
        conn: PoolConnection<Sqlite>,
        rx: mpsc::Receiver<Item>,
        socket: Arc<UdpSocket>,
        counters: Arc<Counters>,
        devices: &[DeviceState],
        cfg: WriterConfig,
        store: Store,
        aggregator: Option<Aggregator>,
        outbox: Option<OutboxLimits>,
    ) -> Self {
        let persisted = counters.snapshot();
        Self {
            conn,
            rx,
            socket,
            counters,
            cfg,
            windows: devices.iter().map(|d| (d.id, d.window)).collect(),
            persisted,
            last_flush: Instant::now(),
            // Bounds are constants that hdrhistogram accepts; 1 µs to 10 min, 3 digits.
            latency: Histogram::new_with_bounds(1, 600_000_000, 3).expect("valid histogram bounds"),
            aggregator,
            store,
            outbox,
            last_full_log: None,
            staged: 0,
            merge: None,
            last_merge: Instant::now(),
            gave_up: false,
        }
    }

    /// Tells the watchdog the writer is going round.
    fn heartbeat(&self) {
        self.counters
            .writer_heartbeat_ms
            .store(super::now_ms().max(0) as u64, Relaxed);
    }

    /// Runs until the input channel closes and everything queued is committed. Commit errors
    /// are logged, counted and retried; they never end the writer, but when it is stopping
    /// with a database that stays unwritable it gives up on what is left (none of it acked).
    pub async fn run(mut self) {
        self.heartbeat();
        self.counters
            .writer_queue_capacity
            .store(self.rx.max_capacity() as u64, Relaxed);
        let mut tick = tokio::time::interval(self.cfg.stats_interval);
        tick.set_missed_tick_behavior(MissedTickBehavior::Delay);
        loop {
            // Waiting for work holds no lock: a retention statement need not wait for a turn.
            self.store.turn().set_busy(false);
            let first = tokio::select! {
                biased;
                item = self.rx.recv() => match item {
                    Some(item) => item,
                    None => break,
                },
                _ = tick.tick() => {
                    self.store.turn().set_busy(true);
                    self.commit(Vec::new(), true, true).await;
                    // Idle: carry the merge on while nothing is queued.
                    self.merge_some(true).await;
                    self.heartbeat();
                    self.store.turn().give().await;
                    continue;
                }
            };
            self.store.turn().set_busy(true);
            let mut readings = first.readings();
            let mut batch = vec![first];
            // Group commit: gather what arrives within `commit_delay` of the first item, so a
            // transaction carries many datagrams instead of a few (fewer page writes per
            // reading), without ever holding a full batch back.
            let deadline = Instant::now() + self.cfg.commit_delay;
            while readings < self.cfg.batch_readings {
                let item = match self.rx.try_recv() {
                    Ok(item) => item,
                    // No gathering delay: commit what is queued now (a zero-length sleep would
                    // still wait for the next timer tick).
                    Err(_) if self.cfg.commit_delay.is_zero() => break,
                    Err(_) => {
                        tokio::select! {
                            item = self.rx.recv() => match item {
                                Some(item) => item,
                                None => break,
                            },
                            _ = tokio::time::sleep_until(deadline) => break,
                        }
                    }
                };
                readings += item.readings();
                batch.push(item);
            }
            self.counters
                .writer_queue_depth
                .store(self.rx.len() as u64, Relaxed);
            let flush = self.last_flush.elapsed() >= self.cfg.stats_interval;
            // Under a load that never lets the tick win, the idle sweep rides on the flush.
            self.commit(batch, flush, flush).await;
            self.merge_some(false).await;
            self.heartbeat();
            self.store.turn().give().await;
        }
        self.commit(Vec::new(), true, false).await;
        tracing::info!(
            readings = self.counters.readings_committed.load(Relaxed),
            "writer stopped"
        );
    }

    /// Commits one batch, retrying until it succeeds, then acks. `tick` also closes the
    /// windows of idle devices.
    async fn commit(&mut self, batch: Vec<Item>, flush: bool, tick: bool) {
        if self.gave_up {
            return;
        }
        let plan = self.plan(batch, tick);
        if plan.blocks.is_empty()
            && plan.devices.is_empty()
            && plan.aggs.is_empty()
            && plan.delivered.is_empty()
            && !flush
        {
            // Re-acks only: their originals are committed, unless the file is gone since.
            if self.cfg.db_file.as_ref().is_none_or(|f| f.check().is_ok()) {
                self.send_acks(&plan);
            }
            return;
        }
        if flush {
            self.update_latency_gauges();
            self.update_outbox_gauges().await;
        }
        let snapshot = if flush {
            Some(self.counters.snapshot())
        } else {
            None
        };
        let mut delay = Duration::from_millis(50);
        let mut failures = 0u64;
        let change = loop {
            match self.write(&plan, snapshot.as_ref()).await {
                Ok(change) => break change,
                Err(error) => {
                    // Nothing of the plan is acked until it commits; meanwhile the queue fills
                    // and ingest drops (unacked) what does not fit. One attempt a second at most
                    // once backed off, so a full disk is noticed within a second of being freed.
                    self.counters.commit_errors.fetch_add(1, Relaxed);
                    failures += 1;
                    *self
                        .counters
                        .store_error
                        .lock()
                        .unwrap_or_else(|e| e.into_inner()) = Some(error.to_string());
                    if failures <= 3 || failures.is_power_of_two() {
                        tracing::error!(%error, failures, retry_in = ?delay, "commit failed");
                    }
                    self.renew_connection().await;
                    // Stopping (every sender gone) with a database that stays unwritable: give
                    // up on this batch rather than never exit. None of it was acked.
                    if self.rx.is_closed() && failures >= 2 {
                        tracing::error!(
                            datagrams = plan.datagrams,
                            readings = plan.readings,
                            "stopping with an unwritable database: the last batch is not \
                             stored (none of it was acknowledged)"
                        );
                        self.gave_up = true;
                        return;
                    }
                    tokio::time::sleep(delay).await;
                    delay = (delay * 2).min(COMMIT_RETRY_MAX);
                }
            }
        };
        if failures > 0 {
            *self
                .counters
                .store_error
                .lock()
                .unwrap_or_else(|e| e.into_inner()) = None;
            tracing::warn!(failures, "commits succeed again");
        }
        if let Some(s) = snapshot {
            self.persisted = s;
            self.last_flush = Instant::now();
        }
        // Committed: the plan's windows are now the truth.
        for (id, d) in &plan.devices {
            if let Some(w) = d.window {
                self.windows.insert(*id, w);
            }
        }
        self.counters.transactions.fetch_add(1, Relaxed);
        self.counters
            .datagrams_committed
            .fetch_add(plan.datagrams, Relaxed);
        self.counters
            .readings_committed
            .fetch_add(plan.readings, Relaxed);
        if plan.readings > 0 {
            self.counters
                .batch_readings
                .observe(crate::events::BATCH_BOUNDS, plan.readings as f64);
        }
        self.staged += plan.blocks.len() as u64;
        let now = Instant::now();
        for r in &plan.received {
            let us = now.duration_since(*r).as_micros() as u64;
            let _ = self.latency.record(us.clamp(1, 600_000_000));
            self.counters
                .commit_latency
                .observe(crate::events::LATENCY_BOUNDS, us as f64 / 1e6);
        }
        self.send_acks(&plan);
        self.after_outbox_commit(&plan, change);
        for done in plan.delivered_done {
            let _ = done.send(());
        }
        if self.cfg.wal_reset_wanted.swap(false, Relaxed) {
            self.reset_wal().await;
        }
    }

    /// Between transactions, on the writer's own connection: copies what the passive
    /// checkpoints have not yet copied and starts the WAL over. It must not wait for readers (a
    /// long query would stall every commit), so it runs with no busy timeout; when a reader is
    /// in the way it reports busy and the checkpoint task asks again later.
    async fn reset_wal(&mut self) {
        let conn = &mut *self.conn;
        let result = async {
            sqlx::query("PRAGMA busy_timeout = 0")
                .execute(&mut *conn)
                .await?;
            let r = sqlx::query("PRAGMA wal_checkpoint(RESTART)")
                .execute(&mut *conn)
                .await;
            sqlx::query("PRAGMA busy_timeout = 10000")
                .execute(&mut *conn)
                .await?;
            r
        }
        .await;
        if let Err(error) = result {
            tracing::warn!(%error, "WAL reset failed");
            self.renew_connection().await;
        }
    }

    /// Replaces the writer's connection after a failed transaction. SQLite rolls a transaction
    /// back by itself on some errors (a full disk among them) and the driver does not notice:
    /// its count of open transactions stays one too high, so its next "transaction" is only a
    /// savepoint, a later rollback leaves SQLite's transaction open, and every later "commit"
    /// releases a savepoint inside it: nothing would be committed again while acks went out.
    /// A fresh connection starts clean; closing the old one rolls back whatever it had open.
    /// When no connection can be had, the old one is kept and this is tried at the next error.
    async fn renew_connection(&mut self) {
        // A new connection to a path whose file is gone would create an empty database there.
        if let Some(f) = &self.cfg.db_file
            && f.check().is_err()
        {
            return;
        }
        let cache: Option<(i64,)> = sqlx::query_as("PRAGMA cache_size")
            .fetch_optional(&mut *self.conn)
            .await
            .ok()
            .flatten();
        let mut fresh = match self.store.pool().acquire().await {
            Ok(c) => c,
            Err(error) => {
                tracing::warn!(%error, "no fresh writer connection; keeping the old one");
                return;
            }
        };
        if let Some((pages,)) = cache {
            // A number read back from SQLite: no injection possible.
            let _ = sqlx::query(sqlx::AssertSqlSafe(format!("PRAGMA cache_size = {pages}")))
                .execute(&mut *fresh)
                .await;
        }
        let mut old = std::mem::replace(&mut self.conn, fresh);
        old.close_on_drop();
        drop(old);
    }

    /// Turns a batch into rows and device updates, checking each datagram against the
    /// committed window (a backstop: ingest already filtered duplicates).
    fn plan(&mut self, batch: Vec<Item>, tick: bool) -> Plan {
        let mut plan = Plan::default();
        let now = now_ms().max(0) as u64;
        let mut touched: Vec<u32> = Vec::new();
        for item in batch {
            match item {
                Item::Datagram(a) => {
                    let delta = plan.devices.entry(a.device).or_default();
                    let mut window = delta.window.unwrap_or_else(|| {
                        self.windows.get(&a.device).copied().unwrap_or_default()
                    });
                    match window.check(a.seq.0) {
                        Verdict::New => {}
                        Verdict::Duplicate => {
                            // Already committed: only the ack is owed.
                            if let Some(ack) = a.ack {
                                plan.acks.push((a.peer, ack));
                            }
                            continue;
                        }
                        // Cannot tell whether it was stored: neither store nor ack.
                        Verdict::TooOld => continue,
                    }
                    if window.parts().0.is_none() && delta.first_seq.is_none() {
                        delta.first_seq = Some(a.seq.0);
                    }
                    window.mark(a.seq.0);
                    delta.window = Some(window);
                    delta.datagrams += 1;
                    delta.readings += a.readings.len() as i64;
                    block::encode(
                        a.device.0,
                        a.seq.0,
                        &a.readings,
                        &mut plan.data,
                        &mut plan.blocks,
                    );
                    plan.readings += a.readings.len() as u64;
                    if let Some(agg) = &mut self.aggregator {
                        for (idx, r) in a.readings.iter().enumerate() {
                            let sample = Sample {
                                device: a.device.0,
                                sensor: r.sensor.0,
                                ts: r.ts.0 as i64,
                                seq: a.seq.0,
                                idx: idx as u16,
                                value: r.value,
                            };
                            if agg.push(sample, now, &mut plan.aggs) == Pushed::DroppedLate {
                                plan.late_dropped += 1;
                            }
                        }
                        if touched.last() != Some(&a.device.0) {
                            touched.push(a.device.0);
                        }
                    }
                    if let Some(ack) = a.ack {
                        plan.acks.push((a.peer, ack));
                    }
                    plan.received.push(a.received);
                    plan.datagrams += 1;
                }
                Item::Reack { peer, ack } => plan.acks.push((peer, ack)),
                Item::Rejected(list) => {
                    for (id, n) in list {
                        plan.devices.entry(id).or_default().rejected += n as i64;
                    }
                }
                Item::Delivered { seqs, done } => {
                    plan.delivered.extend(seqs);
                    plan.delivered_done.push(done);
                }
            }
        }
        if let Some(agg) = &mut self.aggregator {
            touched.sort_unstable();
            touched.dedup();
            for d in touched {
                agg.advance_device(d, &mut plan.aggs);
            }
            if tick {
                agg.advance(now, &mut plan.aggs);
            }
        }
        // Key order keeps B-tree inserts local: each device's pages are touched once.
        plan.blocks.sort_unstable_by_key(BlockRow::key);
        plan
    }

    async fn write(
        &mut self,
        plan: &Plan,
        counters: Option<&Snapshot>,
    ) -> Result<OutboxChange, sqlx::Error> {
        let persisted = &self.persisted;
        let mut change = OutboxChange::default();
        if let Some(f) = &self.cfg.db_file {
            f.check()?;
        }
        let mut tx = self.conn.begin().await?;
        let mut rest = &plan.blocks[..];
        while !rest.is_empty() {
            // Largest power of two that fits: at most 9 distinct statements, all cached.
            let n = MAX_ROWS_PER_STATEMENT.min(1 << (usize::BITS - 1 - rest.len().leading_zeros()));
            let (chunk, tail) = rest.split_at(n);
            let mut q = sqlx::query(insert_sql(n));
            for b in chunk {
                q = q
                    .bind(b.device)
                    .bind(b.ts_min)
                    .bind(b.seq)
                    .bind(b.idx)
                    .bind(b.ts_max)
                    .bind(b.count)
                    .bind(&plan.data[b.data.clone()]);
            }
            q.execute(&mut *tx).await?;
            rest = tail;
        }
        let seen = now_ms();
        // One statement per chunk of devices rather than one per device: the per-statement
        // round trip to SQLite's thread dominated the commit with a thousand devices.
        let mut updates: Vec<DeviceUpdate> = Vec::with_capacity(plan.devices.len());
        for (id, d) in &plan.devices {
            let (max, bits) = match d.window {
                Some(w) => {
                    let (max, bits) = w.parts();
                    (max.map(|m| m as i64), Some(bits.to_le_bytes()))
                }
                None => (None, None),
            };
            updates.push(DeviceUpdate {
                id: i64::from(id.0),
                max_seq: max,
                window: bits,
                first_seq: d.first_seq.map(|s| s as i64),
                datagrams: d.datagrams,
                readings: d.readings,
                rejected: d.rejected,
                seen: d.window.map(|_| seen),
            });
        }
        let mut rest = &updates[..];
        while !rest.is_empty() {
            let n =
                MAX_DEVICES_PER_STATEMENT.min(1 << (usize::BITS - 1 - rest.len().leading_zeros()));
            let (chunk, tail) = rest.split_at(n);
            let mut q = sqlx::query(update_sql(n));
            for u in chunk {
                q = q
                    .bind(u.id)
                    .bind(u.max_seq)
                    .bind(u.window.as_ref().map(|w| &w[..]))
                    .bind(u.first_seq)
                    .bind(u.datagrams)
                    .bind(u.readings)
                    .bind(u.rejected)
                    .bind(u.seen);
            }
            q.execute(&mut *tx).await?;
            rest = tail;
        }
        if let Some(now) = counters {
            let delta: Snapshot = now
                .iter()
                .zip(persisted)
                .map(|((name, v, gauge), (_, old, _))| {
                    (
                        *name,
                        if *gauge { *v } else { v.saturating_sub(*old) },
                        *gauge,
                    )
                })
                .collect();
            apply_counters(&mut tx, &delta).await?;
        }
        if !plan.aggs.is_empty() {
            let (rows, bytes) =
                aggregates::upsert(&mut tx, &plan.aggs, self.outbox.is_some()).await?;
            change.added_rows = rows;
            change.added_bytes = bytes;
        }
        if !plan.delivered.is_empty() {
            let list = serde_json::to_string(&plan.delivered).unwrap_or_else(|_| "[]".into());
            let removed: Vec<(i64,)> = sqlx::query_as(
                "DELETE FROM outbox WHERE seq IN (SELECT value FROM json_each(?)) \
                 RETURNING length(CAST(payload AS BLOB))",
            )
            .bind(list)
            .fetch_all(&mut *tx)
            .await?;
            change.removed_rows = removed.len() as i64;
            change.removed_bytes = removed.iter().map(|(b,)| b).sum();
        }
        if let Some(limits) = self.outbox {
            // Over the cap: drop the oldest aggregates (never raw readings, never other kinds).
            let gauge = self.store.outbox();
            let mut rows = gauge.rows.load(Relaxed) + change.added_rows - change.removed_rows;
            let mut bytes = gauge.bytes.load(Relaxed) + change.added_bytes - change.removed_bytes;
            while rows > limits.max_rows as i64 || bytes > limits.max_bytes as i64 {
                let avg = (bytes / rows.max(1)).max(1);
                let excess = (rows - limits.max_rows as i64)
                    .max((bytes - limits.max_bytes as i64 + avg - 1) / avg)
                    .clamp(1, 10_000);
                let dropped: Vec<(i64,)> = sqlx::query_as(
                    "DELETE FROM outbox WHERE seq IN \
                     (SELECT seq FROM outbox WHERE kind = ? ORDER BY seq LIMIT ?) \
                     RETURNING length(CAST(payload AS BLOB))",
                )
                .bind(KIND_AGG)
                .bind(excess)
                .fetch_all(&mut *tx)
                .await?;
                if dropped.is_empty() {
                    break;
                }
                let b: i64 = dropped.iter().map(|(b,)| b).sum();
                rows -= dropped.len() as i64;
                bytes -= b;
                change.removed_rows += dropped.len() as i64;
                change.removed_bytes += b;
                change.dropped_rows += dropped.len() as u64;
            }
        }
        tx.commit().await?;
        // Committed into a file that is no longer the database: as good as lost, so not acked.
        if let Some(f) = &self.cfg.db_file {
            f.check()?;
        }
        Ok(change)
    }

    /// After a commit: aggregation counters, the outbox gauge, and the forwarder's waits.
    fn after_outbox_commit(&mut self, plan: &Plan, change: OutboxChange) {
        let closed = plan.aggs.iter().filter(|a| a.revision == 0).count() as u64;
        let c = &self.counters;
        c.aggregates_closed.fetch_add(closed, Relaxed);
        c.aggregates_revised
            .fetch_add(plan.aggs.len() as u64 - closed, Relaxed);
        c.aggregate_late_dropped
            .fetch_add(plan.late_dropped, Relaxed);
        c.outbox_dropped.fetch_add(change.dropped_rows, Relaxed);
        self.store.outbox().changed(
            change.added_rows - change.removed_rows,
            change.added_bytes - change.removed_bytes,
        );
        if change.added_rows > 0 {
            self.store.outbox().added.notify_one();
        }
        if change.dropped_rows > 0 {
            let now = Instant::now();
            if self
                .last_full_log
                .is_none_or(|t| now.duration_since(t) >= Duration::from_secs(10))
            {
                self.last_full_log = Some(now);
                tracing::warn!(
                    dropped = change.dropped_rows,
                    total = c.outbox_dropped.load(Relaxed),
                    "outbox full: dropped the oldest aggregates (raw readings are kept)"
                );
            }
        }
    }

    /// Moves staged blocks into `blocks`, a step at a time: first copy steps, a range of
    /// devices each (each rewrites about one page per device), then delete steps, a run of
    /// the oldest rowids each (each empties whole pages). With `all` (on the idle tick) it
    /// goes on while nothing is queued; when staging has grown large it runs the whole cycle.
    /// A cycle starts when enough rows are staged or a second has passed. Errors are logged and the step is retried later; nothing is lost, since
    /// rows stay in staging until copied and queries read both tables.
    async fn merge_some(&mut self, all: bool) {
        if self.merge.is_none() {
            if self.staged == 0
                || (self.staged < MERGE_ROWS && self.last_merge.elapsed() < MERGE_EVERY && !all)
            {
                return;
            }
            let hi = match block::staged(&mut self.conn).await {
                Ok((n, hi)) => {
                    self.staged = n;
                    hi
                }
                Err(error) => {
                    tracing::warn!(%error, "staging merge failed");
                    return;
                }
            };
            let mut ids: Vec<i64> = self.windows.keys().map(|d| i64::from(d.0)).collect();
            ids.sort_unstable();
            let mut bounds = vec![i64::MIN];
            bounds.extend(ids.iter().skip(MERGE_DEVICES).step_by(MERGE_DEVICES));
            bounds.push(i64::MAX);
            self.merge = Some(MergeCycle {
                hi,
                bounds,
                next: 0,
            });
        }
        let far_behind = self.staged >= MERGE_ALL_ROWS;
        while let Some(c) = &mut self.merge {
            let copying = c.next + 1 < c.bounds.len();
            let step = if copying {
                let (from, to) = (c.bounds[c.next], c.bounds[c.next + 1]);
                block::copy_step(&mut self.conn, c.hi, from, to)
                    .await
                    .map(|_| false)
            } else {
                block::delete_step(&mut self.conn, c.hi, MERGE_DELETE_ROWS)
                    .await
                    .map(|(deleted, finished)| {
                        self.staged = self.staged.saturating_sub(deleted);
                        finished
                    })
            };
            match step {
                Ok(finished) => {
                    if copying {
                        c.next += 1;
                    } else if finished {
                        self.merge = None;
                        self.last_merge = Instant::now();
                    }
                }
                Err(error) => {
                    tracing::warn!(%error, "staging merge failed");
                    self.renew_connection().await;
                    return;
                }
            }
            // Further steps only while nothing waits to be committed (a whole cycle at once
            // stalled commits for 50-90 ms), or when staging is far behind.
            if !(far_behind || all && self.rx.is_empty()) {
                return;
            }
        }
    }

    fn send_acks(&self, plan: &Plan) {
        for (peer, ack) in &plan.acks {
            match self.socket.try_send_to(ack, *peer) {
                Ok(_) => self.counters.acks_sent.fetch_add(1, Relaxed),
                Err(_) => self.counters.acks_failed.fetch_add(1, Relaxed),
            };
        }
    }

    /// Outbox size and age, and the publish rate, for `gateway stats` and metrics.
    async fn update_outbox_gauges(&mut self) {
        let c = &self.counters;
        let gauge = self.store.outbox();
        c.outbox_rows
            .store(gauge.rows.load(Relaxed).max(0) as u64, Relaxed);
        c.outbox_bytes
            .store(gauge.bytes.load(Relaxed).max(0) as u64, Relaxed);
        let oldest: Result<Option<(i64,)>, _> =
            sqlx::query_as("SELECT created_ms FROM outbox ORDER BY seq LIMIT 1")
                .fetch_optional(&mut *self.conn)
                .await;
        if let Ok(oldest) = oldest {
            let age = oldest.map_or(0, |(t,)| now_ms().saturating_sub(t).max(0));
            c.outbox_oldest_age_ms.store(age as u64, Relaxed);
        }
        // Pages in use (a read of the header; retention updates it too after each run).
        let used: Result<(i64,), _> = sqlx::query_as(
            "SELECT ((SELECT page_count FROM pragma_page_count) -              (SELECT freelist_count FROM pragma_freelist_count)) *              (SELECT page_size FROM pragma_page_size)",
        )
        .fetch_one(&mut *self.conn)
        .await;
        if let Ok((used,)) = used {
            c.db_used_bytes.store(used.max(0) as u64, Relaxed);
        }
        let published = c.mqtt_published.load(Relaxed);
        let secs = self.last_flush.elapsed().as_secs_f64();
        if secs > 0.0 {
            let before = self
                .persisted
                .iter()
                .find(|(n, _, _)| *n == crate::events::names::MQTT_PUBLISHED)
                .map_or(0, |(_, v, _)| *v);
            let rate = published.saturating_sub(before) as f64 / secs;
            c.mqtt_publish_rate.store(rate as u64, Relaxed);
        }
    }

    fn update_latency_gauges(&self) {
        if self.latency.is_empty() {
            return;
        }
        let c = &self.counters;
        c.latency_p50_us
            .store(self.latency.value_at_quantile(0.5), Relaxed);
        c.latency_p99_us
            .store(self.latency.value_at_quantile(0.99), Relaxed);
        c.latency_p999_us
            .store(self.latency.value_at_quantile(0.999), Relaxed);
        c.latency_max_us.store(self.latency.max(), Relaxed);
    }
}
