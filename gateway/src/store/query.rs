//! Read queries over stored readings, for the CLI (and later the HTTP API). Results stream in
//! primary-key order (device, time), so a query never sorts in memory, however large.

use futures_util::{Stream, StreamExt};

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

impl Store {
    /// Streams the readings matching `filter`, by device then time.
    pub fn readings(
        &self,
        filter: &ReadingsFilter,
    ) -> impl Stream<Item = Result<ReadingRow, StoreError>> + '_ {
        // Built from fixed fragments only; every value is a bound parameter.
        let mut sql =
            String::from("SELECT device, sensor, ts, value, seq, idx FROM readings WHERE 1 = 1");
        if filter.device.is_some() {
            sql.push_str(" AND device = ?");
        }
        if filter.sensor.is_some() {
            sql.push_str(" AND sensor = ?");
        }
        if filter.from_ms.is_some() {
            sql.push_str(" AND ts >= ?");
        }
        if filter.to_ms.is_some() {
            sql.push_str(" AND ts < ?");
        }
        sql.push_str(" ORDER BY device, ts, seq, idx");
        if filter.limit.is_some() {
            sql.push_str(" LIMIT ?");
        }
        let mut q =
            sqlx::query_as::<_, (i64, i64, i64, Option<f64>, i64, i64)>(sqlx::AssertSqlSafe(sql));
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
        if let Some(l) = filter.limit {
            q = q.bind(l.min(i64::MAX as u64) as i64);
        }
        q.fetch(self.pool()).map(|r| {
            r.map(|(device, sensor, ts_ms, value, seq, idx)| ReadingRow {
                device: device as u32,
                sensor: sensor as u16,
                ts_ms,
                value,
                seq: seq as u64,
                idx: idx as u32,
            })
            .map_err(StoreError::from)
        })
    }
}
