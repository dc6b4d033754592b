//! The outbox: messages for the MQTT broker, kept in SQLite until the broker acknowledges
//! them (store-and-forward). Rows are written in the same transaction as what they report
//! (aggregates with the readings that closed them, command results with the status change,
//! presence events with the presence change); the forwarder reads them in sequence order and
//! the writer deletes them once acknowledged.
//!
//! [`OutboxGauge`] mirrors the table's size in memory for the cap and for metrics; every
//! writer of the table updates it after its commit.

use std::sync::atomic::{AtomicBool, AtomicI64, Ordering::Relaxed};

use serde::Serialize;
use tokio::sync::Notify;

use super::{Store, StoreError, now_ms};

/// Kinds of outbox rows. Only [`KIND_AGG`] rows are dropped when the outbox is full.
pub const KIND_AGG: &str = "agg";
/// A device online/offline event.
pub const KIND_EVENT: &str = "event";
/// The final status of a command that came from the broker.
pub const KIND_CMD_RESULT: &str = "cmd-result";

/// In-memory view of the outbox, shared by its writers and the forwarder.
#[derive(Debug, Default)]
pub struct OutboxGauge {
    /// Whether rows are written at all (MQTT forwarding enabled).
    pub enabled: AtomicBool,
    /// Rows in the table.
    pub rows: AtomicI64,
    /// Payload bytes in the table.
    pub bytes: AtomicI64,
    /// Woken when rows were added.
    pub added: Notify,
}

impl OutboxGauge {
    /// Records committed changes: rows and bytes added (positive) or removed (negative).
    pub fn changed(&self, rows: i64, bytes: i64) {
        self.rows.fetch_add(rows, Relaxed);
        self.bytes.fetch_add(bytes, Relaxed);
        if rows > 0 {
            self.added.notify_one();
        }
    }
}

/// One message waiting for the broker.
#[derive(Debug, Clone, sqlx::FromRow)]
pub struct OutboxRow {
    /// Per-gateway sequence number.
    pub seq: i64,
    /// Topic relative to `<prefix>/v1/<gateway-id>/`.
    pub topic: String,
    /// JSON object without `seq` and `gateway`.
    pub payload: String,
}

/// The outbox's size, for `gateway stats` and metrics.
#[derive(Debug, Clone, Serialize)]
pub struct OutboxStatus {
    /// Rows waiting.
    pub rows: i64,
    /// Payload bytes waiting.
    pub bytes: i64,
    /// Age of the oldest waiting message, ms (0 when empty).
    pub oldest_age_ms: i64,
}

/// Adds one row inside the caller's transaction; returns its payload size.
///
/// # Errors
/// Driver errors.
pub async fn insert(
    conn: &mut sqlx::SqliteConnection,
    kind: &str,
    topic: &str,
    payload: &str,
) -> Result<i64, sqlx::Error> {
    sqlx::query("INSERT INTO outbox (kind, topic, payload, created_ms) VALUES (?, ?, ?, ?)")
        .bind(kind)
        .bind(topic)
        .bind(payload)
        .bind(now_ms())
        .execute(conn)
        .await?;
    Ok(payload.len() as i64)
}

impl Store {
    /// The shared outbox gauge.
    pub fn outbox(&self) -> &OutboxGauge {
        &self.outbox
    }

    /// Reads the outbox's size into the gauge (at start) and says whether rows are written.
    ///
    /// # Errors
    /// Driver errors.
    pub async fn outbox_init(&self, enabled: bool) -> Result<(), StoreError> {
        let (rows, bytes): (i64, Option<i64>) =
            sqlx::query_as("SELECT count(*), sum(length(CAST(payload AS BLOB))) FROM outbox")
                .fetch_one(self.pool())
                .await?;
        self.outbox.rows.store(rows, Relaxed);
        self.outbox.bytes.store(bytes.unwrap_or(0), Relaxed);
        self.outbox.enabled.store(enabled, Relaxed);
        Ok(())
    }

    /// Up to `limit` rows with `after < seq < before`, oldest first.
    ///
    /// # Errors
    /// Driver errors.
    pub async fn outbox_after(
        &self,
        after: i64,
        before: i64,
        limit: usize,
    ) -> Result<Vec<OutboxRow>, StoreError> {
        Ok(sqlx::query_as(
            "SELECT seq, topic, payload FROM outbox WHERE seq > ? AND seq < ? ORDER BY seq LIMIT ?",
        )
        .bind(after)
        .bind(before)
        .bind(limit as i64)
        .fetch_all(self.pool())
        .await?)
    }

    /// Adds one row in its own transaction.
    ///
    /// # Errors
    /// Driver errors.
    pub async fn outbox_insert(
        &self,
        kind: &str,
        topic: &str,
        payload: &str,
    ) -> Result<(), StoreError> {
        let mut tx = self.pool().begin().await?;
        let bytes = insert(&mut tx, kind, topic, payload).await?;
        tx.commit().await?;
        self.outbox.changed(1, bytes);
        Ok(())
    }

    /// The highest sequence number ever given (0 before the first row).
    ///
    /// # Errors
    /// Driver errors.
    pub async fn outbox_last_seq(&self) -> Result<i64, StoreError> {
        let (seq,): (Option<i64>,) =
            sqlx::query_as("SELECT max(seq) FROM sqlite_sequence WHERE name = 'outbox'")
                .fetch_one(self.pool())
                .await?;
        Ok(seq.unwrap_or(0))
    }

    /// Size and age of the outbox, read from the table.
    ///
    /// # Errors
    /// Driver errors.
    pub async fn outbox_status(&self) -> Result<OutboxStatus, StoreError> {
        let (rows, bytes): (i64, Option<i64>) =
            sqlx::query_as("SELECT count(*), sum(length(CAST(payload AS BLOB))) FROM outbox")
                .fetch_one(self.pool())
                .await?;
        let oldest: Option<(i64,)> =
            sqlx::query_as("SELECT created_ms FROM outbox ORDER BY seq LIMIT 1")
                .fetch_optional(self.pool())
                .await?;
        Ok(OutboxStatus {
            rows,
            bytes: bytes.unwrap_or(0),
            oldest_age_ms: oldest.map_or(0, |(t,)| now_ms().saturating_sub(t).max(0)),
        })
    }
}

/// Where a forwarder's connection stands in the outbox, without I/O: which rows to read next.
///
/// At connect, rows up to the highest sequence number given so far are the backlog (rows left
/// by an outage, or published and not acknowledged on the last connection); newer rows are
/// live. Live rows are read from `live_cursor` on, whenever the writer adds some; the backlog
/// from `backlog_cursor` on, below `live_from`, at its own rate, until a read comes back short.
/// Both cursors only move forward, so a connection never publishes a row twice; a row that is
/// not acknowledged stays in the outbox and is backlog for the next connection.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Cursors {
    /// Rows from here on are live.
    pub live_from: i64,
    live_cursor: i64,
    live_more: bool,
    backlog_cursor: i64,
    backlog_done: bool,
}

/// One read of the outbox: up to `limit` rows with `after < seq < before`, oldest first.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Read {
    /// Exclusive lower bound.
    pub after: i64,
    /// Exclusive upper bound.
    pub before: i64,
    /// Most rows.
    pub limit: usize,
}

impl Cursors {
    /// A new connection, made when the highest sequence number given was `last_seq`.
    pub fn new(last_seq: i64) -> Self {
        Self {
            live_from: last_seq + 1,
            live_cursor: last_seq,
            live_more: true,
            backlog_cursor: 0,
            backlog_done: false,
        }
    }

    /// Rows may have been added: look for live rows again.
    pub fn wake(&mut self) {
        self.live_more = true;
    }

    /// Whether the backlog has been read to its end.
    pub fn backlog_done(&self) -> bool {
        self.backlog_done
    }

    /// The next live read for `room` rows, if one is due.
    pub fn live_read(&self, room: usize) -> Option<Read> {
        (self.live_more && room > 0).then_some(Read {
            after: self.live_cursor,
            before: i64::MAX,
            limit: room,
        })
    }

    /// The next backlog read for `room` rows, if one is due.
    pub fn backlog_read(&self, room: usize) -> Option<Read> {
        (!self.backlog_done && room > 0).then_some(Read {
            after: self.backlog_cursor,
            before: self.live_from,
            limit: room,
        })
    }

    /// A live read returned `rows` rows, the last (highest) being `last`.
    pub fn live_done(&mut self, read: Read, rows: usize, last: Option<i64>) {
        self.live_more = rows == read.limit;
        if let Some(last) = last {
            self.live_cursor = last;
        }
    }

    /// A backlog read returned `rows` rows, the last (highest) being `last`.
    pub fn backlog_done_reading(&mut self, read: Read, rows: usize, last: Option<i64>) {
        self.backlog_done = rows < read.limit;
        if let Some(last) = last {
            self.backlog_cursor = last;
        }
    }
}

#[cfg(test)]
mod tests {
    use std::collections::BTreeSet;

    use proptest::prelude::*;

    use super::{Cursors, Read};

    /// What happens to the outbox and a forwarder's connections.
    #[derive(Debug, Clone)]
    enum Op {
        /// The writer adds rows.
        Insert(u8),
        /// The forwarder fills its window: room for live rows, then for backlog rows.
        Fill(u8, u8),
        /// The writer's "added" nudge or the forwarder's tick.
        Wake,
        /// The broker acknowledges some of what is in flight (picked by the seed).
        Ack(u8, u8),
        /// The connection is lost: what is in flight stays in the outbox.
        Lose,
        /// The bound drops the oldest rows.
        DropOldest(u8),
    }

    fn op() -> impl Strategy<Value = Op> {
        prop_oneof![
            (1u8..20).prop_map(Op::Insert),
            (0u8..12, 0u8..12).prop_map(|(l, b)| Op::Fill(l, b)),
            Just(Op::Wake),
            (0u8..12, any::<u8>()).prop_map(|(n, s)| Op::Ack(n, s)),
            Just(Op::Lose),
            (0u8..4).prop_map(Op::DropOldest),
        ]
    }

    /// The outbox table and one forwarder, as sets of sequence numbers.
    #[derive(Default)]
    struct Model {
        outbox: BTreeSet<i64>,
        last_seq: i64,
        inflight: Vec<i64>,
        /// Published on the current connection.
        published: BTreeSet<i64>,
        delivered: BTreeSet<i64>,
        dropped: BTreeSet<i64>,
    }

    impl Model {
        /// The outbox query of `store::outbox_after`.
        fn read(&self, r: Read) -> Vec<i64> {
            if r.after.saturating_add(1) >= r.before {
                return Vec::new();
            }
            self.outbox
                .range(r.after + 1..r.before)
                .take(r.limit)
                .copied()
                .collect()
        }

        fn publish(&mut self, seqs: &[i64]) {
            for &s in seqs {
                assert!(
                    self.published.insert(s),
                    "row {s} published twice on one connection"
                );
                self.inflight.push(s);
            }
        }

        fn fill(&mut self, c: &mut Cursors, live_room: usize, backlog_room: usize) {
            if let Some(r) = c.live_read(live_room) {
                let seqs = self.read(r);
                c.live_done(r, seqs.len(), seqs.last().copied());
                self.publish(&seqs);
            }
            if let Some(r) = c.backlog_read(backlog_room) {
                let seqs = self.read(r);
                c.backlog_done_reading(r, seqs.len(), seqs.last().copied());
                self.publish(&seqs);
            }
        }

        fn ack(&mut self, n: usize, seed: u8) {
            for i in 0..n.min(self.inflight.len()) {
                let at = (usize::from(seed) + i * 7) % self.inflight.len();
                let s = self.inflight.remove(at);
                self.outbox.remove(&s);
                self.delivered.insert(s);
            }
        }
    }

    proptest! {
        #![proptest_config(ProptestConfig::with_cases(512))]

        /// Against any interleaving of inserts, fills, acks, lost connections and drops by
        /// the bound: no connection publishes a row twice, and once the broker stays up and
        /// acknowledges everything, one connection empties the outbox: every row ever added
        /// is delivered or was dropped by the bound (and counted), none is stranded.
        #[test]
        fn the_outbox_is_drained_without_repeats_and_nothing_is_stranded(
            ops in proptest::collection::vec(op(), 0..200),
        ) {
            let mut m = Model::default();
            let mut c = Cursors::new(0);
            for op in ops {
                match op {
                    Op::Insert(n) => {
                        for _ in 0..n {
                            m.last_seq += 1;
                            m.outbox.insert(m.last_seq);
                        }
                    }
                    Op::Fill(l, b) => m.fill(&mut c, usize::from(l), usize::from(b)),
                    Op::Wake => c.wake(),
                    Op::Ack(n, seed) => m.ack(usize::from(n), seed),
                    Op::Lose => {
                        m.inflight.clear();
                        m.published.clear();
                        c = Cursors::new(m.last_seq);
                    }
                    Op::DropOldest(n) => {
                        for _ in 0..n {
                            if let Some(s) = m.outbox.pop_first() {
                                m.dropped.insert(s);
                            }
                        }
                    }
                }
            }
            // The broker is back for good: fill and acknowledge until nothing is left.
            for _ in 0..1_000 {
                if m.outbox.is_empty() {
                    break;
                }
                c.wake();
                m.fill(&mut c, 8, 8);
                let n = m.inflight.len();
                m.ack(n, 0);
            }
            prop_assert!(m.outbox.is_empty(), "stranded rows: {:?}", m.outbox);
            for s in 1..=m.last_seq {
                prop_assert!(m.delivered.contains(&s) || m.dropped.contains(&s), "row {s} lost");
            }
        }
    }
}
