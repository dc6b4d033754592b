-- Files offered to devices (firmware images, config files) and each device's transfer.
CREATE TABLE files (
    id         INTEGER PRIMARY KEY AUTOINCREMENT,
    -- sanitised name the device stores it under
    name       TEXT    NOT NULL,
    size       INTEGER NOT NULL,
    sha256     BLOB    NOT NULL,
    -- where the gateway keeps the bytes
    path       TEXT    NOT NULL,
    created_ms INTEGER NOT NULL
);

CREATE TABLE file_transfers (
    id           INTEGER PRIMARY KEY AUTOINCREMENT,
    file         INTEGER NOT NULL REFERENCES files (id),
    device       INTEGER NOT NULL,
    -- queued, sending, done, failed
    status       TEXT    NOT NULL,
    -- bytes the device has confirmed storing, contiguously from the start
    acked_offset INTEGER NOT NULL DEFAULT 0,
    updated_ms   INTEGER NOT NULL,
    detail       TEXT
);
CREATE INDEX file_transfers_device_status ON file_transfers (device, status);
