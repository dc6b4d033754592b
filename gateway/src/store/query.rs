//! Read queries over stored readings, for the CLI (and later the HTTP API). Blocks are read in
//! primary-key order (device, earliest time) and merged into readings in (device, time)
//! order, so a query holds only the blocks that overlap in time, however large its result.

use std::cmp::Reverse;
use std::collections::{BinaryHeap, VecDeque};

use futures_util::stream::BoxStream;
use futures_util::{Stream, StreamExt};

use crate::aggregate::window::{Aggregate, Stats};
use crate::store::block::{self, BLOCK_SPAN_MS, Decoded};
use crate::store::{Store, StoreError};

/// Which readings to return. Every field narrows the result; none returns everything.
#[derive(Debug, Clone, Default)]
pub struct ReadingsFilter {
    /// Only this device.
    pub device: Option<u32>,
    /// Only this sensor.
    pub sensor: Option<u16>,
    /// Device timestamps at or after this, ms since the epoch.
    pub from_ms: Option<i64>,
    /// Device timestamps before this, ms since the epoch.
    pub to_ms: Option<i64>,
    /// At most this many rows.
    pub limit: Option<u64>,
}

/// One stored reading.
#[derive(Debug, Clone, PartialEq, serde::Serialize)]
pub struct ReadingRow {
    /// Device id.
    pub device: u32,
    /// Sensor id.
    pub sensor: u16,
    /// Device timestamp, ms since the epoch.
    pub ts_ms: i64,
    /// Value; None when the device sent NaN.
    pub value: Option<f64>,
    /// Sequence number of the datagram that carried it.
    pub seq: u64,
    /// Position in that datagram.
    pub idx: u32,
}

/// A reading in sort order: (device, ts, seq, idx), then sensor and the value's bits.
type Key = (i64, i64, u64, u32, u16, u64);

/// A row of the blocks table as queried: device, ts_min, seq, idx, blob.
type BlockRecord = (i64, i64, i64, i64, Vec<u8>);

/// State of the streaming merge of blocks into readings in key order.
struct Merge<'a> {
    blocks: BoxStream<'a, Result<BlockRecord, sqlx::Error>>,
    filter: ReadingsFilter,
    /// Decoded readings that a later block might still precede.
    pending: BinaryHeap<Reverse<Key>>,
    /// Readings that no later block can precede, in order.
    ready: VecDeque<Key>,
    device: Option<i64>,
    decoded: Vec<Decoded>,
    emitted: u64,
    done: bool,
}

impl Merge<'_> {
    /// Takes one block. Blocks arrive by (device, ts_min), so every pending reading of the same
    /// device older than this block's earliest timestamp is final.
    fn take(&mut self, (device, ts_min, seq, idx, data): BlockRecord) -> Result<(), StoreError> {
        if self.device != Some(device) {
            self.release(i64::MAX);
            self.device = Some(device);
        } else {
            self.release(ts_min);
        }
        self.decoded.clear();
        block::decode(ts_min, idx, &data, &mut self.decoded).ok_or(StoreError::Corrupt {
            table: "blocks",
            reason: "undecodable readings blob",
        })?;
        let f = &self.filter;
        for d in &self.decoded {
            if f.sensor.is_some_and(|s| s != d.sensor)
                || f.from_ms.is_some_and(|t| d.ts < t)
                || f.to_ms.is_some_and(|t| d.ts >= t)
            {
                continue;
            }
            self.pending.push(Reverse((
                device,
                d.ts,
                seq as u64,
                d.idx,
                d.sensor,
                d.value.to_bits(),
            )));
        }
        Ok(())
    }

    /// Moves pending readings with a timestamp before `ts` to `ready`.
    fn release(&mut self, ts: i64) {
        while self.pending.peek().is_some_and(|Reverse(k)| k.1 < ts) {
            if let Some(Reverse(k)) = self.pending.pop() {
                self.ready.push_back(k);
            }
        }
    }
}

impl Store {
    /// Streams the readings matching `filter`, by device then time (then sequence and
    /// index). Memory is bounded by the blocks that overlap in time, not by the result.
    pub fn readings(
        &self,
        filter: &ReadingsFilter,
    ) -> impl Stream<Item = Result<ReadingRow, StoreError>> + '_ {
        // Built from fixed fragments only; every value is a bound parameter. A block's
        // readings lie within BLOCK_SPAN_MS of its ts_min, which bounds the key range. Blocks
        // not yet merged are read from staging; SQLite merges the two sorted arms.
        let mut cond = String::from("1 = 1");
        if filter.device.is_some() {
            cond.push_str(" AND device = ?");
        }
        if filter.from_ms.is_some() {
            cond.push_str(" AND ts_min >= ?");
        }
        if filter.to_ms.is_some() {
            cond.push_str(" AND ts_min < ?");
        }
        // Staged rows a merge in progress has already copied are skipped.
        let sql = format!(
            "SELECT device, ts_min, seq, idx, data FROM blocks WHERE {cond} UNION ALL \
             SELECT device, ts_min, seq, idx, data FROM staging, staging_merge m WHERE {cond} \
             AND NOT (staging.rowid <= m.hi AND device < m.upto) ORDER BY 1, 2, 3, 4"
        );
        let mut q = sqlx::query_as::<_, BlockRecord>(sqlx::AssertSqlSafe(sql));
        for _ in 0..2 {
            if let Some(d) = filter.device {
                q = q.bind(i64::from(d));
            }
            if let Some(f) = filter.from_ms {
                q = q.bind(f.saturating_sub(BLOCK_SPAN_MS));
            }
            if let Some(t) = filter.to_ms {
                q = q.bind(t);
            }
        }
        let merge = Merge {
            blocks: q.fetch(self.pool()).boxed(),
            filter: filter.clone(),
            pending: BinaryHeap::new(),
            ready: VecDeque::new(),
            device: None,
            decoded: Vec::new(),
            emitted: 0,
            done: false,
        };
        futures_util::stream::unfold(merge, |mut m| async move {
            loop {
                if m.filter.limit.is_some_and(|l| m.emitted >= l) {
                    return None;
                }
                if let Some((device, ts_ms, seq, idx, sensor, bits)) = m.ready.pop_front() {
                    m.emitted += 1;
                    let value = f64::from_bits(bits);
                    let row = ReadingRow {
                        device: device as u32,
                        sensor,
                        ts_ms,
                        value: (!value.is_nan()).then_some(value),
                        seq,
                        idx,
                    };
                    return Some((Ok(row), m));
                }
                if m.done {
                    return None;
                }
                match m.blocks.next().await {
                    Some(Ok(block)) => {
                        if let Err(e) = m.take(block) {
                            m.done = true;
                            return Some((Err(e), m));
                        }
                    }
                    Some(Err(e)) => {
                        m.done = true;
                        return Some((Err(e.into()), m));
                    }
                    None => {
                        m.release(i64::MAX);
                        m.done = true;
                    }
                }
            }
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::store::OpenOptions;
    use futures_util::TryStreamExt;
    use proto::{Millis, Reading, SensorId};

    async fn store(dir: &tempfile::TempDir) -> Store {
        Store::open(&OpenOptions::cli(&dir.path().join("q.db"), true))
            .await
            .expect("open")
    }

    async fn insert(store: &Store, device: u32, seq: u64, readings: &[(u16, u64, f64)]) {
        insert_into(store, "blocks", device, seq, readings).await;
    }

    async fn insert_into(
        store: &Store,
        table: &str,
        device: u32,
        seq: u64,
        readings: &[(u16, u64, f64)],
    ) {
        let rs: Vec<Reading> = readings
            .iter()
            .map(|&(s, t, v)| Reading {
                sensor: SensorId(s),
                ts: Millis(t),
                value: v,
            })
            .collect();
        let (mut buf, mut rows) = (Vec::new(), Vec::new());
        block::encode(device, seq, &rs, &mut buf, &mut rows);
        for b in rows {
            sqlx::query(sqlx::AssertSqlSafe(format!(
                "INSERT INTO {table} (device, ts_min, seq, idx, ts_max, count, data) \
                 VALUES (?, ?, ?, ?, ?, ?, ?)"
            )))
            .bind(b.device)
            .bind(b.ts_min)
            .bind(b.seq)
            .bind(b.idx)
            .bind(b.ts_max)
            .bind(b.count)
            .bind(&buf[b.data])
            .execute(store.pool())
            .await
            .expect("insert");
        }
    }

    fn key(r: &ReadingRow) -> (u32, i64, u64, u32) {
        (r.device, r.ts_ms, r.seq, r.idx)
    }

    #[tokio::test]
    async fn overlapping_blocks_merge_into_key_order_and_filters_hold() {
        let dir = tempfile::tempdir().expect("tempdir");
        let s = store(&dir).await;
        // Blocks whose time ranges overlap, out of order, across devices and a split datagram.
        let mut all = Vec::new();
        let mut seq = 0;
        for device in [3u32, 1, 2] {
            for start in [1_000u64, 400, 5_000, 450, 2_000, 1_000] {
                seq += 1;
                let rs: Vec<(u16, u64, f64)> = (0..8u16)
                    .map(|i| {
                        (
                            i % 3,
                            start + u64::from(i) * 700 % 2_300,
                            f64::from(i) + seq as f64,
                        )
                    })
                    .collect();
                insert(&s, device, seq, &rs).await;
                for (i, &(sensor, ts, v)) in rs.iter().enumerate() {
                    all.push(ReadingRow {
                        device,
                        sensor,
                        ts_ms: ts as i64,
                        value: Some(v),
                        seq,
                        idx: i as u32,
                    });
                }
            }
        }
        insert(&s, 1, 100, &[(0, 10, f64::NAN), (1, 10 + 400_000, 2.0)]).await;
        all.push(ReadingRow {
            device: 1,
            sensor: 0,
            ts_ms: 10,
            value: None,
            seq: 100,
            idx: 0,
        });
        all.push(ReadingRow {
            device: 1,
            sensor: 1,
            ts_ms: 400_010,
            value: Some(2.0),
            seq: 100,
            idx: 1,
        });
        all.sort_by_key(key);

        let got: Vec<ReadingRow> = s
            .readings(&ReadingsFilter::default())
            .try_collect()
            .await
            .expect("query");
        assert_eq!(got, all);

        let f = ReadingsFilter {
            device: Some(1),
            sensor: Some(1),
            from_ms: Some(1_200),
            to_ms: Some(400_010),
            limit: None,
        };
        let want: Vec<ReadingRow> = all
            .iter()
            .filter(|r| r.device == 1 && r.sensor == 1 && r.ts_ms >= 1_200 && r.ts_ms < 400_010)
            .cloned()
            .collect();
        assert!(!want.is_empty());
        let got: Vec<ReadingRow> = s.readings(&f).try_collect().await.expect("query");
        assert_eq!(got, want);

        let f = ReadingsFilter {
            device: Some(2),
            limit: Some(5),
            ..Default::default()
        };
        let got: Vec<ReadingRow> = s.readings(&f).try_collect().await.expect("query");
        let want: Vec<ReadingRow> = all
            .iter()
            .filter(|r| r.device == 2)
            .take(5)
            .cloned()
            .collect();
        assert_eq!(got, want);
    }

    async fn all(s: &Store) -> Vec<ReadingRow> {
        s.readings(&ReadingsFilter::default())
            .try_collect()
            .await
            .expect("query")
    }

    #[tokio::test]
    async fn staged_blocks_are_read_with_merged_ones_and_merge_by_device_range() {
        let dir = tempfile::tempdir().expect("tempdir");
        let s = store(&dir).await;
        let mut want = Vec::new();
        for seq in 0..40u64 {
            for device in 0..6u32 {
                // Alternate tables; staged blocks overlap merged ones in time.
                let table = if (seq + u64::from(device)) % 3 == 0 {
                    "blocks"
                } else {
                    "staging"
                };
                let ts = 1_000 + seq * 10 + u64::from(device) * 3;
                let rs: Vec<(u16, u64, f64)> = (0..4u16)
                    .map(|i| (i, ts + u64::from(i) * 7, seq as f64))
                    .collect();
                insert_into(&s, table, device, seq, &rs).await;
                for (i, &(sensor, ts, v)) in rs.iter().enumerate() {
                    want.push(ReadingRow {
                        device,
                        sensor,
                        ts_ms: ts as i64,
                        value: Some(v),
                        seq,
                        idx: i as u32,
                    });
                }
            }
        }
        want.sort_by_key(key);
        assert_eq!(all(&s).await, want);
        let f = ReadingsFilter {
            device: Some(4),
            from_ms: Some(1_100),
            to_ms: Some(1_250),
            ..Default::default()
        };
        let got: Vec<ReadingRow> = s.readings(&f).try_collect().await.expect("query");
        let expect: Vec<ReadingRow> = want
            .iter()
            .filter(|r| r.device == 4 && (1_100..1_250).contains(&r.ts_ms))
            .cloned()
            .collect();
        assert!(!expect.is_empty());
        assert_eq!(got, expect);

        // One step moves only its device range and rows up to its rowid bound.
        let mut conn = s.pool().acquire().await.expect("conn");
        let (n, hi) = block::staged(&mut conn).await.expect("staged");
        assert_eq!(n, 160);
        // A cycle part-way: devices below 2, then 2 and 3 copied; the copies are hidden in
        // staging until deleted, so nothing shows twice.
        assert_eq!(
            block::copy_step(&mut conn, hi, i64::MIN, 2)
                .await
                .expect("copy"),
            53
        );
        assert_eq!(
            block::copy_step(&mut conn, hi, 2, 4).await.expect("copy"),
            53
        );
        // Staged after the cycle began: not part of it, still visible.
        insert_into(&s, "staging", 1, 1_000, &[(0, 900, 9.0)]).await;
        want.push(ReadingRow {
            device: 1,
            sensor: 0,
            ts_ms: 900,
            value: Some(9.0),
            seq: 1_000,
            idx: 0,
        });
        want.sort_by_key(key);
        drop(conn);
        assert_eq!(all(&s).await, want);
        let mut conn = s.pool().acquire().await.expect("conn");
        assert_eq!(
            block::copy_step(&mut conn, hi, 4, i64::MAX)
                .await
                .expect("copy"),
            54
        );
        assert_eq!(all(&s).await, want);
        assert_eq!(
            block::delete_step(&mut conn, hi, 100)
                .await
                .expect("delete"),
            (100, false)
        );
        assert_eq!(all(&s).await, want);
        assert_eq!(
            block::delete_step(&mut conn, hi, 100)
                .await
                .expect("delete"),
            (60, true)
        );
        assert_eq!(block::staged(&mut conn).await.expect("staged").0, 1);
        drop(conn);
        assert_eq!(all(&s).await, want);
        // A restart's full merge moves what is left.
        assert_eq!(s.merge_staging().await.expect("merge all"), 1);
        assert_eq!(all(&s).await, want);
        let mut conn = s.pool().acquire().await.expect("conn");
        assert_eq!(block::staged(&mut conn).await.expect("staged").0, 0);
    }

    #[tokio::test]
    async fn readings_of_the_old_layout_are_converted_once() {
        let dir = tempfile::tempdir().expect("tempdir");
        let s = store(&dir).await;
        sqlx::query(
            "CREATE TABLE readings_v0 (device INTEGER NOT NULL, ts INTEGER NOT NULL, \
             seq INTEGER NOT NULL, idx INTEGER NOT NULL, sensor INTEGER NOT NULL, value REAL, \
             PRIMARY KEY (device, ts, seq, idx)) WITHOUT ROWID",
        )
        .execute(s.pool())
        .await
        .expect("create");
        let mut want = Vec::new();
        for i in 0..120_000u64 {
            let (device, seq, idx) = ((i % 7) as u32, i / 7 / 16, (i / 7 % 16) as u32);
            let ts = 1_000 + seq as i64 * 10 + i64::from(idx % 4);
            let value = (i % 11 != 0).then_some(i as f64 / 4.0);
            want.push(ReadingRow {
                device,
                sensor: (idx % 3) as u16,
                ts_ms: ts,
                value,
                seq,
                idx,
            });
        }
        for chunk in want.chunks(5_000) {
            let mut tx = s.pool().begin().await.expect("begin");
            for r in chunk {
                sqlx::query("INSERT INTO readings_v0 VALUES (?, ?, ?, ?, ?, ?)")
                    .bind(i64::from(r.device))
                    .bind(r.ts_ms)
                    .bind(r.seq as i64)
                    .bind(i64::from(r.idx))
                    .bind(i64::from(r.sensor))
                    .bind(r.value)
                    .execute(&mut *tx)
                    .await
                    .expect("insert");
            }
            tx.commit().await.expect("commit");
        }
        want.sort_by_key(key);
        s.convert_legacy_readings().await.expect("convert");
        let got: Vec<ReadingRow> = s
            .readings(&ReadingsFilter::default())
            .try_collect()
            .await
            .expect("query");
        assert_eq!(got.len(), want.len());
        assert_eq!(got, want);
        let (left,): (i64,) =
            sqlx::query_as("SELECT count(*) FROM sqlite_schema WHERE name = 'readings_v0'")
                .fetch_one(s.pool())
                .await
                .expect("schema");
        assert_eq!(left, 0);
        // Opening again finds nothing to convert and changes nothing.
        s.convert_legacy_readings().await.expect("again");
        let again: Vec<ReadingRow> = s
            .readings(&ReadingsFilter::default())
            .try_collect()
            .await
            .expect("query");
        assert_eq!(again, want);
    }
}

/// Which stored aggregate windows to return.
#[derive(Debug, Clone, Default)]
pub struct AggregatesFilter {
    /// Window length, ms (one tier).
    pub window_ms: u64,
    /// Only this device.
    pub device: Option<u32>,
    /// Only this sensor.
    pub sensor: Option<u16>,
    /// Windows starting at or after this, ms since the epoch.
    pub from_ms: Option<i64>,
    /// Windows starting before this, ms since the epoch.
    pub to_ms: Option<i64>,
}

/// A row of the aggregates table as queried.
type AggregateRecord = (
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

impl Store {
    /// Streams the stored windows (latest revision) matching `filter`, by device, start and
    /// sensor: the order of the table's primary key, so nothing is sorted in memory.
    pub fn aggregates(
        &self,
        filter: &AggregatesFilter,
    ) -> impl Stream<Item = Result<Aggregate, StoreError>> + '_ {
        // Fixed fragments only; every value is a bound parameter.
        let mut sql = String::from(
            "SELECT device, start_ms, sensor, revision, count, min, max, mean, stddev, last, \
             last_ts, last_seq, last_idx FROM aggregates WHERE window_ms = ?",
        );
        for (present, cond) in [
            (filter.device.is_some(), " AND device = ?"),
            (filter.sensor.is_some(), " AND sensor = ?"),
            (filter.from_ms.is_some(), " AND start_ms >= ?"),
            (filter.to_ms.is_some(), " AND start_ms < ?"),
        ] {
            if present {
                sql.push_str(cond);
            }
        }
        sql.push_str(" ORDER BY device, start_ms, sensor");
        let window_ms = filter.window_ms;
        let mut q = sqlx::query_as::<_, AggregateRecord>(sqlx::AssertSqlSafe(sql))
            .bind(i64::try_from(window_ms).unwrap_or(i64::MAX));
        if let Some(d) = filter.device {
            q = q.bind(i64::from(d));
        }
        if let Some(s) = filter.sensor {
            q = q.bind(i64::from(s));
        }
        if let Some(f) = filter.from_ms {
            q = q.bind(f);
        }
        if let Some(t) = filter.to_ms {
            q = q.bind(t);
        }
        q.fetch(self.pool()).map(move |r| {
            let (
                device,
                start_ms,
                sensor,
                revision,
                count,
                min,
                max,
                mean,
                stddev,
                last,
                lts,
                lseq,
                lidx,
            ) = r?;
            Ok(Aggregate {
                device: device as u32,
                sensor: sensor as u16,
                window_ms,
                start_ms,
                stats: Stats::from_parts(
                    count as u64,
                    min,
                    max,
                    mean,
                    stddev,
                    (lts, lseq as u64, lidx as u16),
                    last,
                ),
                revision: revision as u32,
            })
        })
    }
}
