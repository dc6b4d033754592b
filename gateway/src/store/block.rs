//! Readings are stored as blocks: one row per datagram (or per part of a datagram whose
//! readings span more than [`BLOCK_SPAN_MS`]), the readings packed in one blob. A row per
//! reading costs SQLite a B-tree insert and six bound values per reading; a block costs that
//! once per datagram, which is what lets one core commit a million readings a second (see
//! BENCHMARKS.md). Queries decode blocks; a block's readings are never rewritten.
//!
//! Blob format (version 1): one byte `1`, then per reading in datagram order: the sensor as
//! an unsigned LEB128 varint, `ts - ts_min` as an unsigned LEB128 varint, the value as an
//! IEEE 754 double, little-endian (NaN kept as sent). Readings are identified by
//! (device, seq, idx) where idx is the block's first index plus the position in the blob.

use proto::Reading;
use sqlx::SqliteConnection;

use crate::store::{Store, StoreError};

/// Widest span of device timestamps in one block. A query for `[from, to)` reads the blocks
/// whose earliest timestamp is in `[from - BLOCK_SPAN_MS, to)`.
pub const BLOCK_SPAN_MS: i64 = 300_000;

/// Copies staged blocks with rowid at most `hi` and device in `[from, to)` into `blocks` and
/// records that devices below `to` are copied (which hides those staged rows from queries),
/// in one transaction. The rows are deleted later by [`delete_step`]. Returns rows copied.
///
/// # Errors
/// Driver errors; nothing changes then.
pub async fn copy_step(
    conn: &mut SqliteConnection,
    hi: i64,
    from: i64,
    to: i64,
) -> Result<u64, sqlx::Error> {
    use sqlx::Connection;
    let mut tx = conn.begin().await?;
    // Key order keeps the inserts local to each device's pages; a row already in `blocks`
    // (a step repeated after an error) is skipped, never doubled.
    let copied = sqlx::query(
        "INSERT INTO blocks (device, ts_min, seq, idx, ts_max, count, data) \
         SELECT device, ts_min, seq, idx, ts_max, count, data FROM staging \
         WHERE rowid <= ?1 AND device >= ?2 AND device < ?3 \
         ORDER BY device, ts_min, seq, idx ON CONFLICT DO NOTHING",
    )
    .bind(hi)
    .bind(from)
    .bind(to)
    .execute(&mut *tx)
    .await?
    .rows_affected();
    sqlx::query("UPDATE staging_merge SET hi = ?, upto = ? WHERE id = 0")
        .bind(hi)
        .bind(to)
        .execute(&mut *tx)
        .await?;
    tx.commit().await?;
    Ok(copied)
}

/// Deletes up to `limit` of the oldest staged rows with rowid at most `hi` (all copied);
/// when none are left, ends the merge (nothing hidden any more). Returns (rows deleted,
/// finished).
///
/// # Errors
/// Driver errors; nothing changes then.
pub async fn delete_step(
    conn: &mut SqliteConnection,
    hi: i64,
    limit: i64,
) -> Result<(u64, bool), sqlx::Error> {
    use sqlx::Connection;
    let mut tx = conn.begin().await?;
    // Contiguous rowids: each step empties whole pages at the left of the table.
    let deleted = sqlx::query(
        "DELETE FROM staging WHERE rowid IN \
         (SELECT rowid FROM staging WHERE rowid <= ? ORDER BY rowid LIMIT ?)",
    )
    .bind(hi)
    .bind(limit)
    .execute(&mut *tx)
    .await?
    .rows_affected();
    let finished = (deleted as i64) < limit;
    if finished {
        sqlx::query("UPDATE staging_merge SET upto = ? WHERE id = 0")
            .bind(i64::MIN)
            .execute(&mut *tx)
            .await?;
    }
    tx.commit().await?;
    Ok((deleted, finished))
}

/// Rows waiting in staging (copied or not) and the highest rowid (0 when empty).
///
/// # Errors
/// Driver errors.
pub async fn staged(conn: &mut SqliteConnection) -> Result<(u64, i64), sqlx::Error> {
    let (n, hi): (i64, Option<i64>) = sqlx::query_as("SELECT count(*), max(rowid) FROM staging")
        .fetch_one(&mut *conn)
        .await?;
    Ok((n.max(0) as u64, hi.unwrap_or(0)))
}

impl Store {
    /// Moves everything staged into `blocks` (at start, before the aggregator is restored).
    /// Returns the rows copied (rows a previous run had already copied are not counted).
    ///
    /// # Errors
    /// Driver errors.
    pub async fn merge_staging(&self) -> Result<u64, StoreError> {
        let mut conn = self.pool().acquire().await?;
        let (_, hi) = staged(&mut conn).await?;
        let copied = copy_step(&mut conn, hi, i64::MIN, i64::MAX).await?;
        while !delete_step(&mut conn, hi, 65_536).await?.1 {}
        Ok(copied)
    }
}

/// Format byte of the blobs this version writes.
const FORMAT: u8 = 1;

/// A block ready to insert: its key, extent and where its blob lies in a shared buffer.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct BlockRow {
    /// Device id.
    pub device: i64,
    /// Earliest device timestamp in the block.
    pub ts_min: i64,
    /// Sequence number of the datagram.
    pub seq: i64,
    /// Index in the datagram of the block's first reading.
    pub idx: i64,
    /// Latest device timestamp in the block.
    pub ts_max: i64,
    /// Readings in the block.
    pub count: i64,
    /// Byte range of the blob in the buffer it was encoded into.
    pub data: std::ops::Range<usize>,
}

impl BlockRow {
    /// The key in primary-key order.
    pub fn key(&self) -> (i64, i64, i64, i64) {
        (self.device, self.ts_min, self.seq, self.idx)
    }
}

/// One decoded reading of a block.
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct Decoded {
    /// Position in the datagram.
    pub idx: u32,
    /// Sensor id.
    pub sensor: u16,
    /// Device timestamp, ms.
    pub ts: i64,
    /// Value as sent (may be NaN).
    pub value: f64,
}

fn put_varint(out: &mut Vec<u8>, mut v: u64) {
    while v >= 0x80 {
        out.push((v as u8) | 0x80);
        v >>= 7;
    }
    out.push(v as u8);
}

fn get_varint(data: &[u8], pos: &mut usize) -> Option<u64> {
    let mut v: u64 = 0;
    for shift in (0..64).step_by(7) {
        let b = *data.get(*pos)?;
        *pos += 1;
        if shift == 63 && b > 1 {
            return None;
        }
        v |= u64::from(b & 0x7f).checked_shl(shift)?;
        if b & 0x80 == 0 {
            return Some(v);
        }
    }
    None
}

/// Splits a datagram's readings into blocks whose timestamps span at most
/// [`BLOCK_SPAN_MS`] (almost always one block) and encodes them into `buf`.
pub fn encode(
    device: u32,
    seq: u64,
    readings: &[Reading],
    buf: &mut Vec<u8>,
    out: &mut Vec<BlockRow>,
) {
    let mut start = 0;
    while start < readings.len() {
        // The longest run from `start` whose span stays within the limit.
        let first = readings[start].ts.0 as i64;
        let (mut lo, mut hi) = (first, first);
        let mut end = start + 1;
        while let Some(r) = readings.get(end) {
            let t = r.ts.0 as i64;
            let (l, h) = (lo.min(t), hi.max(t));
            if h - l > BLOCK_SPAN_MS {
                break;
            }
            (lo, hi) = (l, h);
            end += 1;
        }
        let from = buf.len();
        buf.push(FORMAT);
        for r in &readings[start..end] {
            put_varint(buf, u64::from(r.sensor.0));
            put_varint(buf, (r.ts.0 as i64 - lo) as u64);
            buf.extend_from_slice(&r.value.to_le_bytes());
        }
        out.push(BlockRow {
            device: i64::from(device),
            ts_min: lo,
            seq: seq as i64,
            idx: start as i64,
            ts_max: hi,
            count: (end - start) as i64,
            data: from..buf.len(),
        });
        start = end;
    }
}

/// Decodes a stored block. `None` when the blob is not a block this version can read (a
/// damaged or foreign database); the caller reports it.
pub fn decode(ts_min: i64, idx: i64, data: &[u8], out: &mut Vec<Decoded>) -> Option<()> {
    if data.first() != Some(&FORMAT) {
        return None;
    }
    let mut pos = 1;
    let mut i = u32::try_from(idx).ok()?;
    while pos < data.len() {
        let sensor = u16::try_from(get_varint(data, &mut pos)?).ok()?;
        let dt = i64::try_from(get_varint(data, &mut pos)?).ok()?;
        let bytes: [u8; 8] = data.get(pos..pos + 8)?.try_into().ok()?;
        pos += 8;
        out.push(Decoded {
            idx: i,
            sensor,
            ts: ts_min.checked_add(dt)?,
            value: f64::from_le_bytes(bytes),
        });
        i = i.checked_add(1)?;
    }
    Some(())
}

#[cfg(test)]
mod tests {
    use super::*;
    use proto::{Millis, SensorId};

    fn r(sensor: u16, ts: u64, value: f64) -> Reading {
        Reading {
            sensor: SensorId(sensor),
            ts: Millis(ts),
            value,
        }
    }

    fn roundtrip(readings: &[Reading]) -> (Vec<BlockRow>, Vec<Decoded>) {
        let mut buf = Vec::new();
        let mut rows = Vec::new();
        encode(7, 42, readings, &mut buf, &mut rows);
        let mut out = Vec::new();
        for b in &rows {
            decode(b.ts_min, b.idx, &buf[b.data.clone()], &mut out).expect("decodes");
        }
        (rows, out)
    }

    #[test]
    fn a_datagram_round_trips_in_one_block() {
        let rs: Vec<Reading> = (0..16)
            .map(|i| {
                r(
                    i % 4,
                    1_700_000_000_000 + u64::from(i / 4) * 250,
                    f64::from(i) * 1.5,
                )
            })
            .collect();
        let (rows, out) = roundtrip(&rs);
        assert_eq!(rows.len(), 1);
        assert_eq!(rows[0].count, 16);
        assert_eq!(
            (rows[0].ts_min, rows[0].ts_max),
            (1_700_000_000_000, 1_700_000_000_750)
        );
        assert_eq!(out.len(), 16);
        for (i, (d, r)) in out.iter().zip(&rs).enumerate() {
            assert_eq!(d.idx as usize, i);
            assert_eq!(d.sensor, r.sensor.0);
            assert_eq!(d.ts as u64, r.ts.0);
            assert_eq!(d.value.to_bits(), r.value.to_bits());
        }
    }

    #[test]
    fn nan_extremes_and_negative_zero_keep_their_bits() {
        let rs = [
            r(u16::MAX, 253_402_300_799_999, f64::NAN),
            r(0, 253_402_300_799_999, -0.0),
            r(3, 253_402_300_799_000, f64::INFINITY),
        ];
        let (rows, out) = roundtrip(&rs);
        assert_eq!(rows.len(), 1);
        for (d, r) in out.iter().zip(&rs) {
            assert_eq!((d.sensor, d.ts as u64), (r.sensor.0, r.ts.0));
            assert_eq!(d.value.to_bits(), r.value.to_bits());
        }
    }

    #[test]
    fn readings_far_apart_split_into_blocks_that_keep_their_indexes() {
        let base = 1_000_000_000;
        let rs = [
            r(1, base, 1.0),
            r(1, base + BLOCK_SPAN_MS as u64, 2.0),
            r(1, base + BLOCK_SPAN_MS as u64 + 1, 3.0),
            r(2, base + 10, 4.0),
            r(2, 5, 5.0),
        ];
        let (rows, out) = roundtrip(&rs);
        let keys: Vec<(i64, i64, i64)> = rows.iter().map(|b| (b.ts_min, b.idx, b.count)).collect();
        assert_eq!(
            keys,
            vec![(base as i64, 0, 2), (base as i64 + 10, 2, 2), (5, 4, 1)]
        );
        for b in &rows {
            assert!(b.ts_max - b.ts_min <= BLOCK_SPAN_MS);
        }
        let idx: Vec<u32> = out.iter().map(|d| d.idx).collect();
        assert_eq!(idx, vec![0, 1, 2, 3, 4]);
        let vals: Vec<f64> = out.iter().map(|d| d.value).collect();
        assert_eq!(vals, vec![1.0, 2.0, 3.0, 4.0, 5.0]);
    }

    #[test]
    fn damaged_blobs_are_refused_not_misread() {
        let mut out = Vec::new();
        assert!(decode(0, 0, &[], &mut out).is_none());
        assert!(decode(0, 0, &[2, 0, 0], &mut out).is_none());
        // Truncated value.
        assert!(decode(0, 0, &[1, 1, 1, 0, 0, 0], &mut out).is_none());
        // Sensor beyond u16.
        assert!(
            decode(
                0,
                0,
                &[1, 0xff, 0xff, 0x7f, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0],
                &mut out
            )
            .is_none()
        );
        // Unterminated varint.
        assert!(decode(0, 0, &[1, 0x80, 0x80], &mut out).is_none());
        // Empty block (format byte only) decodes to nothing.
        out.clear();
        assert!(decode(0, 0, &[1], &mut out).is_some());
        assert!(out.is_empty());
    }
}
