-- Key rotation: a new key waits in next_key until the device proves that it holds it; then it
-- replaces key and key_version moves on by one. Both keys are accepted while one waits.
ALTER TABLE devices ADD COLUMN key_version INTEGER NOT NULL DEFAULT 1;
ALTER TABLE devices ADD COLUMN next_key BLOB CHECK (next_key IS NULL OR length(next_key) = 32);
-- When the device last confirmed a new key, ms since the epoch.
ALTER TABLE devices ADD COLUMN key_rotated_ms INTEGER;
