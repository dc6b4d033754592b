-- Desired configuration per device (set by operators) and what the device reports it applied.
-- Both are JSON objects {"interval_ms":..,"batch":..,"sensors":[..]}.
CREATE TABLE device_config (
    device      INTEGER PRIMARY KEY,
    desired     TEXT,
    desired_ms  INTEGER,
    reported    TEXT,
    reported_ms INTEGER
);
