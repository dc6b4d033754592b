-- Initial schema of the gateway. Shipped migrations are never edited: add a new file instead.

-- Provisioned devices: identity, key, and the committed replay state that lets a restarted
-- gateway reject datagrams it already stored.
CREATE TABLE devices (
    id           INTEGER PRIMARY KEY CHECK (id BETWEEN 0 AND 4294967295),
    name         TEXT    NOT NULL,
    key          BLOB    NOT NULL CHECK (length(key) = 32),
    created_ms   INTEGER NOT NULL,
    -- Receive time of the last committed datagram, gateway clock, ms since the epoch.
    last_seen_ms INTEGER,
    -- First and highest committed sequence numbers; NULL until the first datagram.
    first_seq    INTEGER,
    max_seq      INTEGER,
    -- 16-byte little-endian bitmap: bit i set when sequence max_seq - i is committed.
    window       BLOB,
    -- Distinct datagrams and readings committed.
    datagrams    INTEGER NOT NULL DEFAULT 0,
    readings     INTEGER NOT NULL DEFAULT 0,
    -- Datagrams that named this device but were rejected (bad tag, bad payload, replay, duplicate).
    rejected     INTEGER NOT NULL DEFAULT 0
);

-- One row per reading, clustered by (device, ts) so that device and time-range queries and
-- retention are range scans. (device, seq, idx) identifies a reading; see ARCHITECTURE.md.
-- value is NULL when the device sent NaN.
CREATE TABLE readings (
    device INTEGER NOT NULL,
    ts     INTEGER NOT NULL,
    seq    INTEGER NOT NULL,
    idx    INTEGER NOT NULL,
    sensor INTEGER NOT NULL,
    value  REAL,
    PRIMARY KEY (device, ts, seq, idx)
) WITHOUT ROWID;

-- Cumulative counters across runs (drops by reason, commits, acks) and gauges of the last run.
CREATE TABLE counters (
    name  TEXT PRIMARY KEY,
    value INTEGER NOT NULL
) WITHOUT ROWID;
