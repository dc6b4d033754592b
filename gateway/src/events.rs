//! The gateway's counters and the events that move them. Metric names are the constants here
//! and nowhere else: the store persists them under these names and `gateway stats` prints them.
//!
//! Emits: `debug` per dropped datagram (target `gateway::events`), and a `warn` summary of drops
//! at most once per log interval (see [`DropLog`]).

use std::sync::atomic::{AtomicU64, Ordering::Relaxed};
use std::time::Duration;

use proto::DecodeError;
use tokio::time::Instant;

/// Why a received datagram was not stored. Order and names are stable: they are stored.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum DropReason {
    /// Shorter than the smallest valid datagram.
    TooShort,
    /// Longer than the protocol allows.
    TooLong,
    /// Unknown protocol version.
    BadVersion,
    /// Reserved flags or an out-of-range sequence number.
    BadHeader,
    /// The device id is not provisioned.
    UnknownDevice,
    /// Authentication failed: wrong key, corrupted or forged.
    BadTag,
    /// Authentic but undecodable payload.
    BadPayload,
    /// Sequence number older than the replay window.
    Replay,
    /// Sequence number already seen inside the window.
    Duplicate,
    /// The queue to the writer was full.
    QueueFull,
    /// The kernel dropped it before the gateway read it: the socket's receive buffer was full.
    /// Counted from the socket's drop counter, once per stats interval.
    Kernel,
    /// Its source address is limited for failed authentications (`crate::limit`): dropped
    /// before any check.
    AuthLimited,
    /// The device is revoked (`gateway devices revoke`).
    Revoked,
}

impl DropReason {
    /// Every reason, in counter order.
    pub const ALL: [DropReason; 13] = [
        DropReason::TooShort,
        DropReason::TooLong,
        DropReason::BadVersion,
        DropReason::BadHeader,
        DropReason::UnknownDevice,
        DropReason::BadTag,
        DropReason::BadPayload,
        DropReason::Replay,
        DropReason::Duplicate,
        DropReason::QueueFull,
        DropReason::Kernel,
        DropReason::AuthLimited,
        DropReason::Revoked,
    ];

    /// The counter name, `drop_<reason>`.
    pub fn counter(self) -> &'static str {
        match self {
            DropReason::TooShort => "drop_too_short",
            DropReason::TooLong => "drop_too_long",
            DropReason::BadVersion => "drop_bad_version",
            DropReason::BadHeader => "drop_bad_header",
            DropReason::UnknownDevice => "drop_unknown_device",
            DropReason::BadTag => "drop_bad_tag",
            DropReason::BadPayload => "drop_bad_payload",
            DropReason::Replay => "drop_replay",
            DropReason::Duplicate => "drop_duplicate",
            DropReason::QueueFull => "drop_queue_full",
            DropReason::Kernel => "drop_kernel",
            DropReason::AuthLimited => "drop_auth_limited",
            DropReason::Revoked => "drop_revoked",
        }
    }

    /// Whether the datagram was attributed to a provisioned device (and counts as rejected for it).
    pub fn is_per_device(self) -> bool {
        matches!(
            self,
            DropReason::BadTag
                | DropReason::BadPayload
                | DropReason::Replay
                | DropReason::Duplicate
        )
    }
}

impl From<&DecodeError> for DropReason {
    fn from(e: &DecodeError) -> Self {
        match e {
            DecodeError::TooShort { .. } => DropReason::TooShort,
            DecodeError::TooLong { .. } => DropReason::TooLong,
            DecodeError::BadVersion { .. } => DropReason::BadVersion,
            DecodeError::BadHeader { .. } => DropReason::BadHeader,
            DecodeError::BadTag => DropReason::BadTag,
            DecodeError::BadPayload | DecodeError::TooManyReadings { .. } => DropReason::BadPayload,
        }
    }
}

/// Counter names other than drops.
pub mod names {
    /// Datagrams read from the socket.
    pub const DATAGRAMS_RECEIVED: &str = "datagrams_received";
    /// Datagrams that passed every check and were queued for the writer.
    pub const DATAGRAMS_ACCEPTED: &str = "datagrams_accepted";
    /// Datagrams whose readings are committed.
    pub const DATAGRAMS_COMMITTED: &str = "datagrams_committed";
    /// Readings committed.
    pub const READINGS_COMMITTED: &str = "readings_committed";
    /// SQLite transactions committed by the writer.
    pub const TRANSACTIONS: &str = "transactions";
    /// Acks sent (including re-acks of duplicates).
    pub const ACKS_SENT: &str = "acks_sent";
    /// Acks the socket could not take (device will retransmit).
    pub const ACKS_FAILED: &str = "acks_failed";
    /// Commit attempts that failed and were retried.
    pub const COMMIT_ERRORS: &str = "commit_errors";
    /// Receive-to-commit latency of the current run, median, microseconds (a gauge).
    pub const LATENCY_P50_US: &str = "commit_latency_p50_us";
    /// Receive-to-commit latency of the current run, 99th percentile, microseconds (a gauge).
    pub const LATENCY_P99_US: &str = "commit_latency_p99_us";
    /// Receive-to-commit latency of the current run, maximum, microseconds (a gauge).
    pub const LATENCY_MAX_US: &str = "commit_latency_max_us";
    /// Receive-to-commit latency of the current run, 99.9th percentile, microseconds (a gauge).
    pub const LATENCY_P999_US: &str = "commit_latency_p999_us";
    /// Closed windows stored (first emissions).
    pub const AGGREGATES_CLOSED: &str = "aggregates_closed";
    /// Corrected windows stored (revisions by late readings).
    pub const AGGREGATES_REVISED: &str = "aggregates_revised";
    /// Readings too late for a window, left out of aggregation (still stored raw).
    pub const AGGREGATE_LATE_DROPPED: &str = "aggregate_late_dropped";
    /// Aggregates dropped from the outbox because it was full (oldest first).
    pub const OUTBOX_DROPPED: &str = "outbox_dropped";
    /// Messages the broker acknowledged.
    pub const MQTT_PUBLISHED: &str = "mqtt_published";
    /// Connections to the broker made.
    pub const MQTT_CONNECTS: &str = "mqtt_connects";
    /// Commands received on the command topic (accepted or rejected).
    pub const MQTT_COMMANDS: &str = "mqtt_commands";
    /// 1 while connected to the broker (a gauge).
    pub const MQTT_CONNECTED: &str = "mqtt_connected";
    /// Messages acknowledged per second over the last stats interval (a gauge).
    pub const MQTT_PUBLISH_RATE: &str = "mqtt_publish_rate";
    /// Messages waiting in the outbox (a gauge).
    pub const OUTBOX_ROWS: &str = "outbox_rows";
    /// Payload bytes waiting in the outbox (a gauge).
    pub const OUTBOX_BYTES: &str = "outbox_bytes";
    /// Age of the oldest message in the outbox, ms (a gauge; 0 when empty).
    pub const OUTBOX_OLDEST_AGE_MS: &str = "outbox_oldest_age_ms";
    /// Retention enforcements completed.
    pub const RETENTION_RUNS: &str = "retention_runs";
    /// Raw readings deleted by retention.
    pub const RETENTION_READINGS_DELETED: &str = "retention_readings_deleted";
    /// Aggregate windows deleted by retention.
    pub const RETENTION_AGGREGATES_DELETED: &str = "retention_aggregates_deleted";
    /// Bytes of database pages in use (a gauge), updated every stats interval.
    pub const DB_USED_BYTES: &str = "db_used_bytes";
    /// Gauge: items (datagrams, re-acks) left waiting for the writer when it last took a batch
    /// (it holds still while the writer is stuck in a commit).
    pub const WRITER_QUEUE_DEPTH: &str = "writer_queue_depth";
    /// Gauge: the most datagrams that queue holds (`telemetry.queue`); past it they are dropped
    /// as `queue_full`.
    pub const WRITER_QUEUE_CAPACITY: &str = "writer_queue_capacity";
}

/// The one-line description of a counter or gauge, for `# HELP` in `/metrics`.
pub fn help(name: &str) -> &'static str {
    use names::*;
    match name {
        DATAGRAMS_RECEIVED => "Datagrams read from the telemetry socket.",
        DATAGRAMS_ACCEPTED => "Datagrams that passed every check and were queued for the writer.",
        DATAGRAMS_COMMITTED => "Datagrams whose readings are committed.",
        READINGS_COMMITTED => "Readings committed to the database.",
        TRANSACTIONS => "Database transactions committed by the writer.",
        ACKS_SENT => "Acks sent, including re-acks of duplicates.",
        ACKS_FAILED => "Acks the socket could not take (the device retransmits).",
        COMMIT_ERRORS => "Commit attempts that failed and were retried.",
        LATENCY_P50_US => "Receive-to-commit latency of this run, median.",
        LATENCY_P99_US => "Receive-to-commit latency of this run, 99th percentile.",
        LATENCY_P999_US => "Receive-to-commit latency of this run, 99.9th percentile.",
        LATENCY_MAX_US => "Receive-to-commit latency of this run, maximum.",
        AGGREGATES_CLOSED => "Closed windows stored (first emissions).",
        AGGREGATES_REVISED => "Windows corrected by late readings.",
        AGGREGATE_LATE_DROPPED => "Readings too late for their window (still stored raw).",
        OUTBOX_DROPPED => "Aggregates dropped from the full outbox, oldest first.",
        MQTT_PUBLISHED => "Messages the broker acknowledged.",
        MQTT_CONNECTS => "Connections to the broker made.",
        MQTT_COMMANDS => "Commands received on the broker's command topic.",
        MQTT_CONNECTED => "1 while connected to the broker.",
        MQTT_PUBLISH_RATE => "Messages acknowledged per second over the last stats interval.",
        OUTBOX_ROWS => "Messages waiting in the outbox.",
        OUTBOX_BYTES => "Payload bytes waiting in the outbox.",
        OUTBOX_OLDEST_AGE_MS => "Age of the oldest message in the outbox (0 when empty).",
        RETENTION_RUNS => "Retention enforcements completed.",
        RETENTION_READINGS_DELETED => "Raw readings deleted by retention.",
        RETENTION_AGGREGATES_DELETED => "Aggregate windows deleted by retention.",
        WRITER_QUEUE_DEPTH => "Datagrams waiting for the writer when it took its last batch.",
        WRITER_QUEUE_CAPACITY => {
            "Datagrams the writer's queue holds (telemetry.queue); past it they are dropped."
        }
        DB_USED_BYTES => {
            "Bytes of database pages in use (free pages excluded), updated every stats interval."
        }
        "drop_too_short" => "Datagrams dropped: shorter than a header and tag.",
        "drop_too_long" => "Datagrams dropped: longer than the protocol allows.",
        "drop_bad_version" => "Datagrams dropped: unknown protocol version.",
        "drop_bad_header" => "Datagrams dropped: invalid header.",
        "drop_unknown_device" => "Datagrams dropped: device not provisioned.",
        "drop_bad_tag" => "Datagrams dropped: authentication tag did not verify.",
        "drop_bad_payload" => "Datagrams dropped: authentic but undecodable payload.",
        "drop_replay" => "Datagrams dropped: sequence older than the replay window.",
        "drop_duplicate" => "Datagrams dropped: sequence already accepted (re-acked).",
        "drop_queue_full" => "Datagrams dropped: writer queue full (not acked).",
        "drop_kernel" => "Datagrams the kernel dropped before the gateway read them.",
        "drop_auth_limited" => {
            "Datagrams dropped unchecked: source limited for failed authentications."
        }
        "drop_revoked" => "Datagrams dropped: device revoked.",
        _ => "Gateway counter.",
    }
}

/// Live counters of one gateway run, shared by ingest, writer and whoever reports them.
#[derive(Debug, Default)]
pub struct Counters {
    drops: [AtomicU64; DropReason::ALL.len()],
    /// See [`names::DATAGRAMS_RECEIVED`].
    pub datagrams_received: AtomicU64,
    /// See [`names::DATAGRAMS_ACCEPTED`].
    pub datagrams_accepted: AtomicU64,
    /// See [`names::DATAGRAMS_COMMITTED`].
    pub datagrams_committed: AtomicU64,
    /// See [`names::READINGS_COMMITTED`].
    pub readings_committed: AtomicU64,
    /// See [`names::TRANSACTIONS`].
    pub transactions: AtomicU64,
    /// See [`names::ACKS_SENT`].
    pub acks_sent: AtomicU64,
    /// See [`names::ACKS_FAILED`].
    pub acks_failed: AtomicU64,
    /// See [`names::COMMIT_ERRORS`].
    pub commit_errors: AtomicU64,
    /// See [`names::LATENCY_P50_US`].
    pub latency_p50_us: AtomicU64,
    /// See [`names::LATENCY_P99_US`].
    pub latency_p99_us: AtomicU64,
    /// See [`names::LATENCY_MAX_US`].
    pub latency_max_us: AtomicU64,
    /// See [`names::LATENCY_P999_US`].
    pub latency_p999_us: AtomicU64,
    /// See [`names::AGGREGATES_CLOSED`].
    pub aggregates_closed: AtomicU64,
    /// See [`names::AGGREGATES_REVISED`].
    pub aggregates_revised: AtomicU64,
    /// See [`names::AGGREGATE_LATE_DROPPED`].
    pub aggregate_late_dropped: AtomicU64,
    /// See [`names::OUTBOX_DROPPED`].
    pub outbox_dropped: AtomicU64,
    /// See [`names::MQTT_PUBLISHED`].
    pub mqtt_published: AtomicU64,
    /// See [`names::MQTT_CONNECTS`].
    pub mqtt_connects: AtomicU64,
    /// See [`names::MQTT_COMMANDS`].
    pub mqtt_commands: AtomicU64,
    /// See [`names::MQTT_CONNECTED`].
    pub mqtt_connected: AtomicU64,
    /// See [`names::MQTT_PUBLISH_RATE`].
    pub mqtt_publish_rate: AtomicU64,
    /// See [`names::OUTBOX_ROWS`].
    pub outbox_rows: AtomicU64,
    /// See [`names::OUTBOX_BYTES`].
    pub outbox_bytes: AtomicU64,
    /// See [`names::OUTBOX_OLDEST_AGE_MS`].
    pub outbox_oldest_age_ms: AtomicU64,
    /// See [`names::RETENTION_RUNS`].
    pub retention_runs: AtomicU64,
    /// See [`names::RETENTION_READINGS_DELETED`].
    pub retention_readings_deleted: AtomicU64,
    /// See [`names::RETENTION_AGGREGATES_DELETED`].
    pub retention_aggregates_deleted: AtomicU64,
    /// See [`names::DB_USED_BYTES`].
    pub db_used_bytes: AtomicU64,
    /// See [`names::WRITER_QUEUE_DEPTH`].
    pub writer_queue_depth: AtomicU64,
    /// See [`names::WRITER_QUEUE_CAPACITY`].
    pub writer_queue_capacity: AtomicU64,
    /// Gateway time (ms) the writer last finished a loop: a commit, or its idle tick. The
    /// watchdog reads it (not exported).
    pub writer_heartbeat_ms: AtomicU64,
    /// The error of the writer's failing commit while its commits fail (disk full, database
    /// read-only or gone); None while they succeed. `/healthz` reports it.
    pub store_error: std::sync::Mutex<Option<String>>,
    /// Receive-to-commit latency of every committed datagram, seconds ([`LATENCY_BOUNDS`]).
    pub commit_latency: Histogram,
    /// Readings per committed transaction ([`BATCH_BOUNDS`]).
    pub batch_readings: Histogram,
}

/// Upper bounds of the commit latency histogram, seconds.
pub const LATENCY_BOUNDS: &[f64] = &[
    0.0005, 0.001, 0.002, 0.005, 0.01, 0.02, 0.05, 0.1, 0.2, 0.5, 1.0, 2.0, 5.0,
];
/// Upper bounds of the batch size histogram, readings per transaction.
pub const BATCH_BOUNDS: &[f64] = &[
    1.0, 16.0, 64.0, 256.0, 1024.0, 4096.0, 16384.0, 65536.0, 262144.0,
];

/// A Prometheus histogram over fixed upper bounds (at most 15, given at each call), updated
/// without locks; the sum is kept in millionths.
#[derive(Debug, Default)]
pub struct Histogram {
    counts: [AtomicU64; 16],
    sum_millionths: AtomicU64,
    count: AtomicU64,
}

impl Histogram {
    /// Counts `value` in the first bucket whose bound is at least `value` (+Inf past the last).
    pub fn observe(&self, bounds: &[f64], value: f64) {
        let i = bounds
            .iter()
            .position(|b| value <= *b)
            .unwrap_or(bounds.len())
            .min(self.counts.len() - 1);
        self.counts[i].fetch_add(1, Relaxed);
        self.sum_millionths
            .fetch_add((value.max(0.0) * 1e6) as u64, Relaxed);
        self.count.fetch_add(1, Relaxed);
    }

    /// Appends the histogram in Prometheus text format (cumulative buckets, sum, count).
    pub fn render(&self, bounds: &[f64], metric: &str, help: &str, out: &mut String) {
        use std::fmt::Write;
        let _ = writeln!(out, "# HELP {metric} {help}\n# TYPE {metric} histogram");
        let mut cumulative = 0;
        for (i, b) in bounds.iter().enumerate().take(self.counts.len() - 1) {
            cumulative += self.counts[i].load(Relaxed);
            let _ = writeln!(out, "{metric}_bucket{{le=\"{b}\"}} {cumulative}");
        }
        let count = self.count.load(Relaxed);
        let _ = writeln!(out, "{metric}_bucket{{le=\"+Inf\"}} {count}");
        let sum = self.sum_millionths.load(Relaxed) as f64 / 1e6;
        let _ = writeln!(out, "{metric}_sum {sum}\n{metric}_count {count}");
    }
}

/// A snapshot of counters as (name, value, is_gauge) rows, the form the store persists.
pub type Snapshot = Vec<(&'static str, u64, bool)>;

impl Counters {
    /// Counts a dropped datagram.
    pub fn dropped(&self, reason: DropReason) {
        self.drops[reason as usize].fetch_add(1, Relaxed);
        tracing::debug!(target: "gateway::events", reason = reason.counter(), "datagram dropped");
    }

    /// Counts `n` datagrams dropped for one reason at once (drops learnt as a count).
    pub fn dropped_many(&self, reason: DropReason, n: u64) {
        self.drops[reason as usize].fetch_add(n, Relaxed);
        tracing::debug!(target: "gateway::events", reason = reason.counter(), n, "datagrams dropped");
    }

    /// Drops so far for one reason.
    pub fn drops(&self, reason: DropReason) -> u64 {
        self.drops[reason as usize].load(Relaxed)
    }

    /// Every counter with its name; gauges are flagged so they are stored, not added.
    pub fn snapshot(&self) -> Snapshot {
        let mut out: Snapshot = DropReason::ALL
            .iter()
            .map(|r| (r.counter(), self.drops(*r), false))
            .collect();
        let c = |a: &AtomicU64| a.load(Relaxed);
        out.extend([
            (
                names::DATAGRAMS_RECEIVED,
                c(&self.datagrams_received),
                false,
            ),
            (
                names::DATAGRAMS_ACCEPTED,
                c(&self.datagrams_accepted),
                false,
            ),
            (
                names::DATAGRAMS_COMMITTED,
                c(&self.datagrams_committed),
                false,
            ),
            (
                names::READINGS_COMMITTED,
                c(&self.readings_committed),
                false,
            ),
            (names::TRANSACTIONS, c(&self.transactions), false),
            (names::ACKS_SENT, c(&self.acks_sent), false),
            (names::ACKS_FAILED, c(&self.acks_failed), false),
            (names::COMMIT_ERRORS, c(&self.commit_errors), false),
            (names::LATENCY_P50_US, c(&self.latency_p50_us), true),
            (names::LATENCY_P99_US, c(&self.latency_p99_us), true),
            (names::LATENCY_MAX_US, c(&self.latency_max_us), true),
            (names::LATENCY_P999_US, c(&self.latency_p999_us), true),
            (names::AGGREGATES_CLOSED, c(&self.aggregates_closed), false),
            (
                names::AGGREGATES_REVISED,
                c(&self.aggregates_revised),
                false,
            ),
            (
                names::AGGREGATE_LATE_DROPPED,
                c(&self.aggregate_late_dropped),
                false,
            ),
            (names::OUTBOX_DROPPED, c(&self.outbox_dropped), false),
            (names::MQTT_PUBLISHED, c(&self.mqtt_published), false),
            (names::MQTT_CONNECTS, c(&self.mqtt_connects), false),
            (names::MQTT_COMMANDS, c(&self.mqtt_commands), false),
            (names::MQTT_CONNECTED, c(&self.mqtt_connected), true),
            (names::MQTT_PUBLISH_RATE, c(&self.mqtt_publish_rate), true),
            (names::OUTBOX_ROWS, c(&self.outbox_rows), true),
            (names::OUTBOX_BYTES, c(&self.outbox_bytes), true),
            (
                names::OUTBOX_OLDEST_AGE_MS,
                c(&self.outbox_oldest_age_ms),
                true,
            ),
            (names::RETENTION_RUNS, c(&self.retention_runs), false),
            (
                names::RETENTION_READINGS_DELETED,
                c(&self.retention_readings_deleted),
                false,
            ),
            (
                names::RETENTION_AGGREGATES_DELETED,
                c(&self.retention_aggregates_deleted),
                false,
            ),
            (names::DB_USED_BYTES, c(&self.db_used_bytes), true),
            (names::WRITER_QUEUE_DEPTH, c(&self.writer_queue_depth), true),
            (
                names::WRITER_QUEUE_CAPACITY,
                c(&self.writer_queue_capacity),
                true,
            ),
        ]);
        out
    }
}

/// Logs a summary of drops at most once per interval, so a flood of bad datagrams cannot
/// flood the log.
#[derive(Debug)]
pub struct DropLog {
    every: Duration,
    last: Instant,
    seen: [u64; DropReason::ALL.len()],
}

impl DropLog {
    /// A log that speaks at most once per `every`.
    pub fn new(every: Duration, now: Instant) -> Self {
        Self {
            every,
            last: now,
            seen: [0; DropReason::ALL.len()],
        }
    }

    /// Warns with the drops since the last warning, if the interval has passed and any happened.
    pub fn maybe_log(&mut self, counters: &Counters, now: Instant) {
        if now.duration_since(self.last) < self.every {
            return;
        }
        self.last = now;
        let mut parts = Vec::new();
        for r in DropReason::ALL {
            let v = counters.drops(r);
            let delta = v - self.seen[r as usize];
            self.seen[r as usize] = v;
            if delta > 0 {
                parts.push(format!("{}={delta}", &r.counter()[5..]));
            }
        }
        if !parts.is_empty() {
            tracing::warn!(drops = %parts.join(" "), "datagrams dropped");
        }
    }
}

#[cfg(test)]
mod histogram_tests {
    use super::*;

    #[test]
    fn buckets_are_cumulative_and_the_last_is_everything() {
        let h = Histogram::default();
        for v in [0.5, 1.0, 3.0, 100.0] {
            h.observe(&[1.0, 2.0, 5.0], v);
        }
        let mut out = String::new();
        h.render(&[1.0, 2.0, 5.0], "x", "X.", &mut out);
        for line in [
            "x_bucket{le=\"1\"} 2",
            "x_bucket{le=\"2\"} 2",
            "x_bucket{le=\"5\"} 3",
            "x_bucket{le=\"+Inf\"} 4",
            "x_sum 104.5",
            "x_count 4",
        ] {
            assert!(out.lines().any(|l| l == line), "{line} missing from\n{out}");
        }
    }
}
