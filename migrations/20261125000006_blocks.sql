-- Readings are stored one row per datagram (a block) instead of one row per reading: a B-tree
-- insert and a handful of bound values per datagram rather than per reading (see
-- ARCHITECTURE.md, "Storage of readings", and gateway/src/store/block.rs for the blob format).
CREATE TABLE blocks (
    device INTEGER NOT NULL,
    -- Earliest and latest device timestamp of the block's readings; at most 5 minutes apart.
    ts_min INTEGER NOT NULL,
    seq    INTEGER NOT NULL,
    -- Index in the datagram of the block's first reading.
    idx    INTEGER NOT NULL,
    ts_max INTEGER NOT NULL,
    count  INTEGER NOT NULL,
    data   BLOB    NOT NULL,
    PRIMARY KEY (device, ts_min, seq, idx)
) WITHOUT ROWID;

-- Readings stored by earlier versions are moved into blocks by the gateway when it opens the
-- database (the blob is encoded in Rust), in chunks, after which this table is dropped.
ALTER TABLE readings RENAME TO readings_v0;
