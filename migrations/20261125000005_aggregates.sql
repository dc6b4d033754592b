-- Windowed aggregates and the MQTT outbox (store-and-forward).

-- The latest revision of every closed window, per device, sensor and window length.
-- Statistics over the readings of [start_ms, start_ms + window_ms) by the device's clock.
CREATE TABLE aggregates (
    device     INTEGER NOT NULL,
    window_ms  INTEGER NOT NULL,
    start_ms   INTEGER NOT NULL,
    sensor     INTEGER NOT NULL,
    -- 0 when first closed, then 1, 2, ... for corrections by late readings
    revision   INTEGER NOT NULL,
    count      INTEGER NOT NULL,
    min        REAL    NOT NULL,
    max        REAL    NOT NULL,
    mean       REAL    NOT NULL,
    -- population standard deviation
    stddev     REAL    NOT NULL,
    last       REAL    NOT NULL,
    -- timestamp, sequence and index of the reading that gave `last`
    last_ts    INTEGER NOT NULL,
    last_seq   INTEGER NOT NULL,
    last_idx   INTEGER NOT NULL,
    updated_ms INTEGER NOT NULL,
    PRIMARY KEY (device, window_ms, start_ms, sensor)
) WITHOUT ROWID;

-- Messages waiting for the broker's acknowledgement. seq is the per-gateway sequence number
-- carried in every payload (AUTOINCREMENT: never reused, even after the table empties).
-- topic is relative to "<prefix>/v1/<gateway-id>/"; payload is a JSON object to which the
-- forwarder adds "seq" and "gateway".
CREATE TABLE outbox (
    seq        INTEGER PRIMARY KEY AUTOINCREMENT,
    -- agg, event or cmd-result; the row cap drops only agg rows
    kind       TEXT    NOT NULL,
    topic      TEXT    NOT NULL,
    payload    TEXT    NOT NULL,
    created_ms INTEGER NOT NULL
);
CREATE INDEX outbox_kind_seq ON outbox (kind, seq);

-- Commands that came from the broker: their final status is published back.
ALTER TABLE commands ADD COLUMN origin TEXT;
ALTER TABLE commands ADD COLUMN request_id TEXT;
