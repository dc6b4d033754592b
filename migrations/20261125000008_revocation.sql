-- Revocation: a revoked device's datagrams and control sessions are refused from the moment it
-- is revoked (ms since the epoch here); its stored readings and history stay.
ALTER TABLE devices ADD COLUMN revoked_ms INTEGER;
