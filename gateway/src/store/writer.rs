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

use crate::events::{Counters, Snapshot};
use crate::replay::{ReplayWindow, Verdict};
use crate::store::{DeviceState, apply_counters, now_ms};

/// Largest multi-row INSERT, in rows (6 parameters each, well under SQLite's variable limit).
const MAX_ROWS_PER_STATEMENT: usize = 256;

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
}

/// Row of the readings table, in primary-key order for sorting.
type Row = (i64, i64, i64, i64, i64, Option<f64>);

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
    rows: Vec<Row>,
    devices: HashMap<DeviceId, DeviceDelta>,
    acks: Vec<(SocketAddr, [u8; ACK_LEN])>,
    received: Vec<Instant>,
    datagrams: u64,
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
                let values = vec!["(?,?,?,?,?,?)"; 1 << p].join(",");
                sqlx::AssertSqlSafe(format!(
                    "INSERT INTO readings (device, ts, seq, idx, sensor, value) VALUES {values} \
                     ON CONFLICT DO NOTHING"
                ))
                .into_sql_str()
            })
            .collect()
    });
    all[rows.trailing_zeros() as usize].clone()
}

impl Writer {
    /// A writer on `conn`, starting from the committed windows in `devices`.
    pub fn new(
        conn: PoolConnection<Sqlite>,
        rx: mpsc::Receiver<Item>,
        socket: Arc<UdpSocket>,
        counters: Arc<Counters>,
        devices: &[DeviceState],
        cfg: WriterConfig,
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
        }
    }

    /// Runs until the input channel closes and everything queued is committed. Commit errors
    /// are logged, counted and retried; they never end the writer.
    pub async fn run(mut self) {
        let mut tick = tokio::time::interval(self.cfg.stats_interval);
        tick.set_missed_tick_behavior(MissedTickBehavior::Delay);
        loop {
            let first = tokio::select! {
                biased;
                item = self.rx.recv() => match item {
                    Some(item) => item,
                    None => break,
                },
                _ = tick.tick() => {
                    self.commit(Vec::new(), true).await;
                    continue;
                }
            };
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
            let flush = self.last_flush.elapsed() >= self.cfg.stats_interval;
            self.commit(batch, flush).await;
        }
        self.commit(Vec::new(), true).await;
        tracing::info!(
            readings = self.counters.readings_committed.load(Relaxed),
            "writer stopped"
        );
    }

    /// Commits one batch, retrying until it succeeds, then acks.
    async fn commit(&mut self, batch: Vec<Item>, flush: bool) {
        let plan = self.plan(batch);
        if plan.rows.is_empty() && plan.devices.is_empty() && !flush {
            self.send_acks(&plan);
            return;
        }
        if flush {
            self.update_latency_gauges();
        }
        let snapshot = if flush {
            Some(self.counters.snapshot())
        } else {
            None
        };
        let mut delay = Duration::from_millis(50);
        loop {
            match self.write(&plan, snapshot.as_ref()).await {
                Ok(()) => break,
                Err(error) => {
                    self.counters.commit_errors.fetch_add(1, Relaxed);
                    tracing::error!(%error, retry_in = ?delay, "commit failed");
                    tokio::time::sleep(delay).await;
                    delay = (delay * 2).min(Duration::from_secs(5));
                }
            }
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
            .fetch_add(plan.rows.len() as u64, Relaxed);
        let now = Instant::now();
        for r in &plan.received {
            let us = now.duration_since(*r).as_micros() as u64;
            let _ = self.latency.record(us.clamp(1, 600_000_000));
        }
        self.send_acks(&plan);
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
        }
    }

    /// Turns a batch into rows and device updates, checking each datagram against the
    /// committed window (a backstop: ingest already filtered duplicates).
    fn plan(&self, batch: Vec<Item>) -> Plan {
        let mut plan = Plan::default();
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
                    for (idx, r) in a.readings.iter().enumerate() {
                        plan.rows.push((
                            i64::from(a.device.0),
                            r.ts.0 as i64,
                            a.seq.0 as i64,
                            idx as i64,
                            i64::from(r.sensor.0),
                            (!r.value.is_nan()).then_some(r.value),
                        ));
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
            }
        }
        // Key order keeps B-tree inserts local: each device's pages are touched once.
        plan.rows.sort_unstable_by_key(|r| (r.0, r.1, r.2, r.3));
        plan
    }

    async fn write(&mut self, plan: &Plan, counters: Option<&Snapshot>) -> Result<(), sqlx::Error> {
        let persisted = &self.persisted;
        let mut tx = self.conn.begin().await?;
        let mut rest = &plan.rows[..];
        while !rest.is_empty() {
            // Largest power of two that fits: at most 9 distinct statements, all cached.
            let n = MAX_ROWS_PER_STATEMENT.min(1 << (usize::BITS - 1 - rest.len().leading_zeros()));
            let (chunk, tail) = rest.split_at(n);
            let mut q = sqlx::query(insert_sql(n));
            for r in chunk {
                q = q
                    .bind(r.0)
                    .bind(r.1)
                    .bind(r.2)
                    .bind(r.3)
                    .bind(r.4)
                    .bind(r.5);
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
        tx.commit().await
    }

    fn send_acks(&self, plan: &Plan) {
        for (peer, ack) in &plan.acks {
            match self.socket.try_send_to(ack, *peer) {
                Ok(_) => self.counters.acks_sent.fetch_add(1, Relaxed),
                Err(_) => self.counters.acks_failed.fetch_add(1, Relaxed),
            };
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
        c.latency_max_us.store(self.latency.max(), Relaxed);
    }
}
