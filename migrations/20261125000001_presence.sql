-- Control sessions: whether a device is online, and the history of its transitions.
ALTER TABLE devices ADD COLUMN online INTEGER NOT NULL DEFAULT 0;
-- Last frame received on its control session, gateway clock, ms since the epoch.
ALTER TABLE devices ADD COLUMN control_seen_ms INTEGER;

CREATE TABLE device_events (
    device INTEGER NOT NULL,
    ts_ms  INTEGER NOT NULL,
    -- 'online' or 'offline'
    event  TEXT    NOT NULL,
    -- For offline: why the session ended (closed, timeout, shutdown, error). A session replaced
    -- by a newer one of the same device records nothing: the device stays online.
    detail TEXT
);
CREATE INDEX device_events_device_ts ON device_events (device, ts_ms);
