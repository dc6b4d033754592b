-- The writer appends new blocks here (rowid order: each transaction writes a few new pages)
-- and moves them into `blocks` in the background, so that the pages of the device-clustered
-- table are rewritten once per merge rather than once per transaction. Queries read both
-- tables. See ARCHITECTURE.md, "Staging".
CREATE TABLE staging (
    rowid  INTEGER PRIMARY KEY AUTOINCREMENT,
    device INTEGER NOT NULL,
    ts_min INTEGER NOT NULL,
    seq    INTEGER NOT NULL,
    idx    INTEGER NOT NULL,
    ts_max INTEGER NOT NULL,
    count  INTEGER NOT NULL,
    data   BLOB    NOT NULL
);

-- Progress of the merge in progress: staged rows with rowid <= hi and device < upto are
-- already copied into `blocks` (in the same transaction that moved upto) and are hidden from
-- queries until they are deleted.
CREATE TABLE staging_merge (
    id   INTEGER PRIMARY KEY CHECK (id = 0),
    hi   INTEGER NOT NULL,
    upto INTEGER NOT NULL
);
INSERT INTO staging_merge (id, hi, upto) VALUES (0, 0, -9223372036854775808);
