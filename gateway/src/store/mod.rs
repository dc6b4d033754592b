//! SQLite persistence: opening the database, its schema (embedded migrations), devices and keys,
//! counters, and read queries. All SQL of the gateway lives in this module and its children.
//!
//! The single writer of readings is [`writer`]; everything here is either setup or a short
//! transaction that readers and CLI verbs may run while the gateway is serving (WAL mode lets
//! them proceed without blocking the writer).

pub mod aggregates;
pub mod block;
pub mod checkpoint;
pub mod commands;
pub mod config;
pub mod files;
pub mod outbox;
pub mod query;
pub mod retention;
pub mod writer;

use std::path::{Path, PathBuf};
use std::str::FromStr;
use std::time::{Duration, SystemTime, UNIX_EPOCH};

use proto::{DeviceId, DeviceKey};
use rand::RngCore;
use sqlx::sqlite::{
    SqliteConnectOptions, SqliteJournalMode, SqlitePool, SqlitePoolOptions, SqliteSynchronous,
};
use thiserror::Error;

use crate::config::Durability;
use crate::events::Snapshot;
use crate::replay::ReplayWindow;

/// Errors of the storage layer.
#[derive(Debug, Error)]
pub enum StoreError {
    /// A verb that reads was pointed at a file that does not exist.
    #[error("no database at {0} (start the gateway or provision devices first, or pass --db)")]
    Missing(PathBuf),
    /// The database file could not be created.
    #[error("cannot create the database file {path}: {source}")]
    Create {
        /// The file.
        path: PathBuf,
        /// Why.
        source: std::io::Error,
    },
    /// SQLite or the driver failed.
    #[error("database error: {0}")]
    Sqlx(#[from] sqlx::Error),
    /// Applying the embedded migrations failed.
    #[error("database migration failed: {0}")]
    Migrate(#[from] sqlx::migrate::MigrateError),
    /// A device id that is already provisioned.
    #[error("device {0} already exists")]
    DeviceExists(u32),
    /// No free device id is left.
    #[error("device ids exhausted")]
    IdsExhausted,
    /// A stored row is not what this version wrote (a damaged or foreign database).
    #[error("corrupt row in {table}: {reason}")]
    Corrupt {
        /// Table of the row.
        table: &'static str,
        /// What is wrong.
        reason: &'static str,
    },
}

/// Page cache of each pool connection but the writer's, KiB (the writer's is
/// `[store] cache_kib`).
pub const READER_CACHE_KIB: u32 = 2048;

/// How a database is opened.
#[derive(Debug, Clone)]
pub struct OpenOptions {
    /// Database file.
    pub path: PathBuf,
    /// Commit durability.
    pub durability: Durability,
    /// Page cache per connection, KiB.
    pub cache_kib: u32,
    /// Create the file when missing (serve, provisioning) or fail (query, stats).
    pub create: bool,
    /// Commits never checkpoint; the caller runs [`checkpoint::run`] instead (serve).
    pub background_checkpoint: bool,
}

impl OpenOptions {
    /// Options for a CLI verb on `path`: default durability and a small cache.
    pub fn cli(path: &Path, create: bool) -> Self {
        Self {
            path: path.to_owned(),
            durability: Durability::Normal,
            cache_kib: 2048,
            create,
            background_checkpoint: false,
        }
    }
}

/// A device as the ingest path needs it: key and committed replay state.
#[derive(Debug, Clone)]
pub struct DeviceState {
    /// Device id.
    pub id: DeviceId,
    /// Its key.
    pub key: DeviceKey,
    /// Committed replay window.
    pub window: ReplayWindow,
    /// Revoked: its datagrams are refused.
    pub revoked: bool,
    /// A rotated key the device has not confirmed yet: accepted beside `key` until it does.
    pub next_key: Option<DeviceKey>,
}

/// A device's keys as a control session needs them.
#[derive(Debug, Clone)]
pub struct DeviceKeys {
    /// The confirmed key.
    pub key: DeviceKey,
    /// Its version (1 for the provisioned key, one more per confirmed rotation).
    pub version: u32,
    /// The rotated key waiting for the device's confirmation; it will be `version + 1`.
    pub next: Option<DeviceKey>,
}

/// What [`Store::start_rotation`] found or did.
#[derive(Debug, Clone)]
pub enum Rotation {
    /// No such device.
    NoDevice,
    /// The device is revoked: nothing to rotate.
    Revoked,
    /// A new key was made and waits for the device (`resumed` false), or one already waited
    /// and is kept (`resumed` true: the device may already use it).
    Pending {
        /// Version the new key gets once confirmed.
        version: u32,
        /// The new key.
        key: DeviceKey,
        /// Whether it was already pending.
        resumed: bool,
    },
}

/// A device as `gateway devices list` shows it.
#[derive(Debug, Clone, serde::Serialize)]
pub struct DeviceRow {
    /// Device id.
    pub id: u32,
    /// Display name.
    pub name: String,
    /// When it was provisioned, ms since the epoch.
    pub created_ms: i64,
    /// Receive time of its last committed datagram, ms since the epoch.
    pub last_seen_ms: Option<i64>,
    /// Distinct datagrams committed.
    pub datagrams: i64,
    /// Readings committed.
    pub readings: i64,
    /// Datagrams that passed the window with gaps: highest - first + 1 - committed.
    pub lost: i64,
    /// Datagrams rejected (bad tag, bad payload, replay, duplicate).
    pub rejected: i64,
    /// Whether it holds a control session now.
    pub online: bool,
    /// Last frame on its control session, ms since the epoch.
    pub control_seen_ms: Option<i64>,
    /// When it was revoked, ms since the epoch (its key is refused on both channels).
    #[serde(skip_serializing_if = "Option::is_none")]
    pub revoked_ms: Option<i64>,
    /// Version of its confirmed key (1 until the first rotation).
    pub key_version: u32,
    /// A rotated key waits for the device's confirmation.
    pub key_pending: bool,
}

/// A stored key as a [`DeviceKey`].
fn key_from(bytes: Vec<u8>) -> Result<DeviceKey, StoreError> {
    bytes
        .try_into()
        .map(DeviceKey)
        .map_err(|_| StoreError::Corrupt {
            table: "devices",
            reason: "key is not 32 bytes",
        })
}

/// Handle to the database. Cheap to clone.
#[derive(Debug, Clone)]
pub struct Store {
    pool: SqlitePool,
    outbox: std::sync::Arc<outbox::OutboxGauge>,
    turn: std::sync::Arc<WriteTurn>,
}

/// SQLite has one writer at a time, and a busy writer starves anyone else who waits through
/// SQLite's busy handler. Another task that must write (retention) asks for a turn: the
/// writer, between two commits, parks until that statement is done.
#[derive(Debug, Default)]
pub(crate) struct WriteTurn {
    want: std::sync::atomic::AtomicBool,
    /// Whether the writer is at work (between taking a batch and parking); while it waits
    /// for work, or when there is no writer (the CLI), it holds no lock and a turn is free.
    busy: std::sync::atomic::AtomicBool,
    parked: tokio::sync::Notify,
    done: tokio::sync::Notify,
}

impl WriteTurn {
    /// Writer side: marks the writer at work (`true`) or waiting for work (`false`).
    pub(crate) fn set_busy(&self, busy: bool) {
        self.busy.store(busy, std::sync::atomic::Ordering::Release);
    }

    /// Writer side: parks while another task's statement runs (at most 500 ms), if one asked.
    pub(crate) async fn give(&self) {
        use std::sync::atomic::Ordering::Acquire;
        if !self.want.load(Acquire) {
            return;
        }
        let done = self.done.notified();
        tokio::pin!(done);
        done.as_mut().enable();
        // Registered for `done` first: a statement that ended meanwhile is seen here.
        if !self.want.load(Acquire) {
            return;
        }
        // Wakes the taker registered before it asked; never stores a permit that a later
        // turn would take for a parked writer.
        self.parked.notify_waiters();
        let _ = tokio::time::timeout(Duration::from_millis(500), done).await;
    }

    /// Other side: runs `statement` while the writer is parked, or at once when the writer is
    /// waiting for work (or absent), or after 200 ms without an answer. Returns its output and
    /// how long it ran.
    pub(crate) async fn take<T>(
        &self,
        statement: impl std::future::Future<Output = T>,
    ) -> (T, Duration) {
        /// Ends the turn however the statement ends, also when its future is dropped (the
        /// pruner is cancelled at shutdown): the writer must never wait for a turn nobody holds.
        struct EndTurn<'a>(&'a WriteTurn);
        impl Drop for EndTurn<'_> {
            fn drop(&mut self) {
                self.0
                    .want
                    .store(false, std::sync::atomic::Ordering::Release);
                self.0.done.notify_waiters();
            }
        }
        // Registered before asking: a writer that sees the request finds the waiter.
        let parked = self.parked.notified();
        tokio::pin!(parked);
        parked.as_mut().enable();
        self.want.store(true, std::sync::atomic::Ordering::Release);
        let _end = EndTurn(self);
        if self.busy.load(std::sync::atomic::Ordering::Acquire) {
            let _ = tokio::time::timeout(Duration::from_millis(200), parked).await;
        }
        let started = tokio::time::Instant::now();
        let out = statement.await;
        (out, started.elapsed())
    }
}

/// The largest power of two that is at most `len` and at most `max` (a power of two): chunk
/// sizes of multi-row statements, so only a handful of distinct statements are prepared.
pub(crate) fn pow2_chunk(len: usize, max: usize) -> usize {
    max.min(1 << (usize::BITS - 1 - len.max(1).leading_zeros()))
}

/// `head VALUES tuple, tuple, ... tail` for `n` rows (a power of two up to the cache's size),
/// built once per size.
pub(crate) fn values_sql(
    cache: &'static std::sync::OnceLock<Vec<sqlx::SqlStr>>,
    max: usize,
    head: &str,
    tuple: &str,
    tail: &str,
    n: usize,
) -> sqlx::SqlStr {
    use sqlx::SqlSafeStr;
    let all = cache.get_or_init(|| {
        (0..=max.trailing_zeros())
            .map(|p| {
                let values = vec![tuple; 1 << p].join(",");
                sqlx::AssertSqlSafe(format!("{head} VALUES {values} {tail}")).into_sql_str()
            })
            .collect()
    });
    all[n.trailing_zeros() as usize].clone()
}

/// Milliseconds since the Unix epoch, by the gateway's clock.
pub fn now_ms() -> i64 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map(|d| d.as_millis() as i64)
        .unwrap_or(0)
}

/// Creates an empty database file readable by its owner only (an empty file is an empty SQLite
/// database): it holds the device keys. SQLite gives the WAL and shared-memory files the same
/// mode. An existing file keeps the mode its operator gave it.
fn create_private(path: &std::path::Path) -> Result<(), StoreError> {
    use std::os::unix::fs::OpenOptionsExt;
    match std::fs::OpenOptions::new()
        .write(true)
        .create_new(true)
        .mode(0o600)
        .open(path)
    {
        Ok(_) => Ok(()),
        Err(e) if e.kind() == std::io::ErrorKind::AlreadyExists => Ok(()),
        Err(source) => Err(StoreError::Create {
            path: path.to_owned(),
            source,
        }),
    }
}

impl Store {
    /// Opens (or creates) the database, sets WAL mode and durability, and applies migrations.
    ///
    /// # Errors
    /// [`StoreError::Missing`] when `create` is false and the file does not exist; driver and
    /// migration errors otherwise.
    pub async fn open(opts: &OpenOptions) -> Result<Store, StoreError> {
        if !opts.create && !opts.path.exists() {
            return Err(StoreError::Missing(opts.path.clone()));
        }
        if opts.create {
            create_private(&opts.path)?;
        }
        let connect = SqliteConnectOptions::from_str("sqlite://")?
            .filename(&opts.path)
            .create_if_missing(opts.create)
            // No auto_vacuum: with `auto_vacuum = INCREMENTAL` the fault test that makes the
            // database files immutable under load lost acknowledged readings (reproduced twice,
            // gone without it). Pages freed by retention are reused; `gateway db vacuum` shrinks
            // the file.
            .journal_mode(SqliteJournalMode::Wal)
            .synchronous(match opts.durability {
                Durability::Normal => SqliteSynchronous::Normal,
                Durability::Full => SqliteSynchronous::Full,
            })
            .busy_timeout(Duration::from_secs(10))
            .pragma("cache_size", format!("-{}", opts.cache_kib))
            // After a WAL reset, trim the file back to 64 MiB so a burst does not leave it large.
            .pragma("journal_size_limit", "67108864")
            // Checkpoints run in their own task (see `checkpoint`), never inside a commit.
            .pragma(
                "wal_autocheckpoint",
                if opts.background_checkpoint {
                    "0"
                } else {
                    "1000"
                },
            )
            .foreign_keys(true);
        let pool = SqlitePoolOptions::new()
            .max_connections(6)
            .acquire_timeout(Duration::from_secs(30))
            // SQLite rolls a transaction back by itself on some errors (a full disk among them)
            // without the driver noticing: its count of open transactions stays one too high,
            // and the connection's next "transaction" would be a savepoint inside one that is
            // never committed. A connection that comes back in that state is closed, never
            // reused (closing rolls back whatever is open).
            .after_release(|conn, _| {
                Box::pin(async move { Ok(!sqlx::Connection::is_in_transaction(conn)) })
            })
            .connect_with(connect)
            .await?;
        sqlx::migrate!("../migrations").run(&pool).await?;
        let store = Store {
            pool,
            outbox: Default::default(),
            turn: Default::default(),
        };
        store.convert_legacy_readings().await?;
        Ok(store)
    }

    /// Moves readings stored one per row by earlier versions into blocks, a chunk per
    /// transaction (so an interrupted conversion resumes), then drops the old table.
    async fn convert_legacy_readings(&self) -> Result<(), StoreError> {
        let (exists,): (i64,) = sqlx::query_as(
            "SELECT count(*) FROM sqlite_schema WHERE type = 'table' AND name = 'readings_v0'",
        )
        .fetch_one(&self.pool)
        .await?;
        if exists == 0 {
            return Ok(());
        }
        const CHUNK: i64 = 50_000;
        let mut moved = 0u64;
        loop {
            let mut tx = self.pool.begin().await?;
            // In key order from the start; everything read is deleted below by key range.
            let rows: Vec<(i64, i64, i64, i64, i64, Option<f64>)> = sqlx::query_as(
                "SELECT device, seq, idx, sensor, ts, value FROM readings_v0 \
                 ORDER BY device, ts, seq, idx LIMIT ?",
            )
            .bind(CHUNK)
            .fetch_all(&mut *tx)
            .await?;
            if rows.is_empty() {
                sqlx::query("DROP TABLE readings_v0")
                    .execute(&mut *tx)
                    .await?;
                tx.commit().await?;
                if moved > 0 {
                    tracing::info!(readings = moved, "converted stored readings to blocks");
                }
                return Ok(());
            }
            let mut buf = Vec::new();
            let mut blocks = Vec::new();
            let mut run: Vec<proto::Reading> = Vec::new();
            let mut i = 0;
            while i < rows.len() {
                // A run of consecutive indexes of one datagram (readings with other timestamps
                // become blocks of their own; the key keeps each reading's identity).
                let (device, seq, first_idx) = (rows[i].0, rows[i].1, rows[i].2);
                run.clear();
                let mut j = i;
                while j < rows.len()
                    && rows[j].0 == device
                    && rows[j].1 == seq
                    && rows[j].2 == first_idx + (j - i) as i64
                {
                    let (_, _, _, sensor, ts, value) = rows[j];
                    run.push(proto::Reading {
                        sensor: proto::SensorId(sensor as u16),
                        ts: proto::Millis(ts as u64),
                        value: value.unwrap_or(f64::NAN),
                    });
                    j += 1;
                }
                let from = blocks.len();
                block::encode(device as u32, seq as u64, &run, &mut buf, &mut blocks);
                for b in &mut blocks[from..] {
                    b.idx += first_idx;
                }
                i = j;
            }
            for b in &blocks {
                sqlx::query(
                    "INSERT INTO blocks (device, ts_min, seq, idx, ts_max, count, data) \
                     VALUES (?, ?, ?, ?, ?, ?, ?) ON CONFLICT DO NOTHING",
                )
                .bind(b.device)
                .bind(b.ts_min)
                .bind(b.seq)
                .bind(b.idx)
                .bind(b.ts_max)
                .bind(b.count)
                .bind(&buf[b.data.clone()])
                .execute(&mut *tx)
                .await?;
            }
            if let Some(&(device, seq, idx, _, ts, _)) = rows.last() {
                sqlx::query("DELETE FROM readings_v0 WHERE (device, ts, seq, idx) <= (?, ?, ?, ?)")
                    .bind(device)
                    .bind(ts)
                    .bind(seq)
                    .bind(idx)
                    .execute(&mut *tx)
                    .await?;
            }
            tx.commit().await?;
            moved += rows.len() as u64;
        }
    }

    /// Turns at writing between the writer and other writing tasks.
    pub(crate) fn turn(&self) -> &WriteTurn {
        &self.turn
    }

    /// The connection pool, for the writer and queries of this module.
    pub(crate) fn pool(&self) -> &SqlitePool {
        &self.pool
    }

    /// Closes every connection, waiting for them to be returned.
    pub async fn close(&self) {
        self.pool.close().await;
    }

    /// Adds one device with a fresh random key. With `id` None the next free id is taken.
    ///
    /// # Errors
    /// [`StoreError::DeviceExists`] for a taken id, [`StoreError::IdsExhausted`].
    pub async fn add_device(
        &self,
        id: Option<u32>,
        name: Option<&str>,
    ) -> Result<(DeviceId, DeviceKey), StoreError> {
        let mut devices = self.add_devices(id, 1, name).await?;
        devices.pop().ok_or(StoreError::IdsExhausted)
    }

    /// Adds `count` devices with consecutive ids (from `first`, or after the highest id) and
    /// fresh random keys, in one transaction.
    ///
    /// # Errors
    /// As [`Store::add_device`].
    pub async fn add_devices(
        &self,
        first: Option<u32>,
        count: u32,
        name: Option<&str>,
    ) -> Result<Vec<(DeviceId, DeviceKey)>, StoreError> {
        // IMMEDIATE takes the write lock up front (waiting on busy_timeout), so reading max(id)
        // and inserting cannot race a serving gateway's commits.
        let mut tx = self.pool.begin_with("BEGIN IMMEDIATE").await?;
        let start = match first {
            Some(id) => u64::from(id),
            None => {
                let (max,): (Option<i64>,) = sqlx::query_as("SELECT max(id) FROM devices")
                    .fetch_one(&mut *tx)
                    .await?;
                max.map_or(1, |m| m as u64 + 1)
            }
        };
        if start + u64::from(count) > u64::from(u32::MAX) + 1 {
            return Err(StoreError::IdsExhausted);
        }
        let now = now_ms();
        let mut out = Vec::with_capacity(count as usize);
        let mut rng = rand::rng();
        for i in 0..u64::from(count) {
            let id = (start + i) as u32;
            let mut key = [0u8; 32];
            rng.fill_bytes(&mut key);
            let label = match name {
                Some(n) if count == 1 => n.to_owned(),
                Some(n) => format!("{n}-{id}"),
                None => format!("device-{id}"),
            };
            let res = sqlx::query(
                "INSERT INTO devices (id, name, key, created_ms) VALUES (?, ?, ?, ?) \
                 ON CONFLICT(id) DO NOTHING",
            )
            .bind(i64::from(id))
            .bind(label)
            .bind(&key[..])
            .bind(now)
            .execute(&mut *tx)
            .await?;
            if res.rows_affected() == 0 {
                return Err(StoreError::DeviceExists(id));
            }
            out.push((DeviceId(id), DeviceKey(key)));
        }
        tx.commit().await?;
        Ok(out)
    }

    /// Every device with its counts, by id.
    ///
    /// # Errors
    /// Driver errors.
    pub async fn list_devices(&self) -> Result<Vec<DeviceRow>, StoreError> {
        #[derive(sqlx::FromRow)]
        struct Row {
            id: i64,
            name: String,
            created_ms: i64,
            last_seen_ms: Option<i64>,
            datagrams: i64,
            readings: i64,
            first_seq: Option<i64>,
            max_seq: Option<i64>,
            rejected: i64,
            online: bool,
            control_seen_ms: Option<i64>,
            revoked_ms: Option<i64>,
            key_version: i64,
            key_pending: bool,
        }
        let rows: Vec<Row> = sqlx::query_as(
            "SELECT id, name, created_ms, last_seen_ms, datagrams, readings, first_seq, \
             max_seq, rejected, online, control_seen_ms, revoked_ms, key_version, \
             next_key IS NOT NULL AS key_pending FROM devices ORDER BY id",
        )
        .fetch_all(&self.pool)
        .await?;
        Ok(rows
            .into_iter()
            .map(|r| {
                let lost = match (r.first_seq, r.max_seq) {
                    // i128: sequence numbers may be as large as 2^63 - 1.
                    (Some(f), Some(m)) => {
                        (i128::from(m) - i128::from(f) + 1 - i128::from(r.datagrams))
                            .clamp(0, i128::from(i64::MAX)) as i64
                    }
                    _ => 0,
                };
                DeviceRow {
                    id: r.id as u32,
                    name: r.name,
                    created_ms: r.created_ms,
                    last_seen_ms: r.last_seen_ms,
                    datagrams: r.datagrams,
                    readings: r.readings,
                    lost,
                    rejected: r.rejected,
                    online: r.online,
                    control_seen_ms: r.control_seen_ms,
                    revoked_ms: r.revoked_ms,
                    key_version: r.key_version.clamp(0, i64::from(u32::MAX)) as u32,
                    key_pending: r.key_pending,
                }
            })
            .collect())
    }

    /// Keys and committed replay windows of every device.
    ///
    /// # Errors
    /// Driver errors, [`StoreError::Corrupt`] for a key or window of the wrong size.
    pub async fn device_states(&self) -> Result<Vec<DeviceState>, StoreError> {
        type Row = (
            i64,
            Vec<u8>,
            Option<i64>,
            Option<Vec<u8>>,
            bool,
            Option<Vec<u8>>,
        );
        let rows: Vec<Row> = sqlx::query_as(
            "SELECT id, key, max_seq, window, revoked_ms IS NOT NULL, next_key FROM devices",
        )
        .fetch_all(&self.pool)
        .await?;
        rows.into_iter()
            .map(|(id, key, max, window, revoked, next_key)| {
                let key = key_from(key)?;
                let next_key = next_key.map(key_from).transpose()?;
                let bits = match window {
                    None => 0,
                    Some(w) => {
                        u128::from_le_bytes(w.try_into().map_err(|_| StoreError::Corrupt {
                            table: "devices",
                            reason: "window is not 16 bytes",
                        })?)
                    }
                };
                Ok(DeviceState {
                    id: DeviceId(id as u32),
                    key,
                    window: ReplayWindow::from_parts(max.map(|m| m as u64), bits),
                    revoked,
                    next_key,
                })
            })
            .collect()
    }

    /// The key of one device, if it exists and is not revoked.
    ///
    /// # Errors
    /// Driver errors, [`StoreError::Corrupt`] for a key of the wrong size.
    pub async fn device_key(&self, id: DeviceId) -> Result<Option<DeviceKey>, StoreError> {
        let row: Option<(Vec<u8>,)> =
            sqlx::query_as("SELECT key FROM devices WHERE id = ? AND revoked_ms IS NULL")
                .bind(i64::from(id.0))
                .fetch_optional(&self.pool)
                .await?;
        row.map(|(key,)| {
            key.try_into()
                .map(DeviceKey)
                .map_err(|_| StoreError::Corrupt {
                    table: "devices",
                    reason: "key is not 32 bytes",
                })
        })
        .transpose()
    }

    /// The keys of one device, if it exists and is not revoked.
    ///
    /// # Errors
    /// Driver errors, [`StoreError::Corrupt`] for a key of the wrong size.
    pub async fn device_keys(&self, id: DeviceId) -> Result<Option<DeviceKeys>, StoreError> {
        let row: Option<(Vec<u8>, i64, Option<Vec<u8>>)> = sqlx::query_as(
            "SELECT key, key_version, next_key FROM devices WHERE id = ? AND revoked_ms IS NULL",
        )
        .bind(i64::from(id.0))
        .fetch_optional(&self.pool)
        .await?;
        row.map(|(key, version, next)| {
            Ok(DeviceKeys {
                key: key_from(key)?,
                version: version.clamp(0, i64::from(u32::MAX)) as u32,
                next: next.map(key_from).transpose()?,
            })
        })
        .transpose()
    }

    /// Starts a key rotation: a fresh random key waits in `next_key` until the device confirms
    /// it ([`Store::confirm_rotation`]). While one waits it is kept and returned again (the
    /// device may already seal with it), so asking twice never strands a device.
    ///
    /// # Errors
    /// Driver errors, [`StoreError::Corrupt`] for a stored key of the wrong size.
    pub async fn start_rotation(&self, id: DeviceId) -> Result<Rotation, StoreError> {
        let mut tx = self.pool.begin_with("BEGIN IMMEDIATE").await?;
        let row: Option<(i64, Option<Vec<u8>>, bool)> = sqlx::query_as(
            "SELECT key_version, next_key, revoked_ms IS NOT NULL FROM devices WHERE id = ?",
        )
        .bind(i64::from(id.0))
        .fetch_optional(&mut *tx)
        .await?;
        let Some((version, next, revoked)) = row else {
            return Ok(Rotation::NoDevice);
        };
        if revoked {
            return Ok(Rotation::Revoked);
        }
        let version = (version + 1).clamp(0, i64::from(u32::MAX)) as u32;
        if let Some(next) = next {
            return Ok(Rotation::Pending {
                version,
                key: key_from(next)?,
                resumed: true,
            });
        }
        let mut key = [0u8; 32];
        rand::rng().fill_bytes(&mut key);
        sqlx::query("UPDATE devices SET next_key = ? WHERE id = ?")
            .bind(&key[..])
            .bind(i64::from(id.0))
            .execute(&mut *tx)
            .await?;
        tx.commit().await?;
        Ok(Rotation::Pending {
            version,
            key: DeviceKey(key),
            resumed: false,
        })
    }

    /// The device proved that it holds the pending key of `version`: it becomes the key and the
    /// old one is refused from now on. False when no such rotation waits (already confirmed,
    /// or a stale version).
    ///
    /// # Errors
    /// Driver errors.
    pub async fn confirm_rotation(&self, id: DeviceId, version: u32) -> Result<bool, StoreError> {
        let r = sqlx::query(
            "UPDATE devices SET key = next_key, next_key = NULL, key_version = key_version + 1, \
             key_rotated_ms = ? \
             WHERE id = ? AND next_key IS NOT NULL AND key_version + 1 = ? AND revoked_ms IS NULL",
        )
        .bind(now_ms())
        .bind(i64::from(id.0))
        .bind(i64::from(version))
        .execute(&self.pool)
        .await?;
        Ok(r.rows_affected() == 1)
    }

    /// Revokes a device: from now on its key is refused on both channels by a gateway that
    /// reads the database (a running one learns it through its admin API at once). Its readings
    /// and history stay. Returns whether the device exists; revoking again keeps the first time.
    ///
    /// # Errors
    /// Driver errors.
    pub async fn revoke_device(&self, id: DeviceId) -> Result<bool, StoreError> {
        let r = sqlx::query("UPDATE devices SET revoked_ms = COALESCE(revoked_ms, ?) WHERE id = ?")
            .bind(now_ms())
            .bind(i64::from(id.0))
            .execute(&self.pool)
            .await?;
        Ok(r.rows_affected() == 1)
    }

    /// Stored counters by name.
    ///
    /// # Errors
    /// Driver errors.
    pub async fn counters(&self) -> Result<Vec<(String, i64)>, StoreError> {
        Ok(
            sqlx::query_as("SELECT name, value FROM counters ORDER BY name")
                .fetch_all(&self.pool)
                .await?,
        )
    }

    /// Runs `PRAGMA integrity_check` and returns its first line ("ok" when healthy).
    ///
    /// # Errors
    /// Driver errors.
    pub async fn integrity_check(&self) -> Result<String, StoreError> {
        let (r,): (String,) = sqlx::query_as("PRAGMA integrity_check")
            .fetch_one(&self.pool)
            .await?;
        Ok(r)
    }
}

/// Adds counter deltas (and sets gauges) inside a transaction.
pub(crate) async fn apply_counters(
    conn: &mut sqlx::SqliteConnection,
    delta: &Snapshot,
) -> Result<(), sqlx::Error> {
    for (name, value, gauge) in delta {
        if *value == 0 && !gauge {
            continue;
        }
        let sql = if *gauge {
            "INSERT INTO counters (name, value) VALUES (?1, ?2) \
             ON CONFLICT(name) DO UPDATE SET value = ?2"
        } else {
            "INSERT INTO counters (name, value) VALUES (?1, ?2) \
             ON CONFLICT(name) DO UPDATE SET value = value + ?2"
        };
        sqlx::query(sql)
            .bind(*name)
            .bind(*value as i64)
            .execute(&mut *conn)
            .await?;
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[tokio::test]
    async fn a_turn_parks_the_writer_and_a_dropped_one_releases_it() {
        use std::sync::Arc;
        use std::sync::atomic::Ordering::Acquire;
        let turn = Arc::new(WriteTurn::default());
        // Nobody asked: the writer does not wait.
        tokio::time::timeout(Duration::from_millis(50), turn.give())
            .await
            .expect("no wait without a request");
        // A writer waiting for work (or none at all): the statement runs at once.
        let (_, _) = tokio::time::timeout(Duration::from_millis(100), turn.take(async {}))
            .await
            .expect("no wait for an idle writer");
        turn.set_busy(true);
        // A statement runs while the writer is parked: the writer resumes only once it ended.
        let (release, released) = tokio::sync::oneshot::channel::<()>();
        let ended = Arc::new(std::sync::atomic::AtomicBool::new(false));
        let (other, flag) = (turn.clone(), ended.clone());
        let taker = tokio::spawn(async move {
            other
                .take(async move {
                    let _ = released.await;
                    flag.store(true, std::sync::atomic::Ordering::Release);
                })
                .await
        });
        tokio::time::timeout(Duration::from_secs(5), async {
            while !turn.want.load(Acquire) {
                tokio::task::yield_now().await;
            }
        })
        .await
        .expect("the turn is asked for");
        let (writer, flag) = (turn.clone(), ended.clone());
        let giver = tokio::spawn(async move {
            writer.give().await;
            flag.load(Acquire)
        });
        for _ in 0..100 {
            tokio::task::yield_now().await;
        }
        assert!(!giver.is_finished(), "the writer did not park");
        let _ = release.send(());
        taker.await.expect("taker");
        assert!(
            giver.await.expect("giver"),
            "the writer resumed before the statement ended"
        );
        assert!(!turn.want.load(Acquire));
        // A turn whose future is dropped mid-statement (shutdown) leaves no request behind.
        let other = turn.clone();
        let dropped = tokio::spawn(async move { other.take(std::future::pending::<()>()).await });
        tokio::time::timeout(Duration::from_secs(5), async {
            while !turn.want.load(Acquire) {
                tokio::task::yield_now().await;
            }
        })
        .await
        .expect("the turn is asked for");
        dropped.abort();
        let _ = dropped.await;
        assert!(!turn.want.load(Acquire));
        tokio::time::timeout(Duration::from_millis(50), turn.give())
            .await
            .expect("no wait after the turn was dropped");
    }

    #[tokio::test]
    async fn a_rotation_waits_is_resumed_not_replaced_and_is_confirmed_once() {
        let dir = tempfile::tempdir().expect("tempdir");
        let store = Store::open(&OpenOptions::cli(&dir.path().join("t.db"), true))
            .await
            .expect("open");
        let (id, key) = store.add_device(None, None).await.expect("add");
        let Rotation::Pending {
            version,
            key: next,
            resumed: false,
        } = store.start_rotation(id).await.expect("start")
        else {
            panic!("a new rotation");
        };
        assert_eq!(version, 2);
        assert_ne!(next, key);
        let keys = store.device_keys(id).await.expect("keys").expect("device");
        assert_eq!(
            (keys.key, keys.version, keys.next),
            (key.clone(), 1, Some(next.clone()))
        );
        let states = store.device_states().await.expect("states");
        assert_eq!(states[0].next_key, Some(next.clone()));
        // Asked again: the same key, since the device may already use it.
        let Rotation::Pending {
            key: again,
            resumed: true,
            ..
        } = store.start_rotation(id).await.expect("again")
        else {
            panic!("resumed");
        };
        assert_eq!(again, next);
        assert!(!store.confirm_rotation(id, 3).await.expect("stale"));
        assert!(store.confirm_rotation(id, 2).await.expect("confirm"));
        assert!(!store.confirm_rotation(id, 2).await.expect("once"));
        let keys = store.device_keys(id).await.expect("keys").expect("device");
        assert_eq!((keys.key, keys.version, keys.next), (next, 2, None));
        let row = &store.list_devices().await.expect("list")[0];
        assert_eq!((row.key_version, row.key_pending), (2, false));
        // Unknown and revoked devices have nothing to rotate.
        assert!(matches!(
            store.start_rotation(DeviceId(99)).await,
            Ok(Rotation::NoDevice)
        ));
        assert!(store.revoke_device(id).await.expect("revoke"));
        assert!(matches!(
            store.start_rotation(id).await,
            Ok(Rotation::Revoked)
        ));
        assert!(store.device_keys(id).await.expect("keys").is_none());
        store.close().await;
    }
}
