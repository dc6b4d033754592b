-- Operator commands to devices, kept until delivered (or expired), with their status history.
CREATE TABLE commands (
    id          INTEGER PRIMARY KEY AUTOINCREMENT,
    device      INTEGER NOT NULL,
    -- postcard encoding of proto::control::Command (the exact bytes sent, so a resend is identical)
    body        BLOB    NOT NULL,
    -- human summary, e.g. "set-interval 500"
    summary     TEXT    NOT NULL,
    -- queued, sent, acknowledged, failed, expired
    status      TEXT    NOT NULL,
    created_ms  INTEGER NOT NULL,
    expires_ms  INTEGER NOT NULL,
    updated_ms  INTEGER NOT NULL,
    -- the device's answer: done, failed or duplicate, and its detail
    result      TEXT
);
CREATE INDEX commands_device_status ON commands (device, status);

CREATE TABLE command_events (
    command INTEGER NOT NULL,
    ts_ms   INTEGER NOT NULL,
    status  TEXT    NOT NULL,
    detail  TEXT
);
CREATE INDEX command_events_command ON command_events (command);
